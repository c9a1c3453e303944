//! Unit tests of what a grant means.

use fleet_access_crds::fixtures::GrantFixture;
use serde_json::{Value, json};

use super::*;
use crate::model::{
    naming,
    policy::{PolicyDocument, canonical},
};

/// Grant `g` of namespace `ns`; each test says what it grants.
fn grant() -> GrantFixture {
    GrantFixture::new("ns", "g")
}

fn compute_default(grant: GrantFixture) -> Desired {
    compute(&grant.build(), &Settings::default()).expect("computes")
}

fn statements(desired: &Desired) -> Vec<Value> {
    (desired.statements.iter())
        .map(|s| serde_json::to_value(s).unwrap())
        .collect()
}

fn statement<'a>(all: &'a [Value], sid: &str) -> &'a Value {
    all.iter()
        .find(|s| s["Sid"] == sid)
        .unwrap_or_else(|| panic!("no statement {sid} in {all:#?}"))
}

#[test]
fn account_and_region_fill_the_arns() {
    let settings = Settings {
        account: Some("123456789012".into()),
        region: Some("eu-west-1".into()),
        ..Settings::default()
    };
    let grant = grant()
        .users(["a"])
        .instance_ids(["i-0123abcd"])
        .ssh()
        .ports([5432]);
    let desired = compute(&grant.build(), &settings).unwrap();
    let all = statements(&desired);
    assert_eq!(
        statement(&all, "StartSessionOnInstances")["Resource"],
        json!([
            "arn:aws:ec2:eu-west-1:123456789012:instance/i-0123abcd",
            "arn:aws:ssm:eu-west-1:*:document/AWS-StartSSHSession",
            "arn:aws:ssm:eu-west-1:123456789012:document/fleet-access.default.port5432"
        ])
    );
}

#[test]
fn window_bounds_every_start_statement_with_literal_times() {
    let desired = compute_default(
        grant()
            .roles(["r"])
            .tag("Env", "dev")
            .ssh()
            .not_before("2026-12-01T00:00:00Z")
            .expires_at("2026-12-02T12:30:00Z"),
    );
    let all = statements(&desired);
    for sid in [
        "StartSessionOnTaggedInstances",
        "StartSessionWithDocuments",
        "TerminateAndResumeOwnSessionsAsRole",
    ] {
        let condition = &statement(&all, sid)["Condition"];
        assert_eq!(
            condition["DateGreaterThan"]["aws:CurrentTime"], "2026-12-01T00:00:00Z",
            "{sid}"
        );
        assert_eq!(
            condition["DateLessThan"]["aws:CurrentTime"], "2026-12-02T12:30:00Z",
            "{sid}"
        );
    }
}

#[test]
fn tags_are_anded_in_one_string_like_block_on_instances_only() {
    let desired = compute_default(
        grant()
            .users(["u"])
            .tag("Env", "dev")
            .tag("Team", "web")
            .ssh(),
    );
    let all = statements(&desired);
    let tagged = statement(&all, "StartSessionOnTaggedInstances");
    assert_eq!(
        tagged["Condition"]["StringLike"],
        json!({"ssm:resourceTag/Env": "dev", "ssm:resourceTag/Team": "web"})
    );
    assert_eq!(
        tagged["Resource"],
        json!([
            "arn:aws:ec2:*:*:instance/*",
            "arn:aws:ssm:*:*:managed-instance/*"
        ])
    );
    let documents = statement(&all, "StartSessionWithDocuments");
    assert!(documents["Condition"].get("StringLike").is_none());
}

