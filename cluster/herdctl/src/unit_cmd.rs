//! The fleetctl-like commands: units (submit, load, start, stop, unload, destroy, restart, cat, list-units,
//! list-unit-files, status, journal), machines of the cluster (list-machines, ssh, cordon, uncordon, drain) and the
//! pre-warm list. They talk to etcd (`--endpoint`, TLS flags, or `--tunnel` over SSH) and to machines over SSH.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use herd_api::TimelineEntry;
use herd_cluster::client::ClientError;
use herd_cluster::client::{ClusterClient, UnitStatus};
use herd_cluster::docker::container_name;
use herd_cluster::record::{Desired, UnplacedRecord};
use herd_cluster::store::Store;
use herd_cluster::unit::{Unit, UnitName};

use crate::cli::{ClusterArgs, Output, Targets};
use crate::ssh::{self, Login};
use crate::table;

/// A connection to the cluster.
pub(crate) struct Cluster {
    rt: tokio::runtime::Runtime,
    client: ClusterClient,
    login: Login,
    _tunnel: Option<ssh::Tunnel>,
}

fn since(ms: Option<u64>) -> String {
    let Some(ms) = ms else { return "-".into() };
    let now = herd_cluster::record::now_ms();
    let ago = now.saturating_sub(ms) / 1000;
    match ago {
        0..60 => format!("{ago}s ago"),
        60..3600 => format!("{}m ago", ago / 60),
        3600..86400 => format!("{}h ago", ago / 3600),
        _ => format!("{}d ago", ago / 86400),
    }
}

/// How long a command retries a request etcd refused for want of a leader (a daemon gives up after
/// [`herd_cluster::store::RETRY_FOR`]).
const OPERATOR_RETRY_FOR: Duration = Duration::from_secs(30);

/// A short stable digest of a unit file (FNV-1a), as fleetctl's HASH column.
fn digest(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")[..7].to_owned()
}

