//! Entry points for the `cargo fuzz` targets under `fuzz/`. NOT a stable API: hidden from
//! the docs, free to change with any release, and kept out of `cli` on purpose.
//!
//! Each function takes the fuzzer's bytes, drives one parser the way breakwater drives it,
//! and checks that parser's promises. A broken promise comes back as `Err(description)`;
//! the fuzz target turns it into a crash (so the library itself never panics here). The
//! module is always compiled, so a refactor that breaks a target breaks `cargo build`.

use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::audit::record::{chain_hash, parse_line};
use crate::audit::verify::{verify_bytes, VerifyReport};
use crate::config::Config;
use crate::dlq::spool::{self, StoredRecord};
use crate::dlq::Envelope;
use crate::exchange::headers;

/// A broken promise, described.
pub type Violation = String;

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), Violation> {
    if ok {
        Ok(())
    } else {
        Err(what())
    }
}

/// `breakwater check`: parse the TOML and validate it. Never panics; a refusal names at
/// least one error, each with a key path (or a line) and a message.
pub fn config(data: &[u8]) -> Result<(), Violation> {
    let Ok(text) = std::str::from_utf8(data) else {
        return Ok(());
    };
    match Config::from_toml(text) {
        Ok(cfg) => {
            let _ = cfg.warnings();
            let _ = cfg.masked_json();
            // A reload to the very same text never needs a restart.
            check(
                crate::config::reload::refuse_restart_only(&cfg, &cfg).is_ok(),
                || "reloading an unchanged config was refused".into(),
            )
        }
        Err(errors) => {
            check(!errors.errors.is_empty(), || "refused with no error".into())?;
            for e in &errors.errors {
                check(!e.path.trim().is_empty(), || {
                    format!("an error without a key path: {e:?}")
                })?;
                check(!e.message.trim().is_empty(), || {
                    format!("an error without a message: {e:?}")
                })?;
            }
            Ok(())
        }
    }
}

/// The first byte picks the drain's read window, the rest is one spool segment. Reads it
/// whole (recovery, `spool inspect`), in windows (the drainer), and again after recovery
/// truncates a torn tail: every pass ends, every sound record is byte for byte what the
/// writer encodes for it (so it passed both checksums), records tile the bytes, and all
/// passes yield the same sound records.
pub fn spool(data: &[u8]) -> Result<(), Violation> {
    let Some((&knob, seg)) = data.split_first() else {
        return Ok(());
    };
    let len = seg.len() as u64;
    let legacy = spool::is_legacy(seg);
    let (whole, end) = spool::parse_records(1, 0, seg, true, legacy);
    check(end == len, || {
        format!("a complete read stopped at {end} of {len}")
    })?;
    check_tiling(seg, 0, len, &whole, legacy)?;
    let sound = sound_records(&whole);

    // The drainer (`SpoolReader::next_batch`), with its 64 KiB+ window scaled down.
    let window = u64::from(knob % 128) + 1;
    let mut cursor = 0u64;
    let mut drained = Vec::new();
    let mut rounds = 0u64;
    while cursor < len {
        rounds += 1;
        check(rounds <= len + 1, || "the drain does not end".into())?;
        let to = len.min(cursor + window);
        let from = cursor as usize;
        let (mut records, _) =
            spool::parse_records(1, cursor, &seg[from..to as usize], to == len, legacy);
        if records.is_empty() {
            records = spool::parse_records(1, cursor, &seg[from..], true, legacy).0;
        }
        let Some(last_end) = records.last().map(|r| r.end) else {
            return Err(format!("the drain stalls at {cursor} of {len}"));
        };
        check(last_end > cursor, || {
            format!("the drain does not move past {cursor}")
        })?;
        check_tiling(seg, cursor, last_end, &records, legacy)?;
        drained.extend(sound_records(&records));
        cursor = last_end;
    }
    check(drained == sound, || {
        format!(
            "a windowed drain (window {window}) read {} sound record(s), a whole read {}",
            drained.len(),
            sound.len()
        )
    })?;

    // Recovery: the newest segment loses its torn tail, then is read again on next start.
    if let Some(cut) = spool::torn_tail(&whole, len) {
        let kept = &seg[..cut as usize];
        let again = spool::parse_records(1, 0, kept, true, spool::is_legacy(kept)).0;
        check(sound_records(&again) == sound, || {
            format!("truncating the torn tail at {cut} changed the sound records")
        })?;
    }
    Ok(())
}

