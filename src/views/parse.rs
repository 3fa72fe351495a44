//! From the views file's SQL text to [`ViewDef`]s.

use std::collections::BTreeSet;
use std::ops::ControlFlow;

use sqlparser::ast::{
    CreateTableOptions, CreateView, Distinct, Expr, GroupByExpr, Ident, ObjectName, Query, Select,
    SelectItem, SetExpr, Statement, TableFactor, Value, visit_relations_mut,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::{Parser, ParserError};

use super::expr::{
    self, AggregateSet, Problem, SourceScope, check_expr, contains_aggregate, extract_aggregates,
    fold, resolve_columns, same_expr,
};
use super::{GroupColumn, MeasureExpr, OutputColumn, OutputSource, ViewDef, ViewError};
use crate::event::TableName;

/// Names starting with this are Tally's own columns in view tables.
const RESERVED_PREFIX: &str = "_tally_";

/// Parses a views file: one or more `CREATE MATERIALIZED VIEW name AS
/// SELECT … FROM table [WHERE …] [GROUP BY …];` statements.
pub fn parse_views(sql: &str) -> Result<Vec<ViewDef>, ViewError> {
    let statements = Parser::parse_sql(&PostgreSqlDialect {}, sql).map_err(|error| {
        let message = match error {
            ParserError::TokenizerError(message) | ParserError::ParserError(message) => message,
            ParserError::RecursionLimitExceeded => "expressions nest too deeply".to_string(),
        };
        ViewError::Syntax { message }
    })?;
    let mut views: Vec<ViewDef> = Vec::with_capacity(statements.len());
    for (index, statement) in statements.iter().enumerate() {
        let Statement::CreateView(create) = statement else {
            return Err(ViewError::NotAView {
                position: index + 1,
                statement: abbreviate(&statement.to_string()),
            });
        };
        let view = parse_view(create)?;
        if views.iter().any(|known| known.name == view.name) {
            return Err(ViewError::DuplicateView { view: view.name });
        }
        views.push(view);
    }
    Ok(views)
}

/// A statement's start, enough to find it in the file.
fn abbreviate(statement: &str) -> String {
    const LIMIT: usize = 60;
    match statement.char_indices().nth(LIMIT) {
        Some((cut, _)) => format!("{}…", &statement[..cut]),
        None => statement.to_string(),
    }
}

fn parse_view(create: &CreateView) -> Result<ViewDef, ViewError> {
    let view = view_name(&create.name);
    let unsupported = |message: String| ViewError::Unsupported {
        view: view.clone(),
        message,
    };
    if create.name.0.len() != 1 {
        return Err(unsupported(format!(
            "schema-qualified view names (`{}`) are not supported; write the bare name",
            create.name
        )));
    }
    if !create.materialized {
        return Err(unsupported(
            "CREATE VIEW is not supported; use CREATE MATERIALIZED VIEW".to_string(),
        ));
    }
    if !create.columns.is_empty() {
        return Err(unsupported(
            "a column list after the view name is not supported; name the outputs with AS"
                .to_string(),
        ));
    }
    if create.options != CreateTableOptions::None {
        return Err(unsupported(
            "view options (WITH …) are not supported".to_string(),
        ));
    }
    // OR REPLACE and IF NOT EXISTS do not change what the view holds.
    if create.or_alter
        || create.secure
        || create.temporary
        || create.copy_grants
        || create.with_no_schema_binding
        || !create.cluster_by.is_empty()
        || create.comment.is_some()
        || create.to.is_some()
        || create.params.is_some()
    {
        return Err(unsupported(
            "only plain CREATE MATERIALIZED VIEW name AS SELECT … is supported".to_string(),
        ));
    }
    build_view(&view, &create.query).map_err(|problem| match problem {
        Problem::Unsupported(message) => ViewError::Unsupported {
            view: view.clone(),
            message,
        },
        Problem::Invalid(message) => ViewError::Invalid {
            view: view.clone(),
            message,
        },
    })
}

/// The view's name as Postgres folds it (the last part, if qualified).
fn view_name(name: &ObjectName) -> String {
    match name.0.last().and_then(|part| part.as_ident()) {
        Some(ident) => fold(ident),
        None => name.to_string(),
    }
}

/// One SELECT-list entry after column resolution.
struct SelectEntry {
    alias: Option<String>,
    expr: Expr,
}

/// Builds the [`ViewDef`] of the view named `view` from its query.
fn build_view(view: &str, query: &Query) -> Result<ViewDef, Problem> {
    let select = plain_select(query)?;
    let (table, scope) = source_table(select)?;

    let entries = select
        .projection
        .iter()
        .map(|item| select_entry(item, &scope))
        .collect::<Result<Vec<_>, _>>()?;
    if !entries.iter().any(|entry| contains_aggregate(&entry.expr)) {
        return Err(Problem::Unsupported(format!(
            "the view has no aggregate; it needs at least one ({})",
            expr::SUPPORTED_AGGREGATES
        )));
    }

    let filter = match &select.selection {
        Some(condition) => {
            let mut condition = condition.clone();
            resolve_columns(&mut condition, &scope)?;
            check_expr(&condition, "WHERE", false)?;
            Some(condition)
        }
        None => None,
    };

    let group_exprs = group_by(&select.group_by, &entries, &scope)?;
    let mut columns_read = BTreeSet::new();
    for expr in entries
        .iter()
        .map(|entry| &entry.expr)
        .chain(&filter)
        .chain(&group_exprs)
    {
        expr::collect_columns(expr, &mut columns_read);
    }

    let mut aggregates = AggregateSet::default();
    let mut group_names: Vec<Option<String>> = vec![None; group_exprs.len()];
    let mut outputs = Vec::with_capacity(entries.len());
    for entry in &entries {
        let name = output_name(entry)?;
        let source = if contains_aggregate(&entry.expr) {
            OutputSource::Measure(measure(entry, &name, &mut aggregates)?)
        } else {
            let Some(index) = group_exprs
                .iter()
                .position(|group| same_expr(group, &entry.expr))
            else {
                return Err(Problem::Invalid(format!(
                    "output \"{name}\" (`{}`) must appear in GROUP BY or be inside an aggregate",
                    entry.expr
                )));
            };
            group_names[index].get_or_insert_with(|| name.clone());
            OutputSource::Group(index)
        };
        outputs.push(OutputColumn { name, source });
    }

    let groups: Vec<GroupColumn> = group_exprs
        .iter()
        .zip(group_names)
        .enumerate()
        .map(|(index, (expr, name))| GroupColumn {
            visible: name.is_some(),
            column: name.unwrap_or_else(|| format!("{RESERVED_PREFIX}g{index}")),
            expr: expr.to_string(),
        })
        .collect();
    check_column_names(&outputs)?;

    Ok(ViewDef {
        name: view.to_string(),
        select_sql: qualified_query(query, &table),
        source: table,
        filter: filter.map(|condition| condition.to_string()),
        groups,
        aggregates: aggregates.into_aggregates(),
        outputs,
        columns_read,
    })
}

/// The query with its FROM table schema-qualified, so that it reads the
/// view's source whatever the `search_path`. Qualified column references
/// keep working: the table is still referred to by its bare name or alias.
fn qualified_query(query: &Query, source: &TableName) -> String {
    let mut query = query.clone();
    // Validation left exactly one relation in the query: the FROM table.
    let _ = visit_relations_mut(&mut query, |name| {
        *name = ObjectName::from(vec![
            Ident::with_quote('"', source.schema.as_str()),
            Ident::with_quote('"', source.name.as_str()),
        ]);
        ControlFlow::<()>::Continue(())
    });
    query.to_string()
}

/// The query's one SELECT, refusing every clause a view cannot keep up to date.
fn plain_select(query: &Query) -> Result<&Select, Problem> {
    let unsupported = |message: &str| Err(Problem::Unsupported(message.to_string()));
    if query.with.is_some() {
        return unsupported("CTEs (WITH …) are not supported; select from the table directly");
    }
    if query.order_by.is_some() {
        return unsupported("ORDER BY is not supported (a view's rows have no order)");
    }
    if query.limit_clause.is_some() || query.fetch.is_some() {
        return unsupported("LIMIT, OFFSET and FETCH are not supported");
    }
    if !query.locks.is_empty() {
        return unsupported("FOR UPDATE/SHARE is not supported");
    }
    if query.for_clause.is_some()
        || query.settings.is_some()
        || query.format_clause.is_some()
        || !query.pipe_operators.is_empty()
    {
        return unsupported("only SELECT … FROM … [WHERE …] [GROUP BY …] is supported");
    }
    let select = match query.body.as_ref() {
        SetExpr::Select(select) => select,
        SetExpr::Query(inner) => return plain_select(inner),
        SetExpr::SetOperation { op, .. } => {
            return Err(Problem::Unsupported(format!(
                "{op} is not supported; a view is one SELECT over one table"
            )));
        }
        _ => return unsupported("the view's query must be a SELECT"),
    };
    match &select.distinct {
        None | Some(Distinct::All) => {}
        Some(Distinct::Distinct | Distinct::On(_)) => {
            return unsupported("SELECT DISTINCT is not supported");
        }
    }
    if select.having.is_some() {
        return unsupported(
            "HAVING is not supported; filter rows with WHERE, or filter the view when reading it",
        );
    }
    if !select.named_window.is_empty() {
        return unsupported("window functions (WINDOW clause) are not supported");
    }
    if select.into.is_some() {
        return unsupported("SELECT INTO is not supported");
    }
    if select.top.is_some()
        || select.exclude.is_some()
        || select.select_modifiers.is_some()
        || select.value_table_mode.is_some()
        || !select.optimizer_hints.is_empty()
        || !select.lateral_views.is_empty()
        || select.prewhere.is_some()
        || !select.connect_by.is_empty()
        || !select.cluster_by.is_empty()
        || !select.distribute_by.is_empty()
        || !select.sort_by.is_empty()
        || select.qualify.is_some()
    {
        return unsupported("only SELECT … FROM … [WHERE …] [GROUP BY …] is supported");
    }
    Ok(select)
}

/// The one FROM table, and how column references may name it.
fn source_table(select: &Select) -> Result<(TableName, SourceScope), Problem> {
    let only_one_table = "a view aggregates exactly one table: SELECT … FROM table";
    let from = match select.from.as_slice() {
        [] => {
            return Err(Problem::Unsupported(format!(
                "a view without FROM is not supported ({only_one_table})"
            )));
        }
        [from] => from,
        _ => {
            return Err(Problem::Unsupported(format!(
                "more than one FROM table is not supported; joins are not supported ({only_one_table})"
            )));
        }
    };
    if !from.joins.is_empty() {
        return Err(Problem::Unsupported(format!(
            "JOIN is not supported ({only_one_table})"
        )));
    }
    let (name, alias) = match &from.relation {
        TableFactor::Table {
            name,
            alias,
            args: None,
            with_hints,
            version: None,
            with_ordinality: false,
            partitions,
            json_path: None,
            sample: None,
            index_directives,
            inheritance: _,
        } if with_hints.is_empty() && partitions.is_empty() && index_directives.is_empty() => {
            (name, alias)
        }
        TableFactor::Derived { .. } => {
            return Err(Problem::Unsupported(format!(
                "subqueries in FROM are not supported ({only_one_table})"
            )));
        }
        TableFactor::NestedJoin { .. } => {
            return Err(Problem::Unsupported(format!(
                "JOIN is not supported ({only_one_table})"
            )));
        }
        other => {
            return Err(Problem::Unsupported(format!(
                "FROM {other} is not supported ({only_one_table})"
            )));
        }
    };
    let parts = name
        .0
        .iter()
        .map(|part| part.as_ident().map(fold))
        .collect::<Option<Vec<_>>>();
    let table = match parts.as_deref() {
        Some([table]) => TableName::public(table.clone()),
        Some([schema, table]) => TableName::new(schema.clone(), table.clone()),
        _ => {
            return Err(Problem::Unsupported(format!(
                "FROM {name} is not supported; write table or schema.table"
            )));
        }
    };
    let alias = match alias {
        Some(alias) if !alias.columns.is_empty() => {
            return Err(Problem::Unsupported(
                "column aliases on the FROM table are not supported".to_string(),
            ));
        }
        Some(alias) => Some(fold(&alias.name)),
        None => None,
    };
    let scope = SourceScope::new(&table.schema, &table.name, alias, from.relation.to_string());
    Ok((table, scope))
}

fn select_entry(item: &SelectItem, scope: &SourceScope) -> Result<SelectEntry, Problem> {
    let (expr, alias) = match item {
        SelectItem::UnnamedExpr(expr) => (expr, None),
        SelectItem::ExprWithAlias { expr, alias } => (expr, Some(fold(alias))),
        SelectItem::ExprWithAliases { .. } => {
            return Err(Problem::Unsupported(
                "multiple aliases for one output are not supported".to_string(),
            ));
        }
        SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..) => {
            return Err(Problem::Unsupported(
                "SELECT * is not supported; list the group columns and aggregates".to_string(),
            ));
        }
    };
    let mut expr = expr.clone();
    resolve_columns(&mut expr, scope)?;
    check_expr(&expr, "the SELECT list", true)?;
    Ok(SelectEntry { alias, expr })
}

