//! A private bpffs instance per test.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// A bpffs mounted on a fresh temporary directory.
///
/// Every `mount -t bpf` creates a new instance, so objects pinned by one test
/// are invisible to every other. On drop the instance is detached (lazily, in
/// case something still holds it) and the directory removed; with the last
/// reference gone the kernel frees what was pinned, including the link that
/// attached the dispatcher.
#[derive(Debug)]
pub struct BpfFs {
    path: PathBuf,
}

impl BpfFs {
    /// Mounts a new bpffs at `$TMPDIR/lookup-bpffs-XXXXXX`.
    #[expect(
        clippy::new_without_default,
        reason = "mounting a filesystem is not a default value"
    )]
    #[track_caller]
    pub fn new() -> BpfFs {
        let template = std::env::temp_dir().join("lookup-bpffs-XXXXXX");
        let path = nix::unistd::mkdtemp(&template)
            .unwrap_or_else(|e| panic!("mkdtemp {}: {e}", template.display()));
        if let Err(e) = mount(
            Some("bpf"),
            &path,
            Some("bpf"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        ) {
            let _ = std::fs::remove_dir(&path);
            panic!("mount -t bpf bpf {}: {e}", path.display());
        }
        BpfFs { path }
    }

    /// The mount point, to pass as `lookupd --bpffs`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        if let Err(e) = umount2(&self.path, MntFlags::MNT_DETACH) {
            eprintln!("warning: umount {}: {e}", self.path.display());
            return;
        }
        if let Err(e) = std::fs::remove_dir(&self.path) {
            eprintln!("warning: rmdir {}: {e}", self.path.display());
        }
    }
}
