//! A private network namespace for the calling thread.

use std::{fs::File, marker::PhantomData, os::unix::fs::MetadataExt, process::Command};

use nix::sched::{CloneFlags, setns, unshare};

const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// Moves the calling thread into a fresh network namespace and back on drop.
///
/// Only this thread moves (`unshare(CLONE_NEWNET)` is per task). Sockets it
/// creates, threads it spawns and processes it starts live in the new
/// namespace. The guard is `!Send`: restoring must happen on the thread that
/// entered. The namespace itself lives on while any process or socket still
/// uses it.
#[derive(Debug)]
pub struct NetNs {
    original: File,
    inode: u64,
    _not_send: PhantomData<*const ()>,
}

impl NetNs {
    /// Enters a new namespace, brings `lo` up and adds an AnyIP route on
    /// `lo` for each prefix (`ip route add local 192.0.2.0/24 dev lo`,
    /// `ip -6 route add local 2001:db8::/32 dev lo`), so the namespace
    /// accepts traffic to every address in it.
    #[track_caller]
    pub fn new(local_prefixes: &[&str]) -> NetNs {
        let original =
            File::open(THREAD_NETNS).unwrap_or_else(|e| panic!("open {THREAD_NETNS}: {e}"));
        unshare(CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("unshare(CLONE_NEWNET): {e} (are we root?)"));
        let guard = NetNs {
            original,
            inode: current_inode(),
            _not_send: PhantomData,
        };
        ip(&["link", "set", "lo", "up"]);
        for prefix in local_prefixes {
            let family = if prefix.contains(':') { "-6" } else { "-4" };
            ip(&[family, "route", "add", "local", prefix, "dev", "lo"]);
        }
        guard
    }

    /// Inode of the namespace: the name under which `lookupd` pins its state
    /// (`<bpffs>/lookup/<inode>/`).
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// Panics unless the calling thread is in this namespace. Spawning a
    /// process from any other thread would put it in the wrong namespace.
    #[track_caller]
    pub fn assert_current(&self) {
        let now = current_inode();
        assert_eq!(
            now, self.inode,
            "this thread is in netns {now}, not the test's netns {}: call the harness from \
             the test thread",
            self.inode
        );
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.original, CloneFlags::CLONE_NEWNET) {
            // Staying in the test namespace would poison the next test that
            // reuses this thread, so do not carry on quietly.
            if !std::thread::panicking() {
                panic!("restoring the original netns: {e}");
            }
            eprintln!("restoring the original netns: {e}");
        }
    }
}

/// Inode of the calling thread's network namespace.
pub fn current_inode() -> u64 {
    std::fs::metadata(THREAD_NETNS)
        .unwrap_or_else(|e| panic!("stat {THREAD_NETNS}: {e}"))
        .ino()
}

/// Runs `ip ARGS` from the calling thread, so in its namespace.
#[track_caller]
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawning `ip {}`: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "`ip {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Runs `f` on a new thread inside a fresh network namespace (with `lo` up
/// and AnyIP routes for `local_prefixes`) and returns what it returns.
///
/// Sockets and processes `f` creates stay in that namespace after it
/// returns; the namespace lives as long as they do. Use it to make
/// something that must be foreign to the test's namespace.
#[track_caller]
pub fn in_other_netns<T: Send + 'static>(
    local_prefixes: &[&str],
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let prefixes: Vec<String> = local_prefixes.iter().map(|p| (*p).to_owned()).collect();
    std::thread::spawn(move || {
        let prefixes: Vec<&str> = prefixes.iter().map(String::as_str).collect();
        let _ns = NetNs::new(&prefixes);
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}
