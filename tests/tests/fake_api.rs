//! The fake Kubernetes API server as kube-rs sees it: a real `kube::Client` built from the
//! kubeconfig file the fake writes, LIST/GET/WATCH/TokenReview over real TCP on 127.0.0.1.
//! No root needed.

use anyhow::{bail, ensure, Context};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, store::Writer, Store};
use kube::runtime::watcher;
use kube::{Client, Config, Resource, ResourceExt};
use sluice_tests::fake_api::{objects, FakeApiServer};
use std::io::{Read, Write};
use std::net::IpAddr;
use std::time::{Duration, Instant};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(15);

async fn client(api: &FakeApiServer) -> anyhow::Result<Client> {
    let path =
        std::env::temp_dir().join(format!("sluice-fake-api-{}-{}.kubeconfig", std::process::id(), api.addr().port()));
    api.write_kubeconfig(&path)?;
    let kc = Kubeconfig::read_from(&path)?;
    let _ = std::fs::remove_file(&path);
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

fn pod(ns: &str, name: &str, node: &str, labels: &[(&str, &str)]) -> serde_json::Value {
    objects::pod(ns, name, "", node, "default", &[ip("10.0.0.1")], labels)
}

fn names<K: Resource>(items: impl IntoIterator<Item = impl std::ops::Deref<Target = K>>) -> Vec<String> {
    let mut v: Vec<String> = items.into_iter().map(|k| k.meta().name.clone().unwrap_or_default()).collect();
    v.sort();
    v
}

fn count(api: &FakeApiServer, pred: impl Fn(&str) -> bool) -> usize {
    api.requests().iter().filter(|r| pred(&r.path_and_query)).count()
}

/// A reflector's stream and store, driven only inside [`Reflected::until`]: between calls nobody
/// polls the watcher, so the test can change the server while the client is not looking.
struct Reflected<K: Resource + 'static>
where
    K::DynamicType: std::hash::Hash + Eq,
{
    stream: BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>,
    store: Store<K>,
    errors: Vec<watcher::Error>,
}

impl<K> Reflected<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Clone + Eq + std::hash::Hash + Default,
{
    fn new(api: Api<K>, config: watcher::Config) -> Self {
        Self::with_writer(api, config, Writer::default())
    }
}

impl<K> Reflected<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Clone + Eq + std::hash::Hash,
{
    fn with_writer(api: Api<K>, config: watcher::Config, writer: Writer<K>) -> Self {
        let store = writer.as_reader();
        Reflected { stream: reflector::reflector(writer, watcher(api, config)).boxed(), store, errors: Vec::new() }
    }

    fn names(&self) -> Vec<String> {
        names::<K>(self.store.state())
    }

    /// Drive the watcher for a while (e.g. so that it opens its watch).
    async fn idle(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        while let Ok(Some(item)) = tokio::time::timeout_at(deadline, self.stream.next()).await {
            if let Err(e) = item {
                self.errors.push(e);
            }
        }
    }

    /// Drive the watcher until `cond` holds for the store.
    async fn until(&mut self, what: &str, cond: impl Fn(&Self) -> bool) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !cond(self) {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => bail!("timed out waiting for {what}; store {:?}, errors {:?}", self.names(), self.errors),
                Ok(None) => bail!("watcher stream ended while waiting for {what}"),
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => {
                    self.errors.push(e);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        Ok(())
    }
}

fn is_410(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::WatchError(s) if s.code == 410 && s.reason == "Expired")
}

#[tokio::test]
async fn list_filters_by_field_and_label_selectors() -> anyhow::Result<()> {
    let api = FakeApiServer::start()?;
    api.apply(objects::namespace("shop", &[("team", "a")]))?;
    api.apply(pod("shop", "web-a", "node-a", &[("app", "web"), ("tier", "front")]))?;
    api.apply(pod("shop", "db-a", "node-a", &[("app", "db")]))?;
    api.apply(pod("shop", "web-b", "node-b", &[("app", "web")]))?;
    api.apply(pod("other", "web-a2", "node-a", &[("app", "web")]))?;
    let client = client(&api).await?;
    let pods: Api<Pod> = Api::all(client.clone());
    let lp = ListParams::default().fields("spec.nodeName=node-a").labels("app=web");
    let list = timeout(WAIT, pods.list(&lp)).await??;
    ensure!(names::<Pod>(&list.items) == ["web-a", "web-a2"], "got {:?}", names::<Pod>(&list.items));
    ensure!(list.metadata.resource_version.as_deref().is_some_and(|rv| rv.parse::<u64>().is_ok()));
    let p = &list.items[0];
    ensure!(p.metadata.uid.as_ref().is_some_and(|u| u.len() == 36) && p.metadata.creation_timestamp.is_some());
    ensure!(p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("node-a"));

    let shop: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let lp = ListParams::default().labels("app in (web,db),tier notin (back)").fields("spec.nodeName!=node-b");
    let list = timeout(WAIT, shop.list(&lp)).await??;
    ensure!(names::<Pod>(&list.items) == ["db-a", "web-a"], "got {:?}", names::<Pod>(&list.items));
    let list = timeout(WAIT, shop.list(&ListParams::default().labels("!tier,app"))).await??;
    ensure!(names::<Pod>(&list.items) == ["db-a", "web-b"], "got {:?}", names::<Pod>(&list.items));

    let got = timeout(WAIT, shop.get("web-a")).await??;
    ensure!(got.labels().get("tier").map(String::as_str) == Some("front"));
    ensure!(timeout(WAIT, shop.get_opt("missing")).await??.is_none());
    let ns = timeout(WAIT, Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone()).get("shop")).await??;
    ensure!(ns.labels().get("team").map(String::as_str) == Some("a"));

    let lp = ListParams::default().fields("status.phase=Running,spec.hostNetwork=false,metadata.namespace=shop");
    let list = timeout(WAIT, pods.list(&lp)).await??;
    ensure!(names::<Pod>(&list.items) == ["db-a", "web-a", "web-b"], "got {:?}", names::<Pod>(&list.items));
    ensure!(timeout(WAIT, pods.list(&ListParams::default().fields("status.phase=Failed"))).await??.items.is_empty());
    match timeout(WAIT, pods.list(&ListParams::default().fields("spec.bogus=x"))).await? {
        Err(kube::Error::Api(s)) if s.code == 400 => {}
        other => bail!("unknown field selector key should be a 400, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn lists_600_pods_in_pages() -> anyhow::Result<()> {
    let api = FakeApiServer::start()?;
    for i in 0..600 {
        api.apply(pod("bulk", &format!("p{i:03}"), "node-a", &[("app", "bulk")]))?;
    }
    let client = client(&api).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "bulk");
    let first = timeout(WAIT, pods.list(&ListParams::default().limit(500))).await??;
    let token = first.metadata.continue_.clone().filter(|c| !c.is_empty()).context("first page has no continue")?;
    ensure!(first.items.len() == 500, "first page {}", first.items.len());
    let second = timeout(WAIT, pods.list(&ListParams::default().limit(500).continue_token(&token))).await??;
    ensure!(second.items.len() == 100 && second.metadata.continue_.as_deref().unwrap_or("").is_empty());
    ensure!(second.metadata.resource_version == first.metadata.resource_version);
    let mut all = names::<Pod>(first.items.iter().chain(&second.items));
    all.dedup();
    ensure!(all.len() == 600);

    let mut r = Reflected::new(Api::<Pod>::all(client), watcher::Config::default());
    r.until("600 pods through the watcher", |r| r.store.state().len() == 600).await?;
    ensure!(count(&api, |p| p.starts_with("/api/v1/pods?") && p.contains("limit=500") && p.contains("continue=")) == 1);
    Ok(())
}

#[tokio::test]
async fn reflector_follows_add_label_change_and_delete() -> anyhow::Result<()> {
    let api = FakeApiServer::start()?;
    api.set_bookmark_interval(Duration::from_millis(100));
    api.apply(pod("shop", "a", "node-a", &[("app", "web")]))?;
    let client = client(&api).await?;
    let mut r = Reflected::new(Api::<Pod>::namespaced(client, "shop"), watcher::Config::default().labels("app=web"));
    r.until("initial list", |r| r.names() == ["a"]).await?;
    api.apply(pod("shop", "b", "node-a", &[("app", "web")]))?;
    api.apply(pod("shop", "c", "node-a", &[("app", "db")]))?;
    r.until("b added", |r| r.names() == ["a", "b"]).await?;
    api.patch_labels("v1", "Pod", Some("shop"), "a", &[("app", Some("db"))])?;
    r.until("a leaving the selector", |r| r.names() == ["b"]).await?;
    api.patch_labels("v1", "Pod", Some("shop"), "c", &[("app", Some("web")), ("extra", Some("1"))])?;
    r.until("c entering the selector", |r| r.names() == ["b", "c"]).await?;
    let c = r.store.state().into_iter().find(|p| p.name_any() == "c").context("c")?;
    ensure!(c.labels().get("extra").map(String::as_str) == Some("1"));
    api.delete("v1", "Pod", Some("shop"), "b")?;
    r.until("b deleted", |r| r.names() == ["c"]).await?;
    ensure!(api.get("v1", "Pod", Some("shop"), "b").is_none() && api.get("v1", "Pod", Some("shop"), "c").is_some());
    ensure!(r.errors.is_empty(), "errors {:?}", r.errors);
    Ok(())
}

#[tokio::test]
async fn dropped_watches_resume_and_catch_up() -> anyhow::Result<()> {
    let api = FakeApiServer::start()?;
    api.set_bookmark_interval(Duration::from_millis(50));
    api.apply(pod("shop", "a", "node-a", &[]))?;
    api.apply(pod("shop", "b", "node-a", &[]))?;
    let client = client(&api).await?;
    let mut r = Reflected::new(Api::<Pod>::all(client), watcher::Config::default());
    r.until("initial list", |r| r.names() == ["a", "b"]).await?;
    // A change the pod watch filters out; only a bookmark can tell the watcher about its resourceVersion.
    let marker = api.apply(objects::namespace("marker", &[]))?;
    let marker_rv = marker["metadata"]["resourceVersion"].as_str().context("rv")?.to_string();
    r.idle(Duration::from_millis(300)).await;
    let watches = count(&api, |p| p.contains("watch=true"));
    ensure!(watches == 1, "{watches} watches open");
    api.drop_watches();
    // The watcher is not polled now: these changes happen while it is disconnected.
    api.delete("v1", "Pod", Some("shop"), "a")?;
    api.apply(pod("shop", "c", "node-b", &[]))?;
    r.until("caught up after the cut", |r| r.names() == ["b", "c"]).await?;
    ensure!(count(&api, |p| p.contains("watch=true")) > watches, "no new WATCH");
    let rewatch = api.requests().into_iter().filter(|q| q.path_and_query.contains("watch=true")).nth(1);
    let rewatch = rewatch.context("no second WATCH")?.path_and_query;
    ensure!(
        rewatch.contains(&format!("resourceVersion={marker_rv}&"))
            || rewatch.ends_with(&format!("resourceVersion={marker_rv}")),
        "re-watch should resume from the bookmark's resourceVersion {marker_rv}: {rewatch}"
    );
    ensure!(count(&api, |p| p.starts_with("/api/v1/pods") && !p.contains("watch=")) == 1, "resumed by relisting");
    Ok(())
}

#[tokio::test]
async fn expired_history_relists_and_sees_the_gap() -> anyhow::Result<()> {
    let api = FakeApiServer::start()?;
    api.apply(pod("shop", "a", "node-a", &[]))?;
    api.apply(pod("shop", "b", "node-a", &[]))?;
    let client = client(&api).await?;
    let mut r = Reflected::new(Api::<Pod>::all(client), watcher::Config::default());
    r.until("initial list", |r| r.names() == ["a", "b"]).await?;
    r.idle(Duration::from_millis(300)).await;
    api.drop_watches();
    api.delete("v1", "Pod", Some("shop"), "a")?;
    api.apply(pod("shop", "c", "node-b", &[]))?;
    api.expire_history();
    let expired_at = Instant::now();
    r.until("relisted", |r| r.names() == ["b", "c"]).await?;
    ensure!(r.errors.iter().any(is_410), "no 410 Expired seen: {:?}", r.errors);
    let relists = api
        .requests()
        .into_iter()
        .filter(|q| {
            q.at >= expired_at && q.path_and_query.starts_with("/api/v1/pods") && !q.path_and_query.contains("watch=")
        })
        .count();
    ensure!(relists >= 1, "no LIST after the expiry");
    Ok(())
}

#[tokio::test]
async fn crds_absent_then_installed() -> anyhow::Result<()> {
    let api = FakeApiServer::start()?;
    api.set_crds_installed(false);
    let client = client(&api).await?;
    let gvk = GroupVersionKind::gvk("security.istio.io", "v1", "AuthorizationPolicy");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "authorizationpolicies");
    let policies: Api<DynamicObject> = Api::namespaced_with(client.clone(), "istio-system", &ar);
    match timeout(WAIT, policies.list(&ListParams::default())).await? {
        Err(kube::Error::Api(s)) if s.code == 404 && s.reason == "NotFound" => {}
        other => bail!("absent CRD should be a 404, got {other:?}"),
    }
    let mut r = Reflected::with_writer(policies, watcher::Config::default(), Writer::new(ar.clone()));
    r.until("a watcher error", |r| !r.errors.is_empty()).await?;
    ensure!(matches!(&r.errors[0], watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404));
    api.apply(serde_json::json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-all", "namespace": "istio-system"},
        "spec": {},
    }))?;
    api.set_crds_installed(true);
    r.until("the policy", |r| r.names() == ["deny-all"]).await?;
    Ok(())
}

