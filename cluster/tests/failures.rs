//! The failure semantics fleet lacked: fencing of at-most-once units across a partition, an agent riding out an
//! etcd outage, engine leader failover without restarts, losing one etcd member of three, and an operator's
//! request riding out a lost quorum.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{Lab, TTL, machine_record, poll, sleeper};
use herd_cluster::agent::AgentEvent;
use herd_cluster::client::UnitStatus;
use herd_cluster::engine::EngineStatus;
use herd_cluster::exec::RecordingExecutor;
use herd_cluster::record::{ActiveState, Desired};
use herd_cluster::schema::{Key, MachineKey};
use herd_cluster::store::{RETRY_FOR, Stats, StoreError};
use tokio::sync::broadcast;

const WAIT: Duration = Duration::from_secs(30);

async fn two(name: &str, engines: usize) -> Lab {
    let mut lab = Lab::start(name, engines).await;
    for id in ["m1", "m2"] {
        lab.add_machine(machine_record(id, "r1", &[])).await;
    }
    poll(WAIT, "2 machines", || async { (lab.client.machines().await.ok()?.len() == 2).then_some(()) }).await;
    lab
}

async fn launch(lab: &Lab, name: &str, text: &str) -> String {
    lab.client.submit(name, text, false).await.unwrap();
    lab.client.set_desired(name, Desired::Launched).await.unwrap();
    lab.client.wait(&[name.into()], Some(Desired::Launched), WAIT).await.unwrap();
    on(lab, name).await.unwrap()
}

async fn on(lab: &Lab, name: &str) -> Option<String> {
    let units = lab.client.units().await.ok()?;
    let u: &UnitStatus = units.iter().find(|u| u.name == name)?;
    u.machines.iter().find(|p| p.state == Some(ActiveState::Active)).map(|p| p.machine.clone())
}

/// Every action event so far on a receiver.
fn drain(rx: &mut broadcast::Receiver<AgentEvent>) -> Vec<AgentEvent> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push(e);
    }
    out
}

