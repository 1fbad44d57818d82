//! What the small examples (`echo`, `broadcast`) share: their configuration from a
//! `HOST:PORT` argument and the environment variables the `topgun-server` binary reads for
//! the same settings.

use topgun_server::network::{DeflateConfig, NetworkConfig};

/// `HOST:PORT` (default `127.0.0.1:8080`), with, as the binary reads them:
/// `TOPGUN_PERMESSAGE_DEFLATE` (any value but empty, `0`, `false`, `no`, `off`),
/// `TOPGUN_DEFLATE_THRESHOLD` and `TOPGUN_MAX_MESSAGE_SIZE` (inbound message and frame limit;
/// the echo's outbound limit follows it, so whatever is accepted can be echoed).
pub fn config_from_args() -> anyhow::Result<NetworkConfig> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:8080".to_owned());
    let (host, port) =
        addr.rsplit_once(':').ok_or_else(|| anyhow::anyhow!("expected HOST:PORT"))?;
    let mut config =
        NetworkConfig { host: host.to_owned(), port: port.parse()?, ..Default::default() };
    let var = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
    let on = var("TOPGUN_PERMESSAGE_DEFLATE").is_some_and(|value| {
        !matches!(value.to_ascii_lowercase().as_str(), "0" | "false" | "no" | "off")
    });
    if on {
        let mut deflate = DeflateConfig::default();
        if let Some(threshold) = var("TOPGUN_DEFLATE_THRESHOLD") {
            deflate.threshold = threshold.parse()?;
        }
        config.connection.permessage_deflate = Some(deflate);
    }
    if let Some(limit) = var("TOPGUN_MAX_MESSAGE_SIZE") {
        let limit: usize = limit.parse()?;
        config.connection.max_message_size = limit;
        config.connection.max_frame_size = limit;
        config.connection.max_outbound_message_size = limit;
    }
    Ok(config)
}
