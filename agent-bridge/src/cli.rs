//! The command line: `serve` (in cluster), `proxy` (ssh ProxyCommand), `forward` (local port
//! forwarding, `forward.rs`) and `shell` (an interactive shell, `terminal.rs`). Logs go to
//! standard error: in `proxy` mode standard output is the SSH stream.

use std::{net::SocketAddr, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use fleet_access_crds::ssm_documents;
use prometheus::Registry;
use tokio::{net::TcpListener, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    admin::{self, Readiness},
    budget::{DEFAULT_MEMORY_BUDGET, MemoryBudget},
    driver::signing::{SigV4Signer, UpgradeSigner},
    forward::{Pool, forward},
    listener::Limits,
    metrics::Metrics,
    replica::{self, ReplicaMark},
    serve::{self, ServeConfig},
    ssm::{SdkControlPlane, SdkDataKeys, StartSessionRequest},
    stream_url::StreamUrls,
    terminal,
    tunnel::{Ending, SessionContext, UNMARKED_REASON, carry},
};

/// Reach EC2 instances through AWS Systems Manager Session Manager, without the AWS CLI or the
/// session-manager-plugin.
#[derive(Parser, Debug)]
#[command(name = "agent-bridge", version, about)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the endpoint Services of the bridge's namespace (in cluster).
    Serve(ServeArgs),
    /// Carry standard input and output to an instance's SSH port: for `ProxyCommand agent-bridge
    /// proxy %h %p` in ~/.ssh/config.
    Proxy(ProxyArgs),
    /// Forward a local port to a port on (or reachable from) an instance; many connections share
    /// one session.
    Forward(ForwardArgs),
    /// An interactive shell on an instance (`~.` at the start of a line leaves it).
    Shell(ShellArgs),
}

/// AWS settings shared by every mode.
#[derive(clap::Args, Debug, Clone)]
pub struct AwsArgs {
    /// The AWS Region (default: from the environment or profile).
    #[arg(long, env = "AWS_REGION")]
    pub region: Option<String>,
    /// Send SSM API calls here instead of the AWS endpoint (tests, the emulator).
    #[arg(long, env = "AWS_ENDPOINT_URL_SSM")]
    pub ssm_endpoint: Option<String>,
    /// Send KMS API calls (a shell's encryption) here instead of the AWS endpoint (tests).
    #[arg(long, env = "AWS_ENDPOINT_URL_KMS")]
    pub kms_endpoint: Option<String>,
    /// Dial whatever ws:// or wss:// stream URL StartSession returns, not only wss:// on a
    /// Session Manager messages host: for an emulator, never against AWS.
    #[arg(long, env = "AGENT_BRIDGE_ALLOW_ANY_STREAM_URL")]
    pub allow_any_stream_url: bool,
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    aws: AwsArgs,
    /// The namespace whose endpoint Services to serve.
    #[arg(long, env = "POD_NAMESPACE", default_value = "fleet-access")]
    namespace: String,
    /// The address endpoint listeners bind.
    #[arg(long, default_value = "0.0.0.0")]
    listen_address: std::net::IpAddr,
    /// The admin address (/healthz, /readyz, /metrics).
    #[arg(long, default_value = "0.0.0.0:9090")]
    admin_address: SocketAddr,
    /// Most concurrent sessions across the bridge.
    #[arg(long, default_value_t = 1000)]
    max_sessions: usize,
    /// Most concurrent sessions whose clients are in one namespace (each tenant's share; clients
    /// no single pod is known for share one). Applies when clients are attributed.
    #[arg(long, default_value_t = 250)]
    max_sessions_per_client_namespace: usize,
    /// Most concurrent sessions to one instance.
    #[arg(long, default_value_t = 100)]
    max_sessions_per_instance: usize,
    /// MiB all sessions' buffers may hold together (what clients have not read yet, what the
    /// instances have not acknowledged): within it nothing is dropped, sessions read less; a
    /// connection is refused when no room for one more message is left. The default fits the
    /// shipped pod limit (512Mi) with a thousand sessions open. The sessions of one client
    /// namespace hold at most the same share of it as of the sessions (250 of 1000: a quarter).
    #[arg(long, default_value_t = DEFAULT_MEMORY_BUDGET / (1024 * 1024))]
    memory_budget_mib: usize,
    /// End sessions idle this many seconds (0: never).
    #[arg(long, default_value_t = 1200)]
    idle_timeout_seconds: u64,
    /// End sessions after this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    max_session_seconds: u64,
    /// Seconds running sessions may continue after SIGTERM before they are terminated.
    #[arg(long, default_value_t = 25)]
    drain_seconds: u64,
    /// This replica's pod name (downward API). With --pod-uid, every session is marked with
    /// this run of this pod, and at start the sessions of dead runs are terminated.
    #[arg(long, env = "POD_NAME", requires = "pod_uid")]
    pod_name: Option<String>,
    /// This replica's pod uid (downward API).
    #[arg(long, env = "POD_UID", requires = "pod_name")]
    pod_uid: Option<String>,
    /// A name for this cluster, the same for every replica: bridges of clusters that share
    /// an IAM role must have different names, so that none sweeps another's sessions.
    #[arg(long, env = "FLEET_ACCESS_CLUSTER_NAME", default_value = "default")]
    cluster_name: String,
    /// Do not watch the cluster's pods to attribute connections to their client pods (in each
    /// session's Reason and audit record): records then give the client's address only, and
    /// the bridge needs no permission outside its namespace. Without the pods, no grant's pod
    /// or namespace selector can be checked: needs --no-client-policy-check.
    #[arg(long, env = "FLEET_ACCESS_NO_CLIENT_ATTRIBUTION")]
    no_client_attribution: bool,
    /// Carry every connection that reaches a listener, without checking that some grant's
    /// NetworkPolicy admits its client: who may connect is then the CNI's alone to enforce.
    #[arg(long, env = "FLEET_ACCESS_NO_CLIENT_POLICY_CHECK")]
    no_client_policy_check: bool,
}

