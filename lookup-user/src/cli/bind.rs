//! `lookupctl bind` and `lookupctl unbind`.

use super::{Client, CmdResult};
use crate::{binding::Binding, proto::Request};

fn parse(label: &str, protocol: &str, prefix: &str, port: &str) -> Result<Binding, String> {
    Binding::parse(label, protocol, prefix, port).map_err(|e| e.to_string())
}

/// Adds a binding, or moves it to another label.
pub fn bind(client: &Client, label: &str, protocol: &str, prefix: &str, port: &str) -> CmdResult {
    let binding = parse(label, protocol, prefix, port)?;
    client.change(&Request::Bind { binding }, &[])
}

/// Removes a binding.
pub fn unbind(client: &Client, label: &str, protocol: &str, prefix: &str, port: &str) -> CmdResult {
    let binding = parse(label, protocol, prefix, port)?;
    client.change(&Request::Unbind { binding }, &[])
}
