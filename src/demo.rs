//! `cutover demo`: the whole promise in one command, with no set-up.
//!
//! It builds a temporary workspace with a local fleet of four hosts (127.0.0.11-14), starts the
//! built-in balancer in-process, deploys v1, then sends steady traffic through the balancer while
//! it rolls v2 and while it attempts a broken v3 (never healthy) that is rolled back by itself.
//! Each phase prints a table of what the independent client saw. The exit code is 0 only when no
//! request failed and the fleet ends on v2. Every process it started is stopped at the end, also
//! on Ctrl-C.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::config::{Config, Name};
use crate::deploy::{Deployer, Outcome, Report, Request};
use crate::load::{self, LoadReport, LoadSpec};
use crate::progress::Progress;
use crate::proxy::{self, ProxyHandle, ProxySettings};
use crate::transport::local::LocalTransport;
use crate::{fleet, instance};

pub struct DemoOptions {
    pub keep: bool,
    pub rate: u32,
}

/// The hosts of the demo fleet.
const HOSTS: [(&str, &str); 4] = [
    ("web1", "127.0.0.11"),
    ("web2", "127.0.0.12"),
    ("web3", "127.0.0.13"),
    ("web4", "127.0.0.14"),
];

const TOKEN: &str = "demo-token-not-secret";

/// One row of the final table.
struct Phase {
    name: String,
    report: Report,
    load: Option<LoadReport>,
}

pub async fn run(opts: DemoOptions) -> anyhow::Result<u8> {
    let workspace = tempfile::Builder::new()
        .prefix("cutover-demo-")
        .tempdir()
        .context("cannot create a temporary workspace")?;
    let dir = workspace.path().to_path_buf();
    say(&format!("workspace: {}", dir.display()));

    let settings = ProxySettings {
        listen: "127.0.0.1:0".parse()?,
        admin: "127.0.0.1:0".parse()?,
        token: TOKEN.to_string(),
        health: demo_health(),
        drain_timeout: Duration::from_secs(5),
        state_file: Some(dir.join(".cutover").join("proxy-routes.json")),
    };
    let proxy = proxy::start(settings)
        .await
        .context("cannot start the balancer")?;
    say(&format!(
        "balancer listening on {} (admin {})",
        proxy.listen, proxy.admin
    ));
    let config = Arc::new(write_workspace(&dir, &proxy)?);

    let result = tokio::select! {
        r = phases(config.clone(), &proxy, opts.rate) => r,
        signal = crate::bounded::shutdown_signal() => Err(anyhow::anyhow!("interrupted ({signal}): cleaned up")),
    };

    // Clean up whatever happened: every instance on every host, then the balancer.
    stop_fleet(&config).await;
    proxy.shutdown().await;
    if opts.keep {
        let kept = workspace.keep();
        say(&format!("workspace kept in {}", kept.display()));
    }

    let phases = result?;
    print_table(&phases);
    // Phases 2-4 must fail no request; the canary phase may fail at most the canary's share of
    // its errors (20% of 20% of the requests) before the analysis stops it.
    let failed: u64 = phases
        .iter()
        .take(4)
        .filter_map(|p| p.load.as_ref())
        .map(|l| l.failed)
        .sum();
    let canary_ok = phases.get(4).is_some_and(|p| {
        p.report.outcome == Outcome::RolledBack
            && p.load
                .as_ref()
                .is_some_and(|l| (l.failed as f64) <= 0.2 * 0.2 * l.sent as f64 + 5.0)
    });
    let outcomes = [
        Outcome::Succeeded,
        Outcome::Succeeded,
        Outcome::RolledBack,
        Outcome::RolledBack,
    ];
    let on_v2 = canary_ok
        && phases
            .iter()
            .zip(outcomes)
            .all(|(p, o)| p.report.outcome == o);
    if failed == 0 && on_v2 {
        say(
            "result: 0 failed requests outside the bad canary; the fleet serves v2; broken v3 rolled back by itself, blue-green switched back, the 20%-error canary was aborted by the analysis",
        );
        Ok(0)
    } else {
        say(&format!(
            "result: FAILED ({failed} failed requests, fleet on v2: {on_v2})"
        ));
        Ok(1)
    }
}

fn demo_health() -> crate::config::HealthConfig {
    crate::config::HealthConfig {
        interval: crate::config::Dur(Duration::from_millis(250)),
        timeout: crate::config::Dur(Duration::from_secs(1)),
        deadline: crate::config::Dur(Duration::from_secs(15)),
        ..Default::default()
    }
}

