use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::config_tests::EXAMPLE;
use super::*;

/// Long enough for a change to settle over two polls, with slack for a busy
/// test machine.
const PUBLISH_TIMEOUT: Duration = Duration::from_millis(1500);

/// Writes like an editor does: a temp file in the same directory, renamed
/// over the target.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn next_state(rx: &mut watch::Receiver<Arc<State>>) -> Arc<State> {
    tokio::time::timeout(PUBLISH_TIMEOUT, rx.changed())
        .await
        .expect("a new state should be published")
        .expect("watcher task ended");
    rx.borrow_and_update().clone()
}

struct Errors {
    count: Arc<AtomicUsize>,
    last: Arc<Mutex<String>>,
}

fn recorder() -> (Errors, impl Fn(&ConfigError) + Send + Sync + 'static) {
    let count = Arc::new(AtomicUsize::new(0));
    let last = Arc::new(Mutex::new(String::new()));
    let errors = Errors { count: Arc::clone(&count), last: Arc::clone(&last) };
    let on_error = move |err: &ConfigError| {
        count.fetch_add(1, Ordering::SeqCst);
        *last.lock().unwrap() = err.to_string();
    };
    (errors, on_error)
}

#[tokio::test]
async fn reloads_keeps_last_good_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.yaml");
    std::fs::write(&path, EXAMPLE).unwrap();
    let (errors, on_error) = recorder();

    let (mut rx, task) = ConfigWatcher::spawn(&path, "node1", on_error).unwrap();
    assert_eq!(rx.borrow().generation(), 0);
    assert!(rx.borrow().workload_by_ip("10.10.1.2".parse().unwrap()).is_some());

    // A valid change is published.
    replace_file(&path, &EXAMPLE.replace("[10.10.1.2]", "[10.10.1.9]"));
    let state = next_state(&mut rx).await;
    assert_eq!(state.generation(), 1);
    assert!(state.workload_by_ip("10.10.1.9".parse().unwrap()).is_some());
    assert!(state.workload_by_ip("10.10.1.2".parse().unwrap()).is_none());

    // Invalid YAML: nothing published, one error with the reason.
    replace_file(&path, "trustDomain: [unclosed\n");
    tokio::time::sleep(PUBLISH_TIMEOUT).await;
    assert!(!rx.has_changed().unwrap(), "bad config must not be published");
    assert_eq!(rx.borrow().generation(), 1);
    assert_eq!(errors.count.load(Ordering::SeqCst), 1, "reported once, not per poll");
    let message = errors.last.lock().unwrap().clone();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("line 1"), "{message}");

    // A fix is published again.
    replace_file(&path, &EXAMPLE.replace("[10.10.1.2]", "[10.10.1.7]"));
    let state = next_state(&mut rx).await;
    assert_eq!(state.generation(), 2);
    assert!(state.workload_by_ip("10.10.1.7".parse().unwrap()).is_some());
    assert_eq!(errors.count.load(Ordering::SeqCst), 1);

    // The task stops once nobody listens.
    drop(rx);
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("watcher should stop when the receiver is dropped")
        .unwrap();
}

