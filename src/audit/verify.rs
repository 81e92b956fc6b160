//! `breakwater audit verify` and `audit find`: check the hash chain across rotated files
//! and report the first record that was edited, removed or moved.

use std::path::{Path, PathBuf};

use super::checkpoint::{message, PublicKey};
use super::record::{chain_hash, parse_line, ParsedLine};
use super::writer::rotated_files;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Problem {
    /// The record's bytes do not match its hash: edited.
    Tampered,
    /// A sequence number is skipped: records were removed.
    Missing,
    /// A sequence number goes backwards: records were moved or swapped.
    Reordered,
    /// The record does not link to the one before it.
    BrokenLink,
    /// Not a decision-log line at all.
    Malformed,
    /// A checkpoint whose head or count is not the chain's, whose signature does not
    /// verify under the public key, or that another key signed: forged or rewritten.
    BadCheckpoint,
    /// Checked with a public key, the log holds no checkpoint signed by it.
    NoCheckpoint,
}

#[derive(Debug, Clone, thiserror::Error, serde::Serialize)]
#[error("{file}:{line}: {problem:?} at seq {seq:?}: {detail}")]
pub struct VerifyError {
    pub file: String,
    pub line: usize,
    pub seq: Option<u64>,
    pub problem: Problem,
    pub detail: String,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyReport {
    pub files: usize,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub last_hash: Option<String>,
    /// Decision records the chain says were lost (the sum of its `records_lost` events):
    /// an intact chain that is not a complete record.
    pub records_lost: u64,
    /// Sequence numbers of the `records_lost` events.
    pub loss_events: Vec<u64>,
    /// When the first record was made.
    pub first_ts: Option<String>,
    /// Checkpoints found (and, with a public key, whose signatures verified).
    pub checkpoints: u64,
    pub last_checkpoint_seq: Option<u64>,
    pub last_checkpoint_ts: Option<String>,
    /// Records after the last checkpoint (every record when there is none): what no
    /// signature vouches for. Not 0 when the log was cut, its writer crashed, or it is
    /// still being written.
    pub unanchored: u64,
    /// The id of the public key the signatures were checked with, if any.
    pub signed_by: Option<String>,
}

impl VerifyReport {
    /// The log ends at a checkpoint: every record in it is anchored.
    pub fn ends_at_checkpoint(&self) -> bool {
        self.checkpoints > 0 && self.unanchored == 0
    }
}

/// Expands directories and log paths into the chain's files, oldest first: rotated files
/// (named by time) before the live file.
pub fn chain_files(paths: &[PathBuf]) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut live = Vec::new();
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)?
                .flatten()
                .map(|e| e.path())
                .filter(|f| f.extension().is_some_and(|e| e == "jsonl"))
                .collect();
            entries.sort();
            for f in entries {
                let rotated = f
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .is_some_and(|s| s.contains('-'));
                if rotated {
                    out.push(f);
                } else {
                    live.push(f);
                }
            }
            out.extend(live);
        } else if p.exists() {
            // A live file: include its rotated predecessors when given alone.
            if paths.len() == 1 {
                out.extend(rotated_files(p));
            }
            if !out.contains(p) {
                out.push(p.clone());
            }
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} not found", p.display()),
            ));
        }
    }
    Ok(out)
}

pub fn verify_paths(paths: &[PathBuf]) -> Result<VerifyReport, VerifyError> {
    verify_signed(paths, None)
}

