//! `mlp_gan`: a generator and a discriminator made of runtime-shaped layer stacks, trained with
//! alternating discriminator and generator updates.

use std::collections::BTreeMap;

use nash_core::data::{Batch, DataInfo};
use nash_core::dfdx::prelude::*;
use nash_core::error::{Error, Result};
use nash_core::layers::activation::{LeakyReluConfig, TanhConfig};
use nash_core::layers::linear::LinearConfig;
use nash_core::layers::{
    reestimate_statistics, BuildContext, ForwardContext, LayerConfig, Mode, Sequential, SequentialConfig,
};
use nash_core::loss::{AdversarialObjective, AdversarialObjectiveConfig};
use nash_core::model::{EvalContext, Model, ModelConfig, StepReport, TrainContext};
use nash_core::rand::Rng as _;
use nash_core::rand_distr::{Distribution, StandardNormal};
use nash_core::tensor::{check_finite, Activation, Device, FeatureShape, Matrix, Param, Parameterized, Rng};
use serde::{Deserialize, Serialize};

use crate::objective::NonSaturatingConfig;
use crate::step::{
    describe_stack, discriminator_loss, generator_loss_terms, keep_best_fakes, mean_sigmoid, prefixed,
    schedule_discriminator_steps, transform_fake, transform_inputs, with_unrolled_discriminator, CriticSite,
    DiscriminatorStep, UnrollDiscriminator,
};

/// The distribution latent codes are drawn from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Latent {
    /// Standard normal, `N(0, I)`.
    #[default]
    Normal,
    /// Uniform on `[-1, 1]`.
    Uniform,
    /// A uniform mixture of `components` Gaussians `N(μ_k, std² I)` whose means are fixed, drawn once
    /// from `N(0, I)` by `seed` (the static Gaussian-mixture prior of Ben-Yosef & Weinshall 2018,
    /// "Gaussian Mixture Generative Adversarial Networks for Diverse Datasets"; DeLiGAN, Gurumurthy
    /// et al. 2017, learns the same prior's parameters). A connected latent space forces a continuous
    /// generator to put samples on the "bridges" between separated modes; well-separated components
    /// let it map each component into one mode. In pipeline files:
    /// `latent = { mixture = { components = 100, std = 0.1 } }`.
    Mixture {
        /// Number of components (at least 1), each drawn with probability `1 / components`.
        components: usize,
        /// Standard deviation of each component (positive).
        std: f32,
        /// Seed of the component means, which are part of the model: keep it when resuming.
        #[serde(default)]
        seed: u64,
    },
}

impl Latent {
    /// Checks the distribution's parameters; errors name `path` (the config path of `latent`).
    pub fn check(&self, path: &str) -> Result<()> {
        if let Latent::Mixture { components, std, .. } = *self {
            if components == 0 {
                return Err(Error::config(
                    format!("{path}.mixture.components"),
                    "must be at least 1",
                ));
            }
            if !(std.is_finite() && std > 0.0) {
                return Err(Error::config(
                    format!("{path}.mixture.std"),
                    format!("must be a positive number, got {std}"),
                ));
            }
        }
        Ok(())
    }

    /// Draws an `[n, dim]` matrix of latent codes.
    pub fn sample(&self, n: usize, dim: usize, device: &Device, rng: &mut Rng) -> Matrix {
        let values: Vec<f32> = match *self {
            Latent::Normal => (0..n * dim).map(|_| StandardNormal.sample(rng)).collect(),
            Latent::Uniform => (0..n * dim).map(|_| rng.gen_range(-1.0f32..=1.0)).collect(),
            Latent::Mixture { components, std, seed } => {
                let means = mixture_means(components, dim, seed);
                let mut values = Vec::with_capacity(n * dim);
                for _ in 0..n {
                    let k = rng.gen_range(0..components);
                    for &mean in &means[k * dim..(k + 1) * dim] {
                        let noise: f32 = StandardNormal.sample(rng);
                        values.push(mean + std * noise);
                    }
                }
                values
            }
        };
        device.tensor_from_vec(values, (n, dim))
    }
}

/// The `[components, dim]` means of a [`Latent::Mixture`], row-major: `N(0, I)` draws of a generator
/// seeded by `seed` alone, so the same config always has the same means.
fn mixture_means(components: usize, dim: usize, seed: u64) -> Vec<f32> {
    use nash_core::rand::SeedableRng as _;
    let mut rng = Rng::seed_from_u64(seed ^ 0x6d69_7874_7572_6521);
    (0..components * dim).map(|_| StandardNormal.sample(&mut rng)).collect()
}

/// Config of [`MlpGan`], `type = "mlp_gan"` in pipeline files. The defaults are the reference MLP
/// GAN for 784-dimensional data: generator 100-128-256-512-784 with LeakyReLU(0.2) after each
/// hidden layer and a tanh output; discriminator 784-256-512-1 with LeakyReLU(0.2) and a raw logit.
/// Layer input sizes follow from the latent size and the data; the generator's last layer must
/// produce one sample of the data and the discriminator's one score.
#[derive(Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MlpGanConfig {
    /// Size of the latent code.
    pub latent_dim: usize,
    /// Distribution of the latent code.
    pub latent: Latent,
    /// The generator, from `[latent_dim]` to one data sample.
    pub generator: SequentialConfig,
    /// The discriminator, from one data sample to one raw score.
    pub discriminator: SequentialConfig,
    /// The adversarial objective.
    pub objective: Box<dyn AdversarialObjectiveConfig>,
    /// Discriminator updates per generator update (n_critic). Every one sees the step's real batch
    /// with freshly drawn fakes.
    pub discriminator_steps: usize,
}

