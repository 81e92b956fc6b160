//! The local write-ahead spool: every DLQ message is appended to a segment file and
//! fsync'd (group commit) before the client is told `spooled`/`queued`. A drainer reads
//! the segments in order; a segment is deleted only when every record in it has been
//! handed on (confirmed by RabbitMQ, or replayed locally).
//!
//! Record: `len: u32 LE | crc32c(msg_id ++ payload): u32 LE | msg_id: 16 bytes | payload`.
//! On start the spool is recovered: a torn tail is truncated, corrupt records are
//! counted, reported and skipped, and the drain resumes from the saved cursor.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::telemetry;

const HEADER: usize = 4 + 4 + 16;
/// A record larger than this is corruption, not data (bodies are capped far below).
const MAX_RECORD: u32 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("the spool is full ({used} of {max} bytes)")]
    Full { used: u64, max: u64 },
    #[error("spool I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("the spool writer has stopped")]
    Stopped,
}

#[derive(Debug, Clone)]
pub struct SpoolSettings {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub segment_bytes: u64,
    pub fsync_interval: Duration,
}

/// Where a record lives: segment id and the offset just past it.
pub type Position = (u64, u64);

#[derive(Debug, Clone)]
struct Segment {
    id: u64,
    /// Bytes fsync'd and readable.
    durable_len: u64,
    sealed: bool,
}

#[derive(Debug)]
pub struct SpoolState {
    pub dir: PathBuf,
    segments: Mutex<VecDeque<Segment>>,
    bytes: AtomicU64,
    pub corrupt: AtomicU64,
    roll_requested: AtomicBool,
    /// Wakes the drainer when new records are durable.
    pub appended: Notify,
    /// Highest position handed on (confirmed): `enqueue` waits on it for `queued`.
    pub confirmed: tokio::sync::watch::Sender<Position>,
    /// Creation time of the oldest record not yet handed on (unix ms), 0 when empty.
    pub oldest_ms: AtomicU64,
}

impl SpoolState {
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn segment_count(&self) -> usize {
        self.segments.lock().map(|s| s.len()).unwrap_or(0)
    }
}

struct Append {
    msg_id: [u8; 16],
    payload: Bytes,
    reply: oneshot::Sender<Result<Position, SpoolError>>,
}

/// The request side: append and wait for the group fsync.
#[derive(Clone)]
pub struct SpoolWriter {
    tx: mpsc::Sender<Append>,
    pub state: Arc<SpoolState>,
}

impl SpoolWriter {
    pub async fn append(&self, msg_id: [u8; 16], payload: Bytes) -> Result<Position, SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Append {
                msg_id,
                payload,
                reply,
            })
            .await
            .map_err(|_| SpoolError::Stopped)?;
        rx.await.map_err(|_| SpoolError::Stopped)?
    }
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.seg"))
}

fn list_segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut ids: Vec<u64> = std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let name = name.to_str()?;
            name.strip_suffix(".seg")?.parse().ok()
        })
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

/// One record read back from a segment.
#[derive(Debug, Clone)]
pub struct StoredRecord {
    pub segment: u64,
    /// Offset just past the record.
    pub end: u64,
    pub msg_id: [u8; 16],
    /// `None` when the record is corrupt (checksum mismatch).
    pub payload: Option<Bytes>,
}

