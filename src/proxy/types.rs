//! Moved to `crate::exchange`; kept so paths still resolve during the move.
pub use crate::exchange::*;
