//! Bindings: which (protocol, prefix, port) goes to which label, how user
//! input becomes one, and the precedence the data plane applies.

use std::{
    cmp::Ordering,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use lookup_common::{
    BindingKey, FAMILY_V4, FAMILY_V6, KEY_HEADER_BITS, MAX_LABEL_LEN, PROTO_TCP, PROTO_UDP,
};
use serde::{Deserialize, Serialize};

/// Errors in user input describing a binding. Each names the input.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// Not `tcp` or `udp`.
    #[error("invalid protocol {0:?}: expected tcp or udp")]
    Protocol(String),
    /// Not `ipv4` or `ipv6`.
    #[error("invalid address family {0:?}: expected ipv4 or ipv6")]
    Family(String),
    /// Not an integer in 0..=65535.
    #[error("invalid port {0:?}: expected 0..=65535 (0 means every port)")]
    Port(String),
    /// The address part does not parse.
    #[error(
        "invalid prefix {0:?}: not an IPv4 or IPv6 address in full form (e.g. 192.0.2.0/24, 2001:db8::/32)"
    )]
    Address(String),
    /// The length part does not parse or is too long for the family.
    #[error("invalid prefix {input:?}: {family} prefix length must be 0..={max}")]
    PrefixLength {
        /// What the user typed.
        input: String,
        /// `IPv4` or `IPv6`.
        family: &'static str,
        /// 32 or 128.
        max: u8,
    },
    /// Bits set past the prefix length.
    #[error("invalid prefix {input:?}: host bits are set; did you mean {masked}?")]
    HostBits {
        /// What the user typed.
        input: String,
        /// The prefix with host bits cleared.
        masked: String,
    },
    /// An IPv4-mapped IPv6 prefix.
    #[error(
        "invalid prefix {input:?}: IPv4-mapped IPv6 addresses are not accepted; use the IPv4 form {hint}"
    )]
    Mapped {
        /// What the user typed.
        input: String,
        /// The IPv4 form to use instead.
        hint: String,
    },
    /// Empty, too long, or containing a control character.
    #[error("invalid label {input:?}: {reason}")]
    Label {
        /// What the user typed (truncated if long).
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Transport protocol of a binding or destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// The `IPPROTO_*` number.
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
        }
    }

    /// From an `IPPROTO_*` number.
    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            PROTO_TCP => Some(Self::Tcp),
            PROTO_UDP => Some(Self::Udp),
            _ => None,
        }
    }
}

impl FromStr for Protocol {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        match s {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            _ => Err(ParseError::Protocol(s.to_owned())),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// Address family of a binding or destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// AF_INET.
    Ipv4,
    /// AF_INET6.
    Ipv6,
}

impl Family {
    /// The `AF_*` number.
    pub const fn number(self) -> u8 {
        match self {
            Self::Ipv4 => FAMILY_V4,
            Self::Ipv6 => FAMILY_V6,
        }
    }

    /// From an `AF_*` number.
    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            FAMILY_V4 => Some(Self::Ipv4),
            FAMILY_V6 => Some(Self::Ipv6),
            _ => None,
        }
    }

    /// Address length in bits.
    pub const fn bits(self) -> u8 {
        match self {
            Self::Ipv4 => 32,
            Self::Ipv6 => 128,
        }
    }
}

impl FromStr for Family {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        match s {
            "ipv4" => Ok(Self::Ipv4),
            "ipv6" => Ok(Self::Ipv6),
            _ => Err(ParseError::Family(s.to_owned())),
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ipv4 => "ipv4",
            Self::Ipv6 => "ipv6",
        })
    }
}

/// Parses a port: 0..=65535, 0 meaning every port.
pub fn parse_port(s: &str) -> Result<u16, ParseError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::Port(s.to_owned()));
    }
    s.parse::<u16>().map_err(|_| ParseError::Port(s.to_owned()))
}

/// An IP prefix whose host bits are zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

impl Prefix {
    /// A prefix, or `None` if `len` is too long or host bits are set.
    pub fn new(addr: IpAddr, len: u8) -> Option<Self> {
        let p = Self { addr, len };
        (len <= p.family().bits() && p.masked_addr() == addr).then_some(p)
    }

