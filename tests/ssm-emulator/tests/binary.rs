//! The `ssm-emulator --config FILE` binary prints its endpoint and serves the fleet of the file.

mod common;

use std::process::Stdio;

use common::*;
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test]
async fn binary_serves_the_configured_fleet() {
    let scratch = tempfile_dir();
    let config = scratch.path().join("emulator.yaml");
    std::fs::write(
        &config,
        "mode: fast\ninstances:\n  - id: i-0123456789abcdef0\n    tags: { Name: from-file }\n",
    )
    .expect("write config");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ssm-emulator"))
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("binary starts");
    let stdout = child.stdout.take().expect("stdout");
    let line = tokio::time::timeout(TEST_TIMEOUT, BufReader::new(stdout).lines().next_line())
        .await
        .expect("endpoint in time")
        .expect("read")
        .expect("a line");
    assert!(line.starts_with("http://127.0.0.1:"), "{line}");
    let ssm = ssm_client(&line);
    let out = ssm
        .describe_instance_information()
        .send()
        .await
        .expect("describe");
    let ids: Vec<_> = out
        .instance_information_list()
        .iter()
        .filter_map(|i| i.instance_id())
        .collect();
    assert_eq!(ids, vec!["i-0123456789abcdef0"]);
    let _ = child.kill().await;
}

#[tokio::test]
async fn example_config_is_valid() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/emulator.yaml");
    let config = fleet_access_ssm_emulator::Config::from_file(&path).expect("example parses");
    assert_eq!(config.instances.len(), 2);
}
