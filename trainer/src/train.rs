//! The training driver: builds everything a pipeline describes, runs the steps, evaluates, and
//! writes the run folder (`metrics.jsonl`, `samples/`, `summary.json`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use nash_core::data::{DataLoader, DataSource, Split};
use nash_core::layers::BuildContext;
use nash_core::metric::Metric;
use nash_core::model::{EvalContext, Model, StepReport, TrainContext};
use nash_core::optim::Optimizer;
use nash_core::rand::SeedableRng;
use nash_core::serde_json::{self, json, Value};
use nash_core::stabilizer::{HookContext, StabilizerStack};
use nash_core::tensor::{Device, Rng};
use serde::{Deserialize, Serialize};

use crate::loader::LoadedPlugin;
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
}

fn build(pipeline: &Pipeline, seed: u64, rng: &mut Rng) -> anyhow::Result<Run> {
    let device = Device::seed_from_u64(seed);
    let data = pipeline.data.build(seed).context("cannot build the data source (`data`)")?;
    tracing::info!("data: {}", data.describe());
    let info = data.info();
    let model = pipeline
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
    let stabilizers = StabilizerStack::new(stabilizers)?;
    stabilizers
        .validate(model.as_ref())
        .context("a stabilizer does not fit the model")?;
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
    Ok(Run {
        device,
        data,
        model,
        optimizers,
        stabilizers,
        metrics,
    })
}

/// Seed of the generator each evaluation starts from: the same latent codes every time, and
/// evaluations never disturb the training stream.
fn eval_seed(seed: u64) -> u64 {
    seed ^ 0x5EED_E7A1_0000_0001
}

impl Run {
    /// Held-out losses averaged (weighted by batch size) over the first `batches` test batches,
    /// then every metric.
    fn evaluate(
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

    /// Writes `count` generated samples to `<dir>/step-XXXXXXXX.json`, for generative models.
    fn write_samples(&mut self, dir: &Path, step: u64, count: usize, seed: u64) -> anyhow::Result<()> {
        let mut rng = Rng::seed_from_u64(eval_seed(seed) ^ 0x5A3B);
        let mut ctx = EvalContext {
            device: &self.device,
            rng: &mut rng,
        };
        let Some(samples) = self.model.sample(count, &mut ctx).context("sampling failed")? else {
            return Ok(());
        };
        let (rows, cols) = nash_core::dfdx::shapes::HasShape::shape(&samples).to_owned();
        let values = samples.as_vec();
        let rows: Vec<&[f32]> = (0..rows).map(|r| &values[r * cols..(r + 1) * cols]).collect();
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        write_json(
            &dir.join(format!("step-{step:08}.json")),
            &json!({"step": step, "shape": self.data.info().sample_shape, "samples": rows}),
        )
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

/// Trains `pipeline` in `dir` (created beforehand) and returns the summary, also written to
/// `<dir>/summary.json` (with `status = "failed"` if the run stopped on an error).
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
            if cfg.log_every > 0 && done % cfg.log_every == 0 {
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
            if !last && cfg.eval_every > 0 && done % cfg.eval_every == 0 {
                let t = Instant::now();
                let (eval, metrics) = run.evaluate(cfg.eval_batches, cfg.batch_size, seed)?;
                log.write(&json!({"step": done, "split": "test", "eval": eval, "metrics": metrics}))?;
                tracing::info!("step {done}: eval {eval:?} metrics {metrics:?}");
                eval_time += t.elapsed().as_secs_f64();
            }
            if !last && cfg.sample_every > 0 && done % cfg.sample_every == 0 {
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

/// Fails if `steps` is 0 and there is nothing to do at all (no evaluation either).
pub fn check_budget(steps: u64, eval_batches: usize, metrics: usize) -> anyhow::Result<()> {
    if steps == 0 && eval_batches == 0 && metrics == 0 {
        bail!("nothing to do: `training.steps` is 0, `training.eval_batches` is 0 and no metrics are configured");
    }
    Ok(())
}