#[derive(clap::Args, Debug)]
struct ProxyArgs {
    #[command(flatten)]
    aws: AwsArgs,
    /// The instance ID (`%h` in ~/.ssh/config).
    instance_id: String,
    /// The SSH port on the instance (`%p`).
    #[arg(default_value_t = 22)]
    port: u16,
    /// The session document to start instead of AWS-StartSSHSession: a grant's own Port
    /// document for port 22 (which pins the port, so `%p` is not passed).
    #[arg(long)]
    document: Option<String>,
}

#[derive(clap::Args, Debug)]
struct ForwardArgs {
    #[command(flatten)]
    aws: AwsArgs,
    /// The instance ID.
    instance_id: String,
    /// The port to reach, on the instance or on --remote-host. Not with a --document that
    /// pins the port (as the grants' documents do).
    #[arg(long, required_unless_present = "document")]
    remote_port: Option<u16>,
    /// A host reachable from the instance.
    #[arg(long, conflicts_with = "document")]
    remote_host: Option<String>,
    /// The Port session document to start. By default, the one fleet-access grants allow for
    /// --remote-port (and --remote-host) in --cluster-name: `fleet-access.<cluster>.port<N>`
    /// or `fleet-access.<cluster>.to-<host>-port<N>`, as `fleet-access-operator plan` prints.
    #[arg(long)]
    document: Option<String>,
    /// Start AWS's own forwarding documents instead (AWS-StartPortForwardingSession, or
    /// AWS-StartPortForwardingSessionToRemoteHost with --remote-host), which take any port and
    /// host: for accounts whose policies allow them, not for fleet-access grants.
    #[arg(long, conflicts_with = "document")]
    aws_document: bool,
    /// The cluster whose grants' documents to start (the operator's --cluster).
    #[arg(long, env = "FLEET_ACCESS_CLUSTER_NAME", default_value = "default")]
    cluster_name: String,
    /// The local address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    local: SocketAddr,
    /// The most sessions to carry connections over at once: another session opens when a
    /// connection arrives and every open one carries a connection (the agent reads each
    /// session's connections in one loop, so parallel downloads want sessions of their own).
    /// 1 carries every connection over one session.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    max_sessions: u16,
    /// Seconds a session beyond the first stays open without a connection.
    #[arg(long, default_value_t = Pool::default().idle.as_secs())]
    idle_session_seconds: u64,
}

