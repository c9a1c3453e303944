//! The metrics part of the test environment: Prometheus scrapes a tiny exporter the
//! test serves on loopback, and an instant query returns the exported value.

use std::net::SocketAddr;
use std::time::Duration;

use fleet_access_tests::{FixtureError, Prometheus, RefusingAddress};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Serves `body` as Prometheus text format to every request, until the task is dropped.
async fn start_exporter(body: String) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (address, task)
}

#[tokio::test]
async fn scrapes_an_exporter_and_answers_an_instant_query() {
    let value = f64::from(uuid::Uuid::new_v4().as_u128() as u16) + 0.5;
    let body = format!(
        "# HELP fleet_access_env_test_value A value the test chose.\n\
         # TYPE fleet_access_env_test_value gauge\n\
         fleet_access_env_test_value{{source=\"env-test\"}} {value}\n"
    );
    let (address, exporter) = start_exporter(body).await;
    let prometheus = Prometheus::start(&[address])
        .await
        .expect("prometheus starts (run tests/env/setup.sh first)");
    prometheus
        .wait_for_scrape(Duration::from_secs(60))
        .await
        .expect("target scraped");
    let samples = prometheus
        .query_until_present("fleet_access_env_test_value", Duration::from_secs(30))
        .await
        .expect("query");
    assert_eq!(samples.len(), 1);
    assert_eq!(samples[0].value, value);
    assert_eq!(samples[0].labels["source"], "env-test");
    assert_eq!(samples[0].labels["instance"], address.to_string());

    let absent = prometheus
        .query("fleet_access_env_test_absent")
        .await
        .expect("query");
    assert!(absent.is_empty());
    exporter.abort();
}

#[tokio::test]
async fn a_target_that_is_down_is_reported_down() {
    // An address that refuses connections for as long as the test holds it.
    let refusing = RefusingAddress::bind().expect("a refusing address");
    let address = refusing.address();
    let prometheus = Prometheus::start(&[address])
        .await
        .expect("prometheus starts");
    let down = prometheus
        .query_until_present("up == 0", Duration::from_secs(30))
        .await
        .expect("query");
    assert_eq!(down[0].labels["instance"], address.to_string());
    // The wait for a successful scrape ends at its deadline, not with a failed query.
    let never_up = prometheus
        .wait_for_scrape(Duration::from_secs(2))
        .await
        .expect_err("the target is never up");
    assert!(
        matches!(&never_up, FixtureError::NotReady { name, .. } if name.contains(&address.to_string())),
        "{never_up}"
    );
}
