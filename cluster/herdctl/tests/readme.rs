//! README.md's newcomer paths, run as the README shows them: the inventory tour (`scripts/inventory-tour.sh`),
//! from a directory other than the repository, with this build's herdctl; what README says it prints is what it
//! prints (issue #26: the tour had stopped at its step 4 and nothing noticed).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().parent().unwrap()
}

/// The lines of the first fenced block after `heading` in README.md.
fn readme_block(heading: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(workspace().join("README.md")).unwrap();
    let (_, after) = readme.split_once(heading).unwrap_or_else(|| panic!("README has {heading:?}"));
    let (_, block) = after.split_once("```\n").expect("a fenced block after the heading");
    let (block, _) = block.split_once("```").expect("the block ends");
    block.lines().map(str::to_owned).collect()
}

/// Removes the tour's bold escapes (`ESC[1m` ... `ESC[0m`).
fn plain(text: &str) -> String {
    text.replace("\u{1b}[1m", "").replace("\u{1b}[0m", "")
}

#[test]
fn the_inventory_tour_runs_from_any_directory_and_prints_what_the_readme_shows() {
    let elsewhere = std::env::temp_dir();
    let out = Command::new(workspace().join("scripts/inventory-tour.sh"))
        .env("HERDCTL", env!("CARGO_BIN_EXE_herdctl"))
        .current_dir(&elsewhere)
        .output()
        .unwrap();
    // herdctl reports problems on stderr; a newcomer's terminal shows both.
    let stdout = plain(&format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)));
    assert!(out.status.success(), "the tour failed ({}):\n{stdout}", out.status);
    // Step 1, as README quotes it.
    assert!(stdout.contains("examples/site-450.toml: ok: 456 machines, 12 racks, 2 roles, 3 etcd members"), "{stdout}");
    // Step 3: the generated fleet passes its check.
    assert!(stdout.contains("fleet-5000.toml: ok: 5000 machines"), "{stdout}");
    // Step 4: the plan names the moved address and the relabelled rack.
    assert!(stdout.contains("~ machine r02-m05: reboot to apply"), "{stdout}");
    assert!(stdout.contains("labels.power: (unset) -> \"feed-b\""), "{stdout}");
    // Step 5: README's block, line for line.
    let block = readme_block("## The inventory tour");
    assert!(block.len() >= 3, "{block:?}");
    for line in &block {
        assert!(stdout.lines().any(|l| l == line), "README shows {line:?}; the tour printed:\n{stdout}");
    }
}
