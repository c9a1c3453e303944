//! A real Kubernetes control plane for tests: etcd and kube-apiserver (built by
//! `tests/env/build-kube.sh`) on free loopback ports, with generated certificates and a
//! kubeconfig. One control plane serves a whole test run; each test works in its own
//! namespace ([`ControlPlane::namespace`]).
//!
//! Like envtest, there is no controller-manager or scheduler: no Pods run, deleted
//! namespaces stay `Terminating`, owner references are not garbage-collected.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::GroupVersionKind;
use kube::discovery::{self, Scope};
use kube::{Client, Config};
use tempfile::TempDir;

use crate::certificates::ControlPlaneCertificates;
use crate::error::{FixtureError, FixtureResult};
use crate::locations::{Locations, require_program};
use crate::process::{
    SupervisedProcess, accepts_connections, free_loopback_port, loopback, retry_on_port_clash,
};

/// The boundary that admits every valid grant in every namespace.
pub const SINGLE_TEAM_BOUNDARY: &str =
    include_str!("../../deploy/examples/boundary-single-team.yaml");

/// When set, [`ControlPlane::shared`] uses the control plane this kubeconfig points to
/// (set by `tests/env/with-services.sh`) instead of starting one.
pub const KUBECONFIG_ENV: &str = "FLEET_ACCESS_KUBECONFIG";
/// The field manager of [`ControlPlane::apply_yaml`].
pub const FIELD_MANAGER: &str = "fleet-access-tests";

const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(60);
const APISERVER_READY_TIMEOUT: Duration = Duration::from_secs(180);
const CLUSTER_NAME: &str = "fleet-access-test";

/// A running (or externally provided) control plane.
#[derive(Debug)]
pub struct ControlPlane {
    kubeconfig_path: PathBuf,
    server_url: String,
    // Declared in stop order: the API server before etcd, the folder last.
    processes: Option<OwnedProcesses>,
}

#[derive(Debug)]
struct OwnedProcesses {
    apiserver: Mutex<SupervisedProcess>,
    etcd: Mutex<SupervisedProcess>,
    dir: TempDir,
}

