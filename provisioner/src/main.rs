//! The `provisioner` daemon. Not implemented yet: it says so and exits with status 2.

fn main() -> std::process::ExitCode {
    eprintln!("provisioner: not implemented yet (tracked as issue #8: the PXE boot chain); nothing was started");
    std::process::ExitCode::from(2)
}
