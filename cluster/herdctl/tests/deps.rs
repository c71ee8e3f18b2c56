//! What ships where, read from `cargo metadata`: node-init (on every node) and herdctl (on admins' machines) link
//! the contracts (inventory, config, API, cluster, images), never the provisioner daemon or a test crate; node-init
//! does not link the lab (local etcd/dockerd/registry, benchmarks, QEMU).

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose; the lint guards daemons.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// Package name → the names of its normal (not dev, not build) dependencies, over the whole resolved graph.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--offline", "--filter-platform"])
        // This host's platform: the others' dependencies (Windows consoles, ...) are not downloaded here.
        .arg(format!("{}-unknown-linux-gnu", std::env::consts::ARCH))
        .arg("--manifest-path")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let name_of: BTreeMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let deps = n["deps"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["dep_kinds"].as_array().unwrap().iter().any(|k| k["kind"].is_null()))
                .map(|d| name_of[d["pkg"].as_str().unwrap()].to_owned())
                .collect();
            (name_of[n["id"].as_str().unwrap()].to_owned(), deps)
        })
        .collect()
}

/// Every package `root` links, itself excluded.
fn closure(graph: &BTreeMap<String, BTreeSet<String>>, root: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![root.to_owned()];
    while let Some(p) = todo.pop() {
        for d in &graph[&p] {
            if seen.insert(d.clone()) {
                todo.push(d.clone());
            }
        }
    }
    seen
}

#[test]
fn node_init_and_herdctl_link_contracts_not_daemons_or_test_crates() {
    let g = graph();
    let node_init = closure(&g, "herd-node-init");
    let herdctl = closure(&g, "herdctl");
    for contract in ["herd-inventory", "herd-config", "herd-api", "herd-cluster", "herd-images"] {
        assert!(node_init.contains(contract), "node-init links {contract}");
        assert!(herdctl.contains(contract), "herdctl links {contract}");
    }
    // The provisioner daemon, its store and its HTTP file server; the QEMU test crate.
    for never in ["herd-provisioner", "herd-qemu", "redb", "tower-http"] {
        assert!(!node_init.contains(never), "node-init links {never}");
        assert!(!herdctl.contains(never), "herdctl links {never}");
    }
    // The lab (local etcd, dockerd and registry, hollow-machine benchmarks, QEMU machines) is herdctl's alone.
    assert!(herdctl.contains("herd-lab"));
    assert!(!node_init.contains("herd-lab"), "node-init links the lab");
    assert!(!closure(&g, "herd-cluster").contains("herd-lab"), "the cluster library links the lab");
}
