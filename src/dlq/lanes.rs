//! Spool-only mode (no broker): the spool is the queue, replayed straight to the AI. Each
//! replayable route drains in its own lane with its own position in the spool, so one
//! route's outage, backoff or poison message never holds back another route. A message
//! the AI refuses for good (a 4xx, or `max_replay_attempts` failures) is parked locally
//! (`parked`), so it holds back nothing behind it either. One more lane takes what no
//! route lane owns: damaged records (counted, skipped) and messages of routes that are no
//! longer replayable (parked). The spool's cursor is the slowest lane's position; segments
//! behind it are deleted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::spool::{Position, SpoolReader, StoredRecord};
use super::{sleep_or_stop, DlqHandle, Envelope, Pacer, ReplayTarget};
use crate::telemetry;

/// The lane of records no route lane owns.
const OTHERS: &str = "";
/// First wait after a failed replay; doubles per attempt up to `BACKOFF_MAX`.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Lane positions, shared by the lanes; the slowest one moves the spool's cursor.
struct Positions {
    lanes: Mutex<HashMap<String, Position>>,
    reader: Mutex<SpoolReader>,
    file: PathBuf,
}

fn lanes_path(dir: &Path) -> PathBuf {
    dir.join("lanes.json")
}

fn load(dir: &Path) -> HashMap<String, Position> {
    std::fs::read(lanes_path(dir))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

impl Positions {
    fn get(&self, lane: &str) -> Position {
        self.lanes
            .lock()
            .map(|l| l.get(lane).copied().unwrap_or((0, 0)))
            .unwrap_or((0, 0))
    }

    /// Best effort, like the cursor: a lost file only replays messages again (same
    /// message id, so the AI sees the same Idempotency-Key).
    fn set(&self, lane: &str, pos: Position) {
        let (min, snapshot) = {
            let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
            lanes.insert(lane.to_string(), pos);
            let min = lanes.values().min().copied().unwrap_or(pos);
            (min, serde_json::to_vec(&*lanes).unwrap_or_default())
        };
        let tmp = self.file.with_extension("tmp");
        if crate::private_fs::write(&tmp, snapshot).is_ok() {
            let _ = std::fs::rename(&tmp, &self.file);
        }
        let mut reader = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = reader.release(min) {
            tracing::warn!(error = %e, "cannot delete a drained DLQ spool segment");
        }
    }
}

pub(super) async fn drain_locally(
    handle: DlqHandle,
    target: Arc<dyn ReplayTarget>,
    shutdown: CancellationToken,
) {
    let state = handle.inner.writer.state.clone();
    let reader = SpoolReader::new(state.clone());
    let cursor = reader.cursor();
    let saved = load(&state.dir);
    let mut names: Vec<String> = handle.inner.settings.routes.clone();
    names.push(OTHERS.to_string());
    // A lane resumes where it was, never behind the cursor; lanes of routes that are gone
    // are dropped (their messages now fall to the `OTHERS` lane).
    let lanes = names
        .iter()
        .map(|n| {
            let pos = saved.get(n).copied().unwrap_or(cursor).max(cursor);
            (n.clone(), pos)
        })
        .collect();
    let positions = Arc::new(Positions {
        lanes: Mutex::new(lanes),
        reader: Mutex::new(reader),
        file: lanes_path(&state.dir),
    });
    let runs = names.iter().map(|n| {
        let lane = Lane {
            handle: &handle,
            target: &target,
            positions: &positions,
            name: n.as_str(),
            shutdown: &shutdown,
        };
        async move { lane.run().await }
    });
    futures_util::future::join_all(runs).await;
}

struct Lane<'a> {
    handle: &'a DlqHandle,
    target: &'a Arc<dyn ReplayTarget>,
    positions: &'a Positions,
    name: &'a str,
    shutdown: &'a CancellationToken,
}

/// What a lane does with one record.
enum Step {
    Skip,
    Replay(Envelope),
    Park(Envelope, String),
}

