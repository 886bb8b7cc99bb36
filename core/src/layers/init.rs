//! Parameter initializers, computed from fan-in and fan-out the way `torch.nn.init` does.
//!
//! In pipeline files an initializer is a table tagged by `kind`:
//! `init = { kind = "normal", mean = 0.0, std = 0.02 }`, `init = { kind = "kaiming_normal",
//! nonlinearity = "leaky_relu", a = 0.2 }`, `init = { kind = "dcgan" }`, `init = { kind = "zeros" }`.
//! Omitted fields take PyTorch's defaults. Values are drawn on the host from the seeded build
//! [`Rng`], so a seed reproduces the same network on every platform.

use rand::Rng as _;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tensor::Rng;

/// The nonlinearity a Kaiming initializer corrects for (`torch.nn.init.calculate_gain`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Nonlinearity {
    /// Gain 1.
    Linear,
    /// Gain 1.
    Sigmoid,
    /// Gain 5/3.
    Tanh,
    /// Gain √2.
    Relu,
    /// Gain √(2 / (1 + a²)), `a` the negative slope.
    #[default]
    LeakyRelu,
}

impl Nonlinearity {
    /// `torch.nn.init.calculate_gain(nonlinearity, a)`.
    pub fn gain(self, a: f64) -> f64 {
        match self {
            Nonlinearity::Linear | Nonlinearity::Sigmoid => 1.0,
            Nonlinearity::Tanh => 5.0 / 3.0,
            Nonlinearity::Relu => 2f64.sqrt(),
            Nonlinearity::LeakyRelu => (2.0 / (1.0 + a * a)).sqrt(),
        }
    }
}

/// Which fan a Kaiming initializer preserves the variance of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FanMode {
    /// The forward pass (PyTorch's default).
    #[default]
    FanIn,
    /// The backward pass.
    FanOut,
}

fn one() -> f64 {
    1.0
}
fn one_tenth() -> f64 {
    0.1
}

/// How a parameter's initial values are drawn.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Init {
    /// U(a, b).
    Uniform {
        /// Lower bound.
        #[serde(default)]
        a: f64,
        /// Upper bound.
        #[serde(default = "one")]
        b: f64,
    },
    /// N(mean, std²).
    Normal {
        /// Mean.
        #[serde(default)]
        mean: f64,
        /// Standard deviation.
        #[serde(default = "one")]
        std: f64,
    },
    /// Glorot: U(±gain·√(6 / (fan_in + fan_out))).
    XavierUniform {
        /// Scale factor.
        #[serde(default = "one")]
        gain: f64,
    },
    /// Glorot: N(0, gain²·2 / (fan_in + fan_out)).
    XavierNormal {
        /// Scale factor.
        #[serde(default = "one")]
        gain: f64,
    },
    /// He: U(±gain·√(3 / fan)).
    KaimingUniform {
        /// Negative slope for `leaky_relu`.
        #[serde(default)]
        a: f64,
        /// Which fan to use.
        #[serde(default)]
        mode: FanMode,
        /// The nonlinearity that follows.
        #[serde(default)]
        nonlinearity: Nonlinearity,
    },
    /// He: N(0, gain² / fan).
    KaimingNormal {
        /// Negative slope for `leaky_relu`.
        #[serde(default)]
        a: f64,
        /// Which fan to use.
        #[serde(default)]
        mode: FanMode,
        /// The nonlinearity that follows.
        #[serde(default)]
        nonlinearity: Nonlinearity,
    },
    /// N(0, 0.02²), the DCGAN paper's initializer.
    Dcgan,
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
    /// Every value equal to `value`.
    Constant {
        /// The value.
        #[serde(default = "one_tenth")]
        value: f64,
    },
}

