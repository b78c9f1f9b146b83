//! Hooks: commands the config runs at fixed points of a deploy (`[[hooks]]`), e.g. a schema
//! migration once before the first batch, a cache warm-up on each host before it takes traffic,
//! a chat message after the deploy.
//!
//! A hook runs either here (`where = "local"`, in the config's directory) or on hosts through
//! the transport (`where = "host"`, in the release directory: the new release once it is
//! staged, else `current`, else the host root). `run_once` runs it on the first host that can be
//! reached, exactly once, which is what a migration needs. Every hook gets `CUTOVER_VERSION`,
//! `CUTOVER_PREVIOUS_VERSION`, `CUTOVER_HOST` (the host it runs on; empty for a local hook at a
//! fleet-wide point), `CUTOVER_HOSTS`, `CUTOVER_HOOK` (the point) and `CUTOVER_RELEASE_DIR`.
//! A hook that fails or outlives its `timeout` fails the point, and the error names the hook,
//! the host, the exit code and the last lines it printed (stdout and stderr together).

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use futures_util::future::join_all;
use tokio::process::Command;
use tokio::sync::Semaphore;

use crate::config::{Config, Hook, HookPoint, HookWhere, Host, Name};
use crate::progress::Progress;
use crate::release::Layout;
use crate::transport::{Transport, Unreachable, last_lines, sh_quote};

/// Extra time a host hook gets over its own `timeout` before the transport gives up (the host
/// enforces the hook's timeout with `timeout(1)` when it has it).
const TRANSPORT_SLACK: Duration = Duration::from_secs(15);

/// What a hook needs to know about the deploy it runs in.
pub struct HookContext<'a> {
    pub config: &'a Config,
    pub transport: &'a dyn Transport,
    pub progress: &'a Progress,
    /// The release being deployed (for `on_rollback`: the release the fleet went back to).
    pub version: &'a Name,
    /// The release the fleet ran before (`None` on a first deploy).
    pub previous: Option<&'a str>,
    /// The hosts this point concerns: the fleet (or its reachable part) at fleet-wide points,
    /// the one host being switched at `before_switch` / `after_switch`.
    pub hosts: &'a [Host],
}

/// The point's name as written in the config.
pub fn point_name(point: HookPoint) -> &'static str {
    match point {
        HookPoint::BeforeDeploy => "before_deploy",
        HookPoint::AfterStage => "after_stage",
        HookPoint::BeforeSwitch => "before_switch",
        HookPoint::AfterSwitch => "after_switch",
        HookPoint::AfterDeploy => "after_deploy",
        HookPoint::OnRollback => "on_rollback",
    }
}

/// Runs every hook configured for `point`, in config order; the first failure stops and is
/// returned.
pub async fn run(point: HookPoint, ctx: &HookContext<'_>) -> anyhow::Result<()> {
    for hook in ctx.config.hooks.iter().filter(|h| h.at == point) {
        match hook.where_ {
            HookWhere::Local => run_local(point, hook, ctx).await?,
            HookWhere::Host if hook.run_once => run_once(point, hook, ctx).await?,
            HookWhere::Host => run_on_each(point, hook, ctx).await?,
        }
    }
    Ok(())
}

