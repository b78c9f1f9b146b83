//! Foundation: a 4-host local fleet behind `cutover proxy` rolls v1 → v2 under steady traffic
//! with zero failed requests, and bad releases roll back without a failed request.

mod common;

use std::time::Duration;

use common::{Fleet, FleetSpec};
use cutover::load::{self, LoadSpec};

/// Steady traffic through the balancer: 250 req/s, bounded.
fn traffic(fleet: &Fleet) -> load::LoadRun {
    load::start(LoadSpec {
        target: fleet.listen,
        path: "/".into(),
        rate: 250,
        max_requests: 30_000,
        max_duration: Duration::from_secs(120),
        concurrency: 8,
        headers: Vec::new(),
    })
}

/// Stops the traffic once at least `min` requests were sent (bounded by the run's own limits).
async fn stop_after(run: load::LoadRun, min: u64) -> load::LoadReport {
    tokio::time::timeout(Duration::from_secs(60), run.wait_until(|r| r.sent >= min))
        .await
        .expect("traffic reaches its minimum count");
    run.stop().await
}

/// Every host serves `version` alone (see [`Fleet::assert_on`]).
async fn assert_fleet_on(fleet: &Fleet, version: &str) {
    fleet.assert_on(version).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_deploy_under_load_fails_no_request() {
    let mut spec = FleetSpec::new(4, 1);
    spec.strategy = "kind = \"rolling\"\nbatch = [1, \"50%\"]\n".into();
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    assert_fleet_on(&fleet, "v1").await;

    let run = traffic(&fleet);
    run.wait_until(|r| r.ok >= 100).await;
    let (out, err) = fleet.deploy("v2", 0).await;
    let report = stop_after(run, 2_000).await;

    assert!(report.sent >= 2_000, "enough traffic: {report}");
    assert_eq!(
        report.failed, 0,
        "no failed request: {report}\n{:#?}\n{err}",
        report.failures
    );
    assert!(
        report.share("v1") > 0.0 && report.share("v2") > 0.0,
        "both served: {report}"
    );
    assert!(out.contains("succeeded"), "{out}");
    assert!(
        err.contains("batch 1/3: web1") && err.contains("batch 2/3: web2, web3"),
        "{err}"
    );
    assert_fleet_on(&fleet, "v2").await;
    let (code, logs, _) = fleet.cutover(&["logs", "web1"]).await;
    assert_eq!(code, 0);
    assert!(
        logs.contains("==> web1 v2 on") && logs.contains("sample-app v2 listening"),
        "{logs}"
    );
    assert!(!logs.contains("(not running"), "{logs}");
    // --all adds the stopped instances, whose pid files are gone: v1's log.
    let (code, logs, _) = fleet.cutover(&["logs", "web1", "--all"]).await;
    assert_eq!(code, 0);
    assert!(
        logs.contains("==> web1 v1 on port") && logs.contains("(not running: stopped, or failed)"),
        "{logs}"
    );
    assert!(logs.contains("sample-app v1 listening"), "{logs}");
    // v1 stays staged for an instant rollback.
    assert!(fleet.root("web1").join("releases/v1").is_dir());
}

async fn bad_release_rolls_back(version: &str, net: u8) {
    let mut spec = FleetSpec::new(4, net);
    spec.strategy = "kind = \"rolling\"\nbatch = [1, \"50%\"]\nmax_fail_percentage = 0\n".into();
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;

    let run = traffic(&fleet);
    run.wait_until(|r| r.ok >= 100).await;
    let (out, _) = fleet.deploy(version, 1).await;
    let report = stop_after(run, 1_000).await;

    assert_eq!(
        report.failed, 0,
        "no failed request: {report}\n{:#?}",
        report.failures
    );
    assert_eq!(report.share("v1"), 100.0, "v1 served throughout: {report}");
    assert!(out.contains("rolled back"), "{out}");
    assert!(
        out.contains("failed host web1"),
        "the failed host is named: {out}"
    );
    assert_fleet_on(&fleet, "v1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_that_exits_at_start_rolls_back() {
    bad_release_rolls_back("crash", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_that_stays_unhealthy_rolls_back() {
    bad_release_rolls_back("sick", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_in_a_later_batch_returns_moved_hosts() {
    let spec = FleetSpec::new(4, 4);
    let fleet = Fleet::start(spec).await;
    // "late" is healthy on web1 only: batch 1 (web1) moves, batch 2 (web2, web3) fails.
    common::write_release_healthy_only_on(&fleet.dir.path().join("releases"), "late", &["web1"]);
    fleet.deploy("v1", 0).await;

    let run = traffic(&fleet);
    run.wait_until(|r| r.ok >= 100).await;
    let (out, err) = fleet.deploy("late", 1).await;
    let report = stop_after(run, 1_500).await;

    assert_eq!(
        report.failed, 0,
        "no failed request: {report}\n{:#?}",
        report.failures
    );
    assert!(
        report.share("late") > 0.0,
        "web1 served the new release for a while: {report}"
    );
    assert!(err.contains("rollback: returning 1 host(s)"), "{err}");
    assert!(out.contains("rolled back"), "{out}");
    assert_fleet_on(&fleet, "v1").await;
}

/// Undoing a first deploy leaves the moved host as it was, serving nothing, `current`
/// included: left pointing at the rejected release, it made the next deploy record that
/// release as the host's previous one, and a later rollback returned to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undone_first_deploy_leaves_no_current_behind() {
    let mut spec = FleetSpec::new(2, 44);
    spec.strategy = "kind = \"rolling\"\nbatch = 1\n".into();
    let fleet = Fleet::start(spec).await;
    common::write_release_healthy_only_on(&fleet.dir.path().join("releases"), "half", &["web1"]);
    let (out, err) = fleet.deploy("half", 1).await;
    assert!(out.contains("rolled back"), "{out}\n{err}");
    assert_eq!(fleet.current("web1"), None, "{err}");
    assert_eq!(fleet.current("web2"), None, "{err}");
    fleet.deploy("v1", 0).await;
    let (code, out, err) = fleet.cutover(&["rollback"]).await;
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(err.contains("no earlier release"), "{out}\n{err}");
    assert_fleet_on(&fleet, "v1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_commands_gate_a_rolling_deploy() {
    let mut spec = FleetSpec::new(4, 5);
    // before_traffic tests each new instance directly; after_batch tests through the balancer
    // and here refuses v2, so the first batch of v2 is undone.
    spec.extra = "[[verify]]\ncommand = \"curl -fsS $CUTOVER_URL/ | grep -qx $CUTOVER_VERSION\"\nat = [\"before_traffic\"]\n\n\
                  [[verify]]\ncommand = \"test $CUTOVER_POINT = after_batch && test $CUTOVER_VERSION != v2\"\nat = [\"after_batch\"]\n"
        .into();
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    let (out, err) = fleet.deploy("v2", 1).await;
    assert!(out.contains("rolled back"), "{out}");
    assert!(err.contains("failed at after_batch"), "{err}");
    assert_fleet_on(&fleet, "v1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_switch_hooks_run_per_moved_host_and_their_failure_fails_it() {
    let mut spec = FleetSpec::new(4, 7);
    // Runs on this machine once per host, after its traffic moved; fails while the marker exists.
    spec.extra = "[[hooks]]\nat = \"after_switch\"\nwhere = \"local\"\ncommand = \"echo \\\"$CUTOVER_HOST $CUTOVER_VERSION\\\" >> after-switch.log; test ! -e fail-after-switch\"\n".into();
    let fleet = Fleet::start(spec).await;
    let log = fleet.dir.path().join("after-switch.log");
    let lines = || -> Vec<String> {
        let mut l: Vec<String> = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        l.sort();
        l
    };
    let (_, e1) = fleet.deploy("v1", 0).await;
    let (_, e2) = fleet.deploy("v2", 0).await;
    assert_eq!(
        lines(),
        [
            "web1 v1", "web1 v2", "web2 v1", "web2 v2", "web3 v1", "web3 v2", "web4 v1", "web4 v2"
        ],
        "once per host and deploy:\n{e1}\n{e2}"
    );

    // The first batch (web1) fails its hook: with no failure budget, web1 is returned to v2.
    std::fs::write(fleet.dir.path().join("fail-after-switch"), "").unwrap();
    let (out, err) = fleet.deploy("v1", 1).await;
    assert!(out.contains("rolled back"), "{out}\n{err}");
    assert!(err.contains("after_switch"), "the hook is named: {err}");
    assert_fleet_on(&fleet, "v2").await;
    // A rollback runs no after_switch hook: only web1's failed attempt was added.
    assert_eq!(lines().iter().filter(|l| l.ends_with(" v1")).count(), 5);
}

/// Review finding: a `before_switch` hook that fails for the release being returned to held
/// every host on the release being undone. In a rollback its failure is a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_before_switch_hook_does_not_hold_up_a_rollback() {
    let mut spec = FleetSpec::new(2, 105);
    spec.strategy = "kind = \"rolling\"\nbatch = 1\n".into();
    // Fails for v1 once the marker exists.
    spec.extra = "[[hooks]]\nat = \"before_switch\"\nwhere = \"local\"\ncommand = \"test $CUTOVER_VERSION != v1 || test ! -e fail-v1\"\n".into();
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    fleet.deploy("v2", 0).await;
    std::fs::write(fleet.dir.path().join("fail-v1"), "").unwrap();
    // Going forward, the hook still fails the host.
    let (out, err) = fleet.deploy("v1", 1).await;
    assert!(out.contains("rolled back"), "{out}\n{err}");
    assert!(err.contains("before_switch"), "the hook is named: {err}");
    assert_fleet_on(&fleet, "v2").await;
    // Going back, it warns and the hosts return.
    let (code, out, err) = fleet.cutover(&["rollback"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("WARNING") && err.contains("the host returns all the same"),
        "{err}"
    );
    assert_fleet_on(&fleet, "v1").await;
}

/// `forks` bounds host operations at once, not hosts waiting at the health gate: a batch wider
/// than `forks` gates all its hosts together rather than `forks` at a time (one health
/// interval per group).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_wider_than_forks_gates_its_hosts_together() {
    let mut spec = FleetSpec::new(4, 8);
    spec.strategy = "kind = \"rolling\"\nbatch = 4\n".into();
    let fleet = Fleet::start(spec).await;
    let text = std::fs::read_to_string(&fleet.config).unwrap();
    assert!(text.starts_with("transport = \"local\"\n"), "{text}");
    std::fs::write(
        &fleet.config,
        text.replacen(
            "transport = \"local\"\n",
            "transport = \"local\"\nforks = 1\n",
            1,
        ),
    )
    .unwrap();
    fleet.deploy("v1", 0).await;
    fleet.deploy("v2", 0).await;
    assert_fleet_on(&fleet, "v2").await;

    let journal = cutover::journal::Journal::open(&fleet.dir.path().join(".cutover")).unwrap();
    let last = journal.deployments("test", 1).unwrap().remove(0);
    assert_eq!(last.to, "v2");
    let admits: Vec<_> = journal
        .steps(&last.id)
        .unwrap()
        .into_iter()
        .filter(|s| s.action == "admit")
        .collect();
    assert_eq!(admits.len(), 4, "{admits:#?}");
    let last_start = admits.iter().map(|s| s.started_ms).max().unwrap();
    let first_end = admits.iter().filter_map(|s| s.ended_ms).min().unwrap();
    assert!(
        last_start < first_end,
        "every host's gate began before the first one passed: {admits:#?}"
    );
}

/// A fleet of `hosts` in place on one fixed port (returned), rolled a host at a time with no
/// failure allowed.
fn in_place_spec(hosts: usize, net: u8) -> (FleetSpec, u16) {
    let port = common::free_port(&format!("127.0.{net}.11"));
    let mut spec = FleetSpec::new(hosts, net);
    spec.strategy = "kind = \"rolling\"\nbatch = 1\nmax_fail_percentage = 0\n".into();
    spec.app_extra = format!("mode = \"in-place\"\nport = {port}\n");
    (spec, port)
}

/// `mode = "in-place"`: an app on a fixed port cannot run twice on a host, so each host leaves
/// the balancer (drained), stops, starts the new release on the same port and comes back,
/// while the other hosts serve. A release that fails on a host puts its previous release back
/// there at once, and the deploy rolls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_mode_restarts_each_host_on_its_fixed_port_without_a_failed_request() {
    let net = 19;
    let (spec, port) = in_place_spec(3, net);
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    assert_fleet_on(&fleet, "v1").await;
    let on_fixed_port = |backends: &[cutover::balancer::BackendView]| {
        backends.iter().all(|b| b.spec.address.port() == port)
    };
    assert!(on_fixed_port(&fleet.backends().await));

    let run = traffic(&fleet);
    run.wait_until(|r| r.ok >= 100).await;
    let (out, err) = fleet.deploy("v2", 0).await;
    run.wait_until(|r| r.ok >= 600).await;
    let (bad_out, bad_err) = fleet.deploy("sick", 1).await;
    let report = stop_after(run, 2_000).await;

    assert_eq!(
        report.failed, 0,
        "no failed request: {report}\n{:#?}\n{err}\n{bad_err}",
        report.failures
    );
    assert!(out.contains("succeeded"), "{out}\n{err}");
    for host in ["web1", "web2", "web3"] {
        assert!(
            err.contains(&format!("{host}: out of the balancer; stopped v1")),
            "{host} was drained and stopped before its new instance started:\n{err}"
        );
    }
    assert!(bad_out.contains("rolled back"), "{bad_out}\n{bad_err}");
    assert!(
        bad_err.contains("restore web1: starting v2 again in place")
            && bad_out.contains("restored: v2 serves again on the host"),
        "{bad_err}"
    );
    assert!(
        !bad_err.contains("batch 2/3"),
        "the budget stopped the deploy at its first batch:\n{bad_err}"
    );
    assert_fleet_on(&fleet, "v2").await;
    assert!(on_fixed_port(&fleet.backends().await));
}

/// The fewest hosts with an active, healthy backend seen while `watch` ran (polled every 5 ms
/// until the returned stop is sent).
fn watch_serving_hosts(
    fleet: &Fleet,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<usize>,
) {
    use cutover::balancer::api::Health;
    use cutover::balancer::{BackendState, Balancer};
    let client = fleet.client();
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let watch = tokio::spawn(async move {
        let mut fewest = usize::MAX;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while stopped.try_recv().is_err() && tokio::time::Instant::now() < deadline {
            if let Ok(backends) = client.backends().await {
                let mut serving: Vec<&str> = backends
                    .iter()
                    .filter(|b| b.state == BackendState::Active && b.health == Health::Healthy)
                    .map(|b| b.spec.host.as_str())
                    .collect();
                serving.sort();
                serving.dedup();
                fewest = fewest.min(serving.len());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the watch outlived its 60 s bound: it saw only part of the deploy"
        );
        fewest
    });
    (stop, watch)
}

/// In place, a failure in a later batch restarts the failed host's release, then returns the
/// moved hosts in waves no larger than a batch: never more than one host of four is out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_rollback_returns_hosts_a_batch_at_a_time() {
    let net = 20;
    let (spec, _) = in_place_spec(4, net);
    let fleet = Fleet::start(spec).await;
    // One permit for host work: the restore and the undo must not wait on one another for it.
    let text = std::fs::read_to_string(&fleet.config).unwrap();
    std::fs::write(
        &fleet.config,
        text.replacen(
            "transport = \"local\"\n",
            "transport = \"local\"\nforks = 1\n",
            1,
        ),
    )
    .unwrap();
    // "late" is healthy on web1 and web2 only: two batches move, the third (web3) fails.
    common::write_release_healthy_only_on(
        &fleet.dir.path().join("releases"),
        "late",
        &["web1", "web2"],
    );
    fleet.deploy("v1", 0).await;

    let run = traffic(&fleet);
    run.wait_until(|r| r.ok >= 100).await;
    let (stop, watch) = watch_serving_hosts(&fleet);
    let (out, err) = fleet.deploy("late", 1).await;
    let _ = stop.send(());
    let fewest = watch.await.unwrap();
    let report = stop_after(run, 1_500).await;

    assert_eq!(
        report.failed, 0,
        "no failed request: {report}\n{:#?}\n{err}",
        report.failures
    );
    assert!(out.contains("rolled back"), "{out}\n{err}");
    assert!(
        out.contains("failed host web3") && out.contains("restored: v1 serves again on the host"),
        "{out}"
    );
    assert!(err.contains("rollback: returning 2 host(s)"), "{err}");
    assert_eq!(fewest, 3, "one host of four out at a time:\n{err}");
    assert_fleet_on(&fleet, "v1").await;
}

/// In place, a host whose previous release cannot start again serves nothing: the deployment
/// ends `failed` and names it, instead of reporting a clean rollback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_host_left_empty_fails_the_deployment_and_is_named() {
    let net = 27;
    let (spec, _) = in_place_spec(2, net);
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    // v1 can no longer start on web1: its staged copy is gone.
    std::fs::remove_dir_all(fleet.root("web1").join("releases/v1")).unwrap();

    let (out, err) = fleet.deploy("sick", 1).await;
    assert!(out.contains(": failed in"), "{out}\n{err}");
    assert!(
        out.contains("NOT ROLLED BACK web1") && out.contains("so the host serves nothing"),
        "{out}\n{err}"
    );
    let serving: Vec<String> = fleet
        .backends()
        .await
        .into_iter()
        .map(|b| b.spec.host)
        .collect();
    assert_eq!(serving, ["web2"], "web2 still serves v1");
}

/// In place, a process cutover did not start that holds the fixed port would answer the health
/// gate for a new instance that could not bind: the host fails before anything starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_refuses_a_port_held_by_a_foreign_process() {
    let net = 29;
    let (spec, port) = in_place_spec(2, net);
    let fleet = Fleet::start(spec).await;
    let foreign = std::net::TcpListener::bind(format!("127.0.{net}.11:{port}")).unwrap();

    let (out, err) = fleet.deploy("v1", 1).await;
    assert!(out.contains("rolled back"), "{out}\n{err}");
    assert!(
        out.contains(&format!(
            "127.0.{net}.11:{port} still accepts connections after the host's instances stopped"
        )),
        "{out}"
    );
    assert!(
        !err.contains("web1: started v1"),
        "nothing started on web1:\n{err}"
    );
    assert!(
        fleet.live_instances().is_empty(),
        "{:?}",
        fleet.live_instances()
    );
    drop(foreign);
}

/// A rolling fleet of 4 hosts, a host per batch, held by `cutover pause` at the boundary after
/// the batch that is running when the pause is sent; returns the fleet, the deploy of v2 and
/// the paused status (its `batch` is the batch that ended, `next` the one held back).
async fn paused_rolling_deploy(
    net: u8,
) -> (
    Fleet,
    load::LoadRun,
    tokio::task::JoinHandle<(i32, String, String)>,
    serde_json::Value,
) {
    let mut spec = FleetSpec::new(4, net);
    spec.strategy = "kind = \"rolling\"\nbatch = 1\nmax_fail_percentage = 0\n".into();
    // About a second per batch, so the pause lands at an early boundary, not after the last.
    spec.health_extra = "healthy_threshold = 5\n".into();
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    let run = traffic(&fleet);
    run.wait_until(|r| r.ok >= 100).await;

    let deploy = fleet.spawn_cutover(&["deploy", "--version", "v2"]);
    fleet
        .wait_status("the first batch", |d| d["status"]["batch"] == "batch 1/4")
        .await;
    let (code, out, err) = fleet.cutover(&["pause"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let paused = fleet
        .wait_status("the pause", |d| {
            d["status"]["phase"] == "paused by an operator"
        })
        .await;
    (fleet, run, deploy, paused)
}

/// Review finding: an `abort` sent to a deployer that was then killed stayed queued, and
/// `cutover deploy --resume` carried it out at its first batch boundary: one more host moved
/// for nothing, then everything went back. The resume drops it and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_drops_commands_the_killed_deployer_never_read() {
    let mut spec = FleetSpec::new(3, 106);
    spec.strategy = "kind = \"rolling\"\nbatch = 1\n".into();
    // About a second per batch: the abort waits for a boundary the killed deployer never reaches.
    spec.health_extra = "healthy_threshold = 5\n".into();
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    let deploy = fleet.spawn_cutover(&["deploy", "--version", "v2"]);
    fleet
        .wait_status("the first batch", |d| d["status"]["batch"] == "batch 1/3")
        .await;
    let (code, out, err) = fleet.cutover(&["abort"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    fleet.kill_running_deploy(deploy).await;

    let (code, out, err) = fleet.cutover(&["deploy", "--resume"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains(
            "`cutover abort` was sent to the interrupted deployer and never read: dropped"
        ),
        "{err}"
    );
    assert!(out.contains("succeeded"), "{out}\n{err}");
    assert_fleet_on(&fleet, "v2").await;
}

/// Review finding: a host that serves the new release but could not settle (its old instance
/// still running, `current` not moved) was reported without a way to mend it. The report says
/// to deploy the release again, and that does settle it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_could_not_settle_is_mended_by_deploying_again() {
    let mut spec = FleetSpec::new(2, 107);
    spec.strategy = "kind = \"rolling\"\nbatch = 1\nmax_fail_percentage = 50\n".into();
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    // `current` replaced by a directory with something in it: the settle cannot move it.
    let host = fleet.hosts[1].0.clone();
    let current = fleet.root(&host).join("current");
    std::fs::remove_file(&current).unwrap();
    std::fs::create_dir(&current).unwrap();
    std::fs::write(current.join("keep"), "").unwrap();

    let (code, out, err) = fleet.cutover(&["deploy", "--version", "v2"]).await;
    assert_eq!(code, 0, "within the failure budget: {out}\n{err}");
    assert!(
        out.contains(&format!(
            "failed host {host}: serves v2, but its other instances may still run"
        )) && out.contains("run `cutover deploy --version v2` again once the host answers"),
        "{out}\n{err}"
    );
    std::fs::remove_dir_all(&current).unwrap();
    let (code, out, err) = fleet.cutover(&["deploy", "--version", "v2"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert_fleet_on(&fleet, "v2").await;
}

/// How many hosts the balancer routes to each release.
async fn routed(fleet: &Fleet) -> std::collections::BTreeMap<String, usize> {
    let mut n = std::collections::BTreeMap::new();
    for b in fleet.backends().await {
        if b.state == cutover::balancer::BackendState::Active {
            *n.entry(b.spec.release).or_default() += 1;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_rolling_deploy_holds_between_batches_until_resumed() {
    let (fleet, run, deploy, paused) = paused_rolling_deploy(48).await;
    // The batch that ended is whichever ran when the pause arrived; the fleet holds there.
    let done: usize = paused["status"]["batch"]
        .as_str()
        .and_then(|b| b.strip_prefix("batch "))
        .and_then(|b| b.strip_suffix("/4"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a batch label: {paused}"));
    assert!(done < 4, "paused before a batch: {paused}");
    assert_eq!(
        paused["status"]["next"],
        format!("batch {}/4", done + 1),
        "{paused}"
    );
    // The moved hosts' old backends leave the balancer (their retire is not held back), then
    // nothing moves.
    let expected =
        std::collections::BTreeMap::from([("v1".to_string(), 4 - done), ("v2".to_string(), done)]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while routed(&fleet).await != expected {
        assert!(
            std::time::Instant::now() < deadline,
            "routing at the pause: {:?}, expected {expected:?}",
            routed(&fleet).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(routed(&fleet).await, expected, "nothing moves while paused");
    assert!(!deploy.is_finished(), "the deploy waits");

    let (code, out, err) = fleet.cutover(&["resume"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = deploy.await.unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("paused before batch"), "{err}");
    assert!(err.contains("resume: going on with batch"), "{err}");
    let report = stop_after(run, 2_000).await;
    assert_eq!(
        report.failed, 0,
        "no failed request: {report}\n{:#?}",
        report.failures
    );
    assert_fleet_on(&fleet, "v2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_of_a_running_rolling_deploy_returns_every_moved_host() {
    let (fleet, run, deploy, paused) = paused_rolling_deploy(49).await;
    let done = paused["status"]["batch"].as_str().unwrap().to_string();
    // `cutover rollback` asks the running deploy to go back and waits for it to end.
    let (code, out, err) = fleet.cutover(&["rollback"]).await;
    assert_eq!(code, 0, "the rollback happened: {out}\n{err}");
    assert!(out.contains("rolled back"), "{out}");
    let (code, out, err) = deploy.await.unwrap();
    assert_eq!(code, 1, "the deploy was rolled back: {out}\n{err}");
    assert!(out.contains("rolled back"), "{out}");
    assert!(
        out.contains(&format!("rollback requested by an operator after {done}")),
        "the report says why: {out}"
    );
    let report = stop_after(run, 2_000).await;
    assert_eq!(
        report.failed, 0,
        "no failed request: {report}\n{:#?}",
        report.failures
    );
    assert_fleet_on(&fleet, "v1").await;
}

/// `cutover rollback` while a rollback runs must not roll the rollback back (that would put
/// the fleet on the release being left); it waits for the running one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_during_a_rollback_waits_for_it_instead_of_undoing_it() {
    let mut spec = FleetSpec::new(4, 54);
    spec.strategy = "kind = \"rolling\"\nbatch = 1\n".into();
    spec.health_extra = "healthy_threshold = 5\n".into();
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    fleet.deploy("v2", 0).await;
    let first = fleet.spawn_cutover(&["rollback"]);
    fleet
        .wait_status("the rollback", |d| d["kind"] == "rollback")
        .await;
    let (code, out, err) = fleet.cutover(&["rollback"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("a rollback is already running"), "{err}");
    let (code, out, err) = first.await.unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    fleet.assert_on("v1").await;
}

/// A verify command leads its own process group (so its timeout kills all of it); Ctrl-C on
/// the deploy must still end it, and what it started, instead of orphaning them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_on_a_deploy_ends_its_verify_command_too() {
    let mut spec = FleetSpec::new(1, 9);
    let pid_file = std::env::temp_dir().join(format!("cutover-verify-{}.pid", std::process::id()));
    spec.extra = format!(
        "[[verify]]\ncommand = \"sleep 30 & echo $! > {}; wait\"\nat = [\"after_batch\"]\ntimeout = \"60s\"\n",
        pid_file.display()
    );
    let fleet = Fleet::start(spec).await;
    let _ = std::fs::remove_file(&pid_file);
    let deploy = fleet.spawn_cutover(&["deploy", "--version", "v1"]);
    let pid = common::wait_for_pid_file(&pid_file, "the verify command").await;
    // As Ctrl-C would.
    fleet.signal_running_deploy(libc::SIGINT);
    let (code, _, err) = deploy.await.unwrap();
    assert_eq!(code, 130, "{err}");
    assert!(
        err.contains("interrupted: deployment") && err.contains("cutover deploy --resume"),
        "says what comes next: {err}"
    );
    let t = std::time::Instant::now();
    while cutover::journal::process_alive(pid as u32) && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let alive = common::kill_if_alive(pid);
    let _ = std::fs::remove_file(&pid_file);
    assert!(!alive, "the verify command's sleep outlived the deploy");
    // The lock went with it (review finding: it was left to a dead holder).
    let (code, out, err) = fleet.cutover(&["lock"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(out, "unlocked\nfleet: unlocked (host web1)\n", "{err}");
}

/// What an operator's command did to a deploy of v2 (after v1) whose `point` verification
/// runs a 30 s suite: the deploy's exit, stdout and stderr, how long the command took to end
/// it, and whether the suite's `sleep` outlived it.
struct StoppedVerification {
    code: i32,
    out: String,
    err: String,
    took: Duration,
    suite_alive: bool,
    fleet: Fleet,
}

async fn stop_a_long_verification(net: u8, point: &str, command: &str) -> StoppedVerification {
    let mut spec = FleetSpec::new(2, net);
    // v1 passes at once; v2's suite runs 30 s and would fail if it ever finished.
    let (pid_file, extra) = common::long_verification(net, point);
    spec.extra = extra;
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    let _ = std::fs::remove_file(&pid_file);
    let deploy = fleet.spawn_cutover(&["deploy", "--version", "v2"]);
    let pid = common::wait_for_pid_file(&pid_file, "the verify command").await;
    // `cutover status` says why the rollout waits.
    let status = fleet
        .deployment_status()
        .await
        .expect("a running deployment");
    assert_eq!(
        status["status"]["phase"],
        format!("verifying ({point})"),
        "{status}"
    );
    // The command returns once the deployment has ended.
    let sent = std::time::Instant::now();
    let (code, out, err) = fleet.cutover(&[command]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = deploy.await.unwrap();
    let took = sent.elapsed();
    let suite_alive = common::kill_if_alive(pid);
    let _ = std::fs::remove_file(&pid_file);
    StoppedVerification {
        code,
        out,
        err,
        took,
        suite_alive,
        fleet,
    }
}

impl StoppedVerification {
    /// Stopped at once, the suite gone, every host back on v1.
    async fn assert_returned(&self, point: &str, why: &str) {
        let (out, err) = (&self.out, &self.err);
        assert_eq!(self.code, 1, "{out}\n{err}");
        assert!(
            err.contains(&format!(
                "{point}: an operator's stop arrived; the verification is stopped"
            )),
            "{err}"
        );
        assert!(out.contains(why), "{out}");
        assert!(out.contains("deploy v1 -> v2: rolled back in"), "{out}");
        assert!(
            self.took < Duration::from_secs(20),
            "the deploy waited {:?} for the verification it should have stopped",
            self.took
        );
        assert!(
            !self.suite_alive,
            "the verify command's sleep outlived the stop"
        );
        self.fleet.assert_on("v1").await;
    }
}

/// A `before_traffic` suite runs inside a batch, per host: an abort sent meanwhile stops it at
/// once too (before, it waited for the suite to end), the host keeps serving v1, and the stop
/// counts as the operator's, not as a failed host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_stops_a_long_before_traffic_verification() {
    let stopped = stop_a_long_verification(28, "before_traffic", "abort").await;
    stopped
        .assert_returned(
            "before_traffic",
            "abort requested by an operator after batch 1/",
        )
        .await;
    assert!(!stopped.out.contains("failed host"), "{}", stopped.out);
}

/// An integration suite can run for minutes: `cutover rollback` sent meanwhile stops it at once
/// (and what it started) and returns the moved hosts, instead of waiting for it to finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_stops_a_long_verification_and_returns_the_moved_hosts() {
    stop_a_long_verification(60, "after_batch", "rollback")
        .await
        .assert_returned(
            "after_batch",
            "rollback requested by an operator after batch 1/2",
        )
        .await;
}

/// After the last batch too: an abort during the `after_deploy` suite returns every host
/// (before, it was never read and the deploy ended "succeeded").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_during_the_after_deploy_verification_returns_every_host() {
    stop_a_long_verification(39, "after_deploy", "abort")
        .await
        .assert_returned(
            "after_deploy",
            "abort requested by an operator during the after_deploy verification",
        )
        .await;
}

/// A stream still open when its old instance's drain deadline comes is cut: the proof counts it
/// as failed, and the report says what the deadline closed and what to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_at_the_drain_deadline_is_failed_and_explained() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut spec = FleetSpec::new(1, 38);
    spec.app_extra = "drain_timeout = \"300ms\"\n".into();
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    let mut stream = tokio::net::TcpStream::connect(fleet.listen).await.unwrap();
    stream
        .write_all(b"GET /sse?events=100&interval_ms=100 HTTP/1.1\r\nHost: app\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    stream.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let (out, _) = fleet.deploy("v2", 0).await;
    // The client saw its response end early: no terminating chunk.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(
        !String::from_utf8_lossy(&rest).contains("\r\n0\r\n\r\n"),
        "the stream ended cleanly, it was not cut"
    );
    assert!(out.contains("1 served, 1 failed"), "{out}");
    assert!(
        out.contains("1 request(s) or upgraded connection(s) (WebSocket) were still open at a drain deadline and were closed"),
        "{out}"
    );
    fleet.assert_on("v2").await;
}

/// A host hook that leaves a process writing in the background: its output must not reach the
/// session's replies, where a later step (an instance's start) would read it as its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hooks_background_output_does_not_corrupt_later_steps() {
    let mut spec = FleetSpec::new(3, 14);
    spec.strategy = "kind = \"rolling\"\nbatch = 1\n".into();
    spec.extra = "[[hooks]]\nat = \"after_stage\"\nwhere = \"host\"\ncommand = \"(for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do sleep 0.05; echo JUNK; done) & echo staged\"\n".into();
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    // Before: "starting v2 printed no pid: JUNK JUNK 7130", a rollback, and v2 left running.
    fleet.deploy("v2", 0).await;
    fleet.assert_on("v2").await;
}

/// A rollback that fails on a host stops where it is: going "back" from a rollback would send
/// the hosts it already returned forward, to the release being rolled back from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_that_fails_on_a_host_does_not_send_the_others_forward() {
    let mut spec = FleetSpec::new(3, 15);
    spec.strategy = "kind = \"rolling\"\nbatch = 1\n".into();
    spec.health_extra = "healthy_threshold = 1\n".into();
    let fleet = Fleet::start(spec).await;
    let (first, last) = (fleet.hosts[0].0.clone(), fleet.hosts[2].0.clone());
    common::write_release_healthy_only_on(
        &fleet.dir.path().join("releases"),
        "v5",
        &[&first, &fleet.hosts[1].0],
    );
    fleet.deploy("v1", 0).await;
    fleet.deploy("v2", 0).await;
    let (code, out, err) = fleet.cutover(&["rollback", "--to", "v5"]).await;
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.contains("halted"), "{out}\n{err}");
    assert_eq!(fleet.current(&first).as_deref(), Some("v5"), "{out}\n{err}");
    assert_eq!(fleet.current(&last).as_deref(), Some("v2"), "{out}\n{err}");
}

/// A release no host could take (its build fails) halts before the first batch: no host is
/// started, "failed" and sent back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_no_host_can_stage_halts_before_any_batch() {
    let fleet = Fleet::start(FleetSpec::new(2, 12)).await;
    fleet.deploy("v1", 0).await;
    let text = std::fs::read_to_string(&fleet.config).unwrap();
    std::fs::write(
        &fleet.config,
        text.replace(
            "[release]\n",
            "[release]\nbuild = \"echo no compiler >&2; exit 3\"\n",
        ),
    )
    .unwrap();
    let (code, out, err) = fleet.cutover(&["deploy", "--version", "v2"]).await;
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.contains("halted"), "{out}\n{err}");
    // The build failed on this machine: it is said as the build's failure, and no host is
    // named as the one that failed (the message once read "staging v2 failed on every host
    // (web1: ...)", a build problem as the hosts').
    assert!(
        out.contains("  failed: release v2: build `echo no compiler >&2; exit 3` failed")
            && !out.contains("host fleet")
            && !format!("{out}{err}").contains("failed on every host"),
        "{out}\n{err}"
    );
    let first = &fleet.hosts[0].0;
    assert!(!err.contains(&format!("({first}: ")), "{err}");
    assert!(err.contains("no compiler"), "the build's own words: {err}");
    assert!(!err.contains("batch 1/"), "no batch started: {err}");
    fleet.assert_on("v1").await;
}

/// A host the release cannot reach fails in its batch whatever the batches before it do: when
/// that alone spends the budget, the deploy stops before any host changes traffic. It used to
/// move the earlier batches under live traffic, fail the last, and take them back. With a
/// budget that tolerates the host, the others deploy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_the_release_cannot_reach_stop_the_deploy_before_traffic_moves() {
    let mut spec = FleetSpec::new(4, 115);
    spec.strategy = "kind = \"rolling\"\nbatch = 2\nmax_fail_percentage = 0\n".into();
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    // The last host's upload cannot be written: a directory stands where it would go.
    let last = fleet.hosts[3].0.clone();
    let blocker = fleet.root(&last).join("releases/.v2.tar.gz.upload");
    std::fs::create_dir_all(blocker.join("x")).unwrap();
    let (code, out, err) = fleet.cutover(&["deploy", "--version", "v2"]).await;
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.contains("rolled back"), "{out}\n{err}");
    assert!(
        err.contains(&format!("batch 2/2: {last} FAILED"))
            && err.contains("counting only the host(s) v2 could not be staged on: stopping before any host changes traffic"),
        "{err}"
    );
    assert!(!err.contains("batch 1/2: "), "no batch started: {err}");
    assert!(out.contains("no host changed traffic"), "{out}");
    // The directory in the way is not a partial file it removed.
    assert!(
        out.contains(".v2.tar.gz.upload could not be removed: ") && !out.contains("was removed"),
        "{out}"
    );
    for (host, _) in &fleet.hosts {
        let started: Vec<String> = std::fs::read_dir(fleet.root(host).join("log"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("v2-"))
            .collect();
        assert!(started.is_empty(), "{host} started {started:?}: {err}");
    }
    fleet.assert_on("v1").await;

    // One failed host in a batch of two is within a 50% budget: the other three move.
    let text = std::fs::read_to_string(&fleet.config).unwrap();
    std::fs::write(
        &fleet.config,
        text.replace("max_fail_percentage = 0", "max_fail_percentage = 50"),
    )
    .unwrap();
    let (code, out, err) = fleet.cutover(&["deploy", "--version", "v2"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains(&format!("batch 2/2: {last} FAILED")), "{err}");
    for (host, _) in &fleet.hosts[..3] {
        assert_eq!(fleet.current(host).as_deref(), Some("v2"), "{host}: {err}");
    }
    assert_eq!(fleet.current(&last).as_deref(), Some("v1"), "{err}");
}

/// A path release rebuilt in place under the same version: the hosts that staged it would keep
/// the old files while a host that lacked it got the new ones, one name for two codes. The
/// deploy stops before any traffic change and before any host stages, whether every host has a
/// copy or one lacks it. A release only touched (the same files, new times, as a copy or another
/// build machine leaves them) deploys as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_release_changed_in_place_is_refused() {
    let fleet = Fleet::start(FleetSpec::new(2, 70)).await;
    fleet.deploy("v1", 0).await;
    fleet.deploy("v2", 0).await;
    let releases = fleet.dir.path().join("releases");
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
    for e in std::fs::read_dir(releases.join("v1")).unwrap().flatten() {
        let f = std::fs::File::options().write(true).open(e.path()).unwrap();
        f.set_modified(later).unwrap();
    }
    fleet.deploy("v1", 0).await;
    std::fs::write(releases.join("v2").join("NOTES"), "rebuilt\n").unwrap();
    let refused = |code: i32, out: &str, err: &str| {
        assert_eq!(code, 1, "{out}\n{err}");
        assert!(out.contains("halted"), "{out}\n{err}");
        assert!(
            err.contains("its release v2 was staged from other files than")
                && err.contains("Give the new build a new version"),
            "{out}\n{err}"
        );
        assert!(!err.contains("batch 1/"), "no batch started: {err}");
    };
    let (code, out, err) = fleet.cutover(&["deploy", "--version", "v2"]).await;
    refused(code, &out, &err);
    // A host without a copy would get the new files: refused before it does.
    let (web2, _) = &fleet.hosts[1];
    let copy = fleet.root(web2).join("releases/v2");
    std::fs::remove_dir_all(&copy).unwrap();
    let (code, out, err) = fleet.cutover(&["deploy", "--version", "v2"]).await;
    refused(code, &out, &err);
    assert!(!copy.exists(), "nothing staged on {web2}: {err}");
    fleet.assert_on("v1").await;
}

/// With a `build`, what ships is the build's output: a host that lacks a release the others
/// hold gets a new build, refused when it differs from theirs (a build that stamps the time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_build_of_a_staged_path_release_is_refused_when_it_differs() {
    let fleet = Fleet::start(FleetSpec::new(2, 72)).await;
    let text = std::fs::read_to_string(&fleet.config).unwrap();
    std::fs::write(
        &fleet.config,
        text.replace("[release]\n", "[release]\nbuild = \"date +%s%N > STAMP\"\n"),
    )
    .unwrap();
    fleet.deploy("v1", 0).await;
    fleet.deploy("v2", 0).await;
    let (web2, _) = &fleet.hosts[1];
    let copy = fleet.root(web2).join("releases/v1");
    std::fs::remove_dir_all(&copy).unwrap();
    let (code, out, err) = fleet.cutover(&["deploy", "--version", "v1"]).await;
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        err.contains("its release v1 was staged from other files than"),
        "{out}\n{err}"
    );
    assert!(!copy.exists(), "nothing staged on {web2}: {err}");
    fleet.assert_on("v2").await;
}

/// A deploy of the release every host already serves changes nothing, and says so instead of
/// listing the hosts as moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_of_the_live_release_says_nothing_moved() {
    let fleet = Fleet::start(FleetSpec::new(2, 77)).await;
    fleet.deploy("v1", 0).await;
    let (out, _) = fleet.deploy("v1", 0).await;
    assert!(
        out.contains("already running v1 (not restarted): web1, web2") && !out.contains("moved:"),
        "{out}"
    );
    let (out, _) = fleet.deploy("v2", 0).await;
    assert!(
        out.contains("moved: web1, web2") && !out.contains("already running"),
        "{out}"
    );
}

/// A host whose live instance runs without a backend is put back before the first batch; one
/// whose instance does not answer (stopped here with SIGSTOP) is given up after a few health
/// intervals, not the whole `deadline`, with a warning, and moves in its batch as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_host_that_does_not_answer_is_left_to_its_batch() {
    use cutover::balancer::Balancer;
    let mut spec = FleetSpec::new(2, 138);
    spec.strategy = "kind = \"rolling\"\nbatch = 1\n".into();
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    let client = fleet.client();
    let web2 = client
        .backends()
        .await
        .unwrap()
        .into_iter()
        .find(|b| b.spec.host == "web2")
        .expect("web2 has a backend");
    client.remove(&web2.spec.id).await.unwrap();
    let (_, out, _) = fleet.cutover(&["status", "--json"]).await;
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    let pid = status["hosts"][1]["instances"][0]["pid"].as_u64().unwrap() as i32;
    // SAFETY: kill(2) on the instance this test's fleet started.
    unsafe {
        libc::kill(pid, libc::SIGSTOP);
    }

    let (out, err) = fleet.deploy("v2", 0).await;
    let said = format!("{out}{err}");
    assert!(
        said.contains("web2 run(s) the live release without a server in the balancer")
            && said.contains("WARNING: web2 could not be put back")
            && said.contains("it gets a server when its batch moves it"),
        "{said}"
    );
    fleet.assert_on("v2").await;
    let (_, out, _) = fleet.cutover(&["show", "--json"]).await;
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    let step = shown["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["action"] == "readmit" && s["host"] == "web2")
        .unwrap_or_else(|| panic!("no put-back step: {shown}"))
        .clone();
    assert!(
        step["result"].as_str().unwrap().starts_with("failed"),
        "{step}"
    );
    // The gate gave up after its checks (200 ms intervals), well before the 10 s deadline.
    let took = step["ended_ms"].as_u64().unwrap() - step["started_ms"].as_u64().unwrap();
    assert!(took < 8_000, "{took} ms: {step}");
}

/// A start command that puts the app in the background (`app &`, a daemonizing app) exits at
/// once and leaves the app in its process group. The deploy says so (it cannot notice a crash
/// of such an app), `cutover status` counts the instance as running, not dead or drift, and
/// the next deploy stops it by its group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_left_in_the_background_is_tracked_by_its_group_and_named() {
    let fleet = Fleet::start(FleetSpec::new(2, 141)).await;
    fleet.deploy("v1", 0).await;
    let dir = fleet.dir.path().join("releases").join("bg");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("run.sh"),
        format!(
            "'{}' sample-app --listen \"$CUTOVER_ADDRESS:$PORT\" --version bg >/dev/null 2>&1 &\n",
            common::exe().display()
        ),
    )
    .unwrap();
    let (out, err) = fleet.deploy("bg", 0).await;
    assert!(
        err.contains("WARNING: bg@") && err.contains("left the app running in the background"),
        "{err}"
    );
    assert!(
        out.contains("web1 (bg@") && out.contains("start it in the foreground"),
        "the report names the hosts: {out}"
    );
    let (code, status, e) = fleet.cutover(&["status"]).await;
    assert_eq!(code, 0, "{status}\n{e}");
    assert!(status.contains(" bg "), "{status}");
    assert!(!status.contains(" dead"), "{status}");
    assert!(status.contains("no drift"), "{status}");
    assert!(status.contains("NOTE web1: bg@"), "{status}");
    let (_, json, _) = fleet.cutover(&["status", "--json"]).await;
    let st: serde_json::Value = serde_json::from_str(&json).unwrap();
    let inst = &st["hosts"][0]["instances"][0];
    assert_eq!(inst["alive"], true, "{st}");
    assert_eq!(inst["background"], true, "{st}");
    let addrs: Vec<String> = st["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["instances"][0]["address"].as_str().unwrap().to_string())
        .collect();

    // Deploying v1 again stops the background apps (their start commands are long gone).
    fleet.deploy("v1", 0).await;
    for a in addrs {
        let a: std::net::SocketAddr = a.parse().unwrap();
        assert!(
            std::net::TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_err(),
            "{a} still answers"
        );
    }
}
