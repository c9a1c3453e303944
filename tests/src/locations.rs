//! Where the test programs are: the cache layout and pinned versions defined once in
//! `tests/env/common.sh`, read by running that script, and the Debian programs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::error::{FixtureError, FixtureResult};

/// The folder holding the shell scripts of the test environment (`tests/env`).
pub fn env_scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("env")
}

/// Locations and versions of the programs built or installed by `tests/env/setup.sh`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locations {
    /// Root of the cache outside the checkout (`${XDG_CACHE_HOME:-~/.cache}/fleet-access`).
    pub cache_dir: PathBuf,
    /// Pinned Kubernetes version (e.g. `v1.35.4`).
    pub kube_version: String,
    /// Pinned etcd version.
    pub etcd_version: String,
    /// Pinned moto version.
    pub moto_version: String,
    /// Pinned session-manager-plugin module version (a Go pseudo-version).
    pub session_manager_plugin_version: String,
    /// The kube-apiserver binary.
    pub kube_apiserver: PathBuf,
    /// The kubectl binary (same version as kube-apiserver).
    pub kubectl: PathBuf,
    /// The etcd binary.
    pub etcd: PathBuf,
    /// The official session-manager-plugin binary.
    pub session_manager_plugin: PathBuf,
    /// `moto_server` inside its virtual environment.
    pub moto_server: PathBuf,
    /// The `node_modules` folder of the IAM evaluator's packages.
    pub iam_evaluator_node_modules: PathBuf,
}

