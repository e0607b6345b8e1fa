//! Sockets handed to the agent: what they are, and whether the data plane
//! can steer traffic to them.
//!
//! `bpf_sk_assign` from `sk_lookup` takes only a listening TCP socket or an
//! unconnected UDP socket, and assigns an IPv6 socket IPv4 traffic unless it
//! is `IPV6_V6ONLY`. [`inspect`] refuses anything else up front, with a
//! message saying how to fix it, rather than letting lookups fail later.
//!
//! Inspection only reads socket options: it never changes the descriptor's
//! file status flags, which are shared with the process that owns the socket.

use std::{
    io, mem,
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd},
};

use libc::c_int;
use nix::{
    errno::Errno,
    sys::socket::{SockaddrLike as _, SockaddrStorage, getpeername, getsockname},
};

use crate::binding::{Family, Protocol};

/// `ioctl` returning a descriptor of the socket's network namespace.
const SIOCGSKNS: libc::c_ulong = 0x894C;
/// `getsockopt(SOL_SOCKET, SO_COOKIE)`: the socket's unique 64-bit id.
const SO_COOKIE: c_int = 57;

/// What [`inspect`] found out about an acceptable socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketInfo {
    /// IPv4 or IPv6.
    pub family: Family,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The address the socket is bound to.
    pub local: SocketAddr,
    /// Whether `SO_REUSEPORT` is set.
    pub reuseport: bool,
    /// `SO_COOKIE`: the kernel's id of the socket, stable for its lifetime.
    pub cookie: u64,
}

/// Why a socket cannot be registered, or could not be inspected.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The descriptor is a file, pipe or other non-socket.
    #[error("not a socket")]
    NotASocket,
    /// A socket of another address family (unix, netlink, ...).
    #[error(
        "{} socket: only IPv4 and IPv6 sockets can be registered",
        family_name(*domain)
    )]
    UnsupportedFamily {
        /// The `AF_*` number.
        domain: c_int,
    },
    /// A raw IP socket.
    #[error("raw socket (ip protocol {protocol}): only tcp and udp sockets can be registered")]
    Raw {
        /// The IP protocol number it was opened with.
        protocol: c_int,
    },
    /// An IP socket that is neither TCP nor UDP (SCTP, MPTCP, UDP-Lite, ...).
    #[error(
        "{} socket {local}: only tcp and udp sockets can be registered",
        kind_name(*sock_type, *protocol)
    )]
    UnsupportedProtocol {
        /// The `SOCK_*` type.
        sock_type: c_int,
        /// The `IPPROTO_*` number.
        protocol: c_int,
        /// The address it is bound to.
        local: SocketAddr,
    },
    /// An IPv6 socket without `IPV6_V6ONLY`. Only a socket bound to `::`
    /// can be one: binding to another address sets the option.
    #[error(
        "ipv6 socket {local} is dual-stack: set IPV6_V6ONLY=1 and register a separate ipv4 socket"
    )]
    DualStack {
        /// The address it is bound to.
        local: SocketAddr,
    },
    /// A TCP socket that is not listening.
    #[error("tcp socket {local} is not listening: call listen() first")]
    NotListening {
        /// The address it is bound to.
        local: SocketAddr,
    },
    /// A UDP socket with a peer.
    #[error(
        "udp socket {local} is connected to {peer}: only unconnected udp sockets can be registered"
    )]
    Connected {
        /// The address it is bound to.
        local: SocketAddr,
        /// The address it is connected to.
        peer: SocketAddr,
    },
    /// A UDP socket without a local port: the kernel does not add unbound
    /// UDP sockets to a sockmap.
    #[error("udp socket {local} is not bound: call bind() first")]
    NotBound {
        /// The wildcard address it reports.
        local: SocketAddr,
    },
    /// `SIOCGSKNS` needs `CAP_NET_ADMIN` over the socket's namespace.
    #[error(
        "permission denied reading the network namespace of the socket: CAP_NET_ADMIN is required"
    )]
    NetnsPermission,
    /// A system call failed.
    #[error("{call} failed")]
    Io {
        /// The call, for example `getsockopt(SO_COOKIE)`.
        call: &'static str,
        /// The error it returned.
        #[source]
        source: io::Error,
    },
}

