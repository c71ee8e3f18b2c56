//! `[Service]` units under systemd, through `systemctl`: the unit file goes to `/run/systemd/system` (runtime
//! units: gone at reboot, as fleet's were, and outside the read-only root), then `daemon-reload` and
//! `start`/`stop`. systemd ignores the `X-` sections herd reads.

use std::path::PathBuf;

use tokio::process::Command;

use crate::exec::{ExecError, Executor};
use crate::record::ActiveState;
use crate::unit::Unit;

/// Runs units through the machine's systemd.
#[derive(Debug, Clone)]
pub struct SystemdExecutor {
    dir: PathBuf,
}

impl Default for SystemdExecutor {
    fn default() -> Self {
        SystemdExecutor { dir: PathBuf::from("/run/systemd/system") }
    }
}

async fn systemctl(args: &[&str]) -> Result<String, ExecError> {
    let out = Command::new("systemctl")
        .args(args)
        .output()
        .await
        .map_err(|e| ExecError::new(format!("systemctl {}: {e}", args.join(" "))))?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if out.status.success() {
        Ok(text)
    } else {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        Err(ExecError::new(format!("systemctl {}: {}", args.join(" "), if err.is_empty() { text } else { err })))
    }
}

impl Executor for SystemdExecutor {
    async fn pull(&self, _image: &str) -> Result<(), ExecError> {
        Ok(())
    }

    async fn load(&self, unit: &Unit) -> Result<(), ExecError> {
        let path = self.dir.join(unit.name.as_str());
        let text = crate::unit::render(&unit.file);
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(|e| ExecError::new(format!("{}: {e}", self.dir.display())))?;
        tokio::fs::write(&path, text).await.map_err(|e| ExecError::new(format!("{}: {e}", path.display())))?;
        systemctl(&["daemon-reload"]).await.map(|_| ())
    }

    async fn start(&self, unit: &Unit) -> Result<(), ExecError> {
        systemctl(&["start", unit.name.as_str()]).await.map(|_| ())
    }

    async fn stop(&self, unit: &Unit) -> Result<(), ExecError> {
        systemctl(&["stop", unit.name.as_str()]).await.map(|_| ())
    }

    async fn unload(&self, unit: &Unit) -> Result<(), ExecError> {
        let _ = self.stop(unit).await;
        let path = self.dir.join(unit.name.as_str());
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ExecError::new(format!("{}: {e}", path.display()))),
        }
        systemctl(&["daemon-reload"]).await.map(|_| ())
    }

    async fn state(&self, unit: &Unit) -> ActiveState {
        // `is-active` exits non-zero for anything but active; its output is what we need.
        let out = Command::new("systemctl").args(["is-active", unit.name.as_str()]).output().await;
        match out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).as_deref() {
            Ok("active" | "activating" | "reloading") => ActiveState::Active,
            Ok("failed") => ActiveState::Failed,
            Ok("inactive") => ActiveState::Loaded,
            _ => ActiveState::Inactive,
        }
    }
}
