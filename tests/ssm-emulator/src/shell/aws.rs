//! The AWS calls of a shell session's agent, as it makes them, against the upstream (moto):
//! for logging, whether the log group exists and is encrypted (`DescribeLogGroups`), the
//! bucket's default encryption (`GetBucketEncryption`), the log stream named after the session
//! (`CreateLogStream`, `PutLogEvents`, four events a call) and the transcript object
//! (`PutObject`, `bucket-owner-full-control`, `text/plain`); for KMS session encryption, the
//! client's data key decrypted (`Decrypt`, with the session's encryption context).

use aws_config::{BehaviorVersion, Region};
use aws_sdk_cloudwatchlogs::types::InputLogEvent;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ObjectCannedAcl, ServerSideEncryption};

use super::transcript::EVENTS_PER_CALL;

/// A log group as the agent's checks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogGroup {
    /// Not found (or the lookup failed: the agent treats both alike).
    Missing,
    /// Found; `encrypted` when it has a KMS key.
    Present { encrypted: bool },
}

/// Clients for CloudWatch Logs, S3 and KMS at the upstream endpoint.
#[derive(Clone, Debug)]
pub(crate) struct AgentAws {
    logs: aws_sdk_cloudwatchlogs::Client,
    s3: aws_sdk_s3::Client,
    kms: aws_sdk_kms::Client,
}

impl AgentAws {
    /// Clients for `endpoint` (a loopback URL) in `region`, with the emulator's static
    /// credentials (moto checks no signature).
    pub(crate) fn new(endpoint: &str, region: &str) -> Self {
        let credentials = aws_sdk_s3::config::Credentials::new(
            "AKIAEMULATORAGENT",
            "emulator-agent-secret",
            None,
            None,
            "fleet-access-ssm-emulator",
        );
        let shared = aws_config::SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(region.to_owned()))
            .endpoint_url(endpoint)
            .credentials_provider(aws_sdk_s3::config::SharedCredentialsProvider::new(
                credentials,
            ))
            .build();
        let s3 = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(true)
            .build();
        Self {
            logs: aws_sdk_cloudwatchlogs::Client::new(&shared),
            s3: aws_sdk_s3::Client::from_conf(s3),
            kms: aws_sdk_kms::Client::new(&shared),
        }
    }

    /// The client's data key, decrypted as the agent decrypts it (`kmsservice.go`): under the
    /// document's key (KMS refuses a blob made under another), with the session, the instance
    /// and, when the client acknowledged it, the handshake's challenge as encryption context.
    pub(crate) async fn decrypt_data_key(
        &self,
        blob: Vec<u8>,
        context: &DataKeyContext,
    ) -> Result<Vec<u8>, String> {
        let mut decrypt = self
            .kms
            .decrypt()
            .key_id(&context.key_id)
            .ciphertext_blob(aws_sdk_kms::primitives::Blob::new(blob))
            .encryption_context("aws:ssm:SessionId", &context.session)
            .encryption_context("aws:ssm:TargetId", &context.target);
        if let Some(challenge) = &context.random_challenge {
            decrypt = decrypt.encryption_context("aws:ssm:RandomChallenge", challenge);
        }
        let out = decrypt
            .send()
            .await
            .map_err(|e| aws_sdk_kms::error::DisplayErrorContext(e).to_string())?;
        out.plaintext()
            .map(|p| p.as_ref().to_vec())
            .ok_or_else(|| "KMS returned no plaintext".to_owned())
    }

    /// `IsLogGroupPresent` and `IsLogGroupEncryptedWithKMS`: an exact name among those
    /// `DescribeLogGroups` lists for the name as prefix, every page.
    pub(crate) async fn log_group(&self, name: &str) -> LogGroup {
        let mut pages = self
            .logs
            .describe_log_groups()
            .log_group_name_prefix(name)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let Ok(page) = page else {
                return LogGroup::Missing;
            };
            if let Some(group) = page
                .log_groups()
                .iter()
                .find(|g| g.log_group_name() == Some(name))
            {
                return LogGroup::Present {
                    encrypted: group.kms_key_id().is_some(),
                };
            }
        }
        LogGroup::Missing
    }

    /// The SSE algorithm of the bucket's default encryption rule.
    pub(crate) async fn bucket_encryption(&self, bucket: &str) -> Result<Option<String>, String> {
        let output = self
            .s3
            .get_bucket_encryption()
            .bucket(bucket)
            .send()
            .await
            .map_err(|e| aws_sdk_s3::error::DisplayErrorContext(e).to_string())?;
        Ok(output
            .server_side_encryption_configuration()
            .and_then(|c| c.rules().first())
            .and_then(|r| r.apply_server_side_encryption_by_default())
            .map(|d| d.sse_algorithm().as_str().to_owned()))
    }

    /// Creates the session's log stream (an existing one is fine).
    pub(crate) async fn create_log_stream(&self, group: &str, stream: &str) -> Result<(), String> {
        match self
            .logs
            .create_log_stream()
            .log_group_name(group)
            .log_stream_name(stream)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_already_exists_exception()) =>
            {
                Ok(())
            }
            Err(e) => Err(aws_sdk_cloudwatchlogs::error::DisplayErrorContext(e).to_string()),
        }
    }

    /// Puts `messages` as events of `stream`, [`EVENTS_PER_CALL`] a call, time-stamped now.
    pub(crate) async fn put_events(
        &self,
        group: &str,
        stream: &str,
        messages: Vec<String>,
    ) -> Result<u64, String> {
        let mut put = 0;
        for batch in messages.chunks(EVENTS_PER_CALL) {
            let now = i64::try_from(crate::message::now_millis()).unwrap_or(i64::MAX);
            let events = batch
                .iter()
                .map(|m| {
                    InputLogEvent::builder()
                        .timestamp(now)
                        .message(m)
                        .build()
                        .map_err(|e| e.to_string())
                })
                .collect::<Result<Vec<_>, _>>()?;
            self.logs
                .put_log_events()
                .log_group_name(group)
                .log_stream_name(stream)
                .set_log_events(Some(events))
                .send()
                .await
                .map_err(|e| aws_sdk_cloudwatchlogs::error::DisplayErrorContext(e).to_string())?;
            put += batch.len() as u64;
        }
        Ok(put)
    }

    /// Uploads the transcript with the bucket's default encryption, as `S3Upload` does.
    pub(crate) async fn put_object(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
    ) -> Result<(), String> {
        let sse = self.bucket_encryption(bucket).await.ok().flatten();
        self.s3
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_type("text/plain")
            .acl(ObjectCannedAcl::BucketOwnerFullControl)
            .set_server_side_encryption(sse.map(|a| ServerSideEncryption::from(a.as_str())))
            .body(ByteStream::from(body))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| aws_sdk_s3::error::DisplayErrorContext(e).to_string())
    }
}

/// What the agent decrypts a client's data key with.
#[derive(Clone, Debug)]
pub(crate) struct DataKeyContext {
    /// The document's `kmsKeyId`, as the HandshakeRequest named it.
    pub(crate) key_id: String,
    /// `aws:ssm:SessionId`.
    pub(crate) session: String,
    /// `aws:ssm:TargetId`.
    pub(crate) target: String,
    /// `aws:ssm:RandomChallenge`: the request's challenge, when the client set
    /// `ChallengeAcknowledgement`.
    pub(crate) random_challenge: Option<String>,
}
