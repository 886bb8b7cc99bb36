//! `ebgan`: the Energy-Based GAN (Zhao et al. 2017), whose discriminator is an autoencoder and
//! whose energy is the reconstruction error.
//!
//! Equations, with the per-sample energy `E(v) = mean_j (Dec(Enc(v))_j - v_j)²` and batch means
//! written `E[·]`:
//!
//! - discriminator: `L_D = E[E(x)] + E[max(0, m - E(G(z)))]` (margin `m`, fakes detached);
//! - generator: `L_G = E[E(G(z))] + w_PT · PT(S)`, where `S` holds the encoder's codes `s_i` of
//!   the generated batch and the pulling-away term is
//!   `PT = 1/(N(N-1)) Σ_{i≠j} (s_iᵀ s_j / (|s_i| |s_j|))²`.

use std::collections::BTreeMap;

use nash_core::data::{Batch, DataInfo};
use nash_core::dfdx::prelude::*;
use nash_core::error::{Error, Result};
use nash_core::layers::{reestimate_statistics, BuildContext, Mode, Sequential, SequentialConfig};
use nash_core::model::{EvalContext, Model, ModelConfig, StepReport, TrainContext};
use nash_core::stabilizer::{InputRole, LossSite};
use nash_core::tensor::{Activation, Device, FeatureShape, Matrix, Param, Parameterized, Rng, Scalar, Tape, Vector};
use serde::{Deserialize, Serialize};

use crate::began::{
    build_stack, check_sizes, data_input, default_generator, describe_stack, finite, non_empty, prefixed, run_const,
    stack_or, AutoencoderCritic, CriticPass,
};
use crate::mlp_gan::{mlp, Latent};
use crate::step::{refuse_sample_selection, refuse_unrolling, schedule_discriminator_steps};

/// The pulling-away term of a batch of codes `[N, c]` (N >= 2), on the tape:
/// `PT = 1/(N(N-1)) Σ_{i≠j} cos²(s_i, s_j)`. Computed as `(Σ_{ij} G_ij² - Σ_i G_ii²) / (N(N-1))`
/// with `G = Ŝ Ŝᵀ`, `ŝ_i = s_i / sqrt(|s_i|² + 1e-12)` (the epsilon keeps zero codes finite).
pub fn pulling_away(codes: Matrix<Tape>) -> Result<Scalar> {
    let (n, c) = *codes.shape();
    if n < 2 {
        return Err(Error::shape("pulling-away term", "a batch of at least 2 codes", n));
    }
    let copy = codes.with_empty_tape();
    let norms = (codes.square().sum::<(usize,), Axis<1>>() + 1e-12).sqrt();
    let unit = copy / norms.broadcast_like::<_, Axis<1>>(&(n, c));
    // A transposed copy with its own tensor id (a bare permute keeps the id, and matmul's
    // backward cannot take one tensor as both operands).
    let unit_t = (unit.with_empty_tape() * 1.0).permute::<_, Axes2<1, 0>>();
    let unit_d = unit.with_empty_tape();
    let gram = unit.matmul(unit_t);
    let diag = unit_d.square().sum::<(usize,), Axis<1>>().square().sum::<(), _>();
    Ok((gram.square().sum::<(), _>() - diag) / ((n * (n - 1)) as f32))
}

/// Per-sample energies `mean_j (D(v)_j - v_j)²` of a pass, `[batch]`, and its codes.
fn energies(pass: CriticPass) -> (Vector<Tape>, Matrix<Tape>) {
    let e = (pass.reconstruction - pass.target).square().mean::<(usize,), Axis<1>>();
    (e, pass.codes)
}

/// The margin hinge `mean_i max(0, m - e_i)`, on the tape.
pub fn margin_hinge(energies: Vector<Tape>, margin: f32) -> Scalar {
    (energies.negate() + margin).relu().mean()
}

