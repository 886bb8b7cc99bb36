//! Line plots of a run's `metrics.jsonl`: one figure per group (training losses, diagnostics,
//! held-out eval losses, metrics, learning rates) with the step on the x axis, written to
//! `<run>/curves/<group>.png`.
//!
//! The plots carry no text (plotters' bitmap backend without a font backend cannot draw any, and no
//! system fonts are needed): light grid lines mark round steps ([`grid_step`]), and the titles,
//! legends and axis ranges are in the HTML report around the pictures ([`CurveGroup`] holds them).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use nash_core::serde_json::Value;
use plotters::prelude::*;

use super::grid::Canvas;
use super::scatter::grid_step;

/// Width of a curve figure, in pixels.
pub const CURVE_WIDTH: u32 = 800;
/// Height of a curve figure, in pixels.
pub const CURVE_HEIGHT: u32 = 340;
/// Series drawn with a marker on every point when they have at most this many points.
pub const MARKER_POINTS: usize = 60;

/// The colours of a figure's series, in order (matplotlib's tab10), repeated past ten.
pub const PALETTE: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

/// The groups plotted, in order: the key of the object in a `metrics.jsonl` line (also the
/// figure's file stem) and the figure's title.
pub const GROUPS: [(&str, &str); 5] = [
    ("losses", "Training losses"),
    ("diagnostics", "Training diagnostics"),
    ("eval", "Held-out losses"),
    ("metrics", "Metrics"),
    ("lr", "Learning rates"),
];

/// One line of a figure.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// The key inside its group (`loss/generator`).
    pub name: String,
    /// Its colour.
    pub color: (u8, u8, u8),
    /// `(step, value)` in file order, finite values only.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// The value at the last point.
    pub fn last(&self) -> Option<f64> {
        self.points.last().map(|p| p.1)
    }
}

/// A figure: one group's series with the axes they are drawn on.
#[derive(Clone, Debug, PartialEq)]
pub struct CurveGroup {
    /// The key of the group in `metrics.jsonl` and the figure's file stem.
    pub key: String,
    /// Its title.
    pub title: String,
    /// Its lines, sorted by name.
    pub series: Vec<Series>,
    /// The x axis (steps), low to high.
    pub x_range: (f64, f64),
    /// The y axis, low to high.
    pub y_range: (f64, f64),
}

impl CurveGroup {
    /// Spacing of the vertical grid lines, in steps.
    pub fn x_step(&self) -> f64 {
        grid_step((self.x_range.1 - self.x_range.0) as f32) as f64
    }
    /// Spacing of the horizontal grid lines.
    pub fn y_step(&self) -> f64 {
        grid_step((self.y_range.1 - self.y_range.0) as f32) as f64
    }
    /// Where the figure lives in the run folder `run_dir`.
    pub fn path(&self, run_dir: &Path) -> PathBuf {
        curve_path(run_dir, &self.key)
    }
}

/// `<run_dir>/curves/<key>.png`.
pub fn curve_path(run_dir: &Path, key: &str) -> PathBuf {
    run_dir.join("curves").join(format!("{key}.png"))
}

/// The parsed lines of `<run_dir>/metrics.jsonl`: an absent file gives no lines, and lines that
/// are not JSON objects (the last line of a run killed mid-write) are skipped. Also returns the
/// number of lines skipped.
pub fn read_metrics(run_dir: &Path) -> anyhow::Result<(Vec<Value>, usize)> {
    let path = run_dir.join("metrics.jsonl");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut lines = Vec::new();
    let mut skipped = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match nash_core::serde_json::from_str::<Value>(line) {
            Ok(v @ Value::Object(_)) => lines.push(v),
            _ => skipped += 1,
        }
    }
    Ok((lines, skipped))
}

