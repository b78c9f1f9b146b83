//! Where a release comes from: a directory (`release.path`) or a git ref (`release.git` plus the
//! version as branch, tag or commit), built once on this machine and packed into one `.tar.gz`
//! with a sha256 digest that every host verifies before unpacking.
//!
//! Why one archive built here: every host gets byte-identical code (no per-host builds that
//! drift, no compilers on servers), the upload is one stream per host, and the digest proves
//! what arrived. The archive is built lazily, by the first host that lacks the release, so a
//! rollback to a release still staged everywhere builds nothing.
//!
//! Git runs with argv only (never through a shell): the ref is a validated name passed after
//! `--end-of-options`, so a version can never become a command or an option. The repository is
//! mirrored into `<state_dir>/git/` and fetched again on each build, so a moving branch deploys
//! what it points at now; `file://` URLs and local paths work, which keeps tests offline.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::sync::OnceCell;

use crate::config::{Config, Host, Name, Release};
use crate::transport::last_lines;

/// A built release, ready to upload.
#[derive(Debug, Clone)]
pub struct Archive {
    pub path: PathBuf,
    /// Lowercase hex sha256 of the archive file.
    pub sha256: String,
    pub bytes: u64,
    /// The commit it was built from (git releases).
    pub commit: Option<String>,
    /// The files it was packed from (path releases).
    pub tree: Option<TreePrint>,
}

/// What a path release's files were when they were packed. A version names one build for
/// good, but `release.path` is a directory the user may rebuild in place: without this, hosts
/// that have the version would keep the old files and hosts that lack it get the new ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreePrint {
    /// sha256 over every shipped path's kind, mode, size, mtime, ctime and inode: cheap to take
    /// again (no file is read), and equal while nothing was touched.
    pub stat: String,
    /// sha256 over every shipped path's kind, mode and content (or link target): equal for
    /// the same files copied or rebuilt identically, whatever their times.
    pub content: String,
}

impl TreePrint {
    /// The lines a release's marker ([`crate::release::MARKER`]) holds for it.
    pub fn marker_lines(&self) -> String {
        format!("tree-stat {}\ntree {}\n", self.stat, self.content)
    }

    /// The print in a marker's text (or the part of it read back), when it holds one.
    pub fn from_marker(text: &str) -> Option<TreePrint> {
        let field = |key: &str| text.lines().find_map(|l| l.trim().strip_prefix(key));
        Some(TreePrint {
            stat: field("tree-stat ")?.to_string(),
            content: field("tree ")?.to_string(),
        })
    }
}

/// The source of one version, built at most once, on first use.
pub struct ReleaseSource {
    release: Release,
    version: Name,
    /// `release.path` with `{version}` substituted (path releases).
    dir: PathBuf,
    state_dir: PathBuf,
    /// The config file, named by errors that a fix of the config cures.
    config_file: PathBuf,
    /// Directories of this machine that never ship though they lie in the tree: the state
    /// directory and, on the local transport, the hosts' roots.
    never_ship: Vec<PathBuf>,
    build_timeout: Duration,
    built: OnceCell<Result<Arc<Archive>, String>>,
    /// The commit the version's tag or branch names in the repository now (git releases),
    /// asked once: see [`ReleaseSource::named_commit`].
    named: OnceCell<Result<Option<String>, String>>,
    /// The shipped files of `release.path` as they are now (path releases), taken once each:
    /// see [`ReleaseSource::tree_changed`].
    now_stat: OnceCell<Option<String>>,
    now_content: OnceCell<Option<String>>,
    /// Why staged builds could not be checked against the repository, said once.
    unchecked: Mutex<Option<String>>,
    /// Hosts the archive was uploaded to, in order.
    uploads: Mutex<Vec<String>>,
}

impl ReleaseSource {
    pub fn new(config: &Config, version: &Name) -> ReleaseSource {
        ReleaseSource {
            release: config.release.clone(),
            version: version.clone(),
            dir: config.release_source(version),
            state_dir: config.state_dir.clone(),
            config_file: config.file.clone(),
            // The config holds the balancer's admin token: never on the hosts.
            never_ship: [config.state_dir.clone(), config.file.clone()]
                .into_iter()
                .chain(
                    config
                        .hosts
                        .iter()
                        .filter(|_| config.transport == crate::config::TransportKind::Local)
                        .map(|h| h.root.clone()),
                )
                .collect(),
            build_timeout: config.ssh.command_timeout,
            built: OnceCell::new(),
            named: OnceCell::new(),
            now_stat: OnceCell::new(),
            now_content: OnceCell::new(),
            unchecked: Mutex::new(None),
            uploads: Mutex::new(Vec::new()),
        }
    }

    /// `release.path` with the version substituted (path releases).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `command_timeout`: how long one step with this release (its build, its unpacking on a
    /// host) may take.
    pub fn command_timeout(&self) -> Duration {
        self.build_timeout
    }

    /// A source whose archive is already built (benchmarks, tests).
    pub fn prebuilt(version: &Name, archive: Archive) -> ReleaseSource {
        ReleaseSource {
            release: Release {
                path: None,
                git: None,
                build: None,
                include: Vec::new(),
                keep: crate::config::Keep(1),
            },
            version: version.clone(),
            dir: PathBuf::new(),
            state_dir: PathBuf::new(),
            config_file: PathBuf::new(),
            never_ship: Vec::new(),
            build_timeout: Duration::ZERO,
            built: OnceCell::new_with(Some(Ok(Arc::new(archive)))),
            named: OnceCell::new_with(Some(Ok(None))),
            now_stat: OnceCell::new_with(Some(None)),
            now_content: OnceCell::new_with(Some(None)),
            unchecked: Mutex::new(None),
            uploads: Mutex::new(Vec::new()),
        }
    }

    /// The commit the version names in the repository now, when it is a tag or a branch of a
    /// git release (`None`: a commit id, or not a git release). A host that staged the version
    /// from another commit holds other code under the same name (a moved tag): see
    /// [`crate::release::stage`].
    pub async fn named_commit(&self) -> Result<Option<String>, String> {
        let Some(url) = self.release.git.as_deref() else {
            return Ok(None);
        };
        // A commit id names one tree for good: nothing to ask.
        if is_commit_id(self.version.as_str()) {
            return Ok(None);
        }
        self.named
            .get_or_init(|| async {
                remote_refs(url, &self.version, self.build_timeout)
                    .await
                    .map(|r| r.tag.or(r.branch))
                    .map_err(|e| format!("{e:#}"))
            })
            .await
            .clone()
    }

