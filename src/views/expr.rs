//! Expression analysis: resolving column references against the one FROM
//! table, refusing what cannot be maintained, and pulling aggregate calls out
//! of SELECT-list expressions.
//!
//! Errors are [`Problem`]s without a view name; the caller adds it.

use std::collections::BTreeSet;
use std::ops::ControlFlow;

use sqlparser::ast::{
    AccessExpr, DuplicateTreatment, Expr, Function, FunctionArg, FunctionArgExpr,
    FunctionArguments, Ident, Query, Visit, VisitMut, Visitor, VisitorMut, visit_expressions,
};

use super::{AggKind, Aggregate};

/// What every refusal of an aggregate says is supported.
pub(crate) const SUPPORTED_AGGREGATES: &str =
    "supported aggregates: SUM, COUNT(*), COUNT(expr), AVG, each with optional FILTER (WHERE …)";

/// Postgres's built-in aggregate functions, so that calls to the ones Tally
/// does not maintain are refused by name instead of being taken for scalar
/// functions.
const POSTGRES_AGGREGATES: &[&str] = &[
    "any_value",
    "array_agg",
    "avg",
    "bit_and",
    "bit_or",
    "bit_xor",
    "bool_and",
    "bool_or",
    "corr",
    "count",
    "covar_pop",
    "covar_samp",
    "every",
    "json_agg",
    "json_agg_strict",
    "json_arrayagg",
    "json_object_agg",
    "json_object_agg_strict",
    "json_object_agg_unique",
    "json_object_agg_unique_strict",
    "json_objectagg",
    "jsonb_agg",
    "jsonb_agg_strict",
    "jsonb_object_agg",
    "jsonb_object_agg_strict",
    "jsonb_object_agg_unique",
    "jsonb_object_agg_unique_strict",
    "max",
    "min",
    "mode",
    "percentile_cont",
    "percentile_disc",
    "range_agg",
    "range_intersect_agg",
    "regr_avgx",
    "regr_avgy",
    "regr_count",
    "regr_intercept",
    "regr_r2",
    "regr_slope",
    "regr_sxx",
    "regr_sxy",
    "regr_syy",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "string_agg",
    "sum",
    "var_pop",
    "var_samp",
    "variance",
    "xmlagg",
];

/// Functions that only exist as window functions (or as hypothetical-set
/// aggregates, which need `WITHIN GROUP`).
const WINDOW_FUNCTIONS: &[&str] = &[
    "cume_dist",
    "dense_rank",
    "first_value",
    "lag",
    "last_value",
    "lead",
    "nth_value",
    "ntile",
    "percent_rank",
    "rank",
    "row_number",
];

/// Prefix of the identifier standing for an aggregate inside a measure. It
/// starts with NUL, which no Postgres identifier can contain.
const PLACEHOLDER_PREFIX: &str = "\u{0}tally_aggregate_";

/// A refusal, before the view name is attached.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Problem {
    /// Valid SQL that Tally does not maintain.
    Unsupported(String),
    /// SQL that is wrong or ambiguous as a view definition.
    Invalid(String),
}

/// Postgres folds unquoted identifiers to lower case (ASCII only, in UTF-8
/// databases); quoted ones are kept as written.
pub(crate) fn fold(ident: &Ident) -> String {
    match ident.quote_style {
        None => ident.value.to_ascii_lowercase(),
        Some(_) => ident.value.clone(),
    }
}

/// `ident` as Postgres sees it, keeping its quoting so that it renders back
/// to the same identifier.
fn folded_ident(ident: &Ident) -> Ident {
    Ident {
        value: fold(ident),
        quote_style: ident.quote_style,
        span: ident.span,
    }
}

/// A function's name as Postgres resolves built-ins: folded, with an explicit
/// `pg_catalog.` accepted. `None` for functions in other schemas.
pub(crate) fn function_name(function: &Function) -> Option<String> {
    let parts: Vec<&Ident> = function
        .name
        .0
        .iter()
        .map(|part| part.as_ident())
        .collect::<Option<_>>()?;
    match parts.as_slice() {
        [name] => Some(fold(name)),
        [schema, name] if fold(schema) == "pg_catalog" => Some(fold(name)),
        _ => None,
    }
}

