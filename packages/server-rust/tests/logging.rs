//! Log lines an operator can follow: one request by its id and client, one connection by its id
//! and peer.
//!
//! A file of its own: the subscriber here is thread-local, and tracing caches per-callsite
//! interest process-wide, so tests running beside it in one process could hide its events.

use topgun_test_support as common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::{TestServer, http, test_config};

/// Captures formatted log lines in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self) -> Vec<String> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

// Current-thread runtime: the server runs on this thread, under this thread's subscriber.
#[tokio::test]
async fn log_lines_carry_the_request_id_and_client_and_the_connection_id_and_peer() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("debug")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    // Behind a trusted proxy on loopback: the client is the address it forwards.
    let config = topgun_server::network::NetworkConfig {
        trusted_proxies: vec!["127.0.0.1/32".parse().unwrap()],
        ..test_config()
    };
    let server = TestServer::start(config).await;
    http()
        .get(server.url("/health"))
        .header("x-request-id", "trace-7f3a")
        .header("x-forwarded-for", "6.6.6.6, 203.0.113.9")
        .send()
        .await
        .unwrap();
    let ws = server.ws().await;
    let conn_id = server.registry.iter().next().unwrap().id;
    drop(ws);
    server.until_connections(0, "disconnected").await;
    server.stop().await.unwrap();

    let lines = captured.lines();
    assert!(
        lines.iter().any(|l| l.contains("request_id=trace-7f3a")
            && l.contains("path=/health")
            && l.contains("client=203.0.113.9")),
        "no request line with its id and client:\n{}",
        lines.join("\n")
    );
    assert!(
        lines.iter().any(|l| l.contains("path=/ws") && l.contains("client=127.0.0.1")),
        "the upgrade's line names its client"
    );
    // One span per connection carries both: `conn{id=7 peer=127.0.0.1:40312}`.
    let connection_lines: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains(&format!("conn{{id={conn_id} peer=127.0.0.1:")))
        .collect();
    assert!(connection_lines.iter().any(|l| l.contains("connected")), "{connection_lines:?}");
    assert!(connection_lines.iter().any(|l| l.contains("disconnected")), "{connection_lines:?}");
    assert!(
        connection_lines.iter().filter(|l| l.contains("disconnected")).all(|l| l.contains("DEBUG")),
        "a client disconnect is logged at debug level"
    );
}
