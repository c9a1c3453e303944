//! The official session-manager-plugin built from the Go module proxy runs and
//! reports its version.

use std::process::Command;

use fleet_access_tests::session_manager_plugin_path;

#[test]
fn plugin_reports_its_version() {
    let plugin =
        session_manager_plugin_path().expect("plugin built (run tests/env/setup.sh first)");
    let output = Command::new(&plugin)
        .arg("--version")
        .output()
        .expect("runs");
    assert!(output.status.success());
    let version = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let parts: Vec<&str> = version.split('.').collect();
    assert_eq!(parts.len(), 4, "four-part version, got {version:?}");
    assert!(
        parts.iter().all(|p| p.parse::<u32>().is_ok()),
        "{version:?}"
    );
}

#[test]
fn plugin_without_arguments_says_it_is_installed() {
    let plugin = session_manager_plugin_path().expect("plugin built");
    let output = Command::new(&plugin).output().expect("runs");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("installed successfully"),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
}
