//! The target table that holds one view, and the SQL that keeps it.
//!
//! A view table has the view's visible columns (group columns, then each
//! measure as a generated column), plus hidden running state per aggregate
//! (`_tally_a{i}`, and `_tally_a{i}_n`, the count of non-null inputs, for
//! `SUM` and `AVG`) and `_tally_rows`, the number of source rows in the
//! group. Keeping state and deriving the visible value lets `SUM` be NULL
//! over no values, `AVG` be exact, and ratios like `done / total` be kept.

use thiserror::Error;
use tokio_postgres::Client;
use tokio_postgres::types::Oid;

use super::{AggKind, OutputSource, ViewDef};
use crate::catalog::TableMeta;
use crate::event::quote_ident;

#[derive(Debug, Error)]
pub enum ViewTableError {
    #[error("view \"{view}\": Postgres rejects its query on the source: {message}")]
    Probe { view: String, message: String },
    #[error("view \"{view}\": reads column \"{column}\", which table {table} does not have")]
    NoSuchColumn {
        view: String,
        column: String,
        table: String,
    },
    #[error("reading view types from the source: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// Name of the hidden column counting a group's source rows.
pub const ROWS_COLUMN: &str = "_tally_rows";
/// Name of the hidden column holding a digest of the group key.
const KEY_COLUMN: &str = "_tally_key";
/// Name of the key column of a view without `GROUP BY` (one row, always).
const SINGLE_ROW_COLUMN: &str = "_tally_one";

/// A view with everything needed to create and maintain its table.
#[derive(Debug, Clone)]
pub struct ViewTable {
    pub def: ViewDef,
    /// SQL type of each group expression, in `GROUP BY` order.
    pub group_types: Vec<String>,
    /// SQL type of each aggregate's running sum (`SUM`, `AVG`), else `None`.
    pub sum_types: Vec<Option<String>>,
    /// SQL type of each aggregate's final value (used for `AVG`'s division).
    pub final_types: Vec<String>,
    /// SQL type of each output column.
    pub output_types: Vec<String>,
    /// The source columns the view reads, with their source SQL types.
    pub row_columns: Vec<(String, String)>,
}

const FORMAT_TYPES_SQL: &str = "
SELECT CASE WHEN t.typnamespace = 'pg_catalog'::regnamespace
            THEN format_type(t.oid, NULL) ELSE 'text' END
FROM unnest($1::oid[]) WITH ORDINALITY AS u(type_oid, position)
JOIN pg_type t ON t.oid = u.type_oid
ORDER BY u.position";

impl ViewTable {
    /// Learns the view's column types by preparing (not running) its query
    /// on the source, where the table lives.
    pub async fn probe(
        source: &Client,
        def: ViewDef,
        table: &TableMeta,
    ) -> Result<ViewTable, ViewTableError> {
        let mut row_columns = Vec::new();
        for column in &def.columns_read {
            let meta = table
                .column(column)
                .ok_or_else(|| ViewTableError::NoSuchColumn {
                    view: def.name.clone(),
                    column: column.clone(),
                    table: table.name.to_string(),
                })?;
            row_columns.push((meta.name.clone(), meta.sql_type.clone()));
        }
        let probe_error = |err: tokio_postgres::Error| ViewTableError::Probe {
            view: def.name.clone(),
            message: err
                .as_db_error()
                .map(|db| db.message().to_string())
                .unwrap_or_else(|| err.to_string()),
        };
        let outputs = source.prepare(&def.select_sql).await.map_err(probe_error)?;
        let output_oids: Vec<Oid> = outputs.columns().iter().map(|c| c.type_().oid()).collect();

        // One statement that yields every group expression, then each
        // aggregate's running-sum type and final type.
        let mut items: Vec<String> = def.groups.iter().map(|g| format!("({})", g.expr)).collect();
        for aggregate in &def.aggregates {
            let arg = aggregate.arg.as_deref().unwrap_or("*");
            match aggregate.kind {
                AggKind::Sum | AggKind::Avg => {
                    items.push(format!("SUM({arg})"));
                    let function = if aggregate.kind == AggKind::Avg {
                        "AVG"
                    } else {
                        "SUM"
                    };
                    items.push(format!("{function}({arg})"));
                }
                AggKind::Count | AggKind::CountStar => items.push(format!("COUNT({arg})")),
            }
        }
        let mut probe_sql = format!("SELECT {} FROM {}", items.join(", "), def.source.quoted());
        if !def.groups.is_empty() {
            let positions: Vec<String> = (1..=def.groups.len()).map(|i| i.to_string()).collect();
            probe_sql.push_str(&format!(" GROUP BY {}", positions.join(", ")));
        }
        let probe = source.prepare(&probe_sql).await.map_err(probe_error)?;
        let probe_oids: Vec<Oid> = probe.columns().iter().map(|c| c.type_().oid()).collect();

        let names = |oids: Vec<Oid>| async move {
            let rows = source.query(FORMAT_TYPES_SQL, &[&oids]).await?;
            Ok::<Vec<String>, tokio_postgres::Error>(rows.iter().map(|r| r.get(0)).collect())
        };
        let output_types = names(output_oids).await?;
        let probe_types = names(probe_oids).await?;
        let mut next = probe_types.into_iter();
        let group_types: Vec<String> = next.by_ref().take(def.groups.len()).collect();
        let mut sum_types = Vec::new();
        let mut final_types = Vec::new();
        for aggregate in &def.aggregates {
            match aggregate.kind {
                AggKind::Sum | AggKind::Avg => {
                    sum_types.push(next.next());
                    final_types.push(next.next().unwrap_or_default());
                }
                AggKind::Count | AggKind::CountStar => {
                    sum_types.push(None);
                    final_types.push(next.next().unwrap_or_default());
                }
            }
        }
        Ok(ViewTable {
            def,
            group_types,
            sum_types,
            final_types,
            output_types,
            row_columns,
        })
    }

