//! The decision log: one tamper-evident JSON Lines record per proxied request (and per
//! change event), tagged with the model version, written off the request path.
//!
//! `record` holds the formats and the hash chain, `writer` the background writer, `verify`
//! the checks behind `breakwater audit verify` / `audit find`, `report` the patch-window evidence report (`audit report`), `collect` the central
//! collection of the copies `publish` sends to RabbitMQ.

pub mod changes;
pub mod checkpoint;
pub mod collect;
pub mod publish;
pub mod record;
pub mod report;
pub mod verify;
pub mod writer;

pub use publish::AuditPublisher;
pub use record::{Decision, Entry};
pub use verify::{find_request, verify_paths};
pub use writer::{start, AuditHandle, AuditSettings, DigestStream, Submission};

/// RFC 3339 UTC with microseconds.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}
