//! The SSM JSON API (`POST /`, `X-Amz-Target: AmazonSSM.<Operation>`, awsJson1.1): StartSession,
//! ResumeSession, TerminateSession, DescribeSessions and DescribeInstanceInformation over the
//! simulated fleet; every other operation is forwarded verbatim to the upstream endpoint.
//! SigV4 `Authorization` headers are accepted without verification and never logged.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::agent::{self, AgentInput};
use crate::documents::{self, builtin_document};
use crate::registry::{SessionEntry, SessionInfo, SessionKind, Shared, lock};
use crate::report::SessionReport;

const JSON: &str = "application/x-amz-json-1.1";
const DEFAULT_DOCUMENT: &str = "SSM-SessionManagerRunShell";

/// An AWS-shaped JSON error.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    /// The error code, such as `InvalidParameters`.
    pub(crate) kind: &'static str,
    /// What is wrong.
    pub(crate) message: String,
}

impl ApiError {
    pub(crate) fn new(kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind,
            message: message.into(),
        }
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(JSON),
    );
    if let Ok(v) = http::HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()) {
        h.insert("x-amzn-requestid", v);
    }
    r
}

fn error_response(e: &ApiError) -> Response<Full<Bytes>> {
    let mut r = json_response(e.status, &json!({"__type": e.kind, "message": e.message}));
    if let Ok(v) = http::HeaderValue::from_str(e.kind) {
        r.headers_mut().insert("x-amzn-errortype", v);
    }
    r
}

fn epoch_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Handles one HTTP request.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(error_response(&ApiError::new(
                "SerializationException",
                e.to_string(),
            )));
        }
    };
    let target = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let Some(op) = target.strip_prefix("AmazonSSM.") else {
        return Ok(error_response(&ApiError::new(
            "UnknownOperationException",
            format!("unsupported X-Amz-Target {target:?}"),
        )));
    };
    let input: Value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return Ok(error_response(&ApiError::new(
                    "SerializationException",
                    e.to_string(),
                )));
            }
        }
    };
    let local = matches!(
        op,
        "StartSession"
            | "ResumeSession"
            | "TerminateSession"
            | "DescribeSessions"
            | "DescribeInstanceInformation"
    );
    if !local {
        return Ok(forward(&shared, &parts.headers, body).await);
    }
    shared.api_requests.fetch_add(1, Ordering::Relaxed);
    let result = match op {
        "StartSession" => start_session(&shared, &parts.headers, &input).await,
        "ResumeSession" => resume_session(&shared, &input),
        "TerminateSession" => terminate_session(&shared, &input),
        "DescribeSessions" => describe_sessions(&shared, &input),
        _ => describe_instance_information(&shared, &input),
    };
    Ok(match result {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => error_response(&e),
    })
}

// === Forwarding ===

async fn forward(shared: &Shared, headers: &HeaderMap, body: Bytes) -> Response<Full<Bytes>> {
    let Some(upstream) = &shared.config.upstream else {
        let target = headers
            .get("x-amz-target")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        return error_response(&ApiError::new(
            "UnknownOperationException",
            format!("{target} is not emulated and no upstream is configured"),
        ));
    };
    shared.forwarded_requests.fetch_add(1, Ordering::Relaxed);
    match call_upstream(upstream, headers, body).await {
        Ok(r) => r,
        Err(e) => {
            let mut r = error_response(&ApiError::new(
                "InternalServerError",
                format!("upstream: {e}"),
            ));
            *r.status_mut() = StatusCode::BAD_GATEWAY;
            r
        }
    }
}

async fn call_upstream(
    upstream: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response<Full<Bytes>>, String> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let uri = format!("{}/", upstream.trim_end_matches('/'));
    let mut builder = Request::builder().method(http::Method::POST).uri(&uri);
    for (k, v) in headers {
        if k != http::header::HOST && k != http::header::CONTENT_LENGTH {
            builder = builder.header(k, v);
        }
    }
    let req = builder.body(Full::new(body)).map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    let mut out = Response::new(Full::new(body));
    *out.status_mut() = parts.status;
    for (k, v) in &parts.headers {
        if k != http::header::CONTENT_LENGTH && k != http::header::TRANSFER_ENCODING {
            out.headers_mut().insert(k, v.clone());
        }
    }
    Ok(out)
}

// === StartSession and documents ===

