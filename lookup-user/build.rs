//! Builds the eBPF dispatcher and leaves it in `OUT_DIR` for `include_bytes!`.
//!
//! Toolchain, in order: `LOOKUP_EBPF_TOOLCHAIN` if set; rustup's `nightly`
//! when it has `rust-src` (the standard aya path, `-Z build-std=core`); the
//! `lookup-bpf` toolchain that `cargo xtask setup` links to Debian's
//! `rustc-web`, whose prebuilt `core` for `bpfel-unknown-none` needs no
//! build-std. Without any of them the build carries an empty object and the
//! agent says how to fix it when started.
use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{Context as _, Result};
use aya_build::{Package, Toolchain};

const DEBIAN_TOOLCHAIN: &str = "lookup-bpf";

fn rustup_output(args: &[&str]) -> Option<String> {
    let out = Command::new("rustup").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn nightly_has_rust_src() -> bool {
    rustup_output(&["run", "nightly", "rustc", "--print", "sysroot"])
        .map(|sysroot| {
            PathBuf::from(sysroot)
                .join("lib/rustlib/src/rust/library/core")
                .is_dir()
        })
        .unwrap_or(false)
}

fn debian_toolchain_linked() -> bool {
    rustup_output(&["toolchain", "list"])
        .map(|list| list.lines().any(|l| l.starts_with(DEBIAN_TOOLCHAIN)))
        .unwrap_or(false)
}

fn main() -> Result<()> {
    println!("cargo:rerun-if-env-changed=LOOKUP_EBPF_TOOLCHAIN");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let object = out_dir.join("lookup");

    let custom = env::var("LOOKUP_EBPF_TOOLCHAIN").ok();
    let toolchain = if let Some(name) = custom.as_deref() {
        Some(Toolchain::Custom(name))
    } else if nightly_has_rust_src() {
        Some(Toolchain::Nightly)
    } else if debian_toolchain_linked() {
        Some(Toolchain::Custom(DEBIAN_TOOLCHAIN))
    } else {
        None
    };
    let Some(toolchain) = toolchain else {
        println!(
            "cargo:warning=no eBPF toolchain found (run `cargo xtask setup`); \
             building lookup without its dispatcher object"
        );
        fs::write(&object, b"")?;
        fs::write(out_dir.join("lookup-baselines"), b"")?;
        return Ok(());
    };
    if matches!(toolchain, Toolchain::Custom(_)) && env::var_os("RUSTC_BOOTSTRAP").is_none() {
        // aya-ebpf uses a few nightly features; a stable rustc accepts them
        // for that crate alone. Not "lookup-ebpf", which would ask aya-build
        // for -Z build-std that the Debian toolchain neither has nor needs.
        // SAFETY: build scripts are single-threaded.
        unsafe { env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf") };
    }

    // aya-build passes the nested cargo's stderr through as build-script
    // warnings; without this every build prints ~35 "warning: Compiling"
    // lines that are progress, not problems. Errors still come through.
    // SAFETY: build scripts are single-threaded.
    unsafe { env::set_var("CARGO_TERM_QUIET", "true") };

    let root = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("no manifest dir")?);
    let ebpf_dir = root.join("../lookup-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    println!("cargo:rerun-if-changed=../lookup-common/src");
    aya_build::build_ebpf(
        [Package {
            name: "lookup-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        toolchain,
    )
}
