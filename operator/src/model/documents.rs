//! Session documents the operator renders: a grant's own shell document (the Session Manager
//! preferences schema, `Standard_Stream`), and `Port` documents that pin where they forward (a
//! port of the instance, or a remote host and port), so that IAM permission on the document is
//! permission on that destination alone; and how many of the account's session documents the
//! grants of one namespace may hold ([`within_namespace_limit`]).

use std::collections::{BTreeMap, BTreeSet};

pub use fleet_access_crds::ssm_documents::{ACCOUNT_SHELL_DOCUMENT, SSH_DOCUMENT};
use fleet_access_crds::v1alpha1::SessionLogging;
use serde_json::{Value, json};

use crate::model::{desired::Desired, naming};

/// Why a grant is left out: with it, its namespace's grants would hold more session documents
/// than the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverDocumentLimit {
    /// How many documents the namespace's grants would hold with it.
    pub needed: usize,
    /// The most they may hold.
    pub limit: usize,
}

/// Of `granting` (in order of precedence: the earliest created first), the grants whose
/// session documents fit their namespace's `limit`, and the rest, each with why (by owner tag
/// value). A namespace holds the distinct documents its kept grants use: each grant's own,
/// and every shared one, counted even when another namespace's grant uses it too, so that
/// what one tenant may hold never depends on another's grants. A grant that does not fit is
/// left out whole, and the grants after it still get their turn.
pub fn within_namespace_limit(
    granting: Vec<Desired>,
    limit: usize,
) -> (Vec<Desired>, BTreeMap<String, OverDocumentLimit>) {
    let mut held: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let (mut kept, mut over) = (Vec::new(), BTreeMap::new());
    for desired in granting {
        let namespace = naming::owner_namespace(&desired.grant).to_owned();
        let holds = held.entry(namespace).or_default();
        let new: BTreeSet<&String> = (desired.documents.iter())
            .map(|d| &d.name)
            .filter(|name| !holds.contains(*name))
            .collect();
        let needed = holds.len() + new.len();
        if needed > limit {
            over.insert(desired.grant.clone(), OverDocumentLimit { needed, limit });
            continue;
        }
        holds.extend(new.into_iter().cloned());
        kept.push(desired);
    }
    (kept, over)
}

/// The local-port parameter every Port document carries, as AWS's own port forwarding documents
/// define it: any port, 0 for "pick a free one".
const LOCAL_PORT_PATTERN: &str = "^([0-9]|[1-9][0-9]{1,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$";

/// A shell (`Standard_Stream`) session document with the given logging preferences.
pub fn shell_document(description: &str, logging: &SessionLogging) -> Value {
    let minutes = |m: Option<u32>| m.map(|m| m.to_string()).unwrap_or_default();
    let cloud_watch = logging.cloud_watch.as_ref();
    let s3 = logging.s3.as_ref();
    let run_as = logging.run_as.as_ref();
    let profile = logging.shell_profile.clone().unwrap_or_default();
    json!({
        "schemaVersion": "1.0",
        "description": description,
        "sessionType": "Standard_Stream",
        "inputs": {
            "s3BucketName": s3.map(|s| s.bucket_name.to_string()).unwrap_or_default(),
            "s3KeyPrefix": s3.and_then(|s| s.key_prefix.as_ref()).map(ToString::to_string).unwrap_or_default(),
            "s3EncryptionEnabled": s3.is_some_and(|s| s.encryption_enabled),
            "cloudWatchLogGroupName": cloud_watch.map(|c| c.log_group_name.to_string()).unwrap_or_default(),
            "cloudWatchEncryptionEnabled": cloud_watch.is_some_and(|c| c.encryption_enabled),
            "cloudWatchStreamingEnabled": cloud_watch.is_some_and(|c| c.streaming),
            "kmsKeyId": logging.kms_key_id.as_ref().map(ToString::to_string).unwrap_or_default(),
            "runAsEnabled": run_as.is_some_and(|r| r.enabled),
            "runAsDefaultUser": run_as.and_then(|r| r.default_user.as_ref()).map(ToString::to_string).unwrap_or_default(),
            "idleSessionTimeout": minutes(logging.idle_session_timeout_minutes),
            "maxSessionDuration": minutes(logging.max_session_duration_minutes),
            "shellProfile": {"windows": profile.windows, "linux": profile.linux},
        }
    })
}

