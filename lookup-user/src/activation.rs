//! Where `lookupctl` gets the sockets it registers: from systemd socket
//! activation, or copied out of a running process.
//!
//! Neither source validates the kind of socket beyond what it needs to pick
//! one: the agent does that with [`crate::socket::inspect`], so every way in
//! gives the same messages.

use std::{
    collections::HashSet,
    fs,
    io::{self, Read as _},
    net::{IpAddr, SocketAddr},
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
        unix::ffi::OsStrExt as _,
    },
    path::PathBuf,
};

use libc::c_int;
use nix::fcntl::{FcntlArg, FdFlag, fcntl};

use crate::{binding::Protocol, socket};

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;
/// Bytes of a pidfile read at most: a pid is a handful of digits.
const PIDFILE_MAX: u64 = 4096;

/// A socket to register and a name for it in messages.
#[derive(Debug)]
pub struct PassedSocket {
    /// The socket; this process owns this descriptor, which is close-on-exec.
    pub fd: OwnedFd,
    /// Where it came from, for example `fd 3 (web.socket)` or
    /// `fd 7 of pid 1234`.
    pub name: String,
}

/// Why no sockets could be taken.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// `LISTEN_PID` is not set.
    #[error("LISTEN_PID is not set: no sockets were passed by systemd socket activation")]
    NotActivated,
    /// `LISTEN_PID` is not a pid.
    #[error("invalid LISTEN_PID {value:?}: expected a process id")]
    InvalidListenPid {
        /// The value found.
        value: String,
    },
    /// `LISTEN_PID` names another process.
    #[error(
        "LISTEN_PID={listen_pid} but this process is {pid}: the sockets were passed to another process"
    )]
    OtherProcess {
        /// The value of `LISTEN_PID`.
        listen_pid: u32,
        /// This process.
        pid: u32,
    },
    /// `LISTEN_PID` is set but `LISTEN_FDS` is not.
    #[error("LISTEN_FDS is not set although LISTEN_PID is: expected the number of passed sockets")]
    NoListenFds,
    /// `LISTEN_FDS` is not a positive count.
    #[error("invalid LISTEN_FDS {value:?}: expected the number of passed sockets, at least 1")]
    InvalidListenFds {
        /// The value found.
        value: String,
    },
    /// `LISTEN_FDNAMES` has a different number of names than there are fds.
    #[error("LISTEN_FDNAMES has {names} names but LISTEN_FDS={fds}: expected one name per socket")]
    NameCount {
        /// How many names.
        names: usize,
        /// How many descriptors.
        fds: usize,
    },
    /// A descriptor `LISTEN_FDS` promises is not open.
    #[error("LISTEN_FDS={count} but fd {fd} is not open")]
    NotOpen {
        /// The missing descriptor.
        fd: RawFd,
        /// The value of `LISTEN_FDS`.
        count: usize,
    },
    /// The environment cannot be changed safely once threads run.
    #[error(
        "cannot take systemd sockets in a process running {threads} threads: take them before starting threads"
    )]
    Threaded {
        /// Threads in this process.
        threads: usize,
    },
    /// The target is neither a pid nor a path.
    #[error("invalid process {target:?}: expected a pid or the path of a pidfile")]
    InvalidTarget {
        /// What was given.
        target: String,
    },
    /// The pidfile does not exist.
    #[error("pidfile {} does not exist", path.display())]
    PidfileMissing {
        /// Its path.
        path: PathBuf,
    },
    /// The pidfile exists but cannot be read.
    #[error("cannot read pidfile {}", path.display())]
    PidfileUnreadable {
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The pidfile does not hold a pid.
    #[error("pidfile {} holds {contents:?}, not a process id", path.display())]
    PidfileContents {
        /// Its path.
        path: PathBuf,
        /// The start of what it holds.
        contents: String,
    },
    /// No such process (or it exited while its sockets were searched).
    #[error("no process with pid {pid}")]
    NoProcess {
        /// The pid.
        pid: u32,
    },
    /// The pid is a thread other than its process's main thread.
    #[error("pid {pid} is a thread, not a process: give the pid of its process")]
    NotAProcess {
        /// The pid.
        pid: u32,
    },
    /// Not allowed to look at or copy the process's descriptors.
    #[error(
        "permission denied taking sockets from process {pid}: run as root, or as its user where ptrace is allowed"
    )]
    PermissionDenied {
        /// The pid.
        pid: u32,
    },
    /// The process has no socket that fits.
    #[error("no {} {protocol} socket bound to {addr} in process {pid}", state(*protocol))]
    NotFound {
        /// TCP or UDP.
        protocol: Protocol,
        /// The address asked for.
        addr: SocketAddr,
        /// The pid.
        pid: u32,
    },
    /// A system call failed.
    #[error("{call} failed")]
    Io {
        /// The call, for example `pidfd_getfd`.
        call: &'static str,
        /// The error it returned.
        #[source]
        source: io::Error,
    },
}

