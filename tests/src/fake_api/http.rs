//! Request routing and the non-streaming handlers: GET one object, LIST, TokenReview.

use super::resources::{self, status, ResourceType, TYPES};
use super::selector::{FieldSelector, LabelSelector};
use super::store::{Key, Shared};
use super::{watch, RequestRecord, TokenReviewRecord};
use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn json_response(code: u16, v: &Value) -> Response<Body> {
    let body = Full::new(Bytes::from(serde_json::to_vec(v).unwrap_or_default())).map_err(|e| match e {}).boxed_unsync();
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    resp
}

pub fn error(code: u16, message: &str) -> Response<Body> {
    json_response(code, &status(code, resources::reason_for(code), message))
}

fn not_found_path() -> Response<Body> {
    error(404, "the server could not find the requested resource")
}

/// Decode an `application/x-www-form-urlencoded` component.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let (mut out, mut i) = (Vec::with_capacity(b.len()), 0);
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hexval = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
                match hexval.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// Selectors from the query, or the message of the 400 the API server would answer.
pub fn selectors(ty: usize, q: &HashMap<String, String>) -> Result<(LabelSelector, FieldSelector), String> {
    let labels = LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))
        .map_err(|e| format!("unable to parse requirement: {e}"))?;
    let fields = FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str), TYPES[ty].fields)?;
    Ok((labels, fields))
}

/// Target of a resource URL: type, namespace of the path (if any), object name (if any).
struct Target {
    ty: usize,
    ns: Option<String>,
    name: Option<String>,
}

fn route(path: &str) -> Option<Target> {
    let segs: Vec<String> = path.trim_matches('/').split('/').map(decode).collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let find = |plural: &str| resources::by_path(group, version, plural);
    let t = match rest {
        [plural] => Target { ty: find(plural)?, ns: None, name: None },
        ["namespaces", ns, plural] => Target { ty: find(plural)?, ns: Some(ns.to_string()), name: None },
        ["namespaces", ns, plural, name] => {
            Target { ty: find(plural)?, ns: Some(ns.to_string()), name: Some(name.to_string()) }
        }
        [plural, name] => Target { ty: find(plural)?, ns: None, name: Some(name.to_string()) },
        _ => return None,
    };
    let ns_ok = match (&t.ns, &t.name) {
        (Some(_), _) => TYPES[t.ty].namespaced,
        (None, Some(_)) => !TYPES[t.ty].namespaced,
        (None, None) => true,
    };
    ns_ok.then_some(t)
}

pub async fn handle(shared: Arc<Shared>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let path_and_query = req.uri().path_and_query().map_or_else(|| req.uri().path().to_string(), |p| p.to_string());
    let record = RequestRecord { method: req.method().to_string(), path_and_query, at: Instant::now() };
    shared.lock().requests.push(record);
    let path = req.uri().path().to_string();
    let query = parse_query(req.uri().query());
    if path == "/apis/authentication.k8s.io/v1/tokenreviews" {
        return match *req.method() {
            Method::POST => token_review(&shared, req).await,
            _ => error(405, "the server does not allow this method on the requested resource"),
        };
    }
    if path == "/version" {
        return json_response(
            200,
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake", "platform": "linux/amd64"}),
        );
    }
    let Some(t) = route(&path) else { return not_found_path() };
    let rt: &ResourceType = &TYPES[t.ty];
    if rt.crd && !shared.lock().crds_installed {
        return not_found_path();
    }
    if req.method() != Method::GET {
        return error(405, "the server does not allow this method on the requested resource");
    }
    match t.name {
        Some(name) => get(&shared, t.ty, (t.ns.unwrap_or_default(), name)),
        None if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) => {
            watch::watch(shared.clone(), t.ty, t.ns, &query)
        }
        None => list(&shared, t.ty, t.ns.as_deref(), &query),
    }
}

fn get(shared: &Shared, ty: usize, key: Key) -> Response<Body> {
    match shared.lock().objects[ty].get(&key) {
        Some(obj) => json_response(200, obj),
        None => {
            let rt = &TYPES[ty];
            let mut st = status(404, "NotFound", &format!("{}{} \"{}\" not found", rt.plural, group_suffix(rt), key.1));
            st["details"] = json!({"name": key.1, "group": rt.group, "kind": rt.plural});
            json_response(404, &st)
        }
    }
}

