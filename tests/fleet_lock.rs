//! The deploy lock on the fleet (`<root>/.cutover-lock` on the first host): two control machines
//! (two state directories, so two journals) deploying the same app to the same hosts.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Fleet, FleetSpec};

const LOCK: &str = ".cutover-lock";

fn slow_release(fleet: &Fleet, name: &str, delay: &str) {
    cutover::init::write_sample_release(
        &fleet.dir.path().join("releases").join(name),
        &common::exe(),
        name,
        &format!("--startup-delay {delay}"),
    )
    .unwrap();
}

/// A second "machine": the same config with a state directory of its own.
fn second_machine(fleet: &Fleet) -> PathBuf {
    let text = std::fs::read_to_string(&fleet.config).unwrap();
    let other = fleet.dir.path().join("cutover-b.toml");
    std::fs::write(&other, format!("state_dir = \".cutover-b\"\n{text}")).unwrap();
    other
}

/// Runs cutover with `config` and `env` in the background; yields (code, stdout, stderr).
fn spawn(
    config: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> tokio::task::JoinHandle<(i32, String, String)> {
    common::spawn_cutover_with(config, args, env)
}

async fn run(config: &Path, args: &[&str]) -> (i32, String, String) {
    spawn(config, args, &[]).await.unwrap()
}

fn lock_file(fleet: &Fleet) -> PathBuf {
    fleet.root("web1").join(LOCK)
}

/// Waits until the fleet lock on web1 names `what`; returns the file's text.
async fn wait_for_fleet_lock(fleet: &Fleet, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(text) = std::fs::read_to_string(lock_file(fleet)) {
            if text.contains(what) {
                return text;
            }
        }
        assert!(Instant::now() < deadline, "no fleet lock of {what:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A lock file as another machine's deployer would leave it, on web1.
fn write_foreign_lock(fleet: &Fleet, machine: &str, pid: u32, lease_until_ms: u64) {
    write_foreign_lock_on(fleet, "web1", machine, pid, lease_until_ms)
}

/// A lock file as another machine's deployer would leave it, on `host`.
fn write_foreign_lock_on(fleet: &Fleet, host: &str, machine: &str, pid: u32, lease_until_ms: u64) {
    let holder = serde_json::json!({
        "user": "alice", "machine": machine, "pid": pid,
        "started_ms": cutover::journal::now_ms() - 5_000, "what": "deploy v9",
    });
    std::fs::create_dir_all(fleet.root(host)).unwrap();
    std::fs::write(
        fleet.root(host).join(LOCK),
        format!("cutover fleet lock 1\nholder {holder}\nlease_until_ms {lease_until_ms}\n"),
    )
    .unwrap();
}

/// Messages the journal recorded outside any deployment (the lock's).
fn lock_events(state_dir: &Path) -> Vec<String> {
    let c = rusqlite::Connection::open(state_dir.join("journal.db")).unwrap();
    let mut stmt = c
        .prepare("SELECT message FROM events WHERE deployment IS NULL ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_machine_is_refused_while_the_first_deploys_then_waits() {
    let fleet = Fleet::start(FleetSpec::new(2, 128)).await;
    let b = second_machine(&fleet);
    fleet.deploy("v1", 0).await;
    assert!(!lock_file(&fleet).exists(), "released after a deploy");
    slow_release(&fleet, "slow", "1500ms");
    let first = spawn(&fleet.config, &["deploy", "--version", "slow"], &[]);
    wait_for_fleet_lock(&fleet, "deploy slow").await;

    // Machine B's journal is free: only the fleet's lock stops it, before it changes anything.
    let (code, out, err) = run(&b, &["lock"]).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "unlocked", "{out}");
    assert!(
        lines[1].starts_with("fleet: held by deploy slow by") && lines[1].ends_with("(host web1)"),
        "{out}"
    );
    // B's journal knows nothing of A's deployment: its status says who holds the fleet.
    let (_, out, err) = run(&b, &["status"]).await;
    assert!(
        out.contains("deploy lock on the fleet: held by deploy slow by")
            && out.contains("(host web1)"),
        "{out}\n{err}"
    );
    let (_, out, _) = run(&b, &["status", "--json"]).await;
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["fleet_lock"]["host"], "web1", "{st}");
    assert_eq!(st["fleet_lock"]["holder"]["what"], "deploy slow", "{st}");
    // A blue-green's `pause` would mean nothing; this config is rolling, so B's `resume` is
    // sent (and A, not paused, goes on: see `commands_from_another_machine_reach_the_deployment`).
    let (code, out, err) = run(&b, &["resume"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("sent resume to the deployment of another machine: the fleet lock on host web1 is held by deploy slow by"),
        "{out}"
    );
    let (code, _, err) = run(&b, &["deploy", "--version", "v2"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("another deployment holds the fleet lock on host web1")
            && err.contains("deploy slow by")
            && err.contains("(pid ")
            && err.contains("--lock-wait")
            && err.contains("cutover unlock --force"),
        "names the holder and what to do: {err}"
    );
    assert!(!err.contains("nothing to resume"), "{err}");
    // Nothing of B's started: its journal records no deployment.
    let (_, history, _) = run(&b, &["history"]).await;
    assert!(!history.contains(" v2 "), "{history}");

    // With --lock-wait, B deploys once A is done.
    let (code, _, err) = run(&b, &["deploy", "--version", "v2", "--lock-wait", "60s"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("waiting for the fleet lock on host web1"),
        "{err}"
    );
    let (code, _, err) = first.await.unwrap();
    assert_eq!(code, 0, "{err}");
    fleet.assert_on("v2").await;
    assert!(!lock_file(&fleet).exists());
    let (_, out, _) = run(&b, &["lock"]).await;
    assert_eq!(out, "unlocked\nfleet: unlocked (host web1)\n");
    let (_, out, _) = run(&b, &["status"]).await;
    assert!(!out.contains("deploy lock on the fleet"), "{out}");
    let (code, _, err) = run(&b, &["abort"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no deployment is running (see `cutover status`)"),
        "{err}"
    );
    let (_, out, _) = run(&b, &["status", "--json"]).await;
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(st["fleet_lock"].is_null(), "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_fleet_lock_is_taken_over_and_said() {
    let fleet = Fleet::start(FleetSpec::new(1, 129)).await;
    // Left by a deployer on another machine whose lease ran out.
    write_foreign_lock(
        &fleet,
        "laptop-gone",
        4242,
        cutover::journal::now_ms() - 1_000,
    );
    let (_, out, _) = fleet.cutover(&["lock"]).await;
    assert!(
        out.contains("fleet: held by deploy v9 by alice on laptop-gone")
            && out.contains("its lease expired: the next deploy takes it over"),
        "{out}"
    );
    let (_, err) = fleet.deploy("v1", 0).await;
    assert!(
        err.contains("took over a stale fleet lock on host web1 (its lease expired): deploy v9 by alice on laptop-gone"),
        "{err}"
    );
    assert!(!lock_file(&fleet).exists());
    // Left by a deployer of this machine that is gone.
    let me = cutover::journal::LockHolder::me("").machine;
    write_foreign_lock(
        &fleet,
        &me,
        u32::MAX - 1,
        cutover::journal::now_ms() + 60_000,
    );
    let (_, err) = fleet.deploy("v2", 0).await;
    assert!(
        err.contains("took over a stale fleet lock on host web1 (its process is gone)"),
        "{err}"
    );
    assert!(!lock_file(&fleet).exists());
    let events = lock_events(&fleet.dir.path().join(".cutover"));
    assert!(
        events
            .iter()
            .any(|e| e.contains("took over a stale fleet lock")),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlock_force_clears_the_fleet_lock_and_records_it() {
    let fleet = Fleet::start(FleetSpec::new(1, 130)).await;
    write_foreign_lock(&fleet, "laptop", 4242, cutover::journal::now_ms() + 600_000);
    let (code, _, err) = fleet.cutover(&["deploy", "--version", "v1"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("another deployment holds the fleet lock on host web1")
            && err.contains("deploy v9 by alice on laptop"),
        "{err}"
    );
    let (code, out, err) = fleet.cutover(&["unlock", "--force"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("the lock was free")
            && out.contains(
                "removed the fleet lock on host web1 held by deploy v9 by alice on laptop"
            ),
        "{out}"
    );
    assert!(!lock_file(&fleet).exists());
    let events = lock_events(&fleet.dir.path().join(".cutover"));
    assert!(
        events
            .iter()
            .any(|e| e.contains("fleet lock on host web1 forcibly released by")),
        "{events:?}"
    );
    let (_, out, _) = fleet.cutover(&["lock"]).await;
    assert_eq!(out, "unlocked\nfleet: unlocked (host web1)\n");
    fleet.deploy("v1", 0).await;
    let (_, out, _) = fleet.cutover(&["unlock", "--force"]).await;
    assert!(out.contains("the fleet lock was free (host web1)"), "{out}");
}

/// Released on every way out: a failed deploy (rolled back) and Ctrl-C. The holder is data:
/// a user name with quotes and `$(...)` is stored as written and runs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_lock_goes_after_a_failure_and_ctrl_c_and_holds_its_holder_as_data() {
    let fleet = Fleet::start(FleetSpec::new(2, 131)).await;
    fleet.deploy("v1", 0).await;
    fleet.deploy("crash", 1).await;
    assert!(!lock_file(&fleet).exists(), "left after a rollback");

    slow_release(&fleet, "slow", "3s");
    let canary = fleet.dir.path().join("pwned");
    let evil = format!(
        "eve'; touch {0}; echo '$(touch {0})`touch {0}`",
        canary.display()
    );
    let deploy = spawn(
        &fleet.config,
        &["deploy", "--version", "slow"],
        &[("USER", &evil)],
    );
    let text = wait_for_fleet_lock(&fleet, "deploy slow").await;
    let holder: serde_json::Value = serde_json::from_str(
        text.lines()
            .find_map(|l| l.strip_prefix("holder "))
            .expect("a holder line"),
    )
    .unwrap();
    assert_eq!(holder["user"], evil.as_str(), "{text}");
    let (_, out, _) = fleet.cutover(&["lock"]).await;
    assert!(
        out.contains(&format!("fleet: held by deploy slow by {evil} on")),
        "{out}"
    );
    fleet.wait_status("the deployment", |_| true).await;
    fleet.signal_running_deploy(libc::SIGINT);
    let (code, _, err) = deploy.await.unwrap();
    assert_eq!(code, 130, "{err}");
    assert!(!lock_file(&fleet).exists(), "left after Ctrl-C: {err}");
    assert!(!fleet.root("web1").join(".cutover-lock.closing").exists());
    assert!(!canary.exists(), "the holder ran as shell");
    // The interrupted deployment is undone under a fresh lock, released again. The deployer
    // runs on while the cleanups release the locks (a round trip), but records nothing after
    // the signal: the deployment stays interrupted, as the message said.
    assert!(err.contains("interrupted: deployment"), "{err}");
    let (code, _, err) = fleet.cutover(&["rollback"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(!lock_file(&fleet).exists());
}

/// Review finding: a machine that could not reach web1 takes the lock on web2; another that
/// reaches web1 took it there and deployed beside it. The fleet read looks at every host's
/// lock file: a live one of someone else's on another host wins, and ours is given back;
/// `unlock --force` removes it there; a stale one is no obstacle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_another_machine_holds_on_another_host_is_honoured() {
    let fleet = Fleet::start(FleetSpec::new(2, 133)).await;
    fleet.deploy("v1", 0).await;
    write_foreign_lock_on(
        &fleet,
        "web2",
        "laptop-cut-off",
        4242,
        cutover::journal::now_ms() + 600_000,
    );
    let (code, _, err) = fleet.cutover(&["deploy", "--version", "v2"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("another deployment holds the fleet lock on host web2")
            && err.contains("deploy v9 by alice on laptop-cut-off")
            && err.contains("could not reach the first"),
        "{err}"
    );
    assert!(!lock_file(&fleet).exists(), "ours on web1 is given back");
    let (_, history, _) = fleet.cutover(&["history"]).await;
    assert!(!history.contains(" v2 "), "nothing began: {history}");
    // Waited for, it is still there when the wait runs out.
    let (code, _, err) = fleet
        .cutover(&["deploy", "--version", "v2", "--lock-wait", "1s"])
        .await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("waiting for the fleet lock on host web2")
            && err.contains("it was still held when --lock-wait ran out"),
        "{err}"
    );
    let (_, out, _) = fleet.cutover(&["lock"]).await;
    assert!(
        out.contains("fleet: unlocked (host web1)")
            && out.contains("fleet: also held by deploy v9 by alice on laptop-cut-off")
            && out.contains("(host web2)"),
        "{out}"
    );
    let (_, out, _) = fleet.cutover(&["status"]).await;
    assert!(
        out.contains("deploy lock on the fleet: also held by deploy v9 by alice on laptop-cut-off")
            && out.contains("(host web2)"),
        "{out}"
    );
    // `unlock --force` clears it there too, not only on the first host.
    let (code, out, err) = fleet.cutover(&["unlock", "--force"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("the fleet lock was free (host web1)")
            && out.contains(
                "removed the fleet lock on host web2 held by deploy v9 by alice on laptop-cut-off"
            ),
        "{out}"
    );
    assert!(!fleet.root("web2").join(LOCK).exists());
    fleet.deploy("v2", 0).await;
    fleet.assert_on("v2").await;
    write_foreign_lock_on(
        &fleet,
        "web2",
        "laptop-cut-off",
        4242,
        cutover::journal::now_ms() - 1_000,
    );
    fleet.deploy("v1", 0).await;
    fleet.assert_on("v1").await;
}

/// `pause`, `resume` and `abort` typed on machine B reach the deployment machine A runs:
/// through the control file beside the fleet lock, posted into A's journal, read at A's batch
/// boundaries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_from_another_machine_reach_the_deployment() {
    let mut spec = FleetSpec::new(4, 140);
    spec.strategy = "kind = \"rolling\"\nbatch = 1\n".into();
    let fleet = Fleet::start(spec).await;
    let b = second_machine(&fleet);
    fleet.deploy("v1", 0).await;
    // Each batch takes 2 s: a command read within a second of being sent is in time for the
    // boundary after the batch that is running.
    slow_release(&fleet, "slow", "2000ms");
    let first = spawn(&fleet.config, &["deploy", "--version", "slow"], &[]);
    wait_for_fleet_lock(&fleet, "deploy slow").await;

    let (code, out, err) = run(&b, &["pause"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("sent pause to the deployment of another machine: the fleet lock on host web1 is held by deploy slow by"),
        "{out}"
    );
    let control = fleet.root("web1").join(".cutover-control");
    assert!(control.exists(), "the command waits beside the lock");
    // A holds at its next boundary: its status says so, and no third host moves meanwhile.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, out, _) = run(&fleet.config, &["status"]).await;
        if out.contains("paused by an operator") {
            break;
        }
        assert!(Instant::now() < deadline, "A never paused: {out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!first.is_finished(), "paused, A waits");
    let moved = |fleet: &Fleet| {
        ["web1", "web2", "web3", "web4"]
            .iter()
            .filter(|h| {
                std::fs::read_link(fleet.root(h).join("current")).is_ok_and(|l| l.ends_with("slow"))
            })
            .count()
    };
    let held_at = moved(&fleet);
    assert!(
        (1..=2).contains(&held_at),
        "paused after the first or second batch: {held_at}"
    );

    let (code, _, err) = run(&b, &["resume"]).await;
    assert_eq!(code, 0, "{err}");
    // The next batch moves once A reads the resume.
    let deadline = Instant::now() + Duration::from_secs(20);
    while moved(&fleet) == held_at {
        assert!(Instant::now() < deadline, "A never resumed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, _, err) = run(&b, &["abort"]).await;
    assert_eq!(code, 0, "{err}");

    let (code, _, err) = first.await.unwrap();
    assert_eq!(code, 1, "aborted from B, A rolls back: {err}");
    for command in ["pause", "resume", "abort"] {
        assert!(
            err.contains(&format!("received `{command}` from "))
                && err.contains("(sent through host web1)"),
            "A says where {command} came from: {err}"
        );
    }
    fleet.assert_on("v1").await;
    assert!(!lock_file(&fleet).exists());
    assert!(!control.exists(), "the control file goes with the lock");

    // With no deployment anywhere, a command says so.
    let (code, _, err) = run(&b, &["abort"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no deployment is running"), "{err}");
}
