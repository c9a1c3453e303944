use std::collections::BTreeMap;

use fleet_access_crds::{SessionAccessPolicy, SessionAccessSpec};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use super::{Admission, Grant, admit};

const NAMESPACE: &str = "team-a";

/// A boundary named `name` from its spec's JSON.
fn boundary(name: &str, spec: Value) -> SessionAccessPolicy {
    serde_json::from_value(json!({
        "apiVersion": "fleetaccess.io/v1alpha1",
        "kind": "SessionAccessPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("a boundary")
}

/// Team A's boundary: its roles, two instances and its Team tag, SSH and port 5432, runAs
/// deploy, 8-hour windows, bridge clients from its own namespace and `tools-*`.
fn team_a() -> SessionAccessPolicy {
    boundary(
        "team-a",
        json!({
            "namespaceSelector": {"matchLabels": {"team": "a"}},
            "principals": {"roles": ["team-a-*"], "users": ["alice"]},
            "targets": {
                "instanceIds": ["i-0000000000000000a", "i-0000000000000000b"],
                "tags": {"Team": ["a", "a-*"]},
            },
            "sessions": {"ssh": true, "shell": true, "ports": [5432], "runAsUsers": ["deploy"],
                "remoteHosts": [{"host": "*.db.internal", "ports": [5432]}, {"host": "cache.internal", "ports": [6379]}]},
            "shellLogging": {"cloudWatchLogGroups": ["/fleet/team-a*"], "requireStreaming": true,
                "kmsKeys": ["alias/team-a-*", "arn:aws:kms:us-east-1:111122223333:key/*"]},
            "window": {"maxDuration": "8h"},
            "bridge": {"clientNamespaces": ["tools-*"]},
        }),
    )
}

fn spec(value: Value) -> SessionAccessSpec {
    serde_json::from_value(value).expect("a grant spec")
}

/// A grant inside team A's boundary, changed by `change`.
fn inside(change: impl FnOnce(&mut Value)) -> SessionAccessSpec {
    let mut value = json!({
        "principals": {"roles": ["team-a-ci"]},
        "targets": {"instanceIds": ["i-0000000000000000a"]},
        "sessions": {"ssh": true},
        "window": {"expiresAt": "2026-12-05T16:00:00Z"},
    });
    change(&mut value);
    spec(value)
}

fn created() -> Timestamp {
    "2026-12-05T10:00:00Z".parse().expect("a time")
}

fn labels(team: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("team".to_owned(), team.to_owned()),
        (
            "kubernetes.io/metadata.name".to_owned(),
            NAMESPACE.to_owned(),
        ),
    ])
}

fn judge(spec: &SessionAccessSpec, boundaries: &[SessionAccessPolicy]) -> Admission {
    let labels = labels("a");
    let grant = Grant {
        spec,
        namespace: NAMESPACE,
        namespace_labels: &labels,
        created: Some(created()),
    };
    admit(&grant, boundaries, created())
}

/// The refusals of `spec` by team A's boundary, as `field: message` lines.
fn refusals(spec: &SessionAccessSpec) -> Vec<String> {
    match judge(spec, &[team_a()]) {
        Admission::Admitted { .. } => Vec::new(),
        Admission::Refused(refusals) => refusals.iter().map(ToString::to_string).collect(),
    }
}

/// Asserts that team A's boundary refuses `spec` for `field` alone, with `words` in the
/// message.
fn assert_refused(spec: &SessionAccessSpec, field: &str, words: &str) {
    let refusals = refusals(spec);
    assert_eq!(refusals.len(), 1, "{refusals:#?}");
    let refusal = &refusals[0];
    assert!(refusal.starts_with(&format!("{field}: ")), "{refusal}");
    assert!(refusal.contains(words), "{refusal}");
    assert!(
        refusal.ends_with("(SessionAccessPolicy team-a)"),
        "{refusal}"
    );
}

#[test]
fn a_grant_inside_the_boundary_is_admitted_by_it() {
    let grant = inside(|_| {});
    assert_eq!(
        judge(&grant, &[team_a()]),
        Admission::Admitted {
            boundaries: vec!["team-a".into()]
        }
    );
    let wide = inside(|g| {
        g["principals"] = json!({"roles": ["team-a-ci"], "users": ["alice"]});
        g["targets"] = json!({"tags": {"Team": "a-web", "Environment": "staging"}});
        g["sessions"] = json!({"ssh": true, "shell": true, "ports": [5432]});
        g["logging"] = json!({
            "cloudWatch": {"logGroupName": "/fleet/team-a/shells", "streaming": true},
            "runAs": {"enabled": true, "defaultUser": "deploy"},
        });
        g["bridge"] = json!({"ports": [22, 5432], "clients": [
            {"podSelector": {"matchLabels": {"app": "ansible"}}},
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "tools-ci"}}},
        ]});
    });
    assert_eq!(refusals(&wide), Vec::<String>::new());
}