impl Init {
    /// PyTorch's default for `Linear` and `Conv*` weights: `kaiming_uniform_(a=√5)`, which is U(±1/√fan_in).
    pub fn torch_default_weight() -> Self {
        Init::KaimingUniform {
            a: 5f64.sqrt(),
            mode: FanMode::FanIn,
            nonlinearity: Nonlinearity::LeakyRelu,
        }
    }
    /// PyTorch's default for `Linear` and `Conv*` biases: U(±1/√fan_in).
    pub fn torch_default_bias(fan_in: usize) -> Self {
        let bound = if fan_in > 0 { 1.0 / (fan_in as f64).sqrt() } else { 0.0 };
        Init::Uniform { a: -bound, b: bound }
    }

    /// Checks the parameters (bounds ordered, deviations non-negative, finite). `path` names the field.
    pub fn validate(&self, path: &str) -> Result<()> {
        let bad = |m: &str| Err(Error::config(path, m.to_string()));
        let finite = |v: &[f64]| v.iter().all(|x| x.is_finite());
        match *self {
            Init::Uniform { a, b } => {
                if !finite(&[a, b]) || a > b {
                    return bad(&format!("uniform needs finite a <= b, got a = {a}, b = {b}"));
                }
            }
            Init::Normal { mean, std } => {
                if !finite(&[mean, std]) || std < 0.0 {
                    return bad(&format!("normal needs a finite mean and std >= 0, got std = {std}"));
                }
            }
            Init::XavierUniform { gain } | Init::XavierNormal { gain } => {
                if !finite(&[gain]) || gain < 0.0 {
                    return bad(&format!("xavier needs a finite gain >= 0, got {gain}"));
                }
            }
            Init::KaimingUniform { a, .. } | Init::KaimingNormal { a, .. } => {
                if !finite(&[a]) {
                    return bad(&format!("kaiming needs a finite negative slope a, got {a}"));
                }
            }
            Init::Constant { value } => {
                if !finite(&[value]) {
                    return bad(&format!("constant needs a finite value, got {value}"));
                }
            }
            Init::Dcgan | Init::Zeros | Init::Ones => {}
        }
        Ok(())
    }

