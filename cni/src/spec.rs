//! What the CNI specification fixes, as sluice-cni uses it: the versions,
//! the error codes and the error object, the environment, `CNI_ARGS`, and
//! the ADD result (passed through from `prevResult`, converted between the
//! 0.x and 1.x shapes only when the config asks for the other one).
//!
//! Field names and codes follow SPEC.md of containernetworking/cni (1.1.0,
//! with 1.0.0, 0.4.0 and 0.3.x for older runtimes).

use std::collections::HashMap;
use std::net::IpAddr;

use serde_json::{json, Map, Value};

/// The spec versions this plugin speaks, oldest first. 0.3.0 differs from
/// 0.3.1 only by a typo fix in the text; the result shape is the same.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The newest version; used in error objects when the config's own version
/// is unknown or unsupported.
pub const LATEST: &str = "1.1.0";

/// Reserved error codes (SPEC.md, section 5, "Error").
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODING_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot service ADD requests.
    pub const NOT_AVAILABLE: u32 = 50;
    /// STATUS: as 50, and existing containers may have limited connectivity.
    pub const NOT_AVAILABLE_LIMITED: u32 = 51;
    /// Plugin-specific (100+): CHECK found an enrolled pod whose capture is
    /// not in place.
    pub const CAPTURE_MISSING: u32 = 100;
}

/// A CNI error, as printed on stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    /// Short; names what is wrong (the variable, the field, the socket).
    pub msg: String,
    /// Longer: the underlying reason.
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError { code, msg: msg.into(), details: String::new() }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// `{cniVersion, code, msg, details}`; `version` is the config's when it
    /// is one this plugin supports, else [`LATEST`].
    pub fn to_json(&self, version: Option<&str>) -> Value {
        let version = version.filter(|v| is_supported(v)).unwrap_or(LATEST);
        json!({"cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details})
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "code {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

pub fn is_supported(version: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&version)
}

/// Position in [`SUPPORTED_VERSIONS`]; `None` when unsupported.
fn rank(version: &str) -> Option<usize> {
    SUPPORTED_VERSIONS.iter().position(|v| *v == version)
}

/// `version` (supported) is at least `min` (supported).
pub fn at_least(version: &str, min: &str) -> bool {
    matches!((rank(version), rank(min)), (Some(a), Some(b)) if a >= b)
}

/// 1.0.0 removed `ips[].version`; results within a major version share one
/// shape.
fn is_v1(version: &str) -> bool {
    version.starts_with("1.")
}

/// The CNI commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Version,
    Gc,
}

impl Command {
    pub fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "VERSION" => Command::Version,
            "GC" => Command::Gc,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Version => "VERSION",
            Command::Gc => "GC",
        }
    }

    /// The first spec version that has this command.
    pub fn since(self) -> &'static str {
        match self {
            Command::Check => "0.4.0",
            Command::Status | Command::Gc => "1.1.0",
            _ => "0.3.0",
        }
    }

    /// The environment variables the spec requires for this command (beyond
    /// `CNI_COMMAND`). `CNI_PATH` is required by the spec for most commands,
    /// but this plugin delegates to nothing, so it is not insisted on.
    pub fn required_env(self) -> &'static [&'static str] {
        match self {
            Command::Add | Command::Check => &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"],
            Command::Del => &["CNI_CONTAINERID", "CNI_IFNAME"],
            Command::Status | Command::Version | Command::Gc => &[],
        }
    }
}

/// `CNI_ARGS`: `K=V` pairs separated by `;`. Empty segments are tolerated
/// (a trailing `;`); a segment without `=` or with an empty key is an error.
/// Later keys win, as in libcni.
pub fn parse_cni_args(s: &str) -> Result<HashMap<String, String>, CniError> {
    let mut out = HashMap::new();
    for pair in s.split(';') {
        if pair.is_empty() {
            continue;
        }
        match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                out.insert(k.to_owned(), v.to_owned());
            }
            _ => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("CNI_ARGS: invalid pair {pair:?} (want KEY=VALUE)"),
                ))
            }
        }
    }
    Ok(out)
}

