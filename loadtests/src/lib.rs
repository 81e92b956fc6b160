//! breakwater's load-test tools: a fault-injecting mock AI service (also used by the
//! integration tests), an open-loop load driver and the benchmark runner.

pub mod bench;
pub mod ceiling;
pub mod chaos;
pub mod cluster;
pub mod driver;
pub mod instructions;
pub mod mock;
pub mod report;
pub mod scenario;
