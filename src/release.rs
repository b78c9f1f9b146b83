//! Releases on a host, in Capistrano's layout:
//!
//! ```text
//! <root>/releases/<version>/   one immutable directory per release
//! <root>/current -> releases/<version>
//! <root>/run/<version>-<port>.pid   one per running instance
//! <root>/log/<version>-<port>.log
//! ```
//!
//! A version is staged once and never rewritten (it is named data, not a mutable slot): staging a
//! version that is already there is a no-op, which makes a repeated or resumed deploy cheap and
//! keeps a running instance's directory from changing under it. Copies land in a `.partial`
//! directory that is renamed into place, so a half-copied release is never mistaken for one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{Host, Name};
use crate::transport::{Transport, run_ok, sh_quote};

const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

/// Paths on one host.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn of(host: &Host) -> Layout {
        Layout {
            root: host.root.clone(),
        }
    }
    pub fn releases(&self) -> PathBuf {
        self.root.join("releases")
    }
    pub fn release(&self, version: &str) -> PathBuf {
        self.releases().join(version)
    }
    pub fn current(&self) -> PathBuf {
        self.root.join("current")
    }
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    pub fn log_dir(&self) -> PathBuf {
        self.root.join("log")
    }
    pub fn pid_file(&self, version: &str, port: u16) -> PathBuf {
        self.run_dir().join(format!("{version}-{port}.pid"))
    }
    pub fn log_file(&self, version: &str, port: u16) -> PathBuf {
        self.log_dir().join(format!("{version}-{port}.log"))
    }
}

fn q(p: &Path) -> String {
    sh_quote(p.to_string_lossy())
}

/// Copies the release to `<root>/releases/<version>/` unless it is already there. Returns true
/// when it copied.
pub async fn stage(
    transport: &dyn Transport,
    host: &Host,
    source: &Path,
    version: &Name,
) -> anyhow::Result<bool> {
    let layout = Layout::of(host);
    let dest = layout.release(version.as_str());
    let check = format!(
        "mkdir -p {releases} {run} {log} && if [ -d {dest} ]; then echo present; else echo absent; fi",
        releases = q(&layout.releases()),
        run = q(&layout.run_dir()),
        log = q(&layout.log_dir()),
        dest = q(&dest),
    );
    let state = run_ok(
        transport,
        host,
        "preparing the release directory",
        &check,
        SCRIPT_TIMEOUT,
    )
    .await?;
    if state.trim() == "present" {
        return Ok(false);
    }
    transport.copy_dir(host, source, &dest).await?;
    run_ok(
        transport,
        host,
        "marking the release",
        &format!("touch {}", q(&dest)),
        SCRIPT_TIMEOUT,
    )
    .await?;
    Ok(true)
}

/// The release `current` points at, if any.
pub async fn current(transport: &dyn Transport, host: &Host) -> anyhow::Result<Option<String>> {
    let layout = Layout::of(host);
    let script = format!(
        "if [ -L {c} ]; then basename \"$(readlink {c})\"; fi",
        c = q(&layout.current())
    );
    let out = run_ok(
        transport,
        host,
        "reading `current`",
        &script,
        SCRIPT_TIMEOUT,
    )
    .await?;
    let v = out.trim();
    Ok((!v.is_empty()).then(|| v.to_string()))
}

/// Points `current` at the release, atomically (a new link renamed over the old one).
pub async fn set_current(
    transport: &dyn Transport,
    host: &Host,
    version: &str,
) -> anyhow::Result<()> {
    let layout = Layout::of(host);
    let tmp = layout.root.join(".current.tmp");
    let script = format!(
        "set -e\n[ -d {rel} ]\nln -sfn {target} {tmp}\nmv -T {tmp} {cur}\n",
        rel = q(&layout.release(version)),
        target = sh_quote(format!("releases/{version}")),
        tmp = q(&tmp),
        cur = q(&layout.current()),
    );
    run_ok(transport, host, "moving `current`", &script, SCRIPT_TIMEOUT).await?;
    Ok(())
}

/// Releases staged on the host, newest first.
pub async fn list(transport: &dyn Transport, host: &Host) -> anyhow::Result<Vec<String>> {
    let layout = Layout::of(host);
    let script = format!(
        "[ -d {r} ] || exit 0\ncd {r} && ls -1t | grep -v '\\.partial$' || true",
        r = q(&layout.releases())
    );
    let out = run_ok(transport, host, "listing releases", &script, SCRIPT_TIMEOUT).await?;
    Ok(out
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect())
}

/// Removes all but the newest `keep` releases, never one in `protect` (live or running).
pub async fn prune(
    transport: &dyn Transport,
    host: &Host,
    keep: usize,
    protect: &[String],
) -> anyhow::Result<Vec<String>> {
    let layout = Layout::of(host);
    let releases = list(transport, host).await?;
    let doomed: Vec<String> = releases
        .into_iter()
        .enumerate()
        .filter(|(i, v)| *i >= keep && !protect.contains(v))
        .map(|(_, v)| v)
        .collect();
    if doomed.is_empty() {
        return Ok(doomed);
    }
    let paths: Vec<String> = doomed.iter().map(|v| q(&layout.release(v))).collect();
    let script = format!("rm -rf {}", paths.join(" "));
    run_ok(
        transport,
        host,
        "removing old releases",
        &script,
        SCRIPT_TIMEOUT,
    )
    .await?;
    Ok(doomed)
}
