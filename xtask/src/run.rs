//! `cargo xtask run`: the agent in the foreground, as the README's "start
//! it" command.
use std::{ffi::OsString, fs, os::unix::process::CommandExt as _, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{
    build,
    cmd::{self, is_root},
};

/// Where lookupd looks for bpffs by default.
const BPFFS: &str = "/sys/fs/bpf";
/// The directory of lookupd's default control socket.
const RUN_DIR: &str = "/run/lookup";

/// Sets up, builds (release), prepares bpffs and `/run/lookup`, then
/// replaces this process with lookupd so that Ctrl-C and SIGTERM reach it.
pub fn run(args: &[OsString]) -> Result<()> {
    let bin_dir = build::build(true)?;
    mount_bpffs()?;
    fs::create_dir_all(RUN_DIR)
        .with_context(|| format!("cannot create {RUN_DIR} (run as root, or pass --control)"))?;
    let lookupd = bin_dir.join("lookupd");
    let mut agent = Command::new(&lookupd);
    agent.args(args);
    eprintln!("$ {}", cmd::display(&agent));
    let err = agent.exec();
    Err(err).with_context(|| format!("cannot execute {}", lookupd.display()))
}

/// Whether a bpffs is mounted at `path`, according to /proc/self/mounts.
pub fn bpffs_mounted(path: &str) -> Result<bool> {
    let mounts =
        fs::read_to_string("/proc/self/mounts").context("cannot read /proc/self/mounts")?;
    Ok(mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next(), fields.next(), fields.next());
        target == Some(path) && fstype == Some("bpf")
    }))
}

fn mount_bpffs() -> Result<()> {
    if bpffs_mounted(BPFFS)? {
        println!("run: bpffs at {BPFFS}: already mounted");
        return Ok(());
    }
    if !is_root() {
        bail!("no bpffs at {BPFFS}; as root run: mount -t bpf bpf {BPFFS}");
    }
    cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
    println!("run: bpffs at {BPFFS}: mounted");
    Ok(())
}
