//! `breakwater audit collect`: the central end of the decision log's copies. Consumes the
//! lines every sidecar publishes to `breakwater.audit` (see `publish`) and files them per
//! instance (`OUT/<instance>/decisions.jsonl`, rotated like the writer's), so that
//! `breakwater audit verify OUT/<instance>` checks each instance's chain.
//!
//! At least once in, exactly once on disk: a line whose `seq` was already written with the
//! same hash is a duplicate and dropped. Nothing is papered over: a skipped `seq` is a gap
//! (the line is still written, so `verify` shows where; the gap goes to stderr, to
//! `OUT/<instance>/gaps.jsonl` and into the exit status), a `seq` seen before with another
//! hash is a conflict (two sidecars with one instance name, or a reset chain:
//! `conflicts.jsonl`), and a message that is not a well-formed record is kept in
//! `OUT/_rejected/rejected.jsonl`. Deliveries are acked only after the lines (and reports)
//! they produced are written and fsync'd.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use tokio_util::sync::CancellationToken;

use super::record::{chain_hash, parse_line};
use crate::amqp::{reconnect_delay, Connections, Connector, Endpoints};

/// Hashes remembered per instance to tell a duplicate from a conflict (a republish after a
/// reconnect repeats at most a batch of 256 lines, see `publish`).
const WINDOW: usize = 4096;
/// Deliveries written (and fsync'd) together before one ack covers them.
const BATCH: usize = 512;

