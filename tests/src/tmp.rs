//! Unique scratch directories, removed on drop.

use std::path::{Path, PathBuf};

/// A directory made with `mkdtemp`, so parallel tests never share one.
///
/// Removed recursively on drop, except when the test is failing and
/// `LOOKUP_KEEP_TMP` is set, to leave logs for a post-mortem.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `$TMPDIR/lookup-<what>-XXXXXX`.
    #[track_caller]
    pub fn new(what: &str) -> TempDir {
        let template = std::env::temp_dir().join(format!("lookup-{what}-XXXXXX"));
        let path = nix::unistd::mkdtemp(&template)
            .unwrap_or_else(|e| panic!("mkdtemp {}: {e}", template.display()));
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("LOOKUP_KEEP_TMP").is_some() {
            eprintln!("keeping {} (LOOKUP_KEEP_TMP)", self.path.display());
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("warning: removing {}: {e}", self.path.display());
        }
    }
}
