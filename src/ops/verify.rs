//! `tally verify`: does every view table equal its `SELECT` on the source?

use std::fmt::Write as _;

use serde_json::Value;
use thiserror::Error;
use tokio_postgres::Client;

use crate::apply::Model;
use crate::db::describe;

#[derive(Debug, Error)]
pub enum VerifyError {
    #[error("view \"{view}\": running its SELECT on the source failed: {message}")]
    Source { view: String, message: String },
    #[error("view \"{view}\": reading its table in the target failed: {message}")]
    Target { view: String, message: String },
}

/// One row where a view table and its query on the source disagree.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    pub view: String,
    /// The group key (an object of group columns; empty without groups).
    pub key: Value,
    /// What the source query returns; `None`: the source has no such row.
    pub expected: Option<Value>,
    /// What the view table holds; `None`: the table has no such row.
    pub found: Option<Value>,
    /// The columns whose values differ (all of them when a row is missing).
    pub columns: Vec<String>,
}

/// Compares every view; returns all differences (empty when equal).
pub async fn verify_views(
    source: &Client,
    target: &Client,
    model: &Model,
) -> Result<Vec<Difference>, VerifyError> {
    let mut differences = Vec::new();
    for view in model.views() {
        let expected: String = source
            .query_one(&view.expected_rows_sql(), &[])
            .await
            .map_err(|err| VerifyError::Source {
                view: view.name().to_string(),
                message: describe(&err),
            })?
            .get(0);
        let rows = target
            .query(&view.compare_sql(), &[&expected])
            .await
            .map_err(|err| VerifyError::Target {
                view: view.name().to_string(),
                message: describe(&err),
            })?;
        for row in rows {
            differences.push(Difference {
                view: view.name().to_string(),
                key: row.get(0),
                expected: row.get(1),
                found: row.get(2),
                columns: serde_json::from_value(row.get(3)).unwrap_or_default(),
            });
        }
    }
    Ok(differences)
}

/// A readable report: one line per difference, at most `limit` lines, then
/// totals per view.
pub fn render_report(differences: &[Difference], views_checked: usize, limit: usize) -> String {
    let mut out = String::new();
    if differences.is_empty() {
        let _ = writeln!(
            out,
            "verify: all {views_checked} views equal their SELECT on the source"
        );
        return out;
    }
    let _ = writeln!(
        out,
        "{:<24} {:<32} {:<40} found",
        "view", "group key", "expected"
    );
    for difference in differences.iter().take(limit) {
        let show = |v: &Option<Value>| v.as_ref().map_or("(no row)".to_string(), Value::to_string);
        let _ = writeln!(
            out,
            "{:<24} {:<32} {:<40} {}",
            difference.view,
            difference.key.to_string(),
            show(&difference.expected),
            show(&difference.found)
        );
    }
    if differences.len() > limit {
        let _ = writeln!(out, "… and {} more", differences.len() - limit);
    }
    let mut per_view: Vec<(&str, usize)> = Vec::new();
    for difference in differences {
        match per_view.iter_mut().find(|(v, _)| *v == difference.view) {
            Some((_, n)) => *n += 1,
            None => per_view.push((&difference.view, 1)),
        }
    }
    let summary: Vec<String> = per_view.iter().map(|(v, n)| format!("{v}: {n}")).collect();
    let _ = writeln!(
        out,
        "verify: DRIFT in {} of {views_checked} views ({} rows differ; {})",
        per_view.len(),
        differences.len(),
        summary.join(", ")
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn report_lists_rows_and_totals() {
        let differences = vec![
            Difference {
                view: "balance".into(),
                key: json!({"customer_id": 1}),
                expected: Some(json!({"customer_id": 1, "balance": "10.00"})),
                found: Some(json!({"customer_id": 1, "balance": "12.00"})),
                columns: vec!["balance".into()],
            },
            Difference {
                view: "balance".into(),
                key: json!({"customer_id": 2}),
                expected: None,
                found: Some(json!({"customer_id": 2, "balance": "1.00"})),
                columns: vec!["customer_id".into(), "balance".into()],
            },
        ];
        let report = render_report(&differences, 3, 1);
        assert!(report.contains("\"balance\":\"10.00\""), "{report}");
        assert!(report.contains("… and 1 more"), "{report}");
        assert!(
            report.contains("DRIFT in 1 of 3 views (2 rows differ; balance: 2)"),
            "{report}"
        );
        assert!(render_report(&[], 3, 10).contains("all 3 views equal"));
    }
}
