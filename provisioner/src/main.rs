//! The `provisioner` daemon: thin over [`herd_provisioner::daemon`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use herd_provisioner::daemon::{self, DEBIAN_IPXE_DIR, DaemonConfig, FileConfig};
use herd_provisioner::dhcp::server::{Mode, UnknownMacs};
use tokio_util::sync::CancellationToken;

/// herd's boot server for the machines of an inventory: DHCP (full or proxy, and the PXE boot-server port 4011),
/// TFTP, and HTTP (iPXE scripts, boot assets, per-machine Ignition configs, phone-home, /metrics, JSON API).
#[derive(Debug, Parser)]
#[command(name = "provisioner", version, about)]
struct Args {
    /// A TOML file with any of the settings below (`version = 1`, keys as the flags with `_`); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The inventory file (required, here or in the config file).
    #[arg(long, value_name = "FILE")]
    inventory: Option<PathBuf>,
    /// The boot interface; it must carry the inventory's [site] provisioner address (required).
    #[arg(long, value_name = "IFACE")]
    interface: Option<String>,
    /// Where leases and boot state are kept, crash-safe (required).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Where the iPXE binaries are (undionly.kpxe, ipxe.efi, snponly.efi) [default: /usr/lib/ipxe].
    #[arg(long, value_name = "DIR")]
    ipxe_dir: Option<PathBuf>,
    /// full: hand out addresses and boot information; proxy: boot information only, beside another DHCP server
    /// [default: full].
    #[arg(long, value_enum)]
    mode: Option<ModeArg>,
    /// MACs not in the inventory: ignore them (production), or lease from the pool and boot them (discovery)
    /// [default: ignore].
    #[arg(long, value_enum)]
    unknown_macs: Option<UnknownArg>,
    /// HTTP port the boot URLs point at [default: 80].
    #[arg(long)]
    http_port: Option<u16>,
    /// Port of the boot-asset server (kernels, initramfs, images, sent with sendfile) [default: 8080].
    #[arg(long)]
    assets_port: Option<u16>,
    /// Lease time in seconds [default: 3600].
    #[arg(long)]
    lease_secs: Option<u32>,
    /// Directory served over TFTP [default: the iPXE binaries, copied into STATE_DIR/boot].
    #[arg(long, value_name = "DIR")]
    tftp_root: Option<PathBuf>,
    /// Directory served under /assets: vmlinuz, initramfs and OS images [default: /var/lib/herd/assets].
    #[arg(long, value_name = "DIR")]
    assets: Option<PathBuf>,
    /// More logging (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ModeArg {
    Full,
    Proxy,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum UnknownArg {
    Ignore,
    Serve,
}

/// The flags over the config file over the defaults.
fn settings(args: Args) -> anyhow::Result<DaemonConfig> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let missing = |what: &str| anyhow::anyhow!("--{what} is required (on the command line or in --config)");
    let mode = match (args.mode, file.mode.as_deref()) {
        (Some(ModeArg::Proxy), _) | (None, Some("proxy")) => Mode::Proxy,
        _ => Mode::Full,
    };
    let unknown = match (args.unknown_macs, file.unknown_macs.as_deref()) {
        (Some(UnknownArg::Serve), _) | (None, Some("serve")) => UnknownMacs::Serve,
        _ => UnknownMacs::Ignore,
    };
    Ok(DaemonConfig {
        inventory: args.inventory.or(file.inventory).ok_or_else(|| missing("inventory"))?,
        interface: args.interface.or(file.interface).ok_or_else(|| missing("interface"))?,
        state_dir: args.state_dir.or(file.state_dir).ok_or_else(|| missing("state-dir"))?,
        ipxe_dir: args.ipxe_dir.or(file.ipxe_dir).unwrap_or_else(|| DEBIAN_IPXE_DIR.into()),
        mode,
        unknown,
        http_port: args.http_port.or(file.http_port).unwrap_or(80),
        assets_port: args.assets_port.or(file.assets_port).unwrap_or(8080),
        lease_secs: args.lease_secs.or(file.lease_secs).unwrap_or(3600),
        tftp_root: args.tftp_root.or(file.tftp_root),
        assets: args.assets.or(file.assets).unwrap_or_else(|| "/var/lib/herd/assets".into()),
    })
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
