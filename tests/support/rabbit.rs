//! RabbitMQ helpers for the DLQ tests: a real broker on 127.0.0.1:5672.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};

pub const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// RabbitMQ is required in CI (CI=true): a missing broker fails the test there. Locally a
/// test skips (with a message) when no broker listens.
pub async fn available() -> bool {
    let up = tokio::net::TcpStream::connect("127.0.0.1:5672")
        .await
        .is_ok();
    if !up {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("RabbitMQ is not reachable on 127.0.0.1:5672 and CI=true");
        }
        eprintln!("skipping: RabbitMQ is not running on 127.0.0.1:5672");
    }
    up
}

pub async fn channel() -> (Connection, Channel) {
    let conn = Connection::connect(URL, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    (conn, ch)
}

/// A unique route name, so each test has its own queues.
pub fn unique_route(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Ready messages in `queue` (0 if it does not exist yet). A fresh channel each time: a
/// passive declare of a missing queue closes the channel it runs on.
pub async fn depth(conn: &Connection, queue: &str) -> u32 {
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let Ok(ch) = conn.create_channel().await else {
        return 0;
    };
    let d = ch
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .map(|q| q.message_count())
        .unwrap_or(0);
    let _ = ch.close(200, "done".into()).await;
    d
}

/// Whether `queue` has been declared (by breakwater or anyone). A fresh channel: a passive
/// declare of a missing queue closes the channel it runs on.
pub async fn exists(conn: &Connection, queue: &str) -> bool {
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let Ok(ch) = conn.create_channel().await else {
        return false;
    };
    let found = ch
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .is_ok();
    let _ = ch.close(200, "done".into()).await;
    found
}

/// Waits until `queue` holds at least `n` messages.
pub async fn wait_depth(conn: &Connection, queue: &str, n: u32, within: Duration) -> u32 {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let d = depth(conn, queue).await;
        if d >= n || tokio::time::Instant::now() > deadline {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `queue` holds at most `n` ready messages.
pub async fn wait_depth_at_most(conn: &Connection, queue: &str, n: u32, within: Duration) -> u32 {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let d = depth(conn, queue).await;
        if d <= n || tokio::time::Instant::now() > deadline {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Takes every message now in `queue` (acking them).
pub async fn drain(ch: &Channel, queue: &str) -> Vec<lapin::message::BasicGetMessage> {
    if single_active_consumer(queue) {
        return consume_all(ch, queue).await;
    }
    let mut out = Vec::new();
    while let Ok(Some(m)) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
    {
        out.push(m);
    }
    out
}

/// A queue bound to a durable topic exchange (declared if missing) with `key`: what a
/// consumer of breakwater's exchanges sets up.
pub async fn bound_queue(ch: &Channel, exchange: &str, queue: &str, key: &str) {
    ch.exchange_declare(
        exchange.into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

/// A queue bound to the results exchange for one route's results.
pub async fn results_queue(ch: &Channel, exchange: &str, route: &str) -> String {
    let q = format!("test.results.{route}");
    bound_queue(ch, exchange, &q, &format!("ai.result.{route}")).await;
    q
}

pub async fn cleanup(ch: &Channel, route: &str) {
    for q in [
        format!("breakwater.dlq.{route}"),
        format!("breakwater.dlq.{route}.parked"),
        format!("breakwater.results.{route}"),
        format!("test.results.{route}"),
    ] {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}

pub fn rabbitmqctl(args: &[&str]) {
    let ok = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(ok, "rabbitmqctl {args:?} failed");
}

/// breakwater's route queues have a single active consumer, and RabbitMQ refuses
/// `basic.get` on such quorum queues (RESOURCE_LOCKED): they are read by consuming.
fn single_active_consumer(queue: &str) -> bool {
    queue.starts_with("breakwater.dlq.") && !queue.ends_with(".parked")
}

/// Consumes (auto-ack) until the queue has been quiet for half a second. While another
/// consumer is the active one this returns nothing.
async fn consume_all(ch: &Channel, queue: &str) -> Vec<lapin::message::BasicGetMessage> {
    use futures_util::StreamExt;
    let tag = format!("test-drain-{}", uuid::Uuid::new_v4().simple());
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            tag.as_str().into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Ok(Some(Ok(delivery))) =
        tokio::time::timeout(Duration::from_millis(500), consumer.next()).await
    {
        out.push(lapin::message::BasicGetMessage {
            delivery,
            message_count: 0,
        });
    }
    let _ = ch
        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
        .await;
    out
}

/// A TCP relay in front of the broker that a test switches off and cuts: while down it
/// refuses every connection (a broker that went away, without stopping the shared one);
/// `cut` drops every relayed connection at once, mid-stream.
pub struct BrokerLink {
    port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cuts: tokio::sync::watch::Sender<u64>,
    accept: tokio::task::JoinHandle<()>,
}

impl BrokerLink {
    pub async fn start() -> BrokerLink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (cuts, _) = tokio::sync::watch::channel(0u64);
        let (up2, cuts2) = (up.clone(), cuts.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !up2.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let mut cut = cuts2.subscribe();
                tokio::spawn(async move {
                    let Ok(mut broker) = tokio::net::TcpStream::connect("127.0.0.1:5672").await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut broker) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        BrokerLink {
            port,
            up,
            cuts,
            accept,
        }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Refuses new connections and drops the relayed ones.
    pub fn down(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        self.cut();
    }

    pub fn up(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Drops every relayed connection now; new ones are relayed again if up.
    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }
}

impl Drop for BrokerLink {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
