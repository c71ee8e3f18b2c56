//! The `provisioner` daemon: thin over [`herd_provisioner::daemon`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use herd_provisioner::daemon::{self, Settings};
use tokio_util::sync::CancellationToken;

/// herd's boot server for the machines of an inventory: DHCP (full or proxy, and the PXE boot-server port 4011),
/// TFTP, and HTTP (iPXE scripts, boot assets, per-machine Ignition configs, phone-home, /metrics, JSON API).
#[derive(Debug, Parser)]
#[command(name = "provisioner", version, about)]
struct Args {
    /// A TOML file with any of the settings below (`version = 1`, keys as the flags with `_`); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The settings.
    #[command(flatten)]
    settings: Settings,
    /// More logging (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

/// The flags over the config file over the defaults.
fn settings(args: Args) -> anyhow::Result<daemon::DaemonConfig> {
    let file = match &args.config {
        Some(path) => Settings::load(path)?,
        None => Settings::default(),
    };
    args.settings.over(file).resolve()
}

fn main() -> ExitCode {
    let args = Args::parse();
    let level = match args.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colour only on a terminal: a log redirected to a file or a pipe carries no ANSI escapes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    let config = match settings(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("provisioner: error: {e:#}");
            return ExitCode::from(2);
        }
    };
    // Few blocking threads: file reads for HTTP assets queue on them instead of each boot-storm connection
    // growing the pool (every extra thread costs stack memory).
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().max_blocking_threads(16).build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("provisioner: error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        let cancel = CancellationToken::new();
        let on_signal = cancel.clone();
        tokio::spawn(async move {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down");
            on_signal.cancel();
        });
        daemon::run(config, cancel).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("provisioner: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
