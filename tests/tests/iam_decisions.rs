//! What a grant means to IAM, judged by an evaluator fleet-access did not write
//! (`@cloud-copilot/iam-simulate`, `fleet_access_tests::iam_evaluator`): the policy sets the
//! operator renders (`desired::compute`, merged per identity by `identity::policy_sets`) for every example under `deploy/examples/` and for a decision
//! matrix of our own are evaluated for concrete requests, and each decision is asserted:
//! allowed, implicitly denied, or explicitly denied.
//!
//! Requests are what AWS evaluates: `ssm:StartSession` once on the instance and once on the
//! document (both must be allowed), with `aws:CurrentTime` and the instance's
//! `ssm:resourceTag/…`; `ssm:TerminateSession` and `ssm:ResumeSession` on a session, as the user
//! (`aws:username`) or the role session (`aws:userid`, and the session's
//! `aws:ssmmessages:session-id` tag). AWS-owned documents have ARNs without an account
//! (`arn:aws:ssm:us-east-1::document/AWS-StartSSHSession`), which the rendered `*` account must
//! match. Every validated request must have no ignored context key: a key the policies rely on
//! that IAM would never set for the request would make a condition silently moot.

#![allow(clippy::panic, clippy::unwrap_used)]

use std::collections::BTreeMap;

use fleet_access_crds::{
    SessionAccess, fixtures::GrantFixture, validation::parse_session_accesses,
};
use fleet_access_operator::{
    aws::{Principal, PrincipalKind},
    model::{
        approval,
        desired::{self, Desired},
        identity,
    },
    settings::Settings,
};
use fleet_access_tests::iam_evaluator::{Decision, IamRequest, evaluate};
use kube::ResourceExt;
use serde_json::{Value, json};

const ACCOUNT: &str = "123456789012";
const REGION: &str = "us-east-1";
/// A time inside every example's window but time-window.yaml's.
const NOW: &str = "2026-12-05T12:00:00Z";
/// An instance no grant names.
const STRANGER: &str = "i-0ffffffffffffffff";

use Decision::{Allowed, ExplicitlyDenied, ImplicitlyDenied};

fn settings() -> Settings {
    Settings {
        partition: "aws".into(),
        account: Some(ACCOUNT.into()),
        region: Some(REGION.into()),
        ..Settings::default()
    }
}

fn render(grant: &SessionAccess) -> Desired {
    desired::compute(grant, &settings()).unwrap_or_else(|e| panic!("{}: {e}", grant.name_any()))
}

/// Grant `name` of namespace `team`; each case says what it grants.
fn grant(name: &str) -> GrantFixture {
    GrantFixture::new("team", name)
}

fn instance(id: &str) -> String {
    match id.strip_prefix("mi-") {
        Some(_) => format!("arn:aws:ssm:{REGION}:{ACCOUNT}:managed-instance/{id}"),
        None => format!("arn:aws:ec2:{REGION}:{ACCOUNT}:instance/{id}"),
    }
}

/// An AWS-owned document: no account in its ARN.
fn aws_document(name: &str) -> String {
    format!("arn:aws:ssm:{REGION}::document/{name}")
}

fn own_document(name: &str) -> String {
    format!("arn:aws:ssm:{REGION}:{ACCOUNT}:document/{name}")
}

fn session(id: &str) -> String {
    format!("arn:aws:ssm:{REGION}:{ACCOUNT}:session/{id}")
}

/// Someone who holds the grant's policies: (name in failures, principal ARN, context keys).
struct Caller {
    name: String,
    arn: String,
    context: Vec<(String, Value)>,
    /// The session ID of one of its own sessions, with that session's tags as context.
    own_session: (String, Vec<(String, Value)>),
}

fn user(name: &str) -> Caller {
    Caller {
        name: format!("user {name}"),
        arn: format!("arn:aws:iam::{ACCOUNT}:user/{name}"),
        context: vec![("aws:username".into(), json!(name))],
        own_session: (format!("{name}-0a1b2c3d4e5f67890"), Vec::new()),
    }
}

/// A session of role `name`, as IRSA or SSO sessions are.
fn role(name: &str) -> Caller {
    let userid = format!("AROAEXAMPLE{}:session-1", name.len());
    Caller {
        name: format!("role {name}"),
        arn: format!("arn:aws:sts::{ACCOUNT}:assumed-role/{name}/session-1"),
        context: vec![("aws:userid".into(), json!(userid))],
        own_session: (
            "session-1-0a1b2c3d4e5f67890".into(),
            vec![(
                "ssm:resourceTag/aws:ssmmessages:session-id".into(),
                json!(userid),
            )],
        ),
    }
}

/// A caller with the policies it holds.
struct Holder {
    caller: Caller,
    policies: Vec<Value>,
}

