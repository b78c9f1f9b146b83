//! `cutover status`, `history`, `show` and `logs`: what the fleet runs and what was deployed.

use crate::config::Config;
use crate::deploy::outcome_words;
use crate::fleet;
use crate::journal::Journal;
use crate::report::{Proof, counts_caveat, counts_unknown};

use super::{LogsArgs, connect};

/// `cutover status`; the exit code is 2 when the balancer or a host could not be read (what
/// could be read is shown all the same: a script must not take a partial picture for a whole
/// one), else 0.
pub(super) async fn status_cmd(config: Config, json: bool) -> anyhow::Result<u8> {
    let (transport, balancer) = connect(&config)?;
    // Without the balancer (after a reboot, say) the hosts and the journal still tell what
    // status is for, an interrupted deployment above all; only drift needs the balancer.
    // The fleet's lock beside: a deployment from another machine is in no journal here.
    let ((views, balancer_error), (fleet_lock, fleet_lock_others)) = tokio::join!(
        fleet::observe_even_without_balancer(&config, &transport, &balancer),
        crate::fleet_lock::read_all(&config, transport.as_ref())
    );
    // Drift is only checked on hosts that could be read: an unreadable host's instances are
    // not known, so "no drift" would be a guess.
    let unchecked: Vec<&str> = views
        .iter()
        .filter(|v| balancer_error.is_some() || v.error.is_some())
        .map(|v| v.host.name.as_str())
        .collect();
    let unreadable: Vec<&str> = views
        .iter()
        .filter(|v| v.error.is_some())
        .map(|v| v.host.name.as_str())
        .collect();
    let exit = if balancer_error.is_some() || !unreadable.is_empty() {
        2
    } else {
        0
    };
    let journal = Journal::open(&config.state_dir)?;
    let started = journal.started_instances()?;
    let lock = journal.lock_holder(config.app.name.as_str())?;
    let unfinished = journal.unfinished(config.app.name.as_str())?;
    // The releases an unfinished deployment moves hosts between (see `fleet::drift`).
    let moving: Vec<&str> = unfinished
        .iter()
        .flat_map(|row| {
            std::iter::once(row.to.as_str())
                .chain(row.previous.values().flatten().map(String::as_str))
        })
        .collect();
    let drift = match &balancer_error {
        None => fleet::drift(&views, &started, &moving),
        Some(_) => Vec::new(),
    };
    let deployment = unfinished.map(|row| {
        let running = lock.as_ref().is_some_and(|h| !h.is_gone());
        (row, running)
    });
    // A deploy that failed may have left hosts on its release (one it could not return):
    // nothing else here would say so while no deployment runs.
    let last_failed = match &deployment {
        Some(_) => None,
        None => journal
            .deployments(config.app.name.as_str(), 1)?
            .into_iter()
            .next()
            .filter(|row| row.outcome.as_deref() == Some("failed")),
    };
    if json {
        let lock_json = crate::fleet_lock::to_json(&fleet_lock, &fleet_lock_others);
        let hosts: Vec<serde_json::Value> = views
            .iter()
            .map(|v| {
                serde_json::json!({
                    "host": v.host.name.as_str(),
                    "address": v.host.address.to_string(),
                    "current": v.current,
                    "instances": v.instances.iter().map(|r| serde_json::json!({
                        "version": r.instance.version, "address": r.instance.address.to_string(),
                        "pid": r.instance.pid, "alive": r.alive, "background": r.background,
                    })).collect::<Vec<_>>(),
                    "backends": v.backends,
                    "error": v.error,
                })
            })
            .collect();
        let deployment = deployment.as_ref().map(|(row, running)| {
            serde_json::json!({ "id": row.id, "kind": row.kind, "from": row.from, "to": row.to, "strategy": row.strategy,
                "state": if *running { "running" } else { "interrupted" }, "status": row.status })
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "hosts": hosts,
                // Not checked without the balancer: null, never an empty "no drift".
                "drift": if balancer_error.is_none() { Some(&drift) } else { None },
                // The hosts `drift` does not cover (all of them without the balancer, else
                // those that could not be read): an empty `drift` is "no drift" only when
                // this is empty too.
                "drift_unchecked": unchecked,
                "deployment": deployment,
                "last_failed": last_failed.as_ref().map(|row| serde_json::json!({
                    "id": row.id, "kind": row.kind, "from": row.from, "to": row.to,
                })),
                "balancer_error": balancer_error,
                "fleet_lock": lock_json.0,
                // Locks on later hosts (taken by a machine that could not reach the first).
                "fleet_lock_others": lock_json.1,
            }))?
        );
        return Ok(exit);
    }
    if let Some(e) = &balancer_error {
        println!(
            "BALANCER UNREACHABLE: {e}\n(is the balancer running? the hosts and the journal follow; drift is not checked)\n"
        );
    }
    // Columns as wide as their longest entry: a branch deployed by push is a 40-character sha.
    let host_w = views
        .iter()
        .map(|v| v.host.name.as_str().len())
        .chain([12])
        .max()
        .unwrap_or(12);
    let cur_w = views
        .iter()
        .filter_map(|v| v.current.as_ref().map(String::len))
        .chain([10])
        .max()
        .unwrap_or(10);
    let inst_w = views
        .iter()
        .flat_map(|v| {
            let instances = v
                .instances
                .iter()
                .map(|r| format!("{}@{}", r.instance.version, r.instance.address).len());
            let backends = v
                .backends
                .iter()
                .map(|b| format!("{}@{}", b.spec.release, b.spec.address).len());
            instances.chain(backends)
        })
        .chain([22])
        .max()
        .unwrap_or(22);
    println!(
        "{:<host_w$} {:<cur_w$} {:<inst_w$} {:<8} {:<10} {:<10} {:>9} {:>6}",
        "HOST", "CURRENT", "INSTANCE", "PID", "BALANCER", "HEALTH", "REQUESTS", "FAILED"
    );
    for v in &views {
        // An unreadable host's instances and `current` are not known ("?"), but the
        // balancer's backends for it are: they tell whether it still takes traffic.
        let current = match &v.error {
            Some(e) => {
                // An SSH error ends with a hint line: keep it under the host's row.
                let line = format!("{:<host_w$} unreachable: {e}", v.host.name);
                println!("{}", continued(&line, host_w + 1));
                "?".to_string()
            }
            None => v.current.clone().unwrap_or_else(|| "-".into()),
        };
        let no_pid = if v.error.is_some() { "?" } else { "no pid" };
        if v.error.is_none() && v.instances.is_empty() && v.backends.is_empty() {
            println!("{:<host_w$} {:<cur_w$} (no instance)", v.host.name, current);
        }
        for r in &v.instances {
            let b = v
                .backends
                .iter()
                .find(|b| b.spec.id == r.instance.backend_id());
            println!(
                "{:<host_w$} {:<cur_w$} {:<inst_w$} {:<8} {:<10} {:<10} {:>9} {:>6}",
                v.host.name,
                current,
                format!("{}@{}", r.instance.version, r.instance.address),
                if r.background {
                    format!("{} bg", r.instance.pid)
                } else if r.alive {
                    r.instance.pid.to_string()
                } else {
                    format!("{} dead", r.instance.pid)
                },
                b.map_or("absent".into(), |b| format!("{:?}", b.state).to_lowercase()),
                b.map_or("-".into(), |b| format!("{:?}", b.health).to_lowercase()),
                b.map_or(0, |b| b.counters.requests),
                b.map_or(0, |b| b.counters.failed_attempts()),
            );
        }
        for b in v.backends.iter().filter(|b| {
            !v.instances
                .iter()
                .any(|r| r.instance.backend_id() == b.spec.id)
        }) {
            println!(
                "{:<host_w$} {:<cur_w$} {:<inst_w$} {:<8} {:<10} {:<10} {:>9} {:>6}",
                v.host.name,
                current,
                format!("{}@{}", b.spec.release, b.spec.address),
                no_pid,
                format!("{:?}", b.state).to_lowercase(),
                format!("{:?}", b.health).to_lowercase(),
                b.counters.requests,
                b.counters.failed_attempts(),
            );
        }
    }
    let backgrounded: Vec<String> = views
        .iter()
        .flat_map(|v| v.instances.iter().map(move |r| (v, r)))
        .filter(|(_, r)| r.background)
        .map(|(v, r)| {
            format!(
                "NOTE {}: {}@{} (pid {} bg): {}",
                v.host.name,
                r.instance.version,
                r.instance.address,
                r.instance.pid,
                crate::instance::BACKGROUND_HINT
            )
        })
        .collect();
    if !backgrounded.is_empty() {
        println!("\n{}", backgrounded.join("\n"));
    }
    if let Some((row, running)) = &deployment {
        if *running {
            println!(
                "\ndeployment {} running: {} -> {} ({})",
                row.id,
                row.from.as_deref().unwrap_or("-"),
                row.to,
                row.strategy
            );
            if let Some(st) = &row.status {
                println!("  {}", fleet::describe_status(st));
            }
        } else if row.kind == "rollback" {
            println!(
                "\nrollback {} ({} -> {}) was INTERRUPTED: `cutover rollback` (or `cutover deploy --resume`) finishes it; `cutover show {}` tells where it stopped",
                row.id,
                row.from.as_deref().unwrap_or("(nothing)"),
                row.to,
                row.id
            );
        } else if crate::deploy::was_going_back(&journal, &row.id)? {
            println!(
                "\ndeployment {} ({} -> {}) was INTERRUPTED while it returned hosts to {}: `cutover rollback` (or `cutover deploy --resume`) finishes that; `cutover show {}` tells where it stopped",
                row.id,
                row.from.as_deref().unwrap_or("(nothing)"),
                row.to,
                row.from.as_deref().unwrap_or("where they were"),
                row.id
            );
        } else {
            println!(
                "\ndeployment {} ({} -> {}) was INTERRUPTED: run `cutover deploy --resume` {}; `cutover rollback` undoes it; `cutover show {}` tells where it stopped",
                row.id,
                row.from.as_deref().unwrap_or("(nothing)"),
                row.to,
                super::deploy::resume_does(&row.strategy),
                row.id
            );
        }
    }
    if let Some((_, Some(_))) = &fleet_lock.on {
        // Said whoever holds it: from another machine, it is the only sign of its deployment.
        println!(
            "\n{}",
            fleet_lock
                .line()
                .replacen("fleet: ", "deploy lock on the fleet: ", 1)
        );
    }
    for (host, r) in &fleet_lock_others {
        println!(
            "deploy lock on the fleet: also held by {} (host {})",
            r.describe(),
            host.name
        );
    }
    if let Some(row) = &last_failed {
        // What `cutover rollback` would do, asked the way it asks.
        let back = journal.previous_release(config.app.name.as_str())?;
        let (what, next) = match (row.kind.as_str(), back) {
            ("rollback", _) => (
                "rollback",
                format!("`cutover rollback --to {}` tries again", row.to),
            ),
            (_, Some(back)) => (
                "deployment",
                format!("`cutover rollback` returns the fleet to {back}"),
            ),
            (_, None) => (
                "deployment",
                "no earlier release is recorded: `cutover rollback --to VERSION` names one"
                    .to_string(),
            ),
        };
        println!(
            "\nlast {what} {} ({} -> {}) FAILED: hosts may be left on either release; `cutover show {}` lists them, {next}",
            row.id,
            row.from.as_deref().unwrap_or("(nothing)"),
            row.to,
            row.id,
        );
    }
    print!(
        "{}",
        drift_report(balancer_error.is_some(), &drift, &unreadable, views.len())
    );
    Ok(exit)
}

