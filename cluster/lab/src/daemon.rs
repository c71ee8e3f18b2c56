//! Peer daemons for herd's tests and benchmarks (Kea, dnsmasq, nginx, tftpd-hpa, etcd, dockerd, docker-registry,
//! sshd, the QEMU VMs, ...): each is started so that it depends on nothing a package's systemd units would have
//! made, and is stopped with everything it started.
//!
//! - **A private, empty `/run`.** Every daemon runs in its own mount namespace with an empty tmpfs over `/run`
//!   (and so over `/var/run`, a symlink to it on Debian): `/run/kea`, `/run/nginx`, `/run/sshd`, `/run/containerd`
//!   are absent, whether or not this host has them. A daemon that needs a runtime directory gets it by name
//!   ([`Spec::run_dir`], as systemd's `RuntimeDirectory=` would make it), everything else (PID, lock, socket, log and
//!   state files) goes to the test's own scratch directory by the daemon's flags. So a test that passes here passes
//!   on a fresh machine (issue #26: Kea found the `/run/kea` an earlier run had left and CI stayed green).
//! - **Its own process group.** The daemon leads a new process group; [`Daemon`]'s drop signals the whole group
//!   (nginx's workers, dockerd's containerd and shims) and reaps the leader, also when the test panics.
//!
//! The PID of a [`Daemon`] is the daemon's own (`ip netns exec`, `unshare` and the shell all `exec`), so
//! `/proc/PID/stat` measures the daemon. Needs root (mount namespaces).
//!
//! Limits: the daemon still sees the host's `/etc`, `/var/lib` and `/var/log`; tests point every state path into
//! their scratch directory with the daemon's own flags.

use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// The shell step that runs before the daemon: mount the empty `/run`, make the named runtime directories, exec.
const PRELUDE: &str = r#"set -e
mount -t tmpfs -o mode=0755,size=64m,nosuid,nodev herd-private-run /run
for d in $HERD_RUN_DIRS; do mkdir -p -m 0755 "/run/$d"; done
unset HERD_RUN_DIRS
exec "$@""#;

/// How to start a peer daemon.
#[derive(Debug, Clone)]
pub struct Spec {
    name: String,
    program: OsString,
    args: Vec<OsString>,
    netns: Option<String>,
    env: Vec<(OsString, OsString)>,
    run_dirs: Vec<String>,
    log: Option<PathBuf>,
    grace: Duration,
}

impl Spec {
    /// A daemon `program` (looked up in `PATH`), called `name` in messages.
    pub fn new(name: &str, program: impl AsRef<OsStr>) -> Spec {
        Spec {
            name: name.to_owned(),
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            netns: None,
            env: Vec::new(),
            run_dirs: Vec::new(),
            log: None,
            grace: Duration::ZERO,
        }
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Spec
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Runs it in network namespace `ns` (`ip netns exec`).
    pub fn netns(mut self, ns: &str) -> Spec {
        self.netns = Some(ns.to_owned());
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Spec {
        self.env.push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Makes `/run/DIR` in the daemon's private `/run` before it starts (what the package's systemd unit would
    /// make with `RuntimeDirectory=`), for a path the daemon has compiled in (sshd's `/run/sshd`).
    pub fn run_dir(mut self, dir: &str) -> Spec {
        assert!(
            !dir.is_empty() && dir.split('/').all(|c| !c.is_empty() && c != "." && c != "..") && !dir.contains(' '),
            "run_dir {dir:?}: a relative path without spaces"
        );
        self.run_dirs.push(dir.to_owned());
        self
    }

    /// Sends the daemon's stdout and stderr to `path` (else they are discarded).
    pub fn log(mut self, path: &Path) -> Spec {
        self.log = Some(path.to_owned());
        self
    }

    /// On stop, sends SIGTERM to the group and waits up to `grace` for the daemon to exit before SIGKILL
    /// (dockerd stops its containers on SIGTERM). Zero (the default) kills at once.
    pub fn grace(mut self, grace: Duration) -> Spec {
        self.grace = grace;
        self
    }

    /// The command line that starts it: `[ip netns exec NS] unshare --mount --propagation private sh -c PRELUDE`.
    fn command(&self) -> Command {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "unshare"]);
                c
            }
            None => Command::new("unshare"),
        };
        cmd.args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c", PRELUDE, "herd-peer"]);
        cmd.arg(&self.program).args(&self.args);
        cmd.env("HERD_RUN_DIRS", self.run_dirs.join(" "));
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Starts it, in a process group of its own.
    pub fn spawn(self) -> io::Result<Daemon> {
        use std::os::unix::process::CommandExt;
        let (stdout, stderr) = match &self.log {
            Some(path) => {
                let f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
                (Stdio::from(f.try_clone()?), Stdio::from(f))
            }
            None => (Stdio::null(), Stdio::null()),
        };
        let child =
            self.command().stdin(Stdio::null()).stdout(stdout).stderr(stderr).process_group(0).spawn().map_err(
                |e| io::Error::new(e.kind(), format!("cannot start {} ({:?}): {e}", self.name, self.program)),
            )?;
        Ok(Daemon { name: self.name, child: Some(child), grace: self.grace, status: None })
    }
}

/// A running peer daemon; dropping it stops its whole process group.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Option<Child>,
    grace: Duration,
    /// How the daemon exited, once stopped.
    status: Option<ExitStatus>,
}

