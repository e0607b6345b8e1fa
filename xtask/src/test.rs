//! `cargo xtask test`: the README's "test the whole thing" command and what
//! CI runs (`.ci/run`).
//!
//! Order: cheap checks first (fmt, clippy), then the build, the unit files,
//! and the tests. The privileged netns tests in `lookup-tests` need root;
//! without it they print why and skip themselves, except under `CI=true`,
//! where skipping would hide them, so this command refuses to start.
use std::{env, ffi::OsString, process::Command, thread};

use anyhow::{Result, bail};

use crate::{
    build,
    cmd::{self, is_root},
    setup, units,
};

/// The eBPF crate: built and linted for its own target only.
const EBPF_PACKAGE: &str = "lookup-ebpf";

/// Runs every check; `args` go to the test binaries.
pub fn test(args: &[OsString]) -> Result<()> {
    if env::var("CI").as_deref() == Ok("true") && !is_root() {
        bail!(
            "CI=true but not running as root: the netns integration tests (package \
             lookup-tests) need root for network namespaces, bpffs and BPF, and CI must not \
             skip them. Run `sudo -E cargo xtask test`, or unset CI to let them skip"
        );
    }
    setup::setup()?;

    cmd::run(cmd::cargo().args(["fmt", "--all", "--", "--check"]))?;
    cmd::run(cmd::cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        EBPF_PACKAGE,
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    clippy_ebpf()?;

    // The netns tests start lookupd and lookupctl from another package, which
    // cargo test does not build: build them first and say where they are.
    let bin_dir = build::build_bins(false)?;
    units::verify(&bin_dir)?;

    let mut libtest: Vec<OsString> = Vec::new();
    let threads_given = args
        .iter()
        .any(|a| a.to_string_lossy().starts_with("--test-threads"))
        || env::var_os("RUST_TEST_THREADS").is_some();
    if !threads_given {
        // One per core (2 on the project's machines): each netns test has its
        // own namespace and agent, so they may run side by side.
        let cores = thread::available_parallelism().map_or(2, |n| n.get());
        libtest.push(format!("--test-threads={cores}").into());
    }
    libtest.extend(args.iter().cloned());

    let test = |kinds: &[&str]| {
        let mut cargo = cmd::cargo();
        cargo
            .env("LOOKUP_BIN_DIR", &bin_dir)
            .args([
                "test",
                "--no-fail-fast",
                "--workspace",
                "--exclude",
                EBPF_PACKAGE,
            ])
            .args(kinds)
            .arg("--")
            .args(&libtest);
        cargo
    };
    // Doc tests first, so the output closes on the summary of the unit and
    // integration tests rather than on a crate without doc tests.
    cmd::run(&mut test(&["--doc"]))?;
    cmd::run(&mut test(&["--lib", "--bins", "--tests"]))?;
    Ok(())
}

/// Clippy for the eBPF crate on `bpfel-unknown-none`, where its code exists
/// (on the host it is cfg'd out). It uses the `lookup-bpf` toolchain that
/// setup links, with Debian's clippy (rust-web-clippy), in a target
/// directory of its own so its different rustc does not invalidate the
/// host build.
fn clippy_ebpf() -> Result<()> {
    let target = if cfg!(target_endian = "big") {
        "bpfeb-unknown-none"
    } else {
        "bpfel-unknown-none"
    };
    // As lookup-user/build.rs and aya-build do: aya-ebpf needs a few nightly
    // features, and its code keys on bpf_target_arch.
    let rustflags = format!("--cfg=bpf_target_arch=\"{}\"", env::consts::ARCH);
    let target_dir = cmd::target_dir().join("xtask/ebpf-lint");
    let mut clippy = Command::new("rustup");
    clippy
        .current_dir(cmd::workspace_root())
        .env("RUSTC_BOOTSTRAP", "aya_ebpf")
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .args(["run", setup::TOOLCHAIN, "cargo", "clippy"])
        .args(["--package", EBPF_PACKAGE, "--release", "--target", target])
        .arg("--target-dir")
        .arg(&target_dir)
        .args(["--", "-D", "warnings"]);
    cmd::run(&mut clippy)
}
