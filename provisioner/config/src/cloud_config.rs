//! Legacy input: CoreOS `#cloud-config` translated into the same Ignition 3.3.0 herd renders, for sites moving
//! from Container Linux.
//!
//! Translated: `hostname`, `users` (name, passwd hash, groups, ssh_authorized_keys), top-level
//! `ssh_authorized_keys` (to the `core` user, as CoreOS did), `write_files` (path, content, octal permissions,
//! owner, base64 encoding), `coreos.units` (content, enable, `command: start`, mask, drop-ins) and `coreos.etcd2`
//! (to `/etc/default/etcd`, with CoreOS's `etcd2.service` renamed to Debian's `etcd.service`). Anything else is
//! refused by name rather than silently dropped; so are cloud-config's
//! `$private_ipv4`-style substitutions, which have no meaning without the old metadata service.

use std::collections::BTreeMap;

use base64::Engine as _;
use ignition_config::v3_3 as ign;
use serde::{Deserialize, Serialize};

use crate::ignition::{data_url, percent_decode};

/// Why a cloud-config cannot be translated.
#[derive(Debug, thiserror::Error)]
pub enum TranslateError {
    /// The first line is not `#cloud-config`.
    #[error("not a cloud-config: the first line must be `#cloud-config`")]
    NotCloudConfig,
    /// Not YAML, or YAML of the wrong shape.
    #[error("invalid cloud-config")]
    Yaml(#[from] serde_yaml_ng::Error),
    /// Keys herd does not translate.
    #[error("cannot translate {0}; remove them or express them in the inventory")]
    Unsupported(String),
    /// A value herd cannot translate.
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default)]
struct CloudConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    hostname: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    users: Vec<CcUser>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ssh_authorized_keys: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    write_files: Vec<CcFile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    coreos: Option<Coreos>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_yaml_ng::Value>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default)]
struct CcUser {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    gecos: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    passwd: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shell: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    groups: Vec<String>,
    // coreos-cloudinit spelled it with dashes inside `users`.
    #[serde(alias = "ssh-authorized-keys", skip_serializing_if = "Vec::is_empty")]
    ssh_authorized_keys: Vec<String>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_yaml_ng::Value>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default)]
struct CcFile {
    path: String,
    content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    permissions: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    owner: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encoding: Option<String>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_yaml_ng::Value>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default)]
struct Coreos {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    units: Vec<CcUnit>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    etcd2: BTreeMap<String, serde_yaml_ng::Value>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_yaml_ng::Value>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default)]
struct CcUnit {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    command: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    enable: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mask: Option<bool>,
    #[serde(rename = "drop-ins", skip_serializing_if = "Vec::is_empty")]
    drop_ins: Vec<CcDropIn>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_yaml_ng::Value>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default)]
struct CcDropIn {
    name: String,
    content: String,
}

/// Translates a `#cloud-config` document into an Ignition 3.3.0 config.
pub fn translate(text: &str) -> Result<ign::Config, TranslateError> {
    if text.lines().next().map(str::trim_end) != Some("#cloud-config") {
        return Err(TranslateError::NotCloudConfig);
    }
    let cc: CloudConfig = serde_yaml_ng::from_str(text)?;
    refuse_unknown(&cc)?;

    let mut files = Vec::new();
    let mut users = Vec::new();
    if let Some(hostname) = &cc.hostname {
        files.push(file("/etc/hostname", data_url(&format!("{hostname}\n")), 0o644, None));
    }
    for u in &cc.users {
        let mut added = user(&u.name, u.passwd.clone(), u.groups.clone(), u.ssh_authorized_keys.clone());
        added.gecos = u.gecos.clone();
        added.shell = u.shell.clone();
        users.push(added);
    }
    if !cc.ssh_authorized_keys.is_empty() {
        match users.iter_mut().find(|u| u.name == "core") {
            Some(core) => core.ssh_authorized_keys.get_or_insert_with(Vec::new).extend(cc.ssh_authorized_keys.clone()),
            None => users.push(user("core", None, Vec::new(), cc.ssh_authorized_keys.clone())),
        }
    }
    for (i, f) in cc.write_files.iter().enumerate() {
        files.push(write_file(i, f)?);
    }
    let mut units = Vec::new();
    if let Some(coreos) = &cc.coreos {
        for u in &coreos.units {
            units.push(unit(u)?);
        }
        if !coreos.etcd2.is_empty() {
            files.push(file("/etc/default/etcd", data_url(&etcd2_environment(&coreos.etcd2)?), 0o644, None));
            if !units.iter().any(|u| u.name == "etcd.service") {
                units.push(ign::Unit {
                    contents: None,
                    dropins: None,
                    enabled: Some(true),
                    mask: None,
                    name: "etcd.service".into(),
                });
            }
        }
    }

    Ok(crate::ignition::assemble(files, units, users))
}

