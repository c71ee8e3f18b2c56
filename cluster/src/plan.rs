//! The engine's planner: a pure function from a snapshot (machines, desired units, where units run now) to a plan
//! (where every unit should run). No I/O: the executor writes the plan to the per-machine schedule keys.
//!
//! Order of decisions, fleet's semantics plus herd's resources:
//! 1. A unit keeps its machine while that machine still fits it (a machine joining causes no churn; one leaving
//!    moves exactly its units).
//! 2. Hard constraints: `MachineID`, `MachineMetadata` (OR within a key, AND across keys), `MachineOf` (with the
//!    units it names), `Conflicts` (both ways), CPU and memory capacity.
//! 3. `Replaces` (fleet's rule): a unit takes the machine of a unit it replaces when it fits there once that unit
//!    is gone; the replaced unit moves to another machine (or, if none fits, is reported unplaced), and never runs
//!    on a machine where a unit that replaces it runs.
//! 4. Spread: the machine with the fewest units, then the rack with the fewest units of the same prefix, then the
//!    machine id (deterministic).
//!
//! `Global` units go to every schedulable machine that satisfies their constraints.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::record::{Refused, UnplacedRecord};
use crate::unit::{Unit, UnitName};

/// A machine as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineView {
    /// Machine id.
    pub id: String,
    /// Labels (for `MachineMetadata`).
    pub labels: BTreeMap<String, String>,
    /// CPU capacity, millicores.
    pub cpu_millis: u64,
    /// Memory capacity, bytes.
    pub memory: u64,
    /// Rack, for spreading.
    pub rack: Option<String>,
    /// False while cordoned or suspect: nothing new lands here (what runs stays).
    pub schedulable: bool,
    /// Being drained: what runs here moves away (implies not schedulable).
    pub draining: bool,
    /// Capacity reserved per role (Mesos-style): (millicores, bytes) only units of that role may use; the rest of
    /// the capacity is open to every unit.
    pub reserved: BTreeMap<String, (u64, u64)>,
}

/// What the planner starts from.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Live machines.
    pub machines: Vec<MachineView>,
    /// Units that should run.
    pub units: Vec<Unit>,
    /// Where units run now (non-global units: one machine each).
    pub current: BTreeMap<UnitName, String>,
}

/// The planner's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Unit → machines it runs on (one for ordinary units, several for global ones).
    pub placements: BTreeMap<UnitName, Vec<String>>,
    /// Units that fit nowhere, with each machine's reason.
    pub unplaced: BTreeMap<UnitName, UnplacedRecord>,
}

impl Plan {
    /// The machine an ordinary unit runs on.
    pub fn machine_of(&self, unit: &str) -> Option<&str> {
        self.placements.iter().find(|(n, _)| n.as_str() == unit).and_then(|(_, m)| m.first()).map(String::as_str)
    }
}

/// How many of the least-loaded fitting machines the spread step compares (by rack spread) for one unit: enough
/// to spread over racks, few enough that placing 50,000 units on 5,000 machines stays fast.
const SPREAD_CANDIDATES: usize = 32;