    /// Whether `release.path` now holds other files than the `staged` print says a host
    /// unpacked: the same version name would then stand for two builds across the fleet. The
    /// cheap print is compared first; only when it differs (a touch, a copy, another build
    /// machine) are the files read. `false` when it cannot tell: a git release, or the
    /// directory is gone or unreadable (the hosts' copies are then all there is).
    pub async fn tree_changed(&self, staged: &TreePrint) -> bool {
        if self.release.git.is_some() {
            return false;
        }
        let print = |content: bool| {
            let (dir, include, never_ship) = (
                self.dir.clone(),
                self.release.include.clone(),
                self.never_ship.clone(),
            );
            async move {
                tokio::task::spawn_blocking(move || {
                    let entries = shipped(&dir, &include, &never_ship).ok()?;
                    tree_print(&dir, &entries, content).ok()
                })
                .await
                .ok()
                .flatten()
            }
        };
        let stat = self.now_stat.get_or_init(|| print(false)).await;
        if stat.is_none() || stat.as_deref() == Some(staged.stat.as_str()) {
            return false;
        }
        let content = self.now_content.get_or_init(|| print(true)).await;
        content
            .as_deref()
            .is_some_and(|now| now != staged.content.as_str())
    }

    /// Notes that the repository could not be asked whether the staged builds are still what
    /// the version names: they are used as they are (a resume or redeploy must not depend on
    /// the git server being up), and the deploy says so once.
    pub fn note_unchecked(&self, why: &str) {
        self.unchecked
            .lock()
            .expect("unchecked lock")
            .get_or_insert_with(|| format!("WARNING: {why}: the builds of {} already on the hosts are used as they are, not checked against a moved tag", self.version));
    }

    /// The warning of [`ReleaseSource::note_unchecked`], if any.
    pub fn unchecked(&self) -> Option<String> {
        self.unchecked.lock().expect("unchecked lock").clone()
    }

    /// The archive, built on the first call; every later call gets the same result.
    pub async fn archive(&self) -> Result<Arc<Archive>, String> {
        self.built
            .get_or_init(|| async {
                build(
                    &self.release,
                    &self.version,
                    &self.dir,
                    &self.state_dir,
                    &self.config_file,
                    &self.never_ship,
                    self.build_timeout,
                )
                .await
                .map(Arc::new)
                .map_err(|e| format!("{e:#}"))
            })
            .await
            .clone()
    }

    /// The build's result if it ran.
    pub fn built(&self) -> Option<&Result<Arc<Archive>, String>> {
        self.built.get()
    }

    /// Records that `host` received the archive and verified its digest.
    pub fn uploaded(&self, host: &Host) {
        self.uploads
            .lock()
            .expect("uploads lock")
            .push(host.name.to_string());
    }

    /// One line for the progress output: what was built and where it went, if anything.
    pub fn summary(&self) -> Option<String> {
        let a = match self.built.get()? {
            Ok(a) => a,
            Err(_) => return None,
        };
        let uploads = self.uploads.lock().expect("uploads lock");
        Some(format!(
            "built {} once ({} bytes, sha256 {}{}); uploaded to {} host(s), each verified the sha256: {}",
            self.version,
            a.bytes,
            a.sha256,
            a.commit
                .as_deref()
                .map(|c| format!(", commit {c}"))
                .unwrap_or_default(),
            uploads.len(),
            uploads.join(", ")
        ))
    }
}

/// Checks out (git) or takes (path) the tree, runs `build` in it, and packs the archive into
/// `<state_dir>/archives/<version>.tar.gz`.
pub async fn build(
    release: &Release,
    version: &Name,
    dir: &Path,
    state_dir: &Path,
    config_file: &Path,
    never_ship: &[PathBuf],
    timeout: Duration,
) -> anyhow::Result<Archive> {
    let (tree, commit) = match &release.git {
        Some(url) => {
            let (tree, commit) = checkout(url, version, state_dir, timeout).await?;
            (tree, Some(commit))
        }
        None => {
            anyhow::ensure!(
                dir.is_dir(),
                "release {version}: {} is not a directory (release.path)",
                dir.display()
            );
            (dir.to_path_buf(), None)
        }
    };
    if let Some(cmd) = &release.build {
        run_build(cmd, &tree, version, commit.as_deref(), timeout).await?;
    }
    // `path = "."` holds cutover's own state (journal, archives, the config with its token)
    // and maybe the local hosts' roots: shipping them would leak and grow with each deploy.
    let skip = inside(&tree, never_ship);
    let Selection { entries, unmatched } = select(&tree, &release.include, &skip)?;
    if !unmatched.is_empty() {
        let globs: Vec<String> = unmatched.iter().map(|g| format!("{g:?}")).collect();
        anyhow::bail!(
            "release {version}: include {} matched nothing in {}: fix release.include in {}",
            globs.join(", "),
            tree.display(),
            config_file.display()
        );
    }
    anyhow::ensure!(
        !entries.is_empty(),
        "release {version}: nothing to ship from {} (it is empty)",
        tree.display()
    );
    let out_dir = state_dir.join("archives");
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let path = out_dir.join(format!("{version}.tar.gz"));
    let stat_before = match &commit {
        Some(_) => None,
        None => Some(tree_print(&tree, &entries, false)?),
    };
    pack(&tree, &entries, &path).await?;
    // Printed once packed, and only if nothing moved meanwhile: the print must be of the
    // files the archive holds.
    let print = match stat_before {
        None => None,
        Some(stat) => {
            let content = tree_print(&tree, &entries, true)?;
            anyhow::ensure!(
                tree_print(&tree, &entries, false)? == stat,
                "release {version}: files in {} changed while they were packed: deploy again once nothing writes there",
                tree.display()
            );
            Some(TreePrint { stat, content })
        }
    };
    let (sha256, bytes) = digest(&path)?;
    // With push-to-deploy every commit is a version: what one build leaves must not pile up.
    // The checkout goes once packed (a failed build keeps it, for a look), and only the
    // newest archives stay (one is read only during its own deploy).
    if release.git.is_some() {
        let _ = std::fs::remove_dir_all(&tree);
    }
    prune_archives(&out_dir, ARCHIVES_KEPT);
    Ok(Archive {
        path,
        sha256,
        bytes,
        commit,
        tree: print,
    })
}

