//! The circuit-breaker state machine (SPEC `[routes.breaker]`). Pure: every method takes
//! `now`, nothing sleeps, nothing does I/O.
//!
//! Closed -> Open when `consecutive_failures` happen in a row, or when the sliding window
//! (time buckets over `window`) holds at least `minimum_requests` calls and the failure or
//! slow share reaches its threshold. Open -> HalfOpen after the open period, which doubles
//! (with jitter) on each re-trip up to `open_max`. HalfOpen admits exactly
//! `half_open_probes` calls; all must succeed to close, any failure re-opens.

use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use super::classify::CallOutcome;
use crate::window::{self, Window};

#[derive(Debug, Clone, PartialEq)]
pub struct BreakerSettings {
    /// Trip after this many failures in a row; 0 disables the rule.
    pub consecutive_failures: u32,
    pub failure_rate: Option<f64>,
    pub slow_call: Option<Duration>,
    pub slow_call_rate: Option<f64>,
    pub window: Duration,
    pub minimum_requests: u32,
    pub open: Duration,
    pub open_max: Duration,
    pub half_open_probes: u32,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            consecutive_failures: 5,
            failure_rate: Some(0.5),
            slow_call: None,
            slow_call_rate: None,
            window: Duration::from_secs(10),
            minimum_requests: 20,
            open: Duration::from_secs(5),
            open_max: Duration::from_secs(60),
            half_open_probes: 3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
    ForcedOpen,
    ForcedClosed,
}

impl BreakerState {
    /// SPEC gauge: 0 closed, 1 open, 2 half-open, 3 forced_open, 4 forced_closed.
    pub fn metric_value(self) -> u8 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
            BreakerState::ForcedOpen => 3,
            BreakerState::ForcedClosed => 4,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
            BreakerState::ForcedOpen => "forced_open",
            BreakerState::ForcedClosed => "forced_closed",
        }
    }
}

/// Operator override from the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Auto,
    ForcedOpen,
    ForcedClosed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: BreakerState,
    pub to: BreakerState,
}

/// Permission to make one call. Hand it back with `record` or `release`.
#[derive(Debug)]
#[must_use]
pub struct Permit {
    probe: bool,
    /// Trip generation the permit was issued in: results of calls that started before a
    /// trip must not count toward the next half-open round.
    epoch: u64,
}

