//! Adversarial objectives: `non_saturating`, `minimax`, `wasserstein`, `least_squares`, `hinge` and
//! `relativistic_average`.
//!
//! Every objective takes the discriminator's raw outputs (`[batch, 1]` logits, or critic values
//! for `wasserstein`, `least_squares` and `hinge`) and returns a mean over the batch.

use nash_core::dfdx::prelude::*;
use nash_core::error::{Error, Result};
use nash_core::loss::{AdversarialObjective, AdversarialObjectiveConfig};
use nash_core::stabilizer::Targets;
use nash_core::tensor::{Matrix, Scalar, Tape};
use serde::{Deserialize, Serialize};

/// Checks that discriminator outputs are `[batch, 1]` with at least one row.
fn check_logits(what: &str, m: &Matrix<Tape>) -> Result<()> {
    let (rows, cols) = *m.shape();
    if cols != 1 || rows == 0 {
        return Err(Error::shape(
            format!("adversarial objective ({what} discriminator outputs)"),
            "[batch >= 1, 1]",
            format!("[{rows}, {cols}]"),
        ));
    }
    Ok(())
}

/// Checks that a target matrix has the shape of the outputs it labels.
fn check_targets(what: &str, logits: &Matrix<Tape>, targets: &Matrix) -> Result<()> {
    if logits.shape() != targets.shape() {
        let (r, c) = *logits.shape();
        let (tr, tc) = *targets.shape();
        return Err(Error::shape(
            format!("adversarial objective ({what} targets)"),
            format!("[{r}, {c}] like the discriminator outputs"),
            format!("[{tr}, {tc}]"),
        ));
    }
    Ok(())
}

/// A constant matrix of `value` with the shape of `like`.
fn filled(like: &Matrix<Tape>, value: f32) -> Matrix {
    like.device().ones_like(like.shape()) * value
}

/// Mean binary cross-entropy of `logits` against `targets` (numerically stable, dfdx's
/// `bce_with_logits`): `mean(max(l, 0) - l t + ln(1 + e^-|l|))`.
fn bce_mean(logits: Matrix<Tape>, targets: Matrix) -> Scalar {
    logits.bce_with_logits(targets).mean()
}

/// The standard GAN discriminator loss shared by `non_saturating` and `minimax`:
/// `BCE(real, t_real) + BCE(fake, t_fake)`, each a batch mean (PyTorch's DCGAN example:
/// `errD = criterion(D(x), 1) + criterion(D(G(z)), 0)`).
fn bce_discriminator_loss(real: Matrix<Tape>, fake: Matrix<Tape>, targets: Option<&Targets>) -> Result<Scalar> {
    let (r, f) = bce_discriminator_halves(real, fake, targets)?;
    Ok(r + f)
}

/// The two halves of [`bce_discriminator_loss`]: `(BCE(real, t_real), BCE(fake, t_fake))`.
fn bce_discriminator_halves(
    real: Matrix<Tape>,
    fake: Matrix<Tape>,
    targets: Option<&Targets>,
) -> Result<(Scalar, Scalar)> {
    check_logits("real", &real)?;
    check_logits("fake", &fake)?;
    let (t_real, t_fake) = match targets {
        Some(t) => {
            check_targets("real", &real, &t.real)?;
            check_targets("fake", &fake, &t.fake)?;
            (t.real.clone(), t.fake.clone())
        }
        None => (filled(&real, 1.0), filled(&fake, 0.0)),
    };
    Ok((bce_mean(real, t_real), bce_mean(fake, t_fake)))
}

/// The non-saturating GAN objective (Goodfellow et al. 2014, the variant used in practice).
///
/// Discriminator: `BCE(D(x), 1) + BCE(D(G(z)), 0)`; generator: `-mean(log σ(D(G(z))))`,
/// i.e. `BCE(D(G(z)), 1)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct NonSaturating;

impl AdversarialObjective for NonSaturating {
    fn name(&self) -> &str {
        "non_saturating"
    }
    fn discriminator_loss(&self, real: Matrix<Tape>, fake: Matrix<Tape>) -> Result<Scalar> {
        bce_discriminator_loss(real, fake, None)
    }
    fn discriminator_loss_with_targets(
        &self,
        real: Matrix<Tape>,
        fake: Matrix<Tape>,
        targets: &Targets,
    ) -> Result<Scalar> {
        bce_discriminator_loss(real, fake, Some(targets))
    }
    /// `(BCE(D(x), t_real), BCE(D(G(z)), t_fake))`.
    fn discriminator_loss_halves(
        &self,
        real: Matrix<Tape>,
        fake: Matrix<Tape>,
        targets: &Targets,
    ) -> Result<(Scalar, Scalar)> {
        bce_discriminator_halves(real, fake, Some(targets))
    }
    fn generator_loss(&self, fake: Matrix<Tape>, _real: Option<&Matrix>) -> Result<Scalar> {
        check_logits("fake", &fake)?;
        let ones = filled(&fake, 1.0);
        Ok(bce_mean(fake, ones))
    }
}

/// Config of [`NonSaturating`]: `objective = { type = "non_saturating" }`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NonSaturatingConfig {}

