//! Which data-channel URLs the bridge dials. StartSession and ResumeSession return a StreamUrl,
//! and the bridge sends the session's token and its SigV4 headers (with the session token of
//! its credentials) to it. Unless told otherwise, only `wss://` URLs on a Session Manager
//! messages host are dialled: a URL from a compromised or misconfigured endpoint would
//! otherwise receive them, in clear text for `ws://`.
//!
//! The hosts, as AWS names them (docs/protocol.md §1):
//!
//! ```text
//! ssmmessages.<region>.amazonaws.com               regional
//! ssmmessages-fips.<region>.amazonaws.com          FIPS
//! ssmmessages.<region>.amazonaws.com.cn            China
//! ssmmessages.<region>.api.aws                     dual-stack
//! <vpce-id>[-<az>].ssmmessages.<region>.vpce.amazonaws.com[.cn]   interface VPC endpoint
//! ```

/// What the bridge accepts as a stream URL.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StreamUrls {
    /// `wss://` on a Session Manager messages host (the default).
    #[default]
    SessionManagerOnly,
    /// Any `ws://` or `wss://` URL: for the emulator and the demo, set explicitly.
    Any,
}

/// A stream URL the bridge will not dial.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "the stream URL {url:?} {reason}; only wss:// URLs on a Session Manager messages host \
     (ssmmessages.<region>.amazonaws.com and its FIPS, China, dual-stack and VPC endpoint forms) \
     are dialled, unless --allow-any-stream-url is set (for an emulator)"
)]
pub struct UntrustedStreamUrl {
    /// The URL, without its query string.
    pub url: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl StreamUrls {
    /// Checks `url` against this policy.
    pub fn check(self, url: &str) -> Result<(), UntrustedStreamUrl> {
        let untrusted = |reason| UntrustedStreamUrl {
            url: url.split('?').next().unwrap_or_default().to_owned(),
            reason,
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| untrusted("is not a URL"))?;
        let scheme = scheme.to_ascii_lowercase();
        if self == Self::Any {
            return match scheme.as_str() {
                "ws" | "wss" => Ok(()),
                _ => Err(untrusted("is not a WebSocket URL")),
            };
        }
        if scheme != "wss" {
            return Err(untrusted("is not encrypted (wss://)"));
        }
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if authority.contains('@') {
            return Err(untrusted("carries user information"));
        }
        let host = match authority.rsplit_once(':') {
            Some((host, "443")) => host,
            Some(_) => return Err(untrusted("names a port other than 443")),
            None => authority,
        };
        if is_session_manager_host(&host.to_ascii_lowercase()) {
            Ok(())
        } else {
            Err(untrusted("is not on a Session Manager messages host"))
        }
    }
}

fn is_session_manager_host(host: &str) -> bool {
    let labels: Vec<&str> = host.split('.').collect();
    match labels.as_slice() {
        [
            "ssmmessages" | "ssmmessages-fips",
            region,
            "amazonaws",
            "com",
        ]
        | ["ssmmessages", region, "amazonaws", "com", "cn"]
        | ["ssmmessages" | "ssmmessages-fips", region, "api", "aws"] => is_region(region),
        [endpoint, "ssmmessages", region, "vpce", "amazonaws", "com"]
        | [
            endpoint,
            "ssmmessages",
            region,
            "vpce",
            "amazonaws",
            "com",
            "cn",
        ] => is_vpc_endpoint_id(endpoint) && is_region(region),
        _ => false,
    }
}

/// `us-east-1`, `cn-north-1`, `us-gov-west-1`, `ap-southeast-5`, ...
fn is_region(label: &str) -> bool {
    let Some((area, number)) = label.rsplit_once('-') else {
        return false;
    };
    !number.is_empty()
        && number.bytes().all(|b| b.is_ascii_digit())
        && area.contains('-')
        && area
            .split('-')
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_lowercase()))
}

/// `vpce-0123456789abcdef0`, optionally with an Availability Zone: `vpce-0123...-us-east-1a`.
fn is_vpc_endpoint_id(label: &str) -> bool {
    label.strip_prefix("vpce-").is_some_and(|id| {
        !id.is_empty()
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: StreamUrls = StreamUrls::SessionManagerOnly;

    #[test]
    fn session_manager_hosts_are_accepted() {
        for url in [
            "wss://ssmmessages.us-east-1.amazonaws.com/v1/data-channel/s-1?role=publish_subscribe",
            "wss://ssmmessages-fips.us-gov-west-1.amazonaws.com/v1/data-channel/s-1",
            "wss://ssmmessages.cn-north-1.amazonaws.com.cn/v1/data-channel/s-1",
            "wss://ssmmessages.eu-west-1.api.aws/v1/data-channel/s-1",
            "wss://vpce-0a1b2c3d4e5f60718-abcdefgh.ssmmessages.eu-central-1.vpce.amazonaws.com/v1/data-channel/s-1",
            "wss://vpce-0a1b2c3d4e5f60718-abcdefgh-eu-central-1a.ssmmessages.eu-central-1.vpce.amazonaws.com/v1",
            "WSS://SSMMESSAGES.AP-SOUTHEAST-2.AMAZONAWS.COM:443/v1/data-channel/s-1",
        ] {
            assert_eq!(STRICT.check(url), Ok(()), "{url}");
        }
    }

    #[test]
    fn other_urls_are_refused_with_the_reason() {
        for (url, reason) in [
            (
                "ws://ssmmessages.us-east-1.amazonaws.com/v1/data-channel/s-1",
                "is not encrypted (wss://)",
            ),
            (
                "wss://ssmmessages.us-east-1.amazonaws.com.evil.example/v1",
                "is not on a Session Manager messages host",
            ),
            (
                "wss://ssmmessages.us-east-1.amazonaws.com:8443/v1",
                "names a port other than 443",
            ),
            (
                "wss://evil@ssmmessages.us-east-1.amazonaws.com/v1",
                "carries user information",
            ),
            (
                "wss://ssm.us-east-1.amazonaws.com/v1",
                "is not on a Session Manager messages host",
            ),
            (
                "wss://ssmmessages.amazonaws.com/v1",
                "is not on a Session Manager messages host",
            ),
            (
                "wss://ssmmessages.us-east-1.vpce.amazonaws.com/v1",
                "is not on a Session Manager messages host",
            ),
            ("wss://127.0.0.1:8443/v1", "names a port other than 443"),
            (
                "wss://localhost/v1",
                "is not on a Session Manager messages host",
            ),
            ("not a url", "is not a URL"),
        ] {
            let error = STRICT.check(url).expect_err(url);
            assert_eq!(error.reason, reason, "{url}");
        }
    }

    #[test]
    fn the_refusal_says_what_to_do_and_hides_the_query() {
        let error = STRICT
            .check("ws://127.0.0.1:4000/v1/data-channel/s-1?role=publish_subscribe&token=x")
            .expect_err("plain");
        let text = error.to_string();
        assert!(
            text.contains("ws://127.0.0.1:4000/v1/data-channel/s-1\""),
            "{text}"
        );
        assert!(!text.contains("token"), "{text}");
        assert!(text.contains("--allow-any-stream-url"), "{text}");
    }

    #[test]
    fn any_accepts_plain_and_local_websockets_but_nothing_else() {
        assert_eq!(
            StreamUrls::Any.check("ws://127.0.0.1:4000/v1/data-channel/s-1"),
            Ok(())
        );
        assert_eq!(StreamUrls::Any.check("wss://localhost:8443/v1"), Ok(()));
        assert!(StreamUrls::Any.check("http://127.0.0.1/v1").is_err());
    }
}
