//! The local write-ahead spool: every DLQ message is appended to a segment file and
//! fsync'd (group commit) before the client is told `spooled`/`queued`. A drainer reads
//! the segments in order; a segment is deleted only when every record in it has been
//! handed on (confirmed by RabbitMQ, or replayed locally).
//!
//! Record (v2): `magic: 4 bytes | len: u32 LE | msg_id: 16 bytes | crc32c(payload): u32 LE |
//! crc32c(the 28 bytes before): u32 LE | payload`. The header checksum makes a bad length
//! detectable: the reader then skips to the next valid header (the magic marks candidates),
//! so a flipped bit costs one record, never the rest of the segment. Segments written by
//! older versions (v1: `len | crc32c(msg_id ++ payload) | msg_id | payload`) are still read.
//! On start the spool is recovered: a torn tail is truncated, damaged records and regions
//! are counted, reported and skipped, and the drain resumes from the saved cursor.

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

const HEADER: usize = 4 + 4 + 16 + 4 + 4;
/// Starts every v2 record. The last byte is above any v1 length's high byte, which tells
/// the formats apart.
const MAGIC: [u8; 4] = [0x42, 0x57, 0x53, 0xF7];
/// The largest payload one record holds; `server.max_body_bytes` is capped to fit.
pub const MAX_PAYLOAD: u32 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("the spool is full ({used} of {max} bytes)")]
    Full { used: u64, max: u64 },
    #[error("spool I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("the spool writer has stopped")]
    Stopped,
    #[error("a {0}-byte message is larger than a spool record holds")]
    TooLarge(usize),
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
    /// Why the last append was refused, until one succeeds (or, for the spool's own size
    /// bound, until a drained segment frees room): readiness reports it as degraded.
    rejecting: Mutex<Option<Rejecting>>,
}

#[derive(Debug, Clone)]
enum Rejecting {
    /// `spool_max_bytes` reached.
    Full { max: u64 },
    /// The disk refused the write (full, read-only, I/O error).
    Io(String),
}

impl SpoolState {
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Why new messages are being rejected, if they are (the last append failed).
    pub fn rejecting(&self) -> Option<String> {
        let r = self.rejecting.lock().ok()?.clone()?;
        Some(match r {
            Rejecting::Full { max } => format!(
                "the DLQ spool is full ({} of {max} bytes): new messages are rejected",
                self.bytes()
            ),
            Rejecting::Io(e) => {
                format!("the DLQ spool cannot write ({e}): new messages are rejected")
            }
        })
    }

    fn set_rejecting(&self, r: Option<Rejecting>) {
        if let Ok(mut g) = self.rejecting.lock() {
            *g = r;
        }
    }

