//! A shell's KMS data keys over aws-sdk-kms: `GenerateDataKey` for the document's key, 64 bytes,
//! with the encryption context the agent decrypts with (`aws:ssm:SessionId`,
//! `aws:ssm:TargetId`), as the official plugin asks for it.

use aws_sdk_kms::error::DisplayErrorContext;

use crate::driver::DataKeySource;
use crate::protocol::kms::{DATA_KEY_BYTES, DataKey};

/// KMS through the SDK.
#[derive(Clone, Debug)]
pub struct SdkDataKeys {
    client: aws_sdk_kms::Client,
}

impl SdkDataKeys {
    /// KMS as `sdk` configures it (`endpoint`: another endpoint, for tests).
    pub fn new(sdk: &aws_config::SdkConfig, endpoint: Option<&str>) -> Self {
        let mut config = aws_sdk_kms::config::Builder::from(sdk);
        if let Some(endpoint) = endpoint {
            config = config.endpoint_url(endpoint);
        }
        Self {
            client: aws_sdk_kms::Client::from_conf(config.build()),
        }
    }
}

impl DataKeySource for SdkDataKeys {
    fn generate(
        &self,
        key_id: &str,
        session_id: &str,
        target: &str,
    ) -> futures::future::BoxFuture<'static, Result<DataKey, String>> {
        let request = self
            .client
            .generate_data_key()
            .key_id(key_id)
            .number_of_bytes(DATA_KEY_BYTES as i32)
            .encryption_context("aws:ssm:SessionId", session_id)
            .encryption_context("aws:ssm:TargetId", target);
        let key_id = key_id.to_owned();
        Box::pin(async move {
            let out = request.send().await.map_err(|e| {
                format!(
                    "KMS GenerateDataKey with key {key_id} failed: {}",
                    DisplayErrorContext(e)
                )
            })?;
            match (out.plaintext(), out.ciphertext_blob()) {
                (Some(plaintext), Some(blob)) => Ok(DataKey {
                    plaintext: plaintext.as_ref().to_vec(),
                    ciphertext_blob: blob.as_ref().to_vec(),
                }),
                _ => Err(format!(
                    "KMS GenerateDataKey with key {key_id} returned no key"
                )),
            }
        })
    }
}
