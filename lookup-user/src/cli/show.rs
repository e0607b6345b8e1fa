//! `lookupctl bindings` and `lookupctl status`: read-only.

use super::{Client, CmdResult};
use crate::{
    binding::{Binding, Label},
    proto::{Request, Response, Status},
};

fn port(p: u16) -> String {
    if p == 0 { "any".into() } else { p.to_string() }
}

fn print_bindings(bindings: &[Binding]) {
    let w = bindings
        .iter()
        .map(|b| b.label.as_str().len())
        .max()
        .unwrap_or(0)
        .max(5);
    let pw = bindings
        .iter()
        .map(|b| b.prefix.to_string().len())
        .max()
        .unwrap_or(0)
        .max(6);
    println!("{:<w$}  {:<5}  {:<pw$}  PORT", "LABEL", "PROTO", "PREFIX");
    for b in bindings {
        println!(
            "{:<w$}  {:<5}  {:<pw$}  {}",
            b.label.as_str(),
            b.protocol.to_string(),
            b.prefix.to_string(),
            port(b.port)
        );
    }
}

fn json(value: &impl serde::Serialize) -> CmdResult {
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    println!("{text}");
    Ok(())
}

/// Prints every binding in precedence order.
pub fn bindings(client: &Client, as_json: bool) -> CmdResult {
    match client.call(&Request::Bindings, &[])? {
        Response::Bindings { bindings } if as_json => {
            #[derive(serde::Serialize)]
            struct Out<'a> {
                bindings: &'a [Binding],
            }
            json(&Out {
                bindings: &bindings,
            })
        }
        Response::Bindings { bindings } => {
            print_bindings(&bindings);
            Ok(())
        }
        other => Err(format!("unexpected answer from lookupd: {other:?}")),
    }
}

/// Prints bindings, destinations and counters.
pub fn status(client: &Client, label: Option<&str>, as_json: bool) -> CmdResult {
    let label: Option<Label> = label
        .map(str::parse)
        .transpose()
        .map_err(|e: crate::binding::ParseError| e.to_string())?;
    let status: Status = match client.call(&Request::Status { label }, &[])? {
        Response::Status(s) => s,
        other => return Err(format!("unexpected answer from lookupd: {other:?}")),
    };
    if as_json {
        return json(&status);
    }
    println!("Bindings:");
    print_bindings(&status.bindings);
    println!();
    println!("Destinations:");
    let w = status
        .destinations
        .iter()
        .map(|d| d.label.as_str().len())
        .max()
        .unwrap_or(0)
        .max(5);
    println!(
        "{:<w$}  {:<6}  {:<5}  {:>4}  {:<22}  {:>8}  {:>10}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}",
        "LABEL",
        "FAMILY",
        "PROTO",
        "ID",
        "SOCKET",
        "BINDINGS",
        "LOOKUPS",
        "MISSES",
        "E-FAMILY",
        "E-PROTO",
        "E-STATE",
        "E-OTHER"
    );
    for d in &status.destinations {
        let socket = d
            .socket_cookie
            .map_or_else(|| "absent".to_owned(), |c| format!("cookie {c}"));
        let m = d.metrics;
        println!(
            "{:<w$}  {:<6}  {:<5}  {:>4}  {:<22}  {:>8}  {:>10}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}",
            d.label.as_str(),
            d.family.to_string(),
            d.protocol.to_string(),
            d.id,
            socket,
            d.bindings,
            m.lookups,
            m.misses,
            m.errors_family,
            m.errors_protocol,
            m.errors_state,
            m.errors_other
        );
    }
    Ok(())
}
