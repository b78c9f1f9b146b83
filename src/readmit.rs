//! `cutover readmit`, and `cutover serve` doing the same by itself: the servers an HAProxy
//! reload or restart dropped go back into the balancer.
//!
//! cutover adds each instance to HAProxy as a dynamic server through the runtime API. Those
//! live only in the running HAProxy: a reload or a restart starts from haproxy.cfg, which has
//! none of them, and every request gets 503 while the instances still run. A readmit is a
//! deploy of the release those hosts run, to them alone, in one batch: each running instance
//! passes its health gate and goes back in without a restart
//! ([`crate::deploy::Deployer::start_new`]). It changes no release, so it runs no hook, no
//! `[[verify]]` suite and no analysis, and a host that fails halts it rather than sending
//! anything "back" (every host is on the release already).

use std::sync::Arc;

use crate::balancer::Balancer;
use crate::config::{BatchSize, BatchSpec, Config, Name, OnFailure, StrategyKind};
use crate::fleet::{self, HostView};
use crate::journal::Journal;
use crate::transport::Transport;

/// A host whose live release runs but which has no server in the balancer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    pub host: String,
    /// The release `current` points at, which runs.
    pub release: String,
    pub address: std::net::SocketAddr,
    pub pid: u32,
}

/// The hosts of `views` that lost their server: read, `current` set, an instance of that
/// release alive, and no backend of the host in the balancer (what `cutover status` names as
/// drift).
pub fn lost(views: &[HostView]) -> Vec<Lost> {
    views
        .iter()
        .filter(|v| v.error.is_none() && v.backends.is_empty())
        .filter_map(|v| {
            let cur = v.current.as_deref()?;
            let i = v.alive().find(|i| i.version == cur)?;
            Some(Lost {
                host: v.host.name.to_string(),
                release: cur.to_string(),
                address: i.address,
                pid: i.pid,
            })
        })
        .collect()
}

/// What a readmit does.
#[derive(Debug)]
pub enum Plan {
    /// The journal records no deployment of the app: there is nothing to re-admit.
    NeverDeployed,
    /// Every host whose live release runs has a server in the balancer.
    NothingMissing,
    /// Deploy `version` to `hosts`, each of which runs it without a server.
    Readmit { version: Name, hosts: Vec<Lost> },
}

impl Plan {
    /// One sentence for people: what was found and what happens.
    pub fn describe(&self, config: &Config) -> String {
        match self {
            Plan::NeverDeployed => format!(
                "nothing to re-admit: no deployment of {} is recorded in {} (deploy a release first)",
                config.app.name,
                config.state_dir.join("journal.db").display()
            ),
            Plan::NothingMissing => "nothing to re-admit: every host whose live release runs has a server in the balancer".to_string(),
            Plan::Readmit { version, hosts } => format!(
                "re-admitting {version} on {}: it runs there, but the balancer has no server for it (an HAProxy reload or restart drops the servers cutover added)",
                names(hosts)
            ),
        }
    }
}