    pub fn name(&self) -> &str {
        &self.def.name
    }

    pub fn quoted_name(&self) -> String {
        quote_ident(&self.def.name)
    }

    fn grouped(&self) -> bool {
        !self.def.groups.is_empty()
    }

    fn state_column(index: usize) -> String {
        quote_ident(&format!("_tally_a{index}"))
    }

    fn count_column(index: usize) -> String {
        quote_ident(&format!("_tally_a{index}_n"))
    }

    fn group_columns(&self) -> Vec<String> {
        self.def
            .groups
            .iter()
            .map(|g| quote_ident(&g.column))
            .collect()
    }

    /// The state columns an aggregate keeps, in table order.
    fn state_columns(&self) -> Vec<String> {
        let mut columns = Vec::new();
        for (i, aggregate) in self.def.aggregates.iter().enumerate() {
            columns.push(Self::state_column(i));
            if matches!(aggregate.kind, AggKind::Sum | AggKind::Avg) {
                columns.push(Self::count_column(i));
            }
        }
        columns
    }

    /// An aggregate's value computed from its state columns, as SQL.
    fn final_value(&self, index: usize) -> String {
        let state = Self::state_column(index);
        let count = Self::count_column(index);
        let value = match self.def.aggregates[index].kind {
            AggKind::Count | AggKind::CountStar => state,
            AggKind::Sum => format!("CASE WHEN {count} = 0 THEN NULL ELSE {state} END"),
            AggKind::Avg => {
                let avg_type = &self.final_types[index];
                if avg_type == "interval" {
                    format!("CASE WHEN {count} = 0 THEN NULL ELSE {state} / {count} END")
                } else {
                    format!(
                        "CASE WHEN {count} = 0 THEN NULL ELSE ({state})::{avg_type} / ({count})::{avg_type} END"
                    )
                }
            }
        };
        if self.grouped() {
            // A group at zero rows is deleted in the same transaction; NULL
            // keeps expressions like `x / COUNT(*)` from dividing by zero.
            format!(
                "CASE WHEN {} = 0 THEN NULL ELSE {value} END",
                quote_ident(ROWS_COLUMN)
            )
        } else {
            value
        }
    }

