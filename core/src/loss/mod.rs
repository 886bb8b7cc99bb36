//! Losses: reconstruction and classification losses ([`Loss`]) and the adversarial objectives of
//! GANs ([`AdversarialObjective`]). Both are plugins: their configs are typetag-serialized.

use crate::error::Result;
use crate::tensor::{Matrix, Scalar, Tape};

/// A loss between a prediction on the tape and a constant target, averaged over the batch.
pub trait Loss {
    /// The loss's name in logs (`mse`).
    fn name(&self) -> &str;
    /// The mean loss. `prediction` and `target` have the same `[batch, features]` shape, except
    /// for classification losses, whose target holds one class index per row (`[batch, 1]`).
    fn compute(&self, prediction: Matrix<Tape>, target: &Matrix) -> Result<Scalar>;
}

/// Serializable description of a [`Loss`]; `type = "mse"` in pipeline files.
#[typetag::serde(tag = "type")]
pub trait LossConfig: std::fmt::Debug + Send + Sync {
    /// Builds the loss.
    fn build(&self) -> Result<Box<dyn Loss>>;
}

/// A GAN objective: the discriminator's and the generator's losses from the discriminator's raw
/// outputs (logits or critic values, `[batch, 1]`).
pub trait AdversarialObjective {
    /// The objective's name in logs (`non_saturating`).
    fn name(&self) -> &str;
    /// The discriminator's loss from its outputs on real and on generated samples.
    fn discriminator_loss(&self, real: Matrix<Tape>, fake: Matrix<Tape>) -> Result<Scalar>;
    /// The generator's loss from the discriminator's outputs on generated samples; `real` holds
    /// its (constant) outputs on real samples, for relativistic objectives.
    fn generator_loss(&self, fake: Matrix<Tape>, real: Option<&Matrix>) -> Result<Scalar>;
    /// The discriminator's loss against explicit `targets` (ones and zeros unless a stabilizer
    /// changed them: label smoothing, label noise). Objectives without labels ignore the targets,
    /// which is the default; label-based objectives override this.
    fn discriminator_loss_with_targets(
        &self,
        real: Matrix<Tape>,
        fake: Matrix<Tape>,
        targets: &crate::stabilizer::Targets,
    ) -> Result<Scalar> {
        let _ = targets;
        self.discriminator_loss(real, fake)
    }
    /// The discriminator's loss against `targets` split into its real-sample and fake-sample
    /// halves, whose sum is [`AdversarialObjective::discriminator_loss_with_targets`] (the fake
    /// weight of `targets` not applied). Equilibrium control weights the halves; objectives whose
    /// loss does not split (relativistic ones) return [`crate::Error::Unsupported`], the default.
    fn discriminator_loss_halves(
        &self,
        real: Matrix<Tape>,
        fake: Matrix<Tape>,
        targets: &crate::stabilizer::Targets,
    ) -> Result<(Scalar, Scalar)> {
        let _ = (real, fake, targets);
        Err(crate::Error::unsupported(
            "equilibrium control of this objective",
            "its discriminator loss does not split into real-sample and fake-sample halves",
        ))
    }
}

/// Serializable description of an [`AdversarialObjective`]; `type = "non_saturating"`.
#[typetag::serde(tag = "type")]
pub trait AdversarialObjectiveConfig: std::fmt::Debug + Send + Sync {
    /// Builds the objective.
    fn build(&self) -> Result<Box<dyn AdversarialObjective>>;
}

pub mod basic;

pub use basic::{BceWithLogits, BceWithLogitsConfig, CrossEntropy, CrossEntropyConfig, L1Config, Mse, MseConfig, L1};
