//! The drainer's broker side (background, never the request path): spool -> RabbitMQ in
//! spool order, with a sliding window of publisher confirms.
//!
//! Up to [`CONFIRM_WINDOW`] publishes are in flight at once. The spool cursor moves only over
//! the confirmed in-order prefix of the window, so a record counts as handed on only once it
//! and every record before it are confirmed. A nack, an unroutable return, a confirm timeout
//! or a lost connection rewinds to the first unconfirmed record: the window is dropped with
//! its connection, and after a reconnect (capped, jittered backoff) everything from the
//! cursor is sent again. Nothing is lost; a duplicate is the same message (same
//! `message_id`) again. A broker that blocks publishers only pauses the sending.
//!
//! One task, one channel, no `block_on` and no lock held across an await. As before, the
//! spool reads (page cache) and the cursor file's write are small synchronous calls on this
//! task; the cursor is now written once per confirmed run, not once per message.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;

use super::rabbit::{self, Link, RabbitError};
use super::spool::{Position, SpoolReader};
use super::{sleep_or_stop, Envelope, Inner, PUBLISHER_CONNECTION};
use crate::telemetry;

/// Publishes awaiting their confirm at most. Measured on a 2-vCPU VM against one local
/// quorum queue (`loadtests rabbit-ceiling`, loadtests/README.md "Results", 2026-12-03): the
/// broker confirms per quorum-log fsync, so its rate climbs with the publishes outstanding
/// (312/s at 1, 4,463/s at 64, 5,819/s at 256, 7,000-9,500/s at 1,024, 8,900-14,400/s at
/// 4,096) and gains only 2-4% more at 16,384. The drainer at 1,024 reached 7,120/s where it
/// reached 7,978-8,561/s at 4,096 in the same session. More would mostly add to what a
/// reconnect re-sends (at most this many duplicates, each with the original's message id)
/// and to memory (about 1 KiB a message).
pub(super) const CONFIRM_WINDOW: usize = 4096;

/// How much of the spool one read takes (from the page cache; the window is refilled
/// from it, and it is read again when it runs out).
const READ_BYTES: u64 = 1 << 20;

/// A record read from the spool: its end position, and its envelope and payload, or `None`
/// for a corrupt or unreadable one, which is skipped but keeps its place in the order.
type Record = (Position, Option<(Envelope, Bytes)>);

/// A record in the window.
struct InFlight {
    pos: Position,
    /// `None` for a skipped record: nothing to wait for.
    confirm: Option<Publish>,
}

struct Publish {
    confirm: lapin::PublisherConfirm,
    deadline: tokio::time::Instant,
    route: String,
}

/// The drainer's state between steps.
struct Drainer<'a> {
    inner: &'a Inner,
    connector: crate::amqp::Connector,
    link: Option<Link>,
    attempt: u32,
    reader: SpoolReader,
    /// Where reading goes on: just past the last record taken into `queued` or `window`.
    read_pos: Position,
    /// Skipped records up to here have been reported (a rewind reads them again).
    reported: Position,
    /// Read from the spool, not sent yet.
    queued: VecDeque<Record>,
    /// Sent, in spool order, oldest first.
    window: VecDeque<InFlight>,
}

