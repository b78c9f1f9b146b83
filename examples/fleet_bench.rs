//! `bench/fleet`: how much a deploy costs beyond what the app itself needs.
//!
//! For each fleet (local transport: 4, 16, 64 hosts; SSH through a private sshd: 4, 16 hosts)
//! and each health interval (1 s, cutover's default, and 100 ms, where overhead shows most) it
//! deploys v1, then times `cutover deploy` v1 -> v2 -> v1 ... (`--runs`, median) with
//! `batch = "25%"` (4 batches) behind a real `cutover proxy`, and compares with the floor:
//! Σ over batches of (the app's start: the batch's instances launched at once by the app's
//! start command, `sh ./run.sh`, until each answers its first health check; measured here) +
//! health settle (`healthy_threshold - 1` intervals: the gate needs that many more passing checks after
//! the first). Everything else is overhead: the balancer's own check, journal, lock, reading
//! hosts, the scripts that start, stop and settle instances, process start. Overhead per host = (wall - floor) / hosts.
//!
//! Run it with `bench/fleet` (release build). Loopback only; everything it starts is stopped
//! at the end.
//!
//! A second table splits the overhead into a fixed part per deploy and a part per added host
//! (a least-squares line through the host counts measured in the same run).

#[path = "../tests/support/sshd.rs"]
mod sshd;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "bench-token-0123456789";
const THRESHOLD: u64 = 2;
const BATCHES: u64 = 4;

fn exe() -> PathBuf {
    let me = std::env::current_exe().expect("current exe");
    // target/<profile>/examples/fleet_bench -> target/<profile>/cutover
    let bin = me
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("cutover"))
        .expect("target dir");
    assert!(
        bin.is_file(),
        "{} is missing: build it first (bench/fleet does)",
        bin.display()
    );
    bin
}

fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET /health once; true on a 200.
fn healthy(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if n >= 12 && &buf[9..12] == b"200")
}

