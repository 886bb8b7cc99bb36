//! `bigan`: the Bidirectional GAN (Donahue et al. 2017), also Adversarially Learned Inference
//! (ALI, Dumoulin et al. 2017): an encoder `E(x)`, a generator `G(z)` and a discriminator on the
//! joint pair `D(x, z)`, which sees `[x features, z]` concatenated into one flat vector.
//!
//! Equations, with `ℓ_D(real, fake)` the configured objective's discriminator loss (for
//! `non_saturating`: `BCE(real, 1) + BCE(fake, 0)`):
//!
//! - discriminator: `L_D = ℓ_D(D(x, E(x)), D(G(z), z))` (encoder and generator outputs detached);
//! - generator and encoder together, with the roles flipped (non-saturating for BCE):
//!   `L_GE = ℓ_D(D(G(z), z), D(x, E(x)))` = `BCE(D(G(z), z), 1) + BCE(D(x, E(x)), 0)`.

use std::collections::BTreeMap;

use nash_core::data::{Batch, DataInfo};
use nash_core::dfdx::prelude::*;
use nash_core::error::{Error, Result};
use nash_core::layers::{reestimate_statistics, BuildContext, Mode, Sequential, SequentialConfig};
use nash_core::loss::{AdversarialObjective, AdversarialObjectiveConfig};
use nash_core::model::{EvalContext, Model, ModelConfig, StepReport, TrainContext};
use nash_core::stabilizer::{InputRole, LossSite, Targets};
use nash_core::tensor::{Activation, Device, FeatureShape, Matrix, Param, Parameterized, Rng, Tape};
use serde::{Deserialize, Serialize};

use crate::began::{
    build_stack, check_sizes, data_input, default_generator, describe_stack, finite, non_empty, prefixed, run,
    run_const, stack_or,
};
use crate::mlp_gan::{mlp, Latent};
use crate::objective::NonSaturatingConfig;
use crate::step::{refuse_sample_selection, refuse_unrolling, schedule_discriminator_steps};

/// Config of [`Bigan`], `type = "bigan"` in pipeline files. Stacks left out are MLPs sized from
/// the data: generator latent-h-h-data (LeakyReLU(0.2), output activation from the data's range),
/// encoder data-h-h-latent (linear output), discriminator (data + latent)-h-h-1 (raw score).
#[derive(Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BiganConfig {
    /// Size of the latent code.
    pub latent_dim: usize,
    /// Distribution of the latent code (the prior the encoder is matched to).
    pub latent: Latent,
    /// Width of the hidden layers of the default stacks.
    pub hidden_dim: usize,
    /// The generator, from `[latent_dim]` to one sample (default: MLP).
    pub generator: Option<SequentialConfig>,
    /// The encoder, from one sample to `[latent_dim]` (default: MLP).
    pub encoder: Option<SequentialConfig>,
    /// The joint discriminator, from `[data features + latent_dim]` (flat) to one raw score
    /// (default: MLP).
    pub discriminator: Option<SequentialConfig>,
    /// The adversarial objective.
    pub objective: Box<dyn AdversarialObjectiveConfig>,
}

impl Default for BiganConfig {
    fn default() -> Self {
        BiganConfig {
            latent_dim: 32,
            latent: Latent::Normal,
            hidden_dim: 128,
            generator: None,
            encoder: None,
            discriminator: None,
            objective: Box::new(NonSaturatingConfig::default()),
        }
    }
}