    /// `CREATE TABLE` and its indexes, idempotent.
    pub fn create_sql(&self) -> Vec<String> {
        let mut columns: Vec<String> = Vec::new();
        let mut placed_groups = vec![false; self.def.groups.len()];
        for (output, output_type) in self.def.outputs.iter().zip(&self.output_types) {
            match &output.source {
                OutputSource::Group(i)
                    if !placed_groups[*i] && self.def.groups[*i].column == output.name =>
                {
                    placed_groups[*i] = true;
                    columns.push(format!(
                        "{} {}",
                        quote_ident(&output.name),
                        self.group_types[*i]
                    ));
                }
                OutputSource::Group(i) => columns.push(format!(
                    "{} {output_type} GENERATED ALWAYS AS ({}) STORED",
                    quote_ident(&output.name),
                    quote_ident(&self.def.groups[*i].column)
                )),
                OutputSource::Measure(measure) => columns.push(format!(
                    "{} {output_type} GENERATED ALWAYS AS ({}) STORED",
                    quote_ident(&output.name),
                    measure.render(&|i| self.final_value(i))
                )),
            }
        }
        for (i, group) in self.def.groups.iter().enumerate() {
            if !placed_groups[i] {
                columns.push(format!(
                    "{} {}",
                    quote_ident(&group.column),
                    self.group_types[i]
                ));
            }
        }
        if self.grouped() {
            columns.push(format!("{} uuid NOT NULL", quote_ident(KEY_COLUMN)));
        } else {
            columns.push(format!(
                "{} boolean PRIMARY KEY DEFAULT true CHECK ({})",
                quote_ident(SINGLE_ROW_COLUMN),
                quote_ident(SINGLE_ROW_COLUMN)
            ));
        }
        columns.push(format!(
            "{} bigint NOT NULL DEFAULT 0",
            quote_ident(ROWS_COLUMN)
        ));
        for (i, aggregate) in self.def.aggregates.iter().enumerate() {
            match aggregate.kind {
                AggKind::Count | AggKind::CountStar => columns.push(format!(
                    "{} bigint NOT NULL DEFAULT 0",
                    Self::state_column(i)
                )),
                AggKind::Sum | AggKind::Avg => {
                    let sum_type = self.sum_types[i].as_deref().unwrap_or("numeric");
                    columns.push(format!("{} {sum_type}", Self::state_column(i)));
                    columns.push(format!(
                        "{} bigint NOT NULL DEFAULT 0",
                        Self::count_column(i)
                    ));
                }
            }
        }
        let table = self.quoted_name();
        let mut statements = vec![format!(
            "CREATE TABLE IF NOT EXISTS {table} (\n  {}\n)",
            columns.join(",\n  ")
        )];
        if self.grouped() {
            statements.push(format!(
                "CREATE UNIQUE INDEX IF NOT EXISTS {} ON {table} ({})",
                quote_ident(&format!("{}_group_key", self.def.name)),
                quote_ident(KEY_COLUMN)
            ));
            statements.extend(self.lookup_indexes());
            statements.push(format!(
                "CREATE INDEX IF NOT EXISTS {} ON {table} ({}) WHERE {} = 0",
                quote_ident(&format!("{}_empty_groups", self.def.name)),
                quote_ident(ROWS_COLUMN),
                quote_ident(ROWS_COLUMN)
            ));
        } else {
            statements.push(format!(
                "INSERT INTO {table} ({}) VALUES (true) ON CONFLICT DO NOTHING",
                quote_ident(SINGLE_ROW_COLUMN)
            ));
        }
        statements
    }

