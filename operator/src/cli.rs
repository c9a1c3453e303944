//! The command line: `plan` (offline: what a grant would apply) and `crds` (the CRD YAML).

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::{
    Error, Result,
    model::{approval, boundary, desired, desired::NAMESPACE_NAME_LABEL, identity, report},
    settings::Settings,
};

/// Reconcile SessionAccess grants into AWS Session Manager access.
#[derive(Parser, Debug)]
#[command(name = "fleet-access-operator", version, about)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print, offline, everything a grant would apply: policies, attachments, documents, endpoints.
    Plan(PlanArgs),
    /// Print the CustomResourceDefinitions as YAML.
    Crds,
    /// Run the controller: reconcile every SessionAccess in the cluster (kubeconfig or
    /// in-cluster credentials; AWS from the usual environment).
    Run(RunArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    aws: AwsArgs,
    /// Seconds between drift checks of a synced grant.
    #[arg(long, env = "FLEET_ACCESS_RESYNC_SECONDS", default_value_t = 300)]
    resync_seconds: u64,
    /// Seconds between counts of the sessions open through each grant (status.openSessions):
    /// one DescribeSessions listing of the account each time.
    #[arg(long, env = "FLEET_ACCESS_SESSIONS_CENSUS_SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    sessions_census_seconds: u64,
    /// Address of /metrics, /healthz and /readyz; with port 0 the system picks a free port. The
    /// address bound is printed on standard error: `admin listening on ADDRESS`.
    #[arg(
        long,
        env = "FLEET_ACCESS_ADMIN_ADDRESS",
        default_value = "0.0.0.0:8080"
    )]
    admin_address: String,
    /// This replica's name in the leader Lease and in Events (the pod name in a cluster); it
    /// must differ between replicas. Default: `fleet-access-operator-<process id>`.
    #[arg(long, env = "POD_NAME")]
    replica: Option<String>,
    /// Reconcile grants of this namespace only (default: every namespace). Operators that
    /// watch different namespaces of an account must have different --cluster-name values: each
    /// removes its cluster's policy sets that none of the grants it sees names.
    #[arg(long, env = "FLEET_ACCESS_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Reconcile the cluster's SessionPreferences (the account default session document).
    /// Default: yes, unless --watch-namespace scopes the operator to one namespace.
    #[arg(long, env = "FLEET_ACCESS_MANAGE_PREFERENCES")]
    manage_preferences: Option<bool>,
    /// Namespace of the leader Lease. Default: the pod's namespace, else the watched
    /// namespace, else the bridge namespace.
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Name of the leader Lease; replicas with the same Lease elect one leader.
    #[arg(
        long,
        env = "FLEET_ACCESS_LEASE_NAME",
        default_value = "fleet-access-operator"
    )]
    lease_name: String,
    /// Seconds a leader's Lease holds without renewal: how long a standby waits before it
    /// takes over from a leader that died.
    #[arg(long, env = "FLEET_ACCESS_LEASE_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=3600))]
    lease_duration_seconds: u64,
}

#[derive(clap::Args, Debug)]
struct PlanArgs {
    /// A file with one or more SessionAccess objects (YAML); `-` reads standard input.
    #[arg(short = 'f', long = "filename")]
    file: String,
    #[command(flatten)]
    aws: AwsArgs,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// A file with the cluster's SessionAccessPolicy boundaries: each grant must fit every
    /// boundary that selects its namespace, as the operator requires, or the plan fails naming
    /// the fields outside them.
    #[arg(long)]
    boundaries: Option<String>,
    /// A label of the grants' namespace (`key=value`, repeatable), for the boundaries'
    /// namespaceSelectors; kubernetes.io/metadata.name is always the grant's namespace.
    #[arg(long = "namespace-label", value_parser = parse_label, requires = "boundaries")]
    namespace_labels: Vec<(String, String)>,
}

fn parse_label(text: &str) -> std::result::Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not key=value"))?;
    Ok((key.to_owned(), value.to_owned()))
}