impl ControlPlane {
    /// The control plane shared by every test of this process: the one named by
    /// `FLEET_ACCESS_KUBECONFIG` when set, otherwise one started on first use and
    /// stopped when the process ends (by the supervisor).
    pub async fn shared() -> FixtureResult<&'static Self> {
        static SHARED: tokio::sync::OnceCell<ControlPlane> = tokio::sync::OnceCell::const_new();
        SHARED
            .get_or_try_init(|| async {
                match std::env::var_os(KUBECONFIG_ENV) {
                    Some(path) if !path.is_empty() => Self::external(PathBuf::from(path)),
                    _ => Self::start().await,
                }
            })
            .await
    }

    /// Uses an already running control plane through its kubeconfig.
    pub fn external(kubeconfig_path: PathBuf) -> FixtureResult<Self> {
        let kubeconfig = Kubeconfig::read_from(&kubeconfig_path)?;
        let server_url = kubeconfig
            .clusters
            .first()
            .and_then(|named| named.cluster.as_ref())
            .and_then(|cluster| cluster.server.clone())
            .ok_or_else(|| FixtureError::UnexpectedAnswer {
                component: kubeconfig_path.display().to_string(),
                detail: "no cluster server in the kubeconfig".into(),
            })?;
        Ok(Self {
            kubeconfig_path,
            server_url,
            processes: None,
        })
    }

    /// Starts a new etcd and kube-apiserver, owned by the returned value (stopped on
    /// drop), and waits until `/readyz` answers ok.
    pub async fn start() -> FixtureResult<Self> {
        retry_on_port_clash(Self::start_once).await
    }

    async fn start_once() -> FixtureResult<Self> {
        let locations = Locations::get()?;
        let apiserver_bin = require_program("kube-apiserver", &locations.kube_apiserver)?;
        let etcd_bin = require_program("etcd", &locations.etcd)?;
        let dir = tempfile::Builder::new()
            .prefix("fleet-access-kube-")
            .tempdir()
            .map_err(FixtureError::io("creating the control plane folder"))?;
        let files = ControlPlaneFiles::write(dir.path(), &ControlPlaneCertificates::generate()?)?;

        let etcd_port = free_loopback_port()?;
        let etcd_peer_port = free_loopback_port()?;
        let mut etcd = Command::new(&etcd_bin);
        etcd.args(etcd_args(dir.path(), etcd_port, etcd_peer_port));
        // etcd stops last: its supervisor removes the folder (certificates, data, logs).
        let mut etcd = SupervisedProcess::spawn_removing_dir(
            "etcd",
            &etcd,
            &dir.path().join("etcd.log"),
            dir.path(),
        )?;
        etcd.wait_until(ETCD_READY_TIMEOUT, || {
            accepts_connections(loopback(etcd_port))
        })
        .await?;

        let apiserver_port = free_loopback_port()?;
        let mut apiserver = Command::new(&apiserver_bin);
        apiserver.args(apiserver_args(&files, etcd_port, apiserver_port));
        let mut apiserver = SupervisedProcess::spawn(
            "kube-apiserver",
            &apiserver,
            &dir.path().join("kube-apiserver.log"),
        )?;
        let server_url = format!("https://127.0.0.1:{apiserver_port}");
        let kubeconfig_path = dir.path().join("kubeconfig");
        let kubeconfig = render_kubeconfig(&server_url, &files)?;
        std::fs::write(&kubeconfig_path, kubeconfig)
            .map_err(FixtureError::io("writing the kubeconfig"))?;

        let client = client_from_kubeconfig(&kubeconfig_path).await?;
        apiserver
            .wait_until(APISERVER_READY_TIMEOUT, || is_ready(&client))
            .await?;
        Ok(Self {
            kubeconfig_path,
            server_url,
            processes: Some(OwnedProcesses {
                apiserver: Mutex::new(apiserver),
                etcd: Mutex::new(etcd),
                dir,
            }),
        })
    }

    /// The kubeconfig (admin client certificate) for kube-rs, kubectl or the operator.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// The API server's URL (`https://127.0.0.1:<port>`).
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// The folder with the certificates, kubeconfig and logs, when this value started
    /// the control plane.
    pub fn dir(&self) -> Option<&Path> {
        self.processes.as_ref().map(|owned| owned.dir.path())
    }

    /// A new client with admin rights. Build one per test: a client is tied to the
    /// tokio runtime it was first used in.
    pub async fn client(&self) -> FixtureResult<Client> {
        client_from_kubeconfig(&self.kubeconfig_path).await
    }

    /// Creates a namespace with a unique name starting with `prefix`.
    pub async fn namespace(&self, prefix: &str) -> FixtureResult<TestNamespace> {
        let client = self.client().await?;
        let name = namespace_name(prefix, &uuid::Uuid::new_v4().simple().to_string());
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([("fleet-access.io/test".to_owned(), "true".to_owned())].into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await?;
        Ok(TestNamespace { name, client })
    }

    /// A `kubectl` command (the version built with the API server) using this control
    /// plane's kubeconfig.
    pub fn kubectl(&self) -> FixtureResult<Command> {
        let kubectl = require_program("kubectl", &Locations::get()?.kubectl)?;
        let mut command = Command::new(kubectl);
        command.env("KUBECONFIG", &self.kubeconfig_path);
        Ok(command)
    }

    /// A `kubectl` command that authenticates with `kubeconfig` instead (see
    /// [`ControlPlane::service_account_kubeconfig`]).
    pub fn kubectl_with(&self, kubeconfig: &Path) -> FixtureResult<Command> {
        let mut command = self.kubectl()?;
        command.env("KUBECONFIG", kubeconfig);
        Ok(command)
    }

    /// Runs kubectl with `args`; returns its stdout, or its stderr as the error.
    pub fn run_kubectl<I, S>(&self, args: I) -> FixtureResult<String>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let mut command = self.kubectl()?;
        command.args(args.into_iter().map(Into::into));
        let output = crate::process::run_command(&mut command)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Writes a kubeconfig to `path` that authenticates as the ServiceAccount `namespace/name`
    /// with a token from the TokenRequest API (`kubectl create token`, valid `valid_for`), for
    /// a program that must run with that account's RBAC rather than as admin.
    pub fn service_account_kubeconfig(
        &self,
        namespace: &str,
        name: &str,
        valid_for: Duration,
        path: &Path,
    ) -> FixtureResult<()> {
        let token = self.run_kubectl([
            "create",
            "token",
            name,
            "--namespace",
            namespace,
            &format!("--duration={}s", valid_for.as_secs()),
        ])?;
        let admin = std::fs::read_to_string(&self.kubeconfig_path)
            .map_err(FixtureError::io("reading the admin kubeconfig"))?;
        let mut config: serde_json::Value = serde_yaml::from_str(&admin)?;
        let user = format!("system:serviceaccount:{namespace}:{name}");
        config["users"] = serde_json::json!([{"name": user, "user": {"token": token.trim()}}]);
        let Some(context) = config["contexts"]
            .as_array_mut()
            .and_then(|contexts| contexts.first_mut())
        else {
            return Err(FixtureError::UnexpectedAnswer {
                component: "kubeconfig".into(),
                detail: format!("{} has no context", self.kubeconfig_path.display()),
            });
        };
        context["context"]["user"] = user.into();
        std::fs::write(path, serde_yaml::to_string(&config)?)
            .map_err(FixtureError::io(format!("writing {}", path.display())))
    }

    /// A client that authenticates as the ServiceAccount `namespace/name` (a token valid for
    /// an hour), for code that must run with that account's RBAC rather than as admin.
    pub async fn service_account_client(
        &self,
        namespace: &str,
        name: &str,
    ) -> FixtureResult<Client> {
        let dir = tempfile::tempdir().map_err(FixtureError::io("a temporary directory"))?;
        let path = dir.path().join("kubeconfig");
        self.service_account_kubeconfig(namespace, name, Duration::from_secs(3600), &path)?;
        client_from_kubeconfig(&path).await
    }

    /// Server-side applies every document of a (multi-document) YAML text, resolving
    /// each kind through discovery. Namespaced objects without a namespace go to
    /// `default_namespace`. Returns the objects as stored.
    pub async fn apply_yaml(
        &self,
        yaml: &str,
        default_namespace: Option<&str>,
    ) -> FixtureResult<Vec<DynamicObject>> {
        let client = self.client().await?;
        let mut applied = Vec::new();
        for object in parse_yaml_documents(yaml)? {
            applied.push(apply_object(&client, object, default_namespace).await?);
        }
        Ok(applied)
    }

    /// Applies a YAML file (see [`ControlPlane::apply_yaml`]).
    pub async fn apply_yaml_file(
        &self,
        path: &Path,
        default_namespace: Option<&str>,
    ) -> FixtureResult<Vec<DynamicObject>> {
        let yaml = std::fs::read_to_string(path)
            .map_err(FixtureError::io(format!("reading {}", path.display())))?;
        self.apply_yaml(&yaml, default_namespace).await
    }

    /// Installs the fleet-access API from `crds_yaml` (the CRDs, as
    /// `fleet_access_crds::crds_yaml` prints them), waits until every CRD is established, and
    /// applies the single-team boundary (`deploy/examples/boundary-single-team.yaml`), which
    /// admits every valid grant: without a boundary the operator refuses every grant. Tests of
    /// narrower boundaries add their own; a grant must fit every boundary of its namespace.
    pub async fn install_fleet_access(&self, crds_yaml: &str) -> FixtureResult<()> {
        self.install_crds(crds_yaml).await?;
        self.apply_yaml(SINGLE_TEAM_BOUNDARY, None).await?;
        Ok(())
    }

    /// Applies the CRDs of `crds_yaml` and waits until every one is established.
    pub async fn install_crds(&self, crds_yaml: &str) -> FixtureResult<()> {
        for crd in self.apply_yaml(crds_yaml, None).await? {
            let name = crd.metadata.name.unwrap_or_default();
            self.wait_for_crd_established(&name, Duration::from_secs(30))
                .await?;
        }
        Ok(())
    }

    /// Waits until the CustomResourceDefinition `name` is `Established`, so that its
    /// custom resources can be created.
    pub async fn wait_for_crd_established(
        &self,
        name: &str,
        timeout: Duration,
    ) -> FixtureResult<()> {
        let api = Api::<CustomResourceDefinition>::all(self.client().await?);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(crd) = api.get_opt(name).await?
                && is_established(&crd)
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(FixtureError::NotReady {
                    name: format!("CustomResourceDefinition {name}"),
                    seconds: timeout.as_secs(),
                    log_tail: String::new(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the processes this value started (no-op for an external control plane).
    pub fn stop(&self) {
        if let Some(owned) = &self.processes {
            for process in [&owned.apiserver, &owned.etcd] {
                if let Ok(mut process) = process.lock() {
                    process.stop();
                }
            }
        }
    }
}

/// A namespace created for one test.
#[derive(Clone)]
pub struct TestNamespace {
    name: String,
    client: Client,
}

impl std::fmt::Debug for TestNamespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestNamespace")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl TestNamespace {
    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The client that created it.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// An API for namespaced resources of type `K` in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// A pod of this namespace with `labels`, running with service account `account` (created
    /// here) at `address`: the test API server runs no kubelet, so this writes the status a
    /// kubelet would. What the bridge resolves a client connection from `address` to.
    pub async fn running_pod(
        &self,
        name: &str,
        account: &str,
        address: std::net::IpAddr,
        labels: serde_json::Value,
    ) -> Result<(), kube::Error> {
        use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
        let service_account = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(account.to_owned()),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        };
        match (self.api::<ServiceAccount>())
            .create(&PostParams::default(), &service_account)
            .await
        {
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            other => drop(other?),
        }
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "serviceAccountName": account,
                "automountServiceAccountToken": false,
                "containers": [{"name": "client", "image": "client"}]
            }
        }))
        .map_err(kube::Error::SerdeError)?;
        let pods = self.api::<Pod>();
        pods.create(&PostParams::default(), &pod).await?;
        let status = serde_json::json!({"status": {"phase": "Running", "podIP": address.to_string(),
            "podIPs": [{"ip": address.to_string()}]}});
        pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        Ok(())
    }
}

