//! `lookupctl register`, `register-pid` and `unregister`.

use std::{net::IpAddr, os::fd::AsFd as _};

use super::{Client, CmdResult};
use crate::{
    activation::{self, PassedSocket},
    binding::{Family, Label, Protocol, parse_port},
    proto::Request,
};

fn send(client: &Client, label: Label, sockets: Vec<PassedSocket>) -> CmdResult {
    if sockets.len() > crate::proto::MAX_FDS {
        return Err(format!(
            "{} sockets to register: at most {} at once",
            sockets.len(),
            crate::proto::MAX_FDS
        ));
    }
    let names = sockets.iter().map(|s| s.name.clone()).collect();
    let fds: Vec<_> = sockets.iter().map(|s| s.fd.as_fd()).collect();
    let result = client.change(&Request::Register { label, names }, &fds);
    // Our copies close here; the agent closed its own after registering, so
    // only the service keeps its sockets alive.
    drop(sockets);
    result
}

/// Registers the sockets systemd passed us.
pub fn register(client: &Client, label: &str) -> CmdResult {
    let label: Label = label
        .parse()
        .map_err(|e: crate::binding::ParseError| e.to_string())?;
    let sockets = activation::from_systemd().map_err(|e| crate::error_chain(&e))?;
    send(client, label, sockets)
}

/// Registers a socket copied out of a running process.
pub fn register_pid(
    client: &Client,
    target: &str,
    label: &str,
    protocol: &str,
    ip: &str,
    port: &str,
) -> CmdResult {
    let label: Label = label
        .parse()
        .map_err(|e: crate::binding::ParseError| e.to_string())?;
    let protocol: Protocol = protocol
        .parse()
        .map_err(|e: crate::binding::ParseError| e.to_string())?;
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| format!("invalid address {ip:?}: expected an IPv4 or IPv6 address"))?;
    let port = parse_port(port).map_err(|e| e.to_string())?;
    let sockets =
        activation::from_process(target, protocol, ip, port).map_err(|e| crate::error_chain(&e))?;
    send(client, label, sockets)
}

/// Removes a destination's socket.
pub fn unregister(client: &Client, label: &str, family: &str, protocol: &str) -> CmdResult {
    let parse_err = |e: crate::binding::ParseError| e.to_string();
    let request = Request::Unregister {
        label: label.parse().map_err(parse_err)?,
        family: family.parse::<Family>().map_err(parse_err)?,
        protocol: protocol.parse().map_err(parse_err)?,
    };
    client.change(&request, &[])
}
