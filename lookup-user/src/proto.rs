//! The control protocol between `lookupctl` and `lookupd`.
//!
//! A Unix stream socket carries frames: a little-endian `u32` length, then
//! that many bytes of JSON. A request that hands over sockets (`register`)
//! sends them as `SCM_RIGHTS` on the same `sendmsg` as its frame. Every
//! request gets exactly one response frame.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, OwnedFd},
};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

use crate::binding::{Binding, Family, Label, Protocol};

/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 256 << 20;
/// Most sockets one `register` may carry.
pub const MAX_FDS: usize = 64;
/// Most descriptors the kernel passes in one message (`SCM_MAX_FD`); the
/// receive buffer holds that many so none is ever cut off and leaked.
const SCM_MAX_FD: usize = 253;

/// A request from a client.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Add a binding, or move an existing one to another label.
    Bind {
        /// The binding.
        binding: Binding,
    },
    /// Remove a binding; its label must match.
    Unbind {
        /// The binding.
        binding: Binding,
    },
    /// List bindings in precedence order.
    Bindings,
    /// Register the sockets sent with this frame for a label.
    Register {
        /// The label.
        label: Label,
        /// A name for each socket, in order, used in messages (for example
        /// `fd 3 (web.socket)`).
        names: Vec<String>,
    },
    /// Remove the socket of a destination.
    Unregister {
        /// The label.
        label: Label,
        /// IPv4 or IPv6.
        family: Family,
        /// TCP or UDP.
        protocol: Protocol,
    },
    /// Bindings, destinations and counters, optionally for one label.
    Status {
        /// Only this label.
        label: Option<Label>,
    },
    /// Apply many changes at once: one per line, `bind <label> <tcp|udp>
    /// <prefix> <port>` or `unbind ...`; blank lines and `#` comments are
    /// ignored. All are checked before any is applied; on any error nothing
    /// changes.
    Apply {
        /// The changes, as text (compact on the wire and in the agent).
        lines: String,
    },
}

/// The agent's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Response {
    /// A change was applied (or was already in place).
    Done {
        /// One line per effect, for humans.
        messages: Vec<String>,
    },
    /// The answer to [`Request::Bindings`].
    Bindings {
        /// In precedence order.
        bindings: Vec<Binding>,
    },
    /// The answer to [`Request::Status`].
    Status(Status),
    /// The request was refused; nothing changed.
    Error {
        /// What is wrong, naming the input.
        message: String,
    },
}

/// Counters of one destination, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    /// Lookups that matched a binding of the destination.
    pub lookups: u64,
    /// Lookups refused for lack of a socket.
    pub misses: u64,
    /// Assign errors: wrong address family.
    pub errors_family: u64,
    /// Assign errors: wrong protocol.
    pub errors_protocol: u64,
    /// Assign errors: socket not listening, or connected.
    pub errors_state: u64,
    /// Assign errors: anything else.
    pub errors_other: u64,
}

/// One destination as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationStatus {
    /// The label.
    pub label: Label,
    /// IPv4 or IPv6.
    pub family: Family,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Slot in the sockmap.
    pub id: u32,
    /// Cookie of the registered socket, if one is there.
    pub socket_cookie: Option<u64>,
    /// How many bindings point here.
    pub bindings: usize,
    /// Counters.
    pub metrics: Metrics,
}

