//! Exact gradient penalties on the critic's input gradient: `wgan_gp`, `r1`, `r2` and `dragan`.
//!
//! Each adds a term at [`LossSite::Discriminator`]. The critic's gradient with respect to its input,
//! ∇ₓD(x) per sample, comes from [`nash_core::layers::Sequential::forward_with_input_grad`] as
//! ordinary differentiable ops on the tape (dfdx has no double backward), so the backward pass of
//! the term gives the exact gradient of the penalty with respect to the critic's parameters.
//! Layers without such an expression (batch norm in training mode, embeddings) make the term fail
//! with [`Error::Unsupported`], naming the penalty and the layer.
//!
//! Every penalty reports its term as `loss/discriminator/<term>` and the mean gradient norm at the
//! penalized points, averaged over the step's discriminator updates, as the diagnostic
//! `<kind>/grad_norm`. The randomness (WGAN-GP's ε, DRAGAN's δ) is drawn from the run's generator.

use nash_core::dfdx::prelude::*;
use nash_core::error::{Error, Result};
use nash_core::layers::{ForwardContext, Mode};
use nash_core::model::{Model, StepReport};
use nash_core::rand::Rng as _;
use nash_core::registry::Registry;
use nash_core::stabilizer::{HookContext, LossSite, Stabilizer, StabilizerConfig};
use nash_core::tensor::{Activation, Matrix, Scalar};
use serde::{Deserialize, Serialize};

use crate::scope::{check_group, conflict, require_positive};

/// Registers this module's types.
pub fn register(registry: &mut Registry) -> Result<()> {
    registry.stabilizer::<WganGpConfig>(
        "WGAN-GP: lambda * E[(|grad D(x^)| - target)^2] at random interpolates of real and fake samples",
    )?;
    registry
        .stabilizer::<R1Config>("R1: (gamma/2) * E[|grad D(x)|^2] on real samples, optionally lazy (every k steps)")?;
    registry
        .stabilizer::<R2Config>("R2: (gamma/2) * E[|grad D(x)|^2] on fake samples, optionally lazy (every k steps)")?;
    registry.stabilizer::<DraganConfig>(
        "DRAGAN: lambda * E[(|grad D(x^)| - 1)^2] at real samples perturbed by c * std * U(0,1) noise",
    )?;
    Ok(())
}

/// Added under the square root of ‖∇D‖² so the norm's derivative stays finite at a zero gradient
/// (a norm of 1e-6 at worst, far below anything the penalties' targets resolve).
const NORM_EPS: f32 = 1e-12;

/// WGAN-GP (Gulrajani et al. 2017, "Improved Training of Wasserstein GANs"):
/// `lambda * E[(‖∇x̂ D(x̂)‖₂ − target)²]` at `x̂ = ε·x_real + (1 − ε)·x_fake`, one `ε ~ U(0, 1)` per
/// sample (drawn in batch order). With `one_sided = true` the term is
/// `lambda * E[max(0, ‖∇D‖ − target)²]` (Petzka et al. 2018, "On the regularization of Wasserstein
/// GANs"), which only penalizes gradients steeper than the target. The reference code
/// (igul222/improved_wgan_training) uses lambda 10, five critic updates per generator update and
/// Adam(1e-4, β = (0.5, 0.9)), and no batch norm in the critic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WganGpConfig {
    /// The penalty's weight λ.
    pub lambda: f64,
    /// The gradient norm the critic is pulled towards.
    pub target: f64,
    /// Penalize only norms above the target.
    pub one_sided: bool,
}

impl Default for WganGpConfig {
    fn default() -> Self {
        WganGpConfig {
            lambda: 10.0,
            target: 1.0,
            one_sided: false,
        }
    }
}

#[typetag::serde(name = "wgan_gp")]
impl StabilizerConfig for WganGpConfig {
    fn build(&self) -> Result<Box<dyn Stabilizer>> {
        require_positive("stabilizers.wgan_gp.lambda", self.lambda)?;
        if !(self.target.is_finite() && self.target >= 0.0) {
            return Err(Error::config(
                "stabilizers.wgan_gp.target",
                format!("must be a finite number >= 0, got {}", self.target),
            ));
        }
        Ok(Box::new(GradientPenalty::new(
            "wgan_gp",
            "gradient_penalty",
            Points::Interpolated,
            Form::Deviation {
                target: self.target as f32,
                one_sided: self.one_sided,
            },
            self.lambda as f32,
            1,
        )))
    }
}

