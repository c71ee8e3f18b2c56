//! Executors: what actually runs a unit on a machine. The agent drives one through the [`Executor`] trait:
//! [`SystemdExecutor`](crate::systemd::SystemdExecutor) for `[Service]` units,
//! [`DockerExecutor`](crate::docker::DockerExecutor) for `[Container]` units, [`Dispatch`] to combine them, [`ProcessExecutor`] to
//! supervise `ExecStart=` directly (development hosts without systemd), and [`RecordingExecutor`] for hollow
//! machines in the scale benchmarks.

use std::collections::HashMap;
use std::future::Future;
use std::process::Stdio;
use std::sync::Mutex;

use tokio::process::{Child, Command};

use crate::record::ActiveState;
use crate::unit::{Unit, UnitName};

/// Why an executor action failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ExecError(pub String);

impl ExecError {
    /// An error with this message.
    pub fn new(msg: impl Into<String>) -> ExecError {
        ExecError(msg.into())
    }
}

/// Runs units on this machine.
pub trait Executor: Send + Sync + 'static {
    /// Makes `image` present locally (pre-warm). Executors without images do nothing.
    fn pull(&self, image: &str) -> impl Future<Output = Result<(), ExecError>> + Send;
    /// Installs the unit (for containers: pulls its image and creates the container), not running it.
    fn load(&self, unit: &Unit) -> impl Future<Output = Result<(), ExecError>> + Send;
    /// Starts an installed unit.
    fn start(&self, unit: &Unit) -> impl Future<Output = Result<(), ExecError>> + Send;
    /// Stops a unit (idempotent).
    fn stop(&self, unit: &Unit) -> impl Future<Output = Result<(), ExecError>> + Send;
    /// Removes an installed unit (idempotent).
    fn unload(&self, unit: &Unit) -> impl Future<Output = Result<(), ExecError>> + Send;
    /// The unit's actual state (polled: a unit that exits on its own shows up here).
    fn state(&self, unit: &Unit) -> impl Future<Output = ActiveState> + Send;
}

/// Container units to one executor, everything else to another.
#[derive(Debug)]
pub struct Dispatch<S, C> {
    /// For `[Service]` (and other non-container) units.
    pub services: S,
    /// For `[Container]` units.
    pub containers: C,
}

impl<S: Executor, C: Executor> Executor for Dispatch<S, C> {
    async fn pull(&self, image: &str) -> Result<(), ExecError> {
        self.containers.pull(image).await
    }
    async fn load(&self, unit: &Unit) -> Result<(), ExecError> {
        if unit.container.is_some() { self.containers.load(unit).await } else { self.services.load(unit).await }
    }
    async fn start(&self, unit: &Unit) -> Result<(), ExecError> {
        if unit.container.is_some() { self.containers.start(unit).await } else { self.services.start(unit).await }
    }
    async fn stop(&self, unit: &Unit) -> Result<(), ExecError> {
        if unit.container.is_some() { self.containers.stop(unit).await } else { self.services.stop(unit).await }
    }
    async fn unload(&self, unit: &Unit) -> Result<(), ExecError> {
        if unit.container.is_some() { self.containers.unload(unit).await } else { self.services.unload(unit).await }
    }
    async fn state(&self, unit: &Unit) -> ActiveState {
        if unit.container.is_some() { self.containers.state(unit).await } else { self.services.state(unit).await }
    }
}

/// Remembers what it was asked and reports units as doing exactly that: the executor of hollow machines
/// (kubemark-style scale benchmarks), where the agent code is real and the workload is not.
#[derive(Debug, Default)]
pub struct RecordingExecutor {
    states: Mutex<HashMap<UnitName, ActiveState>>,
    actions: std::sync::atomic::AtomicU64,
    active: std::sync::atomic::AtomicU64,
    install_delay: std::time::Duration,
}

impl RecordingExecutor {
    /// One whose loading of a unit it has not installed yet takes `delay` (as an image pull would).
    pub fn with_install_delay(delay: std::time::Duration) -> RecordingExecutor {
        RecordingExecutor { install_delay: delay, ..RecordingExecutor::default() }
    }