/// Spool -> RabbitMQ until shutdown.
pub(super) async fn run(
    inner: Arc<Inner>,
    endpoints: crate::amqp::Endpoints,
    shutdown: CancellationToken,
) {
    let reader = SpoolReader::new(inner.writer.state.clone());
    let read_pos = reader.cursor();
    let mut d = Drainer {
        connector: crate::amqp::Connector::new(
            endpoints,
            "dlq_publisher",
            PUBLISHER_CONNECTION,
            inner.settings.connections.clone(),
        ),
        inner: &inner,
        link: None,
        attempt: 0,
        reader,
        read_pos,
        reported: read_pos,
        queued: VecDeque::new(),
        window: VecDeque::new(),
    };
    let state = inner.writer.state.clone();
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        // Reading also deletes the segments wholly handed on.
        if d.queued.is_empty() && d.window.is_empty() && d.read_more() == 0 {
            tokio::select! {
                _ = state.appended.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown.cancelled() => return,
            }
            continue;
        }
        let sending = match d.ready().await {
            Ok(sending) => sending,
            Err(()) => {
                if sleep_or_stop(rabbit::reconnect_delay(d.attempt), &shutdown).await {
                    return;
                }
                continue;
            }
        };
        if sending {
            if let Err(e) = d.fill().await {
                d.failed(e);
                if sleep_or_stop(rabbit::reconnect_delay(d.attempt), &shutdown).await {
                    return;
                }
                continue;
            }
        }
        if d.window.is_empty() {
            // Blocked by the broker with nothing in flight: look again after a while.
            if !sending && sleep_or_stop(rabbit::reconnect_delay(d.attempt), &shutdown).await {
                return;
            }
            continue;
        }
        // The oldest confirm, or (while the window has room) new records to send.
        let room = sending && d.window.len() < CONFIRM_WINDOW;
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            settled = d.settle_front() => {
                if let Err(e) = settled {
                    d.failed(e);
                    if sleep_or_stop(rabbit::reconnect_delay(d.attempt), &shutdown).await {
                        return;
                    }
                }
            }
            _ = state.appended.notified(), if room => {}
        }
    }
}

