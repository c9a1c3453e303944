//! `fleet-access-demo`: the whole data path on one machine, with no AWS account and no cluster.
//!
//! It starts the SSM emulator with a small fleet (its instances lead to this machine's sshd when
//! one listens on port 22, otherwise to a built-in echo service), prints the IAM policy that the
//! embedded example grant stands for, opens the bridge's endpoints for that grant, serves
//! `/metrics`, and prints what to try. It runs until Ctrl-C.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use clap::Parser;
use fleet_access_agent_bridge::{
    SSH_DOCUMENT,
    admin::{self, Readiness},
    budget::{DEFAULT_MEMORY_BUDGET, MemoryBudget},
    cli::{
        AwsArgs, control_plane, init_tracing, load_aws, select_crypto_provider, shutdown_on_signal,
    },
    listener::{Clients, Endpoint, Limits, Listeners},
    metrics::Metrics,
    tunnel::SessionContext,
};
use fleet_access_ssm_emulator::{Config as EmulatorConfig, Emulator, InstanceConfig, Mode};
use prometheus::Registry;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

/// The embedded example grant: bridge endpoints for two instances.
const EXAMPLE_GRANT: &str = include_str!("../../deploy/examples/bridge-for-ansible.yaml");

/// The instances of the example grant, and their ports.
const FLEET: [&str; 2] = ["i-0123456789abcdef0", "mi-0123456789abcdef0"];

/// Run fleet-access locally (an emulated SSM and fleet, the bridge's endpoints, /metrics) and
/// print what to try.
#[derive(Parser, Debug)]
#[command(name = "fleet-access-demo", version, about)]
struct DemoArgs {
    /// First local port for endpoints (one per instance, counting up); 0 picks free ports.
    #[arg(long, default_value_t = 2222)]
    port_base: u16,
    /// The admin port (/metrics, /healthz, /readyz); 0 picks a free one.
    #[arg(long, default_value_t = 9090)]
    admin_port: u16,
    /// Stop after this many seconds instead of waiting for Ctrl-C.
    #[arg(long)]
    seconds: Option<u64>,
}

