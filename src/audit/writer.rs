//! The writer: a dedicated thread fed by a bounded channel. It batches whatever is queued
//! (group commit), writes the lines, fsyncs, and only then counts them as written. It
//! rotates by size and by UTC day (the new file chains from the old file's last hash),
//! removes files past retention (and records that it did), and resumes the chain after a
//! crash, truncating a torn last line.
//!
//! Request tasks never touch the disk, and nothing waits on the log without a bound. There
//! is one way in, in two forms:
//! - [`AuditHandle::submit`] for async contexts (the end of a response body, replays): a
//!   future that hands the entry over at once when the channel has room. Else, under
//!   `on_full = "block"`, it waits for room for at most `block_timeout` (the `[audit]` key
//!   `block_timeout_ms`); under `drop` it gives up at once. Dropping it before it is done
//!   hands the entry to `submit_now`: cancellation never loses a record silently.
//! - [`AuditHandle::submit_now`] for sync contexts (drop guards, change events): never
//!   waits and never spawns. On a full channel under `block` the entry goes to ONE
//!   overflow task through a bounded queue ([`OVERFLOW_CAPACITY`] entries), which waits
//!   for room until the same `block_timeout` (from the submit) has passed.
//!
//! A record that cannot be handed over in time (the bound expired, the overflow queue was
//! full, `drop` mode with a full channel, or the writer stopped) is lost, and never
//! silently: it is counted in `breakwater_audit_dropped_total`, logged (at most once a
//! second) and, once the writer can write again, chained as a `records_lost` event with
//! the count, which `breakwater audit verify` reports. Under `block`, readiness is off
//! while the writer cannot write or losses are not yet chained.
//!
//! On a dead disk the writer retries a batch for as long as it takes (with backoff), and
//! the channel fills; the bounds above keep requests moving. At shutdown
//! [`AuditHandle::close`] waits for the log within a bound; past it, the writer stops
//! retrying and counts (and logs) what it could not write.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::PollSender;

use super::checkpoint::Signer;
use super::record::{parse_line, ChainHash, Entry, EventRecord, LineCtx, SCHEMA_V};
use crate::telemetry;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open the decision log {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid HMAC key: {0}")]
    Key(String),
    #[error("cannot start the decision log writer: {0}")]
    Thread(std::io::Error),
}

#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub path: PathBuf,
    pub hmac_key: Vec<u8>,
    pub key_id: String,
    pub rotate_bytes: u64,
    pub retention_days: u32,
    pub on_full_drop: bool,
    pub channel_capacity: usize,
    /// Minimum spacing between fsyncs: bounds the fsync rate under load.
    pub fsync_interval: Duration,
    pub fsync_max_records: usize,
    /// Under `block`: the longest an entry waits for room in the channel.
    pub block_timeout: Duration,
    pub instance: String,
    /// Where written lines are copied for central collection, if anywhere.
    pub publish: Option<super::AuditPublisher>,
    /// Signed checkpoints, when `[audit] signing_key_file` is set.
    pub checkpoint: Option<CheckpointSettings>,
}

/// Every `interval` (while records keep coming) and at a clean shutdown, the writer chains
/// a checkpoint signed by `signer`: see [`super::checkpoint`].
#[derive(Debug, Clone)]
pub struct CheckpointSettings {
    pub signer: Arc<Signer>,
    pub interval: Duration,
}

/// Keyed digests (HMAC-SHA256, hex): a digest can be matched against a known input but
/// not brute-forced from guesses without the key.
#[derive(Clone)]
pub struct Digester {
    mac: Hmac<Sha256>,
    /// The digest of no bytes (a GET has no body): computed once.
    empty: [u8; 32],
}

impl std::fmt::Debug for Digester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Digester(***)")
    }
}

impl Digester {
    pub fn new(key: &[u8]) -> Result<Self, AuditError> {
        let mac =
            Hmac::<Sha256>::new_from_slice(key).map_err(|e| AuditError::Key(e.to_string()))?;
        let empty = mac.clone().finalize().into_bytes().into();
        Ok(Digester { mac, empty })
    }

    pub fn digest(&self, bytes: &[u8]) -> [u8; 32] {
        if bytes.is_empty() {
            return self.empty;
        }
        let mut mac = self.mac.clone();
        mac.update(bytes);
        mac.finalize().into_bytes().into()
    }

    /// For a body that streams: feed chunks, then `finish`.
    pub fn stream(&self) -> DigestStream {
        DigestStream {
            mac: self.mac.clone(),
        }
    }
}

pub struct DigestStream {
    mac: Hmac<Sha256>,
}

impl DigestStream {
    pub fn update(&mut self, bytes: &[u8]) {
        self.mac.update(bytes);
    }
    pub fn finish(self) -> [u8; 32] {
        self.mac.finalize().into_bytes().into()
    }
}