/// What `cutover status` says about drift: what the journal does not explain on the hosts
/// that could be read, and which hosts could not be checked (only when some could not).
fn drift_report(no_balancer: bool, drift: &[String], unreadable: &[&str], hosts: usize) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if no_balancer {
        out.push_str("\ndrift not checked: the balancer could not be read\n");
        return out;
    }
    if drift.is_empty() && unreadable.is_empty() {
        out.push_str("\nno drift: hosts and balancer match the journal\n");
        return out;
    }
    if !drift.is_empty() {
        out.push_str("\nDRIFT (what the journal does not explain):\n");
        for d in drift {
            let _ = writeln!(out, "  - {d}");
        }
    } else if unreadable.len() < hosts {
        out.push_str("\nno drift on the hosts that could be read\n");
    }
    if !unreadable.is_empty() {
        let _ = writeln!(
            out,
            "\ndrift not checked on {}: could not be read (the error is in the table above; fix it and run `cutover status` again)",
            unreadable.join(", ")
        );
    }
    out
}

/// The deployment running now: the app's one without an outcome, while its deployer (the lock
/// holder) is still there. Without an outcome and without a deployer, it was interrupted.
fn running_id(journal: &Journal, config: &Config) -> anyhow::Result<Option<String>> {
    let app = config.app.name.as_str();
    let alive = journal.lock_holder(app)?.is_some_and(|h| !h.is_gone());
    Ok(journal.unfinished(app)?.filter(|_| alive).map(|row| row.id))
}

