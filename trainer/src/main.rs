//! `nash`: train autoencoders and GANs from pipeline files, with plugins loaded at run time.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use nash_core::registry::TypeInfo;
use nash_core::serde_json::{self, json};
use nash_core::tracing;
use nash_trainer::validate::{exit, exit_code};
use nash_trainer::{progress::LogWriter, Override, PipelineSource, PluginSet, RunOptions};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Train autoencoders and GANs from pipeline files; every model, loss, optimizer, stabilizer,
/// data source and metric is a plugin.
#[derive(Parser, Debug)]
#[command(
    name = "nash",
    version,
    about,
    propagate_version = true,
    after_help = "Exit codes: 0 ok, 1 other failure (an output folder that cannot be written), 2 usage, \
                  3 invalid pipeline (syntax, types, ranges, wiring), 4 data file missing or truncated, \
                  5 plugin library missing or refused, 6 training failed (non-finite loss, step error), \
                  101 internal error (a bug: please report it), 130 interrupted."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr (filter with RUST_LOG, default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Only warnings and errors, no progress bar.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Load this plugin library too (repeatable), besides those beside the executable, on
    /// NASH_PLUGIN_PATH and in the pipeline's `plugins` list.
    #[arg(long = "plugin", value_name = "LIB", global = true)]
    plugins: Vec<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a pipeline (without one: the embedded ring GAN example).
    Train(TrainArgs),
    /// List every registered type: kind, tag, plugin, summary and config fields with defaults.
    Plugins(PluginsArgs),
    /// Regenerate a run folder's metrics.csv, curves/ and self-contained index.html.
    Report(ReportArgs),
    /// Check a pipeline without training: report every error at once (exit code 3 if any).
    Validate(ValidateArgs),
    /// Scaffold a plugin crate inside the nash workspace (one example loss, a test, a pipeline).
    NewPlugin(NewPluginArgs),
    /// Continue a run from its newest complete checkpoint (appends to its metrics).
    Resume(ResumeArgs),
    /// Draw samples from a checkpoint (or a run's newest one) into a PNG picture or an .npy array.
    Sample(SampleArgs),
    /// Run the pipeline's held-out evaluation and metrics on a checkpoint (or a run's newest one).
    Eval(EvalArgs),
    /// Build or list nash's own feature networks (the classifier behind FID, KID, precision/recall).
    Features(FeaturesArgs),
    /// Benchmarks: `nash bench stability` trains pipelines on the 2-D ring and grid over seeds;
    /// `nash bench speed` times the reference workloads' training steps and peak memory.
    Bench(BenchArgs),
}

#[derive(clap::Args, Debug)]
struct ResumeArgs {
    /// The run folder.
    run_dir: PathBuf,
    /// Train to this many steps in all (default: the run's `training.steps`).
    #[arg(long)]
    steps: Option<u64>,
    /// Threads of the compute pool (replaces `training.threads`; at least 1).
    #[arg(long)]
    threads: Option<std::num::NonZeroUsize>,
}

#[derive(clap::Args, Debug)]
struct SampleArgs {
    /// A checkpoint folder (`<run>/checkpoints/step-XXXXXXXX`) or a run folder.
    checkpoint: PathBuf,
    /// Number of samples.
    #[arg(long, default_value_t = 64)]
    count: usize,
    /// Seed of the latent codes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The output file: `.png` (a grid or a scatter plot) or `.npy` (`[count, ...sample shape]`, f32).
    #[arg(long, value_name = "FILE", default_value = "samples.png")]
    out: PathBuf,
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    #[command(subcommand)]
    benchmark: Benchmark,
}

