//! Parsing: TOML → typed model, reporting every problem at once.
//!
//! The document is parsed into a spanned tree first (all syntax errors collected), then each section, each role,
//! rack and machine is deserialized on its own. A broken machine therefore costs one diagnostic, not the rest of
//! the file: the next machine is still read and checked. Cross-field rules run on whatever parsed
//! ([`crate::validate`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use crate::diag::{Diagnostic, Diagnostics, Rule, SourceMap};
use crate::model::{FORMAT_VERSION, Inventory, MACHINE_REQUIRED_KEYS, Machine, Networks, Rack, Role, Site, Spanned};
use crate::types::{Name, RULE_SEPARATOR};
use crate::validate;

/// Why an inventory could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read inventory {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file was read and has problems, each located.
    #[error("{0}")]
    Invalid(Diagnostics),
}

/// Reads and parses the inventory at `path`; diagnostics name the path as given.
pub fn load(path: &Path) -> Result<Inventory, LoadError> {
    let src = std::fs::read_to_string(path).map_err(|source| LoadError::Read { path: path.to_owned(), source })?;
    let base = path.parent().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p });
    parse_in(&path.display().to_string(), &src, base).map_err(LoadError::Invalid)
}

/// Parses and validates an inventory given as text. `file` is used only to label diagnostics; files the inventory
/// references (role units) are not looked up.
pub fn parse(file: &str, src: &str) -> Result<Inventory, Diagnostics> {
    parse_in(file, src, None)
}

/// Parses and validates; with `base_dir`, files the inventory references are resolved against it and must exist.
pub fn parse_in(file: &str, src: &str, base_dir: Option<&Path>) -> Result<Inventory, Diagnostics> {
    let map = SourceMap::new(file, src);
    let mut diags = Vec::new();
    let mut parts = read_parts(&map, src, &mut diags);
    if let Some(parts) = &mut parts {
        parts.base_dir = base_dir.map(Path::to_owned);
        validate::check(parts, &map, &mut diags);
    }
    diags.sort_by_key(|d| (d.line, d.column, d.rule));
    diags.dedup();
    match parts {
        Some(parts) if diags.is_empty() => Ok(parts.into_inventory()),
        _ => Err(Diagnostics(diags)),
    }
}

/// What parsed of each section. Names of roles and racks whose body failed to parse are kept in `broken_*`, so a
/// machine naming them does not get a second, misleading "unknown role" error.
#[derive(Debug, Default)]
pub(crate) struct Parts {
    pub(crate) site: Option<Site>,
    pub(crate) network: Option<Networks>,
    pub(crate) roles: BTreeMap<Name, Role>,
    pub(crate) racks: BTreeMap<Name, Rack>,
    pub(crate) machines: Vec<Machine>,
    pub(crate) broken_roles: BTreeSet<String>,
    pub(crate) broken_racks: BTreeSet<String>,
    /// Whether every role and machine parsed (quorum counting is only meaningful then).
    pub(crate) complete: bool,
    /// Where referenced files resolve; None skips the existence checks.
    pub(crate) base_dir: Option<PathBuf>,
}

impl Parts {
    fn into_inventory(self) -> Inventory {
        // Only called without diagnostics, so site and network are present.
        Inventory {
            version: FORMAT_VERSION,
            site: self.site.expect("site parsed when there are no diagnostics"),
            network: self.network.expect("network parsed when there are no diagnostics"),
            roles: self.roles,
            racks: self.racks,
            machines: self.machines,
            base_dir: self.base_dir,
        }
    }
}

const TOP_LEVEL_KEYS: &str = "version, site, network, roles, racks, machines";

