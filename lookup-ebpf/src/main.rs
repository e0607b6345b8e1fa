//! The `sk_lookup` dispatcher: picks the socket for a new TCP connection or
//! UDP datagram from the bindings the agent wrote.
//!
//! Precedence, exactly as the agent orders bindings for humans:
//! the protocol and family must match, the longest prefix wins, and at equal
//! prefix length a specific port beats port 0. Host bindings (/32, /128) have
//! the longest prefix possible, so an exact-match hash table answers them
//! before the trie is touched. Wider prefixes take one trie lookup, for the
//! longest prefix that carries any binding, and one hash lookup in that
//! prefix's port table, which the agent computed from the prefix and its
//! ancestors (see `lookup-user/src/table.rs`).

#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod dispatcher;

/// Built for the host (`cargo build --workspace`, clippy), the crate is
/// empty: the program exists only for `bpfel-unknown-none`.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
