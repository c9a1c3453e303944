//! The manifests of `deploy/` as objects: `kubectl kustomize`, server-side dry-run and apply on
//! the test API server, and the least-privilege RBAC of the base re-targeted to a test's own
//! namespace so that a test can run the operator and the bridge under their real permissions.
//!
//! Objects are plain `serde_json::Value`s: the tests read and rewrite them as YAML people would,
//! without a typed schema.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::Value;

use crate::{ControlPlane, FixtureError, FixtureResult, Locations};

/// The namespace the base's objects are written for.
pub const BASE_NAMESPACE: &str = "fleet-access";

/// The field manager of what these helpers apply.
const FIELD_MANAGER: &str = "fleet-access-deploy-test";

/// `deploy/` of the workspace.
pub fn deploy_dir() -> PathBuf {
    crate::workspace_root().join("deploy")
}

/// `kubectl kustomize <dir>` as objects (no API server involved).
pub fn kustomize(dir: &Path) -> FixtureResult<Vec<Value>> {
    let mut command = Command::new(&Locations::get()?.kubectl);
    command.arg("kustomize").arg(dir);
    documents(&run_with_stdin(command, "")?.0)
}

/// The objects of a multi-document YAML text (empty documents skipped).
pub fn documents(yaml: &str) -> FixtureResult<Vec<Value>> {
    use serde::Deserialize;
    let mut objects = Vec::new();
    for document in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_yaml::Value::deserialize(document)?;
        if !value.is_null() {
            objects.push(serde_json::to_value(value)?);
        }
    }
    Ok(objects)
}

/// Objects as one multi-document YAML text.
pub fn to_yaml(objects: &[Value]) -> FixtureResult<String> {
    let mut text = String::new();
    for object in objects {
        text.push_str("---\n");
        text.push_str(&serde_yaml::to_string(object)?);
    }
    Ok(text)
}

/// An object's `kind`.
pub fn kind(object: &Value) -> &str {
    object["kind"].as_str().unwrap_or_default()
}

/// An object's `metadata.name`.
pub fn name(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or_default()
}

/// Runs `command` with `stdin` as its standard input; returns (stdout, stderr), or both in the
/// error when it fails.
pub fn run_with_stdin(mut command: Command, stdin: &str) -> FixtureResult<(String, String)> {
    let description = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(FixtureError::io(format!("running {description}")))?;
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(stdin.as_bytes())
            .map_err(FixtureError::io(format!("writing to {description}")))?;
    }
    let output = child
        .wait_with_output()
        .map_err(FixtureError::io(format!("waiting for {description}")))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if output.status.success() {
        Ok((stdout, stderr))
    } else {
        Err(FixtureError::CommandFailed {
            command: description,
            status: output.status.to_string(),
            stderr: format!("{stderr}\nstdout:\n{stdout}"),
        })
    }
}

impl ControlPlane {
    /// `kubectl apply --server-side` of `objects` for real; returns kubectl's standard error
    /// (warnings).
    pub fn apply_objects(&self, objects: &[Value]) -> FixtureResult<String> {
        let command = self.server_side_apply(&[])?;
        Ok(run_with_stdin(command, &to_yaml(objects)?)?.1)
    }

    /// `kubectl apply --server-side` of standard input, with `extra` arguments.
    fn server_side_apply(&self, extra: &[&str]) -> FixtureResult<Command> {
        let mut command = self.kubectl()?;
        command.args([
            "apply",
            "--server-side",
            "--force-conflicts",
            &format!("--field-manager={FIELD_MANAGER}"),
        ]);
        command.args(extra).args(["-f", "-"]);
        Ok(command)
    }

