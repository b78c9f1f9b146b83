//! A balancer client that waits out a balancer restart.
//!
//! Every call that fails because the balancer cannot be reached is retried with backoff until
//! `deadline` has passed since the balancer was last seen; answers from the balancer (a 404, a
//! 409) are final at once. A deploy that loses its balancer for a few seconds (an upgrade, a
//! crash and restart with its routing state restored) carries on; one whose balancer stays away
//! stops with an error that says so.
//!
//! What the balancer did by itself meanwhile ([`Balancer::notices`]: the servers an HAProxy
//! reload dropped, put back) is said as soon as the call that did it returns, and kept for the
//! deployment's report.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use std::collections::BTreeMap;

use super::api::{SampleWindow, Samples, SwitchReport, SwitchRequest};
use super::{BackendSpec, BackendView, Balancer, DrainReport, Stats, is_unreachable};
use crate::progress::Progress;

pub struct Patient {
    inner: Arc<dyn Balancer>,
    deadline: Duration,
    progress: Progress,
    /// The inner balancer's notices said so far, for [`Balancer::notices`].
    said: std::sync::Mutex<Vec<String>>,
    /// Whether the balancer ever answered this process: one that never did is more likely not
    /// started than restarting, and the wait says what to check.
    answered: std::sync::atomic::AtomicBool,
}

impl Patient {
    pub fn new(inner: Arc<dyn Balancer>, deadline: Duration, progress: Progress) -> Patient {
        Patient {
            inner,
            deadline,
            progress,
            said: Default::default(),
            answered: Default::default(),
        }
    }

    /// Says what the inner balancer did by itself, and keeps it.
    fn relay(&self) {
        let notices = self.inner.notices();
        for n in &notices {
            self.progress.say(&format!("balancer: {n}"));
        }
        self.said
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(notices);
    }

    async fn retry<T, F, Fut>(&self, what: &str, call: F) -> anyhow::Result<T>
    where
        F: Fn() -> Fut + Send + Sync,
        Fut: std::future::Future<Output = anyhow::Result<T>> + Send,
        T: Send,
    {
        // The clock starts at the first failure, not at the call: a long wait (for health, for
        // a drain) that a balancer restart cuts after minutes is retried like a short call.
        let mut lost: Option<Instant> = None;
        let mut pause = Duration::from_millis(100);
        let mut warned = false;
        loop {
            let result = call().await;
            self.relay();
            let since = match &result {
                Err(e) if is_unreachable(e) => *lost.get_or_insert_with(Instant::now),
                _ => Instant::now(),
            };
            match result {
                Err(e) if is_unreachable(&e) && since.elapsed() < self.deadline => {
                    if !warned {
                        let hint = if self.answered.load(std::sync::atomic::Ordering::Relaxed) {
                            ""
                        } else {
                            " (it has not answered since this command started; Ctrl-C stops the wait, `[balancer] unreachable_timeout` sets its length)"
                        };
                        self.progress.say(&format!(
                            "balancer unreachable during {what}; retrying for up to {}{hint} ({e:#})",
                            humantime::format_duration(self.deadline)
                        ));
                        warned = true;
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(e) if is_unreachable(&e) => {
                    return Err(e.context(format!(
                        "the balancer stayed unreachable for {}: stopping here (instances keep running)",
                        humantime::format_duration(self.deadline)
                    )));
                }
                other => {
                    self.answered
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    if let Some(lost) = lost.filter(|_| warned) {
                        self.progress.say(&format!(
                            "balancer reachable again after {:.1}s",
                            lost.elapsed().as_secs_f64()
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
    fn max_weight(&self) -> u32 {
        self.inner.max_weight()
    }
    fn notices(&self) -> Vec<String> {
        self.relay();
        std::mem::take(&mut *self.said.lock().unwrap_or_else(|p| p.into_inner()))
    }
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
    async fn sample_window(&self, release: &str, window: &SampleWindow) -> anyhow::Result<Samples> {
        self.retry("samples", || self.inner.sample_window(release, window))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::Unreachable;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A balancer whose `wait_healthy` is cut after `cut_after` (a restart) `cuts` times,
    /// then answers.
    struct Cut {
        calls: AtomicU32,
        cuts: u32,
        cut_after: Duration,
    }

    #[async_trait]
    impl Balancer for Cut {
        async fn backends(&self) -> anyhow::Result<Vec<BackendView>> {
            Ok(Vec::new())
        }
        async fn add(&self, _: &BackendSpec) -> anyhow::Result<()> {
            Ok(())
        }
        async fn remove(&self, _: &str) -> anyhow::Result<()> {
            Ok(())
        }
        async fn set_weight(&self, _: &str, _: u32) -> anyhow::Result<()> {
            Ok(())
        }
        async fn drain(&self, _: &str) -> anyhow::Result<()> {
            Ok(())
        }
        async fn activate(&self, _: &str) -> anyhow::Result<()> {
            Ok(())
        }
        async fn wait_drained(&self, _: &str, _: Duration) -> anyhow::Result<DrainReport> {
            anyhow::bail!("not used")
        }
        async fn wait_healthy(&self, _: &str, _: Duration) -> anyhow::Result<()> {
            if self.calls.fetch_add(1, Ordering::SeqCst) < self.cuts {
                tokio::time::sleep(self.cut_after).await;
                return Err(Unreachable("connection reset".into()).into());
            }
            Ok(())
        }
        async fn stats(&self) -> anyhow::Result<Stats> {
            Ok(Stats::default())
        }
    }

    #[tokio::test]
    async fn a_long_call_cut_after_the_deadline_is_still_retried() {
        let inner = Arc::new(Cut {
            calls: AtomicU32::new(0),
            cuts: 1,
            cut_after: Duration::from_millis(300),
        });
        let patient = Patient::new(inner.clone(), Duration::from_millis(200), Progress::quiet());
        patient
            .wait_healthy("a", Duration::from_secs(1))
            .await
            .expect("retried once the balancer answers again");
        assert_eq!(inner.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_balancer_that_stays_away_stops_the_call_after_the_deadline() {
        let inner = Arc::new(Cut {
            calls: AtomicU32::new(0),
            cuts: u32::MAX,
            cut_after: Duration::ZERO,
        });
        let patient = Patient::new(inner, Duration::from_millis(250), Progress::quiet());
        let started = Instant::now();
        let e = patient
            .wait_healthy("a", Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(250));
        assert!(format!("{e:#}").contains("stayed unreachable"), "{e:#}");
    }
}