/// Reads whole records from `bytes` (which starts at file offset `base`). Returns the
/// records and the offset where reading stopped (a partial record is left for later).
fn parse_records(segment: u64, base: u64, bytes: &[u8]) -> (Vec<StoredRecord>, u64, bool) {
    let mut out = Vec::new();
    let mut pos = 0usize;
    let mut garbage = false;
    while bytes.len() - pos >= HEADER {
        let len = u32::from_le_bytes([bytes[pos], bytes[pos + 1], bytes[pos + 2], bytes[pos + 3]]);
        if len > MAX_RECORD {
            // The length itself is corrupt: nothing after it can be framed.
            garbage = true;
            break;
        }
        let total = HEADER + len as usize;
        if bytes.len() - pos < total {
            break;
        }
        let crc = u32::from_le_bytes([
            bytes[pos + 4],
            bytes[pos + 5],
            bytes[pos + 6],
            bytes[pos + 7],
        ]);
        let mut msg_id = [0u8; 16];
        msg_id.copy_from_slice(&bytes[pos + 8..pos + 24]);
        let body = &bytes[pos + 24..pos + total];
        let actual = crc32c::crc32c_append(crc32c::crc32c(&msg_id), body);
        out.push(StoredRecord {
            segment,
            end: base + (pos + total) as u64,
            msg_id,
            payload: (actual == crc).then(|| Bytes::copy_from_slice(body)),
        });
        pos += total;
    }
    (out, base + pos as u64, garbage)
}

/// Reads the records of a segment between `from` and `to`.
pub fn read_range(
    dir: &Path,
    segment: u64,
    from: u64,
    to: u64,
) -> std::io::Result<(Vec<StoredRecord>, u64, bool)> {
    let mut f = File::open(segment_path(dir, segment))?;
    f.seek(SeekFrom::Start(from))?;
    let mut buf = vec![0u8; (to.saturating_sub(from)) as usize];
    f.read_exact(&mut buf)?;
    Ok(parse_records(segment, from, &buf))
}

/// What `recover` found.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Recovery {
    pub segments: usize,
    pub records: u64,
    pub corrupt: u64,
    pub truncated_bytes: u64,
}

fn cursor_path(dir: &Path) -> PathBuf {
    dir.join("cursor")
}

