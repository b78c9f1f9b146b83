//! The sample app (`cutover sample-app`): a small HTTP server that the demo deploys and the tests
//! deploy, drain and break on purpose.
//!
//! Why it exists: to prove zero downtime we need an app whose behaviour we control exactly. Each
//! flag models one way a real release goes wrong (`--exit-on-start`: crashes at boot;
//! `--unhealthy`: never passes its health check; `--error-rate`: serves a share of 500s;
//! `--startup-delay`: boots slowly; `--latency`: answers slowly), and every answer names the
//! version that produced it (body and `x-cutover-version` header), so a client such as
//! [`crate::load`] can count which release served each request.
//!
//! Design choices:
//! - The error rate is exact and deterministic, not random: request number `i` (counted over `/`
//!   and `/sleep`) fails when `floor((i+1)·r) > floor(i·r)`, so any `n` consecutive requests from
//!   the start hold exactly `floor(n·r)` failures and tests can assert counts, not ranges.
//! - The server is hyper-util's `auto` connection builder (HTTP/1.1 keep-alive and HTTP/2 over
//!   cleartext on one port), the same stack the built-in proxy speaks to.
//! - Shutdown behaves like a well-written app: on SIGTERM or SIGINT the listener is closed at once
//!   (new connections are refused, so a balancer notices), requests in flight finish (bounded by
//!   [`DRAIN_TIMEOUT`]), idle keep-alive connections are closed, and the process exits 0. A
//!   dirty shutdown would be a bug of the app, not a test of the deployer.
//! - [`run`] is the process entry point; [`serve`] takes a bound listener and a shutdown future so
//!   tests run the app in-process on port 0 and observe it through [`SampleApp`] (requests in
//!   flight, draining) instead of sleeping.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::io::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::body::{Body, Frame};
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

/// Response header naming the version that answered.
pub const VERSION_HEADER: &str = "x-cutover-version";

/// Exit status of `--exit-on-start`.
pub const EXIT_ON_START_STATUS: i32 = 3;

/// How long a shutdown waits for requests in flight before giving up on them.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest wait `GET /sleep/{ms}` honours; larger values are clamped.
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// Largest body `POST /echo` accepts (413 above).
const MAX_ECHO_BYTES: usize = 16 * 1024 * 1024;
/// Bounds and defaults of `GET /sse`.
const MAX_SSE_EVENTS: u64 = 100_000;
const MAX_SSE_INTERVAL_MS: u64 = 60_000;
const DEFAULT_SSE_EVENTS: u64 = 10;
const DEFAULT_SSE_INTERVAL_MS: u64 = 100;

/// Arguments of `cutover sample-app`: a test and demo HTTP app whose failures are chosen by flags.
///
/// Routes: `GET /` answers the version; `GET /health` answers `ok` (503 with `--unhealthy`);
/// `GET /sleep/{ms}` waits then answers like `/`; `POST /echo` echoes the body;
/// `GET /sse?events=N&interval_ms=M` streams N server-sent events. SIGTERM or SIGINT stops
/// accepting at once, lets requests in flight finish and exits 0.
#[derive(clap::Args, Debug, Clone)]
pub struct SampleAppArgs {
    /// Address to listen on, e.g. 127.0.0.11:4100 (port 0 picks a free port)
    #[arg(long)]
    pub listen: SocketAddr,
    /// Version this instance answers on GET / (body and x-cutover-version header)
    #[arg(long, default_value = "dev")]
    pub version: String,
    /// Exit with status 3 at once, before listening (a release that crashes at start)
    #[arg(long)]
    pub exit_on_start: bool,
    /// Answer 503 on /health forever (a release that never becomes healthy)
    #[arg(long)]
    pub unhealthy: bool,
    /// Share of GET / and /sleep requests answered with 500, from 0.0 to 1.0; exact and
    /// deterministic: 0.2 fails exactly every fifth request
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Wait this long before listening (a slow boot), e.g. "2s"
    #[arg(long, value_parser = humantime::parse_duration)]
    pub startup_delay: Option<Duration>,
    /// Delay added to every response, e.g. "20ms"
    #[arg(long, value_parser = humantime::parse_duration)]
    pub latency: Option<Duration>,
}