#[typetag::serde(name = "non_saturating")]
impl AdversarialObjectiveConfig for NonSaturatingConfig {
    fn build(&self) -> Result<Box<dyn AdversarialObjective>> {
        Ok(Box::new(NonSaturating))
    }
}

/// The original minimax GAN objective (Goodfellow et al. 2014).
///
/// Discriminator: as [`NonSaturating`]; generator: `mean(log(1 - σ(D(G(z)))))`, computed stably
/// as `-mean(softplus(D(G(z))))` = `-BCE(D(G(z)), 0)`. Its gradient vanishes when the
/// discriminator confidently rejects the fakes, which is why the non-saturating form exists.
#[derive(Clone, Copy, Debug, Default)]
pub struct Minimax;

impl AdversarialObjective for Minimax {
    fn name(&self) -> &str {
        "minimax"
    }
    fn discriminator_loss(&self, real: Matrix<Tape>, fake: Matrix<Tape>) -> Result<Scalar> {
        bce_discriminator_loss(real, fake, None)
    }
    fn discriminator_loss_with_targets(
        &self,
        real: Matrix<Tape>,
        fake: Matrix<Tape>,
        targets: &Targets,
    ) -> Result<Scalar> {
        bce_discriminator_loss(real, fake, Some(targets))
    }
    /// `(BCE(D(x), t_real), BCE(D(G(z)), t_fake))`.
    fn discriminator_loss_halves(
        &self,
        real: Matrix<Tape>,
        fake: Matrix<Tape>,
        targets: &Targets,
    ) -> Result<(Scalar, Scalar)> {
        bce_discriminator_halves(real, fake, Some(targets))
    }
    fn generator_loss(&self, fake: Matrix<Tape>, _real: Option<&Matrix>) -> Result<Scalar> {
        check_logits("fake", &fake)?;
        let zeros = filled(&fake, 0.0);
        Ok(bce_mean(fake, zeros).negate())
    }
}

/// Config of [`Minimax`]: `objective = { type = "minimax" }`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MinimaxConfig {}

#[typetag::serde(name = "minimax")]
impl AdversarialObjectiveConfig for MinimaxConfig {
    fn build(&self) -> Result<Box<dyn AdversarialObjective>> {
        Ok(Box::new(Minimax))
    }
}

/// The Wasserstein GAN objective (Arjovsky et al. 2017): the critic's outputs are scores, not
/// logits. Critic: `mean(D(G(z))) - mean(D(x))`; generator: `-mean(D(G(z)))`. The critic must be
/// kept Lipschitz by a stabilizer (weight clipping, gradient penalty, spectral norm). Labels and
/// label-changing stabilizers do not apply and are ignored.
#[derive(Clone, Copy, Debug, Default)]
pub struct Wasserstein;

impl AdversarialObjective for Wasserstein {
    fn name(&self) -> &str {
        "wasserstein"
    }
    fn discriminator_loss(&self, real: Matrix<Tape>, fake: Matrix<Tape>) -> Result<Scalar> {
        check_logits("real", &real)?;
        check_logits("fake", &fake)?;
        Ok(fake.mean() - real.mean())
    }
    /// `(−mean(D(x)), mean(D(G(z))))`; the targets are ignored, as in the loss.
    fn discriminator_loss_halves(
        &self,
        real: Matrix<Tape>,
        fake: Matrix<Tape>,
        _targets: &Targets,
    ) -> Result<(Scalar, Scalar)> {
        check_logits("real", &real)?;
        check_logits("fake", &fake)?;
        Ok((real.mean().negate(), fake.mean()))
    }
    fn generator_loss(&self, fake: Matrix<Tape>, _real: Option<&Matrix>) -> Result<Scalar> {
        check_logits("fake", &fake)?;
        Ok(fake.mean().negate())
    }
}

/// Config of [`Wasserstein`]: `objective = { type = "wasserstein" }`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WassersteinConfig {}

#[typetag::serde(name = "wasserstein")]
impl AdversarialObjectiveConfig for WassersteinConfig {
    fn build(&self) -> Result<Box<dyn AdversarialObjective>> {
        Ok(Box::new(Wasserstein))
    }
}

/// Checks that a `real` scores matrix is `[batch >= 1, 1]` (for relativistic objectives).
fn check_scores(what: &str, m: &Matrix) -> Result<()> {
    let (rows, cols) = *m.shape();
    if cols != 1 || rows == 0 {
        return Err(Error::shape(
            format!("adversarial objective ({what} discriminator outputs)"),
            "[batch >= 1, 1]",
            format!("[{rows}, {cols}]"),
        ));
    }
    Ok(())
}

/// A scalar broadcast to a `[rows, 1]` column.
fn column_of<T: nash_core::dfdx::tensor::Tape<f32, nash_core::tensor::Device>>(
    s: Tensor<(), f32, nash_core::tensor::Device, T>,
    rows: usize,
) -> Matrix<T> {
    s.broadcast_like::<(usize, usize), Axes2<0, 1>>(&(rows, 1))
}

