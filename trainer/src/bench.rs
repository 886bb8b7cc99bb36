//! `nash bench stability`: the 2-D stability benchmark (the protocol of PacGAN, Lin et al. 2018, as
//! `docs/stabilizers.md` describes it). Every entry (a pipeline plus `--set` overrides) is trained on
//! the `ring` or `grid` data source once per seed, each run a child process of this same binary
//! (`nash train ... --threads 1 --quiet`), several at a time; the final `mode_coverage` values of the
//! runs (modes captured, share of high-quality samples, reverse KL) are summarized as mean ±
//! standard error over seeds beside the published PacGAN numbers, in a markdown table
//! (`results.md`) and in `results.json`.
//!
//! Entry `e` on data `d` trains seed `s` in `<out>/<d>/<e>/seed-<s>` (its output in `seed-<s>.log`
//! beside it), so entries on the ring and the grid may share a name. The benchmark resumes: a run
//! folder whose `summary.json` says `completed` and whose `pipeline.resolved.json` is the one this
//! entry and seed would train is reused; an unfinished run of that same pipeline with a checkpoint
//! (interrupted by Ctrl-C or SIGTERM, which write one, or after a `training.checkpoint.every`
//! checkpoint) continues from its newest checkpoint with `nash resume`, its log appended to.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Context;
use nash_core::serde_json::{self, json, Value};
use nash_core::tracing;
use serde::{Deserialize, Serialize};

use crate::pipeline::{Override, PipelineSource};
use crate::train::{write_json, RunOptions};

/// The protocol's number of seeds (PacGAN reports 10 trials).
pub const DEFAULT_SEEDS: u64 = 10;

/// The data sources of the protocol: PacGAN's 2-D ring (8 modes) and grid (25 modes), in table order.
pub const DATA_SOURCES: [&str; 2] = ["ring", "grid"];

/// The goal on the grid (means over seeds): at least this many modes captured ...
pub const GOAL_MODES: f64 = 24.9;
/// ... at least this share of high-quality samples, in percent ...
pub const GOAL_HIGH_QUALITY_PERCENT: f64 = 95.0;
/// ... and at most this reverse KL (nats).
pub const GOAL_REVERSE_KL: f64 = 0.03;

/// A published result: mean ± standard error of each column over the paper's trials.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Published {
    /// `ring` or `grid`.
    pub data: &'static str,
    /// The row's name.
    pub name: &'static str,
    /// Modes captured (mean, standard error).
    pub modes_captured: (f64, f64),
    /// High-quality samples in percent (mean, standard error).
    pub high_quality_percent: (f64, f64),
    /// Reverse KL in nats (mean, standard error).
    pub reverse_kl: (f64, f64),
    /// Number of trials.
    pub trials: u32,
}

/// Where [`PUBLISHED`] comes from.
pub const PUBLISHED_SOURCE: &str =
    "Lin, Khetan, Fanti, Oh: PacGAN: The power of two samples in generative adversarial \
     networks (NeurIPS 2018), the 2D-ring and 2D-grid tables (10 trials, 400 epochs); also in docs/stabilizers.md";

/// The published rows shown beside the benchmark's: PacGAN paper, 2D-ring and 2D-grid experiments,
/// mean ± standard error over 10 trials (see [`PUBLISHED_SOURCE`]).
pub const PUBLISHED: [Published; 4] = [
    Published {
        data: "ring",
        name: "GAN",
        modes_captured: (6.3, 0.5),
        high_quality_percent: (98.2, 0.2),
        reverse_kl: (0.45, 0.09),
        trials: 10,
    },
    Published {
        data: "ring",
        name: "PacGAN2",
        modes_captured: (7.9, 0.1),
        high_quality_percent: (95.6, 2.0),
        reverse_kl: (0.07, 0.03),
        trials: 10,
    },
    Published {
        data: "grid",
        name: "GAN",
        modes_captured: (17.3, 0.8),
        high_quality_percent: (94.8, 0.7),
        reverse_kl: (0.70, 0.07),
        trials: 10,
    },
    Published {
        data: "grid",
        name: "PacGAN4",
        modes_captured: (24.8, 0.2),
        high_quality_percent: (93.6, 0.6),
        reverse_kl: (0.04, 0.01),
        trials: 10,
    },
];

/// One benchmark entry: a pipeline file and the overrides that make the variant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The entry's name (a folder name of the output: letters, digits, `_`, `-`, `.`).
    pub name: String,
    /// The pipeline file (in a suite file: relative to the suite file).
    pub pipeline: PathBuf,
    /// `--set` overrides, `path=value` as on the command line.
    #[serde(default)]
    pub set: Vec<String>,
}

/// A suite file: `[[entry]]` tables of [`Entry`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Suite {
    entry: Vec<Entry>,
}