/// A margin of 5% of `lo..hi` on both sides; a flat range becomes `v ± max(|v|/10, 0.5)`
/// (so a constant learning rate still shows as a line in the middle).
fn padded(lo: f64, hi: f64) -> (f64, f64) {
    if hi > lo {
        let pad = (hi - lo) * 0.05;
        (lo - pad, hi + pad)
    } else {
        let pad = (lo.abs() / 10.0).max(if lo == 0.0 { 0.5 } else { 0.0 });
        (lo - pad, hi + pad)
    }
}

/// The figures of `lines` (parsed `metrics.jsonl`), in [`GROUPS`] order; groups without a finite
/// value are left out.
pub fn curve_groups(lines: &[Value]) -> Vec<CurveGroup> {
    let mut groups = Vec::new();
    for (key, title) in GROUPS {
        let mut series: std::collections::BTreeMap<String, Vec<(f64, f64)>> = Default::default();
        for line in lines {
            let (Some(step), Some(Value::Object(values))) = (line.get("step").and_then(Value::as_f64), line.get(key))
            else {
                continue;
            };
            for (name, value) in values {
                if let Some(v) = value.as_f64().filter(|v| v.is_finite()) {
                    series.entry(name.clone()).or_default().push((step, v));
                }
            }
        }
        if series.is_empty() {
            continue;
        }
        let all = series.values().flatten();
        let (mut xl, mut xh, mut yl, mut yh) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
        for &(x, y) in all {
            (xl, xh, yl, yh) = (xl.min(x), xh.max(x), yl.min(y), yh.max(y));
        }
        let x_range = if xh > xl { (xl, xh) } else { (xl - 1.0, xh + 1.0) };
        groups.push(CurveGroup {
            key: key.to_string(),
            title: title.to_string(),
            series: series
                .into_iter()
                .enumerate()
                .map(|(i, (name, points))| Series {
                    name,
                    color: PALETTE[i % PALETTE.len()],
                    points,
                })
                .collect(),
            x_range,
            y_range: padded(yl, yh),
        });
    }
    groups
}

/// Draws `group` on a [`CURVE_WIDTH`] x [`CURVE_HEIGHT`] RGB canvas: a frame, grid lines at round
/// steps, the line `y = 0` darker when it is in range, and each series as a line (with point
/// markers when it is short; a single point is a marker).
pub fn render_curves(group: &CurveGroup) -> anyhow::Result<Canvas> {
    let (w, h) = (CURVE_WIDTH, CURVE_HEIGHT);
    let mut pixels = vec![0u8; (w * h * 3) as usize];
    let err = |e: &dyn std::fmt::Display| anyhow!("cannot draw the curves of {}: {e}", group.key);
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let ((x0, x1), (y0, y1)) = (group.x_range, group.y_range);
        let chart = ChartBuilder::on(&root)
            .margin(10)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| err(&e))?;
        let plot = chart.plotting_area();
        let lines = |lo: f64, hi: f64, step: f64| {
            let first = (lo / step).ceil() as i64;
            let last = (hi / step).floor() as i64;
            (first..=last).map(move |k| k as f64 * step)
        };
        let (xs, ys) = (group.x_step(), group.y_step());
        for x in lines(x0, x1, xs) {
            plot.draw(&PathElement::new(vec![(x, y0), (x, y1)], RGBColor(232, 232, 232)))
                .map_err(|e| err(&e))?;
        }
        for y in lines(y0, y1, ys) {
            let shade = if y.abs() < ys * 1e-3 { 170 } else { 232 };
            plot.draw(&PathElement::new(vec![(x0, y), (x1, y)], RGBColor(shade, shade, shade)))
                .map_err(|e| err(&e))?;
        }
        let frame = vec![(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)];
        plot.draw(&PathElement::new(frame, RGBColor(120, 120, 120)))
            .map_err(|e| err(&e))?;
        for s in &group.series {
            let color = RGBColor(s.color.0, s.color.1, s.color.2);
            if s.points.len() > 1 {
                plot.draw(&PathElement::new(s.points.clone(), color.stroke_width(2)))
                    .map_err(|e| err(&e))?;
            }
            if s.points.len() <= MARKER_POINTS {
                for &p in &s.points {
                    plot.draw(&Circle::new(p, 3, color.filled())).map_err(|e| err(&e))?;
                }
            }
        }
        root.present().map_err(|e| err(&e))?;
    }
    Ok(Canvas {
        width: w as usize,
        height: h as usize,
        channels: 3,
        pixels,
    })
}