/// [`verify_paths`], and with `key` every checkpoint's signature too: a log without a
/// checkpoint signed by `key` fails ([`Problem::NoCheckpoint`]); records after the last
/// checkpoint are counted in [`VerifyReport::unanchored`], not failed (a live log has them).
pub fn verify_signed(
    paths: &[PathBuf],
    key: Option<&PublicKey>,
) -> Result<VerifyReport, VerifyError> {
    let files = chain_files(paths).map_err(|e| VerifyError {
        file: String::new(),
        line: 0,
        seq: None,
        problem: Problem::Malformed,
        detail: e.to_string(),
    })?;
    let mut report = VerifyReport {
        files: files.len(),
        signed_by: key.map(|k| k.key_id.clone()),
        ..Default::default()
    };
    for file in &files {
        verify_file(file, &mut report, key)?;
    }
    if key.is_some() && report.checkpoints == 0 {
        return Err(VerifyError {
            file: files
                .last()
                .map(|f| f.display().to_string())
                .unwrap_or_default(),
            line: 0,
            seq: None,
            problem: Problem::NoCheckpoint,
            detail: format!(
                "no checkpoint signed by key {} in {} record(s): nothing vouches for this log",
                report.signed_by.as_deref().unwrap_or("-"),
                report.records
            ),
        });
    }
    Ok(report)
}

fn verify_file(
    path: &Path,
    report: &mut VerifyReport,
    key: Option<&PublicKey>,
) -> Result<(), VerifyError> {
    let bytes = std::fs::read(path).map_err(|e| VerifyError {
        file: path.display().to_string(),
        line: 0,
        seq: None,
        problem: Problem::Malformed,
        detail: e.to_string(),
    })?;
    verify_bytes_with(&path.display().to_string(), &bytes, report, key)
}

/// Checks the lines of one file (named `file` in errors), continuing the chain in `report`.
pub(crate) fn verify_bytes(
    file: &str,
    bytes: &[u8],
    report: &mut VerifyReport,
) -> Result<(), VerifyError> {
    verify_bytes_with(file, bytes, report, None)
}

/// [`verify_bytes`], checking checkpoint signatures under `key` when given.
pub(crate) fn verify_bytes_with(
    file: &str,
    bytes: &[u8],
    report: &mut VerifyReport,
    key: Option<&PublicKey>,
) -> Result<(), VerifyError> {
    let fail = |line: usize, seq: Option<u64>, problem: Problem, detail: String| VerifyError {
        file: file.to_string(),
        line,
        seq,
        problem,
        detail,
    };
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        if raw.is_empty() {
            continue;
        }
        let line_no = i + 1;
        let Some(p) = parse_line(raw) else {
            return Err(fail(
                line_no,
                None,
                Problem::Malformed,
                "not a decision-log record".into(),
            ));
        };
        if let Some(last) = report.last_seq {
            if p.seq <= last {
                return Err(fail(
                    line_no,
                    Some(p.seq),
                    Problem::Reordered,
                    format!("seq {} after seq {last}", p.seq),
                ));
            }
            if p.seq > last + 1 {
                return Err(fail(
                    line_no,
                    Some(p.seq),
                    Problem::Missing,
                    format!(
                        "seq {} follows seq {last}: {} record(s) missing",
                        p.seq,
                        p.seq - last - 1
                    ),
                ));
            }
        }
        if chain_hash(&p.prev_hash, &p.canonical) != p.hash {
            return Err(fail(
                line_no,
                Some(p.seq),
                Problem::Tampered,
                "the record's bytes do not match its hash".into(),
            ));
        }
        if let Some(prev) = &report.last_hash {
            if &p.prev_hash != prev {
                return Err(fail(
                    line_no,
                    Some(p.seq),
                    Problem::BrokenLink,
                    "prev_hash does not match the previous record's hash".into(),
                ));
            }
        }
        if let Some(n) = p.records_lost {
            // Saturating: a crafted chain must not overflow the sum.
            report.records_lost = report.records_lost.saturating_add(n);
            report.loss_events.push(p.seq);
        }
        if let Some(detail) = &p.checkpoint {
            check_checkpoint(&p, detail, key)
                .map_err(|why| fail(line_no, Some(p.seq), Problem::BadCheckpoint, why))?;
            report.checkpoints += 1;
            report.last_checkpoint_seq = Some(p.seq);
            report.last_checkpoint_ts = p.ts.clone();
            report.unanchored = 0;
        } else {
            report.unanchored += 1;
        }
        if report.first_seq.is_none() {
            report.first_seq = Some(p.seq);
            report.first_ts = p.ts;
        }
        report.last_seq = Some(p.seq);
        report.last_hash = Some(p.hash);
        report.records += 1;
    }
    Ok(())
}