/// Reads a suite file; pipeline paths become relative to the current folder (the suite file's
/// folder joined with the written path).
pub fn read_suite(path: &Path) -> anyhow::Result<Vec<Entry>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the suite {}", path.display()))?;
    let suite: Suite = toml::from_str(&text).map_err(|e| {
        nash_core::Error::config(
            path.display().to_string(),
            format!(
                "not a benchmark suite: {}; write `[[entry]]` tables with `name = \"...\"`, `pipeline = \"file.toml\"` \
                 (relative to the suite) and optionally `set = [\"path=value\", ...]`",
                e.message()
            ),
        )
    })?;
    if suite.entry.is_empty() {
        return Err(nash_core::Error::config(path.display().to_string(), "the suite has no `[[entry]]`").into());
    }
    let base = path.parent().unwrap_or(Path::new(""));
    Ok(suite
        .entry
        .into_iter()
        .map(|e| Entry {
            pipeline: base.join(&e.pipeline),
            ..e
        })
        .collect())
}

/// An entry for a pipeline file given on the command line: named after the file's stem, no overrides.
pub fn entry_for_pipeline(path: &Path) -> Entry {
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "pipeline".into());
    Entry {
        name,
        pipeline: path.to_path_buf(),
        set: Vec::new(),
    }
}

/// What `nash bench stability` was asked to do.
#[derive(Clone, Debug)]
pub struct StabilityOptions {
    /// The entries, in table order.
    pub entries: Vec<Entry>,
    /// The seeds every entry is trained with.
    pub seeds: Vec<u64>,
    /// Replaces every pipeline's `training.steps`.
    pub steps: Option<u64>,
    /// Runs at a time.
    pub jobs: usize,
    /// The benchmark folder: `<out>/<data>/<entry>/seed-<s>` run folders, `results.json`, `results.md`.
    pub out: PathBuf,
    /// Overrides (`path=value`) applied to every entry, after the entry's own.
    pub set: Vec<String>,
    /// Plugin libraries passed to every run (`--plugin`).
    pub extra_plugins: Vec<PathBuf>,
}

/// Mean ± standard error of the defined (non-NaN) values of a column.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Stat {
    /// The mean (NaN when no value is defined).
    pub mean: f64,
    /// The standard error of the mean, `s / √n` with the sample standard deviation `s` (n - 1 in its
    /// denominator); 0 for a single value, NaN for none.
    pub se: f64,
    /// How many values were defined.
    pub n: usize,
}

/// [`Stat`] of `values`, leaving NaN out (an undefined reverse KL: no mode captured).
pub fn mean_se(values: &[f64]) -> Stat {
    let defined: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    let n = defined.len();
    if n == 0 {
        return Stat {
            mean: f64::NAN,
            se: f64::NAN,
            n,
        };
    }
    let mean = defined.iter().sum::<f64>() / n as f64;
    let se = if n > 1 {
        let var = defined.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        (var / n as f64).sqrt()
    } else {
        0.0
    };
    Stat { mean, se, n }
}

/// `mean ± se` with `decimals` digits after the point.
pub fn format_stat(stat: Stat, decimals: usize) -> String {
    format!("{:.decimals$} ± {:.decimals$}", stat.mean, stat.se)
}

/// The reverse-KL cell: `mean ± se`, with `(k of n seeds)` when only `k` of the `n` runs captured a
/// mode (the others' reverse KL is undefined), or `undefined (no mode captured)` when none did.
pub fn format_kl(stat: Stat, runs: usize) -> String {
    if stat.n == 0 {
        return "undefined (no mode captured)".into();
    }
    let cell = format_stat(stat, 2);
    if stat.n < runs {
        format!("{cell} ({} of {runs} seeds)", stat.n)
    } else {
        cell
    }
}

/// Whether means meet the goal on the grid: ≥ [`GOAL_MODES`] modes, ≥
/// [`GOAL_HIGH_QUALITY_PERCENT`] % high quality, reverse KL ≤ [`GOAL_REVERSE_KL`] (and defined).
pub fn meets_goal(modes: Stat, high_quality_percent: Stat, reverse_kl: Stat) -> bool {
    modes.n > 0
        && modes.mean >= GOAL_MODES
        && high_quality_percent.mean >= GOAL_HIGH_QUALITY_PERCENT
        && reverse_kl.n > 0
        && reverse_kl.mean <= GOAL_REVERSE_KL
}

/// How a run of the benchmark ended.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunResult {
    /// The seed.
    pub seed: u64,
    /// The run folder.
    pub run_dir: PathBuf,
    /// The child process's output.
    pub log: PathBuf,
    /// `completed` (trained now), `resumed` (an interrupted run finished now), `reused` (an
    /// earlier finished run) or `failed`.
    pub status: String,
    /// Why it failed.
    pub error: Option<String>,
    /// Final `modes_captured` (NaN when failed).
    pub modes_captured: f64,
    /// Final `high_quality_share`, a fraction (NaN when failed).
    pub high_quality_share: f64,
    /// Final `reverse_kl` (NaN, written as null, when no mode was captured or the run failed).
    pub reverse_kl: f64,
    /// Training steps per second.
    pub steps_per_s: f64,
}

