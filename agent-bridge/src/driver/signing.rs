//! SigV4 for the data-channel WebSocket upgrade (docs/protocol.md §1): a `GET` of the
//! stream URL, service `ssmmessages`, the session's region, the SHA-256 of an empty body.
//! Presigned URLs (any `X-Amz-*` signing parameter present) are left unsigned.

use std::future::Future;
use std::pin::Pin;
use std::time::SystemTime;

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;

/// The SigV4 service name of the data channel.
pub const SERVICE: &str = "ssmmessages";

/// Query parameters that mark a presigned URL (SMP skips signing when any is present).
const PRESIGN_PARAMS: [&str; 7] = [
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
];

/// Signing failed (credentials unavailable, or an unparseable URL).
#[derive(Debug, thiserror::Error)]
#[error("signing the data-channel upgrade failed: {0}")]
pub struct SigningError(pub String);

/// Headers to add to the upgrade request.
pub type SignedHeaders = Vec<(String, String)>;

/// Produces the upgrade headers for a stream URL; called before every dial (credentials may
/// rotate between reconnects).
pub trait UpgradeSigner: Send + Sync {
    /// Headers for a `GET` of `url` (empty for presigned URLs).
    fn sign<'a>(
        &'a self,
        url: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<SignedHeaders, SigningError>> + Send + 'a>>;
}

/// True when the URL already carries SigV4 query parameters.
pub fn is_presigned(url: &str) -> bool {
    let Some((_, query)) = url.split_once('?') else {
        return false;
    };
    query.split('&').any(|pair| {
        let key = pair.split('=').next().unwrap_or_default();
        PRESIGN_PARAMS.iter().any(|p| p.eq_ignore_ascii_case(key))
    })
}

/// SigV4 signer over an AWS credentials provider.
#[derive(Debug, Clone)]
pub struct SigV4Signer {
    credentials: SharedCredentialsProvider,
    region: String,
}

impl SigV4Signer {
    /// A signer for `region` (the session's region) using `credentials`.
    pub fn new(credentials: SharedCredentialsProvider, region: impl Into<String>) -> Self {
        Self {
            credentials,
            region: region.into(),
        }
    }

    /// Signs with fixed credentials and time (pure; used by `sign` and by tests).
    pub fn sign_with(
        credentials: &aws_credential_types::Credentials,
        region: &str,
        url: &str,
        time: SystemTime,
    ) -> Result<SignedHeaders, SigningError> {
        if is_presigned(url) {
            return Ok(Vec::new());
        }
        let uri: http::Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| SigningError(e.to_string()))?;
        let host = match (uri.host(), uri.port_u16()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            (None, _) => return Err(SigningError(format!("no host in {url}"))),
        };
        // The signer canonicalises https URLs; ws(s) schemes sign the same request.
        let https = match url.split_once("://") {
            Some((_, rest)) => format!("https://{rest}"),
            None => url.to_owned(),
        };
        let identity = credentials.clone().into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(region)
            .name(SERVICE)
            .time(time)
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| SigningError(e.to_string()))?
            .into();
        let request = SignableRequest::new(
            "GET",
            https.as_str(),
            [("host", host.as_str())].into_iter(),
            SignableBody::Bytes(&[]),
        )
        .map_err(|e| SigningError(e.to_string()))?;
        let (instructions, _signature) = sign(request, &params)
            .map_err(|e| SigningError(e.to_string()))?
            .into_parts();
        let (headers, _query) = instructions.into_parts();
        Ok(headers
            .into_iter()
            .map(|h| (h.name().to_owned(), h.value().to_owned()))
            .collect())
    }
}

impl UpgradeSigner for SigV4Signer {
    fn sign<'a>(
        &'a self,
        url: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<SignedHeaders, SigningError>> + Send + 'a>> {
        Box::pin(async move {
            if is_presigned(url) {
                return Ok(Vec::new());
            }
            let credentials = self
                .credentials
                .provide_credentials()
                .await
                .map_err(|e| SigningError(e.to_string()))?;
            // The wall clock is the signing time by definition; this is the driver layer.
            Self::sign_with(&credentials, &self.region, url, SystemTime::now())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn presigned_detection() {
        assert!(is_presigned(
            "wss://h/v1/data-channel/s?role=publish_subscribe&X-Amz-Signature=abc"
        ));
        assert!(is_presigned("wss://h/x?x-amz-credential=a"));
        assert!(!is_presigned(
            "wss://h/v1/data-channel/s?role=publish_subscribe&cell-number=AAA"
        ));
        assert!(!is_presigned("wss://h/v1/data-channel/s"));
    }

    #[test]
    fn signs_for_ssmmessages_with_session_token() {
        let creds = aws_credential_types::Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            Some("token".into()),
            None,
            "test",
        );
        let time = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let url =
            "wss://ssmmessages.eu-west-1.amazonaws.com/v1/data-channel/s-1?role=publish_subscribe";
        let headers = SigV4Signer::sign_with(&creds, "eu-west-1", url, time).unwrap();
        let get = |k: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.clone())
        };
        let auth = get("authorization").unwrap();
        assert!(
            auth.starts_with(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20231114/eu-west-1/ssmmessages/aws4_request"
            ),
            "{auth}"
        );
        assert!(auth.contains("SignedHeaders=host;x-amz-date"), "{auth}");
        assert_eq!(get("x-amz-date").as_deref(), Some("20231114T221320Z"));
        assert_eq!(get("x-amz-security-token").as_deref(), Some("token"));
        // Deterministic for fixed inputs; different for another URL.
        assert_eq!(
            SigV4Signer::sign_with(&creds, "eu-west-1", url, time).unwrap(),
            headers
        );
        let other =
            SigV4Signer::sign_with(&creds, "eu-west-1", &url.replace("s-1", "s-2"), time).unwrap();
        assert_ne!(other, headers);
        assert!(
            SigV4Signer::sign_with(
                &creds,
                "eu-west-1",
                &format!("{url}&X-Amz-Signature=x"),
                time
            )
            .unwrap()
            .is_empty()
        );
    }
}
