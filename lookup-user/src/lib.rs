//! lookup: an `sk_lookup` socket dispatcher. This library holds everything
//! but argument parsing: binding rules, the pinned BPF state, the agent and
//! its control protocol, and the CLI commands.

pub mod binding;
pub mod proto;
