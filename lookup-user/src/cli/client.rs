//! A blocking client of the control socket.

use std::{
    io::Read as _,
    os::{fd::AsFd as _, fd::BorrowedFd, unix::net::UnixStream},
    path::PathBuf,
};

use crate::proto::{self, Request, Response};

/// Talks to one agent.
pub struct Client {
    path: PathBuf,
    json: bool,
}

impl Client {
    /// A client of the agent listening at `path`; `json` selects the output
    /// of [`Client::change`].
    pub fn new(path: PathBuf, json: bool) -> Self {
        Self { path, json }
    }

    /// Sends a request (with `fds` attached) and waits for the answer.
    /// Transport failures and refusals both come back as `Err(message)`.
    pub fn call(&self, request: &Request, fds: &[BorrowedFd<'_>]) -> Result<Response, String> {
        let mut stream = UnixStream::connect(&self.path).map_err(|e| {
            format!(
                "cannot reach lookupd at {}: {e} (is lookupd running? set --control or LOOKUP_CONTROL)",
                self.path.display()
            )
        })?;
        // A batch of a million changes takes seconds; a stuck agent should
        // not hang scripts forever.
        let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(300)));
        let frame = proto::encode(request).map_err(|e| e.to_string())?;
        proto::send_with_fds(stream.as_fd(), &frame, fds)
            .map_err(|e| format!("cannot send to lookupd at {}: {e}", self.path.display()))?;
        let mut len = [0u8; 4];
        stream
            .read_exact(&mut len)
            .map_err(|e| format!("no answer from lookupd at {}: {e}", self.path.display()))?;
        let len = u32::from_le_bytes(len) as usize;
        if len > proto::MAX_FRAME {
            return Err(format!("lookupd sent an oversized answer ({len} bytes)"));
        }
        let mut body = vec![0u8; len];
        stream
            .read_exact(&mut body)
            .map_err(|e| format!("truncated answer from lookupd: {e}"))?;
        match serde_json::from_slice(&body)
            .map_err(|e| format!("malformed answer from lookupd: {e}"))?
        {
            Response::Error { message } => Err(message),
            other => Ok(other),
        }
    }

    /// Sends a request that changes state and prints what it did.
    pub fn change(&self, request: &Request, fds: &[BorrowedFd<'_>]) -> Result<(), String> {
        match self.call(request, fds)? {
            Response::Done { messages } if self.json => {
                let text =
                    serde_json::to_string_pretty(&serde_json::json!({ "messages": messages }))
                        .map_err(|e| e.to_string())?;
                println!("{text}");
                Ok(())
            }
            Response::Done { messages } => {
                for m in messages {
                    println!("{m}");
                }
                Ok(())
            }
            other => Err(format!("unexpected answer from lookupd: {other:?}")),
        }
    }
}
