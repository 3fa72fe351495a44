//! A consistent read of the source with a known ordering key, shared by
//! `replay` and `verify`.
//!
//! A temporary logical replication slot is created with an exported
//! snapshot. Its consistent point `C` splits history exactly: every
//! transaction visible in the snapshot committed before `C`, and every
//! change not in it has a commit record at or after `C`, so it carries a key
//! `(commit_lsn ≥ C, lsn > 0)` greater than `(C, 0)` (DESIGN.md, "Ordering
//! key"). Rows read in the snapshot and sent with key `(C, 0)` therefore win
//! over every change they already contain and lose to every later one.
//!
//! Reading `pg_current_wal_insert_lsn()` and then taking a snapshot is not
//! enough: a transaction whose commit record is already written (before the
//! LSN read) can still be invisible to the snapshot until it leaves the
//! process array, and its change would then lose to a stale replayed row.
//! The slot's snapshot builder waits for exactly those transactions.
//!
//! The slot is `TEMPORARY`: it disappears with its connection, so a crashed
//! tool leaves nothing behind that holds WAL back.

use tokio_postgres::{Client, IsolationLevel, Transaction};

use crate::capture::replication::{ReplicationConnection, ReplicationError};
use crate::db::describe;
use crate::event::{parse_lsn_text, quote_ident};

/// An exported snapshot, valid while this value lives.
pub struct ExportedSnapshot {
    /// Keeps the temporary slot and the exported snapshot alive.
    _holder: ReplicationConnection,
    pub consistent_point: u64,
    pub name: String,
}

impl ExportedSnapshot {
    /// Creates a temporary slot named after `purpose` and the process id.
    pub async fn take(
        source_url: &str,
        purpose: &str,
    ) -> Result<ExportedSnapshot, ReplicationError> {
        let mut replication = ReplicationConnection::connect(source_url).await?;
        let slot = format!("tally_{purpose}_{}", std::process::id());
        let rows = replication
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT",
                quote_ident(&slot)
            ))
            .await?;
        let row = rows.first().ok_or_else(|| {
            ReplicationError::Protocol("CREATE_REPLICATION_SLOT returned no row".into())
        })?;
        let point_text = row.get(1).cloned().flatten().unwrap_or_default();
        let consistent_point = parse_lsn_text(&point_text).ok_or_else(|| {
            ReplicationError::Protocol(format!("bad consistent point {point_text:?}"))
        })?;
        let name = row.get(2).cloned().flatten().unwrap_or_default();
        Ok(ExportedSnapshot {
            _holder: replication,
            consistent_point,
            name,
        })
    }

    /// A READ ONLY, REPEATABLE READ transaction on `client` that sees
    /// exactly this snapshot. Read only so that a user-supplied `WHERE`
    /// cannot write to the source.
    pub async fn begin<'a>(&self, client: &'a mut Client) -> Result<Transaction<'a>, String> {
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(|e| describe(&e))?;
        tx.batch_execute(&format!(
            "SET TRANSACTION SNAPSHOT '{}'",
            self.name.replace('\'', "''")
        ))
        .await
        .map_err(|e| describe(&e))?;
        Ok(tx)
    }
}