/// Writes releases v1..v3 and a cutover.toml that points at the running balancer.
fn write_workspace(dir: &Path, proxy: &ProxyHandle) -> anyhow::Result<Config> {
    let exe = std::env::current_exe().context("cannot find this binary's path")?;
    let releases = dir.join("releases");
    crate::init::write_sample_release(&releases.join("v1"), &exe, "v1", "")?;
    crate::init::write_sample_release(&releases.join("v2"), &exe, "v2", "")?;
    crate::init::write_sample_release(&releases.join("v3"), &exe, "v3", "--unhealthy")?;
    crate::init::write_sample_release(&releases.join("v4"), &exe, "v4", "")?;
    crate::init::write_sample_release(&releases.join("v5"), &exe, "v5", "--error-rate 0.2")?;
    let mut text = format!(
        "transport = \"local\"\nstate_dir = \".cutover\"\n\n[app]\nname = \"demo\"\nstart = \"exec sh ./run.sh\"\nstop_timeout = \"5s\"\ndrain_timeout = \"5s\"\n\n\
         [app.health]\npath = \"/health\"\ninterval = \"250ms\"\ntimeout = \"1s\"\ndeadline = \"15s\"\n\n\
         [release]\npath = \"releases/{{version}}\"\nkeep = 3\n\n\
         [balancer]\nlisten = \"{}\"\nadmin = \"{}\"\ntoken = \"{TOKEN}\"\n\n\
         [strategy]\nkind = \"rolling\"\nbatch = [1, \"50%\"]\nmax_fail_percentage = 0\non_failure = \"rollback\"\n",
        proxy.listen, proxy.admin
    );
    for (name, addr) in HOSTS {
        text.push_str(&format!(
            "\n[[hosts]]\nname = \"{name}\"\naddress = \"{addr}\"\nroot = \"fleet/{name}\"\n"
        ));
    }
    let path = dir.join("cutover.toml");
    std::fs::write(&path, &text).with_context(|| format!("cannot write {}", path.display()))?;
    Config::load(&path).map_err(Into::into)
}

