//! The unit format: systemd unit files with fleet's `[X-Fleet]` section and herd's additions (`CPU=`, `Memory=`,
//! `AtMostOnce=`, and a `[Container]` section run through the Docker Engine API).
//!
//! This is the one home of the contract: herdctl, the engine and the agent all read units through [`Unit::parse`].
//! Placement semantics follow fleet: `MachineMetadata` is OR within a key and AND across keys, `Conflicts` are
//! globs checked both ways, template units `name@.service` expand `%n %N %p %i` per instance.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// Why a unit or a unit name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// The name breaks the naming rules.
    #[error("invalid unit name {name:?}: {why}")]
    Name {
        /// The name.
        name: String,
        /// Which rule.
        why: &'static str,
    },
    /// A line of the file does not parse.
    #[error("{unit}: line {line}: {why}")]
    Syntax {
        /// The unit.
        unit: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// An option with a value herd cannot use.
    #[error("{unit}: [{section}] {key}={value}: {why}")]
    Option {
        /// The unit.
        unit: String,
        /// Section.
        section: String,
        /// Key.
        key: String,
        /// Value.
        value: String,
        /// What is wrong.
        why: String,
    },
}

/// Unit types herd schedules.
pub const UNIT_TYPES: [&str; 7] = ["service", "socket", "timer", "path", "mount", "target", "device"];

/// Unit types systemd instantiates from a template (`unit_type_may_template`): a `name@.mount` or `name@x.device`
/// is not a unit systemd would load.
pub const TEMPLATE_TYPES: [&str; 5] = ["service", "socket", "target", "timer", "path"];

/// A validated unit name: `prefix.type`, `prefix@.type` (template) or `prefix@instance.type`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnitName(String);

impl UnitName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The unit type (`service`, ...).
    pub fn unit_type(&self) -> &str {
        self.0.rsplit_once('.').map_or("", |(_, t)| t)
    }

    /// The name without its type (`%N`).
    pub fn stem(&self) -> &str {
        self.0.rsplit_once('.').map_or(self.0.as_str(), |(s, _)| s)
    }

    /// The part before `@` (`%p`), or the stem for a non-template unit.
    pub fn prefix(&self) -> &str {
        self.stem().split_once('@').map_or(self.stem(), |(p, _)| p)
    }

    /// The instance (`%i`): the part after `@`, empty for templates and plain units.
    pub fn instance(&self) -> &str {
        self.stem().split_once('@').map_or("", |(_, i)| i)
    }

    /// Whether this is a template (`name@.service`).
    pub fn is_template(&self) -> bool {
        self.stem().ends_with('@')
    }

    /// The template this instance comes from (`web@3.service` → `web@.service`).
    pub fn template(&self) -> Option<UnitName> {
        let (prefix, instance) = self.stem().split_once('@')?;
        (!instance.is_empty()).then(|| UnitName(format!("{prefix}@.{}", self.unit_type())))
    }

    /// The instance `instance` of this template.
    pub fn instantiate(&self, instance: &str) -> Result<UnitName, UnitError> {
        if !self.is_template() {
            return Err(UnitError::Name { name: self.0.clone(), why: "only a template (name@.type) has instances" });
        }
        format!("{}@{instance}.{}", self.prefix(), self.unit_type()).parse()
    }
}

impl FromStr for UnitName {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, UnitError> {
        let bad = |why| Err(UnitError::Name { name: s.to_owned(), why });
        if s.is_empty() || s.len() > 255 {
            return bad("must be 1-255 characters");
        }
        if !s.bytes().all(|b| b.is_ascii_alphanumeric() || b":_.@\\-".contains(&b)) {
            return bad("allowed characters are A-Z a-z 0-9 : _ . @ \\ -");
        }
        let Some((stem, kind)) = s.rsplit_once('.') else { return bad("needs a type suffix, e.g. .service") };
        if !UNIT_TYPES.contains(&kind) {
            return bad("unknown unit type (service, socket, timer, path, mount, target, device)");
        }
        if stem.is_empty() || stem.starts_with('@') {
            return bad("needs a name before the type");
        }
        if stem.matches('@').count() > 1 {
            return bad("at most one @");
        }
        if stem.contains('@') && !TEMPLATE_TYPES.contains(&kind) {
            return bad("systemd makes templates and instances only of service, socket, target, timer and path units");
        }
        Ok(UnitName(s.to_owned()))
    }
}

