//! Whether a grant fits the `SessionAccessPolicy` boundaries of its namespace. Pure: the
//! controller passes the grant, its namespace's labels, the boundaries and the clock.
//!
//! A boundary is a constraint: every boundary that selects the namespace must admit the grant,
//! and a namespace that no boundary selects admits nothing. The same rules are CEL in
//! `deploy/tenancy/` (the admission policy), which refuses at `kubectl apply` what CEL can
//! express; this module is the operator's own check before any AWS write, and the reference
//! the admission policy's tests compare against.

use std::{collections::BTreeMap, fmt};

use fleet_access_crds::{
    SessionAccessPolicy, SessionAccessSpec,
    names::{Pattern, Port},
    v1alpha1::{Effect, SessionAccessPolicySpec},
};
use k8s_openapi::{
    api::networking::v1::NetworkPolicyPeer, apimachinery::pkg::apis::meta::v1::LabelSelector,
    jiff::Timestamp,
};
use kube::{
    ResourceExt,
    core::{Selector, SelectorExt},
};

use crate::model::desired::NAMESPACE_NAME_LABEL;

/// One way a grant leaves a boundary: the field, what is wrong, and which boundary says so.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The boundary, or `None` when no boundary selects the namespace.
    pub boundary: Option<String>,
    /// The grant's field, such as `spec.targets.instanceIds`.
    pub field: String,
    /// What is outside the boundary, and what the boundary allows.
    pub message: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.boundary {
            Some(boundary) => write!(
                f,
                "{}: {} (SessionAccessPolicy {boundary})",
                self.field, self.message
            ),
            None => write!(f, "{}: {}", self.field, self.message),
        }
    }
}

/// The verdict on one grant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Every boundary that selects the namespace (named here, at least one) admits the grant.
    Admitted { boundaries: Vec<String> },
    /// Why not: every refusal of every selecting boundary.
    Refused(Vec<Refusal>),
}

/// The grant as the boundaries see it.
pub struct Grant<'a> {
    /// The grant's spec.
    pub spec: &'a SessionAccessSpec,
    /// The grant's namespace.
    pub namespace: &'a str,
    /// The labels of that namespace.
    pub namespace_labels: &'a BTreeMap<String, String>,
    /// When the grant was created (the start of its window when it sets no notBefore).
    pub created: Option<Timestamp>,
}

/// Judges `grant` against every boundary; `now` stands in for a missing creation time.
pub fn admit(grant: &Grant<'_>, boundaries: &[SessionAccessPolicy], now: Timestamp) -> Admission {
    let mut selecting = Vec::new();
    let mut refusals = Vec::new();
    for boundary in boundaries {
        let name = boundary.name_any();
        match selects(&boundary.spec.namespace_selector, grant.namespace_labels) {
            Ok(false) => continue,
            Ok(true) => refusals.extend(
                refusals_of(grant, &boundary.spec, now)
                    .into_iter()
                    .map(|(field, message)| Refusal {
                        boundary: Some(name.clone()),
                        field,
                        message,
                    }),
            ),
            // An unreadable selector fails closed: it may have been meant to select this one.
            Err(error) => refusals.push(Refusal {
                boundary: Some(name.clone()),
                field: "metadata.namespace".into(),
                message: format!("the boundary's namespaceSelector is invalid ({error}): no grant is admitted until it is fixed"),
            }),
        }
        selecting.push(name);
    }
    if selecting.is_empty() {
        return Admission::Refused(vec![Refusal {
            boundary: None,
            field: "metadata.namespace".into(),
            message: format!(
                "no SessionAccessPolicy selects namespace {}: a cluster admin must set the boundary of its grants first",
                grant.namespace
            ),
        }]);
    }
    if refusals.is_empty() {
        Admission::Admitted {
            boundaries: selecting,
        }
    } else {
        Admission::Refused(refusals)
    }
}

/// Whether `selector` selects a namespace with `labels`.
pub(crate) fn selects(
    selector: &LabelSelector,
    labels: &BTreeMap<String, String>,
) -> Result<bool, kube::core::ParseExpressionError> {
    let selector = Selector::try_from(selector.clone())?;
    Ok(selector.matches(labels))
}

