//! Both ways of handing a socket to the agent, what they accept and refuse,
//! and what they must leave untouched.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    os::{
        fd::{AsFd, OwnedFd},
        unix::net::UnixListener,
    },
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use lookup_tests::{
    CtlOutput, EchoProcess, Holder, Lab, Proto, TcpEcho, TempDir, UdpEcho,
    agent::{destination, expect_destination},
    assert_answers, assert_refused, bins,
    client::dial,
    netns::in_other_netns,
    process::{ChildGuard, EchoSpec},
    require_root, sa, sock,
};
use serde_json::Value;

#[test]
fn register_takes_systemd_sockets_for_every_family_and_protocol() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(&["192.0.2.0/24", "2001:db8::/32"]);
    let tcp4 = TcpEcho::new("web", "127.0.0.1:0");
    let udp4 = UdpEcho::new("web", "127.0.0.1:0");
    let tcp6 = TcpEcho::new("web", "[::1]:0");
    let udp6 = UdpEcho::new("web", "[::1]:0");
    lab.register_fds(
        "web",
        &[tcp4.fd(), udp4.fd(), tcp6.fd(), udp6.fd()],
        Some(&["tcp4", "udp4", "tcp6", "udp6"]),
    )
    .ok();
    for proto in Proto::ALL {
        lab.bind("web", proto, "192.0.2.0/24", 0);
        lab.bind("web", proto, "2001:db8::/32", 0);
    }
    for proto in Proto::ALL {
        assert_answers(proto, "192.0.2.1:80", "web");
        assert_answers(proto, "[2001:db8::1]:80", "web");
    }
    let status = lab.status_json();
    for family in ["ipv4", "ipv6"] {
        for proto in Proto::ALL {
            let d = expect_destination(&status, "web", family, proto);
            assert!(d["socket_cookie"].is_u64(), "no socket after register: {d}");
        }
    }
}

#[test]
fn register_without_listen_fds_fails() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(&[]);
    let before = lab.status_json();
    lab.ctl_err(&["register", "web"]).stderr_mentions(&[
        "LISTEN_FDS",
        "systemd",
        "socket activation",
    ]);
    // LISTEN_PID naming another process: the sockets are not ours to take.
    let tcp = TcpEcho::new("web", "127.0.0.1:0");
    let mut cmd = lab.ctl_command();
    cmd.args(["register", "web"])
        .env("LISTEN_FDS", "1")
        .env("LISTEN_PID", "1");
    let keep = lookup_tests::process::pass_fds(&mut cmd, &[tcp.fd()]);
    let out = lookup_tests::process::run_with_timeout(&mut cmd, Duration::from_secs(20));
    drop(keep);
    assert!(
        !out.status.success(),
        "register took sockets meant for pid 1 (LISTEN_PID=1):\nstdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    assert_eq!(
        lab.status_json(),
        before,
        "a failed register changed the status"
    );
}

