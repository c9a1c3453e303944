//! Issue 8 part 4: the operator at scale. N grants are created at once against the real
//! kube-apiserver + etcd; the operator (its release binary, one process per run) reconciles them
//! into IAM on moto and SSM documents through the project's SSM emulator (moto upstream, an
//! emulated fleet for the targets), exactly as the operator's own tests wire it:
//!
//! ```text
//!  bench ──create N grants, 32 in flight──▶ kube-apiserver + etcd ◀──watch── operator (release)
//!    │ watch: all Ready?                                                   │ IAM ──▶ moto
//!    └ /metrics of the operator and of the API server                     └ SSM ──▶ ssm-emulator ──▶ moto
//! ```
//!
//! Measured per run: the create time with nobody watching (the API server's floor), the time from
//! the first create until every grant is Ready, the operator's AWS calls (its
//! `fleet_access_operator_aws_calls_total`) until it settles, then one full resync of every grant
//! (proven by the reconcile counter growing by N) and the AWS calls and Kubernetes writes during
//! it, then the deletion of every grant. A run with fewer grants is measured alongside, to show how
//! the time scales. Everything a run creates is deleted; every wait is bounded.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    process::Stdio,
    time::Duration,
};

use anyhow::{Context as _, bail};
use fleet_access_crds::SessionAccess;
use fleet_access_tests::{
    ControlPlane, ExposedSample, Moto, OperatorCommandLine, TestNamespace, exposition,
    free_loopback_port, http_get, loopback,
};
use futures::{StreamExt as _, TryStreamExt as _};
use kube::{
    Api, Client, ResourceExt as _,
    api::{DeleteParams, ListParams, PostParams},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::{process::Child, time::Instant};

use crate::{
    scenarios::{Options, report_perf, start_perf},
    support::{READY_TIMEOUT, Workspace, command},
};

/// Creates in flight at once: a burst, bounded (kubectl apply of a folder sends one at a time;
/// a GitOps controller a few dozen).
pub const CREATE_CONCURRENCY: usize = 32;
/// Instances in the emulated fleet; grant k targets instance k mod this.
pub const FLEET_SIZE: usize = 100;
/// IAM's default quota of managed policies attached to one identity, which every grant's one
/// role must stay within.
pub const IAM_DEFAULT_QUOTA: usize = 10;
/// The longest wait for every grant to be Ready, or to be gone after the deletion.
const CONVERGE_LIMIT: Duration = Duration::from_secs(900);
/// How long the reconcile counter must stand still for the operator to count as settled.
const SETTLE_QUIET: Duration = Duration::from_secs(3);
/// How often the operator's /metrics is read while waiting.
const POLL: Duration = Duration::from_millis(500);
/// The operator's reconcile counter (one per finished reconcile of a grant).
const RECONCILES: &str = "fleet_access_operator_reconcile_duration_seconds_count";
/// The operator's AWS call counter.
const AWS_CALLS: &str = "fleet_access_operator_aws_calls_total";
/// The API server's request counter.
const API_REQUESTS: &str = "apiserver_request_total";
/// Resources whose writes are not the operator's: the leader's Lease renewals, and the API
/// server's own reconciler of the `kubernetes` Service's endpoints.
const NOT_THE_GRANTS: &[&str] = &["leases", "endpoints"];
/// The API server's verbs that write.
const WRITE_VERBS: &[&str] = &[
    "POST",
    "PUT",
    "PATCH",
    "APPLY",
    "DELETE",
    "DELETECOLLECTION",
];

/// AWS calls by (service, operation, outcome).
pub type CallCounts = BTreeMap<(String, String, String), f64>;

/// What happened between two readings of the counters.
#[derive(Clone, Debug, Default)]
pub struct Phase {
    /// Wall time.
    pub seconds: f64,
    /// Reconciles of a grant that finished.
    pub reconciles: f64,
    /// The operator's AWS calls.
    pub calls: CallCounts,
    /// Writes the API server counted, by `VERB resource` (leases left out: the leader renews
    /// its Lease every few seconds whatever the grants do).
    pub kube_writes: BTreeMap<String, f64>,
}

impl Phase {
    /// Calls whose operation changes something (Create, Put, Attach, Delete ...).
    pub fn writes(&self) -> f64 {
        self.calls
            .iter()
            .filter(|((_, operation, _), _)| fleet_access_operator::aws::is_write(operation))
            .fold(0.0, |sum, (_, n)| sum + n)
    }

    /// Every call.
    pub fn total(&self) -> f64 {
        self.calls.values().fold(0.0, |sum, n| sum + n)
    }
}

/// One run with `grants` grants.
#[derive(Clone, Debug)]
pub struct OperatorRun {
    /// Grants created.
    pub grants: usize,
    /// The same grants created into a namespace no operator watches: the API server's floor.
    pub floor_create_seconds: f64,
    /// Creating them with the operator running.
    pub create_seconds: f64,
    /// From the first create until every grant's current generation is Ready.
    pub ready_seconds: f64,
    /// From the operator's start until it settled after every grant was Ready.
    pub apply: Phase,
    /// One full resync of every grant, in steady state.
    pub resync: Phase,
    /// From the deletion of every grant until they are all gone (finalizer: IAM/SSM cleaned).
    pub delete: Phase,
    /// Managed policies attached to the one role every grant names, once every grant was Ready
    /// and the operator settled.
    pub role_policies: usize,
    /// Policies still attached to the run's role after the deletion (should be 0).
    pub leftover_attachments: usize,
    /// The grants' session documents still in SSM after the deletion (should be 0); the bench
    /// deletes them.
    pub leftover_documents: usize,
}

/// The operator benchmark's figures.
#[derive(Clone, Debug, Default)]
pub struct Operator {
    /// Grants per run at the full size.
    pub grants: usize,
    /// Grants per run at the reference size.
    pub reference_grants: usize,
    /// The runs at the full size.
    pub runs: Vec<OperatorRun>,
    /// The runs at the reference size, interleaved with them.
    pub reference: Vec<OperatorRun>,
    /// Runs that failed, and why.
    pub failures: Vec<String>,
    /// The operator's resync period.
    pub resync: Duration,
    /// Where the control plane and moto came from.
    pub services: String,
    /// The top of the operator's perf profile during the first full-size apply, when taken.
    pub profile: Option<String>,
}

/// What every run shares.
struct Bench<'a> {
    ws: &'a Workspace,
    control_plane: &'static ControlPlane,
    moto: &'static Moto,
    ssm_endpoint: String,
    client: Client,
    iam: aws_sdk_iam::Client,
    ssm: aws_sdk_ssm::Client,
    resync: Duration,
}

