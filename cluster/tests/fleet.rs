//! fleet's behaviours, against a real 3-member etcd, real engine and agents running real processes.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{GRACE, Lab, TTL, machine_record, poll, sleeper};
use herd_cluster::client::UnitStatus;
use herd_cluster::record::{ActiveState, Desired};
use herd_cluster::schema::{Key, MachineKey};

const WAIT: Duration = Duration::from_secs(20);

async fn three(name: &str) -> Lab {
    let mut lab = Lab::start(name, 1).await;
    for (id, rack) in [("m1", "r1"), ("m2", "r1"), ("m3", "r2")] {
        let disk = if id == "m2" { "hdd" } else { "ssd" };
        lab.add_machine(machine_record(id, rack, &[("disk", disk)])).await;
    }
    poll(WAIT, "3 machines registered", || async { (lab.client.machines().await.ok()?.len() == 3).then_some(()) })
        .await;
    lab
}

async fn unit(lab: &Lab, name: &str) -> Option<UnitStatus> {
    lab.client.units().await.unwrap().into_iter().find(|u| u.name == name)
}

fn active_on(u: &UnitStatus) -> Vec<String> {
    u.machines.iter().filter(|p| p.state == Some(ActiveState::Active)).map(|p| p.machine.clone()).collect()
}