/// Writes a figure for every group of `<run_dir>/metrics.jsonl` into `<run_dir>/curves/` and
/// returns the files written; figures of groups with no data left from an earlier call are removed.
pub fn write_curve_files(run_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let (lines, _) = read_metrics(run_dir)?;
    let groups = curve_groups(&lines);
    let dir = run_dir.join("curves");
    if !groups.is_empty() {
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut written = Vec::new();
    for group in &groups {
        let path = group.path(run_dir);
        render_curves(group)?.write_png(&path)?;
        written.push(path);
    }
    for (key, _) in GROUPS {
        let path = curve_path(run_dir, key);
        if !written.contains(&path) && path.exists() {
            std::fs::remove_file(&path).with_context(|| format!("cannot remove the stale {}", path.display()))?;
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nash_core::serde_json::json;

    fn lines() -> Vec<Value> {
        vec![
            json!({"step": 0, "split": "test", "eval": {"loss": 2.0}, "metrics": {}}),
            json!({"step": 10, "losses": {"loss/g": 1.0, "loss/d": 3.0}, "lr": {"g": 0.001}}),
            json!({"step": 20, "losses": {"loss/g": 0.5, "loss/d": null}, "lr": {"g": 0.001}}),
            json!({"step": 20, "split": "test", "eval": {"loss": 1.0}, "metrics": {}}),
        ]
    }

    #[test]
    fn groups_collect_finite_points_per_key() {
        let groups = curve_groups(&lines());
        let keys: Vec<&str> = groups.iter().map(|g| g.key.as_str()).collect();
        // `metrics` is empty and diagnostics absent: no figure.
        assert_eq!(keys, ["losses", "eval", "lr"]);
        let losses = &groups[0];
        assert_eq!(losses.series[0].name, "loss/d");
        // The null (a non-finite value in JSON) is skipped.
        assert_eq!(losses.series[0].points, [(10.0, 3.0)]);
        assert_eq!(losses.series[1].points, [(10.0, 1.0), (20.0, 0.5)]);
        assert_eq!(losses.series[1].color, PALETTE[1]);
        assert_eq!(losses.x_range, (10.0, 20.0));
        // 5% of 0.5..3 on both sides.
        assert!((losses.y_range.0 - 0.375).abs() < 1e-12 && (losses.y_range.1 - 3.125).abs() < 1e-12);
        // A constant learning rate gets a range around it.
        let lr = &groups[2];
        assert!(lr.y_range.0 < 0.001 && lr.y_range.1 > 0.001);
        assert_eq!(groups[1].series[0].last(), Some(1.0));
    }

    #[test]
    fn figures_draw_each_series_in_its_colour() {
        let dir = std::env::temp_dir().join(format!("nash-curves-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text: String = lines().iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(dir.join("metrics.jsonl"), text + "{\"step\": 30, \"los").unwrap();
        // A stale figure of a group that has no data now is removed.
        std::fs::create_dir_all(dir.join("curves")).unwrap();
        std::fs::write(curve_path(&dir, "metrics"), b"old").unwrap();
        let written = write_curve_files(&dir).unwrap();
        assert_eq!(written.len(), 3);
        assert!(!curve_path(&dir, "metrics").exists());
        let img = image::open(&written[0]).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (CURVE_WIDTH, CURVE_HEIGHT));
        let count = |c: (u8, u8, u8)| img.pixels().filter(|p| p.0 == [c.0, c.1, c.2]).count();
        assert!(count(PALETTE[0]) > 10, "the first series' marker is drawn");
        assert!(count(PALETTE[1]) > 100, "the second series' line is drawn");
        assert_eq!(count(PALETTE[2]), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