impl Locations {
    /// Parses the `KEY=VALUE` lines printed by `print_locations` in `common.sh`.
    pub fn parse(text: &str) -> FixtureResult<Self> {
        let values: BTreeMap<&str, &str> = text
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(key, value)| (key.trim(), value.trim()))
            .collect();
        let get = |key: &str| -> FixtureResult<String> {
            values
                .get(key)
                .filter(|value| !value.is_empty())
                .map(|value| (*value).to_owned())
                .ok_or_else(|| FixtureError::UnexpectedAnswer {
                    component: "tests/env/common.sh".into(),
                    detail: format!("no value for {key}"),
                })
        };
        Ok(Self {
            cache_dir: get("FLEET_ACCESS_CACHE")?.into(),
            kube_version: get("KUBE_VERSION")?,
            etcd_version: get("ETCD_VERSION")?,
            moto_version: get("MOTO_VERSION")?,
            session_manager_plugin_version: get("SMP_VERSION")?,
            kube_apiserver: get("KUBE_APISERVER_BIN")?.into(),
            kubectl: get("KUBECTL_BIN")?.into(),
            etcd: get("ETCD_BIN")?.into(),
            session_manager_plugin: get("SMP_BIN")?.into(),
            moto_server: get("MOTO_SERVER_BIN")?.into(),
            iam_evaluator_node_modules: get("IAM_EVALUATOR_NODE_MODULES")?.into(),
        })
    }

    /// The locations for this machine (resolved once per process).
    pub fn get() -> FixtureResult<&'static Self> {
        static LOCATIONS: OnceLock<Locations> = OnceLock::new();
        if let Some(locations) = LOCATIONS.get() {
            return Ok(locations);
        }
        let common = env_scripts_dir().join("common.sh");
        let output = Command::new("bash")
            .arg("-c")
            .arg(r#". "$1" && print_locations"#)
            .arg("bash")
            .arg(&common)
            .output()
            .map_err(FixtureError::io(format!("running {}", common.display())))?;
        if !output.status.success() {
            return Err(FixtureError::CommandFailed {
                command: format!("bash {}", common.display()),
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        let parsed = Self::parse(&String::from_utf8_lossy(&output.stdout))?;
        Ok(LOCATIONS.get_or_init(|| parsed))
    }
}

/// Returns `path` when it is an existing file, or a [`FixtureError::MissingProgram`]
/// telling how to get it.
pub fn require_program(program: &str, path: &Path) -> FixtureResult<PathBuf> {
    if path.is_file() {
        Ok(path.to_path_buf())
    } else {
        Err(FixtureError::MissingProgram {
            program: program.into(),
            path: path.to_path_buf(),
            hint: "run tests/env/setup.sh".into(),
        })
    }
}

/// The cache folder of the test environment.
pub fn cache_dir() -> FixtureResult<PathBuf> {
    Ok(Locations::get()?.cache_dir.clone())
}

/// The official session-manager-plugin built by `tests/env/setup.sh`.
pub fn session_manager_plugin_path() -> FixtureResult<PathBuf> {
    let locations = Locations::get()?;
    require_program("session-manager-plugin", &locations.session_manager_plugin)
}

/// The official plugin's command line, as the AWS CLI builds it after StartSession: the
/// plugin, the StartSession `response` (JSON), the Region, the operation, the profile (none),
/// the request's parameters (JSON), and the SSM endpoint.
pub fn plugin_command_line(
    plugin: &std::path::Path,
    response: &serde_json::Value,
    region: &str,
    request: &serde_json::Value,
    endpoint: &str,
) -> Vec<String> {
    vec![
        plugin.display().to_string(),
        response.to_string(),
        region.to_owned(),
        "StartSession".to_owned(),
        String::new(),
        request.to_string(),
        endpoint.to_owned(),
    ]
}

/// Debian's programs the fixtures run.
pub(crate) mod debian {
    /// OpenSSH server (package openssh-server). Must be called by absolute path.
    pub(crate) const SSHD: &str = "/usr/sbin/sshd";
    /// OpenSSH key generator (package openssh-client).
    pub(crate) const SSH_KEYGEN: &str = "/usr/bin/ssh-keygen";
    /// OpenSSH client.
    pub(crate) const SSH: &str = "/usr/bin/ssh";
    /// OpenSSH copy client.
    pub(crate) const SCP: &str = "/usr/bin/scp";
    /// Prometheus server (package prometheus).
    pub(crate) const PROMETHEUS: &str = "/usr/bin/prometheus";
    /// Prometheus command-line tool (package prometheus).
    pub(crate) const PROMTOOL: &str = "/usr/bin/promtool";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_locations_printed_by_common_sh() {
        let text = "FLEET_ACCESS_CACHE=/c\nKUBE_VERSION=v1.35.4\nETCD_VERSION=v3.6.5\n\
            MOTO_VERSION=5.2.5\nSMP_VERSION=v0.0.0-1\nKUBE_APISERVER_BIN=/c/a\nKUBECTL_BIN=/c/k\n\
            ETCD_BIN=/c/e\nSMP_BIN=/c/s\nMOTO_SERVER_BIN=/c/m\nIAM_EVALUATOR_NODE_MODULES=/c/n\n";
        let locations = Locations::parse(text).expect("parses");
        assert_eq!(locations.cache_dir, PathBuf::from("/c"));
        assert_eq!(locations.kube_version, "v1.35.4");
        assert_eq!(locations.session_manager_plugin, PathBuf::from("/c/s"));
        assert_eq!(locations.moto_server, PathBuf::from("/c/m"));
        assert_eq!(locations.iam_evaluator_node_modules, PathBuf::from("/c/n"));
    }

    #[test]
    fn a_missing_key_is_an_error() {
        let error = Locations::parse("FLEET_ACCESS_CACHE=/c\n").expect_err("incomplete");
        assert!(error.to_string().contains("KUBE_VERSION"), "{error}");
    }

    #[test]
    fn common_sh_prints_every_location() {
        let locations = Locations::get().expect("common.sh runs");
        assert!(locations.kube_apiserver.starts_with(&locations.cache_dir));
        assert!(
            locations
                .kube_apiserver
                .to_string_lossy()
                .contains(&locations.kube_version)
        );
    }
}
