//! What the fleet looks like right now, read from the hosts (pid files, `current`) and the
//! balancer (backends), never only from our own records.

use std::sync::Arc;

use futures_util::future::join_all;

use crate::balancer::{BackendView, Balancer};
use crate::config::{Config, Host};
use crate::instance::{self, Recorded};
use crate::release;
use crate::transport::Transport;

/// One host as observed.
#[derive(Debug, Clone)]
pub struct HostView {
    pub host: Host,
    /// Release `current` points at.
    pub current: Option<String>,
    /// Instances recorded by pid files, alive or not.
    pub instances: Vec<Recorded>,
    /// Balancer backends that belong to this host.
    pub backends: Vec<BackendView>,
    /// Set when the host could not be read.
    pub error: Option<String>,
}

impl HostView {
    pub fn alive(&self) -> impl Iterator<Item = &instance::Instance> {
        self.instances
            .iter()
            .filter(|r| r.alive)
            .map(|r| &r.instance)
    }
}

/// Reads every host (in parallel) and the balancer.
pub async fn observe(
    config: &Config,
    transport: &Arc<dyn Transport>,
    balancer: &Arc<dyn Balancer>,
) -> anyhow::Result<Vec<HostView>> {
    let backends = balancer.backends().await?;
    let reads = config.hosts.iter().map(|h| {
        let transport = transport.clone();
        let host = h.clone();
        async move {
            let current = release::current(transport.as_ref(), &host).await;
            let instances = instance::list(transport.as_ref(), &host).await;
            (host, current, instances)
        }
    });
    let results = join_all(reads).await;
    Ok(results
        .into_iter()
        .map(|(host, current, instances)| {
            let mut error = None;
            let current = current.unwrap_or_else(|e| {
                error = Some(e.to_string());
                None
            });
            let instances = instances.unwrap_or_else(|e| {
                error = Some(e.to_string());
                Vec::new()
            });
            let mine = backends
                .iter()
                .filter(|b| b.spec.host == host.name.as_str())
                .cloned()
                .collect();
            HostView {
                host,
                current,
                instances,
                backends: mine,
                error,
            }
        })
        .collect())
}
