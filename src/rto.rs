//! RTO tracking, off the request path: the once-a-second route gauges (`app.rs`) tell each
//! route's [`Episode`] whether the route is degraded (breaker open or forced open, AI
//! disabled, answers refused as unapproved). An episode runs from the first degraded tick
//! to the first healthy one; crossing `rto_s` inside it is reported exactly once.
//!
//! Plain code that takes `now`, so tests drive it without a clock.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The current degraded episode of one route; carried over reloads with the route.
#[derive(Debug, Default)]
pub struct Episode {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    since: Option<Instant>,
    exceeded: bool,
}

/// What one observation means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Healthy,
    /// The first degraded observation: an episode starts now (written to the chain as
    /// `route_degraded`, so degraded time is provable from the log alone).
    Started,
    /// Degraded for this long, within the RTO (or no RTO set).
    Degraded(Duration),
    /// Degraded for this long and the RTO was just crossed: report it (once per episode).
    Exceeded(Duration),
    /// The episode ended after this long; `exceeded` says whether it crossed the RTO.
    Recovered {
        lasted: Duration,
        exceeded: bool,
    },
}

impl Episode {
    pub fn observe(&self, degraded: bool, rto: Option<Duration>, now: Instant) -> Step {
        let Ok(mut s) = self.state.lock() else {
            return Step::Healthy;
        };
        match (degraded, s.since) {
            (false, None) => Step::Healthy,
            (false, Some(since)) => {
                let step = Step::Recovered {
                    lasted: now.saturating_duration_since(since),
                    exceeded: s.exceeded,
                };
                *s = State::default();
                step
            }
            (true, None) => {
                // rto_s is at least 1 s (validate), so the start never crosses it.
                s.since = Some(now);
                Step::Started
            }
            (true, Some(since)) => {
                let lasted = now.saturating_duration_since(since);
                if !s.exceeded && rto.is_some_and(|rto| lasted >= rto) {
                    s.exceeded = true;
                    Step::Exceeded(lasted)
                } else {
                    Step::Degraded(lasted)
                }
            }
        }
    }

    /// How long the current episode has lasted; `None` while the route is healthy.
    pub fn degraded_for(&self, now: Instant) -> Option<Duration> {
        let s = self.state.lock().ok()?;
        s.since.map(|since| now.saturating_duration_since(since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_crossing_per_episode() {
        let e = Episode::default();
        let rto = Some(Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(e.observe(false, rto, at(0)), Step::Healthy);
        assert_eq!(e.observe(true, rto, at(1)), Step::Started);
        assert_eq!(
            e.observe(true, rto, at(10)),
            Step::Degraded(Duration::from_secs(9))
        );
        assert_eq!(
            e.observe(true, rto, at(11)),
            Step::Exceeded(Duration::from_secs(10))
        );
        assert_eq!(
            e.observe(true, rto, at(30)),
            Step::Degraded(Duration::from_secs(29))
        );
        assert_eq!(e.degraded_for(at(30)), Some(Duration::from_secs(29)));
        assert_eq!(
            e.observe(false, rto, at(31)),
            Step::Recovered {
                lasted: Duration::from_secs(30),
                exceeded: true
            }
        );
        assert_eq!(e.degraded_for(at(31)), None);
        // A second episode crosses again.
        assert_eq!(e.observe(true, rto, at(40)), Step::Started);
        assert_eq!(
            e.observe(true, rto, at(50)),
            Step::Exceeded(Duration::from_secs(10))
        );
        // Without an RTO nothing is ever exceeded.
        let e = Episode::default();
        e.observe(true, None, at(0));
        assert_eq!(
            e.observe(true, None, at(1000)),
            Step::Degraded(Duration::from_secs(1000))
        );
    }

    #[test]
    fn an_episode_says_when_it_starts_once() {
        let e = Episode::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(e.observe(false, None, at(0)), Step::Healthy);
        assert_eq!(e.observe(true, None, at(1)), Step::Started);
        assert_eq!(e.degraded_for(at(1)), Some(Duration::ZERO));
        assert_eq!(
            e.observe(true, None, at(2)),
            Step::Degraded(Duration::from_secs(1))
        );
        assert_eq!(
            e.observe(false, None, at(4)),
            Step::Recovered {
                lasted: Duration::from_secs(3),
                exceeded: false
            }
        );
        assert_eq!(e.observe(true, None, at(5)), Step::Started);
    }
}
