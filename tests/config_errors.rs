//! Config errors reach the user with file, line and key, and exit code 2.

use std::path::Path;

fn run(dir: &Path, config: &str, args: &[&str]) -> (i32, String) {
    let path = dir.join("cutover.toml");
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .arg("-c")
        .arg(&path)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const GOOD: &str = r#"[app]
name = "shop"
start = "exec ./server"

[release]
path = "builds/{version}"

[[hosts]]
name = "web1"
address = "127.0.0.11"
root = "fleet/web1"

[balancer]
listen = "127.0.0.1:18080"
admin = "127.0.0.1:18081"
token = "0123456789abcdef"

[strategy]
kind = "rolling"
batch = 1
"#;

/// GOOD as a canary over two hosts: the strategy `[analysis]` belongs to.
fn canary() -> String {
    GOOD.replace(
        "[balancer]",
        "[[hosts]]\nname = \"web2\"\naddress = \"127.0.0.12\"\nroot = \"fleet/web2\"\n\n[balancer]",
    )
    .replace(
        "kind = \"rolling\"\nbatch = 1\n",
        "kind = \"canary\"\nsteps = [{ weight = 10, pause = \"1m\" }, { weight = 100 }]\n",
    )
}

fn error_for(config: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = run(dir.path(), config, &["plan", "--version", "v1"]);
    assert_eq!(code, 2, "a config error exits 2: {err}");
    let file = dir.path().join("cutover.toml");
    assert!(
        err.contains(&file.display().to_string()),
        "names the file: {err}"
    );
    err
}

#[test]
fn good_config_plans() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = run(dir.path(), GOOD, &["plan", "--version", "v1"]);
    assert_eq!(code, 0, "{err}");
    // Planned before the release is built: the plan says a deploy now would be refused.
    assert!(
        err.contains("note: a deploy now would be refused: --version v1: no such release"),
        "{err}"
    );
    std::fs::create_dir_all(dir.path().join("builds/v1")).unwrap();
    let (code, err) = run(dir.path(), GOOD, &["plan", "--version", "v1"]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("would be refused"), "{err}");
}

#[test]
fn missing_required_key() {
    let err = error_for(&GOOD.replace("start = \"exec ./server\"\n", ""));
    assert!(
        err.contains(":1:1: app.start: missing field `start`"),
        "{err}"
    );
}

#[test]
fn unknown_key() {
    let err = error_for(&GOOD.replace("batch = 1", "batch = 1\nbatches = 2"));
    assert!(
        err.contains(":21:1: strategy.batches: unknown field `batches`"),
        "{err}"
    );
}

#[test]
fn batch_over_a_hundred_percent() {
    let err = error_for(&GOOD.replace("batch = 1", "batch = \"120%\""));
    assert!(
        err.contains(":20:9: strategy.batch:") && err.contains("120%"),
        "{err}"
    );
}

#[test]
fn batch_zero() {
    let err = error_for(&GOOD.replace("batch = 1", "batch = 0"));
    assert!(
        err.contains(":20:9: strategy.batch:") && err.contains("at least 1"),
        "{err}"
    );
}

#[test]
fn bad_version_is_refused_as_data() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pwned");
    for v in [
        format!("v1;touch {}", marker.display()),
        format!("$(touch {})", marker.display()),
        format!("`touch {}`", marker.display()),
        "v1\ntouch x".to_string(),
    ] {
        let (code, err) = run(dir.path(), GOOD, &["plan", "--version", &v]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("not a valid name"), "{err}");
    }
    assert!(!marker.exists());
}

fn with_strategy(strategy: &str) -> String {
    GOOD.replace("kind = \"rolling\"\nbatch = 1\n", strategy)
}

#[test]
fn canary_weights_must_rise_and_end_at_100() {
    let err = error_for(&with_strategy(
        "kind = \"canary\"\nsteps = [{ weight = 50 }, { weight = 20 }, { weight = 100 }]\n",
    ));
    assert!(
        err.contains("strategy.steps") && err.contains("does not increase"),
        "{err}"
    );
    let err = error_for(&with_strategy(
        "kind = \"canary\"\nsteps = [{ weight = 10 }, { weight = 50 }]\n",
    ));
    assert!(
        err.contains("strategy.steps") && err.contains("not 100"),
        "{err}"
    );
    let err = error_for(&with_strategy("kind = \"canary\"\nsteps = []\n"));
    assert!(
        err.contains("strategy.steps") && err.contains("needs steps"),
        "{err}"
    );
    let err = error_for(&with_strategy(
        "kind = \"canary\"\nsteps = [{ weight = 100, pause = \"soon\" }]\n",
    ));
    assert!(err.contains("not a duration"), "{err}");
}