/// Config of [`Ebgan`], `type = "ebgan"` in pipeline files. Stacks left out are MLPs sized from
/// the data, as for `began`: generator latent-h-h-data (output activation from the data's
/// range), discriminator encoder data-h-code and decoder code-h-data.
#[derive(Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EbganConfig {
    /// Size of the latent code.
    pub latent_dim: usize,
    /// Distribution of the latent code.
    pub latent: Latent,
    /// Width of the hidden layers of the default stacks.
    pub hidden_dim: usize,
    /// Width of the discriminator's code in the default encoder and decoder.
    pub code_dim: usize,
    /// The generator, from `[latent_dim]` to one sample (default: MLP).
    pub generator: Option<SequentialConfig>,
    /// The discriminator's encoder, from one sample to a code (default: MLP).
    pub encoder: Option<SequentialConfig>,
    /// The discriminator's decoder, from the code back to one sample (default: MLP).
    pub decoder: Option<SequentialConfig>,
    /// The margin m: generated samples with energy above it no longer push the discriminator.
    pub margin: f64,
    /// Weight of the pulling-away term in the generator's loss (0 turns it off).
    pub pt_weight: f64,
}

impl Default for EbganConfig {
    fn default() -> Self {
        EbganConfig {
            latent_dim: 32,
            latent: Latent::Normal,
            hidden_dim: 128,
            code_dim: 32,
            generator: None,
            encoder: None,
            decoder: None,
            margin: 1.0,
            pt_weight: 0.1,
        }
    }
}

impl EbganConfig {
    /// Builds the model for `data` (the typed form of [`ModelConfig::build`]).
    pub fn build_ebgan(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<Ebgan> {
        check_sizes(self.latent_dim, self.hidden_dim, Some(self.code_dim))?;
        self.latent.check("model.latent")?;
        if !(self.margin.is_finite() && self.margin > 0.0) {
            return Err(Error::config(
                "model.margin",
                format!("must be a finite number > 0, got {}", self.margin),
            ));
        }
        if !(self.pt_weight.is_finite() && self.pt_weight >= 0.0) {
            return Err(Error::config(
                "model.pt_weight",
                format!("must be a finite number >= 0, got {}", self.pt_weight),
            ));
        }
        let data_shape = data.sample_shape;
        let n = data_shape.numel();
        let h = self.hidden_dim;
        let (default_g, default_e, default_d) = (
            default_generator(data, h),
            mlp(&[h], self.code_dim, None),
            mlp(&[h], n, None),
        );
        let generator = build_stack(
            stack_or(&self.generator, &default_g),
            FeatureShape::Flat(self.latent_dim),
            Some((n, "one data sample")),
            ctx,
            "model.generator",
        )?;
        let critic = AutoencoderCritic::build(
            stack_or(&self.encoder, &default_e),
            stack_or(&self.decoder, &default_d),
            data_shape,
            ctx,
            "model",
        )?;
        Ok(Ebgan {
            generator,
            critic,
            latent: self.latent,
            latent_dim: self.latent_dim,
            data_shape,
            margin: self.margin as f32,
            pt_weight: self.pt_weight as f32,
        })
    }
}

#[typetag::serde(name = "ebgan")]
impl ModelConfig for EbganConfig {
    fn build(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<Box<dyn Model>> {
        Ok(Box::new(self.build_ebgan(data, ctx)?))
    }
}

/// EBGAN. Parameter groups `discriminator` (names `discriminator.encoder.*`,
/// `discriminator.decoder.*`) and `generator` (`generator.*`).
///
/// Stabilizers: as for `began`, discriminator inputs pass through `transform_input` (the
/// reconstruction target is the transformed input), generator steps collect extra terms at
/// [`LossSite::Generator`], both groups update through `apply_gradients`; the autoencoder
/// discriminator has no score, so no terms are requested at [`LossSite::Discriminator`].
pub struct Ebgan {
    generator: Sequential,
    critic: AutoencoderCritic,
    latent: Latent,
    latent_dim: usize,
    data_shape: FeatureShape,
    margin: f32,
    pt_weight: f32,
}

impl Ebgan {
    /// The autoencoder discriminator.
    pub fn critic(&self) -> &AutoencoderCritic {
        &self.critic
    }
    /// Runs the generator on `n` fresh codes, on the tape.
    fn generate(&mut self, n: usize, mode: Mode, device: &Device, rng: &mut Rng) -> Result<Activation> {
        let z = self.latent.sample(n, self.latent_dim, device, rng);
        run_const(
            &mut self.generator,
            &z,
            FeatureShape::Flat(self.latent_dim),
            self.data_shape,
            mode,
            rng,
        )
    }