// Decisions travel by value: a box would be allocated by the request task and freed by
// the writer thread, which costs more than the copy.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Entry(Entry),
    Flush(oneshot::Sender<()>),
    /// Records were lost: chain a `records_lost` event even if nothing else comes.
    Lost,
    /// Chain a signed checkpoint now (`force`: shutdown), or if one is due (the ticker),
    /// unless nothing was written since the last one. Ignored without a signing key.
    Checkpoint {
        force: bool,
    },
}

/// Entries the overflow task holds for `submit_now` while the channel is full.
pub const OVERFLOW_CAPACITY: usize = 1024;

#[derive(Debug, Default)]
struct Counters {
    unhealthy: AtomicBool,
    written: AtomicU64,
    dropped: AtomicU64,
    errors: AtomicU64,
    /// Lost and not yet chained as a `records_lost` event.
    unchained: AtomicU64,
    /// Set by `close` once its bound expired: the writer stops retrying.
    closing: AtomicBool,
    /// When a loss was last logged (ms since the Unix epoch): one line a second at most.
    last_loss_log_ms: AtomicU64,
}

impl Counters {
    /// Counts `n` lost records and makes sure the writer will chain them.
    fn lose(&self, tx: &mpsc::Sender<Msg>, n: u64, why: &'static str) {
        let total = self.dropped.fetch_add(n, Ordering::Relaxed) + n;
        self.unchained.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(telemetry::AUDIT_DROPPED).increment(n);
        let _ = tx.try_send(Msg::Lost);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        let last = self.last_loss_log_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1000
            && self
                .last_loss_log_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::error!(
                lost_total = total,
                why,
                "decision records lost: the log could not take them in time"
            );
        }
    }
}

/// The request side of the decision log. One `Arc`: cloning it per request costs one
/// atomic increment.
#[derive(Clone)]
pub struct AuditHandle(Arc<HandleInner>);

struct HandleInner {
    tx: mpsc::Sender<Msg>,
    /// To the overflow task (`submit_now` under `block`); `None` in `drop` mode or when
    /// the log was started outside a runtime.
    overflow: Option<mpsc::Sender<(Entry, tokio::time::Instant)>>,
    counters: Arc<Counters>,
    drop_when_full: bool,
    block_timeout: Duration,
    digester: Digester,
    key_id: String,
    instance: String,
}

impl std::fmt::Debug for AuditHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditHandle")
            .field("key_id", &self.0.key_id)
            .finish()
    }
}

/// The hand-over of one entry from an async context: see [`AuditHandle::submit`].
#[must_use = "a submission hands the entry over when polled (or dropped)"]
pub struct Submission(Option<Waiting>);

