//! The dashboard in a real browser (issue 7): headless Chromium (Debian's `chromium`) opens
//! `cutover serve`'s page while a deploy is held mid-way under traffic, the fleet table and the
//! chart show both releases, a real mouse click on Abort and on the confirmation posts the
//! command to the running deployment, and screenshots land in `target/test-artifacts/`.
//!
//! Chromium is driven through the DevTools protocol over its websocket (a tiny client below on
//! tokio-tungstenite): create a page, evaluate expressions that wait *in the page* for a
//! condition (so the test waits for what it can observe, never a fixed time), dispatch mouse
//! events at an element's centre, capture PNG screenshots.

mod common;
mod serve_support;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::FleetSpec;
use cutover::load::{self, LoadSpec};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use serve_support::{Gate, SERVE_TOKEN, Served, write_release};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Headless Chromium with a DevTools connection to one page.
struct Browser {
    /// Leader of its own process group, which its helpers (zygote, renderers, GPU) share.
    child: Child,
    /// Removed after `child`'s group is gone (field order; see `Drop`).
    _profile: tempfile::TempDir,
    ws: Ws,
    session: String,
    next_id: u64,
}

/// Ends chromium and its helpers and waits for them, so that they are not still writing to the
/// profile directory when it is removed (which left `cutover-chromium-*` directories behind).
impl Drop for Browser {
    fn drop(&mut self) {
        let Some(pid) = self.child.id() else {
            return;
        };
        // SAFETY: a signal to the process group this test created (its id is chromium's pid).
        unsafe {
            libc::kill(-(pid as i32), libc::SIGKILL);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                _ => break,
            }
        }
        // Helpers are not our children: give the group a moment to be gone.
        while std::time::Instant::now() < deadline
            // SAFETY: signal 0 only checks whether the group still has a member.
            && unsafe { libc::kill(-(pid as i32), 0) } == 0
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser"].iter().find_map(|name| {
        std::env::var_os("PATH")?
            .to_str()?
            .split(':')
            .map(|d| PathBuf::from(d).join(name))
            .find(|p| p.is_file())
    })
}

