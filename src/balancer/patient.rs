//! A balancer client that waits out a balancer restart.
//!
//! Every call that fails because the balancer cannot be reached is retried with backoff until
//! `deadline` has passed since the balancer was last seen; answers from the balancer (a 404, a
//! 409) are final at once. A deploy that loses its balancer for a few seconds (an upgrade, a
//! crash and restart with its routing state restored) carries on; one whose balancer stays away
//! stops with an error that says so.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use std::collections::BTreeMap;

use super::api::{SwitchReport, SwitchRequest};
use super::{BackendSpec, BackendView, Balancer, DrainReport, Stats, is_unreachable};
use crate::progress::Progress;

pub struct Patient {
    inner: Arc<dyn Balancer>,
    deadline: Duration,
    progress: Progress,
}

impl Patient {
    pub fn new(inner: Arc<dyn Balancer>, deadline: Duration, progress: Progress) -> Patient {
        Patient {
            inner,
            deadline,
            progress,
        }
    }

    async fn retry<T, F, Fut>(&self, what: &str, call: F) -> anyhow::Result<T>
    where
        F: Fn() -> Fut + Send + Sync,
        Fut: std::future::Future<Output = anyhow::Result<T>> + Send,
        T: Send,
    {
        let start = Instant::now();
        let mut pause = Duration::from_millis(100);
        let mut warned = false;
        loop {
            match call().await {
                Err(e) if is_unreachable(&e) && start.elapsed() < self.deadline => {
                    if !warned {
                        self.progress.say(&format!(
                            "balancer unreachable during {what}; retrying for up to {} ({e:#})",
                            humantime::format_duration(self.deadline)
                        ));
                        warned = true;
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(e) if is_unreachable(&e) => {
                    return Err(e.context(format!(
                        "the balancer stayed unreachable for {}: stopping here (instances keep running; run `cutover deploy --resume` once the balancer is back)",
                        humantime::format_duration(self.deadline)
                    )));
                }
                other => {
                    if warned {
                        self.progress.say(&format!(
                            "balancer reachable again after {:.1}s",
                            start.elapsed().as_secs_f64()
                        ));
                    }
                    return other;
                }
            }
        }
    }
}

#[async_trait]
impl Balancer for Patient {
    async fn backends(&self) -> anyhow::Result<Vec<BackendView>> {
        self.retry("listing backends", || self.inner.backends())
            .await
    }
    async fn add(&self, spec: &BackendSpec) -> anyhow::Result<()> {
        self.retry("add", || self.inner.add(spec)).await
    }
    async fn remove(&self, id: &str) -> anyhow::Result<()> {
        self.retry("remove", || self.inner.remove(id)).await
    }
    async fn set_weight(&self, id: &str, weight: u32) -> anyhow::Result<()> {
        self.retry("set weight", || self.inner.set_weight(id, weight))
            .await
    }
    async fn drain(&self, id: &str) -> anyhow::Result<()> {
        self.retry("drain", || self.inner.drain(id)).await
    }
    async fn activate(&self, id: &str) -> anyhow::Result<()> {
        self.retry("activate", || self.inner.activate(id)).await
    }
    async fn wait_drained(&self, id: &str, timeout: Duration) -> anyhow::Result<DrainReport> {
        self.retry("wait for drain", || self.inner.wait_drained(id, timeout))
            .await
    }
    async fn retire(&self, id: &str, timeout: Duration) -> anyhow::Result<DrainReport> {
        self.retry("retire", || self.inner.retire(id, timeout))
            .await
    }
    async fn wait_healthy(&self, id: &str, timeout: Duration) -> anyhow::Result<()> {
        self.retry("wait for health", || self.inner.wait_healthy(id, timeout))
            .await
    }
    async fn stats(&self) -> anyhow::Result<Stats> {
        self.retry("stats", || self.inner.stats()).await
    }
    async fn switch(&self, req: &SwitchRequest) -> anyhow::Result<SwitchReport> {
        self.retry("switch", || self.inner.switch(req)).await
    }
    async fn set_weights(&self, weights: &BTreeMap<String, u32>) -> anyhow::Result<()> {
        self.retry("set weights", || self.inner.set_weights(weights))
            .await
    }
    async fn samples(&self, release: &str, max: usize) -> anyhow::Result<Vec<u64>> {
        self.retry("samples", || self.inner.samples(release, max))
            .await
    }
}