/// The app's own start for one batch: `n` instances launched at once the way the app's start
/// command launches them (`sh ./run.sh` in the release directory, which execs the sample app),
/// until every one answers /health. Median of 11. At `n` > 1 this includes what `n` starts cost
/// each other on this machine's cores, which the app pays in a deploy too.
fn app_start_time(release: &Path, n: usize) -> Duration {
    let mut samples = Vec::new();
    for _ in 0..11 {
        let addrs: Vec<SocketAddr> = (0..n)
            .map(|i| {
                let ip = format!("127.0.59.{}", 10 + i);
                format!("{ip}:{}", free_port(&ip)).parse().unwrap()
            })
            .collect();
        let t = Instant::now();
        let mut children: Vec<Child> = addrs
            .iter()
            .map(|addr| {
                Command::new("sh")
                    .arg("./run.sh")
                    .current_dir(release)
                    .env("PORT", addr.port().to_string())
                    .env("CUTOVER_ADDRESS", addr.ip().to_string())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut pending = addrs.clone();
        while !pending.is_empty() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "sample app did not start"
            );
            pending.retain(|a| !healthy(*a));
            if !pending.is_empty() {
                std::thread::sleep(Duration::from_micros(500));
            }
        }
        samples.push(t.elapsed());
        for c in &mut children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    samples.sort();
    samples[samples.len() / 2]
}

struct Fleet {
    dir: tempfile::TempDir,
    config: PathBuf,
    admin: SocketAddr,
    proxy: Child,
    ssh_config: Option<PathBuf>,
    _sshd: Option<sshd::Sshd>,
}

impl Fleet {
    fn start(exe: &Path, hosts: usize, ssh: bool, net: u8, interval_ms: u64) -> Fleet {
        let dir = tempfile::Builder::new()
            .prefix("cutover-bench-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        for v in ["v1", "v2"] {
            cutover::init::write_sample_release(&d.join("releases").join(v), exe, v, "").unwrap();
        }
        let addrs: Vec<String> = (0..hosts)
            .map(|i| format!("127.0.{net}.{}", 10 + i))
            .collect();
        let sshd = ssh.then(|| {
            let a: Vec<&str> = addrs.iter().map(String::as_str).collect();
            sshd::Sshd::start(&a)
        });
        let listen = format!("127.0.0.1:{}", free_port("127.0.0.1"));
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
            .parse()
            .unwrap();
        let mut text = format!(
            "transport = \"{t}\"\nforks = 64\n\n[app]\nname = \"bench\"\nstart = \"exec sh ./run.sh\"\nstop_timeout = \"5s\"\ndrain_timeout = \"5s\"\n\n\
             [app.health]\npath = \"/health\"\ninterval = \"{interval_ms}ms\"\ntimeout = \"1s\"\nhealthy_threshold = {THRESHOLD}\ndeadline = \"20s\"\n\n\
             [release]\npath = \"releases/{{version}}\"\nkeep = 3\n\n\
             [balancer]\nlisten = \"{listen}\"\nadmin = \"{admin}\"\ntoken = \"{TOKEN}\"\n\n\
             [strategy]\nkind = \"rolling\"\nbatch = \"25%\"\n",
            t = if ssh { "ssh" } else { "local" },
        );
        for (i, a) in addrs.iter().enumerate() {
            text.push_str(&format!(
                "\n[[hosts]]\nname = \"h{i}\"\naddress = \"{a}\"\nroot = \"{}\"\n",
                d.join("fleet").join(format!("h{i}")).display()
            ));
            if let Some(s) = &sshd {
                text.push_str(&format!("port = {}\nuser = \"root\"\n", s.port));
            }
        }
        let config = d.join("cutover.toml");
        std::fs::write(&config, text).unwrap();
        let log = std::fs::File::create(d.join("proxy.log")).unwrap();
        let proxy = Command::new(exe)
            .arg("-c")
            .arg(&config)
            .arg("proxy")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let t = Instant::now();
        while TcpStream::connect(admin).is_err() {
            assert!(t.elapsed() < Duration::from_secs(10), "proxy did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        Fleet {
            ssh_config: sshd.as_ref().map(|s| s.ssh_config.clone()),
            _sshd: sshd,
            dir,
            config,
            admin,
            proxy,
        }
    }

    /// Wall time of one `cutover deploy`.
    fn deploy(&self, exe: &Path, version: &str, trace: bool) -> Duration {
        let mut c = match std::env::var("FLEET_BENCH_WRAP") {
            Ok(w) if !w.is_empty() => {
                let mut parts = w.split_whitespace();
                let mut c = Command::new(parts.next().unwrap());
                c.args(parts).arg(exe);
                c
            }
            _ => Command::new(exe),
        };
        c.arg("-c")
            .arg(&self.config)
            .args(["deploy", "--version", version]);
        if trace {
            c.arg("--json");
        }
        c.stdin(Stdio::null());
        if let Some(f) = &self.ssh_config {
            c.env(cutover::transport::ssh::CONFIG_ENV, f);
        }
        let t = Instant::now();
        let out = c.output().unwrap();
        let wall = t.elapsed();
        assert!(
            out.status.success(),
            "deploy {version} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if trace {
            eprintln!("--- deploy {version}: {:.1} ms", wall.as_secs_f64() * 1e3);
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
            // Step timings from the journal, relative to the deployment's start.
            let db = self.dir.path().join(".cutover/journal.db");
            let q = "SELECT s.host, s.action, s.started_ms - d.started_ms, s.ended_ms - s.started_ms \
                     FROM steps s JOIN deployments d ON d.id = s.deployment \
                     WHERE d.id = (SELECT id FROM deployments ORDER BY started_ms DESC LIMIT 1) ORDER BY s.id";
            if let Ok(o) = Command::new("sqlite3").arg(&db).arg(q).output() {
                eprint!("{}", String::from_utf8_lossy(&o.stdout));
            }
        }
        wall
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.proxy.kill();
        let _ = self.proxy.wait();
        // Instances carry CUTOVER_INSTANCE=<pid file under our dir>: kill exactly those.
        let marker = format!("CUTOVER_INSTANCE={}", self.dir.path().display());
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
                continue;
            };
            if env
                .split(|b| *b == 0)
                .any(|v| v.starts_with(marker.as_bytes()))
            {
                // SAFETY: kill(2) on an instance this benchmark started.
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        let _ = self.admin;
    }
}

fn main() {
    let mut runs = 3usize;
    let mut only: Option<String> = None;
    let mut trace = false;
    let mut intervals = vec![1000u64, 100];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().and_then(|n| n.parse().ok()).unwrap_or(3).max(1),
            "--only" => only = args.next(),
            "--trace" => trace = true,
            "--interval" => {
                intervals = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .map(|ms| vec![ms])
                    .unwrap_or(intervals)
            }
            _ => {
                eprintln!(
                    "usage: bench/fleet [--runs N] [--only TRANSPORT:HOSTS] [--interval MS] [--trace]\n  --only local:16  run one case\n  --interval 100  one health interval (default: 1000 and 100)\n  --trace         print each timed deploy's progress (JSON lines, t in seconds)"
                );
                std::process::exit(2);
            }
        }
    }
    let exe = exe();
    let sample = tempfile::tempdir().unwrap();
    cutover::init::write_sample_release(sample.path(), &exe, "x", "").unwrap();
    println!(
        "| transport | hosts | health interval | deploy wall (median of {runs}) | app start per batch | floor | wall / floor | overhead per host | first deploy |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut starts: std::collections::BTreeMap<usize, Duration> = Default::default();
    let cases: [(&str, usize, bool); 5] = [
        ("local", 4, false),
        ("local", 16, false),
        ("local", 64, false),
        ("ssh", 4, true),
        ("ssh", 16, true),
    ];
    let mut net = 60u8;
    // (transport, interval, hosts, total overhead in ms) for the split below.
    let mut overheads: Vec<(&str, u64, usize, f64)> = Vec::new();
    for &interval_ms in &intervals {
        let settle = Duration::from_millis((THRESHOLD - 1) * interval_ms);
        for (name, hosts, ssh) in cases {
            if only
                .as_ref()
                .is_some_and(|o| *o != format!("{name}:{hosts}"))
            {
                continue;
            }
            let per_batch = hosts.div_ceil(BATCHES as usize);
            let start = *starts
                .entry(per_batch)
                .or_insert_with(|| app_start_time(sample.path(), per_batch));
            let floor = (start + settle) * BATCHES as u32;
            net += 1;
            let fleet = Fleet::start(&exe, hosts, ssh, net, interval_ms);
            let first = fleet.deploy(&exe, "v1", false);
            let mut walls: Vec<Duration> = (0..runs)
                .map(|r| fleet.deploy(&exe, if r % 2 == 0 { "v2" } else { "v1" }, trace))
                .collect();
            walls.sort();
            let wall = walls[walls.len() / 2];
            let total = wall.saturating_sub(floor).as_secs_f64() * 1e3;
            overheads.push((name, interval_ms, hosts, total));
            let over = total / hosts as f64;
            println!(
                "| {name} | {hosts} | {interval_ms} ms | {:.0} ms | {:.1} ms | {:.0} ms | {:.2}x | {over:.1} ms | {:.0} ms |",
                wall.as_secs_f64() * 1e3,
                start.as_secs_f64() * 1e3,
                floor.as_secs_f64() * 1e3,
                wall.as_secs_f64() / floor.as_secs_f64(),
                first.as_secs_f64() * 1e3,
            );
        }
    }
    print_split(&overheads);
}

/// The overhead split into what a deploy pays once and what each host adds: a least-squares
/// line through each transport's (hosts, overhead) at one interval. At 4 hosts the per-host
/// average above is mostly the fixed part (process start, journal, lock, the last host's
/// settle), which says little about a larger fleet.
fn print_split(overheads: &[(&str, u64, usize, f64)]) {
    let mut groups: std::collections::BTreeMap<(&str, u64), Vec<(f64, f64)>> = Default::default();
    for &(name, interval, hosts, total) in overheads {
        groups
            .entry((name, interval))
            .or_default()
            .push((hosts as f64, total));
    }
    groups.retain(|_, points| points.len() >= 2);
    if groups.is_empty() {
        return;
    }
    println!();
    println!("| transport | health interval | fixed per deploy | per added host | from hosts |");
    println!("|---|---:|---:|---:|---|");
    for ((name, interval), points) in groups {
        let n = points.len() as f64;
        let (mx, my) = (
            points.iter().map(|p| p.0).sum::<f64>() / n,
            points.iter().map(|p| p.1).sum::<f64>() / n,
        );
        let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
        let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
        let slope = sxy / sxx;
        let hosts: Vec<String> = points.iter().map(|p| format!("{}", p.0)).collect();
        println!(
            "| {name} | {interval} ms | {:.1} ms | {slope:.1} ms | {} |",
            my - slope * mx,
            hosts.join(", ")
        );
    }
}