impl Lane<'_> {
    async fn run(&self) {
        let state = self.handle.inner.writer.state.clone();
        let mut pos = self.positions.get(self.name);
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            let batch = match state.read_after(pos, 1 << 20) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, lane = self.name, "cannot read the DLQ spool");
                    if sleep_or_stop(Duration::from_secs(1), self.shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            if batch.is_empty() {
                if self.name != OTHERS {
                    // Caught up: a replay trigger is satisfied.
                    self.handle
                        .counters(self.name)
                        .triggered
                        .store(false, Ordering::Relaxed);
                }
                tokio::select! {
                    _ = state.appended.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = self.shutdown.cancelled() => return,
                }
                continue;
            }
            for record in batch {
                let step = self.step(&record);
                let done = match step {
                    Step::Skip => true,
                    Step::Replay(env) => self.replay(env).await,
                    Step::Park(env, reason) => self.park(&env, &reason).await,
                };
                if !done {
                    // Shutting down: keep the place for the next run.
                    self.positions.set(self.name, pos);
                    return;
                }
                pos = (record.segment, record.end);
            }
            self.positions.set(self.name, pos);
        }
    }

    fn step(&self, record: &StoredRecord) -> Step {
        let others = self.name == OTHERS;
        let Some(payload) = &record.payload else {
            if others {
                record.report_skipped();
            }
            return Step::Skip;
        };
        let env = match serde_json::from_slice::<Envelope>(payload) {
            Ok(env) => env,
            Err(e) => {
                if others {
                    tracing::error!(error = %e, "unreadable DLQ message skipped");
                }
                return Step::Skip;
            }
        };
        if env.route == self.name {
            return Step::Replay(env);
        }
        if others && !self.handle.knows_route(&env.route) {
            let reason = format!("route {:?} is no longer replayable", env.route);
            return Step::Park(env, reason);
        }
        Step::Skip
    }

    /// Replays until the message is done (replayed or parked). False only on shutdown.
    async fn replay(&self, mut env: Envelope) -> bool {
        let c = self.handle.counters(&env.route);
        let max = self.handle.inner.settings.max_replay_attempts.max(1);
        loop {
            let triggered = c.triggered.load(Ordering::Relaxed);
            if !triggered && (c.paused.load(Ordering::Relaxed) || !self.target.ready(&env.route)) {
                // This route waits; the other lanes go on.
                if sleep_or_stop(Duration::from_millis(250), self.shutdown).await {
                    return false;
                }
                continue;
            }
            self.pace(&env.route).await;
            let kind = if triggered {
                super::ReplayKind::Operator
            } else {
                super::ReplayKind::Scheduled
            };
            let result = self.target.replay(&env, kind).await;
            self.target.recorded(&env, &result);
            if triggered && super::end_operator_run(&result) {
                c.triggered.store(false, Ordering::Relaxed);
            }
            let failure = match result {
                Ok(_) => {
                    c.replayed.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(telemetry::REPLAYS_TOTAL, "route" => env.route.clone(), "result" => "replayed").increment(1);
                    return true;
                }
                Err(f) if !f.attempted => {
                    if sleep_or_stop(Duration::from_millis(250), self.shutdown).await {
                        return false;
                    }
                    continue;
                }
                Err(f) => f,
            };
            c.failed.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(telemetry::REPLAYS_TOTAL, "route" => env.route.clone(), "result" => "failed").increment(1);
            env.attempts += 1;
            if !failure.retryable || env.attempts >= max {
                let reason = format!("{} (after {} attempt(s))", failure.reason, env.attempts);
                return self.park(&env, &reason).await;
            }
            tracing::warn!(msg_id = %env.msg_id, route = %env.route, attempts = env.attempts, reason = %failure.reason, "local replay failed; retrying after a backoff");
            let backoff = BACKOFF_BASE
                .saturating_mul(1 << (env.attempts - 1).min(16))
                .min(BACKOFF_MAX);
            if sleep_or_stop(backoff, self.shutdown).await {
                return false;
            }
        }
    }

    /// Parks durably; a disk error is retried (the message stays first in this lane).
    /// False only on shutdown.
    async fn park(&self, env: &Envelope, reason: &str) -> bool {
        loop {
            match self.handle.inner.parked.park(env, reason) {
                Ok(()) => {
                    self.handle
                        .counters(&env.route)
                        .parked
                        .fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(telemetry::DLQ_MESSAGES, "route" => env.route.clone(), "result" => "parked").increment(1);
                    tracing::error!(route = %env.route, msg_id = %env.msg_id, reason, "DLQ message parked in the local spool");
                    return true;
                }
                Err(e) => {
                    tracing::error!(error = %e, msg_id = %env.msg_id, "cannot park a DLQ message; retrying");
                    if sleep_or_stop(Duration::from_secs(1), self.shutdown).await {
                        return false;
                    }
                }
            }
        }
    }

    /// `replay_rate_per_s` per route.
    async fn pace(&self, route: &str) {
        let inner = &self.handle.inner;
        let wait = {
            let mut pacers = inner.pacers.lock().unwrap_or_else(|p| p.into_inner());
            let pacer = pacers
                .entry(route.to_string())
                .or_insert_with(|| Pacer::new(inner.settings.replay_rate_per_s));
            let now = tokio::time::Instant::now();
            let floor = now.checked_sub(Duration::from_millis(100)).unwrap_or(now);
            pacer.next = pacer.next.max(floor) + pacer.interval;
            pacer.next
        };
        tokio::time::sleep_until(wait).await;
    }
}
