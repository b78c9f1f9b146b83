//! What a host still needs once traffic has moved to its new instance, in one round trip: every
//! other instance stopped (stop signal, `stop_timeout`, then KILL) and its pid file removed,
//! `current` pointed at the new release, releases beyond `keep` removed (never the live one
//! or the one the host served before the deployment), and what an interrupted staging left
//! (an upload, a half-unpacked `.partial`) removed: staging is over once a host settles, and
//! the deploy lock keeps any other from starting.
//!
//! Why one script: each of these used to be its own round trip (list instances, stop each, move
//! `current`, list releases, remove), about 20 ms apiece over SSH, paid by every host. None of it
//! changes what clients see (the old backends are already out of the balancer), so a rolling
//! deploy runs it in the background while the next batch starts.

use std::time::Duration;

use crate::config::{App, Host};
use crate::instance::{self, Instance, Stopped};
use crate::release::Layout;
use crate::transport::{Transport, run_ok, sh_quote};

/// `releases/.live-<version>`: rewritten (builtins only) each time the release becomes a
/// host's live one, so that pruning keeps the releases most recently staged *or* live: a
/// release deployed again is a way back, one staged once and never served is not.
pub const LIVE_MARK: &str = ".live-";

/// What settling did on a host.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Settled {
    /// Instances that were running, as `version-port`, and how they stopped.
    pub stopped: Vec<(String, Stopped)>,
    /// Releases removed.
    pub pruned: Vec<String>,
    /// How the instance kept was doing when the host settled.
    pub keep: Keep,
}

/// The kept instance's process, read by the same script (builtins only while it runs).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    #[default]
    Running,
    /// Gone, but its process group runs: see [`instance::Recorded::background`].
    Background,
    /// Gone, and nothing of its group runs: it died after passing its health gate.
    Exited,
}

/// Settles `host` on `keep`: see the module docs. `protect` names releases never to remove
/// besides `keep`'s (the host's previous release, for a quick way back); `spare` names other
/// instances to leave running, as `<version>-<port>` (old instances the balancer may still
/// route to).
pub async fn settle(
    transport: &dyn Transport,
    host: &Host,
    keep: &Instance,
    app: &App,
    keep_releases: usize,
    protect: &[String],
    spare: &[String],
) -> anyhow::Result<Settled> {
    let layout = Layout::of(host);
    let version = keep.version.as_str();
    let mut running: Vec<String> = vec![format!("{version}-{}.pid", keep.port())];
    running.extend(spare.iter().map(|s| format!("{s}.pid")));
    let mut protected: Vec<&str> = vec![version];
    protected.extend(protect.iter().map(String::as_str));
    // The stop signal first, then `current` and pruning while the old processes exit (a
    // well-behaved app takes about a millisecond, the `ln` and `mv` about as long), then the
    // wait: most of the time the first check after them finds everything gone, and no `sleep`
    // runs at all.
    let script = format!(
        "{stop_fn}\
         set --\n\
         if cd {run} 2>/dev/null; then\n\
         \x20 for f in *.pid; do\n\
         \x20   case {running} in *\" $f \"*) continue ;; esac\n\
         \x20   [ -e \"$f\" ] && set -- \"$@\" \"$PWD/$f\"\n\
         \x20 done\n\
         fi\n\
         signal_all \"$@\"\n\
         cd {root} || {{ await_all \"$@\"; exit 3; }}\n\
         [ -d {rel} ] || {{ echo 'release {version} is not staged on this host' >&2; await_all \"$@\"; exit 3; }}\n\
         ln -sfn {target} .current.tmp && mv -T .current.tmp current || {{ await_all \"$@\"; exit 4; }}\n\
         printf %s '' 2>/dev/null > {live_mark} || true\n\
         for f in releases/.*.tar.gz releases/.*.tar.gz.upload releases/*.partial; do\n\
         \x20 [ -e \"$f\" ] && rm -rf -- \"$f\"\n\
         done\n\
         n=0\n\
         for r in releases/*; do [ -d \"$r\" ] && n=$((n+1)); done\n\
         if [ {keep_releases} -gt 0 ] && [ $n -gt {keep_releases} ] && cd releases; then\n\
         \x20 ls -1At | {{\n\
         \x20   n=0; seen=' '\n\
         \x20   while IFS= read -r r; do\n\
         \x20     case \"$r\" in .live-*) r=${{r#.live-}} ;; .*|*.partial) continue ;; esac\n\
         \x20     [ -d \"$r\" ] || continue\n\
         \x20     case $seen in *\" $r \"*) continue ;; esac\n\
         \x20     seen=\"$seen$r \"\n\
         \x20     n=$((n+1))\n\
         \x20     [ $n -le {keep_releases} ] && continue\n\
         \x20     case {protected} in *\" $r \"*) continue ;; esac\n\
         \x20     rm -rf -- \"$r\" \".live-$r\" && echo \"pruned $r\"\n\
         \x20     for l in ../log/\"$r\"-*.log; do\n\
         \x20       p=${{l##*/\"$r\"-}}; p=${{p%.log}}\n\
         \x20       case $p in ''|*[!0-9]*) continue ;; esac\n\
         \x20       rm -f -- \"$l\"\n\
         \x20     done\n\
         \x20   done\n\
         \x20 }}\n\
         fi\n\
         await_all \"$@\"\n\
         if ! alive {keep_pf}; then if [ -n \"$_pid\" ] && [ -n \"$(group_live \"$_pid\")\" ]; then echo 'keep background'; else echo 'keep exited'; fi; fi\n\
         exit 0\n",
        keep_pf = sh_quote(layout.pid_file(version, keep.port()).to_string_lossy()),
        stop_fn = instance::stop_all_fn(app.stop_signal, *app.stop_timeout),
        run = sh_quote(layout.run_dir().to_string_lossy()),
        running = sh_quote(format!(" {} ", running.join(" "))),
        root = sh_quote(layout.root.to_string_lossy()),
        rel = sh_quote(format!("releases/{version}")),
        target = sh_quote(format!("releases/{version}")),
        live_mark = sh_quote(format!("releases/{LIVE_MARK}{version}")),
        protected = sh_quote(format!(" {} ", protected.join(" "))),
    );
    let out = run_ok(
        transport,
        host,
        &format!("settling on {version}"),
        &script,
        // Stopping strays may take their stop timeout and the wait after SIGKILL.
        *app.stop_timeout + Duration::from_secs(5) + transport.step_timeout(),
    )
    .await?;
    Ok(parse(&out, &layout))
}

