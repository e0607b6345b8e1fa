//! `echo-server`: answers every TCP connection and UDP datagram with its name.
//!
//! ```text
//! echo-server --name NAME [--tcp ADDR]... [--udp ADDR]... [--v6only | --dual-stack]
//!             [--listen-fds] [--pidfile PATH]
//! ```
//!
//! Binds every socket (`SO_REUSEADDR`; IPv6 sockets `IPV6_V6ONLY=1` unless
//! `--dual-stack`), then prints one `READY <tcp|udp> <bound address>` line
//! per socket, so callers can ask for port 0. `--listen-fds` also serves the
//! sockets passed as fds 3.. by `LISTEN_FDS` (systemd style; `LISTEN_PID` is
//! not checked, so a helper forked next to the activated process can serve
//! them). UDP answers come from each datagram's original destination. Runs
//! until killed.

use std::{
    io::Write,
    net::{SocketAddr, TcpListener, UdpSocket},
    os::fd::{FromRawFd, OwnedFd, RawFd},
    process::ExitCode,
    sync::atomic::AtomicBool,
    thread,
};

use lookup_tests::{echo, sock};

enum Served {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

struct Args {
    name: String,
    tcp: Vec<SocketAddr>,
    udp: Vec<SocketAddr>,
    dual_stack: bool,
    listen_fds: bool,
    pidfile: Option<String>,
}

fn usage(msg: &str) -> String {
    format!(
        "{msg}\nusage: echo-server --name NAME [--tcp ADDR]... [--udp ADDR]... \
         [--v6only|--dual-stack] [--listen-fds] [--pidfile PATH]"
    )
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        name: String::new(),
        tcp: Vec::new(),
        udp: Vec::new(),
        dual_stack: false,
        listen_fds: false,
        pidfile: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |what: &str| {
            it.next()
                .ok_or_else(|| usage(&format!("{flag} needs {what}")))
        };
        match flag.as_str() {
            "--name" => args.name = value("a name")?,
            "--tcp" | "--udp" => {
                let v = value("an address")?;
                let addr = v
                    .parse()
                    .map_err(|e| usage(&format!("{flag} {v:?}: {e}")))?;
                if flag == "--tcp" {
                    args.tcp.push(addr);
                } else {
                    args.udp.push(addr);
                }
            }
            "--pidfile" => args.pidfile = Some(value("a path")?),
            "--v6only" => args.dual_stack = false,
            "--dual-stack" => args.dual_stack = true,
            "--listen-fds" => args.listen_fds = true,
            other => return Err(usage(&format!("unknown argument {other:?}"))),
        }
    }
    if args.name.is_empty() {
        return Err(usage("--name is required"));
    }
    Ok(args)
}

/// The sockets systemd-style activation passed, classified by `SO_TYPE`.
fn inherited() -> Result<Vec<Served>, String> {
    let n: RawFd = match std::env::var("LISTEN_FDS") {
        Ok(v) => v.parse().map_err(|e| format!("LISTEN_FDS={v:?}: {e}"))?,
        Err(_) => return Err("--listen-fds: LISTEN_FDS is not set".into()),
    };
    let mut out = Vec::new();
    for fd in 3..3 + n {
        // SAFETY: the activation protocol hands fds 3..3+LISTEN_FDS to us.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let ty = sock::get_opt(&owned, libc::SOL_SOCKET, libc::SO_TYPE)
            .map_err(|e| format!("fd {fd}: SO_TYPE: {e}"))?;
        match ty {
            libc::SOCK_STREAM => out.push(Served::Tcp(TcpListener::from(owned))),
            libc::SOCK_DGRAM => {
                sock::enable_orig_dst(&owned).map_err(|e| format!("fd {fd}: {e}"))?;
                out.push(Served::Udp(UdpSocket::from(owned)));
            }
            other => return Err(format!("fd {fd}: unsupported socket type {other}")),
        }
    }
    Ok(out)
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let mut served = Vec::new();
    for &addr in &args.tcp {
        let fd = sock::server_socket(libc::SOCK_STREAM, addr, args.dual_stack)
            .map_err(|e| format!("tcp {addr}: {e}"))?;
        sock::listen(&fd).map_err(|e| format!("tcp {addr}: listen: {e}"))?;
        served.push(Served::Tcp(TcpListener::from(fd)));
    }
    for &addr in &args.udp {
        let fd = sock::server_socket(libc::SOCK_DGRAM, addr, args.dual_stack)
            .map_err(|e| format!("udp {addr}: {e}"))?;
        sock::enable_orig_dst(&fd).map_err(|e| format!("udp {addr}: {e}"))?;
        served.push(Served::Udp(UdpSocket::from(fd)));
    }
    if args.listen_fds {
        served.extend(inherited()?);
    }
    if let Some(path) = &args.pidfile {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .map_err(|e| format!("pidfile {path}: {e}"))?;
    }
    {
        let mut out = std::io::stdout().lock();
        for s in &served {
            let line = match s {
                Served::Tcp(l) => {
                    format!("READY tcp {}", l.local_addr().map_err(|e| e.to_string())?)
                }
                Served::Udp(u) => {
                    format!("READY udp {}", u.local_addr().map_err(|e| e.to_string())?)
                }
            };
            writeln!(out, "{line}").map_err(|e| e.to_string())?;
        }
        out.flush().map_err(|e| e.to_string())?;
    }
    static NEVER: AtomicBool = AtomicBool::new(false);
    let threads: Vec<_> = served
        .into_iter()
        .map(|s| {
            let name = args.name.clone();
            thread::spawn(move || {
                let r = match &s {
                    Served::Tcp(l) => echo::serve_tcp(l, &name, &NEVER),
                    Served::Udp(u) => echo::serve_udp(u, &name, &NEVER),
                };
                if let Err(e) = r {
                    eprintln!("echo-server {name}: {e}");
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("echo-server: {e}");
            ExitCode::FAILURE
        }
    }
}
