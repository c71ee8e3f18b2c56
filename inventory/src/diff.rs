//! `diff`: what a changed inventory would change, the plan an admin reviews before applying it.
//!
//! Entities (site, networks, roles, racks, machines) are matched by name; a changed entity lists its changed fields
//! as dotted paths with old and new values. Machine changes carry the effect applying them has on the machine.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use serde_json::Value;

use crate::model::Inventory;

/// What applying a machine's change takes, from least to most disruptive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Effect {
    /// Labels, rack, BMC: cluster metadata only; nothing on the machine restarts.
    Metadata,
    /// NICs, bond or addresses: the network config is re-rendered and applied with a reboot.
    Reboot,
    /// Role or install disk: the machine must be reprovisioned.
    Reprovision,
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Effect::Metadata => "metadata only",
            Effect::Reboot => "reboot to apply",
            Effect::Reprovision => "reprovision",
        })
    }
}

fn effect_of(field: &str) -> Effect {
    let top = field.split(['.', '[']).next().unwrap_or(field);
    match top {
        "role" | "disk" => Effect::Reprovision,
        "macs" | "bond" | "internal" | "external" => Effect::Reboot,
        _ => Effect::Metadata,
    }
}

/// One changed field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldChange {
    /// Dotted path of the field, e.g. `labels.gpu` or `bond.members`.
    pub field: String,
    /// The old value as compact JSON, absent if the field is new.
    pub old: Option<String>,
    /// The new value as compact JSON, absent if the field was removed.
    pub new: Option<String>,
}

/// What happened to one entity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChangeKind {
    /// Only in the new inventory.
    Added,
    /// Only in the old inventory.
    Removed,
    /// In both, with different fields.
    Changed,
}

/// A change to one entity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// `site`, `network`, `role`, `rack` or `machine`.
    pub kind: &'static str,
    /// The entity's name (`internal`/`external` for networks, the site's name for the site).
    pub name: String,
    /// Added, removed or changed.
    pub change: ChangeKind,
    /// For changed entities, the fields that differ.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldChange>,
    /// For machines: what applying the change takes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub effect: Option<Effect>,
}

/// The whole difference between two inventories.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct InventoryDiff {
    /// Every change, site first, then networks, roles, racks and machines.
    pub changes: Vec<Change>,
}

impl InventoryDiff {
    /// Whether the inventories are equivalent.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    fn count(&self, kind: &str, change: &ChangeKind) -> usize {
        self.changes.iter().filter(|c| c.kind == kind && &c.change == change).count()
    }
}

/// Compares two inventories entity by entity.
pub fn diff(old: &Inventory, new: &Inventory) -> InventoryDiff {
    let mut changes = Vec::new();
    let site_name = new.site.name.to_string();
    compare(&mut changes, "site", &site_name, Some(json(&old.site)), Some(json(&new.site)));
    let nets = |inv: &Inventory| -> BTreeMap<String, Value> {
        inv.network.iter().map(|(name, net)| (name.to_owned(), json(net))).collect()
    };
    compare_maps(&mut changes, "network", nets(old), nets(new));
    compare_maps(&mut changes, "role", by_name(&old.roles), by_name(&new.roles));
    compare_maps(&mut changes, "rack", by_name(&old.racks), by_name(&new.racks));
    let machines = |inv: &Inventory| -> BTreeMap<String, Value> {
        inv.machines.iter().map(|m| (m.name.get_ref().to_string(), json(m))).collect()
    };
    compare_maps(&mut changes, "machine", machines(old), machines(new));
    InventoryDiff { changes }
}

fn by_name<V: Serialize>(map: &BTreeMap<crate::Name, V>) -> BTreeMap<String, Value> {
    map.iter().map(|(k, v)| (k.to_string(), json(v))).collect()
}

fn json<T: Serialize>(value: &T) -> Value {
    // Serializing our own model cannot fail: every key is a string and there are no non-finite floats.
    serde_json::to_value(value).unwrap_or(Value::Null)
}

fn compare_maps(
    out: &mut Vec<Change>,
    kind: &'static str,
    old: BTreeMap<String, Value>,
    mut new: BTreeMap<String, Value>,
) {
    for (name, old_value) in old {
        let new_value = new.remove(&name);
        compare(out, kind, &name, Some(old_value), new_value);
    }
    for (name, new_value) in new {
        compare(out, kind, &name, None, Some(new_value));
    }
}

fn compare(out: &mut Vec<Change>, kind: &'static str, name: &str, old: Option<Value>, new: Option<Value>) {
    let (change, fields) = match (&old, &new) {
        (None, None) => return,
        (None, Some(_)) => (ChangeKind::Added, Vec::new()),
        (Some(_), None) => (ChangeKind::Removed, Vec::new()),
        (Some(a), Some(b)) => {
            let fields = field_changes(a, b);
            if fields.is_empty() {
                return;
            }
            (ChangeKind::Changed, fields)
        }
    };
    let effect = (kind == "machine").then(|| match change {
        ChangeKind::Changed => fields.iter().map(|f| effect_of(&f.field)).max().unwrap_or(Effect::Metadata),
        ChangeKind::Added | ChangeKind::Removed => Effect::Reprovision,
    });
    out.push(Change { kind, name: name.to_owned(), change, fields, effect });
}

