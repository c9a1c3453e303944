//! The monitoring in `deploy/monitoring/`: the alert rules pass `promtool check rules` and their
//! unit tests (`promtool test rules`, one test per alert), the PrometheusRule carries exactly the
//! plain rule file's groups, every metric name the rules and the Grafana dashboard use is one
//! the binaries really export, and, on a real Prometheus scraping both live programs, every
//! panel's query returns the series its legend draws and every alert fires exactly when this
//! state should fire it.
//!
//! The exported names come from live scrapes, not from the source: `fleet-access-demo` (the bridge's
//! emulated fleet, on loopback) and `fleet-access-operator run` against the test kube-apiserver.
//! Families that only appear after an event are caused, not whitelisted: the test carries a
//! session through the demo's endpoint (sessions started/ended, bytes, durations), fills one
//! instance's session limit so that a connection is refused, and gives the operator a grant whose
//! AWS endpoints refuse connections, so it reconciles, fails, counts AWS calls and errors, and
//! sets the grant gauge. Nothing reaches AWS: every endpoint is on 127.0.0.1.

#![allow(clippy::panic, clippy::unwrap_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use fleet_access_crds::{SessionAccess, fixtures::GrantFixture};
use fleet_access_tests::{
    ControlPlane, Prometheus, RefusingAddress, addresses::wait_for_reported_address, http_get,
    workspace_binary,
};
use kube::{Api, api::PostParams};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

const PROMTOOL: &str = "/usr/bin/promtool";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn monitoring() -> PathBuf {
    root().join("deploy/monitoring")
}

fn yaml_file(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let value: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    serde_json::to_value(value).unwrap()
}

