//! Scatter plots of 2-D samples over the data: generated points as small dots, the mixture's modes
//! as larger markers with their 3σ circles (or, without a known mixture, a sample of real points in
//! gray), on fixed axes so that the frames of a run compare. Drawn with plotters' in-memory bitmap
//! backend and no text (no system fonts needed); light grid lines mark a round step, darker ones
//! the axes through 0.

use std::path::Path;

use anyhow::anyhow;
use nash_core::data::Mixture;
use plotters::prelude::*;

use super::grid::Canvas;

/// The square region a scatter plot shows: `[x0, x0 + span] x [y0, y0 + span]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Left edge.
    pub x0: f32,
    /// Bottom edge.
    pub y0: f32,
    /// Width and height.
    pub span: f32,
}

impl Limits {
    /// The smallest square holding `points`, widened by `margin` of its side on every side (at
    /// least `min_margin`), centered on the points' bounding box. `None` without finite points.
    pub fn around(points: impl IntoIterator<Item = [f32; 2]>, margin: f32, min_margin: f32) -> Option<Self> {
        let (mut lo, mut hi) = ([f32::INFINITY; 2], [f32::NEG_INFINITY; 2]);
        for p in points.into_iter().filter(|p| p[0].is_finite() && p[1].is_finite()) {
            for k in 0..2 {
                lo[k] = lo[k].min(p[k]);
                hi[k] = hi[k].max(p[k]);
            }
        }
        if lo[0] > hi[0] {
            return None;
        }
        let side = (hi[0] - lo[0]).max(hi[1] - lo[1]);
        let pad = (side * margin).max(min_margin).max(f32::EPSILON * side.max(1.0));
        let span = side + 2.0 * pad;
        let center = [(lo[0] + hi[0]) / 2.0, (lo[1] + hi[1]) / 2.0];
        Some(Limits {
            x0: center[0] - span / 2.0,
            y0: center[1] - span / 2.0,
            span,
        })
    }

    /// Axes for a mixture: its centers with a quarter of their extent around them (at least 5σ,
    /// and at least 1 for a single mode).
    pub fn for_mixture(mixture: &Mixture) -> Option<Self> {
        let single = mixture.centers.len() < 2;
        let min_margin = (5.0 * mixture.sigma).max(if single { 1.0 } else { 0.0 });
        Self::around(
            mixture.centers.iter().filter(|c| c.len() >= 2).map(|c| [c[0], c[1]]),
            0.25,
            min_margin,
        )
    }

    /// Axes for real points: their bounding box and a tenth of it around (at least 0.5 when they
    /// all coincide).
    pub fn for_points(points: &[[f32; 2]]) -> Option<Self> {
        Self::around(points.iter().copied(), 0.1, 0.0).map(|l| {
            if l.span > 0.0 {
                l
            } else {
                Limits {
                    x0: l.x0 - 0.5,
                    y0: l.y0 - 0.5,
                    span: 1.0,
                }
            }
        })
    }

    fn x1(&self) -> f32 {
        self.x0 + self.span
    }
    fn y1(&self) -> f32 {
        self.y0 + self.span
    }
    /// Whether `p` lies inside.
    pub fn contains(&self, p: [f32; 2]) -> bool {
        (self.x0..=self.x1()).contains(&p[0]) && (self.y0..=self.y1()).contains(&p[1])
    }
    /// `p` moved onto the nearest edge if it lies outside (non-finite coordinates go to the low edge).
    pub fn clamp(&self, p: [f32; 2]) -> [f32; 2] {
        let c = |v: f32, lo: f32, hi: f32| if v.is_nan() { lo } else { v.clamp(lo, hi) };
        [c(p[0], self.x0, self.x1()), c(p[1], self.y0, self.y1())]
    }
}

/// A round grid step giving 4 to 10 lines across `span`: 1, 2 or 5 times a power of ten.
pub fn grid_step(span: f32) -> f32 {
    if span.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) || !span.is_finite() {
        return 1.0;
    }
    // A power of ten with 4 to 40 lines, then the largest of 5x, 2x, 1x keeping at least 4.
    let mut step = 10f32.powf((span / 4.0).log10().floor());
    while span / step >= 40.0 {
        step *= 10.0;
    }
    while span / step < 4.0 {
        step /= 10.0;
    }
    for factor in [5.0, 2.0, 1.0] {
        if span / (step * factor) >= 4.0 {
            step *= factor;
            break;
        }
    }
    step
}

