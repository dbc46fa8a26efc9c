//! WATCH: a chunked response with one JSON event per line, replayed from the history and then live.

use super::http::{error, selectors, Body, BoxError};
use super::resources::{status, TYPES};
use super::selector::{FieldSelector, LabelSelector};
use super::store::{Change, Event, Shared};
use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::Response;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

struct Watch {
    shared: Arc<Shared>,
    ty: usize,
    ns: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    /// Every change up to this resourceVersion has been sent (or filtered out).
    cursor: u64,
    epoch: u64,
    rx: tokio::sync::watch::Receiver<u64>,
    deadline: Option<Instant>,
    bookmarks: bool,
    next_bookmark: Instant,
    /// Initial events (resourceVersion unset or "0", or sendInitialEvents) to send first.
    pending: Vec<u8>,
    done: bool,
}

fn line(kind: &str, object: &Value) -> Vec<u8> {
    let mut v = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    v.push(b'\n');
    v
}

fn bookmark(ty: usize, rv: u64, initial_end: bool) -> Vec<u8> {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    line("BOOKMARK", &json!({"kind": TYPES[ty].kind, "apiVersion": TYPES[ty].api_version(), "metadata": meta}))
}

impl Watch {
    fn selected(&self, obj: &Value) -> bool {
        let ns = obj.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("");
        self.ns.as_deref().is_none_or(|want| want == ns) && self.labels.matches(obj) && self.fields.matches(obj)
    }

    /// What this watch sees of one change: an object leaving the selector is DELETED, entering is ADDED.
    fn translate<'e>(&self, ev: &'e Event) -> Option<(&'static str, &'e Value)> {
        if ev.ty != self.ty {
            return None;
        }
        let was = ev.old.as_ref().is_some_and(|o| self.selected(o));
        let is = self.selected(&ev.new);
        match ev.change {
            Change::Added => is.then_some(("ADDED", &ev.new)),
            Change::Deleted => (was || is).then_some(("DELETED", &ev.new)),
            Change::Modified => match (was, is) {
                (true, true) => Some(("MODIFIED", &ev.new)),
                (false, true) => Some(("ADDED", &ev.new)),
                (true, false) => Some(("DELETED", &ev.new)),
                (false, false) => None,
            },
        }
    }

    /// The next chunk of the response; `Err` cuts the connection; `None` ends the response cleanly.
    async fn next(&mut self) -> Option<Result<Frame<Bytes>, BoxError>> {
        if !self.pending.is_empty() {
            return Some(Ok(Frame::data(std::mem::take(&mut self.pending).into())));
        }
        loop {
            if self.done {
                return None;
            }
            self.rx.borrow_and_update();
            let mut out = Vec::new();
            {
                let state = self.shared.lock();
                if state.epoch != self.epoch {
                    self.done = true;
                    return Some(Err("watch dropped by the test".into()));
                }
                if TYPES[self.ty].crd && !state.crds_installed {
                    self.done = true;
                    return None;
                }
                if self.cursor < state.floor {
                    self.done = true;
                    let msg = format!("too old resource version: {} ({})", self.cursor, state.floor);
                    return Some(Ok(Frame::data(line("ERROR", &status(410, "Expired", &msg)).into())));
                }
                let start = state.history.partition_point(|e| e.rv <= self.cursor);
                for ev in state.history.range(start..) {
                    if let Some((kind, obj)) = self.translate(ev) {
                        out.extend(line(kind, obj));
                    }
                }
                self.cursor = self.cursor.max(state.rv);
            }
            if !out.is_empty() {
                return Some(Ok(Frame::data(out.into())));
            }
            let interval = self.shared.lock().bookmark_interval.max(Duration::from_millis(10));
            let far = Instant::now() + Duration::from_secs(86_400);
            tokio::select! {
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        self.done = true;
                    }
                }
                _ = tokio::time::sleep_until(self.deadline.unwrap_or(far)) => self.done = true,
                _ = tokio::time::sleep_until(if self.bookmarks { self.next_bookmark } else { far }) => {
                    self.next_bookmark = Instant::now() + interval;
                    return Some(Ok(Frame::data(bookmark(self.ty, self.cursor, false).into())));
                }
            }
        }
    }
}

/// Start a watch, or answer the request's error.
pub fn watch(shared: Arc<Shared>, ty: usize, ns: Option<String>, q: &HashMap<String, String>) -> Response<Body> {
    let (labels, fields) = match selectors(ty, q) {
        Ok(s) => s,
        Err(msg) => return error(400, &msg),
    };
    let flag = |k: &str| matches!(q.get(k).map(String::as_str), Some("true" | "1"));
    let from = match q.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(rv) => match rv.parse::<u64>() {
            Ok(rv) => Some(rv),
            Err(_) => return error(400, &format!("invalid resource version: {rv}")),
        },
    };
    let deadline = match q.get("timeoutSeconds").map(|t| t.parse::<u64>()) {
        None => None,
        Some(Ok(t)) => Some(Instant::now() + Duration::from_secs(t)),
        Some(Err(_)) => return error(400, "timeoutSeconds must be a non-negative integer"),
    };
    let rx = shared.tick.subscribe();
    let state = shared.lock();
    let mut w = Watch {
        shared: shared.clone(),
        ty,
        ns,
        labels,
        fields,
        cursor: from.unwrap_or(state.rv),
        epoch: state.epoch,
        rx,
        deadline,
        bookmarks: flag("allowWatchBookmarks"),
        next_bookmark: Instant::now() + state.bookmark_interval,
        pending: Vec::new(),
        done: false,
    };
    let initial = flag("sendInitialEvents");
    if from.is_none() || initial {
        let objects: Vec<&Value> = state.objects[ty].values().filter(|o| w.selected(o)).collect();
        let mut pending: Vec<u8> = objects.into_iter().flat_map(|o| line("ADDED", o)).collect();
        if from.is_none() {
            w.cursor = state.rv;
        }
        if initial && w.bookmarks {
            pending.extend(bookmark(ty, w.cursor, true));
        }
        w.pending = pending;
    }
    drop(state);
    let stream = futures::stream::unfold(w, |mut w| async move { w.next().await.map(|item| (item, w)) });
    let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    resp
}