fn state(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "listening",
        Protocol::Udp => "unconnected",
    }
}

fn io_err(call: &'static str) -> impl FnOnce(io::Error) -> ActivationError {
    move |source| ActivationError::Io { call, source }
}

/// Takes the sockets systemd passed this process (`LISTEN_PID`,
/// `LISTEN_FDS`, `LISTEN_FDNAMES`), sets them close-on-exec, and removes
/// the three variables from the environment.
///
/// Call it before starting any thread: changing the environment is only
/// sound while this is the only thread, so it fails otherwise.
pub fn from_systemd() -> Result<Vec<PassedSocket>, ActivationError> {
    const VARS: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];
    let [pid, fds, names] = VARS.map(|v| {
        std::env::var_os(v).map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
    });
    let passed = parse_listen_env(
        pid.as_deref(),
        fds.as_deref(),
        names.as_deref(),
        std::process::id(),
    )?;
    for &(fd, _) in &passed {
        if let Err(nix::errno::Errno::EBADF) = fcntl(fd, FcntlArg::F_GETFD) {
            return Err(ActivationError::NotOpen {
                fd,
                count: passed.len(),
            });
        }
    }
    let threads = fs::read_dir("/proc/self/task")
        .map_err(io_err("listing /proc/self/task"))?
        .count();
    if threads != 1 {
        return Err(ActivationError::Threaded { threads });
    }
    let mut sockets = Vec::with_capacity(passed.len());
    for (fd, name) in passed {
        // SAFETY: systemd handed these descriptors to this process (LISTEN_PID
        // is ours), they are open, and nothing else in the process claims
        // them: this is the one place that reads LISTEN_FDS, and it removes
        // the variables below so a second call finds nothing.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
            .map_err(|e| io_err("fcntl(F_SETFD, FD_CLOEXEC)")(e.into()))?;
        sockets.push(PassedSocket { fd, name });
    }
    for var in VARS {
        // SAFETY: this process has a single thread (checked above), so no
        // other thread can read the environment concurrently.
        unsafe { std::env::remove_var(var) };
    }
    Ok(sockets)
}

/// Parses the socket activation variables for process `my_pid`: the
/// descriptors passed and a name for each, `fd 3 (web.socket)`, or `fd 3`
/// where the name is missing or empty.
pub fn parse_listen_env(
    pid: Option<&str>,
    fds: Option<&str>,
    names: Option<&str>,
    my_pid: u32,
) -> Result<Vec<(RawFd, String)>, ActivationError> {
    let pid = pid.ok_or(ActivationError::NotActivated)?;
    let listen_pid = parse_decimal::<u32>(pid)
        .filter(|&p| p != 0)
        .ok_or_else(|| ActivationError::InvalidListenPid {
            value: pid.to_owned(),
        })?;
    if listen_pid != my_pid {
        return Err(ActivationError::OtherProcess {
            listen_pid,
            pid: my_pid,
        });
    }
    let fds = fds.ok_or(ActivationError::NoListenFds)?;
    let count = parse_decimal::<RawFd>(fds)
        .filter(|&n| n >= 1 && n.checked_add(LISTEN_FDS_START).is_some())
        .ok_or_else(|| ActivationError::InvalidListenFds {
            value: fds.to_owned(),
        })?;
    let names: Vec<&str> = match names {
        Some(names) => names.split(':').collect(),
        None => vec![""; count as usize],
    };
    if names.len() != count as usize {
        return Err(ActivationError::NameCount {
            names: names.len(),
            fds: count as usize,
        });
    }
    Ok((LISTEN_FDS_START..)
        .zip(names)
        .map(|(fd, name)| {
            let label = if name.is_empty() {
                format!("fd {fd}")
            } else {
                format!("fd {fd} ({name})")
            };
            (fd, label)
        })
        .collect())
}

