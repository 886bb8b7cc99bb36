//! Adam (L2 weight decay added to the gradient) and AdamW (decoupled weight decay), with the
//! optional AMSGrad variant, exactly as PyTorch's `torch.optim.Adam` and `torch.optim.AdamW`.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::state::StateDict;
use crate::tensor::{Grads, Param};

use super::common::{check_range, lerp, update_each, LearningRate, ParamStates};
use super::schedule::Schedule;
use super::{Optimizer, OptimizerConfig};

/// `type = "adam"`: PyTorch's Adam. With `t` the parameter's step (from 1), each step does
/// `g += weight_decay * p`, `m = lerp(m, g, 1 - beta1)`, `v = beta2 * v + (1 - beta2) * g²`,
/// (AMSGrad: `v_max = max(v_max, v)` used in place of `v`), then
/// `p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamConfig {
    /// Base learning rate (> 0).
    pub lr: f64,
    /// Decay rates of the first and second moment estimates, each in [0, 1).
    pub betas: [f64; 2],
    /// Added to the denominator for numerical stability (>= 0).
    pub eps: f64,
    /// L2 penalty added to the gradient (>= 0).
    pub weight_decay: f64,
    /// Use the maximum of past second moments (AMSGrad).
    pub amsgrad: bool,
    /// Learning-rate schedule.
    pub schedule: Schedule,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            lr: 1e-3,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
            schedule: Schedule::default(),
        }
    }
}

#[typetag::serde(name = "adam")]
impl OptimizerConfig for AdamConfig {
    fn build(&self) -> Result<Box<dyn Optimizer>> {
        Ok(Box::new(Adam::new("adam", self, false)?))
    }
}

/// `type = "adamw"`: PyTorch's AdamW: as [`AdamConfig`], but weight decay is decoupled from the
/// gradient: `p *= 1 - lr * weight_decay` before the Adam update, and the gradient is used as is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    /// Base learning rate (> 0).
    pub lr: f64,
    /// Decay rates of the first and second moment estimates, each in [0, 1).
    pub betas: [f64; 2],
    /// Added to the denominator for numerical stability (>= 0).
    pub eps: f64,
    /// Decoupled weight decay (>= 0; PyTorch's default 0.01).
    pub weight_decay: f64,
    /// Use the maximum of past second moments (AMSGrad).
    pub amsgrad: bool,
    /// Learning-rate schedule.
    pub schedule: Schedule,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.01,
            amsgrad: false,
            schedule: Schedule::default(),
        }
    }
}

#[typetag::serde(name = "adamw")]
impl OptimizerConfig for AdamWConfig {
    fn build(&self) -> Result<Box<dyn Optimizer>> {
        let as_adam = AdamConfig {
            lr: self.lr,
            betas: self.betas,
            eps: self.eps,
            weight_decay: self.weight_decay,
            amsgrad: self.amsgrad,
            schedule: self.schedule.clone(),
        };
        Ok(Box::new(Adam::new("adamw", &as_adam, true)?))
    }
}

/// PyTorch's Adam or AdamW (see [`AdamConfig`], [`AdamWConfig`]).
#[derive(Debug)]
pub struct Adam {
    name: &'static str,
    config: AdamConfig,
    decoupled: bool,
    lr: LearningRate,
    states: ParamStates,
}

impl Adam {
    /// Checks the config and builds Adam (`decoupled = false`, named `adam`) or AdamW
    /// (`decoupled = true`, named `adamw`); `name` also prefixes config paths in errors.
    pub fn new(name: &'static str, config: &AdamConfig, decoupled: bool) -> Result<Self> {
        let lr = LearningRate::new(name, config.lr, &config.schedule)?;
        check_range(&format!("{name}.betas[0]"), config.betas[0], 0.0, 1.0, false)?;
        check_range(&format!("{name}.betas[1]"), config.betas[1], 0.0, 1.0, false)?;
        check_range(&format!("{name}.eps"), config.eps, 0.0, f64::MAX, true)?;
        check_range(
            &format!("{name}.weight_decay"),
            config.weight_decay,
            0.0,
            f64::MAX,
            true,
        )?;
        let buffers = if config.amsgrad {
            vec!["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
        } else {
            vec!["exp_avg", "exp_avg_sq"]
        };
        Ok(Adam {
            name,
            config: config.clone(),
            decoupled,
            lr,
            states: ParamStates::new(buffers),
        })
    }
}

impl Optimizer for Adam {
    fn name(&self) -> &str {
        self.name
    }