type Sound = (u64, u64, [u8; 16], bytes::Bytes);

fn sound_records(records: &[StoredRecord]) -> Vec<Sound> {
    records
        .iter()
        .filter_map(|r| Some((r.start, r.end, r.msg_id, r.payload.clone()?)))
        .collect()
}

/// Records cover `from..to` of `seg` without gaps or overlaps, and a sound record's bytes
/// are exactly its encoding.
fn check_tiling(
    seg: &[u8],
    from: u64,
    to: u64,
    records: &[StoredRecord],
    legacy: bool,
) -> Result<(), Violation> {
    let mut at = from;
    for r in records {
        check(r.start == at && r.end > r.start && r.end <= to, || {
            format!(
                "record {}..{} does not follow {at} (up to {to})",
                r.start, r.end
            )
        })?;
        check(r.payload.is_some() != r.damage.is_some(), || {
            format!("record at {} is both or neither sound and damaged", r.start)
        })?;
        if let Some(payload) = &r.payload {
            let mut expect = Vec::new();
            if legacy {
                expect.extend_from_slice(&(payload.len() as u32).to_le_bytes());
                let crc = crc32c::crc32c_append(crc32c::crc32c(&r.msg_id), payload);
                expect.extend_from_slice(&crc.to_le_bytes());
                expect.extend_from_slice(&r.msg_id);
                expect.extend_from_slice(payload);
            } else {
                spool::encode_record(&mut expect, &r.msg_id, payload);
            }
            check(seg[r.start as usize..r.end as usize] == expect[..], || {
                format!("record at {} is not what the writer encodes", r.start)
            })?;
        }
        at = r.end;
    }
    check(at == to, || {
        format!("records end at {at}, the read at {to}")
    })
}

/// `audit verify` over one file. With the first byte odd, each line that parses is first
/// re-linked and re-hashed (its `prev_hash` set to the previous record's hash, its `hash`
/// recomputed), so the fuzzer gets past the hash checks to the chain logic behind them.
pub fn audit_log(data: &[u8]) -> Result<(), Violation> {
    let Some((&mode, log)) = data.split_first() else {
        return Ok(());
    };
    let log = if mode & 1 == 1 {
        rechain(log)
    } else {
        log.to_vec()
    };
    let lines = log.split(|&b| b == b'\n').count();
    let nonempty = log.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count();
    let mut report = VerifyReport::default();
    match verify_bytes("fuzz.jsonl", &log, &mut report) {
        Ok(()) => {
            check(report.records == nonempty as u64, || {
                format!(
                    "{} record(s) verified of {nonempty} line(s)",
                    report.records
                )
            })?;
            if let (Some(first), Some(last)) = (report.first_seq, report.last_seq) {
                check(first.checked_add(report.records - 1) == Some(last), || {
                    format!("seq {first}..{last} is not {} records", report.records)
                })?;
            }
            check(report.loss_events.len() as u64 <= report.records, || {
                "more loss events than records".into()
            })
        }
        Err(e) => check(
            e.line >= 1 && e.line <= lines && !e.detail.is_empty(),
            || format!("an error that points nowhere: {e}"),
        ),
    }
}

fn rechain(log: &[u8]) -> Vec<u8> {
    const PREV: &[u8] = b"\"prev_hash\":\"";
    let mut prev = "0".repeat(64);
    let mut out = Vec::with_capacity(log.len());
    for (i, raw) in log.split(|&b| b == b'\n').enumerate() {
        if i > 0 {
            out.push(b'\n');
        }
        let mut line = raw.to_vec();
        if let Some(at) = line.windows(PREV.len()).position(|w| w == PREV) {
            let hex = at + PREV.len();
            if let Some(slot) = line.get_mut(hex..hex + 64) {
                slot.copy_from_slice(prev.as_bytes());
            }
        }
        if let Some(p) = parse_line(&line) {
            let hash = chain_hash(&p.prev_hash, &p.canonical);
            let n = line.len();
            line[n - 66..n - 2].copy_from_slice(hash.as_bytes());
            prev = hash;
        }
        out.extend_from_slice(&line);
    }
    out
}