#[test]
fn roles_get_the_session_tag_form_and_users_the_username_form() {
    let desired = compute_default(
        grant()
            .users(["u"])
            .roles(["r"])
            .instance_ids(["i-0123abcd"])
            .ssh(),
    );
    let all = statements(&desired);
    assert_eq!(
        statement(&all, "TerminateAndResumeOwnSessionsAsUser")["Resource"],
        "arn:aws:ssm:*:*:session/${aws:username}-*"
    );
    let role = statement(&all, "TerminateAndResumeOwnSessionsAsRole");
    assert_eq!(
        role["Condition"]["StringLike"]["ssm:resourceTag/aws:ssmmessages:session-id"],
        "${aws:userid}"
    );
    let only_roles = compute_default(grant().roles(["r"]).instance_ids(["i-0123abcd"]).ssh());
    assert!(
        statements(&only_roles)
            .iter()
            .all(|s| s["Sid"] != "TerminateAndResumeOwnSessionsAsUser")
    );
}

#[test]
fn shell_grants_get_their_own_document_and_kms_permission() {
    let desired = compute_default(
        grant()
            .users(["u"])
            .instance_ids(["i-0123abcd"])
            .shell()
            .kms_key_id("alias/k")
            .idle_session_timeout_minutes(5),
    );
    assert_eq!(desired.documents.len(), 1);
    let shell = &desired.documents[0];
    assert_eq!(shell.name, "fleet-access.default.ns.g-shell");
    assert_eq!(shell.content["sessionType"], "Standard_Stream");
    assert_eq!(shell.content["inputs"]["idleSessionTimeout"], "5");
    assert_eq!(shell.content["inputs"]["kmsKeyId"], "alias/k");
    let all = statements(&desired);
    let kms = statement(&all, "GenerateSessionDataKey");
    assert_eq!(
        kms["Condition"]["ForAnyValue:StringEquals"]["kms:ResourceAliases"],
        "alias/k"
    );
}

#[test]
fn kms_key_ids_and_arns_are_resources() {
    let shell_with_key = |key: &str| {
        compute_default(
            grant()
                .users(["u"])
                .instance_ids(["i-0123abcd"])
                .shell()
                .kms_key_id(key),
        )
    };
    let id = "1234abcd-12ab-34cd-56ef-1234567890ab";
    let desired = shell_with_key(id);
    assert_eq!(
        statement(&statements(&desired), "GenerateSessionDataKey")["Resource"],
        format!("arn:aws:kms:*:*:key/{id}")
    );
    let arn = format!("arn:aws:kms:us-east-1:123456789012:key/{id}");
    let desired = shell_with_key(&arn);
    assert_eq!(
        statement(&statements(&desired), "GenerateSessionDataKey")["Resource"],
        arn
    );
}

#[test]
fn port_documents_pin_their_port() {
    let desired = compute_default(
        grant()
            .users(["u"])
            .instance_ids(["i-0123abcd"])
            .ports([5432, 6379]),
    );
    let ports: Vec<&Value> = desired
        .documents
        .iter()
        .map(|d| &d.content["properties"]["portNumber"])
        .collect();
    assert_eq!(ports, [&json!("5432"), &json!("6379")]);
    assert!(
        desired
            .documents
            .iter()
            .all(|d| d.content["parameters"].get("portNumber").is_none())
    );
}

/// The API server takes a grant whose bridge clients it would refuse in a NetworkPolicy (the
/// CRD's schema cannot say): the operator refuses it before writing anything, naming the
/// grant's field, as `plan` does offline.
#[test]
fn bridge_clients_the_api_server_would_refuse_in_a_network_policy_are_refused_first() {
    let fixture = grant()
        .instance_ids(["i-0123abcd"])
        .ssh()
        .bridge()
        .spec_json(
            json!({"bridge": {"clients": [{"podSelector": {"matchLabels": {"app name": "ci"}}}]}}),
        );
    assert!(fixture.try_build().is_err(), "plan refuses it");
    let accepted: SessionAccess =
        serde_json::from_value(fixture.json()).expect("as the API server takes it");
    let settings = Settings {
        bridge_role: Some("fleet-access-bridge".into()),
        ..Settings::default()
    };
    let error = compute(&accepted, &settings).expect_err("refused");
    assert_eq!(error.metric_label(), "invalid_grant");
    assert!(
        error.to_string().contains(
            r#"spec.bridge.clients[0].podSelector.matchLabels["app name"]: the key "app name" is not a valid label key"#
        ),
        "{error}"
    );
}