/// Runs the operator benchmark: `options.runs` runs at `options.operator_grants` grants, each
/// after one at `options.operator_reference_grants`.
pub async fn run(ws: &Workspace, options: &Options) -> anyhow::Result<Operator> {
    let operator = ws.bin("fleet-access-operator");
    if !operator.exists() {
        bail!(
            "{} missing: cargo build --release -p fleet-access-operator",
            operator.display()
        );
    }
    let services = if std::env::var_os(fleet_access_tests::control_plane::KUBECONFIG_ENV).is_some()
    {
        "reused from tests/env/with-services.sh"
    } else {
        "started by the bench (fleet_access_tests fixtures)"
    };
    let control_plane = ControlPlane::shared()
        .await
        .context("kube-apiserver + etcd (make setup builds them)")?;
    // The CRDs, and the single-team boundary: without a boundary every grant is refused.
    control_plane
        .install_fleet_access(&fleet_access_crds::crds_yaml())
        .await
        .context("applying the CRDs and the single-team boundary")?;
    let moto = Moto::shared()
        .await
        .context("moto (make setup installs it)")?;
    let emulator = start_emulator(moto).await?;
    let bench = Bench {
        ws,
        control_plane,
        moto,
        ssm_endpoint: emulator.endpoint_url(),
        client: control_plane
            .client()
            .await
            .context("a client of the API server")?,
        iam: aws_sdk_iam::Client::new(&moto.sdk_config()),
        ssm: aws_sdk_ssm::Client::new(&fleet_access_tests::moto::sdk_config_for(
            &emulator.endpoint_url(),
        )),
        resync: options.operator_resync,
    };
    bench
        .warm_up()
        .await
        .context("warming up the API server client")?;
    let mut figures = Operator {
        grants: options.operator_grants,
        reference_grants: options.operator_reference_grants,
        resync: options.operator_resync,
        services: services.into(),
        ..Operator::default()
    };
    for run in 0..options.runs {
        for size in [options.operator_reference_grants, options.operator_grants] {
            let profile = options.perf && run == 0 && size == options.operator_grants;
            match bench.run(size, profile).await {
                Ok((figure, profile)) => {
                    eprintln!(
                        "bench: operator {size} grants run {run}: Ready in {:.1} s, {:.1} AWS calls per grant ({:.1} writes); resync: {} reads, {} writes",
                        figure.ready_seconds,
                        figure.apply.total() / size as f64,
                        figure.apply.writes() / size as f64,
                        figure.resync.total() - figure.resync.writes(),
                        figure.resync.writes()
                    );
                    if size == options.operator_grants {
                        figures.runs.push(figure);
                    } else {
                        figures.reference.push(figure);
                    }
                    figures.profile = figures.profile.take().or(profile);
                }
                Err(error) => {
                    eprintln!("bench: operator {size} grants run {run} failed: {error:#}");
                    figures
                        .failures
                        .push(format!("{size} grants, run {run}: {error:#}"));
                }
            }
        }
    }
    emulator.shutdown().await;
    Ok(figures)
}

