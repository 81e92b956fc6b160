//! Resilience policy, apart from mechanism: the circuit-breaker state machine, outcome
//! classification, retry budget, backoff, adaptive concurrency limit and the answer cache.
//! Plain code with no I/O; time comes in as `now`, so tests drive it with paused time.
//! The tower layers in `crate::layers` wrap these.

mod backoff;
mod budget;
mod cache;
mod classify;
mod limit;
mod machine;

pub use backoff::Backoff;
pub use budget::RetryBudget;
pub use cache::{CachedResponse, ResponseCache};
pub use classify::{classify_status, CallOutcome, FailureKind};
pub use limit::{ConcurrencyLimiter, LimitPermit, LimitSettings};
pub use machine::{BreakerSettings, BreakerState, BreakerStats, CircuitBreaker, Mode, Permit};