/// A linear layer of `out` features.
fn linear(out: usize) -> Box<dyn LayerConfig> {
    Box::new(LinearConfig::new(out))
}

/// A LeakyReLU with negative slope 0.2.
fn leaky() -> Box<dyn LayerConfig> {
    Box::new(LeakyReluConfig::new(0.2))
}

/// A multilayer perceptron: `linear -> LeakyReLU(0.2)` for each of `hidden`, then a linear layer
/// of `out` features followed by `output` (if any).
pub fn mlp(hidden: &[usize], out: usize, output: Option<Box<dyn LayerConfig>>) -> SequentialConfig {
    let mut layers: Vec<Box<dyn LayerConfig>> = Vec::new();
    for &h in hidden {
        layers.push(linear(h));
        layers.push(leaky());
    }
    layers.push(linear(out));
    layers.extend(output);
    SequentialConfig { layers }
}

impl MlpGanConfig {
    /// The reference generator: 128-256-512-784, LeakyReLU(0.2) hidden, tanh output.
    pub fn reference_generator() -> SequentialConfig {
        mlp(&[128, 256, 512], 784, Some(Box::new(TanhConfig::default())))
    }
    /// The reference discriminator: 256-512-1, LeakyReLU(0.2) hidden, raw logit output.
    pub fn reference_discriminator() -> SequentialConfig {
        mlp(&[256, 512], 1, None)
    }
}

impl Default for MlpGanConfig {
    fn default() -> Self {
        MlpGanConfig {
            latent_dim: 100,
            latent: Latent::Normal,
            generator: Self::reference_generator(),
            discriminator: Self::reference_discriminator(),
            objective: Box::new(NonSaturatingConfig::default()),
            discriminator_steps: 1,
        }
    }
}

impl MlpGanConfig {
    /// Builds the model for `data` (the typed form of [`ModelConfig::build`]).
    pub fn build_gan(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<MlpGan> {
        MlpGan::from_stacks(
            GanParts {
                kind: "mlp_gan",
                latent_dim: self.latent_dim,
                latent: self.latent,
                generator: &self.generator,
                discriminator: &self.discriminator,
                objective: self.objective.as_ref(),
                discriminator_steps: self.discriminator_steps,
            },
            data,
            ctx,
        )
    }
}

/// What [`MlpGan::from_stacks`] builds a GAN from: the fields of a config.
pub struct GanParts<'a> {
    /// The model's `type` tag, used in descriptions and errors (`mlp_gan`, `dcgan`).
    pub kind: &'static str,
    /// Size of the latent code.
    pub latent_dim: usize,
    /// Distribution of the latent code.
    pub latent: Latent,
    /// The generator, from `[latent_dim]` to one data sample.
    pub generator: &'a SequentialConfig,
    /// The discriminator, from one data sample to one raw score.
    pub discriminator: &'a SequentialConfig,
    /// The adversarial objective.
    pub objective: &'a dyn AdversarialObjectiveConfig,
    /// Discriminator updates per generator update.
    pub discriminator_steps: usize,
}

impl MlpGan {
    /// Builds a GAN of two stacks for `data`, checking that the generator produces one sample of
    /// the data and the discriminator one score (errors name `model.generator` etc.).
    pub fn from_stacks(parts: GanParts<'_>, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<MlpGan> {
        let GanParts {
            kind,
            latent_dim,
            latent,
            generator,
            discriminator,
            objective,
            discriminator_steps,
        } = parts;
        if latent_dim == 0 {
            return Err(Error::config("model.latent_dim", "must be at least 1"));
        }
        latent.check("model.latent")?;
        if discriminator_steps == 0 {
            return Err(Error::config(
                "model.discriminator_steps",
                "must be at least 1 (discriminator updates per generator update)",
            ));
        }
        let data_shape = data.sample_shape;
        let generator = generator.build(FeatureShape::Flat(latent_dim), ctx, "model.generator")?;
        let produced = generator.output_shape().numel();
        if produced != data_shape.numel() {
            return Err(Error::config(
                "model.generator",
                format!(
                    "the generator produces {produced} features per sample but the data's samples are {data_shape} \
                     ({} features); make its last linear layer's out_features {}",
                    data_shape.numel(),
                    data_shape.numel()
                ),
            ));
        }
        let discriminator = discriminator.build(data_shape, ctx, "model.discriminator")?;
        let scores = discriminator.output_shape();
        if scores.numel() != 1 {
            return Err(Error::config(
                "model.discriminator",
                format!(
                    "the discriminator must output one score per sample, but produces {scores}; make its last \
                     linear layer's out_features 1 (and leave its output as a raw logit)"
                ),
            ));
        }
        let objective = objective.build()?;
        Ok(MlpGan {
            kind,
            generator,
            discriminator,
            objective,
            latent_dim,
            latent,
            discriminator_steps,
            data_shape,
        })
    }
}