/// Paths of the files a started control plane uses.
#[derive(Debug, Clone)]
struct ControlPlaneFiles {
    ca_cert: PathBuf,
    serving_cert: PathBuf,
    serving_key: PathBuf,
    admin_cert: PathBuf,
    admin_key: PathBuf,
    service_account_key: PathBuf,
    service_account_public_key: PathBuf,
}

impl ControlPlaneFiles {
    fn write(dir: &Path, certs: &ControlPlaneCertificates) -> FixtureResult<Self> {
        let files = Self {
            ca_cert: dir.join("ca.crt"),
            serving_cert: dir.join("apiserver.crt"),
            serving_key: dir.join("apiserver.key"),
            admin_cert: dir.join("admin.crt"),
            admin_key: dir.join("admin.key"),
            service_account_key: dir.join("service-account.key"),
            service_account_public_key: dir.join("service-account.pub"),
        };
        for (path, pem) in [
            (&files.ca_cert, &certs.ca_cert_pem),
            (&files.serving_cert, &certs.serving_cert_pem),
            (&files.serving_key, &certs.serving_key_pem),
            (&files.admin_cert, &certs.admin_cert_pem),
            (&files.admin_key, &certs.admin_key_pem),
            (&files.service_account_key, &certs.service_account_key_pem),
            (
                &files.service_account_public_key,
                &certs.service_account_public_key_pem,
            ),
        ] {
            std::fs::write(path, pem)
                .map_err(FixtureError::io(format!("writing {}", path.display())))?;
        }
        Ok(files)
    }
}

