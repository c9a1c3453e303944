//! The operator as its binary, against the real kube-apiserver + etcd, IAM on moto and SSM on
//! the emulator (moto upstream):
//! - two replicas elect one leader over a Lease; only the leader reconciles; killing it lets
//!   the standby take over and reconcile a new grant; a clean shutdown releases the Lease;
//! - the admin endpoint on a live run: /healthz, /readyz, and /metrics with reconcile
//!   durations, errors by bounded reason, AWS calls by service/operation/outcome and grants by
//!   state; a terminal AWS error is reported once, not retried in a loop.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::{future::Future, path::PathBuf, process::Stdio, time::Duration};

use fleet_access_crds::SessionAccess;
use fleet_access_ssm_emulator::{Config, Emulator, InstanceConfig, Mode, Running};
use fleet_access_tests::{
    ControlPlane, ExposedSample, Moto, OperatorCommandLine, TestNamespace, exposition,
    free_loopback_port, http_get, loopback,
};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api,
    api::{DeleteParams, ListParams, PostParams},
};
use serde_json::json;
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(120);
const INSTANCE: &str = "i-0000000000000000a";
/// The test's lease duration: short, so that a takeover happens within seconds.
const LEASE_SECONDS: u64 = 6;

struct Setup {
    control_plane: &'static ControlPlane,
    moto: &'static Moto,
    namespace: TestNamespace,
    emulator: Running,
    iam: aws_sdk_iam::Client,
    grants: Api<SessionAccess>,
}

impl Setup {
    async fn start(prefix: &str) -> Self {
        let control_plane = ControlPlane::shared().await.expect("control plane");
        control_plane
            .apply_yaml(&fleet_access_crds::crds_yaml(), None)
            .await
            .expect("CRDs");
        control_plane
            .wait_for_crd_established("sessionaccesses.fleetaccess.io", Duration::from_secs(30))
            .await
            .expect("established");
        let namespace = control_plane.namespace(prefix).await.expect("namespace");
        let moto = Moto::shared().await.expect("moto");
        let mut config = Config {
            mode: Mode::Fast,
            upstream: Some(moto.endpoint().to_owned()),
            ..Config::default()
        };
        config
            .instances
            .push(InstanceConfig::new(INSTANCE).with_agent_version("3.3.0.0"));
        let emulator = Emulator::start(config).await.expect("emulator");
        Self {
            control_plane,
            moto,
            grants: namespace.api(),
            namespace,
            emulator,
            iam: aws_sdk_iam::Client::new(&moto.sdk_config()),
        }
    }

    fn ns(&self) -> &str {
        self.namespace.name()
    }

    /// Starts the binary as replica `replica` with its admin endpoint on `port`.
    fn operator(&self, replica: &str, port: u16) -> tokio::process::Child {
        let log = self.log_path(replica);
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleet-access-operator"));
        OperatorCommandLine {
            kubeconfig: self.control_plane.kubeconfig_path(),
            moto: self.moto,
            ssm_endpoint: &self.emulator.endpoint_url(),
            watch_namespace: self.ns(),
            bridge_namespace: self.ns(),
            admin_address: &format!("127.0.0.1:{port}"),
            replica,
        }
        .apply(command.as_std_mut())
        .args(["--resync-seconds", "300"])
        .args(["--lease-duration-seconds", &LEASE_SECONDS.to_string()]);
        command
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("the operator starts")
    }

    fn log_path(&self, replica: &str) -> PathBuf {
        std::env::temp_dir().join(format!("{}-{replica}.log", self.ns()))
    }

    async fn user(&self, name: &str) {
        self.iam
            .create_user()
            .user_name(name)
            .send()
            .await
            .expect("user");
    }

    async fn grant(&self, name: &str, user: &str) {
        let grant: SessionAccess = serde_json::from_value(json!({
            "apiVersion": "fleetaccess.io/v1alpha1",
            "kind": "SessionAccess",
            "metadata": {"name": name, "namespace": self.ns()},
            "spec": {
                "principals": {"users": [user]},
                "targets": {"instanceIds": [INSTANCE]},
                "sessions": {"ssh": true},
            },
        }))
        .expect("grant");
        self.grants
            .create(&PostParams::default(), &grant)
            .await
            .expect("created");
    }

    /// Waits until the grant's current generation has `condition` = `status` (and `reason`).
    async fn wait_condition(&self, name: &str, condition: &str, status: &str, reason: &str) {
        wait_for(
            &format!("{name}: {condition}={status} {reason}"),
            || async {
                let grant = self.grants.get(name).await.ok()?;
                let s = grant.status.as_ref()?;
                (s.observed_generation == grant.metadata.generation
                    && s.conditions.iter().any(|c| {
                        c.type_ == condition
                            && c.status == status
                            && (reason.is_empty() || c.reason == reason)
                    }))
                .then_some(())
            },
        )
        .await;
    }

    async fn delete_all_and_wait(&self) {
        self.grants
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await
            .expect("delete");
        wait_for("grants cleaned up", || async {
            self.grants
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .is_empty()
                .then_some(())
        })
        .await;
    }
}