#[test]
fn a_grant_may_not_name_the_bridges_role_in_any_case() {
    let settings = Settings {
        bridge_role: Some("fleet-access-bridge".into()),
        ..Settings::default()
    };
    // A Deny on it would cut every tenant off the bridge; IAM names ignore case.
    for role in ["fleet-access-bridge", "Fleet-Access-Bridge"] {
        let grant = grant().deny().roles([role]).instance_ids(["i-0123abcd"]);
        let error = compute(&grant.build(), &settings).expect_err("refused");
        assert_eq!(error.metric_label(), "bridge_role_named");
        assert!(
            error.to_string().starts_with(&format!(
                "spec.principals.roles: {role} is the bridge's role"
            )),
            "{error}"
        );
    }
    let other = grant()
        .roles(["fleet-access-bridge-admins"])
        .instance_ids(["i-0123abcd"])
        .ssh();
    assert!(compute(&other.build(), &settings).is_ok());
}

#[test]
fn deny_on_instances_denies_every_session_to_them() {
    let desired = compute_default(
        grant()
            .deny()
            .groups(["g"])
            .instance_ids(["i-0123abcd"])
            .tag("Env", "prod"),
    );
    let all = statements(&desired);
    assert!(all.iter().all(|s| s["Effect"] == "Deny"));
    assert_eq!(
        statement(&all, "DenyStartSessionOnInstances")["Resource"],
        "arn:aws:ec2:*:*:instance/i-0123abcd"
    );
    assert_eq!(
        statement(&all, "DenyStartSessionOnTaggedInstances")["Condition"]["StringLike"]["ssm:resourceTag/Env"],
        "prod"
    );
    assert!(desired.documents.is_empty());
}

#[test]
fn deny_shell_everywhere_denies_the_account_and_every_grants_shell_document() {
    let desired = compute_default(grant().deny().users(["u"]).all_instances().shell().ssh());
    let all = statements(&desired);
    let denied = &statement(&all, "DenyStartSessionWithDocuments")["Resource"];
    assert_eq!(
        denied,
        &json!([
            "arn:aws:ssm:*:*:document/AWS-StartSSHSession",
            "arn:aws:ssm:*:*:document/SSM-SessionManagerRunShell",
            "arn:aws:ssm:*:*:document/fleet-access.*-shell"
        ])
    );
    // Every grant's shell document matches the pattern, a shortened name too.
    let pattern = denied[2].as_str().unwrap();
    let shell_grant = grant().users(["u"]).all_instances().shell().build();
    let mut names: Vec<String> = session_documents(&shell_grant, "default")
        .into_iter()
        .map(|d| d.name)
        .collect();
    names.push(naming::grant_object_name(
        "a-long-cluster-name",
        "ns",
        &"n".repeat(200),
        SHELL_SUFFIX,
    ));
    for name in names {
        let arn = format!("arn:aws:ssm:eu-west-1:123456789012:document/{name}");
        assert!(iam_matches(pattern, &arn), "{arn} escapes {pattern}");
    }
}

/// IAM's matching of a resource pattern: `*` any run of characters, `?` one.
fn iam_matches(pattern: &str, text: &str) -> bool {
    fn matches(p: &[u8], t: &[u8]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some((b'*', rest)) => (0..=t.len()).any(|i| matches(rest, &t[i..])),
            Some((b'?', rest)) => !t.is_empty() && matches(rest, &t[1..]),
            Some((c, rest)) => t.first() == Some(c) && matches(rest, &t[1..]),
        }
    }
    matches(pattern.as_bytes(), text.as_bytes())
}

