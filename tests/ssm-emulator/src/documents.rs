//! What a session document means to StartSession, as SSM decides it before any agent is
//! involved: AWS's Port documents (`AWS-StartSSHSession`, `AWS-StartPortForwardingSession`,
//! `AWS-StartPortForwardingSessionToRemoteHost`) and custom documents (fetched from the upstream
//! by `api`): Port documents, their parameters against their definitions and the properties
//! handed to the agent; Standard_Stream (shell) documents and their inputs. Pure: no I/O.

use std::collections::HashMap;

use serde_json::Value;

use crate::api::ApiError;
use crate::registry::{PortProperties, SessionKind};
use crate::shell::ShellInputs;

/// The first value of parameter `name`: SSM takes each as a list.
fn first_param(params: &Value, name: &str) -> Option<String> {
    match params.get(name)? {
        Value::Array(a) => a.first().and_then(Value::as_str).map(str::to_owned),
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// A parameter value against its definition in a document, as SSM checks it at StartSession:
/// `allowedPattern` and `allowedValues`. The whole value must match the pattern: a pattern
/// without anchors is then no more lenient here than anywhere.
fn check_parameter(
    document: &str,
    parameter: &str,
    definition: &Value,
    value: &str,
) -> Result<(), ApiError> {
    if let Some(pattern) = definition.get("allowedPattern").and_then(Value::as_str) {
        let regex = regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
            ApiError::new(
                "InvalidDocument",
                format!("document {document}: parameter {parameter}'s allowedPattern is not a regular expression: {e}"),
            )
        })?;
        if !regex.is_match(value) {
            return Err(ApiError::new(
                "InvalidParameters",
                format!(
                    "parameter {parameter} value {value:?} does not match the allowedPattern {pattern} of document {document}"
                ),
            ));
        }
    }
    if let Some(allowed) = definition.get("allowedValues").and_then(Value::as_array)
        && !allowed.iter().any(|a| a.as_str() == Some(value))
    {
        return Err(ApiError::new(
            "InvalidParameters",
            format!(
                "parameter {parameter} value {value:?} is not among the allowedValues of document {document}"
            ),
        ));
    }
    Ok(())
}

fn parse_port(name: &str, value: &str) -> Result<u16, ApiError> {
    value.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
        ApiError::new(
            "ValidationException",
            format!("{name} {value:?} is not a port number"),
        )
    })
}

/// Resolves a built-in Port document's properties.
pub(crate) fn builtin_document(
    name: &str,
    params: &Value,
) -> Option<Result<PortProperties, ApiError>> {
    let (allowed, default_port, lpf, needs_host): (&[&str], &str, bool, bool) = match name {
        "AWS-StartSSHSession" => (&["portNumber"], "22", false, false),
        "AWS-StartPortForwardingSession" => (&["portNumber", "localPortNumber"], "80", true, false),
        "AWS-StartPortForwardingSessionToRemoteHost" => {
            (&["host", "portNumber", "localPortNumber"], "80", true, true)
        }
        _ => return None,
    };
    Some((|| {
        if let Some(obj) = params.as_object() {
            for k in obj.keys() {
                if !allowed.contains(&k.as_str()) {
                    return Err(ApiError::new(
                        "InvalidParameters",
                        format!("parameter {k} is not defined by document {name}"),
                    ));
                }
            }
        }
        let port_text =
            first_param(params, "portNumber").unwrap_or_else(|| default_port.to_owned());
        let port = parse_port("portNumber", &port_text)?;
        let mut json = serde_json::Map::new();
        json.insert("portNumber".into(), Value::String(port_text));
        let mut host = None;
        if lpf {
            let local = first_param(params, "localPortNumber").unwrap_or_else(|| "0".to_owned());
            if local != "0" {
                parse_port("localPortNumber", &local)?;
            }
            json.insert("localPortNumber".into(), Value::String(local));
            json.insert("type".into(), Value::String("LocalPortForwarding".into()));
        }
        if needs_host {
            let h = first_param(params, "host")
                .ok_or_else(|| ApiError::new("InvalidParameters", "parameter host is required"))?;
            json.insert("host".into(), Value::String(h.clone()));
            host = Some(h);
        }
        Ok(PortProperties {
            json,
            port,
            host,
            local_port_forwarding: lpf,
        })
    })())
}