#[derive(clap::Args, Debug)]
struct ShellArgs {
    #[command(flatten)]
    aws: AwsArgs,
    /// The instance ID.
    instance_id: String,
    /// The shell document to start: a grant's own, with its logging preferences
    /// (`fleet-access.<cluster>.<namespace>.<grant>-shell`, as `fleet-access-operator plan` and
    /// the grant's status print it). By default the account's, SSM-SessionManagerRunShell.
    #[arg(long)]
    document: Option<String>,
}

impl Args {
    /// Runs the chosen mode.
    pub fn run(self) -> ExitCode {
        // A shell shares the person's terminal: only what needs their attention.
        init_tracing(match self.command {
            Command::Shell(_) => "warn",
            _ => "info",
        });
        select_crypto_provider();
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(error) => {
                eprintln!("agent-bridge: cannot start the runtime: {error}");
                return ExitCode::FAILURE;
            }
        };
        let result = runtime.block_on(async move {
            match self.command {
                Command::Serve(args) => run_serve(args).await,
                Command::Proxy(args) => run_proxy(args).await,
                Command::Forward(args) => run_forward(args).await,
                Command::Shell(args) => run_shell(args).await,
            }
        });
        // Every mode has finished its work here (a tunnel returns once its local writes are
        // done). Dropping the runtime would wait for its blocking threads, and `proxy` may
        // have one parked in a read of standard input that ends only when the caller closes
        // it: the process would outlive its session.
        runtime.shutdown_background();
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("agent-bridge: {error:#}");
                ExitCode::FAILURE
            }
        }
    }
}

/// Selects rustls' ring provider for the process: the dependency graph enables both ring (kube)
/// and aws-lc-rs (the AWS SDK's HTTP client), and with two providers rustls refuses to pick one,
/// so `serve` panicked when it first reached the Kubernetes API.
pub fn select_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Fails only when another thread installed one first, which is just as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// Logs to standard error, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing(default: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Loads the AWS configuration: the default credential chain (IRSA and EKS Pod Identity in a
/// cluster), the Region, and an optional SSM endpoint override.
pub async fn load_aws(aws: &AwsArgs) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(region) = &aws.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(endpoint) = &aws.ssm_endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    loader.load().await
}

/// The SSM control plane these settings describe: the SDK, and which stream URLs to dial.
pub fn control_plane(aws: &AwsArgs, sdk: &aws_config::SdkConfig) -> SdkControlPlane {
    let stream_urls = if aws.allow_any_stream_url {
        tracing::warn!("dialling any stream URL (--allow-any-stream-url): for an emulator only");
        StreamUrls::Any
    } else {
        StreamUrls::SessionManagerOnly
    };
    SdkControlPlane::new(sdk).with_stream_urls(stream_urls)
}

/// A signer for WebSocket upgrades, when credentials and a Region are configured.
pub fn upgrade_signer(sdk: &aws_config::SdkConfig) -> Option<Arc<dyn UpgradeSigner>> {
    let credentials = sdk.credentials_provider()?;
    let region = sdk.region()?.to_string();
    Some(Arc::new(SigV4Signer::new(credentials, region)))
}