/// Digits only: `str::parse` also takes a leading `+`.
fn parse_decimal<T: std::str::FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Copies the sockets of process `target` that are bound to exactly
/// `ip:port` and can take traffic: listening for TCP, unconnected for UDP.
/// An IPv4 `ip` matches only IPv4 sockets.
///
/// `target` is a pid, or else the path of a pidfile holding one (write
/// `./1234` for a pidfile named `1234`). The copies share the target's
/// sockets, whose flags are left as they are; they are close-on-exec in
/// this process.
pub fn from_process(
    target: &str,
    protocol: Protocol,
    ip: IpAddr,
    port: u16,
) -> Result<Vec<PassedSocket>, ActivationError> {
    let pid = resolve_target(target)?;
    let want = SocketAddr::new(ip, port);
    let pidfd = pidfd_open(pid)?;
    let dir = format!("/proc/{pid}/fd");
    let entries = fs::read_dir(&dir).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ActivationError::NoProcess { pid },
        io::ErrorKind::PermissionDenied => ActivationError::PermissionDenied { pid },
        _ => ActivationError::Io {
            call: "reading /proc/<pid>/fd",
            source: e,
        },
    })?;
    let mut seen = HashSet::new();
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("reading /proc/<pid>/fd"))?;
        let Some(fd) = entry.file_name().to_str().and_then(parse_decimal::<RawFd>) else {
            continue;
        };
        let link = match fs::read_link(entry.path()) {
            Ok(link) => link,
            // Closed since the directory was read.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(ActivationError::PermissionDenied { pid });
            }
            Err(e) => return Err(io_err("readlink /proc/<pid>/fd/<fd>")(e)),
        };
        // One socket may sit behind several descriptors; copy it once.
        let Some(inode) = socket_inode(link.as_os_str().as_bytes()) else {
            continue;
        };
        if !seen.insert(inode) {
            continue;
        }
        let Some(copy) = pidfd_getfd(pidfd.as_fd(), fd, pid)? else {
            continue;
        };
        if matches(copy.as_fd(), protocol, want)? {
            found.push(PassedSocket {
                fd: copy,
                name: format!("fd {fd} of pid {pid}"),
            });
        }
    }
    if found.is_empty() {
        return Err(ActivationError::NotFound {
            protocol,
            addr: want,
            pid,
        });
    }
    Ok(found)
}

fn resolve_target(target: &str) -> Result<u32, ActivationError> {
    let valid_pid = |s: &str| parse_decimal::<i32>(s).filter(|&p| p > 0).map(|p| p as u32);
    if target.bytes().all(|b| b.is_ascii_digit()) {
        return valid_pid(target).ok_or_else(|| ActivationError::InvalidTarget {
            target: target.to_owned(),
        });
    }
    let path = PathBuf::from(target);
    let mut contents = Vec::new();
    fs::File::open(&path)
        .and_then(|f| f.take(PIDFILE_MAX).read_to_end(&mut contents))
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => ActivationError::PidfileMissing { path: path.clone() },
            _ => ActivationError::PidfileUnreadable {
                path: path.clone(),
                source,
            },
        })?;
    let text = String::from_utf8_lossy(&contents);
    valid_pid(text.trim()).ok_or_else(|| {
        let mut shown: String = text.chars().take(32).collect();
        if shown.len() < text.len() {
            shown.push('…');
        }
        ActivationError::PidfileContents {
            path,
            contents: shown,
        }
    })
}

