//! The built-in balancer end to end: real sockets on 127.0.0.1 (port 0), backends as small
//! hyper servers inside the test, the proxy through `cutover::proxy::start` and the admin API
//! through `AdminClient`. Nothing sleeps to wait for an event it can observe: waits poll with a
//! short interval and a deadline, and every server is stopped at the end.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use cutover::balancer::Balancer;
use cutover::balancer::api::{BackendSpec, BackendState, Health};
use cutover::balancer::builtin::AdminClient;
use cutover::config::{Dur, HealthConfig, Threshold};
use cutover::proxy::{ProxyHandle, ProxySettings};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

const TOKEN: &str = "test-token-0123456789";
const DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Test backends

/// Counters a test backend keeps about what reached it (health checks excluded).
#[derive(Default)]
struct Hits {
    requests: AtomicU64,
    posts: AtomicU64,
    slow_started: AtomicU64,
    streams_started: AtomicU64,
}

/// A small HTTP/1.1 server: `/health` (200 or 503), `/slow` (answers once released), `/stream`
/// (one chunk, then never ends), `/reset` (closes the connection without answering), anything
/// else: 200 naming the backend.
struct TestBackend {
    name: &'static str,
    addr: SocketAddr,
    hits: Arc<Hits>,
    healthy: Arc<AtomicBool>,
    release_slow: watch::Sender<bool>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// A response body: all at once, or one chunk and then pending forever.
enum TestBody {
    Full(Option<Bytes>),
    Endless(bool),
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            TestBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            TestBody::Endless(sent) if !*sent => {
                *sent = true;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"first\n")))))
            }
            // Never ends; the connection closing drops it.
            TestBody::Endless(_) => Poll::Pending,
        }
    }
}

#[derive(Debug)]
struct Reset;
impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reset on purpose")
    }
}
impl std::error::Error for Reset {}

impl TestBackend {
    async fn start(name: &'static str) -> TestBackend {
        Self::start_on(name, "127.0.0.1:0".parse().unwrap()).await
    }

