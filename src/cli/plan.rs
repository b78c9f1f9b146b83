//! `cutover plan`: what a deploy would do (batches, gates, worst-case time), without doing it.

use std::time::Duration;

use crate::config::{Config, HookPoint, Name, VerifyPoint};
use crate::{batch, deploy};

/// The version a deploy of `version` would ship, asked of the repository as a deploy asks it:
/// a branch of a git release is deployed as the commit it points at now, so the plan shows
/// that commit (and says so); a tag or commit id stays as named. The note says what was
/// found, or why the repository could not tell.
pub(super) fn resolve_branch(config: &Config, version: Name) -> (Name, Option<Note>) {
    let Some(url) = config.release.git.as_deref() else {
        return (version, None);
    };
    if let Err(e) = crate::source::fixed_ref(&version) {
        return (version, Some(Note::Refused(format!("{e:#}"))));
    }
    let shown = crate::source::redact_url(url);
    let asked = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(crate::source::branch_commit(
                url,
                &version,
                config.ssh.command_timeout,
            ))
        });
    match asked {
        Ok(Some(sha)) => match Name::parse(&sha) {
            Ok(pinned) => {
                let note = format!(
                    "{version} is a branch of {shown}, now at {sha}: a deploy now ships that commit, as version {sha}"
                );
                (pinned, Some(Note::Info(note)))
            }
            Err(e) => {
                let why = format!("branch {version} points at {sha:?}: {e}");
                (version, Some(Note::Refused(why)))
            }
        },
        Ok(None) => (version, None),
        Err(e) if e.is::<crate::source::NoSuchRef>() => {
            (version, Some(Note::Refused(format!("{e:#}"))))
        }
        Err(e) => {
            let note = format!(
                "could not ask {shown} what {version} is ({e:#}): shown as named; a branch would be deployed as the commit it points at then"
            );
            (version, Some(Note::Info(note)))
        }
    }
}

/// What a plan adds about the version: something to know, or why a deploy of it now would be
/// refused (`cutover plan` then fails, so a pipeline that plans first stops there).
pub(super) enum Note {
    Info(String),
    Refused(String),
}

/// The live release as the journal knows it: a canary's first deploy and a redeploy of the
/// live release (canary or blue-green) roll out in batches instead. The deploy itself decides
/// from what the hosts run, which a plan does not ask them.
enum Live {
    /// No deployment of the app recorded in this state directory.
    Nothing,
    Release(String),
    /// The newest deployment halted or failed part-way (hosts may differ), or the journal
    /// cannot be read.
    Unknown,
}

fn live(config: &Config) -> Live {
    let path = config.state_dir.join("journal.db");
    if !path.exists() {
        return Live::Nothing;
    }
    let Ok(journal) = crate::journal::Journal::open_file(&path) else {
        return Live::Unknown;
    };
    let app = config.app.name.as_str();
    let newest = match journal.deployments(app, 1) {
        Ok(rows) => match rows.into_iter().next() {
            Some(row) => row,
            None => return Live::Nothing,
        },
        Err(_) => return Live::Unknown,
    };
    match journal.live_release(app) {
        Ok(Some(v)) => Live::Release(v),
        // A first deploy that rolled back left the fleet with nothing, as before it.
        Ok(None) if newest.outcome.as_deref() == Some("rolled_back") && newest.from.is_none() => {
            Live::Nothing
        }
        _ => Live::Unknown,
    }
}

