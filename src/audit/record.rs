//! The decision record and the event record (SPEC "Decision log"), their canonical bytes
//! and the hash chain.
//!
//! A line is the record serialized as JSON in the struct's field order without `hash`,
//! then `,"hash":"<hex>"}` appended: `hash = SHA-256(prev_hash || canonical bytes)`, where
//! `prev_hash` is the hex string of the previous record's hash and the canonical bytes
//! are the line up to (not including) `,"hash":` followed by `}`. Any edited byte breaks
//! the record's own hash; a deleted or moved record breaks the next record's link.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub const SCHEMA_V: u32 = 1;
/// `prev_hash` of the first record ever written.
#[cfg(test)]
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One proxied request as it reads back from the log (`audit find`, tests). Field order
/// is the canonical order. The writer does not build this: it serializes a [`Decision`]
/// to the same bytes.
#[cfg(test)]
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DecisionRecord {
    pub schema_v: u32,
    pub event_id: String,
    pub seq: u64,
    pub ts_start: String,
    pub ts_end: String,
    pub instance: String,
    pub route: String,
    pub upstream: Option<String>,
    pub variant: Option<String>,
    pub model_version: Option<String>,
    pub config_gen: u64,
    pub request_id: String,
    pub method: String,
    pub path: String,
    pub input_digest: Option<String>,
    pub output_digest: Option<String>,
    pub key_id: String,
    /// ai | fallback | error | replayed | replay_failed
    pub outcome: String,
    pub fallback: Option<String>,
    pub reason: Option<String>,
    pub status: u16,
    pub latency_us: u64,
    pub upstream_latency_us: Option<u64>,
    pub attempts: u32,
    pub breaker_state: Option<String>,
    pub dlq: Option<String>,
    pub dlq_msg_id: Option<String>,
    /// W3C trace id, only when the request carried or started a trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The AI answered from an unapproved model version and the answer passed
    /// (`on_unapproved = "flag"`); only written when true.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unapproved: bool,
    pub prev_hash: String,
}

/// A decision as the request path hands it to the writer: shared or static text, raw
/// times and raw digests, so building one costs a path copy and little else. The writer
/// formats it (with its own `instance` and `key_id`) into exactly the bytes of the
/// [`DecisionRecord`] holding the same values.
#[derive(Debug, Clone)]
pub struct Decision {
    pub event_id: Uuid,
    pub ts_start: SystemTime,
    pub ts_end: SystemTime,
    pub route: Arc<str>,
    pub upstream: Option<Arc<str>>,
    pub variant: Option<Arc<str>>,
    pub model_version: Option<String>,
    pub config_gen: u64,
    pub request_id: Arc<str>,
    pub method: http::Method,
    pub path: String,
    pub input_digest: Option<[u8; 32]>,
    pub output_digest: Option<[u8; 32]>,
    /// ai | fallback | error | replayed | replay_failed
    pub outcome: &'static str,
    pub fallback: Option<&'static str>,
    pub reason: Option<Cow<'static, str>>,
    pub status: u16,
    pub latency_us: u64,
    pub upstream_latency_us: Option<u64>,
    pub attempts: u32,
    pub breaker_state: Option<&'static str>,
    pub dlq: Option<&'static str>,
    pub dlq_msg_id: Option<String>,
    /// W3C trace id (32 hex digits); the key is left out when there is none, so records
    /// of untraced requests keep their bytes.
    pub trace_id: Option<String>,
    /// An unapproved model version answered and the answer passed (`on_unapproved =
    /// "flag"`). Written as `"unapproved":true` only when set, so other records keep their
    /// bytes.
    pub unapproved: bool,
}

