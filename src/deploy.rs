//! Carrying out a rolling deployment: stage everywhere, then move hosts batch by batch, each
//! host side by side (new instance beside the old one, so capacity never dips), and undo every
//! moved host when a batch exceeds its failure budget.
//!
//! One host changes release like this ([`Deployer::switch_host`]):
//! 1. start the new instance on a free port next to the old one;
//! 2. wait until it passes its own health check (`healthy_threshold` in a row);
//! 3. add it to the balancer and wait until the balancer itself sees it healthy (one passing
//!    check of its own: the gate has just passed) ([`Deployer::admit_new`] ends here);
//! 4. drain the old backend (no new requests; in-flight ones finish, up to `drain_timeout`);
//! 5. remove the old backend; traffic has moved;
//! 6. settle the host in one round trip ([`crate::settle`]): stop the old instance (stop
//!    signal, `stop_timeout`, then KILL), point `current` at the new release, prune releases.
//!
//! then the host's `after_switch` hooks run.
//!
//! A rolling deploy runs steps 4-6 in the background, released once the next batch's instances
//! have started (so they do not compete with those starts for the cores, only with the health
//! gate's idle wait): the new instance already serves, so waiting for the old one to drain and
//! exit would only make every batch longer (capacity only grows meanwhile). With `after_switch` hooks or `after_batch`
//! checks, steps 4-5 stay in the batch, since those must see the old backend gone. Every
//! background step is awaited before the deployment undoes anything or ends.
//!
//! A failure in steps 1-3 stops and removes only the new instance: the old one never left the
//! balancer, so a failed host keeps serving the old release. Undoing a moved host is the same
//! dance towards the old release, which stays staged on the host.
//!
//! `app.mode = "in-place"` (rolling only), for apps that listen on a fixed port and so cannot
//! run twice on a host: before step 1 the host's backends are drained and removed and its
//! instances stopped ([`Deployer::empty_host`]), then the new instance starts on `app.port`;
//! the host's capacity is gone until step 3. A new instance that fails there leaves the host
//! empty, so the release it served is started again at once, the same way, before the failure
//! counts against the budget (once: a host that stays empty ends the deployment `failed`). An
//! undo returns hosts in waves the size of the plan's largest batch, for the same reason.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::balancer::{BackendSpec, BackendState, Balancer, Counters, Stats};
use crate::batch;
use crate::config::{Config, HookPoint, Host, Name, OnFailure};
use crate::control::Boundary;
use crate::fleet::{self, HostView};
use crate::instance::{self, Instance};
use crate::journal::{DeploymentRow, Journal, now_ms};
use crate::progress::{Phase, Progress};
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
    /// Stopped with the fleet as it was: a batch exceeded its failure budget and
    /// `on_failure = "halt"` left it there, or a step before any traffic change failed (a
    /// `before_deploy` or `after_stage` hook, the build, staging).
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

    /// The outcome as people read it ("rolled back"); [`Outcome::label`] stays the value of
    /// the JSON and the journal, which scripts match.
    pub fn words(self) -> String {
        outcome_words(self.label())
    }

    /// The process exit code: 0 deployed, 1 rolled back or stopped cleanly.
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Succeeded => 0,
            Outcome::RolledBack | Outcome::Halted | Outcome::Failed => 1,
        }
    }
}

/// A recorded outcome (`rolled_back`, as the journal and the JSON hold it) as human text writes
/// it: `rolled back`.
pub fn outcome_words(label: &str) -> String {
    label.replace('_', " ")
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
    /// The deployment's id in the journal (`cutover show ID`).
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
    /// Of `moved_hosts`, those that already served `to` when the deployment began: nothing
    /// was done there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unchanged_hosts: Vec<String>,
    /// Of `moved_hosts`, those whose running instance of `to` had no server in the balancer
    /// (an HAProxy reload or restart drops the servers cutover added) and went back in without
    /// a restart.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub readmitted_hosts: Vec<String>,
    pub failed_hosts: Vec<HostFailure>,
    /// Hosts that the rollback could not return (only with outcome `failed`).
    pub stuck_hosts: Vec<HostFailure>,
    /// Requests the balancer answered while the deployment ran.
    pub served: u64,
    /// Of those, requests that failed (5xx from an instance, or no backend could answer).
    pub failed_requests: u64,
    /// Requests served per release while the deployment ran.
    pub served_by_release: BTreeMap<String, u64>,
    /// When the counts above are not the whole deployment's, why (and what they cover).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counts: Option<String>,
    /// What the strategy wants remembered (switch times, analysis verdicts, abort reasons).
    #[serde(default)]
    pub notes: Vec<String>,
}

/// What to deploy.
#[derive(Debug, Clone)]
pub struct Request {
    pub version: Name,
    /// `"deploy"` or `"rollback"`: recorded in the journal.
    pub kind: &'static str,
    /// An interrupted deployment to continue (same id, same per-host starting point).
    pub resume: Option<DeploymentRow>,
}

impl Request {
    pub fn deploy(version: Name) -> Request {
        Request {
            version,
            kind: "deploy",
            resume: None,
        }
    }

    /// `cutover readmit`: a deploy of the release the hosts run, recorded as kind `readmit`.
    /// Like a rollback it goes to what the hosts hold (no branch is asked about, no rebuilt
    /// release directory or moved tag refuses it): it changes no release, it only puts running
    /// instances back into the balancer.
    pub fn readmit(version: Name) -> Request {
        Request {
            version,
            kind: "readmit",
            resume: None,
        }
    }

    /// The run goes to what the hosts hold: a rollback, or a readmit.
    fn to_what_hosts_hold(&self) -> bool {
        matches!(self.kind, "rollback" | "readmit")
    }
}

/// Runs deployments against one fleet. Cheap to clone (shared handles), so background work of
/// a deployment can own one.
#[derive(Clone)]
pub struct Deployer {
    pub config: Arc<Config>,
    pub transport: Arc<dyn Transport>,
    pub balancer: Arc<dyn Balancer>,
    pub journal: Arc<Journal>,
    pub progress: Progress,
    /// At most `forks` host operations at once.
    forks: Arc<Semaphore>,
    /// Free ports being looked up ahead of a host's start (see [`Deployer::prefetch_ports`]).
    ports: Arc<std::sync::Mutex<BTreeMap<String, PortLookup>>>,
    /// Hosts a failure in place left serving nothing ([`Deployer::restore_in_place`]).
    stranded: Arc<std::sync::Mutex<Vec<HostFailure>>>,
    /// Hosts found already serving the target release, where this deployment did nothing.
    already: Arc<std::sync::Mutex<Vec<String>>>,
    /// Hosts whose running instance of the target release had no server in the balancer and
    /// was admitted again, not restarted.
    readmitted: Arc<std::sync::Mutex<Vec<String>>>,
    /// Hosts whose live instance (of another release) had no server and went back in before
    /// anything changed ([`Deployer::put_back_lost`]).
    put_back: Arc<std::sync::Mutex<Vec<String>>>,
    /// New instances whose start command exited and left the app in the background, as
    /// `host (version@address)`, for the report (see [`instance::Recorded::background`]).
    backgrounded: Arc<std::sync::Mutex<Vec<String>>>,
    /// Requests and upgraded connections (WebSocket) the drain deadline closed during this
    /// deployment: the report says so, since a tunnel's client saw its connection end.
    closed_at_deadline: Arc<std::sync::atomic::AtomicU64>,
    /// The deploy lock on the fleet, when the command holds the journal's: taken in the first
    /// fleet read (see [`crate::fleet_lock`]) before anything changes.
    pub fleet_lock: Option<Arc<crate::fleet_lock::FleetLock>>,
}

type PortLookup = tokio::task::JoinHandle<anyhow::Result<u16>>;

/// One deployment being carried out: its id and where every host started from.
#[derive(Debug, Clone)]
pub struct Run {
    pub id: String,
    /// Release each host served before the deployment.
    pub previous: BTreeMap<String, Option<String>>,
    /// This process took over an interrupted deployment (`--resume`, or `rollback` of it):
    /// the balancer's counters before the interruption were never read, so the report's
    /// request counts cover only what this process saw.
    pub taken_over: bool,
    /// The run returns hosts to a release they held (`cutover rollback`, undoing an interrupted
    /// deployment, or `cutover readmit`): an operator's `rollback` does not stop it, only
    /// `abort` does; the release is taken as the hosts hold it (see `rebuilt_in_place`).
    pub rollback: bool,
}

impl Deployer {
    pub fn new(
        config: Arc<Config>,
        transport: Arc<dyn Transport>,
        balancer: Arc<dyn Balancer>,
        journal: Arc<Journal>,
        progress: Progress,
    ) -> Deployer {
        let forks = Arc::new(Semaphore::new(config.forks.max(1)));
        Deployer {
            config,
            transport,
            balancer,
            journal,
            progress,
            forks,
            ports: Arc::default(),
            stranded: Default::default(),
            already: Default::default(),
            readmitted: Default::default(),
            put_back: Default::default(),
            backgrounded: Default::default(),
            closed_at_deadline: Default::default(),
            fleet_lock: None,
        }
    }

    /// Takes the fleet lock, if this deployer has one to take and does not hold it yet, in a
    /// round trip of its own: for the commands that change hosts before they read the fleet
    /// (undoing an interrupted deployment) or read it to decide what to do (`readmit`).
    pub async fn hold_fleet_lock(&self) -> anyhow::Result<()> {
        match &self.fleet_lock {
            Some(lock) => lock.take(self.transport.as_ref()).await,
            None => Ok(()),
        }
    }

    /// Starts looking up a free port on each of `hosts`, for their coming start. Over SSH the
    /// lookup reads the host's TCP table (/proc/net/tcp), which the kernel builds in full: ~10 ms
    /// on a host with a few thousand connections. A rolling deploy looks up the next batch's
    /// ports while the current batch waits out its health interval, so no batch waits for it.
    /// A port found a health interval ago is as good as one found now: either can be taken in
    /// between, and the health gate catches an instance that could not bind.
    pub fn prefetch_ports(&self, hosts: &[Host]) {
        if self.in_place().is_some() {
            return;
        }
        let mut ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        for host in hosts {
            let (transport, h) = (self.transport.clone(), host.clone());
            ports.insert(
                host.name.to_string(),
                tokio::spawn(async move { transport.free_port(&h).await }),
            );
        }
    }

    /// In-place mode's fixed port (`app.port`), or `None` side by side.
    fn in_place(&self) -> Option<u16> {
        let app = &self.config.app;
        (app.mode == crate::config::Mode::InPlace)
            .then_some(app.port)
            .flatten()
    }

    /// The port for a new instance: in place, the app's fixed one; else a free port of the
    /// host, the one looked up ahead or a fresh lookup.
    async fn free_port(&self, host: &Host) -> anyhow::Result<u16> {
        if let Some(port) = self.in_place() {
            return Ok(port);
        }
        let ahead = self
            .ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(host.name.as_str());
        port_after_lookup(ahead, self.transport.as_ref(), host).await
    }

    /// Opens every host's session in the background (at most `forks` at once), so that reading
    /// the fleet finds them ready: the caller takes the deploy lock meanwhile. A session costs
    /// a shell on the host (over SSH also a channel and a login shell), started one after
    /// another when the fleet was first read.
    pub fn warm(&self) {
        for host in self.config.hosts.clone() {
            let transport = self.transport.clone();
            let forks = self.forks.clone();
            tokio::spawn(async move {
                let _permit = forks.acquire_owned().await;
                transport.warm(&host).await;
            });
        }
    }

