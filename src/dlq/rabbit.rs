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

/// What every DLQ connection declares: the two exchanges and, per route, the queues with
/// the same arguments (a queue declared twice with different arguments is refused).
#[derive(Debug, Clone)]
pub struct Topology {
    pub exchange: String,
    pub results_exchange: String,
    /// `x-delivery-limit` of the route queue: past it the broker dead-letters the message
    /// to the parked queue instead of dropping it (RabbitMQ 4 defaults quorum queues to 20).
    pub delivery_limit: u32,
}

/// One connection with one confirm-mode channel, and the topology it has declared.
pub struct Link {
    pub conn: Connection,
    pub channel: Channel,
    declared: HashSet<String>,
    topology: Topology,
}

impl Link {
    /// Connects to a reachable node (failing over, see `amqp::Connector`); the route
    /// queues are declared again on first use, so a new node gets the whole topology.
    pub async fn connect(
        connector: &mut crate::amqp::Connector,
        topology: &Topology,
    ) -> Result<Link, RabbitError> {
        let exchanges = [
            topology.exchange.as_str(),
            topology.results_exchange.as_str(),
        ];
        let (conn, channel) = connector.connect(&exchanges).await?;
        Ok(Link {
            conn,
            channel,
            declared: HashSet::new(),
            topology: topology.clone(),
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
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        for q in [parked_name(route), results_queue_name(route)] {
            self.channel
                .queue_declare(q.as_str().into(), durable, quorum())
                .await?;
        }
        let args = self.route_queue_args(route);
        let queue = queue_name(route);
        match self
            .channel
            .queue_declare(queue.as_str().into(), durable, args)
            .await
        {
            Ok(_) => {}
            Err(e) if precondition_failed(&e) => {
                // Declared by an older breakwater (without the delivery limit or the
                // single active consumer) or with another dlq.delivery_limit: the broker
                // keeps the old arguments and closed this channel. Keep working with the
                // queue as it is and say what to do (see README, "Upgrading the DLQ queues").
                tracing::error!(queue, "the DLQ queue exists with other arguments (an older breakwater: no x-single-active-consumer, so every sidecar replays at replay_rate_per_s on its own, and maybe no x-delivery-limit / dead-lettering to the parked queue; or another dlq.delivery_limit): recreate the queue (README: Upgrading the DLQ queues)");
                self.channel = self.conn.create_channel().await?;
                self.channel
                    .confirm_select(lapin::options::ConfirmSelectOptions::default())
                    .await?;
            }
            Err(e) => return Err(e.into()),
        }
        // Results are published mandatory: a durable queue keeps them until Magento's
        // consumer takes them, so a result is never dropped for want of a binding.
        self.channel
            .queue_bind(
                results_queue_name(route).as_str().into(),
                self.topology.results_exchange.as_str().into(),
                result_key(route).as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.channel
            .queue_bind(
                queue_name(route).as_str().into(),
                self.topology.exchange.as_str().into(),
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
        &self.topology.exchange
    }

    pub fn results_exchange(&self) -> &str {
        &self.topology.results_exchange
    }

    /// Quorum, single active consumer, with an explicit delivery limit, dead-lettering (at
    /// least once) to the route's parked queue through the default exchange.
    fn route_queue_args(&self, route: &str) -> FieldTable {
        let mut args = quorum();
        let limit = i64::from(self.topology.delivery_limit);
        args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(limit));
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(parked_name(route).as_str().into()),
        );
        args.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
        // at-least-once dead-lettering requires reject-publish overflow.
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        // One consumer at a time across the fleet: the route's replay pace holds for all
        // sidecars together; when the active consumer goes, the broker hands the queue (and
        // its unacked messages) to the next one. A queue argument only: no policy sets it.
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        args
    }
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

/// The broker refused a declare because the queue exists with other arguments (406).
fn precondition_failed(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(a) if a.get_id() == 406)
}
