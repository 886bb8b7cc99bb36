//! The training-health monitor (`[training.health]`): detectors fed every training step and every
//! evaluation, each with a policy (`warn`, `stop` or `rollback`).
//!
//! The detectors and their rules (every threshold is a field of [`HealthConfig`]):
//!
//! - **non_finite**: a loss or diagnostic of a step is NaN or infinite (the event names the key).
//!   Always on, also when `enabled = false`.
//! - **divergence**, two rules, both armed once `warmup` steps have been seen:
//!   - *discriminator collapse*: the median of the last `patience` values of `loss/discriminator`
//!     lies in `[0, d_loss_floor)` (most recent steps have a near-perfect discriminator; a median,
//!     so single spikes neither trigger nor clear it) while `loss/generator` is above
//!     `g_loss_factor` × its baseline, the median of its first `warmup` steps (after the start, a
//!     resume or a rollback), when that baseline is positive
//!     Losses that can be negative (Wasserstein critics) never satisfy the first condition.
//!   - *exploding gradients*: a diagnostic `grad_norm/<group>` is above `grad_norm_factor` × its
//!     running median (when positive), or above `grad_norm_cap`.
//! - **mode_collapse**, at evaluations: the `sample_diversity` metric (mean pairwise distance of a
//!   fixed-seed batch of samples divided by the same statistic on real test data; 1 means as spread
//!   as the data) falls below `diversity_floor` × min(best earlier value, 1); or `modes_captured`
//!   drops to `modes_drop` or more below its best earlier value.
//! - **oscillation**: every loss is smoothed with an exponential moving average
//!   (`E_t = E_{t-1} + ema · (x_t − E_{t-1})`); over the last `oscillation_window` steps a zigzag
//!   with threshold `h = max(oscillation_amplitude × median(|E|) over the window,
//!   oscillation_min_swing)` counts reversals (the
//!   direction of `E` changes once `E` has moved back by more than `h` from its latest extreme). It
//!   fires when there are at least `oscillation_flips` reversals in the window.
//!
//! An event fires when its condition starts to hold and not again until the condition has cleared
//! (the key's streak ends, the value returns under its threshold), so a persistent condition gives
//! one event, not one per step.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use nash_core::model::StepReport;
use nash_core::Error;
use serde::de::{self, IntoDeserializer, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::median;

/// What happens when a detector fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Log the event and go on.
    Warn,
    /// Restore the last healthy snapshot and scale every learning rate by `lr_factor` (at most
    /// `max_rollbacks` times, then stop).
    Rollback,
    /// Stop the run: a training failure (exit code 6).
    Stop,
}

impl Action {
    /// The name used in pipeline files and logs.
    pub fn name(self) -> &'static str {
        match self {
            Action::Warn => "warn",
            Action::Rollback => "rollback",
            Action::Stop => "stop",
        }
    }
}

/// The detectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Detector {
    /// A NaN or infinite loss or diagnostic.
    NonFinite,
    /// Discriminator collapse with a climbing generator loss, or exploding gradient norms.
    Divergence,
    /// Sample diversity or captured modes falling.
    ModeCollapse,
    /// A smoothed loss swinging up and down.
    Oscillation,
}

impl Detector {
    /// Every detector.
    pub const ALL: [Detector; 4] = [
        Detector::NonFinite,
        Detector::Divergence,
        Detector::ModeCollapse,
        Detector::Oscillation,
    ];

    /// The name in logs, `health.jsonl` and `[training.health.policy]`.
    pub fn name(self) -> &'static str {
        match self {
            Detector::NonFinite => "non_finite",
            Detector::Divergence => "divergence",
            Detector::ModeCollapse => "mode_collapse",
            Detector::Oscillation => "oscillation",
        }
    }

    /// The severity written to the health log.
    pub fn severity(self) -> &'static str {
        match self {
            Detector::NonFinite | Detector::Divergence => "error",
            Detector::ModeCollapse | Detector::Oscillation => "warning",
        }
    }

    /// The action when the pipeline names none for this detector: non-finite values stop the
    /// run, the others warn.
    pub fn default_action(self) -> Action {
        match self {
            Detector::NonFinite => Action::Stop,
            _ => Action::Warn,
        }
    }
}