impl SampleAppArgs {
    /// Arguments with every fault switched off: the app listens on `listen` and answers `version`.
    pub fn new(listen: SocketAddr, version: &str) -> Self {
        Self {
            listen,
            version: version.to_owned(),
            exit_on_start: false,
            unhealthy: false,
            error_rate: 0.0,
            startup_delay: None,
            latency: None,
        }
    }
}

/// Runs the sample app as a process: validates the arguments, honours `--exit-on-start` (exits the
/// process with status 3) and `--startup-delay`, binds, prints
/// `sample-app {version} listening on {addr}` on stdout, and serves until SIGTERM or SIGINT.
pub async fn run(args: SampleAppArgs) -> anyhow::Result<()> {
    let app = SampleApp::new(&args)?;
    if args.exit_on_start {
        let _ = writeln!(
            std::io::stderr(),
            "sample-app {}: exiting with status {EXIT_ON_START_STATUS} (--exit-on-start)",
            args.version
        );
        std::process::exit(EXIT_ON_START_STATUS);
    }
    // Installed before the boot delay, so a SIGTERM during a slow boot is a clean exit too.
    let shutdown = shutdown_signal()?;
    tokio::pin!(shutdown);
    if let Some(delay) = args.startup_delay {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = &mut shutdown => return Ok(()),
        }
    }
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("sample-app cannot listen on {}", args.listen))?;
    let addr = listener.local_addr().with_context(|| {
        format!(
            "sample-app cannot read the address bound for {}",
            args.listen
        )
    })?;
    // Never println!: it panics when stdout is closed, and a detached instance may have none.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "sample-app {} listening on {addr}", args.version);
    let _ = out.flush();
    drop(out);
    serve(listener, app, shutdown).await
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains: the listener is closed at
/// once, requests in flight finish (at most [`DRAIN_TIMEOUT`]), idle connections are closed.
pub async fn serve(
    listener: TcpListener,
    app: Arc<SampleApp>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().keep_alive(true).timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let graceful = crate::accept::serve_until(
        listener,
        &builder,
        || {
            let app = app.clone();
            service_fn(move |req| app.clone().handle(req))
        },
        shutdown,
        "sample-app",
        Duration::from_millis(10),
    )
    .await;
    app.draining.send_replace(true);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            in_flight = app.in_flight(),
            "sample-app drain timed out after {DRAIN_TIMEOUT:?}; exiting anyway"
        );
    }
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT (Ctrl-C elsewhere than Unix).
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

/// Response body: a whole buffer or an event stream.
type ResponseBody = BoxBody<Bytes, Infallible>;

/// The app's validated settings and live counters, shared by all connections.
#[derive(Debug)]
pub struct SampleApp {
    version: String,
    version_header: HeaderValue,
    unhealthy: bool,
    error_rate: f64,
    latency: Option<Duration>,
    /// Number of `/` and `/sleep` requests seen so far (the `i` of the error-rate rule).
    counted: AtomicU64,
    in_flight: watch::Sender<usize>,
    draining: watch::Sender<bool>,
}

impl SampleApp {
    /// Validates the arguments (error rate within 0..=1, version usable as a header value).
    pub fn new(args: &SampleAppArgs) -> anyhow::Result<Arc<Self>> {
        if !(0.0..=1.0).contains(&args.error_rate) {
            bail!(
                "--error-rate must be a share from 0.0 to 1.0 (0.2 = every fifth request fails), got {}",
                args.error_rate
            );
        }
        if args.version.is_empty() {
            bail!("--version must not be empty");
        }
        let version_header = HeaderValue::from_str(&args.version).with_context(|| {
            format!(
                "--version {:?} cannot be sent in an HTTP header; use printable ASCII",
                args.version
            )
        })?;
        Ok(Arc::new(Self {
            version: args.version.clone(),
            version_header,
            unhealthy: args.unhealthy,
            error_rate: args.error_rate,
            latency: args.latency,
            counted: AtomicU64::new(0),
            in_flight: watch::Sender::new(0),
            draining: watch::Sender::new(false),
        }))
    }

