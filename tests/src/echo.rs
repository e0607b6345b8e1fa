//! Servers that answer with their own name.
//!
//! TCP: accept, write the name, close. UDP: answer each datagram with the
//! name, sent from the address and port the client sent to, which for
//! steered traffic is not the address the socket is bound to. The same loops
//! run in the `echo-server` binary and in [`TcpEcho`] / [`UdpEcho`] threads
//! inside a test.

use std::{
    io::{self, IoSlice, IoSliceMut, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, sendmsg,
};

use crate::sock;

/// How often the serving loops look at their stop flag, in milliseconds.
const POLL_MS: libc::c_int = 50;

/// Waits up to [`POLL_MS`] for `fd` to become readable.
fn readable(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(n > 0)
}

/// Accepts connections on `listener` and writes `name` to each, until `stop`
/// is set or the listener fails.
///
/// Never changes the listener's file status flags: tests check that nothing
/// does.
pub fn serve_tcp(listener: &TcpListener, name: &str, stop: &AtomicBool) -> io::Result<()> {
    while !stop.load(Ordering::Relaxed) {
        if !readable(listener.as_fd())? {
            continue;
        }
        let (mut conn, _) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
            Err(e) => return Err(e),
        };
        // The client may have given up already; that is its problem.
        let _ = conn.write_all(name.as_bytes());
    }
    Ok(())
}

/// Answers every datagram on `socket` with `name`, from the datagram's
/// original destination, until `stop` is set or the socket fails.
///
/// The socket must have [`sock::enable_orig_dst`] set.
pub fn serve_udp(socket: &UdpSocket, name: &str, stop: &AtomicBool) -> io::Result<()> {
    let local = socket.local_addr()?;
    let mut buf = [0u8; 2048];
    let mut cmsg = nix::cmsg_space!(libc::sockaddr_in6);
    while !stop.load(Ordering::Relaxed) {
        if !readable(socket.as_fd())? {
            continue;
        }
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<SockaddrStorage>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let Some(peer) = msg.address.as_ref().and_then(sock::to_socket_addr) else {
            continue;
        };
        let mut orig = None;
        for c in msg.cmsgs()? {
            match c {
                ControlMessageOwned::Ipv4OrigDstAddr(sin) => {
                    orig = Some(SocketAddr::new(
                        IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))),
                        u16::from_be(sin.sin_port),
                    ));
                }
                ControlMessageOwned::Ipv6OrigDstAddr(sin6) => {
                    orig = Some(SocketAddr::new(
                        IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)),
                        u16::from_be(sin6.sin6_port),
                    ));
                }
                _ => {}
            }
        }
        let orig = orig.unwrap_or(local);
        if let Err(e) = reply_udp(socket, local, orig, peer, name.as_bytes()) {
            eprintln!("echo {name}: reply from {orig} to {peer}: {e}");
        }
    }
    Ok(())
}

/// Sends `payload` to `peer` with source address and port `orig`.
///
/// A connected client only accepts a reply from exactly the address and
/// port it sent to. The socket's own port is right when the binding names
/// the service's port; then `IP_PKTINFO` / `IPV6_PKTINFO` sets the source
/// address, as a real steered service does. For a wildcard-port binding the
/// port differs too, and only a short-lived socket bound to `orig` can send
/// from it.
fn reply_udp(
    socket: &UdpSocket,
    local: SocketAddr,
    orig: SocketAddr,
    peer: SocketAddr,
    payload: &[u8],
) -> io::Result<()> {
    if orig == local {
        socket.send_to(payload, peer)?;
        return Ok(());
    }
    if orig.port() == local.port() {
        let iov = [IoSlice::new(payload)];
        let dst = SockaddrStorage::from(peer);
        match orig.ip() {
            IpAddr::V4(ip) => {
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(ip).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                sendmsg(
                    socket.as_raw_fd(),
                    &iov,
                    &[ControlMessage::Ipv4PacketInfo(&info)],
                    MsgFlags::empty(),
                    Some(&dst),
                )?;
            }
            IpAddr::V6(ip) => {
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: ip.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                sendmsg(
                    socket.as_raw_fd(),
                    &iov,
                    &[ControlMessage::Ipv6PacketInfo(&info)],
                    MsgFlags::empty(),
                    Some(&dst),
                )?;
            }
        }
        return Ok(());
    }
    let once = UdpSocket::from(sock::server_socket(libc::SOCK_DGRAM, orig, false)?);
    once.send_to(payload, peer)?;
    Ok(())
}

/// A TCP echo server on a thread of the test process.
///
/// The listener is created on the calling thread, so it lives in the
/// calling thread's network namespace. Dropping the server stops the thread
/// and closes the listener, which also removes it from any sockmap.
#[derive(Debug)]
pub struct TcpEcho {
    name: String,
    listener: Arc<TcpListener>,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpEcho {
    /// Listens on `addr` (port 0 picks one) and answers with `name`.
    #[track_caller]
    pub fn new(name: &str, addr: &str) -> TcpEcho {
        let want = crate::sa(addr);
        let listener = Arc::new(
            sock::tcp_listener(want)
                .unwrap_or_else(|e| panic!("TcpEcho {name}: listen on {want}: {e}")),
        );
        let addr = listener.local_addr().expect("listener address");
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (listener, stop, name) = (listener.clone(), stop.clone(), name.to_owned());
            std::thread::Builder::new()
                .name(format!("tcp-echo-{name}"))
                .spawn(move || {
                    if let Err(e) = serve_tcp(&listener, &name, &stop) {
                        eprintln!("TcpEcho {name} on {addr}: {e}");
                    }
                })
                .expect("spawn TcpEcho thread")
        };
        TcpEcho {
            name: name.to_owned(),
            listener,
            addr,
            stop,
            thread: Some(thread),
        }
    }

    /// The name it answers with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bound address (with the real port if 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The listening socket, to register it.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP echo server on a thread of the test process; see [`TcpEcho`].
#[derive(Debug)]
pub struct UdpEcho {
    name: String,
    socket: Arc<UdpSocket>,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    /// Binds `addr` (port 0 picks one) and answers with `name`.
    #[track_caller]
    pub fn new(name: &str, addr: &str) -> UdpEcho {
        let want = crate::sa(addr);
        let socket = Arc::new(
            sock::udp_server(want).unwrap_or_else(|e| panic!("UdpEcho {name}: bind {want}: {e}")),
        );
        let addr = socket.local_addr().expect("socket address");
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (socket, stop, name) = (socket.clone(), stop.clone(), name.to_owned());
            std::thread::Builder::new()
                .name(format!("udp-echo-{name}"))
                .spawn(move || {
                    if let Err(e) = serve_udp(&socket, &name, &stop) {
                        eprintln!("UdpEcho {name} on {addr}: {e}");
                    }
                })
                .expect("spawn UdpEcho thread")
        };
        UdpEcho {
            name: name.to_owned(),
            socket,
            addr,
            stop,
            thread: Some(thread),
        }
    }

    /// The name it answers with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bound address (with the real port if 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The socket, to register it.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
