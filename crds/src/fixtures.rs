//! Test fixtures (cargo feature `fixtures`, off by default; tests enable it as a
//! dev-dependency feature): [`GrantFixture`], the one way tests write a `SessionAccess` grant,
//! whether a unit test hands it to the model or a test against real services applies it.
//!
//! The fixture owns how a test's grant becomes an object: its methods set the typed spec (named
//! after the spec's fields), [`GrantFixture::spec_json`] patches the spec as JSON for what the
//! methods do not say (or for a spec the API must refuse), and every form it builds goes through
//! the API's own validation ([`crate::validation`]) first, so a fixture never hands a test an
//! object the API server would reject, unless the test asks for the unchecked
//! [`GrantFixture::json`].
//!
//! ```
//! # use fleet_access_crds::fixtures::GrantFixture;
//! let grant = GrantFixture::new("team-a", "deploy")
//!     .roles(["ci"])
//!     .instance_ids(["i-0123456789abcdef0"])
//!     .ssh()
//!     .ports([5432])
//!     .expires_at("2026-12-06T20:00:00Z")
//!     .requested_by("bob")
//!     .build();
//! assert_eq!(grant.spec.principals.roles[0].as_str(), "ci");
//! ```

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde_json::{Map, Value};

use crate::{
    SessionAccess, SessionAccessSpec,
    names::{IamGroupName, IamRoleName, IamUserName, InstanceId, KmsKeyId, Port, TagValue},
    v1alpha1::{
        Bridge, Effect, Principals, REQUESTED_BY_ANNOTATION, RemoteHost, SessionLogging, Sessions,
        Targets, Window,
    },
    validation::{self, InvalidObject},
};

/// A `SessionAccess` under construction: `new(namespace, name)`, then what the grant says, then
/// [`build`](Self::build) (the typed object), [`yaml`](Self::yaml) (for `kubectl apply`) or
/// [`json`](Self::json) (unchecked).
#[derive(Clone, Debug)]
#[must_use]
pub struct GrantFixture {
    metadata: ObjectMeta,
    spec: SessionAccessSpec,
    /// JSON merge patches (RFC 7386) over the serialized spec, applied in order.
    patches: Vec<Value>,
}