    /// How many actions (load, start, stop, unload, pull) it was asked for.
    pub fn actions(&self) -> u64 {
        self.actions.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many units it runs now.
    pub fn active(&self) -> u64 {
        self.active.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn set(&self, unit: &Unit, state: Option<ActiveState>) {
        use std::sync::atomic::Ordering::Relaxed;
        self.actions.fetch_add(1, Relaxed);
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let before = match state {
            Some(s) => states.insert(unit.name.clone(), s),
            None => states.remove(&unit.name),
        };
        match (before == Some(ActiveState::Active), state == Some(ActiveState::Active)) {
            (false, true) => {
                self.active.fetch_add(1, Relaxed);
            }
            (true, false) => {
                self.active.fetch_sub(1, Relaxed);
            }
            _ => {}
        }
    }
}

impl Executor for RecordingExecutor {
    async fn pull(&self, _image: &str) -> Result<(), ExecError> {
        self.actions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
    async fn load(&self, unit: &Unit) -> Result<(), ExecError> {
        let installed = self.states.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&unit.name);
        if !installed && !self.install_delay.is_zero() {
            tokio::time::sleep(self.install_delay).await;
        }
        self.set(unit, Some(ActiveState::Loaded));
        Ok(())
    }
    async fn start(&self, unit: &Unit) -> Result<(), ExecError> {
        self.set(unit, Some(ActiveState::Active));
        Ok(())
    }
    async fn stop(&self, unit: &Unit) -> Result<(), ExecError> {
        self.set(unit, Some(ActiveState::Loaded));
        Ok(())
    }
    async fn unload(&self, unit: &Unit) -> Result<(), ExecError> {
        self.set(unit, None);
        Ok(())
    }
    async fn state(&self, unit: &Unit) -> ActiveState {
        let states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        states.get(&unit.name).copied().unwrap_or(ActiveState::Inactive)
    }
}

/// Supervises `[Service] ExecStart=` as a child process (in its own process group, killed with it on stop): for
/// development hosts and test machines without systemd as PID 1. `ExecStart` is split like systemd does it
/// (whitespace, double and single quotes); a leading `-`, `@`, `+` or `!` prefix is dropped.
#[derive(Debug, Default)]
pub struct ProcessExecutor {
    children: tokio::sync::Mutex<HashMap<UnitName, Child>>,
    loaded: Mutex<HashMap<UnitName, Vec<String>>>,
    exited: Mutex<HashMap<UnitName, ActiveState>>,
}

pub use crate::unit::split_command;

impl Executor for ProcessExecutor {
    async fn pull(&self, _image: &str) -> Result<(), ExecError> {
        Ok(())
    }

    async fn load(&self, unit: &Unit) -> Result<(), ExecError> {
        let line = unit
            .file
            .last("Service", "ExecStart")
            .ok_or_else(|| ExecError::new(format!("{}: no [Service] ExecStart=", unit.name)))?;
        // As systemd reads it: `%%` is a literal `%` (herd expanded its own specifiers already).
        let argv = split_command(&crate::unit::literal(line));
        if argv.is_empty() {
            return Err(ExecError::new(format!("{}: empty ExecStart=", unit.name)));
        }
        self.loaded.lock().unwrap_or_else(|p| p.into_inner()).insert(unit.name.clone(), argv);
        Ok(())
    }

    async fn start(&self, unit: &Unit) -> Result<(), ExecError> {
        let mut children = self.children.lock().await;
        if let Some(child) = children.get_mut(&unit.name)
            && child.try_wait().ok().flatten().is_none()
        {
            return Ok(());
        }
        let argv = self.loaded.lock().unwrap_or_else(|p| p.into_inner()).get(&unit.name).cloned();
        let argv = argv.ok_or_else(|| ExecError::new(format!("{}: not loaded", unit.name)))?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        for (k, v) in unit
            .file
            .values("Service", "Environment")
            .iter()
            .flat_map(|e| e.split_whitespace())
            .filter_map(|kv| kv.split_once('='))
        {
            cmd.env(k, v);
        }
        let child = cmd.spawn().map_err(|e| ExecError::new(format!("{}: starting {}: {e}", unit.name, argv[0])))?;
        self.exited.lock().unwrap_or_else(|p| p.into_inner()).remove(&unit.name);
        children.insert(unit.name.clone(), child);
        Ok(())
    }

    async fn stop(&self, unit: &Unit) -> Result<(), ExecError> {
        let child = self.children.lock().await.remove(&unit.name);
        if let Some(mut child) = child {
            if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                // The whole process group: what the unit started goes with it, as systemd's KillMode=control-group.
                let group = nix::unistd::Pid::from_raw(pid);
                let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGTERM);
                if tokio::time::timeout(std::time::Duration::from_secs(3), child.wait()).await.is_err() {
                    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
                }
            }
            let _ = child.wait().await;
        }
        self.exited.lock().unwrap_or_else(|p| p.into_inner()).insert(unit.name.clone(), ActiveState::Loaded);
        Ok(())
    }

    async fn unload(&self, unit: &Unit) -> Result<(), ExecError> {
        self.stop(unit).await?;
        self.loaded.lock().unwrap_or_else(|p| p.into_inner()).remove(&unit.name);
        self.exited.lock().unwrap_or_else(|p| p.into_inner()).remove(&unit.name);
        Ok(())
    }

    async fn state(&self, unit: &Unit) -> ActiveState {
        let mut children = self.children.lock().await;
        if let Some(child) = children.get_mut(&unit.name) {
            match child.try_wait() {
                Ok(None) => return ActiveState::Active,
                Ok(Some(status)) => {
                    let s = if status.success() { ActiveState::Inactive } else { ActiveState::Failed };
                    children.remove(&unit.name);
                    self.exited.lock().unwrap_or_else(|p| p.into_inner()).insert(unit.name.clone(), s);
                    return s;
                }
                Err(_) => return ActiveState::Failed,
            }
        }
        if let Some(s) = self.exited.lock().unwrap_or_else(|p| p.into_inner()).get(&unit.name) {
            return *s;
        }
        if self.loaded.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&unit.name) {
            ActiveState::Loaded
        } else {
            ActiveState::Inactive
        }
    }
}