/// R1 (Mescheder et al. 2018, "Which Training Methods for GANs do actually Converge?"):
/// `(gamma / 2) * E[‖∇x D(x_real)‖²]`. With `every = k > 1` the term is added only at steps that are
/// multiples of k, multiplied by k (StyleGAN2's lazy regularization; with several discriminator
/// updates per step, each update of such a step carries it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct R1Config {
    /// The penalty's weight γ.
    pub gamma: f64,
    /// Apply every `every` steps, scaled by `every` (1: every step).
    pub every: u64,
}

impl Default for R1Config {
    fn default() -> Self {
        R1Config { gamma: 10.0, every: 1 }
    }
}

#[typetag::serde(name = "r1")]
impl StabilizerConfig for R1Config {
    fn build(&self) -> Result<Box<dyn Stabilizer>> {
        build_zero_centered("r1", Points::Real, self.gamma, self.every)
    }
}

/// R2 (Mescheder et al. 2018): R1's `(gamma / 2) * E[‖∇x D(x)‖²]` on the generator's samples
/// instead of the data. `every` as for [`R1Config`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct R2Config {
    /// The penalty's weight γ.
    pub gamma: f64,
    /// Apply every `every` steps, scaled by `every` (1: every step).
    pub every: u64,
}

impl Default for R2Config {
    fn default() -> Self {
        R2Config { gamma: 10.0, every: 1 }
    }
}

#[typetag::serde(name = "r2")]
impl StabilizerConfig for R2Config {
    fn build(&self) -> Result<Box<dyn Stabilizer>> {
        build_zero_centered("r2", Points::Fake, self.gamma, self.every)
    }
}

fn build_zero_centered(kind: &'static str, points: Points, gamma: f64, every: u64) -> Result<Box<dyn Stabilizer>> {
    require_positive(&format!("stabilizers.{kind}.gamma"), gamma)?;
    if every == 0 {
        return Err(Error::config(
            format!("stabilizers.{kind}.every"),
            "must be at least 1 (1 applies the penalty at every step)",
        ));
    }
    Ok(Box::new(GradientPenalty::new(
        kind,
        kind,
        points,
        Form::SquaredNorm,
        (gamma / 2.0) as f32,
        every,
    )))
}

/// DRAGAN (Kodali et al. 2017, "On Convergence and Stability of GANs"):
/// `lambda * E[(‖∇x̂ D(x̂)‖₂ − 1)²]` at `x̂ = x_real + δ`, `δ = c · std(x_real) · u` with one
/// `u ~ U(0, 1)` per element (drawn row by row) and `std` the population standard deviation of each
/// feature over the batch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DraganConfig {
    /// The penalty's weight λ.
    pub lambda: f64,
    /// The perturbation's scale c, in units of the data's standard deviation.
    pub c: f64,
}

impl Default for DraganConfig {
    fn default() -> Self {
        DraganConfig { lambda: 10.0, c: 0.5 }
    }
}

#[typetag::serde(name = "dragan")]
impl StabilizerConfig for DraganConfig {
    fn build(&self) -> Result<Box<dyn Stabilizer>> {
        require_positive("stabilizers.dragan.lambda", self.lambda)?;
        require_positive("stabilizers.dragan.c", self.c)?;
        Ok(Box::new(GradientPenalty::new(
            "dragan",
            "dragan",
            Points::Perturbed { c: self.c as f32 },
            Form::Deviation {
                target: 1.0,
                one_sided: false,
            },
            self.lambda as f32,
            1,
        )))
    }
}

/// Where the critic's input gradient is taken.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Points {
    /// `ε·real + (1 − ε)·fake`, one ε per sample.
    Interpolated,
    /// The real samples.
    Real,
    /// The generated samples.
    Fake,
    /// `real + c·std·u`, one u per element.
    Perturbed { c: f32 },
}

/// What is penalized, per sample, before the mean and the weight.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Form {
    /// `‖∇D‖²`.
    SquaredNorm,
    /// `(‖∇D‖ − target)²`, or `max(0, ‖∇D‖ − target)²` when one-sided.
    Deviation { target: f32, one_sided: bool },
}

/// A gradient penalty on the discriminator: the stabilizer every config of this module builds.
#[derive(Clone, Debug)]
pub struct GradientPenalty {
    kind: &'static str,
    term: &'static str,
    points: Points,
    form: Form,
    weight: f32,
    every: u64,
    /// Sum of the mean gradient norms of this step's updates, and their number.
    norms: (f64, usize),
}