    async fn start_on(name: &'static str, addr: SocketAddr) -> TestBackend {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(Hits::default());
        let healthy = Arc::new(AtomicBool::new(true));
        let (release_slow, release_rx) = watch::channel(false);
        let (stop, mut stop_rx) = oneshot::channel();
        let (h, ok) = (hits.clone(), healthy.clone());
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    _ = &mut stop_rx => break,
                    Ok((stream, _)) = listener.accept() => {
                        let (h, ok, rel) = (h.clone(), ok.clone(), release_rx.clone());
                        let svc = hyper::service::service_fn(move |req| {
                            handle(name, req, h.clone(), ok.clone(), rel.clone())
                        });
                        conns.spawn(async move {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .with_upgrades()
                                .await;
                        });
                    }
                }
            }
            drop(listener);
            conns.shutdown().await;
        });
        TestBackend {
            name,
            addr,
            hits,
            healthy,
            release_slow,
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn spec(&self, release: &str) -> BackendSpec {
        BackendSpec {
            id: self.name.to_string(),
            address: self.addr,
            host: "localhost".into(),
            release: release.into(),
            weight: 100,
            health_path: "/health".into(),
            preview: false,
        }
    }

    fn requests(&self) -> u64 {
        self.hits.requests.load(Ordering::SeqCst)
    }

    /// Closes the listener and every open connection.
    async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

async fn handle(
    name: &'static str,
    mut req: Request<Incoming>,
    hits: Arc<Hits>,
    healthy: Arc<AtomicBool>,
    mut release: watch::Receiver<bool>,
) -> Result<Response<TestBody>, Reset> {
    let path = req.uri().path().to_string();
    if path == "/health" {
        let status = if healthy.load(Ordering::SeqCst) {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let mut r = Response::new(TestBody::Full(Some(Bytes::from_static(b"health\n"))));
        *r.status_mut() = status;
        return Ok(r);
    }
    hits.requests.fetch_add(1, Ordering::SeqCst);
    if path == "/ws" {
        // Echo protocol over an HTTP/1.1 upgrade.
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(io) = upgrade.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(io));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut r = Response::new(TestBody::Full(None));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut().insert("upgrade", "echo".parse().unwrap());
        r.headers_mut()
            .insert("connection", "upgrade".parse().unwrap());
        return Ok(r);
    }
    if req.method() == Method::POST {
        hits.posts.fetch_add(1, Ordering::SeqCst);
    }
    let via = req
        .headers()
        .get("via")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let xff = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let _ = req.into_body().collect().await;
    let body = match path.as_str() {
        "/slow" => {
            hits.slow_started.fetch_add(1, Ordering::SeqCst);
            let _ = release.wait_for(|r| *r).await;
            TestBody::Full(Some(Bytes::from(format!("slow done by {name}\n"))))
        }
        "/stream" => {
            hits.streams_started.fetch_add(1, Ordering::SeqCst);
            TestBody::Endless(false)
        }
        "/reset" => return Err(Reset),
        _ => TestBody::Full(Some(Bytes::from(format!("{name}\n")))),
    };
    let mut r = Response::new(body);
    r.headers_mut().insert("x-backend", name.parse().unwrap());
    r.headers_mut().insert("x-saw-via", via.parse().unwrap());
    r.headers_mut().insert("x-saw-xff", xff.parse().unwrap());
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// Proxy and client helpers

fn health(interval: Duration, healthy: u32, unhealthy: u32) -> HealthConfig {
    HealthConfig {
        interval: Dur(interval),
        timeout: Dur(Duration::from_secs(1)),
        healthy_threshold: Threshold(healthy),
        unhealthy_threshold: Threshold(unhealthy),
        ..HealthConfig::default()
    }
}

fn settings(health: HealthConfig) -> ProxySettings {
    ProxySettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin: "127.0.0.1:0".parse().unwrap(),
        token: TOKEN.into(),
        health,
        drain_timeout: Duration::from_secs(5),
        state_file: None,
    }
}

struct Harness {
    proxy: ProxyHandle,
    admin: AdminClient,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Harness {
    async fn start(settings: ProxySettings) -> Harness {
        let proxy = cutover::proxy::start(settings).await.unwrap();
        let admin = AdminClient::new(proxy.admin, TOKEN.into());
        Harness {
            proxy,
            admin,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Adds a backend and waits until the proxy's own check admits it.
    async fn add_healthy(&self, spec: &BackendSpec) {
        self.admin.add(spec).await.unwrap();
        self.admin.wait_healthy(&spec.id, DEADLINE).await.unwrap();
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy.listen, path)
    }

    async fn send(&self, method: Method, path: &str, body: &'static str) -> Response<Incoming> {
        let req = Request::builder()
            .method(method)
            .uri(self.url(path))
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        tokio::time::timeout(DEADLINE, self.client.request(req))
            .await
            .expect("proxy answers in time")
            .expect("proxy answers")
    }

    /// GET and read the whole body.
    async fn get(&self, path: &str) -> (StatusCode, String) {
        let resp = self.send(Method::GET, path, "").await;
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    async fn view(&self, id: &str) -> cutover::balancer::BackendView {
        let all = self.admin.backends().await.unwrap();
        all.into_iter()
            .find(|b| b.spec.id == id)
            .expect("backend listed")
    }
}

/// Polls `check` every 10 ms until it holds or `DEADLINE` passes.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A raw admin call: (status, body).
async fn admin_raw(
    admin: SocketAddr,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (StatusCode, String) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let resp = client.request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn a_backend_gets_traffic_only_after_its_health_check_passes() {
    let h = Harness::start(settings(health(Duration::from_millis(20), 2, 2))).await;
    let mut b = TestBackend::start("b1").await;
    b.healthy.store(false, Ordering::SeqCst);
    h.admin.add(&b.spec("v1")).await.unwrap();

    assert_eq!(h.get("/").await.0, StatusCode::SERVICE_UNAVAILABLE);
    let e = h
        .admin
        .wait_healthy("b1", Duration::from_millis(200))
        .await
        .unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.contains("504") && e.contains("/health: status 503"),
        "{e}"
    );
    assert_eq!(b.requests(), 0, "no request before the check passes");
    assert_ne!(h.view("b1").await.health, Health::Healthy);

    b.healthy.store(true, Ordering::SeqCst);
    h.admin.wait_healthy("b1", DEADLINE).await.unwrap();
    let (status, body) = h.get("/").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "b1\n"));
    assert_eq!(b.requests(), 1);
    let stats = h.admin.stats().await.unwrap();
    assert_eq!(stats.unrouted, 1, "the 503 is counted");

    h.proxy.shutdown().await;
    b.stop().await;
}

#[tokio::test]
async fn wait_healthy_times_out_with_the_last_check_error() {
    let h = Harness::start(settings(health(Duration::from_millis(20), 1, 1))).await;
    // A port nobody listens on.
    let gone = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let spec = BackendSpec {
        id: "ghost".into(),
        address: gone,
        host: "localhost".into(),
        release: "v1".into(),
        weight: 1,
        health_path: "/health".into(),
        preview: false,
    };
    h.admin.add(&spec).await.unwrap();
    let e = h
        .admin
        .wait_healthy("ghost", Duration::from_millis(300))
        .await
        .unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.contains(&format!("GET http://{gone}/health: connection refused")),
        "{e}"
    );
    h.proxy.shutdown().await;
}

#[tokio::test]
async fn forwarded_requests_carry_via_and_forwarded_for() {
    let h = Harness::start(settings(health(Duration::from_millis(20), 1, 2))).await;
    let mut b = TestBackend::start("b1").await;
    h.add_healthy(&b.spec("v1")).await;
    let resp = h.send(Method::GET, "/", "").await;
    assert_eq!(resp.headers()["x-saw-via"], "1.1 cutover");
    assert_eq!(resp.headers()["x-saw-xff"], "127.0.0.1");
    h.proxy.shutdown().await;
    b.stop().await;
}

#[tokio::test]
async fn draining_sends_no_new_requests_and_waits_for_the_slow_one() {
    let h = Harness::start(settings(health(Duration::from_millis(20), 1, 2))).await;
    let mut a = TestBackend::start("a").await;
    let mut b = TestBackend::start("b").await;
    h.add_healthy(&a.spec("v1")).await;

    // A slow request in flight on `a`.
    let slow = {
        let req = Request::get(h.url("/slow"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let client = h.client.clone();
        tokio::spawn(async move {
            let resp = client.request(req).await.unwrap();
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, body)
        })
    };
    let hits = a.hits.clone();
    eventually("the slow request to reach a", || {
        let hits = hits.clone();
        async move { hits.slow_started.load(Ordering::SeqCst) == 1 }
    })
    .await;

    h.add_healthy(&b.spec("v2")).await;
    h.admin.drain("a").await.unwrap();
    let waiter = {
        let admin = h.admin.clone();
        tokio::spawn(async move { admin.wait_drained("a", DEADLINE).await })
    };
    let a_before = a.requests();
    for _ in 0..20 {
        let (status, body) = h.get("/").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "b\n"));
    }
    assert_eq!(
        a.requests(),
        a_before,
        "no new request reached the draining backend"
    );
    let view = h.view("a").await;
    assert_eq!((view.state, view.in_flight), (BackendState::Draining, 1));
    assert!(
        !waiter.is_finished(),
        "wait-drained returned while a request was in flight"
    );

    a.release_slow.send(true).unwrap();
    let (status, body) = slow.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"slow done by a\n");
    let report = waiter.await.unwrap().unwrap();
    assert!(report.drained, "{report:?}");
    assert_eq!(report.closed_at_deadline, 0);
    assert_eq!(h.view("a").await.in_flight, 0);

    h.proxy.shutdown().await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn drain_deadline_cuts_a_streaming_response() {
    let h = Harness::start(settings(health(Duration::from_millis(20), 1, 2))).await;
    let mut a = TestBackend::start("a").await;
    h.add_healthy(&a.spec("v1")).await;

    let resp = h.send(Method::GET, "/stream", "").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"first\n");

    h.admin.drain("a").await.unwrap();
    let report = h
        .admin
        .wait_drained("a", Duration::from_millis(200))
        .await
        .unwrap();
    assert!(!report.drained, "{report:?}");
    assert_eq!(report.closed_at_deadline, 1);
    assert!(report.waited_ms >= 200, "{report:?}");

    // The client sees the stream end abnormally, promptly.
    let rest = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .expect("the cut stream ends");
    assert!(rest.is_err(), "a cut stream must not look complete");
    assert_eq!(h.view("a").await.in_flight, 0);

    h.proxy.shutdown().await;
    a.stop().await;
}