pub(super) fn print_history(config: &Config, json: bool) -> anyhow::Result<()> {
    let journal = Journal::open(&config.state_dir)?;
    let records = journal.deployments(config.app.name.as_str(), config.history_keep)?;
    let running = running_id(&journal, config)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&records)?);
        return Ok(());
    }
    if records.is_empty() {
        println!("no deployments recorded in {}", journal.path().display());
        return Ok(());
    }
    // FROM and TO as wide as their longest version (a pushed branch is a 40-character sha).
    let ver_w = records
        .iter()
        .flat_map(|r| [r.from.as_deref().unwrap_or("-").len(), r.to.len()])
        .chain([10])
        .max()
        .unwrap_or(10);
    println!(
        "{:<20} {:<9} {:<11} {:<ver_w$} {:<ver_w$} {:<12} {:>8} {:>9} {:>7}",
        "ID", "KIND", "STRATEGY", "FROM", "TO", "OUTCOME", "SECONDS", "SERVED", "FAILED"
    );
    for r in &records {
        let num = |k: &str| {
            r.report
                .as_ref()
                .and_then(|v| v.get(k))
                .and_then(|v| v.as_u64())
        };
        println!(
            "{:<20} {:<9} {:<11} {:<ver_w$} {:<ver_w$} {:<12} {:>8} {:>9} {:>7}",
            r.id,
            r.kind,
            r.strategy,
            r.from.as_deref().unwrap_or("-"),
            r.to,
            r.outcome.as_deref().map_or_else(
                || {
                    if running.as_deref() == Some(r.id.as_str()) {
                        "running".to_string()
                    } else {
                        "interrupted".to_string()
                    }
                },
                outcome_words
            ),
            r.ended_ms.map_or("-".into(), |e| format!(
                "{:.1}",
                e.saturating_sub(r.started_ms) as f64 / 1000.0
            )),
            counted(num("served"), counts_caveat(r)),
            counted(num("failed_requests"), counts_caveat(r)),
        );
    }
    if records.iter().any(|r| counts_caveat(r).is_some()) {
        println!(
            "(?: not known; *: only part of the deployment was counted; `cutover show ID` says why)"
        );
    }
    Ok(())
}

