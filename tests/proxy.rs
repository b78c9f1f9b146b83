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
use cutover::balancer::api::{BackendSpec, BackendState, Health, SampleWindow, SwitchRequest};
use cutover::balancer::builtin::AdminClient;
use cutover::config::{Dur, HealthConfig, Threshold};
use cutover::proxy::{ProxyHandle, ProxyOptions, ProxySettings};
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
    /// Answer 500 to everything but `/health`.
    fail: AtomicBool,
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

/// A response body: all at once, one chunk and then pending forever, chunks from a channel, or
/// all at once followed by trailers.
enum TestBody {
    Full(Option<Bytes>),
    Trailed(Option<Bytes>, Option<hyper::HeaderMap>),
    Endless(bool),
    Chunks(tokio::sync::mpsc::Receiver<Bytes>),
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
            TestBody::Chunks(rx) => rx.poll_recv(_cx).map(|c| c.map(|b| Ok(Frame::data(b)))),
            TestBody::Trailed(data, trailers) => Poll::Ready(match data.take() {
                Some(d) => Some(Ok(Frame::data(d))),
                None => trailers.take().map(|t| Ok(Frame::trailers(t))),
            }),
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
            gated: false,
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
    if hits.fail.load(Ordering::SeqCst) {
        let mut r = Response::new(TestBody::Full(Some(Bytes::from_static(b"broken\n"))));
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        return Ok(r);
    }
    if path == "/echo-first" {
        // Answers with the first chunk of the request body as soon as it arrives, then echoes
        // the rest: a proxy that buffered request bodies would never answer before the end.
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mut body = req.into_body();
        tokio::spawn(async move {
            while let Some(Ok(f)) = body.frame().await {
                if let Ok(d) = f.into_data() {
                    if tx.send(d).await.is_err() {
                        return;
                    }
                }
            }
        });
        return Ok(Response::new(TestBody::Chunks(rx)));
    }
    if path == "/trailers" {
        // Echoes the body, and the request's `x-sent` trailer as the response's `x-echo`.
        let mut body = req.into_body();
        let (mut data, mut sent) = (Vec::new(), String::from("none"));
        while let Some(Ok(f)) = body.frame().await {
            match f.into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(f) => {
                    if let Some(v) = f.trailers_ref().and_then(|t| t.get("x-sent")) {
                        sent = v.to_str().unwrap_or("").to_string();
                    }
                }
            }
        }
        let mut trailers = hyper::HeaderMap::new();
        trailers.insert("x-echo", sent.parse().unwrap());
        let mut r = Response::new(TestBody::Trailed(Some(data.into()), Some(trailers)));
        r.headers_mut().insert("trailer", "x-echo".parse().unwrap());
        return Ok(r);
    }
    if path == "/sse" {
        // One event at once, a second one when released, then the end.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(Bytes::from_static(b"data: one\n\n")).await.unwrap();
        let mut release = release.clone();
        tokio::spawn(async move {
            let _ = release.wait_for(|r| *r).await;
            let _ = tx.send(Bytes::from_static(b"data: two\n\n")).await;
        });
        let mut r = Response::new(TestBody::Chunks(rx));
        r.headers_mut()
            .insert("content-type", "text/event-stream".parse().unwrap());
        return Ok(r);
    }
    let proto = req
        .headers()
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
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
    let preview_seen = req.headers().contains_key("x-cutover-preview");
    let host = req
        .headers()
        .get_all("host")
        .iter()
        .map(|v| v.to_str().unwrap_or("?"))
        .collect::<Vec<_>>()
        .join(" | ");
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
        "/big" => TestBody::Full(Some(Bytes::from(vec![b'x'; BIG]))),
        // Promises more than it sends: the connection ends mid-body (after a 500 head too).
        "/truncated" | "/truncated-500" => {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tx.try_send(Bytes::from_static(b"part")).unwrap();
            // The head and the first part go out before the body ends, short.
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                drop(tx);
            });
            let mut r = Response::new(TestBody::Chunks(rx));
            r.headers_mut().insert(
                "content-length",
                hyper::header::HeaderValue::from_static("1000"),
            );
            if path == "/truncated-500" {
                *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            }
            return Ok(r);
        }
        _ => TestBody::Full(Some(Bytes::from(format!("{name}\n")))),
    };
    let mut r = Response::new(body);
    r.headers_mut().insert("x-backend", name.parse().unwrap());
    r.headers_mut().insert("x-saw-via", via.parse().unwrap());
    r.headers_mut().insert("x-saw-xff", xff.parse().unwrap());
    r.headers_mut()
        .insert("x-saw-proto", proto.parse().unwrap());
    r.headers_mut().insert("x-saw-host", host.parse().unwrap());
    if preview_seen {
        r.headers_mut()
            .insert("x-saw-preview", "yes".parse().unwrap());
    }
    Ok(r)
}

