//! The agent's CNI socket: one JSON line from the plugin (anyone who can
//! reach the root-only socket), parsed as the agent parses it
//! (`agent/src/cni.rs`: at most `MAX_MESSAGE` bytes, then serde_json into
//! `protocol::Request`), then the agent's own checks on the pod. Also the
//! agent's answer as the plugin's client reads it (`protocol::Response`).
//! Whatever parses must encode as one line and parse back equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::inpod::discover::canonical_pod_uid;
use sluice::state::names;
use sluice_cni::protocol::{Request, Response, MAX_MESSAGE};

fuzz_target!(|line: &[u8]| {
    if line.len() > MAX_MESSAGE {
        return;
    }
    if let Ok(req) = serde_json::from_slice::<Request>(line) {
        let _ = canonical_pod_uid(&req.pod.uid);
        let _ = names::check_dns_label(&req.pod.namespace);
        let _ = names::check_dns_subdomain(&req.pod.name);
        let wire = serde_json::to_vec(&req).expect("a parsed request encodes");
        assert!(!wire.contains(&b'\n'), "encoded request spans lines");
        let back: Request = serde_json::from_slice(&wire).expect("an encoded request parses");
        assert_eq!(back, req);
    }
    if let Ok(resp) = serde_json::from_slice::<Response>(line) {
        let wire = serde_json::to_vec(&resp).expect("a parsed response encodes");
        assert!(!wire.contains(&b'\n'), "encoded response spans lines");
        let back: Response = serde_json::from_slice(&wire).expect("an encoded response parses");
        assert_eq!(back, resp);
    }
});
