//! Forwards aya-log records from the kernel programs into `tracing`, so BPF
//! log lines share the agent's format, filter and sinks (target `sluice::ebpf`).

use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::unix::AsyncFd;
use tracing::warn;

struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let msg = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "sluice::ebpf", "{msg}"),
            log::Level::Warn => tracing::warn!(target: "sluice::ebpf", "{msg}"),
            log::Level::Info => tracing::info!(target: "sluice::ebpf", "{msg}"),
            log::Level::Debug => tracing::debug!(target: "sluice::ebpf", "{msg}"),
            log::Level::Trace => tracing::trace!(target: "sluice::ebpf", "{msg}"),
        }
    }

    fn flush(&self) {}
}

/// Owns the task that drains the log ring buffer; aborts it on drop.
pub struct LogForwarder(tokio::task::JoinHandle<()>);

impl LogForwarder {
    /// Starts draining, when inside a tokio runtime and the object logs at all.
    pub fn start(ebpf: &mut Ebpf) -> Option<Self> {
        let logger = match EbpfLogger::init_with_logger(ebpf, ToTracing) {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "kernel program logs will not be forwarded");
                return None;
            }
        };
        let handle = tokio::runtime::Handle::try_current().ok()?;
        Some(LogForwarder(handle.spawn(async move {
            // SAFETY: the logger owns its ring-buffer fd and lives inside the
            // AsyncFd, so the fd stays open for as long as it is registered.
            let Ok(mut fd) = (unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }) else {
                return;
            };
            while let Ok(mut guard) = fd.readable_mut().await {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        })))
    }
}

impl Drop for LogForwarder {
    fn drop(&mut self) {
        self.0.abort();
    }
}