pub(super) fn print_plan(config: &Config, version: &Name) {
    use crate::config::StrategyKind::{BlueGreen, Canary, Rolling};
    let live = live(config);
    let live_now = matches!(&live, Live::Release(v) if v == version.as_str());
    let state = config.state_dir.display();
    match config.strategy.kind {
        Rolling => print_rolling_plan(config, version),
        Canary if matches!(live, Live::Nothing) => {
            println!(
                "first deploy (the journal in {state} records no live release): no stable release to compare a canary with, so {version} rolls out in batches, without steps or analysis (the deploy decides from what the hosts run; the [analysis] below applies from the next deploy on):"
            );
            print_rolling_plan(config, version);
        }
        Canary | BlueGreen if live_now => {
            println!(
                "{version} is already the live release (the journal in {state} says so): no {} to compare or switch to; hosts that serve it stay as they are, any other moves in batches:",
                if config.strategy.kind == Canary {
                    "canary"
                } else {
                    "green set"
                }
            );
            print_rolling_plan(config, version);
        }
        BlueGreen => print_blue_green_plan(config, version),
        Canary => print_canary_plan(config, version),
    }
    let points: Vec<String> = config
        .verify
        .iter()
        .map(|v| {
            // The points as the config names them (`after_batch`), not Rust's `[AfterBatch]`.
            let at: Vec<&str> = v.at.iter().map(|p| p.name()).collect();
            format!(
                "`{}` at {} (timeout {})",
                v.command,
                at.join(", "),
                v.timeout
            )
        })
        .collect();
    if !points.is_empty() {
        println!("  verify: {}", points.join("; "));
    }
    let hooks: Vec<String> = config
        .hooks
        .iter()
        .map(|h| {
            format!(
                "`{}` at {} ({}, timeout {})",
                h.command,
                crate::hooks::point_name(h.at),
                match (h.where_, h.run_once) {
                    (crate::config::HookWhere::Local, _) => "on this machine",
                    (_, true) => "once, on one host",
                    (_, false) => "on each host",
                },
                h.timeout
            )
        })
        .collect();
    if !hooks.is_empty() {
        println!("  hooks: {}", hooks.join("; "));
    }
    if let Some(a) = &config.analysis {
        println!(
            "  analysis every {}: min_success_rate {}, max_p99_latency {}, max_degradation {}, min_requests {} (fewer: inconclusive, the rollout holds), failure_limit {}{}",
            a.interval,
            // As the config writes it (`99.5` means 99.5 %), not Rust's `Some(99.5)`.
            a.min_success_rate
                .map_or("-".to_string(), |p| format!("{}%", p.0)),
            a.max_p99_latency.map_or("-".to_string(), |d| d.to_string()),
            a.max_degradation
                .map_or("-".to_string(), |p| format!("{}%", p.0)),
            a.min_requests,
            a.failure_limit,
            // The tolerance is shown because it is a fraction: a 5 meant as 5% reads here as
            // the 500% it is.
            match &a.judge {
                Some(j) => format!(
                    ", Mann-Whitney judge on latencies (allowed_increase {}: fails on significant evidence of a {})",
                    j.allowed_increase,
                    crate::analysis::slower_than_stable(j.allowed_increase)
                ),
                None => String::new(),
            }
        );
    }
}

/// Worst case of one host's gate: health deadline twice (own check and the balancer's), then
/// its `before_traffic` checks and `before_switch` hooks.
fn gate_worst(config: &Config) -> Duration {
    *config.app.health.deadline * 2
        + verify_time(config, VerifyPoint::BeforeTraffic)
        + hook_time(config, HookPoint::BeforeSwitch)
}

/// The longest the `[[verify]]` commands at `point` may run, one after another.
fn verify_time(config: &Config, point: VerifyPoint) -> Duration {
    config
        .verify
        .iter()
        .filter(|v| v.at.contains(&point))
        .map(|v| *v.timeout)
        .sum()
}

/// The longest the hooks at `point` may run.
fn hook_time(config: &Config, point: HookPoint) -> Duration {
    config
        .hooks
        .iter()
        .filter(|h| h.at == point)
        .map(|h| *h.timeout)
        .sum()
}

/// What every deploy may spend outside its batches: the hooks before the first and after the
/// last, and preparing the release (the git fetch, clone and checkout, the build, each bounded
/// by `command_timeout`, and unpacking on the hosts, in parallel, bounded by the longer of
/// `command_timeout` and 5 minutes; the upload's time depends on the release's size).
fn fixed_worst(config: &Config) -> Duration {
    let hooks: Duration = [
        HookPoint::BeforeDeploy,
        HookPoint::AfterStage,
        HookPoint::AfterDeploy,
    ]
    .into_iter()
    .map(|p| hook_time(config, p))
    .sum();
    let step = config.ssh.command_timeout;
    let git = if config.release.git.is_some() { 3 } else { 0 };
    let build = u32::from(config.release.build.is_some());
    hooks + step * (git + build) + step.max(Duration::from_secs(300))
}

