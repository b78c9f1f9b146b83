//! Routing state on disk: the backends (spec and routing state, not counters or health) as
//! JSON, rewritten after every admin change and read back at start, so a restarted proxy keeps
//! routing to the same fleet.
//!
//! Writes go to a spare file in the same directory, which then trades places with the state
//! file (see [`save`]), so a crash of the proxy never leaves a half-written state behind. They
//! are not fsynced: the state
//! only has to survive the proxy process (a crash, `--takeover`, a restart), and the page cache
//! outlives processes. A power loss stops every backend this file names too, so making it
//! durable would cost a deploy two disk flushes per host switch (a few ms each, on the critical
//! path) and buy nothing. A file the kernel left empty after such a crash reads as no backends.
//! Health is not persisted on purpose: a restored backend starts `Unknown` and is checked at
//! once.

use std::path::{Path, PathBuf};

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
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot read the proxy state file {}", path.display()));
        }
    };
    if text.trim().is_empty() {
        // Written, renamed, then lost in a power cut before it reached the disk (see above).
        return Ok(Vec::new());
    }
    let file: StateFile = serde_json::from_str(&text).with_context(|| {
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
}

/// Writes the state atomically (no fsync: see the module docs): the new state goes into the
/// spare file ([`spare_path`], which holds an older state), then the spare and the state file
/// trade places in one `renameat2(RENAME_EXCHANGE)`.
///
/// Why not a new temporary file renamed over the old one: on ext4 a rename that replaces a file
/// makes the kernel start writing the new file's data out first (`auto_da_alloc`), and frees
/// the old file's blocks: about 0.8 ms per admin change, on the critical path of every host
/// switch. Overwriting the spare in place (never truncated to zero, which triggers the same
/// flush) and exchanging costs about 0.15 ms. Where there is no state file yet, or the
/// filesystem cannot exchange, the spare is renamed over instead.
pub(crate) fn save(path: &Path, backends: Vec<Route>) -> anyhow::Result<()> {
    let file = StateFile {
        version: VERSION,
        backends,
    };
    let mut json = serde_json::to_vec_pretty(&file).context("cannot encode the proxy state")?;
    json.push(b'\n');
    let spare = spare_path(path);
    let write = || -> std::io::Result<()> {
        write_over(&spare, &json)?;
        match exchange(&spare, path) {
            Ok(()) => Ok(()),
            // No state file yet (ENOENT), or no exchange here (EINVAL, ENOSYS): replace it.
            Err(_) => std::fs::rename(&spare, path),
        }
    };
    let written = match write() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create the state directory {}", dir.display()))?;
            write()
        }
        other => other,
    };
    written.with_context(|| format!("cannot write the proxy state file {}", path.display()))
}

/// The state file's companion: scratch space for the next write, and meanwhile the state as it
/// was before the last change (`proxy-routes.json.prev`).
pub(crate) fn spare_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".prev");
    path.with_file_name(name)
}

/// Replaces the content of `path` (created if missing) with `bytes`, without truncating it to
/// zero first.
fn write_over(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    f.write_all_at(bytes, 0)?;
    f.set_len(bytes.len() as u64)
}

/// Swaps two existing paths atomically.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both are valid NUL-terminated paths that outlive the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
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
    fn the_spare_holds_the_state_before_the_last_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy-routes.json");
        let first = vec![route("a", BackendState::Active)];
        let second = vec![route("b", BackendState::Active)];
        // A longer leftover in the spare (a write cut short by a crash) leaves no tail behind.
        std::fs::write(spare_path(&path), "x".repeat(10_000)).unwrap();
        save(&path, first.clone()).unwrap();
        assert_eq!(load(&path).unwrap(), first);
        save(&path, second.clone()).unwrap();
        assert_eq!(load(&path).unwrap(), second);
        assert_eq!(load(&spare_path(&path)).unwrap(), first);
        save(&path, first.clone()).unwrap();
        assert_eq!(load(&path).unwrap(), first);
        assert_eq!(load(&spare_path(&path)).unwrap(), second);
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