/// The callers a grant's policies reach: its users, its roles' sessions, a member of each group,
/// and the bridge role's session for its endpoints.
fn callers(d: &Desired) -> Vec<Holder> {
    let sets = policy_sets(std::slice::from_ref(d));
    let policies_of = |kind: PrincipalKind, name: &str| -> Vec<Value> {
        sets.get(&Principal::new(kind, name))
            .cloned()
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for name in &d.principals.users {
        out.push(Holder {
            caller: user(name),
            policies: policies_of(PrincipalKind::User, name),
        });
    }
    for name in &d.principals.groups {
        out.push(Holder {
            caller: user(&format!("member-of-{name}")),
            policies: policies_of(PrincipalKind::Group, name),
        });
    }
    for name in &d.principals.roles {
        out.push(Holder {
            caller: role(name),
            policies: policies_of(PrincipalKind::Role, name),
        });
    }
    if let Some(bridge) = &d.bridge {
        out.push(Holder {
            caller: role(&bridge.role),
            policies: policies_of(PrincipalKind::Role, &bridge.role),
        });
    }
    out
}

/// Each identity's policy set for `grants` (as the operator merges them), as JSON documents.
fn policy_sets(grants: &[Desired]) -> BTreeMap<Principal, Vec<Value>> {
    let sets = identity::policy_sets(grants, "prod", 20).expect("policy sets");
    (sets.into_iter())
        .map(|(identity, set)| {
            let documents = (set.policies.iter())
                .map(|p| serde_json::from_str(&p.document.0.to_json()).unwrap())
                .collect();
            (identity, documents)
        })
        .collect()
}

/// One request with its expected decision.
struct Case {
    request: IamRequest,
    expected: Decision,
}

struct Cases(Vec<Case>);

/// A caller, holding its policies, asks for `action` on `resource` with `context`.
fn request(
    id: String,
    (caller, policies): (&Caller, &[Value]),
    action: &str,
    resource: &str,
    context: &[(String, Value)],
) -> IamRequest {
    let mut request = IamRequest::new(id, &caller.arn, action, resource, ACCOUNT);
    for (key, value) in caller.context.iter().chain(context) {
        request = request.with(key, value.clone());
    }
    for (index, policy) in policies.iter().enumerate() {
        request = request.policy(&format!("policy-{index}"), policy);
    }
    if resource.contains("::document/") {
        request = request.unvalidated();
    }
    request
}

impl Cases {
    /// A caller, holding its policies, asks for `action` on `resource` with `context`.
    fn add(
        &mut self,
        what: &str,
        (caller, policies): (&Caller, &[Value]),
        action: &str,
        resource: &str,
        context: &[(String, Value)],
        expected: Decision,
    ) {
        let id = format!("{what}: {} {action} {resource}", caller.name);
        let request = request(id, (caller, policies), action, resource, context);
        self.0.push(Case { request, expected });
    }

    /// Evaluates every case and fails with all the wrong decisions at once.
    fn check(self) {
        let requests: Vec<IamRequest> = self.0.iter().map(|c| c.request.clone()).collect();
        let evaluations = evaluate(&requests).expect("the IAM evaluator runs (tests/env/setup.sh)");
        let mut wrong = Vec::new();
        for (case, evaluation) in self.0.iter().zip(&evaluations) {
            match (&evaluation.error, evaluation.decision) {
                (Some(error), _) => wrong.push(format!(
                    "{}: refused by the evaluator: {error}",
                    case.request.id
                )),
                (None, Some(decision)) if decision != case.expected => wrong.push(format!(
                    "{}: {decision:?}, expected {:?}",
                    case.request.id, case.expected
                )),
                _ => {}
            }
            if !evaluation.ignored_context_keys.is_empty() {
                wrong.push(format!(
                    "{}: context keys IAM would not set: {:?}",
                    case.request.id, evaluation.ignored_context_keys
                ));
            }
        }
        assert!(
            wrong.is_empty(),
            "{} of {} decisions wrong:\n{}",
            wrong.len(),
            requests.len(),
            wrong.join("\n")
        );
        assert!(requests.len() >= 10, "{} requests", requests.len());
        eprintln!("{} IAM decisions as expected", requests.len());
    }
}

/// A concrete tag value that an IAM `StringLike` pattern matches.
fn matching(pattern: &str) -> String {
    pattern.replace('*', "x").replace('?', "y")
}

/// What an Allow grant must allow its callers, and nothing next to it.
fn allow_cases(cases: &mut Cases, grant: &SessionAccess, now: &str) {
    let d = render(grant);
    let spec = &grant.spec;
    let what = grant.name_any();
    let time = [("aws:CurrentTime".to_owned(), json!(now))];
    let tags: Vec<(String, Value)> = (spec.targets.tags.iter())
        .map(|(k, v)| (format!("ssm:resourceTag/{k}"), json!(matching(v.as_str()))))
        .collect();
    let mut targets: Vec<(String, Vec<(String, Value)>)> = spec
        .targets
        .instance_ids
        .iter()
        .map(|id| (instance(id.as_str()), Vec::new()))
        .collect();
    if !tags.is_empty() {
        targets.push((instance("i-0123456789abc0000"), tags.clone()));
    }
    let sessions = spec.sessions.clone().unwrap_or_default();
    let mut documents = Vec::new();
    if sessions.ssh {
        documents.push(aws_document("AWS-StartSSHSession"));
    }
    documents.extend(d.documents.iter().map(|doc| own_document(&doc.name)));
    for Holder { caller, policies } in callers(&d) {
        let add = |cases: &mut Cases, resource: &str, context: &[(String, Value)], expected| {
            let context: Vec<_> = time
                .iter()
                .cloned()
                .chain(context.iter().cloned())
                .collect();
            cases.add(
                &what,
                (&caller, &policies),
                "ssm:StartSession",
                resource,
                &context,
                expected,
            );
        };
        for (target, context) in &targets {
            add(cases, target, context, Allowed);
        }
        for document in &documents {
            add(cases, document, &[], Allowed);
        }
        // Next to the grant: another instance, AWS's any-port document, another tag value.
        let foreign_tags: Vec<_> = tags
            .iter()
            .map(|(k, _)| (k.clone(), json!("someone-else")))
            .collect();
        add(cases, &instance(STRANGER), &foreign_tags, ImplicitlyDenied);
        if sessions.ports.is_empty() {
            add(
                cases,
                &aws_document("AWS-StartPortForwardingSession"),
                &[],
                ImplicitlyDenied,
            );
        }
        // AWS's any-host document, and a document of the same host on another port.
        add(
            cases,
            &aws_document("AWS-StartPortForwardingSessionToRemoteHost"),
            &[],
            ImplicitlyDenied,
        );
        for remote in &sessions.remote_hosts {
            let elsewhere = fleet_access_crds::ssm_documents::remote_host_document_name(
                "default",
                remote.host.as_str(),
                remote.port.0.wrapping_add(1),
            );
            add(cases, &own_document(&elsewhere), &[], ImplicitlyDenied);
        }
        if !sessions.shell {
            add(
                cases,
                &own_document("SSM-SessionManagerRunShell"),
                &[],
                ImplicitlyDenied,
            );
        }
        // Its own sessions, and not someone else's (people only: the bridge ends its own).
        if d.bridge
            .as_ref()
            .is_some_and(|b| caller.arn.contains(&format!("/{}/", b.role)))
        {
            continue;
        }
        let (own, own_context) = &caller.own_session;
        for action in ["ssm:TerminateSession", "ssm:ResumeSession"] {
            let context: Vec<_> = time
                .iter()
                .cloned()
                .chain(own_context.iter().cloned())
                .collect();
            cases.add(
                &what,
                (&caller, &policies),
                action,
                &session(own),
                &context,
                Allowed,
            );
            let other_context: Vec<_> = (time.iter().cloned())
                .chain(
                    own_context
                        .iter()
                        .map(|(k, _)| (k.clone(), json!("AROAOTHER:someone"))),
                )
                .collect();
            cases.add(
                &what,
                (&caller, &policies),
                action,
                &session("mallory-0a1b2c3d4e5f67890"),
                &other_context,
                ImplicitlyDenied,
            );
        }
    }
}

fn admin() -> Value {
    json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})
}