/// The DLQ envelope decoder and the replay request built from it: never panics; the
/// rebuilt request carries the stored body, `Idempotency-Key` = the message id and the
/// original request id, each exactly once, and nothing that frames this hop.
pub fn envelope(data: &[u8]) -> Result<(), Violation> {
    let Ok(env) = serde_json::from_slice::<Envelope>(data) else {
        return Ok(());
    };
    let encoded = serde_json::to_vec(&env).map_err(|e| format!("cannot re-encode: {e}"))?;
    let again: Envelope =
        serde_json::from_slice(&encoded).map_err(|e| format!("re-encoded envelope: {e}"))?;
    check(again == env, || "the envelope does not round-trip".into())?;
    let _ = env.path_and_query();
    let body = env.body();
    let Ok(req) = crate::proxy::replay::rebuild_request(&env) else {
        return Ok(());
    };
    check(Ok(req.body()) == body.as_ref(), || {
        "the replayed body is not the stored one".into()
    })?;
    let h = req.headers();
    exactly_one(h, "idempotency-key", &env.msg_id)?;
    exactly_one(h, "x-request-id", &env.request_id)?;
    exactly_one(h, "x-breakwater-replay", "1")?;
    no_hop_by_hop(h)?;
    for framing in ["content-length", "host"] {
        check(!h.contains_key(framing), || {
            format!("a replay carries a stored {framing}")
        })?;
    }
    // The upstream client keeps only the path and query, under its own authority.
    let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    if let Ok(uri) = format!("http://upstream.invalid:8080{pq}").parse::<http::Uri>() {
        check(
            uri.authority().map(|a| a.as_str()) == Some("upstream.invalid:8080"),
            || format!("the replay path {pq:?} changes the upstream authority"),
        )?;
    }
    Ok(())
}

fn exactly_one(h: &HeaderMap, name: &str, value: &str) -> Result<(), Violation> {
    let all: Vec<&HeaderValue> = h.get_all(name).iter().collect();
    check(all.len() == 1 && all[0] == value, || {
        format!("{name}: {all:?}, expected exactly {value:?}")
    })
}

/// RFC 9110 §7.6.1 and the legacy ones every proxy drops (an oracle independent of the
/// list in `exchange::headers`).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn no_hop_by_hop(h: &HeaderMap) -> Result<(), Violation> {
    for name in HOP_BY_HOP {
        check(!h.contains_key(name), || {
            format!("hop-by-hop {name} survived")
        })?;
    }
    Ok(())
}

/// Every name a set of `Connection` values lists (RFC 9110 §7.6.1), read from the raw
/// bytes.
fn connection_names(h: &HeaderMap) -> Vec<HeaderName> {
    h.get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|n| HeaderName::from_bytes(n.trim_ascii()).ok())
        .collect()
}

