//! What the dispatcher and the benchmark baselines share: reading the
//! lookup's destination out of the `sk_lookup` context into a
//! [`BindingKey`].
#![no_std]
#![cfg(target_arch = "bpf")]

use core::{cell::UnsafeCell, ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{bpf_map_def, bpf_map_type::BPF_MAP_TYPE_SOCKMAP, bpf_sk_lookup},
    programs::SkLookupContext,
};
use lookup_common::{BindingKey, FAMILY_V4, FAMILY_V6};

/// The lookup's protocol, family, local port and address as a
/// [`BindingKey`], with the address length in bits (32 or 128); `None` for
/// another family.
#[inline(always)]
pub fn destination_key(ctx: &SkLookupContext) -> Option<(BindingKey, u32)> {
    let lookup: *const bpf_sk_lookup = ctx.lookup;
    // Every field is loaded unconditionally: a load behind a branch can be
    // merged by LLVM into one variable-offset context load, which the
    // verifier rejects.
    // SAFETY: the kernel hands the program a valid context.
    let (family, protocol, port, ip4, ip6) = unsafe {
        (
            ptr::read_volatile(&raw const (*lookup).family),
            ptr::read_volatile(&raw const (*lookup).protocol),
            ptr::read_volatile(&raw const (*lookup).local_port),
            ptr::read_volatile(&raw const (*lookup).local_ip4),
            [
                ptr::read_volatile(&raw const (*lookup).local_ip6[0]),
                ptr::read_volatile(&raw const (*lookup).local_ip6[1]),
                ptr::read_volatile(&raw const (*lookup).local_ip6[2]),
                ptr::read_volatile(&raw const (*lookup).local_ip6[3]),
            ],
        )
    };
    let mut key = BindingKey {
        protocol: protocol as u8,
        family: family as u8,
        port: (port as u16).to_be_bytes(),
        addr: [0; 16],
    };
    let bits = if family == u32::from(FAMILY_V4) {
        key.addr[..4].copy_from_slice(&ip4.to_ne_bytes());
        32
    } else if family == u32::from(FAMILY_V6) {
        key.addr[0..4].copy_from_slice(&ip6[0].to_ne_bytes());
        key.addr[4..8].copy_from_slice(&ip6[1].to_ne_bytes());
        key.addr[8..12].copy_from_slice(&ip6[2].to_ne_bytes());
        key.addr[12..16].copy_from_slice(&ip6[3].to_ne_bytes());
        128
    } else {
        return None;
    };
    Some((key, bits))
}

/// A sockmap with 8-byte values, for a `#[link_section = "maps"]` static.
/// aya-ebpf's `SockMap` fixes the value at 4 bytes, and with 4-byte values
/// the kernel does not report socket cookies to user space, which the agent
/// needs to show what is registered.
#[repr(transparent)]
pub struct SockMap64(UnsafeCell<bpf_map_def>);

// SAFETY: the definition is only read by the loader; programs pass its
// address to helpers and never write through it.
unsafe impl Sync for SockMap64 {}

impl SockMap64 {
    /// A definition of `max_entries` slots, pinned by name if `pinned`.
    pub const fn new(max_entries: u32, pinned: bool) -> Self {
        Self(UnsafeCell::new(bpf_map_def {
            type_: BPF_MAP_TYPE_SOCKMAP,
            key_size: 4,
            value_size: 8,
            max_entries,
            map_flags: 0,
            id: 0,
            pinning: pinned as u32,
        }))
    }

    /// The map, as helpers take it.
    pub const fn as_ptr(&self) -> *mut c_void {
        self.0.get().cast()
    }
}