/// The drain position survives restarts (best effort: a lost cursor only re-sends
/// records, with the same message ids).
pub fn load_cursor(dir: &Path) -> Position {
    std::fs::read_to_string(cursor_path(dir))
        .ok()
        .and_then(|s| {
            let (a, b) = s.trim().split_once(':')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .unwrap_or((0, 0))
}

pub fn save_cursor(dir: &Path, pos: Position) {
    let tmp = dir.join("cursor.tmp");
    if std::fs::write(&tmp, format!("{}:{}\n", pos.0, pos.1)).is_ok() {
        let _ = std::fs::rename(&tmp, cursor_path(dir));
    }
}

/// Opens the spool: recovers what a previous run left, starts the writer thread.
pub fn open(settings: SpoolSettings) -> Result<(SpoolWriter, Recovery), SpoolError> {
    std::fs::create_dir_all(&settings.dir)?;
    let mut recovery = Recovery::default();
    let mut segments = VecDeque::new();
    let mut bytes = 0;
    let ids = list_segments(&settings.dir)?;
    let last_id = ids.last().copied();
    for id in ids {
        let path = segment_path(&settings.dir, id);
        let mut data = Vec::new();
        File::open(&path)?.read_to_end(&mut data)?;
        let (records, end, garbage) = parse_records(id, 0, &data);
        let corrupt = records.iter().filter(|r| r.payload.is_none()).count() as u64;
        recovery.records += records.len() as u64 - corrupt;
        recovery.corrupt += corrupt;
        let mut len = data.len() as u64;
        if end < len {
            if Some(id) == last_id && !garbage {
                // A crash in the middle of an append: cut the torn record.
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(end)?;
                f.sync_all()?;
                recovery.truncated_bytes += len - end;
                len = end;
            } else {
                recovery.corrupt += 1;
                tracing::error!(
                    segment = id,
                    offset = end,
                    "spool segment has unreadable bytes after this offset; they are skipped"
                );
            }
        }
        if corrupt > 0 {
            tracing::error!(
                segment = id,
                corrupt,
                "corrupt DLQ spool records found: skipped and counted"
            );
        }
        bytes += len;
        segments.push_back(Segment {
            id,
            durable_len: end,
            sealed: true,
        });
        recovery.segments += 1;
    }
    if recovery.truncated_bytes > 0 {
        tracing::warn!(
            bytes = recovery.truncated_bytes,
            "DLQ spool ended in a torn record (crash?): truncated"
        );
    }
    metrics::counter!(telemetry::DLQ_MESSAGES, "route" => "", "result" => "corrupt")
        .increment(recovery.corrupt);
    let next_id = last_id.map(|i| i + 1).unwrap_or(1);
    let (confirmed, _) = tokio::sync::watch::channel((0, 0));
    let state = Arc::new(SpoolState {
        dir: settings.dir.clone(),
        segments: Mutex::new(segments),
        bytes: AtomicU64::new(bytes),
        corrupt: AtomicU64::new(recovery.corrupt),
        roll_requested: AtomicBool::new(false),
        appended: Notify::new(),
        confirmed,
        oldest_ms: AtomicU64::new(0),
    });
    metrics::gauge!(telemetry::DLQ_SPOOL_BYTES).set(bytes as f64);
    let (tx, rx) = mpsc::channel(4096);
    let writer = Writer::new(settings, state.clone(), next_id)?;
    std::thread::Builder::new()
        .name("dlq-spool".into())
        .spawn(move || writer.run(rx))?;
    Ok((SpoolWriter { tx, state }, recovery))
}

struct Writer {
    settings: SpoolSettings,
    state: Arc<SpoolState>,
    id: u64,
    file: File,
    size: u64,
}

impl Writer {
    fn new(settings: SpoolSettings, state: Arc<SpoolState>, id: u64) -> std::io::Result<Writer> {
        let file = Self::create(&settings.dir, id)?;
        if let Ok(mut s) = state.segments.lock() {
            s.push_back(Segment {
                id,
                durable_len: 0,
                sealed: false,
            });
        }
        Ok(Writer {
            settings,
            state,
            id,
            file,
            size: 0,
        })
    }

    fn create(dir: &Path, id: u64) -> std::io::Result<File> {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(dir, id))?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(f)
    }

    fn roll(&mut self) -> std::io::Result<()> {
        let next = self.id + 1;
        let file = Self::create(&self.settings.dir, next)?;
        if let Ok(mut s) = self.state.segments.lock() {
            if let Some(cur) = s.iter_mut().find(|s| s.id == self.id) {
                cur.sealed = true;
            }
            s.push_back(Segment {
                id: next,
                durable_len: 0,
                sealed: false,
            });
        }
        self.id = next;
        self.file = file;
        self.size = 0;
        Ok(())
    }

    fn run(mut self, mut rx: mpsc::Receiver<Append>) {
        let mut buf = Vec::with_capacity(1 << 20);
        let mut batch: Vec<(Append, u64)> = Vec::new();
        let mut last_sync = Instant::now();
        while let Some(first) = rx.blocking_recv() {
            let mut pending = vec![first];
            while pending.len() < 1024 {
                match rx.try_recv() {
                    Ok(a) => pending.push(a),
                    Err(_) => break,
                }
            }
            let since = last_sync.elapsed();
            if since < self.settings.fsync_interval {
                // Let more appends join this group: bounds the fsync rate.
                std::thread::sleep(self.settings.fsync_interval - since);
                while pending.len() < 1024 {
                    match rx.try_recv() {
                        Ok(a) => pending.push(a),
                        Err(_) => break,
                    }
                }
            }
            if (self.size >= self.settings.segment_bytes
                || self.state.roll_requested.swap(false, Ordering::Relaxed))
                && self.size > 0
            {
                if let Err(e) = self.roll() {
                    tracing::error!(error = %e, "cannot start a new spool segment");
                }
            }
            buf.clear();
            batch.clear();
            let mut used = self.state.bytes.load(Ordering::Relaxed);
            for a in pending {
                let rec_len = (HEADER + a.payload.len()) as u64;
                if used + rec_len > self.settings.max_bytes {
                    let _ = a.reply.send(Err(SpoolError::Full {
                        used,
                        max: self.settings.max_bytes,
                    }));
                    continue;
                }
                used += rec_len;
                let crc = crc32c::crc32c_append(crc32c::crc32c(&a.msg_id), &a.payload);
                buf.extend_from_slice(&(a.payload.len() as u32).to_le_bytes());
                buf.extend_from_slice(&crc.to_le_bytes());
                buf.extend_from_slice(&a.msg_id);
                buf.extend_from_slice(&a.payload);
                let end = self.size + buf.len() as u64;
                batch.push((a, end));
            }
            if batch.is_empty() {
                continue;
            }
            match self
                .file
                .write_all(&buf)
                .and_then(|_| self.file.sync_data())
            {
                Ok(()) => {
                    self.size += buf.len() as u64;
                    let total = self
                        .state
                        .bytes
                        .fetch_add(buf.len() as u64, Ordering::Relaxed)
                        + buf.len() as u64;
                    metrics::gauge!(telemetry::DLQ_SPOOL_BYTES).set(total as f64);
                    if let Ok(mut s) = self.state.segments.lock() {
                        if let Some(cur) = s.iter_mut().find(|s| s.id == self.id) {
                            cur.durable_len = self.size;
                        }
                    }
                    let _ = self.state.oldest_ms.compare_exchange(
                        0,
                        now_ms(),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    for (a, end) in batch.drain(..) {
                        let _ = a.reply.send(Ok((self.id, end)));
                    }
                    self.state.appended.notify_one();
                }
                Err(e) => {
                    tracing::error!(error = %e, "DLQ spool write failed: these messages are rejected");
                    let _ = self.file.set_len(self.size);
                    for (a, _) in batch.drain(..) {
                        let _ = a.reply.send(Err(SpoolError::Io(std::io::Error::new(
                            e.kind(),
                            e.to_string(),
                        ))));
                    }
                }
            }
            last_sync = Instant::now();
        }
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The drain side: the next records to hand on, and cleanup once they are.
pub struct SpoolReader {
    pub state: Arc<SpoolState>,
    cursor: Position,
}

impl SpoolReader {
    pub fn new(state: Arc<SpoolState>) -> Self {
        let cursor = load_cursor(&state.dir);
        SpoolReader { state, cursor }
    }

    /// Up to `max` records after the cursor (corrupt ones included, flagged), reading from
    /// the oldest segment. Deletes segments that are sealed and fully handed on.
    pub fn next_batch(&mut self, max_bytes: u64) -> std::io::Result<Vec<StoredRecord>> {
        loop {
            let front = match self.state.segments.lock() {
                Ok(s) => s.front().cloned(),
                Err(_) => None,
            };
            let Some(seg) = front else {
                return Ok(Vec::new());
            };
            let start = if self.cursor.0 == seg.id {
                self.cursor.1
            } else if self.cursor.0 > seg.id {
                seg.durable_len
            } else {
                0
            };
            if start >= seg.durable_len {
                if seg.sealed {
                    self.remove_front(seg.id)?;
                    continue;
                }
                if seg.durable_len > 0 {
                    // All handed on: let the writer start a new segment so this one can go.
                    self.state.roll_requested.store(true, Ordering::Relaxed);
                }
                self.state.oldest_ms.store(0, Ordering::Relaxed);
                return Ok(Vec::new());
            }
            let to = seg.durable_len.min(start + max_bytes.max(1 << 16));
            let (mut records, _stopped, garbage) = read_range(&self.state.dir, seg.id, start, to)?;
            if records.is_empty() {
                if garbage || to == seg.durable_len {
                    // Unframeable bytes up to the durable end: skip them.
                    self.state.corrupt.fetch_add(1, Ordering::Relaxed);
                    self.advance((seg.id, seg.durable_len));
                    continue;
                }
                // A record larger than the read window: read it whole.
                let (r, _, _) = read_range(&self.state.dir, seg.id, start, seg.durable_len)?;
                records = r.into_iter().take(1).collect();
            }
            return Ok(records);
        }
    }

    fn remove_front(&mut self, id: u64) -> std::io::Result<()> {
        let path = segment_path(&self.state.dir, id);
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if let Ok(mut s) = self.state.segments.lock() {
            if s.front().is_some_and(|f| f.id == id) {
                s.pop_front();
            }
        }
        let _ = self
            .state
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(len))
            });
        metrics::gauge!(telemetry::DLQ_SPOOL_BYTES).set(self.state.bytes() as f64);
        Ok(())
    }

    /// Marks everything up to `pos` as handed on.
    pub fn advance(&mut self, pos: Position) {
        if pos > self.cursor {
            self.cursor = pos;
            save_cursor(&self.state.dir, pos);
            self.state.confirmed.send_replace(pos);
        }
    }
}

/// `breakwater spool inspect DIR`: what a spool holds, without changing it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SpoolReport {
    pub dir: String,
    pub cursor: Position,
    pub segments: Vec<SegmentReport>,
    pub pending: u64,
    pub corrupt: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SegmentReport {
    pub id: u64,
    pub bytes: u64,
    pub records: Vec<RecordReport>,
    pub corrupt: u64,
    pub torn_tail_bytes: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RecordReport {
    pub msg_id: String,
    pub route: Option<String>,
    pub request_id: Option<String>,
    pub created_at: Option<String>,
    pub size: usize,
    pub handed_on: bool,
}

pub fn inspect(dir: &Path) -> std::io::Result<SpoolReport> {
    let cursor = load_cursor(dir);
    let mut report = SpoolReport {
        dir: dir.display().to_string(),
        cursor,
        segments: Vec::new(),
        pending: 0,
        corrupt: 0,
        bytes: 0,
    };
    for id in list_segments(dir)? {
        let mut data = Vec::new();
        File::open(segment_path(dir, id))?.read_to_end(&mut data)?;
        let (records, end, _) = parse_records(id, 0, &data);
        let mut seg = SegmentReport {
            id,
            bytes: data.len() as u64,
            records: Vec::new(),
            corrupt: 0,
            torn_tail_bytes: data.len() as u64 - end,
        };
        for r in records {
            let handed_on = (r.segment, r.end) <= cursor;
            match &r.payload {
                Some(p) => {
                    let env: Option<super::Envelope> = serde_json::from_slice(p).ok();
                    if !handed_on {
                        report.pending += 1;
                    }
                    seg.records.push(RecordReport {
                        msg_id: uuid::Uuid::from_bytes(r.msg_id).to_string(),
                        route: env.as_ref().map(|e| e.route.clone()),
                        request_id: env.as_ref().map(|e| e.request_id.clone()),
                        created_at: env.map(|e| e.created_at),
                        size: p.len(),
                        handed_on,
                    });
                }
                None => seg.corrupt += 1,
            }
        }
        report.corrupt += seg.corrupt;
        report.bytes += seg.bytes;
        report.segments.push(seg);
    }
    Ok(report)
}

impl SpoolReport {
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "spool {}: {} segment(s), {} bytes, {} pending, {} corrupt, cursor {}:{}",
            self.dir,
            self.segments.len(),
            self.bytes,
            self.pending,
            self.corrupt,
            self.cursor.0,
            self.cursor.1
        );
        let _ = writeln!(
            out,
            "{:<8} {:<38} {:<16} {:<38} {:<28} {:>8} STATE",
            "SEGMENT", "MSG ID", "ROUTE", "REQUEST ID", "CREATED", "BYTES"
        );
        for s in &self.segments {
            for r in &s.records {
                let _ = writeln!(
                    out,
                    "{:<8} {:<38} {:<16} {:<38} {:<28} {:>8} {}",
                    s.id,
                    r.msg_id,
                    r.route.as_deref().unwrap_or("?"),
                    r.request_id.as_deref().unwrap_or("?"),
                    r.created_at.as_deref().unwrap_or("?"),
                    r.size,
                    if r.handed_on { "handed on" } else { "pending" }
                );
            }
            if s.corrupt > 0 {
                let _ = writeln!(
                    out,
                    "{:<8} {} corrupt record(s) (checksum mismatch): skipped",
                    s.id, s.corrupt
                );
            }
            if s.torn_tail_bytes > 0 {
                let _ = writeln!(
                    out,
                    "{:<8} {} byte(s) of a torn record at the end",
                    s.id, s.torn_tail_bytes
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path, max: u64) -> SpoolSettings {
        SpoolSettings {
            dir: dir.to_path_buf(),
            max_bytes: max,
            segment_bytes: 1 << 20,
            fsync_interval: Duration::from_millis(1),
        }
    }

    #[tokio::test]
    async fn appended_records_survive_a_restart_and_a_corrupt_one_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (w, _) = open(settings(dir.path(), 1 << 30)).unwrap();
            for i in 0..3u8 {
                w.append([i; 16], Bytes::from(format!("payload-{i}")))
                    .await
                    .unwrap();
            }
        }
        // Flip a byte in the middle record's payload.
        let seg = segment_path(dir.path(), 1);
        let mut data = std::fs::read(&seg).unwrap();
        let second = HEADER + "payload-0".len() + HEADER + 2;
        data[second] ^= 0xff;
        // And leave a torn record at the end.
        data.extend_from_slice(&[9, 0, 0, 0, 1, 2]);
        std::fs::write(&seg, &data).unwrap();

        let (w, rec) = open(settings(dir.path(), 1 << 30)).unwrap();
        assert_eq!(rec.records, 2);
        assert_eq!(rec.corrupt, 1);
        assert_eq!(rec.truncated_bytes, 6);
        let mut reader = SpoolReader::new(w.state.clone());
        let batch = reader.next_batch(1 << 20).unwrap();
        let good: Vec<_> = batch.iter().filter_map(|r| r.payload.clone()).collect();
        assert_eq!(
            good,
            vec![Bytes::from("payload-0"), Bytes::from("payload-2")]
        );
        assert_eq!(inspect(dir.path()).unwrap().corrupt, 1);
    }

    #[tokio::test]
    async fn a_full_spool_rejects_and_keeps_what_it_has() {
        let dir = tempfile::tempdir().unwrap();
        let (w, _) = open(settings(dir.path(), 300)).unwrap();
        let mut results = Vec::new();
        for i in 0..5u8 {
            results.push(w.append([i; 16], Bytes::from(vec![b'x'; 100])).await);
        }
        assert!(results[0].is_ok() && results[1].is_ok());
        assert!(matches!(results[2], Err(SpoolError::Full { .. })));
        assert!(results[3..].iter().all(|r| r.is_err()));
        assert_eq!(inspect(dir.path()).unwrap().pending, 2);
    }

    #[tokio::test]
    async fn drained_segments_are_deleted_and_the_cursor_survives() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(dir.path(), 1 << 30);
        s.segment_bytes = 200;
        let (w, _) = open(s.clone()).unwrap();
        for i in 0..10u8 {
            w.append([i; 16], Bytes::from(vec![b'y'; 100]))
                .await
                .unwrap();
        }
        let mut reader = SpoolReader::new(w.state.clone());
        let mut seen = 0;
        for _ in 0..50 {
            let batch = reader.next_batch(1 << 20).unwrap();
            if batch.is_empty() {
                break;
            }
            seen += batch.len();
            let last = batch.last().unwrap();
            reader.advance((last.segment, last.end));
        }
        assert_eq!(seen, 10);
        assert!(w.state.segment_count() <= 2, "drained segments were kept");
        assert_eq!(inspect(dir.path()).unwrap().pending, 0);
    }
}
