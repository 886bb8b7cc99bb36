//! LeCam regularization (Tseng et al. 2021, "Regularizing Generative Adversarial Networks under
//! Limited Data"): `lecam`.

use nash_core::dfdx::prelude::*;
use nash_core::error::{Error, Result};
use nash_core::layers::{ForwardContext, Mode};
use nash_core::registry::Registry;
use nash_core::stabilizer::{HookContext, LossSite, Stabilizer, StabilizerConfig};
use nash_core::state::StateDict;
use nash_core::tensor::{Activation, Matrix, Scalar, Tape};
use serde::{Deserialize, Serialize};

use crate::scope::{conflict, require_positive};

/// Registers this module's types.
pub fn register(registry: &mut Registry) -> nash_core::Result<()> {
    registry.stabilizer::<LeCamConfig>(
        "LeCam: pull D's outputs on real/fake data toward EMAs of its mean outputs on fake/real data",
    )?;
    Ok(())
}

/// LeCam regularization of the discriminator (Tseng et al. 2021): adds
/// `λ · (E[‖D(x_real) − α_F‖²] + E[‖D(x_fake) − α_R‖²])` to the discriminator's loss, where α_R
/// and α_F are exponential moving averages (decay `decay`) of the mean raw output on real and on
/// fake samples, updated at every discriminator update before the term is computed and held
/// constant in it. The first update sets each EMA to the observed mean (the reference code's
/// `start_itr` with decay 0). D is re-run on the discriminator's inputs in training mode (one more
/// forward pass each). The paper uses λ = 0.3 on CIFAR-10 (and smaller values, such as 0.01, on
/// other data sets); `hinged = true` uses the reference code's one-sided form
/// `E[relu(D(x_real) − α_F)²] + E[relu(α_R − D(x_fake))²]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeCamConfig {
    /// The weight λ of the term.
    pub lambda: f64,
    /// The EMAs' decay.
    pub decay: f64,
    /// The reference code's one-sided (ReLU) form instead of the paper's two-sided one.
    pub hinged: bool,
}

impl Default for LeCamConfig {
    fn default() -> Self {
        LeCamConfig {
            lambda: 0.3,
            decay: 0.99,
            hinged: false,
        }
    }
}

#[typetag::serde(name = "lecam")]
impl StabilizerConfig for LeCamConfig {
    fn build(&self) -> Result<Box<dyn Stabilizer>> {
        require_positive("stabilizers.lecam.lambda", self.lambda)?;
        if !(0.0..1.0).contains(&self.decay) {
            return Err(Error::config(
                "stabilizers.lecam.decay",
                format!("must be in [0, 1), got {}", self.decay),
            ));
        }
        Ok(Box::new(LeCam {
            config: self.clone(),
            alpha_real: None,
            alpha_fake: None,
        }))
    }
}

/// See [`LeCamConfig`].
#[derive(Clone, Debug)]
pub struct LeCam {
    config: LeCamConfig,
    /// EMA of the mean raw output on real samples (α_R); unset before the first update.
    alpha_real: Option<f64>,
    /// EMA of the mean raw output on fake samples (α_F); unset before the first update.
    alpha_fake: Option<f64>,
}

impl LeCam {
    /// The EMAs `(α_R, α_F)`, once the first update has set them.
    pub fn anchors(&self) -> Option<(f64, f64)> {
        self.alpha_real.zip(self.alpha_fake)
    }
}

/// `prev·decay + mean·(1 − decay)`, or `mean` without a previous value.
fn ema(prev: Option<f64>, mean: f64, decay: f64) -> f64 {
    match prev {
        Some(a) => a * decay + mean * (1.0 - decay),
        None => mean,
    }
}

/// Mean of the (tape-less) values of `m`.
fn host_mean(m: &Matrix<Tape>) -> f64 {
    let v = m.retaped::<NoneTape>().as_vec();
    v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64
}

/// `E_batch[‖diff‖²]` of `[batch, k]` outputs: the sum of squares over the batch size.
fn mean_sq_norm(diff: Matrix<Tape>) -> Result<Scalar> {
    let batch = diff.shape().0.max(1) as f32;
    Ok(diff.try_square()?.try_sum::<(), _>()?.try_mul(1.0 / batch)?)
}

impl Stabilizer for LeCam {
    fn name(&self) -> &str {
        "lecam"
    }

    fn conflicts_with(&self, other: &dyn Stabilizer) -> Option<String> {
        conflict("lecam", None, other)
    }