    /// `L_D = E[E(x)] + E[max(0, m - E(G(z)))]`; updates only the discriminator.
    fn discriminator_step(&mut self, batch: &Batch, ctx: &mut TrainContext<'_>, report: &mut StepReport) -> Result<()> {
        let real_in = data_input("ebgan", &batch.inputs, self.data_shape)?;
        let fake = self.generate(batch.len(), Mode::Train, ctx.device, ctx.rng)?.detach();
        let fake_in = Activation::data(&fake, self.data_shape)?;
        let (real_in, fake_in) = {
            let (stabilizers, mut hooks) = ctx.hooks();
            let r = stabilizers.transform_input(InputRole::Real, real_in, &mut hooks)?;
            let f = stabilizers.transform_input(InputRole::Fake, fake_in, &mut hooks)?;
            (r, f)
        };
        let (real, _) = energies(self.critic.pass(real_in, Mode::Train, ctx.rng)?);
        let (fake, _) = energies(self.critic.pass(fake_in, Mode::Train, ctx.rng)?);
        let fake_host = fake.retaped::<NoneTape>().as_vec();
        let fake_mean = fake_host.iter().map(|&v| v as f64).sum::<f64>() / fake_host.len() as f64;
        let real_mean = real.mean();
        report.diagnostic("ebgan/energy_real", finite("ebgan/energy_real", &real_mean)?);
        report.diagnostic("ebgan/energy_fake", fake_mean);
        let loss = real_mean + margin_hinge(fake, self.margin);
        report.loss("loss/discriminator", finite("loss/discriminator", &loss)?);
        let grads = loss.backward();
        let mut params = prefixed(self.critic.named_params_mut(), "discriminator");
        let norm = ctx.apply_gradients("discriminator", &mut params, grads)?;
        report.diagnostic("grad_norm/discriminator", norm);
        Ok(())
    }

    /// `L_G = E[E(G(z))] + w_PT · PT`; updates only the generator.
    fn generator_step(&mut self, n: usize, ctx: &mut TrainContext<'_>, report: &mut StepReport) -> Result<()> {
        let fake = self.generate(n, Mode::Train, ctx.device, ctx.rng)?;
        let fake_in = {
            let (stabilizers, mut hooks) = ctx.hooks();
            stabilizers.transform_input(InputRole::Fake, fake, &mut hooks)?
        };
        let (energy, codes) = energies(self.critic.pass(fake_in, Mode::Train, ctx.rng)?);
        let mut loss = energy.mean();
        report.loss("loss/generator", finite("loss/generator", &loss)?);
        if self.pt_weight > 0.0 && n >= 2 {
            let pt = pulling_away(codes)?;
            report.loss(
                "loss/generator/pulling_away",
                finite("loss/generator/pulling_away", &pt)?,
            );
            loss = loss + pt * self.pt_weight;
        }
        let (stabilizers, mut hooks) = ctx.hooks();
        for (name, term) in stabilizers.extra_losses(&mut LossSite::Generator, &mut hooks)? {
            let key = format!("loss/generator/{name}");
            report.loss(key.clone(), finite(&key, &term)?);
            loss = loss + term;
        }
        let grads = loss.backward();
        let mut params = prefixed(self.generator.named_params_mut(), "generator");
        let norm = ctx.apply_gradients("generator", &mut params, grads)?;
        report.diagnostic("grad_norm/generator", norm);
        Ok(())
    }