    fn step(&mut self, params: &mut [(String, &mut Param)], grads: &mut Grads) -> Result<()> {
        let lr = self.lr.current();
        let [beta1, beta2] = self.config.betas;
        let wd = self.config.weight_decay;
        let (l2, decoupled) = (wd != 0.0 && !self.decoupled, wd != 0.0 && self.decoupled);
        update_each(params, grads, &mut self.states, |p, g, state| {
            state.step += 1;
            let t = state.step as f64;
            // Scalars are computed in f64 and rounded once, as PyTorch does with Python floats.
            let k = AdamScalars {
                decay: (1.0 - lr * wd) as f32,
                l2: wd as f32,
                w1: (1.0 - beta1) as f32,
                b2: beta2 as f32,
                w2: (1.0 - beta2) as f32,
                inv_bias2_sqrt: (1.0 / (1.0 - beta2.powf(t)).sqrt()) as f32,
                eps: self.config.eps as f32,
                neg_step: (-(lr / (1.0 - beta1.powf(t)))) as f32,
            };
            let (m, v, v_max) = match state.buffers.as_mut_slice() {
                [m, v] => (m, v, None),
                [m, v, v_max] => (m, v, Some(v_max.as_mut_slice())),
                _ => unreachable!("Adam keeps two or three buffers per parameter"),
            };
            match (l2, decoupled) {
                (true, _) => adam_update::<true, false>(&k, p, g, m, v, v_max),
                (_, true) => adam_update::<false, true>(&k, p, g, m, v, v_max),
                _ => adam_update::<false, false>(&k, p, g, m, v, v_max),
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
        self.lr.save(self.name, &mut out);
        self.states.save(&mut out);
        out
    }

    fn load_state(&mut self, state: &StateDict) -> Result<()> {
        let mut lr = self.lr.clone();
        lr.load(self.name, state)?;
        self.states.load(state)?;
        self.lr = lr;
        Ok(())
    }
}

/// Parameters smaller than this run on the calling thread: below it, waking the pool costs more
/// than the update (about a nanosecond per element).
const PARALLEL_MIN_ELEMENTS: usize = 1 << 16;

/// The chunk length that splits `n` elements evenly across the pool's threads, or `None` to
/// update them on the calling thread (one thread, or too few elements).
fn parallel_chunk(n: usize) -> Option<usize> {
    let threads = crate::kernels::split_threads();
    (threads > 1 && n >= PARALLEL_MIN_ELEMENTS).then(|| n.div_ceil(threads))
}

/// The per-step scalars of one parameter's Adam update, rounded to f32.
struct AdamScalars {
    decay: f32,
    l2: f32,
    w1: f32,
    b2: f32,
    w2: f32,
    /// `1/√(1 − β₂ᵗ)`: PyTorch divides `√v` by `√(1 − β₂ᵗ)`; multiplying by the reciprocal
    /// (rounded once, in f64) differs by at most an ulp and saves a division per element.
    inv_bias2_sqrt: f32,
    eps: f32,
    neg_step: f32,
}

/// One Adam update of a parameter, in PyTorch's operation order; `L2` adds weight decay to the
/// gradient, `DECOUPLED` shrinks the parameter first. The branches are resolved at compile time
/// so that each loop is straight-line code.
fn adam_update<const L2: bool, const DECOUPLED: bool>(
    k: &AdamScalars,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    v_max: Option<&mut [f32]>,
) {
    #[inline(always)]
    fn moments<const L2: bool, const DECOUPLED: bool>(
        k: &AdamScalars,
        x: &mut f32,
        g: f32,
        m: &mut f32,
        v: &mut f32,
    ) -> f32 {
        let mut g = g;
        if DECOUPLED {
            *x *= k.decay;
        }
        if L2 {
            g += k.l2 * *x;
        }
        *m = lerp(*m, g, k.w1);
        *v = *v * k.b2 + k.w2 * g * g;
        *v
    }
    match v_max {
        None => {
            let update = |p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]| {
                // Indexed over slices of one length, so that the loop vectorizes, to the CPU's
                // widest vectors (the square root and the division are most of its cost).
                crate::kernels::on_widest_vectors(
                    #[inline(always)]
                    || {
                        let n = p.len();
                        let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
                        for i in 0..n {
                            let second = moments::<L2, DECOUPLED>(k, &mut p[i], g[i], &mut m[i], &mut v[i]);
                            p[i] += k.neg_step * (m[i] / (second.sqrt() * k.inv_bias2_sqrt + k.eps));
                        }
                    },
                )
            };
            // Elements are independent: a large parameter is split across the pool's threads.
            match parallel_chunk(p.len()) {
                Some(chunk) => p
                    .par_chunks_mut(chunk)
                    .zip(g.par_chunks(chunk))
                    .zip(m.par_chunks_mut(chunk))
                    .zip(v.par_chunks_mut(chunk))
                    .for_each(|(((p, g), m), v)| update(p, g, m, v)),
                None => update(p, g, m, v),
            }
        }
        Some(v_max) => {
            let zipped = p
                .iter_mut()
                .zip(g)
                .zip(m.iter_mut())
                .zip(v.iter_mut())
                .zip(v_max.iter_mut());
            for ((((x, &g), m), v), vm) in zipped {
                let second = moments::<L2, DECOUPLED>(k, x, g, m, v);
                *vm = vm.max(second);
                *x += k.neg_step * (*m / (vm.sqrt() * k.inv_bias2_sqrt + k.eps));
            }
        }
    }
}
