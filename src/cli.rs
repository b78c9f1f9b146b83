//! The command line: flags as parsed by clap, then one function per verb.
//!
//! Exit codes mean something: 0 deployed (or the command did what it says), 1 a deployment was
//! rolled back, halted or aborted, 2 an error (bad config, unreachable balancer, ...). Errors
//! print once, with their whole context chain.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::balancer::Balancer;
use crate::balancer::builtin::AdminClient;
use crate::config::{Config, Name};
use crate::deploy::{self, Deployer, Report, Request};
use crate::progress::Progress;
use crate::transport::Transport;
use crate::transport::local::LocalTransport;
use crate::{batch, fleet, history};

/// Zero-downtime deploys to a fleet of servers, with proof.
///
/// cutover moves every host of an app from one release to the next behind a load balancer:
/// the new instance starts beside the old one, passes its health checks, enters the balancer,
/// and only then is the old one drained and stopped. When a batch fails, every moved host goes
/// back. Every deploy reports how many requests were served and failed while it ran.
///
/// Start with `cutover demo` (no set-up), or `cutover init` to write an example cutover.toml.
#[derive(Parser, Debug)]
#[command(name = "cutover", version)]
pub struct Cli {
    /// Config file.
    #[arg(
        short = 'c',
        long = "config",
        global = true,
        default_value = "cutover.toml",
        env = "CUTOVER_CONFIG"
    )]
    pub config: PathBuf,
    /// Log more (repeat for debug logs).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Write a commented example cutover.toml (and a sample release) that works on this machine.
    Init(InitArgs),
    /// Run the whole story on a temporary local fleet: deploy v1, roll v2 under traffic, watch a
    /// broken v3 roll back by itself. Needs no set-up; leaves nothing behind.
    Demo(DemoArgs),
    /// Show what a deploy would do: batches, gates and the worst-case duration. Changes nothing.
    Plan(VersionArgs),
    /// Deploy a version to every host with the configured strategy.
    Deploy(DeployArgs),
    /// Per host: live release, instances, balancer state and counters.
    Status(JsonArgs),
    /// Past deployments.
    History(JsonArgs),
    /// Return the fleet to the previous release (or --to VERSION).
    Rollback(RollbackArgs),
    /// Run the built-in load balancer (traffic listener + admin API) from [balancer].
    Proxy,
    /// A small HTTP app for the demo and tests: GET / answers its version, GET /health answers 200.
    SampleApp(crate::sample_app::SampleAppArgs),
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Directory to write into.
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Overwrite an existing cutover.toml.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Keep the temporary workspace (printed at the end) instead of removing it.
    #[arg(long)]
    pub keep: bool,
    /// Requests per second of the steady traffic during each phase.
    #[arg(long, default_value_t = 150)]
    pub rate: u32,
}

#[derive(Args, Debug)]
pub struct VersionArgs {
    /// Version to deploy: the name of a release (letters, digits, . _ + -).
    #[arg(long)]
    pub version: String,
}

#[derive(Args, Debug)]
pub struct DeployArgs {
    /// Version to deploy: the name of a release (letters, digits, . _ + -).
    #[arg(long)]
    pub version: String,
    /// Print progress and the report as JSON lines (for CI).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct JsonArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RollbackArgs {
    /// Release to return to (default: the one before the live release, from the history).
    #[arg(long)]
    pub to: Option<String>,
    /// Print progress and the report as JSON lines (for CI).
    #[arg(long)]
    pub json: bool,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CUTOVER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Runs a command; the returned number is the exit code.
pub fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Init(args) => crate::init::run(&args.dir, args.force).map(|_| 0),
        Command::Demo(args) => runtime()?.block_on(crate::demo::run(crate::demo::DemoOptions {
            keep: args.keep,
            rate: args.rate,
        })),
        Command::SampleApp(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            rt.block_on(crate::sample_app::run(args)).map(|_| 0)
        }
        Command::Proxy => {
            let config = Config::load(&cli.config)?;
            runtime()?.block_on(run_proxy(config)).map(|_| 0)
        }
        Command::Plan(args) => {
            let config = Config::load(&cli.config)?;
            let version = parse_version(&args.version)?;
            print_plan(&config, &version);
            Ok(0)
        }
        Command::Deploy(args) => {
            let config = Config::load(&cli.config)?;
            let version = parse_version(&args.version)?;
            runtime()?.block_on(deploy_cmd(config, version, "deploy", args.json))
        }
        Command::Rollback(args) => {
            let config = Config::load(&cli.config)?;
            let target = match args.to {
                Some(v) => v,
                None => history::previous_release(&config.state_dir)?.ok_or_else(|| {
                    anyhow::anyhow!(
                        "no earlier release is recorded in {}: name one with `cutover rollback --to VERSION`",
                        config.state_dir.display()
                    )
                })?,
            };
            let version = parse_version(&target)?;
            runtime()?.block_on(deploy_cmd(config, version, "rollback", args.json))
        }
        Command::Status(args) => {
            let config = Config::load(&cli.config)?;
            runtime()?
                .block_on(status_cmd(config, args.json))
                .map(|_| 0)
        }
        Command::History(args) => {
            let config = Config::load(&cli.config)?;
            print_history(&config, args.json).map(|_| 0)
        }
    }
}