/// Every (field, message) by which `grant` leaves `boundary`.
fn refusals_of(
    grant: &Grant<'_>,
    boundary: &SessionAccessPolicySpec,
    now: Timestamp,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let spec = grant.spec;
    let allow = spec.effect == Effect::Allow;

    // Principals, whatever the effect: a Deny of someone else's role is a lockout.
    let principals = &boundary.principals;
    for (kind, field, names, patterns) in [
        (
            "user",
            "users",
            names(&spec.principals.users),
            &principals.users,
        ),
        (
            "role",
            "roles",
            names(&spec.principals.roles),
            &principals.roles,
        ),
        (
            "group",
            "groups",
            names(&spec.principals.groups),
            &principals.groups,
        ),
    ] {
        for name in names
            .into_iter()
            .filter(|n| !Pattern::any_matches(patterns, n))
        {
            out.push((
                format!("spec.principals.{field}"),
                format!(
                    "IAM {kind} {name} is not among the {field} this boundary allows ({})",
                    listed(patterns)
                ),
            ));
        }
    }

    // Targets.
    let targets = &boundary.targets;
    if spec.targets.all_instances && !targets.all_instances.contains(&spec.effect) {
        out.push((
            "spec.targets.allInstances".into(),
            format!(
                "{} on every instance is outside this boundary (allInstances is allowed for: {})",
                effect_name(spec.effect),
                listed(
                    &targets
                        .all_instances
                        .iter()
                        .map(|e| effect_name(*e))
                        .collect::<Vec<_>>()
                )
            ),
        ));
    }
    // An effect that may cover every instance may cover any of them.
    if !targets.all_instances.contains(&spec.effect) {
        target_refusals(spec, boundary, &mut out);
    }

    // Sessions, logging and endpoints bound what a grant allows; a Deny has none of them.
    if allow {
        session_refusals(spec, boundary, &mut out);
        bridge_refusals(spec, grant.namespace, boundary, &mut out);
    }

    // Window.
    if let Some(bounds) = &boundary.window {
        let expires = spec.window.as_ref().and_then(|w| w.expires_at.as_ref());
        let max = bounds.max_duration_seconds();
        match expires {
            None if bounds.require_expires_at || max.is_some() => out.push((
                "spec.window.expiresAt".into(),
                "this boundary requires grants to expire: set spec.window.expiresAt".into(),
            )),
            Some(expires) => {
                let start = (spec.window.as_ref().and_then(|w| w.not_before.as_ref()))
                    .map(|t| t.0)
                    .or(grant.created)
                    .unwrap_or(now);
                let length = expires.0.as_second() - start.as_second();
                if let Some(max) = max.filter(|max| length > *max) {
                    out.push((
                        "spec.window.expiresAt".into(),
                        format!(
                            "the window lasts {}, longer than the {} this boundary allows (counted from notBefore, or the grant's creation)",
                            duration_text(length),
                            duration_text(max)
                        ),
                    ));
                }
            }
            None => {}
        }
    }
    out
}

fn target_refusals(
    spec: &SessionAccessSpec,
    boundary: &SessionAccessPolicySpec,
    out: &mut Vec<(String, String)>,
) {
    let targets = &boundary.targets;
    for id in spec
        .targets
        .instance_ids
        .iter()
        .filter(|id| !targets.instance_ids.contains(id))
    {
        out.push((
            "spec.targets.instanceIds".into(),
            format!("instance {id} is not among the instances this boundary allows"),
        ));
    }
    if !spec.targets.tags.is_empty() {
        if targets.tags.is_empty() {
            out.push((
                "spec.targets.tags".into(),
                "this boundary allows no tag targets: list instances by ID".into(),
            ));
        }
        for (key, patterns) in &targets.tags {
            match spec.targets.tags.get(key) {
                None => out.push((
                    "spec.targets.tags".into(),
                    format!(
                        "tag targets must include the tag {key} ({})",
                        listed(&patterns.0)
                    ),
                )),
                Some(value) if !Pattern::any_matches(&patterns.0, value.as_str()) => out.push((
                    format!("spec.targets.tags.{key}"),
                    format!(
                        "{key}={value} is outside this boundary ({key} may be {})",
                        listed(&patterns.0)
                    ),
                )),
                Some(_) => {}
            }
        }
    }
}