#[test]
fn register_replaces_the_socket_atomically() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(&["192.0.2.0/24"]);
    let old_tcp = TcpEcho::new("old", "127.0.0.1:0");
    let old_udp = UdpEcho::new("old", "127.0.0.1:0");
    lab.register_fds("web", &[old_tcp.fd(), old_udp.fd()], None)
        .ok();
    for proto in Proto::ALL {
        lab.bind("web", proto, "192.0.2.0/24", 0);
        assert_answers(proto, "192.0.2.1:80", "old");
    }
    let cookie = |lab: &Lab, proto| {
        expect_destination(&lab.status_json(), "web", "ipv4", proto)["socket_cookie"].clone()
    };
    let old_cookies = Proto::ALL.map(|p| cookie(&lab, p));

    // Keep dialling through the swap: every attempt must be answered, first
    // by the old server, then by the new one, never refused in between.
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Vec<Arc<AtomicUsize>> = Proto::ALL.iter().map(|_| Arc::default()).collect();
    let dialers: Vec<_> = Proto::ALL
        .into_iter()
        .zip(&counts)
        .map(|(proto, count)| {
            let (stop, count) = (stop.clone(), count.clone());
            // Spawned from the test thread, so in the test's netns.
            std::thread::spawn(move || {
                let mut seen: Vec<Result<String, String>> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let r = dial(proto, sa("192.0.2.1:80")).map_err(|e| e.to_string());
                    if seen.last() != Some(&r) {
                        seen.push(r);
                    }
                    count.fetch_add(1, Ordering::Relaxed);
                }
                seen
            })
        })
        .collect();
    // Enough dials on each side of the swap, however the threads are
    // scheduled.
    let wait_for_dials = |floor: &[usize]| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while counts
            .iter()
            .zip(floor)
            .any(|(c, f)| c.load(Ordering::Relaxed) < f + 20)
        {
            assert!(std::time::Instant::now() < deadline, "dialers stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for_dials(&[0, 0]);
    let new_tcp = TcpEcho::new("new", "127.0.0.1:0");
    let new_udp = UdpEcho::new("new", "127.0.0.1:0");
    lab.register_fds("web", &[new_tcp.fd(), new_udp.fd()], None)
        .ok();
    let after: Vec<usize> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    wait_for_dials(&after);
    stop.store(true, Ordering::Relaxed);
    for (proto, d) in Proto::ALL.into_iter().zip(dialers) {
        let seen = d.join().expect("dialer thread");
        let want: Vec<Result<String, String>> = vec![Ok("old".into()), Ok("new".into())];
        assert_eq!(
            seen, want,
            "{proto}: answers during re-registration, in order (repeats folded)"
        );
    }
    // The old server is still listening but gets no new traffic.
    for proto in Proto::ALL {
        for _ in 0..5 {
            assert_answers(proto, "192.0.2.1:80", "new");
        }
        let now = cookie(&lab, proto);
        assert!(now.is_u64(), "{proto}: no socket after re-registration");
        let old = &old_cookies[Proto::ALL.iter().position(|p| *p == proto).expect("listed")];
        assert_ne!(&now, old, "{proto}: cookie unchanged after re-registration");
    }
}

#[test]
fn register_pid_by_pid_and_by_pidfile() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(&["192.0.2.0/24"]);
    let pidfile = lab.tmp.join("svc.pid");
    let svc = EchoProcess::spawn(
        "svc",
        EchoSpec::default()
            .tcp("127.0.0.1:0")
            .udp("127.0.0.1:0")
            .pidfile(pidfile.clone()),
    );
    let tcp = svc.addr(Proto::Tcp);
    let udp = svc.addr(Proto::Udp);
    lab.register_pid(
        &svc.pid().to_string(),
        "svc",
        Proto::Tcp,
        "127.0.0.1",
        tcp.port(),
    )
    .ok();
    lab.register_pid(
        pidfile.to_str().expect("utf-8 path"),
        "svc",
        Proto::Udp,
        "127.0.0.1",
        udp.port(),
    )
    .ok();
    for proto in Proto::ALL {
        lab.bind("svc", proto, "192.0.2.0/24", 0);
        assert_answers(proto, "192.0.2.9:1234", "svc");
    }

    // Errors that name the input and change nothing.
    let before = lab.status_json();
    let missing = lab.tmp.join("no-such.pid");
    let missing = missing.to_str().expect("utf-8 path");
    lab.register_pid(missing, "svc", Proto::Tcp, "127.0.0.1", tcp.port())
        .err()
        .stderr_mentions(&[missing]);
    let free_pid = free_pid();
    lab.register_pid(&free_pid, "svc", Proto::Tcp, "127.0.0.1", tcp.port())
        .err()
        .stderr_mentions(&[&free_pid]);
    // Right process, wrong port.
    let wrong = (tcp.port() ^ 1).max(1).to_string();
    lab.ctl_err(&[
        "register-pid",
        &svc.pid().to_string(),
        "svc",
        "tcp",
        "127.0.0.1",
        &wrong,
    ])
    .stderr_mentions(&[&wrong]);
    assert_eq!(
        lab.status_json(),
        before,
        "a failed register-pid changed the status"
    );
}

