//! Moving events from capture to apply. For now: JSON lines files
//! (`tally apply --input`); the embedded and NATS transports come next.

pub mod file;
