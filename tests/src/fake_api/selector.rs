//! `labelSelector` and `fieldSelector` query parameters, parsed and matched the way the API server does.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum Req {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector; requirements are ANDed. The empty selector matches everything.
#[derive(Debug, Clone, Default)]
pub struct LabelSelector(Vec<Req>);

/// Split on commas that are not inside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn valid_key(k: &str) -> bool {
    !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

fn valid_value(v: &str) -> bool {
    v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn set_values(rest: &str) -> Result<Vec<String>, String> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("expected a parenthesised set of values, got {rest:?}"))?;
    let vals: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
    if vals.iter().any(|v| !valid_value(v)) {
        return Err(format!("invalid value in set {rest:?}"));
    }
    Ok(vals)
}

/// Find ` word ` (as a whole word) in `s`; returns (key, rest).
fn split_word<'a>(s: &'a str, word: &str) -> Option<(&'a str, &'a str)> {
    let idx = s.find(&format!(" {word}"))?;
    let rest = s[idx + 1 + word.len()..].trim_start();
    rest.starts_with('(').then(|| (s[..idx].trim(), rest))
}

fn parse_req(raw: &str) -> Result<Req, String> {
    let s = raw.trim();
    if let Some(k) = s.strip_prefix('!') {
        let k = k.trim();
        return if valid_key(k) { Ok(Req::NotExists(k.into())) } else { Err(format!("invalid key {k:?}")) };
    }
    let (req, key) = if let Some((k, rest)) = split_word(s, "notin") {
        (Req::NotIn(k.into(), set_values(rest)?), k)
    } else if let Some((k, rest)) = split_word(s, "in") {
        (Req::In(k.into(), set_values(rest)?), k)
    } else if let Some((k, v)) = s.split_once("!=") {
        (Req::NotEq(k.trim().into(), v.trim().into()), k.trim())
    } else if let Some((k, v)) = s.split_once("==") {
        (Req::Eq(k.trim().into(), v.trim().into()), k.trim())
    } else if let Some((k, v)) = s.split_once('=') {
        (Req::Eq(k.trim().into(), v.trim().into()), k.trim())
    } else {
        (Req::Exists(s.into()), s)
    };
    if !valid_key(key) {
        return Err(format!("invalid label key {key:?} in {raw:?}"));
    }
    if let Req::Eq(_, v) | Req::NotEq(_, v) = &req {
        if !valid_value(v) {
            return Err(format!("invalid label value {v:?} in {raw:?}"));
        }
    }
    Ok(req)
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.trim().is_empty() {
            return Ok(Self::default());
        }
        split_top(s).into_iter().map(parse_req).collect::<Result<_, _>>().map(LabelSelector)
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels");
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Req::Eq(k, v) => get(k) == Some(v.as_str()),
            Req::NotEq(k, v) => get(k) != Some(v.as_str()),
            Req::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Req::NotIn(k, vs) => get(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
            Req::Exists(k) => get(k).is_some(),
            Req::NotExists(k) => get(k).is_none(),
        })
    }
}

/// A parsed field selector over the few fields the fake supports.
#[derive(Debug, Clone, Default)]
pub struct FieldSelector(Vec<(&'static str, bool, String)>);

const META_FIELDS: &[(&str, &str)] =
    &[("metadata.name", "/metadata/name"), ("metadata.namespace", "/metadata/namespace")];

impl FieldSelector {
    /// Parse against the keys one resource type supports (besides `metadata.name`/`metadata.namespace`).
    pub fn parse(s: &str, type_fields: &[(&'static str, &'static str)]) -> Result<Self, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, eq, val) = if let Some((k, v)) = part.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = part.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = part.split_once('=') {
                (k, true, v)
            } else {
                return Err(format!("invalid selector: '{part}'; can't understand '{part}'"));
            };
            let key = key.trim();
            let ptr = META_FIELDS
                .iter()
                .chain(type_fields)
                .find(|(name, _)| *name == key)
                .map(|(_, ptr)| *ptr)
                .ok_or_else(|| format!("field label not supported: {key}"))?;
            out.push((ptr, eq, val.trim().to_string()));
        }
        Ok(FieldSelector(out))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(ptr, eq, val)| {
            let got = match obj.pointer(ptr) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Bool(b)) => b.to_string(),
                Some(Value::Number(n)) => n.to_string(),
                _ => String::new(),
            };
            (got == *val) == *eq
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_forms() {
        let o = json!({"metadata": {"labels": {"app": "web", "tier": "front"}}});
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(&o);
        assert!(m("app=web") && m("app==web") && m("app!=db") && m("app") && m("!zone"));
        assert!(m("app in (web, db),tier notin (back)") && m("zone notin (a)"));
        assert!(!m("app=db") && !m("zone") && !m("!app") && !m("app in (db)") && !m("app=web,tier=back"));
        assert!(LabelSelector::parse("=x").is_err() && LabelSelector::parse("a in b").is_err());
    }

    #[test]
    fn field_forms() {
        let o = json!({"metadata": {"name": "p", "namespace": "ns"}, "spec": {"nodeName": "n1", "hostNetwork": false}});
        let pods = crate::fake_api::resources::TYPES[0].fields;
        let m = |s: &str| FieldSelector::parse(s, pods).unwrap().matches(&o);
        assert!(m("spec.nodeName=n1") && m("metadata.name==p,metadata.namespace!=x"));
        assert!(m("spec.hostNetwork=false") && m("status.phase!=Running") && !m("spec.nodeName!=n1"));
        assert!(FieldSelector::parse("spec.bogus=x", pods).is_err());
        assert!(FieldSelector::parse("spec.nodeName=n1", &[]).is_err());
    }
}
