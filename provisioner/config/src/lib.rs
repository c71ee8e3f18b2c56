//! Machine configs, the contract between the inventory and a booting machine: [`ignition`] renders each machine's
//! Ignition 3.3.0 config from the inventory and its role, [`lint`] checks configs for the foot-guns
//! `ignition-validate` misses, [`cloud_config`] translates CoreOS cloud-configs to Ignition and back, and [`node`] is
//! node-init's own config file inside it. Pure functions: the provisioner serves what they render, herdctl prints
//! it, and node-init (a static binary) reads [`node`] without linking any daemon.

pub mod cloud_config;
pub mod ignition;
pub mod lint;
pub mod node;
