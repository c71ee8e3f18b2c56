use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = herdctl::cli::Cli::parse();
    match herdctl::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("herdctl: error: {err:#}");
            ExitCode::from(2)
        }
    }
}
