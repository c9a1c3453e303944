//! Rendering and comparison by meaning, with property tests: AWS's rewrites keep the meaning,
//! any change to a statement does not.

use proptest::prelude::*;
use serde_json::Value;

use super::*;

fn arb_statement() -> impl Strategy<Value = Statement> {
    (
        "[A-Z][a-zA-Z]{2,8}",
        any::<bool>(),
        prop::collection::vec("ssm:[A-Z][a-zA-Z]{3,12}", 1..4),
        prop::collection::vec("arn:aws:ec2:\\*:\\*:instance/i-[0-9a-f]{8}", 1..5),
        prop::collection::btree_map(
            "ssm:resourceTag/[A-Z][a-z]{2,6}",
            prop::collection::vec("[a-z]{1,6}", 1..3),
            0..3,
        ),
    )
        .prop_map(|(sid, allow, actions, resources, tags)| {
            let effect = if allow { Effect::Allow } else { Effect::Deny };
            let mut statement = Statement {
                sid,
                effect,
                actions,
                resources,
                conditions: Conditions::new(),
            };
            if !tags.is_empty() {
                statement.conditions.insert("StringLike".into(), tags);
            }
            statement
        })
}

fn arb_policy() -> impl Strategy<Value = PolicyDocument> {
    prop::collection::vec(arb_statement(), 1..5).prop_map(|mut statements| {
        for (i, s) in statements.iter_mut().enumerate() {
            s.sid = format!("{}{i}", s.sid); // unique, as rendered documents require
            s.actions.sort();
            s.actions.dedup();
            s.resources.sort();
            s.resources.dedup();
        }
        PolicyDocument { statements }
    })
}

/// Writes JSON with every object's keys in reverse order, as another serializer might.
fn write_reversed(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            out.push('{');
            for (i, (k, v)) in map.iter().rev().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::from(k.as_str()).to_string());
                out.push(':');
                write_reversed(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_reversed(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Turns every scalar string into a one-element array (the opposite of IAM's shorthand).
fn expand_scalars(value: &mut Value, key: Option<&str>) {
    match value {
        Value::Object(map) => map.iter_mut().for_each(|(k, v)| expand_scalars(v, Some(k))),
        Value::Array(items) => items.iter_mut().for_each(|v| expand_scalars(v, None)),
        Value::String(s) if !matches!(key, Some("Version" | "Sid" | "Effect") | None) => {
            *value = Value::from(vec![s.clone()]);
        }
        _ => {}
    }
}

/// The rewrites AWS applies: other key order, scalars as arrays, statements reordered, no
/// Version, URL encoding.
fn aws_rewrite(policy: &PolicyDocument, seed: u8) -> String {
    let mut value: Value = serde_json::from_str(&policy.to_json()).unwrap();
    if seed & 1 != 0 {
        expand_scalars(&mut value, None);
    }
    if seed & 2 != 0 {
        value["Statement"].as_array_mut().unwrap().reverse();
    }
    if seed & 4 != 0 {
        value.as_object_mut().unwrap().remove("Version");
    }
    let mut text = String::new();
    write_reversed(&value, &mut text);
    if seed & 8 != 0 {
        text = percent_encoding::utf8_percent_encode(&text, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    }
    text
}

fn mutate(policy: &mut PolicyDocument, which: usize, how: u8) {
    let n = policy.statements.len();
    let statement = &mut policy.statements[which % n];
    match how % 5 {
        0 => {
            statement.effect = match statement.effect {
                Effect::Allow => Effect::Deny,
                Effect::Deny => Effect::Allow,
            }
        }
        1 => statement.actions.push("ssm:MutatedAction".into()),
        2 => statement.resources[0].push_str("-changed"),
        3 => {
            statement
                .conditions
                .entry("DateLessThan".into())
                .or_default()
                .insert(
                    "aws:CurrentTime".into(),
                    vec!["2030-01-01T00:00:00Z".into()],
                );
        }
        _ => statement.sid.push('X'),
    }
}

proptest! {
    #[test]
    fn aws_rewrites_keep_the_meaning(policy in arb_policy(), seed in 0u8..16) {
        let rewritten = aws_rewrite(&policy, seed);
        prop_assert!(same_meaning(&policy.to_json(), &rewritten).unwrap(), "{rewritten}");
    }

    #[test]
    fn any_changed_statement_changes_the_meaning(policy in arb_policy(), which in 0usize..8, how in 0u8..5, seed in 0u8..16) {
        let mut changed = policy.clone();
        mutate(&mut changed, which, how);
        prop_assert!(!same_meaning(&policy.to_json(), &aws_rewrite(&changed, seed)).unwrap());
    }
}

#[test]
fn renders_iam_shorthand_in_customary_key_order() {
    let policy = PolicyDocument {
        statements: vec![
            Statement::new(
                "One",
                Effect::Allow,
                &["ssm:StartSession"],
                vec!["arn:a".into(), "arn:b".into()],
            )
            .with_condition(
                "BoolIfExists",
                "ssm:SessionDocumentAccessCheck",
                vec!["true".into()],
            ),
        ],
    };
    assert_eq!(
        policy.to_json(),
        r#"{"Version":"2012-10-17","Statement":[{"Sid":"One","Effect":"Allow","Action":"ssm:StartSession","Resource":["arn:a","arn:b"],"Condition":{"BoolIfExists":{"ssm:SessionDocumentAccessCheck":"true"}}}]}"#
    );
}

#[test]
fn size_does_not_count_whitespace() {
    let policy = PolicyDocument {
        statements: vec![Statement::new(
            "S",
            Effect::Deny,
            &["ssm:StartSession"],
            vec!["*".into()],
        )],
    };
    assert_eq!(policy.size(), policy.to_json().len());
    assert_eq!(counted_chars(&policy.to_pretty_json()), policy.size());
}

#[test]
fn action_case_and_condition_key_case_do_not_matter() {
    let a = r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"ssm:StartSession","Resource":"*","Condition":{"StringLike":{"ssm:resourceTag/Env":"dev"}}}}"#;
    let b = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["SSM:startsession"],"Resource":["*"],"Condition":{"StringLike":{"SSM:ResourceTag/env":["dev"]}}}]}"#;
    assert!(same_meaning(a, b).unwrap());
}

#[test]
fn resource_case_matters() {
    let a = r#"{"Statement":{"Effect":"Allow","Action":"ssm:StartSession","Resource":"arn:aws:ssm:*:*:document/A"}}"#;
    let b = r#"{"Statement":{"Effect":"Allow","Action":"ssm:StartSession","Resource":"arn:aws:ssm:*:*:document/a"}}"#;
    assert!(!same_meaning(a, b).unwrap());
}

#[test]
fn garbage_is_an_error_not_a_difference() {
    assert!(same_meaning("{", "{}").is_err());
    assert!(same_meaning(r#"{"Version":"2012-10-17"}"#, r#"{"Version":"2012-10-17"}"#).is_err());
}