fn refuse_unknown(cc: &CloudConfig) -> Result<(), TranslateError> {
    let mut keys: Vec<String> = cc.other.keys().cloned().collect();
    keys.extend(cc.users.iter().flat_map(|u| u.other.keys().map(move |k| format!("users[{}].{k}", u.name))));
    keys.extend(
        cc.write_files.iter().flat_map(|f| f.other.keys().map(move |k| format!("write_files[{}].{k}", f.path))),
    );
    if let Some(coreos) = &cc.coreos {
        keys.extend(coreos.other.keys().map(|k| format!("coreos.{k}")));
        keys.extend(
            coreos.units.iter().flat_map(|u| u.other.keys().map(move |k| format!("coreos.units[{}].{k}", u.name))),
        );
    }
    if keys.is_empty() { Ok(()) } else { Err(TranslateError::Unsupported(keys.join(", "))) }
}

fn user(name: &str, hash: Option<String>, groups: Vec<String>, keys: Vec<String>) -> ign::User {
    ign::User {
        gecos: None,
        groups: (!groups.is_empty()).then_some(groups),
        home_dir: None,
        name: name.to_owned(),
        no_create_home: None,
        no_log_init: None,
        no_user_group: None,
        password_hash: hash,
        primary_group: None,
        shell: None,
        should_exist: None,
        ssh_authorized_keys: (!keys.is_empty()).then_some(keys),
        system: None,
        uid: None,
    }
}

fn file(path: &str, source: String, mode: u32, owner: Option<(String, Option<String>)>) -> ign::File {
    let (user, group) = match owner {
        Some((u, g)) => {
            (Some(ign::NodeUser { id: None, name: Some(u) }), g.map(|g| ign::NodeGroup { id: None, name: Some(g) }))
        }
        None => (None, None),
    };
    ign::File {
        append: None,
        contents: Some(ign::Resource {
            compression: None,
            http_headers: None,
            source: Some(source),
            verification: None,
        }),
        group,
        mode: Some(i64::from(mode)),
        overwrite: Some(true),
        path: path.to_owned(),
        user,
    }
}

fn write_file(i: usize, f: &CcFile) -> Result<ign::File, TranslateError> {
    let at = format!("write_files[{i}] ({})", f.path);
    if !f.path.starts_with('/') {
        return Err(TranslateError::Invalid(format!("{at}: path must be absolute")));
    }
    // cloud-config permissions are octal strings ("0644", "644"); Ignition wants the number.
    let mode = match &f.permissions {
        Some(p) => u32::from_str_radix(p.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| TranslateError::Invalid(format!("{at}: permissions {p:?} is not an octal mode")))?,
        None => 0o644,
    };
    let source = match f.encoding.as_deref() {
        None | Some("") => data_url(&f.content),
        Some("b64" | "base64") => {
            let raw = f.content.split_whitespace().collect::<String>();
            base64::engine::general_purpose::STANDARD
                .decode(&raw)
                .map_err(|e| TranslateError::Invalid(format!("{at}: content is not valid base64: {e}")))?;
            format!("data:;base64,{raw}")
        }
        Some(other) => {
            return Err(TranslateError::Invalid(format!(
                "{at}: encoding {other:?} is not supported (use b64 or none)"
            )));
        }
    };
    let owner = f.owner.as_ref().map(|o| match o.split_once(':') {
        Some((u, g)) => (u.to_owned(), Some(g.to_owned())),
        None => (o.clone(), None),
    });
    Ok(file(&f.path, source, mode, owner))
}

