//! The few `bpf(2)` commands aya 0.14 does not wrap for us: sockmap access
//! with 8-byte values, link introspection and update, and `PROG_TEST_RUN`
//! for `sk_lookup`.
//!
//! `union bpf_attr` is built as a zeroed, 8-byte aligned buffer with fields
//! written at their UAPI offsets; the kernel requires unused bytes be zero.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

const BPF_MAP_LOOKUP_ELEM: i64 = 1;
const BPF_MAP_UPDATE_ELEM: i64 = 2;
const BPF_MAP_DELETE_ELEM: i64 = 3;
const BPF_OBJ_PIN: i64 = 6;
const BPF_OBJ_GET: i64 = 7;
const BPF_PROG_GET_FD_BY_ID: i64 = 13;
const BPF_PROG_TEST_RUN: i64 = 10;
const BPF_OBJ_GET_INFO_BY_FD: i64 = 15;
const BPF_MAP_UPDATE_BATCH: i64 = 26;
const BPF_MAP_DELETE_BATCH: i64 = 27;
const BPF_LINK_UPDATE: i64 = 29;
const BPF_PROG_QUERY: i64 = 16;

/// `BPF_F_REPLACE` for `BPF_LINK_UPDATE`.
const BPF_F_REPLACE: u32 = 1 << 2;

/// `BPF_ANY`: create or replace.
pub const BPF_ANY: u64 = 0;

#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    const fn new() -> Self {
        Self([0; 128])
    }
    fn u32(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, off: usize, v: u64) -> &mut Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn get_u32(&self, off: usize) -> u32 {
        u32::from_ne_bytes(self.0[off..off + 4].try_into().expect("4 bytes"))
    }
}

fn bpf(cmd: i64, attr: &mut Attr) -> io::Result<i64> {
    // SAFETY: attr is a valid, writable buffer of the size passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            attr.0.len() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn ptr<T>(p: *const T) -> u64 {
    p as usize as u64
}

/// Opens a pinned BPF object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut attr = Attr::new();
    attr.u64(0, ptr(path.as_ptr()));
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins a BPF object at `path` (on a bpffs).
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut attr = Attr::new();
    attr.u64(0, ptr(path.as_ptr()))
        .u32(8, fd.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// Opens a loaded program by id.
pub fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32(0, id);
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: the kernel returned a new descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Looks up a sockmap slot; the kernel answers with the socket's cookie.
pub fn sockmap_lookup(map: BorrowedFd<'_>, index: u32) -> io::Result<Option<u64>> {
    let mut cookie = 0u64;
    let mut attr = Attr::new();
    attr.u32(0, map.as_raw_fd() as u32)
        .u64(8, ptr(&raw const index))
        .u64(16, ptr(&raw mut cookie));
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(Some(cookie)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Puts a socket into a sockmap slot, atomically replacing any socket there.
pub fn sockmap_update(map: BorrowedFd<'_>, index: u32, socket: BorrowedFd<'_>) -> io::Result<()> {
    let value = socket.as_raw_fd() as u64;
    let mut attr = Attr::new();
    attr.u32(0, map.as_raw_fd() as u32)
        .u64(8, ptr(&raw const index))
        .u64(16, ptr(&raw const value))
        .u64(24, BPF_ANY);
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// Empties a sockmap slot. `Ok(false)` if it was already empty (a sockmap
/// answers that with `EINVAL`, not `ENOENT`).
pub fn sockmap_delete(map: BorrowedFd<'_>, index: u32) -> io::Result<bool> {
    let mut attr = Attr::new();
    attr.u32(0, map.as_raw_fd() as u32)
        .u64(8, ptr(&raw const index));
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Writes `keys[i] -> values[i]` for every i with as few `bpf(2)` calls as
/// the kernel allows (`BPF_MAP_UPDATE_BATCH`, 5.6+). Returns how many were
/// written before an error, with the error.
pub fn map_update_batch<K: Copy, V: Copy>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, io::Error)> {
    assert_eq!(keys.len(), values.len());
    let mut done = 0;
    while done < keys.len() {
        let mut count = (keys.len() - done) as u32;
        let mut attr = Attr::new();
        attr.u64(16, ptr(keys[done..].as_ptr()))
            .u64(24, ptr(values[done..].as_ptr()))
            .u32(32, count)
            .u32(36, map.as_raw_fd() as u32);
        let res = bpf(BPF_MAP_UPDATE_BATCH, &mut attr);
        count = attr.get_u32(32);
        done += count as usize;
        if let Err(e) = res {
            if e.raw_os_error() == Some(libc::EINTR) || (e.raw_os_error() == Some(libc::EAGAIN)) {
                continue;
            }
            return Err((done, e));
        }
    }
    Ok(())
}

/// Deletes `keys` with as few `bpf(2)` calls as the kernel allows
/// (`BPF_MAP_DELETE_BATCH`). Returns how many were deleted before an error.
pub fn map_delete_batch<K: Copy>(
    map: BorrowedFd<'_>,
    keys: &[K],
) -> Result<(), (usize, io::Error)> {
    let mut done = 0;
    while done < keys.len() {
        let mut attr = Attr::new();
        attr.u64(16, ptr(keys[done..].as_ptr()))
            .u32(32, (keys.len() - done) as u32)
            .u32(36, map.as_raw_fd() as u32);
        let res = bpf(BPF_MAP_DELETE_BATCH, &mut attr);
        done += attr.get_u32(32) as usize;
        if let Err(e) = res {
            if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) {
                continue;
            }
            return Err((done, e));
        }
    }
    Ok(())
}

/// Deletes `keys` like [`map_delete_batch`], passing over keys that are
/// not there: for undoing a write that may have stopped part way.
pub fn map_delete_present<K: Copy>(map: BorrowedFd<'_>, keys: &[K]) -> io::Result<()> {
    let mut start = 0;
    while start < keys.len() {
        match map_delete_batch(map, &keys[start..]) {
            Ok(()) => return Ok(()),
            Err((done, e)) if e.raw_os_error() == Some(libc::ENOENT) => start += done + 1,
            Err((_, e)) => return Err(e),
        }
    }
    Ok(())
}

/// Ids of the `sk_lookup` programs attached to a network namespace, in the
/// order they run.
pub fn sk_lookup_programs(netns: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    const BPF_SK_LOOKUP: u32 = 36;
    let mut ids = [0u32; 64];
    let mut attr = Attr::new();
    attr.u32(0, netns.as_raw_fd() as u32)
        .u32(4, BPF_SK_LOOKUP)
        .u64(16, ptr(ids.as_mut_ptr()))
        .u32(24, ids.len() as u32);
    bpf(BPF_PROG_QUERY, &mut attr)?;
    let n = (attr.get_u32(24) as usize).min(ids.len());
    Ok(ids[..n].to_vec())
}

/// What the kernel says about a netns link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetnsLinkInfo {
    /// Link id.
    pub id: u32,
    /// Id of the program the link runs.
    pub prog_id: u32,
    /// Inode of the network namespace; 0 once the namespace is gone.
    pub netns_ino: u32,
    /// `BPF_SK_LOOKUP` for ours.
    pub attach_type: u32,
}

/// `BPF_LINK_TYPE_NETNS`.
const BPF_LINK_TYPE_NETNS: u32 = 5;

/// Reads a netns link's info; an error if the link is of another type.
pub fn netns_link_info(link: BorrowedFd<'_>) -> io::Result<NetnsLinkInfo> {
    // struct bpf_link_info: type, id, prog_id, (pad), union at offset 16;
    // for netns links: netns_ino, attach_type.
    #[repr(C, align(8))]
    struct Info([u8; 64]);
    let mut info = Info([0; 64]);
    let mut attr = Attr::new();
    attr.u32(0, link.as_raw_fd() as u32)
        .u32(4, info.0.len() as u32)
        .u64(8, ptr(info.0.as_mut_ptr()));
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let field = |off: usize| u32::from_ne_bytes(info.0[off..off + 4].try_into().expect("4 bytes"));
    if field(0) != BPF_LINK_TYPE_NETNS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("link is of type {}, not a netns link", field(0)),
        ));
    }
    Ok(NetnsLinkInfo {
        id: field(4),
        prog_id: field(8),
        netns_ino: field(16),
        attach_type: field(20),
    })
}

