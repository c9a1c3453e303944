//! The AWS part of the test environment: moto answers the IAM and SSM calls the
//! operator makes, through the real AWS SDK clients.

use aws_sdk_ssm::error::ProvideErrorMetadata;
use aws_sdk_ssm::types::{DocumentFormat, DocumentType};
use fleet_access_tests::Moto;
use serde_json::json;

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn iam_policy_is_created_and_read_back() {
    let moto = Moto::shared()
        .await
        .expect("moto starts (run tests/env/setup.sh first)");
    assert!(moto.endpoint().starts_with("http://127.0.0.1:"));
    let iam = aws_sdk_iam::Client::new(&moto.sdk_config());
    let document = json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Action": "ssm:StartSession",
            "Resource": "arn:aws:ec2:us-east-1:123456789012:instance/i-0123456789abcdef0",
        }],
    });
    let name = unique("env-moto");
    let created = iam
        .create_policy()
        .policy_name(&name)
        .path("/fleet-access/")
        .policy_document(document.to_string())
        .send()
        .await
        .expect("create_policy");
    let arn = created
        .policy()
        .and_then(|p| p.arn())
        .expect("arn")
        .to_owned();
    assert!(
        arn.ends_with(&format!(":policy/fleet-access/{name}")),
        "{arn}"
    );

    let policy = iam
        .get_policy()
        .policy_arn(&arn)
        .send()
        .await
        .expect("get_policy");
    let policy = policy.policy().expect("policy");
    assert_eq!(policy.policy_name(), Some(name.as_str()));
    let version_id = policy.default_version_id().expect("default version");
    let version = iam
        .get_policy_version()
        .policy_arn(&arn)
        .version_id(version_id)
        .send()
        .await
        .expect("get_policy_version");
    let text = version
        .policy_version()
        .and_then(|v| v.document())
        .expect("document");
    // IAM returns the document URL-encoded; moto may return it as sent.
    let decoded = percent_encoding::percent_decode_str(text).decode_utf8_lossy();
    let read_back: serde_json::Value = serde_json::from_str(&decoded).expect("JSON document");
    assert_eq!(read_back, document);
}

#[tokio::test]
async fn ssm_session_document_is_created_and_read_back() {
    let moto = Moto::shared().await.expect("moto starts");
    let ssm = aws_sdk_ssm::Client::new(&moto.sdk_config());
    let content = json!({
        "schemaVersion": "1.0",
        "description": "fleet-access test preferences",
        "sessionType": "Standard_Stream",
        "inputs": {"idleSessionTimeout": "20", "maxSessionDuration": "60"},
    });
    let name = unique("env-moto-prefs");
    let created = ssm
        .create_document()
        .name(&name)
        .document_type(DocumentType::Session)
        .document_format(DocumentFormat::Json)
        .content(content.to_string())
        .send()
        .await
        .expect("create_document");
    let description = created.document_description().expect("description");
    assert_eq!(description.name(), Some(name.as_str()));
    assert_eq!(description.document_type(), Some(&DocumentType::Session));

    let document = ssm
        .get_document()
        .name(&name)
        .send()
        .await
        .expect("get_document");
    assert_eq!(document.document_type(), Some(&DocumentType::Session));
    let read_back: serde_json::Value =
        serde_json::from_str(document.content().expect("content")).expect("JSON content");
    assert_eq!(read_back, content);

    // An unknown document is InvalidDocument (the code the tests take for "does not exist"),
    // not any error.
    let missing = ssm
        .get_document()
        .name(unique("absent"))
        .send()
        .await
        .expect_err("an unknown document is an error");
    assert_eq!(missing.code(), Some("InvalidDocument"), "{missing:?}");
}
