//! From decoded pgoutput messages to Debezium-format change events.
//!
//! Pure: it keeps the relation cache and the transaction in progress, and
//! turns each row message into one JSON envelope carrying the ordering key
//! `(commit_lsn, lsn)`: the commit LSN comes from `Begin` (its final LSN),
//! the change's own LSN from the WAL record the message describes.

use std::collections::HashMap;

use serde_json::{Map, Value, json};

use super::pgoutput::{PgOutputMessage, Relation, Tuple, tuple_to_json};
use super::replication::postgres_us_to_unix_ms;
use crate::event::UNCHANGED_TOAST;

/// What one pgoutput message means for the output.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Envelopes to write, one JSON document each.
    Events(Vec<String>),
    /// A transaction ended at `end_lsn`: once everything before is durable
    /// the slot may be confirmed up to here.
    Commit {
        end_lsn: u64,
    },
    Nothing,
}

#[derive(Debug, Clone, Copy)]
struct Transaction {
    commit_lsn: u64,
    xid: u32,
    commit_ms: i64,
}

/// The decoding state of one replication stream.
#[derive(Debug, Default)]
pub struct EventBuilder {
    database: String,
    relations: HashMap<u32, Relation>,
    transaction: Option<Transaction>,
}

impl EventBuilder {
    pub fn new(database: impl Into<String>) -> EventBuilder {
        EventBuilder {
            database: database.into(),
            ..EventBuilder::default()
        }
    }

    /// Whether a transaction is being received (its commit not yet seen).
    pub fn in_transaction(&self) -> bool {
        self.transaction.is_some()
    }

    /// Handles one message whose WAL record starts at `lsn`.
    pub fn handle(&mut self, lsn: u64, message: PgOutputMessage) -> Result<Step, String> {
        match message {
            PgOutputMessage::Begin {
                final_lsn,
                commit_time_us,
                xid,
            } => {
                self.transaction = Some(Transaction {
                    commit_lsn: final_lsn,
                    xid,
                    commit_ms: postgres_us_to_unix_ms(commit_time_us),
                });
                Ok(Step::Nothing)
            }
            PgOutputMessage::Commit { end_lsn, .. } => {
                self.transaction = None;
                Ok(Step::Commit { end_lsn })
            }
            PgOutputMessage::Relation(relation) => {
                self.relations.insert(relation.id, relation);
                Ok(Step::Nothing)
            }
            PgOutputMessage::Insert { relation_id, new } => {
                let relation = self.relation(relation_id)?;
                let after = self.row(relation, &new)?;
                Ok(Step::Events(vec![self.envelope(
                    relation,
                    "c",
                    Value::Null,
                    after,
                    lsn,
                )?]))
            }
            PgOutputMessage::Update {
                relation_id,
                old_key,
                old,
                new,
            } => {
                let relation = self.relation(relation_id)?;
                let before = match old.as_ref().or(old_key.as_ref()) {
                    Some(tuple) => self.row(relation, tuple)?,
                    None => Value::Null,
                };
                let after = self.row(relation, &new)?;
                Ok(Step::Events(vec![
                    self.envelope(relation, "u", before, after, lsn)?,
                ]))
            }
            PgOutputMessage::Delete {
                relation_id,
                old_key,
                old,
            } => {
                let relation = self.relation(relation_id)?;
                let before = match old.as_ref().or(old_key.as_ref()) {
                    Some(tuple) => self.row(relation, tuple)?,
                    None => return Err(format!("delete on {} without its key", relation.name)),
                };
                Ok(Step::Events(vec![self.envelope(
                    relation,
                    "d",
                    before,
                    Value::Null,
                    lsn,
                )?]))
            }
            PgOutputMessage::Truncate { relation_ids, .. } => {
                let mut events = Vec::with_capacity(relation_ids.len());
                for id in relation_ids {
                    let relation = self.relation(id)?;
                    events.push(self.envelope(relation, "t", Value::Null, Value::Null, lsn)?);
                }
                Ok(Step::Events(events))
            }
            PgOutputMessage::Type { .. }
            | PgOutputMessage::Origin { .. }
            | PgOutputMessage::Message { .. } => Ok(Step::Nothing),
        }
    }

    fn relation(&self, id: u32) -> Result<&Relation, String> {
        self.relations
            .get(&id)
            .ok_or_else(|| format!("row message for relation {id} before its Relation message"))
    }

    fn row(&self, relation: &Relation, tuple: &Tuple) -> Result<Value, String> {
        tuple_to_json(relation, tuple, UNCHANGED_TOAST)
            .map(Value::Object)
            .map_err(|err| err.to_string())
    }

    fn envelope(
        &self,
        relation: &Relation,
        op: &str,
        before: Value,
        after: Value,
        lsn: u64,
    ) -> Result<String, String> {
        let transaction = self
            .transaction
            .ok_or_else(|| format!("change to {} outside a transaction", relation.name))?;
        let mut source = Map::new();
        source.insert("connector".into(), json!("tally"));
        source.insert("db".into(), json!(self.database));
        source.insert("schema".into(), json!(relation.namespace));
        source.insert("table".into(), json!(relation.name));
        source.insert("txId".into(), json!(transaction.xid));
        source.insert("lsn".into(), json!(lsn));
        source.insert("commit_lsn".into(), json!(transaction.commit_lsn));
        source.insert("ts_ms".into(), json!(transaction.commit_ms));
        Ok(json!({
            "before": before,
            "after": after,
            "source": source,
            "op": op,
            "ts_ms": transaction.commit_ms,
        })
        .to_string())
    }
}