#[derive(Subcommand, Debug)]
enum Benchmark {
    /// The stability benchmark (PacGAN's 2-D protocol): each entry (a pipeline on the `ring` or
    /// `grid` data source, with overrides) trained over seeds, as child processes `nash train`;
    /// prints modes captured, high-quality samples and reverse KL as mean ± standard error beside
    /// the published PacGAN rows, and writes DIR/results.json and DIR/results.md. Finished runs
    /// are reused and interrupted ones continue from their newest checkpoint, so an interrupted
    /// benchmark resumes.
    Stability(StabilityArgs),
    /// The speed benchmark (issue 7): training steps per second (min and median of several timed
    /// runs) and peak memory of the reference workloads of examples/speed/ (the dense autoencoder,
    /// the MLP GAN, the 28x28 DCGAN), each measurement in its own child process, beside the
    /// single-core peak of a 1024x1024x1024 f32 matrix product; `--curve` measures steps per second
    /// against batch size (16 to 1024) and width (0.5 to 4).
    Speed(SpeedArgs),
    /// One measurement of `nash bench speed`, printed as a JSON line (run by `nash bench speed`).
    #[command(hide = true)]
    SpeedChild(SpeedChildArgs),
    /// The round trip of a cache line between the first two CPUs this process may run on (pin
    /// them with `taskset -c`): the cost of every hand-off between compute threads. On virtual
    /// machines it can double or triple for seconds to minutes at a time, and multi-thread
    /// training slows with it; `bench/run.sh` probes it around each multi-thread measurement.
    Cores(CoresArgs),
    /// The convolution products of the 28x28 DCGAN, each timed through column matrices (im2col /
    /// col2im and gemm) and through the fastest route (implicit GEMM where the CPU has AVX-512),
    /// interleaved in one process: milliseconds per call, the speedup and GFLOP/s.
    Conv(ConvArgs),
}

#[derive(clap::Args, Debug)]
struct ConvArgs {
    /// Threads of the compute pool.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Samples per call.
    #[arg(long, default_value_t = nash_trainer::bench_speed::DEFAULT_BATCH)]
    batch: usize,
    /// Timed rounds per route (after one untimed round).
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Calls per round.
    #[arg(long, default_value_t = 3)]
    calls: usize,
    /// Print the timings as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct CoresArgs {
    /// How long to measure, in milliseconds (in windows of 10 ms).
    #[arg(long, default_value_t = 200)]
    millis: u64,
    /// Print the measurement as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct SpeedArgs {
    /// A workload to measure (repeatable; default: all).
    #[arg(long = "workload", value_enum)]
    workloads: Vec<nash_trainer::bench_speed::Workload>,
    /// Thread counts of the compute pool, each measured on its own.
    #[arg(long, value_name = "N,N,...", value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Batch sizes (1 to 1024).
    #[arg(long = "batch", value_name = "B,B,...", value_delimiter = ',', default_value = "64")]
    batches: Vec<usize>,
    /// Multipliers of every hidden width.
    #[arg(long = "width", value_name = "W,W,...", value_delimiter = ',', default_value = "1")]
    widths: Vec<f64>,
    /// Untimed steps before the timed runs.
    #[arg(long, default_value_t = 20)]
    warmup: u64,
    /// Steps per timed run (default: as many as last about half a second).
    #[arg(long)]
    steps: Option<u64>,
    /// Timed runs per measurement.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// The cost curve: batch 16 to 1024 at width 1 and width 0.5, 1, 2, 4 at batch 64 (replaces
    /// --batch and --width).
    #[arg(long)]
    curve: bool,
    /// Print the records as a JSON array instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write the records as a JSON array to this file.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct SpeedChildArgs {
    /// The workload.
    #[arg(long, value_enum, required_unless_present = "matmul")]
    workload: Option<nash_trainer::bench_speed::Workload>,
    /// Time products of two square matrices of this side instead of a workload.
    #[arg(long, value_name = "N", conflicts_with = "workload")]
    matmul: Option<usize>,
    /// Threads of the compute pool.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Samples per step.
    #[arg(long, default_value_t = nash_trainer::bench_speed::DEFAULT_BATCH)]
    batch: usize,
    /// Multiplier of every hidden width.
    #[arg(long, default_value_t = 1.0)]
    width: f64,
    /// Untimed steps first.
    #[arg(long, default_value_t = 20)]
    warmup: u64,
    /// Steps per timed run (default: calibrated).
    #[arg(long)]
    steps: Option<u64>,
    /// Timed runs.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
}

