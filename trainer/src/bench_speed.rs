//! `nash bench speed`: training speed and peak memory of the reference workloads (issue 7), the
//! Rust side of the comparison with TensorFlow, JAX and PyTorch (`bench/`).
//!
//! The workloads are the pipelines in `examples/speed/` (embedded in the binary): the dense
//! `autoencoder` 784-128-64-16-64-784, the `mlp_gan` (G 100-128-256-512-784, D 784-256-512-1) and the
//! 28x28 `dcgan` at base width 64, each on 1024 fixed synthetic samples. Every measurement runs in a
//! child process of this same binary (`nash bench speed-child`, hidden), so that its peak resident
//! set is its own: the child builds the run exactly as `nash train` does (the same pipeline reader,
//! `--set` overrides for the batch size and the width multiplier, the same [`crate::run::build`],
//! [`DataLoader`] and step: [`nash_core::model::Model::train_step`] then the stabilizers' `end_step`),
//! starts a compute pool of `--threads` threads, runs `warmup` steps, then `repeats` timed
//! runs of `steps` steps (by default as many as last about [`TARGET_RUN_S`], from a short
//! calibration), and prints one JSON [`Record`] (the contract shared with `bench/`) as the last line
//! of its standard output. The parent pins nothing (`bench/` runs it under `taskset`).
//!
//! For each thread count, a child also times a 1024x1024x1024 f32 matrix product through
//! [`nash_core::kernels::matmul`], the kernel of nash's layers (the `matmul peak` row), and the
//! autoencoder's achieved GFLOP/s are reported as a share of it. `--curve` measures the cost curve instead: batch sizes
//! [`CURVE_BATCHES`] at width 1 and widths [`CURVE_WIDTHS`] at batch 64.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use nash_core::data::{DataLoader, Split};
use nash_core::model::TrainContext;
use nash_core::rand::{Rng as _, SeedableRng};
use nash_core::serde_json;
use nash_core::stabilizer::HookContext;
use nash_core::tensor::Rng;
use nash_core::tracing;
use serde::{Deserialize, Serialize};

use crate::pipeline::{Override, PipelineSource};
use crate::run::Run;
use crate::train::RunOptions;

/// The default batch size of every workload.
pub const DEFAULT_BATCH: usize = 64;
/// Samples in every workload's training data: the largest batch.
pub const DATA_SAMPLES: usize = 1024;
/// Batch sizes of the cost curve (at width 1).
pub const CURVE_BATCHES: [usize; 7] = [16, 32, 64, 128, 256, 512, 1024];
/// Width multipliers of the cost curve (at batch [`DEFAULT_BATCH`]).
pub const CURVE_WIDTHS: [f64; 4] = [0.5, 1.0, 2.0, 4.0];
/// Side of the square matrices of the matrix-product peak.
pub const MATMUL_SIZE: usize = 1024;
/// How long a timed run lasts when `--steps` is not given, in seconds.
pub const TARGET_RUN_S: f64 = 0.5;
/// The calibration doubles its number of steps until a batch of them lasts this long, in seconds.
const CALIBRATION_S: f64 = 0.1;
/// The `workload` of the matrix-product record.
pub const MATMUL_WORKLOAD: &str = "matmul_peak";

/// A workload of the speed benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Workload {
    /// The dense autoencoder 784-128-64-16-64-784 (examples/speed/autoencoder.toml).
    #[value(name = "autoencoder")]
    Autoencoder,
    /// The MLP GAN, G 100-128-256-512-784 and D 784-256-512-1 (examples/speed/mlp_gan.toml).
    #[value(name = "mlp_gan")]
    MlpGan,
    /// The 28x28 DCGAN at base width 64 (examples/speed/dcgan.toml).
    #[value(name = "dcgan")]
    Dcgan,
}

impl Workload {
    /// Every workload, in table order.
    pub const ALL: [Workload; 3] = [Workload::Autoencoder, Workload::MlpGan, Workload::Dcgan];

