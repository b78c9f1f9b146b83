//! Carrying out a rolling deployment: stage everywhere, then move hosts batch by batch, each
//! host side by side (new instance beside the old one, so capacity never dips), and undo every
//! moved host when a batch exceeds its failure budget.
//!
//! One host changes release like this ([`Deployer::switch_host`]):
//! 1. start the new instance on a free port next to the old one;
//! 2. wait until it passes its own health check (`healthy_threshold` in a row);
//! 3. add it to the balancer and wait until the balancer itself sees it healthy;
//! 4. drain the old backend (no new requests; in-flight ones finish, up to `drain_timeout`);
//! 5. remove the old backend, stop the old instance (stop signal, `stop_timeout`, then KILL);
//! 6. point `current` at the new release.
//!
//! A failure in steps 1-3 stops and removes only the new instance: the old one never left the
//! balancer, so a failed host keeps serving the old release. Undoing a moved host is the same
//! dance towards the old release, which stays staged on the host.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::future::join_all;
use serde::{Deserialize, Serialize};

use crate::balancer::{BackendSpec, Balancer, Stats};
use crate::batch;
use crate::config::{Config, Host, Name, OnFailure};
use crate::fleet::{self, HostView};
use crate::instance::{self, Instance};
use crate::progress::Progress;
use crate::release::{self, Layout};
use crate::transport::Transport;

/// How a deployment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every host runs the new release (hosts within the failure budget may have stayed behind;
    /// see `failed_hosts`).
    Succeeded,
    /// A batch exceeded its failure budget and every moved host went back.
    RolledBack,
    /// A batch exceeded its failure budget and `on_failure = "halt"` left the fleet as it was.
    Halted,
    /// The rollback itself failed on some host: a person must look (the report names them).
    Failed,
}

impl Outcome {
    /// The name used in tables and JSON.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::RolledBack => "rolled_back",
            Outcome::Halted => "halted",
            Outcome::Failed => "failed",
        }
    }

    /// The process exit code: 0 deployed, 1 rolled back or stopped cleanly.
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Succeeded => 0,
            Outcome::RolledBack | Outcome::Halted | Outcome::Failed => 1,
        }
    }
}

/// A host that did not make it, and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostFailure {
    pub host: String,
    pub reason: String,
}

/// What a deployment did, for the terminal, `--json` and the history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub id: String,
    pub app: String,
    pub kind: String,
    pub from: Option<String>,
    pub to: String,
    pub outcome: Outcome,
    pub started_unix: u64,
    pub duration_ms: u64,
    pub batches: Vec<Vec<String>>,
    pub moved_hosts: Vec<String>,
    pub failed_hosts: Vec<HostFailure>,
    /// Hosts that the rollback could not return (only with outcome `failed`).
    pub stuck_hosts: Vec<HostFailure>,
    /// Requests the balancer answered while the deployment ran.
    pub served: u64,
    /// Of those, requests that failed (5xx from an instance, or no backend could answer).
    pub failed_requests: u64,
    /// Requests served per release while the deployment ran.
    pub served_by_release: BTreeMap<String, u64>,
}

/// What to deploy.
#[derive(Debug, Clone)]
pub struct Request {
    pub version: Name,
    /// `"deploy"` or `"rollback"`: recorded in the history.
    pub kind: &'static str,
}

/// Runs deployments against one fleet.
pub struct Deployer {
    pub config: Arc<Config>,
    pub transport: Arc<dyn Transport>,
    pub balancer: Arc<dyn Balancer>,
    pub progress: Progress,
}

/// Result of moving one host.
struct Moved {
    host: Host,
    /// The release the host served before (its `current`, or the version of its old instance).
    previous: Option<String>,
}

