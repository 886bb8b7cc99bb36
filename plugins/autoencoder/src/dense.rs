//! `dense_autoencoder`: an encoder and a decoder made of runtime-shaped layer stacks, trained to
//! reconstruct their input; and [`Autoencoder`], the model every deterministic autoencoder of this
//! plugin builds (`dense_autoencoder`, `conv_autoencoder`), with optional denoising
//! ([`NoiseConfig`]) and an optional sparsity penalty ([`SparsityConfig`]).

use std::collections::BTreeMap;

use nash_core::data::{Batch, DataInfo};
use nash_core::dfdx::prelude::*;
use nash_core::error::{Error, Result};
use nash_core::layers::activation::{ReluConfig, SigmoidConfig};
use nash_core::layers::linear::LinearConfig;
use nash_core::layers::{
    Activate, ActivationFn, BuildContext, ForwardContext, Layer, LayerConfig, Mode, Sequential, SequentialConfig,
};
use nash_core::loss::basic::MseConfig;
use nash_core::loss::{Loss, LossConfig};
use nash_core::model::{EvalContext, Model, ModelConfig, StepReport, TrainContext};
use nash_core::stabilizer::LossSite;
use nash_core::tensor::{check_finite, join_name, Activation, FeatureShape, Matrix, Param, Parameterized, Rng, Scalar};
use serde::{Deserialize, Serialize};

use crate::noise::NoiseConfig;
use crate::sparse::SparsityConfig;

/// Config of [`DenseAutoencoder`], `type = "dense_autoencoder"` in pipeline files.
///
/// The defaults are the reference dense autoencoder for 784-dimensional data: encoder
/// 784-128-64-16 with a ReLU after each linear layer, decoder 16-64-784 with a ReLU after the
/// hidden layer and a sigmoid output, trained with mean squared error. Layer input sizes follow
/// from the data; the decoder's last layer must reproduce one data sample. `noise` makes it a
/// denoising autoencoder, `sparsity` a sparse one.
#[derive(Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DenseAutoencoderConfig {
    /// The encoder, from one data sample to the code.
    pub encoder: SequentialConfig,
    /// The decoder, from the code back to one data sample.
    pub decoder: SequentialConfig,
    /// The reconstruction loss between the decoder's output and the (clean) input.
    pub loss: Box<dyn LossConfig>,
    /// Corruption of the encoder's input during training (a denoising autoencoder); none by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub noise: Option<NoiseConfig>,
    /// L1 activity penalty on the code (a sparse autoencoder); none by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sparsity: Option<SparsityConfig>,
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
        AutoencoderSpec {
            kind: "dense_autoencoder",
            encoder: &self.encoder,
            decoder: &self.decoder,
            output: OutputActivation::None,
            loss: &*self.loss,
            noise: self.noise.as_ref(),
            sparsity: self.sparsity.as_ref(),
        }
        .build(data, ctx)
    }
}

impl Default for DenseAutoencoderConfig {
    fn default() -> Self {
        DenseAutoencoderConfig {
            encoder: Self::reference_encoder(),
            decoder: Self::reference_decoder(),
            loss: Box::new(MseConfig::default()),
            noise: None,
            sparsity: None,
        }
    }
}

#[typetag::serde(name = "dense_autoencoder")]
impl ModelConfig for DenseAutoencoderConfig {
    fn build(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<Box<dyn Model>> {
        Ok(Box::new(self.build_autoencoder(data, ctx)?))
    }
}

/// The activation applied after a decoder's last layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputActivation {
    /// Chosen from the data's value range: sigmoid for data in [0, 1], tanh for data in [-1, 1],
    /// none otherwise.
    #[default]
    Auto,
    /// The logistic sigmoid, outputs in (0, 1).
    Sigmoid,
    /// tanh, outputs in (-1, 1).
    Tanh,
    /// None: the decoder's last layer is the output.
    None,
}

