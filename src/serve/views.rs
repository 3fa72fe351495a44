//! Reading view tables for the API: `GET /api/views` lists them,
//! `GET /api/views/{name}?col=value` returns rows, filtered on group
//! columns.
//!
//! Filter columns are checked against the view's group columns (only
//! those are keys; filtering on a measure would be a scan) and quoted;
//! values are bound as text parameters and cast to the column's type by
//! Postgres, so a wrong value is a 400 and never SQL. Rows come back as
//! JSON built by Postgres, passed through as text: numerics keep every
//! digit.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::{ServeError, Shared};
use crate::event::quote_ident;
use crate::views::OutputSource;
use crate::views::table::ViewTable;

/// At most this many rows per answer; a view with more is an analytics
/// table to query with SQL, not over HTTP.
pub const ROW_LIMIT: i64 = 10_000;

/// `{columns}`, `{table}`, `{where}`, `{order}` are quoted identifiers
/// and `$n` placeholders built by [`select_sql`]; the limit is the last
/// parameter.
const SELECT_ROWS: &str = "SELECT coalesce(json_agg(r), '[]')::text FROM (SELECT {columns} FROM {table}{where}{order} LIMIT ${limit}) r";

/// A view's visible columns and its filterable group columns with their
/// SQL types.
pub struct ViewShape<'a> {
    pub columns: Vec<&'a str>,
    pub keys: Vec<(&'a str, &'a str)>,
}

pub fn shape(view: &ViewTable) -> ViewShape<'_> {
    let columns = view.def.outputs.iter().map(|o| o.name.as_str()).collect();
    let keys = view
        .def
        .outputs
        .iter()
        .filter_map(|o| match o.source {
            OutputSource::Group(g) => Some((
                o.name.as_str(),
                view.group_types.get(g).map_or("text", String::as_str),
            )),
            OutputSource::Measure(_) => None,
        })
        .collect();
    ViewShape { columns, keys }
}

/// The SELECT for `view` filtered on `filters` (column names already
/// checked), whose values are parameters `$1..`, the limit last.
pub fn select_sql(view: &ViewTable, filters: &[(&str, &str)]) -> String {
    let shape = shape(view);
    let columns: Vec<String> = shape.columns.iter().map(|c| quote_ident(c)).collect();
    let conditions: Vec<String> = filters
        .iter()
        .enumerate()
        .map(|(i, (column, sql_type))| {
            format!(
                "{} = CAST(${}::text AS {sql_type})",
                quote_ident(column),
                i + 1
            )
        })
        .collect();
    let where_sql = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };
    let order: Vec<String> = shape.keys.iter().map(|(c, _)| quote_ident(c)).collect();
    let order_sql = if order.is_empty() {
        String::new()
    } else {
        format!(" ORDER BY {}", order.join(", "))
    };
    SELECT_ROWS
        .replace("{columns}", &columns.join(", "))
        .replace("{table}", &view.quoted_name())
        .replace("{where}", &where_sql)
        .replace("{order}", &order_sql)
        .replace("{limit}", &(filters.len() + 1).to_string())
}

pub fn find<'a>(state: &'a Shared, name: &str) -> Result<&'a ViewTable, ServeError> {
    state
        .model
        .views()
        .find(|v| v.name() == name)
        .ok_or_else(|| ServeError::NoSuchView(name.to_string()))
}

/// The rows of `view` matching `filters` (group column = value), as a
/// JSON array in text.
pub async fn read_rows(
    state: &Shared,
    view: &ViewTable,
    filters: &BTreeMap<String, String>,
) -> Result<String, ServeError> {
    let shape = shape(view);
    let mut checked: Vec<(&str, &str)> = Vec::new();
    let mut values: Vec<&str> = Vec::new();
    for (column, value) in filters {
        let Some(key) = shape.keys.iter().find(|(c, _)| c == column) else {
            let keys: Vec<&str> = shape.keys.iter().map(|(c, _)| *c).collect();
            return Err(ServeError::BadRequest(format!(
                "view \"{}\" cannot be filtered on {column:?}; its group columns are: {}",
                view.name(),
                if keys.is_empty() {
                    "(none: it has one row)".to_string()
                } else {
                    keys.join(", ")
                }
            )));
        };
        checked.push(*key);
        values.push(value);
    }
    let sql = select_sql(view, &checked);
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
    for value in &values {
        params.push(value);
    }
    params.push(&ROW_LIMIT);
    let client = state.target.get().await?;
    let rows: String = client.query_one(&sql, &params).await?.get(0);
    Ok(rows)
}

fn json(body: String) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn describe_view(view: &ViewTable) -> serde_json::Value {
    let shape = shape(view);
    serde_json::json!({
        "name": view.name(),
        "source": view.def.source.to_string(),
        "columns": shape.columns,
        "group_columns": shape.keys.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
    })
}

/// `GET /api/views`: every view with its columns.
pub async fn list(State(state): State<Shared>) -> Response {
    let views: Vec<serde_json::Value> = state.model.views().map(describe_view).collect();
    json(serde_json::json!({ "views": views }).to_string())
}

/// `GET /api/views/{name}`: the view's rows, filtered by query parameters.
pub async fn one(
    State(state): State<Shared>,
    Path(name): Path<String>,
    Query(filters): Query<BTreeMap<String, String>>,
) -> Result<Response, ServeError> {
    let view = find(&state, &name)?;
    let rows = read_rows(&state, view, &filters).await?;
    Ok(json(format!(
        "{{\"view\":{},\"columns\":{},\"rows\":{rows}}}",
        serde_json::Value::from(view.name()),
        serde_json::json!(shape(view).columns),
    )))
}