impl RunResult {
    fn finished(&self) -> bool {
        self.status != "failed"
    }
}

/// The aggregates of an entry over its finished runs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Aggregate {
    /// Modes captured.
    pub modes_captured: Stat,
    /// High-quality samples, in percent.
    pub high_quality_percent: Stat,
    /// Reverse KL over the runs where it is defined.
    pub reverse_kl: Stat,
    /// Training steps per second.
    pub steps_per_s: Stat,
    /// Finished runs.
    pub seeds_finished: usize,
    /// Runs asked for.
    pub seeds: usize,
}

/// Aggregates the finished runs of `runs`.
pub fn aggregate(runs: &[RunResult]) -> Aggregate {
    let done: Vec<&RunResult> = runs.iter().filter(|r| r.finished()).collect();
    let column = |f: fn(&RunResult) -> f64| mean_se(&done.iter().map(|r| f(r)).collect::<Vec<_>>());
    Aggregate {
        modes_captured: column(|r| r.modes_captured),
        high_quality_percent: column(|r| r.high_quality_share * 100.0),
        reverse_kl: column(|r| r.reverse_kl),
        steps_per_s: column(|r| r.steps_per_s),
        seeds_finished: done.len(),
        seeds: runs.len(),
    }
}

/// One entry's results.
#[derive(Clone, Debug, Serialize)]
pub struct EntryResult {
    /// The entry's name.
    pub name: String,
    /// `ring` or `grid`.
    pub data: String,
    /// The pipeline file.
    pub pipeline: PathBuf,
    /// The entry's overrides, then the command line's.
    pub set: Vec<String>,
    /// One per seed.
    pub runs: Vec<RunResult>,
    /// Mean ± standard error over the finished runs.
    pub aggregate: Aggregate,
    /// On the grid: whether the means meet the goal; `None` on the ring.
    pub meets_goal: Option<bool>,
}

/// Everything `results.json` holds.
#[derive(Clone, Debug, Serialize)]
pub struct StabilityResults {
    /// The seeds.
    pub seeds: Vec<u64>,
    /// `--steps`, when given.
    pub steps: Option<u64>,
    /// The goal on the grid.
    pub goal: Value,
    /// The entries in table order.
    pub entries: Vec<EntryResult>,
    /// The published rows and their source.
    pub published: Vec<Published>,
    /// Where the published rows come from.
    pub published_source: &'static str,
}

impl StabilityResults {
    /// Runs that failed.
    pub fn failures(&self) -> impl Iterator<Item = (&EntryResult, &RunResult)> {
        self.entries
            .iter()
            .flat_map(|e| e.runs.iter().filter(|r| !r.finished()).map(move |r| (e, r)))
    }
}

/// An entry checked and resolved: its overrides (with a `mode_coverage` metric added when missing)
/// and the resolved pipeline every seed's run must have (`seed` and `training.steps` set per run).
struct Resolved {
    entry: Entry,
    /// `<out>/<data>/<name>`: the entry's run folders `seed-<s>` and their logs `seed-<s>.log`.
    dir: PathBuf,
    data: String,
    overrides: Vec<String>,
    resolved: Value,
}

/// The `type` tag of a serialized plugin config.
fn tag(value: &impl Serialize) -> Option<String> {
    serde_json::to_value(value)
        .ok()?
        .get("type")
        .and_then(Value::as_str)
        .map(str::to_string)
}

fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(nash_core::Error::config(
            format!("entry `{name}`"),
            "an entry's name names its output folder: use letters, digits, `_`, `-` and `.`",
        )
        .into())
    }
}