#[tokio::test]
async fn token_review_answered_by_callback() -> anyhow::Result<()> {
    let api = FakeApiServer::start()?;
    api.on_token_review(|token, audiences| {
        (token == "good" && audiences.iter().any(|a| a == "sluice"))
            .then(|| ("system:serviceaccount:shop:web".to_string(), vec!["system:serviceaccounts".to_string()]))
    });
    let reviews: Api<TokenReview> = Api::all(client(&api).await?);
    let review = |token: &str| TokenReview {
        spec: TokenReviewSpec { token: Some(token.into()), audiences: Some(vec!["sluice".into()]) },
        ..Default::default()
    };
    let ok = timeout(WAIT, reviews.create(&PostParams::default(), &review("good"))).await??;
    let st = ok.status.context("no status")?;
    ensure!(st.authenticated == Some(true));
    let user = st.user.context("no user")?;
    ensure!(user.username.as_deref() == Some("system:serviceaccount:shop:web"));
    ensure!(user.groups == Some(vec!["system:serviceaccounts".to_string()]));
    ensure!(st.audiences == Some(vec!["sluice".to_string()]));
    let bad = timeout(WAIT, reviews.create(&PostParams::default(), &review("bad"))).await??;
    ensure!(bad.status.and_then(|s| s.authenticated) == Some(false));
    let seen: Vec<String> = api.token_reviews().into_iter().map(|r| r.token).collect();
    ensure!(seen == ["good", "bad"], "recorded {seen:?}");
    ensure!(api.token_reviews()[0].audiences == ["sluice"]);
    Ok(())
}