impl GrantFixture {
    /// An Allow grant named `name` in `namespace` that says nothing yet (no principals, no
    /// targets, no sessions: not valid until the methods say what it grants).
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                ..ObjectMeta::default()
            },
            spec: SessionAccessSpec {
                effect: Effect::Allow,
                principals: Principals::default(),
                targets: Targets::default(),
                sessions: None,
                window: None,
                logging: None,
                bridge: None,
            },
            patches: Vec::new(),
        }
    }

    // === metadata ===

    /// `metadata.uid`, as the API server assigns it.
    pub fn uid(mut self, uid: &str) -> Self {
        self.metadata.uid = Some(uid.to_owned());
        self
    }

    /// `metadata.generation`, as the API server counts spec changes.
    pub fn generation(mut self, generation: i64) -> Self {
        self.metadata.generation = Some(generation);
        self
    }

    /// The requester's annotation ([`REQUESTED_BY_ANNOTATION`]).
    pub fn requested_by(self, user: &str) -> Self {
        self.annotation(REQUESTED_BY_ANNOTATION, user)
    }

    /// One annotation.
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        (self.metadata.annotations.get_or_insert_with(BTreeMap::new))
            .insert(key.to_owned(), value.to_owned());
        self
    }

    // === effect and principals ===

    /// `spec.effect: Deny` (grants are Allow otherwise).
    pub fn deny(mut self) -> Self {
        self.spec.effect = Effect::Deny;
        self
    }

    /// IAM users, added to `spec.principals.users`.
    pub fn users(mut self, users: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.spec.principals.users.extend(named(users, IamUserName));
        self
    }

    /// IAM roles, added to `spec.principals.roles`.
    pub fn roles(mut self, roles: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.spec.principals.roles.extend(named(roles, IamRoleName));
        self
    }

    /// IAM groups, added to `spec.principals.groups`.
    pub fn groups(mut self, groups: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.spec
            .principals
            .groups
            .extend(named(groups, IamGroupName));
        self
    }

    // === targets ===

    /// Instances, added to `spec.targets.instanceIds`.
    pub fn instance_ids(mut self, ids: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.spec
            .targets
            .instance_ids
            .extend(named(ids, InstanceId));
        self
    }

    /// One tag every target instance must carry, in `spec.targets.tags`.
    pub fn tag(mut self, key: &str, value: &str) -> Self {
        (self.spec.targets.tags).insert(key.to_owned(), TagValue(value.to_owned()));
        self
    }

    /// `spec.targets.allInstances: true`.
    pub fn all_instances(mut self) -> Self {
        self.spec.targets.all_instances = true;
        self
    }

    // === sessions ===

    /// `spec.sessions.ssh: true`.
    pub fn ssh(mut self) -> Self {
        self.sessions().ssh = true;
        self
    }

    /// `spec.sessions.shell: true`.
    pub fn shell(mut self) -> Self {
        self.sessions().shell = true;
        self
    }

    /// Ports, added to `spec.sessions.ports`.
    pub fn ports(mut self, ports: impl IntoIterator<Item = u16>) -> Self {
        self.sessions().ports.extend(ports.into_iter().map(Port));
        self
    }

    /// One remote host, added to `spec.sessions.remoteHosts`.
    pub fn remote_host(mut self, host: &str, port: u16) -> Self {
        self.sessions().remote_hosts.push(remote_host(host, port));
        self
    }

    fn sessions(&mut self) -> &mut Sessions {
        self.spec.sessions.get_or_insert_with(Sessions::default)
    }

    // === window ===

    /// `spec.window.notBefore`, an RFC 3339 time (kept to the second, as the API keeps it).
    pub fn not_before(mut self, at: &str) -> Self {
        self.window().not_before = Some(time(at));
        self
    }

    /// `spec.window.expiresAt`, an RFC 3339 time (kept to the second, as the API keeps it).
    pub fn expires_at(mut self, at: &str) -> Self {
        self.window().expires_at = Some(time(at));
        self
    }

    fn window(&mut self) -> &mut Window {
        self.spec.window.get_or_insert_with(Window::default)
    }

    // === logging ===

    /// `spec.logging.kmsKeyId`: a key ID, key ARN, alias or alias ARN.
    pub fn kms_key_id(mut self, key: &str) -> Self {
        self.logging().kms_key_id = Some(KmsKeyId(key.to_owned()));
        self
    }

    /// `spec.logging.idleSessionTimeoutMinutes`.
    pub fn idle_session_timeout_minutes(mut self, minutes: u32) -> Self {
        self.logging().idle_session_timeout_minutes = Some(minutes);
        self
    }

    fn logging(&mut self) -> &mut SessionLogging {
        self.spec
            .logging
            .get_or_insert_with(SessionLogging::default)
    }

    // === bridge ===

    /// `spec.bridge`, enabled, with its defaults (port 22 unless remote hosts are listed, no
    /// clients): what `bridge: {}` says.
    pub fn bridge(mut self) -> Self {
        self.bridge_mut();
        self
    }

    /// `spec.bridge.enabled: false`: the bridge's spec kept, its endpoints closed.
    pub fn bridge_disabled(mut self) -> Self {
        self.bridge_mut().enabled = false;
        self
    }

    /// Instance ports, added to `spec.bridge.ports` (an empty list says "none").
    pub fn bridge_ports(mut self, ports: impl IntoIterator<Item = u16>) -> Self {
        let listed = self.bridge_mut().ports.get_or_insert_with(Vec::new);
        listed.extend(ports.into_iter().map(Port));
        self
    }

    /// One remote host, added to `spec.bridge.remoteHosts`.
    pub fn bridge_remote_host(mut self, host: &str, port: u16) -> Self {
        self.bridge_mut().remote_hosts.push(remote_host(host, port));
        self
    }

    fn bridge_mut(&mut self) -> &mut Bridge {
        self.spec.bridge.get_or_insert_with(|| Bridge {
            enabled: true,
            ports: None,
            remote_hosts: Vec::new(),
            clients: Vec::new(),
        })
    }

    // === the escape hatch ===

    /// Patches the spec as JSON, over what the methods set, whenever this is called: objects
    /// merge field by field, anything else replaces, `null` removes (a JSON merge patch, RFC
    /// 7386). For what the methods do not say (bridge clients, logging destinations) and for
    /// specs the API must refuse (then read them with [`json`](Self::json) or
    /// [`try_build`](Self::try_build)).
    pub fn spec_json(mut self, patch: Value) -> Self {
        self.patches.push(patch);
        self
    }

    // === what it builds ===

    /// The object as a client sends it, unchecked: the one form that may hold a grant the API
    /// refuses.
    pub fn json(&self) -> Value {
        let object = SessionAccess {
            metadata: self.metadata.clone(),
            spec: self.spec.clone(),
            status: None,
        };
        // Derived Serialize impls of plain data with string keys cannot fail.
        let mut value = serde_json::to_value(object).unwrap_or_default();
        if let Some(spec) = value.get_mut("spec") {
            for patch in &self.patches {
                merge_patch(spec, patch);
            }
        }
        value
    }

    /// The grant, as the API's validation reads it: the field errors if the API would refuse it.
    pub fn try_build(&self) -> Result<SessionAccess, InvalidObject> {
        validation::validate_session_access(&self.json())
    }

    /// The grant, as the API's validation reads it.
    ///
    /// # Panics
    ///
    /// If the API would refuse it, naming each field and what is wrong with it.
    #[allow(clippy::panic)] // a fixture that cannot build fails the test that wrote it
    pub fn build(&self) -> SessionAccess {
        self.try_build().unwrap_or_else(|errors| {
            panic!(
                "the fixture is not a valid SessionAccess:\n{errors}\nin {:#}",
                self.json()
            )
        })
    }

    /// The grant as YAML, for `kubectl apply` or `plan -f`.
    ///
    /// # Panics
    ///
    /// If the API would refuse it, as [`build`](Self::build) does.
    pub fn yaml(&self) -> String {
        self.build();
        // A JSON value always serializes to YAML.
        serde_yaml::to_string(&self.json()).unwrap_or_default()
    }
}