    /// Mean energy of constant samples, in eval mode.
    fn mean_energy(&mut self, x: &Matrix, rng: &mut Rng) -> Result<Vec<f32>> {
        let input = Activation::data(x, self.data_shape)?;
        Ok(energies(self.critic.pass(input, Mode::Eval, rng)?)
            .0
            .retaped::<NoneTape>()
            .as_vec())
    }
}

impl Parameterized for Ebgan {
    fn named_params(&self) -> Vec<(String, &Param)> {
        let mut all = prefixed(self.critic.named_params(), "discriminator");
        all.extend(prefixed(self.generator.named_params(), "generator"));
        all
    }
    fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        let mut all = prefixed(self.critic.named_params_mut(), "discriminator");
        all.extend(prefixed(self.generator.named_params_mut(), "generator"));
        all
    }
}

impl Model for Ebgan {
    fn family(&self) -> &str {
        "gan"
    }
    fn describe(&self) -> String {
        format!(
            "ebgan: latent {} ({:?}), margin {}, pulling-away weight {}, data {}\n  generator {} -> {}:\n{}\n{}",
            self.latent_dim,
            self.latent,
            self.margin,
            self.pt_weight,
            self.data_shape,
            self.generator.input_shape(),
            self.generator.output_shape(),
            describe_stack(&self.generator),
            self.critic.describe(),
        )
    }
    fn param_groups(&self) -> Vec<String> {
        vec!["discriminator".into(), "generator".into()]
    }
    /// One discriminator update, then one generator update on fresh latent codes.
    /// Runs the discriminator's single update only when the stabilizers' schedule (from 1, capped at 1,
    /// reported as `discriminator_steps`) keeps it: an adaptive step ratio may skip it (0); it
    /// cannot add updates. Unrolling is refused.
    fn train_step(&mut self, batch: &Batch, ctx: &mut TrainContext<'_>) -> Result<StepReport> {
        non_empty("ebgan", batch)?;
        refuse_unrolling("ebgan", ctx)?;
        refuse_sample_selection("ebgan", ctx)?;
        let mut report = StepReport::default();
        if schedule_discriminator_steps(1, 1, ctx, &mut report) == 1 {
            self.discriminator_step(batch, ctx, &mut report)?;
        }
        self.generator_step(batch.len(), ctx, &mut report)?;
        Ok(report)
    }
    /// Energies of real and fresh generated samples and the losses they give; no updates.
    fn evaluate(&mut self, batch: &Batch, ctx: &mut EvalContext<'_>) -> Result<BTreeMap<String, f64>> {
        non_empty("ebgan evaluation", batch)?;
        data_input("ebgan", &batch.inputs, self.data_shape)?;
        let fake = self.generate(batch.len(), Mode::Eval, ctx.device, ctx.rng)?.detach();
        let real = self.mean_energy(&batch.inputs, ctx.rng)?;
        let fake = self.mean_energy(&fake, ctx.rng)?;
        let mean = |v: &[f32]| v.iter().map(|&e| e as f64).sum::<f64>() / v.len() as f64;
        let hinge = fake.iter().map(|&e| (self.margin - e).max(0.0) as f64).sum::<f64>() / fake.len() as f64;
        Ok(BTreeMap::from([
            ("loss/discriminator".to_string(), mean(&real) + hinge),
            ("loss/generator".to_string(), mean(&fake)),
            ("ebgan/energy_real".to_string(), mean(&real)),
            ("ebgan/energy_fake".to_string(), mean(&fake)),
        ]))
    }
    fn sample(&mut self, n: usize, ctx: &mut EvalContext<'_>) -> Result<Option<Matrix>> {
        Ok(Some(self.generate(n, Mode::Eval, ctx.device, ctx.rng)?.detach()))
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
            |gan| gan.generate(batch_size, Mode::Train, ctx.device, ctx.rng).map(drop),
        )?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::began::tests::{adam, batch, changed, info, mean_of, names_with, sgd, snapshot, train};
    use nash_core::rand::{Rng as _, SeedableRng};
    use nash_core::stabilizer::StabilizerStack;

