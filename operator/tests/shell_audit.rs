//! The audit check that ends the manual set-up this project replaces, as a test: a grant whose
//! logging streams to CloudWatch Logs and uploads to S3 is applied against the real API server
//! (the operator renders its shell document into moto); a shell through that document, first
//! with `agent-bridge shell` exactly as the grant's status prints it, then with the official
//! session-manager-plugin in a real terminal (its KMS calls through a loopback stand-in for
//! KMS's host, in front of moto), runs commands; once the session is over, the log
//! stream named after the session and the S3 object hold those commands, once each and in
//! order. The grant's document also asks for KMS session encryption: each client has KMS
//! generate the session's data key, answers the agent's challenge and encrypts what it types.
//! The emulator's agent does the logging and the encryption as the real agent does them
//! (streamed JSON events, a `script` typescript in S3; KMS Decrypt, AES-GCM both ways), with no
//! protocol violation from either client. A key the client cannot use ends the session with
//! KMS's reason.

#![allow(clippy::panic)]

mod support;

use std::process::Stdio;
use std::time::Duration;

use fleet_access_ssm_emulator::{SessionReport, SessionStatus};
use fleet_access_tests::{
    Moto, ServiceProxy, Terminal, plugin_command_line, session_manager_plugin_path,
    workspace_binary,
};
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
    /// The KMS key of the sessions' encryption.
    key: String,
    /// moto's endpoint (KMS for the clients).
    endpoint: String,
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
        let key = aws_sdk_kms::Client::new(&config)
            .create_key()
            .description("fleet-access shell sessions")
            .send()
            .await
            .expect("KMS key");
        let key = key
            .key_metadata()
            .expect("metadata")
            .arn()
            .expect("arn")
            .to_owned();
        Self {
            logs,
            s3,
            group,
            bucket,
            key,
            endpoint: moto.endpoint().to_owned(),
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
    assert!(report.encrypted, "{report:?}");
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
                "kmsKeyId": trail.key,
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
    let output = bridge_shell(
        &h,
        &trail,
        &words[1..],
        b"echo first-$((20+1))\necho second-$((20+2))\nexit\n",
    )
    .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = audited(&h, &trail, &document).await;
    assert_eq!(
        report.client_version.as_deref(),
        Some("1.2.764.0"),
        "{report:?}"
    );
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
    let argv = plugin_command_line(
        &plugin,
        &response,
        REGION,
        &request,
        &h.emulator.endpoint_url(),
    );
    let home = tempfile::tempdir().expect("home");
    let home_text = home.path().display().to_string();
    // The plugin calls KMS at its AWS address whatever its environment says: a proxy stands in
    // for that host, in front of moto.
    let kms = ServiceProxy::start(
        &[&format!("kms.{REGION}.amazonaws.com")],
        trail
            .endpoint
            .trim_start_matches("http://")
            .parse()
            .expect("moto's address"),
    )
    .await
    .expect("the KMS stand-in");
    let (proxy, ca_file) = (kms.url(), kms.ca_file().display().to_string());
    let env = [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", REGION),
        ("SSM_PLUGIN_SKIP_CLIENT_CONFIGURE", "true"),
        ("HOME", home_text.as_str()),
        ("HTTPS_PROXY", proxy.as_str()),
        // The AWS SDK trusts AWS_CA_BUNDLE instead of the system's roots when it is set.
        ("SSL_CERT_FILE", ca_file.as_str()),
        ("AWS_CA_BUNDLE", ca_file.as_str()),
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
            .unwrap_or_else(|screen| {
                panic!(
                    "{shown:?} never appeared:\n{screen}\n{:?}",
                    h.emulator.session_reports().last()
                )
            });
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

    // A key the client may not use: the session ends, and says why.
    h.set_spec(
        "audited",
        json!({
            "principals": {"users": [alice]},
            "targets": {"instanceIds": [instance]},
            "sessions": {"shell": true},
            "logging": {"kmsKeyId": "alias/no-such-key"},
        }),
    )
    .await;
    h.wait_condition("audited", "Ready", "True").await;
    let output = bridge_shell(&h, &trail, &words[1..], b"exit\n").await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("KMSEncryption failed on client")
            && stderr.contains("KMS GenerateDataKey with key alias/no-such-key failed"),
        "{stderr}"
    );
}

/// `agent-bridge <args>` against the harness's emulator and moto's KMS, `typed` piped in;
/// its output once it has exited.
async fn bridge_shell(
    h: &Harness,
    trail: &AuditTrail,
    args: &[&str],
    typed: &[u8],
) -> std::process::Output {
    let mut bridge = tokio::process::Command::new(workspace_binary("agent-bridge").expect("built"));
    bridge
        .args(args)
        .args(["--region", REGION, "--ssm-endpoint"])
        .arg(h.emulator.endpoint_url())
        .args(["--kms-endpoint", &trail.endpoint])
        .arg("--allow-any-stream-url")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = bridge.spawn().expect("agent-bridge shell");
    let mut stdin = child.stdin.take().expect("stdin");
    tokio::io::AsyncWriteExt::write_all(&mut stdin, typed)
        .await
        .expect("typed");
    drop(stdin);
    tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("agent-bridge ends with its session")
        .expect("runs")
}
