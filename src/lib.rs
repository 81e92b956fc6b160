//! breakwater: a resilience sidecar between Magento and the AI services it calls.
//!
//! Module map (see README for the request-path diagram):
//! - `breaker`: pure circuit-breaker state machine, retry budget, backoff, adaptive limit.
//! - `audit`: tamper-evident decision log.
//! - `dlq`: local write-ahead spool, RabbitMQ publisher and replay.
//! - `window`: the one bucketed time window the breaker, retry budget and canary share.
#![forbid(unsafe_code)]

pub mod admin;
pub mod amqp;
pub mod app;
pub mod audit;
pub mod breaker;
pub mod canary;
pub mod config;
pub mod dlq;
pub mod events;
pub mod exchange;
pub mod fallback;
pub mod layers;
pub mod proxy;
pub mod server;
pub mod telemetry;
pub mod upstream;
pub(crate) mod window;