/// A pid that no process has: one that just exited.
fn free_pid() -> String {
    let mut c = Command::new("true").spawn().expect("spawn true");
    let pid = c.id();
    c.wait().expect("reap true");
    pid.to_string()
}

#[test]
fn registration_never_changes_file_status_flags() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(&["192.0.2.0/24"]);
    // One blocking and one non-blocking socket through each form.
    let tcp = TcpEcho::new("act", "127.0.0.1:0");
    let udp = UdpEcho::new("act", "127.0.0.1:0");
    sock::set_status_flags(udp.fd(), sock::status_flags(udp.fd()) | libc::O_NONBLOCK);
    let before = [sock::status_flags(tcp.fd()), sock::status_flags(udp.fd())];
    lab.register_fds("act", &[tcp.fd(), udp.fd()], None).ok();
    let after = [sock::status_flags(tcp.fd()), sock::status_flags(udp.fd())];
    assert_eq!(
        after,
        before,
        "register changed the file status flags [tcp, udp] (O_NONBLOCK = {:#o})",
        libc::O_NONBLOCK
    );

    let ptcp = sock::tcp_listener(sa("127.0.0.1:0")).expect("listener");
    let pudp = sock::udp_server(sa("127.0.0.1:0")).expect("udp socket");
    sock::set_status_flags(&ptcp, sock::status_flags(&ptcp) | libc::O_NONBLOCK);
    let holder = Holder::spawn(&[ptcp.as_fd(), pudp.as_fd()]);
    let before = [sock::status_flags(&ptcp), sock::status_flags(&pudp)];
    let pid = holder.pid().to_string();
    let (t, u) = (
        ptcp.local_addr().expect("addr"),
        pudp.local_addr().expect("addr"),
    );
    lab.register_pid(&pid, "pid", Proto::Tcp, "127.0.0.1", t.port())
        .ok();
    lab.register_pid(&pid, "pid", Proto::Udp, "127.0.0.1", u.port())
        .ok();
    let after = [sock::status_flags(&ptcp), sock::status_flags(&pudp)];
    assert_eq!(
        after,
        before,
        "register-pid changed the file status flags [tcp, udp] (O_NONBLOCK = {:#o})",
        libc::O_NONBLOCK
    );

    // And the registrations did take effect.
    for proto in Proto::ALL {
        lab.bind("act", proto, "192.0.2.1", 0);
        assert_answers(proto, "192.0.2.1:7", "act");
    }
}

/// A socket that must be refused, and words one of which the error must use.
struct Bad {
    what: &'static str,
    fd: OwnedFd,
    mentions: &'static [&'static str],
}

fn bad_sockets(tmp: &TempDir) -> Vec<Bad> {
    let mut v = vec![
        Bad {
            what: "TCP socket that is not listening",
            fd: sock::tcp_bound(sa("127.0.0.1:0")).expect("tcp socket"),
            mentions: &["listen"],
        },
        Bad {
            what: "connected UDP socket",
            fd: sock::udp_connected(sa("127.0.0.1:0"), sa("127.0.0.1:9")).expect("udp socket"),
            mentions: &["connected"],
        },
        Bad {
            what: "dual-stack TCP listener",
            fd: sock::dual_stack(libc::SOCK_STREAM, sa("[::]:0")).expect("dual-stack listener"),
            mentions: &["v6only", "v6_only", "dual"],
        },
        Bad {
            what: "dual-stack UDP socket",
            fd: sock::dual_stack(libc::SOCK_DGRAM, sa("[::]:0")).expect("dual-stack udp"),
            mentions: &["v6only", "v6_only", "dual"],
        },
        Bad {
            what: "unix stream listener",
            fd: OwnedFd::from(UnixListener::bind(tmp.join("bad.sock")).expect("unix listener")),
            mentions: &["unix", "family"],
        },
        Bad {
            what: "raw IP socket",
            fd: sock::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_UDP).expect("raw socket"),
            mentions: &["raw", "type", "protocol"],
        },
    ];
    match sock::socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_UDPLITE) {
        Ok(fd) => {
            sock::bind(&fd, sa("127.0.0.1:0")).expect("bind udplite");
            v.push(Bad {
                what: "UDP-Lite socket",
                fd,
                mentions: &["udplite", "udp-lite", "protocol", "136"],
            });
        }
        Err(e) => eprintln!("no UDP-Lite on this kernel ({e}); skipping that case"),
    }
    v
}