fn zero() -> f32 {
    0.0
}
fn one() -> f32 {
    1.0
}

/// The least-squares GAN objective (LSGAN, Mao et al. 2017), on raw discriminator outputs.
///
/// Discriminator: `0.5·mean((D(x) − b)²) + 0.5·mean((D(G(z)) − a)²)`; generator:
/// `0.5·mean((D(G(z)) − c)²)`, with the paper's 0-1 coding `a = 0, b = 1, c = 1` by default.
/// With a stabilizer's targets `t` (ones and zeros unless smoothed), the regression targets are
/// `a + (b − a)·t`, so the default targets give exactly `b` and `a`.
#[derive(Clone, Copy, Debug)]
pub struct LeastSquares {
    /// Target for fake samples in the discriminator loss.
    pub a: f32,
    /// Target for real samples in the discriminator loss.
    pub b: f32,
    /// The value the generator wants the discriminator to give its samples.
    pub c: f32,
}

impl Default for LeastSquares {
    fn default() -> Self {
        LeastSquares { a: 0.0, b: 1.0, c: 1.0 }
    }
}

impl LeastSquares {
    fn loss(&self, real: Matrix<Tape>, fake: Matrix<Tape>, t_real: Matrix, t_fake: Matrix) -> Scalar {
        let r = (real - t_real).square().mean();
        let f = (fake - t_fake).square().mean();
        (r + f) * 0.5
    }
    /// `(0.5·mean((D(x) − t_real)²), 0.5·mean((D(G(z)) − t_fake)²))`.
    fn halves(real: Matrix<Tape>, fake: Matrix<Tape>, t_real: Matrix, t_fake: Matrix) -> (Scalar, Scalar) {
        let r = (real - t_real).square().mean() * 0.5;
        let f = (fake - t_fake).square().mean() * 0.5;
        (r, f)
    }
    /// Regression targets `a + (b − a)·t` for label targets `t`.
    fn map(&self, t: &Matrix) -> Matrix {
        t.clone() * (self.b - self.a) + self.a
    }
}

impl AdversarialObjective for LeastSquares {
    fn name(&self) -> &str {
        "least_squares"
    }
    fn discriminator_loss(&self, real: Matrix<Tape>, fake: Matrix<Tape>) -> Result<Scalar> {
        check_logits("real", &real)?;
        check_logits("fake", &fake)?;
        let (t_real, t_fake) = (filled(&real, self.b), filled(&fake, self.a));
        Ok(self.loss(real, fake, t_real, t_fake))
    }
    fn discriminator_loss_with_targets(
        &self,
        real: Matrix<Tape>,
        fake: Matrix<Tape>,
        targets: &Targets,
    ) -> Result<Scalar> {
        check_logits("real", &real)?;
        check_logits("fake", &fake)?;
        check_targets("real", &real, &targets.real)?;
        check_targets("fake", &fake, &targets.fake)?;
        let (t_real, t_fake) = (self.map(&targets.real), self.map(&targets.fake));
        Ok(self.loss(real, fake, t_real, t_fake))
    }
    /// `(0.5·mean((D(x) − b')²), 0.5·mean((D(G(z)) − a')²))` with the mapped targets.
    fn discriminator_loss_halves(
        &self,
        real: Matrix<Tape>,
        fake: Matrix<Tape>,
        targets: &Targets,
    ) -> Result<(Scalar, Scalar)> {
        check_logits("real", &real)?;
        check_logits("fake", &fake)?;
        check_targets("real", &real, &targets.real)?;
        check_targets("fake", &fake, &targets.fake)?;
        let (t_real, t_fake) = (self.map(&targets.real), self.map(&targets.fake));
        Ok(Self::halves(real, fake, t_real, t_fake))
    }
    fn generator_loss(&self, fake: Matrix<Tape>, _real: Option<&Matrix>) -> Result<Scalar> {
        check_logits("fake", &fake)?;
        let c = filled(&fake, self.c);
        Ok((fake - c).square().mean() * 0.5)
    }
}

/// Config of [`LeastSquares`]: `objective = { type = "least_squares", a = 0.0, b = 1.0, c = 1.0 }`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeastSquaresConfig {
    /// Target for fake samples in the discriminator loss.
    #[serde(default = "zero")]
    pub a: f32,
    /// Target for real samples in the discriminator loss.
    #[serde(default = "one")]
    pub b: f32,
    /// The generator's target.
    #[serde(default = "one")]
    pub c: f32,
}

impl Default for LeastSquaresConfig {
    fn default() -> Self {
        LeastSquaresConfig { a: 0.0, b: 1.0, c: 1.0 }
    }
}

#[typetag::serde(name = "least_squares")]
impl AdversarialObjectiveConfig for LeastSquaresConfig {
    fn build(&self) -> Result<Box<dyn AdversarialObjective>> {
        for (name, v) in [("a", self.a), ("b", self.b), ("c", self.c)] {
            if !v.is_finite() {
                return Err(Error::config(
                    format!("objective.{name}"),
                    format!("must be a finite number, got {v}"),
                ));
            }
        }
        if self.a == self.b {
            return Err(Error::config(
                "objective.b",
                format!("the real target b must differ from the fake target a (both {})", self.a),
            ));
        }
        Ok(Box::new(LeastSquares {
            a: self.a,
            b: self.b,
            c: self.c,
        }))
    }
}