#[typetag::serde(name = "mlp_gan")]
impl ModelConfig for MlpGanConfig {
    fn build(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<Box<dyn Model>> {
        Ok(Box::new(self.build_gan(data, ctx)?))
    }
}

/// A GAN of two layer stacks. Parameter groups `discriminator` and `generator`; parameter names
/// `discriminator.<index>.<param>` and `generator.<index>.<param>`.
pub struct MlpGan {
    kind: &'static str,
    generator: Sequential,
    discriminator: Sequential,
    objective: Box<dyn AdversarialObjective>,
    latent_dim: usize,
    latent: Latent,
    discriminator_steps: usize,
    data_shape: FeatureShape,
}

impl MlpGan {
    /// The generator.
    pub fn generator(&self) -> &Sequential {
        &self.generator
    }
    /// The discriminator.
    pub fn discriminator(&self) -> &Sequential {
        &self.discriminator
    }
    /// The adversarial objective.
    pub fn objective(&self) -> &dyn AdversarialObjective {
        self.objective.as_ref()
    }
    /// Size of the latent code.
    pub fn latent_dim(&self) -> usize {
        self.latent_dim
    }
    /// The per-sample shape of the data (and of generated samples).
    pub fn data_shape(&self) -> FeatureShape {
        self.data_shape
    }
    /// Draws `n` latent codes.
    pub fn sample_latent(&self, n: usize, device: &Device, rng: &mut Rng) -> Matrix {
        self.latent.sample(n, self.latent_dim, device, rng)
    }
    /// Runs the generator on latent codes `z` (`[n, latent_dim]`) in `mode`, on the tape.
    pub fn generate(&mut self, z: &Matrix, mode: Mode, rng: &mut Rng) -> Result<Activation> {
        let out = self.generator.forward(
            Activation::data(z, FeatureShape::Flat(self.latent_dim))?,
            &mut ForwardContext { mode, rng },
        )?;
        Activation::new(out.value, self.data_shape)
    }
    /// Runs the discriminator on samples `x` (`[n, features]`) in eval mode: raw scores `[n, 1]`.
    pub fn score(&mut self, x: &Matrix, rng: &mut Rng) -> Result<Matrix> {
        let input = self.data_input(x)?;
        let out = self
            .discriminator
            .forward(input, &mut ForwardContext { mode: Mode::Eval, rng })?;
        Ok(out.detach())
    }

    /// A data batch as a fresh-tape activation, checking its width.
    fn data_input(&self, x: &Matrix) -> Result<Activation> {
        let cols = x.shape().1;
        if cols != self.data_shape.numel() {
            return Err(Error::shape(
                format!("{} input batch", self.kind),
                format!("{} features per sample ({})", self.data_shape.numel(), self.data_shape),
                cols,
            ));
        }
        Activation::data(x, self.data_shape)
    }

    /// One discriminator update on `batch` and fresh fakes (detached from the generator): inputs
    /// through the stabilizers' transforms, targets through theirs, the objective plus the
    /// stabilizers' extra terms, then only the discriminator's parameters are updated.
    pub(crate) fn discriminator_step(
        &mut self,
        batch: &Batch,
        ctx: &mut TrainContext<'_>,
    ) -> Result<DiscriminatorStep> {
        let n = batch.len();
        let z = self.sample_latent(n, ctx.device, ctx.rng);
        // Fakes without the generator's history: this update must not reach the generator.
        let fake = self.generate(&z, Mode::Train, ctx.rng)?.detach();
        let real_in = self.data_input(&batch.inputs)?;
        let fake_in = Activation::data(&fake, self.data_shape)?;
        let (real_in, fake_in) = transform_inputs(ctx, real_in, fake_in)?;
        let real_seen = real_in.detach();
        let fake_seen = fake_in.detach();
        let seen_shape = real_in.shape;
        let mut fwd = ForwardContext {
            mode: Mode::Train,
            rng: ctx.rng,
        };
        let real_out = self.discriminator.forward(real_in, &mut fwd)?;
        let fake_out = self.discriminator.forward(fake_in, &mut fwd)?;
        let real_scores = real_out.detach();
        let real_mean = mean_sigmoid(&real_scores.as_vec());
        let fake_mean = mean_sigmoid(&fake_out.detach().as_vec());
        let d = discriminator_loss(
            self.objective.as_ref(),
            real_out.value,
            fake_out.value,
            CriticSite {
                critic: &mut self.discriminator,
                real: &real_seen,
                fake: &fake_seen,
                shape: seen_shape,
            },
            ctx,
        )?;
        let grads = d.loss.backward();
        let mut params = prefixed(self.discriminator.named_params_mut(), "discriminator");
        let grad_norm = ctx.apply_gradients("discriminator", &mut params, grads)?;
        Ok(DiscriminatorStep {
            loss: d.objective,
            real_mean,
            fake_mean,
            grad_norm,
            extras: d.extras,
            real_scores,
            real_sign: d.real_sign,
            halves: d.halves,
        })
    }