#[test]
fn a_namespace_no_boundary_selects_admits_nothing() {
    let other = boundary(
        "team-b",
        json!({"namespaceSelector": {"matchLabels": {"team": "b"}}}),
    );
    let Admission::Refused(refusals) = judge(&inside(|_| {}), &[other]) else {
        panic!("admitted without a boundary");
    };
    assert_eq!(refusals.len(), 1);
    assert_eq!(refusals[0].boundary, None);
    assert!(
        refusals[0]
            .message
            .contains("no SessionAccessPolicy selects namespace team-a")
    );
    assert!(matches!(judge(&inside(|_| {}), &[]), Admission::Refused(_)));
}

#[test]
fn every_selecting_boundary_must_admit_the_grant() {
    let everyone = boundary(
        "everyone",
        json!({"namespaceSelector": {}, "principals": {"roles": ["*"]},
               "targets": {"instanceIds": ["i-0000000000000000a"]}, "sessions": {"ssh": true}}),
    );
    let grant = inside(|_| {});
    assert_eq!(
        judge(&grant, &[team_a(), everyone.clone()]),
        Admission::Admitted {
            boundaries: vec!["team-a".into(), "everyone".into()]
        }
    );
    // Inside team A's boundary, outside the one for everyone.
    let port = inside(|g| g["sessions"] = json!({"ports": [5432]}));
    let Admission::Refused(refusals) = judge(&port, &[team_a(), everyone]) else {
        panic!("admitted by one of two boundaries");
    };
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert_eq!(refusals[0].boundary.as_deref(), Some("everyone"));
}

#[test]
fn principals_outside_the_patterns_are_refused_whatever_the_effect() {
    let role = inside(|g| g["principals"] = json!({"roles": ["team-b-ci"]}));
    assert_refused(&role, "spec.principals.roles", "IAM role team-b-ci");
    // A Deny of someone else's role would lock it out.
    let deny = spec(
        json!({"effect": "Deny", "principals": {"roles": ["break-glass"]},
                           "targets": {"instanceIds": ["i-0000000000000000a"]}}),
    );
    let lines = refusals(&deny);
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("spec.principals.roles: IAM role break-glass")),
        "{lines:?}"
    );
    let user = inside(|g| g["principals"] = json!({"users": ["alice2"]}));
    assert_refused(&user, "spec.principals.users", "alice2");
    let group = inside(|g| g["principals"] = json!({"groups": ["admins"]}));
    assert_refused(&group, "spec.principals.groups", "allows (none)");
}

