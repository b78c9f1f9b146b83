//! The accept loop of the small HTTP servers (`cutover serve`, `sample-app`): every connection
//! on its own task, watched for a graceful shutdown. (The proxy has its own listener: it hands
//! sockets over between processes and counts connections.)

use std::error::Error as StdError;
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

/// Connections served at once, at most: past it, new ones wait in the listen queue until one
/// ends. Why: each costs a descriptor, and a flood of idle connections must not use up those a
/// deploy needs (journal, child processes, balancer sockets).
pub const MAX_CONNECTIONS: usize = 2048;

/// Accepts connections on `listener` and serves each with `service()` until `shutdown`
/// resolves, at most [`MAX_CONNECTIONS`] at once; then closes the listener and returns the
/// watch over the open connections, for the caller to drain as it sees fit. `what` names the
/// server in logs; a failed accept (out of file descriptors, usually) pauses `pause` so it does
/// not spin.
pub async fn serve_until<S, B>(
    listener: TcpListener,
    builder: &auto::Builder<TokioExecutor>,
    service: impl Fn() -> S,
    shutdown: impl std::future::Future<Output = ()>,
    what: &'static str,
    pause: Duration,
) -> GracefulShutdown
where
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let graceful = GracefulShutdown::new();
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        // A slot first: with every slot taken, clients wait in the kernel's listen queue.
        let slot = tokio::select! {
            biased;
            () = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    let io = TokioIo::new(stream);
                    // hyper-util's upgradeable connection ignores an HTTP/1-only builder: it
                    // takes HTTP/2 whenever the client opens with its preface.
                    let conn: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> =
                        if builder.is_http2_available() {
                            let conn = builder
                                .serve_connection_with_upgrades(io, service())
                                .into_owned();
                            Box::pin(graceful.watch(conn))
                        } else {
                            let conn = builder.serve_connection(io, service()).into_owned();
                            Box::pin(graceful.watch(conn))
                        };
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!("{what}: connection ended: {e}");
                        }
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!("{what}: accept failed: {e}");
                    tokio::time::sleep(pause).await;
                }
            },
        }
    }
    drop(listener);
    graceful
}