#[track_caller]
fn check_refused(lab: &Lab, what: &str, out: CtlOutput, mentions: &[&str], before: &Value) {
    assert!(!out.success(), "{what} was accepted:\n{out}");
    assert!(
        !out.stderr.trim().is_empty(),
        "{what}: failed without a message:\n{out}"
    );
    let low = out.stderr.to_lowercase();
    assert!(
        mentions.iter().any(|m| low.contains(m)),
        "{what}: the message should name the problem (one of {mentions:?}):\n{out}"
    );
    let after = lab.status_json();
    assert_eq!(
        &after, before,
        "{what}: a refused registration changed the status"
    );
}

#[test]
fn register_refuses_unusable_sockets() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(&[]);
    let before = lab.status_json();
    for bad in bad_sockets(&lab.tmp) {
        let out = lab.register_fds("bad", &[bad.fd.as_fd()], None);
        check_refused(&lab, bad.what, out, bad.mentions, &before);
    }

    // A socket of another network namespace: the data plane could select
    // it, but its connections would never complete.
    let foreign: OwnedFd = in_other_netns(&[], || {
        OwnedFd::from(sock::tcp_listener(sa("127.0.0.1:0")).expect("listener"))
    });
    let out = lab.register_fds("bad", &[foreign.as_fd()], None);
    check_refused(
        &lab,
        "listener from another netns",
        out,
        &["namespace", "netns"],
        &before,
    );

    // One bad socket spoils the whole request: the good one is not taken.
    let good = TcpEcho::new("good", "127.0.0.1:0");
    let bad = sock::udp_connected(sa("127.0.0.1:0"), sa("127.0.0.1:9")).expect("udp");
    let out = lab.register_fds("mixed", &[good.fd(), bad.as_fd()], None);
    check_refused(
        &lab,
        "good listener plus connected UDP",
        out,
        &["connected"],
        &before,
    );
    assert!(
        destination(&lab.status_json(), "mixed", "ipv4", Proto::Tcp)
            .is_none_or(|d| d["socket_cookie"].is_null()),
        "the good half of a refused register was registered"
    );
}

#[test]
fn register_pid_refuses_unusable_sockets() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(&[]);
    let before = lab.status_json();
    let cases: Vec<(&str, OwnedFd, Proto, &[&str])> = vec![
        (
            "TCP socket that is not listening",
            sock::tcp_bound(sa("127.0.0.1:0")).expect("tcp"),
            Proto::Tcp,
            &["listen"],
        ),
        (
            "connected UDP socket",
            sock::udp_connected(sa("127.0.0.1:0"), sa("127.0.0.1:9")).expect("udp"),
            Proto::Udp,
            &["connected"],
        ),
        (
            "dual-stack TCP listener",
            sock::dual_stack(libc::SOCK_STREAM, sa("[::]:0")).expect("dual-stack"),
            Proto::Tcp,
            &["v6only", "v6_only", "dual"],
        ),
        (
            "dual-stack UDP socket",
            sock::dual_stack(libc::SOCK_DGRAM, sa("[::]:0")).expect("dual-stack"),
            Proto::Udp,
            &["v6only", "v6_only", "dual"],
        ),
        (
            // Asking for UDP where only a TCP listener has the address.
            "wrong protocol (udp asked, tcp listener there)",
            OwnedFd::from(sock::tcp_listener(sa("127.0.0.1:0")).expect("listener")),
            Proto::Udp,
            &["udp"],
        ),
    ];
    for (what, fd, proto, mentions) in cases {
        let addr = sock::local_addr(&fd).expect("bound");
        let holder = Holder::spawn(&[fd.as_fd()]);
        let out = lab.register_pid(
            &holder.pid().to_string(),
            "bad",
            proto,
            &addr.ip().to_string(),
            addr.port(),
        );
        check_refused(&lab, what, out, mentions, &before);
    }

    // A process holding only a unix socket has nothing at any inet address.
    let unix = UnixListener::bind(lab.tmp.join("held.sock")).expect("unix listener");
    let holder = Holder::spawn(&[unix.as_fd()]);
    let out = lab.register_pid(
        &holder.pid().to_string(),
        "bad",
        Proto::Tcp,
        "127.0.0.1",
        4321,
    );
    check_refused(
        &lab,
        "process with only a unix socket",
        out,
        &["4321"],
        &before,
    );

    // A process in another network namespace.
    let (foreign, addr): (EchoProcess, SocketAddr) = in_other_netns(&[], || {
        let p = EchoProcess::spawn("foreign", EchoSpec::default().tcp("127.0.0.1:0"));
        let a = p.addr(Proto::Tcp);
        (p, a)
    });
    let out = lab.register_pid(
        &foreign.pid().to_string(),
        "bad",
        Proto::Tcp,
        "127.0.0.1",
        addr.port(),
    );
    check_refused(
        &lab,
        "process in another netns",
        out,
        &["namespace", "netns"],
        &before,
    );
}

