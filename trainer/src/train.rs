//! The training driver: builds everything a pipeline describes ([`crate::run`]), runs the steps,
//! evaluates, and writes the run folder (`metrics.jsonl`, `samples/` with JSON rows and pictures, `summary.json`,
//! `health.jsonl`, and at the end of every run `metrics.csv`, `curves/` and `index.html`). Every step
//! and evaluation goes through the training-health monitor ([`crate::health`]), whose policy may
//! roll the run back to an in-memory snapshot or stop it ([`TrainingFailed`], exit code 6).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Context};
use nash_core::data::{DataLoader, Split};
use nash_core::dfdx::shapes::HasShape;
use nash_core::model::{EvalContext, StepReport, TrainContext};
use nash_core::rand::SeedableRng;
use nash_core::serde_json::{self, json, Value};
use nash_core::stabilizer::HookContext;
use nash_core::tensor::Rng;
use nash_core::tracing;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, Evaluation, RunRecord, TrainingState};
use crate::health::{self, Action, Detector, Monitor};
use crate::loader::LoadedPlugin;
use crate::pipeline::Pipeline;
use crate::progress::Progress;
use crate::run::{build, Run};

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
    /// `completed`, `interrupted` (Ctrl-C or SIGTERM; a checkpoint was written), or `failed` with
    /// [`Summary::error`] set.
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
    /// The share of this session's training steps whose kernels split their work across the
    /// compute pool (1 with one thread; `training.adaptive_splitting` keeps steps on one thread
    /// while splitting does not pay).
    #[serde(default = "every_step")]
    pub split_share: f64,
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
    /// What the training-health monitor found and did.
    #[serde(default)]
    pub health: HealthSummary,
    /// What each metric of the final evaluation reported beside its values (feature network,
    /// reference split, sample count), by metric name.
    #[serde(default)]
    pub metric_provenance: MetricProvenance,
}

/// The default [`Summary::split_share`] of summaries written before it existed.
fn every_step() -> f64 {
    1.0
}

/// Provenance of metric values: metric name → key → value ([`nash_core::metric::Metric::provenance`]).
pub type MetricProvenance = BTreeMap<String, BTreeMap<String, String>>;

/// `nash eval`'s result: the evaluation and the metrics' provenance.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CheckpointEvaluation {
    /// The held-out losses and metric values at the checkpoint's step.
    #[serde(flatten)]
    pub evaluation: Evaluation,
    /// What each metric reported beside its values, by metric name.
    pub metric_provenance: MetricProvenance,
}

/// The summary's `health` section.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthSummary {
    /// Events by detector (`non_finite`, `divergence`, `mode_collapse`, `oscillation`).
    pub events: BTreeMap<String, u64>,
    /// Rollbacks to an earlier snapshot.
    pub rollbacks: u32,
    /// The detector that stopped the run, if one did.
    pub stopped_by: Option<String>,
}

/// The error of a run that failed while training (a step or a stabilizer failed, or the health
/// monitor stopped it): exit code 6, whatever the message says.
#[derive(Debug)]
pub struct TrainingFailed {
    /// What happened.
    pub message: String,
}

impl TrainingFailed {
    /// A training failure described by `message`.
    pub fn new(message: impl Into<String>) -> Self {
        TrainingFailed {
            message: message.into(),
        }
    }
}

impl std::fmt::Display for TrainingFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TrainingFailed {}

