//! `nash bench conv`: the convolution products of the 28x28 DCGAN (`examples/speed/dcgan.toml`),
//! each timed through both routes of [`nash_core::layers::conv::kernels`] side by side in one
//! process: the column matrices (im2col / col2im and gemm, the route of CPUs without AVX-512) and
//! the fastest route (implicit GEMM where it pays). The rounds interleave the routes, so a slow
//! period of a noisy machine slows both; a whole training step (`nash bench speed`) moves by
//! more than these products' differences from one process to the next on such machines.

use std::fmt::Write as _;
use std::time::Instant;

use nash_core::layers::conv::kernels::{self, GradientsMut, Route};
use nash_core::layers::ConvGeometry;
use serde::Serialize;

/// The products of one convolution geometry that a DCGAN step runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Product {
    /// The convolution.
    Forward,
    /// The convolution's input gradient (a transposed convolution).
    InputGradient,
    /// The convolution's weight gradient.
    WeightGradient,
    /// The transposed convolution (the generator's layers).
    TransposedForward,
    /// The transposed convolution's input gradient (a convolution).
    TransposedInputGradient,
    /// The transposed convolution's weight gradient.
    TransposedWeightGradient,
}

impl Product {
    /// Every product, in table order.
    pub const ALL: [Product; 6] = [
        Product::Forward,
        Product::InputGradient,
        Product::WeightGradient,
        Product::TransposedForward,
        Product::TransposedInputGradient,
        Product::TransposedWeightGradient,
    ];

    /// The product's name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Product::Forward => "conv forward",
            Product::InputGradient => "conv input gradient",
            Product::WeightGradient => "conv weight gradient",
            Product::TransposedForward => "conv-transpose forward",
            Product::TransposedInputGradient => "conv-transpose input gradient",
            Product::TransposedWeightGradient => "conv-transpose weight gradient",
        }
    }
}

/// The DCGAN's two convolution geometries at base width 64: the discriminator's convolutions,
/// whose adjoints are the generator's transposed convolutions.
pub fn dcgan_geometries() -> Vec<(&'static str, ConvGeometry)> {
    // Both are valid geometries (4x4 kernels, stride 2, padding 1 on 28x28 and 14x14 images).
    let geometry = |c_in, side, c_out| ConvGeometry::conv(c_in, side, side, c_out, 4, 2, 1).expect("valid geometry");
    vec![
        ("1x28x28 -> 64x14x14", geometry(1, 28, 64)),
        ("64x14x14 -> 128x7x7", geometry(64, 14, 128)),
    ]
}

/// One product's times through both routes.
#[derive(Clone, Debug, Serialize)]
pub struct ProductTiming {
    /// The convolution geometry (input -> output of the convolution).
    pub layer: &'static str,
    /// The product.
    pub product: Product,
    /// Multiply-adds times two, per call.
    pub flop: f64,
    /// Milliseconds per call through column matrices, one value per round.
    pub column_matrices_ms: Vec<f64>,
    /// Milliseconds per call through the fastest route, one value per round.
    pub fastest_ms: Vec<f64>,
}

/// The median of `values` (the upper one of an even count).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

impl ProductTiming {
    /// Median column-matrix time over median fastest-route time.
    pub fn speedup(&self) -> f64 {
        median(&self.column_matrices_ms) / median(&self.fastest_ms)
    }
}

/// Deterministic values in [-1, 1) (the products' cost does not depend on them).
fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 2_654_435_761 + seed * 40_503) % 65_536) as f32 / 32_768.0 - 1.0)
        .collect()
}