/// The SSM emulator with moto upstream and a fleet of [`FLEET_SIZE`] managed instances.
async fn start_emulator(moto: &Moto) -> anyhow::Result<fleet_access_ssm_emulator::Running> {
    use fleet_access_ssm_emulator::{Config, Emulator, InstanceConfig, Mode};
    let mut config = Config {
        mode: Mode::Fast,
        upstream: Some(moto.endpoint().to_owned()),
        ..Config::default()
    };
    for k in 0..FLEET_SIZE {
        config
            .instances
            .push(InstanceConfig::new(instance_id(k)).with_agent_version("3.3.0.0"));
    }
    Emulator::start(config)
        .await
        .context("starting the SSM emulator")
}

fn instance_id(k: usize) -> String {
    format!("i-0be{k:014x}")
}

/// The port every grant forwards (its session document's).
const GRANT_PORT: u16 = 5432;

/// A grant as teams write them: one IAM role (the same for every grant) may start SSH sessions
/// and forward port 5432 to one instance.
fn grant(namespace: &str, index: usize, role: &str) -> anyhow::Result<SessionAccess> {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "fleetaccess.io/v1alpha1",
        "kind": "SessionAccess",
        "metadata": {"name": grant_name(index), "namespace": namespace},
        "spec": {
            "principals": {"roles": [role]},
            "targets": {"instanceIds": [instance_id(index % FLEET_SIZE)]},
            "sessions": {"ssh": true, "ports": [GRANT_PORT]},
        },
    }))
    .context("building a grant")
}

fn grant_name(index: usize) -> String {
    format!("g{index:04}")
}