/// The run folder: `--out`, else `training.out_dir`, else `runs/<name>-<YYYYmmdd-HHMMSS>`.
pub fn run_dir(pipeline: &Pipeline, name: &str, opts: &RunOptions) -> PathBuf {
    if let Some(d) = opts.out_dir.clone().or_else(|| pipeline.training.out_dir.clone()) {
        return d;
    }
    let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S");
    PathBuf::from("runs").join(format!("{name}-{stamp}"))
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Asks the training loop to stop after the current step, write a checkpoint and return a
/// summary with status `interrupted` (what Ctrl-C and SIGTERM do).
pub fn request_stop() {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Whether [`request_stop`] was called.
pub fn stop_requested() -> bool {
    STOP.load(std::sync::atomic::Ordering::SeqCst)
}

/// Makes Ctrl-C and SIGTERM call [`request_stop`]; a second one exits at once with code 130.
pub fn install_signal_handler() -> anyhow::Result<()> {
    ctrlc::set_handler(|| {
        if stop_requested() {
            eprintln!("interrupted again: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("interrupted: finishing this step and writing a checkpoint (again to exit at once)");
        request_stop();
    })
    .context("cannot install the Ctrl-C handler")
}

/// The error a command returns when training was interrupted (exit code 130).
#[derive(Debug)]
pub struct Interrupted {
    /// The run folder.
    pub run_dir: PathBuf,
    /// Steps completed.
    pub step: u64,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "interrupted after step {}; checkpoint written, continue with `nash resume {}`",
            self.step,
            self.run_dir.display()
        )
    }
}

impl std::error::Error for Interrupted {}

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
    /// Opens `path` to continue after `step`: lines of later steps (written after the checkpoint
    /// being resumed) are dropped.
    fn resume(path: PathBuf, step: u64) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&path, kept).with_context(|| format!("cannot write {}", path.display()))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
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

pub(crate) fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
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
/// after it started, `interrupted` if [`request_stop`] was called).
pub fn train(
    pipeline: &Pipeline,
    name: &str,
    dir: &Path,
    plugins: &[LoadedPlugin],
    opts: &RunOptions,
) -> anyhow::Result<Summary> {
    train_from(pipeline, name, dir, plugins, opts, None)
}

/// The summary's view of the run so far, for a checkpoint.
fn record(summary: &Summary, wall_time_s: f64, epochs: u64, last: &Option<Evaluation>) -> RunRecord {
    RunRecord {
        initial_eval: summary.initial_eval.clone(),
        initial_metrics: summary.initial_metrics.clone(),
        wall_time_s,
        epochs,
        last_evaluation: last.clone(),
    }
}

/// [`train`], continuing from `resume` (a checkpoint folder and its state) when given: the run
/// folder's `metrics.jsonl` is kept up to the checkpoint's step and appended to.
pub fn train_from(
    pipeline: &Pipeline,
    name: &str,
    dir: &Path,
    plugins: &[LoadedPlugin],
    opts: &RunOptions,
    resume: Option<(&Path, &TrainingState)>,
) -> anyhow::Result<Summary> {
    let threads = opts.threads.or(pipeline.training.threads);
    crate::threads::on_pool(threads, || train_on_pool(pipeline, name, dir, plugins, opts, resume))?
}

/// [`train_from`]'s work, on a worker of the run's thread pool.
fn train_on_pool(
    pipeline: &Pipeline,
    name: &str,
    dir: &Path,
    plugins: &[LoadedPlugin],
    opts: &RunOptions,
    resume: Option<(&Path, &TrainingState)>,
) -> anyhow::Result<Summary> {
    let seed = opts.seed.unwrap_or(pipeline.seed);
    let steps = opts.steps.unwrap_or(pipeline.training.steps);
    let cfg = &pipeline.training;
    cfg.checkpoint.validate()?;
    let mut monitor = Monitor::new(cfg.health.clone())?;
    let hash = checkpoint::pipeline_hash(pipeline)?;

    let mut rng = Rng::seed_from_u64(seed);
    let mut run = build(pipeline, seed, &mut rng)?;
    let mut loader = DataLoader::new(Split::Train, run.data.len(Split::Train), cfg.batch_size, seed)?;
    let mut saved_record = RunRecord::default();
    let start_step = match resume {
        None => 0,
        Some((origin, saved)) => {
            if saved.pipeline_hash != hash {
                return Err(anyhow!(
                    "the checkpoint {} was written by another pipeline (hash {}, this one {hash}); \
                     was pipeline.resolved.json edited?",
                    origin.display(),
                    saved.pipeline_hash
                ));
            }
            if saved.step >= steps {
                return Err(nash_core::Error::config(
                    "training.steps",
                    format!(
                        "the checkpoint {} is at step {}, and the run has {steps} steps; pass --steps with a larger total",
                        origin.display(),
                        saved.step
                    ),
                )
                .into());
            }
            run.restore(saved, &mut rng, Some(&mut loader), origin)?;
            saved_record = saved.record.clone();
            tracing::info!("resuming from {} (step {})", origin.display(), saved.step);
            saved.step
        }
    };

    // The run folder is only created once everything is built, so a pipeline that does not fit
    // leaves nothing behind.
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the run folder {}", dir.display()))?;
    if resume.is_none() && dir.join("summary.json").exists() {
        tracing::warn!(
            "run folder {} holds an earlier run; its files are replaced",
            dir.display()
        );
    }
    let old_checkpoints = dir.join(checkpoint::CHECKPOINTS_DIR);
    if resume.is_none() && old_checkpoints.exists() {
        // Checkpoints of another run would be mistaken for this one's by `resume`.
        tracing::warn!(
            "removing the earlier run's checkpoints in {}",
            old_checkpoints.display()
        );
        std::fs::remove_dir_all(&old_checkpoints)
            .with_context(|| format!("cannot remove {}", old_checkpoints.display()))?;
    }
    // Through text, so that f32 fields read as written (`0.1`, not their f64 widening).
    let mut resolved: Value = serde_json::from_str(&serde_json::to_string(pipeline)?)?;
    if let Some(t) = resolved.get_mut("training").and_then(Value::as_object_mut) {
        t.insert("steps".into(), json!(steps));
    }
    write_json(&dir.join("pipeline.resolved.json"), &resolved).context("cannot write the resolved pipeline")?;
    let mut log = match resume {
        None => JsonLines::create(dir.join("metrics.jsonl"))?,
        Some(_) => JsonLines::resume(dir.join("metrics.jsonl"), start_step)?,
    };
    let mut health_log = match resume {
        None => JsonLines::create(dir.join(HEALTH_FILE))?,
        Some(_) => JsonLines::resume(dir.join(HEALTH_FILE), start_step)?,
    };
    if let Some(e) = &saved_record.last_evaluation {
        // The best values the mode-collapse rule compares with (events of the past are logged).
        monitor.observe_eval(0, &saved_record.initial_metrics);
        monitor.observe_eval(e.step, &e.metrics);
    }

    let mut summary = Summary {
        name: name.to_string(),
        status: "completed".into(),
        error: None,
        run_dir: dir.to_path_buf(),
        seed,
        family: run.model.family().to_string(),
        steps: start_step,
        epochs: loader.epoch(),
        wall_time_s: 0.0,
        steps_per_s: 0.0,
        split_share: 1.0,
        final_losses: BTreeMap::new(),
        final_diagnostics: BTreeMap::new(),
        final_eval: BTreeMap::new(),
        initial_eval: saved_record.initial_eval.clone(),
        initial_metrics: saved_record.initial_metrics.clone(),
        final_metrics: BTreeMap::new(),
        plugins: plugins
            .iter()
            .map(|p| PluginRecord {
                name: p.name.clone(),
                version: p.version.clone(),
                path: p.path.clone(),
            })
            .collect(),
        health: match resume {
            Some(_) => earlier_health(&dir.join(HEALTH_FILE)),
            None => HealthSummary::default(),
        },
        metric_provenance: BTreeMap::new(),
    };
    let can_roll_back = Detector::ALL
        .iter()
        .any(|d| cfg.health.policy.action(*d) == Action::Rollback);
    tracing::info!(
        "training {name}: {steps} steps, batch {}, seed {seed}, run folder {}",
        cfg.batch_size,
        dir.display()
    );

    let start = Instant::now();
    let earlier_wall = saved_record.wall_time_s;
    let mut last_eval = saved_record.last_evaluation.clone();
    let mut eval_time = 0.0f64;
    let mut interrupted = false;
    let result = (|| -> anyhow::Result<()> {
        if cfg.eval_every > 0 && start_step == 0 {
            // The baseline every later evaluation is compared with. Evaluation draws from its own
            // seeded generator, so it never changes the training run.
            let t = Instant::now();
            let (eval, metrics) = run.evaluate(cfg.eval_batches, cfg.batch_size, seed, cfg.health.diversity_samples)?;
            log.write(&json!({"step": 0, "split": "test", "eval": eval, "metrics": metrics}))?;
            monitor.observe_eval(0, &metrics);
            tracing::info!("step 0: eval {eval:?} metrics {metrics:?}");
            summary.initial_eval = eval;
            summary.initial_metrics = metrics;
            eval_time += t.elapsed().as_secs_f64();
        }
        if cfg.sample_every > 0 && start_step == 0 {
            // The pictures of the untrained model, the first frame of the series.
            let t = Instant::now();
            run.write_samples(&dir.join("samples"), 0, cfg.sample_count, seed)?;
            eval_time += t.elapsed().as_secs_f64();
        }
        let progress = Progress::new(steps, opts.progress);
        progress.set_position(start_step);
        let mut checkpointed = None;
        // What a rollback restores, and how many rollbacks' learning-rate factors it holds.
        let mut snapshot: Option<(TrainingState, u32)> = None;
        if can_roll_back {
            let rec = record(&summary, earlier_wall, loader.epoch(), &last_eval);
            snapshot = Some((
                run.capture(start_step, &rng, &loader, &hash, rec),
                summary.health.rollbacks,
            ));
        }
        let mut governor = crate::threads::SplitGovernor::new(rayon::current_num_threads(), cfg.adaptive_splitting);
        let mut step = start_step;
        while step < steps {
            let batch = loader.next_batch(run.data.as_ref(), &run.device)?;
            let mut ctx = TrainContext {
                step,
                device: &run.device,
                rng: &mut rng,
                optimizers: &mut run.optimizers,
                stabilizers: &mut run.stabilizers,
            };
            // A step that refuses a non-finite value is handed to the health policy like a step
            // that reports one.
            let report = governor.step(|| match run.model.train_step(&batch, &mut ctx) {
                Ok(mut report) => match ctx.stabilizers.end_step(
                    &mut report,
                    &mut HookContext {
                        step,
                        device: &run.device,
                        rng: ctx.rng,
                    },
                ) {
                    Ok(()) => Ok(report),
                    Err(e) => non_finite_report(&e).ok_or_else(|| {
                        anyhow::Error::from(e).context(TrainingFailed::new(format!(
                            "a stabilizer failed at the end of step {step}"
                        )))
                    }),
                },
                Err(e) => non_finite_report(&e).ok_or_else(|| {
                    anyhow::Error::from(e).context(TrainingFailed::new(format!("training step {step} failed")))
                }),
            })?;
            let done = step + 1;
            let mut events = monitor.observe_step(done, &report);
            let go_on = decide(&events, &summary.health, &cfg.health).is_none_or(|a| a == Action::Warn);
            if go_on {
                summary.steps = done;
                summary.split_share = governor.split_share();
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
                        "elapsed_s": earlier_wall + start.elapsed().as_secs_f64(),
                    }))?;
                    if !progress.is_visible() {
                        tracing::info!("step {done}/{steps}  {}", short_losses(&report));
                    }
                }
            }
            let last = done == steps;
            if go_on {
                progress.set_position(done);
                progress.set_message(short_losses(&report));
                summary.final_losses = report.losses;
                summary.final_diagnostics = report.diagnostics;
                if !last && cfg.eval_every > 0 && done.is_multiple_of(cfg.eval_every) {
                    let t = Instant::now();
                    let (eval, metrics) =
                        run.evaluate(cfg.eval_batches, cfg.batch_size, seed, cfg.health.diversity_samples)?;
                    log.write(&json!({"step": done, "split": "test", "eval": eval, "metrics": metrics}))?;
                    tracing::info!("step {done}: eval {eval:?} metrics {metrics:?}");
                    events.extend(monitor.observe_eval(done, &metrics));
                    last_eval = Some(Evaluation {
                        step: done,
                        eval,
                        metrics,
                    });
                    eval_time += t.elapsed().as_secs_f64();
                }
            }
            let decision = decide(&events, &summary.health, &cfg.health);
            let restore_to = snapshot.as_ref().map_or(start_step, |(s, _)| s.step);
            let outcomes = outcomes(&events, decision, &summary.health, &cfg.health, restore_to);
            for (e, outcome) in events.iter().zip(&outcomes) {
                tracing::warn!(
                    "health: {} at step {}: {} ({outcome})",
                    e.detector.name(),
                    e.step,
                    e.message
                );
                health_log.write(&health_json(e, outcome))?;
                *summary.health.events.entry(e.detector.name().to_string()).or_default() += 1;
                if decision != Some(Action::Rollback) {
                    log.write(&json!({"step": e.step, "split": "health", "health": health_json(e, outcome)}))?;
                }
            }
            match decision {
                Some(Action::Stop) => {
                    let (e, why) = events
                        .iter()
                        .zip(&outcomes)
                        .find(|(e, _)| e.action != Action::Warn)
                        .expect("a stop comes from an event");
                    summary.health.stopped_by = Some(e.detector.name().to_string());
                    return Err(stop_error(e, why));
                }
                Some(Action::Rollback) => {
                    let (saved, baked) = snapshot
                        .as_ref()
                        .expect("a snapshot is kept whenever a policy is `rollback`");
                    run.restore(saved, &mut rng, Some(&mut loader), Path::new("<health snapshot>"))
                        .context("cannot roll back to the last healthy snapshot")?;
                    summary.health.rollbacks += 1;
                    // The optimizer state restored holds the learning-rate scale of its time.
                    let factor = cfg.health.lr_factor.powi((summary.health.rollbacks - baked) as i32);
                    for opt in run.optimizers.values_mut() {
                        opt.scale_learning_rate(factor);
                    }
                    monitor.reset();
                    last_eval = saved.record.last_evaluation.clone();
                    summary.steps = saved.step;
                    summary.epochs = loader.epoch();
                    // The metrics after the snapshot belong to the abandoned trajectory.
                    log = JsonLines::resume(dir.join("metrics.jsonl"), saved.step)?;
                    for (e, outcome) in events.iter().zip(&outcomes) {
                        log.write(&json!({"step": saved.step, "split": "health", "health": health_json(e, outcome)}))?;
                    }
                    progress.set_position(saved.step);
                    step = saved.step;
                    continue;
                }
                _ => {}
            }
            if !last && cfg.sample_every > 0 && done.is_multiple_of(cfg.sample_every) {
                let t = Instant::now();
                run.write_samples(&dir.join("samples"), done, cfg.sample_count, seed)?;
                eval_time += t.elapsed().as_secs_f64();
            }
            if can_roll_back && done.is_multiple_of(cfg.health.snapshot_every) && monitor.calm() {
                let rec = record(
                    &summary,
                    earlier_wall + start.elapsed().as_secs_f64(),
                    loader.epoch(),
                    &last_eval,
                );
                snapshot = Some((run.capture(done, &rng, &loader, &hash, rec), summary.health.rollbacks));
            }
            let every = cfg.checkpoint.every;
            let stop = stop_requested();
            if !last && (stop || (every > 0 && done.is_multiple_of(every))) {
                let rec = record(
                    &summary,
                    earlier_wall + start.elapsed().as_secs_f64(),
                    loader.epoch(),
                    &last_eval,
                );
                let state = run.capture(done, &rng, &loader, &hash, rec);
                let path = checkpoint::write_checkpoint(dir, &state, &cfg.checkpoint)?;
                tracing::info!("checkpoint {}", path.display());
                checkpointed = Some(done);
            }
            if stop && !last {
                interrupted = true;
                tracing::warn!("interrupted after step {done}; checkpoint {:?} written", checkpointed);
                return Ok(());
            }
            step = done;
        }
        drop(progress);
        let train_time = start.elapsed().as_secs_f64() - eval_time;
        summary.steps_per_s = if train_time > 0.0 {
            (summary.steps - start_step) as f64 / train_time
        } else {
            0.0
        };
        let (eval, metrics) = run.evaluate(cfg.eval_batches, cfg.batch_size, seed, cfg.health.diversity_samples)?;
        log.write(&json!({"step": summary.steps, "split": "test", "eval": eval, "metrics": metrics}))?;
        for e in monitor.observe_eval(summary.steps, &metrics) {
            // Nothing is left to roll back or stop: the final evaluation's events are logged only.
            let outcome = "none (final evaluation)";
            tracing::warn!(
                "health: {} at step {}: {} ({outcome})",
                e.detector.name(),
                e.step,
                e.message
            );
            health_log.write(&health_json(&e, outcome))?;
            *summary.health.events.entry(e.detector.name().to_string()).or_default() += 1;
            log.write(&json!({"step": e.step, "split": "health", "health": health_json(&e, outcome)}))?;
        }
        summary.final_eval = eval.clone();
        summary.final_metrics = metrics.clone();
        summary.metric_provenance = run.provenance.clone();
        last_eval = Some(Evaluation {
            step: summary.steps,
            eval,
            metrics,
        });
        if cfg.sample_count > 0 {
            run.write_samples(&dir.join("samples"), summary.steps, cfg.sample_count, seed)?;
        }
        let rec = record(
            &summary,
            earlier_wall + start.elapsed().as_secs_f64(),
            loader.epoch(),
            &last_eval,
        );
        let state = run.capture(summary.steps, &rng, &loader, &hash, rec);
        checkpoint::write_checkpoint(dir, &state, &cfg.checkpoint).context("cannot write the final checkpoint")?;
        Ok(())
    })();
    summary.wall_time_s = earlier_wall + start.elapsed().as_secs_f64();
    summary.epochs = loader.epoch();
    if interrupted {
        summary.status = "interrupted".into();
    }
    if let Err(e) = &result {
        summary.status = "failed".into();
        summary.error = Some(format!("{e:#}"));
    }
    write_json(&dir.join("summary.json"), &summary)?;
    drop((log, health_log));
    if let Err(e) = crate::report::finish_run_outputs(dir) {
        tracing::warn!("cannot write the run report of {}: {e:#}", dir.display());
    }
    result?;
    tracing::info!(
        "{}: {} steps in {:.1}s ({:.1} steps/s); eval {:?}; metrics {:?}; run folder {}",
        if interrupted { "interrupted" } else { "done" },
        summary.steps,
        summary.wall_time_s,
        summary.steps_per_s,
        summary.final_eval,
        summary.final_metrics,
        dir.display()
    );
    Ok(summary)
}

