//! HTTPS and WSS: certificates made at test time with rcgen, mutual TLS, rotation, and clear
//! failures for bad certificate files.

use topgun_test_support as common;

use std::sync::Arc;
use std::time::Duration;

use common::certs::{TestCa, TlsFiles};
use common::{EchoHandler, TestServer, connect_wss, next_frame, send_binary, test_config};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use topgun_server::network::{
    ConnectionKind, NetworkConfig, NetworkModule, ShutdownConfig, TlsConfig,
};

fn tls_config(files: &TlsFiles) -> NetworkConfig {
    NetworkConfig { tls: Some(files.config.clone()), ..test_config() }
}

/// A CA, a certificate with serial 1 on disk, and an echo server using it. Keep the files
/// alive as long as the server.
async fn echo_tls_server() -> (TestCa, TlsFiles, TestServer) {
    echo_tls_server_with(|config| config).await
}

/// [`echo_tls_server`] with its configuration adjusted by `adjust`.
async fn echo_tls_server_with(
    adjust: impl FnOnce(NetworkConfig) -> NetworkConfig,
) -> (TestCa, TlsFiles, TestServer) {
    let ca = TestCa::new("test CA");
    let files = TlsFiles::write(&ca.server_cert(1), None);
    let module = NetworkModule::new(adjust(tls_config(&files))).with_handler(EchoHandler);
    let server =
        TestServer::from_module_with_client_tls(module, Some(ca.client_config(None))).await;
    (ca, files, server)
}

type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

/// Completes a TLS handshake with `config` as `localhost`.
async fn tls_connect(
    server: &TestServer,
    config: rustls::ClientConfig,
) -> std::io::Result<ClientTls> {
    let tcp = TcpStream::connect(server.addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await
}

/// Sends `GET /health/live` over an HTTP/1.1 TLS stream and checks for `200`. With TLS 1.3 a
/// refused client certificate only shows here, on the first read.
async fn get_live(mut tls: ClientTls) -> std::io::Result<()> {
    tls.write_all(b"GET /health/live HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    tls.read_to_end(&mut response).await?;
    if response.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "unexpected answer: {:?}",
            String::from_utf8_lossy(&response)
        )))
    }
}

/// The serial number of the certificate a new handshake is served.
async fn served_serial(server: &TestServer, ca: &TestCa) -> u64 {
    let tls = tls_connect(server, (*ca.client_config(None)).clone()).await.unwrap();
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    serial_of(&leaf)
}

fn serial_of(der: &[u8]) -> u64 {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    u64::try_from(cert.serial.clone()).unwrap()
}

#[tokio::test]
async fn https_serves_health() {
    let (_ca, _files, server) = echo_tls_server().await;
    let response = server.http().get(server.url("/health")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["state"], "ready");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn wss_clients_exchange_binary_messages_and_receive_broadcasts() {
    let (_ca, _files, server) = echo_tls_server().await;
    let mut first = server.ws().await;
    let mut second = server.ws().await;

    send_binary(&mut first, vec![0x92, 1, 2]).await;
    assert_eq!(next_frame(&mut first).await.as_ref(), [0x92, 1, 2], "echoed over wss");
    let outcome = server.registry.broadcast(b"to all".to_vec(), ConnectionKind::Client);
    assert_eq!(outcome.queued, 2);
    assert_eq!(next_frame(&mut first).await.as_ref(), b"to all");
    assert_eq!(next_frame(&mut second).await.as_ref(), b"to all");
    drop((first, second));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn tls_1_2_and_1_3_are_offered_with_alpn_for_http_1_1_and_h2() {
    let (ca, _files, server) = echo_tls_server().await;
    for (version, expected) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let tls = tls_connect(&server, ca.client_config_for(&[version], &[b"http/1.1"], None))
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.protocol_version(), Some(expected));
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        get_live(tls).await.unwrap();
    }
    let h2 = tls_connect(
        &server,
        ca.client_config_for(rustls::DEFAULT_VERSIONS, &[b"h2", b"http/1.1"], None),
    )
    .await
    .unwrap();
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    drop(h2);
    server.stop().await.unwrap();
}

fn mtls_files(ca: &TestCa) -> TlsFiles {
    TlsFiles::write(&ca.server_cert(1), Some(ca))
}

