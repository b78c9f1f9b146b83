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
use crate::journal::{Journal, LockHeld, LockHolder, Taken};
use crate::progress::Progress;
use crate::transport::Transport;
use crate::transport::local::LocalTransport;
use crate::{batch, fleet};

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
    /// Per host: live release, instances, balancer state and counters; the running or
    /// interrupted deployment; and drift the journal does not explain.
    Status(JsonArgs),
    /// Past deployments, newest first.
    History(JsonArgs),
    /// One deployment: its steps with timings, requests served/failed while it ran, outcome.
    Show(ShowArgs),
    /// Return the fleet to the previous release (or --to VERSION). After an interrupted
    /// deployment: return every host to the release it had before it.
    Rollback(RollbackArgs),
    /// Move a running canary to its next step (--full: skip the remaining steps), or end a
    /// blue-green switch-back window early.
    Promote(PromoteArgs),
    /// Stop a running canary or blue-green deployment and return traffic to the stable release.
    Abort,
    /// Hold a running canary at its current step, whatever its timer or analysis says.
    Pause,
    /// Let a paused canary go on.
    Resume,
    /// Recent log lines of a host's instances (`<root>/log/<version>-<port>.log`), live ones first.
    Logs(LogsArgs),
    /// Show who holds the deploy lock.
    Lock,
    /// Release the deploy lock. Only with --force, which is recorded in the journal.
    Unlock(UnlockArgs),
    /// Run the built-in load balancer (traffic listener + admin API) from [balancer].
    Proxy(ProxyArgs),
    /// A small HTTP app for the demo and tests: GET / answers its version, GET /health answers 200.
    SampleApp(crate::sample_app::SampleAppArgs),
    /// Push-button deployment: a dashboard, a JSON API and GitHub push webhooks on [serve]
    /// listen; deployments run one at a time from a queue. See docs/serve.md.
    Serve,
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
    #[arg(long, required_unless_present = "resume")]
    pub version: Option<String>,
    /// Continue the interrupted deployment recorded in the journal.
    #[arg(long, conflicts_with = "version")]
    pub resume: bool,
    /// Wait up to this long for another deployment's lock (e.g. "5m").
    #[arg(long, value_parser = humantime::parse_duration)]
    pub lock_wait: Option<std::time::Duration>,
    /// Print progress and the report as JSON lines (for CI).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    /// Deployment id (from `cutover history`); default: the newest.
    pub id: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Print the path of the deployment's HTML report (written now if it is missing).
    #[arg(long, conflicts_with = "json")]
    pub html: bool,
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    /// Host name from the config.
    pub host: String,
    /// Lines per instance.
    #[arg(short = 'n', long, default_value_t = 50)]
    pub lines: usize,
    /// Also show instances that are no longer running.
    #[arg(long)]
    pub all: bool,
}

#[derive(Args, Debug)]
pub struct PromoteArgs {
    /// Skip the remaining canary steps and roll out to every host now.
    #[arg(long)]
    pub full: bool,
}

