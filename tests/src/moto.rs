//! moto server (a real HTTP implementation of the AWS APIs, from PyPI, installed by
//! `tests/env/setup.sh`) on a free loopback port, and AWS SDK configurations pointed
//! at it with static test credentials.
//!
//! Tests sharing one server must use unique resource names (IAM policy names, SSM
//! document names): moto keeps state for the server's lifetime.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::Credentials;
use tempfile::TempDir;

use crate::error::{FixtureError, FixtureResult};
use crate::locations::{Locations, require_program};
use crate::process::{
    SupervisedProcess, accepts_connections, free_loopback_port, loopback, retry_on_port_clash,
};

/// When set, [`Moto::shared`] uses the moto server at this URL (set by
/// `tests/env/with-services.sh`) instead of starting one.
pub const MOTO_ENDPOINT_ENV: &str = "FLEET_ACCESS_MOTO_ENDPOINT";
/// The access key id and secret of the static test credentials.
pub const TEST_CREDENTIAL: &str = "testing";
/// The region of the SDK configurations.
pub const TEST_REGION: &str = "us-east-1";
/// The account id moto reports by default.
pub const MOTO_ACCOUNT_ID: &str = "123456789012";

const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A moto server: started by this value (stopped on drop) or external.
#[derive(Debug)]
pub struct Moto {
    endpoint: String,
    process: Option<(Mutex<SupervisedProcess>, TempDir)>,
}

impl Moto {
    /// The server shared by every test of this process: the one at
    /// `FLEET_ACCESS_MOTO_ENDPOINT` when set, otherwise one started on first use and
    /// stopped when the process ends (by the supervisor).
    pub async fn shared() -> FixtureResult<&'static Self> {
        static SHARED: tokio::sync::OnceCell<Moto> = tokio::sync::OnceCell::const_new();
        SHARED
            .get_or_try_init(|| async {
                match std::env::var(MOTO_ENDPOINT_ENV) {
                    Ok(endpoint) if !endpoint.is_empty() => Ok(Self::external(endpoint)),
                    _ => Self::start().await,
                }
            })
            .await
    }

    /// Uses a moto server that is already running.
    pub fn external(endpoint: String) -> Self {
        Self {
            endpoint,
            process: None,
        }
    }

    /// Starts a moto server on a free loopback port and waits until it accepts
    /// connections.
    pub async fn start() -> FixtureResult<Self> {
        retry_on_port_clash(Self::start_once).await
    }

    async fn start_once() -> FixtureResult<Self> {
        let moto_server = require_program("moto_server", &Locations::get()?.moto_server)?;
        let dir = tempfile::Builder::new()
            .prefix("fleet-access-moto-")
            .tempdir()
            .map_err(FixtureError::io("creating the moto folder"))?;
        let port = free_loopback_port()?;
        let mut command = Command::new(moto_server);
        command
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .current_dir(dir.path())
            // Never look for real credentials or configuration.
            .env("AWS_ACCESS_KEY_ID", TEST_CREDENTIAL)
            .env("AWS_SECRET_ACCESS_KEY", TEST_CREDENTIAL)
            .env("AWS_DEFAULT_REGION", TEST_REGION)
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
        let mut process = SupervisedProcess::spawn_removing_dir(
            "moto_server",
            &command,
            &dir.path().join("moto.log"),
            dir.path(),
        )?;
        process
            .wait_until(READY_TIMEOUT, || accepts_connections(loopback(port)))
            .await?;
        Ok(Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            process: Some((Mutex::new(process), dir)),
        })
    }

    /// The server's URL (`http://127.0.0.1:<port>`).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The server's log file, when this value started it.
    pub fn log_path(&self) -> Option<PathBuf> {
        let (process, _) = self.process.as_ref()?;
        process.lock().ok().map(|p| p.log_path().to_path_buf())
    }

    /// An SDK configuration for every AWS client: this endpoint, static credentials
    /// `testing`/`testing`, region `us-east-1`. Nothing is read from the environment
    /// or from `~/.aws`.
    pub fn sdk_config(&self) -> SdkConfig {
        sdk_config_for(&self.endpoint)
    }

    /// The environment variables that point an AWS SDK or CLI process at this server.
    pub fn process_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", TEST_CREDENTIAL.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", TEST_CREDENTIAL.to_owned()),
            ("AWS_REGION", TEST_REGION.to_owned()),
            ("AWS_DEFAULT_REGION", TEST_REGION.to_owned()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
        ]
    }

    /// Stops the server this value started (no-op for an external one).
    pub fn stop(&self) {
        if let Some((process, _)) = &self.process
            && let Ok(mut process) = process.lock()
        {
            process.stop();
        }
    }
}

/// An SDK configuration for a moto server at `endpoint`.
pub fn sdk_config_for(endpoint: &str) -> SdkConfig {
    let credentials = Credentials::new(
        TEST_CREDENTIAL,
        TEST_CREDENTIAL,
        None,
        None,
        "fleet-access-tests",
    );
    SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new(TEST_REGION))
        .credentials_provider(
            aws_credential_types::provider::SharedCredentialsProvider::new(credentials),
        )
        .build()
}

/// Every customer managed policy under `path`, from every page of the listing: a moto server
/// shared by a test run holds far more policies than one page, so a check that something is
/// gone must not read only the first.
pub async fn policies_under(
    iam: &aws_sdk_iam::Client,
    path: &str,
) -> FixtureResult<Vec<aws_sdk_iam::types::Policy>> {
    iam.list_policies()
        .scope(aws_sdk_iam::types::PolicyScopeType::Local)
        .path_prefix(path)
        .into_paginator()
        .items()
        .send()
        .try_collect()
        .await
        .map_err(|error| FixtureError::UnexpectedAnswer {
            component: "IAM ListPolicies".to_owned(),
            detail: format!("{error:?}"),
        })
}