fn plain_id(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// `CNI_CONTAINERID`: an alphanumeric, then alphanumerics, `_`, `.`, `-`.
pub fn check_container_id(id: &str) -> Result<(), CniError> {
    if plain_id(id) {
        Ok(())
    } else {
        Err(CniError::new(code::INVALID_ENV, format!("CNI_CONTAINERID {id:?} has invalid characters")))
    }
}

/// The network `name`: same alphabet as a container id.
pub fn check_network_name(name: &str) -> Result<(), CniError> {
    if plain_id(name) {
        Ok(())
    } else {
        Err(CniError::new(code::INVALID_CONFIG, format!("network name {name:?} has invalid characters")))
    }
}

/// `CNI_IFNAME`: a Linux interface name (1 to 15 bytes, not `.`/`..`, no
/// `/`, `:` or white space).
pub fn check_ifname(name: &str) -> Result<(), CniError> {
    let bad = name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace());
    if bad {
        Err(CniError::new(code::INVALID_ENV, format!("CNI_IFNAME {name:?} is not a valid interface name")))
    } else {
        Ok(())
    }
}

/// A result with nothing in it, for `version` (ADD with no `prevResult`).
pub fn empty_result(version: &str) -> Value {
    json!({"cniVersion": version, "interfaces": [], "ips": [], "routes": [], "dns": {}})
}

/// What ADD prints: `prevResult` itself when it already is of the config's
/// version (byte for byte, `raw` as received), else converted to it.
pub fn pass_through(raw: &str, conf_version: &str) -> Result<Vec<u8>, CniError> {
    let prev: Value = serde_json::from_str(raw)
        .map_err(|e| CniError::new(code::DECODING_FAILURE, "prevResult does not decode").with_details(e.to_string()))?;
    let Value::Object(mut obj) = prev else {
        return Err(CniError::new(code::INVALID_CONFIG, "prevResult is not a JSON object"));
    };
    let from = match obj.get("cniVersion") {
        None => None,
        Some(Value::String(v)) => Some(v.clone()),
        Some(other) => {
            return Err(CniError::new(code::INVALID_CONFIG, format!("prevResult.cniVersion {other} is not a string")))
        }
    };
    if from.as_deref() == Some(conf_version) {
        return Ok(raw.trim().as_bytes().to_vec());
    }
    if let Some(from) = &from {
        if !is_supported(from) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("prevResult is version {from}, which cannot be converted to {conf_version}"),
            )
            .with_details(format!("supported versions: {}", SUPPORTED_VERSIONS.join(", "))));
        }
        convert_ips(&mut obj, from, conf_version);
    }
    obj.insert("cniVersion".into(), Value::String(conf_version.into()));
    Ok(serde_json::to_vec(&Value::Object(obj)).expect("a Value always serializes"))
}

/// 0.x results carry `ips[].version` ("4"/"6"); 1.x results do not.
fn convert_ips(obj: &mut Map<String, Value>, from: &str, to: &str) {
    if is_v1(from) == is_v1(to) {
        return;
    }
    let Some(Value::Array(ips)) = obj.get_mut("ips") else { return };
    for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
        if is_v1(to) {
            ip.remove("version");
        } else if !ip.contains_key("version") {
            let family = ip.get("address").and_then(Value::as_str).and_then(|a| parse_cidr(a).ok()).map(|(a, _)| {
                if a.is_ipv4() {
                    "4"
                } else {
                    "6"
                }
            });
            if let Some(family) = family {
                ip.insert("version".into(), Value::String(family.into()));
            }
        }
    }
}

/// `"10.1.0.5/16"` → (10.1.0.5, 16). A bare address is accepted too.
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| format!("{s:?} is not an IP address in CIDR notation"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => match p.parse::<u8>() {
            Ok(n) if n <= max => n,
            _ => return Err(format!("{s:?} has an invalid prefix length")),
        },
    };
    Ok((addr, prefix))
}