fn read_parts(map: &SourceMap<'_>, src: &str, diags: &mut Vec<Diagnostic>) -> Option<Parts> {
    let (doc, syntax) = DeTable::parse_recoverable(src);
    if !syntax.is_empty() {
        for err in syntax {
            let span = err.span().unwrap_or(0..0);
            diags.push(map.diagnostic(span, Rule::Syntax, err.message().trim_end()));
        }
        return None;
    }
    let doc = doc.into_inner();

    let Some((_, version)) = doc.iter().find(|(k, _)| k.get_ref().as_ref() == "version") else {
        diags.push(map.diagnostic(
            0..0,
            Rule::VersionMissing,
            format!("the inventory has no `version`; add `version = {FORMAT_VERSION}` at the top"),
        ));
        return None;
    };
    match version.get_ref() {
        DeValue::Integer(i) if i.as_str() == FORMAT_VERSION.to_string() && i.radix() == 10 => {}
        DeValue::Integer(i) => {
            diags.push(map.diagnostic(
                version.span(),
                Rule::VersionUnsupported,
                format!("inventory version {} is not supported; this herd reads version {FORMAT_VERSION}", i.as_str()),
            ));
            return None;
        }
        other => {
            diags.push(map.diagnostic(
                version.span(),
                Rule::WrongType,
                format!("`version` must be an integer, found a {}", other.type_str()),
            ));
            return None;
        }
    }

    let mut parts = Parts { complete: true, ..Parts::default() };
    let mut seen = BTreeSet::new();
    for (key, value) in doc {
        let name = key.get_ref().as_ref();
        seen.insert(name.to_owned());
        match name {
            "version" => {}
            "site" => parts.site = deserialize(map, value, diags),
            "network" => parts.network = deserialize(map, value, diags),
            "roles" => {
                let ok = read_named(map, value, "role", diags, &mut parts.roles, &mut parts.broken_roles);
                parts.complete &= ok;
            }
            "racks" => {
                read_named(map, value, "rack", diags, &mut parts.racks, &mut parts.broken_racks);
            }
            "machines" => parts.complete &= read_machines(map, value, diags, &mut parts.machines),
            other => diags.push(map.diagnostic(
                key.span(),
                Rule::UnknownKey,
                format!("unknown top-level key `{other}`; expected one of {TOP_LEVEL_KEYS}"),
            )),
        }
    }
    for required in ["site", "network"] {
        if !seen.contains(required) {
            diags.push(map.diagnostic(
                0..0,
                Rule::MissingKey,
                format!("the inventory has no [{required}] section; see examples/site-450.toml"),
            ));
        }
    }
    Some(parts)
}

/// Reads `[roles.NAME]` or `[racks.NAME]` tables one entry at a time. Returns whether every entry parsed.
fn read_named<T: DeserializeOwned>(
    map: &SourceMap<'_>,
    value: Spanned<DeValue<'_>>,
    what: &str,
    diags: &mut Vec<Diagnostic>,
    out: &mut BTreeMap<Name, T>,
    broken: &mut BTreeSet<String>,
) -> bool {
    let span = value.span();
    let DeValue::Table(table) = value.into_inner() else {
        diags.push(map.diagnostic(span, Rule::WrongType, format!("`{what}s` must be a table of [{what}s.NAME]")));
        return false;
    };
    let mut all_ok = true;
    for (key, body) in table {
        let raw = key.get_ref().as_ref().to_owned();
        let name = match raw.parse::<Name>() {
            Ok(name) => Some(name),
            Err(e) => {
                diags.push(map.diagnostic(key.span(), e.rule, format!("{what} name {}", e.message)));
                None
            }
        };
        match (name, deserialize::<T>(map, body, diags)) {
            (Some(name), Some(parsed)) => {
                out.insert(name, parsed);
            }
            _ => {
                all_ok = false;
                broken.insert(raw);
            }
        }
    }
    all_ok
}

/// Reads `[[machines]]` one machine at a time. Returns whether every machine parsed.
fn read_machines(
    map: &SourceMap<'_>,
    value: Spanned<DeValue<'_>>,
    diags: &mut Vec<Diagnostic>,
    out: &mut Vec<Machine>,
) -> bool {
    let span = value.span();
    let DeValue::Array(array) = value.into_inner() else {
        diags.push(map.diagnostic(span, Rule::WrongType, "`machines` must be an array of tables: write [[machines]]"));
        return false;
    };
    let before = out.len();
    let mut total = 0;
    for item in array {
        total += 1;
        let missing = missing_keys(&item, &MACHINE_REQUIRED_KEYS);
        if missing.is_empty() {
            out.extend(deserialize::<Machine>(map, item, diags));
            continue;
        }
        // Every missing key at once (serde stops at the first), then whatever else is wrong with the values.
        let span = item.span();
        for key in missing {
            diags.push(map.diagnostic(span.clone(), Rule::MissingKey, format!("missing field `{key}`")));
        }
        let mut rest = Vec::new();
        deserialize::<Machine>(map, item, &mut rest);
        diags.extend(rest.into_iter().filter(|d| d.rule != Rule::MissingKey));
    }
    out.len() - before == total
}