    /// The name on the command line and in the JSON records.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Autoencoder => "autoencoder",
            Workload::MlpGan => "mlp_gan",
            Workload::Dcgan => "dcgan",
        }
    }

    /// The workload's pipeline (the text of `examples/speed/<name>.toml`).
    pub fn pipeline(self) -> &'static str {
        match self {
            Workload::Autoencoder => include_str!("../../examples/speed/autoencoder.toml"),
            Workload::MlpGan => include_str!("../../examples/speed/mlp_gan.toml"),
            Workload::Dcgan => include_str!("../../examples/speed/dcgan.toml"),
        }
    }

    /// Every hidden width of the pipeline: the value's path and its size at width 1.
    fn hidden_widths(self) -> &'static [(&'static str, usize)] {
        match self {
            Workload::Autoencoder => &[
                ("model.encoder.layers[0].out_features", 128),
                ("model.encoder.layers[2].out_features", 64),
                ("model.encoder.layers[4].out_features", 16),
                ("model.decoder.layers[0].out_features", 64),
            ],
            Workload::MlpGan => &[
                ("model.generator.layers[0].out_features", 128),
                ("model.generator.layers[2].out_features", 256),
                ("model.generator.layers[4].out_features", 512),
                ("model.discriminator.layers[0].out_features", 256),
                ("model.discriminator.layers[2].out_features", 512),
            ],
            Workload::Dcgan => &[("model.base_width", 64)],
        }
    }

    /// The `--set` overrides that give the pipeline batch size `batch` and multiply every hidden
    /// width by `width` (rounded, at least 1).
    pub fn overrides(self, batch: usize, width: f64) -> Vec<String> {
        let mut set = vec![format!("training.batch_size={batch}")];
        set.extend(
            self.hidden_widths()
                .iter()
                .map(|(path, base)| format!("{path}={}", scaled(*base, width))),
        );
        set
    }

    /// Floating-point operations of one training step, where they are counted (the autoencoder).
    ///
    /// Forward: `2 B Σ in·out` over the five linear layers (784-h1-h2-h3-h4-784, the hidden widths
    /// scaled by `width`); backward: about twice the forward (a gradient for the weights and one for
    /// the inputs of every layer), so `6 B Σ in·out` per step. Activations, the loss and Adam are
    /// linear in the sizes and left out.
    pub fn flops_per_step(self, batch: usize, width: f64) -> Option<f64> {
        if self != Workload::Autoencoder {
            return None;
        }
        let mut dims = vec![784];
        dims.extend(self.hidden_widths().iter().map(|(_, base)| scaled(*base, width)));
        dims.push(784);
        let weights: usize = dims.windows(2).map(|w| w[0] * w[1]).sum();
        Some(6.0 * batch as f64 * weights as f64)
    }
}

/// `base * width`, rounded, at least 1.
fn scaled(base: usize, width: f64) -> usize {
    ((base as f64 * width).round() as usize).max(1)
}

/// What one child process measures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    /// Training steps of a workload at a batch size and width multiplier.
    Workload {
        /// The workload.
        workload: Workload,
        /// Samples per step.
        batch: usize,
        /// Multiplier of every hidden width.
        width: f64,
    },
    /// Products of two `size x size` f32 matrices.
    Matmul {
        /// The matrices' side.
        size: usize,
    },
}

/// One measurement: a target, timed in its own process.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Measurement {
    /// What is timed.
    pub target: Target,
    /// Threads of the compute pool.
    pub threads: usize,
    /// Untimed steps first.
    pub warmup: u64,
    /// Steps per timed run (`None`: calibrated to about [`TARGET_RUN_S`]).
    pub steps: Option<u64>,
    /// Timed runs.
    pub repeats: usize,
}

