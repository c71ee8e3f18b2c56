//! The `provisioner` daemon: thin over [`herd_provisioner::daemon`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use herd_provisioner::daemon::{self, DEBIAN_IPXE_DIR, DaemonConfig};
use herd_provisioner::dhcp::server::{Mode, UnknownMacs};
use tokio_util::sync::CancellationToken;

/// herd's boot server for the machines of an inventory: DHCP (full or proxy, and the PXE boot-server port 4011),
/// TFTP, and HTTP (iPXE scripts, boot assets, per-machine Ignition configs, phone-home, /metrics, JSON API).
#[derive(Debug, Parser)]
#[command(name = "provisioner", version, about)]
struct Args {
    /// The inventory file.
    #[arg(long, value_name = "FILE")]
    inventory: PathBuf,
    /// The boot interface; it must carry the inventory's [site] provisioner address.
    #[arg(long, value_name = "IFACE")]
    interface: String,
    /// Where leases and boot state are kept (crash-safe).
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,
    /// Where the iPXE binaries are (undionly.kpxe, ipxe.efi, snponly.efi).
    #[arg(long, value_name = "DIR", default_value = DEBIAN_IPXE_DIR)]
    ipxe_dir: PathBuf,
    /// full: hand out addresses and boot information; proxy: boot information only, beside another DHCP server.
    #[arg(long, value_enum, default_value_t = ModeArg::Full)]
    mode: ModeArg,
    /// MACs not in the inventory: ignore them (production), or lease from the pool and boot them (discovery).
    #[arg(long, value_enum, default_value_t = UnknownArg::Ignore)]
    unknown_macs: UnknownArg,
    /// HTTP port the boot URLs point at.
    #[arg(long, default_value_t = 80)]
    http_port: u16,
    /// Port of the boot-asset server (kernels, initramfs, images, sent with sendfile).
    #[arg(long, default_value_t = 8080)]
    assets_port: u16,
    /// Lease time in seconds.
    #[arg(long, default_value_t = 3600)]
    lease_secs: u32,
    /// Directory served over TFTP [default: the iPXE binaries, copied into STATE_DIR/boot].
    #[arg(long, value_name = "DIR")]
    tftp_root: Option<PathBuf>,
    /// Directory served over HTTP under /assets: vmlinuz, initramfs and OS images.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/herd/assets")]
    assets: PathBuf,
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

fn main() -> ExitCode {
    let args = Args::parse();
    let level = match args.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let config = DaemonConfig {
        inventory: args.inventory,
        interface: args.interface,
        state_dir: args.state_dir,
        tftp_root: args.tftp_root,
        assets: args.assets,
        ipxe_dir: args.ipxe_dir,
        mode: match args.mode {
            ModeArg::Full => Mode::Full,
            ModeArg::Proxy => Mode::Proxy,
        },
        unknown: match args.unknown_macs {
            UnknownArg::Ignore => UnknownMacs::Ignore,
            UnknownArg::Serve => UnknownMacs::Serve,
        },
        http_port: args.http_port,
        assets_port: args.assets_port,
        lease_secs: args.lease_secs,
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
