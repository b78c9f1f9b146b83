//! A deploy that survives its own crash: the deployer is SIGKILLed after each of its journal
//! writes in turn (every step boundary of a 4-host rolling deploy), under steady traffic; then
//! `cutover rollback` returns the fleet, and after a second crash at the same point
//! `cutover deploy --resume` finishes it. No client request fails, no instance is orphaned, and
//! the balancer never sends a request to a stopped instance (its proxy-error counter stays 0).

mod common;

use std::time::Duration;

use common::{Fleet, FleetSpec};
use cutover::balancer::Balancer;
use cutover::load::{self, LoadSpec};

fn spec(net: u8) -> FleetSpec {
    let mut spec = FleetSpec::new(4, net);
    spec.strategy = "kind = \"rolling\"\nbatch = 2\n".into();
    spec.health_extra = "healthy_threshold = 1\n".into();
    spec
}

/// Deploys `to` with a crash after journal write `k`. Returns false when the deploy finished
/// before reaching write `k` (every boundary has been visited).
async fn crash_at(fleet: &Fleet, to: &str, k: u64) -> bool {
    let k_s = k.to_string();
    let (code, out, err) = fleet
        .cutover_env(
            &["deploy", "--version", to],
            &[("CUTOVER_CRASH_AFTER_WRITE", &k_s)],
        )
        .await;
    match code {
        -9 => true,
        0 => false,
        other => panic!("deploy {to} with a crash at write {k}: exit {other}\n{out}\n{err}"),
    }
}

async fn recover(fleet: &Fleet, args: &[&str], k: u64) {
    let (code, out, err) = fleet.cutover(args).await;
    assert_eq!(
        code, 0,
        "{args:?} after a crash at write {k}:\n{out}\n{err}"
    );
    // A new deploy is not refused any more, and the story is in the journal.
    let (code, show, _) = fleet.cutover(&["show"]).await;
    assert_eq!(code, 0);
    let expected = if args[0] == "rollback" {
        "rollback of the interrupted deployment"
    } else {
        "event: resumed"
    };
    assert!(
        show.contains(expected),
        "`cutover show` after {args:?} at write {k}:\n{show}"
    );
}