/// The paths of `dir` a build would ship (see [`select`]).
fn shipped(dir: &Path, include: &[String], never_ship: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let skip = inside(dir, never_ship);
    Ok(select(dir, include, &skip)?.entries)
}

/// A [`TreePrint`] half: with `content`, of what the files hold; without, of their sizes and
/// times. Each entry is length-prefixed, so no two trees print alike by shifting bytes across
/// entries.
fn tree_print(tree: &Path, entries: &[String], content: bool) -> anyhow::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let mut h = Sha256::new();
    for rel in entries {
        let path = tree.join(rel);
        let meta = std::fs::symlink_metadata(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let kind = if meta.is_dir() {
            "d"
        } else if meta.file_type().is_symlink() {
            "l"
        } else if meta.is_file() {
            "f"
        } else {
            // A FIFO or socket: opening one could block; tar packs it as what it is.
            "o"
        };
        h.update((rel.len() as u64).to_le_bytes());
        h.update(rel.as_bytes());
        h.update(format!("\0{kind}\0{:o}\0", meta.mode() & 0o7777).as_bytes());
        if !content {
            // The change time too: a copy with `cp -p`, `rsync -t` or `touch -r` keeps size and
            // mtime, but nobody can set ctime.
            h.update(
                format!(
                    "{}\0{}.{}\0{}.{}\0{}\n",
                    meta.len(),
                    meta.mtime(),
                    meta.mtime_nsec(),
                    meta.ctime(),
                    meta.ctime_nsec(),
                    meta.ino()
                )
                .as_bytes(),
            );
            continue;
        }
        match kind {
            "l" => {
                let target = std::fs::read_link(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                let target = target.as_os_str().as_encoded_bytes();
                h.update((target.len() as u64).to_le_bytes());
                h.update(target);
            }
            "f" => {
                h.update(meta.len().to_le_bytes());
                let n = hash_file(&mut h, &path)?;
                // A file that grew or shrank while it was read prints unlike any tree.
                h.update(n.to_le_bytes());
            }
            _ => {}
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Archives kept in `<state_dir>/archives`, newest first.
const ARCHIVES_KEPT: usize = 3;

/// Removes all but the `keep` newest `*.tar.gz` files of `dir`. Best effort.
fn prune_archives(dir: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut archives: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tar.gz"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    archives.sort_by_key(|a| std::cmp::Reverse(a.0));
    for (_, path) in archives.into_iter().skip(keep) {
        let _ = std::fs::remove_file(path);
    }
}

/// Feeds the file at `path` to `h`; returns how many bytes it read.
fn hash_file(h: &mut Sha256, path: &Path) -> anyhow::Result<u64> {
    use std::io::Read;
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            return Ok(n);
        }
        n += k as u64;
        h.update(&buf[..k]);
    }
}

/// The sha256 (hex) and size of a file.
pub fn digest(path: &Path) -> anyhow::Result<(String, u64)> {
    let mut h = Sha256::new();
    let n = hash_file(&mut h, path)?;
    let hex = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((hex, n))
}

/// `url` as it may be shown: the credentials of `https://user:token@host/...` (any userinfo
/// of a `scheme://` URL) become `***`, so they reach no log, error or dashboard. Anything
/// else (a path, `git@host:path`, which holds no secret) is returned as is.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://***@{host}{path}"),
        None => url.to_string(),
    }
}

/// The commit `version` names in `url` when it is a branch (and no tag of that name): a
/// branch moves, but a staged release never changes under a running instance, so a deploy of
/// a branch deploys its commit, named by its full sha as a push webhook names it. `None` for a
/// tag or a commit, which name one tree for good.
pub async fn branch_commit(
    url: &str,
    version: &Name,
    timeout: Duration,
) -> anyhow::Result<Option<String>> {
    fixed_ref(version)?;
    let refs = remote_refs(url, version, timeout).await?;
    if refs.tag.is_some() {
        return Ok(None);
    }
    if refs.branch.is_none() && !is_commit_id(version.as_str()) {
        return Err(NoSuchRef {
            version: version.to_string(),
            url: redact_url(url),
        }
        .into());
    }
    Ok(refs.branch)
}

/// A version git takes as a commit id: 7 to 64 hex digits (sha1 or sha256, abbreviated).
pub fn is_commit_id(v: &str) -> bool {
    (7..=64).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A version that names no tag or branch of the repository and is no commit id: a typo, to
/// refuse before anything is recorded.
#[derive(Debug, thiserror::Error)]
#[error(
    "{url} has no tag or branch named {version}, and {version} is not a commit id: check the name (`git ls-remote {url}` lists them)"
)]
pub struct NoSuchRef {
    pub version: String,
    pub url: String,
}

/// The commits the tag and the branch named `version` point at in `url` now (a tag's peeled
/// commit when it is annotated), in one `ls-remote`.
struct RemoteRefs {
    tag: Option<String>,
    branch: Option<String>,
}

async fn remote_refs(url: &str, version: &Name, timeout: Duration) -> anyhow::Result<RemoteRefs> {
    let heads = format!("refs/heads/{version}");
    let tags = format!("refs/tags/{version}");
    let peeled = format!("{tags}^{{}}");
    let out = git(&["ls-remote", "--", url, &heads, &tags], None, timeout)
        .await
        .with_context(|| format!("asking {} what {version} is", redact_url(url)))?;
    let (mut tag, mut tag_peeled, mut branch) = (None, None, None);
    for line in out.lines() {
        let Some((sha, r)) = line.split_once('\t') else {
            continue;
        };
        let sha = Some(sha.trim().to_ascii_lowercase());
        if r == peeled {
            tag_peeled = sha;
        } else if r == tags {
            tag = sha;
        } else if r == heads {
            branch = sha;
        }
    }
    Ok(RemoteRefs {
        tag: tag_peeled.or(tag),
        branch,
    })
}

