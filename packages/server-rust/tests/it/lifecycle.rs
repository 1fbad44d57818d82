//! Starting, serving and reporting health.

use topgun_test_support as common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{TestServer, eventually, http, send_binary, test_config};
use tokio::io::AsyncBufReadExt;
use tokio::sync::Semaphore;
use topgun_server::network::{
    ConnectionConfig, ConnectionHandle, HealthReport, HealthState, InboundHandler, NetworkConfig,
    NetworkModule,
};

#[tokio::test]
async fn ac11_ot5_start_binds_port_zero_then_serve_accepts_connections() {
    let mut module = NetworkModule::new(test_config());
    assert!(module.local_addr().is_none(), "nothing is bound before start()");
    let port = module.start().await.unwrap();
    assert!(port > 0);
    assert_eq!(module.local_addr().unwrap().port(), port);

    let server = TestServer::from_module(module).await;
    assert_eq!(server.addr.port(), port);
    let live = http().get(server.url("/health/live")).send().await.unwrap();
    assert_eq!(live.status(), 200);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_reconnect_storm_waits_in_the_listen_backlog_instead_of_being_dropped() {
    // Every client of a restarted node reconnects at once. Before serve() nothing accepts,
    // so the connections that complete their TCP handshake are exactly those the kernel
    // queues for the listener; with `TcpListener::bind`'s 128 the rest would have their
    // SYNs dropped and retry only after a second or more.
    let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|value| value.trim().parse::<usize>().ok())
        .unwrap_or(4096);
    let storm = 600.min(somaxconn);
    let mut module = NetworkModule::new(test_config());
    let port = module.start().await.unwrap();
    let mut connects = tokio::task::JoinSet::new();
    for _ in 0..storm {
        connects.spawn(tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
        ));
    }
    let mut queued = Vec::with_capacity(storm);
    while let Some(connected) = connects.join_next().await {
        queued.push(connected.unwrap().expect("connected before the deadline").unwrap());
    }
    assert_eq!(queued.len(), storm);

    let server = TestServer::from_module(module).await;
    let live = http().get(server.url("/health/live")).send().await.unwrap();
    assert_eq!(live.status(), 200);
    drop(queued);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn serve_before_start_is_an_error_not_a_panic() {
    let err = NetworkModule::new(test_config()).serve(async {}).await.unwrap_err();
    assert!(err.to_string().contains("before start()"), "{err}");
}

#[tokio::test]
async fn start_reports_an_invalid_configuration() {
    let config = NetworkConfig {
        connection: ConnectionConfig { ws_max_write_buffer_size: 1, ..Default::default() },
        ..test_config()
    };
    let err = NetworkModule::new(config).start().await.unwrap_err();
    assert!(err.to_string().contains("ws_max_write_buffer_size"), "{err}");
}

#[tokio::test]
async fn every_invalid_setting_is_an_error_from_start_naming_it_never_a_panic() {
    let cases: [(NetworkConfig, &str); 4] = [
        (NetworkConfig { max_connections: usize::MAX, ..test_config() }, "max_connections"),
        (NetworkConfig { max_connections: 0, ..test_config() }, "max_connections"),
        (
            NetworkConfig { tls_handshake_timeout: Duration::ZERO, ..test_config() },
            "tls_handshake_timeout",
        ),
        (
            NetworkConfig {
                connection: ConnectionConfig {
                    auth_timeout: Some(Duration::ZERO),
                    ..Default::default()
                },
                ..test_config()
            },
            "auth_timeout",
        ),
    ];
    for (config, setting) in cases {
        let err = NetworkModule::new(config).start().await.unwrap_err();
        assert!(err.to_string().contains(setting), "{setting}: {err}");
    }
}

/// The port in an example's "listening" line: `... ws://127.0.0.1:PORT/ws` or `... on port PORT`.
fn listening_port(line: &str) -> Option<u16> {
    let (_, rest) = line.split_once("127.0.0.1:").or_else(|| line.split_once("on port "))?;
    rest.chars().take_while(char::is_ascii_digit).collect::<String>().parse().ok()
}

