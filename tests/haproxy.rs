//! Issue 8: cutover drives an existing HAProxy through its runtime API. Each test starts its own
//! HAProxy (generated config, stats socket at level admin in a temp dir, ports picked at run
//! time, `retries 0` and no redispatch so zero failures come from draining, not from retries)
//! and a local fleet, and stops both on drop, also when the test fails.

mod common;
mod serve_support;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use cutover::balancer::haproxy::{
    HaproxyBalancer, HaproxySettings, RuntimeApi, SocketAddress, parse_server_name,
};
use cutover::balancer::{BackendSpec, Balancer};
use cutover::load::{self, LoadSpec};
use tokio::process::{Child, Command};

const BACKEND: &str = "app";

/// The tests run one at a time: each runs a fleet, HAProxy and steady load, and on a small
/// machine several at once starve each other's health checks.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cutover"))
}

fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A server as `show servers state` reports it.
#[derive(Debug, Clone)]
struct ServerState {
    name: String,
    /// 2 = running.
    op_state: u32,
    /// 0 = ready; 1 maint, 8 drain, ...
    admin_state: u32,
    /// The weight set by the user (cutover).
    weight: u32,
}

/// A local fleet behind its own HAProxy.
struct Fleet {
    dir: tempfile::TempDir,
    config: PathBuf,
    listen: SocketAddr,
    socket: PathBuf,
    hosts: Vec<String>,
    haproxy: Option<Child>,
    /// HAProxy processes a reload replaced: they finish their connections and exit; killed on
    /// drop if they have not.
    replaced: Vec<Child>,
}

impl Fleet {
    async fn start(hosts: usize, net: u8, strategy: &str, drain_timeout: &str) -> Fleet {
        let dir = tempfile::Builder::new()
            .prefix("cutover-haproxy-")
            .tempdir()
            .unwrap();
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
            .parse()
            .unwrap();
        let socket = dir.path().join("admin.sock");
        for (v, flags) in [
            ("v1", ""),
            ("v2", ""),
            ("crash", "--exit-on-start"),
            ("sick", "--unhealthy"),
            ("slow", "--startup-delay 4s"),
        ] {
            cutover::init::write_sample_release(
                &dir.path().join("releases").join(v),
                &exe(),
                v,
                flags,
            )
            .unwrap();
        }
        // "late" is healthy on web1 only: batch 1 moves, batch 2 fails, web1 goes back.
        common::write_release_healthy_only_on(&dir.path().join("releases"), "late", &["web1"]);
        let names: Vec<String> = (0..hosts).map(|i| format!("web{}", i + 1)).collect();
        let mut text = format!(
            "transport = \"local\"\n\n[app]\nname = \"test\"\nstart = \"exec sh ./run.sh\"\nstop_timeout = \"5s\"\ndrain_timeout = \"{drain_timeout}\"\n\n\
             [app.health]\npath = \"/health\"\ninterval = \"200ms\"\ntimeout = \"1s\"\ndeadline = \"10s\"\n\n\
             [release]\npath = \"releases/{{version}}\"\nkeep = 3\n\n\
             [balancer]\nkind = \"haproxy\"\nlisten = \"{listen}\"\nsocket = \"{}\"\nbackend = \"{BACKEND}\"\n\n[strategy]\n{strategy}\n",
            socket.display()
        );
        for (i, name) in names.iter().enumerate() {
            text.push_str(&format!(
                "\n[[hosts]]\nname = \"{name}\"\naddress = \"127.0.{net}.{}\"\nroot = \"fleet/{name}\"\n",
                11 + i
            ));
        }
        let config = dir.path().join("cutover.toml");
        std::fs::write(&config, text).unwrap();
        let mut fleet = Fleet {
            dir,
            config,
            listen,
            socket,
            hosts: names,
            haproxy: None,
            replaced: Vec::new(),
        };
        fleet.start_haproxy().await;
        fleet
    }

    /// Writes the HAProxy config and starts `haproxy -db` as a child; waits for its socket.
    async fn start_haproxy(&mut self) {
        self.spawn_haproxy(&[]).await;
    }

    /// Stops HAProxy at once (as a crash or `systemctl stop` would).
    async fn kill_haproxy(&mut self) {
        if let Some(mut h) = self.haproxy.take() {
            let _ = h.kill().await;
        }
    }

    /// Restarts HAProxy from its config: it comes back without cutover's dynamic servers.
    async fn restart_haproxy(&mut self) {
        self.kill_haproxy().await;
        self.start_haproxy().await;
    }

    /// Reloads HAProxy as `systemctl reload` and `haproxy -sf` do: a new process from the same
    /// config takes over the listeners and the stats socket, and the old one stops accepting
    /// and finishes its connections. Returns once the new process answers on the socket.
    async fn reload_haproxy(&mut self) {
        let old = self.haproxy.take().expect("haproxy runs");
        let pid = old.id().expect("haproxy has not exited").to_string();
        self.replaced.push(old);
        self.spawn_haproxy(&["-sf", &pid]).await;
    }

