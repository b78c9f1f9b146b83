//! `cutover proxy`: the built-in load balancer in the foreground until Ctrl-C or SIGTERM.

use std::io::Write;

use clap::Args;

use crate::config::Config;

/// `cutover proxy` flags.
#[derive(Args, Debug)]
pub struct ProxyArgs {
    /// Replace the proxy running with the same state directory without dropping a request:
    /// take over its listening sockets; it stops accepting, drains and exits.
    #[arg(long)]
    pub takeover: bool,
    /// Worker threads, 1-1024 (default: one per CPU core; 1 runs everything on this thread).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,
}

pub(super) async fn run_proxy(config: Config, args: ProxyArgs) -> anyhow::Result<()> {
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
