//! GitHub webhooks: `POST /hooks/github`.
//!
//! Nothing in the request is trusted before its signature is: `X-Hub-Signature-256` must be
//! `sha256=<hex>` of HMAC-SHA256 over the *raw* body with the configured secret, compared in
//! constant time (`Mac::verify_slice`). A missing or wrong signature is a 401 and nothing else
//! happens (not even parsing). Then by `X-GitHub-Event`:
//! - `ping` → 200;
//! - `push` to `refs/heads/<branch>` → the pushed commit (`after`) is queued for deployment
//!   (202, with the job); a newer push replaces a queued older one;
//! - any other branch, a tag, a branch deletion, any other event → 202 and ignored (logged).
//!
//! The version deployed: with `release.git`, the full commit sha (the git source checks it
//! out); with `release.path`, the short sha (first [`SHORT_SHA`] hex digits), so a CI job that
//! builds `builds/<short sha>/` before the push reaches us is deployed as such.

use hmac::{KeyInit, Mac};
use serde::Deserialize;
use sha2::Sha256;

use super::GithubSettings;

/// Hex digits of a short sha (git's default abbreviation).
pub const SHORT_SHA: usize = 7;

/// Checks `X-Hub-Signature-256` against the raw body.
pub fn verify_signature(secret: &[u8], body: &[u8], header: Option<&str>) -> bool {
    let Some(hex) = header.and_then(|h| h.trim().strip_prefix("sha256=")) else {
        return false;
    };
    let Some(sig) = decode_hex(hex) else {
        return false;
    };
    let Ok(mut mac) = hmac::Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

/// `sha256=<hex>` for a body: what GitHub sends (used by tests and docs examples).
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The parts of a push event cutover reads (GitHub sends many more; they are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct PushEvent {
    #[serde(rename = "ref")]
    pub git_ref: String,
    #[serde(default)]
    pub before: String,
    pub after: String,
    #[serde(default)]
    pub deleted: bool,
    /// A force push (history rewritten): whatever it points at is the new head.
    #[serde(default)]
    pub forced: bool,
    #[serde(default)]
    pub repository: Option<Repository>,
    #[serde(default)]
    pub pusher: Option<Pusher>,
    #[serde(default)]
    pub head_commit: Option<Commit>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Repository {
    #[serde(default)]
    pub full_name: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Pusher {
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Commit {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub message: String,
}

/// How many accepted pushes of a branch [`judge`] follows back to tell a late push. Whether a
/// push was accepted before is looked up among every push the journal keeps instead
/// (`accepted_before`), never only among these.
pub const REMEMBERED: usize = 256;

/// Whether `push` is new given the pushes accepted before for its repository and branch
/// (`seen`: `(before, after)`, oldest first, the newest [`REMEMBERED`] as the journal keeps
/// them across restarts) and whether its very `(before, after)` was accepted before, among all
/// the pushes the journal keeps (`accepted_before`).
///
/// GitHub neither orders deliveries nor stops anyone from redelivering an old one, and a stale
/// push deployed after a newer one would move the fleet back. Stale, with the reason:
/// - a push accepted before (the same `before` and `after`): a redelivery or a replay, also of
///   the newest push, also when forced, and however many pushes came since (the delivery id is
///   not signed, so a captured push replayed later comes under a fresh one); to deploy a
///   commit again, use the API or dashboard;
/// - a push that does not continue from the newest (its `before` is not the newest `after`)
///   whose commit is an ancestor of the newest through the `before` links (it arrived late),
///   unless it is forced: a force push rewrites history, whatever it points at is the new head.
pub fn judge(
    seen: &[(String, String)],
    push: &PushEvent,
    accepted_before: bool,
) -> Result<(), String> {
    let after = push.after.to_ascii_lowercase();
    let before = push.before.to_ascii_lowercase();
    if accepted_before || seen.iter().any(|(b, a)| *a == after && *b == before) {
        return Err(format!(
            "{} was accepted before (a redelivery): not queued again; to deploy it again, use the dashboard or `cutover deploy --version VERSION`",
            short(&after)
        ));
    }
    let continues = seen.last().is_none_or(|(_, a)| *a == before);
    if !(continues || push.forced) {
        late(seen, &after)?;
    }
    Ok(())
}

/// Err when `after` is an ancestor of the newest accepted push through the `before` links.
fn late(seen: &[(String, String)], after: &str) -> Result<(), String> {
    if let Some((newest_before, newest)) = seen.last() {
        let mut x = newest_before.clone();
        for _ in 0..seen.len() {
            if x == after {
                return Err(format!(
                    "{} is older than {}, accepted already (a late delivery): not deployed",
                    short(after),
                    short(newest)
                ));
            }
            match seen.iter().rev().find(|(_, a)| *a == x) {
                Some((b, _)) => x = b.clone(),
                None => break,
            }
        }
    }
    Ok(())
}

/// `text`'s first `max` characters, with "…" when there were more.
fn clip(text: &str, max: usize) -> String {
    let mut chars = text.chars();
    let head: String = chars.by_ref().take(max).collect();
    if chars.next().is_some() {
        format!("{head}…")
    } else {
        head
    }
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(SHORT_SHA)]
}

/// What to do with a verified push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushDecision {
    /// Deploy this version (the job key makes newer pushes of the branch replace it).
    Deploy {
        version: String,
        key: String,
        trigger: String,
    },
    Ignore(String),
}

/// `owner/name` in lower case (GitHub's names are case-insensitive), or `None` when `s` is
/// not of that shape.
pub fn repository_name(s: &str) -> Option<String> {
    let s = s.trim();
    let (owner, name) = s.split_once('/')?;
    let ok = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    (ok(owner) && ok(name)).then(|| s.to_ascii_lowercase())
}

/// The `owner/name` of a github.com repository URL (`https://github.com/acme/web.git`,
/// `git@github.com:acme/web.git`, `ssh://git@github.com/acme/web`, with or without
/// credentials), `None` for any other host.
pub fn repository_of_url(url: &str) -> Option<String> {
    let url = url.trim();
    let (host, path) = match url.split_once("://") {
        Some((_, rest)) => rest.split_once('/')?,
        // scp-like: [user@]host:path
        None => url.split_once(':')?,
    };
    let host = host.rsplit('@').next()?;
    let host = host.split(':').next()?;
    if !host.eq_ignore_ascii_case("github.com") && !host.eq_ignore_ascii_case("www.github.com") {
        return None;
    }
    let path = path.trim_matches('/');
    let path = path.strip_suffix(".git").unwrap_or(path);
    repository_name(path)
}

/// Decides what a push means for a fleet that deploys `github.branch` of
/// `github.repository`.
pub fn decide(push: &PushEvent, github: &GithubSettings, git_release: bool) -> PushDecision {
    let from = push
        .repository
        .as_ref()
        .map(|r| r.full_name.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty());
    if let Some(wanted) = &github.repository {
        if from.as_ref() != Some(wanted) {
            return PushDecision::Ignore(format!(
                "repository {} is not {wanted}",
                from.as_deref().unwrap_or("(none given)")
            ));
        }
    }
    let branch = &github.branch;
    let wanted = format!("refs/heads/{branch}");
    if push.git_ref != wanted {
        return PushDecision::Ignore(format!(
            "push to {} ignored: only {wanted} deploys",
            push.git_ref
        ));
    }
    let sha = push.after.to_ascii_lowercase();
    if push.deleted || sha.chars().all(|c| c == '0') {
        return PushDecision::Ignore(format!("{wanted} was deleted: nothing to deploy"));
    }
    if sha.len() < SHORT_SHA || !sha.chars().all(|c| c.is_ascii_hexdigit()) {
        return PushDecision::Ignore(format!(
            "push to {wanted} ignored: \"after\" is not a commit sha: {:?}",
            push.after
        ));
    }
    let version = if git_release {
        sha.clone()
    } else {
        sha[..SHORT_SHA].to_string()
    };
    // Each part cut to a length a person reads: the trigger goes into the queue, the log, the
    // API and the dashboard, and a signed push may carry names of any length.
    let by = push
        .pusher
        .as_ref()
        .map(|p| clip(&p.name, 64))
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "someone".into());
    let repo = push
        .repository
        .as_ref()
        .map(|r| clip(&r.full_name, 160))
        .filter(|n| !n.is_empty())
        .map(|r| format!(" to {r}"))
        .unwrap_or_default();
    let subject = push
        .head_commit
        .as_ref()
        .and_then(|c| c.message.lines().next())
        .map(|m| format!(": {}", clip(m, 80)))
        .unwrap_or_default();
    PushDecision::Deploy {
        version,
        key: format!("push:{}:{wanted}", from.as_deref().unwrap_or("-")),
        trigger: format!("github push {} by {by}{repo}{subject}", &sha[..SHORT_SHA]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_githubs_documented_example() {
        // From GitHub's "Validating webhook deliveries" page.
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(verify_signature(
            b"It's a Secret to Everybody",
            b"Hello, World!",
            Some(sig)
        ));
        assert_eq!(sign(b"It's a Secret to Everybody", b"Hello, World!"), sig);
        assert!(!verify_signature(b"other", b"Hello, World!", Some(sig)));
        assert!(!verify_signature(
            b"It's a Secret to Everybody",
            b"Hello, World?",
            Some(sig)
        ));
        assert!(!verify_signature(b"k", b"x", None));
        assert!(!verify_signature(b"k", b"x", Some("sha1=abc")));
        assert!(!verify_signature(b"k", b"x", Some("sha256=zz")));
    }

    fn push(r: &str, after: &str) -> PushEvent {
        serde_json::from_value(serde_json::json!({
            "ref": r, "before": "0".repeat(40), "after": after, "deleted": false,
            "repository": {"full_name": "acme/web"}, "pusher": {"name": "alice"},
            "head_commit": {"id": after, "message": "Fix the thing\n\nlong text"},
        }))
        .unwrap()
    }

    fn main_of(repository: Option<&str>) -> GithubSettings {
        GithubSettings {
            secret: b"0123456789abcdef".to_vec(),
            branch: "main".into(),
            repository: repository.map(str::to_string),
        }
    }

    /// Review finding: a signed push with a 100 KB pusher name put all of it into the trigger
    /// (queue, log, API, dashboard).
    #[test]
    fn names_in_the_trigger_are_cut_to_a_readable_length() {
        let sha = "abcdef0123456789abcdef0123456789abcdef01";
        let mut p = push("refs/heads/main", sha);
        p.pusher.as_mut().unwrap().name = "x".repeat(100_000);
        p.head_commit.as_mut().unwrap().message = "é".repeat(500);
        match decide(&p, &main_of(None), false) {
            PushDecision::Deploy { trigger, .. } => {
                assert!(trigger.chars().count() < 300, "{}", trigger.len());
                assert!(
                    trigger.contains(&format!("{}…", "x".repeat(64))),
                    "{trigger}"
                );
                assert!(
                    trigger.ends_with(&format!("{}…", "é".repeat(80))),
                    "{trigger}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(clip("short", 64), "short");
    }

    #[test]
    fn only_the_branch_deploys() {
        let sha = "abcdef0123456789abcdef0123456789abcdef01";
        let main = main_of(None);
        match decide(&push("refs/heads/main", sha), &main, false) {
            PushDecision::Deploy {
                version,
                key,
                trigger,
            } => {
                assert_eq!(version, "abcdef0");
                assert_eq!(key, "push:acme/web:refs/heads/main");
                assert!(trigger.contains("alice") && trigger.contains("Fix the thing"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decide(&push("refs/heads/main", sha), &main, true),
            PushDecision::Deploy { version, .. } if version == sha
        ));
        assert!(matches!(
            decide(&push("refs/heads/dev", sha), &main, false),
            PushDecision::Ignore(_)
        ));
        assert!(matches!(
            decide(&push("refs/tags/main", sha), &main, false),
            PushDecision::Ignore(_)
        ));
        assert!(matches!(
            decide(&push("refs/heads/main", &"0".repeat(40)), &main, false),
            PushDecision::Ignore(_)
        ));
    }

    #[test]
    fn only_the_repository_deploys() {
        let sha = "abcdef0123456789abcdef0123456789abcdef01";
        let mut other = push("refs/heads/main", sha);
        other.repository = Some(Repository {
            full_name: "evil/web".into(),
        });
        let acme = main_of(Some("acme/web"));
        assert!(matches!(
            decide(&push("refs/heads/main", sha), &acme, false),
            PushDecision::Deploy { .. }
        ));
        assert_eq!(
            decide(&other, &acme, false),
            PushDecision::Ignore("repository evil/web is not acme/web".into())
        );
        other.repository = None;
        assert!(matches!(
            decide(&other, &acme, false),
            PushDecision::Ignore(_)
        ));
        // Without a repository set, the key still tells repositories apart.
        match decide(&push("refs/heads/main", sha), &main_of(None), false) {
            PushDecision::Deploy { key, .. } => assert_eq!(key, "push:acme/web:refs/heads/main"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn repository_from_a_github_url() {
        for url in [
            "https://github.com/Acme/web.git",
            "https://user:token@github.com/acme/web",
            "git@github.com:acme/web.git",
            "ssh://git@github.com:22/acme/web.git/",
        ] {
            assert_eq!(repository_of_url(url).as_deref(), Some("acme/web"), "{url}");
        }
        for url in [
            "https://gitlab.com/acme/web.git",
            "/srv/git/web.git",
            "https://github.com/acme",
            "file:///tmp/x",
        ] {
            assert_eq!(repository_of_url(url), None, "{url}");
        }
        assert_eq!(repository_name(" Acme/Web "), Some("acme/web".into()));
        assert_eq!(repository_name("acme"), None);
        assert_eq!(repository_name("a/b/c"), None);
    }

    #[test]
    fn redelivered_and_late_pushes_are_not_accepted() {
        let (a, b, c, d) = (
            "a".repeat(40),
            "b".repeat(40),
            "c".repeat(40),
            "d".repeat(40),
        );
        let zero = "0".repeat(40);
        let p = |before: &str, after: &str, forced: bool| {
            let mut e = push("refs/heads/main", after);
            e.before = before.to_string();
            e.forced = forced;
            e
        };
        let pair = |b: &str, a: &str| (b.to_string(), a.to_string());
        let mut seen = Vec::new();
        let accept = |seen: &mut Vec<(String, String)>, e: PushEvent| {
            judge(seen, &e, false)?;
            seen.push(pair(&e.before, &e.after));
            Ok::<(), String>(())
        };
        accept(&mut seen, p(&zero, &a, false)).unwrap();
        accept(&mut seen, p(&a, &b, false)).unwrap();
        let e = accept(&mut seen, p(&zero, &a, false)).unwrap_err();
        assert!(e.contains("redelivery"), "{e}");
        // B -> C arrives before A -> B: A -> B is then late.
        let mut seen = Vec::new();
        accept(&mut seen, p(&zero, &a, false)).unwrap();
        accept(&mut seen, p(&b, &c, false)).unwrap();
        let e = accept(&mut seen, p(&a, &b, false)).unwrap_err();
        assert!(e.contains("older than cccccc"), "{e}");
        // A force push to another line of history is new.
        accept(&mut seen, p(&c, &d, true)).unwrap();
        // ... and so is one back to a commit deployed before: it continues from the newest.
        accept(&mut seen, p(&d, &a, false)).unwrap();
        // Redelivering the newest push does not queue it again (it may be live, or have been
        // rolled back on purpose).
        let e = accept(&mut seen, p(&d, &a, false)).unwrap_err();
        assert!(e.contains("redelivery"), "{e}");
        // Nor does redelivering an older force push: "forced" only skips the lateness check.
        let e = accept(&mut seen, p(&c, &d, true)).unwrap_err();
        assert!(e.contains("redelivery"), "{e}");
        assert_eq!(seen.last(), Some(&pair(&d, &a)));
        // Accepted before, as the journal says, though no longer among the newest: a replay.
        let e = judge(&[pair(&b, &c)], &p(&zero, &a, false), true).unwrap_err();
        assert!(e.contains("redelivery"), "{e}");
    }
}
