//! herd's lint for Ignition configs: the foot-guns `ignition-validate` lets through.
//!
//! Works on the JSON of any 3.x config (no model needed), so it can check configs herd did not render.
//! Findings name the JSON path (`$.storage.files.3.mode`, as Ignition's own reports do).

use std::collections::HashMap;
use std::fmt;

use serde_json::Value;

/// A foot-gun found in a config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// JSON path of the offending value.
    pub path: String,
    /// Rule name.
    pub rule: &'static str,
    /// What is wrong and what to write instead.
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.path, self.rule, self.message)
    }
}

/// Why a config could not be linted at all.
#[derive(Debug, thiserror::Error)]
pub enum LintError {
    /// Not JSON.
    #[error("not a JSON document")]
    Json(#[from] serde_json::Error),
    /// JSON, but not an Ignition 3.x config.
    #[error("not an Ignition 3.x config: {0}")]
    NotIgnition(String),
}

/// Octal modes admins mean when they write a decimal-looking mode such as `644`.
const OCTAL_LOOKING: [i64; 16] = [400, 440, 444, 500, 550, 555, 600, 640, 644, 660, 664, 700, 750, 755, 775, 777];
const REMOTE_SCHEMES: [&str; 6] = ["http://", "https://", "tftp://", "s3://", "gs://", "arn:"];

/// Lints an Ignition config given as JSON text.
pub fn lint_str(json: &str) -> Result<Vec<Finding>, LintError> {
    lint(&serde_json::from_str(json)?)
}

/// Lints an Ignition config.
pub fn lint(config: &Value) -> Result<Vec<Finding>, LintError> {
    let version = config.pointer("/ignition/version").and_then(Value::as_str).unwrap_or_default();
    if !version.starts_with("3.") {
        return Err(LintError::NotIgnition(format!(
            "$.ignition.version is {version:?}; herd lints spec 3.x (2.x configs: translate them first)"
        )));
    }
    let mut out = Vec::new();
    let mut paths: HashMap<String, String> = HashMap::new();
    for kind in ["files", "directories", "links"] {
        let Some(items) = config.pointer(&format!("/storage/{kind}")).and_then(Value::as_array) else { continue };
        for (i, item) in items.iter().enumerate() {
            let at = format!("$.storage.{kind}.{i}");
            if let Some(path) = item.get("path").and_then(Value::as_str) {
                if !path.starts_with('/') {
                    out.push(Finding {
                        path: format!("{at}.path"),
                        rule: "relative-path",
                        message: format!("{path:?} is relative; Ignition paths must be absolute"),
                    });
                }
                let normal = path.trim_end_matches('/').to_owned();
                if let Some(first) = paths.get(&normal) {
                    out.push(Finding {
                        path: format!("{at}.path"),
                        rule: "duplicate-path",
                        message: format!("{path} is also declared at {first}"),
                    });
                } else {
                    paths.insert(normal, format!("{at}.path"));
                }
            }
            if let Some(mode) = item.get("mode").and_then(Value::as_i64) {
                mode_findings(&at, mode, &mut out);
            }
            for (source_at, resource) in resources(&at, item) {
                remote_without_hash(&source_at, resource, &mut out);
            }
        }
    }
    if let Some(units) = config.pointer("/systemd/units").and_then(Value::as_array) {
        for (i, unit) in units.iter().enumerate() {
            let enabled = unit.get("enabled").and_then(Value::as_bool) == Some(true);
            let contents = unit.get("contents").and_then(Value::as_str);
            if enabled && let Some(contents) = contents {
                let has_install = contents.lines().any(|l| l.trim() == "[Install]");
                if !has_install {
                    let name = unit.get("name").and_then(Value::as_str).unwrap_or("?");
                    out.push(Finding {
                        path: format!("$.systemd.units.{i}.enabled"),
                        rule: "enabled-without-install",
                        message: format!(
                            "{name} is enabled but its contents have no [Install] section, so enabling does nothing"
                        ),
                    });
                }
            }
        }
    }
    Ok(out)
}

fn mode_findings(at: &str, mode: i64, out: &mut Vec<Finding>) {
    if OCTAL_LOOKING.contains(&mode) {
        out.push(Finding {
            path: format!("{at}.mode"),
            rule: "decimal-mode",
            message: format!(
                "mode {mode} is decimal (octal {mode:o}); JSON has no octal, so for 0{mode} write {}",
                i64::from_str_radix(&mode.to_string(), 8).unwrap_or(mode)
            ),
        });
    } else if !(0..=0o7777).contains(&mode) {
        out.push(Finding {
            path: format!("{at}.mode"),
            rule: "invalid-mode",
            message: format!("mode {mode} is outside 0..=4095 (octal 07777)"),
        });
    }
}

/// The resources of a file: `contents` and each `append` entry.
fn resources<'a>(at: &str, item: &'a Value) -> Vec<(String, &'a Value)> {
    let mut out = Vec::new();
    if let Some(contents) = item.get("contents") {
        out.push((format!("{at}.contents"), contents));
    }
    if let Some(append) = item.get("append").and_then(Value::as_array) {
        out.extend(append.iter().enumerate().map(|(j, r)| (format!("{at}.append.{j}"), r)));
    }
    out
}

