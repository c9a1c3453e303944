//! The JSON payloads of the data channel (docs/protocol.md §1.4, §3.4, §4.2, §5.2).
//! Pure serde types; no I/O. The version gates the handshake decides by are
//! `fleet_access_crds::agent_version`'s, shared with the operator.

use serde::{Deserialize, Serialize};

/// The ClientVersion we report: four parts and above 1.2.331.0, so the agent turns its smux
/// keepalive off and uses mux for LocalPortForwarding (docs/protocol.md §5.4). Same value aws-ssm-bridge reports.
pub const CLIENT_VERSION: &str = "1.2.764.0";
/// `MessageSchemaVersion` of the open message.
pub const MESSAGE_SCHEMA_VERSION: &str = "1.0";

/// ActionStatus: success.
pub const ACTION_SUCCESS: u32 = 1;
/// ActionStatus: failed.
pub const ACTION_FAILED: u32 = 2;
/// ActionStatus: unsupported.
pub const ACTION_UNSUPPORTED: u32 = 3;

/// The open message: the first (text) WebSocket frame (docs/protocol.md §1.4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct OpenDataChannel {
    /// Always "1.0".
    pub message_schema_version: String,
    /// A fresh UUID v4 per open, lowercase hyphenated.
    pub request_id: String,
    /// TokenValue from StartSession/ResumeSession.
    pub token_value: String,
    /// One UUID per client process, reused across reconnects.
    pub client_id: String,
    /// The client version string (gates agent behaviour).
    pub client_version: String,
}

impl OpenDataChannel {
    /// Builds the open message with [`CLIENT_VERSION`].
    pub fn new(token_value: &str, request_id: uuid::Uuid, client_id: uuid::Uuid) -> Self {
        Self {
            message_schema_version: MESSAGE_SCHEMA_VERSION.to_owned(),
            request_id: request_id.hyphenated().to_string(),
            token_value: token_value.to_owned(),
            client_id: client_id.hyphenated().to_string(),
            client_version: CLIENT_VERSION.to_owned(),
        }
    }

    /// The JSON text of the frame.
    pub fn to_json(&self) -> String {
        // Serialising a struct of strings cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// HandshakeRequest, PayloadType 5 (agent to client).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HandshakeRequest {
    /// Agent version, e.g. `3.3.1345.0`.
    pub agent_version: String,
    /// Actions the client must process, in order.
    #[serde(default)]
    pub requested_client_actions: Vec<RequestedClientAction>,
}

/// One requested action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RequestedClientAction {
    /// `SessionType`, `KMSEncryption`, or something newer.
    pub action_type: String,
    /// Action-specific parameters.
    #[serde(default)]
    pub action_parameters: serde_json::Value,
}

/// HandshakeResponse, PayloadType 6 (client to agent, the client's seq 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HandshakeResponse {
    /// Our version string.
    pub client_version: String,
    /// One entry per requested action, in order.
    pub processed_client_actions: Vec<ProcessedClientAction>,
    /// Errors, or null.
    pub errors: Option<Vec<String>>,
}

/// One processed action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ProcessedClientAction {
    /// Echo of the requested ActionType.
    pub action_type: String,
    /// 1 success, 2 failed, 3 unsupported.
    pub action_status: u32,
    /// Action result (null for SessionType).
    pub action_result: serde_json::Value,
    /// Error text, empty on success.
    pub error: String,
}

/// HandshakeComplete, PayloadType 7.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HandshakeComplete {
    /// Go `time.Duration`: nanoseconds.
    #[serde(default)]
    pub handshake_time_to_complete: i64,
    /// A message for the user; may be empty.
    #[serde(default)]
    pub customer_message: String,
}

/// The `acknowledge` payload (docs/protocol.md §4.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcknowledgeContent {
    /// Type of the acked message.
    #[serde(rename = "AcknowledgedMessageType")]
    pub message_type: String,
    /// Logical UUID of the acked message, lowercase hyphenated.
    #[serde(rename = "AcknowledgedMessageId")]
    pub message_id: String,
    /// Its sequence number; the only field a receiver uses.
    #[serde(rename = "AcknowledgedMessageSequenceNumber")]
    pub sequence_number: i64,
    /// Always true.
    #[serde(rename = "IsSequentialMessage")]
    pub is_sequential_message: bool,
}

/// The `channel_closed` payload (docs/protocol.md §3.4); every field optional on read.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ChannelClosed {
    /// Message id (string).
    pub message_id: String,
    /// Creation date (a string).
    pub created_date: String,
    /// Destination id.
    pub destination_id: String,
    /// Session id.
    pub session_id: String,
    /// "channel_closed".
    pub message_type: String,
    /// Schema version.
    pub schema_version: i64,
    /// Why the channel closed; may be empty.
    pub output: String,
}

/// What the handshake request tells the client about the session.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionProperties {
    /// The `SessionType` action's SessionType (e.g. `Port`).
    pub session_type: Option<String>,
    /// Properties.type (e.g. `LocalPortForwarding`; absent for SSH).
    pub port_type: Option<String>,
    /// Properties.portNumber.
    pub port_number: Option<String>,
    /// Properties.host.
    pub host: Option<String>,
}

impl HandshakeRequest {
    /// Extracts the SessionType action's session type and properties.
    pub fn session_properties(&self) -> SessionProperties {
        let mut out = SessionProperties::default();
        for action in &self.requested_client_actions {
            if action.action_type != "SessionType" {
                continue;
            }
            let params = &action.action_parameters;
            out.session_type = params
                .get("SessionType")
                .and_then(|v| v.as_str())
                .map(str::to_owned);
            let props = params.get("Properties");
            let text = |key: &str| {
                props.and_then(|p| p.get(key)).and_then(|v| match v {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Number(n) => Some(n.to_string()),
                    _ => None,
                })
            };
            out.port_type = text("type");
            out.port_number = text("portNumber");
            out.host = text("host");
        }
        out
    }