#[test]
fn systemd_socket_activate_tcp() {
    socket_activate(Proto::Tcp);
}

#[test]
fn systemd_socket_activate_udp() {
    socket_activate(Proto::Udp);
}

/// Kills, on drop, the process whose pid is in a pidfile (if written).
struct KillPidfile(std::path::PathBuf);

impl KillPidfile {
    fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(&self.0).ok()?.trim().parse().ok()
    }
}

impl Drop for KillPidfile {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The real `systemd-socket-activate` passes a socket to `lookupctl
/// register`, while the service it activates keeps the socket open.
fn socket_activate(proto: Proto) {
    if !require_root() {
        return;
    }
    let Some(tool) = which("systemd-socket-activate") else {
        eprintln!("SKIPPED: systemd-socket-activate is not installed");
        return;
    };
    let lab = Lab::new(&["192.0.2.0/24"]);
    // systemd-socket-activate binds, waits until the socket is readable,
    // then execs its command in place, so LISTEN_PID names the shell. The
    // shell starts the service in the background (it inherits the socket
    // and keeps it) and then becomes `lookupctl register`, which exits once
    // the agent has the socket.
    let service = KillPidfile(lab.tmp.join("activated.pid"));
    let script = r#"
        "$1" --name activated --listen-fds --pidfile "$2" >/dev/null 2>&1 &
        exec "$3" --control "$4" register activated
    "#;
    let mut cmd = Command::new(tool);
    cmd.arg("--listen=127.0.0.1:7070").arg("--fdname=web");
    if proto == Proto::Udp {
        cmd.arg("--datagram");
    }
    cmd.arg("/bin/sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .arg(bins::binary(bins::ECHO_SERVER))
        .arg(&service.0)
        .arg(bins::binary(bins::LOOKUPCTL))
        .arg(lab.control())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn systemd-socket-activate");
    let mut child = ChildGuard::adopt(child);
    let mut err = BufReader::new(child.stderr().expect("piped"));
    let mut line = String::new();
    err.read_line(&mut line)
        .expect("read systemd-socket-activate stderr");
    assert!(
        line.contains("Listening on"),
        "unexpected first line: {line:?}"
    );

    // The trigger waits in the socket and is answered by the service once
    // it runs.
    assert_answers(proto, "127.0.0.1:7070", "activated");
    let status = child
        .wait(Duration::from_secs(20))
        .expect("lookupctl register (via systemd-socket-activate) did not exit");
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut err, &mut rest);
    let out = child.stdout().map_or_else(String::new, |mut o| {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut o, &mut s);
        s
    });
    assert!(
        status.success(),
        "register failed ({status}):\nstdout:\n{out}\nstderr:\n{line}{rest}"
    );

