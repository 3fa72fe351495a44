//! Changing views on a live system.
//!
//! At start, `Model::ensure_target_schema` compares each view with the
//! definition its table was built for (`tally.views`): a new view's table
//! is created and built from the ledger, a changed one is dropped and
//! rebuilt from the ledger, a dropped one is reported and left alone. That
//! is exact when the ledger rows hold every column the view reads.
//!
//! When the views now read a column the ledger does not hold
//! (`tally.ledger_columns` records what it holds), the rows already in the
//! ledger lack it. [`backfill`] then replays the table's current rows
//! (key `(C, 0)` from a temporary slot's snapshot, see `ops::snapshot`)
//! straight into the target: every row whose ledger version is older than
//! the snapshot gets its full image, rows changed since are newer and keep
//! theirs. Each view of the table is then rebuilt from the ledger, and the
//! columns are recorded, so the next start does nothing.

use std::sync::Arc;

use thiserror::Error;
use tokio_postgres::Client;

use super::bootstrap::RowOp;
use super::recalc::{RecalcError, rebuild_view};
use super::replay::{DirectApply, ReplayError, replay};
use crate::apply::{ApplyError, Model, schema};
use crate::db::describe;

#[derive(Debug, Error)]
pub enum LiveViewsError {
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error(transparent)]
    Recalc(#[from] RecalcError),
    #[error("recording the ledger's columns: {0}")]
    Target(String),
}

/// Backfills every table whose ledger lacks columns the views read;
/// returns `(table, rows replayed)` for each.
pub async fn backfill(
    source: &mut Client,
    source_url: &str,
    target: &mut Client,
    target_url: &str,
    model: &Arc<Model>,
) -> Result<Vec<(String, u64)>, LiveViewsError> {
    let mut done = Vec::new();
    for table in model.tables_to_backfill(target).await? {
        let table_model = &model.tables[&table];
        let mut sink = DirectApply::connect(target_url, model.clone(), 2000).await?;
        let stats = replay(
            source,
            source_url,
            &table_model.meta,
            None,
            RowOp::Read,
            &mut sink,
        )
        .await?;
        for view in &table_model.views {
            rebuild_view(target, view, &table, true).await?;
        }
        target
            .execute(
                schema::RECORD_LEDGER_COLUMNS,
                &[&table.to_string(), &table_model.stored_columns],
            )
            .await
            .map_err(|e| LiveViewsError::Target(describe(&e)))?;
        let views: Vec<&str> = table_model.views.iter().map(|v| v.name()).collect();
        tracing::info!(
            "backfilled {table} through replay ({} rows at {}) for the views that read new columns; rebuilt {}",
            stats.rows,
            crate::event::format_lsn(stats.consistent_point),
            views.join(", ")
        );
        done.push((table.to_string(), stats.rows));
    }
    Ok(done)
}
