//! Offline validation: the examples pass; every invalid case fails on the right field with a
//! message that says what to fix. The same invalid cases run against the real API server in the
//! `fleet-access-tests` crate.

#![allow(clippy::panic)] // test helpers report failures by panicking

use fleet_access_crds::validation::{
    FieldError, InvalidObject, parse_session_access_approvals, parse_session_access_policies,
    parse_session_accesses, parse_session_preferences, validate_session_access,
};
use serde::Deserialize;
use serde_json::{Value, json};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples");

#[derive(Deserialize)]
struct InvalidCase {
    case: String,
    field: String,
    message: String,
    spec: Value,
}

fn invalid_cases() -> Vec<InvalidCase> {
    let text = include_str!("data/invalid-session-access.yaml");
    serde_yaml::from_str(text).expect("the invalid corpus parses")
}

fn object(spec: Value) -> Value {
    json!({
        "apiVersion": "fleetaccess.io/v1alpha1",
        "kind": "SessionAccess",
        "metadata": {"name": "under-test", "namespace": "ops"},
        "spec": spec,
    })
}

fn field_errors(result: Result<impl std::fmt::Debug, InvalidObject>) -> Vec<FieldError> {
    match result {
        Err(InvalidObject::Fields(errors)) => errors,
        other => panic!("expected field errors, got {other:?}"),
    }
}

#[test]
fn every_example_is_valid() {
    let mut checked = 0;
    for entry in std::fs::read_dir(EXAMPLES).expect("deploy/examples exists") {
        let path = entry.expect("readable entry").path();
        let text = std::fs::read_to_string(&path).expect("readable example");
        let result = if text.contains("kind: SessionPreferences") {
            parse_session_preferences(&text).map(|v| v.len())
        } else if text.contains("kind: SessionAccessPolicy") {
            parse_session_access_policies(&text).map(|v| v.len())
        } else if text.contains("kind: SessionAccessApproval") {
            parse_session_access_approvals(&text).map(|v| v.len())
        } else {
            parse_session_accesses(&text).map(|v| v.len())
        };
        assert_eq!(
            result.unwrap_or_else(|e| panic!("{}: {e}", path.display())),
            1
        );
        checked += 1;
    }
    assert!(
        checked >= 8,
        "expected the examples in deploy/examples, found {checked}"
    );
}

#[test]
fn every_invalid_case_is_rejected_on_its_field() {
    let cases = invalid_cases();
    assert!(cases.len() >= 15);
    for case in cases {
        let errors = field_errors(validate_session_access(&object(case.spec)));
        assert!(
            errors
                .iter()
                .any(|e| e.path == case.field && e.message.contains(&case.message)),
            "{}: expected an error on {} containing {:?}, got {errors:?}",
            case.case,
            case.field,
            case.message
        );
    }
}

#[test]
fn unknown_fields_are_named_with_the_known_ones() {
    let spec = json!({"principals": {"users": ["alice"]}, "targets": {"instanceId": ["i-0123abcd"]}, "sessions": {"ssh": true}});
    let errors = field_errors(validate_session_access(&object(spec)));
    let unknown = errors
        .iter()
        .find(|e| e.path == "spec.targets.instanceId")
        .expect("named");
    assert!(unknown.message.contains("instanceIds"), "{unknown}");
}

/// What the API server takes in a grant but refuses in the NetworkPolicy the operator writes for
/// it: `plan` refuses it, naming the grant's field.
#[test]
fn bridge_clients_a_network_policy_would_refuse_are_named() {
    let spec = json!({
        "targets": {"instanceIds": ["i-0123abcd"]},
        "sessions": {"ssh": true},
        "bridge": {"clients": [
            {"podSelector": {"matchLabels": {"app": "ci"}}},
            {"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "Equals", "values": ["a"]}]}},
            {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["192.168.0.0/16"]}},
        ]},
    });
    let errors = field_errors(validate_session_access(&object(spec)));
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "spec.bridge.clients[1].namespaceSelector.matchExpressions[0].operator",
            "spec.bridge.clients[2].ipBlock.except[0]",
        ]
    );
}

#[test]
fn wrong_types_are_named() {
    let spec = json!({"principals": {"users": "alice"}, "targets": {"instanceIds": ["i-0123abcd"]}, "sessions": {"ssh": "yes"}});
    let errors = field_errors(validate_session_access(&object(spec)));
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["spec.principals.users", "spec.sessions.ssh"]);
    assert!(errors[0].message.contains("must be an array, not a string"));
}