/// The pod's addresses from a result: every `ips[].address`, except those
/// whose `interface` points at a host-side interface (one without a
/// `sandbox`), and except loopback, unspecified and multicast addresses.
/// In order, without duplicates.
pub fn pod_ips(result: &Value) -> Result<Vec<IpAddr>, CniError> {
    let bad = |m: String| CniError::new(code::INVALID_CONFIG, m);
    let ips = match result.get("ips") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(bad("prevResult.ips is not a list".into())),
    };
    let interfaces = result.get("interfaces").and_then(Value::as_array);
    let mut out = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let Some(address) = ip.get("address").and_then(Value::as_str) else {
            return Err(bad(format!("prevResult.ips[{i}].address is missing or not a string")));
        };
        let (addr, _) = parse_cidr(address).map_err(|e| bad(format!("prevResult.ips[{i}].address: {e}")))?;
        let host_side = ip
            .get("interface")
            .and_then(Value::as_u64)
            .and_then(|idx| interfaces.and_then(|ifs| ifs.get(idx as usize)))
            .is_some_and(|iface| iface.get("sandbox").and_then(Value::as_str).unwrap_or("").is_empty());
        if host_side || addr.is_loopback() || addr.is_unspecified() || addr.is_multicast() {
            continue;
        }
        if !out.contains(&addr) {
            out.push(addr);
        }
    }
    Ok(out)
}

