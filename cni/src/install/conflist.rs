//! The edits to a CNI config, on JSON values; nothing here touches a file.
//!
//! Checks mirror what libcni requires before a runtime uses a file
//! (`ConfFromBytes`, `ConfListFromBytes`): an object; a `.conf` with a
//! non-empty string `type`; a `.conflist` with a string `name` and a
//! non-empty `plugins` array of such objects; `name` and `cniVersion` are
//! strings when present. Every other field is carried over untouched, in
//! its order (serde_json's `preserve_order`).

use anyhow::{bail, Result};
use serde_json::{Map, Value};

use super::conf_dir::Kind;
use super::PLUGIN_TYPE;

fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parse `bytes` as a config of `kind`; the error says what is wrong, in
/// words for the operator.
pub fn parse(kind: Kind, bytes: &[u8]) -> Result<Value, String> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON ({e})"))?;
    let Value::Object(map) = &value else {
        return Err(format!("not a JSON object but {}", kind_name(&value)));
    };
    for key in ["name", "cniVersion"] {
        if let Some(v) = map.get(key).filter(|v| !v.is_string()) {
            return Err(format!("\"{key}\" is {}, not a string", kind_name(v)));
        }
    }
    match kind {
        Kind::Conf => {
            check_type(map).map_err(|e| format!("{e} (a conflist saved with a .conf or .json name?)"))?;
        }
        Kind::List => {
            if !map.contains_key("name") {
                return Err("no \"name\"".into());
            }
            match map.get("plugins") {
                None => return Err("no \"plugins\"".into()),
                Some(Value::Array(p)) if p.is_empty() => return Err("\"plugins\" is empty".into()),
                Some(Value::Array(p)) => {
                    for (i, plugin) in p.iter().enumerate() {
                        let Value::Object(plugin) = plugin else {
                            return Err(format!("plugins[{i}] is {}, not an object", kind_name(plugin)));
                        };
                        check_type(plugin).map_err(|e| format!("plugins[{i}]: {e}"))?;
                    }
                }
                Some(other) => return Err(format!("\"plugins\" is {}, not an array", kind_name(other))),
            }
        }
    }
    Ok(value)
}

fn check_type(plugin: &Map<String, Value>) -> Result<(), String> {
    match plugin.get("type") {
        Some(Value::String(t)) if !t.is_empty() => Ok(()),
        Some(Value::String(_)) => Err("\"type\" is empty".into()),
        Some(other) => Err(format!("\"type\" is {}, not a string", kind_name(other))),
        None => Err("no \"type\"".into()),
    }
}

/// The chain's version must be one sluice-cni speaks: the runtime hands it
/// to every plugin of the list, and sluice-cni refuses the others.
pub fn check_version(config: &Value) -> Result<()> {
    let supported = crate::spec::SUPPORTED_VERSIONS;
    match config.get("cniVersion").and_then(Value::as_str) {
        None => bail!("no \"cniVersion\"; sluice-cni needs one of {}", supported.join(", ")),
        Some(v) if !supported.contains(&v) => {
            bail!("cniVersion {v:?} is not one sluice-cni supports ({})", supported.join(", "))
        }
        Some(_) => {}
    }
    // libcni 1.2+ picks the newest of `cniVersions` it knows; any of them
    // may reach the plugin.
    if let Some(list) = config.get("cniVersions") {
        let Some(list) = list.as_array() else { bail!("\"cniVersions\" is {}, not an array", kind_name(list)) };
        for v in list {
            match v.as_str() {
                Some(s) if supported.contains(&s) => {}
                _ => bail!("cniVersions lists {v}, which sluice-cni does not support ({})", supported.join(", ")),
            }
        }
    }
    Ok(())
}

pub fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

pub fn plugins(list: &Value) -> &[Value] {
    list.get("plugins").and_then(Value::as_array).map_or(&[][..], Vec::as_slice)
}

pub fn has_entry(list: &Value) -> bool {
    plugins(list).iter().any(is_ours)
}

/// Nothing in `config` but sluice-cni: nothing to chain after.
pub fn only_ours(config: &Value, kind: Kind) -> bool {
    match kind {
        Kind::Conf => is_ours(config),
        Kind::List => plugins(config).iter().all(is_ours),
    }
}

/// `list` with `f` applied to its plugins, every other key in place.
fn map_plugins(list: &Value, f: impl FnOnce(Vec<Value>) -> Vec<Value>) -> Value {
    let mut out = list.clone();
    if let Some(Value::Array(p)) = out.get_mut("plugins") {
        *p = f(std::mem::take(p));
    }
    out
}

/// `list` without any sluice-cni entry.
pub fn without_entry(list: &Value) -> Value {
    map_plugins(list, |p| p.into_iter().filter(|x| !is_ours(x)).collect())
}