fn substitute(template: &str, values: &HashMap<String, String>) -> String {
    let mut out = template.to_owned();
    for (k, v) in values {
        for pattern in [format!("{{{{ {k} }}}}"), format!("{{{{{k}}}}}")] {
            out = out.replace(&pattern, v);
        }
    }
    out
}

/// Resolves a custom document, as GetDocument returned it (`Content`, `DocumentType`), for a
/// StartSession with `params`: a Session document of type Port or Standard_Stream, every given
/// parameter defined, every defined one given or defaulted and satisfying its definition; a
/// shell document's inputs as the agent reads them.
pub(crate) fn resolve(name: &str, doc: Value, params: &Value) -> Result<SessionKind, ApiError> {
    let invalid = || ApiError::new("InvalidDocument", format!("document {name} does not exist"));
    let content = doc
        .get("Content")
        .and_then(Value::as_str)
        .ok_or_else(invalid)?;
    let content: Value = serde_yaml::from_str(content).map_err(|_| invalid())?;
    if let Some(kind) = doc.get("DocumentType").and_then(Value::as_str)
        && kind != "Session"
    {
        return Err(ApiError::new(
            "InvalidDocument",
            format!("document {name} is a {kind} document; StartSession needs a Session document"),
        ));
    }
    let session_type = content.get("sessionType").and_then(Value::as_str);
    if !matches!(session_type, Some("Port" | "Standard_Stream")) {
        return Err(ApiError::new(
            "InvalidDocument",
            format!(
                "document {name} has sessionType {}; the emulator runs Port and Standard_Stream sessions",
                session_type.unwrap_or("(none)")
            ),
        ));
    }
    let definitions = content.get("parameters").and_then(Value::as_object);
    if let Some(obj) = params.as_object() {
        for k in obj.keys() {
            if definitions.is_none_or(|d| !d.contains_key(k)) {
                return Err(ApiError::new(
                    "InvalidParameters",
                    format!("parameter {k} is not defined by document {name}"),
                ));
            }
        }
    }
    // Each defined parameter: the value given, else the default; one without either is
    // required; the value must satisfy the definition's allowedPattern and allowedValues.
    let mut values = HashMap::new();
    for (k, definition) in definitions.into_iter().flatten() {
        let default = definition.get("default").map(|d| {
            d.as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| d.to_string())
        });
        let Some(value) = first_param(params, k).or(default) else {
            return Err(ApiError::new(
                "InvalidParameters",
                format!("parameter {k} of document {name} is required: it has no default"),
            ));
        };
        check_parameter(name, k, definition, &value)?;
        values.insert(k.clone(), value);
    }
    if session_type == Some("Standard_Stream") {
        return shell_inputs(name, &content, &values).map(SessionKind::Shell);
    }
    let mut json = serde_json::Map::new();
    if let Some(props) = content.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            let v = match v {
                Value::String(s) => Value::String(substitute(s, &values)),
                other => other.clone(),
            };
            json.insert(k.clone(), v);
        }
    }
    let port_text = json
        .get("portNumber")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let port = parse_port("portNumber", &port_text)?;
    let host = json.get("host").and_then(Value::as_str).map(str::to_owned);
    let lpf = json.get("type").and_then(Value::as_str) == Some("LocalPortForwarding");
    Ok(SessionKind::Port(PortProperties {
        json,
        port,
        host,
        local_port_forwarding: lpf,
    }))
}