/// The inode of a `/proc/<pid>/fd` link to a socket, `socket:[12345]`.
fn socket_inode(link: &[u8]) -> Option<u64> {
    let inode = link.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    parse_decimal(std::str::from_utf8(inode).ok()?)
}

fn pidfd_open(pid: u32) -> Result<OwnedFd, ActivationError> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0 as libc::c_uint) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ESRCH) => ActivationError::NoProcess { pid },
            // Linux 6.9 and later say ENOENT for a thread, earlier EINVAL.
            Some(libc::ENOENT | libc::EINVAL) => ActivationError::NotAProcess { pid },
            _ => ActivationError::Io {
                call: "pidfd_open",
                source: e,
            },
        });
    }
    // SAFETY: the kernel returned a new descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}

/// Copies descriptor `fd` of the process behind `pidfd`; `None` if the
/// process closed it in the meantime.
fn pidfd_getfd(
    pidfd: BorrowedFd<'_>,
    fd: RawFd,
    pid: u32,
) -> Result<Option<OwnedFd>, ActivationError> {
    // SAFETY: pidfd_getfd(2) takes two descriptors and flags and returns a
    // new close-on-exec descriptor.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_getfd,
            pidfd.as_raw_fd(),
            fd,
            0 as libc::c_uint,
        )
    };
    if ret < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EBADF) => Ok(None),
            Some(libc::ESRCH) => Err(ActivationError::NoProcess { pid }),
            Some(libc::EPERM) => Err(ActivationError::PermissionDenied { pid }),
            _ => Err(ActivationError::Io {
                call: "pidfd_getfd",
                source: e,
            }),
        };
    }
    // SAFETY: the kernel returned a new descriptor that we now own.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(ret as RawFd) }))
}

