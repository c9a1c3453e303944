//! The SSH part of the test environment: a private sshd on loopback that the OpenSSH
//! client logs in to with the generated key, runs commands on and copies files through.

use std::process::Command;
use std::time::Duration;

use fleet_access_tests::Sshd;
use fleet_access_tests::process::accepts_connections;

fn run(command: &mut Command) -> std::process::Output {
    let output = command.output().expect("client runs");
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[tokio::test]
async fn ssh_runs_a_command() {
    let sshd = Sshd::start()
        .await
        .expect("sshd starts (run tests/env/setup.sh first)");
    let token = uuid::Uuid::new_v4().simple().to_string();
    let output = run(sshd.ssh_command().arg("echo").arg(&token).arg("$USER"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout.trim(), format!("{token} {}", sshd.user()));
}

#[tokio::test]
async fn scp_copies_a_file_both_ways() {
    let sshd = Sshd::start().await.expect("sshd starts");
    let local = tempfile::tempdir().expect("temp dir");
    let remote = tempfile::tempdir().expect("temp dir");
    let content: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let source = local.path().join("upload.bin");
    std::fs::write(&source, &content).expect("write");

    let uploaded = remote.path().join("uploaded.bin");
    run(sshd
        .scp_command()
        .arg(&source)
        .arg(sshd.scp_remote(&uploaded)));
    assert_eq!(std::fs::read(&uploaded).expect("uploaded"), content);

    let downloaded = local.path().join("downloaded.bin");
    run(sshd
        .scp_command()
        .arg(sshd.scp_remote(&uploaded))
        .arg(&downloaded));
    assert_eq!(std::fs::read(&downloaded).expect("downloaded"), content);
}

#[tokio::test]
async fn a_key_that_is_not_authorized_is_refused() {
    let sshd = Sshd::start().await.expect("sshd starts");
    let other = tempfile::tempdir().expect("temp dir");
    let other_key = other.path().join("other");
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other_key));
    let output = Command::new("ssh")
        .args(["-F", "/dev/null", "-i"])
        .arg(&other_key)
        .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"])
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            sshd.known_hosts_file().display()
        ))
        .arg("-p")
        .arg(sshd.port().to_string())
        .arg(format!("{}@127.0.0.1", sshd.user()))
        .arg("true")
        .output()
        .expect("client runs");
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn dropping_the_fixture_stops_sshd() {
    let sshd = Sshd::start().await.expect("sshd starts");
    let address = fleet_access_tests::process::loopback(sshd.port());
    assert!(accepts_connections(address).await);
    drop(sshd);
    let mut closed = false;
    for _ in 0..100 {
        if !accepts_connections(address).await {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(closed, "sshd still listens on {address} after drop");
}
