//! Test harness: a local fleet in a temp dir, a real `cutover proxy` process, and the real
//! binary for deploys. Everything it starts is stopped on drop, also when a test fails.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use cutover::balancer::builtin::AdminClient;
use cutover::balancer::{BackendView, Balancer};
use tokio::process::{Child, Command};

pub const TOKEN: &str = "test-token-0123456789";

/// Path of the binary under test.
pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cutover"))
}

/// A port free on `ip` right now.
pub fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Two distinct ports free on `ip` right now: both sockets are held while the second is picked,
/// so the kernel cannot hand out the same port twice.
pub fn free_pair(ip: &str) -> [SocketAddr; 2] {
    let a = TcpListener::bind((ip, 0)).unwrap();
    let b = TcpListener::bind((ip, 0)).unwrap();
    [a.local_addr().unwrap(), b.local_addr().unwrap()]
}

/// Options of a test fleet.
pub struct FleetSpec {
    pub hosts: usize,
    /// Third octet-ish: host i gets 127.0.<net>.<10+i>, so concurrent tests use distinct addresses.
    pub net: u8,
    /// `[strategy]` body (without the header).
    pub strategy: String,
    /// Extra `[app]` lines.
    pub app_extra: String,
    /// Extra `[app.health]` lines.
    pub health_extra: String,
    /// Extra top-level tables appended at the end (`[analysis]`, `[[verify]]`, ...).
    pub extra: String,
}

impl FleetSpec {
    pub fn new(hosts: usize, net: u8) -> Self {
        FleetSpec {
            hosts,
            net,
            strategy: "kind = \"rolling\"\nbatch = [1, \"50%\"]\n".into(),
            app_extra: String::new(),
            health_extra: String::new(),
            extra: String::new(),
        }
    }
}

/// Writes release `version` under `releases` whose instances are healthy on `hosts` only (the
/// others answer their health check with 503): a deploy moves those hosts, then fails.
pub fn write_release_healthy_only_on(releases: &Path, version: &str, hosts: &[&str]) {
    let dir = releases.join(version);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("run.sh"),
        format!(
            "flags=--unhealthy\ncase \"$CUTOVER_HOST\" in {}) flags= ;; esac\nexec '{}' sample-app --listen \"$CUTOVER_ADDRESS:$PORT\" --version {version} $flags\n",
            hosts.join("|"),
            exe().display()
        ),
    )
    .unwrap();
}

/// A local fleet with its own balancer process.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub hosts: Vec<(String, String)>,
    proxy: Option<Child>,
}

impl Fleet {
    /// Writes the workspace (releases v1, v2 and broken ones) and starts `cutover proxy`.
    pub async fn start(spec: FleetSpec) -> Fleet {
        let dir = tempfile::Builder::new()
            .prefix("cutover-test-")
            .tempdir()
            .unwrap();
        let [listen, admin] = free_pair("127.0.0.1");
        let exe = exe();
        for (v, flags) in [
            ("v1", ""),
            ("v2", ""),
            ("crash", "--exit-on-start"),
            ("sick", "--unhealthy"),
        ] {
            cutover::init::write_sample_release(
                &dir.path().join("releases").join(v),
                &exe,
                v,
                flags,
            )
            .unwrap();
        }
        let hosts: Vec<(String, String)> = (0..spec.hosts)
            .map(|i| {
                (
                    format!("web{}", i + 1),
                    format!("127.0.{}.{}", spec.net, 11 + i),
                )
            })
            .collect();
        let mut text = format!(
            "transport = \"local\"\n\n[app]\nname = \"test\"\nstart = \"exec sh ./run.sh\"\nstop_timeout = \"5s\"\n{}\n\
             [app.health]\npath = \"/health\"\ninterval = \"200ms\"\ntimeout = \"1s\"\ndeadline = \"10s\"\n{}\n\
             [release]\npath = \"releases/{{version}}\"\nkeep = 3\n\n\
             [balancer]\nlisten = \"{listen}\"\nadmin = \"{admin}\"\ntoken = \"{TOKEN}\"\n\n[strategy]\n{}\n",
            if spec.app_extra.contains("drain_timeout") {
                spec.app_extra.clone()
            } else {
                format!("drain_timeout = \"5s\"\n{}", spec.app_extra)
            },
            spec.health_extra,
            spec.strategy
        );
        for (name, addr) in &hosts {
            text.push_str(&format!(
                "\n[[hosts]]\nname = \"{name}\"\naddress = \"{addr}\"\nroot = \"fleet/{name}\"\n"
            ));
        }
        text.push('\n');
        text.push_str(&spec.extra);
        let config = dir.path().join("cutover.toml");
        std::fs::write(&config, text).unwrap();
        let mut fleet = Fleet {
            dir,
            config,
            listen,
            admin,
            hosts,
            proxy: None,
        };
        // The ports were free when picked, but an outgoing connection of another test can
        // take one as its ephemeral port before the proxy binds it: pick others then.
        let mut started = Err(String::new());
        for _ in 0..3 {
            started = fleet.try_start_proxy().await;
            if started.is_ok() || !fleet.proxy_log().contains("Address already in use") {
                break;
            }
            fleet.kill_proxy().await;
            let [listen, admin] = free_pair("127.0.0.1");
            let text = std::fs::read_to_string(&fleet.config)
                .unwrap()
                .replace(
                    &format!("listen = \"{}\"", fleet.listen),
                    &format!("listen = \"{listen}\""),
                )
                .replace(
                    &format!("admin = \"{}\"", fleet.admin),
                    &format!("admin = \"{admin}\""),
                );
            std::fs::write(&fleet.config, text).unwrap();
            (fleet.listen, fleet.admin) = (listen, admin);
        }
        if let Err(e) = started {
            panic!("{e}");
        }
        fleet
    }