#[derive(Args, Debug)]
pub struct UnlockArgs {
    /// Remove the lock even though its holder may still be running.
    #[arg(long)]
    pub force: bool,
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
    /// Wait up to this long for another deployment's lock (e.g. "5m").
    #[arg(long, value_parser = humantime::parse_duration)]
    pub lock_wait: Option<std::time::Duration>,
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
    if matches!(
        cli.command,
        Command::Plan(_)
            | Command::Status(_)
            | Command::History(_)
            | Command::Show(_)
            | Command::Lock
    ) {
        // Read-only commands end quietly when their reader goes away (`cutover history | head`),
        // like other command-line tools, instead of failing on a broken pipe.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match cli.command {
        Command::Init(args) => crate::init::run(&args.dir, args.force).map(|_| 0),
        Command::Demo(args) => runtime()?.block_on(crate::demo::run(crate::demo::DemoOptions {
            keep: args.keep,
            rate: args.rate,
        })),
        Command::Serve => {
            let config = Config::load(&cli.config)?;
            runtime()?.block_on(crate::server::run(config)).map(|_| 0)
        }
        Command::SampleApp(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            rt.block_on(crate::sample_app::run(args)).map(|_| 0)
        }
        Command::Proxy(args) => {
            let config = Config::load(&cli.config)?;
            // One thread: the current-thread scheduler, without the work-stealing overhead.
            let mut rt = match args.threads {
                Some(1) => tokio::runtime::Builder::new_current_thread(),
                Some(n) => {
                    let mut b = tokio::runtime::Builder::new_multi_thread();
                    b.worker_threads(n.max(1));
                    b
                }
                None => tokio::runtime::Builder::new_multi_thread(),
            };
            let rt = rt
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            rt.block_on(run_proxy(config, args)).map(|_| 0)
        }
        Command::Plan(args) => {
            let config = Config::load(&cli.config)?;
            let version = parse_version(&args.version)?;
            print_plan(&config, &version);
            Ok(0)
        }
        Command::Deploy(args) => {
            let config = Config::load(&cli.config)?;
            let version = args.version.as_deref().map(parse_version).transpose()?;
            let what = match &version {
                Some(v) => Action::Deploy(v.clone()),
                None => Action::Resume,
            };
            runtime()?.block_on(deploy_cmd(config, what, args.lock_wait, args.json))
        }
        Command::Rollback(args) => {
            let config = Config::load(&cli.config)?;
            if args.to.is_none() {
                if let Some(row) = running_deployment(&config)?.filter(|r| r.strategy != "rolling")
                {
                    // A blue-green in its switch-back window (or a canary): the running deployer
                    // switches back itself, within milliseconds.
                    return wait_for_command(&config, &row, "rollback");
                }
            }
            let to = args.to.as_deref().map(parse_version).transpose()?;
            runtime()?.block_on(deploy_cmd(
                config,
                Action::Rollback(to),
                args.lock_wait,
                args.json,
            ))
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
        Command::Show(args) => {
            let config = Config::load(&cli.config)?;
            if args.html {
                return crate::report::show_html(&config, args.id.as_deref()).map(|_| 0);
            }
            show_cmd(&config, args.id.as_deref(), args.json).map(|_| 0)
        }
        Command::Promote(args) => {
            let config = Config::load(&cli.config)?;
            control(&config, if args.full { "promote-full" } else { "promote" })
        }
        Command::Abort => control(&Config::load(&cli.config)?, "abort"),
        Command::Pause => control(&Config::load(&cli.config)?, "pause"),
        Command::Resume => control(&Config::load(&cli.config)?, "resume"),
        Command::Logs(args) => {
            let config = Config::load(&cli.config)?;
            runtime()?.block_on(logs_cmd(config, args)).map(|_| 0)
        }
        Command::Lock => {
            let config = Config::load(&cli.config)?;
            let journal = Journal::open(&config.state_dir)?;
            match journal.lock_holder(config.app.name.as_str())? {
                Some(h) => println!("locked: {}", h.describe()),
                None => println!("unlocked"),
            }
            Ok(0)
        }
        Command::Unlock(args) => {
            let config = Config::load(&cli.config)?;
            let journal = Journal::open(&config.state_dir)?;
            if !args.force {
                anyhow::bail!(
                    "the lock is released by the deploy that holds it; a stale one is taken over automatically. To remove it anyway, run `cutover unlock --force` (recorded in the journal)"
                );
            }
            match journal
                .force_unlock(config.app.name.as_str(), &LockHolder::me("unlock --force"))?
            {
                Some(h) => println!("removed the lock held by {}", h.describe()),
                None => println!("the lock was free"),
            }
            Ok(0)
        }
    }
}

fn parse_version(v: &str) -> anyhow::Result<Name> {
    Name::parse(v).map_err(|e| anyhow::anyhow!("--version: {e}"))
}

/// The transport and balancer client a config asks for.
pub fn connect(config: &Config) -> anyhow::Result<(Arc<dyn Transport>, Arc<dyn Balancer>)> {
    let transport: Arc<dyn Transport> = match config.transport {
        crate::config::TransportKind::Local => Arc::new(LocalTransport::new()),
        crate::config::TransportKind::Ssh => Arc::new(crate::transport::ssh::SshTransport::new(
            config.ssh.clone(),
            config.forks,
        )?),
    };
    let balancer: Arc<dyn Balancer> = match config.balancer.kind {
        crate::config::BalancerKind::Builtin => Arc::new(AdminClient::new(
            config.admin_addr()?,
            config.admin_token()?,
        )),
        crate::config::BalancerKind::Haproxy => {
            let settings = crate::balancer::haproxy::HaproxySettings::from_config(config)?;
            Arc::new(
                crate::balancer::haproxy::HaproxyBalancer::connect(settings).with_context(
                    || format!("{}: [balancer] kind = \"haproxy\"", config.file.display()),
                )?,
            )
        }
    };
    Ok((transport, balancer))
}

/// `cutover proxy` flags.
#[derive(Args, Debug)]
pub struct ProxyArgs {
    /// Replace the proxy running with the same state directory without dropping a request:
    /// take over its listening sockets; it stops accepting, drains and exits.
    #[arg(long)]
    pub takeover: bool,
    /// Worker threads (default: one per CPU core; 1 runs everything on this thread).
    #[arg(long)]
    pub threads: Option<usize>,
}

async fn run_proxy(config: Config, args: ProxyArgs) -> anyhow::Result<()> {
    let settings = crate::proxy::ProxySettings::from_config(&config)?;
    let mut options = crate::proxy::ProxyOptions::from_config(&config)?;
    options.takeover = args.takeover;
    let handle = crate::proxy::start_with(settings, options).await?;
    // Not println!: it panics when stdout is closed.
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "cutover proxy: listening on {}, admin API on {}",
        handle.listen, handle.admin
    );
    let _ = out.flush();
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {},
        }
    };
    tokio::select! {
        _ = shutdown => {},
        _ = handle.stopped() => {},
    }
    handle.shutdown().await;
    Ok(())
}

