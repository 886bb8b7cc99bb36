//! # nash-trainer: the `nash` binary as a library
//!
//! Reads a pipeline file, loads the plugins it lists (and those beside the executable or on
//! `NASH_PLUGIN_PATH`), deserializes the pipeline, and trains it, writing a run folder:
//! `pipeline.resolved.json` (every default filled in), `metrics.jsonl`, `samples/` (JSON rows and
//! PNG pictures, see [`outputs`]) and `summary.json`. [`run_training`] does all of it in-process;
//! `main.rs` is a thin CLI over it.

use std::path::PathBuf;

use anyhow::Context;
use nash_core::tracing;

pub mod bench;
pub mod bench_conv;
pub mod bench_cores;
pub mod bench_speed;
pub mod checkpoint;
pub mod features;
pub mod health;
pub mod loader;
pub mod outputs;
pub mod pipeline;
pub mod progress;
pub mod report;
mod run;
pub mod scaffold;
pub mod threads;
pub mod train;
pub mod validate;

pub use loader::{LoadedPlugin, PluginSet};
pub use pipeline::{Format, Override, Pipeline, PipelineDoc, PipelineSource, TrainingConfig};
pub use train::{RunOptions, Summary};

/// The pipeline `nash train` runs when given none: 8 Gaussian modes on a ring, learned by a GAN.
pub const DEFAULT_PIPELINE: &str = include_str!("../../examples/ring_gan.toml");

/// The median of `values` (the mean of the middle two for an even count), `None` when there are
/// none: the health monitor's baselines, the benchmark's runs, the split governor's step times.
pub(crate) fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// The embedded default pipeline as a source (plugin paths relative to the current folder).
pub fn default_pipeline_source() -> PipelineSource {
    PipelineSource::from_text(
        "<embedded examples/ring_gan.toml>",
        "ring_gan",
        DEFAULT_PIPELINE,
        Format::Toml,
        std::path::Path::new("."),
    )
}

/// A pipeline ready to train: deserialized with its plugins loaded.
pub struct Prepared {
    /// The plugins and the registry of every type (kept alive for as long as the pipeline is).
    pub plugins: PluginSet,
    /// The pipeline, with command-line seed and steps applied.
    pub pipeline: Pipeline,
    /// The run's name: the pipeline's `name`, else the file's stem.
    pub name: String,
}

/// Parses `source`, applies `overrides`, loads the plugins it lists plus `extra_plugins`, and
/// deserializes it. Command-line `seed`, `steps` and `threads` in `opts` replace the pipeline's.
pub fn prepare(
    source: PipelineSource,
    overrides: &[Override],
    extra_plugins: &[PathBuf],
    opts: &RunOptions,
) -> anyhow::Result<Prepared> {
    let origin = source.origin.clone();
    let stem = source.stem.clone();
    let doc = PipelineDoc::parse(source, overrides).with_context(|| format!("cannot read pipeline {origin}"))?;
    let mut paths = doc
        .plugin_paths()
        .with_context(|| format!("pipeline {origin} is invalid"))?;
    paths.extend(extra_plugins.iter().cloned());
    let plugins = PluginSet::load_all(&paths).context("cannot load plugins")?;
    for p in &plugins.plugins {
        tracing::debug!("plugin {} {} from {}", p.name, p.version, p.path.display());
    }
    let mut pipeline = doc
        .deserialize(&plugins.registry)
        .with_context(|| format!("pipeline {origin} is invalid"))?;
    if let Some(seed) = opts.seed {
        pipeline.seed = seed;
    }
    if let Some(steps) = opts.steps {
        pipeline.training.steps = steps;
    }
    if opts.threads.is_some() {
        pipeline.training.threads = opts.threads;
    }
    let name = pipeline.name.clone().unwrap_or(stem);
    Ok(Prepared {
        plugins,
        pipeline,
        name,
    })
}

/// Trains a pipeline end to end: [`prepare`], build, create the run folder with
/// `pipeline.resolved.json`, train, and return the summary (also in `summary.json`).
pub fn run_training(
    source: PipelineSource,
    overrides: &[Override],
    extra_plugins: &[PathBuf],
    opts: &RunOptions,
) -> anyhow::Result<Summary> {
    let prepared = prepare(source, overrides, extra_plugins, opts)?;
    train_prepared(&prepared, opts)
}

/// Trains a [`Prepared`] pipeline in its run folder ([`train::run_dir`]).
pub fn train_prepared(prepared: &Prepared, opts: &RunOptions) -> anyhow::Result<Summary> {
    let Prepared {
        plugins,
        pipeline,
        name,
    } = prepared;
    let dir = train::run_dir(pipeline, name, opts);
    train::train(pipeline, name, &dir, &plugins.plugins, opts)
}
