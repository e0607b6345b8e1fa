//! `lookupctl apply`: a batch of binds and unbinds from a file or stdin.

use std::{io::Read as _, path::Path};

use super::{Client, CmdResult};
use crate::proto::Request;

/// Reads, checks and sends a batch.
pub fn apply(client: &Client, file: Option<&Path>) -> CmdResult {
    let mut text = String::new();
    match file {
        None => std::io::stdin().read_to_string(&mut text),
        Some(p) if p == Path::new("-") => std::io::stdin().read_to_string(&mut text),
        Some(p) => std::fs::File::open(p).and_then(|mut f| f.read_to_string(&mut text)),
    }
    .map_err(|e| {
        let from = file.map_or("standard input".to_owned(), |p| p.display().to_string());
        format!("cannot read {from}: {e}")
    })?;
    // The agent checks every line (and names the bad one) before it
    // changes anything; checking here too would only parse twice.
    client.change(&Request::Apply { lines: text }, &[])
}
