//! Blue-green and canary on a local fleet behind `cutover proxy`, under steady traffic counted
//! by an independent client.

mod common;

use std::time::Duration;

use common::{Fleet, FleetSpec};
use cutover::load::{self, LoadSpec};

fn traffic(fleet: &Fleet, rate: u32, headers: Vec<(String, String)>) -> load::LoadRun {
    load::start(LoadSpec {
        target: fleet.listen,
        path: "/".into(),
        rate,
        max_requests: 40_000,
        max_duration: Duration::from_secs(150),
        concurrency: 8,
        headers,
    })
}

async fn stop_after(run: load::LoadRun, min: u64) -> load::LoadReport {
    tokio::time::timeout(Duration::from_secs(60), run.wait_until(|r| r.sent >= min))
        .await
        .expect("traffic reaches its minimum count");
    run.stop().await
}

/// SIGKILLs every live instance of `version`: a release that dies under the deploy.
fn kill_instances_of(fleet: &Fleet, version: &str) {
    for (v, pid) in fleet.live_instances() {
        if v == version {
            common::kill_if_alive(pid as i32);
        }
    }
}

fn phase(d: &serde_json::Value) -> String {
    d["status"]["phase"].as_str().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_switches_atomically_and_blue_stops_after_the_delay() {
    let mut spec = FleetSpec::new(4, 41);
    spec.strategy = "kind = \"blue-green\"\nscale_down_delay = \"2s\"\n".into();
    // The integration test of the classic playbook, against green through the preview route.
    spec.extra = "[[verify]]\ncommand = \"curl -fsS -H \\\"$CUTOVER_PREVIEW_HEADER\\\" $CUTOVER_URL/ | grep -qx \\\"$CUTOVER_VERSION\\\"\"\nat = [\"before_switch\"]\n".into();
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;

    let run = traffic(&fleet, 250, Vec::new());
    run.wait_until(|r| r.ok >= 100).await;
    let deploy = fleet.spawn_cutover(&["deploy", "--version", "v2"]);
    let switched = fleet
        .wait_status("the switch", |d| phase(d) == "switched")
        .await;
    assert_eq!(switched["status"]["live"], "v2");
    // Right after the switch blue still runs (for an instant switch back), but serves nothing new.
    let at_switch = run.snapshot();
    let live = fleet.live_instances();
    assert_eq!(
        live.len(),
        8,
        "blue and green both run during the window: {live:?}"
    );
    let after = run.wait_until(|r| r.ok >= at_switch.ok + 200).await;
    let v1_after = after.by_version.get("v1").copied().unwrap_or(0)
        - at_switch.by_version.get("v1").copied().unwrap_or(0);
    assert!(
        v1_after <= 8,
        "only in-flight requests finish on blue after the switch: {v1_after}"
    );

    let (code, out, err) = deploy.await.unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("switched blue -> green at the balancer in"),
        "{out}"
    );
    let report = stop_after(run, 2_000).await;
    assert_eq!(report.failed, 0, "{report}\n{:#?}", report.failures);
    // After the delay blue is gone: one process per host, all green.
    fleet.assert_on("v2").await;
    // Deploying the live release again starts no second set: as with the other strategies,
    // hosts that serve it stay as they are.
    let pids = fleet.live_instances();
    let (code, out, err) = fleet.cutover(&["deploy", "--version", "v2"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("already running v2 (not restarted)"),
        "{out}\n{err}"
    );
    assert!(!err.contains("started v2"), "{err}");
    assert_eq!(fleet.live_instances(), pids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_rollback_in_the_window_switches_back_in_under_100ms() {
    let mut spec = FleetSpec::new(4, 42);
    spec.strategy = "kind = \"blue-green\"\nscale_down_delay = \"60s\"\n".into();
    let fleet = Fleet::start(spec).await;
    // The first deploy has no blue to switch back to: it does not hold a 60 s window open.
    let first = std::time::Instant::now();
    fleet.deploy("v1", 0).await;
    assert!(
        first.elapsed() < Duration::from_secs(30),
        "the first deploy held the switch-back window: {:?}",
        first.elapsed()
    );

    let run = traffic(&fleet, 250, Vec::new());
    run.wait_until(|r| r.ok >= 100).await;
    let deploy = fleet.spawn_cutover(&["deploy", "--version", "v2"]);
    fleet
        .wait_status("the switch", |d| phase(d) == "switched")
        .await;
    run.wait_until(|r| r.by_version.get("v2").copied().unwrap_or(0) >= 200)
        .await;
    // Blue-green has no batches: a pause is refused, not "sent" and then ignored.
    let (code, _, err) = fleet.cutover(&["pause"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("has no batches to pause"), "{err}");

    let (code, out, err) = fleet.cutover(&["rollback"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    // "switched back to blue (rollback requested) at the balancer in N µs, M ms after the decision"
    let note = out
        .lines()
        .find(|l| l.contains("switched back to blue"))
        .unwrap_or_else(|| panic!("{out}"));
    let micros: u64 = note
        .split(" in ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(
        micros < 100_000,
        "switch at the balancer took {micros} µs: {note}"
    );
    let (dcode, dout, derr) = deploy.await.unwrap();
    assert_eq!(dcode, 1, "the deploy reports a rollback: {dout}\n{derr}");

    // Traffic is back on blue: new requests see v1 only.
    let back = run.snapshot();
    let later = run.wait_until(|r| r.ok >= back.ok + 300).await;
    let v2_later = later.by_version.get("v2").copied().unwrap_or(0)
        - back.by_version.get("v2").copied().unwrap_or(0);
    assert_eq!(
        v2_later, 0,
        "no request reaches green after the switch back"
    );
    let report = stop_after(run, 2_000).await;
    assert_eq!(report.failed, 0, "{report}\n{:#?}", report.failures);
    fleet.assert_on("v1").await;
}

fn canary_spec(net: u8, steps: &str, extra_strategy: &str, analysis: &str) -> FleetSpec {
    let mut spec = FleetSpec::new(4, net);
    spec.strategy = format!(
        "kind = \"canary\"\ncanary_hosts = 1\nbatch = 2\nsteps = {steps}\n{extra_strategy}"
    );
    spec.extra = analysis.to_string();
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_steps_carry_their_share_of_traffic() {
    let spec = canary_spec(
        43,
        "[{ weight = 10, pause = \"3s\" }, { weight = 50, pause = \"3s\" }, { weight = 100, pause = \"2s\" }]",
        "",
        "[analysis]\ninterval = \"500ms\"\nmin_success_rate = 99.0\nmin_requests = 5\n",
    );
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    let run = traffic(&fleet, 300, Vec::new());
    run.wait_until(|r| r.ok >= 100).await;
    let deploy = fleet.spawn_cutover(&["deploy", "--version", "v2"]);

    for (label, weight) in [("step 1/3", 10.0), ("step 2/3", 50.0), ("step 3/3", 100.0)] {
        fleet
            .wait_status(label, |d| d["status"]["step"] == label)
            .await;
        // Skip requests that were in flight across the weight change.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let a = run.snapshot();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let b = run.snapshot();
        let v2 = b.by_version.get("v2").copied().unwrap_or(0)
            - a.by_version.get("v2").copied().unwrap_or(0);
        let share = v2 as f64 * 100.0 / (b.ok - a.ok) as f64;
        assert!(
            (share - weight).abs() <= 5.0,
            "{label}: canary share {share:.1}% vs weight {weight}%"
        );
    }
    let (code, out, err) = deploy.await.unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    let report = stop_after(run, 2_000).await;
    assert_eq!(report.failed, 0, "{report}\n{:#?}", report.failures);
    fleet.assert_on("v2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_with_errors_is_aborted_by_the_analysis() {
    let spec = canary_spec(
        44,
        "[{ weight = 20, pause = \"30s\" }, { weight = 100 }]",
        "",
        "[analysis]\ninterval = \"1s\"\nmin_success_rate = 95.0\nmin_requests = 10\nfailure_limit = 0\n",
    );
    let fleet = Fleet::start(spec).await;
    cutover::init::write_sample_release(
        &fleet.dir.path().join("releases/bad"),
        &common::exe(),
        "bad",
        "--error-rate 0.2",
    )
    .unwrap();
    fleet.deploy("v1", 0).await;
    let run = traffic(&fleet, 300, Vec::new());
    run.wait_until(|r| r.ok >= 100).await;
    let before = run.snapshot();

    let (code, out, err) = fleet.cutover(&["deploy", "--version", "bad"]).await;
    assert_eq!(code, 1, "the deploy exits 1: {out}\n{err}");
    assert!(out.contains("canary aborted: analysis failed"), "{out}");
    let during = run.snapshot();

    // Aborted within 2 analysis intervals of the canary receiving traffic.
    let (_, show, _) = fleet.cutover(&["show", "--json"]).await;
    let show: serde_json::Value = serde_json::from_str(&show).unwrap();
    let steps = show["steps"].as_array().unwrap();
    let at = |detail: &str| {
        steps
            .iter()
            .find(|s| {
                s["action"] == "weight" && s["detail"].as_str().unwrap_or("").contains(detail)
            })
            .map(|s| s["started_ms"].as_u64().unwrap())
    };
    let exposed = at("canary 20%").expect("the 20% step");
    let aborted = at("abort").expect("the abort");
    assert!(
        aborted - exposed <= 2_000 + 500,
        "aborted {} ms after exposure",
        aborted - exposed
    );

    // Failed requests: no more than the canary's share of what was sent while it was exposed.
    let sent = during.sent - before.sent;
    let failed = during.failed - before.failed;
    assert!(failed > 0, "the bad canary did serve errors");
    assert!(
        failed as f64 <= 0.20 * sent as f64,
        "{failed} failed of {sent} sent during exposure"
    );

    // All traffic on stable afterwards; canary instances stopped.
    let after = run.wait_until(|r| r.ok >= during.ok + 300).await;
    assert_eq!(after.failed, during.failed, "no failure after the abort");
    let _ = run.stop().await;
    fleet.assert_on("v1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_without_traffic_is_inconclusive_and_waits_for_an_operator() {
    let spec = canary_spec(
        45,
        "[{ weight = 50, pause = \"1s\" }, { weight = 100 }]",
        "",
        "[analysis]\ninterval = \"300ms\"\nmin_success_rate = 99.0\nmin_requests = 5\n",
    );
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    let deploy = fleet.spawn_cutover(&["deploy", "--version", "v2"]);

    let d = fleet
        .wait_status("inconclusive", |d| phase(d).contains("inconclusive"))
        .await;
    assert_eq!(d["status"]["step"], "step 1/2");
    assert_eq!(
        d["status"]["verdict"]["verdict"]["verdict"], "inconclusive",
        "{d}"
    );
    // Past its 1s pause it still holds: never a silent pass.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let d = fleet.deployment_status().await.unwrap();
    assert_eq!(d["status"]["step"], "step 1/2", "{d}");

    let (code, out, _) = fleet.cutover(&["promote"]).await;
    assert_eq!(code, 0, "{out}");
    fleet
        .wait_status("step 2", |d| d["status"]["step"] == "step 2/2")
        .await;
    let (code, out, _) = fleet.cutover(&["abort"]).await;
    assert_eq!(code, 0, "{out}");
    let (code, out, err) = deploy.await.unwrap();
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.contains("canary aborted: abort requested"), "{out}");
    fleet.assert_on("v1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_canary_keeps_a_client_on_one_version() {
    let spec = canary_spec(
        46,
        "[{ weight = 50 }, { weight = 100 }]",
        "sticky = \"cookie\"\n",
        "",
    );
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    let deploy = fleet.spawn_cutover(&["deploy", "--version", "v2"]);
    fleet
        .wait_status("step 1", |d| d["status"]["step"] == "step 1/2")
        .await;

    // Both versions serve at 50%; a client with the cookie sees only its version.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let (_, _, v) = load::get(fleet.listen, "/", &[]).await.unwrap();
        seen.insert(v.unwrap());
    }
    assert_eq!(
        seen.len(),
        2,
        "both versions serve without a cookie: {seen:?}"
    );
    for version in ["v1", "v2"] {
        let cookie = vec![("cookie".to_string(), format!("cutover_release={version}"))];
        for _ in 0..100 {
            let (status, _, v) = load::get(fleet.listen, "/", &cookie).await.unwrap();
            assert_eq!(status, 200);
            assert_eq!(v.as_deref(), Some(version), "a client pinned to {version}");
        }
    }
    let (code, _, _) = fleet.cutover(&["abort"]).await;
    assert_eq!(code, 0);
    let (code, out, err) = deploy.await.unwrap();
    assert_eq!(code, 1, "{out}\n{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_promotion_that_fails_a_batch_rolls_the_fleet_back() {
    // No analysis: the canary (web1) passes its step; promotion then fails on web2.
    let spec = canary_spec(
        47,
        "[{ weight = 50, pause = \"1s\" }, { weight = 100, pause = \"1s\" }]",
        "",
        "",
    );
    let fleet = Fleet::start(spec).await;
    // "late" is healthy on web1 only.
    common::write_release_healthy_only_on(&fleet.dir.path().join("releases"), "late", &["web1"]);
    fleet.deploy("v1", 0).await;
    let run = traffic(&fleet, 200, Vec::new());
    run.wait_until(|r| r.ok >= 100).await;
    let (out, err) = fleet.deploy("late", 1).await;
    let report = stop_after(run, 1_500).await;

    assert!(out.contains("rolled back"), "{out}\n{err}");
    assert!(
        err.contains("promote 1/2: 1 of 2 host(s) failed, more than max_fail_percentage = 0%"),
        "{err}"
    );
    assert!(err.contains("rollback: returning 1 host(s)"), "{err}");
    assert_eq!(report.failed, 0, "{report}\n{:#?}", report.failures);
    assert!(report.share("late") > 0.0, "the canary served: {report}");
    fleet.assert_on("v1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_aborts_a_canary_during_its_promotion() {
    // One step, then a promotion a host per batch, which `pause` holds and `abort` undoes.
    let mut spec = canary_spec(50, "[{ weight = 100, pause = \"300ms\" }]", "", "");
    spec.strategy = spec.strategy.replace("batch = 2\n", "batch = 1\n");
    // About a second per promotion batch, so the pause lands before the last one.
    spec.health_extra = "healthy_threshold = 5\n".into();
    assert!(spec.strategy.contains("batch = 1\n"), "{}", spec.strategy);
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    let run = traffic(&fleet, 200, Vec::new());
    run.wait_until(|r| r.ok >= 100).await;

    let deploy = fleet.spawn_cutover(&["deploy", "--version", "v2"]);
    fleet
        .wait_status("the promotion", |d| phase(d) == "promoting")
        .await;
    let (code, out, err) = fleet.cutover(&["pause"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let paused = fleet
        .wait_status("the pause", |d| phase(d) == "paused by an operator")
        .await;
    assert_eq!(paused["status"]["strategy"], "canary", "{paused}");
    let (code, out, err) = fleet.cutover(&["abort"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = deploy.await.unwrap();
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        out.contains("promotion stopped: abort requested by an operator after promote"),
        "{out}"
    );
    let report = stop_after(run, 1_500).await;
    assert_eq!(report.failed, 0, "{report}\n{:#?}", report.failures);
    fleet.assert_on("v1").await;
}

/// An abort queued while a promotion host fails its health gate is read before the failure
/// budget: with `on_failure = "halt"` the budget alone would halt with the canary host left on
/// the new release, but an operator's stop returns every host whatever `on_failure` says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_waiting_when_a_promotion_batch_fails_returns_every_host_despite_halt() {
    // canary_hosts = 1, batch = 2: promote 1/2 is web1 (the canary) and web2, where "late"
    // answers its health checks with 503: its gate fails after 15 checks 200 ms apart, time
    // enough for the abort to be queued while it runs.
    let mut spec = canary_spec(
        96,
        "[{ weight = 100, pause = \"300ms\" }]",
        "on_failure = \"halt\"\n",
        "",
    );
    spec.health_extra = "unhealthy_threshold = 15\n".into();
    let fleet = Fleet::start(spec).await;
    common::write_release_healthy_only_on(&fleet.dir.path().join("releases"), "late", &["web1"]);
    fleet.deploy("v1", 0).await;
    let run = traffic(&fleet, 200, Vec::new());
    run.wait_until(|r| r.ok >= 100).await;

    let deploy = fleet.spawn_cutover(&["deploy", "--version", "late"]);
    fleet
        .wait_status("the promotion", |d| phase(d) == "promoting")
        .await;
    let (code, out, err) = fleet.cutover(&["abort"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = deploy.await.unwrap();
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.contains("rolled back"), "{out}\n{err}");
    assert!(!out.contains("halted"), "{out}\n{err}");
    assert!(
        out.contains("promotion stopped: abort requested by an operator after promote 1/2"),
        "{out}\n{err}"
    );
    let report = stop_after(run, 1_500).await;
    assert_eq!(report.failed, 0, "{report}\n{:#?}", report.failures);
    fleet.assert_on("v1").await;
}

/// A canary killed at its 100% step leaves the stable backends at weight 0: a rollback must
/// give them their share back (it once left every backend at 0: an outage), and run side by
/// side, not as another canary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_after_a_canary_killed_at_its_full_step_serves_again() {
    let spec = canary_spec(
        51,
        "[{ weight = 50, pause = \"300ms\" }, { weight = 100, pause = \"60s\" }]",
        "",
        "",
    );
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    let deploy = fleet.spawn_cutover(&["deploy", "--version", "v2"]);
    fleet
        .wait_status("the full step", |d| d["status"]["step"] == "step 2/2")
        .await;
    fleet.kill_running_deploy(deploy).await;

    let run = traffic(&fleet, 200, Vec::new());
    let (code, out, err) = fleet.cutover(&["rollback"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(!err.contains("canary"), "a rollback runs no canary: {err}");
    let back = run.snapshot();
    run.wait_until(|r| r.sent >= back.sent + 200).await;
    let report = run.stop().await;
    assert_eq!(
        report.failed - back.failed,
        0,
        "every request served after the rollback: {report}"
    );
    fleet.assert_on("v1").await;

    // A rollback that is not an undo (here to v2, with nothing interrupted) goes side by side
    // too: no canary step to wait on (its 60s pause would hold it).
    let (code, out, err) = fleet.cutover(&["rollback", "--to", "v2"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        !err.contains("step 1/2"),
        "a rollback runs no canary: {err}"
    );
    fleet.assert_on("v2").await;
}

/// `--resume` of a killed canary undoes what it left (canary instance, weights) and starts the
/// canary again, rather than stacking a second canary on the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_a_killed_canary_starts_it_again_from_a_clean_fleet() {
    let spec = canary_spec(
        52,
        "[{ weight = 50, pause = \"60s\" }, { weight = 100, pause = \"300ms\" }]",
        "",
        "",
    );
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    let deploy = fleet.spawn_cutover(&["deploy", "--version", "v2"]);
    let killed = fleet
        .wait_status("the first step", |d| d["status"]["step"] == "step 1/2")
        .await["id"]
        .clone();
    fleet.kill_running_deploy(deploy).await;
    // What the hints say --resume does is what it does: it cannot pick up mid-way.
    let (_, status, _) = fleet.cutover(&["status"]).await;
    assert!(
        status.contains("`cutover deploy --resume` to return every host and start it again"),
        "{status}"
    );
    let (code, _, err) = fleet.cutover(&["deploy", "--version", "v2"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("start it again from the beginning"), "{err}");

    let resumed = fleet.spawn_cutover(&["deploy", "--resume"]);
    let d = fleet
        .wait_status("the new canary's first step", |d| {
            d["id"] != killed && d["status"]["step"] == "step 1/2"
        })
        .await;
    // One canary, not two: the killed run's instance was stopped and its backend removed.
    let canaries: Vec<_> = fleet
        .backends()
        .await
        .into_iter()
        .filter(|b| b.spec.release == "v2")
        .collect();
    assert_eq!(canaries.len(), 1, "{canaries:#?}\n{d}");
    let (code, out, err) = fleet.cutover(&["promote"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = resumed.await.unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("cannot continue where it stopped"), "{err}");
    fleet.assert_on("v2").await;
}

/// A post-switch analysis with no traffic to judge holds the window (blue ready to take the
/// traffic back) past `scale_down_delay` until an operator decides: never a silent pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_analysis_without_traffic_holds_blue_until_an_operator_decides() {
    let mut spec = FleetSpec::new(2, 53);
    spec.strategy =
        "kind = \"blue-green\"\nscale_down_delay = \"1s\"\npost_switch_analysis = \"400ms\"\n"
            .into();
    spec.extra =
        "[analysis]\ninterval = \"200ms\"\nmin_success_rate = 99.0\nmin_requests = 5\n".into();
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    let deploy = fleet.spawn_cutover(&["deploy", "--version", "v2"]);
    fleet
        .wait_status("the held window", |d| {
            phase(d).contains("inconclusive post-switch analysis")
        })
        .await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(!deploy.is_finished(), "held past scale_down_delay");
    assert_eq!(
        fleet.live_instances().len(),
        4,
        "blue still runs beside green"
    );
    let (code, out, err) = fleet.cutover(&["promote"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = deploy.await.unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    fleet.assert_on("v2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_prunes_releases_beyond_keep() {
    let mut spec = FleetSpec::new(2, 55);
    spec.strategy = "kind = \"blue-green\"\nscale_down_delay = \"200ms\"\n".into();
    let fleet = Fleet::start(spec).await;
    for v in ["v3", "v4"] {
        cutover::init::write_sample_release(
            &fleet.dir.path().join("releases").join(v),
            &common::exe(),
            v,
            "",
        )
        .unwrap();
    }
    // keep = 1: only the live release counts, and the way back (the previous release) is
    // protected beside it.
    let text = std::fs::read_to_string(&fleet.config).unwrap();
    std::fs::write(&fleet.config, text.replace("keep = 3", "keep = 1")).unwrap();
    for v in ["v1", "v2", "v3", "v4"] {
        fleet.deploy(v, 0).await;
    }
    fleet.assert_on("v4").await;
    for host in ["web1", "web2"] {
        let mut kept: Vec<String> = std::fs::read_dir(fleet.root(host).join("releases"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        kept.sort();
        // Each release's mark of when it was last live goes with it.
        assert_eq!(kept, [".live-v3", ".live-v4", "v3", "v4"], "{host}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_full_skips_the_remaining_steps_and_the_report_says_so() {
    let spec = canary_spec(
        56,
        "[{ weight = 10 }, { weight = 50 }, { weight = 100 }]",
        "",
        "",
    );
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    let deploy = fleet.spawn_cutover(&["deploy", "--version", "v2"]);
    fleet
        .wait_status("step 1", |d| d["status"]["step"] == "step 1/3")
        .await;
    let (code, out, _) = fleet.cutover(&["promote", "--full"]).await;
    assert_eq!(code, 0, "{out}");
    // Held before the promotion's second batch: every serving backend at its full weight, not
    // the stable ones at step 1's reduced share beside a canary at 100.
    let (code, out, _) = fleet.cutover(&["pause"]).await;
    assert_eq!(code, 0, "{out}");
    fleet
        .wait_status("the paused promotion", |d| {
            phase(d) == "paused by an operator"
        })
        .await;
    let weights: Vec<(String, u32)> = fleet
        .backends()
        .await
        .into_iter()
        .filter(|b| b.state == cutover::balancer::BackendState::Active)
        .map(|b| (b.spec.release, b.spec.weight))
        .collect();
    assert!(
        weights.iter().any(|(r, _)| r == "v1") && weights.iter().all(|(_, w)| *w == 100),
        "{weights:?}"
    );
    let (code, out, _) = fleet.cutover(&["resume"]).await;
    assert_eq!(code, 0, "{out}");
    let (code, out, err) = deploy.await.unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("canary ran 1 of 3 step(s), then `cutover promote --full` skipped the rest"),
        "{out}"
    );
    assert!(!out.contains("canary passed"), "{out}");
    // The canary host's instance started in this deployment: it moved, it was not "already
    // running v2".
    assert!(!out.contains("already running"), "{out}");
    fleet.assert_on("v2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_while_green_starts_discards_green_before_any_switch() {
    let mut spec = FleetSpec::new(2, 57);
    spec.strategy = "kind = \"blue-green\"\nscale_down_delay = \"200ms\"\n".into();
    let fleet = Fleet::start(spec).await;
    cutover::init::write_sample_release(
        &fleet.dir.path().join("releases").join("slow"),
        &common::exe(),
        "slow",
        "--startup-delay 1500ms",
    )
    .unwrap();
    fleet.deploy("v1", 0).await;
    let deploy = fleet.spawn_cutover(&["deploy", "--version", "slow"]);
    fleet.wait_status("the deployment", |_| true).await;
    let (code, out, _) = fleet.cutover(&["abort"]).await;
    assert_eq!(code, 0, "{out}");
    let (code, out, err) = deploy.await.unwrap();
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.contains("abort requested before the switch"), "{out}");
    assert!(
        err.contains("green is discarded, blue never stopped serving"),
        "{err}"
    );
    assert!(!err.contains("switched blue -> green"), "{err}");
    fleet.assert_on("v1").await;
}

/// An abort sent while green's verification runs ends it at once: green is discarded before
/// any switch, and the verification's processes are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_during_greens_verification_stops_it_before_any_switch() {
    abort_greens_verification(37, "before_switch", "verifying green (before_switch)").await;
}

/// The same for each green instance's own `before_traffic` suite (before, the abort waited
/// for it to end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_during_greens_before_traffic_verification_stops_it() {
    abort_greens_verification(26, "before_traffic", "verifying (before_traffic)").await;
}

/// A canary's own `before_traffic` suite too: the abort stops it, the canary never gets
/// traffic, and the stop is the operator's, not a failed host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_during_the_canarys_before_traffic_verification_stops_it() {
    let mut spec = canary_spec(
        49,
        "[{ weight = 50, pause = \"1m\" }, { weight = 100 }]",
        "",
        "",
    );
    let (marker, extra) = common::long_verification(49, "before_traffic");
    spec.extra = extra;
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    let _ = std::fs::remove_file(&marker);
    let deploy = fleet.spawn_cutover(&["deploy", "--version", "v2"]);
    let pid = common::wait_for_pid_file(&marker, "the verify command").await;
    let sent = std::time::Instant::now();
    let (code, out, _) = fleet.cutover(&["abort"]).await;
    assert_eq!(code, 0, "{out}");
    let (code, out, err) = deploy.await.unwrap();
    let took = sent.elapsed();
    let alive = common::kill_if_alive(pid);
    let _ = std::fs::remove_file(&marker);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        out.contains("abort requested before the first step"),
        "{out}\n{err}"
    );
    assert!(!out.contains("failed host"), "{out}");
    assert!(took < Duration::from_secs(20), "waited {took:?}");
    assert!(!alive, "the verify command's sleep outlived the abort");
    fleet.assert_on("v1").await;
}

async fn abort_greens_verification(net: u8, point: &str, phase: &str) {
    let mut spec = FleetSpec::new(2, net);
    let (marker, extra) = common::long_verification(net, point);
    spec.strategy = "kind = \"blue-green\"\nscale_down_delay = \"200ms\"\n".into();
    spec.extra = extra;
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    let _ = std::fs::remove_file(&marker);
    let deploy = fleet.spawn_cutover(&["deploy", "--version", "v2"]);
    let pid = common::wait_for_pid_file(&marker, "the verify command").await;
    let status = fleet
        .deployment_status()
        .await
        .expect("a running deployment");
    assert_eq!(status["status"]["phase"], phase, "{status}");
    // `cutover abort` returns once the deployment has ended.
    let sent = std::time::Instant::now();
    let (code, out, _) = fleet.cutover(&["abort"]).await;
    assert_eq!(code, 0, "{out}");
    let (code, out, err) = deploy.await.unwrap();
    let took = sent.elapsed();
    let alive = common::kill_if_alive(pid);
    let _ = std::fs::remove_file(&marker);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.contains("abort requested before the switch"), "{out}");
    assert!(
        err.contains(&format!(
            "{point}: an operator's stop arrived; the verification is stopped"
        )),
        "{err}"
    );
    assert!(!out.contains("failed host"), "{out}");
    assert!(!err.contains("switched blue -> green"), "{err}");
    assert!(
        took < Duration::from_secs(20),
        "the deploy waited {took:?} for the verification it should have stopped"
    );
    assert!(!alive, "the verify command's sleep outlived the abort");
    fleet.assert_on("v1").await;
}

/// A `promote` sent while green is verified does not skip the switch-back window, and a green
/// that dies in the window sends traffic back to blue instead of leaving nothing to serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_switches_back_when_green_dies_in_the_window() {
    let mut spec = FleetSpec::new(2, 10);
    spec.strategy = "kind = \"blue-green\"\nscale_down_delay = \"30s\"\n".into();
    spec.extra = "[[verify]]\ncommand = \"sleep 1\"\nat = [\"before_switch\"]\n".into();
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    let run = traffic(&fleet, 200, Vec::new());
    run.wait_until(|r| r.ok >= 100).await;
    let deploy = fleet.spawn_cutover(&["deploy", "--version", "v2"]);
    fleet
        .wait_status("green's verification", |d| {
            phase(d).contains("before_switch")
        })
        .await;
    let (code, out, err) = fleet.cutover(&["promote"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    fleet
        .wait_status("the switch", |d| phase(d) == "switched")
        .await;
    run.wait_until(|r| r.by_version.get("v2").copied().unwrap_or(0) >= 100)
        .await;
    kill_instances_of(&fleet, "v2");
    let (code, out, err) = tokio::time::timeout(Duration::from_secs(20), deploy)
        .await
        .expect("the deploy ends well before scale_down_delay")
        .unwrap();
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        out.contains("ignored `promote` sent before the switch"),
        "{out}"
    );
    assert!(
        out.contains("switched back to blue (no v2 backend is healthy"),
        "{out}"
    );
    // Blue serves again.
    let back = run.snapshot();
    let later = run.wait_until(|r| r.ok >= back.ok + 200).await;
    assert_eq!(
        later.by_version.get("v2").copied().unwrap_or(0),
        back.by_version.get("v2").copied().unwrap_or(0)
    );
    let _ = run.stop().await;
    fleet.assert_on("v1").await;
}

/// A canary that dies serves no requests to count as failures: its health aborts the step
/// instead of an inconclusive analysis holding it forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_that_dies_is_aborted_not_held_as_inconclusive() {
    let spec = canary_spec(
        30,
        "[{ weight = 20, pause = \"60s\" }, { weight = 100 }]",
        "",
        "[analysis]\ninterval = \"500ms\"\nmin_success_rate = 95.0\nmin_requests = 1000\n",
    );
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    let run = traffic(&fleet, 100, Vec::new());
    run.wait_until(|r| r.ok >= 50).await;
    let deploy = fleet.spawn_cutover(&["deploy", "--version", "v2"]);
    fleet
        .wait_status("step 1", |d| {
            d["status"]["step"] == "step 1/2" && d["status"]["verdict"].is_object()
        })
        .await;
    kill_instances_of(&fleet, "v2");
    let (code, out, err) = tokio::time::timeout(Duration::from_secs(30), deploy)
        .await
        .expect("the step ends well before its pause")
        .unwrap();
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        out.contains("canary aborted") && out.contains("no v2 backend is healthy"),
        "{out}"
    );
    let _ = run.stop().await;
    fleet.assert_on("v1").await;
    // A canary of the live release would be judged against itself: it rolls out directly.
    let (out, err) = fleet.deploy("v1", 0).await;
    assert!(
        err.contains("v1 is already the live release: no stable release to compare a canary with"),
        "{out}\n{err}"
    );
    fleet.assert_on("v1").await;
}

/// A `promote` sent before a step began (here: while the canary starts) does not skip that
/// step; one sent during the step ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promote_sent_before_a_step_does_not_skip_it() {
    let mut spec = canary_spec(48, "[{ weight = 10 }, { weight = 100 }]", "", "");
    spec.extra = "[[verify]]\ncommand = \"sleep 1\"\nat = [\"before_traffic\"]\n".into();
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    let deploy = fleet.spawn_cutover(&["deploy", "--version", "v2"]);
    fleet
        .wait_status("the canary's start", |d| phase(d) == "starting canary")
        .await;
    let (code, out, err) = fleet.cutover(&["promote"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    fleet
        .wait_status("step 1", |d| d["status"]["step"] == "step 1/2")
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let d = fleet.deployment_status().await.expect("still running");
    assert_eq!(d["status"]["step"], "step 1/2", "{d}");
    let (code, out, err) = fleet.cutover(&["promote", "--full"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = deploy.await.unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("ignored a promote sent before this step began"),
        "{err}"
    );
    fleet.assert_on("v2").await;
}

/// An abort sent while a canary promotion host runs its before_traffic suite: that host keeps
/// serving the stable release and is no failed host; every promoted host returns, as at an
/// abort during a step. (It once counted as failed, the failure budget went first, and the
/// queued abort then cut the undo's own suite: web1 was left on the new release.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_during_a_promotion_hosts_before_traffic_suite_returns_every_host() {
    stop_a_promotion_hosts_suite(78, "abort").await;
}

/// The same with `cutover rollback`, which also reports that the deployment read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_during_a_promotion_hosts_before_traffic_suite_returns_every_host() {
    stop_a_promotion_hosts_suite(80, "rollback").await;
}

async fn stop_a_promotion_hosts_suite(net: u8, command: &str) {
    // canary_hosts = 1, batch = 2: the canary is web1, promote 1/2 is web1 and web2.
    let mut spec = canary_spec(
        net,
        "[{ weight = 50 }, { weight = 100 }]",
        "",
        "[analysis]\ninterval = \"300ms\"\nmin_success_rate = 90.0\nmin_requests = 5\n",
    );
    let tmp = std::env::temp_dir();
    let slow = tmp.join(format!("cutover-slow{net}-{}", std::process::id()));
    let pid_file = tmp.join(format!("cutover-verify{net}-{}.pid", std::process::id()));
    let _ = std::fs::remove_file(&slow);
    let _ = std::fs::remove_file(&pid_file);
    // Passes at once until `slow` exists. Then v1's (the undo's) takes a second, time enough
    // for a queued stop to cut it, and v2's runs until it is stopped.
    spec.extra += &format!(
        "[[verify]]\ncommand = \"test -f {} || exit 0; test $CUTOVER_VERSION = v1 && sleep 1 && exit 0; sleep 30 & echo $! > {}; wait; exit 1\"\nat = [\"before_traffic\"]\ntimeout = \"60s\"\n",
        slow.display(),
        pid_file.display()
    );
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    let run = traffic(&fleet, 200, Vec::new());
    run.wait_until(|r| r.ok >= 100).await;

    let deploy = fleet.spawn_cutover(&["deploy", "--version", "v2"]);
    // A step without `pause` says what it waits for, and an operator's pause outlasts the
    // next analysis (which once published "analysing" over it).
    fleet
        .wait_status("step 1", |d| {
            d["status"]["step"] == "step 1/2"
                && phase(d) == "analysing (waits for `cutover promote`)"
        })
        .await;
    let (code, out, err) = fleet.cutover(&["pause"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let paused = fleet
        .wait_status("the pause", |d| phase(d) == "paused by an operator")
        .await;
    let d = fleet
        .wait_status("the next analysis", |d| {
            d["status"]["verdict"] != paused["status"]["verdict"]
        })
        .await;
    assert_eq!(phase(&d), "paused by an operator", "{d}");
    std::fs::write(&slow, "").unwrap();
    let (code, out, err) = fleet.cutover(&["promote", "--full"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let pid = common::wait_for_pid_file(&pid_file, "web2's before_traffic suite").await;
    // A rollback waits for the deployment it sent to; with --json it prints that
    // deployment's report, as one JSON line (it once printed plain text).
    let args: &[&str] = if command == "rollback" {
        &[command, "--json"]
    } else {
        &[command]
    };
    let (ccode, cout, cerr) = fleet.cutover(args).await;
    let (code, out, err) = deploy.await.unwrap();
    let alive = common::kill_if_alive(pid);
    let _ = std::fs::remove_file(&slow);
    let _ = std::fs::remove_file(&pid_file);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        out.contains(&format!(
            "promotion stopped: {command} requested by an operator after promote 1/2"
        )),
        "{out}\n{err}"
    );
    assert!(!out.contains("failed host"), "{out}\n{err}");
    assert!(!out.contains("NOT ROLLED BACK"), "{out}\n{err}");
    assert!(!alive, "the verify command's sleep outlived the {command}");
    assert_eq!(ccode, 0, "{cout}\n{cerr}");
    assert!(!cerr.contains("ended before it read"), "{cout}\n{cerr}");
    if command == "rollback" {
        let v: serde_json::Value = serde_json::from_str(cout.trim())
            .unwrap_or_else(|e| panic!("one JSON line: {e}: {cout}\n{cerr}"));
        assert_eq!(v["outcome"], "rolled_back", "{cout}");
    }
    let report = stop_after(run, 1_500).await;
    assert_eq!(report.failed, 0, "{report}\n{:#?}", report.failures);
    fleet.assert_on("v1").await;
}

/// A blue-green fleet of 2 hosts on `net`, v1 live under steady traffic, in the switch-back
/// window (`scale_down_delay`) of a deploy of v2: the fleet, the traffic, the running deploy
/// and the status at the switch.
async fn in_the_switch_back_window(
    net: u8,
    scale_down_delay: &str,
) -> (
    Fleet,
    load::LoadRun,
    tokio::task::JoinHandle<(i32, String, String)>,
    serde_json::Value,
) {
    let mut spec = FleetSpec::new(2, net);
    spec.strategy = format!("kind = \"blue-green\"\nscale_down_delay = \"{scale_down_delay}\"\n");
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    let run = traffic(&fleet, 100, Vec::new());
    run.wait_until(|r| r.ok >= 50).await;
    let deploy = fleet.spawn_cutover(&["deploy", "--version", "v2"]);
    let switched = fleet
        .wait_status("the switch", |d| phase(d) == "switched")
        .await;
    (fleet, run, deploy, switched)
}

/// A rollback in the switch-back window while every blue instance is dead: switching to blue
/// would leave nothing to serve. Green keeps serving, and the deploy and the rollback say it
/// failed (once they said "switched back to blue" and exited 0: a full outage). An ordinary
/// rollback then brings the previous release back side by side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_does_not_switch_back_to_a_dead_blue() {
    let (fleet, run, deploy, switched) = in_the_switch_back_window(79, "20s").await;
    // `cutover status` counts blue's time down (it once showed 20.0 all window long).
    let stops_in = |d: &serde_json::Value| d["status"]["blue_stops_in_s"].as_f64().unwrap();
    let first = stops_in(&switched);
    assert!(first <= 20.0, "{switched}");
    fleet
        .wait_status("blue's time to count down", |d| stops_in(d) < first - 1.0)
        .await;
    kill_instances_of(&fleet, "v1");
    let t = std::time::Instant::now();
    while !fleet
        .backends()
        .await
        .iter()
        .filter(|b| b.spec.release == "v1")
        .all(|b| b.health == cutover::balancer::api::Health::Unhealthy)
    {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the balancer never saw blue down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (code, out, err) = fleet.cutover(&["rollback"]).await;
    assert_eq!(code, 1, "the rollback did not happen: {out}\n{err}");
    assert!(!out.contains("switched back to blue"), "{out}\n{err}");
    let (code, out, err) = deploy.await.unwrap();
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        out.contains("cannot switch back to blue (rollback requested): no blue backend is healthy"),
        "{out}\n{err}"
    );
    assert!(!out.contains("switched back to blue"), "{out}\n{err}");
    // Green still serves.
    let before = run.snapshot();
    let later = run.wait_until(|r| r.ok >= before.ok + 100).await;
    assert_eq!(later.failed, before.failed, "{later}");
    // And green settled: blue's dead backends left the balancer, `current` names green.
    fleet.assert_on("v2").await;

    // The way back the report names: the previous release, side by side.
    assert!(
        out.contains("run `cutover rollback --to v1`"),
        "{out}\n{err}"
    );
    // `cutover status` says the last deployment failed, and where a rollback goes.
    let (_, status, _) = fleet.cutover(&["status"]).await;
    assert!(
        status.contains(") FAILED: hosts may be left on either release")
            && status.contains("`cutover rollback` returns the fleet to v1"),
        "{status}"
    );
    let (code, out, err) = fleet.cutover(&["rollback", "--to", "v1"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let report = stop_after(run, 800).await;
    assert!(report.share("v1") > 0.0, "{report}");
    fleet.assert_on("v1").await;
}

/// Review finding: a deployer killed in the blue-green window lost the instant switch back:
/// `cutover rollback` started blue's release again on every host, although blue still ran,
/// healthy, only draining. Now blue goes back into the balancer as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_killed_blue_green_window_rollback_puts_the_running_blue_back() {
    let (fleet, run, deploy, _) = in_the_switch_back_window(95, "60s").await;
    let blue: Vec<u32> = fleet
        .live_instances()
        .into_iter()
        .filter(|(version, _)| version == "v1")
        .map(|(_, pid)| pid)
        .collect();
    fleet.kill_running_deploy(deploy).await;

    let (code, out, err) = fleet.cutover(&["rollback"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        err.matches("was draining and still healthy: back in the balancer")
            .count(),
        2,
        "{err}"
    );
    assert!(!err.contains("started v1"), "{err}");
    let report = stop_after(run, 500).await;
    assert_eq!(report.failed, 0, "{report}\n{:#?}", report.failures);
    fleet.assert_on("v1").await;
    let now: Vec<u32> = fleet
        .live_instances()
        .into_iter()
        .map(|(_, pid)| pid)
        .collect();
    assert_eq!(now, blue, "blue's own processes serve again");
}

/// Steps an operator promoted while their analysis was inconclusive (no traffic here) are not
/// reported as passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_promoted_without_a_passing_analysis_are_not_called_passed() {
    let spec = canary_spec(
        142,
        "[{ weight = 30, pause = \"1s\" }, { weight = 100, pause = \"1s\" }]",
        "",
        "[analysis]\ninterval = \"300ms\"\nmin_success_rate = 95.0\nmin_requests = 10\n",
    );
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    let deploy = fleet.spawn_cutover(&["deploy", "--version", "v2"]);
    for label in ["step 1/2", "step 2/2"] {
        fleet
            .wait_status(label, |d| {
                d["status"]["step"] == label && phase(d).starts_with("paused: inconclusive")
            })
            .await;
        let (code, out, _) = fleet.cutover(&["promote"]).await;
        assert_eq!(code, 0, "{out}");
    }
    let (code, out, err) = deploy.await.unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("canary ran 2 step(s), 2 of them ended by `cutover promote` (2 step(s) ended by an operator before any of their analysis intervals passed)"),
        "{out}"
    );
    assert!(!out.contains("canary passed"), "{out}");
}
