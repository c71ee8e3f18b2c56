//! herdctl: the admin's command line for a herd site.
//!
//! It covers the inventory (`check`, `show`, `gen`, `diff`), machine configs (`render`, `lint`, `translate`), the
//! provisioner's view of machines (`machine list|show|timeline|reprovision|approve`), and the cluster, fleetctl-style
//! (`submit load start stop unload destroy restart cat list-units list-unit-files list-machines status journal
//! ssh`, `machine cordon|uncordon|drain`, `prewarm`), the site PKI (`pki init|issue|status`) and etcd's users and roles
//! (`access apply`). Images and upgrades join as the crates behind them land.
//! The binary is a thin `main` over [`run`].

mod bench_cmd;
pub mod cli;
mod config_cmd;
mod demo;
mod image_cmd;
mod inventory_cmd;
mod machine_cmd;
mod pki_cmd;
mod ssh;
mod table;
mod unit_cmd;

use std::process::ExitCode;

use cli::{
    AccessCommand, Cli, Command, ConfigCommand, DemoCommand, InventoryCommand, MachineCommand, PkiCommand,
    PrewarmCommand,
};
use herd_cluster::record::Desired;

/// Runs one parsed command line; the exit code follows the command (1 = the input has problems).
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Inventory { command } => match command {
            InventoryCommand::Check { files, output } => inventory_cmd::check(&files, output),
            InventoryCommand::Show { file, output } => inventory_cmd::show(&file, output),
            InventoryCommand::Gen { machines, racks, masters } => inventory_cmd::gen_fleet(machines, racks, masters),
            InventoryCommand::Diff { old, new, output, exit_code } => {
                inventory_cmd::diff(&old, &new, output, exit_code)
            }
        },
        Command::Machine { provisioner, command } => {
            let api = || machine_cmd::Api::new(&provisioner, &cli.cluster);
            match command {
                MachineCommand::List { output } => api()?.list(output),
                MachineCommand::Show { name, output } => api()?.show(&name, output),
                MachineCommand::Timeline { name, output } => api()?.timeline(&name, &cli.cluster, output),
                MachineCommand::Reprovision { name } => api()?.reprovision(&name),
                MachineCommand::Approve { name, fingerprint } => api()?.approve(&name, &fingerprint),
                MachineCommand::Cordon { name } => unit_cmd::Cluster::connect(&cli.cluster)?.cordon(&name, false),
                MachineCommand::Uncordon { name } => unit_cmd::Cluster::connect(&cli.cluster)?.uncordon(&name),
                MachineCommand::Drain { name, no_block, timeout } => {
                    unit_cmd::Cluster::connect(&cli.cluster)?.drain(&name, no_block, timeout)
                }
            }
        }
        Command::Config { command } => match command {
            ConfigCommand::Render { inventory, machine, format, etcd_tls } => {
                config_cmd::render(&inventory, &machine, format, herd_config::ignition::RenderOptions { etcd_tls })
            }
            ConfigCommand::Lint { file } => config_cmd::lint(&file),
            ConfigCommand::Translate { file } => config_cmd::translate(&file),
        },
        Command::Bench { command } => bench_cmd::run(&cli.cluster, command),
        Command::Pki { dir, command } => match command {
            PkiCommand::Init { site, admin } => pki_cmd::init(&dir, &site, &admin),
            PkiCommand::Issue { kind, name, role, ips, dns, days, out } => {
                pki_cmd::issue(&dir, kind, &name, role, &ips, &dns, days, out.as_deref())
            }
            PkiCommand::Token { name, role, file } => pki_cmd::token(&dir, &name, role, file.as_deref()),
            PkiCommand::Status { all, output } => pki_cmd::status(&dir, all, output),
            PkiCommand::Rotate { provisioner, status, no_wait, timeout_mins, output } => {
                let api = machine_cmd::Api::new(&provisioner, &cli.cluster)?;
                let follow = !status && !no_wait;
                pki_cmd::rotate(
                    api.client(),
                    !status,
                    follow,
                    std::time::Duration::from_secs(timeout_mins * 60),
                    output,
                )
            }
            PkiCommand::Prune { ended_days, dry_run, output } => pki_cmd::prune(&dir, ended_days, dry_run, output),
        },
        Command::Access { command } => match command {
            AccessCommand::Apply { inventory, pki } => pki_cmd::apply(&cli.cluster, &inventory, &pki),
        },
        Command::Image { command } => image_cmd::run(command),
        Command::Demo { command, mut args, output } => {
            if args.provisioner_bin.is_none() {
                let exe = std::env::current_exe()?;
                args.provisioner_bin = exe.parent().map(|d| d.join("provisioner"));
            }
            match command.unwrap_or(DemoCommand::Up) {
                DemoCommand::Up => demo::up(&args, output),
                DemoCommand::Down => demo::down(&args.dir),
                DemoCommand::PowerOff { name } => demo::power_off(&args.dir, &name),
                DemoCommand::PowerOn { name } => demo::power_on(&args.dir, &name, output),
            }
        }
        command => cluster_command(&cli.cluster, command),
    }
}

/// The commands that talk to the cluster.
fn cluster_command(args: &cli::ClusterArgs, command: Command) -> anyhow::Result<ExitCode> {
    let c = unit_cmd::Cluster::connect(args)?;
    match command {
        Command::Submit { files, replace } => c.submit(&files, replace),
        Command::Load(t) => c.target(&t, Some(Desired::Loaded)),
        Command::Start(t) => c.target(&t, Some(Desired::Launched)),
        Command::Stop(t) => c.target(&t, Some(Desired::Loaded)),
        Command::Unload(t) => c.target(&t, Some(Desired::Inactive)),
        Command::Destroy(t) => c.target(&t, None),
        Command::Restart(t) => c.restart(&t),
        Command::Cat { unit } => c.cat(&unit),
        Command::ListUnits { output } => c.list_units(output),
        Command::ListUnitFiles { output } => c.list_unit_files(output),
        Command::ListMachines { output } => c.list_machines(output),
        Command::Status { unit } => c.status(&unit),
        Command::Journal { unit, lines, follow } => c.journal(&unit, lines, follow),
        Command::Ssh { target, unit, command } => c.ssh(&target, unit, &command),
        Command::Prewarm { command } => match command {
            PrewarmCommand::Add { images } => c.prewarm_add(&images),
            PrewarmCommand::Remove { images } => c.prewarm_remove(&images),
            PrewarmCommand::List { output } => c.prewarm_list(output),
        },
        Command::Inventory { .. }
        | Command::Machine { .. }
        | Command::Config { .. }
        | Command::Bench { .. }
        | Command::Pki { .. }
        | Command::Access { .. }
        | Command::Image { .. }
        | Command::Demo { .. } => {
            unreachable!("handled by run")
        }
    }
}