/// Fires when the process gets SIGINT, SIGTERM or SIGHUP (ssh ends its ProxyCommand with
/// SIGHUP; a closed terminal sends it too): the session is then ended at AWS at once instead of
/// lingering until the agent notices the lost WebSocket.
pub fn shutdown_on_signal() -> CancellationToken {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let fire = token.clone();
    tokio::spawn(async move {
        let received = |kind: SignalKind| async move {
            match signal(kind) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            () = received(SignalKind::interrupt()) => {}
            () = received(SignalKind::terminate()) => {}
            () = received(SignalKind::hangup()) => {}
        }
        fire.cancel();
    });
    token
}

/// What one client namespace's sessions may hold of a `budget` of bytes: the share of the
/// bridge's `total` sessions they may hold (`per_namespace`), all of it when that is all.
fn namespace_share(budget: usize, per_namespace: usize, total: usize) -> usize {
    match per_namespace.checked_mul(budget) {
        Some(product) if total > per_namespace => product / total,
        _ => budget,
    }
}

fn seconds(value: u64) -> Option<Duration> {
    (value > 0).then(|| Duration::from_secs(value))
}

async fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    client_checks(&args)?;
    let sdk = load_aws(&args.aws).await;
    let client = kube::Client::try_default()
        .await
        .context("cannot reach the Kubernetes API")?;
    let registry = Registry::new();
    let metrics = Metrics::register(&registry).context("registering metrics")?;
    let bytes = args.memory_budget_mib.saturating_mul(1024 * 1024);
    // A client namespace's sessions hold at most its share of the sessions' memory too.
    let budget = MemoryBudget::new(bytes).with_tenant_limit(namespace_share(
        bytes,
        args.max_sessions_per_client_namespace,
        args.max_sessions,
    ));
    budget
        .register(&registry)
        .context("registering the memory budget's metrics")?;
    let control = Arc::new(control_plane(&args.aws, &sdk));
    let mark = match (&args.pod_name, &args.pod_uid) {
        (Some(pod), Some(uid)) => Some(
            ReplicaMark::for_this_run(&args.cluster_name, &args.namespace, pod, uid)
                .context("marking this replica's sessions")?,
        ),
        _ => {
            tracing::warn!(
                "no POD_NAME and POD_UID: sessions are not marked, and the sessions of a \
                 killed run are left to SSM's idle timeout"
            );
            None
        }
    };
    let context = Arc::new(SessionContext {
        idle_timeout: seconds(args.idle_timeout_seconds),
        max_duration: seconds(args.max_session_seconds),
        reason: mark
            .as_ref()
            .map_or_else(|| UNMARKED_REASON.to_owned(), ReplicaMark::reason),
        budget: Some(budget),
        ..SessionContext::per_connection(control.clone(), upgrade_signer(&sdk), metrics)
    });
    if let Some(mark) = mark {
        let pods = kube::Api::namespaced(client.clone(), &args.namespace);
        tokio::spawn(async move { replica::sweep(&mark, &control, &pods).await });
    }
    let readiness = Readiness::default();
    let admin = TcpListener::bind(args.admin_address)
        .await
        .with_context(|| format!("cannot listen on {}", args.admin_address))?;
    // On standard error whatever the log filter: with port 0 the kernel picks the port, and
    // whoever started the process reads it here.
    eprintln!("admin listening on {}", admin.local_addr()?);
    let shutdown = shutdown_on_signal();
    let stop_admin = CancellationToken::new();
    let admin_task = tokio::spawn(admin::serve(
        admin,
        registry,
        readiness.clone(),
        stop_admin.clone(),
    ));
    let config = ServeConfig {
        namespace: args.namespace,
        listen_address: args.listen_address,
        limits: Limits {
            total: args.max_sessions,
            per_client_namespace: args.max_sessions_per_client_namespace,
            per_instance: args.max_sessions_per_instance,
        },
        grace: Duration::from_secs(args.drain_seconds),
        attribute_clients: !args.no_client_attribution,
        check_client_policies: !args.no_client_policy_check,
        audit: Arc::new(crate::audit::Stdout),
    };
    serve::run(client, context, config, readiness, shutdown).await;
    stop_admin.cancel();
    let _ = admin_task.await;
    Ok(())
}