    /// Creates the namespaces among `objects` for real (namespaced objects cannot be dry-run
    /// into a namespace that does not exist), then applies every object with server-side
    /// dry-run, so that the API server validates each (schema, RBAC escalation, Pod Security).
    /// Fails unless every object is accepted without a Pod Security warning; returns kubectl's
    /// standard error (other warnings).
    pub fn dry_run(&self, objects: &[Value]) -> FixtureResult<String> {
        let namespaces: Vec<Value> = objects
            .iter()
            .filter(|o| kind(o) == "Namespace")
            .cloned()
            .collect();
        if !namespaces.is_empty() {
            self.apply_objects(&namespaces)?;
        }
        let command = self.server_side_apply(&["--dry-run=server", "-o", "name"])?;
        let (stdout, stderr) = run_with_stdin(command, &to_yaml(objects)?)?;
        let accepted = stdout.lines().filter(|l| !l.trim().is_empty()).count();
        let rejection = if accepted != objects.len() {
            Some(format!("{accepted} of {} objects accepted", objects.len()))
        } else if stderr.contains("would violate PodSecurity") {
            Some("a workload does not meet Pod Security \"restricted\"".to_owned())
        } else {
            None
        };
        match rejection {
            None => Ok(stderr),
            Some(detail) => Err(FixtureError::UnexpectedAnswer {
                component: "kubectl apply --dry-run=server".into(),
                detail: format!("{detail}:\n{stdout}\n{stderr}"),
            }),
        }
    }
}

/// The ServiceAccounts, Roles, ClusterRoles and their bindings of the kustomized base, moved
/// from [`BASE_NAMESPACE`] to `namespace`. Cluster-scoped names get `-<namespace>` appended
/// (and the bindings' references follow), so that tests running side by side each have their
/// own. The rules themselves are not touched: they are what is being tested.
pub fn rbac_in_namespace(base: &[Value], namespace: &str) -> Vec<Value> {
    const KINDS: [&str; 5] = [
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ClusterRole",
        "ClusterRoleBinding",
    ];
    base.iter()
        .filter(|o| KINDS.contains(&kind(o)))
        .cloned()
        .map(|mut object| {
            if kind(&object).starts_with("Cluster") {
                let renamed = format!("{}-{namespace}", name(&object));
                object["metadata"]["name"] = renamed.into();
            } else {
                object["metadata"]["namespace"] = namespace.into();
            }
            if kind(&object) == "ClusterRoleBinding" {
                let role = format!(
                    "{}-{namespace}",
                    object["roleRef"]["name"].as_str().unwrap_or_default()
                );
                object["roleRef"]["name"] = role.into();
            }
            // `get_mut`, not indexing: indexing a JSON object inserts the missing key.
            if let Some(subjects) = object.get_mut("subjects").and_then(Value::as_array_mut) {
                for subject in subjects {
                    if subject["namespace"] == BASE_NAMESPACE {
                        subject["namespace"] = namespace.into();
                    }
                }
            }
            object
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn rbac_moves_to_the_test_namespace_with_its_rules_intact() {
        let base = vec![
            json!({"kind": "Deployment", "metadata": {"name": "op", "namespace": "fleet-access"}}),
            json!({"kind": "ClusterRole", "metadata": {"name": "op"}, "rules": [{"verbs": ["get"]}]}),
            json!({"kind": "ClusterRoleBinding", "metadata": {"name": "op"},
                   "roleRef": {"kind": "ClusterRole", "name": "op"},
                   "subjects": [{"kind": "ServiceAccount", "name": "op", "namespace": "fleet-access"}]}),
            json!({"kind": "RoleBinding", "metadata": {"name": "op", "namespace": "fleet-access"},
                   "roleRef": {"kind": "Role", "name": "op"},
                   "subjects": [{"kind": "ServiceAccount", "name": "op", "namespace": "fleet-access"}]}),
        ];
        let moved = rbac_in_namespace(&base, "t1");
        assert_eq!(moved.len(), 3, "the Deployment is left out");
        assert_eq!(moved[0]["metadata"]["name"], "op-t1");
        assert_eq!(moved[0]["rules"], base[1]["rules"]);
        assert_eq!(moved[0].get("subjects"), None, "nothing is added");
        assert_eq!(moved[1]["roleRef"]["name"], "op-t1");
        assert_eq!(moved[1]["subjects"][0]["namespace"], "t1");
        assert_eq!(moved[2]["metadata"]["namespace"], "t1");
        assert_eq!(moved[2]["roleRef"]["name"], "op", "a Role keeps its name");
    }

    #[test]
    fn documents_skip_empty_ones_and_round_trip() {
        let objects = documents("---\na: 1\n---\n---\nb: 2\n").unwrap();
        assert_eq!(objects.len(), 2);
        assert_eq!(documents(&to_yaml(&objects).unwrap()).unwrap(), objects);
    }
}
