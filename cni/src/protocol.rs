//! The plugin ↔ agent protocol, on the agent's Unix socket
//! (`sluice run --cni-socket`, default [`DEFAULT_SOCKET`]).
//!
//! One exchange per connection: the plugin writes one [`Request`] as a JSON
//! line (terminated by `\n`), the agent answers one [`Response`] as a JSON
//! line and closes. Both sides bound what they read ([`MAX_MESSAGE`]) and
//! how long they wait. The agent answers an ADD only once the pod's capture
//! is in place (or it has decided the pod is not enrolled), so the pod's
//! first packet is captured.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub const DEFAULT_SOCKET: &str = "/var/run/sluice/cni.sock";

/// Longest line either side reads.
pub const MAX_MESSAGE: usize = 1 << 20;

/// How long the plugin waits for the agent's answer to an ADD: enrolling
/// (listeners, capture, a certificate) takes milliseconds; the agent may
/// first wait for the API server to show it the pod. Kubelet's CNI call
/// itself times out later than this.
pub const ADD_TIMEOUT_SECS: u64 = 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    Add,
    Del,
    Check,
    /// Is the agent up and serving? (CNI STATUS)
    Status,
    /// Remove capture of every pod not in `valid_attachments` (CNI GC).
    Gc,
}

/// The pod, as the runtime describes it to the plugin.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    /// `K8S_POD_UID` (may be empty on DEL).
    pub uid: String,
    pub name: String,
    pub namespace: String,
    /// `CNI_NETNS` (may be empty on DEL).
    pub netns: String,
    pub container_id: String,
    pub ifname: String,
    /// The pod's addresses from `prevResult`.
    pub ips: Vec<IpAddr>,
}

/// A (container id, ifname) pair the runtime still considers valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    pub command: Command,
    #[serde(default)]
    pub pod: PodRef,
    /// For GC only.
    #[serde(default)]
    pub valid_attachments: Vec<Attachment>,
}

/// What the agent did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    /// ADD/CHECK: the pod is enrolled and its capture is in place.
    Captured,
    /// ADD/CHECK: the pod is not in the mesh (labels, namespace, host network).
    NotEnrolled,
    /// DEL/GC: done (also when there was nothing to do).
    Removed,
    /// STATUS: the agent is ready.
    Ready,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    /// `Err(message)`: the agent could not do it; the message says why and
    /// names the pod.
    pub result: Result<Outcome, String>,
    /// One line for the plugin's log: what was decided and why.
    #[serde(default)]
    pub detail: String,
}