/// Per-detector policies (`[training.health.policy]`); a detector left out keeps its default
/// (`non_finite` stops, the others warn).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectorPolicies {
    /// Policy for `non_finite`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub non_finite: Option<Action>,
    /// Policy for `divergence`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub divergence: Option<Action>,
    /// Policy for `mode_collapse`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode_collapse: Option<Action>,
    /// Policy for `oscillation`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oscillation: Option<Action>,
}

/// `policy = "warn" | "stop" | "rollback"` (every detector), or a table per detector.
#[derive(Clone, Debug, PartialEq)]
pub enum Policy {
    /// The same action for every detector.
    All(Action),
    /// One action per detector.
    PerDetector(DetectorPolicies),
}

impl Default for Policy {
    fn default() -> Self {
        Policy::PerDetector(DetectorPolicies::default())
    }
}

impl Policy {
    /// The action for `detector`.
    pub fn action(&self, detector: Detector) -> Action {
        match self {
            Policy::All(a) => *a,
            Policy::PerDetector(p) => match detector {
                Detector::NonFinite => p.non_finite,
                Detector::Divergence => p.divergence,
                Detector::ModeCollapse => p.mode_collapse,
                Detector::Oscillation => p.oscillation,
            }
            .unwrap_or(detector.default_action()),
        }
    }
}

impl Serialize for Policy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Policy::All(a) => a.serialize(s),
            Policy::PerDetector(p) => p.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Policy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PolicyVisitor;
        impl<'de> Visitor<'de> for PolicyVisitor {
            type Value = Policy;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "\"warn\", \"stop\" or \"rollback\", or a table of them by detector \
                     (non_finite, divergence, mode_collapse, oscillation)",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Policy, E> {
                Action::deserialize(v.into_deserializer()).map(Policy::All)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Policy, A::Error> {
                DetectorPolicies::deserialize(de::value::MapAccessDeserializer::new(map)).map(Policy::PerDetector)
            }
        }
        d.deserialize_any(PolicyVisitor)
    }
}

/// The `[training.health]` table. See the module documentation for the rule each field sets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Run the divergence, mode-collapse and oscillation detectors (non-finite values are always
    /// caught).
    pub enabled: bool,
    /// What each detector's event does.
    pub policy: Policy,
    /// Keep an in-memory snapshot of the training state every this many steps, when no detector
    /// is close to firing (what `rollback` restores).
    pub snapshot_every: u64,
    /// Every optimizer's learning rate is multiplied by this at each rollback, in (0, 1].
    pub lr_factor: f64,
    /// Rollbacks allowed; the next event with policy `rollback` stops the run.
    pub max_rollbacks: u32,
    /// Steps of history needed before the rules that compare with the past arm (and the steps the
    /// generator loss's baseline is the median of).
    pub warmup: usize,
    /// Steps the running medians are taken over.
    pub window: usize,
    /// Discriminator loss below this (and not negative) counts as collapsed.
    pub d_loss_floor: f64,
    /// Steps whose median discriminator loss must be below `d_loss_floor`.
    pub patience: usize,
    /// The generator loss must exceed its running median times this.
    pub g_loss_factor: f64,
    /// A gradient norm above its running median times this is exploding.
    pub grad_norm_factor: f64,
    /// A gradient norm above this is exploding, whatever its history.
    pub grad_norm_cap: f64,
    /// Sample diversity below this fraction of its reference is a collapse, in [0, 1).
    pub diversity_floor: f64,
    /// Samples drawn (and test points compared) for the `sample_diversity` metric (0: off).
    pub diversity_samples: usize,
    /// A drop of `modes_captured` by this many from its best is a collapse.
    pub modes_drop: f64,
    /// Smoothing of the oscillation detector's moving average, in (0, 1].
    pub ema: f64,
    /// Steps the oscillation detector looks back.
    pub oscillation_window: usize,
    /// Reversals within the window that count as an oscillation.
    pub oscillation_flips: usize,
    /// Swing (relative to the median absolute smoothed loss) a reversal must exceed.
    pub oscillation_amplitude: f64,
    /// The smallest swing that counts, whatever the loss's level (keeps losses near 0 quiet).
    pub oscillation_min_swing: f64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            enabled: true,
            policy: Policy::default(),
            snapshot_every: 50,
            lr_factor: 0.5,
            max_rollbacks: 3,
            warmup: 50,
            window: 200,
            d_loss_floor: 0.05,
            patience: 20,
            g_loss_factor: 3.0,
            grad_norm_factor: 50.0,
            grad_norm_cap: 1e6,
            diversity_floor: 0.25,
            diversity_samples: 128,
            modes_drop: 2.0,
            ema: 0.1,
            oscillation_window: 200,
            oscillation_flips: 6,
            oscillation_amplitude: 0.5,
            oscillation_min_swing: 0.1,
        }
    }
}

