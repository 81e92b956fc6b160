//! The writer: a dedicated thread fed by a bounded channel. It batches whatever is queued
//! (group commit), writes the lines, fsyncs, and only then counts them as written. It
//! rotates by size and by UTC day (the new file chains from the old file's last hash),
//! removes files past retention (and records that it did), and resumes the chain after a
//! crash, truncating a torn last line.
//!
//! Request tasks never touch the disk: they hand entries to the channel (`block` waits for
//! room, `drop` counts and drops when full).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::{mpsc, oneshot};

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
    pub instance: String,
    /// Where written lines are copied for central collection, if anywhere.
    pub publish: Option<super::AuditPublisher>,
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
}

#[derive(Debug, Default)]
struct Counters {
    unhealthy: AtomicBool,
    written: AtomicU64,
    dropped: AtomicU64,
    errors: AtomicU64,
}

/// The request side of the decision log. One `Arc`: cloning it per request costs one
/// atomic increment.
#[derive(Clone)]
pub struct AuditHandle(Arc<HandleInner>);

struct HandleInner {
    tx: mpsc::Sender<Msg>,
    counters: Arc<Counters>,
    drop_when_full: bool,
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

impl AuditHandle {
    /// Never waits. `Err` gives the entry back when the channel is full in block mode
    /// (the caller then waits with `submit`); in drop mode a full channel counts a drop.
    #[allow(clippy::result_large_err)] // gives the entry back by value: see `Msg`
    pub fn try_submit(&self, entry: Entry) -> Result<(), Entry> {
        match self.0.tx.try_send(Msg::Entry(entry)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(Msg::Entry(e))) if !self.0.drop_when_full => Err(e),
            Err(_) => {
                self.0.counters.dropped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(telemetry::AUDIT_DROPPED).increment(1);
                Ok(())
            }
        }
    }

    /// Submits, waiting for room in block mode (backpressure: nothing is lost).
    pub async fn submit(&self, entry: Entry) {
        if let Err(entry) = self.try_submit(entry) {
            if self.0.tx.send(Msg::Entry(entry)).await.is_err() {
                self.0.counters.dropped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(telemetry::AUDIT_DROPPED).increment(1);
            }
        }
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
        if let Err(entry) = self.try_submit(entry) {
            // Events are rare and must not be lost: wait for room off this thread.
            let me = self.clone();
            tokio::spawn(async move { me.submit(entry).await });
        }
    }

    /// Waits until everything submitted before this call is written and fsync'd.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.0.tx.send(Msg::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// False after a write error, until a write succeeds again.
    pub fn is_healthy(&self) -> bool {
        !self.0.counters.unhealthy.load(Ordering::Relaxed)
    }

    pub fn written(&self) -> u64 {
        self.0.counters.written.load(Ordering::Relaxed)
    }

    pub fn dropped(&self) -> u64 {
        self.0.counters.dropped.load(Ordering::Relaxed)
    }

    pub fn write_errors(&self) -> u64 {
        self.0.counters.errors.load(Ordering::Relaxed)
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
    let handle = AuditHandle(Arc::new(HandleInner {
        tx,
        counters: counters.clone(),
        drop_when_full: settings.on_full_drop,
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
    let thread = std::thread::Builder::new()
        .name("audit-writer".into())
        .spawn(move || writer.run(rx, counters))
        .map_err(AuditError::Thread)?;
    Ok((handle, thread))
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
}

fn today() -> String {
    super::rfc3339(SystemTime::now())[..10].to_string()
}

impl Writer {
    fn open(settings: &AuditSettings) -> Result<Writer, AuditError> {
        let path = &settings.path;
        let err = |source| AuditError::Open {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
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
                let since = last_sync.elapsed();
                if since < self.settings.fsync_interval {
                    std::thread::sleep(self.settings.fsync_interval - since);
                }
                let room = max.saturating_sub(batch.len());
                if room > 0 && !rx.is_empty() {
                    rx.blocking_recv_many(&mut batch, room);
                }
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
        let entries = batch.iter().filter(|m| matches!(m, Msg::Entry(_))).count();
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

    /// Writes and fsyncs the entries of `batch`, retrying until it succeeds.
    fn write_entries(&mut self, batch: &mut [Msg], buf: &mut Vec<u8>, counters: &Counters) {
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
            for msg in batch.iter_mut() {
                let Msg::Entry(entry) = msg else { continue };
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
                    counters.written.fetch_add(n, Ordering::Relaxed);
                    metrics::counter!(telemetry::AUDIT_RECORDS).increment(n);
                    if counters.unhealthy.swap(false, Ordering::Relaxed) {
                        tracing::info!("decision log writes recovered");
                    }
                    return;
                }
                Err(e) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    counters.unhealthy.store(true, Ordering::Relaxed);
                    metrics::counter!(telemetry::AUDIT_WRITE_ERRORS).increment(1);
                    tracing::error!(error = %e, path = %self.settings.path.display(), "decision log write failed; retrying (readiness is off)");
                    // A partial write must not leave half a line behind.
                    let _ = self.file.set_len(self.size);
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
        self.file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)?;
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
            instance: "test".into(),
            publish: None,
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
        tokio::time::timeout(Duration::from_secs(20), handle.flush())
            .await
            .expect("the flush waited for the fsync interval");
        assert_eq!(handle.written(), 10);
        drop(handle);
        thread.join().unwrap();
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
}