impl BiganConfig {
    /// Builds the model for `data` (the typed form of [`ModelConfig::build`]).
    pub fn build_bigan(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<Bigan> {
        check_sizes(self.latent_dim, self.hidden_dim, None)?;
        self.latent.check("model.latent")?;
        let data_shape = data.sample_shape;
        let n = data_shape.numel();
        let (h, l) = (self.hidden_dim, self.latent_dim);
        let (default_g, default_e, default_d) =
            (default_generator(data, h), mlp(&[h, h], l, None), mlp(&[h, h], 1, None));
        let generator = build_stack(
            stack_or(&self.generator, &default_g),
            FeatureShape::Flat(l),
            Some((n, "one data sample")),
            ctx,
            "model.generator",
        )?;
        let encoder = build_stack(
            stack_or(&self.encoder, &default_e),
            data_shape,
            Some((l, "one latent code")),
            ctx,
            "model.encoder",
        )?;
        let discriminator = build_stack(
            stack_or(&self.discriminator, &default_d),
            FeatureShape::Flat(n + l),
            Some((1, "one raw score")),
            ctx,
            "model.discriminator",
        )?;
        Ok(Bigan {
            generator,
            encoder,
            discriminator,
            objective: self.objective.build()?,
            latent: self.latent,
            latent_dim: l,
            data_shape,
        })
    }
}

#[typetag::serde(name = "bigan")]
impl ModelConfig for BiganConfig {
    fn build(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<Box<dyn Model>> {
        Ok(Box::new(self.build_bigan(data, ctx)?))
    }
}

/// BiGAN / ALI. Parameter groups `discriminator` (`discriminator.*`) and `generator`, which holds
/// the generator and the encoder (`generator.generator.*`, `generator.encoder.*`).
///
/// Stabilizers: the data-space part of each pair passes through `transform_input` (role `real`
/// for `x`, `fake` for `G(z)`) before it is joined with its code, so input transforms must keep
/// the batch size (packing does not apply); the discriminator's targets pass through
/// `transform_targets`; extra terms are collected at [`LossSite::Discriminator`] (with the joint
/// pairs, shape `[data + latent]`) and [`LossSite::Generator`].
pub struct Bigan {
    generator: Sequential,
    encoder: Sequential,
    discriminator: Sequential,
    objective: Box<dyn AdversarialObjective>,
    latent: Latent,
    latent_dim: usize,
    data_shape: FeatureShape,
}

/// The joint discriminator input `[x, z]` of a pair, on the tape.
fn joint(x: Activation, z: Matrix<Tape>) -> Result<Activation> {
    let (xr, xc) = *x.value.shape();
    let (zr, zc) = *z.shape();
    if xr != zr {
        return Err(Error::unsupported(
            "bigan joint discriminator input",
            format!(
                "an input transform changed the batch from {zr} to {xr} samples; BiGAN pairs each sample with its \
                 code, so transforms that regroup samples (packing) cannot be used"
            ),
        ));
    }
    Activation::new((x.value, z).concat_along(Axis::<1>), FeatureShape::Flat(xc + zc))
}

/// The parameters of group `generator`: `generator.generator.*` and `generator.encoder.*`.
fn generator_group<'a>(generator: &'a mut Sequential, encoder: &'a mut Sequential) -> Vec<(String, &'a mut Param)> {
    let mut all = prefixed(generator.named_params_mut(), "generator.generator");
    all.extend(prefixed(encoder.named_params_mut(), "generator.encoder"));
    all
}

/// Mean of `sigmoid` over logits.
fn mean_sigmoid(logits: &[f32]) -> f64 {
    logits.iter().map(|&l| 1.0 / (1.0 + (-(l as f64)).exp())).sum::<f64>() / logits.len().max(1) as f64
}

impl Bigan {
    /// The generator `G(z)`.
    pub fn generator(&self) -> &Sequential {
        &self.generator
    }
    /// The encoder `E(x)`.
    pub fn encoder(&self) -> &Sequential {
        &self.encoder
    }
    /// The joint discriminator `D(x, z)`.
    pub fn discriminator(&self) -> &Sequential {
        &self.discriminator
    }
    /// Draws `n` latent codes.
    fn sample_latent(&self, n: usize, device: &Device, rng: &mut Rng) -> Matrix {
        self.latent.sample(n, self.latent_dim, device, rng)
    }
    /// `G(z)` on the tape.
    fn generate(&mut self, z: &Matrix, mode: Mode, rng: &mut Rng) -> Result<Activation> {
        run_const(
            &mut self.generator,
            z,
            FeatureShape::Flat(self.latent_dim),
            self.data_shape,
            mode,
            rng,
        )
    }
    /// `E(x)` on the tape.
    fn encode(&mut self, x: &Matrix, mode: Mode, rng: &mut Rng) -> Result<Matrix<Tape>> {
        let input = data_input("bigan", x, self.data_shape)?;
        Ok(run(&mut self.encoder, input, mode, rng)?.value)
    }
    /// Joint pairs `(x, E(x))` and `(G(z), z)` for a data batch, with the tape through `E` and
    /// `G` when `taped`, data inputs through the stabilizers' transforms.
    fn pairs(&mut self, x: &Matrix, taped: bool, ctx: &mut TrainContext<'_>) -> Result<(Activation, Activation)> {
        let z = self.sample_latent(x.shape().0, ctx.device, ctx.rng);
        let mut code = self.encode(x, Mode::Train, ctx.rng)?;
        let mut fake = self.generate(&z, Mode::Train, ctx.rng)?;
        if !taped {
            code = code.retaped::<NoneTape>().leaky_trace();
            fake = Activation::input(&fake.detach(), self.data_shape)?;
        }
        let real_x = Activation::input(x, self.data_shape)?;
        let (stabilizers, mut hooks) = ctx.hooks();
        let real_x = stabilizers.transform_input(InputRole::Real, real_x, &mut hooks)?;
        let fake_x = stabilizers.transform_input(InputRole::Fake, fake, &mut hooks)?;
        Ok((joint(real_x, code)?, joint(fake_x, z.leaky_trace())?))
    }

