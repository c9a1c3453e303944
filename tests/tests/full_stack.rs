//! The whole product as a platform team meets it, with every part real except AWS: the CRDs and
//! `deploy/` are dry-run on the kube-apiserver; the operator and the bridge run as their
//! binaries, each under its own ServiceAccount token and the base's least-privilege RBAC; IAM is
//! moto, SSM the project's emulator (moto upstream for documents) whose instance's port 22 is the
//! real sshd; its port 5432 and a database behind it are two loopback servers, each reached
//! through its own Service.
//!
//! ```text
//!  kubectl apply -f grant ──▶ operator ──▶ IAM policy (moto) + Service and NetworkPolicy
//!                                           (bridge namespace)
//!  ssh from the grant's client pod ──▶ bridge listener (checks the NetworkPolicy admits it)
//!      ──▶ StartSession (emulator) ──▶ data channel ──▶ sshd
//!  kubectl delete -f grant ──▶ Service gone ──▶ listener and open tunnel closed; IAM clean
//! ```
//!
//! Both programs authenticate with tokens of the ServiceAccounts of `deploy/base` (TokenRequest;
//! the test API server validates them with its service-account key and authorizes with RBAC), so a
//! permission missing from `deploy/base/*/rbac.yaml` fails this test.

#![allow(clippy::panic, clippy::unwrap_used)]

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use aws_sdk_iam::error::ProvideErrorMetadata;
use fleet_access_crds::{
    SessionAccess,
    bridge_contract::{EndpointAnnotations, bridge_pod_selector, managed_labels, service_name},
    fixtures::GrantFixture,
};
use fleet_access_operator::model::naming::{
    IDENTITY_TAG, OWNER_TAG, POLICY_PATH, identity_tag_value, owner_tag_value,
};
use fleet_access_ssm_emulator::{Config, Emulator, InstanceConfig, Mode, Running};
use fleet_access_tests::{
    ControlPlane, Moto, OperatorCommandLine, Sshd, SupervisedProcess, cluster_of, connect_from,
    http_get,
    manifests::{deploy_dir, kind, kustomize, rbac_in_namespace},
    own_loopback_address,
    targets::greeting_echo_server,
    workspace_binary,
};
use k8s_openapi::{api::core::v1::Service, jiff::Timestamp};
use kube::Api;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    time::{Instant, sleep, timeout},
};

const ACCOUNT: &str = "123456789012";
const REGION: &str = "us-east-1";
const INSTANCE: &str = "i-0fa11c0ffee000001";
const GRANT: &str = "web-ssh";
/// A database the instance reaches; its port is the instance's own port 5432's number too.
const DB_HOST: &str = "orders.db.internal";
/// What the instance's own port 5432 and the database each say first.
const INSTANCE_GREETING: &str = "the instance's own 5432\n";
const DB_GREETING: &str = "the database behind the instance\n";
/// The ServiceAccounts of `deploy/base` the two programs run as.
const OPERATOR_ACCOUNT: &str = "fleet-access-operator";
const BRIDGE_ACCOUNT: &str = "agent-bridge";
/// Longest wait for anything the operator or the bridge does (they react within seconds).
const WAIT: Duration = Duration::from_secs(90);
/// Longest an ssh command may take.
const SSH_TIMEOUT: Duration = Duration::from_secs(60);

/// The two programs under test, their logs, and what they were pointed at.
struct Stack {
    operator: SupervisedProcess,
    bridge: SupervisedProcess,
    /// The bridge's listeners bind this loopback address: its own, so that the operator's
    /// fixed target ports (20000 and up) cannot clash with another test's.
    listen_address: IpAddr,
}

impl Stack {
    /// The last lines of both logs, for failure messages.
    fn logs(&self) -> String {
        format!(
            "\n--- operator log ---\n{}\n--- bridge log ---\n{}",
            self.operator.log_tail(40),
            self.bridge.log_tail(40)
        )
    }