/// One measurement's result: the JSON object shared with the Python side of the benchmark
/// (`bench/`), plus the matrix-product fields where they apply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// `nash` here (`tensorflow`, `jax`, `pytorch` on the Python side).
    pub framework: String,
    /// The framework's version.
    pub version: String,
    /// `autoencoder`, `mlp_gan`, `dcgan`, or [`MATMUL_WORKLOAD`].
    pub workload: String,
    /// Threads of the compute pool.
    pub threads: usize,
    /// Samples per step (the matrices' side for the matrix product).
    pub batch: usize,
    /// Multiplier of every hidden width.
    pub width: f64,
    /// Untimed steps before the timed runs.
    pub warmup: u64,
    /// Steps per timed run.
    pub steps: u64,
    /// Steps per second of each timed run.
    pub steps_per_s: Vec<f64>,
    /// The slowest run's steps per second.
    pub min: f64,
    /// The median over runs.
    pub median: f64,
    /// Peak resident set of the measuring process, in MiB (null where it cannot be read).
    pub peak_rss_mb: Option<f64>,
    /// How the work was done.
    pub notes: String,
    /// Floating-point operations per step, in GFLOP (the autoencoder and the matrix product).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gflop_per_step: Option<f64>,
    /// Achieved GFLOP/s at the median steps per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gflops: Option<f64>,
    /// [`Record::gflops`] as a percentage of the matrix-product peak at the same thread count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent_of_matmul_peak: Option<f64>,
    /// The share of the training steps whose kernels split across the pool
    /// (`training.adaptive_splitting`; a training workload only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_share: Option<f64>,
}

/// What `nash bench speed` was asked to do.
#[derive(Clone, Debug)]
pub struct SpeedOptions {
    /// The workloads, in table order.
    pub workloads: Vec<Workload>,
    /// Thread counts, each measured on its own.
    pub threads: Vec<usize>,
    /// Batch sizes (ignored by the curve).
    pub batches: Vec<usize>,
    /// Width multipliers (ignored by the curve).
    pub widths: Vec<f64>,
    /// Untimed steps of every measurement.
    pub warmup: u64,
    /// Steps per timed run (`None`: calibrated).
    pub steps: Option<u64>,
    /// Timed runs per measurement.
    pub repeats: usize,
    /// Measure the cost curve ([`CURVE_BATCHES`] at width 1, [`CURVE_WIDTHS`] at batch 64).
    pub curve: bool,
    /// Plugin libraries passed to every child (`--plugin`).
    pub extra_plugins: Vec<PathBuf>,
}

impl SpeedOptions {
    /// Refuses values no measurement can run with, saying what would be valid.
    fn check(&self) -> anyhow::Result<()> {
        let bad = |what: &str, message: String| Err(nash_core::Error::config(what, message).into());
        if self.threads.is_empty() || self.threads.contains(&0) {
            return bad(
                "--threads",
                "give thread counts of at least 1, e.g. `--threads 1,2`".into(),
            );
        }
        if let Some(b) = self.batches.iter().find(|b| !(1..=DATA_SAMPLES).contains(*b)) {
            return bad(
                "--batch",
                format!("batch {b} is outside 1..={DATA_SAMPLES} (the workloads' data hold {DATA_SAMPLES} samples)"),
            );
        }
        if let Some(w) = self.widths.iter().find(|w| !(w.is_finite() && **w > 0.0)) {
            return bad(
                "--width",
                format!("width {w} must be a positive number, e.g. 0.5, 1 or 2"),
            );
        }
        if self.batches.is_empty() || self.widths.is_empty() || self.workloads.is_empty() {
            return bad("nash bench speed", "give at least one workload, batch and width".into());
        }
        if self.repeats == 0 {
            return bad("--repeats", "must be at least 1".into());
        }
        if self.steps == Some(0) {
            return bad("--steps", "must be at least 1 (leave it out to calibrate)".into());
        }
        Ok(())
    }

    /// The (batch, width) points of each workload.
    fn points(&self) -> Vec<(usize, f64)> {
        let mut points: Vec<(usize, f64)> = if self.curve {
            let batches = CURVE_BATCHES.iter().map(|&b| (b, 1.0));
            batches
                .chain(CURVE_WIDTHS.iter().map(|&w| (DEFAULT_BATCH, w)))
                .collect()
        } else {
            self.batches
                .iter()
                .flat_map(|&b| self.widths.iter().map(move |&w| (b, w)))
                .collect()
        };
        let mut seen = Vec::new();
        points.retain(|p| {
            let new = !seen.contains(p);
            seen.push(*p);
            new
        });
        points
    }

