//! Views declared in SQL (`CREATE MATERIALIZED VIEW … AS SELECT …`).
