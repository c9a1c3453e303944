//! Wiring for `fleet-access-operator run`: tracing, the metrics registry, the admin endpoint,
//! the AWS and Kubernetes clients, and the controller, until Ctrl-C or SIGTERM.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use crate::{
    Error, Result,
    aws::sdk::SdkAws,
    metrics::Metrics,
    reconcile::{self, Context},
    settings::Settings,
};

/// What `run` needs.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Partition, Region, bridge role and namespace.
    pub settings: Settings,
    /// The AWS account ID.
    pub account: String,
    /// Seconds between drift checks.
    pub resync: Duration,
    /// Where the admin endpoint listens.
    pub admin_address: String,
    /// This replica's name.
    pub replica: String,
    /// Only this namespace's grants, when set.
    pub watch_namespace: Option<String>,
}

/// Runs the operator until a shutdown signal.
pub async fn run(config: RunConfig) -> Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Both ring and aws-lc-rs are in the tree; pick one so rustls does not refuse.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let registry = prometheus::Registry::new();
    let metrics =
        Metrics::register(&registry).map_err(|e| Error::Config(format!("metrics: {e}")))?;
    let address: SocketAddr = config
        .admin_address
        .parse()
        .map_err(|e| Error::Config(format!("--admin-address {}: {e}", config.admin_address)))?;
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| Error::Config(format!("cannot listen on {address}: {e}")))?;
    tracing::info!(address = %listener.local_addr().unwrap_or(address), "admin endpoint");
    let ready = Arc::new(AtomicBool::new(false));
    let admin = tokio::spawn(crate::admin::serve(listener, registry, ready.clone()));

    let client = kube::Client::try_default().await.map_err(Error::Kube)?;
    let sdk_config = aws_config::load_from_env().await;
    let aws = Arc::new(SdkAws::new(&sdk_config, metrics.clone()));
    let ctx = Arc::new(Context::new(
        client,
        aws.clone(),
        aws,
        config.settings,
        config.account,
        metrics,
        config.resync,
        &config.replica,
    ));
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    reconcile::run(ctx, config.watch_namespace.as_deref(), shutdown_signal()).await;
    admin.abort();
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}
