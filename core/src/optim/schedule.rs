//! Learning-rate schedules, evaluated in closed form from the number of completed steps.
//!
//! Every optimizer config has a `schedule` table, tagged by `kind`:
//!
//! ```toml
//! schedule = { kind = "cosine", total_steps = 10000, min_lr = 1e-5, warmup_steps = 500 }
//! ```
//!
//! With `t` the number of optimizer steps already taken (0 for the first step) and `lr` the
//! optimizer's base learning rate, the learning rate of step `t` is `warmup(t) * main(t)`:
//!
//! - `constant`: `main(t) = lr`.
//! - `step { step_size, gamma }`: `main(t) = lr * gamma^floor(t / step_size)` (PyTorch `StepLR`).
//! - `exponential { gamma }`: `main(t) = lr * gamma^t` (PyTorch `ExponentialLR`).
//! - `cosine { total_steps, min_lr }`: `main(t) = min_lr + (lr - min_lr) * (1 + cos(pi * t / total_steps)) / 2`
//!   for `t <= total_steps` (PyTorch `CosineAnnealingLR` with `T_max = total_steps`,
//!   `eta_min = min_lr`), and `min_lr` afterwards (PyTorch's closed form would rise again; a
//!   schedule that has run its course stays at its floor here).
//! - `warmup_steps = W` (any kind, default 0): `warmup(t) = min(t, W) / W`, and 1 when `W = 0`.
//!   This is PyTorch's `LinearLR(start_factor -> 0, end_factor = 1, total_iters = W)` chained with
//!   the main schedule (`ChainedScheduler`, both counting from step 0), the same rule as
//!   `transformers.get_*_schedule_with_warmup`: the first step has learning rate 0, step `W` and
//!   later ones have the full scheduled rate. The main schedule is not delayed by the warm-up.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A learning-rate schedule (see the module documentation for the exact formulas).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Schedule {
    /// The base learning rate throughout.
    Constant {
        /// Linear warm-up length in steps (0: none).
        #[serde(default)]
        warmup_steps: u64,
    },
    /// Multiplies the learning rate by `gamma` every `step_size` steps.
    Step {
        /// Steps between decays (at least 1).
        step_size: u64,
        /// Decay factor (positive).
        gamma: f64,
        /// Linear warm-up length in steps (0: none).
        #[serde(default)]
        warmup_steps: u64,
    },
    /// Multiplies the learning rate by `gamma` every step.
    Exponential {
        /// Decay factor per step (positive).
        gamma: f64,
        /// Linear warm-up length in steps (0: none).
        #[serde(default)]
        warmup_steps: u64,
    },
    /// Half a cosine from the base learning rate down to `min_lr` over `total_steps` steps.
    Cosine {
        /// Length of the decay in steps (at least 1).
        total_steps: u64,
        /// The floor reached at `total_steps` (default 0).
        #[serde(default)]
        min_lr: f64,
        /// Linear warm-up length in steps (0: none).
        #[serde(default)]
        warmup_steps: u64,
    },
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::Constant { warmup_steps: 0 }
    }
}

impl Schedule {
    /// The warm-up length in steps.
    pub fn warmup_steps(&self) -> u64 {
        match *self {
            Schedule::Constant { warmup_steps }
            | Schedule::Step { warmup_steps, .. }
            | Schedule::Exponential { warmup_steps, .. }
            | Schedule::Cosine { warmup_steps, .. } => warmup_steps,
        }
    }