/// Fetches a custom document from the upstream (moto): `None` when it has none of that name
/// (or there is no upstream).
async fn fetch_document(
    shared: &Shared,
    headers: &HeaderMap,
    name: &str,
) -> Result<Option<Value>, ApiError> {
    let Some(upstream) = &shared.config.upstream else {
        return Ok(None);
    };
    let mut h = HeaderMap::new();
    h.insert(
        "x-amz-target",
        http::HeaderValue::from_static("AmazonSSM.GetDocument"),
    );
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(JSON),
    );
    let auth = headers.get(http::header::AUTHORIZATION).cloned().unwrap_or_else(|| {
        http::HeaderValue::from_str(&format!(
            "AWS4-HMAC-SHA256 Credential=AKIAEMULATOR/20260101/{}/ssm/aws4_request, SignedHeaders=host, Signature=0",
            shared.config.region
        ))
        .unwrap_or(http::HeaderValue::from_static("none"))
    });
    h.insert(http::header::AUTHORIZATION, auth);
    let body = Bytes::from(json!({"Name": name}).to_string());
    let resp = call_upstream(upstream, &h, body)
        .await
        .map_err(|e| ApiError::new("InternalServerError", e))?;
    if resp.status() != StatusCode::OK {
        return Ok(None);
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| ApiError::new("InternalServerError", e.to_string()))?
        .to_bytes();
    Ok(serde_json::from_slice(&body).ok())
}

/// What a document StartSession names runs: AWS's Port documents as SSM defines them, the
/// account's shell document (its own `SSM-SessionManagerRunShell` where the upstream has one,
/// else the default: no logging), or a custom document from the upstream.
async fn session_kind(
    shared: &Shared,
    headers: &HeaderMap,
    document: &str,
    params: &Value,
) -> Result<SessionKind, ApiError> {
    if let Some(port) = builtin_document(document, params) {
        return port.map(SessionKind::Port);
    }
    if document.starts_with("AWS-StartInteractiveCommand")
        || document.starts_with("AWS-StartNonInteractiveCommand")
    {
        return Err(ApiError::new(
            "InvalidDocument",
            format!("{document}: command sessions are not emulated; use a shell or Port document"),
        ));
    }
    match fetch_document(shared, headers, document).await? {
        Some(doc) => documents::resolve(document, doc, params),
        None if document == DEFAULT_DOCUMENT => Ok(documents::default_shell()),
        None => Err(ApiError::new(
            "InvalidDocument",
            format!("document {document} does not exist"),
        )),
    }
}

/// The access key ID of a SigV4-signed request (`Credential=<key>/<date>/...`), unverified.
fn caller_access_key(headers: &HeaderMap) -> Option<String> {
    let authorization = headers.get("authorization")?.to_str().ok()?;
    let credential = authorization.split("Credential=").nth(1)?;
    credential.split('/').next().map(str::to_owned)
}

fn new_session_id(principal: &str) -> String {
    let hex = uuid::Uuid::new_v4().simple().to_string();
    format!("{principal}-{}", &hex[..17])
}

fn new_token() -> String {
    format!(
        "AAEAA{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

async fn start_session(
    shared: &Arc<Shared>,
    headers: &HeaderMap,
    input: &Value,
) -> Result<Value, ApiError> {
    let target = input
        .get("Target")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty() && t.len() <= 400)
        .ok_or_else(|| {
            ApiError::new(
                "ValidationException",
                "Target is required (1 to 400 characters)",
            )
        })?;
    let instance = shared.config.instance(target).cloned().ok_or_else(|| {
        ApiError::new(
            "InvalidTarget",
            format!("{target} is not a valid target for this account"),
        )
    })?;
    if instance.ping_status != "Online" {
        return Err(ApiError::new(
            "TargetNotConnected",
            format!("{target} is not connected."),
        ));
    }
    let document = input
        .get("DocumentName")
        .and_then(Value::as_str)
        .unwrap_or(DEFAULT_DOCUMENT);
    let params = input
        .get("Parameters")
        .cloned()
        .unwrap_or_else(|| json!({}));
    // StartSession's Reason: pattern `^.{1,256}$` (Java's `.`: no line terminator).
    let reason = input.get("Reason").and_then(Value::as_str);
    if let Some(reason) = reason
        && !is_valid_reason(reason)
    {
        return Err(ApiError::new(
            "ValidationException",
            "1 validation error detected: Value at 'reason' failed to satisfy constraint: Member must satisfy regular expression pattern: ^.{1,256}$",
        ));
    }
    let kind = session_kind(shared, headers, document, &params).await?;
    let registered =
        caller_access_key(headers).and_then(|key| lock(&shared.owners).get(&key).cloned());
    // AWS names a session after its caller: the user, or the role session.
    let (owner, principal) = match registered {
        Some(owner) => {
            let name = owner.rsplit('/').next().unwrap_or_default().to_owned();
            (owner, name)
        }
        None => (
            format!(
                "arn:aws:iam::{}:user/{}",
                shared.config.account_id, shared.config.session_principal
            ),
            shared.config.session_principal.clone(),
        ),
    };
    let session_id = new_session_id(&principal);
    let token = new_token();
    let info = Arc::new(SessionInfo {
        id: session_id.clone(),
        document_name: document.to_owned(),
        owner,
        reason: input
            .get("Reason")
            .and_then(Value::as_str)
            .map(str::to_owned),
        kind,
        faults: shared.faults_for(&instance),
        instance,
    });
    let mut started = SessionReport::new(&session_id, target, document);
    started.reason = reason.map(str::to_owned);
    let report = Arc::new(Mutex::new(started));
    let (tx, rx) = mpsc::unbounded_channel();
    lock(&shared.sessions).insert(
        session_id.clone(),
        SessionEntry {
            info: info.clone(),
            token: Some(token.clone()),
            started: SystemTime::now(),
            finished: false,
            ended: None,
            agent: Some(tx.clone()),
            report: report.clone(),
            next_connection: 0,
        },
    );
    shared.sessions_started.fetch_add(1, Ordering::Relaxed);
    agent::spawn(shared.clone(), info, report, tx, rx);
    tracing::info!(session = %session_id, %target, %document, "session started");
    Ok(json!({
        "SessionId": session_id,
        "TokenValue": token,
        "StreamUrl": shared.stream_url(&session_id),
    }))
}

fn session_id_of(input: &Value) -> Result<String, ApiError> {
    input
        .get("SessionId")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| ApiError::new("ValidationException", "SessionId is required"))
}