/// Reads, checks and resolves `entry`: its data must be `ring` or `grid`, and it gets a
/// `mode_coverage` metric (defaults) if it has none.
fn resolve(entry: &Entry, global: &[String], opts: &StabilityOptions) -> anyhow::Result<Resolved> {
    check_name(&entry.name)?;
    let what = format!("entry `{}` ({})", entry.name, entry.pipeline.display());
    let mut overrides = entry.set.clone();
    overrides.extend(global.iter().cloned());
    let parsed = |list: &[String]| -> anyhow::Result<Vec<Override>> {
        list.iter()
            .map(|s| {
                s.parse::<Override>()
                    .map_err(|e| nash_core::Error::config(what.clone(), format!("`set`: {e}")).into())
            })
            .collect()
    };
    let run_opts = RunOptions {
        steps: opts.steps,
        threads: Some(1),
        ..RunOptions::default()
    };
    let prepare = |list: &[String]| -> anyhow::Result<crate::Prepared> {
        let source = PipelineSource::from_file(&entry.pipeline).with_context(|| format!("{what}: cannot read it"))?;
        crate::prepare(source, &parsed(list)?, &opts.extra_plugins, &run_opts).with_context(|| what.clone())
    };
    let mut prepared = prepare(&overrides)?;
    let data = tag(&prepared.pipeline.data).unwrap_or_default();
    if !DATA_SOURCES.contains(&data.as_str()) {
        return Err(nash_core::Error::config(
            what,
            format!(
                "the stability benchmark needs the 2-D `ring` or `grid` data source, and this pipeline's data is `{data}`"
            ),
        )
        .into());
    }
    let has_coverage = prepared
        .pipeline
        .metrics
        .iter()
        .any(|m| tag(m).as_deref() == Some("mode_coverage"));
    if !has_coverage {
        let n = prepared.pipeline.metrics.len();
        overrides.push(if n == 0 {
            "metrics=[{ type = \"mode_coverage\" }]".to_string()
        } else {
            format!("metrics[{n}]={{ type = \"mode_coverage\" }}")
        });
        prepared = prepare(&overrides)?;
    }
    // Through text, as the run writes pipeline.resolved.json.
    let mut resolved: Value = serde_json::from_str(&serde_json::to_string(&prepared.pipeline)?)?;
    if let Some(t) = resolved.get_mut("training").and_then(Value::as_object_mut) {
        t.insert("steps".into(), json!(prepared.pipeline.training.steps));
    }
    Ok(Resolved {
        dir: opts.out.join(&data).join(&entry.name),
        entry: entry.clone(),
        data,
        overrides,
        resolved,
    })
}

impl Resolved {
    fn run_dir(&self, seed: u64) -> PathBuf {
        self.dir.join(format!("seed-{seed}"))
    }

