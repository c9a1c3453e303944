//! `fleet-access-operator`: see `fleet-access-operator --help`.
use clap::Parser;

fn main() -> std::process::ExitCode {
    fleet_access_operator::cli::Args::parse().run()
}