fn group_suffix(rt: &ResourceType) -> String {
    if rt.group.is_empty() {
        String::new()
    } else {
        format!(".{}", rt.group)
    }
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    let bytes: Option<Vec<u8>> =
        (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect();
    String::from_utf8(bytes?).ok()
}

/// Continue token: the list's resourceVersion and the last key returned, so later pages are read
/// from the same starting point and the final page carries the first page's resourceVersion.
fn decode_continue(token: &str) -> Option<(u64, Key)> {
    let s = unhex(token)?;
    let mut parts = s.splitn(3, '\0');
    let rv = parts.next()?.parse().ok()?;
    Some((rv, (parts.next()?.to_string(), parts.next()?.to_string())))
}

fn list(shared: &Shared, ty: usize, ns: Option<&str>, q: &HashMap<String, String>) -> Response<Body> {
    let (labels, fields) = match selectors(ty, q) {
        Ok(s) => s,
        Err(msg) => return error(400, &msg),
    };
    let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
        None => usize::MAX,
        Some(Ok(0)) => usize::MAX,
        Some(Ok(n)) => n,
        Some(Err(_)) => return error(400, "limit must be a non-negative integer"),
    };
    let start = match q.get("continue").filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => match decode_continue(c) {
            Some(s) => Some(s),
            None => return error(400, "continue key is not valid"),
        },
    };
    let state = shared.lock();
    let rv = start.as_ref().map_or(state.rv, |(rv, _)| *rv);
    if start.is_some() && rv < state.floor {
        return error(410, "The provided continue parameter is too old to display a consistent list result.");
    }
    let rt = &TYPES[ty];
    let lower = match &start {
        Some((_, k)) => std::ops::Bound::Excluded(k.clone()),
        None => std::ops::Bound::Unbounded,
    };
    let mut items = Vec::new();
    let mut next = None;
    for (key, obj) in state.objects[ty].range((lower, std::ops::Bound::Unbounded)) {
        if ns.is_some_and(|ns| ns != key.0) || !labels.matches(obj) || !fields.matches(obj) {
            continue;
        }
        if items.len() == limit {
            next = Some(hex(&format!("{rv}\0{}\0{}", items_last(&items).0, items_last(&items).1)));
            break;
        }
        let mut obj = obj.clone();
        obj["kind"] = json!(rt.kind);
        obj["apiVersion"] = json!(rt.api_version());
        items.push((key.clone(), obj));
    }
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let Some(c) = next {
        metadata["continue"] = json!(c);
    }
    let items: Vec<Value> = items.into_iter().map(|(_, o)| o).collect();
    json_response(
        200,
        &json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(), "metadata": metadata, "items": items}),
    )
}

fn items_last(items: &[(Key, Value)]) -> &Key {
    &items[items.len() - 1].0
}

async fn token_review(shared: &Shared, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let body = match Limited::new(req.into_body(), 1 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(400, &format!("reading the request body: {e}")),
    };
    let mut review: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return error(400, "the request body is not a JSON object"),
        Err(e) => return error(400, &format!("the request body is not valid JSON: {e}")),
    };
    let Some(token) = review.pointer("/spec/token").and_then(Value::as_str).map(str::to_string) else {
        return error(400, "TokenReview.authentication.k8s.io is invalid: spec.token: Required value");
    };
    let audiences: Vec<String> = review
        .pointer("/spec/audiences")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let callback = {
        let mut state = shared.lock();
        state.token_reviews.push(TokenReviewRecord { token: token.clone(), audiences: audiences.clone() });
        state.token_review.clone()
    };
    let answer = callback.and_then(|f| f(&token, &audiences));
    review["kind"] = json!("TokenReview");
    review["apiVersion"] = json!("authentication.k8s.io/v1");
    if !review.get("metadata").is_some_and(Value::is_object) {
        review["metadata"] = json!({});
    }
    review["status"] = match answer {
        Some((username, groups)) => json!({
            "authenticated": true,
            "user": {"username": username, "groups": groups},
            "audiences": audiences,
        }),
        None => json!({"authenticated": false, "user": {}, "error": "[invalid bearer token]"}),
    };
    json_response(201, &review)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_and_routes() {
        assert_eq!(decode("a%3Db+in+%28x%2Cy%29%"), "a=b in (x,y)%");
        assert_eq!(decode("%zz%4"), "%zz%4");
        assert!(route("/api/v1/pods").is_some() && route("/api/v1/namespaces/default").is_some());
        assert!(route("/api/v1/pods/x").is_none() && route("/api/v1/namespaces/a/namespaces").is_none());
        let t = route("/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices/e").unwrap();
        assert_eq!((t.ns.as_deref(), t.name.as_deref()), (Some("ns"), Some("e")));
        assert_eq!(decode_continue(&hex("7\0ns\0n")), Some((7, ("ns".into(), "n".into()))));
    }
}
