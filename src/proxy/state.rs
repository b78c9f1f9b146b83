//! Routing state on disk: the backends (spec and routing state, not counters or health) as
//! JSON, rewritten after every admin change and read back at start, so a restarted proxy keeps
//! routing to the same fleet.
//!
//! Writes go to a spare file in the same directory, which then trades places with the state
//! file (see [`crate::atomic_file`]), so a crash of the proxy never leaves a half-written state
//! behind. They are not fsynced: the state only has to survive the proxy process (a crash,
//! `--takeover`, a restart), and the page cache outlives processes. A power loss stops every
//! backend this file names too, so making it durable would cost a deploy two disk flushes per
//! host switch (a few ms each, on the critical path) and buy nothing. A file the kernel left
//! empty after such a crash reads as no backends; one left half-written is read from the spare,
//! the state before the last change.
//! Health is not persisted on purpose: a restored backend starts `Unknown` and is checked at
//! once.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::balancer::api::{BackendSpec, BackendState};

const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    backends: Vec<Route>,
}

/// One persisted backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Route {
    pub(crate) spec: BackendSpec,
    pub(crate) state: BackendState,
}

/// Reads the state file; a missing file is an empty state, a corrupt one an error naming it.
pub(crate) fn load(path: &Path) -> anyhow::Result<Vec<Route>> {
    let parse = |bytes: &[u8]| -> anyhow::Result<Vec<Route>> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            // Lost in a power cut before it reached the disk (see above).
            return Ok(Vec::new());
        }
        let file: StateFile = serde_json::from_slice(bytes).with_context(|| {
            format!(
                "the proxy state file {} is corrupt: fix it, or move it away to start with no backends",
                path.display()
            )
        })?;
        if file.version != VERSION {
            anyhow::bail!(
                "the proxy state file {} has version {}, this cutover reads version {VERSION}",
                path.display(),
                file.version
            );
        }
        Ok(file.backends)
    };
    Ok(crate::atomic_file::read_either(path, parse)
        .with_context(|| format!("cannot read the proxy state file {}", path.display()))?
        .unwrap_or_default())
}

/// Writes the state atomically (no fsync: see the module docs), through
/// [`crate::atomic_file::replace`]: `proxy-routes.json.prev` keeps the state before the last
/// change.
pub(crate) fn save(path: &Path, backends: Vec<Route>) -> anyhow::Result<()> {
    let file = StateFile {
        version: VERSION,
        backends,
    };
    let mut json = serde_json::to_vec_pretty(&file).context("cannot encode the proxy state")?;
    json.push(b'\n');
    crate::atomic_file::replace(path, &json)
        .with_context(|| format!("cannot write the proxy state file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(id: &str, state: BackendState) -> Route {
        Route {
            spec: BackendSpec {
                id: id.into(),
                address: "127.0.0.1:4100".parse().unwrap(),
                host: "web1".into(),
                release: "v1".into(),
                weight: 100,
                health_path: "/health".into(),
                preview: false,
                gated: false,
            },
            state,
        }
    }

    #[test]
    fn round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/proxy-routes.json");
        assert!(load(&path).unwrap().is_empty());
        let routes = vec![
            route("a", BackendState::Active),
            route("b", BackendState::Draining),
        ];
        save(&path, routes.clone()).unwrap();
        assert_eq!(load(&path).unwrap(), routes);
    }

    #[test]
    fn the_previous_state_stays_readable_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy-routes.json");
        let first = vec![route("a", BackendState::Active)];
        let second = vec![route("b", BackendState::Draining)];
        save(&path, first.clone()).unwrap();
        save(&path, second.clone()).unwrap();
        assert_eq!(load(&path).unwrap(), second);
        assert_eq!(load(&crate::atomic_file::spare_path(&path)).unwrap(), first);
    }

    #[test]
    fn an_empty_file_is_no_backends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy-routes.json");
        std::fs::write(&path, "").unwrap();
        assert!(load(&path).unwrap().is_empty());
    }

    #[test]
    fn corrupt_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy-routes.json");
        std::fs::write(&path, "{ not json").unwrap();
        let e = format!("{:#}", load(&path).unwrap_err());
        assert!(
            e.contains("proxy-routes.json") && e.contains("corrupt"),
            "{e}"
        );
    }
}