#[derive(Debug, Clone)]
pub struct CollectSettings {
    pub endpoints: Endpoints,
    pub exchange: String,
    pub queue: String,
    pub out: PathBuf,
    pub rotate_bytes: u64,
    /// Stop after this long without a message.
    pub idle_exit: Option<Duration>,
    /// Stop once this many messages were handled.
    pub max_messages: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("cannot write under {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Amqp(#[from] crate::amqp::AmqpError),
}

/// What one run saw, per instance.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct InstanceSummary {
    pub written: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub duplicates: u64,
    pub gaps: u64,
    pub missing: u64,
    pub conflicts: u64,
    /// Lines of a reported gap that arrived after it (kept in `late.jsonl`).
    pub late: u64,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct CollectSummary {
    pub messages: u64,
    pub rejected: u64,
    pub instances: std::collections::BTreeMap<String, InstanceSummary>,
}

impl CollectSummary {
    /// Gaps, conflicts or rejected messages: the collected log is not complete.
    pub fn has_problems(&self) -> bool {
        self.rejected > 0
            || self
                .instances
                .values()
                .any(|i| i.gaps > 0 || i.conflicts > 0)
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CollectError + '_ {
    move |source| CollectError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// One instance's files and where its chain stands.
struct Instance {
    dir: PathBuf,
    live: PathBuf,
    file: File,
    size: u64,
    /// The seq of the live file's last line (names the file when it is rotated).
    file_last_seq: u64,
    last: Option<(u64, String)>,
    recent: VecDeque<(u64, String)>,
    pending: Vec<u8>,
    reports: Vec<(&'static str, serde_json::Value)>,
}

impl Instance {
    /// Opens (or resumes) `out/<name>/decisions.jsonl`: a torn last line from a crash is cut,
    /// and the tail seeds the duplicate window.
    fn open(out: &Path, name: &str) -> Result<Instance, CollectError> {
        let dir = out.join(name);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let live = dir.join("decisions.jsonl");
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&live)
            .map_err(io_err(&live))?;
        let len = file.metadata().map_err(io_err(&live))?.len();
        let tail_start = len.saturating_sub(8 << 20);
        let mut tail = Vec::new();
        file.seek(SeekFrom::Start(tail_start))
            .and_then(|_| file.read_to_end(&mut tail))
            .map_err(io_err(&live))?;
        let good = tail.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        if tail_start + (good as u64) < len {
            file.set_len(tail_start + good as u64)
                .map_err(io_err(&live))?;
        }
        let mut recent = VecDeque::new();
        // The first line of a tail window may be cut: it does not parse and is skipped.
        for line in tail[..good].split(|&b| b == b'\n') {
            if let Some(p) = parse_line(line) {
                recent.push_back((p.seq, p.hash));
                if recent.len() > WINDOW {
                    recent.pop_front();
                }
            }
        }
        let size = tail_start + good as u64;
        let last = match recent.back() {
            Some(l) => Some(l.clone()),
            // Everything is in rotated files (or nothing yet).
            None => last_of(&super::writer::rotated_files(&live)),
        };
        Ok(Instance {
            file_last_seq: recent.back().map_or(0, |r| r.0),
            dir,
            live,
            file,
            size,
            last,
            recent,
            pending: Vec::new(),
            reports: Vec::new(),
        })
    }

    fn known(&self, seq: u64) -> Option<&str> {
        self.recent
            .iter()
            .rev()
            .find(|(s, _)| *s == seq)
            .map(|(_, h)| h.as_str())
    }

    fn report(&mut self, kind: &'static str, detail: serde_json::Value) {
        self.reports.push((kind, detail));
    }

    /// Writes what the batch produced and fsyncs it; rotates first when the file is full.
    fn flush(&mut self, rotate_bytes: u64) -> Result<(), CollectError> {
        let pending = std::mem::take(&mut self.pending);
        let mut chunk_start = 0;
        let mut chunk_end = 0;
        for line in pending.split_inclusive(|&b| b == b'\n') {
            let chunk = (chunk_end - chunk_start) as u64;
            if self.size + chunk > 0 && self.size + chunk + line.len() as u64 > rotate_bytes {
                // The file is full: what fits goes in first, then the next file starts.
                self.write_synced(&pending[chunk_start..chunk_end])?;
                self.rotate()?;
                chunk_start = chunk_end;
            }
            chunk_end += line.len();
        }
        self.write_synced(&pending[chunk_start..chunk_end])?;
        let reports = std::mem::take(&mut self.reports);
        for (kind, detail) in reports {
            append_synced(&self.dir.join(format!("{kind}.jsonl")), &detail)?;
        }
        Ok(())
    }

    fn write_synced(&mut self, bytes: &[u8]) -> Result<(), CollectError> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.file
            .write_all(bytes)
            .and_then(|_| self.file.sync_data())
            .map_err(io_err(&self.live))?;
        self.size += bytes.len() as u64;
        if let Some(p) = bytes[..bytes.len() - 1]
            .rsplit(|&b| b == b'\n')
            .next()
            .and_then(parse_line)
        {
            self.file_last_seq = p.seq;
        }
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), CollectError> {
        if self.size == 0 {
            return Ok(());
        }
        let stamp = super::rfc3339(SystemTime::now()).replace([':', '-'], "");
        // Named like the writer's rotated files: time, then the file's last seq.
        let seq = self.file_last_seq;
        let rotated = self
            .dir
            .join(format!("decisions-{}-{seq:012}.jsonl", &stamp[..15]));
        std::fs::rename(&self.live, &rotated).map_err(io_err(&rotated))?;
        self.file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&self.live)
            .map_err(io_err(&self.live))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))?;
        self.size = 0;
        Ok(())
    }
}

fn last_of(files: &[PathBuf]) -> Option<(u64, String)> {
    let bytes = std::fs::read(files.last()?).ok()?;
    bytes
        .split(|&b| b == b'\n')
        .rev()
        .find_map(parse_line)
        .map(|p| (p.seq, p.hash))
}

fn append_synced(path: &Path, value: &serde_json::Value) -> Result<(), CollectError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let mut line = value.to_string().into_bytes();
    line.push(b'\n');
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(&line).and_then(|_| f.sync_data()))
        .map_err(io_err(path))
}

