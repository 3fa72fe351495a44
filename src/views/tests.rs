use std::collections::BTreeSet;

use super::*;

fn parse_one(sql: &str) -> ViewDef {
    let mut views = match parse_views(sql) {
        Ok(views) => views,
        Err(error) => panic!("{sql}\nshould parse, got: {error}"),
    };
    assert_eq!(views.len(), 1, "{sql}");
    views.remove(0)
}

fn error_of(sql: &str) -> String {
    match parse_views(sql) {
        Ok(views) => panic!("{sql}\nshould be refused, parsed as {views:#?}"),
        Err(error) => error.to_string(),
    }
}

fn columns(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|name| name.to_string()).collect()
}

fn group(column: &str, expr: &str, visible: bool) -> GroupColumn {
    GroupColumn {
        column: column.to_string(),
        expr: expr.to_string(),
        visible,
    }
}

fn aggregate(kind: AggKind, arg: Option<&str>, filter: Option<&str>) -> Aggregate {
    Aggregate {
        kind,
        arg: arg.map(str::to_string),
        filter: filter.map(str::to_string),
    }
}

/// Outputs as (name, "group N" or the measure rendered with `aN`).
fn outputs(view: &ViewDef) -> Vec<(String, String)> {
    view.outputs
        .iter()
        .map(|output| {
            let source = match &output.source {
                OutputSource::Group(index) => format!("group {index}"),
                OutputSource::Measure(measure) => measure.render(&|index| format!("a{index}")),
            };
            (output.name.clone(), source)
        })
        .collect()
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected
        .iter()
        .map(|(name, source)| (name.to_string(), source.to_string()))
        .collect()
}

#[test]
fn invoice_total() {
    let view = parse_one(
        "CREATE MATERIALIZED VIEW invoice_total AS \
         SELECT SUM(total) AS total, COUNT(*) AS invoices FROM invoices;",
    );
    assert_eq!(view.name, "invoice_total");
    assert_eq!(view.source, TableName::public("invoices"));
    assert_eq!(
        view.select_sql,
        r#"SELECT SUM(total) AS total, COUNT(*) AS invoices FROM "public"."invoices""#
    );
    assert_eq!(view.filter, None);
    assert_eq!(view.groups, vec![]);
    assert_eq!(
        view.aggregates,
        vec![
            aggregate(AggKind::Sum, Some("total"), None),
            aggregate(AggKind::CountStar, None, None),
        ]
    );
    assert_eq!(
        outputs(&view),
        pairs(&[("total", "(a0)"), ("invoices", "(a1)")])
    );
    assert_eq!(view.columns_read, columns(&["total"]));
}

#[test]
fn customer_balance() {
    let view = parse_one(
        "CREATE MATERIALIZED VIEW customer_balance AS \
         SELECT customer_id, SUM(amount) AS balance, COUNT(*) AS movements \
         FROM movements WHERE voided_at IS NULL GROUP BY customer_id;",
    );
    assert_eq!(view.name, "customer_balance");
    assert_eq!(view.source, TableName::public("movements"));
    assert_eq!(view.filter.as_deref(), Some("voided_at IS NULL"));
    assert_eq!(view.groups, vec![group("customer_id", "customer_id", true)]);
    assert_eq!(
        view.aggregates,
        vec![
            aggregate(AggKind::Sum, Some("amount"), None),
            aggregate(AggKind::CountStar, None, None),
        ]
    );
    assert_eq!(
        outputs(&view),
        pairs(&[
            ("customer_id", "group 0"),
            ("balance", "(a0)"),
            ("movements", "(a1)"),
        ])
    );
    assert_eq!(
        view.columns_read,
        columns(&["amount", "customer_id", "voided_at"])
    );
}

