//! The operator as its binary, against the real kube-apiserver + etcd, IAM on moto and SSM on
//! the emulator (moto upstream):
//! - two replicas elect one leader over a Lease; only the leader reconciles; killing it lets
//!   the standby take over and reconcile a new grant; a clean shutdown releases the Lease;
//! - the admin endpoint on a live run: /healthz, /readyz, and /metrics with reconcile
//!   durations, errors by bounded reason, AWS calls by service/operation/outcome and grants by
//!   state; a terminal AWS error is not retried with backoff nor in a loop, only at the resync.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::{
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use fleet_access_crds::{SessionAccess, fixtures::GrantFixture};
use fleet_access_ssm_emulator::{Config, Emulator, InstanceConfig, Mode, Running};
use fleet_access_tests::{
    ControlPlane, ExposedSample, Moto, OperatorCommandLine, Scratch, TestNamespace,
    addresses::wait_for_reported_address, exposition, http_get,
};
use k8s_openapi::{
    api::coordination::v1::Lease,
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use tokio::time::Instant;

/// The longest wait for anything the operator does (it reacts within seconds).
const WAIT: Duration = Duration::from_secs(120);
const INSTANCE: &str = "i-0000000000000000a";
/// The test's lease duration: short, so that a takeover happens within seconds.
const LEASE_SECONDS: u64 = 6;
/// The name of the leader Lease.
const LEASE: &str = "fleet-access-operator";
/// Seconds between drift checks: beyond every wait of the tests, unless a test says otherwise.
const RESYNC_SECONDS: u64 = 300;

struct Setup {
    control_plane: &'static ControlPlane,
    moto: &'static Moto,
    namespace: TestNamespace,
    emulator: Running,
    iam: aws_sdk_iam::Client,
    grants: Api<SessionAccess>,
    /// The replicas' logs: removed with the setup, kept (and named) when a test fails.
    logs: Scratch,
}

impl Setup {
    async fn start(prefix: &str) -> Self {
        let control_plane = ControlPlane::shared().await.expect("control plane");
        control_plane
            .install_fleet_access(&fleet_access_crds::crds_yaml())
            .await
            .expect("fleet-access's API");
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
            logs: Scratch::new("fleet-access-operator-logs-"),
        }
    }

    fn ns(&self) -> &str {
        self.namespace.name()
    }

    /// Starts the binary as replica `replica`, resyncing every `resync_seconds`; its admin
    /// endpoint on a port the system picks, which it reports.
    async fn operator(&self, replica: &str, resync_seconds: u64) -> Replica {
        let log = self.log_path(replica);
        let stdout = std::fs::File::create(&log).expect("log file");
        let stderr = stdout.try_clone().expect("log file");
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleet-access-operator"));
        OperatorCommandLine {
            kubeconfig: self.control_plane.kubeconfig_path(),
            moto: self.moto,
            ssm_endpoint: &self.emulator.endpoint_url(),
            watch_namespace: self.ns(),
            bridge_namespace: self.ns(),
            admin_address: "127.0.0.1:0",
            replica,
        }
        .apply(command.as_std_mut())
        .args(["--resync-seconds", &resync_seconds.to_string()])
        .args(["--lease-duration-seconds", &LEASE_SECONDS.to_string()]);
        let mut child = command
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("the operator starts");
        let admin = wait_for_reported_address(replica, &log, "admin", WAIT, || {
            Some(child.try_wait().ok()??.to_string())
        })
        .await
        .unwrap_or_else(|error| panic!("{error}"));
        Replica { child, admin, log }
    }

    fn log_path(&self, replica: &str) -> PathBuf {
        self.logs
            .path()
            .join(format!("{}-{replica}.log", self.ns()))
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
        let grant = GrantFixture::new(self.ns(), name)
            .users([user])
            .instance_ids([INSTANCE])
            .ssh()
            .build();
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

/// One operator process: where its admin endpoint listens and where it logs (standard output and
/// error).
struct Replica {
    child: tokio::process::Child,
    admin: SocketAddr,
    log: PathBuf,
}

impl Replica {
    /// Whether the log has a line containing `text`.
    fn logged(&self, text: &str) -> bool {
        read_log(&self.log).lines().any(|line| line.contains(text))
    }
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Polls `probe` every 200 ms until it returns a value; fails after [`WAIT`] saying what was
/// awaited.
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
        assert!(
            Instant::now() < deadline,
            "{what}: not within {} s",
            WAIT.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// GET `path` on an admin endpoint: (status code, body), or `None` when nothing answers.
async fn get(admin: SocketAddr, path: &str) -> Option<(u16, String)> {
    http_get(admin, path).await
}

async fn scrape(admin: SocketAddr) -> Vec<ExposedSample> {
    let (code, body) = get(admin, "/metrics").await.expect("/metrics answers");
    assert_eq!(code, 200);
    exposition::parse(&body)
}

/// The Lease's holder; `None` when it is released (or not there).
async fn holder(leases: &Api<Lease>) -> Option<String> {
    let lease = leases.get_opt(LEASE).await.expect("the Lease is read")?;
    holder_of(&lease)
}

fn holder_of(lease: &Lease) -> Option<String> {
    lease
        .spec
        .as_ref()?
        .holder_identity
        .clone()
        .filter(|h| !h.is_empty())
}

/// When the Lease's holder last renewed it (its clock).
fn renewed_at(lease: &Lease) -> Timestamp {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.renew_time.as_ref())
        .expect("a held Lease has a renew time")
        .0
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

    let mut a = s.operator("a", RESYNC_SECONDS).await;
    wait_for("a leads", || async {
        let leads = holder(&leases).await.as_deref() == Some("a");
        let ready = get(a.admin, "/readyz").await.map(|r| r.0) == Some(200);
        (leads && ready).then_some(())
    })
    .await;
    let mut b = s.operator("b", RESYNC_SECONDS).await;
    wait_for("b's elector starts", || async {
        b.logged("waiting for the leader Lease").then_some(())
    })
    .await;
    // For longer than a lease duration (as a's renewals measure it), b stays a standby and a
    // keeps the Lease: a standby takes a Lease over only once it has seen it unchanged for a
    // whole duration, and a renews it well within one.
    let lease = leases.get(LEASE).await.expect("the Lease");
    let watched_from = renewed_at(&lease);
    let long_enough = SignedDuration::from_secs(LEASE_SECONDS as i64 + 2);
    wait_for(
        "a's renewals to span more than a lease duration",
        || async {
            let lease = leases.get(LEASE).await.expect("the Lease");
            assert_eq!(holder_of(&lease).as_deref(), Some("a"), "a keeps the Lease");
            let (code, body) = get(b.admin, "/readyz").await.expect("b /readyz");
            assert_eq!((code, body.as_str()), (503, "standby\n"), "b stands by");
            (renewed_at(&lease) >= watched_from + long_enough).then_some(())
        },
    )
    .await;

    // Only the leader reconciles.
    s.grant("first", &user).await;
    s.wait_condition("first", "Ready", "True", "").await;
    let on_a = scrape(a.admin).await;
    let on_b = scrape(b.admin).await;
    assert!(
        exposition::sum(
            &on_a,
            "fleet_access_operator_reconcile_duration_seconds_count",
            &[("kind", "SessionAccess")]
        ) >= 1.0
    );
    assert!(exposition::sum(&on_a, "fleet_access_operator_aws_calls_total", &[]) >= 1.0);
    assert_eq!(
        exposition::exported_sum(&on_a, "fleet_access_operator_leader", &[]),
        Some(1.0)
    );
    // The standby exports its leader gauge, at 0, and has observed no reconcile and no AWS call
    // (the operator creates those series at their first observation; b exports them once it
    // leads, below).
    assert_eq!(
        exposition::exported_sum(&on_b, "fleet_access_operator_leader", &[]),
        Some(0.0),
        "the standby exports that it does not lead"
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

    // Kill the leader: the standby takes over once the Lease expires, and reconciles.
    a.child.kill().await.expect("killed");
    let killed = Instant::now();
    wait_for("b takes over", || async {
        let leads = holder(&leases).await.as_deref() == Some("b");
        let ready = get(b.admin, "/readyz").await.map(|r| r.0) == Some(200);
        (leads && ready).then_some(())
    })
    .await;
    println!(
        "takeover {:.1} s after the leader was killed (lease {LEASE_SECONDS} s)",
        killed.elapsed().as_secs_f64()
    );
    let lease = leases.get(LEASE).await.expect("lease");
    assert!(
        lease.spec.and_then(|s| s.lease_transitions).unwrap_or(0) >= 1,
        "the takeover counts as a transition"
    );
    // Another user: the first user's set already holds what a second grant like the first
    // would add, so the new leader would have nothing to write.
    let second_user = format!("leader2-{}", s.ns());
    s.user(&second_user).await;
    s.grant("second", &second_user).await;
    s.wait_condition("second", "Ready", "True", "").await;
    let on_b = scrape(b.admin).await;
    assert_eq!(
        exposition::exported_sum(&on_b, "fleet_access_operator_leader", &[]),
        Some(1.0)
    );
    assert!(
        exposition::sum(
            &on_b,
            "fleet_access_operator_reconcile_duration_seconds_count",
            &[("kind", "SessionAccess")]
        ) >= 1.0,
        "the new leader reconciles"
    );
    assert!(
        exposition::sum(
            &on_b,
            "fleet_access_operator_aws_calls_total",
            &[("operation", "CreatePolicy"), ("outcome", "ok")]
        ) >= 1.0,
        "the new leader created the second user's policy set"
    );

    // A clean shutdown releases the Lease; the next replica acquires it without waiting for it
    // to expire.
    terminate(&b.child);
    let exited = tokio::time::timeout(WAIT, b.child.wait())
        .await
        .unwrap_or_else(|_| panic!("b still runs {} s after SIGTERM", WAIT.as_secs()))
        .expect("status");
    assert!(exited.success(), "b exits cleanly: {exited}");
    assert_eq!(holder(&leases).await, None, "the Lease is released");
    // The released Lease now says it lasts an hour: a replica that took it only once it expired
    // would not lead within the wait.
    leases
        .patch(
            LEASE,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"leaseDurationSeconds": 3600}})),
        )
        .await
        .expect("the released Lease's duration");
    let mut a2 = s.operator("a2", RESYNC_SECONDS).await;
    wait_for("a2 takes the released Lease", || async {
        (holder(&leases).await.as_deref() == Some("a2")).then_some(())
    })
    .await;

    s.delete_all_and_wait().await;
    let attached = s
        .iam
        .list_attached_user_policies()
        .user_name(&user)
        .send()
        .await
        .expect("attached");
    assert!(attached.attached_policies().is_empty());
    a2.child.kill().await.expect("stopped");
}