fn main() -> std::process::ExitCode {
    let args = DemoArgs::parse();
    init_tracing("info");
    select_crypto_provider();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
        .and_then(|runtime| runtime.block_on(run(args)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fleet-access-demo: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the demo.
async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let sshd = SocketAddr::new(loopback, 22);
    let (target, target_name) = if TcpStream::connect(sshd).await.is_ok() {
        (sshd, "this machine's sshd (127.0.0.1:22)")
    } else {
        (start_echo().await?, "a built-in echo service")
    };

    let mut config = EmulatorConfig {
        mode: Mode::Realistic,
        ..EmulatorConfig::default()
    };
    for id in FLEET {
        config.instances.push(
            InstanceConfig::new(id)
                .with_port("22", target)
                .with_tag("Environment", "demo"),
        );
    }
    let emulator = Emulator::start(config)
        .await
        .context("starting the SSM emulator")?;
    let ssm_endpoint = emulator.endpoint_url();

    println!(
        "fleet-access demo: an emulated SSM at {ssm_endpoint}, instances {} leading to {target_name}.\n",
        FLEET.join(" and ")
    );
    print_grant_policy()?;

    // The demo has its own static credentials: the emulator accepts any signature.
    let aws = AwsArgs {
        region: Some("us-east-1".into()),
        ssm_endpoint: Some(ssm_endpoint.clone()),
        kms_endpoint: None,
        allow_any_stream_url: true,
    };
    let sdk = demo_sdk_config(&aws).await;
    let registry = Registry::new();
    // The memory budget `agent-bridge serve` ships with.
    let budget = MemoryBudget::new(DEFAULT_MEMORY_BUDGET);
    budget.register(&registry)?;
    let context = Arc::new(SessionContext {
        idle_timeout: Some(Duration::from_secs(1200)),
        budget: Some(budget),
        ..SessionContext::per_connection(
            Arc::new(control_plane(&aws, &sdk)),
            None,
            Metrics::register(&registry)?,
        )
    });
    let mut listeners = Listeners::new(
        context,
        Limits {
            total: 100,
            per_client_namespace: 100,
            per_instance: 20,
        },
        loopback,
        // Each connection's audit record on standard output, as `serve` writes them.
        Clients {
            sink: Some(Arc::new(fleet_access_agent_bridge::audit::Stdout)),
            ..Clients::none()
        },
    );
    let mut desired = BTreeMap::new();
    for (i, id) in FLEET.iter().enumerate() {
        let listen_port = pick_port(args.port_base, i).await?;
        let endpoint = Endpoint {
            instance_id: (*id).to_owned(),
            remote_host: None,
            port: 22,
            listen_port,
            document: SSH_DOCUMENT.into(),
            port_parameter: Some(22),
            grants: Vec::new(),
        };
        desired.insert(listen_port, endpoint);
    }
    if let Some((endpoint, error)) = listeners.apply(&desired).await.into_iter().next() {
        anyhow::bail!(
            "cannot listen on 127.0.0.1:{}: {error}",
            endpoint.listen_port
        );
    }

    let admin = TcpListener::bind(SocketAddr::new(loopback, args.admin_port))
        .await
        .context("binding the admin port")?;
    let admin_address = admin.local_addr()?;
    let readiness = Readiness::default();
    readiness.set(true);
    let stop_admin = CancellationToken::new();
    let admin_task = tokio::spawn(admin::serve(admin, registry, readiness, stop_admin.clone()));

    println!("Endpoints (one listener per instance and port, each connection an SSM session):");
    for endpoint in listeners.open() {
        println!(
            "  {}:22 -> 127.0.0.1:{}",
            endpoint.instance_id, endpoint.listen_port
        );
    }
    println!("\nTry:");
    for endpoint in listeners.open() {
        if target == sshd {
            println!("  ssh -p {} $USER@127.0.0.1", endpoint.listen_port);
        } else {
            println!("  echo hello | nc -q 1 127.0.0.1 {}", endpoint.listen_port);
        }
    }
    println!("  curl -s http://{admin_address}/metrics | grep agent_bridge_");
    println!(
        "  ssh -o ProxyCommand='env AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo cargo run -q --bin agent-bridge -- proxy %h %p --region us-east-1 --ssm-endpoint {ssm_endpoint} --allow-any-stream-url' $USER@{}",
        FLEET[0]
    );
    println!(
        "\nEach connection's audit record (a JSON line, as `agent-bridge serve` writes them, docs/audit.md) appears below when it ends."
    );
    println!("\nRunning until Ctrl-C.");

    let shutdown = shutdown_on_signal();
    match args.seconds {
        Some(seconds) => {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(Duration::from_secs(seconds)) => {}
            }
        }
        None => shutdown.cancelled().await,
    }
    println!("stopping");
    listeners.shutdown(Duration::from_secs(2)).await;
    stop_admin.cancel();
    let _ = admin_task.await;
    emulator.shutdown().await;
    Ok(())
}

async fn demo_sdk_config(aws: &AwsArgs) -> aws_config::SdkConfig {
    let credentials =
        aws_credential_types::Credentials::new("demo", "demo", None, None, "fleet-access-demo");
    let base = load_aws(aws).await;
    base.into_builder()
        .credentials_provider(
            aws_credential_types::provider::SharedCredentialsProvider::new(credentials),
        )
        .build()
}

/// Prints the policy the embedded grant stands for, as `fleet-access-operator plan` would.
fn print_grant_policy() -> anyhow::Result<()> {
    let grants = fleet_access_crds::validation::parse_session_accesses(EXAMPLE_GRANT)?;
    let grant = grants.first().context("the embedded grant is empty")?;
    println!("The example grant (deploy/examples/bridge-for-ansible.yaml):");
    for line in EXAMPLE_GRANT.lines().filter(|l| !l.starts_with('#')) {
        println!("  {line}");
    }
    println!("\nThe IAM policy it stands for, attached to the bridge's role:");
    let settings = fleet_access_operator::settings::Settings::default();
    let desired = fleet_access_operator::model::desired::compute(grant, &settings)?;
    let bridge = desired
        .bridge
        .as_ref()
        .context("the embedded grant has no bridge endpoints")?;
    let role = fleet_access_operator::aws::Principal::new(
        fleet_access_operator::aws::PrincipalKind::Role,
        &bridge.role,
    );
    let sets = fleet_access_operator::model::identity::policy_sets(
        std::slice::from_ref(&desired),
        &settings.cluster,
        settings.max_policies_per_identity,
    )?;
    for policy in sets
        .get(&role)
        .map(|s| s.policies.as_slice())
        .unwrap_or_default()
    {
        println!("  {}:", policy.name);
        for line in policy.document.0.to_pretty_json().lines() {
            println!("  {line}");
        }
    }
    println!();
    Ok(())
}

/// `base + index`, or a free port when `base` is 0 or that port is taken.
async fn pick_port(base: u16, index: usize) -> anyhow::Result<u16> {
    let wanted = base.saturating_add(u16::try_from(index).unwrap_or(0));
    if base != 0
        && TcpListener::bind((Ipv4Addr::LOCALHOST, wanted))
            .await
            .is_ok()
    {
        return Ok(wanted);
    }
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await?
        .local_addr()?
        .port())
}

/// An echo service on a free loopback port, for machines without an sshd.
async fn start_echo() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(address)
}