#[test]
fn every_example_grant_means_to_iam_what_it_says() {
    let mut cases = Cases(Vec::new());
    let examples = fleet_access_tests::workspace_root().join("deploy/examples");
    let mut grants = 0;
    for entry in std::fs::read_dir(examples).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        if !text.contains("kind: SessionAccess\n") {
            continue;
        }
        for grant in parse_session_accesses(&text).unwrap() {
            grants += 1;
            let window = grant.spec.window.clone().unwrap_or_default();
            let now = match (&window.not_before, &window.expires_at) {
                (Some(from), _) => (from.0 + std::time::Duration::from_secs(60)).to_string(),
                (None, Some(to)) => (to.0 - std::time::Duration::from_secs(60)).to_string(),
                (None, None) => NOW.to_owned(),
            };
            match grant.spec.effect {
                fleet_access_crds::v1alpha1::Effect::Allow => allow_cases(&mut cases, &grant, &now),
                fleet_access_crds::v1alpha1::Effect::Deny => deny_cases(&mut cases, &grant, &now),
            }
        }
    }
    assert!(grants >= 7, "{grants} example grants");
    cases.check();
}

/// A Deny takes away what an administrator's Allow gives, for the kinds it names.
fn deny_cases(cases: &mut Cases, grant: &SessionAccess, now: &str) {
    let d = render(grant);
    let what = grant.name_any();
    let time = [("aws:CurrentTime".to_owned(), json!(now))];
    let sessions = grant.spec.sessions.clone().unwrap_or_default();
    for Holder {
        caller,
        mut policies,
    } in callers(&d)
    {
        policies.push(admin());
        let mut add = |resource: &str, expected| {
            cases.add(
                &what,
                (&caller, &policies),
                "ssm:StartSession",
                resource,
                &time,
                expected,
            );
        };
        if sessions.ssh {
            add(&aws_document("AWS-StartSSHSession"), ExplicitlyDenied);
        }
        if !sessions.shell {
            add(&own_document("SSM-SessionManagerRunShell"), Allowed);
        }
    }
}