fn promtool(args: &[&str]) -> String {
    let output = Command::new(PROMTOOL)
        .args(args)
        .current_dir(monitoring().join("rules"))
        .output()
        .unwrap_or_else(|e| panic!("{PROMTOOL} (tests/env/install-packages.sh): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn rules_pass_promtool_check_and_their_unit_tests() {
    let checked = promtool(&["check", "rules", "fleet-access.rules.yml"]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "fleet-access.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

fn alerts(rules: &Value) -> Vec<(String, String)> {
    rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .map(|r| {
            (
                r["alert"].as_str().unwrap().to_owned(),
                r["expr"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn every_alert_has_a_unit_test_that_fires_it_and_one_that_does_not() {
    let rules = yaml_file(&monitoring().join("rules/fleet-access.rules.yml"));
    let tests = yaml_file(&monitoring().join("rules/fleet-access.test.yml"));
    let cases: Vec<&Value> = tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().unwrap())
        .collect();
    let alerts = alerts(&rules);
    assert!(alerts.len() >= 6, "{alerts:?}");
    for (alert, _) in &alerts {
        let of_alert = || cases.iter().filter(|c| c["alertname"] == alert.as_str());
        assert!(
            of_alert().any(|c| !c["exp_alerts"].as_array().unwrap().is_empty()),
            "{alert}: a test where it fires"
        );
        assert!(
            of_alert().any(|c| c["exp_alerts"].as_array().unwrap().is_empty()),
            "{alert}: a test where it stays silent"
        );
    }
    // The alerts the deployment promises.
    for expected in [
        "FleetAccessSessionFailureRate",
        "FleetAccessSessionSetupSlow",
        "FleetAccessReconcileErrors",
        "FleetAccessGrantsNotReady",
        "FleetAccessBridgeWithoutEndpoints",
        "FleetAccessBridgeWatchFailing",
    ] {
        assert!(alerts.iter().any(|(a, _)| a == expected), "{expected}");
    }
}

#[test]
fn the_prometheus_rule_carries_the_plain_rule_file() {
    let rules = yaml_file(&monitoring().join("rules/fleet-access.rules.yml"));
    let object = yaml_file(&monitoring().join("prometheusrule.yaml"));
    assert_eq!(object["kind"], "PrometheusRule");
    assert_eq!(
        object["spec"]["groups"], rules["groups"],
        "deploy/monitoring/prometheusrule.yaml and rules/fleet-access.rules.yml differ"
    );
}

// === metric names used ===

/// PromQL words that are not metric names: binary operators and modifiers, and the
/// aggregation operators, which may be followed by `by (...)` rather than by `(`.
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
    "Inf",
    "NaN",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// Clauses whose parenthesised list holds label names.
const LABEL_CLAUSES: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Drops `open ... close` groups (matchers, ranges) and string literals.
fn strip(expr: &str) -> String {
    let mut out = String::new();
    let mut chars = expr.chars().peekable();
    let mut depth_brace = 0;
    let mut depth_bracket = 0;
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                while let Some(d) = chars.next() {
                    if d == '\\' {
                        chars.next();
                    } else if d == c {
                        break;
                    }
                }
            }
            '{' => depth_brace += 1,
            '}' => depth_brace -= 1,
            '[' => depth_bracket += 1,
            ']' => depth_bracket -= 1,
            _ if depth_brace > 0 || depth_bracket > 0 => {}
            _ => out.push(c),
        }
    }
    out
}

/// The metric names a PromQL expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let text = strip(expr);
    let chars: Vec<char> = text.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let is_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let is_part = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    while i < chars.len() {
        let c = chars[i];
        // Numbers and durations (0.99, 5m, 1e3) are not names.
        if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            continue;
        }
        if !is_start(c) {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && is_part(chars[i]) {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        let mut next = i;
        while next < chars.len() && chars[next].is_whitespace() {
            next += 1;
        }
        let followed_by_paren = chars.get(next) == Some(&'(');
        if LABEL_CLAUSES.contains(&word.as_str()) && followed_by_paren {
            // Skip the label list.
            let mut depth = 0;
            i = next;
            while i < chars.len() {
                match chars[i] {
                    '(' => depth += 1,
                    ')' => {
                        depth -= 1;
                        if depth == 0 {
                            i += 1;
                            break;
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            continue;
        }
        if followed_by_paren || KEYWORDS.contains(&word.as_str()) {
            continue; // a function or an operator
        }
        names.insert(word);
    }
    names
}

#[test]
fn the_extractor_finds_metric_names_only() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (namespace, le) (rate(a_bucket{phase="total", x=~"a|b"}[10m]))) > 5
           and on (namespace) (max by (pod) (b) == 0) / ignoring(x) c offset 5m unless d[5m:1m]"#,
    );
    assert_eq!(
        names,
        ["a_bucket", "b", "c", "d"]
            .into_iter()
            .map(str::to_owned)
            .collect()
    );
}

fn names_in_rules() -> BTreeSet<String> {
    let rules = yaml_file(&monitoring().join("rules/fleet-access.rules.yml"));
    alerts(&rules)
        .iter()
        .flat_map(|(_, expr)| metric_names(expr))
        .collect()
}

fn names_in_dashboard() -> BTreeSet<String> {
    let text = std::fs::read_to_string(monitoring().join("grafana-dashboard.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    let mut names = BTreeSet::new();
    let mut exprs = 0;
    let mut panels: Vec<&Value> = dashboard["panels"].as_array().unwrap().iter().collect();
    while let Some(panel) = panels.pop() {
        panels.extend(panel["panels"].as_array().into_iter().flatten());
        for target in panel["targets"].as_array().into_iter().flatten() {
            names.extend(metric_names(target["expr"].as_str().unwrap()));
            exprs += 1;
        }
    }
    // Template variables: label_values(<metric>, <label>).
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(definition) = variable["definition"].as_str()
            && let Some(args) = definition.strip_prefix("label_values(")
        {
            names.extend(metric_names(args.split(',').next().unwrap()));
        }
    }
    assert!(exprs >= 15, "the dashboard's queries");
    names
}

// === live scrapes ===

/// Series names in a scrape (`name{...} value` and `name value` lines).
fn exported(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// Scrapes `admin` until every name of `wanted` is exported, or fails listing what is missing.
async fn scrape_until(
    admin: SocketAddr,
    wanted: &BTreeSet<String>,
    what: &str,
) -> BTreeSet<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let names = http_get(admin, "/metrics")
            .await
            .map(|(_, body)| exported(&body))
            .unwrap_or_default();
        let missing: Vec<&String> = wanted.difference(&names).collect();
        if missing.is_empty() {
            return names;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} does not export {missing:?} (exported: {names:?})"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The admin address in the demo's hint `  curl -s http://<address>/metrics | grep ...`.
fn demo_admin_address(line: &str) -> Option<SocketAddr> {
    let rest = line.trim().strip_prefix("curl -s http://")?;
    rest.split_once("/metrics")?.0.parse().ok()
}

#[test]
fn the_demo_admin_address_is_read_from_its_hint() {
    assert_eq!(
        demo_admin_address("  curl -s http://127.0.0.1:41234/metrics | grep agent_bridge_"),
        Some(SocketAddr::from(([127, 0, 0, 1], 41234)))
    );
    assert_eq!(demo_admin_address("  ssh -p 22 me@127.0.0.1"), None);
}

/// Runs `fleet-access-demo` (the bridge in front of an emulated fleet), carries a session and causes a refusal; returns what it exports.
/// The demo (the bridge over an emulated fleet) running, with its endpoints and admin address.
struct LiveBridge {
    _demo: tokio::process::Child,
    admin: SocketAddr,
    endpoints: Vec<u16>,
}

async fn start_demo(program: &Path) -> LiveBridge {
    // Port 0 everywhere: the demo picks free ports itself and prints them.
    let mut demo = tokio::process::Command::new(program)
        .args(["--seconds", "300", "--port-base", "0", "--admin-port", "0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("fleet-access-demo starts");
    // "  i-0123456789abcdef0:22 -> 127.0.0.1:<port>"
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut endpoints = Vec::new();
    let mut admin = None;
    while let Some(line) = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("the demo prints its endpoints")
        .unwrap()
    {
        if let Some((_, port)) = line.trim().split_once(":22 -> 127.0.0.1:") {
            endpoints.push(port.parse::<u16>().unwrap());
        }
        admin = admin.or(demo_admin_address(&line));
        if line.starts_with("Running until") {
            break;
        }
    }
    assert_eq!(endpoints.len(), 2, "two demo endpoints");
    let admin = admin.expect("the demo prints its admin address");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    LiveBridge {
        _demo: demo,
        admin,
        endpoints,
    }
}

/// Carries one session through the demo and fills one instance's limit so that a connection is
/// refused; returns the connections that hold the limit.
async fn bridge_traffic(bridge: &LiveBridge) -> Vec<TcpStream> {
    let endpoints = &bridge.endpoints;
    // One session: bytes both ways (the instance leads to an sshd, which speaks first, or to an
    // echo service), then the client closes.
    let mut session = TcpStream::connect(("127.0.0.1", endpoints[0]))
        .await
        .unwrap();
    session.write_all(b"SSH-2.0-probe\r\n").await.unwrap();
    let mut buffer = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(30), session.read(&mut buffer))
        .await
        .expect("bytes from the instance")
        .unwrap();
    assert!(n > 0);
    drop(session);

    // The demo admits 20 sessions per instance: the 21st connection is refused. The listener
    // accepts connections in the order they were made (the kernel's accept queue is FIFO) and
    // admits each as it accepts it, so the 21st is judged after the 20 took their places.
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(
            TcpStream::connect(("127.0.0.1", endpoints[1]))
                .await
                .unwrap(),
        );
    }
    let mut refused = TcpStream::connect(("127.0.0.1", endpoints[1]))
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(60), refused.read_to_string(&mut answer))
        .await
        .expect("the 21st connection is answered and closed")
        .expect("the refusal is read");
    assert!(
        answer.starts_with("fleet-access: refused: ") && answer.contains("limit of 20 sessions"),
        "the 21st connection is refused for the instance's limit: {answer:?}"
    );
    held
}

/// The operator running against the test API server with a grant (expiring in 30 minutes) and
/// AWS endpoints that refuse connections: it reconciles, fails, counts AWS calls and errors, and
/// sets the grant gauges.
struct LiveOperator {
    _operator: tokio::process::Child,
    admin: SocketAddr,
    _refusing: RefusingAddress,
    _dir: tempfile::TempDir,
}

async fn start_operator(program: &Path) -> LiveOperator {
    let control_plane = ControlPlane::shared().await.expect("control plane");
    control_plane
        .install_fleet_access(&fleet_access_crds::crds_yaml())
        .await
        .expect("fleet-access's API");
    let namespace = control_plane.namespace("deploy-mon").await.expect("ns");
    let ns = namespace.name().to_owned();
    let expires_at =
        k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_mins(30);
    let grant = GrantFixture::new(&ns, "metrics")
        .users(["alice"])
        .instance_ids(["i-0123456789abcdef0"])
        .ssh()
        // A window, so that the grant's expiry gauge is exported too.
        .expires_at(&expires_at.to_string())
        .build();
    let grants: Api<SessionAccess> = namespace.api();
    grants.create(&PostParams::default(), &grant).await.unwrap();

    // Connections are refused here: every AWS call fails fast, on loopback.
    let refusing = RefusingAddress::bind().unwrap();
    let dead = refusing.url();
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("operator.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut operator = tokio::process::Command::new(program)
        .args([
            "run",
            "--account",
            "123456789012",
            "--region",
            "us-east-1",
            // The system picks the port; the operator reports it on standard error.
            "--admin-address",
            "127.0.0.1:0",
            "--watch-namespace",
            &ns,
            "--bridge-namespace",
            &ns,
        ])
        .env("KUBECONFIG", control_plane.kubeconfig_path())
        .env("AWS_ENDPOINT_URL_IAM", &dead)
        .env("AWS_ENDPOINT_URL_SSM", &dead)
        .env("AWS_ENDPOINT_URL_STS", &dead)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("the operator starts");
    let admin = wait_for_reported_address(
        "fleet-access-operator",
        &log_path,
        "admin",
        Duration::from_secs(60),
        || Some(operator.try_wait().ok()??.to_string()),
    )
    .await
    .unwrap_or_else(|error| panic!("{error}"));
    LiveOperator {
        _operator: operator,
        admin,
        _refusing: refusing,
        _dir: dir,
    }
}

// === the dashboard and the alerts on live data ===

/// The namespace label Kubernetes service discovery puts on both programs' series.
const NAMESPACE: &str = "fleet-access";

/// One query of the dashboard: its panel, its expression, and the labels its legend shows.
struct PanelQuery {
    panel: String,
    expr: String,
    legend_labels: Vec<String>,
}

/// Every query of the dashboard, with Grafana's variables as a dashboard for `NAMESPACE` sets
/// them (`$__rate_interval` as one minute: at least four scrapes here).
fn dashboard_queries() -> Vec<PanelQuery> {
    let text = std::fs::read_to_string(monitoring().join("grafana-dashboard.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    let mut panels: Vec<&Value> = dashboard["panels"].as_array().unwrap().iter().collect();
    while let Some(panel) = panels.pop() {
        panels.extend(panel["panels"].as_array().into_iter().flatten());
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = (target["expr"].as_str().unwrap())
                .replace("$namespace", NAMESPACE)
                .replace("$__rate_interval", "1m");
            let legend = target["legendFormat"].as_str().unwrap_or_default();
            let legend_labels = (legend.split("{{").skip(1))
                .filter_map(|part| {
                    part.split_once("}}")
                        .map(|(label, _)| label.trim().to_owned())
                })
                .collect();
            out.push(PanelQuery {
                panel: panel["title"].as_str().unwrap_or_default().to_owned(),
                expr,
                legend_labels,
            });
        }
    }
    out
}

/// The first moment (Unix seconds) at which Prometheus has every kind of event the dashboard
/// draws within its last minute: a session ended, a connection refused, a reconcile failed.
/// Every panel is then evaluated at that moment, so that what it shows does not depend on how
/// long the checks take.
async fn moment_with_every_event(prometheus: &Prometheus) -> f64 {
    let ready = [
        "agent_bridge_sessions_ended_total",
        "agent_bridge_connections_refused_total",
        "fleet_access_operator_reconcile_errors_total",
    ]
    .map(|name| format!("sum(increase({name}{{namespace=\"{NAMESPACE}\"}}[1m])) > 0"))
    .join(" and on() ");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        if !prometheus.query_at(&ready, now).await.unwrap().is_empty() {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Prometheus never held every event at once: {ready}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_rules_and_the_dashboard_use_is_exported_and_every_panel_shows_data() {
    let rules = names_in_rules();
    let dashboard = names_in_dashboard();
    let used: BTreeSet<String> = rules.union(&dashboard).cloned().collect();
    assert!(
        rules.contains("agent_bridge_sessions_ended_total"),
        "{rules:?}"
    );
    assert!(
        rules.contains("fleet_access_operator_reconcile_errors_total"),
        "{rules:?}"
    );
    assert!(
        used.iter()
            .all(|n| n.starts_with("agent_bridge_") || n.starts_with("fleet_access_operator_")),
        "only the binaries' own metrics: {used:?}"
    );
    let bridge_program = workspace_binary("fleet-access-demo").expect("the demo builds");
    let operator_program = workspace_binary("fleet-access-operator").expect("the operator builds");
    let bridge = start_demo(&bridge_program).await;
    let operator = start_operator(&operator_program).await;
    // Scraped before the traffic, so that rates see it happen.
    let labels = |pod: &str| {
        BTreeMap::from([
            ("namespace".to_owned(), NAMESPACE.to_owned()),
            ("pod".to_owned(), pod.to_owned()),
        ])
    };
    let prometheus = Prometheus::start_labelled(&[
        (bridge.admin, labels("agent-bridge-0")),
        (operator.admin, labels("fleet-access-operator-0")),
    ])
    .await
    .expect("prometheus");
    prometheus
        .wait_for_scrape(Duration::from_secs(60))
        .await
        .expect("both scraped");
    let _held = bridge_traffic(&bridge).await;

    // 1. Every name used is exported.
    let wanted = |prefix: &str| -> BTreeSet<String> {
        used.iter()
            .filter(|n| n.starts_with(prefix))
            .cloned()
            .collect()
    };
    let mut exported = scrape_until(bridge.admin, &wanted("agent_bridge_"), "agent-bridge").await;
    exported.extend(
        scrape_until(
            operator.admin,
            &wanted("fleet_access_operator_"),
            "fleet-access-operator",
        )
        .await,
    );
    let missing: Vec<&String> = used.difference(&exported).collect();
    assert!(missing.is_empty(), "used but not exported: {missing:?}");

    let at = moment_with_every_event(&prometheus).await;
    let query = |expr: String| {
        let prometheus = &prometheus;
        async move { prometheus.query_at(&expr, at).await.unwrap() }
    };
    // 2. The template variable lists the namespace.
    let endpoints = query("agent_bridge_endpoints".into()).await;
    assert!(
        (endpoints.iter())
            .any(|s| s.labels.get("namespace").map(String::as_str) == Some(NAMESPACE)),
        "{endpoints:?}"
    );
    // 3. Every panel's query returns series, each with the labels its legend shows, and a
    //    number (histogram quantiles of what happened, not NaN).
    let queries = dashboard_queries();
    assert!(queries.len() >= 15, "the dashboard's queries");
    for panel in &queries {
        let samples = query(panel.expr.clone()).await;
        let what = format!("panel {:?}: {} gave {samples:?}", panel.panel, panel.expr);
        assert!(!samples.is_empty(), "{what}");
        for sample in &samples {
            assert!(sample.value.is_finite() && sample.value >= 0.0, "{what}");
            for label in &panel.legend_labels {
                assert!(sample.labels.contains_key(label), "{what}: no {label}");
            }
        }
        if panel.panel == "Session failure ratio" {
            assert!(samples.iter().all(|s| s.value <= 1.0), "{what}");
        }
    }

    // 4. The alerts this state should fire do, on their expressions (their `for` aside), and
    //    the others do not. AWS out of reach is retryable: the reconcile errors say so, not
    //    FleetAccessAwsCallErrors, which is for what retrying cannot mend (access denied, quota).
    let should_fire = BTreeSet::from([
        "FleetAccessReconcileErrors",
        "FleetAccessGrantsNotReady",
        "FleetAccessGrantExpiringSoon",
    ]);
    for (alert, expr) in alerts(&yaml_file(
        &monitoring().join("rules/fleet-access.rules.yml"),
    )) {
        let fires = should_fire.contains(alert.as_str());
        let samples = query(expr.clone()).await;
        assert_eq!(
            !samples.is_empty(),
            fires,
            "alert {alert} should {}fire: {expr} gave {samples:?}",
            if fires { "" } else { "not " }
        );
    }
}
