//! Counters exposed on `/metrics` in the Prometheus text format. A flood from the network costs a counter
//! increment, never memory: label values come from closed sets (packet types, drop reasons).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// A set of counters, keyed by metric name and label set.
#[derive(Debug, Default)]
pub struct Metrics {
    /// name → label set → value. Two levels so an increment looks the labels up by `&str` and allocates only the
    /// first time a label set is seen.
    counters: Mutex<BTreeMap<&'static str, BTreeMap<String, u64>>>,
    help: Mutex<BTreeMap<&'static str, &'static str>>,
}

impl Metrics {
    /// Describes a metric (printed as `# HELP`).
    pub fn describe(&self, name: &'static str, help: &'static str) {
        if let Ok(mut h) = self.help.lock() {
            h.insert(name, help);
        }
    }

    /// Adds `by` to `name{labels}`; `labels` is the inside of the braces, e.g. `type="discover"`.
    pub fn add(&self, name: &'static str, labels: &str, by: u64) {
        // A poisoned lock means a panic elsewhere already; counting is best effort.
        if let Ok(mut c) = self.counters.lock() {
            let series = c.entry(name).or_default();
            match series.get_mut(labels) {
                Some(v) => *v += by,
                None => {
                    series.insert(labels.to_owned(), by);
                }
            }
        }
    }

    /// Adds one.
    pub fn inc(&self, name: &'static str, labels: &str) {
        self.add(name, labels, 1);
    }

    /// The current value.
    pub fn get(&self, name: &'static str, labels: &str) -> u64 {
        self.counters.lock().ok().and_then(|c| c.get(name).and_then(|s| s.get(labels)).copied()).unwrap_or(0)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let counters = self.counters.lock().map(|c| c.clone()).unwrap_or_default();
        let help = self.help.lock().map(|h| h.clone()).unwrap_or_default();
        let mut out = String::new();
        for (name, series) in &counters {
            if let Some(h) = help.get(name) {
                let _ = writeln!(out, "# HELP {name} {h}");
            }
            let _ = writeln!(out, "# TYPE {name} counter");
            for (labels, value) in series {
                if labels.is_empty() {
                    let _ = writeln!(out, "{name} {value}");
                } else {
                    let _ = writeln!(out, "{name}{{{labels}}} {value}");
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_prometheus_text() {
        let m = super::Metrics::default();
        m.describe("herd_x_total", "Things.");
        m.inc("herd_x_total", "kind=\"a\"");
        m.add("herd_x_total", "kind=\"a\"", 2);
        m.inc("herd_y_total", "");
        assert_eq!(m.get("herd_x_total", "kind=\"a\""), 3);
        assert_eq!(
            m.render(),
            "# HELP herd_x_total Things.\n# TYPE herd_x_total counter\nherd_x_total{kind=\"a\"} 3\n# TYPE herd_y_total counter\nherd_y_total 1\n"
        );
    }
}