#[test]
fn article_words() {
    let view = parse_one(
        r"CREATE MATERIALIZED VIEW article_words AS
          SELECT article_id,
                 SUM(COALESCE(array_length(regexp_split_to_array(trim(body), '\s+'), 1), 0)) AS words,
                 COUNT(*) AS paragraphs
          FROM paragraphs
          WHERE deleted_at IS NULL AND trim(body) <> ''
          GROUP BY article_id;",
    );
    assert_eq!(view.name, "article_words");
    assert_eq!(view.source, TableName::public("paragraphs"));
    // sqlparser reads trim(…) as the TRIM construct and prints it upper case.
    assert_eq!(
        view.filter.as_deref(),
        Some("deleted_at IS NULL AND TRIM(body) <> ''")
    );
    assert_eq!(view.groups, vec![group("article_id", "article_id", true)]);
    assert_eq!(
        view.aggregates,
        vec![
            aggregate(
                AggKind::Sum,
                Some(r"COALESCE(array_length(regexp_split_to_array(TRIM(body), '\s+'), 1), 0)"),
                None
            ),
            aggregate(AggKind::CountStar, None, None),
        ]
    );
    assert_eq!(
        outputs(&view),
        pairs(&[
            ("article_id", "group 0"),
            ("words", "(a0)"),
            ("paragraphs", "(a1)"),
        ])
    );
    assert_eq!(
        view.columns_read,
        columns(&["article_id", "body", "deleted_at"])
    );
}

#[test]
fn project_completion() {
    let view = parse_one(
        "CREATE MATERIALIZED VIEW project_completion AS \
         SELECT project_id, COUNT(*) FILTER (WHERE status = 'done') AS done, COUNT(*) AS total, \
                ROUND(COUNT(*) FILTER (WHERE status = 'done')::numeric / COUNT(*), 4) AS ratio \
         FROM tasks GROUP BY project_id;",
    );
    assert_eq!(view.name, "project_completion");
    assert_eq!(view.source, TableName::public("tasks"));
    assert_eq!(view.filter, None);
    assert_eq!(view.groups, vec![group("project_id", "project_id", true)]);
    assert_eq!(
        view.aggregates,
        vec![
            aggregate(AggKind::CountStar, None, Some("status = 'done'")),
            aggregate(AggKind::CountStar, None, None),
        ]
    );
    assert_eq!(
        outputs(&view),
        pairs(&[
            ("project_id", "group 0"),
            ("done", "(a0)"),
            ("total", "(a1)"),
            ("ratio", "ROUND((a0)::NUMERIC / (a1), 4)"),
        ])
    );
    assert_eq!(view.columns_read, columns(&["project_id", "status"]));
    let OutputSource::Measure(ratio) = &view.outputs[3].source else {
        panic!("ratio should be a measure");
    };
    assert_eq!(ratio.aggregate_refs(), vec![0, 1]);
    assert_eq!(ratio.single_aggregate(), None);
}

#[test]
fn daily_sales() {
    let view = parse_one(
        "CREATE MATERIALIZED VIEW daily_sales AS \
         SELECT date_trunc('day', created_at) AS day, SUM(total) AS total \
         FROM invoices GROUP BY 1;",
    );
    assert_eq!(view.name, "daily_sales");
    assert_eq!(view.source, TableName::public("invoices"));
    assert_eq!(
        view.groups,
        vec![group("day", "date_trunc('day', created_at)", true)]
    );
    assert_eq!(
        view.aggregates,
        vec![aggregate(AggKind::Sum, Some("total"), None)]
    );
    assert_eq!(
        outputs(&view),
        pairs(&[("day", "group 0"), ("total", "(a0)")])
    );
    assert_eq!(view.columns_read, columns(&["created_at", "total"]));
}

#[test]
fn product_rating() {
    let view = parse_one(
        "CREATE MATERIALIZED VIEW product_rating AS \
         SELECT product_id, AVG(stars) AS average, COUNT(stars) AS ratings \
         FROM ratings GROUP BY product_id;",
    );
    assert_eq!(view.name, "product_rating");
    assert_eq!(view.source, TableName::public("ratings"));
    assert_eq!(view.groups, vec![group("product_id", "product_id", true)]);
    assert_eq!(
        view.aggregates,
        vec![
            aggregate(AggKind::Avg, Some("stars"), None),
            aggregate(AggKind::Count, Some("stars"), None),
        ]
    );
    assert_eq!(
        outputs(&view),
        pairs(&[
            ("product_id", "group 0"),
            ("average", "(a0)"),
            ("ratings", "(a1)"),
        ])
    );
    assert_eq!(view.columns_read, columns(&["product_id", "stars"]));
}

