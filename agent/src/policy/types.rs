//! Leaf types of the authorization model: CIDR blocks and `when` conditions.
//!
//! The policy structs themselves are in `crate::state` (`state/authz.rs`);
//! these live here so that the config model, the evaluator and the Istio
//! translation can all name them (`crate::state` re-exports a fixed list).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An IP block (`ipBlocks`, `source.ip`, `destination.ip`): a CIDR, or a bare
/// address meaning a /32 or /128. Host bits are cleared, as Istio does.
/// An IPv4-mapped IPv6 block of /96 or longer is stored as the IPv4 block it
/// denotes, because peers are compared in canonical (IPv4) form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpBlock {
    network: IpAddr,
    prefix_len: u8,
}

impl IpBlock {
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<IpBlock, String> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            let family = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
            return Err(format!("prefix length {prefix_len} is longer than {max} for {family}"));
        }
        let (addr, prefix_len) = match addr {
            IpAddr::V6(v6) if prefix_len >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), prefix_len - 96),
                None => (addr, prefix_len),
            },
            _ => (addr, prefix_len),
        };
        let network = match addr {
            IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask_v4(prefix_len))),
            IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask_v6(prefix_len))),
        };
        Ok(IpBlock { network, prefix_len })
    }

    pub fn network(&self) -> IpAddr {
        self.network
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// IPv4-mapped IPv6 addresses are compared as IPv4; an IPv4 block never
    /// contains a (non-mapped) IPv6 address, nor the reverse.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => u32::from(ip) & mask_v4(self.prefix_len) == u32::from(net),
            (IpAddr::V6(net), IpAddr::V6(ip)) => u128::from(ip) & mask_v6(self.prefix_len) == u128::from(net),
            _ => false,
        }
    }
}

fn mask_v4(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn mask_v6(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

impl FromStr for IpBlock {
    type Err = String;

    fn from_str(text: &str) -> Result<IpBlock, String> {
        let (addr_text, len_text) = match text.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (text, None),
        };
        let addr: IpAddr = addr_text.parse().map_err(|_| {
            format!("{text:?} is not an IP address or CIDR block (expected e.g. 10.0.0.0/8, 10.1.2.3 or fd00::/8)")
        })?;
        let prefix_len = match len_text {
            None if addr.is_ipv4() => 32,
            None => 128,
            Some(l) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) && l.len() <= 3 => {
                l.parse::<u8>().map_err(|_| format!("{text:?}: prefix length {l} is too long"))?
            }
            Some(l) => return Err(format!("{text:?}: prefix length {l:?} is not a number")),
        };
        IpBlock::new(addr, prefix_len).map_err(|e| format!("{text:?}: {e}"))
    }
}

impl fmt::Display for IpBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl Serialize for IpBlock {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

// Errors are raised inside a visitor so that serde_yaml reports them at the
// element (`ipBlocks[2]`), not at the list.
impl<'de> Deserialize<'de> for IpBlock {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<IpBlock, D::Error> {
        struct BlockVisitor;
        impl Visitor<'_> for BlockVisitor {
            type Value = IpBlock;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an IP address or CIDR block")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<IpBlock, E> {
                text.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(BlockVisitor)
    }
}

/// Positive and negative values of one `when` condition: it holds when the
/// value is one of `values` (if any are given) and none of `not_values`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Values<T> {
    pub values: Vec<T>,
    pub not_values: Vec<T>,
}

/// One `when` condition, restricted to the keys known at connection setup
/// (the five ztunnel enforces). Written `{key, values, notValues}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "ConditionSpec")]
pub enum Condition {
    /// `source.ip`: the peer's address (the TCP peer, not X-Forwarded-For).
    SourceIp(Values<IpBlock>),
    /// `source.namespace`: from the peer's verified identity.
    SourceNamespace(Values<String>),
    /// `source.principal`: patterns over `<td>/ns/<ns>/sa/<sa>`.
    SourcePrincipal(Values<String>),
    /// `destination.ip`: the address the client reached.
    DestinationIp(Values<IpBlock>),
    /// `destination.port`: the port the client reached.
    DestinationPort(Values<u16>),
}

/// The `when` keys this agent enforces, as Istio spells them.
pub const L4_CONDITION_KEYS: [&str; 5] =
    ["source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"];

/// Why a `{key, values, notValues}` is not a [`Condition`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConditionError {
    /// The key needs more than L4 (e.g. `request.headers[...]`) or is unknown.
    UnsupportedKey(String),
    /// Neither `values` nor `notValues` is given.
    NoValues,
    /// `field` is relative to the condition, e.g. `values[1]`.
    BadValue { field: String, reason: String },
}

