//! `cutover deploy`, `cutover rollback` and `cutover readmit`: the deploy lock, the deployment
//! itself and its report; and the commands (`promote`, `abort`, `pause`, `resume`) sent to a running one.

use std::io::Write;
use std::sync::Arc;

use crate::config::{Config, Name};
use crate::deploy::{Report, Request};
use crate::fleet_lock::{FleetLock, FleetLockHeld};
use crate::journal::{Journal, LockHeld, LockHolder, Taken};
use crate::progress::Progress;
use crate::transport::Transport;

use super::deployer;

/// A version read back from the journal (`whose`: which record), checked as a name: a bad one
/// names the record and the journal, not a `--version` the user did not give.
fn recorded_version(version: &str, whose: &str, journal: &std::path::Path) -> anyhow::Result<Name> {
    Name::parse(version).map_err(|e| {
        anyhow::anyhow!(
            "{whose} in {} records the version {version:?}, which cannot be deployed: {e}",
            journal.display()
        )
    })
}

/// Refuses, before the lock is taken and anything is recorded, a version whose release can be
/// found nowhere: not in `release.path` (a git ref is resolved by the deploy itself) and in no
/// deployment of this app the journal remembers (which may still be staged on the hosts). A
/// typo is an input error, not a deployment that fails on every host and rolls back.
pub(super) fn check_release_known(
    config: &Config,
    version: &Name,
    flag: &str,
) -> anyhow::Result<()> {
    if config.release.git.is_some() {
        return Ok(());
    }
    let dir = config.release_source(version);
    if dir.is_dir() {
        return Ok(());
    }
    let known = if config.state_dir.join("journal.db").is_file() {
        Journal::open(&config.state_dir)?.known_releases(config.app.name.as_str())?
    } else {
        Vec::new()
    };
    if known.iter().any(|v| v == version.as_str()) {
        return Ok(());
    }
    let seen = if known.is_empty() {
        String::new()
    } else {
        format!(" (deployed before: {})", known.join(", "))
    };
    anyhow::bail!(
        "{flag} {version}: no such release: {} is not a directory (release.path in {}), and no deployment of {} went to {version}{seen}; build the release there first, or check the name",
        dir.display(),
        config.file.display(),
        config.app.name
    )
}

/// What `deploy_cmd` is asked to do.
pub(super) enum Action {
    Deploy(Name),
    Resume,
    Rollback(Option<Name>),
    /// `cutover readmit`: see [`crate::readmit`].
    Readmit,
}

/// Holds the deploy lock (the journal's, and the fleet's once the deployer has taken it) and
/// renews both leases until released or dropped.
pub(crate) struct LockGuard {
    journal: Arc<Journal>,
    app: String,
    me: LockHolder,
    renew: tokio::task::JoinHandle<()>,
    fleet: Arc<FleetLock>,
    transport: Arc<dyn Transport>,
}

impl LockGuard {
    /// Who holds it: for a cleanup that must release it where `Drop` never runs (an exit on
    /// a signal).
    pub(crate) fn holder(&self) -> LockHolder {
        self.me.clone()
    }

    /// The fleet's lock, for the deployer to take in its first read of the fleet.
    pub(crate) fn fleet(&self) -> Arc<FleetLock> {
        self.fleet.clone()
    }

    /// Releases the fleet lock from a cleanup run at an exit on a signal, which skips `Drop`
    /// and [`LockGuard::release`] (see `bounded::at_signal_exit`): through the running
    /// runtime from the blocking thread cleanups run on, within 5 s.
    pub(crate) fn fleet_release_blocking(&self) -> impl Fn() + Send + 'static {
        let (fleet, transport) = (self.fleet.clone(), self.transport.clone());
        let rt = tokio::runtime::Handle::current();
        move || {
            let release = fleet.release(transport.as_ref());
            let _ = rt.block_on(tokio::time::timeout(
                std::time::Duration::from_secs(5),
                release,
            ));
        }
    }

    /// Releases the fleet lock (one round trip), then the journal's.
    pub(crate) async fn release(self) {
        self.renew.abort();
        self.fleet.release(self.transport.as_ref()).await;
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.renew.abort();
        // Not released on the way here (an early return): released in the background.
        if self.fleet.is_held() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let (fleet, transport) = (self.fleet.clone(), self.transport.clone());
                rt.spawn(async move { fleet.release(transport.as_ref()).await });
            }
        }
        let _ = self.journal.unlock(&self.app, &self.me);
    }
}