impl fmt::Display for UnitName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A parsed unit file: sections in order, each with its options in order (keys may repeat).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitFile {
    /// `(section, [(key, value)])`.
    pub sections: Vec<(String, Vec<(String, String)>)>,
}

impl UnitFile {
    /// Parses systemd unit syntax: `[Section]`, `Key=Value`, `#`/`;` comments, `\` line continuations.
    pub fn parse(unit: &str, text: &str) -> Result<UnitFile, UnitError> {
        let mut sections: Vec<(String, Vec<(String, String)>)> = Vec::new();
        let mut pending: Option<(usize, String)> = None;
        for (i, raw) in text.lines().enumerate() {
            let (start, mut line) = match pending.take() {
                Some((start, mut acc)) => {
                    acc.push(' ');
                    acc.push_str(raw.trim());
                    (start, acc)
                }
                None => (i + 1, raw.trim().to_owned()),
            };
            if let Some(stripped) = line.strip_suffix('\\') {
                line = stripped.trim_end().to_owned();
                pending = Some((start, line));
                continue;
            }
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            let syntax = |why: &str| UnitError::Syntax { unit: unit.to_owned(), line: start, why: why.to_owned() };
            if let Some(name) = line.strip_prefix('[') {
                let name = name.strip_suffix(']').ok_or_else(|| syntax("section header without ]"))?;
                if name.is_empty() || name.contains(['[', ']']) {
                    return Err(syntax("malformed section name"));
                }
                sections.push((name.to_owned(), Vec::new()));
                continue;
            }
            let (key, value) = line.split_once('=').ok_or_else(|| syntax("expected Key=Value"))?;
            let key = key.trim();
            if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                return Err(syntax("malformed key"));
            }
            let section = sections.last_mut().ok_or_else(|| syntax("option before any [Section]"))?;
            section.1.push((key.to_owned(), value.trim().to_owned()));
        }
        if let Some((start, _)) = pending {
            return Err(UnitError::Syntax {
                unit: unit.to_owned(),
                line: start,
                why: "file ends in a continuation".into(),
            });
        }
        Ok(UnitFile { sections })
    }

    /// Every value of `key` in `section`, in order.
    pub fn values(&self, section: &str, key: &str) -> Vec<&str> {
        self.sections
            .iter()
            .filter(|(s, _)| s == section)
            .flat_map(|(_, opts)| opts.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()))
            .collect()
    }

    /// The last value of `key` in `section` (systemd's rule for single-valued options).
    pub fn last(&self, section: &str, key: &str) -> Option<&str> {
        self.values(section, key).last().copied()
    }

    /// Whether the file has `section`.
    pub fn has_section(&self, section: &str) -> bool {
        self.sections.iter().any(|(s, _)| s == section)
    }
}

/// The unit file as text systemd reads (continuations joined, specifiers expanded).
pub fn render(file: &UnitFile) -> String {
    let mut out = String::new();
    for (section, opts) in &file.sections {
        out.push_str(&format!("[{section}]\n"));
        for (k, v) in opts {
            out.push_str(&format!("{k}={v}\n"));
        }
    }
    out
}

/// Placement and scheduling options from `[X-Fleet]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// `MachineID=`: only this machine.
    pub machine_id: Option<String>,
    /// `MachineOf=`: on the machine running these units.
    pub machine_of: Vec<String>,
    /// `MachineMetadata=key=value`: values per key (OR within a key, AND across keys).
    pub metadata: BTreeMap<String, Vec<String>>,
    /// `Conflicts=`: globs of units that may not share a machine with this one (checked both ways).
    pub conflicts: Vec<String>,
    /// `Global=true`: one instance on every matching machine.
    pub global: bool,
    /// `Replaces=`: units this one displaces from its machine.
    pub replaces: Vec<String>,
    /// `CPU=`: millicores requested.
    pub cpu_millis: u64,
    /// `Memory=`: bytes requested.
    pub memory: u64,
    /// `AtMostOnce=true`: never run twice, even across a partition (the agent stops it when its lease lapses).
    pub at_most_once: bool,
    /// `Role=`: the role whose reserved capacity the unit may use (Mesos-style quotas).
    pub role: Option<String>,
}