/// Request-header handling on the way to the upstream. Input: a flags byte (bit 0 TLS, bit
/// 1 "the first line is the host"), four bytes of client IPv4 address (sixteen of IPv6
/// with bit 2), then `name:value` lines made into a header map (repeats appended).
pub fn headers(data: &[u8]) -> Result<(), Violation> {
    let Some((&flags, rest)) = data.split_first() else {
        return Ok(());
    };
    let (ip, rest): (IpAddr, &[u8]) = if flags & 4 == 0 {
        let Some((a, rest)) = rest.split_first_chunk::<4>() else {
            return Ok(());
        };
        ((*a).into(), rest)
    } else {
        let Some((a, rest)) = rest.split_first_chunk::<16>() else {
            return Ok(());
        };
        ((*a).into(), rest)
    };
    let tls = flags & 1 == 1;
    let mut lines = rest.split(|&b| b == b'\n');
    let host = if flags & 2 == 2 {
        lines
            .next()
            .map(|l| String::from_utf8_lossy(l).into_owned())
    } else {
        None
    };
    let mut original = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        original.append(name, value);
    }

    // The request id: kept when sane, made up otherwise; always a valid, bounded value.
    let rid = headers::request_id(&original);
    check(
        !rid.is_empty() && rid.len() <= 128 && HeaderValue::from_str(&rid).is_ok(),
        || format!("request id {rid:?} is not a valid bounded header value"),
    )?;
    if let Some(sent) = original
        .get(&headers::X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
    {
        let sane =
            !sent.is_empty() && sent.len() <= 128 && sent.bytes().all(|b| b.is_ascii_graphic());
        check(sane == (rid == sent), || {
            format!("client request id {sent:?} (sane: {sane}) became {rid:?}")
        })?;
    }

    // Hop-by-hop stripping: the fixed set and every name `Connection` lists go, everything
    // else stays as it was.
    let named = connection_names(&original);
    let mut stripped = original.clone();
    headers::strip_hop_by_hop(&mut stripped);
    no_hop_by_hop(&stripped)?;
    for name in &named {
        check(!stripped.contains_key(name), || {
            format!("{name}, listed in Connection, survived")
        })?;
    }
    for name in original.keys() {
        if HOP_BY_HOP.contains(&name.as_str()) || named.contains(name) {
            continue;
        }
        check(
            original
                .get_all(name)
                .iter()
                .eq(stripped.get_all(name).iter()),
            || format!("end-to-end header {name} was changed"),
        )?;
    }

    // What the upstream gets.
    let mut prepared = original.clone();
    headers::prepare_upstream_headers(&mut prepared, ip, tls, host.as_deref(), &rid);
    no_hop_by_hop(&prepared)?;
    for name in &named {
        if [
            &headers::X_FORWARDED_FOR,
            &headers::X_FORWARDED_PROTO,
            &headers::X_FORWARDED_HOST,
            &headers::X_REQUEST_ID,
        ]
        .contains(&name)
        {
            continue;
        }
        check(!prepared.contains_key(name), || {
            format!("{name}, listed in Connection, reached the upstream")
        })?;
    }
    check(!prepared.contains_key(http::header::HOST), || {
        "the client's Host reached the upstream".into()
    })?;
    let before: Vec<&str> = stripped
        .get_all(&headers::X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter(|v| !v.trim().is_empty())
        .collect();
    let mut chain = before.join(", ");
    if !chain.is_empty() {
        chain.push_str(", ");
    }
    chain.push_str(&ip.to_string());
    exactly_one(&prepared, "x-forwarded-for", &chain)?;
    exactly_one(
        &prepared,
        "x-forwarded-proto",
        if tls { "https" } else { "http" },
    )?;
    match host.as_deref().filter(|h| HeaderValue::from_str(h).is_ok()) {
        Some(h) => exactly_one(&prepared, "x-forwarded-host", h)?,
        None => check(!prepared.contains_key(&headers::X_FORWARDED_HOST), || {
            "a client-supplied x-forwarded-host reached the upstream".into()
        })?,
    }
    exactly_one(&prepared, "x-request-id", &rid)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every committed seed, and every input a fuzzer crashed on (kept beside the seeds),
    /// passes its target's checks in the ordinary test suite, without the nightly fuzzer.
    #[test]
    fn every_committed_fuzz_input_keeps_its_promises() {
        type Target = fn(&[u8]) -> Result<(), Violation>;
        let targets: [(&str, Target); 5] = [
            ("config", config),
            ("spool", spool),
            ("audit_line", audit_log),
            ("envelope", envelope),
            ("headers", headers),
        ];
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        let mut checked = 0;
        for (name, target) in targets {
            for entry in std::fs::read_dir(root.join(name)).unwrap() {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                if let Err(broken) = target(&data) {
                    panic!("{}: {broken}", path.display());
                }
                checked += 1;
            }
        }
        assert!(checked >= 15, "only {checked} fuzz inputs found");
    }

    /// fuzz/spool, the finding left open in the first campaign (its input is
    /// `fuzz/corpus/spool/v1-bad-length-in-window`): an old segment with an impossible
    /// length inside the drain's window yielded a record a whole read does not.
    #[test]
    fn a_windowed_drain_of_an_old_segment_agrees_with_a_whole_read() {
        let data = hex::decode(
            "3304000000cb8cab3201010101010101010101010101010101676f6f64ffffffff5a5a5a5a5a5a\
             5a5a5a5a5a5a5a5a5a5a5a5a5a5a040000000b9a66df02020202020202020202020202020202\
             7a7a7a7a",
        )
        .unwrap();
        assert_eq!(spool(&data), Ok(()));
    }
}