/// The examples stop the way the binary does: SIGTERM or SIGINT, gracefully (1001, exit 0).
#[tokio::test]
async fn the_examples_stop_gracefully_on_sigterm_and_sigint() {
    let examples = std::env::current_exe().unwrap().parent().unwrap().join("../examples");
    for (example, args, signal) in [
        ("echo", vec!["127.0.0.1:0"], "TERM"),
        ("broadcast", vec!["127.0.0.1:0"], "INT"),
        ("interop_server", vec!["--port", "0"], "TERM"),
        ("interop_server", vec!["--port", "0"], "INT"),
    ] {
        let mut child = tokio::process::Command::new(examples.join(example))
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("{example} starts: {err}"));
        let stdout = child.stdout.take().unwrap();
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let port = tokio::time::timeout(common::DEADLINE, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(port) = listening_port(&line) {
                    return port;
                }
            }
            panic!("{example} exited before listening");
        })
        .await
        .expect("listening in time");
        let mut ws = common::connect_ws(&format!("ws://127.0.0.1:{port}/ws")).await;
        let pid = child.id().unwrap().to_string();
        let killed = std::process::Command::new("kill").args([format!("-{signal}"), pid]).status();
        assert!(killed.unwrap().success());
        let close = common::expect_close(&mut ws).await;
        assert_eq!(u16::from(close.code), 1001, "{example} on SIG{signal}");
        let status = tokio::time::timeout(common::DEADLINE, child.wait()).await.unwrap().unwrap();
        assert!(status.success(), "{example} on SIG{signal}: {status}");
    }
}

#[tokio::test]
async fn start_reports_a_port_in_use() {
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = taken.local_addr().unwrap().port();
    let config = NetworkConfig { port, ..test_config() };
    let err = NetworkModule::new(config).start().await.unwrap_err();
    assert!(format!("{err:#}").contains(&format!("cannot bind 127.0.0.1:{port}")), "{err:#}");
}

#[tokio::test]
async fn ac06_ot1_health_reports_state_connections_in_flight_and_uptime() {
    let server = TestServer::start(test_config()).await;
    let a = server.ws().await;
    let b = server.ws().await;

    let response = http().get(server.url("/health")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: serde_json::Value = response.json().await.unwrap();
    let report: HealthReport = serde_json::from_value(body.clone()).unwrap();
    assert_eq!(report.state, "ready");
    assert_eq!(report.connections, 2);
    assert_eq!(report.in_flight, 0);
    assert!(body["uptime_secs"].is_u64(), "{body}");
    drop((a, b));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn ac07_ot2_liveness_always_ok_and_readiness_follows_the_state() {
    // Serve the router without `serve()` so the state can be observed while still Starting.
    let module = NetworkModule::new(test_config());
    let controller = module.shutdown_controller();
    let router = module.build_router();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    let status = |path: &'static str| async move {
        http().get(format!("http://{addr}{path}")).send().await.unwrap().status().as_u16()
    };

    assert_eq!(controller.health_state(), HealthState::Starting);
    assert_eq!((status("/health/live").await, status("/health/ready").await), (200, 503));
    controller.set_ready();
    assert_eq!((status("/health/live").await, status("/health/ready").await), (200, 200));
    controller.trigger_shutdown();
    assert_eq!((status("/health/live").await, status("/health/ready").await), (200, 503));
    controller.set_stopped();
    assert_eq!((status("/health/live").await, status("/health/ready").await), (200, 503));
    server.abort();
}

/// Holds every `on_message` call until the test releases a permit.
struct Gate(Arc<Semaphore>);

#[async_trait::async_trait]
impl InboundHandler for Gate {
    async fn on_message(&self, _conn: &Arc<ConnectionHandle>, _payload: Bytes) {
        self.0.acquire().await.unwrap().forget();
    }
}

#[tokio::test]
async fn health_in_flight_counts_handler_calls_in_progress() {
    let gate = Arc::new(Semaphore::new(0));
    let server = TestServer::with_handler(test_config(), Gate(Arc::clone(&gate))).await;
    let mut client = server.ws().await;
    send_binary(&mut client, vec![1_u8]).await;

    let controller = Arc::clone(&server.controller);
    eventually("handler call in flight", || controller.in_flight_count() == 1).await;
    let report: HealthReport =
        http().get(server.url("/health")).send().await.unwrap().json().await.unwrap();
    assert_eq!(report.in_flight, 1);

    gate.add_permits(1);
    eventually("handler call finished", || controller.in_flight_count() == 0).await;
    drop(client);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn uptime_is_reported_in_whole_seconds_from_construction() {
    let server = TestServer::start(test_config()).await;
    let started = std::time::Instant::now();
    let report: HealthReport =
        http().get(server.url("/health")).send().await.unwrap().json().await.unwrap();
    assert!(Duration::from_secs(report.uptime_secs) <= started.elapsed() + Duration::from_secs(1));
    server.stop().await.unwrap();
}
