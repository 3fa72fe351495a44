//! Views declared in SQL (`CREATE MATERIALIZED VIEW … AS SELECT …`).
//! TEMPORARY STUB: replaced by the parser branch.
use crate::event::TableName;
use std::collections::BTreeSet;

#[derive(Debug, Clone, PartialEq)]
pub struct ViewDef {
    pub name: String,
    pub source: TableName,
    pub select_sql: String,
    pub filter: Option<String>,
    pub groups: Vec<GroupColumn>,
    pub aggregates: Vec<Aggregate>,
    pub outputs: Vec<OutputColumn>,
    pub columns_read: BTreeSet<String>,
}
#[derive(Debug, Clone, PartialEq)]
pub struct GroupColumn {
    pub column: String,
    pub expr: String,
    pub visible: bool,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggKind {
    CountStar,
    Count,
    Sum,
    Avg,
}
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    pub kind: AggKind,
    pub arg: Option<String>,
    pub filter: Option<String>,
}
#[derive(Debug, Clone, PartialEq)]
pub struct OutputColumn {
    pub name: String,
    pub source: OutputSource,
}
#[derive(Debug, Clone, PartialEq)]
pub enum OutputSource {
    Group(usize),
    Measure(MeasureExpr),
}
#[derive(Debug, Clone, PartialEq)]
pub struct MeasureExpr;
impl MeasureExpr {
    pub fn render(&self, _agg_sql: &dyn Fn(usize) -> String) -> String {
        todo!()
    }
}
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("x")]
    X,
}
pub fn load_views(_path: &std::path::Path) -> Result<Vec<ViewDef>, ViewError> {
    todo!()
}
pub mod table;
