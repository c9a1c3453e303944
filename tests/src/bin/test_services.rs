//! `fleet-access-test-services CMD [ARGS...]`: starts the services every test binary
//! shares (etcd + kube-apiserver, moto) once, runs CMD with their locations in its
//! environment, and stops them when CMD ends, on Ctrl-C or on TERM. Used by
//! `tests/env/with-services.sh`.

use std::ffi::OsString;
use std::process::ExitStatus;

use anyhow::Context;
use fleet_access_tests::binaries::is_set_by_cargo_for_this_process;
use fleet_access_tests::control_plane::KUBECONFIG_ENV;
use fleet_access_tests::moto::MOTO_ENDPOINT_ENV;
use fleet_access_tests::{ControlPlane, Moto};
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let (program, program_args) = args
        .split_first()
        .context("usage: fleet-access-test-services CMD [ARGS...]")?;

    let (control_plane, moto) = tokio::try_join!(ControlPlane::start(), Moto::start())
        .context("starting the shared test services")?;
    eprintln!(
        "test services: kube-apiserver {} (KUBECONFIG={}), moto {}",
        control_plane.server_url(),
        control_plane.kubeconfig_path().display(),
        moto.endpoint()
    );

    let mut command = tokio::process::Command::new(program);
    // `with-services.sh` runs this program with `cargo run`; CMD (usually `cargo test`) must not
    // see the variables that cargo set for it, or it rebuilds the crates whose build scripts
    // watch them (ring and everything above it).
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(is_set_by_cargo_for_this_process) {
            command.env_remove(name);
        }
    }
    let mut child = command
        .args(program_args)
        .env(KUBECONFIG_ENV, control_plane.kubeconfig_path())
        .env("KUBECONFIG", control_plane.kubeconfig_path())
        .env(MOTO_ENDPOINT_ENV, moto.endpoint())
        .spawn()
        .with_context(|| format!("starting {}", program.to_string_lossy()))?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let status: ExitStatus = tokio::select! {
        status = child.wait() => status?,
        _ = terminate.recv() => {
            child.start_kill()?;
            child.wait().await?
        }
        // A terminal's Ctrl-C reaches the child too; wait for it to finish.
        _ = interrupt.recv() => child.wait().await?,
    };

    control_plane.stop();
    moto.stop();
    drop(control_plane);
    drop(moto);
    std::process::exit(status.code().unwrap_or(1));
}