    /// Draws `n` values for a parameter with the given fans (PyTorch's
    /// `_calculate_fan_in_and_fan_out`: for a kernel `[out, in, kh, kw]`, fan_in = in·kh·kw).
    pub fn sample(&self, n: usize, fan_in: usize, fan_out: usize, rng: &mut Rng) -> Result<Vec<f32>> {
        self.validate("init")?;
        let fan = |mode: FanMode| -> Result<f64> {
            let f = match mode {
                FanMode::FanIn => fan_in,
                FanMode::FanOut => fan_out,
            };
            if f == 0 {
                Err(Error::config(
                    "init",
                    "kaiming initialization of a parameter with zero fan",
                ))
            } else {
                Ok(f as f64)
            }
        };
        let uniform = |rng: &mut Rng, lo: f64, hi: f64| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    if hi > lo {
                        rng.gen_range(lo..hi) as f32
                    } else {
                        lo as f32
                    }
                })
                .collect()
        };
        let normal = |rng: &mut Rng, mean: f64, std: f64| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    let z: f64 = StandardNormal.sample(rng);
                    (mean + std * z) as f32
                })
                .collect()
        };
        Ok(match *self {
            Init::Uniform { a, b } => uniform(rng, a, b),
            Init::Normal { mean, std } => normal(rng, mean, std),
            Init::XavierUniform { gain } | Init::XavierNormal { gain } => {
                if fan_in + fan_out == 0 {
                    return Err(Error::config(
                        "init",
                        "xavier initialization of a parameter with zero fans",
                    ));
                }
                let std = gain * (2.0 / (fan_in + fan_out) as f64).sqrt();
                if matches!(self, Init::XavierUniform { .. }) {
                    let bound = 3f64.sqrt() * std;
                    uniform(rng, -bound, bound)
                } else {
                    normal(rng, 0.0, std)
                }
            }
            Init::KaimingUniform { a, mode, nonlinearity } => {
                let bound = nonlinearity.gain(a) * (3.0 / fan(mode)?).sqrt();
                uniform(rng, -bound, bound)
            }
            Init::KaimingNormal { a, mode, nonlinearity } => {
                let std = nonlinearity.gain(a) / fan(mode)?.sqrt();
                normal(rng, 0.0, std)
            }
            Init::Dcgan => normal(rng, 0.0, 0.02),
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Constant { value } => vec![value as f32; n],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn stats(v: &[f32]) -> (f64, f64, f64, f64) {
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        let min = v.iter().fold(f64::INFINITY, |m, &x| m.min(x as f64));
        let max = v.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        (mean, var.sqrt(), min, max)
    }

    #[test]
    fn parses_tagged_tables() {
        let i: Init = serde_json::from_str(r#"{"kind": "normal", "std": 0.02}"#).unwrap();
        assert_eq!(i, Init::Normal { mean: 0.0, std: 0.02 });
        let i: Init = serde_json::from_str(r#"{"kind": "kaiming_normal", "nonlinearity": "relu"}"#).unwrap();
        assert_eq!(
            i,
            Init::KaimingNormal {
                a: 0.0,
                mode: FanMode::FanIn,
                nonlinearity: Nonlinearity::Relu
            }
        );
        assert!(serde_json::from_str::<Init>(r#"{"kind": "normal", "sdt": 0.02}"#).is_err());
        assert!(serde_json::from_str::<Init>(r#"{"kind": "gaussian"}"#).is_err());
        assert!(Init::Uniform { a: 1.0, b: 0.0 }.validate("x").is_err());
    }

    #[test]
    fn bounds_and_deviations_follow_torch() {
        let mut rng = Rng::seed_from_u64(0);
        // torch: kaiming_uniform_(w, a=sqrt(5)) with fan_in = 100 gives U(-0.1, 0.1).
        let v = Init::torch_default_weight().sample(20_000, 100, 7, &mut rng).unwrap();
        let (_, sd, lo, hi) = stats(&v);
        assert!(lo >= -0.1 && hi <= 0.1 && lo < -0.099 && hi > 0.099);
        assert!((sd - 0.1 / 3f64.sqrt()).abs() < 2e-3);
        // kaiming_normal_(relu), fan_in = 50: std = sqrt(2/50) = 0.2.
        let k = Init::KaimingNormal {
            a: 0.0,
            mode: FanMode::FanIn,
            nonlinearity: Nonlinearity::Relu,
        };
        let (m, sd, _, _) = stats(&k.sample(20_000, 50, 9, &mut rng).unwrap());
        assert!(m.abs() < 5e-3 && (sd - 0.2).abs() < 4e-3, "{m} {sd}");
        // xavier_uniform_, fans 30 + 70: bound = sqrt(6/100).
        let (_, _, lo, hi) = stats(
            &Init::XavierUniform { gain: 1.0 }
                .sample(20_000, 30, 70, &mut rng)
                .unwrap(),
        );
        let b = (0.06f64).sqrt();
        assert!(lo >= -b && hi <= b && hi > 0.99 * b);
        // xavier_normal_: std = sqrt(2/100).
        let (_, sd, _, _) = stats(
            &Init::XavierNormal { gain: 1.0 }
                .sample(20_000, 30, 70, &mut rng)
                .unwrap(),
        );
        assert!((sd - 0.02f64.sqrt()).abs() < 3e-3);
        let (m, sd, _, _) = stats(&Init::Dcgan.sample(20_000, 1, 1, &mut rng).unwrap());
        assert!(m.abs() < 1e-3 && (sd - 0.02).abs() < 1e-3);
        assert_eq!(Init::Ones.sample(3, 1, 1, &mut rng).unwrap(), vec![1.0; 3]);
        assert!((Nonlinearity::LeakyRelu.gain(0.2) - (2.0 / 1.04f64).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn same_seed_same_values() {
        let a = Init::Dcgan.sample(10, 1, 1, &mut Rng::seed_from_u64(3)).unwrap();
        let b = Init::Dcgan.sample(10, 1, 1, &mut Rng::seed_from_u64(3)).unwrap();
        assert_eq!(a, b);
    }
}