impl Decision {
    /// A decision for `route` / `request_id` with everything else empty.
    pub fn new(route: Arc<str>, request_id: Arc<str>, outcome: &'static str) -> Decision {
        let now = SystemTime::now();
        Decision {
            event_id: Uuid::now_v7(),
            ts_start: now,
            ts_end: now,
            route,
            upstream: None,
            variant: None,
            model_version: None,
            config_gen: 0,
            request_id,
            method: http::Method::GET,
            path: String::new(),
            input_digest: None,
            output_digest: None,
            outcome,
            fallback: None,
            reason: None,
            status: 0,
            latency_us: 0,
            upstream_latency_us: None,
            attempts: 0,
            breaker_state: None,
            dlq: None,
            dlq_msg_id: None,
            trace_id: None,
            unapproved: false,
        }
    }
}

/// What every line of one log shares, supplied by the writer.
#[derive(Debug, Clone, Copy)]
pub struct LineCtx<'a> {
    pub instance: &'a str,
    pub key_id: &'a str,
}

/// Appends the canonical bytes of `d` (the line without its hash) to `out`: exactly what
/// serde_json writes for the [`DecisionRecord`] holding the same values (a test holds the
/// two together), several times faster. Keys and values that cannot need escaping
/// (numbers, the UUID, times, digests) are copied as they are; every other text goes
/// through serde_json's string escaping.
fn encode_decision(
    d: &Decision,
    seq: u64,
    prev_hash: &ChainHash,
    ctx: LineCtx<'_>,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    use std::io::Write;
    let mut num = itoa::Buffer::new();
    let mut uuid = Uuid::encode_buffer();
    out.extend_from_slice(b"{\"schema_v\":");
    out.extend_from_slice(num.format(SCHEMA_V).as_bytes());
    out.extend_from_slice(b",\"event_id\":\"");
    out.extend_from_slice(d.event_id.hyphenated().encode_lower(&mut uuid).as_bytes());
    out.extend_from_slice(b"\",\"seq\":");
    out.extend_from_slice(num.format(seq).as_bytes());
    out.extend_from_slice(b",\"ts_start\":\"");
    write!(out, "{}", humantime::format_rfc3339_micros(d.ts_start))?;
    out.extend_from_slice(b"\",\"ts_end\":\"");
    write!(out, "{}", humantime::format_rfc3339_micros(d.ts_end))?;
    out.extend_from_slice(b"\",\"instance\":");
    text(out, ctx.instance)?;
    out.extend_from_slice(b",\"route\":");
    text(out, &d.route)?;
    out.extend_from_slice(b",\"upstream\":");
    opt_text(out, d.upstream.as_deref())?;
    out.extend_from_slice(b",\"variant\":");
    opt_text(out, d.variant.as_deref())?;
    out.extend_from_slice(b",\"model_version\":");
    opt_text(out, d.model_version.as_deref())?;
    out.extend_from_slice(b",\"config_gen\":");
    out.extend_from_slice(num.format(d.config_gen).as_bytes());
    out.extend_from_slice(b",\"request_id\":");
    text(out, &d.request_id)?;
    out.extend_from_slice(b",\"method\":");
    text(out, d.method.as_str())?;
    out.extend_from_slice(b",\"path\":");
    text(out, &d.path)?;
    out.extend_from_slice(b",\"input_digest\":");
    opt_hex(out, d.input_digest.as_ref());
    out.extend_from_slice(b",\"output_digest\":");
    opt_hex(out, d.output_digest.as_ref());
    out.extend_from_slice(b",\"key_id\":");
    text(out, ctx.key_id)?;
    out.extend_from_slice(b",\"outcome\":");
    text(out, d.outcome)?;
    out.extend_from_slice(b",\"fallback\":");
    opt_text(out, d.fallback)?;
    out.extend_from_slice(b",\"reason\":");
    opt_text(out, d.reason.as_deref())?;
    out.extend_from_slice(b",\"status\":");
    out.extend_from_slice(num.format(d.status).as_bytes());
    out.extend_from_slice(b",\"latency_us\":");
    out.extend_from_slice(num.format(d.latency_us).as_bytes());
    out.extend_from_slice(b",\"upstream_latency_us\":");
    match d.upstream_latency_us {
        Some(v) => out.extend_from_slice(num.format(v).as_bytes()),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"attempts\":");
    out.extend_from_slice(num.format(d.attempts).as_bytes());
    out.extend_from_slice(b",\"breaker_state\":");
    opt_text(out, d.breaker_state)?;
    out.extend_from_slice(b",\"dlq\":");
    opt_text(out, d.dlq)?;
    out.extend_from_slice(b",\"dlq_msg_id\":");
    opt_text(out, d.dlq_msg_id.as_deref())?;
    if let Some(t) = &d.trace_id {
        out.extend_from_slice(b",\"trace_id\":");
        text(out, t)?;
    }
    if d.unapproved {
        out.extend_from_slice(b",\"unapproved\":true");
    }
    out.extend_from_slice(b",\"prev_hash\":\"");
    out.extend_from_slice(&prev_hash.0);
    out.extend_from_slice(b"\"}");
    Ok(())
}

