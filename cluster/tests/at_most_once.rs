//! At most once, under random partitions (issue #28): real etcd, a real engine, and hollow agents whose executor
//! writes every start and stop of every machine into one in-process ledger. Random agents are cut off from etcd and
//! healed at random moments (cuts both shorter and longer than the lease TTL, up to two machines at once) for a
//! bounded time; every start of an at-most-once unit is checked against the ledger: no copy may start while
//! another machine's copy runs. The seed is printed; `HERD_CHAOS_SEED=N` replays a run, `HERD_CHAOS_SECS` sets its
//! length.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Lab, TTL, machine_record, poll, sleeper};
use herd_cluster::exec::{ExecError, Executor};
use herd_cluster::record::{ActiveState, Desired};
use herd_cluster::unit::Unit;
use tokio::time::Instant;

/// What every machine's executor did, in one place: where each unit runs now, and every broken promise.
#[derive(Debug, Default)]
struct Ledger {
    running: BTreeMap<String, BTreeSet<String>>,
    starts: BTreeMap<String, u64>,
    violations: Vec<String>,
}

#[derive(Debug)]
struct LedgerExec {
    machine: String,
    ledger: Arc<Mutex<Ledger>>,
    began: Instant,
}

impl LedgerExec {
    fn stop_here(&self, unit: &Unit) {
        let mut l = self.ledger.lock().unwrap();
        if let Some(on) = l.running.get_mut(unit.name.as_str()) {
            on.remove(&self.machine);
        }
    }
}

impl Executor for LedgerExec {
    async fn pull(&self, _image: &str) -> Result<(), ExecError> {
        Ok(())
    }
    async fn load(&self, _unit: &Unit) -> Result<(), ExecError> {
        Ok(())
    }
    async fn start(&self, unit: &Unit) -> Result<(), ExecError> {
        let mut l = self.ledger.lock().unwrap();
        let name = unit.name.as_str().to_owned();
        let on = l.running.entry(name.clone()).or_default();
        let elsewhere: Vec<String> = on.iter().filter(|m| **m != self.machine).cloned().collect();
        on.insert(self.machine.clone());
        *l.starts.entry(name.clone()).or_default() += 1;
        if unit.placement.at_most_once && !elsewhere.is_empty() {
            let at = self.began.elapsed();
            l.violations.push(format!("{at:?}: {name} started on {} while it runs on {elsewhere:?}", self.machine));
        }
        Ok(())
    }
    async fn stop(&self, unit: &Unit) -> Result<(), ExecError> {
        self.stop_here(unit);
        Ok(())
    }
    async fn unload(&self, unit: &Unit) -> Result<(), ExecError> {
        self.stop_here(unit);
        Ok(())
    }
    async fn state(&self, unit: &Unit) -> ActiveState {
        let l = self.ledger.lock().unwrap();
        let here = l.running.get(unit.name.as_str()).is_some_and(|on| on.contains(&self.machine));
        if here { ActiveState::Active } else { ActiveState::Loaded }
    }
}

/// xorshift64*: a reproducible stream from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo))
    }
}

const MACHINES: usize = 4;
const UNITS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_most_once_units_never_run_twice_while_random_machines_are_cut_off_and_healed() {
    let seed = std::env::var("HERD_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).unwrap();
        u64::from_le_bytes(b) | 1
    });
    let secs = std::env::var("HERD_CHAOS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    eprintln!("chaos: seed {seed} (HERD_CHAOS_SEED={seed} replays it), {secs} s");
    let mut rng = Rng(seed);

    let mut lab = Lab::start("amo-chaos", 1).await;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let began = Instant::now();
    for i in 0..MACHINES {
        let record = machine_record(&format!("m{i}"), &format!("r{}", i % 2), &[]);
        let exec = LedgerExec { machine: record.id.clone(), ledger: ledger.clone(), began };
        let m = lab.spawn_agent(record, Arc::new(exec)).await;
        lab.machines.insert(m.id.clone(), m);
    }
    poll(Duration::from_secs(30), "every machine registered", || async {
        (lab.client.machines().await.ok()?.len() == MACHINES).then_some(())
    })
    .await;
    let names: Vec<String> = (0..UNITS).map(|i| format!("amo{i}.service")).collect();
    for name in &names {
        lab.client.submit(name, &sleeper("AtMostOnce=true\n"), false).await.unwrap();
        lab.client.set_desired(name, Desired::Launched).await.unwrap();
    }
    lab.client.wait(&names, Some(Desired::Launched), Duration::from_secs(30)).await.unwrap();
    let placed: u64 = ledger.lock().unwrap().starts.values().sum();

    // Chaos: each tick, maybe cut a healthy machine (at most two cut at once) for 0.1-3.5 TTLs, and heal those due.
    let ids: Vec<String> = lab.machines.keys().cloned().collect();
    let mut cut_until: BTreeMap<String, Instant> = BTreeMap::new();
    let (mut cuts, mut short) = (0u32, 0u32);
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        let now = Instant::now();
        for (id, until) in cut_until.clone() {
            if until <= now {
                lab.machines[&id].heal();
                cut_until.remove(&id);
            }
        }
        if cut_until.len() < 2 && rng.below(3) == 0 {
            let id = &ids[rng.below(ids.len() as u64) as usize];
            if !cut_until.contains_key(id) {
                let ttl_ms = TTL.as_millis() as u64;
                let length = rng.millis(ttl_ms / 10, ttl_ms * 7 / 2);
                short += u32::from(length < TTL);
                cuts += 1;
                lab.machines[id].partition().await;
                cut_until.insert(id.clone(), now + length);
            }
        }
        tokio::time::sleep(rng.millis(100, 800)).await;
    }
    for id in cut_until.keys() {
        lab.machines[id].heal();
    }

    // Healed: every unit runs on exactly one machine again (bounded wait), and never ran on two.
    poll(Duration::from_secs(60), "every unit active on exactly one machine", || async {
        let l = ledger.lock().unwrap();
        names.iter().all(|n| l.running.get(n).is_some_and(|on| on.len() == 1)).then_some(())
    })
    .await;
    let l = ledger.lock().unwrap();
    let moves = l.starts.values().sum::<u64>() - placed;
    eprintln!(
        "chaos: {cuts} cuts ({short} shorter than the TTL), {moves} starts after placement, starts {:?}",
        l.starts
    );
    assert!(cuts >= 5 && moves >= 2, "the chaos moved units around (else this proves nothing): {cuts} cuts, {moves}");
    assert!(l.violations.is_empty(), "seed {seed}: at-most-once broken:\n{}", l.violations.join("\n"));
}