/// A Kubernetes pod UID as kubelet writes it: lowercase 8-4-4-4-12 hex.
pub fn is_pod_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// RFC 1123 label: 1 to 63 of `[a-z0-9-]`, alphanumeric at both ends.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: up to 253 bytes of dot-separated labels.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args() {
        let a = parse_cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=x;").unwrap();
        assert_eq!(a["K8S_POD_NAMESPACE"], "shop");
        assert_eq!(a["K8S_POD_NAME"], "web-0");
        assert_eq!(parse_cni_args("").unwrap().len(), 0);
        assert_eq!(parse_cni_args("A=b=c").unwrap()["A"], "b=c");
        assert_eq!(parse_cni_args("A=").unwrap()["A"], "");
        for bad in ["A", "A=1;B", "=1"] {
            assert_eq!(parse_cni_args(bad).unwrap_err().code, code::INVALID_ENV, "{bad}");
        }
    }

    #[test]
    fn ids_and_names() {
        assert!(check_container_id("c0ffee12_ab.c-d").is_ok());
        for bad in ["", "-x", "a/b", "a b", "_a"] {
            assert_eq!(check_container_id(bad).unwrap_err().code, code::INVALID_ENV, "{bad:?}");
        }
        assert!(check_ifname("eth0").is_ok());
        assert!(check_ifname("123456789012345").is_ok());
        for bad in ["", ".", "..", "1234567890123456", "a/b", "a:b", "a b"] {
            assert_eq!(check_ifname(bad).unwrap_err().code, code::INVALID_ENV, "{bad:?}");
        }
        assert_eq!(check_network_name("bad name").unwrap_err().code, code::INVALID_CONFIG);
        assert!(is_pod_uid("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"));
        for bad in [
            "",
            "0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0",
            "0f1e2d3c4b5a69788796a5b4c3d2e1f0",
            "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f",
        ] {
            assert!(!is_pod_uid(bad), "{bad}");
        }
        assert!(is_dns_label("kube-system") && !is_dns_label("Kube") && !is_dns_label("-a") && !is_dns_label(""));
        assert!(is_dns_subdomain("web-0.shop") && !is_dns_subdomain("web..0") && !is_dns_subdomain(&"a".repeat(254)));
    }

    #[test]
    fn versions() {
        assert!(at_least("1.1.0", "1.1.0") && at_least("1.1.0", "0.4.0") && !at_least("1.0.0", "1.1.0"));
        assert!(!at_least("0.3.1", "0.4.0") && !at_least("2.0.0", "0.3.0"));
        assert_eq!(Command::Check.since(), "0.4.0");
        assert_eq!(Command::parse("add"), None);
    }

    #[test]
    fn error_object() {
        let e = CniError::new(code::TRY_AGAIN_LATER, "agent down").with_details("ENOENT");
        assert_eq!(
            e.to_json(Some("0.4.0")),
            json!({"cniVersion": "0.4.0", "code": 11, "msg": "agent down", "details": "ENOENT"})
        );
        assert_eq!(e.to_json(Some("9.9.9"))["cniVersion"], LATEST);
        assert_eq!(e.to_json(None)["cniVersion"], LATEST);
    }

    #[test]
    fn pass_through_is_byte_exact_for_the_same_version() {
        let raw = r#"{ "cniVersion":"1.0.0", "zeta": 1, "ips": [{"address": "10.1.0.5/16", "interface": 2}], "alpha": {"x": [1,2]} }"#;
        assert_eq!(pass_through(raw, "1.0.0").unwrap(), raw.as_bytes());
    }

    #[test]
    fn pass_through_converts_between_major_versions() {
        let v04 = r#"{"cniVersion":"0.4.0","ips":[{"version":"4","address":"10.1.0.5/16"},{"version":"6","address":"fd00::5/64"}],"dns":{}}"#;
        let out: Value = serde_json::from_slice(&pass_through(v04, "1.0.0").unwrap()).unwrap();
        assert_eq!(
            out,
            json!({"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5/16"}, {"address": "fd00::5/64"}], "dns": {}})
        );
        let back: Value = serde_json::from_slice(&pass_through(&out.to_string(), "0.3.1").unwrap()).unwrap();
        assert_eq!(back["ips"][0]["version"], "4");
        assert_eq!(back["ips"][1]["version"], "6");
        assert_eq!(back["cniVersion"], "0.3.1");
        // Same major: only the version changes.
        let out: Value =
            serde_json::from_slice(&pass_through(r#"{"cniVersion":"1.0.0","ips":[],"x":1}"#, "1.1.0").unwrap())
                .unwrap();
        assert_eq!(out, json!({"cniVersion": "1.1.0", "ips": [], "x": 1}));
        // No version: the config's.
        let out: Value = serde_json::from_slice(&pass_through(r#"{"ips":[]}"#, "1.0.0").unwrap()).unwrap();
        assert_eq!(out["cniVersion"], "1.0.0");
        assert_eq!(
            pass_through(r#"{"cniVersion":"0.2.0","ip4":{}}"#, "1.0.0").unwrap_err().code,
            code::INCOMPATIBLE_VERSION
        );
        assert_eq!(pass_through("[1]", "1.0.0").unwrap_err().code, code::INVALID_CONFIG);
    }

    #[test]
    fn ips_from_a_bridge_result() {
        let result = json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0", "mac": "aa:bb:cc:dd:ee:ff"},
                {"name": "veth1", "mac": "aa:bb:cc:dd:ee:00"},
                {"name": "eth0", "mac": "aa:bb:cc:dd:ee:01", "sandbox": "/var/run/netns/p"}
            ],
            "ips": [
                {"address": "10.1.0.5/16", "gateway": "10.1.0.1", "interface": 2},
                {"address": "fd00::5/64", "interface": 2},
                {"address": "10.1.0.5/16", "interface": 2},
                {"address": "192.168.0.1/24", "interface": 0},
                {"address": "127.0.0.1/8"},
                {"address": "10.9.9.9"}
            ]
        });
        let ips = pod_ips(&result).unwrap();
        assert_eq!(
            ips,
            vec!["10.1.0.5".parse::<IpAddr>().unwrap(), "fd00::5".parse().unwrap(), "10.9.9.9".parse().unwrap()]
        );
        assert!(pod_ips(&json!({})).unwrap().is_empty());
        for bad in [
            json!({"ips": [{"address": "nope"}]}),
            json!({"ips": [{}]}),
            json!({"ips": 1}),
            json!({"ips": [{"address": "10.0.0.1/33"}]}),
        ] {
            assert_eq!(pod_ips(&bad).unwrap_err().code, code::INVALID_CONFIG, "{bad}");
        }
    }
}