#[derive(clap::Args, Debug)]
struct StabilityArgs {
    /// Pipeline files, each an entry named after its file's stem.
    pipelines: Vec<PathBuf>,
    /// A suite file: `[[entry]]` tables with `name`, `pipeline` (relative to the suite) and
    /// optionally `set = ["path=value", ...]` (examples/stability/quick.toml).
    #[arg(long, value_name = "FILE")]
    suite: Option<PathBuf>,
    /// Seeds 0..N.
    #[arg(long, value_name = "N", default_value_t = nash_trainer::bench::DEFAULT_SEEDS, conflicts_with = "seed_list")]
    seeds: u64,
    /// These seeds instead of 0..N: `--seed-list 0,1,2`.
    #[arg(long, value_name = "S,S,...", value_delimiter = ',')]
    seed_list: Option<Vec<u64>>,
    /// Replaces every pipeline's `training.steps`.
    #[arg(long)]
    steps: Option<u64>,
    /// Runs at a time (default: the number of available cores); each run uses one thread.
    #[arg(long, value_name = "J")]
    jobs: Option<usize>,
    /// The benchmark folder: run folders `<data>/<entry>/seed-<s>` (logs beside them), results.json, results.md.
    #[arg(long, value_name = "DIR", default_value = "runs/stability")]
    out: PathBuf,
    /// Override a value of every entry's pipeline, after the entry's own overrides.
    #[arg(long = "set", value_name = "PATH=VALUE", value_parser = checked_override)]
    set: Vec<String>,
    /// Print results.json instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct EvalArgs {
    /// A checkpoint folder (`<run>/checkpoints/step-XXXXXXXX`) or a run folder.
    checkpoint: PathBuf,
    /// Override a value of the run's resolved pipeline before evaluating, as for `nash train`
    /// (`--set 'metrics=[{ type = "sample_quality" }]'` adds metrics the run was not trained with).
    #[arg(long = "set", value_name = "PATH=VALUE")]
    set: Vec<Override>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct FeaturesArgs {
    #[command(subcommand)]
    action: FeaturesAction,
}

#[derive(Subcommand, Debug)]
enum FeaturesAction {
    /// Train a classifier pipeline (default: the embedded examples/fashion_classifier.toml), score
    /// it on the whole test split and cache its weights with their SHA-256 under
    /// <cache>/features/<name>/; does nothing when a valid entry exists (unless --force).
    Build(FeaturesBuildArgs),
    /// List the cached feature networks and re-check their checksums (exit code 4 if one is corrupt).
    List(FeaturesListArgs),
}

#[derive(clap::Args, Debug)]
struct FeaturesBuildArgs {
    /// The classifier pipeline (default: the embedded examples/fashion_classifier.toml).
    #[arg(long, value_name = "FILE")]
    pipeline: Option<PathBuf>,
    /// The network's name (default: the pipeline's name).
    #[arg(long)]
    name: Option<String>,
    /// The cache folder (default: $NASH_CACHE_DIR, else $XDG_CACHE_HOME/nash, else ~/.cache/nash).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Override a pipeline value, as for `nash train`.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    set: Vec<Override>,
    /// Replaces `training.steps`.
    #[arg(long)]
    steps: Option<u64>,
    /// Rebuild even if a valid entry exists.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args, Debug)]
struct FeaturesListArgs {
    /// The cache folder (default: $NASH_CACHE_DIR, else $XDG_CACHE_HOME/nash, else ~/.cache/nash).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct ValidateArgs {
    /// The pipeline file (`.toml` or `.json`).
    pipeline: PathBuf,
    /// Override a pipeline value before it is checked, as for `nash train`.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    set: Vec<Override>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct NewPluginArgs {
    /// The plugin's name: lowercase letters, digits, `_`, `-` (its types are tagged `<name>_...`).
    name: String,
    /// Where the crate `plugin-<name>` is created; must be inside the nash workspace.
    #[arg(long, value_name = "DIR", default_value = "plugins")]
    dir: PathBuf,
    /// Also add the crate to `members` in the workspace's root `Cargo.toml`.
    #[arg(long)]
    add_to_workspace: bool,
}

#[derive(clap::Args, Debug)]
struct TrainArgs {
    /// The pipeline file (`.toml` or `.json`).
    pipeline: Option<PathBuf>,
    /// Override a pipeline value before it is read: `--set training.steps=500`,
    /// `--set 'stabilizers[0].clip=0.01'` (the value is a TOML literal, else a string).
    #[arg(long = "set", value_name = "PATH=VALUE")]
    set: Vec<Override>,
    /// The run folder (default: `training.out_dir`, else `runs/<name>-<YYYYmmdd-HHMMSS>`).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Replaces the pipeline's seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Replaces `training.steps`.
    #[arg(long)]
    steps: Option<u64>,
    /// Threads of the compute pool (replaces `training.threads`; at least 1).
    #[arg(long)]
    threads: Option<std::num::NonZeroUsize>,
}

#[derive(clap::Args, Debug)]
struct ReportArgs {
    /// The run folder (it holds metrics.jsonl, summary.json, pipeline.resolved.json).
    run_dir: PathBuf,
}

#[derive(clap::Args, Debug)]
struct PluginsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    action: Option<PluginsAction>,
}

#[derive(Subcommand, Debug)]
enum PluginsAction {
    /// Show one type (every kind that has this tag).
    Show {
        /// The `type = "..."` tag.
        tag: String,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn init_logging(format: LogFormat, quiet: bool) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(if quiet { "warn" } else { "info" }));
    let ansi = std::io::stderr().is_terminal();
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(LogWriter)
                    .with_ansi(ansi)
                    .with_target(false),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json().with_writer(LogWriter))
            .try_init(),
    };
    if let Err(e) = result {
        eprintln!("warning: logging is not available: {e}");
    }
}