/// A count for the history table: `?` when it is not known, `N*` when it covers only part of
/// the deployment.
fn counted(n: Option<u64>, caveat: Option<String>) -> String {
    match (n, caveat) {
        (None, _) => "-".into(),
        (Some(_), Some(c)) if counts_unknown(&c) => "?".into(),
        (Some(n), Some(_)) => format!("{n}*"),
        (Some(n), None) => n.to_string(),
    }
}

pub(super) fn show_cmd(config: &Config, id: Option<&str>, json: bool) -> anyhow::Result<()> {
    let journal = Journal::open(&config.state_dir)?;
    let row = journal.deployment_or_newest(config.app.name.as_str(), id)?;
    let steps = journal.steps(&row.id)?;
    let events = journal.events(&row.id)?;
    let running = running_id(&journal, config)?.as_deref() == Some(row.id.as_str());
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "deployment": row, "steps": steps, "events": events })
            )?
        );
        return Ok(());
    }
    println!(
        "deployment {}: {} {} {} -> {} ({}), by {}",
        row.id,
        row.kind,
        row.strategy,
        row.from.as_deref().unwrap_or("(nothing)"),
        row.to,
        row.outcome.as_deref().map_or_else(
            || if running { "running" } else { "interrupted" }.to_string(),
            outcome_words
        ),
        row.who
    );
    if let Some(proof) = row.report.as_ref().and_then(Proof::from_json) {
        for line in proof.lines() {
            println!("  {line}");
        }
    }
    println!(
        "  {:>8} {:>8}  {:<8} {:<9} {:<28} RESULT",
        "AT(s)", "TOOK(ms)", "HOST", "STEP", "DETAIL"
    );
    for s in &steps {
        let line = format!(
            "  {:>8.1} {:>8}  {:<8} {:<9} {:<28} {}",
            s.started_ms.saturating_sub(row.started_ms) as f64 / 1000.0,
            s.ended_ms
                .map_or("-".into(), |e| e.saturating_sub(s.started_ms).to_string()),
            s.host,
            s.action,
            s.detail,
            s.result.as_deref().unwrap_or(if running {
                "running"
            } else {
                "INTERRUPTED (the process died here)"
            })
        );
        println!("{}", continued(&line, STEP_INDENT));
    }
    for e in &events {
        let line = format!(
            "  {:>8.1} event: {}",
            e.at_ms.saturating_sub(row.started_ms) as f64 / 1000.0,
            e.message
        );
        println!("{}", continued(&line, EVENT_INDENT));
    }
    Ok(())
}

