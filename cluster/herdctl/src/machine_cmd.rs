//! `herdctl machine list|show|timeline|reprovision`: the provisioner's JSON API (docs/provisioner-api.md); the
//! timeline adds the cluster's events of the machine.

use std::process::ExitCode;

use anyhow::Context as _;
use herd_provisioner::http::MachineSummary;
use herd_provisioner::machines::TimelineEntry;

use crate::cli::{ClusterArgs, Output};
use crate::table;
use crate::unit_cmd::Cluster;

/// A client of one provisioner.
pub(crate) struct Api {
    base: String,
}

fn when(at_ms: u64) -> String {
    let secs = at_ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}.{:03}", at_ms % 1000)
}

impl Api {
    pub(crate) fn new(base: &str) -> Self {
        Api { base: base.trim_end_matches('/').to_owned() }
    }

    fn get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}{path}", self.base);
        let mut resp = ureq::get(&url).call().with_context(|| {
            format!("cannot reach the provisioner at {url}; pass --provisioner http://ADDRESS or set HERD_PROVISIONER")
        })?;
        resp.body_mut().read_json().with_context(|| format!("unexpected answer from {url}"))
    }

    pub(crate) fn list(&self, output: Output) -> anyhow::Result<ExitCode> {
        let value = self.get("/api/v1/machines")?;
        if output == Output::Json {
            println!("{}", serde_json::to_string_pretty(&value)?);
            return Ok(ExitCode::SUCCESS);
        }
        let machines: Vec<MachineSummary> = serde_json::from_value(value)?;
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
        let value = self.get(&format!("/api/v1/machines/{name}"))?;
        if output == Output::Json {
            println!("{}", serde_json::to_string_pretty(&value)?);
        } else if let Some(map) = value.as_object() {
            for (k, v) in map {
                let shown = match (k.as_str(), v) {
                    (_, serde_json::Value::Null) => "-".to_owned(),
                    ("slots", v) => serde_json::from_value(v.clone())
                        .map_or_else(|_| v.to_string(), |r| herd_provisioner::machines::describe_slots(&r)),
                    (_, v) => v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                };
                println!("{k:<18} {shown}");
            }
        }
        Ok(ExitCode::SUCCESS)
    }

    /// The provisioner's timeline of `name`, merged with what the cluster's engine saw happen to the machine when
    /// `cluster` can be reached (a note on stderr says when it cannot).
    pub(crate) fn timeline(&self, name: &str, cluster: &ClusterArgs, output: Output) -> anyhow::Result<ExitCode> {
        let value = self.get(&format!("/api/v1/machines/{name}/timeline"))?;
        let mut entries: Vec<TimelineEntry> = serde_json::from_value(value)?;
        match Cluster::connect(cluster).and_then(|c| c.machine_events(name)) {
            Ok(events) => entries.extend(events),
            Err(e) => eprintln!("herdctl: the cluster's events of {name} are left out: {e:#}"),
        }
        // Stable: entries of the same millisecond keep their source order.
        entries.sort_by_key(|e| e.at_ms);
        if output == Output::Json {
            println!("{}", serde_json::to_string_pretty(&entries)?);
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
        let url = format!("{}/api/v1/machines/{name}/reprovision", self.base);
        let mut resp = ureq::post(&url).send_empty().with_context(|| format!("cannot reprovision {name} via {url}"))?;
        let value: serde_json::Value = resp.body_mut().read_json()?;
        println!("{name}: {} (installs on its next boot)", value["state"].as_str().unwrap_or("?"));
        Ok(ExitCode::SUCCESS)
    }
}
