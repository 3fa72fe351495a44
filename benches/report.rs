//! The last step of `scripts/bench`: reads the JSON and Markdown that the
//! benchmarks wrote into one folder, draws the plots as SVG under
//! `docs/bench/`, and puts the tables and plots into `BENCHMARKS.md`
//! between the `<!-- bench:begin -->` and `<!-- bench:end -->` markers.
//!
//! ```sh
//! TALLY_BENCH_OUT=/var/tmp/tally-bench cargo bench --bench report
//! ```
//!
//! The SVG is written by hand (a few lines per chart) rather than through a
//! plotting crate: the charts are simple, and this keeps the benchmarks'
//! build free of font and image dependencies.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::Value;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 400.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Round tick values covering `0..=max` (or `min..=max` on a log scale).
fn ticks(min: f64, max: f64, log: bool) -> Vec<f64> {
    if log {
        let (low, high) = (min.log10().floor() as i32, max.log10().ceil() as i32);
        return (low..=high).map(|e| 10f64.powi(e)).collect();
    }
    let raw = max / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(raw);
    (0..=((max / step).ceil() as usize))
        .map(|i| i as f64 * step)
        .collect()
}

fn label(value: f64) -> String {
    if value >= 10_000.0 {
        format!("{:.0}k", value / 1000.0)
    } else if value >= 1.0 || value == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{value}")
    }
}

struct Series {
    name: String,
    points: Vec<(f64, f64)>,
    dashed: bool,
    /// Index into the palette: a p99 line and its p50 share a colour.
    color: usize,
}

