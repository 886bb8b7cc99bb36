//! The human-readable outputs of a run folder, written at the end of a run (also after a failure)
//! and by `nash report <run-dir>`:
//!
//! - `metrics.csv`: `metrics.jsonl` as a table ([`write_metrics_csv`]);
//! - `curves/*.png`: line plots of every group of values ([`write_curves`]);
//! - `index.html`: a self-contained report ([`write_report`]): inline CSS, every picture embedded
//!   as a base64 `data:` URI, so the file can be mailed alone. It shows the run's name and status,
//!   a summary table (initial against final held-out losses and metrics, final training losses),
//!   the curves with their legends and axis ranges, the sample pictures over time, the health log
//!   (`health.jsonl`) and the resolved pipeline.
//!
//! Every function reads only what the folder holds, so partial runs (failed, interrupted, a
//! `metrics.jsonl` cut mid-line, no `summary.json`) get outputs too.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use nash_core::serde_json::{self, Map, Value};

use crate::outputs::curves::{self, CurveGroup};

/// The columns every `metrics.csv` starts with.
pub const FIXED_COLUMNS: [&str; 4] = ["step", "epoch", "split", "elapsed_s"];
/// At most this many frames of each kind of sample picture are embedded in the report (evenly
/// spaced, first and last included), to keep it small enough to mail.
pub const MAX_FRAMES: usize = 16;

/// Checks that `run_dir` looks like a run folder (it holds `metrics.jsonl`, `summary.json` or
/// `pipeline.resolved.json`).
fn check_run_dir(run_dir: &Path) -> anyhow::Result<()> {
    if !run_dir.is_dir() {
        bail!("{} is not a folder; expected a run folder", run_dir.display());
    }
    let known = ["metrics.jsonl", "summary.json", "pipeline.resolved.json"];
    if !known.iter().any(|f| run_dir.join(f).exists()) {
        bail!(
            "{} is not a run folder: it has none of {}",
            run_dir.display(),
            known.join(", ")
        );
    }
    Ok(())
}