/// Whether `cutover status` reports an interrupted deployment.
async fn interrupted(fleet: &Fleet) -> bool {
    let (code, out, err) = fleet.cutover(&["status", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    match v["deployment"]["state"].as_str() {
        Some("interrupted") => true,
        None => false,
        Some(other) => panic!("deployment state {other}: {out}"),
    }
}

/// Outcome and target of the newest recorded deployment.
async fn newest_outcome(fleet: &Fleet) -> Option<(String, String)> {
    let (code, out, err) = fleet.cutover(&["history", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let newest = v.get(0)?;
    Some((
        newest["outcome"].as_str()?.to_string(),
        newest["to"].as_str()?.to_string(),
    ))
}

/// Visits every boundary k ≡ `phase` (mod `stride`).
async fn crash_every_boundary(net: u8, phase: u64, stride: u64) {
    crash_every_boundary_of(spec(net), phase, stride).await;
}

async fn crash_every_boundary_of(spec: FleetSpec, phase: u64, stride: u64) {
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    let traffic = load::start(LoadSpec {
        target: fleet.listen,
        path: "/".into(),
        rate: 100,
        max_requests: 100_000,
        max_duration: Duration::from_secs(600),
        concurrency: 4,
        headers: Vec::new(),
    });
    let (mut from, mut to) = ("v1", "v2");
    let mut k = phase;
    let mut visited = 0;
    loop {
        eprintln!("--- k = {k}: {from} -> {to}");
        // Crash, then undo: the fleet is back on `from`.
        if !crash_at(&fleet, to, k).await {
            // Past the last write: the deploy completed by itself.
            fleet.assert_on(to).await;
            break;
        }
        if !interrupted(&fleet).await {
            if newest_outcome(&fleet).await == Some(("succeeded".to_string(), to.to_string())) {
                // Killed after the outcome was recorded: every boundary has been visited.
                fleet.assert_on(to).await;
                break;
            }
            // Killed after taking the lock, before the deployment was recorded: nothing changed.
            fleet.assert_on(from).await;
            k += stride;
            continue;
        }
        // A plain deploy is refused while the interrupted one is unresolved.
        let (code, _, err) = fleet.cutover(&["deploy", "--version", to]).await;
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains("was interrupted") && err.contains("--resume"),
            "{err}"
        );
        recover(&fleet, &["rollback"], k).await;
        eprintln!("{}", fleet.cutover(&["show"]).await.1);
        fleet.assert_on(from).await;

        // Crash at the same point, then finish it: the fleet is on `to`.
        assert!(crash_at(&fleet, to, k).await, "write {k} is reached again");
        recover(&fleet, &["deploy", "--resume"], k).await;
        eprintln!("{}", fleet.cutover(&["show"]).await.1);
        fleet.assert_on(to).await;

        visited += 1;
        std::mem::swap(&mut from, &mut to);
        k += stride;
        assert!(k < 400, "the deploy never finished without a crash");
    }
    let report = traffic.stop().await;
    assert!(visited >= 10, "visited {visited} boundaries");
    assert_eq!(
        report.failed, 0,
        "no failed request: {report}\n{:#?}",
        report.failures
    );
    let stats = fleet.client().stats().await.unwrap();
    assert_eq!(
        stats.total.proxy_errors, 0,
        "the balancer never sent a request to a stopped instance: {stats:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_at_every_boundary_even() {
    crash_every_boundary(11, 1, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_at_every_boundary_odd() {
    crash_every_boundary(12, 2, 2).await;
}

/// In place (a fixed port; each host drained and stopped before its new instance starts), a
/// crash at any point leaves hosts that `cutover rollback` and `--resume` bring back, with no
/// failed request. Every third boundary, to keep the suite's time in bounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_in_place_at_every_third_boundary() {
    let net = 13;
    let port = common::free_port(&format!("127.0.{net}.11"));
    let mut spec = spec(net);
    spec.strategy = "kind = \"rolling\"\nbatch = 1\n".into();
    spec.app_extra = format!("mode = \"in-place\"\nport = {port}\n");
    crash_every_boundary_of(spec, 1, 3).await;
}

/// Runs `cutover <args>` with a crash after journal write `k`; the exit code (-9: crashed).
async fn crash_running(fleet: &Fleet, args: &[&str], k: u64) -> i32 {
    let k_s = k.to_string();
    fleet
        .cutover_env(args, &[("CUTOVER_CRASH_AFTER_WRITE", &k_s)])
        .await
        .0
}

/// A deploy killed after it began returning its hosts (its failure budget spent) is finished by
/// `--resume` going back, never forward; a killed `cutover rollback` is finished by the next
/// `cutover rollback`, never undone (undoing it would send the fleet to the release it left).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_returns_are_finished_going_back() {
    let mut s = FleetSpec::new(3, 58);
    s.strategy = "kind = \"rolling\"\nbatch = 1\n".into();
    s.health_extra = "healthy_threshold = 1\n".into();
    let fleet = Fleet::start(s).await;
    common::write_release_healthy_only_on(
        &fleet.dir.path().join("releases"),
        "half",
        &["web1", "web2"],
    );
    fleet.deploy("v1", 0).await;

    // The first write after which the journal says the deploy was going back (web1 and web2
    // moved, web3 failed): found by bisection, the fleet back on v1 after every probe.
    let going_back = |show: &str| show.contains("returning every moved host");
    let (mut lo, mut hi) = (1u64, 400u64);
    while lo < hi {
        let k = (lo + hi) / 2;
        let code = crash_running(&fleet, &["deploy", "--version", "half"], k).await;
        let after = match code {
            -9 => going_back(&fleet.cutover(&["show"]).await.1),
            1 => true, // ended (rolled back) before write k
            other => panic!("deploy half with a crash at {k}: exit {other}"),
        };
        if code == -9 && interrupted(&fleet).await {
            let (code, out, err) = fleet.cutover(&["rollback"]).await;
            assert_eq!(code, 0, "{out}\n{err}");
        }
        fleet.assert_on("v1").await;
        if after {
            hi = k;
        } else {
            lo = k + 1;
        }
    }
    assert_eq!(
        crash_running(&fleet, &["deploy", "--version", "half"], lo).await,
        -9
    );
    assert!(interrupted(&fleet).await);
    let (_, status, _) = fleet.cutover(&["status"]).await;
    assert!(
        status.contains("INTERRUPTED while it returned hosts to v1"),
        "{status}"
    );
    let (code, _, err) = fleet.cutover(&["deploy", "--version", "v2"]).await;
    assert_eq!(code, 2);
    assert!(
        err.contains("`cutover rollback` (or `cutover deploy --resume`) to finish that"),
        "{err}"
    );
    let (_, out, err) = fleet.cutover(&["deploy", "--resume"]).await;
    assert!(
        err.contains("was returning its hosts when it stopped"),
        "{out}\n{err}"
    );
    assert!(
        out.contains("counted only since this command took the interrupted deployment over"),
        "{out}\n{err}"
    );
    fleet.assert_on("v1").await;

    // A rollback v2 -> v1 killed once it is recorded: the next `cutover rollback` finishes it.
    fleet.deploy("v2", 0).await;
    let mut k = 4;
    loop {
        assert!(k < 100, "no crash left the rollback interrupted");
        if crash_running(&fleet, &["rollback"], k).await == -9 && interrupted(&fleet).await {
            break;
        }
        // Crashed before its record (nothing changed) or ended: start over from v2.
        fleet.deploy("v2", 0).await;
        k += 3;
    }
    let (code, out, err) = fleet.cutover(&["rollback"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("was interrupted: finishing it"), "{err}");
    fleet.assert_on("v1").await;
}

/// `cutover rollback` sent to a running deploy waits for it; when that deployer dies instead
/// of ending, the waiter says so at once rather than waiting out its 10 minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_waiting_on_a_deployer_that_died_says_so() {
    let fleet = Fleet::start(spec(59)).await;
    cutover::init::write_sample_release(
        &fleet.dir.path().join("releases").join("slow"),
        &common::exe(),
        "slow",
        "--startup-delay 3s",
    )
    .unwrap();
    fleet.deploy("v1", 0).await;
    let deploy = fleet.spawn_cutover(&["deploy", "--version", "slow"]);
    fleet.wait_status("the deployment", |_| true).await;
    let rollback = fleet.spawn_cutover(&["rollback"]);
    // Time for it to find the running deploy and post its command (the app boots for 3 s).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let t = std::time::Instant::now();
    fleet.kill_running_deploy(deploy).await;
    let (code, out, err) = rollback.await.unwrap();
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(err.contains("stopped without finishing"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // And `cutover rollback` then returns every host.
    let (code, out, err) = fleet.cutover(&["rollback"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    fleet.assert_on("v1").await;
}

/// Interrupts a deploy of `to` after the first host moved (and before the last did).
async fn interrupt_after_first_host(fleet: &Fleet, to: &str) {
    let first = fleet.hosts[0].0.clone();
    let last = fleet.hosts[fleet.hosts.len() - 1].0.clone();
    for k in 1..200 {
        assert!(
            crash_at(fleet, to, k).await,
            "the deploy of {to} ended before a crash"
        );
        if fleet.current(&first).as_deref() == Some(to)
            && fleet.current(&last).as_deref() != Some(to)
        {
            return;
        }
        if interrupted(fleet).await {
            let (code, out, err) = fleet.cutover(&["rollback"]).await;
            assert_eq!(
                code, 0,
                "rollback after a crash at write {k}:\n{out}\n{err}"
            );
        }
    }
    panic!("no crash point left {first} moved and {last} not");
}

/// Rewrites the interrupted deployment's record of where each host was.
fn edit_previous(fleet: &Fleet, edit: impl FnOnce(String) -> String) {
    let db = rusqlite::Connection::open(fleet.dir.path().join(".cutover/journal.db")).unwrap();
    let previous: String = db
        .query_row(
            "SELECT previous_json FROM deployments WHERE outcome IS NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    db.execute(
        "UPDATE deployments SET previous_json = ?1 WHERE outcome IS NULL",
        [edit(previous)],
    )
    .unwrap();
}

/// A rollback of an interrupted deployment acts on its record of where each host was: a host
/// the record does not name (it was unreachable when the deployment began) is left as it is,
/// not emptied; a damaged record refuses the rollback instead of emptying every host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_changes_only_hosts_its_record_names() {
    let mut s = FleetSpec::new(3, 40);
    s.strategy = "kind = \"rolling\"\nbatch = 1\n".into();
    s.health_extra = "healthy_threshold = 1\n".into();
    let fleet = Fleet::start(s).await;
    fleet.deploy("v1", 0).await;
    let last = fleet.hosts[2].0.clone();

    interrupt_after_first_host(&fleet, "v2").await;
    edit_previous(&fleet, |p| {
        let mut m: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&p).unwrap();
        assert!(m.remove(&last).is_some(), "{p}");
        serde_json::to_string(&m).unwrap()
    });
    let (code, out, err) = fleet.cutover(&["rollback"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        format!("{out}{err}").contains(&format!("rollback {last}: left as it is")),
        "{out}\n{err}"
    );
    // Every host is back on v1; the one the record did not name was never emptied. (It may
    // still run a v2 instance the crash left starting there: left as it is, as said.)
    for (h, _) in &fleet.hosts {
        assert_eq!(fleet.current(h).as_deref(), Some("v1"), "{h}: {out}\n{err}");
        let on = common::live_instances_under(&fleet.root(h));
        assert!(on.iter().any(|(v, _)| v == "v1"), "{h} serves v1: {on:?}");
        if *h != last {
            assert!(
                on.iter().all(|(v, _)| v == "v1"),
                "{h}: {on:?}\n{out}\n{err}"
            );
        }
    }

    interrupt_after_first_host(&fleet, "v2").await;
    let live = fleet.live_instances().len();
    edit_previous(&fleet, |p| p[..p.len() / 2].to_string());
    let (code, out, err) = fleet.cutover(&["rollback"]).await;
    assert_ne!(code, 0, "{out}\n{err}");
    assert!(err.contains("damaged record"), "{err}");
    assert_eq!(err.matches("damaged record").count(), 1, "said once: {err}");
    assert_eq!(
        fleet.live_instances().len(),
        live,
        "a host was changed: {out}\n{err}"
    );
    // What the message tells to run works: status, history and show still read the journal.
    for args in [&["status"][..], &["history"], &["show"]] {
        let (code, out, err) = fleet.cutover(args).await;
        assert_eq!(code, 0, "{args:?}: {out}\n{err}");
    }
}

/// A resume whose `before_deploy` hook fails (or staging, or `after_stage`) leaves the
/// interrupted deployment unfinished: it used to close it as "halted: nothing was changed"
/// over hosts it had moved, and a later rollback then skipped it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_that_fails_before_its_first_batch_leaves_the_deployment_interrupted() {
    let mut spec = spec(2);
    let fleet_marker =
        std::env::temp_dir().join(format!("cutover-hookfail-{}", std::process::id()));
    let _ = std::fs::remove_file(&fleet_marker);
    spec.extra = format!(
        "[[hooks]]\nat = \"before_deploy\"\ncommand = \"test ! -e {}\"\nwhere = \"local\"\n",
        fleet_marker.display()
    );
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    assert!(
        crash_at(&fleet, "v2", 12).await,
        "the deploy reached write 12"
    );
    assert!(interrupted(&fleet).await);

    std::fs::write(&fleet_marker, "").unwrap();
    let (code, out, err) = fleet.cutover(&["deploy", "--resume"]).await;
    let _ = std::fs::remove_file(&fleet_marker);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(err.contains("stays interrupted"), "{out}\n{err}");
    assert!(interrupted(&fleet).await, "{out}\n{err}");

    recover(&fleet, &["deploy", "--resume"], 12).await;
    fleet.assert_on("v2").await;
}

/// `cutover status` with the balancer down (after a reboot, say) still shows the hosts and the
/// interrupted deployment, which is when it is needed most; it used to print only that the
/// admin API could not be reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_without_the_balancer_still_tells_of_an_interrupted_deployment() {
    let mut fleet = Fleet::start(spec(3)).await;
    fleet.deploy("v1", 0).await;
    assert!(
        crash_at(&fleet, "v2", 12).await,
        "the deploy reached write 12"
    );
    fleet.kill_proxy().await;
    let (code, out, err) = fleet.cutover(&["status"]).await;
    assert_eq!(code, 2, "the balancer is unreachable: {out}\n{err}");
    assert!(out.contains("BALANCER UNREACHABLE"), "{out}");
    assert!(out.contains("was INTERRUPTED"), "{out}");
    assert!(out.contains("web1"), "{out}");
    assert!(out.contains("drift not checked"), "{out}");
    let (code, out, _) = fleet.cutover(&["status", "--json"]).await;
    assert_eq!(code, 2);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        v["drift"].is_null(),
        "not checked is not \"no drift\": {out}"
    );
    assert_eq!(v["deployment"]["state"], "interrupted", "{out}");
    fleet.start_proxy().await;
    recover(&fleet, &["rollback"], 12).await;
    fleet.assert_on("v1").await;
}

/// Review finding: a deployer killed with `kill -9` while a verify suite ran left the suite
/// (and what it started) running, unowned. The next deployer stops it before it begins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_deploy_stops_what_a_killed_one_left_running() {
    let mut spec = spec(94);
    let (pid_file, extra) = common::long_verification(94, "before_traffic");
    spec.extra = extra;
    let fleet = Fleet::start(spec).await;
    fleet.deploy("v1", 0).await;
    let _ = std::fs::remove_file(&pid_file);
    let deploy = fleet.spawn_cutover(&["deploy", "--version", "v2"]);
    let t = std::time::Instant::now();
    let suite = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            break pid;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "the suite never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    fleet.kill_running_deploy(deploy).await;
    // SAFETY: kill(2) with signal 0 only asks whether the test's own grandchild lives.
    let alive = |pid: u32| unsafe { libc::kill(pid as i32, 0) } == 0 && {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        !stat.contains(") Z")
    };
    assert!(
        alive(suite),
        "the killed deploy's suite should still run here"
    );
    let (code, out, err) = fleet.cutover(&["rollback"]).await;
    let t = std::time::Instant::now();
    while alive(suite) && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = alive(suite);
    if left {
        // SAFETY: cleanup of the test's own grandchild after a failure.
        unsafe { libc::kill(suite as i32, libc::SIGKILL) };
    }
    let _ = std::fs::remove_file(&pid_file);
    assert!(
        !left,
        "the suite's sleep outlived the next command\n{out}\n{err}"
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        // One or two: the batch's two hosts each run their suite, and the deploy is killed
        // once the first has started (on a busy machine, before the second has).
        ["stopped 1 command(s)", "stopped 2 command(s)"]
            .iter()
            .any(|n| err.contains(&format!("{n} (a verify suite, a hook or a build"))),
        "{err}"
    );
    fleet.assert_on("v1").await;
}