/// Which of `required` a table lacks (none if the value is not a table: deserializing says that).
fn missing_keys<'k>(value: &Spanned<DeValue<'_>>, required: &[&'k str]) -> Vec<&'k str> {
    let DeValue::Table(table) = value.get_ref() else {
        return Vec::new();
    };
    required.iter().copied().filter(|key| !table.iter().any(|(k, _)| k.get_ref().as_ref() == *key)).collect()
}

/// Deserializes one value, turning a failure into a located diagnostic.
fn deserialize<T: DeserializeOwned>(
    map: &SourceMap<'_>,
    value: Spanned<DeValue<'_>>,
    diags: &mut Vec<Diagnostic>,
) -> Option<T> {
    let fallback = value.span();
    match T::deserialize(ValueDeserializer::from(value)) {
        Ok(v) => Some(v),
        Err(err) => {
            let span = err.span().unwrap_or(fallback);
            let (rule, message) = classify(err.message());
            diags.push(map.diagnostic(span, rule, message));
            None
        }
    }
}

/// Recovers the rule from a serde error message: our newtypes prefix it (`malformed-mac: ...`), serde's own errors
/// are recognised by their wording.
fn classify(message: &str) -> (Rule, String) {
    if let Some((name, rest)) = message.split_once(RULE_SEPARATOR)
        && let Some(rule) = Rule::from_name(name)
    {
        return (rule, rest.to_owned());
    }
    let rule = if message.starts_with("unknown field") {
        Rule::UnknownKey
    } else if message.starts_with("missing field") {
        Rule::MissingKey
    } else if message.starts_with("invalid type") {
        Rule::WrongType
    } else {
        Rule::InvalidValue
    };
    (rule, message.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = include_str!("../tests/fixtures/valid-lab.toml");

    /// The valid lab with the lines of its first machine that set `keys` removed.
    fn without(keys: &[&str]) -> String {
        let first = VALID.find("[[machines]]").unwrap();
        let second = first + 1 + VALID[first + 1..].find("[[machines]]").unwrap();
        let body: String = VALID[first..second]
            .lines()
            .filter(|l| !keys.iter().any(|k| l.starts_with(&format!("{k} ="))))
            .map(|l| format!("{l}\n"))
            .collect();
        format!("{}{body}{}", &VALID[..first], &VALID[second..])
    }

    fn missing(keys: &[&str]) -> Vec<String> {
        let diags = parse("lab.toml", &without(keys)).unwrap_err();
        diags.0.iter().map(|d| format!("{:?} {}", d.rule, d.message)).collect()
    }

    #[test]
    fn every_missing_machine_key_is_reported_in_one_run() {
        assert_eq!(
            missing(&["internal", "rack"]),
            ["MissingKey missing field `rack`", "MissingKey missing field `internal`"]
        );
        let all: Vec<String> =
            MACHINE_REQUIRED_KEYS.iter().map(|k| format!("MissingKey missing field `{k}`")).collect();
        assert_eq!(missing(&MACHINE_REQUIRED_KEYS), all);
    }

    #[test]
    fn the_required_keys_are_exactly_the_machine_fields_without_a_default() {
        for key in MACHINE_REQUIRED_KEYS {
            assert_eq!(missing(&[key]), [format!("MissingKey missing field `{key}`")]);
        }
        // Every other key the first machine sets is optional: the inventory still parses without it.
        for key in ["bond", "external"] {
            parse("lab.toml", &without(&[key])).unwrap_or_else(|d| panic!("without {key}: {d}"));
        }
    }

    #[test]
    fn classify_recovers_rules() {
        assert_eq!(classify("malformed-mac: \"zz\" is bad").0, Rule::MalformedMac);
        assert_eq!(classify("malformed-mac: \"zz\" is bad").1, "\"zz\" is bad");
        assert_eq!(classify("unknown field `x`, expected `y`").0, Rule::UnknownKey);
        assert_eq!(classify("missing field `name`").0, Rule::MissingKey);
        assert_eq!(classify("invalid type: integer `5`, expected a string").0, Rule::WrongType);
        assert_eq!(classify("unknown variant `x`").0, Rule::InvalidValue);
        assert_eq!(classify("not-a-rule: whatever").0, Rule::InvalidValue);
    }
}
