//! Real servers: a fleet reached over OpenSSH (a private `sshd` on 127.0.0.21-24 stands for
//! four servers), releases built once from a git ref and verified by digest on each host,
//! Ansible inventories, hooks, and versions that stay data.

mod common;
#[path = "support/sshd.rs"]
mod sshd;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use cutover::balancer::builtin::AdminClient;
use cutover::balancer::{BackendState, BackendView, Balancer};
use cutover::load::{self, LoadSpec};
use sshd::Sshd;
use tokio::process::{Child, Command};

const ADDRESSES: [&str; 4] = ["127.0.0.21", "127.0.0.22", "127.0.0.23", "127.0.0.24"];

fn git(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=test", "-c", "user.email=test@example.com"])
        .args(args)
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git {args:?}: {out:?}");
}

/// The commit `rev` names in `repo`.
fn rev_parse(repo: &Path, rev: &str) -> String {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["rev-parse", rev])
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git rev-parse {rev}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A four-host fleet over SSH behind a real `cutover proxy`, deploying from a local git repo.
struct SshFleet {
    sshd: Sshd,
    dir: tempfile::TempDir,
    config: PathBuf,
    listen: SocketAddr,
    admin: SocketAddr,
    hosts: Vec<String>,
    proxy: Option<Child>,
}

struct Opts {
    strategy: String,
    extra_top: String,
    extra: String,
    /// Per host (index) SSH port override (e.g. a closed port).
    port_override: Option<(usize, u16)>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            strategy: "kind = \"rolling\"\nbatch = [1, \"50%\"]\n".into(),
            extra_top: String::new(),
            extra: String::new(),
            port_override: None,
        }
    }
}