impl Browser {
    async fn launch() -> Browser {
        let exe = chromium().expect(
            "chromium is not installed: `apt-get install chromium` (.ci/run installs it in CI)",
        );
        let profile = tempfile::Builder::new()
            .prefix("cutover-chromium-")
            .tempdir()
            .unwrap();
        let mut child = Command::new(exe)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1280,1100",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            // Its shared memory files (`org.chromium.Chromium.*`, in TMPDIR with
            // --disable-dev-shm-usage) go with the profile.
            .env("TMPDIR", profile.path())
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0)
            .spawn()
            .expect("chromium starts");
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID" on stderr.
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = Vec::new();
        let url = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = line.split("DevTools listening on ").nth(1) {
                    return Some(url.trim().to_string());
                }
                seen.push(line);
            }
            None
        })
        .await
        .expect("chromium opens its DevTools port in time")
        .unwrap_or_else(|| panic!("chromium exited: {}", seen.join("\n")));
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("DevTools websocket");
        let mut b = Browser {
            child,
            _profile: profile,
            ws,
            session: String::new(),
            next_id: 0,
        };
        let target = b
            .call(None, "Target.createTarget", json!({ "url": "about:blank" }))
            .await;
        let target_id = target["targetId"].as_str().unwrap().to_string();
        let attached = b
            .call(
                None,
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
            )
            .await;
        b.session = attached["sessionId"].as_str().unwrap().to_string();
        b.page("Page.enable", json!({})).await;
        b.page(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1280, "height": 1100, "deviceScaleFactor": 1, "mobile": false }),
        )
        .await;
        b
    }

    /// One DevTools call; returns its result (panics on a protocol error).
    async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.ws
            .send(Message::text(msg.to_string()))
            .await
            .expect("DevTools send");
        let answer = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(m) = self.ws.next().await {
                let Ok(Message::Text(t)) = m else { continue };
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["id"].as_u64() == Some(id) {
                    return v;
                }
            }
            panic!("DevTools connection closed");
        })
        .await
        .unwrap_or_else(|_| panic!("DevTools {method} did not answer"));
        assert!(answer["error"].is_null(), "{method}: {answer}");
        answer["result"].clone()
    }

    async fn page(&mut self, method: &str, params: Value) -> Value {
        let s = self.session.clone();
        self.call(Some(&s), method, params).await
    }

    /// Evaluates `expr` in the page (awaiting a promise); returns its value.
    async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .page(
                "Runtime.evaluate",
                json!({ "expression": expr, "awaitPromise": true, "returnByValue": true }),
            )
            .await;
        assert!(
            r["exceptionDetails"].is_null(),
            "{expr}: {}",
            r["exceptionDetails"]
        );
        r["result"]["value"].clone()
    }

    /// Waits in the page until `cond` (a JS expression) is truthy; fails with `what` after 30 s.
    async fn wait_for(&mut self, cond: &str, what: &str) {
        let expr = format!(
            "new Promise((ok) => {{ const t0 = Date.now(); const check = () => {{ let v = false; try {{ v = !!({cond}); }} catch (e) {{}} if (v) ok(true); else if (Date.now() - t0 > 30000) ok(false); else requestAnimationFrame(check); }}; check(); }})"
        );
        let ok = self.eval(&expr).await;
        if ok != json!(true) {
            let body = self.eval("document.body.innerText").await;
            panic!(
                "the page did not show {what}:\n{}",
                body.as_str().unwrap_or("")
            );
        }
    }

    /// A real click: mouse pressed and released at the centre of the element.
    async fn click(&mut self, selector: &str) {
        let at = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({sel}); e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()",
                sel = json!(selector)
            ))
            .await;
        let (x, y) = (at[0].as_f64().unwrap(), at[1].as_f64().unwrap());
        for kind in ["mouseMoved", "mousePressed", "mouseReleased"] {
            self.page(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
            )
            .await;
        }
    }

    async fn screenshot(&mut self, name: &str) -> PathBuf {
        let r = self
            .page("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        let png = base64_decode(r["data"].as_str().unwrap());
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, png).unwrap();
        path
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = s
        .bytes()
        .filter(|c| *c != b'=' && !c.is_ascii_whitespace())
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= u32::from(val(*c)) << (18 - 6 * i);
        }
        out.push((n >> 16) as u8);
        if chunk.len() > 2 {
            out.push((n >> 8) as u8);
        }
        if chunk.len() > 3 {
            out.push(n as u8);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_both_releases_under_traffic_and_abort_reaches_the_deployment() {
    let served = Served::start(FleetSpec::new(2, 36)).await;
    served.deploy("v1", "succeeded").await;
    let mut gate = Gate::new(served.fleet.dir.path(), "v2");
    write_release(&served, "v2", Some(("web2", &gate)));
    let run = load::start(LoadSpec {
        target: served.fleet.listen,
        path: "/".into(),
        rate: 100,
        max_requests: 20_000,
        max_duration: Duration::from_secs(120),
        concurrency: 4,
        headers: Vec::new(),
    });
    let job = served.queue_deploy("v2").await;
    // Held mid-way: web1 on v2, web2 on v1, both serving.
    gate.wait_reached(Duration::from_secs(60)).await;
    let (_, s) = served.api("GET", "/api/status", None).await;
    let deployment = s["deployment"]["id"].as_str().unwrap().to_string();

    let mut browser = Browser::launch().await;
    browser
        .page(
            "Page.navigate",
            json!({ "url": format!("http://{}/?token={SERVE_TOKEN}", served.addr) }),
        )
        .await;
    browser
        .wait_for("document.readyState === 'complete'", "a loaded page")
        .await;
    // The token moved from the address bar into sessionStorage.
    assert_eq!(browser.eval("location.search").await, json!(""));
    assert_eq!(
        browser
            .eval("sessionStorage.getItem('cutover-token')")
            .await,
        json!(SERVE_TOKEN)
    );
    browser
        .wait_for(
            "document.querySelector('#fleet tbody tr[data-release=\"v1\"]') && document.querySelector('#fleet tbody tr[data-release=\"v2\"]')",
            "both releases in the fleet table",
        )
        .await;
    browser
        .wait_for(
            "document.querySelector('#chart path.area[data-release=\"v1\"]') && document.querySelector('#chart path.area[data-release=\"v2\"]') && document.querySelector('#legend [data-release=\"v2\"]')",
            "both releases in the chart",
        )
        .await;
    browser
        .wait_for(
            &format!("document.querySelector('#running').dataset.deployment === {} && !document.querySelector('#btn-abort').disabled", json!(deployment)),
            "the running deployment with an enabled Abort button",
        )
        .await;
    let fleet_text = browser
        .eval("document.querySelector('#fleet').innerText")
        .await;
    let fleet_text = fleet_text.as_str().unwrap();
    assert!(
        fleet_text.contains("web1") && fleet_text.contains("web2"),
        "{fleet_text}"
    );
    browser.screenshot("dashboard-during-deploy.png").await;

    // Abort, then confirm in the dialog: two real clicks.
    browser.click("#btn-abort").await;
    browser
        .wait_for(
            "document.querySelector('#confirm').open",
            "the confirmation",
        )
        .await;
    let question = browser
        .eval("document.querySelector('#confirm-text').textContent")
        .await;
    assert!(
        question.as_str().unwrap().contains("Abort deployment"),
        "{question}"
    );
    browser.screenshot("dashboard-confirm-abort.png").await;
    browser.click("#confirm-yes").await;
    browser
        .wait_for(
            "document.querySelector('#toast').textContent.includes('abort sent to deployment')",
            "the abort acknowledged",
        )
        .await;
    let shot = browser.screenshot("dashboard-abort-sent.png").await;
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "a real screenshot"
    );

    // The abort reached the running deployment through the journal.
    let (_, d) = served
        .api("GET", &format!("/api/deployments/{deployment}"), None)
        .await;
    let events: Vec<&str> = d["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["message"].as_str())
        .collect();
    assert!(events.contains(&"command received: abort"), "{events:?}");

    // Let the deploy go on; how it ends (aborted or completed) is the deployer's call for a
    // rolling deploy. It must end, and the fleet must serve without a failed request.
    gate.open();
    let job = served.wait_job(job).await;
    assert_eq!(job["state"], "done", "{job}\n{}", served.log());
    let traffic = run.stop().await;
    assert_eq!(traffic.failed, 0, "{traffic}: {:?}", traffic.failures);

    // The deployment's report, opened as the dashboard opens it (a `blob:` page that inherits
    // the dashboard's policy), keeps its own stylesheet: it used to show unstyled.
    browser
        .eval(&format!(
            "(async () => {{ const r = await fetch('/api/deployments/{deployment}/report', {{ headers: {{ Authorization: 'Bearer ' + sessionStorage.getItem('cutover-token') }} }}); const html = await r.text(); location = URL.createObjectURL(new Blob([html], {{ type: 'text/html' }})); return r.status; }})()"
        ))
        .await;
    browser
        .wait_for(
            "location.protocol === 'blob:' && document.readyState === 'complete' && document.querySelector('h1')",
            "the report",
        )
        .await;
    let width = browser
        .eval("getComputedStyle(document.body).maxWidth")
        .await;
    assert_eq!(width, json!("1000px"), "the report's stylesheet applies");
}

/// After a crash: `cutover serve` killed mid-deploy and started again, a deploy queued behind
/// the interrupted deployment. Review findings:
/// - the page's Roll back button queued a fleet rollback that later ran a second time, after
///   the operator's own `cutover rollback`: it is disabled and says the terminal resolves it;
/// - the history showed the interrupted deployment as "running";
/// - the queue did not say why its jobs wait (`blocked`, which /api/queue carries);
/// - when the balancer went down, the fleet rows stayed as they were, as if current: they show
///   what the hosts run with the balancer's side unknown (as `cutover status` does);
/// - when serve goes down too and nothing can be read, the rows kept are marked stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_an_interrupted_deployment_and_a_fleet_it_cannot_read() {
    let mut served = Served::start(FleetSpec::new(2, 122)).await;
    served.deploy("v1", "succeeded").await;
    write_release(&served, "a1", None);
    served.deploy("a1", "succeeded").await;
    let mut gate = Gate::new(served.fleet.dir.path(), "g2");
    write_release(&served, "g2", Some(("web2", &gate)));
    served.queue_deploy("g2").await;
    gate.wait_reached(Duration::from_secs(60)).await;
    served.queue_deploy("v2").await;
    let (_, s) = served.api("GET", "/api/status", None).await;
    let deployment = s["deployment"]["id"].as_str().unwrap().to_string();
    served.restart().await;

    let mut browser = open_dashboard(&served).await;
    let id = json!(deployment);
    browser
        .wait_for(
            &format!("document.querySelector('#running').dataset.deployment === {id} && document.querySelector('#running').innerText.includes('(interrupted)')"),
            "the interrupted deployment",
        )
        .await;
    browser
        .wait_for(
            "document.querySelector('#btn-rollback').disabled && document.querySelector('#btn-rollback').textContent.includes('terminal') && document.querySelector('#btn-rollback').title.includes('deploy --resume')",
            "a disabled Roll back button that says to use the terminal",
        )
        .await;
    browser
        .wait_for(
            &format!("[...document.querySelectorAll('#history tbody tr')].some((r) => r.cells[0].textContent === {id} && r.cells[5].textContent === 'interrupted')"),
            "the deployment as interrupted in the history",
        )
        .await;
    browser
        .wait_for(
            "document.querySelector('#queue').innerText.includes('deploy v2') && document.querySelector('#queue-blocked').textContent.includes('was interrupted') && document.querySelector('#queue-blocked').textContent.includes('deploy --resume')",
            "the queued deploy and why it waits",
        )
        .await;
    browser.screenshot("dashboard-interrupted.png").await;

    // The balancer goes down: the rows show what the hosts run, the balancer's side unknown.
    browser
        .wait_for(
            "document.querySelector('#fleet tbody tr') && !document.querySelector('#fleet tbody tr.unknown')",
            "the fleet with the balancer's side",
        )
        .await;
    served.fleet.kill_proxy().await;
    browser
        .wait_for(
            "(() => { const rows = [...document.querySelectorAll('#fleet tbody tr')]; return rows.length > 0 && rows.every((r) => r.classList.contains('unknown') && r.dataset.release); })() && document.querySelector('#fleet-error').textContent.includes('balancer unreachable') && !document.querySelector('#fleet').classList.contains('stale')",
            "the hosts' rows with the balancer unknown, and why",
        )
        .await;
    browser.screenshot("dashboard-no-balancer.png").await;

    // Serve goes down too: nothing can be read; the rows kept are marked stale.
    // SAFETY: kill(2) on the `cutover serve` this test started.
    assert_eq!(unsafe { libc::kill(served.pid() as i32, libc::SIGKILL) }, 0);
    served.wait_exit(Duration::from_secs(30)).await;
    browser
        .wait_for(
            "document.querySelector('#fleet').classList.contains('stale') && document.querySelector('#fleet tbody tr') && document.querySelector('#fleet-error').textContent.includes('not updated since')",
            "the fleet rows marked stale",
        )
        .await;
    browser.screenshot("dashboard-fleet-stale.png").await;
    gate.open();
}

/// Chromium on `served`'s dashboard, the token given in the address, the page loaded.
async fn open_dashboard(served: &Served) -> Browser {
    let mut browser = Browser::launch().await;
    browser
        .page(
            "Page.navigate",
            json!({ "url": format!("http://{}/?token={SERVE_TOKEN}", served.addr) }),
        )
        .await;
    browser
        .wait_for("document.readyState === 'complete'", "a loaded page")
        .await;
    browser
}