    /// One generator update. `real_scores` are the discriminator's outputs on this step's real
    /// samples from the last discriminator update (before that update), handed to the objective
    /// for relativistic losses without another forward pass.
    pub(crate) fn generator_step(
        &mut self,
        n: usize,
        real_scores: &Matrix,
        ctx: &mut TrainContext<'_>,
        report: &mut StepReport,
    ) -> Result<()> {
        let z = self.sample_latent(n, ctx.device, ctx.rng);
        let fake = self.generate(&z, Mode::Train, ctx.rng)?;
        let fake_in = transform_fake(ctx, fake)?;
        // Frozen: the discriminator's weight gradients would be thrown away.
        let fake_out = self.discriminator.forward_frozen(
            fake_in,
            &mut ForwardContext {
                mode: Mode::Train,
                rng: ctx.rng,
            },
        )?;
        let kept = keep_best_fakes(fake_out.value, ctx, report)?;
        let loss = self.objective.generator_loss(kept, Some(real_scores))?;
        report.loss("loss/generator", check_finite("loss/generator", loss.array())? as f64);
        let loss = generator_loss_terms(loss, ctx, report)?;
        // Only the generator's gradients are handed to the optimizer (stabilizer terms through
        // the discriminator's own tape ops may still give it some).
        let grads = loss.backward();
        let mut params = prefixed(self.generator.named_params_mut(), "generator");
        let norm = ctx.apply_gradients("generator", &mut params, grads)?;
        report.diagnostic("grad_norm/generator", norm);
        Ok(())
    }
}

impl UnrollDiscriminator for MlpGan {
    fn unrolled_update(&mut self, batch: &Batch, ctx: &mut TrainContext<'_>) -> Result<DiscriminatorStep> {
        self.discriminator_step(batch, ctx)
    }
    fn discriminator_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        prefixed(self.discriminator.named_params_mut(), "discriminator")
    }
}

impl Parameterized for MlpGan {
    fn named_params(&self) -> Vec<(String, &Param)> {
        let mut all = prefixed(self.discriminator.named_params(), "discriminator");
        all.extend(prefixed(self.generator.named_params(), "generator"));
        all
    }
    fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        let mut all = prefixed(self.discriminator.named_params_mut(), "discriminator");
        all.extend(prefixed(self.generator.named_params_mut(), "generator"));
        all
    }
}