/// The hinge objective (Lim & Ye 2017; used by SAGAN and BigGAN), on raw critic values.
///
/// Discriminator: `mean(relu(1 − D(x))) + mean(relu(1 + D(G(z))))`; generator: `−mean(D(G(z)))`.
/// Labels and label-changing stabilizers do not apply and are ignored.
#[derive(Clone, Copy, Debug, Default)]
pub struct Hinge;

impl AdversarialObjective for Hinge {
    fn name(&self) -> &str {
        "hinge"
    }
    fn discriminator_loss(&self, real: Matrix<Tape>, fake: Matrix<Tape>) -> Result<Scalar> {
        check_logits("real", &real)?;
        check_logits("fake", &fake)?;
        let r = (real.negate() + 1.0).relu().mean();
        let f = (fake + 1.0).relu().mean();
        Ok(r + f)
    }
    /// `(mean(relu(1 − D(x))), mean(relu(1 + D(G(z)))))`; the targets are ignored, as in the loss.
    fn discriminator_loss_halves(
        &self,
        real: Matrix<Tape>,
        fake: Matrix<Tape>,
        _targets: &Targets,
    ) -> Result<(Scalar, Scalar)> {
        check_logits("real", &real)?;
        check_logits("fake", &fake)?;
        Ok(((real.negate() + 1.0).relu().mean(), (fake + 1.0).relu().mean()))
    }
    fn generator_loss(&self, fake: Matrix<Tape>, _real: Option<&Matrix>) -> Result<Scalar> {
        check_logits("fake", &fake)?;
        Ok(fake.mean().negate())
    }
}

/// Config of [`Hinge`]: `objective = { type = "hinge" }`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HingeConfig {}

#[typetag::serde(name = "hinge")]
impl AdversarialObjectiveConfig for HingeConfig {
    fn build(&self) -> Result<Box<dyn AdversarialObjective>> {
        Ok(Box::new(Hinge))
    }
}

/// The relativistic average GAN objective, standard (BCE) form (RaSGAN, Jolicoeur-Martineau 2018).
///
/// With `C` the raw logits: discriminator `BCE(C(x) − mean C(G(z)), 1) + BCE(C(G(z)) − mean C(x), 0)`;
/// generator `BCE(C(G(z)) − mean C(x), 1) + BCE(C(x) − mean C(G(z)), 0)`, where the generator's
/// `C(x)` are the discriminator's constant outputs on real samples (the `real` argument, which it
/// requires). The discriminator honours smoothed targets in place of 1 and 0.
#[derive(Clone, Copy, Debug, Default)]
pub struct RelativisticAverage;

impl RelativisticAverage {
    fn d_loss(real: Matrix<Tape>, fake: Matrix<Tape>, t_real: Matrix, t_fake: Matrix) -> Scalar {
        let (n, m) = (real.shape().0, fake.shape().0);
        let mean_fake = column_of(fake.with_empty_tape().mean(), n);
        let mean_real = column_of(real.with_empty_tape().mean(), m);
        let rel_real = real - mean_fake;
        let rel_fake = fake - mean_real;
        bce_mean(rel_real, t_real) + bce_mean(rel_fake, t_fake)
    }
}

impl AdversarialObjective for RelativisticAverage {
    fn name(&self) -> &str {
        "relativistic_average"
    }
    fn discriminator_loss(&self, real: Matrix<Tape>, fake: Matrix<Tape>) -> Result<Scalar> {
        check_logits("real", &real)?;
        check_logits("fake", &fake)?;
        let (t_real, t_fake) = (filled(&real, 1.0), filled(&fake, 0.0));
        Ok(Self::d_loss(real, fake, t_real, t_fake))
    }
    fn discriminator_loss_with_targets(
        &self,
        real: Matrix<Tape>,
        fake: Matrix<Tape>,
        targets: &Targets,
    ) -> Result<Scalar> {
        check_logits("real", &real)?;
        check_logits("fake", &fake)?;
        check_targets("real", &real, &targets.real)?;
        check_targets("fake", &fake, &targets.fake)?;
        Ok(Self::d_loss(real, fake, targets.real.clone(), targets.fake.clone()))
    }
    fn generator_loss(&self, fake: Matrix<Tape>, real: Option<&Matrix>) -> Result<Scalar> {
        check_logits("fake", &fake)?;
        let real = real.ok_or_else(|| {
            Error::unsupported(
                "relativistic_average generator loss without the discriminator's outputs on real samples",
                "the relativistic objective compares fakes with the mean real score; the model must pass \
                 `real` to `generator_loss`",
            )
        })?;
        check_scores("real", real)?;
        let (n, m) = (real.shape().0, fake.shape().0);
        let mean_real = column_of(real.clone().mean(), m);
        // C(x) − mean C(G(z)) with the tape on the left: −(mean C(G(z)) − C(x)).
        let mean_fake = column_of(fake.with_empty_tape().mean(), n);
        let rel_real = (mean_fake - real.clone()).negate();
        let rel_fake = fake - mean_real;
        let ones = filled(&rel_fake, 1.0);
        let zeros = filled(&rel_real, 0.0);
        Ok(bce_mean(rel_fake, ones) + bce_mean(rel_real, zeros))
    }
}

