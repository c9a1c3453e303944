//! No stray processes: what the fixtures start stops on drop, when the test process
//! that started it dies (even by SIGKILL), and when `fleet-access-test-services`
//! (the `with-services.sh` wrapper) ends or is killed.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use fleet_access_tests::SupervisedProcess;
use fleet_access_tests::process::{accepts_connections, loopback};
use rustix::process::{Pid, Signal, kill_process_group, test_kill_process_group};

fn group_alive(pgid: u32) -> bool {
    let pid = Pid::from_raw(i32::try_from(pgid).expect("pid")).expect("nonzero pid");
    test_kill_process_group(pid).is_ok()
}

async fn wait_until(mut condition: impl FnMut() -> bool) -> bool {
    for _ in 0..300 {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn dropping_a_supervised_process_stops_its_whole_group() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut command = Command::new("sh");
    // A program that forks: the background sleep must stop too.
    command.args(["-c", "sleep 600 & sleep 600"]);
    let process =
        SupervisedProcess::spawn("forker", &command, &dir.path().join("log")).expect("spawn");
    let group = process.pid();
    assert!(group_alive(group));
    drop(process);
    assert!(!group_alive(group), "process group {group} survived drop");
}

#[tokio::test]
async fn a_supervised_process_stops_when_its_test_process_dies() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut stand_in = Command::new("sleep")
        .arg("600")
        .spawn()
        .expect("stand-in parent");
    let mut command = Command::new("sleep");
    command.arg("600");
    let mut process = SupervisedProcess::spawn_watching(
        "orphan candidate",
        &command,
        &dir.path().join("log"),
        stand_in.id(),
    )
    .expect("spawn");
    let group = process.pid();
    assert!(group_alive(group));
    stand_in.kill().expect("kill the stand-in");
    stand_in.wait().expect("reap the stand-in");
    assert!(
        wait_until(|| matches!(process.exit_status(), Ok(Some(_)))).await,
        "supervisor did not notice its parent died"
    );
    assert!(
        wait_until(|| !group_alive(group)).await,
        "group {group} outlived its parent"
    );
}

/// Starts the wrapper with `script` as its command, in its own process group.
fn start_wrapper(script: &str) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_fleet-access-test-services"))
        .args(["sh", "-c", script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("wrapper starts")
}

/// Reads the services' addresses the wrapper's command wrote to `out`.
fn service_addresses(out: &Path) -> Vec<std::net::SocketAddr> {
    let text = std::fs::read_to_string(out).expect("command wrote its environment");
    text.lines()
        .filter_map(|line| line.rsplit_once("127.0.0.1:"))
        .map(|(_, port)| loopback(port.trim().trim_end_matches('/').parse().expect("port")))
        .collect()
}

/// The control plane's folder, from the `kubeconfig=` line the command wrote.
fn control_plane_dir(out: &Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(out).expect("command wrote its environment");
    let kubeconfig = text
        .lines()
        .find_map(|line| line.strip_prefix("kubeconfig="))
        .expect("kubeconfig line");
    Path::new(kubeconfig)
        .parent()
        .expect("folder")
        .to_path_buf()
}

const REPORT_SERVICES: &str = r#"grep 'server:' "$FLEET_ACCESS_KUBECONFIG" > "$OUT.tmp" && echo "$FLEET_ACCESS_MOTO_ENDPOINT" >> "$OUT.tmp" && echo "kubeconfig=$FLEET_ACCESS_KUBECONFIG" >> "$OUT.tmp" && mv "$OUT.tmp" "$OUT""#;

#[tokio::test]
async fn the_wrapper_passes_the_exit_code_and_stops_its_services() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("services");
    let script = format!("OUT={}; {REPORT_SERVICES}; exit 3", out.display());
    let mut wrapper = start_wrapper(&script);
    let status = tokio::task::spawn_blocking(move || wrapper.wait())
        .await
        .expect("join")
        .expect("wait");
    assert_eq!(status.code(), Some(3));
    let addresses = service_addresses(&out);
    assert_eq!(addresses.len(), 2, "kube-apiserver and moto");
    for address in addresses {
        assert!(
            !accepts_connections(address).await,
            "{address} still listens"
        );
    }
}

#[tokio::test]
async fn killing_the_wrapper_leaves_no_services_behind() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("services");
    let script = format!("OUT={}; {REPORT_SERVICES}; sleep 600", out.display());
    let mut wrapper = start_wrapper(&script);
    assert!(wait_until(|| out.exists()).await, "services did not start");
    let addresses = service_addresses(&out);
    let folder = control_plane_dir(&out);
    assert!(folder.is_dir());
    for address in &addresses {
        assert!(accepts_connections(*address).await, "{address} is not up");
    }
    // SIGKILL: no chance to clean up; the supervisors must notice.
    let group = Pid::from_raw(i32::try_from(wrapper.id()).expect("pid")).expect("pid");
    kill_process_group(group, Signal::KILL).expect("kill the wrapper");
    wrapper.wait().expect("reap");
    for address in addresses {
        let mut closed = false;
        for _ in 0..300 {
            if !accepts_connections(address).await {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            closed,
            "{address} still listens after the wrapper was killed"
        );
    }
    assert!(
        wait_until(|| !folder.exists()).await,
        "{} was left behind",
        folder.display()
    );
}
