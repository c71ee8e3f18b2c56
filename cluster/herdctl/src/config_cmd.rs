//! `herdctl config render|lint`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use herd_config::{cloud_config, ignition, lint};

use crate::cli::ConfigFormat;
use crate::inventory_cmd;

pub(crate) fn render(
    inventory: &Path,
    machine: &str,
    format: ConfigFormat,
    options: ignition::RenderOptions,
) -> anyhow::Result<ExitCode> {
    let inv = inventory_cmd::load(inventory)?;
    let config = ignition::render_machine_with(&inv, machine, options)
        .with_context(|| format!("cannot render the config of {machine} from {}", inventory.display()))?;
    match format {
        ConfigFormat::Ignition => print!("{}", ignition::to_json(&config)),
        ConfigFormat::CloudConfig => print!("{}", cloud_config::from_ignition(&config)?),
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn lint(file: &Path) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let findings = lint::lint_str(&text).with_context(|| format!("cannot lint {}", file.display()))?;
    for finding in &findings {
        println!("{}: {finding}", file.display());
    }
    if findings.is_empty() {
        println!("{}: ok", file.display());
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{} finding(s)", findings.len());
        Ok(ExitCode::from(1))
    }
}

pub(crate) fn translate(file: &Path) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let config = cloud_config::translate(&text).with_context(|| format!("cannot translate {}", file.display()))?;
    print!("{}", ignition::to_json(&config));
    Ok(ExitCode::SUCCESS)
}