/// Runs git, for at most `timeout` (a remote that accepts and never answers must not hold
/// the deploy lock forever).
async fn git(args: &[&str], cwd: Option<&Path>, timeout: Duration) -> anyhow::Result<String> {
    let mut c = Command::new("git");
    if let Some(d) = cwd {
        c.arg("-C").arg(d);
    }
    c.args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Whole stdout: callers parse it (`ls-remote` lists every matching ref).
    let out = crate::bounded::run_keeping_stdout(c, timeout)
        .await
        .context("cannot run git (is it installed?)")?;
    let what = args.first().copied().unwrap_or("");
    if out.timed_out() {
        anyhow::bail!(
            "git {what} did not finish within {} (raise command_timeout if the repository needs longer)",
            humantime::format_duration(timeout)
        );
    }
    if !out.success() {
        // git may echo the URL it was given: never with its credentials.
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        for arg in args {
            let shown = redact_url(arg);
            if shown != *arg {
                stderr = stderr.replace(arg, &shown);
            }
        }
        anyhow::bail!("git {what} failed: {}", last_lines(&stderr, 5));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Refuses a version that names no fixed ref: `HEAD` and its kin (`FETCH_HEAD`, `ORIG_HEAD`,
/// ...) point wherever the repository is now, so one version name would ship different code
/// over time (and the mirror's own `HEAD` is not the remote's default branch anyway).
pub fn fixed_ref(version: &Name) -> anyhow::Result<()> {
    let v = version.as_str();
    let moving = v.ends_with("HEAD") && v.bytes().all(|b| b.is_ascii_uppercase() || b == b'_');
    let odd = v.contains(['@', '^', '~', ':']);
    anyhow::ensure!(
        !moving && !odd,
        "release {v}: {v} is not a fixed git ref (it names whatever the repository points at now): deploy a tag, a branch or a commit id (at least 7 hex digits, e.g. from `git rev-parse HEAD`)"
    );
    Ok(())
}

/// The commit `version` names in the mirror: the tag `refs/tags/<v>`, else the branch
/// `refs/heads/<v>`, else, for at least 7 hex digits, the commit they start.
async fn resolve(
    cache: &Path,
    url: &str,
    version: &Name,
    timeout: Duration,
) -> anyhow::Result<String> {
    fixed_ref(version)?;
    let v = version.as_str();
    // A tag first, then a branch, then (when it looks like one) a commit id.
    let mut refs = vec![format!("refs/tags/{v}"), format!("refs/heads/{v}")];
    if is_commit_id(v) {
        refs.push(v.to_string());
    }
    for r in refs {
        let spec = format!("{r}^{{commit}}");
        let found = git(
            &[
                "rev-parse",
                "--verify",
                "--quiet",
                "--end-of-options",
                &spec,
            ],
            Some(cache),
            timeout,
        )
        .await;
        if let Ok(commit) = found {
            return Ok(commit);
        }
    }
    if is_commit_id(v) {
        // Missing, or ambiguous: several commits (or tags) start with these digits.
        let all = git(
            &["rev-parse", &format!("--disambiguate={v}")],
            Some(cache),
            timeout,
        )
        .await
        .unwrap_or_default();
        let mut commits = 0;
        for id in all.lines().take(16) {
            let kind = git(&["cat-file", "-t", id.trim()], Some(cache), timeout).await;
            if matches!(kind.as_deref(), Ok("commit" | "tag")) {
                commits += 1;
            }
        }
        anyhow::ensure!(
            commits < 2,
            "release {v}: commit id {v} is ambiguous in {}: {commits} commits start with it; give more characters (or the full id)",
            redact_url(url)
        );
    }
    anyhow::bail!(
        "release {v}: no tag, branch or commit named {v} in {} (the version is the git ref to deploy: a tag, a branch or a commit id of at least 7 hex digits)",
        redact_url(url)
    )
}

/// Mirrors `url` into the cache, resolves `version` as a ref and checks it out into a fresh
/// tree under `<state_dir>/build/`. Returns the tree and the commit.
async fn checkout(
    url: &str,
    version: &Name,
    state_dir: &Path,
    timeout: Duration,
) -> anyhow::Result<(PathBuf, String)> {
    let key: String = Sha256::digest(url.as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    let cache = state_dir.join("git").join(format!("{key}.git"));
    if !cache.join("HEAD").is_file() {
        std::fs::create_dir_all(&cache)
            .with_context(|| format!("cannot create {}", cache.display()))?;
        git(&["init", "--quiet", "--bare"], Some(&cache), timeout).await?;
    }
    git(
        &[
            "fetch",
            "--quiet",
            "--force",
            "--prune",
            "--no-write-fetch-head",
            "--",
            url,
            "+refs/heads/*:refs/heads/*",
            "+refs/tags/*:refs/tags/*",
        ],
        Some(&cache),
        timeout,
    )
    .await
    .with_context(|| format!("fetching {}", redact_url(url)))?;
    let commit = resolve(&cache, url, version, timeout).await?;
    let tree = state_dir.join("build").join(version.as_str());
    if tree.exists() {
        std::fs::remove_dir_all(&tree)
            .with_context(|| format!("cannot clear {}", tree.display()))?;
    }
    std::fs::create_dir_all(tree.parent().expect("build dir"))?;
    let cache_s = cache.to_string_lossy();
    let tree_s = tree.to_string_lossy();
    git(
        &[
            "clone",
            "--quiet",
            "--shared",
            "--no-checkout",
            "--",
            &cache_s,
            &tree_s,
        ],
        None,
        timeout,
    )
    .await?;
    git(
        &["checkout", "--quiet", "--detach", &commit, "--"],
        Some(&tree),
        timeout,
    )
    .await
    .with_context(|| format!("checking out {version} ({commit})"))?;
    if tree.join(".gitmodules").is_file() {
        // Submodules are part of the code at that commit: fetched here, they ship; left
        // out, they would arrive as empty directories. Relative submodule URLs resolve
        // against the repository's own URL, not the local mirror the tree was cloned from.
        git(&["remote", "set-url", "origin", url], Some(&tree), timeout).await?;
        // git refuses local submodules by default (a remote repository must not pull in files
        // of this machine); a repository that is itself local may use them.
        let local = url.starts_with("file://") || url.starts_with('/');
        let allow: &[&str] = if local {
            &["-c", "protocol.file.allow=always"]
        } else {
            &[]
        };
        let update = ["submodule", "update", "--init", "--recursive", "--quiet"];
        git(
            &[allow, &update[..]].concat(),
            Some(&tree),
            timeout,
        )
        .await
        .with_context(|| {
            format!(
                "fetching the submodules of {version} ({commit}) from the URLs in its .gitmodules"
            )
        })?;
    }
    Ok((tree, commit))
}

async fn run_build(
    cmd: &str,
    tree: &Path,
    version: &Name,
    commit: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!("exec 2>&1\n{cmd}"))
        .current_dir(tree)
        .env("CUTOVER_VERSION", version.as_str())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(c2) = commit {
        c.env("CUTOVER_COMMIT", c2);
    }
    let out = crate::bounded::run(c, timeout)
        .await
        .with_context(|| format!("cannot run the build in {}", tree.display()))?;
    if out.timed_out() {
        anyhow::bail!(
            "release {version}: build `{cmd}` did not finish within {} (raise command_timeout if it needs longer); last output lines:\n{}",
            humantime::format_duration(timeout),
            last_lines(String::from_utf8_lossy(&out.stdout).trim_end(), 10)
        );
    }
    if !out.success() {
        anyhow::bail!(
            "release {version}: build `{cmd}` failed in {} ({}); last output lines:\n{}",
            tree.display(),
            out.describe_exit(),
            last_lines(String::from_utf8_lossy(&out.stdout).trim_end(), 10)
        );
    }
    Ok(())
}

/// What ships from a tree.
#[derive(Debug, PartialEq)]
pub struct Selection {
    /// Paths (relative, sorted, directories before their contents).
    pub entries: Vec<String>,
    /// The `include` globs that matched nothing: each is a mistake (a build that did not
    /// produce `dist`, a typo), never something to skip quietly.
    pub unmatched: Vec<String>,
}

/// The paths of `dirs` that lie inside `tree`, relative to it (compared canonicalized, so a
/// symlinked or `..` spelling of the same directory still counts).
fn inside(tree: &Path, dirs: &[PathBuf]) -> Vec<String> {
    let Ok(tree) = tree.canonicalize() else {
        return Vec::new();
    };
    dirs.iter()
        .filter_map(|d| {
            let d = canonical(d)?;
            let rel = d.strip_prefix(&tree).ok()?;
            let rel = rel.to_str()?;
            (!rel.is_empty()).then(|| rel.to_string())
        })
        .collect()
}

/// `p` canonicalized, where its missing tail (a host root not created yet) is kept as written.
fn canonical(p: &Path) -> Option<PathBuf> {
    match p.canonicalize() {
        Ok(c) => Some(c),
        Err(_) => Some(canonical(p.parent()?)?.join(p.file_name()?)),
    }
}

/// What ships from `tree`: everything but `.git` and the `skip` paths (relative) when
/// `include` is empty, else what the globs match (a matched directory ships whole) but `skip`.
pub fn select(tree: &Path, include: &[String], skip: &[String]) -> anyhow::Result<Selection> {
    let globs: Vec<Vec<&str>> = include
        .iter()
        .map(|g| {
            g.trim_matches('/')
                .split('/')
                .filter(|s| !s.is_empty() && *s != ".")
                .collect()
        })
        .collect();
    let mut out = Vec::new();
    let mut hits = vec![false; globs.len()];
    walk(
        tree,
        tree,
        "",
        &globs,
        skip,
        &mut hits,
        include.is_empty(),
        &mut out,
    )?;
    out.sort();
    let unmatched = include
        .iter()
        .zip(hits)
        .filter(|(_, hit)| !hit)
        .map(|(g, _)| g.clone())
        .collect();
    Ok(Selection {
        entries: out,
        unmatched,
    })
}

#[allow(clippy::too_many_arguments)]
fn walk(
    tree: &Path,
    dir: &Path,
    rel: &str,
    globs: &[Vec<&str>],
    skip: &[String],
    hits: &mut [bool],
    whole: bool,
    out: &mut Vec<String>,
) -> anyhow::Result<()> {
    let rd = std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for e in rd {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        // Git's own data never ships, a submodule's `.git` file included.
        if name == ".git" {
            continue;
        }
        let path = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        if skip.contains(&path) {
            continue;
        }
        let segs: Vec<&str> = path.split('/').collect();
        let mut matched = whole;
        for (g, hit) in globs.iter().zip(hits.iter_mut()) {
            if glob_match(g, &segs) {
                *hit = true;
                matched = true;
            }
        }
        let kind = e.file_type()?;
        if matched && kind.is_symlink() {
            refuse_absolute_link_into(tree, &e.path(), &path)?;
        }
        let is_dir = kind.is_dir();
        if matched {
            out.push(path.clone());
        }
        if is_dir {
            let before = out.len();
            walk(tree, &e.path(), &path, globs, skip, hits, matched, out)?;
            // A directory whose contents ship is listed too, so it keeps its mode.
            if !matched && out.len() > before {
                out.push(path);
            }
        }
    }
    Ok(())
}

/// A symlink to an absolute path inside the tree being packed names this machine's build
/// directory: on the hosts it would dangle, or worse, find something else there. Links to
/// absolute system paths (`/etc/ssl/certs`) and relative links (Capistrano's `../../shared`)
/// ship as they are.
fn refuse_absolute_link_into(tree: &Path, link: &Path, rel: &str) -> anyhow::Result<()> {
    let target =
        std::fs::read_link(link).with_context(|| format!("cannot read {}", link.display()))?;
    if !target.is_absolute() {
        return Ok(());
    }
    let (Some(tree), Some(points)) = (canonical(tree), canonical(&target)) else {
        return Ok(());
    };
    if let Ok(inside) = points.strip_prefix(&tree) {
        let depth = rel.matches('/').count();
        let relative = format!("{}{}", "../".repeat(depth), inside.display());
        anyhow::bail!(
            "{rel} is a symlink to {}, an absolute path into the release tree on this machine: on the hosts it would point at a path that is not there; make it relative (ln -sfn {relative} {rel})",
            target.display()
        );
    }
    Ok(())
}

/// Matches path segments against glob segments: `*` and `?` within a segment, `**` across any
/// number of segments.
fn glob_match(glob: &[&str], path: &[&str]) -> bool {
    match glob.split_first() {
        None => path.is_empty(),
        Some((&"**", rest)) => (0..=path.len()).any(|i| glob_match(rest, &path[i..])),
        Some((g, rest)) => match path.split_first() {
            Some((p, prest)) => {
                segment_match(g.as_bytes(), p.as_bytes()) && glob_match(rest, prest)
            }
            None => false,
        },
    }
}

fn segment_match(g: &[u8], s: &[u8]) -> bool {
    match g.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| segment_match(rest, &s[i..])),
        Some((b'?', rest)) => !s.is_empty() && segment_match(rest, &s[1..]),
        Some((c, rest)) => s.first() == Some(c) && segment_match(rest, &s[1..]),
    }
}

/// Packs `entries` of `tree` into a gzipped tar at `to` (written beside it, then renamed).
async fn pack(tree: &Path, entries: &[String], to: &Path) -> anyhow::Result<()> {
    pack_with(std::ffi::OsStr::new("tar"), tree, entries, to).await
}

/// The options that make `tar` (the program at `program`) record root as every file's owner:
/// GNU tar's and bsdtar's (macOS, the BSDs: the tar of many a laptop that deploys) differ, and
/// each refuses the other's.
async fn owner_args(program: &std::ffi::OsStr) -> &'static [&'static str] {
    let version = Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .await;
    match version {
        Ok(out) if String::from_utf8_lossy(&out.stdout).contains("bsdtar") => {
            &["--uid", "0", "--gid", "0", "--numeric-owner"]
        }
        _ => &["--owner=0", "--group=0", "--numeric-owner"],
    }
}

