//! Change capture straight from PostgreSQL logical replication.

pub mod pgoutput;
