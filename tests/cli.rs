//! The help and usage of the command line say what each verb takes.

fn cutover(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(args)
        .env_remove("CUTOVER_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Review finding: the usage was `cutover deploy [OPTIONS]`, with `--version` and `--resume`
/// both optional, and the error for neither asked for `--version` alone.
#[test]
fn deploy_says_it_takes_a_version_or_resume() {
    let usage = "cutover deploy [OPTIONS] <--version <VERSION>|--resume>";
    let (code, out, _) = cutover(&["deploy", "--help"]);
    assert_eq!(code, 0);
    assert!(out.contains(&format!("Usage: {usage}")), "{out}");
    let (code, _, err) = cutover(&["deploy"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(
            "the following required arguments were not provided:\n  <--version <VERSION>|--resume>"
        ),
        "{err}"
    );
    let (code, _, err) = cutover(&["deploy", "--version", "v1", "--resume"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("'--version <VERSION>' cannot be used with '--resume'"),
        "{err}"
    );
}

/// Review finding: `demo --help` and `sample-app --help` offered `-c, --config` (the global
/// flag), though neither reads a config. It is hidden there, and still accepted.
#[test]
fn verbs_that_read_no_config_do_not_offer_one() {
    for verb in ["demo", "sample-app"] {
        let (code, out, err) = cutover(&[verb, "--help"]);
        assert_eq!(code, 0, "{err}");
        assert!(!out.contains("--config"), "{verb}: {out}");
        let (code, _, err) = cutover(&[verb, "-c", "elsewhere.toml", "--help"]);
        assert_eq!(code, 0, "{verb} still takes -c: {err}");
    }
    for verb in ["init", "plan", "deploy", "status", "serve", "proxy"] {
        let (_, out, _) = cutover(&[verb, "--help"]);
        assert!(out.contains("-c, --config <CONFIG>"), "{verb}: {out}");
    }
    let (_, out, _) = cutover(&["--help"]);
    let verbs: Vec<&str> = out
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.strip_prefix("  ").filter(|l| !l.starts_with(' ')))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(verbs.first(), Some(&"init"), "{out}");
    let demo = verbs.iter().position(|v| *v == "demo");
    assert_eq!(demo, Some(1), "the verbs keep their order: {out}");
}

/// Review finding: `--json` was said to print "progress and the report as JSON lines"; the
/// progress goes to stderr and the report alone to stdout.
#[test]
fn json_help_says_which_stream_carries_what() {
    for verb in ["deploy", "rollback"] {
        let (_, out, _) = cutover(&[verb, "--help"]);
        let flag = out
            .split("--json")
            .nth(1)
            .unwrap_or_default()
            .split("-h, --help")
            .next()
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(
            flag,
            "JSON for CI: progress as JSON lines on stderr, then the report as one JSON object on stdout",
            "{verb}: {out}"
        );
    }
}