    /// The version this app answers.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Requests being handled right now (an event stream counts until its last event).
    pub fn in_flight(&self) -> usize {
        *self.in_flight.borrow()
    }

    /// Resolves once at least `n` requests are in flight.
    pub async fn wait_in_flight(&self, n: usize) {
        let mut rx = self.in_flight.subscribe();
        let _ = rx.wait_for(|count| *count >= n).await;
    }

    /// Resolves once shutdown has begun and the listener is closed.
    pub async fn draining(&self) {
        let mut rx = self.draining.subscribe();
        let _ = rx.wait_for(|draining| *draining).await;
    }

    /// Answers one request. Generic over the body so unit tests call it without a socket.
    async fn handle<B>(
        self: Arc<Self>,
        req: Request<B>,
    ) -> Result<Response<ResponseBody>, Infallible>
    where
        B: Body,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        let guard = InFlight::enter(&self);
        if let Some(latency) = self.latency {
            tokio::time::sleep(latency).await;
        }
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let query = req.uri().query().map(str::to_owned);
        let is_get = method == Method::GET || method == Method::HEAD;
        let response = match path.as_str() {
            "/" if is_get => self.versioned(),
            "/health" if is_get => {
                if self.unhealthy {
                    self.text(StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n")
                } else {
                    self.text(StatusCode::OK, "ok\n")
                }
            }
            "/echo" if method == Method::POST => self.echo(req).await,
            "/sse" if method == Method::GET => self.sse(query.as_deref(), guard),
            p if is_get && p.starts_with("/sleep/") => {
                match p["/sleep/".len()..].parse::<u64>() {
                    Ok(ms) => {
                        // Numbered on arrival, so the spread of failures follows arrival order.
                        let fail = self.next_fails();
                        tokio::time::sleep(Duration::from_millis(ms).min(MAX_SLEEP)).await;
                        self.versioned_with(fail)
                    }
                    Err(_) => self.text(
                        StatusCode::BAD_REQUEST,
                        "expected /sleep/{milliseconds}, e.g. /sleep/300\n",
                    ),
                }
            }
            "/" | "/health" | "/echo" | "/sse" => {
                self.text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            p if p.starts_with("/sleep/") => {
                self.text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => self.text(StatusCode::NOT_FOUND, "not found\n"),
        };
        Ok(response)
    }

    /// Whether the next counted request fails under `--error-rate`.
    fn next_fails(&self) -> bool {
        fails(
            self.counted.fetch_add(1, Ordering::Relaxed),
            self.error_rate,
        )
    }

    fn versioned(&self) -> Response<ResponseBody> {
        let fail = self.next_fails();
        self.versioned_with(fail)
    }

    fn versioned_with(&self, fail: bool) -> Response<ResponseBody> {
        if fail {
            self.text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "injected failure (--error-rate)\n",
            )
        } else {
            self.text(StatusCode::OK, format!("{}\n", self.version))
        }
    }

    async fn echo<B>(&self, req: Request<B>) -> Response<ResponseBody>
    where
        B: Body,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
        match Limited::new(req.into_body(), MAX_ECHO_BYTES)
            .collect()
            .await
        {
            Ok(collected) => {
                let mut response = self.response(StatusCode::OK, collected.to_bytes());
                let content_type = content_type
                    .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"));
                response
                    .headers_mut()
                    .insert(header::CONTENT_TYPE, content_type);
                response
            }
            Err(error) if error.is::<LengthLimitError>() => self.text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body larger than {MAX_ECHO_BYTES} bytes\n"),
            ),
            Err(error) => self.text(
                StatusCode::BAD_REQUEST,
                format!("cannot read body: {error}\n"),
            ),
        }
    }

    /// Streams `events` events `data: {i}` (i from 1), one frame each, `interval_ms` apart.
    fn sse(self: &Arc<Self>, query: Option<&str>, guard: InFlight) -> Response<ResponseBody> {
        let (events, interval) = match parse_sse_query(query) {
            Ok(parsed) => parsed,
            Err(message) => return self.text(StatusCode::BAD_REQUEST, format!("{message}\n")),
        };
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            let _guard = guard;
            for i in 1..=events {
                if i > 1 {
                    tokio::time::sleep(interval).await;
                }
                if tx
                    .send(Bytes::from(format!("data: {i}\n\n")))
                    .await
                    .is_err()
                {
                    return; // the client went away
                }
            }
        });
        let mut response = Response::new(EventStream(rx).boxed());
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        headers.insert(VERSION_HEADER, self.version_header.clone());
        response
    }

    fn text(&self, status: StatusCode, body: impl Into<Bytes>) -> Response<ResponseBody> {
        let mut response = self.response(status, body.into());
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }

    fn response(&self, status: StatusCode, body: Bytes) -> Response<ResponseBody> {
        let mut response = Response::new(Full::new(body).boxed());
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(VERSION_HEADER, self.version_header.clone());
        response
    }
}

