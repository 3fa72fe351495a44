//! From decoded pgoutput messages to Debezium-format change events.
//!
//! Pure: it keeps the relation cache and the transaction in progress, and
//! turns each row message into one JSON envelope carrying the ordering key
//! `(commit_lsn, lsn)`: the commit LSN comes from `Begin` (its final LSN),
//! the change's own LSN from the WAL record the message describes.

use std::collections::HashMap;
use std::sync::Arc;

use super::pgoutput::{PgOutputMessage, Relation, Tuple, write_tuple_json};
use super::replication::postgres_us_to_unix_ms;
use crate::event::{TableName, UNCHANGED_TOAST};
use crate::transport::CapturedEvent;

/// What one pgoutput message means for the output.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Events to publish, in WAL order.
    Events(Vec<CapturedEvent>),
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
    /// Each relation's table name, shared by all its events.
    tables: HashMap<u32, Arc<TableName>>,
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
                self.tables.insert(
                    relation.id,
                    Arc::new(TableName::new(&relation.namespace, &relation.name)),
                );
                self.relations.insert(relation.id, relation);
                Ok(Step::Nothing)
            }
            PgOutputMessage::Insert { relation_id, new } => {
                let relation = self.relation(relation_id)?;
                Ok(Step::Events(vec![self.envelope(
                    relation,
                    "c",
                    None,
                    Some(&new),
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
                let before = old.as_ref().or(old_key.as_ref());
                Ok(Step::Events(vec![self.envelope(
                    relation,
                    "u",
                    before,
                    Some(&new),
                    lsn,
                )?]))
            }
            PgOutputMessage::Delete {
                relation_id,
                old_key,
                old,
            } => {
                let relation = self.relation(relation_id)?;
                let Some(before) = old.as_ref().or(old_key.as_ref()) else {
                    return Err(format!("delete on {} without its key", relation.name));
                };
                Ok(Step::Events(vec![self.envelope(
                    relation,
                    "d",
                    Some(before),
                    None,
                    lsn,
                )?]))
            }
            PgOutputMessage::Truncate { relation_ids, .. } => {
                let mut events = Vec::with_capacity(relation_ids.len());
                for id in relation_ids {
                    let relation = self.relation(id)?;
                    events.push(self.envelope(relation, "t", None, None, lsn)?);
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

    /// Renders one envelope as JSON text, written directly (this is the
    /// hot path of capture), in the shape Debezium uses.
    fn envelope(
        &self,
        relation: &Relation,
        op: &str,
        before: Option<&Tuple>,
        after: Option<&Tuple>,
        lsn: u64,
    ) -> Result<CapturedEvent, String> {
        let transaction = self
            .transaction
            .ok_or_else(|| format!("change to {} outside a transaction", relation.name))?;
        let table = self
            .tables
            .get(&relation.id)
            .cloned()
            .ok_or_else(|| format!("no table name for relation {}", relation.id))?;
        let mut out: Vec<u8> = Vec::with_capacity(256);
        let write_row = |out: &mut Vec<u8>, tuple: Option<&Tuple>| match tuple {
            None => {
                out.extend_from_slice(b"null");
                Ok(())
            }
            Some(tuple) => {
                write_tuple_json(relation, tuple, UNCHANGED_TOAST, out).map_err(|e| e.to_string())
            }
        };
        let text = |value: &str| serde_json::to_string(value).expect("strings serialise");
        out.extend_from_slice(b"{\"before\":");
        write_row(&mut out, before)?;
        out.extend_from_slice(b",\"after\":");
        write_row(&mut out, after)?;
        out.extend_from_slice(
            format!(
                ",\"source\":{{\"connector\":\"tally\",\"db\":{},\"schema\":{},\"table\":{},\"txId\":{},\"lsn\":{lsn},\"commit_lsn\":{},\"ts_ms\":{}}},\"op\":\"{op}\",\"ts_ms\":{}}}",
                text(&self.database),
                text(&relation.namespace),
                text(&relation.name),
                transaction.xid,
                transaction.commit_lsn,
                transaction.commit_ms,
                transaction.commit_ms,
            )
            .as_bytes(),
        );
        Ok(CapturedEvent {
            table,
            commit_lsn: transaction.commit_lsn,
            lsn,
            row_key: String::new(),
            json: String::from_utf8(out).map_err(|e| e.to_string())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::pgoutput::{RelationColumn, TupleValue, tuple_to_json};

    fn relation() -> Relation {
        let column = |name: &str, type_oid: u32| RelationColumn {
            flags: u8::from(name == "id"),
            name: name.into(),
            type_oid,
            type_modifier: -1,
        };
        Relation {
            id: 7,
            namespace: "public".into(),
            name: "invoices".into(),
            replica_identity: b'd',
            columns: vec![
                column("id", 23),
                column("total", 1700),
                column("note", 25),
                column("paid", 16),
            ],
        }
    }

    #[test]
    fn envelopes_carry_the_ordering_key_and_exact_values() {
        let mut builder = EventBuilder::new("shop");
        builder
            .handle(
                10,
                PgOutputMessage::Begin {
                    final_lsn: 500,
                    commit_time_us: 0,
                    xid: 42,
                },
            )
            .unwrap();
        builder
            .handle(11, PgOutputMessage::Relation(relation()))
            .unwrap();
        let tuple = Tuple(vec![
            TupleValue::Text(b"2".to_vec()),
            TupleValue::Text(b"123456789012345678901234567890.12".to_vec()),
            TupleValue::UnchangedToast,
            TupleValue::Null,
        ]);
        let step = builder
            .handle(
                12,
                PgOutputMessage::Insert {
                    relation_id: 7,
                    new: tuple.clone(),
                },
            )
            .unwrap();
        let Step::Events(events) = step else {
            panic!("{step:?}")
        };
        let event: serde_json::Value = serde_json::from_str(&events[0].json).unwrap();
        assert_eq!((events[0].commit_lsn, events[0].lsn), (500, 12));
        assert_eq!(events[0].table.to_string(), "public.invoices");
        assert_eq!(event["op"], "c");
        assert_eq!(event["source"]["commit_lsn"], 500);
        assert_eq!(event["source"]["lsn"], 12);
        assert_eq!(event["source"]["txId"], 42);
        assert_eq!(event["source"]["table"], "invoices");
        assert_eq!(event["after"]["total"], "123456789012345678901234567890.12");
        assert_eq!(event["after"]["note"], UNCHANGED_TOAST);
        // The direct writer renders exactly what the map form serialises to.
        let map = tuple_to_json(&relation(), &tuple, UNCHANGED_TOAST).unwrap();
        let mut direct = Vec::new();
        write_tuple_json(&relation(), &tuple, UNCHANGED_TOAST, &mut direct).unwrap();
        assert_eq!(
            String::from_utf8(direct).unwrap(),
            serde_json::to_string(&map).unwrap()
        );
        assert!(builder.in_transaction());
        let commit = builder
            .handle(
                13,
                PgOutputMessage::Commit {
                    flags: 0,
                    commit_lsn: 500,
                    end_lsn: 520,
                    commit_time_us: 0,
                },
            )
            .unwrap();
        assert_eq!(commit, Step::Commit { end_lsn: 520 });
        assert!(!builder.in_transaction());
    }
}
