//! Topics against a scan: a topic's subscribers reached through `Topics::publish`, and the
//! same subscribers reached through `broadcast_to` with a predicate, first with no other
//! connection open and then with many others idle beside them. The publish's cost should not
//! move with the others; the scan's grows with them.
//!
//! The server times each call itself (`COMPARE_TOPIC` in `bench-server`), alternating the two
//! paths, with a pause between calls so each one writes to idle sockets the same way; every
//! subscriber counts what it received of each.

use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use topgun_server::network::decode_frame_shared;

use crate::{Row, Server, Ws, connect_many, connect_one, wait_for_connections, wait_for_time_wait};

/// What the scenario runs.
pub(crate) struct Plan {
    pub(crate) subscribers: usize,
    pub(crate) others: usize,
    pub(crate) publishes: u32,
    pub(crate) size: usize,
}

const TOPIC: &str = "bench/topic";
/// Pause between two calls: each then follows a pause, as a paced publish does.
const INTERVAL_MS: u64 = 2;

#[derive(serde::Deserialize)]
struct Timings {
    publish_ns: Vec<u64>,
    scan_ns: Vec<u64>,
    publish_queued: usize,
    scan_queued: usize,
    connections: usize,
}

pub(crate) async fn topics(plan: &Plan) -> anyhow::Result<Vec<Row>> {
    wait_for_time_wait(plan.subscribers + plan.others).await;
    let server = Server::transport().await?;
    let (mut subscribers, _) = connect_many(server.port, plan.subscribers).await?;
    let subscribe =
        rmp_serde::to_vec_named(&serde_json::json!({ "type": "SUBSCRIBE", "topic": TOPIC }))?;
    for ws in &mut subscribers {
        ws.send(Message::Binary(subscribe.clone().into())).await?;
        next_binary(ws).await.context("subscription acknowledged")?;
    }
    // Each subscriber counts what reaches it through each path, for both measurements.
    let expected = usize::try_from(plan.publishes)? * 2;
    let receivers: Vec<_> =
        subscribers.into_iter().map(|ws| tokio::spawn(count_received(ws, expected * 2))).collect();
    let mut control = connect_one(server.port, plan.subscribers + plan.others).await?;
    let mut rows = vec![measure(&mut control, plan, 0).await?];
    let (others, _) = connect_many(server.port, plan.others).await?;
    wait_for_connections(server.port, plan.subscribers + plan.others + 1).await?;
    rows.push(measure(&mut control, plan, plan.others).await?);
    let mut through_topic = 0;
    let mut through_scan = 0;
    for receiver in receivers {
        let (topic, scan) = receiver.await??;
        through_topic += topic;
        through_scan += scan;
    }
    let wanted = expected * plan.subscribers;
    drop(others);
    server.stop().await?;
    if through_topic != wanted || through_scan != wanted {
        bail!("delivered {through_topic} / {through_scan} of {wanted} through topic / scan");
    }
    let ratio = |name: &str| -> anyhow::Result<f64> {
        let of = |row: &Row| row.figure(name).context("figure");
        Ok((of(&rows[1])? / of(&rows[0])? * 100.0).round() / 100.0)
    };
    let summary = Row::new("topics: with others over without")
        .with("others", plan.others)
        .with("publish_p50_ratio", ratio("publish_p50_us")?)
        .with("scan_p50_ratio", ratio("scan_p50_us")?)
        .with("delivered_through_topic", through_topic)
        .with("delivered_through_scan", through_scan);
    rows.push(summary);
    Ok(rows)
}

/// Asks the server for one comparison and turns its timings into a row.
async fn measure(control: &mut Ws, plan: &Plan, others: usize) -> anyhow::Result<Row> {
    let request = serde_json::json!({
        "type": "COMPARE_TOPIC",
        "topic": TOPIC,
        "count": plan.publishes,
        "size": plan.size,
        "interval_ms": INTERVAL_MS,
    });
    control.send(Message::Binary(rmp_serde::to_vec_named(&request)?.into())).await?;
    let answer = next_binary(control).await.context("the server's timings")?;
    let timings: Timings = rmp_serde::from_slice(&answer)?;
    let calls = usize::try_from(plan.publishes)?;
    if timings.publish_queued != calls * plan.subscribers
        || timings.scan_queued != calls * plan.subscribers
    {
        bail!(
            "queued {} / {} of {} through topic / scan",
            timings.publish_queued,
            timings.scan_queued,
            calls * plan.subscribers
        );
    }
    let (publish_p50, publish_p90) = quantiles(timings.publish_ns);
    let (scan_p50, scan_p90) = quantiles(timings.scan_ns);
    Ok(Row::new("topics")
        .with("subscribers", plan.subscribers)
        .with("other_connections", others)
        .with("server_connections", timings.connections)
        .with("calls_each", calls)
        .with("publish_p50_us", publish_p50)
        .with("publish_p90_us", publish_p90)
        .with("scan_p50_us", scan_p50)
        .with("scan_p90_us", scan_p90))
}

/// The median and 90th percentile of `nanos`, in microseconds to a tenth.
#[allow(clippy::cast_precision_loss)] // figures for display
fn quantiles(mut nanos: Vec<u64>) -> (f64, f64) {
    nanos.sort_unstable();
    let at = |p: f64| {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let index = ((nanos.len().saturating_sub(1)) as f64 * p).round() as usize;
        (nanos.get(index).copied().unwrap_or(0) as f64 / 100.0).round() / 10.0
    };
    (at(0.5), at(0.9))
}

/// The next binary frame, within ten seconds.
async fn next_binary(ws: &mut Ws) -> anyhow::Result<bytes::Bytes> {
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), ws.next()).await?;
        match next.context("closed")?? {
            Message::Binary(bytes) => return Ok(bytes),
            Message::Close(_) => bail!("closed"),
            _ => {}
        }
    }
}

/// Counts the messages reaching a subscriber through the topic and through the scan, until
/// `expected` have arrived or nothing has for ten seconds.
async fn count_received(mut ws: Ws, expected: usize) -> anyhow::Result<(usize, usize)> {
    let (mut topic, mut scan) = (0, 0);
    while topic + scan < expected {
        let Ok(frame) = next_binary(&mut ws).await else { break };
        for message in decode_frame_shared(&frame).unwrap_or_default() {
            match message.get(12) {
                Some(0) => topic += 1,
                Some(1) => scan += 1,
                _ => {}
            }
        }
    }
    Ok((topic, scan))
}