struct Waiting {
    handle: AuditHandle,
    entry: Option<Entry>,
    sender: PollSender<Msg>,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl Submission {
    /// True once the entry is handed over (or counted as lost).
    pub fn is_done(&self) -> bool {
        self.0.is_none()
    }
}

impl Future for Submission {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let Some(w) = this.0.as_mut() else {
            return Poll::Ready(());
        };
        match w.sender.poll_reserve(cx) {
            Poll::Ready(Ok(())) => {
                if let Some(entry) = w.entry.take() {
                    if w.sender.send_item(Msg::Entry(entry)).is_err() {
                        w.handle.lose(1, "the writer stopped");
                    }
                }
                this.0 = None;
                return Poll::Ready(());
            }
            Poll::Ready(Err(_)) => {
                w.entry = None;
                w.handle.lose(1, "the writer stopped");
                this.0 = None;
                return Poll::Ready(());
            }
            Poll::Pending => {}
        }
        if w.deadline.as_mut().poll(cx).is_ready() {
            w.entry = None;
            w.handle
                .lose(1, "block_timeout_ms passed with the channel full");
            this.0 = None;
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl Drop for Submission {
    fn drop(&mut self) {
        // Cancelled mid-wait (the client went away, the task was dropped): the entry
        // keeps the rest of its budget, in the overflow task.
        if let Some(mut w) = self.0.take() {
            if let Some(entry) = w.entry.take() {
                w.handle.submit_by(entry, w.deadline.deadline());
            }
        }
    }
}

impl AuditHandle {
    /// Hands `entry` to the writer: at once when the channel has room, else (under
    /// `block`) the returned future waits for room for at most `block_timeout_ms`, then
    /// counts the entry as lost. Dropping the future early hands the entry to
    /// [`AuditHandle::submit_now`]. Never spawns.
    pub fn submit(&self, entry: Entry) -> Submission {
        match self.0.tx.try_send(Msg::Entry(entry)) {
            Ok(()) => Submission(None),
            Err(mpsc::error::TrySendError::Full(Msg::Entry(entry))) if !self.0.drop_when_full => {
                Submission(Some(Waiting {
                    handle: self.clone(),
                    entry: Some(entry),
                    sender: PollSender::new(self.0.tx.clone()),
                    deadline: Box::pin(tokio::time::sleep(self.0.block_timeout)),
                }))
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.lose(1, "the channel was full (on_full = \"drop\")");
                Submission(None)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.lose(1, "the writer stopped");
                Submission(None)
            }
        }
    }

    /// Hands `entry` over from a context that cannot wait (a drop guard, an event): never
    /// waits, never spawns. On a full channel under `block` the overflow task waits for
    /// room within `block_timeout_ms`; see the module docs.
    pub fn submit_now(&self, entry: Entry) {
        self.submit_by(entry, tokio::time::Instant::now() + self.0.block_timeout);
    }

    fn submit_by(&self, entry: Entry, deadline: tokio::time::Instant) {
        let entry = match self.0.tx.try_send(Msg::Entry(entry)) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(Msg::Entry(entry))) if !self.0.drop_when_full => {
                entry
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                return self.lose(1, "the channel was full (on_full = \"drop\")")
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return self.lose(1, "the writer stopped"),
        };
        let queued = self
            .0
            .overflow
            .as_ref()
            .is_some_and(|o| o.try_send((entry, deadline)).is_ok());
        if !queued {
            self.lose(1, "the channel and the overflow queue were full");
        }
    }

    fn lose(&self, n: u64, why: &'static str) {
        self.0.counters.lose(&self.0.tx, n, why);
    }

    /// Records a change event in the chain.
    pub fn event(
        &self,
        event: &str,
        detail: serde_json::Value,
        actor: Option<&str>,
        hashes: (Option<String>, Option<String>),
        config_gen: Option<u64>,
    ) {
        let entry = Entry::Event(Box::new(EventRecord {
            schema_v: SCHEMA_V,
            event_id: uuid::Uuid::now_v7().to_string(),
            seq: 0,
            ts: super::rfc3339(SystemTime::now()),
            instance: self.0.instance.clone(),
            event: event.to_string(),
            config_gen,
            config_hash_before: hashes.0,
            config_hash_after: hashes.1,
            actor: actor.map(str::to_string),
            detail,
            prev_hash: String::new(),
        }));
        self.submit_now(entry);
    }

    /// Waits, for at most `within`, until everything submitted before this call is
    /// written and fsync'd. False when it was not.
    #[cfg(test)]
    pub async fn flush(&self, within: Duration) -> bool {
        self.flush_after(None, within).await
    }

    /// Hands `first` over (if any), then flushes; all within `within`.
    async fn flush_after(&self, first: Option<Msg>, within: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        let flushed = async {
            if let Some(msg) = first {
                if self.0.tx.send(msg).await.is_err() {
                    return false;
                }
            }
            self.0.tx.send(Msg::Flush(tx)).await.is_ok() && rx.await.is_ok()
        };
        tokio::time::timeout(within, flushed).await.unwrap_or(false)
    }

    /// Shutdown: flushes within `within`; past it (a dead disk), tells the writer to
    /// stop retrying, so that what it could not write is counted and logged as lost
    /// instead of holding the process.
    pub async fn close(&self, within: Duration) {
        // The final checkpoint anchors everything written before the shutdown.
        let last = Msg::Checkpoint { force: true };
        if !self.flush_after(Some(last), within).await {
            self.0.counters.closing.store(true, Ordering::Relaxed);
            tracing::error!(
                within_ms = within.as_millis() as u64,
                "the decision log could not be flushed in time: the records still queued are lost"
            );
        }
    }

    /// False after a write error, until a write succeeds again; under `block` also while
    /// lost records are not yet chained as a `records_lost` event.
    pub fn is_healthy(&self) -> bool {
        let c = &self.0.counters;
        !c.unhealthy.load(Ordering::Relaxed)
            && (self.0.drop_when_full || c.unchained.load(Ordering::Relaxed) == 0)
    }

    #[cfg(test)]
    pub fn written(&self) -> u64 {
        self.0.counters.written.load(Ordering::Relaxed)
    }

    /// The keyed digests of this log.
    pub fn digester(&self) -> &Digester {
        &self.0.digester
    }
}

impl crate::events::EventSink for AuditHandle {
    fn emit(&self, event: &str, detail: serde_json::Value, actor: Option<&str>) {
        let before = detail
            .get("config_hash_before")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let after = detail
            .get("config_hash_after")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let gen = detail.get("config_gen").and_then(|v| v.as_u64());
        self.event(event, detail, actor, (before, after), gen);
    }
}

/// Opens (or resumes) the log and starts the writer thread.
pub fn start(
    settings: AuditSettings,
) -> Result<(AuditHandle, std::thread::JoinHandle<()>), AuditError> {
    let digester = Digester::new(&settings.hmac_key)?;
    let mut writer = Writer::open(&settings)?;
    let (tx, rx) = mpsc::channel(settings.channel_capacity.max(1));
    let counters = Arc::new(Counters::default());
    let overflow = match tokio::runtime::Handle::try_current() {
        Ok(rt) if !settings.on_full_drop => {
            let (otx, orx) = mpsc::channel(OVERFLOW_CAPACITY);
            rt.spawn(overflow(orx, tx.clone(), counters.clone()));
            Some(otx)
        }
        _ => None,
    };
    let handle = AuditHandle(Arc::new(HandleInner {
        tx,
        overflow,
        counters: counters.clone(),
        drop_when_full: settings.on_full_drop,
        block_timeout: settings.block_timeout,
        digester,
        key_id: settings.key_id.clone(),
        instance: settings.instance.clone(),
    }));
    if let Some(truncated) = writer.truncated.take() {
        handle.event(
            "log_resumed",
            serde_json::json!({"truncated_bytes": truncated, "file": settings.path.display().to_string()}),
            None,
            (None, None),
            None,
        );
    }
    if let Some(cp) = &settings.checkpoint {
        start_ticker(&handle.0.tx, cp.interval)?;
    }
    let thread = std::thread::Builder::new()
        .name("audit-writer".into())
        .spawn(move || writer.run(rx, counters))
        .map_err(AuditError::Thread)?;
    Ok((handle, thread))
}

/// Wakes the writer every `interval` so that a quiet log still gets its checkpoint. It
/// holds only a weak sender: it never keeps the writer alive, and ends with it.
fn start_ticker(tx: &mpsc::Sender<Msg>, interval: Duration) -> Result<(), AuditError> {
    let weak = tx.downgrade();
    std::thread::Builder::new()
        .name("audit-checkpoint".into())
        .spawn(move || loop {
            std::thread::sleep(interval);
            let Some(tx) = weak.upgrade() else { return };
            // A full channel means a busy writer: it checks the interval itself.
            let _ = tx.try_send(Msg::Checkpoint { force: false });
        })
        .map(|_| ())
        .map_err(AuditError::Thread)
}

/// The one overflow task: forwards `submit_now` entries that met a full channel, each
/// within its deadline. It ends when the last handle is gone.
async fn overflow(
    mut rx: mpsc::Receiver<(Entry, tokio::time::Instant)>,
    tx: mpsc::Sender<Msg>,
    counters: Arc<Counters>,
) {
    while let Some((entry, deadline)) = rx.recv().await {
        match tokio::time::timeout_at(deadline, tx.reserve()).await {
            Ok(Ok(permit)) => permit.send(Msg::Entry(entry)),
            Ok(Err(_)) => counters.lose(&tx, 1, "the writer stopped"),
            Err(_) => counters.lose(&tx, 1, "block_timeout_ms passed with the channel full"),
        }
    }
}

struct Writer {
    settings: AuditSettings,
    file: File,
    size: u64,
    day: String,
    seq: u64,
    prev_hash: ChainHash,
    /// Bytes cut from a torn tail at start, reported as an event.
    truncated: Option<u64>,
    last_retention_scan: Instant,
    /// When the last checkpoint was written (or the writer started).
    last_checkpoint: Instant,
    /// The seq of the last checkpoint written by this writer: none is due until a record
    /// follows it.
    checkpoint_seq: Option<u64>,
}

fn today() -> String {
    super::rfc3339(SystemTime::now())[..10].to_string()
}

/// Lets a group fill until `until` (group commit), taking what arrives meanwhile; a full
/// group or a flush (shutdown) ends the wait at once rather than after the interval.
fn fill_group(rx: &mut mpsc::Receiver<Msg>, batch: &mut Vec<Msg>, max: usize, until: Instant) {
    loop {
        let room = max.saturating_sub(batch.len());
        if room > 0 && !rx.is_empty() {
            let before = batch.len();
            rx.blocking_recv_many(batch, room);
            if batch[before..].iter().any(|m| matches!(m, Msg::Flush(_))) {
                return;
            }
        }
        let now = Instant::now();
        if batch.len() >= max || now >= until {
            return;
        }
        std::thread::sleep((until - now).min(Duration::from_millis(1)));
    }
}

impl Writer {
    fn open(settings: &AuditSettings) -> Result<Writer, AuditError> {
        let path = &settings.path;
        let err = |source| AuditError::Open {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::private_fs::create_dir_all(dir).map_err(err)?;
        }
        let mut file = crate::private_fs::open(
            OpenOptions::new().create(true).read(true).append(true),
            path,
        )
        .map_err(err)?;
        let (good_len, last) = last_good_line(&mut file).map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        let mut truncated = None;
        if good_len < len {
            tracing::warn!(path = %path.display(), bytes = len - good_len, "decision log ended in a torn record (crash?): truncating it and resuming the chain");
            file.set_len(good_len).map_err(err)?;
            file.sync_all().map_err(err)?;
            truncated = Some(len - good_len);
        }
        let (seq, prev_hash) = match last {
            Some((seq, hash)) => (seq, hash),
            None => last_of_rotated(path).unwrap_or((0, ChainHash::genesis())),
        };
        Ok(Writer {
            settings: settings.clone(),
            file,
            size: good_len,
            day: today(),
            seq,
            prev_hash,
            truncated,
            last_retention_scan: Instant::now() - Duration::from_secs(3600),
            last_checkpoint: Instant::now(),
            checkpoint_seq: None,
        })
    }