async fn logs_cmd(config: Config, args: LogsArgs) -> anyhow::Result<()> {
    let host = config.host(&args.host).cloned().ok_or_else(|| {
        let names: Vec<&str> = config.hosts.iter().map(|h| h.name.as_str()).collect();
        anyhow::anyhow!(
            "no host {:?} in {}: hosts are {}",
            args.host,
            config.file.display(),
            names.join(", ")
        )
    })?;
    let (transport, _) = connect(&config)?;
    let mut instances = crate::instance::list(transport.as_ref(), &host).await?;
    instances.sort_by_key(|r| !r.alive);
    if instances.is_empty() {
        println!(
            "{}: no instance recorded in {}",
            host.name,
            crate::release::Layout::of(&host).run_dir().display()
        );
    }
    for r in instances.iter().filter(|r| r.alive || args.all) {
        let i = &r.instance;
        println!(
            "==> {} {} on {} (pid {}, {}) <==",
            host.name,
            i.version,
            i.address,
            i.pid,
            if r.alive { "running" } else { "stopped" }
        );
        println!(
            "{}",
            crate::instance::log_tail(transport.as_ref(), &host, &i.version, i.port(), args.lines)
                .await
        );
    }
    Ok(())
}

/// The deployment that is running right now (its lock holder alive), if any.
fn running_deployment(config: &Config) -> anyhow::Result<Option<crate::journal::DeploymentRow>> {
    let journal = Journal::open(&config.state_dir)?;
    let Some(row) = journal.unfinished()? else {
        return Ok(None);
    };
    let running = journal
        .lock_holder(config.app.name.as_str())?
        .is_some_and(|h| crate::journal::process_alive(h.pid));
    Ok(running.then_some(row))
}

/// Sends a command to the running deployment.
fn control(config: &Config, command: &str) -> anyhow::Result<u8> {
    let row = running_deployment(config)?.ok_or_else(|| {
        anyhow::anyhow!("no deployment is running (see `cutover status`): `{command}` applies to a running canary or blue-green deployment")
    })?;
    if row.strategy == "rolling" {
        anyhow::bail!(
            "deployment {} is a rolling deploy: it takes no `{command}` (its batches gate themselves); stop it with Ctrl-C, then `cutover deploy --resume` or `cutover rollback`",
            row.id
        );
    }
    let journal = Journal::open(&config.state_dir)?;
    journal.post_command(&row.id, command)?;
    println!(
        "sent {command} to deployment {} ({} -> {})",
        row.id,
        row.from.as_deref().unwrap_or("-"),
        row.to
    );
    Ok(0)
}