/// The health log of a run folder.
pub const HEALTH_FILE: &str = "health.jsonl";

/// The report of a step that failed with [`nash_core::Error::NonFinite`] (`what` is
/// "`key` = value" or "key = value"): the key with its value (NaN when it cannot be read).
fn non_finite_report(e: &nash_core::Error) -> Option<StepReport> {
    let nash_core::Error::NonFinite { what } = e else {
        return None;
    };
    let (key, value) = match what.split_once(" = ") {
        Some((k, v)) => (k, v.trim().parse::<f64>().unwrap_or(f64::NAN)),
        None => (what.as_str(), f64::NAN),
    };
    let mut report = StepReport::default();
    report.loss(
        key.trim().trim_matches('`'),
        if value.is_finite() { f64::NAN } else { value },
    );
    Some(report)
}

/// The strongest action `events` call for: `rollback` becomes `stop` once `max_rollbacks` are used.
fn decide(events: &[health::Event], done: &HealthSummary, cfg: &health::HealthConfig) -> Option<Action> {
    let strongest = events.iter().map(|e| e.action).max()?;
    Some(match strongest {
        Action::Rollback if done.rollbacks >= cfg.max_rollbacks => Action::Stop,
        a => a,
    })
}

/// What was done about each event, in words, for the logs.
fn outcomes(
    events: &[health::Event],
    decision: Option<Action>,
    done: &HealthSummary,
    cfg: &health::HealthConfig,
    restore_to: u64,
) -> Vec<String> {
    events
        .iter()
        .map(|e| match (e.action, decision) {
            (Action::Warn, _) => "warn".to_string(),
            (Action::Rollback, Some(Action::Rollback)) => format!(
                "rollback {} of {} to step {restore_to}, learning rates x{}",
                done.rollbacks + 1,
                cfg.max_rollbacks,
                if cfg.lr_factor >= 1e-3 {
                    cfg.lr_factor.to_string()
                } else {
                    format!("{:e}", cfg.lr_factor)
                }
            ),
            (Action::Rollback, _) if done.rollbacks >= cfg.max_rollbacks => {
                format!("stop (all {} rollbacks used)", cfg.max_rollbacks)
            }
            _ => "stop".to_string(),
        })
        .collect()
}