/// Runs `backward` into a new zero-filled buffer of `len` values, given as the input's gradient
/// (`input`) or the weight's, as a training step's gradient buffer would be.
fn into_new_gradient(len: usize, input: bool, backward: impl FnOnce(GradientsMut<'_>)) {
    let mut buffer = vec![0.0; len];
    let out = if input {
        GradientsMut {
            input: Some(&mut buffer),
            ..GradientsMut::default()
        }
    } else {
        GradientsMut {
            weight: Some(&mut buffer),
            ..GradientsMut::default()
        }
    };
    backward(out);
    std::hint::black_box(buffer);
}

/// Times every product of every DCGAN geometry at `batch` samples, `rounds` rounds of `calls`
/// calls per route (after one untimed round), on the current thread's rayon pool. Leaves the
/// route at [`Route::Fastest`].
pub fn measure(batch: usize, rounds: usize, calls: usize) -> Vec<ProductTiming> {
    let mut timings = Vec::new();
    for (layer, g) in dcgan_geometries() {
        let x = values(batch * g.in_len(), 1);
        let w = values(g.weight_len(), 2);
        let dy = values(batch * g.out_len(), 3);
        let transposed_x = values(batch * g.out_len(), 4);
        let transposed_dy = values(batch * g.in_len(), 5);
        let run = |product: Product| match product {
            Product::Forward => {
                std::hint::black_box(kernels::conv_forward(&g, batch, &x, &w, None));
            }
            Product::InputGradient => into_new_gradient(batch * g.in_len(), true, |out| {
                kernels::conv_backward_adding(&g, batch, &x, &w, &dy, out)
            }),
            Product::WeightGradient => into_new_gradient(g.weight_len(), false, |out| {
                kernels::conv_backward_adding(&g, batch, &x, &w, &dy, out)
            }),
            Product::TransposedForward => {
                std::hint::black_box(kernels::conv_transpose_forward(&g, batch, &transposed_x, &w, None));
            }
            Product::TransposedInputGradient => into_new_gradient(batch * g.out_len(), true, |out| {
                kernels::conv_transpose_backward_adding(&g, batch, &transposed_x, &w, &transposed_dy, out)
            }),
            Product::TransposedWeightGradient => into_new_gradient(g.weight_len(), false, |out| {
                kernels::conv_transpose_backward_adding(&g, batch, &transposed_x, &w, &transposed_dy, out)
            }),
        };
        let flop = 2.0 * (batch * g.c_out * g.patch_len() * g.out_pixels()) as f64;
        for product in Product::ALL {
            let mut timing = ProductTiming {
                layer,
                product,
                flop,
                column_matrices_ms: Vec::new(),
                fastest_ms: Vec::new(),
            };
            for round in 0..=rounds {
                for route in [Route::ColumnMatrices, Route::Fastest] {
                    kernels::set_route(route);
                    let start = Instant::now();
                    for _ in 0..calls {
                        run(product);
                    }
                    let ms = start.elapsed().as_secs_f64() * 1e3 / calls as f64;
                    if round > 0 {
                        match route {
                            Route::ColumnMatrices => timing.column_matrices_ms.push(ms),
                            Route::Fastest => timing.fastest_ms.push(ms),
                        }
                    }
                }
            }
            timings.push(timing);
        }
    }
    kernels::set_route(Route::Fastest);
    timings
}

/// The markdown table of `timings`: median (min) milliseconds per call through each route, the
/// speedup of the medians and the fastest route's GFLOP/s at its median.
pub fn render(timings: &[ProductTiming], batch: usize, threads: usize) -> String {
    let mut out = format!(
        "DCGAN convolution products, batch {batch}, {threads} thread(s): ms per call, median (min) over the rounds\n\n\
         | layer | product | column matrices | fastest route | speedup | GFLOP/s |\n|---|---|---|---|---|---|\n"
    );
    let cell = |v: &[f64]| {
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        format!("{:.3} ({:.3})", median(v), min)
    };
    for t in timings {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.2}x | {:.1} |",
            t.layer,
            t.product.name(),
            cell(&t.column_matrices_ms),
            cell(&t.fastest_ms),
            t.speedup(),
            t.flop / (median(&t.fastest_ms) * 1e-3) / 1e9
        );
    }
    let (columns, fastest): (f64, f64) = timings
        .iter()
        .map(|t| (median(&t.column_matrices_ms), median(&t.fastest_ms)))
        .fold((0.0, 0.0), |(a, b), (c, f)| (a + c, b + f));
    let _ = writeln!(
        out,
        "\nAll products once: {columns:.2} ms through column matrices, {fastest:.2} ms through the fastest route ({:.2}x).",
        columns / fastest
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_every_product_through_both_routes() {
        let timings = measure(2, 1, 1);
        assert_eq!(timings.len(), 2 * Product::ALL.len());
        for t in &timings {
            assert_eq!((t.column_matrices_ms.len(), t.fastest_ms.len()), (1, 1));
            assert!(t.speedup().is_finite() && t.speedup() > 0.0, "{t:?}");
            assert!(t.flop > 0.0);
        }
        assert_eq!(kernels::route(), Route::Fastest);
        let table = render(&timings, 2, 1);
        assert!(table.contains("conv-transpose weight gradient") && table.contains("64x14x14 -> 128x7x7"));
    }
}