impl fmt::Display for ConditionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConditionError::UnsupportedKey(key) => {
                write!(f, "key {key:?} is not enforceable at L4; supported keys are {}", L4_CONDITION_KEYS.join(", "))
            }
            ConditionError::NoValues => f.write_str("a condition needs values or notValues"),
            ConditionError::BadValue { field, reason } => write!(f, "{field}: {reason}"),
        }
    }
}

impl Condition {
    /// Parses one condition. Strings are kept as written (patterns are
    /// checked by the caller, which knows its field path).
    pub fn parse(key: &str, values: &[String], not_values: &[String]) -> Result<Condition, ConditionError> {
        if !L4_CONDITION_KEYS.contains(&key) {
            return Err(ConditionError::UnsupportedKey(key.to_string()));
        }
        if values.is_empty() && not_values.is_empty() {
            return Err(ConditionError::NoValues);
        }
        fn each<T>(
            values: &[String],
            not_values: &[String],
            parse: impl Fn(&str) -> Result<T, String>,
        ) -> Result<Values<T>, ConditionError> {
            let list = |items: &[String], name: &str| {
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        parse(v).map_err(|reason| ConditionError::BadValue { field: format!("{name}[{i}]"), reason })
                    })
                    .collect::<Result<Vec<T>, _>>()
            };
            Ok(Values { values: list(values, "values")?, not_values: list(not_values, "notValues")? })
        }
        let strings = |v: &str| if v.is_empty() { Err("must not be empty".to_string()) } else { Ok(v.to_string()) };
        Ok(match key {
            "source.ip" => Condition::SourceIp(each(values, not_values, str::parse)?),
            "destination.ip" => Condition::DestinationIp(each(values, not_values, str::parse)?),
            "destination.port" => Condition::DestinationPort(each(values, not_values, parse_port)?),
            "source.namespace" => Condition::SourceNamespace(each(values, not_values, strings)?),
            _ => Condition::SourcePrincipal(each(values, not_values, strings)?),
        })
    }

    pub fn key(&self) -> &'static str {
        match self {
            Condition::SourceIp(_) => "source.ip",
            Condition::SourceNamespace(_) => "source.namespace",
            Condition::SourcePrincipal(_) => "source.principal",
            Condition::DestinationIp(_) => "destination.ip",
            Condition::DestinationPort(_) => "destination.port",
        }
    }
}

/// A destination port written as a string, as Istio's schema has it.
pub fn parse_port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(0) => Err("port 0 is not a valid destination port; use 1..=65535".to_string()),
        Ok(port) if !text.starts_with('+') => Ok(port),
        _ => Err(format!("{text:?} is not a port number (1..=65535); named ports are not supported")),
    }
}

/// The written form: `{key, values, notValues}`, values as strings (ports
/// may also be written as numbers).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConditionSpec {
    key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    values: Vec<Scalar>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    not_values: Vec<Scalar>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
enum Scalar {
    Text(String),
    Number(u64),
}

impl Scalar {
    fn into_string(self) -> String {
        match self {
            Scalar::Text(s) => s,
            Scalar::Number(n) => n.to_string(),
        }
    }
}

// Parsed inside a visitor so that serde_yaml reports errors at the element
// (`when[0]`), not at the list.
impl<'de> Deserialize<'de> for Condition {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Condition, D::Error> {
        struct ConditionVisitor;
        impl<'de> Visitor<'de> for ConditionVisitor {
            type Value = Condition;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a condition {key, values, notValues}")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Condition, A::Error> {
                let spec = ConditionSpec::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Condition::try_from(spec).map_err(de::Error::custom)
            }
        }
        d.deserialize_map(ConditionVisitor)
    }
}

impl TryFrom<ConditionSpec> for Condition {
    type Error = String;

    fn try_from(spec: ConditionSpec) -> Result<Condition, String> {
        let strings = |v: Vec<Scalar>| v.into_iter().map(Scalar::into_string).collect::<Vec<_>>();
        Condition::parse(&spec.key, &strings(spec.values), &strings(spec.not_values)).map_err(|e| e.to_string())
    }
}

impl From<Condition> for ConditionSpec {
    fn from(c: Condition) -> ConditionSpec {
        fn texts<T: ToString>(key: &str, v: Values<T>) -> ConditionSpec {
            let text = |items: Vec<T>| items.iter().map(|i| Scalar::Text(i.to_string())).collect();
            ConditionSpec { key: key.to_string(), values: text(v.values), not_values: text(v.not_values) }
        }
        let key = c.key();
        match c {
            Condition::SourceIp(v) | Condition::DestinationIp(v) => texts(key, v),
            Condition::SourceNamespace(v) | Condition::SourcePrincipal(v) => texts(key, v),
            Condition::DestinationPort(v) => texts(key, v),
        }
    }
}
