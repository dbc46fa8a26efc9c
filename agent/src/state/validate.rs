//! Rules the YAML schema cannot express: uniqueness across the file, name
//! syntax, and what this node needs in order to enroll its own pods.
//!
//! Every problem is collected, not just the first, so that one edit-reload
//! cycle is enough to fix a file.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use super::config::{CaSection, Config, WorkloadConfig};
use super::error::FieldError;
use super::names;
use super::workload::Protocol;

/// Checks `config`; with `node`, also the rules that hold only for the
/// workloads of that node.
pub(crate) fn check(config: &Config, node: Option<&str>) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if let Err(reason) = names::check_trust_domain(&config.trust_domain) {
        errors.push(FieldError::new("trustDomain", reason));
    }
    check_ca(&config.ca, &mut errors);
    check_workloads(&config.workloads, &mut errors);
    if let Some(node) = node {
        check_local_workloads(&config.workloads, node, &mut errors);
    }
    super::authz::check_policies(&config.policies, &mut errors);
    errors
}

fn check_ca(ca: &CaSection, errors: &mut Vec<FieldError>) {
    let remote_fields = [
        ("ca.address", ca.address.is_some()),
        ("ca.rootCert", ca.root_cert.is_some()),
        ("ca.tokenFile", ca.token_file.is_some()),
    ];
    match (&ca.dir, &ca.address) {
        (Some(_), Some(_)) => errors.push(FieldError::new(
            "ca",
            "ca.dir and ca.address are mutually exclusive: dir signs locally with the CA key, address asks a CA \
             service (which holds the key); set one",
        )),
        (None, None) => errors.push(FieldError::new(
            "ca",
            "set either ca.dir (sign locally with the CA key there) or ca.address with ca.rootCert and ca.tokenFile \
             (ask a CA service)",
        )),
        (Some(dir), None) => {
            check_absolute("ca.dir", dir, errors);
            for (field, set) in &remote_fields[1..] {
                if *set {
                    errors
                        .push(FieldError::new(*field, "only used with ca.address; with ca.dir the agent signs itself"));
                }
            }
        }
        (None, Some(address)) => {
            if let Err(reason) = crate::identity::client::parse_address(address) {
                errors.push(FieldError::new("ca.address", reason));
            }
            for (field, value) in [("ca.rootCert", &ca.root_cert), ("ca.tokenFile", &ca.token_file)] {
                match value {
                    Some(path) => check_absolute(field, path, errors),
                    None => errors.push(FieldError::new(field, "required with ca.address")),
                }
            }
        }
    }
    // X.509 validity has one-second resolution, so anything shorter cannot be
    // expressed in a certificate.
    if ca.cert_ttl < Duration::from_secs(1) {
        errors.push(FieldError::new("ca.certTtl", "must be at least 1s"));
    }
}

fn check_workloads(workloads: &[WorkloadConfig], errors: &mut Vec<FieldError>) {
    let mut uids: HashMap<&str, usize> = HashMap::new();
    // Owner of each address: (workload index, ip index).
    let mut owners: HashMap<IpAddr, (usize, usize)> = HashMap::new();

    for (i, w) in workloads.iter().enumerate() {
        let at = |field: &str| format!("workloads[{i}].{field}");

        if w.uid.trim().is_empty() {
            errors.push(FieldError::new(at("uid"), "must not be empty"));
        } else {
            match uids.entry(&w.uid) {
                Entry::Occupied(first) => errors.push(FieldError::new(
                    at("uid"),
                    format!("duplicate uid {:?} (also workloads[{}].uid)", w.uid, first.get()),
                )),
                Entry::Vacant(slot) => {
                    slot.insert(i);
                }
            }
        }
        push_err(errors, at("name"), names::check_dns_subdomain(&w.name));
        push_err(errors, at("namespace"), names::check_dns_label(&w.namespace));
        push_err(errors, at("serviceAccount"), names::check_dns_subdomain(&w.service_account));
        if let Some(node) = &w.node {
            if node.trim().is_empty() {
                errors.push(FieldError::new(at("node"), "must not be empty; omit it for workloads on no node"));
            }
        }
        if let Some(netns) = &w.netns {
            check_absolute(&at("netns"), netns, errors);
        }
        if let Some(cgroup) = &w.cgroup {
            check_absolute(&at("cgroup"), cgroup, errors);
        }

        if w.workload_ips.is_empty() {
            errors.push(FieldError::new(at("workloadIps"), "must list at least one IP"));
        }
        for (j, ip) in w.workload_ips.iter().enumerate() {
            let path = format!("workloads[{i}].workloadIps[{j}]");
            if let Err(reason) = check_workload_ip(*ip) {
                errors.push(FieldError::new(path, reason));
                continue;
            }
            // Canonical, so 10.0.0.1 and ::ffff:10.0.0.1 count as one address.
            let ip = ip.to_canonical();
            match owners.get(&ip) {
                Some(&(owner, _)) if owner == i => errors.push(FieldError::new(
                    path,
                    format!("{ip} is listed twice for workload {:?}", w.uid),
                )),
                Some(&(owner, k)) => errors.push(FieldError::new(
                    path,
                    format!(
                        "{ip} is owned by both {:?} and {:?} (workloads[{owner}].workloadIps[{k}]); an address must identify one workload",
                        w.uid, workloads[owner].uid
                    ),
                )),
                None => {
                    owners.insert(ip, (i, j));
                }
            }
        }
    }
}

