//! Tally's own tables in the target, created and upgraded idempotently.

/// Each entry upgrades the schema by one version; never edit a released one,
/// append a new one.
pub const MIGRATIONS: &[&str] = &[
    // 1: ledger, watermarks, dead letters, view registry.
    "
CREATE TABLE tally.ledger (
    tbl        text    NOT NULL,
    pk         text    NOT NULL,
    commit_lsn bigint  NOT NULL,
    lsn        bigint  NOT NULL,
    deleted    boolean NOT NULL,
    cols       jsonb,
    PRIMARY KEY (tbl, pk)
) WITH (fillfactor = 80);
COMMENT ON TABLE tally.ledger IS 'Per source row: the columns views read, the ordering key (commit_lsn, lsn) of the last applied change, and whether the row is deleted (a tombstone).';
CREATE TABLE tally.watermarks (
    tbl        text   PRIMARY KEY,
    commit_lsn bigint NOT NULL DEFAULT 0,
    lsn        bigint NOT NULL DEFAULT 0
);
COMMENT ON TABLE tally.watermarks IS 'Per source table: the key of its latest TRUNCATE; changes at or below it are stale.';
CREATE TABLE tally.dead_letters (
    id           bigserial   PRIMARY KEY,
    received_at  timestamptz NOT NULL DEFAULT now(),
    source_table text,
    reason       text        NOT NULL,
    payload      text        NOT NULL
);
COMMENT ON TABLE tally.dead_letters IS 'Events that could not be applied, with the raw payload and the reason.';
CREATE TABLE tally.views (
    name         text        PRIMARY KEY,
    source_table text        NOT NULL,
    definition   text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE tally.views IS 'The views Tally maintains, with the definition each table was built for.';
",
    // 2: the vacuum horizon per table; the view registry learns which
    //    ledger columns each table's views were built from.
    "
ALTER TABLE tally.watermarks ADD COLUMN vacuum_lsn bigint NOT NULL DEFAULT 0;
COMMENT ON COLUMN tally.watermarks.vacuum_lsn IS 'Tombstones that committed below this LSN were reclaimed by tally vacuum; a change below it for a row the ledger does not hold is stale.';
CREATE TABLE tally.ledger_columns (
    tbl     text   PRIMARY KEY,
    columns text[] NOT NULL
);
COMMENT ON TABLE tally.ledger_columns IS 'Per source table: the columns the ledger rows hold (those the views read), so that a new view can tell whether it can be built from the ledger.';
",
];

pub const CREATE_SCHEMA: &str = "
CREATE SCHEMA IF NOT EXISTS tally;
CREATE TABLE IF NOT EXISTS tally.schema_version (
    version    integer     PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

/// Serialises schema changes between processes starting at once.
pub const LOCK_SCHEMA: &str = "SELECT pg_advisory_xact_lock(7415327)";
pub const CURRENT_VERSION: &str = "SELECT COALESCE(max(version), 0) FROM tally.schema_version";
pub const RECORD_VERSION: &str = "INSERT INTO tally.schema_version (version) VALUES ($1)";

pub const ENSURE_WATERMARK: &str =
    "INSERT INTO tally.watermarks (tbl) VALUES ($1) ON CONFLICT DO NOTHING";
pub const REGISTERED_VIEW: &str = "SELECT definition FROM tally.views WHERE name = $1";
pub const REGISTER_VIEW: &str = "
INSERT INTO tally.views (name, source_table, definition) VALUES ($1, $2, $3)
ON CONFLICT (name) DO UPDATE SET source_table = EXCLUDED.source_table,
    definition = EXCLUDED.definition, created_at = now()";
pub const TABLE_EXISTS: &str = "SELECT to_regclass($1) IS NOT NULL";

pub const LEDGER_COLUMNS: &str = "SELECT columns FROM tally.ledger_columns WHERE tbl = $1";
pub const RECORD_LEDGER_COLUMNS: &str = "
INSERT INTO tally.ledger_columns (tbl, columns) VALUES ($1, $2)
ON CONFLICT (tbl) DO UPDATE SET columns = EXCLUDED.columns";
pub const REGISTERED_VIEWS: &str = "SELECT name FROM tally.views ORDER BY name";
