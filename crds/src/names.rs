//! Validated names and identifiers used in the API: EC2 instance IDs, IAM principal names, tag
//! keys and values, ports, KMS keys and logging destinations.
//!
//! Each is a transparent newtype over its wire value whose schema carries a CEL rule with a
//! message that says what to fix. The API server evaluates those rules on `kubectl apply`; the
//! `validation` module evaluates the very same rules offline for `fleet-access-operator plan`.

use std::{borrow::Cow, fmt};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Defines a string newtype whose schema has a length bound and one CEL rule with a message.
macro_rules! validated_string {
    ($(#[$doc:meta])* $name:ident, max = $max:expr, rule = $rule:expr, message = $message:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// The CEL rule the API server checks for this value.
            pub const RULE: &'static str = $rule;
            /// What the API server says when the rule fails.
            pub const MESSAGE: &'static str = $message;

            /// The value as written in the resource.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(value: &str) -> Self {
                Self(value.to_owned())
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> Cow<'static, str> {
                stringify!($name).into()
            }

            fn inline_schema() -> bool {
                true
            }

            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({
                    "type": "string",
                    "maxLength": $max,
                    "x-kubernetes-validations": [{ "rule": $rule, "message": $message }],
                })
            }
        }
    };
}

validated_string!(
    /// An EC2 instance ID (`i-` and 8 or 17 lowercase hex digits) or a managed on-premises node
    /// ID (`mi-` and 17 lowercase hex digits).
    InstanceId,
    max = 20,
    rule = "self.matches('^(i-([0-9a-f]{8}|[0-9a-f]{17})|mi-[0-9a-f]{17})$')",
    message = "must be an EC2 instance ID (i- followed by 8 or 17 lowercase hex digits) or a managed node ID (mi- followed by 17 lowercase hex digits)"
);

impl InstanceId {
    /// Managed on-premises nodes (`mi-…`) have `managed-instance` ARNs in the `ssm` service.
    pub fn is_managed_node(&self) -> bool {
        self.0.starts_with("mi-")
    }
}

validated_string!(
    /// An IAM user name: 1 to 64 of letters, digits and `+=,.@_-`.
    IamUserName,
    max = 64,
    rule = "self.matches('^[A-Za-z0-9+=,.@_-]{1,64}$')",
    message = "must be an IAM user name: 1 to 64 characters of letters, digits and +=,.@_-"
);

validated_string!(
    /// An IAM role name: 1 to 64 of letters, digits and `+=,.@_-`.
    IamRoleName,
    max = 64,
    rule = "self.matches('^[A-Za-z0-9+=,.@_-]{1,64}$')",
    message = "must be an IAM role name: 1 to 64 characters of letters, digits and +=,.@_-"
);

validated_string!(
    /// An IAM group name: 1 to 128 of letters, digits and `+=,.@_-`.
    IamGroupName,
    max = 128,
    rule = "self.matches('^[A-Za-z0-9+=,.@_-]{1,128}$')",
    message = "must be an IAM group name: 1 to 128 characters of letters, digits and +=,.@_-"
);

validated_string!(
    /// A KMS key for session data encryption: a key ID, a multi-Region key ID (`mrk-…`), a key
    /// ARN, an alias name (`alias/…`) or an alias ARN.
    KmsKeyId,
    max = 2048,
    rule = "self.matches('^(arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:)?(key/)?([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|mrk-[0-9a-f]{32})$') || (self.matches('^(arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:)?alias/[A-Za-z0-9/_-]{1,250}$') && !self.matches('alias/aws/'))",
    message = "must be a KMS key ID, a key ARN, an alias name (alias/my-key) or an alias ARN; AWS managed aliases (alias/aws/...) cannot encrypt sessions"
);

validated_string!(
    /// A CloudWatch Logs log group name.
    LogGroupName,
    max = 512,
    rule = "self.matches('^[.A-Za-z0-9_/#-]{1,512}$')",
    message = "must be a CloudWatch Logs group name: 1 to 512 characters of letters, digits and ._-/#"
);

validated_string!(
    /// An S3 bucket name.
    BucketName,
    max = 63,
    rule = "self.matches('^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$') && !self.contains('..')",
    message = "must be an S3 bucket name: 3 to 63 lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit"
);

validated_string!(
    /// A key prefix inside an S3 bucket.
    S3KeyPrefix,
    max = 1024,
    rule = "!self.startsWith('/')",
    message = "must not start with '/': S3 key prefixes are relative to the bucket"
);

validated_string!(
    /// A Linux user name on the instances, used by Run As.
    OsUserName,
    max = 32,
    rule = "self.matches('^[a-z_][a-z0-9_-]{0,31}$')",
    message = "must be a Linux user name: a lowercase letter or _ followed by up to 31 lowercase letters, digits, _ or -"
);

validated_string!(
    /// A value pattern in a `SessionAccessPolicy`: a value, or a prefix followed by one `*`
    /// (`payments-*`). No other wildcard: a pattern must be checkable in CEL and in the operator
    /// alike, and a prefix is what team naming conventions give.
    Pattern,
    max = 512,
    rule = "self.matches('^[^*?]+[*]?$') || self == '*'",
    message = "must be a value, or a prefix followed by one trailing * (payments-*); * and ? may not appear elsewhere"
);