/// Sends a command and waits until the deployment has ended; prints its outcome.
fn wait_for_command(
    config: &Config,
    row: &crate::journal::DeploymentRow,
    command: &str,
) -> anyhow::Result<u8> {
    let journal = Journal::open(&config.state_dir)?;
    journal.post_command(&row.id, command)?;
    eprintln!(
        "sent {command} to the running deployment {}; waiting for it to end",
        row.id
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        if let Some(d) = journal.deployment(&row.id)? {
            if let Some(outcome) = d.outcome {
                println!("deployment {}: {outcome}", row.id);
                if let Some(notes) = d
                    .report
                    .as_ref()
                    .and_then(|r| r.get("notes"))
                    .and_then(|n| n.as_array())
                {
                    for n in notes.iter().filter_map(|n| n.as_str()) {
                        println!("  {n}");
                    }
                }
                return Ok(if outcome == "rolled_back" { 0 } else { 1 });
            }
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "deployment {} did not end within 10 minutes",
            row.id
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// What `deploy_cmd` is asked to do.
enum Action {
    Deploy(Name),
    Resume,
    Rollback(Option<Name>),
}

/// Holds the deploy lock and renews its lease until dropped.
pub(crate) struct LockGuard {
    journal: Arc<Journal>,
    app: String,
    me: LockHolder,
    renew: tokio::task::JoinHandle<()>,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.renew.abort();
        let _ = self.journal.unlock(&self.app, &self.me);
    }
}

/// Takes the deploy lock, waiting up to `wait` for another holder.
pub(crate) async fn take_lock(
    journal: &Arc<Journal>,
    config: &Config,
    what: &str,
    wait: Option<std::time::Duration>,
) -> anyhow::Result<LockGuard> {
    let app = config.app.name.to_string();
    let me = LockHolder::me(what);
    let deadline = std::time::Instant::now() + wait.unwrap_or_default();
    let mut told = false;
    loop {
        match journal.lock(&app, &me, config.lock_lease) {
            Ok(taken) => {
                if let Taken::TookOver(h, why) = taken {
                    eprintln!("took over a stale deploy lock ({why}): {}", h.describe());
                }
                break;
            }
            Err(e) => {
                let Some(held) = e.downcast_ref::<LockHeld>() else {
                    return Err(e);
                };
                if std::time::Instant::now() >= deadline {
                    let hint = if wait.is_some() {
                        "it was still held when --lock-wait ran out"
                    } else {
                        "wait for it to finish, pass --lock-wait 10m to wait, or `cutover unlock --force` if you are sure it is gone"
                    };
                    anyhow::bail!(
                        "another deployment holds the lock: {}: {hint}",
                        held.holder.describe()
                    );
                }
                if !told {
                    eprintln!("waiting for the deploy lock: {}", held.holder.describe());
                    told = true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
        }
    }
    let renew = {
        let journal = journal.clone();
        let (app, me, lease) = (app.clone(), me.clone(), config.lock_lease);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(lease / 3).await;
                let _ = journal.renew(&app, &me, lease);
            }
        })
    };
    Ok(LockGuard {
        journal: journal.clone(),
        app,
        me,
        renew,
    })
}

/// The deployer for a config, with a balancer client that waits out balancer restarts.
pub fn deployer(
    config: Arc<Config>,
    journal: Arc<Journal>,
    progress: Progress,
) -> anyhow::Result<Deployer> {
    let (transport, balancer) = connect(&config)?;
    let balancer: Arc<dyn Balancer> = Arc::new(crate::balancer::patient::Patient::new(
        balancer,
        *config.balancer.unreachable_timeout,
        progress.clone(),
    ));
    Ok(Deployer::new(
        config, transport, balancer, journal, progress,
    ))
}

async fn deploy_cmd(
    config: Config,
    action: Action,
    lock_wait: Option<std::time::Duration>,
    json: bool,
) -> anyhow::Result<u8> {
    let journal = Arc::new(Journal::open(&config.state_dir)?);
    let what = match &action {
        Action::Deploy(v) => format!("deploy {v}"),
        Action::Resume => "deploy --resume".to_string(),
        Action::Rollback(Some(v)) => format!("rollback to {v}"),
        Action::Rollback(None) => "rollback".to_string(),
    };
    let config = Arc::new(config);
    let deployer = deployer(config.clone(), journal.clone(), Progress::new(json))?;
    deployer.warm();
    let _lock = take_lock(&journal, &config, &what, lock_wait).await?;
    // We hold the lock, so an unfinished deployment in the journal is not running: it was interrupted.
    let interrupted = journal.unfinished()?;
    let report = match (action, interrupted) {
        (Action::Deploy(_), Some(row)) => {
            let last = journal.steps(&row.id)?.into_iter().last();
            let at = last.map_or("before its first step".to_string(), |s| {
                format!(
                    "at step \"{} {} {}\"{}",
                    s.host,
                    s.action,
                    s.detail,
                    if s.result.is_none() {
                        " (unfinished)"
                    } else {
                        ""
                    }
                )
            });
            anyhow::bail!(
                "deployment {} ({} -> {}) was interrupted {at}: run `cutover deploy --resume` to finish it, or `cutover rollback` to return every host to where it was",
                row.id,
                row.from.as_deref().unwrap_or("(nothing)"),
                row.to
            );
        }
        (Action::Deploy(version), None) => deployer.run(&Request::deploy(version)).await?,
        (Action::Resume, Some(row)) => {
            let version = parse_version(&row.to)?;
            let kind = if row.kind == "rollback" {
                "rollback"
            } else {
                "deploy"
            };
            deployer
                .run(&Request {
                    version,
                    kind,
                    resume: Some(row),
                })
                .await?
        }
        (Action::Resume, None) => {
            anyhow::bail!("there is no interrupted deployment to resume (see `cutover history`)")
        }
        (Action::Rollback(to), Some(row)) => {
            if let Some(v) = to {
                anyhow::bail!(
                    "deployment {} was interrupted: `cutover rollback` returns every host to where it was before it; --to {v} is not possible until then",
                    row.id
                );
            }
            deployer.restore(&row).await?
        }
        (Action::Rollback(to), None) => {
            let target = match to {
                Some(v) => v,
                None => {
                    let prev = journal.previous_release()?.ok_or_else(|| {
                        anyhow::anyhow!(
                            "no earlier release is recorded in the journal ({}): name one with `cutover rollback --to VERSION`",
                            journal.path().display()
                        )
                    })?;
                    parse_version(&prev)?
                }
            };
            deployer
                .run(&Request {
                    version: target,
                    kind: "rollback",
                    resume: None,
                })
                .await?
        }
    };
    let _ = journal.prune(config.history_keep);
    // The HTML deploy report (`cutover show ID --html`); a failure to write it is not the deploy's.
    let _ = crate::report::write_report(&journal, &report.id, &[]);
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
    for n in &r.notes {
        let _ = writeln!(out, "  {n}");
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
    match config.strategy.kind {
        crate::config::StrategyKind::Rolling => print_rolling_plan(config, version),
        crate::config::StrategyKind::BlueGreen => print_blue_green_plan(config, version),
        crate::config::StrategyKind::Canary => print_canary_plan(config, version),
    }
    let points: Vec<String> = config
        .verify
        .iter()
        .map(|v| format!("`{}` at {:?} (timeout {})", v.command, v.at, v.timeout))
        .collect();
    if !points.is_empty() {
        println!("  verify: {}", points.join("; "));
    }
    if let Some(a) = &config.analysis {
        println!(
            "  analysis every {}: min_success_rate {:?}, max_p99_latency {}, min_requests {} (fewer: inconclusive, the rollout holds), failure_limit {}{}",
            a.interval,
            a.min_success_rate.map(|p| p.0),
            a.max_p99_latency.map_or("-".to_string(), |d| d.to_string()),
            a.min_requests,
            a.failure_limit,
            if a.judge.is_some() {
                ", Mann-Whitney judge on latencies"
            } else {
                ""
            }
        );
    }
}

/// Worst case of one host's gate: health deadline twice (own check and the balancer's).
fn gate_worst(config: &Config) -> std::time::Duration {
    *config.app.health.deadline * 2
}

fn print_blue_green_plan(config: &Config, version: &Name) {
    let s = &config.strategy;
    println!(
        "plan: blue-green deploy of {} {} to {} host(s)",
        config.app.name,
        version,
        config.hosts.len()
    );
    println!("  1. stage {version} on every host, in parallel");
    println!(
        "  2. start green ({version}) beside blue on all {} host(s) in parallel; gate: health ({} passes, deadline {}), then the balancer's check; green enters as preview backends",
        config.hosts.len(),
        config.app.health.healthy_threshold.0,
        config.app.health.deadline
    );
    println!(
        "  3. verify green through the preview route: requests with `x-cutover-preview: 1` at http://{}",
        config.balancer.listen
    );
    println!("  4. switch: one atomic admin call makes green active and blue draining");
    match s.post_switch_analysis {
        Some(d) => println!("  5. post-switch analysis for {d}: failure switches back to blue"),
        None => println!(
            "  5. (no post-switch analysis: set post_switch_analysis and [analysis] to judge green after the switch)"
        ),
    }
    println!(
        "  6. blue keeps running for scale_down_delay = {}: `cutover rollback` switches back at once; then blue is drained and stopped",
        s.scale_down_delay
    );
    let worst = gate_worst(config)
        + *s.scale_down_delay
        + *config.app.drain_timeout
        + *config.app.stop_timeout;
    println!("  worst case: {}", humantime::format_duration(worst));
}

fn print_canary_plan(config: &Config, version: &Name) {
    let s = &config.strategy;
    println!(
        "plan: canary deploy of {} {} on {} of {} host(s){}",
        config.app.name,
        version,
        s.canary_hosts,
        config.hosts.len(),
        s.sticky
            .as_ref()
            .map_or(String::new(), |k| format!(", sticky by {k}"))
    );
    println!(
        "  1. stage {version} on every host; start the canary beside the stable instance on {} host(s), weight 0",
        s.canary_hosts
    );
    let mut worst = gate_worst(config);
    let interval = config
        .analysis
        .as_ref()
        .map(|a| *a.interval)
        .unwrap_or_default();
    for (i, step) in s.steps.iter().enumerate() {
        match step.pause {
            Some(p) => {
                worst += *p + interval;
                println!(
                    "  step {}/{}: {}% of requests to the canary for {p}, analysis every {}",
                    i + 1,
                    s.steps.len(),
                    step.weight,
                    humantime::format_duration(interval)
                );
            }
            None => println!(
                "  step {}/{}: {}% of requests to the canary until `cutover promote`",
                i + 1,
                s.steps.len(),
                step.weight
            ),
        }
    }
    let batches = batch::batches(&s.batch, &config.hosts).len() as u32;
    worst += deploy::worst_case_per_host(config) * batches;
    println!(
        "  then: roll {version} out to every host in {batches} batch(es) (batch = {}), no further analysis",
        s.batch
    );
    println!(
        "  abort (analysis failure, `cutover abort`): canary weight 0, canary stopped, stable untouched"
    );
    println!(
        "  worst case: {}{}",
        humantime::format_duration(worst),
        if s.steps.iter().any(|st| st.pause.is_none()) {
            " plus the time until each `cutover promote`"
        } else {
            ""
        }
    );
}

fn print_rolling_plan(config: &Config, version: &Name) {
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
    let journal = Journal::open(&config.state_dir)?;
    let started = journal.started_instances()?;
    let drift = fleet::drift(&views, &started);
    let lock = journal.lock_holder(config.app.name.as_str())?;
    let unfinished = journal.unfinished()?;
    let deployment = unfinished.map(|row| {
        let running = lock
            .as_ref()
            .is_some_and(|h| crate::journal::process_alive(h.pid));
        (row, running)
    });
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
        let deployment = deployment.as_ref().map(|(row, running)| {
            serde_json::json!({ "id": row.id, "from": row.from, "to": row.to, "strategy": row.strategy,
                "state": if *running { "running" } else { "interrupted" }, "status": row.status })
        });
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "hosts": hosts, "drift": drift, "deployment": deployment })
            )?
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
    if let Some((row, running)) = &deployment {
        if *running {
            println!(
                "\ndeployment {} running: {} -> {} ({})",
                row.id,
                row.from.as_deref().unwrap_or("-"),
                row.to,
                row.strategy
            );
            if let Some(st) = &row.status {
                println!("  {}", fleet::describe_status(st));
            }
        } else {
            println!(
                "\ndeployment {} ({} -> {}) was INTERRUPTED: `cutover deploy --resume` finishes it, `cutover rollback` undoes it; `cutover show {}` tells where it stopped",
                row.id,
                row.from.as_deref().unwrap_or("(nothing)"),
                row.to,
                row.id
            );
        }
    }
    if drift.is_empty() {
        println!("\nno drift: hosts and balancer match the journal");
    } else {
        println!("\nDRIFT (what the journal does not explain):");
        for d in &drift {
            println!("  - {d}");
        }
    }
    Ok(())
}