/// Where the continuation lines of a step's multi-line detail or result start in `show`: under
/// its HOST column, inside the row, clear of the AT(s) column where the next row starts.
const STEP_INDENT: usize = 21;
/// Where an event's continuation lines start: under its message.
const EVENT_INDENT: usize = 18;

/// `line` with every line after its first indented by `indent` spaces: a health gate's
/// failure carries the instance's last log lines, which at the left margin read as rows of
/// their own.
fn continued(line: &str, indent: usize) -> String {
    let pad = format!("\n{:indent$}", "");
    line.trim_end_matches('\n').replace('\n', &pad)
}

pub(super) async fn logs_cmd(config: Config, args: LogsArgs) -> anyhow::Result<()> {
    let host = config.host(&args.host).cloned().ok_or_else(|| {
        let names: Vec<&str> = config.hosts.iter().map(|h| h.name.as_str()).collect();
        anyhow::anyhow!(
            "no host {:?} in {}: hosts are {}",
            args.host,
            config.file.display(),
            names.join(", ")
        )
    })?;
    let (transport, _) = connect(&config)?;
    let mut instances = crate::instance::list(transport.as_ref(), &host).await?;
    instances.sort_by_key(|r| !r.alive);
    if instances.is_empty() {
        println!(
            "{}: no instance recorded in {}",
            host.name,
            crate::release::Layout::of(&host).run_dir().display()
        );
    }
    for r in instances.iter().filter(|r| r.alive) {
        let i = &r.instance;
        println!(
            "==> {} {} on {} (pid {}, {}) <==",
            host.name,
            i.version,
            i.address,
            i.pid,
            if r.alive { "running" } else { "stopped" }
        );
        println!(
            "{}",
            crate::instance::log_tail(transport.as_ref(), &host, &i.version, i.port(), args.lines)
                .await
        );
    }
    if args.all {
        // Stopped and failed instances have no pid file any more: their logs are what is left.
        let live: Vec<(String, u16)> = instances
            .iter()
            .filter(|r| r.alive)
            .map(|r| (r.instance.version.clone(), r.instance.port()))
            .collect();
        let logs = crate::instance::logs_newest_first(transport.as_ref(), &host).await?;
        let stopped: Vec<&(String, u16)> = logs.iter().filter(|l| !live.contains(l)).collect();
        for (version, port) in stopped.iter().take(MAX_STOPPED_LOGS) {
            println!(
                "==> {} {version} on port {port} (not running: stopped, or failed) <==",
                host.name
            );
            println!(
                "{}",
                crate::instance::log_tail(transport.as_ref(), &host, version, *port, args.lines)
                    .await
            );
        }
        if stopped.len() > MAX_STOPPED_LOGS {
            println!(
                "({} older logs in {} not shown)",
                stopped.len() - MAX_STOPPED_LOGS,
                crate::release::Layout::of(&host).log_dir().display()
            );
        }
    }
    Ok(())
}

/// The stopped instances' logs `cutover logs --all` shows, newest first.
const MAX_STOPPED_LOGS: usize = 20;

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: drift on hosts that were all read also printed "drift not checked on :
    /// could not be read", naming no host.
    #[test]
    fn drift_on_hosts_all_read_names_no_unchecked_host() {
        let drift = vec!["web1: an instance the journal does not know".to_string()];
        let out = drift_report(false, &drift, &[], 2);
        assert!(out.contains("DRIFT"), "{out}");
        assert!(!out.contains("not checked"), "{out}");
        let out = drift_report(false, &drift, &["web2"], 2);
        assert!(
            out.contains("drift not checked on web2: could not be read"),
            "{out}"
        );
        let out = drift_report(false, &[], &["web2"], 2);
        assert!(
            out.contains("no drift on the hosts that could be read"),
            "{out}"
        );
        assert!(out.contains("drift not checked on web2"), "{out}");
        assert!(drift_report(false, &[], &[], 2).contains("no drift: hosts and balancer match"));
    }
}