impl Permit {
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    /// How long until the breaker will admit a probe.
    pub retry_in: Duration,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BreakerStats {
    pub state: BreakerState,
    pub window_requests: u64,
    pub window_failures: u64,
    pub window_slow: u64,
    pub failure_rate: f64,
    pub consecutive_failures: u32,
    pub open_until_in_ms: Option<u64>,
    pub trips: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    calls: u64,
    failures: u64,
    slow: u64,
}

impl window::Bucket for Bucket {
    fn clear(&mut self) {
        *self = Bucket::default();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auto {
    Closed,
    Open { until: Instant },
    HalfOpen { admitted: u32, succeeded: u32 },
}

#[derive(Debug)]
pub struct CircuitBreaker {
    settings: BreakerSettings,
    mode: Mode,
    auto: Auto,
    window: Window<Bucket>,
    consecutive: u32,
    /// Length of the last open period, for doubling.
    last_open: Duration,
    epoch: u64,
    trips: u64,
}

impl CircuitBreaker {
    pub fn new(settings: BreakerSettings) -> Self {
        CircuitBreaker {
            last_open: settings.open,
            window: Window::new(settings.window, Bucket::default),
            settings,
            mode: Mode::Auto,
            auto: Auto::Closed,
            consecutive: 0,
            epoch: 0,
            trips: 0,
        }
    }

    fn public(&self, auto: Auto) -> BreakerState {
        match self.mode {
            Mode::ForcedOpen => BreakerState::ForcedOpen,
            Mode::ForcedClosed => BreakerState::ForcedClosed,
            Mode::Auto => match auto {
                Auto::Closed => BreakerState::Closed,
                Auto::Open { .. } => BreakerState::Open,
                Auto::HalfOpen { .. } => BreakerState::HalfOpen,
            },
        }
    }

    /// Moves Open -> HalfOpen once the open period has passed.
    fn tick(&mut self, now: Instant) -> Option<Transition> {
        if let Auto::Open { until } = self.auto {
            if now >= until {
                return self.set_auto(
                    Auto::HalfOpen {
                        admitted: 0,
                        succeeded: 0,
                    },
                    now,
                );
            }
        }
        None
    }

    fn set_auto(&mut self, next: Auto, _now: Instant) -> Option<Transition> {
        let from = self.public(self.auto);
        self.auto = next;
        let to = self.public(next);
        (from != to).then_some(Transition { from, to })
    }

    pub fn state(&self, now: Instant) -> BreakerState {
        match self.auto {
            Auto::Open { until } if now >= until => self.public(Auto::HalfOpen {
                admitted: 0,
                succeeded: 0,
            }),
            auto => self.public(auto),
        }
    }

    pub fn try_acquire(&mut self, now: Instant) -> Result<Permit, Rejected> {
        match self.mode {
            Mode::ForcedOpen => {
                return Err(Rejected {
                    retry_in: Duration::ZERO,
                })
            }
            Mode::ForcedClosed => {
                return Ok(Permit {
                    probe: false,
                    epoch: self.epoch,
                })
            }
            Mode::Auto => {}
        }
        self.tick(now);
        match &mut self.auto {
            Auto::Closed => Ok(Permit {
                probe: false,
                epoch: self.epoch,
            }),
            Auto::Open { until } => Err(Rejected {
                retry_in: until.saturating_duration_since(now),
            }),
            Auto::HalfOpen { admitted, .. } => {
                if *admitted < self.settings.half_open_probes {
                    *admitted += 1;
                    Ok(Permit {
                        probe: true,
                        epoch: self.epoch,
                    })
                } else {
                    Err(Rejected {
                        retry_in: Duration::ZERO,
                    })
                }
            }
        }
    }

    /// Reports how a permitted call went. Returns the state change it caused, if any.
    pub fn record(
        &mut self,
        permit: Permit,
        outcome: CallOutcome,
        latency: Duration,
        now: Instant,
    ) -> Option<Transition> {
        let slow = self.settings.slow_call.is_some_and(|s| latency >= s);
        let failed = outcome.is_failure();
        // A call that started before the last trip or reset tells nothing about now.
        if permit.epoch != self.epoch {
            return None;
        }
        self.count(failed, slow, now);
        if self.mode != Mode::Auto {
            return None;
        }
        match self.auto {
            Auto::Closed => {
                if self.should_trip(now) {
                    return self.trip(now, false);
                }
                None
            }
            Auto::HalfOpen {
                admitted,
                succeeded,
            } if permit.probe => {
                if failed || slow {
                    return self.trip(now, true);
                }
                let succeeded = succeeded + 1;
                if succeeded >= self.settings.half_open_probes {
                    self.close(now)
                } else {
                    self.auto = Auto::HalfOpen {
                        admitted,
                        succeeded,
                    };
                    None
                }
            }
            _ => None,
        }
    }

    /// Gives back a permit whose call was abandoned (client went away): a half-open probe
    /// slot is freed so the breaker cannot wedge.
    pub fn release(&mut self, permit: Permit, _now: Instant) {
        if !permit.probe || permit.epoch != self.epoch {
            return;
        }
        if let Auto::HalfOpen {
            admitted,
            succeeded,
        } = &mut self.auto
        {
            *admitted = admitted.saturating_sub(1).max(*succeeded);
        }
    }

    /// An operator asked to try the AI now (`POST /admin/dlq/replay`): an automatic open
    /// period ends early and the breaker goes half-open, so the next calls are its probes
    /// (a failure re-opens it, with the doubled period). A breaker forced open or closed
    /// by an operator is left as it is.
    pub fn end_open_period(&mut self, now: Instant) -> Option<Transition> {
        if self.mode != Mode::Auto || !matches!(self.auto, Auto::Open { .. }) {
            return None;
        }
        self.set_auto(
            Auto::HalfOpen {
                admitted: 0,
                succeeded: 0,
            },
            now,
        )
    }

    pub fn set_mode(&mut self, mode: Mode, now: Instant) -> Option<Transition> {
        let from = self.state(now);
        self.mode = mode;
        if mode == Mode::Auto {
            // Back to automatic: start from a clean closed state.
            self.reset_window();
            self.consecutive = 0;
            self.auto = Auto::Closed;
            self.epoch += 1;
        }
        let to = self.state(now);
        (from != to).then_some(Transition { from, to })
    }

    fn close(&mut self, now: Instant) -> Option<Transition> {
        self.last_open = self.settings.open;
        self.consecutive = 0;
        self.reset_window();
        self.epoch += 1;
        self.set_auto(Auto::Closed, now)
    }

    fn trip(&mut self, now: Instant, from_half_open: bool) -> Option<Transition> {
        let period = if from_half_open {
            let doubled = self.last_open.saturating_mul(2).min(self.settings.open_max);
            jitter(doubled).min(self.settings.open_max)
        } else {
            self.settings.open
        };
        self.last_open = if from_half_open {
            self.last_open.saturating_mul(2).min(self.settings.open_max)
        } else {
            self.settings.open
        };
        self.trips += 1;
        self.epoch += 1;
        self.consecutive = 0;
        self.reset_window();
        self.set_auto(
            Auto::Open {
                until: now + period,
            },
            now,
        )
    }

    fn should_trip(&self, now: Instant) -> bool {
        let s = &self.settings;
        if s.consecutive_failures > 0 && self.consecutive >= s.consecutive_failures {
            return true;
        }
        let (calls, failures, slow) = self.window(now);
        if calls == 0 || calls < s.minimum_requests as u64 {
            return false;
        }
        let share = |n: u64| n as f64 / calls as f64;
        s.failure_rate.is_some_and(|r| share(failures) >= r)
            || (s.slow_call.is_some() && s.slow_call_rate.is_some_and(|r| share(slow) >= r))
    }

    fn count(&mut self, failed: bool, slow: bool, now: Instant) {
        if failed {
            self.consecutive = self.consecutive.saturating_add(1);
        } else {
            self.consecutive = 0;
        }
        let b = self.window.current(now);
        b.calls += 1;
        b.failures += failed as u64;
        b.slow += slow as u64;
    }

    fn window(&self, now: Instant) -> (u64, u64, u64) {
        self.window.live(now).fold((0, 0, 0), |(c, f, s), b| {
            (c + b.calls, f + b.failures, s + b.slow)
        })
    }

    fn reset_window(&mut self) {
        self.window.clear();
    }

    pub fn stats(&self, now: Instant) -> BreakerStats {
        let (calls, failures, slow) = self.window(now);
        BreakerStats {
            state: self.state(now),
            window_requests: calls,
            window_failures: failures,
            window_slow: slow,
            failure_rate: if calls == 0 {
                0.0
            } else {
                failures as f64 / calls as f64
            },
            consecutive_failures: self.consecutive,
            open_until_in_ms: match self.auto {
                Auto::Open { until } if until > now && self.mode == Mode::Auto => {
                    Some(until.duration_since(now).as_millis() as u64)
                }
                _ => None,
            },
            trips: self.trips,
        }
    }
}

/// +-20% so breakers of many sidecars do not probe a recovering service in lockstep.
fn jitter(d: Duration) -> Duration {
    let factor = rand::rng().random_range(0.8..=1.2);
    d.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::classify::FailureKind;

    const FAIL: CallOutcome = CallOutcome::Failure(FailureKind::Upstream5xx);
    const OK: CallOutcome = CallOutcome::Success;
    const FAST: Duration = Duration::from_millis(5);

    fn settings() -> BreakerSettings {
        BreakerSettings {
            consecutive_failures: 3,
            failure_rate: Some(0.5),
            slow_call: Some(Duration::from_millis(100)),
            slow_call_rate: Some(0.8),
            window: Duration::from_secs(10),
            minimum_requests: 10,
            open: Duration::from_secs(5),
            open_max: Duration::from_secs(18),
            half_open_probes: 2,
        }
    }

    fn call(b: &mut CircuitBreaker, outcome: CallOutcome, latency: Duration) -> Option<Transition> {
        let now = Instant::now();
        let p = b.try_acquire(now).expect("admitted");
        b.record(p, outcome, latency, now)
    }

    #[tokio::test(start_paused = true)]
    async fn an_operator_ends_an_open_period_early_but_not_a_forced_open() {
        let mut b = CircuitBreaker::new(settings());
        for _ in 0..3 {
            call(&mut b, FAIL, FAST);
        }
        let now = Instant::now();
        assert_eq!(b.state(now), BreakerState::Open);
        let t = b.end_open_period(now).unwrap();
        assert_eq!((t.from, t.to), (BreakerState::Open, BreakerState::HalfOpen));
        // Its probes decide as usual: a failure re-opens with the doubled period.
        let p = b.try_acquire(now).expect("a probe");
        assert!(p.is_probe());
        b.record(p, FAIL, FAST, now);
        assert_eq!(b.state(now), BreakerState::Open);
        assert!(b.try_acquire(now).unwrap_err().retry_in >= Duration::from_secs(8));
        // Closed, half-open and forced states are not changed.
        b.end_open_period(now);
        assert_eq!(call(&mut b, OK, FAST), None);
        assert_eq!(b.end_open_period(Instant::now()), None);
        b.set_mode(Mode::ForcedOpen, now);
        assert_eq!(b.end_open_period(now), None);
        assert_eq!(b.state(now), BreakerState::ForcedOpen);
        assert!(b.try_acquire(now).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures() {
        let mut b = CircuitBreaker::new(settings());
        assert_eq!(call(&mut b, FAIL, FAST), None);
        assert_eq!(call(&mut b, FAIL, FAST), None);
        let t = call(&mut b, FAIL, FAST).unwrap();
        assert_eq!((t.from, t.to), (BreakerState::Closed, BreakerState::Open));
        let r = b.try_acquire(Instant::now()).unwrap_err();
        assert_eq!(r.retry_in, Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_run_and_4xx_never_trips() {
        let mut b = CircuitBreaker::new(settings());
        // Two failures then a success, repeated: never 3 in a row, but 2/3 failed, so the
        // rate rule trips as soon as the window holds 10 calls.
        let mut calls = 0;
        while b.state(Instant::now()) == BreakerState::Closed && calls < 30 {
            let outcome = if calls % 3 == 2 { OK } else { FAIL };
            call(&mut b, outcome, FAST);
            calls += 1;
            assert!(b.stats(Instant::now()).consecutive_failures < 3);
        }
        assert_eq!(
            b.state(Instant::now()),
            BreakerState::Open,
            "rate rule never tripped"
        );
        assert_eq!(calls, 10);

        let mut b = CircuitBreaker::new(settings());
        for _ in 0..100 {
            assert_eq!(call(&mut b, CallOutcome::ClientError, FAST), None);
        }
        assert_eq!(b.state(Instant::now()), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_rule_needs_minimum_requests_and_old_buckets_expire() {
        let mut s = settings();
        s.consecutive_failures = 0;
        let mut b = CircuitBreaker::new(s);
        for _ in 0..9 {
            call(&mut b, FAIL, FAST);
        }
        assert_eq!(b.state(Instant::now()), BreakerState::Closed);
        // The failures age out of the 10 s window; fresh successes keep it closed.
        tokio::time::advance(Duration::from_secs(11)).await;
        for _ in 0..9 {
            call(&mut b, OK, FAST);
        }
        assert_eq!(call(&mut b, FAIL, FAST), None);
        assert_eq!(b.stats(Instant::now()).window_requests, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_calls_trip() {
        let mut s = settings();
        s.consecutive_failures = 0;
        let mut b = CircuitBreaker::new(s);
        for i in 0..10 {
            let t = call(&mut b, OK, Duration::from_millis(150));
            assert_eq!(t.is_some(), i == 9);
        }
        assert_eq!(b.state(Instant::now()), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_exactly_the_probes_and_closes_when_all_succeed() {
        let mut b = CircuitBreaker::new(settings());
        for _ in 0..3 {
            call(&mut b, FAIL, FAST);
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        let now = Instant::now();
        assert_eq!(b.state(now), BreakerState::HalfOpen);
        let p1 = b.try_acquire(now).unwrap();
        let p2 = b.try_acquire(now).unwrap();
        assert!(p1.is_probe() && p2.is_probe());
        assert!(b.try_acquire(now).is_err(), "a third probe was admitted");
        assert_eq!(b.record(p1, OK, FAST, now), None);
        let t = b.record(p2, OK, FAST, now).unwrap();
        assert_eq!(t.to, BreakerState::Closed);
        assert!(b.try_acquire(now).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probe_reopens_with_a_doubled_capped_period() {
        let mut b = CircuitBreaker::new(settings());
        for _ in 0..3 {
            call(&mut b, FAIL, FAST);
        }
        let mut expected = Duration::from_secs(5);
        for _ in 0..4 {
            tokio::time::advance(expected).await;
            let now = Instant::now();
            let p = b.try_acquire(now).unwrap();
            let t = b.record(p, FAIL, FAST, now).unwrap();
            assert_eq!((t.from, t.to), (BreakerState::HalfOpen, BreakerState::Open));
            expected = (expected * 2).min(Duration::from_secs(18));
            let wait = b.try_acquire(now).unwrap_err().retry_in;
            assert!(
                wait >= expected.mul_f64(0.8) && wait <= Duration::from_secs(18),
                "open for {wait:?}, expected about {expected:?}"
            );
            expected = wait;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn forced_modes_override_and_auto_resumes_closed() {
        let mut b = CircuitBreaker::new(settings());
        let now = Instant::now();
        let t = b.set_mode(Mode::ForcedOpen, now).unwrap();
        assert_eq!(t.to, BreakerState::ForcedOpen);
        assert!(b.try_acquire(now).is_err());
        b.set_mode(Mode::ForcedClosed, now);
        for _ in 0..50 {
            call(&mut b, FAIL, FAST);
        }
        assert_eq!(b.state(Instant::now()), BreakerState::ForcedClosed);
        b.set_mode(Mode::Auto, now);
        assert_eq!(b.state(now), BreakerState::Closed);
        assert_eq!(b.stats(now).window_requests, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_is_released() {
        let mut b = CircuitBreaker::new(settings());
        for _ in 0..3 {
            call(&mut b, FAIL, FAST);
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        let now = Instant::now();
        let p1 = b.try_acquire(now).unwrap();
        let p2 = b.try_acquire(now).unwrap();
        b.release(p1, now);
        let p3 = b.try_acquire(now).expect("the released slot is free again");
        b.record(p2, OK, FAST, now);
        assert_eq!(
            b.record(p3, OK, FAST, now).unwrap().to,
            BreakerState::Closed
        );
    }

    #[tokio::test(start_paused = true)]
    async fn results_from_before_a_trip_do_not_count_in_half_open() {
        let mut b = CircuitBreaker::new(settings());
        let now = Instant::now();
        let stale = b.try_acquire(now).unwrap();
        for _ in 0..3 {
            call(&mut b, FAIL, FAST);
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        let now = Instant::now();
        assert_eq!(b.record(stale, OK, FAST, now), None);
        assert_eq!(b.state(now), BreakerState::HalfOpen);
    }
}
