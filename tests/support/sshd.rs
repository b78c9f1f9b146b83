//! A private `sshd` for tests and benchmarks: listens on a few loopback addresses (each stands
//! for one server) on a port picked at run time, with a generated host key, a generated client
//! key in a temp `authorized_keys` and a temp known_hosts; killed on drop.
//!
//! Point the `ssh` client at it with `CUTOVER_SSH_CONFIG=<ssh_config>` (passed as `-F`).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Sshd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub addresses: Vec<String>,
    pub client_key: PathBuf,
    pub known_hosts: PathBuf,
    pub ssh_config: PathBuf,
    pub host_key_pub: String,
    child: Child,
}

fn keygen(path: &Path) {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "cutover-test", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .expect("ssh-keygen runs (apt-get install openssh-client)");
    assert!(st.success(), "ssh-keygen failed");
}

/// A port that is free on every address now.
fn common_free_port(addresses: &[String]) -> u16 {
    for _ in 0..50 {
        let l = TcpListener::bind((addresses[0].as_str(), 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        if addresses[1..]
            .iter()
            .all(|a| TcpListener::bind((a.as_str(), port)).is_ok())
        {
            return port;
        }
    }
    panic!("no port free on all of {addresses:?}");
}

impl Sshd {
    /// Starts sshd on `addresses` and waits until it listens on each.
    pub fn start(addresses: &[&str]) -> Sshd {
        let sshd = ["/usr/sbin/sshd", "/usr/bin/sshd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("sshd is installed (apt-get install openssh-server)");
        let dir = tempfile::Builder::new()
            .prefix("cutover-sshd-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        keygen(&d.join("host_key"));
        keygen(&d.join("client_key"));
        std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
        // sshd refuses to start without its privilege separation directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        let addresses: Vec<String> = addresses.iter().map(|s| s.to_string()).collect();
        let port = common_free_port(&addresses);
        let mut cfg = format!(
            "Port {port}\nHostKey {hk}\nAuthorizedKeysFile {ak}\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\n\
             PidFile {pid}\nMaxStartups 200\nMaxSessions 100\nLogLevel ERROR\n\
             # Debian's bash reads ~/.bashrc for commands run by sshd unless SHLVL is set: keep\n\
             # this machine's interactive setup out of every step's latency.\nSetEnv SHLVL=1\n",
            hk = d.join("host_key").display(),
            ak = d.join("authorized_keys").display(),
            pid = d.join("sshd.pid").display(),
        );
        for a in &addresses {
            cfg.push_str(&format!("ListenAddress {a}\n"));
        }
        std::fs::write(d.join("sshd_config"), cfg).unwrap();
        let host_key_pub = std::fs::read_to_string(d.join("host_key.pub"))
            .unwrap()
            .trim()
            .to_string();
        let known_hosts = d.join("known_hosts");
        let mut kh = String::new();
        for a in &addresses {
            kh.push_str(&format!("[{a}]:{port} {host_key_pub}\n"));
        }
        std::fs::write(&known_hosts, kh).unwrap();
        let client_key = d.join("client_key");
        let ssh_config = d.join("ssh_config");
        std::fs::write(
            &ssh_config,
            format!(
                "Host *\n  UserKnownHostsFile {kh}\n  GlobalKnownHostsFile /dev/null\n  IdentityFile {key}\n  IdentitiesOnly yes\n  User root\n  LogLevel ERROR\n",
                kh = known_hosts.display(),
                key = client_key.display()
            ),
        )
        .unwrap();
        // -e: log to stderr, where "Server listening on ..." tells us it is ready. LogLevel
        // ERROR in the file would hide that line, so raise it for startup on the command line.
        let mut child = Command::new(sshd)
            .args(["-D", "-e", "-o", "LogLevel=INFO", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sshd starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let log_path = d.join("sshd.log");
        std::thread::spawn(move || {
            let mut log = std::fs::File::create(log_path).ok();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(f) = log.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                let _ = tx.send(line);
            }
        });
        let mut waiting: Vec<String> = addresses.clone();
        let mut seen = Vec::new();
        while !waiting.is_empty() {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(line) => {
                    waiting.retain(|a| !line.contains(&format!("listening on {a} port {port}")));
                    seen.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("sshd did not come up; it said:\n{}", seen.join("\n"));
                }
            }
        }
        Sshd {
            dir,
            port,
            addresses,
            client_key,
            known_hosts,
            ssh_config,
            host_key_pub,
            child,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for Sshd {
    /// The listener, and first the connection processes it forked: they would otherwise keep
    /// the clients' master connections open until `ssh_persist` runs out (60 s), after the
    /// test has ended.
    fn drop(&mut self) {
        for pid in children_of(self.child.id()) {
            // SAFETY: kill(2) on a connection process our own sshd forked.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Processes whose parent is `parent` (from /proc).
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // "pid (comm) state ppid ...": comm may hold spaces, so split after it.
                    let (_, rest) = stat.rsplit_once(") ")?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}
