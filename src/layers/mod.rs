//! One tower `Layer` + `Service` per concern. `proxy::build_stack` decides their order.

pub mod audit_body;
pub mod breaker;
pub mod comply;
pub mod dlq;
pub mod fallback;
pub mod kill;
pub mod limit;
pub mod observe;
pub mod retry;
pub mod shadow;
pub mod timeout;
