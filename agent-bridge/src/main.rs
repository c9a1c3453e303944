//! `agent-bridge`: the in-cluster bridge and the ssh ProxyCommand. Modes arrive with their issues.
use clap::Parser;

/// Reach EC2 instances through AWS Systems Manager Session Manager.
#[derive(Parser, Debug)]
#[command(name = "agent-bridge", version, about)]
struct Args {}

fn main() {
    let _args = Args::parse();
}