/// Whether a copied socket is the one asked for. Only reads options.
fn matches(
    fd: BorrowedFd<'_>,
    protocol: Protocol,
    want: SocketAddr,
) -> Result<bool, ActivationError> {
    let domain = socket::int_opt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)
        .map_err(io_err("getsockopt(SO_DOMAIN)"))?;
    let family = match want {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    if domain != family {
        return Ok(false);
    }
    let proto = socket::int_opt(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL)
        .map_err(io_err("getsockopt(SO_PROTOCOL)"))?;
    if proto != c_int::from(protocol.number()) {
        return Ok(false);
    }
    match socket::local_addr(fd).map_err(io_err("getsockname"))? {
        // Scope and flow label do not matter, the address and port do.
        Some(local) if local.ip() == want.ip() && local.port() == want.port() => {}
        _ => return Ok(false),
    }
    match protocol {
        Protocol::Tcp => socket::is_listening(fd).map_err(io_err("getsockopt(SO_ACCEPTCONN)")),
        Protocol::Udp => Ok(socket::peer_addr(fd)
            .map_err(io_err("getpeername"))?
            .is_none()),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, TcpListener, UdpSocket},
        os::fd::AsFd,
        sync::atomic::{AtomicU32, Ordering},
    };

    use nix::fcntl::OFlag;

    use super::*;

    fn cookie(fd: BorrowedFd<'_>) -> u64 {
        socket::inspect(fd).expect("inspect").cookie
    }

    fn me() -> String {
        std::process::id().to_string()
    }

    const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    /// A path in the temporary directory unique to this test process.
    fn temp_path(what: &str) -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        std::env::temp_dir().join(format!(
            "lookup-activation-{}-{}-{what}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    }

    #[test]
    fn listen_env_is_parsed() {
        let me = 4242;
        let ok = |fds, names| parse_listen_env(Some("4242"), Some(fds), names, me).unwrap();
        assert_eq!(ok("1", None), vec![(3, "fd 3".to_owned())]);
        assert_eq!(
            ok("2", Some("web.socket:dns")),
            vec![
                (3, "fd 3 (web.socket)".to_owned()),
                (4, "fd 4 (dns)".to_owned())
            ]
        );
        assert_eq!(
            ok("3", Some("a::c")),
            vec![
                (3, "fd 3 (a)".to_owned()),
                (4, "fd 4".to_owned()),
                (5, "fd 5 (c)".to_owned())
            ]
        );
        assert_eq!(ok("1", Some("")), vec![(3, "fd 3".to_owned())]);
    }

    #[test]
    fn listen_env_errors_name_the_values() {
        /// LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES.
        type Env = (
            Option<&'static str>,
            Option<&'static str>,
            Option<&'static str>,
        );
        let cases: &[(Env, &str)] = &[
            (
                (None, Some("1"), None),
                "LISTEN_PID is not set: no sockets were passed",
            ),
            (
                (Some("abc"), Some("1"), None),
                "invalid LISTEN_PID \"abc\": expected a process id",
            ),
            (
                (Some("+4242"), Some("1"), None),
                "invalid LISTEN_PID \"+4242\"",
            ),
            ((Some("0"), Some("1"), None), "invalid LISTEN_PID \"0\""),
            (
                (Some("17"), Some("1"), None),
                "LISTEN_PID=17 but this process is 4242: the sockets were passed to another process",
            ),
            (
                (Some("4242"), None, None),
                "LISTEN_FDS is not set although LISTEN_PID is",
            ),
            (
                (Some("4242"), Some("0"), None),
                "invalid LISTEN_FDS \"0\": expected the number",
            ),
            (
                (Some("4242"), Some("-1"), None),
                "invalid LISTEN_FDS \"-1\"",
            ),
            ((Some("4242"), Some(""), None), "invalid LISTEN_FDS \"\""),
            (
                (Some("4242"), Some("2147483647"), None),
                "invalid LISTEN_FDS \"2147483647\"",
            ),
            (
                (Some("4242"), Some("2"), Some("web.socket")),
                "LISTEN_FDNAMES has 1 names but LISTEN_FDS=2: expected one name per socket",
            ),
            (
                (Some("4242"), Some("1"), Some("a:b")),
                "LISTEN_FDNAMES has 2 names but LISTEN_FDS=1",
            ),
        ];
        for &((pid, fds, names), want) in cases {
            let got = parse_listen_env(pid, fds, names, 4242)
                .unwrap_err()
                .to_string();
            assert!(got.starts_with(want), "{pid:?} {fds:?} {names:?}: {got}");
        }
    }

    #[test]
    fn from_process_finds_own_listener_by_port() {
        let wanted = TcpListener::bind("127.0.0.1:0").unwrap();
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        wanted.set_nonblocking(true).unwrap();
        let port = wanted.local_addr().unwrap().port();

        let found = from_process(&me(), Protocol::Tcp, LOCALHOST, port).expect("own listener");
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(cookie(found[0].fd.as_fd()), cookie(wanted.as_fd()));
        assert_ne!(cookie(found[0].fd.as_fd()), cookie(other.as_fd()));
        assert_eq!(
            found[0].name,
            format!("fd {} of pid {}", wanted.as_raw_fd(), me())
        );
        // The copy is close-on-exec; the shared file status is untouched.
        let fd_flags = fcntl(found[0].fd.as_raw_fd(), FcntlArg::F_GETFD).unwrap();
        assert!(FdFlag::from_bits_retain(fd_flags).contains(FdFlag::FD_CLOEXEC));
        let fl = fcntl(wanted.as_raw_fd(), FcntlArg::F_GETFL).unwrap();
        assert!(OFlag::from_bits_retain(fl).contains(OFlag::O_NONBLOCK));

        // Same port, but the wrong protocol or family.
        let err = from_process(&me(), Protocol::Udp, LOCALHOST, port).unwrap_err();
        assert!(matches!(err, ActivationError::NotFound { .. }), "{err:?}");

        let err = from_process(&me(), Protocol::Tcp, IpAddr::from([127, 0, 0, 2]), port)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "no listening tcp socket bound to 127.0.0.2:{port} in process {}",
                me()
            )
        );
    }

    #[test]
    fn from_process_takes_only_unconnected_udp() {
        let open = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = open.local_addr().unwrap();
        let found = from_process(&me(), Protocol::Udp, addr.ip(), addr.port()).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(cookie(found[0].fd.as_fd()), cookie(open.as_fd()));

        let connected = UdpSocket::bind("127.0.0.1:0").unwrap();
        connected.connect(addr).unwrap();
        let caddr = connected.local_addr().unwrap();
        let err = from_process(&me(), Protocol::Udp, caddr.ip(), caddr.port())
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "no unconnected udp socket bound to {caddr} in process {}",
                me()
            )
        );
    }

    #[test]
    fn from_process_reads_pidfiles() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let pidfile = temp_path("pid");
        fs::write(&pidfile, format!("  {}\n", me())).unwrap();
        let found = from_process(pidfile.to_str().unwrap(), Protocol::Tcp, LOCALHOST, port);
        fs::remove_file(&pidfile).unwrap();
        assert_eq!(
            cookie(found.unwrap()[0].fd.as_fd()),
            cookie(listener.as_fd())
        );

        let garbage = temp_path("garbage");
        fs::write(&garbage, "nginx\n").unwrap();
        let err = from_process(garbage.to_str().unwrap(), Protocol::Tcp, LOCALHOST, port)
            .unwrap_err()
            .to_string();
        fs::remove_file(&garbage).unwrap();
        assert_eq!(
            err,
            format!(
                "pidfile {} holds \"nginx\\n\", not a process id",
                garbage.display()
            )
        );
    }

    #[test]
    fn from_process_reports_missing_targets() {
        let err = from_process("999999999", Protocol::Tcp, LOCALHOST, 80).unwrap_err();
        assert!(
            matches!(err, ActivationError::NoProcess { pid: 999999999 }),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "no process with pid 999999999");

        let missing = temp_path("missing.pid");
        let err = from_process(missing.to_str().unwrap(), Protocol::Tcp, LOCALHOST, 80)
            .unwrap_err()
            .to_string();
        assert_eq!(err, format!("pidfile {} does not exist", missing.display()));

        for bad in ["0", "", "99999999999"] {
            let err = from_process(bad, Protocol::Tcp, LOCALHOST, 80)
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(&format!("invalid process {bad:?}")),
                "{err}"
            );
        }

        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            // SAFETY: gettid(2) has no preconditions.
            tx.send(unsafe { libc::gettid() }).unwrap();
            done_rx.recv().ok();
        });
        let tid = rx.recv().unwrap();
        let err = from_process(&tid.to_string(), Protocol::Tcp, LOCALHOST, 80)
            .unwrap_err()
            .to_string();
        drop(done_tx);
        thread.join().unwrap();
        assert_eq!(
            err,
            format!("pid {tid} is a thread, not a process: give the pid of its process")
        );

        let dir = std::env::temp_dir();
        let err = from_process(dir.to_str().unwrap(), Protocol::Tcp, LOCALHOST, 80).unwrap_err();
        assert!(
            matches!(err, ActivationError::PidfileUnreadable { .. }),
            "{err:?}"
        );
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn from_process_reports_permission_denied() {
        use std::os::unix::fs::MetadataExt as _;
        let owner = fs::metadata("/proc/1").unwrap().uid();
        let me = nix::unistd::geteuid();
        if me.is_root() || owner == me.as_raw() {
            eprintln!("pid 1 is ours to read: nothing to deny");
            return;
        }
        let err = from_process("1", Protocol::Tcp, LOCALHOST, 80).unwrap_err();
        assert!(
            matches!(err, ActivationError::PermissionDenied { pid: 1 }),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .starts_with("permission denied taking sockets from process 1:")
        );
    }

    #[test]
    fn socket_links_are_recognised() {
        assert_eq!(socket_inode(b"socket:[12345]"), Some(12345));
        assert_eq!(socket_inode(b"pipe:[12345]"), None);
        assert_eq!(socket_inode(b"/tmp/socket:[1]"), None);
        assert_eq!(socket_inode(b"socket:[]"), None);
    }
}
