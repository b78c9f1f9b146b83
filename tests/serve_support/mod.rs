//! Harness of the `cutover serve` tests: a local fleet (tests/common) plus a real `cutover serve`
//! process on a port picked at run time, a tiny HTTP client, signed GitHub payloads, and a
//! *gate*: a release whose instance on one host waits on a named pipe before it starts, so a
//! test holds a deployment in the middle (one host moved, the other not) for as long as it
//! needs, and releases it with one write. No sleeps: opening the pipe for writing returns
//! exactly when the gated instance is waiting on it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::common::{Fleet, FleetSpec, exe};

pub const SERVE_TOKEN: &str = "serve-token-0123456789abcdef";
pub const SECRET: &str = "webhook-secret-0123456789";
pub const BRANCH: &str = "main";

/// A fleet with `cutover serve` running against it.
pub struct Served {
    pub fleet: Fleet,
    pub addr: SocketAddr,
    serve: Option<Child>,
}

impl Served {
    /// Starts the fleet, adds `[serve]` to its config, starts `cutover serve`.
    pub async fn start(spec: FleetSpec) -> Served {
        Served::start_with(spec, "").await
    }

    /// [`Served::start`] with `github_extra` lines added to `[serve.github]`.
    pub async fn start_with(spec: FleetSpec, github_extra: &str) -> Served {
        let fleet = Fleet::start(spec).await;
        // Generous deadlines: a gated host may wait while a test looks at the dashboard.
        let text = std::fs::read_to_string(&fleet.config).unwrap();
        let text = text.replace("deadline = \"10s\"", "deadline = \"60s\"");
        let text = format!(
            "{text}\n[serve]\nlisten = \"127.0.0.1:0\"\ntoken = \"{SERVE_TOKEN}\"\n\n[serve.github]\nsecret = \"{SECRET}\"\nbranch = \"{BRANCH}\"\n{github_extra}"
        );
        std::fs::write(&fleet.config, text).unwrap();
        let (child, addr) = spawn_serve(&fleet, &[]).await;
        Served {
            fleet,
            addr,
            serve: Some(child),
        }
    }

    /// Stops `cutover serve` (SIGKILL) and starts it again on the same config and journal.
    pub async fn restart(&mut self) {
        if let Some(mut c) = self.serve.take() {
            let _ = c.kill().await;
        }
        let (child, addr) = spawn_serve(&self.fleet, &[]).await;
        self.addr = addr;
        self.serve = Some(child);
    }

    /// Starts `cutover serve` again, with `args` after `serve`, once it has exited.
    pub async fn start_again(&mut self, args: &[&str]) {
        assert!(self.serve.is_none(), "cutover serve still runs");
        let (child, addr) = spawn_serve(&self.fleet, args).await;
        self.addr = addr;
        self.serve = Some(child);
    }

    /// The pid of `cutover serve`.
    pub fn pid(&self) -> u32 {
        self.serve
            .as_ref()
            .and_then(|c| c.id())
            .expect("serve runs")
    }