/// Takes the deploy lock, waiting up to `wait` for another holder. The fleet's lock comes with
/// it, not yet taken: the deployer takes it (through `transport`) in its first read of the
/// fleet, waiting as long (see [`crate::fleet_lock`]).
pub(crate) async fn take_lock(
    journal: &Arc<Journal>,
    config: &Config,
    what: &str,
    wait: Option<std::time::Duration>,
    transport: Arc<dyn Transport>,
) -> anyhow::Result<LockGuard> {
    let app = config.app.name.to_string();
    let me = LockHolder::me(what);
    // Waits for the fleet's lock within what is left of `wait` once the journal's is taken.
    let fleet = Arc::new(FleetLock::new(config, me.clone(), wait, journal.clone()));
    // A wait beyond what an Instant can hold waits as long as it can.
    let now = std::time::Instant::now();
    let deadline = now
        .checked_add(wait.unwrap_or_default())
        .unwrap_or_else(|| now + std::time::Duration::from_secs(100 * 365 * 24 * 3600));
    let mut told = false;
    loop {
        match journal.lock(&app, &me, config.lock_lease) {
            Ok(taken) => {
                if let Taken::TookOver(h, why) = taken {
                    eprintln!("took over a stale deploy lock ({why}): {}", h.describe());
                }
                break;
            }
            Err(e) => {
                let Some(held) = e.downcast_ref::<LockHeld>() else {
                    return Err(e);
                };
                if std::time::Instant::now() >= deadline {
                    let hint = if wait.is_some() {
                        "it was still held when --lock-wait ran out"
                    } else {
                        "wait for it to finish, pass --lock-wait 10m to wait, or `cutover unlock --force` if you are sure it is gone"
                    };
                    anyhow::bail!(
                        "another deployment holds the lock: {}: {hint}",
                        held.holder.describe()
                    );
                }
                if !told {
                    eprintln!("waiting for the deploy lock: {}", held.holder.describe());
                    told = true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
        }
    }
    let renew = {
        // Commands sent from other machines (see `crate::fleet_control`), posted into this
        // journal once the deployment is recorded there.
        let inbox = {
            let (journal, app) = (journal.clone(), app.clone());
            let (fleet, transport) = (fleet.clone(), transport.clone());
            async move {
                let mut inbox = crate::fleet_control::Inbox::default();
                let mut waiting: Vec<crate::fleet_control::Sent> = Vec::new();
                let mine = fleet.holder_line();
                loop {
                    tokio::time::sleep(crate::fleet_control::POLL).await;
                    let Some(host) = fleet.held_on() else {
                        continue;
                    };
                    let read = tokio::time::timeout(
                        crate::fleet_control::POLL * 5,
                        inbox.poll(transport.as_ref(), &host, &mine),
                    );
                    if let Ok(Ok(sent)) = read.await {
                        waiting.extend(sent);
                    }
                    if waiting.is_empty() {
                        continue;
                    }
                    let Ok(Some(row)) = journal.unfinished(&app) else {
                        continue;
                    };
                    for sent in waiting.drain(..) {
                        if journal.post_command(&row.id, &sent.command).is_ok() {
                            eprintln!(
                                "received `{}` from {} (sent through host {})",
                                sent.command, sent.from, host.name
                            );
                        }
                    }
                }
            }
        };
        let journal = journal.clone();
        let (app, me, lease) = (app.clone(), me.clone(), config.lock_lease);
        let (fleet, transport) = (fleet.clone(), transport.clone());
        let in_journal = async move {
            let mut warned = false;
            loop {
                tokio::time::sleep(lease / 3).await;
                if let Ok(false) = journal.renew(&app, &me, lease) {
                    if !warned {
                        eprintln!(
                            "WARNING: this deploy lost its deploy lock: another machine's deploy took it after this one's lease expired (see `cutover lock`); two deploys may now change the fleet at once"
                        );
                        warned = true;
                    }
                }
            }
        };
        // Apart, so that a host that hangs never holds back the journal's renewal; a host
        // that does not answer is tried again at the next one.
        let on_fleet = async move {
            let mut warned = false;
            loop {
                tokio::time::sleep(lease / 3).await;
                let renewed = tokio::time::timeout(lease / 3, fleet.renew(transport.as_ref()));
                if let Ok(Ok(false)) = renewed.await {
                    if !warned {
                        eprintln!(
                            "WARNING: this deploy lost its fleet lock: another deploy took it after this one's lease expired, or `cutover unlock --force` removed it (see `cutover lock`); two deploys may now change the fleet at once"
                        );
                        warned = true;
                    }
                }
            }
        };
        tokio::spawn(async move {
            tokio::join!(in_journal, on_fleet, inbox);
        })
    };
    Ok(LockGuard {
        journal: journal.clone(),
        app,
        me,
        renew,
        fleet,
        transport,
    })
}

/// What `cutover deploy --resume` does with an interrupted deployment of `strategy`: a rolling
/// deploy goes on from where it stopped; a canary or blue-green cannot (its steps, weights and
/// green set lived in the killed process), so it is undone and started again.
pub(super) fn resume_does(strategy: &str) -> &'static str {
    match strategy {
        "canary" | "blue-green" => {
            "to return every host and start it again from the beginning (a canary or blue-green cannot go on mid-way)"
        }
        _ => "to finish it",
    }
}

/// What is left of an unfinished deployment and how to finish it, for a deployer that stops
/// before its end (a signal, an error such as a balancer that stayed away).
fn what_next(journal: &Journal, row: &crate::journal::DeploymentRow) -> String {
    let going_back =
        row.kind == "rollback" || crate::deploy::was_going_back(journal, &row.id).unwrap_or(false);
    let next = if going_back {
        "it was returning hosts: run `cutover rollback` (or `cutover deploy --resume`) to finish that"
            .to_string()
    } else {
        format!(
            "run `cutover deploy --resume` {}, or `cutover rollback` to return every host to where it was",
            resume_does(&row.strategy)
        )
    };
    format!(
        "{} {} stays unfinished in the journal: {next} (`cutover status` shows where it stopped)",
        if row.kind == "rollback" {
            "rollback"
        } else {
            "deployment"
        },
        row.id
    )
}

/// An error that ended a deployment's run before its report: says whether the deployment
/// stays unfinished (and how to finish it) or never began (nothing to resume).
fn with_next_step(journal: &Journal, app: &str, e: anyhow::Error) -> anyhow::Error {
    // Its message says what to do; and it came before anything began.
    if e.is::<FleetLockHeld>() {
        return e;
    }
    match journal.unfinished(app) {
        Ok(Some(row)) => anyhow::anyhow!("{e:#}; {}", what_next(journal, &row)),
        Ok(None) => anyhow::anyhow!(
            "{e:#}; this stopped before the deployment began: no host changed and there is nothing to resume, run the command again once that is fixed"
        ),
        Err(_) => e,
    }
}

pub(super) async fn deploy_cmd(
    config: Config,
    action: Action,
    lock_wait: Option<std::time::Duration>,
    json: bool,
) -> anyhow::Result<u8> {
    let journal = Arc::new(Journal::open(&config.state_dir)?);
    let what = match &action {
        Action::Deploy(v) => format!("deploy {v}"),
        Action::Resume => "deploy --resume".to_string(),
        Action::Rollback(Some(v)) => format!("rollback to {v}"),
        Action::Rollback(None) => "rollback".to_string(),
        Action::Readmit => "readmit".to_string(),
    };
    // Commands and local sessions lead their own process groups: Ctrl-C must still end them.
    tokio::spawn(crate::bounded::stop_groups_on_signal());
    let config = Arc::new(config);
    let mut deployer = deployer(config.clone(), journal.clone(), Progress::new(json))?;
    deployer.warm();
    let lock = take_lock(
        &journal,
        &config,
        &what,
        lock_wait,
        deployer.transport.clone(),
    )
    .await?;
    deployer.fleet_lock = Some(lock.fleet());
    let done = under_lock(&config, &journal, &deployer, &lock, action, json).await;
    if crate::bounded::signalled() {
        // A signal is ending the process: its handler runs the cleanups (the locks, the
        // message that says where the deployment stopped) and exits with the signal's code.
        // Whatever the deployer made of the steps the signal cut short is not the outcome.
        std::future::pending::<()>().await;
    }
    match done {
        Ok(Done::Report {
            report,
            asked_to_restore,
        }) => {
            // The fleet lock goes (a round trip) while the journal is pruned and the report
            // written.
            let released = tokio::spawn(lock.release());
            let _ = journal.prune(config.app.name.as_str(), config.history_keep);
            // The HTML deploy report (`cutover show ID --html`); a failure to write it is not
            // the deploy's.
            let _ = crate::report::write_report(&journal, &report.id, &[]);
            let _ = released.await;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print_report(&report);
            }
            if asked_to_restore && report.outcome == crate::deploy::Outcome::RolledBack {
                return Ok(0);
            }
            Ok(report.outcome.exit_code())
        }
        Ok(Done::Exit(code)) => {
            lock.release().await;
            Ok(code)
        }
        Err(e) => {
            lock.release().await;
            Err(e)
        }
    }
}

