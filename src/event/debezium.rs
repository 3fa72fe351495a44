//! Parsing of Debezium JSON envelopes into [`ChangeEvent`]s.
//!
//! Two shapes are accepted: the bare envelope, and the Kafka Connect wrapper
//! `{"schema": …, "payload": envelope}`. Only the wrapper says how column
//! values are encoded, so only there are precise decimals (base64) and
//! integer dates/timestamps turned into text; in a bare envelope every value
//! passes through as is, which suits `decimal.handling.mode=string` and
//! Tally's own capture.
//!
//! The parser is fed untrusted input and fuzzed: it must return an error,
//! never panic, and never size an allocation from a number in the input.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value};
use thiserror::Error;

use super::decimal::decimal_text;
use super::temporal::{TimeUnit, date_text, timestamp_text};
use super::{ChangeEvent, Op, OrderKey, Parsed, Row, TableName, UNCHANGED_TOAST, parse_lsn_text};

/// Why a message could not be read as a change event. The text names the
/// offending field so a dead-letter reader knows what to fix.
#[derive(Debug, Error, PartialEq)]
pub enum EventError {
    #[error("malformed JSON: {0}")]
    Json(String),
    #[error("{0}")]
    Invalid(String),
}

impl EventError {
    fn missing(path: &str) -> Self {
        EventError::Invalid(format!("missing field \"{path}\""))
    }

    fn unexpected(path: &str, expected: &str, found: &Value) -> Self {
        EventError::Invalid(format!(
            "{path}: expected {expected}, got {}",
            describe(found)
        ))
    }

    /// Prefixes the path of the value a context-free error is about.
    fn at(self, path: &str) -> Self {
        match self {
            EventError::Invalid(message) => EventError::Invalid(format!("{path}: {message}")),
            json @ EventError::Json(_) => json,
        }
    }
}

/// Parses one message (one JSON line).
///
/// An empty message, `null`, or a wrapper with a null payload is the
/// tombstone Debezium sends after a delete.
pub fn parse_event(raw: &str) -> Result<Parsed, EventError> {
    if raw.trim().is_empty() {
        return Ok(Parsed::Tombstone);
    }
    let message: Value =
        serde_json::from_str(raw).map_err(|error| EventError::Json(error.to_string()))?;
    let (envelope, schema) = match message {
        Value::Null => return Ok(Parsed::Tombstone),
        Value::Object(mut wrapper) if wrapper.contains_key("payload") => {
            match wrapper.remove("payload") {
                Some(Value::Object(envelope)) => (envelope, wrapper.remove("schema")),
                Some(Value::Null) | None => return Ok(Parsed::Tombstone),
                Some(other) => {
                    return Err(EventError::unexpected(
                        "payload",
                        "an object or null",
                        &other,
                    ));
                }
            }
        }
        Value::Object(envelope) => (envelope, None),
        other => return Err(EventError::unexpected("message", "a JSON object", &other)),
    };
    let encodings = match &schema {
        Some(schema) => RowEncodings::from_wrapper_schema(schema)?,
        None => RowEncodings::default(),
    };
    parse_envelope(envelope, &encodings).map(Parsed::Event)
}

fn parse_envelope(
    mut envelope: Map<String, Value>,
    encodings: &RowEncodings,
) -> Result<ChangeEvent, EventError> {
    let op = parse_op(envelope.get("op"))?;
    let source = match envelope.get("source") {
        Some(Value::Object(source)) => source,
        None | Some(Value::Null) => return Err(EventError::missing("source")),
        Some(other) => return Err(EventError::unexpected("source", "an object", other)),
    };
    let table = parse_table(source)?;
    let key = parse_order_key(source)?;
    let tx_id = optional_i64(source.get("txId"), "source.txId")?;
    let ts_ms = match optional_i64(envelope.get("ts_ms"), "ts_ms")? {
        Some(ts_ms) => Some(ts_ms),
        None => optional_i64(source.get("ts_ms"), "source.ts_ms")?,
    };
    let before = parse_row(envelope.remove("before"), "before", &encodings.before)?;
    let after = parse_row(envelope.remove("after"), "after", &encodings.after)?;
    require_rows(op, before.is_some(), after.is_some())?;
    Ok(ChangeEvent {
        op,
        table,
        before,
        after,
        key,
        tx_id,
        ts_ms,
    })
}

fn parse_op(value: Option<&Value>) -> Result<Op, EventError> {
    let code = match value {
        Some(Value::String(code)) => code,
        None | Some(Value::Null) => return Err(EventError::missing("op")),
        Some(other) => return Err(EventError::unexpected("op", "a string", other)),
    };
    match code.as_str() {
        "c" => Ok(Op::Create),
        "u" => Ok(Op::Update),
        "d" => Ok(Op::Delete),
        "r" => Ok(Op::Read),
        "t" => Ok(Op::Truncate),
        _ => Err(EventError::Invalid(format!(
            "op: unknown value {}, expected one of c, u, d, r, t",
            quoted(code)
        ))),
    }
}

/// Checks that the rows the op needs are present: a missing `after` on an
/// insert would otherwise surface much later as a confusing apply error.
fn require_rows(op: Op, has_before: bool, has_after: bool) -> Result<(), EventError> {
    let missing = match op {
        Op::Create | Op::Read | Op::Update if !has_after => "after",
        Op::Delete if !has_before => "before",
        _ => return Ok(()),
    };
    Err(EventError::Invalid(format!(
        "op \"{}\" requires \"{missing}\" to be an object",
        op.code()
    )))
}

fn parse_table(source: &Map<String, Value>) -> Result<TableName, EventError> {
    let name = match source.get("table") {
        Some(Value::String(name)) => name,
        None | Some(Value::Null) => return Err(EventError::missing("source.table")),
        Some(other) => return Err(EventError::unexpected("source.table", "a string", other)),
    };
    let schema = match source.get("schema") {
        Some(Value::String(schema)) => schema.as_str(),
        None | Some(Value::Null) => "public",
        Some(other) => return Err(EventError::unexpected("source.schema", "a string", other)),
    };
    // Postgres has no empty identifiers; an empty name means a broken producer.
    if name.is_empty() {
        return Err(EventError::Invalid(
            "source.table: must not be empty".into(),
        ));
    }
    if schema.is_empty() {
        return Err(EventError::Invalid(
            "source.schema: must not be empty".into(),
        ));
    }
    Ok(TableName::new(schema, name.as_str()))
}

/// `(commit_lsn, lsn)`; without a commit LSN the change's own LSN stands in
/// for both, which still grows along each row's history.
fn parse_order_key(source: &Map<String, Value>) -> Result<OrderKey, EventError> {
    let lsn = match source.get("lsn") {
        None | Some(Value::Null) => return Err(EventError::missing("source.lsn")),
        Some(value) => parse_lsn(value, "source.lsn")?,
    };
    let commit_lsn = match source.get("commit_lsn") {
        None | Some(Value::Null) => lsn,
        Some(value) => parse_lsn(value, "source.commit_lsn")?,
    };
    Ok(OrderKey::new(commit_lsn, lsn))
}

