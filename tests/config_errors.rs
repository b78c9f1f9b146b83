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
