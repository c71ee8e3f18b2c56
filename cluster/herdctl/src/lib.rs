//! herdctl: the admin's command line for a herd site.
//!
//! Today it covers the inventory (`check`, `show`, `gen`, `diff`), machine configs (`render`, `lint`,
//! `translate`) and the provisioner's view of machines (`machine list|show|timeline|reprovision`); units, machines, images and upgrades join as the
//! crates behind them land. The binary is a thin `main` over [`run`].

pub mod cli;
mod config_cmd;
mod inventory_cmd;
mod machine_cmd;
mod table;

use std::process::ExitCode;

use cli::{Cli, Command, ConfigCommand, InventoryCommand, MachineCommand};

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
            let api = machine_cmd::Api::new(&provisioner);
            match command {
                MachineCommand::List { output } => api.list(output),
                MachineCommand::Show { name, output } => api.show(&name, output),
                MachineCommand::Timeline { name, output } => api.timeline(&name, output),
                MachineCommand::Reprovision { name } => api.reprovision(&name),
            }
        }
        Command::Config { command } => match command {
            ConfigCommand::Render { inventory, machine, format } => config_cmd::render(&inventory, &machine, format),
            ConfigCommand::Lint { file } => config_cmd::lint(&file),
            ConfigCommand::Translate { file } => config_cmd::translate(&file),
        },
    }
}
