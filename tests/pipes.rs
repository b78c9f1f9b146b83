//! Read-only commands end quietly when their reader goes away (`cutover logs web1 --all | head`).

use std::os::fd::FromRawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

/// Regression: `cutover logs web1 --all | head` panicked ("failed printing to stdout: Broken
/// pipe", exit 101).
#[test]
fn logs_into_a_closed_pipe_end_by_sigpipe_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let log = d.join("fleet/web1/log");
    std::fs::create_dir_all(&log).unwrap();
    std::fs::write(log.join("v1-20001.log"), "a log line\n".repeat(1000)).unwrap();
    let config = d.join("cutover.toml");
    std::fs::write(
        &config,
        "[app]\nname = \"shop\"\nstart = \"exec ./server\"\n\n[release]\npath = \"builds/{version}\"\n\n\
         [[hosts]]\nname = \"web1\"\naddress = \"127.0.100.1\"\nroot = \"fleet/web1\"\n\n\
         [balancer]\nlisten = \"127.0.0.1:1\"\nadmin = \"127.0.0.1:2\"\ntoken = \"0123456789abcdef\"\n",
    )
    .unwrap();
    // The reading end closes before cutover writes anything: its first line meets EPIPE.
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills both descriptors, each owned once below.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (reader, writer) = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_cutover"))
        .arg("-c")
        .arg(&config)
        .args(["logs", "web1", "--all"])
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?}: {stderr}",
        out.status
    );
}