/// A line chart with one line per series and a legend on the right.
fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let points = series.iter().flat_map(|s| s.points.iter());
    let x_max = points.clone().map(|p| p.0).fold(0.0, f64::max).max(1e-9);
    let y_max = points.map(|p| p.1).fold(0.0, f64::max).max(1e-9);
    let x_ticks = ticks(0.0, x_max, false);
    let y_ticks = ticks(0.0, y_max, false);
    let (x_top, y_top) = (*x_ticks.last().unwrap(), *y_ticks.last().unwrap());
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |v: f64| LEFT + v / x_top * plot_w;
    let y = |v: f64| TOP + plot_h - v / y_top * plot_h;
    let mut svg = header(title);
    axes(&mut svg, x_label, y_label);
    for t in &x_ticks {
        let _ = write!(
            svg,
            r##"<line x1="{0}" y1="{1}" x2="{0}" y2="{2}" stroke="#ddd"/><text x="{0}" y="{3}" text-anchor="middle">{4}</text>"##,
            x(*t),
            TOP,
            TOP + plot_h,
            TOP + plot_h + 18.0,
            label(*t)
        );
    }
    for t in &y_ticks {
        let _ = write!(
            svg,
            r##"<line x1="{1}" y1="{0}" x2="{2}" y2="{0}" stroke="#ddd"/><text x="{3}" y="{4}" text-anchor="end">{5}</text>"##,
            y(*t),
            LEFT,
            LEFT + plot_w,
            LEFT - 6.0,
            y(*t) + 4.0,
            label(*t)
        );
    }
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[s.color % COLORS.len()];
        let path: Vec<String> = s
            .points
            .iter()
            .map(|(px, py)| format!("{:.1},{:.1}", x(*px), y(*py)))
            .collect();
        let dash = if s.dashed {
            r##" stroke-dasharray="6 4""##
        } else {
            ""
        };
        let _ = write!(
            svg,
            r##"<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{}"/>"##,
            path.join(" ")
        );
        if s.points.len() <= 12 {
            for (px, py) in &s.points {
                let _ = write!(
                    svg,
                    r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"##,
                    x(*px),
                    y(*py)
                );
            }
        }
        let ly = TOP + 10.0 + i as f64 * 20.0;
        let _ = write!(
            svg,
            r##"<line x1="{0}" y1="{1}" x2="{2}" y2="{1}" stroke="{color}" stroke-width="2"{dash}/><text x="{3}" y="{4}">{5}</text>"##,
            WIDTH - RIGHT + 10.0,
            ly,
            WIDTH - RIGHT + 34.0,
            WIDTH - RIGHT + 40.0,
            ly + 4.0,
            escape(&s.name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Horizontal bars, one per (label, value), optionally on a log scale.
fn bar_chart(title: &str, value_label: &str, bars: &[(String, f64)], log: bool) -> String {
    let height = TOP + BOTTOM + 30.0 * bars.len() as f64;
    let left = 330.0;
    let plot_w = WIDTH - left - 40.0;
    let max = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1e-9);
    let min = bars
        .iter()
        .map(|b| b.1)
        .filter(|v| *v > 0.0)
        .fold(f64::MAX, f64::min);
    let axis = ticks(if log { min } else { 0.0 }, max, log);
    let (low, high) = (axis[0], *axis.last().unwrap());
    let scale = |v: f64| {
        if log {
            (v.max(low).log10() - low.log10()) / (high.log10() - low.log10()) * plot_w
        } else {
            v / high * plot_w
        }
    };
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"##,
        WIDTH / 2.0,
        escape(title)
    );
    let bottom = height - BOTTOM;
    for t in &axis {
        let tx = left + scale(*t);
        let _ = write!(
            svg,
            r##"<line x1="{tx}" y1="{TOP}" x2="{tx}" y2="{bottom}" stroke="#ddd"/><text x="{tx}" y="{}" text-anchor="middle">{}</text>"##,
            bottom + 16.0,
            label(*t)
        );
    }
    let _ = write!(
        svg,
        r##"<text x="{}" y="{}" text-anchor="middle">{}</text>"##,
        left + plot_w / 2.0,
        bottom + 36.0,
        escape(value_label)
    );
    for (i, (name, value)) in bars.iter().enumerate() {
        let by = TOP + 5.0 + i as f64 * 30.0;
        let w = scale(*value).max(1.0);
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="end">{}</text><rect x="{left}" y="{by}" width="{w:.1}" height="20" fill="{}"/><text x="{}" y="{}">{}</text>"##,
            left - 8.0,
            by + 14.0,
            escape(name),
            COLORS[i % COLORS.len()],
            left + w + 4.0,
            by + 14.0,
            if *value >= 100.0 {
                format!("{value:.0}")
            } else {
                format!("{value:.3}")
            }
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn header(title: &str) -> String {
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"##,
        (WIDTH - RIGHT + LEFT) / 2.0,
        escape(title)
    )
}

fn axes(svg: &mut String, x_label: &str, y_label: &str) {
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let _ = write!(
        svg,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/><text x="{}" y="{}" text-anchor="middle">{}</text><text transform="translate(18 {}) rotate(-90)" text-anchor="middle">{}</text>"##,
        LEFT + plot_w / 2.0,
        HEIGHT - 10.0,
        escape(x_label),
        TOP + plot_h / 2.0,
        escape(y_label)
    );
}

fn read_json(dir: &Path, name: &str) -> Result<Option<Value>> {
    let path = dir.join(name);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    Ok(Some(serde_json::from_str(&text).with_context(|| {
        format!("{} is not JSON", path.display())
    })?))
}

fn number(value: &Value, key: &str) -> f64 {
    value[key].as_f64().unwrap_or(0.0)
}

/// The plots, as (file name, caption, SVG).
fn plots(dir: &Path) -> Result<Vec<(String, String, String)>> {
    let mut out = Vec::new();
    if let Some(Value::Array(runs)) = read_json(dir, "latency.json")? {
        let mut series = Vec::new();
        for (color, transport) in ["embedded", "nats"].into_iter().enumerate() {
            let of: Vec<&Value> = runs
                .iter()
                .filter(|r| r["transport"] == transport)
                .collect();
            if of.is_empty() {
                continue;
            }
            for (quantile, dashed) in [("p99_ms", false), ("p50_ms", true)] {
                series.push(Series {
                    name: format!("{transport} {}", &quantile[..3]),
                    points: of
                        .iter()
                        .map(|r| (number(r, "rate"), number(&r["latency"], quantile)))
                        .collect(),
                    dashed,
                    color,
                });
            }
        }
        out.push((
            "latency-by-rate.svg".into(),
            "End-to-end latency (source commit → view updated) by source rate".into(),
            line_chart(
                "Latency by source rate",
                "source transactions per second",
                "ms",
                &series,
            ),
        ));
        // Latency over time, p99 per interval: the runs at 5,000 tx/s (the
        // target rate) when there are any, else every run with a timeline.
        let at_target: Vec<&Value> = runs
            .iter()
            .filter(|r| number(r, "rate") == 5000.0)
            .collect();
        let shown: Vec<&Value> = if at_target.is_empty() {
            runs.iter().collect()
        } else {
            at_target
        };
        let mut series = Vec::new();
        for (color, run) in shown.into_iter().enumerate() {
            let timeline = run["timeline"].as_array().cloned().unwrap_or_default();
            if timeline.is_empty() {
                continue;
            }
            for (quantile, dashed) in [("p99_ms", false), ("p50_ms", true)] {
                series.push(Series {
                    name: format!(
                        "{} {:.0}/s {}",
                        run["transport"].as_str().unwrap_or("?"),
                        number(run, "rate"),
                        &quantile[..3]
                    ),
                    points: timeline
                        .iter()
                        .map(|row| (number(row, "at_s"), number(&row["latency"], quantile)))
                        .collect(),
                    dashed,
                    color,
                });
            }
        }
        if !series.is_empty() {
            out.push((
                "latency-over-time.svg".into(),
                "p99 and p50 latency per second over the runs at 5,000 tx/s".into(),
                line_chart("Latency over time", "seconds into the run", "ms", &series),
            ));
        }
    }
    for (file, what) in [
        ("apply-high-coalescing.json", "high coalescing"),
        ("apply-low-coalescing.json", "low coalescing"),
    ] {
        if let Some(document) = read_json(dir, file)? {
            let bars: Vec<(String, f64)> = document["runs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    (
                        r["label"].as_str().unwrap_or("?").to_string(),
                        number(r, "events_per_s"),
                    )
                })
                .collect();
            let name = file.replace(".json", ".svg");
            out.push((
                name,
                format!(
                    "Apply throughput, {what} ({} events over {} rows), events per second (log scale)",
                    document["events"], document["rows"]
                ),
                bar_chart(
                    &format!("Apply throughput, {what}"),
                    "events per second (log scale)",
                    &bars,
                    true,
                ),
            ));
        }
    }
    if let Some(document) = read_json(dir, "alternatives.json")? {
        let bars: Vec<(String, f64)> = document["read_side"]["timings"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                (
                    t["read"].as_str().unwrap_or("?").replace('`', ""),
                    number(t, "p50_ms"),
                )
            })
            .collect();
        out.push((
            "read-side.svg".into(),
            format!(
                "Reading a view row against computing the aggregate over {} rows, p50 ms (log scale)",
                document["read_side"]["rows"]
            ),
            bar_chart("Read side: p50 ms", "milliseconds (log scale)", &bars, true),
        ));
        let bars: Vec<(String, f64)> = document["source_overhead"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                (
                    format!(
                        "{}, {}: {}",
                        r["layout"].as_str().unwrap_or("?"),
                        match r["shape"].as_str() {
                            Some("per customer") => "per customer",
                            _ => "+ global",
                        },
                        match r["aggregation"].as_str().unwrap_or("?") {
                            a if a.starts_with("PL/pgSQL") => "trigger",
                            a if a.starts_with("Tally") => "Tally",
                            _ => "none",
                        }
                    ),
                    number(r, "tx_per_s"),
                )
            })
            .collect();
        out.push((
            "source-overhead.svg".into(),
            "Source transactions per second by how the aggregates are kept (split: source and Tally on separate cores; shared: all on all cores; per customer, or per customer + the global total)".into(),
            bar_chart(
                "Source overhead",
                "source transactions per second",
                &bars,
                false,
            ),
        ));
    }
    Ok(out)
}