#[test]
fn several_views_with_comments() {
    let views = parse_views(
        "-- balances per customer\n\
         CREATE MATERIALIZED VIEW a AS SELECT SUM(x) AS s FROM t; /* block\n comment */\n\
         CREATE MATERIALIZED VIEW b AS SELECT COUNT(*) AS n FROM u -- trailing\n;",
    )
    .expect("parses");
    let names: Vec<&str> = views.iter().map(|view| view.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
}

#[test]
fn empty_file_has_no_views() {
    assert_eq!(parse_views("-- nothing yet\n").expect("parses"), vec![]);
}

#[test]
fn measure_render_example() {
    let view = parse_one(
        "CREATE MATERIALIZED VIEW share AS \
         SELECT COUNT(*) FILTER (WHERE done)::numeric / NULLIF(COUNT(*), 0) AS done_share FROM tasks;",
    );
    assert_eq!(
        view.aggregates,
        vec![
            aggregate(AggKind::CountStar, None, Some("done")),
            aggregate(AggKind::CountStar, None, None),
        ]
    );
    assert_eq!(
        outputs(&view),
        pairs(&[("done_share", "(a0)::NUMERIC / NULLIF((a1), 0)")])
    );
}

#[test]
fn bare_aggregates_are_named_like_postgres() {
    let view = parse_one(
        "CREATE MATERIALIZED VIEW v AS SELECT k, SUM(x), count(*), Avg(y) FROM t GROUP BY k;",
    );
    let names: Vec<&str> = view.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["k", "sum", "count", "avg"]);
    let OutputSource::Measure(sum) = &view.outputs[1].source else {
        panic!("sum should be a measure");
    };
    assert_eq!(sum.single_aggregate(), Some(0));
}