    /// The network address.
    pub const fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    #[expect(
        clippy::len_without_is_empty,
        reason = "the length of a prefix, not of a collection"
    )]
    pub const fn len(&self) -> u8 {
        self.len
    }

    /// IPv4 or IPv6.
    pub const fn family(&self) -> Family {
        match self.addr {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }

    /// Whether this is a single address (/32 or /128).
    pub const fn is_host(&self) -> bool {
        self.len == self.family().bits()
    }

    /// Whether `ip` falls inside this prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                Self::mask(ip, self.len) == self.addr
            }
            _ => false,
        }
    }

    fn masked_addr(&self) -> IpAddr {
        Self::mask(self.addr, self.len)
    }

    fn mask(addr: IpAddr, len: u8) -> IpAddr {
        match addr {
            IpAddr::V4(a) => {
                let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
            }
            IpAddr::V6(a) => {
                let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
            }
        }
    }

    /// Address bytes as the data plane stores them.
    pub fn addr_bytes(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        match self.addr {
            IpAddr::V4(a) => out[..4].copy_from_slice(&a.octets()),
            IpAddr::V6(a) => out.copy_from_slice(&a.octets()),
        }
        out
    }
}

impl FromStr for Prefix {
    type Err = ParseError;

    /// `ip` or `ip/len`. A bare IP is a host prefix.
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = ip.parse().map_err(|_| ParseError::Address(s.to_owned()))?;
        if let IpAddr::V6(v6) = addr
            && let Some(v4) = v6.to_ipv4_mapped()
        {
            {
                let hint = match len.and_then(|l| l.parse::<u8>().ok()) {
                    Some(l) if (96..128).contains(&l) => {
                        let l = l - 96;
                        let m = u32::MAX.checked_shl(32 - u32::from(l)).unwrap_or(0);
                        format!("{}/{l}", Ipv4Addr::from(u32::from(v4) & m))
                    }
                    _ => v4.to_string(),
                };
                return Err(ParseError::Mapped {
                    input: s.to_owned(),
                    hint,
                });
            }
        }
        let family = match addr {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        };
        let max = family.bits();
        let len = match len {
            None => max,
            Some(l) => match l.parse::<u8>() {
                // `"+8".parse::<u8>()` succeeds; a prefix length is digits only.
                Ok(n) if n <= max && l.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => {
                    return Err(ParseError::PrefixLength {
                        input: s.to_owned(),
                        family: if family == Family::Ipv4 {
                            "IPv4"
                        } else {
                            "IPv6"
                        },
                        max,
                    });
                }
            },
        };
        let masked = Self::mask(addr, len);
        if masked != addr {
            return Err(ParseError::HostBits {
                input: s.to_owned(),
                masked: format!("{masked}/{len}"),
            });
        }
        Ok(Self { addr, len })
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Serialize for Prefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A label: 1..=255 bytes of UTF-8 without control characters, whitespace
/// or `#` (so that every label can be written in a batch line).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Label(String);

impl Label {
    /// The label as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A label read back from pinned state: what an earlier lookupd
    /// accepted (1 to 255 bytes without control characters; whitespace and
    /// `#` were allowed then), so its bindings are never orphaned.
    pub fn from_stored(s: &str) -> Option<Self> {
        (!s.is_empty() && s.len() <= MAX_LABEL_LEN && !s.chars().any(char::is_control))
            .then(|| Self(s.to_owned()))
    }
}

impl FromStr for Label {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let err = |reason| {
            let mut input: String = s.chars().take(40).collect();
            if input.len() < s.len() {
                input.push('…');
            }
            Err(ParseError::Label { input, reason })
        };
        if s.is_empty() {
            return err("a label must not be empty");
        }
        if s.len() > MAX_LABEL_LEN {
            return err("a label must be at most 255 bytes");
        }
        if s.chars().any(char::is_control) {
            return err("a label must not contain control characters");
        }
        // A batch line is words split by whitespace, with `#` starting a
        // comment: a label with either could be bound but never named there.
        if s.chars().any(|c| c.is_whitespace() || c == '#') {
            return err("a label must not contain whitespace or '#'");
        }
        Ok(Self(s.to_owned()))
    }
}

impl<'de> Deserialize<'de> for Label {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where traffic is matched: everything of a binding but its label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Selector {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Destination prefix.
    pub prefix: Prefix,
    /// Destination port; 0 means every port.
    pub port: u16,
}

impl Selector {
    /// The data-plane key: the full key for a host binding, the trie data
    /// (to be masked by [`Selector::trie_prefix_len`]) for a wider one.
    pub fn key(&self) -> BindingKey {
        BindingKey {
            protocol: self.protocol.number(),
            family: self.prefix.family().number(),
            port: self.port.to_be_bytes(),
            addr: self.prefix.addr_bytes(),
        }
    }