/// Flattens `value` into `out` as `prefix.key` columns (nested objects joined with `.`).
fn flatten(prefix: &str, value: &Value, out: &mut Map<String, Value>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

/// The rank of a flattened column: the fixed columns, then losses, diagnostics, eval, metrics,
/// learning rates, then anything else.
fn column_rank(column: &str) -> usize {
    if let Some(i) = FIXED_COLUMNS.iter().position(|c| *c == column) {
        return i;
    }
    let group = column.split('.').next().unwrap_or(column);
    match curves::GROUPS.iter().position(|(g, _)| *g == group) {
        Some(i) if column.contains('.') => FIXED_COLUMNS.len() + i,
        _ => FIXED_COLUMNS.len() + curves::GROUPS.len(),
    }
}

/// A CSV cell: numbers as written in JSON, `NaN` for `null` (how JSON writes a non-finite number),
/// strings as they are, arrays as JSON; quoted when they hold a comma, quote or line break.
pub fn csv_cell(value: &Value) -> String {
    let text = match value {
        Value::Null => "NaN".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

/// The CSV table of parsed `metrics.jsonl` lines: columns [`FIXED_COLUMNS`], then every other key
/// seen in any line, nested objects flattened to `group.key` (`losses.loss/discriminator`,
/// `eval.loss/generator`, `lr.generator`), grouped as in [`curves::GROUPS`] and sorted by name
/// within a group. A line without `split` is a training line (`train`); cells of keys a line lacks
/// are empty.
pub fn metrics_csv(lines: &[Value]) -> String {
    let rows: Vec<Map<String, Value>> = lines
        .iter()
        .map(|line| {
            let mut row = Map::new();
            flatten("", line, &mut row);
            row.entry("split").or_insert_with(|| Value::String("train".into()));
            row
        })
        .collect();
    let mut extra: BTreeSet<(usize, &str)> = BTreeSet::new();
    for row in &rows {
        for key in row.keys().filter(|k| !FIXED_COLUMNS.contains(&k.as_str())) {
            extra.insert((column_rank(key), key));
        }
    }
    let columns: Vec<&str> = FIXED_COLUMNS
        .iter()
        .copied()
        .chain(extra.into_iter().map(|(_, k)| k))
        .collect();
    let mut out = columns
        .iter()
        .map(|c| csv_cell(&Value::String(c.to_string())))
        .collect::<Vec<_>>()
        .join(",");
    out.push('\n');
    for row in &rows {
        let cells: Vec<String> = columns
            .iter()
            .map(|c| row.get(*c).map(csv_cell).unwrap_or_default())
            .collect();
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

/// Writes `<run_dir>/metrics.csv` from `<run_dir>/metrics.jsonl` ([`metrics_csv`]); lines that are
/// not JSON (a run killed mid-write) are skipped.
pub fn write_metrics_csv(run_dir: &Path) -> anyhow::Result<()> {
    check_run_dir(run_dir)?;
    let (lines, _) = curves::read_metrics(run_dir)?;
    let path = run_dir.join("metrics.csv");
    std::fs::write(&path, metrics_csv(&lines)).with_context(|| format!("cannot write {}", path.display()))
}

/// Writes one line plot per group of `<run_dir>/metrics.jsonl` into `<run_dir>/curves/` (see
/// [`curves`]) and returns the files written.
pub fn write_curves(run_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    check_run_dir(run_dir)?;
    curves::write_curve_files(run_dir)
}

/// `text` with `& < > " '` replaced by character references, safe in element content and in
/// quoted attribute values.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Standard base64 (RFC 4648, with `=` padding).
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The PNG file at `path` as a `data:` URI.
fn png_data_uri(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(format!("data:image/png;base64,{}", base64(&bytes)))
}

/// A number for the report: 4 significant digits, scientific when very small or large.
fn number(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    let a = v.abs();
    if v.fract() == 0.0 && a < 1e15 {
        return format!("{v:.0}");
    }
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        format!("{v:.3e}")
    } else {
        let decimals = if a == 0.0 {
            0
        } else {
            (3 - a.log10().floor() as i64).clamp(0, 6) as usize
        };
        format!("{v:.decimals$}")
    }
}

/// A JSON value for a table cell (escaped).
fn cell(value: Option<&Value>) -> String {
    match value {
        None => String::new(),
        Some(Value::Null) => "NaN".into(),
        Some(v) => match v.as_f64() {
            Some(x) => number(x),
            None => escape_html(&v.to_string()),
        },
    }
}

/// Reads a JSON file of the run folder, if it is there and is JSON.
fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// The sample pictures of `<run>/samples/`, by kind: `(title, [(step, path)])` sorted by step.
fn sample_frames(run_dir: &Path) -> Vec<(&'static str, Vec<(u64, PathBuf)>)> {
    let kinds: [(&str, &str); 3] = [
        ("Generated samples", "step-"),
        (
            "Reconstructions (inputs above, reconstructions below)",
            "reconstructions-step-",
        ),
        ("Samples over the data", "scatter-step-"),
    ];
    let mut files: Vec<PathBuf> = std::fs::read_dir(run_dir.join("samples"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    kinds
        .iter()
        .filter_map(|(title, prefix)| {
            let mut frames: Vec<(u64, PathBuf)> = files
                .iter()
                .filter_map(|p| {
                    let name = p.file_name()?.to_str()?;
                    let step = name.strip_prefix(prefix)?.strip_suffix(".png")?.parse().ok()?;
                    Some((step, p.clone()))
                })
                .collect();
            frames.sort_by_key(|f| f.0);
            (!frames.is_empty()).then_some((*title, frames))
        })
        .collect()
}

/// At most `max` of `n` indices, evenly spaced, first and last included.
fn spaced(n: usize, max: usize) -> Vec<usize> {
    if n <= max {
        return (0..n).collect();
    }
    if max < 2 {
        return (n - max..n).collect();
    }
    let mut idx: Vec<usize> = (0..max).map(|i| (i * (n - 1) + (max - 1) / 2) / (max - 1)).collect();
    idx.dedup();
    idx
}

const CSS: &str = "\
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;padding:1.5rem 2rem;color:#222;background:#fafafa}
h1{margin:0 0 .3rem;font-size:1.7rem}h2{margin:2rem 0 .6rem;font-size:1.25rem;border-bottom:1px solid #ddd}
h3{font-size:1rem;margin:1rem 0 .3rem}
.status{display:inline-block;padding:.1rem .6rem;border-radius:.8rem;font-weight:600;color:#fff;background:#777}
.status-completed{background:#2a8a3a}.status-failed{background:#c0392b}.status-interrupted{background:#d68910}
.meta{color:#555;margin:.3rem 0}.error{background:#fdecea;border-left:4px solid #c0392b;padding:.5rem .8rem;white-space:pre-wrap}
table{border-collapse:collapse;margin:.4rem 0;background:#fff}td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
figure{margin:0 0 1.2rem;background:#fff;border:1px solid #ddd;padding:.6rem;width:822px;max-width:100%;box-sizing:border-box}
.frames figure{width:auto}
figure img{display:block;max-width:100%}figcaption{font-size:.9rem;color:#444;margin-top:.3rem}
.legend span.entry{white-space:nowrap;margin-right:.9em}
.legend span.swatch{display:inline-block;width:1.4em;height:.35em;vertical-align:middle;margin-right:.3em}
.frames{display:flex;flex-wrap:wrap;gap:.6rem}.frames figure{margin:0}.frames img{max-width:260px;image-rendering:pixelated}
.sev-warning td{background:#fff6e0}.sev-error td,.sev-critical td{background:#fdecea}
pre{background:#fff;border:1px solid #ddd;padding:.6rem;overflow:auto;max-height:40rem}.none{color:#777;font-style:italic}
";

/// The summary section: initial against final held-out losses and metrics (from the first and
/// last evaluation in `metrics.jsonl`) and the last training losses.
fn summary_section(html: &mut String, lines: &[Value]) {
    let evals: Vec<&Value> = lines
        .iter()
        .filter(|l| l.get("split").and_then(Value::as_str) == Some("test"))
        .collect();
    let last_train = lines
        .iter()
        .rev()
        .find(|l| l.get("losses").is_some_and(Value::is_object));
    let _ = writeln!(html, "<h2>Summary</h2>");
    let mut any = false;
    for (key, title) in [("eval", "Held-out losses"), ("metrics", "Metrics")] {
        let (Some(first), Some(last)) = (evals.first(), evals.last()) else {
            break;
        };
        let names: BTreeSet<&String> = [first, last]
            .iter()
            .filter_map(|l| l.get(key).and_then(Value::as_object))
            .flat_map(|m| m.keys())
            .collect();
        if names.is_empty() {
            continue;
        }
        any = true;
        let step = |l: &Value| l.get("step").map(|s| cell(Some(s))).unwrap_or_default();
        let _ = writeln!(
            html,
            "<table class=\"summary\"><tr><th>{title}</th><th>initial (step {})</th><th>final (step {})</th><th>change</th></tr>",
            step(first),
            step(last)
        );
        for name in names {
            let a = first.get(key).and_then(|m| m.get(name));
            let b = last.get(key).and_then(|m| m.get(name));
            let change = match (a.and_then(Value::as_f64), b.and_then(Value::as_f64)) {
                (Some(x), Some(y)) => number(y - x),
                _ => String::new(),
            };
            let _ = writeln!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{change}</td></tr>",
                escape_html(name),
                cell(a),
                cell(b)
            );
        }
        let _ = writeln!(html, "</table>");
    }
    if let Some(Value::Object(losses)) = last_train.and_then(|l| l.get("losses")) {
        any = true;
        let step = last_train
            .and_then(|l| l.get("step"))
            .map(|s| cell(Some(s)))
            .unwrap_or_default();
        let _ = writeln!(
            html,
            "<table class=\"summary\"><tr><th>Training losses</th><th>last logged (step {step})</th></tr>"
        );
        for (name, v) in losses {
            let _ = writeln!(
                html,
                "<tr><td>{}</td><td>{}</td></tr>",
                escape_html(name),
                cell(Some(v))
            );
        }
        let _ = writeln!(html, "</table>");
    }
    if !any {
        let _ = writeln!(html, "<p class=\"none\">no metrics recorded</p>");
    }
}

/// What the metrics reported beside their values (`summary.json`'s `metric_provenance`): one row
/// per metric and key; nothing when no metric reported any.
fn provenance_section(html: &mut String, provenance: Option<&Value>) {
    let Some(Value::Object(by_metric)) = provenance else {
        return;
    };
    if by_metric.values().all(|v| v.as_object().is_none_or(|m| m.is_empty())) {
        return;
    }
    let _ = writeln!(
        html,
        "<table class=\"summary\"><tr><th>Metric provenance</th><th>key</th><th>value</th></tr>"
    );
    for (metric, entries) in by_metric {
        let Some(entries) = entries.as_object() else {
            continue;
        };
        for (key, value) in entries {
            let text = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let _ = writeln!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape_html(metric),
                escape_html(key),
                escape_html(&text)
            );
        }
    }
    let _ = writeln!(html, "</table>");
}

/// The curves section: each figure with its title, legend (colour, name, last value) and axes.
fn curves_section(html: &mut String, run_dir: &Path, groups: &[CurveGroup]) -> anyhow::Result<()> {
    let _ = writeln!(html, "<h2>Curves</h2>");
    if groups.is_empty() {
        let _ = writeln!(html, "<p class=\"none\">no curves: nothing was logged</p>");
    }
    for g in groups {
        let path = g.path(run_dir);
        if !path.exists() {
            curves::render_curves(g)?.write_png(&path)?;
        }
        let _ = writeln!(
            html,
            "<figure id=\"curves-{}\"><h3>{}</h3><img alt=\"{}\" src=\"{}\" width=\"{}\" height=\"{}\">",
            escape_html(&g.key),
            escape_html(&g.title),
            escape_html(&g.title),
            png_data_uri(&path)?,
            curves::CURVE_WIDTH,
            curves::CURVE_HEIGHT
        );
        let _ = write!(html, "<figcaption><div class=\"legend\">");
        for s in &g.series {
            let (r, gr, b) = s.color;
            let last = s.last().map(number).unwrap_or_default();
            let _ = write!(
                html,
                "<span class=\"entry\"><span class=\"swatch\" style=\"background:rgb({r},{gr},{b})\"></span>{} \
                 <small>(last {last})</small></span> ",
                escape_html(&s.name)
            );
        }
        let _ = writeln!(
            html,
            "</div><div>x: step {} to {}, grid every {} steps &middot; y: {} to {}, grid every {}</div></figcaption></figure>",
            number(g.x_range.0),
            number(g.x_range.1),
            number(g.x_step()),
            number(g.y_range.0),
            number(g.y_range.1),
            number(g.y_step())
        );
    }
    Ok(())
}

/// The samples section: each kind of picture over time, labelled by step.
fn samples_section(html: &mut String, run_dir: &Path) -> anyhow::Result<()> {
    let _ = writeln!(html, "<h2>Samples over time</h2>");
    let kinds = sample_frames(run_dir);
    if kinds.is_empty() {
        let _ = writeln!(html, "<p class=\"none\">no sample pictures</p>");
    }
    for (title, frames) in kinds {
        let shown = spaced(frames.len(), MAX_FRAMES);
        let _ = write!(html, "<h3>{}", escape_html(title));
        if shown.len() < frames.len() {
            let _ = write!(html, " <small>({} of {} frames)</small>", shown.len(), frames.len());
        }
        let _ = writeln!(html, "</h3><div class=\"frames\">");
        for i in shown {
            let (step, path) = &frames[i];
            let _ = writeln!(
                html,
                "<figure><img alt=\"step {step}\" src=\"{}\"><figcaption>step {step}</figcaption></figure>",
                png_data_uri(path)?
            );
        }
        let _ = writeln!(html, "</div>");
    }
    Ok(())
}

/// The health log section, from `<run>/health.jsonl` (lines `{step, kind, severity, message,
/// action}`).
fn health_section(html: &mut String, run_dir: &Path) {
    let _ = writeln!(html, "<h2>Health log</h2>");
    let events: Vec<Value> = std::fs::read_to_string(run_dir.join("health.jsonl"))
        .map(|t| {
            t.lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(Value::is_object)
                .collect()
        })
        .unwrap_or_default();
    if events.is_empty() {
        let _ = writeln!(html, "<p class=\"none\">no events</p>");
        return;
    }
    let _ = writeln!(
        html,
        "<table class=\"health\"><tr><th>step</th><th>severity</th><th>kind</th><th>message</th><th>action</th></tr>"
    );
    let text = |e: &Value, k: &str| match e.get(k) {
        Some(Value::String(s)) => escape_html(s),
        Some(Value::Null) | None => String::new(),
        Some(v) => escape_html(&v.to_string()),
    };
    for e in &events {
        let severity = e.get("severity").and_then(Value::as_str).unwrap_or("");
        let class = match severity {
            "info" | "warning" | "error" | "critical" => severity,
            _ => "other",
        };
        let _ = writeln!(
            html,
            "<tr class=\"sev-{class}\"><td>{}</td><td>{}</td><td>{}</td><td style=\"text-align:left\">{}</td><td>{}</td></tr>",
            text(e, "step"),
            text(e, "severity"),
            text(e, "kind"),
            text(e, "message"),
            text(e, "action")
        );
    }
    let _ = writeln!(html, "</table>");
}

/// The report of the run folder `run_dir` as an HTML document (see the module documentation).
/// Curve figures missing from `curves/` are drawn.
pub fn render_report(run_dir: &Path) -> anyhow::Result<String> {
    check_run_dir(run_dir)?;
    let summary = read_json(&run_dir.join("summary.json"));
    let pipeline = read_json(&run_dir.join("pipeline.resolved.json"));
    let (lines, skipped) = curves::read_metrics(run_dir)?;
    let get = |k: &str| summary.as_ref().and_then(|s| s.get(k));
    let name = get("name")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| {
            pipeline
                .as_ref()
                .and_then(|p| p.get("name"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .or_else(|| run_dir.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "run".into());
    let status = get("status").and_then(Value::as_str).unwrap_or("interrupted");
    let status_class = match status {
        "completed" | "failed" | "interrupted" => status,
        _ => "other",
    };

    let mut html = String::new();
    let _ = writeln!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} - nash run report</title><style>{CSS}</style></head><body>",
        escape_html(&name)
    );
    let _ = writeln!(
        html,
        "<h1>{}</h1><p><span class=\"status status-{status_class}\">{}</span></p>",
        escape_html(&name),
        escape_html(status)
    );
    let mut facts = Vec::new();
    for (key, label) in [
        ("family", "model"),
        ("seed", "seed"),
        ("steps", "steps"),
        ("epochs", "epochs"),
    ] {
        if let Some(v) = get(key) {
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            facts.push(format!("{label} {text}"));
        }
    }
    if let Some(t) = get("wall_time_s").and_then(Value::as_f64) {
        facts.push(format!("{t:.1} s"));
    }
    if let Some(r) = get("steps_per_s").and_then(Value::as_f64) {
        facts.push(format!("{r:.1} steps/s"));
    }
    if summary.is_none() {
        let last = lines.iter().filter_map(|l| l.get("step").and_then(Value::as_u64)).max();
        facts.push(match last {
            Some(s) => format!("no summary.json: the run stopped or is still going; last logged step {s}"),
            None => "no summary.json: the run stopped or is still going; nothing logged".into(),
        });
    }
    if skipped > 0 {
        facts.push(format!("{skipped} unreadable line(s) of metrics.jsonl skipped"));
    }
    let _ = writeln!(html, "<p class=\"meta\">{}</p>", escape_html(&facts.join(" · ")));
    if let Some(e) = get("error").and_then(Value::as_str) {
        let _ = writeln!(html, "<div class=\"error\">{}</div>", escape_html(e));
    }

    summary_section(&mut html, &lines);
    provenance_section(&mut html, get("metric_provenance"));
    curves_section(&mut html, run_dir, &curves::curve_groups(&lines))?;
    samples_section(&mut html, run_dir)?;
    health_section(&mut html, run_dir);

    let _ = writeln!(html, "<h2>Pipeline</h2>");
    match &pipeline {
        Some(p) => {
            let _ = writeln!(
                html,
                "<details><summary>resolved pipeline (every default filled in)</summary><pre>{}</pre></details>",
                escape_html(&serde_json::to_string_pretty(p)?)
            );
        }
        None => {
            let _ = writeln!(html, "<p class=\"none\">no pipeline.resolved.json</p>");
        }
    }
    if let Some(Value::Array(plugins)) = get("plugins") {
        let _ = writeln!(
            html,
            "<h3>Plugins</h3><table><tr><th>plugin</th><th>version</th><th>library</th></tr>"
        );
        for p in plugins {
            let field = |k: &str| escape_html(p.get(k).and_then(Value::as_str).unwrap_or(""));
            let _ = writeln!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                field("name"),
                field("version"),
                field("path")
            );
        }
        let _ = writeln!(html, "</table>");
    }
    let _ = writeln!(html, "</body></html>");
    Ok(html)
}

/// Writes the self-contained `<run_dir>/index.html` ([`render_report`]) and returns its path.
pub fn write_report(run_dir: &Path) -> anyhow::Result<PathBuf> {
    let html = render_report(run_dir)?;
    let path = run_dir.join("index.html");
    std::fs::write(&path, html).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Writes `metrics.csv`, the curves and `index.html` of `run_dir`; each is attempted even when an
/// earlier one fails, and the first failure is returned. Returns the report's path.
pub fn finish_run_outputs(run_dir: &Path) -> anyhow::Result<PathBuf> {
    let csv = write_metrics_csv(run_dir).context("cannot write metrics.csv");
    let curves = write_curves(run_dir).context("cannot draw the curves");
    let report = write_report(run_dir).context("cannot write the HTML report");
    csv?;
    curves?;
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use nash_core::serde_json::json;

    #[test]
    fn csv_flattens_groups_in_a_stable_order_with_empty_cells() {
        let lines = vec![
            json!({"step": 0, "split": "test", "eval": {"loss/g": 0.5}, "metrics": {"kl": 1.25}}),
            json!({"step": 5, "epoch": 0, "elapsed_s": 0.5,
                   "losses": {"loss/g": 1.5, "loss/d": null},
                   "diagnostics": {"grad_norm/g": 3.0}, "lr": {"g": 0.001}, "note": "a,\"b\""}),
        ];
        let csv = metrics_csv(&lines);
        let rows: Vec<&str> = csv.lines().collect();
        assert_eq!(
            rows[0],
            "step,epoch,split,elapsed_s,losses.loss/d,losses.loss/g,diagnostics.grad_norm/g,eval.loss/g,metrics.kl,lr.g,note"
        );
        assert_eq!(rows[1], "0,,test,,,,,0.5,1.25,,");
        // `null` (a non-finite value) is NaN; a line without `split` is a training line; a string
        // with a comma and quotes is quoted.
        assert_eq!(rows[2], "5,0,train,0.5,NaN,1.5,3.0,,,0.001,\"a,\"\"b\"\"\"");
        assert_eq!(rows.len(), 3);
        assert_eq!(metrics_csv(&[]), "step,epoch,split,elapsed_s\n");
    }

    #[test]
    fn html_escaping_neutralizes_markup() {
        assert_eq!(
            escape_html("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
        assert_eq!(escape_html("plain ü"), "plain ü");
    }

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        // RFC 4648 section 10.
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected);
        }
        assert_eq!(base64(&[0xff, 0xfe, 0x00]), "//4A");
    }

    #[test]
    fn frames_are_evenly_spaced_with_first_and_last() {
        assert_eq!(spaced(3, 16), [0, 1, 2]);
        assert_eq!(spaced(0, 16), Vec::<usize>::new());
        let s = spaced(100, 16);
        assert_eq!((s.len(), s[0], s[15]), (16, 0, 99));
        assert!(s.windows(2).all(|w| w[1] > w[0]));
        assert_eq!(number(0.000123456), "1.235e-4");
        assert_eq!(number(1.23456), "1.235");
        assert_eq!(number(40.0), "40");
        assert_eq!(number(40.5), "40.50");
    }

    #[test]
    fn partial_run_with_hostile_text_renders_escaped() {
        let dir = std::env::temp_dir().join(format!("nash-report-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("samples")).unwrap();
        let evil = "<script>alert(1)</script>";
        std::fs::write(
            dir.join("pipeline.resolved.json"),
            json!({"name": evil, "training": {"steps": 10}}).to_string(),
        )
        .unwrap();
        // An interrupted run: no summary.json, the last line cut mid-write.
        std::fs::write(
            dir.join("metrics.jsonl"),
            "{\"step\":0,\"split\":\"test\",\"eval\":{\"loss\":2.0},\"metrics\":{}}\n\
             {\"step\":5,\"epoch\":0,\"losses\":{\"loss\":1.0},\"elapsed_s\":0.1}\n{\"step\":10,\"los",
        )
        .unwrap();
        std::fs::write(
            dir.join("health.jsonl"),
            json!({"step": 5, "kind": "spike", "severity": "warning", "message": evil, "action": "rollback"})
                .to_string(),
        )
        .unwrap();
        let img = crate::outputs::grid::Canvas::filled(4, 4, 1, 128);
        img.write_png(&dir.join("samples/step-00000005.png")).unwrap();
        img.write_png(&dir.join("samples/step-00000000.png")).unwrap();
        let path = finish_run_outputs(&dir).unwrap();
        let html = std::fs::read_to_string(&path).unwrap();
        assert!(!html.contains(evil), "raw markup from the run leaked into the page");
        assert!(html.contains("<title>&lt;script&gt;alert(1)&lt;/script&gt; - nash run report</title>"));
        assert!(html.contains("status-interrupted"));
        assert!(html.contains("last logged step 5") && html.contains("1 unreadable line"));
        assert!(html.contains("<td>spike</td>") && html.contains("sev-warning"));
        // Two curves (losses, eval) and two frames, all embedded, in step order.
        assert_eq!(html.matches("src=\"data:image/png;base64,").count(), 4);
        assert!(!html.contains("src=\"samples") && !html.contains("src=\"curves"));
        assert!(html.find("step 0</figcaption>").unwrap() < html.find("step 5</figcaption>").unwrap());
        let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
        assert_eq!(csv.lines().count(), 3);
        // Without a health log the section says so.
        std::fs::remove_file(dir.join("health.jsonl")).unwrap();
        assert!(render_report(&dir).unwrap().contains("no events"));
        std::fs::remove_dir_all(&dir).unwrap();
        let err = write_report(&dir).unwrap_err().to_string();
        assert!(err.contains("not a folder"), "{err}");
    }
}