impl Cluster {
    pub(crate) fn connect(args: &ClusterArgs) -> anyhow::Result<Cluster> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let login = Login { user: args.ssh_user.clone(), port: args.ssh_port, identity: args.ssh_identity.clone() };
        let (endpoints, tunnel) = match &args.tunnel {
            Some(spec) => {
                let t = ssh::tunnel(spec, &login, &args.endpoint)?;
                (t.endpoints.clone(), Some(t))
            }
            None => (args.endpoint.clone(), None),
        };
        let tls = crate::pki_cmd::etcd_tls(args)?;
        let timeout = Duration::from_secs(args.request_timeout.max(1));
        let store = rt.block_on(Store::connect(&endpoints, &tls, timeout)).with_context(|| {
            format!(
                "cannot reach etcd at {}; pass --endpoint URL (or set HERD_ENDPOINT), or --tunnel HOST",
                args.endpoint.join(",")
            )
        })?;
        // Connecting is lazy: make one request now (retried only as long as a daemon's) so a wrong endpoint or a
        // missing certificate fails here, soon, with the advice below.
        rt.block_on(store.get("/herd/v1/engine/leader")).with_context(|| {
            format!(
                "etcd at {} does not answer; check --endpoint, and pass --credentials DIR (an etcd with mutual TLS \
                 closes the connection of a client without a certificate from the site CA)",
                args.endpoint.join(",")
            )
        })?;
        // An operator's command rides out an etcd leader election rather than failing with "leader changed".
        let store = store.with_retry_for(OPERATOR_RETRY_FOR);
        Ok(Cluster { rt, client: ClusterClient::new(store), login, _tunnel: tunnel })
    }

    /// Runs `f` on this command's runtime.
    pub(crate) fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// The etcd connection.
    pub(crate) fn store(&self) -> &Store {
        self.client.store()
    }

    /// What the engine saw happen to `machine`, as timeline entries (`cluster:registered`, `cluster:dead`, ...).
    pub(crate) fn machine_events(&self, machine: &str) -> anyhow::Result<Vec<TimelineEntry>> {
        let events = self.rt.block_on(self.client.machine_events(machine))?;
        Ok(events
            .into_iter()
            .map(|e| TimelineEntry { at_ms: e.at_ms, event: format!("cluster:{}", e.event), detail: e.detail })
            .collect())
    }

    /// Names the units of `args`, submitting those given as files, and (as fleetctl does) the template of an
    /// instance the cluster does not have when the template's file is in the current directory.
    fn names(&self, args: &Targets) -> anyhow::Result<Vec<String>> {
        let mut names = Vec::new();
        for u in &args.units {
            let path = Path::new(u);
            if path.is_file() {
                names.push(self.submit_file(path, args.replace)?);
                continue;
            }
            if let Some(template) = self.local_template(u)? {
                self.submit_file(&template, false)?;
                let shown = template.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                println!("{shown}: submitted from {} (the template of {u})", template.display());
            }
            names.push(u.clone());
        }
        Ok(names)
    }

    /// `./prefix@.type` for an instance `prefix@x.type` when the cluster has neither the instance nor its template
    /// and that file exists.
    fn local_template(&self, name: &str) -> anyhow::Result<Option<std::path::PathBuf>> {
        let Some(template) = name.parse::<UnitName>().ok().and_then(|n| n.template()) else { return Ok(None) };
        let local = Path::new(".").join(template.as_str());
        if !local.is_file() {
            return Ok(None);
        }
        for submitted in [name, template.as_str()] {
            match self.rt.block_on(self.client.cat(submitted)) {
                Ok(_) => return Ok(None),
                Err(ClientError::NoUnit(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Some(local))
    }

    fn submit_file(&self, path: &Path, replace: bool) -> anyhow::Result<String> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{}: not a unit file name", path.display()))?
            .to_owned();
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        self.rt.block_on(self.client.submit(&name, &text, replace)).with_context(|| format!("{}", path.display()))?;
        Ok(name)
    }

    pub(crate) fn submit(&self, files: &[std::path::PathBuf], replace: bool) -> anyhow::Result<ExitCode> {
        for f in files {
            let name = self.submit_file(f, replace)?;
            println!("{name}: submitted");
        }
        Ok(ExitCode::SUCCESS)
    }

    /// load / start / stop / unload (Some) and destroy (None).
    pub(crate) fn target(&self, args: &Targets, desired: Option<Desired>) -> anyhow::Result<ExitCode> {
        let names = self.names(args)?;
        for n in &names {
            match desired {
                Some(d) => self.rt.block_on(self.client.set_desired(n, d))?,
                None => {
                    if !self.rt.block_on(self.client.destroy(n))? {
                        eprintln!("herdctl: {n}: no such unit");
                    }
                }
            }
        }
        if args.no_block {
            return Ok(ExitCode::SUCCESS);
        }
        self.wait(&names, desired, args.timeout)
    }

    fn wait(&self, names: &[String], desired: Option<Desired>, timeout: u64) -> anyhow::Result<ExitCode> {
        let result = self.rt.block_on(self.client.wait(names, desired, Duration::from_secs(timeout)));
        let units = self.rt.block_on(self.client.units())?;
        for n in names {
            let u = units.iter().find(|u| &u.name == n);
            println!("{}", describe(n, u));
        }
        match result {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e) => {
                eprintln!("herdctl: {e}; see herdctl list-units and herdctl status UNIT");
                Ok(ExitCode::from(1))
            }
        }
    }

    /// Rolling restart: one unit at a time, each stopped then active again before the next.
    pub(crate) fn restart(&self, args: &Targets) -> anyhow::Result<ExitCode> {
        for n in self.names(args)? {
            self.rt.block_on(self.client.set_desired(&n, Desired::Loaded))?;
            if self.wait(std::slice::from_ref(&n), Some(Desired::Loaded), args.timeout)? != ExitCode::SUCCESS {
                return Ok(ExitCode::from(1));
            }
            self.rt.block_on(self.client.set_desired(&n, Desired::Launched))?;
            if self.wait(std::slice::from_ref(&n), Some(Desired::Launched), args.timeout)? != ExitCode::SUCCESS {
                return Ok(ExitCode::from(1));
            }
        }
        Ok(ExitCode::SUCCESS)
    }

    pub(crate) fn cat(&self, unit: &str) -> anyhow::Result<ExitCode> {
        print!("{}", self.rt.block_on(self.client.cat(unit))?);
        Ok(ExitCode::SUCCESS)
    }

    pub(crate) fn list_units(&self, output: Output) -> anyhow::Result<ExitCode> {
        let units: Vec<UnitStatus> =
            self.rt.block_on(self.client.units())?.into_iter().filter(|u| u.desired != Desired::Inactive).collect();
        if output.json(&units)? {
            return Ok(ExitCode::SUCCESS);
        }
        let mut rows = Vec::new();
        // Units the engine placed nowhere, by the reason's summary (the same reason for many units is one line).
        let mut unplaced: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for u in &units {
            if u.machines.is_empty() {
                let state = if u.unplaced.is_some() { "unplaced" } else { "-" };
                rows.push(vec![u.name.clone(), "-".into(), state.into(), u.desired.to_string(), "-".into()]);
                if let Some(why) = &u.unplaced {
                    unplaced.entry(why.summary.as_str()).or_default().push(u.name.as_str());
                }
            }
            for p in &u.machines {
                let state = p.state.map_or("-".to_owned(), |s| s.to_string());
                rows.push(vec![u.name.clone(), p.machine.clone(), state, u.desired.to_string(), since(p.since_ms)]);
            }
        }
        print!("{}", table::render(&["UNIT", "MACHINE", "ACTIVE", "DESIRED", "SINCE"], &rows));
        for (why, names) in &unplaced {
            const SHOWN: usize = 5;
            let mut list = names.iter().take(SHOWN).copied().collect::<Vec<_>>().join(", ");
            if names.len() > SHOWN {
                list.push_str(&format!(" and {} more", names.len() - SHOWN));
            }
            println!("unplaced: {list}: {why}");
        }
        if !unplaced.is_empty() {
            println!("each machine's reason: herdctl status UNIT");
        }
        Ok(ExitCode::SUCCESS)
    }

    pub(crate) fn list_unit_files(&self, output: Output) -> anyhow::Result<ExitCode> {
        let units = self.rt.block_on(self.client.units())?;
        if output == Output::Json {
            let v: Vec<serde_json::Value> = units
                .iter()
                .map(|u| {
                    serde_json::json!({
                        "name": u.name, "hash": digest(&u.text), "desired": u.desired, "placed": u.machines.len(),
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(ExitCode::SUCCESS);
        }
        let rows: Vec<Vec<String>> = units
            .iter()
            .map(|u| vec![u.name.clone(), digest(&u.text), u.desired.to_string(), u.machines.len().to_string()])
            .collect();
        print!("{}", table::render(&["UNIT", "HASH", "DESIRED", "PLACED"], &rows));
        Ok(ExitCode::SUCCESS)
    }

    pub(crate) fn list_machines(&self, output: Output) -> anyhow::Result<ExitCode> {
        let machines = self.rt.block_on(self.client.machines())?;
        if output.json(&machines)? {
            return Ok(ExitCode::SUCCESS);
        }
        let rows: Vec<Vec<String>> = machines
            .iter()
            .map(|m| {
                let r = &m.record;
                let status = match &m.cordon {
                    Some(c) if c.drain => "draining",
                    Some(_) => "cordoned",
                    None => "ready",
                };
                let status = if m.engine_leader { format!("{status}, leader") } else { status.to_owned() };
                let labels = r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
                vec![
                    r.id.clone(),
                    r.address.clone().unwrap_or_else(|| "-".into()),
                    r.rack.clone().unwrap_or_else(|| "-".into()),
                    m.units.to_string(),
                    format!("{}m", r.cpu_millis),
                    format!("{}Mi", r.memory >> 20),
                    status,
                    labels,
                ]
            })
            .collect();
        print!(
            "{}",
            table::render(&["MACHINE", "ADDRESS", "RACK", "UNITS", "CPU", "MEMORY", "STATUS", "LABELS"], &rows)
        );
        Ok(ExitCode::SUCCESS)
    }

    /// The address of a machine by id.
    fn address_of(&self, machine: &str) -> anyhow::Result<String> {
        let machines = self.rt.block_on(self.client.machines())?;
        let m = machines
            .iter()
            .find(|m| m.record.id == machine)
            .with_context(|| format!("machine {machine} is not registered; see herdctl list-machines"))?;
        m.record.address.clone().with_context(|| format!("machine {machine} registered no address to reach it at"))
    }

    /// The machine running a unit, and the unit.
    /// Why the engine placed `unit` nowhere, if it did not.
    fn unplaced(&self, unit: &str) -> anyhow::Result<Option<UnplacedRecord>> {
        let units = self.rt.block_on(self.client.units())?;
        Ok(units.into_iter().find(|u| u.name == unit && u.machines.is_empty()).and_then(|u| u.unplaced))
    }

    fn unit_host(&self, unit: &str) -> anyhow::Result<(String, Unit)> {
        let units = self.rt.block_on(self.client.units())?;
        let u = units
            .iter()
            .find(|u| u.name == unit)
            .with_context(|| format!("unit {unit} not found; see herdctl list-unit-files"))?;
        let Some(p) = u.machines.first() else {
            bail!("{unit} is not placed on any machine (desired: {}); start it first", u.desired);
        };
        Ok((p.machine.clone(), Unit::parse(unit, &u.text)?))
    }

    fn remote(&self, machine: &str, command: &str) -> anyhow::Result<ExitCode> {
        let address = self.address_of(machine)?;
        let (user, host, port) = ssh::parse_target(&address, &self.login);
        let session = ssh::connect(&host, port, &user, self.login.identity.as_deref())?;
        let status = ssh::run(&session, command)?;
        Ok(ExitCode::from(u8::try_from(status.clamp(0, 255)).unwrap_or(1)))
    }

    pub(crate) fn status(&self, unit: &str) -> anyhow::Result<ExitCode> {
        if let Some(why) = self.unplaced(unit)? {
            println!("{unit}: unplaced: {}", why.summary);
            for r in &why.machines {
                println!("  {}: {}", r.machine, r.reason);
            }
            if why.more > 0 {
                println!("  and {} more machines", why.more);
            }
            // As systemctl status answers for a unit that is not running.
            return Ok(ExitCode::from(3));
        }
        let (machine, u) = self.unit_host(unit)?;
        let command = if u.container.is_some() {
            let name = container_name(&u.name);
            format!(
                "docker ps -a --no-trunc --filter name=^{name}$ && docker inspect --format '{{{{json .State}}}}' {name}"
            )
        } else {
            format!("systemctl status --no-pager --full {}", u.name)
        };
        self.remote(&machine, &command)
    }

    pub(crate) fn journal(&self, unit: &str, lines: u32, follow: bool) -> anyhow::Result<ExitCode> {
        let (machine, u) = self.unit_host(unit)?;
        let f = if follow { " -f" } else { "" };
        let command = if u.container.is_some() {
            format!("docker logs --tail {lines}{f} {}", container_name(&u.name))
        } else {
            format!("journalctl --no-pager -n {lines}{f} -u {}", u.name)
        };
        self.remote(&machine, &command)
    }

    pub(crate) fn ssh(&self, target: &str, unit: bool, command: &[String]) -> anyhow::Result<ExitCode> {
        let machine = if unit { self.unit_host(target)?.0 } else { target.to_owned() };
        self.remote(&machine, &ssh::shell_quote(command))
    }

    pub(crate) fn cordon(&self, machine: &str, drain: bool) -> anyhow::Result<ExitCode> {
        self.rt.block_on(self.client.cordon(machine, drain))?;
        println!("{machine}: {}", if drain { "draining" } else { "cordoned" });
        Ok(ExitCode::SUCCESS)
    }

    pub(crate) fn uncordon(&self, machine: &str) -> anyhow::Result<ExitCode> {
        let was = self.rt.block_on(self.client.uncordon(machine))?;
        println!("{machine}: {}", if was { "schedulable" } else { "was not cordoned" });
        Ok(ExitCode::SUCCESS)
    }

    /// Cordons with drain and waits until nothing is scheduled on the machine and what left runs elsewhere.
    pub(crate) fn drain(&self, machine: &str, no_block: bool, timeout: u64) -> anyhow::Result<ExitCode> {
        let before = self.rt.block_on(self.client.units())?;
        let moving: Vec<String> = before
            .iter()
            .filter(|u| u.machines.iter().any(|p| p.machine == machine))
            .filter(|u| !is_global(u))
            .map(|u| u.name.clone())
            .collect();
        self.cordon(machine, true)?;
        if no_block || moving.is_empty() {
            return Ok(ExitCode::SUCCESS);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(timeout);
        loop {
            let units = self.rt.block_on(self.client.units())?;
            let pending: Vec<&UnitStatus> = units
                .iter()
                .filter(|u| moving.contains(&u.name))
                .filter(|u| {
                    u.machines.iter().any(|p| p.machine == machine)
                        || !herd_cluster::client::reached(Some(u), Some(u.desired))
                })
                .collect();
            if pending.is_empty() {
                for u in units.iter().filter(|u| moving.contains(&u.name)) {
                    println!("{}", describe(&u.name, Some(u)));
                }
                return Ok(ExitCode::SUCCESS);
            }
            if std::time::Instant::now() >= deadline {
                let names = pending.iter().map(|u| u.name.as_str()).collect::<Vec<_>>().join(", ");
                eprintln!("herdctl: timed out draining {machine}: still moving {names}");
                return Ok(ExitCode::from(1));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub(crate) fn prewarm_add(&self, images: &[String]) -> anyhow::Result<ExitCode> {
        for i in images {
            self.rt.block_on(self.client.prewarm_add(i))?;
            println!("{i}: added to the pre-warm list");
        }
        Ok(ExitCode::SUCCESS)
    }

    pub(crate) fn prewarm_remove(&self, images: &[String]) -> anyhow::Result<ExitCode> {
        for i in images {
            let was = self.rt.block_on(self.client.prewarm_remove(i))?;
            println!("{i}: {}", if was { "removed" } else { "was not listed" });
        }
        Ok(ExitCode::SUCCESS)
    }

    pub(crate) fn prewarm_list(&self, output: Output) -> anyhow::Result<ExitCode> {
        let list = self.rt.block_on(self.client.prewarm_list())?;
        if output == Output::Json {
            println!("{}", serde_json::to_string_pretty(&list)?);
        } else {
            for i in list {
                println!("{i}");
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

fn is_global(u: &UnitStatus) -> bool {
    Unit::parse(&u.name, &u.text).is_ok_and(|u| u.placement.global)
}

/// One line per unit after a blocking command: where it is and in what state.
fn describe(name: &str, unit: Option<&UnitStatus>) -> String {
    let Some(u) = unit else { return format!("{name}: destroyed") };
    if u.machines.is_empty() {
        return match u.desired {
            Desired::Inactive => format!("{name}: inactive"),
            d => match &u.unplaced {
                Some(why) => format!("{name}: {d}, not placed: {} (herdctl status {name})", why.summary),
                None => format!("{name}: {d}, not placed on any machine yet"),
            },
        };
    }
    let places: Vec<String> = u
        .machines
        .iter()
        .map(|p| {
            let state = p.state.map_or("pending".to_owned(), |s| s.to_string());
            match &p.detail {
                Some(d) => format!("{} ({state}: {d})", p.machine),
                None => format!("{} ({state})", p.machine),
            }
        })
        .collect();
    format!("{name}: {} on {}", u.desired, places.join(", "))
}

impl Cluster {
    /// Submits `text` as `name` (replacing a different one), starts it and waits until it is active.
    pub(crate) fn launch(&self, name: &str, text: &str, within: Duration) -> anyhow::Result<()> {
        let waited = self.rt.block_on(async {
            self.client.submit(name, text, true).await?;
            self.client.set_desired(name, Desired::Launched).await?;
            self.client.wait(&[name.to_owned()], Some(Desired::Launched), within).await
        });
        if let Err(e) = waited {
            let units = self.rt.block_on(self.client.units()).unwrap_or_default();
            bail!("{e}; now {}", describe(name, units.iter().find(|u| u.name == name)));
        }
        Ok(())
    }

    /// Adds `image` to the cluster-wide pre-warm list.
    pub(crate) fn prewarm(&self, image: &str) -> anyhow::Result<()> {
        Ok(self.rt.block_on(self.client.prewarm_add(image))?)
    }

    /// Whether `machine` has `image` in its Docker Engine (asked over SSH).
    pub(crate) fn has_image(&self, machine: &str, image: &str) -> anyhow::Result<bool> {
        let address = self.address_of(machine)?;
        let (user, host, port) = ssh::parse_target(&address, &self.login);
        let session = ssh::connect(&host, port, &user, self.login.identity.as_deref())?;
        let command = format!("docker image inspect --format . {}", ssh::shell_quote(&[image.to_owned()]));
        Ok(ssh::run_quiet(&session, &command)? == 0)
    }

    /// The machine `unit` is placed on.
    pub(crate) fn placed_on(&self, unit: &str) -> anyhow::Result<String> {
        let units = self.rt.block_on(self.client.units())?;
        let u = units.iter().find(|u| u.name == unit).with_context(|| format!("{unit} is not submitted"))?;
        u.machines.first().map(|p| p.machine.clone()).with_context(|| format!("{unit} is not placed"))
    }
}
