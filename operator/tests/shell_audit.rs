//! The audit check that ends the manual set-up this project replaces, as a test: a grant whose
//! logging streams to CloudWatch Logs and uploads to S3 is applied against the real API server
//! (the operator renders its shell document into moto); a shell through that document, first
//! with `agent-bridge shell` exactly as the grant's status prints it, then with the official
//! session-manager-plugin in a real terminal, runs commands; once the session is over, the log
//! stream named after the session and the S3 object hold those commands, once each and in
//! order. The emulator's agent does the logging as the real agent does it (streamed JSON
//! events, a `script` typescript in S3), with no protocol violation from either client.

#![allow(clippy::panic)]

mod support;

use std::process::Stdio;
use std::time::Duration;

use fleet_access_ssm_emulator::{SessionReport, SessionStatus};
use fleet_access_tests::{Moto, Terminal, session_manager_plugin_path, workspace_binary};
use serde_json::{Value, json};
use support::{FLEET, Harness, REGION};

/// Longest wait for a session's step.
const WAIT: Duration = Duration::from_secs(90);

/// Where the grant's transcripts go, created in moto as the platform team would.
struct AuditTrail {
    logs: aws_sdk_cloudwatchlogs::Client,
    s3: aws_sdk_s3::Client,
    group: String,
    bucket: String,
}

