//! The balancer as the deployer sees it: a small interface (add, remove, weight, drain, wait until
//! drained, health, counters) that the built-in proxy's admin API implements, and that other
//! balancers (HAProxy) can implement too.
//!
//! The wire types live in [`api`] so the proxy's server side and this client side share one
//! definition of every JSON body.

pub mod api;
pub mod builtin;
pub mod haproxy;
pub mod patient;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;

use api::{SampleWindow, Samples, SwitchReport, SwitchRequest};

/// What a balancer without latency samples answers.
const NO_SAMPLES: &str = "latency samples are unsupported by this balancer: use the built-in balancer (`cutover proxy`) for statistical analysis";

pub use api::{BackendSpec, BackendState, BackendView, Counters, DrainReport, Stats};

/// The balancer could not be reached (connection refused, reset, no answer): the call may be
/// retried once it is back. Any other error is the balancer's answer and is final.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(pub String);

/// True when `e` says the balancer could not be reached.
pub fn is_unreachable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Unreachable>())
}

/// What a deploy needs from a load balancer. Every method is idempotent: adding a backend that
/// is already there with the same spec, or draining a draining one, succeeds, so a resumed deploy
/// can repeat a step without harm.
#[async_trait]
pub trait Balancer: Send + Sync {
    /// Every backend the balancer knows, with state, health and counters.
    async fn backends(&self) -> anyhow::Result<Vec<BackendView>>;
    /// Adds a backend (new backends start unchecked and receive traffic once the balancer's own
    /// health check passes).
    async fn add(&self, spec: &BackendSpec) -> anyhow::Result<()>;
    /// Removes a backend at once; callers drain first.
    async fn remove(&self, id: &str) -> anyhow::Result<()>;
    async fn set_weight(&self, id: &str, weight: u32) -> anyhow::Result<()>;
    /// Stops sending new requests to the backend; in-flight requests finish.
    async fn drain(&self, id: &str) -> anyhow::Result<()>;
    /// Puts a draining backend back into rotation (undo of [`Balancer::drain`]).
    async fn activate(&self, id: &str) -> anyhow::Result<()>;
    /// Waits until the backend has no request in flight, or the timeout passes (then long-lived
    /// connections are closed and counted in the report).
    async fn wait_drained(&self, id: &str, timeout: Duration) -> anyhow::Result<DrainReport>;
    /// Takes a backend out for good: drain, wait up to `timeout` for in-flight requests, remove.
    /// The built-in balancer does it in one call; this default makes the three.
    async fn retire(&self, id: &str, timeout: Duration) -> anyhow::Result<DrainReport> {
        self.drain(id).await?;
        let report = self.wait_drained(id, timeout).await?;
        self.remove(id).await?;
        Ok(report)
    }
    /// Waits until the balancer's own health check sees the backend healthy.
    async fn wait_healthy(&self, id: &str, timeout: Duration) -> anyhow::Result<()>;
    /// Counters per backend and per release.
    async fn stats(&self) -> anyhow::Result<Stats>;

    /// Blue-green switch: `activate` become active, `standby` draining. The built-in balancer
    /// does it atomically; this default activates then drains one call at a time (a short
    /// moment where both sets receive traffic), and reports the time the calls took.
    async fn switch(&self, req: &SwitchRequest) -> anyhow::Result<SwitchReport> {
        let started = std::time::Instant::now();
        for id in &req.activate {
            self.activate(id).await?;
        }
        for id in &req.standby {
            self.drain(id).await?;
        }
        Ok(SwitchReport {
            took_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            at_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        })
    }

    /// Several weights at once. The built-in balancer applies them atomically; this default
    /// sets them one by one, non-zero ones first, so no moment in between has every backend
    /// at weight 0.
    async fn set_weights(&self, weights: &BTreeMap<String, u32>) -> anyhow::Result<()> {
        let (up, zero): (Vec<_>, Vec<_>) = weights.iter().partition(|(_, w)| **w > 0);
        for (id, w) in up.into_iter().chain(zero) {
            self.set_weight(id, *w).await?;
        }
        Ok(())
    }

    /// The largest weight a backend may have here.
    fn max_weight(&self) -> u32 {
        u32::MAX
    }

    /// What the balancer client did by itself since it was last asked, each said once, for the
    /// deployment to say and report: servers it put back after HAProxy was reloaded under it.
    fn notices(&self) -> Vec<String> {
        Vec::new()
    }

    /// The most recent response latencies (µs, oldest first) of a release, at most `max`.
    /// Only the built-in balancer keeps them; others answer an "unsupported" error.
    async fn samples(&self, release: &str, max: usize) -> anyhow::Result<Vec<u64>> {
        let _ = (release, max);
        anyhow::bail!(NO_SAMPLES)
    }

    /// The latencies a release recorded over a stretch of time (see [`SampleWindow`]). Only
    /// the built-in balancer keeps them; others answer an "unsupported" error.
    async fn sample_window(&self, release: &str, window: &SampleWindow) -> anyhow::Result<Samples> {
        let _ = (release, window);
        anyhow::bail!(NO_SAMPLES)
    }
}
