//! `lookupd` under test, and `lookupctl` to drive it.

use std::{
    ffi::OsStr,
    fmt,
    fs::OpenOptions,
    os::{fd::BorrowedFd, unix::net::UnixStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::Value;

use crate::{
    bins,
    client::Proto,
    netns::{self, NetNs},
    process::{self, pass_fds, run_with_timeout},
};

/// How long the agent may take to start serving its control socket.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one `lookupctl` command may take.
pub const CTL_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the agent may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Environment variables that would change what the binaries do behind the
/// test's back.
const SCRUBBED_ENV: [&str; 4] = [
    "LOOKUP_CONTROL",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
];

/// A `lookupd` process in the test's network namespace.
///
/// Runs `lookupd --bpffs <bpffs> --control <tmp>/lookupd.sock` with
/// `RUST_LOG=debug` (aya's own crates at info); its output goes to `<tmp>/lookupd.log`, which is
/// printed if the test fails. Killed with SIGKILL on drop.
#[derive(Debug)]
pub struct Agent {
    child: Option<Child>,
    bpffs: PathBuf,
    control: PathBuf,
    log: PathBuf,
    netns_inode: u64,
}

impl Agent {
    /// Starts the agent from the calling thread, which must be in `netns`,
    /// and waits until its control socket accepts connections.
    #[track_caller]
    pub fn start(netns: &NetNs, bpffs: &Path, tmp: &Path) -> Agent {
        netns.assert_current();
        let mut agent = Agent {
            child: None,
            bpffs: bpffs.to_path_buf(),
            control: tmp.join("lookupd.sock"),
            log: tmp.join("lookupd.log"),
            netns_inode: netns.inode(),
        };
        agent.spawn();
        agent
    }

    #[track_caller]
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        let now = netns::current_inode();
        assert_eq!(
            now, self.netns_inode,
            "starting lookupd from a thread in netns {now}, not the test's netns {}",
            self.netns_inode
        );
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.log.display()));
        let log2 = log.try_clone().expect("dup log fd");
        let mut cmd = Command::new(bins::binary(bins::LOOKUPD));
        cmd.arg("--bpffs")
            .arg(&self.bpffs)
            .arg("--control")
            .arg(&self.control)
            // Debug for lookup itself; aya's loader debug output (feature
            // probes, BTF fix-ups) would bury it.
            .env("RUST_LOG", "debug,aya=info,aya_obj=info")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        for var in SCRUBBED_ENV {
            cmd.env_remove(var);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        self.child = Some(child);
        self.wait_ready();
    }

    #[track_caller]
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().expect("try_wait lookupd") {
                self.child = None;
                panic!(
                    "lookupd exited during start-up ({status}); log:\n{}",
                    self.log_text()
                );
            }
            if UnixStream::connect(&self.control).is_ok() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "lookupd did not accept connections on {} within {START_TIMEOUT:?}; log:\n{}",
                    self.control.display(),
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The control socket path.
    pub fn control(&self) -> &Path {
        &self.control
    }

    /// The bpffs the agent pins into.
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// Where the agent pins the state of the test's namespace:
    /// `<bpffs>/lookup/<netns inode>`.
    pub fn state_dir(&self) -> PathBuf {
        self.bpffs.join("lookup").join(self.netns_inode.to_string())
    }

    /// The agent's pid, if it is running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the agent logged so far (across restarts).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_else(|e| format!("<{}: {e}>", self.log.display()))
    }

    /// `kill -9` the agent and reap it.
    #[track_caller]
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("kill9: agent not running");
        child.kill().expect("SIGKILL lookupd");
        child.wait().expect("reap lookupd");
    }

    /// SIGTERM the agent and wait for it to exit; panics unless it exits
    /// with status 0 in time. Returns the status.
    #[track_caller]
    pub fn sigterm(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("sigterm: agent not running");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM lookupd");
        let Some(status) = process::wait_timeout(&mut child, STOP_TIMEOUT) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "lookupd still running {STOP_TIMEOUT:?} after SIGTERM; killed it. log:\n{}",
                self.log_text()
            );
        };
        assert!(
            status.success(),
            "lookupd exited with {status} after SIGTERM, expected 0; log:\n{}",
            self.log_text()
        );
        status
    }

    /// Starts the agent again with the same arguments (after [`kill9`] or
    /// [`sigterm`]). Call from the test thread.
    ///
    /// [`kill9`]: Agent::kill9
    /// [`sigterm`]: Agent::sigterm
    #[track_caller]
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.kill9();
        }
        self.spawn();
    }

    /// A `lookupctl --control <socket>` command, without running it.
    pub fn ctl_command(&self) -> Command {
        let mut cmd = Command::new(bins::binary(bins::LOOKUPCTL));
        cmd.arg("--control").arg(&self.control);
        for var in SCRUBBED_ENV {
            cmd.env_remove(var);
        }
        cmd
    }

    /// Runs `lookupctl --control <socket> ARGS`.
    #[track_caller]
    pub fn ctl<S: AsRef<OsStr>>(&self, args: &[S]) -> CtlOutput {
        let mut cmd = self.ctl_command();
        cmd.args(args);
        CtlOutput::run(cmd)
    }

    /// Runs `lookupctl ARGS` and panics unless it exits 0.
    #[track_caller]
    pub fn ctl_ok<S: AsRef<OsStr>>(&self, args: &[S]) -> CtlOutput {
        self.ctl(args).ok()
    }

    /// Runs `lookupctl ARGS` and panics unless it fails with a message.
    #[track_caller]
    pub fn ctl_err<S: AsRef<OsStr>>(&self, args: &[S]) -> CtlOutput {
        self.ctl(args).err()
    }

    /// Runs `lookupctl --json ARGS`, expects success and parses stdout.
    #[track_caller]
    pub fn ctl_json<S: AsRef<OsStr>>(&self, args: &[S]) -> Value {
        let mut cmd = self.ctl_command();
        cmd.arg("--json").args(args);
        CtlOutput::run(cmd).ok().json()
    }

    /// `lookupctl --json bindings`.
    #[track_caller]
    pub fn bindings_json(&self) -> Value {
        self.ctl_json(&["bindings"])
    }

    /// `lookupctl --json status`.
    #[track_caller]
    pub fn status_json(&self) -> Value {
        self.ctl_json(&["status"])
    }

    /// `lookupctl bind LABEL PROTO PREFIX PORT`, which must succeed.
    #[track_caller]
    pub fn bind(&self, label: &str, proto: Proto, prefix: &str, port: u16) -> CtlOutput {
        self.ctl_ok(&["bind", label, proto.as_str(), prefix, &port.to_string()])
    }

    /// `lookupctl register LABEL` as systemd socket activation runs it: the
    /// sockets are fds 3, 4, ... and `LISTEN_FDS`, `LISTEN_PID` (the pid of
    /// `lookupctl` itself) and, if `names` is given, `LISTEN_FDNAMES` are
    /// set. Spawned from the calling thread. Does not check the result.
    #[track_caller]
    pub fn register_fds(
        &self,
        label: &str,
        fds: &[BorrowedFd<'_>],
        names: Option<&[&str]>,
    ) -> CtlOutput {
        // LISTEN_PID must be the pid of the process reading the fds, known
        // only once it exists: a shell sets it and then becomes lookupctl.
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(r#"LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@""#)
            .arg(bins::binary(bins::LOOKUPCTL))
            .arg("--control")
            .arg(&self.control)
            .arg("register")
            .arg(label);
        for var in SCRUBBED_ENV {
            cmd.env_remove(var);
        }
        cmd.env("LISTEN_FDS", fds.len().to_string());
        if let Some(names) = names {
            cmd.env("LISTEN_FDNAMES", names.join(":"));
        }
        let keep = pass_fds(&mut cmd, fds);
        let out = CtlOutput::run(cmd);
        drop(keep);
        out
    }

    /// `lookupctl register-pid TARGET LABEL PROTO IP PORT`, where TARGET is
    /// a pid or a pidfile. Does not check the result.
    #[track_caller]
    pub fn register_pid(
        &self,
        target: &str,
        label: &str,
        proto: Proto,
        ip: &str,
        port: u16,
    ) -> CtlOutput {
        self.ctl(&[
            "register-pid",
            target,
            label,
            proto.as_str(),
            ip,
            &port.to_string(),
        ])
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            eprintln!(
                "--- lookupd log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// What one `lookupctl` run printed and how it exited.
#[derive(Debug)]
pub struct CtlOutput {
    /// The command line, for messages.
    pub command: String,
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl CtlOutput {
    #[track_caller]
    fn run(mut cmd: Command) -> CtlOutput {
        let command = format!("{cmd:?}");
        let done = run_with_timeout(&mut cmd, CTL_TIMEOUT);
        CtlOutput {
            command,
            status: done.status,
            stdout: done.stdout,
            stderr: done.stderr,
        }
    }

    /// Whether it exited 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Panics unless it exited 0.
    #[track_caller]
    pub fn ok(self) -> CtlOutput {
        assert!(self.success(), "expected success:\n{self}");
        self
    }

    /// Panics unless it exited non-zero with something on stderr.
    #[track_caller]
    pub fn err(self) -> CtlOutput {
        assert!(!self.success(), "expected failure:\n{self}");
        assert!(
            !self.stderr.trim().is_empty(),
            "failed without a message on stderr:\n{self}"
        );
        self
    }

    /// Panics unless stderr contains at least one of `needles`,
    /// case-insensitively.
    #[track_caller]
    pub fn stderr_mentions(&self, needles: &[&str]) -> &CtlOutput {
        let hay = self.stderr.to_lowercase();
        assert!(
            needles.iter().any(|n| hay.contains(&n.to_lowercase())),
            "stderr should mention one of {needles:?}:\n{self}"
        );
        self
    }

    /// Parses stdout as JSON.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{self}"))
    }
}

impl fmt::Display for CtlOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "$ {}", self.command)?;
        writeln!(f, "exit: {}", self.status)?;
        writeln!(f, "stdout:\n{}", self.stdout.trim_end())?;
        write!(f, "stderr:\n{}", self.stderr.trim_end())
    }
}

/// The destination `(label, family, protocol)` in a `status --json` answer.
pub fn destination<'a>(
    status: &'a Value,
    label: &str,
    family: &str,
    proto: Proto,
) -> Option<&'a Value> {
    status["destinations"]
        .as_array()?
        .iter()
        .find(|d| d["label"] == label && d["family"] == family && d["protocol"] == proto.as_str())
}

/// Like [`destination`], panicking with the whole status if it is missing.
#[track_caller]
pub fn expect_destination<'a>(
    status: &'a Value,
    label: &str,
    family: &str,
    proto: Proto,
) -> &'a Value {
    destination(status, label, family, proto).unwrap_or_else(|| {
        panic!(
            "no destination {label}/{family}/{proto} in status:\n{}",
            serde_json::to_string_pretty(status).unwrap_or_default()
        )
    })
}

/// A counter of a destination, `metrics.<name>`.
#[track_caller]
pub fn metric(dest: &Value, name: &str) -> u64 {
    dest["metrics"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter metrics.{name} in {dest}"))
}