/// Where grants apply: shared by `plan` and, later, `run`.
#[derive(clap::Args, Debug)]
struct AwsArgs {
    /// The 12-digit AWS account ID; ARNs say `*` when it is not given.
    #[arg(long, env = "FLEET_ACCESS_ACCOUNT", value_parser = parse_account)]
    account: Option<String>,
    /// The AWS Region; ARNs say `*` when it is not given.
    #[arg(long, env = "AWS_REGION")]
    region: Option<String>,
    /// The AWS partition.
    #[arg(long, env = "FLEET_ACCESS_PARTITION", default_value = "aws")]
    partition: String,
    /// The IAM role name the agent bridge runs as.
    #[arg(
        long,
        env = "FLEET_ACCESS_BRIDGE_ROLE",
        default_value = "fleet-access-bridge"
    )]
    bridge_role: String,
    /// The namespace the agent bridge runs in.
    #[arg(
        long,
        env = "FLEET_ACCESS_BRIDGE_NAMESPACE",
        default_value = "fleet-access"
    )]
    bridge_namespace: String,
    /// This cluster's name, part of the names and owner tags of everything the operator creates
    /// in AWS. Clusters that share an AWS account must have different names.
    #[arg(
        long,
        env = "FLEET_ACCESS_CLUSTER_NAME",
        default_value = crate::settings::DEFAULT_CLUSTER,
        value_parser = parse_cluster
    )]
    cluster_name: String,
    /// The account's quota of managed policies attached to one user, role or group (IAM's
    /// default is 10; it can be raised to 20). A grant that would exceed it is refused before
    /// anything is written.
    #[arg(
        long,
        env = "FLEET_ACCESS_MAX_POLICIES_PER_IDENTITY",
        default_value_t = crate::settings::DEFAULT_MAX_POLICIES_PER_IDENTITY,
        value_parser = clap::value_parser!(u8).range(1..=20)
    )]
    max_policies_per_identity: u8,
    /// The most ports (one per Service and port) the bridge grants of one namespace may hold
    /// together: each takes a target port on the bridge pods, from one range of 45,536 that
    /// every tenant shares. A grant that would go over is refused (BridgeReady=False).
    #[arg(
        long,
        env = "FLEET_ACCESS_MAX_BRIDGE_PORTS_PER_NAMESPACE",
        default_value_t = crate::settings::DEFAULT_MAX_BRIDGE_PORTS_PER_NAMESPACE,
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    max_bridge_ports_per_namespace: u16,
    /// The most session documents the grants of one namespace may hold together: each grant's
    /// own shell document, and every Port document (one per port, or remote host and port) its
    /// grants use. SSM allows an account 500, which every tenant shares. A grant that would go
    /// over grants nothing (PolicySynced=False, DocumentLimit); earlier grants keep theirs.
    #[arg(
        long,
        env = "FLEET_ACCESS_MAX_DOCUMENTS_PER_NAMESPACE",
        default_value_t = crate::settings::DEFAULT_MAX_DOCUMENTS_PER_NAMESPACE,
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    max_documents_per_namespace: u16,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Output {
    Text,
    Json,
}

fn parse_account(value: &str) -> std::result::Result<String, String> {
    if value.len() == 12 && value.bytes().all(|b| b.is_ascii_digit()) {
        Ok(value.to_owned())
    } else {
        Err("an AWS account ID is 12 digits".into())
    }
}

fn parse_cluster(value: &str) -> std::result::Result<String, String> {
    if crate::settings::valid_cluster_name(value) {
        Ok(value.to_owned())
    } else {
        Err("a cluster name is 1 to 40 lowercase letters, digits and hyphens, starting and ending with a letter or digit".into())
    }
}

impl AwsArgs {
    fn into_settings(self) -> Settings {
        let AwsArgs {
            account,
            region,
            partition,
            bridge_role,
            bridge_namespace,
            cluster_name,
            max_policies_per_identity,
            max_bridge_ports_per_namespace,
            max_documents_per_namespace,
        } = self;
        Settings {
            partition,
            account,
            region,
            bridge_role: Some(bridge_role),
            bridge_namespace,
            cluster: cluster_name,
            max_policies_per_identity: usize::from(max_policies_per_identity),
            max_bridge_ports_per_namespace: usize::from(max_bridge_ports_per_namespace),
            max_documents_per_namespace: usize::from(max_documents_per_namespace),
        }
    }
}

impl Args {
    /// Runs the command; errors go to standard error with a non-zero exit code.
    pub fn run(self) -> ExitCode {
        let result = match self.command {
            Command::Plan(args) => plan(args).map(|out| print!("{out}")),
            Command::Run(args) => run(args),
            Command::Crds => {
                print!("{}", fleet_access_crds::crds_yaml());
                Ok(())
            }
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::FAILURE
            }
        }
    }
}