    fn run(mut self, mut rx: mpsc::Receiver<Msg>, counters: Arc<Counters>) {
        let max = self.settings.fsync_max_records.max(1);
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
        let mut batch: Vec<Msg> = Vec::with_capacity(max);
        let mut last_sync = Instant::now();
        self.retention();
        // Wait for work; then let the group fill until `fsync_interval` has passed since
        // the last fsync (group commit), take what is queued, write it, fsync once.
        while rx.blocking_recv_many(&mut batch, max) > 0 {
            // A flush (shutdown, tests) asks for everything now: no waiting for the group.
            let flush = batch.iter().any(|m| matches!(m, Msg::Flush(_)));
            if !flush && batch.len() < max && batch.iter().any(|m| matches!(m, Msg::Entry(_))) {
                fill_group(
                    &mut rx,
                    &mut batch,
                    max,
                    last_sync + self.settings.fsync_interval,
                );
            }
            if self.write_batch(&mut batch, &mut buf, &counters) {
                last_sync = Instant::now();
            }
            if self.last_retention_scan.elapsed() > Duration::from_secs(3600) {
                self.retention();
            }
        }
    }

    /// Writes and fsyncs the entries of a batch, then answers its flushes (everything
    /// before them is on disk) and empties it. Retries with backoff on errors (disk
    /// full): the entries stay in memory and the channel fills, which is the
    /// backpressure. Returns whether it fsynced.
    fn write_batch(
        &mut self,
        batch: &mut Vec<Msg>,
        buf: &mut Vec<u8>,
        counters: &Counters,
    ) -> bool {
        let lost = counters.unchained.swap(0, Ordering::Relaxed);
        if lost > 0 {
            batch.insert(0, Msg::Entry(self.records_lost(lost, counters)));
        }
        self.place_checkpoint(batch);
        let entries = batch
            .iter()
            .filter(|m| matches!(m, Msg::Entry(_) | Msg::Checkpoint { .. }))
            .count();
        if entries > 0 {
            self.write_entries(batch, buf, counters);
        }
        for msg in batch.drain(..) {
            if let Msg::Flush(done) = msg {
                let _ = done.send(());
            }
        }
        entries > 0
    }

