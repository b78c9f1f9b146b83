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

/// What hosts and the balancer show that the journal does not explain, one sentence each:
/// instances no deployment started, backends pointing where nothing runs, hosts whose
/// `current` disagrees with what the balancer routes to.
pub fn drift(views: &[HostView], started: &[(String, String, u16)]) -> Vec<String> {
    let mut found = Vec::new();
    for v in views.iter().filter(|v| v.error.is_none()) {
        let host = v.host.name.as_str();
        for i in v.alive() {
            let known = started
                .iter()
                .any(|(h, ver, port)| h == host && *ver == i.version && *port == i.port());
            if !known {
                found.push(format!(
                    "{host}: instance {} on {} (pid {}) was started by no recorded deployment",
                    i.version, i.address, i.pid
                ));
            }
        }
        for b in &v.backends {
            let runs = v.alive().any(|i| i.address == b.spec.address);
            if !runs {
                found.push(format!(
                    "{host}: balancer backend {} ({}) points at {} where no instance runs",
                    b.spec.id, b.spec.release, b.spec.address
                ));
            }
        }
        let routed: Vec<&str> = v
            .backends
            .iter()
            .filter(|b| b.state == crate::balancer::BackendState::Active)
            .map(|b| b.spec.release.as_str())
            .collect();
        if let Some(cur) = &v.current {
            if !routed.is_empty() && !routed.contains(&cur.as_str()) {
                found.push(format!(
                    "{host}: current points at {cur} but the balancer routes to {}",
                    routed.join(", ")
                ));
            }
        }
    }
    found
}

/// One line from a running deployment's live status.
pub fn describe_status(status: &serde_json::Value) -> String {
    match status.as_object() {
        Some(map) => map
            .iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => format!("{k}: {s}"),
                other => format!("{k}: {other}"),
            })
            .collect::<Vec<_>>()
            .join(", "),
        None => status.to_string(),
    }
}