fn train(cli: &Cli, args: &TrainArgs) -> anyhow::Result<()> {
    let source = match &args.pipeline {
        Some(path) => PipelineSource::from_file(path).context("cannot read the pipeline")?,
        None => {
            tracing::info!("no pipeline given: training the embedded example (examples/ring_gan.toml)");
            nash_trainer::default_pipeline_source()
        }
    };
    let opts = RunOptions {
        out_dir: args.out.clone(),
        seed: args.seed,
        steps: args.steps,
        threads: args.threads.map(std::num::NonZeroUsize::get),
        progress: !cli.quiet,
    };
    nash_trainer::train::install_signal_handler()?;
    let summary = nash_trainer::run_training(source, &args.set, &cli.plugins, &opts)?;
    finish_training(cli, &summary)
}

/// Prints where the summary is, or returns [`nash_trainer::train::Interrupted`] (exit code 130).
fn finish_training(cli: &Cli, summary: &nash_trainer::Summary) -> anyhow::Result<()> {
    if summary.status == "interrupted" {
        return Err(nash_trainer::train::Interrupted {
            run_dir: summary.run_dir.clone(),
            step: summary.steps,
        }
        .into());
    }
    if cli.quiet {
        return Ok(());
    }
    print_out(&format!("{}\n", summary.run_dir.join("summary.json").display()))
}

fn resume(cli: &Cli, args: &ResumeArgs) -> anyhow::Result<()> {
    let opts = RunOptions {
        steps: args.steps,
        threads: args.threads.map(std::num::NonZeroUsize::get),
        progress: !cli.quiet,
        ..RunOptions::default()
    };
    nash_trainer::train::install_signal_handler()?;
    let summary = nash_trainer::train::resume(&args.run_dir, &cli.plugins, &opts)?;
    finish_training(cli, &summary)
}

fn sample(cli: &Cli, args: &SampleArgs) -> anyhow::Result<()> {
    nash_trainer::train::sample(&args.checkpoint, args.count, args.seed, &args.out, &cli.plugins)?;
    if cli.quiet {
        return Ok(());
    }
    print_out(&format!("{}\n", args.out.display()))
}

fn eval(cli: &Cli, args: &EvalArgs) -> anyhow::Result<()> {
    let e = nash_trainer::train::evaluate(&args.checkpoint, &args.set, &cli.plugins)?;
    if args.json {
        return print_out(&(serde_json::to_string_pretty(&e)? + "\n"));
    }
    let mut text = format!("step {}\n", e.evaluation.step);
    for (k, v) in e.evaluation.eval.iter().chain(&e.evaluation.metrics) {
        let _ = writeln!(text, "  {k}: {v}");
    }
    for (metric, entries) in &e.metric_provenance {
        let list: Vec<String> = entries.iter().map(|(k, v)| format!("{k} = {v}")).collect();
        let _ = writeln!(text, "  ({metric}: {})", list.join(", "));
    }
    print_out(&text)
}

/// An override as written, once it parses (the runs get it as written).
fn checked_override(s: &str) -> Result<String, String> {
    s.parse::<Override>().map(|_| s.to_string())
}

fn bench(cli: &Cli, args: &BenchArgs) -> anyhow::Result<()> {
    match &args.benchmark {
        Benchmark::Stability(args) => bench_stability(cli, args),
        Benchmark::Speed(args) => bench_speed(cli, args),
        Benchmark::SpeedChild(args) => bench_speed_child(cli, args),
        Benchmark::Cores(args) => bench_cores(args),
        Benchmark::Conv(args) => bench_conv(args),
    }
}

