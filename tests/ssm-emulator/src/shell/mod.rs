//! Shell sessions (`sessionType: Standard_Stream`), as the agent runs them on Linux
//! (`agent/session/plugins/standardstream`, `agent/session/shell`): the document's `inputs` read
//! as strictly as the agent's document parser reads them ([`ShellInputs`]), `sh` under a
//! pseudo-terminal fed by the client's Output and Size payloads (`process`), and the session's
//! transcript uploaded per the document to CloudWatch Logs and S3 (`transcript` formats it,
//! purely; `aws` calls the upstream, moto), and KMS session encryption (`encryption`).
//!
//! ```text
//!  mod.rs         ShellInputs: what a shell document asks of the agent
//!  process.rs     the shell's task: checks, sh on a pty, its output, the end of its transcript
//!  transcript.rs  pure: ANSI stripping, CloudWatch events, the S3 key, Size payloads
//!  aws.rs         the agent's AWS calls: logging (CloudWatch Logs, S3) and KMS Decrypt
//!  encryption.rs  pure: the data key's halves, AES-256-GCM payloads, the challenge
//! ```

use serde_json::Value;

pub(crate) mod aws;
pub(crate) mod encryption;
pub(crate) mod process;
pub(crate) mod transcript;

/// The agent's user for shells when runAs is off (`appconfig.DefaultRunAsUserName`).
pub(crate) const DEFAULT_RUN_AS_USER: &str = "ssm-user";

/// What a Standard_Stream document's `inputs` ask of the agent (`contracts.SessionInputs`),
/// and of the service (the timeouts, which the agent never reads).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ShellInputs {
    pub(crate) s3_bucket_name: String,
    pub(crate) s3_key_prefix: String,
    pub(crate) s3_encryption_enabled: bool,
    pub(crate) cloud_watch_log_group_name: String,
    pub(crate) cloud_watch_encryption_enabled: bool,
    pub(crate) cloud_watch_streaming_enabled: bool,
    pub(crate) kms_key_id: String,
    pub(crate) run_as_enabled: bool,
    pub(crate) run_as_default_user: String,
    /// Minutes without client input before the service ends the session (1-60).
    pub(crate) idle_session_timeout_minutes: Option<u32>,
    /// Minutes after which the service ends the session (1-1440).
    pub(crate) max_session_duration_minutes: Option<u32>,
    /// `shellProfile.linux`: typed into the shell once it starts.
    pub(crate) shell_profile_linux: String,
}

