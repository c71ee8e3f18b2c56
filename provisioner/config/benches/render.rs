//! `cargo bench -p herd-config --bench render`: rendering every machine's Ignition config of the seed site
//! (goal, issue #3: all 450+ in ≤ 1 s in release). Prints the median of several runs.

use std::path::Path;
use std::time::{Duration, Instant};

fn main() {
    let site = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/site-450.toml");
    let inv = herd_inventory::load(&site).expect("the seed site is valid");
    let mut samples: Vec<Duration> = (0..7)
        .map(|_| {
            let start = Instant::now();
            let mut bytes = 0;
            for machine in &inv.machines {
                let config = herd_config::ignition::render(&inv, machine).expect("every machine renders");
                bytes += herd_config::ignition::to_json(&config).len();
            }
            assert!(bytes > 0);
            start.elapsed()
        })
        .collect();
    samples.sort();
    let m = samples[samples.len() / 2];
    println!(
        "render + serialize Ignition for all {} machines of examples/site-450.toml: {:.1} ms ({:.0} µs/machine; goal ≤ 1000 ms)",
        inv.machines.len(),
        m.as_secs_f64() * 1e3,
        m.as_secs_f64() * 1e6 / inv.machines.len() as f64
    );
}