fn etcd_args(dir: &Path, client_port: u16, peer_port: u16) -> Vec<String> {
    let client_url = format!("http://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    vec![
        "--name=test".into(),
        format!("--data-dir={}", dir.join("etcd-data").display()),
        format!("--listen-client-urls={client_url}"),
        format!("--advertise-client-urls={client_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster=test={peer_url}"),
        "--unsafe-no-fsync=true".into(),
        "--log-level=warn".into(),
    ]
}

fn apiserver_args(files: &ControlPlaneFiles, etcd_port: u16, port: u16) -> Vec<String> {
    vec![
        format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
        "--bind-address=127.0.0.1".into(),
        "--advertise-address=127.0.0.1".into(),
        format!("--secure-port={port}"),
        format!("--tls-cert-file={}", files.serving_cert.display()),
        format!("--tls-private-key-file={}", files.serving_key.display()),
        format!("--client-ca-file={}", files.ca_cert.display()),
        format!("--service-account-issuer=https://127.0.0.1:{port}"),
        format!(
            "--service-account-key-file={}",
            files.service_account_public_key.display()
        ),
        format!(
            "--service-account-signing-key-file={}",
            files.service_account_key.display()
        ),
        "--service-cluster-ip-range=10.0.0.0/24".into(),
        "--authorization-mode=RBAC".into(),
        "--disable-admission-plugins=ServiceAccount".into(),
        "--allow-privileged=true".into(),
        "--v=1".into(),
    ]
}