    /// Deploys `req.version` to every host with the configured strategy.
    pub async fn run(&self, req: &Request) -> anyhow::Result<Report> {
        let started = Instant::now();
        // A deployment starts with no stranded hosts (see `stranded_into`).
        self.take_stranded();
        self.take_already();
        self.take_readmitted();
        self.take_put_back();
        self.take_backgrounded();
        self.take_closed_at_deadline();
        let config = &self.config;
        let pinned = self.pin_branch(req).await?;
        let version = pinned.as_ref().unwrap_or(&req.version);
        // A path release's copies say what they were packed from: see `rebuilt_in_place`.
        let deploying = config.release.git.is_none().then_some(version.as_str());
        // The fleet lock is taken in this read (the first host's round trip carries it). A
        // wait for another holder means the fleet may have moved since: read it again.
        let mut before = loop {
            let take = self.fleet_lock.as_ref().and_then(|l| l.folded_script());
            let (before, reply, peeks) = fleet::observe_locking(
                config,
                &self.transport,
                &self.balancer,
                deploying,
                take.as_ref(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("cannot read the fleet before deploying: {e:#}"))?;
            match (&self.fleet_lock, reply) {
                (Some(lock), Some(reply)) => {
                    match lock.settle(self.transport.as_ref(), reply).await {
                        Ok(true) => continue,
                        Ok(false) => {
                            // Another machine that could not reach our lock's host holds it
                            // on another: it was there first.
                            if let Some(held) = lock.held_elsewhere(&peeks) {
                                lock.yield_to(self.transport.as_ref(), held).await?;
                                continue;
                            }
                        }
                        // No host could be read either: none will change, and the deployment
                        // fails as it would have without the lock, saying why for each host.
                        Err(e)
                            if e.is::<crate::fleet_lock::NoHostAnswered>()
                                && before.iter().all(|v| v.error.is_some()) =>
                        {
                            self.progress.say(&format!("{e:#}"));
                        }
                        Err(e) => return Err(e),
                    }
                }
                // Not read (an empty fleet): taken on its own.
                (Some(_), None) => self.hold_fleet_lock().await?,
                (None, _) => {}
            }
            break before;
        };
        // A host whose key changed may be someone else's machine: no failure budget covers
        // that, an operator must look first. (A way back goes on without that host.)
        if req.kind == "deploy" {
            if let Some((host, e)) = before.iter().find_map(|v| {
                v.error
                    .as_deref()
                    .filter(|e| e.contains(crate::transport::HOST_KEY_CHANGED))
                    .map(|e| (v.host.name.as_str(), e))
            }) {
                anyhow::bail!(
                    "host {host}'s SSH host key changed: the deploy stops before any host changes, whatever max_fail_percentage allows: {e}"
                );
            }
        }
        let plan = batch::batches(&config.strategy.batch, &config.hosts);
        // A readmit restarts nothing: its one batch leaves no host serving less than before.
        if self.in_place().is_some()
            && req.kind != "readmit"
            && plan.iter().any(|b| b.len() == config.hosts.len())
        {
            self.progress.say(&format!(
                "WARNING: app.mode = \"in-place\" and a batch of all {} host(s): nothing serves while they restart (use a smaller batch)",
                config.hosts.len()
            ));
        }
        if config.strategy.kind == crate::config::StrategyKind::Rolling {
            // The first batch's ports, looked up while the deployment is recorded and staged.
            let reachable: Vec<Host> = plan
                .first()
                .into_iter()
                .flatten()
                .filter(|h| {
                    before
                        .iter()
                        .any(|v| v.host.name == h.name && v.error.is_none())
                })
                .cloned()
                .collect();
            self.prefetch_ports(&reachable);
        }
        let stats_before = self.balancer.stats().await?;
        let run = match &req.resume {
            Some(row) => {
                self.journal.event(Some(&row.id), "resumed")?;
                Run {
                    id: row.id.clone(),
                    previous: row.previous.clone(),
                    taken_over: true,
                    rollback: req.to_what_hosts_hold(),
                }
            }
            None => {
                let run = Run {
                    id: new_id(),
                    // Only hosts that could be read: an unreachable host's release is unknown,
                    // and a rollback must leave it as it is, not empty it.
                    previous: before
                        .iter()
                        .filter(|v| v.error.is_none())
                        .map(|v| (v.host.name.to_string(), v.current.clone()))
                        .collect(),
                    taken_over: false,
                    rollback: req.to_what_hosts_hold(),
                };
                self.journal.begin(&DeploymentRow {
                    id: run.id.clone(),
                    app: config.app.name.to_string(),
                    kind: req.kind.to_string(),
                    strategy: strategy_name(config).to_string(),
                    from: most_common(run.previous.values().flatten()),
                    to: version.to_string(),
                    who: crate::journal::LockHolder::me("").user,
                    started_ms: now_ms(),
                    ended_ms: None,
                    outcome: None,
                    previous: run.previous.clone(),
                    report: None,
                    status: None,
                    damaged: None,
                })?;
                run
            }
        };
        self.journal.checkpoint_in_background();
        let from = most_common(run.previous.values().flatten());
        let unread = before.iter().filter(|v| v.error.is_some()).count();
        // "(nothing)" would read as a first deploy when the hosts only could not be asked.
        let from_label = match &from {
            Some(v) => v.clone(),
            None if unread > 0 && req.resume.is_none() => {
                format!("(not known: {unread} host(s) could not be read)")
            }
            None => "(nothing)".to_string(),
        };
        self.progress.say(&format!(
            "{}{} {} of {} to {} host(s): {} -> {} (deployment {})",
            if req.resume.is_some() {
                "resuming "
            } else {
                ""
            },
            req.kind,
            config.app.name,
            version,
            config.hosts.len(),
            from_label,
            version,
            run.id
        ));
        if req.resume.is_none()
            && req.kind != "readmit"
            && self.put_back_lost(&run, version, &before).await
        {
            // What follows (a blue-green's blue set, a canary's stable side) sees them back.
            before = fleet::observe_for(config, &self.transport, &self.balancer, deploying)
                .await
                .map_err(|e| anyhow::anyhow!("cannot read the fleet before deploying: {e:#}"))?;
        }

        let reachable: Vec<Host> = before
            .iter()
            .filter(|v| v.error.is_none())
            .map(|v| v.host.clone())
            .collect();
        // Hooks before anything changes, staging everywhere, hooks after staging: a failure in
        // any of them stops before a single host changes traffic.
        let prepared: Result<_, (String, &str)> = async {
            self.hook(
                HookPoint::BeforeDeploy,
                version,
                from.as_deref(),
                &reachable,
            )
            .await
            .map_err(|e| (e, "nothing was changed"))?;
            let staged = self.stage_all(&run, version, &before).await;
            let staged_ok: Vec<Host> = config
                .hosts
                .iter()
                .filter(|h| matches!(staged.get(h.name.as_str()), Some(Ok(_))))
                .cloned()
                .collect();
            if staged_ok.is_empty() {
                // No host could take the release: every batch would fail and "roll back"
                // hosts that never moved.
                let errors: Vec<(&Host, &String)> = config
                    .hosts
                    .iter()
                    .filter_map(|h| match staged.get(h.name.as_str()) {
                        Some(Err(e)) => Some((h, e)),
                        _ => None,
                    })
                    .collect();
                // A failed build (an unknown commit, a failing build command) or a moved tag
                // is the release's problem, not a host's: said as itself, not as web1's.
                let fatal = errors
                    .iter()
                    .find_map(|(_, e)| e.strip_prefix(release::STOPPED_BY_FATAL));
                let why = match (fatal, errors.first()) {
                    (Some(why), _) => why.to_string(),
                    (None, Some((_, e))) if errors.iter().all(|(_, other)| other == e) => {
                        format!("staging {version} failed on every host: {e}")
                    }
                    (None, Some((h, e))) => {
                        format!("staging {version} failed on every host ({}: {e})", h.name)
                    }
                    (None, None) => {
                        format!("staging {version} failed on every host (no host was reachable)")
                    }
                };
                return Err((why, "no host changes traffic"));
            }
            self.hook(HookPoint::AfterStage, version, from.as_deref(), &staged_ok)
                .await
                .map_err(|e| (e, "no host changes traffic"))?;
            Ok(staged)
        }
        .await;
        let staged = match prepared {
            Ok(staged) => staged,
            Err((e, _)) if req.resume.is_some() => {
                // The interrupted run may have moved hosts already: "halted, nothing changed"
                // would close it over a mixed fleet. It stays unfinished, to resume or undo.
                anyhow::bail!(
                    "{e}: deployment {} stays interrupted (hosts it moved before it stopped still serve {version}): fix that and run `cutover deploy --resume` again, or `cutover rollback` to return every host to where it was",
                    run.id
                );
            }
            Err((e, consequence)) => {
                // An error that ends with a command's output lines: the consequence on a line
                // of its own, not run on from the command's last line.
                let sep = if e.contains('\n') { "\n-> " } else { ": " };
                self.progress.say(&format!("{e}{sep}{consequence}"));
                let failed = vec![HostFailure {
                    host: "fleet".into(),
                    reason: e,
                }];
                // Halted, not rolled back: nothing moved, so nothing went back, and the
                // `on_rollback` hooks (a `migrate down`, a notification) must not run.
                return self
                    .finish(
                        &run,
                        req.kind,
                        from,
                        version.as_str(),
                        Outcome::Halted,
                        started,
                        &stats_before,
                        Vec::new(),
                        Vec::new(),
                        failed,
                        Vec::new(),
                        Vec::new(),
                    )
                    .await;
            }
        };
        match config.strategy.kind {
            // A rollback goes back side by side in batches whatever the strategy: the release it
            // returns to served before, so it needs no preview, steps or analysis (and must not
            // wait for a `cutover promote`).
            _ if req.kind == "rollback" => {}
            crate::config::StrategyKind::Rolling => {}
            crate::config::StrategyKind::BlueGreen if from.as_deref() == Some(version.as_str()) => {
                // A green set of the live release would restart every host for nothing.
                self.progress.say(&format!(
                    "{version} is already the live release: no green set to switch to; hosts that serve it stay as they are, any other moves side by side"
                ));
            }
            crate::config::StrategyKind::BlueGreen => {
                return self
                    .blue_green(&run, version, &staged, started, &stats_before)
                    .await;
            }
            crate::config::StrategyKind::Canary if from.is_none() => {
                // Nothing is live yet: there is no stable release to compare a canary with.
                self.progress.say("first deploy: no stable release to compare a canary with; rolling it out directly");
            }
            crate::config::StrategyKind::Canary if from.as_deref() == Some(version.as_str()) => {
                // A canary of the live release would be compared with itself.
                self.progress.say(&format!(
                    "{version} is already the live release: no stable release to compare a canary with; rolling it out directly"
                ));
            }
            crate::config::StrategyKind::Canary => {
                return self
                    .canary(&run, version, &staged, started, &stats_before)
                    .await;
            }
        }
        // Hosts the release did not reach fail in their batch whatever the batches before do:
        // when they alone spend the budget, those batches would move only to be undone, under
        // live traffic. A resumed deployment may have moved hosts already (its batches decide
        // as before), and a rollback returns every host it can.
        if req.resume.is_none() && req.kind != "rollback" {
            let names: Vec<Vec<&str>> = plan
                .iter()
                .map(|b| b.iter().map(|h| h.name.as_str()).collect())
                .collect();
            let unstaged = |h: &str| matches!(staged.get(h), Some(Err(_)));
            if let Some(why) = batch::first_batch_over_budget(&config.strategy, &names, &unstaged) {
                return self
                    .stop_before_moving(
                        &run,
                        req.kind,
                        from,
                        version,
                        started,
                        &stats_before,
                        &plan,
                        &staged,
                        why,
                    )
                    .await;
            }
        }
        let mut moved: Vec<Host> = Vec::new();
        let mut failed: Vec<HostFailure> = Vec::new();
        let mut outcome = Outcome::Succeeded;
        let mut stuck = Vec::new();
        let mut notes = Vec::new();
        let mut settling = Settling::default();
        // Step 4 (drain and remove the old backends) normally runs in the background with the
        // settle: the next batch need not wait for old instances to drain, since the new ones
        // already serve. An `after_switch` hook or an `after_batch` check must see the old
        // backends gone, so with either the batch retires before it ends.
        let retire_in_batch = config.hooks.iter().any(|h| h.at == HookPoint::AfterSwitch)
            || config
                .verify
                .iter()
                .any(|v| v.at.contains(&crate::config::VerifyPoint::AfterBatch));

        let rolling_back = req.kind == "rollback";
        self.progress.plan(&plan_names(&plan));
        for (i, hosts) in plan.iter().enumerate() {
            let label = format!("batch {}/{}", i + 1, plan.len());
            let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
            self.progress.say(&format!("{label}: {}", names.join(", ")));
            self.status(
                &run,
                serde_json::json!({"strategy": "rolling", "phase": "moving hosts", "batch": label}),
            );
            // Every host of the batch starts its instance, and the app answers its first
            // check, before the previous batch's background work (drain, stop, `current`,
            // prune) may use the cores: it competes with the health gate's idle wait instead of
            // the new instances' start.
            let starts = join_all(hosts.iter().map(|h| {
                let staged = staged.get(h.name.as_str()).cloned();
                let run = &run;
                let label = &label;
                let known = before
                    .iter()
                    .find(|v| v.host.name == h.name)
                    .map(|v| v.instances.as_slice());
                async move {
                    match staged {
                        Some(Err(reason)) => Err(HostFailure {
                            host: h.name.to_string(),
                            reason,
                        }),
                        _ => self.start_new(run, label, h, version, known).await,
                    }
                }
            }))
            .await;
            let (answers, answered): (Vec<_>, Vec<_>) = hosts
                .iter()
                .map(|_| tokio::sync::oneshot::channel())
                .unzip();
            settling.release_when(answered);
            if let Some(next) = plan.get(i + 1) {
                self.prefetch_ports(next);
            }
            let results = join_all(hosts.iter().zip(starts).zip(answers).map(
                |((h, started), answered)| {
                    let label = label.clone();
                    let run = &run;
                    async move {
                        let mut m = self
                            .admit_started(run, &label, h, version, started?, Some(answered))
                            .await?;
                        if !retire_in_batch {
                            let later = Retire::Later(std::mem::take(&mut m.backends));
                            return Ok((h.clone(), m, label, Ok(()), later));
                        }
                        let unretired = self
                            .retire_backends(run, &label, h, &m.instance, Some(&m.backends))
                            .await;
                        let hooked = self.after_switch_hook(run, h, version).await;
                        Ok::<_, HostFailure>((h.clone(), m, label, hooked, Retire::Done(unretired)))
                    }
                },
            ))
            .await;
            let mut batch_failures = 0;
            let mut unmoved = Vec::new();
            for r in results {
                match r {
                    Ok((h, m, label, hooked, retire)) => {
                        settling.spawn(self, &run, label.clone(), &h, m.instance, retire);
                        // A failed after_switch hook fails the host, which serves the new
                        // release: it counts as moved, so an undo returns it too.
                        moved.push(h);
                        if let Err(f) = hooked {
                            self.report_failed_host(&run, &label, &f)?;
                            batch_failures += 1;
                            failed.push(f);
                        }
                    }
                    Err(f) => unmoved.push(f),
                }
            }
            // A host an operator's stop cut short is no failure: the stop is read at this
            // batch's boundary below.
            let (unmoved, _) = self.operator_stopped(&run, unmoved)?;
            for f in unmoved {
                self.report_failed_host(&run, &label, &f)?;
                batch_failures += 1;
                failed.push(f);
            }
            let target = crate::verify::Target {
                url: format!("http://{}", config.balancer.listen),
                version: version.as_str(),
                preview: false,
            };
            let next = plan
                .get(i + 1)
                .map(|_| format!("batch {}/{}", i + 2, plan.len()));
            let verified = match self
                .verify_unless_stopped(
                    &run,
                    crate::config::VerifyPoint::AfterBatch,
                    &target,
                    !rolling_back,
                    serde_json::json!({
                        "strategy": "rolling", "phase": "verifying (after_batch)", "batch": label,
                    }),
                )
                .await
            {
                Some(r) => r,
                // The operator's stop decides before the failure budget: read this boundary
                // now (the last batch's too).
                None => {
                    match self
                        .at_boundary(
                            &run,
                            "rolling",
                            rolling_back,
                            &label,
                            next.as_deref(),
                            || settling.release(),
                        )
                        .await?
                    {
                        Boundary::Stop(why) => {
                            (outcome, stuck) = self
                                .stop_rollout(
                                    &run,
                                    req.kind,
                                    why,
                                    &mut settling,
                                    &mut failed,
                                    &moved,
                                    &mut notes,
                                )
                                .await?;
                            break;
                        }
                        Boundary::Next => Err(format!("{label}: {VERIFY_STOPPED_UNCLAIMED}")),
                    }
                }
            };
            let verify_failed = verified.is_err();
            if let Err(e) = verified {
                self.progress.say(&format!("{label}: {e}"));
                self.journal.event(Some(&run.id), &e)?;
                failed.push(HostFailure {
                    host: "fleet".into(),
                    reason: e,
                });
            }
            let over = if verify_failed {
                Some(format!("{label}: the after_batch check failed"))
            } else {
                batch::over_budget(
                    &config.strategy,
                    &label,
                    batch_failures,
                    hosts.len(),
                    failed.len(),
                )
            };
            if let Some(why) = over {
                self.progress.say(&why);
                self.journal.event(Some(&run.id), &why)?;
                if rolling_back {
                    // Going "back" from a rollback is forward, to the release it is leaving:
                    // the hosts already returned stay returned, and a person decides the rest.
                    failed.extend(settling.wait().await);
                    self.progress.say(
                        "the rollback stops here: the hosts it returned stay returned; fix the failed host(s), then run `cutover rollback` again or deploy a release",
                    );
                    outcome = Outcome::Halted;
                    break;
                }
                if config.strategy.on_failure == OnFailure::Rollback {
                    self.going_back(&run);
                }
                failed.extend(settling.wait().await);
                (outcome, stuck) = self.budget_spent(&run, &moved).await;
                break;
            }
            // The boundary after the last batch is read below, once its settles have ended.
            let Some(next) = next else {
                continue;
            };
            if let Boundary::Stop(why) = self
                .at_boundary(&run, "rolling", rolling_back, &label, Some(&next), || {
                    settling.release()
                })
                .await?
            {
                (outcome, stuck) = self
                    .stop_rollout(
                        &run,
                        req.kind,
                        why,
                        &mut settling,
                        &mut failed,
                        &moved,
                        &mut notes,
                    )
                    .await?;
                break;
            }
        }

        failed.extend(settling.wait().await);
        if outcome == Outcome::Succeeded {
            let last = plan
                .len()
                .checked_sub(1)
                .map(|i| format!("batch {}/{}", i + 1, plan.len()));
            if let Boundary::Stop(why) = self
                .at_boundary(
                    &run,
                    "rolling",
                    rolling_back,
                    last.as_deref().unwrap_or("the deploy"),
                    None,
                    || (),
                )
                .await?
            {
                (outcome, stuck) = self
                    .operator_stop(&run, req.kind, why, &moved, &mut notes)
                    .await?;
            }
        }
        if outcome == Outcome::Succeeded {
            let target = crate::verify::Target {
                url: format!("http://{}", config.balancer.listen),
                version: version.as_str(),
                preview: false,
            };
            // Stopped by an operator: the stop is acted on here, or, no longer queued, the
            // verification did not pass.
            let verified = match self
                .verify_unless_stopped(
                    &run,
                    crate::config::VerifyPoint::AfterDeploy,
                    &target,
                    !rolling_back,
                    serde_json::json!({"strategy": "rolling", "phase": "verifying (after_deploy)"}),
                )
                .await
            {
                Some(r) => r,
                None => {
                    match self.after_last(&run, "the after_deploy verification", rolling_back)? {
                        Boundary::Stop(why) => {
                            (outcome, stuck) = self
                                .operator_stop(&run, req.kind, why, &moved, &mut notes)
                                .await?;
                            Ok(())
                        }
                        Boundary::Next => Err(format!("after_deploy: {VERIFY_STOPPED_UNCLAIMED}")),
                    }
                }
            };
            if let Err(e) = verified {
                self.progress
                    .say(&format!("{e}: returning every moved host"));
                self.journal.event(Some(&run.id), &e)?;
                failed.push(HostFailure {
                    host: "fleet".into(),
                    reason: e,
                });
                (outcome, stuck) = self.roll_back(&run, &moved).await;
            }
        }
        self.stranded_into(&mut stuck, &mut outcome);
        let report = self
            .finish(
                &run,
                req.kind,
                from,
                version.as_str(),
                outcome,
                started,
                &stats_before,
                plan_names(&plan),
                moved,
                failed,
                stuck,
                notes,
            )
            .await?;
        Ok(report)
    }

    /// With a git source, the commit a branch points at now, as the version to deploy (see
    /// [`crate::source::branch_commit`]); `None` to deploy the name as given. When the
    /// repository cannot be asked, an error, unless the name is a full commit id.
    async fn pin_branch(&self, req: &Request) -> anyhow::Result<Option<Name>> {
        let Some(url) = self.config.release.git.as_deref() else {
            return Ok(None);
        };
        let shown = crate::source::redact_url(url);
        // A resumed deployment already names its commit; a rollback to a release that served
        // before returns to it, whatever its name: resolving a branch would ship new code. A
        // rollback to a name never deployed is a deploy of it, resolved the same way.
        let deployed_before = || -> anyhow::Result<bool> {
            let known = self.journal.known_releases(self.config.app.name.as_str())?;
            Ok(known.iter().any(|v| v == req.version.as_str()))
        };
        // A readmit names the release the hosts run.
        if req.resume.is_some()
            || req.kind == "readmit"
            || (req.kind == "rollback" && deployed_before()?)
        {
            return Ok(None);
        }
        // `HEAD` and the like are refused as themselves, not as a repository that did not
        // answer.
        crate::source::fixed_ref(&req.version)?;
        self.progress
            .say(&format!("asking {shown} which commit {} is", req.version));
        match crate::source::branch_commit(url, &req.version, self.config.ssh.command_timeout).await
        {
            Ok(Some(sha)) => {
                let pinned = Name::parse(&sha).map_err(|e| {
                    anyhow::anyhow!("branch {} points at {sha:?}: {e}", req.version)
                })?;
                self.progress.say(&format!(
                    "{} is a branch, now at {sha}: deploying that commit as version {sha} (a staged release never changes; deploy the branch again to take newer commits)",
                    req.version
                ));
                Ok(Some(pinned))
            }
            Ok(None) => Ok(None),
            Err(e) if e.is::<crate::source::NoSuchRef>() => Err(e),
            // A full commit id cannot move: deploying it as named is safe.
            Err(_) if is_full_commit_id(req.version.as_str()) => Ok(None),
            // Anything else may be a branch: staged under its moving name, it would never be
            // rebuilt, and a later deploy of the branch would find the old code "already there".
            Err(e) => Err(anyhow::anyhow!(
                "{e:#}: cutover must know whether {} is a branch (a branch is deployed as its commit) before it builds; retry once {shown} answers, or deploy a full 40-character commit id",
                req.version
            )),
        }
    }

    /// Returns every host to the release it had before an interrupted deployment (hosts that
    /// had nothing are cleared), reconciling with what hosts and the balancer report.
    pub async fn restore(&self, interrupted: &DeploymentRow) -> anyhow::Result<Report> {
        let started = Instant::now();
        self.hold_fleet_lock().await?;
        // A deployment starts with no stranded hosts (see `stranded_into`).
        self.take_stranded();
        self.take_closed_at_deadline();
        let stats_before = self.balancer.stats().await?;
        let run = Run {
            id: interrupted.id.clone(),
            previous: interrupted.previous.clone(),
            taken_over: true,
            rollback: true,
        };
        self.journal.event(Some(&run.id), RESTORE_EVENT)?;
        // Its own phase, not the killed process's last one, for `cutover status` meanwhile.
        self.status(
            &run,
            serde_json::json!({
                "strategy": interrupted.strategy, "phase": "returning every host to where it was",
            }),
        );
        self.progress.say(&format!(
            "rolling back interrupted deployment {} ({} -> {}): every host returns to where it was",
            run.id,
            interrupted.from.as_deref().unwrap_or("(nothing)"),
            interrupted.to
        ));
        let mut stuck = self.return_hosts(&run, &self.config.hosts).await;
        let mut outcome = if stuck.is_empty() {
            Outcome::RolledBack
        } else {
            Outcome::Failed
        };
        self.stranded_into(&mut stuck, &mut outcome);
        let from = interrupted.from.clone();
        self.finish(
            &run,
            "deploy",
            from,
            &interrupted.to,
            outcome,
            started,
            &stats_before,
            Vec::new(),
            Vec::new(),
            Vec::new(),
            stuck,
            Vec::new(),
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn finish(
        &self,
        run: &Run,
        kind: &str,
        from: Option<String>,
        to: &str,
        outcome: Outcome,
        started: Instant,
        stats_before: &Stats,
        batches: Vec<Vec<String>>,
        moved: Vec<Host>,
        failed: Vec<HostFailure>,
        stuck: Vec<HostFailure>,
        strategy_notes: Vec<String>,
    ) -> anyhow::Result<Report> {
        let mut notes = Vec::new();
        if let Ok(v) = Name::parse(to) {
            match outcome {
                Outcome::Succeeded => {
                    if let Err(e) = self
                        .hook(HookPoint::AfterDeploy, &v, from.as_deref(), &moved)
                        .await
                    {
                        self.progress.say(&format!("WARNING: {e}"));
                        notes.push(format!("after_deploy hook failed: {e}"));
                    }
                }
                Outcome::RolledBack => {
                    if let Some(prev) = from.as_deref().and_then(|p| Name::parse(p).ok()) {
                        if let Err(e) = self
                            .hook(HookPoint::OnRollback, &prev, Some(to), &self.config.hosts)
                            .await
                        {
                            self.progress.say(&format!("WARNING: {e}"));
                            notes.push(format!("on_rollback hook failed: {e}"));
                        }
                    }
                }
                _ => {}
            }
        }
        let after = match self.balancer.stats().await {
            Ok(s) => Some(s),
            Err(e) => {
                notes.push(format!(
                    "the balancer's counters could not be read at the end ({e:#}): the request counts below are not known, not zero"
                ));
                None
            }
        };
        // What the balancer client did by itself: the servers an HAProxy reload dropped, put
        // back (the reading above puts back any it finds missing only now).
        notes.extend(self.balancer.notices());
        let traffic = Traffic::between(stats_before, after.as_ref(), run.taken_over);
        let closed = self.take_closed_at_deadline();
        if closed > 0 {
            notes.push(format!(
                "{closed} request(s) or upgraded connection(s) (WebSocket) were still open at a drain deadline and were closed: a cut response counts as failed above, a WebSocket client must reconnect (a longer app.drain_timeout gives them more time)"
            ));
        }
        notes.extend(traffic.notes);
        let put_back = self.take_put_back();
        if !put_back.is_empty() {
            notes.push(format!(
                "put back into the balancer before anything changed, not restarted (their live release ran without a server, as after an HAProxy reload or restart): {}",
                put_back.join(", ")
            ));
        }
        let backgrounded = self.take_backgrounded();
        if !backgrounded.is_empty() {
            notes.push(format!(
                "{}: {}",
                backgrounded.join(", "),
                instance::BACKGROUND_HINT
            ));
        }
        let already = self.take_already();
        let readmitted = self.take_readmitted();
        let report = Report {
            id: run.id.clone(),
            app: self.config.app.name.to_string(),
            kind: kind.to_string(),
            from,
            to: to.to_string(),
            outcome,
            started_unix: now_ms() / 1000 - started.elapsed().as_secs(),
            duration_ms: started.elapsed().as_millis() as u64,
            batches,
            // Halted leaves the moved hosts on the new release: the person who takes over
            // must know which.
            moved_hosts: if matches!(outcome, Outcome::Succeeded | Outcome::Halted) {
                moved.iter().map(|h| h.name.to_string()).collect()
            } else {
                Vec::new()
            },
            unchanged_hosts: if matches!(outcome, Outcome::Succeeded | Outcome::Halted) {
                moved
                    .iter()
                    .map(|h| h.name.to_string())
                    .filter(|h| already.contains(h))
                    .collect()
            } else {
                Vec::new()
            },
            readmitted_hosts: if matches!(outcome, Outcome::Succeeded | Outcome::Halted) {
                moved
                    .iter()
                    .map(|h| h.name.to_string())
                    .filter(|h| readmitted.contains(h))
                    .collect()
            } else {
                Vec::new()
            },
            failed_hosts: failed,
            stuck_hosts: stuck,
            served: traffic.served,
            failed_requests: traffic.failed,
            served_by_release: traffic.by_release,
            counts: traffic.counts,
            notes: strategy_notes.into_iter().chain(notes).collect(),
        };
        // Said "interrupted" at the signal: it stays so, to resume or undo.
        anyhow::ensure!(
            !crate::bounded::signalled(),
            "stopped by a signal before its outcome was recorded"
        );
        self.journal
            .finish(&run.id, outcome.label(), &serde_json::to_value(&report)?)?;
        Ok(report)
    }

    /// Runs the hooks of `point`; the error names the hook, host and exit.
    pub(crate) async fn hook(
        &self,
        point: HookPoint,
        version: &Name,
        previous: Option<&str>,
        hosts: &[Host],
    ) -> Result<(), String> {
        if !self.config.hooks.iter().any(|h| h.at == point) {
            return Ok(());
        }
        let ctx = crate::hooks::HookContext {
            config: &self.config,
            transport: self.transport.as_ref(),
            progress: &self.progress,
            version,
            previous,
            hosts,
        };
        crate::hooks::run(point, &ctx)
            .await
            .map_err(|e| format!("{e:#}"))
    }

    /// Runs the `[[verify]]` commands of `point` unless an operator's stop comes first: an
    /// integration suite may run for minutes, and `cutover abort` should not wait for it.
    /// `None`: stopped, with the verification's processes ended and the command left queued
    /// for the caller's usual reader. A rollback stops only a run that is not itself a
    /// rollback (`rollback_stops`).
    ///
    /// `status` is the live status while a verification runs (`cutover status` and the
    /// dashboard show why the rollout waits); it is written only where there is one to run.
    pub(crate) async fn verify_unless_stopped(
        &self,
        run: &Run,
        point: crate::config::VerifyPoint,
        target: &crate::verify::Target<'_>,
        rollback_stops: bool,
        status: serde_json::Value,
    ) -> Option<Result<(), String>> {
        if !self.config.verify.iter().any(|v| v.at.contains(&point)) {
            return Some(Ok(()));
        }
        self.status(run, status);
        let verify = crate::verify::run(&self.config, point, target);
        tokio::pin!(verify);
        loop {
            tokio::select! {
                biased;
                r = &mut verify => return Some(r),
                () = tokio::time::sleep(VERIFY_COMMAND_POLL) => {
                    // An unreadable journal fails the deployment's next write, which says why.
                    if self
                        .journal
                        .stop_command_waiting(&run.id, rollback_stops)
                        .unwrap_or(false)
                    {
                        self.progress.say(&format!(
                            "{}: an operator's stop arrived; the verification is stopped",
                            point.name()
                        ));
                        return None;
                    }
                }
            }
        }
    }

    /// Why a blue-green or canary run goes back after `point`'s verification was stopped: the
    /// operator's queued stop, taken now, or, when it is no longer queued, a failed
    /// verification.
    pub(crate) fn stopped_verification(
        &self,
        run: &Run,
        point: crate::config::VerifyPoint,
    ) -> anyhow::Result<String> {
        Ok(match self.journal.take_stop_command(&run.id)? {
            Some(cmd) => format!("{cmd} requested"),
            None => format!("{}: {VERIFY_STOPPED_UNCLAIMED}", point.name()),
        })
    }

    /// Splits hosts that failed to move into those an operator's stop cut short (their
    /// before_traffic verification was stopped; they keep serving what they served) and real
    /// failures. When the stop is no longer queued (someone else took it), the cut-short hosts
    /// are failures too: their verification never passed. Returns the failures and whether a
    /// stop is waiting for the caller to act on.
    pub(crate) fn operator_stopped(
        &self,
        run: &Run,
        failures: Vec<HostFailure>,
    ) -> anyhow::Result<(Vec<HostFailure>, bool)> {
        let (cut, mut failures): (Vec<_>, Vec<_>) = failures
            .into_iter()
            .partition(|f| f.reason.ends_with(VERIFY_STOPPED));
        if cut.is_empty() {
            return Ok((failures, false));
        }
        let waiting = self.journal.stop_command_waiting(&run.id, !run.rollback)?;
        for f in cut {
            if waiting {
                self.progress.say(&format!(
                    "{}: before_traffic stopped for an operator's stop; it keeps serving what it served",
                    f.host
                ));
            } else {
                failures.push(HostFailure {
                    host: f.host,
                    reason: format!("before_traffic: {VERIFY_STOPPED_UNCLAIMED}"),
                });
            }
        }
        Ok((failures, waiting))
    }

    /// Ends a blue-green or canary deployment: the report, with the strategy's notes.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn finish_with(
        &self,
        run: &Run,
        from: Option<String>,
        version: &Name,
        outcome: Outcome,
        started: Instant,
        stats_before: &Stats,
        failed: Vec<HostFailure>,
        notes: Vec<String>,
    ) -> anyhow::Result<Report> {
        let moved = if outcome == Outcome::Succeeded {
            self.config.hosts.clone()
        } else {
            Vec::new()
        };
        self.finish(
            run,
            "deploy",
            from,
            version.as_str(),
            outcome,
            started,
            stats_before,
            Vec::new(),
            moved,
            failed,
            Vec::new(),
            notes,
        )
        .await
    }

    /// Journals a step around `work`: written before it acts and after it ends.
    pub(crate) async fn step<T>(
        &self,
        run: &Run,
        host: &str,
        action: &str,
        detail: &str,
        work: impl Future<Output = Result<T, String>>,
    ) -> Result<T, String> {
        // The process is ending on a signal: its cleanups (releasing the locks, a round trip
        // to the fleet) run while this deployer still runs, and must find the deployment
        // where the signal left it.
        if crate::bounded::signalled() {
            return Err("stopped by a signal".to_string());
        }
        let id = self
            .journal
            .step_start(&run.id, host, action, detail)
            .map_err(|e| format!("cannot write the journal: {e:#}"))?;
        let result = work.await;
        let end = match &result {
            Ok(_) => self.journal.step_end(id, "ok", None),
            Err(e) => self.journal.step_end(id, &format!("failed: {e}"), None),
        };
        end.map_err(|e| format!("cannot write the journal: {e:#}"))?;
        result
    }

    /// Why a path release may not ship: `release.path` holds other files than a host's copy
    /// of `version` (rebuilt in place since), which would leave two codes under one name.
    /// Checked before any host stages, against the build about to be uploaded when a host
    /// lacks the release, else against the directory as it is now (unless a `build` would
    /// remake it: then nothing ships and nothing is built). A rollback returns to what the
    /// hosts hold, and is never refused for it.
    async fn rebuilt_in_place(
        &self,
        run: &Run,
        version: &Name,
        before: &[HostView],
        source: &crate::source::ReleaseSource,
    ) -> Option<String> {
        if run.rollback || self.config.release.git.is_some() {
            return None;
        }
        let read: Vec<&HostView> = before.iter().filter(|v| v.error.is_none()).collect();
        let copies: Vec<_> = read
            .iter()
            .filter_map(|v| Some((&v.host, v.print.as_ref()?)))
            .collect();
        if copies.is_empty() {
            return None;
        }
        let lacking = read
            .iter()
            .any(|v| !v.releases.iter().any(|r| r == version.as_str()));
        if lacking {
            // A failed build is reported by the hosts that need it.
            let archive = source.archive().await.ok()?;
            let built = archive.tree.as_ref()?;
            let (host, _) = copies
                .iter()
                .find(|(_, print)| print.content != built.content)?;
            return Some(release::changed(host, source, version).to_string());
        }
        if self.config.release.build.is_some() {
            return None;
        }
        for (host, print) in copies {
            if let Err(e) = release::check_tree(host, source, version, print).await {
                return Some(e.to_string());
            }
        }
        None
    }

    /// Copies the release to every host that lacks it, in parallel (at most `forks` at once).
    /// Maps host name to the outcome.
    pub(crate) async fn stage_all(
        &self,
        run: &Run,
        version: &Name,
        before: &[HostView],
    ) -> BTreeMap<String, Result<bool, String>> {
        // Built once, by the first host that lacks the release (a rollback builds nothing); a
        // failed build or a digest mismatch on any host stops every host before traffic moves.
        let source = crate::source::ReleaseSource::new(&self.config, version);
        let refusal = self.rebuilt_in_place(run, version, before, &source).await;
        let fatal = std::sync::Mutex::new(refusal);
        // A git tag may have moved since a host staged it: `stage` compares the commits (a
        // rollback returns to what the hosts hold, whatever the tag says).
        let check_commit = self.config.release.git.is_some() && !run.rollback;
        let view = |h: &Host| before.iter().find(|v| v.host.name == h.name);
        let present = |h: &Host| {
            view(h).is_some_and(|v| {
                v.error.is_none() && v.releases.iter().any(|r| r == version.as_str())
            })
        };
        let stage_one = |h: &Host| {
            let (source, fatal) = (&source, &fatal);
            let name = h.name.to_string();
            let h = h.clone();
            async move {
                let _permit = self.forks.acquire().await;
                let unreachable = view(&h).and_then(|v| v.error.clone());
                if present(&h) && !check_commit {
                    // Read with the fleet a moment ago: nothing to do, nothing to journal.
                    return (name, Ok(false));
                }
                if fatal.lock().expect("fatal lock").is_some() {
                    return (name, Ok(false));
                }
                let work = async {
                    if let Some(e) = unreachable {
                        return Err(e);
                    }
                    release::stage(self.transport.as_ref(), &h, source, version)
                        .await
                        .map_err(|e| {
                            let msg = format!("{e:#}");
                            if e.is::<release::Fatal>() {
                                fatal.lock().expect("fatal lock").get_or_insert(msg.clone());
                            }
                            msg
                        })
                };
                let r = self
                    .step(run, h.name.as_str(), "stage", version.as_str(), work)
                    .await;
                (name, r)
            }
        };
        // The hosts that hold the version are checked first: a moved tag must stop the deploy
        // before the new build reaches any host that lacks it (which would then hold the other
        // code under the same name).
        let (holding, rest): (Vec<&Host>, Vec<&Host>) = self
            .config
            .hosts
            .iter()
            .partition(|h| check_commit && present(h));
        let mut results = join_all(holding.into_iter().map(stage_one)).await;
        results.extend(join_all(rest.into_iter().map(stage_one)).await);
        if let Some(line) = source.summary() {
            self.progress.say(&line);
        }
        if let Some(line) = source.unchecked() {
            self.progress.say(&line);
        }
        let results = release::stop_on_fatal(results, fatal.into_inner().expect("fatal lock"));
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

    /// Moves one host to `version`, side by side, and settles it. Idempotent: a host already
    /// serving `version` only has its leftovers retired. On failure the host is left serving
    /// what it served before, with the new instance stopped and out of the balancer.
    /// `after_switch`: run the `after_switch` hooks once traffic has moved (a deploy does, a
    /// rollback does not); their failure fails the host, which then serves `version`.
    pub async fn switch_host(
        &self,
        run: &Run,
        label: &str,
        host: &Host,
        version: &Name,
        after_switch: bool,
    ) -> Result<(), HostFailure> {
        let moved = self.admit_new(run, label, host, version, None).await?;
        let unretired = self
            .retire_backends(run, label, host, &moved.instance, Some(&moved.backends))
            .await;
        let hooked = if after_switch {
            self.after_switch_hook(run, host, version).await
        } else {
            Ok(())
        };
        let settled = self
            .settle_host(run, label, host, &moved.instance, &unretired)
            .await;
        hooked.and(settled)
    }

    /// What the strategy's `on_failure` does once a batch spent the failure budget: return
    /// every moved host ([`Deployer::roll_back`]), or stop and leave the fleet as it is.
    /// Returns the outcome and the hosts that could not be returned.
    pub(crate) async fn budget_spent(
        &self,
        run: &Run,
        moved: &[Host],
    ) -> (Outcome, Vec<HostFailure>) {
        match self.config.strategy.on_failure {
            OnFailure::Rollback => self.roll_back(run, moved).await,
            OnFailure::Halt => {
                self.progress
                    .say("on_failure = \"halt\": stopping here; the fleet is left as it is");
                (Outcome::Halted, Vec::new())
            }
        }
    }

    /// Ends a rolling deploy whose unstaged hosts alone spend the failure budget (`why`, from
    /// [`batch::first_batch_over_budget`]) before any host changes traffic. The outcome is
    /// the one `on_failure` gives a spent budget, so a `before_deploy` migration is undone by
    /// the `on_rollback` hooks as it would be after the batches had moved and gone back.
    #[allow(clippy::too_many_arguments)]
    async fn stop_before_moving(
        &self,
        run: &Run,
        kind: &str,
        from: Option<String>,
        version: &Name,
        started: Instant,
        stats_before: &Stats,
        plan: &[Vec<Host>],
        staged: &BTreeMap<String, Result<bool, String>>,
        why: String,
    ) -> anyhow::Result<Report> {
        let mut failed = Vec::new();
        for (i, hosts) in plan.iter().enumerate() {
            let label = format!("batch {}/{}", i + 1, plan.len());
            for h in hosts {
                if let Some(Err(reason)) = staged.get(h.name.as_str()) {
                    let f = HostFailure {
                        host: h.name.to_string(),
                        reason: reason.clone(),
                    };
                    self.report_failed_host(run, &label, &f)?;
                    failed.push(f);
                }
            }
        }
        let why = format!(
            "{why}, counting only the host(s) {version} could not be staged on: stopping before any host changes traffic"
        );
        self.progress.say(&why);
        self.journal.event(Some(&run.id), &why)?;
        let outcome = match self.config.strategy.on_failure {
            OnFailure::Rollback => Outcome::RolledBack,
            OnFailure::Halt => Outcome::Halted,
        };
        self.finish(
            run,
            kind,
            from,
            version.as_str(),
            outcome,
            started,
            stats_before,
            plan_names(plan),
            Vec::new(),
            failed,
            Vec::new(),
            vec!["no host changed traffic: the deploy stopped after staging, since the host(s) that could not stage it would have spent the failure budget".into()],
        )
        .await
    }

    /// An operator's stop between two batches of a rolling deploy: going back is journaled
    /// first (a deploy, not a rollback, goes back), the batches' settles end, then
    /// [`Deployer::operator_stop`].
    #[allow(clippy::too_many_arguments)]
    async fn stop_rollout(
        &self,
        run: &Run,
        kind: &str,
        why: String,
        settling: &mut Settling,
        failed: &mut Vec<HostFailure>,
        moved: &[Host],
        notes: &mut Vec<String>,
    ) -> anyhow::Result<(Outcome, Vec<HostFailure>)> {
        if kind != "rollback" {
            self.going_back(run);
        }
        failed.extend(settling.wait().await);
        self.operator_stop(run, kind, why, moved, notes).await
    }

    /// What an operator's stop (`cutover abort`, `cutover rollback`) does to a rollout: a deploy
    /// returns every moved host; a rollback has nowhere further back to go, so it halts where
    /// it is (a person decides what comes next).
    pub(crate) async fn operator_stop(
        &self,
        run: &Run,
        kind: &str,
        why: String,
        moved: &[Host],
        notes: &mut Vec<String>,
    ) -> anyhow::Result<(Outcome, Vec<HostFailure>)> {
        self.journal.event(Some(&run.id), &why)?;
        notes.push(why.clone());
        if kind == "rollback" {
            self.progress.say(&format!(
                "{why}: this is a rollback; it stops here and leaves the fleet as it is"
            ));
            return Ok((Outcome::Halted, Vec::new()));
        }
        self.progress
            .say(&format!("{why}: returning every moved host"));
        Ok(self.roll_back(run, moved).await)
    }

    /// Returns every moved host ([`Deployer::undo`]): rolled back, or failed when a host could
    /// not be returned (those are returned).
    pub(crate) async fn roll_back(&self, run: &Run, moved: &[Host]) -> (Outcome, Vec<HostFailure>) {
        let stuck = self.undo(run, moved).await;
        let outcome = if stuck.is_empty() {
            Outcome::RolledBack
        } else {
            Outcome::Failed
        };
        (outcome, stuck)
    }

    /// Says and journals that a host failed in a batch (`label`); the one place the board
    /// learns of a failed host.
    pub(crate) fn report_failed_host(
        &self,
        run: &Run,
        label: &str,
        f: &HostFailure,
    ) -> anyhow::Result<()> {
        self.progress.host(&f.host, Phase::Failed);
        self.progress
            .say(&format!("{label}: {} FAILED: {}", f.host, f.reason));
        self.journal
            .event(Some(&run.id), &format!("{} failed: {}", f.host, f.reason))?;
        Ok(())
    }

    /// Runs the `after_switch` hooks for one host whose traffic has moved.
    async fn after_switch_hook(
        &self,
        run: &Run,
        host: &Host,
        version: &Name,
    ) -> Result<(), HostFailure> {
        let previous = run.previous.get(host.name.as_str()).cloned().flatten();
        self.hook(
            HookPoint::AfterSwitch,
            version,
            previous.as_deref(),
            std::slice::from_ref(host),
        )
        .await
        .map_err(|reason| HostFailure {
            host: host.name.to_string(),
            reason,
        })
    }

    /// Steps 1-3 of a switch (see the module docs): when it returns, the new instance is
    /// healthy and in the balancer, beside the host's old backends (listed in the result, for
    /// step 4). `known`: the host's instances as just read with the fleet (one round trip
    /// saved); `None` reads them afresh.
    pub async fn admit_new(
        &self,
        run: &Run,
        label: &str,
        host: &Host,
        version: &Name,
        known: Option<&[instance::Recorded]>,
    ) -> Result<Moved, HostFailure> {
        let started = self.start_new(run, label, host, version, known).await?;
        self.admit_started(run, label, host, version, started, None)
            .await
    }

    /// Step 1 of a switch: the new instance started (or found already serving `version`).
    pub async fn start_new(
        &self,
        run: &Run,
        label: &str,
        host: &Host,
        version: &Name,
        known: Option<&[instance::Recorded]>,
    ) -> Result<Started, HostFailure> {
        let permit = self.forks.acquire().await;
        self.progress.host(host.name.as_str(), Phase::Starting);
        let fail = |reason: String| HostFailure {
            host: host.name.to_string(),
            reason,
        };
        let say = |msg: String| self.progress.say(&format!("{label} {}: {msg}", host.name));
        let recorded = match known {
            Some(k) => k.to_vec(),
            None => instance::list(self.transport.as_ref(), host)
                .await
                .map_err(|e| fail(format!("{e:#}")))?,
        };
        let backends = self
            .balancer
            .backends()
            .await
            .map_err(|e| fail(format!("{e:#}")))?;
        let healthy_target = |state: BackendState| {
            recorded.iter().find(|r| {
                r.alive
                    && r.instance.version == version.as_str()
                    && backends.iter().any(|b| {
                        b.spec.id == r.instance.backend_id()
                            && b.state == state
                            && b.health == crate::balancer::api::Health::Healthy
                    })
            })
        };
        // An instance of the release still running and healthy while it drains (blue in a
        // blue-green window, the old instance of a host whose deployer was killed) goes back
        // into the balancer at once: no start, no gate, as the switch back it stands for.
        let (serving_target, draining) = match healthy_target(BackendState::Active) {
            Some(r) => (Some(r), false),
            None => (healthy_target(BackendState::Draining), true),
        };
        // An instance of the release that runs while the balancer has no server at all for
        // the host (an HAProxy reload or restart drops the servers cutover added: `cutover
        // readmit`) goes back in through the health gate, without a restart.
        let unrouted = match serving_target {
            Some(_) => None,
            None if backends.iter().any(|b| b.spec.host == host.name.as_str()) => None,
            None => recorded
                .iter()
                .find(|r| r.alive && r.instance.version == version.as_str()),
        };
        let (instance, serving, emptied) = match (serving_target, unrouted) {
            (None, Some(r)) => {
                say(format!(
                    "{version} runs on {} (pid {}) but the balancer has no server for this host: admitting it again (not restarted)",
                    r.instance.address, r.instance.pid
                ));
                self.readmitted
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(host.name.to_string());
                (r.instance.clone(), false, None)
            }
            (Some(r), _) => {
                let id = r.instance.backend_id();
                if draining {
                    self.balancer
                        .activate(&id)
                        .await
                        .map_err(|e| fail(format!("putting {id} back into the balancer: {e:#}")))?;
                    say(format!(
                        "{version} on {} was draining and still healthy: back in the balancer",
                        r.instance.address
                    ));
                } else {
                    say(format!(
                        "already serving {version} on {}",
                        r.instance.address
                    ));
                    self.already
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(host.name.to_string());
                }
                // A canary's steps leave the stable backends at other weights (0 at a 100%
                // step): one that stays must carry its full share again.
                let weight = crate::balancer::api::default_weight();
                if backends
                    .iter()
                    .any(|b| b.spec.id == id && b.spec.weight != weight)
                {
                    self.balancer.set_weight(&id, weight).await.map_err(|e| {
                        fail(format!("setting {id} back to weight {weight}: {e:#}"))
                    })?;
                    say(format!("{id} back to weight {weight}"));
                }
                (r.instance.clone(), true, None)
            }
            (None, None) => {
                let in_place = self.in_place().is_some();
                let (permit, emptied) = if in_place {
                    // What served: the live instance of another release (normally the only one).
                    let served = recorded
                        .iter()
                        .filter(|r| r.alive && r.instance.version != version.as_str())
                        .find_map(|r| Name::parse(&r.instance.version).ok());
                    // The drain waits on requests in flight, not on the host: like the health
                    // gate, it holds no permit, so a batch wider than `forks` drains together
                    // (`empty_host` takes one for each stop).
                    drop(permit);
                    let emptied = async {
                        self.empty_host(run, label, host, &recorded, &backends)
                            .await?;
                        self.port_is_free(host).await
                    };
                    if let Err(reason) = emptied.await {
                        let reason = self
                            .restore_in_place(run, host, version, served, reason)
                            .await;
                        return Err(fail(reason));
                    }
                    (self.forks.acquire().await, served)
                } else {
                    (permit, None)
                };
                let inst = match self.start_instance(run, host, version).await {
                    Ok(inst) => inst,
                    Err(reason) if in_place => {
                        drop(permit);
                        let reason = self
                            .restore_in_place(run, host, version, emptied, reason)
                            .await;
                        return Err(fail(reason));
                    }
                    Err(reason) => return Err(fail(reason)),
                };
                say(format!(
                    "started {version} on {} (pid {})",
                    inst.address, inst.pid
                ));
                (inst, false, emptied)
            }
        };
        // Emptied in place, the host's old backends are gone already (and share the new
        // instance's id).
        let backends = if serving || self.in_place().is_none() {
            backends
        } else {
            Vec::new()
        };
        Ok(Started {
            moved: Moved { instance, backends },
            serving,
            emptied,
        })
    }

    /// Empties a host: its backends leave the balancer (drained first, so no request in flight
    /// is cut) and its instances stop. In place, this frees the app's fixed port before the new
    /// instance starts, and the host serves nothing until that one is admitted; it is also the
    /// undo of a first deploy. The stops hold a `forks` permit each, the drain none (it waits on
    /// requests, not on the host), so callers must hold none.
    async fn empty_host(
        &self,
        run: &Run,
        label: &str,
        host: &Host,
        recorded: &[instance::Recorded],
        backends: &[crate::balancer::BackendView],
    ) -> Result<(), String> {
        let h = host.name.as_str();
        for b in backends.iter().filter(|b| b.spec.host == h) {
            self.step(
                run,
                h,
                "retire",
                &b.spec.id,
                self.retire_backend(&b.spec.id),
            )
            .await?;
        }
        let app = &self.config.app;
        let t = self.transport.as_ref();
        for r in recorded {
            let detail = format!("{}@{}", r.instance.version, r.instance.address);
            let _permit = self.forks.acquire().await;
            self.step(run, h, "stop", &detail, async {
                instance::stop(t, host, &r.instance, app.stop_signal, *app.stop_timeout)
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("{e:#}"))
            })
            .await?;
            if r.alive {
                self.progress.say(&format!(
                    "{label} {h}: out of the balancer; stopped {} (pid {})",
                    r.instance.version, r.instance.pid
                ));
            }
        }
        Ok(())
    }

    /// In-place mode, after a host's new instance failed: the host stopped `emptied` (the
    /// release it served) to free the port, so it serves nothing until that runs again. Starts
    /// it again, once ([`Deployer::restart_in_place`]), and returns `reason` with the result.
    /// A host left empty (it served nothing before, or the restart failed too) is recorded as
    /// stranded: the deployment then ends `failed`, with the host among those to look at.
    async fn restore_in_place(
        &self,
        run: &Run,
        host: &Host,
        failed: &Name,
        emptied: Option<Name>,
        reason: String,
    ) -> String {
        let h = host.name.as_str();
        let previous = run.previous.get(h).cloned().flatten();
        // Nothing of another release ran (a resumed deployment had emptied the host already):
        // the host's release before the deployment, unless that is what just failed.
        let fallback = previous
            .as_deref()
            .filter(|p| *p != failed.as_str())
            .and_then(|p| Name::parse(p).ok());
        let Some(back) = emptied.or(fallback) else {
            if previous.is_some() {
                let reason = format!("{reason}\nthe host serves nothing now");
                self.strand(h, &reason);
                return reason;
            }
            return reason;
        };
        self.progress
            .say(&format!("restore {h}: starting {back} again in place"));
        match self.restart_in_place(run, host, &back).await {
            Ok(()) => format!("{reason}\nrestored: {back} serves again on the host"),
            Err(e) => {
                let reason = format!(
                    "{reason}\n{back} could not be started again, so the host serves nothing: {e}"
                );
                self.strand(h, &reason);
                reason
            }
        }
    }

    /// A restore's one attempt: the host emptied of whatever still runs, `back` started on the
    /// fixed port, gated, admitted and settled. Unlike a switch, a failure here is final (no
    /// restore of the restore), so a host that keeps failing cannot keep the deploy busy.
    async fn restart_in_place(&self, run: &Run, host: &Host, back: &Name) -> Result<(), String> {
        let h = host.name.as_str();
        let backends = self
            .balancer
            .backends()
            .await
            .map_err(|e| format!("{e:#}"))?;
        let recorded = instance::list(self.transport.as_ref(), host)
            .await
            .map_err(|e| format!("{e:#}"))?;
        self.empty_host(run, "restore", host, &recorded, &backends)
            .await?;
        self.port_is_free(host).await?;
        let inst = self.start_instance(run, host, back).await?;
        self.progress.say(&format!(
            "restore {h}: started {back} on {} (pid {})",
            inst.address, inst.pid
        ));
        self.admit_or_discard(run, host, &inst, None).await?;
        self.progress
            .say(&format!("restore {h}: {back} healthy and in the balancer"));
        self.settle_host(run, "restore", host, &inst, &[])
            .await
            .map_err(|f| f.reason)
    }

    /// In place, once the host's instances are stopped: nothing may still accept connections
    /// on the fixed port, or the new instance could not bind while the health gate passed on
    /// the other process's answers.
    async fn port_is_free(&self, host: &Host) -> Result<(), String> {
        let Some(port) = self.in_place() else {
            return Ok(());
        };
        let addr = std::net::SocketAddr::new(host.address, port);
        let probe = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            tokio::net::TcpStream::connect(addr),
        )
        .await;
        match probe {
            Ok(Ok(_)) => Err(format!(
                "{addr} still accepts connections after the host's instances stopped: a process cutover did not start holds app.port {port} on host {}; stop it (or let cutover manage it), then deploy again",
                host.name
            )),
            // Refused: free. No answer within a second: left to the new instance's gate.
            _ => Ok(()),
        }
    }

    /// Records a host that serves nothing after a failure in place (see
    /// [`Deployer::restore_in_place`]).
    fn strand(&self, host: &str, reason: &str) {
        self.stranded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(HostFailure {
                host: host.to_string(),
                reason: reason.to_string(),
            });
    }

    /// What the drain deadlines closed since the last call (the deployment's start).
    fn take_closed_at_deadline(&self) -> u64 {
        self.closed_at_deadline
            .swap(0, std::sync::atomic::Ordering::Relaxed)
    }

    /// Hosts whose instance of the new release this deployment started, though a later step
    /// found it serving: they are reported as moved, not as already running the release.
    pub(crate) fn started_here<'a>(&self, hosts: impl IntoIterator<Item = &'a str>) {
        let mut already = self.already.lock().unwrap_or_else(|p| p.into_inner());
        for host in hosts {
            already.retain(|a| a != host);
        }
    }