impl Deployer {
    /// Deploys `req.version` to every host with the configured strategy.
    pub async fn run(&self, req: &Request) -> anyhow::Result<Report> {
        let started = Instant::now();
        let started_unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let id = format!("{}-{}", started_unix, std::process::id());
        let config = &self.config;
        let version = &req.version;

        let source = config.release_source(version);
        let before = fleet::observe(config, &self.transport, &self.balancer)
            .await
            .map_err(|e| anyhow::anyhow!("cannot read the fleet before deploying: {e:#}"))?;
        let from = most_common_release(&before);
        let stats_before = self.balancer.stats().await?;
        self.progress.say(&format!(
            "{} {} of {} to {} host(s): {} -> {}",
            req.kind,
            config.app.name,
            version,
            config.hosts.len(),
            from.as_deref().unwrap_or("(nothing)"),
            version
        ));

        // Stage everywhere first, in parallel: no host changes traffic before every copy is in place.
        let staged = self.stage_all(version, &source, &before).await;
        let plan = batch::batches(&config.strategy.batch, &config.hosts);
        let mut moved: Vec<Moved> = Vec::new();
        let mut failed: Vec<HostFailure> = Vec::new();
        let mut outcome = Outcome::Succeeded;
        let mut stuck = Vec::new();

        for (i, hosts) in plan.iter().enumerate() {
            let label = format!("batch {}/{}", i + 1, plan.len());
            let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
            self.progress.say(&format!("{label}: {}", names.join(", ")));
            let results = join_all(hosts.iter().map(|h| {
                let staged = staged.get(h.name.as_str()).cloned();
                let view = before.iter().find(|v| v.host.name == h.name).cloned();
                let label = label.clone();
                async move {
                    match staged {
                        Some(Err(reason)) => Err(HostFailure {
                            host: h.name.to_string(),
                            reason,
                        }),
                        _ => self.switch_host(&label, h, view.as_ref(), version).await,
                    }
                }
            }))
            .await;
            let mut batch_failures = 0;
            for r in results {
                match r {
                    Ok(m) => moved.push(m),
                    Err(f) => {
                        self.progress
                            .say(&format!("{label}: {} FAILED: {}", f.host, f.reason));
                        batch_failures += 1;
                        failed.push(f);
                    }
                }
            }
            if batch::batch_failed(
                batch_failures,
                hosts.len(),
                config.strategy.max_fail_percentage,
            ) {
                self.progress.say(&format!(
                    "{label}: {batch_failures} of {} host(s) failed, more than max_fail_percentage = {}%",
                    hosts.len(),
                    config.strategy.max_fail_percentage.0
                ));
                match config.strategy.on_failure {
                    OnFailure::Rollback => {
                        stuck = self.undo(&moved).await;
                        outcome = if stuck.is_empty() {
                            Outcome::RolledBack
                        } else {
                            Outcome::Failed
                        };
                    }
                    OnFailure::Halt => {
                        self.progress.say(
                            "on_failure = \"halt\": stopping here; the fleet is left as it is",
                        );
                        outcome = Outcome::Halted;
                    }
                }
                break;
            }
        }

        if outcome == Outcome::Succeeded {
            self.prune_all(&moved).await;
        }
        let stats_after = self
            .balancer
            .stats()
            .await
            .unwrap_or_else(|_| stats_before.clone());
        let (served, failed_requests, served_by_release) =
            traffic_between(&stats_before, &stats_after);
        let report = Report {
            id,
            app: config.app.name.to_string(),
            kind: req.kind.to_string(),
            from,
            to: version.to_string(),
            outcome,
            started_unix,
            duration_ms: started.elapsed().as_millis() as u64,
            batches: plan
                .iter()
                .map(|b| b.iter().map(|h| h.name.to_string()).collect())
                .collect(),
            moved_hosts: if outcome == Outcome::Succeeded {
                moved.iter().map(|m| m.host.name.to_string()).collect()
            } else {
                Vec::new()
            },
            failed_hosts: failed,
            stuck_hosts: stuck,
            served,
            failed_requests,
            served_by_release,
        };
        Ok(report)
    }

    /// Copies the release to every host that lacks it, in parallel. Maps host name to the outcome.
    async fn stage_all(
        &self,
        version: &Name,
        source: &std::path::Path,
        before: &[HostView],
    ) -> BTreeMap<String, Result<bool, String>> {
        let source_ok = source.is_dir();
        let results = join_all(self.config.hosts.iter().map(|h| async move {
            let unreachable = before
                .iter()
                .find(|v| v.host.name == h.name)
                .and_then(|v| v.error.clone());
            let r = if let Some(e) = unreachable {
                Err(e)
            } else if !source_ok {
                // Hosts that already have the release (a rollback) need no source.
                match release::list(self.transport.as_ref(), h).await {
                    Ok(list) if list.iter().any(|v| v == version.as_str()) => Ok(false),
                    Ok(_) => Err(format!(
                        "release {version} is not staged here and its source {} is not a directory (release.path)",
                        source.display()
                    )),
                    Err(e) => Err(format!("{e:#}")),
                }
            } else {
                release::stage(self.transport.as_ref(), h, source, version)
                    .await
                    .map_err(|e| format!("{e:#}"))
            };
            (h.name.to_string(), r)
        }))
        .await;
        let copied = results
            .iter()
            .filter(|(_, r)| matches!(r, Ok(true)))
            .count();
        let failed = results.iter().filter(|(_, r)| r.is_err()).count();
        self.progress.say(&format!(
            "staged {version} on {} host(s) ({copied} copied, {} already there{})",
            results.len() - failed,
            results.len() - failed - copied,
            if failed > 0 {
                format!(", {failed} FAILED")
            } else {
                String::new()
            }
        ));
        results.into_iter().collect()
    }

