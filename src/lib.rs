//! breakwater: a resilience sidecar between Magento and the AI services it calls.
//!
//! Module map (see README for the request-path diagram):
//! - `breaker`: pure circuit-breaker state machine, retry budget, backoff, adaptive limit.
//! - `audit`: tamper-evident decision log.
//! - `dlq`: local write-ahead spool, RabbitMQ publisher and replay.
//! - `window`: the one bucketed time window the breaker, retry budget and canary share.
//! - `layers::comply`: approved model versions and response schemas, above the AI call.
//! - `rto`: degraded episodes against each route's `rto_s` (off the request path).
#![forbid(unsafe_code)]

pub(crate) mod access_log;
pub(crate) mod admin;
pub(crate) mod amqp;
pub mod app;
pub(crate) mod audit;
pub(crate) mod breaker;
pub(crate) mod canary;
pub mod config;
pub(crate) mod dlq;
pub(crate) mod events;
pub(crate) mod exchange;
pub(crate) mod fallback;
/// Entry points for the `cargo fuzz` targets in `fuzz/`: not a stable API.
#[doc(hidden)]
pub mod fuzzing;
/// `response_schema` on a simd-json tape (public for the cost benchmark in loadtests).
pub mod json_pointer;
pub mod json_tape;
pub(crate) mod layers;
pub(crate) mod otel;
pub(crate) mod private_fs;
pub(crate) mod proxy;
pub(crate) mod rto;
pub(crate) mod server;
pub(crate) mod telemetry;
pub(crate) mod upstream;
pub(crate) mod window;

/// What the CLI (`main.rs`) and the black-box tests use beyond `app` and `config`; the
/// rest is `pub(crate)`, so that the compiler reports dead code.
pub mod cli {
    pub use crate::amqp::Endpoints;
    pub use crate::audit::changes::{changes as audit_changes, table as changes_table};
    pub use crate::audit::checkpoint::{keygen, PublicKey};
    pub use crate::audit::collect::{run as audit_collect, CollectSettings, CollectSummary};
    /// The decision log's `SHA-256(prev_hash || canonical)`, as `audit verify` recomputes it.
    pub use crate::audit::record::chain_hash;
    pub use crate::audit::report::{
        build as audit_report, write as write_report, Window as ReportWindow,
    };
    pub use crate::audit::verify::verify_signed;
    pub use crate::audit::{find_request, verify_paths};
    pub use crate::dlq::envelope::MAX_SPOOLED_BODY;
    pub use crate::dlq::spool::inspect as spool_inspect;
}
