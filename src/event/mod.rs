//! The shared event model: one row change as it travels from capture to apply.
//!
//! Everything here is plain data. Parsing of the wire format (Debezium JSON
//! envelopes) lives in [`debezium`]; the ordering rules live in `apply::core`.

pub mod debezium;
mod decimal;
mod temporal;

use std::fmt;

use serde_json::{Map, Value};

pub use debezium::{EventError, parse_event};

/// One source row's column values, by column name, as JSON values.
///
/// Numbers that must stay exact (`numeric`) travel as strings; see
/// `debezium` for the accepted encodings.
pub type Row = Map<String, Value>;

/// Debezium's placeholder for a TOASTed column value that did not change in an
/// update. Apply keeps the value stored in the ledger instead.
pub const UNCHANGED_TOAST: &str = "__debezium_unavailable_value";

/// The position of a change in the source's history: the LSN of its
/// transaction's commit record, then the change's own LSN.
///
/// Writes to one row are serialised by row locks, so this key grows along
/// every row's history (DESIGN.md, "Ordering key"). Field order matters: the
/// derived `Ord` compares `commit_lsn` first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct OrderKey {
    pub commit_lsn: u64,
    pub lsn: u64,
}

impl OrderKey {
    pub const ZERO: OrderKey = OrderKey {
        commit_lsn: 0,
        lsn: 0,
    };

    pub fn new(commit_lsn: u64, lsn: u64) -> Self {
        OrderKey { commit_lsn, lsn }
    }
}

impl fmt::Display for OrderKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "({}, {})",
            format_lsn(self.commit_lsn),
            format_lsn(self.lsn)
        )
    }
}

/// Formats an LSN the way Postgres prints it: `16/B374D848`.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses an LSN written as `X/Y` hex text (Postgres's form).
pub fn parse_lsn_text(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some(((hi as u64) << 32) | lo as u64)
}

/// Debezium's `op` codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `c`: insert.
    Create,
    /// `u`: update (possibly of the primary key: `before` then holds the old key).
    Update,
    /// `d`: delete; only `before` is set (with `REPLICA IDENTITY DEFAULT`, only its key).
    Delete,
    /// `r`: a row read by a snapshot (bootstrap or replay).
    Read,
    /// `t`: the table was truncated.
    Truncate,
}

impl Op {
    pub fn code(self) -> char {
        match self {
            Op::Create => 'c',
            Op::Update => 'u',
            Op::Delete => 'd',
            Op::Read => 'r',
            Op::Truncate => 't',
        }
    }
}

/// A schema-qualified source table name, unquoted (as stored in the catalog).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        TableName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// The table in `public`, Postgres's default schema.
    pub fn public(name: impl Into<String>) -> Self {
        TableName::new("public", name)
    }

    /// `"schema"."name"`, safe to splice into SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// Quotes an SQL identifier the way Postgres's `quote_ident` does, always.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// One parsed change event, before validation against the source schema.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeEvent {
    pub op: Op,
    pub table: TableName,
    pub before: Option<Row>,
    pub after: Option<Row>,
    pub key: OrderKey,
    pub tx_id: Option<i64>,
    pub ts_ms: Option<i64>,
}

/// What one line (message) of input turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    Event(ChangeEvent),
    /// The empty message Debezium sends after a delete (for Kafka log
    /// compaction). It carries nothing and is ignored.
    Tombstone,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_key_compares_commit_lsn_first() {
        assert!(OrderKey::new(10, 1) > OrderKey::new(9, 100));
        assert!(OrderKey::new(10, 2) > OrderKey::new(10, 1));
    }

    #[test]
    fn lsn_text_round_trips() {
        let lsn = parse_lsn_text("16/B374D848").unwrap();
        assert_eq!(lsn, 0x16_B374_D848);
        assert_eq!(format_lsn(lsn), "16/B374D848");
        assert_eq!(parse_lsn_text("nope"), None);
    }

    #[test]
    fn quote_ident_escapes_quotes() {
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
    }
}