fn parse_version(v: &str) -> anyhow::Result<Name> {
    Name::parse(v).map_err(|e| anyhow::anyhow!("--version: {e}"))
}

/// The transport and balancer client a config asks for.
pub fn connect(config: &Config) -> anyhow::Result<(Arc<dyn Transport>, Arc<dyn Balancer>)> {
    let transport: Arc<dyn Transport> = match config.transport {
        crate::config::TransportKind::Local => Arc::new(LocalTransport),
        crate::config::TransportKind::Ssh => anyhow::bail!(
            "{}: transport = \"ssh\" is not supported yet",
            config.file.display()
        ),
    };
    let balancer: Arc<dyn Balancer> = Arc::new(AdminClient::new(
        config.admin_addr()?,
        config.admin_token()?,
    ));
    Ok((transport, balancer))
}

async fn run_proxy(config: Config) -> anyhow::Result<()> {
    let settings = crate::proxy::ProxySettings::from_config(&config)?;
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {},
        }
    };
    crate::proxy::serve(settings, shutdown).await
}

async fn deploy_cmd(
    config: Config,
    version: Name,
    kind: &'static str,
    json: bool,
) -> anyhow::Result<u8> {
    let _lock = history::lock(&config.state_dir, &format!("{kind} {version}"))?;
    let (transport, balancer) = connect(&config)?;
    let config = Arc::new(config);
    let deployer = Deployer {
        config: config.clone(),
        transport,
        balancer,
        progress: Progress::new(json),
    };
    let report = deployer.run(&Request { version, kind }).await?;
    if let Err(e) = history::record(&config.state_dir, &report) {
        eprintln!("warning: the deployment finished but could not be recorded: {e:#}");
    }
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(report.outcome.exit_code())
}

/// The human summary of a deployment.
pub fn print_report(r: &Report) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{} {} -> {}: {} in {:.1}s",
        r.kind,
        r.from.as_deref().unwrap_or("(nothing)"),
        r.to,
        r.outcome.label(),
        r.duration_ms as f64 / 1000.0
    );
    if !r.moved_hosts.is_empty() {
        let _ = writeln!(out, "  moved: {}", r.moved_hosts.join(", "));
    }
    for f in &r.failed_hosts {
        let _ = writeln!(
            out,
            "  failed host {}: {}",
            f.host,
            f.reason.replace('\n', "\n    ")
        );
    }
    for f in &r.stuck_hosts {
        let _ = writeln!(
            out,
            "  NOT ROLLED BACK {}: {}",
            f.host,
            f.reason.replace('\n', "\n    ")
        );
    }
    let by: Vec<String> = r
        .served_by_release
        .iter()
        .map(|(v, n)| format!("{v}: {n}"))
        .collect();
    let _ = writeln!(
        out,
        "  requests during the deploy: {} served, {} failed{}",
        r.served,
        r.failed_requests,
        if by.is_empty() {
            String::new()
        } else {
            format!(" ({})", by.join(", "))
        }
    );
}

fn print_plan(config: &Config, version: &Name) {
    let plan = batch::batches(&config.strategy.batch, &config.hosts);
    let h = &config.app.health;
    println!(
        "plan: rolling deploy of {} {} to {} host(s) in {} batch(es) (batch = {}, max_fail_percentage = {}%, on_failure = {:?})",
        config.app.name,
        version,
        config.hosts.len(),
        plan.len(),
        config.strategy.batch,
        config.strategy.max_fail_percentage.0,
        config.strategy.on_failure
    );
    println!("  source: {}", config.release_source(version).display());
    println!("  stage: copy the release to <root>/releases/{version}/ on every host, in parallel");
    for (i, b) in plan.iter().enumerate() {
        let names: Vec<&str> = b.iter().map(|h| h.name.as_str()).collect();
        println!("  batch {}/{}: {}", i + 1, plan.len(), names.join(", "));
    }
    println!("  per host, side by side:");
    println!(
        "    1. start {version} on a free port; gate: {} health checks in a row on {} (every {}, deadline {})",
        h.healthy_threshold.0, h.path, h.interval, h.deadline
    );
    println!("    2. add to the balancer; gate: the balancer's own health check");
    println!(
        "    3. drain the old backend (drain_timeout {}), remove it",
        config.app.drain_timeout
    );
    println!(
        "    4. stop the old instance (SIG{}, stop_timeout {}, then KILL); point `current` at {version}",
        config.app.stop_signal.name(),
        config.app.stop_timeout
    );
    let worst = deploy::worst_case_per_host(config) * plan.len() as u32;
    println!(
        "  worst case: {} ({} batch(es) x {} per host)",
        humantime::format_duration(worst),
        plan.len(),
        humantime::format_duration(deploy::worst_case_per_host(config))
    );
}