#[test]
fn all_instances_is_for_deny_unless_the_boundary_says_otherwise() {
    let allow = inside(|g| g["targets"] = json!({"allInstances": true}));
    assert_refused(
        &allow,
        "spec.targets.allInstances",
        "Allow on every instance",
    );
    let deny = spec(
        json!({"effect": "Deny", "principals": {"roles": ["team-a-ci"]},
                           "targets": {"allInstances": true}, "sessions": {"ssh": true},
                           "window": {"expiresAt": "2026-12-05T16:00:00Z"}}),
    );
    assert_eq!(refusals(&deny), Vec::<String>::new());
    // What may be denied everywhere may be denied anywhere.
    let deny_elsewhere = spec(
        json!({"effect": "Deny", "principals": {"roles": ["team-a-ci"]},
                                     "targets": {"instanceIds": ["i-0000000000000000c"]},
                                     "window": {"expiresAt": "2026-12-05T16:00:00Z"}}),
    );
    assert_eq!(refusals(&deny_elsewhere), Vec::<String>::new());
}

#[test]
fn a_permissive_boundary_admits_any_valid_grant() {
    let permissive = boundary(
        "single-team",
        json!({
            "namespaceSelector": {},
            "principals": {"users": ["*"], "roles": ["*"], "groups": ["*"]},
            "targets": {"allInstances": ["Allow", "Deny"]},
            "sessions": {"ssh": true, "shell": true, "anyPort": true, "runAsUsers": ["*"]},
            "bridge": {"clientNamespaces": ["*"], "allowIpBlocks": true},
        }),
    );
    let everything = spec(json!({
        "principals": {"users": ["anyone"], "roles": ["admin"], "groups": ["ops"]},
        "targets": {"allInstances": true},
        "sessions": {"ssh": true, "shell": true, "ports": [3306, 8080]},
        "logging": {"runAs": {"enabled": true, "defaultUser": "root"}},
        "bridge": {"ports": [22, 3306], "clients": [
            {"ipBlock": {"cidr": "10.0.0.0/8"}},
            {"namespaceSelector": {"matchLabels": {"team": "b"}}},
        ]},
    }));
    assert_eq!(
        judge(&everything, &[permissive]),
        Admission::Admitted {
            boundaries: vec!["single-team".into()]
        }
    );
}

#[test]
fn instances_and_tags_must_stay_inside() {
    let foreign = inside(|g| g["targets"] = json!({"instanceIds": ["i-0000000000000000c"]}));
    assert_refused(&foreign, "spec.targets.instanceIds", "i-0000000000000000c");
    let value = inside(|g| g["targets"] = json!({"tags": {"Team": "b"}}));
    assert_refused(&value, "spec.targets.tags.Team", "Team=b");
    // A wildcard widens a tag value: `*` matches team B's instances too.
    let wildcard = inside(|g| g["targets"] = json!({"tags": {"Team": "*"}}));
    assert_refused(&wildcard, "spec.targets.tags.Team", "Team=*");
    let missing = inside(|g| g["targets"] = json!({"tags": {"Environment": "staging"}}));
    assert_refused(&missing, "spec.targets.tags", "must include the tag Team");
    let no_tags = boundary(
        "ids-only",
        json!({"namespaceSelector": {}, "principals": {"roles": ["*"]}, "sessions": {"ssh": true}}),
    );
    let tagged = inside(|g| g["targets"] = json!({"tags": {"Team": "a"}}));
    let Admission::Refused(refusals) = judge(&tagged, &[no_tags]) else {
        panic!("tag targets admitted by a boundary without tags");
    };
    assert!(
        refusals[0].message.contains("allows no tag targets"),
        "{refusals:?}"
    );
}