#[test]
fn canary_needs_stable_hosts_left() {
    // One host: a canary on it would leave no stable release.
    let two = GOOD.replace(
        "[balancer]",
        "[[hosts]]\nname = \"web2\"\naddress = \"127.0.0.12\"\nroot = \"fleet/web2\"\n\n[balancer]",
    );
    let err = error_for(&two.replace(
        "kind = \"rolling\"\nbatch = 1\n",
        "kind = \"canary\"\ncanary_hosts = 2\nsteps = [{ weight = 100 }]\n",
    ));
    assert!(err.contains("strategy.canary_hosts"), "{err}");
    // One host carries its canary beside the stable instance, but only one.
    let err = error_for(&GOOD.replace(
        "kind = \"rolling\"\nbatch = 1\n",
        "kind = \"canary\"\ncanary_hosts = 5\nsteps = [{ weight = 100 }]\n",
    ));
    assert!(err.contains("between 1 and 1 with 1 host(s)"), "{err}");
}

#[test]
fn blue_green_needs_room_for_green() {
    let err = error_for(&with_strategy("kind = \"blue-green\"\n").replace(
        "start = \"exec ./server\"",
        "start = \"exec ./server\"\nport = 8000",
    ));
    assert!(err.contains("app.port") && err.contains("no room"), "{err}");
    let err = error_for(&with_strategy(
        "kind = \"blue-green\"\npost_switch_analysis = \"10s\"\n",
    ));
    assert!(
        err.contains("post_switch_analysis") && err.contains("[analysis]"),
        "{err}"
    );
}

#[test]
fn analysis_that_checks_nothing_is_refused() {
    let err = error_for(&format!("{}\n[analysis]\ninterval = \"5s\"\n", canary()));
    assert!(err.contains("checks nothing"), "{err}");
}