    fn extra_loss(&mut self, site: &mut LossSite<'_>, ctx: &mut HookContext<'_>) -> Result<Option<(String, Scalar)>> {
        let LossSite::Discriminator {
            critic,
            real,
            fake,
            shape,
        } = site
        else {
            return Ok(None);
        };
        let mut fctx = ForwardContext {
            mode: Mode::Train,
            rng: &mut *ctx.rng,
        };
        let d_real = critic.forward(Activation::input(real, *shape)?, &mut fctx)?.value;
        let d_fake = critic.forward(Activation::input(fake, *shape)?, &mut fctx)?.value;
        let decay = self.config.decay;
        let alpha_real = ema(self.alpha_real, host_mean(&d_real), decay);
        let alpha_fake = ema(self.alpha_fake, host_mean(&d_fake), decay);
        self.alpha_real = Some(alpha_real);
        self.alpha_fake = Some(alpha_fake);
        let (real_gap, fake_gap) = if self.config.hinged {
            (
                d_real.try_sub(alpha_fake as f32)?.try_relu()?,
                d_fake.try_negate()?.try_add(alpha_real as f32)?.try_relu()?,
            )
        } else {
            (d_real.try_sub(alpha_fake as f32)?, d_fake.try_sub(alpha_real as f32)?)
        };
        let reg = mean_sq_norm(real_gap)?.try_add(mean_sq_norm(fake_gap)?)?;
        Ok(Some(("lecam".to_string(), reg.try_mul(self.config.lambda as f32)?)))
    }

    fn state(&self) -> StateDict {
        let mut s = StateDict::default();
        // Options of plain numbers always serialize.
        let _ = s.put_meta("alpha_real", self.alpha_real);
        let _ = s.put_meta("alpha_fake", self.alpha_fake);
        s
    }

