//! Prometheus (Debian's `prometheus` package) with a generated config that scrapes
//! given loopback targets every second into a temporary storage folder, and instant
//! queries through `promtool`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tokio::time::Instant;

use serde::Deserialize;
use tempfile::TempDir;

use crate::error::{FixtureError, FixtureResult};
use crate::locations::{debian, require_program};
use crate::process::{
    SupervisedProcess, accepts_connections, free_loopback_port, loopback, retry_on_port_clash,
    run_command, run_command_async,
};

/// The job name of the generated scrape config.
pub const SCRAPE_JOB: &str = "fixture";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// One sample of an instant-query result.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The series labels, `__name__` included when the result keeps it.
    pub labels: BTreeMap<String, String>,
    /// The sample value.
    pub value: f64,
}

/// A running Prometheus server, stopped on drop.
#[derive(Debug)]
pub struct Prometheus {
    // Declared in stop order: the process before its folder.
    process: SupervisedProcess,
    port: u16,
    targets: Vec<SocketAddr>,
    _dir: TempDir,
}

impl Prometheus {
    /// Starts Prometheus on a free loopback port, scraping `targets` (`/metrics`,
    /// every second), and waits until it answers queries.
    pub async fn start(targets: &[SocketAddr]) -> FixtureResult<Self> {
        let unlabelled: Vec<Target> = (targets.iter())
            .map(|address| (*address, BTreeMap::new()))
            .collect();
        Self::start_labelled(&unlabelled).await
    }

    /// Like [`Prometheus::start`], each target with labels of its own on every series scraped
    /// from it (as Kubernetes service discovery adds `namespace` and `pod`).
    pub async fn start_labelled(targets: &[Target]) -> FixtureResult<Self> {
        retry_on_port_clash(|| Self::start_once(targets)).await
    }

