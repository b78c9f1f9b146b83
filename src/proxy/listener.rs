//! Client connections: accept, optional TLS, serve HTTP/1.1 and HTTP/2 on each, and drain them
//! at shutdown.
//!
//! Design choices:
//! - hyper-util's `auto` server: HTTP/2 with prior knowledge (h2c) or through TLS ALPN, else
//!   HTTP/1.1 with upgrades. hyper answers a malformed request head with 400 and an oversized
//!   one (bytes or field count) with 431 and closes; nothing a client sends reaches a panic.
//!   HTTP/2 heads get the same 431 from the proxy (hyper would reset the stream, and counts no
//!   fields): hyper lets header lists through up to a multiple of `max_header_bytes`.
//! - A semaphore bounds the open connections. One over the limit is accepted and answered
//!   with a 503 (cleartext) or closed (TLS) at once, so it is told instead of left hanging in
//!   the kernel's backlog. Either way its client's request failed: it counts as the proxy's
//!   own answer (`unrouted`), so a deploy's report and `/metrics` count it as failed. A connection's permit ([`Slot`]) is shared with the WebSocket tunnel
//!   it may be upgraded to: hyper's connection future ends at the upgrade, the tunnel does not.
//! - A new connection's first request head is due within `client_header` of accept (TLS
//!   handshake included). hyper's own head timeout does not cover it: it starts only once the
//!   auto builder has read enough bytes to pick HTTP/1.1, so a client that sends nothing would
//!   be held until `client_idle`. Later heads are timed by hyper from when it waits for them.
//! - Each connection task watches its own idleness (the IO wrapper stamps the time of every
//!   read and write): past `client_idle` with nothing moving, the connection is closed
//!   gracefully; past a second period, at once. A response waiting on its backend for more
//!   (a quiet SSE stream) keeps it open however quiet: closing it would cut the response
//!   (shutdown's drain deadline still does, and counts it). A client that stops reading does
//!   not: then the response waits on the client, and the connection is idle.
//! - Shutdown in three steps: stop accepting and answer each busy HTTP/1.1 connection's next
//!   response with `Connection: close` for a short linger (so no client sends a request into a
//!   closing socket); then close idle connections gracefully (HTTP/2 gets GOAWAY) and wait for
//!   the rest until `drain_timeout`; then close whatever is still open, long-lived connections
//!   included, and count them.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::Proxy;
use super::forward::{self, Peer};

/// How long busy HTTP/1.1 connections get to learn of a shutdown through `Connection: close`
/// before idle ones are closed.
const LINGER: Duration = Duration::from_millis(500);

/// Sent to a client over `max_connections` before closing.
const TOO_MANY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 21\r\nconnection: close\r\n\r\ntoo many connections\n";

/// Accepts client connections until `stop`, then drains them (see the module doc).
pub(crate) async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    proxy: Arc<Proxy>,
    mut stop: watch::Receiver<bool>,
) {
    let builder = Arc::new(builder(&proxy));
    let limit = Arc::new(Semaphore::new(proxy.options.limits.max_connections));
    let (close_tx, close_rx) = watch::channel(false);
    let epoch = Instant::now();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer_addr) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    debug!(client = %peer_addr, "over max_connections: refused");
                    proxy.unrouted.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(refuse(stream, tls.is_none()));
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let conn = Conn {
                    proxy: proxy.clone(),
                    builder: builder.clone(),
                    close: close_rx.clone(),
                    epoch,
                    accepted: Instant::now(),
                    slot: Arc::new(Slot::new(permit, proxy.clone())),
                };
                let tls = tls.clone();
                let handshake = proxy.options.timeouts.client_header;
                conns.spawn(async move {
                    match tls {
                        None => conn.serve(stream, Peer::new(peer_addr, false)).await,
                        Some(acceptor) => {
                            match tokio::time::timeout(handshake, acceptor.accept(stream)).await {
                                Ok(Ok(s)) => conn.serve(s, Peer::new(peer_addr, true)).await,
                                Ok(Err(e)) => debug!(client = %peer_addr, "TLS handshake failed: {e}"),
                                Err(_) => debug!(client = %peer_addr, "TLS handshake timed out"),
                            }
                        }
                    }
                });
            }
        }
    }
    drop(listener);
    let grace = proxy.settings.drain_timeout;
    let deadline = Instant::now() + grace;
    proxy.draining.store(true, Ordering::Release);
    let linger = Instant::now() + LINGER.min(grace);
    while !conns.is_empty() {
        if tokio::time::timeout_at(linger, conns.join_next())
            .await
            .is_err()
        {
            break;
        }
    }
    let _ = close_tx.send(true);
    while !conns.is_empty() {
        if tokio::time::timeout_at(deadline, conns.join_next())
            .await
            .is_err()
        {
            break;
        }
    }
    // Upgraded connections (their own tasks) and streams still open are closed at the
    // deadline; the count is logged and shown in /metrics.
    proxy.drain_all(deadline).await;
    if !conns.is_empty() {
        warn!(
            open = conns.len(),
            "connections still open after {grace:?}: closing them"
        );
    }
    conns.shutdown().await;
}