    /// Indexes for users reading a group with plain SQL. A B-tree serves
    /// equality and ranges, but cannot hold values over ~2.7 kB; where a
    /// group column's type is unbounded (text, arrays, JSON), each such
    /// column gets a hash index (equality only, any size) instead.
    fn lookup_indexes(&self) -> Vec<String> {
        let table = self.quoted_name();
        let unbounded = |sql_type: &str| {
            sql_type.ends_with("[]")
                || [
                    "text",
                    "character varying",
                    "bytea",
                    "json",
                    "jsonb",
                    "xml",
                    "citext",
                ]
                .iter()
                .any(|t| sql_type.starts_with(t))
        };
        let (wide, narrow): (Vec<_>, Vec<_>) = self
            .def
            .groups
            .iter()
            .zip(&self.group_types)
            .partition(|(_, sql_type)| unbounded(sql_type));
        let mut statements = Vec::new();
        if !narrow.is_empty() {
            let columns: Vec<String> = narrow.iter().map(|(g, _)| quote_ident(&g.column)).collect();
            statements.push(format!(
                "CREATE INDEX IF NOT EXISTS {} ON {table} ({})",
                quote_ident(&format!("{}_lookup", self.def.name)),
                columns.join(", ")
            ));
        }
        for (group, _) in wide {
            statements.push(format!(
                "CREATE INDEX IF NOT EXISTS {} ON {table} USING hash ({})",
                quote_ident(&format!("{}_lookup_{}", self.def.name, group.column)),
                quote_ident(&group.column)
            ));
        }
        statements
    }

    /// The group key's digest: equal for groups `GROUP BY` puts together
    /// (numerics compared without trailing zeros), and of fixed size, so
    /// group values of any length can be unique-indexed. Needs the session
    /// settings `db::connect` pins, as text output depends on them.
    fn key_expression(&self) -> String {
        let parts: Vec<String> = self
            .group_types
            .iter()
            .enumerate()
            .map(|(i, sql_type)| {
                if sql_type == "numeric" {
                    format!("trim_scale(_tally_k{i})")
                } else {
                    format!("_tally_k{i}")
                }
            })
            .collect();
        format!("md5(ROW({}, NULL)::text)::uuid", parts.join(", "))
    }

