//! Decoder for the messages of PostgreSQL's `pgoutput` logical replication
//! plugin, protocol version 1 ("Logical Replication Message Formats" in the
//! PostgreSQL documentation), and the conversion of a decoded row to JSON.
//!
//! [`decode`] takes one message — the payload of one XLogData frame, without
//! the replication framing — and returns it whole or an error naming what was
//! wrong and at which byte offset. Integers are big-endian, strings are
//! NUL-terminated, and a message must be consumed exactly: trailing bytes are
//! an error.
//!
//! The input is untrusted and fuzzed: decoding never panics, and no
//! allocation is sized from a count or length in the input before the input
//! has been checked to hold that much; room reserved up front never exceeds
//! the size of the rest of the input.
//!
//! Text values depend on the walsender session's settings: `DateStyle` must
//! be ISO (the default) for the timestamp handling of [`tuple_to_json`], and
//! `timestamptz` is rendered in the session's `TimeZone`.

use serde_json::{Map, Number, Value};
use thiserror::Error;

/// One decoded `pgoutput` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOutputMessage {
    /// `B`: a transaction starts.
    Begin {
        /// The LSN of the transaction's commit record.
        final_lsn: u64,
        /// Commit time in microseconds since 2000-01-01 00:00 UTC.
        commit_time_us: i64,
        xid: u32,
    },
    /// `C`: the transaction that began with the last `Begin` committed.
    Commit {
        /// Currently always 0.
        flags: u8,
        commit_lsn: u64,
        /// The LSN just past the commit record: where to resume.
        end_lsn: u64,
        /// Microseconds since 2000-01-01 00:00 UTC.
        commit_time_us: i64,
    },
    /// `O`: the transaction was replicated from another node.
    Origin { lsn: u64, name: String },
    /// `R`: the layout of a table, sent before its first change in a
    /// session and again whenever it may have changed.
    Relation(Relation),
    /// `Y`: a non-built-in data type used by a following `Relation`.
    Type {
        oid: u32,
        /// Empty for `pg_catalog`.
        namespace: String,
        name: String,
    },
    /// `I`: a row was inserted.
    Insert { relation_id: u32, new: Tuple },
    /// `U`: a row was updated.
    Update {
        relation_id: u32,
        /// `K`: the old replica identity key, sent when the key changed
        /// (replica identity default or index). Non-key columns are null.
        old_key: Option<Tuple>,
        /// `O`: the whole old row (replica identity full).
        old: Option<Tuple>,
        new: Tuple,
    },
    /// `D`: a row was deleted; exactly one of `old_key` and `old` is set.
    Delete {
        relation_id: u32,
        old_key: Option<Tuple>,
        old: Option<Tuple>,
    },
    /// `T`: tables were truncated.
    Truncate {
        /// Bit 1: `CASCADE`; bit 2: `RESTART IDENTITY`.
        options: u8,
        relation_ids: Vec<u32>,
    },
    /// `M`: a message from `pg_logical_emit_message` (needs the `messages`
    /// option).
    Message {
        transactional: bool,
        lsn: u64,
        prefix: String,
        content: Vec<u8>,
    },
}

/// The layout of a table, from a `Relation` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The table's OID, which changes identify it by.
    pub id: u32,
    /// Schema name; empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
    /// `relreplident`: `d` default (primary key), `n` nothing, `f` full,
    /// `i` index.
    pub replica_identity: u8,
    /// The published columns, in the order of tuple values.
    pub columns: Vec<RelationColumn>,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Bit 1: the column is part of the replica identity key.
    pub flags: u8,
    pub name: String,
    pub type_oid: u32,
    /// `atttypmod`, e.g. precision and scale of a `numeric`; -1 if none.
    pub type_modifier: i32,
}

