//! The SSM JSON API through aws-sdk-ssm pointed at the emulator: StartSession and its errors,
//! DescribeInstanceInformation filters and paging, the session lifecycle (DescribeSessions,
//! ResumeSession, TerminateSession), and forwarding to an upstream (moto) including custom
//! Port documents; the gateway's TLS.

mod common;

use aws_sdk_ssm::error::ProvideErrorMetadata;
use aws_sdk_ssm::types::{InstanceInformationStringFilter, SessionState};
use common::*;
use fleet_access_ssm_emulator::{
    Config, Emulator, InstanceConfig, Mode, Running, SessionStatus, TlsFiles,
};

async fn fleet(upstream: Option<String>) -> (Running, aws_sdk_ssm::Client) {
    let echo = echo_server().await;
    let mut config = Config {
        mode: Mode::Fast,
        upstream,
        ..Config::default()
    };
    for i in 0..7 {
        let env = if i < 3 { "prod" } else { "dev" };
        config.instances.push(
            InstanceConfig::new(format!("i-00000000000000{i:03}"))
                .with_tag("env", env)
                .with_tag("Name", format!("web-{i}"))
                .with_port("22", echo)
                .with_port("5432", echo),
        );
    }
    let mut offline = InstanceConfig::new("mi-00000000000000099");
    offline.ping_status = "ConnectionLost".into();
    config.instances.push(offline);
    let running = Emulator::start(config).await.expect("emulator");
    let ssm = ssm_client(&running.endpoint_url());
    (running, ssm)
}

#[tokio::test]
async fn start_session_answers_and_validates() {
    let (running, ssm) = fleet(None).await;
    let out = ssm
        .start_session()
        .target("i-00000000000000000")
        .document_name("AWS-StartSSHSession")
        .parameters("portNumber", vec!["22".into()])
        .send()
        .await
        .expect("StartSession");
    let sid = out.session_id().expect("id");
    assert!(sid.starts_with("fleet-access-"), "{sid}");
    let url = out.stream_url().expect("url");
    let expected = format!(
        "ws://{}/v1/data-channel/{sid}?role=publish_subscribe",
        running.local_addr()
    );
    assert!(url.starts_with(&expected), "{url}");
    assert!(out.token_value().is_some_and(|t| t.len() > 32));

    let code = |r: Result<_, aws_sdk_ssm::error::SdkError<_>>| -> String {
        match r {
            Ok(_) => "no error".to_owned(),
            Err(e) => aws_sdk_ssm::error::SdkError::<
                aws_sdk_ssm::operation::start_session::StartSessionError,
            >::into_service_error(e)
            .code()
            .unwrap_or("no code")
            .to_owned(),
        }
    };
    let r = ssm
        .start_session()
        .target("i-0ffffffffffffffff")
        .document_name("AWS-StartSSHSession")
        .send()
        .await;
    assert_eq!(code(r), "InvalidTarget");
    let r = ssm
        .start_session()
        .target("mi-00000000000000099")
        .document_name("AWS-StartSSHSession")
        .send()
        .await;
    assert_eq!(code(r), "TargetNotConnected");
    let r = ssm
        .start_session()
        .target("i-00000000000000000")
        .document_name("AWS-StartPortForwardingSession")
        .parameters("portNumber", vec!["http".into()])
        .send()
        .await;
    assert_eq!(code(r), "ValidationException");
    // No document: the account's shell (the default one, without an upstream).
    let shell = ssm
        .start_session()
        .target("i-00000000000000000")
        .send()
        .await;
    assert!(shell.is_ok(), "{shell:?}");
    // Command sessions are not emulated.
    let r = ssm
        .start_session()
        .target("i-00000000000000000")
        .document_name("AWS-StartInteractiveCommand")
        .send()
        .await;
    assert_eq!(code(r), "InvalidDocument");
    let r = ssm
        .start_session()
        .target("i-00000000000000000")
        .document_name("Custom-Unknown")
        .send()
        .await;
    assert_eq!(code(r), "InvalidDocument");
}