/// A stable pseudo-random order of machine ids (FNV-1a), so equally loaded machines are tried rack-interleaved,
/// not in id order.
fn scatter(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Running totals while planning.
struct Load<'a> {
    units: HashMap<&'a str, Vec<&'a Unit>>,
    /// (millicores, bytes) used per machine and role ("" for units without a role).
    usage: HashMap<&'a str, HashMap<&'a str, (u64, u64)>>,
    /// Schedulable machines by (units placed, scatter, id): the least-loaded first.
    order: BTreeSet<(usize, u64, &'a str)>,
    schedulable: HashMap<&'a str, u64>,
    rack: HashMap<&'a str, &'a str>,
    /// Units per (rack, unit prefix), for rack-aware spread.
    rack_prefix: HashMap<(&'a str, &'a str), usize>,
}

impl<'a> Load<'a> {
    fn new(machines: &'a [MachineView]) -> Load<'a> {
        let mut load = Load {
            units: HashMap::new(),
            usage: HashMap::new(),
            order: BTreeSet::new(),
            schedulable: HashMap::new(),
            rack: HashMap::new(),
            rack_prefix: HashMap::new(),
        };
        for m in machines {
            if let Some(r) = &m.rack {
                load.rack.insert(m.id.as_str(), r.as_str());
            }
            if m.schedulable {
                let h = scatter(&m.id);
                load.schedulable.insert(m.id.as_str(), h);
                load.order.insert((0, h, m.id.as_str()));
            }
        }
        load
    }

    fn reorder(&mut self, machine: &'a str, before: usize) {
        if let Some(&h) = self.schedulable.get(machine) {
            self.order.remove(&(before, h, machine));
            self.order.insert((self.count(machine), h, machine));
        }
    }

    fn add(&mut self, machine: &'a str, unit: &'a Unit) {
        let before = self.count(machine);
        self.units.entry(machine).or_default().push(unit);
        let used =
            self.usage.entry(machine).or_default().entry(unit.placement.role.as_deref().unwrap_or("")).or_default();
        used.0 += unit.placement.cpu_millis;
        used.1 += unit.placement.memory;
        if let Some(&rack) = self.rack.get(machine) {
            *self.rack_prefix.entry((rack, unit.name.prefix())).or_default() += 1;
        }
        self.reorder(machine, before);
    }

    fn remove(&mut self, machine: &'a str, unit: &'a Unit) {
        let before = self.count(machine);
        if let Some(list) = self.units.get_mut(machine) {
            list.retain(|u| u.name != unit.name);
        }
        if let Some(used) =
            self.usage.get_mut(machine).and_then(|r| r.get_mut(unit.placement.role.as_deref().unwrap_or("")))
        {
            used.0 = used.0.saturating_sub(unit.placement.cpu_millis);
            used.1 = used.1.saturating_sub(unit.placement.memory);
        }
        if let Some(&rack) = self.rack.get(machine)
            && let Some(n) = self.rack_prefix.get_mut(&(rack, unit.name.prefix()))
        {
            *n = n.saturating_sub(1);
        }
        self.reorder(machine, before);
    }

    fn count(&self, machine: &str) -> usize {
        self.units.get(machine).map_or(0, Vec::len)
    }

    fn same_prefix_in_rack(&self, machine: &str, prefix: &str) -> usize {
        self.rack.get(machine).and_then(|r| self.rack_prefix.get(&(*r, prefix))).copied().unwrap_or(0)
    }
}

/// The best machine for `unit`: hard constraints, then the least-loaded, then the rack with the fewest units of
/// the same prefix.
fn pick<'a>(
    unit: &Unit,
    machines: &HashMap<&str, &'a MachineView>,
    load: &Load<'a>,
    placed: &HashMap<&str, &str>,
) -> Option<&'a str> {
    let fits = |m: &MachineView| m.schedulable && refusal(unit, m, load, placed).is_none();
    // Pinned units have one possible machine: look it up instead of scanning.
    let pinned = unit
        .placement
        .machine_id
        .as_deref()
        .or_else(|| unit.placement.machine_of.first().and_then(|peer| placed.get(peer.as_str()).copied()));
    if let Some(id) = pinned {
        let m = machines.get(id)?;
        return fits(m).then_some(m.id.as_str());
    }
    if !unit.placement.machine_of.is_empty() {
        return None;
    }
    let mut best: Option<(usize, &'a str)> = None;
    let mut tier = None;
    let mut seen = 0;
    for &(count, _, id) in &load.order {
        if tier.is_some_and(|t| count > t) || seen >= SPREAD_CANDIDATES {
            break;
        }
        let m = machines[id];
        if refusal(unit, m, load, placed).is_some() {
            continue;
        }
        tier = Some(count);
        seen += 1;
        let key = (load.same_prefix_in_rack(id, unit.name.prefix()), m.id.as_str());
        if best.is_none_or(|b| key < b) {
            best = Some(key);
        }
    }
    best.map(|(_, id)| id)
}

/// Why a machine does not take a unit.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Refusal {
    NotSchedulable,
    MachineId,
    Metadata,
    MachineOf(String),
    Conflict(String),
    ReplacedBy(String),
    Cpu(String),
    Memory(String),
}