/// Inspects a socket and decides whether it may be registered: an IPv4 or
/// IPv6 (`IPV6_V6ONLY`) socket that is a listening TCP socket or a bound,
/// unconnected UDP socket.
pub fn inspect(fd: BorrowedFd<'_>) -> Result<SocketInfo, SocketError> {
    let domain = match int_opt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => return Err(SocketError::NotASocket),
        r => r.map_err(io_err("getsockopt(SO_DOMAIN)"))?,
    };
    let family = match domain {
        libc::AF_INET => Family::Ipv4,
        libc::AF_INET6 => Family::Ipv6,
        _ => return Err(SocketError::UnsupportedFamily { domain }),
    };
    let sock_type =
        int_opt(fd, libc::SOL_SOCKET, libc::SO_TYPE).map_err(io_err("getsockopt(SO_TYPE)"))?;
    let proto = int_opt(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL)
        .map_err(io_err("getsockopt(SO_PROTOCOL)"))?;
    if sock_type == libc::SOCK_RAW {
        return Err(SocketError::Raw { protocol: proto });
    }
    let local = local_addr(fd)
        .map_err(io_err("getsockname"))?
        .ok_or(SocketError::UnsupportedFamily { domain })?;
    let protocol = match (sock_type, proto) {
        (libc::SOCK_STREAM, libc::IPPROTO_TCP) => Protocol::Tcp,
        (libc::SOCK_DGRAM, libc::IPPROTO_UDP) => Protocol::Udp,
        _ => {
            return Err(SocketError::UnsupportedProtocol {
                sock_type,
                protocol: proto,
                local,
            });
        }
    };
    if family == Family::Ipv6
        && int_opt(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)
            .map_err(io_err("getsockopt(IPV6_V6ONLY)"))?
            == 0
    {
        return Err(SocketError::DualStack { local });
    }
    match protocol {
        Protocol::Tcp => {
            if !is_listening(fd).map_err(io_err("getsockopt(SO_ACCEPTCONN)"))? {
                return Err(SocketError::NotListening { local });
            }
        }
        Protocol::Udp => {
            if let Some(peer) = peer_addr(fd).map_err(io_err("getpeername"))? {
                return Err(SocketError::Connected { local, peer });
            }
            if local.port() == 0 {
                return Err(SocketError::NotBound { local });
            }
        }
    }
    let reuseport = int_opt(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT)
        .map_err(io_err("getsockopt(SO_REUSEPORT)"))?
        != 0;
    let cookie =
        u64_opt(fd, libc::SOL_SOCKET, SO_COOKIE).map_err(io_err("getsockopt(SO_COOKIE)"))?;
    Ok(SocketInfo {
        family,
        protocol,
        local,
        reuseport,
        cookie,
    })
}

/// The inode number of the socket's network namespace, as `stat` shows it
/// for `/proc/<pid>/ns/net`. Needs `CAP_NET_ADMIN` over that namespace.
pub fn netns_inode(fd: BorrowedFd<'_>) -> Result<u64, SocketError> {
    use std::os::unix::fs::MetadataExt as _;
    // SAFETY: SIOCGSKNS takes no argument; it only reads the socket.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), SIOCGSKNS as _) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ENOTTY | libc::ENOTSOCK) => SocketError::NotASocket,
            Some(libc::EPERM) => SocketError::NetnsPermission,
            _ => SocketError::Io {
                call: "ioctl(SIOCGSKNS)",
                source: e,
            },
        });
    }
    // SAFETY: on success SIOCGSKNS returns a new descriptor that nobody
    // else owns.
    let ns = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(ret) });
    let meta = ns
        .metadata()
        .map_err(io_err("fstat of the network namespace"))?;
    Ok(meta.ino())
}

fn io_err(call: &'static str) -> impl FnOnce(io::Error) -> SocketError {
    move |source| SocketError::Io { call, source }
}

/// Integer types that socket options return; any bit pattern is valid.
trait OptValue: Copy + Default {}
impl OptValue for c_int {}
impl OptValue for u64 {}

fn opt<T: OptValue>(fd: BorrowedFd<'_>, level: c_int, name: c_int) -> io::Result<T> {
    let mut value = T::default();
    let mut len = mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: value is writable for len bytes, and T has no invalid bit
    // patterns, so whatever the kernel writes is a valid T.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != mem::size_of::<T>() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "option {level}/{name} has {len} bytes, expected {}",
                mem::size_of::<T>()
            ),
        ));
    }
    Ok(value)
}

