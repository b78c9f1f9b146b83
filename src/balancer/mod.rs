//! The balancer as the deployer sees it: a small interface (add, remove, weight, drain, wait until
//! drained, health, counters) that the built-in proxy's admin API implements, and that other
//! balancers (HAProxy) can implement too.
//!
//! The wire types live in [`api`] so the proxy's server side and this client side share one
//! definition of every JSON body.

pub mod api;
pub mod builtin;

use std::time::Duration;

use async_trait::async_trait;

pub use api::{BackendSpec, BackendState, BackendView, Counters, DrainReport, Stats};

/// What a deploy needs from a load balancer. Every method is idempotent: adding a backend that
/// is already there with the same spec, or draining a draining one, succeeds, so a resumed deploy
/// can repeat a step without harm.
#[async_trait]
pub trait Balancer: Send + Sync {
    /// Every backend the balancer knows, with state, health and counters.
    async fn backends(&self) -> anyhow::Result<Vec<BackendView>>;
    /// Adds a backend (new backends start unchecked and receive traffic once the balancer's own
    /// health check passes).
    async fn add(&self, spec: &BackendSpec) -> anyhow::Result<()>;
    /// Removes a backend at once; callers drain first.
    async fn remove(&self, id: &str) -> anyhow::Result<()>;
    async fn set_weight(&self, id: &str, weight: u32) -> anyhow::Result<()>;
    /// Stops sending new requests to the backend; in-flight requests finish.
    async fn drain(&self, id: &str) -> anyhow::Result<()>;
    /// Puts a draining backend back into rotation (undo of [`Balancer::drain`]).
    async fn activate(&self, id: &str) -> anyhow::Result<()>;
    /// Waits until the backend has no request in flight, or the timeout passes (then long-lived
    /// connections are closed and counted in the report).
    async fn wait_drained(&self, id: &str, timeout: Duration) -> anyhow::Result<DrainReport>;
    /// Waits until the balancer's own health check sees the backend healthy.
    async fn wait_healthy(&self, id: &str, timeout: Duration) -> anyhow::Result<()>;
    /// Counters per backend and per release.
    async fn stats(&self) -> anyhow::Result<Stats>;
}