#[test]
fn a_decision_matrix_of_windows_tags_ports_and_denies() {
    let mut cases = Cases(Vec::new());
    let at = |t: &str| [("aws:CurrentTime".to_owned(), json!(t))];

    // Window edges: IAM's DateGreaterThan and DateLessThan are strict.
    let window = grant("window")
        .users(["wendy"])
        .instance_ids(["i-0000000000000000a"])
        .ssh()
        .not_before("2026-12-05T08:00:00Z")
        .expires_at("2026-12-05T10:00:00Z")
        .build();
    let d = render(&window);
    let Holder {
        caller: wendy,
        policies,
    } = callers(&d).remove(0);
    let target = instance("i-0000000000000000a");
    for (time, expected) in [
        ("2026-12-05T07:59:59Z", ImplicitlyDenied),
        ("2026-12-05T08:00:00Z", ImplicitlyDenied),
        ("2026-12-05T08:00:01Z", Allowed),
        ("2026-12-05T09:59:59Z", Allowed),
        ("2026-12-05T10:00:00Z", ImplicitlyDenied),
    ] {
        cases.add(
            "window",
            (&wendy, &policies),
            "ssm:StartSession",
            &target,
            &at(time),
            expected,
        );
        cases.add(
            "window",
            (&wendy, &policies),
            "ssm:StartSession",
            &aws_document("AWS-StartSSHSession"),
            &at(time),
            expected,
        );
    }

    // An approval for one hour, given at 09:00 of a grant whose window lasts the day: IAM
    // allows from the window's start to the approval's end, and nothing after, whatever the
    // operator does.
    let approved = grant("approved")
        .users(["olga"])
        .instance_ids(["i-0000000000000000a"])
        .ssh()
        .not_before("2026-12-05T00:00:00Z")
        .expires_at("2026-12-06T00:00:00Z")
        .uid("uid-1")
        .generation(1)
        .requested_by("olga")
        .build();
    let approval: fleet_access_crds::SessionAccessApproval = serde_json::from_value(json!({
        "apiVersion": "fleetaccess.io/v1alpha1",
        "kind": "SessionAccessApproval",
        "metadata": {"name": "one-hour", "namespace": "team", "creationTimestamp": "2026-12-05T09:00:00Z"},
        "spec": {"grant": {"name": "approved", "uid": "uid-1", "generation": 1},
                 "approvedBy": "security-oncall", "duration": "1h"},
    }))
    .unwrap();
    let verdict = approval::judge(
        &approved,
        vec!["prod".into()],
        &[approval],
        "2026-12-05T09:30:00Z".parse().unwrap(),
    );
    assert!(verdict.allows(), "{verdict:?}");
    let d = render(&approval::effective(&approved, &verdict));
    let Holder {
        caller: olga,
        policies,
    } = callers(&d).remove(0);
    for (time, expected) in [
        ("2026-12-05T09:30:00Z", Allowed),
        ("2026-12-05T09:59:59Z", Allowed),
        ("2026-12-05T10:00:00Z", ImplicitlyDenied),
        ("2026-12-05T18:00:00Z", ImplicitlyDenied),
    ] {
        for resource in [target.clone(), aws_document("AWS-StartSSHSession")] {
            cases.add(
                "approved for an hour",
                (&olga, &policies),
                "ssm:StartSession",
                &resource,
                &at(time),
                expected,
            );
        }
    }

    // The document access check: a caller that turns it off (to reach the account's default
    // shell document without naming it) is refused; one that leaves it on, or sends none, is not.
    for (check, expected) in [
        (Some("false"), ImplicitlyDenied),
        (Some("true"), Allowed),
        (None, Allowed),
    ] {
        let mut context = at("2026-12-05T09:00:00Z").to_vec();
        context.extend(check.map(|c| ("ssm:SessionDocumentAccessCheck".to_owned(), json!(c))));
        let what = format!("document access check {check:?}");
        cases.add(
            &what,
            (&wendy, &policies),
            "ssm:StartSession",
            &target,
            &context,
            expected,
        );
    }

    // Tag values with IAM wildcards: * any run, ? one character; every tag must match.
    let tags = grant("tags")
        .roles(["ops"])
        .tag("Environment", "stag*")
        .tag("Team", "a?c")
        .ssh()
        .build();
    let d = render(&tags);
    let Holder {
        caller: ops,
        policies,
    } = callers(&d).remove(0);
    for (environment, team, expected) in [
        ("staging", "abc", Allowed),
        ("stag", "axc", Allowed),
        ("staging", "abbc", ImplicitlyDenied),
        ("production", "abc", ImplicitlyDenied),
    ] {
        let context = [
            ("aws:CurrentTime".to_owned(), json!(NOW)),
            ("ssm:resourceTag/Environment".to_owned(), json!(environment)),
            ("ssm:resourceTag/Team".to_owned(), json!(team)),
        ];
        cases.add(
            &format!("tags {environment}/{team}"),
            (&ops, &policies),
            "ssm:StartSession",
            &instance(STRANGER),
            &context,
            expected,
        );
    }

    // Ports: the generated document pins the port; AWS's documents take any port, so they stay
    // refused.
    let ports = grant("db")
        .users(["dana"])
        .instance_ids(["i-0000000000000000a"])
        .ports([5432])
        .build();
    let d = render(&ports);
    let Holder {
        caller: dana,
        policies,
    } = callers(&d).remove(0);
    let port_document = (d.documents.iter())
        .find(|doc| doc.name.ends_with(".port5432"))
        .expect("a port document");
    for (document, expected) in [
        (own_document(&port_document.name), Allowed),
        (
            aws_document("AWS-StartPortForwardingSession"),
            ImplicitlyDenied,
        ),
        (
            aws_document("AWS-StartPortForwardingSessionToRemoteHost"),
            ImplicitlyDenied,
        ),
        (aws_document("AWS-StartSSHSession"), ImplicitlyDenied),
        (
            own_document("fleet-access.default.port6379"),
            ImplicitlyDenied,
        ),
    ] {
        cases.add(
            "ports",
            (&dana, &policies),
            "ssm:StartSession",
            &document,
            &at(NOW),
            expected,
        );
    }

    // A Deny of shells everywhere wins over an administrator's Allow, for the account's shell
    // document and every grant's own shell document, and leaves SSH alone.
    let no_shells = grant("no-shells")
        .deny()
        .users(["root-like"])
        .all_instances()
        .shell()
        .build();
    let d = render(&no_shells);
    let Holder {
        caller: root_like,
        mut policies,
    } = callers(&d).remove(0);
    policies.push(admin());
    for (resource, expected) in [
        (own_document("SSM-SessionManagerRunShell"), ExplicitlyDenied),
        (
            own_document("fleet-access.default.team.audited-shell"),
            ExplicitlyDenied,
        ),
        (
            own_document("fleet-access.other-cluster.ops.web-shell"),
            ExplicitlyDenied,
        ),
        (aws_document("AWS-StartSSHSession"), Allowed),
        (instance(STRANGER), Allowed),
    ] {
        cases.add(
            "deny shells",
            (&root_like, &policies),
            "ssm:StartSession",
            &resource,
            &at(NOW),
            expected,
        );
    }

    // A Deny of chosen instances denies every session to them, whatever else allows.
    let quarantine = grant("quarantine")
        .deny()
        .groups(["everyone"])
        .instance_ids(["i-0000000000000000b"])
        .build();
    let d = render(&quarantine);
    let Holder {
        caller: member,
        mut policies,
    } = callers(&d).remove(0);
    policies.push(admin());
    cases.add(
        "quarantine",
        (&member, &policies),
        "ssm:StartSession",
        &instance("i-0000000000000000b"),
        &at(NOW),
        ExplicitlyDenied,
    );
    cases.add(
        "quarantine",
        (&member, &policies),
        "ssm:StartSession",
        &instance(STRANGER),
        &at(NOW),
        Allowed,
    );
    cases.check();
}

