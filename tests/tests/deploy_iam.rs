//! The IAM policies in `deploy/iam/` allow every AWS operation the operator and the agent bridge
//! can call, on the resources they call it on.
//!
//! Where the operations come from: the source of the two SDK wrappers, the only files that use
//! the AWS SDK (`operator/src/aws/sdk.rs`, `agent-bridge/src/ssm.rs`; the test checks that no
//! other source file imports `aws_sdk_*`). Every `.send()` there is matched to its fluent builder
//! (`client.start_session()` → `StartSession`), and the count of builders must equal the count
//! of `.send()` calls, so a new call cannot slip past. We chose this over recording a test run
//! (moto's `/moto-api/recorder`, the SSM emulator's served operations): a recording holds only
//! what that run happened to exercise (expiry's TerminateSession, a 5-version prune, a detach
//! from a group...), and the emulator answers SSM calls moto never sees, so the union would
//! still depend on which scenarios ran. The source lists what the binaries *can* call.
//!
//! Where the resources come from: the operator's own naming and desired state
//! (`fleet_access_operator::{naming, desired}`) for every example grant in `deploy/examples/`:
//! the real policy ARNs under `/fleet-access/`, document names `fleet-access.*`, principals and
//! the ownership tag. Each operation is then evaluated against the policy JSON by a small IAM
//! evaluator (actions, resources with wildcards, explicit Deny, the condition operators the
//! policies use, policy variables); an operator it does not know fails the test rather than
//! passing silently. The bridge's `StartSession` is allowed by the per-grant policy the operator
//! attaches to the bridge's role, so it is evaluated against that policy as rendered, together
//! with `bridge-policy.json`.
//!
//! Not covered: IAM's own evaluation quirks (this is a model of it, not AWS), and calls the AWS
//! credential providers make (STS `AssumeRoleWithWebIdentity` is governed by the trust policies).

#![allow(clippy::panic, clippy::unwrap_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use fleet_access_crds::ssm_documents::ACCOUNT_SHELL_DOCUMENT;
use fleet_access_operator::{
    model::{
        desired::{self, Desired},
        naming::{self, CLUSTER_TAG, IDENTITY_TAG, OWNER_TAG, POLICY_PATH},
        policy::PolicyDocument,
    },
    settings::Settings,
};
use serde_json::Value;

const ACCOUNT: &str = "123456789012";
/// How the account marks the users and roles the operator may attach to (docs/iam.md).
const GRANTABLE_TAG: &str = "aws:ResourceTag/fleetaccess.io/grantable";
/// The IAM path of the groups the operator may attach to.
const GRANTABLE_PATH: &str = "fleet-access-grantable";
const REGION: &str = "eu-west-1";
/// The bridge role's `aws:userid` (role ID and session name), as IRSA sessions have it.
const BRIDGE_USERID: &str = "AROAEXAMPLEBRIDGE000:botocore-session-1700000000";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn policy(path: &str) -> Value {
    serde_json::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

// === the operations, from the source ===

/// `snake_case` → `PascalCase`, the SDK's naming of operations.
fn pascal(snake: &str) -> String {
    snake
        .split('_')
        .map(|w| {
            let mut chars = w.chars();
            chars.next().map_or_else(String::new, |c| {
                c.to_ascii_uppercase().to_string() + chars.as_str()
            })
        })
        .collect()
}

/// The operations a wrapper's fluent builders call, with the receiver they are called on: every
/// `<receiver>.<operation>()` (whitespace allowed before the dot). Every `.send()` of the file
/// must belong to one of them.
fn operations(source: &str, receivers: &[&str]) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for receiver in receivers {
        let mut rest = source;
        while let Some(at) = rest.find(receiver) {
            rest = &rest[at + receiver.len()..];
            let Some(call) = rest.trim_start().strip_prefix('.') else {
                continue;
            };
            let name: String = call
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !name.is_empty() && call[name.len()..].starts_with("()") {
                found.push(((*receiver).to_owned(), pascal(&name)));
            }
        }
    }
    assert_eq!(
        found.len(),
        source.matches(".send()").count(),
        "every .send() has one builder on {receivers:?}: found {found:?}"
    );
    found
}