#[tokio::test]
async fn a_closed_backend_costs_no_failed_get_and_post_is_never_resent() {
    // Checks run once at add, then not again during the test; passive ejection is off
    // (threshold 1000), so the closed backend stays "healthy" and only retries hide it.
    let h = Harness::start(settings(health(Duration::from_secs(600), 1, 1000))).await;
    let mut a = TestBackend::start("a").await;
    let mut b = TestBackend::start("b").await;
    h.add_healthy(&a.spec("v1")).await;
    h.add_healthy(&b.spec("v1")).await;
    a.stop().await;
    assert_eq!(h.view("a").await.health, Health::Healthy);

    for i in 0..200 {
        let (status, body) = h.get("/").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "b\n"), "GET {i}");
    }
    assert_eq!(b.requests(), 200);
    let stats = h.admin.stats().await.unwrap();
    assert_eq!(stats.unrouted, 0);
    assert!(stats.backends["a"].retries >= 1, "{stats:?}");
    assert_eq!(
        stats.backends["a"].retries,
        stats.backends["a"].proxy_errors
    );
    assert_eq!(stats.backends["b"].status_2xx, 200);

    // POSTs with a body are sent once: those routed to the closed backend fail with 502.
    let mut ok = 0;
    let mut bad_gateway = 0;
    for _ in 0..10 {
        let resp = h.send(Method::POST, "/", "payload").await;
        match resp.status() {
            StatusCode::OK => ok += 1,
            StatusCode::BAD_GATEWAY => bad_gateway += 1,
            s => panic!("unexpected {s}"),
        }
    }
    assert!(
        bad_gateway >= 1,
        "SWRR sends some POSTs to the closed backend"
    );
    assert_eq!(b.hits.posts.load(Ordering::SeqCst), ok);
    assert_eq!(h.admin.stats().await.unwrap().unrouted, bad_gateway);

    h.proxy.shutdown().await;
    b.stop().await;
}