impl ShellInputs {
    /// Reads a Standard_Stream document's content: `schemaVersion` 1.0 (the only one the agent
    /// supports), the booleans as the agent converts them (a JSON boolean, or a string Go's
    /// `strconv.ParseBool` reads; `cloudWatchStreamingEnabled` only a JSON boolean, being a
    /// `bool` field), the timeouts within the ranges the preferences allow. Unknown inputs are
    /// ignored, as by the agent.
    pub(crate) fn from_document(content: &Value) -> Result<Self, String> {
        match content.get("schemaVersion").and_then(Value::as_str) {
            Some("1.0") => {}
            other => {
                return Err(format!(
                    "Document with schema version {} is not supported by this version of ssm agent, please update to latest version",
                    other.unwrap_or("(none)")
                ));
            }
        }
        let empty = serde_json::Map::new();
        let inputs = content
            .get("inputs")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let text = |key: &str| -> Result<String, String> {
            match inputs.get(key) {
                None | Some(Value::Null) => Ok(String::new()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(format!("invalid input {key}: {other} is not a string")),
            }
        };
        let flag = |key: &str| -> Result<bool, String> {
            match inputs.get(key) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(Value::String(s)) if s.is_empty() => Ok(false),
                Some(Value::String(s)) => go_parse_bool(s)
                    .ok_or_else(|| format!("invalid input {key}: {s:?} is not a boolean")),
                Some(other) => Err(format!("invalid parameter type for {key}: {other}")),
            }
        };
        let streaming = match inputs.get("cloudWatchStreamingEnabled") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(format!(
                    "invalid input cloudWatchStreamingEnabled: {other} is not a JSON boolean"
                ));
            }
        };
        let minutes = |key: &str, max: u32| -> Result<Option<u32>, String> {
            let value = match inputs.get(key) {
                None | Some(Value::Null) => return Ok(None),
                Some(Value::String(s)) if s.is_empty() => return Ok(None),
                Some(Value::String(s)) => s.parse::<u32>().ok(),
                Some(Value::Number(n)) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
                Some(_) => None,
            };
            match value {
                Some(m) if (1..=max).contains(&m) => Ok(Some(m)),
                _ => Err(format!(
                    "invalid input {key}: {} is not a number of minutes from 1 to {max}",
                    inputs.get(key).map(Value::to_string).unwrap_or_default()
                )),
            }
        };
        let shell_profile_linux = match inputs.get("shellProfile") {
            None | Some(Value::Null) => String::new(),
            Some(Value::Object(profile)) => match profile.get("linux") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => return Err(format!("invalid input shellProfile.linux: {other}")),
            },
            Some(other) => return Err(format!("invalid input shellProfile: {other}")),
        };
        Ok(Self {
            s3_bucket_name: text("s3BucketName")?,
            s3_key_prefix: text("s3KeyPrefix")?,
            s3_encryption_enabled: flag("s3EncryptionEnabled")?,
            cloud_watch_log_group_name: text("cloudWatchLogGroupName")?,
            cloud_watch_encryption_enabled: flag("cloudWatchEncryptionEnabled")?,
            cloud_watch_streaming_enabled: streaming,
            kms_key_id: text("kmsKeyId")?,
            run_as_enabled: flag("runAsEnabled")?,
            run_as_default_user: text("runAsDefaultUser")?,
            idle_session_timeout_minutes: minutes("idleSessionTimeout", 60)?,
            max_session_duration_minutes: minutes("maxSessionDuration", 1440)?,
            shell_profile_linux,
        })
    }
}

/// Go's `strconv.ParseBool`.
fn go_parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_operators_document_reads_as_the_agent_reads_it() {
        let content = json!({
            "schemaVersion": "1.0",
            "sessionType": "Standard_Stream",
            "inputs": {
                "s3BucketName": "audit", "s3KeyPrefix": "ssm/", "s3EncryptionEnabled": true,
                "cloudWatchLogGroupName": "/ssm/sessions", "cloudWatchEncryptionEnabled": "false",
                "cloudWatchStreamingEnabled": true, "kmsKeyId": "", "runAsEnabled": "True",
                "runAsDefaultUser": "ec2-user", "idleSessionTimeout": "20",
                "maxSessionDuration": "", "shellProfile": {"windows": "", "linux": "cd /tmp"},
                "somethingNewer": 1
            }
        });
        let inputs = ShellInputs::from_document(&content).expect("valid");
        assert_eq!(inputs.s3_bucket_name, "audit");
        assert!(inputs.s3_encryption_enabled);
        assert!(!inputs.cloud_watch_encryption_enabled);
        assert!(inputs.cloud_watch_streaming_enabled);
        assert!(inputs.run_as_enabled);
        assert_eq!(inputs.idle_session_timeout_minutes, Some(20));
        assert_eq!(inputs.max_session_duration_minutes, None);
        assert_eq!(inputs.shell_profile_linux, "cd /tmp");
    }

    #[test]
    fn what_the_agent_refuses_is_refused_with_the_input_named() {
        let refused = |inputs: Value| {
            ShellInputs::from_document(&json!({"schemaVersion": "1.0", "inputs": inputs}))
                .expect_err("refused")
        };
        assert!(refused(json!({"cloudWatchStreamingEnabled": "true"})).contains("JSON boolean"));
        assert!(refused(json!({"s3EncryptionEnabled": "yes"})).contains("s3EncryptionEnabled"));
        assert!(refused(json!({"runAsEnabled": 1})).contains("runAsEnabled"));
        assert!(refused(json!({"idleSessionTimeout": "61"})).contains("1 to 60"));
        assert!(refused(json!({"maxSessionDuration": "0"})).contains("1 to 1440"));
        let old = ShellInputs::from_document(&json!({"schemaVersion": "0.9"})).expect_err("old");
        assert!(old.contains("schema version 0.9"), "{old}");
    }
}