    /// `L_D = ℓ_D(D(x, E(x)), D(G(z), z))` plus the stabilizers' terms; updates only the
    /// discriminator.
    fn discriminator_step(&mut self, batch: &Batch, ctx: &mut TrainContext<'_>, report: &mut StepReport) -> Result<()> {
        let (real, fake) = self.pairs(&batch.inputs, false, ctx)?;
        let (real_seen, fake_seen, shape) = (real.detach(), fake.detach(), real.shape);
        let real_out = run(&mut self.discriminator, real, Mode::Train, ctx.rng)?.value;
        let fake_out = run(&mut self.discriminator, fake, Mode::Train, ctx.rng)?.value;
        report.diagnostic("d_real_mean", mean_sigmoid(&real_out.retaped::<NoneTape>().as_vec()));
        report.diagnostic("d_fake_mean", mean_sigmoid(&fake_out.retaped::<NoneTape>().as_vec()));
        let (stabilizers, mut hooks) = ctx.hooks();
        let mut targets = Targets {
            real: hooks.device.ones_like(real_out.shape()),
            fake: hooks.device.zeros_like(fake_out.shape()),
            fake_weight: 1.0,
        };
        stabilizers.transform_targets(&mut targets, &mut hooks)?;
        let mut loss = self
            .objective
            .discriminator_loss_with_targets(real_out, fake_out, &targets)?;
        report.loss("loss/discriminator", finite("loss/discriminator", &loss)?);
        let terms = stabilizers.extra_losses(
            &mut LossSite::Discriminator {
                critic: &mut self.discriminator,
                real: &real_seen,
                fake: &fake_seen,
                shape,
            },
            &mut hooks,
        )?;
        for (name, term) in terms {
            let key = format!("loss/discriminator/{name}");
            report.loss(key.clone(), finite(&key, &term)?);
            loss = loss + term;
        }
        let grads = loss.backward();
        let mut params = prefixed(self.discriminator.named_params_mut(), "discriminator");
        let norm = ctx.apply_gradients("discriminator", &mut params, grads)?;
        report.diagnostic("grad_norm/discriminator", norm);
        Ok(())
    }

    /// `L_GE = ℓ_D(D(G(z), z), D(x, E(x)))` (roles flipped) plus the stabilizers' terms; updates
    /// the generator and the encoder (group `generator`).
    fn generator_step(&mut self, batch: &Batch, ctx: &mut TrainContext<'_>, report: &mut StepReport) -> Result<()> {
        let (real, fake) = self.pairs(&batch.inputs, true, ctx)?;
        let real_out = run(&mut self.discriminator, real, Mode::Train, ctx.rng)?.value;
        let fake_out = run(&mut self.discriminator, fake, Mode::Train, ctx.rng)?.value;
        let mut loss = self.objective.discriminator_loss(fake_out, real_out)?;
        report.loss("loss/generator", finite("loss/generator", &loss)?);
        let (stabilizers, mut hooks) = ctx.hooks();
        for (name, term) in stabilizers.extra_losses(&mut LossSite::Generator, &mut hooks)? {
            let key = format!("loss/generator/{name}");
            report.loss(key.clone(), finite(&key, &term)?);
            loss = loss + term;
        }
        let grads = loss.backward();
        let mut params = self.generator_params_mut();
        let norm = ctx.apply_gradients("generator", &mut params, grads)?;
        report.diagnostic("grad_norm/generator", norm);
        Ok(())
    }

