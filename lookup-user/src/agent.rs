//! `lookupd`: owns the dispatcher of one network namespace and serves the
//! control socket.

use std::{
    io,
    os::{
        fd::{AsFd, OwnedFd},
        unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::{
    io::{AsyncWriteExt as _, Interest},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
    sync::Mutex,
};
use tracing::{debug, error, info, warn};

use crate::{
    churn,
    dispatcher::{self, Dispatcher},
    error_chain,
    proto::{self, Request, Response},
};

/// How the agent is set up.
#[derive(Clone, Debug)]
pub struct Config {
    /// The network namespace to serve.
    pub netns: PathBuf,
    /// Where bpffs is mounted.
    pub bpffs: PathBuf,
    /// Path of the control socket.
    pub control: PathBuf,
    /// Merge concurrent requests into one batch (see [`crate::churn`]);
    /// off only to measure what merging gains.
    pub merge: bool,
}

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening or creating the dispatcher failed.
    #[error(transparent)]
    Dispatcher(#[from] dispatcher::Error),
    /// Another agent answers on the control socket.
    #[error("another lookupd is already listening on {0}")]
    ControlInUse(PathBuf),
    /// The control socket could not be set up.
    #[error("cannot listen on control socket {path}")]
    Control {
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] io::Error),
}

/// The dispatcher behind a fair (first come, first served) lock. Changes to
/// bindings go through the writer ([`crate::churn`]); reads, registrations
/// and the writer's steps take the lock in turn.
type Shared = Arc<Mutex<Dispatcher>>;

/// Control connections served at once.
const MAX_CLIENTS: usize = 256;

/// Runs the agent until SIGTERM or SIGINT. Steering stays in place after it
/// returns: everything the data plane needs is pinned.
pub async fn run(config: Config) -> Result<(), Error> {
    raise_fd_limit();
    // Check the control path first: a second agent for the same socket
    // must fail before it touches any namespace. It is bound only once the
    // dispatcher is ready, so a client that can connect is served.
    check_control(&config.control).await?;
    let dispatcher = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            Dispatcher::open_or_create(&config.netns, &config.bpffs)
        })
        .await
        .expect("dispatcher setup panicked")?
    };
    let listener = listen(&config.control).await?;
    let state_dir = dispatcher.location().dir.clone();
    let shared: Shared = Arc::new(Mutex::new(dispatcher));
    // Each client has at most one request in flight, so the queue never
    // holds more than MAX_CLIENTS.
    let (queue, writer) = churn::start(Arc::clone(&shared), MAX_CLIENTS, config.merge);

    let mut sigterm = signal(SignalKind::terminate()).map_err(Error::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(Error::Signals)?;
    info!(control = %config.control.display(), state = %state_dir.display(), "lookupd ready");
    notify_ready(&format!("serving {}", state_dir.display()));

    // At most this many clients at once; more wait in the listen backlog.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    // Requests read but not yet answered, so a stop can let answers out.
    let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        let next = async {
            let slot = Arc::clone(&slots)
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            (slot, listener.accept().await)
        };
        tokio::select! {
            (slot, accepted) = next => match accepted {
                Ok((stream, _)) => {
                    let shared = Arc::clone(&shared);
                    let queue = queue.clone();
                    let busy = Arc::clone(&busy);
                    tokio::spawn(async move {
                        let _slot = slot;
                        match serve(stream, shared, queue, busy).await {
                            Ok(()) | Err(proto::FrameError::Closed) => {}
                            Err(e) => debug!(error = %e, "control connection failed"),
                        }
                    });
                }
                Err(e) => {
                    // Out of descriptors, most likely: say so once in a while
                    // and let connections drain rather than spin.
                    warn!(error = %e, "accept on control socket failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            _ = sigterm.recv() => { info!("SIGTERM: stopping, steering stays in place"); break; }
            _ = sigint.recv() => { info!("SIGINT: stopping, steering stays in place"); break; }
        }
    }
    notify("STOPPING=1");
    // No new clients; changes already queued (a batch in progress too) are
    // finished, so a stop never leaves a batch half applied.
    drop(listener);
    let _ = std::fs::remove_file(&config.control);
    info!("finishing the changes already queued");
    writer.stop().await;
    // Let the answers to them reach their clients (briefly: a client that
    // does not read its answer does not hold the stop up).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    while busy.load(std::sync::atomic::Ordering::Acquire) > 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Fails if `path` is taken by a live agent or by something that is not a
/// socket; removes the socket file a killed agent left.
async fn check_control(path: &Path) -> Result<(), Error> {
    let control_err = |source| Error::Control {
        path: path.to_owned(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt as _;
        if !meta.file_type().is_socket() {
            return Err(Error::Control {
                path: path.to_owned(),
                source: io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is in the way; choose another --control path",
                ),
            });
        }
        if UnixStream::connect(path).await.is_ok() {
            return Err(Error::ControlInUse(path.to_owned()));
        }
        // A socket file left behind by an agent that was killed.
        std::fs::remove_file(path).map_err(control_err)?;
    }
    Ok(())
}

async fn listen(path: &Path) -> Result<UnixListener, Error> {
    let control_err = |source| Error::Control {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(control_err)?;
    }
    // A stale socket can appear between the check and here only if another
    // agent raced us for the same path; bind then fails with EADDRINUSE.
    let listener = UnixListener::bind(path).map_err(control_err)?;
    // Root only by default: whoever can talk to the agent can steer traffic.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(control_err)?;
    Ok(listener)
}

/// Counts a request as in flight while it lives.
struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl InFlight {
    fn new(busy: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        busy.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(Arc::clone(busy))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

async fn serve(
    mut stream: UnixStream,
    shared: Shared,
    queue: churn::Queue,
    busy: Arc<std::sync::atomic::AtomicUsize>,
) -> Result<(), proto::FrameError> {
    loop {
        // Read exactly one frame, header then body, never a byte beyond it:
        // the descriptors that arrive meanwhile are this frame's, even when
        // a client pipelines several frames.
        let mut frame_fds: Vec<OwnedFd> = Vec::new();
        let mut header = Vec::with_capacity(4);
        read_exact(&stream, &mut header, 4, &mut frame_fds).await?;
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if len > proto::MAX_FRAME {
            let refusal = proto::encode(&Response::Error {
                message: format!(
                    "request of {len} bytes exceeds the limit of {}",
                    proto::MAX_FRAME
                ),
            })?;
            stream.write_all(&refusal).await?;
            return Err(proto::FrameError::TooLarge(len));
        }
        let mut frame = Vec::with_capacity(len);
        read_exact(&stream, &mut frame, len, &mut frame_fds).await?;
        let _in_flight = InFlight::new(&busy);
        let response = respond(frame, frame_fds, &shared, &queue).await;
        // Answers that can be large (bindings, status) are encoded off the
        // async workers.
        let small = small_answer(&response);
        let encode = move || {
            proto::encode(&response).or_else(|e| {
                proto::encode(&Response::Error {
                    message: format!("the answer could not be sent: {e}"),
                })
            })
        };
        let frame = if small {
            encode()
        } else {
            offload(encode).await.unwrap_or_else(|e| proto::encode(&e))
        }?;
        stream.write_all(&frame).await?;
    }
}

/// Frames and batches up to this size are decoded and parsed on the async
/// workers; larger ones (a batch can be tens of MiB) on blocking threads,
/// so the workers stay free to serve other clients.
const INLINE_BYTES: usize = 64 * 1024;

fn small_answer(response: &Response) -> bool {
    matches!(response, Response::Done { .. } | Response::Error { .. })
}

/// Runs `f` on a blocking thread; a panic becomes an error answer.
async fn offload<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Response> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        error!(error = %e, "request handler panicked");
        Response::Error {
            message: "internal error: the request handler panicked".into(),
        }
    })
}

/// Decodes and answers one request. Changes to bindings go to the writer's
/// queue, without holding a thread while they wait; everything else that
/// needs the state runs on a blocking thread.
async fn respond(
    frame: Vec<u8>,
    fds: Vec<OwnedFd>,
    shared: &Shared,
    queue: &churn::Queue,
) -> Response {
    let inline = frame.len() <= INLINE_BYTES;
    let decode = move || serde_json::from_slice::<Request>(&frame);
    let decoded = if inline {
        decode()
    } else {
        match offload(decode).await {
            Ok(decoded) => decoded,
            Err(answer) => return answer,
        }
    };
    let request = match decoded {
        Ok(request) => request,
        Err(e) => {
            return Response::Error {
                message: format!("malformed request: {e}"),
            };
        }
    };
    match request {
        Request::Bind { binding } => queue.submit(churn::Changes::Bind(binding)).await,
        Request::Unbind { binding } => queue.submit(churn::Changes::Unbind(binding)).await,
        Request::Apply { lines } => {
            let prepared = if lines.len() <= INLINE_BYTES {
                prepare_batch(lines)
            } else {
                match offload(move || prepare_batch(lines)).await {
                    Ok(prepared) => prepared,
                    Err(answer) => return answer,
                }
            };
            match prepared {
                Ok(changes) => queue.submit(changes).await,
                Err(answer) => answer,
            }
        }
        other => {
            let shared = Arc::clone(shared);
            offload(move || handle(&shared, other, fds))
                .await
                .unwrap_or_else(|answer| answer)
        }
    }
}

/// Parses a batch, and sorts it if it is large (see [`churn::is_large`]).
fn prepare_batch(lines: String) -> Result<churn::Changes, Response> {
    let started = std::time::Instant::now();
    let parsed = crate::batch::parse(&lines);
    drop(lines);
    match parsed {
        Ok(mut batch) => {
            if churn::is_large(batch.changes.len()) {
                batch.sort();
                info!(
                    changes = batch.changes.len(),
                    parse_ms = started.elapsed().as_millis() as u64,
                    "batch parsed"
                );
            }
            Ok(churn::Changes::Apply(batch))
        }
        Err(e) => {
            warn!(error = %e, "batch refused");
            Err(Response::Error {
                message: e.to_string(),
            })
        }
    }
}

async fn read_exact(
    stream: &UnixStream,
    buf: &mut Vec<u8>,
    want: usize,
    fds: &mut Vec<OwnedFd>,
) -> Result<(), proto::FrameError> {
    while buf.len() < want {
        let max = want - buf.len();
        let n = stream
            .async_io(Interest::READABLE, || {
                proto::recv_with_fds(stream.as_fd(), buf, fds, max)
            })
            .await?;
        if n == 0 {
            return Err(proto::FrameError::Closed);
        }
    }
    Ok(())
}

/// Answers a request that is not a change to bindings (those go through
/// [`churn`]). Every refusal leaves the state as it was. Blocks on the lock.
pub fn handle(shared: &Mutex<Dispatcher>, request: Request, fds: Vec<OwnedFd>) -> Response {
    let fail = |e: dispatcher::Error| {
        warn!(error = %error_chain(&e), "request refused");
        Response::Error {
            message: error_chain(&e),
        }
    };
    let done = |messages: Vec<String>| {
        for m in &messages {
            info!("{m}");
        }
        Response::Done { messages }
    };
    match request {
        Request::Bind { .. } | Request::Unbind { .. } | Request::Apply { .. } => Response::Error {
            message: "internal error: a change to bindings bypassed the writer".into(),
        },
        Request::Bindings => Response::Bindings {
            bindings: shared.blocking_lock().bindings(),
        },
        Request::Register { .. } if fds.len() > proto::MAX_FDS => Response::Error {
            message: format!(
                "{} sockets in one request: at most {} can be registered at once",
                fds.len(),
                proto::MAX_FDS
            ),
        },
        Request::Register { label, names } => {
            let sockets = fds
                .into_iter()
                .enumerate()
                .map(|(i, fd)| {
                    let name = names
                        .get(i)
                        .cloned()
                        .unwrap_or_else(|| format!("socket #{}", i + 1));
                    (fd, name)
                })
                .collect();
            shared
                .blocking_lock()
                .register(&label, sockets)
                .map(done)
                .unwrap_or_else(fail)
        }
        Request::Unregister {
            label,
            family,
            protocol,
        } => shared
            .blocking_lock()
            .unregister(&label, family, protocol)
            .map(|m| done(vec![m]))
            .unwrap_or_else(fail),
        Request::Status { label } => shared
            .blocking_lock()
            .status(label.as_ref())
            .map(Response::Status)
            .unwrap_or_else(fail),
    }
}

/// Raises the soft descriptor limit to the hard one: every control
/// connection and every socket in flight takes a descriptor.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Sends a state line to systemd's `NOTIFY_SOCKET`, if there is one.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send_notify(&path, state) {
        warn!(error = %e, "sd_notify failed");
    }
}

fn send_notify(path: &std::ffi::OsStr, state: &str) -> io::Result<()> {
    use std::os::unix::{
        ffi::OsStrExt as _,
        net::{SocketAddr, UnixDatagram},
    };
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    let addr = match bytes.first() {
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt as _;
            SocketAddr::from_abstract_name(&bytes[1..])?
        }
        _ => SocketAddr::from_pathname(path)?,
    };
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

fn notify_ready(status: &str) {
    notify(&format!(
        "READY=1\nSTATUS={status}\nMAINPID={}",
        std::process::id()
    ));
}