/// The GROUP BY expressions, with `GROUP BY 1` and `GROUP BY alias`
/// replaced by the select item they name, deduplicated.
fn group_by(
    group_by: &GroupByExpr,
    entries: &[SelectEntry],
    scope: &SourceScope,
) -> Result<Vec<Expr>, Problem> {
    let written = match group_by {
        GroupByExpr::Expressions(exprs, modifiers) if modifiers.is_empty() => exprs,
        _ => {
            return Err(Problem::Unsupported(
                "GROUP BY ALL, ROLLUP, CUBE and GROUPING SETS are not supported".to_string(),
            ));
        }
    };
    let mut groups: Vec<Expr> = Vec::with_capacity(written.len());
    for group in written {
        let resolved = group_expr(group, entries, scope)?;
        check_expr(&resolved, "GROUP BY", false)?;
        if !groups.iter().any(|known| same_expr(known, &resolved)) {
            groups.push(resolved);
        }
    }
    Ok(groups)
}

fn group_expr(group: &Expr, entries: &[SelectEntry], scope: &SourceScope) -> Result<Expr, Problem> {
    if let Expr::Value(value) = group
        && let Value::Number(number, _) = &value.value
    {
        let number = number.to_string();
        return match number.parse::<usize>() {
            Ok(position) if (1..=entries.len()).contains(&position) => {
                Ok(entries[position - 1].expr.clone())
            }
            _ => Err(Problem::Invalid(format!(
                "GROUP BY position {number} is not in the select list (1 to {})",
                entries.len()
            ))),
        };
    }
    let mut resolved = group.clone();
    resolve_columns(&mut resolved, scope)?;
    if let (Expr::Identifier(name), Expr::Identifier(_)) = (&resolved, group)
        && let Some(entry) = entries
            .iter()
            .find(|entry| entry.alias.as_deref() == Some(name.value.as_str()))
    {
        // Postgres prefers a source column over an output alias here, and we
        // do not know the source's columns: refuse when both readings are in
        // play, rather than guess.
        let mut referenced = BTreeSet::new();
        for entry in entries {
            expr::collect_columns(&entry.expr, &mut referenced);
        }
        if referenced.contains(&name.value) && !same_expr(&entry.expr, &resolved) {
            return Err(Problem::Invalid(format!(
                "GROUP BY {name} is ambiguous: it is both an output alias and a source column; \
                 write the expression or its position instead"
            )));
        }
        return Ok(entry.expr.clone());
    }
    Ok(resolved)
}