/// Names as the spec's newtype `T` holds them.
fn named<T>(
    names: impl IntoIterator<Item = impl Into<String>>,
    newtype: fn(String) -> T,
) -> impl Iterator<Item = T> {
    names.into_iter().map(move |name| newtype(name.into()))
}

fn remote_host(host: &str, port: u16) -> RemoteHost {
    RemoteHost {
        host: crate::names::RemoteHostName(host.to_owned()),
        port: Port(port),
    }
}

fn time(at: &str) -> Time {
    Time(
        at.parse()
            .expect("a fixture's time is RFC 3339, such as 2026-12-06T20:00:00Z"),
    )
}

/// Applies a JSON merge patch (RFC 7386) to `target`.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in fields {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.as_str()).or_insert(Value::Null), value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::validation::parse_session_accesses;

    /// Every method at once: a grant as full as the spec allows.
    fn everything() -> GrantFixture {
        GrantFixture::new("team-a", "deploy")
            .users(["alice"])
            .roles(["ci"])
            .groups(["ops"])
            .instance_ids(["i-0123456789abcdef0", "mi-0123456789abcdef0"])
            .tag("Environment", "stag*")
            .ssh()
            .shell()
            .ports([5432, 6379])
            .remote_host("db.internal", 5432)
            .not_before("2026-12-06T08:00:00Z")
            .expires_at("2026-12-06T20:00:00Z")
            .kms_key_id("alias/sessions")
            .idle_session_timeout_minutes(5)
            .bridge_ports([22, 5432])
            .bridge_remote_host("db.internal", 5432)
            .spec_json(
                json!({"bridge": {"clients": [{"podSelector": {"matchLabels": {"app": "ci"}}}]}}),
            )
            .uid("3f1c0b9e-uid")
            .generation(3)
            .requested_by("bob")
    }

    #[test]
    fn the_methods_write_the_fields_they_are_named_after() {
        assert_eq!(
            everything().json(),
            json!({
                "apiVersion": "fleetaccess.io/v1alpha1",
                "kind": "SessionAccess",
                "metadata": {
                    "name": "deploy", "namespace": "team-a", "uid": "3f1c0b9e-uid",
                    "generation": 3, "annotations": {"fleetaccess.io/requested-by": "bob"},
                },
                "spec": {
                    "effect": "Allow",
                    "principals": {"users": ["alice"], "roles": ["ci"], "groups": ["ops"]},
                    "targets": {
                        "instanceIds": ["i-0123456789abcdef0", "mi-0123456789abcdef0"],
                        "tags": {"Environment": "stag*"},
                    },
                    "sessions": {
                        "ssh": true, "shell": true, "ports": [5432, 6379],
                        "remoteHosts": [{"host": "db.internal", "port": 5432}],
                    },
                    "window": {"notBefore": "2026-12-06T08:00:00Z", "expiresAt": "2026-12-06T20:00:00Z"},
                    "logging": {"kmsKeyId": "alias/sessions", "idleSessionTimeoutMinutes": 5},
                    "bridge": {
                        "enabled": true, "ports": [22, 5432],
                        "remoteHosts": [{"host": "db.internal", "port": 5432}],
                        "clients": [{"podSelector": {"matchLabels": {"app": "ci"}}}],
                    },
                },
            })
        );
    }

    #[test]
    fn what_it_builds_is_what_the_api_reads_from_its_yaml() {
        for fixture in [
            everything(),
            GrantFixture::new("ns", "deny-shells")
                .deny()
                .groups(["everyone"])
                .all_instances()
                .shell(),
            GrantFixture::new("ns", "bridge-only")
                .instance_ids(["i-0123abcd"])
                .ssh()
                .bridge(),
            GrantFixture::new("ns", "closed")
                .users(["u"])
                .instance_ids(["i-0123abcd"])
                .ssh()
                .bridge_disabled(),
        ] {
            let built = fixture.build();
            let parsed = parse_session_accesses(&fixture.yaml()).expect("valid YAML");
            assert_eq!(parsed, std::slice::from_ref(&built));
            let typed: SessionAccess = serde_json::from_value(fixture.json()).expect("a grant");
            assert_eq!(typed, built);
        }
    }

    #[test]
    fn the_spec_patch_merges_replaces_and_removes() {
        let fixture = GrantFixture::new("ns", "g")
            .users(["u"])
            .instance_ids(["i-0123abcd"])
            .ssh()
            .ports([80])
            .expires_at("2026-12-06T20:00:00Z")
            .spec_json(json!({"sessions": {"ports": [443]}, "window": null}))
            .spec_json(json!({"principals": {"roles": ["r"]}}));
        let spec = fixture.build().spec;
        let sessions = spec.sessions.expect("sessions");
        assert!(sessions.ssh, "merged field by field");
        assert_eq!(sessions.ports, [Port(443)], "a list is replaced");
        assert_eq!(spec.window, None, "null removes");
        assert_eq!(spec.principals.users, [IamUserName("u".into())]);
        assert_eq!(spec.principals.roles, [IamRoleName("r".into())]);
    }

    #[test]
    fn a_grant_the_api_refuses_is_refused_with_its_field() {
        let no_sessions = GrantFixture::new("ns", "g")
            .users(["u"])
            .instance_ids(["i-0123abcd"]);
        let Err(InvalidObject::Fields(errors)) = no_sessions.try_build() else {
            panic!("an Allow grant without sessions is refused");
        };
        assert_eq!(errors[0].path, "spec.sessions", "{errors:?}");
        // The unchecked form still says what the test wrote, for the API server to refuse.
        let bad_port = no_sessions.spec_json(json!({"sessions": {"ports": [0]}}));
        assert_eq!(bad_port.json()["spec"]["sessions"]["ports"], json!([0]));
        assert!(bad_port.try_build().is_err());
    }

    #[test]
    #[should_panic(expected = "spec.sessions.ports[0]")]
    fn building_a_grant_the_api_refuses_fails_naming_the_field() {
        GrantFixture::new("ns", "g")
            .users(["u"])
            .instance_ids(["i-0123abcd"])
            .ports([0])
            .build();
    }

    #[test]
    fn times_are_kept_to_the_second() {
        let grant = GrantFixture::new("ns", "g")
            .users(["u"])
            .instance_ids(["i-0123abcd"])
            .ssh()
            .expires_at("2026-12-06T20:00:00.750Z");
        assert_eq!(
            grant.json()["spec"]["window"]["expiresAt"],
            "2026-12-06T20:00:00Z"
        );
    }
}