/// `list` with `entry` as its last plugin. An entry already there is
/// replaced (settings change on reinstall) and moved last if something was
/// appended after it; a second copy, however it got there, is dropped.
pub fn with_entry(list: &Value, entry: &Value) -> Value {
    map_plugins(list, |p| {
        let mut p: Vec<Value> = p.into_iter().filter(|x| !is_ours(x)).collect();
        p.push(entry.clone());
        p
    })
}

/// What libcni's `ConfListFromConf` makes of a single-plugin config:
/// `{cniVersion, name, plugins: [the conf without those two]}`.
pub fn conf_to_list(conf: &Value) -> Value {
    let Value::Object(conf) = conf else { return conf.clone() };
    let mut list = Map::new();
    if let Some(v) = conf.get("cniVersion") {
        list.insert("cniVersion".into(), v.clone());
    }
    list.insert("name".into(), conf.get("name").cloned().unwrap_or_else(|| Value::String(String::new())));
    // Filtered rather than `remove`d: with preserve_order, `Map::remove` is
    // a swap_remove and would move the last key into the hole.
    let plugin: Map<String, Value> = conf
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "cniVersion" | "name"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    list.insert("plugins".into(), Value::Array(vec![Value::Object(plugin)]));
    Value::Object(list)
}

/// Two-space indented, with a final newline, as most CNIs write theirs.
pub fn render(config: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(config).unwrap_or_default();
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parse_names_what_is_wrong() {
        let cases: &[(Kind, &str, &str)] = &[
            (Kind::List, "{", "not valid JSON"),
            (Kind::List, "[1]", "not a JSON object but an array"),
            (Kind::List, r#"{"name":"x"}"#, "no \"plugins\""),
            (Kind::List, r#"{"name":"x","plugins":[]}"#, "\"plugins\" is empty"),
            (Kind::List, r#"{"name":"x","plugins":{}}"#, "\"plugins\" is an object, not an array"),
            (Kind::List, r#"{"name":"x","plugins":[7]}"#, "plugins[0] is a number"),
            (Kind::List, r#"{"name":"x","plugins":[{"type":""}]}"#, "plugins[0]: \"type\" is empty"),
            (Kind::List, r#"{"plugins":[{"type":"a"}]}"#, "no \"name\""),
            (Kind::List, r#"{"name":1,"plugins":[{"type":"a"}]}"#, "\"name\" is a number"),
            (Kind::Conf, r#"{"name":"x"}"#, "no \"type\""),
            (Kind::Conf, r#"{"type":"x","cniVersion":1}"#, "\"cniVersion\" is a number"),
        ];
        for (kind, text, want) in cases {
            let err = parse(*kind, text.as_bytes()).expect_err(text);
            assert!(err.contains(want), "{text}: {err:?} lacks {want:?}");
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let text = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(parse(Kind::List, text.as_bytes()).unwrap_err().contains("recursion limit"));
    }

    #[test]
    fn versions() {
        for v in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
            check_version(&json!({"cniVersion": v})).unwrap();
        }
        let e = check_version(&json!({"cniVersion": "0.2.0"})).unwrap_err().to_string();
        assert!(e.contains("\"0.2.0\" is not one sluice-cni supports (0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0)"), "{e}");
        assert!(check_version(&json!({})).unwrap_err().to_string().contains("no \"cniVersion\""));
        let e = check_version(&json!({"cniVersion": "1.0.0", "cniVersions": ["1.0.0", "1.2.0"]})).unwrap_err();
        assert!(e.to_string().contains("\"1.2.0\""), "{e}");
    }

    #[test]
    fn conf_to_list_keeps_the_rest_in_order() {
        let conf: Value =
            serde_json::from_str(r#"{"type":"flannel","name":"cbr0","z":1,"cniVersion":"0.3.1","a":2}"#).unwrap();
        let list = conf_to_list(&conf);
        assert_eq!(
            serde_json::to_string(&list).unwrap(),
            r#"{"cniVersion":"0.3.1","name":"cbr0","plugins":[{"type":"flannel","z":1,"a":2}]}"#
        );
    }

    #[test]
    fn with_entry_replaces_and_moves_last() {
        let list = json!({"name": "n", "plugins": [
            {"type": "a"}, {"type": "sluice-cni", "old": 1}, {"type": "b"}, {"type": "sluice-cni"}
        ]});
        let out = with_entry(&list, &json!({"type": "sluice-cni", "new": 2}));
        assert_eq!(
            out,
            json!({"name": "n", "plugins": [{"type": "a"}, {"type": "b"}, {"type": "sluice-cni", "new": 2}]})
        );
        assert_eq!(without_entry(&out), json!({"name": "n", "plugins": [{"type": "a"}, {"type": "b"}]}));
    }
}
