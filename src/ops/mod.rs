//! Operator tools, one file each, all safe to run while the pipeline runs:
//! bootstrap, replay, recalc, verify (and repair), vacuum.

pub mod bootstrap;
pub mod recalc;
pub mod replay;
pub mod snapshot;
pub mod vacuum;
pub mod verify;
