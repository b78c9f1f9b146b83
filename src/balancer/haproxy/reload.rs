//! The servers a reload or restart of HAProxy drops in the middle of a deployment, put back by
//! that deployment.
//!
//! cutover's servers are dynamic (`add server`): they live only in the running HAProxy process.
//! A reload (`systemctl reload haproxy`, `haproxy -sf`, a certbot hook) or a restart starts a
//! process from haproxy.cfg, without them. An idle fleet gets them back from `cutover readmit`
//! or serve ([`crate::readmit`]). A deployment cannot wait for that: its next step found its
//! server gone and it rolled back onto an empty backend, or it went on adding the next hosts
//! and ended "succeeded" with the hosts before them out of HAProxy.
//!
//! So the HAProxy balancer of a deployment keeps [`Known`]: the servers of its backend as its
//! last reading saw them and as its own changes since left them. Every reading asks `show info`
//! and `show stat` on one connection, so both answers come from one HAProxy process; when that
//! process is not the one the servers were known in, the ready ones it lacks go back
//! ([`Inner::put_back`]) before the reading returns, the way a new server goes in: at weight 0,
//! then at their weight once HAProxy's own check passes. The step that read carries on, and
//! the deployment's report says what was put back. A deployment's steps do not always read
//! HAProxy (a build, a slow health gate, a verify suite, a canary's pause), so its balancer
//! also reads the backend every [`WATCH`] by itself ([`watch`]): a reload costs about that,
//! plus one HAProxy check, of 503s.
//!
//! Design choices:
//! - Only a deployment (deploy, rollback, readmit, a serve job) puts servers back: it holds the
//!   deploy lock, so its view of the backend is the current one. A `cutover status` connected
//!   before a deploy would put back servers the deploy has retired since.
//! - Servers in drain or maint are not put back: they were on their way out, and the new process
//!   has nothing in flight on them (the old one finishes what it had), so their drain is over.
//! - A server missing from a reading of the same process was deleted by someone else: it is
//!   forgotten, never put back.
//! - A reading that overlaps one of this process's own changes is not taken as the truth
//!   (`changes`), and changes and put-backs hold one lock, so neither runs in the other's middle.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use super::{Inner, POLL, StatRow, parse_server_name};
use crate::balancer::api::BackendState;

/// How often a deployment's balancer reads the backend when no step does.
const WATCH: Duration = Duration::from_millis(250);

/// Reads the backend every [`WATCH`] for as long as `inner` lives, so that what a reload
/// drops is put back while no step of the deployment reads HAProxy.
pub(super) fn watch(inner: Weak<Inner>) {
    let spawned = std::thread::Builder::new()
        .name("haproxy-watch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(WATCH);
                let Some(inner) = inner.upgrade() else {
                    return;
                };
                // Unreachable while HAProxy restarts: the next round tries again, and the
                // deployment's own calls wait it out and say so.
                if let Err(e) = inner.rows() {
                    tracing::debug!("reading HAProxy's backend: {e:#}");
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(
            "cannot watch HAProxy for reloads ({e}): servers a reload drops are put back at the deployment's next step that reads HAProxy"
        );
    }
}

/// A server of the backend as this process last knew it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct KnownServer {
    pub address: SocketAddr,
    /// The weight set on it (0 while a new server waits for HAProxy's check).
    pub weight: u32,
    /// Ready (taking requests, or waiting for its check to do so), not in drain or maint.
    pub ready: bool,
}

/// cutover's servers of the backend, and the HAProxy process they were in.
#[derive(Debug, Default)]
pub(super) struct Known {
    process: Option<String>,
    servers: BTreeMap<String, KnownServer>,
    /// Changes this process made: a reading begun before one may predate it.
    changes: u64,
}

impl Known {
    /// A reading of `process`: what it shows is what is known now.
    pub fn learn(&mut self, process: &str, rows: &[StatRow]) {
        self.process = Some(process.to_string());
        self.servers = rows
            .iter()
            .filter(|r| parse_server_name(&r.name).is_some())
            .filter_map(|r| {
                let address = r.addr.as_deref()?.parse().ok()?;
                let server = KnownServer {
                    address,
                    weight: r.uweight.unwrap_or(r.weight),
                    ready: r.state() == BackendState::Active,
                };
                Some((r.name.clone(), server))
            })
            .collect();
    }