/// `nash bench conv`: the DCGAN's convolution products by route.
fn bench_conv(args: &ConvArgs) -> anyhow::Result<()> {
    use nash_trainer::bench_conv;
    if args.batch == 0 || args.rounds == 0 || args.calls == 0 {
        anyhow::bail!("--batch, --rounds and --calls must be at least 1");
    }
    let timings = nash_trainer::threads::on_pool(Some(args.threads), || {
        bench_conv::measure(args.batch, args.rounds, args.calls)
    })?;
    if args.json {
        return print_out(&(serde_json::to_string(&timings)? + "\n"));
    }
    print_out(&bench_conv::render(&timings, args.batch, args.threads))
}

/// `nash bench cores`: one probe of the link between two CPUs.
fn bench_cores(args: &CoresArgs) -> anyhow::Result<()> {
    let link = nash_trainer::bench_cores::measure(std::time::Duration::from_millis(args.millis))?;
    if args.json {
        return print_out(&(serde_json::to_string(&link)? + "\n"));
    }
    print_out(&format!(
        "CPU {} <-> CPU {}: {:.0} ns per round trip (median of {} windows)\n",
        link.cpus[0],
        link.cpus[1],
        link.round_trip_ns,
        link.windows_ns.len()
    ))
}

/// `nash bench speed`: the table (or `--json`), and `--out`.
fn bench_speed(cli: &Cli, args: &SpeedArgs) -> anyhow::Result<()> {
    use nash_trainer::bench_speed::{self, Workload};
    let opts = bench_speed::SpeedOptions {
        workloads: if args.workloads.is_empty() {
            Workload::ALL.to_vec()
        } else {
            args.workloads.clone()
        },
        threads: args.threads.clone(),
        batches: args.batches.clone(),
        widths: args.widths.clone(),
        warmup: args.warmup,
        steps: args.steps,
        repeats: args.repeats,
        curve: args.curve,
        extra_plugins: cli.plugins.clone(),
    };
    let records = bench_speed::run_speed(&opts)?;
    if let Some(path) = &args.out {
        bench_speed::write_records(path, &records)?;
    }
    if args.json {
        print_out(&(serde_json::to_string_pretty(&records)? + "\n"))
    } else {
        print_out(&bench_speed::table(&records, args.curve))
    }
}

/// `nash bench speed-child`: one measurement, its record as the last line of stdout.
fn bench_speed_child(cli: &Cli, args: &SpeedChildArgs) -> anyhow::Result<()> {
    use nash_trainer::bench_speed::{self, Measurement, Target};
    let target = match (args.workload, args.matmul) {
        (_, Some(size)) => Target::Matmul { size },
        (Some(workload), None) => Target::Workload {
            workload,
            batch: args.batch,
            width: args.width,
        },
        (None, None) => bail!("give --workload or --matmul"),
    };
    let m = Measurement {
        target,
        threads: args.threads,
        warmup: args.warmup,
        steps: args.steps,
        repeats: args.repeats,
    };
    let record = bench_speed::measure(&m, &cli.plugins)?;
    print_out(&(serde_json::to_string(&record)? + "\n"))
}

/// `nash bench stability`.
fn bench_stability(cli: &Cli, args: &StabilityArgs) -> anyhow::Result<()> {
    let mut entries = Vec::new();
    if let Some(suite) = &args.suite {
        entries.extend(nash_trainer::bench::read_suite(suite)?);
    }
    for p in &args.pipelines {
        entries.push(nash_trainer::bench::entry_for_pipeline(p));
    }
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if jobs == 0 {
        bail!("--jobs must be at least 1");
    }
    let opts = nash_trainer::bench::StabilityOptions {
        entries,
        seeds: args.seed_list.clone().unwrap_or_else(|| (0..args.seeds).collect()),
        steps: args.steps,
        jobs,
        out: args.out.clone(),
        set: args.set.clone(),
        extra_plugins: cli.plugins.clone(),
    };
    nash_trainer::train::install_signal_handler()?;
    let results = nash_trainer::bench::run_stability(&opts)?;
    if args.json {
        print_out(&(serde_json::to_string_pretty(&results)? + "\n"))?;
    } else {
        print_out(&nash_trainer::bench::markdown(&results))?;
    }
    let failed = results.failures().count();
    if nash_trainer::train::stop_requested() {
        bail!("interrupted: {failed} run(s) did not finish; run the same command again to resume");
    }
    if failed > 0 {
        return Err(nash_trainer::train::TrainingFailed::new(format!(
            "{failed} of {} runs failed (listed above, with their logs)",
            results.entries.len() * results.seeds.len()
        ))
        .into());
    }
    Ok(())
}

