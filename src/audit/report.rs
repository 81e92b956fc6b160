//! `breakwater audit report`: the patch-window evidence report (issue 15), built from the
//! decision-log chain alone, off the request path.
//!
//! [`build`] reads the chain once for the decisions, takes the change and episode events
//! from [`changes::events`] (as `audit changes` reads them) and the verify result from [`verify::verify_signed`], and
//! aggregates them into a [`Report`]; [`markdown`], [`html`] and [`json`] only render it,
//! and [`write`] puts the three files into a directory. Every text that comes from the log
//! (route names from config, paths and versions from clients and AI services) is escaped
//! where it is rendered: the HTML carries a Content-Security-Policy that forbids scripts
//! and every fetch, so even a missed escape could not run anything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::changes::{self, Change};
use super::checkpoint::PublicKey;
use super::verify::{self, Problem, VerifyError, VerifyReport};

/// Time buckets of the traffic timeline across the window.
pub const BUCKETS: usize = 20;
/// Version of report.json's layout; bumped when a key changes meaning or goes away.
pub const REPORT_V: u32 = 1;

/// The changes of the report's change trail: the ones an operator makes, with an actor and
/// config hashes (the other change events have sections of their own).
const CONFIG_CHANGES: &[&str] = &["config_reload", "admin_change"];

/// The time window of the report, both ends inclusive; open ends take the whole log.
#[derive(Debug, Clone, Copy, Default)]
pub struct Window {
    pub since: Option<SystemTime>,
    pub until: Option<SystemTime>,
}

/// Microseconds since the Unix epoch: the report's internal clock.
type Micros = u64;

fn micros(t: SystemTime) -> Micros {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn parse_ts(ts: &str) -> Option<Micros> {
    humantime::parse_rfc3339_weak(ts).ok().map(micros)
}

fn format_ts(us: Micros) -> String {
    super::rfc3339(UNIX_EPOCH + Duration::from_micros(us))
}

fn secs(us: Micros) -> f64 {
    us as f64 / 1e6
}

impl Window {
    fn lo(&self) -> Micros {
        self.since.map_or(0, micros)
    }

    fn hi(&self) -> Micros {
        self.until.map_or(Micros::MAX, micros)
    }

    fn contains(&self, t: Micros) -> bool {
        (self.lo()..=self.hi()).contains(&t)
    }
}

/// The figures of one route, or of one route × model version × variant.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TrafficRow {
    pub route: String,
    /// `None` in the per-route totals, and for answers that named no version.
    pub model_version: Option<String>,
    pub variant: Option<String>,
    /// Proxied requests (replays are under `dlq`).
    pub requests: u64,
    pub ai: u64,
    pub fallback: u64,
    pub error: u64,
    pub cancelled: u64,
    /// Fallback answers by kind and reason, largest first.
    pub fallbacks: Vec<FallbackCount>,
    /// Latency of every request in the row as its client saw it (`latency_us`), in ms.
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FallbackCount {
    pub kind: String,
    pub reason: String,
    pub count: u64,
}

/// AI / fallback / error / cancelled answers of one time bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Bucket {
    pub ai: u64,
    pub fallback: u64,
    pub error: u64,
    pub cancelled: u64,
}

