//! Moved to `crate::upstream`; kept so paths still resolve during the move.
pub use crate::upstream::*;