    /// The servers a reading of `process` lacks because that process is new: the ready ones
    /// known in the process before. None when the process is the one they were known in.
    pub fn lost(&self, process: &str, rows: &[StatRow]) -> Vec<(String, KnownServer)> {
        if self.process.as_deref().is_none_or(|p| p == process) {
            return Vec::new();
        }
        self.servers
            .iter()
            .filter(|(name, s)| s.ready && !rows.iter().any(|r| &r.name == *name))
            .map(|(name, s)| (name.clone(), s.clone()))
            .collect()
    }

    pub fn added(&mut self, name: &str, address: SocketAddr) {
        let server = KnownServer {
            address,
            weight: 0,
            ready: true,
        };
        self.servers.insert(name.to_string(), server);
    }

    pub fn deleted(&mut self, name: &str) {
        self.servers.remove(name);
    }

    pub fn set_ready(&mut self, name: &str, ready: bool) {
        if let Some(s) = self.servers.get_mut(name) {
            s.ready = ready;
        }
    }

    pub fn set_weight(&mut self, name: &str, weight: u32) {
        if let Some(s) = self.servers.get_mut(name) {
            s.weight = weight;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The pid of a process id `pid@start`, for messages.
fn pid(process: &str) -> &str {
    process.split('@').next().unwrap_or(process)
}

impl Inner {
    /// Makes a change to HAProxy (`run`) and records it in what is known (`record`), under the
    /// lock that put-backs hold; without [`Known`], only runs it.
    pub(super) fn change<T>(
        &self,
        run: impl FnOnce() -> anyhow::Result<T>,
        record: impl FnOnce(&mut Known),
    ) -> anyhow::Result<T> {
        let Some(known) = &self.known else {
            return run();
        };
        let mut known = lock(known);
        let done = run()?;
        record(&mut known);
        known.changes += 1;
        Ok(done)
    }

    /// A reading of the backend's rows that puts back what a new HAProxy process lost first.
    pub(super) fn rows_kept(&self, known: &Mutex<Known>) -> anyhow::Result<Vec<StatRow>> {
        let mut overlapped = 0;
        loop {
            let before = lock(known).changes;
            let (process, rows) = self.read()?;
            let mut k = lock(known);
            if k.changes != before {
                // One of this process's changes ran meanwhile: the reading may predate it.
                overlapped += 1;
                if overlapped < 5 {
                    continue;
                }
                return Ok(rows);
            }
            let lost = k.lost(&process, &rows);
            if lost.is_empty() {
                k.learn(&process, &rows);
                return Ok(rows);
            }
            let from = k.process.replace(process.clone()).unwrap_or_default();
            self.put_back(&mut k, &from, &process, lost);
            k.changes += 1;
        }
    }

    /// Adds `lost` back (a new HAProxy process from `from` to `to` lacks them) as `add` adds a
    /// server: at weight 0, with its weight pending until HAProxy's check passes. Waits for
    /// those checks a little (until each has passed, up to two check intervals and a second):
    /// every request gets 503 until a server is back. Says what it did in a notice. A server
    /// still waiting when the wait ends (or HAProxy stops answering) gets its weight from a
    /// later reading, as any new server.
    fn put_back(&self, known: &mut Known, from: &str, to: &str, lost: Vec<(String, KnownServer)>) {
        let started = Instant::now();
        let mut back = Vec::new();
        let mut failed = Vec::new();
        for (name, server) in lost {
            let Some((id, _, _)) = parse_server_name(&name) else {
                continue;
            };
            let weight = lock(&self.pending_weights)
                .get(&id)
                .copied()
                .unwrap_or(server.weight);
            match self.add_server(&name, server.address) {
                Ok(()) => {
                    known.added(&name, server.address);
                    self.pending(&id, (weight > 0).then_some(weight));
                    back.push((name, id));
                }
                Err(e) => failed.push(format!("{name} ({e:#})")),
            }
        }
        let deadline = started + self.settings.check_interval * 2 + Duration::from_secs(1);
        let waiting = loop {
            let rows = self.read().map(|(_, rows)| rows).unwrap_or_default();
            for (name, id) in &back {
                let up = rows.iter().any(|r| &r.name == name && r.is_up());
                let weight = lock(&self.pending_weights).get(id).copied();
                if let Some(w) = weight.filter(|_| up) {
                    let set = format!("set server {} weight {w}", self.full(name));
                    if self.command(&set, &[]).is_ok() {
                        self.pending(id, None);
                        known.set_weight(name, w);
                    }
                }
            }
            let waiting: Vec<&str> = back
                .iter()
                .filter(|(_, id)| lock(&self.pending_weights).contains_key(id))
                .map(|(name, _)| name.as_str())
                .collect();
            if waiting.is_empty() || rows.is_empty() || Instant::now() >= deadline {
                break waiting.join(", ");
            }
            std::thread::sleep(POLL);
        };
        let names: Vec<&str> = back.iter().map(|(name, _)| name.as_str()).collect();
        let mut notice = format!(
            "HAProxy was reloaded or restarted (pid {} replaced by pid {}), which drops the servers cutover added: put back {} server(s) in {:.1}s: {}",
            pid(from),
            pid(to),
            names.len(),
            started.elapsed().as_secs_f64(),
            names.join(", ")
        );
        if !waiting.is_empty() {
            notice.push_str(&format!(
                "; HAProxy's check has not passed yet for {waiting}: each takes requests once it does"
            ));
        }
        if !failed.is_empty() {
            notice.push_str(&format!(
                "; could NOT put back {}: once this deployment has ended, run `cutover readmit`",
                failed.join(", ")
            ));
        }
        lock(&self.notices).push(notice);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, status: &str, weight: u32) -> StatRow {
        StatRow {
            proxy: "app".into(),
            name: name.into(),
            status: status.into(),
            weight,
            uweight: Some(weight),
            addr: Some("127.0.0.1:4100".into()),
            ..StatRow::default()
        }
    }

    #[test]
    fn a_new_process_lost_the_ready_servers_of_the_one_before() {
        let mut known = Known::default();
        let rows = vec![
            row("web1:4100:v2", "UP", 100),
            row("web2:4100:v1", "DRAIN", 100),
            row("web3:4100:v1", "MAINT", 0),
            row("web4:4100:v2", "UP", 0),
            row("mine", "UP", 1),
            row("BACKEND", "UP", 100),
        ];
        known.learn("10@1", &rows);
        assert!(known.lost("10@1", &rows).is_empty());
        let lost = known.lost("11@2", &[row("mine", "UP", 1)]);
        let names: Vec<&str> = lost.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["web1:4100:v2", "web4:4100:v2"]);
        assert_eq!(lost[0].1.weight, 100);
        assert_eq!(lost[1].1.weight, 0, "waiting for its check: pending weight");
    }

    #[test]
    fn a_server_gone_from_the_same_process_is_forgotten_not_lost() {
        let mut known = Known::default();
        known.learn("10@1", &[row("web1:4100:v2", "UP", 100)]);
        assert!(known.lost("10@1", &[]).is_empty());
        known.learn("10@1", &[]);
        assert!(known.lost("11@2", &[]).is_empty());
    }

    #[test]
    fn own_changes_are_known_before_the_next_reading() {
        let mut known = Known::default();
        known.learn("10@1", &[row("web1:4100:v1", "UP", 100)]);
        known.added("web1:4200:v2", "127.0.0.1:4200".parse().unwrap());
        known.set_weight("web1:4200:v2", 100);
        known.set_ready("web1:4100:v1", false);
        let lost = known.lost("11@2", &[]);
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert_eq!(lost[0].0, "web1:4200:v2");
        assert_eq!(lost[0].1.weight, 100);
        known.deleted("web1:4200:v2");
        assert!(known.lost("11@2", &[]).is_empty());
    }
}