    /// Starts `cutover proxy` and waits until its admin API answers.
    pub async fn start_proxy(&mut self) {
        if let Err(e) = self.try_start_proxy().await {
            panic!("{e}");
        }
    }

    /// [`Fleet::start_proxy`], saying why it did not come up instead of panicking.
    async fn try_start_proxy(&mut self) -> Result<(), String> {
        let log = std::fs::File::create(self.dir.path().join("proxy.log")).unwrap();
        let child = Command::new(exe())
            .arg("-c")
            .arg(&self.config)
            .arg("proxy")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("cutover proxy starts");
        self.proxy = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.client().backends().await.is_ok() {
                return Ok(());
            }
            let exited = self
                .proxy
                .as_mut()
                .is_some_and(|p| p.try_wait().ok().flatten().is_some());
            if exited || Instant::now() >= deadline {
                return Err(format!(
                    "cutover proxy did not come up: {}",
                    self.proxy_log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the balancer process (SIGKILL) and waits for it to be gone.
    pub async fn kill_proxy(&mut self) {
        if let Some(mut p) = self.proxy.take() {
            let _ = p.start_kill();
            let _ = p.wait().await;
        }
    }

    pub fn proxy_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }

    pub fn client(&self) -> AdminClient {
        AdminClient::new(self.admin, TOKEN.to_string())
    }

    pub async fn backends(&self) -> Vec<BackendView> {
        self.client().backends().await.expect("admin API answers")
    }

    /// Every host serves `version` alone: `current`, one live process, one active healthy
    /// backend pointing at a live instance; nothing else runs.
    pub async fn assert_on(&self, version: &str) {
        use cutover::balancer::BackendState;
        use cutover::balancer::api::Health;
        let backends = self.backends().await;
        for (host, _) in &self.hosts {
            assert_eq!(
                self.current(host).as_deref(),
                Some(version),
                "{host}: current"
            );
            let mine: Vec<_> = backends.iter().filter(|b| &b.spec.host == host).collect();
            assert_eq!(mine.len(), 1, "{host}: exactly one backend: {mine:#?}");
            assert_eq!(mine[0].spec.release, version, "{host}: backend release");
            assert_eq!(mine[0].state, BackendState::Active, "{host}: in rotation");
            assert_eq!(mine[0].health, Health::Healthy, "{host}: healthy");
            assert_eq!(
                mine[0].spec.weight,
                cutover::balancer::api::default_weight(),
                "{host}: full weight"
            );
        }
        let live = self.live_instances();
        assert_eq!(
            live.len(),
            self.hosts.len(),
            "one process per host: {live:?}"
        );
        assert!(
            live.iter().all(|(v, _)| v == version),
            "only {version} runs: {live:?}"
        );
    }

    /// Kills the running deployment (the deploy lock's holder, a process the test started)
    /// with SIGKILL, as a crash would, and waits for it to end.
    pub async fn kill_running_deploy(
        &self,
        deploy: tokio::task::JoinHandle<(i32, String, String)>,
    ) {
        self.signal_running_deploy(libc::SIGKILL);
        let (code, _, _) = deploy.await.unwrap();
        assert_eq!(code, -9, "killed");
    }

    /// Sends `signal` to the running deployment (the deploy lock's holder, a process the test
    /// started).
    pub fn signal_running_deploy(&self, signal: i32) {
        let journal = cutover::journal::Journal::open(&self.dir.path().join(".cutover")).unwrap();
        let holder = journal
            .lock_holder("test")
            .unwrap()
            .expect("a running deploy holds the lock");
        // SAFETY: kill(2) on the deploy process this test spawned.
        unsafe {
            libc::kill(holder.pid as i32, signal);
        }
    }

    /// Runs `cutover <args> -c <config>`; returns exit code, stdout, stderr.
    pub async fn cutover(&self, args: &[&str]) -> (i32, String, String) {
        self.cutover_env(args, &[]).await
    }

    /// Like [`Fleet::cutover`] with extra environment variables. A process killed by a signal
    /// reports `-signal` as its exit code.
    pub async fn cutover_env(&self, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
        use std::os::unix::process::ExitStatusExt;
        let out = Command::new(exe())
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .expect("cutover runs");
        (
            out.status
                .code()
                .unwrap_or_else(|| -out.status.signal().unwrap_or(1)),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The live status of the running deployment (`cutover status --json`), if any.
    pub async fn deployment_status(&self) -> Option<serde_json::Value> {
        let (code, out, err) = self.cutover(&["status", "--json"]).await;
        assert_eq!(code, 0, "status: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("status --json is JSON");
        let d = v.get("deployment")?.clone();
        (!d.is_null()).then_some(d)
    }

    /// Polls the live status until `pred` holds (bounded).
    pub async fn wait_status(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(d) = self.deployment_status().await {
                if pred(&d) {
                    return d;
                }
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }

    /// Starts `cutover <args>` in the background; the handle yields (code, stdout, stderr).
    pub fn spawn_cutover(&self, args: &[&str]) -> tokio::task::JoinHandle<(i32, String, String)> {
        spawn_cutover_with(&self.config, args, &[])
    }

    /// Deploys and asserts the exit code.
    pub async fn deploy(&self, version: &str, expect: i32) -> (String, String) {
        let (code, out, err) = self.cutover(&["deploy", "--version", version]).await;
        assert_eq!(
            code,
            expect,
            "deploy {version} exit code\nstdout:\n{out}\nstderr:\n{err}\nproxy:\n{}",
            self.proxy_log()
        );
        (out, err)
    }

    pub fn root(&self, host: &str) -> PathBuf {
        self.dir.path().join("fleet").join(host)
    }

    /// The release `current` points at on a host.
    pub fn current(&self, host: &str) -> Option<String> {
        std::fs::read_link(self.root(host).join("current"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
    }

    /// Live instance processes started for this fleet, as (version, pid), found through /proc
    /// (the CUTOVER_INSTANCE marker in their environment), not through our own pid files.
    pub fn live_instances(&self) -> Vec<(String, u32)> {
        live_instances_under(self.dir.path())
    }
}

/// Processes whose CUTOVER_INSTANCE points under `dir`, and that are not zombies.
pub fn live_instances_under(dir: &Path) -> Vec<(String, u32)> {
    let prefix = format!("CUTOVER_INSTANCE={}", dir.display());
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let state = stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next());
        if matches!(state, Some('Z') | Some('X') | None) {
            continue;
        }
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        for var in env.split(|b| *b == 0) {
            let var = String::from_utf8_lossy(var);
            if var.starts_with(&prefix) {
                let version = var
                    .rsplit('/')
                    .next()
                    .unwrap_or("")
                    .trim_end_matches(".pid");
                let version = version
                    .rsplit_once('-')
                    .map_or(version, |(v, _)| v)
                    .to_string();
                found.push((version, pid));
            }
        }
    }
    found
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Kill every instance process group we started, then the proxy (kill_on_drop).
        for (_, pid) in live_instances_under(self.dir.path()) {
            unsafe {
                libc::kill(-(pid as i32), libc::SIGKILL);
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
        if let Some(mut p) = self.proxy.take() {
            let _ = p.start_kill();
        }
    }
}

/// The pid a test's command wrote to `file`, once it has: the command is running. Panics
/// after 30 s saying `what` never ran.
pub async fn wait_for_pid_file(file: &Path, what: &str) -> i32 {
    let t = Instant::now();
    loop {
        if let Some(p) = std::fs::read_to_string(file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return p;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{what} never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether `pid`, a process a test's command started, still lives; if it does it is killed,
/// so the test leaves nothing behind whatever it asserts next.
pub fn kill_if_alive(pid: i32) -> bool {
    let alive = cutover::journal::process_alive(pid as u32);
    if alive {
        // SAFETY: kill(2) on a process the test's own command started and reported.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    alive
}

/// A `[[verify]]` suite at `point` that passes at once for v1 and, for any other version,
/// runs 30 s (and would then fail), its `sleep`'s pid in the returned file: what an
/// operator's abort or rollback must stop. Returns the pid file and the config text.
pub fn long_verification(net: u8, point: &str) -> (PathBuf, String) {
    let pid_file =
        std::env::temp_dir().join(format!("cutover-verify{net}-{}.pid", std::process::id()));
    let extra = format!(
        "[[verify]]\ncommand = \"test $CUTOVER_VERSION = v1 && exit 0; sleep 30 & echo $! > {}; wait; exit 1\"\nat = [\"{point}\"]\ntimeout = \"60s\"\n",
        pid_file.display()
    );
    (pid_file, extra)
}

/// Starts `cutover -c <config> <args>` with `env` in the background; the handle yields (code,
/// stdout, stderr). The process is killed if the handle's task is dropped.
pub fn spawn_cutover_with(
    config: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> tokio::task::JoinHandle<(i32, String, String)> {
    let mut cmd = Command::new(exe());
    cmd.arg("-c")
        .arg(config)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::spawn(async move {
        use std::os::unix::process::ExitStatusExt;
        let out = cmd.output().await.expect("cutover runs");
        (
            out.status
                .code()
                .unwrap_or_else(|| -out.status.signal().unwrap_or(1)),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
}