#[tokio::test]
async fn watch_sends_bookmarks_and_ends_after_timeout() -> anyhow::Result<()> {
    let api = FakeApiServer::start()?;
    api.set_bookmark_interval(Duration::from_millis(100));
    let created = api.apply(pod("shop", "a", "node-a", &[]))?;
    let rv = created["metadata"]["resourceVersion"].as_str().context("rv")?.to_string();
    let pods: Api<Pod> = Api::namespaced(client(&api).await?, "shop");
    let start = Instant::now();
    let events: Vec<WatchEvent<Pod>> =
        timeout(WAIT, pods.watch(&WatchParams::default().timeout(1), "0")).await??.try_collect().await?;
    ensure!(start.elapsed() >= Duration::from_millis(900), "ended early after {:?}", start.elapsed());
    ensure!(matches!(events.first(), Some(WatchEvent::Added(p)) if p.name_any() == "a"), "{events:?}");
    ensure!(
        events.iter().any(|e| matches!(e, WatchEvent::Bookmark(b) if b.metadata.resource_version == rv)),
        "{events:?}"
    );
    Ok(())
}

/// Raw HTTP: bad requests get Status JSON, never a hang or a dropped connection.
#[test]
fn bad_requests_get_status_objects() -> anyhow::Result<()> {
    let api = FakeApiServer::start()?;
    let ask = |req: &str| -> anyhow::Result<String> {
        let mut s = std::net::TcpStream::connect(api.addr())?;
        s.set_read_timeout(Some(WAIT))?;
        s.write_all(format!("{req} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    };
    for (req, code, reason) in [
        ("GET /api/v1/nothings", "404", "NotFound"),
        ("GET /nowhere", "404", "NotFound"),
        ("DELETE /api/v1/namespaces/a/pods/b", "405", "MethodNotAllowed"),
        ("GET /api/v1/pods?labelSelector=%3D%3D", "400", "BadRequest"),
        ("GET /api/v1/pods?watch=true&resourceVersion=abc", "400", "BadRequest"),
        ("GET /api/v1/pods?limit=-1", "400", "BadRequest"),
        ("GET /api/v1/pods?continue=zz", "400", "BadRequest"),
    ] {
        let out = ask(req)?;
        ensure!(out.starts_with(&format!("HTTP/1.1 {code}")), "{req}: {out}");
        ensure!(
            out.contains(&format!("\"reason\":\"{reason}\"")) && out.contains("\"kind\":\"Status\""),
            "{req}: {out}"
        );
    }
    ensure!(api.requests().len() == 7);
    Ok(())
}