    /// Leaves at most one checkpoint in `batch`, at its end, when one is asked for or due
    /// (the interval passed with records written since the last one).
    fn place_checkpoint(&self, batch: &mut Vec<Msg>) {
        let mut asked = false;
        let mut forced = false;
        batch.retain(|m| match m {
            Msg::Checkpoint { force } => {
                asked = true;
                forced |= *force;
                false
            }
            _ => true,
        });
        let Some(cp) = &self.settings.checkpoint else {
            return;
        };
        let due = self.last_checkpoint.elapsed() >= cp.interval;
        let records = batch.iter().any(|m| matches!(m, Msg::Entry(_)));
        // Nothing written since the last checkpoint (or at all): no write, no fsync.
        let anchored = self.seq == 0 || self.checkpoint_seq == Some(self.seq);
        if (records || !anchored) && (forced || (due && (asked || records))) {
            batch.push(Msg::Checkpoint { force: forced });
        }
    }

    /// The event that puts `count` lost records into the chain.
    fn records_lost(&self, count: u64, counters: &Counters) -> Entry {
        tracing::warn!(
            count,
            "chaining a records_lost event for decision records that were lost"
        );
        Entry::Event(Box::new(EventRecord {
            schema_v: SCHEMA_V,
            event_id: uuid::Uuid::now_v7().to_string(),
            ts: super::rfc3339(SystemTime::now()),
            instance: self.settings.instance.clone(),
            event: RECORDS_LOST.into(),
            detail: serde_json::json!({
                "count": count,
                "dropped_total": counters.dropped.load(Ordering::Relaxed),
                "on_full": if self.settings.on_full_drop { "drop" } else { "block" },
                "block_timeout_ms": self.settings.block_timeout.as_millis() as u64,
            }),
            ..Default::default()
        }))
    }

    /// Writes and fsyncs the entries of `batch`, retrying until it succeeds, or (once
    /// `close` gave up waiting) counting them as lost. A batch that would take the file
    /// past `rotate_bytes` is written in parts with a rotation between them, so a large
    /// group commit never makes one file much larger than the bound.
    fn write_entries(&mut self, batch: &mut [Msg], buf: &mut Vec<u8>, counters: &Counters) {
        let mut start = 0;
        while start < batch.len() {
            match self.write_part(&mut batch[start..], buf, counters) {
                Some(used) => start += used,
                None => return,
            }
        }
    }

