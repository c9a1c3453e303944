//! The independent IAM evaluator: `tests/iam-evaluator/evaluate.cjs`, which runs
//! `@cloud-copilot/iam-simulate` (pinned by `tests/iam-evaluator/package-lock.json`, installed
//! by `tests/env/setup.sh`) in a Node process of its own. fleet-access did not write it, so its
//! decisions judge what the operator renders; it is a test tool, never linked into the product.

use std::{collections::BTreeMap, io::Write, path::PathBuf, process::Stdio};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    error::{FixtureError, FixtureResult},
    locations::Locations,
};

/// One request to evaluate against identity policies.
#[derive(Clone, Debug, Serialize)]
pub struct IamRequest {
    /// Names the request in failures.
    pub id: String,
    /// The calling principal's ARN.
    pub principal: String,
    /// Such as `ssm:StartSession`.
    pub action: String,
    /// The resource ARN.
    pub resource: String,
    /// The account that owns the resource.
    #[serde(rename = "accountId")]
    pub account: String,
    /// Request context keys and their values (`aws:CurrentTime`, `ssm:resourceTag/…`).
    pub context: BTreeMap<String, Value>,
    /// The identity policies of the principal, by name.
    #[serde(rename = "identityPolicies")]
    pub identity_policies: Vec<NamedPolicy>,
    /// False for AWS-owned documents only: their ARNs have no account, which the simulator's
    /// resource validation does not accept (the evaluation is the same).
    pub validate: bool,
}

/// A policy document with a name.
#[derive(Clone, Debug, Serialize)]
pub struct NamedPolicy {
    /// Its name.
    pub name: String,
    /// The policy JSON.
    pub policy: Value,
}

impl IamRequest {
    /// A request by `principal` for `action` on `resource` in `account`, with no policy yet.
    pub fn new(
        id: impl Into<String>,
        principal: &str,
        action: &str,
        resource: &str,
        account: &str,
    ) -> Self {
        Self {
            id: id.into(),
            principal: principal.into(),
            action: action.into(),
            resource: resource.into(),
            account: account.into(),
            context: BTreeMap::new(),
            identity_policies: Vec::new(),
            validate: true,
        }
    }

    /// Adds a context key.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.context.insert(key.into(), value.into());
        self
    }

    /// Adds an identity policy.
    pub fn policy(mut self, name: &str, policy: &Value) -> Self {
        self.identity_policies.push(NamedPolicy {
            name: name.into(),
            policy: policy.clone(),
        });
        self
    }

    /// Skips the simulator's input validation (see [`IamRequest::validate`]).
    pub fn unvalidated(mut self) -> Self {
        self.validate = false;
        self
    }
}

/// IAM's decision.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum Decision {
    /// An Allow applies and no Deny does.
    Allowed,
    /// A Deny applies.
    ExplicitlyDenied,
    /// No statement allows.
    ImplicitlyDenied,
}

/// The evaluator's answer to one request.
#[derive(Clone, Debug, Deserialize)]
pub struct Evaluation {
    /// The request's id.
    pub id: String,
    /// The decision, unless the simulator refused the input.
    pub decision: Option<Decision>,
    /// Context keys the simulator ignored as not applying to the action and resource: a key
    /// the policies rely on but IAM would never set.
    #[serde(rename = "ignoredContextKeys", default)]
    pub ignored_context_keys: Vec<String>,
    /// Why the simulator refused the input (an invalid policy, action, ARN or context key).
    pub error: Option<String>,
}

/// The `node_modules` folder holding the evaluator's packages.
pub fn node_modules() -> FixtureResult<PathBuf> {
    let path = Locations::get()?.iam_evaluator_node_modules.clone();
    if path.join("@cloud-copilot/iam-simulate").is_dir() {
        Ok(path)
    } else {
        Err(FixtureError::MissingProgram {
            program: "@cloud-copilot/iam-simulate".into(),
            path,
            hint: "run tests/env/setup.sh".into(),
        })
    }
}

/// Evaluates every request in one Node process; the answers are in the requests' order.
pub fn evaluate(requests: &[IamRequest]) -> FixtureResult<Vec<Evaluation>> {
    let script = crate::workspace_root().join("tests/iam-evaluator/evaluate.cjs");
    let mut child = std::process::Command::new("node")
        .arg(&script)
        .env("NODE_PATH", node_modules()?)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(FixtureError::io(
            "running node (install Node.js: tests/env/setup.sh)",
        ))?;
    let input = serde_json::to_vec(requests)?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| FixtureError::UnexpectedAnswer {
            component: "node".into(),
            detail: "no stdin".into(),
        })?;
    // Written from a thread: the evaluator may answer before it has read everything.
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let output = child
        .wait_with_output()
        .map_err(FixtureError::io("waiting for the IAM evaluator"))?;
    writer
        .join()
        .map_err(|_| FixtureError::UnexpectedAnswer {
            component: "IAM evaluator".into(),
            detail: "the writer thread panicked".into(),
        })?
        .map_err(FixtureError::io("writing to the IAM evaluator"))?;
    if !output.status.success() {
        return Err(FixtureError::CommandFailed {
            command: format!("node {}", script.display()),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    let evaluations: Vec<Evaluation> = serde_json::from_slice(&output.stdout)?;
    if evaluations.len() != requests.len() {
        return Err(FixtureError::UnexpectedAnswer {
            component: "IAM evaluator".into(),
            detail: format!(
                "{} answers to {} requests",
                evaluations.len(),
                requests.len()
            ),
        });
    }
    Ok(evaluations)
}
