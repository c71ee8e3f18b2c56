//! `herdctl bench scheduler|failover`: the cluster's scale and failover figures, printed beside the anchors'.

use std::process::ExitCode;
use std::time::Duration;

use herd_lab::bench::{self, BenchConfig};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::{BenchArgs, BenchCommand, ClusterArgs};

fn config(cluster: &ClusterArgs, args: &BenchArgs, ttl: u64) -> BenchConfig {
    BenchConfig {
        machines: args.machines,
        units: args.units,
        racks: args.racks,
        connections: args.connections,
        ttl: Duration::from_secs(ttl.max(2)),
        endpoints: args.use_endpoint.then(|| cluster.endpoint.clone()),
        etcd_members: args.etcd_members,
        dir: std::env::temp_dir().join(format!("herd-bench-{}", std::process::id())),
        secure: false,
    }
}

/// The main phase's placement rate (units placed per second).
fn placed_per_s(report: &bench::SchedulerReport) -> f64 {
    report.phases.last().map_or(0.0, |p| p.units as f64 / p.placed.as_secs_f64())
}

fn bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg:24} [{bar:40}] {pos}/{len} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

/// Memory one hollow machine (the agent's state for its units, its etcd session) may add, KiB.
const MEMORY_GOAL_KIB: f64 = 1024.0;

pub(crate) fn run(cluster: &ClusterArgs, command: BenchCommand) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let bar = bar();
    let progress = |what: &str, done: u64, of: u64| {
        if bar.message() != what {
            bar.set_message(what.to_owned());
        }
        bar.set_length(of);
        bar.set_position(done);
    };
    match command {
        BenchCommand::Scheduler { args, ttl, tls } => {
            let mut runs = Vec::new();
            for secure in if tls { &[false, true][..] } else { &[false][..] } {
                let cfg = BenchConfig { secure: *secure, ..config(cluster, &args, ttl) };
                let report = rt.block_on(bench::scheduler(&cfg, &progress));
                bar.reset();
                let _ = std::fs::remove_dir_all(&cfg.dir);
                let report = report?;
                let failed = print_scheduler(cluster, &args, &cfg, &report);
                if failed {
                    return Ok(ExitCode::FAILURE);
                }
                runs.push(report);
            }
            bar.finish_and_clear();
            if let [plain, secure] = &runs[..] {
                let (a, b) = (placed_per_s(plain), placed_per_s(secure));
                println!(
                    "scheduler with mutual TLS and etcd roles: {b:.0} units/s placed vs {a:.0} without, {:+.1} % \
                     (goal: at most 15 % slower, and >= 1,500 units/s)",
                    (b / a - 1.0) * 100.0
                );
            }
        }
        BenchCommand::Failover { args, ttl, trials } => {
            let cfg = config(cluster, &args, ttl);
            let report = rt.block_on(bench::failover(&cfg, trials, &progress));
            bar.finish_and_clear();
            let _ = std::fs::remove_dir_all(&cfg.dir);
            let report = report?;
            println!(
                "failover: {} hollow machines, {} units, lease TTL {} s, grace {:.1} s",
                args.machines,
                args.units,
                report.ttl.as_secs(),
                report.grace.as_secs_f64()
            );
            for (i, (lost, took)) in report.trials.iter().enumerate() {
                println!(
                    "  kill {}: {lost} units running elsewhere after {:.2} s = {:.2} x TTL (goal <= 2 x TTL; fleet: \
                     TTL 30 s, no fencing)",
                    i + 1,
                    took.as_secs_f64(),
                    took.as_secs_f64() / report.ttl.as_secs_f64()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints one scheduler run; true if its outcome is wrong (memory over the goal).
fn print_scheduler(
    cluster: &ClusterArgs,
    args: &crate::cli::BenchArgs,
    cfg: &BenchConfig,
    report: &bench::SchedulerReport,
) -> bool {
    let etcd = if args.use_endpoint {
        format!("etcd at {}", cluster.endpoint.join(","))
    } else if cfg.secure {
        format!("a local {}-member etcd with mutual TLS and users and roles", args.etcd_members)
    } else {
        format!("a local {}-member etcd", args.etcd_members)
    };
    println!(
        "scheduler: {} hollow machines ({} racks) on {etcd} registered in {:.1} s; {:.0} KiB of memory per \
         hollow machine (goal <= {MEMORY_GOAL_KIB:.0})",
        report.machines,
        args.racks,
        report.registered.as_secs_f64(),
        report.rss_per_machine_kib
    );
    println!(
        "  phase   units   total   submit s  placed s  running s  placed/s  running/s  etcd req/unit  idle etcd req/s"
    );
    for (i, p) in report.phases.iter().enumerate() {
        println!(
            "  {:<5} {:>7} {:>7} {:>10.2} {:>9.2} {:>10.2} {:>9.0} {:>10.0} {:>14.2} {:>16.0}",
            i + 1,
            p.units,
            p.total,
            p.submit.as_secs_f64(),
            p.placed.as_secs_f64(),
            p.running.as_secs_f64(),
            p.units as f64 / p.placed.as_secs_f64(),
            p.units as f64 / p.running.as_secs_f64(),
            p.requests_per_unit,
            p.idle_requests_per_sec
        );
    }
    println!(
        "  anchors (published): fleet ~100 machines / 1,000 units ceiling; Kubernetes ~100 pods/s; \
         Nomad C2M ~1,500 units/s. herd goal: >= 1,500 units/s placed, idle etcd traffic flat as units grow \
         (keep-alives only: {} machines / {} s = {:.0} req/s)",
        args.machines,
        cfg.ttl.as_secs() / 3,
        args.machines as f64 / (cfg.ttl.as_secs_f64() / 3.0)
    );
    // Timings are figures; memory over its goal is a wrong outcome (a node could not host the agent).
    if report.rss_per_machine_kib > MEMORY_GOAL_KIB {
        eprintln!(
            "herdctl: bench failed: {:.0} KiB per hollow machine, over the goal of {MEMORY_GOAL_KIB:.0}",
            report.rss_per_machine_kib
        );
        return true;
    }
    false
}
