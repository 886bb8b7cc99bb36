//! What every nash optimizer shares: gradient access, the in-place update loop, per-parameter
//! state keyed by parameter name, and the scheduled learning rate.
//!
//! Updates run on host slices: one fused loop per parameter over (value, gradient, moments). On
//! the CPU device the gradient is read in place (`Gradients::get_or_alloc_mut` derefs to a
//! slice); the values are the parameter's own host copy, updated in place
//! ([`Param::update_values`]: the next forward pass reads them there, and the dfdx tensor catches
//! up only if something reads it), so a step copies and allocates nothing once the moments exist.
//! The per-element loops are specialized on their options at compile time; on one core (release
//! build) a step costs about 2 ns per parameter for SGD with momentum, 3.5 for Adam and 4.5 for
//! centered RMSprop with momentum, measured with the two copies per parameter that the host copies
//! have since removed. With the `cuda` feature the same loop runs on host copies (device -> host
//! -> device per parameter): correct, not fast; a device kernel is a later optimization.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::state::StateDict;
use crate::tensor::{Grads, Param};

use super::schedule::Schedule;

/// Calls `f(param, gradient)` if `param` has a gradient in `grads`, returning `None` otherwise.
///
/// dfdx 0.13 has no public "is there a gradient" query: `get_or_alloc_mut` allocates zeros for a
/// tensor the backward pass did not reach. A gradient that is exactly zero everywhere is therefore
/// treated as absent (the parameter is skipped and its optimizer state does not advance), which
/// is PyTorch's behavior for a parameter whose `.grad` is `None`. The only difference from
/// PyTorch is a parameter that was reached but whose gradient is exactly 0.0 in every element:
/// PyTorch would still decay its moments and apply weight decay; nash leaves it untouched.
pub fn with_gradient<R>(
    grads: &mut Grads,
    param: &mut Param,
    f: impl FnOnce(&mut Param, &[f32]) -> Result<R>,
) -> Result<Option<R>> {
    #[cfg(not(feature = "cuda"))]
    {
        // The id is enough: reading the tensor's values would copy a lagging tensor up to date.
        let grads = &mut *grads;
        let g = param.with_id(move |tensor| grads.get_or_alloc_mut(tensor))?;
        let g: &[f32] = g;
        if g.iter().all(|&x| x == 0.0) {
            return Ok(None);
        }
        f(param, g).map(Some)
    }
    #[cfg(feature = "cuda")]
    {
        grads.try_alloc_for(param.value())?;
        let g = grads.get(param.value()).as_vec();
        if g.iter().all(|&x| x == 0.0) {
            return Ok(None);
        }
        f(param, &g).map(Some)
    }
}

/// Runs `update(values, gradient, state)` on every trainable parameter of `params` that has a
/// gradient, writing `values` back in place (the tensor id is kept). `state` is the parameter's
/// entry in `states`, created with zero-filled buffers the first time the parameter is updated.
pub fn update_each(
    params: &mut [(String, &mut Param)],
    grads: &mut Grads,
    states: &mut ParamStates,
    mut update: impl FnMut(&mut [f32], &[f32], &mut ParamState),
) -> Result<()> {
    let n_buffers = states.buffer_names.len();
    for (name, param) in params.iter_mut() {
        if !param.trainable() {
            continue;
        }
        let numel = param.numel();
        with_gradient(grads, param, |param, g| {
            let state = states.entry(name, numel, n_buffers)?;
            param.update_values(|values| update(values, g, state));
            Ok(())
        })?;
    }
    Ok(())
}

/// The state of one parameter: PyTorch's per-parameter `step` and its moment buffers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParamState {
    /// Updates applied to this parameter so far.
    pub step: u64,
    /// The optimizer's buffers, in the order of [`ParamStates::buffer_names`], each as long as the
    /// parameter.
    pub buffers: Vec<Vec<f32>>,
}

/// Per-parameter state of an optimizer, keyed by parameter name.
///
/// In a [`StateDict`], parameter `p`'s step is the meta value `p.step` and its buffer `b` is the
/// tensor `p.b` (`generator.0.weight.exp_avg`).
#[derive(Clone, Debug, Default)]
pub struct ParamStates {
    /// The names of the buffers each parameter keeps (`exp_avg`, `exp_avg_sq`).
    pub buffer_names: Vec<&'static str>,
    /// State by parameter name.
    pub by_name: BTreeMap<String, ParamState>,
}

impl ParamStates {
    /// Empty state for an optimizer keeping `buffer_names` per parameter.
    pub fn new(buffer_names: Vec<&'static str>) -> Self {
        ParamStates {
            buffer_names,
            by_name: BTreeMap::new(),
        }
    }

    /// The state of `name`, created if missing; fails if a restored state has the wrong length.
    fn entry(&mut self, name: &str, numel: usize, n_buffers: usize) -> Result<&mut ParamState> {
        if !self.by_name.contains_key(name) {
            self.by_name.insert(
                name.to_string(),
                ParamState {
                    step: 0,
                    buffers: vec![vec![0.0; numel]; n_buffers],
                },
            );
        }
        let state = self.by_name.get_mut(name).expect("inserted above");
        if let Some((i, b)) = state.buffers.iter().enumerate().find(|(_, b)| b.len() != numel) {
            return Err(Error::state(
                format!("{name}.{}", self.buffer_names[i]),
                format!(
                    "the saved optimizer state has {} values but the parameter has {numel}: was it saved for another model?",
                    b.len()
                ),
            ));
        }
        Ok(state)
    }