    /// Writes the entries at the head of `part` until the file reaches `rotate_bytes`
    /// (at least one entry), retrying on errors. Returns how many messages of `part` it
    /// consumed, or `None` when it gave up at close and counted the rest as lost.
    fn write_part(
        &mut self,
        part: &mut [Msg],
        buf: &mut Vec<u8>,
        counters: &Counters,
    ) -> Option<usize> {
        let mut backoff = Duration::from_millis(50);
        loop {
            if self.needs_rotation() {
                if let Err(e) = self.rotate() {
                    tracing::error!(error = %e, "decision log rotation failed; writing on to the current file");
                }
            }
            buf.clear();
            let (mut seq, mut prev) = (self.seq, self.prev_hash);
            let ctx = LineCtx {
                instance: &self.settings.instance,
                key_id: &self.settings.key_id,
            };
            let mut used = part.len();
            let mut checkpoint_seq = self.checkpoint_seq;
            for (i, msg) in part.iter_mut().enumerate() {
                if seq > self.seq && self.size + buf.len() as u64 >= self.settings.rotate_bytes {
                    used = i;
                    break;
                }
                let mut checkpoint;
                let entry = match msg {
                    Msg::Entry(entry) => entry,
                    Msg::Checkpoint { .. } => {
                        let Some(cp) = &self.settings.checkpoint else {
                            continue;
                        };
                        // Nothing new since the last one: it would anchor nothing.
                        if checkpoint_seq == Some(seq) || seq == 0 {
                            continue;
                        }
                        checkpoint = Entry::Event(Box::new(cp.signer.checkpoint(
                            &self.settings.instance,
                            seq,
                            &prev,
                        )));
                        checkpoint_seq = Some(seq + 1);
                        &mut checkpoint
                    }
                    _ => continue,
                };
                match entry.write_line(seq + 1, &prev, ctx, buf) {
                    Ok(hash) => {
                        seq += 1;
                        prev = hash;
                    }
                    Err(e) => tracing::error!(error = %e, "cannot serialize a decision record"),
                }
            }
            let result = self.file.write_all(buf).and_then(|_| self.file.sync_data());
            match result {
                Ok(()) => {
                    if let Some(publisher) = &self.settings.publish {
                        for line in buf.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                            publisher.offer(bytes::Bytes::copy_from_slice(line));
                        }
                    }
                    self.size += buf.len() as u64;
                    let n = seq - self.seq;
                    self.seq = seq;
                    self.prev_hash = prev;
                    if checkpoint_seq != self.checkpoint_seq {
                        self.checkpoint_seq = checkpoint_seq;
                        self.last_checkpoint = Instant::now();
                    }
                    counters.written.fetch_add(n, Ordering::Relaxed);
                    metrics::counter!(telemetry::AUDIT_RECORDS).increment(n);
                    if counters.unhealthy.swap(false, Ordering::Relaxed) {
                        tracing::info!("decision log writes recovered");
                    }
                    return Some(used);
                }
                Err(e) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    counters.unhealthy.store(true, Ordering::Relaxed);
                    metrics::counter!(telemetry::AUDIT_WRITE_ERRORS).increment(1);
                    // A partial write must not leave half a line behind.
                    let _ = self.file.set_len(self.size);
                    if counters.closing.load(Ordering::Relaxed) {
                        let n = lost_on_close(part);
                        counters.dropped.fetch_add(n, Ordering::Relaxed);
                        metrics::counter!(telemetry::AUDIT_DROPPED).increment(n);
                        tracing::error!(error = %e, records = n, "shutting down with the decision log unwritable: records lost");
                        return None;
                    }
                    tracing::error!(error = %e, path = %self.settings.path.display(), "decision log write failed; retrying (readiness is off)");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn needs_rotation(&self) -> bool {
        self.size > 0 && (self.size >= self.settings.rotate_bytes || today() != self.day)
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let path = &self.settings.path;
        let stamp = super::rfc3339(SystemTime::now()).replace([':', '-'], "");
        let rotated = rotated_name(path, &format!("{}-{:012}", &stamp[..15], self.seq));
        self.file.sync_all()?;
        std::fs::rename(path, &rotated)?;
        self.file = crate::private_fs::open(
            OpenOptions::new().create(true).read(true).append(true),
            path,
        )?;
        if let Some(dir) = path.parent() {
            // Make the rename itself durable.
            if let Ok(d) = File::open(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            }) {
                let _ = d.sync_all();
            }
        }
        self.size = 0;
        self.day = today();
        tracing::info!(rotated = %rotated.display(), "decision log rotated");
        self.retention();
        Ok(())
    }

    /// Removes rotated files older than `retention_days`, recording each removal in the
    /// chain (with the last hash of the removed file) so the gap is explained.
    fn retention(&mut self) {
        self.last_retention_scan = Instant::now();
        let max_age = Duration::from_secs(u64::from(self.settings.retention_days) * 86_400);
        let mut removed = Vec::new();
        for file in rotated_files(&self.settings.path) {
            let old = std::fs::metadata(&file)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > max_age);
            if !old {
                continue;
            }
            let last = File::open(&file)
                .ok()
                .and_then(|mut f| last_good_line(&mut f).ok())
                .and_then(|(_, l)| l);
            match std::fs::remove_file(&file) {
                Ok(()) => removed.push(serde_json::json!({
                    "file": file.display().to_string(),
                    "last_seq": last.as_ref().map(|l| l.0),
                    "last_hash": last.map(|l| l.1.as_str().to_string()),
                    "retention_days": self.settings.retention_days,
                })),
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "cannot remove an expired decision log file")
                }
            }
        }
        if removed.is_empty() {
            return;
        }
        let mut batch: Vec<Msg> = removed
            .into_iter()
            .map(|detail| {
                tracing::info!(%detail, "expired decision log file removed");
                Msg::Entry(Entry::Event(Box::new(EventRecord {
                    schema_v: SCHEMA_V,
                    event_id: uuid::Uuid::now_v7().to_string(),
                    ts: super::rfc3339(SystemTime::now()),
                    instance: self.settings.instance.clone(),
                    event: "retention_removal".into(),
                    detail,
                    ..Default::default()
                })))
            })
            .collect();
        let mut buf = Vec::new();
        self.write_batch(&mut batch, &mut buf, &Counters::default());
    }
}