impl Bucket {
    pub fn total(&self) -> u64 {
        self.ai + self.fallback + self.error + self.cancelled
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RouteTimeline {
    pub route: String,
    /// [`BUCKETS`] buckets of `window.bucket_s` each, from `window.start`.
    pub buckets: Vec<Bucket>,
}

/// A `canary_rollback` event with the figures that caused it.
#[derive(Debug, Clone, Serialize)]
pub struct Rollback {
    pub ts: String,
    pub seq: u64,
    pub route: Option<String>,
    pub variant: Option<String>,
    pub upstream: Option<String>,
    pub reason: Option<String>,
    /// The variant's analysis window at the rollback: requests, failures, error_rate,
    /// p50_ms, p99_ms.
    pub summary: serde_json::Value,
    /// The baseline's window at the same moment.
    pub baseline: serde_json::Value,
    pub config_hash: Option<String>,
}

/// Records of one route and model version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionCount {
    pub route: String,
    pub model_version: Option<String>,
    pub count: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Unapproved {
    /// `unapproved_version` events: the first answer of each new unapproved version.
    pub events: Vec<Change>,
    /// Answers refused as unapproved (decision reason `unapproved_version`).
    pub refused: Vec<VersionCount>,
    /// Answers that passed marked (`on_unapproved = "flag"`, `"unapproved": true`).
    pub flagged: Vec<VersionCount>,
}

/// One degraded episode, from `route_degraded` to `route_recovered`, clipped to the window.
#[derive(Debug, Clone, Serialize)]
pub struct Episode {
    pub route: String,
    /// Where the episode (or the window, if later) starts.
    pub start: String,
    /// Where it ends: its `route_recovered`, or for an open one the last record's time.
    pub end: String,
    /// No `route_recovered` within the window: still degraded when the log (or the
    /// window) ends, counted up to the last record's time.
    pub open: bool,
    /// Seconds degraded inside the window.
    pub degraded_s: f64,
    /// Seconds of the whole episode as its `route_recovered` says (closed ones only).
    pub episode_s: Option<f64>,
    pub rto_s: Option<u64>,
    /// The episode outlasted `rto_s` (an `rto_exceeded` event, `route_recovered`'s
    /// `exceeded`, or its length).
    pub exceeded: bool,
    pub criticality: Option<String>,
    /// Why the route was degraded at the start: breaker_state, ai_enabled, unapproved.
    pub cause: serde_json::Value,
    /// Reconstructed from an `rto_exceeded` or `route_recovered` event without its
    /// `route_degraded` (a log older than these events, or one that starts mid-episode).
    pub inferred: bool,
    #[serde(skip)]
    origin_us: Micros,
    #[serde(skip)]
    start_us: Micros,
    #[serde(skip)]
    end_us: Micros,
}

/// Degraded time of one route against its RTO.
#[derive(Debug, Clone, Serialize)]
pub struct DegradedRoute {
    pub route: String,
    pub rto_s: Option<u64>,
    pub episodes: usize,
    pub degraded_s: f64,
    pub longest_s: f64,
    pub exceeded: usize,
    pub open: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DlqRow {
    pub route: String,
    pub queued: u64,
    pub spooled: u64,
    pub rejected: u64,
    pub replayed: u64,
    pub replay_failed: u64,
}

/// What `audit verify` says about the chain the report was built from.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifySection {
    /// The hash chain holds: no record edited, removed or moved.
    pub chain_ok: bool,
    /// The first problem: a broken chain, a forged checkpoint, or none signed by the key.
    pub problem: Option<VerifyError>,
    /// `audit verify`'s figures (records, seq range, last hash, records lost,
    /// checkpoints, unanchored tail, `signed_by`); empty when the chain is broken.
    #[serde(flatten)]
    pub chain: VerifyReport,
    /// With verified signatures: the time range the signed chain proves.
    pub proved_from: Option<String>,
    pub proved_to: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct WindowReport {
    pub since: Option<String>,
    pub until: Option<String>,
    /// The first and last record (any kind) inside the window.
    pub first_record: Option<String>,
    pub last_record: Option<String>,
    /// The span the timeline covers: `since` (else the first record) to `until` (else
    /// the last record).
    pub start: Option<String>,
    pub end: Option<String>,
    pub bucket_s: f64,
}

/// Every figure of the report; report.json is this, serialized.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub report_v: u32,
    pub files: Vec<String>,
    pub window: WindowReport,
    pub verify: VerifySection,
    /// Per route, all versions together.
    pub routes: Vec<TrafficRow>,
    /// Per route, model version and variant.
    pub versions: Vec<TrafficRow>,
    pub timeline: Vec<RouteTimeline>,
    pub rollbacks: Vec<Rollback>,
    pub unapproved: Unapproved,
    /// Answers refused by the response schema (decision reason `invalid_response`).
    pub schema_violations: Vec<VersionCount>,
    pub degraded: Vec<DegradedRoute>,
    pub episodes: Vec<Episode>,
    pub dlq: Vec<DlqRow>,
    /// Config reloads and admin changes, with actor and config hashes.
    pub changes: Vec<Change>,
    #[serde(skip)]
    span: Option<(Micros, Micros)>,
}

/// The fields of a line this report reads; events have only `ts` and `event`.
#[derive(Debug, Default, Deserialize)]
struct Line {
    event: Option<String>,
    ts: Option<String>,
    ts_start: Option<String>,
    #[serde(default)]
    route: String,
    variant: Option<String>,
    model_version: Option<String>,
    #[serde(default)]
    outcome: String,
    fallback: Option<String>,
    reason: Option<String>,
    #[serde(default)]
    latency_us: u64,
    dlq: Option<String>,
    #[serde(default)]
    unapproved: bool,
}

/// A row being counted.
struct RowAcc {
    row: TrafficRow,
    fallbacks: BTreeMap<(String, String), u64>,
    latency: Option<hdrhistogram::Histogram<u64>>,
}

impl RowAcc {
    fn new(route: &str, model_version: Option<&str>, variant: Option<&str>) -> RowAcc {
        RowAcc {
            row: TrafficRow {
                route: route.to_string(),
                model_version: model_version.map(str::to_string),
                variant: variant.map(str::to_string),
                ..TrafficRow::default()
            },
            fallbacks: BTreeMap::new(),
            // Auto-resizing, 3 significant digits: p99 within 0.1%.
            latency: hdrhistogram::Histogram::new(3).ok(),
        }
    }

    fn add(&mut self, d: &Line) {
        let r = &mut self.row;
        r.requests += 1;
        match d.outcome.as_str() {
            "ai" => r.ai += 1,
            "fallback" => {
                r.fallback += 1;
                let kind = d.fallback.clone().unwrap_or_else(|| "-".into());
                let reason = d.reason.clone().unwrap_or_else(|| "-".into());
                *self.fallbacks.entry((kind, reason)).or_default() += 1;
            }
            "error" => r.error += 1,
            "cancelled" => r.cancelled += 1,
            _ => {}
        }
        if let Some(h) = &mut self.latency {
            let _ = h.record(d.latency_us.max(1));
        }
    }

    fn finish(self) -> TrafficRow {
        let mut row = self.row;
        let mut fallbacks: Vec<FallbackCount> = self
            .fallbacks
            .into_iter()
            .map(|((kind, reason), count)| FallbackCount {
                kind,
                reason,
                count,
            })
            .collect();
        fallbacks.sort_by_key(|f| std::cmp::Reverse(f.count));
        row.fallbacks = fallbacks;
        if let Some(h) = self.latency.filter(|h| !h.is_empty()) {
            row.latency_p50_ms = Some(h.value_at_quantile(0.5) as f64 / 1000.0);
            row.latency_p99_ms = Some(h.value_at_quantile(0.99) as f64 / 1000.0);
        }
        row
    }
}

/// What one pass over the decisions counts.
#[derive(Default)]
struct Tally {
    routes: BTreeMap<String, RowAcc>,
    versions: BTreeMap<(String, Option<String>, Option<String>), RowAcc>,
    /// Answers per route and [`SLOT_US`] slot, bucketed once the span is known: memory
    /// grows with the busy slots, not with the requests (a log may hold months).
    slots: BTreeMap<String, BTreeMap<Micros, Bucket>>,
    refused: BTreeMap<(String, Option<String>), u64>,
    flagged: BTreeMap<(String, Option<String>), u64>,
    invalid: BTreeMap<(String, Option<String>), u64>,
    dlq: BTreeMap<String, DlqRow>,
    first: Option<Micros>,
    last: Option<Micros>,
}

/// The timeline's resolution before bucketing: 100 ms.
const SLOT_US: Micros = 100_000;

impl Tally {
    fn saw(&mut self, t: Micros) {
        self.first = Some(self.first.map_or(t, |f| f.min(t)));
        self.last = Some(self.last.map_or(t, |l| l.max(t)));
    }

    fn decision(&mut self, d: &Line, t: Micros) {
        let replay = match d.outcome.as_str() {
            "replayed" => Some(true),
            "replay_failed" => Some(false),
            _ => None,
        };
        let dlq = d.dlq.as_deref();
        if replay.is_some() || dlq.is_some() {
            let row = self.dlq.entry(d.route.clone()).or_insert_with(|| DlqRow {
                route: d.route.clone(),
                ..DlqRow::default()
            });
            match replay {
                Some(true) => row.replayed += 1,
                Some(false) => row.replay_failed += 1,
                None => {}
            }
            match dlq {
                Some("queued") => row.queued += 1,
                Some("spooled") => row.spooled += 1,
                Some("rejected") => row.rejected += 1,
                _ => {}
            }
        }
        if replay.is_some() {
            // A replay is not a request of its own: it belongs to the DLQ figures.
            return;
        }
        let key = (d.route.clone(), d.model_version.clone());
        match d.reason.as_deref() {
            Some("unapproved_version") => *self.refused.entry(key.clone()).or_default() += 1,
            Some("invalid_response") => *self.invalid.entry(key.clone()).or_default() += 1,
            _ => {}
        }
        if d.unapproved {
            *self.flagged.entry(key).or_default() += 1;
        }
        self.routes
            .entry(d.route.clone())
            .or_insert_with(|| RowAcc::new(&d.route, None, None))
            .add(d);
        self.versions
            .entry((d.route.clone(), d.model_version.clone(), d.variant.clone()))
            .or_insert_with(|| {
                RowAcc::new(&d.route, d.model_version.as_deref(), d.variant.as_deref())
            })
            .add(d);
        if !self.slots.contains_key(&d.route) {
            self.slots.insert(d.route.clone(), BTreeMap::new());
        }
        if let Some(slots) = self.slots.get_mut(&d.route) {
            let b = slots.entry(t - t % SLOT_US).or_default();
            match d.outcome.as_str() {
                "ai" => b.ai += 1,
                "fallback" => b.fallback += 1,
                "cancelled" => b.cancelled += 1,
                _ => b.error += 1,
            }
        }
    }
}

/// The report of the chain in `paths` (files or directories, rotated files included) for
/// `window`; with `key`, checkpoint signatures are checked too. Fails only when a file
/// cannot be read: a broken chain is reported inside (`verify`), not refused.
pub fn build(
    paths: &[PathBuf],
    window: Window,
    key: Option<&PublicKey>,
) -> std::io::Result<Report> {
    let files = verify::chain_files(paths)?;
    let mut tally = Tally::default();
    for file in &files {
        let bytes = std::fs::read(file)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", file.display())))?;
        for raw in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let Ok(line) = serde_json::from_slice::<Line>(raw) else {
                continue;
            };
            let at = line.ts.as_deref().or(line.ts_start.as_deref());
            let Some(t) = at.and_then(parse_ts).filter(|t| window.contains(*t)) else {
                continue;
            };
            tally.saw(t);
            if line.event.is_none() {
                tally.decision(&line, t);
            }
        }
    }
    // Every change and episode event, the window's and the ones before it: an episode may
    // have started before `since`.
    let wanted: Vec<&str> = changes::CHANGE_EVENTS
        .iter()
        .chain(changes::EPISODE_EVENTS)
        .copied()
        .collect();
    let all = changes::events(paths, None, &wanted)?;
    let in_window = |c: &&Change| parse_ts(&c.ts).is_some_and(|t| window.contains(t));
    let of = |event: &str| -> Vec<Change> {
        all.iter()
            .filter(in_window)
            .filter(|c| c.event == event)
            .cloned()
            .collect()
    };
    let span = match (
        window.since.map(micros).or(tally.first),
        window.until.map(micros).or(tally.last),
    ) {
        (Some(start), Some(end)) => Some((start, end.max(start.saturating_add(1_000_000)))),
        _ => None,
    };
    let episodes = episodes(&all, window, tally.last);
    let counts = |m: &BTreeMap<(String, Option<String>), u64>| -> Vec<VersionCount> {
        m.iter()
            .map(|((route, model_version), count)| VersionCount {
                route: route.clone(),
                model_version: model_version.clone(),
                count: *count,
            })
            .collect()
    };
    let mut report = Report {
        report_v: REPORT_V,
        files: files.iter().map(|f| f.display().to_string()).collect(),
        window: WindowReport {
            since: window.since.map(super::rfc3339),
            until: window.until.map(super::rfc3339),
            first_record: tally.first.map(format_ts),
            last_record: tally.last.map(format_ts),
            start: span.map(|s| format_ts(s.0)),
            end: span.map(|s| format_ts(s.1)),
            bucket_s: span.map_or(0.0, |s| secs(bucket_width(s))),
        },
        verify: verify_section(paths, key),
        timeline: timeline(&tally, span),
        rollbacks: of("canary_rollback").iter().map(rollback).collect(),
        unapproved: Unapproved {
            events: of("unapproved_version"),
            refused: counts(&tally.refused),
            flagged: counts(&tally.flagged),
        },
        schema_violations: counts(&tally.invalid),
        degraded: Vec::new(),
        dlq: tally.dlq.values().cloned().collect(),
        changes: all
            .iter()
            .filter(in_window)
            .filter(|c| CONFIG_CHANGES.contains(&c.event.as_str()))
            .cloned()
            .collect(),
        routes: Vec::new(),
        versions: Vec::new(),
        episodes,
        span,
    };
    report.degraded = degraded_routes(&report.episodes, tally.routes.keys());
    report.routes = tally.routes.into_values().map(RowAcc::finish).collect();
    report.versions = tally.versions.into_values().map(RowAcc::finish).collect();
    Ok(report)
}

/// The width of one timeline bucket over `span`, at least 1 µs.
fn bucket_width(span: (Micros, Micros)) -> Micros {
    (span.1 - span.0).div_ceil(BUCKETS as u64).max(1)
}

fn timeline(tally: &Tally, span: Option<(Micros, Micros)>) -> Vec<RouteTimeline> {
    let Some(span) = span else {
        return Vec::new();
    };
    let width = bucket_width(span);
    tally
        .slots
        .iter()
        .map(|(route, slots)| {
            let mut buckets = vec![Bucket::default(); BUCKETS];
            for (slot, n) in slots {
                let i = usize::try_from(slot.saturating_sub(span.0) / width).unwrap_or(BUCKETS);
                if let Some(b) = buckets.get_mut(i.min(BUCKETS - 1)) {
                    b.ai += n.ai;
                    b.fallback += n.fallback;
                    b.error += n.error;
                    b.cancelled += n.cancelled;
                }
            }
            RouteTimeline {
                route: route.clone(),
                buckets,
            }
        })
        .collect()
}

fn text(v: &serde_json::Value, key: &str) -> Option<String> {
    v.get(key)
        .and_then(serde_json::Value::as_str)
        .map(str::to_string)
}

fn rollback(c: &Change) -> Rollback {
    let figures = c.detail.get("rollback").cloned().unwrap_or_default();
    Rollback {
        ts: c.ts.clone(),
        seq: c.seq,
        route: text(&c.detail, "route"),
        variant: text(&c.detail, "variant"),
        upstream: text(&c.detail, "upstream"),
        reason: text(&figures, "reason"),
        summary: figures.get("summary").cloned().unwrap_or_default(),
        baseline: figures.get("baseline").cloned().unwrap_or_default(),
        config_hash: c.config_hash_after.clone(),
    }
}

/// An episode as the events tell it, before clipping to the window.
struct RawEpisode {
    route: String,
    start: Micros,
    /// The `route_recovered` time and its `degraded_s`.
    recovered: Option<(Micros, Option<f64>)>,
    /// A later `route_degraded` of the same route without a recovery between (the process
    /// stopped while degraded): the episode cannot have lasted past it.
    cut: Option<Micros>,
    rto_s: Option<u64>,
    exceeded: bool,
    criticality: Option<String>,
    cause: serde_json::Value,
    inferred: bool,
}

impl RawEpisode {
    fn from_event(route: &str, c: &Change, start: Micros, inferred: bool) -> RawEpisode {
        let d = &c.detail;
        let cause = if inferred {
            serde_json::Value::Null
        } else {
            serde_json::json!({
                "breaker_state": d.get("breaker_state"),
                "ai_enabled": d.get("ai_enabled"),
                "unapproved": d.get("unapproved"),
            })
        };
        RawEpisode {
            route: route.to_string(),
            start,
            recovered: None,
            cut: None,
            rto_s: d.get("rto_s").and_then(serde_json::Value::as_u64),
            exceeded: false,
            criticality: text(d, "criticality"),
            cause,
            inferred,
        }
    }
}

/// Degraded episodes from `route_degraded` / `rto_exceeded` / `route_recovered` events
/// (all of them, oldest first), clipped to `window`. One still open at the window's end
/// counts up to `last_record` (the last record inside the window) and is marked open.
fn episodes(all: &[Change], window: Window, last_record: Option<Micros>) -> Vec<Episode> {
    let mut open: BTreeMap<String, RawEpisode> = BTreeMap::new();
    let mut done = Vec::new();
    for c in all {
        let (Some(t), Some(route)) = (parse_ts(&c.ts), text(&c.detail, "route")) else {
            continue;
        };
        let degraded_us = c
            .detail
            .get("degraded_s")
            .and_then(serde_json::Value::as_f64)
            .map(|s| (s.max(0.0) * 1e6) as Micros);
        let before = |t: Micros| t.saturating_sub(degraded_us.unwrap_or(0));
        match c.event.as_str() {
            "route_degraded" => {
                if let Some(mut prev) = open.remove(&route) {
                    prev.cut = Some(t);
                    done.push(prev);
                }
                open.insert(route.clone(), RawEpisode::from_event(&route, c, t, false));
            }
            "rto_exceeded" => {
                open.entry(route.clone())
                    .or_insert_with(|| RawEpisode::from_event(&route, c, before(t), true))
                    .exceeded = true;
            }
            "route_recovered" => {
                let mut e = open
                    .remove(&route)
                    .unwrap_or_else(|| RawEpisode::from_event(&route, c, before(t), true));
                e.exceeded |= c.detail.get("exceeded") == Some(&serde_json::Value::Bool(true));
                e.rto_s = e
                    .rto_s
                    .or_else(|| c.detail.get("rto_s").and_then(serde_json::Value::as_u64));
                let lasted = c
                    .detail
                    .get("degraded_s")
                    .and_then(serde_json::Value::as_f64);
                e.recovered = Some((t, lasted));
                done.push(e);
            }
            _ => {}
        }
    }
    done.extend(open.into_values());
    let (lo, hi) = (window.lo(), window.hi());
    let mut out: Vec<Episode> = done
        .into_iter()
        .filter_map(|e| {
            let recovered = e.recovered.filter(|(t, _)| *t <= hi);
            let end = match recovered {
                Some((t, _)) => t,
                None => {
                    let last = last_record.unwrap_or(e.start);
                    e.cut.map_or(last, |cut| cut.min(last))
                }
            }
            .max(e.start);
            if e.start > hi || end < lo {
                return None;
            }
            let (s, t) = (e.start.max(lo), end.min(hi));
            let lasted = end - e.start;
            let exceeded = e.exceeded
                || e.rto_s
                    .is_some_and(|r| lasted >= r.saturating_mul(1_000_000));
            Some(Episode {
                start: format_ts(s),
                end: format_ts(t),
                open: recovered.is_none(),
                degraded_s: secs(t - s),
                episode_s: recovered.and_then(|(_, lasted)| lasted),
                rto_s: e.rto_s,
                exceeded,
                criticality: e.criticality,
                cause: e.cause,
                inferred: e.inferred,
                route: e.route,
                origin_us: e.start,
                start_us: s,
                end_us: t,
            })
        })
        .collect();
    out.sort_by(|a, b| (a.start_us, &a.route).cmp(&(b.start_us, &b.route)));
    out
}

/// Per route (every route with traffic or an episode): degraded seconds against the RTO.
fn degraded_routes<'a>(
    episodes: &[Episode],
    routes: impl Iterator<Item = &'a String>,
) -> Vec<DegradedRoute> {
    let mut out: BTreeMap<&str, DegradedRoute> = BTreeMap::new();
    let empty = |route: &str| DegradedRoute {
        route: route.to_string(),
        rto_s: None,
        episodes: 0,
        degraded_s: 0.0,
        longest_s: 0.0,
        exceeded: 0,
        open: false,
    };
    for route in routes {
        out.insert(route, empty(route));
    }
    for e in episodes {
        let r = out.entry(&e.route).or_insert_with(|| empty(&e.route));
        r.rto_s = e.rto_s.or(r.rto_s);
        r.episodes += 1;
        r.degraded_s += e.degraded_s;
        r.longest_s = r.longest_s.max(e.degraded_s);
        r.exceeded += usize::from(e.exceeded);
        r.open |= e.open;
    }
    out.into_values().collect()
}

