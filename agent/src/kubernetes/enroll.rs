//! Which pods the mesh captures, by the labels Istio ambient users already
//! have on their namespaces and pods, plus Sluice's own pair.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Istio's label: `ambient` enrolls (namespace or pod), `none` opts a pod out.
pub const ISTIO_MODE: &str = "istio.io/dataplane-mode";
/// Sluice's: `enabled` enrolls (namespace or pod), `disabled` opts a pod out.
pub const SLUICE_MODE: &str = "sluice.io/mode";
/// Set by Istio's sidecar injector on the pods it injected.
pub const SIDECAR_STATUS: &str = "sidecar.istio.io/status";

/// A pod with an Istio sidecar already has mTLS and policy from it; as
/// istio-cni does, ambient capture leaves it alone (during a migration,
/// a namespace labelled ambient still holds pods not yet restarted).
pub fn has_sidecar(meta: &ObjectMeta) -> bool {
    meta.annotations.as_ref().is_some_and(|a| a.contains_key(SIDECAR_STATUS))
}

fn opts_in(labels: &BTreeMap<String, String>) -> bool {
    labels.get(ISTIO_MODE).is_some_and(|v| v == "ambient") || labels.get(SLUICE_MODE).is_some_and(|v| v == "enabled")
}

fn opts_out(labels: &BTreeMap<String, String>) -> bool {
    labels.get(ISTIO_MODE).is_some_and(|v| v == "none") || labels.get(SLUICE_MODE).is_some_and(|v| v == "disabled")
}

/// Whether a (non-host-network) pod is in the mesh: a pod's opt-out wins,
/// then the pod's or its namespace's opt-in. A namespace label cannot opt
/// out a pod that opts in, as in Istio.
pub fn is_enrolled(pod: &BTreeMap<String, String>, namespace: Option<&BTreeMap<String, String>>) -> bool {
    if opts_out(pod) {
        return false;
    }
    opts_in(pod) || namespace.is_some_and(opts_in)
}

/// Istio's workload name, as istiod gives it to ztunnel (`workloadNameAndType`
/// over `GetDeployMetaFromPod`): for a pod whose name was generated, a
/// Deployment's pods (owned by a ReplicaSet named
/// `<deployment>-<pod-template-hash>`) share the Deployment's name, a Job's
/// pods take the Job's, and a Job created by a CronJob
/// (`<cronjob>-<8 to 10 digits>`) gives the CronJob's. Every other pod is
/// its own workload: a StatefulSet's or DaemonSet's, a bare ReplicaSet's, a
/// static pod (whose controller is its Node, and whose name is not
/// generated), a bare pod.
pub fn workload_name(meta: &ObjectMeta) -> String {
    let pod_name = meta.name.clone().unwrap_or_default();
    if meta.generate_name.as_deref().unwrap_or("").is_empty() {
        return pod_name;
    }
    let Some(owner) = meta.owner_references.as_ref().and_then(|o| o.iter().find(|o| o.controller == Some(true))) else {
        return pod_name;
    };
    let labels = super::objects::labels(meta);
    let name = match owner.kind.as_str() {
        "ReplicaSet" => match labels.get("pod-template-hash").filter(|h| !h.is_empty()) {
            Some(hash) if owner.name.ends_with(hash.as_str()) => {
                owner.name.strip_suffix(&format!("-{hash}")).unwrap_or(&owner.name)
            }
            _ => return pod_name,
        },
        "Job" => match owner.name.rsplit_once('-') {
            Some((cron, digits))
                if !cron.is_empty()
                    && (8..=10).contains(&digits.len())
                    && digits.bytes().all(|b| b.is_ascii_digit()) =>
            {
                cron
            }
            _ => &owner.name,
        },
        _ => return pod_name,
    };
    if name.is_empty() {
        pod_name
    } else {
        name.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn labels(l: &[(&str, &str)]) -> BTreeMap<String, String> {
        l.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn enrollment_follows_istio_labels() {
        let ambient = labels(&[(ISTIO_MODE, "ambient")]);
        let none = labels(&[]);
        assert!(is_enrolled(&none, Some(&ambient)), "namespace label enrolls");
        assert!(is_enrolled(&labels(&[(SLUICE_MODE, "enabled")]), None), "pod label enrolls");
        assert!(!is_enrolled(&none, None));
        assert!(!is_enrolled(&none, Some(&labels(&[(ISTIO_MODE, "sidecar")]))));
        assert!(!is_enrolled(&labels(&[(ISTIO_MODE, "none")]), Some(&ambient)), "pod opt-out wins");
        assert!(!is_enrolled(&labels(&[(SLUICE_MODE, "disabled")]), Some(&ambient)));
        assert!(!is_enrolled(&labels(&[(SLUICE_MODE, "disabled"), (ISTIO_MODE, "ambient")]), None));
        assert!(is_enrolled(&ambient, Some(&labels(&[(ISTIO_MODE, "none")]))), "namespace cannot opt a pod out");
    }

    fn owned(pod: &str, kind: &str, owner: &str, l: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: Some(pod.into()),
            generate_name: Some(format!("{owner}-")),
            labels: Some(labels(l)),
            owner_references: Some(vec![OwnerReference {
                kind: kind.into(),
                name: owner.into(),
                controller: Some(true),
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn workload_names_like_istio() {
        let hash = [("pod-template-hash", "5d9c")];
        assert_eq!(workload_name(&owned("web-5d9c-abcde", "ReplicaSet", "web-5d9c", &hash)), "web");
        // A ReplicaSet of its own, or one whose name does not end in the hash.
        assert_eq!(workload_name(&owned("rs-plain-x", "ReplicaSet", "rs-plain", &[])), "rs-plain-x");
        assert_eq!(workload_name(&owned("rs-x", "ReplicaSet", "rs", &hash)), "rs-x");
        assert_eq!(workload_name(&owned("r-x", "ReplicaSet", "r", &[("pod-template-hash", "")])), "r-x");
        // StatefulSet and DaemonSet pods are their own workloads in ambient.
        assert_eq!(workload_name(&owned("db-0", "StatefulSet", "db", &[])), "db-0");
        assert_eq!(workload_name(&owned("agent-x7k2p", "DaemonSet", "agent", &[])), "agent-x7k2p");
        // Jobs: a CronJob's suffix is 8 to 10 digits, anything else is the Job's own name.
        assert_eq!(workload_name(&owned("j", "Job", "backup-28123456", &[])), "backup");
        assert_eq!(workload_name(&owned("j", "Job", "backup-2812345678", &[])), "backup");
        assert_eq!(workload_name(&owned("j", "Job", "db-migrate-1", &[])), "db-migrate-1");
        assert_eq!(workload_name(&owned("j", "Job", "x-28123456789", &[])), "x-28123456789");
        assert_eq!(workload_name(&owned("j", "Job", "-28123456", &[])), "-28123456");
        assert_eq!(workload_name(&owned("j", "Job", "migrate", &[])), "migrate");
        // A static (mirror) pod: its controller is the Node, its name not generated.
        let mut mirror = owned("kube-proxy-node1", "Node", "node1", &[]);
        mirror.generate_name = None;
        assert_eq!(workload_name(&mirror), "kube-proxy-node1");
        let mut named = owned("web-5d9c-abcde", "ReplicaSet", "web-5d9c", &hash);
        named.generate_name = Some(String::new());
        assert_eq!(workload_name(&named), "web-5d9c-abcde", "an empty generateName is no generated name");
        let bare = ObjectMeta { name: Some("solo".into()), ..Default::default() };
        assert_eq!(workload_name(&bare), "solo");
    }
}