/// The event name of a chained loss.
pub const RECORDS_LOST: &str = "records_lost";

/// Entries of a batch that are lost when it cannot be written at shutdown; a
/// `records_lost` event's own count was counted when those records were lost.
fn lost_on_close(batch: &[Msg]) -> u64 {
    batch
        .iter()
        .filter(|m| match m {
            Msg::Entry(Entry::Event(e)) => e.event != RECORDS_LOST,
            Msg::Entry(_) => true,
            _ => false,
        })
        .count() as u64
}

fn rotated_name(path: &Path, suffix: &str) -> PathBuf {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("decisions");
    let ext = path.extension().and_then(|s| s.to_str()).unwrap_or("jsonl");
    path.with_file_name(format!("{stem}-{suffix}.{ext}"))
}

/// Rotated files of the log at `path`, oldest first (their names sort by time).
pub fn rotated_files(path: &Path) -> Vec<PathBuf> {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("decisions")
        .to_string();
    let ext = path
        .extension()
        .and_then(|s| s.to_str())
        .unwrap_or("jsonl")
        .to_string();
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.to_path_buf(),
        None => PathBuf::from("."),
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&format!("{stem}-")) && n.ends_with(&format!(".{ext}"))
            })
        })
        .collect();
    files.sort();
    files
}

fn last_of_rotated(path: &Path) -> Option<(u64, ChainHash)> {
    let newest = rotated_files(path).pop()?;
    let mut f = File::open(newest).ok()?;
    last_good_line(&mut f).ok()?.1
}

