//! RMSprop with optional momentum, centering and L2 weight decay, exactly as PyTorch's
//! `torch.optim.RMSprop`.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::state::StateDict;
use crate::tensor::{Grads, Param};

use super::common::{check_range, lerp, update_each, LearningRate, ParamStates};
use super::schedule::Schedule;
use super::{Optimizer, OptimizerConfig};

/// `type = "rmsprop"`: PyTorch's RMSprop. Each step does `g += weight_decay * p`,
/// `s = alpha * s + (1 - alpha) * g²`; centered: `a = lerp(a, g, 1 - alpha)` and
/// `d = sqrt(s - a²) + eps`, otherwise `d = sqrt(s) + eps`; then with momentum
/// `buf = momentum * buf + g / d`, `p -= lr * buf`, without it `p -= lr * g / d`.
/// (`s - a²` is clamped at 0 against rounding, where PyTorch would produce NaN.)
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RmsPropConfig {
    /// Base learning rate (> 0).
    pub lr: f64,
    /// Smoothing constant of the squared-gradient average, in [0, 1).
    pub alpha: f64,
    /// Added to the denominator for numerical stability (>= 0).
    pub eps: f64,
    /// Momentum factor (>= 0; 0 disables it and its state).
    pub momentum: f64,
    /// Normalize by an estimate of the gradient's variance instead of its second moment.
    pub centered: bool,
    /// L2 penalty added to the gradient (>= 0).
    pub weight_decay: f64,
    /// Learning-rate schedule.
    pub schedule: Schedule,
}

impl Default for RmsPropConfig {
    fn default() -> Self {
        RmsPropConfig {
            lr: 1e-2,
            alpha: 0.99,
            eps: 1e-8,
            momentum: 0.0,
            centered: false,
            weight_decay: 0.0,
            schedule: Schedule::default(),
        }
    }
}

#[typetag::serde(name = "rmsprop")]
impl OptimizerConfig for RmsPropConfig {
    fn build(&self) -> Result<Box<dyn Optimizer>> {
        Ok(Box::new(RmsProp::new(self.clone())?))
    }
}

/// PyTorch's RMSprop (see [`RmsPropConfig`]).
#[derive(Debug)]
pub struct RmsProp {
    config: RmsPropConfig,
    lr: LearningRate,
    states: ParamStates,
}

impl RmsProp {
    /// Checks the config and builds the optimizer.
    pub fn new(config: RmsPropConfig) -> Result<Self> {
        let lr = LearningRate::new("rmsprop", config.lr, &config.schedule)?;
        check_range("rmsprop.alpha", config.alpha, 0.0, 1.0, false)?;
        check_range("rmsprop.eps", config.eps, 0.0, f64::MAX, true)?;
        check_range("rmsprop.momentum", config.momentum, 0.0, f64::MAX, true)?;
        check_range("rmsprop.weight_decay", config.weight_decay, 0.0, f64::MAX, true)?;
        let mut buffers = vec!["square_avg"];
        if config.momentum > 0.0 {
            buffers.push("momentum_buffer");
        }
        if config.centered {
            buffers.push("grad_avg");
        }
        Ok(RmsProp {
            config,
            lr,
            states: ParamStates::new(buffers),
        })
    }
}

impl Optimizer for RmsProp {
    fn name(&self) -> &str {
        "rmsprop"
    }

    fn step(&mut self, params: &mut [(String, &mut Param)], grads: &mut Grads) -> Result<()> {
        let c = &self.config;
        let k = RmsPropScalars {
            neg_lr: -self.lr.current() as f32,
            alpha: c.alpha as f32,
            keep: (1.0 - c.alpha) as f32,
            eps: c.eps as f32,
            wd: c.weight_decay as f32,
            momentum: c.momentum as f32,
        };
        let (use_momentum, centered, wd) = (c.momentum > 0.0, c.centered, c.weight_decay != 0.0);
        update_each(params, grads, &mut self.states, |p, g, state| {
            state.step += 1;
            // Buffers in order: square_avg, then momentum_buffer and grad_avg when enabled.
            let (square_avg, rest) = state.buffers.split_at_mut(1);
            let (momentum_buf, rest) = if use_momentum {
                let (b, rest) = rest.split_at_mut(1);
                (Some(b[0].as_mut_slice()), rest)
            } else {
                (None, rest)
            };
            let grad_avg = rest.first_mut().map(|b| b.as_mut_slice());
            let s = square_avg[0].as_mut_slice();
            match (wd, centered) {
                (false, false) => rmsprop_update::<false, false>(&k, p, g, s, momentum_buf, None),
                (false, true) => rmsprop_update::<false, true>(&k, p, g, s, momentum_buf, grad_avg),
                (true, false) => rmsprop_update::<true, false>(&k, p, g, s, momentum_buf, None),
                (true, true) => rmsprop_update::<true, true>(&k, p, g, s, momentum_buf, grad_avg),
            }
        })?;
        self.lr.steps += 1;
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.lr.current()
    }