    /// Waits (at most `within`) for `cutover serve` to exit; returns its exit status.
    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let child = self.serve.as_mut().expect("serve runs");
        let status = tokio::time::timeout(within, child.wait())
            .await
            .expect("cutover serve exits in time")
            .unwrap();
        self.serve = None;
        status
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.fleet.dir.path().join("serve.log")).unwrap_or_default()
    }

    pub fn releases(&self) -> PathBuf {
        self.fleet.dir.path().join("releases")
    }

    /// An HTTP request with the serve token.
    pub async fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let (status, _, text) = request(
            self.addr,
            method,
            path,
            &[("authorization", format!("Bearer {SERVE_TOKEN}"))],
            body.map(|b| b.to_string()).unwrap_or_default(),
        )
        .await;
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v)
    }

    /// A GitHub delivery: `event` with `body`, signed with `secret` (None: no signature). Its
    /// `X-GitHub-Delivery` id comes from the body: the same body is the same delivery, as when
    /// GitHub redelivers one.
    pub async fn hook(&self, event: &str, body: &str, secret: Option<&str>) -> (u16, Value) {
        let digest = cutover::server::github::sign(b"delivery", body.as_bytes());
        let delivery = format!("test-{}", &digest["sha256=".len()..][..32]);
        self.hook_as(&delivery, event, body, secret).await
    }

    /// [`Served::hook`] with the `X-GitHub-Delivery` id `delivery`.
    pub async fn hook_as(
        &self,
        delivery: &str,
        event: &str,
        body: &str,
        secret: Option<&str>,
    ) -> (u16, Value) {
        let mut headers = vec![
            ("x-github-event", event.to_string()),
            ("x-github-delivery", delivery.to_string()),
            ("content-type", "application/json".to_string()),
            ("user-agent", "GitHub-Hookshot/test".to_string()),
        ];
        if let Some(s) = secret {
            headers.push((
                "x-hub-signature-256",
                cutover::server::github::sign(s.as_bytes(), body.as_bytes()),
            ));
        }
        let (status, _, text) = request(
            self.addr,
            "POST",
            "/hooks/github",
            &headers,
            body.to_string(),
        )
        .await;
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Waits until job `id` has ended; returns it.
    pub async fn wait_job(&self, id: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (status, v) = self.api("GET", &format!("/api/queue/{id}"), None).await;
            assert_eq!(status, 200, "{v}");
            let state = v["job"]["state"].as_str().unwrap_or("").to_string();
            if !matches!(state.as_str(), "queued" | "running") {
                return v["job"].clone();
            }
            assert!(
                Instant::now() < deadline,
                "job {id} did not end: {v}\nserve log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Queues a deploy through the API and returns the job id.
    pub async fn queue_deploy(&self, version: &str) -> u64 {
        let (status, v) = self
            .api(
                "POST",
                "/api/deployments",
                Some(json!({ "version": version })),
            )
            .await;
        assert_eq!(status, 202, "{v}");
        v["job"]["id"].as_u64().unwrap()
    }

    /// Deploys through the API and asserts the outcome.
    pub async fn deploy(&self, version: &str, outcome: &str) -> Value {
        let id = self.queue_deploy(version).await;
        let job = self.wait_job(id).await;
        assert_eq!(
            job["outcome"].as_str(),
            Some(outcome),
            "{job}\nserve log:\n{}",
            self.log()
        );
        job
    }

    /// Deployments recorded in the journal, newest first.
    pub async fn deployments(&self) -> Vec<Value> {
        let (status, v) = self.api("GET", "/api/deployments", None).await;
        assert_eq!(status, 200);
        v["deployments"].as_array().unwrap().clone()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.serve.take() {
            let _ = c.start_kill();
        }
    }
}

/// Starts `cutover serve` on the fleet's config (stderr appended to `serve.log`); returns it
/// and the address it printed.
async fn spawn_serve(fleet: &Fleet, args: &[&str]) -> (Child, SocketAddr) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(fleet.dir.path().join("serve.log"))
        .unwrap();
    let mut child = Command::new(exe())
        .arg("-c")
        .arg(&fleet.config)
        .arg("-v")
        .arg("serve")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("cutover serve starts");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("cutover serve prints its address in time")
        .unwrap()
        .unwrap_or_else(|| {
            panic!(
                "cutover serve exited: {}",
                std::fs::read_to_string(fleet.dir.path().join("serve.log")).unwrap_or_default()
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
    (child, addr)
}

/// One HTTP/1.1 request; returns status, headers, body text.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: String,
) -> (u16, Vec<(String, String)>, String) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, v.as_str());
    }
    if !body.is_empty() && !headers.iter().any(|(k, _)| *k == "content-type") {
        req = req.header("content-type", "application/json");
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(30),
        client.request(req.body(Full::new(Bytes::from(body))).unwrap()),
    )
    .await
    .expect("serve answers in time")
    .expect("serve answers");
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

/// A GitHub push payload of the real shape (trimmed of fields cutover does not read, but with
/// the ones GitHub always sends).
pub fn push_payload(git_ref: &str, after: &str) -> String {
    push_payload_from(
        git_ref,
        "1111111111111111111111111111111111111111",
        after,
        false,
    )
}

/// [`push_payload`] from `before`, `forced` or not.
pub fn push_payload_from(git_ref: &str, before: &str, after: &str, forced: bool) -> String {
    json!({
        "ref": git_ref,
        "before": before,
        "after": after,
        "created": false,
        "deleted": false,
        "forced": forced,
        "base_ref": null,
        "compare": format!("https://github.com/acme/web/compare/111111111111...{}", &after[..12]),
        "commits": [{
            "id": after, "tree_id": "2222222222222222222222222222222222222222", "distinct": true,
            "message": "Make the thing faster", "timestamp": "2026-11-22T10:00:00+01:00",
            "url": format!("https://github.com/acme/web/commit/{after}"),
            "author": {"name": "Alice", "email": "alice@example.com", "username": "alice"},
            "committer": {"name": "Alice", "email": "alice@example.com", "username": "alice"},
            "added": [], "removed": [], "modified": ["src/app.rs"]
        }],
        "head_commit": {
            "id": after, "tree_id": "2222222222222222222222222222222222222222", "distinct": true,
            "message": "Make the thing faster", "timestamp": "2026-11-22T10:00:00+01:00",
            "url": format!("https://github.com/acme/web/commit/{after}"),
            "author": {"name": "Alice", "email": "alice@example.com", "username": "alice"},
            "committer": {"name": "Alice", "email": "alice@example.com", "username": "alice"},
            "added": [], "removed": [], "modified": ["src/app.rs"]
        },
        "repository": {
            "id": 123456, "node_id": "R_kgDOTEST", "name": "web", "full_name": "acme/web",
            "private": true, "owner": {"name": "acme", "login": "acme", "id": 1},
            "html_url": "https://github.com/acme/web", "default_branch": "main",
            "master_branch": "main"
        },
        "pusher": {"name": "alice", "email": "alice@example.com"},
        "sender": {"login": "alice", "id": 2, "type": "User"}
    })
    .to_string()
}

/// A named pipe a gated release's instance waits on.
pub struct Gate {
    pub path: PathBuf,
    held: Option<std::fs::File>,
}

impl Gate {
    pub fn new(dir: &Path, name: &str) -> Gate {
        let path = dir.join(format!("{name}.gate"));
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        Gate { path, held: None }
    }

    /// Returns once the gated instance waits at the gate (it opened the pipe for reading).
    pub async fn wait_reached(&mut self, within: Duration) {
        let path = self.path.clone();
        let open =
            tokio::task::spawn_blocking(move || std::fs::OpenOptions::new().write(true).open(path));
        let file = tokio::time::timeout(within, open)
            .await
            .expect("the gated instance reaches the gate in time")
            .unwrap()
            .unwrap();
        self.held = Some(file);
    }

    /// Lets the gated instance start.
    pub fn open(&mut self) {
        use std::io::Write;
        if let Some(mut f) = self.held.take() {
            let _ = f.write_all(b"go\n");
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.open();
    }
}

/// Writes release `version` under `releases/`; its instance on `gated_host` waits at `gate`.
pub fn write_release(served: &Served, version: &str, gate: Option<(&str, &Gate)>) {
    let dir = served.releases().join(version);
    cutover::init::write_sample_release(&dir, &exe(), version, "").unwrap();
    if let Some((host, gate)) = gate {
        let run = dir.join("run.sh");
        let script = std::fs::read_to_string(&run).unwrap();
        let wait = format!(
            "if [ \"$CUTOVER_HOST\" = {host} ]; then read _ < '{}'; fi\n",
            gate.path.display()
        );
        let script = script.replacen("exec ", &format!("{wait}exec "), 1);
        std::fs::write(&run, script).unwrap();
    }
}