/// [`pack`] with the `tar` at `program`.
async fn pack_with(
    program: &std::ffi::OsStr,
    tree: &Path,
    entries: &[String],
    to: &Path,
) -> anyhow::Result<()> {
    let partial = to.with_extension("gz.partial");
    let mut child = Command::new(program)
        .arg("-czf")
        .arg(&partial)
        .arg("-C")
        .arg(tree)
        // Owners of this machine mean nothing on a host (uid 4242 here is someone else there,
        // or no one): the archive says root, and hosts unpack as whoever unpacks.
        .args(owner_args(program).await)
        .args(["--no-recursion", "--null", "-T", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot run tar")?;
    let mut list = Vec::new();
    for e in entries {
        list.extend_from_slice(e.as_bytes());
        list.push(0);
    }
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(&list).await.context("writing to tar")?;
    drop(stdin);
    let out = child.wait_with_output().await.context("waiting for tar")?;
    if !out.status.success() {
        anyhow::bail!(
            "packing {} failed: {}",
            tree.display(),
            last_lines(String::from_utf8_lossy(&out.stderr).trim(), 5)
        );
    }
    std::fs::rename(&partial, to).with_context(|| format!("cannot write {}", to.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(p: &str) -> Vec<&str> {
        p.split('/').collect()
    }

    #[test]
    fn a_touch_changes_the_stat_print_only_and_an_edit_both() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("bin")).unwrap();
        std::fs::write(d.path().join("bin/app"), "v1\n").unwrap();
        std::os::unix::fs::symlink("bin/app", d.path().join("run")).unwrap();
        let entries = shipped(d.path(), &[], &[]).unwrap();
        assert_eq!(entries, ["bin", "bin/app", "run"]);
        let print = |content| tree_print(d.path(), &entries, content).unwrap();
        let (stat, content) = (print(false), print(true));
        let f = std::fs::File::options()
            .write(true)
            .open(d.path().join("bin/app"))
            .unwrap();
        f.set_modified(std::time::SystemTime::now() + Duration::from_secs(3600))
            .unwrap();
        assert_ne!(print(false), stat, "a new mtime");
        assert_eq!(print(true), content, "the same files");
        // Other bytes of the same size under the old mtime (`touch -r`): the change time
        // still tells.
        let (mtime, stat) = (
            std::fs::metadata(d.path().join("bin/app"))
                .unwrap()
                .modified()
                .unwrap(),
            print(false),
        );
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(d.path().join("bin/app"), "v9\n").unwrap();
        let f = std::fs::File::options()
            .write(true)
            .open(d.path().join("bin/app"))
            .unwrap();
        f.set_modified(mtime).unwrap();
        assert_ne!(print(false), stat, "same size and mtime, new ctime");
        std::fs::write(d.path().join("bin/app"), "v1\n").unwrap();
        std::fs::write(d.path().join("bin/app"), "v2\n").unwrap();
        assert_ne!(print(true), content, "other bytes, same size");
        std::fs::write(d.path().join("bin/app"), "v1\n").unwrap();
        std::fs::remove_file(d.path().join("run")).unwrap();
        std::os::unix::fs::symlink("bin/other", d.path().join("run")).unwrap();
        assert_ne!(print(true), content, "a link pointing elsewhere");
        // A FIFO is printed as what it is, never opened (that would block for a writer).
        let fifo = d.path().join("app.fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let entries = shipped(d.path(), &[], &[]).unwrap();
        assert!(entries.contains(&"app.fifo".to_string()), "{entries:?}");
        tree_print(d.path(), &entries, true).unwrap();
    }

    /// bsdtar (macOS, the BSDs) refused GNU tar's `--owner=0`: a deploy from such a laptop
    /// could not pack any release. CI installs bsdtar (libarchive-tools) for this test.
    #[tokio::test]
    async fn bsdtar_packs_as_gnu_tar_does() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        std::fs::create_dir_all(tree.join("bin")).unwrap();
        std::fs::write(tree.join("bin/app"), "hi\n").unwrap();
        let entries = vec!["bin".to_string(), "bin/app".to_string()];
        for program in ["bsdtar", "tar"] {
            let to = d.path().join(format!("{program}.tar.gz"));
            pack_with(std::ffi::OsStr::new(program), &tree, &entries, &to)
                .await
                .unwrap_or_else(|e| panic!("{program}: {e:#}"));
            let list = std::process::Command::new("tar")
                .args(["-tvz", "--numeric-owner", "-f"])
                .arg(&to)
                .output()
                .unwrap();
            let list = String::from_utf8_lossy(&list.stdout);
            assert!(
                list.contains(" 0/0 ") && list.contains("bin/app"),
                "{program}: {list}"
            );
        }
    }

    #[test]
    fn only_the_newest_archives_stay() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..5u64 {
            let f = std::fs::File::create(d.path().join(format!("v{i}.tar.gz"))).unwrap();
            f.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_000_000 + i))
                .unwrap();
        }
        std::fs::write(d.path().join("notes.txt"), "").unwrap();
        prune_archives(d.path(), 3);
        let mut left: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["notes.txt", "v2.tar.gz", "v3.tar.gz", "v4.tar.gz"]);
    }

    #[test]
    fn credentials_in_urls_are_redacted() {
        assert_eq!(
            redact_url("https://deploy:s3cret@example.com/acme/web.git"),
            "https://***@example.com/acme/web.git"
        );
        assert_eq!(
            redact_url("https://ghp_token@github.com:443/acme/web"),
            "https://***@github.com:443/acme/web"
        );
        assert_eq!(
            redact_url("ssh://git@example.com/web.git"),
            "ssh://***@example.com/web.git"
        );
        for same in [
            "https://github.com/acme/web.git",
            "https://example.com/a@b",
            "git@github.com:acme/web.git",
            "/srv/git/web.git",
        ] {
            assert_eq!(redact_url(same), same);
        }
    }

    /// Review finding 4: a repository that cannot be reached must not put its URL's
    /// credentials in the error (shown in the dashboard, the job, stderr).
    #[tokio::test]
    async fn git_errors_do_not_show_credentials() {
        let url = "https://deploy:s3cret-token@127.0.0.16:1/acme/web.git";
        let version = Name::parse("main").unwrap();
        let e = branch_commit(url, &version, Duration::from_secs(20))
            .await
            .unwrap_err();
        let e = format!("{e:#}");
        assert!(!e.contains("s3cret"), "{e}");
        assert!(e.contains("https://***@127.0.0.16:1/acme/web.git"), "{e}");
        let state = tempfile::tempdir().unwrap();
        let e = checkout(url, &version, state.path(), Duration::from_secs(20))
            .await
            .unwrap_err();
        let e = format!("{e:#}");
        assert!(!e.contains("s3cret"), "{e}");
        assert!(e.contains("fetching https://***@127.0.0.16"), "{e}");
    }

    #[test]
    fn globs() {
        assert!(glob_match(&segs("*.sh"), &segs("run.sh")));
        assert!(!glob_match(&segs("*.sh"), &segs("bin/run.sh")));
        assert!(glob_match(&segs("**/*.sh"), &segs("bin/run.sh")));
        assert!(glob_match(&segs("**/*.sh"), &segs("run.sh")));
        assert!(glob_match(&segs("bin"), &segs("bin")));
        assert!(glob_match(&segs("v?"), &segs("v1")));
        assert!(!glob_match(&segs("v?"), &segs("v10")));
    }

    #[test]
    fn select_ships_everything_but_git_or_what_include_says() {
        let d = tempfile::tempdir().unwrap();
        for f in [
            ".git/config",
            "run.sh",
            "bin/app",
            "src/main.c",
            "static/css/a.css",
        ] {
            let p = d.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "x").unwrap();
        }
        let all = select(d.path(), &[], &[]).unwrap().entries;
        assert_eq!(
            all,
            [
                "bin",
                "bin/app",
                "run.sh",
                "src",
                "src/main.c",
                "static",
                "static/css",
                "static/css/a.css"
            ]
        );
        let some = select(
            d.path(),
            &["run.sh".into(), "bin".into(), "**/*.css".into()],
            &[],
        )
        .unwrap()
        .entries;
        assert_eq!(
            some,
            [
                "bin",
                "bin/app",
                "run.sh",
                "static",
                "static/css",
                "static/css/a.css"
            ]
        );
    }

    /// Writes `files` (relative paths) under `root`, each holding its own path.
    fn files(root: &Path, files: &[&str]) {
        for f in files {
            let p = root.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, f).unwrap();
        }
    }

    fn path_release(include: &[&str]) -> Release {
        Release {
            path: Some("unused".into()),
            git: None,
            build: None,
            include: include.iter().map(|s| s.to_string()).collect(),
            keep: crate::config::Keep(1),
        }
    }

    /// Review finding: `include = ["run.sh", "dist", "config/*.yml"]` with `dist` missing
    /// (a build that did not produce it) shipped only run.sh, and the deploy went ahead.
    #[tokio::test]
    async fn every_include_glob_must_match_something() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        files(&tree, &["run.sh", "config/app.yml", "README"]);
        let v = Name::parse("v2").unwrap();
        let conf = d.path().join("cutover.toml");
        let state = d.path().join("state");
        let e = build(
            &path_release(&["run.sh", "dist", "config/*.yml", "*.ini"]),
            &v,
            &tree,
            &state,
            &conf,
            &[],
            Duration::from_secs(30),
        )
        .await
        .unwrap_err();
        let e = format!("{e:#}");
        assert_eq!(
            e,
            format!(
                "release v2: include \"dist\", \"*.ini\" matched nothing in {}: fix release.include in {}",
                tree.display(),
                conf.display()
            )
        );
        assert!(!state.join("archives/v2.tar.gz").exists());
        let s = select(&tree, &["run.sh".into(), "config/*.yml".into()], &[]).unwrap();
        assert!(s.unmatched.is_empty());
        assert_eq!(s.entries, ["config", "config/app.yml", "run.sh"]);
    }

    /// Review finding: `path = "."` shipped cutover's state directory (journal, earlier
    /// archives) and the local hosts' roots, the archive growing with each deploy.
    #[tokio::test]
    async fn the_state_directory_and_local_roots_never_ship() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("app");
        files(
            &tree,
            &[
                "run.sh",
                "cutover.toml",
                ".cutover/journal.db",
                ".cutover/archives/v1.tar.gz",
                "fleet/web1/releases/v1/run.sh",
                "fleet/keep.txt",
            ],
        );
        let v = Name::parse("v2").unwrap();
        // The state directory spelled through `..`, a host root not created yet.
        let never = [
            tree.join("fleet/../.cutover"),
            tree.join("cutover.toml"),
            tree.join("fleet/web1"),
            tree.join("fleet/web2"),
            d.path().join("elsewhere"),
        ];
        let a = build(
            &path_release(&[]),
            &v,
            &tree,
            &tree.join(".cutover"),
            &tree.join("cutover.toml"),
            &never,
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        let out = std::process::Command::new("tar")
            .arg("-tzf")
            .arg(&a.path)
            .output()
            .unwrap();
        let mut listed: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| l.trim_end_matches('/').to_string())
            .collect();
        listed.sort();
        assert_eq!(listed, ["fleet", "fleet/keep.txt", "run.sh"]);
    }

    /// Runs git in `dir` for a test, returning its trimmed stdout.
    /// A new repository at `dir` (branch `main`) with `names` committed as `message`.
    fn repo_with(dir: &Path, names: &[&str], message: &str) {
        std::fs::create_dir_all(dir).unwrap();
        sh_git(dir, &["init", "--quiet", "-b", "main"], "");
        files(dir, names);
        sh_git(dir, &["add", "."], "");
        sh_git(dir, &["commit", "--quiet", "-m", message], "");
    }

    fn sh_git(dir: &Path, args: &[&str], stdin: &str) -> String {
        use std::io::Write;
        let mut c = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["-c", "user.name=t", "-c", "user.email=t@t"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "git {args:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Review finding: `--version HEAD` resolved in the mirror, whose HEAD is
    /// `refs/heads/master` whatever the remote's default: it shipped master's commit under
    /// the fixed name HEAD (and FETCH_HEAD, ORIG_HEAD likewise move).
    /// A symlink to an absolute path inside the tree would dangle on the hosts: refused with
    /// the relative link to make; relative links and links to system paths ship as they are.
    #[test]
    fn absolute_links_into_the_tree_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("app");
        files(&tree, &["run.sh", "assets/logo.png"]);
        std::os::unix::fs::symlink("/etc/hostname", tree.join("hostname")).unwrap();
        std::os::unix::fs::symlink("../../shared/log", tree.join("log")).unwrap();
        select(&tree, &[], &[]).unwrap();
        std::fs::create_dir_all(tree.join("public")).unwrap();
        std::os::unix::fs::symlink(tree.join("assets"), tree.join("public/assets")).unwrap();
        let e = format!("{:#}", select(&tree, &[], &[]).unwrap_err());
        assert!(
            e.contains("public/assets is a symlink to")
                && e.contains("ln -sfn ../assets public/assets"),
            "{e}"
        );
    }

    /// A repository with a submodule ships the submodule's files (they used to arrive as an
    /// empty directory), and no `.git` of either.
    #[tokio::test]
    async fn submodules_ship_with_the_release() {
        let d = tempfile::tempdir().unwrap();
        repo_with(&d.path().join("lib"), &["lib.txt"], "lib");
        let repo = d.path().join("repo");
        std::fs::create_dir_all(&repo).unwrap();
        sh_git(&repo, &["init", "--quiet", "-b", "main"], "");
        files(&repo, &["run.sh"]);
        sh_git(
            &repo,
            &[
                "-c",
                "protocol.file.allow=always",
                "submodule",
                "add",
                "--quiet",
                "../lib",
                "vendor/lib",
            ],
            "",
        );
        sh_git(&repo, &["add", "."], "");
        sh_git(&repo, &["commit", "--quiet", "-m", "app"], "");
        sh_git(&repo, &["tag", "v1"], "");
        let url = format!("file://{}", repo.display());
        let (tree, _) = checkout(
            &url,
            &Name::parse("v1").unwrap(),
            &d.path().join("state"),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        assert!(tree.join("vendor/lib/lib.txt").is_file());
        let Selection { entries, .. } = select(&tree, &[], &[]).unwrap();
        assert!(
            entries.contains(&"vendor/lib/lib.txt".to_string()),
            "{entries:?}"
        );
        assert!(
            !entries.iter().any(|e| e.split('/').any(|s| s == ".git")),
            "{entries:?}"
        );
    }

    #[tokio::test]
    async fn a_git_version_is_a_tag_a_branch_or_a_commit_id() {
        let d = tempfile::tempdir().unwrap();
        let repo = d.path().join("repo");
        repo_with(&repo, &["run.sh"], "one");
        let first = sh_git(&repo, &["rev-parse", "HEAD"], "");
        sh_git(&repo, &["branch", "master"], "");
        sh_git(&repo, &["tag", "v1"], "");
        sh_git(
            &repo,
            &["commit", "--quiet", "--allow-empty", "-m", "two"],
            "",
        );
        let second = sh_git(&repo, &["rev-parse", "HEAD"], "");
        let url = format!("file://{}", repo.display());
        let state = d.path().join("state");
        let t = Duration::from_secs(30);
        let at = |v: &str| Name::parse(v).unwrap();
        for v in ["HEAD", "FETCH_HEAD", "ORIG_HEAD"] {
            let e = checkout(&url, &at(v), &state, t).await.unwrap_err();
            let e = format!("{e:#}");
            assert!(
                e.starts_with(&format!("release {v}: {v} is not a fixed git ref"))
                    && e.contains("deploy a tag, a branch or a commit id"),
                "{e}"
            );
            let e = branch_commit(&url, &at(v), t).await.unwrap_err();
            assert!(format!("{e:#}").contains("not a fixed git ref"), "{e:#}");
        }
        for (v, want) in [
            ("v1", &first),
            ("main", &second),
            ("master", &first),
            (&second[..7], &second),
            (second.as_str(), &second),
        ] {
            let (_, commit) = checkout(&url, &at(v), &state, t).await.unwrap();
            assert_eq!(&commit, want, "{v}");
        }
        // Too short to name one commit for good, and a name that is nowhere.
        for v in [&second[..6], "v9"] {
            let e = checkout(&url, &at(v), &state, t).await.unwrap_err();
            let e = format!("{e:#}");
            assert!(
                e.starts_with(&format!(
                    "release {v}: no tag, branch or commit named {v} in file://"
                )) && e.contains("at least 7 hex digits"),
                "{e}"
            );
        }
    }

    /// Review finding: a short commit id that two commits start with was reported as
    /// missing ("no branch, tag or commit named ..."), hiding what to do: give more digits.
    #[tokio::test]
    async fn an_ambiguous_commit_id_says_so() {
        let d = tempfile::tempdir().unwrap();
        let repo = d.path().join("repo");
        std::fs::create_dir_all(&repo).unwrap();
        sh_git(&repo, &["init", "--quiet", "--bare"], "");
        let tree = sh_git(&repo, &["hash-object", "-t", "tree", "-w", "--stdin"], "");
        // Two root commits whose ids both start with d8b5112 (found by trying messages).
        for (branch, message) in [("a", "26736"), ("b", "32859")] {
            let body = format!(
                "tree {tree}\nauthor a <a@a> 1700000000 +0000\ncommitter a <a@a> 1700000000 +0000\n\n{message}\n"
            );
            let id = sh_git(
                &repo,
                &["hash-object", "-t", "commit", "-w", "--stdin"],
                &body,
            );
            assert!(id.starts_with("d8b5112"), "{id}");
            sh_git(
                &repo,
                &["update-ref", &format!("refs/heads/{branch}"), &id],
                "",
            );
        }
        let url = format!("file://{}", repo.display());
        let state = d.path().join("state");
        let t = Duration::from_secs(30);
        let v = Name::parse("d8b5112").unwrap();
        let e = checkout(&url, &v, &state, t).await.unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.starts_with("release d8b5112: commit id d8b5112 is ambiguous in file://")
                && e.contains("give more characters"),
            "{e}"
        );
        let v = Name::parse("d8b51123").unwrap();
        let (_, commit) = checkout(&url, &v, &state, t).await.unwrap();
        assert_eq!(commit, "d8b51123122a883d1190f3b6e5a5fc8e03a95c26");
    }
}