    fn scale_learning_rate(&mut self, factor: f64) {
        self.lr.scale_by(factor);
    }

    fn state(&self) -> StateDict {
        let mut out = StateDict::default();
        self.lr.save(self.name(), &mut out);
        self.states.save(&mut out);
        out
    }

    fn load_state(&mut self, state: &StateDict) -> Result<()> {
        let mut lr = self.lr.clone();
        lr.load(self.name(), state)?;
        self.states.load(state)?;
        self.lr = lr;
        Ok(())
    }
}

/// The scalars of one RMSprop step, rounded to f32.
struct RmsPropScalars {
    neg_lr: f32,
    alpha: f32,
    keep: f32,
    eps: f32,
    wd: f32,
    momentum: f32,
}

/// One RMSprop update of a parameter, in PyTorch's operation order, with the options resolved at
/// compile time (`WD`: weight decay, `CENTERED`: `grad_avg` is given) or per loop (momentum).
fn rmsprop_update<const WD: bool, const CENTERED: bool>(
    k: &RmsPropScalars,
    p: &mut [f32],
    g: &[f32],
    s: &mut [f32],
    momentum_buf: Option<&mut [f32]>,
    grad_avg: Option<&mut [f32]>,
) {
    // The denominator `sqrt(s) + eps` (centered: `sqrt(max(s - a², 0)) + eps`) and the gradient.
    #[inline(always)]
    fn denom<const WD: bool, const CENTERED: bool>(
        k: &RmsPropScalars,
        x: f32,
        g: f32,
        s: &mut f32,
        a: &mut f32,
    ) -> (f32, f32) {
        let g = if WD { g + k.wd * x } else { g };
        *s = *s * k.alpha + k.keep * g * g;
        let avg = if CENTERED {
            *a = lerp(*a, g, k.keep);
            (*s + -*a * *a).max(0.0).sqrt()
        } else {
            s.sqrt()
        };
        (g, avg + k.eps)
    }
    // Without centering `grad_avg` is not kept; a dummy slot stands in for it.
    let mut dummy = [0.0f32];
    match (momentum_buf, grad_avg) {
        (Some(buf), Some(a)) => {
            for ((((x, &g), s), b), a) in p
                .iter_mut()
                .zip(g)
                .zip(s.iter_mut())
                .zip(buf.iter_mut())
                .zip(a.iter_mut())
            {
                let (g, d) = denom::<WD, CENTERED>(k, *x, g, s, a);
                *b = *b * k.momentum + g / d;
                *x += k.neg_lr * *b;
            }
        }
        (Some(buf), None) => {
            for (((x, &g), s), b) in p.iter_mut().zip(g).zip(s.iter_mut()).zip(buf.iter_mut()) {
                let (g, d) = denom::<WD, CENTERED>(k, *x, g, s, &mut dummy[0]);
                *b = *b * k.momentum + g / d;
                *x += k.neg_lr * *b;
            }
        }
        (None, Some(a)) => {
            for (((x, &g), s), a) in p.iter_mut().zip(g).zip(s.iter_mut()).zip(a.iter_mut()) {
                let (g, d) = denom::<WD, CENTERED>(k, *x, g, s, a);
                *x += k.neg_lr * (g / d);
            }
        }
        (None, None) => {
            for ((x, &g), s) in p.iter_mut().zip(g).zip(s.iter_mut()) {
                let (g, d) = denom::<WD, CENTERED>(k, *x, g, s, &mut dummy[0]);
                *x += k.neg_lr * (g / d);
            }
        }
    }
}
