//! What the provisioner benchmarks share: a server and a client network namespace joined by a veth pair, and
//! starting and stopping servers inside the server namespace. Needs root.

#![allow(dead_code, unreachable_pub)] // Each bench uses part of it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub use herd_lab::daemon::{Daemon, Spec};

/// Runs a command quietly; whether it succeeded.
pub fn run(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Two namespaces and a veth pair between them.
pub struct Pair {
    pub server_ns: &'static str,
    pub client_ns: &'static str,
    pub server_if: &'static str,
    pub client_if: &'static str,
}

impl Pair {
    /// Creates the pair with the server side at `server_cidr` and, if given, the client side at `client_cidr`.
    pub fn create(names: [&'static str; 4], server_cidr: &str, client_cidr: Option<&str>) -> Pair {
        let [server_ns, client_ns, server_if, client_if] = names;
        let pair = Pair { server_ns, client_ns, server_if, client_if };
        pair.destroy();
        let mut steps = vec![
            vec!["netns", "add", server_ns],
            vec!["netns", "add", client_ns],
            vec!["link", "add", server_if, "type", "veth", "peer", "name", client_if],
            vec!["link", "set", server_if, "netns", server_ns],
            vec!["link", "set", client_if, "netns", client_ns],
            vec!["-n", server_ns, "addr", "add", server_cidr, "dev", server_if],
        ];
        if let Some(cidr) = client_cidr {
            steps.push(vec!["-n", client_ns, "addr", "add", cidr, "dev", client_if]);
        }
        steps.extend([
            vec!["-n", server_ns, "link", "set", server_if, "up"],
            vec!["-n", client_ns, "link", "set", client_if, "up"],
            vec!["-n", server_ns, "link", "set", "lo", "up"],
            vec!["-n", client_ns, "link", "set", "lo", "up"],
        ]);
        for args in steps {
            assert!(run("ip", &args), "ip {args:?} failed (the benchmarks need root)");
        }
        pair
    }

    /// Deletes both namespaces (and so the veth pair).
    pub fn destroy(&self) {
        run("ip", &["netns", "del", self.server_ns]);
        run("ip", &["netns", "del", self.client_ns]);
    }

    /// Starts `cmd` in the server namespace (a [`Daemon`]: a private, empty `/run`, its own process group) and
    /// waits until `ss -ulnt` there shows `marker` (e.g. ":67 ").
    pub fn start(&self, cmd: &[&str], marker: &str) -> Daemon {
        self.start_spec(Spec::new(cmd[0], cmd[0]).args(&cmd[1..]), marker)
    }

    /// Like [`Pair::start`], for a daemon that needs more than a command line (environment, a log).
    pub fn start_spec(&self, spec: Spec, marker: &str) -> Daemon {
        let mut child = spec.netns(self.server_ns).spawn().expect("server starts");
        let begun = Instant::now();
        loop {
            let ss = Command::new("ip").args(["netns", "exec", self.server_ns, "ss", "-ulnt"]).output().expect("ss");
            if String::from_utf8_lossy(&ss.stdout).contains(marker) {
                return child;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{} exited with {status}", child.name());
            }
            assert!(begun.elapsed() < Duration::from_secs(15), "{} did not start listening ({marker})", child.name());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts herd's provisioner (this package's binary) on the server side with `inventory` and `state`, plus
    /// `extra` arguments; waits until `marker` is listening.
    pub fn start_provisioner(
        &self,
        inventory: &std::path::Path,
        state: &std::path::Path,
        extra: &[&str],
        marker: &str,
    ) -> Daemon {
        let (inventory, state) = (inventory.to_str().expect("utf-8 path"), state.to_str().expect("utf-8 path"));
        let mut cmd = vec![
            env!("CARGO_BIN_EXE_provisioner"),
            "--inventory",
            inventory,
            "--interface",
            self.server_if,
            "--state-dir",
            state,
        ];
        cmd.extend_from_slice(extra);
        self.start(&cmd, marker)
    }

    /// Runs `f` on a thread inside `ns`.
    pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{ns}");
        std::thread::spawn(move || {
            let file = std::fs::File::open(path).expect("namespace");
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("namespace thread")
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.destroy();
    }
}

/// Stops a server and everything it started (its whole process group) and reaps it; a benchmark that leaves a
/// process behind (nginx's workers once did) fails.
pub fn stop(daemon: Daemon) {
    let (pgid, name) = (daemon.pid(), daemon.name().to_owned());
    daemon.stop();
    assert!(!Daemon::group_alive(pgid), "{name}: a process of its group outlived the benchmark");
}
