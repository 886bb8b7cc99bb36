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
use nash_trainer::{progress::LogWriter, Override, PipelineSource, PluginSet, RunOptions};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Train autoencoders and GANs from pipeline files; every model, loss, optimizer, stabilizer,
/// data source and metric is a plugin.
#[derive(Parser, Debug)]
#[command(name = "nash", version, about, propagate_version = true)]
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
    /// Threads for matrix products (replaces `training.threads`).
    #[arg(long)]
    threads: Option<usize>,
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
        threads: args.threads,
        progress: !cli.quiet,
    };
    let summary = nash_trainer::run_training(source, &args.set, &cli.plugins, &opts)?;
    if cli.quiet {
        return Ok(());
    }
    print_out(&format!("{}\n", summary.run_dir.join("summary.json").display()))
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

/// The message of the last panic, recorded by the panic hook.
static PANIC_MESSAGE: Mutex<Option<String>> = Mutex::new(None);

fn main() -> ExitCode {
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
    }));
    let result = result.unwrap_or_else(|_| {
        let message = PANIC_MESSAGE
            .lock()
            .ok()
            .and_then(|mut m| m.take())
            .unwrap_or_else(|| "unknown panic".into());
        Err(anyhow::anyhow!(
            "internal error: {message}\nthis is a bug in nash or in a plugin; please report it (RUST_BACKTRACE=1 shows where)"
        ))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
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
            ExitCode::FAILURE
        }
    }
}
