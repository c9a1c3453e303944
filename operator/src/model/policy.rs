//! IAM policy documents: the model the operator renders, IAM's size accounting, and comparison by
//! meaning.
//!
//! Rendering is deterministic (statement order as built, keys in IAM's customary order, one-element
//! lists as scalars) so golden tests can pin it. AWS hands documents back rewritten (keys
//! reordered, one-element arrays collapsed to scalars, `Version` added, URL-encoded by
//! `GetPolicyVersion`), so drift detection never compares text: [`same_meaning`] compares the
//! [`canonical`] forms instead.

use std::collections::BTreeMap;

use serde::{Serialize, Serializer, ser::SerializeMap};
use serde_json::Value;

/// The policy language version every rendered document declares (the one with policy variables).
pub const POLICY_VERSION: &str = "2012-10-17";

/// IAM's limit on a customer managed policy: 6,144 characters, whitespace not counted.
pub const MANAGED_POLICY_MAX_CHARS: usize = 6_144;

/// Allow or Deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Effect {
    /// The statement grants.
    Allow,
    /// The statement denies, whatever else allows.
    Deny,
}

/// A condition block: operator → key → values.
pub type Conditions = BTreeMap<String, BTreeMap<String, Vec<String>>>;

/// One statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statement {
    /// Unique within its document.
    pub sid: String,
    /// Allow or Deny.
    pub effect: Effect,
    /// Actions such as `ssm:StartSession`.
    pub actions: Vec<String>,
    /// Resource ARNs (patterns allowed).
    pub resources: Vec<String>,
    /// Conditions, all of which must hold.
    pub conditions: Conditions,
}

impl Statement {
    /// A statement without conditions.
    pub fn new(sid: &str, effect: Effect, actions: &[&str], resources: Vec<String>) -> Self {
        Self {
            sid: sid.to_owned(),
            effect,
            actions: actions.iter().map(|a| (*a).to_owned()).collect(),
            resources,
            conditions: Conditions::new(),
        }
    }

    /// Adds `operator: {key: values}` to the conditions.
    pub fn with_condition(mut self, operator: &str, key: &str, values: Vec<String>) -> Self {
        self.conditions
            .entry(operator.to_owned())
            .or_default()
            .insert(key.to_owned(), values);
        self
    }

    /// Adds every condition of `other`.
    pub fn with_conditions(mut self, other: &Conditions) -> Self {
        for (operator, keys) in other {
            let entry = self.conditions.entry(operator.clone()).or_default();
            entry.extend(keys.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        self
    }
}

/// A whole policy document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyDocument {
    /// The statements, in rendering order.
    pub statements: Vec<Statement>,
}

impl PolicyDocument {
    /// The document as compact JSON, as sent to IAM.
    pub fn to_json(&self) -> String {
        // Serializing strings and maps cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The document as indented JSON, for people.
    pub fn to_pretty_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The size IAM charges against its quota: characters, whitespace not counted.
    pub fn size(&self) -> usize {
        counted_chars(&self.to_json())
    }
}

/// Characters that count against IAM's policy size quota.
pub fn counted_chars(json: &str) -> usize {
    json.chars().filter(|c| !c.is_whitespace()).count()
}

/// One string, or a list when there are several: IAM's own shorthand.
struct OneOrMany<'a>(&'a [String]);

impl Serialize for OneOrMany<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            [one] => serializer.serialize_str(one),
            many => many.serialize(serializer),
        }
    }
}

impl Serialize for Statement {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("Sid", &self.sid)?;
        map.serialize_entry("Effect", &self.effect)?;
        map.serialize_entry("Action", &OneOrMany(&self.actions))?;
        map.serialize_entry("Resource", &OneOrMany(&self.resources))?;
        if !self.conditions.is_empty() {
            let conditions: BTreeMap<&String, BTreeMap<&String, OneOrMany<'_>>> = self
                .conditions
                .iter()
                .map(|(op, keys)| (op, keys.iter().map(|(k, v)| (k, OneOrMany(v))).collect()))
                .collect();
            map.serialize_entry("Condition", &conditions)?;
        }
        map.end()
    }
}