fn field_changes(old: &Value, new: &Value) -> Vec<FieldChange> {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", old, &mut a);
    flatten("", new, &mut b);
    let mut fields = Vec::new();
    for (field, old_value) in &a {
        match b.remove(field) {
            Some(new_value) if &new_value == old_value => {}
            new_value => {
                fields.push(FieldChange { field: field.clone(), old: Some(old_value.clone()), new: new_value })
            }
        }
    }
    fields.extend(b.into_iter().map(|(field, new_value)| FieldChange { field, old: None, new: Some(new_value) }));
    fields.sort_by(|x, y| x.field.cmp(&y.field));
    fields
}

/// Objects become dotted paths; arrays and scalars are leaves rendered as compact JSON.
fn flatten(prefix: &str, value: &Value, out: &mut BTreeMap<String, String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                flatten(&path, v, out);
            }
        }
        leaf => {
            out.insert(prefix.to_owned(), leaf.to_string());
        }
    }
}

impl fmt::Display for InventoryDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.changes.is_empty() {
            return writeln!(f, "no changes");
        }
        for c in &self.changes {
            let sign = match c.change {
                ChangeKind::Added => '+',
                ChangeKind::Removed => '-',
                ChangeKind::Changed => '~',
            };
            write!(f, "{sign} {} {}", c.kind, c.name)?;
            match (&c.change, c.effect) {
                (ChangeKind::Changed, Some(effect)) => writeln!(f, ": {effect}")?,
                _ => writeln!(f)?,
            }
            for field in &c.fields {
                let old = field.old.as_deref().unwrap_or("(unset)");
                let new = field.new.as_deref().unwrap_or("(unset)");
                writeln!(f, "    {}: {old} -> {new}", field.field)?;
            }
        }
        let m = |k: ChangeKind| self.count("machine", &k);
        writeln!(
            f,
            "machines: {} added, {} removed, {} changed; {} other changes",
            m(ChangeKind::Added),
            m(ChangeKind::Removed),
            m(ChangeKind::Changed),
            self.changes.iter().filter(|c| c.kind != "machine").count()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::{FleetSpec, generate};

    fn fleet() -> String {
        generate(FleetSpec { machines: 12, racks: 3, masters: 3 }).unwrap()
    }

    #[test]
    fn identical_inventories_have_no_changes() {
        let a = crate::parse("a", &fleet()).unwrap();
        let d = diff(&a, &a.clone());
        assert!(d.is_empty());
        assert_eq!(d.to_string(), "no changes\n");
    }

    #[test]
    fn added_removed_and_changed_machines_with_their_effect() {
        let old_text = fleet();
        let old = crate::parse("a", &old_text).unwrap();
        let new_text = old_text
            .replace("internal = \"10.20.1.12\"", "internal = \"10.20.1.99\"")
            .replace("name = \"r03-m04\"", "name = \"r03-m09\"")
            .replace("labels = { hardware = \"r750\" }", "labels = { hardware = \"r760\" }");
        let new = crate::parse("b", &new_text).unwrap();
        let d = diff(&old, &new);
        let find = |name: &str| d.changes.iter().find(|c| c.name == name).unwrap();
        let moved = find("r01-m02");
        assert_eq!(moved.change, ChangeKind::Changed);
        assert_eq!(moved.effect, Some(Effect::Reboot));
        assert!(moved.fields.iter().any(|f| f.field == "internal" && f.new.as_deref() == Some("\"10.20.1.99\"")));
        assert_eq!(find("r03-m04").change, ChangeKind::Removed);
        assert_eq!(find("r03-m09").change, ChangeKind::Added);
        let relabelled: Vec<_> = d.changes.iter().filter(|c| c.effect == Some(Effect::Metadata)).collect();
        assert!(!relabelled.is_empty());
        assert!(relabelled.iter().all(|c| c.fields.iter().all(|f| f.field == "labels.hardware")));
        let text = d.to_string();
        assert!(text.contains("~ machine r01-m02: reboot to apply"), "{text}");
        assert!(text.contains("    internal: \"10.20.1.12\" -> \"10.20.1.99\""), "{text}");
    }

    #[test]
    fn role_change_means_reprovision_and_role_edits_are_listed() {
        let old_text = fleet();
        let old = crate::parse("a", &old_text).unwrap();
        let new_text =
            old_text.replace("description = \"runs units\"", "description = \"runs units\"\nkernel_args = [\"quiet\"]");
        let new = crate::parse("b", &new_text).unwrap();
        let d = diff(&old, &new);
        assert_eq!(d.changes.len(), 1);
        assert_eq!(d.changes[0].kind, "role");
        assert_eq!(d.changes[0].fields[0].field, "kernel_args");
        assert_eq!(effect_of("role"), Effect::Reprovision);
        assert_eq!(effect_of("bond.members"), Effect::Reboot);
        assert_eq!(effect_of("labels.x"), Effect::Metadata);
    }
}