pub(crate) fn is_postgres_aggregate(function: &Function) -> bool {
    function_name(function).is_some_and(|name| POSTGRES_AGGREGATES.contains(&name.as_str()))
}

/// Whether `expr` calls an aggregate function anywhere.
pub(crate) fn contains_aggregate(expr: &Expr) -> bool {
    visit_expressions(expr, |node| match node {
        Expr::Function(function) if is_postgres_aggregate(function) => ControlFlow::Break(()),
        _ => ControlFlow::Continue(()),
    })
    .is_break()
}

/// The names by which column references may qualify the FROM table.
pub(crate) struct SourceScope {
    /// Each a folded qualifier path: `[alias]` when the table has an alias
    /// (Postgres then hides the table name), else `[table]` and `[schema, table]`.
    qualifiers: Vec<Vec<String>>,
    /// How the FROM table was written, for error messages.
    written: String,
}

impl SourceScope {
    pub(crate) fn new(schema: &str, table: &str, alias: Option<String>, written: String) -> Self {
        let qualifiers = match alias {
            Some(alias) => vec![vec![alias]],
            None => vec![
                vec![table.to_string()],
                vec![schema.to_string(), table.to_string()],
            ],
        };
        SourceScope {
            qualifiers,
            written,
        }
    }

    /// The column a qualified reference (`m.amount`) names, unqualified.
    fn resolve(&self, parts: &[Ident]) -> Result<Ident, Problem> {
        let Some((column, qualifier)) = parts.split_last() else {
            return Err(Problem::Invalid("empty column reference".to_string()));
        };
        let qualifier: Vec<String> = qualifier.iter().map(fold).collect();
        if self.qualifiers.contains(&qualifier) {
            return Ok(folded_ident(column));
        }
        let written: Vec<String> = parts.iter().map(ToString::to_string).collect();
        Err(Problem::Invalid(format!(
            "`{}` does not name a column of the FROM table `{}` \
             (qualify columns with the table's alias if it has one, or its name)",
            written.join("."),
            self.written
        )))
    }
}

/// Rewrites column references to bare, folded column names, so rendered
/// fragments evaluate over a row that has the source's columns by name,
/// whatever alias the FROM table had.
pub(crate) fn resolve_columns(expr: &mut Expr, scope: &SourceScope) -> Result<(), Problem> {
    struct Resolver<'a> {
        scope: &'a SourceScope,
    }

    impl VisitorMut for Resolver<'_> {
        type Break = Problem;

        fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<Problem> {
            match resolve_reference(expr, self.scope) {
                Ok(()) => ControlFlow::Continue(()),
                Err(problem) => ControlFlow::Break(problem),
            }
        }
    }

    match VisitMut::visit(expr, &mut Resolver { scope }) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(problem) => Err(problem),
    }
}

/// Resolves `expr` itself if it is a column reference; children are visited
/// afterwards by the caller.
fn resolve_reference(expr: &mut Expr, scope: &SourceScope) -> Result<(), Problem> {
    match expr {
        Expr::Identifier(ident) => *ident = folded_ident(ident),
        Expr::CompoundIdentifier(parts) => *expr = Expr::Identifier(scope.resolve(parts)?),
        Expr::CompoundFieldAccess { root, access_chain } => {
            // sqlparser reads `m.tags[1]` as `m` followed by `.tags` and `[1]`:
            // fold the leading dotted names back into one column reference.
            if let Expr::Identifier(first) = root.as_ref() {
                let mut parts = vec![first.clone()];
                for access in access_chain.iter() {
                    match access {
                        AccessExpr::Dot(Expr::Identifier(part)) => parts.push(part.clone()),
                        _ => break,
                    }
                }
                if parts.len() > 1 {
                    let dotted = parts.len() - 1;
                    **root = Expr::Identifier(scope.resolve(&parts)?);
                    access_chain.drain(..dotted);
                }
            }
            // Field names of composite values would be taken for columns.
            if access_chain
                .iter()
                .any(|access| matches!(access, AccessExpr::Dot(_)))
            {
                return Err(Problem::Unsupported(format!(
                    "field access on a composite value (`{expr}`) is not supported"
                )));
            }
            if access_chain.is_empty() {
                let bare =
                    std::mem::replace(root.as_mut(), Expr::value(sqlparser::ast::Value::Null));
                *expr = bare;
            }
        }
        Expr::Wildcard(_) | Expr::QualifiedWildcard(..) => {
            return Err(Problem::Unsupported(
                "`*` is not supported; list the columns".to_string(),
            ));
        }
        _ => {}
    }
    Ok(())
}