/// The kubeconfig text for `server_url` with the admin client certificate.
fn render_kubeconfig(server_url: &str, files: &ControlPlaneFiles) -> FixtureResult<String> {
    let value = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": CLUSTER_NAME,
            "cluster": {
                "server": server_url,
                "certificate-authority": files.ca_cert,
            },
        }],
        "users": [{
            "name": crate::certificates::ADMIN_USER,
            "user": {
                "client-certificate": files.admin_cert,
                "client-key": files.admin_key,
            },
        }],
        "contexts": [{
            "name": CLUSTER_NAME,
            "context": {"cluster": CLUSTER_NAME, "user": crate::certificates::ADMIN_USER},
        }],
        "current-context": CLUSTER_NAME,
    });
    Ok(serde_yaml::to_string(&value)?)
}

/// Selects rustls' ring provider for the process (once), unless one is already set:
/// the dependency graph enables both ring and aws-lc-rs, and then rustls cannot
/// choose by itself.
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another thread installing one is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

async fn client_from_kubeconfig(path: &Path) -> FixtureResult<Client> {
    install_crypto_provider();
    let kubeconfig = Kubeconfig::read_from(path)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

async fn is_ready(client: &Client) -> bool {
    let Ok(request) = http::Request::get("/readyz").body(Vec::new()) else {
        return false;
    };
    matches!(client.request_text(request).await, Ok(body) if body.trim() == "ok")
}

fn is_established(crd: &CustomResourceDefinition) -> bool {
    crd.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        })
}

/// A DNS-label namespace name: `prefix` made lowercase alphanumeric-and-dash, then a
/// dash and the first characters of `unique`, at most 63 characters.
pub fn namespace_name(prefix: &str, unique: &str) -> String {
    let mut cleaned: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    cleaned = cleaned.trim_matches('-').to_owned();
    if cleaned.is_empty() {
        cleaned.push_str("test");
    }
    cleaned.truncate(50);
    let cleaned = cleaned.trim_end_matches('-');
    let suffix: String = unique
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .take(12)
        .collect();
    format!("{cleaned}-{suffix}")
}

/// Parses every non-empty document of a YAML text into a dynamic object.
pub fn parse_yaml_documents(yaml: &str) -> FixtureResult<Vec<DynamicObject>> {
    use serde::Deserialize;
    let mut objects = Vec::new();
    for document in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_yaml::Value::deserialize(document)?;
        if value.is_null() {
            continue;
        }
        objects.push(serde_yaml::from_value(value)?);
    }
    Ok(objects)
}