impl Refusal {
    /// The reason on one machine.
    fn detail(&self) -> String {
        match self {
            Refusal::NotSchedulable => "not schedulable".into(),
            Refusal::MachineId => "MachineID".into(),
            Refusal::Metadata => "MachineMetadata".into(),
            Refusal::MachineOf(peer) => format!("MachineOf {peer}"),
            Refusal::Conflict(other) => format!("conflicts with {other}"),
            Refusal::ReplacedBy(by) => format!("replaced there by {by}"),
            Refusal::Cpu(why) | Refusal::Memory(why) => why.clone(),
        }
    }

    /// The same reason on many machines, for the summary.
    fn kind(&self) -> String {
        match self {
            Refusal::NotSchedulable => "not schedulable".into(),
            Refusal::MachineId => "not its MachineID".into(),
            Refusal::Metadata => "MachineMetadata does not match".into(),
            Refusal::MachineOf(peer) => format!("{peer} is not there"),
            Refusal::Conflict(_) => "a conflicting unit there".into(),
            Refusal::ReplacedBy(by) => format!("replaced there by {by}"),
            Refusal::Cpu(_) => "not enough CPU".into(),
            Refusal::Memory(_) => "not enough memory".into(),
        }
    }
}

/// Each machine's reason, and a summary by kind (`not enough CPU on 2, a conflicting unit there on 1 of 3
/// machines`).
fn unplaced(reasons: Vec<(&str, Refusal)>, machines: usize) -> UnplacedRecord {
    if machines == 0 {
        return UnplacedRecord { summary: "no machines".into(), ..UnplacedRecord::default() };
    }
    let mut kinds: Vec<(String, usize)> = Vec::new();
    for (_, r) in &reasons {
        let kind = r.kind();
        match kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => kinds.push((kind, 1)),
        }
    }
    kinds.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    let counts: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} on {n}")).collect();
    let noun = if machines == 1 { "machine" } else { "machines" };
    let more = reasons.len().saturating_sub(UnplacedRecord::MACHINES);
    let list = reasons
        .into_iter()
        .take(UnplacedRecord::MACHINES)
        .map(|(m, r)| Refused { machine: m.to_owned(), reason: r.detail() })
        .collect();
    UnplacedRecord { summary: format!("{} of {machines} {noun}", counts.join(", ")), machines: list, more }
}

/// Why `unit` cannot go to `m` (None: it can).
fn refusal(unit: &Unit, m: &MachineView, load: &Load<'_>, placed: &HashMap<&str, &str>) -> Option<Refusal> {
    let p = &unit.placement;
    if p.machine_id.as_deref().is_some_and(|id| id != m.id) {
        return Some(Refusal::MachineId);
    }
    if !p.metadata_matches(&m.labels) {
        return Some(Refusal::Metadata);
    }
    for peer in &p.machine_of {
        if placed.get(peer.as_str()) != Some(&m.id.as_str()) {
            return Some(Refusal::MachineOf(peer.clone()));
        }
    }
    if let Some(units) = load.units.get(m.id.as_str()) {
        if let Some(other) = units.iter().find(|o| o.name != unit.name && unit.conflicts_with(o)) {
            return Some(Refusal::Conflict(other.name.to_string()));
        }
        if let Some(by) = units.iter().find(|o| o.placement.replaces.iter().any(|r| r == unit.name.as_str())) {
            return Some(Refusal::ReplacedBy(by.name.to_string()));
        }
    }
    if p.cpu_millis > 0 || p.memory > 0 {
        let (cpu, memory) = open_capacity_needed(unit, m, load);
        let reserved_cpu: u64 = m.reserved.values().map(|r| r.0).sum();
        let reserved_memory: u64 = m.reserved.values().map(|r| r.1).sum();
        if p.cpu_millis > 0 && cpu > m.cpu_millis.saturating_sub(reserved_cpu) {
            return Some(Refusal::Cpu(with_role("not enough CPU", unit)));
        }
        if p.memory > 0 && memory > m.memory.saturating_sub(reserved_memory) {
            return Some(Refusal::Memory(with_role("not enough memory", unit)));
        }
    }
    None
}