    /// The LPM prefix length of this selector in the trie.
    pub fn trie_prefix_len(&self) -> u32 {
        KEY_HEADER_BITS + u32::from(self.prefix.len())
    }

    /// Rebuilds a selector from a data-plane key and address prefix length.
    pub fn from_key(key: &BindingKey, prefix_len: u8) -> Option<Self> {
        let protocol = Protocol::from_number(key.protocol)?;
        let addr = match Family::from_number(key.family)? {
            Family::Ipv4 => IpAddr::V4(Ipv4Addr::new(
                key.addr[0],
                key.addr[1],
                key.addr[2],
                key.addr[3],
            )),
            Family::Ipv6 => IpAddr::V6(Ipv6Addr::from(key.addr)),
        };
        Some(Self {
            protocol,
            prefix: Prefix::new(addr, prefix_len)?,
            port: u16::from_be_bytes(key.port),
        })
    }

    /// Whether a lookup for (protocol, ip, port) can match this selector.
    pub fn matches(&self, protocol: Protocol, ip: IpAddr, port: u16) -> bool {
        self.protocol == protocol
            && self.prefix.contains(ip)
            && (self.port == 0 || self.port == port)
    }

    /// Precedence order: the first selector in this order that matches a
    /// lookup is the one the data plane picks. IPv4 before IPv6 (they never
    /// compete); then longer prefixes first; at equal length a specific port
    /// before port 0; the rest only makes the order total.
    pub fn precedence(&self, other: &Self) -> Ordering {
        self.prefix
            .family()
            .cmp(&other.prefix.family())
            .then_with(|| other.prefix.len().cmp(&self.prefix.len()))
            .then_with(|| (self.port == 0).cmp(&(other.port == 0)))
            .then_with(|| self.protocol.cmp(&other.protocol))
            .then_with(|| self.prefix.addr().cmp(&other.prefix.addr()))
            .then_with(|| self.port.cmp(&other.port))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} port {}", self.protocol, self.prefix, self.port)
    }
}

/// A binding: traffic matching a selector goes to a label.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    /// The label whose socket takes the traffic.
    pub label: Label,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Destination prefix.
    pub prefix: Prefix,
    /// Destination port; 0 means every port.
    pub port: u16,
}

impl Binding {
    /// Parses the CLI's `<label> <tcp|udp> <prefix> <port>`.
    pub fn parse(
        label: &str,
        protocol: &str,
        prefix: &str,
        port: &str,
    ) -> Result<Self, ParseError> {
        Ok(Self {
            label: label.parse()?,
            protocol: protocol.parse()?,
            prefix: prefix.parse()?,
            port: parse_port(port)?,
        })
    }

    /// Everything but the label.
    pub fn selector(&self) -> Selector {
        Selector {
            protocol: self.protocol,
            prefix: self.prefix,
            port: self.port,
        }
    }

    /// Sorts bindings into precedence order (see [`Selector::precedence`]).
    pub fn sort(bindings: &mut [Binding]) {
        bindings.sort_by(|a, b| {
            a.selector()
                .precedence(&b.selector())
                .then_with(|| a.label.cmp(&b.label))
        });
    }

    /// The binding a lookup picks: the first match in precedence order.
    pub fn select(
        sorted: &[Binding],
        protocol: Protocol,
        ip: IpAddr,
        port: u16,
    ) -> Option<&Binding> {
        sorted
            .iter()
            .find(|b| b.selector().matches(protocol, ip, port))
    }
}

