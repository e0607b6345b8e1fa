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
pub const LAYOUT_VERSION: u32 = 3;

/// Names of the maps, as they appear in the ELF object and as pin file names.
pub mod map_names {
    /// Host bindings (/32 and /128): one entry per address.
    pub const HOSTS: &str = "LOOKUP_HOSTS";
    /// Host bindings on ports beyond an address's inline ones.
    pub const HOST_PORTS: &str = "LOOKUP_HOST_PORTS";
    /// Longest-prefix-match trie of every prefix wider than a host that
    /// carries a binding; each node names a port table.
    pub const PREFIXES: &str = "LOOKUP_PREFIXES";
    /// Port tables of the trie's prefixes, computed by the agent.
    pub const PORTS: &str = "LOOKUP_PORTS";
    /// Control-plane only: the bindings wider than a host, as bound.
    pub const WIDE: &str = "LOOKUP_WIDE";
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

/// Most host bindings, and most wider bindings.
pub const MAX_BINDINGS: u32 = 1 << 20;
/// Most port-table entries (a wide binding's port is repeated in the
/// table of every prefix below it that it wins for).
pub const MAX_PORT_ENTRIES: u32 = 1 << 22;
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

/// The key of [`map_names::WIDE`]: a binding wider than a host, as bound.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixKey {
    /// The address prefix length.
    pub prefix_len: u32,
    /// The key bits; bits past `prefix_len` are zero.
    pub key: BindingKey,
}

/// Specific ports an address's host entry holds inline.
pub const HOST_INLINE_PORTS: usize = 4;

/// The value of [`map_names::HOSTS`], keyed by a [`BindingKey`] with port
/// 0: what the address's host bindings say.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostValue {
    /// Destination of the address's port 0 binding, or [`NO_DESTINATION`].
    pub default_destination: u32,
    /// Non-zero when [`map_names::HOST_PORTS`] holds more ports of this
    /// address.
    pub more: u32,
    /// Specific ports (host order); 0 marks an empty slot.
    pub ports: [u16; HOST_INLINE_PORTS],
    /// Destination of each port in `ports`.
    pub destinations: [u32; HOST_INLINE_PORTS],
}

/// `PrefixValue::default_destination` when no port 0 binding applies.
pub const NO_DESTINATION: u32 = u32::MAX;

/// The value of a trie node: which port table to consult and what every
/// port that table does not list gets.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixValue {
    /// Key space of this prefix in [`map_names::PORTS`].
    pub table: u32,
    /// Destination for ports without an entry, or [`NO_DESTINATION`].
    pub default_destination: u32,
}

/// The key of [`map_names::PORTS`]: a port in one prefix's table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    /// [`PrefixValue::table`] of the prefix.
    pub table: u32,
    /// Destination port, host order; never 0 (that is the default).
    pub port: u16,
    /// Explicit padding; zero.
    pub _pad: u16,
}

impl PortKey {
    /// The entry for `port` in `table`.
    pub const fn new(table: u32, port: u16) -> Self {
        Self {
            table,
            port,
            _pad: 0,
        }
    }
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
    assert!(core::mem::size_of::<PrefixValue>() == 8);
    assert!(core::mem::size_of::<HostValue>() == 32);
    assert!(core::mem::size_of::<PortKey>() == 8);
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
    unsafe impl aya::Pod for super::PrefixValue {}
    unsafe impl aya::Pod for super::HostValue {}
    unsafe impl aya::Pod for super::PortKey {}
}