fn plan(args: PlanArgs) -> Result<String> {
    let PlanArgs {
        file,
        aws,
        output,
        boundaries,
        namespace_labels,
    } = args;
    let text = read_input(&file)?;
    let grants = fleet_access_crds::validation::parse_session_accesses(&text)
        .map_err(Error::InvalidGrant)?;
    if let Some(path) = boundaries {
        let boundaries =
            fleet_access_crds::validation::parse_session_access_policies(&read_input(&path)?)
                .map_err(Error::InvalidBoundary)?;
        for note in judge_grants(&grants, &boundaries, namespace_labels)? {
            eprintln!("note: {note}");
        }
    }
    plan_grants(
        &grants,
        &aws.into_settings(),
        matches!(output, Output::Json),
    )
}

/// Judges each grant against `boundaries` as the operator would, in a namespace with `labels`
/// (and its own name label): the refusals of every refused grant are the error; otherwise the
/// grants that will wait for approval, each a note.
fn judge_grants(
    grants: &[fleet_access_crds::SessionAccess],
    boundaries: &[fleet_access_crds::SessionAccessPolicy],
    labels: Vec<(String, String)>,
) -> Result<Vec<String>> {
    use kube::ResourceExt;
    let now = k8s_openapi::jiff::Timestamp::now();
    let (mut refused, mut notes) = (Vec::new(), Vec::new());
    for grant in grants {
        let namespace = grant.namespace().unwrap_or_else(|| "default".into());
        let mut namespace_labels: std::collections::BTreeMap<String, String> =
            labels.iter().cloned().collect();
        namespace_labels.insert(NAMESPACE_NAME_LABEL.into(), namespace.clone());
        let judged = boundary::Grant {
            spec: &grant.spec,
            namespace: &namespace,
            namespace_labels: &namespace_labels,
            created: None,
        };
        if let boundary::Admission::Refused(refusals) = boundary::admit(&judged, boundaries, now) {
            refused.extend(
                (refusals.iter()).map(|r| format!("{namespace}/{}: {r}", grant.name_any())),
            );
        }
        let approvers = approval::required_by(&judged, boundaries);
        if !approvers.is_empty() {
            notes.push(format!(
                "{namespace}/{}: nothing is in force until someone other than its requester approves it (SessionAccessPolicy {} requires approval; see docs/tenancy.md)",
                grant.name_any(),
                approvers.join(", ")
            ));
        }
    }
    match refused.is_empty() {
        true => Ok(notes),
        false => Err(Error::OutsideBoundary(refused.join("\n"))),
    }
}

/// Renders the plan for validated grants.
pub fn plan_grants(
    grants: &[fleet_access_crds::SessionAccess],
    settings: &Settings,
    json: bool,
) -> Result<String> {
    let desired = grants
        .iter()
        .map(|g| desired::compute(g, settings))
        .collect::<Result<Vec<_>>>()?;
    let sets = identity::policy_sets(
        &desired,
        &settings.cluster,
        settings.max_policies_per_identity,
    )?;
    Ok(if json {
        report::json(&desired, &sets)
    } else {
        report::text(&desired, &sets)
    })
}

fn run(args: RunArgs) -> Result<()> {
    let RunArgs {
        aws,
        resync_seconds,
        sessions_census_seconds,
        admin_address,
        replica,
        watch_namespace,
        manage_preferences,
        lease_namespace,
        lease_name,
        lease_duration_seconds,
    } = args;
    let settings = aws.into_settings();
    let replica =
        replica.unwrap_or_else(|| format!("fleet-access-operator-{}", std::process::id()));
    let lease_namespace = lease_namespace
        .or_else(|| watch_namespace.clone())
        .unwrap_or_else(|| settings.bridge_namespace.clone());
    let manage_preferences = manage_preferences.unwrap_or(watch_namespace.is_none());
    let account = settings
        .account
        .clone()
        .ok_or_else(|| Error::Config("set --account (policy ARNs need the account ID)".into()))?;
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| Error::Config(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(crate::controller::runner::run(
        crate::controller::runner::RunConfig {
            settings,
            account,
            resync: std::time::Duration::from_secs(resync_seconds),
            census_period: std::time::Duration::from_secs(sessions_census_seconds),
            admin_address,
            replica,
            watch_namespace,
            manage_preferences,
            lease_namespace,
            lease_name,
            lease_duration: std::time::Duration::from_secs(lease_duration_seconds),
        },
    ))
}

fn read_input(file: &str) -> Result<String> {
    let read = if file == "-" {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(file)
    };
    read.map_err(|source| Error::ReadGrant {
        path: file.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn args_are_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn account_ids_are_twelve_digits() {
        assert!(parse_account("123456789012").is_ok());
        assert!(parse_account("12345678901").is_err());
        assert!(parse_account("12345678901x").is_err());
    }
}