/// A backend speaking raw bytes, for what a hyper server would never send: `/health` gets a
/// plain 200, any other request `answer` (or, when `None`, nothing: the connection is held
/// open and never read again, as by an app stuck before reading the body), and the connection
/// is closed after each answer. It keeps the heads of the requests it saw (health checks
/// excluded). Stops when dropped.
struct RawBackend {
    addr: SocketAddr,
    heads: Arc<std::sync::Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl RawBackend {
    async fn start(answer: &'static [u8]) -> RawBackend {
        Self::start_answering(Some(answer)).await
    }

    async fn start_answering(answer: Option<&'static [u8]>) -> RawBackend {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = heads.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((mut conn, _)) = listener.accept().await {
                let seen = seen.clone();
                conns.spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let reply: &[u8] = if head.starts_with("GET /health ") {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    } else {
                        seen.lock().unwrap().push(head);
                        match answer {
                            Some(a) => a,
                            None => return std::future::pending().await,
                        }
                    };
                    let _ = conn.write_all(reply).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        RawBackend { addr, heads, task }
    }

    fn spec(&self, id: &str) -> BackendSpec {
        BackendSpec {
            id: id.to_string(),
            address: self.addr,
            host: "localhost".into(),
            release: "v1".into(),
            weight: 100,
            health_path: "/health".into(),
            preview: false,
            gated: false,
        }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends raw request bytes to the proxy on a fresh connection and reads until it closes
/// (the request should say `connection: close`), within `DEADLINE`.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, conn.read_to_end(&mut out))
        .await
        .expect("the proxy answers and closes in time")
        .expect("the connection reads");
    String::from_utf8_lossy(&out).into_owned()
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
        Self::start_with(settings, ProxyOptions::default()).await
    }

    async fn start_with(settings: ProxySettings, options: ProxyOptions) -> Harness {
        let proxy = cutover::proxy::start_with(settings, options).await.unwrap();
        let admin = AdminClient::new(proxy.admin, TOKEN.into());
        Harness {
            proxy,
            admin,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Adds a backend and waits until the proxy's own check admits it.
    /// Sends `GET /slow`, which `backend` (the only one taking requests) holds until its
    /// `release_slow`; returns once the request is in flight there, with its answer to come.
    async fn slow_request_in_flight_on(
        &self,
        backend: &TestBackend,
    ) -> JoinHandle<(StatusCode, Bytes)> {
        let req = Request::get(self.url("/slow"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let client = self.client.clone();
        let slow = tokio::spawn(async move {
            let resp = client.request(req).await.unwrap();
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, body)
        });
        let hits = backend.hits.clone();
        eventually(
            &format!("the slow request to reach {}", backend.name),
            || {
                let hits = hits.clone();
                async move { hits.slow_started.load(Ordering::SeqCst) == 1 }
            },
        )
        .await;
        slow
    }

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

    /// GET with the sticky cookie of `release` (the proxy needs `sticky: Cookie`): a test
    /// can aim at one backend while another stands by in the same pool.
    async fn get_pinned(&self, path: &str, release: &str) -> Response<Incoming> {
        let req = Request::get(self.url(path))
            .header("cookie", format!("cutover_release={release}"))
            .body(Full::new(Bytes::new()))
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
        gated: false,
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

    let slow = h.slow_request_in_flight_on(&a).await;

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

/// A draining backend that stands in for failing active ones answers until its drain
/// deadline: an idle moment between two requests does not end the drain (review finding).
#[tokio::test]
async fn a_draining_backend_standing_in_drains_until_its_deadline() {
    let h = Harness::start(settings(health(Duration::from_millis(20), 1, 1))).await;
    let mut a = TestBackend::start("a").await;
    let mut b = TestBackend::start("b").await;
    h.add_healthy(&a.spec("v1")).await;
    h.add_healthy(&b.spec("v2")).await;
    b.healthy.store(false, Ordering::SeqCst);
    eventually("b to be seen unhealthy", || {
        let h = &h;
        async move { h.view("b").await.health == Health::Unhealthy }
    })
    .await;
    let started = std::time::Instant::now();
    let retire = {
        let admin = h.admin.clone();
        tokio::spawn(async move { admin.retire("a", Duration::from_millis(1_500)).await })
    };
    // a is idle, yet it stands in for b: it answers, and its drain runs to the deadline.
    for _ in 0..10 {
        let (status, body) = h.get("/").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "a\n"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!retire.is_finished(), "the drain ended at an idle moment");
    let report = retire.await.unwrap().unwrap();
    assert!(report.drained, "{report:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(1_400),
        "{:?}",
        started.elapsed()
    );
    h.proxy.shutdown().await;
    a.stop().await;
    b.stop().await;
}

/// A retire whose backend is put back into service while it waits (a deployer's switch back
/// after another deployer died mid-retire) ends without cutting or removing anything.
#[tokio::test]
async fn a_retire_gives_up_when_its_backend_is_put_back_into_service() {
    let h = Harness::start(settings(health(Duration::from_millis(20), 1, 2))).await;
    let mut a = TestBackend::start("a").await;
    h.add_healthy(&a.spec("v1")).await;
    let slow = h.slow_request_in_flight_on(&a).await;
    let retire = {
        let admin = h.admin.clone();
        tokio::spawn(async move { admin.retire("a", Duration::from_secs(2)).await })
    };
    eventually("a to drain", || {
        let h = &h;
        async move { h.view("a").await.state == BackendState::Draining }
    })
    .await;
    h.admin.activate("a").await.unwrap();
    let e = retire.await.unwrap().unwrap_err();
    assert!(format!("{e:#}").contains("put back into service"), "{e:#}");
    // Past the retire's deadline: nothing was cut, and a serves on.
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    assert_eq!(h.view("a").await.state, BackendState::Active);
    a.release_slow.send(true).unwrap();
    let (status, body) = slow.await.unwrap();
    assert_eq!(
        (status, &body[..]),
        (StatusCode::OK, &b"slow done by a\n"[..])
    );
    let (status, _) = h.get("/").await;
    assert_eq!(status, StatusCode::OK);
    h.proxy.shutdown().await;
    a.stop().await;
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
    // The deploy's proof counts the cut response as failed.
    let stats = h.admin.stats().await.unwrap();
    assert_eq!(stats.backends["a"].broken, 1, "{stats:?}");
    let (served, failed, _) =
        cutover::deploy::traffic_between(&cutover::balancer::Stats::default(), &stats);
    assert_eq!((served, failed), (1, 1), "{stats:?}");

    h.proxy.shutdown().await;
    a.stop().await;
}

/// At a drain deadline, requests still waiting for their head are sent to another backend
/// and answered: the drain report must not count them as closed (the deploy report printed
/// "N request(s) ... were closed: a cut response counts as failed" next to 0 failed). A
/// response cut mid-body still counts.
#[tokio::test]
async fn requests_retried_after_a_drain_deadline_are_not_reported_closed() {
    let h = Harness::start_with(
        settings(health(Duration::from_secs(600), 1, 1000)),
        pinned(),
    )
    .await;
    let mut a = TestBackend::start("a").await;
    let mut b = TestBackend::start("b").await;
    h.add_healthy(&a.spec("v1")).await;
    h.add_healthy(&b.spec("v2")).await;
    // "b" answers /slow at once; "a" holds it until the deadline.
    b.release_slow.send(true).unwrap();
    let mut slow = JoinSet::new();
    for _ in 0..3 {
        let req = Request::get(h.url("/slow"))
            .header("cookie", "cutover_release=v1")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let client = h.client.clone();
        slow.spawn(async move {
            let resp = tokio::time::timeout(DEADLINE, client.request(req))
                .await
                .expect("answered in time")
                .unwrap();
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        });
    }
    let stream = h.get_pinned("/stream", "v1").await;
    assert_eq!(stream.status(), StatusCode::OK);
    let hits = a.hits.clone();
    eventually("the slow requests to reach a", || {
        let hits = hits.clone();
        async move { hits.slow_started.load(Ordering::SeqCst) == 3 }
    })
    .await;

    h.admin.drain("a").await.unwrap();
    let report = h
        .admin
        .wait_drained("a", Duration::from_millis(100))
        .await
        .unwrap();
    while let Some(r) = slow.join_next().await {
        let (status, body) = r.unwrap();
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "slow done by b\n")
        );
    }
    assert!(!report.drained, "{report:?}");
    assert_eq!(
        report.closed_at_deadline, 1,
        "only the stream was closed on its client: {report:?}"
    );
    let stats = h.admin.stats().await.unwrap();
    assert_eq!((stats.total.retries, stats.unrouted), (3, 0), "{stats:?}");
    drop(stream);
    a.release_slow.send(true).unwrap();
    h.proxy.shutdown().await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_closed_backend_costs_no_failed_get_or_post() {
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

    // A POST whose connect is refused never left the proxy: it goes to the other backend, its
    // body whole (the backend echoes it). Once sent, a POST is never sent again (see
    // `a_post_the_backend_hangs_up_on_is_not_retried_but_a_get_is`).
    for i in 0..10 {
        let resp = h.send(Method::POST, "/echo-first", "payload").await;
        assert_eq!(resp.status(), StatusCode::OK, "POST {i}");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"payload", "POST {i}");
    }
    assert_eq!(b.hits.posts.load(Ordering::SeqCst), 10);
    let stats = h.admin.stats().await.unwrap();
    assert_eq!(stats.unrouted, 0, "{stats:?}");
    // The deploy's proof counts client requests, not attempts: the retried ones once each.
    assert!(stats.total.requests > 210, "{stats:?}");
    let (served, failed, _) =
        cutover::deploy::traffic_between(&cutover::balancer::Stats::default(), &stats);
    assert_eq!((served, failed), (210, 0), "{stats:?}");

    h.proxy.shutdown().await;
    b.stop().await;
}

#[tokio::test]
async fn a_response_cut_off_mid_body_counts_as_failed() {
    let h = Harness::start(settings(health(Duration::from_secs(600), 1, 1000))).await;
    let mut a = TestBackend::start("a").await;
    h.add_healthy(&a.spec("v1")).await;
    let resp = h.send(Method::GET, "/truncated", "").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.into_body().collect().await.is_err(),
        "the client sees the cut"
    );
    eventually("the broken body is counted", || async {
        h.admin.stats().await.unwrap().total.broken == 1
    })
    .await;
    let stats = h.admin.stats().await.unwrap();
    let (served, failed, _) =
        cutover::deploy::traffic_between(&cutover::balancer::Stats::default(), &stats);
    assert_eq!((served, failed), (1, 1), "{stats:?}");
    assert_eq!(
        cutover::analysis::success_rate(&stats.total),
        Some(0.0),
        "{stats:?}"
    );

    // A 500 whose body breaks is one failed request, not two.
    let resp = h.send(Method::GET, "/truncated-500", "").await;
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(resp.into_body().collect().await.is_err());
    // The proxy counts the break before the client can see it.
    let stats = h.admin.stats().await.unwrap();
    assert_eq!(
        (stats.total.status_5xx, stats.total.broken),
        (1, 1),
        "{stats:?}"
    );
    let (served, failed, _) =
        cutover::deploy::traffic_between(&cutover::balancer::Stats::default(), &stats);
    assert_eq!((served, failed), (2, 2), "{stats:?}");
    h.proxy.shutdown().await;
    a.stop().await;
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

/// What the admin API accepts must work: a health path that cannot be sent, a release that
/// breaks the sticky cookie or a misspelled field are refused with 400 naming the problem.
#[tokio::test]
async fn admin_api_refuses_what_could_never_work() {
    let h = Harness::start(settings(health(Duration::from_secs(600), 1, 1))).await;
    let add = |health_path: &str, release: &str| {
        format!(
            r#"{{"id":"x","address":"127.0.0.1:9","host":"h","release":{},"health_path":{}}}"#,
            serde_json::to_string(release).unwrap(),
            serde_json::to_string(health_path).unwrap()
        )
    };
    let a = h.proxy.admin;
    let (status, body) = admin_raw(
        a,
        Method::POST,
        "/backends",
        Some(TOKEN),
        &add("/he alth", "v1"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("health_path"), "{body}");
    let (status, body) = admin_raw(
        a,
        Method::POST,
        "/backends",
        Some(TOKEN),
        &add("/health", "v1\r\nSet-Cookie: admin=1"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("release"), "{body}");
    let (status, body) = admin_raw(
        a,
        Method::PUT,
        "/weights",
        Some(TOKEN),
        r#"{"weights":{},"wieghts":{"x":1}}"#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("wieghts"), "{body}");
    // The scheme of the Authorization header is case-insensitive.
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let req = Request::get(format!("http://{a}/stats"))
        .header("authorization", format!("bearer {TOKEN}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(client.request(req).await.unwrap().status(), StatusCode::OK);
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

/// Changes made at once share state file writes; none of them may be lost on the way.
#[tokio::test]
async fn concurrent_changes_all_reach_the_state_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(health(Duration::from_secs(60), 1, 2));
    s.state_file = Some(dir.path().join("routes.json"));
    let h = Harness::start(s.clone()).await;
    let spec = |i: u16| BackendSpec {
        id: format!("b{i}"),
        address: SocketAddr::from(([127, 0, 0, 1], 20000 + i)),
        host: format!("h{i}"),
        release: "v1".into(),
        weight: 100,
        health_path: "/health".into(),
        preview: false,
        gated: false,
    };
    let adds = (0..24).map(|i| {
        let admin = h.admin.clone();
        tokio::spawn(async move { admin.add(&spec(i)).await })
    });
    for a in futures_util::future::join_all(adds).await {
        a.unwrap().unwrap();
    }
    let removes = (0..24).filter(|i| i % 2 == 0).map(|i| {
        let admin = h.admin.clone();
        tokio::spawn(async move { admin.remove(&format!("b{i}")).await })
    });
    for r in futures_util::future::join_all(removes).await {
        r.unwrap().unwrap();
    }
    // The file as the last answered change left it, before any shutdown could write it again.
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.state_file.as_ref().unwrap()).unwrap()).unwrap();
    let mut ids: Vec<String> = file["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["spec"]["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort_by_key(|id| id[1..].parse::<u16>().unwrap());
    let odd: Vec<String> = (0..24)
        .filter(|i| i % 2 == 1)
        .map(|i| format!("b{i}"))
        .collect();
    assert_eq!(ids, odd);
    h.proxy.shutdown().await;
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

    // Half-written (a power cut): the state before the last change, kept beside it, is used.
    std::fs::write(&state_file, "{ broken").unwrap();
    let h = Harness::start(s.clone()).await;
    assert_eq!(h.admin.backends().await.unwrap().len(), 2);
    h.proxy.shutdown().await;

    // Both unreadable: refused, naming the file.
    std::fs::write(&state_file, "{ broken").unwrap();
    let mut spare = state_file.clone().into_os_string();
    spare.push(".prev");
    std::fs::write(&spare, "{ broken too").unwrap();
    let e = match cutover::proxy::start(s).await {
        Ok(_) => panic!("a corrupt state file must be refused"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("proxy-routes.json"), "{e}");
    a.stop().await;
    b.stop().await;
}

/// A second proxy (another state_dir, so no control socket in common) must not share the
/// traffic port: the kernel would split clients between two routing tables. A replacement
/// takes the socket over instead (`--takeover`).
#[tokio::test]
async fn a_second_proxy_on_the_same_traffic_address_is_refused() {
    let first = cutover::proxy::start(settings(HealthConfig::default()))
        .await
        .unwrap();
    let mut s = settings(HealthConfig::default());
    s.listen = first.listen;
    let e = match cutover::proxy::start(s).await {
        Ok(_) => panic!("two proxies listen on {}", first.listen),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("balancer.listen")
            && e.contains(&first.listen.to_string())
            && e.contains("another program uses it")
            && e.contains("--takeover"),
        "{e}"
    );
    first.shutdown().await;

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

// ---------------------------------------------------------------------------------------------
// Takeover in one process: two `start_with`s on one control socket and state file.

/// Settings and options of a proxy with a state file and a control socket in `dir`.
fn with_state(dir: &std::path::Path, health: HealthConfig) -> (ProxySettings, ProxyOptions) {
    let mut s = settings(health);
    s.state_file = Some(dir.join("routes.json"));
    let o = ProxyOptions {
        control_socket: Some(dir.join("proxy.sock")),
        ..ProxyOptions::default()
    };
    (s, o)
}

/// What `cutover proxy` does with a running proxy: once a replacement takes over, drain and
/// stop (which sends the replacement the drain's end).
fn stop_when_replaced(proxy: ProxyHandle) -> JoinHandle<()> {
    tokio::spawn(async move {
        proxy.stopped().await;
        proxy.shutdown().await;
    })
}

/// `GET path` on a connection of its own: (status line, the backend that answered).
async fn get_alone(addr: SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .unwrap();
    let text = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    let status = text.lines().next().unwrap_or("").to_string();
    let backend = text
        .lines()
        .find_map(|l| l.strip_prefix("x-backend: "))
        .unwrap_or("")
        .to_string();
    (status, backend)
}

/// An admin change made on the old proxy while the new one starts (after its first read of
/// the state file) must hold from the new proxy's first request, not only once the old one
/// has released its admin API (which a long-polling call delays by seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_on_the_old_proxy_during_a_takeover_holds_on_the_new_one_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (s, o) = with_state(dir.path(), health(Duration::from_secs(600), 1, 1));
    let old = cutover::proxy::start_with(s.clone(), o.clone())
        .await
        .unwrap();
    let listen = old.listen;
    let admin = AdminClient::new(old.admin, TOKEN.into());
    // A request in flight on "slowpoke" and a wait-drained long poll on it: the old proxy's
    // admin API takes its full grace to release.
    let mut slowpoke = TestBackend::start("slowpoke").await;
    admin.add(&slowpoke.spec("v1")).await.unwrap();
    admin.wait_healthy("slowpoke", DEADLINE).await.unwrap();
    let slow = tokio::spawn(get_alone(listen, "/slow"));
    eventually("the slow request reached slowpoke", || async {
        slowpoke.hits.slow_started.load(Ordering::SeqCst) == 1
    })
    .await;
    let mut a = TestBackend::start("a").await;
    let mut b = TestBackend::start("b").await;
    for t in [&a, &b] {
        admin.add(&t.spec("v1")).await.unwrap();
        admin.wait_healthy(t.name, DEADLINE).await.unwrap();
    }
    admin.drain("slowpoke").await.unwrap();
    let poll = admin.clone();
    let long_poll =
        tokio::spawn(async move { poll.wait_drained("slowpoke", Duration::from_secs(30)).await });
    // A backend whose health check never answers: the new proxy's first check of it takes
    // the check timeout (1 s), a window in which it has read the state file but not taken over.
    let hole = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_addr = hole.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let seen = accepted.clone();
    let hole_task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((c, _)) = hole.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            held.push(c);
        }
    });
    let mut spec = a.spec("v1");
    spec.id = "hole".into();
    spec.address = hole_addr;
    admin.add(&spec).await.unwrap();
    eventually("the old proxy checked the hole", || async {
        accepted.load(Ordering::SeqCst) == 1
    })
    .await;
    let old_task = stop_when_replaced(old);

    let new_task = tokio::spawn(cutover::proxy::start_with(
        s,
        ProxyOptions {
            takeover: true,
            ..o
        },
    ));
    eventually("the new proxy read the state file", || async {
        accepted.load(Ordering::SeqCst) == 2
    })
    .await;
    // The change the new proxy has not seen yet.
    admin.drain("a").await.unwrap();
    let a_before = a.requests();
    let mut answered = 0;
    while !new_task.is_finished() && answered < 2000 {
        let (status, body) = get_alone(listen, "/").await;
        assert!(status.contains("200"), "{status} {body}");
        answered += 1;
    }
    let new = new_task.await.unwrap().unwrap();
    for _ in 0..10 {
        assert_eq!(get_alone(listen, "/").await.1, "b");
    }
    assert_eq!(
        a.requests(),
        a_before,
        "the drained backend got requests after the drain ({answered} sent during the takeover)"
    );
    slowpoke.release_slow.send(true).unwrap();
    let _ = slow.await;
    let _ = long_poll.await;
    let _ = old_task.await;
    new.shutdown().await;
    hole_task.abort();
    for t in [&mut a, &mut b, &mut slowpoke] {
        t.stop().await;
    }
}

/// After a takeover, the old proxy still serves the client connections it holds until its
/// drain ends, and may send their new requests to any backend its table routes to: a retire
/// on the new proxy must wait for that, not answer "drained" at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retire_on_the_new_proxy_waits_for_the_old_proxys_open_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let (s, o) = with_state(dir.path(), health(Duration::from_millis(200), 1, 3));
    let old = cutover::proxy::start_with(s.clone(), o.clone())
        .await
        .unwrap();
    let admin = AdminClient::new(old.admin, TOKEN.into());
    let mut a = TestBackend::start("a").await;
    admin.add(&a.spec("v1")).await.unwrap();
    admin.wait_healthy("a", DEADLINE).await.unwrap();
    // A keep-alive client connection to the old proxy, idle at the takeover.
    let mut conn = tokio::net::TcpStream::connect(old.listen).await.unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut conn).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let mut body = Vec::new();
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    while !body.ends_with(b"0\r\n\r\n") {
        body.push(conn.read_u8().await.unwrap());
    }
    let old_task = stop_when_replaced(old);
    let new = cutover::proxy::start_with(
        s,
        ProxyOptions {
            takeover: true,
            ..o
        },
    )
    .await
    .unwrap();
    let mut retire = {
        let admin = admin.clone();
        tokio::spawn(async move { admin.retire("a", Duration::from_secs(10)).await })
    };
    // The old proxy takes one more request on the connection it holds (it lingers).
    conn.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    eventually("the old proxy forwarded the request", || async {
        a.hits.slow_started.load(Ordering::SeqCst) == 1
    })
    .await;
    // Waiting for something not to happen: a bound, not a sleep for an event.
    if let Ok(r) = tokio::time::timeout(Duration::from_secs(1), &mut retire).await {
        panic!("the retire ended while the old proxy still sent a request to the backend: {r:?}");
    }
    a.release_slow.send(true).unwrap();
    let head = read_head(&mut conn).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let report = tokio::time::timeout(DEADLINE, retire)
        .await
        .expect("the retire ends once the old proxy drained")
        .unwrap()
        .unwrap();
    assert!(report.drained, "{report:?}");
    let _ = old_task.await;
    new.shutdown().await;
    a.stop().await;
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

// ---------------------------------------------------------------------------------------------
// Issue 3: production traffic

/// A self-signed certificate for 127.0.0.1 made with the openssl CLI: (cert.pem, key.pem).
fn test_certificate(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("the openssl CLI runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// A TLS client trusting only `cert`, offering `alpn`.
async fn tls_connect(
    addr: SocketAddr,
    cert: &std::path::Path,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(cert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

#[tokio::test]
async fn h2_over_tls_and_h2c_are_proxied_with_forwarded_proto() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = test_certificate(dir.path());
    let options = ProxyOptions {
        tls: Some(cutover::proxy::TlsFiles {
            cert: cert.clone(),
            key,
        }),
        ..ProxyOptions::default()
    };
    let h = Harness::start_with(settings(health(Duration::from_millis(20), 1, 2)), options).await;
    let mut b = TestBackend::start("b1").await;
    h.add_healthy(&b.spec("v1")).await;

    // HTTP/2 through ALPN.
    let tls = tls_connect(h.proxy.listen, &cert, b"h2").await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            Request::get("https://127.0.0.1/")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-saw-proto"], "https");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"b1\n");

    // HTTP/1.1 over TLS.
    let tls = tls_connect(h.proxy.listen, &cert, b"http/1.1").await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            Request::get("/")
                .header("host", "app")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.version(), hyper::Version::HTTP_11);
    assert_eq!(resp.headers()["x-saw-proto"], "https");
    h.proxy.shutdown().await;

    // h2c with prior knowledge on a cleartext proxy.
    let h = Harness::start(settings(health(Duration::from_millis(20), 1, 2))).await;
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
    assert_eq!(resp.headers()["x-saw-proto"], "http");
    h.proxy.shutdown().await;
    b.stop().await;
}

/// Reads an HTTP/1.1 response head byte by byte from a raw connection.
async fn read_head(conn: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(DEADLINE, conn.read(&mut byte))
            .await
            .expect("a head in time")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).to_ascii_lowercase()
}

#[tokio::test]
async fn a_websocket_survives_its_backend_draining_until_the_deadline() {
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
    assert!(read_head(&mut conn).await.starts_with("http/1.1 101"));

    h.admin.drain("a").await.unwrap();
    let drain_timeout = Duration::from_millis(800);
    let started = tokio::time::Instant::now();
    let waiter = {
        let admin = h.admin.clone();
        tokio::spawn(async move { admin.wait_drained("a", drain_timeout).await })
    };
    // While draining, before the deadline, the tunnel still echoes both ways.
    for msg in [&b"one"[..], b"two", b"three"] {
        conn.write_all(msg).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(DEADLINE, conn.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..], msg);
    }
    assert!(
        !waiter.is_finished(),
        "wait-drained ended while the tunnel was open"
    );
    // At the deadline it is closed, and not before.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, conn.read_to_end(&mut rest))
        .await
        .expect("closed at the deadline");
    let closed_after = started.elapsed();
    assert!(
        closed_after >= drain_timeout,
        "closed after {closed_after:?}, before the {drain_timeout:?} deadline"
    );
    let report = waiter.await.unwrap().unwrap();
    assert_eq!(
        (report.drained, report.closed_at_deadline),
        (false, 1),
        "{report:?}"
    );
    h.proxy.shutdown().await;
    a.stop().await;
}

#[tokio::test]
async fn a_websocket_handshake_to_a_closed_backend_is_retried() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Passive ejection off: every handshake that lands on the closed backend must be retried.
    let h = Harness::start(settings(health(Duration::from_secs(600), 1, 1000))).await;
    let mut a = TestBackend::start("a").await;
    let mut b = TestBackend::start("b").await;
    h.add_healthy(&a.spec("v1")).await;
    h.add_healthy(&b.spec("v1")).await;
    a.stop().await;
    for i in 0..6 {
        let mut conn = tokio::net::TcpStream::connect(h.proxy.listen)
            .await
            .unwrap();
        conn.write_all(
            b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
        let head = read_head(&mut conn).await;
        assert!(head.starts_with("http/1.1 101"), "handshake {i}: {head}");
        conn.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        tokio::time::timeout(DEADLINE, conn.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"ping");
    }
    let stats = h.admin.stats().await.unwrap();
    assert!(stats.backends["a"].retries >= 1, "{stats:?}");
    h.proxy.shutdown().await;
    b.stop().await;
}

#[tokio::test]
async fn an_sse_stream_delivers_its_first_event_before_the_stream_ends() {
    let h = Harness::start(settings(health(Duration::from_millis(20), 1, 2))).await;
    let mut a = TestBackend::start("a").await;
    h.add_healthy(&a.spec("v1")).await;
    let resp = h.send(Method::GET, "/sse", "").await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let first = tokio::time::timeout(DEADLINE, body.frame())
        .await
        .expect("the first event arrives while the stream is open")
        .unwrap()
        .unwrap();
    assert_eq!(
        first.into_data().unwrap(),
        Bytes::from_static(b"data: one\n\n")
    );
    assert_eq!(h.view("a").await.in_flight, 1, "the stream is still open");
    a.release_slow.send(true).unwrap();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(&rest[..], b"data: two\n\n");
    h.proxy.shutdown().await;
    a.stop().await;
}

#[tokio::test]
async fn shutdown_lets_long_lived_streams_run_until_drain_timeout_then_counts_them() {
    let mut s = settings(health(Duration::from_millis(20), 1, 2));
    s.drain_timeout = Duration::from_millis(600);
    let h = Harness::start(s).await;
    let mut a = TestBackend::start("a").await;
    h.add_healthy(&a.spec("v1")).await;
    let resp = h.send(Method::GET, "/sse", "").await;
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    let started = tokio::time::Instant::now();
    let report = h.proxy.shutdown().await;
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "cut before the deadline"
    );
    assert_eq!(report.closed_at_deadline, 1);
    let rest = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .unwrap();
    assert!(rest.is_err(), "a cut stream must not look complete");
    a.stop().await;
}

/// A backend whose responses keep breaking off mid-body fails its clients as surely as one
/// that refuses them: `eject_after` broken bodies in a row take it out, and a whole response
/// in between ends the run.
/// Options that let a test pin requests to one release (see [`Harness::get_pinned`]).
fn pinned() -> ProxyOptions {
    ProxyOptions {
        sticky: Some(cutover::proxy::Sticky::Cookie),
        ..ProxyOptions::default()
    }
}

#[tokio::test]
async fn bodies_that_keep_breaking_off_eject_a_backend() {
    // Checks every 300 ms (they pass: the health path is fine); eject after 3 in a row. "b"
    // stands by so that "a" may be ejected; requests are pinned to "a"'s release.
    let h = Harness::start_with(settings(health(Duration::from_millis(300), 2, 3)), pinned()).await;
    let mut a = TestBackend::start("a").await;
    let mut b = TestBackend::start("b").await;
    h.add_healthy(&a.spec("v1")).await;
    h.add_healthy(&b.spec("v2")).await;
    let broken = || async {
        let resp = h.get_pinned("/truncated", "v1").await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.into_body().collect().await.is_err(), "a cut body");
    };
    broken().await;
    broken().await;
    assert_eq!(h.get_pinned("/", "v1").await.status(), StatusCode::OK);
    broken().await;
    broken().await;
    // A client that leaves mid-stream is no failure of the backend's: it ends the run too.
    let stream = h.get_pinned("/stream", "v1").await;
    assert_eq!(stream.status(), StatusCode::OK);
    let mut body = stream.into_body();
    assert!(body.frame().await.is_some(), "the stream began");
    drop(body);
    tokio::time::sleep(Duration::from_millis(200)).await;
    broken().await;
    broken().await;
    // Longer than the checker takes to judge a break.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let metrics = h.admin.metrics_text().await.unwrap();
    assert!(
        metrics.contains("cutover_ejections_total{backend=\"a\",release=\"v1\"} 0"),
        "a whole response, then an abandoned stream, ended each run; two breaks are not three:\n{metrics}"
    );
    broken().await;
    eventually("ejected after 3 broken bodies in a row", || async {
        h.view("a").await.health == Health::Unhealthy
    })
    .await;
    h.proxy.shutdown().await;
    a.stop().await;
    b.stop().await;
}

/// Streams that break after their backend was ejected (it crashed with them in flight) are
/// history once the active check readmits it: one more break must not eject it again.
#[tokio::test]
async fn a_readmitted_backend_starts_a_new_run_of_failures() {
    let h = Harness::start_with(settings(health(Duration::from_millis(300), 2, 3)), pinned()).await;
    let mut a = TestBackend::start("a").await;
    let mut b = TestBackend::start("b").await;
    h.add_healthy(&a.spec("v1")).await;
    h.add_healthy(&b.spec("v2")).await;
    let broken = |delay: u64| {
        let h = &h;
        async move {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let resp = h.get_pinned("/truncated", "v1").await;
            let _ = resp.into_body().collect().await;
        }
    };
    // Three break together (ejected); two picked 50 ms later break after the ejection.
    futures_util::future::join_all([0, 0, 0, 50, 50].map(broken)).await;
    assert_eq!(h.view("a").await.health, Health::Unhealthy, "ejected");
    h.admin.wait_healthy("a", DEADLINE).await.unwrap();
    broken(0).await;
    // Longer than the checker takes to judge a break; shorter than a readmission.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let metrics = h.admin.metrics_text().await.unwrap();
    assert!(
        metrics.contains("cutover_ejections_total{backend=\"a\",release=\"v1\"} 1"),
        "one break after readmission ejected it again:\n{metrics}"
    );
    h.proxy.shutdown().await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn consecutive_5xx_eject_a_backend_until_one_passing_check_readmits_it() {
    // Checks every 300 ms, 3 passes to admit a new backend; eject after 3 failures in a row.
    let h = Harness::start_with(settings(health(Duration::from_millis(300), 3, 3)), pinned()).await;
    let mut a = TestBackend::start("a").await;
    let mut b = TestBackend::start("b").await;
    h.add_healthy(&a.spec("v1")).await;
    h.add_healthy(&b.spec("v2")).await;
    a.hits.fail.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        let r = h.get_pinned("/", "v1").await;
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
    assert_eq!(h.view("a").await.health, Health::Unhealthy, "ejected");
    assert_eq!(backend_of(h.get_pinned("/", "v1").await).await, "b");
    let metrics = h.admin.metrics_text().await.unwrap();
    assert!(
        metrics.contains("cutover_ejections_total{backend=\"a\",release=\"v1\"} 1"),
        "{metrics}"
    );
    a.hits.fail.store(false, Ordering::SeqCst);
    // Readmitted by its next passing check, not after healthy_threshold (3) of them.
    let ejected_at = tokio::time::Instant::now();
    h.admin.wait_healthy("a", DEADLINE).await.unwrap();
    assert!(
        ejected_at.elapsed() < Duration::from_millis(750),
        "readmission took {:?}",
        ejected_at.elapsed()
    );
    assert_eq!(backend_of(h.get_pinned("/", "v1").await).await, "a");

    // With eject_on_5xx off, 5xx answers never eject.
    h.proxy.shutdown().await;
    let options = ProxyOptions {
        eject_on_5xx: false,
        ..pinned()
    };
    let h = Harness::start_with(settings(health(Duration::from_millis(300), 2, 3)), options).await;
    h.add_healthy(&a.spec("v1")).await;
    h.add_healthy(&b.spec("v2")).await;
    a.hits.fail.store(true, Ordering::SeqCst);
    for _ in 0..6 {
        let r = h.get_pinned("/", "v1").await;
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
    assert_eq!(h.view("a").await.health, Health::Healthy);
    h.proxy.shutdown().await;
    a.stop().await;
    b.stop().await;
}

/// Any client can make a backend answer 5xx (a bad request to a buggy endpoint): that must
/// never empty the pool. With every backend failing, half of them stay in, and the last one
/// always does: its clients get its 500s, not the proxy's 503.
#[tokio::test]
async fn failing_requests_never_eject_the_last_backends_of_a_pool() {
    let h = Harness::start(settings(health(Duration::from_secs(600), 1, 3))).await;
    let mut a = TestBackend::start("a").await;
    let mut b = TestBackend::start("b").await;
    h.add_healthy(&a.spec("v1")).await;
    h.add_healthy(&b.spec("v1")).await;
    a.hits.fail.store(true, Ordering::SeqCst);
    b.hits.fail.store(true, Ordering::SeqCst);
    for _ in 0..20 {
        assert_eq!(h.get("/").await.0, StatusCode::INTERNAL_SERVER_ERROR);
    }
    let healthy = [h.view("a").await.health, h.view("b").await.health]
        .iter()
        .filter(|&&x| x == Health::Healthy)
        .count();
    assert_eq!(healthy, 1, "one of two was ejected, not both");
    let stats = h.admin.stats().await.unwrap();
    assert_eq!(stats.unrouted, 0, "{stats:?}");
    h.proxy.shutdown().await;
    a.stop().await;
    b.stop().await;
}

/// A backend that went quiet may still be working on the request, and trying each backend in
/// turn would make the client wait N times the timeout: a timeout is not retried.
#[tokio::test]
async fn a_backend_that_sends_no_head_in_time_gets_504_after_one_try() {
    let options = with_timeouts(cutover::proxy::Timeouts {
        backend_header: Duration::from_millis(300),
        ..Default::default()
    });
    let h = Harness::start_with(settings(health(Duration::from_secs(600), 1, 1000)), options).await;
    let mut a = TestBackend::start("a").await;
    let mut b = TestBackend::start("b").await;
    h.add_healthy(&a.spec("v1")).await;
    h.add_healthy(&b.spec("v1")).await;
    let started = tokio::time::Instant::now();
    let (status, body) = h.get("/slow").await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::GATEWAY_TIMEOUT, "no backend answered in time\n")
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    let tried =
        a.hits.slow_started.load(Ordering::SeqCst) + b.hits.slow_started.load(Ordering::SeqCst);
    assert_eq!(tried, 1, "a GET that timed out was sent again");
    let stats = h.admin.stats().await.unwrap();
    assert_eq!(stats.total.retries, 0, "{stats:?}");
    // A POST is tried once.
    let resp = h.send(Method::POST, "/slow", "x").await;
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        a.hits.posts.load(Ordering::SeqCst) + b.hits.posts.load(Ordering::SeqCst),
        1
    );
    a.release_slow.send(true).unwrap();
    b.release_slow.send(true).unwrap();
    h.proxy.shutdown().await;
    a.stop().await;
    b.stop().await;
}

/// The head limits hold for HTTP/2 as for HTTP/1.1: too many fields, or a header list over
/// `max_header_bytes`, get a 431 (not a stream reset, which clients retry), answered by the
/// proxy and counted nowhere, like hyper's HTTP/1.1 431. An HTTP/2 client's `Cookie` fields
/// count as the one field the backend gets.
#[tokio::test]
async fn oversized_http2_heads_get_431() {
    let h = Harness::start(settings(health(Duration::from_millis(20), 1, 2))).await;
    // A raw backend: it takes any number of fields, and keeps every head that reached it.
    let b = RawBackend::start(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .await;
    h.add_healthy(&b.spec("b1")).await;
    let h2: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let send = |fields: Vec<(String, String)>| {
        let mut req = Request::get(h.url("/"));
        for (n, v) in fields {
            req = req.header(n, v);
        }
        let req = req.body(Full::new(Bytes::new())).unwrap();
        let h2 = h2.clone();
        async move {
            let resp = tokio::time::timeout(DEADLINE, h2.request(req))
                .await
                .expect("the proxy answers in time")
                .expect("the proxy answers");
            assert_eq!(resp.version(), hyper::Version::HTTP_2);
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };
    // The proxy's own answer, not HTTP/2's (a bodiless 431 followed by a stream reset).
    let too_large = (
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "request header fields too large\n".to_string(),
    );
    let many = (0..200).map(|i| (format!("x-h{i}"), "v".into())).collect();
    assert_eq!(send(many).await, too_large);
    let big = vec![("x-big".into(), "a".repeat(70_000))];
    assert_eq!(send(big).await, too_large);
    assert_eq!(
        b.heads(),
        Vec::<String>::new(),
        "an oversized head was forwarded"
    );
    let cookies = (0..150)
        .map(|i| ("cookie".into(), format!("c{i}=v")))
        .collect();
    assert_eq!(send(cookies).await.0, StatusCode::OK);
    assert_eq!(b.heads().len(), 1);
    let stats = h.admin.stats().await.unwrap();
    assert_eq!(
        (stats.unrouted, stats.total.proxy_errors),
        (0, 0),
        "{stats:?}"
    );
    h.proxy.shutdown().await;
}

#[tokio::test]
async fn oversized_heads_get_431_and_garbage_gets_400() {
    use tokio::io::AsyncWriteExt;
    let h = Harness::start(settings(health(Duration::from_millis(20), 1, 2))).await;
    let mut b = TestBackend::start("b1").await;
    h.add_healthy(&b.spec("v1")).await;

    let big = format!(
        "GET / HTTP/1.1\r\nHost: app\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = format!("GET / HTTP/1.1\r\nHost: app\r\n{many}\r\n");
    for (what, bytes, want) in [
        ("a 70 kB header", big.into_bytes(), "http/1.1 431"),
        ("150 header fields", many.into_bytes(), "http/1.1 431"),
        (
            "garbage",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1garbage\r\n\r\n".to_vec(),
            "http/1.1 400",
        ),
        (
            "a bad request line",
            b"GET /a b c d\r\n\r\n".to_vec(),
            "http/1.1 400",
        ),
    ] {
        let mut conn = tokio::net::TcpStream::connect(h.proxy.listen)
            .await
            .unwrap();
        let _ = conn.write_all(&bytes).await;
        let head = read_head(&mut conn).await;
        assert!(head.starts_with(want), "{what}: {head}");
    }
    assert_eq!(b.requests(), 0, "nothing malformed reached the backend");
    assert_eq!(
        h.get("/").await.0,
        StatusCode::OK,
        "the listener still serves"
    );
    h.proxy.shutdown().await;
    b.stop().await;
}

/// A small deterministic generator (xorshift64*), so a failing case can be replayed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[tokio::test]
async fn random_bytes_never_break_the_listener_or_the_admin_api() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let panics = Arc::new(AtomicU64::new(0));
    {
        let panics = panics.clone();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            panics.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    }
    let h = Harness::start(settings(health(Duration::from_millis(20), 1, 2))).await;
    let mut b = TestBackend::start("b1").await;
    h.add_healthy(&b.spec("v1")).await;
    let prefixes: [&[u8]; 6] = [
        b"",
        b"GET / HTTP/1.1\r\n",
        b"POST /backends HTTP/1.1\r\nHost: a\r\nContent-Length: 40\r\n",
        b"GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: ",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n",
    ];
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    for i in 0..400 {
        let target = if i % 2 == 0 {
            h.proxy.listen
        } else {
            h.proxy.admin
        };
        let mut input = prefixes[(rng.next() % prefixes.len() as u64) as usize].to_vec();
        let n = (rng.next() % 600) as usize;
        input.extend(rng.bytes(n));
        if rng.next() % 2 == 0 {
            input.extend_from_slice(b"\r\n\r\n");
        }
        let mut conn = tokio::net::TcpStream::connect(target).await.unwrap();
        let _ = conn.write_all(&input).await;
        let _ = conn.shutdown().await;
        let mut answer = Vec::new();
        let read = tokio::time::timeout(DEADLINE, conn.read_to_end(&mut answer)).await;
        assert!(
            read.is_ok(),
            "case {i}: the connection neither answered nor closed"
        );
        let text = String::from_utf8_lossy(&answer);
        assert!(!text.starts_with("HTTP/1.1 500"), "case {i}: {text}");
    }
    assert_eq!(panics.load(Ordering::SeqCst), 0, "a panic happened");
    assert_eq!(h.get("/").await.0, StatusCode::OK);
    let (status, _) = admin_raw(h.proxy.admin, Method::GET, "/backends", Some(TOKEN), "").await;
    assert_eq!(status, StatusCode::OK);
    h.proxy.shutdown().await;
    b.stop().await;
}

#[tokio::test]
async fn a_quiet_stream_outlives_the_idle_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let options = with_timeouts(cutover::proxy::Timeouts {
        client_idle: Duration::from_millis(200),
        ..Default::default()
    });
    let h = Harness::start_with(settings(health(Duration::from_millis(20), 1, 2)), options).await;
    let mut b = TestBackend::start("b1").await;
    h.add_healthy(&b.spec("v1")).await;
    let mut conn = tokio::net::TcpStream::connect(h.proxy.listen)
        .await
        .unwrap();
    conn.write_all(b"GET /stream HTTP/1.1\r\nHost: app\r\n\r\n")
        .await
        .unwrap();
    assert!(read_head(&mut conn).await.starts_with("http/1.1 200"));
    // The first event, then nothing for five idle periods: still open (it was cut after two).
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(DEADLINE, conn.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("first"));
    let quiet = tokio::time::timeout(Duration::from_millis(1_000), conn.read(&mut buf)).await;
    assert!(
        quiet.is_err(),
        "the stream was closed while quiet: {quiet:?}"
    );
    // An idle keep-alive connection still goes.
    let mut idle = tokio::net::TcpStream::connect(h.proxy.listen)
        .await
        .unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
        .await
        .unwrap();
    assert!(read_head(&mut idle).await.starts_with("http/1.1 200"));
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, idle.read_to_end(&mut rest))
        .await
        .expect("an idle connection is closed")
        .unwrap();
    h.proxy.shutdown().await;
    b.stop().await;
}

/// Size of `/big`: far more than socket buffers hold.
const BIG: usize = 16 << 20;

#[tokio::test]
async fn a_client_that_stops_reading_is_idle_and_cut() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let options = with_timeouts(cutover::proxy::Timeouts {
        client_idle: Duration::from_millis(200),
        ..Default::default()
    });
    let h = Harness::start_with(settings(health(Duration::from_millis(20), 1, 2)), options).await;
    let mut b = TestBackend::start("b1").await;
    h.add_healthy(&b.spec("v1")).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut conn = socket.connect(h.proxy.listen).await.unwrap();
    conn.write_all(b"GET /big HTTP/1.1\r\nHost: app\r\n\r\n")
        .await
        .unwrap();
    // Not reading for many idle periods: the proxy gives up on this client.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, conn.read_to_end(&mut got))
        .await
        .expect("the connection ends");
    assert!(
        got.len() < BIG,
        "cut, not delivered whole: {} bytes",
        got.len()
    );
    h.proxy.shutdown().await;
    b.stop().await;
}

#[tokio::test]
async fn connections_over_the_limit_get_503_and_slow_heads_are_cut() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let options = ProxyOptions {
        limits: cutover::proxy::Limits {
            max_connections: 2,
            ..Default::default()
        },
        timeouts: cutover::proxy::Timeouts {
            client_header: Duration::from_millis(300),
            client_idle: Duration::from_millis(400),
            ..Default::default()
        },
        ..ProxyOptions::default()
    };
    let h = Harness::start_with(settings(health(Duration::from_millis(20), 1, 2)), options).await;
    let mut b = TestBackend::start("b1").await;
    h.add_healthy(&b.spec("v1")).await;

    let mut one = tokio::net::TcpStream::connect(h.proxy.listen)
        .await
        .unwrap();
    let mut two = tokio::net::TcpStream::connect(h.proxy.listen)
        .await
        .unwrap();
    // A slow head: half a request line, then nothing.
    one.write_all(b"GET / HT").await.unwrap();
    two.write_all(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
        .await
        .unwrap();
    assert!(read_head(&mut two).await.starts_with("http/1.1 200"));
    let mut third = tokio::net::TcpStream::connect(h.proxy.listen)
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, third.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 503") && answer.ends_with("too many connections\n"),
        "{answer}"
    );

    // The slow head is cut by client_header_timeout, the idle keep-alive one by the idle
    // timeout; after that, a new connection is served.
    let started = tokio::time::Instant::now();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, one.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250));
    let _ = tokio::time::timeout(DEADLINE, two.read_to_end(&mut rest))
        .await
        .unwrap();
    eventually("a connection slot to free up", || async {
        let mut c = tokio::net::TcpStream::connect(h.proxy.listen)
            .await
            .unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        read_head(&mut c).await.starts_with("http/1.1 200")
    })
    .await;
    h.proxy.shutdown().await;
    b.stop().await;
}