    /// Moves one host to `version`, side by side. On failure the host is left serving what it
    /// served before, with the new instance stopped and out of the balancer.
    async fn switch_host(
        &self,
        label: &str,
        host: &Host,
        view: Option<&HostView>,
        version: &Name,
    ) -> Result<Moved, HostFailure> {
        let fail = |reason: String| HostFailure {
            host: host.name.to_string(),
            reason,
        };
        let say = |msg: String| self.progress.say(&format!("{label} {}: {msg}", host.name));
        let t = self.transport.as_ref();
        let app = &self.config.app;

        // Read the host afresh: an earlier batch or a resumed deploy may have changed it.
        let recorded = instance::list(t, host)
            .await
            .map_err(|e| fail(format!("{e:#}")))?;
        let backends = self
            .balancer
            .backends()
            .await
            .map_err(|e| fail(format!("{e:#}")))?;
        let previous = view.and_then(|v| v.current.clone()).or_else(|| {
            recorded
                .iter()
                .find(|r| r.alive)
                .map(|r| r.instance.version.clone())
        });

        let serving_target = recorded.iter().find(|r| {
            r.alive
                && r.instance.version == version.as_str()
                && backends.iter().any(|b| {
                    b.spec.id == r.instance.backend_id()
                        && b.state == crate::balancer::BackendState::Active
                })
        });
        let new = if let Some(r) = serving_target {
            say(format!(
                "already serving {version} on {}",
                r.instance.address
            ));
            r.instance.clone()
        } else {
            let port = t
                .free_port(host)
                .await
                .map_err(|e| fail(format!("{e:#}")))?;
            let inst = instance::start(t, app, host, version, port)
                .await
                .map_err(|e| fail(format!("{e:#}")))?;
            say(format!(
                "started {version} on {} (pid {})",
                inst.address, inst.pid
            ));
            if let Err(e) = self.admit(&inst).await {
                self.discard(host, &inst).await;
                return Err(fail(e));
            }
            say(format!("{version} healthy and in the balancer"));
            inst
        };

        // Retire everything else on this host: old instances and backends that point nowhere.
        let new_id = new.backend_id();
        for b in backends
            .iter()
            .filter(|b| b.spec.host == host.name.as_str() && b.spec.id != new_id)
        {
            if let Err(e) = self.retire_backend(&b.spec.id).await {
                say(format!(
                    "WARNING: could not retire backend {}: {e:#}",
                    b.spec.id
                ));
            }
        }
        for r in recorded.iter().filter(|r| r.instance != new) {
            if r.alive {
                match instance::stop(t, host, &r.instance, app.stop_signal, *app.stop_timeout).await
                {
                    Ok(instance::Stopped::Gracefully) => say(format!(
                        "stopped {} (pid {})",
                        r.instance.version, r.instance.pid
                    )),
                    Ok(instance::Stopped::Killed) => say(format!(
                        "stopped {} (pid {}) with KILL after stop_timeout {}",
                        r.instance.version, r.instance.pid, app.stop_timeout
                    )),
                    Err(e) => say(format!("WARNING: {e:#}")),
                }
            } else {
                let _ = instance::forget(t, host, &r.instance).await;
            }
        }
        release::set_current(t, host, version.as_str())
            .await
            .map_err(|e| fail(format!("{e:#}")))?;
        Ok(Moved {
            host: host.clone(),
            previous,
        })
    }

    /// Health gate, then into the balancer, then the balancer's own health check.
    async fn admit(&self, inst: &Instance) -> Result<(), String> {
        let host = self
            .config
            .host(&inst.host)
            .ok_or_else(|| format!("unknown host {}", inst.host))?;
        let health = &self.config.app.health;
        instance::wait_healthy(self.transport.as_ref(), host, inst, health)
            .await
            .map_err(|e| format!("{} on {}: {e}", inst.version, inst.address))?;
        let spec = BackendSpec {
            id: inst.backend_id(),
            address: inst.address,
            host: inst.host.clone(),
            release: inst.version.clone(),
            weight: crate::balancer::api::default_weight(),
            health_path: health.path.clone(),
            preview: false,
        };
        self.balancer
            .add(&spec)
            .await
            .map_err(|e| format!("adding {} to the balancer: {e:#}", spec.id))?;
        self.balancer
            .wait_healthy(&spec.id, *health.deadline)
            .await
            .map_err(|e| format!("the balancer does not see {} healthy: {e:#}", spec.id))?;
        Ok(())
    }

    /// Takes a failed new instance out of the balancer (if it got there) and stops it.
    async fn discard(&self, host: &Host, inst: &Instance) {
        let _ = self.balancer.remove(&inst.backend_id()).await;
        let app = &self.config.app;
        if let Err(e) = instance::stop(
            self.transport.as_ref(),
            host,
            inst,
            app.stop_signal,
            *app.stop_timeout,
        )
        .await
        {
            self.progress.say(&format!(
                "{}: WARNING: could not stop failed {}: {e:#}",
                host.name, inst.version
            ));
        }
    }