/// How a command under the lock ended.
enum Done {
    /// A deployment ran to this report; `asked_to_restore`: `cutover rollback` of an
    /// interrupted deployment, for which "rolled back" is success.
    Report {
        report: Box<Report>,
        asked_to_restore: bool,
    },
    /// Nothing to deploy (a readmit that found nothing missing): the exit code.
    Exit(u8),
}

/// [`deploy_cmd`] once the journal's lock is held (the deployer takes the fleet's).
async fn under_lock(
    config: &Arc<Config>,
    journal: &Arc<Journal>,
    deployer: &crate::deploy::Deployer,
    lock: &LockGuard,
    action: Action,
    json: bool,
) -> anyhow::Result<Done> {
    let stopped = crate::bounded::stop_groups_left_behind(&config.state_dir);
    if stopped > 0 {
        eprintln!(
            "stopped {stopped} command(s) (a verify suite, a hook or a build, with what they started) that a killed deploy left running"
        );
    }
    crate::bounded::list_groups_under(&config.state_dir);
    // Ctrl-C ends the deployment where it is (the journal knows where): say what comes next,
    // and free the lock (the exit skips `LockGuard`'s drop, which left it to a dead holder).
    // The fleet's lock goes first (a round trip, while the deployer may still be finishing a
    // step: what is said is what the journal held when the signal came), then the journal's.
    let _interrupted = {
        let (state_dir, app) = (config.state_dir.clone(), config.app.name.to_string());
        let holder = lock.holder();
        let release_fleet = lock.fleet_release_blocking();
        crate::bounded::at_signal_exit(move || {
            let Ok(journal) = Journal::open(&state_dir) else {
                release_fleet();
                return;
            };
            let next = match journal.unfinished(&app) {
                Ok(Some(row)) => Some(what_next(&journal, &row)),
                _ => None,
            };
            release_fleet();
            let _ = journal.unlock(&app, &holder);
            if let Some(next) = next {
                eprintln!("interrupted: {next}");
            }
        })
    };
    // We hold the lock, so an unfinished deployment in the journal is not running: it was interrupted.
    let interrupted = journal.unfinished(config.app.name.as_str())?;
    if let Some(row) = &interrupted {
        row.recoverable()?;
    }
    // `cutover rollback` of an interrupted deployment asked for exactly what "rolled back" says.
    let asked_to_restore = matches!(action, Action::Rollback(_)) && interrupted.is_some();
    // An interrupted deployment that had begun going back (an abort, a spent budget, or an
    // earlier `cutover rollback` of it) is finished by going back, whichever command asks.
    let going_back = match &interrupted {
        Some(row) if row.kind != "rollback" => crate::deploy::was_going_back(journal, &row.id)?,
        _ => false,
    };
    let app = config.app.name.as_str();
    // A deployer error, with whether the deployment stays unfinished and how to finish it.
    let next_step = |e| with_next_step(journal, app, e);
    let report = match (action, interrupted) {
        (Action::Deploy(_) | Action::Readmit, Some(row))
            if going_back || row.kind == "rollback" =>
        {
            anyhow::bail!(
                "{} {} ({} -> {}) was interrupted while it returned hosts to {}: run `cutover rollback` (or `cutover deploy --resume`) to finish that",
                if row.kind == "rollback" {
                    "rollback"
                } else {
                    "deployment"
                },
                row.id,
                row.from.as_deref().unwrap_or("(nothing)"),
                row.to,
                if row.kind == "rollback" {
                    row.to.as_str()
                } else {
                    row.from.as_deref().unwrap_or("where they were")
                },
            );
        }
        (Action::Deploy(_) | Action::Readmit, Some(row)) => {
            // The step it stopped in: the newest unfinished one (steps run in parallel, so
            // the newest of all may be a background settle that ended).
            let steps = journal.steps(&row.id)?;
            let last = steps
                .iter()
                .rev()
                .find(|s| s.result.is_none())
                .or(steps.last());
            let at = last.map_or("before its first step".to_string(), |s| {
                format!(
                    "at step \"{} {} {}\"{}",
                    s.host,
                    s.action,
                    s.detail,
                    if s.result.is_none() {
                        " (unfinished)"
                    } else {
                        ""
                    }
                )
            });
            anyhow::bail!(
                "deployment {} ({} -> {}) was interrupted {at}: run `cutover deploy --resume` {}, or `cutover rollback` to return every host to where it was",
                row.id,
                row.from.as_deref().unwrap_or("(nothing)"),
                row.to,
                resume_does(&row.strategy)
            );
        }
        (Action::Deploy(version), None) => deployer
            .run(&Request::deploy(version))
            .await
            .map_err(next_step)?,
        (Action::Readmit, None) => {
            // Read under the lock (the fleet's too): no deployment moves the fleet meanwhile.
            deployer.hold_fleet_lock().await?;
            let plan =
                crate::readmit::plan(config, journal, &deployer.transport, &deployer.balancer)
                    .await?;
            let said = plan.describe(config);
            let crate::readmit::Plan::Readmit { version, hosts } = plan else {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({ "outcome": "nothing_to_readmit", "message": said })
                    );
                } else {
                    println!("{said}");
                }
                return Ok(Done::Exit(0));
            };
            deployer.progress.say(&said);
            let mut readmitter = crate::deploy::Deployer::new(
                Arc::new(crate::readmit::config_for(config, &hosts)),
                deployer.transport.clone(),
                deployer.balancer.clone(),
                journal.clone(),
                deployer.progress.clone(),
            );
            readmitter.fleet_lock = deployer.fleet_lock.clone();
            readmitter
                .run(&Request::readmit(version))
                .await
                .map_err(next_step)?
        }
        (Action::Resume, Some(row)) if going_back => {
            deployer.progress.say(&format!(
                "deployment {} was returning its hosts when it stopped: finishing that (--resume never moves a fleet forward that had begun going back)",
                row.id
            ));
            deployer.restore(&row).await.map_err(next_step)?
        }
        (Action::Resume, Some(row))
            if row.kind != "rollback"
                && matches!(row.strategy.as_str(), "canary" | "blue-green") =>
        {
            // A canary or blue-green cannot pick up mid-way (its steps, weights, analysis and
            // green set lived in the killed process): undo what it left, then start it again.
            let version =
                recorded_version(&row.to, &format!("deployment {}", row.id), journal.path())?;
            deployer.progress.say(&format!(
                "{} deployment {} cannot continue where it stopped: returning every host to where it was, then starting {version} again",
                row.strategy, row.id
            ));
            let since = crate::journal::now_ms();
            let undone = deployer.restore(&row).await.map_err(next_step)?;
            if undone.outcome != crate::deploy::Outcome::RolledBack {
                undone
            } else if let Some(cmd) = journal.stop_posted_since(&row.id, since)? {
                // Sent while the hosts went back: whoever read it first, it asked for the
                // fleet to stay where it is now, not for the deployment to start again.
                deployer.progress.say(&format!(
                    "{cmd} requested while the interrupted deployment was undone: {version} is not started again"
                ));
                undone
            } else {
                deployer
                    .run(&Request::deploy(version))
                    .await
                    .map_err(next_step)?
            }
        }
        (Action::Resume, Some(row)) => {
            let version =
                recorded_version(&row.to, &format!("deployment {}", row.id), journal.path())?;
            // Commands sent to the deployer that was killed were never read: asking for
            // --resume came after them, so they are dropped, not carried out by the resumed run
            // at its first batch boundary (an abort after moving one more host, a pause that
            // parks it). Said, so nobody waits on them.
            for cmd in journal.drop_unread_commands(&row.id)? {
                deployer.progress.say(&format!(
                    "`cutover {cmd}` was sent to the interrupted deployer and never read: dropped, since --resume asks to go on (send it again to act on the resumed deployment)"
                ));
            }
            let kind = if row.kind == "rollback" {
                "rollback"
            } else {
                "deploy"
            };
            deployer
                .run(&Request {
                    version,
                    kind,
                    resume: Some(row),
                })
                .await
                .map_err(next_step)?
        }
        (Action::Resume, None) => {
            anyhow::bail!("there is no interrupted deployment to resume (see `cutover history`)")
        }
        (Action::Rollback(to), Some(row)) if row.kind == "rollback" => {
            // An interrupted rollback is finished, not undone: undoing it would send the
            // fleet forward to the release it was leaving.
            if let Some(v) = to.filter(|v| v.as_str() != row.to) {
                anyhow::bail!(
                    "rollback {} to {} was interrupted: `cutover rollback` finishes it first; --to {v} is not possible until then",
                    row.id,
                    row.to
                );
            }
            deployer.progress.say(&format!(
                "rollback {} to {} was interrupted: finishing it",
                row.id, row.to
            ));
            let version =
                recorded_version(&row.to, &format!("deployment {}", row.id), journal.path())?;
            deployer
                .run(&Request {
                    version,
                    kind: "rollback",
                    resume: Some(row),
                })
                .await
                .map_err(next_step)?
        }
        (Action::Rollback(to), Some(row)) => {
            if let Some(v) = to {
                anyhow::bail!(
                    "deployment {} was interrupted: `cutover rollback` returns every host to where it was before it; --to {v} is not possible until then",
                    row.id
                );
            }
            deployer.restore(&row).await.map_err(next_step)?
        }
        (Action::Rollback(to), None) => {
            let target = match to {
                Some(v) => v,
                None => {
                    let prev = journal.previous_release(config.app.name.as_str())?.ok_or_else(|| {
                        anyhow::anyhow!(
                            "no earlier release is recorded in the journal ({}): name one with `cutover rollback --to VERSION`",
                            journal.path().display()
                        )
                    })?;
                    recorded_version(&prev, "the earlier release", journal.path()).map_err(|e| {
                        anyhow::anyhow!("{e:#}; name one with `cutover rollback --to VERSION`")
                    })?
                }
            };
            deployer
                .run(&Request {
                    version: target,
                    kind: "rollback",
                    resume: None,
                })
                .await
                .map_err(next_step)?
        }
    };
    Ok(Done::Report {
        report: Box::new(report),
        asked_to_restore,
    })
}