#[test]
fn sessions_ports_and_run_as_must_be_allowed() {
    let port = inside(|g| g["sessions"] = json!({"ports": [3306]}));
    assert_refused(&port, "spec.sessions.ports", "port 3306");
    let root = inside(|g| {
        g["sessions"] = json!({"shell": true});
        g["logging"] = json!({"cloudWatch": {"logGroupName": "/fleet/team-a", "streaming": true},
                              "runAs": {"enabled": true, "defaultUser": "root"}});
    });
    assert_refused(&root, "spec.logging.runAs.defaultUser", "as root");
    let narrow = boundary(
        "ssh-only",
        json!({"namespaceSelector": {}, "principals": {"roles": ["*"]},
               "targets": {"instanceIds": ["i-0000000000000000a"]}, "sessions": {"ssh": true}}),
    );
    let shell = inside(|g| g["sessions"] = json!({"shell": true}));
    let Admission::Refused(refusals) = judge(&shell, &[narrow]) else {
        panic!("shell admitted by an SSH-only boundary");
    };
    assert_eq!(refusals[0].field, "spec.sessions.shell");
}

#[test]
fn remote_hosts_must_be_in_an_allowed_domain_on_an_allowed_port() {
    let remote = |host: &str, port: u16| {
        inside(move |g| g["sessions"] = json!({"remoteHosts": [{"host": host, "port": port}]}))
    };
    for (host, port) in [
        ("orders.db.internal", 5432),
        ("a.b.db.internal", 5432),
        ("cache.internal", 6379),
    ] {
        let admitted = judge(&remote(host, port), &[team_a()]);
        assert!(
            matches!(admitted, Admission::Admitted { .. }),
            "{host}: {admitted:?}"
        );
    }
    assert_refused(
        &remote("orders.db.internal", 6379),
        "spec.sessions.remoteHosts",
        "port 6379",
    );
    assert_refused(
        &remote("db.internal.evil.com", 5432),
        "spec.sessions.remoteHosts",
        "*.db.internal ports 5432",
    );
    assert_refused(
        &remote("other.cache.internal", 6379),
        "spec.sessions.remoteHosts",
        "outside this boundary",
    );
    // A boundary with anyRemoteHost admits every destination the grant's validation accepts.
    let mut open = team_a();
    open.spec.sessions.remote_hosts.clear();
    open.spec.sessions.any_remote_host = true;
    let admitted = judge(&remote("other.cache.internal", 6379), &[open]);
    assert!(
        matches!(admitted, Admission::Admitted { .. }),
        "{admitted:?}"
    );
}

#[test]
fn shells_must_carry_the_required_logging() {
    let unlogged = inside(|g| g["sessions"] = json!({"shell": true}));
    let lines = refusals(&unlogged);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[0].starts_with("spec.logging.cloudWatch: "),
        "{lines:?}"
    );
    assert!(
        lines[1].starts_with("spec.logging.cloudWatch.streaming: "),
        "{lines:?}"
    );
    let elsewhere = inside(|g| {
        g["sessions"] = json!({"shell": true});
        g["logging"] = json!({"cloudWatch": {"logGroupName": "/other", "streaming": true}});
    });
    assert_refused(&elsewhere, "spec.logging.cloudWatch.logGroupName", "/other");
}

#[test]
fn a_shell_grant_asks_data_keys_only_of_the_kms_keys_its_boundary_lists() {
    let with_key = |key: &str| {
        inside(|g| {
            g["sessions"] = json!({"shell": true});
            g["logging"] = json!({"cloudWatch": {"logGroupName": "/fleet/team-a", "streaming": true},
                "kmsKeyId": key});
        })
    };
    assert_eq!(
        refusals(&with_key("alias/team-a-sessions")),
        Vec::<String>::new()
    );
    assert_eq!(
        refusals(&with_key(
            "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
        )),
        Vec::<String>::new()
    );
    assert_refused(
        &with_key("alias/payroll"),
        "spec.logging.kmsKeyId",
        "KMS key alias/payroll",
    );
    // Another account's key, by ARN.
    assert_refused(
        &with_key("arn:aws:kms:us-east-1:444455556666:key/1234abcd-12ab-34cd-56ef-1234567890ab"),
        "spec.logging.kmsKeyId",
        "is not one this boundary accepts",
    );
    // A boundary that lists no keys admits none: without shellLogging, or without its kmsKeys.
    for shell_logging in [
        None,
        Some(json!({"cloudWatchLogGroups": ["/fleet/team-a*"]})),
    ] {
        let mut spec = serde_json::to_value(&team_a().spec).expect("json");
        match shell_logging {
            Some(logging) => spec["shellLogging"] = logging,
            None => drop(spec.as_object_mut().expect("a map").remove("shellLogging")),
        }
        let keyless = boundary("team-a", spec);
        let Admission::Refused(refused) = judge(&with_key("alias/team-a-sessions"), &[keyless])
        else {
            panic!("a key admitted by a boundary that lists none");
        };
        let refused: Vec<String> = refused.iter().map(ToString::to_string).collect();
        assert_eq!(
            refused,
            [
                "spec.logging.kmsKeyId: KMS key alias/team-a-sessions: this boundary accepts no KMS \
              key (it lists none in shellLogging.kmsKeys) (SessionAccessPolicy team-a)"
            ],
        );
    }
}