fn verify_section(paths: &[PathBuf], key: Option<&PublicKey>) -> VerifySection {
    let (chain, problem) = match verify::verify_signed(paths, key) {
        Ok(r) => (Some(r), None),
        // The chain may hold even though no checkpoint vouches for it: say both.
        Err(e) if e.problem == Problem::NoCheckpoint => (verify::verify_paths(paths).ok(), Some(e)),
        Err(e) => (None, Some(e)),
    };
    let Some(chain) = chain else {
        return VerifySection {
            problem,
            chain: VerifyReport {
                signed_by: key.map(|k| k.key_id.clone()),
                ..VerifyReport::default()
            },
            ..VerifySection::default()
        };
    };
    let signed = key.is_some() && problem.is_none() && chain.checkpoints > 0;
    VerifySection {
        chain_ok: true,
        problem,
        proved_from: chain.first_ts.clone().filter(|_| signed),
        proved_to: chain.last_checkpoint_ts.clone().filter(|_| signed),
        chain,
    }
}

// ---- Rendering: one model of sections and tables, two renderers (Markdown, HTML). ----

/// A table of plain text cells; each renderer escapes them.
struct Table {
    headers: &'static [&'static str],
    rows: Vec<Vec<String>>,
}

enum Block {
    Text(String),
    Table(Table),
    /// The per-route stacked bars (HTML only).
    TrafficChart,
    /// The degraded episodes against the RTO (HTML only).
    DegradedChart,
}

