//! `cargo xtask build`: the workspace's binaries, with the eBPF object
//! embedded by `lookup-user/build.rs`.
use std::path::PathBuf;

use anyhow::Result;

use crate::{cmd, setup};

/// Runs setup, then builds lookupd, lookupctl and the test binaries.
/// Returns the directory that holds them.
pub fn build(release: bool) -> Result<PathBuf> {
    setup::setup()?;
    build_bins(release)
}

/// Builds the binaries without running setup first.
pub fn build_bins(release: bool) -> Result<PathBuf> {
    let mut cargo = cmd::cargo();
    // lookup-ebpf is a bpfel-unknown-none program that lookup-user/build.rs
    // builds on its own; xtask is this program.
    cargo.args([
        "build",
        "--workspace",
        "--exclude",
        "lookup-ebpf",
        "--exclude",
        "xtask",
        "--bins",
    ]);
    if release {
        cargo.arg("--release");
    }
    cmd::run(&mut cargo)?;
    let dir = cmd::target_dir().join(if release { "release" } else { "debug" });
    println!("build: binaries are in {}", dir.display());
    Ok(dir)
}
