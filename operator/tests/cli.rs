//! The `plan` command as a user runs it: valid files print a plan; invalid ones print nothing on
//! standard output, an error naming the field on standard error, and exit non-zero.

use std::process::{Command, Output};

fn run(args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleet-access-operator"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("operator binary runs");
    let mut input = child.stdin.take().expect("stdin");
    input
        .write_all(stdin.unwrap_or_default().as_bytes())
        .expect("write stdin");
    drop(input);
    child.wait_with_output().expect("operator exits")
}

const CLASSIC: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/examples/classic-allow-ssh.yaml"
);

#[test]
fn plan_prints_the_classic_policy_as_json() {
    let out = run(&["plan", "-f", CLASSIC, "--output", "json"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json on stdout");
    let resources = &plan["identities"][0]["policies"][0]["document"]["Statement"][0]["Resource"];
    assert_eq!(plan["identities"][0]["principal"], "ssh-user");
    assert_eq!(resources[1], "arn:aws:ssm:*:*:document/AWS-StartSSHSession");
}

#[test]
fn plan_text_uses_the_account_and_region() {
    let out = run(
        &[
            "plan",
            "-f",
            CLASSIC,
            "--account",
            "123456789012",
            "--region",
            "eu-west-1",
        ],
        None,
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    assert!(
        text.contains("arn:aws:ec2:eu-west-1:123456789012:instance/i-0123456789abcdef0"),
        "{text}"
    );
    assert!(
        text.contains("user ssh-user:\n    fleet-access.default.user@ssh-user ("),
        "{text}"
    );
}

#[test]
fn invalid_grants_print_nothing_and_name_the_field() {
    let grant = "apiVersion: fleetaccess.io/v1alpha1\nkind: SessionAccess\nmetadata: {name: x}\nspec:\n  principals: {users: [alice]}\n  targets: {instanceIds: [i-XYZ]}\n  sessions: {ssh: true}\n";
    let out = run(&["plan", "-f", "-"], Some(grant));
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "nothing printed as if valid");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("spec.targets.instanceIds[0]: must be an EC2 instance ID"),
        "{stderr}"
    );
}

#[test]
fn unknown_fields_and_bad_yaml_are_errors() {
    let unknown = "apiVersion: fleetaccess.io/v1alpha1\nkind: SessionAccess\nmetadata: {name: x}\nspec: {principals: {users: [a]}, targets: {allInstances: true}, sessions: {ssh: true}, windows: {}}\n";
    let out = run(&["plan", "-f", "-"], Some(unknown));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("spec.windows: is not a known field"));
    let out = run(&["plan", "-f", "-"], Some("spec: [unclosed"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid YAML"));
}

#[test]
fn a_missing_file_is_an_error() {
    let out = run(&["plan", "-f", "/nonexistent/grant.yaml"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/grant.yaml"));
}

#[test]
fn crds_prints_the_committed_yaml() {
    let out = run(&["crds"], None);
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/crds/fleet-access.yaml"
    ))
    .expect("crds");
    assert_eq!(String::from_utf8(out.stdout).expect("utf-8"), committed);
}

const TEAM_PAYMENTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/examples/boundary-team-payments.yaml"
);

/// The grant a tenant should not be able to make: another team's role, every instance, a root
/// shell, a database port, an endpoint open to any address.
const INTERN_EVERYWHERE: &str = r#"
apiVersion: fleetaccess.io/v1alpha1
kind: SessionAccess
metadata: {name: everything, namespace: team-intern}
spec:
  principals: {roles: [intern-ci]}
  targets: {allInstances: true}
  sessions: {ssh: true, shell: true, ports: [3306]}
  logging: {runAs: {enabled: true, defaultUser: root}}
  bridge: {ports: [22], clients: [{ipBlock: {cidr: 0.0.0.0/0}}]}
"#;

#[test]
fn plan_with_boundaries_refuses_what_no_boundary_admits() {
    let args = ["plan", "-f", "-", "--boundaries", TEAM_PAYMENTS];
    // In a namespace the boundary does not select: refused for that alone.
    let out = run(&args, Some(INTERN_EVERYWHERE));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.stdout.is_empty(), "{stderr}");
    assert!(stderr.contains("team-intern/everything: metadata.namespace: no SessionAccessPolicy selects namespace team-intern"), "{stderr}");
    // In a namespace it selects: every field outside it, each naming the boundary.
    let labelled = [&args[..], &["--namespace-label", "team=payments"]].concat();
    let out = run(&labelled, Some(INTERN_EVERYWHERE));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.stdout.is_empty(), "{stderr}");
    for field in [
        "spec.principals.roles",
        "spec.targets.allInstances",
        "spec.sessions.ports",
        "spec.logging.runAs.defaultUser",
        "spec.logging.cloudWatch",
        "spec.bridge.clients[0].ipBlock",
        "spec.window.expiresAt",
    ] {
        assert!(
            stderr.contains(&format!("team-intern/everything: {field}")),
            "{field}: {stderr}"
        );
    }
    assert!(
        stderr.contains("(SessionAccessPolicy team-payments)"),
        "{stderr}"
    );
}

#[test]
fn plan_with_the_single_team_boundary_admits_a_valid_grant() {
    let single_team = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/boundary-single-team.yaml"
    );
    let out = run(&["plan", "-f", CLASSIC, "--boundaries", single_team], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.stdout.is_empty());
}

#[test]
fn plan_prints_how_to_connect_through_the_clusters_port_document() {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/port-forwarding.yaml"
    );
    let out = run(&["plan", "-f", example], None);
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let document = "fleet-access.default.port5432";
    assert!(
        text.contains(&format!(
            "agent-bridge forward i-0a1b2c3d --document {document} --local 127.0.0.1:5432"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "aws ssm start-session --target i-0a1b2c3d --document-name {document}"
        )),
        "{text}"
    );
}

#[test]
fn plan_with_boundaries_says_which_grants_wait_for_approval() {
    let grant = r#"
apiVersion: fleetaccess.io/v1alpha1
kind: SessionAccess
metadata: {name: db-oncall, namespace: payments}
spec:
  principals: {roles: [payments-oncall]}
  targets: {instanceIds: [i-0123456789abcdef0]}
  sessions: {ssh: true}
  window: {expiresAt: "2030-01-01T08:00:00Z", notBefore: "2030-01-01T00:00:00Z"}
"#;
    let args = [
        "plan",
        "-f",
        "-",
        "--boundaries",
        TEAM_PAYMENTS,
        "--namespace-label",
        "team=payments",
    ];
    let out = run(&args, Some(grant));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!out.stdout.is_empty());
    assert!(
        stderr.contains("note: payments/db-oncall: nothing is in force until someone other than its requester approves it (SessionAccessPolicy team-payments requires approval"),
        "{stderr}"
    );
    // A Deny needs no approval.
    let deny = grant
        .replace("spec:\n", "spec:\n  effect: Deny\n")
        .replace("  sessions: {ssh: true}\n", "");
    let out = run(&args, Some(&deny));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("note:"), "{stderr}");
}