/// The operator's own role (`deploy/iam/operator-policy.json`) attaches its policies only to
/// identities the account marks as grantable, and never to itself; it detaches from anyone.
#[test]
fn the_operator_role_attaches_only_to_grantable_identities() {
    let path = fleet_access_tests::workspace_root().join("deploy/iam/operator-policy.json");
    let policy: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let operator = role("fleet-access-operator");
    let ours = format!("arn:aws:iam::{ACCOUNT}:policy/fleet-access/fleet-access.default.role@ci");
    // A grant's own policy of an earlier release, which only the grant's deletion touches.
    let legacy = format!("arn:aws:iam::{ACCOUNT}:policy/fleet-access/fleet-access.default.team.ci");
    let tagged = |key: &str, value: &str| (format!("aws:{key}"), json!(value));
    let foreign = format!("arn:aws:iam::{ACCOUNT}:policy/AdministratorAccess");
    let iam = |kind: &str, name: &str| format!("arn:aws:iam::{ACCOUNT}:{kind}/{name}");
    let grantable = |value: &str| {
        (
            "aws:ResourceTag/fleetaccess.io/grantable".to_owned(),
            json!(value),
        )
    };
    let attaching = |arn: &str| ("iam:PolicyARN".to_owned(), json!(arn));
    let mut cases = Cases(Vec::new());
    let policies = [policy];
    for (action, resource, context, expected) in [
        (
            "iam:AttachRolePolicy",
            iam("role", "ci"),
            vec![attaching(&ours), grantable("true")],
            Allowed,
        ),
        (
            "iam:AttachUserPolicy",
            iam("user", "alice"),
            vec![attaching(&ours), grantable("true")],
            Allowed,
        ),
        (
            "iam:AttachRolePolicy",
            iam("role", "admin"),
            vec![attaching(&ours)],
            ImplicitlyDenied,
        ),
        (
            "iam:AttachRolePolicy",
            iam("role", "admin"),
            vec![attaching(&ours), grantable("false")],
            ImplicitlyDenied,
        ),
        (
            "iam:AttachRolePolicy",
            iam("role", "ci"),
            vec![attaching(&foreign), grantable("true")],
            ImplicitlyDenied,
        ),
        (
            "iam:AttachRolePolicy",
            iam("role", "fleet-access-operator"),
            vec![attaching(&ours), grantable("true")],
            ExplicitlyDenied,
        ),
        (
            "iam:AttachGroupPolicy",
            iam("group", "fleet-access-grantable/web-admins"),
            vec![attaching(&ours)],
            Allowed,
        ),
        (
            "iam:AttachGroupPolicy",
            iam("group", "admins"),
            vec![attaching(&ours)],
            ImplicitlyDenied,
        ),
        (
            "iam:DetachRolePolicy",
            iam("role", "admin"),
            vec![attaching(&ours)],
            Allowed,
        ),
        (
            "iam:DetachRolePolicy",
            iam("role", "admin"),
            vec![attaching(&foreign)],
            ImplicitlyDenied,
        ),
        (
            "iam:CreatePolicy",
            ours.clone(),
            vec![
                tagged("RequestTag/fleetaccess.io/identity", "default/role/ci"),
                ("aws:TagKeys".to_owned(), json!(["fleetaccess.io/identity"])),
            ],
            Allowed,
        ),
        (
            "iam:CreatePolicy",
            ours.clone(),
            vec![
                tagged("RequestTag/fleetaccess.io/grant", "default/team/ci"),
                ("aws:TagKeys".to_owned(), json!(["fleetaccess.io/grant"])),
            ],
            ImplicitlyDenied,
        ),
        ("iam:CreatePolicy", ours.clone(), vec![], ImplicitlyDenied),
        (
            "iam:CreatePolicyVersion",
            ours.clone(),
            vec![tagged(
                "ResourceTag/fleetaccess.io/identity",
                "default/role/ci",
            )],
            Allowed,
        ),
        (
            "iam:CreatePolicyVersion",
            ours.clone(),
            vec![],
            ImplicitlyDenied,
        ),
        (
            "iam:DeletePolicy",
            legacy.clone(),
            vec![tagged(
                "ResourceTag/fleetaccess.io/grant",
                "default/team/ci",
            )],
            Allowed,
        ),
        (
            "iam:CreatePolicyVersion",
            legacy.clone(),
            vec![tagged(
                "ResourceTag/fleetaccess.io/grant",
                "default/team/ci",
            )],
            ImplicitlyDenied,
        ),
        (
            "iam:DeletePolicy",
            foreign.clone(),
            vec![(
                "aws:ResourceTag/fleetaccess.io/grant".to_owned(),
                json!("a/b/c"),
            )],
            ImplicitlyDenied,
        ),
        (
            "ssm:StartSession",
            instance(STRANGER),
            vec![],
            ImplicitlyDenied,
        ),
    ] {
        cases.add(
            "operator role",
            (&operator, &policies),
            action,
            &resource,
            &context,
            expected,
        );
    }
    cases.check();
}