/// A checkpoint must name the record right before it (its own `prev_hash` and seq) and,
/// under `key`, carry that key's id and its signature over [`message`].
fn check_checkpoint(
    p: &ParsedLine,
    detail: &serde_json::Value,
    key: Option<&PublicKey>,
) -> Result<(), String> {
    let text = |k: &str| detail.get(k).and_then(serde_json::Value::as_str);
    let (Some(head), Some(count), Some(key_id), Some(signature)) = (
        text("head"),
        detail.get("count").and_then(serde_json::Value::as_u64),
        text("key_id"),
        text("signature"),
    ) else {
        return Err("a checkpoint without head, count, key_id and signature".into());
    };
    if head != p.prev_hash || count.checked_add(1) != Some(p.seq) {
        return Err(format!(
            "the checkpoint claims head {head} at seq {count}; the chain has {} at seq {}",
            p.prev_hash,
            p.seq.saturating_sub(1)
        ));
    }
    let Some(key) = key else { return Ok(()) };
    if key_id != key.key_id {
        return Err(format!(
            "signed by key {key_id}, not by the given public key {}",
            key.key_id
        ));
    }
    let msg = message(
        p.instance.as_deref().unwrap_or_default(),
        count,
        head,
        p.ts.as_deref().unwrap_or_default(),
        key_id,
    );
    if !key.verifies(&msg, signature) {
        return Err(format!(
            "the signature does not verify under key {key_id}: forged, or the chain before it was rewritten"
        ));
    }
    Ok(())
}

/// Every record (decisions, and replays) of one request, oldest first.
pub fn find_request(
    paths: &[PathBuf],
    request_id: &str,
) -> std::io::Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    let needle = format!(
        "\"request_id\":{}",
        serde_json::Value::String(request_id.to_string())
    );
    for file in chain_files(paths)? {
        let bytes = std::fs::read(&file)?;
        for raw in bytes.split(|&b| b == b'\n') {
            // Cheap substring filter before parsing.
            if raw.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(raw) {
                    out.push(v);
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record line as the writer chains it: canonical bytes, then the hash field.
    fn chained(fields: &str, prev: &str) -> (String, String) {
        let canonical = format!("{{{fields},\"prev_hash\":\"{prev}\"}}");
        let hash = chain_hash(prev, canonical.as_bytes());
        let line = format!(
            "{},\"hash\":\"{hash}\"}}",
            &canonical[..canonical.len() - 1]
        );
        (line, hash)
    }

    /// Found by fuzz/audit_line: `records_lost` counts were summed unchecked, so a chain
    /// whose counts add past u64::MAX panicked `audit verify` (debug) or wrapped to a small
    /// number (release).
    #[test]
    fn loss_counts_past_u64_max_saturate_instead_of_overflowing() {
        let mut prev = "0".repeat(64);
        let mut log = String::new();
        for seq in 0..2 {
            let (line, hash) = chained(
                &format!(
                    "\"seq\":{seq},\"event\":\"records_lost\",\"detail\":{{\"count\":{}}}",
                    u64::MAX
                ),
                &prev,
            );
            log.push_str(&line);
            log.push('\n');
            prev = hash;
        }
        let mut report = VerifyReport::default();
        verify_bytes("t.jsonl", log.as_bytes(), &mut report).unwrap();
        assert_eq!(report.records, 2);
        assert_eq!(report.records_lost, u64::MAX);
        assert_eq!(report.loss_events, vec![0, 1]);
    }
}