/// `nash features build|list`.
fn features(cli: &Cli, args: &FeaturesArgs) -> anyhow::Result<()> {
    use nash_trainer::features;
    match &args.action {
        FeaturesAction::Build(b) => {
            let opts = features::BuildOptions {
                pipeline: b.pipeline.clone(),
                name: b.name.clone(),
                cache_dir: b.cache_dir.clone(),
                overrides: b.set.clone(),
                steps: b.steps,
                force: b.force,
                extra_plugins: cli.plugins.clone(),
                progress: !cli.quiet,
            };
            if b.pipeline.is_none() {
                tracing::info!("no pipeline given: building the embedded examples/fashion_classifier.toml");
            }
            nash_trainer::train::install_signal_handler()?;
            let built = features::build(&opts)?;
            let e = &built.entry;
            let mut text = String::new();
            if built.trained {
                let _ = writeln!(text, "built feature network {} in {:.0} s", e.id, built.wall_time_s);
            } else {
                let _ = writeln!(
                    text,
                    "feature network {} is already built (checksum verified); --force rebuilds it",
                    e.id
                );
            }
            let _ = writeln!(
                text,
                "  test accuracy {:.4} on {} test samples, {} steps\n  {}",
                e.test_accuracy,
                e.test_samples,
                e.steps,
                built.dir.join(features::ENTRY_FILE).display()
            );
            print_out(&text)
        }
        FeaturesAction::List(l) => {
            let cache = l.cache_dir.clone().unwrap_or_else(nash_core::weights::cache_dir);
            let listed = features::list(&cache)?;
            if l.json {
                let all: Vec<serde_json::Value> = listed.iter().map(|x| x.to_json()).collect();
                print_out(&(serde_json::to_string_pretty(&all)? + "\n"))?;
            } else {
                let mut text = String::new();
                if listed.is_empty() {
                    let _ = writeln!(
                        text,
                        "no feature networks in {}; `nash features build` makes one",
                        features::features_root(&cache).display()
                    );
                }
                for x in &listed {
                    match &x.entry {
                        Ok(e) => {
                            let _ = writeln!(
                                text,
                                "{}  {}  accuracy {:.4} on {} test samples  ok\n  {}",
                                e.name,
                                e.id,
                                e.test_accuracy,
                                e.test_samples,
                                x.dir.display()
                            );
                        }
                        Err(message) => {
                            let _ = writeln!(text, "{}  {message}\n  {}", x.name, x.dir.display());
                        }
                    }
                }
                print_out(&text)?;
            }
            let bad: Vec<&str> = listed
                .iter()
                .filter(|x| x.entry.is_err())
                .map(|x| x.name.as_str())
                .collect();
            if bad.is_empty() {
                return Ok(());
            }
            Err(nash_core::Error::Data {
                path: features::features_root(&cache),
                message: format!(
                    "corrupt feature network(s): {}; rebuild with `nash features build --force --name <name>`",
                    bad.join(", ")
                ),
            }
            .into())
        }
    }
}

/// Writes `text` to stdout; a closed pipe (`nash plugins | head`) is not an error.
fn print_out(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("cannot write to stdout"),
        _ => Ok(()),
    }
}

/// `default` as one line, shortened to `max` characters.
fn short_json(value: &serde_json::Value, max: usize) -> String {
    let s = value.to_string();
    if s.chars().count() <= max {
        s
    } else {
        format!("{}...", s.chars().take(max.saturating_sub(3)).collect::<String>())
    }
}

fn write_table(out: &mut String, types: &[&TypeInfo]) {
    let width = |f: fn(&TypeInfo) -> &str, title: &str| {
        types
            .iter()
            .map(|t| f(t).chars().count())
            .max()
            .unwrap_or(0)
            .max(title.len())
    };
    let (wk, wt, wp) = (
        width(|t| t.kind.as_str(), "KIND"),
        width(|t| &t.tag, "TAG"),
        width(|t| &t.plugin, "PLUGIN"),
    );
    let _ = writeln!(out, "{:wk$}  {:wt$}  {:wp$}  SUMMARY", "KIND", "TAG", "PLUGIN");
    for t in types {
        let _ = writeln!(
            out,
            "{:wk$}  {:wt$}  {:wp$}  {}",
            t.kind.as_str(),
            t.tag,
            t.plugin,
            t.summary
        );
        for f in &t.fields {
            let _ = writeln!(
                out,
                "{:wk$}    {}: {} = {}",
                "",
                f.name,
                f.type_name(),
                short_json(&f.default, 80)
            );
        }
    }
}

