use std::process::ExitCode;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = herdctl::cli::parse();
    match herdctl::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("herdctl: error: {err:#}");
            ExitCode::from(2)
        }
    }
}
