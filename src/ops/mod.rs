//! Operator tools, one file each, all safe to run while the pipeline runs:
//! bootstrap, replay, recalc, verify (and repair), vacuum, status, and
//! views changed on a live system.

pub mod bootstrap;
pub mod live_views;
pub mod recalc;
pub mod replay;
pub mod snapshot;
pub mod status;
pub mod vacuum;
pub mod verify;
