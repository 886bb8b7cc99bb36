//! The training driver: builds everything a pipeline describes, runs the steps, evaluates, and
//! writes the run folder (`metrics.jsonl`, `samples/` with JSON rows and pictures, `summary.json`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Context};
use nash_core::data::{DataLoader, DataSource, Split};
use nash_core::dfdx::shapes::HasShape;
use nash_core::layers::BuildContext;
use nash_core::metric::Metric;
use nash_core::model::{EvalContext, Model, StepReport, TrainContext};
use nash_core::optim::Optimizer;
use nash_core::rand::SeedableRng;
use nash_core::serde_json::{self, json, Value};
use nash_core::stabilizer::{HookContext, StabilizerStack};
use nash_core::tensor::{Device, Rng};
use nash_core::tracing;
use serde::{Deserialize, Serialize};

use crate::loader::LoadedPlugin;
use crate::outputs::Pictures;
use crate::pipeline::Pipeline;
use crate::progress::Progress;

/// Settings from the command line that take precedence over the pipeline.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// The run folder (else `training.out_dir`, else `runs/<name>-<timestamp>`).
    pub out_dir: Option<PathBuf>,
    /// Replaces the pipeline's `seed`.
    pub seed: Option<u64>,
    /// Replaces `training.steps`.
    pub steps: Option<u64>,
    /// Replaces `training.threads`.
    pub threads: Option<usize>,
    /// Show a progress bar (only drawn when stderr is a terminal).
    pub progress: bool,
}

/// A plugin as the summary records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PluginRecord {
    /// Package name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Library path.
    pub path: PathBuf,
}

/// What a run produced, also written to `<run>/summary.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The run's name.
    pub name: String,
    /// `completed`, or `failed` with [`Summary::error`] set.
    pub status: String,
    /// Why the run stopped early.
    pub error: Option<String>,
    /// The run folder.
    pub run_dir: PathBuf,
    /// The seed everything was drawn from.
    pub seed: u64,
    /// The model family.
    pub family: String,
    /// Training steps completed.
    pub steps: u64,
    /// Completed epochs of the training split.
    pub epochs: u64,
    /// Wall time of the training loop (evaluations included), in seconds.
    pub wall_time_s: f64,
    /// Training steps per second, evaluations excluded.
    pub steps_per_s: f64,
    /// The losses of the last training step.
    pub final_losses: BTreeMap<String, f64>,
    /// The diagnostics of the last training step.
    pub final_diagnostics: BTreeMap<String, f64>,
    /// Held-out losses before the first step (the baseline; empty when `eval_every` is 0).
    pub initial_eval: BTreeMap<String, f64>,
    /// Metric values before the first step.
    pub initial_metrics: BTreeMap<String, f64>,
    /// Held-out losses of the final evaluation.
    pub final_eval: BTreeMap<String, f64>,
    /// Metric values of the final evaluation.
    pub final_metrics: BTreeMap<String, f64>,
    /// The plugins that were loaded.
    pub plugins: Vec<PluginRecord>,
}

/// The run folder: `--out`, else `training.out_dir`, else `runs/<name>-<YYYYmmdd-HHMMSS>`.
pub fn run_dir(pipeline: &Pipeline, name: &str, opts: &RunOptions) -> PathBuf {
    if let Some(d) = opts.out_dir.clone().or_else(|| pipeline.training.out_dir.clone()) {
        return d;
    }
    let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S");
    PathBuf::from("runs").join(format!("{name}-{stamp}"))
}

/// Sizes the thread pool dfdx's matrix products run on (rayon's global pool; dfdx passes
/// `rayon::current_num_threads()` to gemm). Elementwise ops are single-threaded in dfdx 0.13.
/// The global pool can be sized once per process; later requests that differ are reported.
fn set_threads(threads: Option<usize>) {
    let Some(n) = threads else { return };
    if n == 0 {
        tracing::warn!("threads = 0 ignored: rayon picks one thread per core");
        return;
    }
    if rayon::ThreadPoolBuilder::new().num_threads(n).build_global().is_err() && rayon::current_num_threads() != n {
        tracing::warn!(
            "the matrix-product thread pool already runs {} threads in this process; {n} requested and ignored",
            rayon::current_num_threads()
        );
    }
}

/// Appends JSON lines to a file, flushing each.
struct JsonLines {
    path: PathBuf,
    out: BufWriter<File>,
}

