//! The engine's planner alone: 50,000 units onto 5,000 machines, from nothing and from a settled cluster (the
//! steady-state round the engine runs on every change). Prints the medians.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use herd_cluster::plan::{MachineView, Snapshot, plan};
use herd_cluster::unit::Unit;

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn main() {
    let machines: Vec<MachineView> = (0..5_000)
        .map(|i| MachineView {
            id: format!("hollow-{i:05}"),
            labels: BTreeMap::new(),
            cpu_millis: 64_000,
            memory: 256 << 30,
            rack: Some(format!("r{:03}", i % 125)),
            schedulable: true,
            draining: false,
            reserved: BTreeMap::new(),
        })
        .collect();
    let text = "[Service]\nExecStart=/bin/true\n[X-Fleet]\nCPU=10m\n";
    let units: Vec<Unit> = (0..50_000).map(|i| Unit::parse(&format!("job@{i}.service"), text).unwrap()).collect();
    let mut snapshot = Snapshot { machines, units, current: BTreeMap::new() };
    let mut cold = Vec::new();
    let mut first = None;
    for _ in 0..5 {
        let t = Instant::now();
        let p = plan(&snapshot);
        cold.push(t.elapsed());
        first = Some(p);
    }
    let p = first.unwrap();
    assert_eq!(p.placements.len(), 50_000);
    snapshot.current = p.placements.iter().map(|(u, m)| (u.clone(), m[0].clone())).collect();
    let mut warm = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let again = plan(&snapshot);
        warm.push(t.elapsed());
        assert_eq!(again.placements, p.placements, "a settled cluster plans to itself");
    }
    let cold = median(cold);
    println!(
        "plan: 50,000 units onto 5,000 machines from scratch: {:.0} ms ({:.0} units/s); settled round: {:.0} ms",
        cold.as_secs_f64() * 1e3,
        50_000.0 / cold.as_secs_f64(),
        median(warm).as_secs_f64() * 1e3
    );
}
