//! Shell documents as the agent and the service apply them, against a raw client: the
//! service's idle and maximum-duration limits (in the emulator's shortened minutes), the
//! agent's runAs user (must exist; reported, as the emulator runs the shell as itself), its
//! check of an encrypted log group, documents whose inputs the agent cannot read, and the
//! transcript uploaded to CloudWatch Logs when the session ends (streaming off). Moto holds the
//! documents and the log group; every report is read after its session ended, with no
//! violation.

#![allow(clippy::panic)] // test helpers report failures by panicking

mod common;

use common::*;
use fleet_access_ssm_emulator::message::{ClientMessage, FLAG_SYN, MessageType, payload_type};
use fleet_access_ssm_emulator::{Config, Emulator, InstanceConfig, Mode, Running, SessionStatus};
use serde_json::{Value, json};

const INSTANCE: &str = "i-0ccccccccccccccc1";
/// One document minute, in the emulator's milliseconds.
const MINUTE_MS: u64 = 300;

async fn emulator(moto: &fleet_access_tests::Moto) -> (Running, aws_sdk_ssm::Client) {
    let mut config = Config {
        mode: Mode::Fast,
        upstream: Some(moto.endpoint().to_owned()),
        session_minute_ms: MINUTE_MS,
        ..Config::default()
    };
    config.instances.push(InstanceConfig::new(INSTANCE));
    let running = Emulator::start(config).await.expect("emulator");
    let ssm = ssm_client(&running.endpoint_url());
    (running, ssm)
}

/// A shell document named `name` with `inputs`, in moto.
async fn shell_document(ssm: &aws_sdk_ssm::Client, name: &str, inputs: Value) {
    let content =
        json!({"schemaVersion": "1.0", "sessionType": "Standard_Stream", "inputs": inputs});
    ssm.create_document()
        .name(name)
        .document_type(aws_sdk_ssm::types::DocumentType::Session)
        .document_format(aws_sdk_ssm::types::DocumentFormat::Json)
        .content(content.to_string())
        .send()
        .await
        .expect("CreateDocument");
}

/// Starts a session of `document`, opens its data channel and acknowledges what the agent
/// sends until `channel_closed`; its `Output` then.
async fn run_until_closed(ssm: &aws_sdk_ssm::Client, document: &str) -> (String, String) {
    let started = start_session(ssm, INSTANCE, document, &[])
        .await
        .expect("StartSession");
    let mut raw = RawClient::open(&started, "1.2.764.0").await.expect("open");
    loop {
        let Some(m) = raw.next_message().await.expect("a message") else {
            panic!("{document}: the WebSocket closed without channel_closed");
        };
        match m.message_type {
            MessageType::OutputStreamData => raw.ack(&m).await.expect("ack"),
            MessageType::ChannelClosed => {
                let closed: Value = serde_json::from_slice(&m.payload).expect("JSON");
                let output = closed["Output"].as_str().unwrap_or_default().to_owned();
                return (started.session_id, output);
            }
            _ => {}
        }
        assert_ne!(
            m.payload_type,
            payload_type::HANDSHAKE_REQUEST,
            "{document}: no handshake"
        );
    }
}

