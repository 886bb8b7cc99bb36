//! Models: a model family owns its training step (an autoencoder's single update, a GAN's
//! alternating discriminator and generator updates); the trainer owns everything around it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::data::{Batch, DataInfo};
use crate::error::{Error, Result};
use crate::layers::BuildContext;
use crate::optim::Optimizer;
use crate::stabilizer::{HookContext, StabilizerStack};
use crate::state::StateDict;
use crate::tensor::{Device, Grads, Matrix, Param, Parameterized, Rng};

/// What one training step reports: named losses and diagnostics, all finite unless something
/// went wrong (the trainer checks).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// Loss values by name (`d_loss`, `g_loss`, `reconstruction`).
    pub losses: BTreeMap<String, f64>,
    /// Other measurements by name (`grad_norm/generator`, `d_real_mean`).
    pub diagnostics: BTreeMap<String, f64>,
}

impl StepReport {
    /// Records a loss.
    pub fn loss(&mut self, name: impl Into<String>, value: f64) {
        self.losses.insert(name.into(), value);
    }
    /// Records a diagnostic.
    pub fn diagnostic(&mut self, name: impl Into<String>, value: f64) {
        self.diagnostics.insert(name.into(), value);
    }
    /// The first non-finite value, by name.
    pub fn first_non_finite(&self) -> Option<(&str, f64)> {
        self.losses
            .iter()
            .chain(self.diagnostics.iter())
            .find(|(_, v)| !v.is_finite())
            .map(|(k, v)| (k.as_str(), *v))
    }
}

/// Everything a model's training step uses besides its own networks.
pub struct TrainContext<'a> {
    /// The global step, counted from 0.
    pub step: u64,
    /// Where tensors live.
    pub device: &'a Device,
    /// The run's seeded generator (latent codes, noise, dropout).
    pub rng: &'a mut Rng,
    /// One optimizer per parameter group the model declared ([`Model::param_groups`]).
    pub optimizers: &'a mut BTreeMap<String, Box<dyn Optimizer>>,
    /// The pipeline's stabilizers, in order.
    pub stabilizers: &'a mut StabilizerStack,
}

impl TrainContext<'_> {
    /// The hook context stabilizers receive, borrowed from this one.
    pub fn hooks(&mut self) -> (&mut StabilizerStack, HookContext<'_>) {
        (
            self.stabilizers,
            HookContext {
                step: self.step,
                device: self.device,
                rng: self.rng,
            },
        )
    }

    /// Applies `grads` to the parameters of `group`: stabilizers edit the gradients, the group's
    /// optimizer updates, stabilizers act after the update. Returns the global L2 norm of the
    /// gradients of `params` as the optimizer received them.
    pub fn apply_gradients(
        &mut self,
        group: &str,
        params: &mut [(String, &mut Param)],
        mut grads: Grads,
    ) -> Result<f64> {
        let ctx = &mut HookContext {
            step: self.step,
            device: self.device,
            rng: self.rng,
        };
        self.stabilizers.edit_gradients(group, params, &mut grads, ctx)?;
        let norm = grad_norm(params, &mut grads);
        let optimizer = self.optimizers.get_mut(group).ok_or_else(|| {
            Error::config(
                format!("optimizers.{group}"),
                "no optimizer configured for this parameter group",
            )
        })?;
        optimizer.step(params, &mut grads)?;
        self.stabilizers.after_update(group, params, ctx)?;
        Ok(norm)
    }
}

/// Global L2 norm of the gradients of trainable `params` present in `grads` (read in place on
/// the CPU).
pub fn grad_norm(params: &[(String, &mut Param)], grads: &mut Grads) -> f64 {
    let squares = crate::kernels::sum_of_squares;
    let mut sum = 0.0f64;
    for (_, p) in params.iter() {
        if p.trainable() {
            #[cfg(not(feature = "cuda"))]
            let squared = p.with_id(|t| grads.get_or_alloc_mut(t).map(|g| squares(g)));
            #[cfg(feature = "cuda")]
            let squared = crate::tensor::grad_to_vec(grads, p).map(|g| squares(&g));
            if let Ok(s) = squared {
                sum += s;
            }
        }
    }
    sum.sqrt()
}