impl GradientPenalty {
    fn new(kind: &'static str, term: &'static str, points: Points, form: Form, weight: f32, every: u64) -> Self {
        GradientPenalty {
            kind,
            term,
            points,
            form,
            weight,
            every,
            norms: (0.0, 0),
        }
    }

    /// The points to penalize, drawing ε or δ from `rng` where needed.
    fn points(&self, real: &Matrix, fake: &Matrix, ctx: &mut HookContext<'_>) -> Result<Matrix> {
        let (b, d) = *real.shape();
        match self.points {
            Points::Real => Ok(real.clone()),
            Points::Fake => Ok(fake.clone()),
            Points::Interpolated => {
                if fake.shape() != real.shape() {
                    return Err(Error::shape(
                        format!("the `{}` interpolation of real and fake samples", self.kind),
                        format!("{b} x {d} fakes like the reals"),
                        format!("{} x {}", fake.shape().0, fake.shape().1),
                    ));
                }
                let (r, f) = (real.as_vec(), fake.as_vec());
                let mut out = Vec::with_capacity(b * d);
                for i in 0..b {
                    let eps: f32 = ctx.rng.gen();
                    let row = i * d..(i + 1) * d;
                    out.extend(
                        r[row.clone()]
                            .iter()
                            .zip(&f[row])
                            .map(|(&r, &f)| eps * r + (1.0 - eps) * f),
                    );
                }
                Ok(ctx.device.tensor_from_vec(out, (b, d)))
            }
            Points::Perturbed { c } => {
                let r = real.as_vec();
                let std = feature_std(&r, b, d);
                let mut out = r;
                for row in out.chunks_mut(d.max(1)) {
                    for (v, s) in row.iter_mut().zip(&std) {
                        let u: f32 = ctx.rng.gen();
                        *v += c * s * u;
                    }
                }
                Ok(ctx.device.tensor_from_vec(out, (b, d)))
            }
        }
    }
}

/// The population standard deviation of each of the `d` columns of a row-major `b x d` matrix.
fn feature_std(values: &[f32], b: usize, d: usize) -> Vec<f32> {
    (0..d)
        .map(|j| {
            let col = || (0..b).map(|i| values[i * d + j] as f64);
            let mean = col().sum::<f64>() / b.max(1) as f64;
            (col().map(|v| (v - mean).powi(2)).sum::<f64>() / b.max(1) as f64).sqrt() as f32
        })
        .collect()
}

impl Stabilizer for GradientPenalty {
    fn name(&self) -> &str {
        self.kind
    }

    fn validate(&self, model: &dyn Model) -> Result<()> {
        let path = format!("stabilizers.{}", self.kind);
        check_group(model, "discriminator", &path)?;
        if let Some((name, _)) = model
            .named_params()
            .into_iter()
            .find(|(n, _)| n.starts_with("discriminator.") && n.ends_with(".running_mean"))
        {
            let layer = name.trim_end_matches(".running_mean");
            return Err(Error::config(
                path,
                format!(
                    "the discriminator has a batch norm layer (`{layer}`), whose input gradient in training mode \
                     couples the samples, so a gradient penalty cannot be taken per sample; use layer_norm or \
                     no normalization in the critic (as the WGAN-GP paper does), or spectral_norm instead"
                ),
            ));
        }
        Ok(())
    }

    fn conflicts_with(&self, other: &dyn Stabilizer) -> Option<String> {
        conflict(self.kind, Some("discriminator"), other)
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
        if !ctx.step.is_multiple_of(self.every) {
            return Ok(None);
        }
        let points = self.points(real, fake, ctx)?;
        let input = Activation::input(&points, *shape)?;
        let mut fwd = ForwardContext {
            mode: Mode::Train,
            rng: &mut *ctx.rng,
        };
        let kind = self.kind;
        let (_, grad) = critic.forward_with_input_grad(input, &mut fwd).map_err(|e| match e {
            Error::Unsupported { what, why } => Error::Unsupported {
                what: format!("the `{kind}` gradient penalty: {what}"),
                why,
            },
            other => Error::Other(format!("the `{kind}` gradient penalty: {other}")),
        })?;
        let sq = grad.value.square().sum::<(usize,), Axis<1>>();
        let host = sq.as_vec();
        if !host.is_empty() {
            let mean_norm = host.iter().map(|&v| (v as f64).sqrt()).sum::<f64>() / host.len() as f64;
            self.norms.0 += mean_norm;
            self.norms.1 += 1;
        }
        let per_sample = match self.form {
            Form::SquaredNorm => sq,
            Form::Deviation { target, one_sided } => {
                let dev = (sq + NORM_EPS).sqrt() - target;
                if one_sided {
                    dev.relu().square()
                } else {
                    dev.square()
                }
            }
        };
        let scale = self.weight * self.every as f32;
        Ok(Some((self.term.to_string(), per_sample.mean::<(), _>() * scale)))
    }