struct Section {
    title: &'static str,
    blocks: Vec<Block>,
}

fn dash(s: Option<&str>) -> String {
    s.unwrap_or("-").to_string()
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.3}"))
}

fn seconds(v: f64) -> String {
    format!("{v:.1}")
}

fn yes(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

/// A figure from a JSON object (a rollback's window summary), as text.
fn figure(v: &serde_json::Value, key: &str) -> String {
    match v.get(key) {
        None | Some(serde_json::Value::Null) => "-".into(),
        Some(serde_json::Value::Number(n)) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.3}"),
            _ => n.to_string(),
        },
        Some(other) => other.to_string().trim_matches('"').to_string(),
    }
}

fn none_in_window(what: &str) -> Block {
    Block::Text(format!("No {what} in the window."))
}

fn table_or(table: Table, what: &str) -> Block {
    if table.rows.is_empty() {
        none_in_window(what)
    } else {
        Block::Table(table)
    }
}

fn traffic_table(rows: &[TrafficRow], per_version: bool) -> Table {
    const ROUTE: &[&str] = &[
        "Route",
        "Requests",
        "AI",
        "Fallback",
        "Error",
        "Cancelled",
        "Fallbacks (kind/reason)",
        "p50 ms",
        "p99 ms",
    ];
    const VERSION: &[&str] = &[
        "Route",
        "Model version",
        "Variant",
        "Requests",
        "AI",
        "Fallback",
        "Error",
        "Cancelled",
        "Fallbacks (kind/reason)",
        "p50 ms",
        "p99 ms",
    ];
    let rows = rows
        .iter()
        .map(|r| {
            let mut row = vec![r.route.clone()];
            if per_version {
                row.push(dash(r.model_version.as_deref()));
                row.push(dash(r.variant.as_deref()));
            }
            let fallbacks: Vec<String> = r
                .fallbacks
                .iter()
                .map(|f| format!("{}/{}: {}", f.kind, f.reason, f.count))
                .collect();
            row.extend([
                r.requests.to_string(),
                r.ai.to_string(),
                r.fallback.to_string(),
                r.error.to_string(),
                r.cancelled.to_string(),
                if fallbacks.is_empty() {
                    "-".into()
                } else {
                    fallbacks.join(", ")
                },
                ms(r.latency_p50_ms),
                ms(r.latency_p99_ms),
            ]);
            row
        })
        .collect();
    Table {
        headers: if per_version { VERSION } else { ROUTE },
        rows,
    }
}

fn version_counts(counts: &[VersionCount]) -> Table {
    Table {
        headers: &["Route", "Model version", "Records"],
        rows: counts
            .iter()
            .map(|c| {
                vec![
                    c.route.clone(),
                    dash(c.model_version.as_deref()),
                    c.count.to_string(),
                ]
            })
            .collect(),
    }
}

fn short_hash(h: Option<&str>) -> String {
    h.map_or("-", |h| h.get(..12).unwrap_or(h)).to_string()
}

fn verify_text(v: &VerifySection) -> Vec<Block> {
    let seq = |s: Option<u64>| s.map_or_else(|| "-".to_string(), |s| s.to_string());
    let mut out = Vec::new();
    if v.chain_ok {
        out.push(Block::Text(format!(
            "Chain intact: {} record(s) in {} file(s), seq {}..{}, last hash {}.",
            v.chain.records,
            v.chain.files,
            seq(v.chain.first_seq),
            seq(v.chain.last_seq),
            dash(v.chain.last_hash.as_deref())
        )));
    } else {
        out.push(Block::Text(
            "CHAIN BROKEN: the figures below come from a log that was edited, cut or reordered."
                .into(),
        ));
    }
    if let Some(p) = &v.problem {
        out.push(Block::Text(format!("Problem: {p}")));
    }
    if v.chain.records_lost > 0 {
        out.push(Block::Text(format!(
            "WARNING: the chain says {} decision record(s) were lost (records_lost events).",
            v.chain.records_lost
        )));
    }
    match (&v.chain.signed_by, &v.proved_from) {
        (Some(key), Some(from)) => out.push(Block::Text(format!(
            "Signed: {} checkpoint(s) verified under key {key}; the log proves {from} .. {} (seq {}..{}). Unanchored tail: {} record(s) after the last checkpoint.",
            v.chain.checkpoints,
            dash(v.proved_to.as_deref()),
            seq(v.chain.first_seq),
            seq(v.chain.last_checkpoint_seq),
            v.chain.unanchored
        ))),
        (Some(key), None) => out.push(Block::Text(format!(
            "No checkpoint verified under key {key}: no signature vouches for this log."
        ))),
        (None, _) => out.push(Block::Text(format!(
            "{} checkpoint(s) found, signatures not checked (give --public-key); unanchored tail: {} record(s).",
            v.chain.checkpoints, v.chain.unanchored
        ))),
    }
    out
}