impl Placement {
    /// Whether a machine with `labels` satisfies `MachineMetadata`.
    pub fn metadata_matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.metadata.iter().all(|(key, values)| labels.get(key).is_some_and(|v| values.iter().any(|w| w == v)))
    }
}

/// A `[Container]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Container {
    /// `Image=`.
    pub image: String,
    /// `Command=`, split like `ExecStart=` (whitespace, quotes; no shell).
    pub command: Vec<String>,
    /// `Environment=KEY=VALUE` (repeatable).
    pub env: Vec<(String, String)>,
    /// `Port=HOST:CONTAINER[/tcp|udp]` (repeatable).
    pub ports: Vec<(u16, u16, String)>,
    /// `Volume=HOST:CONTAINER[:ro]` (repeatable).
    pub volumes: Vec<String>,
}

/// A unit: its name, its file, and what herd reads from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    /// The name.
    pub name: UnitName,
    /// The file as parsed.
    pub file: UnitFile,
    /// `[X-Fleet]`.
    pub placement: Placement,
    /// `[Container]`, if the unit runs a container.
    pub container: Option<Container>,
}

/// Parses a size: bytes with an optional K, M, G or T suffix (powers of 1024).
pub fn parse_bytes(text: &str) -> Option<u64> {
    let t = text.trim();
    let (digits, mult) = match t.char_indices().last()? {
        (i, 'K' | 'k') => (&t[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&t[..i], 1 << 20),
        (i, 'G' | 'g') => (&t[..i], 1 << 30),
        (i, 'T' | 't') => (&t[..i], 1 << 40),
        _ => (t, 1),
    };
    digits.trim().parse::<u64>().ok()?.checked_mul(mult)
}

/// Parses CPU: cores (`2`, `0.5`) or millicores (`500m`), to millicores.
pub fn parse_cpu(text: &str) -> Option<u64> {
    let t = text.trim();
    if let Some(m) = t.strip_suffix('m') {
        return m.parse().ok();
    }
    let cores: f64 = t.parse().ok()?;
    (0.0..1e9).contains(&cores).then(|| (cores * 1000.0).round() as u64)
}

fn parse_bool(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "1" | "yes" | "true" | "on" => Some(true),
        "0" | "no" | "false" | "off" => Some(false),
        _ => None,
    }
}

impl Unit {
    /// Parses a unit named `name` from its text. An instance of a template gets its specifiers expanded.
    pub fn parse(name: &str, text: &str) -> Result<Unit, UnitError> {
        let name: UnitName = name.parse()?;
        let expanded = expand_specifiers(&name, text);
        let file = UnitFile::parse(name.as_str(), &expanded)?;
        let bad = |section: &str, key: &str, value: &str, why: &str| UnitError::Option {
            unit: name.to_string(),
            section: section.to_owned(),
            key: key.to_owned(),
            value: value.to_owned(),
            why: why.to_owned(),
        };
        let mut p = Placement::default();
        for (section, opts) in &file.sections {
            if section != "X-Fleet" {
                continue;
            }
            for (key, value) in opts {
                let value = &literal(value);
                let x = |why: &str| bad("X-Fleet", key, value, why);
                let list = || value.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
                match key.as_str() {
                    "MachineID" => p.machine_id = Some(value.clone()),
                    "MachineOf" => p.machine_of.extend(list()),
                    "MachineMetadata" => {
                        for pair in value.split_whitespace() {
                            let (k, v) = pair.split_once('=').ok_or_else(|| x("expected key=value"))?;
                            p.metadata.entry(k.to_owned()).or_default().push(v.to_owned());
                        }
                    }
                    "Conflicts" => p.conflicts.extend(list()),
                    "Global" => p.global = parse_bool(value).ok_or_else(|| x("expected true or false"))?,
                    "Replaces" => p.replaces.extend(list()),
                    "CPU" => {
                        p.cpu_millis = parse_cpu(value).ok_or_else(|| x("expected cores (0.5) or millicores (500m)"))?
                    }
                    "Memory" => p.memory = parse_bytes(value).ok_or_else(|| x("expected bytes, e.g. 512M"))?,
                    "AtMostOnce" => p.at_most_once = parse_bool(value).ok_or_else(|| x("expected true or false"))?,
                    "Role" => {
                        let ok = !value.is_empty()
                            && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
                        if !ok {
                            return Err(x("expected a role name: a-z 0-9 -"));
                        }
                        p.role = Some(value.clone());
                    }
                    _ => return Err(x("unknown X-Fleet option")),
                }
            }
        }
        if p.global && (p.machine_id.is_some() || !p.machine_of.is_empty()) {
            return Err(bad("X-Fleet", "Global", "true", "a global unit cannot also name MachineID or MachineOf"));
        }
        let container = if file.has_section("Container") { Some(container(&file, &bad)?) } else { None };
        Ok(Unit { name, file, placement: p, container })
    }

