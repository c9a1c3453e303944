//! Benchmarks of the agent bridge (`make bench`), written to BENCHMARKS.md. Not tests: nothing
//! here asserts a time.
//!
//! One harness process drives everything over loopback:
//!
//! ```text
//!  harness client --TCP--> agent-bridge forward  --ws--> ssm-emulator --TCP--> harness target
//!                          bench serve-listeners (the serve path: one session per connection)
//!                          session-manager-plugin (started with the AWS CLI's argv)
//!                          bench relay -> bench relay (raw TCP, the upper limit)
//! ```
//!
//! The harness measures at the receiving end (the target counts uploaded bytes, the client counts
//! downloaded bytes) over a fixed window after a warm-up, so buffers in between do not inflate a
//! figure. Every loop is bounded in count and time.
//!
//! The operator benchmark (`operator`) drives the operator's release binary against the real
//! kube-apiserver + etcd and moto instead (see its module).
//!
//! Subcommands: `run [--quick] [--out FILE] [--only PARTS]` (the benchmarks), and the roles it starts as child
//! processes: `relay LISTEN TO` and `serve-listeners ...`.

pub mod client_checks;
pub mod figures;
pub mod floor;
pub mod memory;
pub mod operator;
pub mod parallel;
pub mod report;
pub mod roles;
pub mod run;
pub mod scenarios;
pub mod shell_paste;
pub mod slow_reader;
pub mod support;

use std::process::ExitCode;

/// Dispatches the subcommands.
pub fn main_with_args(args: Vec<String>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("fleet-access-bench: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match args.first().map(String::as_str) {
            Some("run") => run::run(&args[1..]).await,
            Some("relay") => roles::relay_main(&args[1..]).await,
            Some("serve-listeners") => roles::serve_listeners_main(&args[1..]).await,
            _ => Err(anyhow::anyhow!(
                "usage: fleet-access-bench run [--quick] [--perf] [--out FILE] [--runs N] [--only throughput,slow-reader,parallel,shell-paste,setup,scale,memory,client-checks,operator] [--operator-grants N] [--operator-resync-seconds S]"
            )),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fleet-access-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}