async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// GET `path` on the admin endpoint: (status code, body), or `None` when nothing answers.
async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    http_get(loopback(port), path).await
}

async fn scrape(port: u16) -> Vec<ExposedSample> {
    let (code, body) = get(port, "/metrics").await.expect("/metrics answers");
    assert_eq!(code, 200);
    exposition::parse(&body)
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt("fleet-access-operator")
        .await
        .ok()
        .flatten()?
        .spec?
        .holder_identity
        .filter(|h| !h.is_empty())
}

fn terminate(child: &tokio::process::Child) {
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

#[tokio::test]
async fn two_replicas_elect_one_leader_and_the_standby_takes_over() {
    let s = Setup::start("op-leader").await;
    let user = format!("leader-{}", s.ns());
    s.user(&user).await;
    let leases: Api<Lease> = s.namespace.api();
    let (port_a, port_b) = (
        free_loopback_port().expect("port"),
        free_loopback_port().expect("port"),
    );
    println!("logs: {}", s.log_path("a").display());

    let mut a = s.operator("a", port_a);
    wait_for("a leads", || async {
        let leads = holder(&leases).await.as_deref() == Some("a");
        let ready = get(port_a, "/readyz").await.map(|r| r.0) == Some(200);
        (leads && ready).then_some(())
    })
    .await;
    let mut b = s.operator("b", port_b);
    wait_for("b answers", || async {
        (get(port_b, "/healthz").await.map(|r| r.0) == Some(200)).then_some(())
    })
    .await;
    // For longer than a lease duration, b stays a standby and a keeps the Lease.
    let until = Instant::now() + Duration::from_secs(LEASE_SECONDS + 2);
    while Instant::now() < until {
        assert_eq!(holder(&leases).await.as_deref(), Some("a"));
        let (code, body) = get(port_b, "/readyz").await.expect("b /readyz");
        assert_eq!((code, body.as_str()), (503, "standby\n"));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Only the leader reconciles.
    s.grant("first", &user).await;
    s.wait_condition("first", "Ready", "True", "").await;
    let on_a = scrape(port_a).await;
    let on_b = scrape(port_b).await;
    assert!(
        exposition::sum(
            &on_a,
            "fleet_access_operator_reconcile_duration_seconds_count",
            &[("kind", "SessionAccess")]
        ) >= 1.0
    );
    assert!(exposition::sum(&on_a, "fleet_access_operator_aws_calls_total", &[]) >= 1.0);
    assert_eq!(
        exposition::sum(&on_a, "fleet_access_operator_leader", &[]),
        1.0
    );
    assert_eq!(
        exposition::sum(
            &on_b,
            "fleet_access_operator_reconcile_duration_seconds_count",
            &[]
        ),
        0.0,
        "the standby reconciled"
    );
    assert_eq!(
        exposition::sum(&on_b, "fleet_access_operator_aws_calls_total", &[]),
        0.0,
        "the standby called AWS"
    );
    assert_eq!(
        exposition::sum(&on_b, "fleet_access_operator_leader", &[]),
        0.0
    );

    // Kill the leader: the standby takes over once the Lease expires, and reconciles.
    a.kill().await.expect("killed");
    let killed = Instant::now();
    wait_for("b takes over", || async {
        let leads = holder(&leases).await.as_deref() == Some("b");
        let ready = get(port_b, "/readyz").await.map(|r| r.0) == Some(200);
        (leads && ready).then_some(())
    })
    .await;
    let takeover = killed.elapsed();
    println!(
        "takeover {:.1} s after the leader was killed (lease {LEASE_SECONDS} s)",
        takeover.as_secs_f64()
    );
    let lease = leases.get("fleet-access-operator").await.expect("lease");
    assert!(
        lease.spec.and_then(|s| s.lease_transitions).unwrap_or(0) >= 1,
        "the takeover counts as a transition"
    );
    s.grant("second", &user).await;
    s.wait_condition("second", "Ready", "True", "").await;
    let on_b = scrape(port_b).await;
    assert!(
        exposition::sum(
            &on_b,
            "fleet_access_operator_aws_calls_total",
            &[("operation", "CreatePolicy"), ("outcome", "ok")]
        ) >= 1.0,
        "the new leader created the second grant's policy"
    );

    // A clean shutdown releases the Lease; the next replica acquires it without waiting.
    terminate(&b);
    let exited = tokio::time::timeout(Duration::from_secs(30), b.wait())
        .await
        .expect("b stops within 30 s")
        .expect("status");
    assert!(exited.success(), "b exits cleanly: {exited}");
    assert_eq!(holder(&leases).await, None, "the Lease is released");
    let restarted = Instant::now();
    let mut a = s.operator("a2", port_a);
    wait_for("a2 leads", || async {
        (holder(&leases).await.as_deref() == Some("a2")).then_some(())
    })
    .await;
    println!(
        "a released Lease acquired {:.1} s after the start of a new replica",
        restarted.elapsed().as_secs_f64()
    );
    assert!(
        restarted.elapsed() < Duration::from_secs(LEASE_SECONDS),
        "a released Lease is taken without waiting for it to expire"
    );

    s.delete_all_and_wait().await;
    let attached = s
        .iam
        .list_attached_user_policies()
        .user_name(&user)
        .send()
        .await
        .expect("attached");
    assert!(attached.attached_policies().is_empty());
    a.kill().await.expect("stopped");
}

#[tokio::test]
async fn the_admin_endpoint_reports_health_readiness_and_metrics() {
    let s = Setup::start("op-admin").await;
    let user = format!("admin-{}", s.ns());
    s.user(&user).await;
    let ghost = format!("ghost-{}", s.ns());
    let port = free_loopback_port().expect("port");
    let mut operator = s.operator("solo", port);
    wait_for("ready", || async {
        (get(port, "/readyz").await == Some((200, "leading\n".into()))).then_some(())
    })
    .await;
    assert_eq!(get(port, "/healthz").await, Some((200, "ok\n".into())));
    assert_eq!(get(port, "/nothing").await.map(|r| r.0), Some(404));

    s.grant("good", &user).await;
    // A principal that does not exist: NoSuchEntity is terminal.
    s.grant("bad", &ghost).await;
    s.wait_condition("good", "Ready", "True", "").await;
    s.wait_condition("bad", "PolicySynced", "False", "NoSuchEntity")
        .await;

    let samples = wait_for("grant gauges settle", || async {
        let samples = scrape(port).await;
        (exposition::sum(
            &samples,
            "fleet_access_operator_grants",
            &[("state", "ready")],
        ) == 1.0
            && exposition::sum(
                &samples,
                "fleet_access_operator_grants",
                &[("state", "failed")],
            ) == 1.0)
            .then_some(samples)
    })
    .await;
    assert!(
        exposition::sum(
            &samples,
            "fleet_access_operator_reconcile_duration_seconds_count",
            &[("kind", "SessionAccess")]
        ) >= 2.0
    );
    assert!(
        exposition::sum(
            &samples,
            "fleet_access_operator_reconcile_duration_seconds_bucket",
            &[("kind", "SessionAccess"), ("le", "+Inf")]
        ) >= 2.0
    );
    assert!(
        exposition::sum(
            &samples,
            "fleet_access_operator_aws_calls_total",
            &[
                ("service", "iam"),
                ("operation", "CreatePolicy"),
                ("outcome", "ok")
            ]
        ) >= 2.0
    );
    assert!(
        exposition::sum(
            &samples,
            "fleet_access_operator_aws_calls_total",
            &[
                ("service", "ssm"),
                ("operation", "DescribeInstanceInformation")
            ]
        ) >= 1.0
    );
    let failed_attach = [
        ("service", "iam"),
        ("operation", "AttachUserPolicy"),
        ("outcome", "NoSuchEntity"),
    ];
    assert!(
        exposition::sum(
            &samples,
            "fleet_access_operator_aws_calls_total",
            &failed_attach
        ) >= 1.0
    );
    assert!(
        exposition::sum(
            &samples,
            "fleet_access_operator_reconcile_errors_total",
            &[("reason", "aws_not_found")]
        ) >= 1.0
    );
    assert_eq!(
        exposition::sum(&samples, "fleet_access_operator_leader", &[]),
        1.0
    );
    // Labels stay bounded: no names, ARNs or messages in them.
    for ExposedSample { name, labels, .. } in &samples {
        for value in labels.values() {
            assert!(
                !value.contains(s.ns()) && value.len() < 40,
                "unbounded label value {value:?} on {name}"
            );
        }
    }

    // The terminal error is not retried in a loop: no new attach attempts for a while, once the
    // reconcile that the grant's own status write triggers has run (it tries the attach once
    // more and writes nothing, as the status does not change). The gauges can settle before it
    // runs, so the controller is first seen idle for a second.
    let reconciles = |samples: &[ExposedSample]| {
        exposition::sum(
            samples,
            "fleet_access_operator_reconcile_duration_seconds_count",
            &[("kind", "SessionAccess")],
        )
    };
    let idle = wait_for("the controller idle", || async {
        let before = reconciles(&scrape(port).await);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = scrape(port).await;
        (reconciles(&after) == before).then_some(after)
    })
    .await;
    let attempts = exposition::sum(
        &idle,
        "fleet_access_operator_aws_calls_total",
        &failed_attach,
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let later = scrape(port).await;
    assert_eq!(
        exposition::sum(
            &later,
            "fleet_access_operator_aws_calls_total",
            &failed_attach
        ),
        attempts,
        "a terminal error was retried"
    );

    s.delete_all_and_wait().await;
    let samples = scrape(port).await;
    assert_eq!(
        exposition::sum(
            &samples,
            "fleet_access_operator_grants",
            &[("state", "ready")]
        ),
        0.0
    );
    operator.kill().await.expect("stopped");
}
