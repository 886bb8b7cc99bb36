//! `dense_autoencoder`: an encoder and a decoder made of runtime-shaped layer stacks, trained to
//! reconstruct their input.

use std::collections::BTreeMap;

use nash_core::data::{Batch, DataInfo};
use nash_core::dfdx::prelude::*;
use nash_core::error::{Error, Result};
use nash_core::layers::activation::{ReluConfig, SigmoidConfig};
use nash_core::layers::linear::LinearConfig;
use nash_core::layers::{BuildContext, ForwardContext, LayerConfig, Mode, Sequential, SequentialConfig};
use nash_core::loss::basic::MseConfig;
use nash_core::loss::{Loss, LossConfig};
use nash_core::model::{EvalContext, Model, ModelConfig, StepReport, TrainContext};
use nash_core::stabilizer::LossSite;
use nash_core::tensor::{check_finite, join_name, Activation, FeatureShape, Matrix, Param, Parameterized, Rng};
use serde::{Deserialize, Serialize};

/// Config of [`DenseAutoencoder`], `type = "dense_autoencoder"` in pipeline files.
///
/// The defaults are the reference dense autoencoder for 784-dimensional data: encoder
/// 784-128-64-16 with a ReLU after each linear layer, decoder 16-64-784 with a ReLU after the
/// hidden layer and a sigmoid output, trained with mean squared error. Layer input sizes follow
/// from the data; the decoder's last layer must reproduce one data sample.
#[derive(Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DenseAutoencoderConfig {
    /// The encoder, from one data sample to the code.
    pub encoder: SequentialConfig,
    /// The decoder, from the code back to one data sample.
    pub decoder: SequentialConfig,
    /// The reconstruction loss between the decoder's output and the input.
    pub loss: Box<dyn LossConfig>,
}

fn linear(out: usize) -> Box<dyn LayerConfig> {
    Box::new(LinearConfig::new(out))
}

fn relu() -> Box<dyn LayerConfig> {
    Box::new(ReluConfig::default())
}

impl DenseAutoencoderConfig {
    /// The reference encoder: linear 128, ReLU, linear 64, ReLU, linear 16, ReLU.
    pub fn reference_encoder() -> SequentialConfig {
        SequentialConfig {
            layers: vec![linear(128), relu(), linear(64), relu(), linear(16), relu()],
        }
    }
    /// The reference decoder: linear 64, ReLU, linear 784, sigmoid.
    pub fn reference_decoder() -> SequentialConfig {
        SequentialConfig {
            layers: vec![linear(64), relu(), linear(784), Box::new(SigmoidConfig::default())],
        }
    }
    /// Builds the model for `data` (the typed form of [`ModelConfig::build`]).
    pub fn build_autoencoder(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<DenseAutoencoder> {
        let shape = data.sample_shape;
        let encoder = self.encoder.build(shape, ctx, "model.encoder")?;
        let decoder = self.decoder.build(encoder.output_shape(), ctx, "model.decoder")?;
        let produced = decoder.output_shape().numel();
        if produced != shape.numel() {
            return Err(Error::config(
                "model.decoder",
                format!(
                    "the decoder produces {produced} features per sample but the data's samples are {shape} ({} \
                     features); make its last linear layer's out_features {}",
                    shape.numel(),
                    shape.numel()
                ),
            ));
        }
        let loss = self.loss.build()?;
        Ok(DenseAutoencoder {
            encoder,
            decoder,
            loss,
            shape,
        })
    }
}

impl Default for DenseAutoencoderConfig {
    fn default() -> Self {
        DenseAutoencoderConfig {
            encoder: Self::reference_encoder(),
            decoder: Self::reference_decoder(),
            loss: Box::new(MseConfig::default()),
        }
    }
}

#[typetag::serde(name = "dense_autoencoder")]
impl ModelConfig for DenseAutoencoderConfig {
    fn build(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<Box<dyn Model>> {
        Ok(Box::new(self.build_autoencoder(data, ctx)?))
    }
}

/// An encoder-decoder pair trained on reconstruction. One parameter group, `model`; parameter
/// names `model.encoder.<index>.<param>` and `model.decoder.<index>.<param>`.
pub struct DenseAutoencoder {
    encoder: Sequential,
    decoder: Sequential,
    loss: Box<dyn Loss>,
    shape: FeatureShape,
}

fn prefixed<P>(params: Vec<(String, P)>, prefix: &str) -> Vec<(String, P)> {
    params.into_iter().map(|(n, p)| (join_name(prefix, &n), p)).collect()
}

fn describe_stack(stack: &Sequential) -> String {
    stack
        .layers()
        .iter()
        .map(|l| format!("    {}", l.describe()))
        .collect::<Vec<_>>()
        .join("\n")
}

impl DenseAutoencoder {
    /// The encoder.
    pub fn encoder(&self) -> &Sequential {
        &self.encoder
    }
    /// The decoder.
    pub fn decoder(&self) -> &Sequential {
        &self.decoder
    }
    /// The per-sample shape of the data.
    pub fn data_shape(&self) -> FeatureShape {
        self.shape
    }
    /// The per-sample shape of the code.
    pub fn code_shape(&self) -> FeatureShape {
        self.encoder.output_shape()
    }