/// A directory name from an instance name, or why it cannot be one.
fn instance_dir_name(name: &str) -> Option<&str> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    ok.then_some(name)
}

/// The files, the per-instance state and the counts of one run.
struct Collector {
    settings: CollectSettings,
    instances: HashMap<String, Instance>,
    summary: CollectSummary,
    rejected: Vec<serde_json::Value>,
}

impl Collector {
    fn instance(&mut self, name: &str) -> Result<&mut Instance, CollectError> {
        if !self.instances.contains_key(name) {
            let inst = Instance::open(&self.settings.out, name)?;
            self.instances.insert(name.to_string(), inst);
        }
        self.instances
            .get_mut(name)
            .ok_or_else(|| CollectError::Io {
                path: name.to_string(),
                source: std::io::Error::other("instance state missing"),
            })
    }

    fn reject(&mut self, reason: &str, app_id: Option<&str>, data: &[u8]) {
        self.summary.rejected += 1;
        tracing::error!(reason, app_id, "audit copy rejected (kept in _rejected/)");
        self.rejected.push(serde_json::json!({
            "reason": reason,
            "app_id": app_id,
            "received_at": super::rfc3339(SystemTime::now()),
            "data": String::from_utf8_lossy(data),
        }));
    }

    /// Files one message: appended to its instance's chain, dropped as a duplicate, or
    /// reported (gap, conflict, rejected).
    fn take(&mut self, data: &[u8], app_id: Option<&str>) -> Result<(), CollectError> {
        self.summary.messages += 1;
        let Some(p) = parse_line(data) else {
            self.reject("not a decision-log record", app_id, data);
            return Ok(());
        };
        if chain_hash(&p.prev_hash, &p.canonical) != p.hash {
            self.reject("the record's bytes do not match its hash", app_id, data);
            return Ok(());
        }
        let from_line = serde_json::from_slice::<serde_json::Value>(data)
            .ok()
            .and_then(|v| v.get("instance").and_then(|i| i.as_str()).map(String::from));
        let Some(name) = app_id.map(String::from).or(from_line) else {
            self.reject("no instance name (app_id)", app_id, data);
            return Ok(());
        };
        let Some(name) = instance_dir_name(&name).map(String::from) else {
            self.reject(
                "the instance name is not usable as a directory name",
                app_id,
                data,
            );
            return Ok(());
        };
        let inst = self.instance(&name)?;
        let mut sum = InstanceSummary::default();
        let now = super::rfc3339(SystemTime::now());
        match inst.last.clone() {
            Some((last, _)) if p.seq <= last => match inst.known(p.seq) {
                Some(h) if h == p.hash => sum.duplicates += 1,
                Some(_) => {
                    sum.conflicts += 1;
                    tracing::error!(instance = %name, seq = p.seq, "audit copy conflicts with the record already written at this seq (two sidecars with one instance name, or a reset log); kept in conflicts.jsonl");
                    inst.report(
                        "conflicts",
                        serde_json::json!({"seq": p.seq, "hash": p.hash, "detected_at": now, "reason": "another record was written at this seq", "line": String::from_utf8_lossy(data)}),
                    );
                }
                // Inside the window but never written: it fills a gap already reported,
                // too late for the chain file.
                None if !inst.recent.is_empty() && p.seq >= first_known(inst) => {
                    sum.late += 1;
                    tracing::warn!(instance = %name, seq = p.seq, "audit copy arrived after its gap was reported; kept in late.jsonl");
                    inst.report(
                        "late",
                        serde_json::json!({"seq": p.seq, "hash": p.hash, "detected_at": now, "line": String::from_utf8_lossy(data)}),
                    );
                }
                // Older than the window: written long ago (the publisher repeats only
                // recent lines).
                None => sum.duplicates += 1,
            },
            Some((last, last_hash)) => {
                if p.seq > last + 1 {
                    let missing = p.seq - last - 1;
                    sum.gaps += 1;
                    sum.missing += missing;
                    tracing::error!(instance = %name, after_seq = last, next_seq = p.seq, missing, "GAP in an instance's audit stream: records missing (fetch them from the sidecar's own file)");
                    inst.report(
                        "gaps",
                        serde_json::json!({"after_seq": last, "next_seq": p.seq, "missing": missing, "detected_at": now}),
                    );
                } else if p.prev_hash != last_hash {
                    sum.conflicts += 1;
                    tracing::error!(instance = %name, seq = p.seq, "audit copy does not link to the previous record; kept in conflicts.jsonl");
                    inst.report(
                        "conflicts",
                        serde_json::json!({"seq": p.seq, "hash": p.hash, "detected_at": now, "reason": "prev_hash does not match the previous record", "line": String::from_utf8_lossy(data)}),
                    );
                    fold(&mut self.summary, &name, sum, None);
                    return Ok(());
                }
                append(inst, p.seq, &p.hash, data);
                sum.written += 1;
            }
            None => {
                append(inst, p.seq, &p.hash, data);
                sum.written += 1;
            }
        }
        let seq = (sum.written > 0).then_some(p.seq);
        fold(&mut self.summary, &name, sum, seq);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), CollectError> {
        let rotate = self.settings.rotate_bytes;
        for inst in self.instances.values_mut() {
            inst.flush(rotate)?;
        }
        let rejected = std::mem::take(&mut self.rejected);
        let path = self.settings.out.join("_rejected").join("rejected.jsonl");
        for r in rejected {
            append_synced(&path, &r)?;
        }
        Ok(())
    }
}

