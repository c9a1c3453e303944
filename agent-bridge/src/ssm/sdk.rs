//! The SSM control plane over aws-sdk-ssm: StartSession, ResumeSession and TerminateSession
//! for the driver, DescribeInstanceInformation to explain failures, and DescribeSessions for
//! the sweep of dead replicas' sessions. The only module that imports the SDK. Errors become
//! messages a person can act on.

use std::collections::HashMap;

use aws_sdk_ssm::{
    Client,
    error::{DisplayErrorContext, ProvideErrorMetadata, SdkError},
    types::{InstanceInformationStringFilter, SessionState},
};

use crate::ssm::{ControlPlane, ControlPlaneError, Resumed, StartSessionRequest, StreamTarget};
use crate::stream_url::StreamUrls;
use fleet_access_crds::agent_version;

/// [`SdkControlPlane::active_sessions`] stops listing after this many.
pub const ACTIVE_SESSIONS_LIMIT: usize = 20_000;

/// Session Manager through the AWS SDK.
#[derive(Clone, Debug)]
pub struct SdkControlPlane {
    client: Client,
    stream_urls: StreamUrls,
}

impl SdkControlPlane {
    /// From a loaded SDK configuration (default credential chain, Region, endpoint overrides).
    /// Only stream URLs on Session Manager hosts are accepted.
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        Self {
            client: Client::new(config),
            stream_urls: StreamUrls::default(),
        }
    }

    /// Accepts the stream URLs `stream_urls` allows (an emulator's: [`StreamUrls::Any`]).
    #[must_use]
    pub fn with_stream_urls(mut self, stream_urls: StreamUrls) -> Self {
        self.stream_urls = stream_urls;
        self
    }

    /// Refuses a stream URL this control plane must not dial.
    fn check_stream_url(
        &self,
        operation: &'static str,
        url: &str,
    ) -> Result<(), ControlPlaneError> {
        self.stream_urls
            .check(url)
            .map_err(|untrusted| ControlPlaneError {
                operation,
                message: untrusted.to_string(),
                retryable: false,
            })
    }

    /// The Active sessions the caller may see, as (session id, reason) pairs, at most
    /// [`ACTIVE_SESSIONS_LIMIT`].
    pub async fn active_sessions(&self) -> Result<Vec<(String, String)>, ControlPlaneError> {
        let mut sessions = Vec::new();
        let mut next_token = None;
        loop {
            let page = self
                .client
                .describe_sessions()
                .state(SessionState::Active)
                .set_next_token(next_token)
                .send()
                .await
                .map_err(|e| classify("DescribeSessions", None, e))?;
            sessions.extend(page.sessions().iter().filter_map(|session| {
                Some((
                    session.session_id()?.to_owned(),
                    session.reason().unwrap_or_default().to_owned(),
                ))
            }));
            next_token = page
                .next_token()
                .filter(|t| !t.is_empty())
                .map(str::to_owned);
            if next_token.is_none() || sessions.len() >= ACTIVE_SESSIONS_LIMIT {
                return Ok(sessions);
            }
        }
    }

    /// What SSM knows of an instance: its ping status and agent version.
    pub async fn describe_instance(
        &self,
        instance_id: &str,
    ) -> Result<Option<InstanceState>, ControlPlaneError> {
        let filter = InstanceInformationStringFilter::builder()
            .key("InstanceIds")
            .values(instance_id)
            .build()
            .map_err(|e| ControlPlaneError {
                operation: "DescribeInstanceInformation",
                message: e.to_string(),
                retryable: false,
            })?;
        let output = self
            .client
            .describe_instance_information()
            .filters(filter)
            .send()
            .await
            .map_err(|e| classify("DescribeInstanceInformation", None, e))?;
        Ok(output
            .instance_information_list()
            .first()
            .map(|info| InstanceState {
                ping_status: info.ping_status().map(|p| p.as_str().to_owned()),
                agent_version: info.agent_version().map(ToOwned::to_owned),
            }))
    }
}

/// An instance as SSM sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceState {
    /// Online, ConnectionLost or Inactive.
    pub ping_status: Option<String>,
    /// The SSM Agent version.
    pub agent_version: Option<String>,
}

impl InstanceState {
    /// Why this instance cannot carry the session, if it visibly cannot.
    pub fn problem(&self, instance_id: &str, wants_ssh: bool) -> Option<String> {
        if self.ping_status.as_deref() != Some("Online") {
            let status = self.ping_status.as_deref().unwrap_or("unknown");
            return Some(format!(
                "instance {instance_id} is not connected to Systems Manager (ping status {status}): check that its SSM Agent runs and reaches the ssm, ssmmessages and ec2messages endpoints"
            ));
        }
        let version = self.agent_version.as_deref().unwrap_or("0");
        if wants_ssh && !agent_version::supports_ssh(version) {
            return Some(format!(
                "instance {instance_id} runs SSM Agent {version}, too old for SSH: update it to {} or later",
                agent_version::SSH_MIN_AGENT
            ));
        }
        None
    }

