//! The JSON API of `cutover serve` (issue 7): every endpoint answers with the token and refuses
//! without it; errors are JSON with a message.

mod common;
mod serve_support;

use std::time::Duration;

use common::FleetSpec;
use cutover::balancer::Balancer;
use serde_json::{Value, json};
use serve_support::{Gate, SERVE_TOKEN, Served, request, write_release};

/// Every API endpoint, as (method, path, body).
fn endpoints() -> Vec<(&'static str, &'static str, Option<Value>)> {
    vec![
        ("GET", "/api/fleet", None),
        ("GET", "/api/status", None),
        ("GET", "/api/deployments", None),
        ("POST", "/api/deployments", Some(json!({"version": "v1"}))),
        ("GET", "/api/deployments/current", None),
        ("GET", "/api/deployments/current/report", None),
        ("POST", "/api/deployments/current/promote", None),
        ("POST", "/api/deployments/current/abort", None),
        ("POST", "/api/deployments/current/rollback", None),
        ("POST", "/api/rollback", Some(json!({}))),
        ("POST", "/api/readmit", None),
        ("GET", "/api/queue", None),
        ("GET", "/api/queue/1", None),
        ("DELETE", "/api/queue/1", None),
        ("GET", "/api/metrics", None),
        ("GET", "/api/no-such-endpoint", None),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_without_the_token_is_401_and_does_nothing() {
    let served = Served::start(FleetSpec::new(1, 33)).await;
    for (method, path, body) in endpoints() {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        for auth in [
            None,
            Some("Bearer wrong-token-0123456789"),
            Some(SERVE_TOKEN),
        ] {
            // The last one is the token without "Bearer ".
            let headers: Vec<(&str, String)> = auth
                .map(|a| vec![("authorization", a.to_string())])
                .unwrap_or_default();
            let (status, headers, text) =
                request(served.addr, method, path, &headers, body.clone()).await;
            assert_eq!(status, 401, "{method} {path} with {auth:?}: {text}");
            let v: Value = serde_json::from_str(&text).expect("a JSON error");
            assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{text}");
            assert!(
                headers
                    .iter()
                    .any(|(k, v)| k == "www-authenticate" && v.starts_with("Bearer")),
                "{headers:?}"
            );
        }
    }
    let (_, q) = served.api("GET", "/api/queue", None).await;
    assert!(
        q["finished"].as_array().unwrap().is_empty() && q["queued"].as_array().unwrap().is_empty(),
        "nothing queued: {q}"
    );
    // The page and its assets need no token (they hold no data); health neither.
    for path in [
        "/",
        "/assets/dashboard.js",
        "/assets/dashboard.css",
        "/healthz",
    ] {
        let (status, _, text) = request(served.addr, "GET", path, &[], String::new()).await;
        assert_eq!(status, 200, "{path}: {text}");
    }
    // Review finding 7: the scheme is case-insensitive; a bad query string is a JSON 400.
    let lower = [("authorization", format!("bearer {SERVE_TOKEN}"))];
    let (status, _, text) = request(served.addr, "GET", "/api/queue", &lower, String::new()).await;
    assert_eq!(status, 200, "{text}");
    for path in [
        "/api/deployments?limit=many",
        "/api/metrics?since=yesterday",
    ] {
        let (status, _, text) = request(served.addr, "GET", path, &lower, String::new()).await;
        assert_eq!(status, 400, "{path}: {text}");
        let v: Value = serde_json::from_str(&text).expect("a JSON error");
        assert!(v["error"].as_str().unwrap().contains("query"), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_answers_with_the_token() {
    let served = Served::start(FleetSpec::new(2, 34)).await;

    // Nothing deployed yet.
    let (status, v) = served.api("GET", "/api/deployments/current", None).await;
    assert_eq!(status, 404, "{v}");
    let (status, v) = served
        .api("POST", "/api/deployments/current/abort", None)
        .await;
    assert_eq!(status, 404, "{v}");
    let (status, v) = served.api("POST", "/api/rollback", Some(json!({}))).await;
    assert_eq!(status, 409, "no earlier release: {v}");
    assert!(
        v["error"].as_str().unwrap().contains("earlier release"),
        "{v}"
    );

    // The router's own answers are JSON errors too (review finding: 405, 404 and 413 came
    // with an empty or plain-text body).
    let auth = vec![("authorization", format!("Bearer {SERVE_TOKEN}"))];
    for (method, path, body, status, why) in [
        (
            "PUT",
            "/api/deployments",
            String::new(),
            405,
            "GET,HEAD,POST",
        ),
        ("DELETE", "/api/status", String::new(), 405, "GET,HEAD"),
        ("GET", "/hooks/github", String::new(), 405, "POST"),
        (
            "GET",
            "/nope",
            String::new(),
            404,
            "no page or endpoint GET /nope",
        ),
        (
            "POST",
            "/api/deployments",
            format!("{{\"version\": \"{}\"}}", "v".repeat(3 << 20)),
            413,
            "over the 2 MB limit",
        ),
    ] {
        let (got, headers, text) = request(served.addr, method, path, &auth, body).await;
        assert_eq!(got, status, "{method} {path}: {text} {headers:?}");
        assert!(
            headers
                .iter()
                .any(|(k, v)| k == "content-type" && v == "application/json"),
            "{method} {path}: {headers:?}"
        );
        let v: Value = serde_json::from_str(&text).expect("a JSON error");
        let said = v["error"].as_str().unwrap();
        let allow = headers.iter().find(|(k, _)| k == "allow").map(|(_, v)| v);
        assert!(
            said.contains(why) || (status == 405 && allow.is_some_and(|a| a == why)),
            "{method} {path}: {v} {headers:?}"
        );
    }
    // HTTP/1 only: an HTTP/2 preface is not served (review finding: such connections escaped
    // the header timeout and stayed open for good).
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = tokio::net::TcpStream::connect(served.addr).await.unwrap();
        c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "the connection stayed open");
        assert!(
            !answer.starts_with(b"\0"),
            "an HTTP/2 frame came back: {answer:?}"
        );
    }

    // Bad requests are JSON errors.
    for (body, why) in [
        (json!({}), "missing"),
        (json!({"version": "../etc"}), "valid name"),
        (json!({"version": "v9"}), "no release v9"),
        (json!({"version": "v1", "extra": 1}), "unknown field"),
    ] {
        let (status, v) = served
            .api("POST", "/api/deployments", Some(body.clone()))
            .await;
        assert_eq!(status, 400, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains(why), "{body}: {v}");
    }
    let (status, v) = served.api("GET", "/api/no-such-endpoint", None).await;
    assert_eq!(status, 404, "{v}");
    assert!(v["error"].is_string());

    // POST /api/deployments → a job; GET /api/queue/{id} follows it.
    let job = served.deploy("v1", "succeeded").await;
    let first = job["deployment"].as_str().unwrap().to_string();
    served.fleet.assert_on("v1").await;

    // GET /api/fleet: a row per instance with release, health and counters.
    let (status, f) = served.api("GET", "/api/fleet", None).await;
    assert_eq!(status, 200, "{f}");
    let rows = f["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{f}");
    for r in rows {
        assert_eq!(r["release"], "v1");
        assert_eq!(r["state"], "active");
        assert_eq!(r["health"], "healthy");
        assert!(r["requests"].is_u64() && r["weight"].is_u64(), "{r}");
    }

    // GET /api/deployments and /api/deployments/{id} and its report.
    let list = served.deployments().await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], first.as_str());
    let (status, d) = served
        .api("GET", &format!("/api/deployments/{first}"), None)
        .await;
    assert_eq!(status, 200, "{d}");
    assert!(!d["steps"].as_array().unwrap().is_empty(), "{d}");
    assert!(
        d["report_file"]
            .as_str()
            .unwrap()
            .ends_with(&format!("reports/{first}.html")),
        "{d}"
    );
    let (status, html) = served
        .api("GET", &format!("/api/deployments/{first}/report"), None)
        .await;
    assert_eq!(status, 200);
    assert!(html.as_str().unwrap().contains("<svg id=\"timeline\""));
    let (status, v) = served.api("GET", "/api/deployments/nope", None).await;
    assert_eq!(status, 404, "{v}");

    // GET /api/metrics: rates over time.
    let (status, m) = served.api("GET", "/api/metrics?since=0", None).await;
    assert_eq!(status, 200, "{m}");
    assert!(m["rates"].is_array() && m["now_ms"].is_u64(), "{m}");

    // A deploy held mid-way: controls go to the running deployment through the journal.
    let mut gate = Gate::new(served.fleet.dir.path(), "v2");
    write_release(&served, "v2", Some(("web2", &gate)));
    let running_job = served.queue_deploy("v2").await;
    gate.wait_reached(Duration::from_secs(60)).await;
    let (status, s) = served.api("GET", "/api/status", None).await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(s["deployment"]["state"], "running", "{s}");
    assert_eq!(s["deployment"]["to"], "v2");
    let second = s["deployment"]["id"].as_str().unwrap().to_string();
    assert_eq!(s["queue"]["running"]["id"].as_u64(), Some(running_job));
    let (status, d) = served.api("GET", "/api/deployments/current", None).await;
    assert_eq!(
        (status, d["deployment"]["id"].as_str()),
        (200, Some(second.as_str()))
    );

    // promote (a no-op for a rolling deploy, but delivered), promote with full.
    let (status, v) = served
        .api("POST", "/api/deployments/current/promote", None)
        .await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["command"], "promote");
    let (status, v) = served
        .api(
            "POST",
            &format!("/api/deployments/{second}/promote"),
            Some(json!({"full": true})),
        )
        .await;
    assert_eq!(
        (status, v["command"].as_str()),
        (202, Some("promote-full")),
        "{v}"
    );
    let (status, v) = served
        .api("POST", "/api/deployments/current/explode", None)
        .await;
    assert_eq!(status, 404, "{v}");
    // A finished deployment takes no command.
    let (status, v) = served
        .api("POST", &format!("/api/deployments/{first}/abort"), None)
        .await;
    assert_eq!(status, 409, "{v}");

    // Queue a deploy behind the running one, look at it, cancel it; the running one cannot be.
    let queued = served.queue_deploy("v1").await;
    let (status, v) = served
        .api("GET", &format!("/api/queue/{queued}"), None)
        .await;
    assert_eq!(
        (status, v["job"]["state"].as_str()),
        (200, Some("queued")),
        "{v}"
    );
    let (status, v) = served
        .api("DELETE", &format!("/api/queue/{queued}"), None)
        .await;
    assert_eq!(
        (status, v["job"]["state"].as_str()),
        (200, Some("cancelled")),
        "{v}"
    );
    let (status, v) = served
        .api("DELETE", &format!("/api/queue/{running_job}"), None)
        .await;
    assert_eq!(status, 409, "{v}");
    let (status, v) = served.api("DELETE", "/api/queue/999", None).await;
    assert_eq!(status, 404, "{v}");
    let (status, v) = served.api("GET", "/api/queue/x", None).await;
    assert_eq!(status, 400, "{v}");

    // The commands reached the journal.
    let (_, d) = served
        .api("GET", &format!("/api/deployments/{second}"), None)
        .await;
    let events: Vec<&str> = d["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["message"].as_str())
        .collect();
    assert!(events.contains(&"command received: promote"), "{events:?}");
    assert!(
        events.contains(&"command received: promote-full"),
        "{events:?}"
    );

    gate.open();
    let job = served.wait_job(running_job).await;
    assert_eq!(job["state"], "done", "{job}\n{}", served.log());
    assert_eq!(job["outcome"], "succeeded", "{job}\n{}", served.log());

    // POST /api/rollback: back to the release before the live one.
    let (status, v) = served.api("POST", "/api/rollback", Some(json!({}))).await;
    assert_eq!(status, 202, "{v}");
    let job = served.wait_job(v["job"]["id"].as_u64().unwrap()).await;
    assert_eq!(job["outcome"], "succeeded", "{job}\n{}", served.log());
    served.fleet.assert_on("v1").await;
    let list = served.deployments().await;
    assert_eq!(list[0]["kind"], "rollback");
    assert_eq!(list[0]["to"], "v1");

    // POST /api/deployments/current/rollback with nothing running: 404.
    let (status, v) = served
        .api("POST", "/api/deployments/current/rollback", None)
        .await;
    assert_eq!(status, 404, "{v}");
}

/// Jobs still queued when `cutover serve` stops are not lost: they stay in the journal, are
/// said to stay, and run when serve starts again; `--drop-queued` drops them instead, each
/// printed with the command that runs it by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_jobs_outlive_a_restart_unless_dropped() {
    let mut served = Served::start(FleetSpec::new(2, 17)).await;
    let mut gate = Gate::new(served.fleet.dir.path(), "g2");
    write_release(&served, "g2", Some(("web2", &gate)));
    let running = served.queue_deploy("g2").await;
    gate.wait_reached(Duration::from_secs(60)).await;
    let waiting = served.queue_deploy("v1").await;
    let (_, q) = served.api("GET", "/api/queue", None).await;
    assert_eq!(q["running"]["id"], running, "{q}");
    assert_eq!(q["queued"][0]["id"], waiting, "{q}");

    assert_eq!(unsafe { libc::kill(served.pid() as i32, libc::SIGTERM) }, 0);
    // The running deployment is waited for; then serve exits without starting v1.
    gate.open();
    let status = served.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "{status:?}\n{}", served.log());
    let expected = format!(
        "job {waiting} (deploy v1 (api)) stays queued: it runs when cutover serve starts again"
    );
    assert!(
        served.log().contains(&expected),
        "{expected}\nnot in:\n{}",
        served.log()
    );
    served.fleet.assert_on("g2").await;

    // Started again, it runs the kept job under its id.
    served.start_again(&[]).await;
    let job = served.wait_job(waiting).await;
    assert_eq!(job["outcome"], "succeeded", "{job}\n{}", served.log());
    served.fleet.assert_on("v1").await;

    // With --drop-queued, a job kept from before is dropped and printed with its command.
    let mut gate = Gate::new(served.fleet.dir.path(), "g3");
    write_release(&served, "g3", Some(("web2", &gate)));
    let running = served.queue_deploy("g3").await;
    gate.wait_reached(Duration::from_secs(60)).await;
    let dropped = served.queue_deploy("g2").await;
    assert!(
        dropped > waiting,
        "job ids are not reused: {dropped} after {waiting}"
    );
    assert_eq!(unsafe { libc::kill(served.pid() as i32, libc::SIGTERM) }, 0);
    gate.open();
    assert!(served.wait_exit(Duration::from_secs(60)).await.success());
    served.start_again(&["--drop-queued"]).await;
    let (_, q) = served.api("GET", "/api/queue", None).await;
    assert!(q["queued"].as_array().unwrap().is_empty(), "{q}");
    assert!(q["running"].is_null(), "{q}");
    let expected = format!(
        "job {dropped} (deploy g2 (api)) was queued and is dropped (--drop-queued); to run it: cutover -c {} deploy --version g2",
        served.fleet.config.display()
    );
    assert!(
        served.log().contains(&expected),
        "{expected}\nnot in:\n{}",
        served.log()
    );
    assert!(running < dropped);
    served.fleet.assert_on("g3").await;
}