#[tokio::test]
async fn the_admin_endpoint_reports_health_readiness_and_metrics() {
    let s = Setup::start("op-admin").await;
    let user = format!("admin-{}", s.ns());
    s.user(&user).await;
    let ghost = format!("ghost-{}", s.ns());
    let mut operator = s.operator("solo", FAILING_RESYNC.as_secs()).await;
    let admin = operator.admin;
    wait_for("ready", || async {
        (get(admin, "/readyz").await == Some((200, "leading\n".into()))).then_some(())
    })
    .await;
    assert_eq!(get(admin, "/healthz").await, Some((200, "ok\n".into())));
    assert_eq!(get(admin, "/nothing").await.map(|r| r.0), Some(404));

    s.grant("good", &user).await;
    // A principal that does not exist: NoSuchEntity is terminal.
    s.grant("bad", &ghost).await;
    s.wait_condition("good", "Ready", "True", "").await;
    s.wait_condition("bad", "PolicySynced", "False", "NoSuchEntity")
        .await;

    let samples = wait_for("grant gauges settle", || async {
        let samples = scrape(admin).await;
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
    // The good grant's policy; the bad grant's principal is found missing before anything is
    // created (its attached policies are counted first, against the quota).
    assert_eq!(
        exposition::sum(
            &samples,
            "fleet_access_operator_aws_calls_total",
            &[
                ("service", "iam"),
                ("operation", "CreatePolicy"),
                ("outcome", "ok")
            ]
        ),
        1.0
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
    // The missing user, found when its attached policies are counted.
    let failed_attach = [
        ("service", "iam"),
        ("operation", "ListAttachedUserPolicies"),
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

    // The terminal error is not retried with backoff: the grant is tried again at the resync
    // (every FAILING_RESYNC here), not before. Awaited: that attempt, the first one logged a
    // resync or more after the first. Before it, one more attempt may come: the reconcile that
    // the grant's own status write triggers (it tries the attach again and writes nothing, as
    // the status does not change; a status that changed with every attempt would loop).
    assert!(FAILING_RESYNC > fleet_access_operator::controller::retry_pause(1));
    let resync = SignedDuration::try_from(FAILING_RESYNC).expect("a resync");
    let attempts = wait_for("the failing grant's attempt at the resync", || async {
        let attempts = failed_attaches(&read_log(&operator.log), "bad");
        let first = attempts.first()?.at;
        attempts
            .iter()
            .any(|a| a.at >= first + resync)
            .then_some(attempts)
    })
    .await;
    assert!(
        attempts.iter().all(|a| a.terminal),
        "a terminal error was retried with backoff: {attempts:#?}"
    );
    let before_resync = attempts
        .iter()
        .take_while(|a| a.at < attempts[0].at + resync)
        .count();
    assert!(
        before_resync <= 2,
        "{before_resync} attempts before the resync: {attempts:#?}"
    );

    s.delete_all_and_wait().await;
    let samples = scrape(admin).await;
    assert_eq!(
        exposition::sum(
            &samples,
            "fleet_access_operator_grants",
            &[("state", "ready")]
        ),
        0.0
    );
    operator.child.kill().await.expect("stopped");
}

/// The resync of the test with a failing grant: the failing grant is tried again this often.
/// Longer than the first pause of the retry backoff, so that a retry with backoff comes before
/// the resync's.
const FAILING_RESYNC: Duration = Duration::from_secs(10);

/// What the operator logs when a reconcile fails for good: it waits for the resync or a change.
const TERMINAL_ERROR_LOGGED: &str = "terminal error: waiting for a change of the grant";
/// What the operator logs when a failed reconcile goes to the retry backoff.
const RETRY_LOGGED: &str = "reconcile failed";

/// One failed attempt to attach a grant's policy, as the operator logged it.
#[derive(Debug, PartialEq)]
struct FailedAttach {
    /// When (the operator's clock).
    at: Timestamp,
    /// Reported as terminal (tried again at the resync), else handed to the retry backoff.
    terminal: bool,
}

/// The failed attaches of grant `grant` in an operator log (`RUST_LOG=info`, no colours): the
/// lines that report its `NoSuchEntity` failures (its user is missing, found when the user's
/// attached policies are counted or at the attach), terminal or to be retried.
fn failed_attaches(log: &str, grant: &str) -> Vec<FailedAttach> {
    let field = format!(" grant={grant} ");
    log.lines()
        .filter(|line| line.contains(&field) && line.contains(": NoSuchEntity"))
        .filter_map(|line| {
            let terminal = line.contains(TERMINAL_ERROR_LOGGED);
            if !terminal && !line.contains(RETRY_LOGGED) {
                return None;
            }
            let at = line.split_whitespace().next()?.parse().ok()?;
            Some(FailedAttach { at, terminal })
        })
        .collect()
}

#[test]
fn failed_attaches_are_read_from_the_log() {
    let log = "\
2026-01-02T03:04:05.000001Z  INFO fleet_access_operator::controller::runner: leading: starting the controllers
2026-01-02T03:04:06.5Z  WARN fleet_access_operator::controller::reconcile: terminal error: waiting for a change of the grant or the next resync grant=bad error=AttachUserPolicy: NoSuchEntity: no user
2026-01-02T03:04:07Z  WARN fleet_access_operator::controller::reconcile: terminal error: waiting for a change of the grant or the next resync grant=badge error=AttachUserPolicy: NoSuchEntity: no user
2026-01-02T03:04:08Z  WARN fleet_access_operator::controller::reconcile: reconcile failed grant=bad error=AttachUserPolicy: NoSuchEntity: no user retry_in=5s
2026-01-02T03:04:09Z  WARN fleet_access_operator::controller::reconcile: reconcile failed grant=bad error=Kubernetes API: conflict retry_in=5s
";
    let at = |text: &str| text.parse::<Timestamp>().expect("a timestamp");
    assert_eq!(
        failed_attaches(log, "bad"),
        vec![
            FailedAttach {
                at: at("2026-01-02T03:04:06.5Z"),
                terminal: true
            },
            FailedAttach {
                at: at("2026-01-02T03:04:08Z"),
                terminal: false
            },
        ]
    );
    assert_eq!(failed_attaches(log, "good"), Vec::new());
}
