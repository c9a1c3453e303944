//! The reconciler's harness against real parts, shared by the operator's real-component tests:
//! a real kube-apiserver + etcd, IAM on moto, SSM on the project's emulator with moto as its
//! upstream. Each harness runs its own controller, in-process on a real client, scoped to its own
//! namespace, with its own metrics (so AWS calls can be counted).

// Each test binary uses part of the harness.
#![allow(dead_code)]

use std::{collections::BTreeSet, future::Future, sync::Arc, time::Duration};

use aws_sdk_iam::error::ProvideErrorMetadata;
use fleet_access_crds::{SessionAccess, fixtures::GrantFixture};
use fleet_access_operator::{
    aws::sdk::SdkAws,
    controller::{Context, reconcile},
    metrics::Metrics,
    model::{desired, identity, naming},
    settings::Settings,
};
use fleet_access_ssm_emulator::{Config, Emulator, InstanceConfig, Mode, Running};
use fleet_access_tests::{ControlPlane, Moto, TestNamespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{
    Api,
    api::{DeleteParams, ListParams, PostParams},
};
use serde_json::{Value, json};
use tokio::sync::oneshot;

pub(crate) const ACCOUNT: &str = "123456789012";
pub(crate) const REGION: &str = "us-east-1";
/// How long a test waits for the controller to converge before failing.
pub(crate) const CONVERGE: Duration = Duration::from_secs(90);

/// Instances of the emulated fleet: IDs, a tag and agent versions.
pub(crate) const FLEET: &[(&str, &str, &str)] = &[
    ("i-0000000000000000a", "staging", "3.3.0.0"),
    ("i-0000000000000000b", "staging", "2.3.500.0"),
    ("i-0000000000000000c", "production", "3.3.0.0"),
    ("i-0000000000000000d", "production", "3.3.0.0"),
    ("i-0000000000000000e", "production", "3.3.0.0"),
    ("i-0000000000000000f", "production", "3.3.0.0"),
    ("i-00000000000000010", "production", "3.3.0.0"),
    ("i-00000000000000011", "production", "3.3.0.0"),
];

/// How often the census of open sessions runs where a test does not count them.
const HOURLY: Duration = Duration::from_secs(3600);

pub(crate) struct Harness {
    pub(crate) namespace: TestNamespace,
    pub(crate) grants: Api<SessionAccess>,
    pub(crate) iam: aws_sdk_iam::Client,
    pub(crate) ssm: aws_sdk_ssm::Client,
    pub(crate) metrics: Metrics,
    pub(crate) settings: Settings,
    pub(crate) stop: Option<oneshot::Sender<()>>,
    pub(crate) controller: Option<tokio::task::JoinHandle<()>>,
    pub(crate) emulator: Running,
}

impl Harness {
    /// A harness on the shared control plane, whose namespaces the single-team boundary
    /// (admitting every valid grant) selects.
    /// A control plane of the test's own, with fleet-access's CRDs: for what is cluster-wide
    /// (admission policies), which other tests must not see.
    pub(crate) async fn own_control_plane() -> ControlPlane {
        let control_plane = ControlPlane::start()
            .await
            .expect("a control plane of its own");
        control_plane
            .install_crds(&fleet_access_crds::crds_yaml())
            .await
            .expect("CRDs");
        control_plane
    }

    pub(crate) async fn start(prefix: &str, resync: Duration) -> Self {
        Self::start_with(prefix, resync, |_| {}).await
    }

    /// A harness on the shared control plane whose operator's settings `tweak` changes.
    pub(crate) async fn start_with(
        prefix: &str,
        resync: Duration,
        tweak: impl FnOnce(&mut Settings),
    ) -> Self {
        let control_plane = ControlPlane::shared()
            .await
            .expect("control plane (run tests/env/setup.sh first)");
        control_plane
            .install_fleet_access(&fleet_access_crds::crds_yaml())
            .await
            .expect("fleet-access's API");
        Self::build(control_plane, prefix, resync, HOURLY, tweak).await
    }

    /// A harness on `control_plane`, which must have the CRDs installed.
    /// A harness whose census of open sessions runs at start only (counting AWS calls stays
    /// about the reconciles).
    pub(crate) async fn start_on(
        control_plane: &ControlPlane,
        prefix: &str,
        resync: Duration,
    ) -> Self {
        Self::counting_sessions(control_plane, prefix, resync, HOURLY).await
    }

    /// A harness whose census of open sessions runs every `census`.
    pub(crate) async fn counting_sessions(
        control_plane: &ControlPlane,
        prefix: &str,
        resync: Duration,
        census: Duration,
    ) -> Self {
        Self::build(control_plane, prefix, resync, census, |_| {}).await
    }

    async fn build(
        control_plane: &ControlPlane,
        prefix: &str,
        resync: Duration,
        census: Duration,
        tweak: impl FnOnce(&mut Settings),
    ) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let namespace = control_plane.namespace(prefix).await.expect("namespace");
        let moto = Moto::shared().await.expect("moto");
        let mut config = Config {
            mode: Mode::Fast,
            upstream: Some(moto.endpoint().to_owned()),
            // Sessions the tests start through the API never connect a data channel: they stay
            // open for the whole test (the agent's minute would race a slow machine), and only
            // the operator ends them.
            reconnect_timeout_ms: 600_000,
            ..Config::default()
        };
        for (id, environment, agent) in FLEET {
            config.instances.push(
                InstanceConfig::new(*id)
                    .with_tag("Environment", *environment)
                    .with_agent_version(*agent),
            );
        }
        let emulator = Emulator::start(config).await.expect("emulator starts");
        let iam_config = moto.sdk_config();
        let ssm_config = fleet_access_tests::moto::sdk_config_for(&emulator.endpoint_url());
        let metrics = Metrics::register(&prometheus::Registry::new()).expect("metrics");
        let aws = Arc::new(SdkAws::with_configs(
            &iam_config,
            &ssm_config,
            metrics.clone(),
        ));
        let mut settings = Settings {
            partition: "aws".into(),
            account: Some(ACCOUNT.into()),
            region: Some(REGION.into()),
            bridge_role: Some(format!("bridge-{}", namespace.name())),
            // Each test's namespace doubles as its bridge namespace.
            bridge_namespace: namespace.name().to_owned(),
            // Each test is a cluster of its own: what the operator shares between a cluster's
            // grants (identity policy sets, Port documents) is then the test's alone, though
            // tests share moto.
            cluster: fleet_access_tests::cluster_of(namespace.name()),
            ..Settings::default()
        };
        tweak(&mut settings);
        let ctx = Arc::new(
            Context::new(
                namespace.client(),
                aws.clone(),
                aws,
                settings.clone(),
                ACCOUNT.into(),
                metrics.clone(),
                resync,
                "test",
            )
            .watching(Some(namespace.name().to_owned()))
            .counting_sessions_every(census),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let controller = tokio::spawn(async move {
            reconcile::run(ctx, async {
                let _ = stopped.await;
            })
            .await;
        });
        Self {
            grants: namespace.api(),
            namespace,
            iam: aws_sdk_iam::Client::new(&iam_config),
            ssm: aws_sdk_ssm::Client::new(&ssm_config),
            metrics,
            settings,
            stop: Some(stop),
            controller: Some(controller),
            emulator,
        }
    }

    /// Deletes grant `name` and waits until it is gone (its cleanup done).
    pub(crate) async fn delete(&self, name: &str) {
        self.grants
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete");
        wait_for(&format!("{name} to go"), || async {
            self.grants
                .get_opt(name)
                .await
                .ok()?
                .is_none()
                .then_some(())
        })
        .await;
    }

    /// An SSM client whose sessions the emulator reports as `owner`'s (DescribeSessions'
    /// `Owner`), as AWS reports the caller.
    pub(crate) fn ssm_as(&self, owner: &str) -> aws_sdk_ssm::Client {
        // An access key ID is the Credential's first field: it holds no '/'.
        let key = format!("AKIA-{}", owner.replace('/', "-"));
        self.emulator.set_session_owner(&key, owner);
        let credentials = aws_sdk_ssm::config::Credentials::new(&key, "secret", None, None, "test");
        let config = (self.ssm.config().to_builder())
            .credentials_provider(credentials)
            .build();
        aws_sdk_ssm::Client::from_conf(config)
    }

    /// Every AWS call so far by operation and outcome, for failure messages.
    pub(crate) fn calls(&self) -> String {
        use prometheus::core::Collector;
        let mut out = String::new();
        for family in self.metrics.aws_calls.collect() {
            for metric in family.get_metric() {
                let labels: Vec<&str> = metric.get_label().iter().map(|l| l.value()).collect();
                out.push_str(&format!("{labels:?}={} ", metric.get_counter().get_value()));
            }
        }
        out
    }

    /// The sessions the operator has terminated so far.
    pub(crate) fn terminated(&self) -> u64 {
        (self.metrics.aws_calls)
            .with_label_values(&["ssm", "TerminateSession", "ok"])
            .get()
    }

    /// Starts an SSH session on `instance` as `owner` (an IAM ARN), whatever IAM says: the
    /// emulator does not evaluate policies. Returns its ID.
    pub(crate) async fn start_session_as(&self, owner: &str, instance: &str) -> String {
        (self.ssm_as(owner).start_session())
            .target(instance)
            .document_name("AWS-StartSSHSession")
            .send()
            .await
            .expect("session starts")
            .session_id()
            .expect("session id")
            .to_owned()
    }

    /// The IDs of the active sessions on `instance`.
    pub(crate) async fn active_sessions(&self, instance: &str) -> BTreeSet<String> {
        let out = (self.ssm.describe_sessions())
            .state(aws_sdk_ssm::types::SessionState::Active)
            .send()
            .await
            .expect("DescribeSessions");
        (out.sessions().iter())
            .filter(|s| s.target() == Some(instance))
            .filter_map(|s| s.session_id().map(str::to_owned))
            .collect()
    }

    /// A name unique in the (shared) IAM account.
    pub(crate) fn unique(&self, what: &str) -> String {
        format!("{what}-{}", self.namespace.name())
    }

    pub(crate) async fn user(&self, name: &str) {
        self.iam
            .create_user()
            .user_name(name)
            .send()
            .await
            .expect("user");
    }

    pub(crate) async fn role(&self, name: &str) {
        let trust = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
            "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]});
        self.iam
            .create_role()
            .role_name(name)
            .assume_role_policy_document(trust.to_string())
            .send()
            .await
            .expect("role");
    }

    pub(crate) async fn group(&self, name: &str) {
        self.iam
            .create_group()
            .group_name(name)
            .send()
            .await
            .expect("group");
    }

    /// Grant `name` of this test's namespace, to be said what it grants.
    pub(crate) fn grant(&self, name: &str) -> GrantFixture {
        GrantFixture::new(self.namespace.name(), name)
    }

    /// Creates grant `name` whose spec is `spec`.
    pub(crate) async fn create(&self, name: &str, spec: Value) -> SessionAccess {
        self.grants
            .create(
                &PostParams::default(),
                &self.grant(name).spec_json(spec).build(),
            )
            .await
            .expect("created")
    }

    pub(crate) async fn set_spec(&self, name: &str, spec: Value) {
        let mut current = self.grants.get(name).await.expect("get");
        current.spec = serde_json::from_value(spec).expect("spec");
        current.status = None;
        self.grants
            .replace(name, &PostParams::default(), &current)
            .await
            .expect("replaced");
    }

    /// The ARN of the first policy of an identity's set: `identity` is `user/<name>`,
    /// `role/<name>` or `group/<name>`.
    pub(crate) fn set_arn(&self, identity: &str) -> String {
        let (kind, name) = identity.split_once('/').expect("kind/name");
        format!(
            "arn:aws:iam::{ACCOUNT}:policy{}{}",
            naming::POLICY_PATH,
            naming::identity_policy_name(&self.settings.cluster, kind, name, "")
        )
    }

    /// Waits until the grant's current generation is observed with `condition` = `status`.
    pub(crate) async fn wait_condition(
        &self,
        name: &str,
        condition: &str,
        status: &str,
    ) -> SessionAccess {
        wait_for(&format!("{name} {condition}={status}"), || async {
            let grant = self.grants.get(name).await.ok()?;
            let observed = grant.status.as_ref()?.observed_generation;
            (observed == grant.metadata.generation
                && find(&grant, condition).is_some_and(|c| c.status == status))
            .then_some(grant)
        })
        .await
    }

    /// Waits until there are `count` grants, each with its current generation Ready.
    pub(crate) async fn wait_all_ready(&self, count: usize) {
        wait_for(&format!("{count} grants Ready"), || async {
            let list = self.grants.list(&ListParams::default()).await.ok()?;
            (list.items.len() == count
                && list.items.iter().all(|g| {
                    g.status.as_ref().is_some_and(|s| {
                        s.observed_generation == g.metadata.generation
                            && s.conditions
                                .iter()
                                .any(|c| c.type_ == "Ready" && c.status == "True")
                    })
                }))
            .then_some(())
        })
        .await;
    }

    pub(crate) async fn attachments(&self, arn: &str) -> BTreeSet<String> {
        let out = self
            .iam
            .list_entities_for_policy()
            .policy_arn(arn)
            .send()
            .await
            .expect("entities");
        let mut all = BTreeSet::new();
        all.extend(
            out.policy_users()
                .iter()
                .filter_map(|u| u.user_name())
                .map(|n| format!("user/{n}")),
        );
        all.extend(
            out.policy_roles()
                .iter()
                .filter_map(|r| r.role_name())
                .map(|n| format!("role/{n}")),
        );
        all.extend(
            out.policy_groups()
                .iter()
                .filter_map(|g| g.group_name())
                .map(|n| format!("group/{n}")),
        );
        all
    }

    /// The default version's document and the number of versions; `None` when the policy does
    /// not exist, or stops existing while it is read (the operator may be deleting it).
    pub(crate) async fn policy_document(&self, arn: &str) -> Option<(String, usize)> {
        fn gone<T, E: ProvideErrorMetadata + std::fmt::Debug>(
            result: Result<T, E>,
            what: &str,
        ) -> Option<T> {
            match result {
                Err(e) if e.code() == Some("NoSuchEntity") => None,
                other => Some(other.expect(what)),
            }
        }
        let policy = gone(
            self.iam.get_policy().policy_arn(arn).send().await,
            "GetPolicy",
        )?;
        let version = policy
            .policy()?
            .default_version_id()
            .expect("default version");
        let document = gone(
            (self.iam.get_policy_version().policy_arn(arn))
                .version_id(version)
                .send()
                .await,
            "GetPolicyVersion",
        )?;
        let versions = gone(
            self.iam.list_policy_versions().policy_arn(arn).send().await,
            "ListPolicyVersions",
        )?;
        Some((
            document
                .policy_version()
                .and_then(|v| v.document())
                .expect("document")
                .to_owned(),
            versions.versions().len(),
        ))
    }

    /// The document of the first policy of the grant's first identity's set when the grant is
    /// the set's only one, rendered by the pure code.
    pub(crate) fn expected_document(&self, grant: &SessionAccess) -> String {
        let desired = desired::compute(grant, &self.settings).expect("desired");
        let sets = identity::policy_sets(&[desired], &self.settings.cluster, 10).expect("sets");
        let (_, set) = sets.into_iter().next().expect("an identity");
        set.policies[0].document.0.to_json()
    }

    pub(crate) async fn document_exists(&self, name: &str) -> bool {
        get_document_if_exists(self.ssm.get_document().name(name))
            .await
            .is_some()
    }

    /// The content of a document's default version, as JSON, or `None` when it does not exist.
    pub(crate) async fn document_content(&self, name: &str) -> Option<Value> {
        let out = get_document_if_exists(self.ssm.get_document().name(name)).await?;
        Some(serde_json::from_str(out.content().expect("content")).expect("JSON content"))
    }

    /// Creates a Session document directly in SSM (moto), with the owner tag naming `owner` if
    /// given.
    pub(crate) async fn create_document(&self, name: &str, content: &Value, owner: Option<&str>) {
        let tags = owner.map(|owner| {
            vec![
                aws_sdk_ssm::types::Tag::builder()
                    .key(naming::OWNER_TAG)
                    .value(owner)
                    .build()
                    .expect("tag"),
            ]
        });
        self.ssm
            .create_document()
            .name(name)
            .content(content.to_string())
            .document_type(aws_sdk_ssm::types::DocumentType::Session)
            .document_format(aws_sdk_ssm::types::DocumentFormat::Json)
            .set_tags(tags)
            .send()
            .await
            .expect("document created");
    }

    /// The document names the grant's spec derives, with their rendered content.
    pub(crate) fn derived_documents(&self, grant: &SessionAccess) -> Vec<(String, Value)> {
        desired::session_documents(grant, &self.settings.cluster)
            .into_iter()
            .map(|d| (d.name, d.content))
            .collect()
    }

    /// Documents carrying the owner tag of any grant of this test's namespace, through a full
    /// listing (moto ignores ListDocuments' tag filter, so every document is checked here).
    pub(crate) async fn documents_tagged_in_namespace(&self) -> Vec<String> {
        let prefix = format!("{}/", self.namespace.name());
        let mut found = Vec::new();
        let mut token = None;
        loop {
            let out = self
                .ssm
                .list_documents()
                .max_results(50)
                .set_next_token(token)
                .send()
                .await
                .expect("ListDocuments");
            found.extend(
                out.document_identifiers()
                    .iter()
                    .filter(|d| {
                        d.tags()
                            .iter()
                            .any(|t| t.key() == naming::OWNER_TAG && t.value().starts_with(&prefix))
                    })
                    .filter_map(|d| d.name().map(str::to_owned)),
            );
            token = out
                .next_token()
                .filter(|t| !t.is_empty())
                .map(str::to_owned);
            if token.is_none() {
                return found;
            }
        }
    }

    /// The operator's policies of this test's identities (their names end in the namespace,
    /// see [`Self::unique`]) or of its grants, from every page of the listing (moto holds the
    /// policies of every test of the run).
    pub(crate) async fn policies_in_namespace(&self) -> Vec<String> {
        let prefix =
            naming::grant_object_name(&self.settings.cluster, self.namespace.name(), "", "");
        let identity = format!("-{}", self.namespace.name());
        let listed = fleet_access_tests::moto::policies_under(&self.iam, naming::POLICY_PATH)
            .await
            .expect("ListPolicies");
        listed
            .iter()
            .filter_map(|p| p.policy_name())
            .filter(|name| {
                name.starts_with(&prefix)
                    || (naming::is_identity_policy_name(name) && name.ends_with(&identity))
            })
            .map(str::to_owned)
            .collect()
    }

    /// The Events published about grant `name`, in this namespace.
    pub(crate) async fn events_about(
        &self,
        name: &str,
    ) -> Vec<k8s_openapi::api::events::v1::Event> {
        let events: Api<k8s_openapi::api::events::v1::Event> = self.namespace.api();
        let list = events.list(&ListParams::default()).await.expect("Events");
        (list.items.into_iter())
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .collect()
    }

    pub(crate) async fn stop(mut self) {
        if let (Some(stop), Some(controller)) = (self.stop.take(), self.controller.take()) {
            stop_controller(stop, controller).await;
        }
    }
}

/// `kubectl apply -f -` of `yaml` (JSON is YAML) with `kubeconfig` (the admin's when `None`):
/// its stdout, or its stderr as the error.
pub(crate) async fn kubectl_apply(
    control_plane: &ControlPlane,
    kubeconfig: Option<&std::path::Path>,
    yaml: &str,
    extra: &[&str],
) -> Result<String, String> {
    use tokio::io::AsyncWriteExt;
    let command = match kubeconfig {
        Some(path) => control_plane.kubectl_with(path),
        None => control_plane.kubectl(),
    };
    let mut command = tokio::process::Command::from(command.expect("kubectl"));
    command.args(["apply", "-f", "-"]).args(extra);
    command.stdin(std::process::Stdio::piped());
    command.stdout(std::process::Stdio::piped());
    command.stderr(std::process::Stdio::piped());
    command.kill_on_drop(true);
    let mut child = command.spawn().expect("kubectl runs");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(yaml.as_bytes())
        .await
        .expect("kubectl reads");
    drop(stdin);
    let output = child.wait_with_output().await.expect("kubectl ends");
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    match output.status.success() {
        true => Ok(text(&output.stdout)),
        false => Err(text(&output.stderr)),
    }
}

/// Asks a controller to stop and waits until it has: one that does not stop, or that panicked,
/// fails the test.
pub(crate) async fn stop_controller(
    stop: oneshot::Sender<()>,
    controller: tokio::task::JoinHandle<()>,
) {
    // A failed send means that the controller has ended already: its join says how.
    let _ = stop.send(());
    tokio::time::timeout(CONVERGE, controller)
        .await
        .expect("the controller stops")
        .expect("the controller ran without panicking");
}

/// The document `request` asks for, or `None` when SSM answers that it does not exist
/// (`InvalidDocument`); any other error fails the test instead of passing for "absent".
pub(crate) async fn get_document_if_exists(
    request: aws_sdk_ssm::operation::get_document::builders::GetDocumentFluentBuilder,
) -> Option<aws_sdk_ssm::operation::get_document::GetDocumentOutput> {
    match request.send().await {
        Err(error) if error.code() == Some("InvalidDocument") => None,
        other => Some(other.expect("GetDocument answers, or says InvalidDocument")),
    }
}

pub(crate) fn find<'a>(grant: &'a SessionAccess, type_: &str) -> Option<&'a Condition> {
    grant
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

pub(crate) async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + CONVERGE;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {} s",
            CONVERGE.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
