//! One HTTP health probe: `GET path` on a fresh connection with a timeout.
//!
//! A fresh connection per probe (no pool) is deliberate: a health check must see what a new
//! client would see, and must never be answered by a pooled connection to a process that has
//! since died.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why a probe failed, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("GET http://{addr}{path}: {reason}")]
    Failed {
        addr: SocketAddr,
        path: String,
        reason: String,
    },
}

impl ProbeError {
    /// The app answered, with a status outside 2xx: it is up, just not healthy.
    pub fn answered(&self) -> bool {
        let ProbeError::Failed { reason, .. } = self;
        reason.starts_with("status")
    }
}

/// Probes `http://addr{path}`; Ok with the status when it is 2xx.
pub async fn probe(addr: SocketAddr, path: &str, timeout: Duration) -> Result<u16, ProbeError> {
    let fail = |reason: String| ProbeError::Failed {
        addr,
        path: path.to_string(),
        reason,
    };
    let attempt = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| fail(e.to_string()))?;
        let conn = tokio::spawn(conn);
        let req = Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .header(hyper::header::USER_AGENT, "cutover-health")
            .header(hyper::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| fail(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let status = resp.status().as_u16();
        let _ = resp.into_body().collect().await;
        conn.abort();
        if (200..300).contains(&status) {
            Ok(status)
        } else {
            Err(fail(format!("status {status}")))
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(fail(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        ))),
    }
}