fn resume_session(shared: &Shared, input: &Value) -> Result<Value, ApiError> {
    let sid = session_id_of(input)?;
    let mut sessions = lock(&shared.sessions);
    let entry = sessions.get_mut(&sid).ok_or_else(|| {
        ApiError::new(
            "DoesNotExistException",
            format!("session {sid} does not exist"),
        )
    })?;
    if entry.is_over() {
        // What SMP reads as "session timed out".
        return Ok(json!({"SessionId": sid}));
    }
    let token = new_token();
    entry.token = Some(token.clone());
    drop(sessions);
    Ok(json!({"SessionId": sid, "TokenValue": token, "StreamUrl": shared.stream_url(&sid)}))
}

fn terminate_session(shared: &Shared, input: &Value) -> Result<Value, ApiError> {
    let sid = session_id_of(input)?;
    if let Some(agent) = shared.agent(&sid) {
        let _ = agent.send(AgentInput::Terminate);
    }
    Ok(json!({"SessionId": sid}))
}

fn filter_values(f: &Value, key_field: &str, values_field: &str) -> (String, Vec<String>) {
    let key = f
        .get(key_field)
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let values = f
        .get(values_field)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    (key, values)
}

fn page<T: Clone>(
    items: &[T],
    input: &Value,
    max_default: usize,
) -> Result<(Vec<T>, Option<String>), ApiError> {
    let start = match input.get("NextToken").and_then(Value::as_str) {
        Some(t) => t
            .parse::<usize>()
            .map_err(|_| ApiError::new("InvalidNextToken", "the NextToken is not valid"))?,
        None => 0,
    };
    let max = input
        .get("MaxResults")
        .and_then(Value::as_u64)
        .map_or(max_default, |m| m as usize)
        .max(1);
    let end = (start + max).min(items.len());
    let slice = items
        .get(start.min(items.len())..end)
        .unwrap_or(&[])
        .to_vec();
    let next = (end < items.len()).then(|| end.to_string());
    Ok((slice, next))
}

fn describe_sessions(shared: &Shared, input: &Value) -> Result<Value, ApiError> {
    let state = input.get("State").and_then(Value::as_str).ok_or_else(|| {
        ApiError::new(
            "ValidationException",
            "State is required (Active or History)",
        )
    })?;
    let history = match state {
        "Active" => false,
        "History" => true,
        other => {
            return Err(ApiError::new(
                "ValidationException",
                format!("State {other:?} is not Active or History"),
            ));
        }
    };
    let filters: Vec<(String, Vec<String>)> = input
        .get("Filters")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|f| filter_values(f, "key", "value")).collect())
        .unwrap_or_default();
    let mut rows = Vec::new();
    {
        let sessions = lock(&shared.sessions);
        let mut entries: Vec<&SessionEntry> = sessions.values().collect();
        entries.sort_by_key(|e| std::cmp::Reverse(e.started));
        for e in entries {
            if e.ended.is_some() != history {
                continue;
            }
            let status = lock(&e.report).status;
            let mut keep = true;
            for (key, values) in &filters {
                let v = values.first().cloned().unwrap_or_default();
                keep &= match key.as_str() {
                    "Target" => e.info.instance.id == v,
                    "Owner" => e.info.owner == v,
                    "Status" => status.as_str() == v,
                    "SessionId" => e.info.id == v,
                    "InvokedAfter" => v
                        .parse::<f64>()
                        .map_or(true, |t| epoch_seconds(e.started) >= t),
                    "InvokedBefore" => v
                        .parse::<f64>()
                        .map_or(true, |t| epoch_seconds(e.started) <= t),
                    other => {
                        return Err(ApiError::new(
                            "InvalidFilterKey",
                            format!("filter key {other:?} is not supported"),
                        ));
                    }
                };
            }
            if !keep {
                continue;
            }
            let mut row = json!({
                "SessionId": e.info.id,
                "Target": e.info.instance.id,
                "Status": status.as_str(),
                "StartDate": epoch_seconds(e.started),
                "DocumentName": e.info.document_name,
                "Owner": e.info.owner,
                "MaxSessionDuration": "1200",
                "Details": lock(&e.report).close_reason.clone().unwrap_or_default(),
            });
            if let Some(end) = e.ended {
                row["EndDate"] = json!(epoch_seconds(end));
            }
            if let Some(r) = &e.info.reason {
                row["Reason"] = json!(r);
            }
            rows.push(row);
        }
    }
    let (rows, next) = page(&rows, input, 200)?;
    let mut out = json!({"Sessions": rows});
    if let Some(n) = next {
        out["NextToken"] = json!(n);
    }
    Ok(out)
}