/// Every example grant, each on its own and all merged into one role's policy set (as when they
/// all name that role), gives every request the same decision: the merged set decides as the
/// grants together do (an explicit Deny of any wins, else an Allow of any allows). (Not the
/// bridge's role: no grant may name it.)
#[test]
fn a_merged_policy_set_decides_as_its_grants_do_together() {
    const SHARED: &str = "fleet-access-shared";
    let examples = fleet_access_tests::workspace_root().join("deploy/examples");
    let mut grants = Vec::new();
    for entry in std::fs::read_dir(examples).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        if text.contains("kind: SessionAccess\n") {
            grants.extend(parse_session_accesses(&text).unwrap());
        }
    }
    let rendered: Vec<Desired> = (grants.iter_mut())
        .map(|grant| {
            grant.spec.principals = serde_json::from_value(json!({"roles": [SHARED]})).unwrap();
            render(grant)
        })
        .collect();
    let shared = Principal::new(PrincipalKind::Role, SHARED);
    // Each grant's statements as it renders them, unmerged.
    let separate: Vec<Vec<Value>> = (rendered.iter())
        .map(|d| {
            let statements = d.contributions().remove(&shared).unwrap_or_default();
            (identity::pack(statements, &str::to_owned).unwrap().iter())
                .map(|p| serde_json::from_str(&p.document.0.to_json()).unwrap())
                .collect()
        })
        .collect();
    let merged = policy_sets(&rendered)
        .remove(&shared)
        .expect("the role's set");
    assert!(
        merged.len() < rendered.len(),
        "{} policies for {} grants",
        merged.len(),
        rendered.len()
    );

    // The requests: every resource any grant names, and one none does, at every window edge,
    // with and without every grant's tags.
    let caller = role(SHARED);
    let mut resources = vec![
        ("ssm:StartSession", instance(STRANGER), Vec::new()),
        (
            "ssm:StartSession",
            aws_document("AWS-StartPortForwardingSession"),
            Vec::new(),
        ),
        (
            "ssm:TerminateSession",
            session(&caller.own_session.0),
            caller.own_session.1.clone(),
        ),
        (
            "ssm:TerminateSession",
            session("someone-else-0a1b2c3d4e5f6"),
            Vec::new(),
        ),
    ];
    let mut times = vec![NOW.to_owned()];
    let mut tag_sets: Vec<Vec<(String, Value)>> = vec![Vec::new()];
    for (grant, d) in grants.iter().zip(&rendered) {
        for id in &grant.spec.targets.instance_ids {
            resources.push(("ssm:StartSession", instance(id.as_str()), Vec::new()));
        }
        resources.push((
            "ssm:StartSession",
            aws_document("AWS-StartSSHSession"),
            Vec::new(),
        ));
        for document in &d.documents {
            resources.push(("ssm:StartSession", own_document(&document.name), Vec::new()));
        }
        let window = grant.spec.window.clone().unwrap_or_default();
        for edge in window.not_before.iter().chain(&window.expires_at) {
            for offset in [-60, 60] {
                let at = edge.0 + k8s_openapi::jiff::SignedDuration::from_secs(offset);
                times.push(at.to_string());
            }
        }
        let tags: Vec<(String, Value)> = (grant.spec.targets.tags.iter())
            .map(|(k, v)| (format!("ssm:resourceTag/{k}"), json!(matching(v.as_str()))))
            .collect();
        if !tags.is_empty() {
            tag_sets.push(tags);
        }
    }
    resources.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    resources.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
    times.sort();
    times.dedup();

    // (action, resource, context)
    type Request = (String, String, Vec<(String, Value)>);
    let mut requests: Vec<Request> = Vec::new();
    for (action, resource, extra) in &resources {
        for time in &times {
            let instance_tags = match resource.contains(":instance/") {
                true => tag_sets.as_slice(),
                false => &tag_sets[..1],
            };
            for tags in instance_tags {
                let mut context = vec![("aws:CurrentTime".to_owned(), json!(time))];
                context.extend(tags.iter().cloned());
                context.extend(extra.iter().cloned());
                if *action == "ssm:StartSession" {
                    context.push(("ssm:SessionDocumentAccessCheck".to_owned(), json!("true")));
                }
                requests.push(((*action).to_owned(), resource.clone(), context));
            }
        }
    }
    let decide = |policies: &[Value]| -> Vec<Decision> {
        let batch: Vec<IamRequest> = (requests.iter().enumerate())
            .map(|(index, (action, resource, context))| {
                let id = format!("{index}");
                request(id, (&caller, policies), action, resource, context)
            })
            .collect();
        let evaluated = evaluate(&batch).expect("the IAM evaluator runs (tests/env/setup.sh)");
        (evaluated.into_iter())
            .map(|e| {
                assert_eq!(e.error, None, "request {}", e.id);
                e.decision.expect("a decision")
            })
            .collect()
    };
    let together = (separate.iter().map(|policies| decide(policies))).fold(
        vec![ImplicitlyDenied; requests.len()],
        |acc, decisions| {
            (acc.into_iter().zip(decisions))
                .map(|(a, b)| match (a, b) {
                    (ExplicitlyDenied, _) | (_, ExplicitlyDenied) => ExplicitlyDenied,
                    (Allowed, _) | (_, Allowed) => Allowed,
                    _ => ImplicitlyDenied,
                })
                .collect()
        },
    );
    let merged_decisions = decide(&merged);
    let wrong: Vec<String> = (requests.iter().zip(together.iter().zip(&merged_decisions)))
        .filter(|(_, (a, b))| a != b)
        .map(|((action, resource, context), (a, b))| {
            format!("{action} {resource} {context:?}: merged {b:?}, together {a:?}")
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} decisions differ:\n{}",
        wrong.len(),
        requests.len(),
        wrong.join("\n")
    );
    for decision in [Allowed, ImplicitlyDenied, ExplicitlyDenied] {
        assert!(
            merged_decisions.contains(&decision),
            "the requests reach {decision:?}"
        );
    }
    eprintln!(
        "{} requests decided alike by {} grants together and their merged set of {} policies",
        requests.len(),
        rendered.len(),
        merged.len()
    );
}

