//! One way to talk to RabbitMQ for the DLQ and the decision log's copies: a named
//! connection with one confirm-mode channel and its durable topic exchanges declared,
//! bounded confirm waits, the reconnect backoff, and failover across the nodes of a cluster.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
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
    #[error("RabbitMQ node did not accept a connection within {0:?}")]
    ConnectTimeout(Duration),
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
        Ok(r) => confirmation(r),
    }
}

/// What a resolved publisher confirm means: an unroutable return or a nack is a failure.
pub fn confirmation(r: Result<Confirmation, lapin::Error>) -> Result<(), AmqpError> {
    match r {
        Err(e) => Err(e.into()),
        Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => Ok(()),
        Ok(Confirmation::Ack(Some(_))) => Err(AmqpError::Unroutable),
        Ok(Confirmation::Nack(_)) => Err(AmqpError::Nacked),
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

/// The nodes of one RabbitMQ cluster (`amqp_url` as a string or a list), in the order they
/// are tried. Never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    urls: Vec<String>,
}

impl Endpoints {
    /// `None` for an empty list.
    pub fn new(urls: Vec<String>) -> Option<Endpoints> {
        (!urls.is_empty()).then_some(Endpoints { urls })
    }

    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// The URL of node `index`, password masked (for logs and the admin API).
    pub fn masked(&self, index: usize) -> String {
        self.urls
            .get(index)
            .map(|u| crate::config::mask_url_password(u))
            .unwrap_or_default()
    }
}

/// Which node each named connection is on, for `GET /admin/config` and `GET /admin/dlq`.
/// Cheap to clone; shared by every connector of one process.
#[derive(Debug, Clone, Default)]
pub struct Connections {
    nodes: Arc<Mutex<BTreeMap<String, NodeState>>>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeState {
    /// Index in the configured list; `None` while not connected.
    pub node: Option<usize>,
    /// The node's URL (password masked); the last one used while not connected.
    pub url: String,
    pub nodes: usize,
}

impl Connections {
    fn set(&self, label: &str, state: NodeState) {
        let mut nodes = match self.nodes.lock() {
            Ok(n) => n,
            Err(p) => p.into_inner(),
        };
        nodes.insert(label.to_string(), state);
    }

    pub fn get(&self, label: &str) -> Option<NodeState> {
        let nodes = match self.nodes.lock() {
            Ok(n) => n,
            Err(p) => p.into_inner(),
        };
        nodes.get(label).cloned()
    }

    pub fn snapshot(&self) -> BTreeMap<String, NodeState> {
        match self.nodes.lock() {
            Ok(n) => n.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

/// How long one node gets to accept a connection before the next is tried (a blackholed
/// node must not hold the failover).
pub const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects one component to a reachable node of the cluster and fails over: each
/// `connect` tries every node once, starting with the node after the one it was last
/// connected to (a connection that needs reopening was lost, or closed on purpose, and in
/// a cluster any node serves), so a dead node is left at once. The caller applies the
/// backoff (`reconnect_delay`) between rounds that found no node.
#[derive(Debug)]
pub struct Connector {
    endpoints: Endpoints,
    /// Bounded metric label: `dlq_publisher`, `dlq_replay`, `dlq_admin`, `audit_publisher`,
    /// `audit_collect`.
    component: &'static str,
    /// The connection name shown by `rabbitmqctl list_connections` and the key in
    /// `Connections`.
    name: String,
    next: usize,
    current: Option<usize>,
    connections: Connections,
}

impl Connector {
    pub fn new(
        endpoints: Endpoints,
        component: &'static str,
        name: impl Into<String>,
        connections: Connections,
    ) -> Connector {
        let c = Connector {
            endpoints,
            component,
            name: name.into(),
            next: 0,
            current: None,
            connections,
        };
        c.publish_state(None);
        c
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// The node index of the open connection, if any.
    pub fn current(&self) -> Option<usize> {
        self.current
    }

    fn publish_state(&self, node: Option<usize>) {
        let shown = node.unwrap_or(self.next);
        self.connections.set(
            &self.name,
            NodeState {
                node,
                url: self.endpoints.masked(shown),
                nodes: self.endpoints.urls.len(),
            },
        );
        metrics::gauge!(crate::telemetry::AMQP_CONNECTED_NODE, "connection" => self.name.clone())
            .set(node.map_or(-1.0, |n| n as f64));
    }

    /// The connection is gone (or about to be closed): the next `connect` starts with
    /// the following node.
    pub fn lost(&mut self) {
        if let Some(i) = self.current.take() {
            self.next = (i + 1) % self.endpoints.urls.len();
            tracing::info!(connection = %self.name, node = i, url = %self.endpoints.masked(i), "RabbitMQ connection closed or lost");
        }
        self.publish_state(None);
    }

    /// Tries every node once (see the type's docs); the error is the last node's.
    pub async fn connect(
        &mut self,
        exchanges: &[&str],
    ) -> Result<(Connection, Channel), AmqpError> {
        if self.current.is_some() {
            self.lost();
        }
        let n = self.endpoints.urls.len();
        let start = self.next;
        let mut last_error = None;
        for k in 0..n {
            let i = (start + k) % n;
            // A caller that gives up on this attempt (the admin API's bounded wait) starts
            // with the following node next time, so a blackholed node cannot hold it.
            self.next = (i + 1) % n;
            let url = &self.endpoints.urls[i];
            let attempt =
                tokio::time::timeout(NODE_CONNECT_TIMEOUT, connect(url, &self.name, exchanges))
                    .await
                    .unwrap_or(Err(AmqpError::ConnectTimeout(NODE_CONNECT_TIMEOUT)));
            match attempt {
                Ok(link) => {
                    metrics::counter!(crate::telemetry::AMQP_CONNECTIONS, "component" => self.component, "result" => "ok").increment(1);
                    if k > 0 || n > 1 {
                        tracing::info!(connection = %self.name, node = i, url = %self.endpoints.masked(i), "connected to RabbitMQ");
                    }
                    self.current = Some(i);
                    self.next = i;
                    self.publish_state(Some(i));
                    return Ok(link);
                }
                Err(e) => {
                    metrics::counter!(crate::telemetry::AMQP_CONNECTIONS, "component" => self.component, "result" => "error").increment(1);
                    if n > 1 {
                        tracing::warn!(connection = %self.name, node = i, url = %self.endpoints.masked(i), error = %e, "RabbitMQ node unreachable; trying the next");
                    }
                    last_error = Some(e);
                }
            }
        }
        // The next round starts one node further on.
        self.next = (start + 1) % n;
        Err(last_error.unwrap_or(AmqpError::ConnectTimeout(NODE_CONNECT_TIMEOUT)))
    }
}