impl AuditTrail {
    async fn create(h: &Harness) -> Self {
        let moto = Moto::shared().await.expect("moto");
        let config = moto.sdk_config();
        let logs = aws_sdk_cloudwatchlogs::Client::new(&config);
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&config)
                .force_path_style(true)
                .build(),
        );
        let group = format!("/fleet-access/{}", h.unique("sessions"));
        let bucket = h.unique("audit");
        logs.create_log_group()
            .log_group_name(&group)
            .send()
            .await
            .expect("log group");
        s3.create_bucket()
            .bucket(&bucket)
            .send()
            .await
            .expect("bucket");
        let by_default = aws_sdk_s3::types::ServerSideEncryptionByDefault::builder()
            .sse_algorithm(aws_sdk_s3::types::ServerSideEncryption::Aes256)
            .build()
            .expect("encryption");
        let rule = aws_sdk_s3::types::ServerSideEncryptionRule::builder()
            .apply_server_side_encryption_by_default(by_default)
            .build();
        s3.put_bucket_encryption()
            .bucket(&bucket)
            .server_side_encryption_configuration(
                aws_sdk_s3::types::ServerSideEncryptionConfiguration::builder()
                    .rules(rule)
                    .build()
                    .expect("configuration"),
            )
            .send()
            .await
            .expect("bucket encryption");
        Self {
            logs,
            s3,
            group,
            bucket,
        }
    }

    /// The lines of the session's streamed events, in order.
    async fn streamed_lines(&self, session_id: &str) -> Vec<String> {
        let events = self
            .logs
            .get_log_events()
            .log_group_name(&self.group)
            .log_stream_name(session_id)
            .start_from_head(true)
            .send()
            .await
            .expect("the session's log stream");
        let mut lines = Vec::new();
        for event in events.events() {
            let message: Value =
                serde_json::from_str(event.message().unwrap_or_default()).expect("a JSON event");
            assert_eq!(message["sessionId"], session_id, "{message}");
            for line in message["sessionData"].as_array().expect("sessionData") {
                lines.push(line.as_str().unwrap_or_default().to_owned());
            }
        }
        lines
    }

    /// The transcript object of the session.
    async fn object(&self, key: &str) -> String {
        let object = self
            .s3
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .expect("the transcript object");
        let bytes = object.body.collect().await.expect("body").into_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Each of `wanted` occurs exactly once in `text`, in this order.
fn once_each_in_order(text: &str, wanted: &[&str]) {
    let mut from = 0;
    for w in wanted {
        assert_eq!(text.matches(w).count(), 1, "{w:?} once in:\n{text}");
        let at = text.find(w).expect("found");
        assert!(at >= from, "{w:?} out of order in:\n{text}");
        from = at;
    }
}

/// The session's report once it ended for good: terminated by its shell's exit, no
/// violation, its transcript in the log stream and the bucket.
async fn audited(h: &Harness, trail: &AuditTrail, document: &str) -> SessionReport {
    let reports = h
        .emulator
        .wait_for_all_ended(WAIT)
        .await
        .expect("the sessions end");
    let violations = h.emulator.violations();
    assert!(violations.is_empty(), "{violations:?}");
    let report = reports
        .into_iter()
        .rfind(|r| r.document_name == document)
        .expect("a session of the grant's document");
    assert_eq!(report.status, SessionStatus::Terminated, "{report:?}");
    assert_eq!(report.close_reason.as_deref(), Some("the shell exited"));
    let transcript = report.transcript.clone().expect("a transcript");
    assert!(transcript.notes.is_empty(), "{transcript:?}");
    assert!(transcript.cloud_watch_events > 0, "{transcript:?}");
    assert_eq!(
        transcript.s3_object,
        Some(format!(
            "{}/sessions/{}.log",
            trail.bucket, report.session_id
        ))
    );
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grants_shell_leaves_its_commands_in_cloudwatch_logs_and_s3_through_either_client() {
    let h = Harness::start("shell-audit", Duration::from_secs(300)).await;
    let trail = AuditTrail::create(&h).await;
    let alice = h.unique("alice");
    h.user(&alice).await;
    let instance = FLEET[0].0;
    h.create(
        "audited",
        json!({
            "principals": {"users": [alice]},
            "targets": {"instanceIds": [instance]},
            "sessions": {"shell": true},
            "logging": {
                "cloudWatch": {"logGroupName": trail.group, "streaming": true},
                "s3": {"bucketName": trail.bucket, "keyPrefix": "sessions/", "encryptionEnabled": true},
            },
        }),
    )
    .await;
    let grant = h.wait_condition("audited", "Ready", "True").await;
    // How a person connects is in the grant's status: run exactly that.
    let connect = grant.status.expect("status").connect;
    let shell = connect
        .iter()
        .find_map(|c| {
            c.agent_bridge
                .as_deref()
                .filter(|a| a.starts_with("agent-bridge shell"))
        })
        .expect("a shell command in the status");
    let words: Vec<&str> = shell.split_whitespace().collect();
    let document = words.last().expect("the document").to_string();
    assert_eq!(
        words,
        [
            "agent-bridge",
            "shell",
            instance,
            "--document",
            document.as_str()
        ]
    );

    // agent-bridge shell, the commands piped in.
    let mut bridge = tokio::process::Command::new(workspace_binary("agent-bridge").expect("built"));
    bridge
        .args(&words[1..])
        .args(["--region", REGION, "--ssm-endpoint"])
        .arg(h.emulator.endpoint_url())
        .arg("--allow-any-stream-url")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = bridge.spawn().expect("agent-bridge shell");
    let mut stdin = child.stdin.take().expect("stdin");
    tokio::io::AsyncWriteExt::write_all(
        &mut stdin,
        b"echo first-$((20+1))\necho second-$((20+2))\nexit\n",
    )
    .await
    .expect("typed");
    drop(stdin);
    let output = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("agent-bridge ends with the shell")
        .expect("runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = audited(&h, &trail, &document).await;
    let typed = ["echo first-$((20+1))", "echo second-$((20+2))"];
    let streamed = trail.streamed_lines(&report.session_id).await.join("\n");
    once_each_in_order(&streamed, &typed);
    once_each_in_order(&streamed, &["first-21", "second-22"]);
    let object = trail
        .object(&format!("sessions/{}.log", report.session_id))
        .await;
    once_each_in_order(&object, &typed);
    assert!(object.starts_with("Script started on "), "{object}");

    // The official plugin, in a real terminal, with the same document.
    let started = h
        .ssm
        .start_session()
        .target(instance)
        .document_name(&document)
        .send()
        .await
        .expect("StartSession");
    let session_id = started.session_id().expect("id").to_owned();
    let response = json!({
        "SessionId": session_id,
        "TokenValue": started.token_value(),
        "StreamUrl": started.stream_url(),
    });
    let request = json!({"Target": instance, "DocumentName": document});
    let plugin = session_manager_plugin_path().expect("the official plugin (tests/env/setup.sh)");
    let argv = vec![
        plugin.display().to_string(),
        response.to_string(),
        REGION.to_owned(),
        "StartSession".to_owned(),
        String::new(),
        request.to_string(),
        h.emulator.endpoint_url(),
    ];
    let home = tempfile::tempdir().expect("home");
    let home_text = home.path().display().to_string();
    let env = [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", REGION),
        ("SSM_PLUGIN_SKIP_CLIENT_CONFIGURE", "true"),
        ("HOME", home_text.as_str()),
    ];
    let terminal = Terminal::start(&argv, &env, 100, 30).expect("tmux");
    for (command, shown) in [
        ("echo third-$((20+3))", "third-23"),
        ("echo fourth-$((20+4))", "fourth-24"),
    ] {
        terminal.type_text(command).expect("typed");
        terminal.press("Enter").expect("typed");
        terminal
            .wait_for_screen(WAIT, |s| s.contains(shown))
            .await
            .unwrap_or_else(|screen| panic!("{shown:?} never appeared:\n{screen}"));
    }
    terminal.type_text("exit").expect("typed");
    terminal.press("Enter").expect("typed");
    assert_eq!(terminal.wait_for_exit(WAIT).await, Some(0));
    let report = audited(&h, &trail, &document).await;
    assert_eq!(report.session_id, session_id);
    let typed = ["echo third-$((20+3))", "echo fourth-$((20+4))"];
    let streamed = trail.streamed_lines(&session_id).await.join("\n");
    once_each_in_order(&streamed, &typed);
    let object = trail.object(&format!("sessions/{session_id}.log")).await;
    once_each_in_order(&object, &typed);
}
