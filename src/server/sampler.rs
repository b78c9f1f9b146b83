//! The live traffic record of `cutover serve`: the balancer's counters read every second while
//! idle and every 250 ms while a deployment runs, kept in a ring (about an hour at the fast
//! rate). The dashboard's chart reads rates from it; the runner copies a deployment's window
//! into the journal for its report.
//!
//! It also notices when the balancer's counting begins again ([`Stats::counting_since_ms`]
//! changes: an HAProxy reload or restart, a restart of cutover's own proxy) and says so to
//! whoever watches [`Live::restarts`]: serve then looks for hosts the balancer lost.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::balancer::{Balancer, Stats};
use crate::journal::now_ms;
use crate::report::Sample;

/// Interval while a deployment runs.
pub const FAST: Duration = Duration::from_millis(250);
/// Interval while idle.
pub const SLOW: Duration = Duration::from_secs(1);
/// Samples kept.
const KEPT: usize = 4 * 3600;

pub struct Live {
    balancer: Arc<dyn Balancer>,
    ring: Mutex<VecDeque<Sample>>,
    fast: AtomicBool,
    changed: Notify,
    /// The last error reading the balancer (None once it answers again).
    error: Mutex<Option<String>>,
    /// `counting_since_ms` of the last read that answered.
    counting_since: Mutex<Option<u64>>,
    /// How many times the counting began again since the first read.
    restarts: watch::Sender<u64>,
}

impl Live {
    pub fn new(balancer: Arc<dyn Balancer>) -> Live {
        Live {
            balancer,
            ring: Mutex::new(VecDeque::new()),
            fast: AtomicBool::new(false),
            changed: Notify::new(),
            error: Mutex::new(None),
            counting_since: Mutex::new(None),
            restarts: watch::channel(0).0,
        }
    }

    /// Changes each time a read finds the balancer counting since another moment than the
    /// read before (the first read sets the moment; a balancer that did not answer meanwhile
    /// is compared with the last one that did).
    pub fn restarts(&self) -> watch::Receiver<u64> {
        self.restarts.subscribe()
    }

    fn note_counting(&self, stats: &Stats) {
        let mut since = self
            .counting_since
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if since.is_some_and(|s| s != stats.counting_since_ms) {
            self.restarts.send_modify(|n| *n += 1);
        }
        *since = Some(stats.counting_since_ms);
    }

    /// Reads the balancer once and records the sample.
    pub async fn sample_now(&self) -> Option<Sample> {
        match self.balancer.stats().await {
            Ok(stats) => {
                self.note_counting(&stats);
                let s = Sample::from_stats(now_ms(), &stats);
                *self.error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
                // Keep time monotonic (a late answer of a slow read lands after a fast one).
                if ring.back().is_none_or(|b| b.at_ms < s.at_ms) {
                    ring.push_back(s.clone());
                }
                while ring.len() > KEPT {
                    ring.pop_front();
                }
                Some(s)
            }
            Err(e) => {
                *self.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{e:#}"));
                None
            }
        }
    }

    /// Samples every [`FAST`] instead of every [`SLOW`] (while a deployment runs).
    pub fn set_fast(&self, fast: bool) {
        self.fast.store(fast, Ordering::SeqCst);
        self.changed.notify_one();
    }

    /// Samples with `at_ms >= from`, oldest first.
    pub fn since(&self, from: u64) -> Vec<Sample> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.iter().filter(|s| s.at_ms >= from).cloned().collect()
    }

    /// Samples with `at_ms >= from` plus the one before (so the first rate can be computed).
    pub fn window(&self, from: u64) -> Vec<Sample> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let first = ring
            .iter()
            .position(|s| s.at_ms >= from)
            .unwrap_or(ring.len());
        ring.iter().skip(first.saturating_sub(1)).cloned().collect()
    }

    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Samples until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            self.sample_now().await;
            let every = if self.fast.load(Ordering::SeqCst) {
                FAST
            } else {
                SLOW
            };
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = self.changed.notified() => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A balancer whose every read answers the next of `since` as its counting start.
    struct Counting(Mutex<VecDeque<anyhow::Result<u64>>>);

    #[async_trait::async_trait]
    impl Balancer for Counting {
        async fn backends(&self) -> anyhow::Result<Vec<crate::balancer::BackendView>> {
            Ok(Vec::new())
        }
        async fn add(&self, _: &crate::balancer::BackendSpec) -> anyhow::Result<()> {
            Ok(())
        }
        async fn remove(&self, _: &str) -> anyhow::Result<()> {
            Ok(())
        }
        async fn set_weight(&self, _: &str, _: u32) -> anyhow::Result<()> {
            Ok(())
        }
        async fn activate(&self, _: &str) -> anyhow::Result<()> {
            Ok(())
        }
        async fn drain(&self, _: &str) -> anyhow::Result<()> {
            Ok(())
        }
        async fn wait_drained(
            &self,
            _: &str,
            _: Duration,
        ) -> anyhow::Result<crate::balancer::DrainReport> {
            Ok(Default::default())
        }
        async fn wait_healthy(&self, _: &str, _: Duration) -> anyhow::Result<()> {
            Ok(())
        }
        async fn stats(&self) -> anyhow::Result<Stats> {
            let next = self.0.lock().unwrap().pop_front().expect("a read planned");
            next.map(|since| Stats {
                counting_since_ms: since,
                ..Stats::default()
            })
        }
    }

    #[tokio::test]
    async fn a_new_counting_start_is_a_restart_and_the_first_read_is_not() {
        let reads = [
            Ok(5),
            Ok(5),
            Err(anyhow::anyhow!("down")),
            Ok(9),
            Ok(9),
            Ok(12),
        ];
        let live = Live::new(Arc::new(Counting(Mutex::new(reads.into_iter().collect()))));
        let restarts = live.restarts();
        let mut seen = Vec::new();
        for _ in 0..6 {
            live.sample_now().await;
            seen.push(*restarts.borrow());
        }
        assert_eq!(seen, vec![0, 0, 0, 1, 1, 2]);
    }
}
