//! Bindings as `lookupctl --json bindings` prints them, and the order check:
//! the first printed binding that matches a packet must be the one the data
//! plane picks.

use std::net::{IpAddr, SocketAddr};

use serde_json::Value;

use crate::client::Proto;

/// One binding from the JSON output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindingRow {
    /// Label.
    pub label: String,
    /// Protocol.
    pub protocol: Proto,
    /// Network address of the prefix.
    pub addr: IpAddr,
    /// Prefix length.
    pub len: u8,
    /// Port; 0 is every port.
    pub port: u16,
}

impl BindingRow {
    /// Whether a `proto` packet to `dst` matches this binding.
    pub fn matches(&self, proto: Proto, dst: SocketAddr) -> bool {
        self.protocol == proto
            && (self.port == 0 || self.port == dst.port())
            && prefix_contains(self.addr, self.len, dst.ip())
    }
}

/// Whether `ip` is inside `net/len`. Families never mix: an IPv6 prefix,
/// even `::/0`, contains no IPv4 address.
pub fn prefix_contains(net: IpAddr, len: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// Parses `"192.0.2.0/24"` or a bare address (a host prefix).
#[track_caller]
pub fn parse_prefix(s: &str) -> (IpAddr, u8) {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let addr: IpAddr = addr
        .parse()
        .unwrap_or_else(|e| panic!("prefix {s:?}: bad address: {e}"));
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = len.map_or(max, |l| {
        l.parse()
            .unwrap_or_else(|e| panic!("prefix {s:?}: bad length: {e}"))
    });
    assert!(len <= max, "prefix {s:?}: length over {max}");
    (addr, len)
}

/// Parses the `bindings` array of `lookupctl --json bindings` or `status`.
#[track_caller]
pub fn parse_bindings(json: &Value) -> Vec<BindingRow> {
    let rows = json["bindings"]
        .as_array()
        .unwrap_or_else(|| panic!("no \"bindings\" array in {json}"));
    rows.iter()
        .map(|b| {
            let field = |k: &str| {
                b.get(k)
                    .unwrap_or_else(|| panic!("binding without {k:?}: {b}"))
            };
            let protocol = match field("protocol").as_str() {
                Some("tcp") => Proto::Tcp,
                Some("udp") => Proto::Udp,
                other => panic!("binding with protocol {other:?}: {b}"),
            };
            let (addr, len) = parse_prefix(
                field("prefix")
                    .as_str()
                    .unwrap_or_else(|| panic!("prefix is not a string: {b}")),
            );
            let port = field("port")
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or_else(|| panic!("port is not a u16: {b}"));
            let label = field("label")
                .as_str()
                .unwrap_or_else(|| panic!("label is not a string: {b}"))
                .to_owned();
            BindingRow {
                label,
                protocol,
                addr,
                len,
                port,
            }
        })
        .collect()
}

/// The first binding, in the printed order, that a `proto` packet to `dst`
/// matches: what the data plane must pick if the order is right.
pub fn first_match(rows: &[BindingRow], proto: Proto, dst: SocketAddr) -> Option<&BindingRow> {
    rows.iter().find(|b| b.matches(proto, dst))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_contain_by_family() {
        let (n, l) = parse_prefix("192.0.2.0/24");
        assert!(prefix_contains(n, l, "192.0.2.77".parse().unwrap()));
        assert!(!prefix_contains(n, l, "192.0.3.1".parse().unwrap()));
        let (n, l) = parse_prefix("::/0");
        assert!(prefix_contains(n, l, "2001:db8::1".parse().unwrap()));
        assert!(!prefix_contains(n, l, "127.0.0.1".parse().unwrap()));
        let (n, l) = parse_prefix("0.0.0.0/0");
        assert!(prefix_contains(n, l, "127.0.0.1".parse().unwrap()));
        assert_eq!(parse_prefix("2001:db8::1").1, 128);
    }

    #[test]
    fn first_match_follows_printed_order() {
        let json: Value = serde_json::json!({"bindings": [
            {"label": "host", "protocol": "tcp", "prefix": "192.0.2.1/32", "port": 0},
            {"label": "net443", "protocol": "tcp", "prefix": "192.0.2.0/24", "port": 443},
            {"label": "any", "protocol": "tcp", "prefix": "0.0.0.0/0", "port": 0},
        ]});
        let rows = parse_bindings(&json);
        let pick =
            |a: &str| first_match(&rows, Proto::Tcp, a.parse().unwrap()).map(|b| b.label.as_str());
        assert_eq!(pick("192.0.2.1:443"), Some("host"));
        assert_eq!(pick("192.0.2.2:443"), Some("net443"));
        assert_eq!(pick("10.0.0.1:1"), Some("any"));
        assert_eq!(
            first_match(&rows, Proto::Udp, "10.0.0.1:1".parse().unwrap()),
            None
        );
    }
}
