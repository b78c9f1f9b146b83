//! The sample app served in-process on loopback port 0, exercised over real connections, and the
//! load generator counting against it. Every wait is on something observable (requests in flight,
//! draining, counts) and bounded by a timeout; every server is stopped at the end of its test.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cutover::load::{self, LoadSpec};
use cutover::sample_app::{SampleApp, SampleAppArgs, serve};
use http_body_util::{BodyExt as _, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Bound on any single wait in these tests.
const PATIENCE: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {PATIENCE:?}"))
}

/// A sample app serving in this process; shut down on [`TestApp::stop`] or when dropped.
struct TestApp {
    addr: SocketAddr,
    app: Arc<SampleApp>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl TestApp {
    async fn start(version: &str, configure: impl FnOnce(&mut SampleAppArgs)) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), version, configure).await
    }

    async fn start_on(
        listen: SocketAddr,
        version: &str,
        configure: impl FnOnce(&mut SampleAppArgs),
    ) -> Self {
        let mut args = SampleAppArgs::new(listen, version);
        configure(&mut args);
        let app = SampleApp::new(&args).expect("valid args");
        let listener = TcpListener::bind(listen).await.expect("bind loopback");
        let addr = listener.local_addr().unwrap();
        let (shutdown, signal) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, app.clone(), async move {
            let _ = signal.await;
        }));
        Self {
            addr,
            app,
            shutdown: Some(shutdown),
            task,
        }
    }

    /// Signals shutdown (like SIGTERM) without waiting for it.
    fn begin_shutdown(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    /// Signals shutdown and waits until the server has drained and returned.
    async fn stop(mut self) {
        self.begin_shutdown();
        within("server shutdown", &mut self.task)
            .await
            .expect("serve task")
            .expect("serve result");
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.begin_shutdown();
    }
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String, Option<String>) {
    within(path, load::get(addr, path, &[]))
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e:#}"))
}

#[tokio::test]
async fn root_answers_the_version_and_health_is_ok() {
    let app = TestApp::start("v1", |_| {}).await;
    assert_eq!(
        get(app.addr, "/").await,
        (200, "v1\n".into(), Some("v1".into()))
    );
    assert_eq!(get(app.addr, "/health").await.0, 200);
    assert_eq!(get(app.addr, "/missing").await.0, 404);
    app.stop().await;
}

#[tokio::test]
async fn unhealthy_app_answers_503_on_health_but_serves() {
    let app = TestApp::start("v1", |a| a.unhealthy = true).await;
    assert_eq!(get(app.addr, "/health").await.0, 503);
    assert_eq!(get(app.addr, "/").await.0, 200);
    app.stop().await;
}