#[tokio::test]
async fn semantic_errors_and_missing_file_keep_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.yaml");
    std::fs::write(&path, EXAMPLE).unwrap();
    let (errors, on_error) = recorder();
    let (mut rx, _task) = ConfigWatcher::spawn(&path, "node1", on_error).unwrap();

    // Valid YAML, but node-specific validation fails: netns missing.
    replace_file(&path, &EXAMPLE.replace("    netns: /var/run/netns/pod1\n", ""));
    tokio::time::sleep(PUBLISH_TIMEOUT).await;
    assert!(!rx.has_changed().unwrap());
    assert_eq!(errors.count.load(Ordering::SeqCst), 1);
    assert!(errors.last.lock().unwrap().contains("workloads[0].netns"));

    std::fs::remove_file(&path).unwrap();
    tokio::time::sleep(PUBLISH_TIMEOUT).await;
    assert!(!rx.has_changed().unwrap());
    assert_eq!(errors.count.load(Ordering::SeqCst), 2);
    assert!(errors.last.lock().unwrap().contains("cannot read"));

    // Restoring the last good content needs no reload.
    std::fs::write(&path, EXAMPLE).unwrap();
    tokio::time::sleep(PUBLISH_TIMEOUT).await;
    assert!(!rx.has_changed().unwrap());
    assert_eq!(errors.count.load(Ordering::SeqCst), 2);

    // Touching (same content, new mtime) is not a reload either.
    replace_file(&path, EXAMPLE);
    tokio::time::sleep(PUBLISH_TIMEOUT).await;
    assert!(!rx.has_changed().unwrap());

    // Nor is a change to comments only.
    replace_file(&path, &format!("# edited\n{EXAMPLE}"));
    tokio::time::sleep(PUBLISH_TIMEOUT).await;
    assert!(!rx.has_changed().unwrap());

    replace_file(&path, &EXAMPLE.replace("node: node1", "node: node2"));
    let state = next_state(&mut rx).await;
    assert_eq!(state.generation(), 1);
    assert!(state.local_workloads("node1").is_empty());
}

#[tokio::test]
async fn initial_load_must_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.yaml");
    let err = ConfigWatcher::spawn(&path, "node1", |_: &ConfigError| {}).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err}");

    std::fs::write(&path, EXAMPLE.replace("    netns: /var/run/netns/pod1\n", "")).unwrap();
    let err = ConfigWatcher::spawn(&path, "node1", |_: &ConfigError| {}).unwrap_err();
    assert!(err.to_string().contains("workloads[0].netns"), "{err}");
}

/// trustDomain and ca.* are read once, at start (certificates, TLS configs,
/// the CA client): a reload that changes them keeps the running state and
/// says which field needs a restart, rather than half-applying it.
#[tokio::test]
async fn start_only_fields_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.yaml");
    std::fs::write(&path, EXAMPLE).unwrap();
    let (errors, on_error) = recorder();
    let (mut rx, _task) = ConfigWatcher::spawn(&path, "node1", on_error).unwrap();
    let domain = rx.borrow().trust_domain().to_owned();

    let changed = EXAMPLE.replace(&format!("trustDomain: {domain}"), "trustDomain: other.local");
    assert_ne!(changed, EXAMPLE, "the example names its trust domain");
    replace_file(&path, &changed.replace("[10.10.1.2]", "[10.10.1.9]"));
    tokio::time::sleep(PUBLISH_TIMEOUT).await;
    assert!(!rx.has_changed().unwrap(), "a trustDomain change must not be published");
    assert_eq!(rx.borrow().trust_domain(), domain);
    assert!(rx.borrow().workload_by_ip("10.10.1.2".parse().unwrap()).is_some(), "the whole running state stays");
    assert_eq!(errors.count.load(Ordering::SeqCst), 1);
    let message = errors.last.lock().unwrap().clone();
    assert!(message.contains("trustDomain changed") && message.contains("restart"), "{message}");
    assert!(message.contains(&path.display().to_string()), "{message}");

    replace_file(&path, &EXAMPLE.replace("certTtl: ", "certTtl: 1h\n  # was: "));
    tokio::time::sleep(PUBLISH_TIMEOUT).await;
    assert!(!rx.has_changed().unwrap());
    let message = errors.last.lock().unwrap().clone();
    assert!(message.contains("ca.certTtl changed"), "{message}");

    // Back to the running settings: other changes apply again.
    replace_file(&path, &EXAMPLE.replace("[10.10.1.2]", "[10.10.1.9]"));
    let state = next_state(&mut rx).await;
    assert!(state.workload_by_ip("10.10.1.9".parse().unwrap()).is_some());
}