impl Daemon {
    /// The daemon's PID (also its process group's ID).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Its name, as given to [`Spec::new`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether it has exited, and how (reaps it if so; its group is still stopped on drop).
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c.try_wait(),
            None => Ok(self.status),
        }
    }

    /// Stops the group (see [`Spec::grace`]) and reaps the daemon.
    pub fn stop(mut self) {
        self.shutdown();
    }

    /// Stops the group now, as [`Daemon::stop`] does, but keeps the handle: a VM's power cut, after which
    /// [`Daemon::try_wait`] reports how it ended. Later calls, and the drop, do nothing more.
    pub fn halt(&mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let Ok(pgid) = i32::try_from(child.id()) else { return };
        let group = Pid::from_raw(pgid);
        if !self.grace.is_zero() && child.try_wait().ok().flatten().is_none() {
            let _ = killpg(group, Signal::SIGTERM);
            let deadline = Instant::now() + self.grace;
            while Instant::now() < deadline && child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // The group outlives its leader while any member lives (nginx's workers once the master is gone), and the
        // kernel does not hand its ID to a new process meanwhile: signal it whether or not the leader has exited.
        let _ = killpg(group, Signal::SIGKILL);
        let _ = child.kill();
        self.status = child.wait().ok();
        // Members die asynchronously after SIGKILL; wait (bounded) until the group is empty.
        let deadline = Instant::now() + Duration::from_secs(5);
        while killpg(group, None).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether any process of its group is still alive.
    pub fn group_alive(pgid: u32) -> bool {
        i32::try_from(pgid).is_ok_and(|p| killpg(Pid::from_raw(p), None).is_ok())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")))
    }

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "{what} within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_daemon_sees_an_empty_run_with_only_its_own_runtime_directories() {
        if !root() {
            eprintln!("skipped: needs root");
            return;
        }
        let scratch = std::env::temp_dir().join(format!("herd-lab-run-{}", std::process::id()));
        std::fs::create_dir_all(&scratch).unwrap();
        // A runtime directory this host has (as a package's tmpfiles would have left it) must not be seen.
        let host_dir = PathBuf::from(format!("/run/herd-lab-probe-{}", std::process::id()));
        std::fs::create_dir_all(&host_dir).unwrap();
        let out = scratch.join("seen");
        let script = format!(
            "ls -A /run > {o}.tmp; [ -d /var/run/sshd ] && echo var-run-sshd >> {o}.tmp; mv {o}.tmp {o}; exec sleep 600",
            o = out.display()
        );
        let daemon = Spec::new("probe", "/bin/sh").args(["-c", &script]).run_dir("sshd").spawn().unwrap();
        wait_until("the probe wrote what it saw", || out.exists());
        let seen = std::fs::read_to_string(&out).unwrap();
        assert_eq!(seen.split_whitespace().collect::<Vec<_>>(), ["sshd", "var-run-sshd"], "{seen}");
        assert!(host_dir.is_dir(), "the host's /run is untouched");
        drop(daemon);
        std::fs::remove_dir(&host_dir).unwrap();
        let _ = std::fs::remove_dir_all(&scratch);
    }

    #[test]
    fn dropping_a_daemon_stops_its_whole_group_and_the_pid_is_the_daemons() {
        if !root() {
            eprintln!("skipped: needs root");
            return;
        }
        // A master that forks two workers and then dies, as nginx's master does on SIGKILL: its workers must go too.
        let daemon =
            Spec::new("workers", "/bin/sh").args(["-c", "sleep 600 & sleep 600 & exec sleep 601"]).spawn().unwrap();
        let pid = daemon.pid();
        wait_until("the daemon execs into sleep 601", || {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == "sleep\x00601\x00")
        });
        let members = || {
            std::fs::read_dir("/proc")
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                        // Field 5 (after the parenthesised name) is the process group.
                        s.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(2)?.parse::<u32>().ok())
                            == Some(pid)
                    })
                })
                .count()
        };
        wait_until("three members in the group", || members() == 3);
        drop(daemon);
        assert!(!Daemon::group_alive(pid), "no member of the group is left");
        assert_eq!(members(), 0);
    }

    #[test]
    fn a_daemon_in_a_network_namespace_keeps_its_pid_through_the_wrappers() {
        if !root() {
            eprintln!("skipped: needs root");
            return;
        }
        let ns = format!("herd-lab-{}", std::process::id());
        assert!(Command::new("ip").args(["netns", "add", &ns]).status().unwrap().success());
        let mut daemon = Spec::new("ns", "/bin/sleep").args(["602"]).netns(&ns).spawn().unwrap();
        let pid = daemon.pid();
        wait_until("ip netns exec, unshare and sh exec into sleep", || {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == "/bin/sleep\x00602\x00")
        });
        let own = std::fs::read_link("/proc/self/ns/net").unwrap();
        assert_ne!(std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap(), own, "in the namespace");
        assert!(daemon.try_wait().unwrap().is_none());
        // A power cut: the handle stays and says how it ended.
        daemon.halt();
        assert!(!Daemon::group_alive(pid), "halted");
        let status = daemon.try_wait().unwrap().expect("a halted daemon reports its end");
        assert!(!status.success(), "killed, not exited: {status}");
        drop(daemon);
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    }
}