    /// Whether this unit and `other` may not share a machine (a `Conflicts` glob of either matches the other).
    pub fn conflicts_with(&self, other: &Unit) -> bool {
        self.placement.conflicts.iter().any(|g| glob_match(g, other.name.as_str()))
            || other.placement.conflicts.iter().any(|g| glob_match(g, self.name.as_str()))
    }
}

fn container(file: &UnitFile, bad: &dyn Fn(&str, &str, &str, &str) -> UnitError) -> Result<Container, UnitError> {
    let s = "Container";
    let image = file.last(s, "Image").ok_or_else(|| bad(s, "Image", "", "a [Container] needs Image="))?;
    let mut c = Container { image: literal(image), ..Container::default() };
    if let Some(cmd) = file.last(s, "Command") {
        c.command = split_command(&literal(cmd));
    }
    for env in file.values(s, "Environment") {
        let env = &literal(env);
        let (k, v) = env.split_once('=').ok_or_else(|| bad(s, "Environment", env, "expected KEY=VALUE"))?;
        c.env.push((k.to_owned(), v.to_owned()));
    }
    for port in file.values(s, "Port") {
        let err = || bad(s, "Port", port, "expected HOST:CONTAINER or HOST:CONTAINER/udp");
        let (ports, proto) = port.split_once('/').unwrap_or((port, "tcp"));
        if proto != "tcp" && proto != "udp" {
            return Err(err());
        }
        let (h, ct) = ports.split_once(':').ok_or_else(err)?;
        c.ports.push((h.parse().map_err(|_| err())?, ct.parse().map_err(|_| err())?, proto.to_owned()));
    }
    for v in file.values(s, "Volume") {
        if !v.starts_with('/') || !v.contains(":/") {
            return Err(bad(s, "Volume", v, "expected /HOST:/CONTAINER[:ro]"));
        }
        c.volumes.push(literal(v));
    }
    for key in file.sections.iter().filter(|(n, _)| n == s).flat_map(|(_, o)| o.iter().map(|(k, _)| k)) {
        if !["Image", "Command", "Environment", "Port", "Volume"].contains(&key.as_str()) {
            return Err(bad(s, key, "", "unknown Container option (Image, Command, Environment, Port, Volume)"));
        }
    }
    Ok(c)
}

/// Splits a command line the way systemd's `ExecStart=` does (quotes group words; no shell).
pub fn split_command(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (None, '"' | '\'') => {
                quote = Some(c);
                any = true;
            }
            (_, '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                    any = true;
                }
            }
            (None, c) if c.is_whitespace() => {
                if any {
                    words.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            (_, c) => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(cur);
    }
    if let Some(first) = words.first_mut() {
        let trimmed = first.trim_start_matches(['-', '@', '+', '!']).to_owned();
        *first = trimmed;
    }
    words
}