    fn input(&self, x: &Matrix) -> Result<Activation> {
        let cols = x.shape().1;
        if cols != self.shape.numel() {
            return Err(Error::shape(
                "dense_autoencoder input batch",
                format!("{} features per sample ({})", self.shape.numel(), self.shape),
                cols,
            ));
        }
        Activation::input(x, self.shape)
    }

    /// Encoder then decoder on the tape, in `mode`.
    pub fn forward(&mut self, x: &Matrix, mode: Mode, rng: &mut Rng) -> Result<Activation> {
        let input = self.input(x)?;
        let mut fwd = ForwardContext { mode, rng };
        let code = self.encoder.forward(input, &mut fwd)?;
        let out = self.decoder.forward(code, &mut fwd)?;
        Activation::new(out.value, self.shape)
    }
    /// The codes of `x` (`[n, features]`), in eval mode.
    pub fn encode(&mut self, x: &Matrix, ctx: &mut EvalContext<'_>) -> Result<Matrix> {
        let input = self.input(x)?;
        let code = self.encoder.forward(
            input,
            &mut ForwardContext {
                mode: Mode::Eval,
                rng: ctx.rng,
            },
        )?;
        Ok(code.detach())
    }
    /// The decoded samples of codes `z` (`[n, code features]`), in eval mode.
    pub fn decode(&mut self, z: &Matrix, ctx: &mut EvalContext<'_>) -> Result<Matrix> {
        let code_shape = self.code_shape();
        let cols = z.shape().1;
        if cols != code_shape.numel() {
            return Err(Error::shape(
                "dense_autoencoder codes",
                format!("{} features per code ({code_shape})", code_shape.numel()),
                cols,
            ));
        }
        let out = self.decoder.forward(
            Activation::input(z, code_shape)?,
            &mut ForwardContext {
                mode: Mode::Eval,
                rng: ctx.rng,
            },
        )?;
        Ok(out.detach())
    }
}

impl Parameterized for DenseAutoencoder {
    fn named_params(&self) -> Vec<(String, &Param)> {
        let mut all = prefixed(self.encoder.named_params(), "model.encoder");
        all.extend(prefixed(self.decoder.named_params(), "model.decoder"));
        all
    }
    fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        let mut all = prefixed(self.encoder.named_params_mut(), "model.encoder");
        all.extend(prefixed(self.decoder.named_params_mut(), "model.decoder"));
        all
    }
}

impl Model for DenseAutoencoder {
    fn family(&self) -> &str {
        "autoencoder"
    }
    fn describe(&self) -> String {
        format!(
            "dense_autoencoder: data {}, code {}, loss {}\n  encoder:\n{}\n  decoder:\n{}",
            self.shape,
            self.code_shape(),
            self.loss.name(),
            describe_stack(&self.encoder),
            describe_stack(&self.decoder),
        )
    }
    fn param_groups(&self) -> Vec<String> {
        vec!["model".into()]
    }
    /// Reconstructs the batch, adds the stabilizers' terms at [`LossSite::Autoencoder`] and
    /// updates every parameter.
    fn train_step(&mut self, batch: &Batch, ctx: &mut TrainContext<'_>) -> Result<StepReport> {
        if batch.is_empty() {
            return Err(Error::shape("dense_autoencoder batch", "at least one sample", 0));
        }
        let mut report = StepReport::default();
        let out = self.forward(&batch.inputs, Mode::Train, ctx.rng)?;
        let mut loss = self.loss.compute(out.value, &batch.inputs)?;
        report.loss(
            "loss/reconstruction",
            check_finite("loss/reconstruction", loss.array())? as f64,
        );
        let (stabilizers, mut hooks) = ctx.hooks();
        for (name, term) in stabilizers.extra_losses(&mut LossSite::Autoencoder, &mut hooks)? {
            let key = format!("loss/model/{name}");
            report.loss(key.clone(), check_finite(&key, term.array())? as f64);
            loss = loss + term;
        }
        let grads = loss.backward();
        let mut params = self.named_params_mut();
        let norm = ctx.apply_gradients("model", &mut params, grads)?;
        report.diagnostic("grad_norm/model", norm);
        Ok(report)
    }
    /// The reconstruction loss on a held-out batch, in eval mode.
    fn evaluate(&mut self, batch: &Batch, ctx: &mut EvalContext<'_>) -> Result<BTreeMap<String, f64>> {
        if batch.is_empty() {
            return Err(Error::shape("dense_autoencoder evaluation batch", "at least one sample", 0));
        }
        let out = self.forward(&batch.inputs, Mode::Eval, ctx.rng)?;
        let loss = self.loss.compute(out.value, &batch.inputs)?;
        Ok(BTreeMap::from([("loss/reconstruction".to_string(), loss.array() as f64)]))
    }
    fn reconstruct(&mut self, batch: &Batch, ctx: &mut EvalContext<'_>) -> Result<Option<Matrix>> {
        Ok(Some(self.forward(&batch.inputs, Mode::Eval, ctx.rng)?.detach()))
    }
}
