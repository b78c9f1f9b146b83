//! The journal, the deploy lock, drift and a balancer restart in the middle of a deploy.

mod common;

use std::time::{Duration, Instant};

use common::{Fleet, FleetSpec};
use cutover::balancer::{BackendSpec, Balancer};
use cutover::load::{self, LoadSpec};

/// A release that takes `delay` to boot, so a deploy of it lasts a while.
fn slow_release(fleet: &Fleet, name: &str, delay: &str) {
    let dir = fleet.dir.path().join("releases").join(name);
    cutover::init::write_sample_release(
        &dir,
        &common::exe(),
        name,
        &format!("--startup-delay {delay}"),
    )
    .unwrap();
}

fn traffic(fleet: &Fleet, rate: u32) -> load::LoadRun {
    load::start(LoadSpec {
        target: fleet.listen,
        path: "/".into(),
        rate,
        max_requests: 20_000,
        max_duration: Duration::from_secs(120),
        concurrency: 4,
        headers: Vec::new(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_deploy_is_refused_then_waits_for_the_lock() {
    let fleet = Fleet::start(FleetSpec::new(2, 21)).await;
    fleet.deploy("v1", 0).await;
    slow_release(&fleet, "slow", "1500ms");

    let first = {
        let config = fleet.config.clone();
        tokio::spawn(async move {
            tokio::process::Command::new(common::exe())
                .arg("-c")
                .arg(&config)
                .args(["deploy", "--version", "slow"])
                .kill_on_drop(true)
                .output()
                .await
                .unwrap()
        })
    };
    // Wait until the first deploy holds the lock.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, out, _) = fleet.cutover(&["lock"]).await;
        if out.starts_with("locked:") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the first deploy never took the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, _, err) = fleet.cutover(&["deploy", "--version", "v2"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("another deployment holds the lock: deploy slow by"),
        "{err}"
    );
    assert!(
        err.contains("(pid ") && err.contains("--lock-wait"),
        "the holder's details: {err}"
    );

    // With --lock-wait the second deploy starts after the first ends, and succeeds.
    let (code, _, err) = fleet
        .cutover(&["deploy", "--version", "v2", "--lock-wait", "60s"])
        .await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("waiting for the deploy lock"), "{err}");
    let first = first.await.unwrap();
    assert_eq!(
        first.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    fleet.assert_on("v2").await;

    let (_, history, _) = fleet.cutover(&["history"]).await;
    let lines: Vec<&str> = history.lines().collect();
    assert!(
        lines[1].contains(" v2 ") && lines[2].contains(" slow "),
        "newest first:\n{history}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_lock_of_a_dead_process_is_taken_over() {
    let fleet = Fleet::start(FleetSpec::new(1, 22)).await;
    // A deploy killed right after it took the lock (its first journal write) leaves a stale lock.
    let (code, _, _) = fleet
        .cutover_env(
            &["deploy", "--version", "v1"],
            &[("CUTOVER_CRASH_AFTER_WRITE", "1")],
        )
        .await;
    assert_eq!(code, -9);
    let (_, out, _) = fleet.cutover(&["lock"]).await;
    assert!(
        out.starts_with(
            "locked by a deployer that is gone (the next deploy takes the lock over): deploy v1 by"
        ),
        "{out}"
    );
    let (code, _, err) = fleet.cutover(&["deploy", "--version", "v1"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("took over a stale deploy lock (its process is gone)"),
        "{err}"
    );
    let (_, out, _) = fleet.cutover(&["lock"]).await;
    assert_eq!(out, "unlocked\nfleet: unlocked (host web1)\n");

    // unlock --force is recorded.
    let (code, _, err) = fleet.cutover(&["unlock"]).await;
    assert_eq!(code, 2, "without --force: {err}");
    let (code, out, _) = fleet.cutover(&["unlock", "--force"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("the lock was free"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlock_force_is_refused_while_the_holder_runs_here() {
    let fleet = Fleet::start(FleetSpec::new(1, 6)).await;
    fleet.deploy("v1", 0).await;
    slow_release(&fleet, "slow", "2s");
    let deploy = fleet.spawn_cutover(&["deploy", "--version", "slow"]);
    fleet.wait_status("the deployment", |_| true).await;
    let (code, _, err) = fleet.cutover(&["unlock", "--force"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("the lock's holder still runs on this machine"),
        "{err}"
    );
    let (code, out, err) = deploy.await.unwrap();
    assert_eq!(code, 0, "the deploy went on under its lock: {out}\n{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balancer_restart_during_a_deploy_is_waited_out() {
    let mut spec = FleetSpec::new(4, 23);
    spec.strategy = "kind = \"rolling\"\nbatch = 1\n".into();
    let mut fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    slow_release(&fleet, "v2slow", "700ms");
    let run = traffic(&fleet, 100);
    run.wait_until(|r| r.ok >= 50).await;

    let deploy = {
        let config = fleet.config.clone();
        tokio::spawn(async move {
            tokio::process::Command::new(common::exe())
                .arg("-c")
                .arg(&config)
                .args(["deploy", "--version", "v2slow"])
                .kill_on_drop(true)
                .output()
                .await
                .unwrap()
        })
    };
    // Let the deploy move a host or so, then take the balancer away for a moment.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before_kill = run.snapshot();
    assert_eq!(before_kill.failed, 0, "{before_kill}");
    fleet.kill_proxy().await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    fleet.start_proxy().await;
    // Requests that were in flight or sent while it was down may fail; none after it is back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after_restart = run.snapshot();

    let out = deploy.await.unwrap();
    let at_end = run.snapshot();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "the deploy completes:\n{err}");
    assert!(
        err.contains("balancer unreachable"),
        "it noticed and waited:\n{err}"
    );
    // The restarted proxy counts from zero: the report says its counts are partial.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("counters restarted during the deployment"),
        "{stdout}"
    );
    // What the new counters saw is reported (not the old counts subtracted from it, which
    // came out as 0) and marked as partial.
    let line = stdout
        .lines()
        .find(|l| l.contains("requests during the deploy:"))
        .unwrap_or_else(|| panic!("{stdout}"));
    let served: u64 = line
        .split("deploy: ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    // The new proxy answered at least what the client got back after it was up.
    let since = at_end.ok - after_restart.ok;
    assert!(
        served >= since,
        "{line}: the client got {since} answers after the restart"
    );
    assert!(
        line.contains("counted only since the balancer's counters restarted"),
        "{line}"
    );
    let report = run.stop().await;
    assert_eq!(
        report.failed, after_restart.failed,
        "no failure once the balancer was back: {report}\n{:#?}",
        report.failures
    );
    fleet.assert_on("v2slow").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_drift() {
    let fleet = Fleet::start(FleetSpec::new(3, 24)).await;
    fleet.deploy("v1", 0).await;
    let (_, out, _) = fleet.cutover(&["status"]).await;
    assert!(out.contains("no drift"), "{out}");

    let config = cutover::config::Config::load(&fleet.config).unwrap();
    // 1. An instance no deployment started.
    let t = cutover::transport::local::LocalTransport::new();
    let web1 = &config.hosts[0];
    let port = common::free_port(&web1.address.to_string());
    let stray = cutover::instance::start(
        &t,
        &config.app,
        web1,
        &cutover::config::Name::parse("v1").unwrap(),
        port,
    )
    .await
    .unwrap();
    // 2. A backend pointing at a port where nothing runs.
    let dead_port = common::free_port(&config.hosts[1].address.to_string());
    fleet
        .client()
        .add(&BackendSpec {
            id: format!("web2:{dead_port}"),
            address: format!("{}:{dead_port}", config.hosts[1].address)
                .parse()
                .unwrap(),
            host: "web2".into(),
            release: "v1".into(),
            weight: 100,
            health_path: "/health".into(),
            preview: false,
            gated: false,
        })
        .await
        .unwrap();
    // 3. A host whose `current` disagrees with the balancer.
    let root3 = fleet.root("web3");
    std::fs::create_dir_all(root3.join("releases/v2")).unwrap();
    std::os::unix::fs::symlink("releases/v2", root3.join("current.new")).unwrap();
    std::fs::rename(root3.join("current.new"), root3.join("current")).unwrap();

    let (code, out, err) = fleet.cutover(&["status"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!(
            "web1: instance v1 on {} (pid {}) was started by no recorded deployment",
            stray.address, stray.pid
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "web2: balancer backend web2:{dead_port} (v1) points at"
        )) && out.contains("where no instance runs"),
        "{out}"
    );
    assert!(
        out.contains("web3: current points at v2 but the balancer routes to v1"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_journal_is_reported_not_panicked_on() {
    let fleet = Fleet::start(FleetSpec::new(1, 25)).await;
    let state = fleet.dir.path().join(".cutover");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("journal.db"), vec![0x5a; 8192]).unwrap();
    for args in [
        &["history"][..],
        &["deploy", "--version", "v1"],
        &["status"],
    ] {
        let (code, _, err) = fleet.cutover(args).await;
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.contains("is not a readable cutover journal"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// A config for commands that read only the journal (`show`, `history`): nothing runs.
const JOURNAL_ONLY: &str = r#"transport = "local"

[app]
name = "test"
start = "exec ./server"

[release]
path = "releases/{version}"

[[hosts]]
name = "web1"
address = "127.0.75.11"
root = "fleet/web1"

[balancer]
listen = "127.0.75.1:18080"
admin = "127.0.75.1:18081"
token = "0123456789abcdef"
"#;

/// Runs `cutover -c <dir>/cutover.toml <args>` (no fleet, no balancer); returns stdout.
fn cutover_in(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(common::exe())
        .arg("-c")
        .arg(dir.join("cutover.toml"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "cutover {args:?}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A workspace whose journal holds deployment `d1`, v1 -> v2, rolled back after web1's health
/// gate failed with the instance's last log lines.
fn rolled_back_deployment() -> tempfile::TempDir {
    rolled_back_deployment_with(serde_json::json!({"served": 3, "failed_requests": 0}))
}

/// [`rolled_back_deployment`] whose report is `report`.
fn rolled_back_deployment_with(report: serde_json::Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cutover.toml"), JOURNAL_ONLY).unwrap();
    let journal = cutover::journal::Journal::open(&dir.path().join(".cutover")).unwrap();
    journal
        .begin(&cutover::journal::DeploymentRow {
            id: "d1".into(),
            app: "test".into(),
            kind: "deploy".into(),
            strategy: "rolling".into(),
            from: Some("v1".into()),
            to: "v2".into(),
            who: "tester".into(),
            started_ms: cutover::journal::now_ms(),
            ended_ms: None,
            outcome: None,
            previous: Default::default(),
            report: None,
            status: None,
            damaged: None,
        })
        .unwrap();
    let step = journal
        .step_start("d1", "web1", "start", "v2 on port 4000")
        .unwrap();
    journal
        .step_end(
            step,
            "failed: the process exited (status 1); its last log lines:\npanic: no DATABASE_URL\nexiting",
            None,
        )
        .unwrap();
    journal
        .event(Some("d1"), "rollback: web1\nstill serving v1")
        .unwrap();
    journal.finish("d1", "rolled_back", &report).unwrap();
    dir
}

/// Regression: the deploy printed 519 served, 27 failed, the part no release was credited
/// with and a note that 27 requests were closed at a drain deadline; `show` and the HTML
/// report said only "by release: v2: 459, v5: 33" (which does not add up) and no note. All
/// three print the same lines.
#[test]
fn show_and_the_html_report_print_what_the_deploy_printed() {
    let report = serde_json::json!({
        "id": "d1", "app": "test", "kind": "deploy", "from": "v1", "to": "v2",
        "outcome": "rolled_back", "started_unix": 0, "duration_ms": 1000, "batches": [],
        "moved_hosts": [], "failed_hosts": [], "stuck_hosts": [],
        "served": 519, "failed_requests": 27, "served_by_release": {"v2": 459, "v5": 33},
        "notes": ["27 request(s) or upgraded connection(s) (WebSocket) were still open at a drain deadline and were closed"],
    });
    let dir = rolled_back_deployment_with(report.clone());
    let report: cutover::deploy::Report = serde_json::from_value(report).unwrap();
    let lines = cutover::report::Proof::of(&report).lines();
    assert_eq!(
        lines[0],
        "requests during the deploy: 519 served, 27 failed (v2: 459, v5: 33, not attributed to a release: 27)"
    );
    let show = cutover_in(dir.path(), &["show"]);
    let html = std::fs::read_to_string(cutover_in(dir.path(), &["show", "--html"]).trim()).unwrap();
    for line in &lines {
        assert!(show.contains(&format!("  {line}\n")), "{line}\n{show}");
        assert!(html.contains(&cutover::report::esc(line)), "{line}\n{html}");
    }
}

/// A health gate's failure carries the instance's last log lines: `show` keeps them under
/// their step (at the left margin they read as rows of their own), and events likewise.
#[test]
fn show_keeps_a_multi_line_failure_under_its_step() {
    let dir = rolled_back_deployment();
    let out = cutover_in(dir.path(), &["show"]);
    let lines: Vec<&str> = out.lines().collect();
    let at = |text: &str| {
        lines
            .iter()
            .position(|l| l.contains(text))
            .unwrap_or_else(|| panic!("no line with {text:?}:\n{out}"))
    };
    let row = at("failed: the process exited");
    assert!(
        lines[row]
            .trim_start()
            .starts_with(|c: char| c.is_ascii_digit()),
        "the step's row: {out}"
    );
    for (i, text) in ["panic: no DATABASE_URL", "exiting"].iter().enumerate() {
        assert_eq!(at(text), row + 1 + i, "in order under the row: {out}");
        assert_eq!(
            lines[row + 1 + i],
            format!("{:21}{text}", ""),
            "indented to the row's HOST column: {out}"
        );
    }
    let event = at("event: rollback: web1");
    assert_eq!(
        lines[event + 1],
        format!("{:18}still serving v1", ""),
        "under the event's message: {out}"
    );
}

/// People read "rolled back" in `show`, `history` and the HTML report; the JSON keeps
/// `rolled_back`, the value scripts match.
#[test]
fn outcomes_read_as_words_and_stay_values_in_json() {
    let dir = rolled_back_deployment();
    let show = cutover_in(dir.path(), &["show"]);
    assert!(
        show.contains("deployment d1: deploy rolling v1 -> v2 (rolled back), by tester"),
        "{show}"
    );
    let history = cutover_in(dir.path(), &["history"]);
    let row = history.lines().find(|l| l.starts_with("d1 ")).unwrap();
    assert!(row.contains(" rolled back "), "{history}");
    for text in [&show, &history] {
        assert!(!text.contains("rolled_back"), "{text}");
    }
    let report = cutover_in(dir.path(), &["show", "--html"]);
    let html = std::fs::read_to_string(report.trim()).unwrap();
    assert!(
        html.contains("<b class=\"outcome rolled_back\">rolled back</b>"),
        "the class keeps the value, the text reads as words: {html}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&cutover_in(dir.path(), &["show", "--json"])).unwrap();
    assert_eq!(json["deployment"]["outcome"], "rolled_back");
    let json: serde_json::Value =
        serde_json::from_str(&cutover_in(dir.path(), &["history", "--json"])).unwrap();
    assert_eq!(json[0]["outcome"], "rolled_back");
}

/// Cron, systemd units and containers often set neither `$USER` nor `$LOGNAME`: the deployer
/// is then the real uid's name, not "unknown".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployer_without_user_in_the_environment_is_named_by_uid() {
    let fleet = Fleet::start(FleetSpec::new(1, 74)).await;
    let out = tokio::process::Command::new(common::exe())
        .arg("-c")
        .arg(&fleet.config)
        .args(["deploy", "--version", "v1"])
        .env_remove("USER")
        .env_remove("LOGNAME")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let me = std::process::Command::new("id")
        .arg("-un")
        .output()
        .unwrap();
    let me = String::from_utf8_lossy(&me.stdout).trim().to_string();
    assert!(!me.is_empty());
    let (code, show, err) = fleet.cutover(&["show", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let show: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(show["deployment"]["who"], me.as_str(), "{show}");
}

/// Review finding: a deploy whose balancer was never up said "run `cutover deploy --resume`
/// once the balancer is back", and `--resume` then found nothing to resume. It now says that
/// nothing began, and running it again once the balancer is up works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_stopped_before_it_began_says_there_is_nothing_to_resume() {
    let mut fleet = Fleet::start(FleetSpec::new(2, 108)).await;
    fleet.deploy("v1", 0).await;
    let text = std::fs::read_to_string(&fleet.config)
        .unwrap()
        .replace("[balancer]\n", "[balancer]\nunreachable_timeout = \"1s\"\n");
    std::fs::write(&fleet.config, text).unwrap();

    fleet.kill_proxy().await;
    let (code, _, err) = fleet.cutover(&["deploy", "--version", "v2"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("stopped before the deployment began") && !err.contains("--resume"),
        "{err}"
    );
    fleet.start_proxy().await;
    fleet.deploy("v2", 0).await;
    fleet.assert_on("v2").await;
}
