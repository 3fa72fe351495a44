//! Turns a parsed change event into row changes the core understands,
//! checking every value the ledger will store against the source column's
//! type, so that a bad value is dead-lettered with a reason that names the
//! field instead of failing a whole batch in the target.

use serde_json::{Number, Value};

use super::core::{Image, RowChange, RowId};
use crate::catalog::{ColumnMeta, TableMeta};
use crate::event::{ChangeEvent, Op, OrderKey, Row, TableName, UNCHANGED_TOAST};
use crate::views::table::ViewTable;

/// What one event means for the ledger.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// Row changes (two for a primary-key update: delete old, upsert new).
    Rows(Vec<RowChange>),
    Truncate(TableName, OrderKey),
}

/// Decodes `event` for `table`, keeping only `stored_columns` of the row.
/// `views` are the views of the table: a reason about a column names the
/// views that read it, so that after a schema change on the source the
/// dead letters say which view definitions no longer fit.
pub fn decode(
    event: &ChangeEvent,
    table: &TableMeta,
    stored_columns: &[String],
    views: &[ViewTable],
) -> Result<Decoded, String> {
    let key = event.key;
    match event.op {
        Op::Truncate => Ok(Decoded::Truncate(table.name.clone(), key)),
        Op::Delete => {
            let before = event.before.as_ref().ok_or("op \"d\" without \"before\"")?;
            let pk = primary_key_text(table, before, "before")?;
            Ok(Decoded::Rows(vec![RowChange {
                id: row_id(table, pk),
                key,
                image: Image::Deleted,
            }]))
        }
        Op::Create | Op::Read | Op::Update => {
            let after = event.after.as_ref().ok_or("event without \"after\"")?;
            let pk = primary_key_text(table, after, "after")?;
            let image = project(table, after, stored_columns, views)?;
            let mut rows = Vec::with_capacity(2);
            // With REPLICA IDENTITY DEFAULT, an update's `before` is set only
            // when the key changed, and then it holds the old key.
            if event.op == Op::Update
                && let Some(before) = &event.before
                && table.primary_key.iter().all(|c| before.contains_key(c))
            {
                let old_pk = primary_key_text(table, before, "before")?;
                if old_pk != pk {
                    rows.push(RowChange {
                        id: row_id(table, old_pk),
                        key,
                        image: Image::Deleted,
                    });
                }
            }
            rows.push(RowChange {
                id: row_id(table, pk),
                key,
                image: Image::Row(image),
            });
            Ok(Decoded::Rows(rows))
        }
    }
}

fn row_id(table: &TableMeta, pk: String) -> RowId {
    RowId {
        table: table.name.clone(),
        pk,
    }
}

/// The canonical text of a row's primary key: a JSON array of the
/// normalised key values in key-column order.
fn primary_key_text(table: &TableMeta, row: &Row, side: &str) -> Result<String, String> {
    let mut values = Vec::with_capacity(table.primary_key.len());
    for column_name in &table.primary_key {
        let value = row.get(column_name).ok_or_else(|| {
            format!("{side}.{column_name}: primary-key column missing from the event")
        })?;
        if value.is_null() {
            return Err(format!("{side}.{column_name}: primary-key column is null"));
        }
        let column = table
            .column(column_name)
            .ok_or_else(|| format!("{side}.{column_name}: not a column of {}", table.name))?;
        let value = normalize(column, value).map_err(|e| format!("{side}.{column_name}: {e}"))?;
        if value.as_str() == Some(UNCHANGED_TOAST) {
            return Err(format!(
                "{side}.{column_name}: primary key cannot be an unchanged TOAST placeholder"
            ));
        }
        values.push(value);
    }
    Ok(Value::Array(values).to_string())
}

/// Keeps the columns the views read, each checked against its type.
fn project(
    table: &TableMeta,
    after: &Row,
    stored_columns: &[String],
    views: &[ViewTable],
) -> Result<Row, String> {
    let mut out = Row::new();
    for name in stored_columns {
        let column = table
            .column(name)
            .ok_or_else(|| format!("after.{name}: column no longer exists in {}", table.name))?;
        let value = after.get(name).ok_or_else(|| {
            format!(
                "after.{name}: column missing from the event, and {} it; \
                 was it dropped or renamed in {}? Change the view to match and restart",
                readers(views, name),
                table.name
            )
        })?;
        let value = normalize(column, value).map_err(|e| {
            format!(
                "after.{name}: {e} ({} it; was its type changed in {}?)",
                readers(views, name),
                table.name
            )
        })?;
        out.insert(name.clone(), value);
    }
    Ok(out)
}

