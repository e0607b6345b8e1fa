//! lookup: an `sk_lookup` socket dispatcher. This library holds everything
//! but argument parsing: binding rules, the pinned BPF state, the agent and
//! its control protocol, and the CLI commands.

pub mod activation;
pub mod agent;
pub mod batch;
pub mod bench;
pub mod binding;
pub mod churn;
pub mod cli;
pub mod dispatcher;
pub mod hosts;
pub mod proto;
pub mod socket;
pub mod sys;
pub mod table;

/// An error and its sources on one line, `outer: inner: innermost`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        // Some errors embed their source's text; don't say it twice.
        if !msg.ends_with(&next) {
            msg.push_str(": ");
            msg.push_str(&next);
        }
        source = s.source();
    }
    msg
}
