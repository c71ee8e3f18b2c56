//! `[Container]` units through the Docker Engine API (bollard; no shell `docker run`).
//!
//! A unit's container is named `herd-` plus its unit name (escaped to Docker's name alphabet) and labelled
//! `herd.unit`. Loading pulls the image if it is not present (so the start that follows never waits on the
//! registry) and creates the container; `CPU=` and `Memory=` of `[X-Fleet]` become its limits.

use std::collections::HashMap;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, RemoveContainerOptions, StartContainerOptions, StopContainerOptions,
};
use futures::StreamExt;

use crate::exec::{ExecError, Executor};
use crate::record::ActiveState;
use crate::unit::{Unit, UnitName};

/// Runs container units on one Docker Engine.
#[derive(Debug, Clone)]
pub struct DockerExecutor {
    docker: Docker,
    /// Containers herd stopped on purpose: not running is their loaded state, not a failure.
    stopped: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

/// The container name of a unit: `herd-` and the unit name, with `@`, `:` and `_` escaped as `_40`, `_3a`, `_5f`
/// (Docker names allow `[a-zA-Z0-9_.-]`; escaping keeps distinct units distinct).
pub fn container_name(unit: &UnitName) -> String {
    let mut out = String::from("herd-");
    for c in unit.as_str().chars() {
        match c {
            '@' => out.push_str("_40"),
            ':' => out.push_str("_3a"),
            '_' => out.push_str("_5f"),
            '\\' => out.push_str("_5c"),
            c => out.push(c),
        }
    }
    out
}

/// Splits an image reference into repository and tag (`latest` when none; a digest stays in the repository).
pub fn split_image(image: &str) -> (&str, &str) {
    if image.contains('@') {
        return (image, "");
    }
    let slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[slash..].rfind(':') {
        Some(i) => (&image[..slash + i], &image[slash + i + 1..]),
        None => (image, "latest"),
    }
}

fn status_code(e: &bollard::errors::Error) -> Option<u16> {
    match e {
        bollard::errors::Error::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

impl DockerExecutor {
    /// Connects to the engine at `socket` (a Unix socket path), or the local default (`DOCKER_HOST` or
    /// `/var/run/docker.sock`), and agrees on the API version.
    pub async fn connect(socket: Option<&str>) -> Result<DockerExecutor, ExecError> {
        let docker = match socket {
            Some(path) => Docker::connect_with_unix(path, 120, bollard::API_DEFAULT_VERSION),
            None => Docker::connect_with_local_defaults(),
        }
        .map_err(|e| ExecError::new(format!("docker: {e}")))?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| ExecError::new(format!("docker: version negotiation: {e}")))?;
        Ok(DockerExecutor { docker, stopped: Default::default() })
    }

    /// The client, for callers that need more than units (tests read the engine's events).
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    async fn present(&self, image: &str) -> bool {
        self.docker.inspect_image(image).await.is_ok()
    }

    async fn fetch(&self, image: &str) -> Result<(), ExecError> {
        let (repo, tag) = split_image(image);
        let options = CreateImageOptions {
            from_image: Some(repo.to_owned()),
            tag: (!tag.is_empty()).then(|| tag.to_owned()),
            ..CreateImageOptions::default()
        };
        let mut progress = self.docker.create_image(Some(options), None, None);
        while let Some(step) = progress.next().await {
            step.map_err(|e| ExecError::new(format!("pulling {image}: {e}")))?;
        }
        Ok(())
    }
}

impl Executor for DockerExecutor {
    async fn pull(&self, image: &str) -> Result<(), ExecError> {
        if self.present(image).await {
            return Ok(());
        }
        self.fetch(image).await
    }

    async fn load(&self, unit: &Unit) -> Result<(), ExecError> {
        let c = unit.container.as_ref().ok_or_else(|| ExecError::new(format!("{}: no [Container]", unit.name)))?;
        self.pull(&c.image).await?;
        let name = container_name(&unit.name);
        // A container left from an earlier load of this unit (agent restart, changed unit file) goes first.
        let _ = self
            .docker
            .remove_container(&name, Some(RemoveContainerOptions { force: true, ..RemoveContainerOptions::default() }))
            .await;
        let mut bindings = HashMap::new();
        let mut exposed = Vec::new();
        for (host, inner, proto) in &c.ports {
            let key = format!("{inner}/{proto}");
            exposed.push(key.clone());
            bindings.insert(key, Some(vec![PortBinding { host_ip: None, host_port: Some(host.to_string()) }]));
        }
        let p = &unit.placement;
        let host = HostConfig {
            port_bindings: (!bindings.is_empty()).then_some(bindings),
            binds: (!c.volumes.is_empty()).then(|| c.volumes.clone()),
            memory: (p.memory > 0).then_some(p.memory as i64),
            nano_cpus: (p.cpu_millis > 0).then_some(p.cpu_millis as i64 * 1_000_000),
            ..HostConfig::default()
        };
        let body = ContainerCreateBody {
            image: Some(c.image.clone()),
            cmd: (!c.command.is_empty()).then(|| c.command.clone()),
            env: Some(c.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            exposed_ports: (!exposed.is_empty()).then_some(exposed),
            labels: Some(HashMap::from([("herd.unit".to_owned(), unit.name.to_string())])),
            host_config: Some(host),
            ..ContainerCreateBody::default()
        };
        let options = CreateContainerOptions { name: Some(name.clone()), ..CreateContainerOptions::default() };
        self.docker.create_container(Some(options), body).await.map_err(|e| ExecError::new(format!("{name}: {e}")))?;
        Ok(())
    }

    async fn start(&self, unit: &Unit) -> Result<(), ExecError> {
        let name = container_name(&unit.name);
        self.stopped.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
        match self.docker.start_container(&name, None::<StartContainerOptions>).await {
            Ok(()) => Ok(()),
            Err(e) if status_code(&e) == Some(304) => Ok(()),
            Err(e) => Err(ExecError::new(format!("starting {name}: {e}"))),
        }
    }

    async fn stop(&self, unit: &Unit) -> Result<(), ExecError> {
        let name = container_name(&unit.name);
        self.stopped.lock().unwrap_or_else(|p| p.into_inner()).insert(name.clone());
        // Bounded well inside a fencing margin: an at-most-once container is down before its lease can lapse.
        let options = StopContainerOptions { t: Some(3), ..StopContainerOptions::default() };
        match self.docker.stop_container(&name, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if matches!(status_code(&e), Some(304 | 404)) => Ok(()),
            Err(e) => Err(ExecError::new(format!("stopping {name}: {e}"))),
        }
    }

    async fn unload(&self, unit: &Unit) -> Result<(), ExecError> {
        let name = container_name(&unit.name);
        let options = RemoveContainerOptions { force: true, ..RemoveContainerOptions::default() };
        match self.docker.remove_container(&name, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if status_code(&e) == Some(404) => Ok(()),
            Err(e) => Err(ExecError::new(format!("removing {name}: {e}"))),
        }
    }

    async fn state(&self, unit: &Unit) -> ActiveState {
        let name = container_name(&unit.name);
        match self.docker.inspect_container(&name, None).await {
            Ok(info) => {
                let state = info.state.unwrap_or_default();
                let stopped = self.stopped.lock().unwrap_or_else(|p| p.into_inner()).contains(&name);
                if state.running == Some(true) {
                    ActiveState::Active
                } else if stopped || state.status == Some(bollard::models::ContainerStateStatusEnum::CREATED) {
                    ActiveState::Loaded
                } else if state.exit_code.unwrap_or(0) != 0 {
                    ActiveState::Failed
                } else {
                    ActiveState::Inactive
                }
            }
            Err(_) => ActiveState::Inactive,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_names_are_distinct_and_valid() {
        let a = container_name(&"web@a.service".parse().unwrap());
        let b = container_name(&"web_40a.service".parse().unwrap());
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)), "{a}");
    }

    #[test]
    fn image_references_split_into_repository_and_tag() {
        assert_eq!(split_image("127.0.0.1:5000/herd/busybox:1"), ("127.0.0.1:5000/herd/busybox", "1"));
        assert_eq!(split_image("127.0.0.1:5000/herd/busybox"), ("127.0.0.1:5000/herd/busybox", "latest"));
        assert_eq!(split_image("busybox"), ("busybox", "latest"));
        assert_eq!(split_image("r/x@sha256:ab"), ("r/x@sha256:ab", ""));
    }
}

/// A [`DockerExecutor`] that connects on first use: on a node whose dockerd is socket-activated, the agent
/// registers without waiting for the engine to start, and a node that never runs a container never starts it.
#[derive(Debug, Default)]
pub struct LazyDocker {
    socket: Option<String>,
    cell: tokio::sync::OnceCell<DockerExecutor>,
}

impl LazyDocker {
    /// Connects to `socket` (or the local default) when first needed.
    pub fn new(socket: Option<&str>) -> LazyDocker {
        LazyDocker { socket: socket.map(str::to_owned), cell: tokio::sync::OnceCell::new() }
    }

    async fn get(&self) -> Result<&DockerExecutor, ExecError> {
        self.cell.get_or_try_init(|| DockerExecutor::connect(self.socket.as_deref())).await
    }
}

impl Executor for LazyDocker {
    async fn pull(&self, image: &str) -> Result<(), ExecError> {
        self.get().await?.pull(image).await
    }
    async fn load(&self, unit: &Unit) -> Result<(), ExecError> {
        self.get().await?.load(unit).await
    }
    async fn start(&self, unit: &Unit) -> Result<(), ExecError> {
        self.get().await?.start(unit).await
    }
    async fn stop(&self, unit: &Unit) -> Result<(), ExecError> {
        self.get().await?.stop(unit).await
    }
    async fn unload(&self, unit: &Unit) -> Result<(), ExecError> {
        self.get().await?.unload(unit).await
    }
    async fn state(&self, unit: &Unit) -> ActiveState {
        match self.get().await {
            Ok(d) => d.state(unit).await,
            Err(_) => ActiveState::Failed,
        }
    }
}
