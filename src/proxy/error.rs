//! Moved to `crate::exchange::error`; kept so paths still resolve during the move.
pub use crate::exchange::error::*;
