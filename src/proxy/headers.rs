//! Moved to `crate::exchange::headers`; kept so paths still resolve during the move.
pub use crate::exchange::headers::*;
