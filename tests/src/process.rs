//! Child processes: commands with a deadline, echo-server processes and
//! processes that just hold sockets.
//!
//! A child inherits the network namespace of the thread that spawns it, so
//! spawn from the test thread.

use std::{
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    os::{
        fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd},
        unix::process::CommandExt,
    },
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{bins, client::Proto};

/// What a finished command printed and how it exited.
#[derive(Debug)]
pub struct Finished {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

fn drain(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Runs `cmd` with piped output and panics if it is still running after
/// `timeout` (after killing it): a hung command is a failure, not a wait.
#[track_caller]
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Finished {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let out = drain(child.stdout.take().expect("piped"));
    let err = drain(child.stderr.take().expect("piped"));
    let status = wait_timeout(&mut child, timeout);
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        let (stdout, stderr) = (
            out.join().unwrap_or_default(),
            err.join().unwrap_or_default(),
        );
        panic!(
            "{cmd:?} still running after {timeout:?}; killed it.\nstdout:\n{stdout}\nstderr:\n{stderr}"
        );
    };
    Finished {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// Waits for `child` to exit, at most `timeout`; `None` if it did not.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() >= deadline => return None,
            Ok(None) => thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("waiting for pid {}: {e}", child.id()),
        }
    }
}

/// Arranges for `fds` to be descriptors 3, 4, ... of the child `cmd`
/// spawns, as systemd passes sockets. Returns duplicates that must stay
/// alive until the child is spawned.
///
/// The descriptors are first duplicated above the target range, so moving
/// one into place can never overwrite another that is still to be moved.
/// The duplicates share the open file description with the originals, just
/// as systemd's copies do.
pub fn pass_fds(cmd: &mut Command, fds: &[BorrowedFd<'_>]) -> Vec<OwnedFd> {
    let floor = 3 + fds.len() as RawFd;
    let high: Vec<OwnedFd> = fds
        .iter()
        .map(|fd| {
            fd.try_clone_to_owned()
                .and_then(|dup| {
                    // SAFETY: fcntl on a valid descriptor; on success the new
                    // descriptor is ours.
                    let n = unsafe { libc::fcntl(dup.as_raw_fd(), libc::F_DUPFD_CLOEXEC, floor) };
                    if n < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // SAFETY: `n` is a fresh descriptor nobody else owns.
                    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(n) })
                })
                .unwrap_or_else(|e| panic!("duplicating fd {}: {e}", fd.as_raw_fd()))
        })
        .collect();
    let raw: Vec<RawFd> = high.iter().map(AsRawFd::as_raw_fd).collect();
    // SAFETY: the closure only calls dup2, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            for (i, &fd) in raw.iter().enumerate() {
                if libc::dup2(fd, 3 + i as RawFd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    high
}

/// A child process killed (SIGKILL) and reaped on drop, so a failing test
/// leaves nothing running.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    exited: bool,
}

impl ChildGuard {
    /// Takes charge of `child`.
    pub fn adopt(child: Child) -> ChildGuard {
        ChildGuard {
            child,
            exited: false,
        }
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its piped stdout, once.
    pub fn stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// Its piped stderr, once.
    pub fn stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.stderr.take()
    }