/// Review finding (double click): `POST /api/deployments` for a version that is the last
/// queued job answers with that job (200, `"queued": false`, saying so) instead of queuing it
/// again; the running deploy of the same version does not count, and each distinct request
/// after another job is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_deploy_posted_three_times_is_queued_once() {
    let served = Served::start(FleetSpec::new(2, 137)).await;
    let mut gate = Gate::new(served.fleet.dir.path(), "g");
    write_release(&served, "g", Some(("web2", &gate)));
    let running = served.queue_deploy("g").await;
    gate.wait_reached(Duration::from_secs(60)).await;

    let post = |version: &'static str| {
        let served = &served;
        async move {
            served
                .api(
                    "POST",
                    "/api/deployments",
                    Some(json!({ "version": version })),
                )
                .await
        }
    };
    // "g" runs: asking for it again queues it (it is not waiting).
    let (status, g) = post("g").await;
    assert_eq!(status, 202, "{g}");
    assert_ne!(g["job"]["id"].as_u64(), Some(running));
    let (status, first) = post("v1").await;
    assert_eq!(status, 202, "{first}");
    for _ in 0..2 {
        let (status, again) = post("v1").await;
        assert_eq!(
            again["job"]["id"], first["job"]["id"],
            "not queued again: {again}"
        );
        assert_eq!(status, 200, "{again}");
        assert_eq!(again["queued"], false, "{again}");
        let why = again["ignored"].as_str().unwrap();
        assert!(why.contains("queued already"), "{why}");
    }
    let (_, q) = served.api("GET", "/api/queue", None).await;
    let queued: Vec<_> = q["queued"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["version"].clone())
        .collect();
    assert_eq!(queued, vec![json!("g"), json!("v1")], "v1 once: {q}");

    gate.open();
    let job = served.wait_job(first["job"]["id"].as_u64().unwrap()).await;
    assert_eq!(job["outcome"], "succeeded", "{job}\n{}", served.log());
    served.fleet.assert_on("v1").await;
}