    /// The KMSEncryption action's key, when the agent asks for session encryption.
    pub fn kms_key_id(&self) -> Option<String> {
        self.requested_client_actions
            .iter()
            .find(|a| a.action_type == "KMSEncryption")
            .map(|a| {
                a.action_parameters
                    .get("KMSKeyId")
                    .and_then(|k| k.as_str())
                    .unwrap_or_default()
                    .to_owned()
            })
    }

    /// Our answer: SessionType succeeds; KMSEncryption succeeds with `kms`'s result (the data
    /// key for the agent) or fails with its error (`None`: this session cannot encrypt; Port
    /// sessions never ask); anything else is unsupported.
    pub fn response(
        &self,
        client_version: &str,
        kms: Option<Result<serde_json::Value, String>>,
    ) -> HandshakeResponse {
        let processed_client_actions = self
            .requested_client_actions
            .iter()
            .map(|action| {
                let (status, result, error) = match (action.action_type.as_str(), &kms) {
                    ("SessionType", _) => (ACTION_SUCCESS, serde_json::Value::Null, String::new()),
                    ("KMSEncryption", Some(Ok(result))) => {
                        (ACTION_SUCCESS, result.clone(), String::new())
                    }
                    ("KMSEncryption", Some(Err(error))) => {
                        (ACTION_FAILED, serde_json::Value::Null, error.clone())
                    }
                    ("KMSEncryption", None) => (
                        ACTION_FAILED,
                        serde_json::Value::Null,
                        "KMS encryption is only for shell sessions".to_owned(),
                    ),
                    (other, _) => (
                        ACTION_UNSUPPORTED,
                        serde_json::Value::Null,
                        format!("unsupported action {other}"),
                    ),
                };
                ProcessedClientAction {
                    action_type: action.action_type.clone(),
                    action_status: status,
                    action_result: result,
                    error,
                }
            })
            .collect();
        HandshakeResponse {
            client_version: client_version.to_owned(),
            processed_client_actions,
            errors: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use fleet_access_crds::agent_version::Version;

    use super::*;

    #[test]
    fn the_client_version_keeps_the_agents_smux_keepalive_off() {
        assert!(Version::above(CLIENT_VERSION, "1.2.331.0"));
        assert_eq!(CLIENT_VERSION.split('.').count(), 4);
    }

    #[test]
    fn parses_handshake_request_and_answers_in_order() {
        let json = r#"{"AgentVersion":"3.3.1345.0","RequestedClientActions":[
            {"ActionType":"SessionType","ActionParameters":{"SessionType":"Port",
              "Properties":{"host":"172.31.25.54","localPortNumber":"7406","portNumber":"3000","type":"LocalPortForwarding"}}},
            {"ActionType":"KMSEncryption","ActionParameters":{"KMSKeyId":"k","Challenge":"c"}},
            {"ActionType":"Future","ActionParameters":null}]}"#;
        let req: HandshakeRequest = serde_json::from_str(json).unwrap();
        let props = req.session_properties();
        assert_eq!(props.session_type.as_deref(), Some("Port"));
        assert_eq!(props.port_type.as_deref(), Some("LocalPortForwarding"));
        assert_eq!(props.port_number.as_deref(), Some("3000"));
        assert_eq!(props.host.as_deref(), Some("172.31.25.54"));
        let resp = req.response(CLIENT_VERSION, None);
        let statuses: Vec<u32> = resp
            .processed_client_actions
            .iter()
            .map(|a| a.action_status)
            .collect();
        assert_eq!(statuses, vec![1, 2, 3]);
        let text = serde_json::to_string(&resp).unwrap();
        assert!(text.starts_with(r#"{"ClientVersion":"1.2.764.0","ProcessedClientActions":[{"ActionType":"SessionType","ActionStatus":1,"ActionResult":null,"Error":""}"#), "{text}");
        assert!(text.ends_with(r#""Errors":null}"#));
    }

    #[test]
    fn acknowledge_json_has_exact_keys() {
        let ack = AcknowledgeContent {
            message_type: "output_stream_data".into(),
            message_id: "812ef34f-87bd-449e-a3de-282f478ba6e6".into(),
            sequence_number: 7,
            is_sequential_message: true,
        };
        assert_eq!(
            serde_json::to_string(&ack).unwrap(),
            r#"{"AcknowledgedMessageType":"output_stream_data","AcknowledgedMessageId":"812ef34f-87bd-449e-a3de-282f478ba6e6","AcknowledgedMessageSequenceNumber":7,"IsSequentialMessage":true}"#
        );
    }

    #[test]
    fn channel_closed_tolerates_missing_fields() {
        let c: ChannelClosed =
            serde_json::from_str(r#"{"Output":"bye","SchemaVersion":1}"#).unwrap();
        assert_eq!(c.output, "bye");
        assert_eq!(c.session_id, "");
    }

    #[test]
    fn open_message_shape() {
        let open = OpenDataChannel::new("tok", uuid::Uuid::nil(), uuid::Uuid::from_u128(1));
        let v: serde_json::Value = serde_json::from_str(&open.to_json()).unwrap();
        assert_eq!(v["MessageSchemaVersion"], "1.0");
        assert_eq!(v["TokenValue"], "tok");
        assert_eq!(v["RequestId"], "00000000-0000-0000-0000-000000000000");
        assert_eq!(v["ClientId"], "00000000-0000-0000-0000-000000000001");
        assert_eq!(v["ClientVersion"], CLIENT_VERSION);
    }
}
