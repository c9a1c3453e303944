//! Packing statements into as few managed policies as fit IAM's size quota, splitting the
//! resource lists of statements too large for one policy.

use crate::{
    Error, Result,
    model::policy::{MANAGED_POLICY_MAX_CHARS, PolicyDocument, Statement},
};

use super::{ManagedPolicy, PolicyDocumentJson};

/// Packs statements, in order, into as few managed policies as fit IAM's size quota; `name`
/// maps a policy's index suffix (`""`, `"-2"`, …) to its name.
pub fn pack(
    statements: Vec<Statement>,
    name: &dyn Fn(&str) -> String,
) -> Result<Vec<ManagedPolicy>> {
    let fits = |statements: &[Statement]| {
        PolicyDocument {
            statements: statements.to_vec(),
        }
        .size()
            <= MANAGED_POLICY_MAX_CHARS
    };
    let mut pieces = Vec::new();
    for statement in statements {
        if fits(std::slice::from_ref(&statement)) {
            pieces.push(statement);
        } else {
            pieces.extend(split_resources(statement, &fits)?);
        }
    }
    let mut documents: Vec<Vec<Statement>> = Vec::new();
    for piece in pieces {
        match documents.last_mut() {
            Some(current) if fits(&[current.as_slice(), std::slice::from_ref(&piece)].concat()) => {
                current.push(piece)
            }
            _ => documents.push(vec![piece]),
        }
    }
    Ok(documents
        .into_iter()
        .enumerate()
        .map(|(i, statements)| {
            let index = if i == 0 {
                String::new()
            } else {
                format!("-{}", i + 1)
            };
            let document = PolicyDocument { statements };
            ManagedPolicy {
                name: name(&index),
                size: document.size(),
                document: PolicyDocumentJson(document),
            }
        })
        .collect())
}

/// Splits a statement's resources over as many statements as needed, each fitting a policy alone
/// under its final Sid (`<sid>Part<n>`: the Sid counts against the quota too).
fn split_resources(
    statement: Statement,
    fits: &dyn Fn(&[Statement]) -> bool,
) -> Result<Vec<Statement>> {
    let part_sid = |n: usize| format!("{}Part{n}", statement.sid);
    let mut parts: Vec<Statement> = Vec::new();
    let mut current = Statement {
        sid: part_sid(1),
        resources: Vec::new(),
        ..statement.clone()
    };
    for resource in statement.resources.iter().cloned() {
        current.resources.push(resource);
        if !fits(std::slice::from_ref(&current)) {
            let last = current.resources.pop().unwrap_or_default();
            if current.resources.is_empty() {
                return Err(Error::StatementTooLarge { sid: statement.sid });
            }
            parts.push(current.clone());
            current.sid = part_sid(parts.len() + 1);
            current.resources = vec![last];
        }
    }
    parts.push(current);
    Ok(parts)
}