/// What evaluation, sampling and reconstruction need.
pub struct EvalContext<'a> {
    /// Where tensors live.
    pub device: &'a Device,
    /// A seeded generator (latent codes).
    pub rng: &'a mut Rng,
}

/// What a classifier says about a batch of samples ([`Model::classify`]).
pub struct Classification {
    /// One feature vector per sample (the penultimate layer's activations): `[samples, features]`.
    pub features: Matrix,
    /// Unnormalized class scores: `[samples, classes]`.
    pub logits: Matrix,
}

impl Classification {
    /// The predicted class of every sample: the index of the largest logit of its row (the first
    /// of ties; a NaN logit never wins: a row of NaNs, or of no classes at all, predicts 0).
    pub fn predicted_classes(&self) -> Vec<usize> {
        use dfdx::prelude::HasShape;
        let (rows, classes) = *self.logits.shape();
        if rows == 0 || classes == 0 {
            return vec![0; rows];
        }
        self.logits
            .as_vec()
            .chunks(classes)
            .map(|row| {
                let mut best = 0;
                for (i, &v) in row.iter().enumerate() {
                    if !v.is_nan() && (v > row[best] || row[best].is_nan()) {
                        best = i;
                    }
                }
                best
            })
            .collect()
    }
}

/// A trainable model: an autoencoder, a GAN, an autoencoder inside a GAN.
pub trait Model: Parameterized {
    /// The family (`autoencoder`, `gan`), used by metrics and outputs.
    fn family(&self) -> &str;
    /// A multi-line description of the networks.
    fn describe(&self) -> String;
    /// The parameter groups, each updated by its own optimizer (`["model"]`, or
    /// `["discriminator", "generator"]`). Parameter names start with their group's name.
    fn param_groups(&self) -> Vec<String>;
    /// One training step on `batch`: forward, losses, backward, updates through
    /// [`TrainContext::apply_gradients`], calling the stabilizer hooks at their points.
    fn train_step(&mut self, batch: &Batch, ctx: &mut TrainContext<'_>) -> Result<StepReport>;
    /// Losses on a held-out batch, without updating anything (eval mode).
    fn evaluate(&mut self, batch: &Batch, ctx: &mut EvalContext<'_>) -> Result<BTreeMap<String, f64>>;
    /// `n` generated samples (rows), for generative models.
    fn sample(&mut self, _n: usize, _ctx: &mut EvalContext<'_>) -> Result<Option<Matrix>> {
        Ok(None)
    }
    /// Reconstructions of `batch`, for autoencoders.
    fn reconstruct(&mut self, _batch: &Batch, _ctx: &mut EvalContext<'_>) -> Result<Option<Matrix>> {
        Ok(None)
    }
    /// Feature vectors and class logits of `inputs` (rows of samples), for classifiers: the
    /// feature network of sample-quality metrics (FID, KID, precision and recall, classifier
    /// score) is a model that answers this. Runs in eval mode.
    fn classify(&mut self, _inputs: &Matrix, _ctx: &mut EvalContext<'_>) -> Result<Option<Classification>> {
        Ok(None)
    }
    /// The discrete codes `batch` is quantized to, for models with a codebook (VQ-VAE): every
    /// sample's code indices in order, samples one after another. Used by codebook metrics.
    fn latent_codes(&mut self, _batch: &Batch, _ctx: &mut EvalContext<'_>) -> Result<Option<Vec<usize>>> {
        Ok(None)
    }
    /// Whether [`Model::reestimate_statistics`] can draw the inputs of `group`.
    fn reestimates_statistics(&self, _group: &str) -> bool {
        false
    }
    /// Re-estimates the running statistics (batch norm) of `group` for its current parameters
    /// from `batches` batches of `batch_size` inputs the model draws itself (latent codes for a
    /// generator), as [`crate::layers::sequential::Sequential::reestimate_statistics`]. The
    /// trainer calls it while a stabilizer's evaluation parameters (an EMA of the generator)
    /// stand in for the trained ones, whose running statistics belong to other weights.
    /// `Ok(false)` when the model cannot draw the group's inputs (see
    /// [`Model::reestimates_statistics`]); a group without running statistics is left as it is.
    fn reestimate_statistics(
        &mut self,
        _group: &str,
        _batches: usize,
        _batch_size: usize,
        _ctx: &mut EvalContext<'_>,
    ) -> Result<bool> {
        Ok(false)
    }
    /// State beyond parameters and optimizers (BEGAN's k_t, say), for checkpoints.
    fn extra_state(&self) -> StateDict {
        StateDict::default()
    }
    /// Restores [`Model::extra_state`].
    fn load_extra_state(&mut self, _state: &StateDict) -> Result<()> {
        Ok(())
    }
}

/// Serializable description of a [`Model`]; `type = "dense_autoencoder"` in pipeline files.
#[typetag::serde(tag = "type")]
pub trait ModelConfig: std::fmt::Debug + Send + Sync {
    /// Builds the model for data described by `data`, or explains why they do not fit.
    fn build(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<Box<dyn Model>>;
}

/// The parameters of `model` whose names start with `group.`.
pub fn group_params<'a>(params: Vec<(String, &'a mut Param)>, group: &str) -> Vec<(String, &'a mut Param)> {
    let prefix = format!("{group}.");
    params.into_iter().filter(|(n, _)| n.starts_with(&prefix)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{matrix_from_vec, ParamRole};

    #[test]
    fn predicted_classes_are_row_argmaxes_first_of_ties_and_never_nan() {
        let device = Device::default();
        let nan = f32::NAN;
        #[rustfmt::skip]
        let logits = vec![
            0.1, 2.0, -1.0,   // plain maximum: 1
            3.0, 3.0, 1.0,    // tie: the first, 0
            nan, -5.0, -7.0,  // a leading NaN loses to any number: 1
            1.0, nan, 4.0,    // a NaN in the middle is skipped: 2
            nan, nan, nan,    // all NaN: 0
            -2.0, -1.0, -1.0, // tie after a smaller value: 1
            nan, nan, -3.0,   // the only number wins: 2
        ];
        let classification = Classification {
            features: matrix_from_vec(&device, vec![0.0; 7], 7, 1).unwrap(),
            logits: matrix_from_vec(&device, logits, 7, 3).unwrap(),
        };
        assert_eq!(classification.predicted_classes(), vec![1, 0, 1, 2, 0, 1, 2]);
        let empty = Classification {
            features: matrix_from_vec(&device, vec![], 0, 1).unwrap(),
            logits: matrix_from_vec(&device, vec![], 0, 3).unwrap(),
        };
        assert!(empty.predicted_classes().is_empty());
    }

    #[test]
    fn the_gradient_norm_covers_every_trainable_parameter_and_every_element() {
        let device = Device::default();
        // 19 elements: two chunks of eight and a tail of three; a frozen parameter is left out.
        let values: Vec<f32> = (1..=19).map(|i| i as f32 * 0.5).collect();
        let param = |n: usize, role| Param::from_vec(&device, vec![0.0; n], vec![n], role).unwrap();
        let (mut a, mut b, mut frozen) = (
            param(19, ParamRole::Weight),
            param(2, ParamRole::Bias),
            param(4, ParamRole::Buffer),
        );
        let mut grads = Grads::leaky();
        grads.get_or_alloc_mut(a.value()).unwrap().copy_from_slice(&values);
        grads.get_or_alloc_mut(b.value()).unwrap().copy_from_slice(&[3.0, -4.0]);
        grads
            .get_or_alloc_mut(frozen.value())
            .unwrap()
            .copy_from_slice(&[100.0; 4]);
        let params = vec![
            ("a".to_string(), &mut a),
            ("b".to_string(), &mut b),
            ("frozen".to_string(), &mut frozen),
        ];
        // Σ (i/2)² for i = 1..19 = 2470 / 4, plus 3² + 4².
        let expected = (2470.0f64 / 4.0 + 25.0).sqrt();
        assert!((grad_norm(&params, &mut grads) - expected).abs() < 1e-9);
    }
}