/// Config of [`RelativisticAverage`]: `objective = { type = "relativistic_average" }`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelativisticAverageConfig {}

#[typetag::serde(name = "relativistic_average")]
impl AdversarialObjectiveConfig for RelativisticAverageConfig {
    fn build(&self) -> Result<Box<dyn AdversarialObjective>> {
        Ok(Box::new(RelativisticAverage))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nash_core::tensor::Device;

    const LOGITS_REAL: [f32; 4] = [1.5, -0.3, 0.0, 2.2];
    const LOGITS_FAKE: [f32; 4] = [-2.0, 0.7, -0.1, 0.4];

    fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }
    fn softplus(x: f64) -> f64 {
        x.max(0.0) + (-x.abs()).exp().ln_1p()
    }
    /// Reference BCE with logits, per element (PyTorch's `F.binary_cross_entropy_with_logits`):
    /// `-(t ln σ(l) + (1 - t) ln(1 - σ(l)))` = `softplus(l) - t l`.
    fn bce(l: f64, t: f64) -> f64 {
        softplus(l) - t * l
    }
    fn mean(v: impl Iterator<Item = f64>) -> f64 {
        let v: Vec<f64> = v.collect();
        v.iter().sum::<f64>() / v.len() as f64
    }

    fn column(dev: &Device, v: &[f32]) -> Matrix {
        dev.tensor_from_vec(v.to_vec(), (v.len(), 1))
    }

    /// Loss value and gradients with respect to `real` and `fake` logits.
    fn d_loss_and_grads(
        obj: &dyn AdversarialObjective,
        real: &[f32],
        fake: &[f32],
        targets: Option<&Targets>,
    ) -> (f64, Vec<f32>, Vec<f32>) {
        let dev = Device::default();
        let r = column(&dev, real);
        let f = column(&dev, fake);
        let loss = match targets {
            Some(t) => obj.discriminator_loss_with_targets(r.leaky_trace(), f.leaky_trace(), t),
            None => obj.discriminator_loss(r.leaky_trace(), f.leaky_trace()),
        }
        .unwrap();
        let value = loss.array() as f64;
        let grads = loss.backward();
        (value, grads.get(&r).as_vec(), grads.get(&f).as_vec())
    }

    fn g_loss_and_grad(obj: &dyn AdversarialObjective, fake: &[f32]) -> (f64, Vec<f32>) {
        let dev = Device::default();
        let f = column(&dev, fake);
        let loss = obj.generator_loss(f.leaky_trace(), None).unwrap();
        let value = loss.array() as f64;
        let grads = loss.backward();
        (value, grads.get(&f).as_vec())
    }

    /// Central differences of `f` around `x`, in f64 on the f32 implementation (step 1e-2; the
    /// objectives are smooth, so the truncation error ~h² is far below the tolerance).
    fn finite_diff(x: &[f32], f: impl Fn(&[f32]) -> f64) -> Vec<f64> {
        let h = 1e-2f32;
        (0..x.len())
            .map(|i| {
                let mut p = x.to_vec();
                let mut m = x.to_vec();
                p[i] += h;
                m[i] -= h;
                (f(&p) - f(&m)) / (2.0 * h as f64)
            })
            .collect()
    }

