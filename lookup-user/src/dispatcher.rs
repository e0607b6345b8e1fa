//! The pinned BPF state of one network namespace and every change to it.
//!
//! Layout under `<bpffs>/lookup/<netns inode>/`: `program`, `link` and one
//! pin per map (named as in [`lookup_common::map_names`]). A new state is
//! built in a temporary directory next to it and renamed into place, so a
//! crash leaves either nothing or a complete state. The pinned maps are the
//! only source of truth: the agent's in-memory index is rebuilt from them
//! when it starts.

use std::{
    collections::HashMap as StdHashMap,
    fs::{self, File},
    io,
    os::{
        fd::{AsFd, OwnedFd},
        unix::fs::{DirBuilderExt as _, MetadataExt as _},
    },
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuValues, lpm_trie},
    programs::{ProgramError, SkLookup, links::FdLink},
    util::nr_cpus,
};
use lookup_common::{
    BindingKey, DestinationMetrics, DestinationRecord, HostValue, KEY_HEADER_BITS, LAYOUT_VERSION,
    MAGIC, MAX_DESTINATIONS, MAX_LABEL_LEN, Meta, PROGRAM_NAME, PortKey, PrefixKey, PrefixValue,
    map_names,
};
use nix::fcntl::{Flock, FlockArg};
use tracing::{debug, info, warn};

use crate::{
    binding::{Binding, Family, Label, Protocol, Selector},
    hosts::{HostIndex, HostOp},
    proto::{DestinationStatus, Metrics, Status},
    socket::{self, SocketInfo},
    sys,
    table::{Op, Tables},
};

/// Host entries written in one step from which the write is split across
/// two threads.
const PARALLEL_HOST_WRITES: usize = 4096;

/// The dispatcher object, built by `lookup-user/build.rs`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lookup"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const PROGRAM_PIN: &str = "program";
const LINK_PIN: &str = "link";
/// `BPF_SK_LOOKUP` attach type.
const BPF_SK_LOOKUP: u32 = 36;

/// Errors of the dispatcher. Messages name the input and, where there is
/// one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--bpffs` is not a mounted bpffs.
    #[error("{0} is not a bpf filesystem: mount one with `mount -t bpf bpf {0}`")]
    NotBpffs(PathBuf),
    /// The network namespace file cannot be used.
    #[error("cannot open network namespace {path}")]
    Netns {
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// This build has no dispatcher object.
    #[error("this build carries no eBPF object: run `cargo xtask setup` and rebuild")]
    NoObject,
    /// Another agent holds the state.
    #[error("another lookupd already manages {0}")]
    Locked(PathBuf),
    /// The pinned state is not ours or of another layout.
    #[error(
        "pinned state at {path} is incompatible: {reason}; remove it with `rm -r {path}` (steering in that namespace stops) and start again"
    )]
    Incompatible {
        /// The state directory.
        path: PathBuf,
        /// What does not match.
        reason: String,
    },
    /// A filesystem or bpf call failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// aya failed to load or attach the program.
    #[error("{what}")]
    Program {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: ProgramError,
    },
    /// aya failed on a map.
    #[error("{what}")]
    Map {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: MapError,
    },
    /// aya failed to load the object.
    #[error("loading the eBPF object failed")]
    Load(#[source] Box<aya::EbpfError>),
    /// `unbind` of something not bound.
    #[error("no binding {0}")]
    NoSuchBinding(Selector),
    /// `unbind` naming the wrong label.
    #[error("binding {selector} belongs to label {actual:?}, not {given:?}")]
    LabelMismatch {
        /// The selector.
        selector: Selector,
        /// Its label.
        actual: String,
        /// The label given.
        given: String,
    },
    /// A binding table is full.
    #[error("cannot add {0}: the binding table is full")]
    TableFull(Selector),
    /// No free destination id.
    #[error(
        "cannot add destination {label} {family} {protocol}: all {MAX_DESTINATIONS} destinations are in use"
    )]
    DestinationsFull {
        /// Label.
        label: Label,
        /// Family.
        family: Family,
        /// Protocol.
        protocol: Protocol,
    },
    /// A socket offered for registration is not acceptable.
    #[error("{name}: {source}")]
    BadSocket {
        /// Which socket.
        name: String,
        /// Why.
        #[source]
        source: socket::SocketError,
    },
    /// A socket lives in another network namespace.
    #[error("{name}: socket {addr} is in another network namespace than the one lookupd serves")]
    ForeignNetns {
        /// Which socket.
        name: String,
        /// Its address.
        addr: std::net::SocketAddr,
    },
    /// Two different sockets for one destination.
    #[error(
        "{first} and {second} are both {family} {protocol} sockets for label {label} but not one SO_REUSEPORT group: register one socket per label, family and protocol"
    )]
    DuplicateSockets {
        /// Label.
        label: Label,
        /// Family.
        family: Family,
        /// Protocol.
        protocol: Protocol,
        /// First socket.
        first: String,
        /// Second socket.
        second: String,
    },
    /// A change in a batch was refused; nothing was applied.
    #[error("line {line}: {source}")]
    Batch {
        /// Line of the change.
        line: u32,
        /// Why.
        #[source]
        source: Box<Error>,
    },
    /// A batch would overfill a table; nothing was applied.
    #[error("the batch would hold more than {limit} {what}")]
    BatchTooLarge {
        /// Which table.
        what: &'static str,
        /// Its size.
        limit: usize,
    },
    /// The pinned state was removed while the agent ran.
    #[error(
        "the pinned state at {0} was removed while lookupd ran, so nothing is steered: restart lookupd to attach a new one"
    )]
    StateGone(PathBuf),
    /// `status` of a label that has neither bindings nor sockets.
    #[error("unknown label {0:?}: no bindings and no registered sockets")]
    UnknownLabel(String),
    /// `register` without sockets.
    #[error("no sockets to register")]
    NoSockets,
    /// `unregister` of a destination without a socket.
    #[error("label {label} has no registered {family} {protocol} socket")]
    NotRegistered {
        /// Label.
        label: Label,
        /// Family.
        family: Family,
        /// Protocol.
        protocol: Protocol,
    },
}

type Result<T, E = Error> = std::result::Result<T, E>;

fn is_full(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(s)
        if matches!(s.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC | libc::ENOMEM)))
}

fn is_missing(e: &MapError) -> bool {
    matches!(e, MapError::KeyNotFound)
        || matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT))
}

fn full_or(e: MapError, selector: &Selector) -> Error {
    if is_full(&e) {
        Error::TableFull(*selector)
    } else {
        Error::Map {
            what: format!("cannot write binding {selector}"),
            source: e,
        }
    }
}