/// A `health.jsonl` line.
fn health_json(e: &health::Event, outcome: &str) -> Value {
    json!({
        "step": e.step,
        "kind": e.detector.name(),
        "severity": e.detector.severity(),
        "key": e.key,
        "message": e.message,
        "action": outcome,
    })
}

/// The error of a run the monitor stopped because of `e`.
fn stop_error(e: &health::Event, outcome: &str) -> anyhow::Error {
    if e.detector == Detector::NonFinite {
        return anyhow!(nash_core::Error::NonFinite {
            what: format!("`{}` at step {}", e.key, e.step),
        })
        .context(TrainingFailed::new(format!(
            "training diverged at step {}: {}; lower the learning rate, or add a stabilizer (gradient clipping, \
             a gradient penalty), or set [training.health] policy = \"rollback\" ({outcome})",
            e.step, e.message
        )));
    }
    anyhow!(TrainingFailed::new(format!(
        "training stopped by the health monitor at step {} ({}): {} ({outcome}; see [training.health])",
        e.step,
        e.detector.name(),
        e.message
    )))
}

/// The health section of a run resumed from its folder: the events `health.jsonl` kept.
fn earlier_health(path: &Path) -> HealthSummary {
    let mut summary = HealthSummary::default();
    let text = std::fs::read_to_string(path).unwrap_or_default();
    for line in text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()) {
        if let Some(kind) = line["kind"].as_str() {
            *summary.events.entry(kind.to_string()).or_default() += 1;
        }
        if line["action"].as_str().is_some_and(|a| a.starts_with("rollback")) {
            summary.rollbacks += 1;
        }
    }
    summary
}

