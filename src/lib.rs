//! Tally keeps SQL-defined aggregates of a PostgreSQL database exactly right
//! in a target database, from change events delivered late, twice and out
//! of order. See `DESIGN.md` for the architecture.

pub mod apply;
pub mod capture;
pub mod catalog;
pub mod config;
pub mod cpu;
pub mod db;
pub mod demo;
pub mod event;
pub mod natsserver;
pub mod ops;
pub mod pgcluster;
pub mod progress;
pub mod serve;
pub mod transport;
pub mod views;
