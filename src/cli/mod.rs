//! The command line: flags as parsed by clap, then one function per verb.
//!
//! Exit codes mean something: 0 deployed (or the command did what it says), 1 a deployment was
//! rolled back, halted or aborted, 2 an error (bad config, unreachable balancer, ...). Errors
//! print once, with their whole context chain.
//!
//! One module per group of verbs: [`deploy`] (deploy, rollback, readmit, the lock, commands to a
//! running deployment), [`plan`], [`inspect`] (status, history, show, logs) and [`proxy`].

mod deploy;
mod inspect;
mod plan;
mod proxy;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::balancer::Balancer;
use crate::balancer::builtin::AdminClient;
use crate::config::{Config, Name};
use crate::deploy::Deployer;
use crate::journal::{Journal, LockHolder};
use crate::progress::Progress;
use crate::transport::Transport;
use crate::transport::local::LocalTransport;

pub use deploy::print_report;
pub(crate) use deploy::take_lock;
use deploy::{Action, control, deploy_cmd, running_deployment, wait_for_command, wait_for_end};
use inspect::{logs_cmd, print_history, show_cmd, status_cmd};
use plan::print_plan;
pub use proxy::ProxyArgs;
use proxy::run_proxy;

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
    /// broken v3 roll back by itself, switch a blue-green v4 back, watch the analysis abort a
    /// failing canary v5. Needs no set-up; leaves nothing behind (also on Ctrl-C or SIGTERM).
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
    /// deployment: return every host to the release it had before it. While a deployment
    /// runs: ask it to go back (waits for it to end).
    Rollback(RollbackArgs),
    /// After an HAProxy reload or restart: put the live release's running instances back in.
    ///
    /// cutover adds each instance to HAProxy as a dynamic server; those live only in the
    /// running HAProxy, so a reload (`systemctl reload haproxy`, a certbot renewal hook) or a
    /// restart starts without them and every request gets 503 until they are back. `readmit`
    /// finds the hosts whose live release runs but has no server, and deploys that release to
    /// them alone: each running instance passes its health check and goes back in. Nothing is
    /// restarted, no hook or verify suite runs, and the deploy lock is taken as by a deploy.
    /// With nothing missing, or nothing ever deployed, it says so and exits 0.
    ///
    /// A deploy (or rollback, or readmit) running during a reload puts back the servers that
    /// were taking requests itself and carries on. `cutover serve` re-admits by itself
    /// within seconds of a reload. Without it, run readmit after each reload and start of
    /// HAProxy, e.g. with a drop-in (/etc/systemd/system/haproxy.service.d/cutover.conf; see
    /// docs/haproxy.md):
    ///
    ///   [Service]
    ///   ExecStartPost=-/usr/local/bin/cutover readmit -c /etc/cutover.toml
    ///   ExecReload=-/bin/sh -c 'sleep 2; exec /usr/local/bin/cutover readmit -c /etc/cutover.toml'
    ///
    /// (The sleep lets the reloaded HAProxy take over its stats socket: read before that, the
    /// old process still shows every server. During a deploy, readmit finds the deploy lock
    /// taken and fails, which the `-` ignores.) Exit codes as deploy's: 0 re-admitted (or
    /// nothing to do), 1 a host failed its health check, 2 an error.
    #[command(verbatim_doc_comment)]
    Readmit(ReadmitArgs),
    /// Move a running canary to its next step (--full: skip the remaining steps), end a
    /// blue-green switch-back window early, or let a paused rolling deploy go on.
    Promote(PromoteArgs),
    /// Stop a running deployment and return traffic to the stable release: a canary or
    /// blue-green at once, a rolling deploy (or a canary's promotion) when its current batch
    /// ends, returning every moved host. A `[[verify]]` suite running meanwhile is stopped.
    ///
    /// Like promote, pause and resume, it works from another machine too: a deployment that
    /// machine runs (it holds the fleet lock) reads the command from the lock's host within a
    /// second.
    Abort,
    /// Hold a running canary at its current step, whatever its timer or analysis says, or a
    /// rolling deploy (or a canary's promotion) before its next batch.
    Pause,
    /// Let a paused deployment go on.
    Resume,
    /// Recent log lines of a host's instances (`<root>/log/<version>-<port>.log`), live ones first.
    Logs(LogsArgs),
    /// Show who holds the deploy lock: the journal's, and the fleet's (on the first host that
    /// answers).
    Lock,
    /// Release the deploy lock (the journal's and the fleet's). Only with --force, which is
    /// recorded in the journal.
    Unlock(UnlockArgs),
    /// Run the built-in load balancer (traffic listener + admin API) from [balancer].
    Proxy(ProxyArgs),
    /// A small HTTP app for the demo and tests: GET / answers its version, GET /health answers 200.
    SampleApp(crate::sample_app::SampleAppArgs),
    /// Push-button deployment: a dashboard, a JSON API and GitHub push webhooks on [serve]
    /// listen; deployments run one at a time from a queue. See docs/serve.md.
    Serve(ServeArgs),
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Drop the jobs that were still queued when `cutover serve` last stopped (each is printed
    /// with the command that runs it by hand) instead of running them.
    #[arg(long)]
    pub drop_queued: bool,
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Directory to write into.
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Overwrite an existing cutover.toml, and the sample releases' files
    /// (VERSION and run.sh in releases/v1 and releases/v2; other files there are left alone).
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Keep the temporary workspace (printed at the end) instead of removing it.
    #[arg(long)]
    pub keep: bool,
    /// Requests per second of the steady traffic during each phase (1-5000): the proof that
    /// no request failed needs requests. The canary phase sends at least 100, so that the
    /// canary's 20% share gives its analysis enough to judge.
    #[arg(long, default_value_t = 150, value_parser = clap::value_parser!(u32).range(1..=5000))]
    pub rate: u32,
}

