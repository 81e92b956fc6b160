//! RabbitMQ through lapin: connection with capped, jittered reconnect backoff, topology
//! declared on every (re)connect, persistent mandatory publishes with publisher confirms
//! (an unroutable return or a nack is a failure; every confirm wait has a timeout).

use std::collections::HashSet;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};

pub use crate::amqp::reconnect_delay;
/// The DLQ's RabbitMQ errors are the shared helper's.
pub type RabbitError = crate::amqp::AmqpError;

pub fn queue_name(route: &str) -> String {
    format!("breakwater.dlq.{route}")
}

pub fn parked_name(route: &str) -> String {
    format!("breakwater.dlq.{route}.parked")
}

/// Where replay results wait for Magento when nobody bound a queue of their own.
pub fn results_queue_name(route: &str) -> String {
    format!("breakwater.results.{route}")
}

pub fn replay_key(route: &str) -> String {
    format!("ai.replay.{route}")
}

pub fn result_key(route: &str) -> String {
    format!("ai.result.{route}")
}

/// One connection with one confirm-mode channel, and the topology it has declared.
pub struct Link {
    pub conn: Connection,
    pub channel: Channel,
    declared: HashSet<String>,
    exchange: String,
    results_exchange: String,
}

impl Link {
    pub async fn connect(
        url: &str,
        exchange: &str,
        results_exchange: &str,
        name: &str,
    ) -> Result<Link, RabbitError> {
        let (conn, channel) =
            crate::amqp::connect(url, name, &[exchange, results_exchange]).await?;
        Ok(Link {
            conn,
            channel,
            declared: HashSet::new(),
            exchange: exchange.to_string(),
            results_exchange: results_exchange.to_string(),
        })
    }

    pub fn healthy(&self) -> bool {
        self.conn.status().connected() && self.channel.status().connected()
    }

    pub fn blocked(&self) -> bool {
        self.conn.status().blocked()
    }

    /// The route's quorum queue and parked queue, bound to the DLQ exchange.
    pub async fn declare_route(&mut self, route: &str) -> Result<(), RabbitError> {
        if self.declared.contains(route) {
            return Ok(());
        }
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        for q in [
            queue_name(route),
            parked_name(route),
            results_queue_name(route),
        ] {
            self.channel
                .queue_declare(q.as_str().into(), durable, args.clone())
                .await?;
        }
        // Results are published mandatory: a durable queue keeps them until Magento's
        // consumer takes them, so a result is never dropped for want of a binding.
        self.channel
            .queue_bind(
                results_queue_name(route).as_str().into(),
                self.results_exchange.as_str().into(),
                result_key(route).as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.channel
            .queue_bind(
                queue_name(route).as_str().into(),
                self.exchange.as_str().into(),
                replay_key(route).as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.declared.insert(route.to_string());
        Ok(())
    }

    /// Sends a persistent, mandatory publish; the returned confirm is awaited with
    /// `confirmed`. Splitting the two lets the drainer pipeline many publishes.
    pub async fn start_publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        msg_id: &str,
        headers: FieldTable,
    ) -> Result<lapin::PublisherConfirm, RabbitError> {
        if self.blocked() {
            return Err(RabbitError::Blocked);
        }
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(msg_id.into())
            .with_headers(headers);
        Ok(self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                payload,
                props,
            )
            .await?)
    }

    /// Waits (bounded) for one confirm: an unroutable return or a nack is a failure.
    pub async fn confirmed(
        confirm: lapin::PublisherConfirm,
        timeout: Duration,
    ) -> Result<(), RabbitError> {
        crate::amqp::confirmed(confirm, timeout).await
    }

    /// Publishes and waits (bounded) for the broker's confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        msg_id: &str,
        headers: FieldTable,
        timeout: Duration,
    ) -> Result<(), RabbitError> {
        let confirm = self
            .start_publish(exchange, routing_key, payload, msg_id, headers)
            .await?;
        Self::confirmed(confirm, timeout).await
    }

    pub fn dlq_exchange(&self) -> &str {
        &self.exchange
    }

    pub fn results_exchange(&self) -> &str {
        &self.results_exchange
    }
}