/// `nash report <run-dir>`: writes metrics.csv, the curves and index.html; prints the report's path.
fn report(cli: &Cli, args: &ReportArgs) -> anyhow::Result<()> {
    let path = nash_trainer::report::finish_run_outputs(&args.run_dir)
        .with_context(|| format!("cannot write the report of {}", args.run_dir.display()))?;
    if cli.quiet {
        return Ok(());
    }
    print_out(&format!("{}\n", path.display()))
}

fn plugins(cli: &Cli, args: &PluginsArgs) -> anyhow::Result<()> {
    let set = PluginSet::load_all(&cli.plugins).context("cannot load plugins")?;
    let mut types: Vec<&TypeInfo> = set.registry.types().iter().collect();
    types.sort_by(|a, b| (a.kind, &a.tag).cmp(&(b.kind, &b.tag)));
    if let Some(PluginsAction::Show { tag }) = &args.action {
        types.retain(|t| &t.tag == tag);
        if types.is_empty() {
            let all: Vec<&str> = set.registry.types().iter().map(|t| t.tag.as_str()).collect();
            let hint = match nash_trainer::pipeline::suggest(tag, all.iter().copied()) {
                Some(s) => format!(" (did you mean `{s}`?)"),
                None => String::new(),
            };
            bail!("no registered type is tagged `{tag}`{hint}; `nash plugins` lists them all");
        }
    }
    let loaded: Vec<serde_json::Value> = set
        .plugins
        .iter()
        .map(|p| json!({"name": p.name, "version": p.version, "path": p.path}))
        .collect();
    if args.json {
        let out = match &args.action {
            Some(_) => serde_json::to_string_pretty(&types)?,
            None => serde_json::to_string_pretty(&json!({"plugins": loaded, "types": types}))?,
        };
        print_out(&(out + "\n"))?;
        return Ok(());
    }
    let mut text = String::new();
    match &args.action {
        Some(PluginsAction::Show { .. }) => {
            for t in types {
                let _ = writeln!(text, "{} `{}` (plugin {})", t.kind, t.tag, t.plugin);
                let _ = writeln!(text, "  {}", t.summary);
                let _ = writeln!(text, "  in a pipeline: {{ type = \"{}\", ... }}", t.tag);
                if t.fields.is_empty() {
                    let _ = writeln!(text, "  no config fields");
                }
                for f in &t.fields {
                    let _ = writeln!(text, "  {}: {} = {}", f.name, f.type_name(), f.default);
                }
            }
        }
        None => {
            write_table(&mut text, &types);
            text.push('\n');
            if set.plugins.is_empty() {
                let _ = writeln!(text, "no plugin libraries loaded (only nash-core's types)");
            }
            for p in &set.plugins {
                let _ = writeln!(text, "plugin {} {}: {}", p.name, p.version, p.path.display());
            }
        }
    }
    print_out(&text)
}

fn validate(cli: &Cli, args: &ValidateArgs) -> anyhow::Result<()> {
    let source = PipelineSource::from_file(&args.pipeline).context("cannot read the pipeline")?;
    let report = nash_trainer::validate::validate(source, &args.set, &cli.plugins);
    if args.json {
        print_out(&(serde_json::to_string_pretty(&report.to_json())? + "\n"))?;
    } else {
        print_out(&report.to_text())?;
    }
    if report.is_ok() {
        Ok(())
    } else {
        let n = report.errors.len();
        let errors = if n == 1 { "1 error" } else { "errors" };
        let count = if n == 1 { String::new() } else { format!("{n} ") };
        Err(nash_core::Error::config(report.pipeline.clone(), format!("{count}{errors}, listed above")).into())
    }
}