/// The answer to `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Bindings in precedence order.
    pub bindings: Vec<Binding>,
    /// Destinations, ordered by label, family and protocol.
    pub destinations: Vec<DestinationStatus>,
}

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The socket failed.
    #[error("control socket i/o failed")]
    Io(#[from] io::Error),
    /// The peer closed the connection.
    #[error("control connection closed by peer")]
    Closed,
    /// A frame above [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge(usize),
    /// Not valid JSON for the expected type.
    #[error("malformed message")]
    Json(#[from] serde_json::Error),
}

/// Encodes a message as one frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Sends `data` with `fds` attached to its first byte. Blocks until all of
/// `data` is written.
pub fn send_with_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let mut sent = 0;
    while sent < data.len() {
        let iov = [io::IoSlice::new(&data[sent..])];
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if sent == 0 && !raw.is_empty() {
            &cmsg
        } else {
            &[]
        };
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => sent += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// One `recvmsg` of at most `max` bytes: appends bytes to `buf` and
/// received descriptors to `fds`. Returns the number of bytes read (0 at end
/// of stream). Received descriptors are close-on-exec. A reader that never
/// asks for bytes past the end of the frame it is reading gets exactly that
/// frame's descriptors: they come with the frame's bytes, never earlier.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut Vec<u8>,
    fds: &mut Vec<OwnedFd>,
    max: usize,
) -> io::Result<usize> {
    use std::os::fd::FromRawFd as _;
    let mut chunk = vec![0u8; max.min(1 << 20)];
    let mut cmsg = nix::cmsg_space!([i32; SCM_MAX_FD]);
    let (n, received) = {
        let mut iov = [io::IoSliceMut::new(&mut chunk)];
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        )?;
        let mut received = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(list) = c {
                // SAFETY: the kernel just installed these descriptors for us.
                received.extend(
                    list.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        (msg.bytes, received)
    };
    buf.extend_from_slice(&chunk[..n]);
    fds.extend(received);
    Ok(n)
}

/// Splits one complete frame off the front of `buf`, if there is one.
pub fn take_frame(buf: &mut Vec<u8>) -> Result<Option<Vec<u8>>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    // Move the frame out rather than copy it: batches can be large.
    let rest = buf.split_off(4 + len);
    let mut body = std::mem::replace(buf, rest);
    body.drain(..4);
    Ok(Some(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::binding::Binding;

    #[test]
    fn frames_round_trip() {
        let req = Request::Bind {
            binding: Binding::parse("web", "tcp", "192.0.2.0/24", "443").unwrap(),
        };
        let mut buf = encode(&req).unwrap();
        buf.extend(encode(&Request::Bindings).unwrap());
        buf.push(7); // start of a third frame
        let first = take_frame(&mut buf).unwrap().unwrap();
        let json = String::from_utf8(first.clone()).unwrap();
        assert!(json.contains(r#""op":"bind""#), "{json}");
        assert!(json.contains(r#""prefix":"192.0.2.0/24""#), "{json}");
        assert!(matches!(
            serde_json::from_slice(&first).unwrap(),
            Request::Bind { .. }
        ));
        let second = take_frame(&mut buf).unwrap().unwrap();
        assert!(matches!(
            serde_json::from_slice(&second).unwrap(),
            Request::Bindings
        ));
        assert_eq!(take_frame(&mut buf).unwrap(), None);
        assert_eq!(buf, vec![7]);
    }

    #[test]
    fn bad_input_in_frames_is_rejected() {
        let bad = br#"{"op":"bind","binding":{"label":"x","protocol":"tcp","prefix":"10.0.0.1/8","port":1}}"#;
        let err = serde_json::from_slice::<Request>(bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("10.0.0.0/8"), "{err}");
        let mut huge = (u32::MAX).to_le_bytes().to_vec();
        assert!(matches!(
            take_frame(&mut huge),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn fds_travel_with_their_frame() {
        use std::os::{fd::AsFd, unix::net::UnixStream};
        let (a, b) = UnixStream::pair().unwrap();
        let (x, _y) = UnixStream::pair().unwrap();
        let frame = encode(&Request::Bindings).unwrap();
        send_with_fds(a.as_fd(), &frame, &[x.as_fd()]).unwrap();
        let (mut buf, mut fds) = (Vec::new(), Vec::new());
        recv_with_fds(b.as_fd(), &mut buf, &mut fds, 1 << 16).unwrap();
        assert_eq!(fds.len(), 1);
        assert!(take_frame(&mut buf).unwrap().is_some());
    }
}