    lab.bind("activated", proto, "192.0.2.0/24", 443);
    assert_answers(proto, "192.0.2.1:443", "activated");
    let d = expect_destination(&lab.status_json(), "activated", "ipv4", proto).clone();
    assert!(d["socket_cookie"].is_u64(), "no socket registered: {d}");

    // Neither lookupctl nor the agent kept a copy: once the service is gone,
    // so is the socket.
    let pid = service.pid().expect("service pidfile");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the activated service");
    wait_gone(pid);
    assert_refused(proto, "192.0.2.1:443");
    assert_refused(proto, "127.0.0.1:7070");
}

/// Waits (bounded) until every thread of process `pid` has exited.
///
/// It was re-parented away from us, so we cannot reap it. A zombie leader is
/// not enough: the leader turns zombie while its other threads may still be
/// exiting, and the descriptors close only when the last thread is done.
/// Exited threads other than the leader vanish from `/proc/<pid>/task`.
fn wait_gone(pid: i32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let state = |path: &str| {
        std::fs::read_to_string(path).ok().and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.trim_start().chars().next())
        })
    };
    loop {
        let live: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|dir| {
                dir.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|tid| {
                        !matches!(
                            state(&format!("/proc/{pid}/task/{tid}/stat")),
                            None | Some('Z' | 'X')
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let others = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|dir| dir.count())
            .unwrap_or(0);
        if live.is_empty() && others <= 1 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pid {pid} still has threads {live:?} after SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}

/// A TCP listener with `SO_REUSEPORT` on `addr`.
fn reuseport_listener(addr: SocketAddr) -> OwnedFd {
    let fd = sock::socket(sock::domain_of(&addr), libc::SOCK_STREAM, 0).expect("socket");
    sock::set_opt(&fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1).expect("SO_REUSEPORT");
    sock::bind(&fd, addr).expect("bind");
    sock::listen(&fd).expect("listen");
    fd
}

#[test]
fn register_takes_one_socket_per_destination() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(&["192.0.2.0/24"]);
    let before = lab.status_json();
    // Two unrelated IPv4 TCP listeners for one label: ambiguous.
    let a = TcpEcho::new("a", "127.0.0.1:0");
    let b = TcpEcho::new("b", "127.0.0.1:0");
    let out = lab.register_fds("web", &[a.fd(), b.fd()], Some(&["a.socket", "b.socket"]));
    check_refused(
        &lab,
        "two IPv4 TCP listeners for one label",
        out,
        &["one socket", "both"],
        &before,
    );

    // The names systemd gave the sockets (LISTEN_FDNAMES) appear in errors.
    let bad = sock::udp_connected(sa("127.0.0.1:0"), sa("127.0.0.1:9")).expect("udp");
    let out = lab.register_fds("web", &[bad.as_fd()], Some(&["dns.socket"]));
    check_refused(
        &lab,
        "connected UDP named dns.socket",
        out,
        &["dns.socket"],
        &before,
    );

    // Members of one SO_REUSEPORT group are one service: accepted.
    let first = reuseport_listener(sa("127.0.0.1:0"));
    let second = reuseport_listener(sock::local_addr(&first).expect("bound"));
    lab.register_fds("group", &[first.as_fd(), second.as_fd()], None)
        .ok();
    let d = expect_destination(&lab.status_json(), "group", "ipv4", Proto::Tcp).clone();
    assert!(
        d["socket_cookie"].is_u64(),
        "reuseport group not registered: {d}"
    );
}

#[test]
fn register_refuses_more_sockets_than_one_request_carries() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(&["192.0.2.0/24"]);
    let listeners: Vec<std::net::TcpListener> = (0..65)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("listen"))
        .collect();
    let fds: Vec<_> = listeners.iter().map(std::os::fd::AsFd::as_fd).collect();
    let out = lab.register_fds("many", &fds, None);
    assert!(
        !out.status.success(),
        "65 sockets were accepted:\n{}",
        out.stdout
    );
    assert!(out.stderr.contains("at most 64"), "{}", out.stderr);
    // Nothing was registered, and nothing holds the sockets: once the test
    // drops them, they are gone.
    lab.ctl_err(&["status", "many"]);
}
