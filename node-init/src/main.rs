//! The `node-init` binary. As PID 1 (the initramfs's `/init`) it runs the initramfs stage; otherwise the
//! subcommand says what to do.

use clap::{Parser, Subcommand, ValueEnum};
use herd_node_init::{daemon, initrd, report::SystemReport};

/// herd's on-node program: initramfs stage (as /init), daemon stage (as a systemd service), local status.
#[derive(Debug, Parser)]
#[command(name = "node-init", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The daemon stage (what herd-node-init.service runs).
    Daemon,
    /// What booted and how: image, slot, stage timings, whether /usr is read-only.
    Status {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// The initramfs stage (runs by itself when node-init is PID 1).
    Initrd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

fn main() -> anyhow::Result<()> {
    if std::process::id() == 1 {
        initrd::run();
    }
    match Cli::parse().command {
        Command::Initrd => anyhow::bail!("the initramfs stage runs only as PID 1 (the initramfs's /init)"),
        Command::Daemon => daemon::run(),
        Command::Status { output } => {
            let r = SystemReport::probe();
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&r)?),
                Output::Text => print_status(&r),
            }
            Ok(())
        }
    }
}

fn print_status(r: &SystemReport) {
    println!("os:        {}", r.os);
    println!("herd:      {}", r.herd_release);
    match &r.boot {
        Some(b) => {
            println!("image:     {} {} (kernel {})", b.image, b.release, b.kernel);
            println!("root:      {} (verity {})", b.source, b.root_hash);
            println!("state:     {}", b.state);
            for f in &b.failed_slots {
                println!("passed:    {f}");
            }
            println!(
                "timeline:  initramfs at {} ms, modules {} ms, root {} ms, switch_root {} ms",
                b.initrd_started_ms, b.modules_loaded_ms, b.root_mounted_ms, b.switch_root_ms
            );
        }
        None => println!("image:     (not booted through herd's initramfs)"),
    }
    let yn = |b: bool| if b { "writable" } else { "read-only" };
    println!("/usr {}, /etc {}, /var {}", yn(r.usr_writable), yn(r.etc_writable), yn(r.var_writable));
}