    fn assert_close(what: &str, got: &[f32], want: &[f64], rel: f64) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let tol = rel * w.abs().max(1e-2);
            assert!(
                (*g as f64 - w).abs() <= tol,
                "{what}[{i}]: got {g}, want {w} (tolerance {tol})"
            );
        }
    }

    #[test]
    fn non_saturating_values_match_the_reference_formula() {
        // PyTorch reference:
        //   bce = torch.nn.functional.binary_cross_entropy_with_logits
        //   d = bce(real, ones) + bce(fake, zeros);  g = bce(fake, ones)
        let (d, _, _) = d_loss_and_grads(&NonSaturating, &LOGITS_REAL, &LOGITS_FAKE, None);
        let want_d = mean(LOGITS_REAL.iter().map(|&l| bce(l as f64, 1.0)))
            + mean(LOGITS_FAKE.iter().map(|&l| bce(l as f64, 0.0)));
        assert!((d - want_d).abs() < 1e-5, "{d} vs {want_d}");
        let (g, _) = g_loss_and_grad(&NonSaturating, &LOGITS_FAKE);
        // -log D(G(z)) = -ln σ(l)
        let want_g = mean(LOGITS_FAKE.iter().map(|&l| -sigmoid(l as f64).ln()));
        assert!((g - want_g).abs() < 1e-5, "{g} vs {want_g}");
        // Fixed numbers, from the formula above evaluated in f64 (Python: softplus via log1p).
        assert!((want_d - 1.160_381_2).abs() < 1e-6, "{want_d}");
        assert!((want_g - 0.946_881_5).abs() < 1e-6, "{want_g}");
    }

    #[test]
    fn non_saturating_uses_smoothed_targets() {
        let dev = Device::default();
        let targets = Targets {
            real: column(&dev, &[0.9; 4]),
            fake: column(&dev, &[0.1; 4]),
            fake_weight: 1.0,
        };
        let (d, gr, gf) = d_loss_and_grads(&NonSaturating, &LOGITS_REAL, &LOGITS_FAKE, Some(&targets));
        let want = mean(LOGITS_REAL.iter().map(|&l| bce(l as f64, 0.9)))
            + mean(LOGITS_FAKE.iter().map(|&l| bce(l as f64, 0.1)));
        assert!((d - want).abs() < 1e-5, "{d} vs {want}");
        // ∂/∂l of mean BCE = (σ(l) - t) / n
        let n = LOGITS_REAL.len() as f64;
        let want_r: Vec<f64> = LOGITS_REAL.iter().map(|&l| (sigmoid(l as f64) - 0.9) / n).collect();
        let want_f: Vec<f64> = LOGITS_FAKE.iter().map(|&l| (sigmoid(l as f64) - 0.1) / n).collect();
        assert_close("d real grad", &gr, &want_r, 1e-3);
        assert_close("d fake grad", &gf, &want_f, 1e-3);
        // Targets of the wrong shape are refused, not broadcast.
        let bad = Targets {
            real: column(&dev, &[1.0; 3]),
            fake: column(&dev, &[0.0; 4]),
            fake_weight: 1.0,
        };
        let r = column(&dev, &LOGITS_REAL);
        let f = column(&dev, &LOGITS_FAKE);
        let err = NonSaturating
            .discriminator_loss_with_targets(r.leaky_trace(), f.leaky_trace(), &bad)
            .unwrap_err();
        assert!(err.to_string().contains("real targets"), "{err}");
    }

    #[test]
    fn minimax_and_wasserstein_values_match_the_reference_formula() {
        // minimax generator: mean(log(1 - σ(l)))
        let (g, _) = g_loss_and_grad(&Minimax, &LOGITS_FAKE);
        let want = mean(LOGITS_FAKE.iter().map(|&l| (1.0 - sigmoid(l as f64)).ln()));
        assert!((g - want).abs() < 1e-5, "{g} vs {want}");
        // WGAN: critic mean(fake) - mean(real); generator -mean(fake)
        let (d, _, _) = d_loss_and_grads(&Wasserstein, &LOGITS_REAL, &LOGITS_FAKE, None);
        let want_d = mean(LOGITS_FAKE.iter().map(|&l| l as f64)) - mean(LOGITS_REAL.iter().map(|&l| l as f64));
        assert!((d - want_d).abs() < 1e-6, "{d} vs {want_d}");
        assert!((want_d - (-1.1)).abs() < 1e-6, "{want_d}"); // (−1.0 / 4) − (3.4 / 4)
        let (g, grad) = g_loss_and_grad(&Wasserstein, &LOGITS_FAKE);
        assert!((g - 0.25).abs() < 1e-6, "{g}"); // −(−1.0 / 4)
        assert_close("wgan g grad", &grad, &[-0.25; 4], 1e-6);
    }

    #[test]
    fn gradients_match_finite_differences() {
        let objectives: [&dyn AdversarialObjective; 3] = [&NonSaturating, &Minimax, &Wasserstein];
        for obj in objectives {
            let (_, gr, gf) = d_loss_and_grads(obj, &LOGITS_REAL, &LOGITS_FAKE, None);
            let fd_r = finite_diff(&LOGITS_REAL, |x| d_loss_and_grads(obj, x, &LOGITS_FAKE, None).0);
            let fd_f = finite_diff(&LOGITS_FAKE, |x| d_loss_and_grads(obj, &LOGITS_REAL, x, None).0);
            assert_close(&format!("{} d/d real", obj.name()), &gr, &fd_r, 1e-2);
            assert_close(&format!("{} d/d fake", obj.name()), &gf, &fd_f, 1e-2);
            let (_, gg) = g_loss_and_grad(obj, &LOGITS_FAKE);
            let fd_g = finite_diff(&LOGITS_FAKE, |x| g_loss_and_grad(obj, x).0);
            assert_close(&format!("{} g/d fake", obj.name()), &gg, &fd_g, 1e-2);
        }
    }

    #[test]
    fn outputs_with_several_columns_are_refused() {
        let dev = Device::default();
        let m: Matrix = dev.tensor_from_vec(vec![0.0; 4], (2, 2));
        let err = NonSaturating.generator_loss(m.leaky_trace(), None).unwrap_err();
        assert!(err.to_string().contains("[batch >= 1, 1]"), "{err}");
    }

    fn g_loss_with_real(obj: &dyn AdversarialObjective, fake: &[f32], real: &[f32]) -> (f64, Vec<f32>) {
        let dev = Device::default();
        let f = column(&dev, fake);
        let r = column(&dev, real);
        let loss = obj.generator_loss(f.leaky_trace(), Some(&r)).unwrap();
        let value = loss.array() as f64;
        let grads = loss.backward();
        (value, grads.get(&f).as_vec())
    }

    fn f64s(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| x as f64).collect()
    }

    #[test]
    fn least_squares_values_match_the_reference_formula() {
        // PyTorch reference (LSGAN, a=0, b=1, c=1):
        //   d = 0.5 * ((real - 1) ** 2).mean() + 0.5 * ((fake - 0) ** 2).mean()
        //   g = 0.5 * ((fake - 1) ** 2).mean()
        let obj = LeastSquares::default();
        let (d, _, _) = d_loss_and_grads(&obj, &LOGITS_REAL, &LOGITS_FAKE, None);
        let want_d = 0.5 * mean(f64s(&LOGITS_REAL).into_iter().map(|x| (x - 1.0).powi(2)))
            + 0.5 * mean(f64s(&LOGITS_FAKE).into_iter().map(|x| x * x));
        assert!((d - want_d).abs() < 1e-5, "{d} vs {want_d}");
        // By hand: real (0.25 + 1.69 + 1 + 1.44) / 4 = 1.095; fake (4 + 0.49 + 0.01 + 0.16) / 4 = 1.165.
        assert!((want_d - 0.5 * (1.095 + 1.165)).abs() < 1e-6, "{want_d}");
        let (g, grad) = g_loss_and_grad(&obj, &LOGITS_FAKE);
        // 0.5 * (9 + 0.09 + 1.21 + 0.36) / 4 = 1.3325; ∂/∂f = (f − 1) / 4
        assert!((g - 1.3325).abs() < 1e-5, "{g}");
        let want: Vec<f64> = f64s(&LOGITS_FAKE).iter().map(|f| (f - 1.0) / 4.0).collect();
        assert_close("lsgan g grad", &grad, &want, 1e-4);
        // Configured codes (−1, 1, 0) and smoothed targets map to a + (b − a)·t.
        let obj = LeastSquares {
            a: -1.0,
            b: 1.0,
            c: 0.0,
        };
        let dev = Device::default();
        let targets = Targets {
            real: column(&dev, &[0.9; 4]),
            fake: column(&dev, &[0.0; 4]),
            fake_weight: 1.0,
        };
        let (d, _, _) = d_loss_and_grads(&obj, &LOGITS_REAL, &LOGITS_FAKE, Some(&targets));
        let want_d = 0.5 * mean(f64s(&LOGITS_REAL).into_iter().map(|x| (x - 0.8).powi(2)))
            + 0.5 * mean(f64s(&LOGITS_FAKE).into_iter().map(|x| (x + 1.0).powi(2)));
        assert!((d - want_d).abs() < 1e-5, "{d} vs {want_d}");
        let cfg: Box<dyn AdversarialObjectiveConfig> =
            nash_core::serde_json::from_str(r#"{"type": "least_squares", "a": 1.0}"#).unwrap();
        let err = cfg.build().err().unwrap().to_string();
        assert!(err.contains("objective.b"), "{err}");
    }

    #[test]
    fn hinge_values_match_the_reference_formula() {
        // PyTorch reference: d = F.relu(1 - real).mean() + F.relu(1 + fake).mean(); g = -fake.mean()
        let (d, gr, gf) = d_loss_and_grads(&Hinge, &LOGITS_REAL, &LOGITS_FAKE, None);
        // By hand: relu(1 − r) = [0, 1.3, 1, 0] → 0.575; relu(1 + f) = [0, 1.7, 0.9, 1.4] → 1.0.
        assert!((d - 1.575).abs() < 1e-6, "{d}");
        // Gradients: −1/4 where 1 − r > 0, 1/4 where 1 + f > 0, else 0.
        assert_close("hinge d real", &gr, &[0.0, -0.25, -0.25, 0.0], 1e-6);
        assert_close("hinge d fake", &gf, &[0.0, 0.25, 0.25, 0.25], 1e-6);
        let (g, _) = g_loss_and_grad(&Hinge, &LOGITS_FAKE);
        assert!((g - 0.25).abs() < 1e-6, "{g}");
    }

    #[test]
    fn relativistic_average_values_match_the_reference_formula() {
        // PyTorch reference (RaSGAN, Jolicoeur-Martineau's code):
        //   bce = F.binary_cross_entropy_with_logits
        //   d = bce(real - fake.mean(), ones) + bce(fake - real.mean(), zeros)
        //   g = bce(fake - real.mean(), ones) + bce(real - fake.mean(), zeros)
        let (r, f) = (f64s(&LOGITS_REAL), f64s(&LOGITS_FAKE));
        let (mr, mf) = (mean(r.iter().copied()), mean(f.iter().copied()));
        let (d, _, _) = d_loss_and_grads(&RelativisticAverage, &LOGITS_REAL, &LOGITS_FAKE, None);
        let want_d = mean(r.iter().map(|x| bce(x - mf, 1.0))) + mean(f.iter().map(|x| bce(x - mr, 0.0)));
        assert!((d - want_d).abs() < 1e-5, "{d} vs {want_d}");
        let (g, _) = g_loss_with_real(&RelativisticAverage, &LOGITS_FAKE, &LOGITS_REAL);
        let want_g = mean(f.iter().map(|x| bce(x - mr, 1.0))) + mean(r.iter().map(|x| bce(x - mf, 0.0)));
        assert!((g - want_g).abs() < 1e-5, "{g} vs {want_g}");
        // Without the real outputs the generator loss is refused with the reason.
        let dev = Device::default();
        let err = RelativisticAverage
            .generator_loss(column(&dev, &LOGITS_FAKE).leaky_trace(), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("real samples"), "{err}");
    }

    #[test]
    fn new_objectives_gradients_match_finite_differences() {
        let ls = LeastSquares {
            a: -1.0,
            b: 1.0,
            c: 0.5,
        };
        let objectives: [&dyn AdversarialObjective; 3] = [&ls, &Hinge, &RelativisticAverage];
        // Keep away from the hinge's kinks (|1 ± x| > h).
        let real = [1.5f32, -0.3, 0.2, 2.2];
        let fake = [-2.0f32, 0.7, -0.1, 0.4];
        for obj in objectives {
            let (_, gr, gf) = d_loss_and_grads(obj, &real, &fake, None);
            let fd_r = finite_diff(&real, |x| d_loss_and_grads(obj, x, &fake, None).0);
            let fd_f = finite_diff(&fake, |x| d_loss_and_grads(obj, &real, x, None).0);
            assert_close(&format!("{} d/d real", obj.name()), &gr, &fd_r, 1e-2);
            assert_close(&format!("{} d/d fake", obj.name()), &gf, &fd_f, 1e-2);
            let (_, gg) = g_loss_with_real(obj, &fake, &real);
            let fd_g = finite_diff(&fake, |x| g_loss_with_real(obj, x, &real).0);
            assert_close(&format!("{} g/d fake", obj.name()), &gg, &fd_g, 1e-2);
        }
    }

    /// Each objective's halves against the hand formula (smoothed targets where the objective
    /// uses them), and their sum against `discriminator_loss_with_targets`.
    #[test]
    fn loss_halves_match_the_hand_formula_and_sum_to_the_loss() {
        let dev = Device::default();
        let (r, f) = (column(&dev, &LOGITS_REAL), column(&dev, &LOGITS_FAKE));
        let targets = Targets {
            real: column(&dev, &[0.9; 4]),
            fake: column(&dev, &[0.1, 0.0, 0.2, 0.0]),
            fake_weight: 1.0,
        };
        let tr: Vec<f64> = f64s(&targets.real.as_vec());
        let tf: Vec<f64> = f64s(&targets.fake.as_vec());
        let (lr, lf) = (f64s(&LOGITS_REAL), f64s(&LOGITS_FAKE));
        let ls = LeastSquares {
            a: -1.0,
            b: 1.0,
            c: 0.0,
        };
        // Hand formulas: (real half, fake half).
        let bce_halves = (
            mean(lr.iter().zip(&tr).map(|(&l, &t)| bce(l, t))),
            mean(lf.iter().zip(&tf).map(|(&l, &t)| bce(l, t))),
        );
        // LSGAN targets a + (b − a)·t with a = −1, b = 1.
        let ls_halves = (
            0.5 * mean(lr.iter().zip(&tr).map(|(&l, &t)| (l - (-1.0 + 2.0 * t)).powi(2))),
            0.5 * mean(lf.iter().zip(&tf).map(|(&l, &t)| (l - (-1.0 + 2.0 * t)).powi(2))),
        );
        let hinge_halves = (
            mean(lr.iter().map(|&l| (1.0 - l).max(0.0))),
            mean(lf.iter().map(|&l| (1.0 + l).max(0.0))),
        );
        let w_halves = (-mean(lr.iter().copied()), mean(lf.iter().copied()));
        let cases: [(&dyn AdversarialObjective, (f64, f64)); 5] = [
            (&NonSaturating, bce_halves),
            (&Minimax, bce_halves),
            (&ls, ls_halves),
            (&Hinge, hinge_halves),
            (&Wasserstein, w_halves),
        ];
        for (obj, (want_r, want_f)) in cases {
            let (hr, hf) = obj
                .discriminator_loss_halves(r.leaky_trace(), f.leaky_trace(), &targets)
                .unwrap();
            let (hr, hf) = (hr.array() as f64, hf.array() as f64);
            let whole = obj
                .discriminator_loss_with_targets(r.leaky_trace(), f.leaky_trace(), &targets)
                .unwrap()
                .array() as f64;
            assert!((hr - want_r).abs() < 1e-5, "{}: real half {hr} vs {want_r}", obj.name());
            assert!((hf - want_f).abs() < 1e-5, "{}: fake half {hf} vs {want_f}", obj.name());
            assert!((hr + hf - whole).abs() < 1e-5, "{}: {hr} + {hf} != {whole}", obj.name());
        }
        let err = RelativisticAverage
            .discriminator_loss_halves(r.leaky_trace(), f.leaky_trace(), &targets)
            .unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    }
}