/// Waits until `/api/status` shows the unfinished deployment as interrupted; returns it.
async fn wait_interrupted(served: &Served) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, s) = served.api("GET", "/api/status", None).await;
        assert_eq!(status, 200, "{s}");
        if s["deployment"]["state"] == "interrupted" {
            return s["deployment"].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never interrupted: {s}\n{}",
            served.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Review finding (double rollback): with a deployment interrupted (serve killed mid-deploy),
/// `POST /api/rollback` was queued; the operator then ran `cutover rollback` in a terminal as
/// the log told them, and the queued job ran after it and rolled the fleet back a second time
/// (a1 -> v1). Now, while a deployment is interrupted, a rollback is refused with the commands
/// that resolve it.
/// - While one runs, a rollback without `to` is refused too (its target would depend on how
///   the running one ends, or is interrupted); otherwise its target is fixed when queued.
/// - A deploy is still queued while interrupted (it names its release), and says it waits.
/// - The history shows the deployment as running, then interrupted, then ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_rollback_is_refused_while_a_deployment_is_interrupted() {
    let mut served = Served::start(FleetSpec::new(2, 121)).await;
    served.deploy("v1", "succeeded").await;
    write_release(&served, "a1", None);
    served.deploy("a1", "succeeded").await;
    let mut gate = Gate::new(served.fleet.dir.path(), "g2");
    write_release(&served, "g2", Some(("web2", &gate)));
    served.queue_deploy("g2").await;
    gate.wait_reached(Duration::from_secs(60)).await;

    // Running: a rollback without `to` is not queued behind it.
    let (status, v) = served.api("POST", "/api/rollback", Some(json!({}))).await;
    assert_eq!(status, 409, "{v}");
    let why = v["error"].as_str().unwrap();
    assert!(
        why.contains("(a1 -> g2) is running")
            && why.contains("/rollback")
            && why.contains("\"to\""),
        "{why}"
    );

    // The history says which deployment runs, and which ended.
    let list = served.deployments().await;
    assert_eq!(
        (list[0]["to"].as_str(), list[0]["state"].as_str()),
        (Some("g2"), Some("running")),
        "{list:?}"
    );
    assert_eq!(list[1]["state"], "ended", "{list:?}");

    // kill -9 mid-deploy, start again: the deployment is interrupted.
    served.restart().await;
    let d = wait_interrupted(&served).await;
    let id = d["id"].as_str().unwrap().to_string();
    let resolve = d["resolve"].as_str().unwrap_or_default();
    assert!(
        resolve.contains("deploy --resume") && resolve.contains("rollback"),
        "{d}"
    );
    // The history shows it as interrupted, not running (review finding: it said "running"
    // for as long as nobody resolved it).
    let list = served.deployments().await;
    assert_eq!(
        (list[0]["id"].as_str(), list[0]["state"].as_str()),
        (Some(id.as_str()), Some("interrupted")),
        "{list:?}"
    );
    let (_, one) = served
        .api("GET", &format!("/api/deployments/{id}"), None)
        .await;
    assert_eq!(one["deployment"]["state"], "interrupted", "{one}");
    for body in [json!({}), json!({"to": "v1"})] {
        let (status, v) = served
            .api("POST", "/api/rollback", Some(body.clone()))
            .await;
        assert_eq!(status, 409, "{body}: {v}");
        let why = v["error"].as_str().unwrap();
        assert!(
            why.contains(&format!("deployment {id} (a1 -> g2) was interrupted"))
                && why.contains("deploy --resume")
                && why.contains("rollback` returns the hosts"),
            "{why}"
        );
    }
    // A deploy is queued (it waits), and says so.
    let (status, v) = served
        .api("POST", "/api/deployments", Some(json!({"version": "v2"})))
        .await;
    assert_eq!(status, 202, "{v}");
    let blocked = v["blocked"].as_str().unwrap_or_default();
    assert!(blocked.contains("was interrupted"), "{v}");
    let deploy = v["job"]["id"].as_u64().unwrap();
    let (status, v) = served
        .api("DELETE", &format!("/api/queue/{deploy}"), None)
        .await;
    assert_eq!(status, 200, "{v}");

    // The operator resolves it from a terminal: back on a1, and nothing else moves the fleet.
    let (code, out, err) = served.fleet.cutover(&["rollback"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    served.fleet.assert_on("a1").await;
    let (_, q) = served.api("GET", "/api/queue", None).await;
    assert!(
        q["running"].is_null() && q["queued"].as_array().unwrap().is_empty(),
        "nothing is queued to run after it: {q}"
    );
    let list = served.deployments().await;
    let resolved = list.iter().find(|d| d["id"] == id.as_str()).unwrap();
    assert_eq!(resolved["state"], "ended", "{resolved}");

    // Resolved and idle: a rollback is queued with its target fixed now.
    let (status, v) = served.api("POST", "/api/rollback", Some(json!({}))).await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["job"]["to"], "v1", "{v}");
    let job = served.wait_job(v["job"]["id"].as_u64().unwrap()).await;
    assert_eq!(job["outcome"], "succeeded", "{job}\n{}", served.log());
    served.fleet.assert_on("v1").await;
    gate.open();
}

/// Review finding: without the balancer, `GET /api/fleet` was a 502 and the dashboard kept the
/// rows it had, as if current. Like `cutover status`, it now reads the hosts all the same: what
/// runs where, with the balancer's side unknown and `balancer_error` saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_without_its_balancer_still_shows_the_hosts() {
    let mut served = Served::start(FleetSpec::new(2, 123)).await;
    served.deploy("v1", "succeeded").await;
    let (status, f) = served.api("GET", "/api/fleet", None).await;
    assert_eq!(status, 200, "{f}");
    assert!(f["balancer_error"].is_null(), "{f}");

    served.fleet.kill_proxy().await;
    let (status, f) = served.api("GET", "/api/fleet", None).await;
    assert_eq!(status, 200, "{f}");
    let why = f["balancer_error"].as_str().unwrap_or_default();
    assert!(why.contains("cannot reach the balancer"), "{f}");
    let hosts = f["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 2, "{f}");
    for h in hosts {
        assert_eq!(h["current"], "v1", "{h}");
        assert!(h["error"].is_null(), "{h}");
    }
    let rows = f["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "one instance per host: {f}");
    for r in rows {
        assert_eq!(r["release"], "v1", "{r}");
        assert!(r["pid"].is_u64() && r["alive"] == true, "{r}");
        assert_eq!(
            (r["state"].as_str(), r["health"].as_str()),
            (Some("unknown"), Some("unknown")),
            "{r}"
        );
        for unknown in ["backend", "weight", "in_flight", "requests", "errors"] {
            assert!(r[unknown].is_null(), "{unknown}: {r}");
        }
    }
}

/// `POST /api/readmit` queues what `cutover readmit` does: nothing when every live instance
/// has its backend, else each goes back without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readmit_through_the_api_puts_back_a_lost_backend() {
    let served = Served::start(FleetSpec::new(2, 134)).await;
    served.deploy("v1", "succeeded").await;
    let (status, v) = served.api("POST", "/api/readmit", None).await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["job"]["kind"], "readmit", "{v}");
    let job = served.wait_job(v["job"]["id"].as_u64().unwrap()).await;
    assert_eq!(
        job["outcome"],
        "nothing_to_readmit",
        "{job}\n{}",
        served.log()
    );

    // A backend gone from the balancer (as an HAProxy reload drops them) comes back.
    let client = served.fleet.client();
    let gone = client.backends().await.unwrap()[0].spec.id.clone();
    client.remove(&gone).await.unwrap();
    let (status, v) = served.api("POST", "/api/readmit", None).await;
    assert_eq!(status, 202, "{v}");
    let job = served.wait_job(v["job"]["id"].as_u64().unwrap()).await;
    assert_eq!(job["outcome"], "succeeded", "{job}\n{}", served.log());
    let ids: Vec<String> = client
        .backends()
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.spec.id)
        .collect();
    assert!(ids.contains(&gone), "{ids:?}");
    assert_eq!(served.deployments().await[0]["kind"], "readmit");
}

