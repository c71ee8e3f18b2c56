//! `herdctl inventory check|show|gen|diff`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use herd_inventory::{Diagnostic, FleetSpec, Inventory, LoadError, Machine};
use serde::Serialize;

use crate::cli::Output;
use crate::table;

/// Exit status when an inventory has problems.
const INVALID: u8 = 1;
/// Exit status when a file cannot be read.
const UNREADABLE: u8 = 2;

#[derive(Serialize)]
struct JsonDiagnostic<'a> {
    file: &'a str,
    line: usize,
    column: usize,
    rule: &'a str,
    message: &'a str,
}

pub(crate) fn check(files: &[PathBuf], output: Output) -> anyhow::Result<ExitCode> {
    let mut status = 0u8;
    let mut problems: Vec<Diagnostic> = Vec::new();
    for file in files {
        match herd_inventory::load(file) {
            Ok(inv) => {
                if output == Output::Text {
                    println!("{}: ok: {}", file.display(), summary(&inv));
                }
            }
            Err(LoadError::Invalid(diags)) => {
                status = status.max(INVALID);
                problems.extend(diags.0);
            }
            Err(err @ LoadError::Read { .. }) => {
                status = UNREADABLE;
                eprintln!("herdctl: error: {:#}", anyhow::Error::from(err));
            }
        }
    }
    match output {
        Output::Text => {
            let mut err = std::io::stderr().lock();
            for d in &problems {
                writeln!(err, "{d}")?;
            }
            if !problems.is_empty() {
                writeln!(err, "{} problem(s) found; nothing else was done", problems.len())?;
            }
        }
        Output::Json => {
            let json: Vec<_> = problems
                .iter()
                .map(|d| JsonDiagnostic {
                    file: &d.file,
                    line: d.line,
                    column: d.column,
                    rule: d.rule.as_str(),
                    message: &d.message,
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
    }
    Ok(ExitCode::from(status))
}

fn summary(inv: &Inventory) -> String {
    let n = |count: usize, one: &str, many: &str| format!("{count} {}", if count == 1 { one } else { many });
    [
        n(inv.machines.len(), "machine", "machines"),
        n(inv.racks.len(), "rack", "racks"),
        n(inv.roles.len(), "role", "roles"),
        n(inv.etcd_members().count(), "etcd member", "etcd members"),
    ]
    .join(", ")
}

/// Loads an inventory for commands other than `check`: problems become one error listing them all.
pub(crate) fn load(file: &Path) -> anyhow::Result<Inventory> {
    herd_inventory::load(file).map_err(|e| match e {
        LoadError::Invalid(d) => {
            anyhow::anyhow!("{d}\n{} problem(s); run `herdctl inventory check {}`", d.0.len(), file.display())
        }
        other => anyhow::Error::from(other),
    })
}

#[derive(Serialize)]
struct MachineView<'a> {
    #[serde(flatten)]
    machine: &'a Machine,
    fqdn: String,
    effective_labels: herd_inventory::Labels,
}

pub(crate) fn show(file: &Path, output: Output) -> anyhow::Result<ExitCode> {
    let inv = load(file)?;
    match output {
        Output::Json => {
            let views: Vec<_> = inv
                .machines
                .iter()
                .map(|m| MachineView { machine: m, fqdn: inv.fqdn(m), effective_labels: inv.labels_of(m) })
                .collect();
            println!("{}", serde_json::to_string_pretty(&views)?);
        }
        Output::Text => {
            let rows: Vec<Vec<String>> = inv.machines.iter().map(machine_row).collect();
            print!(
                "{}",
                table::render(&["NAME", "ROLE", "RACK", "BOOT MAC", "INTERNAL", "BOND", "EXTERNAL", "DISK"], &rows)
            );
            println!("{}", summary(&inv));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn machine_row(m: &Machine) -> Vec<String> {
    let dash = || "-".to_owned();
    vec![
        m.name.get_ref().to_string(),
        m.role.get_ref().to_string(),
        m.rack.get_ref().to_string(),
        m.boot_mac().map_or_else(dash, |mac| mac.to_string()),
        m.internal.get_ref().to_string(),
        m.bond.as_ref().map_or_else(dash, |b| format!("{} x{}", b.mode, b.members.get_ref().len())),
        m.external.as_ref().map_or_else(dash, |e| e.address.get_ref().to_string()),
        m.disk.as_ref().map_or_else(|| "diskless".to_owned(), |d| d.to_string()),
    ]
}

pub(crate) fn gen_fleet(machines: usize, racks: Option<usize>, masters: usize) -> anyhow::Result<ExitCode> {
    let defaults = FleetSpec::new(machines);
    let spec = FleetSpec { machines, racks: racks.unwrap_or(defaults.racks), masters };
    let text = herd_inventory::generate(spec).context("cannot generate that fleet")?;
    std::io::stdout().lock().write_all(text.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn diff(old: &Path, new: &Path, output: Output, exit_code: bool) -> anyhow::Result<ExitCode> {
    let (a, b) = (load(old)?, load(new)?);
    let plan = herd_inventory::diff(&a, &b);
    match output {
        Output::Text => print!("{plan}"),
        Output::Json => println!("{}", serde_json::to_string_pretty(&plan)?),
    }
    Ok(if exit_code && !plan.is_empty() { ExitCode::from(INVALID) } else { ExitCode::SUCCESS })
}