fn sections(r: &Report) -> Vec<Section> {
    let w = &r.window;
    let mut out = vec![Section {
        title: "Window",
        blocks: vec![
            Block::Text(format!(
                "From {} to {}; records in the window from {} to {}.",
                w.since.as_deref().unwrap_or("the start of the log"),
                w.until.as_deref().unwrap_or("the end of the log"),
                dash(w.first_record.as_deref()),
                dash(w.last_record.as_deref()),
            )),
            Block::Text(format!("Files: {}.", r.files.join(", "))),
        ],
    }];
    out.push(Section {
        title: "Chain verification",
        blocks: verify_text(&r.verify),
    });
    out.push(Section {
        title: "Traffic per route",
        blocks: vec![
            table_or(traffic_table(&r.routes, false), "requests"),
            Block::TrafficChart,
        ],
    });
    out.push(Section {
        title: "Per model version and variant",
        blocks: vec![table_or(traffic_table(&r.versions, true), "requests")],
    });
    let rollbacks = Table {
        headers: &[
            "Time",
            "Route",
            "Variant",
            "Upstream",
            "Reason",
            "Requests",
            "Failures",
            "Error rate",
            "p99 ms",
            "Baseline error rate",
            "Baseline p99 ms",
        ],
        rows: r
            .rollbacks
            .iter()
            .map(|b| {
                vec![
                    b.ts.clone(),
                    dash(b.route.as_deref()),
                    dash(b.variant.as_deref()),
                    dash(b.upstream.as_deref()),
                    dash(b.reason.as_deref()),
                    figure(&b.summary, "requests"),
                    figure(&b.summary, "failures"),
                    figure(&b.summary, "error_rate"),
                    figure(&b.summary, "p99_ms"),
                    figure(&b.baseline, "error_rate"),
                    figure(&b.baseline, "p99_ms"),
                ]
            })
            .collect(),
    };
    out.push(Section {
        title: "Canary rollbacks",
        blocks: vec![table_or(rollbacks, "canary rollback")],
    });
    let u = &r.unapproved;
    let events = Table {
        headers: &["Time", "Route", "Model version", "Variant", "Action"],
        rows: u
            .events
            .iter()
            .map(|e| {
                vec![
                    e.ts.clone(),
                    dash(text(&e.detail, "route").as_deref()),
                    dash(text(&e.detail, "model_version").as_deref()),
                    dash(text(&e.detail, "variant").as_deref()),
                    dash(text(&e.detail, "on_unapproved").as_deref()),
                ]
            })
            .collect(),
    };
    out.push(Section {
        title: "Unapproved model versions",
        blocks: vec![
            Block::Text(
                "First answers of each unapproved version (unapproved_version events):".into(),
            ),
            table_or(events, "unapproved_version event"),
            Block::Text("Answers refused as unapproved (served by a fallback):".into()),
            table_or(version_counts(&u.refused), "refused answer"),
            Block::Text("Answers passed marked as unapproved (on_unapproved = flag):".into()),
            table_or(version_counts(&u.flagged), "flagged answer"),
        ],
    });
    out.push(Section {
        title: "Schema violations",
        blocks: vec![table_or(
            version_counts(&r.schema_violations),
            "answer refused by its response schema",
        )],
    });
    let routes = Table {
        headers: &[
            "Route",
            "RTO s",
            "Episodes",
            "Degraded s",
            "Longest s",
            "Exceeded RTO",
            "Open at the end",
        ],
        rows: r
            .degraded
            .iter()
            .map(|d| {
                vec![
                    d.route.clone(),
                    d.rto_s.map_or_else(|| "-".into(), |s| s.to_string()),
                    d.episodes.to_string(),
                    seconds(d.degraded_s),
                    seconds(d.longest_s),
                    d.exceeded.to_string(),
                    yes(d.open),
                ]
            })
            .collect(),
    };
    let episodes = Table {
        headers: &[
            "Route",
            "Start",
            "End",
            "Degraded s",
            "RTO s",
            "Exceeded",
            "Open",
            "Cause",
        ],
        rows: r
            .episodes
            .iter()
            .map(|e| {
                let cause = match &e.cause {
                    serde_json::Value::Object(o) => o
                        .keys()
                        .map(|k| format!("{k}={}", figure(&e.cause, k)))
                        .collect::<Vec<_>>()
                        .join(" "),
                    _ => "(inferred)".into(),
                };
                vec![
                    e.route.clone(),
                    e.start.clone(),
                    e.end.clone(),
                    seconds(e.degraded_s),
                    e.rto_s.map_or_else(|| "-".into(), |s| s.to_string()),
                    yes(e.exceeded),
                    yes(e.open),
                    cause,
                ]
            })
            .collect(),
    };
    out.push(Section {
        title: "Degraded time against RTO",
        blocks: vec![
            table_or(routes, "route"),
            Block::DegradedChart,
            table_or(episodes, "degraded episode"),
        ],
    });
    let dlq = Table {
        headers: &[
            "Route",
            "Queued",
            "Spooled",
            "Rejected",
            "Replayed",
            "Replay failed",
        ],
        rows: r
            .dlq
            .iter()
            .map(|d| {
                vec![
                    d.route.clone(),
                    d.queued.to_string(),
                    d.spooled.to_string(),
                    d.rejected.to_string(),
                    d.replayed.to_string(),
                    d.replay_failed.to_string(),
                ]
            })
            .collect(),
    };
    out.push(Section {
        title: "Dead-letter queue",
        blocks: vec![table_or(dlq, "DLQ activity")],
    });
    let trail = Table {
        headers: &[
            "Time",
            "Seq",
            "Event",
            "Actor",
            "Config before",
            "Config after",
            "Details",
        ],
        rows: r
            .changes
            .iter()
            .map(|c| {
                vec![
                    c.ts.clone(),
                    c.seq.to_string(),
                    c.event.clone(),
                    dash(c.actor.as_deref()),
                    short_hash(c.config_hash_before.as_deref()),
                    short_hash(c.config_hash_after.as_deref()),
                    changes::details(&c.detail),
                ]
            })
            .collect(),
    };
    out.push(Section {
        title: "Config and admin changes",
        blocks: vec![table_or(trail, "config or admin change")],
    });
    out
}

const TITLE: &str = "breakwater patch-window evidence report";