/// Worst case of one batch of a rolling switch (its hosts switch in parallel): the deadlines,
/// then the per-host checks and hooks.
fn switch_worst(config: &Config) -> Duration {
    deploy::worst_case_per_host(config)
        + verify_time(config, VerifyPoint::BeforeTraffic)
        + hook_time(config, HookPoint::BeforeSwitch)
        + hook_time(config, HookPoint::AfterSwitch)
}

fn print_source(config: &Config, version: &Name) {
    if let Some(b) = &config.release.build {
        println!(
            "  build: `{b}` once on this machine (up to command_timeout {})",
            humantime::format_duration(config.ssh.command_timeout)
        );
    }
    match &config.release.git {
        Some(url) => println!(
            "  source: {} at {version} (built once, shipped to every host)",
            crate::source::redact_url(url)
        ),
        None => println!("  source: {}", config.release_source(version).display()),
    }
}

fn print_blue_green_plan(config: &Config, version: &Name) {
    let s = &config.strategy;
    println!(
        "plan: blue-green deploy of {} {} to {} host(s)",
        config.app.name,
        version,
        config.hosts.len()
    );
    print_source(config, version);
    println!("  1. stage {version} on every host, in parallel");
    println!(
        "  2. start green ({version}) beside blue on all {} host(s) in parallel; gate: health ({} passes, deadline {}), then the balancer's check; green enters as preview backends",
        config.hosts.len(),
        config.app.health.healthy_threshold.0,
        config.app.health.deadline
    );
    if config
        .verify
        .iter()
        .any(|v| v.at.contains(&VerifyPoint::BeforeSwitch))
    {
        println!(
            "  3. verify green: the before_switch [[verify]] commands, through the preview route (requests with `$CUTOVER_PREVIEW_HEADER`: `x-cutover-preview` and a secret derived from the admin token) at http://{}",
            config.balancer.listen
        );
    } else {
        println!(
            "  3. (no before_switch [[verify]] commands: only health gates green before the switch; add one to test green through the preview route first)"
        );
    }
    println!("  4. switch: one atomic admin call makes green active and blue draining");
    match s.post_switch_analysis {
        Some(d) => println!(
            "  5. post-switch analysis for {d}: failure switches back to blue; without enough traffic to judge, blue is held (no time limit) until traffic comes, `cutover promote` or `cutover rollback`"
        ),
        None => println!(
            "  5. (no post-switch analysis: set post_switch_analysis and [analysis] to judge green after the switch)"
        ),
    }
    println!(
        "  6. blue keeps running for scale_down_delay = {}: `cutover rollback` switches back at once; then blue is drained and stopped",
        s.scale_down_delay
    );
    let worst = fixed_worst(config)
        + gate_worst(config)
        + verify_time(config, VerifyPoint::BeforeSwitch)
        + verify_time(config, VerifyPoint::AfterSwitch)
        + *s.scale_down_delay
        + *config.app.drain_timeout
        + *config.app.stop_timeout;
    println!("  worst case: {}", humantime::format_duration(worst));
}

fn print_canary_plan(config: &Config, version: &Name) {
    let s = &config.strategy;
    println!(
        "plan: canary deploy of {} {} on {} of {} host(s){}",
        config.app.name,
        version,
        s.canary_host_count(),
        config.hosts.len(),
        s.sticky
            .as_ref()
            .map_or(String::new(), |k| format!(", sticky by {k}"))
    );
    print_source(config, version);
    println!(
        "  1. stage {version} on every host; start the canary beside the stable instance on {} host(s), weight 0",
        s.canary_host_count()
    );
    let mut worst = fixed_worst(config) + gate_worst(config);
    let interval = config.analysis.as_ref().map(|a| *a.interval);
    let after_step = verify_time(config, VerifyPoint::AfterStep);
    for (i, step) in s.steps.iter().enumerate() {
        worst += after_step;
        match step.pause {
            Some(p) => {
                worst += *p + interval.unwrap_or_default();
                println!(
                    "  step {}/{}: {}% of requests to the canary for {p}{}",
                    i + 1,
                    s.steps.len(),
                    step.weight,
                    interval.map_or(
                        " (no [analysis]: the pause alone decides)".to_string(),
                        |i| { format!(", analysis every {}", humantime::format_duration(i)) }
                    )
                );
            }
            None => println!(
                "  step {}/{}: {}% of requests to the canary until `cutover promote`{}",
                i + 1,
                s.steps.len(),
                step.weight,
                interval.map_or(String::new(), |i| {
                    format!(
                        ", analysis every {} meanwhile",
                        humantime::format_duration(i)
                    )
                })
            ),
        }
    }
    let batches = batch::batches(&s.batch, &config.hosts).len() as u32;
    worst += switch_worst(config) * batches;
    println!(
        "  then: roll {version} out to every host in {batches} batch(es) (batch = {}), no further analysis",
        s.batch
    );
    println!(
        "  abort (analysis failure, `cutover abort`): canary weight 0, canary stopped, stable untouched"
    );
    if config.analysis.is_some() {
        println!(
            "  an inconclusive interval (too little traffic) holds its step with no time limit, until traffic comes, `cutover promote` or `cutover abort`"
        );
    }
    println!(
        "  worst case: {}{}",
        humantime::format_duration(worst),
        if s.steps.iter().any(|st| st.pause.is_none()) {
            " plus the time until each `cutover promote`"
        } else {
            ""
        }
    );
}