/// The human summary of a deployment.
pub fn print_report(r: &Report) {
    let _ = std::io::stdout().lock().write_all(summary(r).as_bytes());
}

/// The text [`print_report`] prints.
fn summary(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} {} -> {}: {} in {:.1}s",
        r.kind,
        r.from.as_deref().unwrap_or("(nothing)"),
        r.to,
        r.outcome.words(),
        r.duration_ms as f64 / 1000.0
    );
    let (unchanged, moved): (Vec<&str>, Vec<&str>) = r
        .moved_hosts
        .iter()
        .map(String::as_str)
        .partition(|h| r.unchanged_hosts.iter().any(|u| u == h));
    let (readmitted, moved): (Vec<&str>, Vec<&str>) = moved
        .into_iter()
        .partition(|h| r.readmitted_hosts.iter().any(|u| u == h));
    if !moved.is_empty() {
        let _ = writeln!(out, "  moved: {}", moved.join(", "));
    }
    if !readmitted.is_empty() {
        let _ = writeln!(
            out,
            "  back in the balancer (running {}, not restarted): {}",
            r.to,
            readmitted.join(", ")
        );
    }
    if !unchanged.is_empty() {
        let _ = writeln!(
            out,
            "  already running {} (not restarted): {}",
            r.to,
            unchanged.join(", ")
        );
    }
    // "fleet": the build, a hook, a check of the whole fleet, no host's failure.
    let (of_fleet, of_hosts): (Vec<_>, Vec<_>) =
        r.failed_hosts.iter().partition(|f| f.host == "fleet");
    for f in of_fleet {
        let _ = writeln!(out, "  failed: {}", f.reason.replace('\n', "\n    "));
    }
    for (label, hosts) in [
        ("failed host", of_hosts),
        ("NOT ROLLED BACK", r.stuck_hosts.iter().collect()),
    ] {
        for f in hosts {
            let _ = writeln!(
                out,
                "  {label} {}: {}",
                f.host,
                f.reason.replace('\n', "\n    ")
            );
        }
    }
    for line in crate::report::Proof::of(r).lines() {
        let _ = writeln!(out, "  {line}");
    }
    out
}