async fn run_proxy(args: ProxyArgs) -> anyhow::Result<()> {
    let sdk = load_aws(&args.aws).await;
    let control = control_plane(&args.aws, &sdk);
    let context = SessionContext::per_connection(
        Arc::new(control.clone()),
        upgrade_signer(&sdk),
        Metrics::register(&Registry::new()).context("registering metrics")?,
    );
    let reason = "agent-bridge proxy";
    let request = match &args.document {
        Some(document) => StartSessionRequest::port(&args.instance_id, document, None, reason),
        None => StartSessionRequest::port(
            &args.instance_id,
            crate::SSH_DOCUMENT,
            Some(args.port),
            reason,
        ),
    };
    let stdio = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
    let carried = carry(
        &context,
        &request,
        stdio,
        Instant::now(),
        shutdown_on_signal(),
        None,
        None,
    )
    .await;
    let failure: anyhow::Error = match carried.ending {
        Ending::NotStarted(error) => error.into(),
        Ending::Failed(error) => error.into(),
        _ => match carried.output {
            Some(output) if !output.trim().is_empty() && carried.stats.bytes_received == 0 => {
                anyhow::anyhow!("the session closed: {}", output.trim())
            }
            _ => return Ok(()),
        },
    };
    // What SSM knows of the instance (offline, agent too old) says more than the failure itself.
    if let Ok(Some(state)) = control.describe_instance(&args.instance_id).await
        && let Some(problem) = state.problem(&args.instance_id, true)
    {
        anyhow::bail!("{problem}");
    }
    Err(failure)
}

/// A shell: the person's keys (through the `~.` escape) and terminal size to the instance's
/// shell, its output to standard output, the terminal raw meanwhile. Ends when the shell exits
/// (or the service ends the session: then with the service's reason, as an error), on `~.`, or
/// when standard input ends and the shell exits at the end-of-file that typed.
async fn run_shell(args: ShellArgs) -> anyhow::Result<()> {
    let sdk = load_aws(&args.aws).await;
    let control = control_plane(&args.aws, &sdk);
    let mut context = SessionContext::per_connection(
        Arc::new(control.clone()),
        upgrade_signer(&sdk),
        Metrics::register(&Registry::new()).context("registering metrics")?,
    );
    context.driver.end_on_local_eof = false;
    context.driver.session.shell = true;
    context.data_keys = Some(Arc::new(SdkDataKeys::new(
        &sdk,
        args.aws.kms_endpoint.as_deref(),
    )));
    let request = StartSessionRequest::shell(
        &args.instance_id,
        args.document.as_deref(),
        "agent-bridge shell",
    );
    let stop = shutdown_on_signal();
    let (keys, local_keys) = tokio::io::duplex(64 * 1024);
    let typing = tokio::spawn(terminal::type_keys(keys, stop.clone()));
    let sizes = terminal::sizes(stop.clone()).context("watching the terminal's size")?;
    let raw = terminal::RawMode::enter().context("putting the terminal in raw mode")?;
    let local = tokio::io::join(local_keys, tokio::io::stdout());
    let carried = carry(
        &context,
        &request,
        local,
        Instant::now(),
        stop.clone(),
        sizes,
        None,
    )
    .await;
    drop(raw);
    stop.cancel();
    typing.abort();
    match carried.ending {
        Ending::NotStarted(error) => Err(error.into()),
        Ending::Failed(error) => Err(error.into()),
        Ending::Terminated => {
            eprintln!("\r\nagent-bridge: left the session");
            Ok(())
        }
        _ => match carried.output.as_deref().map(str::trim) {
            Some(output) if !output.is_empty() => {
                anyhow::bail!("the session ended: {output}")
            }
            _ => Ok(()),
        },
    }
}