/// An LSN as a JSON integer, a string of decimal digits, or `X/Y` hex text.
fn parse_lsn(value: &Value, path: &str) -> Result<u64, EventError> {
    match value {
        Value::Number(number) => number.as_u64().ok_or_else(|| {
            EventError::Invalid(format!(
                "{path}: expected a non-negative 64-bit integer, got {number}"
            ))
        }),
        Value::String(text) => {
            let trimmed = text.trim();
            let parsed = if !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit()) {
                trimmed.parse::<u64>().ok()
            } else {
                parse_lsn_text(trimmed)
            };
            parsed.ok_or_else(|| {
                EventError::Invalid(format!(
                    "{path}: {} is not an LSN (expected a 64-bit decimal or X/Y hex)",
                    quoted(text)
                ))
            })
        }
        other => Err(EventError::unexpected(
            path,
            "an integer or an LSN string",
            other,
        )),
    }
}

fn optional_i64(value: Option<&Value>, path: &str) -> Result<Option<i64>, EventError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(number)) => number.as_i64().map(Some).ok_or_else(|| {
            EventError::Invalid(format!("{path}: expected a 64-bit integer, got {number}"))
        }),
        Some(other) => Err(EventError::unexpected(path, "an integer", other)),
    }
}

/// Reads `before` or `after` and decodes the columns the schema marks as
/// encoded.
fn parse_row(
    value: Option<Value>,
    side: &str,
    encodings: &HashMap<String, ColumnEncoding>,
) -> Result<Option<Row>, EventError> {
    let mut row = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(row)) => row,
        Some(other) => return Err(EventError::unexpected(side, "an object or null", &other)),
    };
    if !encodings.is_empty() {
        for (column, value) in row.iter_mut() {
            if let Some(encoding) = encodings.get(column) {
                let path = format!("{side}.{column}");
                *value = encoding.decode(std::mem::take(value), &path)?;
            }
        }
    }
    Ok(Some(row))
}

/// How a column's JSON value encodes its real value, from the column's
/// Kafka Connect schema `name`. Columns not listed here pass through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ColumnEncoding {
    /// `org.apache.kafka.connect.data.Decimal`: base64 unscaled integer.
    Decimal { scale: i64 },
    /// `io.debezium.data.VariableScaleDecimal`: `{"scale", "value"}`.
    VariableScaleDecimal,
    /// Days since the epoch.
    Date,
    /// Ticks since the epoch.
    Timestamp(TimeUnit),
}

const DECIMAL: &str = "org.apache.kafka.connect.data.Decimal";
const VARIABLE_SCALE_DECIMAL: &str = "io.debezium.data.VariableScaleDecimal";

impl ColumnEncoding {
    /// `None` for a column whose value needs no decoding.
    fn from_column_schema(
        column_schema: &Map<String, Value>,
        path: &str,
    ) -> Result<Option<Self>, EventError> {
        let Some(Value::String(name)) = column_schema.get("name") else {
            return Ok(None);
        };
        let encoding = match name.as_str() {
            // A string-typed column already holds decimal text.
            DECIMAL if column_schema.get("type").and_then(Value::as_str) == Some("string") => {
                return Ok(None);
            }
            DECIMAL => ColumnEncoding::Decimal {
                scale: decimal_scale(column_schema, path)?,
            },
            VARIABLE_SCALE_DECIMAL => ColumnEncoding::VariableScaleDecimal,
            "io.debezium.time.Date" | "org.apache.kafka.connect.data.Date" => ColumnEncoding::Date,
            "io.debezium.time.Timestamp" | "org.apache.kafka.connect.data.Timestamp" => {
                ColumnEncoding::Timestamp(TimeUnit::Millis)
            }
            "io.debezium.time.MicroTimestamp" => ColumnEncoding::Timestamp(TimeUnit::Micros),
            "io.debezium.time.NanoTimestamp" => ColumnEncoding::Timestamp(TimeUnit::Nanos),
            _ => return Ok(None),
        };
        Ok(Some(encoding))
    }

    /// Decodes one column value. Null, the unchanged-TOAST placeholder and
    /// values that are already text (or plain numbers, for decimals) pass
    /// through.
    fn decode(self, value: Value, path: &str) -> Result<Value, EventError> {
        match value {
            Value::Null => return Ok(value),
            Value::String(ref text) if text == UNCHANGED_TOAST => return Ok(value),
            _ => {}
        }
        match self {
            ColumnEncoding::Decimal { scale } => match value {
                Value::String(encoded) => decode_decimal(&encoded, scale, "Decimal", path),
                Value::Number(_) => Ok(value),
                other => Err(EventError::unexpected(path, "a base64 string", &other)),
            },
            ColumnEncoding::VariableScaleDecimal => match value {
                Value::Object(parts) => decode_variable_scale_decimal(&parts, path),
                Value::String(_) | Value::Number(_) => Ok(value),
                other => Err(EventError::unexpected(
                    path,
                    "a VariableScaleDecimal object",
                    &other,
                )),
            },
            ColumnEncoding::Date => decode_epoch_integer(value, path, date_text),
            ColumnEncoding::Timestamp(unit) => {
                decode_epoch_integer(value, path, |ticks| timestamp_text(ticks, unit))
            }
        }
    }
}

/// `parameters.scale` of a `Decimal` column, which Kafka Connect writes as a
/// string.
fn decimal_scale(column_schema: &Map<String, Value>, path: &str) -> Result<i64, EventError> {
    let scale = column_schema
        .get("parameters")
        .and_then(|parameters| parameters.get("scale"));
    let parsed = match scale {
        None | Some(Value::Null) => {
            return Err(EventError::Invalid(format!(
                "{path}: Decimal schema lacks parameters.scale"
            )));
        }
        Some(Value::String(text)) => text.trim().parse::<i64>().ok(),
        Some(Value::Number(number)) => number.as_i64(),
        Some(_) => None,
    };
    parsed.ok_or_else(|| {
        EventError::Invalid(format!(
            "{path}: Decimal parameters.scale must be an integer, got {}",
            scale.map(describe).unwrap_or_default()
        ))
    })
}

fn decode_decimal(
    encoded: &str,
    scale: i64,
    type_name: &str,
    path: &str,
) -> Result<Value, EventError> {
    let unscaled = BASE64
        .decode(encoded)
        .map_err(|_| EventError::Invalid(format!("{path}: invalid base64 in {type_name}")))?;
    let text = decimal_text(&unscaled, scale).map_err(|error| error.at(path))?;
    Ok(Value::String(text))
}

