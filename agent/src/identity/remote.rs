//! Certificates from a CA service: one slot per workload identity, filled
//! and renewed at half-life by a background driver, retried with backoff
//! when the CA fails, while the current certificate keeps serving until it
//! expires.
//!
//! `CertCache::get` is synchronous (TLS resolvers call it mid-handshake).
//! With a certificate in the slot it returns at once; only an identity
//! seen for the first time waits for its first answer (bounded), inside
//! `block_in_place` so the runtime's other tasks keep running.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak,
    },
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::Notify;

use super::{validity::display, validity::display as utc, CaClient, CaError, SpiffeId, WorkloadCert};

/// How long a first `get` for an identity waits for the CA.
const FIRST_WAIT: Duration = super::client::REQUEST_TIMEOUT.saturating_add(Duration::from_secs(2));
/// The driver looks at every slot at least this often.
const TICK: Duration = Duration::from_millis(500);
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const BACKOFF_NO_CERT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Slot {
    cert: Option<Arc<WorkloadCert>>,
    in_flight: bool,
    /// Answers (either way) received for this slot.
    attempts: u64,
    /// Failures since the last success.
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<String>,
}

/// Counters for `/metrics` and `/config_dump`.
#[derive(Default)]
pub struct CaStats {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    last: Mutex<LastOutcome>,
}

#[derive(Default, Clone)]
struct LastOutcome {
    success_at: Option<SystemTime>,
    error_at: Option<SystemTime>,
    error: Option<String>,
    consecutive_failures: u64,
}

pub(crate) struct Remote {
    client: Arc<CaClient>,
    slots: Mutex<HashMap<SpiffeId, Slot>>,
    answered: Condvar,
    wake: Arc<Notify>,
    handle: tokio::runtime::Handle,
    pub(crate) stats: Arc<CaStats>,
}

impl Remote {
    /// Starts the driver on the current runtime.
    pub(crate) fn start(client: Arc<CaClient>) -> Arc<Remote> {
        let handle = tokio::runtime::Handle::current();
        let remote = Arc::new(Remote {
            client,
            slots: Mutex::default(),
            answered: Condvar::new(),
            wake: Arc::new(Notify::new()),
            handle: handle.clone(),
            stats: Arc::default(),
        });
        handle.spawn(drive(Arc::downgrade(&remote), remote.wake.clone()));
        remote
    }

    pub(crate) fn client(&self) -> &Arc<CaClient> {
        &self.client
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SpiffeId, Slot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current certificate; the first call for an identity waits for
    /// the CA's first answer.
    pub(crate) fn get(&self, id: &SpiffeId) -> Result<Arc<WorkloadCert>, CaError> {
        let now = SystemTime::now();
        {
            let mut slots = self.lock();
            match slots.get(id) {
                Some(slot) => {
                    if let Some(cert) = slot.cert.as_ref().filter(|c| !c.is_expired_at(now)) {
                        return Ok(cert.clone());
                    }
                    // Tried and failed (the driver keeps retrying): say why
                    // now rather than stall a handshake.
                    if slot.attempts > 0 && !slot.in_flight {
                        return Err(self.unavailable(id, slot));
                    }
                }
                None => {
                    slots.insert(id.clone(), Slot::default());
                    self.wake.notify_one();
                    // The CA is failing right now: do not hold this caller
                    // (say, the agent enrolling pod after pod) for a request
                    // timeout each; the driver asks in the background.
                    let last = self.stats.last.lock().unwrap_or_else(PoisonError::into_inner);
                    if last.consecutive_failures > 0 {
                        let error = last.error.clone().unwrap_or_default();
                        return Err(CaError::Issue {
                            id: id.to_string(),
                            reason: format!("the CA is failing ({error}); requested in the background"),
                        });
                    }
                }
            }
        }
        let wait = || self.wait_first(id);
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
            _ => wait(),
        }
    }