    /// Every measurement, in order: per thread count, the matrix product, then each workload at
    /// each point.
    pub fn plan(&self) -> Vec<Measurement> {
        let points = self.points();
        let mut plan = Vec::new();
        for &threads in &self.threads {
            let measurement = |target| Measurement {
                target,
                threads,
                warmup: self.warmup,
                steps: self.steps,
                repeats: self.repeats,
            };
            // The product's step count is always calibrated: `--steps` sizes the workloads' runs.
            plan.push(Measurement {
                steps: None,
                ..measurement(Target::Matmul { size: MATMUL_SIZE })
            });
            for &workload in &self.workloads {
                for &(batch, width) in &points {
                    plan.push(measurement(Target::Workload { workload, batch, width }));
                }
            }
        }
        plan
    }
}

/// Runs the benchmark: every measurement of [`SpeedOptions::plan`] in a child process, in order;
/// the autoencoder's records get their share of the matrix-product peak at the same thread count.
pub fn run_speed(opts: &SpeedOptions) -> anyhow::Result<Vec<Record>> {
    opts.check()?;
    let plan = opts.plan();
    let mut records: Vec<Record> = Vec::with_capacity(plan.len());
    for (i, m) in plan.iter().enumerate() {
        let mut record = run_child(m, &opts.extra_plugins)?;
        let peak = records
            .iter()
            .find(|r| r.workload == MATMUL_WORKLOAD && r.threads == record.threads)
            .and_then(|r| r.gflops);
        if let (Some(achieved), Some(peak)) = (record.gflops, peak) {
            record.percent_of_matmul_peak = Some(100.0 * achieved / peak);
        }
        tracing::info!(
            "[{}/{}] {} threads {} batch {} width {}: median {:.1} steps/s, peak {:.0} MiB",
            i + 1,
            plan.len(),
            record.workload,
            record.threads,
            record.batch,
            record.width,
            record.median,
            record.peak_rss_mb.unwrap_or(f64::NAN)
        );
        records.push(record);
    }
    Ok(records)
}

/// The child's command-line arguments after `nash`: `bench speed-child ...`.
pub fn child_args(m: &Measurement) -> Vec<String> {
    let mut args: Vec<String> = vec!["bench".into(), "speed-child".into()];
    match m.target {
        Target::Workload { workload, batch, width } => {
            args.extend(["--workload".into(), workload.name().into()]);
            args.extend(["--batch".into(), batch.to_string(), "--width".into(), width.to_string()]);
        }
        Target::Matmul { size } => args.extend(["--matmul".into(), size.to_string()]),
    }
    args.extend(["--threads".into(), m.threads.to_string()]);
    args.extend(["--warmup".into(), m.warmup.to_string()]);
    args.extend(["--repeats".into(), m.repeats.to_string()]);
    if let Some(steps) = m.steps {
        args.extend(["--steps".into(), steps.to_string()]);
    }
    args
}

/// Measures `m` in a child process of this executable and reads its record.
fn run_child(m: &Measurement, extra_plugins: &[PathBuf]) -> anyhow::Result<Record> {
    let exe = std::env::current_exe().context("cannot find the nash executable")?;
    let args = child_args(m);
    let what = format!("`nash {}`", args.join(" "));
    let mut cmd = Command::new(exe);
    cmd.arg("--quiet");
    for p in extra_plugins {
        cmd.arg("--plugin").arg(p);
    }
    let output = cmd
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {what}"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!(
            "the measurement {what} failed ({}):\n{}",
            output.status,
            stderr.trim_end()
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
    serde_json::from_str(last)
        .with_context(|| format!("the measurement {what} printed no JSON record as its last line: {last:?}"))
}

