//! The IAM statements a grant stands for: `ssm:StartSession` on its targets and session
//! documents (bounded by its window and tags), terminating and resuming one's own sessions, the
//! KMS data key of encrypted shells, and a Deny's statements; with the ARNs they name, in the
//! operator's partition, account and Region. Pure, like the rest of `desired`.

use std::collections::BTreeMap;

use fleet_access_crds::{
    names::{InstanceId, TagValue},
    v1alpha1::{self, Principals, Targets},
};

use super::SHELL_SUFFIX;
use crate::{
    model::{
        documents::{self, SSH_DOCUMENT},
        naming,
        policy::{Conditions, Effect, Statement},
    },
    settings::Settings,
};

/// ARNs in the operator's partition, account and Region (or `*`).
pub(super) struct Arns<'a> {
    pub(super) settings: &'a Settings,
}

impl Arns<'_> {
    pub(super) fn instance(&self, id: &InstanceId) -> String {
        let s = self.settings;
        if id.is_managed_node() {
            format!(
                "arn:{}:ssm:{}:{}:managed-instance/{id}",
                s.partition,
                s.region_or_any(),
                s.account_or_any()
            )
        } else {
            format!(
                "arn:{}:ec2:{}:{}:instance/{id}",
                s.partition,
                s.region_or_any(),
                s.account_or_any()
            )
        }
    }

    /// Every EC2 instance and managed node.
    pub(super) fn all_instances(&self) -> Vec<String> {
        let s = self.settings;
        vec![
            format!(
                "arn:{}:ec2:{}:{}:instance/*",
                s.partition,
                s.region_or_any(),
                s.account_or_any()
            ),
            format!(
                "arn:{}:ssm:{}:{}:managed-instance/*",
                s.partition,
                s.region_or_any(),
                s.account_or_any()
            ),
        ]
    }

    /// AWS-owned documents have no account in their ARN, hence `*` whatever the settings.
    pub(super) fn aws_document(&self, name: &str) -> String {
        format!(
            "arn:{}:ssm:{}:*:document/{name}",
            self.settings.partition,
            self.settings.region_or_any()
        )
    }

    pub(super) fn own_document(&self, name: &str) -> String {
        let s = self.settings;
        format!(
            "arn:{}:ssm:{}:{}:document/{name}",
            s.partition,
            s.region_or_any(),
            s.account_or_any()
        )
    }

    pub(super) fn sessions(&self, pattern: &str) -> String {
        let s = self.settings;
        format!(
            "arn:{}:ssm:{}:{}:session/{pattern}",
            s.partition,
            s.region_or_any(),
            s.account_or_any()
        )
    }

    pub(super) fn kms(&self, resource: &str) -> String {
        let s = self.settings;
        format!(
            "arn:{}:kms:{}:{}:{resource}",
            s.partition,
            s.region_or_any(),
            s.account_or_any()
        )
    }
}

/// `aws:CurrentTime` bounds for the grant's window. IAM does not allow policy variables in date
/// conditions, so these are literal RFC 3339 times.
pub(super) fn window_conditions(window: Option<&v1alpha1::Window>) -> Conditions {
    let mut conditions = Conditions::new();
    let time = |t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time| {
        t.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
    };
    if let Some(from) = window.and_then(|w| w.not_before.as_ref()) {
        conditions
            .entry("DateGreaterThan".into())
            .or_default()
            .insert("aws:CurrentTime".into(), vec![time(from)]);
    }
    if let Some(until) = window.and_then(|w| w.expires_at.as_ref()) {
        conditions
            .entry("DateLessThan".into())
            .or_default()
            .insert("aws:CurrentTime".into(), vec![time(until)]);
    }
    conditions
}

/// `ssm:resourceTag/<key>` conditions; several keys in one `StringLike` block must all match.
fn tag_conditions(tags: &BTreeMap<String, TagValue>) -> Conditions {
    let mut conditions = Conditions::new();
    if !tags.is_empty() {
        let keys = tags
            .iter()
            .map(|(k, v)| (format!("ssm:resourceTag/{k}"), vec![v.to_string()]))
            .collect();
        conditions.insert("StringLike".into(), keys);
    }
    conditions
}

fn document_access_check(statement: Statement) -> Statement {
    statement.with_condition(
        "BoolIfExists",
        "ssm:SessionDocumentAccessCheck",
        vec!["true".into()],
    )
}

/// `ssm:StartSession` on the targets and the session documents. Instance IDs (or every
/// instance) share one statement with the documents, as in AWS's own examples; tag targets need
/// their own statement, because their tag condition cannot hold for a document.
pub(super) fn start_session_statements(
    arns: &Arns<'_>,
    targets: &Targets,
    document_arns: Vec<String>,
    window: &Conditions,
) -> Vec<Statement> {
    const START: &[&str] = &["ssm:StartSession"];
    let mut plain_targets: Vec<String> = targets
        .instance_ids
        .iter()
        .map(|id| arns.instance(id))
        .collect();
    if targets.all_instances {
        plain_targets = arns.all_instances();
    }
    let mut statements = Vec::new();
    if targets.tags.is_empty() {
        plain_targets.extend(document_arns);
        statements.push(
            document_access_check(Statement::new(
                "StartSessionOnInstances",
                Effect::Allow,
                START,
                plain_targets,
            ))
            .with_conditions(window),
        );
    } else {
        if !plain_targets.is_empty() {
            statements.push(
                Statement::new(
                    "StartSessionOnInstances",
                    Effect::Allow,
                    START,
                    plain_targets,
                )
                .with_conditions(window),
            );
        }
        statements.push(
            Statement::new(
                "StartSessionOnTaggedInstances",
                Effect::Allow,
                START,
                arns.all_instances(),
            )
            .with_conditions(&tag_conditions(&targets.tags))
            .with_conditions(window),
        );
        statements.push(
            document_access_check(Statement::new(
                "StartSessionWithDocuments",
                Effect::Allow,
                START,
                document_arns,
            ))
            .with_conditions(window),
        );
    }
    statements
}