impl JsonLines {
    fn create(path: PathBuf) -> anyhow::Result<Self> {
        let file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(JsonLines {
            path,
            out: BufWriter::new(file),
        })
    }
    fn write(&mut self, value: &Value) -> anyhow::Result<()> {
        serde_json::to_writer(&mut self.out, value)?;
        self.out.write_all(b"\n")?;
        self.out
            .flush()
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

/// Everything built from the pipeline.
struct Run {
    device: Device,
    data: Box<dyn DataSource>,
    model: Box<dyn Model>,
    optimizers: BTreeMap<String, Box<dyn Optimizer>>,
    stabilizers: StabilizerStack,
    metrics: Vec<Box<dyn Metric>>,
    pictures: Pictures,
}

fn build(pipeline: &Pipeline, seed: u64, rng: &mut Rng) -> anyhow::Result<Run> {
    let device = Device::seed_from_u64(seed);
    let data = pipeline
        .data
        .build(seed)
        .context("cannot build the data source (`data`)")?;
    tracing::info!("data: {}", data.describe());
    let info = data.info();
    let mut model = pipeline
        .model
        .build(&info, &mut BuildContext { device: &device, rng })
        .context("cannot build the model (`model`)")?;
    tracing::info!("model ({}):\n{}", model.family(), model.describe());

    let expected: BTreeSet<String> = model.param_groups().into_iter().collect();
    let given: BTreeSet<String> = pipeline.optimizers.keys().cloned().collect();
    if expected != given {
        let list = |s: &BTreeSet<String>| {
            if s.is_empty() {
                "none".to_string()
            } else {
                s.iter().map(|g| format!("`{g}`")).collect::<Vec<_>>().join(", ")
            }
        };
        let missing: BTreeSet<String> = expected.difference(&given).cloned().collect();
        let extra: BTreeSet<String> = given.difference(&expected).cloned().collect();
        let mut msg = format!(
            "the {} model has parameter groups {} but the pipeline configures optimizers for {}",
            model.family(),
            list(&expected),
            list(&given)
        );
        if !missing.is_empty() {
            msg += &format!("; add [optimizers.<group>] for {}", list(&missing));
        }
        if !extra.is_empty() {
            msg += &format!("; remove {}", list(&extra));
        }
        return Err(nash_core::Error::config("optimizers", msg).into());
    }
    let optimizers = pipeline
        .optimizers
        .iter()
        .map(|(group, cfg)| {
            let opt = cfg
                .build()
                .with_context(|| format!("cannot build the optimizer `optimizers.{group}`"))?;
            Ok((group.clone(), opt))
        })
        .collect::<anyhow::Result<BTreeMap<_, _>>>()?;

    let stabilizers = pipeline
        .stabilizers
        .iter()
        .enumerate()
        .map(|(i, cfg)| {
            cfg.build()
                .with_context(|| format!("cannot build the stabilizer `stabilizers[{i}]`"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut stabilizers = StabilizerStack::new(stabilizers)?;
    stabilizers
        .validate(model.as_ref())
        .context("a stabilizer does not fit the model")?;
    stabilizers
        .setup(
            model.as_mut(),
            &mut HookContext {
                step: 0,
                device: &device,
                rng,
            },
        )
        .context("a stabilizer could not be set up for the model")?;
    if !stabilizers.is_empty() {
        let names: Vec<&str> = stabilizers.iter().map(|s| s.name()).collect();
        tracing::info!("stabilizers: {}", names.join(", "));
    }
    let metrics = pipeline
        .metrics
        .iter()
        .enumerate()
        .map(|(i, cfg)| {
            cfg.build()
                .with_context(|| format!("cannot build the metric `metrics[{i}]`"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let pictures = Pictures::new(data.as_ref(), &device)?;
    Ok(Run {
        device,
        data,
        model,
        optimizers,
        stabilizers,
        metrics,
        pictures,
    })
}

/// Seed of the generator each evaluation starts from: the same latent codes every time, and
/// evaluations never disturb the training stream.
fn eval_seed(seed: u64) -> u64 {
    seed ^ 0x5EED_E7A1_0000_0001
}

/// Overwrites the parameters of `model` named in `values` and returns their previous values.
fn swap_params(model: &mut dyn Model, values: Vec<(String, Vec<f32>)>) -> anyhow::Result<Vec<(String, Vec<f32>)>> {
    let mut by_name: BTreeMap<String, &mut nash_core::tensor::Param> = model.named_params_mut().into_iter().collect();
    let mut previous = Vec::with_capacity(values.len());
    for (name, v) in values {
        let param = by_name.get_mut(&name).ok_or_else(|| {
            anyhow!("a stabilizer's evaluation parameters name `{name}`, which the model does not have")
        })?;
        previous.push((name.clone(), param.to_vec()));
        param
            .set(&v)
            .with_context(|| format!("cannot use a stabilizer's evaluation values for `{name}`"))?;
    }
    Ok(previous)
}

impl Run {
    /// Runs `f` with the stabilizers' evaluation parameters (an EMA of the generator's weights) in
    /// place of the trained ones, and puts the trained ones back afterwards, also when `f` fails.
    fn with_evaluation_params<T>(&mut self, f: impl FnOnce(&mut Self) -> anyhow::Result<T>) -> anyhow::Result<T> {
        let stand_ins = self.stabilizers.evaluation_params();
        if stand_ins.is_empty() {
            return f(self);
        }
        let trained = swap_params(self.model.as_mut(), stand_ins)?;
        let result = f(self);
        swap_params(self.model.as_mut(), trained)?;
        result
    }

    /// [`Run::evaluate_with_trained_params`] with the stabilizers' evaluation parameters.
    fn evaluate(
        &mut self,
        batches: usize,
        batch_size: usize,
        seed: u64,
    ) -> anyhow::Result<(BTreeMap<String, f64>, BTreeMap<String, f64>)> {
        self.with_evaluation_params(|run| run.evaluate_with_trained_params(batches, batch_size, seed))
    }

    /// [`Run::write_samples_with_trained_params`] with the stabilizers' evaluation parameters.
    fn write_samples(&mut self, dir: &Path, step: u64, count: usize, seed: u64) -> anyhow::Result<()> {
        self.with_evaluation_params(|run| run.write_samples_with_trained_params(dir, step, count, seed))
    }

    /// Held-out losses averaged (weighted by batch size) over the first `batches` test batches,
    /// then every metric.
    fn evaluate_with_trained_params(
        &mut self,
        batches: usize,
        batch_size: usize,
        seed: u64,
    ) -> anyhow::Result<(BTreeMap<String, f64>, BTreeMap<String, f64>)> {
        let mut rng = Rng::seed_from_u64(eval_seed(seed));
        let n = self.data.len(Split::Test);
        let mut sums: BTreeMap<String, f64> = BTreeMap::new();
        let mut seen = 0usize;
        for b in 0..batches {
            let start = b * batch_size;
            if start >= n {
                break;
            }
            let idx: Vec<usize> = (start..(start + batch_size).min(n)).collect();
            let batch = self.data.batch(Split::Test, &idx, &self.device)?;
            let mut ctx = EvalContext {
                device: &self.device,
                rng: &mut rng,
            };
            let losses = self.model.evaluate(&batch, &mut ctx).context("evaluation failed")?;
            for (k, v) in losses {
                *sums.entry(k).or_default() += v * idx.len() as f64;
            }
            seen += idx.len();
        }
        let eval = sums.into_iter().map(|(k, v)| (k, v / seen.max(1) as f64)).collect();
        let mut metrics = BTreeMap::new();
        for metric in &mut self.metrics {
            let mut ctx = EvalContext {
                device: &self.device,
                rng: &mut rng,
            };
            let values = metric
                .evaluate(self.model.as_mut(), self.data.as_ref(), &mut ctx)
                .with_context(|| format!("metric `{}` failed", metric.name()))?;
            for (k, v) in values {
                let key = if metrics.contains_key(&k) {
                    format!("{}/{k}", metric.name())
                } else {
                    k
                };
                metrics.insert(key, v);
            }
        }
        Ok((eval, metrics))
    }

    /// Writes the outputs of `step` into `dir` (see [`crate::outputs`]): for generative models
    /// `count` samples as JSON rows (`step-XXXXXXXX.json`) and as a picture (a grid or a scatter
    /// plot); for models that reconstruct, the first `count` test samples beside their
    /// reconstructions. Sampling and reconstruction draw from their own seeded generators: the same
    /// latent codes every time, and the training stream is never disturbed.
    fn write_samples_with_trained_params(&mut self, dir: &Path, step: u64, count: usize, seed: u64) -> anyhow::Result<()> {
        if count == 0 {
            return Ok(());
        }
        let mut rng = Rng::seed_from_u64(eval_seed(seed) ^ 0x5A3B);
        let mut ctx = EvalContext {
            device: &self.device,
            rng: &mut rng,
        };
        if let Some(samples) = self.model.sample(count, &mut ctx).context("sampling failed")? {
            let (rows, cols) = *samples.shape();
            let values = samples.as_vec();
            let rows: Vec<&[f32]> = (0..rows).map(|r| &values[r * cols..(r + 1) * cols]).collect();
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            write_json(
                &dir.join(format!("step-{step:08}.json")),
                &json!({"step": step, "shape": self.data.info().sample_shape, "samples": rows}),
            )?;
            self.pictures
                .write_samples(dir, step, &values, cols)
                .context("cannot draw the samples")?;
        }
        let n = count.min(self.data.len(Split::Test));
        if n == 0 || !matches!(self.pictures.view(), crate::outputs::SampleView::Images(_)) {
            return Ok(());
        }
        let idx: Vec<usize> = (0..n).collect();
        let batch = self.data.batch(Split::Test, &idx, &self.device)?;
        let mut rng = Rng::seed_from_u64(eval_seed(seed) ^ 0x4EC0);
        let mut ctx = EvalContext {
            device: &self.device,
            rng: &mut rng,
        };
        if let Some(recon) = self
            .model
            .reconstruct(&batch, &mut ctx)
            .context("reconstruction failed")?
        {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            self.pictures
                .write_reconstructions(dir, step, &batch.inputs.as_vec(), &recon.as_vec())
                .context("cannot draw the reconstructions")?;
        }
        Ok(())
    }
}

fn short_losses(report: &StepReport) -> String {
    report
        .losses
        .iter()
        .map(|(k, v)| format!("{k} {v:.4}"))
        .collect::<Vec<_>>()
        .join("  ")
}

/// Builds `pipeline`, creates `dir` with `pipeline.resolved.json`, trains, and returns the summary,
/// also written to `<dir>/summary.json` (with `status = "failed"` if the run stopped on an error
/// after it started).
pub fn train(
    pipeline: &Pipeline,
    name: &str,
    dir: &Path,
    plugins: &[LoadedPlugin],
    opts: &RunOptions,
) -> anyhow::Result<Summary> {
    let seed = opts.seed.unwrap_or(pipeline.seed);
    let steps = opts.steps.unwrap_or(pipeline.training.steps);
    let cfg = &pipeline.training;
    set_threads(opts.threads.or(cfg.threads));

    let mut rng = Rng::seed_from_u64(seed);
    let mut run = build(pipeline, seed, &mut rng)?;
    let mut loader = DataLoader::new(Split::Train, run.data.len(Split::Train), cfg.batch_size, seed)?;

    // The run folder is only created once everything is built, so a pipeline that does not fit
    // leaves nothing behind.
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the run folder {}", dir.display()))?;
    if dir.join("summary.json").exists() {
        tracing::warn!(
            "run folder {} holds an earlier run; its files are replaced",
            dir.display()
        );
    }
    write_json(&dir.join("pipeline.resolved.json"), pipeline).context("cannot write the resolved pipeline")?;
    let mut log = JsonLines::create(dir.join("metrics.jsonl"))?;

    let mut summary = Summary {
        name: name.to_string(),
        status: "completed".into(),
        error: None,
        run_dir: dir.to_path_buf(),
        seed,
        family: run.model.family().to_string(),
        steps: 0,
        epochs: 0,
        wall_time_s: 0.0,
        steps_per_s: 0.0,
        final_losses: BTreeMap::new(),
        final_diagnostics: BTreeMap::new(),
        final_eval: BTreeMap::new(),
        initial_eval: BTreeMap::new(),
        initial_metrics: BTreeMap::new(),
        final_metrics: BTreeMap::new(),
        plugins: plugins
            .iter()
            .map(|p| PluginRecord {
                name: p.name.clone(),
                version: p.version.clone(),
                path: p.path.clone(),
            })
            .collect(),
    };
    tracing::info!(
        "training {name}: {steps} steps, batch {}, seed {seed}, run folder {}",
        cfg.batch_size,
        dir.display()
    );

    let start = Instant::now();
    let mut eval_time = 0.0f64;
    let result = (|| -> anyhow::Result<()> {
        if cfg.eval_every > 0 {
            // The baseline every later evaluation is compared with. Evaluation draws from its own
            // seeded generator, so it never changes the training run.
            let t = Instant::now();
            let (eval, metrics) = run.evaluate(cfg.eval_batches, cfg.batch_size, seed)?;
            log.write(&json!({"step": 0, "split": "test", "eval": eval, "metrics": metrics}))?;
            tracing::info!("step 0: eval {eval:?} metrics {metrics:?}");
            summary.initial_eval = eval;
            summary.initial_metrics = metrics;
            eval_time += t.elapsed().as_secs_f64();
        }
        if cfg.sample_every > 0 {
            // The pictures of the untrained model, the first frame of the series.
            let t = Instant::now();
            run.write_samples(&dir.join("samples"), 0, cfg.sample_count, seed)?;
            eval_time += t.elapsed().as_secs_f64();
        }
        let progress = Progress::new(steps, opts.progress);
        for step in 0..steps {
            let batch = loader.next_batch(run.data.as_ref(), &run.device)?;
            let mut ctx = TrainContext {
                step,
                device: &run.device,
                rng: &mut rng,
                optimizers: &mut run.optimizers,
                stabilizers: &mut run.stabilizers,
            };
            let mut report = run
                .model
                .train_step(&batch, &mut ctx)
                .with_context(|| format!("training step {step} failed"))?;
            run.stabilizers
                .end_step(
                    &mut report,
                    &mut HookContext {
                        step,
                        device: &run.device,
                        rng: &mut rng,
                    },
                )
                .with_context(|| format!("a stabilizer failed at the end of step {step}"))?;
            if let Some((what, value)) = report.first_non_finite() {
                return Err(anyhow!(nash_core::Error::NonFinite {
                    what: format!("`{what}` (= {value}) at step {step}"),
                })
                .context(format!(
                    "training diverged at step {step}: `{what}` became {value}; lower the learning rate, \
                     or add a stabilizer (gradient clipping, a gradient penalty)"
                )));
            }
            let done = step + 1;
            summary.steps = done;
            summary.epochs = loader.epoch();
            if cfg.log_every > 0 && done.is_multiple_of(cfg.log_every) {
                let lr: BTreeMap<&str, f64> = run
                    .optimizers
                    .iter()
                    .map(|(g, o)| (g.as_str(), o.learning_rate()))
                    .collect();
                log.write(&json!({
                    "step": done,
                    "epoch": loader.epoch(),
                    "losses": report.losses,
                    "diagnostics": report.diagnostics,
                    "lr": lr,
                    "elapsed_s": start.elapsed().as_secs_f64(),
                }))?;
                if !progress.is_visible() {
                    tracing::info!("step {done}/{steps}  {}", short_losses(&report));
                }
            }
            progress.set_position(done);
            progress.set_message(short_losses(&report));
            summary.final_losses = report.losses;
            summary.final_diagnostics = report.diagnostics;

            let last = done == steps;
            if !last && cfg.eval_every > 0 && done.is_multiple_of(cfg.eval_every) {
                let t = Instant::now();
                let (eval, metrics) = run.evaluate(cfg.eval_batches, cfg.batch_size, seed)?;
                log.write(&json!({"step": done, "split": "test", "eval": eval, "metrics": metrics}))?;
                tracing::info!("step {done}: eval {eval:?} metrics {metrics:?}");
                eval_time += t.elapsed().as_secs_f64();
            }
            if !last && cfg.sample_every > 0 && done.is_multiple_of(cfg.sample_every) {
                let t = Instant::now();
                run.write_samples(&dir.join("samples"), done, cfg.sample_count, seed)?;
                eval_time += t.elapsed().as_secs_f64();
            }
        }
        drop(progress);
        let train_time = start.elapsed().as_secs_f64() - eval_time;
        summary.steps_per_s = if train_time > 0.0 {
            summary.steps as f64 / train_time
        } else {
            0.0
        };
        let (eval, metrics) = run.evaluate(cfg.eval_batches, cfg.batch_size, seed)?;
        log.write(&json!({"step": summary.steps, "split": "test", "eval": eval, "metrics": metrics}))?;
        summary.final_eval = eval;
        summary.final_metrics = metrics;
        if cfg.sample_count > 0 {
            run.write_samples(&dir.join("samples"), summary.steps, cfg.sample_count, seed)?;
        }
        Ok(())
    })();
    summary.wall_time_s = start.elapsed().as_secs_f64();
    summary.epochs = loader.epoch();
    if let Err(e) = &result {
        summary.status = "failed".into();
        summary.error = Some(format!("{e:#}"));
    }
    write_json(&dir.join("summary.json"), &summary)?;
    result?;
    tracing::info!(
        "done: {} steps in {:.1}s ({:.1} steps/s); eval {:?}; metrics {:?}; run folder {}",
        summary.steps,
        summary.wall_time_s,
        summary.steps_per_s,
        summary.final_eval,
        summary.final_metrics,
        dir.display()
    );
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{Format, PipelineDoc, PipelineSource};
    use nash_core::data::{Batch, DataInfo, DataSourceConfig};
    use nash_core::model::ModelConfig;
    use nash_core::registry::Registry;
    use nash_core::tensor::{matrix_from_vec, FeatureShape, Grads, Param, ParamRole, Parameterized};
    use nash_core::{Error, Result};

    /// Two clusters of 2-D points around (3, -1), 64 train and 32 test.
    #[derive(Debug, Default, Serialize, Deserialize)]
    struct TwoPoints {}
    struct TwoPointsData;
    fn point(i: usize) -> [f32; 2] {
        let s = if i.is_multiple_of(2) { 0.5 } else { -0.5 };
        [3.0 + s, -1.0 - s]
    }
    impl DataSource for TwoPointsData {
        fn describe(&self) -> String {
            "two points".into()
        }
        fn info(&self) -> DataInfo {
            DataInfo {
                sample_shape: FeatureShape::Flat(2),
                num_classes: None,
                value_range: (-5.0, 5.0),
            }
        }
        fn len(&self, split: Split) -> usize {
            match split {
                Split::Train => 64,
                Split::Test => 32,
            }
        }
        fn batch(&self, _split: Split, indices: &[usize], device: &Device) -> Result<Batch> {
            let values = indices.iter().flat_map(|&i| point(i)).collect();
            Ok(Batch {
                inputs: matrix_from_vec(device, values, indices.len(), 2)?,
                shape: FeatureShape::Flat(2),
                labels: None,
            })
        }
    }
    #[typetag::serde(name = "test_two_points")]
    impl DataSourceConfig for TwoPoints {
        fn build(&self, _seed: u64) -> Result<Box<dyn DataSource>> {
            Ok(Box::new(TwoPointsData))
        }
    }

    /// 4x4 pictures stored flat (16 values in [0, 1]): a bright square at one of two places, 64
    /// train and 32 test.
    #[derive(Debug, Default, Serialize, Deserialize)]
    struct Squares {}
    struct SquaresData;
    impl DataSource for SquaresData {
        fn describe(&self) -> String {
            "squares".into()
        }
        fn info(&self) -> DataInfo {
            DataInfo {
                sample_shape: FeatureShape::Flat(16),
                num_classes: None,
                value_range: (0.0, 1.0),
            }
        }
        fn len(&self, split: Split) -> usize {
            match split {
                Split::Train => 64,
                Split::Test => 32,
            }
        }
        fn batch(&self, _split: Split, indices: &[usize], device: &Device) -> Result<Batch> {
            let values = indices
                .iter()
                .flat_map(|&i| (0..16).map(move |p| if (p % 4 < 2) == i.is_multiple_of(2) { 1.0 } else { 0.0 }))
                .collect();
            Ok(Batch {
                inputs: matrix_from_vec(device, values, indices.len(), 16)?,
                shape: FeatureShape::Flat(16),
                labels: None,
            })
        }
    }
    #[typetag::serde(name = "test_squares")]
    impl DataSourceConfig for Squares {
        fn build(&self, _seed: u64) -> Result<Box<dyn DataSource>> {
            Ok(Box::new(SquaresData))
        }
    }

    /// Fits a mean `mu` by least squares: loss = mean((x - mu)²), gradient 2·(mu - x̄)/d per coordinate.
    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(default)]
    struct MeanModelConfig {
        /// Report a NaN loss from this step on.
        nan_at: Option<u64>,
    }
    struct MeanModel {
        mu: Param,
        nan_at: Option<u64>,
        dim: usize,
    }
    impl MeanModel {
        fn loss_and_grad(&self, batch: &Batch) -> (f64, Vec<f32>) {
            let x = batch.inputs.as_vec();
            let mu = self.mu.to_vec();
            let (n, d) = (batch.len(), self.dim);
            let mut loss = 0.0f64;
            let mut grad = vec![0.0f32; d];
            for r in 0..n {
                for c in 0..d {
                    let diff = mu[c] - x[r * d + c];
                    loss += (diff * diff) as f64;
                    grad[c] += 2.0 * diff / (n * d) as f32;
                }
            }
            (loss / (n * d) as f64, grad)
        }
    }
    impl Parameterized for MeanModel {
        fn named_params(&self) -> Vec<(String, &Param)> {
            vec![("model.mu".into(), &self.mu)]
        }
        fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
            vec![("model.mu".into(), &mut self.mu)]
        }
    }
    impl Model for MeanModel {
        fn family(&self) -> &str {
            "test"
        }
        fn describe(&self) -> String {
            "mean".into()
        }
        fn param_groups(&self) -> Vec<String> {
            vec!["model".into()]
        }
        fn train_step(&mut self, batch: &Batch, ctx: &mut TrainContext<'_>) -> Result<StepReport> {
            let (loss, grad) = self.loss_and_grad(batch);
            let mut grads = Grads::leaky();
            grads.get_or_alloc_mut(&self.mu.value)?.copy_from_slice(&grad);
            let mut params = self.named_params_mut();
            ctx.apply_gradients("model", &mut params, grads)?;
            let mut report = StepReport::default();
            let nan = self.nan_at.is_some_and(|s| ctx.step >= s);
            report.loss("loss/mse", if nan { f64::NAN } else { loss });
            Ok(report)
        }
        fn evaluate(&mut self, batch: &Batch, _ctx: &mut EvalContext<'_>) -> Result<BTreeMap<String, f64>> {
            Ok(BTreeMap::from([("loss/mse".to_string(), self.loss_and_grad(batch).0)]))
        }
        fn sample(&mut self, n: usize, ctx: &mut EvalContext<'_>) -> Result<Option<nash_core::tensor::Matrix>> {
            let mu = self.mu.to_vec();
            Ok(Some(matrix_from_vec(ctx.device, mu.repeat(n), n, self.dim)?))
        }
        /// Every input is "reconstructed" as the mean.
        fn reconstruct(
            &mut self,
            batch: &Batch,
            ctx: &mut EvalContext<'_>,
        ) -> Result<Option<nash_core::tensor::Matrix>> {
            let mu = self.mu.to_vec();
            Ok(Some(matrix_from_vec(
                ctx.device,
                mu.repeat(batch.len()),
                batch.len(),
                self.dim,
            )?))
        }
    }
    #[typetag::serde(name = "test_mean")]
    impl ModelConfig for MeanModelConfig {
        fn build(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<Box<dyn Model>> {
            if self.nan_at == Some(999_999) {
                return Err(Error::config("model.nan_at", "test error"));
            }
            let dim = data.sample_shape.numel();
            Ok(Box::new(MeanModel {
                mu: Param::from_vec(ctx.device, vec![0.0; dim], vec![dim], ParamRole::Bias)?,
                nan_at: self.nan_at,
                dim,
            }))
        }
    }

    fn pipeline(extra: &str) -> Pipeline {
        pipeline_on("test_two_points", extra, "")
    }

    /// A pipeline training the mean model on `data`, with `training` lines appended.
    fn pipeline_on(data: &str, extra: &str, training: &str) -> Pipeline {
        let text = format!(
            "seed = 3\ndata = {{ type = \"{data}\" }}\nmodel = {{ type = \"test_mean\" {extra} }}\n\
             [optimizers.model]\ntype = \"sgd\"\nlr = 0.5\n\
             [training]\nsteps = 40\nbatch_size = 16\nlog_every = 10\neval_every = 20\neval_batches = 2\nsample_count = 3\n\
             {training}"
        );
        let mut registry = Registry::new();
        nash_core::registry::register_core(&mut registry).unwrap();
        let src = PipelineSource::from_text("t.toml", "t", &text, Format::Toml, Path::new("."));
        PipelineDoc::parse(src, &[]).unwrap().deserialize(&registry).unwrap()
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nash-trainer-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn lines(dir: &Path) -> Vec<Value> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn trains_and_writes_the_run_folder() {
        let dir = temp_dir("ok");
        let p = pipeline("");
        let summary = train(&p, "t", &dir, &[], &RunOptions::default()).unwrap();
        assert_eq!(summary.status, "completed");
        assert_eq!((summary.steps, summary.seed), (40, 3));
        // The mean of the data is (3, -1) and the spread is 0.5 per coordinate: the minimal MSE is 0.25.
        let eval = summary.final_eval["loss/mse"];
        assert!((eval - 0.25).abs() < 1e-3, "{eval}");
        let lines = lines(&dir);
        // The baseline evaluation at step 0, 4 training lines (steps 10..40), evaluations at step 20
        // and at the end.
        let steps: Vec<(u64, bool)> = lines
            .iter()
            .map(|l| (l["step"].as_u64().unwrap(), l.get("split").is_some()))
            .collect();
        assert_eq!(
            steps,
            [
                (0, true),
                (10, false),
                (20, false),
                (20, true),
                (30, false),
                (40, false),
                (40, true)
            ]
        );
        assert_eq!(lines[1]["lr"]["model"], 0.5);
        assert!(lines[1]["losses"]["loss/mse"].as_f64().unwrap() > eval);
        assert!(
            summary.initial_eval["loss/mse"] > eval,
            "training lowers the held-out loss"
        );
        // The file is exactly the summary returned (compared as text: serde_json's default float
        // parsing may differ from the written value in the last bit).
        let on_disk = std::fs::read_to_string(dir.join("summary.json")).unwrap();
        assert_eq!(on_disk, serde_json::to_string_pretty(&summary).unwrap() + "\n");
        let parsed: Summary = serde_json::from_str(&on_disk).unwrap();
        assert_eq!((parsed.status, parsed.steps), (summary.status.clone(), summary.steps));
        let resolved: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("pipeline.resolved.json")).unwrap()).unwrap();
        assert_eq!(resolved["optimizers"]["model"]["type"], "sgd");
        assert_eq!(resolved["optimizers"]["model"]["momentum"], 0.0);
        let samples: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("samples/step-00000040.json")).unwrap()).unwrap();
        assert_eq!(samples["samples"].as_array().unwrap().len(), 3);
        // Same seed, same numbers.
        let again = train(&p, "t", &temp_dir("ok2"), &[], &RunOptions::default()).unwrap();
        assert_eq!(again.final_losses, summary.final_losses);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(temp_dir("ok2"));
    }

    fn file_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn pictures_at_step_zero_every_sample_every_and_the_end() {
        // 2-D data: JSON rows and a scatter plot over real points at steps 0, 20 and 40.
        let dir = temp_dir("scatter");
        let p = pipeline_on("test_two_points", "", "sample_every = 20\n");
        train(&p, "t", &dir, &[], &RunOptions::default()).unwrap();
        let mut expected = Vec::new();
        for step in [0, 20, 40] {
            expected.push(format!("scatter-step-{step:08}.png"));
            expected.push(format!("step-{step:08}.json"));
        }
        expected.sort();
        assert_eq!(file_names(&dir.join("samples")), expected);
        let img = image::open(dir.join("samples/scatter-step-00000040.png")).unwrap();
        let side = crate::outputs::SCATTER_SIZE;
        assert_eq!((img.width(), img.height()), (side, side));
        let _ = std::fs::remove_dir_all(&dir);

        // Flat 16-value data: 4x4 grayscale grids of 3 samples (2x2 cells) and 3 test inputs
        // beside their reconstructions (one pair of rows of 3: 6 tiles, near-square).
        let dir = temp_dir("grid");
        let p = pipeline_on("test_squares", "", "sample_every = 25\n");
        train(&p, "t", &dir, &[], &RunOptions::default()).unwrap();
        let mut expected = Vec::new();
        for step in [0, 25, 40] {
            expected.push(format!("reconstructions-step-{step:08}.png"));
            expected.push(format!("step-{step:08}.json"));
            expected.push(format!("step-{step:08}.png"));
        }
        expected.sort();
        assert_eq!(file_names(&dir.join("samples")), expected);
        let grid = image::open(dir.join("samples/step-00000040.png")).unwrap().into_luma8();
        assert_eq!(grid.dimensions(), (2 * 4 + 3 * 2, 2 * 4 + 3 * 2));
        let pairs = image::open(dir.join("samples/reconstructions-step-00000040.png"))
            .unwrap()
            .into_luma8();
        assert_eq!(pairs.dimensions(), (3 * 4 + 4 * 2, 2 * 4 + 3 * 2));
        // Input 0 has its bright square on the left; its reconstruction (the mean, about 0.5) is gray.
        assert_eq!(pairs.get_pixel(2, 2).0[0], 255);
        assert_eq!(pairs.get_pixel(2 + 3, 2).0[0], 0);
        let recon = pairs.get_pixel(2, 2 + 6).0[0];
        assert!((100..156).contains(&recon), "{recon}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn non_finite_loss_stops_with_its_name() {
        let dir = temp_dir("nan");
        let e = train(&pipeline(", nan_at = 5"), "t", &dir, &[], &RunOptions::default()).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("diverged at step 5") && msg.contains("`loss/mse`"),
            "{msg}"
        );
        let summary: Summary =
            serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
        assert_eq!((summary.status.as_str(), summary.steps), ("failed", 5));
        assert!(summary.error.unwrap().contains("loss/mse"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn optimizer_groups_must_match_and_build_errors_leave_no_folder() {
        let mut p = pipeline("");
        let sgd = p.optimizers.remove("model").unwrap();
        p.optimizers.insert("generator".into(), sgd);
        let dir = temp_dir("groups");
        let msg = format!("{:#}", train(&p, "t", &dir, &[], &RunOptions::default()).unwrap_err());
        assert!(msg.contains("parameter groups `model`"), "{msg}");
        assert!(msg.contains("optimizers for `generator`"), "{msg}");
        assert!(
            msg.contains("add [optimizers.<group>] for `model`; remove `generator`"),
            "{msg}"
        );
        assert!(!dir.exists());
        let msg = format!(
            "{:#}",
            train(&pipeline(", nan_at = 999999"), "t", &dir, &[], &RunOptions::default()).unwrap_err()
        );
        assert!(
            msg.contains("cannot build the model") && msg.contains("model.nan_at"),
            "{msg}"
        );
    }
}
