//! `agent-bridge`: see `agent-bridge --help`.
use clap::Parser;

fn main() -> std::process::ExitCode {
    fleet_access_agent_bridge::cli::Args::parse().run()
}