    fn load_state(&mut self, state: &StateDict) -> Result<()> {
        let alpha_real: Option<f64> = state.meta("alpha_real")?;
        let alpha_fake: Option<f64> = state.meta("alpha_fake")?;
        for (key, v) in [("alpha_real", alpha_real), ("alpha_fake", alpha_fake)] {
            if v.is_some_and(|v| !v.is_finite()) {
                return Err(Error::state(key, "must be a finite number"));
            }
        }
        self.alpha_real = alpha_real;
        self.alpha_fake = alpha_fake;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consistency::tests::{critic_values, fd_check, linear_critic, smooth_critic};
    use nash_core::rand::SeedableRng;
    use nash_core::tensor::{Device, FeatureShape, Rng};

    /// Runs the term once; returns its value.
    fn term(
        s: &mut dyn Stabilizer,
        critic: &mut nash_core::layers::Sequential,
        real: &Matrix,
        fake: &Matrix,
    ) -> Scalar {
        let dev = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        let mut ctx = HookContext {
            step: 0,
            device: &dev,
            rng: &mut rng,
        };
        let shape = FeatureShape::Flat(real.shape().1);
        let mut site = LossSite::Discriminator {
            critic,
            real,
            fake,
            shape,
        };
        let (name, t) = s.extra_loss(&mut site, &mut ctx).unwrap().unwrap();
        assert_eq!(name, "lecam");
        assert!(s.extra_loss(&mut LossSite::Generator, &mut ctx).unwrap().is_none());
        t
    }

    #[test]
    fn value_and_emas_match_a_hand_computation() {
        let dev = Device::default();
        // D(x) = x·w + b with w = [0.5, -1], b = 0.1.
        let mut critic = linear_critic(&dev, &[0.5, -1.0], 0.1);
        let real = dev.tensor_from_vec(vec![1.0, 0.0, 0.0, 1.0, 2.0, 2.0], (3, 2));
        let fake = dev.tensor_from_vec(vec![0.0, 0.0, -1.0, 1.0], (2, 2));
        // D(real) = [0.6, -0.9, -0.9] (mean -0.4); D(fake) = [0.1, -1.4] (mean -0.65).
        let mut s = LeCamConfig::default().build().unwrap();
        let v = term(s.as_mut(), &mut critic, &real, &fake).array() as f64;
        // First call: α_R = -0.4, α_F = -0.65.
        // R = mean((D_r + 0.65)²) + mean((D_f + 0.4)²)
        //   = (1.25² + 0.25² + 0.25²)/3 + (0.5² + 1.0²)/2 = 1.6875/3 + 0.625
        let want = 0.3 * (1.6875 / 3.0 + 0.625);
        assert!((v - want).abs() < 1e-6, "{v} vs {want}");
        // Second call on other real data: α_R = 0.99·(-0.4) + 0.01·mean(D(real2)).
        let real2 = dev.tensor_from_vec(vec![2.0, 0.0, 2.0, 0.0, 2.0, 0.0], (3, 2));
        term(s.as_mut(), &mut critic, &real2, &fake);
        let state = s.state();
        let ar: Option<f64> = state.meta("alpha_real").unwrap();
        let af: Option<f64> = state.meta("alpha_fake").unwrap();
        assert!((ar.unwrap() - (0.99 * -0.4 + 0.01 * 1.1)).abs() < 1e-7, "{ar:?}");
        assert!((af.unwrap() + 0.65).abs() < 1e-7);

        // The reference code's hinged form: E[relu(D_r − α_F)²] + E[relu(α_R − D_f)²]
        // = (1.25² + 0 + 0)/3 + (0 + 1.0²)/2 on the first call.
        let mut hinged = LeCamConfig {
            hinged: true,
            ..Default::default()
        }
        .build()
        .unwrap();
        let v = term(hinged.as_mut(), &mut critic, &real, &fake).array() as f64;
        let want = 0.3 * (1.5625 / 3.0 + 0.5);
        assert!((v - want).abs() < 1e-6, "{v} vs {want}");
    }

    #[test]
    fn gradients_match_finite_differences_with_the_anchors_held() {
        let dev = Device::default();
        let mut critic = smooth_critic(&dev, 3, 7);
        let real = dev.tensor_from_vec(vec![0.3, -0.2, 0.8, 1.0, 0.1, -0.5, -0.7, 0.4, 0.2], (3, 3));
        let fake = dev.tensor_from_vec(vec![-0.1, 0.6, 0.0, 0.5, -0.9, 0.3], (2, 3));
        let mut s = LeCamConfig {
            lambda: 0.7,
            ..Default::default()
        }
        .build()
        .unwrap();
        // Anchors from an earlier step, away from this step's means.
        let mut st = StateDict::default();
        st.put_meta("alpha_real", Some(0.4)).unwrap();
        st.put_meta("alpha_fake", Some(-0.3)).unwrap();
        s.load_state(&st).unwrap();
        let loss = term(s.as_mut(), &mut critic, &real, &fake);
        let state = s.state();
        let ar: f64 = state.meta::<Option<f64>>("alpha_real").unwrap().unwrap();
        let af: f64 = state.meta::<Option<f64>>("alpha_fake").unwrap().unwrap();
        // The held anchors moved by 1% toward this step's means.
        assert!((ar - 0.4).abs() > 1e-6 && (ar - 0.4).abs() < 0.05);
        // λ (mean((D_r − α_F)²) + mean((D_f − α_R)²)) with the anchors as constants.
        let reference = |c: &mut nash_core::layers::Sequential| -> f64 {
            let dr = critic_values(c, &real);
            let df = critic_values(c, &fake);
            let r = dr.iter().map(|d| (d - af).powi(2)).sum::<f64>() / 3.0;
            let f = df.iter().map(|d| (d - ar).powi(2)).sum::<f64>() / 2.0;
            0.7 * (r + f)
        };
        assert!((loss.array() as f64 - reference(&mut critic)).abs() < 1e-5);
        let grads = loss.backward();
        fd_check(&mut critic, grads, reference);
    }

    #[test]
    fn state_round_trips_and_configs_are_checked() {
        let dev = Device::default();
        let mut critic = linear_critic(&dev, &[1.0], 0.0);
        let x = dev.tensor_from_vec(vec![1.0, 2.0], (2, 1));
        let mut s = LeCamConfig::default().build().unwrap();
        assert_eq!(s.state().meta::<Option<f64>>("alpha_real").unwrap(), None);
        term(s.as_mut(), &mut critic, &x, &x);
        let saved = s.state();
        let mut restored = LeCamConfig::default().build().unwrap();
        restored.load_state(&saved).unwrap();
        assert_eq!(restored.state(), saved);
        // Both continue identically.
        let a = term(s.as_mut(), &mut critic, &x, &x).array();
        let b = term(restored.as_mut(), &mut critic, &x, &x).array();
        assert_eq!(a, b);
        assert!(restored.load_state(&StateDict::default()).is_err());

        let cfg: Box<dyn StabilizerConfig> =
            nash_core::serde_json::from_str(r#"{"type": "lecam", "lambda": 0.01, "decay": 0.9}"#).unwrap();
        assert_eq!(cfg.build().unwrap().name(), "lecam");
        assert!(
            nash_core::serde_json::from_str::<Box<dyn StabilizerConfig>>(r#"{"type": "lecam", "lamda": 1}"#).is_err()
        );
        for (bad, field) in [
            (
                LeCamConfig {
                    lambda: 0.0,
                    ..Default::default()
                },
                "lambda",
            ),
            (
                LeCamConfig {
                    decay: 1.0,
                    ..Default::default()
                },
                "decay",
            ),
        ] {
            let err = bad.build().err().unwrap();
            assert!(
                matches!(&err, Error::Config { path, .. } if path.ends_with(field)),
                "{err}"
            );
        }
    }
}