    fn wait_first(&self, id: &SpiffeId) -> Result<Arc<WorkloadCert>, CaError> {
        let deadline = Instant::now() + FIRST_WAIT;
        let mut slots = self.lock();
        let start = slots.get(id).map_or(0, |s| s.attempts);
        loop {
            let now = SystemTime::now();
            let Some(slot) = slots.get(id) else {
                return Err(CaError::Issue { id: id.to_string(), reason: "the workload was removed".into() });
            };
            if let Some(cert) = slot.cert.as_ref().filter(|c| !c.is_expired_at(now)) {
                return Ok(cert.clone());
            }
            if slot.attempts > start {
                return Err(self.unavailable(id, slot));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CaError::Issue {
                    id: id.to_string(),
                    reason: format!("no answer from the CA at {} within {FIRST_WAIT:?}", self.client.address()),
                });
            }
            slots = self.answered.wait_timeout(slots, left).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    fn unavailable(&self, id: &SpiffeId, slot: &Slot) -> CaError {
        let reason = match &slot.last_error {
            Some(e) => format!("no valid certificate: the last request failed ({e}); retrying"),
            None => "no valid certificate yet; retrying".into(),
        };
        CaError::Issue { id: id.to_string(), reason }
    }

    pub(crate) fn forget(&self, id: &SpiffeId) -> bool {
        self.lock().remove(id).is_some_and(|s| s.cert.is_some())
    }

    pub(crate) fn peek(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        self.lock().get(id).and_then(|s| s.cert.clone())
    }

    pub(crate) fn ids(&self) -> Vec<SpiffeId> {
        let mut ids: Vec<_> = self.lock().iter().filter(|(_, s)| s.cert.is_some()).map(|(id, _)| id.clone()).collect();
        ids.sort();
        ids
    }

    /// Starts a request for every slot that is due; returns when to look again.
    fn schedule(self: &Arc<Self>) -> Instant {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut next = now + TICK;
        let mut slots = self.lock();
        for (id, slot) in slots.iter_mut() {
            if slot.in_flight {
                continue;
            }
            let refresh_in = slot.cert.as_ref().map(|c| c.refresh_at().duration_since(wall).unwrap_or_default());
            let due = refresh_in.is_none_or(|d| d.is_zero());
            match slot.retry_at {
                Some(at) if at > now => {
                    next = next.min(at);
                    continue;
                }
                _ if !due => {
                    next = next.min(now + refresh_in.unwrap_or(TICK));
                    continue;
                }
                _ => {}
            }
            slot.in_flight = true;
            let (this, id) = (self.clone(), id.clone());
            self.handle.spawn(async move {
                let result = this.client.fetch(&id).await;
                this.record(&id, result);
            });
        }
        next
    }

    fn record(&self, id: &SpiffeId, result: Result<WorkloadCert, CaError>) {
        let mut slots = self.lock();
        let Some(slot) = slots.get_mut(id) else { return };
        slot.in_flight = false;
        slot.attempts += 1;
        let mut last = self.stats.last.lock().unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(cert) => {
                self.stats.ok.fetch_add(1, Ordering::Relaxed);
                last.success_at = Some(SystemTime::now());
                last.consecutive_failures = 0;
                tracing::info!(%id, not_after = %utc(cert.not_after), ca = self.client.address(), "certificate issued by the CA");
                let replace = slot.cert.as_ref().is_none_or(|c| c.not_after <= cert.not_after);
                if replace {
                    slot.cert = Some(Arc::new(cert));
                }
                slot.failures = 0;
                slot.retry_at = None;
                slot.last_error = None;
            }
            Err(e) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                let text = e.to_string();
                last.error_at = Some(SystemTime::now());
                last.error = Some(text.clone());
                last.consecutive_failures += 1;
                slot.failures = slot.failures.saturating_add(1);
                let left =
                    slot.cert.as_ref().map(|c| c.not_after.duration_since(SystemTime::now()).unwrap_or_default());
                let delay = backoff(slot.failures, left);
                slot.retry_at = Some(Instant::now() + delay);
                slot.last_error = Some(text);
                match &slot.cert {
                    Some(c) if !c.is_expired_at(SystemTime::now()) => tracing::warn!(
                        %id, error = %e, retry_in = ?delay, valid_until = %utc(c.not_after),
                        "certificate renewal failed; serving the current one until it expires"
                    ),
                    _ => tracing::warn!(%id, error = %e, retry_in = ?delay, "certificate request failed"),
                }
            }
        }
        drop(last);
        drop(slots);
        self.answered.notify_all();
        self.wake.notify_one();
    }

    pub(crate) fn dump(&self) -> serde_json::Value {
        let last = self.stats.last.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let time = |t: Option<SystemTime>| t.map(display);
        let slots = self.lock();
        let mut certs: Vec<_> = slots
            .iter()
            .map(|(id, s)| {
                serde_json::json!({
                    "identity": id.to_string(),
                    "notAfter": s.cert.as_ref().map(|c| display(c.not_after)),
                    "refreshAt": s.cert.as_ref().map(|c| display(c.refresh_at())),
                    "failures": s.failures,
                    "lastError": s.last_error,
                })
            })
            .collect();
        certs.sort_by(|a, b| a["identity"].as_str().cmp(&b["identity"].as_str()));
        serde_json::json!({
            "mode": "remote",
            "address": self.client.address(),
            "requests": {
                "ok": self.stats.ok.load(Ordering::Relaxed),
                "failed": self.stats.failed.load(Ordering::Relaxed),
            },
            "consecutiveFailures": last.consecutive_failures,
            "reachable": last.consecutive_failures == 0 && last.success_at.is_some(),
            "lastSuccess": time(last.success_at),
            "lastError": last.error,
            "lastErrorAt": time(last.error_at),
            "identities": certs,
        })
    }
}