/// Reads the resolved pipeline of `run_dir` and loads its plugins (and `extra_plugins`).
fn prepare_run(
    run_dir: &Path,
    overrides: &[crate::Override],
    extra_plugins: &[PathBuf],
    opts: &RunOptions,
) -> anyhow::Result<crate::Prepared> {
    let path = run_dir.join("pipeline.resolved.json");
    let source = crate::PipelineSource::from_file(&path).with_context(|| {
        format!(
            "{} is not a run folder: cannot read {}",
            run_dir.display(),
            path.display()
        )
    })?;
    crate::prepare(source, overrides, extra_plugins, opts)
}

/// `nash resume`: continues the run in `run_dir` from its newest complete checkpoint, with the
/// run's resolved pipeline, to `opts.steps` steps in all (else the pipeline's `training.steps`).
pub fn resume(run_dir: &Path, extra_plugins: &[PathBuf], opts: &RunOptions) -> anyhow::Result<Summary> {
    let (origin, saved) = checkpoint::load_latest(run_dir)?;
    let prepared = prepare_run(run_dir, &[], extra_plugins, opts)?;
    let mut opts = opts.clone();
    opts.seed = None;
    let name = prepared.name.clone();
    train_from(
        &prepared.pipeline,
        &name,
        run_dir,
        &prepared.plugins.plugins,
        &opts,
        Some((&origin, &saved)),
    )
}