/// Expands `%n` (full name), `%N` (name without type), `%p` (prefix) and `%i` (instance). Every other `%` is left
/// as written, `%%` included (systemd expands what herd does not, and makes `%%` a `%`); values herd itself reads
/// (`[X-Fleet]`, `[Container]`) take `%%` as a literal `%` through [`literal`].
pub fn expand_specifiers(name: &UnitName, text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.peek().copied() {
            Some('n') => out.push_str(name.as_str()),
            Some('N') => out.push_str(name.stem()),
            Some('p') => out.push_str(name.prefix()),
            Some('i') => out.push_str(name.instance()),
            // systemd's own escape: it reaches systemd as written, and systemd makes it one `%`.
            Some('%') => out.push_str("%%"),
            _ => {
                out.push('%');
                continue;
            }
        }
        chars.next();
    }
    out
}

/// A value herd reads itself, with systemd's escape `%%` as the `%` it stands for.
pub fn literal(value: &str) -> String {
    value.replace("%%", "%")
}

/// Shell-style glob with `*` and `?` (what fleet's Conflicts accept).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_start_splits_like_systemd() {
        assert_eq!(split_command("/bin/sh -c 'echo a b' x"), ["/bin/sh", "-c", "echo a b", "x"]);
        assert_eq!(split_command("-/usr/bin/true"), ["/usr/bin/true"]);
        assert_eq!(split_command(r#"/bin/echo "" "a\"b""#), ["/bin/echo", "", "a\"b"]);
        assert!(split_command("   ").is_empty());
    }

    #[test]
    fn unit_names_follow_the_rules() {
        for ok in ["web.service", "web@.service", "web@3.service", "a:b_c-d.timer", "x.mount", "t@.timer", "s@1.socket"]
        {
            assert!(ok.parse::<UnitName>().is_ok(), "{ok}");
        }
        for template in ["x@.mount", "x@srv.mount", "d@.device"] {
            let e = template.parse::<UnitName>().unwrap_err().to_string();
            assert!(e.contains("only of service, socket, target, timer and path units"), "{template}: {e}");
        }
        for bad in ["", "web", "web.exe", ".service", "@x.service", "a@b@c.service", "we b.service", "é.service"] {
            assert!(bad.parse::<UnitName>().is_err(), "{bad}");
        }
        let t: UnitName = "web@.service".parse().unwrap();
        assert!(t.is_template());
        let i = t.instantiate("3").unwrap();
        assert_eq!((i.as_str(), i.prefix(), i.instance(), i.stem()), ("web@3.service", "web", "3", "web@3"));
        assert_eq!(i.template(), Some(t));
        assert!("web.service".parse::<UnitName>().unwrap().instantiate("1").is_err());
    }

    #[test]
    fn a_literal_percent_and_specifiers_herd_does_not_expand_reach_systemd_as_written() {
        let text = "[Service]\nExecStart=/bin/sh -c 'date +%%s.%%N > /run/%n.%%i; echo %s %%%i'\n\
                    [X-Fleet]\nMachineMetadata=load=100%%\n[Container]\nImage=x\nEnvironment=FMT=%%Y-%%m\n";
        let u = Unit::parse("amo@7.service", text).unwrap();
        let exec = u.file.last("Service", "ExecStart").unwrap();
        assert_eq!(exec, "/bin/sh -c 'date +%%s.%%N > /run/amo@7.service.%%i; echo %s %%7'");
        assert!(render(&u.file).contains(exec));
        assert_eq!(u.placement.metadata["load"], ["100%"], "herd reads %% as %");
        assert_eq!(u.container.unwrap().env, [("FMT".to_owned(), "%Y-%m".to_owned())]);
    }

    #[test]
    fn parses_x_fleet_container_and_specifiers() {
        let text = "[Unit]\nDescription=web %i of %p (%n, %N, 100%%)\n\n[X-Fleet]\nMachineMetadata=rack=r01 rack=r02\n\
                    MachineMetadata=disk=ssd\nConflicts=web@*.service\nCPU=500m\nMemory=512M\nAtMostOnce=yes\n\
                    MachineMetadata=hostname=%i\n\n[Container]\nImage=registry:5000/web:1\nCommand=httpd -f \\\n  -p 80\n\
                    Environment=A=1\nEnvironment=B=x=y\nPort=8080:80\nPort=53:53/udp\nVolume=/srv:/data:ro\n";
        let u = Unit::parse("web@node1.service", text).unwrap();
        let systemd_reads = "web node1 of web (web@node1.service, web@node1, 100%%)";
        assert_eq!(u.file.last("Unit", "Description"), Some(systemd_reads), "systemd makes %% one %");
        let p = &u.placement;
        assert_eq!(p.metadata["rack"], ["r01", "r02"]);
        assert_eq!(p.metadata["hostname"], ["node1"]);
        assert_eq!((p.cpu_millis, p.memory, p.at_most_once), (500, 512 << 20, true));
        let c = u.container.unwrap();
        assert_eq!(c.command, ["httpd", "-f", "-p", "80"]);
        assert_eq!(c.env, [("A".to_owned(), "1".to_owned()), ("B".to_owned(), "x=y".to_owned())]);
        assert_eq!(c.ports, [(8080, 80, "tcp".to_owned()), (53, 53, "udp".to_owned())]);
    }

    #[test]
    fn metadata_is_or_within_a_key_and_across_keys() {
        let u = Unit::parse("a.service", "[X-Fleet]\nMachineMetadata=rack=r01 rack=r02\nMachineMetadata=disk=ssd\n")
            .unwrap();
        let labels = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert!(u.placement.metadata_matches(&labels(&[("rack", "r02"), ("disk", "ssd")])));
        assert!(!u.placement.metadata_matches(&labels(&[("rack", "r03"), ("disk", "ssd")])));
        assert!(!u.placement.metadata_matches(&labels(&[("rack", "r01")])));
    }

    #[test]
    fn conflicts_are_globs_checked_both_ways() {
        let a = Unit::parse("db@1.service", "[X-Fleet]\nConflicts=db@*.service\n").unwrap();
        let b = Unit::parse("db@2.service", "[Service]\nExecStart=/bin/true\n").unwrap();
        let c = Unit::parse("web.service", "[Service]\nExecStart=/bin/true\n").unwrap();
        assert!(a.conflicts_with(&b) && b.conflicts_with(&a), "one-way declaration, both ways");
        assert!(!a.conflicts_with(&c));
        assert!(glob_match("a?c*", "abcdef") && !glob_match("a?c", "abcd") && glob_match("*", ""));
    }

    #[test]
    fn invalid_units_are_refused_with_the_reason() {
        let cases = [
            ("a.service", "Key=Value\n", "option before any [Section]"),
            ("a.service", "[X-Fleet\n", "section header without ]"),
            ("a.service", "[X-Fleet]\nMachineIDX=1\n", "unknown X-Fleet option"),
            ("a.service", "[X-Fleet]\nGlobal=maybe\n", "expected true or false"),
            ("a.service", "[X-Fleet]\nMemory=lots\n", "expected bytes"),
            ("a.service", "[X-Fleet]\nGlobal=true\nMachineID=abc\n", "cannot also name"),
            ("a.service", "[Container]\nCommand=x\n", "needs Image="),
            ("a.service", "[Container]\nImage=x\nPort=80\n", "HOST:CONTAINER"),
            ("a.service", "[Container]\nImage=x\nRestart=always\n", "unknown Container option"),
            ("a.service", "[Service]\nExecStart=/bin/true \\\n", "continuation"),
        ];
        for (name, text, expect) in cases {
            let err = Unit::parse(name, text).unwrap_err().to_string();
            assert!(err.contains(expect), "{text:?}: {err}");
        }
    }

    #[test]
    fn sizes_and_cpus() {
        assert_eq!(parse_bytes("1G"), Some(1 << 30));
        assert_eq!(parse_bytes("100"), Some(100));
        assert_eq!(parse_bytes("x"), None);
        assert_eq!(parse_bytes("99999999999T"), None);
        assert_eq!(parse_cpu("0.25"), Some(250));
        assert_eq!(parse_cpu("2"), Some(2000));
        assert_eq!(parse_cpu("-1"), None);
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(name in "[a-z@.]{0,12}", text in "\\PC{0,300}") {
            let _ = Unit::parse(&name, &text);
            let _ = Unit::parse("x@y.service", &text);
        }
    }
}