async fn phases(config: Arc<Config>, proxy: &ProxyHandle, rate: u32) -> anyhow::Result<Vec<Phase>> {
    let journal = Arc::new(crate::journal::Journal::open(&config.state_dir)?);
    let (transport, balancer) = crate::cli::connect(&config)?;
    let deployer = |phase: &'static str| {
        let progress =
            Progress::to_sink(Arc::new(move |line: &str| say(&format!("{phase}: {line}"))));
        Deployer::new(
            config.clone(),
            transport.clone(),
            balancer.clone(),
            journal.clone(),
            progress,
        )
    };
    let mut out = Vec::new();

    say("phase 1: deploy v1 to an empty fleet");
    let report = deployer("v1").run(&request("v1")?).await?;
    anyhow::ensure!(
        report.outcome == Outcome::Succeeded,
        "the first deploy of v1 did not succeed: {:?}",
        report.failed_hosts
    );
    out.push(Phase {
        name: "deploy v1 (no traffic yet)".into(),
        report,
        load: None,
    });

    say(&format!(
        "phase 2: roll v2 while {rate} req/s flow through the balancer"
    ));
    let (report, load) = under_load(proxy, rate, deployer("v2").run(&request("v2")?)).await?;
    out.push(Phase {
        name: "roll v1 -> v2".into(),
        report,
        load: Some(load),
    });

    say("phase 3: deploy broken v3 (never healthy): expect an automatic rollback");
    let (report, load) = under_load(proxy, rate, deployer("v3").run(&request("v3")?)).await?;
    out.push(Phase {
        name: "broken v3, rolled back".into(),
        report,
        load: Some(load),
    });

    // Phase 4: blue-green, and an operator switches back inside the window.
    say(
        "phase 4: blue-green v4 beside v2, one atomic switch, then a switch back (rollback in the window)",
    );
    let mut bg = (*config).clone();
    bg.strategy.kind = crate::config::StrategyKind::BlueGreen;
    bg.strategy.scale_down_delay = crate::config::Dur(Duration::from_secs(30));
    let bg = Arc::new(bg);
    let bg_deployer = {
        let progress = Progress::to_sink(Arc::new(|line: &str| say(&format!("v4: {line}"))));
        Deployer::new(
            bg,
            transport.clone(),
            balancer.clone(),
            journal.clone(),
            progress,
        )
    };
    let operator = async {
        // Like `cutover rollback` from another terminal, a second after the switch.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(row)) = journal.unfinished(config.app.name.as_str()) {
                let switched = row
                    .status
                    .as_ref()
                    .and_then(|s| s.get("phase"))
                    .and_then(|p| p.as_str())
                    == Some("switched");
                if switched {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    say("operator: cutover rollback (inside the switch-back window)");
                    let _ = journal.post_command(&row.id, "rollback");
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let v4 = request("v4")?;
    let (result, ()) = tokio::join!(under_load(proxy, rate, bg_deployer.run(&v4)), operator);
    let (report, load) = result?;
    out.push(Phase {
        name: "blue-green v4, switched back".into(),
        report,
        load: Some(load),
    });

    // Phase 5: a canary that serves 20% errors; the analysis aborts it.
    say("phase 5: canary v5 (answers 20% errors) at 20% of requests: the analysis must abort it");
    let mut canary = (*config).clone();
    canary.strategy.kind = crate::config::StrategyKind::Canary;
    canary.strategy.canary_hosts = Some(1);
    canary.strategy.steps = vec![
        crate::config::CanaryStep {
            weight: 20,
            pause: Some(crate::config::Dur(Duration::from_secs(30))),
        },
        crate::config::CanaryStep {
            weight: 100,
            pause: None,
        },
    ];
    canary.analysis = Some(crate::config::Analysis {
        interval: crate::config::Dur(Duration::from_secs(1)),
        min_success_rate: Some(crate::config::Percent(95.0)),
        max_p99_latency: None,
        min_requests: 10,
        failure_limit: 0,
        max_degradation: None,
        judge: None,
    });
    let canary_deployer = {
        let progress = Progress::to_sink(Arc::new(|line: &str| say(&format!("v5: {line}"))));
        Deployer::new(
            Arc::new(canary),
            transport.clone(),
            balancer.clone(),
            journal.clone(),
            progress,
        )
    };
    let (report, load) =
        under_load(proxy, rate.max(100), canary_deployer.run(&request("v5")?)).await?;
    out.push(Phase {
        name: "canary v5 (20% errors), aborted".into(),
        report,
        load: Some(load),
    });

    let views = fleet::observe(&config, &transport, &balancer).await?;
    for v in &views {
        anyhow::ensure!(
            v.current.as_deref() == Some("v2"),
            "host {} ended on {:?}, not v2",
            v.host.name,
            v.current
        );
    }
    Ok(out)
}

fn request(v: &str) -> anyhow::Result<Request> {
    Ok(Request::deploy(Name::parse(v).map_err(anyhow::Error::msg)?))
}

/// Runs `work` while steady traffic flows through the balancer; returns both results.
async fn under_load<T>(
    proxy: &ProxyHandle,
    rate: u32,
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, LoadReport)> {
    let traffic = load::start(LoadSpec {
        target: proxy.listen,
        path: "/".into(),
        rate,
        max_requests: u64::from(rate) * 300,
        max_duration: Duration::from_secs(300),
        concurrency: 8,
        headers: Vec::new(),
    });
    // A moment of traffic before and after the change shows the old and new release serving.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let result = work.await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = traffic.stop().await;
    Ok((result?, report))
}

/// Stops every instance on every demo host (by pid file).
async fn stop_fleet(config: &Config) {
    let t = LocalTransport::new();
    for host in &config.hosts {
        if let Ok(list) = instance::list(&t, host).await {
            for r in list.into_iter().filter(|r| r.alive) {
                let _ = instance::stop(
                    &t,
                    host,
                    &r.instance,
                    config.app.stop_signal,
                    Duration::from_secs(5),
                )
                .await;
            }
        }
    }
}

fn print_table(phases: &[Phase]) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<32} {:>9} {:>7} {:>7} {:>7} {:>7} {:>7} {:>15} {:>8}  OUTCOME",
        "PHASE", "REQUESTS", "FAILED", "v1", "v2", "v3", "v4/v5", "BALANCER", "SECONDS"
    );
    for p in phases {
        let (sent, failed, shares) = match &p.load {
            Some(l) => (
                l.sent.to_string(),
                l.failed.to_string(),
                [
                    l.share("v1"),
                    l.share("v2"),
                    l.share("v3"),
                    l.share("v4") + l.share("v5"),
                ]
                .map(|v| format!("{v:.1}%")),
            ),
            None => (
                "-".into(),
                "-".into(),
                ["-", "-", "-", "-"].map(String::from),
            ),
        };
        let balancer = format!("{}/{}", p.report.served, p.report.failed_requests);
        let _ = writeln!(
            out,
            "{:<32} {:>9} {:>7} {:>7} {:>7} {:>7} {:>7} {:>15} {:>8.1}  {}",
            p.name,
            sent,
            failed,
            shares[0],
            shares[1],
            shares[2],
            shares[3],
            balancer,
            p.report.duration_ms as f64 / 1000.0,
            p.report.outcome.words()
        );
    }
    let _ = writeln!(
        out,
        "\nREQUESTS/FAILED: counted by the demo's own client; BALANCER: served/failed as the balancer counted them during the deploy."
    );
}

fn say(msg: &str) {
    let _ = writeln!(std::io::stderr().lock(), "demo: {msg}");
}