/// Refuses subqueries, window functions and grouping constructs in `expr`,
/// and aggregates too unless `aggregates_allowed` (they are then checked by
/// [`extract_aggregates`]). `context` says where `expr` stands, for messages.
pub(crate) fn check_expr(
    expr: &Expr,
    context: &str,
    aggregates_allowed: bool,
) -> Result<(), Problem> {
    struct Checker<'a> {
        context: &'a str,
        aggregates_allowed: bool,
    }

    impl Visitor for Checker<'_> {
        type Break = Problem;

        fn pre_visit_query(&mut self, _query: &Query) -> ControlFlow<Problem> {
            ControlFlow::Break(Problem::Unsupported(format!(
                "subqueries are not supported (found one in {})",
                self.context
            )))
        }

        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<Problem> {
            match check_node(expr, self.context, self.aggregates_allowed) {
                Ok(()) => ControlFlow::Continue(()),
                Err(problem) => ControlFlow::Break(problem),
            }
        }
    }

    let mut checker = Checker {
        context,
        aggregates_allowed,
    };
    match Visit::visit(expr, &mut checker) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(problem) => Err(problem),
    }
}

fn check_node(expr: &Expr, context: &str, aggregates_allowed: bool) -> Result<(), Problem> {
    match expr {
        Expr::Function(function) => check_function(function, context, aggregates_allowed),
        Expr::Exists { .. } | Expr::Subquery(_) => Err(Problem::Unsupported(format!(
            "subqueries are not supported (found one in {context})"
        ))),
        Expr::GroupingSets(_) | Expr::Cube(_) | Expr::Rollup(_) => Err(Problem::Unsupported(
            "GROUPING SETS, CUBE and ROLLUP are not supported; GROUP BY plain expressions"
                .to_string(),
        )),
        Expr::Wildcard(_) | Expr::QualifiedWildcard(..) => Err(Problem::Unsupported(
            "`*` is not supported; list the columns".to_string(),
        )),
        _ => Ok(()),
    }
}

fn check_function(
    function: &Function,
    context: &str,
    aggregates_allowed: bool,
) -> Result<(), Problem> {
    let shown = function.name.to_string();
    if function.over.is_some() {
        return Err(Problem::Unsupported(format!(
            "window functions (OVER) are not supported (found {shown} … OVER in {context})"
        )));
    }
    let name = function_name(function);
    if !function.within_group.is_empty() {
        return Err(Problem::Unsupported(format!(
            "ordered-set aggregate {} … WITHIN GROUP is not supported ({SUPPORTED_AGGREGATES})",
            shown.to_uppercase()
        )));
    }
    if name
        .as_deref()
        .is_some_and(|name| WINDOW_FUNCTIONS.contains(&name))
    {
        return Err(Problem::Unsupported(format!(
            "window function {shown} is not supported (found in {context})"
        )));
    }
    if name.as_deref() == Some("grouping") {
        return Err(Problem::Unsupported(
            "GROUPING() is not supported".to_string(),
        ));
    }
    if is_postgres_aggregate(function) {
        if aggregates_allowed {
            return Ok(());
        }
        return Err(Problem::Invalid(format!(
            "aggregate {} is not allowed in {context}",
            shown.to_uppercase()
        )));
    }
    if function.filter.is_some() {
        return Err(Problem::Invalid(format!(
            "FILTER is only allowed on aggregate functions, not on {shown}"
        )));
    }
    if let FunctionArguments::List(list) = &function.args {
        let has_star = list.args.iter().any(|arg| {
            matches!(
                arg,
                FunctionArg::Unnamed(
                    FunctionArgExpr::Wildcard
                        | FunctionArgExpr::QualifiedWildcard(_)
                        | FunctionArgExpr::WildcardWithOptions(_)
                )
            )
        });
        if has_star {
            return Err(Problem::Unsupported(format!(
                "`*` as a function argument is only supported in COUNT(*) (found in {shown}(…))"
            )));
        }
    }
    Ok(())
}

