//! One way to talk to RabbitMQ for the DLQ and the decision log's copies: a named
//! connection with one confirm-mode channel and its durable topic exchanges declared,
//! bounded confirm waits, and the reconnect backoff. Depends on nothing else in the crate.

use std::time::Duration;

use lapin::options::{ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use rand::Rng;

#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("RabbitMQ did not confirm within {0:?}")]
    ConfirmTimeout(Duration),
    #[error("RabbitMQ returned the message as unroutable")]
    Unroutable,
    #[error("RabbitMQ nacked the message")]
    Nacked,
    #[error("RabbitMQ is blocking publishers (resource alarm)")]
    Blocked,
}

/// Opens a connection named `name` (shown by `rabbitmqctl list_connections`) with one
/// confirm-mode channel, and declares `exchanges` as durable topic exchanges.
pub async fn connect(
    url: &str,
    name: &str,
    exchanges: &[&str],
) -> Result<(Connection, Channel), AmqpError> {
    let props = ConnectionProperties::default().with_connection_name(name.to_string().into());
    let conn = Connection::connect(url, props).await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    for ex in exchanges {
        channel
            .exchange_declare(
                (*ex).into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;
    }
    Ok((conn, channel))
}

/// Waits (bounded) for one publisher confirm: an unroutable return or a nack is a failure.
pub async fn confirmed(
    confirm: lapin::PublisherConfirm,
    timeout: Duration,
) -> Result<(), AmqpError> {
    match tokio::time::timeout(timeout, confirm).await {
        Err(_) => Err(AmqpError::ConfirmTimeout(timeout)),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(Confirmation::Ack(None))) | Ok(Ok(Confirmation::NotRequested)) => Ok(()),
        Ok(Ok(Confirmation::Ack(Some(_)))) => Err(AmqpError::Unroutable),
        Ok(Ok(Confirmation::Nack(_))) => Err(AmqpError::Nacked),
    }
}

/// Capped exponential backoff with full jitter for reconnects.
pub fn reconnect_delay(attempt: u32) -> Duration {
    let cap = Duration::from_millis(100)
        .saturating_mul(1 << attempt.min(7))
        .min(Duration::from_secs(10));
    Duration::from_millis(
        rand::rng().random_range(cap.as_millis() as u64 / 2..=cap.as_millis() as u64),
    )
}