#[test]
fn bridge_only_grants_have_no_principal_policy() {
    let desired = compute_default(
        grant()
            .instance_ids(["i-0123abcd"])
            .ports([8080])
            .bridge_ports([8080]),
    );
    assert!(desired.statements.is_empty());
    let bridge = desired.bridge.expect("bridge");
    assert_eq!(bridge.role, "fleet-access-bridge");
    assert_eq!(
        bridge.ports,
        [BridgePort {
            host: None,
            port: 8080,
            document: "fleet-access.default.port8080".into(),
            port_parameter: None
        }]
    );
    let policy = serde_json::to_value(&bridge.statements).unwrap();
    assert!(
        policy
            .to_string()
            .contains("document/fleet-access.default.port8080")
    );
}

#[test]
fn bridge_needs_a_role() {
    let settings = Settings {
        bridge_role: None,
        ..Settings::default()
    };
    let bridged = grant().instance_ids(["i-0123abcd"]).ssh().bridge();
    let err = compute(&bridged.build(), &settings).unwrap_err();
    assert!(matches!(err, Error::NoBridgeRole), "{err}");
}

#[test]
fn a_disabled_bridge_opens_nothing() {
    let desired = compute_default(
        grant()
            .users(["u"])
            .instance_ids(["i-0123abcd"])
            .ssh()
            .bridge_disabled(),
    );
    assert!(desired.bridge.is_none());
}

#[test]
fn statements_that_alone_need_more_than_twenty_policies_are_refused() {
    let resources: Vec<String> = (0..3000)
        .map(|i| format!("arn:aws:ec2:*:*:instance/i-{i:017x}"))
        .collect();
    let statement = Statement::new("Big", Effect::Allow, &["ssm:StartSession"], resources);
    let err = within_policy_limit(&[statement], "managed policies per principal").unwrap_err();
    assert!(
        matches!(err, Error::TooManyPolicies { limit: 20, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("target instances by tag"));
}

#[test]
fn each_principal_and_the_bridge_role_get_the_grants_statements() {
    let desired = compute_default(
        grant()
            .users(["alice"])
            .roles(["ci"])
            .instance_ids(["i-0123abcd"])
            .ssh()
            .bridge_ports([22]),
    );
    let contributions = desired.contributions();
    let keys: Vec<String> = contributions.keys().map(ToString::to_string).collect();
    assert_eq!(keys, ["User alice", "Role ci", "Role fleet-access-bridge"]);
    let bridge = &contributions[&Principal::new(PrincipalKind::Role, "fleet-access-bridge")];
    assert_eq!(bridge, &desired.bridge.as_ref().unwrap().statements);
    assert_eq!(
        contributions[&Principal::new(PrincipalKind::User, "alice")],
        desired.statements
    );
}

#[test]
fn rendering_is_deterministic() {
    let spec = || {
        grant()
            .users(["u"])
            .groups(["g"])
            .tag("B", "b")
            .tag("A", "a")
            .ssh()
            .shell()
            .ports([1, 2])
    };
    let a = serde_json::to_string(&compute_default(spec())).unwrap();
    let b = serde_json::to_string(&compute_default(spec())).unwrap();
    assert_eq!(a, b);
    let document = PolicyDocument {
        statements: compute_default(spec()).statements,
    };
    assert!(canonical(&document.to_json()).is_ok());
}

#[test]
fn a_client_pod_selector_without_a_namespace_means_the_grants_namespace() {
    let desired = compute_default(grant().instance_ids(["i-0123abcd"]).ssh().spec_json(
        json!({"bridge": {"clients": [
            {"podSelector": {"matchLabels": {"app": "ansible"}}},
            {"podSelector": {"matchLabels": {"app": "ci"}},
             "namespaceSelector": {"matchLabels": {"team": "ci"}}},
            {"namespaceSelector": {"matchLabels": {"team": "ops"}}},
        ]}}),
    ));
    let clients = serde_json::to_value(desired.bridge.expect("bridge").clients).unwrap();
    assert_eq!(
        clients,
        json!([
            {"podSelector": {"matchLabels": {"app": "ansible"}},
             "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns"}}},
            {"podSelector": {"matchLabels": {"app": "ci"}},
             "namespaceSelector": {"matchLabels": {"team": "ci"}}},
            {"namespaceSelector": {"matchLabels": {"team": "ops"}}},
        ])
    );
}
