//! `fleet-access-bench`: see the crate's lib.rs.

fn main() -> std::process::ExitCode {
    fleet_access_bench::main_with_args(std::env::args().skip(1).collect())
}
