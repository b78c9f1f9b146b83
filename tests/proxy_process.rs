//! The built-in balancer as real processes: `cutover proxy` replaced three times under steady
//! traffic (`--takeover`), and a backend process killed with SIGKILL under steady traffic.
//! Backends are `cutover sample-app` processes. Everything listens on loopback with ports picked
//! at run time (port 0, read back from the processes' first line); every child is killed on
//! drop; load is bounded in count and time.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use cutover::balancer::Balancer;
use cutover::balancer::api::{BackendSpec, BackendState};
use cutover::balancer::builtin::AdminClient;
use cutover::load::{self, LoadSpec};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const TOKEN: &str = "test-token-0123456789";
const DEADLINE: Duration = Duration::from_secs(20);

fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_cutover")
}

/// Starts a child and returns it with its first stdout line.
async fn spawn_reading(cmd: &mut Command, log: &Path) -> (Child, String) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("the child starts");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("the child prints its address in time")
        .unwrap()
        .expect("the child prints a line");
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, line)
}

/// A `cutover sample-app` process answering as `version`.
async fn sample_app(version: &str, log: &Path) -> (Child, SocketAddr) {
    sample_app_on("127.0.0.1", version, log).await
}

/// [`sample_app`] listening on `ip`.
async fn sample_app_on(ip: &str, version: &str, log: &Path) -> (Child, SocketAddr) {
    let (child, line) = spawn_reading(
        Command::new(exe()).args([
            "sample-app",
            "--listen",
            &format!("{ip}:0"),
            "--version",
            version,
        ]),
        log,
    )
    .await;
    let addr = line.rsplit(' ').next().unwrap().parse().unwrap();
    (child, addr)
}

fn spec(id: &str, addr: SocketAddr, release: &str) -> BackendSpec {
    BackendSpec {
        id: id.into(),
        address: addr,
        host: "localhost".into(),
        release: release.into(),
        weight: 100,
        health_path: "/health".into(),
        preview: false,
        gated: false,
    }
}

fn write_config(dir: &Path) -> std::path::PathBuf {
    write_config_on(dir, "127.0.0.1", "127.0.0.2")
}

/// [`write_config`] with the proxy's traffic on `listen` and its admin API on `admin` (IPs;
/// the ports are free ones picked now: the config refuses port 0).
fn write_config_on(dir: &Path, listen: &str, admin: &str) -> std::path::PathBuf {
    let free = |ip: &str| {
        std::net::TcpListener::bind((ip, 0))
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    };
    let (listen, admin) = (
        format!("{listen}:{}", free(listen)),
        format!("{admin}:{}", free(admin)),
    );
    let path = dir.join("cutover.toml");
    std::fs::write(
        &path,
        format!(
            r#"transport = "local"
state_dir = "state"

[app]
name = "t"
start = "true"
drain_timeout = "5s"

[app.health]
path = "/health"
interval = "200ms"

[release]
path = "releases/{{version}}"

[balancer]
listen = "{listen}"
admin = "{admin}"
token = "{TOKEN}"

[strategy]
kind = "rolling"

[[hosts]]
name = "h1"
address = "127.0.0.1"
root = "fleet/h1"
"#
        ),
    )
    .unwrap();
    path
}

