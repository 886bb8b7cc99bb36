//! Balanced consistency regularization (bCR; Zhao et al. 2021, "Improved Consistency
//! Regularization for GANs"): `consistency`.

use nash_core::dfdx::prelude::*;
use nash_core::error::{Error, Result};
use nash_core::layers::{ForwardContext, Mode, Sequential};
use nash_core::rand::Rng as _;
use nash_core::rand_distr::StandardNormal;
use nash_core::registry::Registry;
use nash_core::stabilizer::{HookContext, LossSite, Stabilizer, StabilizerConfig};
use nash_core::tensor::{Activation, FeatureShape, Matrix, Rng, Scalar};
use serde::{Deserialize, Serialize};

use crate::scope::{conflict, require_positive};

use crate::augment::{apply, AugmentPolicy, AugmentSpec, Augmentation};

/// Registers this module's types.
pub fn register(registry: &mut Registry) -> nash_core::Result<()> {
    registry.stabilizer::<ConsistencyConfig>(
        "bCR: penalize the change of D's outputs under flips/translations (images) or noise (flat) of real and fake inputs",
    )?;
    Ok(())
}

/// Balanced consistency regularization (bCR, Zhao et al. 2021): adds
/// `λ_real · E[‖D(x_r) − D(T(x_r))‖²] + λ_fake · E[‖D(x_f) − D(T(x_f))‖²]` to the
/// discriminator's loss (means over the batch, squared L2 norm over D's outputs), with D re-run
/// in training mode on the discriminator's inputs and on their transforms; gradients flow through
/// both outputs. T, drawn per sample: for images, a left-right flip with probability 1/2 (when
/// `flip`) and an integer translation by up to `translation_ratio` of the size with zero padding
/// (the paper's "flipping and translating by a few pixels"); for flat inputs, Gaussian noise of
/// standard deviation `sigma`. The paper's weights: λ_real = λ_fake = 10.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsistencyConfig {
    /// Weight of the real-sample term.
    pub lambda_real: f64,
    /// Weight of the fake-sample term.
    pub lambda_fake: f64,
    /// Largest translation of images as a share of their size.
    pub translation_ratio: f64,
    /// Whether images are also flipped left-right (per sample, probability 1/2).
    pub flip: bool,
    /// Standard deviation of the noise added to flat inputs.
    pub sigma: f64,
}

impl Default for ConsistencyConfig {
    fn default() -> Self {
        ConsistencyConfig {
            lambda_real: 10.0,
            lambda_fake: 10.0,
            translation_ratio: 0.125,
            flip: true,
            sigma: 0.1,
        }
    }
}

#[typetag::serde(name = "consistency")]
impl StabilizerConfig for ConsistencyConfig {
    fn build(&self) -> Result<Box<dyn Stabilizer>> {
        for (name, v) in [("lambda_real", self.lambda_real), ("lambda_fake", self.lambda_fake)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::config(
                    format!("stabilizers.consistency.{name}"),
                    format!("must be a finite number >= 0, got {v}"),
                ));
            }
        }
        if self.lambda_real == 0.0 && self.lambda_fake == 0.0 {
            return Err(Error::config(
                "stabilizers.consistency.lambda_real",
                "lambda_real and lambda_fake are both 0, so the term is always 0; set one > 0 or drop the stabilizer",
            ));
        }
        if !(self.translation_ratio.is_finite() && (0.0..=1.0).contains(&self.translation_ratio)) {
            return Err(Error::config(
                "stabilizers.consistency.translation_ratio",
                format!(
                    "must be in [0, 1] (a share of the image size), got {}",
                    self.translation_ratio
                ),
            ));
        }
        require_positive("stabilizers.consistency.sigma", self.sigma)?;
        Ok(Box::new(Consistency { config: self.clone() }))
    }
}

/// See [`ConsistencyConfig`].
#[derive(Clone, Debug)]
pub struct Consistency {
    config: ConsistencyConfig,
}

impl Consistency {
    /// T(x): the transformed copy of `x` (no tape), drawing from `rng`.
    pub fn transform(&self, x: &Matrix, shape: FeatureShape, rng: &mut Rng) -> Result<Matrix> {
        let batch = x.shape().0;
        match shape.as_image() {
            Some(dims) => {
                let mut augs = Vec::new();
                if self.config.flip {
                    augs.push(Augmentation::Flip((0..batch).map(|_| rng.gen::<bool>()).collect()));
                }
                let spec = AugmentSpec {
                    policies: vec![AugmentPolicy::Translation],
                    translation_ratio: self.config.translation_ratio,
                    cutout_ratio: 0.5,
                };
                augs.extend(spec.draw(batch, dims, 1.0, rng));
                Ok(apply(x.leaky_trace(), dims, &augs)?.retaped::<NoneTape>())
            }
            None => {
                let sigma = self.config.sigma as f32;
                let noise: Vec<f32> = (0..x.shape().0 * x.shape().1)
                    .map(|_| sigma * rng.sample::<f32, _>(StandardNormal))
                    .collect();
                Ok(x.clone().try_add(x.device().tensor_from_vec(noise, *x.shape()))?)
            }
        }
    }