    pub fn segment_count(&self) -> usize {
        self.segments.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// The durable records after `pos` (about `max_bytes` of them, at least one), without
    /// moving anything: for readers that keep their own position (the per-route lanes of
    /// spool-only mode).
    pub fn read_after(&self, pos: Position, max_bytes: u64) -> std::io::Result<Vec<StoredRecord>> {
        let segments: Vec<Segment> = match self.segments.lock() {
            Ok(s) => s.iter().cloned().collect(),
            Err(_) => Vec::new(),
        };
        for seg in segments {
            let start = match seg.id.cmp(&pos.0) {
                std::cmp::Ordering::Less => continue,
                std::cmp::Ordering::Equal => pos.1,
                std::cmp::Ordering::Greater => 0,
            };
            if start >= seg.durable_len {
                continue;
            }
            let to = seg.durable_len.min(start + max_bytes.max(1 << 16));
            let mut records = read_range(&self.dir, seg.id, start, to, to == seg.durable_len)?;
            if records.is_empty() {
                records = read_range(&self.dir, seg.id, start, seg.durable_len, true)?;
            }
            return Ok(records);
        }
        Ok(Vec::new())
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

/// Why a stored record could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Damage {
    /// The header is sound but the payload fails its checksum: the record is known (its
    /// message id) and skipped.
    Checksum,
    /// Bytes that frame no record (a bad header, e.g. a flipped length bit): skipped up to
    /// the next valid record header.
    Unframed,
}

/// One record read back from a segment (or a damaged region, see `damage`).
#[derive(Debug, Clone)]
pub struct StoredRecord {
    pub segment: u64,
    /// Offset of the record (or of the damaged region).
    pub start: u64,
    /// Offset just past the record.
    pub end: u64,
    /// All zero for an unframed region.
    pub msg_id: [u8; 16],
    /// `None` when the record is damaged.
    pub payload: Option<Bytes>,
    pub damage: Option<Damage>,
}

impl StoredRecord {
    /// Logs and counts a damaged record that a reader skips.
    pub fn report_skipped(&self) {
        tracing::error!(
            segment = self.segment,
            from = self.start,
            to = self.end,
            damage = ?self.damage,
            "corrupt DLQ spool record skipped"
        );
        metrics::counter!(crate::telemetry::DLQ_MESSAGES, "route" => "", "result" => "corrupt")
            .increment(1);
    }
}

impl StoredRecord {
    fn damaged(segment: u64, start: u64, end: u64, msg_id: [u8; 16], damage: Damage) -> Self {
        StoredRecord {
            segment,
            start,
            end,
            msg_id,
            payload: None,
            damage: Some(damage),
        }
    }
}

/// Appends one v2 record to `buf`.
pub(crate) fn encode_record(buf: &mut Vec<u8>, msg_id: &[u8; 16], payload: &[u8]) {
    let start = buf.len();
    buf.extend_from_slice(&MAGIC);
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(msg_id);
    buf.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    let hcrc = crc32c::crc32c(&buf[start..start + 28]);
    buf.extend_from_slice(&hcrc.to_le_bytes());
    buf.extend_from_slice(payload);
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

enum Header {
    Valid {
        len: usize,
        msg_id: [u8; 16],
        crc: u32,
    },
    /// Too few bytes to tell (and no mismatch in those there are).
    Short,
    Bad,
}

fn header_at(rest: &[u8]) -> Header {
    if rest.len() >= 4 && rest[..4] != MAGIC {
        return Header::Bad;
    }
    if rest.len() < HEADER {
        return Header::Short;
    }
    if crc32c::crc32c(&rest[..28]) != le32(rest, 28) {
        return Header::Bad;
    }
    let len = le32(rest, 4);
    if len > MAX_PAYLOAD {
        return Header::Bad;
    }
    let mut msg_id = [0u8; 16];
    msg_id.copy_from_slice(&rest[8..24]);
    Header::Valid {
        len: len as usize,
        msg_id,
        crc: le32(rest, 24),
    }
}

/// The next offset at or after `from` where a valid header starts.
fn resync(bytes: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    while at + HEADER <= bytes.len() {
        let hit = bytes[at..].windows(4).position(|w| w == MAGIC)?;
        at += hit;
        if matches!(header_at(&bytes[at..]), Header::Valid { .. }) {
            return Some(at);
        }
        at += 1;
    }
    None
}

/// Reads records from `bytes` (which starts at file offset `base`). `complete` says the
/// bytes end where the segment's durable data ends, so nothing is left for later and a
/// short or unframeable tail is damage; otherwise a partial record at the end is left for
/// the next read. Returns the records (damaged ones included) and where reading stopped.
pub(crate) fn parse_records(
    segment: u64,
    base: u64,
    bytes: &[u8],
    complete: bool,
    legacy: bool,
) -> (Vec<StoredRecord>, u64) {
    if legacy {
        return parse_legacy(segment, base, bytes, complete);
    }
    let mut out = Vec::new();
    let mut pos = 0usize;
    let at = |p: usize| base + p as u64;
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        match header_at(rest) {
            Header::Valid { len, msg_id, crc } if rest.len() >= HEADER + len => {
                let body = &rest[HEADER..HEADER + len];
                let end = pos + HEADER + len;
                out.push(if crc32c::crc32c(body) == crc {
                    StoredRecord {
                        segment,
                        start: at(pos),
                        end: at(end),
                        msg_id,
                        payload: Some(Bytes::copy_from_slice(body)),
                        damage: None,
                    }
                } else {
                    StoredRecord::damaged(segment, at(pos), at(end), msg_id, Damage::Checksum)
                });
                pos = end;
                continue;
            }
            Header::Valid { .. } | Header::Short if !complete => break,
            _ => {}
        }
        // Nothing frames here: skip to the next valid header, so one bad length costs one
        // record, not the rest of the segment.
        let next = match resync(bytes, pos + 1) {
            Some(n) => n,
            None if complete => bytes.len(),
            // A header may straddle the end of this read: leave its possible start.
            None => bytes.len().saturating_sub(HEADER - 1).max(pos),
        };
        if next == pos {
            break;
        }
        out.push(StoredRecord::damaged(
            segment,
            at(pos),
            at(next),
            [0; 16],
            Damage::Unframed,
        ));
        pos = next;
    }
    (out, at(pos))
}

/// v1 segments (written before the header checksum existed): `len | crc32c(msg_id ++
/// payload) | msg_id | payload`. Their lengths cannot be checked, so an impossible length
/// still loses the rest of such a segment; only segments written before the upgrade have
/// this format (a new run always starts a new segment). `complete` as in `parse_records`:
/// a record cut off by the end of an incomplete read is left for the next read.
fn parse_legacy(segment: u64, base: u64, bytes: &[u8], complete: bool) -> (Vec<StoredRecord>, u64) {
    const V1_HEADER: usize = 24;
    let mut out = Vec::new();
    let mut pos = 0usize;
    loop {
        let left = bytes.len() - pos;
        if left < V1_HEADER {
            if !complete {
                return (out, base + pos as u64);
            }
            break;
        }
        let len = le32(bytes, pos);
        if len > MAX_PAYLOAD {
            if !complete {
                // The rest of the segment is one damaged stretch, as in a whole read (the
                // drainer re-reads from here to the segment's end): a window must not end
                // the damage early and parse what follows as records.
                return (out, base + pos as u64);
            }
            break;
        }
        let total = V1_HEADER + len as usize;
        if left < total {
            if !complete {
                return (out, base + pos as u64);
            }
            break;
        }
        let crc = le32(bytes, pos + 4);
        let mut msg_id = [0u8; 16];
        msg_id.copy_from_slice(&bytes[pos + 8..pos + 24]);
        let body = &bytes[pos + 24..pos + total];
        let actual = crc32c::crc32c_append(crc32c::crc32c(&msg_id), body);
        let (start, end) = (base + pos as u64, base + (pos + total) as u64);
        out.push(if actual == crc {
            StoredRecord {
                segment,
                start,
                end,
                msg_id,
                payload: Some(Bytes::copy_from_slice(body)),
                damage: None,
            }
        } else {
            StoredRecord::damaged(segment, start, end, msg_id, Damage::Checksum)
        });
        pos += total;
    }
    if pos < bytes.len() {
        out.push(StoredRecord::damaged(
            segment,
            base + pos as u64,
            base + bytes.len() as u64,
            [0; 16],
            Damage::Unframed,
        ));
    }
    (out, base + bytes.len() as u64)
}

/// A segment is v1 when it starts with a plausible v1 length instead of the v2 magic
/// (whose last byte no v1 length below `MAX_PAYLOAD` can have).
pub(crate) fn is_legacy(first: &[u8]) -> bool {
    first.len() >= 4 && first[..4] != MAGIC && le32(first, 0) <= MAX_PAYLOAD
}

/// Reads the records of a segment between `from` and `to`; `complete` as in
/// `parse_records`.
pub fn read_range(
    dir: &Path,
    segment: u64,
    from: u64,
    to: u64,
    complete: bool,
) -> std::io::Result<Vec<StoredRecord>> {
    let mut f = File::open(segment_path(dir, segment))?;
    let mut first = [0u8; 4];
    let legacy = f.read_exact(&mut first).is_ok() && is_legacy(&first);
    f.seek(SeekFrom::Start(from))?;
    let mut buf = vec![0u8; (to.saturating_sub(from)) as usize];
    f.read_exact(&mut buf)?;
    Ok(parse_records(segment, from, &buf, complete, legacy).0)
}

/// The sound payloads of a file framed like a v2 segment (the parked area).
pub(crate) fn parse_plain(data: &[u8]) -> Vec<Bytes> {
    parse_records(0, 0, data, true, false)
        .0
        .into_iter()
        .filter_map(|r| r.payload)
        .collect()
}

fn parse_file(id: u64, data: &[u8]) -> Vec<StoredRecord> {
    parse_records(id, 0, data, true, is_legacy(data)).0
}

/// The trailing unframed region of a segment, if any: in the newest segment that is a
/// torn append (a crash mid-write), not corruption.
pub(crate) fn torn_tail(records: &[StoredRecord], len: u64) -> Option<u64> {
    records
        .last()
        .filter(|r| r.damage == Some(Damage::Unframed) && r.end == len)
        .map(|r| r.start)
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
    if crate::private_fs::write(&tmp, format!("{}:{}\n", pos.0, pos.1)).is_ok() {
        let _ = std::fs::rename(&tmp, cursor_path(dir));
    }
}

/// Opens the spool: recovers what a previous run left, starts the writer thread.
pub fn open(settings: SpoolSettings) -> Result<(SpoolWriter, Recovery), SpoolError> {
    crate::private_fs::create_dir_all(&settings.dir)?;
    let mut recovery = Recovery::default();
    let mut segments = VecDeque::new();
    let mut bytes = 0;
    let ids = list_segments(&settings.dir)?;
    let last_id = ids.last().copied();
    for id in ids {
        let path = segment_path(&settings.dir, id);
        let mut data = Vec::new();
        File::open(&path)?.read_to_end(&mut data)?;
        let records = parse_file(id, &data);
        let mut len = data.len() as u64;
        let mut counted = records.as_slice();
        if Some(id) == last_id {
            if let Some(cut) = torn_tail(&records, len) {
                // A crash in the middle of an append: cut the torn record.
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(cut)?;
                f.sync_all()?;
                recovery.truncated_bytes += len - cut;
                len = cut;
                counted = &records[..records.len() - 1];
            }
        }
        let corrupt = counted.iter().filter(|r| r.damage.is_some()).count() as u64;
        recovery.records += counted.len() as u64 - corrupt;
        recovery.corrupt += corrupt;
        for r in counted
            .iter()
            .filter(|r| r.damage == Some(Damage::Unframed))
        {
            tracing::error!(
                segment = id,
                from = r.start,
                to = r.end,
                "DLQ spool bytes frame no record (bad header): skipped to the next valid record"
            );
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
            durable_len: len,
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
        rejecting: Mutex::new(None),
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
        let f = crate::private_fs::open(
            OpenOptions::new().create(true).append(true),
            &segment_path(dir, id),
        )?;
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
                if a.payload.len() > MAX_PAYLOAD as usize {
                    let _ = a.reply.send(Err(SpoolError::TooLarge(a.payload.len())));
                    continue;
                }
                let rec_len = (HEADER + a.payload.len()) as u64;
                if used + rec_len > self.settings.max_bytes {
                    self.state.set_rejecting(Some(Rejecting::Full {
                        max: self.settings.max_bytes,
                    }));
                    let _ = a.reply.send(Err(SpoolError::Full {
                        used,
                        max: self.settings.max_bytes,
                    }));
                    continue;
                }
                used += rec_len;
                encode_record(&mut buf, &a.msg_id, &a.payload);
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
                    self.state.set_rejecting(None);
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
                    // Every waiting reader (the per-route lanes of spool-only mode), and a
                    // stored permit for one that is between reads.
                    self.state.appended.notify_waiters();
                    self.state.appended.notify_one();
                }
                Err(e) => {
                    tracing::error!(error = %e, "DLQ spool write failed: these messages are rejected");
                    self.state.set_rejecting(Some(Rejecting::Io(e.to_string())));
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
    /// the oldest segment. Deletes segments that are sealed and fully handed on. (The
    /// drainer reads ahead with `read_from`; the spool's tests read in order with this.)
    #[cfg(test)]
    pub fn next_batch(&mut self, max_bytes: u64) -> std::io::Result<Vec<StoredRecord>> {
        self.read_from(self.cursor, max_bytes)
    }

    /// Like `next_batch`, but after `from`, which may be past the cursor: the drainer reads
    /// ahead of what is handed on while earlier records await their confirms.
    pub fn read_from(
        &mut self,
        from: Position,
        max_bytes: u64,
    ) -> std::io::Result<Vec<StoredRecord>> {
        self.release(self.cursor)?;
        self.state.read_after(from.max(self.cursor), max_bytes)
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
        // Room was freed: the size bound may take messages again.
        if let Ok(mut r) = self.state.rejecting.lock() {
            if matches!(*r, Some(Rejecting::Full { .. })) {
                *r = None;
            }
        }
        Ok(())
    }

    pub fn cursor(&self) -> Position {
        self.cursor
    }

    /// Marks everything up to `pos` as handed on and deletes the segments that are then
    /// wholly handed on (what `next_batch` does for the in-order drain).
    pub fn release(&mut self, pos: Position) -> std::io::Result<()> {
        self.advance(pos);
        loop {
            let front = match self.state.segments.lock() {
                Ok(s) => s.front().cloned(),
                Err(_) => None,
            };
            let Some(seg) = front else { return Ok(()) };
            if self.cursor < (seg.id, seg.durable_len) {
                return Ok(());
            }
            if !seg.sealed {
                if seg.durable_len > 0 {
                    self.state.roll_requested.store(true, Ordering::Relaxed);
                }
                self.state.oldest_ms.store(0, Ordering::Relaxed);
                return Ok(());
            }
            self.remove_front(seg.id)?;
        }
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
    /// Messages parked locally (spool-only mode), waiting for a requeue.
    pub parked: Vec<super::parked::Parked>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SegmentReport {
    pub id: u64,
    pub bytes: u64,
    /// `v2`, or `v1` for a segment written before record headers had a checksum.
    pub format: &'static str,
    pub records: Vec<RecordReport>,
    pub corrupt: u64,
    /// What was skipped, and why.
    pub damaged: Vec<DamageReport>,
    pub torn_tail_bytes: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DamageReport {
    pub offset: u64,
    pub bytes: u64,
    pub kind: Damage,
    /// Known when only the payload is bad.
    pub msg_id: Option<String>,
    pub handed_on: bool,
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
        parked: super::parked::list(dir)?,
    };
    let ids = list_segments(dir)?;
    let last_id = ids.last().copied();
    for id in ids {
        let mut data = Vec::new();
        File::open(segment_path(dir, id))?.read_to_end(&mut data)?;
        let mut records = parse_file(id, &data);
        let len = data.len() as u64;
        let mut torn_tail_bytes = 0;
        if Some(id) == last_id {
            if let Some(cut) = torn_tail(&records, len) {
                torn_tail_bytes = len - cut;
                records.pop();
            }
        }
        let mut seg = SegmentReport {
            id,
            bytes: len,
            format: if is_legacy(&data) { "v1" } else { "v2" },
            records: Vec::new(),
            corrupt: 0,
            damaged: Vec::new(),
            torn_tail_bytes,
        };
        for r in records {
            let handed_on = (r.segment, r.end) <= cursor;
            match (&r.payload, r.damage) {
                (Some(p), _) => {
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
                (None, damage) => {
                    let kind = damage.unwrap_or(Damage::Unframed);
                    seg.corrupt += 1;
                    seg.damaged.push(DamageReport {
                        offset: r.start,
                        bytes: r.end - r.start,
                        kind,
                        msg_id: (kind == Damage::Checksum)
                            .then(|| uuid::Uuid::from_bytes(r.msg_id).to_string()),
                        handed_on,
                    });
                }
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
            "spool {}: {} segment(s), {} bytes, {} pending, {} corrupt, {} parked, cursor {}:{}",
            self.dir,
            self.segments.len(),
            self.bytes,
            self.pending,
            self.corrupt,
            self.parked.len(),
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
            if s.format == "v1" {
                let _ = writeln!(
                    out,
                    "{:<8} old (v1) segment format: a bad length loses the rest of it",
                    s.id
                );
            }
            for d in &s.damaged {
                let what = match (d.kind, &d.msg_id) {
                    (Damage::Checksum, Some(id)) => {
                        format!("record {id}: payload checksum mismatch")
                    }
                    _ => "bytes that frame no record (bad record header)".to_string(),
                };
                let _ = writeln!(
                    out,
                    "{:<8} CORRUPT at offset {} ({} bytes): {what}: skipped",
                    s.id, d.offset, d.bytes
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
        if !self.parked.is_empty() {
            let _ = writeln!(
                out,
                "PARKED (requeue: POST /admin/dlq/parked/requeue?route=NAME)\n{:<38} {:<16} {:<38} {:<28} REASON",
                "MSG ID", "ROUTE", "REQUEST ID", "PARKED AT"
            );
            for p in &self.parked {
                let _ = writeln!(
                    out,
                    "{:<38} {:<16} {:<38} {:<28} {}",
                    p.envelope.msg_id,
                    p.envelope.route,
                    p.envelope.request_id,
                    p.parked_at,
                    p.reason
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

    /// Where a record's length field sits, from the record's start.
    const LEN_AT: usize = 4;

    async fn three_records(dir: &Path) -> (Vec<u8>, Vec<usize>) {
        {
            let (w, _) = open(settings(dir, 1 << 30)).unwrap();
            for i in 0..3u8 {
                w.append(
                    [i + 1; 16],
                    Bytes::from(format!("payload-{i}-{}", "z".repeat(40))),
                )
                .await
                .unwrap();
            }
        }
        let data = std::fs::read(segment_path(dir, 1)).unwrap();
        let size = data.len() / 3;
        (data, vec![0, size, 2 * size])
    }

    fn good_payloads(dir: &Path) -> Vec<Bytes> {
        let (w, _) = open(settings(dir, 1 << 30)).unwrap();
        let mut reader = SpoolReader::new(w.state.clone());
        let mut out = Vec::new();
        for _ in 0..10 {
            let batch = reader.next_batch(1 << 20).unwrap();
            let Some(last) = batch.last() else { break };
            reader.advance((last.segment, last.end));
            out.extend(batch.into_iter().filter_map(|r| r.payload));
        }
        out
    }

    #[tokio::test]
    async fn one_flipped_bit_in_a_length_field_loses_only_that_record() {
        for bit in [0u8, 3, 7] {
            let dir = tempfile::tempdir().unwrap();
            let (mut data, starts) = three_records(dir.path()).await;
            data[starts[1] + LEN_AT] ^= 1 << bit;
            std::fs::write(segment_path(dir.path(), 1), &data).unwrap();
            let report = inspect(dir.path()).unwrap();
            assert_eq!(report.pending, 2, "bit {bit}: {}", report.table());
            assert_eq!(report.corrupt, 1, "bit {bit}: {}", report.table());
            assert!(
                report.table().contains("CORRUPT at offset"),
                "{}",
                report.table()
            );
            let got = good_payloads(dir.path());
            assert_eq!(got.len(), 2, "bit {bit}: {got:?}");
            assert!(got[0].starts_with(b"payload-0") && got[1].starts_with(b"payload-2"));
        }
    }

    #[tokio::test]
    async fn a_length_beyond_the_record_maximum_loses_only_that_record() {
        let dir = tempfile::tempdir().unwrap();
        let (mut data, starts) = three_records(dir.path()).await;
        let at = starts[1] + LEN_AT;
        data[at..at + 4].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        std::fs::write(segment_path(dir.path(), 1), &data).unwrap();
        let got = good_payloads(dir.path());
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[1].starts_with(b"payload-2"));
    }

    #[tokio::test]
    async fn the_writer_refuses_a_payload_larger_than_a_record_holds() {
        let dir = tempfile::tempdir().unwrap();
        let (w, _) = open(settings(dir.path(), 1 << 30)).unwrap();
        let big = Bytes::from(vec![b'x'; MAX_PAYLOAD as usize + 1]);
        assert!(matches!(
            w.append([1; 16], big).await,
            Err(SpoolError::TooLarge(_))
        ));
        w.append([2; 16], Bytes::from("ok")).await.unwrap();
        drop(w);
        assert_eq!(good_payloads(dir.path()), vec![Bytes::from("ok")]);
    }

    fn v1_segment(records: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut v1 = Vec::new();
        for (i, p) in records {
            let id = [*i; 16];
            v1.extend_from_slice(&(p.len() as u32).to_le_bytes());
            v1.extend_from_slice(&crc32c::crc32c_append(crc32c::crc32c(&id), p).to_le_bytes());
            v1.extend_from_slice(&id);
            v1.extend_from_slice(p);
        }
        v1
    }

    /// Found by fuzz/spool: a v1 record that straddles the drainer's read window was
    /// reported as damage and skipped, and the next read started inside it, so the rest of
    /// an old segment larger than the window was lost.
    #[tokio::test]
    async fn an_old_format_segment_larger_than_the_read_window_is_drained_whole() {
        let dir = tempfile::tempdir().unwrap();
        let records: Vec<(u8, Vec<u8>)> =
            (0..5u8).map(|i| (i + 1, vec![b'a' + i; 30_000])).collect();
        std::fs::write(segment_path(dir.path(), 1), v1_segment(&records)).unwrap();
        let (w, rec) = open(settings(dir.path(), 1 << 30)).unwrap();
        assert_eq!((rec.records, rec.corrupt), (5, 0));
        let mut reader = SpoolReader::new(w.state.clone());
        let mut got = Vec::new();
        for _ in 0..20 {
            // The smallest window the reader uses (64 KiB): two records and a part.
            let batch = reader.next_batch(0).unwrap();
            let Some(last) = batch.last() else { break };
            reader.advance((last.segment, last.end));
            for r in batch {
                assert_eq!(
                    r.damage, None,
                    "a sound v1 record read as damage at {}",
                    r.start
                );
                got.push(r.payload.unwrap());
            }
        }
        let want: Vec<Bytes> = records.into_iter().map(|(_, p)| Bytes::from(p)).collect();
        assert_eq!(got, want);
    }

    /// Found by fuzz/spool: in an old segment, an impossible length inside the drainer's
    /// read window was marked as damage only up to the window's end, and the next read
    /// parsed the garbage after it as records. A whole read (`spool inspect`, recovery)
    /// counts everything from the bad length on as one damaged stretch; the drain must too.
    #[tokio::test]
    async fn an_old_format_segment_with_a_bad_length_drains_as_a_whole_read_does() {
        let dir = tempfile::tempdir().unwrap();
        let first = vec![b'a'; 40_000];
        // Where the window (64 KiB) ends, the garbage happens to hold a sound v1 record.
        let window = 1usize << 16;
        let mut seg = v1_segment(&[(1, first.clone())]);
        seg.extend_from_slice(&u32::MAX.to_le_bytes());
        seg.resize(window, 0x5a);
        seg.extend_from_slice(&v1_segment(&[(2, vec![b'z'; 100])]));
        std::fs::write(segment_path(dir.path(), 1), &seg).unwrap();
        // Written after the upgrade: the old segment is not the newest, so recovery keeps it.
        std::fs::write(segment_path(dir.path(), 2), b"").unwrap();
        let whole = parse_file(1, &seg);
        assert_eq!(whole.iter().filter(|r| r.payload.is_some()).count(), 1);

        let (w, _) = open(settings(dir.path(), 1 << 30)).unwrap();
        let mut reader = SpoolReader::new(w.state.clone());
        let mut sound = Vec::new();
        for _ in 0..20 {
            let batch = reader.next_batch(0).unwrap();
            let Some(last) = batch.last() else { break };
            reader.advance((last.segment, last.end));
            sound.extend(batch.into_iter().filter_map(|r| r.payload));
        }
        let lens: Vec<usize> = sound.iter().map(|p| p.len()).collect();
        assert_eq!(
            lens,
            [first.len()],
            "the drain read records a whole read does not"
        );
        assert_eq!(sound[0], first);
    }

    #[tokio::test]
    async fn old_format_segments_are_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut v1 = Vec::new();
        for (i, p) in [b"old-0".as_slice(), b"old-1"].iter().enumerate() {
            let id = [i as u8 + 7; 16];
            v1.extend_from_slice(&(p.len() as u32).to_le_bytes());
            v1.extend_from_slice(&crc32c::crc32c_append(crc32c::crc32c(&id), p).to_le_bytes());
            v1.extend_from_slice(&id);
            v1.extend_from_slice(p);
        }
        std::fs::write(segment_path(dir.path(), 1), &v1).unwrap();
        let report = inspect(dir.path()).unwrap();
        assert_eq!(report.segments[0].format, "v1");
        assert_eq!(report.pending, 2);
        assert_eq!(
            good_payloads(dir.path()),
            vec![Bytes::from("old-0"), Bytes::from("old-1")]
        );
    }
}