    /// Where the admin endpoint of one of the programs (`program` picks it) listens: the address
    /// it reports once it has bound port 0.
    async fn admin_address(
        &mut self,
        program: fn(&mut Self) -> &mut SupervisedProcess,
    ) -> SocketAddr {
        let reported = program(self).reported_address("admin", WAIT).await;
        reported.unwrap_or_else(|error| panic!("{error}{}", self.logs()))
    }

    /// Fails with both logs unless both programs still run.
    fn assert_running(&mut self) {
        let operator = self.operator.ensure_running();
        let bridge = self.bridge.ensure_running();
        if let Err(error) = operator.and(bridge) {
            panic!("{error}{}", self.logs());
        }
    }
}

/// Polls `probe` every 200 ms until it returns a value; fails after [`WAIT`] with `what` and
/// the programs' logs.
async fn wait_for<T, F, Fut>(stack: &mut Stack, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        stack.assert_running();
        if let Some(value) = probe().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("{what}: not within {} s{}", WAIT.as_secs(), stack.logs());
        }
        sleep(Duration::from_millis(200)).await;
    }
}

fn grant_yaml(namespace: &str, user: &str, expires_at: Timestamp) -> String {
    GrantFixture::new(namespace, GRANT)
        .users([user])
        .instance_ids([INSTANCE])
        .ssh()
        .ports([5432])
        .remote_host(DB_HOST, 5432)
        .bridge_ports([22, 5432])
        .bridge_remote_host(DB_HOST, 5432)
        .spec_json(
            json!({"bridge": {"clients": [{"podSelector": {"matchLabels": {"app": "ansible"}}}]}}),
        )
        .expires_at(&expires_at.to_string())
        .yaml()
}

/// Where the bridge's standard output and error go.
fn stack_bridge_log(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("bridge.log")
}

/// Runs a short command to completion (bounded); returns its standard output.
async fn run_bounded(command: Command, limit: Duration) -> String {
    let description = format!("{command:?}");
    let mut command = tokio::process::Command::from(command);
    command.stdin(Stdio::null()).kill_on_drop(true);
    let output = timeout(limit, command.output())
        .await
        .unwrap_or_else(|_| panic!("{description}: still running after {limit:?}"))
        .unwrap_or_else(|e| panic!("{description}: {e}"));
    assert!(
        output.status.success(),
        "{description} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The policy documents `fleet-access-operator plan` says the grant stands for (its
/// identities' sets, with the grant as their only one), by name.
async fn planned_policies(
    operator: &Path,
    grant_file: &Path,
    bridge_role: &str,
    bridge_namespace: &str,
    cluster: &str,
) -> BTreeMap<String, Value> {
    let mut plan = Command::new(operator);
    plan.arg("plan")
        .arg("-f")
        .arg(grant_file)
        .args(["-o", "json", "--account", ACCOUNT, "--region", REGION])
        .args(["--bridge-role", bridge_role])
        .args(["--bridge-namespace", bridge_namespace])
        .args(["--cluster-name", cluster]);
    let plan: Value = serde_json::from_str(&run_bounded(plan, SSH_TIMEOUT).await).unwrap();
    let identities = plan["identities"].as_array().unwrap();
    (identities.iter())
        .flat_map(|identity| identity["policies"].as_array().unwrap())
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["document"].clone(),
            )
        })
        .collect()
}

/// The default version's document of every policy the grant's status names, by policy name.
async fn policies_in_moto(
    iam: &aws_sdk_iam::Client,
    grant: &SessionAccess,
) -> BTreeMap<String, Value> {
    let mut found = BTreeMap::new();
    for policy in &grant.status.as_ref().unwrap().policies {
        let name = iam
            .get_policy()
            .policy_arn(&policy.arn)
            .send()
            .await
            .unwrap()
            .policy()
            .and_then(|p| p.policy_name())
            .unwrap()
            .to_owned();
        let version = iam
            .get_policy_version()
            .policy_arn(&policy.arn)
            .version_id(&policy.version_id)
            .send()
            .await
            .unwrap();
        let text = version.policy_version().and_then(|v| v.document()).unwrap();
        let decoded = percent_encoding::percent_decode_str(text)
            .decode_utf8()
            .unwrap();
        found.insert(name, serde_json::from_str(&decoded).unwrap());
    }
    found
}

