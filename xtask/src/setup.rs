//! `cargo xtask setup`: installs what building lookup needs on Debian 12.
//!
//! The eBPF object needs a Rust `core` for `bpfel-unknown-none` and
//! bpf-linker. rustup's nightly here has no `rust-src` and cannot fetch it,
//! so `-Z build-std` is out; Debian's `rustc-web` ships a prebuilt `core` for
//! that target (`libstd-rust-web-dev-bpf`). We link it into rustup as the
//! `lookup-bpf` toolchain, which `lookup-user/build.rs` falls back to.
//!
//! Every step checks first and does nothing when its part is present, so the
//! whole command takes milliseconds on a machine that is already set up.
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{self, is_root};

/// Debian packages the build and the tests need.
pub const PACKAGES: &[&str] = &[
    // The toolchain behind `lookup-bpf`, with its prebuilt core for BPF and
    // clippy to lint the eBPF crate on its own target.
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "rust-web-clippy",
    // bpf-linker links against LLVM 22.
    "llvm-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    // `ip` for the netns tests, `systemd-analyze verify` for the unit files.
    "iproute2",
    "systemd",
];

/// The bpf-linker release that matches LLVM 22 and aya 0.14.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Where Debian's llvm-22-dev lives.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// The rustup name of Debian's toolchain; `lookup-user/build.rs` knows it.
pub const TOOLCHAIN: &str = "lookup-bpf";
/// Where Debian's toolchain is installed (`/usr/bin/rustc`).
const TOOLCHAIN_PATH: &str = "/usr";

/// Checks every part and installs what is missing.
pub fn setup() -> Result<()> {
    packages()?;
    bpf_linker()?;
    toolchain()?;
    Ok(())
}

fn packages() -> Result<()> {
    let missing = missing_packages()?;
    let what = format!("Debian packages ({})", PACKAGES.join(" "));
    if missing.is_empty() {
        println!("setup: {what}: already present");
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root() {
        // bpf-linker and the rustup link are per user and need the
        // packages first, so say that they come after.
        let mut later = Vec::new();
        if bpf_linker_version().as_deref() != Some(BPF_LINKER_VERSION) {
            later.push(format!("bpf-linker {BPF_LINKER_VERSION}"));
        }
        if !toolchain_linked().unwrap_or(false) {
            later.push(format!("the rustup toolchain {TOOLCHAIN}"));
        }
        let later = if later.is_empty() {
            String::new()
        } else {
            format!(" (it then installs {} for your user)", later.join(" and "))
        };
        bail!(
            "missing Debian packages: {list}\n\
             install them as root, then run `cargo xtask setup` again{later}:\n    \
             sudo sh -c 'apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y {list}'"
        );
    }
    println!("setup: installing Debian packages: {list}");
    cmd::run(Command::new("apt-get").arg("update"))?;
    cmd::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y"])
            .args(&missing),
    )?;
    let still = missing_packages()?;
    if !still.is_empty() {
        bail!(
            "apt-get install finished but these are still missing: {}",
            still.join(" ")
        );
    }
    println!("setup: {what}: installed {list}");
    Ok(())
}

/// The packages of [`PACKAGES`] that dpkg does not list as installed.
fn missing_packages() -> Result<Vec<&'static str>> {
    // One dpkg-query for all: it prints the known ones and exits 1 if any
    // is unknown, so read stdout whatever the status.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package}\\t${Status}\\n"])
        .args(PACKAGES)
        .stderr(Stdio::null())
        .output()
        .context(
            "cannot run dpkg-query: `cargo xtask setup` supports Debian 12; elsewhere install \
             rustc/cargo with a core for bpfel-unknown-none, bpf-linker and LLVM yourself",
        )?;
    let listed = String::from_utf8_lossy(&out.stdout);
    let installed = |pkg: &str| {
        listed.lines().any(|line| {
            let (name, status) = line.split_once('\t').unwrap_or((line, ""));
            // Status is "want flag state": state "installed" is what counts.
            name == pkg && status.split_whitespace().nth(2) == Some("installed")
        })
    };
    Ok(PACKAGES
        .iter()
        .copied()
        .filter(|pkg| !installed(pkg))
        .collect())
}

fn bpf_linker_version() -> Option<String> {
    // `bpf-linker 0.13.0`
    cmd::probe("bpf-linker", ["--version"])?
        .split_whitespace()
        .nth(1)
        .map(str::to_owned)
}

fn bpf_linker() -> Result<()> {
    let what = format!("bpf-linker {BPF_LINKER_VERSION}");
    let found = bpf_linker_version();
    if found.as_deref() == Some(BPF_LINKER_VERSION) {
        println!("setup: {what}: already present");
        return Ok(());
    }
    match &found {
        Some(other) => println!("setup: {what}: found {other}, installing {BPF_LINKER_VERSION}"),
        None => println!("setup: {what}: installing (about a minute)"),
    }
    // Installs into $CARGO_HOME/bin, the caller's own: no root needed.
    cmd::run(
        cmd::cargo()
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22"]),
    )?;
    match bpf_linker_version() {
        Some(v) if v == BPF_LINKER_VERSION => {
            println!("setup: {what}: installed");
            Ok(())
        }
        other => bail!(
            "installed bpf-linker {BPF_LINKER_VERSION} into $CARGO_HOME/bin (~/.cargo/bin), but \
             `bpf-linker --version` on PATH reports {}: put ~/.cargo/bin first on PATH",
            other.as_deref().unwrap_or("nothing")
        ),
    }
}

fn toolchain_linked() -> Result<bool> {
    let list = cmd::probe("rustup", ["toolchain", "list"]).context(
        "`rustup toolchain list` failed: lookup builds with rustup (https://rustup.rs); \
         install it, then run `cargo xtask setup` again",
    )?;
    Ok(list
        .lines()
        .any(|line| line.split_whitespace().next() == Some(TOOLCHAIN)))
}

fn toolchain() -> Result<()> {
    let what = format!("rustup toolchain {TOOLCHAIN} -> {TOOLCHAIN_PATH}");
    if toolchain_linked()? {
        println!("setup: {what}: already present");
        return Ok(());
    }
    // Per user (in $RUSTUP_HOME): no root needed.
    cmd::run(Command::new("rustup").args(["toolchain", "link", TOOLCHAIN, TOOLCHAIN_PATH]))?;
    println!("setup: {what}: installed");
    Ok(())
}