/// How much of the machine's open (unreserved) capacity would be used with `unit` added: every role's use beyond
/// its reservation, plus everything units without a role use.
fn open_capacity_needed(unit: &Unit, m: &MachineView, load: &Load<'_>) -> (u64, u64) {
    let role = unit.placement.role.as_deref().unwrap_or("");
    let mut usage: HashMap<&str, (u64, u64)> = load.usage.get(m.id.as_str()).cloned().unwrap_or_default();
    let mine = usage.entry(role).or_default();
    mine.0 += unit.placement.cpu_millis;
    mine.1 += unit.placement.memory;
    let mut open = (0, 0);
    for (r, (cpu, memory)) in usage {
        let (rc, rm) = if r.is_empty() { (0, 0) } else { m.reserved.get(r).copied().unwrap_or((0, 0)) };
        open.0 += cpu.saturating_sub(rc);
        open.1 += memory.saturating_sub(rm);
    }
    open
}

fn with_role(why: &str, unit: &Unit) -> String {
    match &unit.placement.role {
        Some(r) => format!("{why} (role {r}: its reservation and the open capacity)"),
        None => format!("{why} (open capacity; reservations are kept for their roles)"),
    }
}

/// Units in an order where every `MachineOf` target comes before the units that follow it.
fn ordered(units: &[Unit]) -> Vec<&Unit> {
    let names: BTreeSet<&str> = units.iter().map(|u| u.name.as_str()).collect();
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let mut out = Vec::with_capacity(units.len());
    let mut rest: Vec<&Unit> = units.iter().collect();
    // Pinned units first, then the rest as their MachineOf targets are placed; cycles fall out at the end.
    rest.sort_by_key(|u| (u.placement.machine_id.is_none(), u.name.as_str()));
    while !rest.is_empty() {
        let before = rest.len();
        rest.retain(|u| {
            let ready = u.placement.machine_of.iter().all(|t| done.contains(t.as_str()) || !names.contains(t.as_str()));
            if ready {
                done.insert(u.name.as_str());
                out.push(*u);
            }
            !ready
        });
        if rest.len() == before {
            out.append(&mut rest);
        }
    }
    out
}