/// Regression: a connection over `max_connections` was answered 503 (or, with TLS, closed)
/// and counted nowhere, so clients got thousands of 503s while the proxy's counters and the
/// deploy's report said 0 failed. It is the proxy's own answer: failed, not attributed to a
/// release, in `/stats` (what a deploy reads) and in `/metrics`.
async fn refusals_count_as_failed(tls: bool) {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let net = if tls { "127.0.92" } else { "127.0.93" };
    let mut settings = settings(health(Duration::from_millis(20), 1, 2));
    settings.listen = format!("{net}.1:0").parse().unwrap();
    settings.admin = format!("{net}.2:0").parse().unwrap();
    let options = ProxyOptions {
        limits: cutover::proxy::Limits {
            max_connections: 1,
            ..Default::default()
        },
        tls: tls.then(|| {
            let (cert, key) = test_certificate(dir.path());
            cutover::proxy::TlsFiles { cert, key }
        }),
        ..ProxyOptions::default()
    };
    let h = Harness::start_with(settings, options).await;
    let mut b = TestBackend::start_on("b1", format!("{net}.3:0").parse().unwrap()).await;
    h.add_healthy(&b.spec("v1")).await;
    let before = h.admin.stats().await.unwrap();
    // The one place, held by a connection that has sent nothing yet.
    let held = tokio::net::TcpStream::connect(h.proxy.listen)
        .await
        .unwrap();
    for _ in 0..3 {
        let mut c = tokio::net::TcpStream::connect(h.proxy.listen)
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, c.read_to_end(&mut answer))
            .await
            .expect("refused at once");
        let answer = String::from_utf8_lossy(&answer);
        assert_eq!(answer.starts_with("HTTP/1.1 503"), !tls, "{answer}");
    }
    let after = h.admin.stats().await.unwrap();
    assert_eq!(after.unrouted - before.unrouted, 3, "{after:?}");
    let (served, failed, by_release) = cutover::deploy::traffic_between(&before, &after);
    assert_eq!((served, failed), (3, 3));
    assert!(by_release.is_empty(), "{by_release:?}");
    let (_, metrics) = admin_raw(h.proxy.admin, Method::GET, "/metrics", Some(TOKEN), "").await;
    assert!(
        metrics.lines().any(|l| l == "cutover_unrouted_total 3"),
        "{metrics}"
    );
    drop(held);
    h.proxy.shutdown().await;
    b.stop().await;
}