async fn status_cmd(config: Config, json: bool) -> anyhow::Result<()> {
    let (transport, balancer) = connect(&config)?;
    let views = fleet::observe(&config, &transport, &balancer).await?;
    if json {
        let hosts: Vec<serde_json::Value> = views
            .iter()
            .map(|v| {
                serde_json::json!({
                    "host": v.host.name.as_str(),
                    "address": v.host.address.to_string(),
                    "current": v.current,
                    "instances": v.instances.iter().map(|r| serde_json::json!({
                        "version": r.instance.version, "address": r.instance.address.to_string(),
                        "pid": r.instance.pid, "alive": r.alive,
                    })).collect::<Vec<_>>(),
                    "backends": v.backends,
                    "error": v.error,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "hosts": hosts }))?
        );
        return Ok(());
    }
    println!(
        "{:<12} {:<10} {:<22} {:<8} {:<10} {:<10} {:>9} {:>6}",
        "HOST", "CURRENT", "INSTANCE", "PID", "BALANCER", "HEALTH", "REQUESTS", "5XX"
    );
    for v in &views {
        if let Some(e) = &v.error {
            println!("{:<12} unreachable: {e}", v.host.name);
            continue;
        }
        let current = v.current.clone().unwrap_or_else(|| "-".into());
        if v.instances.is_empty() && v.backends.is_empty() {
            println!("{:<12} {:<10} (no instance)", v.host.name, current);
        }
        for r in &v.instances {
            let b = v
                .backends
                .iter()
                .find(|b| b.spec.id == r.instance.backend_id());
            println!(
                "{:<12} {:<10} {:<22} {:<8} {:<10} {:<10} {:>9} {:>6}",
                v.host.name,
                current,
                format!("{}@{}", r.instance.version, r.instance.address),
                if r.alive {
                    r.instance.pid.to_string()
                } else {
                    format!("{} dead", r.instance.pid)
                },
                b.map_or("absent".into(), |b| format!("{:?}", b.state).to_lowercase()),
                b.map_or("-".into(), |b| format!("{:?}", b.health).to_lowercase()),
                b.map_or(0, |b| b.counters.requests),
                b.map_or(0, |b| b.counters.status_5xx),
            );
        }
        for b in v.backends.iter().filter(|b| {
            !v.instances
                .iter()
                .any(|r| r.instance.backend_id() == b.spec.id)
        }) {
            println!(
                "{:<12} {:<10} {:<22} {:<8} {:<10} {:<10} {:>9} {:>6}",
                v.host.name,
                current,
                format!("{}@{}", b.spec.release, b.spec.address),
                "no pid",
                format!("{:?}", b.state).to_lowercase(),
                format!("{:?}", b.health).to_lowercase(),
                b.counters.requests,
                b.counters.status_5xx,
            );
        }
    }
    Ok(())
}

fn print_history(config: &Config, json: bool) -> anyhow::Result<()> {
    let records = history::load(&config.state_dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&records)?);
        return Ok(());
    }
    if records.is_empty() {
        println!("no deployments recorded in {}", config.state_dir.display());
        return Ok(());
    }
    println!(
        "{:<22} {:<9} {:<10} {:<10} {:<12} {:>8} {:>9} {:>7}",
        "ID", "KIND", "FROM", "TO", "OUTCOME", "SECONDS", "SERVED", "FAILED"
    );
    for r in records.iter().rev() {
        println!(
            "{:<22} {:<9} {:<10} {:<10} {:<12} {:>8.1} {:>9} {:>7}",
            r.id,
            r.kind,
            r.from.as_deref().unwrap_or("-"),
            r.to,
            r.outcome.label(),
            r.duration_ms as f64 / 1000.0,
            r.served,
            r.failed_requests
        );
    }
    Ok(())
}
