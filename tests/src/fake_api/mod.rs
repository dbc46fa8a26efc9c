//! A fake Kubernetes API server for tests: the real REST API (GET, LIST with selectors and
//! pagination, WATCH with bookmarks and 410 Expired, TokenReview) over a real TCP socket, so that
//! kube-rs reaches it through a kubeconfig exactly as it would a real cluster.
//!
//! The server runs on its own tokio runtime on a background thread; the test side changes objects
//! through the synchronous methods of [`FakeApiServer`], and every change is seen by open watches.
//!
//! ```no_run
//! use sluice_tests::fake_api::{objects, FakeApiServer};
//!
//! let api = FakeApiServer::start().unwrap();
//! api.apply(objects::namespace("demo", &[])).unwrap();
//! api.write_kubeconfig(std::path::Path::new("/tmp/kubeconfig")).unwrap();
//! ```

mod http;
pub mod objects;
mod resources;
mod selector;
mod store;
mod watch;

use anyhow::Context;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use store::{ns_key, type_of, Shared};

/// One request the server received.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub method: String,
    pub path_and_query: String,
    pub at: Instant,
}

/// The `spec` of one TokenReview the server was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenReviewRecord {
    pub token: String,
    pub audiences: Vec<String>,
}

/// The fake API server; dropping it stops the server and joins its thread.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// The bearer token the written kubeconfig carries.
pub const TOKEN: &str = "fake-api-token";

impl FakeApiServer {
    /// Serve on 127.0.0.1 at a free port.
    pub fn start() -> anyhow::Result<FakeApiServer> {
        Self::start_on(std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?)
    }

    /// Serve on a socket the caller made (e.g. bound inside another network namespace).
    pub fn start_on(listener: std::net::TcpListener) -> anyhow::Result<FakeApiServer> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let listener = {
            let _guard = rt.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let shared = Shared::new();
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let serving = shared.clone();
        let thread = std::thread::Builder::new().name("fake-kube-api".into()).spawn(move || {
            rt.block_on(async move {
                loop {
                    tokio::select! {
                        _ = &mut rx => break,
                        accepted = listener.accept() => {
                            let Ok((stream, _)) = accepted else {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            };
                            let _ = stream.set_nodelay(true);
                            let shared = serving.clone();
                            tokio::spawn(async move {
                                let svc = service_fn(move |req| {
                                    let shared = shared.clone();
                                    async move { Ok::<_, std::convert::Infallible>(http::handle(shared, req).await) }
                                });
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(TokioIo::new(stream), svc)
                                    .await;
                            });
                        }
                    }
                }
            });
            rt.shutdown_timeout(Duration::from_secs(2));
        })?;
        Ok(FakeApiServer { shared, addr, shutdown: Some(tx), thread: Some(thread) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig whose current context points at this server with a bearer-token user.
    pub fn write_kubeconfig(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\nusers:\n- name: fake\n  user:\n    token: {TOKEN}\npreferences: {{}}\n",
            url = self.url()
        );
        std::fs::write(path, yaml).with_context(|| format!("writing {}", path.display()))
    }

    /// Create or replace the object named by its (apiVersion, kind, namespace, name); returns it as stored.
    pub fn apply(&self, obj: serde_json::Value) -> anyhow::Result<serde_json::Value> {
        self.shared.mutate(|s| s.apply(obj))
    }

    /// Set (`Some`) or remove (`None`) labels of a stored object.
    pub fn patch_labels(
        &self,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
        labels: &[(&str, Option<&str>)],
    ) -> anyhow::Result<()> {
        let ty = type_of(api_version, kind)?;
        self.shared.mutate(|s| s.patch_labels(ty, &ns_key(ns, name), labels))
    }

    pub fn delete(&self, api_version: &str, kind: &str, ns: Option<&str>, name: &str) -> anyhow::Result<()> {
        let ty = type_of(api_version, kind)?;
        self.shared.mutate(|s| s.delete(ty, &ns_key(ns, name)))
    }

    pub fn get(&self, api_version: &str, kind: &str, ns: Option<&str>, name: &str) -> Option<serde_json::Value> {
        let ty = type_of(api_version, kind).ok()?;
        self.shared.lock().objects[ty].get(&ns_key(ns, name)).cloned()
    }

    /// Whether the Istio CRDs exist; when not, their URLs answer 404 and open watches on them end.
    pub fn set_crds_installed(&self, installed: bool) {
        self.shared.mutate(|s| s.crds_installed = installed);
    }

    /// Cut every open watch connection abruptly (no final chunk).
    pub fn drop_watches(&self) {
        self.shared.mutate(|s| s.epoch += 1);
    }

    /// Forget the change history: open watches get a 410 Expired ERROR event, and so does any
    /// watch from a resourceVersion handed out before, until the client relists.
    pub fn expire_history(&self) {
        self.shared.mutate(|s| s.expire_history());
    }

    /// How often a watch that asked for bookmarks gets one (default 1 s); applies to new intervals.
    pub fn set_bookmark_interval(&self, d: Duration) {
        self.shared.mutate(|s| s.bookmark_interval = d);
    }

    /// Answer TokenReviews: (token, audiences) -> Some((username, groups)) if authenticated.
    pub fn on_token_review(
        &self,
        f: impl Fn(&str, &[String]) -> Option<(String, Vec<String>)> + Send + Sync + 'static,
    ) {
        self.shared.mutate(|s| s.token_review = Some(Arc::new(f)));
    }

    /// Every TokenReview received so far, in order (also those no callback answered).
    pub fn token_reviews(&self) -> Vec<TokenReviewRecord> {
        self.shared.lock().token_reviews.clone()
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().requests.clone()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