#[tokio::test]
async fn connections_refused_over_the_limit_count_as_failed() {
    refusals_count_as_failed(false).await;
}

#[tokio::test]
async fn tls_connections_closed_over_the_limit_count_as_failed() {
    refusals_count_as_failed(true).await;
}

/// Default proxy options but for `timeouts`.
fn with_timeouts(timeouts: cutover::proxy::Timeouts) -> ProxyOptions {
    ProxyOptions {
        timeouts,
        ..ProxyOptions::default()
    }
}

/// A proxy whose `client_header_timeout` is short (returned) and whose idle timeout is not.
async fn short_header_timeout() -> (Harness, Duration) {
    let header = Duration::from_millis(300);
    let options = with_timeouts(cutover::proxy::Timeouts {
        client_header: header,
        client_idle: Duration::from_secs(20),
        ..Default::default()
    });
    let h = Harness::start_with(settings(health(Duration::from_millis(20), 1, 2)), options).await;
    (h, header)
}

/// An HTTP/2 connection that sends its preface but no request (a browser's pre-opened
/// connection) is closed at the first request's deadline with a GOAWAY that says no stream
/// was taken, so its client sends the next request elsewhere instead of seeing a reset.
#[tokio::test]
async fn an_http2_connection_with_no_request_gets_a_goaway_at_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (h, header) = short_header_timeout().await;
    let mut c = tokio::net::TcpStream::connect(h.proxy.listen)
        .await
        .unwrap();
    // The client preface, then an empty SETTINGS frame.
    c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    // Frames: 3 bytes length, 1 type, 1 flags, 4 stream id. A graceful close is a GOAWAY
    // with the largest stream id and a PING; once the PING is answered (as every client does),
    // the GOAWAY that names the last stream taken: none, 0.
    let started = tokio::time::Instant::now();
    let mut goaways = Vec::new();
    let mut got: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = c.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            got.extend_from_slice(&buf[..n]);
            while got.len() >= 9 {
                let len =
                    usize::from(got[0]) << 16 | usize::from(got[1]) << 8 | usize::from(got[2]);
                if got.len() < 9 + len {
                    break;
                }
                let frame: Vec<u8> = got.drain(..9 + len).collect();
                let (kind, flags, payload) = (frame[3], frame[4], &frame[9..]);
                if kind == 7 && payload.len() >= 4 {
                    let id = [payload[0], payload[1], payload[2], payload[3]];
                    goaways.push(u32::from_be_bytes(id) & 0x7fff_ffff);
                }
                if kind == 6 && flags & 1 == 0 {
                    let mut ack = vec![0, 0, 8, 6, 1, 0, 0, 0, 0];
                    ack.extend_from_slice(payload);
                    let _ = c.write_all(&ack).await;
                }
            }
        }
    })
    .await;
    let closed_after = started.elapsed();
    assert!(read.is_ok(), "still open after {closed_after:?}");
    assert!(
        closed_after >= header - Duration::from_millis(50),
        "closed after {closed_after:?}, before client_header"
    );
    assert_eq!(goaways.last(), Some(&0), "GOAWAYs: {goaways:?}");
    h.proxy.shutdown().await;
}

