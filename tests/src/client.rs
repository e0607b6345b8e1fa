//! Clients that say who answered, or exactly why nobody did.

use std::{
    fmt,
    io::{self, Read},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

/// Longest a client waits for a connection or an answer. Only a failing
/// test ever waits this long: answers and refusals both arrive at once.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// The transport protocols lookup steers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// Both, for tests that run the same case over each.
    pub const ALL: [Proto; 2] = [Proto::Tcp, Proto::Udp];

    /// `tcp` or `udp`, as `lookupctl` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Connects to `addr` and reads what the server says until it closes.
pub fn dial_tcp(addr: SocketAddr) -> io::Result<String> {
    let mut conn = TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT)?;
    conn.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    Ok(answer)
}

/// Sends one datagram from a connected UDP socket and returns the answer.
///
/// Connected, because then the kernel reports the ICMP port unreachable that
/// follows a refusal as `ECONNREFUSED`, and accepts only a reply that comes
/// from exactly `addr`.
pub fn send_udp(addr: SocketAddr) -> io::Result<String> {
    let any: SocketAddr = match addr {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
        SocketAddr::V6(_) => "[::]:0".parse().expect("literal"),
    };
    let socket = UdpSocket::bind(any)?;
    socket.connect(addr)?;
    socket.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    socket.send(b"who are you?")?;
    let mut buf = [0u8; 2048];
    let n = socket.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// [`dial_tcp`] or [`send_udp`].
pub fn dial(proto: Proto, addr: SocketAddr) -> io::Result<String> {
    match proto {
        Proto::Tcp => dial_tcp(addr),
        Proto::Udp => send_udp(addr),
    }
}

/// Something a test can name as an address: a `SocketAddr` or a literal.
pub trait Target {
    /// The address, panicking on a typo in a literal.
    fn addr(&self) -> SocketAddr;
}

impl Target for SocketAddr {
    fn addr(&self) -> SocketAddr {
        *self
    }
}

impl Target for &str {
    #[track_caller]
    fn addr(&self) -> SocketAddr {
        crate::sa(self)
    }
}

impl Target for String {
    #[track_caller]
    fn addr(&self) -> SocketAddr {
        crate::sa(self)
    }
}

/// Panics unless a `proto` client to `target` is answered by server `name`.
#[track_caller]
pub fn assert_answers(proto: Proto, target: impl Target, name: &str) {
    let addr = target.addr();
    match dial(proto, addr) {
        Ok(got) if got == name => {}
        Ok(got) => panic!("{proto} {addr}: expected an answer from {name:?}, got one from {got:?}"),
        Err(e) => panic!(
            "{proto} {addr}: expected an answer from {name:?}, got error {e} ({:?})",
            e.kind()
        ),
    }
}

/// Panics unless a `proto` client to `target` is refused (`ECONNREFUSED`):
/// a TCP RST, or for UDP an ICMP port unreachable. A timeout is not a
/// refusal: it means traffic went somewhere that never answers.
#[track_caller]
pub fn assert_refused(proto: Proto, target: impl Target) {
    let addr = target.addr();
    match dial(proto, addr) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
        Ok(got) => panic!("{proto} {addr}: expected ECONNREFUSED, got an answer from {got:?}"),
        Err(e) => panic!(
            "{proto} {addr}: expected ECONNREFUSED, got error {e} ({:?}){}",
            e.kind(),
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                ": traffic went to a socket that never answered"
            } else {
                ""
            }
        ),
    }
}