    /// Why the instance cannot forward to a remote host, if its agent says so: an agent before
    /// remote-host support ignores the host and forwards to its own port instead.
    pub fn remote_host_problem(&self, instance_id: &str) -> Option<String> {
        let version = self.agent_version.as_deref()?;
        (!agent_version::supports_remote_hosts(version)).then(|| {
            format!(
                "instance {instance_id} runs SSM Agent {version}, too old to forward to a remote host (it would forward to its own port instead): update it to {} or later",
                agent_version::REMOTE_HOST_MIN_AGENT
            )
        })
    }
}

impl ControlPlane for SdkControlPlane {
    async fn start_session(
        &self,
        request: &StartSessionRequest,
    ) -> Result<StreamTarget, ControlPlaneError> {
        let parameters: HashMap<String, Vec<String>> = request
            .parameters
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let output = self
            .client
            .start_session()
            .target(&request.target)
            .set_document_name(request.document_name.clone())
            .set_parameters((!parameters.is_empty()).then_some(parameters))
            .set_reason(request.reason.clone())
            .send()
            .await
            .map_err(|e| classify("StartSession", Some(request), e))?;
        let missing = |field: &str| ControlPlaneError {
            operation: "StartSession",
            message: format!("the response has no {field}"),
            retryable: false,
        };
        let target = StreamTarget {
            session_id: output
                .session_id()
                .ok_or_else(|| missing("SessionId"))?
                .to_owned(),
            stream_url: output
                .stream_url()
                .ok_or_else(|| missing("StreamUrl"))?
                .to_owned(),
            token_value: output
                .token_value()
                .ok_or_else(|| missing("TokenValue"))?
                .to_owned(),
        };
        if let Err(refused) = self.check_stream_url("StartSession", &target.stream_url) {
            // The session exists at AWS but will never be joined: end it there.
            let _ = self.terminate_session(&target.session_id).await;
            return Err(refused);
        }
        Ok(target)
    }

    async fn resume_session(&self, session_id: &str) -> Result<Option<Resumed>, ControlPlaneError> {
        let output = self
            .client
            .resume_session()
            .session_id(session_id)
            .send()
            .await
            .map_err(|e| classify("ResumeSession", None, e))?;
        let Some(token) = output.token_value() else {
            return Ok(None);
        };
        let stream_url = output.stream_url().filter(|url| !url.is_empty());
        if let Some(url) = stream_url {
            self.check_stream_url("ResumeSession", url)?;
        }
        Ok(Some(Resumed {
            token_value: token.to_owned(),
            stream_url: stream_url.map(str::to_owned),
        }))
    }

    async fn terminate_session(&self, session_id: &str) -> Result<(), ControlPlaneError> {
        self.client
            .terminate_session()
            .session_id(session_id)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify("TerminateSession", None, e))
    }
}

/// Turns an SDK error into a message that says what to do.
fn classify<E, R>(
    operation: &'static str,
    request: Option<&StartSessionRequest>,
    error: SdkError<E, R>,
) -> ControlPlaneError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let code = error.code().map(ToOwned::to_owned);
    let service_message = error.message().unwrap_or_default().to_owned();
    let target = request.map(|r| r.target.as_str()).unwrap_or("the instance");
    let document = request
        .and_then(|r| r.document_name.as_deref())
        .unwrap_or("the default shell document");
    let (message, retryable) = match code.as_deref() {
        Some("TargetNotConnected") => (
            format!(
                "instance {target} is not connected to Systems Manager: check that its SSM Agent runs, has an instance profile allowing Session Manager, and reaches the ssm and ssmmessages endpoints"
            ),
            false,
        ),
        Some("AccessDeniedException") => (
            format!(
                "access denied for {operation} on {target} with document {document}: the caller needs ssm:{operation} on the instance and the document ({service_message})"
            ),
            false,
        ),
        Some("InvalidDocument") => (
            format!("document {document} does not exist or cannot be used: {service_message}"),
            false,
        ),
        Some("InvalidTarget" | "InvalidInstanceId") => (
            format!("{target} is not a managed instance: {service_message}"),
            false,
        ),
        Some("DoesNotExistException") => (
            format!("no such session or instance: {service_message}"),
            false,
        ),
        Some(code) if code.contains("Throttl") => (
            format!("SSM throttled {operation}: {service_message}"),
            true,
        ),
        Some(code) => (format!("{code}: {service_message}"), false),
        None => {
            let detail = DisplayErrorContext(&error).to_string();
            if detail.contains("credentials") || detail.contains("Credentials") {
                (
                    "no AWS credentials found: set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or run in a pod with IRSA or EKS Pod Identity".into(),
                    false,
                )
            } else {
                (format!("cannot reach SSM: {detail}"), true)
            }
        }
    };
    ControlPlaneError {
        operation,
        message,
        retryable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_problems_are_explained() {
        let offline = InstanceState {
            ping_status: Some("ConnectionLost".into()),
            agent_version: Some("3.0.0.0".into()),
        };
        assert!(
            offline
                .problem("i-1", false)
                .unwrap()
                .contains("ping status ConnectionLost")
        );
        let old = InstanceState {
            ping_status: Some("Online".into()),
            agent_version: Some("2.3.500.0".into()),
        };
        assert!(
            old.problem("i-1", true)
                .unwrap()
                .contains("too old for SSH")
        );
        assert_eq!(old.problem("i-1", false), None);
    }
}
