//! Session documents the operator renders: a grant's own shell document (the Session Manager
//! preferences schema, `Standard_Stream`), and `Port` documents that pin where they forward (a
//! port of the instance, or a remote host and port), so that IAM permission on the document is
//! permission on that destination alone.

pub use fleet_access_crds::ssm_documents::{ACCOUNT_SHELL_DOCUMENT, SSH_DOCUMENT};
use fleet_access_crds::v1alpha1::SessionLogging;
use serde_json::{Value, json};

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