#[test]
fn identifiers_fold_like_postgres() {
    let view = parse_one(
        r#"CREATE MATERIALIZED VIEW "Regional Totals" AS
           SELECT "Region", Kind, SUM(Amount) AS "Total", COUNT(*) AS N
           FROM Sales.Orders WHERE "Region" <> '' GROUP BY "Region", KIND;"#,
    );
    assert_eq!(view.name, "Regional Totals");
    assert_eq!(view.source, TableName::new("sales", "orders"));
    assert_eq!(
        view.groups,
        vec![
            group("Region", r#""Region""#, true),
            group("kind", "kind", true)
        ]
    );
    assert_eq!(
        view.aggregates,
        vec![
            aggregate(AggKind::Sum, Some("amount"), None),
            aggregate(AggKind::CountStar, None, None),
        ]
    );
    let names: Vec<&str> = view.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["Region", "kind", "Total", "n"]);
    assert_eq!(view.columns_read, columns(&["Region", "amount", "kind"]));
    assert_eq!(view.filter.as_deref(), Some(r#""Region" <> ''"#));
}

#[test]
fn table_alias_and_qualifiers_are_stripped_from_fragments() {
    let view = parse_one(
        "CREATE MATERIALIZED VIEW balance AS \
         SELECT m.customer_id, SUM(m.amount) FILTER (WHERE m.kind = 'credit') AS credit \
         FROM public.movements AS m WHERE m.voided_at IS NULL GROUP BY m.customer_id;",
    );
    assert_eq!(view.source, TableName::public("movements"));
    assert_eq!(view.filter.as_deref(), Some("voided_at IS NULL"));
    assert_eq!(view.groups, vec![group("customer_id", "customer_id", true)]);
    assert_eq!(
        view.aggregates,
        vec![aggregate(
            AggKind::Sum,
            Some("amount"),
            Some("kind = 'credit'")
        )]
    );
    assert_eq!(
        view.columns_read,
        columns(&["amount", "customer_id", "kind", "voided_at"])
    );
    // The SELECT itself keeps its alias, which it needs.
    assert!(
        view.select_sql
            .contains(r#"FROM "public"."movements" AS m WHERE m.voided_at IS NULL"#),
        "{}",
        view.select_sql
    );
}

#[test]
fn table_name_qualifies_columns_without_alias() {
    let view = parse_one(
        "CREATE MATERIALIZED VIEW v AS \
         SELECT movements.customer_id AS customer, SUM(public.movements.amount) AS total, \
                SUM(movements.tags[1]) AS first_tag \
         FROM movements GROUP BY customer_id;",
    );
    assert_eq!(view.groups, vec![group("customer", "customer_id", true)]);
    assert_eq!(
        view.aggregates,
        vec![
            aggregate(AggKind::Sum, Some("amount"), None),
            aggregate(AggKind::Sum, Some("tags[1]"), None),
        ]
    );
}

#[test]
fn group_by_alias_ordinal_and_hidden_expressions() {
    let view = parse_one(
        "CREATE MATERIALIZED VIEW v AS \
         SELECT date_trunc('month', created_at) AS month, region AS area, SUM(total) AS total \
         FROM invoices GROUP BY month, 2, currency, lower(channel);",
    );
    assert_eq!(
        view.groups,
        vec![
            group("month", "date_trunc('month', created_at)", true),
            group("area", "region", true),
            group("_tally_g2", "currency", false),
            group("_tally_g3", "lower(channel)", false),
        ]
    );
    assert_eq!(
        outputs(&view),
        pairs(&[("month", "group 0"), ("area", "group 1"), ("total", "(a0)")])
    );
    assert_eq!(
        view.columns_read,
        columns(&["channel", "created_at", "currency", "region", "total"])
    );
}

#[test]
fn select_items_match_group_expressions_structurally() {
    let view = parse_one(
        "CREATE MATERIALIZED VIEW v AS \
         SELECT DATE_TRUNC('day', t.Created_At) AS day, SUM(x) AS s \
         FROM things t GROUP BY (date_trunc('day', created_at)), date_trunc('day', \"created_at\");",
    );
    assert_eq!(view.groups.len(), 1, "{:?}", view.groups);
    assert!(view.groups[0].visible);
    assert_eq!(view.groups[0].column, "day");
}

#[test]
fn aggregates_are_deduplicated_structurally() {
    let view = parse_one(
        "CREATE MATERIALIZED VIEW v AS \
         SELECT SUM(x) AS a, sum(X) AS b, SUM((x)) / COUNT(*) AS c, SUM(x) FILTER (WHERE y) AS d \
         FROM t;",
    );
    assert_eq!(
        view.aggregates,
        vec![
            aggregate(AggKind::Sum, Some("x"), None),
            aggregate(AggKind::CountStar, None, None),
            aggregate(AggKind::Sum, Some("x"), Some("y")),
        ]
    );
    assert_eq!(
        outputs(&view),
        pairs(&[
            ("a", "(a0)"),
            ("b", "(a0)"),
            ("c", "(a0) / (a1)"),
            ("d", "(a2)")
        ])
    );
}

#[test]
fn row_level_expressions_are_accepted() {
    let view = parse_one(
        "CREATE MATERIALIZED VIEW v AS \
         SELECT CASE WHEN amount > 0 THEN 'in' ELSE 'out' END AS direction, \
                SUM(CAST(amount AS numeric(12, 2))) AS total, \
                AVG(EXTRACT(EPOCH FROM closed_at - opened_at)) AS seconds, \
                COUNT(note) FILTER (WHERE note ILIKE '%urgent%' AND tags @> ARRAY['x']) AS urgent \
         FROM tickets WHERE status IN ('open', 'closed') AND opened_at >= '2020-01-01'::date \
         GROUP BY 1;",
    );
    assert_eq!(
        view.groups,
        vec![group(
            "direction",
            "CASE WHEN amount > 0 THEN 'in' ELSE 'out' END",
            true
        )]
    );
    assert_eq!(view.aggregates.len(), 3);
    assert_eq!(
        view.columns_read,
        columns(&["amount", "closed_at", "note", "opened_at", "status", "tags"])
    );
}

#[test]
fn load_views_reads_the_file_and_names_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("views.sql");
    std::fs::write(
        &path,
        "CREATE MATERIALIZED VIEW a AS SELECT SUM(x) AS s FROM t;",
    )
    .expect("write");
    let views = load_views(&path).expect("loads");
    assert_eq!(views[0].name, "a");

    std::fs::write(
        &path,
        "CREATE MATERIALIZED VIEW a AS SELECT MIN(x) AS s FROM t;",
    )
    .expect("write");
    let error = load_views(&path).expect_err("refused");
    assert_eq!(error.view(), Some("a"));
    assert!(
        error.to_string().contains(&path.display().to_string()),
        "{error}"
    );

    let missing = dir.path().join("missing.sql");
    let error = load_views(&missing).expect_err("missing file");
    assert!(matches!(error, ViewError::Read { .. }));
    assert!(
        error.to_string().contains(&missing.display().to_string()),
        "{error}"
    );
}

/// Each refused construct: the SQL and words the message must contain
/// besides the view's name.
const REFUSED: &[(&str, &[&str])] = &[
    (
        "CREATE MATERIALIZED VIEW v AS SELECT a.k, SUM(b.x) AS s FROM a JOIN b ON a.id = b.id GROUP BY a.k",
        &["JOIN"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT SUM(x) AS s FROM a, b",
        &["more than one FROM table"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT SUM(x) AS s FROM t WHERE k IN (SELECT k FROM u)",
        &["subqueries"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT SUM(x) AS s FROM t WHERE EXISTS (SELECT 1 FROM u)",
        &["subqueries"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT SUM((SELECT max(y) FROM u)) AS s FROM t",
        &["subqueries"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT SUM(x) AS s FROM (SELECT x FROM t) AS sub",
        &["subqueries in FROM"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS WITH c AS (SELECT x FROM t) SELECT SUM(x) AS s FROM c",
        &["CTEs (WITH"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT SUM(x) OVER () AS s FROM t",
        &["window functions (OVER)"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT k, row_number() AS r, SUM(x) AS s FROM t GROUP BY k",
        &["window function row_number"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT COUNT(DISTINCT x) AS n FROM t",
        &["DISTINCT aggregates", "COUNT(DISTINCT"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT DISTINCT k, SUM(x) AS s FROM t GROUP BY k",
        &["SELECT DISTINCT"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT k, SUM(x) AS s FROM t GROUP BY k HAVING SUM(x) > 0",
        &["HAVING"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT k, SUM(x) AS s FROM t GROUP BY k ORDER BY k",
        &["ORDER BY"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT k, SUM(x) AS s FROM t GROUP BY k LIMIT 10",
        &["LIMIT"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT MIN(x) AS m FROM t",
        &[
            "MIN is not supported yet",
            "supported aggregates: SUM, COUNT(*), COUNT(expr), AVG",
        ],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT k, MAX(x) AS m FROM t GROUP BY k",
        &["MAX is not supported yet"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT k, string_agg(name, ',') AS names FROM t GROUP BY k",
        &["STRING_AGG is not supported yet"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT array_agg(x) AS xs FROM t",
        &["ARRAY_AGG is not supported yet"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT bool_and(ok) AS all_ok FROM t",
        &["BOOL_AND is not supported yet"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT SUM(x) / stddev(x) AS z FROM t",
        &["STDDEV is not supported yet"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY x) AS m FROM t",
        &["WITHIN GROUP"],
    ),
    (
        "CREATE VIEW v AS SELECT SUM(x) AS s FROM t",
        &["CREATE VIEW", "use CREATE MATERIALIZED VIEW"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT * FROM t",
        &["SELECT *"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT k FROM t GROUP BY k",
        &["no aggregate"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT COUNT(*) AS n",
        &["without FROM"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT SUM(x) AS s FROM t UNION SELECT SUM(y) AS s FROM u",
        &["UNION"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT SUM(x) AS s FROM t WHERE SUM(x) > 0",
        &["aggregate SUM is not allowed in WHERE"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT SUM(COUNT(*)) AS s FROM t",
        &["aggregate COUNT is not allowed in the argument of SUM"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT k, SUM(x) AS s FROM t GROUP BY 2",
        &["aggregate SUM is not allowed in GROUP BY"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT k, SUM(x) AS s FROM t GROUP BY ROLLUP (k)",
        &["ROLLUP"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT k, SUM(x) AS s FROM t GROUP BY 3",
        &["GROUP BY position 3"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT k, j, SUM(x) AS s FROM t GROUP BY k",
        &["\"j\"", "must appear in GROUP BY"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT k, SUM(x) + k AS s FROM t GROUP BY k",
        &["uses column k outside an aggregate"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT lower(k), SUM(x) AS s FROM t GROUP BY 1",
        &["needs a name: add `AS name`"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT SUM(x) + 1, COUNT(*) AS n FROM t",
        &["needs a name: add `AS name`"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT SUM(x) AS n, COUNT(*) AS n FROM t",
        &["output name \"n\" appears more than once"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT SUM(x) AS _tally_n FROM t",
        &["reserved"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT SUM(u.x) AS s FROM t",
        &["`u.x` does not name a column"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT SUM(t.x) AS s FROM t AS m",
        &["`t.x` does not name a column", "`t AS m`"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT lower(name) AS name, COUNT(*) AS n FROM t GROUP BY name",
        &["GROUP BY name is ambiguous"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT SUM((c).f) AS s FROM t",
        &["composite value"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT COUNT(x ORDER BY y) AS n FROM t",
        &["COUNT(…) with ORDER BY"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT SUM(*) AS n FROM t",
        &["SUM(*) is not valid"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT COUNT(t.*) AS n FROM t",
        &["COUNT(t.*) is not supported"],
    ),
    (
        "CREATE MATERIALIZED VIEW v (a) AS SELECT SUM(x) FROM t",
        &["column list"],
    ),
    (
        "CREATE MATERIALIZED VIEW s.v AS SELECT SUM(x) AS s FROM t",
        &["schema-qualified view names"],
    ),
    (
        "CREATE MATERIALIZED VIEW v AS SELECT SUM(x) AS s FROM generate_series(1, 3) AS x",
        &["FROM generate_series"],
    ),
];

#[test]
fn refused_constructs_name_the_view_and_the_construct() {
    for (sql, words) in REFUSED {
        let message = error_of(sql);
        assert!(
            message.starts_with("view \"v\": "),
            "{sql}\nmessage should name the view: {message}"
        );
        for word in *words {
            assert!(
                message.contains(word),
                "{sql}\nmessage should contain {word:?}: {message}"
            );
        }
    }
}

#[test]
fn refusals_carry_the_view_name_as_data() {
    let error = parse_views("CREATE MATERIALIZED VIEW \"Odd\" AS SELECT MIN(x) AS m FROM t")
        .expect_err("refused");
    assert_eq!(error.view(), Some("Odd"));
    assert!(matches!(error, ViewError::Unsupported { .. }));
}

#[test]
fn non_view_statements_are_refused() {
    let message = error_of(
        "CREATE MATERIALIZED VIEW a AS SELECT SUM(x) AS s FROM t;\n\
         INSERT INTO t VALUES (1);",
    );
    assert!(message.contains("statement 2"), "{message}");
    assert!(message.contains("INSERT INTO t"), "{message}");
    assert!(
        message.contains("not a CREATE MATERIALIZED VIEW"),
        "{message}"
    );
}

#[test]
fn duplicate_view_names_are_refused() {
    let message = error_of(
        "CREATE MATERIALIZED VIEW totals AS SELECT SUM(x) AS s FROM t;\n\
         CREATE MATERIALIZED VIEW TOTALS AS SELECT COUNT(*) AS n FROM t;",
    );
    assert_eq!(message, "view \"totals\" is defined more than once");
}

#[test]
fn syntax_errors_say_where() {
    let message = error_of(
        "CREATE MATERIALIZED VIEW a AS SELECT SUM(x) AS s FROM t;\n\
         CREATE MATERIALIZED VIEW b AS SELECT SUM(x) AS s FROM t WHERE GROUP BY k;",
    );
    assert!(message.starts_with("SQL syntax error"), "{message}");
    assert!(message.contains("Line: 2"), "{message}");
}

/// The fuzzer starts from `fuzz/corpus/views/seed-*`: they must stay valid
/// views files, or the fuzzer would start from error paths only.
#[test]
fn fuzz_seeds_are_valid_views_files() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/views");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if !path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("seed-")
        {
            continue;
        }
        let sql = std::fs::read_to_string(&path).unwrap();
        if let Err(error) = parse_views(&sql) {
            panic!("{}: {error}", path.display());
        }
        seen += 1;
    }
    assert!(seen >= 5, "{seen} seeds");
}