#[test]
fn windows_must_expire_within_the_longest_allowed() {
    let endless = inside(|g| {
        g.as_object_mut()
            .map(|o| o.remove("window"))
            .map(drop)
            .unwrap_or(())
    });
    assert_refused(
        &endless,
        "spec.window.expiresAt",
        "requires grants to expire",
    );
    // Nine hours from the grant's creation.
    let long = inside(|g| g["window"] = json!({"expiresAt": "2026-12-05T19:00:00Z"}));
    assert_refused(
        &long,
        "spec.window.expiresAt",
        "lasts 9h, longer than the 8h",
    );
    // Eight hours from notBefore, which starts later.
    let later = inside(|g| {
        g["window"] =
            json!({"notBefore": "2026-12-06T00:00:00Z", "expiresAt": "2026-12-06T08:00:00Z"})
    });
    assert_eq!(refusals(&later), Vec::<String>::new());
}

#[test]
fn bridge_clients_must_be_from_allowed_namespaces_and_not_ip_blocks() {
    let with_clients =
        |clients: Value| inside(move |g| g["bridge"] = json!({"ports": [22], "clients": clients}));
    let ip = with_clients(json!([{"ipBlock": {"cidr": "0.0.0.0/0"}}]));
    assert_refused(&ip, "spec.bridge.clients[0].ipBlock", "no ipBlock clients");
    let foreign = with_clients(
        json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "team-b"}}}]),
    );
    assert_refused(
        &foreign,
        "spec.bridge.clients[0].namespaceSelector",
        "namespace team-b",
    );
    let own = with_clients(
        json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}}]),
    );
    assert_eq!(refusals(&own), Vec::<String>::new());
    for unnamed in [
        json!({}),
        json!({"matchLabels": {"team": "a"}}),
        json!({"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "Exists"}]}),
    ] {
        let peer = with_clients(json!([{"namespaceSelector": unnamed}]));
        assert_refused(&peer, "spec.bridge.clients[0].namespaceSelector", "by name");
    }
    let no_bridge = boundary(
        "no-bridge",
        json!({"namespaceSelector": {}, "principals": {"roles": ["*"]},
               "targets": {"instanceIds": ["i-0000000000000000a"]}, "sessions": {"ssh": true}}),
    );
    let Admission::Refused(refusals) = judge(&with_clients(json!([])), &[no_bridge]) else {
        panic!("bridge admitted by a boundary without bridge");
    };
    assert_eq!(refusals[0].field, "spec.bridge");
}

#[test]
fn an_invalid_namespace_selector_fails_closed() {
    let broken = boundary(
        "broken",
        json!({"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "Sometimes"}]}}),
    );
    let Admission::Refused(refusals) = judge(&inside(|_| {}), &[team_a(), broken]) else {
        panic!("admitted past a broken boundary");
    };
    assert_eq!(refusals[0].boundary.as_deref(), Some("broken"));
}