/// A run rebuilt from a checkpoint, for `sample` and `eval`: the trained parameters and the
/// stabilizers' state (whose evaluation parameters, an EMA, are used).
fn restored(
    path: &Path,
    overrides: &[crate::Override],
    extra_plugins: &[PathBuf],
) -> anyhow::Result<(Run, crate::Prepared, TrainingState, PathBuf)> {
    let (run_dir, origin, saved) = checkpoint::resolve(path)?;
    let prepared = prepare_run(&run_dir, overrides, extra_plugins, &RunOptions::default())?;
    let hash = checkpoint::pipeline_hash(&prepared.pipeline)?;
    if overrides.is_empty() && hash != saved.pipeline_hash {
        tracing::warn!(
            "{} was written by another pipeline than {}/pipeline.resolved.json",
            origin.display(),
            run_dir.display()
        );
    }
    let seed = prepared.pipeline.seed;
    let mut rng = Rng::seed_from_u64(seed);
    let mut run = build(&prepared.pipeline, seed, &mut rng)?;
    run.restore(&saved, &mut rng, None, &origin)?;
    Ok((run, prepared, saved, origin))
}

/// `nash sample`: draws `count` samples (from `seed`) of the model in the checkpoint (or the
/// newest one of a run folder) and writes them to `out`: a `.npy` array `[count, ...sample shape]`
/// or a `.png` picture (a grid of images, or a scatter plot of 2-D points).
pub fn sample(path: &Path, count: usize, seed: u64, out: &Path, extra_plugins: &[PathBuf]) -> anyhow::Result<()> {
    crate::threads::on_pool(None, || sample_on_pool(path, count, seed, out, extra_plugins))?
}