impl Drainer<'_> {
    /// Reads the next records after `read_pos` into `queued`; how many. An unreadable spool
    /// is logged and read again on the next wake-up.
    fn read_more(&mut self) -> usize {
        let batch = match self.reader.read_from(self.read_pos, READ_BYTES) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the DLQ spool");
                return 0;
            }
        };
        let n = batch.len();
        for record in batch {
            let pos = (record.segment, record.end);
            self.read_pos = pos;
            let report = pos > self.reported;
            if report {
                self.reported = pos;
            }
            let Some(payload) = record.payload.clone() else {
                if report {
                    record.report_skipped();
                }
                self.queued.push_back((pos, None));
                continue;
            };
            match serde_json::from_slice::<Envelope>(&payload) {
                Ok(env) => self.queued.push_back((pos, Some((env, payload)))),
                Err(e) => {
                    if report {
                        tracing::error!(error = %e, "unreadable DLQ message skipped");
                    }
                    self.queued.push_back((pos, None));
                }
            }
        }
        n
    }

    /// Connects when there is no healthy link. `Ok(true)`: publishes may be sent;
    /// `Ok(false)`: connected but the broker blocks publishers (confirms in flight may still
    /// come); `Err`: no link, back off.
    async fn ready(&mut self) -> Result<bool, ()> {
        let inner = self.inner;
        if self.link.as_ref().is_none_or(|l| !l.healthy()) {
            if self.link.take().is_some() {
                // The connection went with confirms outstanding: send them again.
                self.rewind();
            }
            inner.publisher_connected.store(false, Ordering::Relaxed);
            self.connector.lost();
            match Link::connect(&mut self.connector, &inner.settings.topology()).await {
                Ok(l) => {
                    inner.broker_unreachable.store(false, Ordering::Relaxed);
                    let node = self.connector.current().unwrap_or(0);
                    tracing::info!(node, url = %self.connector.endpoints().masked(node), "DLQ publisher connected to RabbitMQ");
                    self.link = Some(l);
                    self.attempt = 0;
                }
                Err(e) => {
                    inner.broker_unreachable.store(true, Ordering::Relaxed);
                    self.attempt += 1;
                    tracing::warn!(error = %e, attempt = self.attempt, "RabbitMQ unreachable; DLQ messages stay in the spool");
                    return Err(());
                }
            }
        }
        let Some(l) = self.link.as_ref() else {
            return Err(());
        };
        inner.publisher_connected.store(true, Ordering::Relaxed);
        let blocked = l.blocked();
        inner.publisher_blocked.store(blocked, Ordering::Relaxed);
        if blocked {
            self.attempt = (self.attempt + 1).min(5);
        }
        Ok(!blocked)
    }

    /// Sends queued records (reading more from the spool as needed) until the window is full
    /// or the spool has nothing more. A record leaves `queued` only once it is sent.
    async fn fill(&mut self) -> Result<(), RabbitError> {
        while self.window.len() < CONFIRM_WINDOW {
            if self.queued.is_empty() && self.read_more() == 0 {
                return Ok(());
            }
            let Some((pos, item)) = self.queued.front() else {
                return Ok(());
            };
            let pos = *pos;
            let confirm = match item {
                None => None,
                Some((env, payload)) => {
                    // `ready` saw a link; without one, these are sent after the reconnect.
                    let Some(l) = self.link.as_mut() else {
                        return Ok(());
                    };
                    l.declare_route(&env.route).await?;
                    let ex = l.dlq_exchange().to_string();
                    let confirm = l
                        .start_publish(
                            &ex,
                            &rabbit::replay_key(&env.route),
                            payload,
                            &env.msg_id,
                            FieldTable::default(),
                        )
                        .await?;
                    Some(Publish {
                        confirm,
                        deadline: tokio::time::Instant::now() + self.inner.settings.confirm_timeout,
                        route: env.route.clone(),
                    })
                }
            };
            self.queued.pop_front();
            self.window.push_back(InFlight { pos, confirm });
        }
        Ok(())
    }

    /// Waits for the oldest confirm in the window, then takes every following one that is
    /// already in, and moves the cursor over that confirmed prefix in one step. Cancel-safe:
    /// nothing changes before its one await has finished.
    async fn settle_front(&mut self) -> Result<(), RabbitError> {
        let mut published: HashMap<String, u64> = HashMap::new();
        let mut last = None;
        if let Some(InFlight {
            confirm: Some(p), ..
        }) = self.window.front_mut()
        {
            match tokio::time::timeout_at(p.deadline, &mut p.confirm).await {
                Ok(r) => crate::amqp::confirmation(r)?,
                Err(_) => {
                    return Err(RabbitError::ConfirmTimeout(
                        self.inner.settings.confirm_timeout,
                    ))
                }
            }
            // Resolved: taken now (a resolved confirm cannot be polled again).
            if let Some(sent) = self.window.pop_front() {
                last = Some(sent.pos);
                if let Some(p) = sent.confirm {
                    *published.entry(p.route).or_default() += 1;
                }
            }
        }
        let mut failure = None;
        while let Some(front) = self.window.front_mut() {
            if let Some(p) = &mut front.confirm {
                match (&mut p.confirm).now_or_never() {
                    None => break,
                    Some(r) => {
                        if let Err(e) = crate::amqp::confirmation(r) {
                            failure = Some(e);
                            break;
                        }
                    }
                }
            }
            if let Some(sent) = self.window.pop_front() {
                last = Some(sent.pos);
                if let Some(p) = sent.confirm {
                    *published.entry(p.route).or_default() += 1;
                }
            }
        }
        for (route, n) in published {
            metrics::counter!(telemetry::DLQ_MESSAGES, "route" => route, "result" => "published")
                .increment(n);
        }
        if let Some(pos) = last {
            self.reader.advance(pos);
        }
        failure.map_or(Ok(()), Err)
    }

    /// Everything after the cursor is sent again (same message ids).
    fn rewind(&mut self) {
        self.window.clear();
        self.queued.clear();
        self.read_pos = self.reader.cursor();
    }

    /// A publish failed: drop the window and the connection, and start again from the
    /// first unconfirmed record. A broker that blocks publishers (resource alarm) only
    /// stops the sending: the window and the connection stay, and its confirms may come.
    fn failed(&mut self, e: RabbitError) {
        tracing::warn!(error = %e, "DLQ publish failed; will retry from the first unconfirmed message");
        self.attempt += 1;
        if !matches!(e, RabbitError::Blocked) {
            self.rewind();
            self.link = None;
        }
    }
}