/// Text for a Markdown table cell or paragraph: no HTML a renderer would run, no link
/// syntax, no cell breaks.
fn md_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\\' | '|' | '`' | '[' | ']' | '*' => {
                out.push('\\');
                out.push(c);
            }
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// report.md.
pub fn markdown(r: &Report) -> String {
    let mut out = format!("# {TITLE}\n\n");
    for s in sections(r) {
        out.push_str(&format!("## {}\n\n", s.title));
        for b in s.blocks {
            match b {
                Block::Text(t) => out.push_str(&format!("{}\n\n", md_escape(&t))),
                Block::Table(t) => {
                    out.push_str(&format!("| {} |\n", t.headers.join(" | ")));
                    out.push_str(&format!("|{}\n", "---|".repeat(t.headers.len())));
                    for row in t.rows {
                        let cells: Vec<String> = row.iter().map(|c| md_escape(c)).collect();
                        out.push_str(&format!("| {} |\n", cells.join(" | ")));
                    }
                    out.push('\n');
                }
                Block::TrafficChart | Block::DegradedChart => {}
            }
        }
    }
    out
}

/// Text for HTML element content and attribute values.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const CSS: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:80em}\
table{border-collapse:collapse;margin:.5em 0 1.5em}\
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left;font-size:.9em;vertical-align:top}\
th{background:#eee}svg{display:block;margin:.5em 0 1em;font-size:11px}\
.key span{display:inline-block;width:.8em;height:.8em;margin:0 .3em 0 1em}";

const AI: &str = "#2e7d32";
const FALLBACK: &str = "#f9a825";
const ERROR: &str = "#c62828";
const CANCELLED: &str = "#757575";
const WITHIN_RTO: &str = "#fb8c00";

/// report.html: one file, inline CSS and SVG, no script and no URL of any kind (the
/// Content-Security-Policy forbids both, in case an escape were ever missed).
pub fn html(r: &Report) -> String {
    let mut out = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\
         <title>{TITLE}</title><style>{CSS}</style></head><body>\n<h1>{TITLE}</h1>\n"
    );
    for s in sections(r) {
        out.push_str(&format!("<h2>{}</h2>\n", html_escape(s.title)));
        for b in s.blocks {
            match b {
                Block::Text(t) => out.push_str(&format!("<p>{}</p>\n", html_escape(&t))),
                Block::Table(t) => {
                    out.push_str("<table><tr>");
                    for h in t.headers {
                        out.push_str(&format!("<th>{}</th>", html_escape(h)));
                    }
                    out.push_str("</tr>\n");
                    for row in t.rows {
                        out.push_str("<tr>");
                        for c in row {
                            out.push_str(&format!("<td>{}</td>", html_escape(&c)));
                        }
                        out.push_str("</tr>\n");
                    }
                    out.push_str("</table>\n");
                }
                Block::TrafficChart => traffic_chart(r, &mut out),
                Block::DegradedChart => degraded_chart(r, &mut out),
            }
        }
    }
    out.push_str("</body></html>\n");
    out
}

fn key(out: &mut String, entries: &[(&str, &str)]) {
    out.push_str("<p class=\"key\">");
    for (colour, label) in entries {
        out.push_str(&format!(
            "<span style=\"background:{colour}\"></span>{}",
            html_escape(label)
        ));
    }
    out.push_str("</p>\n");
}

/// Per route: stacked bars of AI / fallback / error / cancelled answers per time bucket.
fn traffic_chart(r: &Report, out: &mut String) {
    const W: f64 = 720.0;
    const H: f64 = 150.0;
    const LEFT: f64 = 50.0;
    const TOP: f64 = 10.0;
    const PLOT_H: f64 = 110.0;
    if r.timeline.is_empty() {
        return;
    }
    let bar = (W - LEFT - 10.0) / BUCKETS as f64;
    let start = dash(r.window.start.as_deref());
    let end = dash(r.window.end.as_deref());
    for t in &r.timeline {
        let max = t
            .buckets
            .iter()
            .map(Bucket::total)
            .max()
            .unwrap_or(0)
            .max(1);
        out.push_str(&format!(
            "<svg width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\"><title>{}</title>\n",
            html_escape(&format!("{}: answers per {:.1} s", t.route, r.window.bucket_s))
        ));
        out.push_str(&format!(
            "<text x=\"0\" y=\"{}\">{max}</text><text x=\"0\" y=\"{}\">0</text>\
             <line x1=\"{LEFT}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#444\"/>\n",
            TOP + 10.0,
            TOP + PLOT_H,
            TOP + PLOT_H,
            W - 10.0,
            TOP + PLOT_H
        ));
        for (i, b) in t.buckets.iter().enumerate() {
            let x = LEFT + i as f64 * bar;
            let mut y = TOP + PLOT_H;
            out.push_str(&format!(
                "<g><title>{}</title>",
                html_escape(&format!(
                    "{} bucket {}: AI {}, fallback {}, error {}, cancelled {}",
                    t.route,
                    i + 1,
                    b.ai,
                    b.fallback,
                    b.error,
                    b.cancelled
                ))
            ));
            for (n, colour) in [
                (b.ai, AI),
                (b.fallback, FALLBACK),
                (b.error, ERROR),
                (b.cancelled, CANCELLED),
            ] {
                if n == 0 {
                    continue;
                }
                let h = n as f64 / max as f64 * PLOT_H;
                y -= h;
                out.push_str(&format!(
                    "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{colour}\"/>",
                    bar - 2.0
                ));
            }
            out.push_str("</g>\n");
        }
        out.push_str(&format!(
            "<text x=\"{LEFT}\" y=\"{}\">{}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-weight=\"bold\">{}</text></svg>\n",
            H - 8.0,
            html_escape(&start),
            W - 10.0,
            H - 8.0,
            html_escape(&end),
            (W + LEFT) / 2.0,
            H - 8.0,
            html_escape(&t.route),
        ));
    }
    key(
        out,
        &[
            (AI, "AI"),
            (FALLBACK, "fallback"),
            (ERROR, "error"),
            (CANCELLED, "cancelled"),
        ],
    );
}

/// One row per route: its degraded episodes across the window, with a mark where each
/// reached its RTO.
fn degraded_chart(r: &Report, out: &mut String) {
    const W: f64 = 720.0;
    const LEFT: f64 = 180.0;
    const ROW: f64 = 26.0;
    let Some((lo, hi)) = r.span else {
        return;
    };
    let routes: Vec<&DegradedRoute> = r.degraded.iter().filter(|d| d.episodes > 0).collect();
    if routes.is_empty() {
        return;
    }
    let plot = W - LEFT - 10.0;
    let x = |t: Micros| LEFT + (t.clamp(lo, hi) - lo) as f64 / (hi - lo).max(1) as f64 * plot;
    let h = ROW * routes.len() as f64 + 24.0;
    out.push_str(&format!(
        "<svg width=\"{W}\" height=\"{h}\" viewBox=\"0 0 {W} {h}\" role=\"img\"><title>degraded episodes against the RTO</title>\n"
    ));
    for (i, d) in routes.iter().enumerate() {
        let y = i as f64 * ROW + 4.0;
        out.push_str(&format!(
            "<text x=\"0\" y=\"{:.1}\">{}</text><rect x=\"{LEFT}\" y=\"{y:.1}\" width=\"{plot:.1}\" height=\"{:.1}\" fill=\"#eee\"/>\n",
            y + 13.0,
            html_escape(&d.route),
            ROW - 8.0
        ));
        for e in r.episodes.iter().filter(|e| e.route == d.route) {
            let (x0, x1) = (x(e.start_us), x(e.end_us));
            let colour = if e.exceeded { ERROR } else { WITHIN_RTO };
            let dashes = if e.open {
                " stroke=\"#000\" stroke-dasharray=\"4 2\""
            } else {
                ""
            };
            out.push_str(&format!(
                "<rect x=\"{x0:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{colour}\"{dashes}><title>{}</title></rect>\n",
                (x1 - x0).max(2.0),
                ROW - 8.0,
                html_escape(&format!(
                    "{}: {} .. {}, {:.1} s degraded (RTO {}){}",
                    e.route,
                    e.start,
                    e.end,
                    e.degraded_s,
                    e.rto_s.map_or_else(|| "none".into(), |s| format!("{s} s")),
                    if e.open { ", still open" } else { "" }
                ))
            ));
            // Where this episode reached (or would reach) its RTO.
            if let Some(rto) = e.rto_s {
                let at = e.origin_us.saturating_add(rto.saturating_mul(1_000_000));
                if (lo..=hi).contains(&at) {
                    let xr = x(at);
                    out.push_str(&format!(
                        "<line x1=\"{xr:.1}\" y1=\"{:.1}\" x2=\"{xr:.1}\" y2=\"{:.1}\" stroke=\"#000\" stroke-width=\"2\"><title>RTO {rto} s</title></line>\n",
                        y - 2.0,
                        y + ROW - 6.0
                    ));
                }
            }
        }
    }
    let base = ROW * routes.len() as f64 + 18.0;
    out.push_str(&format!(
        "<text x=\"{LEFT}\" y=\"{base:.1}\">{}</text><text x=\"{}\" y=\"{base:.1}\" text-anchor=\"end\">{}</text></svg>\n",
        html_escape(&format_ts(lo)),
        W - 10.0,
        html_escape(&format_ts(hi)),
    ));
    key(
        out,
        &[
            (WITHIN_RTO, "degraded within the RTO"),
            (ERROR, "degraded past the RTO"),
            ("#000", "RTO reached (dashed outline: still open)"),
        ],
    );
}

/// report.json: the [`Report`], pretty-printed.
pub fn json(r: &Report) -> serde_json::Result<String> {
    serde_json::to_string_pretty(r).map(|mut s| {
        s.push('\n');
        s
    })
}

/// The three files written into a directory.
#[derive(Debug, Clone)]
pub struct Written {
    pub markdown: PathBuf,
    pub html: PathBuf,
    pub json: PathBuf,
}

/// Writes report.md, report.html and report.json into `dir` (made if missing).
pub fn write(r: &Report, dir: &Path) -> std::io::Result<Written> {
    std::fs::create_dir_all(dir)?;
    let written = Written {
        markdown: dir.join("report.md"),
        html: dir.join("report.html"),
        json: dir.join("report.json"),
    };
    std::fs::write(&written.markdown, markdown(r))?;
    std::fs::write(&written.html, html(r))?;
    std::fs::write(&written.json, json(r).map_err(std::io::Error::from)?)?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const T0: &str = "2026-12-01T10:00:00Z";

    fn at(s: u64) -> String {
        format_ts(parse_ts(T0).unwrap() + s * 1_000_000)
    }

    fn time(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(parse_ts(&at(s)).unwrap())
    }

    /// Records chained as the writer chains them (seq, prev_hash, hash), one per line.
    fn chain(records: Vec<serde_json::Value>) -> String {
        let mut prev = "0".repeat(64);
        let mut out = String::new();
        for (seq, mut r) in records.into_iter().enumerate() {
            r["seq"] = json!(seq);
            r["prev_hash"] = json!(prev);
            let canonical = serde_json::to_string(&r).unwrap();
            let hash = super::super::record::chain_hash(&prev, canonical.as_bytes());
            out.push_str(&canonical[..canonical.len() - 1]);
            out.push_str(&format!(",\"hash\":\"{hash}\"}}\n"));
            prev = hash;
        }
        out
    }

    fn decision(
        s: u64,
        outcome: &str,
        version: Option<&str>,
        latency_us: u64,
    ) -> serde_json::Value {
        json!({
            "schema_v": 1, "event_id": format!("e-{s}"), "ts_start": at(s), "ts_end": at(s),
            "instance": "h1", "route": "grading", "upstream": "ai", "variant": null,
            "model_version": version, "config_gen": 1, "request_id": format!("r-{s}"),
            "method": "POST", "path": "/v1/grade", "input_digest": null, "output_digest": null,
            "key_id": "k", "outcome": outcome, "fallback": null, "reason": null, "status": 200,
            "latency_us": latency_us, "upstream_latency_us": null, "attempts": 1,
            "breaker_state": "closed", "dlq": null, "dlq_msg_id": null,
        })
    }

    fn fallback(s: u64, kind: &str, reason: &str) -> serde_json::Value {
        let mut d = decision(s, "fallback", None, 300);
        d["fallback"] = json!(kind);
        d["reason"] = json!(reason);
        d
    }

    fn event(s: u64, name: &str, detail: serde_json::Value) -> serde_json::Value {
        json!({
            "schema_v": 1, "event_id": format!("e-{s}"), "ts": at(s), "instance": "h1",
            "event": name, "config_gen": 1, "config_hash_before": "a".repeat(64),
            "config_hash_after": "b".repeat(64), "actor": null, "detail": detail,
        })
    }

    /// A patch window: AI answers of two versions, a canary rollback, an outage with a
    /// fallback chain (one episode past its RTO, one still open), compliance refusals,
    /// DLQ traffic and two config changes.
    fn window_log() -> String {
        let mut r = Vec::new();
        for i in 0..10 {
            r.push(decision(i, "ai", Some("rec-v7"), (i + 1) * 1000));
        }
        let mut reload = event(
            1,
            "config_reload",
            json!({"routes_changed": {"changed": ["grading"]}}),
        );
        reload["actor"] = json!("token:ab12");
        r.insert(2, reload);
        let mut admin = event(
            2,
            "admin_change",
            json!({"action": "ai_enabled", "route": "grading"}),
        );
        admin["actor"] = json!("token:cd34");
        r.insert(3, admin);
        for i in 10..14 {
            let mut d = decision(i, "ai", Some("rec-v8"), 50_000);
            d["variant"] = json!("v8");
            r.push(d);
        }
        r.push(event(14, "canary_rollback", json!({
            "route": "grading", "variant": "v8", "upstream": "ai-v8",
            "rollback": {"at": at(14), "reason": "error rate 0.500 over 0.1",
                "summary": {"requests": 20, "failures": 10, "error_rate": 0.5, "p50_ms": 1.0, "p99_ms": 2.0},
                "baseline": {"requests": 80, "failures": 0, "error_rate": 0.0, "p50_ms": 1.0, "p99_ms": 1.5}},
        })));
        r.push(event(
            19,
            "route_degraded",
            json!({
                "route": "grading", "criticality": "high", "rto_s": 5, "breaker_state": "open",
                "ai_enabled": true, "unapproved": false, "config_hash": "b".repeat(64),
            }),
        ));
        for i in 20..23 {
            r.push(fallback(i, "static", "breaker_open"));
        }
        r.push(fallback(23, "cache", "upstream_5xx"));
        r.push(decision(24, "error", None, 700));
        r.push(event(
            25,
            "rto_exceeded",
            json!({"route": "grading", "rto_s": 5, "degraded_s": 6}),
        ));
        r.push(decision(25, "cancelled", None, 900));
        let mut refused = fallback(26, "static", "unapproved_version");
        refused["model_version"] = json!("rec-v9");
        r.push(refused);
        let mut flagged = decision(27, "ai", Some("rec-v9"), 800);
        flagged["unapproved"] = json!(true);
        r.push(flagged);
        let mut invalid = fallback(28, "static", "invalid_response");
        invalid["model_version"] = json!("rec-v7");
        invalid["latency_us"] = json!(500);
        r.push(invalid);
        let mut queued = fallback(29, "static", "connect_error");
        queued["dlq"] = json!("queued");
        r.push(queued);
        r.push(event(
            30,
            "route_recovered",
            json!({"route": "grading", "degraded_s": 11.0, "rto_s": 5, "exceeded": true}),
        ));
        r.push(event(37, "route_degraded", json!({
            "route": "grading", "criticality": "high", "rto_s": 5, "breaker_state": "forced_open",
            "ai_enabled": true, "unapproved": false, "config_hash": "b".repeat(64),
        })));
        r.push(decision(40, "replayed", Some("rec-v7"), 1000));
        r.push(decision(41, "replay_failed", None, 1000));
        chain(r)
    }

    fn report_of(log: &str, window: Window) -> Report {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("decisions.jsonl");
        std::fs::write(&file, log).unwrap();
        build(&[file], window, None).unwrap()
    }

    fn row<'a>(rows: &'a [TrafficRow], version: Option<&str>) -> &'a TrafficRow {
        rows.iter()
            .find(|r| r.model_version.as_deref() == version)
            .unwrap_or_else(|| panic!("no row for {version:?}: {rows:#?}"))
    }

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() <= b * 0.002)
    }

    #[test]
    fn the_whole_log_counts_every_answer_once() {
        let r = report_of(&window_log(), Window::default());
        assert!(r.verify.chain_ok, "{:?}", r.verify.problem);
        assert_eq!(r.verify.chain.records, 33);
        let route = &r.routes[0];
        assert_eq!(r.routes.len(), 1);
        assert_eq!(
            (
                route.requests,
                route.ai,
                route.fallback,
                route.error,
                route.cancelled
            ),
            (24, 15, 7, 1, 1),
            "{route:#?}"
        );
        let count = |kind: &str, reason: &str| {
            route
                .fallbacks
                .iter()
                .find(|f| f.kind == kind && f.reason == reason)
                .map_or(0, |f| f.count)
        };
        assert_eq!(count("static", "breaker_open"), 3);
        assert_eq!(count("cache", "upstream_5xx"), 1);
        assert_eq!(route.fallbacks[0].count, 3, "largest first");

        let v7 = row(&r.versions, Some("rec-v7"));
        assert_eq!((v7.ai, v7.fallback, v7.variant.as_deref()), (10, 1, None));
        // 500 µs and 1..10 ms: the median is the sixth, p99 the largest.
        assert!(close(v7.latency_p50_ms, 5.0), "{v7:?}");
        assert!(close(v7.latency_p99_ms, 10.0), "{v7:?}");
        let v8 = row(&r.versions, Some("rec-v8"));
        assert_eq!((v8.ai, v8.variant.as_deref()), (4, Some("v8")));
        assert!(close(v8.latency_p99_ms, 50.0), "{v8:?}");

        assert_eq!(r.rollbacks.len(), 1);
        let b = &r.rollbacks[0];
        assert_eq!(b.variant.as_deref(), Some("v8"));
        assert_eq!(b.summary["error_rate"], 0.5);
        assert_eq!(b.baseline["requests"], 80);

        let one = |route: &str, v: &str| {
            vec![VersionCount {
                route: route.into(),
                model_version: Some(v.into()),
                count: 1,
            }]
        };
        assert_eq!(r.unapproved.refused, one("grading", "rec-v9"));
        assert_eq!(r.unapproved.flagged, one("grading", "rec-v9"));
        assert_eq!(r.schema_violations, one("grading", "rec-v7"));
        assert_eq!(
            r.dlq,
            vec![DlqRow {
                route: "grading".into(),
                queued: 1,
                spooled: 0,
                rejected: 0,
                replayed: 1,
                replay_failed: 1,
            }]
        );
        let events: Vec<&str> = r.changes.iter().map(|c| c.event.as_str()).collect();
        assert_eq!(events, ["config_reload", "admin_change"]);
        assert_eq!(r.changes[0].actor.as_deref(), Some("token:ab12"));

        // The first episode crossed its RTO and recovered; the second is still open at
        // the end of the log and counts up to its last record (41 s).
        assert_eq!(r.episodes.len(), 2, "{:#?}", r.episodes);
        let (first, second) = (&r.episodes[0], &r.episodes[1]);
        assert!(!first.open && first.exceeded);
        assert_eq!(first.degraded_s, 11.0);
        assert_eq!(first.episode_s, Some(11.0));
        assert_eq!(first.cause["breaker_state"], "open");
        assert!(second.open && !second.exceeded, "{second:?}");
        assert_eq!(second.degraded_s, 4.0);
        assert_eq!(second.end, at(41));
        let d = &r.degraded[0];
        assert_eq!(
            (d.episodes, d.exceeded, d.open, d.rto_s),
            (2, 1, true, Some(5))
        );
        assert_eq!(d.degraded_s, 15.0);

        let buckets = &r.timeline[0].buckets;
        assert_eq!(buckets.len(), BUCKETS);
        assert_eq!(buckets.iter().map(Bucket::total).sum::<u64>(), 24);
        assert_eq!(buckets[0].ai, 3, "0, 1 and 2 s: the first 2.05 s bucket");
        assert_eq!(r.window.first_record.as_deref(), Some(at(0).as_str()));
    }

    #[test]
    fn since_and_until_clip_counts_and_episodes() {
        let window = Window {
            since: Some(time(21)),
            until: Some(time(27)),
        };
        let r = report_of(&window_log(), window);
        let route = &r.routes[0];
        assert_eq!(
            (
                route.requests,
                route.ai,
                route.fallback,
                route.error,
                route.cancelled
            ),
            (7, 1, 4, 1, 1),
            "{route:#?}"
        );
        assert!(r.rollbacks.is_empty());
        assert!(r.changes.is_empty());
        assert!(r.dlq.is_empty());
        // Started before the window (19 s), recovered after it (30 s): counted from
        // `since` to the last record inside the window, and open at its end.
        assert_eq!(r.episodes.len(), 1, "{:#?}", r.episodes);
        let e = &r.episodes[0];
        assert!(e.open);
        assert!(e.exceeded, "its rto_exceeded at 25 s is inside the window");
        assert_eq!(
            (e.start.as_str(), e.end.as_str()),
            (at(21).as_str(), at(27).as_str())
        );
        assert_eq!(e.degraded_s, 6.0);
        // The window, not the log, sets the timeline's span.
        assert_eq!(r.window.start.as_deref(), Some(at(21).as_str()));
        assert!((r.window.bucket_s - 0.3).abs() < 1e-9);
        // Verification covers the whole chain, whatever the window.
        assert_eq!(r.verify.chain.records, 33);
    }

    /// Logs older than route_degraded / route_recovered, and a process that stopped while
    /// degraded: the episodes are still there, marked for what they are.
    #[test]
    fn episodes_without_their_start_or_end_are_inferred_or_cut() {
        let log = chain(vec![
            // An old log: only the RTO crossing (6 s into the episode) and no recovery.
            event(
                10,
                "rto_exceeded",
                json!({"route": "old", "rto_s": 5, "degraded_s": 6}),
            ),
            // Degraded, then the process stopped: the next start cuts the first episode.
            event(20, "route_degraded", json!({"route": "cut", "rto_s": 60})),
            event(23, "log_resumed", json!({})),
            event(24, "route_degraded", json!({"route": "cut", "rto_s": 60})),
            event(
                26,
                "route_recovered",
                json!({"route": "cut", "degraded_s": 2.0, "rto_s": 60, "exceeded": false}),
            ),
            decision(30, "ai", Some("v1"), 1000),
        ]);
        let r = report_of(&log, Window::default());
        let e: Vec<(&str, f64, bool, bool, bool)> = r
            .episodes
            .iter()
            .map(|e| {
                (
                    e.route.as_str(),
                    e.degraded_s,
                    e.open,
                    e.exceeded,
                    e.inferred,
                )
            })
            .collect();
        assert_eq!(
            e,
            [
                // From 6 s before its crossing (4 s) to the last record (30 s).
                ("old", 26.0, true, true, true),
                ("cut", 4.0, true, false, false),
                ("cut", 2.0, false, false, false),
            ]
        );
    }

    #[test]
    fn a_broken_chain_is_reported_not_refused() {
        let log = window_log().replacen("\"rec-v8\"", "\"rec-v1\"", 1);
        let r = report_of(&log, Window::default());
        assert!(!r.verify.chain_ok);
        assert_eq!(
            r.verify.problem.as_ref().map(|p| p.problem),
            Some(Problem::Tampered)
        );
        assert!(markdown(&r).contains("CHAIN BROKEN"));
    }

    #[test]
    fn html_and_markdown_escape_what_comes_from_the_log() {
        let hostile = "<script>alert(1)</script>";
        let mut d = decision(0, "ai", Some("\"><img src=x onerror=alert(1)>"), 1000);
        d["route"] = json!(hostile);
        d["path"] = json!("/<script>x</script>?u=https://evil.example/x.js");
        let mut reload = event(
            1,
            "config_reload",
            json!({"note": "see https://evil.example/x.js", "route": hostile}),
        );
        reload["actor"] = json!("<b>x</b> | [a](http://evil.example)");
        let mut degraded = event(2, "route_degraded", json!({"route": hostile, "rto_s": 1}));
        degraded["detail"]["breaker_state"] = json!("<svg onload=alert(1)>");
        let r = report_of(&chain(vec![d, reload, degraded]), Window::default());
        assert_eq!(r.routes[0].route, hostile);
        let page = html(&r);
        for bad in [
            "<script",
            "<img",
            "<svg onload",
            "<b>",
            "<a ",
            "<link",
            "<iframe",
            "href",
            "src=\"",
            "url(",
            "@import",
            "xmlns",
        ] {
            assert!(!page.contains(bad), "{bad} in the HTML:\n{page}");
        }
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(page.contains("<svg"), "the charts are inline SVG");
        // A URL appears only as escaped text, never where a browser would fetch it.
        for scheme in ["http://", "https://"] {
            for (i, _) in page.match_indices(scheme) {
                let before = page[..i].chars().last();
                assert!(
                    !matches!(before, Some('"' | '\'' | '=')),
                    "{scheme} at {i} in an attribute: {}",
                    &page[i.saturating_sub(40)..i + 20]
                );
            }
        }
        let md = markdown(&r);
        assert!(
            !md.contains("<script") && !md.contains("<b>") && !md.contains("[a](http"),
            "{md}"
        );
        assert!(md.contains("&lt;script&gt;"));
        assert!(md.contains("\\| \\[a\\]"), "{md}");
        // The JSON keeps the text as it was (escaped only as JSON).
        let j: serde_json::Value = serde_json::from_str(&json(&r).unwrap()).unwrap();
        assert_eq!(j["routes"][0]["route"], hostile);
        assert_eq!(j["report_v"], REPORT_V);
    }

    #[test]
    fn write_puts_three_files_and_fails_on_an_unwritable_dir() {
        let r = report_of(&window_log(), Window::default());
        let dir = tempfile::tempdir().unwrap();
        let w = write(&r, &dir.path().join("out")).unwrap();
        for f in [&w.markdown, &w.html, &w.json] {
            assert!(std::fs::metadata(f).unwrap().len() > 100, "{}", f.display());
        }
        let file = dir.path().join("a-file");
        std::fs::write(&file, "x").unwrap();
        assert!(write(&r, &file.join("out")).is_err());
    }
}