impl Pattern {
    /// Whether `value` is the pattern's value, or starts with its prefix. A value that itself
    /// holds IAM wildcards matches only when the pattern's prefix is literally at its start, so
    /// every string IAM would match with it stays inside the pattern too.
    pub fn matches(&self, value: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => value.starts_with(prefix),
            None => value == self.0,
        }
    }

    /// Whether any of `patterns` matches `value`.
    pub fn any_matches(patterns: &[Pattern], value: &str) -> bool {
        patterns.iter().any(|p| p.matches(value))
    }
}

validated_string!(
    /// A duration in hours and minutes: `8h`, `90m`, `1h30m`.
    HoursMinutes,
    max = 12,
    rule = "self.matches('^([0-9]{1,5}h)?([0-9]{1,5}m)?$') && size(self) > 0",
    message = "must be hours and minutes, such as 8h, 90m or 1h30m"
);

impl HoursMinutes {
    /// The duration in seconds; `None` for text the schema would refuse.
    pub fn seconds(&self) -> Option<i64> {
        let text = self.as_str();
        let (hours, minutes) = match text.split_once('h') {
            Some((hours, minutes)) => (Some(hours), minutes),
            None => (None, text),
        };
        let hours: i64 = hours.map_or(Ok(0), str::parse).ok()?;
        let minutes: i64 = match minutes {
            "" if !text.is_empty() => 0,
            minutes => minutes.strip_suffix('m')?.parse().ok()?,
        };
        Some(hours * 3600 + minutes * 60)
    }
}

validated_string!(
    /// The hosts a boundary lets grants forward to: one host, or `*.` and a domain (every host
    /// in that domain, at any depth).
    HostPattern,
    max = 253,
    rule = "self.matches('^(\\\\*\\\\.)?[a-z0-9.:-]+$')",
    message = "must be a host (DNS name or IP address) or *. followed by a domain"
);

impl HostPattern {
    /// Whether `host` is the pattern's host, or in its domain.
    pub fn matches(&self, host: &str) -> bool {
        match self.0.strip_prefix('*') {
            Some(domain) => host.ends_with(domain),
            None => host == self.0,
        }
    }
}

/// A resource tag key as EC2 and IAM conditions accept it.
pub const TAG_KEY_RULE: &str = "self.all(k, k.size() >= 1 && k.size() <= 128 && k.matches('^[\\\\p{L}\\\\p{Z}\\\\p{N}_.:/=+@-]+$') && !k.startsWith('aws:'))";
/// What the API server says when a tag key is invalid.
pub const TAG_KEY_MESSAGE: &str =
    "tag keys must be 1 to 128 letters, digits, spaces and _.:/=+-@, and must not start with aws:";
validated_string!(
    /// A resource tag value: up to 256 letters, digits, spaces and `_.:/=+-@`; `*` and `?` are
    /// IAM `StringLike` wildcards.
    TagValue,
    max = 256,
    rule = "self.matches('^[\\\\p{L}\\\\p{Z}\\\\p{N}_.:/=+@*?-]*$')",
    message = "tag values must be 0 to 256 letters, digits, spaces and _.:/=+-@ (and the wildcards * and ?)"
);

/// A host that an instance forwards to: a DNS name or an IP address, but never the instance
/// itself (loopback), an unspecified address, or a link-local or EC2-reserved address (the
/// metadata and credential endpoints), which the SSM agent refuses to forward to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RemoteHostName(pub String);

impl RemoteHostName {
    /// The CEL rule for its form: an IP address, or a DNS name whose last label starts with a
    /// letter (so that no malformed address passes for a name).
    pub const FORM_RULE: &'static str = "isIP(self) || self.matches('^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\\\\.)*[a-z]([a-z0-9-]{0,61}[a-z0-9])?$')";
    /// What the API server says when the form is wrong.
    pub const FORM_MESSAGE: &'static str =
        "must be a DNS name (lowercase letters, digits, dots and hyphens) or an IP address";
    /// The CEL rule that keeps the agent's forbidden destinations out.
    pub const REACHABLE_RULE: &'static str = "self != 'localhost' && !self.endsWith('.localhost') && !self.startsWith('instance-data') && !(isIP(self) && (ip(self).isLoopback() || ip(self).isUnspecified() || ip(self).isLinkLocalUnicast() || (ip(self).family() == 6 && cidr('fd00:ec2::/32').containsIP(ip(self)))))";
    /// What the API server says when it names a forbidden destination.
    pub const REACHABLE_MESSAGE: &'static str = "must not be the instance itself (localhost, 127.0.0.0/8, ::1), an unspecified address, or a link-local or EC2-reserved address (169.254.0.0/16, fe80::/10, fd00:ec2::/32: the instance metadata and the ECS and EKS credential endpoints): the SSM agent refuses to forward there; to reach a port of the instance itself use spec.sessions.ports";

    /// The host as written in the resource.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RemoteHostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl JsonSchema for RemoteHostName {
    fn schema_name() -> Cow<'static, str> {
        "RemoteHostName".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "minLength": 1,
            "maxLength": 253,
            "x-kubernetes-validations": [
                { "rule": Self::FORM_RULE, "message": Self::FORM_MESSAGE },
                { "rule": Self::REACHABLE_RULE, "message": Self::REACHABLE_MESSAGE },
            ],
        })
    }
}

/// A TCP port number, 1 to 65535.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Port(pub u16);

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl JsonSchema for Port {
    fn schema_name() -> Cow<'static, str> {
        "Port".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "integer",
            "format": "int32",
            "x-kubernetes-validations": [{
                "rule": "self >= 1 && self <= 65535",
                "message": "must be a TCP port from 1 to 65535",
            }],
        })
    }
}