#[tokio::test]
async fn a_connection_that_never_sends_a_byte_is_closed_at_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (h, header) = short_header_timeout().await;
    let mut b = TestBackend::start("b1").await;
    h.add_healthy(&b.spec("v1")).await;

    // A request whose head came in time is not cut by the first head's deadline, however long
    // its backend takes.
    let mut busy = tokio::net::TcpStream::connect(h.proxy.listen)
        .await
        .unwrap();
    busy.write_all(b"GET /slow HTTP/1.1\r\nHost: app\r\n\r\n")
        .await
        .unwrap();
    let mut silent = tokio::net::TcpStream::connect(h.proxy.listen)
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut got)).await;
    let closed_after = started.elapsed();
    assert!(
        read.is_ok(),
        "a silent connection still open after {closed_after:?} (client_header {header:?})"
    );
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    assert!(
        closed_after >= header - Duration::from_millis(50),
        "closed after {closed_after:?}, before client_header"
    );
    eventually("the slow request to reach the backend", || async {
        b.hits.slow_started.load(Ordering::SeqCst) == 1
    })
    .await;
    b.release_slow.send(true).unwrap();
    assert!(read_head(&mut busy).await.starts_with("http/1.1 200"));
    h.proxy.shutdown().await;
    b.stop().await;
}

/// A connection over the limit: its whole answer (the proxy closes it at once).
async fn refused(h: &Harness) -> String {
    use tokio::io::AsyncReadExt;
    let mut c = tokio::net::TcpStream::connect(h.proxy.listen)
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, c.read_to_end(&mut answer))
        .await
        .expect("a connection past max_connections is answered and closed at once, not served")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_websocket_tunnel_counts_against_max_connections_until_it_closes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let options = ProxyOptions {
        limits: cutover::proxy::Limits {
            max_connections: 1,
            ..Default::default()
        },
        ..ProxyOptions::default()
    };
    let h = Harness::start_with(settings(health(Duration::from_millis(20), 1, 2)), options).await;
    let mut b = TestBackend::start("b1").await;
    h.add_healthy(&b.spec("v1")).await;

    let mut tunnel = tokio::net::TcpStream::connect(h.proxy.listen)
        .await
        .unwrap();
    tunnel
        .write_all(b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    assert!(read_head(&mut tunnel).await.starts_with("http/1.1 101"));
    // An echo through the tunnel: hyper has handed the connection over by now, so its
    // connection future has ended; the tunnel lives on.
    tunnel.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(DEADLINE, tunnel.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping");

    // The tunnel still holds the only place, however many times a client tries.
    for i in 0..3 {
        let answer = refused(&h).await;
        assert!(
            answer.starts_with("HTTP/1.1 503") && answer.ends_with("too many connections\n"),
            "attempt {i} while the tunnel is open: {answer:?}"
        );
    }
    // The tunnel still works, then the client closes it: the place is free again.
    tunnel.write_all(b"pong").await.unwrap();
    tokio::time::timeout(DEADLINE, tunnel.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"pong");
    drop(tunnel);
    eventually("the tunnel's place to free up", || async {
        let mut c = tokio::net::TcpStream::connect(h.proxy.listen)
            .await
            .unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        read_head(&mut c).await.starts_with("http/1.1 200")
    })
    .await;
    h.proxy.shutdown().await;
    b.stop().await;
}

/// A tunnel holds a `max_connections` place: one with nothing moving either way for
/// `client_idle` is closed (one that keeps talking is not), so idle WebSockets cannot fill
/// the places for good.
#[tokio::test]
async fn an_idle_websocket_tunnel_is_closed_after_client_idle() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let options = with_timeouts(cutover::proxy::Timeouts {
        client_idle: Duration::from_millis(400),
        ..Default::default()
    });
    let h = Harness::start_with(settings(health(Duration::from_millis(20), 1, 2)), options).await;
    let mut b = TestBackend::start("b1").await;
    h.add_healthy(&b.spec("v1")).await;
    let mut tunnel = tokio::net::TcpStream::connect(h.proxy.listen)
        .await
        .unwrap();
    tunnel
        .write_all(b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    assert!(read_head(&mut tunnel).await.starts_with("http/1.1 101"));
    // Talking every 150 ms for 1.2 s: three times client_idle, never idle that long.
    let mut buf = [0u8; 4];
    let mut last_echo = std::time::Instant::now();
    for i in 0..8 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        tunnel.write_all(b"ping").await.unwrap();
        tokio::time::timeout(DEADLINE, tunnel.read_exact(&mut buf))
            .await
            .expect("the tunnel still echoes")
            .expect("the tunnel is open while it talks");
        last_echo = std::time::Instant::now();
    }
    // Then silence: closed by the proxy (end of stream), well before the deadline.
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, tunnel.read_to_end(&mut rest))
        .await
        .expect("an idle tunnel is closed")
        .unwrap();
    assert!(
        last_echo.elapsed() >= Duration::from_millis(350),
        "closed {:?} after the last bytes, before client_idle",
        last_echo.elapsed()
    );
    h.proxy.shutdown().await;
    b.stop().await;
}