impl HealthConfig {
    /// The range errors of these values, each naming its `training.health.*` path.
    pub fn check(&self) -> Vec<Error> {
        let mut errors = Vec::new();
        let mut bad = |field: &str, msg: String| errors.push(Error::config(format!("training.health.{field}"), msg));
        if !(self.lr_factor > 0.0 && self.lr_factor <= 1.0) {
            bad("lr_factor", format!("must be in (0, 1], got {}", self.lr_factor));
        }
        if self.snapshot_every == 0 {
            bad("snapshot_every", "must be at least 1, got 0".into());
        }
        if self.window == 0 {
            bad("window", "must be at least 1, got 0".into());
        }
        if self.warmup == 0 {
            bad("warmup", "must be at least 1, got 0".into());
        }
        if self.warmup > self.window {
            bad(
                "warmup",
                format!("must be at most `window` ({}), got {}", self.window, self.warmup),
            );
        }
        if self.patience == 0 {
            bad("patience", "must be at least 1, got 0".into());
        }
        for (field, v) in [
            ("d_loss_floor", self.d_loss_floor),
            ("g_loss_factor", self.g_loss_factor),
            ("grad_norm_factor", self.grad_norm_factor),
            ("grad_norm_cap", self.grad_norm_cap),
            ("modes_drop", self.modes_drop),
            ("oscillation_amplitude", self.oscillation_amplitude),
        ] {
            if !(v.is_finite() && v > 0.0) {
                bad(field, format!("must be a positive number, got {v}"));
            }
        }
        for (field, v) in [("oscillation_min_swing", self.oscillation_min_swing)] {
            if !(v.is_finite() && v >= 0.0) {
                bad(field, format!("must be a number of at least 0, got {v}"));
            }
        }
        if !(0.0..1.0).contains(&self.diversity_floor) {
            bad(
                "diversity_floor",
                format!("must be in [0, 1), got {}", self.diversity_floor),
            );
        }
        if !(self.ema > 0.0 && self.ema <= 1.0) {
            bad("ema", format!("must be in (0, 1], got {}", self.ema));
        }
        if self.oscillation_window < 3 {
            bad(
                "oscillation_window",
                format!("must be at least 3, got {}", self.oscillation_window),
            );
        }
        if self.oscillation_flips == 0 {
            bad("oscillation_flips", "must be at least 1, got 0".into());
        }
        errors
    }
}

/// One detection.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// The step it was found at (steps completed).
    pub step: u64,
    /// Which detector.
    pub detector: Detector,
    /// The loss, diagnostic or metric concerned.
    pub key: String,
    /// What was seen, with the numbers.
    pub message: String,
    /// The policy's action for this detector.
    pub action: Action,
}

/// A window of the latest values of one series.
#[derive(Clone, Debug, Default)]
struct Window {
    values: VecDeque<f64>,
}

impl Window {
    fn push(&mut self, v: f64, cap: usize) {
        if self.values.len() == cap {
            self.values.pop_front();
        }
        self.values.push_back(v);
    }
    fn median(&self) -> Option<f64> {
        median(self.values.iter().copied())
    }
}

/// Number of zigzag reversals of `series` with threshold `h`: the direction changes once the
/// series has moved back by more than `h` from its latest extreme.
pub fn zigzag_reversals(series: &[f64], h: f64) -> usize {
    let Some(&first) = series.first() else { return 0 };
    // direction: 0 unknown, 1 rising, -1 falling; `extreme` the latest high (rising) or low.
    let (mut direction, mut extreme, mut reversals) = (0i8, first, 0usize);
    let (mut low, mut high) = (first, first);
    for &x in &series[1..] {
        match direction {
            0 => {
                low = low.min(x);
                high = high.max(x);
                if x - low > h {
                    direction = 1;
                    extreme = x;
                } else if high - x > h {
                    direction = -1;
                    extreme = x;
                }
            }
            1 => {
                if x > extreme {
                    extreme = x;
                } else if extreme - x > h {
                    direction = -1;
                    extreme = x;
                    reversals += 1;
                }
            }
            _ => {
                if x < extreme {
                    extreme = x;
                } else if x - extreme > h {
                    direction = 1;
                    extreme = x;
                    reversals += 1;
                }
            }
        }
    }
    reversals
}

