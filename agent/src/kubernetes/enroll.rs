//! Which pods the mesh captures, by the labels Istio ambient users already
//! have on their namespaces and pods, plus Sluice's own pair.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Istio's label: `ambient` enrolls (namespace or pod), `none` opts a pod out.
pub const ISTIO_MODE: &str = "istio.io/dataplane-mode";
/// Sluice's: `enabled` enrolls (namespace or pod), `disabled` opts a pod out.
pub const SLUICE_MODE: &str = "sluice.io/mode";

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

/// Istio's workload name: a Deployment's pods (owned by a ReplicaSet named
/// `<deployment>-<pod-template-hash>`) share the Deployment's name; a Job
/// created by a CronJob (`<cronjob>-<digits>`) gives the CronJob's; any
/// other controller its own name; a bare pod its own.
pub fn workload_name(meta: &ObjectMeta) -> String {
    let pod_name = meta.name.clone().unwrap_or_default();
    let Some(owner) = meta.owner_references.as_ref().and_then(|o| o.iter().find(|o| o.controller == Some(true))) else {
        return pod_name;
    };
    let labels = super::objects::labels(meta);
    match owner.kind.as_str() {
        "ReplicaSet" => match labels.get("pod-template-hash") {
            Some(hash) => owner.name.strip_suffix(&format!("-{hash}")).unwrap_or(&owner.name).to_string(),
            None => owner.name.clone(),
        },
        "Job" => match owner.name.rsplit_once('-') {
            Some((cron, suffix)) if !suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_digit()) => {
                cron.to_string()
            }
            _ => owner.name.clone(),
        },
        _ => owner.name.clone(),
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
        let m = owned("web-5d9c-abcde", "ReplicaSet", "web-5d9c", &[("pod-template-hash", "5d9c")]);
        assert_eq!(workload_name(&m), "web");
        assert_eq!(workload_name(&owned("r-x", "ReplicaSet", "rs-plain", &[])), "rs-plain");
        assert_eq!(workload_name(&owned("db-0", "StatefulSet", "db", &[])), "db");
        assert_eq!(workload_name(&owned("j", "Job", "backup-28123456", &[])), "backup");
        assert_eq!(workload_name(&owned("j", "Job", "migrate", &[])), "migrate");
        let bare = ObjectMeta { name: Some("solo".into()), ..Default::default() };
        assert_eq!(workload_name(&bare), "solo");
    }
}