/// [`sample`]'s work, on a worker of a compute pool of one thread per core.
fn sample_on_pool(path: &Path, count: usize, seed: u64, out: &Path, extra_plugins: &[PathBuf]) -> anyhow::Result<()> {
    let ext = out
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ext != "png" && ext != "npy" {
        return Err(anyhow!("--out {}: the file must end in .png or .npy", out.display()));
    }
    if count == 0 {
        return Err(anyhow!("--count must be at least 1"));
    }
    let (mut run, _, saved, _) = restored(path, &[], extra_plugins)?;
    let values = run.with_evaluation_params(|run| {
        let mut rng = Rng::seed_from_u64(seed);
        let mut ctx = EvalContext {
            device: &run.device,
            rng: &mut rng,
        };
        let family = run.model.family().to_string();
        let samples = run
            .model
            .sample(count, &mut ctx)
            .context("sampling failed")?
            .ok_or_else(|| anyhow!("the {family} model does not generate samples"))?;
        let (_, cols) = *samples.shape();
        Ok((samples.as_vec(), cols))
    })?;
    let (values, cols) = values;
    if ext == "npy" {
        let info = run.data.info();
        let mut shape = vec![count];
        if info.sample_shape.numel() == cols {
            match info.sample_shape {
                nash_core::tensor::FeatureShape::Image {
                    channels,
                    height,
                    width,
                } => shape.extend([channels, height, width]),
                nash_core::tensor::FeatureShape::Flat(n) => shape.push(n),
            }
        } else {
            shape.push(cols);
        }
        return checkpoint::write_npy(out, &shape, &values);
    }
    let tmp = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join(format!(".nash-sample-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let written = run.pictures.write_samples(&tmp, saved.step, &values, cols);
    let result = match written {
        Ok(Some(p)) => std::fs::rename(&p, out).with_context(|| format!("cannot write {}", out.display())),
        Ok(None) => Err(anyhow!(
            "samples of shape {:?} cannot be drawn as a picture; use --out FILE.npy",
            run.data.info().sample_shape
        )),
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

/// `nash eval`: the pipeline's held-out evaluation and metrics on the checkpoint (or the newest
/// one of a run folder), with the stabilizers' evaluation parameters. `overrides` edit the run's
/// resolved pipeline first (`metrics=[{ type = "sample_quality" }]` scores a finished run with
/// metrics it was not trained with); they must leave the networks as the checkpoint has them.
pub fn evaluate(
    path: &Path,
    overrides: &[crate::Override],
    extra_plugins: &[PathBuf],
) -> anyhow::Result<CheckpointEvaluation> {
    crate::threads::on_pool(None, || evaluate_on_pool(path, overrides, extra_plugins))?
}

/// [`evaluate`]'s work, on a worker of a compute pool of one thread per core.
fn evaluate_on_pool(
    path: &Path,
    overrides: &[crate::Override],
    extra_plugins: &[PathBuf],
) -> anyhow::Result<CheckpointEvaluation> {
    let (mut run, prepared, saved, _) = restored(path, overrides, extra_plugins)?;
    let cfg = &prepared.pipeline.training;
    let (eval, metrics) = run.evaluate(
        cfg.eval_batches,
        cfg.batch_size,
        prepared.pipeline.seed,
        cfg.health.diversity_samples,
    )?;
    Ok(CheckpointEvaluation {
        evaluation: Evaluation {
            step: saved.step,
            eval,
            metrics,
        },
        metric_provenance: run.provenance,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{Format, PipelineDoc, PipelineSource};
    use nash_core::data::{Batch, DataInfo, DataSource, DataSourceConfig};
    use nash_core::layers::BuildContext;
    use nash_core::model::{Model, ModelConfig};
    use nash_core::registry::Registry;
    use nash_core::tensor::Device;
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
            grads.get_or_alloc_mut(self.mu.value())?.copy_from_slice(&grad);
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
        pipeline_with_lr(data, extra, training, 0.5)
    }

    /// [`pipeline_on`] with SGD at learning rate `lr`.
    fn pipeline_with_lr(data: &str, extra: &str, training: &str, lr: f64) -> Pipeline {
        let text = format!(
            "seed = 3\ndata = {{ type = \"{data}\" }}\nmodel = {{ type = \"test_mean\" {extra} }}\n\
             [optimizers.model]\ntype = \"sgd\"\nlr = {lr:e}\n\
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
    fn resume_continues_exactly_and_refuses_mismatches() {
        let p = pipeline_on("test_two_points", "", "checkpoint = { every = 20 }\n");
        let (full, half) = (temp_dir("resume-full"), temp_dir("resume-half"));
        let whole = train(&p, "t", &full, &[], &RunOptions::default()).unwrap();
        let opts = RunOptions {
            steps: Some(20),
            ..Default::default()
        };
        train(&p, "t", &half, &[], &opts).unwrap();
        let (origin, saved) = checkpoint::load_latest(&half).unwrap();
        assert_eq!(saved.step, 20);
        let resumed = train_from(&p, "t", &half, &[], &RunOptions::default(), Some((&origin, &saved))).unwrap();
        assert_eq!(resumed.final_losses, whole.final_losses);
        assert_eq!(resumed.final_eval, whole.final_eval);
        assert_eq!(resumed.initial_eval, whole.initial_eval);
        let a = checkpoint::load_checkpoint(&full.join("checkpoints/step-00000040")).unwrap();
        let b = checkpoint::load_checkpoint(&half.join("checkpoints/step-00000040")).unwrap();
        assert_eq!((a.params, a.state, a.rng), (b.params, b.state, b.rng));
        // The metrics of both runs are the same lines.
        let strip = |dir: &Path| -> Vec<Value> {
            lines(dir)
                .into_iter()
                .map(|mut l| {
                    l.as_object_mut().unwrap().remove("elapsed_s");
                    l
                })
                .collect()
        };
        assert_eq!(strip(&full), strip(&half));

        // Nothing left to train, and a checkpoint of another pipeline.
        let (origin, saved) = checkpoint::load_latest(&half).unwrap();
        let msg = format!(
            "{:#}",
            train_from(&p, "t", &half, &[], &RunOptions::default(), Some((&origin, &saved))).unwrap_err()
        );
        assert!(msg.contains("training.steps") && msg.contains("--steps"), "{msg}");
        let other = pipeline_on("test_two_points", ", nan_at = 1000", "");
        let msg = format!(
            "{:#}",
            train_from(&other, "t", &half, &[], &RunOptions::default(), Some((&origin, &saved))).unwrap_err()
        );
        assert!(msg.contains("another pipeline"), "{msg}");
        let _ = std::fs::remove_dir_all(&full);
        let _ = std::fs::remove_dir_all(&half);
    }

    #[test]
    fn non_finite_loss_stops_with_its_name() {
        let dir = temp_dir("nan");
        let e = train(&pipeline(", nan_at = 5"), "t", &dir, &[], &RunOptions::default()).unwrap_err();
        let msg = format!("{e:#}");
        // The model's step 5 (counted from 0) is the sixth: step 6 in the logs.
        assert!(
            msg.contains("diverged at step 6") && msg.contains("`loss/mse`"),
            "{msg}"
        );
        assert_eq!(crate::validate::exit_code(&e), crate::validate::exit::TRAINING);
        let summary: Summary =
            serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
        assert_eq!((summary.status.as_str(), summary.steps), ("failed", 5));
        assert!(summary.error.unwrap().contains("loss/mse"));
        assert_eq!(summary.health.events["non_finite"], 1);
        assert_eq!(summary.health.stopped_by.as_deref(), Some("non_finite"));
        let health = std::fs::read_to_string(dir.join(HEALTH_FILE)).unwrap();
        let event: Value = serde_json::from_str(health.lines().next().unwrap()).unwrap();
        assert_eq!(
            (event["step"].as_u64(), event["kind"].as_str()),
            (Some(6), Some("non_finite"))
        );
        assert_eq!(
            (event["key"].as_str(), event["action"].as_str()),
            (Some("loss/mse"), Some("stop"))
        );
        // The report was written for the failed run too, with the event in its health log.
        let html = std::fs::read_to_string(dir.join("index.html")).unwrap();
        assert!(
            html.contains("`loss/mse` became NaN at step 6"),
            "health log missing from the report"
        );
        assert!(dir.join("metrics.csv").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rollback_restores_the_snapshot_lowers_the_learning_rate_and_stops_when_used_up() {
        // NaN from the model's step 25 on: every retry fails again, so all rollbacks are used.
        let dir = temp_dir("rollback");
        let p = pipeline_on(
            "test_two_points",
            ", nan_at = 25",
            "[training.health]\npolicy = { non_finite = \"rollback\" }\nsnapshot_every = 10\nmax_rollbacks = 2\nlr_factor = 0.25\n",
        );
        let e = train(&p, "t", &dir, &[], &RunOptions::default()).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("all 2 rollbacks used") && msg.contains("loss/mse"),
            "{msg}"
        );
        assert_eq!(crate::validate::exit_code(&e), crate::validate::exit::TRAINING);
        let summary: Summary =
            serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
        assert_eq!((summary.health.rollbacks, summary.health.events["non_finite"]), (2, 3));
        let events: Vec<Value> = std::fs::read_to_string(dir.join(HEALTH_FILE))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let actions: Vec<&str> = events.iter().map(|e| e["action"].as_str().unwrap()).collect();
        assert_eq!(
            actions,
            [
                "rollback 1 of 2 to step 20, learning rates x0.25",
                "rollback 2 of 2 to step 20, learning rates x0.25",
                "stop (all 2 rollbacks used)"
            ]
        );
        // metrics.jsonl holds the surviving trajectory: the lines of steps after 20 were dropped at
        // each rollback (the retries fail before their first log line, at step 30).
        let logged = lines(&dir);
        let steps: Vec<u64> = logged.iter().map(|l| l["step"].as_u64().unwrap()).collect();
        assert!(steps.windows(2).all(|w| w[0] <= w[1]), "{steps:?}");
        let health_lines: Vec<&Value> = logged.iter().filter(|l| l["split"] == "health").collect();
        assert_eq!(health_lines.len(), 3);
        let lr_after: Vec<f64> = logged
            .iter()
            .filter(|l| l.get("lr").is_some())
            .map(|l| l["lr"]["model"].as_f64().unwrap())
            .collect();
        assert_eq!(
            lr_after,
            [0.5, 0.5],
            "steps 10 and 20; the retried steps stop before step 30"
        );
        let _ = std::fs::remove_dir_all(&dir);

        // An absurd learning rate: the first step overflows f32 to infinity, the run rolls back to
        // step 0 with the learning rate x1e-30 (= 1), and then converges.
        let dir = temp_dir("rollback-lr");
        let p = pipeline_with_lr(
            "test_two_points",
            "",
            "[training.health]\npolicy = \"rollback\"\nlr_factor = 1e-30\n",
            1e30,
        );
        let summary = train(&p, "t", &dir, &[], &RunOptions::default()).unwrap();
        assert_eq!(
            (summary.status.as_str(), summary.steps, summary.health.rollbacks),
            ("completed", 40, 1)
        );
        // lr 1 jumps to each batch's mean: near the optimum 0.25, within the batches' spread.
        assert!(
            (summary.final_eval["loss/mse"] - 0.25).abs() < 0.01,
            "{:?}",
            summary.final_eval
        );
        let logged = lines(&dir);
        let lr = logged[2]["lr"]["model"].as_f64().unwrap();
        assert!((lr - 1.0).abs() < 1e-6, "{lr}");
        assert_eq!(logged[1]["health"]["key"], "loss/mse");
        assert_eq!(logged[1]["step"], 0, "logged at the step rolled back to");
        let _ = std::fs::remove_dir_all(&dir);

        // A healthy run under policy rollback: no events, snapshots every 10 steps, the same
        // result as without it.
        let plain = train(&pipeline(""), "t", &temp_dir("rb-plain"), &[], &RunOptions::default()).unwrap();
        let p = pipeline_on(
            "test_two_points",
            "",
            "[training.health]\npolicy = \"rollback\"\nsnapshot_every = 10\n",
        );
        let watched = train(&p, "t", &temp_dir("rb-watched"), &[], &RunOptions::default()).unwrap();
        assert_eq!(watched.final_losses, plain.final_losses);
        assert_eq!(watched.health, HealthSummary::default());
        let _ = std::fs::remove_dir_all(temp_dir("rb-plain"));
        let _ = std::fs::remove_dir_all(temp_dir("rb-watched"));
    }

    #[test]
    fn training_failures_map_to_exit_code_6_by_type_not_wording() {
        let e = anyhow!(TrainingFailed::new("something unusual"))
            .context("while doing x")
            .context("outer");
        assert_eq!(crate::validate::exit_code(&e), crate::validate::exit::TRAINING);
        let e = Err::<(), _>(nash_core::Error::shape("linear", "3", "4"))
            .with_context(|| TrainingFailed::new("step 3 went wrong"))
            .context("more")
            .unwrap_err();
        assert_eq!(crate::validate::exit_code(&e), crate::validate::exit::TRAINING);
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