#[tokio::test]
async fn a_post_the_backend_hangs_up_on_is_not_retried_but_a_get_is() {
    let h = Harness::start(settings(health(Duration::from_secs(600), 1, 1000))).await;
    let mut c = TestBackend::start("c").await;
    let mut d = TestBackend::start("d").await;
    h.add_healthy(&c.spec("v1")).await;
    h.add_healthy(&d.spec("v1")).await;

    let resp = h.send(Method::POST, "/reset", "payload").await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        c.hits.posts.load(Ordering::SeqCst) + d.hits.posts.load(Ordering::SeqCst),
        1
    );

    let (status, _) = h.get("/reset").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "both backends hang up");
    assert_eq!(
        c.requests() + d.requests(),
        3,
        "the GET went to each backend once"
    );

    h.proxy.shutdown().await;
    c.stop().await;
    d.stop().await;
}

#[tokio::test]
async fn admin_api_refuses_missing_or_wrong_tokens_and_reports_errors() {
    let h = Harness::start(settings(health(Duration::from_millis(20), 1, 2))).await;
    let addr = h.proxy.admin;
    let b = TestBackend::start("b1").await;
    let spec = serde_json::to_string(&b.spec("v1")).unwrap();

    for token in [None, Some("wrong-token-0123456789")] {
        let (status, body) = admin_raw(addr, Method::POST, "/backends", token, &spec).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let e: cutover::balancer::api::ApiError = serde_json::from_str(&body).unwrap();
        assert!(e.error.contains("token"), "{}", e.error);
        let (status, _) = admin_raw(addr, Method::GET, "/backends", token, "").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    assert!(
        h.admin.backends().await.unwrap().is_empty(),
        "nothing was added"
    );
    let (status, _) = admin_raw(addr, Method::GET, "/healthz", None, "").await;
    assert_eq!(status, StatusCode::OK);

    let t = Some(TOKEN);
    assert_eq!(
        admin_raw(addr, Method::POST, "/backends", t, &spec).await.0,
        StatusCode::CREATED
    );
    assert_eq!(
        admin_raw(addr, Method::POST, "/backends", t, &spec).await.0,
        StatusCode::OK
    );
    let mut other = b.spec("v2");
    other.id = "b1".into();
    let other = serde_json::to_string(&other).unwrap();
    let (status, body) = admin_raw(addr, Method::POST, "/backends", t, &other).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = admin_raw(addr, Method::POST, "/backends", t, "{\"id\":").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("\"error\""), "{body}");
    let (status, _) = admin_raw(addr, Method::POST, "/backends/nope/drain", t, "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = admin_raw(
        addr,
        Method::PUT,
        "/backends/b1/weight",
        t,
        "{\"weight\":\"x\"}",
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let e = format!("{:#}", h.admin.drain("nope").await.unwrap_err());
    assert!(
        e.contains(&addr.to_string()) && e.contains("404") && e.contains("nope"),
        "{e}"
    );
    let wrong = AdminClient::new(addr, "wrong-token-0123456789".into());
    let e = format!("{:#}", wrong.backends().await.unwrap_err());
    assert!(e.contains("401") && e.contains("balancer.token"), "{e}");

    h.proxy.shutdown().await;
}

#[tokio::test]
async fn release_counters_survive_backend_removal() {
    let h = Harness::start(settings(health(Duration::from_millis(20), 1, 2))).await;
    let mut old = TestBackend::start("old").await;
    h.add_healthy(&old.spec("v1")).await;
    for _ in 0..5 {
        assert_eq!(h.get("/").await.0, StatusCode::OK);
    }
    h.admin.drain("old").await.unwrap();
    assert!(h.admin.wait_drained("old", DEADLINE).await.unwrap().drained);
    h.admin.remove("old").await.unwrap();
    old.stop().await;

    let mut new = TestBackend::start("new").await;
    h.add_healthy(&new.spec("v2")).await;
    for _ in 0..3 {
        assert_eq!(h.get("/").await.0, StatusCode::OK);
    }
    let stats = h.admin.stats().await.unwrap();
    assert!(!stats.backends.contains_key("old"));
    assert_eq!(stats.releases["v1"].requests, 5);
    assert_eq!(stats.releases["v1"].status_2xx, 5);
    assert_eq!(stats.releases["v2"].requests, 3);
    assert_eq!(stats.total.requests, 8);
    assert!(stats.total.latency_us_sum > 0);

    h.proxy.shutdown().await;
    new.stop().await;
}

#[tokio::test]
async fn routing_state_is_restored_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("state/proxy-routes.json");
    let mut s = settings(health(Duration::from_millis(20), 1, 2));
    s.state_file = Some(state_file.clone());

    let mut a = TestBackend::start("a").await;
    let mut b = TestBackend::start("b").await;
    let h = Harness::start(s.clone()).await;
    h.add_healthy(&a.spec("v1")).await;
    h.admin.add(&b.spec("v1")).await.unwrap();
    h.admin.set_weight("a", 7).await.unwrap();
    h.admin.drain("b").await.unwrap();
    h.proxy.shutdown().await;

    let h = Harness::start(s.clone()).await;
    let views: BTreeMap<String, _> = h
        .admin
        .backends()
        .await
        .unwrap()
        .into_iter()
        .map(|v| (v.spec.id.clone(), v))
        .collect();
    assert_eq!(views.len(), 2);
    assert_eq!(views["a"].state, BackendState::Active);
    assert_eq!(views["a"].spec.weight, 7);
    assert_eq!(views["b"].state, BackendState::Draining);
    h.admin.wait_healthy("a", DEADLINE).await.unwrap();
    assert_eq!(h.get("/").await, (StatusCode::OK, "a\n".to_string()));
    h.proxy.shutdown().await;

    std::fs::write(&state_file, "{ broken").unwrap();
    let e = match cutover::proxy::start(s).await {
        Ok(_) => panic!("a corrupt state file must be refused"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("proxy-routes.json"), "{e}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_replacement_proxy_can_bind_the_same_traffic_address() {
    let first = cutover::proxy::start(settings(HealthConfig::default()))
        .await
        .unwrap();
    let mut s = settings(HealthConfig::default());
    s.listen = first.listen;
    let second = cutover::proxy::start(s).await.unwrap();
    assert_eq!(second.listen, first.listen);
    first.shutdown().await;
    second.shutdown().await;

    // A taken admin address is refused with the config key in the message.
    let blocker = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut s = settings(HealthConfig::default());
    s.admin = blocker.local_addr().unwrap();
    let e = match cutover::proxy::start(s).await {
        Ok(_) => panic!("the admin address is taken"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("balancer.admin") && e.contains(&blocker.local_addr().unwrap().to_string()),
        "{e}"
    );
}

#[tokio::test]
async fn http2_clients_are_served() {
    let h = Harness::start(settings(health(Duration::from_millis(20), 1, 2))).await;
    let mut b = TestBackend::start("b1").await;
    h.add_healthy(&b.spec("v1")).await;
    let h2: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let resp = h2
        .request(
            Request::get(h.url("/"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"b1\n");
    h.proxy.shutdown().await;
    b.stop().await;
}

#[tokio::test]
async fn upgraded_connections_are_tunnelled_and_drained() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start(settings(health(Duration::from_millis(20), 1, 2))).await;
    let mut a = TestBackend::start("a").await;
    h.add_healthy(&a.spec("v1")).await;

    let mut conn = tokio::net::TcpStream::connect(h.proxy.listen)
        .await
        .unwrap();
    conn.write_all(
        b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(DEADLINE, conn.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 1, "head ended early: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    conn.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(DEADLINE, conn.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping");

    // The tunnel counts as in flight and is closed at the drain deadline.
    assert_eq!(h.view("a").await.in_flight, 1);
    h.admin.drain("a").await.unwrap();
    let report = h
        .admin
        .wait_drained("a", Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!((report.drained, report.closed_at_deadline), (false, 1));
    let mut rest = Vec::new();
    let read = tokio::time::timeout(DEADLINE, conn.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(read.is_err() || rest.is_empty(), "the tunnel is closed");

    h.proxy.shutdown().await;
    a.stop().await;
}