async fn start(lab: &Lab, names: &[&str]) {
    for n in names {
        lab.client.set_desired(n, Desired::Launched).await.unwrap();
    }
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    lab.client.wait(&names, Some(Desired::Launched), WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_unit_goes_through_every_state_and_runs_a_real_process() {
    let lab = three("states").await;
    let text = sleeper("").replace("3600", "7201");
    lab.client.submit("hello.service", &text, false).await.unwrap();
    let u = unit(&lab, "hello.service").await.unwrap();
    assert_eq!(u.desired, Desired::Inactive);
    assert!(u.machines.is_empty(), "a submitted unit is placed nowhere");

    lab.client.set_desired("hello.service", Desired::Loaded).await.unwrap();
    lab.client.wait(&["hello.service".into()], Some(Desired::Loaded), WAIT).await.unwrap();

    start(&lab, &["hello.service"]).await;
    let on = active_on(&unit(&lab, "hello.service").await.unwrap());
    assert_eq!(on.len(), 1);
    // The process really runs, and really stops.
    let running = || {
        let out = std::process::Command::new("pgrep").args(["-f", "^/bin/sleep 7201$"]).output().unwrap();
        !out.stdout.is_empty()
    };
    assert!(running(), "the unit's process runs");

    lab.client.set_desired("hello.service", Desired::Loaded).await.unwrap();
    lab.client.wait(&["hello.service".into()], Some(Desired::Loaded), WAIT).await.unwrap();
    assert!(!running(), "stopped means the process is gone");

    lab.client.set_desired("hello.service", Desired::Inactive).await.unwrap();
    lab.client.wait(&["hello.service".into()], Some(Desired::Inactive), WAIT).await.unwrap();

    assert!(lab.client.destroy("hello.service").await.unwrap());
    lab.client.wait(&["hello.service".into()], None, WAIT).await.unwrap();
    assert!(lab.client.cat("hello.service").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submit_refuses_a_different_file_without_replace_and_replace_restarts_the_unit() {
    let lab = three("replace").await;
    lab.client.submit("web.service", &sleeper(""), false).await.unwrap();
    lab.client.submit("web.service", &sleeper(""), false).await.unwrap();
    start(&lab, &["web.service"]).await;
    let before = unit(&lab, "web.service").await.unwrap().machines[0].since_ms;
    let changed = sleeper("").replace("Description=test", "Description=changed");
    let err = lab.client.submit("web.service", &changed, false).await.unwrap_err();
    assert!(err.to_string().contains("--replace"), "{err}");
    lab.client.submit("web.service", &changed, true).await.unwrap();
    poll(WAIT, "web.service restarted with the new file", || async {
        let u = unit(&lab, "web.service").await?;
        let p = u.machines.first()?;
        (u.text == changed && p.state == Some(ActiveState::Active) && p.since_ms > before).then_some(())
    })
    .await;
    assert_eq!(unit(&lab, "web.service").await.unwrap().desired, Desired::Launched, "--replace keeps the target");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_conflicting_units_on_three_machines_run_three_on_distinct_machines() {
    let lab = three("conflicts").await;
    let names: Vec<String> = (1..=5).map(|i| format!("db@{i}.service")).collect();
    lab.client.submit("db@.service", &sleeper("Conflicts=db@*.service\n"), false).await.unwrap();
    for n in &names {
        lab.client.set_desired(n, Desired::Launched).await.unwrap();
    }
    let running = poll(WAIT, "3 db units active", || async {
        let units = lab.client.units().await.ok()?;
        let on: Vec<String> = units.iter().filter(|u| u.name.starts_with("db@")).flat_map(active_on).collect();
        (on.len() == 3).then_some(on)
    })
    .await;
    assert_eq!(running.iter().collect::<BTreeSet<_>>().len(), 3, "on distinct machines: {running:?}");
    // And it stays at 3: the other two have nowhere to go (the engine has planned after the last one's start).
    lab.engine_round_after(&Key::Unit(names.last().unwrap().parse().unwrap()).path()).await;
    let units = lab.client.units().await.unwrap();
    let placed: usize = units.iter().filter(|u| u.name.starts_with("db@")).map(|u| u.machines.len()).sum();
    assert_eq!(placed, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_one_way_conflict_global_units_and_machine_id_pins() {
    let lab = three("placement").await;
    lab.client.submit("a.service", &sleeper("Conflicts=b.service\n"), false).await.unwrap();
    lab.client.submit("b.service", &sleeper(""), false).await.unwrap();
    lab.client.submit("pinned.service", &sleeper("MachineID=m2\n"), false).await.unwrap();
    lab.client.submit("everywhere.service", &sleeper("Global=true\nMachineMetadata=disk=ssd\n"), false).await.unwrap();
    start(&lab, &["a.service", "b.service", "pinned.service", "everywhere.service"]).await;
    let a = active_on(&unit(&lab, "a.service").await.unwrap());
    let b = active_on(&unit(&lab, "b.service").await.unwrap());
    assert_ne!(a, b, "a one-way conflict keeps them apart");
    assert_eq!(active_on(&unit(&lab, "pinned.service").await.unwrap()), ["m2"]);
    // The wait above ends once the unit is active wherever it is placed; a machine the engine's view did not hold
    // yet (its registration reached the engine after the round that placed the unit) gets it a round later.
    let g = poll(WAIT, "the global unit active on m1 and m3", || async {
        let mut g = active_on(&unit(&lab, "everywhere.service").await?);
        g.sort();
        (g.len() >= 2).then_some(g)
    })
    .await;
    assert_eq!(g, ["m1", "m3"], "global on every machine with disk=ssd, and only there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn template_instances_route_by_hostname_metadata() {
    let lab = three("template").await;
    lab.client.submit("web@.service", &sleeper("MachineMetadata=hostname=%i\n"), false).await.unwrap();
    start(&lab, &["web@m1.service", "web@m3.service"]).await;
    assert_eq!(active_on(&unit(&lab, "web@m1.service").await.unwrap()), ["m1"]);
    assert_eq!(active_on(&unit(&lab, "web@m3.service").await.unwrap()), ["m3"]);
    let err = lab.client.set_desired("web@.service", Desired::Launched).await.unwrap_err();
    assert!(err.to_string().contains("template"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn machine_of_pairs_move_together_a_leaving_machine_moves_exactly_its_units_and_a_joining_one_nothing() {
    let mut lab = three("moves").await;
    lab.client.submit("leader.service", &sleeper(""), false).await.unwrap();
    lab.client.submit("follower.service", &sleeper("MachineOf=leader.service\n"), false).await.unwrap();
    let others: Vec<String> = (1..=6).map(|i| format!("w{i}.service")).collect();
    for n in &others {
        lab.client.submit(n, &sleeper(""), false).await.unwrap();
    }
    let mut all: Vec<&str> = others.iter().map(String::as_str).collect();
    all.extend(["leader.service", "follower.service"]);
    start(&lab, &all).await;
    let units_before = lab.client.units().await.unwrap();
    let placed_before: Vec<(String, Vec<String>)> =
        units_before.iter().map(|u| (u.name.clone(), u.machines.iter().map(|p| p.machine.clone()).collect())).collect();
    let before: Vec<(String, Vec<String>)> = units_before.iter().map(|u| (u.name.clone(), active_on(u))).collect();
    let leader_on = before.iter().find(|(n, _)| n == "leader.service").unwrap().1[0].clone();
    let follower_on = &before.iter().find(|(n, _)| n == "follower.service").unwrap().1[0];
    assert_eq!(&leader_on, follower_on, "MachineOf co-locates");

    // A machine joining moves nothing.
    lab.add_machine(machine_record("m4", "r2", &[])).await;
    poll(WAIT, "m4 registered", || async { (lab.client.machines().await.ok()?.len() == 4).then_some(()) }).await;
    lab.engine_round_after(&Key::Machine(MachineKey::new("m4").unwrap()).path()).await;
    // The schedule itself, not the reported states: a move would show here at once.
    let placed = |units: &[UnitStatus]| -> Vec<(String, Vec<String>)> {
        units.iter().map(|u| (u.name.clone(), u.machines.iter().map(|p| p.machine.clone()).collect())).collect()
    };
    assert_eq!(placed(&lab.client.units().await.unwrap()), placed_before, "no churn when a machine joins");

    // The leader's machine dies: exactly its units move, the pair together, after the grace period.
    let died = std::time::Instant::now();
    lab.kill_machine(&leader_on).await;
    let after = poll(WAIT, "the dead machine's units running elsewhere", || async {
        let units = lab.client.units().await.ok()?;
        let now: Vec<(String, Vec<String>)> = units.iter().map(|u| (u.name.clone(), active_on(u))).collect();
        now.iter().all(|(_, on)| on.len() == 1 && on[0] != leader_on).then_some(now)
    })
    .await;
    let took = died.elapsed();
    assert!(took >= GRACE, "units moved only after the grace period ({took:?})");
    for ((name, was), (_, now)) in before.iter().zip(&after) {
        if was[0] == leader_on {
            assert_ne!(now[0], leader_on);
        } else {
            assert_eq!(now, was, "{name} was not on the dead machine and must not move");
        }
    }
    let l = &after.iter().find(|(n, _)| n == "leader.service").unwrap().1;
    let f = &after.iter().find(|(n, _)| n == "follower.service").unwrap().1;
    assert_eq!(l, f, "the MachineOf pair moved together");
    // The engine recorded what happened to the machines, in order, for their timelines.
    let client = &lab.client;
    let events = |m: String| async move {
        client.machine_events(&m).await.unwrap().into_iter().map(|e| e.event).collect::<Vec<_>>()
    };
    // (Whether m1..m3 have a "registered" first depends on whether they registered before or after the engine
    // loaded its view at start.)
    // (They are written behind the engine's back, so look until they are there.)
    let want = ["suspect", "dead"];
    let died_events = poll(WAIT, "the dead machine's events", || async {
        let seen = events(leader_on.clone()).await;
        (seen.iter().filter(|e| *e != "registered").count() >= want.len()).then_some(seen)
    })
    .await;
    assert_eq!(died_events.iter().filter(|e| *e != "registered").collect::<Vec<_>>(), want, "{leader_on}");
    assert_eq!(events("m4".into()).await, ["registered"]);
    eprintln!("failover took {took:?} (TTL {TTL:?}, grace {GRACE:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_machine_id_is_refused() {
    let lab = three("duplicate").await;
    let mut clone = machine_record("m1", "r9", &[]);
    clone.instance = "another-instance".into();
    clone.hostname = "cloned-host".into();
    let m = lab.spawn_agent(clone, std::sync::Arc::new(herd_cluster::exec::ProcessExecutor::default())).await;
    let result = tokio::time::timeout(WAIT, m.task).await.unwrap().unwrap();
    let err = result.unwrap_err().to_string();
    assert!(err.contains("m1") && err.contains("already registered") && err.contains("m1"), "{err}");
    let machines = lab.client.machines().await.unwrap();
    assert_eq!(machines.iter().find(|m| m.record.id == "m1").unwrap().record.hostname, "m1", "the original stays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replaces_takes_the_machine_and_moves_the_replaced_unit() {
    let lab = three("replaces").await;
    lab.client.submit("old.service", &sleeper(""), false).await.unwrap();
    start(&lab, &["old.service"]).await;
    let was = active_on(&unit(&lab, "old.service").await.unwrap());
    let new = sleeper(&format!("MachineID={}\nConflicts=old.service\nReplaces=old.service\n", was[0]));
    lab.client.submit("new.service", &new, false).await.unwrap();
    start(&lab, &["new.service"]).await;
    assert_eq!(active_on(&unit(&lab, "new.service").await.unwrap()), was, "new.service took the machine");
    let moved = poll(WAIT, "old.service active elsewhere", || async {
        let on = active_on(&unit(&lab, "old.service").await?);
        (on.len() == 1 && on != was).then_some(on)
    })
    .await;
    assert_ne!(moved, was);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replaces_displaces_a_plain_unit_which_moves_to_another_machine() {
    // fleet's TestScheduleReplace: three plain units on three machines; a unit that replaces one of them takes its
    // machine, and the replaced one is rescheduled elsewhere (not left beside it).
    let lab = three("replaces-plain").await;
    // r.1 and r.2 pinned (so the layout does not hang on the spread), r.0 free to go anywhere: it lands on m1.
    let names = ["r.0.service", "r.1.service", "r.2.service"];
    lab.client.submit("r.1.service", &sleeper("MachineID=m2\n"), false).await.unwrap();
    lab.client.submit("r.2.service", &sleeper("MachineID=m3\n"), false).await.unwrap();
    start(&lab, &names[1..]).await;
    lab.client.submit("r.0.service", &sleeper(""), false).await.unwrap();
    start(&lab, &names[..1]).await;
    let mut before = Vec::new();
    for n in names {
        before.push(active_on(&unit(&lab, n).await.unwrap()));
    }
    assert_eq!(before.iter().flatten().collect::<BTreeSet<_>>().len(), 3, "spread: {before:?}");
    lab.client.submit("new.service", &sleeper("Replaces=r.0.service\n"), false).await.unwrap();
    start(&lab, &["new.service"]).await;
    let (new_on, r0_on) = poll(WAIT, "new.service on r.0's machine and r.0 active elsewhere", || async {
        let new_on = active_on(&unit(&lab, "new.service").await?);
        let r0_on = active_on(&unit(&lab, "r.0.service").await?);
        (new_on == before[0] && r0_on.len() == 1 && r0_on != before[0]).then_some((new_on, r0_on))
    })
    .await;
    assert_ne!(new_on, r0_on);
    for (i, n) in names.iter().enumerate().skip(1) {
        assert_eq!(active_on(&unit(&lab, n).await.unwrap()), before[i], "{n} did not move");
    }
    // Once the engine has planned again after the move (a change it watches makes it plan), nothing moves back.
    lab.client.submit("nudge.service", &sleeper(""), false).await.unwrap();
    lab.engine_round_after(&Key::Unit("nudge.service".parse().unwrap()).path()).await;
    assert_eq!(active_on(&unit(&lab, "r.0.service").await.unwrap()), r0_on);
    assert_eq!(active_on(&unit(&lab, "new.service").await.unwrap()), new_on);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_template_of_a_type_systemd_does_not_instantiate_is_refused_at_submit() {
    let lab = Lab::start("mount-template", 1).await;
    for name in ["x@.mount", "x@srv.mount"] {
        let err = lab.client.submit(name, "[Mount]\nWhat=/dev/vdb\nWhere=/srv\n", false).await.unwrap_err();
        assert!(err.to_string().contains("only of service, socket, target, timer and path units"), "{name}: {err}");
        assert!(lab.client.cat(name).await.is_err(), "{name} was not stored");
    }
    lab.client.submit("srv.mount", "[Mount]\nWhat=/dev/vdb\nWhere=/srv\n", false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unplaced_unit_carries_a_summary_and_each_machines_reason() {
    let lab = three("unplaced").await;
    lab.client.submit("huge.service", &sleeper("CPU=500\n"), false).await.unwrap();
    lab.client.set_desired("huge.service", Desired::Launched).await.unwrap();
    // The engine may judge the unit before its view holds the third machine's registration; it judges it again as
    // the view grows: wait (bounded) for a report over all three.
    let why = poll(WAIT, "huge.service reported unplaced on all three machines", || async {
        unit(&lab, "huge.service").await?.unplaced.filter(|u| u.machines.len() == 3)
    })
    .await;
    assert_eq!(why.summary, "not enough CPU on 3 of 3 machines");
    let machines: BTreeSet<&str> = why.machines.iter().map(|r| r.machine.as_str()).collect();
    assert_eq!(machines, BTreeSet::from(["m1", "m2", "m3"]));
    assert!(why.machines.iter().all(|r| r.reason.starts_with("not enough CPU")), "{why:?}");
    let json = serde_json::to_value(unit(&lab, "huge.service").await.unwrap()).unwrap();
    assert_eq!(json["unplaced"]["machines"].as_array().unwrap().len(), 3, "{json}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_literal_percent_reaches_the_process_as_systemd_would_pass_it() {
    let lab = three("percent").await;
    let out = lab.dir.join("percent.out");
    let text = format!("[Service]\nExecStart=/bin/sh -c 'echo 100%%-%%n-%n > {}; exec sleep 3600'\n", out.display());
    lab.client.submit("pct.service", &text, false).await.unwrap();
    start(&lab, &["pct.service"]).await;
    let written = poll(WAIT, "the unit wrote its line", || async {
        std::fs::read_to_string(&out).ok().filter(|t| t.ends_with('\n'))
    })
    .await;
    assert_eq!(written.trim(), "100%-%n-pct.service");
}
