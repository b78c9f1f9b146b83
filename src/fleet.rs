//! What the fleet looks like right now, read from the hosts (pid files, `current`) and the
//! balancer (backends), never only from our own records.

use std::sync::Arc;

use futures_util::future::join_all;

use crate::balancer::{BackendView, Balancer};
use crate::config::{Config, Host};
use crate::instance::{self, Recorded};
use crate::release;
use crate::source::TreePrint;
use crate::transport::{Transport, run_ok, sh_quote};

/// One host as observed.
#[derive(Debug, Clone)]
pub struct HostView {
    pub host: Host,
    /// Release `current` points at.
    pub current: Option<String>,
    /// Instances recorded by pid files, alive or not.
    pub instances: Vec<Recorded>,
    /// Releases staged on the host (`releases/<version>/`).
    pub releases: Vec<String>,
    /// What the host's copy of the release being deployed was packed from (its marker's
    /// `tree` lines; path releases, and only in a deploy's read): see
    /// [`crate::release::check_tree`].
    pub print: Option<TreePrint>,
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

/// Reads every host (in parallel, one round trip each) and the balancer.
pub async fn observe(
    config: &Config,
    transport: &Arc<dyn Transport>,
    balancer: &Arc<dyn Balancer>,
) -> anyhow::Result<Vec<HostView>> {
    observe_for(config, transport, balancer, None).await
}

/// [`observe`] for a deploy of `deploying`: each host's [`HostView::print`] of it too.
pub async fn observe_for(
    config: &Config,
    transport: &Arc<dyn Transport>,
    balancer: &Arc<dyn Balancer>,
    deploying: Option<&str>,
) -> anyhow::Result<Vec<HostView>> {
    Ok(
        observe_locking(config, transport, balancer, deploying, None)
            .await?
            .0,
    )
}

/// [`observe_for`], with `lock` (a host's name and a script, see
/// [`crate::fleet_lock::FleetLock::folded_script`]) run ahead of that host's read in the same
/// round trip: its output, or why the host could not be read, comes back beside the views.
/// The other hosts' reads carry [`crate::fleet_lock::peek_script`]: the locks found there
/// come back too.
pub async fn observe_locking(
    config: &Config,
    transport: &Arc<dyn Transport>,
    balancer: &Arc<dyn Balancer>,
    deploying: Option<&str>,
    lock: Option<&(String, String)>,
) -> anyhow::Result<Locking> {
    let backends = balancer.backends().await?;
    Ok(read_hosts(config, transport, &backends, deploying, lock).await)
}

/// What [`observe_locking`] read: the views, the lock host's reply, and the locks found on
/// the other hosts.
pub type Locking = (
    Vec<HostView>,
    Option<anyhow::Result<String>>,
    Vec<(Host, crate::fleet_lock::Record)>,
);

/// [`observe`], reading the hosts also when the balancer cannot be read (after a reboot, or
/// HAProxy down): what runs where is still known; the error says why the balancer's side is
/// not (every view then has no backends).
pub async fn observe_even_without_balancer(
    config: &Config,
    transport: &Arc<dyn Transport>,
    balancer: &Arc<dyn Balancer>,
) -> (Vec<HostView>, Option<String>) {
    let (backends, error) = match balancer.backends().await {
        Ok(backends) => (backends, None),
        Err(e) => (Vec::new(), Some(format!("{e:#}"))),
    };
    (
        read_hosts(config, transport, &backends, None, None).await.0,
        error,
    )
}

async fn read_hosts(
    config: &Config,
    transport: &Arc<dyn Transport>,
    backends: &[BackendView],
    deploying: Option<&str>,
    lock: Option<&(String, String)>,
) -> Locking {
    let reads = config.hosts.iter().map(|h| {
        let transport = transport.clone();
        let host = h.clone();
        let (takes, prelude) = match lock {
            Some((name, script)) if name == host.name.as_str() => (true, Some(script.clone())),
            Some(_) => (false, Some(crate::fleet_lock::peek_script(&host))),
            None => (false, None),
        };
        async move {
            let (read, locked) =
                snapshot_with(transport.as_ref(), &host, deploying, prelude.as_deref()).await;
            (host, read, takes, locked)
        }
    });
    let results = join_all(reads).await;
    let mut lock_reply = None;
    let mut peeks = Vec::new();
    let views = results
        .into_iter()
        .map(|(host, read, takes, locked)| {
            match locked {
                Some(reply) if takes => lock_reply = Some(reply),
                Some(Ok(out)) => {
                    if let Some(r) = crate::fleet_lock::parse_peek(&out, &host) {
                        peeks.push((host.clone(), r));
                    }
                }
                _ => {}
            }
            let mine = backends
                .iter()
                .filter(|b| b.spec.host == host.name.as_str())
                .cloned()
                .collect();
            let (snap, error) = match read {
                Ok(s) => (s, None),
                Err(e) => (Snapshot::default(), Some(format!("{e:#}"))),
            };
            HostView {
                host,
                current: snap.current,
                instances: snap.instances,
                releases: snap.releases,
                print: snap.print,
                backends: mine,
                error,
            }
        })
        .collect();
    (views, lock_reply, peeks)
}

/// What one host reports about itself.
#[derive(Debug, Default)]
struct Snapshot {
    current: Option<String>,
    instances: Vec<Recorded>,
    releases: Vec<String>,
    print: Option<TreePrint>,
}

/// `current`, pid files and staged releases (and the `tree` lines of the marker of the release
/// being deployed, read with builtins: no `cat`), in one script.
#[cfg(test)]
async fn snapshot(
    transport: &dyn Transport,
    host: &Host,
    deploying: Option<&str>,
) -> anyhow::Result<Snapshot> {
    snapshot_with(transport, host, deploying, None).await.0
}

/// [`snapshot`], with `prelude` run first in the same script; its output (up to
/// [`crate::fleet_lock::END`]) or the error that kept the host from answering comes back
/// beside the snapshot.
async fn snapshot_with(
    transport: &dyn Transport,
    host: &Host,
    deploying: Option<&str>,
    prelude: Option<&str>,
) -> (anyhow::Result<Snapshot>, Option<anyhow::Result<String>>) {
    let layout = release::Layout::of(host);
    let marks = deploying.map_or(String::new(), |v| {
        format!(
            "echo '--marks'\n\
             if [ -f {marker} ]; then while IFS= read -r l; do case $l in tree*) echo \"$l\" ;; esac; done < {marker}; fi\n",
            marker = sh_quote(format!("{v}/{}", release::MARKER)),
        )
    });
    let script = format!(
        "{prelude}{alive}if cd -P {current} 2>/dev/null; then echo \"current ${{PWD##*/}}\"; fi\n\
         echo '--instances'\n{list}echo '--releases'\n\
         if cd {releases} 2>/dev/null; then for r in *; do [ -d \"$r\" ] && echo \"$r\"; done\n\
         {marks}fi\nexit 0\n",
        prelude = prelude.unwrap_or_default(),
        alive = instance::alive_fn(),
        current = sh_quote(layout.current().to_string_lossy()),
        list = instance::list_script(host),
        releases = sh_quote(layout.releases().to_string_lossy()),
    );
    let out = match run_ok(
        transport,
        host,
        "reading the host",
        &script,
        transport.step_timeout(),
    )
    .await
    {
        Ok(out) => out,
        Err(e) => {
            let read = anyhow::anyhow!("{e:#}");
            return (Err(read), prelude.map(|_| Err(e)));
        }
    };
    let (locked, out) = match prelude {
        Some(_) => {
            let (locked, out) = crate::fleet_lock::split(&out);
            (Some(Ok(locked.to_string())), out)
        }
        None => (None, out.as_str()),
    };
    (parse_snapshot(host, out), locked)
}

fn parse_snapshot(host: &Host, out: &str) -> anyhow::Result<Snapshot> {
    let (head, rest) = out.split_once("--instances\n").unwrap_or((out, ""));
    let (instances, releases) = rest.split_once("--releases\n").unwrap_or((rest, ""));
    let (releases, marks) = releases.split_once("--marks\n").unwrap_or((releases, ""));
    Ok(Snapshot {
        current: head
            .lines()
            .find_map(|l| l.strip_prefix("current "))
            .filter(|v| !v.is_empty())
            .map(str::to_string),
        instances: instance::parse_list(host, instances),
        releases: releases
            .lines()
            .filter(|r| !r.is_empty() && !r.ends_with(".partial") && *r != "*")
            .map(str::to_string)
            .collect(),
        print: TreePrint::from_marker(marks),
    })
}

/// What hosts and the balancer show that the journal does not explain, one sentence each:
/// instances no deployment started, backends pointing where nothing runs, hosts whose
/// `current` disagrees with what the balancer routes to, hosts the balancer lost. `moving` names the releases an
/// unfinished deployment (running, or interrupted) moves hosts between: a host caught between
/// two of them, its new instance routed and `current` not yet moved, is that deployment's.
pub fn drift(
    views: &[HostView],
    started: &[(String, String, u16)],
    moving: &[&str],
) -> Vec<String> {
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
        // A balancer that lost its servers (an HAProxy reload or restart drops the servers
        // cutover added) leaves every client of this host failing or elsewhere.
        if v.backends.is_empty() && moving.is_empty() {
            if let Some(cur) = &v.current {
                if let Some(i) = v.alive().find(|i| &i.version == cur) {
                    found.push(format!(
                        "{host}: {cur} runs on {} (pid {}) but the balancer has no backend for this host (an HAProxy reload or restart drops the servers cutover added): `cutover readmit` adds it back without restarting it (`cutover serve` does so by itself)",
                        i.address, i.pid
                    ));
                }
            }
        }
        let routed: Vec<&str> = v
            .backends
            .iter()
            .filter(|b| b.state == crate::balancer::BackendState::Active)
            .map(|b| b.spec.release.as_str())
            .collect();
        let mid_switch = moving.contains(&v.current.as_deref().unwrap_or_default())
            && routed.iter().all(|r| moving.contains(r));
        if let (Some(cur), false) = (&v.current, mid_switch) {
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

/// One line from a running deployment's live status. A value that already starts with its
/// key (`"batch": "batch 1/3"`, kept so in the JSON) is shown alone: `batch: batch 1/3` reads
/// as a stutter.
pub fn describe_status(status: &serde_json::Value) -> String {
    use serde_json::Value;
    let number = |n: &serde_json::Number| match n.as_f64() {
        Some(f) if f.fract() != 0.0 => format!("{f:.1}"),
        Some(f) if n.is_f64() => format!("{f:.0}"),
        _ => n.to_string(),
    };
    match status.as_object() {
        Some(map) => map
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| match v {
                Value::String(s)
                    if s.strip_prefix(k.as_str())
                        .is_some_and(|rest| rest.starts_with(' ')) =>
                {
                    s.clone()
                }
                // The canary's last analysis, as its progress line says it.
                Value::Object(_) if k == "verdict" => {
                    match serde_json::from_value::<crate::analysis::Judgement>(v.clone()) {
                        Ok(j) => format!("last analysis: {}", j.summary()),
                        Err(_) => format!("{k}: {v}"),
                    }
                }
                Value::String(s) => format!("{}: {s}", k.replace('_', " ")),
                // `elapsed_s: 12` reads as "elapsed: 12 s".
                Value::Number(n) => match (k.strip_suffix("_ms"), k.strip_suffix("_s")) {
                    (Some(name), _) => format!("{}: {} ms", name.replace('_', " "), number(n)),
                    (_, Some(name)) => format!("{}: {} s", name.replace('_', " "), number(n)),
                    _ => format!("{}: {}", k.replace('_', " "), number(n)),
                },
                other => format!("{}: {other}", k.replace('_', " ")),
            })
            .collect::<Vec<_>>()
            .join(", "),
        None => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review finding: a deployer killed between a host's admit and its settle left the new
    /// instance routed and `current` on the old release, and `status` called it drift the
    /// journal does not explain, beside the "interrupted" line that explains it.
    #[test]
    fn a_host_caught_mid_switch_by_an_unfinished_deployment_is_not_drift() {
        use crate::balancer::api::{BackendSpec, Counters, Health};
        let host = Host::for_test(std::path::Path::new("/nonexistent/web1"));
        let address: std::net::SocketAddr = "127.0.0.11:4001".parse().unwrap();
        let instance = crate::instance::Instance {
            host: host.name.to_string(),
            version: "v2".into(),
            address,
            pid: 1,
        };
        let view = HostView {
            host: host.clone(),
            current: Some("v1".into()),
            instances: vec![Recorded {
                instance: instance.clone(),
                alive: true,
                background: false,
            }],
            releases: vec!["v1".into(), "v2".into()],
            print: None,
            backends: vec![BackendView {
                spec: BackendSpec {
                    id: instance.backend_id(),
                    address,
                    host: host.name.to_string(),
                    release: "v2".into(),
                    weight: crate::balancer::api::default_weight(),
                    health_path: "/health".into(),
                    preview: false,
                    gated: false,
                },
                state: crate::balancer::BackendState::Active,
                health: Health::Healthy,
                in_flight: 0,
                counters: Counters::default(),
            }],
            error: None,
        };
        let started = vec![(host.name.to_string(), "v2".to_string(), 4001)];
        let views = std::slice::from_ref(&view);
        let found = drift(views, &started, &[]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].contains("current points at v1 but the balancer routes to v2"),
            "{found:?}"
        );
        assert!(drift(views, &started, &["v2", "v1"]).is_empty());
        // Another release routed is drift all the same.
        assert_eq!(drift(views, &started, &["v3", "v1"]).len(), 1);
    }

    /// Regression: with `command_timeout = "5s"`, `cutover status` against a hung host waited
    /// 30 s and said "within 30s". A pid file that is a FIFO nobody writes hangs the read
    /// like a hung disk.
    #[tokio::test]
    async fn reading_a_hung_host_gives_up_at_the_command_timeout() {
        let d = tempfile::tempdir().unwrap();
        let host = Host::for_test(d.path());
        let run = release::Layout::of(&host).run_dir();
        std::fs::create_dir_all(&run).unwrap();
        let st = std::process::Command::new("mkfifo")
            .arg(run.join("v1-20001.pid"))
            .status()
            .unwrap();
        assert!(st.success());
        let t = crate::transport::local::LocalTransport::with_step_timeout(
            std::time::Duration::from_millis(500),
        );
        let started = std::time::Instant::now();
        let e = format!("{:#}", snapshot(&t, &host, None).await.unwrap_err());
        assert!(e.contains("did not finish within 500ms"), "{e}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let e = format!("{:#}", instance::list(&t, &host).await.unwrap_err());
        assert!(e.contains("did not finish within 500ms"), "{e}");
    }

    /// The rolling deploy's status names its batch "batch 1/3": `status` shows that once.
    #[test]
    fn a_status_value_that_names_its_key_is_not_prefixed_again() {
        let line = describe_status(&serde_json::json!({
            "strategy": "rolling", "phase": "moving hosts", "batch": "batch 1/3",
            "next": "batch 2/3", "weight": 10,
        }));
        assert!(!line.contains("batch: batch"), "{line}");
        assert!(line.contains("batch 1/3"), "{line}");
        assert!(line.contains("next: batch 2/3"), "{line}");
        assert!(line.contains("phase: moving hosts"), "{line}");
        assert!(line.contains("weight: 10"), "{line}");
    }

    /// A review found raw JSON in `cutover status`: the canary's verdict as an object, and
    /// seconds as `blue_stops_in_s: 19.0`.
    #[test]
    fn a_status_reads_as_text() {
        let verdict =
            crate::analysis::Judgement::unjudged("only 0 requests (min_requests 10)".into());
        let line = describe_status(&serde_json::json!({
            "strategy": "canary", "step": "step 1/2", "elapsed_s": 12, "blue_stops_in_s": 19.0,
            "verdict": verdict, "gone": null,
        }));
        assert!(!line.contains('{') && !line.contains("null"), "{line}");
        assert!(line.contains("elapsed: 12 s"), "{line}");
        assert!(line.contains("blue stops in: 19 s"), "{line}");
        assert!(
            line.contains("last analysis: inconclusive: only 0 requests"),
            "{line}"
        );
    }
}