/// Equality of expressions as Postgres would judge it: identifiers folded,
/// quoting and redundant parentheses ignored (the tree keeps precedence).
pub(crate) fn same_expr(left: &Expr, right: &Expr) -> bool {
    canonical(left) == canonical(right)
}

fn canonical(expr: &Expr) -> Expr {
    struct Canonicalizer;

    impl VisitorMut for Canonicalizer {
        type Break = ();

        fn pre_visit_ident(&mut self, ident: &mut Ident) -> ControlFlow<()> {
            ident.value = fold(ident);
            ident.quote_style = None;
            ControlFlow::Continue(())
        }

        fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
            if let Expr::Nested(inner) = expr {
                let inner =
                    std::mem::replace(inner.as_mut(), Expr::value(sqlparser::ast::Value::Null));
                *expr = inner;
            }
            ControlFlow::Continue(())
        }
    }

    let mut copy = expr.clone();
    let _ = VisitMut::visit(&mut copy, &mut Canonicalizer);
    copy
}

/// The folded names of the columns `expr` references (after [`resolve_columns`]).
pub(crate) fn collect_columns(expr: &Expr, columns: &mut BTreeSet<String>) {
    let _ = visit_expressions(expr, |node| {
        if let Expr::Identifier(ident) = node {
            columns.insert(ident.value.clone());
        }
        ControlFlow::<()>::Continue(())
    });
}

/// The first bare column reference in `expr`, ignoring aggregate placeholders.
pub(crate) fn first_column(expr: &Expr) -> Option<Ident> {
    let found = visit_expressions(expr, |node| match node {
        Expr::Identifier(ident) if placeholder_index(node).is_none() => {
            ControlFlow::Break(ident.clone())
        }
        _ => ControlFlow::Continue(()),
    });
    match found {
        ControlFlow::Break(ident) => Some(ident),
        ControlFlow::Continue(()) => None,
    }
}

fn aggregate_placeholder(index: usize) -> Expr {
    Expr::Identifier(Ident::with_quote(
        '"',
        format!("{PLACEHOLDER_PREFIX}{index}"),
    ))
}

/// The aggregate index `expr` stands for, if it is a placeholder.
pub(crate) fn placeholder_index(expr: &Expr) -> Option<usize> {
    match expr {
        Expr::Identifier(ident) => ident.value.strip_prefix(PLACEHOLDER_PREFIX)?.parse().ok(),
        _ => None,
    }
}

/// The view's distinct aggregate calls, with the expressions that identify
/// them structurally.
#[derive(Default)]
pub(crate) struct AggregateSet {
    entries: Vec<(AggregateKey, Aggregate)>,
}

/// Structural identity of an aggregate call.
#[derive(PartialEq)]
struct AggregateKey {
    kind: AggKind,
    arg: Option<Expr>,
    filter: Option<Expr>,
}

impl AggregateSet {
    pub(crate) fn into_aggregates(self) -> Vec<Aggregate> {
        self.entries
            .into_iter()
            .map(|(_, aggregate)| aggregate)
            .collect()
    }

    fn index_of(&mut self, kind: AggKind, arg: Option<&Expr>, filter: Option<&Expr>) -> usize {
        let key = AggregateKey {
            kind,
            arg: arg.map(canonical),
            filter: filter.map(canonical),
        };
        if let Some(index) = self.entries.iter().position(|(known, _)| *known == key) {
            return index;
        }
        let aggregate = Aggregate {
            kind,
            arg: arg.map(ToString::to_string),
            filter: filter.map(ToString::to_string),
        };
        self.entries.push((key, aggregate));
        self.entries.len() - 1
    }
}