fn describe_instance_information(shared: &Shared, input: &Value) -> Result<Value, ApiError> {
    let mut filters: Vec<(String, Vec<String>)> = Vec::new();
    if let Some(a) = input
        .get("InstanceInformationFilterList")
        .and_then(Value::as_array)
    {
        filters.extend(a.iter().map(|f| filter_values(f, "key", "valueSet")));
    }
    if let Some(a) = input.get("Filters").and_then(Value::as_array) {
        filters.extend(a.iter().map(|f| filter_values(f, "Key", "Values")));
    }
    if let Some(m) = input.get("MaxResults").and_then(Value::as_u64)
        && !(5..=50).contains(&m)
    {
        return Err(ApiError::new(
            "ValidationException",
            "MaxResults must be between 5 and 50",
        ));
    }
    let mut rows = Vec::new();
    for i in &shared.config.instances {
        let mut keep = true;
        for (key, values) in &filters {
            let any = |v: &str| values.iter().any(|x| x == v);
            keep &= match key.as_str() {
                "InstanceIds" => any(&i.id),
                "AgentVersion" => any(&i.agent_version),
                "PingStatus" => any(&i.ping_status),
                "PlatformTypes" => any(&i.platform_type),
                "ResourceType" => any(if i.id.starts_with("mi-") {
                    "ManagedInstance"
                } else {
                    "EC2Instance"
                }),
                "tag-key" => values.iter().any(|k| i.tags.contains_key(k)),
                k if k.starts_with("tag:") => i.tags.get(&k[4..]).is_some_and(|v| any(v)),
                other => {
                    return Err(ApiError::new(
                        "InvalidInstanceInformationFilterValue",
                        format!("filter key {other:?} is not supported"),
                    ));
                }
            };
        }
        if keep {
            rows.push(json!({
                "InstanceId": i.id,
                "PingStatus": i.ping_status,
                "LastPingDateTime": epoch_seconds(SystemTime::now()),
                "AgentVersion": i.agent_version,
                "IsLatestVersion": false,
                "PlatformType": i.platform_type,
                "PlatformName": if i.platform_type == "Linux" { "Amazon Linux" } else { "Emulated" },
                "ResourceType": if i.id.starts_with("mi-") { "ManagedInstance" } else { "EC2Instance" },
                "IPAddress": "127.0.0.1",
                "ComputerName": i.tags.get("Name").cloned().unwrap_or_else(|| i.id.clone()),
                "AssociationStatus": "Success",
            }));
        }
    }
    let (rows, next) = page(&rows, input, 50)?;
    let mut out = json!({"InstanceInformationList": rows});
    if let Some(n) = next {
        out["NextToken"] = json!(n);
    }
    Ok(out)
}

/// Whether `reason` matches StartSession's `^.{1,256}$`: 1 to 256 characters, none of them a
/// line terminator.
fn is_valid_reason(reason: &str) -> bool {
    let terminators = ['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}'];
    (1..=256).contains(&reason.chars().count()) && !reason.contains(terminators)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_have_the_aws_shape() {
        let id = new_session_id("fleet-access");
        let (p, hex) = id.rsplit_once('-').expect("dash");
        assert_eq!(p, "fleet-access");
        assert_eq!(hex.len(), 17);
        assert!(hex.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn a_reason_is_one_line_of_at_most_256_characters() {
        assert!(is_valid_reason("fleet-access bridge for=ci/ansible-0"));
        assert!(is_valid_reason(&"é".repeat(256)), "characters, not bytes");
        for bad in [
            String::new(),
            "x".repeat(257),
            "two\nlines".into(),
            "cr\r".into(),
        ] {
            assert!(!is_valid_reason(&bad), "{bad:?}");
        }
    }
}
