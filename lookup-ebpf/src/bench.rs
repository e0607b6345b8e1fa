//! Baselines for `cargo xtask bench`, measured beside the dispatcher:
//!
//! - `bench_pass`: returns `SK_PASS`; the cost of the hook and the harness.
//! - `bench_floor`: one sockmap lookup and assign; no dispatcher can do less.
//! - `bench_reference`: the textbook design (tubular's): one LPM trie keyed by
//!   protocol, port and prefix, looked up with the port and again with port
//!   0, the wildcard winning only with a strictly longer prefix.
//!
//! None of these maps is pinned; the bench loads and fills them itself.

#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        EbpfContext as _,
        bindings::{sk_action::SK_DROP, sk_action::SK_PASS},
        helpers::{bpf_map_lookup_elem, bpf_sk_assign, bpf_sk_release},
        macros::{map, sk_lookup},
        maps::{LpmTrie, lpm_trie::Key},
        programs::SkLookupContext,
    };
    use lookup_common::{
        BindingKey, BindingValue, KEY_HEADER_BITS, MAX_BINDINGS, MAX_DESTINATIONS,
    };
    use lookup_ebpf::SockMap64;

    #[map(name = "REF_BINDINGS")]
    static REF_BINDINGS: LpmTrie<BindingKey, BindingValue> =
        LpmTrie::with_max_entries(MAX_BINDINGS, 0);

    #[unsafe(link_section = "maps")]
    #[unsafe(export_name = "REF_SOCKETS")]
    static REF_SOCKETS: SockMap64 = SockMap64::new(MAX_DESTINATIONS, false);

    #[inline(always)]
    fn assign(ctx: &SkLookupContext, index: u32) -> u32 {
        let sk = unsafe { bpf_map_lookup_elem(REF_SOCKETS.as_ptr(), (&raw const index).cast()) };
        if sk.is_null() {
            return SK_DROP;
        }
        let err = unsafe { bpf_sk_assign(ctx.as_ptr().cast(), sk.cast(), 0) };
        unsafe { bpf_sk_release(sk.cast()) };
        if err == 0 { SK_PASS } else { SK_DROP }
    }

    #[sk_lookup]
    pub fn bench_pass(_ctx: SkLookupContext) -> u32 {
        SK_PASS
    }

    #[sk_lookup]
    pub fn bench_floor(ctx: SkLookupContext) -> u32 {
        assign(&ctx, 0)
    }

    /// The floor for live traffic: steers only port 53 (the bench's UDP
    /// target), so replies to the client take the normal lookup.
    #[sk_lookup]
    pub fn bench_floor_port(ctx: SkLookupContext) -> u32 {
        // SAFETY: the kernel hands the program a valid context.
        let port = unsafe { core::ptr::read_volatile(&raw const (*ctx.lookup).local_port) };
        if port == 53 { assign(&ctx, 0) } else { SK_PASS }
    }

    #[sk_lookup]
    pub fn bench_reference(ctx: SkLookupContext) -> u32 {
        let Some((mut key, bits)) = lookup_ebpf::destination_key(&ctx) else {
            return SK_PASS;
        };
        let specific = REF_BINDINGS.get(Key::new(KEY_HEADER_BITS + bits, key));
        key.port = [0, 0];
        let wildcard = REF_BINDINGS.get(Key::new(KEY_HEADER_BITS + bits, key));
        let chosen = match (specific, wildcard) {
            (Some(s), Some(w)) if w.prefix_len > s.prefix_len => w,
            (Some(s), _) => s,
            (None, Some(w)) => w,
            (None, None) => return SK_PASS,
        };
        assign(&ctx, chosen.destination)
    }

    #[cfg(not(test))]
    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