    async fn start_once(targets: &[Target]) -> FixtureResult<Self> {
        let prometheus = require_program("prometheus", Path::new(debian::PROMETHEUS))?;
        require_program("promtool", Path::new(debian::PROMTOOL))?;
        let dir = tempfile::Builder::new()
            .prefix("fleet-access-prometheus-")
            .tempdir()
            .map_err(FixtureError::io("creating the prometheus folder"))?;
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, render_config(targets)?)
            .map_err(FixtureError::io("writing the prometheus config"))?;
        run_command(
            Command::new(debian::PROMTOOL)
                .args(["check", "config"])
                .arg(&config_path),
        )?;
        let port = free_loopback_port()?;
        let mut command = Command::new(prometheus);
        command
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn");
        let mut process =
            SupervisedProcess::spawn("prometheus", &command, &dir.path().join("prometheus.log"))?;
        let server = format!("http://127.0.0.1:{port}");
        let server = &server;
        process
            .wait_until(READY_TIMEOUT, move || async move {
                accepts_connections(loopback(port)).await
                    && query_with_promtool(server, "1").await.is_ok()
            })
            .await?;
        Ok(Self {
            process,
            port,
            targets: targets.iter().map(|(address, _)| *address).collect(),
            _dir: dir,
        })
    }

    /// The server's URL (`http://127.0.0.1:<port>`).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Prometheus' log file.
    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    /// Runs an instant query and returns the vector or scalar result as samples.
    pub async fn query(&self, expr: &str) -> FixtureResult<Vec<Sample>> {
        query_with_promtool(&self.url(), expr).await
    }

    /// Runs an instant query evaluated at `at` (Unix seconds): the same answer however late it
    /// is asked, once the scrapes up to `at` are in.
    pub async fn query_at(&self, expr: &str, at: f64) -> FixtureResult<Vec<Sample>> {
        let output = run_command_async(
            tokio::process::Command::new(debian::PROMTOOL)
                .args(["query", "instant", "-o", "json"])
                .arg(format!("--time={at:.3}"))
                .arg(self.url())
                .arg(expr),
        )
        .await?;
        parse_query_result(&String::from_utf8_lossy(&output.stdout))
    }

    /// Polls `expr` until it returns at least one sample, then returns the samples.
    pub async fn query_until_present(
        &self,
        expr: &str,
        timeout: Duration,
    ) -> FixtureResult<Vec<Sample>> {
        let deadline = Instant::now() + timeout;
        loop {
            let samples = self.query(expr).await?;
            if !samples.is_empty() {
                return Ok(samples);
            }
            if Instant::now() >= deadline {
                return Err(FixtureError::NotReady {
                    name: format!("prometheus query {expr}"),
                    seconds: timeout.as_secs(),
                    log_tail: self.process.log_tail(20),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until every target has been scraped successfully (`up == 1`).
    pub async fn wait_for_scrape(&self, timeout: Duration) -> FixtureResult<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let up = self
                .query(&format!("up{{job=\"{SCRAPE_JOB}\"}} == 1"))
                .await?;
            if up.len() == self.targets.len() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(FixtureError::NotReady {
                    name: format!("scrape of {:?}", self.targets),
                    seconds: timeout.as_secs(),
                    log_tail: self.process.log_tail(20),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A scrape target and the labels put on its series.
pub type Target = (SocketAddr, BTreeMap<String, String>);

/// The Prometheus config scraping `targets` every second.
fn render_config(targets: &[Target]) -> FixtureResult<String> {
    let static_configs: Vec<serde_json::Value> = (targets.iter())
        .map(|(address, labels)| {
            serde_json::json!({"targets": [address.to_string()], "labels": labels})
        })
        .collect();
    let value = serde_json::json!({
        "global": {
            "scrape_interval": "1s",
            "scrape_timeout": "1s",
            "evaluation_interval": "1s",
        },
        "scrape_configs": [{
            "job_name": SCRAPE_JOB,
            "static_configs": static_configs,
        }],
    });
    Ok(serde_yaml::to_string(&value)?)
}

async fn query_with_promtool(server: &str, expr: &str) -> FixtureResult<Vec<Sample>> {
    let output = run_command_async(
        tokio::process::Command::new(debian::PROMTOOL)
            .args(["query", "instant", "-o", "json"])
            .arg(server)
            .arg(expr),
    )
    .await?;
    parse_query_result(&String::from_utf8_lossy(&output.stdout))
}

#[derive(Deserialize)]
struct VectorSample {
    metric: BTreeMap<String, String>,
    value: (f64, String),
}

/// Parses promtool's JSON output: a vector (`[{metric, value}]`) or a scalar
/// (`{"type": "scalar", "value": [t, "v"]}` / `[t, "v"]`).
pub fn parse_query_result(json: &str) -> FixtureResult<Vec<Sample>> {
    let value: serde_json::Value = serde_json::from_str(json.trim())?;
    let parse_number = |text: &str| -> FixtureResult<f64> {
        text.parse().map_err(|_| FixtureError::UnexpectedAnswer {
            component: "promtool".into(),
            detail: format!("sample value {text:?} is not a number"),
        })
    };
    match &value {
        serde_json::Value::Array(items) if items.iter().all(serde_json::Value::is_object) => {
            let vector: Vec<VectorSample> = serde_json::from_value(value)?;
            vector
                .into_iter()
                .map(|sample| {
                    Ok(Sample {
                        labels: sample.metric,
                        value: parse_number(&sample.value.1)?,
                    })
                })
                .collect()
        }
        serde_json::Value::Array(pair) if pair.len() == 2 => {
            let text = pair[1].as_str().unwrap_or_default();
            Ok(vec![Sample {
                labels: BTreeMap::new(),
                value: parse_number(text)?,
            }])
        }
        serde_json::Value::Object(map) if map.contains_key("value") => {
            let pair: (f64, String) = serde_json::from_value(map["value"].clone())?;
            Ok(vec![Sample {
                labels: BTreeMap::new(),
                value: parse_number(&pair.1)?,
            }])
        }
        _ => Err(FixtureError::UnexpectedAnswer {
            component: "promtool".into(),
            detail: format!("unexpected query result {json}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_vector_result() {
        let json = r#"[{"metric":{"__name__":"up","job":"fixture"},"value":[1700000000.1,"1"]},
                       {"metric":{},"value":[1700000000.1,"42.5"]}]"#;
        let samples = parse_query_result(json).expect("parses");
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].labels["job"], "fixture");
        assert_eq!(samples[0].value, 1.0);
        assert_eq!(samples[1].value, 42.5);
    }

    #[test]
    fn parses_scalar_and_empty_results() {
        assert_eq!(
            parse_query_result(r#"{"type":"scalar","value":[1.0,"7"]}"#).expect("scalar")[0].value,
            7.0
        );
        assert_eq!(
            parse_query_result(r#"[1.0,"3"]"#).expect("pair")[0].value,
            3.0
        );
        assert!(parse_query_result("[]").expect("empty").is_empty());
        assert!(parse_query_result(r#"{"oops":1}"#).is_err());
    }

    #[test]
    fn config_scrapes_the_targets_every_second() {
        let labels = BTreeMap::from([("namespace".to_owned(), "fleet-access".to_owned())]);
        let target = ("127.0.0.1:9100".parse().expect("addr"), labels);
        let config = render_config(&[target]).expect("renders");
        let parsed: serde_yaml::Value = serde_yaml::from_str(&config).expect("yaml");
        assert_eq!(parsed["global"]["scrape_interval"], "1s");
        let scraped = &parsed["scrape_configs"][0]["static_configs"][0];
        assert_eq!(scraped["targets"][0], "127.0.0.1:9100");
        assert_eq!(scraped["labels"]["namespace"], "fleet-access");
    }
}
