//! Moving events from capture to apply: in process (`embedded`, for
//! `tally run`) or as JSON lines files (`--input`/`--output`). NATS comes
//! next.

pub mod embedded;
pub mod file;