impl Model for MlpGan {
    fn family(&self) -> &str {
        "gan"
    }
    fn describe(&self) -> String {
        format!(
            "{}: latent {} ({:?}), objective {}, {} discriminator step(s) per generator step, data {}\n  \
             generator {} -> {}:\n{}\n  discriminator {} -> {}:\n{}",
            self.kind,
            self.latent_dim,
            self.latent,
            self.objective.name(),
            self.discriminator_steps,
            self.data_shape,
            self.generator.input_shape(),
            self.generator.output_shape(),
            describe_stack(&self.generator),
            self.discriminator.input_shape(),
            self.discriminator.output_shape(),
            describe_stack(&self.discriminator),
        )
    }
    fn param_groups(&self) -> Vec<String> {
        vec!["discriminator".into(), "generator".into()]
    }
    /// Discriminator updates (each on the batch's real samples and fresh fakes, detached from the
    /// generator), as many as the stabilizers schedule from `discriminator_steps` (reported as
    /// `discriminator_steps`; an adaptive ratio may skip them all), then one generator update
    /// through the discriminator, unrolled `k` updates ahead when a stabilizer asks for it
    /// ([`with_unrolled_discriminator`]). When no discriminator update ran, the real scores a
    /// relativistic generator loss needs come from the discriminator in eval mode.
    fn train_step(&mut self, batch: &Batch, ctx: &mut TrainContext<'_>) -> Result<StepReport> {
        if batch.is_empty() {
            return Err(Error::shape(format!("{} batch", self.kind), "at least one sample", 0));
        }
        let mut report = StepReport::default();
        let count = schedule_discriminator_steps(self.discriminator_steps, usize::MAX, ctx, &mut report);
        let steps = (0..count)
            .map(|_| self.discriminator_step(batch, ctx))
            .collect::<Result<Vec<_>>>()?;
        DiscriminatorStep::report(&steps, &mut report);
        let real_scores = match steps.last() {
            Some(d) => d.real_scores.clone(),
            None => self.score(&batch.inputs, ctx.rng)?,
        };
        let unrolled = ctx.stabilizers.unrolled_steps();
        with_unrolled_discriminator(self, batch, unrolled, ctx, &mut report, |m, ctx, report| {
            m.generator_step(batch.len(), &real_scores, ctx, report)
        })?;
        Ok(report)
    }
    /// Discriminator and generator losses on a held-out batch with fresh fakes, in eval mode,
    /// without stabilizers or updates.
    fn evaluate(&mut self, batch: &Batch, ctx: &mut EvalContext<'_>) -> Result<BTreeMap<String, f64>> {
        if batch.is_empty() {
            return Err(Error::shape(
                format!("{} evaluation batch", self.kind),
                "at least one sample",
                0,
            ));
        }
        let z = self.sample_latent(batch.len(), ctx.device, ctx.rng);
        let fake = self.generate(&z, Mode::Eval, ctx.rng)?.detach();
        let real_scores = self.score(&batch.inputs, ctx.rng)?;
        let fake_scores = self.score(&fake, ctx.rng)?;
        let d = self
            .objective
            .discriminator_loss(real_scores.leaky_trace(), fake_scores.leaky_trace())?;
        let g = self
            .objective
            .generator_loss(fake_scores.leaky_trace(), Some(&real_scores))?;
        let mut out = BTreeMap::new();
        out.insert("loss/discriminator".into(), d.array() as f64);
        out.insert("loss/generator".into(), g.array() as f64);
        out.insert("d_real_mean".into(), mean_sigmoid(&real_scores.as_vec()));
        out.insert("d_fake_mean".into(), mean_sigmoid(&fake_scores.as_vec()));
        Ok(out)
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
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;
    use nash_core::optim::adam::AdamConfig;
    use nash_core::optim::sgd::SgdConfig;
    use nash_core::optim::{Optimizer, OptimizerConfig};
    use nash_core::rand::SeedableRng;
    use nash_core::stabilizer::{HookContext, InputRole, LossSite, Stabilizer, StabilizerStack, Targets};
    use nash_core::tensor::Scalar;

    fn info(n: usize) -> DataInfo {
        DataInfo {
            sample_shape: FeatureShape::Flat(n),
            num_classes: None,
            value_range: (-1.0, 1.0),
        }
    }

    /// A tiny GAN on `dim`-dimensional data: G latent-8-dim, D dim-8-1.
    fn tiny_config(latent_dim: usize, dim: usize) -> MlpGanConfig {
        MlpGanConfig {
            latent_dim,
            generator: mlp(&[8], dim, None),
            discriminator: mlp(&[8], 1, None),
            ..Default::default()
        }
    }

    fn build(cfg: &MlpGanConfig, dim: usize, seed: u64) -> Result<MlpGan> {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(seed);
        cfg.build_gan(
            &info(dim),
            &mut BuildContext {
                device: &device,
                rng: &mut rng,
            },
        )
    }

    fn optimizers(cfg: &dyn OptimizerConfig) -> BTreeMap<String, Box<dyn Optimizer>> {
        ["discriminator", "generator"]
            .into_iter()
            .map(|g| (g.to_string(), cfg.build().unwrap()))
            .collect()
    }

    fn sgd() -> BTreeMap<String, Box<dyn Optimizer>> {
        optimizers(&SgdConfig {
            lr: 0.1,
            ..Default::default()
        })
    }

    fn snapshot(model: &MlpGan) -> BTreeMap<String, Vec<f32>> {
        model.named_params().into_iter().map(|(n, p)| (n, p.to_vec())).collect()
    }

    /// The names of the parameters that differ between two snapshots.
    fn changed(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> Vec<String> {
        a.iter().filter(|(k, v)| b[*k] != **v).map(|(k, _)| k.clone()).collect()
    }

    fn batch(device: &Device, rows: usize, dim: usize, rng: &mut Rng) -> Batch {
        let values: Vec<f32> = (0..rows * dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        Batch {
            inputs: device.tensor_from_vec(values, (rows, dim)),
            shape: FeatureShape::Flat(dim),
            labels: None,
        }
    }

    #[test]
    fn discriminator_step_updates_only_the_discriminator_and_generator_step_only_the_generator() {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(1);
        let mut model = build(&tiny_config(3, 2), 2, 0).unwrap();
        let data = batch(&device, 16, 2, &mut rng);
        let mut opts = sgd();
        let mut stabilizers = StabilizerStack::default();
        let mut ctx = TrainContext {
            step: 0,
            device: &device,
            rng: &mut rng,
            optimizers: &mut opts,
            stabilizers: &mut stabilizers,
        };
        let all: Vec<String> = model.named_params().into_iter().map(|(n, _)| n).collect();
        let mut d_names: Vec<String> = all
            .iter()
            .filter(|n| n.starts_with("discriminator."))
            .cloned()
            .collect();
        let mut g_names: Vec<String> = all.iter().filter(|n| n.starts_with("generator.")).cloned().collect();
        assert_eq!(d_names.len() + g_names.len(), all.len());
        assert_eq!(
            d_names,
            [
                "discriminator.0.weight",
                "discriminator.0.bias",
                "discriminator.2.weight",
                "discriminator.2.bias"
            ]
        );
        // `changed` lists names sorted.
        d_names.sort();
        g_names.sort();

        let before = snapshot(&model);
        let d = model.discriminator_step(&data, &mut ctx).unwrap();
        assert!(d.grad_norm > 0.0 && d.loss.is_finite());
        assert_eq!(changed(&before, &snapshot(&model)), d_names);

        let before = snapshot(&model);
        let mut report = StepReport::default();
        model.generator_step(16, &d.real_scores, &mut ctx, &mut report).unwrap();
        assert_eq!(changed(&before, &snapshot(&model)), g_names);
        assert!(report.diagnostics["grad_norm/generator"] > 0.0);
    }

    /// Records every hook call, and adds `weight * Σ fake` as an extra discriminator loss.
    struct Recorder {
        log: Rc<RefCell<Vec<String>>>,
        weight: f32,
    }

    impl Stabilizer for Recorder {
        fn name(&self) -> &str {
            "recorder"
        }
        fn transform_input(
            &mut self,
            role: InputRole,
            input: Activation,
            _: &mut HookContext<'_>,
        ) -> Result<Activation> {
            self.log
                .borrow_mut()
                .push(format!("input {role:?} {}", input.batch_size()));
            Ok(input)
        }
        fn transform_targets(&mut self, targets: &mut Targets, _: &mut HookContext<'_>) -> Result<()> {
            self.log
                .borrow_mut()
                .push(format!("targets {:?}", targets.real.shape()));
            Ok(())
        }
        fn extra_loss(
            &mut self,
            site: &mut LossSite<'_>,
            ctx: &mut HookContext<'_>,
        ) -> Result<Option<(String, Scalar)>> {
            self.log.borrow_mut().push(format!("loss {}", site.group()));
            if let LossSite::Discriminator {
                critic,
                real,
                fake,
                shape,
            } = site
            {
                assert_eq!(real.shape(), fake.shape());
                let out = critic.forward(
                    Activation::input(fake, *shape)?,
                    &mut ForwardContext {
                        mode: Mode::Train,
                        rng: ctx.rng,
                    },
                )?;
                return Ok(Some(("probe".into(), out.value.sum() * self.weight)));
            }
            Ok(None)
        }
        fn after_update(
            &mut self,
            group: &str,
            params: &mut [(String, &mut Param)],
            _: &mut HookContext<'_>,
        ) -> Result<()> {
            self.log.borrow_mut().push(format!("update {group} {}", params.len()));
            Ok(())
        }
    }

    #[test]
    fn train_step_calls_the_hooks_in_order_and_reports_extra_terms() {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(2);
        let mut cfg = tiny_config(3, 2);
        cfg.discriminator_steps = 2;
        let mut model = build(&cfg, 2, 0).unwrap();
        let data = batch(&device, 8, 2, &mut rng);
        let log = Rc::new(RefCell::new(Vec::new()));
        let mut stabilizers = StabilizerStack::new(vec![Box::new(Recorder {
            log: log.clone(),
            weight: 0.5,
        })])
        .unwrap();
        let mut opts = sgd();
        let mut ctx = TrainContext {
            step: 0,
            device: &device,
            rng: &mut rng,
            optimizers: &mut opts,
            stabilizers: &mut stabilizers,
        };
        let report = model.train_step(&data, &mut ctx).unwrap();
        let d_step = [
            "input Real 8",
            "input Fake 8",
            "targets (8, 1)",
            "loss discriminator",
            "update discriminator 4",
        ];
        let mut want: Vec<&str> = d_step.iter().chain(d_step.iter()).copied().collect();
        want.extend(["input Fake 8", "loss generator", "update generator 4"]);
        assert_eq!(*log.borrow(), want);
        for key in ["loss/discriminator", "loss/generator", "loss/discriminator/probe"] {
            assert!(report.losses[key].is_finite(), "{key} in {report:?}");
        }
        for key in ["d_real_mean", "d_fake_mean"] {
            let v = report.diagnostics[key];
            assert!((0.0..=1.0).contains(&v), "{key} = {v}");
        }
        assert!(report.diagnostics["grad_norm/discriminator"] > 0.0);
    }

    #[test]
    fn extra_loss_terms_reach_the_discriminator_gradients() {
        // The same step with and without a large extra term must update the discriminator
        // differently: the term is added to the loss before backward.
        let run = |weight: f32| {
            let device = Device::default();
            let mut rng = Rng::seed_from_u64(3);
            let mut model = build(&tiny_config(3, 2), 2, 0).unwrap();
            let data = batch(&device, 8, 2, &mut rng);
            let mut stabilizers = StabilizerStack::new(vec![Box::new(Recorder {
                log: Rc::default(),
                weight,
            })])
            .unwrap();
            let mut opts = sgd();
            let mut ctx = TrainContext {
                step: 0,
                device: &device,
                rng: &mut rng,
                optimizers: &mut opts,
                stabilizers: &mut stabilizers,
            };
            model.discriminator_step(&data, &mut ctx).unwrap().grad_norm
        };
        let (without, with) = (run(0.0), run(10.0));
        assert!((with - without).abs() > 1e-3, "{without} vs {with}");
    }

    #[test]
    fn the_default_is_the_reference_mlp_gan() {
        let model = build(&MlpGanConfig::default(), 784, 0).unwrap();
        let shapes: Vec<(String, Vec<usize>)> = model
            .named_params()
            .into_iter()
            .filter(|(n, _)| n.ends_with("weight"))
            .map(|(n, p)| (n, p.shape.clone()))
            .collect();
        let want = [
            ("discriminator.0.weight", vec![784, 256]),
            ("discriminator.2.weight", vec![256, 512]),
            ("discriminator.4.weight", vec![512, 1]),
            ("generator.0.weight", vec![100, 128]),
            ("generator.2.weight", vec![128, 256]),
            ("generator.4.weight", vec![256, 512]),
            ("generator.6.weight", vec![512, 784]),
        ];
        let want: Vec<(String, Vec<usize>)> = want.into_iter().map(|(n, s)| (n.to_string(), s)).collect();
        assert_eq!(shapes, want);
        assert_eq!(model.param_groups(), ["discriminator", "generator"]);
        let text = model.describe();
        assert!(text.contains("tanh") && text.contains("non_saturating"), "{text}");
    }

    #[test]
    fn bad_wiring_names_the_config_path() {
        // Generator output 3 for 2-dimensional data.
        let err = build(&tiny_config(3, 3), 2, 0).err().unwrap().to_string();
        assert!(
            err.contains("model.generator") && err.contains("out_features 2"),
            "{err}"
        );
        // Discriminator with two outputs.
        let mut cfg = tiny_config(3, 2);
        cfg.discriminator = mlp(&[8], 2, None);
        let err = build(&cfg, 2, 0).err().unwrap().to_string();
        assert!(
            err.contains("model.discriminator") && err.contains("one score"),
            "{err}"
        );
        let mut cfg = tiny_config(3, 2);
        cfg.latent_dim = 0;
        let err = build(&cfg, 2, 0).err().unwrap().to_string();
        assert!(err.contains("model.latent_dim"), "{err}");
        let mut cfg = tiny_config(3, 2);
        cfg.discriminator_steps = 0;
        let err = build(&cfg, 2, 0).err().unwrap().to_string();
        assert!(err.contains("model.discriminator_steps"), "{err}");
        // A batch of the wrong width is refused, not broadcast.
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        let mut model = build(&tiny_config(3, 2), 2, 0).unwrap();
        let wrong = batch(&device, 4, 3, &mut rng);
        let mut ectx = EvalContext {
            device: &device,
            rng: &mut rng,
        };
        let err = model.evaluate(&wrong, &mut ectx).unwrap_err().to_string();
        assert!(err.contains("2 features per sample"), "{err}");
    }

    #[test]
    fn config_parses_from_a_pipeline_table() {
        let json = r#"{"type": "mlp_gan", "latent_dim": 4, "latent": "uniform",
            "objective": {"type": "wasserstein"}, "discriminator_steps": 3,
            "generator": {"layers": [{"type": "linear", "out_features": 2}]},
            "discriminator": {"layers": [{"type": "linear", "out_features": 1}]}}"#;
        let cfg: Box<dyn ModelConfig> = nash_core::serde_json::from_str(json).unwrap();
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        let model = cfg
            .build(
                &info(2),
                &mut BuildContext {
                    device: &device,
                    rng: &mut rng,
                },
            )
            .unwrap();
        assert!(model.describe().contains("wasserstein"), "{}", model.describe());
        let typo = r#"{"type": "mlp_gan", "latent_dims": 4}"#;
        let err = nash_core::serde_json::from_str::<Box<dyn ModelConfig>>(typo)
            .unwrap_err()
            .to_string();
        assert!(err.contains("latent_dims"), "{err}");
    }

    #[test]
    fn mixture_latent_draws_each_fixed_component_equally_with_its_width() {
        let (components, dim, std) = (4, 3, 0.05f32);
        let latent = Latent::Mixture {
            components,
            std,
            seed: 7,
        };
        let means = mixture_means(components, dim, 7);
        assert_eq!(
            means,
            mixture_means(components, dim, 7),
            "the seed alone fixes the means"
        );
        assert_ne!(means, mixture_means(components, dim, 8));
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        let n = 8000;
        let z = latent.sample(n, dim, &device, &mut rng).as_vec();
        let mut counts = vec![0usize; components];
        let mut squared_offsets = 0.0f64;
        for code in z.chunks(dim) {
            // Components drawn from N(0, I) in 3-D are far apart next to std 0.05: the nearest
            // mean is the component the code was drawn from.
            let distance = |k: usize| -> f64 {
                code.iter()
                    .zip(&means[k * dim..(k + 1) * dim])
                    .map(|(c, m)| f64::from(c - m).powi(2))
                    .sum()
            };
            let k = (0..components)
                .min_by(|&a, &b| distance(a).total_cmp(&distance(b)))
                .unwrap();
            counts[k] += 1;
            squared_offsets += distance(k);
        }
        // Each component 1/4 of the draws: binomial standard deviation sqrt(8000 * 3/16) ≈ 39.
        for count in &counts {
            assert!(count.abs_diff(n / components) < 200, "{counts:?}");
        }
        let measured_std = (squared_offsets / (n * dim) as f64).sqrt();
        assert!((measured_std - 0.05).abs() < 0.002, "{measured_std}");
    }

    #[test]
    fn mixture_latent_parses_and_bad_parameters_name_their_path() {
        let cfg: MlpGanConfig =
            nash_core::serde_json::from_str(r#"{"latent": {"mixture": {"components": 10, "std": 0.1}}}"#).unwrap();
        assert_eq!(
            cfg.latent,
            Latent::Mixture {
                components: 10,
                std: 0.1,
                seed: 0
            }
        );
        let typo = nash_core::serde_json::from_str::<MlpGanConfig>(r#"{"latent": {"mixture": {"component": 10}}}"#)
            .unwrap_err()
            .to_string();
        assert!(typo.contains("component"), "{typo}");
        for (latent, needle) in [
            (r#"{"components": 0, "std": 0.1}"#, "model.latent.mixture.components"),
            (r#"{"components": 3, "std": 0.0}"#, "model.latent.mixture.std"),
        ] {
            let mut cfg = tiny_config(3, 2);
            cfg.latent = nash_core::serde_json::from_str(&format!(r#"{{"mixture": {latent}}}"#)).unwrap();
            let err = build(&cfg, 2, 0).err().unwrap().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn evaluate_and_sample_leave_parameters_alone() {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(4);
        let mut model = build(&tiny_config(3, 2), 2, 0).unwrap();
        let data = batch(&device, 8, 2, &mut rng);
        let before = snapshot(&model);
        let mut ectx = EvalContext {
            device: &device,
            rng: &mut rng,
        };
        let eval = model.evaluate(&data, &mut ectx).unwrap();
        for key in ["loss/discriminator", "loss/generator", "d_real_mean", "d_fake_mean"] {
            assert!(eval[key].is_finite(), "{key}: {eval:?}");
        }
        let samples = model.sample(5, &mut ectx).unwrap().unwrap();
        assert_eq!(*samples.shape(), (5, 2));
        assert!(changed(&before, &snapshot(&model)).is_empty());
    }

    #[test]
    fn learns_a_one_dimensional_gaussian() {
        // Data N(2, 0.5²) in 1D; after 400 steps of Adam the generated mean and spread must have
        // moved from the initial ≈(0, small) to near the data's.
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(5);
        let cfg = MlpGanConfig {
            latent_dim: 2,
            generator: mlp(&[16], 1, None),
            discriminator: mlp(&[16], 1, None),
            ..Default::default()
        };
        let mut model = build(&cfg, 1, 1).unwrap();
        let mut opts = optimizers(&AdamConfig {
            lr: 5e-3,
            betas: [0.5, 0.999],
            ..Default::default()
        });
        let mut stabilizers = StabilizerStack::default();
        for step in 0..400 {
            let values: Vec<f32> = (0..64)
                .map(|_| 2.0 + 0.5 * Distribution::<f32>::sample(&StandardNormal, &mut rng))
                .collect();
            let data = Batch {
                inputs: device.tensor_from_vec(values, (64, 1)),
                shape: FeatureShape::Flat(1),
                labels: None,
            };
            let mut ctx = TrainContext {
                step,
                device: &device,
                rng: &mut rng,
                optimizers: &mut opts,
                stabilizers: &mut stabilizers,
            };
            model.train_step(&data, &mut ctx).unwrap();
        }
        let mut ectx = EvalContext {
            device: &device,
            rng: &mut rng,
        };
        let samples = model.sample(2000, &mut ectx).unwrap().unwrap().as_vec();
        let mean = samples.iter().sum::<f32>() / samples.len() as f32;
        let std = (samples.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / samples.len() as f32).sqrt();
        assert!((mean - 2.0).abs() < 0.3, "mean {mean}");
        assert!((0.2..1.0).contains(&std), "std {std}");
    }

    #[test]
    fn reestimated_generator_statistics_are_those_of_the_current_weights() {
        use nash_core::layers::norm::BatchNormConfig;
        // G: 2 -> linear 8 -> batch_norm -> relu -> linear 3. After re-estimating from one large
        // batch, eval-mode samples of that batch's codes match training-mode (batch-statistics)
        // samples up to the unbiased/biased variance factor n/(n-1); before, they do not.
        let mut cfg = tiny_config(2, 3);
        cfg.generator = SequentialConfig::default()
            .push(LinearConfig::new(8))
            .push(BatchNormConfig::new())
            .push(nash_core::layers::activation::ReluConfig::default())
            .push(LinearConfig::new(3));
        let mut gan = build(&cfg, 3, 4).unwrap();
        assert!(gan.reestimates_statistics("generator") && !gan.reestimates_statistics("discriminator"));
        let device = Device::default();
        let n = 4000;
        let eval_samples = |gan: &mut MlpGan| {
            let mut rng = Rng::seed_from_u64(9);
            let mut ctx = EvalContext {
                device: &device,
                rng: &mut rng,
            };
            gan.sample(n, &mut ctx).unwrap().unwrap().as_vec()
        };
        let train_samples = |gan: &mut MlpGan| {
            let mut rng = Rng::seed_from_u64(9);
            let z = gan.sample_latent(n, &device, &mut rng);
            gan.generate(&z, Mode::Train, &mut rng).unwrap().detach().as_vec()
        };
        let max_diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        let scale = train_samples(&mut gan).iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let before = max_diff(&eval_samples(&mut gan), &train_samples(&mut gan));
        assert!(before > 0.05 * scale, "{before} vs {scale}");
        let mut rng = Rng::seed_from_u64(9);
        let mut ctx = EvalContext {
            device: &device,
            rng: &mut rng,
        };
        assert!(gan.reestimate_statistics("generator", 1, n, &mut ctx).unwrap());
        assert!(!gan.reestimate_statistics("discriminator", 1, n, &mut ctx).unwrap());
        let mut rng = Rng::seed_from_u64(9);
        let mut ctx = EvalContext {
            device: &device,
            rng: &mut rng,
        };
        gan.reestimate_statistics("generator", 1, n, &mut ctx).unwrap();
        let after = max_diff(&eval_samples(&mut gan), &train_samples(&mut gan));
        assert!(after < 1e-3 * scale, "{after} vs {scale}");
    }
}
