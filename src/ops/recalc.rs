//! `tally recalc`: rebuilds view tables from the ledger, one view per
//! transaction, while appliers keep running.
//!
//! Locking: every apply batch takes its tables' watermark rows `FOR SHARE`
//! before it touches the ledger or any view, and holds them until commit.
//! The rebuild takes the view's table's watermark row `FOR UPDATE`: it waits
//! for the batches of that table in flight, and new ones wait for it. From
//! then on (READ COMMITTED takes a fresh snapshot per statement) the ledger
//! of that table is still, and the view is emptied and recomputed from its
//! live rows, then committed at once: readers see the old table or the new
//! one, never a half-built one. Only one watermark row is locked, so no
//! lock cycle can form with batches that lock several tables in order.
//!
//! `verify` runs the same rebuild and rolls it back, which compares a view
//! with its ledger exactly even under load.

use thiserror::Error;
use tokio_postgres::Client;

use super::verify::Difference;
use crate::apply::{Model, schema, store};
use crate::db::describe;
use crate::event::{TableName, quote_ident};
use crate::views::table::ViewTable;

#[derive(Debug, Error)]
pub enum RecalcError {
    #[error("no view named \"{0}\" in the views file; views: {1}")]
    UnknownView(String, String),
    #[error("view \"{view}\": rebuilding from the ledger failed: {message}")]
    Target { view: String, message: String },
}

/// What one rebuild found and did.
#[derive(Debug, Clone, PartialEq)]
pub struct Rebuilt {
    pub view: String,
    /// Rows of the view table after the rebuild.
    pub rows: i64,
    /// Rows the rebuild changed: the table's drift from its ledger.
    pub differences: Vec<Difference>,
}

/// Rebuilds `view` (of `table`) from the ledger and returns how it differed.
/// Commits when `commit`, else rolls back (a pure comparison).
pub async fn rebuild_view(
    target: &mut Client,
    view: &ViewTable,
    table: &TableName,
    commit: bool,
) -> Result<Rebuilt, RecalcError> {
    let failed = |err: tokio_postgres::Error| RecalcError::Target {
        view: view.name().to_string(),
        message: describe(&err),
    };
    let table_text = table.to_string();
    let names: Vec<String> = view
        .def
        .outputs
        .iter()
        .map(|o| quote_ident(&o.name))
        .collect();
    let current_rows = format!(
        "SELECT COALESCE(jsonb_agg(to_jsonb(_tally_found)), '[]'::jsonb)::text FROM (SELECT {} FROM {}) AS _tally_found",
        names.join(", "),
        view.quoted_name()
    );
    let tx = target.transaction().await.map_err(failed)?;
    tx.execute(schema::ENSURE_WATERMARK, &[&table_text])
        .await
        .map_err(failed)?;
    tx.query_opt(store::LOCK_WATERMARK_EXCLUSIVE, &[&table_text])
        .await
        .map_err(failed)?;
    let before: String = tx
        .query_one(&current_rows, &[])
        .await
        .map_err(failed)?
        .get(0);
    tx.batch_execute(&format!("DELETE FROM {}", view.quoted_name()))
        .await
        .map_err(failed)?;
    for statement in view.create_sql() {
        tx.batch_execute(&statement).await.map_err(failed)?;
    }
    tx.execute(&view.rebuild_sql(), &[&table_text])
        .await
        .map_err(failed)?;
    if let Some(delete) = view.delete_empty_sql() {
        tx.execute(&delete, &[]).await.map_err(failed)?;
    }
    // compare_sql's "expected" side is its parameter: here the old rows, so
    // "found" is the rebuilt table; swapped back below.
    let compared = tx
        .query(&view.compare_sql(), &[&before])
        .await
        .map_err(failed)?;
    let differences = compared
        .into_iter()
        .map(|row| Difference {
            view: view.name().to_string(),
            key: row.get(0),
            expected: row.get(2),
            found: row.get(1),
            columns: serde_json::from_value(row.get(3)).unwrap_or_default(),
        })
        .collect();
    let rows: i64 = tx
        .query_one(&format!("SELECT count(*) FROM {}", view.quoted_name()), &[])
        .await
        .map_err(failed)?
        .get(0);
    if commit {
        tx.commit().await.map_err(failed)?;
    } else {
        tx.rollback().await.map_err(failed)?;
    }
    Ok(Rebuilt {
        view: view.name().to_string(),
        rows,
        differences,
    })
}

/// Rebuilds every view, or only `only`, from the ledger.
pub async fn recalc(
    target: &mut Client,
    model: &Model,
    only: Option<&str>,
) -> Result<Vec<Rebuilt>, RecalcError> {
    if let Some(name) = only
        && !model.views().any(|v| v.name() == name)
    {
        let known: Vec<&str> = model.views().map(|v| v.name()).collect();
        return Err(RecalcError::UnknownView(name.to_string(), known.join(", ")));
    }
    let mut out = Vec::new();
    for (table, table_model) in &model.tables {
        for view in &table_model.views {
            if only.is_some_and(|name| name != view.name()) {
                continue;
            }
            let rebuilt = rebuild_view(target, view, table, true).await?;
            tracing::info!(
                "view \"{}\" rebuilt from the ledger: {} rows, {} changed",
                rebuilt.view,
                rebuilt.rows,
                rebuilt.differences.len()
            );
            out.push(rebuilt);
        }
    }
    Ok(out)
}
