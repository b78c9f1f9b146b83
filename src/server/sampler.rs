//! The live traffic record of `cutover serve`: the balancer's counters read every second while
//! idle and every 250 ms while a deployment runs, kept in a ring (about an hour at the fast
//! rate). The dashboard's chart reads rates from it; the runner copies a deployment's window
//! into the journal for its report.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::balancer::Balancer;
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
}

impl Live {
    pub fn new(balancer: Arc<dyn Balancer>) -> Live {
        Live {
            balancer,
            ring: Mutex::new(VecDeque::new()),
            fast: AtomicBool::new(false),
            changed: Notify::new(),
            error: Mutex::new(None),
        }
    }

    /// Reads the balancer once and records the sample.
    pub async fn sample_now(&self) -> Option<Sample> {
        match self.balancer.stats().await {
            Ok(stats) => {
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