fn unit(u: &CcUnit) -> Result<ign::Unit, TranslateError> {
    let starts = match u.command.as_deref() {
        None | Some("stop") => false,
        Some("start" | "restart" | "reload-or-restart" | "try-restart") => true,
        Some(other) => {
            return Err(TranslateError::Invalid(format!(
                "coreos.units[{}]: command {other:?} is not supported",
                u.name
            )));
        }
    };
    let mut contents = u.content.clone();
    let mut enabled = u.enable.unwrap_or(false);
    if starts {
        // CoreOS started `command: start` units at every boot; under Ignition that is an enabled unit, which needs
        // an [Install] section to mean anything.
        enabled = true;
        if let Some(c) = &mut contents
            && !crate::ignition::has_install_section(c)
        {
            if !c.ends_with('\n') {
                c.push('\n');
            }
            c.push_str("\n[Install]\nWantedBy=multi-user.target\n");
        }
    }
    let dropins = (!u.drop_ins.is_empty()).then(|| {
        u.drop_ins.iter().map(|d| ign::Dropin { contents: Some(d.content.clone()), name: d.name.clone() }).collect()
    });
    // CoreOS called its etcd unit etcd2.service; herd's image ships Debian's etcd.service.
    let name = if u.name == "etcd2.service" { "etcd.service".to_owned() } else { u.name.clone() };
    Ok(ign::Unit { contents, dropins, enabled: enabled.then_some(true), mask: u.mask.filter(|m| *m), name })
}

/// coreos.etcd2 keys (`initial-cluster`, `advertise-client-urls`, ...) become `ETCD_INITIAL_CLUSTER=...` lines.
fn etcd2_environment(etcd2: &BTreeMap<String, serde_yaml_ng::Value>) -> Result<String, TranslateError> {
    let mut out = String::from("# Translated from coreos.etcd2 of a cloud-config.\n");
    for (key, value) in etcd2 {
        let value = match value {
            serde_yaml_ng::Value::String(s) => s.clone(),
            serde_yaml_ng::Value::Number(n) => n.to_string(),
            serde_yaml_ng::Value::Bool(b) => b.to_string(),
            _ => return Err(TranslateError::Invalid(format!("coreos.etcd2.{key}: expected a scalar"))),
        };
        if value.contains('$') {
            return Err(TranslateError::Invalid(format!(
                "coreos.etcd2.{key}: substitution in {value:?} needs CoreOS's metadata service; write the address (or render from the inventory)"
            )));
        }
        out.push_str(&format!("ETCD_{}={value}\n", key.to_uppercase().replace('-', "_")));
    }
    Ok(out)
}