#[test]
fn wrong_kind_and_name_are_rejected() {
    let mut value = object(
        json!({"principals": {"users": ["alice"]}, "targets": {"allInstances": true}, "sessions": {"ssh": true}}),
    );
    value["kind"] = json!("Sessionaccess");
    value["metadata"]["name"] = json!("Not_A_Name");
    let errors = field_errors(validate_session_access(&value));
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["kind", "metadata.name"]);
}

#[test]
fn bad_yaml_is_a_yaml_error() {
    let result = parse_session_accesses("spec: [unclosed");
    assert!(matches!(result, Err(InvalidObject::Yaml(_))), "{result:?}");
}

#[test]
fn an_empty_file_is_an_error() {
    let errors = field_errors(parse_session_accesses("# nothing\n"));
    assert!(errors[0].message.contains("no SessionAccess"));
}

#[test]
fn preferences_must_be_named_default() {
    let text = "apiVersion: fleetaccess.io/v1alpha1\nkind: SessionPreferences\nmetadata: {name: mine}\nspec: {idleSessionTimeoutMinutes: 5}\n";
    let errors = field_errors(parse_session_preferences(text));
    assert!(
        errors.iter().any(|e| e.message.contains("name it default")),
        "{errors:?}"
    );
}

#[test]
fn defaults_are_applied_when_typed() {
    let text =
        std::fs::read_to_string(format!("{EXAMPLES}/bridge-for-ansible.yaml")).expect("example");
    let grant = parse_session_accesses(&text).expect("valid").remove(0);
    let bridge = grant.spec.bridge.expect("bridge");
    assert!(bridge.enabled);
    assert_eq!(
        bridge.instance_ports(),
        [fleet_access_crds::names::Port(22)]
    );
    // With remote hosts and no ports listed, no instance port is exposed.
    let remote = bridge_with(
        "ports: [22]",
        "{remoteHosts: [{host: db.internal, port: 5432}]}",
    );
    assert_eq!(remote.instance_ports(), []);
    let both = bridge_with(
        "ssh: true",
        "{ports: [22], remoteHosts: [{host: db.internal, port: 5432}]}",
    );
    assert_eq!(both.instance_ports(), [fleet_access_crds::names::Port(22)]);
}

/// The bridge of a grant with `sessions` (plus a remote host) and `bridge`.
fn bridge_with(sessions: &str, bridge: &str) -> fleet_access_crds::v1alpha1::Bridge {
    let text = format!(
        "apiVersion: fleetaccess.io/v1alpha1\nkind: SessionAccess\nmetadata: {{name: g, namespace: ns}}\nspec:\n  targets: {{instanceIds: [i-0123456789abcdef0]}}\n  sessions: {{{sessions}, remoteHosts: [{{host: db.internal, port: 5432}}]}}\n  bridge: {bridge}\n"
    );
    let grant = parse_session_accesses(&text)
        .unwrap_or_else(|e| panic!("valid: {e}"))
        .remove(0);
    grant.spec.bridge.expect("bridge")
}

#[test]
fn a_list_as_kubectl_prints_it_parses_to_its_items() {
    let list = r#"
apiVersion: v1
kind: List
items:
  - apiVersion: fleetaccess.io/v1alpha1
    kind: SessionAccessPolicy
    metadata: {name: a, resourceVersion: "7"}
    spec: {namespaceSelector: {matchLabels: {team: a}}}
  - apiVersion: fleetaccess.io/v1alpha1
    kind: SessionAccessPolicy
    metadata: {name: b}
    spec: {namespaceSelector: {}, sessions: {ssh: true}}
"#;
    let boundaries = parse_session_access_policies(list).expect("a List of boundaries");
    assert_eq!(boundaries.len(), 2);
    assert!(boundaries[1].spec.sessions.ssh);
    let wrong = list.replace("sessions: {ssh: true}", "sessions: {ssh: yes-please}");
    assert!(parse_session_access_policies(&wrong).is_err());
}

#[test]
fn remote_hosts_by_name_and_by_routable_address_are_valid() {
    for host in [
        "db.internal",
        "orders.cluster-c1a2b3.eu-west-1.rds.amazonaws.com",
        "cache",
        "10.0.3.17",
        "2001:db8::17",
    ] {
        let spec = json!({
            "principals": {"users": ["alice"]},
            "targets": {"instanceIds": ["i-0123abcd"]},
            "sessions": {"remoteHosts": [{"host": host, "port": 5432}]},
        });
        validate_session_access(&object(spec)).unwrap_or_else(|e| panic!("{host}: {e}"));
    }
}