#[derive(Args, Debug)]
pub struct VersionArgs {
    /// Version to deploy: the name of a release (letters, digits, . _ + -).
    #[arg(long)]
    pub version: String,
}

/// `--version` or `--resume`, exactly one: a group, so that the usage line and the error for
/// neither say both.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["version", "resume"])))]
pub struct DeployArgs {
    /// Version to deploy: the name of a release (letters, digits, . _ + -).
    #[arg(long)]
    pub version: Option<String>,
    /// Continue the interrupted deployment recorded in the journal.
    #[arg(long)]
    pub resume: bool,
    /// Wait up to this long for another deployment's lock (e.g. "5m").
    #[arg(long, value_parser = humantime::parse_duration)]
    pub lock_wait: Option<std::time::Duration>,
    /// JSON for CI: progress as JSON lines on stderr, then the report as one JSON object on
    /// stdout.
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
pub struct ReadmitArgs {
    /// Wait up to this long for another deployment's lock (e.g. "5m").
    #[arg(long, value_parser = humantime::parse_duration)]
    pub lock_wait: Option<std::time::Duration>,
    /// JSON for CI: progress as JSON lines on stderr, then the report (or, with nothing to
    /// do, `{"outcome": "nothing_to_readmit", "message": ...}`) as one JSON object on stdout.
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
    /// JSON for CI: progress as JSON lines on stderr, then the report as one JSON object on
    /// stdout.
    #[arg(long)]
    pub json: bool,
}

/// Verbs that read no config: their help does not offer the global `-c/--config`.
const NO_CONFIG: [&str; 2] = ["demo", "sample-app"];

/// The command line as parsed: [`Cli`], with `-c/--config` hidden from the help of the verbs
/// that read no config. A global argument is copied into every subcommand when clap builds the
/// command, unless the subcommand has one of that id already: those verbs get a hidden copy
/// (still accepted, and ignored, as before).
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let config = cmd
        .get_arguments()
        .find(|a| a.get_id() == "config")
        .expect("Cli has a config argument")
        .clone()
        .hide(true);
    // `mut_subcommands` keeps their order (`mut_subcommand` would move them to the end).
    cmd.mut_subcommands(|sc| {
        if NO_CONFIG.contains(&sc.get_name()) {
            sc.arg(config.clone())
        } else {
            sc
        }
    })
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    use clap::FromArgMatches;
    let cli = Cli::from_arg_matches_mut(&mut command().get_matches())
        .unwrap_or_else(|e| e.format(&mut command()).exit());
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
    if verbose > 0 || std::env::var_os("CUTOVER_LOG").is_some() {
        // Log lines would come between the board's redraws.
        crate::progress::no_board();
    }
    let filter = match tracing_subscriber::EnvFilter::try_from_env("CUTOVER_LOG") {
        Ok(filter) => filter,
        Err(e) => {
            if let Some(value) = std::env::var_os("CUTOVER_LOG") {
                eprintln!(
                    "WARNING: CUTOVER_LOG={value:?} is not a log filter ({e}); logging at {default:?}. Write a level (debug) or target=level pairs (cutover=debug,hyper=warn)"
                );
            }
            tracing_subscriber::EnvFilter::new(default)
        }
    };
    // Colour only for a person at a terminal: escape codes in a log file or a journal are noise.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
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
            | Command::Logs(_)
            | Command::Lock
    ) {
        // Read-only commands end quietly when their reader goes away (`cutover history | head`,
        // `cutover logs web1 --all | head`), like other command-line tools, instead of
        // panicking on a broken pipe. Commands that change something are not listed: killed
        // mid-write, they would leave their work half done.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match cli.command {
        Command::Init(args) => crate::init::run(&args.dir, &cli.config, args.force).map(|_| 0),
        Command::Demo(args) => runtime()?.block_on(crate::demo::run(crate::demo::DemoOptions {
            keep: args.keep,
            rate: args.rate,
        })),
        Command::Serve(args) => {
            let config = Config::load(&cli.config)?;
            runtime()?
                .block_on(crate::server::run(config, args.drop_queued))
                .map(|_| 0)
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
                    b.worker_threads(usize::from(n));
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
            // The plan is where a config is checked: a [serve] section that `cutover serve`
            // would refuse fails it too (other commands go on without serve).
            if let Some(e) = &config.serve_error {
                anyhow::bail!("{e}");
            }
            let version = parse_version(&args.version)?;
            let (version, note) = plan::resolve_branch(&config, version);
            print_plan(&config, &version);
            // A plan may come before the build of a `path` release: then it says a deploy now
            // would be refused, and succeeds. A git ref that cannot be deployed fails it.
            if let Err(e) = deploy::check_release_known(&config, &version, "--version") {
                eprintln!("note: a deploy now would be refused: {e:#}");
            }
            match note {
                Some(plan::Note::Refused(why)) => {
                    eprintln!("error: a deploy now would be refused: {why}");
                    Ok(2)
                }
                Some(plan::Note::Info(note)) => {
                    eprintln!("note: {note}");
                    Ok(0)
                }
                None => Ok(0),
            }
        }
        Command::Deploy(args) => {
            let config = Config::load(&cli.config)?;
            let version = args.version.as_deref().map(parse_version).transpose()?;
            if let Some(v) = &version {
                deploy::check_release_known(&config, v, "--version")?;
            }
            let what = match &version {
                Some(v) => Action::Deploy(v.clone()),
                None => Action::Resume,
            };
            runtime()?.block_on(deploy_cmd(config, what, args.lock_wait, args.json))
        }
        Command::Rollback(args) => {
            let config = Config::load(&cli.config)?;
            if args.to.is_none() {
                if let Some(row) = running_deployment(&config)? {
                    if row.kind == "rollback" {
                        // Asking a rollback to roll back would send the fleet forward again.
                        eprintln!(
                            "a rollback is already running (deployment {}, to {}): waiting for it to end",
                            row.id, row.to
                        );
                        return wait_for_end(&config, &row, args.json);
                    }
                    // The running deployer goes back itself: a blue-green in its switch-back
                    // window within milliseconds, a canary at once, a rolling deploy (or a
                    // canary's promotion) once its current batch ends.
                    return wait_for_command(&config, &row, "rollback", args.json);
                }
            }
            let to = args
                .to
                .as_deref()
                .map(|v| parse_name("--to", v))
                .transpose()?;
            if let Some(v) = &to {
                deploy::check_release_known(&config, v, "--to")?;
            }
            runtime()?.block_on(deploy_cmd(
                config,
                Action::Rollback(to),
                args.lock_wait,
                args.json,
            ))
        }
        Command::Readmit(args) => {
            let config = Config::load(&cli.config)?;
            runtime()?.block_on(deploy_cmd(
                config,
                Action::Readmit,
                args.lock_wait,
                args.json,
            ))
        }
        Command::Status(args) => {
            let config = Config::load(&cli.config)?;
            runtime()?.block_on(status_cmd(config, args.json))
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
                Some(h) if h.is_gone() => println!(
                    "locked by a deployer that is gone (the next deploy takes the lock over): {}",
                    h.describe()
                ),
                Some(h) => println!("locked: {}", h.describe()),
                None => println!("unlocked"),
            }
            // The fleet's lock, on the first host that answers (see `fleet_lock`).
            let (seen, others) = runtime()?.block_on(async {
                let transport = transport_for(&config)?;
                anyhow::Ok(crate::fleet_lock::read_all(&config, transport.as_ref()).await)
            })?;
            println!("{}", seen.line());
            // Taken on a later host by a machine that could not reach the first.
            for (host, record) in &others {
                println!(
                    "fleet: also held by {} (host {})",
                    record.describe(),
                    host.name
                );
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
            // A holder running on this machine is not stale: unlocking under it would let a
            // second deployer work on the same fleet.
            let runs_here =
                |h: &LockHolder| h.machine == LockHolder::me("").machine && !h.is_gone();
            let refuse = |whose: &str, h: &LockHolder| {
                anyhow::anyhow!(
                    "{whose} holder still runs on this machine: {}. Let it finish, send it back with `cutover abort`, or end it (kill {}) and then `cutover rollback` or `cutover deploy --resume`; no unlock is needed after that",
                    h.describe(),
                    h.pid
                )
            };
            if let Some(h) = journal.lock_holder(config.app.name.as_str())? {
                if runs_here(&h) {
                    return Err(refuse("the lock's", &h));
                }
            }
            let me = LockHolder::me("unlock --force");
            runtime()?.block_on(async {
                let transport = transport_for(&config)?;
                let (seen, others) =
                    crate::fleet_lock::read_all(&config, transport.as_ref()).await;
                for (_, r) in seen.locks(&others) {
                    if runs_here(&r.holder) {
                        return Err(refuse("the fleet lock's", &r.holder));
                    }
                }
                match journal.force_unlock(config.app.name.as_str(), &me)? {
                    Some(h) => println!("removed the lock held by {}", h.describe()),
                    None => println!("the lock was free"),
                }
                let Some((host, _)) = &seen.on else {
                    anyhow::bail!(
                        "the fleet lock could not be removed: no host answered ({})",
                        seen.silent.join("; ")
                    );
                };
                // Where it is, and wherever a machine that could not reach that host took it.
                let hosts = std::iter::once((host, true)).chain(others.iter().map(|(h, _)| (h, false)));
                for (host, first) in hosts {
                    match crate::fleet_lock::force_clear(transport.as_ref(), host).await? {
                        Some(r) => {
                            println!(
                                "removed the fleet lock on host {} held by {}",
                                host.name,
                                r.holder.describe()
                            );
                            journal.event(
                                None,
                                &format!(
                                    "fleet lock on host {} forcibly released by {} on {}: was held by {}",
                                    host.name,
                                    me.user,
                                    me.machine,
                                    r.holder.describe()
                                ),
                            )?;
                        }
                        None if first => println!("the fleet lock was free (host {})", host.name),
                        None => {}
                    }
                }
                Ok(0)
            })
        }
    }
}

