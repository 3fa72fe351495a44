//! Views declared in SQL (`CREATE MATERIALIZED VIEW … AS SELECT …`).
//!
//! A views file is read once at start-up and turned into [`ViewDef`]s: plain
//! data saying which table a view reads, how it filters and groups rows and
//! which aggregates it keeps. Everything that cannot be maintained
//! incrementally is refused here, at load, with a message naming the view, so
//! that nothing downstream has to cope with SQL it does not understand.

mod expr;
mod parse;
pub mod table;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use sqlparser::ast::{Expr, Ident, visit_expressions, visit_expressions_mut};

use crate::event::TableName;

pub use parse::parse_views;

/// One materialized view, as declared in the views file.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewDef {
    /// As Postgres folds it: unquoted → lowercase, quoted kept as written.
    pub name: String,
    /// The FROM table; schema `public` when not written.
    pub source: TableName,
    /// The whole SELECT re-rendered: running it on the source gives exactly
    /// what the view must hold, which is how views are checked and rebuilt.
    pub select_sql: String,
    /// The WHERE expression, over the source's columns by bare name.
    pub filter: Option<String>,
    /// GROUP BY expressions in order (ordinals and aliases resolved).
    pub groups: Vec<GroupColumn>,
    /// Distinct aggregate calls of the SELECT list; measures refer to them by index.
    pub aggregates: Vec<Aggregate>,
    /// The SELECT list in order.
    pub outputs: Vec<OutputColumn>,
    /// Every source column the view reads (folded), so that events can be
    /// checked for the columns they must carry.
    pub columns_read: BTreeSet<String>,
}

/// One GROUP BY expression and the view column that holds its value.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupColumn {
    /// Column name in the view table: the output name when visible, else `_tally_g{i}`.
    pub column: String,
    /// SQL of the expression, over the source's columns by bare name.
    pub expr: String,
    /// Whether it appears in the SELECT list.
    pub visible: bool,
}

/// The aggregate functions Tally can maintain from inserts and deletes alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AggKind {
    CountStar,
    Count,
    Sum,
    Avg,
}

/// One aggregate call, e.g. `SUM(amount) FILTER (WHERE kind = 'credit')`.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    pub kind: AggKind,
    /// SQL of the argument; `None` for `COUNT(*)`.
    pub arg: Option<String>,
    /// SQL of the `FILTER (WHERE …)` condition.
    pub filter: Option<String>,
}

/// One entry of the SELECT list.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputColumn {
    pub name: String,
    pub source: OutputSource,
}

/// Where an output column's value comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputSource {
    /// Index into [`ViewDef::groups`].
    Group(usize),
    /// An expression over the group's aggregates.
    Measure(MeasureExpr),
}

/// A SELECT-list expression whose aggregate calls are replaced by references
/// to [`ViewDef::aggregates`], so that it can be evaluated from stored
/// aggregate states (e.g. `ROUND(done::numeric / total, 4)`).
#[derive(Debug, Clone, PartialEq)]
pub struct MeasureExpr {
    /// The expression with each aggregate call replaced by a placeholder
    /// identifier; boxed to keep [`OutputSource`] small.
    expr: Box<Expr>,
}

impl MeasureExpr {
    pub(crate) fn new(expr: Expr) -> Self {
        MeasureExpr {
            expr: Box::new(expr),
        }
    }

    /// The SQL text with every aggregate reference replaced by `(agg_sql(i))`.
    ///
    /// The parentheses keep operator precedence whatever the closure returns.
    pub fn render(&self, agg_sql: &dyn Fn(usize) -> String) -> String {
        let mut rendered = self.expr.as_ref().clone();
        let _ = visit_expressions_mut(&mut rendered, |node| {
            if let Some(index) = expr::placeholder_index(node) {
                *node = Expr::Nested(Box::new(Expr::Identifier(Ident::new(agg_sql(index)))));
            }
            ControlFlow::<()>::Continue(())
        });
        rendered.to_string()
    }

    /// The aggregates the measure uses, in order of appearance (with repeats).
    pub fn aggregate_refs(&self) -> Vec<usize> {
        let mut refs = Vec::new();
        let _ = visit_expressions(self.expr.as_ref(), |node| {
            refs.extend(expr::placeholder_index(node));
            ControlFlow::<()>::Continue(())
        });
        refs
    }

    /// The aggregate index when the measure is exactly one aggregate call,
    /// the common case that needs no expression evaluation.
    pub fn single_aggregate(&self) -> Option<usize> {
        let mut node = self.expr.as_ref();
        while let Expr::Nested(inner) = node {
            node = inner;
        }
        expr::placeholder_index(node)
    }
}

/// Why a views file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("cannot read views file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An error in the file at `path` (wraps the others, from [`load_views`]).
    #[error("views file {}: {source}", path.display())]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<ViewError>,
    },
    #[error("SQL syntax error in views: {message}")]
    Syntax { message: String },
    #[error(
        "statement {position} is not a CREATE MATERIALIZED VIEW: `{statement}` \
         (a views file holds only CREATE MATERIALIZED VIEW name AS SELECT … statements)"
    )]
    NotAView { position: usize, statement: String },
    #[error("view \"{view}\" is defined more than once")]
    DuplicateView { view: String },
    /// A construct Tally cannot maintain incrementally (yet).
    #[error("view \"{view}\": {message}")]
    Unsupported { view: String, message: String },
    /// A definition that is wrong or ambiguous as written.
    #[error("view \"{view}\": {message}")]
    Invalid { view: String, message: String },
}

impl ViewError {
    /// The view the error is about, when it is about one.
    pub fn view(&self) -> Option<&str> {
        match self {
            ViewError::InFile { source, .. } => source.view(),
            ViewError::DuplicateView { view }
            | ViewError::Unsupported { view, .. }
            | ViewError::Invalid { view, .. } => Some(view),
            ViewError::Read { .. } | ViewError::Syntax { .. } | ViewError::NotAView { .. } => None,
        }
    }
}

/// Reads and parses a views file; errors name the file.
pub fn load_views(path: &Path) -> Result<Vec<ViewDef>, ViewError> {
    let sql = std::fs::read_to_string(path).map_err(|source| ViewError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_views(&sql).map_err(|source| ViewError::InFile {
        path: path.to_path_buf(),
        source: Box::new(source),
    })
}
