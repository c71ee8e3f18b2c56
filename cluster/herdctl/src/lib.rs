//! herdctl: the admin's command line for a herd site.
//!
//! Today it covers the inventory (`check`, `show`, `gen`, `diff`) and machine configs (`render`, `lint`); units, machines, images and upgrades join as the
//! crates behind them land. The binary is a thin `main` over [`run`].

pub mod cli;
mod config_cmd;
mod inventory_cmd;
mod table;

use std::process::ExitCode;

use cli::{Cli, Command, ConfigCommand, InventoryCommand};

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
        Command::Config { command } => match command {
            ConfigCommand::Render { inventory, machine, format } => config_cmd::render(&inventory, &machine, format),
            ConfigCommand::Lint { file } => config_cmd::lint(&file),
            ConfigCommand::Translate { file } => config_cmd::translate(&file),
        },
    }
}