fn print_rolling_plan(config: &Config, version: &Name) {
    let plan = batch::batches(&config.strategy.batch, &config.hosts);
    let h = &config.app.health;
    println!(
        "plan: rolling deploy of {} {} to {} host(s) in {} batch(es) (batch = {}, max_fail_percentage = {}%{}, on_failure = \"{}\")",
        config.app.name,
        version,
        config.hosts.len(),
        plan.len(),
        config.strategy.batch,
        config.strategy.max_fail_percentage.0,
        config
            .strategy
            .max_failed_hosts
            .map_or(String::new(), |n| format!(", max_failed_hosts = {n}")),
        config.strategy.on_failure
    );
    print_source(config, version);
    println!("  stage: copy the release to <root>/releases/{version}/ on every host, in parallel");
    for (i, b) in plan.iter().enumerate() {
        let names: Vec<&str> = b.iter().map(|h| h.name.as_str()).collect();
        println!("  batch {}/{}: {}", i + 1, plan.len(), names.join(", "));
    }
    let gate = format!(
        "gate: {} health checks in a row on {} (every {}, deadline {})",
        h.healthy_threshold.0, h.path, h.interval, h.deadline
    );
    let (signal, stop_timeout, drain_timeout) = (
        config.app.stop_signal.name(),
        config.app.stop_timeout,
        config.app.drain_timeout,
    );
    match (config.app.mode, config.app.port) {
        (crate::config::Mode::InPlace, Some(port)) => {
            println!(
                "  per host, in place (port {port}; the host is out of the balancer meanwhile):"
            );
            println!(
                "    1. drain the host's backend (drain_timeout {drain_timeout}), remove it; stop its instance (SIG{signal}, stop_timeout {stop_timeout}, then KILL)"
            );
            println!("    2. start {version} on port {port}; {gate}");
            println!(
                "    3. add to the balancer; gate: the balancer's own health check; point `current` at {version}"
            );
            println!("    on failure: start the release the host served again, the same way");
            if plan.iter().any(|b| b.len() == config.hosts.len()) {
                println!(
                    "  WARNING: a batch holds all {} host(s): nothing serves while they restart",
                    config.hosts.len()
                );
            }
        }
        _ => {
            println!("  per host, side by side:");
            println!("    1. start {version} on a free port; {gate}");
            println!("    2. add to the balancer; gate: the balancer's own health check");
            println!("    3. drain the old backend (drain_timeout {drain_timeout}), remove it");
            println!(
                "    4. stop the old instance (SIG{signal}, stop_timeout {stop_timeout}, then KILL); point `current` at {version}"
            );
        }
    }
    let per_batch = switch_worst(config) + verify_time(config, VerifyPoint::AfterBatch);
    let (before, after) = (
        fixed_worst(config),
        verify_time(config, VerifyPoint::AfterDeploy),
    );
    println!(
        "  worst case: {} (build, staging and hooks {} + {} batch(es) x {}{}; every command at its timeout)",
        humantime::format_duration(before + per_batch * plan.len() as u32 + after),
        humantime::format_duration(before),
        plan.len(),
        humantime::format_duration(per_batch),
        if after.is_zero() {
            String::new()
        } else {
            format!(
                " + after_deploy checks {}",
                humantime::format_duration(after)
            )
        }
    );
}