    /// The `AS r(col type, …)` list that turns a stored row (jsonb) back into
    /// typed columns, so the view's expressions see what the source had.
    fn record_definition(&self) -> String {
        if self.row_columns.is_empty() {
            return "\"_tally_unused\" int".into();
        }
        self.row_columns
            .iter()
            .map(|(name, sql_type)| format!("{} {sql_type}", quote_ident(name)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The per-aggregate delta expressions over `contrib` rows that carry
    /// `_tally_sign` (-1 for an old version, +1 for a new one).
    fn delta_items(&self) -> Vec<String> {
        let mut items = vec![format!(
            "SUM(_tally_sign)::bigint AS {}",
            quote_ident(ROWS_COLUMN)
        )];
        for (i, aggregate) in self.def.aggregates.iter().enumerate() {
            let filter = aggregate.filter.as_ref().map(|f| format!("({f})"));
            let counted = match (&filter, &aggregate.arg) {
                (Some(f), Some(arg)) => format!("{f} AND ({arg}) IS NOT NULL"),
                (Some(f), None) => f.clone(),
                (None, Some(arg)) => format!("({arg}) IS NOT NULL"),
                (None, None) => "true".into(),
            };
            let count = format!("SUM(CASE WHEN {counted} THEN _tally_sign ELSE 0 END)::bigint");
            match aggregate.kind {
                AggKind::Count | AggKind::CountStar => {
                    items.push(format!("{count} AS {}", Self::state_column(i)))
                }
                AggKind::Sum | AggKind::Avg => {
                    let arg = aggregate.arg.as_deref().unwrap_or("NULL");
                    items.push(format!(
                        "SUM(CASE WHEN {counted} THEN _tally_sign * ({arg}) END) AS {}",
                        Self::state_column(i)
                    ));
                    items.push(format!("{count} AS {}", Self::count_column(i)));
                }
            }
        }
        items
    }

    /// The `FROM … WHERE …` that turns version pairs into signed contributions.
    fn contributions_from(&self, pairs: &str) -> String {
        let record = self.record_definition();
        let filter = self
            .def
            .filter
            .as_ref()
            .map(|f| format!(" WHERE ({f})"))
            .unwrap_or_default();
        format!(
            "(SELECT -1 AS _tally_sign, r.* FROM {pairs}, jsonb_to_record(_tally_pairs._tally_old) AS r({record}) WHERE _tally_pairs._tally_old IS NOT NULL
  UNION ALL
  SELECT 1, r.* FROM {pairs}, jsonb_to_record(_tally_pairs._tally_new) AS r({record}) WHERE _tally_pairs._tally_new IS NOT NULL) AS _tally_contrib{filter}"
        )
    }

    /// Applies a batch's changes to the view. `$1` holds the old versions,
    /// `$2` the new versions (jsonb, NULL for none), pairwise. Group rows
    /// are written in group-key order so parallel appliers do not deadlock.
    pub fn delta_sql(&self) -> String {
        self.upsert_sql("unnest($1::jsonb[], $2::jsonb[]) AS _tally_pairs(_tally_old, _tally_new)")
    }

    /// Builds the view from every live ledger row of its table (`$1` = the
    /// table's ledger name). Used when a view is created on a running system.
    pub fn rebuild_sql(&self) -> String {
        self.upsert_sql(
            "(SELECT NULL::jsonb AS _tally_old, cols AS _tally_new FROM tally.ledger WHERE tbl = $1 AND NOT deleted) AS _tally_pairs",
        )
    }

    fn upsert_sql(&self, pairs: &str) -> String {
        let groups: Vec<String> = self
            .def
            .groups
            .iter()
            .enumerate()
            .map(|(i, g)| format!("({}) AS _tally_k{i}", g.expr))
            .collect();
        let mut select_items = groups.clone();
        select_items.extend(self.delta_items());
        let group_by = if self.grouped() {
            let positions: Vec<String> = (1..=groups.len()).map(|i| i.to_string()).collect();
            format!(" GROUP BY {}", positions.join(", "))
        } else {
            String::new()
        };
        // Rows are written in key order, so parallel appliers lock group
        // rows in the same order and do not deadlock.
        let (leading, order_by) = if self.grouped() {
            (
                format!("{} AS _tally_key, ", self.key_expression()),
                " ORDER BY 1",
            )
        } else {
            ("true, ".to_string(), "")
        };
        let mut insert_columns = if self.grouped() {
            vec![quote_ident(KEY_COLUMN)]
        } else {
            vec![quote_ident(SINGLE_ROW_COLUMN)]
        };
        insert_columns.extend(self.group_columns());
        insert_columns.push(quote_ident(ROWS_COLUMN));
        insert_columns.extend(self.state_columns());
        let conflict_target = if self.grouped() {
            quote_ident(KEY_COLUMN)
        } else {
            quote_ident(SINGLE_ROW_COLUMN)
        };
        let mut updates = vec![format!(
            "{rows} = v.{rows} + EXCLUDED.{rows}",
            rows = quote_ident(ROWS_COLUMN)
        )];
        for (i, aggregate) in self.def.aggregates.iter().enumerate() {
            let state = Self::state_column(i);
            match aggregate.kind {
                AggKind::Count | AggKind::CountStar => {
                    updates.push(format!("{state} = v.{state} + EXCLUDED.{state}"))
                }
                AggKind::Sum | AggKind::Avg => {
                    updates.push(format!(
                        "{state} = COALESCE(v.{state} + EXCLUDED.{state}, v.{state}, EXCLUDED.{state})"
                    ));
                    let count = Self::count_column(i);
                    updates.push(format!("{count} = v.{count} + EXCLUDED.{count}"));
                }
            }
        }
        format!(
            "INSERT INTO {table} AS v ({columns})
SELECT {leading}* FROM (
  SELECT {items}
  FROM {contributions}{group_by}
  HAVING COUNT(*) > 0
) AS _tally_delta{order_by}
ON CONFLICT ({conflict_target}) DO UPDATE SET {updates}",
            table = self.quoted_name(),
            columns = insert_columns.join(", "),
            items = select_items.join(", "),
            contributions = self.contributions_from(pairs),
            updates = updates.join(", "),
        )
    }

    /// Removes groups left without rows; `None` for a view without groups,
    /// whose single row always exists (as `SELECT SUM(x) FROM t` always
    /// returns a row).
    pub fn delete_empty_sql(&self) -> Option<String> {
        self.grouped().then(|| {
            format!(
                "DELETE FROM {} WHERE {} = 0",
                self.quoted_name(),
                quote_ident(ROWS_COLUMN)
            )
        })
    }

    /// Run on the source: every row the view must hold, as the text of one
    /// jsonb array (text, so numbers stay exact on their way to the target).
    pub fn expected_rows_sql(&self) -> String {
        format!(
            "SELECT COALESCE(jsonb_agg(to_jsonb(_tally_expected)), '[]'::jsonb)::text FROM ({}) AS _tally_expected",
            self.def.select_sql
        )
    }

    /// Run on the target with `$1` = the expected rows: one row per
    /// difference, as (group key, expected row, found row) in jsonb, NULL
    /// where a side has no such row.
    pub fn compare_sql(&self) -> String {
        let columns: Vec<String> = self
            .def
            .outputs
            .iter()
            .zip(&self.output_types)
            .map(|(o, t)| format!("{} {t}", quote_ident(&o.name)))
            .collect();
        let names: Vec<String> = self
            .def
            .outputs
            .iter()
            .map(|o| quote_ident(&o.name))
            .collect();
        // Rows match on the group key when it is visible; otherwise the two
        // sides are compared as multisets of whole rows. Keys are jsonb so
        // NULL groups match and the join can hash.
        let key_columns: Vec<String> = if self.def.groups.iter().all(|g| g.visible) {
            self.def
                .outputs
                .iter()
                .filter(|o| matches!(o.source, OutputSource::Group(_)))
                .map(|o| quote_ident(&o.name))
                .collect()
        } else {
            names.clone()
        };
        let key = key_columns
            .iter()
            .map(|c| format!("s.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let keyed = |source: &str| {
            format!(
                "(SELECT s.*, jsonb_build_array({key}) AS _tally_key, row_number() OVER (PARTITION BY jsonb_build_array({key})) AS _tally_n FROM {source} s)"
            )
        };
        let key_json: Vec<String> = key_columns
            .iter()
            .map(|c| {
                format!(
                    "{}, COALESCE(to_jsonb(e.{c}), to_jsonb(f.{c}))",
                    sql_string(c)
                )
            })
            .collect();
        let row_json = |side: &str| {
            names
                .iter()
                .map(|c| format!("{}, to_jsonb({side}.{c})", sql_string(c)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let differs: Vec<String> = names
            .iter()
            .map(|c| format!("e.{c} IS DISTINCT FROM f.{c}"))
            .collect();
        format!(
            "WITH expected AS (SELECT true AS _tally_present, * FROM jsonb_to_recordset($1::text::jsonb) AS x({columns})),
found AS (SELECT true AS _tally_present, {names} FROM {table})
SELECT jsonb_build_object({key_json}),
       CASE WHEN e._tally_present THEN jsonb_build_object({expected_json}) END,
       CASE WHEN f._tally_present THEN jsonb_build_object({found_json}) END,
       to_jsonb(array_remove(ARRAY[{which}]::text[], NULL))
FROM {expected_side} e FULL JOIN {found_side} f
  ON e._tally_key = f._tally_key AND e._tally_n = f._tally_n
WHERE e._tally_present IS NULL OR f._tally_present IS NULL OR {differs}
ORDER BY 1",
            columns = columns.join(", "),
            names = names.join(", "),
            table = self.quoted_name(),
            key_json = key_json.join(", "),
            expected_json = row_json("e"),
            found_json = row_json("f"),
            expected_side = keyed("expected"),
            found_side = keyed("found"),
            which = names
                .iter()
                .map(|c| format!("CASE WHEN e.{c} IS DISTINCT FROM f.{c} THEN {} END", sql_string(c)))
                .collect::<Vec<_>>()
                .join(", "),
            differs = if differs.is_empty() { "false".to_string() } else { differs.join(" OR ") },
        )
    }
}

/// The name inside a quoted identifier, as an SQL string literal.
fn sql_string(quoted_identifier: &str) -> String {
    let name = quoted_identifier
        .strip_prefix('"')
        .and_then(|n| n.strip_suffix('"'))
        .unwrap_or(quoted_identifier)
        .replace("\"\"", "\"");
    format!("'{}'", name.replace('\'', "''"))
}