/// Computes where every unit should run.
pub fn plan(snapshot: &Snapshot) -> Plan {
    let machines: HashMap<&str, &MachineView> = snapshot.machines.iter().map(|m| (m.id.as_str(), m)).collect();
    let by_name: HashMap<&str, &Unit> = snapshot.units.iter().map(|u| (u.name.as_str(), u)).collect();
    let mut load = Load::new(&snapshot.machines);
    let mut placed: HashMap<&str, &str> = HashMap::new();
    let mut out = Plan::default();
    let units = ordered(&snapshot.units);

    // Global units: every machine that fits.
    for unit in units.iter().filter(|u| u.placement.global) {
        let targets: Vec<&str> = snapshot
            .machines
            .iter()
            .filter(|m| m.schedulable && refusal(unit, m, &load, &placed).is_none())
            .map(|m| m.id.as_str())
            .collect();
        for t in &targets {
            load.add(t, unit);
        }
        out.placements.insert(unit.name.clone(), targets.iter().map(|t| (*t).to_owned()).collect());
    }

    // Stay where they are while that still fits, and while no unit that replaces them runs there.
    let mut replaced_on: HashMap<&str, Vec<&str>> = HashMap::new();
    for u in units.iter().filter(|u| !u.placement.replaces.is_empty()) {
        if let Some(on) = snapshot.current.get(&u.name) {
            for r in &u.placement.replaces {
                replaced_on.entry(r.as_str()).or_default().push(on.as_str());
            }
        }
    }
    let mut pending = Vec::new();
    for unit in units.iter().filter(|u| !u.placement.global) {
        let keep = snapshot
            .current
            .get(&unit.name)
            .and_then(|id| machines.get(id.as_str()))
            .filter(|m| !replaced_on.get(unit.name.as_str()).is_some_and(|on| on.contains(&m.id.as_str())))
            .filter(|m| !m.draining && refusal(unit, m, &load, &placed).is_none());
        match keep {
            Some(m) => {
                load.add(m.id.as_str(), unit);
                placed.insert(unit.name.as_str(), m.id.as_str());
            }
            None => pending.push(*unit),
        }
    }

    // Place the others: on the machine of a unit they replace (which then moves), else by spread.
    let mut queue: std::collections::VecDeque<&Unit> = pending.into();
    let mut evictions = 0usize;
    while let Some(unit) = queue.pop_front() {
        let victim = unit.placement.replaces.iter().find_map(|r| {
            let on = *placed.get(r.as_str())?;
            Some((on, *by_name.get(r.as_str())?))
        });
        // Bounded: units replacing each other in a cycle stop displacing after one round each.
        if let Some((on, victim)) = victim
            && evictions < snapshot.units.len()
        {
            evictions += 1;
            load.remove(on, victim);
            placed.remove(victim.name.as_str());
            if machines[on].schedulable && refusal(unit, machines[on], &load, &placed).is_none() {
                load.add(on, unit);
                placed.insert(unit.name.as_str(), on);
                queue.push_back(victim);
                continue;
            }
            load.add(on, victim);
            placed.insert(victim.name.as_str(), on);
        }
        if let Some(id) = pick(unit, &machines, &load, &placed) {
            load.add(id, unit);
            placed.insert(unit.name.as_str(), id);
            continue;
        }
        let reasons = snapshot
            .machines
            .iter()
            .filter_map(|m| {
                let r = if m.schedulable { refusal(unit, m, &load, &placed)? } else { Refusal::NotSchedulable };
                Some((m.id.as_str(), r))
            })
            .collect();
        out.unplaced.insert(unit.name.clone(), unplaced(reasons, snapshot.machines.len()));
    }
    for (unit, machine) in placed {
        if let Some(u) = by_name.get(unit) {
            out.placements.insert(u.name.clone(), vec![machine.to_owned()]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(id: &str, rack: &str, labels: &[(&str, &str)]) -> MachineView {
        MachineView {
            id: id.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            cpu_millis: 4000,
            memory: 8 << 30,
            rack: Some(rack.into()),
            schedulable: true,
            draining: false,
            reserved: BTreeMap::new(),
        }
    }

    fn unit(name: &str, xfleet: &str) -> Unit {
        Unit::parse(name, &format!("[Service]\nExecStart=/bin/true\n[X-Fleet]\n{xfleet}")).unwrap()
    }

    fn three() -> Vec<MachineView> {
        vec![
            machine("m1", "r1", &[("hostname", "m1"), ("disk", "ssd")]),
            machine("m2", "r1", &[("hostname", "m2")]),
            machine("m3", "r2", &[("hostname", "m3"), ("disk", "ssd")]),
        ]
    }

    #[test]
    fn five_mutually_conflicting_units_on_three_machines_place_three_on_distinct_machines() {
        let units: Vec<Unit> = (1..=5).map(|i| unit(&format!("db@{i}.service"), "Conflicts=db@*.service\n")).collect();
        let p = plan(&Snapshot { machines: three(), units, current: BTreeMap::new() });
        let used: BTreeSet<&String> = p.placements.values().flatten().collect();
        assert_eq!(p.placements.len(), 3);
        assert_eq!(used.len(), 3);
        assert_eq!(p.unplaced.len(), 2);
        assert!(p.unplaced.values().all(|why| why.to_string().contains("conflicts with")), "{:?}", p.unplaced);
        let why = p.unplaced.values().next().unwrap();
        assert_eq!(why.summary, "a conflicting unit there on 3 of 3 machines");
        assert_eq!(why.machines.len(), 3);
    }

    #[test]
    fn a_one_way_conflict_keeps_both_apart() {
        let machines = vec![machine("m1", "r1", &[]), machine("m2", "r1", &[])];
        let units = vec![unit("a.service", "Conflicts=b.service\n"), unit("b.service", "")];
        let p = plan(&Snapshot { machines, units, current: BTreeMap::new() });
        assert_ne!(p.machine_of("a.service"), p.machine_of("b.service"));
    }

    #[test]
    fn machine_of_co_locates_and_machine_id_pins() {
        let units =
            vec![unit("follower.service", "MachineOf=leader.service\n"), unit("leader.service", "MachineID=m3\n")];
        let p = plan(&Snapshot { machines: three(), units, current: BTreeMap::new() });
        assert_eq!(p.machine_of("leader.service"), Some("m3"));
        assert_eq!(p.machine_of("follower.service"), Some("m3"));
    }

    #[test]
    fn global_units_run_on_every_matching_machine() {
        let units = vec![unit("agent.service", "Global=true\nMachineMetadata=disk=ssd\n")];
        let p = plan(&Snapshot { machines: three(), units, current: BTreeMap::new() });
        assert_eq!(p.placements.values().next().unwrap(), &["m1", "m3"]);
    }

    #[test]
    fn template_instances_route_by_hostname_metadata() {
        let template = "MachineMetadata=hostname=%i\n";
        let units: Vec<Unit> = ["m2", "m3"]
            .iter()
            .map(|h| {
                Unit::parse(
                    &format!("web@{h}.service"),
                    &format!("[Service]\nExecStart=/bin/true\n[X-Fleet]\n{template}"),
                )
                .unwrap()
            })
            .collect();
        let p = plan(&Snapshot { machines: three(), units, current: BTreeMap::new() });
        assert_eq!(p.machine_of("web@m2.service"), Some("m2"));
        assert_eq!(p.machine_of("web@m3.service"), Some("m3"));
    }

    #[test]
    fn a_joining_machine_causes_no_churn_and_a_leaving_one_moves_exactly_its_units() {
        let units: Vec<Unit> = (1..=6).map(|i| unit(&format!("w{i}.service"), "")).collect();
        let first = plan(&Snapshot { machines: three(), units: units.clone(), current: BTreeMap::new() });
        let current: BTreeMap<UnitName, String> =
            first.placements.iter().map(|(u, m)| (u.clone(), m[0].clone())).collect();
        let mut more = three();
        more.push(machine("m4", "r2", &[]));
        let joined = plan(&Snapshot { machines: more, units: units.clone(), current: current.clone() });
        assert_eq!(joined.placements, first.placements, "a new machine moves nothing");
        let fewer: Vec<MachineView> = three().into_iter().filter(|m| m.id != "m2").collect();
        let left = plan(&Snapshot { machines: fewer, units, current: current.clone() });
        for (unit, machines) in &left.placements {
            let before = &current[unit];
            if before == "m2" {
                assert_ne!(machines[0], "m2");
            } else {
                assert_eq!(&machines[0], before, "{unit} must not move");
            }
        }
        assert!(left.unplaced.is_empty());
    }

    #[test]
    fn resources_are_respected_and_spread_prefers_the_least_loaded() {
        let units: Vec<Unit> = (1..=4).map(|i| unit(&format!("big{i}.service"), "CPU=3\n")).collect();
        let p = plan(&Snapshot { machines: three(), units, current: BTreeMap::new() });
        assert_eq!(p.placements.len(), 3, "each machine holds one 3-core unit");
        let why = p.unplaced.values().next().unwrap();
        assert_eq!(why.summary, "not enough CPU on 3 of 3 machines");
        assert!(why.machines.iter().all(|r| r.reason.starts_with("not enough CPU (open capacity")), "{why:?}");
    }

    #[test]
    fn replaces_takes_the_machine_and_moves_the_replaced_unit() {
        let machines = vec![machine("m1", "r1", &[]), machine("m2", "r1", &[])];
        let old = unit("old.service", "MachineID=m1\n");
        let new = unit("new.service", "MachineID=m1\nReplaces=old.service\nConflicts=old.service\n");
        let mut current = BTreeMap::new();
        current.insert(old.name.clone(), "m1".to_owned());
        let p = plan(&Snapshot { machines, units: vec![old, new], current });
        assert_eq!(p.machine_of("new.service"), Some("m1"));
        // old.service is pinned to m1 too, so it has nowhere to go: it is reported, not run twice.
        assert!(p.unplaced.contains_key(&"old.service".parse::<UnitName>().unwrap()));
    }

    #[test]
    fn a_unit_that_replaces_another_takes_its_machine_and_the_replaced_one_moves_for_good() {
        let units: Vec<Unit> = (0..3).map(|i| unit(&format!("r.{i}.service"), "")).collect();
        let first = plan(&Snapshot { machines: three(), units: units.clone(), current: BTreeMap::new() });
        let current: BTreeMap<UnitName, String> =
            first.placements.iter().map(|(u, m)| (u.clone(), m[0].clone())).collect();
        let r0 = first.machine_of("r.0.service").unwrap().to_owned();
        let mut with_new = units.clone();
        with_new.push(unit("new.service", "Replaces=r.0.service\n"));
        let p = plan(&Snapshot { machines: three(), units: with_new.clone(), current });
        assert_eq!(p.machine_of("new.service"), Some(r0.as_str()), "new.service takes r.0's machine");
        let moved = p.machine_of("r.0.service").unwrap();
        assert_ne!(moved, r0, "r.0 moves off it");
        for u in ["r.1.service", "r.2.service"] {
            assert_eq!(p.machine_of(u), first.machine_of(u), "{u} stays");
        }
        // The next round starts from there and changes nothing; from the old layout with new.service already on
        // r.0's machine, r.0 still leaves it.
        let current: BTreeMap<UnitName, String> = p.placements.iter().map(|(u, m)| (u.clone(), m[0].clone())).collect();
        let again = plan(&Snapshot { machines: three(), units: with_new.clone(), current: current.clone() });
        assert_eq!(again.placements, p.placements);
        let mut both_there = current;
        both_there.insert("r.0.service".parse().unwrap(), r0.clone());
        let p = plan(&Snapshot { machines: three(), units: with_new, current: both_there });
        assert_eq!(p.machine_of("new.service"), Some(r0.as_str()));
        assert_ne!(p.machine_of("r.0.service"), Some(r0.as_str()));
    }

    #[test]
    fn a_replaced_unit_with_nowhere_else_to_go_is_unplaced_with_the_reason() {
        let machines = vec![machine("m1", "r1", &[])];
        let units = vec![unit("old.service", ""), unit("new.service", "Replaces=old.service\n")];
        let mut current = BTreeMap::new();
        current.insert(units[0].name.clone(), "m1".to_owned());
        let p = plan(&Snapshot { machines, units, current });
        assert_eq!(p.machine_of("new.service"), Some("m1"));
        let why = &p.unplaced[&"old.service".parse::<UnitName>().unwrap()];
        assert_eq!(why.summary, "replaced there by new.service on 1 of 1 machine");
    }

    #[test]
    fn an_unplaced_summary_counts_each_reason_and_keeps_the_first_machines_reasons() {
        let machines: Vec<MachineView> = (0..40)
            .map(|i| machine(&format!("m{i:02}"), "r1", if i < 30 { &[("disk", "ssd")] } else { &[] }))
            .collect();
        let units = vec![unit("big.service", "CPU=100\nMachineMetadata=disk=ssd\n")];
        let p = plan(&Snapshot { machines, units, current: BTreeMap::new() });
        let why = p.unplaced.values().next().unwrap();
        assert_eq!(why.summary, "not enough CPU on 30, MachineMetadata does not match on 10 of 40 machines");
        assert_eq!((why.machines.len(), why.more), (UnplacedRecord::MACHINES, 30));
    }

    #[test]
    fn reserved_capacity_is_kept_for_its_role() {
        // One machine, 4 cores, 3 of them reserved for role db.
        let mut m = machine("m1", "r1", &[]);
        m.reserved.insert("db".into(), (3000, 0));
        let web: Vec<Unit> = (1..=2).map(|i| unit(&format!("web{i}.service"), "CPU=1\n")).collect();
        let p = plan(&Snapshot { machines: vec![m.clone()], units: web, current: BTreeMap::new() });
        assert_eq!(p.placements.len(), 1, "units without a role share the one open core");
        assert!(p.unplaced.values().next().unwrap().to_string().contains("open capacity"), "{:?}", p.unplaced);
        let db: Vec<Unit> = (1..=5).map(|i| unit(&format!("db{i}.service"), "CPU=1\nRole=db\n")).collect();
        let p = plan(&Snapshot { machines: vec![m], units: db, current: BTreeMap::new() });
        assert_eq!(p.placements.len(), 4, "db uses its 3 reserved cores and the open one");
        assert!(p.unplaced.values().next().unwrap().to_string().contains("role db"), "{:?}", p.unplaced);
    }

    #[test]
    fn unschedulable_machines_keep_what_they_run_but_get_nothing_new() {
        let mut machines = three();
        machines[0].schedulable = false;
        let units = vec![unit("a.service", "MachineID=m1\n"), unit("b.service", "")];
        let mut current = BTreeMap::new();
        current.insert("a.service".parse().unwrap(), "m1".to_owned());
        let p = plan(&Snapshot { machines, units, current });
        assert_eq!(p.machine_of("a.service"), Some("m1"));
        assert_ne!(p.machine_of("b.service"), Some("m1"));
    }
}
