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
//! keeps a running instance's directory from changing under it. A release arrives as one archive
//! (see [`crate::source`]) whose sha256 the host checks before unpacking it into a `.partial`
//! directory that is renamed into place, so a half-copied or corrupted release is never
//! mistaken for one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{Host, Name};
use crate::source::ReleaseSource;
use crate::transport::{Transport, run_ok, sh_quote};

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

/// The host's side of staging: check the uploaded archive's sha256 (printing `digest <got>`
/// on a mismatch), unpack it into `partial` within `tar_limit` seconds (where `timeout(1)`
/// exists; files belong to whoever unpacks, modes are kept), and rename that into `dest` (printing `verified`). The upload and `partial` go
/// whatever happens.
/// Written into each unpacked release: what it was built from, so a later deploy of the same
/// version can tell when the name now stands for other code (a moved tag).
pub const MARKER: &str = ".cutover-release";

fn unpack_script(
    upload: &Path,
    archive: &crate::source::Archive,
    partial: &Path,
    dest: &Path,
    tar_limit: u64,
) -> String {
    let marker = format!(
        "sha256 {}\n{}{}",
        archive.sha256,
        archive
            .commit
            .as_deref()
            .map(|c| format!("commit {c}\n"))
            .unwrap_or_default(),
        archive
            .tree
            .as_ref()
            .map(crate::source::TreePrint::marker_lines)
            .unwrap_or_default()
    );
    format!(
        "set -e
         a={upload}
         trap 'rm -rf {partial_q} \"$a\"' EXIT
         if command -v sha256sum >/dev/null 2>&1; then got=$(sha256sum \"$a\"); else got=$(shasum -a 256 \"$a\"); fi
         got=${{got%% *}}
         if [ \"$got\" != {expected} ]; then rm -f \"$a\"; echo \"digest $got\"; exit 0; fi
         rm -rf {partial}
         mkdir -p {partial}
         if command -v timeout >/dev/null 2>&1; then
           timeout -k 5 {tar_limit} tar -xz --no-same-owner -f \"$a\" -C {partial} || {{ s=$?; [ $s -ne 124 ] || echo 'tar did not finish within {tar_limit} s: raise command_timeout' >&2; exit $s; }}
         else
           tar -xz --no-same-owner -f \"$a\" -C {partial}
         fi
         rm -f \"$a\"
         printf '%s' {marker} > {partial}/{MARKER}
         if [ -d {dest} ]; then rm -rf {partial}; else mv {partial} {dest}; fi
         touch {dest}
         echo verified
",
        upload = q(upload),
        expected = sh_quote(&archive.sha256),
        marker = sh_quote(&marker),
        partial = q(partial),
        partial_q = q(partial).replace('\'', "'\\''"),
        dest = q(dest),
    )
}

/// A staging failure that must stop the whole deploy before any host changes traffic: the
/// release could not be built, or what arrived on a host is not what was built.
#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    #[error("{0}")]
    Build(String),
    #[error(
        "host {host}: the uploaded archive of {version} has sha256 {got}, not {expected}: it was corrupted or changed on the way; nothing was unpacked"
    )]
    DigestMismatch {
        host: String,
        version: String,
        expected: String,
        got: String,
    },
    #[error(
        "host {host}: release {version} there was built from commit {staged}, but {version} now names commit {now} (a moved tag): a version names one build for good, so the fleet would run two codes under one name. Deploy {now} under a new version (tag it anew), or remove {dest} on every host to build {version} again"
    )]
    Moved {
        host: String,
        version: String,
        staged: String,
        now: String,
        dest: String,
    },
    #[error(
        "host {host}: its release {version} was staged from other files than {dir} holds now (changed or rebuilt in place since): a version names one build for good, and the fleet would run two codes under one name. Give the new build a new version (build it into another directory), or remove <root>/releases/{version} on every host (deploy another version first where it is live) to stage {version} again"
    )]
    Changed {
        host: String,
        version: String,
        dir: String,
    },
}

/// Fails with [`Fatal::Changed`] when `release.path` now holds other files than `staged` (what
/// the host's copy of a path release was packed from) says.
pub async fn check_tree(
    host: &Host,
    source: &ReleaseSource,
    version: &Name,
    staged: &crate::source::TreePrint,
) -> Result<(), Fatal> {
    if source.tree_changed(staged).await {
        return Err(changed(host, source, version));
    }
    Ok(())
}