    fn tiny() -> EbganConfig {
        EbganConfig {
            latent_dim: 3,
            hidden_dim: 16,
            code_dim: 4,
            ..Default::default()
        }
    }

    fn build(cfg: &EbganConfig, dim: usize) -> Result<Ebgan> {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        cfg.build_ebgan(
            &info(dim),
            &mut BuildContext {
                device: &device,
                rng: &mut rng,
            },
        )
    }

    /// The pulling-away term in f64 on the host, straight from its definition.
    fn pt_host(s: &[f64], n: usize, c: usize) -> f64 {
        let row = |i: usize| &s[i * c..(i + 1) * c];
        let norm = |v: &[f64]| (v.iter().map(|x| x * x).sum::<f64>() + 1e-12).sqrt();
        let mut total = 0.0;
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    let dot: f64 = row(i).iter().zip(row(j)).map(|(a, b)| a * b).sum();
                    total += (dot / (norm(row(i)) * norm(row(j)))).powi(2);
                }
            }
        }
        total / (n * (n - 1)) as f64
    }

    fn pt_of(values: Vec<f32>, n: usize, c: usize) -> f32 {
        let device = Device::default();
        let m: Matrix = device.tensor_from_vec(values, (n, c));
        pulling_away(m.leaky_trace()).unwrap().array()
    }

    #[test]
    fn pulling_away_term_is_zero_for_orthogonal_codes_and_one_for_parallel_codes() {
        // Orthogonal rows (scaled differently): every cosine is 0.
        let pt = pt_of(vec![2.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 3.0], 3, 3);
        assert!(pt.abs() < 1e-6, "{pt}");
        // Parallel and anti-parallel rows: every cosine² is 1.
        let pt = pt_of(vec![1.0, 2.0, -2.0, -4.0, 0.5, 1.0], 3, 2);
        assert!((pt - 1.0).abs() < 1e-5, "{pt}");
        // Two rows at 60 degrees: cos² = 0.25, and the mean over the 2 ordered pairs is 0.25.
        let pt = pt_of(vec![1.0, 0.0, 0.5, 0.75f32.sqrt()], 2, 2);
        assert!((pt - 0.25).abs() < 1e-5, "{pt}");
        // A random batch against the definition.
        let mut rng = Rng::seed_from_u64(3);
        let v: Vec<f32> = (0..20).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let host = pt_host(&v.iter().map(|&x| x as f64).collect::<Vec<_>>(), 5, 4);
        assert!((pt_of(v, 5, 4) as f64 - host).abs() < 1e-5, "{host}");
        let device = Device::default();
        let one: Matrix = device.tensor_from_vec(vec![1.0, 2.0], (1, 2));
        assert!(pulling_away(one.leaky_trace()).is_err());
    }

    #[test]
    fn pulling_away_gradient_matches_finite_differences() {
        let (n, c) = (4, 3);
        let mut rng = Rng::seed_from_u64(4);
        let v: Vec<f32> = (0..n * c).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let device = Device::default();
        let m: Matrix = device.tensor_from_vec(v.clone(), (n, c));
        let grads = pulling_away(m.leaky_trace()).unwrap().backward();
        let analytic = grads.get(&m).as_vec();
        let base: Vec<f64> = v.iter().map(|&x| x as f64).collect();
        let h = 1e-5;
        for k in 0..n * c {
            let (mut plus, mut minus) = (base.clone(), base.clone());
            plus[k] += h;
            minus[k] -= h;
            let numeric = (pt_host(&plus, n, c) - pt_host(&minus, n, c)) / (2.0 * h);
            let a = analytic[k] as f64;
            assert!(
                (a - numeric).abs() <= 1e-2 * numeric.abs().max(1e-2),
                "entry {k}: analytic {a}, numeric {numeric}"
            );
        }
    }

    #[test]
    fn margin_hinge_matches_hand_computation() {
        // m = 1: energies 0.2, 1.5, 0.9 -> max(0, 0.8), 0, 0.1 -> mean 0.3.
        let device = Device::default();
        let e: Vector = device.tensor_from_vec(vec![0.2, 1.5, 0.9], (3,));
        let hinge = margin_hinge(e.leaky_trace(), 1.0);
        assert!((hinge.array() - 0.3).abs() < 1e-6);
        // Its gradient is -1/N below the margin and 0 above.
        let grads = margin_hinge(e.leaky_trace(), 1.0).backward();
        let g = grads.get(&e).as_vec();
        let want = [-1.0 / 3.0, 0.0, -1.0 / 3.0];
        for (a, b) in g.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{g:?}");
        }
    }

    #[test]
    fn discriminator_loss_is_the_real_energy_plus_the_margin_hinge() {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(5);
        let mut cfg = tiny();
        cfg.margin = 0.7;
        let mut model = build(&cfg, 5).unwrap();
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
        let (real, fake) = (
            report.diagnostics["ebgan/energy_real"],
            report.diagnostics["ebgan/energy_fake"],
        );
        let loss = report.losses["loss/discriminator"];
        // When every fake energy is below the margin the hinge is m - mean(fake).
        if fake < 0.7 {
            assert!(loss >= real + 0.7 - fake - 1e-5, "{report:?}");
        }
        assert!(loss >= real - 1e-6 && loss <= real + 0.7 + 1e-6, "{report:?}");
        let before = snapshot(&model);
        let mut report = StepReport::default();
        model.generator_step(8, &mut ctx, &mut report).unwrap();
        assert_eq!(changed(&before, &snapshot(&model)), names_with(&model, "generator."));
        let pt = report.losses["loss/generator/pulling_away"];
        assert!((0.0..=1.0).contains(&pt), "{report:?}");
    }

    #[test]
    fn losses_are_finite_and_move_over_training() {
        let mut model = build(&tiny(), 6).unwrap();
        let mut opts = adam(&["discriminator", "generator"], 3e-3);
        let reports = train(&mut model, &mut opts, 6, 60, 6);
        let early = mean_of(&reports[..10], "ebgan/energy_real");
        let late = mean_of(&reports[50..], "ebgan/energy_real");
        assert!(late < 0.8 * early, "real energy {early} -> {late}");
        let early = mean_of(&reports[..10], "loss/generator");
        let late = mean_of(&reports[50..], "loss/generator");
        assert!((early - late).abs() > 1e-3, "{early} {late}");
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(9);
        let data = batch(&device, 16, 6, &mut rng);
        let mut ectx = EvalContext {
            device: &device,
            rng: &mut rng,
        };
        let eval = model.evaluate(&data, &mut ectx).unwrap();
        assert!(eval.values().all(|v| v.is_finite()), "{eval:?}");
        assert_eq!(*model.sample(4, &mut ectx).unwrap().unwrap().shape(), (4, 6));
    }

    #[test]
    fn wiring_errors_name_config_paths() {
        let mut cfg = tiny();
        cfg.encoder = Some(mlp(&[4], 3, None));
        cfg.decoder = Some(mlp(&[4], 4, None));
        let err = build(&cfg, 5).err().unwrap().to_string();
        assert!(err.contains("model.decoder") && err.contains("out_features 5"), "{err}");
        let err = build(&EbganConfig { margin: 0.0, ..tiny() }, 5)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("model.margin"), "{err}");
        let err = build(
            &EbganConfig {
                pt_weight: -1.0,
                ..tiny()
            },
            5,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("model.pt_weight"), "{err}");
        let json = r#"{"type": "ebgan", "margine": 1.0}"#;
        let err = nash_core::serde_json::from_str::<Box<dyn ModelConfig>>(json)
            .unwrap_err()
            .to_string();
        assert!(err.contains("margine"), "{err}");
    }
}