fn remote_without_hash(at: &str, resource: &Value, out: &mut Vec<Finding>) {
    let Some(source) = resource.get("source").and_then(Value::as_str) else { return };
    let remote = REMOTE_SCHEMES.iter().any(|s| source.starts_with(s));
    let hash = resource.pointer("/verification/hash").and_then(Value::as_str);
    if remote && hash.is_none_or(str::is_empty) {
        out.push(Finding {
            path: format!("{at}.source"),
            rule: "unverified-remote",
            message: format!(
                "{source} is fetched without verification.hash; add \"verification\": {{\"hash\": \"sha512-...\"}}"
            ),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(json: &str) -> Vec<(String, &'static str)> {
        lint_str(json).unwrap().into_iter().map(|f| (f.path, f.rule)).collect()
    }

    #[test]
    fn a_clean_config_has_no_findings() {
        let json = r#"{"ignition":{"version":"3.3.0"},"storage":{"files":[{"path":"/etc/a","mode":420,
            "contents":{"source":"https://x/a","verification":{"hash":"sha512-00"}}}]},
            "systemd":{"units":[{"name":"a.service","enabled":true,"contents":"[Service]\n[Install]\nWantedBy=x\n"},
            {"name":"b.service","enabled":true}]}}"#;
        assert!(rules(json).is_empty());
    }

    #[test]
    fn each_foot_gun_is_found_at_its_json_path() {
        let json = r#"{"ignition":{"version":"3.3.0"},
            "storage":{"files":[{"path":"/etc/a","mode":644},{"path":"etc/b","mode":99999},
              {"path":"/etc/c","contents":{"source":"http://host/c"}},
              {"path":"/etc/d","append":[{"source":"data:,x"},{"source":"s3://b/k","verification":{}}]}],
              "directories":[{"path":"/etc/a/"}],
              "links":[{"path":"/etc/c","target":"/x"}]},
            "systemd":{"units":[{"name":"x.service","enabled":true,"contents":"[Service]\nExecStart=/bin/true\n"}]}}"#;
        let found = rules(json);
        let expect = [
            ("$.storage.files.0.mode", "decimal-mode"),
            ("$.storage.files.1.path", "relative-path"),
            ("$.storage.files.1.mode", "invalid-mode"),
            ("$.storage.files.2.contents.source", "unverified-remote"),
            ("$.storage.files.3.append.1.source", "unverified-remote"),
            ("$.storage.directories.0.path", "duplicate-path"),
            ("$.storage.links.0.path", "duplicate-path"),
            ("$.systemd.units.0.enabled", "enabled-without-install"),
        ];
        for (path, rule) in expect {
            assert!(found.contains(&(path.to_owned(), rule)), "missing {path} {rule} in {found:?}");
        }
        assert_eq!(found.len(), expect.len(), "{found:?}");
    }

    #[test]
    fn decimal_mode_message_gives_the_right_number() {
        let f = lint_str(r#"{"ignition":{"version":"3.3.0"},"storage":{"files":[{"path":"/a","mode":755}]}}"#).unwrap();
        assert!(f[0].message.contains("for 0755 write 493"), "{}", f[0].message);
    }

    #[test]
    fn non_ignition_input_is_refused() {
        assert!(matches!(lint_str("[]"), Err(LintError::NotIgnition(_))));
        assert!(matches!(lint_str(r#"{"ignition":{"version":"2.2.0"}}"#), Err(LintError::NotIgnition(_))));
        assert!(matches!(lint_str("{"), Err(LintError::Json(_))));
    }
}
