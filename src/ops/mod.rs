//! Operator tools: verify (and later bootstrap, replay, recalc, vacuum,
//! status).

pub mod bootstrap;
pub mod verify;