fn parse_version(v: &str) -> anyhow::Result<Name> {
    parse_name("--version", v)
}

/// A version given as `flag` (or read back from the journal), checked as a name.
fn parse_name(flag: &str, v: &str) -> anyhow::Result<Name> {
    Name::parse(v).map_err(|e| anyhow::anyhow!("{flag}: {e}"))
}

/// The transport and balancer client a config asks for.
pub fn connect(config: &Config) -> anyhow::Result<(Arc<dyn Transport>, Arc<dyn Balancer>)> {
    connect_as(config, false)
}

/// [`connect`], for a deployment when `deploying`: its HAProxy client puts back the servers
/// a reload of HAProxy drops (see `balancer::haproxy::reload`). Only a command that holds
/// the deploy lock knows the backend's servers as they are.
fn connect_as(
    config: &Config,
    deploying: bool,
) -> anyhow::Result<(Arc<dyn Transport>, Arc<dyn Balancer>)> {
    let transport = transport_for(config)?;
    let balancer: Arc<dyn Balancer> = match config.balancer.kind {
        crate::config::BalancerKind::Builtin => Arc::new(AdminClient::new(
            config.admin_addr()?,
            config.admin_token()?,
        )),
        crate::config::BalancerKind::Haproxy => {
            let settings = crate::balancer::haproxy::HaproxySettings {
                put_back_lost_servers: deploying,
                ..crate::balancer::haproxy::HaproxySettings::from_config(config)?
            };
            Arc::new(crate::balancer::haproxy::LazyHaproxy::new(
                settings,
                &config.file,
            ))
        }
    };
    Ok((transport, balancer))
}

/// The transport a config asks for.
fn transport_for(config: &Config) -> anyhow::Result<Arc<dyn Transport>> {
    Ok(match config.transport {
        crate::config::TransportKind::Local => Arc::new(LocalTransport::with_step_timeout(
            config.ssh.command_timeout,
        )),
        crate::config::TransportKind::Ssh => Arc::new(crate::transport::ssh::SshTransport::new(
            config.ssh.clone(),
            config.forks,
        )?),
    })
}

/// The deployer for a config, with a balancer client that waits out balancer restarts (and
/// puts back the servers an HAProxy reload drops).
pub fn deployer(
    config: Arc<Config>,
    journal: Arc<Journal>,
    progress: Progress,
) -> anyhow::Result<Deployer> {
    let (transport, balancer) = connect_as(&config, true)?;
    let balancer: Arc<dyn Balancer> = Arc::new(crate::balancer::patient::Patient::new(
        balancer,
        *config.balancer.unreachable_timeout,
        progress.clone(),
    ));
    Ok(Deployer::new(
        config, transport, balancer, journal, progress,
    ))
}
