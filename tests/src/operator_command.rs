//! The operator's `run` command line as the tests and the bench start it against the fixtures,
//! so that the flags and the environment every harness needs are written once.

use std::{path::Path, process::Command};

use crate::moto::{MOTO_ACCOUNT_ID, Moto, TEST_REGION};

/// One `fleet-access-operator run` against the fixtures: moto's account and Region, IAM on moto
/// (with its credentials), SSM at `ssm_endpoint`, the API server of `kubeconfig`.
pub struct OperatorCommandLine<'a> {
    /// The API server, as a kubeconfig file.
    pub kubeconfig: &'a Path,
    /// IAM, and the credentials the process uses.
    pub moto: &'a Moto,
    /// SSM: the emulator's URL.
    pub ssm_endpoint: &'a str,
    /// Where grants are watched.
    pub watch_namespace: &'a str,
    /// Where the bridge's endpoint Services go.
    pub bridge_namespace: &'a str,
    /// Metrics and health (`127.0.0.1:PORT`; with port 0 the operator binds a port the system
    /// picks and reports it: [`crate::addresses::reported_address`]).
    pub admin_address: &'a str,
    /// The replica's name (its leader Lease holder identity).
    pub replica: &'a str,
}

/// The cluster name a test's operator runs under: its watched namespace's name (cut to 40
/// characters), so that operators of concurrent tests never take each other's policy sets for
/// orphans (operators that share a cluster name share its sets, as the operator's docs say).
pub fn cluster_of(namespace: &str) -> String {
    let mut cluster: String = namespace.chars().take(40).collect();
    while cluster.ends_with('-') {
        cluster.pop();
    }
    cluster
}

impl OperatorCommandLine<'_> {
    /// The `--cluster-name` it runs under ([`cluster_of`] the watched namespace).
    pub fn cluster(&self) -> String {
        cluster_of(self.watch_namespace)
    }

    /// Adds the arguments and the environment to `command` (the operator's binary). Callers add
    /// what differs between them: `--resync-seconds`, lease flags, `RUST_LOG`, where output goes.
    pub fn apply<'c>(&self, command: &'c mut Command) -> &'c mut Command {
        command
            .args(["run", "--account", MOTO_ACCOUNT_ID, "--region", TEST_REGION])
            .args(["--admin-address", self.admin_address])
            .args(["--replica", self.replica])
            .args(["--watch-namespace", self.watch_namespace])
            .args(["--bridge-namespace", self.bridge_namespace])
            .args(["--cluster-name", &self.cluster()])
            .envs(self.moto.process_env())
            .env("AWS_ENDPOINT_URL_IAM", self.moto.endpoint())
            .env("AWS_ENDPOINT_URL_SSM", self.ssm_endpoint)
            .env("KUBECONFIG", self.kubeconfig)
    }
}