    fn log(&self, seed: u64) -> PathBuf {
        self.dir.join(format!("seed-{seed}.log"))
    }
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// A final metric of a summary (`name` or `<metric>/name`); NaN when missing or null.
fn final_metric(summary: &Value, name: &str) -> f64 {
    let Some(Value::Object(m)) = summary.get("final_metrics") else {
        return f64::NAN;
    };
    m.get(name)
        .or_else(|| m.get(&format!("mode_coverage/{name}")))
        .and_then(Value::as_f64)
        .unwrap_or(f64::NAN)
}

/// The summary of `dir` if it is a completed run of exactly `expected`.
fn finished_run(dir: &Path, expected: &Value) -> Option<Value> {
    let summary = read_json(&dir.join("summary.json"))?;
    let resolved = read_json(&dir.join("pipeline.resolved.json"))?;
    (summary.get("status").and_then(Value::as_str) == Some("completed") && &resolved == expected).then_some(summary)
}

fn result_from(summary: &Value, seed: u64, dir: PathBuf, log: PathBuf, status: &str) -> RunResult {
    RunResult {
        seed,
        run_dir: dir,
        log,
        status: status.into(),
        error: None,
        modes_captured: final_metric(summary, "modes_captured"),
        high_quality_share: final_metric(summary, "high_quality_share"),
        reverse_kl: final_metric(summary, "reverse_kl"),
        steps_per_s: summary.get("steps_per_s").and_then(Value::as_f64).unwrap_or(f64::NAN),
    }
}

/// Trains one (entry, seed) in a child process; returns its result.
fn run_child(r: &Resolved, seed: u64, expected: &Value, opts: &StabilityOptions) -> RunResult {
    let (dir, log) = (r.run_dir(seed), r.log(seed));
    let failed = |error: String| RunResult {
        seed,
        run_dir: dir.clone(),
        log: log.clone(),
        status: "failed".into(),
        error: Some(error),
        modes_captured: f64::NAN,
        high_quality_share: f64::NAN,
        reverse_kl: f64::NAN,
        steps_per_s: f64::NAN,
    };
    // An interrupted run of exactly this pipeline continues from its newest checkpoint.
    let resume = read_json(&dir.join("pipeline.resolved.json")).as_ref() == Some(expected)
        && !crate::checkpoint::list_checkpoints(&dir).is_empty();
    // A summary of an earlier, different run must not be mistaken for this one's.
    let _ = std::fs::remove_file(dir.join("summary.json"));
    let started = (|| -> anyhow::Result<std::process::ExitStatus> {
        let exe = std::env::current_exe().context("cannot find the nash executable")?;
        std::fs::create_dir_all(&r.dir).with_context(|| format!("cannot create {}", r.dir.display()))?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(resume)
            .truncate(!resume)
            .open(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new(exe);
        if resume {
            tracing::info!("{} {} seed {seed}: resuming {}", r.data, r.entry.name, dir.display());
            cmd.arg("resume").arg(&dir).args(["--threads", "1", "--quiet"]);
        } else {
            cmd.arg("train")
                .arg(&r.entry.pipeline)
                .args(["--seed", &seed.to_string(), "--threads", "1", "--quiet", "--out"])
                .arg(&dir);
            if let Some(steps) = opts.steps {
                cmd.args(["--steps", &steps.to_string()]);
            }
            for s in &r.overrides {
                cmd.arg("--set").arg(s);
            }
        }
        for p in &opts.extra_plugins {
            cmd.arg("--plugin").arg(p);
        }
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().context("cannot share the log file")?)
            .stderr(file);
        cmd.status().context("cannot start the run")
    })();
    match started {
        Err(e) => failed(format!("{e:#}")),
        Ok(status) if !status.success() => {
            let why = read_json(&dir.join("summary.json"))
                .and_then(|s| s.get("error").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_else(|| format!("exit status {}", status.code().map_or("?".into(), |c| c.to_string())));
            failed(why)
        }
        Ok(_) => match finished_run(&dir, expected) {
            Some(summary) => {
                let status = if resume { "resumed" } else { "completed" };
                result_from(&summary, seed, dir.clone(), log.clone(), status)
            }
            None => failed(
                "the run finished, but its summary.json or pipeline.resolved.json is not the expected one".into(),
            ),
        },
    }
}

/// Runs the benchmark: resolves every entry (all errors before any run), trains what is not already
/// finished, `jobs` runs at a time, and writes `results.json` and `results.md` into `opts.out`.
pub fn run_stability(opts: &StabilityOptions) -> anyhow::Result<StabilityResults> {
    if opts.entries.is_empty() {
        return Err(nash_core::Error::config(
            "nash bench stability",
            "no entry: give pipeline files, or a suite with --suite (examples/stability/quick.toml)",
        )
        .into());
    }
    if opts.seeds.is_empty() {
        return Err(nash_core::Error::config("--seeds", "at least one seed is needed").into());
    }
    let resolved = opts
        .entries
        .iter()
        .map(|e| resolve(e, &opts.set, opts))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut names = std::collections::BTreeSet::new();
    for r in &resolved {
        if !names.insert((r.data.as_str(), r.entry.name.as_str())) {
            return Err(nash_core::Error::config(
                format!("entry `{}`", r.entry.name),
                format!(
                    "two entries on the {} data have this name; give each its own (a suite's `name`)",
                    r.data
                ),
            )
            .into());
        }
    }
    std::fs::create_dir_all(&opts.out).with_context(|| format!("cannot create {}", opts.out.display()))?;

    let expected = |r: &Resolved, seed: u64| {
        let mut v = r.resolved.clone();
        v["seed"] = json!(seed);
        v
    };
    let mut results: Vec<Vec<Option<RunResult>>> = vec![vec![None; opts.seeds.len()]; resolved.len()];
    let mut queue = VecDeque::new();
    for (i, r) in resolved.iter().enumerate() {
        for (j, &seed) in opts.seeds.iter().enumerate() {
            match finished_run(&r.run_dir(seed), &expected(r, seed)) {
                Some(summary) => {
                    results[i][j] = Some(result_from(&summary, seed, r.run_dir(seed), r.log(seed), "reused"));
                }
                None => queue.push_back((i, j)),
            }
        }
    }
    let total = queue.len();
    let reused = resolved.len() * opts.seeds.len() - total;
    tracing::info!(
        "stability benchmark: {} entries x {} seeds; {reused} finished runs reused, {total} to train, {} at a time, in {}",
        resolved.len(),
        opts.seeds.len(),
        opts.jobs.max(1),
        opts.out.display()
    );
    let queue = Mutex::new(queue);
    let finished = Mutex::new(Vec::new());
    let (queue, done, resolved_ref, expected) = (&queue, &finished, &resolved, &expected);
    std::thread::scope(|scope| {
        for _ in 0..opts.jobs.max(1).min(total.max(1)) {
            // The queue's lock is released before a run starts (inside `next`).
            let next = || queue.lock().ok().and_then(|mut q| q.pop_front());
            scope.spawn(move || {
                while let Some((i, j)) = next() {
                    if crate::train::stop_requested() {
                        break;
                    }
                    let r = &resolved_ref[i];
                    let seed = opts.seeds[j];
                    let t = Instant::now();
                    let result = run_child(r, seed, &expected(r, seed), opts);
                    if let Ok(mut d) = done.lock() {
                        let n = d.len() + 1;
                        match &result.error {
                            None => tracing::info!(
                                "[{n}/{total}] {} {} seed {seed}: {} in {:.1}s",
                                r.data,
                                r.entry.name,
                                result.status,
                                t.elapsed().as_secs_f64()
                            ),
                            Some(e) => tracing::warn!(
                                "[{n}/{total}] {} {} seed {seed} failed: {e} (log: {})",
                                r.data,
                                r.entry.name,
                                result.log.display()
                            ),
                        }
                        d.push((i, j, result));
                    }
                }
            });
        }
    });
    for (i, j, result) in finished.into_inner().unwrap_or_default() {
        results[i][j] = Some(result);
    }
    let entries: Vec<EntryResult> = resolved
        .into_iter()
        .zip(results)
        .map(|(r, runs)| {
            let runs: Vec<RunResult> = runs
                .into_iter()
                .zip(&opts.seeds)
                .map(|(run, &seed)| {
                    run.unwrap_or_else(|| RunResult {
                        seed,
                        run_dir: r.run_dir(seed),
                        log: r.log(seed),
                        status: "failed".into(),
                        error: Some("not run (the benchmark was interrupted)".into()),
                        modes_captured: f64::NAN,
                        high_quality_share: f64::NAN,
                        reverse_kl: f64::NAN,
                        steps_per_s: f64::NAN,
                    })
                })
                .collect();
            let aggregate = aggregate(&runs);
            let meets_goal = (r.data == "grid").then(|| {
                meets_goal(
                    aggregate.modes_captured,
                    aggregate.high_quality_percent,
                    aggregate.reverse_kl,
                )
            });
            EntryResult {
                name: r.entry.name,
                data: r.data,
                pipeline: r.entry.pipeline,
                set: r.overrides,
                runs,
                aggregate,
                meets_goal,
            }
        })
        .collect();
    let results = StabilityResults {
        seeds: opts.seeds.clone(),
        steps: opts.steps,
        goal: json!({
            "data": "grid",
            "modes_captured_at_least": GOAL_MODES,
            "high_quality_percent_at_least": GOAL_HIGH_QUALITY_PERCENT,
            "reverse_kl_at_most": GOAL_REVERSE_KL,
        }),
        entries,
        published: PUBLISHED.to_vec(),
        published_source: PUBLISHED_SOURCE,
    };
    write_json(&opts.out.join("results.json"), &results)?;
    let md = opts.out.join("results.md");
    std::fs::write(&md, markdown(&results)).with_context(|| format!("cannot write {}", md.display()))?;
    Ok(results)
}

fn number_of_modes(data: &str) -> usize {
    if data == "grid" {
        25
    } else {
        8
    }
}

/// The markdown tables of `results`: one per data source (ring, then grid), the entries in order,
/// then the published rows; the grid's table says whether each entry meets the goal. Failed runs
/// are listed below with their logs.
pub fn markdown(results: &StabilityResults) -> String {
    let mut s = String::new();
    let seeds: Vec<String> = results.seeds.iter().map(u64::to_string).collect();
    let _ =
        writeln!(
        s,
        "Stability benchmark: mean ± standard error over seeds {}{}; reverse KL in nats, over the seeds where it is \
         defined (a run that captures no mode has none).\n",
        seeds.join(", "),
        results.steps.map(|n| format!("; {n} training steps per run")).unwrap_or_default()
    );
    for data in DATA_SOURCES {
        let rows: Vec<&EntryResult> = results.entries.iter().filter(|e| e.data == data).collect();
        if rows.is_empty() {
            continue;
        }
        let grid = data == "grid";
        let _ = writeln!(s, "### {data} ({} modes)\n", number_of_modes(data));
        let goal = format!(
            " meets goal (≥ {GOAL_MODES} modes, ≥ {GOAL_HIGH_QUALITY_PERCENT}% high quality, reverse KL ≤ {GOAL_REVERSE_KL}) |"
        );
        let _ = writeln!(
            s,
            "| data | entry | modes captured | high-quality samples (%) | reverse KL | steps/s | seeds |{}",
            if grid { goal.as_str() } else { "" }
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|{}", if grid { "---|" } else { "" });
        for e in rows {
            let a = &e.aggregate;
            let goal_cell = match e.meets_goal {
                Some(true) => " yes |",
                Some(false) => " no |",
                None => "",
            };
            let seeds_cell = if a.seeds_finished == a.seeds {
                a.seeds.to_string()
            } else {
                format!("{} of {} finished", a.seeds_finished, a.seeds)
            };
            if a.seeds_finished == 0 {
                let _ = writeln!(
                    s,
                    "| {data} | {} | (no finished run) | | | | {seeds_cell} |{goal_cell}",
                    e.name
                );
                continue;
            }
            let _ = writeln!(
                s,
                "| {data} | {} | {} | {} | {} | {} | {seeds_cell} |{goal_cell}",
                e.name,
                format_stat(a.modes_captured, 2),
                format_stat(a.high_quality_percent, 1),
                format_kl(a.reverse_kl, a.seeds_finished),
                format_stat(a.steps_per_s, 0),
            );
        }
        for p in PUBLISHED.iter().filter(|p| p.data == data) {
            let _ = writeln!(
                s,
                "| {data} | published {} (PacGAN paper) | {:.1} ± {:.1} | {:.1} ± {:.1} | {:.2} ± {:.2} | | {} |{}",
                p.name,
                p.modes_captured.0,
                p.modes_captured.1,
                p.high_quality_percent.0,
                p.high_quality_percent.1,
                p.reverse_kl.0,
                p.reverse_kl.1,
                p.trials,
                if grid { " |" } else { "" }
            );
        }
        s.push('\n');
    }
    let _ = writeln!(s, "Published rows: {PUBLISHED_SOURCE}.");
    let failures: Vec<_> = results.failures().collect();
    if !failures.is_empty() {
        let _ = writeln!(s, "\nFailed runs:");
        for (e, r) in failures {
            let _ = writeln!(
                s,
                "- {} {} seed {}: {} (log: {})",
                e.data,
                e.name,
                r.seed,
                r.error.as_deref().unwrap_or("failed"),
                r.log.display()
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn mean_and_standard_error_by_hand() {
        // [7, 8, 6]: mean 7; sample variance ((0)² + 1² + (-1)²) / 2 = 1; s.e. = √(1/3) = 0.5773502691896258.
        let s = mean_se(&[7.0, 8.0, 6.0]);
        assert_eq!(s.n, 3);
        assert!(close(s.mean, 7.0));
        assert!(close(s.se, 0.577_350_269_189_625_8), "{}", s.se);
        // [0.2, 0.4]: mean 0.3; variance (0.01 + 0.01) / 1 = 0.02; s.e. = √(0.02 / 2) = 0.1.
        let s = mean_se(&[0.2, 0.4]);
        assert!(close(s.mean, 0.3) && close(s.se, 0.1), "{s:?}");
        // One value: no spread.
        let s = mean_se(&[2.5]);
        assert_eq!((s.mean, s.se, s.n), (2.5, 0.0, 1));
    }

    #[test]
    fn undefined_values_are_left_out() {
        // The NaN (a run that captured no mode) is skipped: the stat of [1.0, 1.4] is mean 1.2,
        // s.e. √(((-0.2)² + 0.2²) / 1 / 2) = 0.2, over 2 values.
        let s = mean_se(&[1.0, f64::NAN, 1.4]);
        assert_eq!(s.n, 2);
        assert!(close(s.mean, 1.2) && close(s.se, 0.2), "{s:?}");
        assert_eq!(format_kl(s, 3), "1.20 ± 0.20 (2 of 3 seeds)");
        assert_eq!(format_kl(s, 2), "1.20 ± 0.20");
        let none = mean_se(&[f64::NAN, f64::NAN]);
        assert_eq!(none.n, 0);
        assert!(none.mean.is_nan());
        assert_eq!(format_kl(none, 2), "undefined (no mode captured)");
        assert_eq!(mean_se(&[]).n, 0);
    }

    fn run(seed: u64, modes: f64, share: f64, kl: f64, status: &str) -> RunResult {
        RunResult {
            seed,
            run_dir: PathBuf::from(format!("seed-{seed}")),
            log: PathBuf::from(format!("seed-{seed}.log")),
            status: status.into(),
            error: (status == "failed").then(|| "boom".to_string()),
            modes_captured: modes,
            high_quality_share: share,
            reverse_kl: kl,
            steps_per_s: 100.0 + seed as f64,
        }
    }

    #[test]
    fn aggregates_finished_runs_in_percent() {
        let runs = [
            run(0, 25.0, 0.96, 0.02, "completed"),
            run(1, 25.0, 0.98, 0.04, "reused"),
            run(2, f64::NAN, f64::NAN, f64::NAN, "failed"),
        ];
        let a = aggregate(&runs);
        assert_eq!((a.seeds_finished, a.seeds), (2, 3));
        assert!(close(a.modes_captured.mean, 25.0) && close(a.modes_captured.se, 0.0));
        // 96 % and 98 %: mean 97, s.e. √((1 + 1) / 1 / 2) = 1.
        assert!(close(a.high_quality_percent.mean, 97.0) && close(a.high_quality_percent.se, 1.0));
        // 0.02 and 0.04: mean 0.03, s.e. 0.01.
        assert!(close(a.reverse_kl.mean, 0.03) && close(a.reverse_kl.se, 0.01));
        assert!(close(a.steps_per_s.mean, 100.5));
        assert!(meets_goal(a.modes_captured, a.high_quality_percent, a.reverse_kl));
        let worse = mean_se(&[0.05]);
        assert!(!meets_goal(a.modes_captured, a.high_quality_percent, worse));
        assert!(!meets_goal(a.modes_captured, mean_se(&[0.9]), a.reverse_kl));
        assert!(!meets_goal(
            a.modes_captured,
            a.high_quality_percent,
            mean_se(&[f64::NAN])
        ));
    }

    #[test]
    fn published_rows_match_the_paper() {
        // PacGAN (Lin et al. 2018), 10 trials: ring GAN 6.3 ± 0.5 / 98.2 ± 0.2 / 0.45 ± 0.09, PacGAN2
        // 7.9 ± 0.1 / 95.6 ± 2.0 / 0.07 ± 0.03; grid GAN 17.3 ± 0.8 / 94.8 ± 0.7 / 0.70 ± 0.07, PacGAN4
        // 24.8 ± 0.2 / 93.6 ± 0.6 / 0.04 ± 0.01. The published PacGAN4 grid row does not meet the goal.
        let grid4 = PUBLISHED
            .iter()
            .find(|p| p.data == "grid" && p.name == "PacGAN4")
            .unwrap();
        assert_eq!(grid4.modes_captured, (24.8, 0.2));
        let stat = |m: f64| Stat {
            mean: m,
            se: 0.0,
            n: 10,
        };
        assert!(!meets_goal(
            stat(grid4.modes_captured.0),
            stat(grid4.high_quality_percent.0),
            stat(grid4.reverse_kl.0)
        ));
        assert_eq!(PUBLISHED.iter().filter(|p| p.data == "ring").count(), 2);
    }

    #[test]
    fn markdown_groups_by_data_with_published_rows_and_failures() {
        let entry = |name: &str, data: &str, runs: Vec<RunResult>| {
            let aggregate = aggregate(&runs);
            EntryResult {
                name: name.into(),
                data: data.into(),
                pipeline: PathBuf::from("p.toml"),
                set: vec![],
                meets_goal: (data == "grid").then(|| {
                    meets_goal(
                        aggregate.modes_captured,
                        aggregate.high_quality_percent,
                        aggregate.reverse_kl,
                    )
                }),
                runs,
                aggregate,
            }
        };
        let results = StabilityResults {
            seeds: vec![0, 1],
            steps: Some(30),
            goal: json!({}),
            entries: vec![
                entry(
                    "pacgan4",
                    "grid",
                    vec![
                        run(0, 25.0, 0.96, 0.02, "completed"),
                        run(1, 25.0, 0.98, 0.04, "completed"),
                    ],
                ),
                entry(
                    "gan",
                    "ring",
                    vec![
                        run(0, 7.0, 0.5, f64::NAN, "completed"),
                        run(1, 0.0, 0.0, f64::NAN, "failed"),
                    ],
                ),
            ],
            published: PUBLISHED.to_vec(),
            published_source: PUBLISHED_SOURCE,
        };
        let md = markdown(&results);
        let ring = md.find("### ring (8 modes)").unwrap();
        let grid = md.find("### grid (25 modes)").unwrap();
        assert!(ring < grid, "{md}");
        assert!(md.contains(
            "| ring | gan | 7.00 ± 0.00 | 50.0 ± 0.0 | undefined (no mode captured) | 100 ± 0 | 1 of 2 finished |"
        ));
        assert!(
            md.contains("| grid | pacgan4 | 25.00 ± 0.00 | 97.0 ± 1.0 | 0.03 ± 0.01 | 100 ± 0 | 2 | yes |"),
            "{md}"
        );
        assert!(
            md.contains("| ring | published PacGAN2 (PacGAN paper) | 7.9 ± 0.1 | 95.6 ± 2.0 | 0.07 ± 0.03 | | 10 |")
        );
        assert!(md.contains("| grid | published GAN (PacGAN paper) | 17.3 ± 0.8 | 94.8 ± 0.7 | 0.70 ± 0.07 | | 10 | |"));
        assert!(md.contains("- ring gan seed 1: boom (log: seed-1.log)"), "{md}");
        let json = serde_json::to_value(&results).unwrap();
        assert!(json["entries"][1]["runs"][0]["reverse_kl"].is_null());
        assert!(json["entries"][1]["meets_goal"].is_null());
    }

    #[test]
    fn suite_files_resolve_pipelines_beside_them() {
        let dir = std::env::temp_dir().join(format!("nash-bench-suite-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.toml");
        std::fs::write(
            &path,
            "[[entry]]\nname = \"pacgan4\"\npipeline = \"quick_grid.toml\"\nset = [\"model.discriminator.layers[0].samples=4\"]\n\n[[entry]]\nname = \"gan\"\npipeline = \"quick_grid.toml\"\n",
        )
        .unwrap();
        let entries = read_suite(&path).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].pipeline, dir.join("quick_grid.toml"));
        assert_eq!(
            entries[0].set,
            vec!["model.discriminator.layers[0].samples=4".to_string()]
        );
        assert!(entries[1].set.is_empty());
        std::fs::write(&path, "[[entry]]\nname = \"x\"\npipline = \"a.toml\"\n").unwrap();
        let err = read_suite(&path).unwrap_err().to_string();
        assert!(err.contains("pipline") && err.contains("[[entry]]"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(check_name("bad/name").is_err() && check_name("..").is_err() && check_name("sn_r1").is_ok());
        assert_eq!(
            entry_for_pipeline(Path::new("examples/stability/quick_ring.toml")).name,
            "quick_ring"
        );
    }
}
