//! What Tally knows of a source table: its columns with their types and its
//! primary key, read from the source's catalog.

use std::collections::BTreeMap;

use thiserror::Error;
use tokio_postgres::Client;

use crate::event::TableName;

#[derive(Debug, Error)]
pub enum CatalogError {
    #[error(
        "table {table} does not exist on the source (views read it); create it or fix the view's FROM"
    )]
    NoSuchTable { table: TableName },
    #[error(
        "table {table} has no primary key; Tally identifies rows by it. Add one (ALTER TABLE {table} ADD PRIMARY KEY (...))"
    )]
    NoPrimaryKey { table: TableName },
    #[error("reading the source catalog: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// One column of a source table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnMeta {
    pub name: String,
    /// The type as SQL text (`numeric(20,2)`), usable in a column
    /// definition on the target. Types that are not built in (enums, domains
    /// of extensions) become `text`, since the target may not have them.
    pub sql_type: String,
    /// The base type's name (`int4`, `numeric`, `text`), for validation.
    pub type_name: String,
    /// Postgres's type modifier (`-1` when none): length or precision/scale.
    pub typmod: i32,
}

/// A source table's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableMeta {
    pub name: TableName,
    pub columns: Vec<ColumnMeta>,
    /// Primary-key column names in key order.
    pub primary_key: Vec<String>,
}

impl TableMeta {
    pub fn column(&self, name: &str) -> Option<&ColumnMeta> {
        self.columns.iter().find(|c| c.name == name)
    }
}

const COLUMNS_SQL: &str = "
SELECT a.attname::text,
       CASE WHEN t.typnamespace = 'pg_catalog'::regnamespace
            THEN format_type(a.atttypid, a.atttypmod) ELSE 'text' END,
       CASE WHEN t.typnamespace = 'pg_catalog'::regnamespace
            THEN t.typname::text ELSE 'text' END,
       a.atttypmod
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum";

const PRIMARY_KEY_SQL: &str = "
SELECT a.attname::text
FROM pg_index i
CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, position)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = to_regclass($1) AND i.indisprimary
ORDER BY k.position";

/// Reads the shape of each table from the source.
pub async fn load_tables(
    client: &Client,
    tables: impl IntoIterator<Item = TableName>,
) -> Result<BTreeMap<TableName, TableMeta>, CatalogError> {
    let mut out = BTreeMap::new();
    for table in tables {
        let regclass = table.quoted();
        let columns: Vec<ColumnMeta> = client
            .query(COLUMNS_SQL, &[&regclass])
            .await?
            .iter()
            .map(|row| ColumnMeta {
                name: row.get(0),
                sql_type: row.get(1),
                type_name: row.get(2),
                typmod: row.get(3),
            })
            .collect();
        if columns.is_empty() {
            return Err(CatalogError::NoSuchTable { table });
        }
        let primary_key: Vec<String> = client
            .query(PRIMARY_KEY_SQL, &[&regclass])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        if primary_key.is_empty() {
            return Err(CatalogError::NoPrimaryKey { table });
        }
        out.insert(
            table.clone(),
            TableMeta {
                name: table,
                columns,
                primary_key,
            },
        );
    }
    Ok(out)
}