/// ARNs of the policies under the operator's path that carry the tag `key` = `owner` (every
/// page of the listing: moto holds the policies of every test of the run).
async fn policies_tagged(iam: &aws_sdk_iam::Client, key: &str, owner: &str) -> Vec<String> {
    let listed = fleet_access_tests::moto::policies_under(iam, POLICY_PATH)
        .await
        .expect("ListPolicies");
    let mut owned = Vec::new();
    for arn in listed.iter().filter_map(|p| p.arn()) {
        let tags = match iam.list_policy_tags().policy_arn(arn).send().await {
            // Deleted since the listing (moto is shared with tests running meanwhile): not left.
            Err(error) if error.code() == Some("NoSuchEntity") => continue,
            answer => answer.expect("ListPolicyTags"),
        };
        if tags
            .tags()
            .iter()
            .any(|t| t.key() == key && t.value() == owner)
        {
            owned.push(arn.to_owned());
        }
    }
    owned
}

/// The value of the grant's `fleet_access_operator_grant_expiry_timestamp_seconds` series on
/// the operator's /metrics, if exported (the endpoint must answer: a scrape that fails is not an
/// absent series).
async fn expiry_gauge(admin: SocketAddr, namespace: &str) -> Option<f64> {
    let (code, body) = http_get(admin, "/metrics")
        .await
        .expect("the operator's /metrics answers");
    assert_eq!(code, 200, "/metrics: {body}");
    let (grant, grant_namespace) = (
        format!("grant_name=\"{GRANT}\""),
        format!("grant_namespace=\"{namespace}\""),
    );
    body.lines()
        .filter(|l| l.starts_with("fleet_access_operator_grant_expiry_timestamp_seconds{"))
        .find(|l| l.contains(&grant) && l.contains(&grant_namespace))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn is_ready(grant: &SessionAccess) -> bool {
    grant.status.as_ref().is_some_and(|s| {
        s.observed_generation == grant.metadata.generation
            && s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// The emulator with one instance whose port 22 is `sshd`, whose port 5432 and whose database
/// `DB_HOST`:5432 are two servers that greet differently; document APIs go to moto.
async fn emulator(moto: &Moto, sshd: &Sshd) -> Running {
    let own_5432 = greeting_echo_server(INSTANCE_GREETING)
        .await
        .expect("the instance's server");
    let database = greeting_echo_server(DB_GREETING)
        .await
        .expect("the database");
    let mut config = Config {
        mode: Mode::Fast,
        upstream: Some(moto.endpoint().to_owned()),
        ..Config::default()
    };
    config.instances.push(
        InstanceConfig::new(INSTANCE)
            .with_agent_version("3.3.0.0")
            .with_port(
                "22",
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), sshd.port()),
            )
            .with_port("5432", own_5432)
            .with_host(DB_HOST, vec![Ipv4Addr::new(10, 0, 3, 17).into()])
            .with_port(format!("{DB_HOST}:5432"), database),
    );
    Emulator::start(config).await.expect("emulator starts")
}

// Multi-threaded: ssh runs as child processes while the test polls the API server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_to_ssh_through_the_bridge_to_kubectl_delete() {
    // 1. The CRDs and the manifests are valid on the real API server.
    let control_plane = ControlPlane::shared().await.expect("control plane");
    let base = kustomize(&deploy_dir()).expect("kubectl kustomize deploy/");
    control_plane
        .dry_run(&base)
        .expect("every object of deploy/ is valid");
    let crds: Vec<Value> = base
        .iter()
        .filter(|o| kind(o) == "CustomResourceDefinition")
        .cloned()
        .collect();
    control_plane.apply_objects(&crds).expect("CRDs");
    control_plane
        .install_fleet_access(&fleet_access_crds::crds_yaml())
        .await
        .expect("the CRDs are established, with the single-team boundary");

    // The operator's and the bridge's namespace, and a team's namespace for the grant.
    let system = control_plane.namespace("fs-system").await.expect("ns");
    let team = control_plane.namespace("fs-team").await.expect("ns");
    control_plane
        .apply_objects(&rbac_in_namespace(&base, system.name()))
        .expect("the base's RBAC, in the test's namespace");
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = |account: &str| -> PathBuf {
        let path = dir.path().join(format!("{account}.kubeconfig"));
        control_plane
            .service_account_kubeconfig(system.name(), account, Duration::from_secs(3600), &path)
            .expect("a token for the ServiceAccount");
        path
    };
    let (operator_kubeconfig, bridge_kubeconfig) =
        (kubeconfig(OPERATOR_ACCOUNT), kubeconfig(BRIDGE_ACCOUNT));
    // The grant's client: a pod of the team labelled as its `spec.bridge.clients` selects, at
    // an address of its own that every connection below comes from.
    let client = own_loopback_address();
    team.running_pod("ansible-0", "ansible", client, json!({"app": "ansible"}))
        .await
        .expect("the client pod");

    // AWS: a user to grant, the bridge's role; SSM with one instance leading to sshd.
    let moto = Moto::shared().await.expect("moto");
    let iam = aws_sdk_iam::Client::new(&moto.sdk_config());
    let suffix = system.name().trim_start_matches("fs-system-");
    let (user, bridge_role) = (format!("fs-user-{suffix}"), format!("fs-bridge-{suffix}"));
    iam.create_user()
        .user_name(&user)
        .send()
        .await
        .expect("user");
    iam.create_role()
        .role_name(&bridge_role)
        .assume_role_policy_document(
            r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"pods.eks.amazonaws.com"},"Action":["sts:AssumeRole","sts:TagSession"]}]}"#,
        )
        .send()
        .await
        .expect("bridge role");
    let sshd = Sshd::start().await.expect("sshd");
    let emulator = emulator(moto, &sshd).await;

    // 2. The operator and the bridge as processes.
    let operator_program = workspace_binary("fleet-access-operator").expect("operator builds");
    let bridge_program = workspace_binary("agent-bridge").expect("agent-bridge builds");
    let mut operator = Command::new(&operator_program);
    OperatorCommandLine {
        kubeconfig: &operator_kubeconfig,
        moto,
        ssm_endpoint: &emulator.endpoint_url(),
        watch_namespace: team.name(),
        bridge_namespace: system.name(),
        // The system picks the port; the operator reports it.
        admin_address: "127.0.0.1:0",
        replica: "full-stack",
    }
    .apply(&mut operator)
    .args(["--lease-namespace", system.name()])
    .args(["--bridge-role", &bridge_role]);
    operator.env("RUST_LOG", "info").env("NO_COLOR", "1");
    let cluster = cluster_of(team.name());
    let listen_address = own_loopback_address();
    let mut bridge = Command::new(&bridge_program);
    bridge
        .args(["serve", "--namespace", system.name()])
        .args(["--listen-address", &listen_address.to_string()])
        // The system picks the port; the bridge reports it.
        .args(["--admin-address", "127.0.0.1:0"])
        .args([
            "--region",
            REGION,
            "--allow-any-stream-url",
            "--ssm-endpoint",
        ])
        .arg(emulator.endpoint_url())
        .envs(moto.process_env())
        .env("KUBECONFIG", &bridge_kubeconfig)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    let mut stack = Stack {
        operator: SupervisedProcess::spawn(
            "fleet-access-operator",
            &operator,
            &dir.path().join("operator.log"),
        )
        .expect("operator starts"),
        bridge: SupervisedProcess::spawn("agent-bridge", &bridge, &stack_bridge_log(&dir))
            .expect("bridge starts"),
        listen_address,
    };
    let operator_admin = stack.admin_address(|s| &mut s.operator).await;
    let bridge_admin = stack.admin_address(|s| &mut s.bridge).await;
    assert_eq!(
        http_get(bridge_admin, "/healthz")
            .await
            .map(|(code, _)| code),
        Some(200),
        "the bridge's admin endpoint answers where it said it listens"
    );

    // 3. `kubectl apply -f` a grant; it becomes Ready.
    let grant_file = dir.path().join("grant.yaml");
    // Two hours from now, whole seconds (what the operator's expiry gauge reports).
    let expires_at = Timestamp::from_second(Timestamp::now().as_second() + 7200).unwrap();
    std::fs::write(&grant_file, grant_yaml(team.name(), &user, expires_at)).unwrap();
    let mut apply = control_plane.kubectl().unwrap();
    apply.arg("apply").arg("-f").arg(&grant_file);
    run_bounded(apply, SSH_TIMEOUT).await;
    let grants: Api<SessionAccess> = team.api();
    let grant = wait_for(&mut stack, "the grant is Ready", || async {
        grants.get(GRANT).await.ok().filter(is_ready)
    })
    .await;

    // The exact policies in moto: what `plan` says, attached to the user and the bridge role.
    let planned = planned_policies(
        &operator_program,
        &grant_file,
        &bridge_role,
        system.name(),
        &cluster,
    )
    .await;
    assert_eq!(
        planned.len(),
        2,
        "the user's set and the bridge role's, one policy each: {planned:#?}"
    );
    assert_eq!(
        policies_in_moto(&iam, &grant).await,
        planned,
        "moto holds the planned policies"
    );
    let instance_arn = format!("arn:aws:ec2:{REGION}:{ACCOUNT}:instance/{INSTANCE}");
    for (name, document) in &planned {
        assert!(
            document.to_string().contains(&instance_arn),
            "{name} allows StartSession on {instance_arn}: {document}"
        );
    }
    assert_eq!(
        attached_policy_counts(&iam, &user, &bridge_role).await,
        (1, 1),
        "one policy attached to the user and one to the bridge role"
    );

    // The operator exports when the grant's window ends (for the expiring-soon alert).
    let exported_expiry = wait_for(&mut stack, "the grant's expiry gauge", || async {
        expiry_gauge(operator_admin, team.name()).await
    })
    .await;
    assert_eq!(exported_expiry, expires_at.as_second() as f64);

    // The Service, as the operator-bridge contract says.
    let services: Api<Service> = system.api();
    let service = services.get(INSTANCE).await.expect("the endpoint Service");
    let labels = service.metadata.labels.clone().unwrap_or_default();
    assert!(
        managed_labels()
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v)),
        "managed labels: {labels:?}"
    );
    let spec = service.spec.clone().unwrap();
    assert_eq!(spec.selector, Some(bridge_pod_selector()));
    let endpoint = EndpointAnnotations::parse(&service.metadata.annotations.clone().unwrap())
        .expect("contract annotations");
    assert_eq!(endpoint.instance_id, INSTANCE);
    let [port, _] = endpoint.ports.as_slice() else {
        panic!("ports 22 and 5432: {endpoint:?}");
    };
    assert_eq!(
        (port.port, port.document.as_str()),
        (22, "AWS-StartSSHSession")
    );
    let service_ports = spec.ports.unwrap();
    assert_eq!(service_ports.len(), 2);
    assert_eq!(service_ports[0].port, 22);
    assert_eq!(
        service_ports[0].target_port,
        Some(
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(
                port.target_port
            ))
        )
    );

    // ssh through the bridge's listener for that Service reaches the instance's sshd.
    let listener = SocketAddr::new(stack.listen_address, port.target_port);
    wait_for(&mut stack, "the bridge listens for the Service", || async {
        TcpStream::connect(listener).await.ok().map(drop)
    })
    .await;
    let mut ssh = sshd.ssh_command_from(Some(client), listener);
    ssh.arg("echo reached-$((6 * 7))-on-$(hostname)");
    let answer = run_bounded(ssh, SSH_TIMEOUT).await;
    let hostname = run_bounded(Command::new("hostname"), SSH_TIMEOUT).await;
    assert_eq!(answer.trim(), format!("reached-42-on-{}", hostname.trim()));

    // The bridge wrote the connection's audit record on its standard output: a JSON line.
    let record = wait_for(&mut stack, "the ssh connection's audit record", || async {
        let log = std::fs::read_to_string(stack_bridge_log(&dir)).ok()?;
        (log.lines())
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            // Not the probe's record: it sent and received nothing.
            .find(|r| {
                r["record"] == "connection"
                    && r["port"] == 22
                    && r["bytesToClient"].as_u64() > Some(0)
            })
    })
    .await;
    assert_eq!(record["instance"], INSTANCE);
    assert_eq!(
        record["grants"],
        serde_json::json!([format!("{}/{GRANT}", team.name())])
    );
    assert!(record["sessionId"].is_string(), "{record}");
    assert_eq!(record["ended"], "client_closed", "{record}");
    assert!(record["bytesFromClient"].as_u64() > Some(0), "{record}");
    assert_eq!(record["client"]["pod"]["name"], "ansible-0", "{record}");

    // What the grant's clients do not select is refused, whatever the CNI would do: the test's
    // own address, which no pod has.
    let refused = wait_for(
        &mut stack,
        "a refusal of an address no grant admits",
        || async {
            let mut stream = TcpStream::connect(listener).await.ok()?;
            let mut said = String::new();
            timeout(SSH_TIMEOUT, stream.read_to_string(&mut said))
                .await
                .ok()?
                .ok()?;
            Some(said)
        },
    )
    .await;
    assert!(
        refused.starts_with("fleet-access: refused: no grant admits this client"),
        "{refused}"
    );

    // Port 5432 of the instance and of the database behind it: two Services, each leading to
    // its own server; the grant's status names both.
    let db_service = service_name(INSTANCE, Some(DB_HOST));
    for (name, greeting) in [
        (INSTANCE, INSTANCE_GREETING),
        (db_service.as_str(), DB_GREETING),
    ] {
        let service = services.get(name).await.expect("the endpoint Service");
        let endpoint = EndpointAnnotations::parse(&service.metadata.annotations.unwrap())
            .expect("contract annotations");
        let port = (endpoint.ports.iter())
            .find(|p| p.port == 5432)
            .unwrap_or_else(|| panic!("port 5432 on {name}: {endpoint:?}"));
        let listener = SocketAddr::new(stack.listen_address, port.target_port);
        let mut stream = wait_for(&mut stack, "the bridge listens for port 5432", || async {
            connect_from(client, listener).await.ok()
        })
        .await;
        let said = timeout(SSH_TIMEOUT, async {
            let mut said = vec![0; greeting.len() + 4];
            stream.read_exact(&mut said[..greeting.len()]).await?;
            stream.write_all(b"ping").await?;
            stream.read_exact(&mut said[greeting.len()..]).await?;
            std::io::Result::Ok(said)
        })
        .await
        .unwrap_or_else(|_| panic!("{name} answers in time{}", stack.logs()))
        .expect("the tunnel carries both ways");
        assert_eq!(String::from_utf8_lossy(&said), format!("{greeting}ping"));
    }
    let grant = grants.get(GRANT).await.expect("the grant");
    let status = grant.status.expect("status");
    let [target] = status.targets.as_slice() else {
        panic!("one target: {status:?}");
    };
    assert_eq!(
        target.endpoint.as_deref(),
        Some(format!("{INSTANCE}.{}", system.name()).as_str())
    );
    let remote: Vec<(&str, &str)> = (target.remote_endpoints.iter())
        .map(|r| (r.host.as_str(), r.endpoint.as_str()))
        .collect();
    assert_eq!(
        remote,
        [(DB_HOST, format!("{db_service}.{}", system.name()).as_str())]
    );

    // A tunnel that stays open until something closes it.
    let mut long_ssh = tokio::process::Command::from(sshd.ssh_command_from(Some(client), listener));
    long_ssh
        .arg("echo open; sleep 600")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut long_ssh = long_ssh.spawn().expect("ssh starts");
    let mut first_line = String::new();
    timeout(
        SSH_TIMEOUT,
        BufReader::new(long_ssh.stdout.take().unwrap()).read_line(&mut first_line),
    )
    .await
    .expect("the long session opens in time")
    .unwrap();
    assert_eq!(first_line.trim(), "open");
    wait_for(&mut stack, "only the long session is open", || async {
        (emulator.stats().sessions_active == 1).then_some(())
    })
    .await;

    // 4. `kubectl delete` the grant: the Service goes, the tunnel closes, IAM is clean.
    let mut delete = control_plane.kubectl().unwrap();
    delete
        .arg("delete")
        .arg("-f")
        .arg(&grant_file)
        .arg(format!("--timeout={}s", WAIT.as_secs()));
    run_bounded(delete, WAIT + SSH_TIMEOUT).await;
    assert!(
        grants.get_opt(GRANT).await.unwrap().is_none(),
        "the finalizer let the grant go"
    );
    wait_for(&mut stack, "the Services are deleted", || async {
        let instance = services.get_opt(INSTANCE).await.ok()?;
        let database = services.get_opt(&db_service).await.ok()?;
        (instance.is_none() && database.is_none()).then_some(())
    })
    .await;
    let ended = timeout(WAIT, long_ssh.wait())
        .await
        .unwrap_or_else(|_| panic!("the open ssh session still runs{}", stack.logs()))
        .unwrap();
    assert!(
        !ended.success(),
        "ssh ended because its tunnel closed: {ended}"
    );
    wait_for(&mut stack, "the SSM session ended", || async {
        (emulator.stats().sessions_active == 0).then_some(())
    })
    .await;
    let closed = TcpStream::connect(listener)
        .await
        .expect_err("the bridge no longer listens for the instance");
    assert_eq!(
        closed.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{closed}"
    );
    wait_for(&mut stack, "the expiry gauge is withdrawn", || async {
        expiry_gauge(operator_admin, team.name())
            .await
            .is_none()
            .then_some(())
    })
    .await;
    let mut left = Vec::new();
    for (kind, name) in [("user", user.as_str()), ("role", bridge_role.as_str())] {
        let identity = identity_tag_value(&cluster, kind, name);
        left.extend(policies_tagged(&iam, IDENTITY_TAG, &identity).await);
    }
    let owner = owner_tag_value(&cluster, team.name(), GRANT);
    left.extend(policies_tagged(&iam, OWNER_TAG, &owner).await);
    assert_eq!(left, Vec::<String>::new(), "IAM is clean");
    assert_eq!(
        attached_policy_counts(&iam, &user, &bridge_role).await,
        (0, 0),
        "nothing attached to the user or the bridge role"
    );
    // The emulator's verdict on a session is final once the session has ended.
    emulator
        .wait_for_all_ended(WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}{}", stack.logs()));
    assert!(
        emulator.violations().is_empty(),
        "{:?}",
        emulator.violations()
    );
    stack.assert_running();
}

/// Managed policies attached to the user and to the role.
async fn attached_policy_counts(
    iam: &aws_sdk_iam::Client,
    user: &str,
    role: &str,
) -> (usize, usize) {
    let to_user = iam
        .list_attached_user_policies()
        .user_name(user)
        .send()
        .await
        .expect("ListAttachedUserPolicies");
    let to_role = iam
        .list_attached_role_policies()
        .role_name(role)
        .send()
        .await
        .expect("ListAttachedRolePolicies");
    (
        to_user.attached_policies().len(),
        to_role.attached_policies().len(),
    )
}
