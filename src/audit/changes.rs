//! `breakwater audit changes`: the change trail (config reloads, admin changes, canary
//! rollbacks, and the other change events) read back from the chain as a table.
//! It reads only; `audit verify` says whether the chain it reads can be trusted.

use std::path::PathBuf;
use std::time::SystemTime;

use super::verify::chain_files;

/// The events of the trail: every change an operator or breakwater itself made.
pub const CHANGE_EVENTS: &[&str] = &[
    "config_reload",
    "admin_change",
    "canary_rollback",
    "unapproved_version",
    "rto_exceeded",
];

/// The start and end of a degraded episode: facts about a route, not changes, so they stay
/// out of the trail; `audit report` reads them with [`events`] to prove degraded time.
pub const EPISODE_EVENTS: &[&str] = &["route_degraded", "route_recovered"];

/// One row of the trail.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Change {
    pub ts: String,
    pub seq: u64,
    pub event: String,
    pub actor: Option<String>,
    pub config_hash_before: Option<String>,
    pub config_hash_after: Option<String>,
    pub detail: serde_json::Value,
}

/// The change events in `paths` (files or directories, rotated files included), oldest
/// first; with `since`, only those made at or after it.
pub fn changes(paths: &[PathBuf], since: Option<SystemTime>) -> std::io::Result<Vec<Change>> {
    events(paths, since, CHANGE_EVENTS)
}

/// The events named in `wanted` in `paths`, oldest first, as [`changes`] reads them.
pub fn events(
    paths: &[PathBuf],
    since: Option<SystemTime>,
    wanted: &[&str],
) -> std::io::Result<Vec<Change>> {
    let mut out = Vec::new();
    for file in chain_files(paths)? {
        let bytes = std::fs::read(&file)?;
        for raw in bytes.split(|&b| b == b'\n') {
            // Decisions carry no `"event":`: skip them before parsing.
            if !raw.windows(8).any(|w| w == b"\"event\":") {
                continue;
            }
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(raw) else {
                continue;
            };
            let text = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
            let Some(event) = text("event").filter(|e| wanted.contains(&e.as_str())) else {
                continue;
            };
            let ts = text("ts").unwrap_or_default();
            if let Some(since) = since {
                let at = humantime::parse_rfc3339_weak(&ts).ok();
                if at.is_none_or(|at| at < since) {
                    continue;
                }
            }
            out.push(Change {
                seq: v.get("seq").and_then(|s| s.as_u64()).unwrap_or_default(),
                actor: text("actor"),
                config_hash_before: text("config_hash_before"),
                config_hash_after: text("config_hash_after"),
                detail: v.get("detail").cloned().unwrap_or(serde_json::Value::Null),
                event,
                ts,
            });
        }
    }
    Ok(out)
}

/// The first 12 hex digits of a config hash, as `breakwater check` prints it.
fn short(hash: &Option<String>) -> &str {
    hash.as_deref().map_or("-", |h| h.get(..12).unwrap_or(h))
}

/// The details that are not already columns, as `key=value` pairs.
pub(crate) fn details(detail: &serde_json::Value) -> String {
    let Some(obj) = detail.as_object() else {
        return String::new();
    };
    obj.iter()
        .filter(|(k, _)| !k.starts_with("config_hash_"))
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The trail as a table: time, event, actor (a token fingerprint), config hash before →
/// after, details.
pub fn table(changes: &[Change]) -> String {
    let rows: Vec<[String; 5]> = changes
        .iter()
        .map(|c| {
            [
                c.ts.clone(),
                c.event.clone(),
                c.actor.clone().unwrap_or_else(|| "-".into()),
                format!(
                    "{} → {}",
                    short(&c.config_hash_before),
                    short(&c.config_hash_after)
                ),
                details(&c.detail),
            ]
        })
        .collect();
    let header = ["TIME", "EVENT", "ACTOR", "CONFIG BEFORE → AFTER", "DETAILS"];
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(header.map(str::to_string)).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (cell, w))| {
                if i + 1 == header.len() {
                    cell.clone()
                } else {
                    format!("{cell}{}", " ".repeat(w - cell.chars().count()))
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}
