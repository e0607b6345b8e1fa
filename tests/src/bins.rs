//! Where the binaries under test are.
//!
//! `lookupd` and `lookupctl` belong to another package, so Cargo does not
//! build them for `cargo test -p lookup-tests`; they must already be built
//! (`cargo build --workspace`; `cargo xtask test` builds them and points
//! `LOOKUP_BIN_DIR` at them).

use std::path::{Path, PathBuf};

/// The agent.
pub const LOOKUPD: &str = "lookupd";
/// The CLI.
pub const LOOKUPCTL: &str = "lookupctl";
/// This package's echo server.
pub const ECHO_SERVER: &str = "echo-server";

/// The workspace root: the parent of this package.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Directories searched for binaries, in order.
///
/// `$LOOKUP_BIN_DIR` alone if set. Otherwise the profile directory the
/// running test binary was built into (`<target>/<profile>/deps/..`), then
/// `$CARGO_TARGET_DIR/debug` (relative to the workspace root if relative),
/// then `<workspace root>/target/debug`.
pub fn search_dirs() -> Vec<PathBuf> {
    if let Some(dir) = std::env::var_os("LOOKUP_BIN_DIR") {
        return vec![PathBuf::from(dir)];
    }
    let mut dirs = Vec::new();
    let profile = std::env::current_exe().ok().and_then(|exe| {
        exe.parent()
            .filter(|p| p.ends_with("deps"))
            .and_then(Path::parent)
            .map(Path::to_path_buf)
    });
    dirs.extend(profile);
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        dirs.push(workspace_root().join(target).join("debug"));
    }
    dirs.push(workspace_root().join("target").join("debug"));
    dirs.dedup();
    dirs
}

/// The path of binary `name`, panicking with the fix if it is missing.
#[track_caller]
pub fn binary(name: &str) -> PathBuf {
    let dirs = search_dirs();
    for dir in &dirs {
        let path = dir.join(name);
        if path.is_file() {
            return path;
        }
    }
    panic!(
        "binary `{name}` not found in {dirs:?}: run `cargo build --workspace` first (`cargo \
         xtask test` does), or point LOOKUP_BIN_DIR at the directory holding lookupd, \
         lookupctl and echo-server"
    );
}