fn decode_variable_scale_decimal(
    parts: &Map<String, Value>,
    path: &str,
) -> Result<Value, EventError> {
    let scale = match parts.get("scale") {
        Some(Value::Number(number)) => number.as_i64().ok_or_else(|| {
            EventError::Invalid(format!("{path}.scale: expected an integer, got {number}"))
        })?,
        None | Some(Value::Null) => return Err(EventError::missing(&format!("{path}.scale"))),
        Some(other) => {
            return Err(EventError::unexpected(
                &format!("{path}.scale"),
                "an integer",
                other,
            ));
        }
    };
    match parts.get("value") {
        Some(Value::String(encoded)) => {
            decode_decimal(encoded, scale, "VariableScaleDecimal", path)
        }
        None | Some(Value::Null) => Err(EventError::missing(&format!("{path}.value"))),
        Some(other) => Err(EventError::unexpected(
            &format!("{path}.value"),
            "a base64 string",
            other,
        )),
    }
}

/// Turns an integer count since the epoch into text; text passes through.
fn decode_epoch_integer(
    value: Value,
    path: &str,
    to_text: impl Fn(i64) -> String,
) -> Result<Value, EventError> {
    match value {
        Value::Number(ref number) => match number.as_i64() {
            Some(count) => Ok(Value::String(to_text(count))),
            None => Err(EventError::Invalid(format!(
                "{path}: expected a 64-bit integer, got {number}"
            ))),
        },
        Value::String(_) => Ok(value),
        other => Err(EventError::unexpected(path, "an integer", &other)),
    }
}

/// Column encodings of `before` and `after`, read from a wrapper's schema.
#[derive(Debug, Default)]
struct RowEncodings {
    before: HashMap<String, ColumnEncoding>,
    after: HashMap<String, ColumnEncoding>,
}

impl RowEncodings {
    /// Reads the envelope's struct schema. Entries that cannot describe
    /// `before`/`after` columns are skipped; a malformed part that would
    /// describe them is an error, since ignoring it would let encoded values
    /// through as if they were plain text.
    fn from_wrapper_schema(schema: &Value) -> Result<Self, EventError> {
        let mut encodings = RowEncodings::default();
        let schema = match schema {
            Value::Null => return Ok(encodings),
            Value::Object(schema) => schema,
            other => return Err(EventError::unexpected("schema", "an object or null", other)),
        };
        let fields = match schema.get("fields") {
            None | Some(Value::Null) => return Ok(encodings),
            Some(Value::Array(fields)) => fields,
            Some(other) => {
                return Err(EventError::unexpected("schema.fields", "an array", other));
            }
        };
        for (index, field) in fields.iter().enumerate() {
            let (side, target) = match field.get("field").and_then(Value::as_str) {
                Some("before") => ("before", &mut encodings.before),
                Some("after") => ("after", &mut encodings.after),
                _ => continue,
            };
            let columns = match field.get("fields") {
                None | Some(Value::Null) => continue,
                Some(Value::Array(columns)) => columns,
                Some(other) => {
                    return Err(EventError::unexpected(
                        &format!("schema.fields[{index}].fields"),
                        "an array",
                        other,
                    ));
                }
            };
            for column_schema in columns {
                let Some(column_schema) = column_schema.as_object() else {
                    continue;
                };
                let Some(column) = column_schema.get("field").and_then(Value::as_str) else {
                    continue;
                };
                let path = format!("{side}.{column}");
                if let Some(encoding) = ColumnEncoding::from_column_schema(column_schema, &path)? {
                    target.insert(column.to_owned(), encoding);
                }
            }
        }
        Ok(encodings)
    }
}

/// Longest stretch of input quoted back in an error message.
const QUOTE_LIMIT: usize = 40;

/// A short rendering of a value for error messages: scalars as JSON (long
/// strings cut), containers by kind only.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(flag) => flag.to_string(),
        Value::Number(number) => number.to_string(),
        Value::String(text) => quoted(text),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// `text` as a JSON string, cut (on a character boundary) if long.