impl RelationColumn {
    /// Whether the column is part of the replica identity key.
    pub fn is_key(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// A row: one value per column of its [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuple(pub Vec<TupleValue>);

/// One column value of a [`Tuple`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// `n`: SQL NULL.
    Null,
    /// `u`: a TOASTed value that the change did not touch and that was not
    /// sent; its current value is whatever the target already holds.
    UnchangedToast,
    /// `t`: the value in the type's text output format.
    Text(Vec<u8>),
    /// `b`: the value in the type's binary format (only with the `binary`
    /// option, which Tally does not request).
    Binary(Vec<u8>),
}

/// Why a message could not be decoded, or a tuple turned into JSON.
/// Offsets count bytes from the start of the message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("truncated message: {what} at byte {offset} needs {needed} bytes, {remaining} remain")]
    Truncated {
        offset: usize,
        what: &'static str,
        needed: usize,
        remaining: usize,
    },
    #[error("unknown message tag {} at byte {offset}", show_byte(*.tag))]
    UnknownTag { offset: usize, tag: u8 },
    #[error("expected tuple marker {expected} at byte {offset}, found {}", show_byte(*.found))]
    UnexpectedTupleMarker {
        offset: usize,
        found: u8,
        expected: &'static str,
    },
    #[error("unknown tuple value kind {} at byte {offset}", show_byte(*.kind))]
    UnknownValueKind { offset: usize, kind: u8 },
    #[error("{what} starting at byte {offset} has no terminating NUL")]
    UnterminatedString { offset: usize, what: &'static str },
    #[error("{what} has invalid UTF-8 at byte {offset}")]
    InvalidUtf8 { offset: usize, what: &'static str },
    #[error("{what} at byte {offset} is negative ({value})")]
    Negative {
        offset: usize,
        what: &'static str,
        value: i32,
    },
    #[error("{what} at byte {offset} claims {claimed} bytes, only {remaining} remain")]
    LengthExceedsInput {
        offset: usize,
        what: &'static str,
        claimed: usize,
        remaining: usize,
    },
    #[error("{count} unexpected trailing bytes at byte {offset}")]
    TrailingBytes { offset: usize, count: usize },
    #[error("relation {relation} has {columns} columns but the tuple has {values} values")]
    ColumnCountMismatch {
        relation: String,
        columns: usize,
        values: usize,
    },
    #[error("column \"{column}\" has a binary-format value; only text format is supported")]
    BinaryValue { column: String },
    #[error("column \"{column}\" (type OID {type_oid}): {reason}")]
    InvalidValue {
        column: String,
        type_oid: u32,
        reason: String,
    },
}

/// A byte for an error message: the character too when it is printable.
fn show_byte(byte: u8) -> String {
    if byte.is_ascii_graphic() {
        format!("0x{byte:02x} ('{}')", char::from(byte))
    } else {
        format!("0x{byte:02x}")
    }
}

/// Decodes one `pgoutput` (protocol version 1) message.
pub fn decode(message: &[u8]) -> Result<PgOutputMessage, DecodeError> {
    let mut input = Reader::new(message);
    let tag = input.u8("message tag")?;
    let decoded = match tag {
        b'B' => {
            let final_lsn = input.u64("final LSN")?;
            let commit_time_us = input.i64("commit timestamp")?;
            let xid = input.u32("xid")?;
            PgOutputMessage::Begin {
                final_lsn,
                commit_time_us,
                xid,
            }
        }
        b'C' => {
            let flags = input.u8("commit flags")?;
            let commit_lsn = input.u64("commit LSN")?;
            let end_lsn = input.u64("end LSN")?;
            let commit_time_us = input.i64("commit timestamp")?;
            PgOutputMessage::Commit {
                flags,
                commit_lsn,
                end_lsn,
                commit_time_us,
            }
        }
        b'O' => {
            let lsn = input.u64("origin LSN")?;
            let name = input.string("origin name")?;
            PgOutputMessage::Origin { lsn, name }
        }
        b'R' => PgOutputMessage::Relation(relation(&mut input)?),
        b'Y' => {
            let oid = input.u32("type OID")?;
            let namespace = input.string("type namespace")?;
            let name = input.string("type name")?;
            PgOutputMessage::Type {
                oid,
                namespace,
                name,
            }
        }
        b'I' => {
            let relation_id = input.u32("relation id")?;
            input.marker(b'N', "'N'")?;
            let new = tuple(&mut input)?;
            PgOutputMessage::Insert { relation_id, new }
        }
        b'U' => {
            let relation_id = input.u32("relation id")?;
            let at = input.pos;
            let (old_key, old) = match input.u8("tuple marker")? {
                b'K' => (Some(tuple(&mut input)?), None),
                b'O' => (None, Some(tuple(&mut input)?)),
                b'N' => {
                    input.pos = at; // Read as the new tuple's marker below.
                    (None, None)
                }
                found => {
                    return Err(DecodeError::UnexpectedTupleMarker {
                        offset: at,
                        found,
                        expected: "'K', 'O' or 'N'",
                    });
                }
            };
            input.marker(b'N', "'N'")?;
            let new = tuple(&mut input)?;
            PgOutputMessage::Update {
                relation_id,
                old_key,
                old,
                new,
            }
        }
        b'D' => {
            let relation_id = input.u32("relation id")?;
            let at = input.pos;
            let (old_key, old) = match input.u8("tuple marker")? {
                b'K' => (Some(tuple(&mut input)?), None),
                b'O' => (None, Some(tuple(&mut input)?)),
                found => {
                    return Err(DecodeError::UnexpectedTupleMarker {
                        offset: at,
                        found,
                        expected: "'K' or 'O'",
                    });
                }
            };
            PgOutputMessage::Delete {
                relation_id,
                old_key,
                old,
            }
        }
        b'T' => {
            let count = input.count32("relation count")?;
            let options = input.u8("truncate options")?;
            input.ensure_items(count, 4, "relation ids")?;
            let mut relation_ids = Vec::with_capacity(count);
            for _ in 0..count {
                relation_ids.push(input.u32("relation id")?);
            }
            PgOutputMessage::Truncate {
                options,
                relation_ids,
            }
        }
        b'M' => {
            let flags = input.u8("message flags")?;
            let lsn = input.u64("message LSN")?;
            let prefix = input.string("message prefix")?;
            let content = input.length_prefixed("message content")?.to_vec();
            PgOutputMessage::Message {
                transactional: flags & 1 != 0,
                lsn,
                prefix,
                content,
            }
        }
        tag => return Err(DecodeError::UnknownTag { offset: 0, tag }),
    };
    input.finish()?;
    Ok(decoded)
}

/// The body of a `Relation` message, after the tag.
fn relation(input: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let id = input.u32("relation id")?;
    let namespace = input.string("relation namespace")?;
    let name = input.string("relation name")?;
    let replica_identity = input.u8("replica identity")?;
    let count = usize::from(input.u16("column count")?);
    // Flags, an empty name's NUL, type OID and type modifier.
    const MIN_COLUMN_BYTES: usize = 1 + 1 + 4 + 4;
    let mut columns =
        Vec::with_capacity(input.capacity_for::<RelationColumn>(count, MIN_COLUMN_BYTES));
    for _ in 0..count {
        let flags = input.u8("column flags")?;
        let name = input.string("column name")?;
        let type_oid = input.u32("column type OID")?;
        let type_modifier = input.i32("column type modifier")?;
        columns.push(RelationColumn {
            flags,
            name,
            type_oid,
            type_modifier,
        });
    }
    Ok(Relation {
        id,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

/// A TupleData: a column count, then per column a kind byte and, for `t`
/// and `b`, a length-prefixed value.
fn tuple(input: &mut Reader<'_>) -> Result<Tuple, DecodeError> {
    let count = usize::from(input.u16("tuple column count")?);
    // Every value takes at least its kind byte.
    let mut values = Vec::with_capacity(input.capacity_for::<TupleValue>(count, 1));
    for _ in 0..count {
        let at = input.pos;
        let value = match input.u8("tuple value kind")? {
            b'n' => TupleValue::Null,
            b'u' => TupleValue::UnchangedToast,
            b't' => TupleValue::Text(input.length_prefixed("text value")?.to_vec()),
            b'b' => TupleValue::Binary(input.length_prefixed("binary value")?.to_vec()),
            kind => return Err(DecodeError::UnknownValueKind { offset: at, kind }),
        };
        values.push(value);
    }
    Ok(Tuple(values))
}

/// A cursor over a message that turns every shortfall into an error.
struct Reader<'a> {
    buf: &'a [u8],
    /// Never beyond `buf.len()`.
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    fn remaining(&self) -> usize {
        self.rest().len()
    }

    fn take(&mut self, needed: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let rest = self.rest();
        match rest.get(..needed) {
            Some(bytes) => {
                self.pos += needed;
                Ok(bytes)
            }
            None => Err(DecodeError::Truncated {
                offset: self.pos,
                what,
                needed,
                remaining: rest.len(),
            }),
        }
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let mut bytes = [0; N];
        bytes.copy_from_slice(self.take(N, what)?);
        Ok(bytes)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        self.array(what).map(u16::from_be_bytes)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.array(what).map(u32::from_be_bytes)
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.array(what).map(i32::from_be_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.array(what).map(u64::from_be_bytes)
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        self.array(what).map(i64::from_be_bytes)
    }

    /// A signed Int32 count or length, which must not be negative.
    fn count32(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let offset = self.pos;
        let value = self.i32(what)?;
        usize::try_from(value).map_err(|_| DecodeError::Negative {
            offset,
            what,
            value,
        })
    }

    /// Checks that `count` items of at least `item_bytes` each can still
    /// follow, before anything is allocated for them.
    fn ensure_items(
        &self,
        count: usize,
        item_bytes: usize,
        what: &'static str,
    ) -> Result<(), DecodeError> {
        let claimed = count.saturating_mul(item_bytes);
        let remaining = self.remaining();
        if claimed > remaining {
            return Err(DecodeError::LengthExceedsInput {
                offset: self.pos,
                what,
                claimed,
                remaining,
            });
        }
        Ok(())
    }

    /// How many of `count` claimed items of type `T`, each encoded in at
    /// least `min_encoded` bytes, to reserve room for: no more than the rest
    /// of the input can hold, and no more memory than the rest of the input
    /// takes. A vector reserved so grows only with items actually decoded.
    fn capacity_for<T>(&self, count: usize, min_encoded: usize) -> usize {
        let remaining = self.remaining();
        count
            .min(remaining / min_encoded.max(1))
            .min(remaining / std::mem::size_of::<T>().max(1))
    }

    /// An Int32 length followed by that many bytes.
    fn length_prefixed(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let offset = self.pos;
        let claimed = self.count32(what)?;
        let remaining = self.remaining();
        if claimed > remaining {
            return Err(DecodeError::LengthExceedsInput {
                offset,
                what,
                claimed,
                remaining,
            });
        }
        self.take(claimed, what)
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let offset = self.pos;
        let rest = self.rest();
        let Some(len) = rest.iter().position(|&byte| byte == 0) else {
            return Err(DecodeError::UnterminatedString { offset, what });
        };
        let text = std::str::from_utf8(&rest[..len]).map_err(|error| DecodeError::InvalidUtf8 {
            offset: offset + error.valid_up_to(),
            what,
        })?;
        self.pos += len + 1;
        Ok(text.to_owned())
    }

    /// A tuple marker byte that must be `expected`.
    fn marker(&mut self, expected: u8, shown: &'static str) -> Result<(), DecodeError> {
        let offset = self.pos;
        match self.u8("tuple marker")? {
            found if found == expected => Ok(()),
            found => Err(DecodeError::UnexpectedTupleMarker {
                offset,
                found,
                expected: shown,
            }),
        }
    }

    fn finish(self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes {
                offset: self.pos,
                count,
            }),
        }
    }
}

// Built-in type OIDs (pg_type.dat) that get a JSON form other than a string.
const BOOL: u32 = 16;
const INT8: u32 = 20;
const INT2: u32 = 21;
const INT4: u32 = 23;
const OID: u32 = 26;
const JSON: u32 = 114;
const FLOAT4: u32 = 700;
const FLOAT8: u32 = 701;
const TIMESTAMP: u32 = 1114;
const TIMESTAMPTZ: u32 = 1184;
const JSONB: u32 = 3802;

/// Turns a row into a JSON object keyed by column name, as Debezium events
/// carry it. Values must be in text format.
///
/// Integers and OIDs become JSON integers; finite floats JSON numbers and
/// `NaN`/`Infinity`/`-Infinity` strings; `bool` true/false; `json`/`jsonb`
/// the parsed value (the text if it does not parse); `timestamp` and
/// `timestamptz` ISO-8601 text with a `T`; `numeric` and every other type the
/// exact text. NULL is null and an unchanged TOAST value is
/// `unchanged_toast_placeholder`.
///
/// `json`/`jsonb` numbers go through `f64`, so those beyond its precision
/// lose digits.
pub fn tuple_to_json(
    relation: &Relation,
    tuple: &Tuple,
    unchanged_toast_placeholder: &str,
) -> Result<Map<String, Value>, DecodeError> {
    if relation.columns.len() != tuple.0.len() {
        return Err(DecodeError::ColumnCountMismatch {
            relation: format!("{}.{}", relation.namespace, relation.name),
            columns: relation.columns.len(),
            values: tuple.0.len(),
        });
    }
    let mut row = Map::new();
    for (column, value) in relation.columns.iter().zip(&tuple.0) {
        let json = match value {
            TupleValue::Null => Value::Null,
            TupleValue::UnchangedToast => Value::String(unchanged_toast_placeholder.to_owned()),
            TupleValue::Text(bytes) => text_to_json(column, bytes)?,
            TupleValue::Binary(_) => {
                return Err(DecodeError::BinaryValue {
                    column: column.name.clone(),
                });
            }
        };
        row.insert(column.name.clone(), json);
    }
    Ok(row)
}

/// Writes the tuple as a JSON object straight into `out`: the same text
/// `tuple_to_json` would serialise to, without building a map (capture's
/// hot path).
pub fn write_tuple_json(
    relation: &Relation,
    tuple: &Tuple,
    unchanged_toast_placeholder: &str,
    out: &mut Vec<u8>,
) -> Result<(), DecodeError> {
    if relation.columns.len() != tuple.0.len() {
        return Err(DecodeError::ColumnCountMismatch {
            relation: format!("{}.{}", relation.namespace, relation.name),
            columns: relation.columns.len(),
            values: tuple.0.len(),
        });
    }
    // serde_json's Map is sorted by key; keep that order so both agree.
    let mut order: Vec<usize> = (0..relation.columns.len()).collect();
    order.sort_by(|a, b| relation.columns[*a].name.cmp(&relation.columns[*b].name));
    out.push(b'{');
    for (position, index) in order.into_iter().enumerate() {
        let column = &relation.columns[index];
        if position > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, &column.name).expect("writing to a Vec cannot fail");
        out.push(b':');
        match &tuple.0[index] {
            TupleValue::Null => out.extend_from_slice(b"null"),
            TupleValue::UnchangedToast => {
                serde_json::to_writer(&mut *out, unchanged_toast_placeholder)
                    .expect("writing to a Vec cannot fail")
            }
            TupleValue::Text(bytes) => {
                let value = text_to_json(column, bytes)?;
                serde_json::to_writer(&mut *out, &value).expect("writing to a Vec cannot fail");
            }
            TupleValue::Binary(_) => {
                return Err(DecodeError::BinaryValue {
                    column: column.name.clone(),
                });
            }
        }
    }
    out.push(b'}');
    Ok(())
}

/// The JSON form of one text-format value of `column`'s type.
fn text_to_json(column: &RelationColumn, bytes: &[u8]) -> Result<Value, DecodeError> {
    let invalid = |reason: String| DecodeError::InvalidValue {
        column: column.name.clone(),
        type_oid: column.type_oid,
        reason,
    };
    let text = std::str::from_utf8(bytes).map_err(|error| {
        invalid(format!(
            "value has invalid UTF-8 at byte {}",
            error.valid_up_to()
        ))
    })?;
    let integer = |parsed: Option<Value>| {
        parsed.ok_or_else(|| invalid(format!("{} is not a valid integer", excerpt(text))))
    };
    Ok(match column.type_oid {
        INT2 => integer(text.parse::<i16>().ok().map(Value::from))?,
        INT4 => integer(text.parse::<i32>().ok().map(Value::from))?,
        INT8 => integer(text.parse::<i64>().ok().map(Value::from))?,
        OID => integer(text.parse::<u32>().ok().map(Value::from))?,
        FLOAT4 | FLOAT8 => match text.parse::<f64>() {
            // Parsed as f64 even for float4: its shortest text, e.g. "1.1",
            // then reads back as the number that was meant.
            Ok(number) => match Number::from_f64(number) {
                Some(number) => Value::Number(number),
                None => Value::String(text.to_owned()),
            },
            Err(_) => return Err(invalid(format!("{} is not a valid float", excerpt(text)))),
        },
        BOOL => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => return Err(invalid(format!("{} is not a valid bool", excerpt(text)))),
        },
        JSON | JSONB => {
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
        }
        TIMESTAMP | TIMESTAMPTZ => Value::String(iso_timestamp(text)),
        _ => Value::String(text.to_owned()),
    })
}

/// Postgres's ISO date style separates date and time with a space; ISO-8601
/// wants a `T`. Text without a space between digits (`infinity`) is kept.
fn iso_timestamp(text: &str) -> String {
    let bytes = text.as_bytes();
    match bytes.iter().position(|&byte| byte == b' ') {
        Some(space)
            if space > 0
                && bytes[space - 1].is_ascii_digit()
                && bytes.get(space + 1).is_some_and(u8::is_ascii_digit) =>
        {
            format!("{}T{}", &text[..space], &text[space + 1..])
        }
        _ => text.to_owned(),
    }
}

/// A value quoted for an error message, shortened if long.
fn excerpt(text: &str) -> String {
    const MAX_CHARS: usize = 40;
    let mut chars = text.chars();
    let mut shown = format!("{:?}", chars.by_ref().take(MAX_CHARS).collect::<String>());
    if chars.next().is_some() {
        shown.push('…');
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// A test-only encoder, written from the protocol description
    /// independently of the decoder's structure.
    #[derive(Default)]
    struct Enc(Vec<u8>);

    impl Enc {
        fn tag(c: u8) -> Self {
            Enc(vec![c])
        }
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn u16(mut self, v: u16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i64(mut self, v: i64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn str(mut self, s: &str) -> Self {
            self.0.extend_from_slice(s.as_bytes());
            self.0.push(0);
            self
        }
        fn bytes(mut self, b: &[u8]) -> Self {
            self.0.extend_from_slice(b);
            self
        }
        fn tuple(self, t: &Tuple) -> Self {
            let mut e = self.u16(t.0.len() as u16);
            for value in &t.0 {
                e = match value {
                    TupleValue::Null => e.u8(b'n'),
                    TupleValue::UnchangedToast => e.u8(b'u'),
                    TupleValue::Text(b) => e.u8(b't').i32(b.len() as i32).bytes(b),
                    TupleValue::Binary(b) => e.u8(b'b').i32(b.len() as i32).bytes(b),
                };
            }
            e
        }
        fn done(self) -> Vec<u8> {
            self.0
        }
    }

    fn encode(message: &PgOutputMessage) -> Vec<u8> {
        use PgOutputMessage as M;
        match message {
            M::Begin {
                final_lsn,
                commit_time_us,
                xid,
            } => Enc::tag(b'B')
                .u64(*final_lsn)
                .i64(*commit_time_us)
                .u32(*xid),
            M::Commit {
                flags,
                commit_lsn,
                end_lsn,
                commit_time_us,
            } => Enc::tag(b'C')
                .u8(*flags)
                .u64(*commit_lsn)
                .u64(*end_lsn)
                .i64(*commit_time_us),
            M::Origin { lsn, name } => Enc::tag(b'O').u64(*lsn).str(name),
            M::Relation(r) => {
                let mut e = Enc::tag(b'R')
                    .u32(r.id)
                    .str(&r.namespace)
                    .str(&r.name)
                    .u8(r.replica_identity)
                    .u16(r.columns.len() as u16);
                for c in &r.columns {
                    e = e
                        .u8(c.flags)
                        .str(&c.name)
                        .u32(c.type_oid)
                        .i32(c.type_modifier);
                }
                e
            }
            M::Type {
                oid,
                namespace,
                name,
            } => Enc::tag(b'Y').u32(*oid).str(namespace).str(name),
            M::Insert { relation_id, new } => Enc::tag(b'I').u32(*relation_id).u8(b'N').tuple(new),
            M::Update {
                relation_id,
                old_key,
                old,
                new,
            } => {
                let mut e = Enc::tag(b'U').u32(*relation_id);
                if let Some(k) = old_key {
                    e = e.u8(b'K').tuple(k);
                }
                if let Some(o) = old {
                    e = e.u8(b'O').tuple(o);
                }
                e.u8(b'N').tuple(new)
            }
            M::Delete {
                relation_id,
                old_key,
                old,
            } => {
                let mut e = Enc::tag(b'D').u32(*relation_id);
                if let Some(k) = old_key {
                    e = e.u8(b'K').tuple(k);
                }
                if let Some(o) = old {
                    e = e.u8(b'O').tuple(o);
                }
                e
            }
            M::Truncate {
                options,
                relation_ids,
            } => {
                let mut e = Enc::tag(b'T').i32(relation_ids.len() as i32).u8(*options);
                for id in relation_ids {
                    e = e.u32(*id);
                }
                e
            }
            M::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => Enc::tag(b'M')
                .u8(u8::from(*transactional))
                .u64(*lsn)
                .str(prefix)
                .i32(content.len() as i32)
                .bytes(content),
        }
        .done()
    }

    fn text(s: &str) -> TupleValue {
        TupleValue::Text(s.as_bytes().to_vec())
    }

    fn roundtrip(message: PgOutputMessage) {
        let bytes = encode(&message);
        assert_eq!(decode(&bytes), Ok(message.clone()), "bytes {bytes:?}");
        // Every proper prefix is an error, never a shorter message.
        for len in 0..bytes.len() {
            assert!(
                decode(&bytes[..len]).is_err(),
                "prefix of {len} bytes of {message:?}"
            );
        }
        // Trailing garbage is refused.
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            decode(&longer),
            Err(DecodeError::TrailingBytes {
                offset: bytes.len(),
                count: 1
            })
        );
    }

    #[test]
    fn begin_from_literal_bytes() {
        let bytes = [
            b'B', //
            0, 0, 0, 1, 0, 0, 0, 0x10, // final LSN 1/10
            0, 0, 0, 0, 0, 0, 0x01, 0x00, // commit time 256 µs
            0, 0, 0x02, 0x9a, // xid 666
        ];
        assert_eq!(
            decode(&bytes),
            Ok(PgOutputMessage::Begin {
                final_lsn: 0x1_0000_0010,
                commit_time_us: 256,
                xid: 666
            })
        );
    }

    #[test]
    fn begin_negative_time_roundtrips() {
        roundtrip(PgOutputMessage::Begin {
            final_lsn: u64::MAX,
            commit_time_us: -1,
            xid: u32::MAX,
        });
    }

    #[test]
    fn commit_from_literal_bytes() {
        let bytes = [
            b'C', 0, //
            0, 0, 0, 0, 0, 0, 0, 0x20, // commit LSN
            0, 0, 0, 0, 0, 0, 0, 0x48, // end LSN
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe, // -2 µs
        ];
        assert_eq!(
            decode(&bytes),
            Ok(PgOutputMessage::Commit {
                flags: 0,
                commit_lsn: 0x20,
                end_lsn: 0x48,
                commit_time_us: -2
            })
        );
    }

    #[test]
    fn origin() {
        roundtrip(PgOutputMessage::Origin {
            lsn: 0xabc,
            name: "node_a".into(),
        });
        roundtrip(PgOutputMessage::Origin {
            lsn: 0,
            name: String::new(),
        });
    }

    #[test]
    fn relation_from_literal_bytes() {
        let mut bytes = vec![b'R', 0, 0, 0x40, 0x01];
        bytes.extend_from_slice(b"public\0orders\0");
        bytes.extend_from_slice(&[b'd', 0, 2]);
        bytes.extend_from_slice(&[1]);
        bytes.extend_from_slice(b"id\0");
        bytes.extend_from_slice(&[0, 0, 0, 20, 0xff, 0xff, 0xff, 0xff]);
        bytes.extend_from_slice(&[0]);
        bytes.extend_from_slice(b"amount\0");
        bytes.extend_from_slice(&[0, 0, 0x06, 0xa4, 0, 0x0c, 0, 0x06]);
        let expected = Relation {
            id: 16385,
            namespace: "public".into(),
            name: "orders".into(),
            replica_identity: b'd',
            columns: vec![
                RelationColumn {
                    flags: 1,
                    name: "id".into(),
                    type_oid: 20,
                    type_modifier: -1,
                },
                RelationColumn {
                    flags: 0,
                    name: "amount".into(),
                    type_oid: 1700,
                    type_modifier: 0x000c_0006,
                },
            ],
        };
        assert!(expected.columns[0].is_key());
        assert!(!expected.columns[1].is_key());
        assert_eq!(
            decode(&bytes),
            Ok(PgOutputMessage::Relation(expected.clone()))
        );
        roundtrip(PgOutputMessage::Relation(expected));
    }

    #[test]
    fn relation_without_columns_in_pg_catalog() {
        roundtrip(PgOutputMessage::Relation(Relation {
            id: 1,
            namespace: String::new(),
            name: "empty".into(),
            replica_identity: b'n',
            columns: vec![],
        }));
    }

    #[test]
    fn type_message() {
        let bytes = Enc::tag(b'Y').u32(90001).str("public").str("mood").done();
        assert_eq!(
            decode(&bytes),
            Ok(PgOutputMessage::Type {
                oid: 90001,
                namespace: "public".into(),
                name: "mood".into()
            })
        );
    }

    #[test]
    fn insert_from_literal_bytes_with_null_toast_and_text() {
        let bytes = [
            b'I', 0, 0, 0x40, 0, b'N', 0, 4,    //
            b'n', //
            b'u', //
            b't', 0, 0, 0, 2, b'4', b'2', //
            b't', 0, 0, 0, 0, // empty text
        ];
        assert_eq!(
            decode(&bytes),
            Ok(PgOutputMessage::Insert {
                relation_id: 16384,
                new: Tuple(vec![
                    TupleValue::Null,
                    TupleValue::UnchangedToast,
                    text("42"),
                    text(""),
                ])
            })
        );
    }

    #[test]
    fn insert_with_binary_value() {
        roundtrip(PgOutputMessage::Insert {
            relation_id: 7,
            new: Tuple(vec![TupleValue::Binary(vec![0, 0, 0, 42]), text("x")]),
        });
    }

    #[test]
    fn update_with_old_key() {
        let bytes = Enc::tag(b'U')
            .u32(5)
            .u8(b'K')
            .u16(2)
            .u8(b't')
            .i32(1)
            .bytes(b"1")
            .u8(b'n')
            .u8(b'N')
            .u16(2)
            .u8(b't')
            .i32(1)
            .bytes(b"2")
            .u8(b'u')
            .done();
        assert_eq!(
            decode(&bytes),
            Ok(PgOutputMessage::Update {
                relation_id: 5,
                old_key: Some(Tuple(vec![text("1"), TupleValue::Null])),
                old: None,
                new: Tuple(vec![text("2"), TupleValue::UnchangedToast]),
            })
        );
    }

    #[test]
    fn update_with_old_tuple() {
        let message = PgOutputMessage::Update {
            relation_id: 5,
            old_key: None,
            old: Some(Tuple(vec![text("1"), text("old")])),
            new: Tuple(vec![text("1"), text("new")]),
        };
        assert_eq!(encode(&message)[5], b'O');
        roundtrip(message);
    }

    #[test]
    fn update_without_old() {
        let message = PgOutputMessage::Update {
            relation_id: 5,
            old_key: None,
            old: None,
            new: Tuple(vec![text("1"), TupleValue::Null]),
        };
        assert_eq!(encode(&message)[5], b'N');
        roundtrip(message);
    }

    #[test]
    fn update_with_two_old_tuples_is_an_error() {
        let bytes = Enc::tag(b'U')
            .u32(5)
            .u8(b'K')
            .u16(0)
            .u8(b'O')
            .u16(0)
            .u8(b'N')
            .u16(0)
            .done();
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::UnexpectedTupleMarker {
                offset: 8,
                found: b'O',
                expected: "'N'"
            })
        );
    }

    #[test]
    fn delete_with_old_key_and_with_old_tuple() {
        let bytes = Enc::tag(b'D')
            .u32(9)
            .u8(b'K')
            .u16(1)
            .u8(b't')
            .i32(3)
            .bytes(b"123")
            .done();
        assert_eq!(
            decode(&bytes),
            Ok(PgOutputMessage::Delete {
                relation_id: 9,
                old_key: Some(Tuple(vec![text("123")])),
                old: None
            })
        );
        roundtrip(PgOutputMessage::Delete {
            relation_id: 9,
            old_key: None,
            old: Some(Tuple(vec![text("123"), TupleValue::Null, text("x")])),
        });
    }

    #[test]
    fn delete_needs_an_old_tuple() {
        let bytes = Enc::tag(b'D').u32(9).u8(b'N').u16(0).done();
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::UnexpectedTupleMarker {
                offset: 5,
                found: b'N',
                expected: "'K' or 'O'"
            })
        );
    }

    #[test]
    fn truncate_several_relations() {
        let bytes = Enc::tag(b'T')
            .i32(3)
            .u8(3)
            .u32(16384)
            .u32(16390)
            .u32(u32::MAX)
            .done();
        assert_eq!(
            decode(&bytes),
            Ok(PgOutputMessage::Truncate {
                options: 3,
                relation_ids: vec![16384, 16390, u32::MAX]
            })
        );
        roundtrip(PgOutputMessage::Truncate {
            options: 1,
            relation_ids: vec![1, 2],
        });
        roundtrip(PgOutputMessage::Truncate {
            options: 0,
            relation_ids: vec![],
        });
    }

    #[test]
    fn logical_message() {
        let bytes = Enc::tag(b'M')
            .u8(1)
            .u64(0x99)
            .str("tally")
            .i32(3)
            .bytes(&[0, 0xff, 7])
            .done();
        assert_eq!(
            decode(&bytes),
            Ok(PgOutputMessage::Message {
                transactional: true,
                lsn: 0x99,
                prefix: "tally".into(),
                content: vec![0, 0xff, 7]
            })
        );
        roundtrip(PgOutputMessage::Message {
            transactional: false,
            lsn: 1,
            prefix: String::new(),
            content: vec![],
        });
    }

    #[test]
    fn errors_name_what_and_where() {
        assert_eq!(
            decode(&[]),
            Err(DecodeError::Truncated {
                offset: 0,
                what: "message tag",
                needed: 1,
                remaining: 0
            })
        );
        assert_eq!(
            decode(b"Z"),
            Err(DecodeError::UnknownTag {
                offset: 0,
                tag: b'Z'
            })
        );
        assert_eq!(
            decode(&[b'B', 0, 0, 0]),
            Err(DecodeError::Truncated {
                offset: 1,
                what: "final LSN",
                needed: 8,
                remaining: 3
            })
        );
        let unknown_kind = Enc::tag(b'I')
            .u32(1)
            .u8(b'N')
            .u16(2)
            .u8(b'n')
            .u8(b'x')
            .done();
        assert_eq!(
            decode(&unknown_kind),
            Err(DecodeError::UnknownValueKind {
                offset: 9,
                kind: b'x'
            })
        );
        let bad_utf8 = Enc::tag(b'O').u64(1).bytes(b"ab\xff\0").done();
        assert_eq!(
            decode(&bad_utf8),
            Err(DecodeError::InvalidUtf8 {
                offset: 11,
                what: "origin name"
            })
        );
        let unterminated = Enc::tag(b'O').u64(1).bytes(b"abc").done();
        assert_eq!(
            decode(&unterminated),
            Err(DecodeError::UnterminatedString {
                offset: 9,
                what: "origin name"
            })
        );
        let negative = Enc::tag(b'I')
            .u32(1)
            .u8(b'N')
            .u16(1)
            .u8(b't')
            .i32(-1)
            .done();
        assert_eq!(
            decode(&negative),
            Err(DecodeError::Negative {
                offset: 9,
                what: "text value",
                value: -1
            })
        );
        let error = decode(b"Z").unwrap_err().to_string();
        assert_eq!(error, "unknown message tag 0x5a ('Z') at byte 0");
        // Streaming and two-phase messages are not protocol version 1.
        assert!(matches!(
            decode(b"S\0\0\0\x01\x01"),
            Err(DecodeError::UnknownTag { tag: b'S', .. })
        ));
    }

    #[test]
    fn huge_lengths_are_refused_before_allocating() {
        let text = Enc::tag(b'I')
            .u32(1)
            .u8(b'N')
            .u16(1)
            .u8(b't')
            .i32(i32::MAX)
            .bytes(b"abc")
            .done();
        assert_eq!(
            decode(&text),
            Err(DecodeError::LengthExceedsInput {
                offset: 9,
                what: "text value",
                claimed: i32::MAX as usize,
                remaining: 3
            })
        );
        let content = Enc::tag(b'M').u8(0).u64(0).str("p").i32(1 << 30).done();
        assert!(matches!(
            decode(&content),
            Err(DecodeError::LengthExceedsInput {
                what: "message content",
                ..
            })
        ));
        let truncate = Enc::tag(b'T').i32(i32::MAX).u8(0).u32(1).done();
        assert_eq!(
            decode(&truncate),
            Err(DecodeError::LengthExceedsInput {
                offset: 6,
                what: "relation ids",
                claimed: i32::MAX as usize * 4,
                remaining: 4
            })
        );
        let truncate = Enc::tag(b'T').i32(-5).u8(0).done();
        assert!(matches!(
            decode(&truncate),
            Err(DecodeError::Negative {
                offset: 1,
                value: -5,
                ..
            })
        ));
        let columns = Enc::tag(b'I').u32(1).u8(b'N').u16(u16::MAX).u8(b'n').done();
        assert!(matches!(
            decode(&columns),
            Err(DecodeError::Truncated {
                offset: 9,
                what: "tuple value kind",
                ..
            })
        ));
        let relation = Enc::tag(b'R')
            .u32(1)
            .str("s")
            .str("t")
            .u8(b'd')
            .u16(u16::MAX)
            .done();
        assert!(matches!(
            decode(&relation),
            Err(DecodeError::Truncated { .. })
        ));
    }

    fn column(name: &str, type_oid: u32) -> RelationColumn {
        RelationColumn {
            flags: 0,
            name: name.into(),
            type_oid,
            type_modifier: -1,
        }
    }

    fn relation_of(columns: Vec<RelationColumn>) -> Relation {
        Relation {
            id: 1,
            namespace: "public".into(),
            name: "t".into(),
            replica_identity: b'd',
            columns,
        }
    }

    /// The JSON of a single value of type `type_oid` given as text.
    fn one(type_oid: u32, value: &str) -> Result<Value, DecodeError> {
        let relation = relation_of(vec![column("c", type_oid)]);
        let row = tuple_to_json(&relation, &Tuple(vec![text(value)]), "__toast")?;
        Ok(row["c"].clone())
    }

    #[test]
    fn json_integers() {
        assert_eq!(one(21, "-32768"), Ok(json!(-32768)));
        assert_eq!(one(23, "2147483647"), Ok(json!(2147483647)));
        assert_eq!(one(20, "-9223372036854775808"), Ok(json!(i64::MIN)));
        assert_eq!(one(20, "9223372036854775807"), Ok(json!(i64::MAX)));
        assert_eq!(one(26, "4294967295"), Ok(json!(4294967295u32)));
        assert!(matches!(
            one(21, "40000"),
            Err(DecodeError::InvalidValue { type_oid: 21, .. })
        ));
        assert!(one(23, "1.5").is_err());
        assert!(one(20, "").is_err());
        assert!(one(26, "-1").is_err());
    }

    #[test]
    fn json_floats() {
        assert_eq!(one(701, "1.5"), Ok(json!(1.5)));
        assert_eq!(one(701, "-1e+100"), Ok(json!(-1e100)));
        assert_eq!(one(701, "NaN"), Ok(json!("NaN")));
        assert_eq!(one(701, "Infinity"), Ok(json!("Infinity")));
        assert_eq!(one(701, "-Infinity"), Ok(json!("-Infinity")));
        // float4 text is its shortest form; read as f64 it stays 1.1.
        assert_eq!(one(700, "1.1"), Ok(json!(1.1)));
        assert_eq!(one(700, "NaN"), Ok(json!("NaN")));
        assert_eq!(one(700, "-Infinity"), Ok(json!("-Infinity")));
        assert!(one(701, "abc").is_err());
    }

    #[test]
    fn json_numeric_is_exact_text() {
        assert_eq!(one(1700, "20.50"), Ok(json!("20.50")));
        assert_eq!(
            one(1700, "123456789012345678901234567890.123456789"),
            Ok(json!("123456789012345678901234567890.123456789"))
        );
        assert_eq!(one(1700, "NaN"), Ok(json!("NaN")));
        assert_eq!(one(1700, "-0.000"), Ok(json!("-0.000")));
    }

    #[test]
    fn json_bool() {
        assert_eq!(one(16, "t"), Ok(json!(true)));
        assert_eq!(one(16, "f"), Ok(json!(false)));
        assert!(one(16, "true").is_err());
    }

    #[test]
    fn json_json_and_jsonb() {
        assert_eq!(
            one(114, r#"{"a": [1, "x", null]}"#),
            Ok(json!({"a": [1, "x", null]}))
        );
        assert_eq!(one(3802, r#"{"b": true}"#), Ok(json!({"b": true})));
        assert_eq!(one(3802, "42"), Ok(json!(42)));
        assert_eq!(one(114, "{not json"), Ok(json!("{not json")));
        let deep = "[".repeat(10_000);
        assert_eq!(one(3802, &deep), Ok(Value::String(deep.clone())));
    }

    #[test]
    fn json_strings() {
        for (oid, value) in [
            (25, "héllo"),
            (1043, "varchar"),
            (1042, "pad  "),
            (19, "name"),
            (2950, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            (1082, "2026-11-25"),
            (1083, "10:00:00"),
            (1186, "1 day 02:00:00"),
            (90001, "happy"),
            (25, ""),
        ] {
            assert_eq!(one(oid, value), Ok(json!(value)), "type {oid}");
        }
    }

    #[test]
    fn json_timestamps_are_iso_8601() {
        assert_eq!(
            one(1184, "2026-11-25 10:00:00+00"),
            Ok(json!("2026-11-25T10:00:00+00"))
        );
        assert_eq!(
            one(1184, "2026-11-25 10:00:00.123456+05:30"),
            Ok(json!("2026-11-25T10:00:00.123456+05:30"))
        );
        assert_eq!(
            one(1114, "2026-11-25 10:00:00"),
            Ok(json!("2026-11-25T10:00:00"))
        );
        assert_eq!(
            one(1114, "0044-03-15 12:00:00 BC"),
            Ok(json!("0044-03-15T12:00:00 BC"))
        );
        assert_eq!(one(1184, "infinity"), Ok(json!("infinity")));
        assert_eq!(one(1114, "-infinity"), Ok(json!("-infinity")));
        // Only timestamps are rewritten.
        assert_eq!(
            one(25, "2026-11-25 10:00:00"),
            Ok(json!("2026-11-25 10:00:00"))
        );
    }

    #[test]
    fn json_row_with_null_and_toast() {
        let relation = relation_of(vec![
            column("id", 20),
            column("note", 25),
            column("doc", 3802),
            column("amount", 1700),
        ]);
        let tuple = Tuple(vec![
            text("7"),
            TupleValue::Null,
            TupleValue::UnchangedToast,
            text("20.50"),
        ]);
        let row = tuple_to_json(&relation, &tuple, "__debezium_unavailable_value").unwrap();
        assert_eq!(
            Value::Object(row),
            json!({
                "id": 7,
                "note": null,
                "doc": "__debezium_unavailable_value",
                "amount": "20.50",
            })
        );
    }

    #[test]
    fn json_errors() {
        let relation = relation_of(vec![column("id", 20), column("name", 25)]);
        assert_eq!(
            tuple_to_json(&relation, &Tuple(vec![text("1")]), "x"),
            Err(DecodeError::ColumnCountMismatch {
                relation: "public.t".into(),
                columns: 2,
                values: 1
            })
        );
        assert_eq!(
            tuple_to_json(
                &relation,
                &Tuple(vec![text("1"), TupleValue::Binary(vec![1])]),
                "x"
            ),
            Err(DecodeError::BinaryValue {
                column: "name".into()
            })
        );
        let bad = tuple_to_json(
            &relation,
            &Tuple(vec![text("1"), TupleValue::Text(vec![b'a', 0xff])]),
            "x",
        );
        assert!(matches!(bad, Err(DecodeError::InvalidValue { .. })));
        let long = "9".repeat(100);
        let message = one(20, &long).unwrap_err().to_string();
        assert!(message.contains("is not a valid integer"), "{message}");
        assert!(message.len() < 120, "{message}");
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-zA-Z_ é\u{1F600}]{0,10}"
    }

    fn tuple_strategy() -> impl Strategy<Value = Tuple> {
        let value = prop_oneof![
            Just(TupleValue::Null),
            Just(TupleValue::UnchangedToast),
            proptest::collection::vec(any::<u8>(), 0..12).prop_map(TupleValue::Text),
            proptest::collection::vec(any::<u8>(), 0..12).prop_map(TupleValue::Binary),
        ];
        proptest::collection::vec(value, 0..6).prop_map(Tuple)
    }

    fn message_strategy() -> impl Strategy<Value = PgOutputMessage> {
        use PgOutputMessage as M;
        let column = (any::<u8>(), name(), any::<u32>(), any::<i32>()).prop_map(
            |(flags, name, type_oid, type_modifier)| RelationColumn {
                flags,
                name,
                type_oid,
                type_modifier,
            },
        );
        let relation = (
            any::<u32>(),
            name(),
            name(),
            any::<u8>(),
            proptest::collection::vec(column, 0..5),
        )
            .prop_map(|(id, namespace, name, replica_identity, columns)| {
                M::Relation(Relation {
                    id,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                })
            });
        let old = prop_oneof![
            Just((None, None)),
            tuple_strategy().prop_map(|t| (Some(t), None)),
            tuple_strategy().prop_map(|t| (None, Some(t))),
        ];
        let old_for_delete = prop_oneof![
            tuple_strategy().prop_map(|t| (Some(t), None)),
            tuple_strategy().prop_map(|t| (None, Some(t))),
        ];
        prop_oneof![
            (any::<u64>(), any::<i64>(), any::<u32>()).prop_map(
                |(final_lsn, commit_time_us, xid)| {
                    M::Begin {
                        final_lsn,
                        commit_time_us,
                        xid,
                    }
                }
            ),
            (any::<u8>(), any::<u64>(), any::<u64>(), any::<i64>()).prop_map(
                |(flags, commit_lsn, end_lsn, commit_time_us)| M::Commit {
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time_us,
                }
            ),
            (any::<u64>(), name()).prop_map(|(lsn, name)| M::Origin { lsn, name }),
            relation,
            (any::<u32>(), name(), name()).prop_map(|(oid, namespace, name)| M::Type {
                oid,
                namespace,
                name,
            }),
            (any::<u32>(), tuple_strategy())
                .prop_map(|(relation_id, new)| M::Insert { relation_id, new }),
            (any::<u32>(), old, tuple_strategy()).prop_map(|(relation_id, (old_key, old), new)| {
                M::Update {
                    relation_id,
                    old_key,
                    old,
                    new,
                }
            }),
            (any::<u32>(), old_for_delete).prop_map(|(relation_id, (old_key, old))| {
                M::Delete {
                    relation_id,
                    old_key,
                    old,
                }
            }),
            (any::<u8>(), proptest::collection::vec(any::<u32>(), 0..6)).prop_map(
                |(options, relation_ids)| M::Truncate {
                    options,
                    relation_ids,
                }
            ),
            (
                any::<bool>(),
                any::<u64>(),
                name(),
                proptest::collection::vec(any::<u8>(), 0..16)
            )
                .prop_map(|(transactional, lsn, prefix, content)| M::Message {
                    transactional,
                    lsn,
                    prefix,
                    content,
                }),
        ]
    }

    /// One way to damage a valid message.
    #[derive(Debug, Clone)]
    enum Mutation {
        Set(usize, u8),
        Flip(usize, u8),
        Insert(usize, u8),
        Remove(usize),
        Truncate(usize),
    }

    fn mutation_strategy() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
            (any::<usize>(), 0u8..8).prop_map(|(i, bit)| Mutation::Flip(i, bit)),
            (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
            any::<usize>().prop_map(Mutation::Remove),
            any::<usize>().prop_map(Mutation::Truncate),
        ]
    }

    fn mutate(bytes: &mut Vec<u8>, mutation: &Mutation) {
        let len = bytes.len();
        match *mutation {
            Mutation::Set(i, b) if len > 0 => bytes[i % len] = b,
            Mutation::Flip(i, bit) if len > 0 => bytes[i % len] ^= 1 << bit,
            Mutation::Insert(i, b) => bytes.insert(i % (len + 1), b),
            Mutation::Remove(i) if len > 0 => {
                bytes.remove(i % len);
            }
            Mutation::Truncate(i) => bytes.truncate(i % (len + 1)),
            _ => {}
        }
    }

    /// Decodes what a real PostgreSQL server's pgoutput produces, through
    /// the SQL interface to a logical slot, and checks each kind of message.
    #[tokio::test]
    async fn decodes_real_pgoutput() {
        use crate::db::connect;
        use crate::pgcluster::PgCluster;
        use PgOutputMessage as M;

        let cluster = tokio::task::spawn_blocking(PgCluster::start)
            .await
            .unwrap()
            .expect("start a cluster");
        let url = cluster.url("postgres");
        let client = connect(&url).await.unwrap();
        // One statement per call: a multi-statement query would be one
        // transaction.
        for statement in [
            "SET TIME ZONE 'UTC'",
            "CREATE TYPE mood AS ENUM ('happy', 'sad')",
            "CREATE TABLE t (id int8 PRIMARY KEY, small int2, i int4, o oid, \
             f4 float4, f8 float8, n numeric, b bool, j json, jb jsonb, tx text, \
             vc varchar(10), bp char(3), nm name, u uuid, d date, tm time, \
             ts timestamp, tstz timestamptz, iv interval, m mood, big text)",
            "ALTER TABLE t ALTER big SET STORAGE EXTERNAL",
            "CREATE TABLE t2 (id int4 PRIMARY KEY, note text)",
            "ALTER TABLE t2 REPLICA IDENTITY FULL",
            "CREATE PUBLICATION p FOR ALL TABLES",
            "SELECT pg_create_logical_replication_slot('s', 'pgoutput')",
            "INSERT INTO t VALUES (1, -2, 3, 4, 1.1, 'NaN', \
             123456789012345678901234567890.123456789, true, '{\"a\": 1}', \
             '{\"b\": [1, 2]}', 'hello', 'vc', 'ab', 'nm', \
             'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2026-11-25', '10:00:00', \
             '2026-11-25 10:00:00', '2026-11-25 10:00:00+00', '1 day 2 hours', \
             'happy', repeat('x', 10000))",
            "UPDATE t SET tx = 'world' WHERE id = 1",
            "UPDATE t SET id = 2 WHERE id = 1",
            "INSERT INTO t2 VALUES (1, NULL)",
            "UPDATE t2 SET id = 5",
            "DELETE FROM t WHERE id = 2",
            "DELETE FROM t2",
            "TRUNCATE t, t2 RESTART IDENTITY CASCADE",
            "SELECT pg_logical_emit_message(true, 'tally', 'hi')",
            "SELECT pg_logical_emit_message(false, 'tally', 'nt')",
        ] {
            client.batch_execute(statement).await.unwrap();
        }
        // Origins are per session, so a second connection sets one up.
        let origin_client = connect(&url).await.unwrap();
        for statement in [
            "SELECT pg_replication_origin_create('node_a')",
            "SELECT pg_replication_origin_session_setup('node_a')",
            "INSERT INTO t2 VALUES (9, 'from a')",
        ] {
            origin_client.batch_execute(statement).await.unwrap();
        }
        let rows = client
            .query(
                "SELECT data FROM pg_logical_slot_get_binary_changes('s', NULL, NULL,
                     'proto_version', '1', 'publication_names', 'p',
                     'messages', 'true')",
                &[],
            )
            .await
            .unwrap();
        let messages: Vec<PgOutputMessage> = rows
            .iter()
            .map(|row| {
                let bytes: Vec<u8> = row.get(0);
                decode(&bytes).unwrap_or_else(|e| panic!("{e}: {bytes:?}"))
            })
            .collect();

        let relation = |name: &str| {
            messages
                .iter()
                .find_map(|m| match m {
                    M::Relation(r) if r.name == name => Some(r.clone()),
                    _ => None,
                })
                .unwrap_or_else(|| panic!("no relation {name}"))
        };
        let t = relation("t");
        let t2 = relation("t2");
        assert_eq!((t.namespace.as_str(), t.replica_identity), ("public", b'd'));
        assert_eq!(t2.replica_identity, b'f');
        assert_eq!(t.columns.len(), 22);
        assert!(t.columns[0].is_key() && !t.columns[1].is_key());
        assert_eq!(
            (t.columns[0].name.as_str(), t.columns[0].type_oid),
            ("id", 20)
        );
        assert_eq!(t.columns[11].type_modifier, 14); // varchar(10): 10 + 4
        let mood = t.columns[20].type_oid;
        assert!(messages.contains(&M::Type {
            oid: mood,
            namespace: "public".into(),
            name: "mood".into()
        }));

        let begins = messages
            .iter()
            .filter(|m| matches!(m, M::Begin { .. }))
            .count();
        let commits: Vec<_> = messages
            .iter()
            .filter_map(|m| match m {
                M::Commit {
                    flags,
                    commit_lsn,
                    end_lsn,
                    ..
                } => Some((*flags, *commit_lsn, *end_lsn)),
                _ => None,
            })
            .collect();
        assert!(begins >= 8 && begins == commits.len(), "{messages:#?}");
        assert!(
            commits
                .iter()
                .all(|&(flags, commit, end)| flags == 0 && end > commit)
        );

        let inserts: Vec<_> = messages
            .iter()
            .filter_map(|m| match m {
                M::Insert { relation_id, new } => Some((*relation_id, new)),
                _ => None,
            })
            .collect();
        assert_eq!(inserts[0].0, t.id);
        let row = tuple_to_json(&t, inserts[0].1, "__toast").unwrap();
        let mut expected = json!({
            "id": 1, "small": -2, "i": 3, "o": 4, "f4": 1.1, "f8": "NaN",
            "n": "123456789012345678901234567890.123456789", "b": true,
            "j": {"a": 1}, "jb": {"b": [1, 2]}, "tx": "hello", "vc": "vc",
            "bp": "ab ", "nm": "nm", "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "d": "2026-11-25", "tm": "10:00:00", "ts": "2026-11-25T10:00:00",
            "tstz": "2026-11-25T10:00:00+00", "iv": "1 day 02:00:00",
            "m": "happy",
        });
        expected["big"] = json!("x".repeat(10000));
        assert_eq!(Value::Object(row), expected);

        let updates: Vec<_> = messages
            .iter()
            .filter_map(|m| match m {
                M::Update {
                    relation_id,
                    old_key,
                    old,
                    new,
                } => Some((*relation_id, old_key, old, new)),
                _ => None,
            })
            .collect();
        assert_eq!(updates.len(), 3);
        // Text changed: no old tuple, the TOASTed column is not sent.
        let (rel, old_key, old, new) = updates[0];
        assert_eq!((rel, old_key, old), (t.id, &None, &None));
        assert_eq!(new.0[10], text("world"));
        assert_eq!(new.0[21], TupleValue::UnchangedToast);
        let row = tuple_to_json(&t, new, "__toast").unwrap();
        assert_eq!(row["big"], json!("__toast"));
        // Key changed: the old key, other columns null.
        let (rel, old_key, old, new) = updates[1];
        assert_eq!((rel, old), (t.id, &None));
        let old_key = old_key.as_ref().unwrap();
        assert_eq!(old_key.0[0], text("1"));
        assert!(old_key.0[1..].iter().all(|v| *v == TupleValue::Null));
        assert_eq!(new.0[0], text("2"));
        // Replica identity full: the whole old row.
        let (rel, old_key, old, new) = updates[2];
        assert_eq!((rel, old_key), (t2.id, &None));
        assert_eq!(old, &Some(Tuple(vec![text("1"), TupleValue::Null])));
        assert_eq!(new, &Tuple(vec![text("5"), TupleValue::Null]));

        let deletes: Vec<_> = messages
            .iter()
            .filter(|m| matches!(m, M::Delete { .. }))
            .collect();
        assert!(matches!(
            deletes[..],
            [
                M::Delete { relation_id: a, old_key: Some(_), old: None },
                M::Delete { relation_id: b, old_key: None, old: Some(_) },
            ] if *a == t.id && *b == t2.id
        ));

        let truncate = messages
            .iter()
            .find_map(|m| match m {
                M::Truncate {
                    options,
                    relation_ids,
                } => Some((*options, relation_ids.clone())),
                _ => None,
            })
            .unwrap();
        assert_eq!(truncate.0, 3);
        let mut ids = truncate.1;
        ids.sort_unstable();
        let mut expected_ids = vec![t.id, t2.id];
        expected_ids.sort_unstable();
        assert_eq!(ids, expected_ids);

        let logical: Vec<_> = messages
            .iter()
            .filter_map(|m| match m {
                M::Message {
                    transactional,
                    prefix,
                    content,
                    ..
                } => Some((*transactional, prefix.as_str(), content.as_slice())),
                _ => None,
            })
            .collect();
        assert_eq!(
            logical,
            [(true, "tally", &b"hi"[..]), (false, "tally", &b"nt"[..])]
        );

        assert!(messages.iter().any(|m| matches!(
            m,
            M::Origin { name, .. } if name == "node_a"
        )));
    }

    /// The fuzzer starts from `fuzz/corpus/pgoutput/seed-*`: they must stay
    /// valid messages, or the fuzzer would start from error paths only.
    #[test]
    fn fuzz_seeds_are_valid_messages() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/pgoutput");
        let mut tags = std::collections::BTreeSet::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if !path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("seed-")
            {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            let decoded = decode(&bytes);
            assert!(decoded.is_ok(), "{}: {decoded:?}", path.display());
            tags.insert(bytes[0]);
        }
        // Every message kind the decoder knows has a seed.
        assert_eq!(tags, b"BCDIMORTUY".iter().copied().collect());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn arbitrary_bytes_after_a_known_tag_never_panic(
            tag in prop::sample::select(b"BCORYIUDTM".to_vec()),
            rest in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut bytes = vec![tag];
            bytes.extend(rest);
            let _ = decode(&bytes);
        }

        #[test]
        fn valid_messages_roundtrip_and_prefixes_fail(message in message_strategy()) {
            let bytes = encode(&message);
            prop_assert_eq!(decode(&bytes), Ok(message));
            for len in 0..bytes.len() {
                prop_assert!(decode(&bytes[..len]).is_err());
            }
        }

        #[test]
        fn mutated_messages_never_panic(
            message in message_strategy(),
            mutations in proptest::collection::vec(mutation_strategy(), 1..4),
        ) {
            let mut bytes = encode(&message);
            for mutation in &mutations {
                mutate(&mut bytes, mutation);
            }
            if let Ok(decoded) = decode(&bytes) {
                // Whatever decodes is a faithful reading of the bytes.
                prop_assert_eq!(encode(&decoded).len(), bytes.len());
            }
        }

        #[test]
        fn tuple_to_json_never_panics(
            oids in proptest::collection::vec(
                prop::sample::select(vec![16u32, 20, 21, 23, 25, 26, 114, 700, 701, 1114, 1184, 1700, 3802]),
                0..4,
            ),
            tuple in tuple_strategy(),
        ) {
            let relation = relation_of(oids.iter().map(|&oid| column("c", oid)).collect());
            let _ = tuple_to_json(&relation, &tuple, "t");
        }
    }
}
