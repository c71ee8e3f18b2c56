//! The `node-init` binary. Not implemented yet: it says so and exits with status 2.

fn main() -> std::process::ExitCode {
    eprintln!("node-init: not implemented yet (tracked as issue #5); nothing was done");
    std::process::ExitCode::from(2)
}