/// Length of the file up to its last newline (a crash can only leave an incomplete last
/// line: that is what gets cut), and the (seq, hash) of the last well-formed line.
/// Reads only the tail.
fn last_good_line(file: &mut File) -> std::io::Result<(u64, Option<(u64, ChainHash)>)> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok((0, None));
    }
    let tail_start = len.saturating_sub(4 << 20);
    file.seek(SeekFrom::Start(tail_start))?;
    let mut tail = Vec::with_capacity((len - tail_start) as usize);
    file.read_to_end(&mut tail)?;
    let Some(last_nl) = tail.iter().rposition(|&b| b == b'\n') else {
        // No complete line in the window: only a torn line when the file is that short.
        return Ok((if tail_start == 0 { 0 } else { len }, None));
    };
    let good_len = tail_start + last_nl as u64 + 1;
    let mut end = last_nl;
    loop {
        let start = tail[..end]
            .iter()
            .rposition(|&b| b == b'\n')
            .map(|p| p + 1)
            .unwrap_or(0);
        if let Some((p, hash)) =
            parse_line(&tail[start..end]).and_then(|p| ChainHash::parse(&p.hash).map(|h| (p, h)))
        {
            return Ok((good_len, Some((p.seq, hash))));
        }
        if start == 0 {
            return Ok((good_len, None));
        }
        end = start - 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{verify_paths, Decision};

    fn settings(dir: &Path, interval: Duration, max: usize) -> AuditSettings {
        AuditSettings {
            path: dir.join("decisions.jsonl"),
            hmac_key: vec![7; 32],
            key_id: "k1".into(),
            rotate_bytes: 1 << 30,
            retention_days: 183,
            on_full_drop: false,
            channel_capacity: 1024,
            fsync_interval: interval,
            fsync_max_records: max,
            block_timeout: Duration::from_secs(1),
            instance: "test".into(),
            publish: None,
            checkpoint: None,
        }
    }

    fn decision(i: u32) -> Entry {
        Entry::Decision(Decision::new(
            "grading".into(),
            format!("r-{i}").into(),
            "ai",
        ))
    }

    #[tokio::test]
    async fn full_groups_and_flushes_do_not_wait_for_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        // An interval far longer than the test may take: only full groups and the flush
        // can get these records written.
        let (handle, thread) = start(settings(dir.path(), Duration::from_secs(600), 4)).unwrap();
        for i in 0..10 {
            handle.submit(decision(i)).await;
        }
        assert!(
            handle.flush(Duration::from_secs(20)).await,
            "the flush waited for the fsync interval"
        );
        assert_eq!(handle.written(), 10);
        drop(handle);
        // The overflow task holds the writer's channel until it sees the handle gone: join
        // the writer off this (single) runtime thread so that task can run and end.
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
        let report = verify_paths(&[dir.path().join("decisions.jsonl")]).unwrap();
        assert_eq!(report.records, 10);
    }

    #[test]
    fn digests_are_keyed_and_the_same_whether_streamed_or_not() {
        let a = Digester::new(b"key-a").unwrap();
        let b = Digester::new(b"key-b").unwrap();
        for input in [&b""[..], b"{\"student\":42}"] {
            let mut s = a.stream();
            for chunk in input.chunks(3) {
                s.update(chunk);
            }
            assert_eq!(a.digest(input), s.finish());
            assert_ne!(a.digest(input), b.digest(input));
            let expected: [u8; 32] = {
                let mut mac = Hmac::<Sha256>::new_from_slice(b"key-a").unwrap();
                mac.update(input);
                mac.finalize().into_bytes().into()
            };
            assert_eq!(a.digest(input), expected);
        }
    }

    /// Item 15: a full channel never turns hand-overs into tasks. With the writer held in
    /// a long group-commit wait and its channel full, 5,000 `submit_now` calls leave the
    /// number of live tasks where it was (one overflow task, started with the log), and
    /// every entry that finds no room in time is counted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_channel_spawns_no_task_per_entry() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(dir.path(), Duration::from_secs(5), 1 << 20);
        s.channel_capacity = 4;
        s.block_timeout = Duration::from_millis(100);
        let (handle, thread) = start(s).unwrap();
        let metrics = tokio::runtime::Handle::current().metrics();
        let before = metrics.num_alive_tasks();
        for i in 0..5_000 {
            handle.submit_now(decision(i));
        }
        let during = metrics.num_alive_tasks();
        assert!(
            during <= before + 1,
            "{before} live tasks before, {during} after 5,000 hand-overs to a full channel"
        );
        // Past block_timeout_ms what could not be handed over is counted, not queued.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let lost = handle.0.counters.dropped.load(Ordering::Relaxed);
        assert!(
            lost >= 5_000 - 4 - OVERFLOW_CAPACITY as u64 - 1,
            "{lost} counted lost"
        );
        drop(handle);
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
    }

    /// A quiet log still gets its checkpoint (the ticker wakes the writer), and only one:
    /// a checkpoint with no record after it anchors nothing new.
    #[tokio::test]
    async fn a_quiet_log_gets_one_checkpoint_from_the_ticker() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let pair = crate::audit::checkpoint::keygen(&keys).unwrap();
        let signer = Signer::from_file_bytes(&std::fs::read(&pair.key_file).unwrap()).unwrap();
        let mut s = settings(dir.path(), Duration::from_millis(1), 16);
        s.checkpoint = Some(CheckpointSettings {
            signer: Arc::new(signer),
            interval: Duration::from_millis(50),
        });
        let (handle, thread) = start(s).unwrap();
        for i in 0..3 {
            handle.submit(decision(i)).await;
        }
        assert!(handle.flush(Duration::from_secs(20)).await);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let log = dir.path().join("decisions.jsonl");
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let cps = lines.iter().filter(|l| l["event"] == "checkpoint").count();
        assert_eq!(cps, 1, "{text}");
        assert_eq!(lines.last().unwrap()["event"], "checkpoint", "{text}");
        assert_eq!(lines.last().unwrap()["detail"]["count"], 3);
        drop(handle);
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
        let key = crate::audit::checkpoint::PublicKey::load(&pair.pub_file).unwrap();
        let report = crate::audit::verify::verify_signed(&[log], Some(&key)).unwrap();
        assert!(report.ends_at_checkpoint());
        assert_eq!(report.checkpoints, 1);
    }

    /// A group commit larger than `rotate_bytes` is split over files: with the writer held
    /// for one big batch, 60 records at a 4 KiB bound still rotate, and the chain verifies.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_ends_the_group_commit_wait() {
        let dir = tempfile::tempdir().unwrap();
        // A group that would wait ten minutes for company: the flush must not.
        let (handle, thread) =
            start(settings(dir.path(), Duration::from_secs(600), 1 << 20)).unwrap();
        handle.submit(decision(0)).await;
        // The writer has taken the lone record and is waiting for its group to fill.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = std::time::Instant::now();
        assert!(
            handle.flush(Duration::from_secs(10)).await,
            "the flush waited for the group"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(handle);
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
        let report = verify_paths(&[dir.path().join("decisions.jsonl")]).unwrap();
        assert_eq!(report.records, 1);
    }

    #[tokio::test]
    async fn a_batch_larger_than_rotate_bytes_is_split_over_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(dir.path(), Duration::from_secs(600), 1 << 20);
        s.rotate_bytes = 4096;
        let (handle, thread) = start(s).unwrap();
        for i in 0..60 {
            handle.submit(decision(i)).await;
        }
        assert!(handle.flush(Duration::from_secs(20)).await);
        drop(handle);
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
        let log = dir.path().join("decisions.jsonl");
        let rotated = rotated_files(&log);
        assert!(rotated.len() >= 2, "{} rotated file(s)", rotated.len());
        for f in rotated.iter().chain([&log]) {
            let len = std::fs::metadata(f).unwrap().len();
            assert!(len < 4096 + 2048, "{} holds {len} bytes", f.display());
        }
        let mut all = rotated.clone();
        all.push(log);
        let report = verify_paths(&all).unwrap();
        assert_eq!(report.records, 60);
    }
}