impl SshFleet {
    async fn start(opts: Opts) -> SshFleet {
        let sshd = Sshd::start(&ADDRESSES);
        let dir = tempfile::Builder::new()
            .prefix("cutover-ssh-test-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        // The app's repository: tags v1 and v2, and "broken" whose build fails.
        let repo = d.join("repo");
        std::fs::create_dir_all(&repo).unwrap();
        git(&repo, &["init", "-q", "-b", "main"]);
        std::fs::write(
            repo.join("run.sh.in"),
            format!(
                "#!/bin/sh\nexec '{}' sample-app --listen \"$CUTOVER_ADDRESS:$PORT\" --version @VERSION@\n",
                common::exe().display()
            ),
        )
        .unwrap();
        let build = format!(
            "set -e\nsed \"s/@VERSION@/$CUTOVER_VERSION/\" run.sh.in > run.sh\necho \"$CUTOVER_VERSION $CUTOVER_COMMIT\" > BUILD_INFO\necho \"$CUTOVER_VERSION\" >> '{}'\n",
            d.join("builds.log").display()
        );
        std::fs::write(repo.join("build.sh"), &build).unwrap();
        std::fs::write(repo.join("README"), "not shipped\n").unwrap();
        git(&repo, &["add", "."]);
        git(&repo, &["commit", "-q", "-m", "v1"]);
        git(&repo, &["tag", "v1"]);
        std::fs::write(repo.join("CHANGES"), "v2\n").unwrap();
        git(&repo, &["add", "."]);
        git(&repo, &["commit", "-q", "-m", "v2"]);
        git(&repo, &["tag", "v2"]);
        std::fs::write(
            repo.join("build.sh"),
            "echo 'compiler error: boom' >&2\nexit 7\n",
        )
        .unwrap();
        git(&repo, &["commit", "-q", "-am", "broken"]);
        git(&repo, &["tag", "broken"]);

        let [listen, admin] = common::free_pair("127.0.0.1");
        let hosts: Vec<String> = (1..=4).map(|i| format!("web{i}")).collect();
        let mut fleet = SshFleet {
            sshd,
            dir,
            config: PathBuf::new(),
            listen,
            admin,
            hosts,
            proxy: None,
        };
        fleet.write_config(&opts);
        fleet.start_proxy().await;
        fleet
    }

    fn write_config(&mut self, opts: &Opts) {
        let d = self.dir.path();
        let mut text = format!(
            "transport = \"ssh\"\nhost_key_checking = \"strict\"\nconnect_timeout = \"5s\"\n{top}\n\
             [app]\nname = \"shop\"\nstart = \"exec sh ./run.sh\"\nstop_timeout = \"5s\"\ndrain_timeout = \"5s\"\n\n\
             [app.health]\npath = \"/health\"\ninterval = \"200ms\"\ntimeout = \"1s\"\ndeadline = \"10s\"\n\n\
             [release]\ngit = \"file://{repo}\"\nbuild = \"sh build.sh\"\ninclude = [\"run.sh\", \"BUILD_INFO\"]\nkeep = 3\n\n\
             [balancer]\nlisten = \"{listen}\"\nadmin = \"{admin}\"\ntoken = \"{token}\"\n\n[strategy]\n{strategy}\n{extra}\n",
            top = opts.extra_top,
            repo = d.join("repo").display(),
            listen = self.listen,
            admin = self.admin,
            token = common::TOKEN,
            strategy = opts.strategy,
            extra = opts.extra,
        );
        for (i, (name, addr)) in self.hosts.iter().zip(ADDRESSES).enumerate() {
            let port = match opts.port_override {
                Some((j, p)) if j == i => p,
                _ => self.sshd.port,
            };
            text.push_str(&format!(
                "\n[[hosts]]\nname = \"{name}\"\naddress = \"{addr}\"\nport = {port}\nuser = \"root\"\nidentity = \"{key}\"\nroot = \"{root}\"\n",
                key = self.sshd.client_key.display(),
                root = d.join("fleet").join(name).display(),
            ));
        }
        self.config = d.join("cutover.toml");
        std::fs::write(&self.config, text).unwrap();
    }

    async fn start_proxy(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("proxy.log")).unwrap();
        let child = Command::new(common::exe())
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
        while self.client().backends().await.is_err() {
            assert!(Instant::now() < deadline, "cutover proxy did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn client(&self) -> AdminClient {
        AdminClient::new(self.admin, common::TOKEN.to_string())
    }

    async fn backends(&self) -> Vec<BackendView> {
        self.client().backends().await.expect("admin API answers")
    }

    async fn cutover(&self, args: &[&str]) -> (i32, String, String) {
        self.cutover_with(args, &[]).await
    }

    async fn cutover_with(&self, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
        let out = Command::new(common::exe())
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .env(cutover::transport::ssh::CONFIG_ENV, &self.sshd.ssh_config)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .expect("cutover runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    async fn deploy(&self, version: &str, expect: i32) -> (String, String) {
        let (code, out, err) = self.cutover(&["deploy", "--version", version]).await;
        assert_eq!(
            code,
            expect,
            "deploy {version}\nstdout:\n{out}\nstderr:\n{err}\nsshd:\n{}",
            self.sshd.log()
        );
        (out, err)
    }

    fn root(&self, host: &str) -> PathBuf {
        self.dir.path().join("fleet").join(host)
    }

    fn current(&self, host: &str) -> Option<String> {
        std::fs::read_link(self.root(host).join("current"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
    }

    fn builds(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("builds.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// SSH logins sshd accepted so far.
    fn logins(&self) -> usize {
        self.sshd.log().matches("Accepted publickey").count()
    }

    async fn assert_on(&self, hosts: &[&str], version: &str) {
        let backends = self.backends().await;
        for host in hosts {
            assert_eq!(self.current(host).as_deref(), Some(version), "{host}");
            let mine: Vec<_> = backends.iter().filter(|b| b.spec.host == *host).collect();
            assert_eq!(mine.len(), 1, "{host}: one backend: {mine:#?}");
            assert_eq!(mine[0].spec.release, version, "{host}");
            assert_eq!(mine[0].state, BackendState::Active, "{host}");
            let info = std::fs::read_to_string(
                self.root(host)
                    .join("releases")
                    .join(version)
                    .join("BUILD_INFO"),
            )
            .unwrap();
            assert!(
                info.starts_with(version),
                "{host}: built from {version}: {info}"
            );
        }
    }
}

impl Drop for SshFleet {
    fn drop(&mut self) {
        for (_, pid) in common::live_instances_under(self.dir.path()) {
            // SAFETY: kill(2) on instance processes this test started (found by their marker).
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

fn traffic(listen: SocketAddr) -> load::LoadRun {
    load::start(LoadSpec {
        target: listen,
        path: "/".into(),
        rate: 250,
        max_requests: 30_000,
        max_duration: Duration::from_secs(120),
        concurrency: 8,
        headers: Vec::new(),
    })
}

/// The hosts named by the "uploaded to N host(s) ...: a, b" progress line.
fn uploads(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| l.contains("each verified the sha256"))
        .flat_map(|l| {
            l.rsplit_once(": ")
                .map(|(_, hosts)| hosts.split(", ").map(str::to_string).collect::<Vec<_>>())
                .unwrap_or_default()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_fleet_rolls_a_git_release_under_load_with_no_failed_request() {
    let fleet = SshFleet::start(Opts::default()).await;
    let (_, err) = fleet.deploy("v1", 0).await;
    let mut up = uploads(&err);
    up.sort();
    assert_eq!(up, fleet.hosts, "one upload per host: {err}");
    fleet
        .assert_on(&["web1", "web2", "web3", "web4"], "v1")
        .await;
    // One multiplexed connection per host for the whole deploy.
    assert_eq!(
        fleet.logins(),
        4,
        "one SSH login per host:\n{}",
        fleet.sshd.log()
    );

    let run = traffic(fleet.listen);
    run.wait_until(|r| r.ok >= 100).await;
    let (out, err) = fleet.deploy("v2", 0).await;
    tokio::time::timeout(Duration::from_secs(60), run.wait_until(|r| r.sent >= 2_000))
        .await
        .expect("traffic reaches 2,000 requests");
    let report = run.stop().await;

    assert!(report.sent >= 2_000, "{report}");
    assert_eq!(report.failed, 0, "{report}\n{:#?}\n{err}", report.failures);
    assert!(
        report.share("v1") > 0.0 && report.share("v2") > 0.0,
        "{report}"
    );
    assert!(out.contains("succeeded"), "{out}");
    let mut up = uploads(&err);
    up.sort();
    assert_eq!(up, fleet.hosts, "one upload per host: {err}");
    assert!(err.contains("built v2 once"), "{err}");
    assert_eq!(fleet.builds(), ["v1", "v2"], "built once per version");
    assert_eq!(
        fleet.logins(),
        4,
        "one SSH login per host for both deploys: the masters persist (ssh_persist) between commands"
    );
    fleet
        .assert_on(&["web1", "web2", "web3", "web4"], "v2")
        .await;
    for h in &fleet.hosts {
        let releases = fleet.root(h).join("releases");
        // Only what `include` selects ships, and no upload or partial is left behind.
        assert!(!releases.join("v2/README").exists());
        assert!(!releases.join("v2/build.sh").exists());
        let leftovers: Vec<_> = std::fs::read_dir(&releases)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| (n.starts_with('.') && !n.starts_with(".live-")) || n.ends_with(".partial"))
            .collect();
        assert!(leftovers.is_empty(), "{h}: {leftovers:?}");
    }
}

async fn unreachable_fleet(max_fail: u32) -> (SshFleet, String, String) {
    let mut fleet = SshFleet::start(Opts {
        strategy: format!("kind = \"rolling\"\nbatch = 4\nmax_fail_percentage = {max_fail}\n"),
        ..Opts::default()
    })
    .await;
    fleet.deploy("v1", 0).await;
    // web4's SSH port is now closed.
    let closed = common::free_port(ADDRESSES[3]);
    fleet.write_config(&Opts {
        strategy: format!("kind = \"rolling\"\nbatch = 4\nmax_fail_percentage = {max_fail}\n"),
        port_override: Some((3, closed)),
        ..Opts::default()
    });
    let expect = if max_fail >= 25 { 0 } else { 1 };
    let (out, err) = fleet.deploy("v2", expect).await;
    (fleet, out, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_host_within_the_budget_is_named_and_the_rest_deploy() {
    let (fleet, out, err) = unreachable_fleet(30).await;
    let all = format!("{out}\n{err}");
    assert!(all.contains("failed host web4"), "{all}");
    assert!(all.contains("127.0.0.24"), "the address is named: {all}");
    assert!(
        all.contains("Connection refused"),
        "the ssh error is shown: {all}"
    );
    assert!(out.contains("succeeded"), "{out}");
    fleet.assert_on(&["web1", "web2", "web3"], "v2").await;
    fleet.assert_on(&["web4"], "v1").await;

    // `status` cannot read web4 either: it shows what the balancer knows of it (v1 still takes
    // traffic there), says drift was not checked there, and exits 2; it used to skip the
    // host's backends and report "no drift" with exit 0.
    let (code, out, err) = fleet.cutover(&["status"]).await;
    assert_eq!(code, 2, "a host could not be read: {out}\n{err}");
    let web4: Vec<&str> = out.lines().filter(|l| l.starts_with("web4 ")).collect();
    assert!(web4.iter().any(|l| l.contains("unreachable:")), "{out}");
    assert!(
        web4.iter()
            .any(|l| l.contains(&format!("v1@{}:", ADDRESSES[3])) && l.contains("active")),
        "web4's backend is shown: {out}"
    );
    assert!(!out.contains("no drift: hosts and balancer"), "{out}");
    assert!(out.contains("drift not checked on web4"), "{out}");
    let (code, out, _) = fleet.cutover(&["status", "--json"]).await;
    assert_eq!(code, 2, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["drift_unchecked"], serde_json::json!(["web4"]), "{out}");
    assert!(v["hosts"][3]["error"].is_string(), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_host_with_no_budget_rolls_the_fleet_back() {
    let (fleet, out, err) = unreachable_fleet(0).await;
    let all = format!("{out}\n{err}");
    assert!(all.contains("failed host web4"), "{all}");
    assert!(all.contains("127.0.0.24"), "{all}");
    assert!(out.contains("rolled back"), "{out}");
    fleet
        .assert_on(&["web1", "web2", "web3", "web4"], "v1")
        .await;
}

/// The fleet lock over SSH: a stale one another machine left on web1 is taken over and the
/// deploy's own is removed at the end; with web1 down, web2 (the next in config order) holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_lock_travels_over_ssh_and_moves_on_when_the_first_host_is_down() {
    let strategy = "kind = \"rolling\"\nbatch = 4\nmax_fail_percentage = 30\n".to_string();
    let mut fleet = SshFleet::start(Opts {
        strategy: strategy.clone(),
        ..Opts::default()
    })
    .await;
    fleet.deploy("v1", 0).await;
    let lock = fleet.root("web1").join(".cutover-lock");
    let holder = serde_json::json!({
        "user": "alice", "machine": "laptop-gone", "pid": 4242, "started_ms": 1, "what": "deploy v9",
    });
    std::fs::write(
        &lock,
        format!(
            "cutover fleet lock 1\nholder {holder}\nlease_until_ms {}\n",
            cutover::journal::now_ms() - 1000
        ),
    )
    .unwrap();
    let (_, err) = fleet.deploy("v2", 0).await;
    assert!(
        err.contains(
            "took over a stale fleet lock on host web1 (its lease expired): deploy v9 by alice"
        ),
        "{err}"
    );
    assert!(!lock.exists(), "released over SSH");
    let (_, out, _) = fleet.cutover(&["lock"]).await;
    assert!(out.ends_with("fleet: unlocked (host web1)\n"), "{out}");

    // web1's SSH port is now closed.
    let closed = common::free_port(ADDRESSES[0]);
    fleet.write_config(&Opts {
        strategy,
        port_override: Some((0, closed)),
        ..Opts::default()
    });
    let (_, err) = fleet.deploy("v1", 0).await;
    assert!(
        err.contains("the fleet lock is held on host web2 (the first that answered)")
            && err.contains("web1"),
        "{err}"
    );
    assert!(!fleet.root("web2").join(".cutover-lock").exists());
    let (_, out, _) = fleet.cutover(&["lock"]).await;
    assert!(out.contains("fleet: unlocked (host web2; "), "{out}");
}

/// Rewrites known_hosts so that `addresses` are known with a key no sshd of the fleet has
/// (as after a reinstall, or a machine that is not the host); the others keep theirs.
fn change_host_keys(fleet: &SshFleet, addresses: &[&str]) {
    let other = fleet.sshd.dir.path().join("other_key");
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other)
        .status()
        .unwrap();
    assert!(st.success());
    let other_pub = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let kh: String = std::fs::read_to_string(&fleet.sshd.known_hosts)
        .unwrap()
        .lines()
        .map(|l| {
            match addresses
                .iter()
                .map(|a| format!("[{a}]:{}", fleet.sshd.port))
                .find(|entry| l.starts_with(&format!("{entry} ")))
            {
                Some(entry) => format!("{entry} {}", other_pub.trim()),
                None => l.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&fleet.sshd.known_hosts, kh + "\n").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_host_key_is_refused_under_strict_with_what_to_do() {
    let fleet = SshFleet::start(Opts::default()).await;
    // known_hosts holds another key for every host.
    change_host_keys(&fleet, &ADDRESSES);
    let (code, out, err) = fleet.cutover(&["deploy", "--version", "v1"]).await;
    let all = format!("{out}\n{err}");
    assert_eq!(code, 2, "{all}");
    assert!(all.contains("Host key verification failed"), "{all}");
    assert!(all.contains("ssh-keygen -R"), "says what to do: {all}");
    assert!(
        all.contains("SSH host key changed: the deploy stops before any host changes"),
        "{all}"
    );
    assert!(
        fleet.backends().await.is_empty(),
        "nothing reached the balancer"
    );
    assert_eq!(fleet.logins(), 0, "no login happened");
    for h in &fleet.hosts {
        assert!(!fleet.root(h).join("releases").exists(), "{h} untouched");
    }

    // An unknown host (empty known_hosts) gets the other advice.
    std::fs::write(&fleet.sshd.known_hosts, "").unwrap();
    let (code, out, err) = fleet.cutover(&["deploy", "--version", "v1"]).await;
    let all = format!("{out}\n{err}");
    assert_ne!(code, 0, "{all}");
    assert!(all.contains("ssh-keyscan"), "{all}");
    assert!(all.contains("accept-new"), "{all}");
    // Not "(nothing) -> v1", which reads as a first deploy.
    assert!(
        all.contains(": (not known: 4 host(s) could not be read) -> v1"),
        "{all}"
    );
}

/// A review found a changed key on one host counted as one failed host: with a budget that
/// tolerates one, the others deployed and the deploy "succeeded". A changed key may be someone
/// else's machine: the deploy stops before anything moves, whatever the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_host_key_stops_the_deploy_whatever_the_budget() {
    let fleet = SshFleet::start(Opts {
        strategy: "kind = \"rolling\"\nbatch = 4\nmax_fail_percentage = 50\n".into(),
        ..Opts::default()
    })
    .await;
    change_host_keys(&fleet, &[ADDRESSES[2]]);
    let web3 = format!("[{}]:{}", ADDRESSES[2], fleet.sshd.port);
    let (code, out, err) = fleet.cutover(&["deploy", "--version", "v1"]).await;
    let all = format!("{out}\n{err}");
    assert_eq!(code, 2, "{all}");
    assert!(
        all.contains("host web3's SSH host key changed: the deploy stops before any host changes, whatever max_fail_percentage allows"),
        "{all}"
    );
    // The hint names the entry and the file ssh reads (its config sets them here).
    assert!(
        all.contains(&format!(
            "ssh-keygen -R '{web3}' -f {}",
            fleet.sshd.known_hosts.display()
        )),
        "{all}"
    );
    assert!(fleet.backends().await.is_empty(), "no host moved: {all}");
    for h in &fleet.hosts {
        assert!(!fleet.root(h).join("releases").exists(), "{h} untouched");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_with_shell_metacharacters_never_run_anything() {
    let fleet = SshFleet::start(Opts::default()).await;
    let marker = fleet.dir.path().join("pwned");
    let m = marker.display().to_string();
    for version in [
        format!("v1;touch {m}"),
        format!("$(touch {m})"),
        format!("`touch {m}`"),
        format!("v1\ntouch {m}"),
        format!("v1 && touch {m}"),
        "v1;touch /tmp/pwned".to_string(),
        "--upload-pack=touch".to_string(),
    ] {
        let arg = format!("--version={version}");
        let (code, out, err) = fleet.cutover(&["deploy", &arg]).await;
        assert_eq!(code, 2, "{version:?} refused\n{out}\n{err}");
        assert!(err.contains("not a valid name"), "{version:?}: {err}");
        assert!(!marker.exists(), "{version:?} ran a command");
    }
    assert!(fleet.builds().is_empty(), "nothing was built");
    assert_eq!(fleet.logins(), 0, "no host was contacted");
    for h in &fleet.hosts {
        assert!(!fleet.root(h).exists(), "{h} untouched");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_build_stops_the_deploy_before_any_host_changes() {
    let fleet = SshFleet::start(Opts::default()).await;
    fleet.deploy("v1", 0).await;
    let before = fleet.backends().await;
    let (code, out, err) = fleet.cutover(&["deploy", "--version", "broken"]).await;
    let all = format!("{out}\n{err}");
    assert_ne!(code, 0, "{all}");
    assert!(
        all.contains("compiler error: boom"),
        "the build's output is shown: {all}"
    );
    assert!(all.contains("exit 7"), "{all}");
    // The build is this machine's, not a host's staging.
    assert!(!all.contains("failed on every host"), "{all}");
    assert_eq!(
        fleet.builds(),
        ["v1"],
        "the broken build wrote nothing: {all}"
    );
    let after = fleet.backends().await;
    let ids = |b: &[BackendView]| {
        let mut v: Vec<String> = b.iter().map(|b| b.spec.id.clone()).collect();
        v.sort();
        v
    };
    assert_eq!(ids(&before), ids(&after), "no traffic change");
    fleet
        .assert_on(&["web1", "web2", "web3", "web4"], "v1")
        .await;
    for h in &fleet.hosts {
        assert!(!fleet.root(h).join("releases/broken").exists(), "{h}");
    }
}

/// A branch moves, a staged release must not: deploying a branch deploys the commit it points
/// at, named by its sha, so deploying it again after it moved ships the new code (it once
/// found `releases/<branch>` staged and kept the old code, reporting success).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploying_a_branch_deploys_the_commit_it_points_at_now() {
    let fleet = SshFleet::start(Opts::default()).await;
    let repo = fleet.dir.path().join("repo");
    let sha = |rev: &str| rev_parse(&repo, rev);
    let hosts = ["web1", "web2", "web3", "web4"];
    git(&repo, &["branch", "release", "v1"]);
    let v1 = sha("v1^{commit}");
    // The plan asks as the deploy does, and shows the commit that would ship.
    let (code, out, err) = fleet.cutover(&["plan", "--version", "release"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains(&format!("releases/{v1}/")) && err.contains(&format!("now at {v1}")),
        "{out}\n{err}"
    );
    let (_, out, err) = fleet.cutover(&["plan", "--version", "v1"]).await;
    assert!(
        out.contains("releases/v1/") && !err.contains("is a branch"),
        "{out}\n{err}"
    );
    let (_, _, err) = fleet.cutover(&["plan", "--version", "HEAD"]).await;
    assert!(err.contains("a deploy now would be refused"), "{err}");
    let (_, err) = fleet.deploy("release", 0).await;
    assert!(
        err.contains(&format!("release is a branch, now at {v1}")),
        "{err}"
    );
    fleet.assert_on(&hosts, &v1).await;

    git(&repo, &["branch", "-f", "release", "v2"]);
    let (_, err) = fleet.deploy("release", 0).await;
    let v2 = sha("v2^{commit}");
    assert!(err.contains(&format!("now at {v2}")), "{err}");
    fleet.assert_on(&hosts, &v2).await;
    // A 40-character version keeps the tables' columns in line (a review found them
    // shifted): every row has its PID and its TO where the header says.
    let (_, status, _) = fleet.cutover(&["status"]).await;
    let header = status.lines().next().unwrap();
    let pid_at = header.find("PID").unwrap();
    for row in status.lines().skip(1).take_while(|l| !l.is_empty()) {
        assert!(
            row[pid_at..].starts_with(|c: char| c.is_ascii_digit()) && row[..pid_at].ends_with(' '),
            "{status}"
        );
    }
    let (_, history, _) = fleet.cutover(&["history"]).await;
    let header = history.lines().next().unwrap();
    let (to_at, outcome_at) = (
        header.find(" TO ").unwrap() + 1,
        header.find("OUTCOME").unwrap(),
    );
    let newest = history.lines().nth(1).unwrap();
    assert!(
        newest[to_at..].starts_with(&v2) && newest[outcome_at..].starts_with("succeeded"),
        "{history}"
    );
    // Tags name one tree for good: deployed by their name.
    let (_, err) = fleet.deploy("v1", 0).await;
    assert!(!err.contains("is a branch"), "{err}");
    fleet.assert_on(&hosts, "v1").await;
    // A repository that cannot be asked stops the deploy before anything is built: a branch
    // staged under its moving name would never be rebuilt.
    let away = fleet.dir.path().join("repo-away");
    std::fs::rename(&repo, &away).unwrap();
    let (code, out, err) = fleet.cutover(&["deploy", "--version", "release"]).await;
    let (plan_code, _, plan_err) = fleet.cutover(&["plan", "--version", "release"]).await;
    std::fs::rename(&away, &repo).unwrap();
    assert_eq!(plan_code, 0, "{plan_err}");
    assert!(plan_err.contains("could not ask"), "{plan_err}");
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(
        err.contains("must know whether release is a branch"),
        "{err}"
    );
    fleet.assert_on(&hosts, "v1").await;
}

/// A moved tag names other code under a version the hosts already staged: the deploy stops
/// before any traffic change, naming both commits and what to do, instead of reusing the old
/// build on some hosts and shipping the new one to others (a mixed fleet under one name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_tag_is_refused_instead_of_mixing_two_builds() {
    let fleet = SshFleet::start(Opts::default()).await;
    let repo = fleet.dir.path().join("repo");
    let hosts = ["web1", "web2", "web3", "web4"];
    fleet.deploy("v1", 0).await;
    fleet.deploy("v2", 0).await;
    // web4 no longer holds v1: the refusal must come before the new build reaches it (review
    // finding: it was uploaded there in parallel with the others' check, leaving web4 with
    // the other code under the same name).
    let web4_v1 = fleet.root("web4").join("releases/v1");
    std::fs::remove_dir_all(&web4_v1).unwrap();
    git(&repo, &["tag", "-f", "v1", "v2"]);
    let (out, err) = fleet.deploy("v1", 1).await;
    assert!(err.contains("(a moved tag)"), "{out}\n{err}");
    assert!(err.contains("tag it anew"), "{err}");
    assert!(
        !web4_v1.exists(),
        "the moved tag's build reached web4:\n{err}"
    );
    fleet.assert_on(&hosts, "v2").await;
    // A release named by its full commit id cannot move: deployed again while the git
    // server is down, the builds on the hosts are used without asking it.
    let sha = rev_parse(&repo, "broken~1^{commit}");
    fleet.deploy(&sha, 0).await;
    fleet.deploy("v2", 0).await;
    let away = fleet.dir.path().join("repo-away");
    std::fs::rename(&repo, &away).unwrap();
    let (code, out, err) = fleet.cutover(&["deploy", "--version", &sha]).await;
    std::fs::rename(&away, &repo).unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    fleet.assert_on(&hosts, &sha).await;
}

/// A version that names nothing in the repository is refused before anything is recorded
/// (it used to be recorded as a deployment halted on every host), and `rollback --to` a branch
/// never deployed resolves it to its commit as a deploy does, instead of staging the moving
/// name (which a later rollback to it found "already there", with the old code).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_refs_are_refused_and_a_rollback_to_a_branch_ships_its_commit() {
    let fleet = SshFleet::start(Opts::default()).await;
    let repo = fleet.dir.path().join("repo");
    let sha = |rev: &str| rev_parse(&repo, rev);
    let hosts = ["web1", "web2", "web3", "web4"];
    fleet.deploy("v1", 0).await;
    let (code, out, err) = fleet.cutover(&["deploy", "--version", "nosuchref"]).await;
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(
        err.contains("has no tag or branch named nosuchref"),
        "{err}"
    );
    // `plan` says so too, and fails, so a pipeline that plans first stops there.
    let (code, out, err) = fleet.cutover(&["plan", "--version", "nosuchref"]).await;
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(err.contains("a deploy now would be refused"), "{err}");
    // A moving ref is refused as itself, not as a repository that did not answer.
    let (code, out, err) = fleet.cutover(&["deploy", "--version", "HEAD"]).await;
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(
        err.contains("HEAD is not a fixed git ref") && !err.contains("answers"),
        "{err}"
    );
    let (_, history, _) = fleet.cutover(&["history", "--json"]).await;
    assert!(
        !history.contains("nosuchref"),
        "nothing recorded: {history}"
    );

    fleet.deploy("v2", 0).await;
    git(&repo, &["branch", "stable", "v1"]);
    let (code, out, err) = fleet.cutover(&["rollback", "--to", "stable"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let v1 = sha("v1^{commit}");
    fleet.assert_on(&hosts, &v1).await;
    fleet.deploy("v2", 0).await;
    git(&repo, &["branch", "-f", "stable", "v2"]);
    let (code, out, err) = fleet.cutover(&["rollback", "--to", "stable"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    fleet.assert_on(&hosts, &sha("v2^{commit}")).await;
}

/// Needs the deployer to call `hooks::run(HookPoint::AfterStage, ..)` once per deploy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_migration_hook_runs_exactly_once_per_deploy() {
    let mut fleet = SshFleet::start(Opts::default()).await;
    let log = fleet.dir.path().join("migrations.log");
    fleet.write_config(&Opts {
        extra: format!(
            "[[hooks]]\nat = \"after_stage\"\nrun_once = true\ncommand = \"test -f BUILD_INFO && echo \\\"$CUTOVER_HOST $CUTOVER_VERSION $CUTOVER_PREVIOUS_VERSION\\\" >> {}\"\n",
            log.display()
        ),
        ..Opts::default()
    });
    fleet.deploy("v1", 0).await;
    fleet.deploy("v2", 0).await;
    let lines = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        lines, "web1 v1 \nweb1 v2 v1\n",
        "once per deploy, on the first host, in the release dir"
    );
}

/// Needs the deployer to call `hooks::run(HookPoint::BeforeDeploy, ..)` before staging and to
/// stop when it fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_before_deploy_hook_leaves_every_host_untouched() {
    let mut fleet = SshFleet::start(Opts::default()).await;
    fleet.deploy("v1", 0).await;
    let before = fleet.backends().await;
    let undone = fleet.dir.path().join("on_rollback.log");
    fleet.write_config(&Opts {
        extra: format!(
            "[[hooks]]\nat = \"before_deploy\"\nwhere = \"host\"\ncommand = \"echo 'database is locked' >&2; exit 3\"\n\n\
             [[hooks]]\nat = \"on_rollback\"\nwhere = \"local\"\ncommand = \"echo $CUTOVER_HOST >> {}\"\n",
            undone.display()
        ),
        ..Opts::default()
    });
    let (code, out, err) = fleet.cutover(&["deploy", "--version", "v2"]).await;
    let all = format!("{out}\n{err}");
    assert_ne!(code, 0, "{all}");
    assert!(all.contains("halted"), "{all}");
    assert!(
        !undone.exists(),
        "on_rollback ran though nothing moved: {all}"
    );
    assert!(all.contains("hook before_deploy"), "{all}");
    assert!(all.contains("exit code 3"), "{all}");
    assert!(all.contains("database is locked"), "{all}");
    assert_eq!(fleet.builds(), ["v1"], "nothing was built: {all}");
    let after = fleet.backends().await;
    assert_eq!(before.len(), after.len());
    fleet
        .assert_on(&["web1", "web2", "web3", "web4"], "v1")
        .await;
    for h in &fleet.hosts {
        assert!(
            !fleet.root(h).join("releases/v2").exists(),
            "{h}: nothing staged"
        );
    }
}

// ---- Ansible inventories -------------------------------------------------------------------

const INI: &str = "\
# the shop's servers
lb1 ansible_host=127.0.0.40

[web]
web1 ansible_host=127.0.0.21 ansible_port=2201
web2 ansible_host=127.0.0.22 cutover_root=/srv/other

[api]
api[01:02] ansible_host=127.0.0.30

[app:children]
web
api

[app:vars]
ansible_user=deploy
ansible_port=2222

[api:vars]
ansible_user=api
";

#[test]
fn ini_inventory_gives_groups_children_and_host_vars() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("hosts.ini");
    std::fs::write(&p, INI).unwrap();
    let app = cutover::inventory::load(&p, Some("app")).unwrap();
    let got: Vec<_> = app
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                h.address.to_string(),
                h.port,
                h.user.clone(),
                h.root.display().to_string(),
            )
        })
        .collect();
    let s = |x: &str| Some(x.to_string());
    assert_eq!(
        got,
        vec![
            (
                "web1".into(),
                "127.0.0.21".into(),
                Some(2201),
                s("deploy"),
                "".into()
            ),
            (
                "web2".into(),
                "127.0.0.22".into(),
                Some(2222),
                s("deploy"),
                "/srv/other".into()
            ),
            (
                "api01".into(),
                "127.0.0.30".into(),
                Some(2222),
                s("api"),
                "".into()
            ),
            (
                "api02".into(),
                "127.0.0.30".into(),
                Some(2222),
                s("api"),
                "".into()
            ),
        ]
    );
    let web = cutover::inventory::load(&p, Some("web")).unwrap();
    assert_eq!(web.len(), 2);
    let all = cutover::inventory::load(&p, None).unwrap();
    assert_eq!(all.len(), 5);
    assert_eq!(all[0].name.as_str(), "lb1");
    assert_eq!(all[0].port, None);
    let e = cutover::inventory::load(&p, Some("db"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no group \"db\"") && e.contains("web"), "{e}");
}

const YAML: &str = "\
all:
  vars:
    ansible_user: deploy
    ntp_servers: [ntp1, ntp2]
    app_env: { DEBUG: \"1\" }
    proxy_url:
  hosts:
    lb1:
      ansible_host: 127.0.0.40
  children:
    app:
      vars:
        ansible_port: 2222
      children:
        web:
          hosts:
            web1:
              ansible_host: 127.0.0.21
              ansible_port: 2201
            web2:
              ansible_host: 127.0.0.22
              cutover_root: /srv/other
        api:
          vars:
            ansible_user: api
          hosts:
            api[01:02]:
              ansible_host: 127.0.0.30
";

#[test]
fn yaml_inventory_gives_groups_children_and_host_vars() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("hosts.yml");
    std::fs::write(&p, YAML).unwrap();
    let app = cutover::inventory::load(&p, Some("app")).unwrap();
    let got: Vec<_> = app
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                h.address.to_string(),
                h.port,
                h.user.clone(),
            )
        })
        .collect();
    let s = |x: &str| Some(x.to_string());
    assert_eq!(
        got,
        vec![
            ("web1".into(), "127.0.0.21".into(), Some(2201), s("deploy")),
            ("web2".into(), "127.0.0.22".into(), Some(2222), s("deploy")),
            ("api01".into(), "127.0.0.30".into(), Some(2222), s("api")),
            ("api02".into(), "127.0.0.30".into(), Some(2222), s("api")),
        ]
    );
    assert_eq!(app[1].root, PathBuf::from("/srv/other"));
    assert_eq!(cutover::inventory::load(&p, None).unwrap().len(), 5);
    // `localhost` resolves through the system resolver.
    std::fs::write(
        &p,
        "all:\n  hosts:\n    web1:\n      ansible_host: localhost\n",
    )
    .unwrap();
    let h = cutover::inventory::load(&p, None).unwrap();
    assert!(h[0].address.is_loopback(), "{:?}", h[0].address);
}

#[test]
fn malformed_inventory_lines_are_reported_with_their_line_number() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("hosts");
    for (text, line, what) in [
        (
            "[web]\nweb1\n\n[web:vars]\nansible_user deploy\n",
            5,
            "key=value",
        ),
        ("[web]\nweb1\n[web:kids]\n", 3, "unknown section kind"),
        ("[web\nweb1\n", 1, "closing ']'"),
        ("[web]\nweb1 ansible_port\n", 2, "key=value"),
        ("[web]\nweb1;touch /tmp/pwned\n", 2, "not a valid name"),
        (
            "[web]\nweb1 ansible_host=no-such-host.invalid\n",
            2,
            "does not resolve",
        ),
    ] {
        std::fs::write(&p, text).unwrap();
        let e = format!("{:#}", cutover::inventory::load(&p, None).unwrap_err());
        assert!(
            e.contains(&format!("{}:{line}:", p.display())) && e.contains(what),
            "{text:?} -> {e}"
        );
    }
    // YAML syntax errors carry the parser's line.
    let y = d.path().join("hosts.yml");
    std::fs::write(&y, "all:\n  hosts:\n    web1:\n   bad: [\n").unwrap();
    let e = format!("{:#}", cutover::inventory::load(&y, None).unwrap_err());
    assert!(e.contains("hosts.yml") && e.contains("line"), "{e}");
}

#[test]
fn config_reads_an_inventory_group_as_its_hosts() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("hosts.ini"), INI).unwrap();
    let text = "transport = \"ssh\"\ninventory = \"hosts.ini\"\nhosts_group = \"web\"\nroot = \"/srv/shop\"\n\
        [app]\nname = \"shop\"\nstart = \"./run.sh\"\n[release]\ngit = \"file:///repo\"\n\
        [balancer]\nlisten = \"127.0.0.1:8080\"\nadmin = \"127.0.0.1:8081\"\ntoken = \"0123456789abcdef\"\n";
    let p = d.path().join("cutover.toml");
    std::fs::write(&p, text).unwrap();
    let c = cutover::config::Config::load(&p).unwrap();
    let names: Vec<_> = c.hosts.iter().map(|h| h.name.to_string()).collect();
    assert_eq!(names, ["web1", "web2"]);
    assert_eq!(c.hosts[0].root, PathBuf::from("/srv/shop"));
    assert_eq!(c.hosts[1].root, PathBuf::from("/srv/other"));

    // Over SSH a root is a path on the host: one this machine would have to complete
    // (relative, or `~` with the local home) is refused, from an inventory too.
    std::fs::write(
        d.path().join("hosts.ini"),
        INI.replace("cutover_root=/srv/other", "cutover_root=srv/other"),
    )
    .unwrap();
    let e = cutover::config::Config::load(&p).unwrap_err().to_string();
    assert!(e.contains("web2") && e.contains("not absolute"), "{e}");
    // On the local transport it is a directory here, relative to the inventory.
    std::fs::write(
        &p,
        text.replace("transport = \"ssh\"", "transport = \"local\""),
    )
    .unwrap();
    let c = cutover::config::Config::load(&p).unwrap();
    assert_eq!(c.hosts[1].root, d.path().join("srv/other"));
}

/// Sessions are normally opened on the master's control socket; the `ssh` process path they
/// fall back to (and that `CUTOVER_SSH_NO_MUX` forces) must deploy just as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_through_ssh_processes_deploy_as_well() {
    let fleet = SshFleet::start(Opts::default()).await;
    let no_mux = [(cutover::transport::ssh::NO_MUX_ENV, "1")];
    for version in ["v1", "v2"] {
        let (code, out, err) = fleet
            .cutover_with(&["deploy", "--version", version], &no_mux)
            .await;
        assert_eq!(code, 0, "deploy {version}\n{out}\n{err}");
        fleet
            .assert_on(&["web1", "web2", "web3", "web4"], version)
            .await;
    }
    assert_eq!(fleet.logins(), 4, "the masters still carry every session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_persist_zero_closes_the_masters_when_the_command_ends() {
    let _own = PRIVATE_CONTROL.lock().await;
    let fleet = SshFleet::start(Opts {
        extra_top: "ssh_persist = \"0s\"\n".into(),
        ..Opts::default()
    })
    .await;
    fleet.deploy("v1", 0).await;
    assert_eq!(fleet.logins(), 4, "one login per host during the deploy");
    let (code, out, err) = fleet.cutover(&["status"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        fleet.logins(),
        8,
        "the deploy's masters were closed, so status logged in again"
    );
}

/// Held by tests that run with private control directories, so each can tell its own.
static PRIVATE_CONTROL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Private control directories (`ssh_persist = "0s"`) under the temp dir.
fn private_control_dirs() -> Vec<std::path::PathBuf> {
    let uid_dir = format!("cutover-ssh-{}", unsafe { libc::getuid() });
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("cutover-ssh-") && n != uid_dir)
        })
        .collect()
}

/// Processes whose command line names a path under `dir` (an ssh master shows its socket).
fn processes_using(dir: &Path) -> Vec<i32> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).contains(&needle)
        })
        .collect()
}

/// Ctrl-C ends a deploy without its destructors: with ssh_persist = "0s" its masters must be
/// closed and its private socket directory removed all the same, not left for minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_closes_the_masters_of_a_deploy_that_does_not_persist_them() {
    let _own = PRIVATE_CONTROL.lock().await;
    let mut fleet = SshFleet::start(Opts::default()).await;
    let marker = fleet.dir.path().join("hook-started");
    fleet.write_config(&Opts {
        extra_top: "ssh_persist = \"0s\"\n".into(),
        extra: format!(
            "[[hooks]]\nat = \"after_stage\"\nwhere = \"host\"\nrun_once = true\ncommand = \"touch {}; sleep 20\"\n",
            marker.display()
        ),
        ..Opts::default()
    });
    let before = private_control_dirs();
    let child = Command::new(common::exe())
        .arg("-c")
        .arg(&fleet.config)
        .args(["deploy", "--version", "v1"])
        .env(cutover::transport::ssh::CONFIG_ENV, &fleet.sshd.ssh_config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !marker.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the hook never ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mine: Vec<_> = private_control_dirs()
        .into_iter()
        .filter(|d| !before.contains(d))
        .collect();
    assert_eq!(mine.len(), 1, "one private control directory: {mine:?}");
    let dir = &mine[0];
    assert!(
        !processes_using(dir).is_empty(),
        "masters are up during the deploy"
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGINT) };
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("the deploy ends on Ctrl-C")
        .unwrap();
    assert_eq!(out.status.code(), Some(130));
    let ended = Instant::now();
    while !processes_using(dir).is_empty() && ended.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        processes_using(dir),
        Vec::<i32>::new(),
        "ssh masters left running"
    );
    assert!(
        !dir.exists(),
        "the private control directory is left behind"
    );
}