async fn run_forward(args: ForwardArgs) -> anyhow::Result<()> {
    let sdk = load_aws(&args.aws).await;
    let control = control_plane(&args.aws, &sdk);
    let signer = upgrade_signer(&sdk);
    let listener = TcpListener::bind(args.local)
        .await
        .with_context(|| format!("cannot listen on {}", args.local))?;
    let local = listener.local_addr()?;
    let reason = "agent-bridge forward";
    let request = match (&args.document, args.remote_port) {
        (Some(document), port) => {
            StartSessionRequest::port(&args.instance_id, document, port, reason)
        }
        (None, Some(port)) if args.aws_document => StartSessionRequest::forwarding(
            &args.instance_id,
            port,
            args.remote_host.as_deref(),
            reason,
        ),
        (None, Some(port)) => {
            let document = grants_document(&args.cluster_name, args.remote_host.as_deref(), port);
            StartSessionRequest::port(&args.instance_id, &document, None, reason)
        }
        (None, None) => anyhow::bail!("give --remote-port, or a --document that pins the port"),
    };
    // An agent too old for remote hosts would carry the bytes to the wrong place: ask first
    // (when the instance cannot be described, StartSession's own answer will do).
    if args.remote_host.is_some()
        && let Ok(Some(state)) = control.describe_instance(&args.instance_id).await
        && let Some(problem) = state.remote_host_problem(&args.instance_id)
    {
        anyhow::bail!("{problem}");
    }
    let shutdown = shutdown_on_signal();
    let pool = Pool {
        max_sessions: usize::from(args.max_sessions),
        idle: Duration::from_secs(args.idle_session_seconds),
    };
    forward(
        &control,
        signer.as_deref(),
        &request,
        listener,
        shutdown,
        pool,
    )
    .await?;
    eprintln!("forwarding {local} ended");
    Ok(())
}

/// The document fleet-access grants of `cluster` allow for forwarding to `port` of the instance
/// or of `host`.
fn grants_document(cluster: &str, host: Option<&str>, port: u16) -> String {
    match host {
        Some(host) => ssm_documents::remote_host_document_name(cluster, host, port),
        None => ssm_documents::port_document_name(cluster, port),
    }
}

/// Refuses a check of the grants' policies without the pods it reads (clap's `requires` would
/// count an environment variable set to `false` as given).
fn client_checks(args: &ServeArgs) -> anyhow::Result<()> {
    if args.no_client_attribution && !args.no_client_policy_check {
        anyhow::bail!(
            "--no-client-attribution (FLEET_ACCESS_NO_CLIENT_ATTRIBUTION) leaves the bridge \
             without the pods the grants' NetworkPolicies select: set --no-client-policy-check \
             (FLEET_ACCESS_NO_CLIENT_POLICY_CHECK=true) too, and let the CNI alone enforce them"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_check_needs_the_pods_whatever_the_environment_says() {
        let serve = |argv: &[&str]| match Args::try_parse_from(argv).map(|cli| cli.command) {
            Ok(Command::Serve(args)) => client_checks(&args),
            other => panic!("{other:?}"),
        };
        assert!(serve(&["agent-bridge", "serve"]).is_ok());
        let alone = serve(&["agent-bridge", "serve", "--no-client-attribution"]);
        assert!(
            alone.is_err_and(|e| e.to_string().contains("--no-client-policy-check")),
            "attribution off, check on"
        );
        assert!(
            serve(&[
                "agent-bridge",
                "serve",
                "--no-client-attribution",
                "--no-client-policy-check"
            ])
            .is_ok()
        );
        assert!(serve(&["agent-bridge", "serve", "--no-client-policy-check"]).is_ok());
    }

    #[test]
    fn a_namespace_holds_the_same_share_of_memory_as_of_sessions() {
        let mib = 1024 * 1024;
        assert_eq!(namespace_share(256 * mib, 250, 1000), 64 * mib);
        assert_eq!(namespace_share(256 * mib, 1000, 1000), 256 * mib);
        assert_eq!(namespace_share(256 * mib, 2000, 1000), 256 * mib);
        assert_eq!(
            namespace_share(usize::MAX, 250, 1000),
            usize::MAX,
            "no overflow"
        );
    }
}