fn quoted(text: &str) -> String {
    match text.char_indices().nth(QUOTE_LIMIT) {
        Some((cut, _)) => format!("{}…", Value::String(text[..cut].to_owned())),
        None => Value::String(text.to_owned()).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn event(message: &Value) -> ChangeEvent {
        match parse_event(&message.to_string()) {
            Ok(Parsed::Event(event)) => event,
            other => panic!("expected an event from {message}, got {other:?}"),
        }
    }

    fn error(raw: &str) -> String {
        match parse_event(raw) {
            Err(error) => error.to_string(),
            Ok(parsed) => panic!("expected an error from {raw}, got {parsed:?}"),
        }
    }

    fn error_of(message: &Value) -> String {
        error(&message.to_string())
    }

    fn row(value: Value) -> Row {
        match value {
            Value::Object(row) => row,
            other => panic!("not an object: {other}"),
        }
    }

    fn source() -> Value {
        json!({
            "version": "2.7.0.Final",
            "connector": "postgresql",
            "name": "dbserver1",
            "ts_ms": 1_700_000_000_000i64,
            "snapshot": "false",
            "db": "shop",
            "sequence": "[\"24023119\",\"24023128\"]",
            "schema": "shop",
            "table": "orders",
            "txId": 555,
            "lsn": 24_023_128,
            "commit_lsn": 24_023_200,
            "xmin": null
        })
    }

    fn envelope(op: &str, before: Value, after: Value) -> Value {
        json!({
            "before": before,
            "after": after,
            "source": source(),
            "op": op,
            "ts_ms": 1_700_000_000_123i64,
            "transaction": null
        })
    }

    /// The Kafka Connect schema of the `orders` table's rows, as Debezium
    /// writes it with `decimal.handling.mode=precise`.
    fn orders_row_schema(side: &str) -> Value {
        json!({
            "type": "struct",
            "optional": true,
            "name": "dbserver1.shop.orders.Value",
            "field": side,
            "fields": [
                {"type": "int32", "optional": false, "field": "id"},
                {"type": "bytes", "optional": true, "name": "org.apache.kafka.connect.data.Decimal",
                 "version": 1, "parameters": {"scale": "2", "connect.decimal.precision": "10"},
                 "field": "total"},
                {"type": "struct", "optional": true, "name": "io.debezium.data.VariableScaleDecimal",
                 "version": 1, "doc": "Variable scaled decimal",
                 "fields": [{"type": "int32", "optional": false, "field": "scale"},
                            {"type": "bytes", "optional": false, "field": "value"}],
                 "field": "weight"},
                {"type": "int32", "optional": true, "name": "io.debezium.time.Date", "version": 1,
                 "field": "placed_on"},
                {"type": "int64", "optional": true, "name": "io.debezium.time.Timestamp", "version": 1,
                 "field": "placed_at_ms"},
                {"type": "int64", "optional": true, "name": "io.debezium.time.MicroTimestamp",
                 "version": 1, "field": "placed_at"},
                {"type": "int64", "optional": true, "name": "io.debezium.time.NanoTimestamp",
                 "version": 1, "field": "placed_at_ns"},
                {"type": "string", "optional": true, "name": "io.debezium.time.ZonedTimestamp",
                 "version": 1, "field": "shipped_at"},
                {"type": "string", "optional": true, "field": "note"}
            ]
        })
    }

    fn wrapper_schema(before: Value, after: Value) -> Value {
        json!({
            "type": "struct",
            "optional": false,
            "name": "dbserver1.shop.orders.Envelope",
            "version": 1,
            "fields": [
                before,
                after,
                {"type": "struct", "optional": false, "field": "source",
                 "name": "io.debezium.connector.postgresql.Source",
                 "fields": [{"type": "string", "optional": false, "field": "table"}]},
                {"type": "string", "optional": false, "field": "op"},
                {"type": "int64", "optional": true, "field": "ts_ms"}
            ]
        })
    }

    fn wrapped(payload: Value) -> Value {
        json!({
            "schema": wrapper_schema(orders_row_schema("before"), orders_row_schema("after")),
            "payload": payload
        })
    }

    /// A wrapped insert whose `after` row is `id: 1` plus `columns`.
    fn wrapped_insert(columns: Value) -> Value {
        let mut after = json!({"id": 1});
        after.as_object_mut().unwrap().extend(row(columns));
        wrapped(envelope("c", Value::Null, after))
    }

    fn decoded_after(columns: Value) -> Row {
        event(&wrapped_insert(columns)).after.unwrap()
    }

    fn b64(bytes: &[u8]) -> String {
        BASE64.encode(bytes)
    }

    // --- envelopes and ops ---

    #[test]
    fn event_bare_insert() {
        let parsed = event(&envelope(
            "c",
            Value::Null,
            json!({"id": 1, "total": "12.30"}),
        ));
        assert_eq!(
            parsed,
            ChangeEvent {
                op: Op::Create,
                table: TableName::new("shop", "orders"),
                before: None,
                after: Some(row(json!({"id": 1, "total": "12.30"}))),
                key: OrderKey::new(24_023_200, 24_023_128),
                tx_id: Some(555),
                ts_ms: Some(1_700_000_000_123),
            }
        );
    }

    #[test]
    fn event_bare_envelope_every_op() {
        let old = json!({"id": 1, "total": "1.00"});
        let new = json!({"id": 1, "total": "2.00"});
        let cases = [
            ("c", Op::Create, Value::Null, new.clone()),
            ("r", Op::Read, Value::Null, new.clone()),
            ("u", Op::Update, old.clone(), new.clone()),
            ("d", Op::Delete, old.clone(), Value::Null),
            ("t", Op::Truncate, Value::Null, Value::Null),
        ];
        for (code, op, before, after) in cases {
            let parsed = event(&envelope(code, before.clone(), after.clone()));
            assert_eq!(parsed.op, op);
            assert_eq!(parsed.op.code().to_string(), code);
            assert_eq!(parsed.before, before.as_object().cloned());
            assert_eq!(parsed.after, after.as_object().cloned());
            assert_eq!(parsed.table, TableName::new("shop", "orders"));
        }
    }

    #[test]
    fn event_wrapped_envelope_every_op() {
        let old = json!({"id": 1, "total": b64(&[0x64])});
        let new = json!({"id": 1, "total": b64(&[0x00, 0xC8])});
        let cases = [
            ("c", Op::Create, Value::Null, new.clone()),
            ("r", Op::Read, Value::Null, new.clone()),
            ("u", Op::Update, old.clone(), new.clone()),
            ("d", Op::Delete, old.clone(), Value::Null),
            ("t", Op::Truncate, Value::Null, Value::Null),
        ];
        for (code, op, before, after) in cases {
            let parsed = event(&wrapped(envelope(code, before.clone(), after.clone())));
            assert_eq!(parsed.op, op);
            assert_eq!(parsed.key, OrderKey::new(24_023_200, 24_023_128));
            assert_eq!(parsed.tx_id, Some(555));
            let expect_before = (!before.is_null()).then(|| row(json!({"id": 1, "total": "1.00"})));
            let expect_after = (!after.is_null()).then(|| row(json!({"id": 1, "total": "2.00"})));
            assert_eq!(parsed.before, expect_before, "op {code}");
            assert_eq!(parsed.after, expect_after, "op {code}");
        }
    }

    #[test]
    fn event_update_with_absent_before_is_accepted() {
        // REPLICA IDENTITY DEFAULT without a key change: Debezium sends no `before`.
        let mut message = envelope("u", Value::Null, json!({"id": 1}));
        message.as_object_mut().unwrap().remove("before");
        let parsed = event(&message);
        assert_eq!(parsed.before, None);
        assert_eq!(parsed.after, Some(row(json!({"id": 1}))));
    }

    #[test]
    fn event_schema_defaults_to_public() {
        let mut message = envelope("c", Value::Null, json!({"id": 1}));
        message["source"].as_object_mut().unwrap().remove("schema");
        assert_eq!(event(&message).table, TableName::public("orders"));
        message["source"]["schema"] = Value::Null;
        assert_eq!(event(&message).table, TableName::public("orders"));
    }

    #[test]
    fn event_unknown_fields_are_ignored() {
        let mut message = envelope("c", Value::Null, json!({"id": 1}));
        message["extra"] = json!({"anything": [1, 2]});
        message["source"]["extra"] = json!(true);
        assert_eq!(event(&message).op, Op::Create);
    }

    #[test]
    fn event_wrapper_without_schema_passes_values_through() {
        let payload = envelope("c", Value::Null, json!({"id": 1, "total": "+zI="}));
        for schema in [Value::Null, json!({"type": "struct"})] {
            let message = json!({"schema": schema, "payload": payload.clone()});
            assert_eq!(event(&message).after.unwrap()["total"], json!("+zI="));
        }
        let message = json!({"payload": payload});
        assert_eq!(event(&message).after.unwrap()["total"], json!("+zI="));
    }

    // --- tombstones ---

    #[test]
    fn event_tombstones() {
        for raw in [
            "",
            "   ",
            "\n",
            " \t\r\n",
            "null",
            " null\n",
            r#"{"schema":null,"payload":null}"#,
            r#"{"payload":null}"#,
        ] {
            assert_eq!(parse_event(raw), Ok(Parsed::Tombstone), "{raw:?}");
        }
    }

    // --- ordering key, txId, ts_ms ---

    fn with_source(fields: Value) -> Value {
        let mut message = envelope("c", Value::Null, json!({"id": 1}));
        let source = message["source"].as_object_mut().unwrap();
        source.remove("lsn");
        source.remove("commit_lsn");
        for (name, value) in row(fields) {
            source.insert(name, value);
        }
        message
    }

    #[test]
    fn event_lsn_forms() {
        let cases = [
            (json!({"lsn": 42}), OrderKey::new(42, 42)),
            (json!({"lsn": "42"}), OrderKey::new(42, 42)),
            (
                json!({"lsn": "16/B374D848"}),
                OrderKey::new(0x16_B374_D848, 0x16_B374_D848),
            ),
            (json!({"lsn": " 0/0 "}), OrderKey::new(0, 0)),
            (json!({"lsn": u64::MAX}), OrderKey::new(u64::MAX, u64::MAX)),
            (
                json!({"lsn": "18446744073709551615"}),
                OrderKey::new(u64::MAX, u64::MAX),
            ),
            (json!({"lsn": 10, "commit_lsn": 20}), OrderKey::new(20, 10)),
            (
                json!({"lsn": 10, "commit_lsn": "20"}),
                OrderKey::new(20, 10),
            ),
            (
                json!({"lsn": "0/A", "commit_lsn": "1/0"}),
                OrderKey::new(1 << 32, 10),
            ),
            (
                json!({"lsn": 10, "commit_lsn": null}),
                OrderKey::new(10, 10),
            ),
        ];
        for (fields, key) in cases {
            assert_eq!(event(&with_source(fields.clone())).key, key, "{fields}");
        }
    }

    #[test]
    fn event_ts_ms_falls_back_to_source() {
        let mut message = envelope("c", Value::Null, json!({"id": 1}));
        assert_eq!(event(&message).ts_ms, Some(1_700_000_000_123));
        message.as_object_mut().unwrap().remove("ts_ms");
        assert_eq!(event(&message).ts_ms, Some(1_700_000_000_000));
        message["ts_ms"] = Value::Null;
        assert_eq!(event(&message).ts_ms, Some(1_700_000_000_000));
        message["source"].as_object_mut().unwrap().remove("ts_ms");
        assert_eq!(event(&message).ts_ms, None);
    }

    #[test]
    fn event_tx_id_is_optional() {
        let mut message = envelope("c", Value::Null, json!({"id": 1}));
        message["source"].as_object_mut().unwrap().remove("txId");
        assert_eq!(event(&message).tx_id, None);
        message["source"]["txId"] = json!(-3);
        assert_eq!(event(&message).tx_id, Some(-3));
    }

    // --- decimals ---

    #[test]
    fn event_decimal_columns_are_decoded() {
        let cases: [(&[u8], &str); 6] = [
            (&[0xFB, 0x32], "-12.30"),
            (&[0x05], "0.05"),
            (&[0x00], "0.00"),
            (&[0x00, 0x00, 0x04, 0xD2], "12.34"),
            (&[0xFF, 0xFF], "-0.01"),
            (
                &[
                    0x13, 0xaa, 0xf5, 0x04, 0xe4, 0xbc, 0x1e, 0x62, 0x17, 0x3f, 0x87, 0xa4, 0x37,
                    0x8c, 0x37, 0xb4, 0x9c, 0x8c, 0xcf, 0xf1, 0x96, 0xce, 0x3f, 0x0a, 0xd2,
                ],
                "1234567890123456789012345678901234567890123456789012345678.90",
            ),
        ];
        for (bytes, text) in cases {
            let after = decoded_after(json!({"total": b64(bytes)}));
            assert_eq!(after["total"], json!(text), "{bytes:02x?}");
        }
    }

    #[test]
    fn event_decimal_scale_zero() {
        let mut after_schema = orders_row_schema("after");
        after_schema["fields"][1]["parameters"]["scale"] = json!("0");
        let message = json!({
            "schema": wrapper_schema(orders_row_schema("before"), after_schema),
            "payload": envelope("c", Value::Null, json!({"total": "BNI="})),
        });
        assert_eq!(event(&message).after.unwrap()["total"], json!("1234"));
    }

    #[test]
    fn event_decimal_scale_may_be_a_number() {
        let mut after_schema = orders_row_schema("after");
        after_schema["fields"][1]["parameters"]["scale"] = json!(3);
        let message = json!({
            "schema": wrapper_schema(orders_row_schema("before"), after_schema),
            "payload": envelope("c", Value::Null, json!({"total": "BNI="})),
        });
        assert_eq!(event(&message).after.unwrap()["total"], json!("1.234"));
    }

    #[test]
    fn event_decimal_pass_through_values() {
        let after = decoded_after(json!({
            "total": null,
            "weight": 1.5,
            "note": "+zI=",
        }));
        assert_eq!(after["total"], Value::Null);
        assert_eq!(after["weight"], json!(1.5));
        assert_eq!(after["note"], json!("+zI="));
        let after = decoded_after(json!({"total": 12.5}));
        assert_eq!(after["total"], json!(12.5));
        let after = decoded_after(json!({"total": UNCHANGED_TOAST, "weight": UNCHANGED_TOAST}));
        assert_eq!(after["total"], json!(UNCHANGED_TOAST));
        assert_eq!(after["weight"], json!(UNCHANGED_TOAST));
    }

    #[test]
    fn event_string_typed_decimal_schema_is_text() {
        let mut after_schema = orders_row_schema("after");
        after_schema["fields"][1]["type"] = json!("string");
        let message = json!({
            "schema": wrapper_schema(orders_row_schema("before"), after_schema),
            "payload": envelope("c", Value::Null, json!({"total": "1234"})),
        });
        assert_eq!(event(&message).after.unwrap()["total"], json!("1234"));
    }

    #[test]
    fn event_bare_envelope_does_not_decode() {
        let parsed = event(&envelope(
            "c",
            Value::Null,
            json!({"total": "+zI=", "placed_on": 1}),
        ));
        assert_eq!(
            parsed.after,
            Some(row(json!({"total": "+zI=", "placed_on": 1})))
        );
    }

    #[test]
    fn event_variable_scale_decimal() {
        let cases = [
            (json!({"scale": 2, "value": "+zI="}), "-12.30"),
            (json!({"scale": 0, "value": "BNI="}), "1234"),
            (json!({"scale": 5, "value": "BQ=="}), "0.00005"),
            (json!({"scale": -2, "value": "BQ=="}), "500"),
            (json!({"value": "AA==", "scale": 1}), "0.0"),
        ];
        for (value, text) in cases {
            let after = decoded_after(json!({"weight": value.clone()}));
            assert_eq!(after["weight"], json!(text), "{value}");
        }
        // Already text (string mode) passes through.
        assert_eq!(
            decoded_after(json!({"weight": "3.25"}))["weight"],
            json!("3.25")
        );
    }

    #[test]
    fn event_before_and_after_are_both_decoded() {
        let parsed = event(&wrapped(envelope(
            "u",
            json!({"id": 1, "total": "BQ==", "placed_on": 0}),
            json!({"id": 1, "total": "Bg==", "placed_on": 1}),
        )));
        assert_eq!(
            parsed.before,
            Some(row(
                json!({"id": 1, "total": "0.05", "placed_on": "1970-01-01"})
            ))
        );
        assert_eq!(
            parsed.after,
            Some(row(
                json!({"id": 1, "total": "0.06", "placed_on": "1970-01-02"})
            ))
        );
    }

    // --- temporal ---

    #[test]
    fn event_temporal_columns_are_decoded() {
        let after = decoded_after(json!({
            "placed_on": 19_782,
            "placed_at_ms": 1_709_214_330_123i64,
            "placed_at": -299_631_476_543_211i64,
            "placed_at_ns": -1,
            "shipped_at": "2024-02-29T13:45:30.123Z",
        }));
        assert_eq!(after["placed_on"], json!("2024-02-29"));
        assert_eq!(after["placed_at_ms"], json!("2024-02-29T13:45:30.123"));
        assert_eq!(after["placed_at"], json!("1960-07-04T01:02:03.456789"));
        assert_eq!(
            after["placed_at_ns"],
            json!("1969-12-31T23:59:59.999999999")
        );
        assert_eq!(after["shipped_at"], json!("2024-02-29T13:45:30.123Z"));
    }

    #[test]
    fn event_temporal_pre_1970_and_leap_days() {
        let cases = [
            (-1, "1969-12-31"),
            (-25_509, "1900-02-28"),
            (-25_508, "1900-03-01"),
            (11_016, "2000-02-29"),
            (-135_081, "1600-02-29"),
        ];
        for (days, text) in cases {
            assert_eq!(
                decoded_after(json!({"placed_on": days}))["placed_on"],
                json!(text)
            );
        }
        assert_eq!(
            decoded_after(json!({"placed_at_ms": -1}))["placed_at_ms"],
            json!("1969-12-31T23:59:59.999")
        );
    }

    #[test]
    fn event_temporal_pass_through_values() {
        let after = decoded_after(json!({
            "placed_on": null,
            "placed_at": "2024-02-29T13:45:30.123456",
            "placed_at_ms": UNCHANGED_TOAST,
        }));
        assert_eq!(after["placed_on"], Value::Null);
        assert_eq!(after["placed_at"], json!("2024-02-29T13:45:30.123456"));
        assert_eq!(after["placed_at_ms"], json!(UNCHANGED_TOAST));
    }

    #[test]
    fn event_connect_temporal_names_are_decoded() {
        let mut after_schema = orders_row_schema("after");
        after_schema["fields"][3]["name"] = json!("org.apache.kafka.connect.data.Date");
        after_schema["fields"][4]["name"] = json!("org.apache.kafka.connect.data.Timestamp");
        let message = json!({
            "schema": wrapper_schema(orders_row_schema("before"), after_schema),
            "payload": envelope("c", Value::Null, json!({"placed_on": 1, "placed_at_ms": 1})),
        });
        let after = event(&message).after.unwrap();
        assert_eq!(after["placed_on"], json!("1970-01-02"));
        assert_eq!(after["placed_at_ms"], json!("1970-01-01T00:00:00.001"));
    }

    // --- errors ---

    #[test]
    fn event_malformed_json_is_a_json_error() {
        let expected = serde_json::from_str::<Value>("{\"op\":")
            .unwrap_err()
            .to_string();
        assert_eq!(parse_event("{\"op\":"), Err(EventError::Json(expected)));
        assert!(matches!(parse_event("nul"), Err(EventError::Json(_))));
        assert!(matches!(parse_event("{} {}"), Err(EventError::Json(_))));
        assert!(error("[1,").starts_with("malformed JSON: "));
    }

    #[test]
    fn event_envelope_errors() {
        let good = || envelope("c", Value::Null, json!({"id": 1}));
        let mut cases: Vec<(Value, &str)> = vec![
            (
                json!([1, 2]),
                "message: expected a JSON object, got an array",
            ),
            (json!(7), "message: expected a JSON object, got 7"),
            (json!("c"), "message: expected a JSON object, got \"c\""),
            (
                json!({"payload": 3}),
                "payload: expected an object or null, got 3",
            ),
            (
                json!({"schema": 3, "payload": good()}),
                "schema: expected an object or null, got 3",
            ),
            (
                json!({"schema": {"fields": {}}, "payload": good()}),
                "schema.fields: expected an array, got an object",
            ),
        ];
        let mut edit = |change: &dyn Fn(&mut Value), message: &'static str| {
            let mut value = good();
            change(&mut value);
            cases.push((value, message));
        };
        edit(
            &|m| drop(m.as_object_mut().unwrap().remove("op")),
            "missing field \"op\"",
        );
        edit(&|m| m["op"] = json!(1), "op: expected a string, got 1");
        edit(
            &|m| m["op"] = json!("x"),
            "op: unknown value \"x\", expected one of c, u, d, r, t",
        );
        edit(
            &|m| m["op"] = json!("C"),
            "op: unknown value \"C\", expected one of c, u, d, r, t",
        );
        edit(
            &|m| drop(m.as_object_mut().unwrap().remove("source")),
            "missing field \"source\"",
        );
        edit(&|m| m["source"] = Value::Null, "missing field \"source\"");
        edit(
            &|m| m["source"] = json!([]),
            "source: expected an object, got an array",
        );
        edit(
            &|m| drop(m["source"].as_object_mut().unwrap().remove("table")),
            "missing field \"source.table\"",
        );
        edit(
            &|m| m["source"]["table"] = json!(5),
            "source.table: expected a string, got 5",
        );
        edit(
            &|m| m["source"]["table"] = json!(""),
            "source.table: must not be empty",
        );
        edit(
            &|m| m["source"]["schema"] = json!(false),
            "source.schema: expected a string, got false",
        );
        edit(
            &|m| m["source"]["schema"] = json!(""),
            "source.schema: must not be empty",
        );
        edit(
            &|m| drop(m["source"].as_object_mut().unwrap().remove("lsn")),
            "missing field \"source.lsn\"",
        );
        edit(
            &|m| m["source"]["lsn"] = Value::Null,
            "missing field \"source.lsn\"",
        );
        edit(
            &|m| m["source"]["lsn"] = json!(-1),
            "source.lsn: expected a non-negative 64-bit integer, got -1",
        );
        edit(
            &|m| m["source"]["lsn"] = json!(1.5),
            "source.lsn: expected a non-negative 64-bit integer, got 1.5",
        );
        edit(
            &|m| m["source"]["lsn"] = json!("abc"),
            "source.lsn: \"abc\" is not an LSN (expected a 64-bit decimal or X/Y hex)",
        );
        edit(
            &|m| m["source"]["lsn"] = json!(""),
            "source.lsn: \"\" is not an LSN (expected a 64-bit decimal or X/Y hex)",
        );
        edit(
            &|m| m["source"]["lsn"] = json!("18446744073709551616"),
            "source.lsn: \"18446744073709551616\" is not an LSN (expected a 64-bit decimal or X/Y hex)",
        );
        edit(
            &|m| m["source"]["lsn"] = json!("1/100000000"),
            "source.lsn: \"1/100000000\" is not an LSN (expected a 64-bit decimal or X/Y hex)",
        );
        edit(
            &|m| m["source"]["lsn"] = json!([1]),
            "source.lsn: expected an integer or an LSN string, got an array",
        );
        edit(
            &|m| m["source"]["commit_lsn"] = json!("x/y"),
            "source.commit_lsn: \"x/y\" is not an LSN (expected a 64-bit decimal or X/Y hex)",
        );
        edit(
            &|m| m["source"]["commit_lsn"] = json!(true),
            "source.commit_lsn: expected an integer or an LSN string, got true",
        );
        edit(
            &|m| m["source"]["txId"] = json!("7"),
            "source.txId: expected an integer, got \"7\"",
        );
        edit(
            &|m| m["source"]["txId"] = json!(u64::MAX),
            "source.txId: expected a 64-bit integer, got 18446744073709551615",
        );
        edit(
            &|m| m["ts_ms"] = json!(1.25),
            "ts_ms: expected a 64-bit integer, got 1.25",
        );
        edit(
            &|m| {
                m.as_object_mut().unwrap().remove("ts_ms");
                m["source"]["ts_ms"] = json!({});
            },
            "source.ts_ms: expected an integer, got an object",
        );
        edit(
            &|m| m["before"] = json!([]),
            "before: expected an object or null, got an array",
        );
        edit(
            &|m| m["after"] = json!("row"),
            "after: expected an object or null, got \"row\"",
        );
        for (message, expected) in cases {
            assert_eq!(error_of(&message), expected, "{message}");
        }
    }

    #[test]
    fn event_op_requires_rows() {
        let cases = [
            (
                "c",
                Value::Null,
                Value::Null,
                "op \"c\" requires \"after\" to be an object",
            ),
            (
                "r",
                json!({"id": 1}),
                Value::Null,
                "op \"r\" requires \"after\" to be an object",
            ),
            (
                "u",
                json!({"id": 1}),
                Value::Null,
                "op \"u\" requires \"after\" to be an object",
            ),
            (
                "d",
                Value::Null,
                json!({"id": 1}),
                "op \"d\" requires \"before\" to be an object",
            ),
        ];
        for (op, before, after, expected) in cases {
            assert_eq!(
                error_of(&envelope(op, before.clone(), after.clone())),
                expected
            );
            assert_eq!(error_of(&wrapped(envelope(op, before, after))), expected);
        }
    }

    #[test]
    fn event_long_values_are_cut_in_messages() {
        let long_op = "é".repeat(100);
        let message = error_of(&envelope(&long_op, Value::Null, json!({})));
        assert_eq!(
            message,
            format!(
                "op: unknown value \"{}\"…, expected one of c, u, d, r, t",
                "é".repeat(40)
            )
        );
    }

    #[test]
    fn event_decimal_errors() {
        let cases = [
            (
                json!({"total": "not base64!"}),
                "after.total: invalid base64 in Decimal",
            ),
            (
                json!({"total": "+zI"}),
                "after.total: invalid base64 in Decimal",
            ),
            (json!({"total": ""}), "after.total: empty decimal value"),
            (
                json!({"total": true}),
                "after.total: expected a base64 string, got true",
            ),
            (
                json!({"total": [1]}),
                "after.total: expected a base64 string, got an array",
            ),
            (
                json!({"weight": {"scale": 1, "value": "%%"}}),
                "after.weight: invalid base64 in VariableScaleDecimal",
            ),
            (
                json!({"weight": {"value": "AA=="}}),
                "missing field \"after.weight.scale\"",
            ),
            (
                json!({"weight": {"scale": 1}}),
                "missing field \"after.weight.value\"",
            ),
            (
                json!({"weight": {"scale": "1", "value": "AA=="}}),
                "after.weight.scale: expected an integer, got \"1\"",
            ),
            (
                json!({"weight": {"scale": 1.5, "value": "AA=="}}),
                "after.weight.scale: expected an integer, got 1.5",
            ),
            (
                json!({"weight": {"scale": 1, "value": 5}}),
                "after.weight.value: expected a base64 string, got 5",
            ),
            (
                json!({"weight": {"scale": 1_000_000_000, "value": "AQ=="}}),
                "after.weight: decimal scale 1000000000 is outside -16383..=16383",
            ),
            (
                json!({"weight": {"scale": i64::MIN, "value": "AQ=="}}),
                "after.weight: decimal scale -9223372036854775808 is outside -16383..=16383",
            ),
            (
                json!({"weight": true}),
                "after.weight: expected a VariableScaleDecimal object, got true",
            ),
        ];
        for (columns, expected) in cases {
            assert_eq!(
                error_of(&wrapped_insert(columns.clone())),
                expected,
                "{columns}"
            );
        }
        let before_error = error_of(&wrapped(envelope("d", json!({"total": "?"}), Value::Null)));
        assert_eq!(before_error, "before.total: invalid base64 in Decimal");
    }

    #[test]
    fn event_decimal_too_long_is_an_error() {
        let huge = b64(&vec![0x11; super::super::decimal::MAX_UNSCALED_BYTES + 1]);
        assert_eq!(
            error_of(&wrapped_insert(json!({"total": huge}))),
            "after.total: decimal value of 61441 bytes exceeds the limit of 61440"
        );
    }

    #[test]
    fn event_decimal_schema_errors() {
        let bad_scale = |scale: Value| {
            let mut after_schema = orders_row_schema("after");
            after_schema["fields"][1]["parameters"]["scale"] = scale;
            json!({
                "schema": wrapper_schema(orders_row_schema("before"), after_schema),
                "payload": envelope("c", Value::Null, json!({"id": 1})),
            })
        };
        assert_eq!(
            error_of(&bad_scale(Value::Null)),
            "after.total: Decimal schema lacks parameters.scale"
        );
        assert_eq!(
            error_of(&bad_scale(json!("two"))),
            "after.total: Decimal parameters.scale must be an integer, got \"two\""
        );
        assert_eq!(
            error_of(&bad_scale(json!(2.5))),
            "after.total: Decimal parameters.scale must be an integer, got 2.5"
        );
        assert_eq!(
            error_of(&bad_scale(json!([]))),
            "after.total: Decimal parameters.scale must be an integer, got an array"
        );
        // A scale beyond the cap is refused once a value needs it.
        let mut message = bad_scale(json!("1000000000"));
        message["payload"]["after"]["total"] = json!("AQ==");
        assert_eq!(
            error_of(&message),
            "after.total: decimal scale 1000000000 is outside -16383..=16383"
        );

        let mut before_schema = orders_row_schema("before");
        before_schema["fields"] = json!("nope");
        let message = json!({
            "schema": wrapper_schema(before_schema, orders_row_schema("after")),
            "payload": envelope("c", Value::Null, json!({"id": 1})),
        });
        assert_eq!(
            error_of(&message),
            "schema.fields[0].fields: expected an array, got \"nope\""
        );
    }

    #[test]
    fn event_temporal_errors() {
        let cases = [
            (
                json!({"placed_on": 1.5}),
                "after.placed_on: expected a 64-bit integer, got 1.5",
            ),
            (
                json!({"placed_at": u64::MAX}),
                "after.placed_at: expected a 64-bit integer, got 18446744073709551615",
            ),
            (
                json!({"placed_at_ns": false}),
                "after.placed_at_ns: expected an integer, got false",
            ),
            (
                json!({"placed_at_ms": {}}),
                "after.placed_at_ms: expected an integer, got an object",
            ),
        ];
        for (columns, expected) in cases {
            assert_eq!(
                error_of(&wrapped_insert(columns.clone())),
                expected,
                "{columns}"
            );
        }
    }

    #[test]
    fn event_extreme_temporal_values_do_not_fail() {
        let after = decoded_after(json!({"placed_on": i64::MIN, "placed_at": i64::MAX}));
        assert!(after["placed_on"].as_str().unwrap().starts_with('-'));
        assert_eq!(after["placed_at"], json!("+294247-01-10T04:00:54.775807"));
    }

    // --- fuzzing ---

    const KEYS: &[&str] = &[
        "schema",
        "payload",
        "before",
        "after",
        "source",
        "op",
        "ts_ms",
        "table",
        "lsn",
        "commit_lsn",
        "txId",
        "fields",
        "field",
        "name",
        "type",
        "parameters",
        "scale",
        "value",
        "id",
        "total",
        "weight",
        "placed_on",
        "placed_at",
    ];

    const STRINGS: &[&str] = &[
        "",
        "c",
        "u",
        "d",
        "r",
        "t",
        "m",
        "before",
        "after",
        "0/0",
        "16/B374D848",
        "FFFFFFFF/FFFFFFFF",
        "1/100000000",
        "42",
        "-1",
        "18446744073709551616",
        "AA==",
        "+zI=",
        "/wAA",
        "====",
        "%",
        UNCHANGED_TOAST,
        "bytes",
        "string",
        "struct",
        "2",
        "-2",
        "1000000000",
        "16383",
        "-16384",
        "org.apache.kafka.connect.data.Decimal",
        "io.debezium.data.VariableScaleDecimal",
        "io.debezium.time.Date",
        "io.debezium.time.Timestamp",
        "io.debezium.time.MicroTimestamp",
        "io.debezium.time.NanoTimestamp",
        "io.debezium.time.ZonedTimestamp",
    ];

    fn arbitrary_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-100i64..100).prop_map(Value::from),
            any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
                .map(Value::Number)),
            prop::sample::select(STRINGS).prop_map(Value::from),
            ".{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 64, 6, |inner| {
            let key = prop_oneof![
                prop::sample::select(KEYS).prop_map(str::to_owned),
                "[a-z_]{0,6}",
            ];
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((key, inner), 0..6)
                    .prop_map(|entries| Value::Object(entries.into_iter().collect())),
            ]
        })
    }

    fn templates() -> Vec<Value> {
        let full_row = json!({
            "id": 1,
            "total": "+zI=",
            "weight": {"scale": 3, "value": "BNI="},
            "placed_on": -25_509,
            "placed_at_ms": 1_709_214_330_123i64,
            "placed_at": -299_631_476_543_211i64,
            "placed_at_ns": -1,
            "shipped_at": "2024-02-29T13:45:30.123Z",
            "note": UNCHANGED_TOAST,
        });
        vec![
            envelope("c", Value::Null, full_row.clone()),
            envelope("d", full_row.clone(), Value::Null),
            wrapped(envelope("u", full_row.clone(), full_row.clone())),
            wrapped(envelope("r", Value::Null, full_row)),
            wrapped(envelope("t", Value::Null, Value::Null)),
        ]
    }

    /// JSON pointers to every node of `value`.
    fn pointers(value: &Value, at: String, out: &mut Vec<String>) {
        match value {
            Value::Object(members) => {
                for (name, member) in members {
                    let escaped = name.replace('~', "~0").replace('/', "~1");
                    pointers(member, format!("{at}/{escaped}"), out);
                }
            }
            Value::Array(items) => {
                for (index, item) in items.iter().enumerate() {
                    pointers(item, format!("{at}/{index}"), out);
                }
            }
            _ => {}
        }
        out.push(at);
    }

    /// The fuzzer starts from `fuzz/corpus/debezium/seed-*`: they must stay
    /// valid messages, or the fuzzer would start from error paths only.
    #[test]
    fn fuzz_seeds_are_valid_messages() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/debezium");
        let mut seen = 0;
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
            let raw = std::fs::read_to_string(&path).unwrap();
            assert!(
                parse_event(&raw).is_ok(),
                "{}: {:?}",
                path.display(),
                parse_event(&raw)
            );
            seen += 1;
        }
        assert!(seen >= 5, "{seen} seeds");
    }

    fn parse_without_panic(raw: &str) {
        // Any result is fine; the property is that this returns at all.
        let _ = parse_event(raw);
    }

    proptest! {
        #[test]
        fn event_never_panics_on_arbitrary_text(raw in any::<String>()) {
            parse_without_panic(&raw);
        }

        #[test]
        fn event_never_panics_on_json_like_text(raw in r#"[{}\[\]":,0-9a-z \-./+=]{0,80}"#) {
            parse_without_panic(&raw);
        }

        #[test]
        fn event_never_panics_on_arbitrary_json(value in arbitrary_json()) {
            parse_without_panic(&value.to_string());
            parse_without_panic(&json!({"schema": value.clone(), "payload": templates()[2]["payload"]}).to_string());
        }

        #[test]
        fn event_never_panics_on_replaced_nodes(
            template in prop::sample::select(templates()),
            replacements in prop::collection::vec((any::<prop::sample::Index>(), arbitrary_json()), 1..4),
        ) {
            let mut message = template;
            for (index, replacement) in replacements {
                let mut nodes = Vec::new();
                pointers(&message, String::new(), &mut nodes);
                let pointer = index.get(&nodes).clone();
                if let Some(node) = message.pointer_mut(&pointer) {
                    *node = replacement;
                }
            }
            parse_without_panic(&message.to_string());
        }

        #[test]
        fn event_never_panics_on_removed_nodes(
            template in prop::sample::select(templates()),
            removals in prop::collection::vec(any::<prop::sample::Index>(), 1..4),
        ) {
            let mut message = template;
            for index in removals {
                let mut nodes = Vec::new();
                pointers(&message, String::new(), &mut nodes);
                let pointer = index.get(&nodes).clone();
                if let Some((parent, last)) = pointer.rsplit_once('/') {
                    match message.pointer_mut(parent) {
                        Some(Value::Object(members)) => {
                            members.remove(&last.replace("~1", "/").replace("~0", "~"));
                        }
                        Some(Value::Array(items)) => {
                            if let Ok(position) = last.parse::<usize>()
                                && position < items.len()
                            {
                                items.remove(position);
                            }
                        }
                        _ => {}
                    }
                }
            }
            parse_without_panic(&message.to_string());
        }

        #[test]
        fn event_never_panics_on_edited_text(
            template in prop::sample::select(templates()),
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<Option<char>>()), 1..8),
        ) {
            let mut text: Vec<char> = template.to_string().chars().collect();
            for (index, edit) in edits {
                let position = index.index(text.len() + 1);
                match edit {
                    Some(character) => text.insert(position, character),
                    None if position < text.len() => {
                        text.remove(position);
                    }
                    None => {}
                }
            }
            parse_without_panic(&text.into_iter().collect::<String>());
        }

        #[test]
        fn event_wrapped_decimal_matches_direct_conversion(
            bytes in prop::collection::vec(any::<u8>(), 1..40),
            scale in -50i64..50,
        ) {
            let message = wrapped_insert(json!({"weight": {"scale": scale, "value": b64(&bytes)}}));
            let expected = decimal_text(&bytes, scale).unwrap();
            prop_assert_eq!(event(&message).after.unwrap()["weight"].clone(), json!(expected));
        }
    }
}