    fn end_step(&mut self, report: &mut StepReport, _ctx: &mut HookContext<'_>) -> Result<()> {
        let (sum, n) = std::mem::take(&mut self.norms);
        if n > 0 {
            report.diagnostic(format!("{}/grad_norm", self.kind), sum / n as f64);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nash_core::layers::activation::{LeakyReluConfig, TanhConfig};
    use nash_core::layers::linear::LinearConfig;
    use nash_core::layers::sequential::{Sequential, SequentialConfig};
    use nash_core::layers::BuildContext;
    use nash_core::rand::SeedableRng;
    use nash_core::stabilizer::StabilizerStack;
    use nash_core::tensor::{grad_to_vec, Device, FeatureShape, Grads, Parameterized, Rng};

    /// W1 (2x3, [in, out] row-major), b1, W2 (3x1), b2 of the test critic.
    const W1: [f32; 6] = [0.9, -0.6, 0.4, 0.3, 0.8, -1.1];
    const B1: [f32; 3] = [0.1, -0.2, 0.05];
    const W2: [f32; 3] = [1.2, -0.7, 0.9];
    const B2: [f32; 1] = [0.3];
    const REAL: [f32; 8] = [0.5, -0.3, -0.8, 0.6, 0.2, 0.9, -0.4, -0.7];
    const FAKE: [f32; 8] = [-0.2, 0.4, 0.7, 0.1, -0.6, -0.5, 0.3, 0.8];

    #[derive(Clone, Copy, PartialEq)]
    enum Act {
        Tanh,
        Leaky,
    }

    /// linear 2->3, `act`, linear 3->1, with the weights above times `scale`.
    fn critic(device: &Device, act: Act, scale: f32) -> Sequential {
        let mut rng = Rng::seed_from_u64(0);
        let mut cfg = SequentialConfig::default().push(LinearConfig::new(3));
        cfg = match act {
            Act::Tanh => cfg.push(TanhConfig::default()),
            Act::Leaky => cfg.push(LeakyReluConfig { negative_slope: 0.2 }),
        };
        let mut net = cfg
            .push(LinearConfig::new(1))
            .build(
                FeatureShape::Flat(2),
                &mut BuildContext { device, rng: &mut rng },
                "critic",
            )
            .unwrap();
        let values: [Vec<f32>; 4] = [
            W1.iter().map(|w| w * scale).collect(),
            B1.to_vec(),
            W2.iter().map(|w| w * scale).collect(),
            B2.to_vec(),
        ];
        for ((_, p), v) in net.named_params_mut().into_iter().zip(values) {
            p.set(&v).unwrap();
        }
        net
    }

    /// The critic on the host in f64, from its current parameters.
    fn host_critic(net: &Sequential, act: Act) -> impl Fn(&[f64]) -> f64 {
        let p: Vec<Vec<f64>> = net
            .named_params()
            .iter()
            .map(|(_, p)| p.to_vec().iter().map(|&v| v as f64).collect())
            .collect();
        move |x: &[f64]| {
            let mut out = p[3][0];
            for j in 0..3 {
                let z = x[0] * p[0][j] + x[1] * p[0][3 + j] + p[1][j];
                let a = match act {
                    Act::Tanh => z.tanh(),
                    Act::Leaky => {
                        if z > 0.0 {
                            z
                        } else {
                            0.2 * z
                        }
                    }
                };
                out += a * p[2][j];
            }
            out
        }
    }

    /// ∇ₓD by f64 central differences.
    fn fd_input_grad(d: &impl Fn(&[f64]) -> f64, x: &[f64]) -> Vec<f64> {
        let h = 1e-6;
        (0..x.len())
            .map(|k| {
                let (mut a, mut b) = (x.to_vec(), x.to_vec());
                a[k] += h;
                b[k] -= h;
                (d(&a) - d(&b)) / (2.0 * h)
            })
            .collect()
    }

    fn matrix(device: &Device, v: &[f32]) -> Matrix {
        device.tensor_from_vec(v.to_vec(), (v.len() / 2, 2))
    }

    /// The term at the discriminator site with `rng` seeded by `seed`, at `step`.
    fn term(s: &mut dyn Stabilizer, net: &mut Sequential, device: &Device, seed: u64, step: u64) -> Option<Scalar> {
        let (real, fake) = (matrix(device, &REAL), matrix(device, &FAKE));
        let mut rng = Rng::seed_from_u64(seed);
        let mut ctx = HookContext {
            step,
            device,
            rng: &mut rng,
        };
        let mut site = LossSite::Discriminator {
            critic: net,
            real: &real,
            fake: &fake,
            shape: FeatureShape::Flat(2),
        };
        s.extra_loss(&mut site, &mut ctx).unwrap().map(|(_, t)| t)
    }

    /// The points each penalty is taken at, drawn independently of the implementation from a
    /// generator seeded like the one the term used.
    fn reference_points(kind: &str, seed: u64) -> Vec<Vec<f64>> {
        let mut rng = Rng::seed_from_u64(seed);
        let rows =
            |v: &[f32]| -> Vec<Vec<f64>> { v.chunks(2).map(|r| r.iter().map(|&x| x as f64).collect()).collect() };
        let (real, fake) = (rows(&REAL), rows(&FAKE));
        match kind {
            "r1" => real,
            "r2" => fake,
            "wgan_gp" => real
                .iter()
                .zip(&fake)
                .map(|(r, f)| {
                    let eps = rng.gen::<f32>() as f64;
                    r.iter().zip(f).map(|(r, f)| eps * r + (1.0 - eps) * f).collect()
                })
                .collect(),
            "dragan" => {
                // numpy: x + 0.5 * x.std(axis=0) * np.random.random(x.shape)  (std with ddof=0)
                let n = real.len() as f64;
                let std: Vec<f64> = (0..2)
                    .map(|j| {
                        let m = real.iter().map(|r| r[j]).sum::<f64>() / n;
                        (real.iter().map(|r| (r[j] - m).powi(2)).sum::<f64>() / n).sqrt()
                    })
                    .collect();
                real.iter()
                    .map(|r| (0..2).map(|j| r[j] + 0.5 * std[j] * rng.gen::<f32>() as f64).collect())
                    .collect()
            }
            _ => unreachable!(),
        }
    }

    /// The penalty on the host: per-sample input gradients by finite differences, then the formula.
    fn reference_penalty(kind: &str, d: &impl Fn(&[f64]) -> f64, seed: u64, one_sided: bool) -> f64 {
        let pts = reference_points(kind, seed);
        let per: Vec<f64> = pts
            .iter()
            .map(|x| {
                let n2: f64 = fd_input_grad(d, x).iter().map(|g| g * g).sum();
                match kind {
                    "r1" | "r2" => n2,
                    _ if one_sided => (n2.sqrt() - 1.0).max(0.0).powi(2),
                    _ => (n2.sqrt() - 1.0).powi(2),
                }
            })
            .collect();
        let weight = if kind.starts_with('r') { 10.0 / 2.0 } else { 10.0 };
        weight * per.iter().sum::<f64>() / per.len() as f64
    }

    fn build(kind: &str, one_sided: bool) -> Box<dyn Stabilizer> {
        match kind {
            "wgan_gp" => WganGpConfig {
                one_sided,
                ..Default::default()
            }
            .build(),
            "r1" => R1Config::default().build(),
            "r2" => R2Config::default().build(),
            "dragan" => DraganConfig::default().build(),
            _ => unreachable!(),
        }
        .unwrap()
    }

    fn close(what: &str, got: f64, want: f64, rel: f64, abs: f64) {
        assert!(
            (got - want).abs() <= abs + rel * want.abs(),
            "{what}: got {got}, want {want}"
        );
    }

    #[test]
    fn penalty_values_match_finite_differences_of_the_critic() {
        let device = Device::default();
        for act in [Act::Tanh, Act::Leaky] {
            for kind in ["wgan_gp", "r1", "r2", "dragan"] {
                let mut net = critic(&device, act, 1.0);
                let d = host_critic(&net, act);
                let mut s = build(kind, false);
                let got = term(s.as_mut(), &mut net, &device, 7, 0).unwrap().array() as f64;
                let want = reference_penalty(kind, &d, 7, false);
                close(kind, got, want, 1e-4, 1e-6);
                assert!(want > 1e-2, "{kind}: the check needs a non-trivial penalty, got {want}");
            }
        }
    }

    #[test]
    fn parameter_gradients_match_finite_differences_of_the_penalty() {
        let device = Device::default();
        for act in [Act::Tanh, Act::Leaky] {
            for (kind, one_sided) in [
                ("wgan_gp", false),
                ("wgan_gp", true),
                ("r1", false),
                ("r2", false),
                ("dragan", false),
            ] {
                let mut s = build(kind, one_sided);
                // Weights scaled so that some norms are above 1 and the one-sided term is non-zero.
                let mut net = critic(&device, act, 1.5);
                let t = term(s.as_mut(), &mut net, &device, 3, 0).unwrap();
                let mut grads: Grads = t.backward();
                let n = net.named_params().len();
                let mut reached = 0;
                for i in 0..n {
                    let (name, analytic) = {
                        let (name, p) = &net.named_params()[i];
                        (name.clone(), grad_to_vec(&mut grads, p).unwrap())
                    };
                    let base = net.named_params()[i].1.to_vec();
                    for (k, &a) in analytic.iter().enumerate() {
                        let h = 1e-2f32;
                        let mut eval = |delta: f32| {
                            let mut v = base.clone();
                            v[k] += delta;
                            net.named_params_mut()[i].1.set(&v).unwrap();
                            let value = term(s.as_mut(), &mut net, &device, 3, 0).unwrap().array() as f64;
                            net.named_params_mut()[i].1.set(&base).unwrap();
                            value
                        };
                        let numeric = (eval(h) - eval(-h)) / (2.0 * h as f64);
                        close(
                            &format!("{kind} one_sided={one_sided}: d/d{name}[{k}]"),
                            a as f64,
                            numeric,
                            2e-2,
                            2e-3,
                        );
                        if a.abs() > 1e-3 {
                            reached += 1;
                        }
                    }
                }
                assert!(reached > 4, "{kind}: too few non-zero parameter gradients ({reached})");
            }
        }
    }

    #[test]
    fn one_sided_differs_exactly_where_the_norm_is_below_the_target() {
        let device = Device::default();
        let mut net = critic(&device, Act::Leaky, 0.85);
        let d = host_critic(&net, Act::Leaky);
        let norms: Vec<f64> = reference_points("wgan_gp", 5)
            .iter()
            .map(|x| fd_input_grad(&d, x).iter().map(|g| g * g).sum::<f64>().sqrt())
            .collect();
        assert!(
            norms.iter().any(|&n| n < 1.0) && norms.iter().any(|&n| n > 1.0),
            "{norms:?}"
        );
        let two = term(build("wgan_gp", false).as_mut(), &mut net, &device, 5, 0)
            .unwrap()
            .array() as f64;
        let one = term(build("wgan_gp", true).as_mut(), &mut net, &device, 5, 0)
            .unwrap()
            .array() as f64;
        // The difference is λ/B Σ_{‖∇D‖ < 1} (‖∇D‖ − 1)².
        let below: f64 = norms.iter().filter(|&&n| n < 1.0).map(|n| (n - 1.0).powi(2)).sum();
        close(
            "two-sided - one-sided",
            two - one,
            10.0 * below / norms.len() as f64,
            1e-4,
            1e-6,
        );
        assert!(two - one > 1e-3);
        // With every norm above 1 they agree.
        let mut steep = critic(&device, Act::Leaky, 4.0);
        let d = host_critic(&steep, Act::Leaky);
        assert!(reference_points("wgan_gp", 5)
            .iter()
            .all(|x| fd_input_grad(&d, x).iter().map(|g| g * g).sum::<f64>() > 1.0));
        let two = term(build("wgan_gp", false).as_mut(), &mut steep, &device, 5, 0)
            .unwrap()
            .array();
        let one = term(build("wgan_gp", true).as_mut(), &mut steep, &device, 5, 0)
            .unwrap()
            .array();
        close("steep critic", one as f64, two as f64, 1e-6, 0.0);
    }

    #[test]
    fn lazy_r1_applies_every_k_steps_scaled_by_k_and_reports_the_norm() {
        let device = Device::default();
        let mut net = critic(&device, Act::Tanh, 1.0);
        let mut eager = R1Config::default().build().unwrap();
        let mut lazy = R1Config { gamma: 10.0, every: 4 }.build().unwrap();
        let full = term(eager.as_mut(), &mut net, &device, 0, 6).unwrap().array();
        assert!(term(lazy.as_mut(), &mut net, &device, 0, 6).is_none());
        let at8 = term(lazy.as_mut(), &mut net, &device, 0, 8).unwrap().array();
        close("lazy r1", at8 as f64, 4.0 * full as f64, 1e-6, 0.0);
        // Other sites get nothing.
        let mut rng = Rng::seed_from_u64(0);
        let mut ctx = HookContext {
            step: 0,
            device: &device,
            rng: &mut rng,
        };
        assert!(eager.extra_loss(&mut LossSite::Generator, &mut ctx).unwrap().is_none());
        assert!(eager
            .extra_loss(&mut LossSite::Autoencoder, &mut ctx)
            .unwrap()
            .is_none());
        // The mean gradient norm of the step's updates, as a diagnostic, then reset.
        let d = host_critic(&net, Act::Tanh);
        let pts = reference_points("r1", 0);
        let mean_norm = pts
            .iter()
            .map(|x| fd_input_grad(&d, x).iter().map(|g| g * g).sum::<f64>().sqrt())
            .sum::<f64>()
            / pts.len() as f64;
        let mut report = StepReport::default();
        eager.end_step(&mut report, &mut ctx).unwrap();
        close(
            "r1/grad_norm",
            report.diagnostics["r1/grad_norm"],
            mean_norm,
            1e-4,
            1e-6,
        );
        let mut report = StepReport::default();
        eager.end_step(&mut report, &mut ctx).unwrap();
        assert!(report.diagnostics.is_empty());
    }

    #[test]
    fn state_is_empty_and_the_term_depends_only_on_step_and_rng() {
        let device = Device::default();
        let mut net = critic(&device, Act::Tanh, 1.0);
        for kind in ["wgan_gp", "r1", "r2", "dragan"] {
            let mut s = build(kind, false);
            let a = term(s.as_mut(), &mut net, &device, 11, 2).unwrap().array();
            let state = s.state();
            let mut restored = build(kind, false);
            restored.load_state(&state).unwrap();
            let b = term(restored.as_mut(), &mut net, &device, 11, 2).unwrap().array();
            assert_eq!(a, b, "{kind}");
            let c = term(restored.as_mut(), &mut net, &device, 12, 2).unwrap().array();
            if kind == "wgan_gp" || kind == "dragan" {
                assert_ne!(a, c, "{kind}: the draw comes from the run's generator");
            }
        }
    }

    #[test]
    fn unsupported_layers_fail_with_the_penalty_named() {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        let mut net = SequentialConfig::default()
            .push(LinearConfig::new(3))
            .push(nash_core::layers::norm::BatchNormConfig::default())
            .push(LinearConfig::new(1))
            .build(
                FeatureShape::Flat(2),
                &mut BuildContext {
                    device: &device,
                    rng: &mut rng,
                },
                "critic",
            )
            .unwrap();
        let (real, fake) = (matrix(&device, &REAL), matrix(&device, &FAKE));
        let mut ctx = HookContext {
            step: 0,
            device: &device,
            rng: &mut rng,
        };
        let mut s = build("wgan_gp", false);
        let err = s
            .extra_loss(
                &mut LossSite::Discriminator {
                    critic: &mut net,
                    real: &real,
                    fake: &fake,
                    shape: FeatureShape::Flat(2),
                },
                &mut ctx,
            )
            .err()
            .unwrap();
        let msg = err.to_string();
        assert!(matches!(err, Error::Unsupported { .. }), "{msg}");
        assert!(
            msg.contains("`wgan_gp` gradient penalty") && msg.contains("batch_norm"),
            "{msg}"
        );
    }

    #[test]
    fn validate_refuses_a_batch_norm_critic_and_a_missing_group() {
        let device = Device::default();
        let model = crate::testutil::TwoGroups::new(&device);
        // The test model's discriminator has a `running_var` buffer but no batch norm.
        build("r1", false).validate(&model).unwrap();
        let mut with_bn = crate::testutil::TwoGroups::new(&device);
        let p =
            nash_core::tensor::Param::from_vec(&device, vec![0.0; 2], vec![2], nash_core::tensor::ParamRole::Buffer)
                .unwrap();
        with_bn.params.push(("discriminator.1.running_mean".into(), p));
        let err = build("wgan_gp", false).validate(&with_bn).unwrap_err().to_string();
        assert!(
            err.contains("stabilizers.wgan_gp") && err.contains("`discriminator.1`") && err.contains("layer_norm"),
            "{err}"
        );
        struct NoDiscriminator(crate::testutil::TwoGroups);
        impl nash_core::tensor::Parameterized for NoDiscriminator {
            fn named_params(&self) -> Vec<(String, &nash_core::tensor::Param)> {
                self.0.named_params()
            }
            fn named_params_mut(&mut self) -> Vec<(String, &mut nash_core::tensor::Param)> {
                self.0.named_params_mut()
            }
        }
        impl Model for NoDiscriminator {
            fn family(&self) -> &str {
                "autoencoder"
            }
            fn describe(&self) -> String {
                String::new()
            }
            fn param_groups(&self) -> Vec<String> {
                vec!["model".into()]
            }
            fn train_step(
                &mut self,
                b: &nash_core::data::Batch,
                c: &mut nash_core::model::TrainContext<'_>,
            ) -> Result<StepReport> {
                self.0.train_step(b, c)
            }
            fn evaluate(
                &mut self,
                b: &nash_core::data::Batch,
                c: &mut nash_core::model::EvalContext<'_>,
            ) -> Result<std::collections::BTreeMap<String, f64>> {
                self.0.evaluate(b, c)
            }
        }
        let err = build("dragan", false)
            .validate(&NoDiscriminator(crate::testutil::TwoGroups::new(&device)))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("stabilizers.dragan") && err.contains("no parameter group `discriminator`"),
            "{err}"
        );
    }

    #[test]
    fn configs_validate_round_trip_through_typetag_and_register() {
        let bad: Vec<(Box<dyn StabilizerConfig>, &str)> = vec![
            (
                Box::new(WganGpConfig {
                    lambda: 0.0,
                    ..Default::default()
                }),
                "stabilizers.wgan_gp.lambda",
            ),
            (
                Box::new(WganGpConfig {
                    lambda: f64::NAN,
                    ..Default::default()
                }),
                "stabilizers.wgan_gp.lambda",
            ),
            (
                Box::new(WganGpConfig {
                    target: -1.0,
                    ..Default::default()
                }),
                "stabilizers.wgan_gp.target",
            ),
            (Box::new(R1Config { gamma: -1.0, every: 1 }), "stabilizers.r1.gamma"),
            (Box::new(R1Config { gamma: 1.0, every: 0 }), "stabilizers.r1.every"),
            (Box::new(R2Config { gamma: 0.0, every: 1 }), "stabilizers.r2.gamma"),
            (
                Box::new(DraganConfig { lambda: -2.0, c: 0.5 }),
                "stabilizers.dragan.lambda",
            ),
            (Box::new(DraganConfig { lambda: 10.0, c: 0.0 }), "stabilizers.dragan.c"),
        ];
        for (cfg, want) in bad {
            match cfg.build() {
                Err(Error::Config { path, .. }) => assert_eq!(path, want),
                other => panic!(
                    "{cfg:?}: expected a config error at {want}, got {:?}",
                    other.map(|s| s.name().to_string())
                ),
            }
        }
        let cfg: Box<dyn StabilizerConfig> =
            nash_core::serde_json::from_str(r#"{"type": "wgan_gp", "lambda": 5, "one_sided": true}"#).unwrap();
        let json = nash_core::serde_json::to_string(&cfg).unwrap();
        let back: Box<dyn StabilizerConfig> = nash_core::serde_json::from_str(&json).unwrap();
        assert_eq!(format!("{cfg:?}"), format!("{back:?}"));
        assert!(
            json.contains("\"one_sided\":true") && json.contains("\"target\":1.0"),
            "{json}"
        );
        assert_eq!(back.build().unwrap().name(), "wgan_gp");
        for (json, name) in [
            (r#"{"type": "r1", "gamma": 1, "every": 16}"#, "r1"),
            (r#"{"type": "r2"}"#, "r2"),
            (r#"{"type": "dragan", "c": 0.25}"#, "dragan"),
        ] {
            let cfg: Box<dyn StabilizerConfig> = nash_core::serde_json::from_str(json).unwrap();
            assert_eq!(cfg.build().unwrap().name(), name);
        }
        let err =
            nash_core::serde_json::from_str::<Box<dyn StabilizerConfig>>(r#"{"type": "r1", "gama": 1}"#).unwrap_err();
        assert!(err.to_string().contains("gama"), "{err}");
        let mut registry = nash_core::registry::Registry::new();
        crate::register(&mut registry).unwrap();
        for (kind, field) in [
            ("wgan_gp", "one_sided"),
            ("r1", "every"),
            ("r2", "gamma"),
            ("dragan", "c"),
        ] {
            let info = registry.find(nash_core::registry::Kind::Stabilizer, kind).unwrap();
            assert!(info.fields.iter().any(|f| f.name == field), "{kind}");
        }
        // No conflicts among the penalties or with clipping.
        let stack = StabilizerStack::new(vec![
            build("wgan_gp", false),
            build("r1", false),
            crate::clipping::GradientNormClippingConfig::default().build().unwrap(),
        ]);
        assert!(stack.is_ok());
    }
}