/// The deployment that is running right now (its lock holder alive), if any.
pub(super) fn running_deployment(
    config: &Config,
) -> anyhow::Result<Option<crate::journal::DeploymentRow>> {
    let journal = Journal::open(&config.state_dir)?;
    let Some(row) = journal.unfinished(config.app.name.as_str())? else {
        return Ok(None);
    };
    let running = journal
        .lock_holder(config.app.name.as_str())?
        .is_some_and(|h| !h.is_gone());
    Ok(running.then_some(row))
}

/// Sends a command to the running deployment.
pub(super) fn control(config: &Config, command: &str) -> anyhow::Result<u8> {
    let typed = crate::control::typed(command);
    let Some(row) = running_deployment(config)? else {
        // A deployment run from another machine shows only in the fleet lock: the command
        // goes through the host that holds it (see `crate::fleet_control`).
        let sent = super::runtime()?.block_on(async {
            let transport = super::transport_for(config)?;
            crate::fleet_control::send_elsewhere(config, transport.as_ref(), command).await
        })?;
        if let Some(to) = sent {
            println!(
                "sent {typed} to the deployment of another machine: {}; it reads commands from host {} every {} s and acts on them as if typed there",
                to.holder,
                to.host,
                crate::fleet_control::POLL.as_secs()
            );
            return Ok(0);
        }
        anyhow::bail!(
            "no deployment is running (see `cutover status`): `cutover {typed}` applies to a running deployment"
        );
    };
    if let Some(why) = crate::control::pointless(&row.strategy, &row.kind, command) {
        anyhow::bail!("deployment {}: {why}", row.id);
    }
    let journal = Journal::open(&config.state_dir)?;
    journal.post_command(&row.id, command)?;
    println!(
        "sent {typed} to deployment {} ({} -> {})",
        row.id,
        row.from.as_deref().unwrap_or("-"),
        row.to
    );
    Ok(0)
}