#[tokio::test]
async fn the_services_limits_and_the_agents_checks_apply_to_shell_documents() {
    let moto = fleet_access_tests::Moto::start().await.expect("moto");
    let (running, ssm) = emulator(&moto).await;
    let cases: [(&str, Value, SessionStatus, &str); 5] = [
        (
            "Shell-Idle",
            json!({"idleSessionTimeout": "1"}),
            SessionStatus::Terminated,
            "Session idle timeout",
        ),
        (
            "Shell-Max",
            json!({"maxSessionDuration": "2"}),
            SessionStatus::Terminated,
            "Session max duration reached",
        ),
        (
            "Shell-RunAs-Missing",
            json!({"runAsEnabled": true, "runAsDefaultUser": "no-such-user-fa", "maxSessionDuration": "2"}),
            SessionStatus::Failed,
            "failed to start pty since RunAs user no-such-user-fa does not exist",
        ),
        (
            "Shell-RunAs-Root",
            json!({"runAsEnabled": "true", "runAsDefaultUser": "root"}),
            SessionStatus::Failed,
            "invalid uid and gid",
        ),
        (
            "Shell-Encrypted-Logs",
            json!({"cloudWatchLogGroupName": "/no/such/group", "cloudWatchEncryptionEnabled": true}),
            SessionStatus::Failed,
            "encryption is not set up on the selected CloudWatch Logs log group",
        ),
    ];
    for (name, inputs, status, reason) in cases {
        shell_document(&ssm, name, inputs).await;
        let (session_id, output) = run_until_closed(&ssm, name).await;
        assert!(
            output.contains(reason),
            "{name}: channel_closed said {output:?}"
        );
        let report = running
            .wait_for_end(&session_id, TEST_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(report.status, status, "{name}: {report:?}");
        assert!(
            report
                .close_reason
                .as_deref()
                .is_some_and(|r| r.contains(reason)),
            "{name}: {report:?}"
        );
    }
    // An existing user: the session runs, and says as whom.
    shell_document(
        &ssm,
        "Shell-RunAs-Nobody",
        json!({"runAsEnabled": true, "runAsDefaultUser": "nobody", "maxSessionDuration": "2"}),
    )
    .await;
    let (session_id, _) = run_until_closed(&ssm, "Shell-RunAs-Nobody").await;
    let report = running
        .wait_for_end(&session_id, TEST_TIMEOUT)
        .await
        .expect("ends");
    assert_eq!(report.run_as_user.as_deref(), Some("nobody"), "{report:?}");
    // Inputs the agent cannot read make the document unusable, and StartSession says which.
    shell_document(
        &ssm,
        "Shell-Bad-Input",
        json!({"cloudWatchStreamingEnabled": "true"}),
    )
    .await;
    let Err(refused) = start_session(&ssm, INSTANCE, "Shell-Bad-Input", &[]).await else {
        panic!("a document whose inputs the agent cannot read was started");
    };
    assert!(
        format!("{refused:#}").contains("cloudWatchStreamingEnabled"),
        "{refused:#}"
    );
    let violations = running.violations();
    assert!(violations.is_empty(), "{violations:?}");
}

#[tokio::test]
async fn without_streaming_the_transcript_goes_to_cloudwatch_logs_when_the_session_ends() {
    let moto = fleet_access_tests::Moto::start().await.expect("moto");
    let (running, ssm) = emulator(&moto).await;
    let logs = aws_sdk_cloudwatchlogs::Client::new(&moto.sdk_config());
    logs.create_log_group()
        .log_group_name("/shell/at-the-end")
        .send()
        .await
        .expect("log group");
    shell_document(
        &ssm,
        "Shell-Logs-At-The-End",
        json!({"cloudWatchLogGroupName": "/shell/at-the-end", "cloudWatchStreamingEnabled": false}),
    )
    .await;
    let started = start_session(&ssm, INSTANCE, "Shell-Logs-At-The-End", &[])
        .await
        .expect("StartSession");
    let mut raw = RawClient::open(&started, "1.2.764.0").await.expect("open");
    let prompt = raw.next_output(payload_type::OUTPUT).await.expect("prompt");
    raw.ack(&prompt).await.expect("ack");
    raw.send(&ClientMessage::new(
        MessageType::InputStreamData,
        0,
        FLAG_SYN,
        payload_type::OUTPUT,
        b"echo at-the-end-$((4+5))\nexit\n".to_vec(),
    ))
    .await
    .expect("typed");
    while let Some(m) = raw.next_message().await.expect("a message") {
        match m.message_type {
            MessageType::OutputStreamData => raw.ack(&m).await.expect("ack"),
            MessageType::ChannelClosed => break,
            _ => {}
        }
    }
    let report = running
        .wait_for_end(&started.session_id, TEST_TIMEOUT)
        .await
        .expect("ends");
    assert_eq!(report.status, SessionStatus::Terminated, "{report:?}");
    let transcript = report.transcript.expect("a transcript");
    assert!(transcript.notes.is_empty(), "{transcript:?}");
    assert!(transcript.cloud_watch_events > 0, "{transcript:?}");
    let events = logs
        .get_log_events()
        .log_group_name("/shell/at-the-end")
        .log_stream_name(&started.session_id)
        .start_from_head(true)
        .send()
        .await
        .expect("the session's log stream");
    let text: String = (events.events().iter())
        .filter_map(|e| e.message())
        .collect::<Vec<_>>()
        .join("\n");
    // Plain text, as `script` wrote it (not JSON events).
    assert!(text.starts_with("Script started on "), "{text}");
    assert_eq!(
        text.matches("echo at-the-end-$((4+5))").count(),
        1,
        "{text}"
    );
    assert!(text.contains("at-the-end-9"), "{text}");
    let violations = running.violations();
    assert!(violations.is_empty(), "{violations:?}");
}