fn session_refusals(
    spec: &SessionAccessSpec,
    boundary: &SessionAccessPolicySpec,
    out: &mut Vec<(String, String)>,
) {
    let bounds = &boundary.sessions;
    let Some(sessions) = &spec.sessions else {
        return;
    };
    if sessions.ssh && !bounds.ssh {
        out.push((
            "spec.sessions.ssh".into(),
            "this boundary allows no SSH sessions".into(),
        ));
    }
    if sessions.shell && !bounds.shell {
        out.push((
            "spec.sessions.shell".into(),
            "this boundary allows no shell sessions".into(),
        ));
    }
    let outside = |p: &&Port| !bounds.any_port && !bounds.ports.contains(p);
    for port in sessions.ports.iter().filter(outside) {
        out.push((
            "spec.sessions.ports".into(),
            format!(
                "port {port} is not among the ports this boundary allows ({})",
                listed(&bounds.ports)
            ),
        ));
    }
    for remote in &sessions.remote_hosts {
        let (host, port) = (remote.host.as_str(), remote.port);
        let allowed = bounds.any_remote_host
            || (bounds.remote_hosts.iter())
                .any(|bound| bound.host.matches(host) && bound.ports.contains(&port));
        if !allowed {
            let bounded: Vec<String> = (bounds.remote_hosts.iter())
                .map(|b| format!("{} ports {}", b.host, listed(&b.ports)))
                .collect();
            out.push((
                "spec.sessions.remoteHosts".into(),
                format!(
                    "forwarding to {host} port {port} is outside this boundary (remote hosts: {})",
                    match bounded.is_empty() {
                        true => "none".to_owned(),
                        false => bounded.join("; "),
                    }
                ),
            ));
        }
    }
    let logging = spec.logging.as_ref();
    let run_as = logging
        .and_then(|l| l.run_as.as_ref())
        .filter(|r| r.enabled);
    if let Some(user) = run_as.and_then(|r| r.default_user.as_ref())
        && !Pattern::any_matches(&bounds.run_as_users, user.as_str())
    {
        out.push((
            "spec.logging.runAs.defaultUser".into(),
            format!(
                "running shells as {user} is outside this boundary (runAs users: {})",
                listed(&bounds.run_as_users)
            ),
        ));
    }
    // A key grants its principals kms:GenerateDataKey on it: closed by default, like every
    // section, so a boundary without shellLogging.kmsKeys admits no key.
    let kms_keys = (boundary.shell_logging.as_ref()).map_or(&[][..], |l| l.kms_keys.as_slice());
    if let Some(key) = logging.and_then(|l| l.kms_key_id.as_ref())
        && !Pattern::any_matches(kms_keys, key.as_str())
    {
        out.push((
            "spec.logging.kmsKeyId".into(),
            match kms_keys.is_empty() {
                true => format!(
                    "KMS key {key}: this boundary accepts no KMS key (it lists none in shellLogging.kmsKeys)"
                ),
                false => format!(
                    "KMS key {key} is not one this boundary accepts ({})",
                    listed(kms_keys)
                ),
            },
        ));
    }
    let Some(required) = boundary.shell_logging.as_ref().filter(|_| sessions.shell) else {
        return;
    };
    let cloud_watch = logging.and_then(|l| l.cloud_watch.as_ref());
    if !required.cloud_watch_log_groups.is_empty() {
        match cloud_watch {
            Some(cw)
                if Pattern::any_matches(
                    &required.cloud_watch_log_groups,
                    cw.log_group_name.as_str(),
                ) => {}
            Some(cw) => out.push((
                "spec.logging.cloudWatch.logGroupName".into(),
                format!(
                    "log group {} is not one this boundary accepts ({})",
                    cw.log_group_name,
                    listed(&required.cloud_watch_log_groups)
                ),
            )),
            None => out.push((
                "spec.logging.cloudWatch".into(),
                format!(
                    "this boundary requires shell sessions to log to CloudWatch ({})",
                    listed(&required.cloud_watch_log_groups)
                ),
            )),
        }
    }
    if required.require_streaming && !cloud_watch.is_some_and(|cw| cw.streaming) {
        out.push((
            "spec.logging.cloudWatch.streaming".into(),
            "this boundary requires shell sessions to stream to CloudWatch: set streaming: true"
                .into(),
        ));
    }
    if !required.s3_buckets.is_empty() {
        match logging.and_then(|l| l.s3.as_ref()) {
            Some(s3) if Pattern::any_matches(&required.s3_buckets, s3.bucket_name.as_str()) => {}
            Some(s3) => out.push((
                "spec.logging.s3.bucketName".into(),
                format!(
                    "bucket {} is not one this boundary accepts ({})",
                    s3.bucket_name,
                    listed(&required.s3_buckets)
                ),
            )),
            None => out.push((
                "spec.logging.s3".into(),
                format!(
                    "this boundary requires shell sessions to upload to S3 ({})",
                    listed(&required.s3_buckets)
                ),
            )),
        }
    }
}