/// The monitor: feed it every step ([`Monitor::observe_step`]) and every evaluation
/// ([`Monitor::observe_eval`]); it returns the events that fired.
#[derive(Clone, Debug)]
pub struct Monitor {
    cfg: HealthConfig,
    /// Keys (`detector:key`) whose condition held at the last observation (no new event until
    /// it clears).
    active: BTreeMap<String, bool>,
    /// Running windows of the gradient norms.
    history: BTreeMap<String, Window>,
    /// The first `warmup` generator losses, and their median once complete.
    g_first: Vec<f64>,
    g_baseline: Option<f64>,
    /// The latest `patience` discriminator losses.
    d_recent: Window,
    /// Whether their median is below the floor.
    d_collapsed: bool,
    /// Moving averages and their windows, per loss.
    ema: BTreeMap<String, (f64, Window)>,
    /// Best `sample_diversity` and `modes_captured` seen at earlier evaluations.
    best: BTreeMap<String, f64>,
}

const D_LOSS: &str = "loss/discriminator";
const G_LOSS: &str = "loss/generator";

impl Monitor {
    /// A monitor with `cfg` (checked with [`HealthConfig::check`]).
    pub fn new(cfg: HealthConfig) -> nash_core::Result<Self> {
        if let Some(e) = cfg.check().into_iter().next() {
            return Err(e);
        }
        Ok(Monitor {
            cfg,
            active: BTreeMap::new(),
            history: BTreeMap::new(),
            g_first: Vec::new(),
            g_baseline: None,
            d_recent: Window::default(),
            d_collapsed: false,
            ema: BTreeMap::new(),
            best: BTreeMap::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &HealthConfig {
        &self.cfg
    }

    /// Whether no detector is part-way to firing or still in a fired state: a good moment for a
    /// rollback snapshot.
    pub fn calm(&self) -> bool {
        !self.d_collapsed && !self.active.values().any(|a| *a)
    }

    /// Forgets the step history (after a rollback the restored state starts a new one); the best
    /// evaluation values are kept.
    pub fn reset(&mut self) {
        self.active.clear();
        self.history.clear();
        self.g_first.clear();
        self.g_baseline = None;
        self.d_recent = Window::default();
        self.d_collapsed = false;
        self.ema.clear();
    }

    /// Records that `id`'s condition holds (`on`) and returns whether that is new.
    fn edge(&mut self, id: String, on: bool) -> bool {
        let was = self.active.insert(id, on).unwrap_or(false);
        on && !was
    }

    fn event(&self, step: u64, detector: Detector, key: &str, message: String) -> Event {
        Event {
            step,
            detector,
            key: key.to_string(),
            message,
            action: self.cfg.policy.action(detector),
        }
    }

    /// Checks the step that completed `step` steps.
    pub fn observe_step(&mut self, step: u64, report: &StepReport) -> Vec<Event> {
        let mut events = Vec::new();
        let values = report.losses.iter().chain(report.diagnostics.iter());
        let non_finite: Vec<(String, f64)> = values
            .filter(|(_, v)| !v.is_finite())
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        if let Some((key, value)) = non_finite.first() {
            let others = if non_finite.len() > 1 {
                format!(" (and {} more: {})", non_finite.len() - 1, {
                    let rest: Vec<&str> = non_finite[1..].iter().map(|(k, _)| k.as_str()).collect();
                    rest.join(", ")
                })
            } else {
                String::new()
            };
            events.push(self.event(
                step,
                Detector::NonFinite,
                key,
                format!("`{key}` became {value} at step {step}{others}"),
            ));
            // Nothing else is meaningful on non-finite values, and they must not enter the history.
            return events;
        }
        if !self.cfg.enabled {
            return events;
        }
        let cfg = self.cfg.clone();

        // Divergence: discriminator collapse with a climbing generator loss.
        if let (Some(&d), Some(&g)) = (report.losses.get(D_LOSS), report.losses.get(G_LOSS)) {
            self.d_recent.push(d, cfg.patience);
            let d_median = self.d_recent.median().unwrap_or(d);
            self.d_collapsed =
                self.d_recent.values.len() == cfg.patience && (0.0..cfg.d_loss_floor).contains(&d_median);
            let climbing = self.g_baseline.filter(|m| *m > 0.0 && g > cfg.g_loss_factor * m);
            if self.g_baseline.is_none() {
                self.g_first.push(g);
                if self.g_first.len() >= cfg.warmup {
                    self.g_baseline = median(self.g_first.iter().copied());
                }
            }
            let on = self.d_collapsed && climbing.is_some();
            if self.edge(format!("divergence:{D_LOSS}"), on) {
                let m = climbing.unwrap_or(0.0);
                events.push(self.event(
                    step,
                    Detector::Divergence,
                    D_LOSS,
                    format!(
                        "`{D_LOSS}` has a median of {d_median:.3e} over the last {} steps, below {}, while \
                         `{G_LOSS}` = {g:.4} is above {} x its baseline {m:.4}: the discriminator wins",
                        cfg.patience, cfg.d_loss_floor, cfg.g_loss_factor
                    ),
                ));
            }
        }
        // Divergence: exploding gradient norms.
        for (key, &v) in report.diagnostics.iter().filter(|(k, _)| k.starts_with("grad_norm/")) {
            let hist = self.history.entry(key.clone()).or_default();
            let median = hist.median().filter(|m| *m > 0.0 && hist.values.len() >= cfg.warmup);
            let over_median = median.is_some_and(|m| v > cfg.grad_norm_factor * m);
            let on = over_median || v > cfg.grad_norm_cap;
            // An exploding value is kept out of the running median, so it cannot raise its own bar.
            if !on {
                hist.push(v, cfg.window);
            }
            if self.edge(format!("divergence:{key}"), on) {
                let why = if v > cfg.grad_norm_cap {
                    format!("above the cap {}", cfg.grad_norm_cap)
                } else {
                    format!(
                        "above {} x its running median {:.4}",
                        cfg.grad_norm_factor,
                        median.unwrap_or(0.0)
                    )
                };
                events.push(self.event(
                    step,
                    Detector::Divergence,
                    key,
                    format!("`{key}` = {v:.4e} at step {step}, {why}: the gradients are exploding"),
                ));
            }
        }
        // Oscillation of each smoothed loss.
        for (key, &x) in &report.losses {
            let (e, window) = self.ema.entry(key.clone()).or_insert_with(|| (x, Window::default()));
            *e += cfg.ema * (x - *e);
            window.push(*e, cfg.oscillation_window);
            let full = window.values.len() == cfg.oscillation_window;
            let (reversals, h) = if full {
                let scale = median(window.values.iter().map(|v| v.abs())).unwrap_or(0.0);
                let h = (cfg.oscillation_amplitude * scale).max(cfg.oscillation_min_swing);
                let series: Vec<f64> = window.values.iter().copied().collect();
                (if h > 0.0 { zigzag_reversals(&series, h) } else { 0 }, h)
            } else {
                (0, 0.0)
            };
            let on = reversals >= cfg.oscillation_flips;
            if self.edge(format!("oscillation:{key}"), on) {
                events.push(self.event(
                    step,
                    Detector::Oscillation,
                    key,
                    format!(
                        "`{key}` (moving average, ema {}) reversed direction {reversals} times by more than {h:.4} \
                         in the last {} steps",
                        cfg.ema, cfg.oscillation_window
                    ),
                ));
            }
        }
        events
    }

    /// Checks an evaluation at `step` (its metrics: `sample_diversity`, `modes_captured`).
    pub fn observe_eval(&mut self, step: u64, metrics: &BTreeMap<String, f64>) -> Vec<Event> {
        let mut events = Vec::new();
        if !self.cfg.enabled {
            return events;
        }
        let cfg = self.cfg.clone();
        if let Some(&d) = metrics.get("sample_diversity").filter(|v| v.is_finite()) {
            let reference = self.best.get("sample_diversity").map(|b| b.min(1.0));
            let on = reference.is_some_and(|r| d < cfg.diversity_floor * r);
            if self.edge("mode_collapse:sample_diversity".into(), on) {
                events.push(self.event(
                    step,
                    Detector::ModeCollapse,
                    "sample_diversity",
                    format!(
                        "sample diversity {d:.4} (relative to real data) fell below {} x its reference {:.4} \
                         (best earlier value, at most 1)",
                        cfg.diversity_floor,
                        reference.unwrap_or(0.0)
                    ),
                ));
            }
            let best = self.best.entry("sample_diversity".into()).or_insert(d);
            *best = best.max(d);
        }
        if let Some(&m) = metrics.get("modes_captured").filter(|v| v.is_finite()) {
            let best = self.best.get("modes_captured").copied();
            let on = best.is_some_and(|b| b - m >= cfg.modes_drop);
            if self.edge("mode_collapse:modes_captured".into(), on) {
                events.push(self.event(
                    step,
                    Detector::ModeCollapse,
                    "modes_captured",
                    format!("modes captured fell to {m} from a best of {}", best.unwrap_or(0.0)),
                ));
            }
            let b = self.best.entry("modes_captured".into()).or_insert(m);
            *b = b.max(m);
        }
        events
    }
}

/// Mean Euclidean distance over all pairs of the `n` rows of `values` (`n` × `cols`, row-major);
/// 0 for fewer than two rows.
pub fn mean_pairwise_distance(values: &[f32], cols: usize) -> f64 {
    if cols == 0 {
        return 0.0;
    }
    let n = values.len() / cols;
    if n < 2 {
        return 0.0;
    }
    let mut sum = 0.0f64;
    for i in 0..n {
        let a = &values[i * cols..(i + 1) * cols];
        for j in i + 1..n {
            let b = &values[j * cols..(j + 1) * cols];
            let d2: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
            sum += d2.sqrt();
        }
    }
    sum / (n * (n - 1) / 2) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HealthConfig {
        HealthConfig {
            warmup: 10,
            window: 50,
            patience: 5,
            oscillation_window: 60,
            ..HealthConfig::default()
        }
    }

    fn report(pairs: &[(&str, f64)]) -> StepReport {
        let mut r = StepReport::default();
        for (k, v) in pairs {
            if k.starts_with("loss/") {
                r.loss(*k, *v);
            } else {
                r.diagnostic(*k, *v);
            }
        }
        r
    }

    /// A deterministic small jitter in [-1, 1].
    fn jitter(i: u64) -> f64 {
        ((i * 7919 % 101) as f64 / 50.0) - 1.0
    }

    #[test]
    fn non_finite_names_the_key_and_uses_the_policy() {
        let mut m = Monitor::new(cfg()).unwrap();
        assert!(m.observe_step(1, &report(&[("loss/g", 1.0)])).is_empty());
        let e = m.observe_step(2, &report(&[("loss/g", 1.0), ("grad_norm/g", f64::NAN)]));
        assert_eq!(e.len(), 1);
        assert_eq!(
            (e[0].detector, e[0].key.as_str(), e[0].action),
            (Detector::NonFinite, "grad_norm/g", Action::Stop)
        );
        assert!(
            e[0].message.contains("NaN") && e[0].message.contains("step 2"),
            "{}",
            e[0].message
        );
        // Even with the other detectors off, and with a per-detector policy.
        let mut c = cfg();
        c.enabled = false;
        c.policy = Policy::PerDetector(DetectorPolicies {
            non_finite: Some(Action::Rollback),
            ..Default::default()
        });
        let mut m = Monitor::new(c).unwrap();
        let e = m.observe_step(3, &report(&[("loss/a", f64::INFINITY), ("loss/b", f64::NAN)]));
        assert_eq!(e[0].action, Action::Rollback);
        assert!(e[0].message.contains("`loss/a` became inf") && e[0].message.contains("loss/b"));
    }

    #[test]
    fn divergence_needs_a_collapsed_discriminator_for_patience_steps_and_a_climbing_generator() {
        let mut m = Monitor::new(cfg()).unwrap();
        let mut fired = Vec::new();
        for s in 1..=40u64 {
            // Healthy: D about 0.6, G about 1.0.
            let r = report(&[(D_LOSS, 0.6 + 0.05 * jitter(s)), (G_LOSS, 1.0 + 0.1 * jitter(s))]);
            fired.extend(m.observe_step(s, &r));
        }
        assert!(fired.is_empty(), "{fired:?}");
        // D collapses but G stays: no event.
        for s in 41..=50u64 {
            fired.extend(m.observe_step(s, &report(&[(D_LOSS, 1e-4), (G_LOSS, 1.0)])));
        }
        assert!(fired.is_empty(), "{fired:?}");
        assert!(!m.calm(), "a collapsed discriminator is not a moment for a snapshot");
        // G climbs (median about 1): fires once, at the first step both hold.
        for s in 51..=60u64 {
            fired.extend(m.observe_step(s, &report(&[(D_LOSS, 1e-4), (G_LOSS, 4.0 + s as f64)])));
        }
        assert_eq!(fired.len(), 1, "{fired:?}");
        assert_eq!((fired[0].step, fired[0].detector), (51, Detector::Divergence));
        assert_eq!(fired[0].action, Action::Warn);
        // A single spike neither clears nor re-fires it.
        fired.clear();
        fired.extend(m.observe_step(61, &report(&[(D_LOSS, 0.9), (G_LOSS, 9.0)])));
        fired.extend(m.observe_step(62, &report(&[(D_LOSS, 1e-4), (G_LOSS, 60.0)])));
        assert!(fired.is_empty(), "{fired:?}");
        // The discriminator recovers (median back above the floor), then wins again: a second event
        // once 3 of the last 5 losses are below the floor.
        for s in 63..=67u64 {
            fired.extend(m.observe_step(s, &report(&[(D_LOSS, 0.5), (G_LOSS, 9.0)])));
        }
        assert!(fired.is_empty(), "{fired:?}");
        for s in 68..=75u64 {
            fired.extend(m.observe_step(s, &report(&[(D_LOSS, 0.0), (G_LOSS, 50.0)])));
        }
        assert_eq!(fired.iter().map(|e| e.step).collect::<Vec<_>>(), [70]);
        // Negative (Wasserstein) losses never count as collapsed.
        let mut m = Monitor::new(cfg()).unwrap();
        for s in 1..=80u64 {
            let g = if s < 40 { 1.0 } else { 10.0 };
            assert!(m.observe_step(s, &report(&[(D_LOSS, -3.0), (G_LOSS, g)])).is_empty());
        }
    }

    #[test]
    fn exploding_gradient_norms_against_the_median_or_the_cap() {
        let mut m = Monitor::new(cfg()).unwrap();
        let key = "grad_norm/discriminator";
        for s in 1..=30u64 {
            assert!(m.observe_step(s, &report(&[(key, 2.0 + jitter(s))])).is_empty());
        }
        // 50 x a median of about 2 is about 100.
        assert!(m.observe_step(31, &report(&[(key, 60.0)])).is_empty());
        let e = m.observe_step(32, &report(&[(key, 500.0)]));
        assert_eq!(e.len(), 1);
        assert!(e[0].key == key && e[0].message.contains("running median"), "{e:?}");
        // Still exploding: no second event; back to normal and again: a second one.
        assert!(m.observe_step(33, &report(&[(key, 800.0)])).is_empty());
        assert!(m.observe_step(34, &report(&[(key, 2.0)])).is_empty());
        assert_eq!(m.observe_step(35, &report(&[(key, 900.0)])).len(), 1);
        // The cap applies from the first step, before the median arms.
        let mut m = Monitor::new(cfg()).unwrap();
        let e = m.observe_step(1, &report(&[("grad_norm/g", 2e6)]));
        assert!(e.len() == 1 && e[0].message.contains("cap"), "{e:?}");
    }

    #[test]
    fn mode_collapse_from_diversity_and_modes() {
        let mut m = Monitor::new(cfg()).unwrap();
        let ev = |m: &mut Monitor, s: u64, d: f64, modes: f64| {
            m.observe_eval(
                s,
                &BTreeMap::from([("sample_diversity".into(), d), ("modes_captured".into(), modes)]),
            )
        };
        // The untrained generator is narrow; training spreads it; slight narrowing is fine.
        assert!(ev(&mut m, 0, 0.1, 1.0).is_empty());
        assert!(ev(&mut m, 10, 0.9, 7.0).is_empty());
        assert!(ev(&mut m, 20, 1.6, 8.0).is_empty());
        assert!(ev(&mut m, 30, 0.3, 7.0).is_empty(), "0.3 > 0.25 x min(1.6, 1)");
        // Collapse: diversity 0.2 < 0.25, and 8 -> 5 modes.
        let e = ev(&mut m, 40, 0.2, 5.0);
        let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["sample_diversity", "modes_captured"]);
        assert!(e.iter().all(|e| e.detector == Detector::ModeCollapse && e.step == 40));
        assert!(e[1].message.contains("fell to 5 from a best of 8"), "{}", e[1].message);
        // Persisting: no repeat.
        assert!(ev(&mut m, 50, 0.1, 4.0).is_empty());
    }

    #[test]
    fn oscillation_counts_large_reversals_of_the_smoothed_loss_only() {
        let c = HealthConfig {
            ema: 0.5,
            oscillation_window: 60,
            oscillation_flips: 4,
            ..cfg()
        };
        // Noise around 1.0 (±0.1): the moving average never swings by half its level.
        let mut m = Monitor::new(c.clone()).unwrap();
        for s in 1..=200u64 {
            assert!(m
                .observe_step(s, &report(&[("loss/g", 1.0 + 0.1 * jitter(s))]))
                .is_empty());
        }
        // A loss near 0 with noise as large as its level (a winning discriminator): swings under
        // `oscillation_min_swing` do not count.
        let mut m = Monitor::new(c.clone()).unwrap();
        for s in 1..=200u64 {
            assert!(m
                .observe_step(s, &report(&[("loss/d", 0.03 + 0.03 * jitter(s))]))
                .is_empty());
        }
        // A square wave between 0.5 and 2.5 with period 20: 6 reversals in 60 steps.
        let mut m = Monitor::new(c).unwrap();
        let mut fired = Vec::new();
        for s in 1..=200u64 {
            let x = if (s / 10) % 2 == 0 { 0.5 } else { 2.5 };
            fired.extend(m.observe_step(s, &report(&[("loss/g", x)])));
        }
        assert_eq!(fired.len(), 1, "fires once while it lasts: {fired:?}");
        assert_eq!(
            (fired[0].detector, fired[0].key.as_str()),
            (Detector::Oscillation, "loss/g")
        );
        assert_eq!(fired[0].step, 60, "the first full window");
    }

    #[test]
    fn zigzag_ignores_swings_below_the_threshold() {
        assert_eq!(zigzag_reversals(&[0.0, 1.0, 0.0, 1.0, 0.0], 0.5), 3);
        assert_eq!(zigzag_reversals(&[0.0, 1.0, 0.0, 1.0, 0.0], 1.5), 0);
        // Small wiggles on a rise do not break it.
        assert_eq!(zigzag_reversals(&[0.0, 0.5, 0.4, 1.0, 0.9, 2.0, 0.0], 0.5), 1);
        assert_eq!(zigzag_reversals(&[], 0.5), 0);
    }

    #[test]
    fn pairwise_distance_of_known_points() {
        // (0,0), (3,4), (0,4): distances 5, 4, 3 -> mean 4.
        assert!((mean_pairwise_distance(&[0.0, 0.0, 3.0, 4.0, 0.0, 4.0], 2) - 4.0).abs() < 1e-12);
        assert_eq!(mean_pairwise_distance(&[1.0, 2.0], 2), 0.0);
    }

    #[test]
    fn policy_reads_a_string_or_a_table_and_config_ranges_are_named() {
        let p: Policy = nash_core::serde_json::from_str("\"rollback\"").unwrap();
        assert_eq!(p.action(Detector::Oscillation), Action::Rollback);
        let p: Policy = nash_core::serde_json::from_str("{\"divergence\": \"stop\"}").unwrap();
        assert_eq!(p.action(Detector::Divergence), Action::Stop);
        assert_eq!(p.action(Detector::NonFinite), Action::Stop);
        assert_eq!(p.action(Detector::ModeCollapse), Action::Warn);
        let e = nash_core::serde_json::from_str::<Policy>("\"explode\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("warn") && e.contains("rollback"), "{e}");
        let e = nash_core::serde_json::from_str::<Policy>("{\"nan\": \"stop\"}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("non_finite"), "{e}");
        let text = nash_core::serde_json::to_string(&Policy::All(Action::Warn)).unwrap();
        assert_eq!(text, "\"warn\"");
        let bad = HealthConfig {
            lr_factor: 0.0,
            patience: 0,
            diversity_floor: 1.0,
            ..HealthConfig::default()
        };
        let errors: Vec<String> = bad.check().iter().map(|e| e.to_string()).collect();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].contains("training.health.lr_factor"), "{errors:?}");
        assert!(Monitor::new(bad).is_err());
        assert!(HealthConfig::default().check().is_empty());
    }
}