/// [`Fatal::Changed`] for `host`'s copy of `version`.
pub fn changed(host: &Host, source: &ReleaseSource, version: &Name) -> Fatal {
    Fatal::Changed {
        host: host.name.to_string(),
        version: version.to_string(),
        dir: source.dir().display().to_string(),
    }
}

/// Puts the release in `<root>/releases/<version>/` unless it is already there: uploads the
/// archive (built on first need), checks its sha256 on the host, unpacks it into
/// `<version>.partial` and renames that into place. Returns true when it uploaded.
pub async fn stage(
    transport: &dyn Transport,
    host: &Host,
    source: &ReleaseSource,
    version: &Name,
) -> anyhow::Result<bool> {
    let layout = Layout::of(host);
    let dest = layout.release(version.as_str());
    let check = format!(
        "mkdir -p {releases} {run} {log} && if [ -d {dest} ]; then echo present; cat {marker} 2>/dev/null || true; else echo absent; fi",
        releases = q(&layout.releases()),
        run = q(&layout.run_dir()),
        log = q(&layout.log_dir()),
        dest = q(&dest),
        marker = q(&dest.join(MARKER)),
    );
    let state = run_ok(
        transport,
        host,
        "preparing the release directory",
        &check,
        transport.step_timeout(),
    )
    .await?;
    let mut lines = state.lines();
    if lines.next().map(str::trim) == Some("present") {
        let marker: Vec<&str> = lines.map(str::trim).collect();
        let field = |key: &str| marker.iter().find_map(|l| l.strip_prefix(key));
        let staged_from = field("commit ");
        if let Some(staged) = staged_from {
            // Releases staged before markers existed, and path releases, have no commit.
            let now = match source.named_commit().await {
                Ok(now) => now,
                Err(e) => {
                    source.note_unchecked(&e);
                    None
                }
            };
            if let Some(now) = now.filter(|now| now != staged) {
                return Err(Fatal::Moved {
                    host: host.name.to_string(),
                    version: version.to_string(),
                    staged: staged.to_string(),
                    now,
                    dest: dest.display().to_string(),
                }
                .into());
            }
        }
        return Ok(false);
    }
    let archive = source.archive().await.map_err(Fatal::Build)?;
    let upload = layout.releases().join(format!(".{version}.tar.gz"));
    transport.upload(host, &archive.path, &upload).await?;
    let partial = layout.releases().join(format!("{version}.partial"));
    // At least 5 minutes, more when command_timeout says a step may take longer (a large
    // release on a slow disk). The host ends `tar` itself a little earlier (with `timeout(1)`
    // where it has it): a transport that gives up only closes its session, and a `tar` left
    // running would still write into `.partial` while the next attempt unpacks there.
    let limit = source.command_timeout().max(Duration::from_secs(300));
    let tar_limit = limit
        .saturating_sub(Duration::from_secs(10))
        .as_secs()
        .max(1);
    let script = unpack_script(&upload, &archive, &partial, &dest, tar_limit);
    let out = run_ok(
        transport,
        host,
        &format!("unpacking {version}"),
        &script,
        limit,
    )
    .await?;
    if let Some(got) = out.trim().strip_prefix("digest ") {
        return Err(Fatal::DigestMismatch {
            host: host.name.to_string(),
            version: version.to_string(),
            expected: archive.sha256.clone(),
            got: got.to_string(),
        }
        .into());
    }
    source.uploaded(host);
    Ok(true)
}

/// How a host's staging result starts when another host's (or the build's) fatal failure
/// stopped the deploy: the reason follows.
pub const STOPPED_BY_FATAL: &str = "deploy stopped before any traffic change: ";

