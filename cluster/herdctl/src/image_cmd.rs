//! `herdctl image build`.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use herd_images::build::{BuildOptions, Stage, build};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::ImageCommand;

pub(crate) fn run(command: ImageCommand) -> anyhow::Result<ExitCode> {
    let ImageCommand::Build { manifest, out, cache, source_date_epoch, no_cache } = command;
    let m = match herd_images::manifest::load(&manifest) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("{e}");
            eprintln!("herdctl: the manifest has problems; nothing was built");
            return Ok(ExitCode::from(1));
        }
    };
    let bar = ProgressBar::new(Stage::ALL.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{pos}/{len}] {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let started = Instant::now();
    let progress = |stage: Stage| {
        let i = Stage::ALL.iter().position(|s| *s == stage).unwrap_or(0);
        bar.set_position(i as u64 + 1);
        bar.set_message(stage.describe());
    };
    let opts = BuildOptions { out: out.clone(), cache, epoch: source_date_epoch, no_cache };
    let built = build(&m, &opts, &progress);
    bar.finish_and_clear();
    let built = built.with_context(|| format!("building {}", manifest.display()))?;
    let d = &built.manifest;
    println!(
        "{} {}: {} in {:.1} s -> {}",
        d.name,
        d.release,
        if built.cached { "from the cache" } else { "built" },
        started.elapsed().as_secs_f64(),
        out.display()
    );
    for (name, f) in &d.files {
        println!("  {name:<14} {:>8.1} MiB  sha256 {}", f.size as f64 / (1 << 20) as f64, &f.sha256[..16]);
    }
    println!("  verity root hash {}", d.verity.root_hash);
    println!("  not built yet: {}", d.not_built.join(", "));
    Ok(ExitCode::SUCCESS)
}