/// A response body whose frames arrive on a channel; each frame is written and flushed as it
/// comes (hyper flushes a chunked body frame by frame).
struct EventStream(mpsc::Receiver<Bytes>);

impl Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|next| next.map(|data| Ok(Frame::data(data))))
    }
}

/// Counts a request as in flight until dropped.
struct InFlight(Arc<SampleApp>);

impl InFlight {
    fn enter(app: &Arc<SampleApp>) -> Self {
        app.in_flight.send_modify(|n| *n += 1);
        Self(app.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.send_modify(|n| *n -= 1);
    }
}

/// The error-rate rule: request number `i` (from 0) fails when `floor((i+1)·rate) > floor(i·rate)`.
fn fails(i: u64, rate: f64) -> bool {
    ((i + 1) as f64 * rate).floor() > (i as f64 * rate).floor()
}

/// Parses `events=N&interval_ms=M` (both optional, other keys ignored).
fn parse_sse_query(query: Option<&str>) -> Result<(u64, Duration), String> {
    let mut events = DEFAULT_SSE_EVENTS;
    let mut interval_ms = DEFAULT_SSE_INTERVAL_MS;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match key {
            "events" => &mut events,
            "interval_ms" => &mut interval_ms,
            _ => continue,
        };
        *slot = value
            .parse()
            .map_err(|_| format!("{key} must be a whole number, got {value:?}"))?;
    }
    if events > MAX_SSE_EVENTS {
        return Err(format!("events must be at most {MAX_SSE_EVENTS}"));
    }
    if interval_ms > MAX_SSE_INTERVAL_MS {
        return Err(format!("interval_ms must be at most {MAX_SSE_INTERVAL_MS}"));
    }
    Ok((events, Duration::from_millis(interval_ms)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Empty;

    fn app(configure: impl FnOnce(&mut SampleAppArgs)) -> Arc<SampleApp> {
        let mut args = SampleAppArgs::new(([127, 0, 0, 1], 0).into(), "v1");
        configure(&mut args);
        SampleApp::new(&args).expect("valid args")
    }

    async fn call(app: &Arc<SampleApp>, method: Method, uri: &str, body: &str) -> (u16, String) {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let response = app.clone().handle(req).await.unwrap();
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[test]
    fn error_rule_is_exact_for_any_prefix() {
        for rate in [0.0, 0.01, 0.2, 0.25, 1.0 / 3.0, 0.5, 0.9, 1.0] {
            for n in [1u64, 7, 100, 1000] {
                let failed = (0..n).filter(|&i| fails(i, rate)).count() as u64;
                assert_eq!(
                    failed,
                    (n as f64 * rate).floor() as u64,
                    "rate {rate} n {n}"
                );
            }
        }
        // Spread evenly: with 0.2 exactly every fifth request fails.
        let failing: Vec<u64> = (0..15).filter(|&i| fails(i, 0.2)).collect();
        assert_eq!(failing, [4, 9, 14]);
    }

    #[test]
    fn invalid_args_are_clear_errors() {
        for rate in [-0.1, 1.5, f64::NAN] {
            let mut args = SampleAppArgs::new(([127, 0, 0, 1], 0).into(), "v1");
            args.error_rate = rate;
            let error = SampleApp::new(&args).unwrap_err().to_string();
            assert!(error.contains("--error-rate"), "{error}");
        }
        let args = SampleAppArgs::new(([127, 0, 0, 1], 0).into(), "v1\nx");
        let error = SampleApp::new(&args).unwrap_err().to_string();
        assert!(error.contains("--version"), "{error}");
    }

    #[test]
    fn cli_parses_durations_and_defaults() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: SampleAppArgs,
        }
        let cli = Cli::try_parse_from([
            "x",
            "--listen",
            "127.0.0.1:4100",
            "--startup-delay",
            "2s",
            "--latency",
            "20ms",
        ])
        .unwrap();
        assert_eq!(cli.args.version, "dev");
        assert_eq!(cli.args.startup_delay, Some(Duration::from_secs(2)));
        assert_eq!(cli.args.latency, Some(Duration::from_millis(20)));
        assert!(Cli::try_parse_from(["x", "--listen", "nowhere"]).is_err());
        assert!(
            Cli::try_parse_from(["x", "--listen", "127.0.0.1:1", "--error-rate", "x"]).is_err()
        );
    }

    #[test]
    fn sse_query() {
        assert_eq!(
            parse_sse_query(None).unwrap(),
            (
                DEFAULT_SSE_EVENTS,
                Duration::from_millis(DEFAULT_SSE_INTERVAL_MS)
            )
        );
        assert_eq!(
            parse_sse_query(Some("events=3&interval_ms=0&x=1")).unwrap(),
            (3, Duration::ZERO)
        );
        assert!(parse_sse_query(Some("events=-1")).is_err());
        assert!(parse_sse_query(Some("events=1000001")).is_err());
    }

    #[tokio::test]
    async fn routes() {
        let app = app(|_| {});
        assert_eq!(call(&app, Method::GET, "/", "").await, (200, "v1\n".into()));
        assert_eq!(
            call(&app, Method::GET, "/health", "").await,
            (200, "ok\n".into())
        );
        assert_eq!(
            call(&app, Method::GET, "/sleep/1", "").await,
            (200, "v1\n".into())
        );
        assert_eq!(call(&app, Method::GET, "/sleep/x", "").await.0, 400);
        assert_eq!(
            call(&app, Method::POST, "/echo", "hello").await,
            (200, "hello".into())
        );
        assert_eq!(call(&app, Method::GET, "/echo", "").await.0, 405);
        assert_eq!(call(&app, Method::POST, "/", "").await.0, 405);
        assert_eq!(call(&app, Method::GET, "/nope", "").await.0, 404);
        assert_eq!(
            call(&app, Method::GET, "/sse?events=3&interval_ms=0", "").await,
            (200, "data: 1\n\ndata: 2\n\ndata: 3\n\n".into())
        );
        assert_eq!(app.in_flight(), 0);
    }

    #[tokio::test]
    async fn version_header_and_unhealthy() {
        let app = app(|a| a.unhealthy = true);
        let req = Request::get("/").body(Empty::<Bytes>::new()).unwrap();
        let response = app.clone().handle(req).await.unwrap();
        assert_eq!(response.headers()[VERSION_HEADER], "v1");
        assert_eq!(call(&app, Method::GET, "/health", "").await.0, 503);
    }

    #[tokio::test]
    async fn error_rate_counts_root_and_sleep_only() {
        let app = app(|a| a.error_rate = 0.5);
        assert_eq!(call(&app, Method::GET, "/", "").await.0, 200);
        assert_eq!(call(&app, Method::GET, "/health", "").await.0, 200);
        assert_eq!(call(&app, Method::GET, "/sleep/0", "").await.0, 500);
        assert_eq!(call(&app, Method::GET, "/", "").await.0, 200);
        assert_eq!(call(&app, Method::GET, "/", "").await.0, 500);
    }
}