fn print_history(config: &Config, json: bool) -> anyhow::Result<()> {
    let journal = Journal::open(&config.state_dir)?;
    let records = journal.deployments(config.history_keep)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&records)?);
        return Ok(());
    }
    if records.is_empty() {
        println!("no deployments recorded in {}", journal.path().display());
        return Ok(());
    }
    println!(
        "{:<20} {:<9} {:<11} {:<10} {:<10} {:<12} {:>8} {:>9} {:>7}",
        "ID", "KIND", "STRATEGY", "FROM", "TO", "OUTCOME", "SECONDS", "SERVED", "FAILED"
    );
    for r in &records {
        let num = |k: &str| {
            r.report
                .as_ref()
                .and_then(|v| v.get(k))
                .and_then(|v| v.as_u64())
        };
        println!(
            "{:<20} {:<9} {:<11} {:<10} {:<10} {:<12} {:>8} {:>9} {:>7}",
            r.id,
            r.kind,
            r.strategy,
            r.from.as_deref().unwrap_or("-"),
            r.to,
            r.outcome.as_deref().unwrap_or("interrupted"),
            r.ended_ms.map_or("-".into(), |e| format!(
                "{:.1}",
                e.saturating_sub(r.started_ms) as f64 / 1000.0
            )),
            num("served").map_or("-".into(), |n| n.to_string()),
            num("failed_requests").map_or("-".into(), |n| n.to_string()),
        );
    }
    Ok(())
}

