//! The daemon's logs: structured records straight into the journal (each field its own journal field, `HERD_`
//! prefixed: `journalctl -u herd-node-init HERD_UNIT=web.service`), or plain lines on stderr where there is no
//! journal. `HERD_LOG` filters them (`tracing` directives; default `info`). Console milestones (ready,
//! registered, healthy) stay plain lines on stdout, which the unit sends to the journal and the console.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Installs the subscriber (once; later calls do nothing).
pub fn init() {
    let filter = EnvFilter::try_from_env("HERD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let journal = std::path::Path::new("/run/systemd/journal/socket").exists().then(|| {
        tracing_journald::layer()
            .map(|l| l.with_field_prefix(Some("HERD".into())).with_syslog_identifier("node-init".into()))
    });
    match journal {
        Some(Ok(layer)) => {
            let _ = tracing_subscriber::registry().with(filter).with(layer).try_init();
        }
        _ => {
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_ansi(ansi)
                .try_init();
        }
    }
}
