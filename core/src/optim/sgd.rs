//! Stochastic gradient descent with momentum, dampening, Nesterov momentum and L2 weight decay,
//! exactly as PyTorch's `torch.optim.SGD`.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::state::StateDict;
use crate::tensor::{Grads, Param};

use super::common::{check_range, update_each, LearningRate, ParamStates};
use super::schedule::Schedule;
use super::{Optimizer, OptimizerConfig};

/// `type = "sgd"`: PyTorch's SGD. With `g` the gradient and `p` the parameter, each step does
/// `g += weight_decay * p`; with momentum, `buf = g` on a parameter's first step and
/// `buf = momentum * buf + (1 - dampening) * g` afterwards, then `g = g + momentum * buf`
/// (Nesterov) or `g = buf`; finally `p -= lr * g`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SgdConfig {
    /// Base learning rate (> 0).
    pub lr: f64,
    /// Momentum factor (>= 0; 0 disables momentum and its state).
    pub momentum: f64,
    /// Dampening of the gradient in the momentum buffer, in [0, 1].
    pub dampening: f64,
    /// Nesterov momentum (needs momentum > 0 and dampening 0).
    pub nesterov: bool,
    /// L2 penalty added to the gradient (>= 0).
    pub weight_decay: f64,
    /// Learning-rate schedule.
    pub schedule: Schedule,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            lr: 1e-3,
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            schedule: Schedule::default(),
        }
    }
}

#[typetag::serde(name = "sgd")]
impl OptimizerConfig for SgdConfig {
    fn build(&self) -> Result<Box<dyn Optimizer>> {
        Ok(Box::new(Sgd::new(self.clone())?))
    }
}

/// PyTorch's SGD (see [`SgdConfig`]).
#[derive(Debug)]
pub struct Sgd {
    config: SgdConfig,
    lr: LearningRate,
    states: ParamStates,
}

impl Sgd {
    /// Checks the config and builds the optimizer.
    pub fn new(config: SgdConfig) -> Result<Self> {
        let lr = LearningRate::new("sgd", config.lr, &config.schedule)?;
        check_range("sgd.momentum", config.momentum, 0.0, f64::MAX, true)?;
        check_range("sgd.dampening", config.dampening, 0.0, 1.0, true)?;
        check_range("sgd.weight_decay", config.weight_decay, 0.0, f64::MAX, true)?;
        if config.nesterov && (config.momentum <= 0.0 || config.dampening != 0.0) {
            return Err(Error::config(
                "sgd.nesterov",
                format!(
                    "Nesterov momentum needs momentum > 0 and dampening = 0, got momentum = {} and dampening = {}",
                    config.momentum, config.dampening
                ),
            ));
        }
        let buffers = if config.momentum != 0.0 {
            vec!["momentum_buffer"]
        } else {
            vec![]
        };
        Ok(Sgd {
            config,
            lr,
            states: ParamStates::new(buffers),
        })
    }
}

impl Optimizer for Sgd {
    fn name(&self) -> &str {
        "sgd"
    }

    fn step(&mut self, params: &mut [(String, &mut Param)], grads: &mut Grads) -> Result<()> {
        let lr = self.lr.current() as f32;
        let wd = self.config.weight_decay as f32;
        let momentum = self.config.momentum as f32;
        let keep = (1.0 - self.config.dampening) as f32;
        let nesterov = self.config.nesterov;
        update_each(params, grads, &mut self.states, |p, g, state| {
            let first = state.step == 0;
            state.step += 1;
            match state.buffers.first_mut() {
                None => {
                    for (p, &g) in p.iter_mut().zip(g) {
                        let g = if wd != 0.0 { g + wd * *p } else { g };
                        *p += -lr * g;
                    }
                }
                Some(buf) => {
                    for ((p, &g), b) in p.iter_mut().zip(g).zip(buf.iter_mut()) {
                        let g = if wd != 0.0 { g + wd * *p } else { g };
                        *b = if first { g } else { *b * momentum + keep * g };
                        let d = if nesterov { g + momentum * *b } else { *b };
                        *p += -lr * d;
                    }
                }
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