/// Exponential from 0.5 s, at most 30 s, and at most a quarter of what is
/// left of the current certificate (so a CA that comes back is asked again
/// before the certificate runs out); at most 5 s while there is no valid
/// certificate at all (the workload cannot be served until one comes).
/// With +-20% jitter.
fn backoff(failures: u32, left: Option<Duration>) -> Duration {
    let exp = BACKOFF_FIRST.saturating_mul(1u32 << failures.saturating_sub(1).min(10));
    let mut d = exp.min(BACKOFF_MAX);
    match left {
        Some(left) if !left.is_zero() => d = d.min((left / 4).max(Duration::from_millis(250))),
        _ => d = d.min(BACKOFF_NO_CERT),
    }
    d.mul_f64(0.8 + 0.4 * fastrand::f64())
}

async fn drive(remote: Weak<Remote>, wake: Arc<Notify>) {
    loop {
        let Some(r) = remote.upgrade() else { return };
        let next = r.schedule();
        drop(r);
        tokio::select! {
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = wake.notified() => {}
        }
    }
}

/// `sluice_ca_requests_total{result}` and `sluice_ca_consecutive_failures`.
#[derive(Debug)]
pub struct CaCollector(pub(crate) Arc<CaStats>);

impl std::fmt::Debug for CaStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaStats").field("ok", &self.ok).field("failed", &self.failed).finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

impl prometheus_client::collector::Collector for CaCollector {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use prometheus_client::{
            encoding::EncodeMetric,
            metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
        };
        let mut family = encoder.encode_descriptor(
            "sluice_ca_requests",
            "Certificate requests to the CA service, by result (error: refused, unreachable or an unusable answer)",
            None,
            MetricType::Counter,
        )?;
        for (result, value) in [("ok", &self.0.ok), ("error", &self.0.failed)] {
            ConstCounter::new(value.load(Ordering::Relaxed)).encode(family.encode_family(&ResultLabel { result })?)?;
        }
        let consecutive = self.0.last.lock().unwrap_or_else(PoisonError::into_inner).consecutive_failures;
        let gauge = encoder.encode_descriptor(
            "sluice_ca_consecutive_failures",
            "Certificate requests that failed since the CA last answered with a certificate",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(consecutive as i64).encode(gauge)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_respects_the_remaining_life() {
        let b = |n, left| backoff(n, left);
        assert!(b(1, None) <= Duration::from_millis(600));
        assert!(b(3, None) >= Duration::from_millis(1600) && b(3, None) <= Duration::from_millis(2400));
        assert!(b(50, None) <= Duration::from_secs(6), "no certificate: at most 5 s");
        assert!(b(50, Some(Duration::from_secs(3600))) >= Duration::from_secs(24), "30 s cap with a long-lived cert");
        assert!(b(50, Some(Duration::from_secs(8))) <= Duration::from_millis(2400));
        assert!(b(50, Some(Duration::ZERO)) <= Duration::from_secs(6));
    }
}