#[tokio::test]
async fn mtls_accepts_a_client_certificate_signed_by_the_configured_ca() {
    let ca = TestCa::new("test CA");
    let files = mtls_files(&ca);
    let identity = ca.client_cert("node-2");
    let module = NetworkModule::new(tls_config(&files)).with_handler(EchoHandler);
    let server =
        TestServer::from_module_with_client_tls(module, Some(ca.client_config(Some(&identity))))
            .await;

    let response = server.http().get(server.url("/health")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut ws = server.ws().await;
    send_binary(&mut ws, b"peer hello".to_vec()).await;
    assert_eq!(next_frame(&mut ws).await.as_ref(), b"peer hello");
    drop(ws);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn mtls_refuses_clients_without_a_certificate_or_with_one_from_another_ca() {
    let ca = TestCa::new("test CA");
    let files = mtls_files(&ca);
    let trusted = ca.client_cert("node-2");
    let module = NetworkModule::new(tls_config(&files));
    let server =
        TestServer::from_module_with_client_tls(module, Some(ca.client_config(Some(&trusted))))
            .await;

    let anonymous = ca.client_config_for(rustls::DEFAULT_VERSIONS, &[b"http/1.1"], None);
    let stranger_ca = TestCa::new("someone else's CA");
    let stranger = ca.client_config_for(
        rustls::DEFAULT_VERSIONS,
        &[b"http/1.1"],
        Some(&stranger_ca.client_cert("intruder")),
    );
    for (who, config) in [("no certificate", anonymous), ("foreign certificate", stranger)] {
        let refused = match tls_connect(&server, config).await {
            Ok(tls) => get_live(tls).await,
            Err(err) => Err(err),
        };
        assert!(refused.is_err(), "{who} must be refused");
    }
    let wss = connect_wss(&server.ws_url(), ca.client_config(None)).await;
    assert!(wss.is_err(), "a wss client without a certificate is refused");

    let trusted_answer = server.http().get(server.url("/health/ready")).send().await.unwrap();
    assert_eq!(trusted_answer.status(), 200, "refusals do not disturb trusted clients");
    // Each refused handshake is counted: no certificate, a foreign one, the wss attempt.
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    loop {
        let metrics = server.http().get(server.url("/metrics")).send().await.unwrap();
        let text = metrics.text().await.unwrap();
        if common::sample(&text, "topgun_tls_handshake_failures_total", &[]) == "3" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "failures not counted:\n{text}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn plain_http_on_the_tls_port_fails_cleanly_without_disturbing_others() {
    let (_ca, _files, server) = echo_tls_server().await;
    let mut ws = server.ws().await;

    let mut plain = TcpStream::connect(server.addr).await.unwrap();
    plain.write_all(b"GET /health HTTP/1.1\r\nhost: localhost\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let read =
        tokio::time::timeout(common::DEADLINE, plain.read_to_end(&mut answer)).await.unwrap();
    assert!(!answer.starts_with(b"HTTP/1.1 200"), "plain HTTP must not be served: {read:?}");

    send_binary(&mut ws, b"still fine".to_vec()).await;
    assert_eq!(next_frame(&mut ws).await.as_ref(), b"still fine");
    assert_eq!(server.http().get(server.url("/health/ready")).send().await.unwrap().status(), 200);
    drop(ws);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn reload_serves_the_new_certificate_and_keeps_open_connections() {
    let ca = TestCa::new("test CA");
    let files = TlsFiles::write(&ca.server_cert(1), None);
    let mut module = NetworkModule::new(tls_config(&files)).with_handler(EchoHandler);
    module.start().await.unwrap();
    let reloader = module.tls_reloader().expect("TLS is configured");
    let server =
        TestServer::from_module_with_client_tls(module, Some(ca.client_config(None))).await;
    let mut before = server.ws().await;
    assert_eq!(served_serial(&server, &ca).await, 1);

    files.replace(&ca.server_cert(2));
    reloader.reload().unwrap();

    assert_eq!(served_serial(&server, &ca).await, 2, "new handshakes get the new certificate");
    send_binary(&mut before, b"same socket".to_vec()).await;
    assert_eq!(
        next_frame(&mut before).await.as_ref(),
        b"same socket",
        "open connections stay open"
    );
    drop(before);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_failed_reload_names_the_file_and_keeps_the_current_certificate() {
    let ca = TestCa::new("test CA");
    let files = TlsFiles::write(&ca.server_cert(1), None);
    let mut module = NetworkModule::new(tls_config(&files));
    module.start().await.unwrap();
    let reloader = module.tls_reloader().unwrap();
    let server =
        TestServer::from_module_with_client_tls(module, Some(ca.client_config(None))).await;

    std::fs::write(&files.config.cert_path, "not a certificate").unwrap();
    let err = reloader.reload().unwrap_err().to_string();
    assert!(err.contains(&files.config.cert_path.display().to_string()), "{err}");
    assert!(err.contains("no PEM certificate"), "{err}");
    assert_eq!(served_serial(&server, &ca).await, 1);
    server.stop().await.unwrap();
}

async fn start_error(tls: TlsConfig) -> String {
    let mut module = NetworkModule::new(NetworkConfig { tls: Some(tls), ..test_config() });
    let controller = module.shutdown_controller();
    let err = format!("{:#}", module.start().await.unwrap_err());
    assert_eq!(
        controller.health_state(),
        topgun_server::network::HealthState::Starting,
        "never ready"
    );
    err
}

#[tokio::test]
async fn bad_certificate_files_fail_start_with_a_message_naming_file_and_problem() {
    let ca = TestCa::new("test CA");
    let files = TlsFiles::write(&ca.server_cert(1), None);
    let path = |name: &str| files.dir.path().join(name);

    let missing = TlsConfig { cert_path: path("absent.pem"), ..files.config.clone() };
    let err = start_error(missing).await;
    assert!(
        err.contains("cannot read TLS certificate file") && err.contains("absent.pem"),
        "{err}"
    );

    std::fs::write(path("empty.pem"), "-----BEGIN NOTHING-----\n-----END NOTHING-----\n").unwrap();
    let no_cert = TlsConfig { cert_path: path("empty.pem"), ..files.config.clone() };
    let err = start_error(no_cert).await;
    assert!(err.contains("empty.pem") && err.contains("no PEM certificate"), "{err}");

    std::fs::write(path("other.key"), ca.server_cert(9).key_pem).unwrap();
    let mismatched = TlsConfig { key_path: path("other.key"), ..files.config.clone() };
    let err = start_error(mismatched).await;
    assert!(err.contains("do not work together") && err.contains("other.key"), "{err}");

    std::fs::write(path("garbage.key"), "hello").unwrap();
    let bad_key = TlsConfig { key_path: path("garbage.key"), ..files.config.clone() };
    let err = start_error(bad_key).await;
    assert!(err.contains("garbage.key") && err.contains("private key"), "{err}");

    let missing_ca = TlsConfig { ca_cert_path: Some(path("no-ca.pem")), ..files.config.clone() };
    let err = start_error(missing_ca).await;
    assert!(err.contains("client CA") && err.contains("no-ca.pem"), "{err}");
}

#[tokio::test]
async fn graceful_shutdown_over_tls() {
    let ca = TestCa::new("test CA");
    let files = TlsFiles::write(&ca.server_cert(1), None);
    let config = NetworkConfig {
        shutdown: ShutdownConfig { grace_period: Duration::from_secs(2), ..Default::default() },
        ..tls_config(&files)
    };
    let module = NetworkModule::new(config);
    let server =
        TestServer::from_module_with_client_tls(module, Some(ca.client_config(None))).await;
    common::graceful_shutdown_scenario(server).await;
}

#[tokio::test]
async fn pending_tls_handshakes_do_not_hold_up_a_shutdown() {
    let (ca, _files, server) = echo_tls_server_with(|config| NetworkConfig {
        shutdown: ShutdownConfig { drain_timeout: Duration::from_secs(8), ..Default::default() },
        ..config
    })
    .await;
    // One connection that says nothing, one that stops halfway through its ClientHello.
    let _silent = TcpStream::connect(server.addr).await.unwrap();
    let mut half = TcpStream::connect(server.addr).await.unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03])
        .await
        .unwrap();
    // The server has accepted both (a finished handshake proves the accept loop got past them).
    served_serial(&server, &ca).await;

    let started = std::time::Instant::now();
    server.stop().await.unwrap();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "shutdown waited {took:?} for handshakes that never end"
    );
}

#[tokio::test]
async fn a_handshake_slower_than_the_tls_handshake_timeout_is_dropped() {
    let (_ca, _files, server) = echo_tls_server_with(|config| NetworkConfig {
        tls_handshake_timeout: Duration::from_millis(300),
        ..config
    })
    .await;
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = [0_u8; 1];
    let read = tokio::time::timeout(common::DEADLINE, silent.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "the server closed the silent connection: {read:?}"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn the_proxy_protocol_header_comes_before_tls() {
    let (ca, _files, server) =
        echo_tls_server_with(|config| NetworkConfig { proxy_protocol: true, ..config }).await;
    let client: std::net::SocketAddr = "203.0.113.9:51000".parse().unwrap();
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(&common::proxy_v2(client, server.addr)).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(ca.client_config(None));
    let name = ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.expect("TLS after the PROXY header");
    get_live(tls).await.unwrap();

    let without = tls_connect(&server, (*ca.client_config(None)).clone()).await;
    assert!(without.is_err(), "a TLS hello where the header belongs is refused");
    server.stop().await.unwrap();
}