fn action_at(events: &[AgentEvent], unit: &str, which: &str) -> Option<SystemTime> {
    events.iter().find_map(|e| match e {
        AgentEvent::Action { unit: u, action, at, ok: true } if u.as_str() == unit && *action == which => Some(*at),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_agent_stops_its_at_most_once_unit_before_it_starts_elsewhere() {
    let mut lab = two("fencing", 1).await;
    let first = launch(&lab, "singleton.service", &sleeper("AtMostOnce=true\n")).await;
    let other = if first == "m1" { "m2" } else { "m1" };
    drain(&mut lab.machines.get_mut(other).unwrap().events);
    drain(&mut lab.machines.get_mut(&first).unwrap().events);

    lab.machines[&first].partition().await;
    poll(WAIT, "the singleton active on the other machine", || async {
        (on(&lab, "singleton.service").await.as_deref() == Some(other)).then_some(())
    })
    .await;
    let started = action_at(&drain(&mut lab.machines.get_mut(other).unwrap().events), "singleton.service", "start")
        .expect("the other machine started the unit");
    let cut_off = drain(&mut lab.machines.get_mut(&first).unwrap().events);
    assert!(cut_off.iter().any(|e| matches!(e, AgentEvent::Fenced { .. })), "the cut-off agent fenced: {cut_off:?}");
    let stopped = action_at(&cut_off, "singleton.service", "stop").expect("the cut-off machine stopped the unit");
    let gap = started.duration_since(stopped).expect("stopped before the other machine started it: zero overlap");
    eprintln!("fencing: stopped {gap:?} before the other machine started it");

    // Healing: the old machine comes back, registers again, and does not start the unit again.
    lab.machines[&first].heal();
    poll(WAIT, "the old machine registered again", || async {
        let ms = lab.client.machines().await.ok()?;
        ms.iter().any(|m| m.record.id == first).then_some(())
    })
    .await;
    // It has read its whole schedule under its new lease, and the engine has planned after its return: nothing
    // can start the unit there from here on.
    let events = &mut lab.machines.get_mut(&first).unwrap().events;
    let mut late = tokio::time::timeout(WAIT, async {
        let mut seen = Vec::new();
        loop {
            let e = events.recv().await.unwrap();
            let synced = matches!(e, AgentEvent::Synced { .. });
            seen.push(e);
            if synced {
                return seen;
            }
        }
    })
    .await
    .expect("the old machine read its schedule again");
    lab.engine_round_after(&Key::Machine(MachineKey::new(&first).unwrap()).path()).await;
    let units = lab.client.units().await.unwrap();
    let u = units.iter().find(|u| u.name == "singleton.service").unwrap();
    let placed: Vec<&str> = u.machines.iter().map(|p| p.machine.as_str()).collect();
    assert_eq!(placed, [other], "placed on the other machine only after healing");
    let active: Vec<&str> =
        u.machines.iter().filter(|p| p.state == Some(ActiveState::Active)).map(|p| p.machine.as_str()).collect();
    assert_eq!(active, [other], "exactly one copy runs after healing");
    late.extend(drain(&mut lab.machines.get_mut(&first).unwrap().events));
    assert!(action_at(&late, "singleton.service", "start").is_none(), "the old machine did not restart it: {late:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_cut_off_from_etcd_keeps_its_units_then_converges() {
    let mut lab = Lab::start("cutoff", 1).await;
    lab.add_machine(machine_record("m1", "r1", &[])).await;
    poll(WAIT, "m1", || async { (lab.client.machines().await.ok()?.len() == 1).then_some(()) }).await;
    launch(&lab, "keep.service", &sleeper("")).await;
    launch(&lab, "change.service", &sleeper("")).await;
    drain(&mut lab.machines.get_mut("m1").unwrap().events);

    // Cut off for less than the lease: nothing may happen locally.
    lab.machines["m1"].partition().await;
    let cut = std::time::Instant::now();
    lab.client.set_desired("change.service", Desired::Loaded).await.unwrap();
    // The engine has scheduled the change the agent cannot see; the cut lasts a third of the lease in all.
    lab.engine_round_after(&Key::Unit("change.service".parse().unwrap()).path()).await;
    tokio::time::sleep((TTL / 3).saturating_sub(cut.elapsed())).await;
    let during = drain(&mut lab.machines.get_mut("m1").unwrap().events);
    assert!(
        !during.iter().any(|e| matches!(e, AgentEvent::Action { .. })),
        "no unit touched while cut off: {during:?}"
    );
    lab.machines["m1"].heal();

    // Back: it sees the change it missed, and leaves the other unit alone.
    lab.client.wait(&["change.service".into()], Some(Desired::Loaded), WAIT).await.unwrap();
    let after = drain(&mut lab.machines.get_mut("m1").unwrap().events);
    assert!(action_at(&after, "change.service", "stop").is_some(), "{after:?}");
    assert!(action_at(&after, "keep.service", "stop").is_none(), "keep.service never restarted: {after:?}");
    assert!(action_at(&after, "keep.service", "start").is_none(), "keep.service never restarted: {after:?}");
    assert_eq!(on(&lab, "keep.service").await.as_deref(), Some("m1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_engine_leader_hands_over_within_the_ttl_and_restarts_nothing() {
    let mut lab = two("leader", 2).await;
    for i in 1..=4 {
        launch(&lab, &format!("svc{i}.service"), &sleeper("")).await;
    }
    let before = lab.client.units().await.unwrap();
    let leader = lab.leader(WAIT).await;
    let EngineStatus::Leader { epoch: old_epoch } = *lab.engines[leader].engine.status().borrow() else {
        panic!("not leading")
    };
    for m in lab.machines.values_mut() {
        drain(&mut m.events);
    }

    let crashed = std::time::Instant::now();
    lab.engines[leader].crash().await;
    let next = lab.leader(WAIT).await;
    let took = crashed.elapsed();
    assert_ne!(next, leader);
    let EngineStatus::Leader { epoch } = *lab.engines[next].engine.status().borrow() else { panic!("not leading") };
    assert!(epoch > old_epoch, "a new leader has a new fencing epoch");
    eprintln!("leader failover took {took:?} (TTL {TTL:?})");
    assert!(took <= TTL + Duration::from_millis(1500), "failover within the lease TTL (+ election slack): {took:?}");

    // The new leader plans from the schedule as it is: it moves and restarts nothing. A unit started now works.
    launch(&lab, "after.service", &sleeper("")).await;
    let after = lab.client.units().await.unwrap();
    for u in &before {
        let now = after.iter().find(|a| a.name == u.name).unwrap();
        assert_eq!(now.machines, u.machines, "{} unchanged", u.name);
    }
    for m in lab.machines.values_mut() {
        let events = drain(&mut m.events);
        for u in &before {
            assert!(action_at(&events, &u.name, "start").is_none(), "{} restarted on {}: {events:?}", u.name, m.id);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_one_etcd_member_of_three_does_not_stop_scheduling() {
    let mut lab = two("member", 1).await;
    launch(&lab, "before.service", &sleeper("")).await;
    // The raft leader, the harder case: the others hold an election while clients' requests are in flight.
    let leader = lab.etcd.leader().await.expect("the etcd cluster has a leader");
    lab.etcd.kill(leader);
    let killed = std::time::Instant::now();
    // Clients fail over to the remaining members (the lab's client talks to all three) and ride out the election.
    launch(&lab, "after.service", &sleeper("")).await;
    eprintln!("etcd leader (member {leader}) killed: a new unit active {:?} later", killed.elapsed());
    assert!(on(&lab, "before.service").await.is_some());
    lab.etcd.restart(leader).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operators_request_rides_out_a_lost_quorum_that_a_daemons_request_gives_up_on() {
    let mut lab = Lab::start("quorum", 0).await;
    let key = "/herd/v1/test/quorum";
    // Two members of three gone: the last one has no leader, and refuses every request (--require-leader).
    lab.etcd.kill(1);
    lab.etcd.kill(2);
    let daemon = lab.store.with_own_stats(Arc::new(Stats::default()));
    let started = std::time::Instant::now();
    let err = daemon.put(key, b"daemon".to_vec(), None).await.unwrap_err();
    assert!(matches!(err, StoreError::Etcd(_)), "{err}");
    assert!(started.elapsed() >= RETRY_FOR, "a daemon retries for its window first: {:?}", started.elapsed());
    assert!(daemon.stats().retries() > 0);

    let stats = Arc::new(Stats::default());
    let operator = lab.store.with_own_stats(stats.clone()).with_retry_for(Duration::from_secs(60));
    let put = tokio::spawn(async move { operator.put(key, b"operator".to_vec(), None).await });
    poll(WAIT, "the operator's put refused once", || async { (stats.retries() > 0).then_some(()) }).await;
    lab.etcd.restart(1).unwrap();
    lab.etcd.restart(2).unwrap();
    put.await.unwrap().unwrap();
    assert_eq!(lab.store.get(key).await.unwrap().unwrap().value(), b"operator");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn draining_moves_an_at_most_once_unit_only_after_it_stopped() {
    let mut lab = two("drain", 1).await;
    // Takes a second to stop: a move that started the new copy at once would overlap the old one.
    let slow = "[Service]\nExecStart=/bin/sh -c \"trap 'sleep 1; exit 0' TERM; while true; do sleep 0.1; done\"\n\
                [X-Fleet]\nAtMostOnce=true\n";
    let first = launch(&lab, "slow.service", slow).await;
    let other = if first == "m1" { "m2" } else { "m1" };
    drain(&mut lab.machines.get_mut(other).unwrap().events);
    drain(&mut lab.machines.get_mut(&first).unwrap().events);

    lab.client.cordon(&first, true).await.unwrap();
    poll(WAIT, "slow.service active on the other machine", || async {
        (on(&lab, "slow.service").await.as_deref() == Some(other)).then_some(())
    })
    .await;
    let stopped = action_at(&drain(&mut lab.machines.get_mut(&first).unwrap().events), "slow.service", "stop")
        .expect("the drained machine stopped the unit");
    let started = action_at(&drain(&mut lab.machines.get_mut(other).unwrap().events), "slow.service", "start")
        .expect("the other machine started it");
    let gap = started.duration_since(stopped).expect("stopped before it started elsewhere: no overlap");
    eprintln!("drain: stopped {gap:?} before it started elsewhere");
}

/// How long loading a unit takes on a machine that does not have it yet (an image pull).
const PULL: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn draining_loads_a_container_on_its_next_machine_before_stopping_it() {
    let mut lab = Lab::start("warm", 1).await;
    for id in ["m1", "m2"] {
        let exec = std::sync::Arc::new(RecordingExecutor::with_install_delay(PULL));
        let m = lab.spawn_agent(machine_record(id, "r1", &[]), exec).await;
        lab.machines.insert(id.to_owned(), m);
    }
    poll(WAIT, "2 machines", || async { (lab.client.machines().await.ok()?.len() == 2).then_some(()) }).await;
    let web = "[Container]\nImage=registry.invalid/web:1\n";
    let first = launch(&lab, "web.service", web).await;
    let other = if first == "m1" { "m2" } else { "m1" };
    drain(&mut lab.machines.get_mut(other).unwrap().events);
    drain(&mut lab.machines.get_mut(&first).unwrap().events);

    lab.client.cordon(&first, true).await.unwrap();
    poll(WAIT, "web.service active on the other machine", || async {
        (on(&lab, "web.service").await.as_deref() == Some(other)).then_some(())
    })
    .await;
    let there = drain(&mut lab.machines.get_mut(other).unwrap().events);
    let loaded = action_at(&there, "web.service", "load").expect("the next machine loaded it");
    let started = action_at(&there, "web.service", "start").expect("the next machine started it");
    let stopped = action_at(&drain(&mut lab.machines.get_mut(&first).unwrap().events), "web.service", "stop")
        .expect("the drained machine stopped it");
    let early = stopped.duration_since(loaded).expect("loaded (image pulled) before the old copy stopped");
    let gap = started.duration_since(stopped).unwrap_or_default();
    eprintln!("drain: loaded {early:?} before the old copy stopped, started {gap:?} after");
    assert!(gap < PULL, "the move did not wait for a pull after stopping ({gap:?})");
}