/// After staging on every host: when one hit a [`Fatal`] error (`fatal`), every host fails with
/// it, so no host changes traffic. Maps host name to the outcome (true: uploaded).
pub fn stop_on_fatal(
    results: Vec<(String, Result<bool, String>)>,
    fatal: Option<String>,
) -> BTreeMap<String, Result<bool, String>> {
    results
        .into_iter()
        .map(|(name, r)| {
            let r = match (&fatal, r) {
                (Some(why), Ok(_)) => Err(format!("{STOPPED_BY_FATAL}{why}")),
                // Hosts that hit the fatal error themselves (a build shared by every host that
                // waited for it) say so too: it is the release's, not theirs.
                (Some(why), Err(e)) if e == *why => Err(format!("{STOPPED_BY_FATAL}{why}")),
                (_, r) => r,
            };
            (name, r)
        })
        .collect()
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
        transport.step_timeout(),
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
    run_ok(
        transport,
        host,
        "moving `current`",
        &script,
        transport.step_timeout(),
    )
    .await?;
    Ok(())
}

/// Removes `current` from a host that serves nothing again (a first deploy undone): left
/// behind, it would name the rejected release as the one the host served, and the next
/// deploy's rollback would return to it.
pub async fn clear_current(transport: &dyn Transport, host: &Host) -> anyhow::Result<()> {
    let script = format!("rm -f {}\n", q(&Layout::of(host).current()));
    run_ok(
        transport,
        host,
        "removing `current`",
        &script,
        transport.step_timeout(),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{Archive, ReleaseSource};
    use crate::transport::local::LocalTransport;

    /// A `tar` that outlives its limit is ended on the host, which cleans up and says what to
    /// raise, instead of writing into `.partial` after the deployer gave up.
    #[test]
    fn a_tar_past_its_limit_is_ended_and_cleaned_up() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let fake = bin.join("tar");
        std::fs::write(&fake, "#!/bin/sh\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let upload = dir.path().join(".v1.tar.gz");
        std::fs::write(&upload, b"not really an archive").unwrap();
        let sum = std::process::Command::new("sha256sum")
            .arg(&upload)
            .output()
            .unwrap();
        let sum = String::from_utf8_lossy(&sum.stdout);
        let sha = sum.split_whitespace().next().unwrap();
        let (partial, dest) = (dir.path().join("v1.partial"), dir.path().join("v1"));
        let archive = Archive {
            path: upload.clone(),
            sha256: sha.to_string(),
            bytes: 0,
            commit: None,
            tree: None,
        };
        let script = unpack_script(&upload, &archive, &partial, &dest, 1);
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let started = std::time::Instant::now();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .env("PATH", path)
            .output()
            .unwrap();
        let took = started.elapsed();
        assert_eq!(out.status.code(), Some(124), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr)
                .contains("tar did not finish within 1 s: raise command_timeout"),
            "{out:?}"
        );
        assert!(took < Duration::from_secs(10), "took {took:?}");
        assert!(!partial.exists() && !upload.exists() && !dest.exists());
    }

    fn host(root: &Path) -> Host {
        Host::for_test(root)
    }

    /// An archive of a one-file release, built with the real packer.
    async fn archive(dir: &Path, version: &Name) -> Archive {
        let tree = dir.join("tree");
        std::fs::create_dir_all(&tree).unwrap();
        std::fs::write(tree.join("run.sh"), "echo hi\n").unwrap();
        let release = crate::config::Release {
            path: Some(tree.display().to_string()),
            git: None,
            build: None,
            include: Vec::new(),
            keep: crate::config::Keep(1),
        };
        crate::source::build(
            &release,
            version,
            &tree,
            &dir.join("state"),
            &dir.join("cutover.toml"),
            &[],
            Duration::from_secs(30),
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn stage_uploads_verifies_and_unpacks_once() {
        let d = tempfile::tempdir().unwrap();
        let v = Name::parse("v1").unwrap();
        let a = archive(d.path(), &v).await;
        let h = host(&d.path().join("host"));
        let src = ReleaseSource::prebuilt(&v, a);
        assert!(stage(&LocalTransport::new(), &h, &src, &v).await.unwrap());
        assert!(
            !stage(&LocalTransport::new(), &h, &src, &v).await.unwrap(),
            "already there"
        );
        let rel = d.path().join("host/releases");
        assert_eq!(
            std::fs::read_to_string(rel.join("v1/run.sh")).unwrap(),
            "echo hi\n"
        );
        let names: Vec<_> = std::fs::read_dir(&rel)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["v1"], "no upload or partial left behind");
    }

    #[tokio::test]
    async fn digest_mismatch_unpacks_nothing_and_stops_every_host() {
        let d = tempfile::tempdir().unwrap();
        let v = Name::parse("v1").unwrap();
        let mut a = archive(d.path(), &v).await;
        a.sha256 = "0".repeat(64);
        let h = host(&d.path().join("host"));
        let src = ReleaseSource::prebuilt(&v, a);
        let e = stage(&LocalTransport::new(), &h, &src, &v)
            .await
            .unwrap_err();
        assert!(e.is::<Fatal>(), "{e:#}");
        assert!(format!("{e:#}").contains("nothing was unpacked"), "{e:#}");
        let rel = d.path().join("host/releases");
        assert_eq!(
            std::fs::read_dir(&rel).unwrap().count(),
            0,
            "nothing unpacked"
        );
        let all = stop_on_fatal(
            vec![
                ("web1".into(), Err(format!("{e:#}"))),
                ("web2".into(), Ok(true)),
            ],
            Some(format!("{e:#}")),
        );
        // web1 hit it itself, web2 was stopped by it: both say it is the release's problem.
        assert!(
            all.values()
                .all(|r| r.as_ref().is_err_and(|e| e.starts_with(STOPPED_BY_FATAL))),
            "{all:?}"
        );
    }

    /// Review finding: files owned by uid 4242 on the build machine unpacked as 4242 on a
    /// host that unpacks as root (someone else there, or no one). The archive now says root
    /// and hosts unpack as themselves; modes stay (executables stay executable).
    #[tokio::test]
    async fn owners_of_the_build_machine_do_not_reach_hosts() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        std::fs::create_dir_all(&tree).unwrap();
        let run = tree.join("run.sh");
        std::fs::write(&run, "echo hi\n").unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Only root can give a file away; elsewhere the archive still names uid 4242 below.
        let _ = std::os::unix::fs::chown(&run, Some(4242), Some(4242));
        let v = Name::parse("v1").unwrap();
        let release = crate::config::Release {
            path: None,
            git: None,
            build: None,
            include: Vec::new(),
            keep: crate::config::Keep(1),
        };
        let a = crate::source::build(
            &release,
            &v,
            &tree,
            &d.path().join("state"),
            &d.path().join("cutover.toml"),
            &[],
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        let list = std::process::Command::new("tar")
            .args(["-tvz", "--numeric-owner", "-f"])
            .arg(&a.path)
            .output()
            .unwrap();
        let list = String::from_utf8_lossy(&list.stdout);
        assert!(list.contains("-rwxr-xr-x 0/0 "), "{list}");
        assert!(!list.contains("4242"), "{list}");
        // An archive that does name an owner (an older cutover, another packer) unpacks as
        // whoever unpacks all the same.
        let foreign = d.path().join("foreign.tar.gz");
        let st = std::process::Command::new("tar")
            .args([
                "-cz",
                "--owner=4242",
                "--group=4242",
                "--numeric-owner",
                "-f",
            ])
            .arg(&foreign)
            .arg("-C")
            .arg(&tree)
            .arg("run.sh")
            .status()
            .unwrap();
        assert!(st.success());
        let (sha256, bytes) = crate::source::digest(&foreign).unwrap();
        let me = std::fs::metadata(d.path()).unwrap().uid();
        for (version, path, sha256, bytes) in [
            ("v1", a.path.clone(), a.sha256.clone(), a.bytes),
            ("v2", foreign, sha256, bytes),
        ] {
            let v = Name::parse(version).unwrap();
            let src = ReleaseSource::prebuilt(
                &v,
                Archive {
                    path,
                    sha256,
                    bytes,
                    commit: None,
                    tree: None,
                },
            );
            let h = host(&d.path().join("host"));
            assert!(stage(&LocalTransport::new(), &h, &src, &v).await.unwrap());
            let m = std::fs::metadata(d.path().join(format!("host/releases/{version}/run.sh")))
                .unwrap();
            assert_eq!((m.uid(), m.gid() == 4242), (me, false), "{version}");
            assert_eq!(m.mode() & 0o111, 0o111, "{version}: still executable");
        }
    }
}
