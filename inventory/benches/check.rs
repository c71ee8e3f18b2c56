//! `cargo bench -p herd-inventory`: how long `herdctl inventory check` takes on generated fleets.
//! Goal (issue #2): a 5,000-machine inventory well under 1 s. Prints the median of several runs.

use std::time::{Duration, Instant};

use herd_inventory::{FleetSpec, generate, parse};

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn main() {
    println!("inventory check (parse + validate), median of 11 runs:");
    for machines in [450usize, 5_000] {
        let spec = FleetSpec::new(machines);
        let text = generate(spec).expect("the default spec is generatable");
        let samples: Vec<Duration> = (0..11)
            .map(|_| {
                let start = Instant::now();
                let inv = parse("gen.toml", &text).expect("generated fleets are valid");
                let took = start.elapsed();
                assert_eq!(inv.machines.len(), machines);
                took
            })
            .collect();
        let m = median(samples);
        println!(
            "  {machines:>5} machines ({:>5} KiB, {:>3} racks): {:>8.1} ms  ({:.1} µs/machine; goal < 1000 ms)",
            text.len() / 1024,
            spec.racks,
            m.as_secs_f64() * 1e3,
            m.as_secs_f64() * 1e6 / machines as f64
        );
    }
}
