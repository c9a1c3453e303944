//! Golden tests: the plan of every example in deploy/examples is pinned in tests/golden/.
//! Regenerate with `UPDATE_GOLDEN=1 cargo test -p fleet-access-operator --test golden` and review
//! the diff.

use fleet_access_operator::{cli::plan_grants, model::policy, settings::Settings};
use serde_json::Value;

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples");
const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden");

fn plan(example: &str, settings: &Settings) -> String {
    let text =
        std::fs::read_to_string(format!("{EXAMPLES}/{example}.yaml")).expect("example exists");
    let grants =
        fleet_access_crds::validation::parse_session_accesses(&text).expect("example is valid");
    plan_grants(&grants, settings, true).expect("plan renders")
}

fn check(golden: &str, actual: &str) {
    let path = format!("{GOLDEN}/{golden}.json");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).expect("write golden");
    }
    let expected =
        std::fs::read_to_string(&path).unwrap_or_else(|_| format!("missing golden file {path}"));
    assert!(
        expected == actual,
        "{golden}: the plan differs from {path}:\n{actual}"
    );
}

#[test]
fn every_example_matches_its_golden_plan() {
    let mut count = 0;
    for entry in std::fs::read_dir(EXAMPLES).expect("examples") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("readable");
        if !text.contains("kind: SessionAccess\n") {
            continue; // SessionPreferences and SessionAccessPolicy examples
        }
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("utf-8 name");
        check(name, &plan(name, &Settings::default()));
        count += 1;
    }
    assert!(count >= 7, "found {count} SessionAccess examples");
}

#[test]
fn account_and_region_settings_are_pinned_too() {
    let settings = Settings {
        account: Some("123456789012".into()),
        region: Some("us-east-1".into()),
        ..Settings::default()
    };
    check(
        "shell-with-logging.us-east-1",
        &plan("shell-with-logging", &settings),
    );
}

/// The statements of the classic console policies (the manual console set-up this project replaces), which the
/// classic examples must render (plus hardening, which is extra conditions or statements).
fn rendered_statements(plan_json: &str) -> Vec<Value> {
    let plan: Value = serde_json::from_str(plan_json).expect("json");
    plan["identities"][0]["policies"][0]["document"]["Statement"]
        .as_array()
        .expect("statements")
        .clone()
}

fn without(statement: &Value, keys: &[&str]) -> Value {
    let mut s = statement.clone();
    for key in keys {
        s.as_object_mut().expect("object").remove(*key);
    }
    s
}

fn same_statement(a: &Value, b: &Value) -> bool {
    let policy =
        |s: &Value| serde_json::json!({"Version": "2012-10-17", "Statement": [s]}).to_string();
    policy::same_meaning(&policy(a), &policy(b)).expect("policies parse")
}

#[test]
fn classic_allow_renders_the_console_statement() {
    let classic: Value = serde_json::from_str(
        r#"{"Effect":"Allow","Action":"ssm:StartSession","Resource":["arn:aws:ec2:*:*:instance/i-0123456789abcdef0","arn:aws:ssm:*:*:document/AWS-StartSSHSession"]}"#,
    )
    .expect("json");
    let statements = rendered_statements(&plan("classic-allow-ssh", &Settings::default()));
    let start = &statements[0];
    assert!(
        same_statement(&without(start, &["Sid", "Condition"]), &classic),
        "{start}"
    );
    // Hardening: the document must be named explicitly (SessionDocumentAccessCheck).
    assert_eq!(
        start["Condition"]["BoolIfExists"]["ssm:SessionDocumentAccessCheck"],
        "true"
    );
}

#[test]
fn classic_deny_renders_the_console_statement() {
    let classic: Value = serde_json::from_str(
        r#"{"Sid":"VisualEditor1","Effect":"Deny","Action":"ssm:StartSession","Resource":"arn:aws:ssm:*:*:document/AWS-StartSSHSession"}"#,
    )
    .expect("json");
    let statements = rendered_statements(&plan("classic-deny-ssh", &Settings::default()));
    assert_eq!(statements.len(), 1);
    assert!(same_statement(
        &without(&statements[0], &["Sid"]),
        &without(&classic, &["Sid"])
    ));
}