    /// Starts `haproxy -db` with `extra` arguments; waits until it is the process answering
    /// on the stats socket (a reload's old process answers there until the new one binds it).
    async fn spawn_haproxy(&mut self, extra: &[&str]) {
        let cfg = self.dir.path().join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n    stats socket {sock} level admin\n    stats timeout 30s\n\n\
                 defaults\n    mode http\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n\
                 \x20   # No retries, no redispatch: a request sent to a dying server fails visibly.\n\
                 \x20   retries 0\n    no option redispatch\n\n\
                 frontend fe\n    bind {listen}\n    default_backend {BACKEND}\n\n\
                 backend {BACKEND}\n    balance roundrobin\n    option httpchk GET /health\n    http-check expect status 200\n",
                sock = self.socket.display(),
                listen = self.listen,
            ),
        )
        .unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("haproxy.log"))
            .unwrap();
        let child = Command::new("haproxy")
            .arg("-f")
            .arg(&cfg)
            .arg("-db")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("haproxy starts (apt-get install haproxy)");
        let pid = child.id().expect("haproxy has not exited").to_string();
        self.haproxy = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let info = self.api().exec("show info").unwrap_or_default();
            if cutover::balancer::haproxy::parse_info(&info).get("Pid") == Some(&pid) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "haproxy did not come up: {}",
                self.haproxy_log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn haproxy_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("haproxy.log")).unwrap_or_default()
    }

    fn api(&self) -> RuntimeApi {
        RuntimeApi::new(SocketAddress::Unix(self.socket.clone()))
    }

    fn balancer(&self) -> HaproxyBalancer {
        let config = cutover::config::Config::load(&self.config).unwrap();
        HaproxyBalancer::connect(HaproxySettings::from_config(&config).unwrap()).unwrap()
    }

    /// `show servers state` of the backend.
    fn servers(&self) -> Vec<ServerState> {
        let out = self
            .api()
            .exec(&format!("show servers state {BACKEND}"))
            .unwrap();
        out.lines()
            .filter(|l| !l.starts_with('#') && l.split_whitespace().count() > 6)
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                ServerState {
                    name: f[3].to_string(),
                    op_state: f[5].parse().unwrap(),
                    admin_state: f[6].parse().unwrap(),
                    weight: f[7].parse().unwrap(),
                }
            })
            .collect()
    }

    fn traffic(&self, rate: u32, max: u64) -> load::LoadRun {
        load::start(LoadSpec {
            target: self.listen,
            path: "/".into(),
            rate,
            max_requests: max,
            max_duration: Duration::from_secs(120),
            concurrency: 8,
            headers: Vec::new(),
        })
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(exe());
        c.arg("-c")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        c
    }

    async fn cutover(&self, args: &[&str]) -> (i32, String, String) {
        let out = self.command(args).output().await.expect("cutover runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    async fn deploy(&self, version: &str, expect: i32) -> (String, String) {
        let (code, out, err) = self
            .cutover(&["deploy", "--version", version, "--json"])
            .await;
        assert_eq!(
            code,
            expect,
            "deploy {version}\nstdout:\n{out}\nstderr:\n{err}\nhaproxy:\n{}",
            self.haproxy_log()
        );
        (out, err)
    }

    /// Whether every host has one server in HAProxy, ready and running, of `version`.
    fn all_ready_on(&self, version: &str) -> bool {
        let servers = self.servers();
        servers.len() == self.hosts.len()
            && self.hosts.iter().all(|h| {
                servers.iter().any(|s| {
                    s.name.starts_with(&format!("{h}:"))
                        && s.admin_state == 0
                        && s.op_state == 2
                        && parse_server_name(&s.name).is_some_and(|(_, _, r)| r == version)
                })
            })
    }

    /// Starts `cutover serve` on this fleet (its `[serve]` listening on `ip`, stderr in
    /// serve.log); waits for the address it prints. Killed when the returned guard drops.
    async fn serve(&self, ip: &str) -> Serve {
        use tokio::io::AsyncBufReadExt;
        let text = std::fs::read_to_string(&self.config).unwrap();
        if !text.contains("[serve]") {
            std::fs::write(
                &self.config,
                format!(
                    "{text}\n[serve]\nlisten = \"{ip}:0\"\ntoken = \"{}\"\n",
                    serve_support::SERVE_TOKEN
                ),
            )
            .unwrap();
        }
        let log = self.dir.path().join("serve.log");
        let mut child = self
            .command(&["-v", "serve"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("cutover serve starts");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("cutover serve prints its address in time")
            .unwrap()
            .unwrap_or_else(|| {
                panic!(
                    "cutover serve exited: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        // Keep reading stdout so the pipe never fills.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Serve {
            _child: child,
            addr,
            log,
        }
    }

    /// Every server is ready and running in HAProxy, one per host, all of `version`.
    fn assert_all_ready_on(&self, version: &str) {
        let servers = self.servers();
        assert_eq!(servers.len(), self.hosts.len(), "{servers:#?}");
        for s in &servers {
            assert_eq!(s.admin_state, 0, "ready (not drain/maint): {s:?}");
            assert_eq!(s.op_state, 2, "running: {s:?}");
            let (_, _, release) = parse_server_name(&s.name).expect("a cutover server");
            assert_eq!(release, version, "{s:?}");
        }
        for h in &self.hosts {
            assert!(
                servers.iter().any(|s| s.name.starts_with(&format!("{h}:"))),
                "{h} has a server: {servers:?}"
            );
        }
    }
}

/// A `cutover serve` beside a fleet; killed on drop (`kill_on_drop`), also when a test fails.
struct Serve {
    _child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Serve {
    /// `GET path` of its API with the token; the JSON answer.
    async fn get(&self, path: &str) -> serde_json::Value {
        let (status, _, body) = serve_support::request(
            self.addr,
            "GET",
            path,
            &[(
                "authorization",
                format!("Bearer {}", serve_support::SERVE_TOKEN),
            )],
            String::new(),
        )
        .await;
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for pid in instances_under(self.dir.path()) {
            unsafe {
                libc::kill(-(pid as i32), libc::SIGKILL);
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
        for h in self.haproxy.iter_mut().chain(&mut self.replaced) {
            let _ = h.start_kill();
        }
    }
}

/// Live processes whose CUTOVER_INSTANCE points under `dir` (the instances this fleet started).
fn instances_under(dir: &Path) -> Vec<u32> {
    let prefix = format!("CUTOVER_INSTANCE={}", dir.display());
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if matches!(
            stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next()),
            Some('Z') | Some('X') | None
        ) {
            continue;
        }
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if env
            .split(|b| *b == 0)
            .any(|v| String::from_utf8_lossy(v).starts_with(&prefix))
        {
            found.push(pid);
        }
    }
    found
}

async fn stop_after(run: load::LoadRun, min: u64) -> load::LoadReport {
    tokio::time::timeout(Duration::from_secs(60), run.wait_until(|r| r.sent >= min))
        .await
        .expect("traffic reaches its minimum count");
    run.stop().await
}

/// The report line of `deploy --json` (the last line of stdout).
fn report(out: &str) -> serde_json::Value {
    serde_json::from_str(out.lines().last().unwrap_or("{}")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_deploy_behind_haproxy_fails_no_request() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start(4, 21, "kind = \"rolling\"\nbatch = [1, \"50%\"]", "5s").await;
    fleet.deploy("v1", 0).await;
    fleet.assert_all_ready_on("v1");

    let run = fleet.traffic(250, 30_000);
    run.wait_until(|r| r.ok >= 100).await;
    let (out, err) = fleet.deploy("v2", 0).await;
    let load = stop_after(run, 2_000).await;

    assert!(load.sent >= 2_000, "enough traffic: {load}");
    assert_eq!(
        load.failed, 0,
        "no failed request through HAProxy: {load}\n{:#?}\n{err}",
        load.failures
    );
    assert!(
        load.share("v1") > 0.0 && load.share("v2") > 0.0,
        "both served: {load}"
    );
    fleet.assert_all_ready_on("v2");

    // The deploy's own proof, from HAProxy's counters: v1's servers were deleted during the
    // deploy, yet what they served is still counted (the retired tally).
    let r = report(&out);
    assert_eq!(r["outcome"], "succeeded", "{out}");
    assert_eq!(r["failed_requests"], 0, "{out}");
    let v1 = r["served_by_release"]["v1"].as_u64().unwrap_or(0);
    let v2 = r["served_by_release"]["v2"].as_u64().unwrap_or(0);
    assert!(v1 > 0 && v2 > 0, "both releases counted: {out}");
    let stats = fleet.balancer().stats().await.unwrap();
    assert!(
        stats.releases["v1"].requests >= load.by_version["v1"],
        "v1 counters survive deletion: {:?} vs {load}",
        stats.releases
    );
    assert!(
        stats.total.requests >= load.ok,
        "{:?} vs {load}",
        stats.total
    );
}

/// In place behind HAProxy: a server is deleted and its successor, on the same address and
/// port, added under the new release's name; a failure restores the old release the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_deploy_behind_haproxy_fails_no_request() {
    let _serial = SERIAL.lock().await;
    let net = 28;
    let fleet = Fleet::start(3, net, "kind = \"rolling\"\nbatch = 1", "5s").await;
    let port = free_port(&format!("127.0.{net}.11"));
    let text = std::fs::read_to_string(&fleet.config).unwrap().replace(
        "drain_timeout = \"5s\"\n",
        &format!("drain_timeout = \"5s\"\nmode = \"in-place\"\nport = {port}\n"),
    );
    std::fs::write(&fleet.config, text).unwrap();
    fleet.deploy("v1", 0).await;
    fleet.assert_all_ready_on("v1");

    let run = fleet.traffic(250, 30_000);
    run.wait_until(|r| r.ok >= 100).await;
    let (out, err) = fleet.deploy("v2", 0).await;
    run.wait_until(|r| r.ok >= 800).await;
    // "late" is healthy on web1 only: web2 fails, gets v2 back, and web1 returns to v2.
    let (late_out, late_err) = fleet.deploy("late", 1).await;
    let load = stop_after(run, 2_000).await;

    assert_eq!(
        load.failed, 0,
        "no failed request through HAProxy: {load}\n{:#?}\n{err}\n{late_err}",
        load.failures
    );
    assert_eq!(report(&out)["outcome"], "succeeded", "{out}\n{err}");
    assert!(
        err.contains("web2: out of the balancer; stopped v1"),
        "{err}"
    );
    let late = report(&late_out);
    assert_eq!(late["outcome"], "rolled_back", "{late_out}\n{late_err}");
    assert!(
        late_err.contains("restore web2: starting v2 again in place"),
        "{late_err}"
    );
    fleet.assert_all_ready_on("v2");
}

async fn failing_release_rolls_back(version: &str, net: u8) {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start(
        4,
        net,
        "kind = \"rolling\"\nbatch = [1, \"50%\"]\nmax_fail_percentage = 0",
        "5s",
    )
    .await;
    fleet.deploy("v1", 0).await;

    let run = fleet.traffic(250, 30_000);
    run.wait_until(|r| r.ok >= 100).await;
    let (out, err) = fleet.deploy(version, 1).await;
    let load = stop_after(run, 1_000).await;

    assert_eq!(
        load.failed, 0,
        "no failed request: {load}\n{:#?}\n{err}",
        load.failures
    );
    assert_eq!(report(&out)["outcome"], "rolled_back", "{out}");
    fleet.assert_all_ready_on("v1");
    let balancer = fleet.balancer();
    assert!(
        balancer.disabled().unwrap().is_empty(),
        "nothing left recorded as disabled"
    );
    for b in balancer.backends().await.unwrap() {
        assert_eq!(b.state, cutover::balancer::BackendState::Active, "{b:?}");
        assert_eq!(b.health, cutover::balancer::api::Health::Healthy, "{b:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_that_exits_at_start_rolls_back_behind_haproxy() {
    failing_release_rolls_back("crash", 22).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_in_a_later_batch_returns_moved_hosts_behind_haproxy() {
    // web1 really moves to "late" (added, old drained and deleted in HAProxy), then goes back.
    failing_release_rolls_back("late", 23).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_at_weight_10_through_haproxy_weights() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start(4, 24, "kind = \"rolling\"\nbatch = 4", "5s").await;
    fleet.deploy("v1", 0).await;

    // One v2 instance beside four v1 servers at weight 100: weight 44 is a 44/444 = 9.9% share.
    let addr: SocketAddr = format!("127.0.24.30:{}", free_port("127.0.24.30"))
        .parse()
        .unwrap();
    let _canary = Command::new(exe())
        .args([
            "sample-app",
            "--listen",
            &addr.to_string(),
            "--version",
            "v2",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let balancer = fleet.balancer();
    let spec = BackendSpec {
        id: format!("canary:{}", addr.port()),
        address: addr,
        host: "canary".into(),
        release: "v2".into(),
        weight: 100,
        health_path: "/health".into(),
        preview: false,
        gated: false,
    };
    balancer.add(&spec).await.unwrap();
    balancer.add(&spec).await.expect("add is idempotent");
    balancer
        .wait_healthy(&spec.id, Duration::from_secs(10))
        .await
        .unwrap();
    balancer.set_weight(&spec.id, 44).await.unwrap();
    let view = balancer.backends().await.unwrap();
    let canary = view.iter().find(|b| b.spec.id == spec.id).unwrap();
    assert_eq!(canary.spec.weight, 44);
    assert_eq!(canary.spec.release, "v2");

    let run = fleet.traffic(0, 3_000);
    let load = run.finish().await;
    assert_eq!(load.failed, 0, "{load}\n{:#?}", load.failures);
    let share = load.share("v2");
    assert!(
        (5.0..=15.0).contains(&share),
        "v2 share {share:.1}%: {load}"
    );

    // Per-release counters from HAProxy agree with the client's count.
    let stats = balancer.stats().await.unwrap();
    let served = stats.releases["v2"].status_2xx;
    assert!(
        served >= load.by_version["v2"],
        "HAProxy counted {served} v2 answers, the client {load}"
    );

    // Out again without a failed request: drain, wait, remove.
    let run = fleet.traffic(200, 10_000);
    run.wait_until(|r| r.ok >= 100).await;
    balancer.drain(&spec.id).await.unwrap();
    let drained = balancer
        .wait_drained(&spec.id, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(drained.drained, "{drained:?}");
    balancer.remove(&spec.id).await.unwrap();
    balancer
        .remove(&spec.id)
        .await
        .expect("remove is idempotent");
    let load = stop_after(run, 500).await;
    assert_eq!(load.failed, 0, "{load}\n{:#?}", load.failures);
    assert_eq!(fleet.servers().len(), 4);
    let stats = balancer.stats().await.unwrap();
    assert!(
        stats.releases["v2"].status_2xx >= served,
        "the deleted canary's counters are kept: {:?}",
        stats.releases
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_server_is_restored_when_the_balancer_is_dropped() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start(2, 25, "kind = \"rolling\"\nbatch = 2", "5s").await;
    fleet.deploy("v1", 0).await;
    let balancer = fleet.balancer();
    let id = balancer.backends().await.unwrap()[0].spec.id.clone();
    balancer.drain(&id).await.unwrap();
    assert!(
        fleet.servers().iter().any(|s| s.admin_state == 8),
        "{:?}",
        fleet.servers()
    );
    drop(balancer);
    fleet.assert_all_ready_on("v1");
}

/// One host on v1 behind HAProxy with a long drain, a slow request on it, and a deploy of v2
/// (its stderr to `stderr`) caught while it drains v1: the fleet, the slow request, the deploy.
async fn deploy_while_draining(
    net: u8,
    stderr: Stdio,
) -> (
    Fleet,
    tokio::task::JoinHandle<anyhow::Result<(u16, String, Option<String>)>>,
    Child,
) {
    let fleet = Fleet::start(1, net, "kind = \"rolling\"\nbatch = 1", "60s").await;
    fleet.deploy("v1", 0).await;
    let slow = tokio::spawn(load::get(fleet.listen, "/sleep/20000", &[]));
    let deadline = Instant::now() + Duration::from_secs(10);
    let balancer = fleet.balancer();
    while balancer.backends().await.unwrap()[0].in_flight == 0 {
        assert!(Instant::now() < deadline, "the slow request never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deploy = fleet
        .command(&["deploy", "--version", "v2"])
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !fleet.servers().iter().any(|s| s.admin_state == 8) {
        assert!(Instant::now() < deadline, "v1 never entered drain");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (fleet, slow, deploy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_deploy_leaves_no_live_server_drained() {
    let _serial = SERIAL.lock().await;
    let (fleet, slow, mut deploy) = deploy_while_draining(26, Stdio::null()).await;
    deploy.kill().await.unwrap(); // SIGKILL: no cleanup of its own can run
    let left = fleet.servers();
    assert!(left.iter().any(|s| s.admin_state == 8), "{left:?}");

    // The next cutover command restores it: its instance is alive.
    let (code, _, err) = fleet.cutover(&["status"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("restored HAProxy server app/web1:"), "{err}");
    let servers = fleet.servers();
    assert_eq!(servers.len(), 2, "v1 and the started v2: {servers:?}");
    assert!(
        servers
            .iter()
            .all(|s| s.admin_state == 0 && s.op_state == 2),
        "{servers:?}"
    );
    slow.abort();
}

/// Ctrl-C ends a deploy without unwinding; the server it was draining is restored then
/// (its instance still answers), not left drained until the next cutover command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_on_a_deploy_leaves_no_live_server_drained() {
    let _serial = SERIAL.lock().await;
    let (fleet, slow, deploy) = deploy_while_draining(76, Stdio::piped()).await;
    // As Ctrl-C would.
    unsafe { libc::kill(deploy.id().unwrap() as i32, libc::SIGINT) };
    let out = deploy.wait_with_output().await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("restored HAProxy server app/web1:"), "{err}");
    let servers = fleet.servers();
    assert!(
        servers.iter().all(|s| s.admin_state == 0),
        "nothing left drained: {servers:?}"
    );
    slow.abort();
}

/// An old server that cannot be taken out of HAProxy (here its state file turned unwritable
/// mid-deploy, so the drain cannot be recorded) keeps its instance: stopping it would fail
/// the requests HAProxy still sends there. The report names it and what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_server_that_cannot_be_retired_keeps_running() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state-marker");
    let strategy = format!(
        "kind = \"rolling\"\nbatch = 1\n\n[[hooks]]\nat = \"before_switch\"\nwhere = \"local\"\ncommand = \"touch {}\"\n",
        state.display()
    );
    let fleet = Fleet::start(2, 27, &strategy, "5s").await;
    fleet.deploy("v1", 0).await;
    std::fs::remove_file(&state).unwrap();
    // The hook above only marks the moment; the break itself is the state file turned into a
    // directory once the first v2 instance is about to enter HAProxy.
    let file = fleet
        .dir
        .path()
        .join(format!(".cutover/haproxy-{BACKEND}.json"));
    let breaker = tokio::spawn(async move {
        while !state.exists() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let _ = std::fs::remove_file(&file);
        std::fs::create_dir_all(&file).unwrap();
    });
    let run = fleet.traffic(250, 30_000);
    run.wait_until(|r| r.ok >= 100).await;
    let (code, out, err) = fleet.cutover(&["deploy", "--version", "v2"]).await;
    breaker.await.unwrap();
    let load = stop_after(run, 1_000).await;
    assert_eq!(
        load.failed, 0,
        "a server HAProxy still routes to was stopped: {load}\n{:#?}\n{out}\n{err}",
        load.failures
    );
    assert!(
        format!("{out}{err}").contains("is left running"),
        "exit {code}\n{out}\n{err}"
    );
    assert!(
        out.contains("counters could not be read"),
        "no known counts must not read as zero: {out}"
    );
}

/// A canary beside 3 stable servers through HAProxy: its weights stay within HAProxy's 256
/// (100% of the requests was weight 300 and refused, which left the deploy interrupted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_beside_three_servers_reaches_every_step_through_haproxy() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start(
        4,
        28,
        "kind = \"canary\"\ncanary_hosts = 1\nbatch = 2\nsteps = [{ weight = 10, pause = \"300ms\" }, { weight = 100, pause = \"300ms\" }]",
        "5s",
    )
    .await;
    fleet.deploy("v1", 0).await;
    let (out, err) = fleet.deploy("v2", 0).await;
    assert!(!out.contains("WARNING"), "{out}\n{err}");
    fleet.assert_all_ready_on("v2");
}

/// Review finding: a new server left maintenance counted as up before HAProxy's first check
/// ran, so an address HAProxy cannot reach (a firewall between it and a host whose own gate
/// passed) took requests and failed them. It waits at weight 0 until HAProxy's check passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_haproxy_cannot_reach_takes_no_request() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start(1, 110, "kind = \"rolling\"\nbatch = 1", "5s").await;
    fleet.deploy("v1", 0).await;
    let run = fleet.traffic(200, 20_000);
    run.wait_until(|r| r.ok >= 50).await;

    let balancer = fleet.balancer();
    let dead: SocketAddr = format!("127.0.110.40:{}", free_port("127.0.110.40"))
        .parse()
        .unwrap();
    let spec = BackendSpec {
        id: format!("dead:{}", dead.port()),
        address: dead,
        host: "dead".into(),
        release: "v2".into(),
        weight: 100,
        health_path: "/health".into(),
        preview: false,
        gated: false,
    };
    balancer.add(&spec).await.unwrap();
    let before = run.snapshot().sent;
    let waited = balancer
        .wait_healthy(&spec.id, Duration::from_millis(1500))
        .await;
    assert!(waited.is_err(), "a dead server is never seen healthy");
    let view = balancer.backends().await.unwrap();
    let server = view.iter().find(|b| b.spec.id == spec.id).unwrap();
    assert_eq!(server.spec.weight, 0, "it waits at weight 0: {server:?}");
    balancer.remove(&spec.id).await.unwrap();
    let load = stop_after(run, before + 200).await;
    assert_eq!(load.failed, 0, "{load}\n{:#?}", load.failures);
}

/// Review finding: a socket at level user hid every server's address and a `backend` naming a
/// frontend had no servers to read, so `cutover status` showed every host absent, "no drift",
/// exit 0; a TCP backend reported 0 requests served under load; and a consistent-hash backend,
/// which takes dynamic servers, was refused. Connecting now says which it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_refuses_what_would_hide_or_break_a_deploy() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let admin = dir.path().join("admin.sock");
    let user = dir.path().join("user.sock");
    let port = free_port("127.0.0.1");
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n    stats socket {admin} level admin\n    stats socket {user} level user\n\n\
             defaults\n    mode http\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n\n\
             frontend fe\n    bind 127.0.0.1:{port}\n    default_backend app\n\n\
             backend app\n    balance roundrobin\n    option httpchk GET /health\n\n\
             backend tcpapp\n    mode tcp\n    balance roundrobin\n\n\
             backend hashed\n    balance uri\n    hash-type consistent\n\n\
             backend fixed\n    balance static-rr\n",
            admin = admin.display(),
            user = user.display(),
        ),
    )
    .unwrap();
    let _haproxy = Command::new("haproxy")
        .arg("-f")
        .arg(&cfg)
        .arg("-db")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("haproxy starts (apt-get install haproxy)");
    let api = RuntimeApi::new(SocketAddress::Unix(admin.clone()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while api.exec("show info").is_err() {
        assert!(Instant::now() < deadline, "haproxy did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect = |socket: &Path, backend: &str| {
        HaproxyBalancer::connect(HaproxySettings {
            socket: SocketAddress::Unix(socket.to_path_buf()),
            backend: backend.into(),
            health_path: "/health".into(),
            check_interval: Duration::from_millis(500),
            rise: 2,
            fall: 3,
            state_file: dir.path().join(format!("state-{backend}.json")),
            put_back_lost_servers: false,
        })
        .map_err(|e| format!("{e:#}"))
    };
    assert!(connect(&admin, "app").is_ok());
    let e = connect(&user, "app").unwrap_err();
    assert!(
        e.contains("level \"user\"") && e.contains("level admin"),
        "{e}"
    );
    let e = connect(&admin, "fe").unwrap_err();
    assert!(e.contains("\"fe\" is not a backend"), "{e}");
    let e = connect(&admin, "tcpapp").unwrap_err();
    assert!(e.contains("mode tcp"), "{e}");
    let e = connect(&admin, "fixed").unwrap_err();
    assert!(e.contains("static-rr"), "{e}");
    let hashed = connect(&admin, "hashed").unwrap();
    let spec = BackendSpec {
        id: "web1:4100".into(),
        address: "127.0.0.1:4100".parse().unwrap(),
        host: "web1".into(),
        release: "v1".into(),
        weight: 100,
        health_path: "/health".into(),
        preview: false,
        gated: false,
    };
    hashed
        .add(&spec)
        .await
        .expect("a consistent hash takes dynamic servers");
    hashed.remove(&spec.id).await.unwrap();
}

/// Review findings: an HAProxy reload or restart drops every server cutover added (dynamic
/// servers are not in haproxy.cfg), and `cutover status` then said "no drift" with every
/// client getting 503; and after it the counts of servers deleted before it (kept in the
/// state file) were credited to the next deploy. Status now names each host the balancer
/// lost and how to add it back, deploying the live release again does, and the counts start
/// again with the new HAProxy process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_haproxy_restart_status_names_the_lost_hosts_and_counts_start_again() {
    let _serial = SERIAL.lock().await;
    let mut fleet = Fleet::start(2, 111, "kind = \"rolling\"\nbatch = 1", "5s").await;
    fleet.deploy("v1", 0).await;
    let load = fleet.traffic(0, 200).finish().await;
    assert_eq!(load.failed, 0, "{load}");
    fleet.deploy("v2", 0).await;
    let before = fleet.balancer().stats().await.unwrap();
    assert!(
        before.releases["v1"].requests >= 200,
        "{:?}",
        before.releases
    );
    let (code, out, err) = fleet.cutover(&["status"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(!out.contains("has no backend"), "{out}");

    fleet.restart_haproxy().await;
    assert!(
        fleet.servers().is_empty(),
        "a restart drops dynamic servers"
    );
    let (_, out, err) = fleet.cutover(&["status"]).await;
    for host in ["web1", "web2"] {
        assert!(
            out.contains(&format!("{host}: v2 runs on"))
                && out.contains("`cutover readmit` adds it back"),
            "{out}\n{err}"
        );
    }
    let after = fleet.balancer().stats().await.unwrap();
    assert_ne!(after.counting_since_ms, before.counting_since_ms);
    assert_eq!(
        after.releases.get("v1").map_or(0, |c| c.requests),
        0,
        "v1's servers were counted by the HAProxy that is gone: {:?}",
        after.releases
    );

    fleet.deploy("v2", 0).await;
    fleet.assert_all_ready_on("v2");
    let (_, out, _) = fleet.cutover(&["status"]).await;
    assert!(!out.contains("has no backend"), "{out}");
}

/// Live processes of the fleet's instances, sorted: the same list means nothing restarted.
fn instance_pids(fleet: &Fleet) -> Vec<u32> {
    let mut pids = instances_under(fleet.dir.path());
    pids.sort_unstable();
    pids
}

/// HAProxy loses cutover's dynamic servers when it reloads or restarts. `cutover readmit` puts
/// every host's running instance back without restarting it, and says when there is nothing
/// to put back (also before anything was deployed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_haproxy_restart_readmit_puts_the_running_instances_back() {
    let _serial = SERIAL.lock().await;
    let mut fleet = Fleet::start(2, 116, "kind = \"rolling\"\nbatch = 1", "5s").await;
    let (code, out, err) = fleet.cutover(&["readmit"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("nothing to re-admit: no deployment of test is recorded"),
        "{out}\n{err}"
    );
    fleet.deploy("v1", 0).await;
    fleet.deploy("v2", 0).await;
    fleet.assert_all_ready_on("v2");
    let pids = instance_pids(&fleet);
    assert!(!pids.is_empty());

    fleet.restart_haproxy().await;
    assert!(
        fleet.servers().is_empty(),
        "a restart drops dynamic servers"
    );
    let (code, out, err) = fleet.cutover(&["readmit"]).await;
    assert_eq!(code, 0, "{out}\n{err}\nhaproxy:\n{}", fleet.haproxy_log());
    assert!(out.contains("readmit v2 -> v2: succeeded"), "{out}\n{err}");
    assert!(
        out.contains("back in the balancer (running v2, not restarted): web1, web2"),
        "{out}\n{err}"
    );
    fleet.assert_all_ready_on("v2");
    assert_eq!(instance_pids(&fleet), pids, "no instance was restarted");
    let (code, out, err) = fleet.cutover(&["status"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(!out.contains("has no backend"), "{out}");
    let (_, out, _) = fleet.cutover(&["history", "--json"]).await;
    let history: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(history[0]["kind"], "readmit", "{history}");

    let (code, out, err) = fleet.cutover(&["readmit"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("nothing to re-admit: every host whose live release runs has a server"),
        "{out}\n{err}"
    );
    assert_eq!(instance_pids(&fleet), pids);
}

/// Review finding: a deploy that started after an HAProxy restart no readmit had followed left
/// every host without a server until its batch moved it (with batch 1 and 3 hosts, none in
/// the balancer during the first batch's start and gate: every request a 503). It now puts
/// the live instances back first, not restarted, and says so in its report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_after_an_haproxy_restart_puts_the_live_instances_back_first() {
    let _serial = SERIAL.lock().await;
    let mut fleet = Fleet::start(3, 132, "kind = \"rolling\"\nbatch = 1", "5s").await;
    fleet.deploy("v1", 0).await;
    fleet.restart_haproxy().await;
    assert!(
        fleet.servers().is_empty(),
        "a restart drops dynamic servers"
    );

    let (out, err) = fleet.deploy("v2", 0).await;
    let r = report(&out);
    assert_eq!(r["outcome"], "succeeded", "{out}\n{err}");
    let notes = r["notes"].to_string();
    assert!(
        notes.contains("put back into the balancer before anything changed")
            && notes.contains("web1, web2, web3"),
        "{r}"
    );
    fleet.assert_all_ready_on("v2");
    // Every host back in before the first one started v2.
    let (code, out, err) = fleet.cutover(&["show", "--json"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    let steps = shown["steps"].as_array().unwrap();
    let first_start = steps
        .iter()
        .filter(|s| s["action"] == "start")
        .filter_map(|s| s["started_ms"].as_u64())
        .min()
        .expect("a start step");
    for host in ["web1", "web2", "web3"] {
        let back = steps
            .iter()
            .find(|s| s["action"] == "readmit" && s["host"] == host)
            .unwrap_or_else(|| panic!("{host} was not put back: {shown}"));
        assert_eq!(back["result"], "ok", "{back}");
        assert!(
            back["ended_ms"].as_u64().unwrap() <= first_start,
            "{host} went back only after the first start: {shown}"
        );
    }
}

/// `cutover serve` re-admits by itself: its sampler sees HAProxy's counting start again, the
/// fleet read finds the hosts without a server, and a `readmit` job puts them back within
/// seconds, once, without restarting anything. Traffic through the restart measures the
/// outage clients saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_readmits_the_servers_an_haproxy_restart_dropped() {
    let _serial = SERIAL.lock().await;
    let mut fleet = Fleet::start(2, 117, "kind = \"rolling\"\nbatch = 1", "5s").await;
    fleet.deploy("v1", 0).await;
    let serve = fleet.serve("127.0.117.2").await;
    // Two samples of the HAProxy that runs now (a rate needs two): serve knows when it began
    // counting.
    let deadline = Instant::now() + Duration::from_secs(20);
    while serve.get("/api/metrics").await["rates"]
        .as_array()
        .is_none_or(|r| r.is_empty())
    {
        assert!(Instant::now() < deadline, "no samples: {}", serve.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pids = instance_pids(&fleet);
    let run = fleet.traffic(100, 100_000);
    run.wait_until(|r| r.ok >= 50).await;

    fleet.kill_haproxy().await;
    let killed = Instant::now();
    fleet.start_haproxy().await;
    let up = Instant::now();
    while !fleet.all_ready_on("v1") {
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "the servers are not back 20 s after the restart: {:?}\nserve log:\n{}",
            fleet.servers(),
            serve.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let back = Instant::now();
    let ok_before = run.wait_until(|_| true).await.ok;
    run.wait_until(|r| r.ok >= ok_before + 100).await;
    let load = run.stop().await;
    eprintln!(
        "HAProxy down {:.2}s, up without servers {:.2}s; {load}",
        (up - killed).as_secs_f64(),
        (back - up).as_secs_f64()
    );
    assert!(
        load.failed < load.sent / 2,
        "the outage is seconds, not the whole run: {load}"
    );
    assert_eq!(instance_pids(&fleet), pids, "no instance was restarted");

    // The job, as the dashboard shows it: kind readmit, why, its deployment.
    let deadline = Instant::now() + Duration::from_secs(20);
    let job = loop {
        let queue = serve.get("/api/queue").await;
        let done = queue["finished"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["kind"] == "readmit")
            .cloned();
        if let Some(job) = done {
            break job;
        }
        assert!(Instant::now() < deadline, "{queue}\n{}", serve.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["outcome"], "succeeded", "{job}");
    let trigger = job["trigger"].as_str().unwrap();
    assert!(
        trigger.starts_with("HAProxy restarted or reloaded: web1, web2 had no server"),
        "{job}"
    );
    let newest = &serve.get("/api/deployments").await["deployments"][0];
    assert_eq!(newest["kind"], "readmit", "{newest}");
    assert_eq!(newest["id"], job["deployment"], "{newest}\n{job}");
    // Once: the readmit itself restarts nothing, so nothing queues a second one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let queue = serve.get("/api/queue").await;
    let readmits = [&queue["finished"], &queue["queued"]]
        .iter()
        .flat_map(|l| l.as_array().unwrap().iter())
        .chain(queue["running"].as_object().map(|_| &queue["running"]))
        .filter(|j| j["kind"] == "readmit")
        .count();
    assert_eq!(readmits, 1, "{queue}");
    let (_, out, _) = fleet.cutover(&["status"]).await;
    assert!(!out.contains("has no backend"), "{out}");
}

/// Review finding: with HAProxy down, `cutover status` printed only the error (no hosts, no
/// JSON, not the interrupted deployment) and `cutover logs` failed, though neither needs it
/// to read the hosts. Both now work as they do beside a stopped built-in balancer, and a
/// deploy started while HAProxy is down waits for it like for a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_haproxy_down_status_and_logs_still_read_the_hosts() {
    let _serial = SERIAL.lock().await;
    let mut fleet = Fleet::start(2, 112, "kind = \"rolling\"\nbatch = 1", "5s").await;
    fleet.deploy("v1", 0).await;
    fleet.kill_haproxy().await;
    let (code, out, err) = fleet.cutover(&["status"]).await;
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(
        out.contains("web1") && out.contains("web2") && out.contains("v1"),
        "{out}\n{err}"
    );
    assert!(
        format!("{out}{err}").contains("cannot reach HAProxy"),
        "{out}\n{err}"
    );
    let (_, out, err) = fleet.cutover(&["status", "--json"]).await;
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
    assert_eq!(v["hosts"].as_array().map(Vec::len), Some(2), "{v}");
    let (code, _, err) = fleet.cutover(&["logs", "web1"]).await;
    assert_eq!(code, 0, "{err}");

    // Down when the deploy starts, back a moment later: waited out.
    let deploy = {
        let mut c = fleet.command(&["deploy", "--version", "v2"]);
        tokio::spawn(async move { c.output().await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    fleet.start_haproxy().await;
    let out = deploy.await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("balancer unreachable"), "{err}");
    fleet.assert_all_ready_on("v2");
}

/// HAProxy answers a request cut at the drain deadline while it waits for its response head
/// with a 502 and counts it, but counts a response it was passing on (an event stream, a
/// download) as its status: each cut one is still a failed request in the deploy's proof.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_cut_at_the_drain_deadline_count_as_failed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start(1, 113, "kind = \"rolling\"\nbatch = 1", "1s").await;
    fleet.deploy("v1", 0).await;
    let mut clients = Vec::new();
    for path in ["/sleep/8000", "/sse?events=100&interval_ms=100"]
        .iter()
        .cycle()
        .take(6)
    {
        let (addr, path) = (fleet.listen, path.to_string());
        clients.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut got = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut got));
            let _ = read.await;
            String::from_utf8_lossy(&got).into_owned()
        }));
    }
    // Every stream open on v1 before its drain begins.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fleet.servers().len() != 1
        || fleet
            .balancer()
            .rows()
            .await
            .unwrap()
            .iter()
            .all(|r| r.scur < 6)
    {
        assert!(Instant::now() < deadline, "6 streams open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (out, _) = fleet.deploy("v2", 0).await;
    for c in clients {
        let got = c.await.unwrap();
        assert!(
            got.starts_with("HTTP/1.1 502") || !got.contains("data: 100"),
            "cut, not finished: {got}"
        );
    }
    let r = report(&out);
    assert_eq!(r["failed_requests"], 6, "{out}");
    assert!(r["notes"].to_string().contains("6 request(s)"), "{out}");
}

/// A server drained by a cutover in another container (pid namespace) is left as it is: its
/// pid says nothing here (a `status` once set such a server ready in the middle of that
/// deploy). Every command says so, since that deployer may also have been killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_drained_from_another_pid_namespace_is_left_and_named() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start(2, 114, "kind = \"rolling\"\nbatch = 2", "5s").await;
    fleet.deploy("v1", 0).await;
    let balancer = fleet.balancer();
    let id = balancer.backends().await.unwrap()[0].spec.id.clone();
    balancer.drain(&id).await.unwrap();
    // As a deployer in another container would have written it: a pid that runs no cutover
    // here, in another namespace.
    let config = cutover::config::Config::load(&fleet.config).unwrap();
    let state_file = HaproxySettings::from_config(&config).unwrap().state_file;
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    for record in state["disabled"].as_object_mut().unwrap().values_mut() {
        record["pid"] = serde_json::json!(u32::MAX - 1);
        record["pid_ns"] = serde_json::json!(1);
    }
    std::fs::write(&state_file, serde_json::to_vec(&state).unwrap()).unwrap();
    drop(balancer);
    let drained = |fleet: &Fleet| {
        fleet
            .servers()
            .iter()
            .filter(|s| s.admin_state == 8)
            .count()
    };
    assert_eq!(drained(&fleet), 1, "{:?}", fleet.servers());

    let (_, out, err) = fleet.cutover(&["status"]).await;
    assert!(
        err.contains("in another pid namespace") && err.contains("left as it is"),
        "{out}\n{err}"
    );
    assert_eq!(drained(&fleet), 1, "{:?}", fleet.servers());
}

/// Where a rolling deploy is when a test reloads or restarts HAProxy under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moment {
    /// The first new server is in HAProxy, waiting for HAProxy's own check.
    Admitting,
    /// The first host has moved (its new server carries traffic): its old server drains in the
    /// background while the next batch starts.
    Moved,
    /// An old server drains, kept draining by slow requests.
    Draining,
    /// The first new instance is in its own health gate (it takes 4 s to start), during which
    /// no step of the deploy reads HAProxy.
    Gate,
}

/// How HAProxy is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// `haproxy -sf`, as `systemctl reload haproxy`: the new process takes over at once.
    Reload,
    /// Killed, then started again half a second later.
    Restart,
}

/// What a deploy through a cut of HAProxy came to.
struct ThroughCut {
    code: i32,
    out: String,
    err: String,
    /// From the cut until HAProxy had a server taking requests again.
    back_after: Duration,
    /// The steady traffic, from before the deploy until 200 requests after it ended.
    load: load::LoadReport,
    /// Of those, the requests that failed after the deploy had ended.
    failed_after: u64,
}

/// A rolling deploy of `version` to `hosts` hosts (`batch`) behind HAProxy, under 200
/// requests/s, with HAProxy reloaded or restarted at `moment`.
async fn deploy_through_a_cut(
    fleet: &mut Fleet,
    version: &str,
    moment: Moment,
    cut: Cut,
) -> ThroughCut {
    use tokio::io::AsyncBufReadExt;
    fleet.deploy("v1", 0).await;
    fleet.assert_all_ready_on("v1");
    let run = fleet.traffic(200, 100_000);
    run.wait_until(|r| r.ok >= 100).await;
    // Slow requests in flight on every v1 server, through the HAProxy that is replaced.
    let slow: Vec<_> = if moment == Moment::Draining {
        (0..8)
            .map(|_| tokio::spawn(load::get(fleet.listen, "/sleep/3000", &[])))
            .collect()
    } else {
        Vec::new()
    };
    let mut deploy = fleet
        .command(&["deploy", "--version", version, "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = {
        let mut out = deploy.stdout.take().unwrap();
        tokio::spawn(async move {
            let mut s = String::new();
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut out, &mut s).await;
            s
        })
    };
    let err = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let stderr = {
        let (err, mut lines) = (
            err.clone(),
            tokio::io::BufReader::new(deploy.stderr.take().unwrap()).lines(),
        );
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut err = err.lock().unwrap();
                err.push_str(&line);
                err.push('\n');
            }
        })
    };
    let new = |s: &ServerState| parse_server_name(&s.name).is_some_and(|(_, _, r)| r == version);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let servers = fleet.servers();
        let now = match moment {
            Moment::Admitting => servers.iter().any(new),
            Moment::Moved => servers.iter().any(|s| new(s) && s.weight > 0),
            Moment::Draining => servers.iter().any(|s| s.admin_state & 8 != 0),
            Moment::Gate => err
                .lock()
                .unwrap()
                .contains(&format!("web1: started {version} on")),
        };
        if now {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never {moment:?}: {servers:?}\n{}",
            err.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cut_at = Instant::now();
    match cut {
        Cut::Reload => fleet.reload_haproxy().await,
        Cut::Restart => {
            fleet.kill_haproxy().await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            fleet.start_haproxy().await;
        }
    }
    let back_after = loop {
        let taking = fleet
            .servers()
            .iter()
            .any(|s| s.admin_state == 0 && s.op_state == 2 && s.weight > 0);
        if taking {
            break cut_at.elapsed();
        }
        assert!(
            cut_at.elapsed() < Duration::from_secs(30),
            "no server back 30 s after the {cut:?}\n{}",
            err.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let status = tokio::time::timeout(Duration::from_secs(120), deploy.wait())
        .await
        .expect("the deploy ends")
        .unwrap();
    let out = stdout.await.unwrap();
    stderr.await.unwrap();
    let at_end = run.wait_until(|_| true).await;
    run.wait_until(|r| r.ok + r.failed >= at_end.ok + at_end.failed + 200)
        .await;
    let load = run.stop().await;
    for s in slow {
        let (status, body, _) = s.await.unwrap().expect("the slow request is answered");
        assert_eq!(
            status, 200,
            "a request in flight through the reload: {body}"
        );
    }
    let err = err.lock().unwrap().clone();
    ThroughCut {
        code: status.code().unwrap_or(-1),
        out,
        err,
        back_after,
        failed_after: load.failed - at_end.failed,
        load,
    }
}

/// The deploy noticed that HAProxy lost its servers, put every one back and carried on to
/// the end: every host serves `version` through HAProxy, and nothing fails after the deploy.
fn assert_carried_on(fleet: &Fleet, version: &str, c: &ThroughCut) {
    let all = format!(
        "exit {}\n{}\n{}\nback after {:?}\n{}",
        c.code, c.out, c.err, c.back_after, c.load
    );
    eprintln!("{all}");
    assert_eq!(c.code, 0, "{all}");
    let r = report(&c.out);
    assert_eq!(r["outcome"], "succeeded", "{all}");
    assert_eq!(r["failed_hosts"], serde_json::json!([]), "{all}");
    assert!(
        r["notes"]
            .to_string()
            .contains("HAProxy was reloaded or restarted")
            && r["notes"].to_string().contains("put back"),
        "the report says what happened: {all}"
    );
    assert!(
        fleet.all_ready_on(version),
        "every host in HAProxy: {:?}\n{all}",
        fleet.servers()
    );
    assert_eq!(c.failed_after, 0, "{:#?}\n{all}", c.load.failures);
}

/// Review finding: an HAProxy reload while a new server waited for HAProxy's check made the
/// deploy find the server gone, roll back, and end "rolled back" with no server left in
/// HAProxy at all: every request failed after the "clean" rollback. The deploy now puts back
/// every server the reload dropped, and carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_haproxy_reload_while_a_new_server_waits_for_its_check_is_put_back() {
    let _serial = SERIAL.lock().await;
    let mut fleet = Fleet::start(4, 124, "kind = \"rolling\"\nbatch = 1", "5s").await;
    let c = deploy_through_a_cut(&mut fleet, "v2", Moment::Admitting, Cut::Reload).await;
    assert_carried_on(&fleet, "v2", &c);
}

/// Review finding: an HAProxy reload while an old server drained left that host's new server
/// out of HAProxy and its old instance running, and the deploy ended "succeeded". Requests the
/// old HAProxy process still had in flight are finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_haproxy_reload_while_an_old_server_drains_is_put_back() {
    let _serial = SERIAL.lock().await;
    let mut fleet = Fleet::start(4, 125, "kind = \"rolling\"\nbatch = 1", "5s").await;
    let c = deploy_through_a_cut(&mut fleet, "v2", Moment::Draining, Cut::Reload).await;
    assert_carried_on(&fleet, "v2", &c);
}

/// A restart (HAProxy down for half a second) between two batches: waited out, then the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_haproxy_restart_between_batches_is_put_back() {
    let _serial = SERIAL.lock().await;
    let mut fleet = Fleet::start(4, 126, "kind = \"rolling\"\nbatch = 1", "5s").await;
    let c = deploy_through_a_cut(&mut fleet, "v2", Moment::Moved, Cut::Restart).await;
    assert_carried_on(&fleet, "v2", &c);
}

/// A reload while no step of the deploy reads HAProxy (a new instance's 4 s health gate):
/// the servers are back within about a second, not when the gate ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_haproxy_reload_during_a_long_health_gate_is_put_back_at_once() {
    let _serial = SERIAL.lock().await;
    let mut fleet = Fleet::start(3, 127, "kind = \"rolling\"\nbatch = [1, 2]", "5s").await;
    let c = deploy_through_a_cut(&mut fleet, "slow", Moment::Gate, Cut::Reload).await;
    assert_carried_on(&fleet, "slow", &c);
    assert!(
        c.back_after < Duration::from_millis(2500),
        "back after {:?}, the gate took 4 s: {}",
        c.back_after,
        c.load
    );
}