fn parse(out: &str, layout: &Layout) -> Settled {
    let run_dir = layout.run_dir();
    let mut settled = Settled::default();
    for line in out.lines() {
        if let Some(r) = line.strip_prefix("pruned ") {
            settled.pruned.push(r.to_string());
        }
        match line {
            "keep background" => settled.keep = Keep::Background,
            "keep exited" => settled.keep = Keep::Exited,
            _ => {}
        }
    }
    for line in out.lines() {
        let Some(file) = line.strip_prefix("signalled ") else {
            continue;
        };
        let name = std::path::Path::new(file)
            .strip_prefix(&run_dir)
            .ok()
            .and_then(|p| p.to_str())
            .and_then(|p| p.strip_suffix(".pid"))
            .unwrap_or(file);
        if let Some(how) = instance::stop_outcome(out, file) {
            settled.stopped.push((name.to_string(), how));
        }
    }
    settled
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::local::LocalTransport;
    use std::path::Path;

    fn host(root: &Path) -> Host {
        Host::for_test(root)
    }

    fn app() -> App {
        toml::from_str("name = \"a\"\nstart = \"sleep 30\"\nstop_timeout = \"2s\"\n").unwrap()
    }

    /// Settles the host at `root` on an instance of `version` (port 5000), keeping `keep`
    /// releases, nothing protected.
    async fn settle_keeping(root: &Path, version: &str, keep: usize) -> Settled {
        let kept = Instance {
            host: "web1".into(),
            version: version.into(),
            address: "127.0.0.1:5000".parse().unwrap(),
            pid: 1,
        };
        settle(
            &LocalTransport::new(),
            &host(root),
            &kept,
            &app(),
            keep,
            &[],
            &[],
        )
        .await
        .unwrap()
    }

    /// Writes a pid file for `pid` the way `instance::start` does (with its start time).
    fn pid_file(root: &Path, name: &str, pid: u32) {
        let start = crate::journal::process_start_ticks(pid).unwrap();
        std::fs::write(root.join("run").join(name), format!("{pid} {start}\n")).unwrap();
    }

    #[tokio::test]
    async fn stops_others_moves_current_and_prunes_beyond_keep() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        for (i, v) in ["v1", "v2", "v3", "v4"].iter().enumerate() {
            let dir = root.join("releases").join(v);
            std::fs::create_dir_all(&dir).unwrap();
            // Oldest first: v1 is the oldest, v4 the newest.
            let t = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + i as u64);
            std::fs::File::open(&dir).unwrap().set_modified(t).unwrap();
        }
        std::fs::create_dir_all(root.join("run")).unwrap();
        std::fs::create_dir_all(root.join("log")).unwrap();
        for log in [
            "v2-3000.log",
            "v2-3001.log",
            "v2-rc-3100.log",
            "v4-5000.log",
        ] {
            std::fs::write(root.join("log").join(log), "a line\n").unwrap();
        }
        let mut old = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        pid_file(root, "v3-4000.pid", old.id());
        std::fs::write(root.join("run/v2-3000.pid"), "999999999 1\n").unwrap();
        std::fs::write(root.join("run/v4-5000.pid"), "1 1\n").unwrap();
        let h = host(root);
        let keep = Instance {
            host: "web1".into(),
            version: "v4".into(),
            address: "127.0.0.1:5000".parse().unwrap(),
            pid: 1,
        };
        let s = settle(
            &LocalTransport::new(),
            &h,
            &keep,
            &app(),
            2,
            &["v1".to_string()],
            &[],
        )
        .await
        .unwrap();
        // `sleep` dies on TERM; its zombie (our child) counts as gone.
        assert_eq!(
            s.stopped,
            vec![("v3-4000".to_string(), Stopped::Gracefully)]
        );
        let _ = old.wait();
        assert_eq!(
            s.pruned,
            vec!["v2".to_string()],
            "v1 is protected, v3 and v4 kept"
        );
        assert_eq!(
            std::fs::read_link(root.join("current")).unwrap(),
            Path::new("releases/v4")
        );
        // The pruned release's logs go with it; another release's whose name starts alike
        // (v2-rc) stay.
        let mut logs: Vec<String> = std::fs::read_dir(root.join("log"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        logs.sort();
        assert_eq!(logs, ["v2-rc-3100.log", "v4-5000.log"]);
        let mut left: Vec<String> = std::fs::read_dir(root.join("run"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["v4-5000.pid"],
            "only the kept instance's pid file stays"
        );
    }

    /// A review found `keep` pruning a release deployed again a moment ago (v2 here) while
    /// releases staged once and never served stayed: a release's age is now the latest of
    /// its staging and its last time live.
    #[tokio::test]
    async fn pruning_keeps_releases_that_were_live_recently() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let at = |secs: u64| std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
        for (i, v) in ["v1", "v2", "v3", "v4", "v5"].iter().enumerate() {
            let dir = root.join("releases").join(v);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::File::open(&dir)
                .unwrap()
                .set_modified(at(1_000_000 + i as u64))
                .unwrap();
        }
        // v2 was live again after every other release was staged.
        let mark = root.join("releases").join(".live-v2");
        std::fs::write(&mark, "").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&mark)
            .unwrap()
            .set_modified(at(2_000_000))
            .unwrap();
        let s = settle_keeping(root, "v5", 3).await;
        let mut pruned = s.pruned.clone();
        pruned.sort();
        assert_eq!(pruned, ["v1", "v3"], "v5 (live now), v2 and v4 kept");
        assert!(mark.exists());
        assert!(root.join("releases/.live-v5").exists(), "v5 is live now");
    }

    /// What a staging killed midway leaves (an upload, a `.partial` unpacking) used to stay
    /// for good: pruning skips both.
    #[tokio::test]
    async fn leftovers_of_an_interrupted_staging_go() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let rel = root.join("releases");
        std::fs::create_dir_all(rel.join("v4")).unwrap();
        std::fs::create_dir_all(rel.join("v9.partial/bin")).unwrap();
        std::fs::write(rel.join(".v9.tar.gz"), "half").unwrap();
        std::fs::write(rel.join(".v8.tar.gz.upload"), "half").unwrap();
        settle_keeping(root, "v4", 3).await;
        let mut left: Vec<String> = std::fs::read_dir(&rel)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".live-v4", "v4"]);
    }

    #[tokio::test]
    async fn a_missing_release_is_an_error_that_names_it() {
        let d = tempfile::tempdir().unwrap();
        let h = host(d.path());
        let keep = Instance {
            host: "web1".into(),
            version: "v9".into(),
            address: "127.0.0.1:5000".parse().unwrap(),
            pid: 1,
        };
        let e = settle(&LocalTransport::new(), &h, &keep, &app(), 3, &[], &[])
            .await
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("release v9 is not staged"),
            "{e:#}"
        );
    }
}