fn builder(proxy: &Proxy) -> auto::Builder<TokioExecutor> {
    let limits = proxy.options.limits;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(proxy.options.timeouts.client_header)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers);
    // HTTP/2's own limit would answer a header list over it with a stream reset (which clients
    // retry), and it counts no fields: the proxy enforces both limits itself with a 431 (see
    // `forward`), and hyper only stops lists far over them.
    let h2_list = limits.max_header_bytes.saturating_mul(H2_HEADER_LIST_SLACK);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(h2_list).unwrap_or(u32::MAX));
    builder
}

/// How many times `max_header_bytes` an HTTP/2 header list may reach before hyper refuses its
/// stream itself; up to that, one over the limit is answered 431 by the proxy.
const H2_HEADER_LIST_SLACK: usize = 4;

/// How long a connection that sent no request head by `client_header_timeout` may take to
/// close gracefully (an HTTP/2 client reading its GOAWAY) before it is dropped.
const HEAD_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Tells a client over the connection limit, then closes.
async fn refuse(mut stream: TcpStream, plain: bool) {
    if plain {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            stream.write_all(TOO_MANY).await?;
            stream.shutdown().await
        })
        .await;
    }
}

/// A client connection's place under `max_connections` and in the open-connections count.
/// The connection's task holds it, and so does the tunnel the connection may be upgraded to
/// (see [`forward`]): the place is given back when the last of them ends, so a client cannot
/// open tunnels past the limit.
pub(crate) struct Slot {
    _permit: OwnedSemaphorePermit,
    proxy: Arc<Proxy>,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, proxy: Arc<Proxy>) -> Self {
        proxy.connections.fetch_add(1, Ordering::Relaxed);
        Slot {
            _permit: permit,
            proxy,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.proxy.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a connection task needs.
struct Conn {
    proxy: Arc<Proxy>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    /// Set at shutdown once the linger is over: close gracefully.
    close: watch::Receiver<bool>,
    /// Time origin of the activity stamps.
    epoch: Instant,
    /// When the connection was accepted: its first request head is due `client_header` later.
    accepted: Instant,
    /// This connection's place under `max_connections`, shared with a tunnel it turns into.
    slot: Arc<Slot>,
}

impl Conn {
    async fn serve<I>(mut self, io: I, peer: Peer)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let last = Arc::new(AtomicU64::new(0));
        let io = Tracked {
            io,
            last: last.clone(),
            epoch: self.epoch,
        };
        last.store(io.now_ms(), Ordering::Relaxed);
        let proxy = self.proxy.clone();
        let peer = Arc::new(peer);
        let slot = self.slot.clone();
        // Set once a request head arrived whole (hyper calls the service).
        let headed = Arc::new(AtomicBool::new(false));
        let in_service_headed = headed.clone();
        // Response bodies on this connection waiting on their backend for more.
        let waiting = Arc::new(AtomicUsize::new(0));
        let in_service = waiting.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            in_service_headed.store(true, Ordering::Relaxed);
            let proxy = proxy.clone();
            let peer = peer.clone();
            let slot = slot.clone();
            let waiting = in_service.clone();
            async move {
                let h1 = req.version() < Version::HTTP_2;
                let mut resp = forward::handle(&proxy, req, &peer, &slot).await;
                if h1
                    && proxy.draining.load(Ordering::Acquire)
                    && resp.status() != StatusCode::SWITCHING_PROTOCOLS
                {
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(resp.map(|body| Watched {
                    body,
                    waiting,
                    pending: false,
                }))
            }
        });
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(conn);
        let idle = self.proxy.options.timeouts.client_idle;
        let head_timeout = self.proxy.options.timeouts.client_header;
        let head_due = self.accepted + head_timeout;
        let mut awaiting_first_head = true;
        let mut head_close_due: Option<tokio::time::Instant> = None;
        let mut closing = false;
        let mut shutting_down = false;
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        debug!("connection ended: {e}");
                    }
                    return;
                }
                _ = async { self.close.wait_for(|c| *c).await.map(|_| ()) }, if !shutting_down => {
                    if !closing {
                        conn.as_mut().graceful_shutdown();
                    }
                    closing = true;
                    shutting_down = true;
                }
                _ = tokio::time::sleep_until(head_due), if awaiting_first_head => {
                    awaiting_first_head = false;
                    if !headed.load(Ordering::Relaxed) {
                        // No request was ever seen: an HTTP/2 client (a browser's pre-opened
                        // connection) is told by GOAWAY that none was taken, so it may send
                        // its next one elsewhere; anything else closes at once. A client that
                        // does not read the GOAWAY has `HEAD_CLOSE_GRACE` more.
                        debug!("no request head within {head_timeout:?} of accept: closing");
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                        head_close_due = Some(tokio::time::Instant::now() + HEAD_CLOSE_GRACE);
                    }
                }
                _ = async { tokio::time::sleep_until(head_close_due.unwrap_or_else(tokio::time::Instant::now)).await }, if head_close_due.is_some() => {
                    debug!("no request head, and the graceful close did not end: closed");
                    return;
                }
                _ = idle_for(&last, self.epoch, idle) => {
                    if waiting.load(Ordering::Acquire) > 0 && !shutting_down {
                        // Quiet, not idle: a response waits on its backend.
                        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
                        last.store(now, Ordering::Relaxed);
                        continue;
                    }
                    if closing {
                        debug!("connection idle past its graceful close: closed");
                        return;
                    }
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// A response body that counts itself in its connection's `waiting` while its last poll found
/// nothing from the backend yet (hyper polls a body only when it can write, so a client that
/// stops reading leaves it uncounted).
struct Watched {
    body: forward::ProxyBody,
    waiting: Arc<AtomicUsize>,
    pending: bool,
}

impl Watched {
    fn set_pending(&mut self, pending: bool) {
        if pending != self.pending {
            self.pending = pending;
            if pending {
                self.waiting.fetch_add(1, Ordering::AcqRel);
            } else {
                self.waiting.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.set_pending(false);
    }
}

impl hyper::body::Body for Watched {
    type Data = bytes::Bytes;
    type Error = <forward::ProxyBody as hyper::body::Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.body).poll_frame(cx);
        this.set_pending(r.is_pending());
        r
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Resolves once nothing has moved on the connection for `idle`.
async fn idle_for(last: &AtomicU64, epoch: Instant, idle: Duration) {
    loop {
        let due = epoch + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
        if Instant::now() >= due {
            return;
        }
        tokio::time::sleep_until(due).await;
    }
}

/// A connection's IO that stamps the time of every read and write that moved bytes.
struct Tracked<I> {
    io: I,
    last: Arc<AtomicU64>,
    epoch: Instant,
}

impl<I> Tracked<I> {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn touch(&self) {
        self.last.store(self.now_ms(), Ordering::Relaxed);
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
