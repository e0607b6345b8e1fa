//! `cargo xtask bench`: builds `lookup-bench` (release) and runs it as root.
//! It isolates itself in a private network and mount namespace with its own
//! bpffs, and prints one table of figures with ratios to baselines measured
//! in the same run. Record results in BENCHMARKS.md.
use std::{ffi::OsString, process::Command};

use anyhow::{Result, bail};

use crate::{build, cmd};

/// Sets up, builds in release mode and runs the benchmark; `args` go to
/// `lookup-bench` (`--sizes`, `--repeat`, `--trials`).
pub fn bench(args: &[OsString]) -> Result<()> {
    if !cmd::is_root() {
        bail!("the benchmark loads BPF programs and makes network namespaces: run it as root");
    }
    let dir = build::build(true)?;
    let mut bench = Command::new(dir.join("lookup-bench"));
    bench.args(args);
    cmd::run(&mut bench)
}