/// Regression: with a user whose shell is `nologin`, the error showed only sshd's "Could not
/// chdir to home directory"; the reason, "This account is currently not available.", went to
/// stdout, which was not shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_refused_by_the_users_shell_shows_what_the_shell_said() {
    use std::os::unix::fs::PermissionsExt;
    let shell = std::fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("nobody:")
                .map(|r| r.rsplit(':').next().unwrap_or("").to_string())
        })
        .unwrap_or_default();
    if !shell.ends_with("nologin") {
        eprintln!("skipped: this machine's `nobody` has the shell {shell:?}, not nologin");
        return;
    }
    let sshd = Sshd::start(&ADDRESSES[..1]);
    // sshd reads authorized_keys as the user logging in: let `nobody` read it.
    std::fs::set_permissions(sshd.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cutover.toml");
    std::fs::write(
        &config,
        format!(
            "transport = \"ssh\"\nhost_key_checking = \"strict\"\nconnect_timeout = \"5s\"\n\
             [app]\nname = \"shop\"\nstart = \"exec ./server\"\n\
             [release]\npath = \"builds/{{version}}\"\n\
             [balancer]\nlisten = \"127.0.0.1:1\"\nadmin = \"127.0.0.1:2\"\ntoken = \"{token}\"\n\
             [[hosts]]\nname = \"web1\"\naddress = \"{addr}\"\nport = {port}\nuser = \"nobody\"\n\
             identity = \"{key}\"\nroot = \"{root}\"\n",
            token = common::TOKEN,
            addr = ADDRESSES[0],
            port = sshd.port,
            key = sshd.client_key.display(),
            root = dir.path().join("web1").display(),
        ),
    )
    .unwrap();
    let out = Command::new(common::exe())
        .arg("-c")
        .arg(&config)
        .args(["logs", "web1"])
        .env(cutover::transport::ssh::CONFIG_ENV, &sshd.ssh_config)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("cannot connect over SSH"),
        "{err}\nsshd:\n{}",
        sshd.log()
    );
    assert!(
        err.contains("This account is currently not available"),
        "{err}\nsshd:\n{}",
        sshd.log()
    );
}