    fn take_already(&self) -> Vec<String> {
        std::mem::take(&mut *self.already.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn take_readmitted(&self) -> Vec<String> {
        std::mem::take(&mut *self.readmitted.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn take_put_back(&self) -> Vec<String> {
        std::mem::take(&mut *self.put_back.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn take_backgrounded(&self) -> Vec<String> {
        std::mem::take(&mut *self.backgrounded.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn take_stranded(&self) -> Vec<HostFailure> {
        std::mem::take(&mut *self.stranded.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Hosts left serving nothing, once each, for the report's hosts to look at; `outcome`
    /// becomes `failed` when there are any.
    fn stranded_into(&self, stuck: &mut Vec<HostFailure>, outcome: &mut Outcome) {
        for f in self.take_stranded() {
            *outcome = Outcome::Failed;
            if !stuck.iter().any(|s| s.host == f.host) {
                stuck.push(f);
            }
        }
    }

    /// The journaled `admit` step (gate, balancer, its check) of a new instance, which is
    /// stopped and taken out of the balancer when that fails.
    async fn admit_or_discard(
        &self,
        run: &Run,
        host: &Host,
        inst: &Instance,
        answered: Option<instance::Answered>,
    ) -> Result<(), String> {
        let admitted = self
            .step(
                run,
                host.name.as_str(),
                "admit",
                &inst.backend_id(),
                self.admit(run, inst, false, None, answered),
            )
            .await;
        if admitted.is_err() {
            self.discard(run, host, inst).await;
        }
        admitted
    }

    /// Puts the live instances of hosts that have no server in the balancer (see
    /// [`crate::readmit::lost`]) back in, before anything changes: after an HAProxy reload or
    /// restart that no `cutover readmit` followed, they would stay out until their batch, and
    /// with every host out, clients got 503s for the whole deploy. Through the health gate
    /// (bounded to a few intervals), without hooks or verify suites (no release changes); a
    /// host that fails it stays as it was. Not hosts already on `version`: their batch admits
    /// them without a restart.
    /// Returns whether any went back.
    async fn put_back_lost(&self, run: &Run, version: &Name, before: &[HostView]) -> bool {
        let lost: Vec<crate::readmit::Lost> = crate::readmit::lost(before)
            .into_iter()
            .filter(|l| l.release != version.as_str())
            .collect();
        if lost.is_empty() {
            return false;
        }
        self.progress.say(&format!(
            "{} run(s) the live release without a server in the balancer (an HAProxy reload or restart drops the servers cutover added): putting them back first, not restarted",
            crate::readmit::names(&lost)
        ));
        // An instance that served until the reload passes its checks at once: one that does not
        // is left to its batch after a few intervals, not after the whole `deadline`.
        let health = &{
            let mut gate = self.config.app.health.clone();
            let checks = gate.healthy_threshold.0 + gate.unhealthy_threshold.0;
            let bound = gate.interval.saturating_mul(checks) + *gate.timeout;
            gate.deadline = crate::config::Dur((*gate.deadline).min(bound));
            gate.start_period = crate::config::Dur(Duration::ZERO);
            gate
        };
        let put_back = join_all(lost.iter().map(|l| async move {
            let inst = Instance {
                host: l.host.clone(),
                version: l.release.clone(),
                address: l.address,
                pid: l.pid,
            };
            let id = inst.backend_id();
            let work = async {
                let host = self
                    .config
                    .host(&l.host)
                    .ok_or_else(|| format!("unknown host {}", l.host))?;
                instance::wait_healthy(self.transport.as_ref(), host, &inst, health, None)
                    .await
                    .map_err(|e| format!("{} on {}: {e}", inst.version, inst.address))?;
                let routed = self
                    .route_when_healthy(backend_spec(&inst, &health.path, false), *health.deadline)
                    .await;
                if routed.is_err() {
                    let _ = self.balancer.remove(&id).await;
                }
                routed
            };
            let r = self.step(run, &l.host, "readmit", &id, work).await;
            (l.host.clone(), r)
        }))
        .await;
        let mut back = Vec::new();
        for (host, r) in put_back {
            match r {
                Ok(()) => back.push(host),
                Err(e) => self.progress.say(&format!(
                    "WARNING: {host} could not be put back ({e}): it gets a server when its batch moves it"
                )),
            }
        }
        if back.is_empty() {
            return false;
        }
        self.progress
            .say(&format!("put back into the balancer: {}", back.join(", ")));
        self.put_back
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(back);
        true
    }

    /// Steps 2-3 of a switch, for an instance [`Deployer::start_new`] started. On failure the
    /// new instance is stopped and out of the balancer. `answered`: see
    /// [`instance::wait_healthy`].
    pub async fn admit_started(
        &self,
        run: &Run,
        label: &str,
        host: &Host,
        version: &Name,
        started: Started,
        answered: Option<instance::Answered>,
    ) -> Result<Moved, HostFailure> {
        if started.serving {
            self.progress.host(host.name.as_str(), Phase::Serving);
            return Ok(started.moved);
        }
        self.progress.host(host.name.as_str(), Phase::Gate);
        // No `forks` permit: the gate mostly waits (its probes come from this machine), and a
        // permit held through it made a batch larger than `forks` take one health interval per
        // `forks` hosts, and kept the previous batch's settle waiting. Hooks and host scripts
        // inside take their own.
        let inst = &started.moved.instance;
        if let Err(e) = self.admit_or_discard(run, host, inst, answered).await {
            let reason = if self.in_place().is_some() {
                self.restore_in_place(run, host, version, started.emptied, e)
                    .await
            } else {
                e
            };
            return Err(HostFailure {
                host: host.name.to_string(),
                reason,
            });
        }
        self.progress.host(host.name.as_str(), Phase::Serving);
        self.progress.say(&format!(
            "{label} {}: {version} healthy and in the balancer",
            host.name
        ));
        Ok(started.moved)
    }

    /// Step 6 of a switch: other instances stopped, `current` moved, old releases pruned.
    /// Stops the host's other instances, moves `current` and prunes releases, leaving the
    /// `unretired` instances running: the balancer may still route to them.
    pub async fn settle_host(
        &self,
        run: &Run,
        label: &str,
        host: &Host,
        keep: &Instance,
        unretired: &[Unretired],
    ) -> Result<(), HostFailure> {
        let _permit = self.forks.acquire().await;
        let app = &self.config.app;
        let protect: Vec<String> = run
            .previous
            .get(host.name.as_str())
            .cloned()
            .flatten()
            .into_iter()
            .collect();
        let settled = self
            .step(run, host.name.as_str(), "settle", &keep.version, async {
                crate::settle::settle(
                    self.transport.as_ref(),
                    host,
                    keep,
                    app,
                    self.config.release.keep.0,
                    &protect,
                    &unretired
                        .iter()
                        .map(|u| u.instance.clone())
                        .collect::<Vec<_>>(),
                )
                .await
                .map_err(|e| format!("{e:#}"))
            })
            .await
            .map_err(|reason| {
                self.progress.host(host.name.as_str(), Phase::Unsettled);
                self.progress.say(&format!(
                    "{label} {}: WARNING: serves {} but could not settle: {reason}",
                    host.name, keep.version
                ));
                // A deploy of the release it serves retires and settles what is left.
                HostFailure {
                    host: host.name.to_string(),
                    reason: format!(
                        "serves {v}, but its other instances may still run and `current` may name another release ({reason}): run `cutover deploy --version {v}` again once the host answers, to settle it",
                        v = keep.version
                    ),
                }
            })?;
        let say = |msg: String| self.progress.say(&format!("{label} {}: {msg}", host.name));
        match settled.keep {
            crate::settle::Keep::Running => {}
            crate::settle::Keep::Background => {
                say(format!(
                    "WARNING: {}@{} (pid {}): {}",
                    keep.version,
                    keep.address,
                    keep.pid,
                    instance::BACKGROUND_HINT
                ));
                self.backgrounded
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(format!("{} ({}@{})", host.name, keep.version, keep.address));
            }
            crate::settle::Keep::Exited => say(format!(
                "WARNING: {}@{} (pid {}) exited after it passed its health gate: its log (`cutover logs {}`) may say why; the balancer's health check takes it out of rotation",
                keep.version, keep.address, keep.pid, host.name
            )),
        }
        for (instance, how) in &settled.stopped {
            match how {
                instance::Stopped::Gracefully => say(format!("stopped {instance}")),
                instance::Stopped::Killed => say(format!(
                    "stopped {instance} with KILL after stop_timeout {}",
                    app.stop_timeout
                )),
            }
        }
        if !settled.pruned.is_empty() {
            say(format!(
                "removed old release(s) {}",
                settled.pruned.join(", ")
            ));
        }
        if !unretired.is_empty() {
            let list: Vec<String> = unretired
                .iter()
                .map(|u| format!("{} (backend {}: {})", u.instance, u.backend, u.why))
                .collect();
            self.progress.host(host.name.as_str(), Phase::Unsettled);
            return Err(HostFailure {
                host: host.name.to_string(),
                reason: format!(
                    "serves {} but the balancer may still route to {}, which is left running: retire it there, then stop it",
                    keep.version,
                    list.join(", ")
                ),
            });
        }
        self.progress.host(host.name.as_str(), Phase::Done);
        Ok(())
    }

    /// Starts an instance of `version` on a free port of the host (journaled as `start`, with
    /// the address in the step's detail so `cutover status` can tell our instances from strays).
    pub async fn start_instance(
        &self,
        run: &Run,
        host: &Host,
        version: &Name,
    ) -> Result<Instance, String> {
        let t = self.transport.as_ref();
        let id = self
            .journal
            .step_start(&run.id, host.name.as_str(), "start", version.as_str())
            .map_err(|e| format!("cannot write the journal: {e:#}"))?;
        let started = async {
            let port = self.free_port(host).await.map_err(|e| format!("{e:#}"))?;
            instance::start(t, &self.config.app, host, version, port)
                .await
                .map_err(|e| format!("{e:#}"))
        }
        .await;
        let end = match &started {
            Ok(inst) => self.journal.step_end(
                id,
                "ok",
                Some(&format!("{}@{}", inst.version, inst.address)),
            ),
            Err(e) => self.journal.step_end(id, &format!("failed: {e}"), None),
        };
        end.map_err(|e| format!("cannot write the journal: {e:#}"))?;
        started
    }

    /// Health gate, then into the balancer (as a preview backend when `preview`), then the
    /// balancer's own health check.
    pub async fn admit(
        &self,
        run: &Run,
        inst: &Instance,
        preview: bool,
        weight: Option<u32>,
        answered: Option<instance::Answered>,
    ) -> Result<(), String> {
        let host = self
            .config
            .host(&inst.host)
            .ok_or_else(|| format!("unknown host {}", inst.host))?;
        let health = &self.config.app.health;
        instance::wait_healthy(self.transport.as_ref(), host, inst, health, answered)
            .await
            .map_err(|e| format!("{} on {}: {e}", inst.version, inst.address))?;
        if self.in_place().is_some() {
            // On a fixed port, another process can answer for an instance that could not bind.
            let alive = instance::is_alive(self.transport.as_ref(), host, inst)
                .await
                .map_err(|e| format!("{e:#}"))?;
            if !alive {
                return Err(format!(
                    "{} on {}: its process (pid {}) exited, yet something answers on port {}: another process holds app.port on this host; stop it, then deploy again",
                    inst.version,
                    inst.address,
                    inst.pid,
                    inst.port()
                ));
            }
        }
        let version = Name::parse(&inst.version).map_err(|e| e.to_string())?;
        let target = crate::verify::Target {
            url: format!("http://{}", inst.address),
            version: version.as_str(),
            preview: false,
        };
        // An integration suite may run for minutes: an operator's abort stops it (the caller
        // reads the command; see `operator_stopped`).
        let status = serde_json::json!({
            "phase": "verifying (before_traffic)", "host": host.name.as_str(),
        });
        self.verify_unless_stopped(
            run,
            crate::config::VerifyPoint::BeforeTraffic,
            &target,
            !run.rollback,
            status,
        )
        .await
        .unwrap_or_else(|| Err(VERIFY_STOPPED.to_string()))?;
        let previous = run.previous.get(host.name.as_str()).cloned().flatten();
        let hooked = self
            .hook(
                HookPoint::BeforeSwitch,
                &version,
                previous.as_deref(),
                std::slice::from_ref(host),
            )
            .await;
        match hooked {
            Ok(()) => {}
            // The way back is not held up by a hook of the way forward: the release being
            // returned to served before, and a host left on the one being undone is worse.
            Err(e) if run.rollback => self.progress.say(&format!(
                "rollback {}: WARNING: {e}; the host returns all the same",
                host.name
            )),
            Err(e) => return Err(e),
        }
        let mut spec = backend_spec(inst, &health.path, preview);
        if let Some(w) = weight {
            spec.weight = w;
        }
        self.route_when_healthy(spec, *health.deadline).await
    }

    /// Adds `spec` to the balancer, gated (it takes requests once the balancer's own check
    /// passes), and waits up to `deadline` for that check.
    async fn route_when_healthy(
        &self,
        mut spec: BackendSpec,
        deadline: Duration,
    ) -> Result<(), String> {
        spec.gated = true;
        self.balancer
            .add(&spec)
            .await
            .map_err(|e| format!("adding {} to the balancer: {e:#}", spec.id))?;
        self.balancer
            .wait_healthy(&spec.id, deadline)
            .await
            .map_err(|e| format!("the balancer does not see {} healthy: {e:#}", spec.id))
    }

    /// Drains and removes every backend of the host but `keep`'s (from `known`, the balancer's
    /// list just read, or a fresh one). Problems are reported, not fatal: the host already
    /// serves `keep`.
    pub async fn retire_backends(
        &self,
        run: &Run,
        label: &str,
        host: &Host,
        keep: &Instance,
        known: Option<&[crate::balancer::BackendView]>,
    ) -> Vec<Unretired> {
        let h = host.name.as_str();
        let keep_id = keep.backend_id();
        let fresh;
        let backends = match known {
            Some(b) => b,
            None => match self.balancer.backends().await {
                Ok(b) => {
                    fresh = b;
                    &fresh
                }
                Err(_) => return Vec::new(),
            },
        };
        let mut unretired = Vec::new();
        for b in backends
            .iter()
            .filter(|b| b.spec.host == h && b.spec.id != keep_id)
        {
            let r = self
                .step(
                    run,
                    h,
                    "retire",
                    &b.spec.id,
                    self.retire_backend(&b.spec.id),
                )
                .await;
            if let Err(e) = r {
                self.progress.say(&format!(
                    "{label} {h}: WARNING: could not retire backend {}: {e}; its instance is left running",
                    b.spec.id
                ));
                unretired.push(Unretired {
                    instance: format!("{}-{}", b.spec.release, b.spec.address.port()),
                    backend: b.spec.id.clone(),
                    why: e,
                });
            }
        }
        unretired
    }

    /// Takes a failed new instance out of the balancer (if it got there) and stops it.
    pub async fn discard(&self, run: &Run, host: &Host, inst: &Instance) {
        let app = &self.config.app;
        let detail = format!("{}@{}", inst.version, inst.address);
        let r = self
            .step(run, host.name.as_str(), "discard", &detail, async {
                let _ = self.balancer.remove(&inst.backend_id()).await;
                instance::stop(
                    self.transport.as_ref(),
                    host,
                    inst,
                    app.stop_signal,
                    *app.stop_timeout,
                )
                .await
                .map_err(|e| format!("{e:#}"))
            })
            .await;
        if let Err(e) = r {
            self.progress.say(&format!(
                "{}: WARNING: could not stop failed {}: {e}",
                host.name, inst.version
            ));
        }
    }

    /// Drain, wait, remove.
    pub async fn retire_backend(&self, id: &str) -> Result<(), String> {
        let work = async {
            let report = self
                .balancer
                .retire(id, *self.config.app.drain_timeout)
                .await?;
            if !report.drained {
                self.closed_at_deadline.fetch_add(
                    report.closed_at_deadline,
                    std::sync::atomic::Ordering::Relaxed,
                );
                self.progress.say(&format!(
                    "{id}: drain_timeout reached after {} ms; {} request(s) closed",
                    report.waited_ms, report.closed_at_deadline
                ));
            }
            anyhow::Ok(())
        };
        work.await.map_err(|e: anyhow::Error| format!("{e:#}"))
    }

    /// Returns every moved host to the release it had, in parallel. Returns the hosts that
    /// could not be returned.
    /// Journals that `run` has begun going back, before it does: a deployment killed from
    /// here on must be finished by going back, not forward (see [`was_going_back`]).
    pub(crate) fn going_back(&self, run: &Run) {
        // Once per deployment: the decision journals it, the undo that follows would again.
        if was_going_back(&self.journal, &run.id).unwrap_or(false) {
            return;
        }
        if let Err(e) = self.journal.event(Some(&run.id), UNDO_EVENT) {
            self.progress.say(&format!(
                "WARNING: cannot journal the rollback's start: {e:#}"
            ));
        }
    }

    pub(crate) async fn undo(&self, run: &Run, moved: &[Host]) -> Vec<HostFailure> {
        self.going_back(run);
        // An `abort` or `rollback` queued by now asks for what the undo does: it is taken
        // here, so it cannot cut the undo's own before_traffic verifications short (leaving a
        // host on the release being undone), and its sender sees it read. From here on the
        // undo is a rollback: a `rollback` does not stop it, an `abort` does.
        while let Ok(Some(cmd)) = self.journal.take_stop_command(&run.id) {
            self.progress
                .say(&format!("{cmd}: carried out by the rollback under way"));
        }
        let run = &Run {
            rollback: true,
            ..run.clone()
        };
        // The board counts hosts on the new release; the lines tell the way back.
        self.progress.plan(&[]);
        if moved.is_empty() {
            self.progress
                .say("rollback: no host had moved; the fleet is unchanged");
            return Vec::new();
        }
        self.progress.say(&format!(
            "rollback: returning {} host(s) to their previous release",
            moved.len()
        ));
        self.return_hosts(run, moved).await
    }

    /// Returns `hosts` to their release in `run.previous` (clearing those that had none, leaving
    /// those it does not name: they were unreachable when the deployment began), in
    /// parallel; in place, in waves the size of the plan's largest batch, since a host
    /// being returned serves nothing meanwhile. Returns the hosts that could not be returned.
    async fn return_hosts(&self, run: &Run, hosts: &[Host]) -> Vec<HostFailure> {
        let wave = match self.in_place() {
            Some(_) => batch::batches(&self.config.strategy.batch, &self.config.hosts)
                .iter()
                .map(Vec::len)
                .max()
                .unwrap_or(1),
            None => hosts.len(),
        };
        let mut stuck = Vec::new();
        for wave in hosts.chunks(wave.max(1)) {
            let results = join_all(wave.iter().map(|h| async move {
                match run.previous.get(h.name.as_str()) {
                    Some(Some(prev)) => {
                        let prev = Name::parse(prev).map_err(|e| HostFailure {
                            host: h.name.to_string(),
                            reason: e,
                        })?;
                        self.switch_host(run, "rollback", h, &prev, false).await
                    }
                    Some(None) => self.clear_host(run, h).await,
                    None => {
                        self.progress.say(&format!(
                            "rollback {}: left as it is (it could not be read when the deployment began, so the deployment did not change it)",
                            h.name
                        ));
                        Ok(())
                    }
                }
            }))
            .await;
            stuck.extend(results.into_iter().filter_map(Result::err));
        }
        stuck
    }

    /// Undo of a first deploy: the host served nothing before, so it serves nothing again.
    async fn clear_host(&self, run: &Run, host: &Host) -> Result<(), HostFailure> {
        let fail = |e: String| HostFailure {
            host: host.name.to_string(),
            reason: e,
        };
        let backends = self
            .balancer
            .backends()
            .await
            .map_err(|e| fail(format!("{e:#}")))?;
        let permit = self.forks.acquire().await;
        let recorded = instance::list(self.transport.as_ref(), host)
            .await
            .map_err(|e| fail(format!("{e:#}")))?;
        // `empty_host` takes its own permits, for its host scripts only.
        drop(permit);
        self.empty_host(run, "rollback", host, &recorded, &backends)
            .await
            .map_err(fail)?;
        let _permit = self.forks.acquire().await;
        release::clear_current(self.transport.as_ref(), host)
            .await
            .map_err(|e| fail(format!("{e:#}")))
    }
}

/// The port a lookup made ahead found, else a fresh lookup's. A lookup that failed because the
/// host did not answer in time is not repeated: the host is unlikely to answer the next within
/// the time it just took, and the step would pay the timeout twice. Any other failure (a
/// session lost a health interval ago) gets one fresh lookup.
async fn port_after_lookup(
    ahead: Option<tokio::task::JoinHandle<anyhow::Result<u16>>>,
    transport: &dyn Transport,
    host: &Host,
) -> anyhow::Result<u16> {
    if let Some(lookup) = ahead {
        match lookup.await {
            Ok(Ok(port)) => return Ok(port),
            Ok(Err(e)) if crate::transport::TimedOut::is(&e) => {
                return Err(e.context("finding a free port"));
            }
            _ => {}
        }
    }
    transport.free_port(host).await
}

/// The balancer spec of an instance.
pub fn backend_spec(inst: &Instance, health_path: &str, preview: bool) -> BackendSpec {
    BackendSpec {
        id: inst.backend_id(),
        address: inst.address,
        host: inst.host.clone(),
        release: inst.version.clone(),
        weight: crate::balancer::api::default_weight(),
        health_path: health_path.to_string(),
        preview,
        gated: false,
    }
}

/// A new deployment id: sortable by time, unique per process.
pub fn new_id() -> String {
    let ms = now_ms();
    format!(
        "{}-{:05}",
        ms / 1000,
        (ms % 1000) * 100 + u64::from(std::process::id() % 100)
    )
}

fn strategy_name(config: &Config) -> &'static str {
    match config.strategy.kind {
        crate::config::StrategyKind::Rolling => "rolling",
        crate::config::StrategyKind::BlueGreen => "blue-green",
        crate::config::StrategyKind::Canary => "canary",
    }
}

pub(crate) fn plan_names(plan: &[Vec<Host>]) -> Vec<Vec<String>> {
    plan.iter()
        .map(|b| b.iter().map(|h| h.name.to_string()).collect())
        .collect()
}

/// The most frequent value.
pub fn most_common<'a>(values: impl Iterator<Item = &'a String>) -> Option<String> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for v in values {
        *counts.entry(v).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(v, _)| v.to_string())
}

/// The release most hosts point `current` at.
pub fn most_common_release(views: &[HostView]) -> Option<String> {
    most_common(views.iter().filter_map(|v| v.current.as_ref()))
}

/// How often a running verification looks for an operator's stop: commands come from people,
/// and each look is a journal read.
const VERIFY_COMMAND_POLL: Duration = Duration::from_millis(100);

/// Why a verification the operator's stop ended did not pass (it is not a pass: the caller
/// acts on the stop, and treats the verification as failed if the stop is no longer queued).
pub(crate) const VERIFY_STOPPED: &str =
    "the verification was stopped by an operator's abort or rollback";

/// A verification stopped for a command that someone else took meanwhile: it did not pass.
pub(crate) const VERIFY_STOPPED_UNCLAIMED: &str = "the verification was stopped for an operator's abort or rollback that is no longer queued: it counts as failed";

/// Journaled when a deployment starts returning its moved hosts (an abort, a rollback, a spent
/// failure budget): see [`was_going_back`].
const UNDO_EVENT: &str = "returning every moved host to its previous release";
/// Journaled when `cutover rollback` starts returning an interrupted deployment's hosts.
const RESTORE_EVENT: &str = "rollback of the interrupted deployment";

/// Whether the interrupted deployment `id` had begun returning its hosts: finishing it means
/// finishing that, whether the operator says `deploy --resume` or `rollback`.
pub fn was_going_back(journal: &Journal, id: &str) -> anyhow::Result<bool> {
    Ok(journal
        .events(id)?
        .iter()
        .any(|e| e.message == UNDO_EVENT || e.message == RESTORE_EVENT))
}

/// Requests served and failed between two balancer snapshots.
pub fn traffic_between(before: &Stats, after: &Stats) -> (u64, u64, BTreeMap<String, u64>) {
    let d = crate::analysis::delta(&after.total, &before.total);
    let unrouted = after.unrouted.saturating_sub(before.unrouted);
    // Client requests, not attempts: a retried request counts once, by its answer. A response
    // whose head came before and whose body was cut during the deployment (a stream at a
    // drain deadline) failed during it: it counts, so served is at least failed. A request
    // whose client gave up waiting for the backend's head got nothing: served and failed.
    let failed = d.failed() + unrouted;
    let served = (d.served() + unrouted).max(failed);
    // A release below its earlier count (with the totals going on, see `Traffic::between`)
    // was let go of by the proxy while idle and counts again from zero: everything it has
    // now was served since (its old counts are in the totals, as `Stats::retired`).
    let by_release = after
        .releases
        .iter()
        .map(|(r, c)| {
            let (now, was) = (
                c.served(),
                before.releases.get(r).map_or(0, Counters::served),
            );
            (r.clone(), if now < was { now } else { now - was })
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    (served, failed, by_release)
}

/// What a deployment reports of the traffic while it ran, from the balancer's counters before
/// and after it (`after`: `None` when they could not be read at the end).
#[derive(Debug, Default, PartialEq, Eq)]
struct Traffic {
    served: u64,
    failed: u64,
    by_release: BTreeMap<String, u64>,
    /// [`Report::counts`]: why the numbers are not the whole deployment's, if they are not.
    counts: Option<String>,
    /// What the report's notes should say about the counts.
    notes: Vec<String>,
}

impl Traffic {
    fn between(before: &Stats, after: Option<&Stats>, taken_over: bool) -> Traffic {
        let Some(after) = after else {
            return Traffic {
                counts: Some(format!(
                    "{}: the balancer's counters could not be read at the end",
                    crate::report::COUNTS_NOT_KNOWN
                )),
                ..Traffic::default()
            };
        };
        let restarted = after.counting_since_ms != before.counting_since_ms
            || after.total.requests < before.total.requests
            || after.unrouted < before.unrouted;
        // After a restart the old counts are gone: what the new counters hold is everything
        // known since (subtracting the old ones from them would mean nothing).
        let baseline = if restarted {
            Stats {
                counting_since_ms: after.counting_since_ms,
                ..Stats::default()
            }
        } else {
            before.clone()
        };
        let (served, failed, by_release) = traffic_between(&baseline, after);
        // A proxy replaced by `--takeover` that died while draining never said what it was
        // finishing: the counts go on (what it handed over is right), without those.
        let lost = !restarted && after.lost_drains > before.lost_drains;
        let mut notes = Vec::new();
        let counts = if restarted {
            // The proxy restarted, or a --takeover lost the old proxy's counts: its counters
            // began again.
            notes.push(
                "the balancer's counters restarted during the deployment (a proxy restart, an HAProxy reload or restart, or a --takeover whose old proxy did not hand over its counts): the request counts cover only the time since".into(),
            );
            Some("only since the balancer's counters restarted during the deployment".to_string())
        } else if taken_over {
            Some(
                "only since this command took the interrupted deployment over: the traffic before the interruption was not counted"
                    .to_string(),
            )
        } else if lost {
            Some(
                "without the requests a proxy replaced by --takeover was still finishing when it died"
                    .to_string(),
            )
        } else {
            None
        };
        if lost {
            notes.push(
                "a balancer proxy replaced by `cutover proxy --takeover` during the deployment died while it drained, before it reported the requests it was still finishing: those are in neither count above, and how many there were and how they ended is not known".into(),
            );
        }
        Traffic {
            served,
            failed,
            by_release,
            counts,
            notes,
        }
    }
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

/// A host whose new instance started ([`Deployer::start_new`]); `serving`: it was already
/// serving the release, healthy in the balancer, so there is nothing to admit.
pub struct Started {
    pub moved: Moved,
    pub serving: bool,
    /// In place: the release the host served until it was emptied for the new instance (what
    /// a failure starts again).
    pub emptied: Option<Name>,
}

/// A host whose new instance is healthy and in the balancer ([`Deployer::admit_new`]).
pub struct Moved {
    pub instance: Instance,
    /// The balancer's backends as read before the new one was added: the host's others are
    /// what step 4 retires.
    pub backends: Vec<crate::balancer::BackendView>,
}

/// The longest the previous batch's settles wait for the next batch's apps to answer: a slow
/// app is past the CPU burst of its start by then, and the previous batch's old backends (their
/// retire is part of the settle) should not keep serving beside the new ones for a whole gate
/// deadline when an app never answers.
const SETTLE_HOLD_MAX: Duration = Duration::from_millis(200);

/// Settles running in the background while a rolling deployment goes on. Those of a batch wait
/// until they are released: once every instance of the next batch has answered its first health
/// check or failed, or after [`SETTLE_HOLD_MAX`] ([`Settling::release_when`]), or when the
/// rolling loop waits for them.
#[derive(Default)]
struct Settling {
    tasks: Vec<tokio::task::JoinHandle<Result<(), HostFailure>>>,
    /// Holds back the settles spawned since the last release.
    go: Option<tokio::sync::watch::Sender<bool>>,
}

/// Where a moved host's old backends stand when its settle is spawned.
enum Retire {
    /// Still in the balancer: the settle retires them first.
    Later(Vec<crate::balancer::BackendView>),
    /// Retired in the batch; these could not be.
    Done(Vec<Unretired>),
}

/// An old instance whose backend could not be taken out of the balancer: it is left running,
/// since stopping it would fail the requests the balancer still routes to it.
pub struct Unretired {
    /// `<release>-<port>`, as its pid file is named.
    instance: String,
    backend: String,
    why: String,
}

impl Settling {
    fn spawn(
        &mut self,
        deployer: &Deployer,
        run: &Run,
        label: String,
        host: &Host,
        keep: Instance,
        retire: Retire,
    ) {
        let (deployer, run, host) = (deployer.clone(), run.clone(), host.clone());
        let mut go = self
            .go
            .get_or_insert_with(|| tokio::sync::watch::channel(false).0)
            .subscribe();
        self.tasks.push(tokio::spawn(async move {
            // Released, or the sender is gone: either way, go.
            let _ = go.wait_for(|released| *released).await;
            let unretired = match retire {
                Retire::Later(backends) => {
                    deployer
                        .retire_backends(&run, &label, &host, &keep, Some(&backends))
                        .await
                }
                Retire::Done(unretired) => unretired,
            };
            deployer
                .settle_host(&run, &label, &host, &keep, &unretired)
                .await
        }));
    }

    /// Lets every settle spawned so far run once each of `answered` has been told or dropped,
    /// or after [`SETTLE_HOLD_MAX`].
    fn release_when(&mut self, answered: Vec<tokio::sync::oneshot::Receiver<()>>) {
        if let Some(go) = self.go.take() {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(SETTLE_HOLD_MAX, join_all(answered)).await;
                let _ = go.send(true);
            });
        }
    }

    /// Lets every settle spawned so far run.
    fn release(&mut self) {
        if let Some(go) = self.go.take() {
            let _ = go.send(true);
        }
    }

    /// Waits for every settle started so far; returns the hosts that could not be settled.
    async fn wait(&mut self) -> Vec<HostFailure> {
        self.release();
        let mut failed = Vec::new();
        for task in self.tasks.drain(..) {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(f)) => failed.push(f),
                Err(e) => failed.push(HostFailure {
                    host: "fleet".into(),
                    reason: format!("settling a host stopped unexpectedly: {e}"),
                }),
            }
        }
        failed
    }
}

/// A full git commit id (40 hex digits), which no push can move.
fn is_full_commit_id(v: &str) -> bool {
    v.len() == 40 && v.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held() -> (Settling, tokio::sync::watch::Receiver<bool>) {
        let (go, released) = tokio::sync::watch::channel(false);
        let settling = Settling {
            tasks: Vec::new(),
            go: Some(go),
        };
        (settling, released)
    }

    #[tokio::test]
    async fn settles_go_when_every_new_instance_has_answered() {
        let (mut settling, mut released) = held();
        let (a, a_told) = tokio::sync::oneshot::channel::<()>();
        let (b, b_told) = tokio::sync::oneshot::channel::<()>();
        settling.release_when(vec![a_told, b_told]);
        a.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!*released.borrow(), "one instance still boots");
        drop(b); // its gate ended without an answer
        tokio::time::timeout(Duration::from_millis(100), released.wait_for(|r| *r))
            .await
            .expect("released once both are settled")
            .unwrap();
    }

    #[tokio::test]
    async fn an_instance_that_never_answers_holds_them_back_at_most_the_cap() {
        let (mut settling, mut released) = held();
        let (_never, never_told) = tokio::sync::oneshot::channel::<()>();
        let start = tokio::time::Instant::now();
        settling.release_when(vec![never_told]);
        tokio::time::timeout(Duration::from_secs(2), released.wait_for(|r| *r))
            .await
            .expect("released by the cap")
            .unwrap();
        let held_for = start.elapsed();
        assert!(
            held_for >= SETTLE_HOLD_MAX && held_for < SETTLE_HOLD_MAX * 3,
            "held for {held_for:?}"
        );
    }

    /// Counters as the proxy reports them: `ok` answers of `release` since `since`.
    fn stats(since: u64, release: &str, ok: u64) -> Stats {
        let c = Counters {
            requests: ok,
            status_2xx: ok,
            ..Counters::default()
        };
        Stats {
            releases: [(release.to_string(), c.clone())].into(),
            total: c,
            counting_since_ms: since,
            ..Stats::default()
        }
    }

    /// Regression: a `--takeover` whose old proxy died draining used to restart the counting
    /// start, so the report counted the balancer's whole history ("750487 served") as its own
    /// and said the counters had restarted, which they had not. The counts go on: the delta is
    /// right, and the report says only that the dead proxy's last requests are missing.
    #[test]
    fn a_takeover_whose_old_proxy_died_draining_keeps_the_delta_and_says_what_is_missing() {
        let before = stats(1_000, "v1", 750_000);
        let mut after = stats(1_000, "v1", 750_400);
        after.lost_drains = 1;
        let t = Traffic::between(&before, Some(&after), false);
        assert_eq!((t.served, t.failed), (400, 0), "{t:?}");
        assert_eq!(t.by_release, [("v1".to_string(), 400)].into());
        let counts = t.counts.as_deref().unwrap_or_default();
        assert!(counts.contains("died"), "{t:?}");
        assert!(!counts.contains("restarted"), "{t:?}");
        assert!(
            t.notes.iter().any(|n| n.contains("--takeover")
                && n.contains("not known")
                && !n.contains("restarted")),
            "{t:?}"
        );
        // A lost drain before the deployment began is none of its business.
        let mut before = before;
        before.lost_drains = 1;
        let t = Traffic::between(&before, Some(&after), false);
        assert_eq!((t.served, t.counts, t.notes), (400, None, Vec::new()));
    }

    /// A host whose port lookups time out (`calls` counts them).
    struct Hung {
        calls: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Transport for Hung {
        async fn run(
            &self,
            _: &Host,
            _: &str,
            _: Duration,
        ) -> anyhow::Result<crate::transport::Output> {
            unreachable!()
        }
        async fn copy_dir(
            &self,
            _: &Host,
            _: &std::path::Path,
            _: &std::path::Path,
        ) -> anyhow::Result<()> {
            unreachable!()
        }
        async fn free_port(&self, host: &Host) -> anyhow::Result<u16> {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err(crate::transport::TimedOut(format!(
                "host {}: command did not finish within 5s",
                host.name
            ))
            .into())
        }
    }

    /// Regression: when the port lookup made ahead had timed out, the start looked again
    /// from scratch, and a hung host cost the timeout twice.
    #[tokio::test]
    async fn a_timed_out_port_lookup_is_not_repeated() {
        let hung = Arc::new(Hung {
            calls: Default::default(),
        });
        let d = tempfile::tempdir().unwrap();
        let host = Host::for_test(d.path());
        let (t, h) = (hung.clone(), host.clone());
        let ahead = tokio::spawn(async move { t.free_port(&h).await });
        let e = port_after_lookup(Some(ahead), hung.as_ref(), &host)
            .await
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("did not finish within 5s"),
            "{e:#}"
        );
        assert_eq!(hung.calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    /// A rollback to a release the proxy had let go of while it was idle (its counts moved
    /// to `retired`, the release counts again from zero): the totals go on, so this is no
    /// restart, and the release's requests are all counted, not floored at zero.
    #[test]
    fn a_release_the_proxy_let_go_of_counts_again_from_zero() {
        let mut before = stats(1_000, "v2", 900);
        let v1 = before.releases["v2"].clone();
        before.releases.insert("v1".into(), v1.clone());
        before.total.add(&v1);
        let mut after = stats(1_000, "v2", 950);
        after.retired = v1.clone();
        let again = Counters {
            requests: 40,
            status_2xx: 40,
            ..Counters::default()
        };
        after.releases.insert("v1".into(), again.clone());
        after.total.add(&v1);
        after.total.add(&again);
        let t = Traffic::between(&before, Some(&after), false);
        assert_eq!(t.counts, None, "{t:?}");
        assert_eq!((t.served, t.failed), (90, 0), "{t:?}");
        assert_eq!(
            t.by_release,
            [("v1".to_string(), 40), ("v2".to_string(), 50)].into()
        );
    }

    #[test]
    fn a_restart_counts_from_the_new_start_and_says_so() {
        let before = stats(1_000, "v1", 500);
        let after = stats(2_000, "v1", 30);
        let t = Traffic::between(&before, Some(&after), false);
        assert_eq!(t.served, 30);
        assert!(
            t.counts
                .as_deref()
                .unwrap_or_default()
                .contains("restarted")
        );
        let t = Traffic::between(&before, None, false);
        assert!(crate::report::counts_unknown(t.counts.as_deref().unwrap()));
    }
}
