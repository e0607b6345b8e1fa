//! End-to-end harness for lookup: real traffic through a real `lookupd`.
//!
//! Every privileged test builds a [`Lab`]: a private network namespace for
//! the test thread ([`NetNs`]), a private bpffs instance ([`BpfFs`]), a
//! scratch directory ([`TempDir`]) and a `lookupd` process under test
//! ([`Agent`]) that lives in that namespace. Tests drive the agent with the
//! real `lookupctl` binary and check which server answered with servers that
//! reply with their own name ([`TcpEcho`], [`UdpEcho`], [`EchoProcess`]) and
//! clients that report refusals precisely ([`dial`], [`assert_answers`],
//! [`assert_refused`]).
//!
//! The binaries are black boxes found on disk (see [`bins`]); nothing here
//! links against the agent's library, so the tests check the contract users
//! see, not the implementation.
//!
//! Threads and namespaces: `unshare(CLONE_NEWNET)` moves only the calling
//! thread. Every socket and process a test creates from its own thread, or
//! from threads it spawns, lives in the test's namespace; code that runs on
//! another thread does not. Keep harness calls on the test thread.

pub mod agent;
pub mod bindings;
pub mod bins;
pub mod bpffs;
pub mod client;
pub mod echo;
pub mod netns;
pub mod process;
pub mod sock;
pub mod tmp;

use std::{io::Write, net::SocketAddr, ops::Deref};

pub use agent::{Agent, CtlOutput};
pub use bindings::{BindingRow, first_match};
pub use bpffs::BpfFs;
pub use client::{Proto, assert_answers, assert_refused, dial, dial_tcp, send_udp};
pub use echo::{TcpEcho, UdpEcho};
pub use netns::NetNs;
pub use process::{EchoProcess, Holder};
pub use tmp::TempDir;

/// Decides whether a privileged test may run.
///
/// Returns `true` as root. Otherwise, outside CI it prints why the test is
/// skipped and returns `false` (the caller returns early and the test counts
/// as passed); with `CI=true` a missing privilege is a failure, so it panics.
///
/// ```no_run
/// if !lookup_tests::require_root() {
///     return;
/// }
/// ```
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_owned();
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "{test} needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_BPF) to create network \
             namespaces, mount bpffs and load BPF, and CI=true forbids skipping it"
        );
    }
    // Straight to fd 2, not `eprintln!`: libtest captures the macros' output
    // of passing tests, and a skip must be visible.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_BPF) for network \
         namespaces, bpffs and BPF; run the suite as root (for example `sudo -E cargo xtask \
         test`)"
    );
    false
}

/// Parses a socket address written in a test, panicking on a typo.
#[track_caller]
pub fn sa(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad socket address {s:?} in test: {e}"))
}

/// Everything one privileged test needs: its own network namespace, bpffs,
/// scratch directory and a running `lookupd`.
///
/// Fields drop in declaration order: the agent dies first, then the bpffs is
/// unmounted, the scratch directory removed, and finally the test thread
/// returns to its original namespace. `Lab` derefs to its [`Agent`], so
/// `lab.ctl_ok(...)` drives the agent directly.
pub struct Lab {
    /// The agent under test, running in [`Lab::netns`].
    pub agent: Agent,
    /// The bpffs the agent pins its state in.
    pub bpffs: BpfFs,
    /// Scratch space: control socket, agent log, pidfiles.
    pub tmp: TempDir,
    /// The test thread's private network namespace.
    pub netns: NetNs,
}

impl Lab {
    /// Enters a new network namespace with `lo` up and an AnyIP route
    /// (`ip route add local <prefix> dev lo`) for each of `local_prefixes`,
    /// mounts a fresh bpffs and starts `lookupd` in the namespace.
    ///
    /// Call [`require_root`] first.
    #[track_caller]
    pub fn new(local_prefixes: &[&str]) -> Lab {
        let netns = NetNs::new(local_prefixes);
        let tmp = TempDir::new("lab");
        let bpffs = BpfFs::new();
        let agent = Agent::start(&netns, bpffs.path(), tmp.path());
        Lab {
            agent,
            bpffs,
            tmp,
            netns,
        }
    }
}

impl Deref for Lab {
    type Target = Agent;

    fn deref(&self) -> &Agent {
        &self.agent
    }
}

impl std::ops::DerefMut for Lab {
    fn deref_mut(&mut self) -> &mut Agent {
        &mut self.agent
    }
}
