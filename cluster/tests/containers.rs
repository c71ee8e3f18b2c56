//! `[Container]` units through a real Docker Engine, pulling from a real local registry, with pre-warm.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use bollard::query_parameters::EventsOptions;
use common::{Lab, machine_record, poll};
use futures::StreamExt;
use herd_cluster::agent::AgentEvent;
use herd_cluster::docker::{DockerExecutor, container_name};
use herd_cluster::exec::{Dispatch, Executor, ProcessExecutor};
use herd_cluster::record::{ActiveState, Desired};
use herd_lab::local::LocalDocker;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_container_unit_pulls_from_the_registry_runs_and_publishes_its_port_and_prewarm_comes_first() {
    let mut lab = Lab::start("containers", 1).await;
    let docker = LocalDocker::start(&lab.dir).unwrap();
    let web = docker.publish("herd/web:1", &lab.dir).unwrap();
    let tools = docker.publish("herd/tools:1", &lab.dir).unwrap();
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();

    // The cluster-wide pre-warm list is pulled before the machine registers.
    lab.client.prewarm_add(&tools).await.unwrap();
    assert_eq!(lab.client.prewarm_list().await.unwrap(), vec![tools.clone()]);
    let engine = DockerExecutor::connect(Some(&docker.socket)).await.unwrap();
    let exec = Arc::new(Dispatch { services: ProcessExecutor::default(), containers: engine.clone() });
    let mut m = lab.spawn_agent(machine_record("m1", "r1", &[]), exec.clone()).await;
    let mut seen = Vec::new();
    let registered_after_prewarm = poll(WAIT, "registration", || {
        while let Ok(e) = m.events.try_recv() {
            seen.push(e);
        }
        let reg = seen.iter().position(|e| matches!(e, AgentEvent::Registered { .. }));
        let warm = seen.iter().position(|e| matches!(e, AgentEvent::Prewarmed { image, ok: true } if *image == tools));
        async move { reg.map(|r| warm.is_some_and(|w| w < r)) }
    })
    .await;
    assert!(registered_after_prewarm, "pre-warm finished before registering: {seen:?}");
    assert!(docker.cli(&["image", "inspect", &tools]).unwrap().status.success(), "the pre-warm image is local");

    // An image added to the list once the machine runs is pulled there too, in the background.
    let late = docker.publish("herd/late:1", &lab.dir).unwrap();
    assert!(!docker.cli(&["image", "inspect", &late]).unwrap().status.success());
    lab.client.prewarm_add(&late).await.unwrap();
    poll(WAIT, "the late pre-warm image pulled", || {
        while let Ok(e) = m.events.try_recv() {
            seen.push(e);
        }
        let pulled = seen.iter().any(|e| matches!(e, AgentEvent::Prewarmed { image, ok: true } if *image == late));
        async move { pulled.then_some(()) }
    })
    .await;
    assert!(docker.cli(&["image", "inspect", &late]).unwrap().status.success(), "the late image is local");

    // A container unit: pulled (the image is not local), created, started; its port answers.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let unit = format!(
        "[Unit]\nDescription=web\n[Container]\nImage={web}\nCommand=/bin/httpd -f -p 80 -h /www\nPort={port}:80\n\
         Environment=GREETING=hi\n[X-Fleet]\nMemory=64M\nCPU=250m\n"
    );
    assert!(!docker.cli(&["image", "inspect", &web]).unwrap().status.success(), "the unit's image is not local yet");
    lab.client.submit("web.service", &unit, false).await.unwrap();
    lab.client.set_desired("web.service", Desired::Launched).await.unwrap();
    lab.client.wait(&["web.service".into()], Some(Desired::Launched), WAIT).await.unwrap();
    let body = poll(WAIT, "the published port to answer", || async move {
        let out = std::process::Command::new("curl")
            .args(["-sf", "-m", "2"])
            .arg(format!("http://127.0.0.1:{port}/"))
            .output()
            .ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .await;
    assert_eq!(body, "served by herd/web:1\n");
    let name = container_name(&"web.service".parse().unwrap());
    let inspect = engine.docker().inspect_container(&name, None).await.unwrap();
    let host = inspect.host_config.unwrap();
    assert_eq!(host.memory, Some(64 << 20), "Memory= is the container's limit");
    assert_eq!(host.nano_cpus, Some(250_000_000), "CPU= is the container's limit");

    // The engine's own event log: the image was pulled before the container was created and started.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 1;
    let options = EventsOptions { since: Some(started.to_string()), until: Some(now.to_string()), filters: None };
    let events: Vec<_> = engine.docker().events(Some(options)).collect::<Vec<_>>().await;
    let log: Vec<(String, String, String)> = events
        .into_iter()
        .filter_map(Result::ok)
        .map(|e| {
            let actor = e.actor.unwrap_or_default();
            let id = actor.attributes.and_then(|a| a.get("name").cloned()).or(actor.id).unwrap_or_default();
            (format!("{:?}", e.typ), e.action.unwrap_or_default(), id)
        })
        .collect();
    let at = |action: &str, who: &str| log.iter().position(|(_, a, id)| a == action && id.contains(who));
    let pulled = at("pull", "herd/web").unwrap_or_else(|| panic!("no pull of the unit's image: {log:?}"));
    let created = at("create", &name).unwrap_or_else(|| panic!("no create: {log:?}"));
    let run = at("start", &name).unwrap_or_else(|| panic!("no start: {log:?}"));
    assert!(pulled < created && created < run, "pull, then create, then start: {log:?}");

    // Stop and destroy reach the container.
    lab.client.set_desired("web.service", Desired::Loaded).await.unwrap();
    lab.client.wait(&["web.service".into()], Some(Desired::Loaded), WAIT).await.unwrap();
    assert_eq!(exec.state(&herd_cluster::unit::Unit::parse("web.service", &unit).unwrap()).await, ActiveState::Loaded);
    lab.client.destroy("web.service").await.unwrap();
    lab.client.wait(&["web.service".into()], None, WAIT).await.unwrap();
    poll(WAIT, "the container removed", || async {
        engine.docker().inspect_container(&name, None).await.is_err().then_some(())
    })
    .await;
    m.stop.cancel();
    lab.machines.clear();
}