fn hosts_list(ctx: &HookContext<'_>) -> String {
    ctx.hosts
        .iter()
        .map(|h| h.name.as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The error of a hook that exited with `code` after running for `ran`.
fn failed(
    point: HookPoint,
    hook: &Hook,
    on: &str,
    code: i32,
    ran: std::time::Duration,
    output: &str,
) -> anyhow::Error {
    // `timeout(1)` exits 124 when it stopped the command, 137 when the command ignored the
    // stop and was killed 5 s later. A command can exit with those codes itself: only one that
    // ran as long as its timeout was stopped by it.
    let reached_timeout = ran >= *hook.timeout;
    let how = match code {
        124 if reached_timeout => format!("timed out after {}", hook.timeout),
        137 if reached_timeout => format!(
            "was killed (SIGKILL): it ignored the stop at its timeout of {} and was killed 5s later",
            hook.timeout
        ),
        137 => format!(
            "was killed (SIGKILL) after {}, before its timeout: something else killed it (out of memory?)",
            humantime::format_duration(std::time::Duration::from_millis(ran.as_millis() as u64))
        ),
        _ => format!("failed with exit code {code}"),
    };
    let tail = last_lines(output.trim_end(), 10);
    anyhow::anyhow!(
        "hook {} `{}` {on} {how}; last output lines:\n{}",
        point_name(point),
        hook.command,
        if tail.is_empty() { "(none)" } else { &tail }
    )
}

/// The file in a host's root naming the hook running there (`pid start-time`), while it runs.
pub const HOOK_LOCK: &str = ".cutover-hook";

/// The script that runs a host hook: cd, environment, the command with its timeout. Its output
/// goes to a file first, printed when it ends: a process the hook leaves in the background
/// keeps the file, not the session's pipe, so it cannot write into the replies to later steps.
/// Only the file's last [`crate::bounded::TAIL_BYTES`] come back (after a line saying how much
/// was left out): the error shows the last lines, and a hook printing gigabytes would
/// otherwise send them all through the session into cutover's memory.
fn host_script(point: HookPoint, hook: &Hook, ctx: &HookContext<'_>, host: &Host) -> String {
    let layout = Layout::of(host);
    let rel = layout.release(ctx.version.as_str());
    let q = |p: &std::path::Path| sh_quote(p.to_string_lossy());
    let secs = format!("{:.3}", hook.timeout.as_secs_f64());
    // The hook runs in the background so that its pid (and start time) can go into
    // `<root>/.cutover-hook` while it runs: a deployer stopped by Ctrl-C leaves a host hook
    // running (no signal reaches a remote process without a terminal), and the hook of a
    // resumed deploy waits for it (up to the hook's timeout) rather than run beside it, which
    // for a migration means twice at once. A file whose process is gone is stale.
    format!(
        "{alive}_co_l={lock}\n\
         _co_w=0\n\
         while [ -f \"$_co_l\" ] && alive \"$_co_l\"; do\n\
         \x20 if [ $_co_w -ge {wait} ]; then echo \"a hook of an interrupted deployment still runs on this host (pid $_pid, see $_co_l): let it finish or stop it, then deploy again\"; exit 125; fi\n\
         \x20 [ $_co_w -eq 0 ] && echo \"waiting for a hook of an interrupted deployment (pid $_pid) to end\" >&2\n\
         \x20 sleep 1; _co_w=$((_co_w+1))\n\
         done\n\
         cd {rel} 2>/dev/null || cd {cur} 2>/dev/null || cd {root} 2>/dev/null || cd /\n\
         CUTOVER_VERSION={v}; CUTOVER_PREVIOUS_VERSION={pv}; CUTOVER_HOST={h}; CUTOVER_HOSTS={hs}; CUTOVER_HOOK={p}; CUTOVER_RELEASE_DIR={rel}\n\
         export CUTOVER_VERSION CUTOVER_PREVIOUS_VERSION CUTOVER_HOST CUTOVER_HOSTS CUTOVER_HOOK CUTOVER_RELEASE_DIR\n\
         _co_out=$(mktemp \"${{TMPDIR:-/tmp}}/cutover-hook.XXXXXX\") || exit 125\n\
         if command -v timeout >/dev/null 2>&1; then timeout -k 5 {secs} sh -c {cmd} </dev/null >\"$_co_out\" 2>&1 &\n\
         else sh -c {cmd} </dev/null >\"$_co_out\" 2>&1 & fi\n\
         _co_p=$!; _co_st=\n\
         if read -r _co_s 2>/dev/null </proc/$_co_p/stat; then _co_s=${{_co_s##*\") \"}}; set -- $_co_s; _co_st=${{20}}; fi\n\
         [ -d {root} ] && echo \"$_co_p $_co_st\" >\"$_co_l\" 2>/dev/null\n\
         wait $_co_p; _co_rc=$?; _co_n=$(wc -c < \"$_co_out\")\n\
         if [ \"$_co_n\" -gt {tail} ]; then echo \"[$((_co_n - {tail})) bytes of earlier output not kept]\"; fi\n\
         tail -c {tail} \"$_co_out\"; rm -f \"$_co_out\" \"$_co_l\"; exit $_co_rc\n",
        alive = crate::instance::alive_fn(),
        lock = q(&layout.root.join(HOOK_LOCK)),
        // What a leftover hook may still take: its timeout and timeout(1)'s grace after it.
        wait = hook.timeout.as_secs() + 10,
        tail = crate::bounded::TAIL_BYTES,
        rel = q(&rel),
        cur = q(&layout.current()),
        root = q(&layout.root),
        v = sh_quote(ctx.version.as_str()),
        pv = sh_quote(ctx.previous.unwrap_or("")),
        h = sh_quote(host.name.as_str()),
        hs = sh_quote(hosts_list(ctx)),
        p = point_name(point),
        cmd = sh_quote(&hook.command),
    )
}

/// Runs a host hook on one host. `Err(Ok(e))`: the host could not be reached, nothing was
/// sent; `Err(Err(e))`: the hook failed, or may have run (a timeout or a connection lost
/// after the script was sent).
async fn on_host(
    point: HookPoint,
    hook: &Hook,
    ctx: &HookContext<'_>,
    host: &Host,
) -> Result<(), Result<anyhow::Error, anyhow::Error>> {
    let script = host_script(point, hook, ctx, host);
    let began = std::time::Instant::now();
    let out = ctx
        .transport
        // A leftover hook may hold it up to its own timeout (see `host_script`) first.
        .run(
            host,
            &script,
            *hook.timeout * 2 + Duration::from_secs(10) + TRANSPORT_SLACK,
        )
        .await
        .map_err(|e| {
            if Unreachable::is(&e) {
                Ok(e.context(format!(
                    "hook {} `{}` could not run on host {}",
                    point_name(point),
                    hook.command,
                    host.name
                )))
            } else {
                // Sent, then lost or out of time: it may have run, so a run_once hook is not
                // tried again elsewhere (a migration must not run twice).
                Err(e.context(format!(
                    "hook {} `{}` on host {} did not report back: it may have run there",
                    point_name(point),
                    hook.command,
                    host.name
                )))
            }
        })?;
    if !out.success() {
        let output = format!("{}{}", out.stdout, out.stderr);
        return Err(Err(failed(
            point,
            hook,
            &format!("on host {}", host.name),
            out.status,
            began.elapsed(),
            &output,
        )));
    }
    ctx.progress.say(&format!(
        "hook {} `{}` ran on {}",
        point_name(point),
        hook.command,
        host.name
    ));
    Ok(())
}

/// On the first host that can be reached; a host that cannot is skipped, a hook that fails or
/// may have run is not retried elsewhere.
async fn run_once(point: HookPoint, hook: &Hook, ctx: &HookContext<'_>) -> anyhow::Result<()> {
    let mut unreachable = Vec::new();
    for host in ctx.hosts {
        match on_host(point, hook, ctx, host).await {
            Ok(()) => return Ok(()),
            Err(Err(failed)) => return Err(failed),
            Err(Ok(e)) => {
                ctx.progress.say(&format!(
                    "hook {}: {} cannot be reached, trying the next host: {e:#}",
                    point_name(point),
                    host.name
                ));
                unreachable.push(format!("{e:#}"));
            }
        }
    }
    anyhow::bail!(
        "hook {} `{}` (run_once) found no reachable host:\n{}",
        point_name(point),
        hook.command,
        unreachable.join("\n")
    )
}

/// On every host, `forks` at a time; fails when any host fails, naming each.
async fn run_on_each(point: HookPoint, hook: &Hook, ctx: &HookContext<'_>) -> anyhow::Result<()> {
    let forks = Semaphore::new(ctx.config.forks.max(1));
    let results = join_all(ctx.hosts.iter().map(|host| {
        let forks = &forks;
        async move {
            let _permit = forks.acquire().await;
            on_host(point, hook, ctx, host).await
        }
    }))
    .await;
    let errors: Vec<String> = results
        .into_iter()
        .filter_map(|r| r.err())
        .map(|e| format!("{:#}", e.unwrap_or_else(|e| e)))
        .collect();
    match errors.len() {
        0 => Ok(()),
        1 => Err(anyhow::anyhow!(
            errors.into_iter().next().unwrap_or_default()
        )),
        n => anyhow::bail!(
            "hook {} failed on {n} hosts:\n{}",
            point_name(point),
            errors.join("\n")
        ),
    }
}

/// On this machine, in the config's directory.
async fn run_local(point: HookPoint, hook: &Hook, ctx: &HookContext<'_>) -> anyhow::Result<()> {
    let per_host = matches!(point, HookPoint::BeforeSwitch | HookPoint::AfterSwitch);
    let host = match ctx.hosts {
        [one] if per_host => one.name.as_str(),
        _ => "",
    };
    let release_dir = ctx
        .hosts
        .first()
        .filter(|_| per_host)
        .map(|h| Layout::of(h).release(ctx.version.as_str()))
        .unwrap_or_default();
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!("exec 2>&1\n{}", hook.command))
        .current_dir(&ctx.config.base_dir)
        .env("CUTOVER_VERSION", ctx.version.as_str())
        .env("CUTOVER_PREVIOUS_VERSION", ctx.previous.unwrap_or(""))
        .env("CUTOVER_HOST", host)
        .env("CUTOVER_HOSTS", hosts_list(ctx))
        .env("CUTOVER_HOOK", point_name(point))
        .env("CUTOVER_RELEASE_DIR", release_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let began = std::time::Instant::now();
    let out = crate::bounded::run(c, *hook.timeout)
        .await
        .with_context(|| {
            format!(
                "hook {} `{}`: cannot run sh",
                point_name(point),
                hook.command
            )
        })?;
    if out.timed_out() {
        return Err(failed(
            point,
            hook,
            "on this machine",
            124,
            (*hook.timeout).max(began.elapsed()),
            &String::from_utf8_lossy(&out.stdout),
        ));
    }
    if !out.success() {
        return Err(failed(
            point,
            hook,
            "on this machine",
            out.status.and_then(|s| s.code()).unwrap_or(-1),
            began.elapsed(),
            &String::from_utf8_lossy(&out.stdout),
        ));
    }
    ctx.progress.say(&format!(
        "hook {} `{}` ran on this machine",
        point_name(point),
        hook.command
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use async_trait::async_trait;

    use super::*;
    use crate::transport::Output;
    use crate::transport::local::LocalTransport;

    /// The local transport, except that hosts named in `down` cannot be reached, and that on
    /// hosts named in `lost` the script runs but its connection is lost before it reports.
    struct Flaky {
        down: Vec<&'static str>,
        lost: Vec<&'static str>,
    }

    #[async_trait]
    impl Transport for Flaky {
        async fn run(&self, host: &Host, script: &str, t: Duration) -> anyhow::Result<Output> {
            if self.down.contains(&host.name.as_str()) {
                return Err(Unreachable(format!("host {}: connection refused", host.name)).into());
            }
            let out = LocalTransport::new().run(host, script, t).await;
            if self.lost.contains(&host.name.as_str()) {
                anyhow::bail!("host {}: SSH failed: the connection closed", host.name);
            }
            out
        }
        async fn copy_dir(&self, _: &Host, _: &Path, _: &Path) -> anyhow::Result<()> {
            unreachable!()
        }
        async fn free_port(&self, _: &Host) -> anyhow::Result<u16> {
            unreachable!()
        }
    }

    fn config(dir: &Path, hooks: &str) -> Config {
        let text = format!(
            "[app]\nname = \"t\"\nstart = \"true\"\n[release]\npath = \"r\"\n\
             [[hosts]]\nname = \"web1\"\naddress = \"127.0.0.1\"\nroot = \"h1\"\n\
             [[hosts]]\nname = \"web2\"\naddress = \"127.0.0.1\"\nroot = \"h2\"\n\
             [[hosts]]\nname = \"web3\"\naddress = \"127.0.0.1\"\nroot = \"h3\"\n\
             [balancer]\nlisten = \"127.0.0.1:1\"\nadmin = \"127.0.0.1:2\"\ntoken = \"0123456789\"\n{hooks}"
        );
        Config::parse(&dir.join("cutover.toml"), &text).unwrap()
    }

    /// Review finding: a hook that itself exits 124 (or 137) was reported as "timed out after
    /// 10s" though it ran for a moment: those are also `timeout(1)`'s codes.
    #[tokio::test]
    async fn a_hook_exiting_124_at_once_did_not_time_out() {
        let d = tempfile::tempdir().unwrap();
        let v = Name::parse("v2").unwrap();
        let t = Flaky {
            down: vec![],
            lost: vec![],
        };
        let p = Progress::quiet();
        for (place, code, timeout, expected) in [
            ("host", 124, "10s", "failed with exit code 124"),
            ("local", 124, "10s", "failed with exit code 124"),
            (
                "host",
                137,
                "10s",
                "before its timeout: something else killed it",
            ),
            ("host", 0, "200ms", "timed out after 200ms"),
            ("local", 0, "200ms", "timed out after 200ms"),
        ] {
            let command = if code == 0 {
                "sleep 3".to_string()
            } else {
                format!("exit {code}")
            };
            let c = config(
                d.path(),
                &format!(
                    "[[hooks]]\nat = \"before_deploy\"\nwhere = \"{place}\"\n{once}timeout = \"{timeout}\"\ncommand = \"{command}\"\n",
                    once = if place == "host" {
                        "run_once = true\n"
                    } else {
                        ""
                    },
                ),
            );
            let ctx = HookContext {
                config: &c,
                transport: &t,
                progress: &p,
                version: &v,
                previous: Some("v1"),
                hosts: &c.hosts,
            };
            let e = format!(
                "{:#}",
                run(HookPoint::BeforeDeploy, &ctx).await.unwrap_err()
            );
            assert!(e.contains(expected), "{place} {command}: {e}");
        }
    }

    #[tokio::test]
    async fn run_once_runs_on_the_first_reachable_host_only() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("ran");
        let c = config(
            d.path(),
            &format!(
                "[[hooks]]\nat = \"after_stage\"\nrun_once = true\ncommand = \"echo $CUTOVER_HOST $CUTOVER_VERSION $CUTOVER_PREVIOUS_VERSION $CUTOVER_HOOK >> {}\"\n",
                log.display()
            ),
        );
        let v = Name::parse("v2").unwrap();
        let t = Flaky {
            down: vec!["web1"],
            lost: vec![],
        };
        let p = Progress::quiet();
        let ctx = HookContext {
            config: &c,
            transport: &t,
            progress: &p,
            version: &v,
            previous: Some("v1"),
            hosts: &c.hosts,
        };
        run(HookPoint::AfterStage, &ctx).await.unwrap();
        run(HookPoint::BeforeDeploy, &ctx).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "web2 v2 v1 after_stage\n"
        );
    }

    #[tokio::test]
    async fn run_once_is_not_tried_again_when_the_first_host_may_have_run_it() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("ran");
        let c = config(
            d.path(),
            &format!(
                "[[hooks]]\nat = \"after_stage\"\nrun_once = true\ncommand = \"echo $CUTOVER_HOST >> {}\"\n",
                log.display()
            ),
        );
        let v = Name::parse("v2").unwrap();
        let t = Flaky {
            down: vec![],
            lost: vec!["web1"],
        };
        let p = Progress::quiet();
        let ctx = HookContext {
            config: &c,
            transport: &t,
            progress: &p,
            version: &v,
            previous: Some("v1"),
            hosts: &c.hosts,
        };
        let e = format!("{:#}", run(HookPoint::AfterStage, &ctx).await.unwrap_err());
        assert!(
            e.contains("on host web1 did not report back: it may have run there"),
            "{e}"
        );
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "web1\n",
            "ran once, on web1 only"
        );
    }

    #[tokio::test]
    async fn failures_name_hook_host_code_and_output() {
        let d = tempfile::tempdir().unwrap();
        let c = config(
            d.path(),
            "[[hooks]]\nat = \"before_deploy\"\ncommand = \"echo migrating; echo 'no database' >&2; exit 3\"\n",
        );
        let v = Name::parse("v2").unwrap();
        let t = Flaky {
            down: vec![],
            lost: vec![],
        };
        let p = Progress::quiet();
        let ctx = HookContext {
            config: &c,
            transport: &t,
            progress: &p,
            version: &v,
            previous: None,
            hosts: &c.hosts[..1],
        };
        let e = format!(
            "{:#}",
            run(HookPoint::BeforeDeploy, &ctx).await.unwrap_err()
        );
        assert!(e.contains("hook before_deploy"), "{e}");
        assert!(e.contains("on host web1"), "{e}");
        assert!(e.contains("exit code 3"), "{e}");
        assert!(e.contains("migrating\nno database"), "{e}");
    }

    /// Regression: a host hook's whole output came back through the session (`cat`), however
    /// large, though only its last lines are shown.
    #[tokio::test]
    async fn a_host_hook_sends_back_only_the_tail_of_its_output() {
        let d = tempfile::tempdir().unwrap();
        let c = config(
            d.path(),
            "[[hooks]]\nat = \"before_deploy\"\ncommand = \"yes warming | head -n 500000; echo last\"\n",
        );
        let v = Name::parse("v2").unwrap();
        let t = LocalTransport::new();
        let p = Progress::quiet();
        let ctx = HookContext {
            config: &c,
            transport: &t,
            progress: &p,
            version: &v,
            previous: None,
            hosts: &c.hosts[..1],
        };
        let script = host_script(HookPoint::BeforeDeploy, &c.hooks[0], &ctx, &c.hosts[0]);
        let out = t
            .run(&c.hosts[0], &script, Duration::from_secs(30))
            .await
            .unwrap();
        assert!(out.success(), "{out:?}");
        let size = out.stdout.len();
        assert!(
            size <= crate::bounded::TAIL_BYTES + 64,
            "{size} bytes came back"
        );
        assert!(out.stdout.ends_with("warming\nlast\n"));
        let dropped = 500_000 * 8 + 5 - crate::bounded::TAIL_BYTES;
        assert!(
            out.stdout
                .starts_with(&format!("[{dropped} bytes of earlier output not kept]\n")),
            "{:.80}",
            out.stdout
        );
    }

    /// A review found a `run_once` migration run twice at once: Ctrl-C left the first running
    /// on the host, and `deploy --resume` started it again beside it. A host hook waits for a
    /// live one named in `<root>/.cutover-hook`; a stale file is passed over.
    #[tokio::test]
    async fn a_host_hook_waits_for_one_an_interrupted_deploy_left_running() {
        let d = tempfile::tempdir().unwrap();
        let c = config(
            d.path(),
            "[[hooks]]\nat = \"before_deploy\"\ncommand = \"cp .cutover-hook seen\"\n",
        );
        let host = &c.hosts[0];
        std::fs::create_dir_all(&host.root).unwrap();
        let lock = host.root.join(HOOK_LOCK);
        let v = Name::parse("v2").unwrap();
        let t = LocalTransport::new();
        let p = Progress::quiet();
        let ctx = HookContext {
            config: &c,
            transport: &t,
            progress: &p,
            version: &v,
            previous: None,
            hosts: &c.hosts[..1],
        };
        let script = host_script(HookPoint::BeforeDeploy, &c.hooks[0], &ctx, host);

        // A leftover hook, alive for 2 s more.
        let mut leftover = std::process::Command::new("sleep")
            .arg("2")
            .spawn()
            .unwrap();
        let start = crate::journal::process_start_ticks(leftover.id()).unwrap();
        std::fs::write(&lock, format!("{} {start}\n", leftover.id())).unwrap();
        let reaper = std::thread::spawn(move || leftover.wait());
        let began = std::time::Instant::now();
        let out = t.run(host, &script, Duration::from_secs(30)).await.unwrap();
        assert!(out.success(), "{out:?}");
        assert!(
            began.elapsed() >= Duration::from_millis(1500),
            "waited for the leftover: {:?}",
            began.elapsed()
        );
        let _ = reaper.join();
        // While it ran, the file named the hook itself; it is gone after.
        let seen = std::fs::read_to_string(host.root.join("seen")).unwrap();
        let pid: u32 = seen.split_whitespace().next().unwrap().parse().unwrap();
        assert_ne!(pid, 0, "{seen}");
        assert!(!lock.exists());

        // A file whose process is gone does not hold a hook up.
        std::fs::write(&lock, "999999999 1\n").unwrap();
        let began = std::time::Instant::now();
        let out = t.run(host, &script, Duration::from_secs(30)).await.unwrap();
        assert!(out.success(), "{out:?}");
        assert!(
            began.elapsed() < Duration::from_millis(900),
            "{:?}",
            began.elapsed()
        );
        assert!(!lock.exists());
    }

    #[tokio::test]
    async fn local_hooks_time_out() {
        let d = tempfile::tempdir().unwrap();
        let c = config(
            d.path(),
            "[[hooks]]\nat = \"after_deploy\"\nwhere = \"local\"\ntimeout = \"200ms\"\ncommand = \"echo started; sleep 30\"\n",
        );
        let v = Name::parse("v2").unwrap();
        let t = LocalTransport::new();
        let p = Progress::quiet();
        let ctx = HookContext {
            config: &c,
            transport: &t,
            progress: &p,
            version: &v,
            previous: None,
            hosts: &c.hosts,
        };
        let started = std::time::Instant::now();
        let e = format!("{:#}", run(HookPoint::AfterDeploy, &ctx).await.unwrap_err());
        assert!(e.contains("timed out"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