/// Renders an Ignition config as a `#cloud-config` for machines still running CoreOS-style cloud-init (the inverse
/// of [`translate`]). Remote file sources cannot be expressed and are refused.
pub fn from_ignition(config: &ign::Config) -> Result<String, TranslateError> {
    let mut cc = CloudConfig::default();
    for u in config.passwd.as_ref().and_then(|p| p.users.as_ref()).into_iter().flatten() {
        cc.users.push(CcUser {
            name: u.name.clone(),
            gecos: u.gecos.clone(),
            passwd: u.password_hash.clone(),
            shell: u.shell.clone(),
            groups: u.groups.clone().unwrap_or_default(),
            ssh_authorized_keys: u.ssh_authorized_keys.clone().unwrap_or_default(),
            other: BTreeMap::new(),
        });
    }
    for f in config.storage.as_ref().and_then(|s| s.files.as_ref()).into_iter().flatten() {
        let source = f.contents.as_ref().and_then(|c| c.source.as_deref()).unwrap_or("data:,");
        let (content, encoding) = if let Some(b64) = source.strip_prefix("data:;base64,") {
            (b64.to_owned(), Some("b64".to_owned()))
        } else if let Some(encoded) = source.strip_prefix("data:,") {
            (percent_decode(encoded).map_err(|e| TranslateError::Invalid(format!("{}: {e}", f.path)))?, None)
        } else {
            return Err(TranslateError::Invalid(format!(
                "{}: source {source} is remote; cloud-config can only carry inline contents",
                f.path
            )));
        };
        if f.path == "/etc/hostname" && encoding.is_none() {
            cc.hostname = Some(content.trim_end().to_owned());
            continue;
        }
        let owner = match (f.user.as_ref().and_then(|u| u.name.clone()), f.group.as_ref().and_then(|g| g.name.clone()))
        {
            (Some(u), Some(g)) => Some(format!("{u}:{g}")),
            (Some(u), None) => Some(u),
            _ => None,
        };
        cc.write_files.push(CcFile {
            path: f.path.clone(),
            content,
            permissions: f.mode.map(|m| format!("{m:04o}")),
            owner,
            encoding,
            other: BTreeMap::new(),
        });
    }
    let mut units = Vec::new();
    for u in config.systemd.as_ref().and_then(|s| s.units.as_ref()).into_iter().flatten() {
        let enabled = u.enabled == Some(true);
        units.push(CcUnit {
            name: u.name.clone(),
            content: u.contents.clone(),
            command: enabled.then(|| "start".to_owned()),
            enable: enabled.then_some(true),
            mask: u.mask.filter(|m| *m),
            drop_ins: u
                .dropins
                .iter()
                .flatten()
                .map(|d| CcDropIn { name: d.name.clone(), content: d.contents.clone().unwrap_or_default() })
                .collect(),
            other: BTreeMap::new(),
        });
    }
    if !units.is_empty() {
        cc.coreos = Some(Coreos { units, etcd2: BTreeMap::new(), other: BTreeMap::new() });
    }
    Ok(format!("#cloud-config\n{}", serde_yaml_ng::to_string(&cc)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_it_cannot_translate_by_name() {
        let err =
            translate("#cloud-config\nhostname: a\nmanage_etc_hosts: true\ncoreos:\n  fleet:\n    x: 1\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("manage_etc_hosts") && msg.contains("coreos.fleet"), "{msg}");
        assert!(matches!(translate("hostname: a\n"), Err(TranslateError::NotCloudConfig)));
        let err = translate("#cloud-config\ncoreos:\n  etcd2:\n    advertise-client-urls: http://$private_ipv4:2379\n")
            .unwrap_err();
        assert!(err.to_string().contains("substitution"), "{err}");
        let err = translate("#cloud-config\nwrite_files:\n  - path: /a\n    permissions: \"0999\"\n").unwrap_err();
        assert!(err.to_string().contains("not an octal mode"), "{err}");
    }

    #[test]
    fn herd_configs_survive_a_round_trip_through_cloud_config() {
        let spec = herd_inventory::FleetSpec { machines: 6, racks: 2, masters: 3 };
        let inv = herd_inventory::parse("gen.toml", &herd_inventory::generate(spec).unwrap()).unwrap();
        for machine in &inv.machines {
            let mut original = crate::ignition::render(&inv, machine).unwrap();
            let yaml = from_ignition(&original).unwrap();
            assert!(yaml.starts_with("#cloud-config\nhostname: "), "{yaml}");
            let mut back = translate(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
            for c in [&mut original, &mut back] {
                c.storage.as_mut().unwrap().files.as_mut().unwrap().sort_by(|a, b| a.path.cmp(&b.path));
            }
            assert_eq!(back, original, "{}", machine.name());
        }
    }

    #[test]
    fn remote_sources_cannot_become_cloud_config() {
        let mut config = ign::Config::default();
        let mut f = crate::ignition::tests_support::file("/etc/x", "x");
        f.contents.as_mut().unwrap().source = Some("https://example.invalid/x".into());
        config.storage = Some(ign::Storage {
            directories: None,
            disks: None,
            files: Some(vec![f]),
            filesystems: None,
            links: None,
            luks: None,
            raid: None,
        });
        assert!(from_ignition(&config).unwrap_err().to_string().contains("remote"));
    }

    #[test]
    fn start_command_becomes_an_enabled_unit_with_install() {
        let c = translate("#cloud-config\ncoreos:\n  units:\n    - name: a.service\n      command: start\n      content: |\n        [Service]\n        ExecStart=/bin/true\n").unwrap();
        let units = c.systemd.unwrap().units.unwrap();
        assert_eq!(units[0].enabled, Some(true));
        assert!(units[0].contents.as_ref().unwrap().contains("[Install]\nWantedBy=multi-user.target"));
    }
}