    /// Checks the parameters; `path` is the config path of this table (`adam.schedule`).
    pub fn validate(&self, path: &str) -> Result<()> {
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(Error::config(
                    format!("{path}.{name}"),
                    format!("must be a finite number > 0, got {v}"),
                ))
            }
        };
        match *self {
            Schedule::Constant { .. } => Ok(()),
            Schedule::Step { step_size, gamma, .. } => {
                if step_size == 0 {
                    return Err(Error::config(format!("{path}.step_size"), "must be at least 1, got 0"));
                }
                positive("gamma", gamma)
            }
            Schedule::Exponential { gamma, .. } => positive("gamma", gamma),
            Schedule::Cosine {
                total_steps, min_lr, ..
            } => {
                if total_steps == 0 {
                    return Err(Error::config(
                        format!("{path}.total_steps"),
                        "must be at least 1, got 0",
                    ));
                }
                if !(min_lr.is_finite() && min_lr >= 0.0) {
                    return Err(Error::config(
                        format!("{path}.min_lr"),
                        format!("must be a finite number >= 0, got {min_lr}"),
                    ));
                }
                Ok(())
            }
        }
    }

    /// The warm-up factor of step `t` (0-based): `min(t, W) / W`, or 1 without warm-up.
    pub fn warmup_factor(&self, t: u64) -> f64 {
        match self.warmup_steps() {
            0 => 1.0,
            w => t.min(w) as f64 / w as f64,
        }
    }

    /// The learning rate of step `t` (0-based: the number of steps already taken) for base
    /// learning rate `base_lr`, warm-up included.
    pub fn learning_rate(&self, base_lr: f64, t: u64) -> f64 {
        let main = match *self {
            Schedule::Constant { .. } => base_lr,
            Schedule::Step { step_size, gamma, .. } => base_lr * gamma.powf((t / step_size.max(1)) as f64),
            Schedule::Exponential { gamma, .. } => base_lr * gamma.powf(t as f64),
            Schedule::Cosine {
                total_steps, min_lr, ..
            } => {
                let total = total_steps.max(1);
                if t >= total {
                    min_lr
                } else {
                    min_lr + (base_lr - min_lr) * (1.0 + (std::f64::consts::PI * t as f64 / total as f64).cos()) / 2.0
                }
            }
        };
        self.warmup_factor(t) * main
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_seq(schedule: &Schedule, base: f64, expected: &[f64], tol: f64) {
        for (t, &e) in expected.iter().enumerate() {
            let got = schedule.learning_rate(base, t as u64);
            assert!(
                (got - e).abs() <= tol * e.abs().max(1e-3),
                "{schedule:?} step {t}: got {got}, PyTorch {e}"
            );
        }
    }

    // Reference values: PyTorch 2.15 schedulers, lr read before each optimizer step.
    //   import torch
    //   def seq(make, n, lr=0.1):
    //       opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr); s = make(opt); out = []
    //       for _ in range(n): out.append(opt.param_groups[0]["lr"]); opt.step(); s.step()
    //       return out
    #[test]
    fn step_matches_pytorch_steplr() {
        // seq(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5), 8)
        let s = Schedule::Step {
            step_size: 3,
            gamma: 0.5,
            warmup_steps: 0,
        };
        assert_seq(&s, 0.1, &[0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025], 1e-15);
    }

    #[test]
    fn exponential_matches_pytorch_exponentiallr() {
        // seq(lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9), 5)
        let s = Schedule::Exponential {
            gamma: 0.9,
            warmup_steps: 0,
        };
        assert_seq(
            &s,
            0.1,
            &[
                0.1,
                0.09000000000000001,
                0.08100000000000002,
                0.07290000000000002,
                0.06561000000000002,
            ],
            1e-15,
        );
    }

    #[test]
    fn cosine_matches_pytorch_cosineannealinglr() {
        // seq(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4, eta_min=0.01), 5)
        let s = Schedule::Cosine {
            total_steps: 4,
            min_lr: 0.01,
            warmup_steps: 0,
        };
        assert_seq(
            &s,
            0.1,
            &[
                0.1,
                0.08681980515339464,
                0.05500000000000001,
                0.023180194846605363,
                0.01,
            ],
            1e-14,
        );
        // Past total_steps the floor holds (PyTorch's closed form would rise again).
        assert_eq!(s.learning_rate(0.1, 5), 0.01);
        assert_eq!(s.learning_rate(0.1, 100), 0.01);
    }

    #[test]
    fn warmup_matches_linear_warmup_and_chains() {
        // seq(lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1e-12, total_iters=4), 6)
        // = [1e-13, 0.025000000000075, 0.050000000000050004, 0.075000000000025, 0.1, 0.1]
        // (start_factor must be > 0 in PyTorch; 1e-12 stands for 0, hence the 1e-12 tolerance)
        let s = Schedule::Constant { warmup_steps: 4 };
        assert_seq(&s, 0.1, &[0.0, 0.025, 0.05, 0.075, 0.1, 0.1], 1e-11);
        // seq(lambda o: torch.optim.lr_scheduler.ChainedScheduler([
        //     torch.optim.lr_scheduler.LinearLR(o, start_factor=1e-12, total_iters=2),
        //     torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.5)]), 5)
        // = [1e-13, 0.025000000000025002, 0.025, 0.0125, 0.00625]
        let s = Schedule::Exponential {
            gamma: 0.5,
            warmup_steps: 2,
        };
        assert_seq(&s, 0.1, &[0.0, 0.025, 0.025, 0.0125, 0.00625], 1e-11);
    }

    #[test]
    fn parses_with_defaults_and_refuses_unknown_fields() {
        let s: Schedule = serde_json::from_str(r#"{"kind":"cosine","total_steps":10}"#).unwrap();
        assert_eq!(
            s,
            Schedule::Cosine {
                total_steps: 10,
                min_lr: 0.0,
                warmup_steps: 0
            }
        );
        assert!(serde_json::from_str::<Schedule>(r#"{"kind":"cosine","total_steps":10,"gama":1}"#).is_err());
        assert!(serde_json::from_str::<Schedule>(r#"{"kind":"linear"}"#).is_err());
        let bad = Schedule::Step {
            step_size: 0,
            gamma: 0.5,
            warmup_steps: 0,
        };
        let err = bad.validate("sgd.schedule").unwrap_err().to_string();
        assert!(err.contains("sgd.schedule.step_size"), "{err}");
        assert!(Schedule::Exponential {
            gamma: f64::NAN,
            warmup_steps: 0
        }
        .validate("x")
        .is_err());
    }
}
