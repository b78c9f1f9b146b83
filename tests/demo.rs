//! `cutover demo` leaves nothing behind however it is stopped.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::live_instances_under;

/// Kills what the demo started under its workspace if a test fails before the demo cleans up.
struct Leftovers(Option<PathBuf>);

impl Drop for Leftovers {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            for (_, pid) in live_instances_under(dir) {
                // SAFETY: kill(2) on instances the demo under test started.
                unsafe {
                    libc::kill(-(pid as i32), libc::SIGKILL);
                    libc::kill(pid as i32, libc::SIGKILL);
                }
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The demo process, killed if a test fails while it runs (a no-op once it has been reaped).
struct Demo(std::process::Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Review finding: `timeout 3 cutover demo` (SIGTERM, as `timeout`, `kill` and a cancelled CI
/// job send) left four sample apps running and the workspace on disk; only Ctrl-C cleaned up.
#[test]
fn a_terminated_demo_stops_its_fleet_and_removes_its_workspace() {
    let mut demo = Demo(
        Command::new(common::exe())
            .args(["demo", "--rate", "5"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pid = demo.0.id() as i32;
    let mut leftovers = Leftovers(None);
    let mut lines = BufReader::new(demo.0.stderr.take().unwrap()).lines();
    let workspace = loop {
        let line = lines
            .next()
            .expect("the demo ended before naming its workspace")
            .unwrap();
        if let Some(w) = line.strip_prefix("demo: workspace: ") {
            break PathBuf::from(w.trim());
        }
    };
    leftovers.0 = Some(workspace.clone());
    // Keep reading its output in the background so it never blocks on a full pipe.
    let reader = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    let t = Instant::now();
    while live_instances_under(&workspace).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the demo started no instance within 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // SAFETY: kill(2) on the demo this test started.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let t = Instant::now();
    let status = loop {
        if let Some(s) = demo.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the demo did not end within 60 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let said = reader.join().unwrap().join("\n");
    assert!(
        !status.success(),
        "an interrupted demo must not exit 0:\n{said}"
    );
    assert!(said.contains("interrupted (SIGTERM)"), "{said}");
    assert_eq!(
        live_instances_under(&workspace),
        vec![],
        "instances outlived the demo:\n{said}"
    );
    assert!(
        !workspace.exists(),
        "the workspace {} outlived the demo:\n{said}",
        workspace.display()
    );
}
