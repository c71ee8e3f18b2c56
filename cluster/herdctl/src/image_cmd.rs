//! `herdctl image build|install|slots`.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use herd_images::build::{BuildOptions, Stage, build};
use herd_images::slot::{self, SlotState};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::{ImageCommand, Output};

pub(crate) fn run(command: ImageCommand) -> anyhow::Result<ExitCode> {
    match command {
        ImageCommand::Build { manifest, out, cache, source_date_epoch, no_cache, node_init } => {
            let opts = BuildOptions { out, cache, epoch: source_date_epoch, no_cache, node_init };
            build_cmd(&manifest, &opts)
        }
        ImageCommand::Install { disk, slot, slot_size, image } => {
            let bar = ProgressBar::new_spinner();
            bar.set_message(format!("writing {} into slot {slot} of {}", image.display(), disk.display()));
            bar.enable_steady_tick(std::time::Duration::from_millis(200));
            let started = Instant::now();
            let done = slot::on_raw(&disk, |raw| slot::install(raw, slot, &image, slot_size << 20));
            bar.finish_and_clear();
            let done = done.with_context(|| format!("installing into {}", disk.display()))?;
            if done.partitioned {
                println!("{}: partitioned (USR-A, USR-B, STATE) and STATE formatted", disk.display());
            }
            println!(
                "slot {}: {} {} (root hash {}) in {:.1} s; {}",
                done.slot,
                done.header.name,
                done.header.release,
                &done.header.root_hash[..16],
                started.elapsed().as_secs_f64(),
                if done.flags.successful { "good".to_owned() } else { "to be tried once on the next boot".into() }
            );
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::Slots { disk, try_slot, good, bad, output } => {
            let slots = if try_slot.is_none() && good.is_none() && bad.is_none() {
                slot::on_raw(&disk, |raw| Ok(slot::read_slots(&mut std::fs::File::open(raw)?)?.1))
                    .with_context(|| disk.display().to_string())?
            } else {
                slot::on_raw(&disk, |raw| {
                    slot::update(raw, |t| {
                        if let Some(s) = try_slot {
                            slot::mark_try(t, s);
                        }
                        if let Some(s) = good {
                            slot::mark_good(t, s);
                        }
                        if let Some(s) = bad {
                            slot::mark_bad(t, s);
                        }
                    })
                })?
            };
            print_slots(&slots, output)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_slots(slots: &[SlotState], output: Output) -> anyhow::Result<()> {
    if output.json(slots)? {
        return Ok(());
    }
    let order = slot::boot_order(slots);
    println!("{:<5} {:<9} {:<6} {:<11} {:<28} ROOT HASH", "SLOT", "PRIORITY", "TRIES", "SUCCESSFUL", "IMAGE");
    for s in slots {
        let image = s.header.as_ref().map_or("(empty)".to_owned(), |h| format!("{} {}", h.name, h.release));
        let hash = s.header.as_ref().map_or("-".to_owned(), |h| h.root_hash[..16].to_owned());
        println!(
            "{:<5} {:<9} {:<6} {:<11} {:<28} {hash}",
            s.slot.label(),
            s.flags.priority,
            s.flags.tries,
            if s.flags.successful { "yes" } else { "no" },
            image
        );
    }
    match order.first() {
        Some(s) => println!("next boot: slot {s}"),
        None => println!("next boot: no bootable slot"),
    }
    Ok(())
}

fn build_cmd(manifest: &std::path::Path, opts: &BuildOptions) -> anyhow::Result<ExitCode> {
    let m = match herd_images::manifest::load(manifest) {
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
    let built = build(&m, opts, &progress);
    bar.finish_and_clear();
    let built = built.with_context(|| format!("building {}", manifest.display()))?;
    let d = &built.manifest;
    println!(
        "{} {}: {} in {:.1} s -> {}",
        d.name,
        d.release,
        if built.cached { "from the cache" } else { "built" },
        started.elapsed().as_secs_f64(),
        opts.out.display()
    );
    for (name, f) in &d.files {
        println!("  {name:<14} {:>8.1} MiB  sha256 {}", f.size as f64 / (1 << 20) as f64, &f.sha256[..16]);
    }
    println!("  verity root hash {}", d.verity.root_hash);
    println!("  initramfs modules: {}", d.kernel.initramfs_modules.len());
    println!("  kernel command line: {}", d.cmdline);
    Ok(ExitCode::SUCCESS)
}