    /// Drain, wait, remove.
    async fn retire_backend(&self, id: &str) -> anyhow::Result<()> {
        self.balancer.drain(id).await?;
        let report = self
            .balancer
            .wait_drained(id, *self.config.app.drain_timeout)
            .await?;
        if !report.drained {
            self.progress.say(&format!(
                "{id}: drain_timeout reached after {} ms; {} request(s) closed",
                report.waited_ms, report.closed_at_deadline
            ));
        }
        self.balancer.remove(id).await
    }

    /// Returns every moved host to the release it had, in parallel. Returns the hosts that
    /// could not be returned.
    async fn undo(&self, moved: &[Moved]) -> Vec<HostFailure> {
        if moved.is_empty() {
            self.progress
                .say("rollback: no host had moved; the fleet is unchanged");
            return Vec::new();
        }
        self.progress.say(&format!(
            "rollback: returning {} host(s) to their previous release",
            moved.len()
        ));
        let results = join_all(moved.iter().map(|m| async move {
            match &m.previous {
                Some(prev) => {
                    let prev = Name::parse(prev).map_err(|e| HostFailure {
                        host: m.host.name.to_string(),
                        reason: e,
                    })?;
                    self.switch_host("rollback", &m.host, None, &prev)
                        .await
                        .map(|_| ())
                }
                None => self.clear_host(&m.host).await,
            }
        }))
        .await;
        results.into_iter().filter_map(Result::err).collect()
    }

    /// Undo of a first deploy: the host served nothing before, so it serves nothing again.
    async fn clear_host(&self, host: &Host) -> Result<(), HostFailure> {
        let fail = |e: anyhow::Error| HostFailure {
            host: host.name.to_string(),
            reason: format!("{e:#}"),
        };
        let backends = self.balancer.backends().await.map_err(fail)?;
        for b in backends
            .iter()
            .filter(|b| b.spec.host == host.name.as_str())
        {
            self.retire_backend(&b.spec.id).await.map_err(fail)?;
        }
        let app = &self.config.app;
        for r in instance::list(self.transport.as_ref(), host)
            .await
            .map_err(fail)?
        {
            instance::stop(
                self.transport.as_ref(),
                host,
                &r.instance,
                app.stop_signal,
                *app.stop_timeout,
            )
            .await
            .map_err(fail)?;
        }
        Ok(())
    }

    /// Keeps the newest `keep` releases on each moved host, never the live or previous one.
    async fn prune_all(&self, moved: &[Moved]) {
        let keep = self.config.release.keep.0;
        join_all(moved.iter().map(|m| async move {
            let mut protect = Vec::new();
            if let Ok(Some(cur)) = release::current(self.transport.as_ref(), &m.host).await {
                protect.push(cur);
            }
            protect.extend(m.previous.clone());
            if let Ok(gone) = release::prune(self.transport.as_ref(), &m.host, keep, &protect).await
            {
                if !gone.is_empty() {
                    self.progress.say(&format!(
                        "{}: removed old release(s) {}",
                        m.host.name,
                        gone.join(", ")
                    ));
                }
            }
        }))
        .await;
    }
}

/// The release most hosts point `current` at.
pub fn most_common_release(views: &[HostView]) -> Option<String> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for v in views {
        if let Some(c) = &v.current {
            *counts.entry(c).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(v, _)| v.to_string())
}

/// Requests served and failed between two balancer snapshots.
pub fn traffic_between(before: &Stats, after: &Stats) -> (u64, u64, BTreeMap<String, u64>) {
    let served = after.total.requests.saturating_sub(before.total.requests)
        + after.unrouted.saturating_sub(before.unrouted);
    let failed = after
        .total
        .status_5xx
        .saturating_sub(before.total.status_5xx)
        + after.unrouted.saturating_sub(before.unrouted);
    let by_release = after
        .releases
        .iter()
        .map(|(r, c)| {
            let was = before.releases.get(r).map_or(0, |b| b.requests);
            (r.clone(), c.requests.saturating_sub(was))
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    (served, failed, by_release)
}

/// Where the host's layout is, for messages.
pub fn describe_host(host: &Host) -> String {
    format!(
        "{} ({}, {})",
        host.name,
        host.address,
        Layout::of(host).root.display()
    )
}

/// Worst-case time one host takes to switch, from the config's deadlines.
pub fn worst_case_per_host(config: &Config) -> Duration {
    let h = &config.app.health;
    *h.deadline * 2 + *config.app.drain_timeout + *config.app.stop_timeout
}
