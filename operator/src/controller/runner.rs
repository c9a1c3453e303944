//! Wiring for `fleet-access-operator run`: tracing, the metrics registry, the admin endpoint,
//! the AWS and Kubernetes clients, leader election, and the controllers, until Ctrl-C or
//! SIGTERM.
//!
//! ```text
//!  start ─▶ standby ──(Lease acquired)──▶ leading: controllers run, /readyz 200
//!              ▲                              │
//!              └──────(Lease lost)────────────┤
//!                                  (signal) ─▶ controllers drain ─▶ Lease released ─▶ exit
//! ```

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::{oneshot, watch};

use crate::{
    Error, Result,
    aws::sdk::SdkAws,
    controller::{
        Context,
        leader::{Elector, Timing},
        preferences, reconcile,
    },
    metrics::Metrics,
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
    /// Seconds between censuses of open sessions.
    pub census_period: Duration,
    /// Where the admin endpoint listens.
    pub admin_address: String,
    /// This replica's name: its identity in the Lease and in Events; unique per replica.
    pub replica: String,
    /// Only this namespace's grants, when set.
    pub watch_namespace: Option<String>,
    /// Whether to reconcile the cluster's `SessionPreferences` (the account default document).
    pub manage_preferences: bool,
    /// The namespace and name of the leader Lease.
    pub lease_namespace: String,
    /// The leader Lease's name.
    pub lease_name: String,
    /// How long the Lease holds without renewal.
    pub lease_duration: Duration,
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
    let bound = listener.local_addr().unwrap_or(address);
    tracing::info!(address = %bound, "admin endpoint");
    // On standard error whatever the log filter: with port 0 the kernel picks the port, and
    // whoever started the process reads it here.
    eprintln!("admin listening on {bound}");
    let ready = Arc::new(AtomicBool::new(false));
    let admin = tokio::spawn(crate::admin::serve(listener, registry, ready.clone()));

    let client = kube::Client::try_default().await.map_err(Error::Kube)?;
    let sdk_config = aws_config::load_from_env().await;
    let aws = Arc::new(SdkAws::new(&sdk_config, metrics.clone()));
    let ctx = Arc::new(
        Context::new(
            client.clone(),
            aws.clone(),
            aws,
            config.settings,
            config.account,
            metrics.clone(),
            config.resync,
            &config.replica,
        )
        .watching(config.watch_namespace.clone())
        .counting_sessions_every(config.census_period),
    );

    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let (leading_tx, leading) = watch::channel(false);
    let elector = Elector::new(
        client,
        &config.lease_namespace,
        &config.lease_name,
        &config.replica,
        Timing::from_lease_duration(config.lease_duration),
    );
    let election = tokio::spawn(elector.keep(leading_tx, stop.clone()));
    tracing::info!(identity = %config.replica, lease = %config.lease_name, namespace = %config.lease_namespace, "waiting for the leader Lease");

    loop {
        if !wait_until_leading(leading.clone(), stop.clone()).await {
            break;
        }
        tracing::info!("leading: starting the controllers");
        metrics.leader.set(1);
        ready.store(true, Ordering::Relaxed);
        let halt = halt_when_stopped_or_deposed(stop.clone(), leading.clone());
        let grants = reconcile::run(ctx.clone(), notified(halt.clone()));
        let preferences = async {
            if config.manage_preferences {
                preferences::run(ctx.clone(), notified(halt.clone())).await;
            }
        };
        tokio::join!(grants, preferences);
        ready.store(false, Ordering::Relaxed);
        metrics.leader.set(0);
        if *stop.borrow() {
            break;
        }
        tracing::warn!("lost the leader Lease: controllers stopped, standing by");
    }
    // The controllers have drained: only now may a standby take over.
    if let Ok(mut elector) = election.await
        && let Err(error) = elector.release().await
    {
        tracing::warn!(%error, "cannot release the Lease; a standby takes over when it expires");
    }
    admin.abort();
    Ok(())
}

/// Waits until this replica leads (true) or the operator stops (false).
async fn wait_until_leading(
    mut leading: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) -> bool {
    let led = tokio::select! {
        led = leading.wait_for(|l| *l) => led.is_ok(),
        _ = stop.wait_for(|s| *s) => false,
    };
    led && !*stop.borrow()
}

/// A channel that turns true when the operator stops or this replica stops leading.
fn halt_when_stopped_or_deposed(
    mut stop: watch::Receiver<bool>,
    mut leading: watch::Receiver<bool>,
) -> watch::Receiver<bool> {
    let (halt_tx, halt) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => {}
            _ = leading.wait_for(|l| !*l) => {}
        }
        let _ = halt_tx.send(true);
    });
    halt
}

/// A future (Send + Sync, as the controllers need) that completes when `halt` turns true.
fn notified(
    mut halt: watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send + Sync + 'static {
    let (done_tx, done) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = halt.wait_for(|h| *h).await;
        let _ = done_tx.send(());
    });
    async move {
        let _ = done.await;
    }
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