/// What a scatter plot shows besides the generated samples.
#[derive(Clone, Copy, Debug)]
pub enum Backdrop<'a> {
    /// The modes of a known mixture.
    Modes(&'a Mixture),
    /// Real points.
    Points(&'a [[f32; 2]]),
}

/// Colour of generated samples inside the axes (semi-transparent, so density shows).
const SAMPLE: RGBColor = RGBColor(31, 90, 200);
/// Colour of generated samples outside the axes, drawn on the nearest edge.
const OUTSIDE: RGBColor = RGBColor(220, 40, 30);
/// Colour of mode markers and their 3σ circles.
const MODE: RGBColor = RGBColor(240, 140, 0);
/// Colour of real points.
const REAL: RGBColor = RGBColor(165, 165, 165);

/// Draws `samples` (2-D points) over `backdrop` within `limits` on a `size` x `size` canvas (RGB).
/// Samples outside the limits are drawn on the nearest edge in red, so a diverging generator
/// still shows.
pub fn render_scatter(
    samples: &[[f32; 2]],
    backdrop: Backdrop<'_>,
    limits: Limits,
    size: u32,
) -> anyhow::Result<Canvas> {
    let side = size as usize;
    let mut pixels = vec![0u8; side * side * 3];
    let err = |e: &dyn std::fmt::Display| anyhow!("cannot draw the scatter plot: {e}");
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (size, size)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let chart = ChartBuilder::on(&root)
            .margin(8)
            .build_cartesian_2d(limits.x0..limits.x1(), limits.y0..limits.y1())
            .map_err(|e| err(&e))?;
        let plot = chart.plotting_area();
        let px_per_unit = plot.get_pixel_range().0.len() as f32 / limits.span;

        // Grid lines at a round step, the axes through 0 darker, a frame.
        let step = grid_step(limits.span);
        let lines = |lo: f32, hi: f32| {
            let first = (lo / step).ceil() as i64;
            let last = (hi / step).floor() as i64;
            (first..=last).map(move |k| k as f32 * step)
        };
        let (x0, x1, y0, y1) = (limits.x0, limits.x1(), limits.y0, limits.y1());
        let shade = |v: f32| {
            if v.abs() < step * 1e-3 {
                RGBColor(185, 185, 185)
            } else {
                RGBColor(232, 232, 232)
            }
        };
        for x in lines(x0, x1) {
            plot.draw(&PathElement::new(vec![(x, y0), (x, y1)], shade(x)))
                .map_err(|e| err(&e))?;
        }
        for y in lines(y0, y1) {
            plot.draw(&PathElement::new(vec![(x0, y), (x1, y)], shade(y)))
                .map_err(|e| err(&e))?;
        }
        let frame = vec![(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)];
        plot.draw(&PathElement::new(frame, RGBColor(120, 120, 120)))
            .map_err(|e| err(&e))?;

        match backdrop {
            Backdrop::Modes(mixture) => {
                let ring = (3.0 * mixture.sigma * px_per_unit).round() as i32;
                for c in mixture.centers.iter().filter(|c| c.len() >= 2) {
                    let at = (c[0], c[1]);
                    plot.draw(&Circle::new(at, 4, MODE.mix(0.45).filled()))
                        .map_err(|e| err(&e))?;
                    // The 3σ circle, where it is distinct from the marker.
                    if ring > 6 {
                        plot.draw(&Circle::new(at, ring, MODE.stroke_width(1)))
                            .map_err(|e| err(&e))?;
                    }
                }
            }
            Backdrop::Points(points) => {
                for p in points.iter().filter(|p| limits.contains(**p)) {
                    plot.draw(&Circle::new((p[0], p[1]), 1, REAL.filled()))
                        .map_err(|e| err(&e))?;
                }
            }
        }
        for &p in samples {
            let (at, style) = if limits.contains(p) {
                (p, SAMPLE.mix(0.55).filled())
            } else {
                (limits.clamp(p), OUTSIDE.filled())
            };
            plot.draw(&Circle::new((at[0], at[1]), 2, style)).map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    Ok(Canvas {
        width: side,
        height: side,
        channels: 3,
        pixels,
    })
}

/// [`render_scatter`], written as a PNG file at `path`.
pub fn write_scatter(
    path: &Path,
    samples: &[[f32; 2]],
    backdrop: Backdrop<'_>,
    limits: Limits,
    size: u32,
) -> anyhow::Result<()> {
    render_scatter(samples, backdrop, limits, size)?.write_png(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> Mixture {
        Mixture {
            centers: (0..8)
                .map(|k| {
                    let a = k as f32 * std::f32::consts::FRAC_PI_4;
                    vec![a.cos(), a.sin()]
                })
                .collect(),
            sigma: 0.01,
        }
    }

    #[test]
    fn limits_are_square_around_the_data() {
        let l = Limits::for_mixture(&ring()).unwrap();
        // Centers span [-1, 1]; a quarter of 2 on each side.
        assert!(
            (l.x0 + 1.5).abs() < 1e-5 && (l.y0 + 1.5).abs() < 1e-5 && (l.span - 3.0).abs() < 1e-5,
            "{l:?}"
        );
        let l = Limits::for_points(&[[0.0, 0.0], [4.0, 1.0]]).unwrap();
        // Side 4, margin 0.4, centered on (2, 0.5).
        assert!(
            (l.span - 4.8).abs() < 1e-5 && (l.x0 + 0.4).abs() < 1e-5 && (l.y0 + 1.9).abs() < 1e-5,
            "{l:?}"
        );
        let l = Limits::for_points(&[[2.0, 2.0]]).unwrap();
        assert!(l.span > 0.0 && l.contains([2.0, 2.0]));
        assert!(Limits::for_points(&[]).is_none());
        assert!(Limits::for_points(&[[f32::NAN, 0.0]]).is_none());
        assert_eq!(l.clamp([100.0, f32::NAN]), [l.x0 + l.span, l.y0]);
    }

    #[test]
    fn grid_steps_are_round() {
        assert_eq!(grid_step(3.0), 0.5);
        assert_eq!(grid_step(10.4), 2.0);
        assert_eq!(grid_step(100.0), 20.0);
        assert!((grid_step(0.04) - 0.01).abs() < 1e-6);
        assert_eq!(grid_step(0.0), 1.0);
        for span in [0.3f32, 0.4, 1.0, 2.6, 4.0, 7.0, 40.0, 55.0, 1234.0] {
            let lines = span / grid_step(span);
            assert!((4.0..=10.0).contains(&lines), "{span}: {lines} lines");
        }
    }

    #[test]
    fn scatter_png_has_the_size_and_draws_samples() {
        let mixture = ring();
        let limits = Limits::for_mixture(&mixture).unwrap();
        // Samples only at mode 0 (1, 0), plus one far outside.
        let samples: Vec<[f32; 2]> = (0..50).map(|_| [1.0, 0.0]).chain([[40.0, 0.0]]).collect();
        let path = std::env::temp_dir().join(format!("nash-scatter-test-{}.png", std::process::id()));
        write_scatter(&path, &samples, Backdrop::Modes(&mixture), limits, 200).unwrap();
        let img = image::open(&path).unwrap().into_rgb8();
        assert_eq!(img.dimensions(), (200, 200));
        let count = |f: &dyn Fn([u8; 3]) -> bool| img.pixels().filter(|p| f(p.0)).count();
        let bluish = count(&|[r, _, b]| b > 150 && r < 150);
        // Mode markers: orange at 45% over white, about (248, 203, 140).
        let orange = count(&|[r, g, b]| r > 230 && (150..215).contains(&g) && b < 170);
        let red = count(&|[r, g, b]| r > 200 && g < 80 && b < 80);
        assert!(bluish > 0, "the samples are drawn");
        assert!(orange > 7 * 10, "the modes are drawn: {orange} orange pixels");
        assert!(red > 0, "the sample outside the axes is drawn on the edge");
        // The mode at (-1, 0) has no samples: around its pixel there is no blue.
        // The plotting area is 184 px wide for a span of 3 starting at -1.5, margin 8.
        let to_px = |v: f32| (8.0 + (v + 1.5) / 3.0 * 184.0) as u32;
        let (mx, my) = (to_px(-1.0), to_px(0.0));
        for dy in 0..5 {
            for dx in 0..5 {
                let [r, _, b] = img.get_pixel(mx + dx - 2, my + dy - 2).0;
                assert!(!(b > 150 && r < 150), "no sample near the empty mode");
            }
        }
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn scatter_over_real_points() {
        let real: Vec<[f32; 2]> = (0..100).map(|i| [i as f32 / 10.0, (i % 7) as f32]).collect();
        let limits = Limits::for_points(&real).unwrap();
        let canvas = render_scatter(&[[5.0, 3.0]], Backdrop::Points(&real), limits, 120).unwrap();
        assert_eq!((canvas.width, canvas.height, canvas.channels), (120, 120, 3));
        let gray = canvas
            .pixels
            .chunks(3)
            .filter(|p| p[0] == REAL.0 && p[1] == REAL.1 && p[2] == REAL.2)
            .count();
        assert!(gray > 50, "the real points are drawn: {gray}");
    }
}