#[test]
fn plan_shows_every_strategy() {
    let dir = tempfile::tempdir().unwrap();
    let two = GOOD.replace(
        "[balancer]",
        "[[hosts]]\nname = \"web2\"\naddress = \"127.0.0.12\"\nroot = \"fleet/web2\"\n\n[balancer]",
    );
    let canary = two.replace(
        "kind = \"rolling\"\nbatch = 1\n",
        "kind = \"canary\"\nsteps = [{ weight = 10, pause = \"1m\" }, { weight = 100 }]\n",
    ) + "\n[analysis]\nmin_success_rate = 99.0\n";
    let (code, _) = run(dir.path(), &canary, &["plan", "--version", "v2"]);
    assert_eq!(code, 0);
    let plan = |version: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
            .args([
                "-c",
                &dir.path().join("cutover.toml").display().to_string(),
                "plan",
                "--version",
                version,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Nothing deployed yet: a canary has nothing to compare with, and rolls out in batches.
    let text = plan("v2");
    assert!(
        text.contains("first deploy") && text.contains("v2 rolls out in batches"),
        "{text}"
    );
    assert!(!text.contains("step 1/2"), "{text}");
    // Once v1 is live, v2 is a canary; v1 again is rolled out in batches. A first deploy
    // that rolled back left nothing live: still a first deploy.
    let journal = cutover::journal::Journal::open(&dir.path().join(".cutover")).unwrap();
    let first = cutover::journal::DeploymentRow {
        id: "d0".into(),
        app: "shop".into(),
        kind: "deploy".into(),
        strategy: "canary".into(),
        from: None,
        to: "v0".into(),
        who: "tester".into(),
        started_ms: cutover::journal::now_ms() - 1000,
        ended_ms: None,
        outcome: None,
        previous: Default::default(),
        report: None,
        status: None,
        damaged: None,
    };
    journal.begin(&first).unwrap();
    journal
        .finish("d0", "rolled_back", &serde_json::json!({}))
        .unwrap();
    let text = plan("v2");
    assert!(text.contains("first deploy"), "{text}");
    journal
        .begin(&cutover::journal::DeploymentRow {
            id: "d1".into(),
            app: "shop".into(),
            kind: "deploy".into(),
            strategy: "canary".into(),
            from: None,
            to: "v1".into(),
            who: "tester".into(),
            started_ms: cutover::journal::now_ms(),
            ended_ms: None,
            outcome: None,
            previous: Default::default(),
            report: None,
            status: None,
            damaged: None,
        })
        .unwrap();
    journal
        .finish("d1", "succeeded", &serde_json::json!({}))
        .unwrap();
    drop(journal);
    let text = plan("v1");
    assert!(
        text.contains("v1 is already the live release") && !text.contains("step 1/2"),
        "{text}"
    );
    let text = plan("v2");
    assert!(
        text.contains("step 1/2: 10% of requests to the canary for 1m"),
        "{text}"
    );
    // A step that waits for `cutover promote` is analysed meanwhile, as the deploy does.
    assert!(
        text.contains("until `cutover promote`, analysis every") && text.contains("worst case"),
        "{text}"
    );
    // The analysis reads as the config is written, not as Rust's `Some(99.0)`.
    assert!(
        text.contains("min_success_rate 99%, max_p99_latency -, max_degradation -,"),
        "{text}"
    );
    let bg = two.replace("kind = \"rolling\"\nbatch = 1\n", "kind = \"blue-green\"\n");
    std::fs::write(dir.path().join("cutover.toml"), bg).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args([
            "-c",
            &dir.path().join("cutover.toml").display().to_string(),
            "plan",
            "--version",
            "v2",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("switch: one atomic admin call") && text.contains("scale_down_delay = 30s"),
        "{text}"
    );
}

#[test]
fn judge_through_haproxy_is_refused() {
    let haproxy = canary().replace(
        "[balancer]\nlisten = \"127.0.0.1:18080\"\nadmin = \"127.0.0.1:18081\"\ntoken = \"0123456789abcdef\"\n",
        "[balancer]\nkind = \"haproxy\"\nlisten = \"127.0.0.1:18080\"\nsocket = \"/run/haproxy/admin.sock\"\nbackend = \"app\"\n",
    );
    assert_ne!(haproxy, canary());
    let err = error_for(&format!(
        "{haproxy}\n[analysis]\nmin_success_rate = 99.0\n\n[analysis.judge]\n"
    ));
    assert!(
        err.contains("analysis.judge") && err.contains("HAProxy"),
        "{err}"
    );
}

#[test]
fn judge_tolerance_is_a_bounded_fraction_and_planned() {
    let judged = format!(
        "{}\n[analysis]\nmin_success_rate = 99.0\n\n[analysis.judge]\n",
        canary()
    );
    // 5 meant as 5% would tolerate a canary six times as slow: refused, as anything from 1 up.
    for bad in ["-0.1", "nan", "5"] {
        let err = error_for(&format!("{judged}allowed_increase = {bad}\n"));
        let line = judged.lines().count() + 1;
        assert!(
            err.contains(&format!(
                ":{line}:1: analysis.judge.allowed_increase: allowed_increase = "
            )) && err.contains("(0.1 = 10%)"),
            "{bad}: {err}"
        );
    }
    // The plan shows the tolerance as a percentage.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cutover.toml");
    for (written, shown) in [
        (
            "",
            "allowed_increase 0.1: fails on significant evidence of a canary more than 10% slower than stable)",
        ),
        (
            "allowed_increase = 0.5\n",
            "allowed_increase 0.5: fails on significant evidence of a canary more than 50% slower",
        ),
        (
            "allowed_increase = 0\n",
            "allowed_increase 0: fails on significant evidence of a canary slower than stable)",
        ),
    ] {
        std::fs::write(&path, format!("{judged}{written}")).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
            .arg("-c")
            .arg(&path)
            .args(["plan", "--version", "v1"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success()
                && text.contains(&format!("Mann-Whitney judge on latencies ({shown}")),
            "{written}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn bad_versions_name_the_flag_they_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = run(dir.path(), GOOD, &["rollback", "--to", "a;b"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--to: \"a;b\" is not a valid name"), "{err}");
    // `.partial` is the suffix of a release being unpacked: staging `v1` would remove a live
    // `v1.partial`.
    let (code, err) = run(dir.path(), GOOD, &["plan", "--version", "v1.partial"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--version") && err.contains(".partial"),
        "{err}"
    );
}

#[test]
fn init_writes_the_config_dash_c_names_and_it_loads() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["-c", "other.toml", "init", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let config = dir.path().join("other.toml");
    assert!(config.is_file(), "{out:?}");
    assert!(!dir.path().join("cutover.toml").exists());
    assert!(dir.path().join("releases/v2/run.sh").is_file());
    // The next steps name the config, so they work as typed.
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("`cutover -c {} proxy`", config.display())),
        "{said}"
    );
    // A release already there (the user's own build, say) is never written over unasked.
    std::fs::remove_file(&config).unwrap();
    std::fs::write(dir.path().join("releases/v1/run.sh"), "mine\n").unwrap();
    let again = |force: bool| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"));
        c.args(["-c", "other.toml", "init", "--dir"])
            .arg(dir.path());
        if force {
            c.arg("--force");
        }
        c.output().unwrap()
    };
    let refused = again(false);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("releases/v1 exists"),
        "{refused:?}"
    );
    let run_sh = dir.path().join("releases/v1/run.sh");
    assert_eq!(std::fs::read_to_string(&run_sh).unwrap(), "mine\n");
    assert!(again(true).status.success());
    assert_ne!(std::fs::read_to_string(&run_sh).unwrap(), "mine\n");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .arg("-c")
        .arg(&config)
        .args(["plan", "--version", "v2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn analysis_that_could_judge_nothing_is_refused() {
    // Only a comparison: at a canary's 100% step the stable release serves nothing.
    let err = error_for(&format!(
        "{}\n[analysis]\ninterval = \"5s\"\nmax_degradation = 1.0\n",
        canary()
    ));
    assert!(
        err.contains("analysis.max_degradation") && err.contains("add min_success_rate"),
        "{err}"
    );
    // A post-switch analysis shorter than one interval judges nothing.
    let two = GOOD.replace(
        "[balancer]",
        "[[hosts]]\nname = \"web2\"\naddress = \"127.0.0.12\"\nroot = \"fleet/web2\"\n\n[balancer]",
    );
    let bg = two.replace(
        "kind = \"rolling\"\nbatch = 1\n",
        "kind = \"blue-green\"\npost_switch_analysis = \"2s\"\n",
    ) + "\n[analysis]\ninterval = \"5s\"\nmin_success_rate = 99.0\n";
    let err = error_for(&bg);
    assert!(err.contains("not one interval would be judged"), "{err}");
}

#[test]
fn a_host_name_as_address_says_to_write_an_ip() {
    let err = error_for(&GOOD.replace("address = \"127.0.0.11\"", "address = \"localhost\""));
    assert!(err.contains(":10:11: hosts.address:"), "{err}");
    assert!(
        err.contains("\"localhost\" is not an IP address")
            && err.contains("`localhost` is 127.0.0.1"),
        "{err}"
    );
}

/// Review finding: `cutover plan` (and every command but serve) exited 0 with a `[serve]`
/// that `cutover serve` would refuse; it is a config error now, with file, line and key.
#[test]
fn a_serve_section_that_could_not_serve_fails_plan_but_not_other_commands() {
    let err = error_for(&format!("{GOOD}\n[serve]\ntoken = \"short\"\n"));
    assert!(
        err.contains(":23:1: serve.token: serve.token is too short: use at least 16 characters"),
        "{err}"
    );
    let err = error_for(&format!(
        "{GOOD}\n[serve]\ntoken_file = \"serve.token\"\n\n[serve.github]\nbranch = \"main\"\n"
    ));
    assert!(
        err.contains(":25:1: serve.github: serve.github.secret is not set"),
        "{err}"
    );
    // A placeholder [serve] must not stop a rollback during an incident: only plan and
    // serve refuse it.
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = run(
        dir.path(),
        &format!("{GOOD}\n[serve]\ntoken = \"short\"\n"),
        &["history"],
    );
    assert_eq!(code, 0, "{err}");
}

/// Settings a deploy would silently skip are refused, each at its own line.
#[test]
fn settings_the_strategy_never_uses_are_refused() {
    let line_of = |config: &str, needle: &str| {
        config
            .lines()
            .position(|l| l.contains(needle))
            .map(|i| i + 1)
            .unwrap()
    };
    // A verify point another strategy owns: rolling never reaches after_step.
    let verify = format!(
        "{GOOD}\n[[verify]]\ncommand = \"true\"\nat = [\"after_batch\"]\n\n[[verify]]\ncommand = \"exit 1\"\nat = [\"after_step\"]\n"
    );
    let err = error_for(&verify);
    let line = line_of(&verify, "after_step");
    assert!(
        err.contains(&format!(":{line}:"))
            && err.contains("after_step never runs in a rolling deploy"),
        "{err}"
    );
    // An empty verify command would pass every gate.
    let empty = format!("{GOOD}\n[[verify]]\ncommand = \" \"\nat = [\"after_batch\"]\n");
    assert!(error_for(&empty).contains("verify command is empty"));
    // [analysis] beside a rolling strategy judges nothing.
    let err = error_for(&format!("{GOOD}\n[analysis]\nmin_success_rate = 99.0\n"));
    assert!(err.contains("never run in this rolling deploy"), "{err}");
    // Canary keys beside another kind.
    let err = error_for(&GOOD.replace("batch = 1\n", "batch = 1\ncanary_hosts = 1\n"));
    assert!(
        err.contains("strategy.canary_hosts") && err.contains("belongs to kind = \"canary\""),
        "{err}"
    );
    // Review finding: keys with defaults were taken silently beside a kind that ignores them.
    let err = error_for(&GOOD.replace("batch = 1\n", "batch = 1\nscale_down_delay = \"5m\"\n"));
    assert!(
        err.contains("strategy.scale_down_delay")
            && err.contains("belongs to kind = \"blue-green\"; this deploy is rolling"),
        "{err}"
    );
    let err = error_for(&GOOD.replace(
        "kind = \"rolling\"\nbatch = 1\n",
        "kind = \"blue-green\"\nmax_fail_percentage = 50\n",
    ));
    assert!(
        err.contains("strategy.max_fail_percentage")
            && err.contains("belongs to kind = \"rolling\" and kind = \"canary\""),
        "{err}"
    );
    // A zero pause holds a step for no time.
    let err = error_for(&canary().replace("pause = \"1m\"", "pause = \"0s\""));
    assert!(err.contains("step 1: pause = \"0s\""), "{err}");
    // Blue-green needs the built-in balancer's preview route and atomic switch.
    let bg = GOOD
        .replace("kind = \"rolling\"\nbatch = 1\n", "kind = \"blue-green\"\n")
        .replace(
            "admin = \"127.0.0.1:18081\"\ntoken = \"0123456789abcdef\"\n",
            "kind = \"haproxy\"\nsocket = \"/run/haproxy/admin.sock\"\nbackend = \"app\"\n",
        );
    assert!(error_for(&bg).contains("HAProxy has neither"));
    // A blue-green switch has no per-host after_switch moment.
    let hook = GOOD.replace("kind = \"rolling\"\nbatch = 1\n", "kind = \"blue-green\"\n")
        + "\n[[hooks]]\nat = \"after_deploy\"\ncommand = \"true\"\n\n[[hooks]]\nat = \"after_switch\"\ncommand = \"true\"\n";
    let err = error_for(&hook);
    assert!(
        err.contains(&format!(":{}:", line_of(&hook, "after_switch")))
            && err.contains("use at = \"after_deploy\""),
        "{err}"
    );
}

/// Values that would make every deploy fail, or fail slowly as if the app were broken.
#[test]
fn values_no_deploy_could_use_are_refused() {
    let err = error_for(&format!("{GOOD}\n[app.health]\npath = \"/he alth\"\n"));
    assert!(
        err.contains("app.health.path") && err.contains("percent-encoded"),
        "{err}"
    );
    let err = error_for(&format!("{GOOD}\n[app.health]\ntimeout = \"0s\"\n"));
    assert!(
        err.contains("app.health.timeout must be longer than 0s"),
        "{err}"
    );
    let err = error_for(&format!("{GOOD}\n[app.health]\ninterval = \"1ms\"\n"));
    assert!(err.contains("at least 10ms"), "{err}");
    let in_place = GOOD.replace(
        "start = \"exec ./server\"",
        "start = \"exec ./server\"\nmode = \"in-place\"\nport = 0",
    );
    assert!(error_for(&in_place).contains("port = 0 is not a port"));
    // In place, two hosts on one address would fight over app.port: the second host's line.
    let shared = GOOD
        .replace("start = \"exec ./server\"", "start = \"exec ./server\"\nmode = \"in-place\"\nport = 8000")
        .replace(
            "[balancer]",
            "[[hosts]]\nname = \"web2\"\naddress = \"127.0.0.11\"\nroot = \"fleet/web2\"\n\n[balancer]",
        );
    let err = error_for(&shared);
    let line = shared
        .lines()
        .position(|l| l == "address = \"127.0.0.11\"")
        .unwrap()
        + 1;
    let second = shared
        .lines()
        .skip(line)
        .position(|l| l == "address = \"127.0.0.11\"")
        .unwrap()
        + line
        + 1;
    assert!(
        err.contains(&format!(":{second}:"))
            && err.contains("hosts web1 and web2 are on one address"),
        "{err}"
    );
    // An HAProxy backend name must not carry a second runtime-API command.
    let haproxy = GOOD.replace(
        "admin = \"127.0.0.1:18081\"\ntoken = \"0123456789abcdef\"\n",
        "kind = \"haproxy\"\nsocket = \"/run/haproxy/admin.sock\"\nbackend = \"app; set server app/x state maint\"\n",
    );
    let err = error_for(&haproxy);
    assert!(
        err.contains("balancer.backend") && err.contains("not an HAProxy backend name"),
        "{err}"
    );
}

/// An error about the second host points at the second host, not the first.
#[test]
fn a_host_error_points_at_its_own_host() {
    let config = GOOD.replace(
        "[balancer]",
        "[[hosts]]\nname = \"web2\"\naddress = \"127.0.0.12\"\nroot = \"fleet/web1\"\n\n[balancer]",
    );
    let err = error_for(&config);
    let lines: Vec<&str> = config.lines().collect();
    let line = lines
        .iter()
        .rposition(|l| *l == "root = \"fleet/web1\"")
        .unwrap()
        + 1;
    assert!(
        err.contains(&format!(":{line}:")) && err.contains("host web2 and another share the root"),
        "{err}"
    );
}

/// `plan`'s worst case counts the verify commands and hooks at their timeouts, and a git
/// release shows its URL.
#[test]
fn plan_counts_gates_and_names_a_git_source() {
    let dir = tempfile::tempdir().unwrap();
    let plain = |config: &str| {
        let (code, err) = run(dir.path(), config, &["plan", "--version", "v2"]);
        assert_eq!(code, 0, "{err}");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
            .arg("-c")
            .arg(dir.path().join("cutover.toml"))
            .args(["plan", "--version", "v2"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // One batch of 2m 40s, and unpacking the release on the hosts (up to 5m).
    let base = plain(GOOD);
    assert!(
        base.contains("worst case: 7m 40s (build, staging and hooks 5m + 1 batch(es) x 2m 40s;"),
        "the sum as its parts: {base}"
    );
    let capped = plain(&GOOD.replace("batch = 1\n", "batch = 1\nmax_failed_hosts = 0\n"));
    assert!(capped.contains(", max_failed_hosts = 0,"), "{capped}");
    let gated = plain(&format!(
        "{GOOD}\n[[verify]]\ncommand = \"true\"\ntimeout = \"1h\"\nat = [\"after_batch\"]\n\n[[hooks]]\nat = \"before_deploy\"\ncommand = \"./migrate\"\ntimeout = \"2h\"\nrun_once = true\n"
    ));
    assert!(gated.contains("worst case: 3h 7m 40s"), "{gated}");
    assert!(
        gated.contains("verify: `true` at after_batch (timeout 1h)"),
        "the points as the config names them: {gated}"
    );
    assert!(
        gated.contains("hooks: `./migrate` at before_deploy (once, on one host, timeout 2h)"),
        "{gated}"
    );
    // A git source adds its fetch, clone and checkout, and the build, each up to 5m.
    let git = plain(&GOOD.replace(
        "path = \"builds/{version}\"",
        "git = \"https://example.com/shop.git\"\nbuild = \"make\"",
    ));
    assert!(
        git.contains("source: https://example.com/shop.git at v2"),
        "{git}"
    );
    assert!(git.contains("build: `make` once on this machine"), "{git}");
    assert!(git.contains("worst case: 27m 40s"), "{git}");
}

/// The balancer's limits fail at load, at their line, not when the proxy starts; a config that
/// is no text file ends with an error, not a hang.
#[test]
fn balancer_limits_and_odd_files_are_refused_up_front() {
    let err = error_for(&GOOD.replace(
        "token = \"0123456789abcdef\"\n",
        "token = \"0123456789abcdef\"\nmax_header_bytes = 10\n",
    ));
    assert!(
        err.contains(":17:") && err.contains("max_header_bytes must be at least 8192"),
        "{err}"
    );
    let err = error_for(&GOOD.replace(
        "token = \"0123456789abcdef\"\n",
        "token = \"0123456789abcdef\"\nmax_connections = 0\n",
    ));
    assert!(err.contains("would refuse every request"), "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["-c", "/dev/zero", "history"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("larger than 4 MiB"),
        "{out:?}"
    );
}

/// A value of the wrong type says how to write it, not only which Rust type was expected.
#[test]
fn wrong_types_say_how_to_write_the_value() {
    let err = error_for(&format!(
        "{GOOD}\n[app.health]\nhealthy_threshold = \"2\"\n"
    ));
    assert!(err.contains("write the number without quotes"), "{err}");
    let err = error_for(&GOOD.replace("name = \"shop\"", "name = 5"));
    assert!(err.contains("put the value in quotes"), "{err}");
}

/// A version whose release exists nowhere is an input error before anything is recorded, not
/// a deployment that fails on every host and reports a rollback.
#[test]
fn an_unknown_release_is_refused_before_anything_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = run(dir.path(), GOOD, &["deploy", "--version", "v9"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--version v9: no such release")
            && err.contains("builds/v9 is not a directory"),
        "{err}"
    );
    let (code, err) = run(dir.path(), GOOD, &["rollback", "--to", "v9"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--to v9: no such release"), "{err}");
    assert!(
        !dir.path().join(".cutover").exists(),
        "nothing was recorded"
    );
}

/// A journal this user may not write is not a damaged one: the error says to fix the
/// permissions, not to move the file aside (which would lose an interrupted deployment's
/// record). Runs the command as `nobody` through `setpriv`, so only as root (as in CI).
#[test]
fn a_journal_this_user_cannot_write_is_not_called_damaged() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run a command as another user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join(".cutover");
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join("journal.db"), b"").unwrap();
    std::fs::write(dir.path().join("cutover.toml"), GOOD).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // A copy nobody can reach, wherever the build directory lies.
    let exe = dir.path().join("cutover");
    std::fs::copy(env!("CARGO_BIN_EXE_cutover"), &exe).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&exe)
        .arg("-c")
        .arg(dir.path().join("cutover.toml"))
        .arg("history")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot write the journal"), "{err}");
    assert!(err.contains("permissions"), "{err}");
    assert!(!err.contains("move it aside"), "{err}");
}

/// `plan` names a git source without the credentials its URL may carry (every other place
/// that shows the URL redacts them).
#[test]
fn plan_never_prints_the_credentials_of_a_git_url() {
    let dir = tempfile::tempdir().unwrap();
    let config = GOOD.replace(
        "path = \"builds/{version}\"",
        "git = \"https://alice:s3cret@github.com/acme/shop.git\"",
    );
    std::fs::write(dir.path().join("cutover.toml"), config).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .arg("-c")
        .arg(dir.path().join("cutover.toml"))
        .args(["plan", "--version", "v1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("github.com/acme/shop.git at v1"), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
}

/// Review finding: the blue-green plan always said green is verified through the preview
/// route, also with no `before_switch` verify command, when only health gates it.
#[test]
fn a_blue_green_plan_says_whether_green_is_verified() {
    let dir = tempfile::tempdir().unwrap();
    let bg = GOOD.replace("kind = \"rolling\"\nbatch = 1\n", "kind = \"blue-green\"\n");
    let plan = |config: &str| {
        let path = dir.path().join("cutover.toml");
        std::fs::write(&path, config).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
            .arg("-c")
            .arg(&path)
            .args(["plan", "--version", "v2"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = plan(&bg);
    assert!(
        out.contains("no before_switch [[verify]] commands: only health gates green"),
        "{out}"
    );
    let out = plan(&format!(
        "{bg}\n[[verify]]\ncommand = \"curl -fsS $CUTOVER_URL/health\"\nat = [\"before_switch\"]\n"
    ));
    assert!(
        out.contains("3. verify green: the before_switch [[verify]] commands"),
        "{out}"
    );
}