/// A shell document's inputs, its parameters substituted into their strings, as the agent
/// reads them; inputs it would refuse make the document invalid.
pub(crate) fn shell_inputs(
    name: &str,
    content: &Value,
    values: &HashMap<String, String>,
) -> Result<ShellInputs, ApiError> {
    let mut content = content.clone();
    if let Some(inputs) = content.get_mut("inputs").and_then(Value::as_object_mut) {
        for v in inputs.values_mut() {
            if let Value::String(s) = v {
                *s = substitute(s, values);
            }
        }
    }
    ShellInputs::from_document(&content)
        .map_err(|e| ApiError::new("InvalidDocument", format!("document {name}: {e}")))
}

/// The account's default shell document when it has none of its own: no logging, no runAs.
pub(crate) fn default_shell() -> SessionKind {
    SessionKind::Shell(ShellInputs::default())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn parameters_must_satisfy_their_definition() {
        let port = json!({"type": "String", "allowedPattern": "^([0-9]|[1-9][0-9]{1,4})$", "default": "0"});
        assert!(check_parameter("doc", "localPortNumber", &port, "5432").is_ok());
        for bad in ["abc", "05432", "123456", "1;2", ""] {
            let error = check_parameter("doc", "localPortNumber", &port, bad).expect_err(bad);
            assert_eq!(error.kind, "InvalidParameters", "{bad}");
            assert!(
                error.message.contains("allowedPattern"),
                "{}",
                error.message
            );
        }
        // Unanchored patterns match the whole value, never a part of it.
        let unanchored = json!({"allowedPattern": "[0-9]+"});
        assert!(check_parameter("doc", "p", &unanchored, "80").is_ok());
        assert!(check_parameter("doc", "p", &unanchored, "80; rm").is_err());
        let choice = json!({"allowedValues": ["a", "b"]});
        assert!(check_parameter("doc", "p", &choice, "a").is_ok());
        assert!(check_parameter("doc", "p", &choice, "c").is_err());
        let broken = json!({"allowedPattern": "(["});
        assert_eq!(
            check_parameter("doc", "p", &broken, "x")
                .expect_err("broken")
                .kind,
            "InvalidDocument"
        );
    }

    #[test]
    fn builtin_documents_resolve_their_properties() {
        let p = builtin_document("AWS-StartSSHSession", &json!({"portNumber": ["2222"]}))
            .expect("builtin")
            .expect("valid");
        assert_eq!(p.port, 2222);
        assert!(!p.local_port_forwarding);
        assert_eq!(Value::Object(p.json), json!({"portNumber": "2222"}));

        let p = builtin_document(
            "AWS-StartPortForwardingSession",
            &json!({"portNumber": ["80"]}),
        )
        .expect("builtin")
        .expect("valid");
        assert!(p.local_port_forwarding);
        assert_eq!(p.json["type"], "LocalPortForwarding");

        let refused = |name: &str, params: Value| {
            let e = builtin_document(name, &params)
                .expect("builtin")
                .expect_err("refused");
            (e.kind, e.message)
        };
        assert_eq!(
            refused("AWS-StartSSHSession", json!({"portNumber": ["x"]})),
            (
                "ValidationException",
                "portNumber \"x\" is not a port number".to_owned()
            )
        );
        assert_eq!(
            refused("AWS-StartSSHSession", json!({"bogus": ["1"]})),
            (
                "InvalidParameters",
                "parameter bogus is not defined by document AWS-StartSSHSession".to_owned()
            )
        );
        assert_eq!(
            refused("AWS-StartPortForwardingSessionToRemoteHost", json!({})),
            ("InvalidParameters", "parameter host is required".to_owned())
        );
        assert!(builtin_document("Custom-Doc", &json!({})).is_none());
    }

    #[test]
    fn templates_are_substituted() {
        let mut v = HashMap::new();
        v.insert("portNumber".to_owned(), "5432".to_owned());
        assert_eq!(substitute("{{ portNumber }}", &v), "5432");
        assert_eq!(substitute("{{portNumber}}", &v), "5432");
    }
}