/// `view "a" reads` or `views "a", "b" read`: the views that read `column`.
fn readers(views: &[ViewTable], column: &str) -> String {
    let names: Vec<String> = views
        .iter()
        .filter(|view| view.def.columns_read.contains(column))
        .map(|view| format!("\"{}\"", view.name()))
        .collect();
    match names.len() {
        0 => "a view reads".to_string(),
        1 => format!("view {} reads", names[0]),
        _ => format!("views {} read", names.join(", ")),
    }
}

/// Checks one value against its column type and brings it to the form the
/// target parses back exactly (`jsonb_to_record`).
pub fn normalize(column: &ColumnMeta, value: &Value) -> Result<Value, String> {
    if value.is_null() || value.as_str() == Some(UNCHANGED_TOAST) {
        return Ok(value.clone());
    }
    let type_label = &column.sql_type;
    match column.type_name.as_str() {
        "int2" | "int4" | "int8" => {
            let (min, max) = match column.type_name.as_str() {
                "int2" => (i16::MIN as i64, i16::MAX as i64),
                "int4" => (i32::MIN as i64, i32::MAX as i64),
                _ => (i64::MIN, i64::MAX),
            };
            let parsed = match value {
                Value::Number(n) => n.as_i64(),
                Value::String(s) => s.trim().parse::<i64>().ok(),
                _ => None,
            };
            match parsed {
                Some(n) if n >= min && n <= max => Ok(Value::Number(Number::from(n))),
                Some(_) => Err(format!("{value} is out of range for {type_label}")),
                None if is_integer_text(value) => {
                    Err(format!("{value} is out of range for {type_label}"))
                }
                None => Err(format!("expected an integer ({type_label}), got {value}")),
            }
        }
        "numeric" => {
            let text = match value {
                Value::Number(n) => n.to_string(),
                Value::String(s) => s.trim().to_string(),
                _ => {
                    return Err(format!(
                        "expected a decimal number ({type_label}), got {value}"
                    ));
                }
            };
            check_numeric(&text, column.typmod)
                .map_err(|e| format!("{e} ({type_label}): {value}"))?;
            Ok(Value::String(text))
        }
        "float4" | "float8" => match value {
            Value::Number(_) => Ok(value.clone()),
            Value::String(s)
                if s.trim().parse::<f64>().is_ok()
                    || matches!(s.trim(), "NaN" | "Infinity" | "-Infinity") =>
            {
                Ok(value.clone())
            }
            _ => Err(format!("expected a number ({type_label}), got {value}")),
        },
        "bool" => match value {
            Value::Bool(_) => Ok(value.clone()),
            Value::String(s) => match s.trim() {
                "t" | "true" | "TRUE" | "y" | "yes" | "on" | "1" => Ok(Value::Bool(true)),
                "f" | "false" | "FALSE" | "n" | "no" | "off" | "0" => Ok(Value::Bool(false)),
                _ => Err(format!("expected a boolean, got {value}")),
            },
            _ => Err(format!("expected a boolean, got {value}")),
        },
        "text" | "varchar" | "bpchar" | "name" | "citext" => match value {
            Value::String(s) => {
                if column.typmod > 4 && column.type_name != "text" {
                    let limit = (column.typmod - 4) as usize;
                    if s.chars().count() > limit {
                        return Err(format!(
                            "value of {} characters is too long for {type_label}",
                            s.chars().count()
                        ));
                    }
                }
                Ok(value.clone())
            }
            Value::Number(_) | Value::Bool(_) => Ok(Value::String(value.to_string())),
            _ => Err(format!("expected text ({type_label}), got {value}")),
        },
        "json" | "jsonb" => Ok(value.clone()),
        _ => match value {
            // Dates, timestamps, uuids and the rest travel as text; Postgres
            // parses them (a value it rejects is isolated and dead-lettered).
            Value::String(_) | Value::Number(_) | Value::Bool(_) => Ok(value.clone()),
            _ => Err(format!("expected a scalar ({type_label}), got {value}")),
        },
    }
}

fn is_integer_text(value: &Value) -> bool {
    let text = match value {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim().to_string(),
        _ => return false,
    };
    let digits = text.strip_prefix('-').unwrap_or(&text);
    !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit())
}

