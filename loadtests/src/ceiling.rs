//! `loadtests rabbit-ceiling`: what RabbitMQ itself confirms per second on this machine for
//! breakwater's dead letters, with a minimal lapin publisher and nothing else in the way.
//! It is the yardstick for the drainer (spool -> RabbitMQ): same message size, persistent,
//! mandatory, publisher confirms, a quorum queue declared with the DLQ queue's arguments and
//! bound to the DLQ exchange the same way, and a sliding window of outstanding confirms.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::Context;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties, ExchangeKind};

/// What to measure.
#[derive(Debug, Clone)]
pub struct CeilingArgs {
    pub amqp_url: String,
    /// Messages per window size.
    pub messages: u64,
    /// Outstanding confirms at most, one run each.
    pub windows: Vec<usize>,
    /// The DLQ exchange (breakwater's `dlq.exchange`).
    pub exchange: String,
    /// Size of the request body the representative dead letter carries.
    pub body_bytes: usize,
}

/// One run: a window size and what it reached.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CeilingRow {
    pub window: usize,
    pub messages: u64,
    pub seconds: f64,
    pub per_s: f64,
}

/// A dead letter shaped like the one breakwater spools for a `body_bytes` JSON request body
/// (`Envelope` in src/dlq/envelope.rs: the same fields, the body base64-encoded).
pub fn representative_envelope(route: &str, body_bytes: usize, n: u64) -> Vec<u8> {
    let body_b64_len = body_bytes.div_ceil(3) * 4;
    serde_json::json!({
        "msg_id": format!("0193a1b2-c3d4-7e5f-8a9b-{n:012x}"),
        "route": route,
        "request_id": format!("0193a1b2-c3d4-7e5f-9a9b-{n:012x}"),
        "created_at": "2026-12-03T13:10:12.123456Z",
        "reason": "breaker_open",
        "attempts": 0,
        "method": "POST",
        "path": "/v1/grading",
        "query": null,
        "headers": [["content-type", "application/json"], ["x-request-id", format!("0193a1b2-c3d4-7e5f-9a9b-{n:012x}")]],
        "body_b64": "A".repeat(body_b64_len),
        "model_version_requested": null,
    })
    .to_string()
    .into_bytes()
}

/// The route queue's arguments as breakwater declares them (src/dlq/rabbit.rs
/// `route_queue_args`): quorum, delivery limit, at-least-once dead-lettering to the parked
/// queue, reject-publish overflow, single active consumer.
fn route_queue_args(parked: &str) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(20));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(parked.into()),
    );
    args.insert(
        "x-dead-letter-strategy".into(),
        AMQPValue::LongString("at-least-once".into()),
    );
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    args
}

/// Runs every window size on a fresh queue pair (deleted afterwards) and returns the rows.
pub async fn ceiling(args: &CeilingArgs) -> anyhow::Result<Vec<CeilingRow>> {
    anyhow::ensure!(
        args.amqp_url.contains("@127.0.0.1") || args.amqp_url.contains("@localhost"),
        "the ceiling is measured against a loopback broker only, not {}",
        args.amqp_url
    );
    let mut rows = Vec::new();
    for &window in &args.windows {
        rows.push(run_one(args, window.max(1)).await?);
        let last = &rows[rows.len() - 1];
        eprintln!(
            "window {:>5}: {} messages in {:.2} s = {:.0} msgs/s",
            last.window, last.messages, last.seconds, last.per_s
        );
    }
    Ok(rows)
}

async fn run_one(args: &CeilingArgs, window: usize) -> anyhow::Result<CeilingRow> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let route = format!("ceiling-{stamp}-w{window}");
    let queue = format!("breakwater.dlq.{route}");
    let parked = format!("{queue}.parked");
    let key = format!("ai.replay.{route}");
    let props = ConnectionProperties::default().with_connection_name("loadtests-ceiling".into());
    let conn = tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(&args.amqp_url, props),
    )
    .await
    .context("connecting to RabbitMQ timed out")??;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    ch.exchange_declare(
        args.exchange.as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(parked.as_str().into(), durable, quorum)
        .await?;
    ch.queue_declare(queue.as_str().into(), durable, route_queue_args(&parked))
        .await?;
    ch.queue_bind(
        queue.as_str().into(),
        args.exchange.as_str().into(),
        key.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;

    let result = publish_all(&ch, args, &route, &key, window).await;

    for q in [&queue, &parked] {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "done".into()).await;
    let seconds = result?;
    Ok(CeilingRow {
        window,
        messages: args.messages,
        seconds,
        per_s: args.messages as f64 / seconds.max(1e-9),
    })
}

/// Publishes `messages` with at most `window` confirms outstanding; the seconds it took
/// until the last confirm.
async fn publish_all(
    ch: &lapin::Channel,
    args: &CeilingArgs,
    route: &str,
    key: &str,
    window: usize,
) -> anyhow::Result<f64> {
    let confirm_timeout = Duration::from_secs(30);
    let mut in_flight: VecDeque<lapin::PublisherConfirm> = VecDeque::with_capacity(window);
    let started = Instant::now();
    for n in 0..args.messages {
        if in_flight.len() >= window {
            if let Some(c) = in_flight.pop_front() {
                settle(c, confirm_timeout).await?;
            }
        }
        let payload = representative_envelope(route, args.body_bytes, n);
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(format!("ceiling-{n}").into());
        let confirm = ch
            .basic_publish(
                args.exchange.as_str().into(),
                key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &payload,
                props,
            )
            .await?;
        in_flight.push_back(confirm);
    }
    while let Some(c) = in_flight.pop_front() {
        settle(c, confirm_timeout).await?;
    }
    Ok(started.elapsed().as_secs_f64())
}

async fn settle(c: lapin::PublisherConfirm, timeout: Duration) -> anyhow::Result<()> {
    match tokio::time::timeout(timeout, c).await {
        Err(_) => anyhow::bail!("no confirm within {timeout:?}"),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(Confirmation::Ack(None))) | Ok(Ok(Confirmation::NotRequested)) => Ok(()),
        Ok(Ok(Confirmation::Ack(Some(_)))) => anyhow::bail!("returned as unroutable"),
        Ok(Ok(Confirmation::Nack(_))) => anyhow::bail!("nacked"),
    }
}

/// The rows as a Markdown table, the best window marked as the ceiling.
pub fn table(rows: &[CeilingRow], message_bytes: usize) -> String {
    let best = rows
        .iter()
        .map(|r| r.per_s)
        .fold(0.0_f64, |a, b| if b > a { b } else { a });
    let mut out = format!(
        "RabbitMQ ceiling: persistent, mandatory, publisher-confirmed publishes of a {message_bytes} B \
         dead letter to a quorum queue (DLQ arguments) through the DLQ exchange\n\n\
         | window (outstanding confirms) | messages | seconds | msgs/s |\n|---:|---:|---:|---:|\n"
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {:.2} | {:.0}{} |\n",
            r.window,
            r.messages,
            r.seconds,
            r.per_s,
            if r.per_s == best { " (ceiling)" } else { "" }
        ));
    }
    out.push_str(&format!("\nceiling: {best:.0} msgs/s\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_representative_dead_letter_has_the_envelope_fields_and_a_base64_sized_body() {
        let e = representative_envelope("grading-1", 93, 7);
        let v: serde_json::Value = serde_json::from_slice(&e).unwrap();
        assert_eq!(v["body_b64"].as_str().unwrap().len(), 124);
        for k in [
            "msg_id",
            "route",
            "request_id",
            "created_at",
            "headers",
            "method",
        ] {
            assert!(v.get(k).is_some(), "{k}");
        }
    }
}