    /// `λ · E_batch[‖D(x) − D(tx)‖²]` on the tape of both forward passes.
    fn half(
        critic: &mut Sequential,
        x: &Matrix,
        tx: &Matrix,
        shape: FeatureShape,
        lambda: f64,
        rng: &mut Rng,
    ) -> Result<Scalar> {
        let mut fctx = ForwardContext { mode: Mode::Train, rng };
        let d = critic.forward(Activation::input(x, shape)?, &mut fctx)?.value;
        let dt = critic.forward(Activation::input(tx, shape)?, &mut fctx)?.value;
        let batch = d.shape().0.max(1) as f32;
        Ok(d.try_sub(dt)?
            .try_square()?
            .try_sum::<(), _>()?
            .try_mul(lambda as f32 / batch)?)
    }
}

impl Stabilizer for Consistency {
    fn name(&self) -> &str {
        "consistency"
    }

    fn conflicts_with(&self, other: &dyn Stabilizer) -> Option<String> {
        conflict("consistency", None, other)
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
        let shape = *shape;
        // The transforms are drawn first (real, then fake), then D runs.
        let t_real = self.transform(real, shape, ctx.rng)?;
        let t_fake = self.transform(fake, shape, ctx.rng)?;
        let mut total: Option<Scalar> = None;
        for (x, tx, lambda) in [
            (*real, &t_real, self.config.lambda_real),
            (*fake, &t_fake, self.config.lambda_fake),
        ] {
            if lambda == 0.0 {
                continue;
            }
            let term = Self::half(critic, x, tx, shape, lambda, ctx.rng)?;
            total = Some(match total {
                Some(t) => t.try_add(term)?,
                None => term,
            });
        }
        Ok(total.map(|t| ("consistency".to_string(), t)))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use nash_core::layers::{BuildContext, SequentialConfig};
    use nash_core::rand::SeedableRng;
    use nash_core::tensor::{grad_to_vec, Device, Grads, Parameterized};

    /// A critic `D(x) = x·w + b` with one output.
    pub(crate) fn linear_critic(dev: &Device, w: &[f32], b: f32) -> Sequential {
        let cfg: SequentialConfig =
            nash_core::serde_json::from_str(r#"{"layers": [{"type": "linear", "out_features": 1}]}"#).unwrap();
        let mut rng = Rng::seed_from_u64(0);
        let mut bctx = BuildContext {
            device: dev,
            rng: &mut rng,
        };
        let mut c = cfg.build(FeatureShape::Flat(w.len()), &mut bctx, "critic").unwrap();
        for (name, p) in c.named_params_mut() {
            match name.as_str() {
                "0.weight" => p.set(w).unwrap(),
                "0.bias" => p.set(&[b]).unwrap(),
                other => panic!("{other}"),
            }
        }
        c
    }

    /// A small smooth critic `n → 4 → tanh → 1` with seeded weights.
    pub(crate) fn smooth_critic(dev: &Device, n: usize, seed: u64) -> Sequential {
        let cfg: SequentialConfig = nash_core::serde_json::from_str(
            r#"{"layers": [{"type": "linear", "out_features": 4}, {"type": "tanh"}, {"type": "linear", "out_features": 1}]}"#,
        )
        .unwrap();
        let mut rng = Rng::seed_from_u64(seed);
        let mut bctx = BuildContext {
            device: dev,
            rng: &mut rng,
        };
        cfg.build(FeatureShape::Flat(n), &mut bctx, "critic").unwrap()
    }

    /// D's outputs on `x` (flat), as f64.
    pub(crate) fn critic_values(c: &mut Sequential, x: &Matrix) -> Vec<f64> {
        let mut rng = Rng::seed_from_u64(0);
        let mut fctx = ForwardContext {
            mode: Mode::Train,
            rng: &mut rng,
        };
        let shape = c.input_shape();
        let out = c.forward(Activation::input(x, shape).unwrap(), &mut fctx).unwrap();
        out.detach().as_vec().iter().map(|&v| v as f64).collect()
    }

    /// Compares the gradients in `grads` of every parameter of `critic` with central differences
    /// of `f`.
    pub(crate) fn fd_check(critic: &mut Sequential, mut grads: Grads, f: impl Fn(&mut Sequential) -> f64) {
        let names: Vec<String> = critic.named_params().into_iter().map(|(n, _)| n).collect();
        let mut checked = 0;
        for name in names {
            let get = |c: &mut Sequential| {
                c.named_params()
                    .into_iter()
                    .find(|(n, _)| *n == name)
                    .unwrap()
                    .1
                    .to_vec()
            };
            let set = |c: &mut Sequential, v: &[f32]| {
                for (n, p) in c.named_params_mut() {
                    if n == name {
                        p.set(v).unwrap();
                    }
                }
            };
            let analytic = {
                let params = critic.named_params();
                let p = params.iter().find(|(n, _)| *n == name).unwrap().1;
                grad_to_vec(&mut grads, p).unwrap()
            };
            let base = get(critic);
            let h = 1e-3f32;
            for k in 0..base.len() {
                let mut v = base.clone();
                v[k] = base[k] + h;
                set(critic, &v);
                let up = f(critic);
                v[k] = base[k] - h;
                set(critic, &v);
                let down = f(critic);
                set(critic, &base);
                let fd = (up - down) / (2.0 * h as f64);
                let a = analytic[k] as f64;
                assert!(
                    (a - fd).abs() <= 1e-2 * fd.abs().max(a.abs()) + 2e-4,
                    "{name}[{k}]: analytic {a} vs finite difference {fd}"
                );
                checked += 1;
            }
        }
        assert!(checked > 0);
    }

    fn run(
        s: &mut dyn Stabilizer,
        critic: &mut Sequential,
        real: &Matrix,
        fake: &Matrix,
        shape: FeatureShape,
        seed: u64,
    ) -> Scalar {
        let dev = Device::default();
        let mut rng = Rng::seed_from_u64(seed);
        let mut ctx = HookContext {
            step: 0,
            device: &dev,
            rng: &mut rng,
        };
        let mut site = LossSite::Discriminator {
            critic,
            real,
            fake,
            shape,
        };
        let (name, t) = s.extra_loss(&mut site, &mut ctx).unwrap().unwrap();
        assert_eq!(name, "consistency");
        assert!(s.extra_loss(&mut LossSite::Generator, &mut ctx).unwrap().is_none());
        t
    }

    #[test]
    fn flat_value_matches_a_hand_computation() {
        let dev = Device::default();
        // D(x) = x·w + b, so D(x) − D(x + ε) = −ε·w.
        let w = [0.5f32, -2.0];
        let mut critic = linear_critic(&dev, &w, 0.3);
        let real = dev.tensor_from_vec(vec![1.0, 0.0, 0.5, 0.5, -1.0, 2.0], (3, 2));
        let fake = dev.tensor_from_vec(vec![0.0, 1.0, 2.0, 0.0], (2, 2));
        let cfg = ConsistencyConfig {
            lambda_real: 10.0,
            lambda_fake: 4.0,
            sigma: 0.2,
            ..Default::default()
        };
        let mut s = cfg.build().unwrap();
        let v = run(s.as_mut(), &mut critic, &real, &fake, FeatureShape::Flat(2), 5).array() as f64;
        // The noise, drawn in the same order (real's 6 entries, then fake's 4).
        let mut rng = Rng::seed_from_u64(5);
        let eps: Vec<f64> = (0..10)
            .map(|_| 0.2 * rng.sample::<f32, _>(StandardNormal) as f64)
            .collect();
        let sq = |e: &[f64]| (e[0] * 0.5 - e[1] * 2.0).powi(2);
        let real_term: f64 = (0..3).map(|b| sq(&eps[2 * b..2 * b + 2])).sum::<f64>() / 3.0;
        let fake_term: f64 = (0..2).map(|b| sq(&eps[6 + 2 * b..8 + 2 * b])).sum::<f64>() / 2.0;
        let want = 10.0 * real_term + 4.0 * fake_term;
        assert!(want > 1e-3);
        assert!((v - want).abs() < 1e-5 * (1.0 + want), "{v} vs {want}");

        // Only the fake half.
        let mut fake_only = ConsistencyConfig {
            lambda_real: 0.0,
            ..cfg
        }
        .build()
        .unwrap();
        let v = run(fake_only.as_mut(), &mut critic, &real, &fake, FeatureShape::Flat(2), 5).array() as f64;
        assert!((v - 4.0 * fake_term).abs() < 1e-5, "{v}");
    }

    #[test]
    fn image_transform_is_a_flip_and_translation_and_gradients_match_finite_differences() {
        let dev = Device::default();
        let shape = FeatureShape::image(1, 3, 3);
        let cons = Consistency {
            config: ConsistencyConfig::default(),
        };
        // T keeps the batch, and each transformed sample is a flip + shift of its own sample:
        // with a one-pixel image the values come from that sample only.
        let x: Vec<f32> = (0..4).flat_map(|b| vec![b as f32 + 1.0; 9]).collect();
        let x = dev.tensor_from_vec(x, (4, 9));
        let tx = cons.transform(&x, shape, &mut Rng::seed_from_u64(1)).unwrap().as_vec();
        for b in 0..4 {
            let row = &tx[b * 9..b * 9 + 9];
            assert!(row.iter().all(|&v| v == 0.0 || v == b as f32 + 1.0));
            // int(3/8 + 0.5) = 0: no shift at this size, so nothing is padded.
            assert!(row.iter().all(|&v| v != 0.0));
        }

        // FD check of the whole term on a 1x4x4 image with a ratio that shifts by up to 1.
        let shape = FeatureShape::image(1, 4, 4);
        let cfg = ConsistencyConfig {
            lambda_real: 3.0,
            lambda_fake: 2.0,
            translation_ratio: 0.25,
            ..Default::default()
        };
        let cons = Consistency { config: cfg.clone() };
        let mut s = cfg.build().unwrap();
        let vals = |seed: u64, n: usize| -> Vec<f32> {
            let mut r = Rng::seed_from_u64(seed);
            (0..n).map(|_| r.gen_range(-1.0f32..1.0)).collect()
        };
        let real = dev.tensor_from_vec(vals(11, 48), (3, 16));
        let fake = dev.tensor_from_vec(vals(12, 32), (2, 16));
        // The critic takes the images (flattened first).
        let mut critic = {
            let cfg: SequentialConfig = nash_core::serde_json::from_str(
                r#"{"layers": [{"type": "flatten"}, {"type": "linear", "out_features": 4}, {"type": "tanh"}, {"type": "linear", "out_features": 1}]}"#,
            )
            .unwrap();
            let mut rng = Rng::seed_from_u64(3);
            let mut bctx = BuildContext {
                device: &dev,
                rng: &mut rng,
            };
            cfg.build(shape, &mut bctx, "critic").unwrap()
        };
        let loss = run(s.as_mut(), &mut critic, &real, &fake, shape, 9);
        // The transforms the call drew.
        let mut rng = Rng::seed_from_u64(9);
        let t_real = cons.transform(&real, shape, &mut rng).unwrap();
        let t_fake = cons.transform(&fake, shape, &mut rng).unwrap();
        assert_ne!(t_real.as_vec(), real.as_vec());
        let reference = |c: &mut Sequential| -> f64 {
            let mut term = |x: &Matrix, tx: &Matrix| -> f64 {
                let (d, dt) = (critic_values(c, x), critic_values(c, tx));
                d.iter().zip(&dt).map(|(a, b)| (a - b).powi(2)).sum::<f64>() / d.len() as f64
            };
            3.0 * term(&real, &t_real) + 2.0 * term(&fake, &t_fake)
        };
        let want = reference(&mut critic);
        assert!(want > 1e-4);
        assert!((loss.array() as f64 - want).abs() < 1e-5 * (1.0 + want));
        let grads = loss.backward();
        fd_check(&mut critic, grads, reference);
    }

    #[test]
    fn configs_deserialize_through_typetag_and_reject_bad_values() {
        let cfg: Box<dyn StabilizerConfig> =
            nash_core::serde_json::from_str(r#"{"type": "consistency", "lambda_real": 5, "flip": false}"#).unwrap();
        assert_eq!(cfg.build().unwrap().name(), "consistency");
        assert!(nash_core::serde_json::from_str::<Box<dyn StabilizerConfig>>(
            r#"{"type": "consistency", "lambda": 5}"#
        )
        .is_err());
        for (bad, field) in [
            (
                ConsistencyConfig {
                    lambda_real: -1.0,
                    ..Default::default()
                },
                "lambda_real",
            ),
            (
                ConsistencyConfig {
                    lambda_real: 0.0,
                    lambda_fake: 0.0,
                    ..Default::default()
                },
                "lambda_real",
            ),
            (
                ConsistencyConfig {
                    sigma: 0.0,
                    ..Default::default()
                },
                "sigma",
            ),
            (
                ConsistencyConfig {
                    translation_ratio: 2.0,
                    ..Default::default()
                },
                "translation_ratio",
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