impl Serialize for PolicyDocument {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(2))?;
        map.serialize_entry("Version", POLICY_VERSION)?;
        map.serialize_entry("Statement", &self.statements)?;
        map.end()
    }
}

// === comparison by meaning ===

/// A policy text that is not a JSON policy.
#[derive(Debug, thiserror::Error)]
#[error("not a policy document: {0}")]
pub struct NotAPolicy(String);

/// Whether two policy texts mean the same, however AWS rewrote either of them.
pub fn same_meaning(a: &str, b: &str) -> Result<bool, NotAPolicy> {
    Ok(canonical(a)? == canonical(b)?)
}

/// The canonical form of a policy text: URL-decoded if needed, `Version` defaulted, statements as
/// a sorted set, value lists as sorted sets, action names and condition keys lowercased (IAM
/// matches both case-insensitively).
pub fn canonical(text: &str) -> Result<Value, NotAPolicy> {
    let decoded;
    let text = if text.trim_start().starts_with('%') {
        decoded = percent_encoding::percent_decode_str(text)
            .decode_utf8()
            .map_err(|e| NotAPolicy(e.to_string()))?;
        decoded.as_ref()
    } else {
        text
    };
    let value: Value = serde_json::from_str(text).map_err(|e| NotAPolicy(e.to_string()))?;
    let object = value
        .as_object()
        .ok_or_else(|| NotAPolicy("not a JSON object".into()))?;
    let version = object
        .get("Version")
        .cloned()
        .unwrap_or_else(|| Value::from(POLICY_VERSION));
    let mut statements: Vec<Value> = match object.get("Statement") {
        Some(Value::Array(items)) => items
            .iter()
            .map(canonical_statement)
            .collect::<Result<_, _>>()?,
        Some(one @ Value::Object(_)) => vec![canonical_statement(one)?],
        _ => return Err(NotAPolicy("no Statement".into())),
    };
    statements.sort_by_key(ToString::to_string);
    statements.dedup();
    Ok(serde_json::json!({"Version": version, "Statement": statements}))
}

fn canonical_statement(statement: &Value) -> Result<Value, NotAPolicy> {
    let fields = statement
        .as_object()
        .ok_or_else(|| NotAPolicy("a statement is not an object".into()))?;
    let mut out = serde_json::Map::new();
    for (key, value) in fields {
        let canonical = match key.as_str() {
            "Action" | "NotAction" => string_set(value, true),
            "Resource" | "NotResource" => string_set(value, false),
            "Principal" | "NotPrincipal" => match value {
                Value::Object(kinds) => Value::Object(
                    kinds
                        .iter()
                        .map(|(k, v)| (k.clone(), string_set(v, false)))
                        .collect(),
                ),
                other => string_set(other, false),
            },
            "Condition" => {
                let operators = value
                    .as_object()
                    .ok_or_else(|| NotAPolicy("Condition is not an object".into()))?;
                let mut out = serde_json::Map::new();
                for (operator, keys) in operators {
                    let keys = keys
                        .as_object()
                        .ok_or_else(|| NotAPolicy(format!("{operator} is not an object")))?;
                    let keys = keys
                        .iter()
                        .map(|(k, v)| (k.to_lowercase(), string_set(v, false)))
                        .collect();
                    out.insert(operator.clone(), Value::Object(keys));
                }
                Value::Object(out)
            }
            _ => value.clone(),
        };
        out.insert(key.clone(), canonical);
    }
    Ok(Value::Object(out))
}

/// A scalar or a list of scalars as a sorted, deduplicated list of strings.
fn string_set(value: &Value, lowercase: bool) -> Value {
    let as_string = |v: &Value| {
        let s = match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        if lowercase { s.to_lowercase() } else { s }
    };
    let mut items: Vec<String> = match value {
        Value::Array(items) => items.iter().map(as_string).collect(),
        one => vec![as_string(one)],
    };
    items.sort();
    items.dedup();
    Value::from(items)
}

#[cfg(test)]
mod tests;