impl OutputActivation {
    /// The function applied for data in `range`, if any.
    pub fn resolve(self, range: (f32, f32)) -> Option<ActivationFn> {
        match self {
            OutputActivation::Auto if range.0 >= 0.0 && range.1 <= 1.0 => Some(ActivationFn::Sigmoid),
            OutputActivation::Auto if range.0 >= -1.0 && range.1 <= 1.0 => Some(ActivationFn::Tanh),
            OutputActivation::Auto | OutputActivation::None => None,
            OutputActivation::Sigmoid => Some(ActivationFn::Sigmoid),
            OutputActivation::Tanh => Some(ActivationFn::Tanh),
        }
    }
}

/// Checks that a decoder (configured at `path`) producing `produced` per sample reproduces data
/// samples of shape `data`.
pub fn check_decoder_output(path: &str, produced: FeatureShape, data: FeatureShape) -> Result<()> {
    let (got, want) = (produced.numel(), data.numel());
    if got != want {
        let fix = match (produced, data) {
            (FeatureShape::Image { .. }, FeatureShape::Image { channels, .. }) => {
                format!("make its layers upsample to {data}: {channels} output channels on the last conv_transpose2d")
            }
            _ => format!("make its last linear layer's out_features {want}"),
        };
        return Err(Error::config(
            path,
            format!("the decoder produces {got} features per sample ({produced}) but the data's samples are {data} ({want} features); {fix}"),
        ));
    }
    if let (FeatureShape::Image { .. }, FeatureShape::Image { .. }) = (produced, data) {
        if produced != data {
            return Err(Error::config(
                path,
                format!("the decoder produces images {produced} but the data's samples are {data}"),
            ));
        }
    }
    Ok(())
}

/// Builds a stack at `path` for inputs `input`, adding a hint when an image layer meets flat data.
pub fn build_stack(
    cfg: &SequentialConfig,
    input: FeatureShape,
    ctx: &mut BuildContext<'_>,
    path: &str,
) -> Result<Sequential> {
    cfg.build(input, ctx, path).map_err(|e| match (e, input) {
        (Error::Config { path, message }, FeatureShape::Flat(n)) if message.contains("image") => Error::config(
            path,
            format!(
                "{message}; the data's samples are flat [{n}]: give the data source an image shape \
                 (`image_shape = [1, 28, 28]` for latent_manifold) or start with a `reshape` layer"
            ),
        ),
        (e, _) => e,
    })
}

/// What every deterministic autoencoder of this plugin is made of, borrowed from its config.
pub struct AutoencoderSpec<'a> {
    /// The model's tag, used in descriptions and errors.
    pub kind: &'static str,
    /// The encoder, configured at `model.encoder`.
    pub encoder: &'a SequentialConfig,
    /// The decoder, configured at `model.decoder`.
    pub decoder: &'a SequentialConfig,
    /// The activation after the decoder.
    pub output: OutputActivation,
    /// The reconstruction loss.
    pub loss: &'a dyn LossConfig,
    /// The training-time input corruption.
    pub noise: Option<&'a NoiseConfig>,
    /// The code's L1 penalty.
    pub sparsity: Option<&'a SparsityConfig>,
}

impl AutoencoderSpec<'_> {
    /// Builds and wires the networks for `data`, with errors naming the config path.
    pub fn build(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<Autoencoder> {
        let shape = data.sample_shape;
        if let Some(noise) = self.noise {
            noise.validate("model.noise")?;
        }
        if let Some(sparsity) = self.sparsity {
            sparsity.validate("model.sparsity")?;
        }
        let encoder = build_stack(self.encoder, shape, ctx, "model.encoder")?;
        let decoder = build_stack(self.decoder, encoder.output_shape(), ctx, "model.decoder")?;
        check_decoder_output("model.decoder", decoder.output_shape(), shape)?;
        let output: Option<Box<dyn Layer>> = self
            .output
            .resolve(data.value_range)
            .map(|f| Box::new(Activate::new(f)) as Box<dyn Layer>);
        let loss = self
            .loss
            .build()
            .map_err(|e| Error::config("model.loss", e.to_string()))?;
        Ok(Autoencoder {
            kind: self.kind,
            encoder,
            decoder,
            output,
            loss,
            shape,
            range: data.value_range,
            noise: self.noise.cloned(),
            sparsity: self.sparsity.cloned(),
        })
    }
}