/// `web1, web2`.
pub fn names(hosts: &[Lost]) -> String {
    hosts
        .iter()
        .map(|l| l.host.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The plan from a fleet read: the hosts that lost their server, which must all run one
/// release (a readmit chooses none: hosts on two releases need a deploy, which says which).
pub fn decide(views: &[HostView]) -> anyhow::Result<Plan> {
    let hosts = lost(views);
    let Some(first) = hosts.first() else {
        return Ok(Plan::NothingMissing);
    };
    if let Some(other) = hosts.iter().find(|l| l.release != first.release) {
        let each: Vec<String> = hosts
            .iter()
            .map(|l| format!("{}: {}", l.host, l.release))
            .collect();
        anyhow::bail!(
            "the hosts without a server in the balancer run different releases ({}): `cutover readmit` re-admits one release and does not choose; run `cutover deploy --version {}` (or {}), which puts hosts that run it back without restarting them and moves the others",
            each.join(", "),
            first.release,
            other.release
        );
    }
    let version = Name::parse(&first.release).map_err(|e| {
        anyhow::anyhow!(
            "{} runs {:?}, which cannot be deployed: {e}",
            first.host,
            first.release
        )
    })?;
    Ok(Plan::Readmit { version, hosts })
}

/// Reads the journal and the fleet (hosts and balancer) and decides.
pub async fn plan(
    config: &Config,
    journal: &Journal,
    transport: &Arc<dyn Transport>,
    balancer: &Arc<dyn Balancer>,
) -> anyhow::Result<Plan> {
    if journal.deployments(config.app.name.as_str(), 1)?.is_empty() {
        return Ok(Plan::NeverDeployed);
    }
    let views = fleet::observe(config, transport, balancer)
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the balancer's servers: {e:#}"))?;
    decide(&views)
}

/// The config a readmit of `hosts` runs with: those hosts only, one batch, `on_failure =
/// "halt"`, no hooks, `[[verify]]` suites or analysis.
pub fn config_for(config: &Config, hosts: &[Lost]) -> Config {
    let mut c = config.clone();
    c.hosts
        .retain(|h| hosts.iter().any(|l| l.host == h.name.as_str()));
    c.strategy.kind = StrategyKind::Rolling;
    c.strategy.batch = BatchSpec(vec![BatchSize::Percent(100)]);
    c.strategy.on_failure = OnFailure::Halt;
    c.hooks.clear();
    c.verify.clear();
    c.analysis = None;
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::BackendView;
    use crate::balancer::api::{BackendSpec, Counters, Health};
    use crate::config::Host;
    use crate::instance::{Instance, Recorded};

    fn view(name: &str, current: Option<&str>, alive: &[&str], routed: bool) -> HostView {
        let mut host = Host::for_test(std::path::Path::new(&format!("/nonexistent/{name}")));
        host.name = Name::parse(name).unwrap();
        let instances: Vec<Recorded> = alive
            .iter()
            .enumerate()
            .map(|(i, v)| Recorded {
                instance: Instance {
                    host: name.to_string(),
                    version: v.to_string(),
                    address: format!("127.0.0.11:{}", 4001 + i).parse().unwrap(),
                    pid: 100 + i as u32,
                },
                alive: true,
                background: false,
            })
            .collect();
        let backends = if routed {
            let i = &instances[0].instance;
            vec![BackendView {
                spec: BackendSpec {
                    id: i.backend_id(),
                    address: i.address,
                    host: name.to_string(),
                    release: i.version.clone(),
                    weight: crate::balancer::api::default_weight(),
                    health_path: "/health".into(),
                    preview: false,
                    gated: false,
                },
                state: crate::balancer::BackendState::Active,
                health: Health::Healthy,
                in_flight: 0,
                counters: Counters::default(),
            }]
        } else {
            Vec::new()
        };
        HostView {
            host,
            current: current.map(str::to_string),
            instances,
            releases: Vec::new(),
            print: None,
            backends,
            error: None,
        }
    }

    #[test]
    fn only_hosts_whose_live_release_runs_without_a_server_are_lost() {
        let mut unread = view("web5", Some("v2"), &["v2"], false);
        unread.error = Some("ssh: timed out".into());
        let views = vec![
            view("web1", Some("v2"), &["v2"], false),
            view("web2", Some("v2"), &["v2"], true),
            // Its live release is not running: a deploy's business, not a readmit's.
            view("web3", Some("v2"), &["v1"], false),
            view("web4", None, &[], false),
            unread,
        ];
        let lost = lost(&views);
        assert_eq!(
            lost.iter().map(|l| l.host.as_str()).collect::<Vec<_>>(),
            vec!["web1"]
        );
        assert_eq!(lost[0].release, "v2");
        match decide(&views).unwrap() {
            Plan::Readmit { version, hosts } => {
                assert_eq!(version.as_str(), "v2");
                assert_eq!(hosts.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        let all_routed = vec![view("web2", Some("v2"), &["v2"], true)];
        assert!(matches!(decide(&all_routed).unwrap(), Plan::NothingMissing));
    }

    #[test]
    fn lost_hosts_on_two_releases_are_refused_with_the_deploys_that_fix_them() {
        let views = vec![
            view("web1", Some("v2"), &["v2"], false),
            view("web2", Some("v1"), &["v1"], false),
        ];
        let e = decide(&views).unwrap_err().to_string();
        assert!(e.contains("web1: v2, web2: v1"), "{e}");
        assert!(e.contains("`cutover deploy --version v2` (or v1)"), "{e}");
    }
}