/// Terminate and resume one's own sessions, the way AWS documents it: IAM users by the session
/// ID prefix `${aws:username}-`; roles (federated or assumed) by the session tag AWS applies,
/// since `${aws:username}` does not exist for them.
pub(super) fn own_session_statements(
    arns: &Arns<'_>,
    principals: &Principals,
    window: &Conditions,
) -> Vec<Statement> {
    const OWN: &[&str] = &["ssm:TerminateSession", "ssm:ResumeSession"];
    let mut statements = Vec::new();
    if !principals.users.is_empty() || !principals.groups.is_empty() {
        statements.push(
            Statement::new(
                "TerminateAndResumeOwnSessionsAsUser",
                Effect::Allow,
                OWN,
                vec![arns.sessions("${aws:username}-*")],
            )
            .with_conditions(window),
        );
    }
    if !principals.roles.is_empty() {
        statements.push(role_own_sessions(
            arns,
            "TerminateAndResumeOwnSessionsAsRole",
            window,
        ));
    }
    statements
}

pub(super) fn role_own_sessions(arns: &Arns<'_>, sid: &str, window: &Conditions) -> Statement {
    Statement::new(
        sid,
        Effect::Allow,
        &["ssm:TerminateSession", "ssm:ResumeSession"],
        vec![arns.sessions("*")],
    )
    .with_condition(
        "StringLike",
        "ssm:resourceTag/aws:ssmmessages:session-id",
        vec!["${aws:userid}".into()],
    )
    .with_conditions(window)
}

/// Session data encryption needs `kms:GenerateDataKey` on the key. An alias cannot be a resource
/// for it, so aliases become a condition on the key's aliases.
pub(super) fn kms_statement(arns: &Arns<'_>, key: &str) -> Statement {
    const GENERATE: &[&str] = &["kms:GenerateDataKey"];
    let sid = "GenerateSessionDataKey";
    if key.starts_with("arn:") && key.contains(":key/") {
        Statement::new(sid, Effect::Allow, GENERATE, vec![key.to_owned()])
    } else if let Some(alias) = key
        .rsplit_once(":alias/")
        .map(|(_, a)| a)
        .or_else(|| key.strip_prefix("alias/"))
    {
        Statement::new(sid, Effect::Allow, GENERATE, vec![arns.kms("key/*")]).with_condition(
            "ForAnyValue:StringEquals",
            "kms:ResourceAliases",
            vec![format!("alias/{alias}")],
        )
    } else {
        Statement::new(
            sid,
            Effect::Allow,
            GENERATE,
            vec![arns.kms(&format!("key/{key}"))],
        )
    }
}

/// Deny: on every instance, deny the named kinds of session by their documents; on chosen
/// instances, deny every session to them.
pub(super) fn deny_statements(
    arns: &Arns<'_>,
    spec: &fleet_access_crds::SessionAccessSpec,
    window: &Conditions,
) -> Vec<Statement> {
    const START: &[&str] = &["ssm:StartSession"];
    let targets = &spec.targets;
    if targets.all_instances {
        // Every document that starts a session of a denied kind: AWS's, the account's, and
        // every grant's own (their names end in the kind's suffix, shortened or not).
        let sessions = spec.sessions.clone().unwrap_or_default();
        let mut documents = Vec::new();
        if sessions.ssh {
            documents.push(arns.aws_document(SSH_DOCUMENT));
        }
        if sessions.shell {
            documents.push(arns.own_document(documents::ACCOUNT_SHELL_DOCUMENT));
            documents.push(arns.own_document(&naming::any_grant_object_name(SHELL_SUFFIX)));
        }
        // (Validation refuses a Deny of single ports: AWS's forwarding documents take any.)
        return vec![
            Statement::new(
                "DenyStartSessionWithDocuments",
                Effect::Deny,
                START,
                documents,
            )
            .with_conditions(window),
        ];
    }
    let mut statements = Vec::new();
    if !targets.instance_ids.is_empty() {
        let instances = targets
            .instance_ids
            .iter()
            .map(|id| arns.instance(id))
            .collect();
        statements.push(
            Statement::new(
                "DenyStartSessionOnInstances",
                Effect::Deny,
                START,
                instances,
            )
            .with_conditions(window),
        );
    }
    if !targets.tags.is_empty() {
        statements.push(
            Statement::new(
                "DenyStartSessionOnTaggedInstances",
                Effect::Deny,
                START,
                arns.all_instances(),
            )
            .with_conditions(&tag_conditions(&targets.tags))
            .with_conditions(window),
        );
    }
    statements
}