#[tokio::test]
async fn error_rate_fails_exactly_that_share() {
    let app = TestApp::start("v1", |a| a.error_rate = 0.2).await;
    let spec = LoadSpec {
        rate: 0, // unpaced: the count, not the timing, is under test
        max_requests: 100,
        concurrency: 4,
        ..LoadSpec::new(app.addr)
    };
    let report = within("load", load::start(spec).finish()).await;
    assert_eq!(report.sent, 100);
    assert_eq!(report.failed, 20, "{report}");
    assert_eq!(report.ok, 80);
    assert!(report.failures.iter().all(|f| f.ends_with("status 500")));
    app.stop().await;
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_and_refuses_new_connections() {
    let mut app = TestApp::start("v1", |_| {}).await;

    // An idle keep-alive connection, to see the server close it on shutdown.
    let stream = TcpStream::connect(app.addr).await.unwrap();
    let (mut idle, idle_conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let idle_conn = tokio::spawn(idle_conn);
    let request = Request::get("/")
        .header("host", app.addr.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = within("keep-alive request", idle.send_request(request))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();

    let addr = app.addr;
    let slow = tokio::spawn(async move { load::get(addr, "/sleep/300", &[]).await });
    within("request in flight", app.app.wait_in_flight(1)).await;

    app.begin_shutdown();
    within("draining", app.app.draining()).await;
    let refused = TcpStream::connect(app.addr).await;
    assert!(
        refused.is_err(),
        "new connections must be refused while draining"
    );

    let (status, body, _) = within("in-flight request", slow).await.unwrap().unwrap();
    assert_eq!((status, body.as_str()), (200, "v1\n"));
    within("idle connection closed", idle_conn)
        .await
        .unwrap()
        .unwrap();
    app.stop().await;
}

#[tokio::test]
async fn event_stream_is_flushed_per_event_and_survives_the_drain() {
    let mut app = TestApp::start("v1", |_| {}).await;
    let stream = TcpStream::connect(app.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let request = Request::get("/sse?events=3&interval_ms=200")
        .header("host", app.addr.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = within("sse response", sender.send_request(request))
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();

    // The first event arrives on its own, 200 ms before the second is even produced.
    let first = within("first event", body.frame()).await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "data: 1\n\n");

    // Shutting down now must not cut the stream.
    app.begin_shutdown();
    within("draining", app.app.draining()).await;
    let rest = within("remaining events", body.collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(rest, "data: 2\n\ndata: 3\n\n");
    drop(sender);
    within("connection end", conn).await.unwrap().unwrap();
    app.stop().await;
}

#[tokio::test]
async fn load_counts_every_request_at_the_requested_rate() {
    let app = TestApp::start("v1", |_| {}).await;
    let spec = LoadSpec {
        rate: 400,
        max_requests: 200,
        concurrency: 4,
        ..LoadSpec::new(app.addr)
    };
    let report = within("load", load::start(spec).finish()).await;
    assert_eq!(report.sent, 200);
    assert_eq!(report.ok, 200, "{report}: {:?}", report.failures);
    assert_eq!(report.failed, 0);
    assert_eq!(report.share("v1"), 100.0);
    // Slot 199 is due at 199/400 s: pacing, not a burst.
    assert!(
        report.elapsed >= Duration::from_millis(490),
        "took {:?}",
        report.elapsed
    );
    app.stop().await;
}

#[tokio::test]
async fn load_stops_at_max_duration() {
    let app = TestApp::start("v1", |_| {}).await;
    let spec = LoadSpec {
        rate: 100,
        max_requests: 1_000_000,
        max_duration: Duration::from_millis(300),
        concurrency: 2,
        ..LoadSpec::new(app.addr)
    };
    let report = within("load", load::start(spec).finish()).await;
    // Slots due before 300 ms are 0..=29; a worker running late may send fewer, never more.
    assert!((1..=30).contains(&report.sent), "{report}");
    assert_eq!(report.ok, report.sent, "{report}");
    app.stop().await;
}

#[tokio::test]
async fn stopped_target_produces_counted_failures() {
    let app = TestApp::start("v1", |_| {}).await;
    let spec = LoadSpec {
        rate: 200,
        max_requests: 10_000,
        max_duration: Duration::from_secs(30),
        concurrency: 2,
        ..LoadSpec::new(app.addr)
    };
    let run = load::start(spec);
    within("first answers", run.wait_until(|r| r.ok >= 20)).await;
    app.stop().await;
    let seen = within("failures", run.wait_until(|r| r.failed >= 10)).await;
    assert!(seen.failed >= 10, "{seen}");
    let report = within("load stop", run.stop()).await;
    assert_eq!(report.sent, report.ok + report.failed, "{report}");
    assert!(report.ok >= 20 && report.failed >= 10, "{report}");
    assert!(
        report.failures.iter().any(|f| f.contains("onnect")),
        "{:?}",
        report.failures
    );
}

#[tokio::test]
async fn share_by_version_follows_the_release_that_answered() {
    let v1 = TestApp::start("v1", |_| {}).await;
    let addr = v1.addr;
    let spec = LoadSpec {
        rate: 200,
        max_requests: 10_000,
        max_duration: Duration::from_secs(30),
        concurrency: 2,
        ..LoadSpec::new(addr)
    };
    let run = load::start(spec);
    within("v1 answers", run.wait_until(|r| r.ok >= 30)).await;
    // A crude in-place cutover on the same address: stop v1, start v2.
    v1.stop().await;
    let v2 = TestApp::start_on(addr, "v2", |_| {}).await;
    within(
        "v2 answers",
        run.wait_until(|r| r.by_version.get("v2").copied().unwrap_or(0) >= 30),
    )
    .await;
    let report = within("load stop", run.stop()).await;
    assert_eq!(report.sent, report.ok + report.failed, "{report}");
    assert_eq!(
        report.by_version.values().sum::<u64>(),
        report.ok,
        "{report}"
    );
    assert!(
        report.share("v1") > 0.0 && report.share("v2") > 0.0,
        "{report}"
    );
    assert!((report.share("v1") + report.share("v2") - 100.0).abs() < 1e-9);
    v2.stop().await;
}