#[tokio::test]
async fn describe_instance_information_filters_and_pages() {
    let (_running, ssm) = fleet(None).await;
    let ids = |out: &aws_sdk_ssm::operation::describe_instance_information::DescribeInstanceInformationOutput| {
        out.instance_information_list()
            .iter()
            .filter_map(|i| i.instance_id().map(str::to_owned))
            .collect::<Vec<_>>()
    };
    let prod = ssm
        .describe_instance_information()
        .filters(
            InstanceInformationStringFilter::builder()
                .key("tag:env")
                .values("prod")
                .build()
                .expect("filter"),
        )
        .send()
        .await
        .expect("describe");
    assert_eq!(
        ids(&prod),
        vec![
            "i-00000000000000000",
            "i-00000000000000001",
            "i-00000000000000002"
        ]
    );

    let lost = ssm
        .describe_instance_information()
        .filters(
            InstanceInformationStringFilter::builder()
                .key("PingStatus")
                .values("ConnectionLost")
                .build()
                .expect("filter"),
        )
        .send()
        .await
        .expect("describe");
    assert_eq!(ids(&lost), vec!["mi-00000000000000099"]);
    assert_eq!(
        lost.instance_information_list()[0]
            .resource_type()
            .map(|r| r.as_str()),
        Some("ManagedInstance")
    );

    let by_id = ssm
        .describe_instance_information()
        .filters(
            InstanceInformationStringFilter::builder()
                .key("InstanceIds")
                .values("i-00000000000000005")
                .build()
                .expect("filter"),
        )
        .send()
        .await
        .expect("describe");
    assert_eq!(ids(&by_id), vec!["i-00000000000000005"]);
    assert_eq!(
        by_id.instance_information_list()[0].agent_version(),
        Some("3.3.1142.0")
    );

    let first = ssm
        .describe_instance_information()
        .max_results(5)
        .send()
        .await
        .expect("page 1");
    assert_eq!(first.instance_information_list().len(), 5);
    let token = first.next_token().expect("more pages").to_owned();
    let second = ssm
        .describe_instance_information()
        .max_results(5)
        .next_token(token)
        .send()
        .await
        .expect("page 2");
    assert_eq!(second.instance_information_list().len(), 3);
    assert!(second.next_token().is_none());

    let bad = ssm
        .describe_instance_information()
        .filters(
            InstanceInformationStringFilter::builder()
                .key("NoSuchKey")
                .values("x")
                .build()
                .expect("filter"),
        )
        .send()
        .await
        .expect_err("an unknown filter key")
        .into_service_error();
    assert_eq!(bad.code(), Some("InvalidInstanceInformationFilterValue"));
    assert_eq!(
        bad.message(),
        Some("filter key \"NoSuchKey\" is not supported")
    );
}

#[tokio::test]
async fn session_lifecycle_through_the_api() {
    let (running, ssm) = fleet(None).await;
    let started = start_session(&ssm, "i-00000000000000001", "AWS-StartSSHSession", &[])
        .await
        .expect("start");
    let active = ssm
        .describe_sessions()
        .state(SessionState::Active)
        .send()
        .await
        .expect("describe");
    let row = active
        .sessions()
        .iter()
        .find(|s| s.session_id() == Some(started.session_id.as_str()))
        .expect("listed as active");
    assert_eq!(row.target(), Some("i-00000000000000001"));
    assert_eq!(row.document_name(), Some("AWS-StartSSHSession"));

    // Resume issues a fresh token for a live session.
    let resumed = ssm
        .resume_session()
        .session_id(&started.session_id)
        .send()
        .await
        .expect("resume");
    assert!(resumed.token_value().is_some_and(|t| t != started.token));

    ssm.terminate_session()
        .session_id(&started.session_id)
        .send()
        .await
        .expect("terminate");
    let report = running
        .wait_for_end(&started.session_id, TEST_TIMEOUT)
        .await
        .expect("report");
    assert_eq!(report.status, SessionStatus::Terminated);
    let history = ssm
        .describe_sessions()
        .state(SessionState::History)
        .send()
        .await
        .expect("describe");
    let row = history
        .sessions()
        .iter()
        .find(|s| s.session_id() == Some(started.session_id.as_str()))
        .expect("listed in history");
    assert_eq!(row.status().map(|s| s.as_str()), Some("Terminated"));
    assert!(row.end_date().is_some());

    // Resuming an ended session gives no token (the plugin reads that as "timed out").
    let resumed = ssm
        .resume_session()
        .session_id(&started.session_id)
        .send()
        .await
        .expect("resume");
    assert!(resumed.token_value().is_none());
    let unknown = ssm
        .resume_session()
        .session_id("nobody-00000000000000000")
        .send()
        .await
        .expect_err("an unknown session")
        .into_service_error();
    assert_eq!(unknown.code(), Some("DoesNotExistException"));
    assert_eq!(
        unknown.message(),
        Some("session nobody-00000000000000000 does not exist")
    );
}

#[tokio::test]
async fn other_operations_need_an_upstream() {
    let (running, ssm) = fleet(None).await;
    let err = ssm.list_documents().send().await.expect_err("no upstream");
    assert_eq!(
        err.into_service_error().code(),
        Some("UnknownOperationException")
    );
    assert_eq!(running.stats().forwarded_requests, 0);
}

