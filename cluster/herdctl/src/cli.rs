//! The command line, as clap derive types (kept apart so tests can check it with `Command::debug_assert`).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Operate a herd site: from the inventory to a running, upgraded cluster.
#[derive(Debug, Parser)]
#[command(name = "herdctl", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check, show, generate and compare inventory files.
    Inventory {
        /// What to do with the inventory.
        #[command(subcommand)]
        command: InventoryCommand,
    },
    /// Machines as the provisioner sees them: state, boot timeline, reprovisioning.
    Machine {
        /// Base URL of the provisioner's HTTP API.
        #[arg(long, global = true, env = "HERD_PROVISIONER", default_value = "http://127.0.0.1")]
        provisioner: String,
        /// What to do.
        #[command(subcommand)]
        command: MachineCommand,
    },
    /// Render and lint machine configs (Ignition).
    Config {
        /// What to do with configs.
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

/// `herdctl machine ...`
#[derive(Debug, Subcommand)]
pub enum MachineCommand {
    /// List machines with their state and latest boot event.
    List {
        /// Print a table or JSON.
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Output,
    },
    /// Show one machine: addresses, MACs, state.
    Show {
        /// The machine's name.
        name: String,
        /// Print text or JSON.
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Output,
    },
    /// The machine's boot timeline: every DHCP, TFTP, HTTP and phone-home step, timestamped.
    Timeline {
        /// The machine's name.
        name: String,
        /// Print a table or JSON.
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Output,
    },
    /// Make the machine install again on its next boot.
    Reprovision {
        /// The machine's name.
        name: String,
    },
}

/// The format `config render` prints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum ConfigFormat {
    /// Ignition 3.3.0 JSON (what the provisioner serves).
    #[default]
    Ignition,
    /// The same config as a CoreOS #cloud-config.
    CloudConfig,
}

/// `herdctl config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the config (Ignition 3.3.0) the provisioner serves to MACHINE.
    Render {
        /// The inventory file.
        #[arg(long, short = 'i', value_name = "FILE")]
        inventory: PathBuf,
        /// The machine's name.
        #[arg(value_name = "MACHINE")]
        machine: String,
        /// Ignition JSON, or the same config as a #cloud-config for machines still on CoreOS-style cloud-init.
        #[arg(long, short = 'f', value_enum, default_value_t)]
        format: ConfigFormat,
    },
    /// Translate a legacy CoreOS #cloud-config (hostname, users, ssh_authorized_keys, write_files, coreos.units,
    /// coreos.etcd2) into Ignition 3.3.0. Keys it cannot translate are refused by name.
    Translate {
        /// The cloud-config file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Check an Ignition config for foot-guns ignition-validate misses: decimal-looking modes, duplicate paths,
    /// enabled units without [Install], remote sources without a hash, relative paths.
    ///
    /// Prints JSON-PATH: RULE: MESSAGE per finding; exits 0 when clean, 1 with findings, 2 when unreadable.
    Lint {
        /// The Ignition config (JSON).
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

/// How listings are printed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    #[default]
    Text,
    /// JSON for scripts.
    Json,
}

/// `herdctl inventory ...`
#[derive(Debug, Subcommand)]
pub enum InventoryCommand {
    /// Validate inventory files; print every problem as FILE:LINE:COL: RULE: MESSAGE.
    ///
    /// Exits 0 when every file is valid, 1 when any has problems, 2 when a file cannot be read.
    Check {
        /// Inventory files to check.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Print problems as text or as a JSON array.
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Output,
    },
    /// List the machines of an inventory.
    Show {
        /// The inventory file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Print a table or JSON (with each machine's effective labels and FQDN).
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Output,
    },
    /// Print a realistic generated inventory (racks, bonded NIC pairs, internal and external networks).
    Gen {
        /// Number of machines.
        #[arg(long, short = 'n')]
        machines: usize,
        /// Number of racks [default: one per 40 machines].
        #[arg(long)]
        racks: Option<usize>,
        /// Number of masters (etcd members): 1, 3 or 5.
        #[arg(long, default_value_t = 3)]
        masters: usize,
    },
    /// Show what changing OLD into NEW would change: machines added, removed and changed, field by field, with
    /// what applying each machine's change takes (metadata only, reboot, reprovision).
    Diff {
        /// The inventory as it is applied now.
        #[arg(value_name = "OLD")]
        old: PathBuf,
        /// The proposed inventory.
        #[arg(value_name = "NEW")]
        new: PathBuf,
        /// Print the plan as text or JSON.
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Output,
        /// Exit with status 1 when there are differences (like `git diff --exit-code`).
        #[arg(long)]
        exit_code: bool,
    },
}