fn bridge_refusals(
    spec: &SessionAccessSpec,
    namespace: &str,
    boundary: &SessionAccessPolicySpec,
    out: &mut Vec<(String, String)>,
) {
    let Some(bridge) = spec.bridge.as_ref().filter(|b| b.enabled) else {
        return;
    };
    let Some(bounds) = &boundary.bridge else {
        out.push((
            "spec.bridge".into(),
            "this boundary allows no bridge endpoints".into(),
        ));
        return;
    };
    for (index, peer) in bridge.clients.iter().enumerate() {
        let field = format!("spec.bridge.clients[{index}]");
        if peer.ip_block.is_some() && !bounds.allow_ip_blocks {
            out.push((
                format!("{field}.ipBlock"),
                "this boundary allows no ipBlock clients: admit pods by podSelector and namespaceSelector".into(),
            ));
        }
        match client_namespace(peer) {
            ClientNamespace::Own => {}
            _ if bounds.client_namespaces.iter().any(|p| p.as_str() == "*") => {}
            ClientNamespace::Named(name)
                if name == namespace || Pattern::any_matches(&bounds.client_namespaces, &name) => {}
            ClientNamespace::Named(name) => out.push((
                format!("{field}.namespaceSelector"),
                format!("namespace {name} is not among the client namespaces this boundary allows ({})", listed(&bounds.client_namespaces)),
            )),
            ClientNamespace::Unnamed => out.push((
                format!("{field}.namespaceSelector"),
                format!("select client namespaces by name (matchLabels with only {NAMESPACE_NAME_LABEL}), so the boundary can check them"),
            )),
        }
    }
}

/// Which namespace a client peer admits pods from.
enum ClientNamespace {
    /// The grant's own (a podSelector alone, or an ipBlock).
    Own,
    /// One namespace, by its name label.
    Named(String),
    /// Namespaces by some other label, or every namespace.
    Unnamed,
}

fn client_namespace(peer: &NetworkPolicyPeer) -> ClientNamespace {
    let Some(selector) = &peer.namespace_selector else {
        return ClientNamespace::Own;
    };
    let expressions = selector
        .match_expressions
        .as_ref()
        .is_some_and(|e| !e.is_empty());
    match selector.match_labels.as_ref() {
        Some(labels) if !expressions && labels.len() == 1 => labels
            .get(NAMESPACE_NAME_LABEL)
            .map_or(ClientNamespace::Unnamed, |name| {
                ClientNamespace::Named(name.clone())
            }),
        _ => ClientNamespace::Unnamed,
    }
}

fn names<T: fmt::Display>(items: &[T]) -> Vec<String> {
    items.iter().map(ToString::to_string).collect()
}

/// `a, b, c`, or `none` for an empty list.
fn listed<T: fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "none".into();
    }
    names(items).join(", ")
}

fn effect_name(effect: Effect) -> &'static str {
    match effect {
        Effect::Allow => "Allow",
        Effect::Deny => "Deny",
    }
}

/// `1h30m`, `45m`, `8h` (whole minutes, rounded up).
fn duration_text(seconds: i64) -> String {
    let minutes = (seconds + 59) / 60;
    match (minutes / 60, minutes % 60) {
        (0, m) => format!("{m}m"),
        (h, 0) => format!("{h}h"),
        (h, m) => format!("{h}h{m}m"),
    }
}

#[cfg(test)]
mod tests;
