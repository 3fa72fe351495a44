//! Operator tools, one file each, all safe to run while the pipeline runs:
//! bootstrap, replay, recalc, verify (and repair).

pub mod bootstrap;
pub mod recalc;
pub mod replay;
pub mod snapshot;
pub mod verify;