/// Grants naming one user from different scopes (namespaces, approvals), as the operator keeps
/// them (`combination::apart`): every session (an instance and a document) the user's whole
/// policy set allows is one the grants of a single scope allow on their own. Without the rule
/// the same grants hand the user sessions no scope granted, which is why it exists.
#[test]
fn a_users_grants_from_different_scopes_allow_no_session_that_no_scope_allows() {
    use fleet_access_operator::model::combination::{self, Scope};

    const DEV: &str = "i-0000000000000000a";
    const PROD: &str = "i-0000000000000000b";
    const OPS: &str = "i-0000000000000000c";
    fn scoped(
        namespace: &str,
        name: &str,
        approval: Option<&str>,
        build: fn(GrantFixture) -> GrantFixture,
    ) -> (Scope, Desired) {
        let scope = Scope {
            namespace: namespace.to_owned(),
            approval: approval.map(str::to_owned),
        };
        let grant = build(GrantFixture::new(namespace, name).users(["ivy"]));
        (scope, render(&grant.build()))
    }
    let grants = vec![
        scoped("dev", "dev-shell", None, |g| g.instance_ids([DEV]).shell()),
        // Approved SSH in production: with the shell above, a shell in production.
        scoped("dev", "prod-ssh", Some("prod-ssh-approved"), |g| {
            g.instance_ids([PROD]).ssh()
        }),
        // Another namespace's SSH on both: a shell on OPS with dev-shell.
        scoped("ops", "ops-ssh", None, |g| g.instance_ids([DEV, OPS]).ssh()),
        // A shell of its own on another instance: each grant's shell document is its own (its
        // run-as user, its logging), so dev-shell's document on OPS is a session nobody granted.
        scoped("ops", "ops-shell", None, |g| g.instance_ids([OPS]).shell()),
        // SSH on dev-shell's own instance: together they allow nothing more.
        scoped("ops", "ops-dev-ssh", None, |g| g.instance_ids([DEV]).ssh()),
        // Within dev-shell's own namespace and boundaries: kept, whatever it adds.
        scoped("dev", "dev-ssh", None, |g| g.instance_ids([DEV]).ssh()),
    ];
    let instances = [DEV, PROD, OPS];
    let documents: Vec<String> = (grants.iter())
        .flat_map(|(_, d)| d.connect.iter().map(|c| c.document.clone()))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let ivy = Principal::new(PrincipalKind::User, "ivy");
    let caller = user("ivy");
    // Which (instance, document) sessions each policy set allows ivy, by the evaluator.
    let sessions_allowed = |sets: &[Vec<Desired>]| -> Vec<Vec<(String, String)>> {
        let mut batch = Vec::new();
        let mut asked = Vec::new();
        for (set, grants) in sets.iter().enumerate() {
            let policies = policy_sets(grants).remove(&ivy).unwrap_or_default();
            let context = [
                ("aws:CurrentTime".to_owned(), json!(NOW)),
                ("ssm:SessionDocumentAccessCheck".to_owned(), json!("true")),
            ];
            let resources =
                (instances.iter().map(|id| instance(id))).chain(documents.iter().map(|name| {
                    match name.starts_with("AWS-") {
                        true => aws_document(name),
                        false => own_document(name),
                    }
                }));
            for resource in resources {
                let id = format!("{set} {resource}");
                let action = "ssm:StartSession";
                batch.push(request(
                    id,
                    (&caller, &policies),
                    action,
                    &resource,
                    &context,
                ));
                asked.push((set, resource));
            }
        }
        let evaluated = evaluate(&batch).expect("the IAM evaluator runs (tests/env/setup.sh)");
        let mut allowed = vec![std::collections::BTreeSet::new(); sets.len()];
        for ((set, resource), e) in asked.into_iter().zip(evaluated) {
            assert_eq!(e.error, None, "request {}", e.id);
            if e.decision == Some(Allowed) {
                allowed[set].insert(resource);
            }
        }
        (allowed.iter())
            .map(|resources| {
                let mut sessions = Vec::new();
                for id in instances {
                    for name in &documents {
                        let document =
                            (resources.iter()).find(|r| r.ends_with(&format!("/{name}")));
                        if resources.contains(&instance(id)) && document.is_some() {
                            sessions.push((id.to_owned(), name.clone()));
                        }
                    }
                }
                sessions
            })
            .collect()
    };
    // The sessions no single scope's grants allow, among those all of `grants` allow together.
    let unscoped = |grants: &[(Scope, Desired)]| -> Vec<(String, String)> {
        let mut scopes: Vec<&Scope> = Vec::new();
        for (scope, _) in grants {
            if !scopes.contains(&scope) {
                scopes.push(scope);
            }
        }
        let mut sets = vec![grants.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>()];
        for scope in &scopes {
            sets.push(
                (grants.iter())
                    .filter(|(s, _)| s == *scope)
                    .map(|(_, d)| d.clone())
                    .collect(),
            );
        }
        let mut allowed = sessions_allowed(&sets).into_iter();
        let together = allowed.next().unwrap_or_default();
        let alone: Vec<(String, String)> = allowed.flatten().collect();
        (together.into_iter())
            .filter(|session| !alone.contains(session))
            .collect()
    };

    let everything = unscoped(&grants);
    assert!(
        (everything.iter()).any(|(id, document)| id == PROD && document.contains("dev-shell")),
        "without the rule, a shell in production nobody granted: {everything:?}"
    );
    let (kept, left_out) = combination::apart(grants.clone(), &combination::GroupMembers::new());
    let name = |owner: &str| owner.rsplit('/').next().unwrap_or_default().to_owned();
    let mut left_out: Vec<String> = left_out.keys().map(|owner| name(owner)).collect();
    left_out.sort();
    assert_eq!(left_out, ["ops-shell", "ops-ssh", "prod-ssh"]);
    let kept: Vec<(Scope, Desired)> = (grants.into_iter())
        .filter(|(_, d)| kept.iter().any(|k| k.grant == d.grant))
        .collect();
    assert_eq!(kept.len(), 3);
    assert_eq!(unscoped(&kept), Vec::<(String, String)>::new());
}
