//! The object store: objects by (type, namespace, name), a global resourceVersion, a bounded change
//! history for watches, and the test knobs (CRDs installed, watch epoch, token review callback).

use super::resources::{self, TYPES};
use super::{RequestRecord, TokenReviewRecord};
use anyhow::{anyhow, bail, Context};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How many changes a watch can resume across; older resourceVersions answer 410 Expired.
pub const HISTORY_CAP: usize = 10_000;

/// (namespace or "", name)
pub type Key = (String, String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Added,
    Modified,
    Deleted,
}

/// One change, with the object before and after so a watch can tell an object entering or leaving its selector.
#[derive(Debug, Clone)]
pub struct Event {
    pub rv: u64,
    pub ty: usize,
    pub change: Change,
    pub old: Option<Value>,
    pub new: Value,
}

pub type TokenReviewFn = dyn Fn(&str, &[String]) -> Option<(String, Vec<String>)> + Send + Sync;

pub struct State {
    pub rv: u64,
    pub objects: Vec<BTreeMap<Key, Value>>,
    pub history: VecDeque<Event>,
    /// A watch from resourceVersion N < floor has missed changes: 410.
    pub floor: u64,
    pub crds_installed: bool,
    /// Bumped by `drop_watches`; a watch started in an older epoch is cut.
    pub epoch: u64,
    pub bookmark_interval: Duration,
    pub token_review: Option<Arc<TokenReviewFn>>,
    pub requests: Vec<RequestRecord>,
    pub token_reviews: Vec<TokenReviewRecord>,
}

/// The store shared by the HTTP side and the test side.
pub struct Shared {
    state: Mutex<State>,
    /// Bumped after every change of `state` so that watches wake up.
    pub tick: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    pub fn new() -> Arc<Shared> {
        Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1,
                objects: TYPES.iter().map(|_| BTreeMap::new()).collect(),
                history: VecDeque::new(),
                floor: 0,
                crds_installed: true,
                epoch: 0,
                bookmark_interval: Duration::from_secs(1),
                token_review: None,
                requests: Vec::new(),
                token_reviews: Vec::new(),
            }),
            tick: tokio::sync::watch::channel(0).0,
        })
    }

    /// The state, also after a panic elsewhere poisoned the lock (a test failure must not cascade).
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Change the state and wake every watch.
    pub fn mutate<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let r = f(&mut self.lock());
        self.tick.send_modify(|t| *t += 1);
        r
    }
}

fn key_of(ty: usize, obj: &Value) -> anyhow::Result<Key> {
    let name = obj.pointer("/metadata/name").and_then(Value::as_str).filter(|n| !n.is_empty());
    let name = name.context("object has no metadata.name")?.to_string();
    let ns = obj.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("");
    match (TYPES[ty].namespaced, ns.is_empty()) {
        (true, true) => bail!("{} {name} needs metadata.namespace", TYPES[ty].kind),
        (false, false) => bail!("{} is cluster-scoped; {name} has a namespace", TYPES[ty].kind),
        _ => Ok((ns.to_string(), name)),
    }
}

pub fn type_of(api_version: &str, kind: &str) -> anyhow::Result<usize> {
    resources::by_kind(api_version, kind)
        .ok_or_else(|| anyhow!("the fake API server does not serve {api_version} {kind}"))
}

pub fn ns_key(ns: Option<&str>, name: &str) -> Key {
    (ns.unwrap_or("").to_string(), name.to_string())
}

fn meta(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"].as_object_mut().expect("metadata is an object")
}

impl State {
    fn record(&mut self, ty: usize, change: Change, old: Option<Value>, new: Value) {
        self.history.push_back(Event { rv: self.rv, ty, change, old, new });
        while self.history.len() > HISTORY_CAP {
            if let Some(e) = self.history.pop_front() {
                self.floor = e.rv;
            }
        }
    }

