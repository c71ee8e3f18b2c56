//! `herdctl machine list|show|timeline|reprovision|approve`: the provisioner's JSON API (docs/provisioner-api.md); the
//! timeline adds the cluster's events of the machine.

use std::process::ExitCode;

use anyhow::Context as _;

use herd_api::{Client, TimelineEntry};

use crate::cli::{ClusterArgs, Output};
use crate::table;
use crate::unit_cmd::Cluster;

/// A client of one provisioner.
pub(crate) struct Api {
    client: Client,
}

fn when(at_ms: u64) -> String {
    let secs = at_ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}.{:03}", at_ms % 1000)
}

/// What to do when the provisioner cannot be reached or refuses.
pub(crate) fn advice(e: herd_api::ApiError) -> anyhow::Error {
    let hint = match &e {
        herd_api::ApiError::Unreachable { .. } => {
            "pass --provisioner https://ADDRESS:8443 (or set HERD_PROVISIONER), and --credentials DIR from `herdctl \
             pki issue operator`"
        }
        herd_api::ApiError::Status { status: 401, .. } => {
            "pass --credentials DIR (from `herdctl pki issue operator NAME`) or set HERD_API_TOKEN"
        }
        herd_api::ApiError::Status { status: 403, .. } => {
            "this needs an operator or admin credential; on the boot port, use the operator API (https://ADDRESS:8443)"
        }
        e if e.not_found() => "`herdctl machine list` shows the machines of the inventory",
        _ => "its log says more",
    };
    anyhow::Error::new(e).context(hint.to_owned())
}

/// The operator API credentials of `args`: the api part of `--credentials DIR`, and a bearer token from
/// `HERD_API_TOKEN` (never a flag: flags show in `ps`).
fn credentials(args: &ClusterArgs) -> anyhow::Result<Option<herd_api::Credentials>> {
    let token = std::env::var("HERD_API_TOKEN").ok().filter(|t| !t.is_empty());
    let Some(dir) = &args.credentials else {
        return Ok(token.map(|t| herd_api::Credentials { token: Some(t), ..Default::default() }));
    };
    let read = |f: &str| std::fs::read(dir.join(f)).with_context(|| format!("cannot read {}", dir.join(f).display()));
    let ca_pem = read("api-ca.crt")?;
    let identity = if dir.join("api.crt").exists() {
        herd_pki::check_private(&dir.join("api.key"))?;
        Some((read("api.crt")?, read("api.key")?))
    } else {
        None
    };
    Ok(Some(herd_api::Credentials { ca_pem, identity, token }))
}

impl Api {
    pub(crate) fn new(base: &str, args: &ClusterArgs) -> anyhow::Result<Self> {
        let timeout = std::time::Duration::from_secs(10);
        let client = match credentials(args)? {
            Some(c) if base.starts_with("https://") => Client::with_credentials(base, timeout, &c)?,
            None if base.starts_with("https://") => anyhow::bail!(
                "the operator API at {base} needs a credential: pass --credentials DIR (from `herdctl pki issue \
                 operator NAME`) or set HERD_API_TOKEN"
            ),
            _ => Client::new(base, timeout),
        };
        Ok(Api { client })
    }

    /// The API client.
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    pub(crate) fn list(&self, output: Output) -> anyhow::Result<ExitCode> {
        let machines = self.client.machines().map_err(advice)?;
        if output.json(&machines)? {
            return Ok(ExitCode::SUCCESS);
        }
        let rows: Vec<Vec<String>> = machines
            .iter()
            .map(|m| {
                let last =
                    m.last.as_ref().map_or_else(String::new, |e| format!("{} {} {}", when(e.at_ms), e.event, e.detail));
                vec![m.name.clone(), m.state.to_string(), m.role.clone(), m.rack.clone(), m.address.clone(), last]
            })
            .collect();
        print!("{}", table::render(&["NAME", "STATE", "ROLE", "RACK", "ADDRESS", "LAST EVENT (UTC)"], &rows));
        Ok(ExitCode::SUCCESS)
    }

    pub(crate) fn show(&self, name: &str, output: Output) -> anyhow::Result<ExitCode> {
        let m = self.client.machine(name).map_err(advice)?;
        if output.json(&m)? {
            return Ok(ExitCode::SUCCESS);
        }
        let fields = [
            ("name", m.name.clone()),
            ("state", m.state.to_string()),
            ("fqdn", m.fqdn.clone()),
            ("role", m.role.clone()),
            ("rack", m.rack.clone()),
            ("macs", m.macs.join(", ")),
            ("address", m.address.clone()),
            ("leased", m.leased.clone().unwrap_or_else(|| "-".to_owned())),
            ("timeline_entries", m.timeline_entries.to_string()),
            ("slots", m.slots.as_ref().map_or_else(|| "-".to_owned(), herd_api::describe_slots)),
        ];
        for (k, v) in fields {
            println!("{k:<18} {v}");
        }
        Ok(ExitCode::SUCCESS)
    }

    /// The provisioner's timeline of `name`, merged with what the cluster's engine saw happen to the machine when
    /// `cluster` can be reached (a note on stderr says when it cannot).
    pub(crate) fn timeline(&self, name: &str, cluster: &ClusterArgs, output: Output) -> anyhow::Result<ExitCode> {
        let mut entries: Vec<TimelineEntry> = self.client.timeline(name).map_err(advice)?;
        match Cluster::connect(cluster).and_then(|c| c.machine_events(name)) {
            Ok(events) => entries.extend(events),
            Err(e) => eprintln!("herdctl: the cluster's events of {name} are left out: {e:#}"),
        }
        // Stable: entries of the same millisecond keep their source order.
        entries.sort_by_key(|e| e.at_ms);
        if output.json(&entries)? {
            return Ok(ExitCode::SUCCESS);
        }
        let first = entries.first().map_or(0, |e| e.at_ms);
        let rows: Vec<Vec<String>> = entries
            .iter()
            .map(|e| {
                let offset = e.at_ms.saturating_sub(first) as f64 / 1000.0;
                vec![when(e.at_ms), format!("+{offset:.3}s"), e.event.clone(), e.detail.clone()]
            })
            .collect();
        print!("{}", table::render(&["TIME (UTC)", "SINCE FIRST", "EVENT", "DETAIL"], &rows));
        Ok(ExitCode::SUCCESS)
    }

    pub(crate) fn reprovision(&self, name: &str) -> anyhow::Result<ExitCode> {
        let change = self.client.reprovision(name).map_err(advice)?;
        println!("{name}: {} (installs on its next boot)", change.state);
        Ok(ExitCode::SUCCESS)
    }

    pub(crate) fn approve(&self, name: &str, fingerprint: &str) -> anyhow::Result<ExitCode> {
        self.client.approve(name, fingerprint).map_err(advice)?;
        println!("{name}: keys {fingerprint} approved (the machine gets its certificates at its next join request)");
        Ok(ExitCode::SUCCESS)
    }
}