/// Swaps the program a link runs, if it still runs `old_prog`.
pub fn link_update(
    link: BorrowedFd<'_>,
    new_prog: BorrowedFd<'_>,
    old_prog: BorrowedFd<'_>,
) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.u32(0, link.as_raw_fd() as u32)
        .u32(4, new_prog.as_raw_fd() as u32)
        .u32(8, BPF_F_REPLACE)
        .u32(12, old_prog.as_raw_fd() as u32);
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// One `sk_lookup` context for [`sk_lookup_test_run`], laid out as the UAPI
/// `struct bpf_sk_lookup` (72 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SkLookupCtx {
    /// Selected socket's cookie, on output.
    pub cookie: u64,
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u32,
    /// Remote IPv4 address, network order.
    pub remote_ip4: u32,
    /// Remote IPv6 address, network order.
    pub remote_ip6: [u32; 4],
    /// Remote port, network order (upper 16 bits zero).
    pub remote_port: u32,
    /// Local IPv4 address, network order.
    pub local_ip4: u32,
    /// Local IPv6 address, network order.
    pub local_ip6: [u32; 4],
    /// Local port, host order.
    pub local_port: u32,
    /// Must be zero for a test run.
    pub ingress_ifindex: u32,
    /// Explicit tail padding: the kernel rejects a context whose bytes past
    /// `local_port` are not all zero, so none may be left uninitialised.
    pub _pad: u32,
}

const _: () = assert!(size_of::<SkLookupCtx>() == 72);

/// What one test run returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestRunResult {
    /// `SK_PASS` (1) or `SK_DROP` (0).
    pub retval: u32,
    /// Cookie of the selected socket, 0 if none.
    pub cookie: u64,
    /// Average nanoseconds per run.
    pub duration_ns: u32,
}

/// Runs an `sk_lookup` program on a context `repeat` times
/// (`BPF_PROG_TEST_RUN`, kernel 5.13+).
pub fn sk_lookup_test_run(
    prog: BorrowedFd<'_>,
    ctx: &SkLookupCtx,
    repeat: u32,
) -> io::Result<TestRunResult> {
    let mut out = SkLookupCtx::default();
    let mut attr = Attr::new();
    // struct { prog_fd, retval, data_size_in, data_size_out, data_in,
    // data_out, repeat, duration, ctx_size_in, ctx_size_out, ctx_in, ctx_out }
    attr.u32(0, prog.as_raw_fd() as u32)
        .u32(32, repeat)
        .u32(40, size_of::<SkLookupCtx>() as u32)
        .u32(44, size_of::<SkLookupCtx>() as u32)
        .u64(48, ptr(ctx))
        .u64(56, ptr(&raw mut out));
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok(TestRunResult {
        retval: attr.get_u32(4),
        cookie: out.cookie,
        duration_ns: attr.get_u32(36),
    })
}