    pub fn apply(&mut self, mut obj: Value) -> anyhow::Result<Value> {
        let api_version = obj.get("apiVersion").and_then(Value::as_str).context("object has no apiVersion")?;
        let kind = obj.get("kind").and_then(Value::as_str).context("object has no kind")?;
        let ty = type_of(api_version, kind)?;
        let key = key_of(ty, &obj)?;
        let old = self.objects[ty].get(&key).cloned();
        self.rv += 1;
        let rv = self.rv;
        let spec_changed = old.as_ref().is_none_or(|o| o.get("spec") != obj.get("spec"));
        let m = meta(&mut obj);
        m.insert("resourceVersion".into(), json!(rv.to_string()));
        let old_meta = old.as_ref().and_then(|o| o.get("metadata"));
        for field in ["uid", "creationTimestamp"] {
            if m.get(field).and_then(Value::as_str).is_none_or(str::is_empty) {
                let keep = old_meta.and_then(|om| om.get(field)).cloned();
                let fresh = if field == "uid" { new_uid() } else { timestamp(SystemTime::now()) };
                m.insert(field.into(), keep.unwrap_or(json!(fresh)));
            }
        }
        let old_gen = old_meta.and_then(|om| om.get("generation")).and_then(Value::as_i64);
        let generation = match old_gen {
            Some(g) if spec_changed => g + 1,
            Some(g) => g,
            None => 1,
        };
        m.insert("generation".into(), json!(generation));
        self.objects[ty].insert(key, obj.clone());
        let change = if old.is_some() { Change::Modified } else { Change::Added };
        self.record(ty, change, old, obj.clone());
        Ok(obj)
    }

    pub fn patch_labels(&mut self, ty: usize, key: &Key, labels: &[(&str, Option<&str>)]) -> anyhow::Result<()> {
        let old = self.objects[ty].get(key).cloned().ok_or_else(|| anyhow!("{} {key:?} not found", TYPES[ty].kind))?;
        self.rv += 1;
        let mut obj = old.clone();
        let m = meta(&mut obj);
        m.insert("resourceVersion".into(), json!(self.rv.to_string()));
        let l = m.entry("labels").or_insert_with(|| json!({}));
        if !l.is_object() {
            *l = json!({});
        }
        let l = l.as_object_mut().expect("labels is an object");
        for (k, v) in labels {
            match v {
                Some(v) => l.insert(k.to_string(), json!(v)),
                None => l.remove(*k),
            };
        }
        self.objects[ty].insert(key.clone(), obj.clone());
        self.record(ty, Change::Modified, Some(old), obj);
        Ok(())
    }

    pub fn delete(&mut self, ty: usize, key: &Key) -> anyhow::Result<()> {
        let mut obj = self.objects[ty].remove(key).ok_or_else(|| anyhow!("{} {key:?} not found", TYPES[ty].kind))?;
        self.rv += 1;
        let old = obj.clone();
        meta(&mut obj).insert("resourceVersion".into(), json!(self.rv.to_string()));
        self.record(ty, Change::Deleted, Some(old), obj);
        Ok(())
    }

    /// Forget all history: every resourceVersion handed out so far is now too old to watch from.
    pub fn expire_history(&mut self) {
        self.rv += 1;
        self.floor = self.rv;
        self.history.clear();
    }
}

/// A random-looking RFC 4122 version-4 UUID string (unique per process; not cryptographic).
pub fn new_uid() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let seed = nanos ^ (u64::from(std::process::id()) << 32);
    let a = mix(seed.wrapping_add(COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    let b = mix(a ^ seed);
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | (b >> 48) & 0x3fff,
        b & 0xffff_ffff_ffff
    )
}

/// RFC 3339 UTC timestamp with seconds precision, as in `creationTimestamp`.
pub fn timestamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_and_uids() {
        assert_eq!(timestamp(UNIX_EPOCH + Duration::from_secs(1_709_251_199)), "2024-02-29T23:59:59Z");
        let (a, b) = (new_uid(), new_uid());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }
}
