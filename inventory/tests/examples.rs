//! Every example in `examples/` parses and validates: the shipped files must never rot.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose; the lint guards daemons.

use std::path::Path;

#[test]
fn every_example_inventory_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "toml") {
            let inv = herd_inventory::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(!inv.machines.is_empty(), "{}", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 2, "expected at least site-450.toml and qemu-3.toml, found {checked}");
}

#[test]
fn the_seed_site_has_what_the_design_asks_for() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/site-450.toml");
    let inv = herd_inventory::load(&path).unwrap();
    assert!(inv.machines.len() >= 450);
    assert!(inv.racks.len() > 1);
    let masters: Vec<_> = inv.etcd_members().collect();
    assert_eq!(masters.len(), 3);
    assert!(masters.iter().all(|m| m.external.is_some()), "masters have an external interface");
    assert!(inv.machines.iter().all(|m| m.bond.as_ref().is_some_and(|b| b.members.get_ref().len() == 2)));
    assert!(inv.network.external.is_some());
}