/// Sends a command and waits until the deployment has ended; prints its outcome.
pub(super) fn wait_for_command(
    config: &Config,
    row: &crate::journal::DeploymentRow,
    command: &str,
    json: bool,
) -> anyhow::Result<u8> {
    let journal = Journal::open(&config.state_dir)?;
    journal.post_command(&row.id, command)?;
    eprintln!(
        "sent {command} to the running deployment {}; waiting for it to end",
        row.id
    );
    wait_for_end(config, row, json)
}

/// Waits until the deployment `row` has ended; prints its outcome (with `json`, its report as
/// one JSON line, as the deployer would have). Exit 0 when it rolled back or, for a rollback,
/// succeeded.
pub(super) fn wait_for_end(
    config: &Config,
    row: &crate::journal::DeploymentRow,
    json: bool,
) -> anyhow::Result<u8> {
    let journal = Journal::open(&config.state_dir)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        if let Some(d) = journal.deployment(&row.id)? {
            if let Some(outcome) = d.outcome {
                if json {
                    let report = d
                        .report
                        .clone()
                        .unwrap_or_else(|| serde_json::json!({ "id": row.id, "outcome": outcome }));
                    println!("{report}");
                } else {
                    println!(
                        "deployment {}: {}",
                        row.id,
                        crate::deploy::outcome_words(&outcome)
                    );
                    if let Some(notes) = d
                        .report
                        .as_ref()
                        .and_then(|r| r.get("notes"))
                        .and_then(|n| n.as_array())
                    {
                        for n in notes.iter().filter_map(|n| n.as_str()) {
                            println!("  {n}");
                        }
                    }
                }
                let back =
                    outcome == "rolled_back" || (row.kind == "rollback" && outcome == "succeeded");
                // A command the deployment never read (it sent its last batch or closed its
                // switch-back window first) did nothing: say so rather than let its outcome
                // read as the command's.
                let unread = journal.drop_unread_commands(&row.id)?;
                if let Some(cmd) = unread.iter().find(|c| *c == "rollback" || *c == "abort") {
                    eprintln!(
                        "the deployment ended before it read your {cmd}: the {cmd} did nothing{}",
                        if back {
                            String::new()
                        } else {
                            " (the fleet is where the deployment left it): run `cutover rollback` now to return it".to_string()
                        }
                    );
                }
                return Ok(if back { 0 } else { 1 });
            }
        }
        // The deployer died before it recorded an outcome (killed, or the machine's OOM
        // killer): nobody will, so waiting longer helps no one.
        let holder = journal.lock_holder(config.app.name.as_str())?;
        if holder.as_ref().is_none_or(|h| h.is_gone())
            && journal
                .deployment(&row.id)?
                .is_some_and(|d| d.outcome.is_none())
        {
            anyhow::bail!(
                "deployment {} stopped without finishing ({}): run `cutover rollback` again to return every host to where it was",
                row.id,
                holder.map_or("it holds no lock".to_string(), |h| format!(
                    "its process {} is gone",
                    h.pid
                ))
            );
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "deployment {} did not end within the 10 minutes this command waits; what you sent stays queued and takes effect when the deployment reads it (a rolling deploy at its next batch boundary): follow it with `cutover status`",
            row.id
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests no release answered (the balancer's own 502s) are part of the total: the
    /// per-release parts used not to add up to it ("14 served (v7: 13)").
    #[test]
    fn the_per_release_split_adds_up_to_what_was_served() {
        let r: Report = serde_json::from_value(serde_json::json!({
            "id": "1-2", "app": "a", "kind": "deploy", "from": "v6", "to": "v7",
            "outcome": "succeeded", "started_unix": 0, "duration_ms": 1000, "batches": [],
            "moved_hosts": ["web1"], "failed_hosts": [], "stuck_hosts": [],
            "served": 14, "failed_requests": 1, "served_by_release": {"v7": 13},
        }))
        .unwrap();
        assert!(
            summary(&r).contains("14 served, 1 failed (v7: 13, not attributed to a release: 1)"),
            "{}",
            summary(&r)
        );
    }

    /// Regression: with no release credited at all (every request answered by the balancer
    /// itself), the "not attributed" part was left out and the total stood unexplained.
    #[test]
    fn what_no_release_served_is_shown_when_no_release_served_anything() {
        let r: Report = serde_json::from_value(serde_json::json!({
            "id": "1-2", "app": "a", "kind": "deploy", "from": "v6", "to": "v7",
            "outcome": "rolled_back", "started_unix": 0, "duration_ms": 1000, "batches": [],
            "moved_hosts": [], "failed_hosts": [], "stuck_hosts": [],
            "served": 5, "failed_requests": 5, "served_by_release": {},
        }))
        .unwrap();
        assert!(
            summary(&r).contains("5 served, 5 failed (not attributed to a release: 5)"),
            "{}",
            summary(&r)
        );
    }
}
