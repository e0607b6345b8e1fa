//! The program, its maps and the lookup sequence.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{sk_action::SK_DROP, sk_action::SK_PASS},
    helpers::{bpf_map_lookup_elem, bpf_sk_assign, bpf_sk_release},
    macros::{map, sk_lookup},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::SkLookupContext,
};
use lookup_common::{
    BindingKey, DestinationMetrics, DestinationRecord, HOST_INLINE_PORTS, HostValue,
    KEY_HEADER_BITS, MAX_BINDINGS, MAX_DESTINATIONS, MAX_PORT_ENTRIES, Meta, NO_DESTINATION,
    PortKey, PrefixKey, PrefixValue,
};
use lookup_ebpf::SockMap64;

const EAFNOSUPPORT: i64 = 97;
const EPROTOTYPE: i64 = 91;
const ESOCKTNOSUPPORT: i64 = 94;
const BPF_F_NO_PREALLOC: u32 = 1;

#[map(name = "LOOKUP_HOSTS")]
static HOSTS: HashMap<BindingKey, HostValue> = HashMap::pinned(MAX_BINDINGS, BPF_F_NO_PREALLOC);

#[map(name = "LOOKUP_HOST_PORTS")]
static HOST_PORTS: HashMap<BindingKey, u32> = HashMap::pinned(MAX_BINDINGS, BPF_F_NO_PREALLOC);

#[map(name = "LOOKUP_PREFIXES")]
static PREFIXES: LpmTrie<BindingKey, PrefixValue> = LpmTrie::pinned(MAX_BINDINGS, 0);

#[map(name = "LOOKUP_PORTS")]
static PORTS: HashMap<PortKey, u32> = HashMap::pinned(MAX_PORT_ENTRIES, BPF_F_NO_PREALLOC);

// Never read here, like the two below.
#[map(name = "LOOKUP_WIDE")]
static WIDE: HashMap<PrefixKey, u32> = HashMap::pinned(MAX_BINDINGS, BPF_F_NO_PREALLOC);

#[map(name = "LOOKUP_METRICS")]
static METRICS: PerCpuArray<DestinationMetrics> = PerCpuArray::pinned(MAX_DESTINATIONS, 0);

// Never read here: declared so the agent's records live and are pinned with
// the rest of the state.
#[map(name = "LOOKUP_DESTS")]
static DESTINATIONS: Array<DestinationRecord> = Array::pinned(MAX_DESTINATIONS, 0);

#[map(name = "LOOKUP_META")]
static META: Array<Meta> = Array::pinned(1, 0);

#[unsafe(link_section = "maps")]
#[unsafe(export_name = "LOOKUP_SOCKETS")]
static SOCKETS: SockMap64 = SockMap64::new(MAX_DESTINATIONS, true);

#[sk_lookup]
pub fn lookup_dispatcher(ctx: SkLookupContext) -> u32 {
    // Force the otherwise unreferenced control-plane maps into the object.
    let _ = (&raw const DESTINATIONS, &raw const META, &raw const WIDE);
    dispatch(&ctx)
}

#[inline(always)]
fn dispatch(ctx: &SkLookupContext) -> u32 {
    let Some((mut key, addr_bits)) = lookup_ebpf::destination_key(ctx) else {
        return SK_PASS;
    };
    let port = u16::from_be_bytes(key.port);

    // Host bindings: one entry per address holds its port 0 destination and
    // its first few ports; more ports, if any, sit in a second table.
    let port_bytes = key.port;
    key.port = [0, 0];
    if let Some(host) = unsafe { HOSTS.get(key) } {
        if port != 0 {
            for i in 0..HOST_INLINE_PORTS {
                if host.ports[i] == port {
                    return steer(ctx, host.destinations[i]);
                }
            }
            if host.more != 0 {
                key.port = port_bytes;
                if let Some(&destination) = unsafe { HOST_PORTS.get(key) } {
                    return steer(ctx, destination);
                }
                key.port = [0, 0];
            }
        }
        if host.default_destination != NO_DESTINATION {
            return steer(ctx, host.default_destination);
        }
    }

    // Wider prefixes: the longest prefix that carries a binding, then its
    // port table (the agent resolved precedence when it wrote the table).
    let Some(prefix) = PREFIXES.get(Key::new(KEY_HEADER_BITS + addr_bits, key)) else {
        return SK_PASS;
    };
    let entry = PortKey::new(prefix.table, port);
    if let Some(&destination) = unsafe { PORTS.get(entry) } {
        return steer(ctx, destination);
    }
    if prefix.default_destination != NO_DESTINATION {
        return steer(ctx, prefix.default_destination);
    }
    SK_PASS
}

#[inline(always)]
fn steer(ctx: &SkLookupContext, destination: u32) -> u32 {
    let Some(metrics) = METRICS.get_ptr_mut(destination) else {
        return SK_DROP;
    };
    // SAFETY: a per-CPU slot; nothing else on this CPU runs concurrently.
    let metrics = unsafe { &mut *metrics };
    metrics.lookups += 1;

    let sk = unsafe { bpf_map_lookup_elem(SOCKETS.as_ptr(), (&raw const destination).cast()) };
    if sk.is_null() {
        // A binding reserves its addresses even while its service is down.
        metrics.misses += 1;
        return SK_DROP;
    }
    let err = unsafe { bpf_sk_assign(ctx.as_ptr().cast(), sk.cast(), 0) };
    unsafe { bpf_sk_release(sk.cast()) };
    match err {
        0 => return SK_PASS,
        e if e == -EAFNOSUPPORT => metrics.errors_family += 1,
        e if e == -EPROTOTYPE => metrics.errors_protocol += 1,
        e if e == -ESOCKTNOSUPPORT => metrics.errors_state += 1,
        _ => metrics.errors_other += 1,
    }
    SK_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