/// A JSON string, escaped as serde_json escapes it.
fn text(out: &mut Vec<u8>, s: &str) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, s).map_err(std::io::Error::from)
}

fn opt_text(out: &mut Vec<u8>, s: Option<&str>) -> std::io::Result<()> {
    match s {
        Some(s) => text(out, s),
        None => {
            out.extend_from_slice(b"null");
            Ok(())
        }
    }
}

fn opt_hex(out: &mut Vec<u8>, d: Option<&[u8; 32]>) {
    match d {
        Some(d) => {
            out.push(b'"');
            out.extend_from_slice(&Hex32(*d).encode());
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
}

/// Lower-case hex of a 32-byte digest.
pub struct Hex32(pub [u8; 32]);

impl Hex32 {
    pub fn encode(&self) -> [u8; 64] {
        let mut buf = [0u8; 64];
        // 32 bytes always fit 64 hex digits.
        let _ = hex::encode_to_slice(self.0, &mut buf);
        buf
    }
}

/// A record's hash as the 64 hex digits the chain carries.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ChainHash([u8; 64]);

impl ChainHash {
    pub fn genesis() -> ChainHash {
        ChainHash([b'0'; 64])
    }

    /// `None` unless `s` is 64 hex digits.
    pub fn parse(s: &str) -> Option<ChainHash> {
        let bytes: [u8; 64] = s.as_bytes().try_into().ok()?;
        bytes
            .iter()
            .all(u8::is_ascii_hexdigit)
            .then_some(ChainHash(bytes))
    }

    pub fn as_str(&self) -> &str {
        // Only ever built from hex digits.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Debug for ChainHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A change in the same chain: config_reload, admin_change, canary_rollback,
/// retention_removal, log_resumed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EventRecord {
    pub schema_v: u32,
    pub event_id: String,
    pub seq: u64,
    pub ts: String,
    pub instance: String,
    pub event: String,
    pub config_gen: Option<u64>,
    pub config_hash_before: Option<String>,
    pub config_hash_after: Option<String>,
    pub actor: Option<String>,
    pub detail: serde_json::Value,
    pub prev_hash: String,
}

/// What the writer chains: a decision (by value, see `writer::Msg`) or a change event.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum Entry {
    Decision(Decision),
    Event(Box<EventRecord>),
}

impl Entry {
    /// Writes the line (with its newline) chained to `prev_hash` into `out` and returns
    /// the record's hash. On error `out` is left as it was.
    pub fn write_line(
        &mut self,
        seq: u64,
        prev_hash: &ChainHash,
        ctx: LineCtx<'_>,
        out: &mut Vec<u8>,
    ) -> std::io::Result<ChainHash> {
        let start = out.len();
        let written = match self {
            Entry::Decision(d) => encode_decision(d, seq, prev_hash, ctx, out),
            Entry::Event(e) => {
                e.seq = seq;
                e.prev_hash = prev_hash.as_str().to_string();
                serde_json::to_writer(&mut *out, e).map_err(std::io::Error::from)
            }
        };
        if let Err(e) = written {
            out.truncate(start);
            return Err(e);
        }
        let hash = chain_hash_raw(prev_hash.as_str(), &out[start..]);
        // Replace the closing brace with the hash field.
        out.pop();
        out.extend_from_slice(HASH_FIELD);
        out.extend_from_slice(&hash.0);
        out.extend_from_slice(b"\"}\n");
        Ok(hash)
    }
}

fn chain_hash_raw(prev_hash: &str, canonical: &[u8]) -> ChainHash {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(canonical);
    ChainHash(Hex32(h.finalize().into()).encode())
}

/// `SHA-256(prev_hash || canonical)` as hex.
pub fn chain_hash(prev_hash: &str, canonical: &[u8]) -> String {
    chain_hash_raw(prev_hash, canonical).as_str().to_string()
}

/// A line split into its canonical bytes and its stated hash.
pub struct ParsedLine {
    pub canonical: Vec<u8>,
    pub hash: String,
    pub seq: u64,
    pub prev_hash: String,
    /// For a `records_lost` event: how many records it says were lost.
    pub records_lost: Option<u64>,
    /// When the record was made: `ts` (events) or `ts_start` (decisions).
    pub ts: Option<String>,
    pub instance: Option<String>,
    /// For a `checkpoint` event: its `detail`.
    pub checkpoint: Option<serde_json::Value>,
}

const HASH_FIELD: &[u8] = b",\"hash\":\"";

/// Parses one line (without its newline). `None` when it is not a well-formed record.
pub fn parse_line(line: &[u8]) -> Option<ParsedLine> {
    // The hash field is always last: `,"hash":"<64 hex>"}`.
    let suffix_len = HASH_FIELD.len() + 64 + 2;
    if line.len() < suffix_len + 2 || !line.ends_with(b"\"}") {
        return None;
    }
    let cut = line.len() - suffix_len;
    if &line[cut..cut + HASH_FIELD.len()] != HASH_FIELD {
        return None;
    }
    let hash = std::str::from_utf8(&line[cut + HASH_FIELD.len()..line.len() - 2]).ok()?;
    if !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut canonical = line[..cut].to_vec();
    canonical.push(b'}');
    #[derive(Deserialize)]
    struct Chain {
        seq: u64,
        prev_hash: String,
        event: Option<String>,
        detail: Option<serde_json::Value>,
        ts: Option<String>,
        ts_start: Option<String>,
        instance: Option<String>,
    }
    let chain: Chain = serde_json::from_slice(&canonical).ok()?;
    let (records_lost, checkpoint) = match (chain.event.as_deref(), chain.detail) {
        (Some(super::writer::RECORDS_LOST), Some(d)) => {
            (d.get("count").and_then(serde_json::Value::as_u64), None)
        }
        (Some(super::checkpoint::CHECKPOINT), d) => {
            (None, Some(d.unwrap_or(serde_json::Value::Null)))
        }
        _ => (None, None),
    };
    Some(ParsedLine {
        canonical,
        hash: hash.to_string(),
        seq: chain.seq,
        prev_hash: chain.prev_hash,
        records_lost,
        ts: chain.ts.or(chain.ts_start),
        instance: chain.instance,
        checkpoint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: LineCtx<'static> = LineCtx {
        instance: "host-1",
        key_id: "k1",
    };

    fn full_decision() -> Decision {
        Decision {
            upstream: Some("ai".into()),
            variant: Some("v2".into()),
            model_version: Some("rec-2026.11 \"β\"".into()),
            config_gen: 4,
            method: http::Method::POST,
            path: "/v1/grade/ü\\x".into(),
            input_digest: Some([0xab; 32]),
            output_digest: Some([0x01; 32]),
            fallback: Some("cache"),
            reason: Some(Cow::Owned("breaker_open".into())),
            status: 200,
            latency_us: 1234,
            upstream_latency_us: Some(1000),
            attempts: 2,
            breaker_state: Some("closed"),
            dlq: Some("queued"),
            dlq_msg_id: Some("m-1".into()),
            ..Decision::new("grading".into(), "r-\u{1}1".into(), "fallback")
        }
    }

    /// The same values as a `DecisionRecord` (the reader's type).
    fn as_record(d: &Decision, seq: u64, prev: &str) -> DecisionRecord {
        let hex = |b: &[u8; 32]| hex::encode(b);
        DecisionRecord {
            schema_v: SCHEMA_V,
            event_id: d.event_id.to_string(),
            seq,
            ts_start: crate::audit::rfc3339(d.ts_start),
            ts_end: crate::audit::rfc3339(d.ts_end),
            instance: CTX.instance.into(),
            route: d.route.to_string(),
            upstream: d.upstream.as_deref().map(str::to_string),
            variant: d.variant.as_deref().map(str::to_string),
            model_version: d.model_version.clone(),
            config_gen: d.config_gen,
            request_id: d.request_id.to_string(),
            method: d.method.to_string(),
            path: d.path.clone(),
            input_digest: d.input_digest.as_ref().map(hex),
            output_digest: d.output_digest.as_ref().map(hex),
            key_id: CTX.key_id.into(),
            outcome: d.outcome.into(),
            fallback: d.fallback.map(str::to_string),
            reason: d.reason.as_deref().map(str::to_string),
            status: d.status,
            latency_us: d.latency_us,
            upstream_latency_us: d.upstream_latency_us,
            attempts: d.attempts,
            breaker_state: d.breaker_state.map(str::to_string),
            dlq: d.dlq.map(str::to_string),
            dlq_msg_id: d.dlq_msg_id.clone(),
            trace_id: d.trace_id.clone(),
            unapproved: d.unapproved,
            prev_hash: prev.into(),
        }
    }

    #[test]
    fn a_decision_serializes_to_the_bytes_of_the_record_it_reads_back_as() {
        let prev = ChainHash::parse(&"7f".repeat(32)).unwrap();
        let tricky = [
            "",
            "plain",
            "quote \" backslash \\ slash /",
            "control \u{0}\u{1}\u{1f}\t\n\r\u{7f}",
            "unicode é ß 学生 🎓 \u{2028}\u{2029}",
        ];
        let mut cases = vec![
            full_decision(),
            Decision::new("r".into(), "id".into(), "ai"),
            Decision {
                trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
                ..full_decision()
            },
            Decision {
                unapproved: true,
                ..full_decision()
            },
        ];
        for t in tricky {
            let mut d = full_decision();
            d.route = t.into();
            d.request_id = t.into();
            d.upstream = Some(t.into());
            d.variant = Some(t.into());
            d.model_version = Some(t.into());
            d.path = t.into();
            d.reason = Some(Cow::Owned(t.into()));
            d.dlq_msg_id = Some(t.into());
            d.method = http::Method::from_bytes(b"PURGE").unwrap();
            cases.push(d);
        }
        for d in cases {
            let mut line = Vec::new();
            Entry::Decision(d.clone())
                .write_line(9, &prev, CTX, &mut line)
                .unwrap();
            let p = parse_line(&line[..line.len() - 1]).unwrap();
            let expected = serde_json::to_vec(&as_record(&d, 9, prev.as_str())).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&p.canonical),
                String::from_utf8_lossy(&expected)
            );
            let back: DecisionRecord = serde_json::from_slice(&p.canonical).unwrap();
            assert_eq!(back, as_record(&d, 9, prev.as_str()));
        }
    }

    #[test]
    fn a_written_line_parses_back_and_its_hash_checks() {
        let mut e = Entry::Decision(Decision::new("grading".into(), "r-1".into(), "ai"));
        let mut buf = Vec::new();
        let hash = e
            .write_line(7, &ChainHash::genesis(), CTX, &mut buf)
            .unwrap();
        assert_eq!(buf.last(), Some(&b'\n'));
        let p = parse_line(&buf[..buf.len() - 1]).unwrap();
        assert_eq!(p.seq, 7);
        assert_eq!(p.hash, hash.as_str());
        assert_eq!(p.prev_hash, GENESIS);
        assert_eq!(chain_hash(&p.prev_hash, &p.canonical), hash.as_str());
        assert!(parse_line(b"{\"seq\":1}").is_none());
        assert_eq!(ChainHash::genesis().as_str(), GENESIS);
        assert!(ChainHash::parse("xyz").is_none());
    }
}