/// A deployment run from another machine is in no journal here: `/api/status` (and the
/// dashboard) say who holds the deploy lock on the fleet, read every few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_the_holder_of_the_fleet_lock() {
    let served = Served::start(FleetSpec::new(1, 139)).await;
    let lock = served.fleet.root("web1").join(".cutover-lock");
    std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
    let holder = json!({
        "user": "alice", "machine": "laptop", "pid": 4242,
        "started_ms": cutover::journal::now_ms(), "what": "deploy v9",
    });
    std::fs::write(
        &lock,
        format!(
            "cutover fleet lock 1\nholder {holder}\nlease_until_ms {}\n",
            cutover::journal::now_ms() + 600_000
        ),
    )
    .unwrap();
    let until = |want: fn(&Value) -> bool| {
        let served = &served;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let (status, s) = served.api("GET", "/api/status", None).await;
                assert_eq!(status, 200, "{s}");
                if want(&s["fleet_lock"]) {
                    return s;
                }
                assert!(std::time::Instant::now() < deadline, "{s}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let s = until(|l| l["holder"]["what"] == "deploy v9").await;
    assert_eq!(s["fleet_lock"]["host"], "web1", "{s}");
    assert!(s["fleet_lock_read_ms"].as_u64().is_some(), "{s}");

    // That deployment is in no journal here: a command to `current` goes to the lock's host,
    // addressed to its holder.
    let (status, r) = served
        .api("POST", "/api/deployments/current/abort", None)
        .await;
    assert_eq!(status, 202, "{r}");
    assert_eq!(r["sent_to"]["host"], "web1", "{r}");
    let control = served.fleet.root("web1").join(".cutover-control");
    let sent: Value = serde_json::from_str(
        std::fs::read_to_string(&control)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(sent["command"], "abort", "{sent}");
    assert_eq!(sent["to"], format!("holder {holder}"), "{sent}");
    // What cannot be sent there is refused, naming the holder.
    let (status, r) = served
        .api("POST", "/api/deployments/current/rollback", None)
        .await;
    assert_eq!(status, 409, "{r}");
    assert!(r.to_string().contains("deploy v9 by alice"), "{r}");
    std::fs::remove_file(&control).unwrap();
    std::fs::remove_file(&lock).unwrap();
    until(|l| l.is_null()).await;
}