/// An integer socket option.
pub(crate) fn int_opt(fd: BorrowedFd<'_>, level: c_int, name: c_int) -> io::Result<c_int> {
    opt(fd, level, name)
}

fn u64_opt(fd: BorrowedFd<'_>, level: c_int, name: c_int) -> io::Result<u64> {
    opt(fd, level, name)
}

/// `SO_ACCEPTCONN`: whether `listen()` was called.
pub(crate) fn is_listening(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(int_opt(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? != 0)
}

fn to_std(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    addr.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

/// `getsockname`, or `None` for a socket that is not IPv4 or IPv6.
pub(crate) fn local_addr(fd: BorrowedFd<'_>) -> io::Result<Option<SocketAddr>> {
    let addr = getsockname::<SockaddrStorage>(fd.as_raw_fd())?;
    Ok(to_std(&addr))
}

/// `getpeername`, or `None` if the socket is not connected.
pub(crate) fn peer_addr(fd: BorrowedFd<'_>) -> io::Result<Option<SocketAddr>> {
    match getpeername::<SockaddrStorage>(fd.as_raw_fd()) {
        Ok(addr) if addr.family().is_some() => Ok(to_std(&addr)),
        // A UDP socket that connected to AF_UNSPEC is disconnected again.
        Ok(_) | Err(Errno::ENOTCONN) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn family_name(domain: c_int) -> String {
    match domain {
        libc::AF_UNIX => "unix".to_owned(),
        libc::AF_NETLINK => "netlink".to_owned(),
        libc::AF_PACKET => "packet".to_owned(),
        libc::AF_VSOCK => "vsock".to_owned(),
        libc::AF_BLUETOOTH => "bluetooth".to_owned(),
        libc::AF_ALG => "af_alg".to_owned(),
        libc::AF_XDP => "xdp".to_owned(),
        _ => format!("address family {domain}"),
    }
}

fn kind_name(sock_type: c_int, protocol: c_int) -> String {
    match (sock_type, protocol) {
        (_, libc::IPPROTO_SCTP) => "sctp".to_owned(),
        (_, libc::IPPROTO_MPTCP) => "mptcp".to_owned(),
        (_, libc::IPPROTO_UDPLITE) => "udp-lite".to_owned(),
        (libc::SOCK_DGRAM, libc::IPPROTO_ICMP | libc::IPPROTO_ICMPV6) => "icmp (ping)".to_owned(),
        _ => format!("type {sock_type} protocol {protocol}"),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv6Addr, TcpListener, UdpSocket},
        os::{
            fd::AsFd,
            unix::{fs::MetadataExt as _, net::UnixStream},
        },
    };

    use nix::{
        fcntl::{FcntlArg, OFlag, fcntl},
        sys::socket::{
            AddressFamily, Backlog, SockFlag, SockType, SockaddrIn6, bind, listen, setsockopt,
            socket, sockopt,
        },
    };

    use super::*;

    /// An IPv6 socket on `ip` with a fresh port and the given V6ONLY.
    /// Binding to an address other than `::` sets V6ONLY in the kernel.
    fn v6(ty: SockType, ip: Ipv6Addr, v6only: bool) -> (OwnedFd, SocketAddr) {
        let fd = socket(AddressFamily::Inet6, ty, SockFlag::empty(), None).expect("socket");
        setsockopt(&fd, sockopt::Ipv6V6Only, &v6only).expect("IPV6_V6ONLY");
        let addr = SocketAddrV6::new(ip, 0, 0, 0);
        bind(fd.as_raw_fd(), &SockaddrIn6::from(addr)).expect("bind");
        let local = local_addr(fd.as_fd()).expect("getsockname").expect("inet");
        (fd, local)
    }

    fn status_flags(fd: BorrowedFd<'_>) -> OFlag {
        OFlag::from_bits_retain(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).expect("F_GETFL"))
    }

    #[test]
    fn accepts_listeners_and_unconnected_udp() {
        let tcp4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let info = inspect(tcp4.as_fd()).expect("tcp4 listener");
        assert_eq!(info.family, Family::Ipv4);
        assert_eq!(info.protocol, Protocol::Tcp);
        assert_eq!(info.local, tcp4.local_addr().unwrap());
        assert!(!info.reuseport);
        assert_ne!(info.cookie, 0);

        let (tcp6, local6) = v6(SockType::Stream, Ipv6Addr::LOCALHOST, true);
        setsockopt(&tcp6, sockopt::ReusePort, &true).unwrap();
        listen(&tcp6, Backlog::new(8).unwrap()).unwrap();
        let info = inspect(tcp6.as_fd()).expect("v6only tcp6 listener");
        assert_eq!(
            (info.family, info.protocol, info.local, info.reuseport),
            (Family::Ipv6, Protocol::Tcp, local6, true)
        );

        let udp4 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let info = inspect(udp4.as_fd()).expect("udp4 socket");
        assert_eq!(
            (info.family, info.protocol, info.local),
            (Family::Ipv4, Protocol::Udp, udp4.local_addr().unwrap())
        );

        let (udp6, local6) = v6(SockType::Datagram, Ipv6Addr::LOCALHOST, true);
        let info = inspect(udp6.as_fd()).expect("v6only udp6 socket");
        assert_eq!((info.protocol, info.local), (Protocol::Udp, local6));

        // Cookies tell sockets apart and stay the same for one socket.
        assert_ne!(
            inspect(udp4.as_fd()).unwrap().cookie,
            inspect(tcp4.as_fd()).unwrap().cookie
        );
        let cookie = inspect(udp4.as_fd()).unwrap().cookie;
        assert_eq!(inspect(udp4.as_fd()).unwrap().cookie, cookie);
    }

    #[test]
    fn rejects_sockets_in_the_wrong_state() {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .unwrap();
        bind(
            fd.as_raw_fd(),
            &nix::sys::socket::SockaddrIn::new(127, 0, 0, 1, 0),
        )
        .unwrap();
        let local = local_addr(fd.as_fd()).unwrap().unwrap();
        let err = inspect(fd.as_fd()).unwrap_err();
        assert!(matches!(err, SocketError::NotListening { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("tcp socket {local} is not listening: call listen() first")
        );

        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(server.local_addr().unwrap()).unwrap();
        let err = inspect(client.as_fd()).unwrap_err().to_string();
        let (local, peer) = (client.local_addr().unwrap(), server.local_addr().unwrap());
        assert_eq!(
            err,
            format!(
                "udp socket {local} is connected to {peer}: only unconnected udp sockets can be registered"
            )
        );

        let unbound = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::empty(),
            None,
        )
        .unwrap();
        let err = inspect(unbound.as_fd()).unwrap_err();
        assert!(matches!(err, SocketError::NotBound { .. }), "{err:?}");
        assert!(err.to_string().contains("call bind() first"), "{err}");
    }

    #[test]
    fn rejects_dual_stack_ipv6() {
        let (tcp6, local) = v6(SockType::Stream, Ipv6Addr::UNSPECIFIED, false);
        listen(&tcp6, Backlog::new(8).unwrap()).unwrap();
        let err = inspect(tcp6.as_fd()).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "ipv6 socket {local} is dual-stack: set IPV6_V6ONLY=1 and register a separate ipv4 socket"
            )
        );
        assert!(err.contains(&format!("[::]:{}", local.port())), "{err}");

        let (udp6, _) = v6(SockType::Datagram, Ipv6Addr::UNSPECIFIED, false);
        assert!(matches!(
            inspect(udp6.as_fd()),
            Err(SocketError::DualStack { .. })
        ));

        // Binding to a specific IPv6 address makes the socket V6ONLY.
        let (tcp6, _) = v6(SockType::Stream, Ipv6Addr::LOCALHOST, false);
        listen(&tcp6, Backlog::new(8).unwrap()).unwrap();
        inspect(tcp6.as_fd()).expect("[::1] listener is ipv6-only");
    }

    #[test]
    fn rejects_other_kinds() {
        let (a, _b) = UnixStream::pair().unwrap();
        let err = inspect(a.as_fd()).unwrap_err().to_string();
        assert_eq!(
            err,
            "unix socket: only IPv4 and IPv6 sockets can be registered"
        );

        let (r, _w) = nix::unistd::pipe().unwrap();
        assert_eq!(inspect(r.as_fd()).unwrap_err().to_string(), "not a socket");
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert!(matches!(
            inspect(file.as_fd()),
            Err(SocketError::NotASocket)
        ));
        assert!(matches!(
            netns_inode(file.as_fd()),
            Err(SocketError::NotASocket)
        ));

        // MPTCP and UDP-Lite may be compiled out; test whichever exists.
        for (ty, proto, name) in [
            (libc::SOCK_STREAM, libc::IPPROTO_MPTCP, "mptcp"),
            (libc::SOCK_DGRAM, libc::IPPROTO_UDPLITE, "udp-lite"),
        ] {
            // SAFETY: plain socket(2); a valid result is a new descriptor.
            let raw = unsafe { libc::socket(libc::AF_INET, ty, proto) };
            if raw < 0 {
                eprintln!("{name} sockets unavailable: {}", io::Error::last_os_error());
                continue;
            }
            // SAFETY: socket(2) just returned this descriptor.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let err = inspect(fd.as_fd()).unwrap_err();
            assert!(
                matches!(err, SocketError::UnsupportedProtocol { .. }),
                "{name}: {err:?}"
            );
            assert_eq!(
                err.to_string(),
                format!("{name} socket 0.0.0.0:0: only tcp and udp sockets can be registered")
            );
        }
        assert_eq!(
            SocketError::Raw { protocol: 1 }.to_string(),
            "raw socket (ip protocol 1): only tcp and udp sockets can be registered"
        );
    }

    #[test]
    fn inspect_leaves_file_status_flags_alone() {
        for nonblocking in [false, true] {
            let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
            tcp.set_nonblocking(nonblocking).unwrap();
            let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
            udp.set_nonblocking(nonblocking).unwrap();
            for fd in [tcp.as_fd(), udp.as_fd()] {
                let before = status_flags(fd);
                assert_eq!(before.contains(OFlag::O_NONBLOCK), nonblocking);
                inspect(fd).expect("acceptable socket");
                assert_eq!(status_flags(fd), before, "nonblocking={nonblocking}");
            }
        }
    }

    #[test]
    fn io_errors_name_the_call_once() {
        use std::error::Error as _;
        let err = SocketError::Io {
            call: "getsockopt(SO_COOKIE)",
            source: io::Error::from_raw_os_error(libc::EBADF),
        };
        assert_eq!(err.to_string(), "getsockopt(SO_COOKIE) failed");
        assert!(err.source().is_some());
    }

    fn own_netns_inode() -> u64 {
        std::fs::metadata("/proc/self/ns/net")
            .expect("stat /proc/self/ns/net")
            .ino()
    }

    #[test]
    fn netns_inode_is_the_sockets_namespace() {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        match netns_inode(sock.as_fd()) {
            Ok(ino) => assert_eq!(ino, own_netns_inode()),
            Err(SocketError::NetnsPermission) => netns_inode_in_own_namespaces(),
            Err(e) => panic!("netns_inode: {e:?}"),
        }
    }

    /// Without CAP_NET_ADMIN, checks `netns_inode` in a child that owns a
    /// new user and network namespace, where it has the capability.
    fn netns_inode_in_own_namespaces() {
        use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
        let mut cmd = std::process::Command::new("/bin/true");
        let outer = own_netns_inode();
        // SAFETY: the closure runs between fork and exec and makes only
        // async-signal-safe system calls; it exits without allocating.
        unsafe {
            cmd.pre_exec(move || {
                let code = (|| {
                    if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) != 0 {
                        return 10;
                    }
                    let raw = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
                    if raw < 0 {
                        return 11;
                    }
                    let sock = BorrowedFd::borrow_raw(raw);
                    let Ok(ino) = netns_inode(sock) else {
                        return 12;
                    };
                    let ns = libc::open(c"/proc/self/ns/net".as_ptr(), libc::O_RDONLY);
                    let mut st: libc::stat = mem::zeroed();
                    if ns < 0 || libc::fstat(ns, &mut st) != 0 {
                        return 13;
                    }
                    if ino != st.st_ino || ino == outer {
                        return 14;
                    }
                    0
                })();
                libc::_exit(code)
            });
        }
        let status = cmd.status().expect("spawn the namespace child");
        match status.code() {
            Some(0) => {}
            Some(10) => eprintln!("no user namespaces here: netns_inode checked for EPERM only"),
            other => panic!(
                "netns_inode in a new namespace failed: code {other:?}, signal {:?}",
                status.signal()
            ),
        }
    }
}