fn first_known(inst: &Instance) -> u64 {
    inst.recent.front().map_or(0, |r| r.0)
}

fn append(inst: &mut Instance, seq: u64, hash: &str, data: &[u8]) {
    inst.pending.extend_from_slice(data);
    inst.pending.push(b'\n');
    inst.last = Some((seq, hash.to_string()));
    inst.recent.push_back((seq, hash.to_string()));
    if inst.recent.len() > WINDOW {
        inst.recent.pop_front();
    }
}

fn fold(summary: &mut CollectSummary, name: &str, add: InstanceSummary, seq: Option<u64>) {
    let s = summary.instances.entry(name.to_string()).or_default();
    s.written += add.written;
    s.duplicates += add.duplicates;
    s.gaps += add.gaps;
    s.missing += add.missing;
    s.conflicts += add.conflicts;
    s.late += add.late;
    if let Some(seq) = seq {
        s.first_seq.get_or_insert(seq);
        s.last_seq = Some(seq);
    }
}

/// Runs until `stop`, `idle_exit` or `max_messages`; reconnects (failing over between the
/// nodes) on loss. Returns what it saw.
pub async fn run(
    settings: CollectSettings,
    stop: CancellationToken,
) -> Result<CollectSummary, CollectError> {
    std::fs::create_dir_all(&settings.out).map_err(io_err(&settings.out))?;
    let mut connector = Connector::new(
        settings.endpoints.clone(),
        "audit_collect",
        "breakwater-audit-collect",
        Connections::default(),
    );
    let mut collector = Collector {
        settings,
        instances: HashMap::new(),
        summary: CollectSummary::default(),
        rejected: Vec::new(),
    };
    let mut attempt = 0u32;
    let mut idle_since = tokio::time::Instant::now();
    loop {
        // `--idle-exit-s` holds while no node is reachable too.
        let idle_over = collector.settings.idle_exit.map(|d| idle_since + d);
        let idle = async {
            match idle_over {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let opened = tokio::select! {
            _ = stop.cancelled() => return Ok(collector.summary),
            _ = idle => return Ok(collector.summary),
            c = open(&mut connector, &collector.settings) => c,
        };
        let (conn, channel, mut consumer) = match opened {
            Ok(c) => c,
            Err(e) => {
                attempt = attempt.saturating_add(1);
                tracing::warn!(error = %e, "cannot consume the decision log copies; retrying");
                let mut wait = reconnect_delay(attempt);
                if let Some(t) = idle_over {
                    wait = wait.min(t.saturating_duration_since(tokio::time::Instant::now()));
                }
                tokio::select! {
                    _ = stop.cancelled() => return Ok(collector.summary),
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
        };
        attempt = 0;
        let ended = consume(
            &mut collector,
            &channel,
            &mut consumer,
            &stop,
            &mut idle_since,
        )
        .await;
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(200, "done".into())).await;
        connector.lost();
        match ended {
            Ok(true) => return Ok(collector.summary),
            Ok(false) => continue,
            Err(e) => return Err(e),
        }
    }
}

async fn open(
    connector: &mut Connector,
    settings: &CollectSettings,
) -> Result<(lapin::Connection, lapin::Channel, lapin::Consumer), crate::amqp::AmqpError> {
    let (conn, channel) = connector.connect(&[settings.exchange.as_str()]).await?;
    // Quorum (survives a node), single active consumer (a standby collector takes over
    // when the active one dies, never two writing the same files).
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    channel
        .queue_declare(
            settings.queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await?;
    channel
        .queue_bind(
            settings.queue.as_str().into(),
            settings.exchange.as_str().into(),
            "audit.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .basic_qos(BATCH as u16 * 2, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            settings.queue.as_str().into(),
            "breakwater-audit-collect".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((conn, channel, consumer))
}

/// Takes batches until told to stop (`Ok(true)`) or the connection breaks (`Ok(false)`).
async fn consume(
    collector: &mut Collector,
    channel: &lapin::Channel,
    consumer: &mut lapin::Consumer,
    stop: &CancellationToken,
    idle_since: &mut tokio::time::Instant,
) -> Result<bool, CollectError> {
    loop {
        if let Some(max) = collector.settings.max_messages {
            if collector.summary.messages >= max {
                return Ok(true);
            }
        }
        let idle_left = collector
            .settings
            .idle_exit
            .map(|d| (*idle_since + d).saturating_duration_since(tokio::time::Instant::now()));
        if idle_left == Some(Duration::ZERO) {
            return Ok(true);
        }
        let first = tokio::select! {
            _ = stop.cancelled() => return Ok(true),
            n = tokio::time::timeout(idle_left.unwrap_or(Duration::from_secs(3600)), consumer.next()) => n,
        };
        let first = match first {
            Err(_) => continue,
            Ok(None) | Ok(Some(Err(_))) => return Ok(false),
            Ok(Some(Ok(d))) => d,
        };
        *idle_since = tokio::time::Instant::now();
        let mut last_tag = first.delivery_tag;
        collector.take(&first.data, app_id(&first))?;
        let room = collector
            .settings
            .max_messages
            .map_or(BATCH as u64, |m| {
                m.saturating_sub(collector.summary.messages)
            })
            .min(BATCH as u64);
        let mut broken = false;
        for _ in 1..room {
            match tokio::time::timeout(Duration::from_millis(20), consumer.next()).await {
                Ok(Some(Ok(d))) => {
                    last_tag = d.delivery_tag;
                    collector.take(&d.data, app_id(&d))?;
                }
                Ok(None) | Ok(Some(Err(_))) => {
                    broken = true;
                    break;
                }
                Err(_) => break,
            }
        }
        // Durable first, then the ack: a crash in between repeats lines, which are then
        // dropped as duplicates.
        collector.flush()?;
        let acked = channel
            .basic_ack(last_tag, BasicAckOptions { multiple: true })
            .await;
        if acked.is_err() || broken {
            return Ok(false);
        }
    }
}

fn app_id(d: &lapin::message::Delivery) -> Option<&str> {
    d.properties.app_id().as_ref().map(|s| s.as_str())
}