impl fmt::Display for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.selector(), self.label)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> String {
        s.parse::<Prefix>().unwrap_err().to_string()
    }

    #[test]
    fn prefixes_parse_and_reject_with_hints() {
        assert_eq!(
            "10.0.0.0/8".parse::<Prefix>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            "127.0.0.1".parse::<Prefix>().unwrap().to_string(),
            "127.0.0.1/32"
        );
        assert_eq!("2001:db8::".parse::<Prefix>().unwrap().len(), 128);
        assert_eq!("::/0".parse::<Prefix>().unwrap().len(), 0);
        assert_eq!("0.0.0.0/0".parse::<Prefix>().unwrap().len(), 0);

        assert!(err("10.0.0.1/33").contains("\"10.0.0.1/33\""));
        assert!(err("10.0.0.1/33").contains("0..=32"));
        assert!(err("::/129").contains("0..=128"));
        assert!(err("10.0.0.0/+8").contains("0..=32"));
        assert!(err("10.0.0.0/").contains("0..=32"));
        assert!(err("127.1").contains("\"127.1\""));
        assert!(err("").contains("invalid prefix"));
        assert!(err("10.0.0.1/8").contains("did you mean 10.0.0.0/8?"));
        assert!(err("2001:db8::1/32").contains("2001:db8::/32"));
        let mapped = err("::ffff:192.0.2.1");
        assert!(mapped.contains("use the IPv4 form 192.0.2.1"), "{mapped}");
        assert!(err("::ffff:192.0.2.0/120").contains("192.0.2.0/24"));
        assert!(
            err("::ffff:192.0.2.1/120").contains("192.0.2.0/24"),
            "hint must be valid"
        );
    }

    #[test]
    fn ports_protocols_families_labels() {
        assert_eq!(parse_port("0").unwrap(), 0);
        assert_eq!(parse_port("65535").unwrap(), 65535);
        for bad in ["65536", "-1", "", "+1", "80a", "99999999999"] {
            let e = parse_port(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
        assert_eq!("tcp".parse::<Protocol>().unwrap(), Protocol::Tcp);
        assert!(
            "sctp"
                .parse::<Protocol>()
                .unwrap_err()
                .to_string()
                .contains("\"sctp\"")
        );
        assert!("TCP".parse::<Protocol>().is_err());
        assert!(
            "ipv5"
                .parse::<Family>()
                .unwrap_err()
                .to_string()
                .contains("\"ipv5\"")
        );
        assert!(
            "".parse::<Label>()
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
        assert!(
            "a".repeat(256)
                .parse::<Label>()
                .unwrap_err()
                .to_string()
                .contains("255")
        );
        assert!("a".repeat(255).parse::<Label>().is_ok());
        assert!("a\nb".parse::<Label>().is_err());
        assert!("a\0b".parse::<Label>().is_err());
        // Every label can be written in a batch line.
        for bad in ["a b", "a\u{a0}b", "a#b", "#a"] {
            let e = bad.parse::<Label>().unwrap_err().to_string();
            assert!(e.contains("whitespace or '#'"), "{bad:?}: {e}");
        }
        assert!("café-ünïcode_1.2".parse::<Label>().is_ok());
    }

    fn b(label: &str, proto: &str, prefix: &str, port: u16) -> Binding {
        Binding::parse(label, proto, prefix, &port.to_string()).unwrap()
    }

    #[test]
    fn precedence_table() {
        let mut set = vec![
            b("wild24", "tcp", "192.0.2.0/24", 0),
            b("port24", "tcp", "192.0.2.0/24", 443),
            b("host-any", "tcp", "192.0.2.1", 0),
            b("host-80", "tcp", "192.0.2.1", 80),
            b("all", "tcp", "0.0.0.0/0", 0),
            b("udp", "udp", "192.0.2.0/24", 0),
            b("v6all", "tcp", "::/0", 0),
            b("v6host", "tcp", "2001:db8::1", 443),
        ];
        Binding::sort(&mut set);
        let pick = |proto: Protocol, ip: &str, port| {
            Binding::select(&set, proto, ip.parse().unwrap(), port).map(|b| b.label.as_str())
        };
        let t = Protocol::Tcp;
        let cases = [
            (t, "192.0.2.1", 80, Some("host-80")),
            (t, "192.0.2.1", 443, Some("host-any")), // longer prefix beats port
            (t, "192.0.2.2", 443, Some("port24")),
            (t, "192.0.2.2", 22, Some("wild24")),
            (t, "198.51.100.1", 22, Some("all")),
            (Protocol::Udp, "192.0.2.1", 80, Some("udp")),
            (Protocol::Udp, "198.51.100.1", 80, None),
            (t, "2001:db8::1", 443, Some("v6host")),
            (t, "2001:db8::1", 80, Some("v6all")),
        ];
        for (proto, ip, port, want) in cases {
            assert_eq!(pick(proto, ip, port), want, "{proto} {ip}:{port}");
        }
        // The human order puts the most specific first.
        assert_eq!(set[0].label.as_str(), "host-80");
        assert_eq!(set.last().unwrap().label.as_str(), "v6all");
    }

    #[test]
    fn keys_round_trip() {
        for (prefix, port) in [
            ("192.0.2.0/24", 80),
            ("2001:db8::/32", 0),
            ("10.1.2.3", 65535),
        ] {
            let s = b("x", "udp", prefix, port).selector();
            assert_eq!(Selector::from_key(&s.key(), s.prefix.len()), Some(s));
        }
    }
}