#[tokio::test]
async fn moto_serves_other_operations_and_custom_port_documents() {
    let moto = fleet_access_tests::Moto::start().await.expect("moto");
    let (running, ssm) = fleet(Some(moto.endpoint().to_owned())).await;
    let content = serde_json::json!({
        "schemaVersion": "1.0",
        "description": "Forward to PostgreSQL",
        "sessionType": "Port",
        "parameters": {"portNumber": {"type": "String", "default": "5432"}},
        "properties": {"portNumber": "{{ portNumber }}", "type": "LocalPortForwarding", "localPortNumber": "0"}
    });
    let owner = aws_sdk_ssm::types::Tag::builder()
        .key("fleetaccess.io/grant")
        .value("ops/db")
        .build()
        .expect("tag");
    ssm.create_document()
        .name("FleetAccess-Postgres")
        .document_type(aws_sdk_ssm::types::DocumentType::Session)
        .document_format(aws_sdk_ssm::types::DocumentFormat::Json)
        .content(content.to_string())
        .tags(owner.clone())
        .send()
        .await
        .expect("CreateDocument forwarded to moto");
    let listed = ssm
        .list_documents()
        .send()
        .await
        .expect("ListDocuments forwarded");
    assert!(
        listed
            .document_identifiers()
            .iter()
            .any(|d| d.name() == Some("FleetAccess-Postgres"))
    );
    // The operator reads a document's ownership tag with ListTagsForResource.
    let document_tags = |name: &'static str| {
        ssm.list_tags_for_resource()
            .resource_type(aws_sdk_ssm::types::ResourceTypeForTagging::Document)
            .resource_id(name)
            .send()
    };
    let tags = document_tags("FleetAccess-Postgres")
        .await
        .expect("ListTagsForResource forwarded");
    assert_eq!(tags.tag_list(), [owner]);
    let missing = document_tags("FleetAccess-Nothing")
        .await
        .expect_err("no such document");
    assert_eq!(
        missing.into_service_error().code(),
        Some("InvalidResourceId")
    );
    assert!(running.stats().forwarded_requests >= 4);

    let started = start_session(&ssm, "i-00000000000000003", "FleetAccess-Postgres", &[])
        .await
        .expect("start");
    let client = Client::start(&started, ssm.clone(), ClientOptions::default())
        .await
        .expect("client");
    let mut mux = MuxClient::new(client);
    mux.client.handshake().await.expect("handshake");
    let id = mux.open().await.expect("open");
    mux.write(id, b"SELECT 1").await.expect("write");
    mux.read_until(&[(id, 8)])
        .await
        .expect("echo through port 5432");
    assert_eq!(mux.received[&id], b"SELECT 1");
    mux.client.flag(FLAG_TERMINATE).await.expect("flag");
    let report = running
        .wait_for_end(&started.session_id, TEST_TIMEOUT)
        .await
        .expect("the session ends");
    assert_eq!(report.status, SessionStatus::Terminated, "{report:?}");
    assert_eq!(
        report.transfer,
        Some(fleet_access_ssm_emulator::Transfer::Mux)
    );
    assert!(report.violations.is_empty(), "{:?}", report.violations);
}

/// With a certificate the gateway serves `wss://` stream URLs on the API's port, refuses a
/// plain-text data-channel upgrade (the real gateway speaks only TLS) and still answers the
/// API in plain HTTP; a certificate it cannot read is named at start.
#[tokio::test]
async fn a_tls_gateway_serves_only_wss() {
    let scratch = tempfile_dir();
    let dir = scratch.path();
    let tls = fleet_access_tests::certificates::LoopbackTls::generate("gateway").expect("certs");
    let (certificate, private_key) = (dir.join("gateway.pem"), dir.join("gateway-key.pem"));
    std::fs::write(&certificate, &tls.cert_pem).expect("write");
    let mut config = Config {
        mode: Mode::Fast,
        tls: Some(TlsFiles {
            certificate: certificate.clone(),
            private_key: private_key.clone(),
        }),
        ..Config::default()
    };
    config
        .instances
        .push(InstanceConfig::new("i-0000000000000a001").with_port("22", echo_server().await));
    let Err(missing_key) = Emulator::start(config.clone()).await else {
        panic!("an emulator without its private key started");
    };
    assert!(
        missing_key
            .to_string()
            .contains(&private_key.display().to_string()),
        "{missing_key}"
    );

    std::fs::write(&private_key, &tls.key_pem).expect("write");
    let running = Emulator::start(config).await.expect("emulator");
    let ssm = ssm_client(&running.endpoint_url());
    let started = start_session(&ssm, "i-0000000000000a001", "AWS-StartSSHSession", &[])
        .await
        .expect("StartSession over plain HTTP");
    assert!(
        started.url.starts_with("wss://127.0.0.1:"),
        "{}",
        started.url
    );
    let plain = started.url.replacen("wss://", "ws://", 1);
    assert!(open_ws(&plain, &started.token, "1.2.0.0").await.is_err());
    let stats = running.stats();
    assert_eq!(
        (stats.plain_upgrades_refused, stats.tls_connections),
        (1, 0),
        "{stats:?}"
    );
}
