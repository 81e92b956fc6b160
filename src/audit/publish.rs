//! Optional copies of the decision log's lines to a RabbitMQ exchange (topic, durable;
//! `breakwater.audit` by default) for central collection.
//!
//! The file stays the record of truth. The writer offers a line only once it is fsync'd
//! and never waits for the broker: a full buffer counts the line in
//! `breakwater_audit_publish_dropped_total` (a collector fills gaps from the file; the
//! hash chain shows where they are). Lines are published persistent, in order, with
//! publisher confirms; what was not confirmed is published again after a reconnect
//! (at least once: a collector de-duplicates by `seq` and `hash`).

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::amqp::{reconnect_delay, AmqpError, Connector};
use crate::config::AuditPublishConfig;
use crate::telemetry;

/// Routing key of every line: collectors bind `audit.#`.
pub const ROUTING_KEY: &str = "audit.record";
/// Lines published before their confirms are awaited together.
const BATCH: usize = 256;
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// The writer's side: hands over written lines without waiting.
#[derive(Clone, Debug)]
pub struct AuditPublisher {
    tx: mpsc::Sender<Bytes>,
}

impl AuditPublisher {
    /// Starts the publishing task on the current runtime; it stops with `stop`.
    pub fn start(
        config: AuditPublishConfig,
        instance: String,
        connections: crate::amqp::Connections,
        stop: CancellationToken,
    ) -> (AuditPublisher, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(config.buffer.max(1));
        let connector = Connector::new(
            config.url.clone(),
            "audit_publisher",
            format!("breakwater-audit-{instance}"),
            connections,
        );
        let task = tokio::spawn(run(config, instance, connector, rx, stop));
        (AuditPublisher { tx }, task)
    }

    /// Offers one written line (without its newline). Never waits.
    pub fn offer(&self, line: Bytes) {
        if self.tx.try_send(line).is_err() {
            metrics::counter!(telemetry::AUDIT_PUBLISH_DROPPED).increment(1);
        }
    }
}

async fn run(
    config: AuditPublishConfig,
    instance: String,
    mut connector: Connector,
    mut rx: mpsc::Receiver<Bytes>,
    stop: CancellationToken,
) {
    // Taken from the buffer but not yet confirmed by the broker.
    let mut pending: VecDeque<Bytes> = VecDeque::new();
    let mut attempt = 0;
    loop {
        let exchanges = [config.exchange.as_str()];
        let connected = tokio::select! {
            _ = stop.cancelled() => return,
            c = connector.connect(&exchanges) => c,
        };
        let (conn, channel) = match connected {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, exchange = %config.exchange, "cannot reach RabbitMQ for the decision log copies; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(reconnect_delay(attempt)) => {}
                }
                attempt = attempt.saturating_add(1);
                continue;
            }
        };
        attempt = 0;
        loop {
            if pending.is_empty() {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    line = rx.recv() => match line {
                        Some(line) => pending.push_back(line),
                        None => return,
                    },
                }
            }
            while pending.len() < BATCH {
                match rx.try_recv() {
                    Ok(line) => pending.push_back(line),
                    Err(_) => break,
                }
            }
            match publish(&channel, &config.exchange, &instance, &pending).await {
                Ok(()) => {
                    metrics::counter!(telemetry::AUDIT_PUBLISHED).increment(pending.len() as u64);
                    pending.clear();
                }
                Err(e) => {
                    tracing::warn!(error = %e, lines = pending.len(), "decision log copies not confirmed; reconnecting to publish them again");
                    break;
                }
            }
        }
        // Bounded: a half-dead connection must not hold the reconnect.
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            conn.close(200, "reconnecting".into()),
        )
        .await;
        connector.lost();
    }
}

/// Publishes the lines in order, then waits (bounded) for every confirm.
async fn publish(
    channel: &Channel,
    exchange: &str,
    instance: &str,
    lines: &VecDeque<Bytes>,
) -> Result<(), AmqpError> {
    let mut confirms = Vec::with_capacity(lines.len());
    for line in lines {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_app_id(instance.into());
        confirms.push(
            channel
                .basic_publish(
                    exchange.into(),
                    ROUTING_KEY.into(),
                    BasicPublishOptions::default(),
                    line,
                    props,
                )
                .await?,
        );
    }
    for confirm in confirms {
        crate::amqp::confirmed(confirm, CONFIRM_TIMEOUT).await?;
    }
    Ok(())
}