fn is_ready(grant: &SessionAccess) -> bool {
    grant.status.as_ref().is_some_and(|s| {
        s.observed_generation == grant.metadata.generation
            && s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// Creates every grant, [`CREATE_CONCURRENCY`] in flight; returns the time it took.
async fn create_all(api: &Api<SessionAccess>, grants: Vec<SessionAccess>) -> anyhow::Result<f64> {
    let started = Instant::now();
    let created = futures::stream::iter(grants)
        .map(|grant| {
            let api = api.clone();
            async move { api.create(&PostParams::default(), &grant).await }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .try_collect::<Vec<_>>();
    tokio::time::timeout(CONVERGE_LIMIT, created)
        .await
        .context("creating the grants took too long")?
        .context("creating a grant")?;
    Ok(started.elapsed().as_secs_f64())
}

/// Watches `api` until `count` grants are Ready; returns the time since `started`.
async fn wait_all_ready(
    api: Api<SessionAccess>,
    count: usize,
    started: Instant,
) -> anyhow::Result<f64> {
    let watch = async {
        let mut ready = BTreeSet::new();
        let mut events = std::pin::pin!(
            watcher(api, watcher::Config::default())
                .default_backoff()
                .applied_objects()
        );
        while let Some(event) = events.next().await {
            // The watcher retries on its own after an error (with backoff).
            let Ok(grant) = event else { continue };
            if is_ready(&grant) {
                ready.insert(grant.name_any());
            } else {
                ready.remove(&grant.name_any());
            }
            if ready.len() >= count {
                return Ok(started.elapsed().as_secs_f64());
            }
        }
        bail!("the watch of the grants ended")
    };
    tokio::time::timeout(CONVERGE_LIMIT, watch)
        .await
        .with_context(|| format!("not every grant Ready within {CONVERGE_LIMIT:?}"))?
}

/// The operator's binary, one replica leading alone, scoped to `namespace`.
struct OperatorProcess {
    child: Child,
    admin: SocketAddr,
}

impl OperatorProcess {
    async fn start(bench: &Bench<'_>, namespace: &str) -> anyhow::Result<Self> {
        let port = free_loopback_port()?;
        let log = format!("operator-{namespace}");
        let mut cmd = command(&bench.ws.bin("fleet-access-operator"), bench.ws, &log)?;
        OperatorCommandLine {
            kubeconfig: bench.control_plane.kubeconfig_path(),
            moto: bench.moto,
            ssm_endpoint: &bench.ssm_endpoint,
            watch_namespace: namespace,
            bridge_namespace: namespace,
            admin_address: &loopback(port).to_string(),
            replica: "bench",
        }
        .apply(cmd.as_std_mut())
        .args(["--resync-seconds", &bench.resync.as_secs().to_string()]);
        cmd.stdout(Stdio::null());
        let child = cmd.spawn().context("starting fleet-access-operator")?;
        let operator = Self {
            child,
            admin: loopback(port),
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        while http_get(operator.admin, "/readyz").await.map(|r| r.0) != Some(200) {
            if Instant::now() > deadline {
                bail!(
                    "the operator did not lead within {READY_TIMEOUT:?} (log: {})",
                    bench.ws.scratch.join(format!("{log}.stderr")).display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(operator)
    }

    fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    async fn samples(&self) -> anyhow::Result<Vec<ExposedSample>> {
        match http_get(self.admin, "/metrics").await {
            Some((200, body)) => Ok(exposition::parse(&body)),
            other => bail!("the operator's /metrics answered {other:?}"),
        }
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// The counters at one moment: the operator's and the API server's.
struct Reading {
    at: Instant,
    reconciles: f64,
    calls: CallCounts,
    kube_writes: BTreeMap<String, f64>,
}

impl Reading {
    fn until(&self, later: &Reading) -> Phase {
        let diff = |a: f64, b: f64| (b - a).max(0.0);
        let mut calls = CallCounts::new();
        for (key, n) in &later.calls {
            let d = diff(self.calls.get(key).copied().unwrap_or(0.0), *n);
            if d > 0.0 {
                calls.insert(key.clone(), d);
            }
        }
        let mut kube_writes = BTreeMap::new();
        for (key, n) in &later.kube_writes {
            let d = diff(self.kube_writes.get(key).copied().unwrap_or(0.0), *n);
            if d > 0.0 {
                kube_writes.insert(key.clone(), d);
            }
        }
        Phase {
            seconds: (later.at - self.at).as_secs_f64(),
            reconciles: diff(self.reconciles, later.reconciles),
            calls,
            kube_writes,
        }
    }
}

impl Bench<'_> {
    async fn read(&self, operator: &OperatorProcess) -> anyhow::Result<Reading> {
        let samples = operator.samples().await?;
        let mut calls = CallCounts::new();
        for s in samples.iter().filter(|s| s.name == AWS_CALLS) {
            let key = (
                s.label("service").to_owned(),
                s.label("operation").to_owned(),
                s.label("outcome").to_owned(),
            );
            *calls.entry(key).or_default() += s.value;
        }
        Ok(Reading {
            at: Instant::now(),
            reconciles: exposition::sum(&samples, RECONCILES, &[("kind", "SessionAccess")]),
            calls,
            kube_writes: self.api_server_writes().await?,
        })
    }

    /// Writes the API server has served so far, by `VERB resource`, [`NOT_THE_GRANTS`] left out.
    async fn api_server_writes(&self) -> anyhow::Result<BTreeMap<String, f64>> {
        let request = http::Request::get("/metrics")
            .body(Vec::new())
            .context("a /metrics request")?;
        let text = self
            .client
            .request_text(request)
            .await
            .context("the API server's /metrics")?;
        let mut writes = BTreeMap::new();
        for s in exposition::parse(&text)
            .iter()
            .filter(|s| s.name == API_REQUESTS)
        {
            let (verb, resource) = (s.label("verb"), s.label("resource"));
            if WRITE_VERBS.contains(&verb)
                && !NOT_THE_GRANTS.contains(&resource)
                && !resource.is_empty()
            {
                *writes.entry(format!("{verb} {resource}")).or_default() += s.value;
            }
        }
        Ok(writes)
    }

    /// Reads the counters until the reconcile counter has not moved for [`SETTLE_QUIET`] (at
    /// most `limit`), and returns the last reading.
    async fn settle(&self, operator: &OperatorProcess, limit: Duration) -> anyhow::Result<Reading> {
        let deadline = Instant::now() + limit;
        let mut last = self.read(operator).await?;
        let mut still_since = last.at;
        loop {
            tokio::time::sleep(POLL).await;
            let now = self.read(operator).await?;
            if now.reconciles != last.reconciles {
                still_since = now.at;
            }
            last = now;
            if last.at - still_since >= SETTLE_QUIET || last.at >= deadline {
                return Ok(last);
            }
        }
    }

    /// The role every grant of the run names.
    async fn role(&self, namespace: &str) -> anyhow::Result<String> {
        let name = format!("{namespace}-deployer");
        let trust = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#;
        self.iam
            .create_role()
            .role_name(&name)
            .assume_role_policy_document(trust)
            .send()
            .await
            .with_context(|| format!("creating IAM role {name}"))?;
        Ok(name)
    }

    /// The managed policies attached to `role`.
    async fn role_policies(&self, role: &str) -> anyhow::Result<usize> {
        Ok(self
            .iam
            .list_attached_role_policies()
            .role_name(role)
            .send()
            .await
            .with_context(|| format!("listing the policies of {role}"))?
            .attached_policies()
            .len())
    }

    /// Counts the policies still attached to `role`, then deletes it unless some are.
    async fn remove_role(&self, role: &str) -> anyhow::Result<usize> {
        let attached = self.role_policies(role).await?;
        if attached == 0 {
            self.iam
                .delete_role()
                .role_name(role)
                .send()
                .await
                .with_context(|| format!("deleting IAM role {role}"))?;
        }
        Ok(attached)
    }

    /// One grant created and deleted, untimed, so that the first timed create does not pay for
    /// the client's connection and the API server's first use of the CRD.
    async fn warm_up(&self) -> anyhow::Result<()> {
        let namespace = self.control_plane.namespace("bench-warm").await?;
        let api: Api<SessionAccess> = namespace.api();
        create_all(&api, vec![grant(namespace.name(), 0, "nobody")?]).await?;
        api.delete_collection(&DeleteParams::default(), &ListParams::default())
            .await
            .context("deleting the warm-up grant")?;
        Ok(())
    }

    /// Counts the grants' session documents still in SSM, and deletes them.
    /// Deletes the Port document the run's grants shared, if it is still there; returns how
    /// many were.
    async fn remove_documents(&self) -> anyhow::Result<usize> {
        let names = [fleet_access_crds::ssm_documents::port_document_name(
            fleet_access_operator::settings::DEFAULT_CLUSTER,
            GRANT_PORT,
        )];
        let left = futures::stream::iter(names)
            .map(|name| async move {
                let found = self.ssm.get_document().name(&name).send().await.is_ok();
                if found {
                    self.ssm
                        .delete_document()
                        .name(&name)
                        .send()
                        .await
                        .with_context(|| format!("deleting the leftover document {name}"))?;
                }
                anyhow::Ok(usize::from(found))
            })
            .buffer_unordered(8)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(left.into_iter().sum())
    }

    /// The API server's floor: the same number of grants created into `namespace`, which no
    /// operator watches, then deleted (no finalizer: at once).
    async fn floor(&self, namespace: &TestNamespace, count: usize) -> anyhow::Result<f64> {
        let api: Api<SessionAccess> = namespace.api();
        let grants = (0..count)
            .map(|k| grant(namespace.name(), k, "nobody"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let seconds = create_all(&api, grants).await?;
        api.delete_collection(&DeleteParams::default(), &ListParams::default())
            .await
            .context("deleting the floor's grants")?;
        Ok(seconds)
    }

    async fn run(
        &self,
        count: usize,
        profile: bool,
    ) -> anyhow::Result<(OperatorRun, Option<String>)> {
        let floor_namespace = self.control_plane.namespace("bench-floor").await?;
        let floor_create_seconds = self.floor(&floor_namespace, count).await?;

        let namespace = self.control_plane.namespace("bench-op").await?;
        let ns = namespace.name().to_owned();
        let role = self.role(&ns).await?;
        let grants = (0..count)
            .map(|k| grant(&ns, k, &role))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let api: Api<SessionAccess> = namespace.api();
        let operator = OperatorProcess::start(self, &ns).await?;
        let result = self.measure(&operator, &api, grants, &role, profile).await;
        operator.stop().await;
        let leftover_attachments = self.remove_role(&role).await?;
        let leftover_documents = self.remove_documents().await?;
        let (mut figure, profile) = result?;
        figure.floor_create_seconds = floor_create_seconds;
        figure.leftover_attachments = leftover_attachments;
        figure.leftover_documents = leftover_documents;
        Ok((figure, profile))
    }

    async fn measure(
        &self,
        operator: &OperatorProcess,
        api: &Api<SessionAccess>,
        grants: Vec<SessionAccess>,
        role: &str,
        profile: bool,
    ) -> anyhow::Result<(OperatorRun, Option<String>)> {
        let count = grants.len();
        let start = self.read(operator).await?;
        let perf = profile
            .then(|| operator.pid())
            .flatten()
            .and_then(|pid| start_perf(self.ws, pid, "operator", CONVERGE_LIMIT));
        let started = Instant::now();
        let ready = tokio::spawn(wait_all_ready(api.clone(), count, started));
        let created = create_all(api, grants).await;
        let ready = ready.await.context("the readiness watch")?;
        let profile = match perf {
            Some(perf) => {
                if let Some(pid) = perf.id() {
                    // perf writes its data and exits on SIGINT.
                    let _ = std::process::Command::new("kill")
                        .args(["-INT", &pid.to_string()])
                        .status();
                }
                report_perf(self.ws, perf, "operator").await
            }
            None => None,
        };
        let create_seconds = created?;
        let ready_seconds = ready?;

        let settled = self.settle(operator, self.resync).await?;
        let apply = start.until(&settled);
        let role_policies = self.role_policies(role).await?;
        // Steady state: every grant reconciled once more by the resync timer.
        let resync_limit = self.resync * 3 + Duration::from_secs(300);
        let deadline = Instant::now() + resync_limit;
        let resynced = loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = self.read(operator).await?;
            if now.reconciles >= settled.reconciles + count as f64 {
                break now;
            }
            if Instant::now() > deadline {
                bail!(
                    "only {} of {count} grants resynced within {resync_limit:?}",
                    now.reconciles - settled.reconciles
                );
            }
        };
        let resync = settled.until(&resynced);

        let before_delete = self.read(operator).await?;
        api.delete_collection(&DeleteParams::default(), &ListParams::default())
            .await
            .context("deleting the grants")?;
        let deadline = Instant::now() + CONVERGE_LIMIT;
        loop {
            let left = api
                .list_metadata(&ListParams::default())
                .await
                .context("listing the grants")?
                .items
                .len();
            if left == 0 {
                break;
            }
            if Instant::now() > deadline {
                bail!("{left} grants still there {CONVERGE_LIMIT:?} after their deletion");
            }
            tokio::time::sleep(POLL).await;
        }
        let deleted = self.read(operator).await?;
        Ok((
            OperatorRun {
                grants: count,
                floor_create_seconds: 0.0,
                create_seconds,
                ready_seconds,
                apply,
                resync,
                delete: before_delete.until(&deleted),
                role_policies,
                leftover_attachments: 0,
                leftover_documents: 0,
            },
            profile,
        ))
    }
}