fn operator_operations() -> BTreeSet<(String, String)> {
    let source = read("operator/src/aws/sdk.rs");
    let mut all = BTreeSet::new();
    for (receiver, op) in operations(&source, &["self.iam", "self.ssm"]) {
        // The metrics label names the same operation.
        assert!(
            source.contains(&format!("\"{op}\"")),
            "sdk.rs labels {op} in its metrics"
        );
        let service = receiver.trim_start_matches("self.").to_owned();
        all.insert((service, op));
    }
    all
}

fn bridge_operations() -> BTreeSet<String> {
    operations(&read("agent-bridge/src/ssm/sdk.rs"), &[".client"])
        .into_iter()
        .map(|(_, op)| op)
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn only_the_two_wrappers_use_the_aws_sdk() {
    let mut files = Vec::new();
    rust_files(&root().join("operator/src"), &mut files);
    rust_files(&root().join("agent-bridge/src"), &mut files);
    let users: BTreeSet<String> = files
        .iter()
        .filter(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            text.contains("aws_sdk_iam") || text.contains("aws_sdk_ssm")
        })
        .map(|f| {
            f.strip_prefix(root())
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let expected: BTreeSet<String> = ["agent-bridge/src/ssm/sdk.rs", "operator/src/aws/sdk.rs"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(users, expected);
}

// === a small IAM evaluator ===

/// Request context: condition keys (lower case) → values.
type Context = BTreeMap<String, Vec<String>>;

/// One call to authorize.
#[derive(Debug, Clone)]
struct Request {
    action: String,
    resource: String,
    context: Context,
}

impl Request {
    fn new(action: &str, resource: &str) -> Self {
        Self {
            action: action.to_owned(),
            resource: resource.to_owned(),
            context: Context::new(),
        }
    }

    fn with(mut self, key: &str, values: &[&str]) -> Self {
        self.context.insert(
            key.to_ascii_lowercase(),
            values.iter().map(|v| (*v).to_owned()).collect(),
        );
        self
    }
}

fn as_list(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items.iter().map(|v| as_list(v).remove(0)).collect(),
        Value::Bool(b) => vec![b.to_string()],
        other => panic!("unexpected policy value {other}"),
    }
}

/// IAM's `*` and `?` wildcards.
fn glob(pattern: &str, text: &str, case_insensitive: bool) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = if case_insensitive {
        (
            pattern.to_ascii_lowercase().chars().collect(),
            text.to_ascii_lowercase().chars().collect(),
        )
    } else {
        (pattern.chars().collect(), text.chars().collect())
    };
    fn go(p: &[char], t: &[char]) -> bool {
        match p.first() {
            None => t.is_empty(),
            Some('*') => go(&p[1..], t) || (!t.is_empty() && go(p, &t[1..])),
            Some('?') => !t.is_empty() && go(&p[1..], &t[1..]),
            Some(c) => t.first() == Some(c) && go(&p[1..], &t[1..]),
        }
    }
    go(&p, &t)
}

/// Replaces `${key}` policy variables from the context.
fn substitute(value: &str, context: &Context) -> String {
    let mut out = value.to_owned();
    while let Some(start) = out.find("${") {
        let end = out[start..].find('}').unwrap() + start;
        let key = out[start + 2..end].to_ascii_lowercase();
        let replacement = context
            .get(&key)
            .and_then(|v| v.first())
            .unwrap_or_else(|| panic!("policy variable {key} not in the request context"))
            .clone();
        out.replace_range(start..=end, &replacement);
    }
    out
}

fn condition_holds(operator: &str, key: &str, wanted: &[String], context: &Context) -> bool {
    let present = context.get(&key.to_ascii_lowercase());
    let wanted: Vec<String> = wanted.iter().map(|w| substitute(w, context)).collect();
    let any = |f: &dyn Fn(&str, &str) -> bool| {
        present.is_some_and(|values| {
            values
                .iter()
                .any(|v| wanted.iter().any(|w| f(w.as_str(), v.as_str())))
        })
    };
    let date = |s: &str| {
        s.parse::<k8s_openapi::jiff::Timestamp>()
            .unwrap_or_else(|e| panic!("not a timestamp: {s}: {e}"))
    };
    match operator {
        "StringEquals" => any(&|w, v| w == v),
        "StringLike" => any(&|w, v| glob(w, v, false)),
        "ArnLike" | "ArnEquals" => any(&|w, v| glob(w, v, false)),
        "Bool" => any(&|w, v| w.eq_ignore_ascii_case(v)),
        "BoolIfExists" => present.is_none() || any(&|w, v| w.eq_ignore_ascii_case(v)),
        "Null" => {
            let want_absent = wanted.first().is_some_and(|w| w == "true");
            want_absent == present.is_none()
        }
        "ForAllValues:StringEquals" => {
            present.is_none_or(|values| values.iter().all(|v| wanted.iter().any(|w| w == v)))
        }
        "DateGreaterThan" => any(&|w, v| date(v) > date(w)),
        "DateLessThan" => any(&|w, v| date(v) < date(w)),
        other => panic!("the evaluator does not know the condition operator {other}"),
    }
}

fn statement_matches(statement: &Value, request: &Request) -> bool {
    assert!(
        statement.get("NotAction").is_none() && statement.get("NotResource").is_none(),
        "the evaluator does not model NotAction/NotResource"
    );
    let actions = as_list(&statement["Action"]);
    if !actions.iter().any(|a| glob(a, &request.action, true)) {
        return false;
    }
    let resources = as_list(&statement["Resource"]);
    if !resources
        .iter()
        .any(|r| glob(&substitute(r, &request.context), &request.resource, false))
    {
        return false;
    }
    let Some(conditions) = statement.get("Condition").and_then(Value::as_object) else {
        return true;
    };
    conditions.iter().all(|(operator, keys)| {
        keys.as_object()
            .unwrap()
            .iter()
            .all(|(key, values)| condition_holds(operator, key, &as_list(values), &request.context))
    })
}

/// Allowed: some Allow statement matches and no Deny statement does.
fn allowed(policies: &[&Value], request: &Request) -> bool {
    let statements: Vec<&Value> = policies
        .iter()
        .flat_map(|p| match &p["Statement"] {
            Value::Array(items) => items.iter().collect::<Vec<_>>(),
            single => vec![single],
        })
        .collect();
    let matching = |effect: &str| {
        statements
            .iter()
            .any(|s| s["Effect"] == effect && statement_matches(s, request))
    };
    !matching("Deny") && matching("Allow")
}

fn assert_allowed(policies: &[&Value], request: &Request) {
    assert!(allowed(policies, request), "not allowed: {request:#?}");
}

fn assert_denied(policies: &[&Value], request: &Request) {
    assert!(
        !allowed(policies, request),
        "allowed but must not be: {request:#?}"
    );
}

#[test]
fn the_evaluator_matches_wildcards_conditions_and_deny() {
    assert!(glob(
        "arn:aws:iam::*:policy/fleet-access/*",
        "arn:aws:iam::1:policy/fleet-access/x",
        false
    ));
    assert!(!glob(
        "arn:aws:iam::*:policy/fleet-access/*",
        "arn:aws:iam::1:policy/other/x",
        false
    ));
    assert!(glob("iam:Get*", "IAM:GetPolicy", true));
    assert!(glob("?*/?*", "ops/web", false));
    assert!(!glob("?*/?*", "/web", false));
    let policy = serde_json::json!({"Statement": [
        {"Effect": "Allow", "Action": "s:A", "Resource": "*",
         "Condition": {"StringLike": {"k": "${aws:userid}"}}},
        {"Effect": "Deny", "Action": "s:A", "Resource": "r/denied"}]});
    let base = Request::new("s:A", "r/ok").with("aws:userid", &["me"]);
    assert_allowed(&[&policy], &base.clone().with("k", &["me"]));
    assert_denied(&[&policy], &base.clone().with("k", &["you"]));
    assert_denied(&[&policy], &base.clone());
    let mut denied = base.with("k", &["me"]);
    denied.resource = "r/denied".into();
    assert_denied(&[&policy], &denied);
}

// === what the operator and the bridge touch, from the example grants ===

fn settings() -> Settings {
    Settings {
        partition: "aws".into(),
        account: Some(ACCOUNT.into()),
        region: Some(REGION.into()),
        ..Settings::default()
    }
}

fn example_grants() -> Vec<Desired> {
    let mut desired = Vec::new();
    for entry in std::fs::read_dir(root().join("deploy/examples")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let Ok(grants) = fleet_access_crds::validation::parse_session_accesses(&text) else {
            continue; // SessionPreferences examples
        };
        for grant in &grants {
            desired.push(desired::compute(grant, &settings()).unwrap());
        }
    }
    assert!(desired.len() >= 5, "the example grants");
    assert!(desired.iter().any(|d| !d.documents.is_empty()));
    assert!(desired.iter().any(|d| d.bridge.is_some()));
    desired
}

fn policy_arn(name: &str) -> String {
    format!("arn:aws:iam::{ACCOUNT}:policy{POLICY_PATH}{name}")
}

/// EC2 instances, and hybrid (`mi-`) managed instances, which SSM names.
fn instance_arn(id: &str) -> String {
    if id.starts_with("mi-") {
        format!("arn:aws:ssm:{REGION}:{ACCOUNT}:managed-instance/{id}")
    } else {
        format!("arn:aws:ec2:{REGION}:{ACCOUNT}:instance/{id}")
    }
}

fn document_arn(name: &str) -> String {
    format!("arn:aws:ssm:{REGION}:{ACCOUNT}:document/{name}")
}

/// Every request the operator makes for one grant, per SDK operation.
fn operator_requests(d: &Desired, operation: &str) -> Vec<Request> {
    let owner = d.grant.as_str();
    // Each identity's set: `(policy name, identity tag value)`, as `controller::identities`
    // creates and changes them.
    let sets: Vec<(String, String)> = (d.contributions().into_keys())
        .map(|identity| {
            let kind = identity.kind.as_str();
            (
                naming::identity_policy_name("default", kind, &identity.name, ""),
                naming::identity_tag_value("default", kind, &identity.name),
            )
        })
        .collect();
    let names: Vec<String> = sets.iter().map(|(name, _)| name.clone()).collect();
    // A grant's own policy of an earlier release, which the grant deletes.
    let legacy = policy_arn(&naming::grant_object_name("default", "ops", "web", ""));
    let mut principals: Vec<String> = Vec::new();
    for user in &d.principals.users {
        principals.push(format!("arn:aws:iam::{ACCOUNT}:user/{user}"));
    }
    for role in &d.principals.roles {
        principals.push(format!("arn:aws:iam::{ACCOUNT}:role/{role}"));
    }
    // The account marks grantable groups by their path (groups carry no tags).
    for group in &d.principals.groups {
        principals.push(format!(
            "arn:aws:iam::{ACCOUNT}:group/{GRANTABLE_PATH}/{group}"
        ));
    }
    if let Some(bridge) = &d.bridge {
        principals.push(format!("arn:aws:iam::{ACCOUNT}:role/{}", bridge.role));
    }
    // Documents with their owner tag: the grant's own, or the cluster's shared ones.
    let documents: Vec<(String, &str, &str)> = (d.documents.iter())
        .map(|doc| match doc.shared {
            true => (doc.name.clone(), CLUSTER_TAG, "default"),
            false => (doc.name.clone(), OWNER_TAG, owner),
        })
        .collect();
    let created = |action: &str, arn: &str, key: &str, value: &str| {
        Request::new(action, arn)
            .with(&format!("aws:RequestTag/{key}"), &[value])
            .with("aws:TagKeys", &[key])
    };
    let owned = |action: &str, arn: &str, key: &str, value: &str| {
        Request::new(action, arn).with(&format!("aws:ResourceTag/{key}"), &[value])
    };
    let on_policies = |f: &dyn Fn(&str) -> Vec<Request>| -> Vec<Request> {
        names.iter().flat_map(|n| f(&policy_arn(n))).collect()
    };
    let on_documents = |f: &dyn Fn(&str, &str, &str) -> Vec<Request>| -> Vec<Request> {
        (documents.iter())
            .flat_map(|(n, key, value)| f(&document_arn(n), key, value))
            .collect()
    };
    let attach = |kind: &str, action: &str| -> Vec<Request> {
        principals
            .iter()
            .filter(|p| p.contains(&format!(":{kind}/")))
            .flat_map(|principal| {
                names.iter().map(move |n| {
                    Request::new(action, principal)
                        .with("iam:PolicyARN", &[&policy_arn(n)])
                        .with(GRANTABLE_TAG, &["true"])
                })
            })
            .collect()
    };
    let iam = |op: &str| format!("iam:{op}");
    let ssm = |op: &str| format!("ssm:{op}");
    match operation {
        "GetPolicy" | "GetPolicyVersion" | "ListPolicyVersions" | "ListEntitiesForPolicy" => {
            on_policies(&|arn| vec![Request::new(&iam(operation), arn)])
        }
        // The sweep of policy sets no grant names: IAM has no resource for a listing.
        "ListPolicies" => vec![Request::new("iam:ListPolicies", "*")],
        // A grant's groups' members, whose sessions its expiry ends.
        "GetGroup" => d
            .principals
            .groups
            .iter()
            .map(|g| Request::new("iam:GetGroup", &format!("arn:aws:iam::{ACCOUNT}:group/{g}")))
            .collect(),
        // The policies already attached to each principal, against IAM's quota.
        "ListAttachedUserPolicies" | "ListAttachedRolePolicies" | "ListAttachedGroupPolicies" => {
            let kind = match operation {
                "ListAttachedUserPolicies" => ":user/",
                "ListAttachedRolePolicies" => ":role/",
                _ => ":group/",
            };
            (principals.iter())
                .filter(|p| p.contains(kind))
                .map(|p| Request::new(&iam(operation), p))
                .collect()
        }
        // Tags on create need iam:TagPolicy as well.
        "CreatePolicy" => (sets.iter())
            .flat_map(|(name, identity)| {
                ["iam:CreatePolicy", "iam:TagPolicy"].map(|action| {
                    Request::new(action, &policy_arn(name))
                        .with(&format!("aws:RequestTag/{IDENTITY_TAG}"), &[identity])
                        .with("aws:TagKeys", &[IDENTITY_TAG])
                })
            })
            .collect(),
        "CreatePolicyVersion" | "DeletePolicyVersion" | "DeletePolicy" => {
            let mut all: Vec<Request> = (sets.iter())
                .map(|(name, identity)| {
                    Request::new(&iam(operation), &policy_arn(name))
                        .with(&format!("aws:ResourceTag/{IDENTITY_TAG}"), &[identity])
                })
                .collect();
            if operation != "CreatePolicyVersion" {
                all.push(owned(&iam(operation), &legacy, OWNER_TAG, owner));
            }
            all
        }
        "AttachUserPolicy" | "DetachUserPolicy" => attach("user", &iam(operation)),
        "AttachRolePolicy" | "DetachRolePolicy" => attach("role", &iam(operation)),
        "AttachGroupPolicy" | "DetachGroupPolicy" => attach("group", &iam(operation)),
        // Grant documents (`fleet-access.*`, tagged) and the account default shell document
        // that SessionPreferences manages (AWS's name, untagged: it belongs to the account).
        "GetDocument" | "DescribeDocument" => {
            let mut all = on_documents(&|arn, _, _| vec![Request::new(&ssm(operation), arn)]);
            all.push(Request::new(
                &ssm(operation),
                &document_arn(ACCOUNT_SHELL_DOCUMENT),
            ));
            all
        }
        // The ownership tag of each document name a grant derives.
        "ListTagsForResource" => {
            on_documents(&|arn, _, _| vec![Request::new(&ssm(operation), arn)])
        }
        // Tags on create need ssm:AddTagsToResource as well.
        "CreateDocument" => {
            let mut all = on_documents(&|arn, key, value| {
                vec![
                    created("ssm:CreateDocument", arn, key, value),
                    created("ssm:AddTagsToResource", arn, key, value),
                ]
            });
            all.push(Request::new(
                "ssm:CreateDocument",
                &document_arn(ACCOUNT_SHELL_DOCUMENT),
            ));
            all
        }
        "UpdateDocument" | "UpdateDocumentDefaultVersion" | "DeleteDocument" => {
            let mut all =
                on_documents(&|arn, key, value| vec![owned(&ssm(operation), arn, key, value)]);
            all.push(Request::new(
                &ssm(operation),
                &document_arn(ACCOUNT_SHELL_DOCUMENT),
            ));
            all
        }
        "ListDocuments" | "DescribeInstanceInformation" | "DescribeSessions" => {
            vec![Request::new(&ssm(operation), "*")]
        }
        "TerminateSession" => vec![Request::new(
            "ssm:TerminateSession",
            &format!("arn:aws:ssm:{REGION}:{ACCOUNT}:session/alice-0a1b2c3d4e5f67890"),
        )],
        other => panic!(
            "operator/src/aws/sdk.rs calls {other}: add it to deploy/iam/operator-policy.json and here"
        ),
    }
}

#[test]
fn the_operator_policy_allows_every_call_of_the_operator() {
    let policy = policy("deploy/iam/operator-policy.json");
    let operations = operator_operations();
    assert!(operations.len() >= 20, "{operations:?}");
    let grants = example_grants();
    for (service, operation) in &operations {
        let mut checked = 0;
        for d in &grants {
            for request in operator_requests(d, operation) {
                assert!(
                    request.action.starts_with(&format!("{service}:")),
                    "{request:?}"
                );
                assert_allowed(&[&policy], &request);
                checked += 1;
            }
        }
        assert!(checked > 0, "{operation} checked on some example grant");
    }
}

#[test]
fn the_operator_policy_refuses_what_the_operator_does_not_own() {
    let policy = policy("deploy/iam/operator-policy.json");
    let foreign = format!("arn:aws:iam::{ACCOUNT}:policy/AdministratorAccess");
    let ours = policy_arn("fleet-access.default.ops.web-1");
    // Other policies: not readable, changeable or attachable.
    assert_denied(&[&policy], &Request::new("iam:GetPolicy", &foreign));
    assert_denied(
        &[&policy],
        &Request::new("iam:DeletePolicy", &foreign)
            .with("aws:ResourceTag/fleetaccess.io/grant", &["a/b"]),
    );
    assert_denied(
        &[&policy],
        &Request::new(
            "iam:AttachRolePolicy",
            &format!("arn:aws:iam::{ACCOUNT}:role/x"),
        )
        .with("iam:PolicyARN", &[&foreign]),
    );
    // Its own path, but untagged: no changes, no untagged creation.
    assert_denied(&[&policy], &Request::new("iam:DeletePolicy", &ours));
    assert_denied(&[&policy], &Request::new("iam:CreatePolicy", &ours));
    assert_denied(
        &[&policy],
        &Request::new("iam:CreatePolicy", &ours)
            .with("aws:RequestTag/fleetaccess.io/grant", &["default/ops/web"])
            .with("aws:TagKeys", &["fleetaccess.io/grant", "extra"]),
    );
    // Only to identities the account marks as grantable; detaching from any.
    let role = |name: &str| format!("arn:aws:iam::{ACCOUNT}:role/{name}");
    let unmarked =
        Request::new("iam:AttachRolePolicy", &role("admin")).with("iam:PolicyARN", &[&ours]);
    assert_denied(&[&policy], &unmarked);
    assert_denied(
        &[&policy],
        &Request::new(
            "iam:AttachUserPolicy",
            &format!("arn:aws:iam::{ACCOUNT}:user/root-like"),
        )
        .with("iam:PolicyARN", &[&ours])
        .with(GRANTABLE_TAG, &["false"]),
    );
    assert_denied(
        &[&policy],
        &Request::new(
            "iam:AttachGroupPolicy",
            &format!("arn:aws:iam::{ACCOUNT}:group/admins"),
        )
        .with("iam:PolicyARN", &[&ours]),
    );
    assert_allowed(
        &[&policy],
        &Request::new("iam:AttachRolePolicy", &role("ci"))
            .with("iam:PolicyARN", &[&ours])
            .with(GRANTABLE_TAG, &["true"]),
    );
    assert_allowed(
        &[&policy],
        &Request::new("iam:DetachRolePolicy", &role("admin")).with("iam:PolicyARN", &[&ours]),
    );
    // Never to itself.
    assert_denied(
        &[&policy],
        &Request::new(
            "iam:AttachRolePolicy",
            &format!("arn:aws:iam::{ACCOUNT}:role/fleet-access-operator"),
        )
        .with("iam:PolicyARN", &[&ours]),
    );
    // SSM documents outside the prefix, or untagged.
    assert_denied(
        &[&policy],
        &Request::new("ssm:UpdateDocument", &document_arn("team-runbook"))
            .with("aws:ResourceTag/fleetaccess.io/grant", &["a/b"]),
    );
    assert_denied(
        &[&policy],
        &Request::new(
            "ssm:DeleteDocument",
            &document_arn("fleet-access.default.ops.web-shell"),
        ),
    );
    // Tags of documents outside the prefix are not read either.
    assert_denied(
        &[&policy],
        &Request::new("ssm:ListTagsForResource", &document_arn("team-runbook")),
    );
    // Nothing of StartSession: the operator grants sessions, it never opens one.
    assert_denied(
        &[&policy],
        &Request::new(
            "ssm:StartSession",
            &format!("arn:aws:ec2:{REGION}:{ACCOUNT}:instance/i-0123456789abcdef0"),
        ),
    );
}

#[test]
fn the_bridge_role_allows_every_call_of_the_bridge() {
    let baseline = policy("deploy/iam/bridge-policy.json");
    let operations = bridge_operations();
    assert_eq!(
        operations,
        [
            "DescribeInstanceInformation",
            "DescribeSessions",
            "ResumeSession",
            "StartSession",
            "TerminateSession"
        ]
        .into_iter()
        .map(str::to_owned)
        .collect::<BTreeSet<_>>(),
        "agent-bridge/src/ssm.rs calls changed: update deploy/iam/bridge-policy.json and this test"
    );
    // DescribeInstanceInformation only explains a failed `agent-bridge proxy`, or checks the
    // agent before `forward --remote-host`, on a laptop (the person's credentials), never in
    // `serve`: the in-cluster role does not need it.
    let cli = read("agent-bridge/src/cli.rs");
    let people: usize = (cli.split("async fn "))
        .filter(|f| f.starts_with("run_proxy") || f.starts_with("run_forward"))
        .map(|f| f.matches(".describe_instance(").count())
        .sum();
    let mut files = Vec::new();
    rust_files(&root().join("agent-bridge/src"), &mut files);
    let uses: usize = files
        .iter()
        .map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .matches(".describe_instance(")
                .count()
        })
        .sum();
    assert_eq!(uses, people);
    assert_denied(
        &[&baseline],
        &Request::new("ssm:DescribeInstanceInformation", "*"),
    );
    // DescribeSessions: the sweep of a dead run's sessions at start (agent-bridge/src/replica.rs).
    assert_allowed(&[&baseline], &Request::new("ssm:DescribeSessions", "*"));

    // StartSession: through the policy the operator attaches to the bridge's role per grant.
    let session = format!("arn:aws:ssm:{REGION}:{ACCOUNT}:session/{BRIDGE_USERID}-0a1b2c3d4e5f6");
    let mut checked = 0;
    for d in example_grants() {
        let Some(bridge) = &d.bridge else { continue };
        let statements = bridge.statements.clone();
        let attached: Value =
            serde_json::from_str(&PolicyDocument { statements }.to_json()).unwrap();
        for instance in &bridge.instances {
            for port in &bridge.ports {
                let document = if port.document.starts_with("AWS-") {
                    format!("arn:aws:ssm:{REGION}::document/{}", port.document)
                } else {
                    document_arn(&port.document)
                };
                for resource in [instance_arn(instance), document] {
                    let request = Request::new("ssm:StartSession", &resource)
                        .with("ssm:SessionDocumentAccessCheck", &["true"])
                        .with("aws:userid", &[BRIDGE_USERID]);
                    assert_allowed(&[&baseline, &attached], &request);
                    checked += 1;
                }
            }
        }
        // A grant's policy never lets the bridge into an instance the grant does not list.
        assert_denied(
            &[&baseline, &attached],
            &Request::new(
                "ssm:StartSession",
                &format!("arn:aws:ec2:{REGION}:{ACCOUNT}:instance/i-0fffffffffffffff0"),
            )
            .with("aws:userid", &[BRIDGE_USERID]),
        );
    }
    assert!(checked > 0);

    // Resume and terminate its own sessions: from the baseline alone, so a session can still
    // be ended after its grant (and the grant's policy) is gone.
    for operation in ["ResumeSession", "TerminateSession"] {
        let own = Request::new(&format!("ssm:{operation}"), &session)
            .with("aws:userid", &[BRIDGE_USERID])
            .with(
                "ssm:resourceTag/aws:ssmmessages:session-id",
                &[BRIDGE_USERID],
            );
        assert_allowed(&[&baseline], &own);
        let other = own.clone().with(
            "ssm:resourceTag/aws:ssmmessages:session-id",
            &["AROAOTHER:alice"],
        );
        assert_denied(&[&baseline], &other);
    }
}