/// An encoder-decoder pair trained on reconstruction, optionally denoising and sparse. One
/// parameter group, `model`; parameter names `model.encoder.<index>.<param>` and
/// `model.decoder.<index>.<param>`.
///
/// Training reports `loss/reconstruction` (the configured loss against the clean input) and, with
/// a sparsity penalty, `loss/sparsity`; the minimized loss is their sum plus any stabilizer terms.
pub struct Autoencoder {
    kind: &'static str,
    encoder: Sequential,
    decoder: Sequential,
    output: Option<Box<dyn Layer>>,
    loss: Box<dyn Loss>,
    shape: FeatureShape,
    range: (f32, f32),
    noise: Option<NoiseConfig>,
    sparsity: Option<SparsityConfig>,
}

/// The dense autoencoder is the generic [`Autoencoder`] built from [`DenseAutoencoderConfig`].
pub type DenseAutoencoder = Autoencoder;

/// Prefixes every parameter name with `prefix.`.
pub fn prefixed<P>(params: Vec<(String, P)>, prefix: &str) -> Vec<(String, P)> {
    params.into_iter().map(|(n, p)| (join_name(prefix, &n), p)).collect()
}

/// One indented line per layer of `stack`.
pub fn describe_stack(stack: &Sequential) -> String {
    stack
        .layers()
        .iter()
        .map(|l| format!("    {}", l.describe()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Wraps a constant batch as the taped input of a network expecting `shape`, or explains the mismatch.
pub fn network_input(what: &str, x: &Matrix, shape: FeatureShape) -> Result<Activation> {
    let cols = x.shape().1;
    if cols != shape.numel() {
        return Err(Error::shape(
            what,
            format!("{} features per sample ({shape})", shape.numel()),
            cols,
        ));
    }
    Activation::data(x, shape)
}

impl Autoencoder {
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
    /// The training-time input corruption, if any.
    pub fn noise(&self) -> Option<&NoiseConfig> {
        self.noise.as_ref()
    }
    /// The code's L1 penalty, if any.
    pub fn sparsity(&self) -> Option<&SparsityConfig> {
        self.sparsity.as_ref()
    }

    /// What the encoder sees: `x` corrupted by the configured noise in [`Mode::Train`], `x`
    /// itself otherwise.
    pub fn encoder_input(&self, x: &Matrix, mode: Mode, rng: &mut Rng) -> Result<Matrix> {
        let what = format!("{} input batch", self.kind);
        network_input(&what, x, self.shape)?;
        match (&self.noise, mode) {
            (Some(noise), Mode::Train) => noise.corrupt(x, self.range, rng),
            _ => Ok(x.clone()),
        }
    }

    fn decode_taped(&mut self, code: Activation, fwd: &mut ForwardContext<'_>) -> Result<Activation> {
        let mut out = self.decoder.forward(code, fwd)?;
        if let Some(layer) = &mut self.output {
            out = layer.forward(out, fwd)?;
        }
        Activation::new(out.value, self.shape)
    }

    /// Encoder (on the corrupted input in training) and decoder on the tape, in `mode`. Returns
    /// the code (a tape-less copy sharing its id, for penalties) and the reconstruction.
    fn forward_parts(&mut self, x: &Matrix, mode: Mode, rng: &mut Rng) -> Result<(Activation, Activation)> {
        let input = self.encoder_input(x, mode, rng)?;
        let mut fwd = ForwardContext { mode, rng };
        let code = self.encoder.forward(Activation::data(&input, self.shape)?, &mut fwd)?;
        let code_copy = code.reuse();
        let out = self.decode_taped(code, &mut fwd)?;
        Ok((code_copy, out))
    }

    /// Encoder then decoder on the tape, in `mode` (the input is corrupted in [`Mode::Train`]).
    pub fn forward(&mut self, x: &Matrix, mode: Mode, rng: &mut Rng) -> Result<Activation> {
        Ok(self.forward_parts(x, mode, rng)?.1)
    }
    /// The codes of `x` (`[n, features]`), in eval mode.
    pub fn encode(&mut self, x: &Matrix, ctx: &mut EvalContext<'_>) -> Result<Matrix> {
        let what = format!("{} input batch", self.kind);
        let input = network_input(&what, x, self.shape)?;
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
        let what = format!("{} codes", self.kind);
        let cols = z.shape().1;
        if cols != code_shape.numel() {
            return Err(Error::shape(
                what,
                format!("{} features per code ({code_shape})", code_shape.numel()),
                cols,
            ));
        }
        let mut fwd = ForwardContext {
            mode: Mode::Eval,
            rng: ctx.rng,
        };
        let z = Activation::input(z, code_shape)?;
        Ok(self.decode_taped(z, &mut fwd)?.detach())
    }

    /// The losses of one batch on the tape: the reconstruction loss and the sparsity penalty.
    fn losses(&mut self, x: &Matrix, mode: Mode, rng: &mut Rng) -> Result<(Scalar, Option<Scalar>)> {
        let (code, out) = self.forward_parts(x, mode, rng)?;
        let loss = self.loss.compute(out.value, x)?;
        let penalty = self.sparsity.as_ref().map(|s| s.penalty(code.value));
        Ok((loss, penalty))
    }
}

impl Parameterized for Autoencoder {
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

impl Model for Autoencoder {
    fn family(&self) -> &str {
        "autoencoder"
    }
    fn describe(&self) -> String {
        let output = self.output.as_ref().map_or("none".to_string(), |l| l.describe());
        let mut extras = String::new();
        if let Some(noise) = &self.noise {
            extras.push_str(&format!(", noise {noise:?}"));
        }
        if let Some(s) = &self.sparsity {
            extras.push_str(&format!(", sparsity l1 {}", s.l1));
        }
        format!(
            "{}: data {}, code {}, loss {}{extras}\n  encoder:\n{}\n  decoder:\n{}\n  output: {output}",
            self.kind,
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
    /// Reconstructs the (corrupted, if denoising) batch, adds the sparsity penalty and the
    /// stabilizers' terms at [`LossSite::Autoencoder`] and updates every parameter.
    fn train_step(&mut self, batch: &Batch, ctx: &mut TrainContext<'_>) -> Result<StepReport> {
        if batch.is_empty() {
            return Err(Error::shape(format!("{} batch", self.kind), "at least one sample", 0));
        }
        let mut report = StepReport::default();
        let (mut loss, penalty) = self.losses(&batch.inputs, Mode::Train, ctx.rng)?;
        report.loss(
            "loss/reconstruction",
            check_finite("loss/reconstruction", loss.array())? as f64,
        );
        if let Some(penalty) = penalty {
            report.loss("loss/sparsity", check_finite("loss/sparsity", penalty.array())? as f64);
            loss = loss + penalty;
        }
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
    /// The reconstruction loss (and sparsity penalty) on a held-out batch, in eval mode, on clean inputs.
    fn evaluate(&mut self, batch: &Batch, ctx: &mut EvalContext<'_>) -> Result<BTreeMap<String, f64>> {
        if batch.is_empty() {
            return Err(Error::shape(
                format!("{} evaluation batch", self.kind),
                "at least one sample",
                0,
            ));
        }
        let (loss, penalty) = self.losses(&batch.inputs, Mode::Eval, ctx.rng)?;
        let mut out = BTreeMap::from([("loss/reconstruction".to_string(), loss.array() as f64)]);
        if let Some(p) = penalty {
            out.insert("loss/sparsity".to_string(), p.array() as f64);
        }
        Ok(out)
    }
    fn reconstruct(&mut self, batch: &Batch, ctx: &mut EvalContext<'_>) -> Result<Option<Matrix>> {
        Ok(Some(self.forward(&batch.inputs, Mode::Eval, ctx.rng)?.detach()))
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;
    use nash_core::optim::adam::AdamConfig;
    use nash_core::optim::{Optimizer, OptimizerConfig};
    use nash_core::rand::{Rng as _, SeedableRng};
    use nash_core::stabilizer::{HookContext, Stabilizer, StabilizerStack};
    use nash_core::tensor::{Device, Scalar};

    use crate::noise::NoiseConfig;
    use crate::sparse::SparsityConfig;

    fn info(n: usize) -> DataInfo {
        DataInfo {
            sample_shape: FeatureShape::Flat(n),
            num_classes: None,
            value_range: (0.0, 1.0),
        }
    }

    fn stack(layers: Vec<Box<dyn LayerConfig>>) -> SequentialConfig {
        SequentialConfig { layers }
    }

    /// A 12-4-12 autoencoder with a sigmoid output, for 12-dimensional data.
    fn tiny_config(out: usize) -> DenseAutoencoderConfig {
        DenseAutoencoderConfig {
            encoder: stack(vec![linear(8), relu(), linear(4)]),
            decoder: stack(vec![linear(8), relu(), linear(out), Box::new(SigmoidConfig::default())]),
            ..Default::default()
        }
    }

    fn build(cfg: &DenseAutoencoderConfig, dim: usize) -> Result<DenseAutoencoder> {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        cfg.build_autoencoder(
            &info(dim),
            &mut BuildContext {
                device: &device,
                rng: &mut rng,
            },
        )
    }

    /// `rows` samples of rank-2 data in (0, 1): `x = σ(a u + b v)` for fixed directions u, v.
    fn low_rank_batch(device: &Device, rows: usize, dim: usize, rng: &mut Rng) -> Batch {
        let u: Vec<f32> = (0..dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let v: Vec<f32> = (0..dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let mut values = Vec::with_capacity(rows * dim);
        for _ in 0..rows {
            let (a, b) = (rng.gen_range(-2.0f32..2.0), rng.gen_range(-2.0f32..2.0));
            values.extend((0..dim).map(|j| 1.0 / (1.0 + (-(a * u[j] + b * v[j])).exp())));
        }
        Batch {
            inputs: device.tensor_from_vec(values, (rows, dim)),
            shape: FeatureShape::Flat(dim),
            labels: None,
        }
    }

    fn adam(lr: f64) -> BTreeMap<String, Box<dyn Optimizer>> {
        let cfg = AdamConfig {
            lr,
            ..Default::default()
        };
        BTreeMap::from([("model".to_string(), cfg.build().unwrap())])
    }

    #[test]
    fn training_lowers_the_reconstruction_loss() {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(1);
        let data = low_rank_batch(&device, 32, 12, &mut rng);
        let mut model = build(&tiny_config(12), 12).unwrap();
        let mut opts = adam(1e-2);
        let mut stabilizers = StabilizerStack::default();
        let mut losses = Vec::new();
        for step in 0..50 {
            let mut ctx = TrainContext {
                step,
                device: &device,
                rng: &mut rng,
                optimizers: &mut opts,
                stabilizers: &mut stabilizers,
            };
            let report = model.train_step(&data, &mut ctx).unwrap();
            assert!(report.diagnostics["grad_norm/model"] > 0.0);
            losses.push(report.losses["loss/reconstruction"]);
        }
        let (first, last) = (losses[0], losses[49]);
        assert!(last < 0.3 * first, "loss went from {first} to {last}");
        // `evaluate` measures the same loss as training (eval mode changes nothing here), without updates.
        let mut ectx = EvalContext {
            device: &device,
            rng: &mut rng,
        };
        let before: Vec<Vec<f32>> = model.named_params().iter().map(|(_, p)| p.to_vec()).collect();
        let eval = model.evaluate(&data, &mut ectx).unwrap()["loss/reconstruction"];
        assert!(eval < 0.3 * first, "{eval}");
        let after: Vec<Vec<f32>> = model.named_params().iter().map(|(_, p)| p.to_vec()).collect();
        assert_eq!(before, after);
    }

    #[test]
    fn reconstruct_is_decode_of_encode() {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(2);
        let data = low_rank_batch(&device, 5, 12, &mut rng);
        let mut model = build(&tiny_config(12), 12).unwrap();
        let mut ectx = EvalContext {
            device: &device,
            rng: &mut rng,
        };
        let code = model.encode(&data.inputs, &mut ectx).unwrap();
        assert_eq!(*code.shape(), (5, 4));
        let decoded = model.decode(&code, &mut ectx).unwrap().as_vec();
        let recon = model.reconstruct(&data, &mut ectx).unwrap().unwrap().as_vec();
        assert_eq!(decoded, recon);
        assert!(recon.iter().all(|&v| v > 0.0 && v < 1.0), "sigmoid output");
        // Codes of the wrong width are refused.
        let err = model.decode(&data.inputs, &mut ectx).unwrap_err().to_string();
        assert!(err.contains("4 features per code"), "{err}");
    }

    #[test]
    fn bad_wiring_names_the_config_path() {
        let err = build(&tiny_config(10), 12).err().unwrap().to_string();
        assert!(
            err.contains("model.decoder") && err.contains("out_features 12"),
            "{err}"
        );
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        let mut model = build(&tiny_config(12), 12).unwrap();
        let wrong = low_rank_batch(&device, 3, 10, &mut rng);
        let mut ectx = EvalContext {
            device: &device,
            rng: &mut rng,
        };
        let err = model.evaluate(&wrong, &mut ectx).unwrap_err().to_string();
        assert!(err.contains("12 features per sample"), "{err}");
    }

    #[test]
    fn the_default_is_the_reference_autoencoder() {
        let model = build(&DenseAutoencoderConfig::default(), 784).unwrap();
        let weights: Vec<(String, Vec<usize>)> = model
            .named_params()
            .into_iter()
            .filter(|(n, _)| n.ends_with("weight"))
            .map(|(n, p)| (n, p.shape.clone()))
            .collect();
        let want = [
            ("model.encoder.0.weight", vec![784, 128]),
            ("model.encoder.2.weight", vec![128, 64]),
            ("model.encoder.4.weight", vec![64, 16]),
            ("model.decoder.0.weight", vec![16, 64]),
            ("model.decoder.2.weight", vec![64, 784]),
        ];
        let want: Vec<(String, Vec<usize>)> = want.into_iter().map(|(n, s)| (n.to_string(), s)).collect();
        assert_eq!(weights, want);
        assert_eq!(model.param_groups(), ["model"]);
        let text = model.describe();
        assert!(text.contains("mse") && text.contains("sigmoid"), "{text}");
        // Parsed from a pipeline table with only the type: the same model.
        let cfg: Box<dyn ModelConfig> =
            nash_core::serde_json::from_str(r#"{"type": "dense_autoencoder", "loss": {"type": "mse"}}"#).unwrap();
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        let parsed = cfg
            .build(
                &info(784),
                &mut BuildContext {
                    device: &device,
                    rng: &mut rng,
                },
            )
            .unwrap();
        assert_eq!(parsed.named_params().len(), model.named_params().len());
        let typo = r#"{"type": "dense_autoencoder", "decodr": {"layers": []}}"#;
        let err = nash_core::serde_json::from_str::<Box<dyn ModelConfig>>(typo)
            .unwrap_err()
            .to_string();
        assert!(err.contains("decodr"), "{err}");
    }

    /// Adds `weight * Σ params²` at the autoencoder site (an L2 penalty), recording the calls.
    struct L2 {
        weight: f32,
        calls: Rc<RefCell<Vec<String>>>,
        params: Vec<Matrix>,
    }

    impl Stabilizer for L2 {
        fn name(&self) -> &str {
            "l2"
        }
        fn extra_loss(
            &mut self,
            site: &mut LossSite<'_>,
            ctx: &mut HookContext<'_>,
        ) -> Result<Option<(String, Scalar)>> {
            self.calls.borrow_mut().push(site.group().to_string());
            let _ = ctx;
            let m = &self.params[0];
            Ok(Some(("l2".into(), m.leaky_trace().square().sum() * self.weight)))
        }
    }

    #[test]
    fn stabilizer_terms_are_added_and_reported() {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(3);
        let data = low_rank_batch(&device, 8, 12, &mut rng);
        let mut model = build(&tiny_config(12), 12).unwrap();
        let calls = Rc::new(RefCell::new(Vec::new()));
        let constant: Matrix = device.tensor_from_vec(vec![1.0, 2.0], (1, 2));
        let mut stabilizers = StabilizerStack::new(vec![Box::new(L2 {
            weight: 0.5,
            calls: calls.clone(),
            params: vec![constant],
        })])
        .unwrap();
        let mut opts = adam(1e-3);
        let mut ctx = TrainContext {
            step: 0,
            device: &device,
            rng: &mut rng,
            optimizers: &mut opts,
            stabilizers: &mut stabilizers,
        };
        let report = model.train_step(&data, &mut ctx).unwrap();
        assert_eq!(*calls.borrow(), ["model"]);
        // 0.5 * (1² + 2²)
        assert!((report.losses["loss/model/l2"] - 2.5).abs() < 1e-6, "{report:?}");
    }

    fn one_step(model: &mut DenseAutoencoder, data: &Batch, seed: u64) -> StepReport {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(seed);
        let mut opts = adam(1e-3);
        let mut stabilizers = StabilizerStack::default();
        let mut ctx = TrainContext {
            step: 0,
            device: &device,
            rng: &mut rng,
            optimizers: &mut opts,
            stabilizers: &mut stabilizers,
        };
        model.train_step(data, &mut ctx).unwrap()
    }

    fn host_mse(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>() / a.len() as f64
    }

    #[test]
    fn noise_is_applied_in_training_only_and_the_target_stays_clean() {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(4);
        let data = low_rank_batch(&device, 16, 12, &mut rng);
        let mut noisy_cfg = tiny_config(12);
        noisy_cfg.noise = Some(NoiseConfig::Masking { p: 0.5 });
        let mut noisy = build(&noisy_cfg, 12).unwrap();
        let mut clean = build(&tiny_config(12), 12).unwrap();
        // Eval mode sees the clean input; train mode a masked copy.
        let x = data.inputs.as_vec();
        let mut r = Rng::seed_from_u64(9);
        assert_eq!(
            noisy.encoder_input(&data.inputs, Mode::Eval, &mut r).unwrap().as_vec(),
            x
        );
        let corrupted = noisy
            .encoder_input(&data.inputs, Mode::Train, &mut Rng::seed_from_u64(9))
            .unwrap();
        let zeros = corrupted.as_vec().iter().filter(|&&v| v == 0.0).count();
        assert!(
            (60..132).contains(&zeros),
            "about half of 192 values masked, got {zeros}"
        );
        // Evaluation and reconstruction ignore the noise: identical to the same model without it.
        let mut ectx = EvalContext {
            device: &device,
            rng: &mut rng,
        };
        assert_eq!(
            noisy.evaluate(&data, &mut ectx).unwrap(),
            clean.evaluate(&data, &mut ectx).unwrap()
        );
        assert_eq!(
            noisy.reconstruct(&data, &mut ectx).unwrap().unwrap().as_vec(),
            clean.reconstruct(&data, &mut ectx).unwrap().unwrap().as_vec()
        );
        // The training loss is the reconstruction of the corrupted input against the clean one.
        let recon_of_corrupted = clean.forward(&corrupted, Mode::Eval, &mut r).unwrap().detach().as_vec();
        let want = host_mse(&recon_of_corrupted, &x);
        let got = one_step(&mut noisy, &data, 9).losses["loss/reconstruction"];
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        let clean_loss = one_step(&mut clean, &data, 9).losses["loss/reconstruction"];
        assert!((got - clean_loss).abs() > 1e-4, "the noise changed the training loss");
    }

    #[test]
    fn sparsity_penalty_matches_the_hand_computation() {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(5);
        let data = low_rank_batch(&device, 8, 12, &mut rng);
        let mut cfg = tiny_config(12);
        cfg.sparsity = Some(SparsityConfig { l1: 0.5 });
        let mut model = build(&cfg, 12).unwrap();
        let mut ectx = EvalContext {
            device: &device,
            rng: &mut rng,
        };
        let code = model.encode(&data.inputs, &mut ectx).unwrap().as_vec();
        // 0.5 · mean |code| over 8 samples x 4 code units.
        let want = 0.5 * code.iter().map(|v| v.abs() as f64).sum::<f64>() / 32.0;
        assert!(want > 0.0);
        let eval = model.evaluate(&data, &mut ectx).unwrap();
        assert!((eval["loss/sparsity"] - want).abs() < 1e-6, "{eval:?} vs {want}");
        let report = one_step(&mut model, &data, 0);
        assert!((report.losses["loss/sparsity"] - want).abs() < 1e-6, "{report:?}");
        // Training with a strong penalty shrinks the codes.
        cfg.sparsity = Some(SparsityConfig { l1: 1.0 });
        let mut strong = build(&cfg, 12).unwrap();
        let mut opts = adam(1e-2);
        let mut stabilizers = StabilizerStack::default();
        let mut penalties = Vec::new();
        for step in 0..40 {
            let mut ctx = TrainContext {
                step,
                device: &device,
                rng: &mut rng,
                optimizers: &mut opts,
                stabilizers: &mut stabilizers,
            };
            penalties.push(strong.train_step(&data, &mut ctx).unwrap().losses["loss/sparsity"]);
        }
        assert!(penalties[39] < 0.5 * penalties[0], "{penalties:?}");
    }

    #[test]
    fn denoising_sparse_autoencoder_trains() {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(6);
        let data = low_rank_batch(&device, 32, 12, &mut rng);
        for noise in [
            NoiseConfig::Gaussian { std: 0.05 },
            NoiseConfig::Masking { p: 0.1 },
            NoiseConfig::SaltAndPepper { p: 0.05 },
        ] {
            let mut cfg = tiny_config(12);
            cfg.noise = Some(noise.clone());
            cfg.sparsity = Some(SparsityConfig { l1: 1e-3 });
            let mut model = build(&cfg, 12).unwrap();
            assert!(model.describe().contains("noise") && model.describe().contains("sparsity l1 0.001"));
            let mut opts = adam(1e-2);
            let mut stabilizers = StabilizerStack::default();
            let mut losses = Vec::new();
            for step in 0..50 {
                let mut ctx = TrainContext {
                    step,
                    device: &device,
                    rng: &mut rng,
                    optimizers: &mut opts,
                    stabilizers: &mut stabilizers,
                };
                let report = model.train_step(&data, &mut ctx).unwrap();
                assert!(report.first_non_finite().is_none());
                losses.push(report.losses["loss/reconstruction"]);
            }
            assert!(losses[49] < 0.5 * losses[0], "{noise:?}: {losses:?}");
        }
    }
}