    /// Writes every parameter's step and buffers into `out`.
    pub fn save(&self, out: &mut StateDict) {
        for (name, state) in &self.by_name {
            out.meta.insert(format!("{name}.step"), state.step.into());
            for (buf, values) in self.buffer_names.iter().zip(&state.buffers) {
                out.put_tensor(format!("{name}.{buf}"), vec![values.len()], values.clone());
            }
        }
    }

    /// Replaces the state by what [`ParamStates::save`] wrote into `state`.
    pub fn load(&mut self, state: &StateDict) -> Result<()> {
        let mut by_name = BTreeMap::new();
        for key in state.meta.keys() {
            let Some(name) = key.strip_suffix(".step") else {
                continue;
            };
            let step: u64 = state.meta(key)?;
            let buffers = self
                .buffer_names
                .iter()
                .map(|buf| {
                    let key = format!("{name}.{buf}");
                    let (_, values) = state.tensor(&key)?;
                    Ok(values.clone())
                })
                .collect::<Result<Vec<_>>>()?;
            by_name.insert(name.to_string(), ParamState { step, buffers });
        }
        self.by_name = by_name;
        Ok(())
    }
}

/// The scheduled learning rate: base rate, schedule, steps taken and the user's scale factor.
#[derive(Clone, Debug)]
pub struct LearningRate {
    /// The configured base learning rate.
    pub base: f64,
    /// The schedule applied to it.
    pub schedule: Schedule,
    /// Optimizer steps taken so far (the schedule's `t`).
    pub steps: u64,
    /// Product of every [`super::Optimizer::scale_learning_rate`] factor.
    pub scale: f64,
}

impl LearningRate {
    /// Checks `lr` and the schedule and starts at step 0; `path` is the optimizer's config path.
    pub fn new(path: &str, base: f64, schedule: &Schedule) -> Result<Self> {
        if !(base.is_finite() && base > 0.0) {
            return Err(Error::config(
                format!("{path}.lr"),
                format!("must be a finite number > 0, got {base}"),
            ));
        }
        schedule.validate(&format!("{path}.schedule"))?;
        Ok(LearningRate {
            base,
            schedule: schedule.clone(),
            steps: 0,
            scale: 1.0,
        })
    }

    /// The learning rate of the next step.
    pub fn current(&self) -> f64 {
        self.schedule.learning_rate(self.base, self.steps) * self.scale
    }

    /// Multiplies the scale by `factor`.
    pub fn scale_by(&mut self, factor: f64) {
        self.scale *= factor;
    }

    /// Writes the step count and scale (as exact bits) and the optimizer's name into `out`.
    /// `lr_scale` is also written as a plain number for people reading checkpoints.
    pub fn save(&self, optimizer: &str, out: &mut StateDict) {
        out.meta.insert("optimizer".into(), optimizer.into());
        out.meta.insert("schedule_steps".into(), self.steps.into());
        out.meta.insert("lr_scale_bits".into(), self.scale.to_bits().into());
        out.meta.insert("lr_scale".into(), self.scale.into());
    }

    /// Restores what [`LearningRate::save`] wrote, refusing state saved by another optimizer.
    pub fn load(&mut self, optimizer: &str, state: &StateDict) -> Result<()> {
        let saved: String = state.meta("optimizer")?;
        if saved != optimizer {
            return Err(Error::state(
                "optimizer",
                format!("the state was saved by a `{saved}` optimizer and cannot be loaded into `{optimizer}`"),
            ));
        }
        let steps: u64 = state.meta("schedule_steps")?;
        let bits: u64 = state.meta("lr_scale_bits")?;
        let scale = f64::from_bits(bits);
        if !scale.is_finite() {
            return Err(Error::state("lr_scale_bits", format!("not a finite scale: {scale}")));
        }
        self.steps = steps;
        self.scale = scale;
        Ok(())
    }
}

/// Checks that `value` is finite and within `[lo, hi)` (or `[lo, hi]` when `hi_inclusive`).
pub fn check_range(path: &str, value: f64, lo: f64, hi: f64, hi_inclusive: bool) -> Result<()> {
    let ok = value.is_finite() && value >= lo && if hi_inclusive { value <= hi } else { value < hi };
    if ok {
        Ok(())
    } else {
        let close = if hi_inclusive { "]" } else { ")" };
        Err(Error::config(
            path,
            format!("must be a finite number in [{lo}, {hi}{close}, got {value}"),
        ))
    }
}

/// PyTorch's CPU `lerp` (`torch.lerp(start, end, weight)`), rounded the same way.
#[inline(always)]
pub fn lerp(start: f32, end: f32, weight: f32) -> f32 {
    if weight.abs() < 0.5 {
        start + weight * (end - start)
    } else {
        end - (end - start) * (1.0 - weight)
    }
}