/// Something timed step by step: a training run or repeated matrix products.
trait Timed {
    /// One step.
    fn step(&mut self) -> anyhow::Result<()>;
    /// A value the last step computed, read back to the host (a loss): it must be finite.
    fn read_back(&mut self) -> f64;
    /// The share of the steps so far whose kernels split across the pool, where a
    /// [`crate::threads::SplitGovernor`] decides it.
    fn split_share(&self) -> Option<f64> {
        None
    }
}

/// A training run built as `nash train` builds it, stepped as `nash train` steps it.
struct Training {
    run: Run,
    loader: DataLoader,
    rng: Rng,
    step: u64,
    loss: f64,
    governor: crate::threads::SplitGovernor,
}

impl Training {
    /// Reads `workload`'s pipeline with the overrides of `batch` and `width`, loads its plugins
    /// (and `extra_plugins`), and builds the run and its training data loader.
    fn new(workload: Workload, batch: usize, width: f64, extra_plugins: &[PathBuf]) -> anyhow::Result<Self> {
        let origin = format!("<embedded examples/speed/{}.toml>", workload.name());
        let source = PipelineSource::from_text(
            &origin,
            workload.name(),
            workload.pipeline(),
            crate::Format::Toml,
            Path::new("."),
        );
        let overrides = workload
            .overrides(batch, width)
            .iter()
            .map(|s| {
                s.parse::<Override>()
                    .map_err(|e| anyhow::anyhow!("{origin}: `{s}`: {e}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let prepared = crate::prepare(source, &overrides, extra_plugins, &RunOptions::default())?;
        let pipeline = &prepared.pipeline;
        let mut rng = Rng::seed_from_u64(pipeline.seed);
        let run = crate::run::build(pipeline, pipeline.seed, &mut rng)?;
        let loader = DataLoader::new(
            Split::Train,
            run.data.len(Split::Train),
            pipeline.training.batch_size,
            pipeline.seed,
        )?;
        Ok(Training {
            run,
            loader,
            rng,
            step: 0,
            loss: f64::NAN,
            governor: crate::threads::SplitGovernor::new(
                rayon::current_num_threads(),
                pipeline.training.adaptive_splitting,
            ),
        })
    }
}

impl Timed for Training {
    fn step(&mut self) -> anyhow::Result<()> {
        let run = &mut self.run;
        let batch = self.loader.next_batch(run.data.as_ref(), &run.device)?;
        let mut ctx = TrainContext {
            step: self.step,
            device: &run.device,
            rng: &mut self.rng,
            optimizers: &mut run.optimizers,
            stabilizers: &mut run.stabilizers,
        };
        let step = self.step;
        let report = self.governor.step(|| -> anyhow::Result<_> {
            let mut report = run
                .model
                .train_step(&batch, &mut ctx)
                .with_context(|| format!("training step {step} failed"))?;
            let mut hooks = HookContext {
                step,
                device: &run.device,
                rng: ctx.rng,
            };
            ctx.stabilizers.end_step(&mut report, &mut hooks)?;
            Ok(report)
        })?;
        self.loss = report.losses.values().sum();
        self.step += 1;
        Ok(())
    }

    fn read_back(&mut self) -> f64 {
        self.loss
    }

    fn split_share(&self) -> Option<f64> {
        Some(self.governor.split_share())
    }
}

/// Products of two fixed random square matrices through [`nash_core::kernels::matmul`], the
/// kernel nash's dense and convolution layers run on.
struct Matmul {
    size: usize,
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
}

impl Matmul {
    fn new(size: usize) -> Self {
        let mut rng = Rng::seed_from_u64(0);
        let mut draw = || {
            (0..size * size)
                .map(|_| rng.gen_range(-1.0f32..1.0))
                .collect::<Vec<_>>()
        };
        Matmul {
            size,
            a: draw(),
            b: draw(),
            c: vec![f32::NAN; size * size],
        }
    }
}

impl Timed for Matmul {
    fn step(&mut self) -> anyhow::Result<()> {
        let n = self.size;
        nash_core::kernels::matmul((n, n, n), &self.a, false, &self.b, false, &mut self.c, false);
        Ok(())
    }

    fn read_back(&mut self) -> f64 {
        self.c.first().map_or(f64::NAN, |&v| f64::from(v))
    }
}

/// `n` steps, then the read-back value, which must be finite.
fn steps(timed: &mut dyn Timed, n: u64) -> anyhow::Result<()> {
    for _ in 0..n {
        timed.step()?;
    }
    let v = timed.read_back();
    if !v.is_finite() {
        bail!("the steps computed a non-finite value ({v})");
    }
    Ok(())
}

/// Steps per timed run that last about [`TARGET_RUN_S`]: doubles a number of steps until they
/// last [`CALIBRATION_S`], then scales.
fn calibrate(timed: &mut dyn Timed) -> anyhow::Result<u64> {
    let mut n = 1u64;
    loop {
        let t = Instant::now();
        steps(timed, n)?;
        let s = t.elapsed().as_secs_f64();
        if s >= CALIBRATION_S || n >= 1 << 24 {
            return Ok(((TARGET_RUN_S * n as f64 / s.max(1e-9)).ceil() as u64).max(1));
        }
        n *= 2;
    }
}

/// Steps per second of `repeats` timed runs of `n` steps each.
fn timed_runs(timed: &mut dyn Timed, n: u64, repeats: usize) -> anyhow::Result<Vec<f64>> {
    (0..repeats)
        .map(|_| {
            let t = Instant::now();
            steps(timed, n)?;
            Ok(n as f64 / t.elapsed().as_secs_f64())
        })
        .collect()
}

/// The median of `values` (the mean of the middle two for an even count); NaN for none.
pub fn median(values: &[f64]) -> f64 {
    crate::median(values.iter().copied()).unwrap_or(f64::NAN)
}

/// This process's peak resident set in MiB (`VmHWM` of /proc/self/status, what `getrusage`'s
/// `ru_maxrss` reports on Linux); `None` where it cannot be read.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// The child's work: measures `m` in this process and returns its record.
pub fn measure(m: &Measurement, extra_plugins: &[PathBuf]) -> anyhow::Result<Record> {
    if m.threads == 0 {
        bail!("--threads must be at least 1");
    }
    crate::threads::on_pool(Some(m.threads), || measure_on_pool(m, extra_plugins))?
}

/// [`measure`]'s work, on a worker of a pool of `m.threads` threads, as a training run computes.
fn measure_on_pool(m: &Measurement, extra_plugins: &[PathBuf]) -> anyhow::Result<Record> {
    let (mut timed, workload, batch, width, flop, notes): (Box<dyn Timed>, &str, usize, f64, Option<f64>, String) =
        match m.target {
            Target::Workload { workload, batch, width } => (
                Box::new(Training::new(workload, batch, width, extra_plugins)?),
                workload.name(),
                batch,
                width,
                workload.flops_per_step(batch, width),
                format!(
                    "the `nash train` step (DataLoader batch, Model::train_step, stabilizers' end_step) on \
                     examples/speed/{}.toml; CPU, f32; one loss read back per step",
                    workload.name()
                ),
            ),
            Target::Matmul { size } => (
                Box::new(Matmul::new(size)),
                MATMUL_WORKLOAD,
                size,
                1.0,
                Some(2.0 * (size as f64).powi(3)),
                format!(
                    "nash_core::kernels::matmul (gemm 0.19) of two {size}x{size} f32 matrices; a step is one product"
                ),
            ),
        };
    steps(timed.as_mut(), m.warmup)?;
    let n = match m.steps {
        Some(n) => n,
        None => calibrate(timed.as_mut())?,
    };
    let rates = timed_runs(timed.as_mut(), n, m.repeats)?;
    let median = median(&rates);
    Ok(Record {
        framework: "nash".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        workload: workload.into(),
        threads: m.threads,
        batch,
        width,
        warmup: m.warmup,
        steps: n,
        min: rates.iter().copied().fold(f64::INFINITY, f64::min),
        median,
        steps_per_s: rates,
        peak_rss_mb: peak_rss_mb(),
        notes,
        gflop_per_step: flop.map(|f| f / 1e9),
        gflops: flop.map(|f| f * median / 1e9),
        percent_of_matmul_peak: None,
        split_share: timed.split_share(),
    })
}

/// The records as an aligned markdown table: per record its workload, threads, batch, width,
/// steps/s (min, median), samples/s (median x batch; with `curve`), peak MiB, GFLOP/s and share of
/// the matrix-product peak.
pub fn table(records: &[Record], curve: bool) -> String {
    let mut head = vec!["workload", "threads", "batch", "width", "steps/s min", "steps/s median"];
    if curve {
        head.push("samples/s median");
    }
    head.extend(["peak MiB", "GFLOP/s", "% matmul peak"]);
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            let matmul = r.workload == MATMUL_WORKLOAD;
            let mut row = vec![
                if matmul {
                    "matmul peak".into()
                } else {
                    r.workload.clone()
                },
                r.threads.to_string(),
                if matmul {
                    format!("{0}x{0}x{0}", r.batch)
                } else {
                    r.batch.to_string()
                },
                if matmul { String::new() } else { r.width.to_string() },
                format!("{:.1}", r.min),
                format!("{:.1}", r.median),
            ];
            if curve {
                row.push(if matmul {
                    String::new()
                } else {
                    format!("{:.0}", r.median * r.batch as f64)
                });
            }
            row.push(r.peak_rss_mb.map_or("?".into(), |m| format!("{m:.0}")));
            row.push(r.gflops.map_or(String::new(), |g| format!("{g:.1}")));
            row.push(r.percent_of_matmul_peak.map_or(String::new(), |p| format!("{p:.0}%")));
            row
        })
        .collect();
    let widths: Vec<usize> = (0..head.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([head[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:w$}")).collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut s = line(head.iter().map(|h| h.to_string()).collect());
    s += &line(widths.iter().map(|w| "-".repeat(*w)).collect());
    for row in rows {
        s += &line(row);
    }
    let _ = writeln!(
        s,
        "\nsteps/s over timed runs of `steps` steps after `warmup` untimed ones; peak MiB: each measurement's own \
         process; GFLOP/s of the autoencoder: 6 x batch x Σ in·out of its linear layers per step."
    );
    s
}

/// Writes `records` as a JSON array to `path`, atomically (a file beside it, then renamed).
pub fn write_records(path: &Path, records: &[Record]) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(records)? + "\n";
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(curve: bool) -> SpeedOptions {
        SpeedOptions {
            workloads: vec![Workload::Autoencoder, Workload::Dcgan],
            threads: vec![1, 2],
            batches: vec![DEFAULT_BATCH],
            widths: vec![1.0],
            warmup: 10,
            steps: None,
            repeats: 5,
            curve,
            extra_plugins: Vec::new(),
        }
    }

    #[test]
    fn autoencoder_flops_by_hand() {
        // 784·128 + 128·64 + 64·16 + 16·64 + 64·784 = 100352 + 8192 + 1024 + 1024 + 50176 = 160768
        // weights; 6 x 64 x 160768 = 61_734_912 FLOP per step at batch 64.
        assert_eq!(Workload::Autoencoder.flops_per_step(64, 1.0), Some(61_734_912.0));
        // Width 0.5: 784·64 + 64·32 + 32·8 + 8·32 + 32·784 = 50176 + 2048 + 256 + 256 + 25088 = 77824.
        assert_eq!(Workload::Autoencoder.flops_per_step(1, 0.5), Some(6.0 * 77824.0));
        assert_eq!(Workload::MlpGan.flops_per_step(64, 1.0), None);
    }

    #[test]
    fn overrides_scale_every_hidden_width() {
        assert_eq!(
            Workload::Dcgan.overrides(32, 0.5),
            vec!["training.batch_size=32".to_string(), "model.base_width=32".to_string()]
        );
        let set = Workload::MlpGan.overrides(64, 2.0);
        assert!(
            set.contains(&"model.generator.layers[4].out_features=1024".to_string()),
            "{set:?}"
        );
        assert!(
            set.contains(&"model.discriminator.layers[0].out_features=512".to_string()),
            "{set:?}"
        );
        // Every override parses as `nash train --set` reads it.
        for w in Workload::ALL {
            for s in w.overrides(16, 4.0) {
                s.parse::<Override>().unwrap();
            }
        }
        assert_eq!(scaled(16, 0.01), 1);
    }

    #[test]
    fn plans_the_matmul_first_and_the_curve_without_repeats() {
        let plan = options(false).plan();
        assert_eq!(plan.len(), 2 * 3);
        assert_eq!(plan[0].target, Target::Matmul { size: MATMUL_SIZE });
        assert_eq!(plan[3].threads, 2);
        // 7 batch sizes at width 1, then widths 0.5, 2, 4 at batch 64 (width 1 at batch 64 once).
        let curve = options(true).points();
        assert_eq!(curve.len(), 10);
        assert_eq!(curve[0], (16, 1.0));
        assert_eq!(curve[7..], [(64, 0.5), (64, 2.0), (64, 4.0)]);
        assert_eq!(options(true).plan().len(), 2 * (1 + 2 * 10));
    }

    #[test]
    fn bad_options_are_refused_with_what_is_valid() {
        let err = |f: fn(&mut SpeedOptions)| {
            let mut o = options(false);
            f(&mut o);
            o.check().unwrap_err().to_string()
        };
        assert!(err(|o| o.threads = vec![0]).contains("at least 1"));
        assert!(err(|o| o.batches = vec![2048]).contains("1..=1024"));
        assert!(err(|o| o.widths = vec![-1.0]).contains("positive"));
        assert!(err(|o| o.repeats = 0).contains("--repeats"));
        assert!(err(|o| o.steps = Some(0)).contains("calibrate"));
        options(true).check().unwrap();
    }

    #[test]
    fn child_arguments_name_the_measurement() {
        let m = Measurement {
            target: Target::Workload {
                workload: Workload::MlpGan,
                batch: 128,
                width: 0.5,
            },
            threads: 2,
            warmup: 3,
            steps: Some(7),
            repeats: 4,
        };
        assert_eq!(
            child_args(&m).join(" "),
            "bench speed-child --workload mlp_gan --batch 128 --width 0.5 --threads 2 --warmup 3 --repeats 4 --steps 7"
        );
    }

    #[test]
    fn median_and_table() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        let record = |workload: &str, gflops: Option<f64>, percent: Option<f64>| Record {
            framework: "nash".into(),
            version: "0".into(),
            workload: workload.into(),
            threads: 1,
            batch: 64,
            width: 1.0,
            warmup: 1,
            steps: 2,
            steps_per_s: vec![100.0, 200.0],
            min: 100.0,
            median: 150.0,
            peak_rss_mb: Some(20.4),
            notes: String::new(),
            gflop_per_step: None,
            gflops,
            percent_of_matmul_peak: percent,
            split_share: None,
        };
        let t = table(
            &[
                record(MATMUL_WORKLOAD, Some(80.0), None),
                record("autoencoder", Some(40.0), Some(50.0)),
            ],
            true,
        );
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("| workload    | threads |"), "{t}");
        assert!(lines[2].starts_with("| matmul peak | 1       | 64x64x64 |"), "{t}");
        assert!(
            lines[3].contains("| 100.0       | 150.0          | 9600             | 20       | 40.0    | 50%"),
            "{t}"
        );
        let json = serde_json::to_value(record("dcgan", None, None)).unwrap();
        assert!(json.get("gflops").is_none() && json["peak_rss_mb"] == 20.4);
        assert!(peak_rss_mb().is_some_and(|m| m > 0.0));
    }
}