/// The output's name as Postgres would give it, refusing the cases where
/// Postgres would invent one (`?column?`, a function's name).
fn output_name(entry: &SelectEntry) -> Result<String, Problem> {
    if let Some(alias) = &entry.alias {
        return Ok(alias.clone());
    }
    let mut bare = &entry.expr;
    while let Expr::Nested(inner) = bare {
        bare = inner;
    }
    match bare {
        Expr::Identifier(column) => Ok(column.value.clone()),
        Expr::Function(function) if expr::is_postgres_aggregate(function) => {
            Ok(expr::function_name(function).unwrap_or_default())
        }
        _ => Err(Problem::Invalid(format!(
            "output `{}` needs a name: add `AS name`",
            entry.expr
        ))),
    }
}

fn measure(
    entry: &SelectEntry,
    name: &str,
    aggregates: &mut AggregateSet,
) -> Result<MeasureExpr, Problem> {
    let mut measure = entry.expr.clone();
    extract_aggregates(&mut measure, aggregates)?;
    if let Some(column) = expr::first_column(&measure) {
        return Err(Problem::Invalid(format!(
            "output \"{name}\" uses column {column} outside an aggregate; an aggregate output \
             may combine aggregates only with constants, operators and functions"
        )));
    }
    Ok(MeasureExpr::new(measure))
}

/// Output names must be distinct and leave Tally's prefix alone, which
/// also keeps them apart from hidden group columns.
fn check_column_names(outputs: &[OutputColumn]) -> Result<(), Problem> {
    let mut seen = BTreeSet::new();
    for output in outputs {
        if output.name.starts_with(RESERVED_PREFIX) {
            return Err(Problem::Invalid(format!(
                "output name \"{}\" is reserved (names starting with {RESERVED_PREFIX} are Tally's)",
                output.name
            )));
        }
        if !seen.insert(output.name.clone()) {
            return Err(Problem::Invalid(format!(
                "output name \"{}\" appears more than once; rename one with AS",
                output.name
            )));
        }
    }
    Ok(())
}