fn new_plugin(args: &NewPluginArgs) -> anyhow::Result<()> {
    let made = nash_trainer::scaffold::new_plugin(&args.name, &args.dir, args.add_to_workspace)
        .context("cannot scaffold the plugin")?;
    let mut text = format!("created {}\n", made.crate_dir.display());
    for f in &made.files {
        let _ = writeln!(text, "  {}", f.display());
    }
    if made.added_to_workspace {
        let _ = writeln!(
            text,
            "added to `members` in the workspace's Cargo.toml:\n{}",
            made.member_line
        );
    } else {
        let _ = writeln!(
            text,
            "add this line to `members` in the workspace's root Cargo.toml (or rerun with --add-to-workspace):\n{}",
            made.member_line
        );
    }
    let _ = writeln!(
        text,
        "then: cargo test -p {} && cargo build --workspace && ./target/debug/nash plugins",
        made.package
    );
    print_out(&text)
}

/// The message of the last panic, recorded by the panic hook.
static PANIC_MESSAGE: Mutex<Option<String>> = Mutex::new(None);

/// Sets glibc's allocator for training, before any thread starts; each setting is left to
/// `GLIBC_TUNABLES` where that sets it:
///
/// - Every thread's allocations stay in the main arena. A compute worker otherwise gets an arena
///   of its own, whose 64 MB heaps fragment depending on where the address-space layout puts them:
///   the 28x28 DCGAN at 1 thread peaked at 124 MB in about one process in ten (always, with
///   address randomization off) instead of 103-107 MB; with one arena every process peaked at 105
///   MB, at the same speed (docs/performance.md).
/// - Buffers up to 32 MiB come from the heap, which keeps up to 64 MiB of free memory at its top,
///   instead of glibc's dynamic threshold (from 128 KiB up to the largest buffer freed so far):
///   under it, each of the DCGAN's 3-4 MB buffers was mapped and unmapped per op, and its steps
///   ran 19% slower in page faults. These are the values the threshold had reached by itself
///   while the plugin loader read `libnash_core.so` whole (33 MB) and freed it; reading only what
///   it parses left the threshold low (2026-11-29).
fn configure_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        let settings = [
            ("arena_max", libc::M_ARENA_MAX, 1),
            ("mmap_threshold", libc::M_MMAP_THRESHOLD, 32 << 20),
            ("trim_threshold", libc::M_TRIM_THRESHOLD, 64 << 20),
        ];
        for (tunable, parameter, value) in settings {
            if !tunables.contains(tunable) {
                // SAFETY: mallopt only sets a parameter of the allocator; called before any other
                // thread exists.
                unsafe {
                    libc::mallopt(parameter, value);
                }
            }
        }
    }
}

fn main() -> ExitCode {
    configure_malloc();
    let cli = Cli::parse();
    init_logging(cli.log_format, cli.quiet);
    let show_backtrace = std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0");
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = match info.payload().downcast_ref::<&str>() {
            Some(s) => (*s).to_string(),
            None => info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "unknown panic".into()),
        };
        let location = info.location().map(|l| format!(" at {l}")).unwrap_or_default();
        if let Ok(mut slot) = PANIC_MESSAGE.lock() {
            *slot = Some(format!("{message}{location}"));
        }
        if show_backtrace {
            default_hook(info);
        }
    }));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &cli.command {
        Command::Train(args) => train(&cli, args),
        Command::Plugins(args) => plugins(&cli, args),
        Command::Report(args) => report(&cli, args),
        Command::Validate(args) => validate(&cli, args),
        Command::NewPlugin(args) => new_plugin(args),
        Command::Resume(args) => resume(&cli, args),
        Command::Sample(args) => sample(&cli, args),
        Command::Eval(args) => eval(&cli, args),
        Command::Features(args) => features(&cli, args),
        Command::Bench(args) => bench(&cli, args),
    }));
    let Ok(result) = result else {
        let message = PANIC_MESSAGE
            .lock()
            .ok()
            .and_then(|mut m| m.take())
            .unwrap_or_else(|| "unknown panic".into());
        eprintln!(
            "internal error (a bug in nash or a plugin): {message}, please report it (RUST_BACKTRACE=1 shows where)"
        );
        return ExitCode::from(exit::INTERNAL);
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<nash_trainer::train::Interrupted>() => {
            eprintln!("{e}");
            ExitCode::from(exit::INTERRUPTED)
        }
        Err(e) => {
            eprintln!("error: {e}");
            let mut previous = e.to_string();
            for cause in e.chain().skip(1) {
                // Errors that wrap an I/O error already quote its message.
                let text = cause.to_string();
                if !previous.contains(&text) {
                    eprintln!("  caused by: {text}");
                }
                previous = text;
            }
            ExitCode::from(exit_code(&e))
        }
    }
}