fn show_cmd(config: &Config, id: Option<&str>, json: bool) -> anyhow::Result<()> {
    let journal = Journal::open(&config.state_dir)?;
    let row = match id {
        Some(id) => journal.deployment(id)?.ok_or_else(|| {
            anyhow::anyhow!(
                "no deployment {id} in {} (see `cutover history`)",
                journal.path().display()
            )
        })?,
        None => journal.deployments(1)?.into_iter().next().ok_or_else(|| {
            anyhow::anyhow!("no deployments recorded in {}", journal.path().display())
        })?,
    };
    let steps = journal.steps(&row.id)?;
    let events = journal.events(&row.id)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "deployment": row, "steps": steps, "events": events })
            )?
        );
        return Ok(());
    }
    println!(
        "deployment {}: {} {} {} -> {} ({}), by {}",
        row.id,
        row.kind,
        row.strategy,
        row.from.as_deref().unwrap_or("(nothing)"),
        row.to,
        row.outcome.as_deref().unwrap_or("interrupted or running"),
        row.who
    );
    if let Some(r) = &row.report {
        let n = |k: &str| r.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        println!(
            "  requests while it ran: {} served, {} failed",
            n("served"),
            n("failed_requests")
        );
        if let Some(by) = r.get("served_by_release").and_then(|v| v.as_object()) {
            let parts: Vec<String> = by.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            if !parts.is_empty() {
                println!("  by release: {}", parts.join(", "));
            }
        }
    }
    println!(
        "  {:>8} {:>8}  {:<8} {:<9} {:<28} RESULT",
        "AT(s)", "TOOK(ms)", "HOST", "STEP", "DETAIL"
    );
    for s in &steps {
        println!(
            "  {:>8.1} {:>8}  {:<8} {:<9} {:<28} {}",
            s.started_ms.saturating_sub(row.started_ms) as f64 / 1000.0,
            s.ended_ms
                .map_or("-".into(), |e| e.saturating_sub(s.started_ms).to_string()),
            s.host,
            s.action,
            s.detail,
            s.result
                .as_deref()
                .unwrap_or("INTERRUPTED (the process died here)")
        );
    }
    for e in &events {
        println!(
            "  {:>8.1} event: {}",
            e.at_ms.saturating_sub(row.started_ms) as f64 / 1000.0,
            e.message
        );
    }
    Ok(())
}
