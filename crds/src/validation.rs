//! Offline validation of fleet-access objects, the way the API server would validate them.
//!
//! `plan` must reject what `kubectl apply` would reject, and what the operator refuses before
//! writing anything, with messages that name the field. So validation runs against the generated
//! CRD schema itself, in four passes:
//!
//! ```text
//! YAML ──parse──▶ JSON value ──structure──▶ (types, unknown fields, required, bounds)
//!                                ──CEL──────▶ (the x-kubernetes-validations rules, via kube-cel)
//!                                ──serde────▶ typed SessionAccess
//!                                ──Checked──▶ (what the API server refuses only in the objects
//!                                              the operator writes: the bridge's client peers)
//! ```
//!
//! Each pass reports every problem it finds; the next pass runs only on a structurally sound
//! object. No I/O: the caller reads the file.

use std::fmt;

use kube::{CustomResourceExt, core::cel::Validator};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{SessionAccess, SessionAccessPolicy, SessionPreferences};

/// One problem with one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Where, as a JSON path such as `spec.targets.instanceIds[0]`.
    pub path: String,
    /// What is wrong and what to do about it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why an object was rejected.
#[derive(Debug, thiserror::Error)]
pub enum InvalidObject {
    /// The text is not YAML. Fix the syntax at the given position.
    #[error("not valid YAML: {0}")]
    Yaml(#[source] serde_yaml::Error),
    /// The object breaks the schema. Each entry names a field and what to change.
    #[error("{}", display_fields(.0))]
    Fields(Vec<FieldError>),
}

fn display_fields(errors: &[FieldError]) -> String {
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    lines.join("\n")
}

/// Parses one or more `SessionAccess` documents (a YAML stream) and validates each.
pub fn parse_session_accesses(yaml: &str) -> Result<Vec<SessionAccess>, InvalidObject> {
    parse_stream(yaml)
}

/// Parses one or more `SessionPreferences` documents and validates each.
pub fn parse_session_preferences(yaml: &str) -> Result<Vec<SessionPreferences>, InvalidObject> {
    parse_stream(yaml)
}

/// Parses one or more `SessionAccessPolicy` documents (boundaries) and validates each.
pub fn parse_session_access_policies(
    yaml: &str,
) -> Result<Vec<SessionAccessPolicy>, InvalidObject> {
    parse_stream(yaml)
}

/// Parses one or more `SessionAccessApproval` documents and validates each.
pub fn parse_session_access_approvals(
    yaml: &str,
) -> Result<Vec<crate::SessionAccessApproval>, InvalidObject> {
    parse_stream(yaml)
}

/// Validates a JSON value as a `SessionAccess`.
pub fn validate_session_access(value: &Value) -> Result<SessionAccess, InvalidObject> {
    validate::<SessionAccess>(value)
}

fn parse_stream<K>(yaml: &str) -> Result<Vec<K>, InvalidObject>
where
    K: CustomResourceExt + DeserializeOwned + Checked,
{
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let value =
            <Value as serde::Deserialize>::deserialize(document).map_err(InvalidObject::Yaml)?;
        if value.is_null() {
            continue; // an empty document, as between two `---`
        }
        // `kubectl get … -o yaml` prints a List of the objects.
        let documents = match value.get("kind").and_then(Value::as_str) {
            Some("List") => value
                .get("items")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
            _ => vec![value],
        };
        for value in documents {
            match validate::<K>(&value) {
                Ok(object) => objects.push(object),
                Err(InvalidObject::Fields(fields)) => {
                    errors.extend(fields.into_iter().map(|e| FieldError {
                        path: if index == 0 {
                            e.path
                        } else {
                            format!("document {}: {}", index + 1, e.path)
                        },
                        message: e.message,
                    }))
                }
                Err(other) => return Err(other),
            }
        }
    }
    if objects.is_empty() && errors.is_empty() {
        errors.push(FieldError {
            path: "(file)".into(),
            message: format!("contains no {} object", K::api_resource().kind),
        });
    }
    if errors.is_empty() {
        Ok(objects)
    } else {
        Err(InvalidObject::Fields(errors))
    }
}

/// What a kind's objects must meet beyond their schema and its CEL rules: what the API server
/// refuses only later, when the operator writes what the object asks for.
pub trait Checked {
    /// Every such problem, each naming its field.
    fn problems(&self) -> Vec<FieldError> {
        Vec::new()
    }
}

