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

/// Pushes accepted for deployment (newest last, bounded): GitHub neither orders deliveries nor
/// stops anyone from redelivering an old one, and a stale push deployed after a newer one
/// would move the fleet back.
#[derive(Default)]
pub struct Accepted(std::sync::Mutex<std::collections::VecDeque<(String, String)>>);

/// How many accepted pushes are remembered.
const REMEMBERED: usize = 256;

impl Accepted {
    /// Records `push` as accepted unless it is stale: an older push delivered again (a
    /// redelivery of anything but the newest, which retries it), or a push whose commit is an
    /// ancestor, through the `before` links of accepted pushes, of the newest one (it arrived
    /// late). A push that continues from the newest (its `before` is the newest commit, as a
    /// force push back to an older commit is) or is forced is always new. Says why when stale.
    pub fn accept(&self, push: &PushEvent) -> Result<(), String> {
        let after = push.after.to_ascii_lowercase();
        let before = push.before.to_ascii_lowercase();
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let newest = seen.back().cloned();
        let continues = newest.as_ref().is_none_or(|(_, a)| *a == before);
        let retry = newest.as_ref() == Some(&(before.clone(), after.clone()));
        if !(continues || retry || push.forced) {
            if seen.iter().any(|(b, a)| *a == after && *b == before) {
                return Err(format!(
                    "{} was accepted before (a redelivery of an older push): not deployed again",
                    short(&after)
                ));
            }
            self.late(&seen, &after)?;
        }
        if !retry {
            seen.push_back((before, after));
            if seen.len() > REMEMBERED {
                seen.pop_front();
            }
        }
        Ok(())
    }

    /// Err when `after` is an ancestor of the newest accepted push through the `before` links.
    fn late(
        &self,
        seen: &std::collections::VecDeque<(String, String)>,
        after: &str,
    ) -> Result<(), String> {
        if let Some((newest_before, newest)) = seen.back() {
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

/// Decides what a push means for a fleet that deploys `branch`.
pub fn decide(push: &PushEvent, branch: &str, git_release: bool) -> PushDecision {
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
    let by = push
        .pusher
        .as_ref()
        .map(|p| p.name.as_str())
        .filter(|n| !n.is_empty())
        .unwrap_or("someone");
    let repo = push
        .repository
        .as_ref()
        .map(|r| r.full_name.as_str())
        .filter(|n| !n.is_empty())
        .map(|r| format!(" to {r}"))
        .unwrap_or_default();
    let subject = push
        .head_commit
        .as_ref()
        .and_then(|c| c.message.lines().next())
        .map(|m| format!(": {}", m.chars().take(80).collect::<String>()))
        .unwrap_or_default();
    PushDecision::Deploy {
        version,
        key: format!("push:{wanted}"),
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

    #[test]
    fn only_the_branch_deploys() {
        let sha = "abcdef0123456789abcdef0123456789abcdef01";
        match decide(&push("refs/heads/main", sha), "main", false) {
            PushDecision::Deploy {
                version,
                key,
                trigger,
            } => {
                assert_eq!(version, "abcdef0");
                assert_eq!(key, "push:refs/heads/main");
                assert!(trigger.contains("alice") && trigger.contains("Fix the thing"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decide(&push("refs/heads/main", sha), "main", true),
            PushDecision::Deploy { version, .. } if version == sha
        ));
        assert!(matches!(
            decide(&push("refs/heads/dev", sha), "main", false),
            PushDecision::Ignore(_)
        ));
        assert!(matches!(
            decide(&push("refs/tags/main", sha), "main", false),
            PushDecision::Ignore(_)
        ));
        assert!(matches!(
            decide(&push("refs/heads/main", &"0".repeat(40)), "main", false),
            PushDecision::Ignore(_)
        ));
    }

    #[test]
    fn redelivered_and_late_pushes_are_not_accepted() {
        let (a, b, c) = ("a".repeat(40), "b".repeat(40), "c".repeat(40));
        let zero = "0".repeat(40);
        let p = |before: &str, after: &str| {
            let mut e = push("refs/heads/main", after);
            e.before = before.to_string();
            e
        };
        let seen = Accepted::default();
        seen.accept(&p(&zero, &a)).unwrap();
        seen.accept(&p(&a, &b)).unwrap();
        let e = seen.accept(&p(&zero, &a)).unwrap_err();
        assert!(e.contains("redelivery"), "{e}");
        // B -> C arrives before A -> B: A -> B is then late.
        let seen = Accepted::default();
        seen.accept(&p(&zero, &a)).unwrap();
        seen.accept(&p(&b, &c)).unwrap();
        let e = seen.accept(&p(&a, &b)).unwrap_err();
        assert!(e.contains("older than cccccc"), "{e}");
        // A force push to another line of history is new.
        seen.accept(&p(&c, &"d".repeat(40))).unwrap();
        // ... and so is one back to a commit deployed before: it continues from the newest.
        seen.accept(&p(&"d".repeat(40), &a)).unwrap();
        // Redelivering the newest push retries it.
        seen.accept(&p(&"d".repeat(40), &a)).unwrap();
    }
}