fn table_error(e: MapError, op: &Op) -> Error {
    Error::Map {
        what: format!("cannot apply {op:?}"),
        source: e,
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

fn map_err(what: impl Into<String>) -> impl FnOnce(MapError) -> Error {
    let what = what.into();
    move |source| Error::Map { what, source }
}

fn prog_err(what: impl Into<String>) -> impl FnOnce(ProgramError) -> Error {
    let what = what.into();
    move |source| Error::Program { what, source }
}

/// A destination: a label in one family and protocol.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Destination {
    /// Label.
    pub label: Label,
    /// Family.
    pub family: Family,
    /// Protocol.
    pub protocol: Protocol,
}

impl Destination {
    fn record(&self) -> DestinationRecord {
        let mut label = [0u8; MAX_LABEL_LEN + 1];
        let bytes = self.label.as_str().as_bytes();
        label[..bytes.len()].copy_from_slice(bytes);
        DestinationRecord {
            in_use: 1,
            family: self.family.number(),
            protocol: self.protocol.number(),
            label_len: bytes.len() as u8,
            label,
        }
    }

    fn from_record(r: &DestinationRecord) -> Option<Self> {
        if r.in_use != 1 {
            return None;
        }
        let label = std::str::from_utf8(&r.label[..usize::from(r.label_len)]).ok()?;
        Some(Self {
            label: Label::from_stored(label)?,
            family: Family::from_number(r.family)?,
            protocol: Protocol::from_number(r.protocol)?,
        })
    }
}

/// What a selector is bound to while a batch is folded over it: the
/// current binding's destination, or a label of the batch. Compared by
/// name, never cloned: a batch can hold a million changes.
#[derive(Clone, Copy, PartialEq)]
enum Bound {
    Nothing,
    Now(u32),
    Batch(u32),
}

fn name_of<'a>(b: Bound, this: &'a Dispatcher, labels: &'a [Label]) -> Option<&'a str> {
    match b {
        Bound::Nothing => None,
        Bound::Now(id) => this.destination(id).map(|d| d.label.as_str()),
        Bound::Batch(l) => Some(labels[l as usize].as_str()),
    }
}

/// A batch being checked: its changes in precedence order and the net
/// effect found so far.
#[derive(Debug)]
pub struct BatchCheck {
    batch: crate::batch::Batch,
    total: usize,
    next: usize,
    /// Net change per binding: the label it gets, the destination (and its
    /// generation) it had when checked, and whether it adds a host.
    net: Vec<NetChange>,
    /// The refused change with the earliest line so far: changes are
    /// checked in precedence order, and the error names the first bad line
    /// of the input.
    refused: Option<(u32, Error)>,
}

/// The net change a batch makes to one binding.
#[derive(Debug, Clone, Copy)]
struct NetChange {
    selector: Selector,
    /// The label (index into the batch's) it gets, or `None`: removed.
    label: Option<u32>,
    /// The destination it had when checked, and that id's generation.
    from: Option<(u32, u64)>,
    /// Adds a host binding where there was none: takes a reserved slot.
    new_host: bool,
}

/// A checked batch, ready to apply in chunks: its net changes in a safe
/// order, with destination ids resolved and held until it is finished.
#[derive(Debug)]
pub struct BatchPlan {
    total: usize,
    changes: Vec<(Selector, Option<u32>)>,
    /// For each removal, the destination (and generation) it was checked
    /// against: it is applied only if the binding still has it (see
    /// [`Dispatcher::apply_chunk`]).
    removing: rustc_hash::FxHashMap<Selector, (u32, u64)>,
    /// Which of `changes` add a host that was not there when checked: each
    /// holds a reserved slot in the host table until it is applied.
    new_host: Vec<bool>,
    /// Host entries this batch will still add, reserved in the table.
    reserved: usize,
    pins: Vec<u32>,
    done: usize,
    counts: (usize, usize, usize),
}

impl BatchPlan {
    /// Whether every change has been applied.
    pub fn is_done(&self) -> bool {
        self.done >= self.changes.len()
    }

    /// Whether the next change is to a host binding (a cheap one) rather
    /// than a wider one (whose cost grows with the prefixes below it), and
    /// how many changes of that kind follow, up to `max`.
    pub fn next_run(&self, max: usize) -> (bool, usize) {
        let rest = &self.changes[self.done.min(self.changes.len())..];
        let host = rest.first().is_none_or(|(s, _)| s.prefix.is_host());
        let n = rest
            .iter()
            .take(max.max(1))
            .take_while(|(s, _)| s.prefix.is_host() == host)
            .count();
        (host, n)
    }
}

/// Where the state of a network namespace lives.
#[derive(Clone, Debug)]
pub struct Location {
    /// `<bpffs>/lookup/<netns inode>`.
    pub dir: PathBuf,
    /// Inode of the network namespace.
    pub netns_ino: u64,
}

impl Location {
    /// Checks `bpffs` and resolves the namespace at `netns`.
    pub fn resolve(netns: &Path, bpffs: &Path) -> Result<(Self, File)> {
        let st = nix::sys::statfs::statfs(bpffs).map_err(|e| Error::Io {
            what: format!("cannot inspect bpffs {}", bpffs.display()),
            source: e.into(),
        })?;
        if st.filesystem_type().0 as i64 != BPF_FS_MAGIC {
            return Err(Error::NotBpffs(bpffs.to_owned()));
        }
        let ns = File::open(netns).map_err(|source| Error::Netns {
            path: netns.to_owned(),
            source,
        })?;
        const NSFS_MAGIC: i64 = 0x6e73_6673;
        let is_ns =
            nix::sys::statfs::fstatfs(&ns).is_ok_and(|st| st.filesystem_type().0 == NSFS_MAGIC);
        if !is_ns {
            return Err(Error::Netns {
                path: netns.to_owned(),
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not a network namespace (expected e.g. /proc/<pid>/ns/net or /run/netns/<name>)",
                ),
            });
        }
        let netns_ino = ns.metadata().map_err(io_err("stat netns"))?.ino();
        Ok((
            Self {
                dir: bpffs.join("lookup").join(netns_ino.to_string()),
                netns_ino,
            },
            ns,
        ))
    }
}

/// The state of one network namespace, opened for writing by one agent.
pub struct Dispatcher {
    location: Location,
    // Held for the agent's lifetime: one writer per namespace.
    _lock: Flock<File>,
    hosts: HashMap<MapData, BindingKey, HostValue>,
    host_ports: HashMap<MapData, BindingKey, u32>,
    // The same maps, for the batched syscalls aya does not wrap.
    hosts_fd: OwnedFd,
    host_ports_fd: OwnedFd,
    host_index: HostIndex,
    // The wide tables' maps again, for batched writes.
    prefixes_fd: OwnedFd,
    ports_fd: OwnedFd,
    wide_fd: OwnedFd,
    prefixes: LpmTrie<MapData, BindingKey, PrefixValue>,
    ports: HashMap<MapData, PortKey, u32>,
    wide: HashMap<MapData, PrefixKey, u32>,
    sockets: MapData,
    metrics: PerCpuArray<MapData, DestinationMetrics>,
    records: Array<MapData, DestinationRecord>,
    // Keys come from the root-only control socket, so a fast hash without
    // flood resistance is the right trade at a million entries.
    bindings: rustc_hash::FxHashMap<Selector, u32>,
    /// Host entries that batches in progress have yet to add: room kept in
    /// the host table, so a request served between a batch's steps cannot
    /// fill it and leave the batch half applied.
    reserved_hosts: usize,
    tables: Tables,
    destinations: Vec<Option<Destination>>,
    by_destination: StdHashMap<Destination, u32>,
    refcount: Vec<u32>,
    /// Bumped each time an id is given to a destination: an id checked
    /// earlier names the same destination only if its generation is the same.
    generation: Vec<u64>,
}

fn lock(file: File, path: &Path, arg: nix::fcntl::FlockArg) -> Result<Flock<File>> {
    Flock::lock(file, arg).map_err(|(_, e)| {
        if e == nix::errno::Errno::EWOULDBLOCK {
            Error::Locked(path.to_owned())
        } else {
            Error::Io {
                what: format!("cannot lock {}", path.display()),
                source: e.into(),
            }
        }
    })
}

/// Loads the object with its maps pinned in (or reused from) `dir`.
fn load_object(dir: &Path) -> Result<Ebpf> {
    EbpfLoader::new()
        .default_map_pin_directory(dir)
        .load(EBPF_OBJECT)
        .map_err(|e| Error::Load(Box::new(e)))
}