impl Checked for SessionAccess {
    /// The bridge's clients become a NetworkPolicy's peers ([`crate::peers`]).
    fn problems(&self) -> Vec<FieldError> {
        (self.spec.bridge.as_ref())
            .map(|bridge| crate::peers::client_problems(&bridge.clients))
            .unwrap_or_default()
    }
}

impl Checked for SessionPreferences {}
impl Checked for SessionAccessPolicy {}
impl Checked for crate::SessionAccessApproval {}

/// Validates a JSON value as the custom resource `K`: identity, structure, CEL rules, types,
/// and what [`Checked`] adds.
pub fn validate<K>(value: &Value) -> Result<K, InvalidObject>
where
    K: CustomResourceExt + DeserializeOwned + Checked,
{
    let crd = K::crd();
    let resource = K::api_resource();
    let mut errors = check_identity(value, &resource.api_version, &resource.kind);
    let schema = crd
        .spec
        .versions
        .first()
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .and_then(|s| serde_json::to_value(s).ok())
        .unwrap_or(Value::Null);
    if let Some(spec) = value.get("spec") {
        let spec_schema = &schema["properties"]["spec"];
        check_structure(spec, spec_schema, "spec", &mut errors);
    } else {
        errors.push(FieldError {
            path: "spec".into(),
            message: "is required".into(),
        });
    }
    if !errors.is_empty() {
        return Err(InvalidObject::Fields(errors));
    }
    if let Err(cel) = Validator::new().validate(&schema, value, None) {
        let errors = cel
            .into_vec()
            .into_iter()
            .map(|e| FieldError {
                path: apiserver_path(&schema, &e.field_path),
                message: e.message,
            })
            .collect();
        return Err(InvalidObject::Fields(errors));
    }
    let object: K = serde_path_to_error::deserialize(value).map_err(|e| {
        InvalidObject::Fields(vec![FieldError {
            path: e.path().to_string(),
            message: e.inner().to_string(),
        }])
    })?;
    match object.problems() {
        problems if problems.is_empty() => Ok(object),
        problems => Err(InvalidObject::Fields(problems)),
    }
}

fn check_identity(value: &Value, api_version: &str, kind: &str) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let expect = |field: &str, want: &str, errors: &mut Vec<FieldError>| {
        if value.get(field).and_then(Value::as_str) != Some(want) {
            errors.push(FieldError {
                path: field.into(),
                message: format!("must be {want}"),
            });
        }
    };
    expect("apiVersion", api_version, &mut errors);
    expect("kind", kind, &mut errors);
    match value.pointer("/metadata/name").and_then(Value::as_str) {
        Some(name) if is_dns_subdomain(name) => {}
        Some(_) => errors.push(FieldError {
            path: "metadata.name".into(),
            message: "must be a DNS subdomain: lowercase letters, digits, '-' and '.', at most 253 characters, starting and ending with a letter or digit".into(),
        }),
        None => errors.push(FieldError { path: "metadata.name".into(), message: "is required".into() }),
    }
    errors
}

/// A DNS subdomain (RFC 1123): lowercase letters, digits, '-' and '.', at most 253 characters,
/// starting and ending with a letter or digit.
pub(crate) fn is_dns_subdomain(name: &str) -> bool {
    let valid_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    !name.is_empty()
        && name.len() <= 253
        && name.chars().all(valid_char)
        && alnum(name.chars().next())
        && alnum(name.chars().last())
}