/// A `Port` session document that forwards to `port` of the instance and nothing else.
pub fn port_document(description: &str, port: u16) -> Value {
    forwarding_document(description, None, port)
}

/// A `Port` session document that forwards to `host`:`port` through the instance and nowhere
/// else: AWS-StartPortForwardingSessionToRemoteHost with both parameters pinned.
pub fn remote_host_document(description: &str, host: &str, port: u16) -> Value {
    forwarding_document(description, Some(host), port)
}

fn forwarding_document(description: &str, host: Option<&str>, port: u16) -> Value {
    let mut document = json!({
        "schemaVersion": "1.0",
        "description": description,
        "sessionType": "Port",
        "parameters": {
            "localPortNumber": {
                "type": "String",
                "description": "(Optional) Port number on the local machine; 0 picks a free one.",
                "allowedPattern": LOCAL_PORT_PATTERN,
                "default": "0"
            }
        },
        "properties": {
            "portNumber": port.to_string(),
            "type": "LocalPortForwarding",
            "localPortNumber": "{{ localPortNumber }}"
        }
    });
    if let Some(host) = host {
        document["properties"]["host"] = json!(host);
    }
    document
}

#[cfg(test)]
mod tests {
    use fleet_access_crds::fixtures::GrantFixture;

    use super::*;
    use crate::{model::desired, settings::Settings};

    fn desired(grant: GrantFixture) -> Desired {
        let grant = grant.users(["u"]).instance_ids(["i-0123456789abcdef0"]);
        desired::compute(&grant.build(), &Settings::default()).expect("computes")
    }

    fn names(kept: &[Desired]) -> Vec<&str> {
        kept.iter().map(|d| d.grant.as_str()).collect()
    }

    #[test]
    fn a_namespace_holds_its_distinct_documents_up_to_the_limit_and_later_grants_still_get_their_turn()
     {
        let granting = vec![
            // Two Port documents.
            desired(GrantFixture::new("a", "one").ports([5432, 6379])),
            // 5432 again, and its own shell document: three.
            desired(GrantFixture::new("a", "two").ports([5432]).shell()),
            // Two more: five.
            desired(GrantFixture::new("a", "three").ports([8080, 9090])),
            // A remote host: four.
            desired(GrantFixture::new("a", "four").remote_host("db.a.internal", 5432)),
            // SSH uses AWS's own document, a Deny none: still four.
            desired(GrantFixture::new("a", "five").ssh()),
            desired(GrantFixture::new("a", "six").deny()),
        ];
        let (kept, over) = within_namespace_limit(granting, 4);
        assert_eq!(
            names(&kept),
            [
                "default/a/one",
                "default/a/two",
                "default/a/four",
                "default/a/five",
                "default/a/six"
            ]
        );
        assert_eq!(
            over,
            BTreeMap::from([(
                "default/a/three".to_owned(),
                OverDocumentLimit {
                    needed: 5,
                    limit: 4
                }
            )])
        );
    }

    #[test]
    fn each_namespace_counts_the_shared_documents_it_uses_whoever_else_uses_them() {
        let flood = (0..5)
            .map(|i| desired(GrantFixture::new("greedy", &format!("g{i}")).ports([1000 + i])));
        let granting: Vec<Desired> = flood
            .chain([
                // The same ports as the greedy namespace's kept grants: a namespace of its own
                // counts them for itself, and fits.
                desired(GrantFixture::new("modest", "m").ports([1000, 1001])),
            ])
            .collect();
        let (kept, over) = within_namespace_limit(granting, 2);
        assert_eq!(
            names(&kept),
            ["default/greedy/g0", "default/greedy/g1", "default/modest/m"]
        );
        let left_out: Vec<&str> = over.keys().map(String::as_str).collect();
        assert_eq!(
            left_out,
            [
                "default/greedy/g2",
                "default/greedy/g3",
                "default/greedy/g4"
            ]
        );
    }
}
