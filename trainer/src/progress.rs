//! The training progress bar, and a log writer that keeps log lines from tearing it: while a bar is
//! shown, each log line is written with the bar suspended (cleared, then redrawn below the line).

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The bar currently on screen, if any.
static ACTIVE: Mutex<Option<ProgressBar>> = Mutex::new(None);

fn active() -> Option<ProgressBar> {
    ACTIVE
        .lock()
        .map(|g| g.clone())
        .unwrap_or_else(|p| p.into_inner().clone())
}

fn set_active(bar: Option<ProgressBar>) {
    match ACTIVE.lock() {
        Ok(mut g) => *g = bar,
        Err(p) => *p.into_inner() = bar,
    }
}

/// A `tracing-subscriber` writer to stderr that suspends the progress bar around each line.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match active() {
            Some(bar) if !bar.is_hidden() => bar.suspend(|| std::io::stderr().lock().write_all(buf))?,
            _ => std::io::stderr().lock().write_all(buf)?,
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> Self::Writer {
        LogWriter
    }
}

/// A step counter shown as a bar with live losses; hidden when disabled or when stderr is not a
/// terminal. Removed from the screen when dropped.
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar over `steps` steps, shown only if `enabled` and stderr is a terminal.
    pub fn new(steps: u64, enabled: bool) -> Self {
        let bar = if enabled && std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(steps), ProgressDrawTarget::stderr_with_hz(10));
            let style = ProgressStyle::with_template(
                "{spinner:.green} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} ({per_sec}, eta {eta}) {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        } else {
            ProgressBar::hidden()
        };
        set_active(Some(bar.clone()));
        Progress { bar }
    }

    /// Moves to `position` completed steps.
    pub fn set_position(&self, position: u64) {
        self.bar.set_position(position);
    }

    /// Replaces the text after the bar (the latest losses).
    pub fn set_message(&self, message: String) {
        if !self.bar.is_hidden() {
            self.bar.set_message(message);
        }
    }

    /// Whether the bar is drawn at all.
    pub fn is_visible(&self) -> bool {
        !self.bar.is_hidden()
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        set_active(None);
        self.bar.finish_and_clear();
    }
}