/// Walks `value` against a structural OpenAPI schema, collecting what the API server would
/// reject before it runs CEL: wrong types, unknown fields, missing required fields, bounds.
fn check_structure(value: &Value, schema: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let mut fail = |message: String| {
        errors.push(FieldError {
            path: path.to_owned(),
            message,
        })
    };
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return;
    }
    if value.is_null() {
        if schema.get("nullable") != Some(&Value::Bool(true)) {
            fail("must not be null".into());
        }
        return;
    }
    if schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        if !(value.is_i64() || value.is_u64() || value.is_string()) {
            fail("must be an integer or a string".into());
        }
        return;
    }
    let Some(expected) = schema.get("type").and_then(Value::as_str) else {
        return;
    };
    let type_ok = match expected {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        _ => true,
    };
    if !type_ok {
        fail(format!(
            "must be {} {expected}, not {}",
            article(expected),
            describe(value)
        ));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let names: Vec<String> = allowed.iter().map(ToString::to_string).collect();
        fail(format!("must be one of {}, not {value}", names.join(", ")));
    }
    let bound = |key: &str| schema.get(key).and_then(Value::as_f64);
    match value {
        Value::String(s) => {
            let len = s.chars().count() as f64;
            if let Some(max) = bound("maxLength").filter(|max| len > *max) {
                fail(format!("must be at most {max} characters long"));
            }
            if let Some(min) = bound("minLength").filter(|min| len < *min) {
                fail(format!("must be at least {min} characters long"));
            }
        }
        Value::Number(n) => {
            let n = n.as_f64().unwrap_or_default();
            if let Some(max) = bound("maximum").filter(|max| n > *max) {
                fail(format!("must be at most {max}"));
            }
            if let Some(min) = bound("minimum").filter(|min| n < *min) {
                fail(format!("must be at least {min}"));
            }
        }
        Value::Array(items) => {
            let len = items.len() as f64;
            if let Some(max) = bound("maxItems").filter(|max| len > *max) {
                fail(format!("must have at most {max} items"));
            }
            if let Some(min) = bound("minItems").filter(|min| len < *min) {
                fail(format!("must have at least {min} items"));
            }
            if schema.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("set") {
                for (i, item) in items.iter().enumerate() {
                    if items[..i].contains(item) {
                        errors.push(FieldError {
                            path: format!("{path}[{i}]"),
                            message: format!("Duplicate value: {item}"),
                        });
                    }
                }
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check_structure(item, item_schema, &format!("{path}[{i}]"), errors);
                }
            }
        }
        Value::Object(fields) => check_object(fields, schema, path, errors),
        Value::Bool(_) | Value::Null => {}
    }
}

fn check_object(
    fields: &serde_json::Map<String, Value>,
    schema: &Value,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64)
        && fields.len() as u64 > max
    {
        errors.push(FieldError {
            path: path.into(),
            message: format!("must have at most {max} entries"),
        });
    }
    for required in schema
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(name) = required.as_str().filter(|name| !fields.contains_key(*name)) {
            errors.push(FieldError {
                path: format!("{path}.{name}"),
                message: "is required".into(),
            });
        }
    }
    let properties = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties").filter(|a| a.is_object());
    for (name, field) in fields {
        let field_path = format!("{path}.{name}");
        match (properties.and_then(|p| p.get(name)), additional) {
            (Some(field_schema), _) => check_structure(field, field_schema, &field_path, errors),
            (None, Some(value_schema)) => {
                check_structure(field, value_schema, &format!("{path}[{name}]"), errors)
            }
            (None, None) => {
                let known: Vec<&str> = properties
                    .into_iter()
                    .flat_map(|p| p.keys())
                    .map(String::as_str)
                    .collect();
                errors.push(FieldError {
                    path: field_path,
                    message: if known.is_empty() {
                        "is not a known field".into()
                    } else {
                        format!(
                            "is not a known field (known fields here: {})",
                            known.join(", ")
                        )
                    },
                });
            }
        }
    }
}

/// Writes a dotted path the way the API server does: map entries as `tags[key]`, fields as `.name`.
fn apiserver_path(root: &Value, dotted: &str) -> String {
    let mut schema = root;
    let mut out = String::new();
    for segment in dotted.split('.') {
        // A segment may carry list indexes, as in `instanceIds[0]`.
        let (name, indexes) = segment.split_at(segment.find('[').unwrap_or(segment.len()));
        let field = schema.get("properties").and_then(|p| p.get(name));
        let values = schema.get("additionalProperties").filter(|v| v.is_object());
        match (field, values) {
            (None, Some(values)) => {
                out.push_str(&format!("[{name}]"));
                schema = values;
            }
            (field, _) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(name);
                schema = field.unwrap_or(&Value::Null);
            }
        }
        for _ in indexes.matches('[') {
            schema = schema.get("items").unwrap_or(&Value::Null);
        }
        out.push_str(indexes);
    }
    out
}

fn article(type_name: &str) -> &'static str {
    if type_name.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