    /// The parameters of group `generator`: the generator's and the encoder's.
    fn generator_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        generator_group(&mut self.generator, &mut self.encoder)
    }

    /// `G(E(x))` in eval mode.
    fn reconstruction(&mut self, x: &Matrix, rng: &mut Rng) -> Result<Matrix> {
        let code = self.encode(x, Mode::Eval, rng)?.retaped::<NoneTape>();
        Ok(self.generate(&code, Mode::Eval, rng)?.detach())
    }
}

impl Parameterized for Bigan {
    fn named_params(&self) -> Vec<(String, &Param)> {
        let mut all = prefixed(self.discriminator.named_params(), "discriminator");
        all.extend(prefixed(self.generator.named_params(), "generator.generator"));
        all.extend(prefixed(self.encoder.named_params(), "generator.encoder"));
        all
    }
    fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        let mut all = prefixed(self.discriminator.named_params_mut(), "discriminator");
        all.extend(generator_group(&mut self.generator, &mut self.encoder));
        all
    }
}

impl Model for Bigan {
    fn family(&self) -> &str {
        "gan"
    }
    fn describe(&self) -> String {
        format!(
            "bigan: latent {} ({:?}), objective {}, data {}\n  generator {} -> {}:\n{}\n  encoder {} -> {}:\n{}\n  \
             joint discriminator {} -> {}:\n{}",
            self.latent_dim,
            self.latent,
            self.objective.name(),
            self.data_shape,
            self.generator.input_shape(),
            self.generator.output_shape(),
            describe_stack(&self.generator),
            self.encoder.input_shape(),
            self.encoder.output_shape(),
            describe_stack(&self.encoder),
            self.discriminator.input_shape(),
            self.discriminator.output_shape(),
            describe_stack(&self.discriminator),
        )
    }
    fn param_groups(&self) -> Vec<String> {
        vec!["discriminator".into(), "generator".into()]
    }
    /// One discriminator update, then one update of the generator and encoder.
    /// Runs the discriminator's single update only when the stabilizers' schedule (from 1, capped at 1,
    /// reported as `discriminator_steps`) keeps it: an adaptive step ratio may skip it (0); it
    /// cannot add updates. Unrolling is refused.
    fn train_step(&mut self, batch: &Batch, ctx: &mut TrainContext<'_>) -> Result<StepReport> {
        non_empty("bigan", batch)?;
        refuse_unrolling("bigan", ctx)?;
        refuse_sample_selection("bigan", ctx)?;
        let mut report = StepReport::default();
        if schedule_discriminator_steps(1, 1, ctx, &mut report) == 1 {
            self.discriminator_step(batch, ctx, &mut report)?;
        }
        self.generator_step(batch, ctx, &mut report)?;
        Ok(report)
    }
    /// Both losses on a held-out batch (eval mode, no stabilizers, no updates) and the mean
    /// squared error of `G(E(x))` against `x`.
    fn evaluate(&mut self, batch: &Batch, ctx: &mut EvalContext<'_>) -> Result<BTreeMap<String, f64>> {
        non_empty("bigan evaluation", batch)?;
        let x = &batch.inputs;
        let code = self.encode(x, Mode::Eval, ctx.rng)?.retaped::<NoneTape>();
        let z = self.sample_latent(batch.len(), ctx.device, ctx.rng);
        let fake = self.generate(&z, Mode::Eval, ctx.rng)?.detach();
        let real = joint(Activation::input(x, self.data_shape)?, code.leaky_trace())?;
        let fake = joint(Activation::input(&fake, self.data_shape)?, z.leaky_trace())?;
        let real_out = run(&mut self.discriminator, real, Mode::Eval, ctx.rng)?.detach();
        let fake_out = run(&mut self.discriminator, fake, Mode::Eval, ctx.rng)?.detach();
        let d = self
            .objective
            .discriminator_loss(real_out.leaky_trace(), fake_out.leaky_trace())?;
        let g = self
            .objective
            .discriminator_loss(fake_out.leaky_trace(), real_out.leaky_trace())?;
        let recon = self.reconstruction(x, ctx.rng)?.as_vec();
        let xs = x.as_vec();
        let mse = recon
            .iter()
            .zip(&xs)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            / xs.len() as f64;
        Ok(BTreeMap::from([
            ("loss/discriminator".to_string(), d.array() as f64),
            ("loss/generator".to_string(), g.array() as f64),
            ("d_real_mean".to_string(), mean_sigmoid(&real_out.as_vec())),
            ("d_fake_mean".to_string(), mean_sigmoid(&fake_out.as_vec())),
            ("bigan/reconstruction_mse".to_string(), mse),
        ]))
    }
    fn sample(&mut self, n: usize, ctx: &mut EvalContext<'_>) -> Result<Option<Matrix>> {
        let z = self.sample_latent(n, ctx.device, ctx.rng);
        Ok(Some(self.generate(&z, Mode::Eval, ctx.rng)?.detach()))
    }
    fn reestimates_statistics(&self, group: &str) -> bool {
        group == "generator"
    }
    fn reestimate_statistics(
        &mut self,
        group: &str,
        batches: usize,
        batch_size: usize,
        ctx: &mut EvalContext<'_>,
    ) -> Result<bool> {
        if group != "generator" {
            return Ok(false);
        }
        reestimate_statistics(
            self,
            |gan| &mut gan.generator,
            batches,
            |gan| {
                let z = gan.sample_latent(batch_size, ctx.device, ctx.rng);
                gan.generate(&z, Mode::Train, ctx.rng).map(drop)
            },
        )?;
        Ok(true)
    }
    /// `G(E(x))`.
    fn reconstruct(&mut self, batch: &Batch, ctx: &mut EvalContext<'_>) -> Result<Option<Matrix>> {
        non_empty("bigan reconstruction", batch)?;
        Ok(Some(self.reconstruction(&batch.inputs, ctx.rng)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::began::tests::{adam, batch, changed, info, mean_of, names_with, sgd, snapshot, train};
    use nash_core::rand::SeedableRng;
    use nash_core::stabilizer::StabilizerStack;

    fn tiny() -> BiganConfig {
        BiganConfig {
            latent_dim: 3,
            hidden_dim: 16,
            ..Default::default()
        }
    }

    fn build(cfg: &BiganConfig, dim: usize) -> Result<Bigan> {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        cfg.build_bigan(
            &info(dim),
            &mut BuildContext {
                device: &device,
                rng: &mut rng,
            },
        )
    }

    #[test]
    fn the_discriminator_sees_data_and_code_joined() {
        let model = build(&tiny(), 5).unwrap();
        assert_eq!(model.discriminator().input_shape(), FeatureShape::Flat(5 + 3));
        let first = model
            .named_params()
            .into_iter()
            .find(|(n, _)| n == "discriminator.0.weight")
            .unwrap();
        assert_eq!(first.1.shape, vec![8, 16]);
        assert_eq!(model.encoder().output_shape(), FeatureShape::Flat(3));
        // Every parameter belongs to one of the two groups.
        let all = model.named_params().len();
        assert_eq!(
            names_with(&model, "discriminator.").len() + names_with(&model, "generator.").len(),
            all
        );
        assert!(!names_with(&model, "generator.encoder.").is_empty());
        assert!(!names_with(&model, "generator.generator.").is_empty());
    }

    #[test]
    fn each_step_changes_only_its_groups_parameters() {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(1);
        let mut model = build(&tiny(), 5).unwrap();
        let data = batch(&device, 8, 5, &mut rng);
        let mut opts = sgd(&["discriminator", "generator"]);
        let mut stabilizers = StabilizerStack::default();
        let mut ctx = TrainContext {
            step: 0,
            device: &device,
            rng: &mut rng,
            optimizers: &mut opts,
            stabilizers: &mut stabilizers,
        };
        let before = snapshot(&model);
        let mut report = StepReport::default();
        model.discriminator_step(&data, &mut ctx, &mut report).unwrap();
        assert_eq!(
            changed(&before, &snapshot(&model)),
            names_with(&model, "discriminator.")
        );
        let before = snapshot(&model);
        model.generator_step(&data, &mut ctx, &mut report).unwrap();
        // Both the generator and the encoder move, nothing else.
        assert_eq!(changed(&before, &snapshot(&model)), names_with(&model, "generator."));
        assert!(report.losses["loss/generator"].is_finite());
    }

    #[test]
    fn generator_loss_is_the_flipped_discriminator_loss() {
        // For non_saturating, ℓ_D(fake, real) = BCE(D(G(z), z), 1) + BCE(D(x, E(x)), 0): check
        // the value against the formula on fixed scores.
        let device = Device::default();
        let real: Matrix = device.tensor_from_vec(vec![0.5, -1.0], (2, 1));
        let fake: Matrix = device.tensor_from_vec(vec![2.0, 0.0], (2, 1));
        let model = build(&tiny(), 2).unwrap();
        let g = model
            .objective
            .discriminator_loss(fake.leaky_trace(), real.leaky_trace())
            .unwrap()
            .array() as f64;
        let sp = |x: f64| (1.0 + x.exp()).ln(); // softplus
                                                // BCE(l, 1) = softplus(-l), BCE(l, 0) = softplus(l).
        let want = (sp(-2.0) + sp(0.0)) / 2.0 + (sp(0.5) + sp(-1.0)) / 2.0;
        assert!((g - want).abs() < 1e-5, "{g} vs {want}");
    }

    #[test]
    fn losses_are_finite_and_move_and_reconstruction_has_the_data_shape() {
        let mut model = build(&tiny(), 4).unwrap();
        let mut opts = adam(&["discriminator", "generator"], 2e-3);
        let reports = train(&mut model, &mut opts, 4, 40, 2);
        let early = mean_of(&reports[..8], "loss/discriminator");
        let late = mean_of(&reports[32..], "loss/discriminator");
        assert!((early - late).abs() > 1e-3, "{early} {late}");
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(9);
        let data = batch(&device, 6, 4, &mut rng);
        let mut ectx = EvalContext {
            device: &device,
            rng: &mut rng,
        };
        let eval = model.evaluate(&data, &mut ectx).unwrap();
        assert!(eval.values().all(|v| v.is_finite()), "{eval:?}");
        assert_eq!(*model.reconstruct(&data, &mut ectx).unwrap().unwrap().shape(), (6, 4));
        assert_eq!(*model.sample(3, &mut ectx).unwrap().unwrap().shape(), (3, 4));
    }

    #[test]
    fn wiring_errors_name_config_paths() {
        let mut cfg = tiny();
        cfg.encoder = Some(mlp(&[4], 2, None));
        let err = build(&cfg, 5).err().unwrap().to_string();
        assert!(err.contains("model.encoder") && err.contains("out_features 3"), "{err}");
        let mut cfg = tiny();
        cfg.discriminator = Some(mlp(&[4], 2, None));
        let err = build(&cfg, 5).err().unwrap().to_string();
        assert!(
            err.contains("model.discriminator") && err.contains("out_features 1"),
            "{err}"
        );
        let mut cfg = tiny();
        cfg.generator = Some(mlp(&[4], 4, None));
        let err = build(&cfg, 5).err().unwrap().to_string();
        assert!(
            err.contains("model.generator") && err.contains("out_features 5"),
            "{err}"
        );
        let json = r#"{"type": "bigan", "objective": {"type": "wasserstein"}, "latent_dim": 2}"#;
        let cfg: Box<dyn ModelConfig> = nash_core::serde_json::from_str(json).unwrap();
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        let model = cfg
            .build(
                &info(3),
                &mut BuildContext {
                    device: &device,
                    rng: &mut rng,
                },
            )
            .unwrap();
        assert!(model.describe().contains("wasserstein"));
    }
}