/// `cutover proxy` (with `--takeover` when asked): the child and its (listen, admin) addresses.
async fn proxy(config: &Path, takeover: bool, log: &Path) -> (Child, SocketAddr, SocketAddr) {
    let mut cmd = Command::new(exe());
    cmd.arg("-c").arg(config).arg("proxy");
    if takeover {
        cmd.arg("--takeover");
    }
    let (child, line) = spawn_reading(&mut cmd, log).await;
    // "cutover proxy: listening on A, admin API on B"
    let listen = line
        .split("listening on ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    let admin = line.rsplit(' ').next().unwrap();
    (child, listen.parse().unwrap(), admin.parse().unwrap())
}

fn routes(views: &[cutover::balancer::BackendView]) -> Vec<(String, u32, BackendState)> {
    views
        .iter()
        .map(|v| (v.spec.id.clone(), v.spec.weight, v.state))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_takeovers_during_steady_traffic_drop_no_request_and_keep_routes_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("children.log");
    let config = write_config(dir.path());
    let (_b1, a1) = sample_app("v1", &log).await;
    let (_b2, a2) = sample_app("v1", &log).await;
    let (_b3, a3) = sample_app("v2", &log).await;

    let (mut old, listen, admin_addr) = proxy(&config, false, &log).await;
    let admin = AdminClient::new(admin_addr, TOKEN.into());
    for (id, addr, release) in [("b1", a1, "v1"), ("b2", a2, "v1"), ("b3", a3, "v2")] {
        admin.add(&spec(id, addr, release)).await.unwrap();
        admin.wait_healthy(id, DEADLINE).await.unwrap();
    }
    admin.set_weight("b2", 50).await.unwrap();
    admin.drain("b3").await.unwrap();
    let before = routes(&admin.backends().await.unwrap());
    let counting_since = admin.stats().await.unwrap().counting_since_ms;

    let run = load::start(LoadSpec {
        rate: 800,
        max_requests: 4000,
        max_duration: Duration::from_secs(40),
        concurrency: 8,
        ..LoadSpec::new(listen)
    });
    for round in 1..=3u64 {
        run.wait_until(|r| r.sent >= round * 900).await;
        // A slow request in flight across the takeover: the old proxy finishes it while it
        // drains, and hands its count over after.
        let slow = tokio::spawn(slow_get(listen, 600));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (new, new_listen, new_admin) = proxy(&config, true, &log).await;
        assert_eq!(
            (new_listen, new_admin),
            (listen, admin_addr),
            "the same sockets"
        );
        let status = tokio::time::timeout(DEADLINE, old.wait())
            .await
            .expect("the replaced proxy exits after draining")
            .unwrap();
        assert!(status.success(), "replaced proxy exited with {status}");
        assert!(
            slow.await.unwrap(),
            "the slow request across takeover {round} failed"
        );
        old = new;
        assert_eq!(
            routes(&admin.backends().await.unwrap()),
            before,
            "routing state after takeover {round}"
        );
    }
    let report = run.finish().await;
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(report.sent >= 3000, "{report}");
    assert_eq!(
        report.failed, 0,
        "{report}: {:?}\n{log_text}",
        report.failures
    );
    assert_eq!(report.ok, report.sent, "{report}");
    // Every proxy handed its counts to the next: the last one counted every response since
    // the first started.
    let stats = admin.stats().await.unwrap();
    assert_eq!(stats.counting_since_ms, counting_since, "{stats:?}");
    assert_eq!(
        stats.total.responses(),
        report.ok + 3,
        "{report}: {stats:?}"
    );
    assert_eq!(stats.unrouted, 0);
    let _ = old.start_kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retire_right_after_a_takeover_waits_for_the_old_proxys_requests() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("children.log");
    let config = write_config(dir.path());
    let (mut b1, a1) = sample_app("v1", &log).await;
    let (_b2, a2) = sample_app("v2", &log).await;
    let (old, listen, admin_addr) = proxy(&config, false, &log).await;
    let admin = AdminClient::new(admin_addr, TOKEN.into());
    admin.add(&spec("b1", a1, "v1")).await.unwrap();
    admin.wait_healthy("b1", DEADLINE).await.unwrap();
    // In flight on b1 through the old proxy while it is replaced.
    let slow = tokio::spawn(slow_get(listen, 1500));
    tokio::time::sleep(Duration::from_millis(200)).await;
    admin.add(&spec("b2", a2, "v2")).await.unwrap();
    admin.wait_healthy("b2", DEADLINE).await.unwrap();
    let (_new, _, _) = proxy(&config, true, &log).await;
    // What a deployer does next: retire b1 through the new proxy, then stop its instance.
    let report = admin.retire("b1", Duration::from_secs(5)).await.unwrap();
    let _ = b1.start_kill();
    assert!(
        slow.await.unwrap(),
        "the instance was stopped under a request the old proxy was still finishing ({report:?})"
    );
    assert!(report.drained, "{report:?}");
    assert!(report.waited_ms >= 500, "{report:?}");
    drop(old);
}

/// Regression: when the proxy replaced by a takeover was killed while it drained, its
/// successor restarted its `counting_since_ms` yet kept the counts handed over, so a deployer
/// took the balancer's whole history for its own traffic and said the counters had restarted.
/// The counts handed over are still right: the start stays, and `/stats` says a drain's counts
/// were lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_proxy_killed_while_draining_keeps_the_counting_start_and_is_said_lost() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("children.log");
    let config = write_config_on(dir.path(), "127.0.90.1", "127.0.90.2");
    let (_b1, a1) = sample_app_on("127.0.90.1", "v1", &log).await;
    let (mut old, listen, admin_addr) = proxy(&config, false, &log).await;
    let admin = AdminClient::new(admin_addr, TOKEN.into());
    admin.add(&spec("b1", a1, "v1")).await.unwrap();
    admin.wait_healthy("b1", DEADLINE).await.unwrap();
    for _ in 0..5 {
        assert!(slow_get(listen, 0).await);
    }
    let before = admin.stats().await.unwrap();
    assert_eq!(before.total.responses(), 5, "{before:?}");
    // In flight on the old proxy when it is replaced, and lost with it.
    let slow = tokio::spawn(slow_get(listen, 5000));
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while admin.backends().await.unwrap()[0].in_flight == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slow request never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_new, _, _) = proxy(&config, true, &log).await;
    // The new proxy serves: the old one has handed its counts over and is draining.
    let pid = old.id().unwrap() as i32;
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let _ = old.wait().await;
    assert!(!slow.await.unwrap(), "the request died with the old proxy");
    let after = loop {
        let s = admin.stats().await.unwrap();
        if s.lost_drains > 0 {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the successor never noticed the lost drain: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(after.lost_drains, 1, "{after:?}");
    assert_eq!(
        after.counting_since_ms, before.counting_since_ms,
        "the counts handed over are kept, so their start is too: {after:?}"
    );
    assert_eq!(after.total.responses(), 5, "{after:?}");
    // A deployer's delta across it: nothing new was answered, and nothing restarted.
    assert!(slow_get(listen, 0).await);
    let last = admin.stats().await.unwrap();
    assert_eq!(last.total.responses() - before.total.responses(), 1);
    assert_eq!(last.counting_since_ms, before.counting_since_ms);
}

/// `GET /sleep/{ms}` through the proxy on a connection of its own: whether it got a 200.
async fn slow_get(listen: SocketAddr, ms: u64) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
    let req = format!("GET /sleep/{ms} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(DEADLINE, s.read_to_end(&mut answer)).await;
    read.is_ok() && answer.starts_with(b"HTTP/1.1 200")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_with_sigkill_during_steady_gets_costs_no_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("children.log");
    let (mut victim, a1) = sample_app("v1", &log).await;
    let (_survivor, a2) = sample_app("v1", &log).await;
    let proxy = cutover::proxy::start(cutover::proxy::ProxySettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin: "127.0.0.1:0".parse().unwrap(),
        token: TOKEN.into(),
        health: cutover::config::HealthConfig {
            interval: cutover::config::Dur(Duration::from_millis(100)),
            ..Default::default()
        },
        drain_timeout: Duration::from_secs(5),
        state_file: None,
    })
    .await
    .unwrap();
    let admin = AdminClient::new(proxy.admin, TOKEN.into());
    admin.add(&spec("victim", a1, "v1")).await.unwrap();
    admin.add(&spec("survivor", a2, "v1")).await.unwrap();
    admin.wait_healthy("victim", DEADLINE).await.unwrap();
    admin.wait_healthy("survivor", DEADLINE).await.unwrap();

    let run = load::start(LoadSpec {
        rate: 500,
        max_requests: 2000,
        max_duration: Duration::from_secs(30),
        concurrency: 8,
        ..LoadSpec::new(proxy.listen)
    });
    run.wait_until(|r| r.sent >= 500).await;
    let pid = victim.id().unwrap() as i32;
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let _ = victim.wait().await;
    let report = run.finish().await;
    assert_eq!(report.failed, 0, "{report}: {:?}", report.failures);
    assert_eq!(report.ok, 2000, "{report}");
    let stats = admin.stats().await.unwrap();
    assert!(stats.backends["victim"].proxy_errors >= 1, "{stats:?}");
    assert_eq!(stats.unrouted, 0);
    proxy.shutdown().await;
}

/// Review findings: a second plain `cutover proxy` made the live one warn that "a takeover
/// attempt failed" (it had only checked whether a proxy runs), and the line reached its log
/// file with terminal colour escapes around every field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_file_gets_no_terminal_escapes() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let log = dir.path().join("proxy.log");
    // At -v, where the live proxy says what it does (by default only warnings reach the log).
    let (_live, _) = spawn_reading(
        Command::new(exe())
            .arg("-v")
            .arg("-c")
            .arg(&config)
            .arg("proxy"),
        &log,
    )
    .await;
    let second = Command::new(exe())
        .arg("-c")
        .arg(&config)
        .arg("proxy")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(!second.status.success(), "{second:?}");
    let deadline = std::time::Instant::now() + DEADLINE;
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("was told this one runs") || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        text.contains("INFO") && text.contains("was told this one runs"),
        "the live proxy says what happened: {text}"
    );
    assert!(!text.contains("WARN"), "nothing failed: {text}");
    assert!(!text.contains('\x1b'), "{text:?}");
}