async fn apply_object(
    client: &Client,
    object: DynamicObject,
    default_namespace: Option<&str>,
) -> FixtureResult<DynamicObject> {
    let types = object
        .types
        .as_ref()
        .ok_or_else(|| FixtureError::UnexpectedAnswer {
            component: "YAML document".into(),
            detail: "no apiVersion/kind".into(),
        })?;
    let gvk =
        GroupVersionKind::try_from(types).map_err(|error| FixtureError::UnexpectedAnswer {
            component: "YAML document".into(),
            detail: error.to_string(),
        })?;
    let name = object
        .metadata
        .name
        .clone()
        .ok_or_else(|| FixtureError::UnexpectedAnswer {
            component: "YAML document".into(),
            detail: format!("{} without metadata.name", gvk.kind),
        })?;
    let (resource, capabilities) = discovery::pinned_kind(client, &gvk).await?;
    let api: Api<DynamicObject> = if capabilities.scope == Scope::Namespaced {
        let namespace = object
            .metadata
            .namespace
            .as_deref()
            .or(default_namespace)
            .unwrap_or("default");
        Api::namespaced_with(client.clone(), namespace, &resource)
    } else {
        Api::all_with(client.clone(), &resource)
    };
    let params = PatchParams::apply(FIELD_MANAGER).force();
    Ok(api.patch(&name, &params, &Patch::Apply(&object)).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_names_are_dns_labels() {
        assert_eq!(
            namespace_name("CRD_install test", "ABCdef0123456789"),
            "crd-install-test-abcdef012345"
        );
        let long = namespace_name(&"x".repeat(100), "0123456789abcdef");
        assert!(long.len() <= 63, "{long}");
        assert!(long.ends_with("-0123456789ab"));
        assert_eq!(namespace_name("--", "1"), "test-1");
    }

    #[test]
    fn parses_multi_document_yaml() {
        let yaml = "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n---\n\
            ---\napiVersion: fleetaccess.io/v1alpha1\nkind: SessionAccess\nmetadata:\n  name: b\n  namespace: n\n";
        let objects = parse_yaml_documents(yaml).expect("parses");
        assert_eq!(objects.len(), 2);
        assert_eq!(objects[0].metadata.name.as_deref(), Some("a"));
        assert_eq!(
            objects[1].types.as_ref().map(|t| t.kind.as_str()),
            Some("SessionAccess")
        );
        assert_eq!(objects[1].metadata.namespace.as_deref(), Some("n"));
    }

    #[test]
    fn kubeconfig_names_the_server_and_admin_certificate() {
        let dir = Path::new("/tmp/x");
        let files = ControlPlaneFiles {
            ca_cert: dir.join("ca.crt"),
            serving_cert: dir.join("s.crt"),
            serving_key: dir.join("s.key"),
            admin_cert: dir.join("admin.crt"),
            admin_key: dir.join("admin.key"),
            service_account_key: dir.join("sa.key"),
            service_account_public_key: dir.join("sa.pub"),
        };
        let text = render_kubeconfig("https://127.0.0.1:6443", &files).expect("renders");
        let parsed: Kubeconfig = serde_yaml::from_str(&text).expect("valid kubeconfig");
        let cluster = parsed.clusters[0].cluster.as_ref().expect("cluster");
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:6443"));
        assert_eq!(
            cluster.certificate_authority.as_deref(),
            Some("/tmp/x/ca.crt")
        );
        let user = parsed.auth_infos[0].auth_info.as_ref().expect("user");
        assert_eq!(user.client_certificate.as_deref(), Some("/tmp/x/admin.crt"));
        assert_eq!(parsed.current_context.as_deref(), Some(CLUSTER_NAME));
    }

    #[test]
    fn apiserver_listens_on_loopback_only() {
        let files = ControlPlaneFiles {
            ca_cert: "ca".into(),
            serving_cert: "s".into(),
            serving_key: "k".into(),
            admin_cert: "a".into(),
            admin_key: "b".into(),
            service_account_key: "c".into(),
            service_account_public_key: "d".into(),
        };
        let args = apiserver_args(&files, 2379, 6443);
        assert!(args.contains(&"--bind-address=127.0.0.1".to_owned()));
        assert!(args.contains(&"--etcd-servers=http://127.0.0.1:2379".to_owned()));
        let etcd = etcd_args(Path::new("/d"), 1, 2);
        assert!(
            etcd.iter()
                .filter(|a| a.contains("-urls="))
                .all(|a| a.contains("127.0.0.1"))
        );
    }
}