#[tokio::test]
async fn request_bodies_stream_through_without_buffering() {
    let h = Harness::start(settings(health(Duration::from_millis(20), 1, 2))).await;
    let mut b = TestBackend::start("b1").await;
    h.add_healthy(&b.spec("v1")).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let client: Client<HttpConnector, TestBody> =
        Client::builder(TokioExecutor::new()).build_http();
    tx.send(Bytes::from_static(b"first chunk")).await.unwrap();
    let req = Request::post(h.url("/echo-first"))
        .body(TestBody::Chunks(rx))
        .unwrap();
    // The body is still open: the answer can only come if the first chunk went through alone.
    let resp = tokio::time::timeout(DEADLINE, client.request(req))
        .await
        .expect("the backend answered before the request body ended")
        .unwrap();
    let mut resp_body = resp.into_body();
    let first = resp_body
        .frame()
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(&first[..], b"first chunk");
    tx.send(Bytes::from_static(b", second")).await.unwrap();
    drop(tx);
    let rest = resp_body.collect().await.unwrap().to_bytes();
    assert_eq!(&rest[..], b", second");
    h.proxy.shutdown().await;
    b.stop().await;
}

/// A client that closes in the middle of its upload is not the backend's failure: it must not
/// count as a proxy error (analysis fails a canary on those) nor towards passive ejection.
#[tokio::test]
async fn a_client_that_breaks_its_upload_off_is_no_backend_failure() {
    use tokio::io::AsyncWriteExt;
    let options = ProxyOptions {
        eject_after: Some(1),
        ..ProxyOptions::default()
    };
    let h = Harness::start_with(settings(health(Duration::from_secs(600), 1, 3)), options).await;
    let mut a = TestBackend::start("a").await;
    let mut b = TestBackend::start("b").await;
    h.add_healthy(&a.spec("v1")).await;
    h.add_healthy(&b.spec("v1")).await;
    let mut conn = tokio::net::TcpStream::connect(h.proxy.listen)
        .await
        .unwrap();
    conn.write_all(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\nfirst part")
        .await
        .unwrap();
    eventually("the upload reached a backend", || async {
        a.requests() + b.requests() == 1
    })
    .await;
    // The client gives up: the proxy reads the end of its stream 990 bytes early.
    conn.shutdown().await.unwrap();
    eventually("the proxy saw the upload end", || async {
        let m = h.admin.metrics_text().await.unwrap();
        let errors = h.admin.stats().await.unwrap().total.proxy_errors;
        m.contains("cutover_client_aborted_total 1") || errors > 0
    })
    .await;
    let stats = h.admin.stats().await.unwrap();
    assert_eq!(stats.total.proxy_errors, 0, "{stats:?}");
    assert_eq!(stats.total.abandoned, 0, "{stats:?}");
    let m = h.admin.metrics_text().await.unwrap();
    assert!(m.contains("cutover_client_aborted_total 1"), "{m}");
    assert_eq!(h.view("a").await.health, Health::Healthy);
    assert_eq!(h.view("b").await.health, Health::Healthy);
    h.proxy.shutdown().await;
    a.stop().await;
    b.stop().await;
}

/// A client that gives up while a stalled backend keeps it waiting got nothing: the deploy's
/// proof counts the request as failed instead of not at all (hyper drops the request's future,
/// so no status, error or 502 is ever counted for it). Unlike a broken-off upload, this is the
/// backend's failure.
#[tokio::test]
async fn a_request_its_client_gives_up_on_counts_as_failed() {
    use tokio::io::AsyncWriteExt;
    let h = Harness::start(settings(health(Duration::from_secs(600), 1, 3))).await;
    let mut a = TestBackend::start("a").await;
    h.add_healthy(&a.spec("v1")).await;
    let before = h.admin.stats().await.unwrap();
    // A GET, and a POST whose body was sent whole: both wait on the backend when dropped.
    let requests: [&[u8]; 2] = [
        b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n",
        b"POST /slow HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nbody",
    ];
    for (i, request) in requests.into_iter().enumerate() {
        let mut conn = tokio::net::TcpStream::connect(h.proxy.listen)
            .await
            .unwrap();
        conn.write_all(request).await.unwrap();
        let started = i as u64 + 1;
        eventually("the request to reach the backend", || async {
            a.hits.slow_started.load(Ordering::SeqCst) == started
        })
        .await;
        drop(conn);
        eventually("the proxy to see the client leave", || async {
            h.admin.stats().await.unwrap().total.abandoned == started
        })
        .await;
    }
    let stats = h.admin.stats().await.unwrap();
    assert_eq!(stats.backends["a"].abandoned, 2, "{stats:?}");
    assert_eq!(stats.releases["v1"].abandoned, 2, "{stats:?}");
    assert_eq!(
        (stats.total.proxy_errors, stats.unrouted),
        (0, 0),
        "{stats:?}"
    );
    let (served, failed, by_release) = cutover::deploy::traffic_between(&before, &stats);
    assert_eq!((served, failed), (2, 2), "{stats:?}");
    assert_eq!(by_release.get("v1"), Some(&2));
    // Their wait is in the latency the analysis judges: left out, a release whose slow
    // requests were all given up on had a fast p99.
    let timed = |s: &cutover::balancer::Stats| s.releases["v1"].latency_buckets.iter().sum::<u64>();
    assert_eq!(timed(&stats) - timed(&before), 2, "{stats:?}");
    let m = h.admin.metrics_text().await.unwrap();
    assert!(m.contains("cutover_client_aborted_total 0"), "{m}");
    for line in [
        "cutover_abandoned_total{backend=\"a\",release=\"v1\"} 2",
        "cutover_release_abandoned_total{release=\"v1\"} 2",
    ] {
        assert!(m.contains(line), "{line} missing from\n{m}");
    }
    // The client's patience is no evidence against the backend: passive health leaves it.
    assert_eq!(h.view("a").await.health, Health::Healthy);
    a.release_slow.send(true).unwrap();
    h.proxy.shutdown().await;
    a.stop().await;
}

/// The backend's head and send timeouts are the backend's time: an upload slower than both is
/// answered.
#[tokio::test]
async fn a_slow_upload_does_not_count_against_the_backend_head_timeout() {
    use tokio::io::AsyncWriteExt;
    let options = with_timeouts(cutover::proxy::Timeouts {
        backend_header: Duration::from_millis(300),
        backend_send: Duration::from_millis(300),
        ..Default::default()
    });
    let h = Harness::start_with(settings(health(Duration::from_secs(600), 1, 3)), options).await;
    let mut a = TestBackend::start("a").await;
    h.add_healthy(&a.spec("v1")).await;
    let mut conn = tokio::net::TcpStream::connect(h.proxy.listen)
        .await
        .unwrap();
    conn.write_all(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nfirst")
        .await
        .unwrap();
    // The client is slow (the point of this test): twice the backend's head timeout.
    tokio::time::sleep(Duration::from_millis(600)).await;
    conn.write_all(b"-last").await.unwrap();
    let head = read_head(&mut conn).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let stats = h.admin.stats().await.unwrap();
    assert_eq!(stats.total.proxy_errors, 0, "{stats:?}");
    h.proxy.shutdown().await;
    a.stop().await;
}

/// A backend that stops reading an upload leaves a chunk of it in the proxy's hands: after
/// `backend_send_timeout` the client gets 504 (instead of hanging until `client_idle_timeout`
/// and a reset), counted as the backend's failed request, not as a client that went away.
#[tokio::test]
async fn a_backend_that_stops_reading_an_upload_gets_504_after_the_send_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let send = Duration::from_millis(300);
    let options = with_timeouts(cutover::proxy::Timeouts {
        backend_send: send,
        // Without the send timeout, the client would be cut here with no answer.
        client_idle: Duration::from_secs(3),
        ..Default::default()
    });
    let h = Harness::start_with(settings(health(Duration::from_secs(600), 1, 3)), options).await;
    let stuck = RawBackend::start_answering(None).await;
    h.add_healthy(&stuck.spec("a")).await;
    let before = h.admin.stats().await.unwrap();
    // More than the loopback socket buffers and hyper's write buffer hold between the two.
    const UPLOAD: usize = 64 << 20;
    let conn = tokio::net::TcpStream::connect(h.proxy.listen)
        .await
        .unwrap();
    let (mut read, mut write) = conn.into_split();
    let started = tokio::time::Instant::now();
    let upload = tokio::spawn(async move {
        let head = format!("POST /hang HTTP/1.1\r\nHost: t\r\nContent-Length: {UPLOAD}\r\n\r\n");
        write.write_all(head.as_bytes()).await?;
        let chunk = vec![b'x'; 64 << 10];
        for _ in 0..UPLOAD / chunk.len() {
            write.write_all(&chunk).await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let head = tokio::time::timeout(DEADLINE, async {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && read.read(&mut byte).await.unwrap_or(0) == 1 {
            head.push(byte[0]);
        }
        String::from_utf8_lossy(&head).to_lowercase()
    })
    .await
    .expect("the proxy answers the stuck upload in time");
    assert!(head.starts_with("http/1.1 504"), "{head:?}");
    assert!(started.elapsed() >= send, "{:?}", started.elapsed());
    // The client connection ends with the answer, not at `client_idle_timeout`: the proxy
    // drops the body it was trying to pass on.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(2), read.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the connection stayed open after the 504");
    upload.abort();
    assert_eq!(stuck.heads().len(), 1, "{:?}", stuck.heads());
    let stats = h.admin.stats().await.unwrap();
    assert_eq!(stats.backends["a"].proxy_errors, 1, "{stats:?}");
    assert_eq!(stats.total.abandoned, 0, "{stats:?}");
    let (_, failed, _) = cutover::deploy::traffic_between(&before, &stats);
    assert_eq!(failed, 1, "{stats:?}");
    let m = h.admin.metrics_text().await.unwrap();
    assert!(m.contains("cutover_client_aborted_total 0"), "{m}");
    h.proxy.shutdown().await;
}

#[tokio::test]
async fn metrics_report_requests_latency_in_flight_state_and_retries() {
    let h = Harness::start(settings(health(Duration::from_secs(600), 1, 1000))).await;
    let mut a = TestBackend::start("a").await;
    let mut b = TestBackend::start("b").await;
    h.add_healthy(&a.spec("v1")).await;
    h.add_healthy(&b.spec("v2")).await;
    a.stop().await; // a's GETs are retried on b
    for _ in 0..10 {
        assert_eq!(h.get("/").await.0, StatusCode::OK);
    }
    h.admin.drain("a").await.unwrap();
    let m = h.admin.metrics_text().await.unwrap();
    for want in [
        "# TYPE cutover_requests_total counter",
        "cutover_requests_total{backend=\"b\",release=\"v2\",class=\"2xx\"} 10",
        "cutover_release_requests_total{release=\"v2\",class=\"2xx\"} 10",
        "# TYPE cutover_request_duration_seconds histogram",
        "cutover_request_duration_seconds_bucket{release=\"v2\",le=\"+Inf\"} 10",
        "cutover_request_duration_seconds_count{release=\"v2\"} 10",
        "cutover_in_flight{backend=\"b\",release=\"v2\"} 0",
        "cutover_backend_state{backend=\"a\",state=\"draining\"} 1",
        "cutover_backend_state{backend=\"a\",state=\"active\"} 0",
        "cutover_backend_healthy{backend=\"b\",release=\"v2\"} 1",
        "cutover_ejections_total{backend=\"a\",release=\"v1\"} 0",
        "cutover_unrouted_total 0",
    ] {
        assert!(m.contains(want), "missing {want:?} in\n{m}");
    }
    let retries = m
        .lines()
        .find(|l| l.starts_with("cutover_retries_total{backend=\"a\""))
        .unwrap();
    assert!(!retries.ends_with(" 0"), "{retries}");
    // Every sample line is `name{labels} value` or `name value`.
    for l in m.lines().filter(|l| !l.starts_with('#')) {
        let (_, v) = l.rsplit_once(' ').unwrap();
        assert!(v.parse::<f64>().is_ok(), "{l}");
    }
    let (status, _) = admin_raw(h.proxy.admin, Method::GET, "/metrics", None, "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    h.proxy.shutdown().await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Admin API additions: switch, weights, samples, histogram, preview, stickiness

#[tokio::test]
async fn switch_moves_traffic_in_one_step_and_refuses_unknown_ids() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(health(Duration::from_millis(20), 1, 2));
    s.state_file = Some(dir.path().join("routes.json"));
    let h = Harness::start(s).await;
    let mut blue = TestBackend::start("blue").await;
    let mut green = TestBackend::start("green").await;
    h.add_healthy(&blue.spec("v1")).await;
    let mut g = green.spec("v2");
    g.preview = true;
    h.add_healthy(&g).await;
    assert_eq!(h.view("green").await.state, BackendState::Preview);
    for _ in 0..5 {
        assert_eq!(h.get("/").await.1, "blue\n");
    }
    let req = SwitchRequest {
        activate: vec!["green".into()],
        standby: vec!["blue".into(), "nope".into()],
    };
    let e = format!("{:#}", h.admin.switch(&req).await.unwrap_err());
    assert!(e.contains("404") && e.contains("nope"), "{e}");
    assert_eq!(
        h.view("green").await.state,
        BackendState::Preview,
        "nothing changed"
    );

    let req = SwitchRequest {
        activate: vec!["green".into()],
        standby: vec!["blue".into()],
    };
    let report = h.admin.switch(&req).await.unwrap();
    assert!(
        report.took_us < 1_000_000 && report.at_unix_ms > 0,
        "{report:?}"
    );
    assert_eq!(h.view("green").await.state, BackendState::Active);
    assert_eq!(h.view("blue").await.state, BackendState::Draining);
    for _ in 0..5 {
        assert_eq!(h.get("/").await.1, "green\n");
    }
    // Persisted: a restarted proxy keeps the switch.
    h.proxy.shutdown().await;
    let mut s = settings(health(Duration::from_millis(20), 1, 2));
    s.state_file = Some(dir.path().join("routes.json"));
    let h = Harness::start(s).await;
    assert_eq!(h.view("green").await.state, BackendState::Active);
    assert_eq!(h.view("blue").await.state, BackendState::Draining);
    // Through the trait too (the inherent method shadows it on AdminClient).
    let back = SwitchRequest {
        activate: vec!["blue".into()],
        standby: vec!["green".into()],
    };
    Balancer::switch(&h.admin, &back).await.unwrap();
    assert_eq!(h.view("blue").await.state, BackendState::Active);
    h.proxy.shutdown().await;
    blue.stop().await;
    green.stop().await;
}

#[tokio::test]
async fn weights_are_set_together_or_not_at_all() {
    let h = Harness::start(settings(health(Duration::from_millis(20), 1, 2))).await;
    let mut a = TestBackend::start("a").await;
    let mut b = TestBackend::start("b").await;
    h.add_healthy(&a.spec("v1")).await;
    h.add_healthy(&b.spec("v2")).await;
    let bad = BTreeMap::from([("a".to_string(), 1), ("ghost".to_string(), 5)]);
    assert!(format!("{:#}", h.admin.set_weights(&bad).await.unwrap_err()).contains("404"));
    assert_eq!(h.view("a").await.spec.weight, 100, "nothing changed");
    let w = BTreeMap::from([("a".to_string(), 1), ("b".to_string(), 3)]);
    h.admin.set_weights(&w).await.unwrap();
    let mut seen = BTreeMap::<String, u32>::new();
    for _ in 0..40 {
        *seen.entry(h.get("/").await.1).or_default() += 1;
    }
    assert_eq!((seen["a\n"], seen["b\n"]), (10, 30));
    h.proxy.shutdown().await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn samples_and_latency_buckets_survive_backend_removal() {
    let h = Harness::start(settings(health(Duration::from_millis(20), 1, 2))).await;
    let mut a = TestBackend::start("a").await;
    h.add_healthy(&a.spec("v1")).await;
    for _ in 0..7 {
        assert_eq!(h.get("/").await.0, StatusCode::OK);
    }
    let stats = h.admin.stats().await.unwrap();
    let buckets = &stats.backends["a"].latency_buckets;
    assert_eq!(
        buckets.len(),
        cutover::balancer::api::LATENCY_BUCKETS_MS.len() + 1
    );
    assert_eq!(buckets.iter().sum::<u64>(), 7);
    h.admin.drain("a").await.unwrap();
    h.admin.wait_drained("a", DEADLINE).await.unwrap();
    h.admin.remove("a").await.unwrap();

    let stats = h.admin.stats().await.unwrap();
    assert_eq!(stats.releases["v1"].latency_buckets.iter().sum::<u64>(), 7);
    let all = h.admin.samples("v1", 100).await.unwrap();
    assert_eq!(all.len(), 7);
    assert!(all.iter().all(|us| *us > 0 && *us < 10_000_000), "{all:?}");
    assert_eq!(
        h.admin.samples("v1", 3).await.unwrap(),
        all[4..].to_vec(),
        "the newest, oldest first"
    );
    let e = format!("{:#}", h.admin.samples("v9", 3).await.unwrap_err());
    assert!(e.contains("404") && e.contains("v9"), "{e}");
    let (status, _) = admin_raw(
        h.proxy.admin,
        Method::GET,
        "/samples?max=x",
        Some(TOKEN),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    h.proxy.shutdown().await;
    a.stop().await;
}

/// `/samples?since_ms=..&until_ms=..` answers what a release recorded between two `/stats`
/// snapshots (their `at_ms`), thinned evenly when asked for fewer, and from when that is whole.
#[tokio::test]
async fn samples_of_the_stretch_between_two_snapshots() {
    let h = Harness::start(settings(health(Duration::from_millis(20), 1, 2))).await;
    let mut a = TestBackend::start("a").await;
    h.add_healthy(&a.spec("v1")).await;
    // Sample times count in 10 ms ticks: each snapshot is more than a tick away from the
    // requests on either side of it. (No event to observe: the clock has to move on.)
    let tick = || tokio::time::sleep(Duration::from_millis(25));
    let mut snapshots = Vec::new();
    for n in [3, 6, 2] {
        for _ in 0..n {
            assert_eq!(h.get("/").await.0, StatusCode::OK);
        }
        tick().await;
        snapshots.push(h.admin.stats().await.unwrap().at_ms);
        tick().await;
    }
    let (first, second) = (snapshots[0], snapshots[1]);
    assert!(first > 0 && second > first, "{snapshots:?}");
    let all = h.admin.samples("v1", 100).await.unwrap();
    assert_eq!(all.len(), 11);
    let window = |max| SampleWindow {
        since_ms: first,
        until_ms: second,
        max,
    };
    let s = h.admin.sample_window("v1", &window(100)).await.unwrap();
    assert_eq!(
        (s.latencies_us.as_slice(), s.from_ms),
        (&all[3..9], Some(first))
    );
    let thinned = h.admin.sample_window("v1", &window(3)).await.unwrap();
    assert_eq!(thinned.latencies_us, [all[4], all[6], all[8]]);
    // Without `until_ms`: up to now.
    let (status, body) = admin_raw(
        h.proxy.admin,
        Method::GET,
        &format!("/samples?release=v1&since_ms={second}"),
        Some(TOKEN),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let to_now: cutover::balancer::api::Samples = serde_json::from_str(&body).unwrap();
    assert_eq!(to_now.latencies_us, &all[9..]);
    h.proxy.shutdown().await;
    a.stop().await;
}

async fn get_with(h: &Harness, path: &str, headers: &[(&str, &str)]) -> Response<Incoming> {
    let mut req = Request::get(h.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    h.client
        .request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap()
}

async fn backend_of(resp: Response<Incoming>) -> String {
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).trim().to_string()
}

/// The preview route opens only with the secret the deployer derives from the admin token: a
/// client that guesses the header (review finding: `x-cutover-preview: 1` reached unreleased
/// code, and with no preview backend made 503s that every deploy counted as failed) gets an
/// ordinary answer. The header never reaches a backend.
#[tokio::test]
async fn preview_requests_need_the_secret_and_go_only_to_preview_backends() {
    let h = Harness::start(settings(health(Duration::from_millis(20), 1, 2))).await;
    let mut live = TestBackend::start("live").await;
    let mut next = TestBackend::start("next").await;
    h.add_healthy(&live.spec("v1")).await;
    let mut p = next.spec("v2");
    p.preview = true;
    h.add_healthy(&p).await;
    let secret = cutover::balancer::api::preview_value(TOKEN);
    let preview = [(cutover::balancer::api::PREVIEW_HEADER, secret.as_str())];
    let forged = [(cutover::balancer::api::PREVIEW_HEADER, "1")];
    for _ in 0..10 {
        assert_eq!(backend_of(get_with(&h, "/", &[]).await).await, "live");
        let r = get_with(&h, "/", &preview).await;
        assert!(!r.headers().contains_key("x-saw-preview"), "{r:?}");
        assert_eq!(backend_of(r).await, "next");
        let r = get_with(&h, "/", &forged).await;
        assert!(!r.headers().contains_key("x-saw-preview"), "{r:?}");
        assert_eq!(
            backend_of(r).await,
            "live",
            "a wrong value is an ordinary request"
        );
    }
    // No preview backend: preview requests get 503, never a live backend; a forged one is
    // served by live and counts as nothing failed.
    h.admin.drain("next").await.unwrap();
    let r = get_with(&h, "/", &forged).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(h.admin.stats().await.unwrap().unrouted, 0);
    let r = get_with(&h, "/", &preview).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    // Activated, it is a normal backend.
    h.admin.activate("next").await.unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        seen.insert(backend_of(get_with(&h, "/", &[]).await).await);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    h.proxy.shutdown().await;
    live.stop().await;
    next.stop().await;
}

#[tokio::test]
async fn a_sticky_cookie_keeps_a_client_on_its_release() {
    let options = ProxyOptions {
        sticky: Some(cutover::proxy::Sticky::Cookie),
        ..ProxyOptions::default()
    };
    let h = Harness::start_with(settings(health(Duration::from_millis(20), 1, 2)), options).await;
    let mut stable = TestBackend::start("stable").await;
    let mut canary = TestBackend::start("canary").await;
    h.add_healthy(&stable.spec("v1")).await;
    h.add_healthy(&canary.spec("v2")).await;
    h.admin
        .set_weights(&BTreeMap::from([
            ("stable".into(), 90),
            ("canary".into(), 10),
        ]))
        .await
        .unwrap();
    // A fresh client gets a cookie naming the release that served it.
    let r = get_with(&h, "/", &[]).await;
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.starts_with("cutover_release=v1;"), "{cookie}");
    // A client pinned to the canary stays there despite its 10 % weight, and gets no new cookie.
    for _ in 0..20 {
        let r = get_with(&h, "/", &[("cookie", "theme=dark; cutover_release=v2")]).await;
        assert!(r.headers().get("set-cookie").is_none());
        assert_eq!(backend_of(r).await, "canary");
    }
    // Once the canary is gone, the client is served by stable and re-pinned.
    h.admin.drain("canary").await.unwrap();
    let r = get_with(&h, "/", &[("cookie", "cutover_release=v2")]).await;
    assert!(
        r.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .starts_with("cutover_release=v1;")
    );
    assert_eq!(backend_of(r).await, "stable");
    h.proxy.shutdown().await;
    stable.stop().await;
    canary.stop().await;
}

#[tokio::test]
async fn a_client_pinned_to_a_dead_canary_is_retried_on_stable() {
    // Checks run once at add; passive ejection is off: only the retry hides the dead canary.
    let options = ProxyOptions {
        sticky: Some(cutover::proxy::Sticky::Cookie),
        ..ProxyOptions::default()
    };
    let h = Harness::start_with(settings(health(Duration::from_secs(600), 1, 1000)), options).await;
    let mut stable = TestBackend::start("stable").await;
    let mut canary = TestBackend::start("canary").await;
    h.add_healthy(&stable.spec("v1")).await;
    h.add_healthy(&canary.spec("v2")).await;
    canary.stop().await;
    for i in 0..10 {
        let r = get_with(&h, "/", &[("cookie", "cutover_release=v2")]).await;
        assert_eq!(r.status(), StatusCode::OK, "GET {i}");
        assert_eq!(backend_of(r).await, "stable");
    }
    let stats = h.admin.stats().await.unwrap();
    assert_eq!(stats.backends["canary"].retries, 10, "{stats:?}");
    h.proxy.shutdown().await;
    stable.stop().await;
}

#[tokio::test]
async fn a_sticky_header_hash_is_consistent_and_follows_the_weights() {
    let options = ProxyOptions {
        sticky: Some(cutover::proxy::Sticky::parse("x-user").unwrap()),
        ..ProxyOptions::default()
    };
    let h = Harness::start_with(settings(health(Duration::from_millis(20), 1, 2)), options).await;
    let mut s1 = TestBackend::start("s1").await;
    let mut s2 = TestBackend::start("s2").await;
    let mut c1 = TestBackend::start("c1").await;
    h.add_healthy(&s1.spec("v1")).await;
    h.add_healthy(&s2.spec("v1")).await;
    h.add_healthy(&c1.spec("v2")).await;
    // v1 totals 150, v2 50: a quarter of the users land on v2.
    h.admin
        .set_weights(&BTreeMap::from([
            ("s1".into(), 75),
            ("s2".into(), 75),
            ("c1".into(), 50),
        ]))
        .await
        .unwrap();
    let mut on_v2 = 0;
    for user in 0..400 {
        let id = format!("user-{user}");
        let first = backend_of(get_with(&h, "/", &[("x-user", &id)]).await).await;
        let again = backend_of(get_with(&h, "/", &[("x-user", &id)]).await).await;
        let release = |b: &str| if b == "c1" { "v2" } else { "v1" };
        assert_eq!(
            release(&first),
            release(&again),
            "{id} moved between releases"
        );
        if first == "c1" {
            on_v2 += 1;
        }
    }
    assert!(
        (60..=140).contains(&on_v2),
        "{on_v2} of 400 users on v2, expected about 100"
    );
    h.proxy.shutdown().await;
    s1.stop().await;
    s2.stop().await;
    c1.stop().await;
}

/// A balancer with only the required methods, recording calls: the trait's defaults for
/// switch, set_weights and samples.
#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<String>>);

#[async_trait::async_trait]
impl Balancer for Recorder {
    async fn backends(&self) -> anyhow::Result<Vec<cutover::balancer::BackendView>> {
        Ok(Vec::new())
    }
    async fn add(&self, _: &BackendSpec) -> anyhow::Result<()> {
        Ok(())
    }
    async fn remove(&self, _: &str) -> anyhow::Result<()> {
        Ok(())
    }
    async fn set_weight(&self, id: &str, w: u32) -> anyhow::Result<()> {
        self.0.lock().unwrap().push(format!("weight {id} {w}"));
        Ok(())
    }
    async fn drain(&self, id: &str) -> anyhow::Result<()> {
        self.0.lock().unwrap().push(format!("drain {id}"));
        Ok(())
    }
    async fn activate(&self, id: &str) -> anyhow::Result<()> {
        self.0.lock().unwrap().push(format!("activate {id}"));
        Ok(())
    }
    async fn wait_drained(
        &self,
        _: &str,
        _: Duration,
    ) -> anyhow::Result<cutover::balancer::DrainReport> {
        Ok(Default::default())
    }
    async fn wait_healthy(&self, _: &str, _: Duration) -> anyhow::Result<()> {
        Ok(())
    }
    async fn stats(&self) -> anyhow::Result<cutover::balancer::Stats> {
        Ok(Default::default())
    }
}

#[tokio::test]
async fn balancer_trait_defaults_fall_back_to_single_calls_or_say_unsupported() {
    let r = Recorder::default();
    let req = SwitchRequest {
        activate: vec!["g1".into(), "g2".into()],
        standby: vec!["b1".into()],
    };
    let report = r.switch(&req).await.unwrap();
    assert!(report.at_unix_ms > 0);
    r.set_weights(&BTreeMap::from([("a".into(), 5), ("b".into(), 0)]))
        .await
        .unwrap();
    assert_eq!(
        *r.0.lock().unwrap(),
        [
            "activate g1",
            "activate g2",
            "drain b1",
            "weight a 5",
            "weight b 0"
        ]
    );
    let e = format!("{:#}", r.samples("v1", 10).await.unwrap_err());
    assert!(e.contains("unsupported by this balancer"), "{e}");
}

/// Review finding: a backend's `HTTP/1.0` status line reached HTTP/1.1 clients (RFC 9110
/// §2.5: an intermediary sends its own version).
#[tokio::test]
async fn a_backends_http10_status_line_goes_out_as_the_clients_version() {
    let backend = RawBackend::start(b"HTTP/1.0 200 OK\r\ncontent-length: 3\r\n\r\nold").await;
    let h = Harness::start(settings(health(Duration::from_secs(600), 1, 1000))).await;
    h.add_healthy(&backend.spec("old")).await;
    let out = raw_exchange(
        h.proxy.listen,
        b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(out.ends_with("\r\n\r\nold"), "{out}");
    assert_eq!(backend.heads().len(), 1);
    h.proxy.shutdown().await;
}

/// Review finding: `Trailer` was stripped as if hop-by-hop (RFC 9110 §6.6.2: it is not), and
/// hyper sends only the trailer fields it lists: trailers were lost both ways.
#[tokio::test]
async fn trailers_pass_both_ways() {
    let h = Harness::start(settings(health(Duration::from_secs(600), 1, 1000))).await;
    let mut a = TestBackend::start("a").await;
    h.add_healthy(&a.spec("v1")).await;
    let out = raw_exchange(
        h.proxy.listen,
        b"POST /trailers HTTP/1.1\r\nhost: t\r\nte: trailers\r\ntrailer: x-sent\r\n\
          transfer-encoding: chunked\r\nconnection: close\r\n\r\n\
          5\r\nhello\r\n0\r\nx-sent: yes\r\n\r\n",
    )
    .await
    .to_ascii_lowercase();
    assert!(out.starts_with("http/1.1 200 ok\r\n"), "{out}");
    assert!(out.contains("\r\ntrailer: x-echo\r\n"), "{out}");
    assert!(
        out.ends_with("\r\n5\r\nhello\r\n0\r\nx-echo: yes\r\n\r\n"),
        "the backend got the request's trailer and the client the response's: {out}"
    );
    h.proxy.shutdown().await;
    a.stop().await;
}

/// Review finding: `Transfer-Encoding: gzip, chunked` was accepted and its gzip coding
/// silently dropped on the way to the backend. RFC 9112 §6.1 (and nginx): 501.
#[tokio::test]
async fn a_transfer_coding_other_than_chunked_gets_501() {
    let h = Harness::start(settings(health(Duration::from_secs(600), 1, 1000))).await;
    let mut a = TestBackend::start("a").await;
    h.add_healthy(&a.spec("v1")).await;
    for te in ["gzip, chunked", "chunked, chunked"] {
        let request = format!(
            "POST / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: {te}\r\nconnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        );
        let out = raw_exchange(h.proxy.listen, request.as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 501 "), "{te}: {out}");
    }
    let out = raw_exchange(
        h.proxy.listen,
        b"POST / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: Chunked\r\nconnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
    assert_eq!(
        a.hits.posts.load(Ordering::SeqCst),
        1,
        "only the chunked POST is sent"
    );
    assert_eq!(h.admin.stats().await.unwrap().unrouted, 0);
    h.proxy.shutdown().await;
    a.stop().await;
}

/// Review finding (RFC 9112 §3.2): an HTTP/1.1 request without Host or with two went to a
/// backend (nginx and HAProxy answer 400), `Connection: close, host` dropped the Host, and an
/// absolute-form target's authority was not the Host forwarded.
#[tokio::test]
async fn host_rules_of_http11_hold() {
    let h = Harness::start(settings(health(Duration::from_secs(600), 1, 1000))).await;
    let mut a = TestBackend::start("a").await;
    h.add_healthy(&a.spec("v1")).await;
    for bad in [
        &b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nhost: one\r\nhost: two\r\nconnection: close\r\n\r\n",
    ] {
        let out = raw_exchange(h.proxy.listen, bad).await;
        assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
    }
    assert_eq!(a.requests(), 0, "no bad request reaches the backend");
    // HTTP/1.0 has no Host requirement.
    let out = raw_exchange(h.proxy.listen, b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.0 200 "), "{out}");
    let saw_host = |out: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix("x-saw-host: "))
            .unwrap_or("(none)")
            .to_string()
    };
    let out = raw_exchange(
        h.proxy.listen,
        b"GET / HTTP/1.1\r\nhost: app.test\r\nconnection: close, host\r\n\r\n",
    )
    .await;
    assert_eq!(saw_host(&out), "app.test", "{out}");
    let out = raw_exchange(
        h.proxy.listen,
        b"GET http://target.test:8080/x HTTP/1.1\r\nhost: other.test\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(saw_host(&out), "target.test:8080", "{out}");
    assert_eq!(h.admin.stats().await.unwrap().unrouted, 0);
    h.proxy.shutdown().await;
    a.stop().await;
}

/// Review finding: an unsolicited 101 from a backend reached a client that asked for no
/// upgrade; a CONNECT was forwarded; a `*` target went out on methods other than OPTIONS.
#[tokio::test]
async fn unsolicited_switches_connect_and_stray_asterisks_are_refused() {
    let backend = RawBackend::start(
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: other\r\nconnection: upgrade\r\n\r\n",
    )
    .await;
    let h = Harness::start(settings(health(Duration::from_secs(600), 1, 1000))).await;
    h.add_healthy(&backend.spec("switcher")).await;
    let out = raw_exchange(
        h.proxy.listen,
        b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 502 "), "{out}");
    let stats = h.admin.stats().await.unwrap();
    assert_eq!(stats.backends["switcher"].proxy_errors, 1, "{stats:?}");
    assert_eq!(stats.unrouted, 1, "{stats:?}");
    assert_eq!(backend.heads().len(), 1);
    for (request, status) in [
        (
            &b"CONNECT target.test:443 HTTP/1.1\r\nhost: target.test:443\r\nconnection: close\r\n\r\n"[..],
            "405",
        ),
        (b"GET * HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n", "400"),
    ] {
        let out = raw_exchange(h.proxy.listen, request).await;
        assert!(out.starts_with(&format!("HTTP/1.1 {status} ")), "{out}");
    }
    assert_eq!(backend.heads().len(), 1, "neither was forwarded");
    h.proxy.shutdown().await;
}