fn check_workload_ip(ip: IpAddr) -> Result<(), String> {
    let ip = ip.to_canonical();
    let reason = if ip.is_unspecified() {
        "is the unspecified address"
    } else if ip.is_loopback() {
        "is a loopback address, which every pod has; it cannot identify a workload"
    } else if ip.is_multicast() {
        "is a multicast address"
    } else if matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) {
        "is the broadcast address"
    } else {
        return Ok(());
    };
    Err(format!("{ip} {reason}"))
}

fn check_local_workloads(workloads: &[WorkloadConfig], node: &str, errors: &mut Vec<FieldError>) {
    for (i, w) in workloads.iter().enumerate() {
        let local = w.node.as_deref() == Some(node);
        if local && w.protocol == Protocol::Hbone && w.netns.is_none() {
            errors.push(FieldError::new(
                format!("workloads[{i}].netns"),
                format!(
                    "required for HBONE workload {:?} on this node ({node}): the agent listens inside the pod's network namespace",
                    w.uid
                ),
            ));
        }
    }
}

fn check_absolute(path: &str, value: &Path, errors: &mut Vec<FieldError>) {
    if value.as_os_str().is_empty() {
        errors.push(FieldError::new(path, "must not be empty"));
    } else if !value.is_absolute() {
        errors.push(FieldError::new(
            path,
            format!("{} must be an absolute path; the agent's working directory is not meaningful", value.display()),
        ));
    }
}

pub(super) fn push_err(errors: &mut Vec<FieldError>, path: String, result: Result<(), String>) {
    if let Err(reason) = result {
        errors.push(FieldError::new(path, reason));
    }
}

#[cfg(test)]
mod ca_section_tests {
    use crate::state::{CaSource, Config};

    fn errors(ca: &str) -> String {
        let text = format!("trustDomain: td\nca: {ca}\n");
        match Config::from_str_named(&text, "t.yaml") {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn dir_or_address_never_both_nor_neither() {
        let both = errors("{ dir: /ca, address: 'https://ca:15012', rootCert: /r.pem, tokenFile: /t }");
        assert!(both.contains("mutually exclusive"), "{both}");
        assert!(errors("{ certTtl: 1h }").contains("set either ca.dir"));
        assert_eq!(errors("{ dir: /ca }"), "");
        assert_eq!(
            errors("{ address: 'https://sluice-ca.sluice-system.svc:15012', rootCert: /r.pem, tokenFile: /t }"),
            ""
        );
    }

    #[test]
    fn address_needs_its_files_and_https() {
        let e = errors("{ address: 'https://ca' }");
        assert!(
            e.contains("ca.rootCert") && e.contains("ca.tokenFile") && e.contains("required with ca.address"),
            "{e}"
        );
        assert!(errors("{ address: 'http://ca:1', rootCert: /r, tokenFile: /t }").contains("https://"));
        assert!(errors("{ address: 'https://ca', rootCert: r.pem, tokenFile: /t }").contains("absolute"));
        let stray = errors("{ dir: /ca, tokenFile: /t }");
        assert!(stray.contains("ca.tokenFile") && stray.contains("only used with ca.address"), "{stray}");
    }

    #[test]
    fn source_reads_back() {
        let text = "trustDomain: td\nca: { address: 'https://ca:1', rootCert: /r.pem, tokenFile: /t }\n";
        let config = Config::from_str_named(text, "t.yaml").unwrap();
        assert_eq!(
            config.ca.source(),
            Some(CaSource::Remote {
                address: "https://ca:1".into(),
                root_cert: "/r.pem".into(),
                token_file: "/t".into()
            })
        );
        assert!(config.mesh().ca.dir.as_os_str().is_empty());
    }
}
