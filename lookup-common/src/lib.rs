//! The contract between the `sk_lookup` program and the agent.
//!
//! Every type here crosses the kernel boundary as raw bytes, so each one is
//! `#[repr(C)]`, uses fixed-width integers only, spells out its padding and has
//! its size pinned by a compile-time assertion. Change a layout and you must
//! bump [`LAYOUT_VERSION`]: the agent refuses to reuse pinned maps whose layout
//! differs from its own.
#![no_std]

/// Written into [`Meta::magic`] so a pinned state is recognisable as ours.
pub const MAGIC: u64 = 0x6c6f_6f6b_7570_0001; // "lookup\0\x01"

/// Version of the map layout. Bump on any change to a shared type or map.
pub const LAYOUT_VERSION: u32 = 1;

/// Names of the maps, as they appear in the ELF object and as pin file names.
pub mod map_names {
    /// Exact-match table for host bindings (/32 and /128).
    pub const HOSTS: &str = "LOOKUP_HOSTS";
    /// Longest-prefix-match table for every binding wider than a host.
    pub const PREFIXES: &str = "LOOKUP_PREFIXES";
    /// Sockmap: destination id to socket.
    pub const SOCKETS: &str = "LOOKUP_SOCKETS";
    /// Per-CPU counters per destination.
    pub const METRICS: &str = "LOOKUP_METRICS";
    /// Control-plane only: what each destination id stands for.
    pub const DESTINATIONS: &str = "LOOKUP_DESTS";
    /// Control-plane only: one [`Meta`](crate::Meta) record.
    pub const META: &str = "LOOKUP_META";
}

/// Name of the `sk_lookup` program in the ELF object.
pub const PROGRAM_NAME: &str = "lookup_dispatcher";

/// Most bindings each of the two binding tables holds.
pub const MAX_BINDINGS: u32 = 1 << 20;
/// Most destinations (label, family, protocol); also the sockmap size.
pub const MAX_DESTINATIONS: u32 = 1024;
/// Longest label, in bytes.
pub const MAX_LABEL_LEN: usize = 255;

/// `AF_INET`, as stored in [`BindingKey::family`].
pub const FAMILY_V4: u8 = 2;
/// `AF_INET6`, as stored in [`BindingKey::family`].
pub const FAMILY_V6: u8 = 10;
/// `IPPROTO_TCP`.
pub const PROTO_TCP: u8 = 6;
/// `IPPROTO_UDP`.
pub const PROTO_UDP: u8 = 17;

/// Bits of [`BindingKey`] in front of the address: protocol, family and port.
/// An LPM prefix length is this plus the address prefix length.
pub const KEY_HEADER_BITS: u32 = 32;

/// Where a binding lives: protocol, family, port and address.
///
/// The same bytes key the host table (as is) and the prefix trie (behind a
/// 32-bit prefix length). The header comes first so a trie prefix always
/// covers protocol, family and port exactly; IPv4 and IPv6 never share a key
/// because the family is part of it. IPv4 addresses use the first four bytes
/// of `addr` and leave the rest zero. The port is big-endian, 0 meaning every
/// port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BindingKey {
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u8,
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    /// Destination port, big-endian; `[0, 0]` for every port.
    pub port: [u8; 2],
    /// Destination address in network byte order.
    pub addr: [u8; 16],
}

/// What a binding points at.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindingValue {
    /// Index of the destination in the sockmap and the metrics array.
    pub destination: u32,
    /// Address prefix length of the binding (an LPM lookup does not say which
    /// prefix matched, and precedence needs it).
    pub prefix_len: u32,
}

/// The key of [`map_names::PREFIXES`]: an LPM trie key over [`BindingKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixKey {
    /// [`KEY_HEADER_BITS`] plus the address prefix length.
    pub prefix_len: u32,
    /// The key bits; bits past `prefix_len` are zero.
    pub key: BindingKey,
}

/// Per-destination counters, one copy per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestinationMetrics {
    /// Lookups that matched a binding of this destination.
    pub lookups: u64,
    /// Lookups refused because the destination had no socket.
    pub misses: u64,
    /// Assign failed: the socket's family cannot take this lookup.
    pub errors_family: u64,
    /// Assign failed: the socket's protocol differs from the lookup's.
    pub errors_protocol: u64,
    /// Assign failed: the socket is not listening (TCP) or is connected (UDP).
    pub errors_state: u64,
    /// Assign failed for any other reason.
    pub errors_other: u64,
}

/// What a destination id stands for. Kept in a pinned array so a restarted
/// agent recovers labels without any file of its own.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DestinationRecord {
    /// 1 while the id is allocated, 0 when free.
    pub in_use: u8,
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u8,
    /// Length of the label in bytes.
    pub label_len: u8,
    /// The label, `label_len` bytes of UTF-8, the rest zero.
    pub label: [u8; MAX_LABEL_LEN + 1],
}

/// Identifies a pinned state as ours and of which layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// Always [`MAGIC`].
    pub magic: u64,
    /// [`LAYOUT_VERSION`] of the agent that created the state.
    pub layout_version: u32,
    /// Explicit padding; zero.
    pub _pad: u32,
}

const _: () = {
    assert!(core::mem::size_of::<BindingKey>() == 20);
    assert!(core::mem::size_of::<BindingValue>() == 8);
    assert!(core::mem::size_of::<PrefixKey>() == 24);
    assert!(core::mem::size_of::<DestinationMetrics>() == 48);
    assert!(core::mem::size_of::<DestinationRecord>() == 260);
    assert!(core::mem::size_of::<Meta>() == 16);
    assert!(KEY_HEADER_BITS as usize == 8 * 4);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is repr(C), built from integers and byte arrays only,
    // and has no implicit padding (sizes asserted above); every bit pattern is valid.
    unsafe impl aya::Pod for super::BindingKey {}
    unsafe impl aya::Pod for super::BindingValue {}
    unsafe impl aya::Pod for super::PrefixKey {}
    unsafe impl aya::Pod for super::DestinationMetrics {}
    unsafe impl aya::Pod for super::DestinationRecord {}
    unsafe impl aya::Pod for super::Meta {}
}