/// Replaces every aggregate call in `expr` (already resolved and checked
/// with [`check_expr`]) by a placeholder for its index in `aggregates`.
pub(crate) fn extract_aggregates(
    expr: &mut Expr,
    aggregates: &mut AggregateSet,
) -> Result<(), Problem> {
    struct Extractor<'a> {
        aggregates: &'a mut AggregateSet,
    }

    impl VisitorMut for Extractor<'_> {
        type Break = Problem;

        fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<Problem> {
            let Expr::Function(function) = expr else {
                return ControlFlow::Continue(());
            };
            if !is_postgres_aggregate(function) {
                return ControlFlow::Continue(());
            }
            match aggregate_call(function, self.aggregates) {
                Ok(index) => {
                    // The placeholder has no sub-expressions, so the
                    // visitor does not descend into the replaced call.
                    *expr = aggregate_placeholder(index);
                    ControlFlow::Continue(())
                }
                Err(problem) => ControlFlow::Break(problem),
            }
        }
    }

    match VisitMut::visit(expr, &mut Extractor { aggregates }) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(problem) => Err(problem),
    }
}

/// Checks one aggregate call and returns its index in `aggregates`.
fn aggregate_call(function: &Function, aggregates: &mut AggregateSet) -> Result<usize, Problem> {
    let name = function_name(function).unwrap_or_default();
    let shown = name.to_uppercase();
    let kind = match name.as_str() {
        "sum" => AggKind::Sum,
        "avg" => AggKind::Avg,
        "count" => AggKind::Count,
        _ => {
            return Err(Problem::Unsupported(format!(
                "{shown} is not supported yet ({SUPPORTED_AGGREGATES})"
            )));
        }
    };
    let unsupported_form = |what: &str| {
        Problem::Unsupported(format!(
            "{shown}(…) with {what} is not supported ({SUPPORTED_AGGREGATES})"
        ))
    };
    if function.null_treatment.is_some() {
        return Err(unsupported_form("IGNORE/RESPECT NULLS"));
    }
    if !matches!(function.parameters, FunctionArguments::None) || function.uses_odbc_syntax {
        return Err(unsupported_form("this call syntax"));
    }
    let list = match &function.args {
        FunctionArguments::List(list) => list,
        FunctionArguments::Subquery(_) => {
            return Err(Problem::Unsupported(format!(
                "subqueries are not supported (found one in {shown}(…))"
            )));
        }
        FunctionArguments::None => {
            return Err(Problem::Invalid(format!("{shown} needs an argument list")));
        }
    };
    if list.duplicate_treatment == Some(DuplicateTreatment::Distinct) {
        return Err(Problem::Unsupported(format!(
            "DISTINCT aggregates ({shown}(DISTINCT …)) are not supported ({SUPPORTED_AGGREGATES})"
        )));
    }
    if !list.clauses.is_empty() {
        return Err(unsupported_form("ORDER BY or other clauses"));
    }
    let [FunctionArg::Unnamed(arg)] = list.args.as_slice() else {
        return Err(Problem::Invalid(format!(
            "{shown} takes exactly one argument ({SUPPORTED_AGGREGATES})"
        )));
    };
    let (kind, arg) = match (kind, arg) {
        (AggKind::Count, FunctionArgExpr::Wildcard) => (AggKind::CountStar, None),
        (_, FunctionArgExpr::Expr(arg)) => {
            check_expr(arg, &format!("the argument of {shown}"), false)?;
            (kind, Some(arg))
        }
        (_, FunctionArgExpr::Wildcard) => {
            return Err(Problem::Invalid(format!(
                "{shown}(*) is not valid; only COUNT takes *"
            )));
        }
        (_, other) => {
            return Err(Problem::Unsupported(format!(
                "{shown}({other}) is not supported ({SUPPORTED_AGGREGATES})"
            )));
        }
    };
    let filter = function.filter.as_deref();
    if let Some(filter) = filter {
        check_expr(filter, &format!("the FILTER of {shown}"), false)?;
    }
    Ok(aggregates.index_of(kind, arg, filter))
}