/// Checks decimal text against `numeric(precision, scale)` the way Postgres
/// would on input: after rounding to the scale, the integer part may have
/// at most `precision - scale` digits.
fn check_numeric(text: &str, typmod: i32) -> Result<(), String> {
    if matches!(text, "NaN" | "Infinity" | "-Infinity" | "+Infinity") {
        return if typmod >= 4 {
            Err("NaN and Infinity do not fit a constrained numeric".into())
        } else {
            Ok(())
        };
    }
    let unsigned = text.strip_prefix(['-', '+']).unwrap_or(text);
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i64>().map_err(|_| "not a decimal number")?),
        None => (unsigned, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int_part.is_empty() && frac_part.is_empty()
        || !int_part.chars().all(|c| c.is_ascii_digit())
        || !frac_part.chars().all(|c| c.is_ascii_digit())
    {
        return Err("not a decimal number".into());
    }
    if exponent.abs() > 100_000 {
        return Err("numeric field overflow".into());
    }
    if typmod < 4 {
        return Ok(());
    }
    let precision = ((typmod - 4) >> 16) & 0xffff;
    let scale = ((typmod - 4) & 0x7ff) as i64;
    // Decimal digits without the point; the point sits after `point` digits.
    let digits: Vec<u8> = int_part
        .bytes()
        .chain(frac_part.bytes())
        .map(|b| b - b'0')
        .collect();
    let point = int_part.len() as i64 + exponent;
    let Some(first_nonzero) = digits.iter().position(|&d| d != 0) else {
        return Ok(()); // zero fits any numeric
    };
    let max_int_digits = precision as i64 - scale;
    // Integer digits before rounding; rounding can add at most one.
    let int_digits = (point - first_nonzero as i64).max(0);
    if int_digits > max_int_digits + 1 {
        return Err("numeric field overflow".into());
    }
    // Round to `scale` fractional digits: keep the first `keep` digits.
    let keep = point + scale;
    if keep < 0 {
        return Ok(()); // rounds to zero
    }
    let keep = keep as usize;
    let mut kept: Vec<u8> = (0..keep).map(|i| *digits.get(i).unwrap_or(&0)).collect();
    if digits.get(keep).is_some_and(|&d| d >= 5) {
        let mut i = kept.len();
        loop {
            if i == 0 {
                kept.insert(0, 1);
                break;
            }
            i -= 1;
            if kept[i] == 9 {
                kept[i] = 0;
            } else {
                kept[i] += 1;
                break;
            }
        }
    }
    let int_len = kept.len().saturating_sub(scale as usize);
    let rounded_int_digits = kept[..int_len]
        .iter()
        .position(|&d| d != 0)
        .map_or(0, |first| int_len - first);
    if rounded_int_digits as i64 > max_int_digits {
        return Err("numeric field overflow".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn column(type_name: &str, sql_type: &str, typmod: i32) -> ColumnMeta {
        ColumnMeta {
            name: "c".into(),
            sql_type: sql_type.into(),
            type_name: type_name.into(),
            typmod,
        }
    }

    fn numeric(p: i32, s: i32) -> ColumnMeta {
        column("numeric", &format!("numeric({p},{s})"), ((p << 16) | s) + 4)
    }

    #[test]
    fn integers_are_range_checked() {
        let int4 = column("int4", "integer", -1);
        assert_eq!(normalize(&int4, &json!(5)).unwrap(), json!(5));
        assert_eq!(normalize(&int4, &json!("7")).unwrap(), json!(7));
        assert!(
            normalize(&int4, &json!(3_000_000_000i64))
                .unwrap_err()
                .contains("out of range")
        );
        assert!(
            normalize(&int4, &json!("abc"))
                .unwrap_err()
                .contains("expected an integer")
        );
        assert!(normalize(&int4, &json!(1.5)).is_err());
        let int8 = column("int8", "bigint", -1);
        assert!(
            normalize(&int8, &json!("99999999999999999999"))
                .unwrap_err()
                .contains("out of range")
        );
    }

    #[test]
    fn numerics_respect_precision_and_scale() {
        let n = numeric(20, 2);
        assert_eq!(normalize(&n, &json!("20.50")).unwrap(), json!("20.50"));
        assert_eq!(normalize(&n, &json!(12)).unwrap(), json!("12"));
        assert!(normalize(&n, &json!("999999999999999999.99")).is_ok());
        assert!(
            normalize(&n, &json!("1000000000000000000"))
                .unwrap_err()
                .contains("overflow")
        );
        assert!(
            normalize(&n, &json!("1e30"))
                .unwrap_err()
                .contains("overflow")
        );
        assert!(
            normalize(&n, &json!("999999999999999999.995"))
                .unwrap_err()
                .contains("overflow")
        );
        assert!(normalize(&n, &json!("0.001")).is_ok());
        assert!(
            normalize(&n, &json!("twelve"))
                .unwrap_err()
                .contains("not a decimal")
        );
        assert!(normalize(&n, &json!(true)).is_err());
        let unconstrained = column("numeric", "numeric", -1);
        assert!(normalize(&unconstrained, &json!("1e300")).is_ok());
        assert!(normalize(&numeric(3, 0), &json!("999.4")).is_ok());
        assert!(normalize(&numeric(3, 0), &json!("999.5")).is_err());
    }

    #[test]
    fn text_length_is_checked() {
        let v = column("varchar", "character varying(3)", 7);
        assert!(normalize(&v, &json!("abc")).is_ok());
        assert!(
            normalize(&v, &json!("abcd"))
                .unwrap_err()
                .contains("too long")
        );
    }

    /// The invoices table of `bad_input_e2e` with two views on it, as the
    /// model loaded it at start-up.
    fn invoices_with_views() -> (TableMeta, Vec<String>, Vec<ViewTable>) {
        let table = TableMeta {
            name: TableName::public("invoices"),
            columns: vec![
                ColumnMeta {
                    name: "id".into(),
                    ..column("int4", "integer", -1)
                },
                ColumnMeta {
                    name: "total".into(),
                    ..numeric(8, 2)
                },
                ColumnMeta {
                    name: "qty".into(),
                    ..column("int4", "integer", -1)
                },
            ],
            primary_key: vec!["id".into()],
        };
        let views = crate::views::parse_views(
            "CREATE MATERIALIZED VIEW totals AS SELECT SUM(total) AS t FROM invoices;
             CREATE MATERIALIZED VIEW big AS SELECT COUNT(*) FILTER (WHERE total > 100) AS n,
                 SUM(qty) AS q FROM invoices;",
        )
        .unwrap()
        .into_iter()
        .map(|def| ViewTable {
            def,
            group_types: vec![],
            sum_types: vec![],
            final_types: vec![],
            output_types: vec![],
            row_columns: vec![],
        })
        .collect();
        let stored = vec!["id".into(), "qty".into(), "total".into()];
        (table, stored, views)
    }

    fn insert(after: Value) -> ChangeEvent {
        ChangeEvent {
            op: Op::Create,
            table: TableName::public("invoices"),
            before: None,
            after: Some(after.as_object().unwrap().clone()),
            key: OrderKey::new(10, 10),
            tx_id: None,
            ts_ms: None,
        }
    }

    #[test]
    fn a_dropped_column_names_the_views_that_read_it() {
        let (table, stored, views) = invoices_with_views();
        let reason =
            decode(&insert(json!({"id": 1, "qty": 2})), &table, &stored, &views).unwrap_err();
        assert!(
            reason.starts_with("after.total: column missing"),
            "{reason}"
        );
        assert!(
            reason.contains(r#"views "totals", "big" read it"#),
            "{reason}"
        );
        assert!(
            reason.contains("dropped or renamed in public.invoices"),
            "{reason}"
        );
        let reason = decode(
            &insert(json!({"id": 1, "total": "1"})),
            &table,
            &stored,
            &views,
        )
        .unwrap_err();
        assert!(reason.contains(r#"view "big" reads it"#), "{reason}");
    }

    #[test]
    fn a_retyped_column_names_the_views_that_read_it() {
        let (table, stored, views) = invoices_with_views();
        let event = insert(json!({"id": 1, "qty": "many", "total": "1.00"}));
        let reason = decode(&event, &table, &stored, &views).unwrap_err();
        assert!(
            reason.contains("after.qty: expected an integer"),
            "{reason}"
        );
        assert!(reason.contains(r#"view "big" reads it"#), "{reason}");
        assert!(
            reason.contains("type changed in public.invoices"),
            "{reason}"
        );
        // An added column nobody reads is ignored.
        let event = insert(json!({"id": 1, "qty": 1, "total": "1.00", "new": [1]}));
        assert!(decode(&event, &table, &stored, &views).is_ok());
    }

    #[test]
    fn placeholders_and_nulls_pass() {
        let n = numeric(5, 2);
        assert_eq!(normalize(&n, &Value::Null).unwrap(), Value::Null);
        assert_eq!(
            normalize(&n, &json!(UNCHANGED_TOAST)).unwrap(),
            json!(UNCHANGED_TOAST)
        );
    }
}