    /// Waits at most `timeout` for it to exit.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let status = wait_timeout(&mut self.child, timeout);
        self.exited |= status.is_some();
        status
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if !self.exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A process that does nothing but keep sockets open at fds 3, 4, ...
/// (`sleep`), the target for `lookupctl register-pid`. Killed on drop.
#[derive(Debug)]
pub struct Holder {
    child: Child,
}

impl Holder {
    /// Spawns the holder with `fds` from the calling thread (so in its
    /// network namespace).
    #[track_caller]
    pub fn spawn(fds: &[BorrowedFd<'_>]) -> Holder {
        let mut cmd = Command::new("sleep");
        cmd.arg("3600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let keep = pass_fds(&mut cmd, fds);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning socket holder: {e}"));
        drop(keep);
        Holder { child }
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Options for an `echo-server` process.
#[derive(Debug, Default)]
pub struct EchoSpec {
    tcp: Vec<SocketAddr>,
    udp: Vec<SocketAddr>,
    dual_stack: bool,
    pidfile: Option<PathBuf>,
}

impl EchoSpec {
    /// A TCP listener on `addr` (port 0 picks one).
    #[track_caller]
    pub fn tcp(mut self, addr: &str) -> Self {
        self.tcp.push(crate::sa(addr));
        self
    }

    /// A UDP socket on `addr` (port 0 picks one).
    #[track_caller]
    pub fn udp(mut self, addr: &str) -> Self {
        self.udp.push(crate::sa(addr));
        self
    }

    /// IPv6 sockets accept IPv4 too (`IPV6_V6ONLY=0`).
    pub fn dual_stack(mut self) -> Self {
        self.dual_stack = true;
        self
    }

    /// Writes the server's pid to `path`.
    pub fn pidfile(mut self, path: PathBuf) -> Self {
        self.pidfile = Some(path);
        self
    }
}

/// An `echo-server` process, killed on drop; its stderr is shown if the test
/// fails.
#[derive(Debug)]
pub struct EchoProcess {
    name: String,
    child: Option<Child>,
    pid: u32,
    bound: Vec<(Proto, SocketAddr)>,
    stderr: Arc<Mutex<String>>,
}

impl EchoProcess {
    /// Starts `echo-server --name NAME ...` from the calling thread and waits
    /// (at most 10 s) until it has bound every socket.
    #[track_caller]
    pub fn spawn(name: &str, spec: EchoSpec) -> EchoProcess {
        let mut cmd = Command::new(bins::binary(bins::ECHO_SERVER));
        cmd.arg("--name").arg(name);
        for a in &spec.tcp {
            cmd.arg("--tcp").arg(a.to_string());
        }
        for a in &spec.udp {
            cmd.arg("--udp").arg(a.to_string());
        }
        if spec.dual_stack {
            cmd.arg("--dual-stack");
        }
        if let Some(p) = &spec.pidfile {
            cmd.arg("--pidfile").arg(p);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        let pid = child.id();
        let stderr = Arc::new(Mutex::new(String::new()));
        {
            let pipe = child.stderr.take().expect("piped");
            let stderr = stderr.clone();
            thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut s = stderr.lock().unwrap_or_else(|p| p.into_inner());
                    s.push_str(&line);
                    s.push('\n');
                }
            });
        }
        let want = spec.tcp.len() + spec.udp.len();
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped");
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut proc = EchoProcess {
            name: name.to_owned(),
            child: Some(child),
            pid,
            bound: Vec::new(),
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while proc.bound.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).unwrap_or_else(|e| {
                panic!(
                    "echo-server {name}: {} of {want} sockets ready ({e}); stderr:\n{}",
                    proc.bound.len(),
                    proc.stderr()
                )
            });
            proc.bound.push(
                parse_ready(&line)
                    .unwrap_or_else(|| panic!("echo-server {name}: unexpected line {line:?}")),
            );
        }
        proc
    }

    /// The name it answers with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Every bound socket, in the order asked for (TCP first).
    pub fn bound(&self) -> &[(Proto, SocketAddr)] {
        &self.bound
    }

    /// The address of the first socket of `proto`.
    #[track_caller]
    pub fn addr(&self, proto: Proto) -> SocketAddr {
        self.bound
            .iter()
            .find(|(p, _)| *p == proto)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("echo-server {} has no {proto} socket", self.name))
    }

    /// What it printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `kill -9` and reap it: every socket it held is closed once this
    /// returns.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            let err = self.stderr();
            if !err.is_empty() {
                eprintln!("--- echo-server {} stderr ---\n{err}", self.name);
            }
        }
    }
}

/// Parses `READY <tcp|udp> <addr>`.
pub fn parse_ready(line: &str) -> Option<(Proto, SocketAddr)> {
    let mut it = line.split_whitespace();
    if it.next()? != "READY" {
        return None;
    }
    let proto = match it.next()? {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        _ => return None,
    };
    let addr = it.next()?.parse().ok()?;
    Some((proto, addr))
}