/// The targets of the benchmark issue, checked against this run's ratios.
fn conclusions(dir: &Path) -> Result<String> {
    let mut rows: Vec<String> = Vec::new();
    for (file, what) in [
        ("apply-high-coalescing.json", "high coalescing"),
        ("apply-low-coalescing.json", "low coalescing"),
    ] {
        let Some(document) = read_json(dir, file)? else {
            continue;
        };
        let runs = document["runs"].as_array().cloned().unwrap_or_default();
        let baseline = runs
            .iter()
            .find(|r| r["baseline"] == true && r["parallel"] == 1)
            .map(|r| number(r, "events_per_s"));
        for r in runs.iter().filter(|r| r["baseline"] == false) {
            if let Some(baseline) = baseline {
                let ratio = number(r, "events_per_s") / baseline;
                rows.push(format!(
                    "| apply, {what}, parallel {} | {ratio:.1}x the per-event worker | at least 20x | {} |",
                    r["parallel"],
                    if ratio >= 20.0 { "met" } else { "**not met**" }
                ));
            }
        }
    }
    if let Some(Value::Array(runs)) = read_json(dir, "latency.json")? {
        for r in runs
            .iter()
            .filter(|r| r["transport"] == "embedded" && number(r, "rate") == 5000.0)
        {
            let p99 = number(&r["latency"], "p99_ms");
            rows.push(format!(
                "| end-to-end p99 at 5,000 tx/s, embedded | {p99:.1} ms (achieved {:.0} tx/s) | under 100 ms | {} |",
                number(r, "achieved"),
                if p99 < 100.0 { "met" } else { "**not met**" }
            ));
        }
    }
    if let Some(document) = read_json(dir, "alternatives.json")? {
        let overhead = document["source_overhead"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut scenarios: Vec<(String, String)> = Vec::new();
        for r in &overhead {
            let key = (
                r["layout"].as_str().unwrap_or("?").to_string(),
                r["shape"].as_str().unwrap_or("?").to_string(),
            );
            if !scenarios.contains(&key) {
                scenarios.push(key);
            }
        }
        for (layout, shape) in &scenarios {
            let run = |aggregation: &str| {
                overhead.iter().find(|r| {
                    r["layout"] == layout.as_str()
                        && r["shape"] == shape.as_str()
                        && r["aggregation"]
                            .as_str()
                            .is_some_and(|a| a.starts_with(aggregation))
                })
            };
            let (Some(none), Some(trigger), Some(tally)) =
                (run("no aggregation"), run("PL/pgSQL"), run("Tally"))
            else {
                continue;
            };
            let kept = |r: &Value| number(r, "tx_per_s") / number(none, "tx_per_s");
            let cpu = |r: &Value| number(r, "source_cpu_us_per_tx");
            let ahead = kept(tally) > kept(trigger);
            let (what, target, verdict) = match layout.as_str() {
                "split" => (
                    format!(
                        "source throughput kept, vs no aggregation, {shape} (split: source on CPU {}, Tally and its target on CPU {})",
                        tally["source_cpus"].as_str().unwrap_or("?"),
                        tally["tally_cpus"].as_str().unwrap_or("?")
                    ),
                    "Tally's overhead below the trigger's",
                    if ahead { "met" } else { "**not met**" },
                ),
                _ => (
                    format!(
                        "source throughput kept, vs no aggregation, {shape} (shared: source, Tally and its target on the same cores, one box)"
                    ),
                    "- (not the source's own overhead: Tally's whole pipeline shares the source's cores)",
                    if ahead {
                        "Tally ahead"
                    } else {
                        "trigger ahead"
                    },
                ),
            };
            rows.push(format!(
                "| {what} | Tally {:.2}, trigger {:.2}; source CPU per transaction: none {:.0} µs, trigger {:.0} µs, Tally {:.0} µs | {target} | {verdict} |",
                kept(tally),
                kept(trigger),
                cpu(none),
                cpu(trigger),
                cpu(tally),
            ));
        }
        let timings = document["read_side"]["timings"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if timings.len() >= 4 {
            rows.push(format!(
                "| read side | one customer: view row {:.0}x faster than `SUM` without index; global: {:.0}x faster than `SUM` over all rows | - | - |",
                number(&timings[2], "p50_ms") / number(&timings[0], "p50_ms"),
                number(&timings[3], "p50_ms") / number(&timings[1], "p50_ms"),
            ));
        }
    }
    if rows.is_empty() {
        return Ok(String::new());
    }
    let mut out = String::from(
        "\n### Conclusions of this run\n\n| measure | ratio in this run | target | |\n|---|---|---|---|\n",
    );
    for row in rows {
        let _ = writeln!(out, "{row}");
    }
    Ok(out)
}

/// The latency report has a timeline table per run; here only those of the
/// runs at the target rate stay (the plot shows them; the rest are in the
/// raw results).
fn keep_target_rate_timelines(text: &str) -> String {
    let mut blocks = text.split("\nTimeline, ");
    let mut out = blocks.next().unwrap_or("").to_string();
    for block in blocks {
        if block.contains(" at 5000 tx/s") {
            out.push_str("\nTimeline, ");
            out.push_str(block);
        }
    }
    out
}

const BEGIN: &str = "<!-- bench:begin -->";
const END: &str = "<!-- bench:end -->";

fn main() -> Result<()> {
    let dir = PathBuf::from(
        std::env::var("TALLY_BENCH_OUT").unwrap_or_else(|_| "/var/tmp/tally-bench".into()),
    );
    if !dir.is_dir() {
        eprintln!(
            "report: {} holds no benchmark results; run scripts/bench (it sets TALLY_BENCH_OUT)",
            dir.display()
        );
        return Ok(());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let docs = root.join("docs/bench");
    std::fs::create_dir_all(&docs)?;
    let mut section = String::new();
    let _ = writeln!(section, "{BEGIN}");
    let summary = dir.join("summary.md");
    if summary.exists() {
        section.push_str(&std::fs::read_to_string(&summary)?);
    }
    section.push_str(&conclusions(&dir)?);
    for (part, heading) in [
        (
            "apply-high-coalescing.md",
            "Apply throughput, high coalescing (many events per row)",
        ),
        (
            "apply-low-coalescing.md",
            "Apply throughput, low coalescing (about one event per row)",
        ),
        ("latency.md", "End-to-end latency"),
        ("alternatives.md", ""),
    ] {
        let path = dir.join(part);
        if !path.exists() {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let mut text = text.trim();
        // A part's own top heading gives way to the one given here.
        if !heading.is_empty() {
            if text.starts_with('#') {
                text = text.split_once('\n').map_or("", |(_, rest)| rest).trim();
            }
            let _ = writeln!(section, "\n### {heading}\n");
        }
        let _ = writeln!(section, "{}", keep_target_rate_timelines(text));
    }
    let plots = plots(&dir)?;
    if !plots.is_empty() {
        let _ = writeln!(section, "\n### Plots\n");
    }
    for (file, caption, svg) in &plots {
        std::fs::write(docs.join(file), svg)?;
        let _ = writeln!(section, "{caption}:\n\n![{caption}](docs/bench/{file})\n");
        eprintln!("wrote docs/bench/{file}");
    }
    let _ = writeln!(section, "{END}");
    let path = root.join("BENCHMARKS.md");
    let text = std::fs::read_to_string(&path)?;
    let text = match (text.find(BEGIN), text.find(END)) {
        (Some(begin), Some(end)) if begin < end => {
            format!(
                "{}{}{}",
                &text[..begin],
                section.trim_end(),
                &text[end + END.len()..]
            )
        }
        (None, None) => bail!("BENCHMARKS.md has no {BEGIN} … {END} markers"),
        _ => bail!("BENCHMARKS.md's {BEGIN} and {END} markers are out of order"),
    };
    std::fs::write(&path, text)?;
    eprintln!("BENCHMARKS.md updated from {}", dir.display());
    Ok(())
}