/// Loads the dispatcher program into the kernel (the verifier runs here).
fn load_program(ebpf: &mut Ebpf) -> Result<&mut SkLookup> {
    let prog: &mut SkLookup = ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or_else(|| Error::Io {
            what: format!("eBPF object has no program {PROGRAM_NAME}"),
            source: io::ErrorKind::NotFound.into(),
        })?
        .try_into()
        .map_err(prog_err("dispatcher program is not sk_lookup"))?;
    prog.load()
        .map_err(prog_err("the verifier rejected the dispatcher"))?;
    Ok(prog)
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<Map> {
    ebpf.take_map(name).ok_or_else(|| Error::Io {
        what: format!("eBPF object has no map {name}"),
        source: io::ErrorKind::NotFound.into(),
    })
}

fn open_map(dir: &Path, name: &str) -> Result<Map> {
    let path = dir.join(name);
    let data =
        MapData::from_pin(&path).map_err(map_err(format!("cannot open {}", path.display())))?;
    Map::from_map_data(data).map_err(map_err(format!("cannot use {}", path.display())))
}

struct Maps {
    hosts: HashMap<MapData, BindingKey, HostValue>,
    host_ports: HashMap<MapData, BindingKey, u32>,
    prefixes: LpmTrie<MapData, BindingKey, PrefixValue>,
    ports: HashMap<MapData, PortKey, u32>,
    wide: HashMap<MapData, PrefixKey, u32>,
    sockets: MapData,
    metrics: PerCpuArray<MapData, DestinationMetrics>,
    records: Array<MapData, DestinationRecord>,
    meta: Array<MapData, Meta>,
}

impl Maps {
    fn from(mut get: impl FnMut(&str) -> Result<Map>) -> Result<Self> {
        // Each map, converted to its typed wrapper.
        fn typed<T: TryFrom<Map, Error = MapError>>(
            get: &mut impl FnMut(&str) -> Result<Map>,
            name: &str,
        ) -> Result<T> {
            get(name)?.try_into().map_err(map_err(format!(
                "map {name} has an unexpected type or size"
            )))
        }
        let sockets = match get(map_names::SOCKETS)? {
            Map::SockMap(data) => data,
            _ => {
                return Err(Error::Io {
                    what: format!("map {} is not a sockmap", map_names::SOCKETS),
                    source: io::ErrorKind::InvalidData.into(),
                });
            }
        };
        Ok(Self {
            hosts: typed(&mut get, map_names::HOSTS)?,
            host_ports: typed(&mut get, map_names::HOST_PORTS)?,
            prefixes: typed(&mut get, map_names::PREFIXES)?,
            ports: typed(&mut get, map_names::PORTS)?,
            wide: typed(&mut get, map_names::WIDE)?,
            sockets,
            metrics: typed(&mut get, map_names::METRICS)?,
            records: typed(&mut get, map_names::DESTINATIONS)?,
            meta: typed(&mut get, map_names::META)?,
        })
    }
}

fn expected_meta() -> Meta {
    Meta {
        magic: MAGIC,
        layout_version: LAYOUT_VERSION,
        _pad: 0,
    }
}

impl Dispatcher {
    /// Opens the state of the namespace at `netns` under `bpffs`, creating
    /// and attaching it if there is none. An existing state is verified and
    /// reused as it is; if its program differs from this build's, the link
    /// is switched to this build's program in place, keeping every map.
    pub fn open_or_create(netns: &Path, bpffs: &Path) -> Result<Self> {
        if EBPF_OBJECT.is_empty() {
            return Err(Error::NoObject);
        }
        let (location, ns) = Location::resolve(netns, bpffs)?;
        let base = location
            .dir
            .parent()
            .expect("state dir has a parent")
            .to_owned();
        fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(&base)
            .map_err(io_err(format!("cannot create {}", base.display())))?;
        // Creation is serialised on the base directory; each state directory
        // then carries its agent's lock.
        let base_lock =
            File::open(&base).map_err(io_err(format!("cannot open {}", base.display())))?;
        let base_lock = lock(base_lock, &base, FlockArg::LockExclusive)?;
        Self::remove_leftovers(&location, &base)?;
        if !location.dir.exists() {
            Self::create(&location, &base, &ns)?;
        }
        let dir_file = File::open(&location.dir)
            .map_err(io_err(format!("cannot open {}", location.dir.display())))?;
        let lock = lock(dir_file, &location.dir, FlockArg::LockExclusiveNonblock)?;
        drop(base_lock);
        let d = Self::open(location, lock)?;
        d.warn_about_other_programs(&ns);
        Ok(d)
    }

    /// Under the base lock: removes half-built states that a crashed agent
    /// left (their links would stay attached), and a state whose namespace
    /// died and whose inode number the kernel has since given to ours.
    fn remove_leftovers(location: &Location, base: &Path) -> Result<()> {
        let prefix = format!("tmp-{}-", location.netns_ino);
        if let Ok(entries) = fs::read_dir(base) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                if name.to_string_lossy().starts_with(&prefix) {
                    warn!(dir = %entry.path().display(), "removing a state a crashed lookupd left half built");
                    fs::remove_dir_all(entry.path())
                        .map_err(io_err(format!("cannot remove {}", entry.path().display())))?;
                }
            }
        }
        if !location.dir.exists() {
            return Ok(());
        }
        let Ok(link) = sys::obj_get(&location.dir.join(LINK_PIN)) else {
            return Ok(());
        };
        // A link whose namespace is gone reads inode 0: that state steers
        // nothing and belongs to no one.
        if sys::netns_link_info(link.as_fd()).is_ok_and(|info| info.netns_ino == 0) {
            warn!(dir = %location.dir.display(), "removing the state of a network namespace that no longer exists");
            fs::remove_dir_all(&location.dir)
                .map_err(io_err(format!("cannot remove {}", location.dir.display())))?;
        }
        Ok(())
    }

    fn create(location: &Location, base: &Path, ns: &File) -> Result<()> {
        let tmp = base.join(format!("tmp-{}-{}", location.netns_ino, std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io_err(format!("cannot remove {}", tmp.display())))?;
        }
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(io_err(format!("cannot create {}", tmp.display())))?;
        let built = Self::build(&tmp, ns).and_then(|()| {
            fs::rename(&tmp, &location.dir).map_err(io_err(format!(
                "cannot move {} to {}",
                tmp.display(),
                location.dir.display()
            )))
        });
        if built.is_err() {
            // Unpinning the link detaches the half-built dispatcher.
            let _ = fs::remove_dir_all(&tmp);
        }
        built?;
        info!(dir = %location.dir.display(), "created and attached dispatcher");
        Ok(())
    }

    fn build(dir: &Path, ns: &File) -> Result<()> {
        let mut ebpf = load_object(dir)?;
        let mut maps = Maps::from(|name| take_map(&mut ebpf, name))?;
        maps.meta
            .set(0, expected_meta(), 0)
            .map_err(map_err("cannot write the state's metadata"))?;
        let prog = load_program(&mut ebpf)?;
        prog.pin(dir.join(PROGRAM_PIN)).map_err(|e| Error::Io {
            what: "cannot pin the program".into(),
            source: io::Error::other(e),
        })?;
        let link_id = prog.attach(ns.as_fd()).map_err(prog_err(
            "cannot attach the dispatcher to the network namespace",
        ))?;
        let link: FdLink = prog
            .take_link(link_id)
            .map_err(prog_err("cannot take the link"))?
            .into();
        link.pin(dir.join(LINK_PIN)).map_err(|e| Error::Io {
            what: "cannot pin the link".into(),
            source: io::Error::other(e),
        })?;
        Ok(())
    }

    fn open(location: Location, lock: Flock<File>) -> Result<Self> {
        let dir = location.dir.clone();
        let incompatible = |reason: String| Error::Incompatible {
            path: dir.clone(),
            reason,
        };
        // Check the metadata before anything trusts the other maps' layout.
        let meta_map: Array<MapData, Meta> = open_map(&dir, map_names::META)?
            .try_into()
            .map_err(|e| incompatible(format!("{} has another layout ({e})", map_names::META)))?;
        let meta = meta_map
            .get(&0, 0)
            .map_err(map_err("cannot read the state's metadata"))?;
        if meta.magic != MAGIC {
            return Err(incompatible("it was not created by lookupd".into()));
        }
        if meta.layout_version != LAYOUT_VERSION {
            return Err(incompatible(format!(
                "its map layout is version {}, this lookupd uses {LAYOUT_VERSION}",
                meta.layout_version
            )));
        }
        let maps = Maps::from(|name| open_map(&dir, name))?;

        let link_fd =
            sys::obj_get(&dir.join(LINK_PIN)).map_err(io_err("cannot open the pinned link"))?;
        let link = sys::netns_link_info(link_fd.as_fd())
            .map_err(io_err("cannot inspect the pinned link"))?;
        if link.attach_type != BPF_SK_LOOKUP {
            return Err(incompatible(
                "the pinned link is not an sk_lookup link".into(),
            ));
        }
        if u64::from(link.netns_ino) != location.netns_ino {
            return Err(incompatible(format!(
                "its link is attached to network namespace {}, not {} (a namespace that no longer exists reads 0)",
                link.netns_ino, location.netns_ino
            )));
        }
        Self::repin_linked_program(&dir, link.prog_id)?;
        let pinned = SkLookup::from_pin(dir.join(PROGRAM_PIN))
            .map_err(prog_err("cannot open the pinned program"))?;
        let pinned_info = pinned
            .info()
            .map_err(prog_err("cannot inspect the pinned program"))?;
        if pinned_info.id() != link.prog_id {
            return Err(incompatible(format!(
                "the link runs program {} but the pinned program is {}",
                link.prog_id,
                pinned_info.id()
            )));
        }
        Self::upgrade_if_needed(&dir, &link_fd, &pinned, pinned_info.tag())?;

        let mut d = Self {
            location,
            _lock: lock,
            hosts: maps.hosts,
            host_ports: maps.host_ports,
            hosts_fd: sys::obj_get(&dir.join(map_names::HOSTS))
                .map_err(io_err("cannot open the host table"))?,
            host_ports_fd: sys::obj_get(&dir.join(map_names::HOST_PORTS))
                .map_err(io_err("cannot open the host port table"))?,
            host_index: HostIndex::default(),
            prefixes_fd: sys::obj_get(&dir.join(map_names::PREFIXES))
                .map_err(io_err("cannot open the prefix trie"))?,
            ports_fd: sys::obj_get(&dir.join(map_names::PORTS))
                .map_err(io_err("cannot open the port tables"))?,
            wide_fd: sys::obj_get(&dir.join(map_names::WIDE))
                .map_err(io_err("cannot open the wide bindings"))?,
            prefixes: maps.prefixes,
            ports: maps.ports,
            wide: maps.wide,
            tables: Tables::new(),
            sockets: maps.sockets,
            metrics: maps.metrics,
            records: maps.records,
            bindings: rustc_hash::FxHashMap::default(),
            reserved_hosts: 0,
            destinations: vec![None; MAX_DESTINATIONS as usize],
            by_destination: StdHashMap::new(),
            refcount: vec![0; MAX_DESTINATIONS as usize],
            generation: vec![0; MAX_DESTINATIONS as usize],
        };
        d.reload()?;
        info!(
            dir = %d.location.dir.display(),
            bindings = d.binding_count(),
            destinations = d.by_destination.len(),
            "opened dispatcher"
        );
        Ok(d)
    }

    /// The link is the truth about which program runs. An agent killed in
    /// the middle of an upgrade can leave `program` naming the old one (and
    /// `program-new` the new): pin whatever the link runs as `program`.
    fn repin_linked_program(dir: &Path, linked: u32) -> Result<()> {
        let staged = dir.join("program-new");
        let pinned_id = |path: &Path| {
            SkLookup::from_pin(path)
                .ok()
                .and_then(|p| p.info().ok().map(|i| i.id()))
        };
        if pinned_id(&dir.join(PROGRAM_PIN)) == Some(linked) {
            let _ = fs::remove_file(&staged);
            return Ok(());
        }
        if pinned_id(&staged) == Some(linked) {
            fs::rename(&staged, dir.join(PROGRAM_PIN))
                .map_err(io_err("cannot finish an interrupted upgrade"))?;
        } else {
            let _ = fs::remove_file(&staged);
            let fd = sys::prog_fd_by_id(linked).map_err(io_err(format!(
                "cannot open program {linked} that the link runs"
            )))?;
            sys::obj_pin(fd.as_fd(), &staged).map_err(io_err("cannot pin the linked program"))?;
            fs::rename(&staged, dir.join(PROGRAM_PIN))
                .map_err(io_err("cannot pin the linked program"))?;
        }
        warn!(
            program = linked,
            "re-pinned the program the link runs (an upgrade was interrupted)"
        );
        Ok(())
    }

    /// Loads this build's program against the pinned maps; if its tag differs
    /// from the running one, swaps it into the link atomically.
    fn upgrade_if_needed(
        dir: &Path,
        link: &OwnedFd,
        pinned: &SkLookup,
        pinned_tag: u64,
    ) -> Result<()> {
        let mut ebpf = load_object(dir)?;
        let prog = load_program(&mut ebpf)?;
        let new_tag = prog
            .info()
            .map_err(prog_err("cannot inspect the new program"))?
            .tag();
        if new_tag == pinned_tag {
            return Ok(());
        }
        let staged = dir.join("program-new");
        let _ = fs::remove_file(&staged);
        prog.pin(&staged).map_err(|e| Error::Io {
            what: "cannot pin the new program".into(),
            source: io::Error::other(e),
        })?;
        let new_fd = prog.fd().map_err(prog_err("new program has no fd"))?;
        let old_fd = pinned.fd().map_err(prog_err("pinned program has no fd"))?;
        if let Err(e) = sys::link_update(link.as_fd(), new_fd.as_fd(), old_fd.as_fd()) {
            let _ = fs::remove_file(&staged);
            return Err(Error::Io {
                what: "cannot switch the link to the new program".into(),
                source: e,
            });
        }
        fs::rename(&staged, dir.join(PROGRAM_PIN)).map_err(io_err("cannot re-pin the program"))?;
        info!(
            old_tag = format!("{pinned_tag:016x}"),
            new_tag = format!("{new_tag:016x}"),
            "upgraded dispatcher program in place"
        );
        Ok(())
    }

    /// Rebuilds the in-memory index from the pinned maps.
    fn reload(&mut self) -> Result<()> {
        for id in 0..MAX_DESTINATIONS {
            let record = self
                .records
                .get(&id, 0)
                .map_err(map_err("cannot read destinations"))?;
            if let Some(dest) = Destination::from_record(&record) {
                self.by_destination.insert(dest.clone(), id);
                self.destinations[id as usize] = Some(dest);
            }
        }
        let mut entries = Vec::new();
        for entry in self.hosts.iter() {
            entries.push(entry.map_err(map_err("cannot read host bindings"))?);
        }
        let mut extra = Vec::new();
        for entry in self.host_ports.iter() {
            extra.push(entry.map_err(map_err("cannot read host port bindings"))?);
        }
        self.host_index = HostIndex::restore(entries, extra);
        let mut found = Vec::new();
        for (key, destination) in self.host_index.iter() {
            let len = if key.family == lookup_common::FAMILY_V4 {
                32
            } else {
                128
            };
            found.push((key, len, destination));
        }
        let mut wide = Vec::new();
        for entry in self.wide.iter() {
            let (k, destination) = entry.map_err(map_err("cannot read wide bindings"))?;
            found.push((k.key, k.prefix_len, destination));
            if let Ok(len) = u8::try_from(k.prefix_len) {
                wide.push((k.key, len, destination));
            }
        }
        for (key, prefix_len, destination) in found {
            let Some(selector) = u8::try_from(prefix_len)
                .ok()
                .and_then(|len| Selector::from_key(&key, len))
            else {
                warn!(
                    ?key,
                    prefix_len, "ignoring a malformed binding in the pinned maps"
                );
                continue;
            };
            if destination >= MAX_DESTINATIONS {
                warn!(%selector, id = destination, "ignoring a binding with an out-of-range destination");
                continue;
            }
            if self.destination(destination).is_none() {
                warn!(%selector, id = destination, "binding points at an unknown destination");
            }
            if !selector.prefix.is_host() {
                self.bindings.insert(selector, destination);
            }
            if let Some(rc) = self.refcount.get_mut(destination as usize) {
                *rc += 1;
            }
        }
        let mut trie = Vec::new();
        for entry in self.prefixes.iter() {
            let (key, value) = entry.map_err(map_err("cannot read the prefix trie"))?;
            let len = key.prefix_len().saturating_sub(KEY_HEADER_BITS);
            trie.push((key.data(), len as u8, value));
        }
        let mut ports = Vec::new();
        for entry in self.ports.iter() {
            ports.push(entry.map_err(map_err("cannot read port tables"))?);
        }
        let mut repair = Vec::new();
        self.tables = Tables::restore(wide, trie, ports, &mut repair);
        if !repair.is_empty() {
            warn!(
                writes = repair.len(),
                "port tables disagreed with the bindings (an agent stopped mid-change); repairing"
            );
            self.apply(&repair)?;
        }
        Ok(())
    }

    /// Applies data-plane writes in order.
    /// Applies `ops` in order, each run of writes of one kind to one map
    /// in one batched `bpf(2)` call (the kernel applies a batch in order,
    /// so every state between is one the ops pass through anyway). Where a
    /// batch fails, the rest of its run goes one op at a time, so the error
    /// names the op.
    fn apply(&mut self, ops: &[Op]) -> Result<()> {
        let mut start = 0;
        while start < ops.len() {
            let kind = std::mem::discriminant(&ops[start]);
            let len = ops[start..]
                .iter()
                .take_while(|op| std::mem::discriminant(*op) == kind)
                .count();
            let run = &ops[start..start + len];
            let done = if len > 1 {
                self.apply_run(run).unwrap_or_else(|done| done)
            } else {
                0
            };
            self.apply_one_by_one(&run[done..])?;
            start += len;
        }
        Ok(())
    }

    /// Writes a run of ops of one kind with one batched call; on failure,
    /// how many went in.
    fn apply_run(&self, run: &[Op]) -> std::result::Result<usize, usize> {
        let res = match run[0] {
            Op::WidePut { .. } => {
                let (keys, values): (Vec<PrefixKey>, Vec<u32>) = run
                    .iter()
                    .filter_map(|op| match *op {
                        Op::WidePut {
                            key,
                            len,
                            destination,
                        } => Some((
                            PrefixKey {
                                prefix_len: u32::from(len),
                                key,
                            },
                            destination,
                        )),
                        _ => None,
                    })
                    .unzip();
                sys::map_update_batch(self.wide_fd.as_fd(), &keys, &values)
            }
            Op::WideDel { .. } => {
                let keys: Vec<PrefixKey> = run
                    .iter()
                    .filter_map(|op| match *op {
                        Op::WideDel { key, len } => Some(PrefixKey {
                            prefix_len: u32::from(len),
                            key,
                        }),
                        _ => None,
                    })
                    .collect();
                sys::map_delete_batch(self.wide_fd.as_fd(), &keys)
            }
            Op::PortPut(..) => {
                let (keys, values): (Vec<PortKey>, Vec<u32>) = run
                    .iter()
                    .filter_map(|op| match *op {
                        Op::PortPut(k, d) => Some((k, d)),
                        _ => None,
                    })
                    .unzip();
                sys::map_update_batch(self.ports_fd.as_fd(), &keys, &values)
            }
            Op::PortDel(..) => {
                let keys: Vec<PortKey> = run
                    .iter()
                    .filter_map(|op| match *op {
                        Op::PortDel(k) => Some(k),
                        _ => None,
                    })
                    .collect();
                sys::map_delete_batch(self.ports_fd.as_fd(), &keys)
            }
            Op::TriePut { .. } => {
                let (keys, values): (Vec<lpm_trie::Key<BindingKey>>, Vec<PrefixValue>) = run
                    .iter()
                    .filter_map(|op| match *op {
                        Op::TriePut { key, len, value } => Some((
                            lpm_trie::Key::new(KEY_HEADER_BITS + u32::from(len), key),
                            value,
                        )),
                        _ => None,
                    })
                    .unzip();
                sys::map_update_batch(self.prefixes_fd.as_fd(), &keys, &values)
            }
            Op::TrieDel { .. } => {
                let keys: Vec<lpm_trie::Key<BindingKey>> = run
                    .iter()
                    .filter_map(|op| match *op {
                        Op::TrieDel { key, len } => {
                            Some(lpm_trie::Key::new(KEY_HEADER_BITS + u32::from(len), key))
                        }
                        _ => None,
                    })
                    .collect();
                sys::map_delete_batch(self.prefixes_fd.as_fd(), &keys)
            }
        };
        res.map(|()| run.len()).map_err(|(done, _)| done)
    }

    /// Applies `ops` that undo a write that may have stopped part way:
    /// one at a time, passing over deletes of entries that are not there.
    fn apply_undo(&mut self, ops: &[Op]) -> Result<()> {
        for op in ops {
            match self.apply_one_by_one(std::slice::from_ref(op)) {
                Err(Error::Map { source, .. })
                    if matches!(op, Op::WideDel { .. } | Op::PortDel(_) | Op::TrieDel { .. })
                        && is_missing(&source) => {}
                other => other?,
            }
        }
        Ok(())
    }

    fn apply_one_by_one(&mut self, ops: &[Op]) -> Result<()> {
        for op in ops {
            let res = match *op {
                Op::WidePut {
                    key,
                    len,
                    destination,
                } => self.wide.insert(
                    PrefixKey {
                        prefix_len: u32::from(len),
                        key,
                    },
                    destination,
                    0,
                ),
                Op::WideDel { key, len } => self.wide.remove(&PrefixKey {
                    prefix_len: u32::from(len),
                    key,
                }),
                Op::PortPut(k, d) => self.ports.insert(k, d, 0),
                Op::PortDel(k) => self.ports.remove(&k),
                Op::TriePut { key, len, value } => self.prefixes.insert(
                    &lpm_trie::Key::new(KEY_HEADER_BITS + u32::from(len), key),
                    value,
                    0,
                ),
                Op::TrieDel { key, len } => self
                    .prefixes
                    .remove(&lpm_trie::Key::new(KEY_HEADER_BITS + u32::from(len), key)),
            };
            res.map_err(|e| table_error(e, op))?;
        }
        Ok(())
    }

    /// Another sk_lookup program in the namespace (a second agent on another
    /// bpffs, or someone else's) runs after or before ours, and the last
    /// program to select a socket wins: say so loudly.
    fn warn_about_other_programs(&self, ns: &File) {
        let ours = sys::obj_get(&self.location.dir.join(LINK_PIN))
            .and_then(|l| sys::netns_link_info(l.as_fd()))
            .map(|i| i.prog_id);
        if let (Ok(ours), Ok(all)) = (ours, sys::sk_lookup_programs(ns.as_fd())) {
            let others: Vec<u32> = all.into_iter().filter(|&id| id != ours).collect();
            if !others.is_empty() {
                warn!(
                    ?others,
                    ours,
                    "other sk_lookup programs are attached to this network namespace; a socket one of them selects can override lookup's choice (bpftool prog show id <id> says what they are)"
                );
            }
        }
    }

    /// Where the state lives.
    pub fn location(&self) -> &Location {
        &self.location
    }

    fn destination(&self, id: u32) -> Option<&Destination> {
        self.destinations.get(id as usize).and_then(Option::as_ref)
    }

    fn socket_cookie(&self, id: u32) -> Result<Option<u64>> {
        sys::sockmap_lookup(self.sockets.fd().as_fd(), id)
            .map_err(io_err("cannot read the sockmap"))
    }

    /// The id of `dest`, allocating (and zeroing the counters of) a free one.
    /// Returns whether it was newly allocated.
    fn ensure_destination(&mut self, dest: &Destination) -> Result<(u32, bool)> {
        if let Some(&id) = self.by_destination.get(dest) {
            return Ok((id, false));
        }
        let mut free = None;
        for id in 0..MAX_DESTINATIONS {
            match &self.destinations[id as usize] {
                // Never an id bindings still use, even one whose record
                // could not be read back.
                _ if self.refcount[id as usize] > 0 => {}
                None => {
                    free = Some(id);
                    break;
                }
                // A destination whose service went away and that no binding
                // uses any more is free for reuse.
                Some(_) if self.refcount[id as usize] == 0 && self.socket_cookie(id)?.is_none() => {
                    free = Some(id);
                    break;
                }
                Some(_) => {}
            }
        }
        let id = free.ok_or_else(|| Error::DestinationsFull {
            label: dest.label.clone(),
            family: dest.family,
            protocol: dest.protocol,
        })?;
        if let Some(old) = self.destinations[id as usize].take() {
            self.by_destination.remove(&old);
        }
        let zero = PerCpuValues::try_from(vec![
            DestinationMetrics::default();
            nr_cpus().map_err(|(_, e)| Error::Io {
                what: "cannot count CPUs".into(),
                source: e,
            })?
        ])
        .map_err(io_err("cannot size per-CPU counters"))?;
        self.metrics
            .set(id, zero, 0)
            .map_err(map_err("cannot reset destination counters"))?;
        self.records
            .set(id, dest.record(), 0)
            .map_err(map_err("cannot record destination"))?;
        self.destinations[id as usize] = Some(dest.clone());
        self.generation[id as usize] += 1;
        self.by_destination.insert(dest.clone(), id);
        debug!(id, label = %dest.label, family = %dest.family, protocol = %dest.protocol, "allocated destination");
        Ok((id, true))
    }

    /// Frees `id` if nothing refers to it any more.
    fn release_destination(&mut self, id: u32) -> Result<()> {
        if self.refcount[id as usize] != 0 || self.socket_cookie(id)?.is_some() {
            return Ok(());
        }
        let Some(dest) = self.destinations[id as usize].take() else {
            return Ok(());
        };
        self.by_destination.remove(&dest);
        let mut record = dest.record();
        record.in_use = 0;
        self.records
            .set(id, record, 0)
            .map_err(map_err("cannot release destination"))?;
        debug!(id, "released destination");
        Ok(())
    }

    fn write_binding(&mut self, selector: &Selector, id: u32) -> Result<()> {
        if selector.prefix.is_host() {
            // A new host must leave the room batches in progress reserved.
            if self.host_index.get(&selector.key()).is_none()
                && self.hosts_count() + self.reserved_hosts >= lookup_common::MAX_BINDINGS as usize
            {
                return Err(Error::TableFull(*selector));
            }
            return self.write_host(selector, Some(id));
        }
        let mut ops = Vec::new();
        let previous = self
            .tables
            .set(&selector.key(), selector.prefix.len(), Some(id), &mut ops);
        self.apply_or_revert(&ops, selector, previous)
            .map_err(|e| match e {
                Error::Map { source, .. } => full_or(source, selector),
                e => e,
            })
    }

    fn delete_binding(&mut self, selector: &Selector) -> Result<()> {
        if selector.prefix.is_host() {
            return self.write_host(selector, None);
        }
        let mut ops = Vec::new();
        let previous = self
            .tables
            .set(&selector.key(), selector.prefix.len(), None, &mut ops);
        self.apply_or_revert(&ops, selector, previous)
    }

    /// Sets or removes one host binding in the index and the maps; a refused
    /// write leaves both as they were.
    fn write_host(&mut self, selector: &Selector, id: Option<u32>) -> Result<()> {
        let mut ops = Vec::new();
        let previous = self.host_index.set(&selector.key(), id, &mut ops);
        if let Err(e) = self.apply_host_ops(&ops) {
            let mut undo = Vec::new();
            self.host_index.set(&selector.key(), previous, &mut undo);
            let _ = self.apply_host_ops(&undo);
            return Err(match e {
                Error::Io { source, .. }
                    if matches!(
                        source.raw_os_error(),
                        Some(libc::E2BIG | libc::ENOSPC | libc::ENOMEM)
                    ) =>
                {
                    Error::TableFull(*selector)
                }
                e => e,
            });
        }
        Ok(())
    }

    /// Writes host ops, each kind with one batched syscall, kinds in the
    /// order of [`HostOp::phase`] (the order `HostIndex` emits them in).
    fn apply_host_ops(&self, ops: &[HostOp]) -> Result<()> {
        self.write_host_ops(ops, false)
    }

    /// Writes host ops; with `undo`, deletes pass over entries that are
    /// not there (the write being undone may have stopped before them).
    fn write_host_ops(&self, ops: &[HostOp], undo: bool) -> Result<()> {
        let (mut port_keys, mut port_dests) = (Vec::new(), Vec::new());
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        let (mut deleted, mut ports_deleted) = (Vec::new(), Vec::new());
        for op in ops {
            match *op {
                HostOp::PortPut(k, d) => {
                    port_keys.push(k);
                    port_dests.push(d);
                }
                HostOp::Put(k, v) => {
                    keys.push(k);
                    values.push(v);
                }
                HostOp::Del(k) => deleted.push(k),
                HostOp::PortDel(k) => ports_deleted.push(k),
            }
        }
        let failed = |(_, source): (usize, io::Error)| Error::Io {
            what: "cannot write host bindings".into(),
            source,
        };
        sys::map_update_batch(self.host_ports_fd.as_fd(), &port_keys, &port_dests)
            .map_err(failed)?;
        // Entries of different addresses are independent, and the kernel
        // updates a hash table concurrently: a large write goes in two
        // halves at once, one per CPU the machine is likely to have spare.
        if keys.len() >= PARALLEL_HOST_WRITES {
            let half = keys.len() / 2;
            let fd = self.hosts_fd.as_fd();
            let (first, second) = std::thread::scope(|scope| {
                let other =
                    scope.spawn(|| sys::map_update_batch(fd, &keys[half..], &values[half..]));
                let first = sys::map_update_batch(fd, &keys[..half], &values[..half]);
                (first, other.join().expect("host write thread panicked"))
            });
            first.and(second).map_err(failed)?;
        } else {
            sys::map_update_batch(self.hosts_fd.as_fd(), &keys, &values).map_err(failed)?;
        }
        if undo {
            let failed = |source| Error::Io {
                what: "cannot undo host bindings".into(),
                source,
            };
            sys::map_delete_present(self.hosts_fd.as_fd(), &deleted).map_err(failed)?;
            return sys::map_delete_present(self.host_ports_fd.as_fd(), &ports_deleted)
                .map_err(failed);
        }
        sys::map_delete_batch(self.hosts_fd.as_fd(), &deleted).map_err(failed)?;
        sys::map_delete_batch(self.host_ports_fd.as_fd(), &ports_deleted).map_err(failed)
    }

    /// The label a binding has, if it exists.
    pub(crate) fn label_of(&self, selector: &Selector) -> Option<&Label> {
        self.bound(selector)
            .and_then(|id| self.destination(id))
            .map(|d| &d.label)
    }

    /// The destination a binding points at, host or wide.
    fn bound(&self, selector: &Selector) -> Option<u32> {
        if selector.prefix.is_host() {
            self.host_index.get(&selector.key())
        } else {
            self.bindings.get(selector).copied()
        }
    }

    /// Applies `ops`; if one fails, puts the binding back as it was in
    /// memory and in the maps, so a refused change leaves no trace.
    fn apply_or_revert(
        &mut self,
        ops: &[Op],
        selector: &Selector,
        previous: Option<u32>,
    ) -> Result<()> {
        let Err(e) = self.apply(ops) else {
            return Ok(());
        };
        let mut undo = Vec::new();
        self.tables
            .set(&selector.key(), selector.prefix.len(), previous, &mut undo);
        // The undo recomputes from the old bindings; writes the failed
        // attempt never made are rewrites of the same values.
        if let Err(undo_err) = self.apply_undo(&undo) {
            warn!(error = %undo_err, %selector, "could not undo a failed change; the agent repairs the tables when it restarts");
        }
        self.scrub_freed_tables(ops);
        Err(e)
    }

    /// After an undo: the port entries a failed write meant to delete, of
    /// tables that are free now. The write may have stopped before them,
    /// and a free table must be empty before another prefix takes it.
    fn scrub_freed_tables(&mut self, failed: &[Op]) {
        let stale: Vec<PortKey> = failed
            .iter()
            .filter_map(|op| match op {
                Op::PortDel(k) if self.tables.is_free(k.table) => Some(*k),
                _ => None,
            })
            .collect();
        if let Err(e) = sys::map_delete_present(self.ports_fd.as_fd(), &stale) {
            warn!(error = %e, "could not clear a freed port table; the agent repairs the tables when it restarts");
        }
    }

    /// Refuses changes once the pinned state has been removed under a
    /// running agent: they would land in maps that steer nothing.
    pub(crate) fn ensure_pinned(&self) -> Result<()> {
        if self.location.dir.join(LINK_PIN).exists() {
            Ok(())
        } else {
            Err(Error::StateGone(self.location.dir.clone()))
        }
    }

    /// Adds a binding, or moves an existing one to another label.
    pub fn bind(&mut self, binding: &Binding) -> Result<String> {
        self.ensure_pinned()?;
        let selector = binding.selector();
        let dest = Destination {
            label: binding.label.clone(),
            family: selector.prefix.family(),
            protocol: selector.protocol,
        };
        let (id, fresh) = self.ensure_destination(&dest)?;
        let previous = self.bound(&selector);
        if previous == Some(id) {
            return Ok(format!("already bound {selector} -> {}", binding.label));
        }
        if let Err(e) = self.write_binding(&selector, id) {
            if fresh {
                self.release_destination(id)?;
            }
            return Err(e);
        }
        if !selector.prefix.is_host() {
            self.bindings.insert(selector, id);
        }
        self.refcount[id as usize] += 1;
        match previous {
            Some(old) => {
                self.refcount[old as usize] -= 1;
                let old_label = self
                    .destination(old)
                    .map(|d| d.label.to_string())
                    .unwrap_or_default();
                self.release_destination(old)?;
                Ok(format!(
                    "rebound {selector} -> {} (was {old_label})",
                    binding.label
                ))
            }
            None => Ok(format!("bound {selector} -> {}", binding.label)),
        }
    }

    /// Removes a binding whose label must match.
    pub fn unbind(&mut self, binding: &Binding) -> Result<String> {
        self.ensure_pinned()?;
        let selector = binding.selector();
        let Some(id) = self.bound(&selector) else {
            return Err(Error::NoSuchBinding(selector));
        };
        let actual = self.destination(id).map(|d| d.label.clone());
        if actual.as_ref() != Some(&binding.label) {
            return Err(Error::LabelMismatch {
                selector,
                actual: actual.map(|l| l.to_string()).unwrap_or_default(),
                given: binding.label.to_string(),
            });
        }
        self.delete_binding(&selector)?;
        if !selector.prefix.is_host() {
            self.bindings.remove(&selector);
        }
        self.refcount[id as usize] -= 1;
        self.release_destination(id)?;
        Ok(format!("unbound {selector} -> {}", binding.label))
    }

    /// Starts checking a batch (see [`Dispatcher::prepare_batch`]); the
    /// check runs in steps with [`Dispatcher::check_some`], so an agent can
    /// serve other clients between them.
    pub fn begin_check(&self, mut batch: crate::batch::Batch) -> BatchCheck {
        batch.sort();
        BatchCheck {
            total: batch.changes.len(),
            batch,
            next: 0,
            net: Vec::new(),
            refused: None,
        }
    }

    /// Checks at least `max_changes` more changes of a batch (whole
    /// bindings at a time); `Ok(true)` once all are checked. An `unbind`
    /// must find its binding with its label, counting earlier changes of
    /// the batch. Nothing is changed here. A refusal names the earliest bad
    /// line of the input, though changes are checked in precedence order.
    pub fn check_some(&self, check: &mut BatchCheck, max_changes: usize) -> Result<bool> {
        use crate::batch::Change;
        let batch = &check.batch;
        let mut i = check.next;
        let stop = i.saturating_add(max_changes);
        'selectors: while i < batch.changes.len() {
            if i >= stop {
                check.next = i;
                return Ok(false);
            }
            let sel = batch.changes[i].selector;
            let initially = self.bound(&sel).map_or(Bound::Nothing, Bound::Now);
            let mut state = initially;
            while i < batch.changes.len() && batch.changes[i].selector == sel {
                let Change {
                    label, bind, line, ..
                } = batch.changes[i];
                if bind {
                    state = Bound::Batch(label);
                } else {
                    let given = batch.labels[label as usize].as_str();
                    let refused = match name_of(state, self, &batch.labels) {
                        None => Some(Error::NoSuchBinding(sel)),
                        Some(actual) if actual != given => Some(Error::LabelMismatch {
                            selector: sel,
                            actual: actual.to_owned(),
                            given: given.to_owned(),
                        }),
                        Some(_) => None,
                    };
                    if let Some(e) = refused {
                        if check.refused.as_ref().is_none_or(|(l, _)| line < *l) {
                            check.refused = Some((line, e));
                        }
                        // The rest of this selector's changes depend on
                        // this one; skip to the next selector.
                        while i < batch.changes.len() && batch.changes[i].selector == sel {
                            i += 1;
                        }
                        continue 'selectors;
                    }
                    state = Bound::Nothing;
                }
                i += 1;
            }
            if name_of(state, self, &batch.labels) != name_of(initially, self, &batch.labels) {
                check.net.push(NetChange {
                    selector: sel,
                    label: match state {
                        Bound::Batch(l) => Some(l),
                        _ => None,
                    },
                    from: match initially {
                        Bound::Now(id) => Some((id, self.generation[id as usize])),
                        _ => None,
                    },
                    new_host: sel.prefix.is_host()
                        && initially == Bound::Nothing
                        && matches!(state, Bound::Batch(_)),
                });
            }
        }
        check.next = batch.changes.len();
        match check.refused.take() {
            Some((line, e)) => Err(Error::Batch {
                line,
                source: Box::new(e),
            }),
            None => Ok(true),
        }
    }

    /// Checks a batch and plans it: every change is checked first, and a
    /// refused batch changes nothing; the plan holds the net effect per
    /// binding, additions and moves most specific first, then removals
    /// least specific first, to be written by [`Dispatcher::apply_chunk`]
    /// with batched syscalls.
    pub fn prepare_batch(&mut self, batch: crate::batch::Batch) -> Result<BatchPlan> {
        self.ensure_pinned()?;
        let mut check = self.begin_check(batch);
        while !self.check_some(&mut check, usize::MAX)? {}
        self.plan_batch(check)
    }

    /// Turns a fully checked batch into a plan: allocates the destinations
    /// it binds (held until [`Dispatcher::finish_batch`]) and orders its
    /// changes.
    pub fn plan_batch(&mut self, check: BatchCheck) -> Result<BatchPlan> {
        self.ensure_pinned()?;
        let BatchCheck {
            batch, total, net, ..
        } = check;

        // Destinations for every label bound; any allocated here and left
        // unused by a failure are freed again by `unpin`.
        let mut ids: StdHashMap<(u32, Family, Protocol), u32> = StdHashMap::new();
        for &NetChange {
            selector: sel,
            label,
            ..
        } in &net
        {
            let Some(label) = label else { continue };
            let key = (label, sel.prefix.family(), sel.protocol);
            if ids.contains_key(&key) {
                continue;
            }
            let dest = Destination {
                label: batch.labels[label as usize].clone(),
                family: key.1,
                protocol: key.2,
            };
            match self.ensure_destination(&dest) {
                Ok((id, _)) => {
                    // Pinned until the batch is done, so that allocating the
                    // next destination cannot take this one back as unused.
                    self.refcount[id as usize] += 1;
                    ids.insert(key, id);
                }
                Err(e) => {
                    self.unpin(&ids)?;
                    return Err(e);
                }
            }
        }
        let new_id = |sel: &Selector, label: Option<u32>| {
            label.map(|l| ids[&(l, sel.prefix.family(), sel.protocol)])
        };
        // `net` is in precedence order. Additions go most specific first,
        // removals least specific first: at every step a connection goes
        // where the old or the new rules send it.
        let (adds, removes): (Vec<_>, Vec<_>) = net.into_iter().partition(|c| c.label.is_some());
        let removing = removes
            .iter()
            .filter_map(|c| Some((c.selector, c.from?)))
            .collect();
        let new_host: Vec<bool> = adds
            .iter()
            .map(|c| c.new_host)
            .chain(removes.iter().map(|_| false))
            .collect();
        let changes: Vec<(Selector, Option<u32>)> = adds
            .into_iter()
            .map(|c| (c.selector, new_id(&c.selector, c.label)))
            .chain(removes.into_iter().rev().map(|c| (c.selector, None)))
            .collect();
        let new_hosts = new_host.iter().filter(|&&n| n).count();
        drop(batch);
        if self.hosts_count() + self.reserved_hosts + new_hosts
            > lookup_common::MAX_BINDINGS as usize
        {
            self.unpin(&ids)?;
            return Err(Error::BatchTooLarge {
                what: "host bindings",
                limit: lookup_common::MAX_BINDINGS as usize,
            });
        }
        Ok(BatchPlan {
            total,
            changes,
            removing,
            new_host,
            reserved: {
                self.reserved_hosts += new_hosts;
                new_hosts
            },
            pins: ids.into_values().collect(),
            done: 0,
            counts: (0, 0, 0),
        })
    }

    /// Applies a batch in one go (see [`Dispatcher::prepare_batch`]).
    pub fn apply_batch(&mut self, batch: crate::batch::Batch) -> Result<String> {
        let mut plan = self.prepare_batch(batch)?;
        while !plan.is_done() {
            if let Err(e) = self.apply_chunk(&mut plan, usize::MAX) {
                self.finish_batch(plan)?;
                return Err(e);
            }
        }
        self.finish_batch(plan)
    }

    /// Applies the next at most `max` changes of `plan`. Between chunks the
    /// agent serves other clients. A binding the batch sets is set whatever
    /// it is by then (the later write wins, as if the batch came after).
    /// A binding the batch removes is removed only if it still points where
    /// it did when the batch was checked: if another request moved it since,
    /// that request counts as coming after the batch, and its binding stays.
    pub fn apply_chunk(&mut self, plan: &mut BatchPlan, max: usize) -> Result<()> {
        self.ensure_pinned()?;
        let end = plan.changes.len().min(plan.done.saturating_add(max));
        let chunk: Vec<(Selector, Option<u32>)> = plan.changes[plan.done..end]
            .iter()
            .copied()
            .filter(|(s, to)| {
                to.is_some()
                    || plan.removing.get(s).is_some_and(|&(id, generation)| {
                        self.bound(s) == Some(id) && self.generation[id as usize] == generation
                    })
            })
            .collect();
        let chunk = &chunk[..];
        let mut host_changes: Vec<(BindingKey, Option<u32>)> = Vec::new();
        let mut ops = Vec::new();
        let mut undo_wide = Vec::new();
        self.tables.begin_batch();
        for &(s, id) in chunk {
            if s.prefix.is_host() {
                host_changes.push((s.key(), id));
            } else {
                let prev = self.tables.set(&s.key(), s.prefix.len(), id, &mut ops);
                undo_wide.push((s, prev));
            }
        }
        self.tables.finish_batch(&mut ops);
        let mut host_ops = Vec::new();
        let host_previous = self.host_index.set_many(&host_changes, &mut host_ops);

        // Host entries go in first: they are the most specific, so their
        // additions precede the wider changes and their removals, written
        // in the same call, leave lookups to tables already updated.
        let failed = self
            .apply_host_ops(&host_ops)
            .err()
            .or_else(|| self.apply(&ops).err());
        if let Some(e) = failed {
            // Put back what this chunk changed.
            let undo_hosts: Vec<_> = host_changes
                .iter()
                .zip(&host_previous)
                .rev()
                .map(|(&(k, _), &prev)| (k, prev))
                .collect();
            let mut undo_host_ops = Vec::new();
            self.host_index.set_many(&undo_hosts, &mut undo_host_ops);
            if let Err(undo_err) = self.write_host_ops(&undo_host_ops, true) {
                warn!(error = %undo_err, "could not undo a failed batch's host entries; the agent repairs them when it restarts");
            }
            let mut undo = Vec::new();
            self.tables.begin_batch();
            for (s, prev) in undo_wide.into_iter().rev() {
                self.tables.set(&s.key(), s.prefix.len(), prev, &mut undo);
            }
            self.tables.finish_batch(&mut undo);
            if let Err(undo_err) = self.apply_undo(&undo) {
                warn!(error = %undo_err, "could not undo a failed batch; the agent repairs the tables when it restarts");
            }
            self.scrub_freed_tables(&ops);
            return Err(e);
        }

        let mut touched = Vec::new();
        let mut host_previous = host_previous.into_iter();
        for &(s, new) in chunk {
            let old = if s.prefix.is_host() {
                host_previous.next().expect("one per host change")
            } else {
                match new {
                    Some(id) => self.bindings.insert(s, id),
                    None => self.bindings.remove(&s),
                }
            };
            if old == new {
                continue;
            }
            if let Some(id) = new {
                self.refcount[id as usize] += 1;
            }
            if let Some(old) = old {
                self.refcount[old as usize] -= 1;
                touched.push(old);
            }
            match (old, new) {
                (None, Some(_)) => plan.counts.0 += 1,
                (Some(_), Some(_)) => plan.counts.1 += 1,
                _ => plan.counts.2 += 1,
            }
        }
        // The slots reserved for this step's new hosts are used (or, where
        // another request bound the host meanwhile, no longer needed).
        let used = plan.new_host[plan.done..end].iter().filter(|&&n| n).count();
        plan.reserved -= used;
        self.reserved_hosts -= used;
        plan.done = end;
        touched.sort_unstable();
        touched.dedup();
        for id in touched {
            self.release_destination(id)?;
        }
        Ok(())
    }

    /// Ends a batch: drops its hold on destinations and says what it did.
    pub fn finish_batch(&mut self, plan: BatchPlan) -> Result<String> {
        self.reserved_hosts -= plan.reserved;
        for &id in &plan.pins {
            self.refcount[id as usize] -= 1;
        }
        for &id in &plan.pins {
            self.release_destination(id)?;
        }
        let (bound, moved, unbound) = plan.counts;
        Ok(format!(
            "applied {} change{}: {bound} bound, {moved} moved, {unbound} unbound, {} unchanged",
            plan.total,
            if plan.total == 1 { "" } else { "s" },
            plan.total.saturating_sub(bound + moved + unbound)
        ))
    }

    /// Drops the batch's pins on destinations and frees those left unused.
    fn unpin<K>(&mut self, ids: &StdHashMap<K, u32>) -> Result<()> {
        for &id in ids.values() {
            self.refcount[id as usize] -= 1;
        }
        for &id in ids.values() {
            self.release_destination(id)?;
        }
        Ok(())
    }

    fn hosts_count(&self) -> usize {
        self.host_index.len()
    }

    /// Whether a binding with this selector exists.
    pub fn is_bound(&self, selector: &Selector) -> bool {
        self.bound(selector).is_some()
    }

    /// Number of bindings.
    pub fn binding_count(&self) -> usize {
        self.bindings.len() + self.host_index.len()
    }

    /// The id of a destination, if it exists.
    pub fn destination_id(&self, label: &Label, family: Family, protocol: Protocol) -> Option<u32> {
        self.by_destination
            .get(&Destination {
                label: label.clone(),
                family,
                protocol,
            })
            .copied()
    }

    /// Every binding, in precedence order.
    pub fn bindings(&self) -> Vec<Binding> {
        let hosts = self.host_index.iter().filter_map(|(key, id)| {
            let len = if key.family == lookup_common::FAMILY_V4 {
                32
            } else {
                128
            };
            Some((Selector::from_key(&key, len)?, id))
        });
        let mut out: Vec<Binding> = self
            .bindings
            .iter()
            .map(|(s, &id)| (*s, id))
            .chain(hosts)
            .filter_map(|(s, id)| {
                Some(Binding {
                    label: self.destination(id)?.label.clone(),
                    protocol: s.protocol,
                    prefix: s.prefix,
                    port: s.port,
                })
            })
            .collect();
        Binding::sort(&mut out);
        out
    }

    /// Registers sockets for `label`: validates all of them first, then puts
    /// one per (family, protocol) into the sockmap, replacing what was there.
    /// The descriptors are closed when this returns: the sockmap does not
    /// keep a socket alive, so the service's exit empties its slot.
    pub fn register(
        &mut self,
        label: &Label,
        sockets: Vec<(OwnedFd, String)>,
    ) -> Result<Vec<String>> {
        self.ensure_pinned()?;
        if sockets.is_empty() {
            return Err(Error::NoSockets);
        }
        let mut chosen: Vec<(Destination, OwnedFd, String, SocketInfo)> = Vec::new();
        for (fd, name) in sockets {
            let info = socket::inspect(fd.as_fd()).map_err(|source| Error::BadSocket {
                name: name.clone(),
                source,
            })?;
            let ns = socket::netns_inode(fd.as_fd()).map_err(|source| Error::BadSocket {
                name: name.clone(),
                source,
            })?;
            if ns != self.location.netns_ino {
                return Err(Error::ForeignNetns {
                    name,
                    addr: info.local,
                });
            }
            let dest = Destination {
                label: label.clone(),
                family: info.family,
                protocol: info.protocol,
            };
            if let Some((_, _, first, first_info)) = chosen.iter().find(|(d, ..)| *d == dest) {
                // Members of one reuseport group are one service: the kernel
                // picks among them after we pick the first.
                if first_info.reuseport && info.reuseport && first_info.local == info.local {
                    continue;
                }
                return Err(Error::DuplicateSockets {
                    label: label.clone(),
                    family: info.family,
                    protocol: info.protocol,
                    first: first.clone(),
                    second: name,
                });
            }
            chosen.push((dest, fd, name, info));
        }

        // Every destination first (pinned so that allocating one cannot
        // reclaim another), so that running out of ids refuses the whole
        // request before any socket is swapped in.
        let mut ids = Vec::new();
        for (dest, ..) in &chosen {
            match self.ensure_destination(dest) {
                Ok((id, _)) => {
                    self.refcount[id as usize] += 1;
                    ids.push(id);
                }
                Err(e) => {
                    for &id in &ids {
                        self.refcount[id as usize] -= 1;
                        self.release_destination(id)?;
                    }
                    return Err(e);
                }
            }
        }
        let mut messages = Vec::new();
        let mut failure = None;
        for ((dest, fd, _name, info), &id) in chosen.into_iter().zip(&ids) {
            if failure.is_some() {
                break;
            }
            let replaced = self.socket_cookie(id)?;
            if let Err(e) = sys::sockmap_update(self.sockets.fd().as_fd(), id, fd.as_fd()) {
                failure = Some(Error::Io {
                    what: format!(
                        "cannot register {} {} {} socket {}",
                        dest.label, dest.family, dest.protocol, info.local
                    ),
                    source: e,
                });
                break;
            }
            drop(fd);
            messages.push(match replaced {
                Some(old) => format!(
                    "replaced {} {} {}: socket {} (cookie {}, was {old})",
                    dest.label, dest.family, dest.protocol, info.local, info.cookie
                ),
                None => format!(
                    "registered {} {} {}: socket {} (cookie {})",
                    dest.label, dest.family, dest.protocol, info.local, info.cookie
                ),
            });
        }
        for &id in &ids {
            self.refcount[id as usize] -= 1;
            self.release_destination(id)?;
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(messages),
        }
    }

    /// Removes the socket of a destination.
    pub fn unregister(
        &mut self,
        label: &Label,
        family: Family,
        protocol: Protocol,
    ) -> Result<String> {
        self.ensure_pinned()?;
        let dest = Destination {
            label: label.clone(),
            family,
            protocol,
        };
        let not_registered = || Error::NotRegistered {
            label: label.clone(),
            family,
            protocol,
        };
        let &id = self.by_destination.get(&dest).ok_or_else(not_registered)?;
        let removed = sys::sockmap_delete(self.sockets.fd().as_fd(), id)
            .map_err(io_err("cannot delete from the sockmap"))?;
        if !removed {
            return Err(not_registered());
        }
        self.release_destination(id)?;
        Ok(format!("unregistered {label} {family} {protocol}"))
    }

    fn metrics(&self, id: u32) -> Result<Metrics> {
        let per_cpu = self
            .metrics
            .get(&id, 0)
            .map_err(map_err("cannot read counters"))?;
        let mut m = Metrics::default();
        for c in per_cpu.iter() {
            m.lookups += c.lookups;
            m.misses += c.misses;
            m.errors_family += c.errors_family;
            m.errors_protocol += c.errors_protocol;
            m.errors_state += c.errors_state;
            m.errors_other += c.errors_other;
        }
        Ok(m)
    }

    /// Bindings, destinations and counters; only `label`'s if given.
    pub fn status(&self, label: Option<&Label>) -> Result<Status> {
        let mut bindings = self.bindings();
        if let Some(l) = label {
            bindings.retain(|b| &b.label == l);
        }
        let mut destinations = Vec::new();
        for (dest, &id) in &self.by_destination {
            if label.is_some_and(|l| *l != dest.label) {
                continue;
            }
            let socket_cookie = self.socket_cookie(id)?;
            let refs = self.refcount[id as usize] as usize;
            if refs == 0 && socket_cookie.is_none() {
                continue;
            }
            destinations.push(DestinationStatus {
                label: dest.label.clone(),
                family: dest.family,
                protocol: dest.protocol,
                id,
                socket_cookie,
                bindings: refs,
                metrics: self.metrics(id)?,
            });
        }
        if let Some(l) = label
            && bindings.is_empty()
            && destinations.is_empty()
        {
            return Err(Error::UnknownLabel(l.to_string()));
        }
        destinations.sort_by(|a, b| {
            (&a.label, a.family, a.protocol).cmp(&(&b.label, b.family, b.protocol))
        });
        Ok(Status {
            bindings,
            destinations,
        })
    }
}
