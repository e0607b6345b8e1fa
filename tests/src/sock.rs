//! Sockets with exactly the options a test asks for.
//!
//! Every socket is created with `SOCK_CLOEXEC`. Tests run in parallel threads
//! of one process; a socket without it would leak into whatever process
//! another test spawns next and stay alive there, hiding the very "service
//! exited" behaviour the suite checks.

use std::{
    io,
    net::{SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, UdpSocket},
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
};

use libc::c_int;
use nix::sys::socket::SockaddrStorage;

/// `socket(domain, ty | SOCK_CLOEXEC, protocol)`.
pub fn socket(domain: c_int, ty: c_int, protocol: c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; on success we own the new descriptor.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `AF_INET` or `AF_INET6` for an address.
pub fn domain_of(addr: &SocketAddr) -> c_int {
    match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    }
}

/// `setsockopt` with an `int` value.
pub fn set_opt(fd: impl AsFd, level: c_int, name: c_int, value: c_int) -> io::Result<()> {
    // SAFETY: `value` outlives the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_fd().as_raw_fd(),
            level,
            name,
            (&value as *const c_int).cast(),
            size_of::<c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `getsockopt` with an `int` value.
pub fn get_opt(fd: impl AsFd, level: c_int, name: c_int) -> io::Result<c_int> {
    let mut value: c_int = 0;
    let mut len = size_of::<c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            level,
            name,
            (&mut value as *mut c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// `bind(fd, addr)`.
pub fn bind(fd: impl AsFd, addr: SocketAddr) -> io::Result<()> {
    let storage = SockaddrStorage::from(addr);
    nix::sys::socket::bind(fd.as_fd().as_raw_fd(), &storage).map_err(io::Error::from)
}

/// `connect(fd, addr)`, blocking.
pub fn connect(fd: impl AsFd, addr: SocketAddr) -> io::Result<()> {
    let storage = SockaddrStorage::from(addr);
    nix::sys::socket::connect(fd.as_fd().as_raw_fd(), &storage).map_err(io::Error::from)
}

/// `listen(fd, 128)`.
pub fn listen(fd: impl AsFd) -> io::Result<()> {
    // SAFETY: plain syscall on a valid descriptor.
    if unsafe { libc::listen(fd.as_fd().as_raw_fd(), 128) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `getsockname` as a `SocketAddr`.
pub fn local_addr(fd: impl AsFd) -> io::Result<SocketAddr> {
    let storage: SockaddrStorage =
        nix::sys::socket::getsockname(fd.as_fd().as_raw_fd()).map_err(io::Error::from)?;
    to_socket_addr(&storage).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not an inet socket address: {storage}"),
        )
    })
}

/// Converts an inet sockaddr; `None` for any other family.
pub fn to_socket_addr(storage: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = storage.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    storage
        .as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

/// The file status flags (`fcntl(F_GETFL)`), for example `O_NONBLOCK`.
pub fn status_flags(fd: impl AsFd) -> c_int {
    // SAFETY: plain fcntl on a valid descriptor.
    let flags = unsafe { libc::fcntl(fd.as_fd().as_raw_fd(), libc::F_GETFL) };
    assert!(flags >= 0, "F_GETFL: {}", io::Error::last_os_error());
    flags
}

/// Sets the file status flags (`fcntl(F_SETFL)`).
pub fn set_status_flags(fd: impl AsFd, flags: c_int) {
    // SAFETY: plain fcntl on a valid descriptor.
    let rc = unsafe { libc::fcntl(fd.as_fd().as_raw_fd(), libc::F_SETFL, flags) };
    assert!(rc >= 0, "F_SETFL: {}", io::Error::last_os_error());
}

/// Lets a socket bind to and send from addresses that only an AnyIP route
/// makes local. IPv4 accepts those already; IPv6 insists on a configured
/// address unless the socket is free-binding.
pub fn set_freebind(fd: impl AsFd, domain: c_int) -> io::Result<()> {
    if domain == libc::AF_INET6 {
        set_opt(fd, libc::IPPROTO_IPV6, libc::IPV6_FREEBIND, 1)
    } else {
        set_opt(fd, libc::IPPROTO_IP, libc::IP_FREEBIND, 1)
    }
}

/// The socket's address family (`SO_DOMAIN`).
pub fn domain(fd: impl AsFd) -> io::Result<c_int> {
    get_opt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)
}

/// A socket of type `ty` bound to `addr` the way a server binds: with
/// `SO_REUSEADDR`, free-binding, and for IPv6 `IPV6_V6ONLY` unless
/// `dual_stack`.
pub fn server_socket(ty: c_int, addr: SocketAddr, dual_stack: bool) -> io::Result<OwnedFd> {
    let domain = domain_of(&addr);
    let fd = socket(domain, ty, 0)?;
    set_opt(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if domain == libc::AF_INET6 {
        set_opt(
            &fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            c_int::from(!dual_stack),
        )?;
    }
    set_freebind(&fd, domain)?;
    bind(&fd, addr)?;
    Ok(fd)
}

/// A TCP listener on `addr` (port 0 picks one), `IPV6_V6ONLY` for IPv6.
pub fn tcp_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let fd = server_socket(libc::SOCK_STREAM, addr, false)?;
    listen(&fd)?;
    Ok(TcpListener::from(fd))
}

/// An unconnected UDP socket on `addr` that reports each datagram's original
/// destination (see [`enable_orig_dst`]).
pub fn udp_server(addr: SocketAddr) -> io::Result<UdpSocket> {
    let fd = server_socket(libc::SOCK_DGRAM, addr, false)?;
    enable_orig_dst(&fd)?;
    Ok(UdpSocket::from(fd))
}

/// Asks for `IP_ORIGDSTADDR` / `IPV6_ORIGDSTADDR` with every datagram, which a
/// steered UDP service needs to answer from the address the client used.
pub fn enable_orig_dst(fd: impl AsFd) -> io::Result<()> {
    let domain = domain(&fd)?;
    if domain == libc::AF_INET6 {
        set_opt(&fd, libc::IPPROTO_IPV6, libc::IPV6_RECVORIGDSTADDR, 1)?;
    } else {
        set_opt(&fd, libc::IPPROTO_IP, libc::IP_RECVORIGDSTADDR, 1)?;
    }
    set_freebind(&fd, domain)
}

/// A TCP socket bound to `addr` that never listens (a bad registration).
pub fn tcp_bound(addr: SocketAddr) -> io::Result<OwnedFd> {
    server_socket(libc::SOCK_STREAM, addr, false)
}

/// A UDP socket bound to `addr` and connected to `peer` (a bad registration).
pub fn udp_connected(addr: SocketAddr, peer: SocketAddr) -> io::Result<OwnedFd> {
    let fd = server_socket(libc::SOCK_DGRAM, addr, false)?;
    connect(&fd, peer)?;
    Ok(fd)
}

/// A dual-stack (`IPV6_V6ONLY=0`) socket of type `ty` on an IPv6 `addr`,
/// listening if it is a stream socket (a bad registration).
///
/// `addr` must be `[::]:port`: binding any other IPv6 address makes the
/// kernel set `IPV6_V6ONLY` itself, so the result would not be dual-stack.
pub fn dual_stack(ty: c_int, addr: SocketAddr) -> io::Result<OwnedFd> {
    let fd = server_socket(ty, addr, true)?;
    if get_opt(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)? != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a socket bound to {addr} is IPv6-only; bind [::] for dual-stack"),
        ));
    }
    if ty == libc::SOCK_STREAM {
        listen(&fd)?;
    }
    Ok(fd)
}
