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
            return Err(Error::shape(
                "dense_autoencoder evaluation batch",
                "at least one sample",
                0,
            ));
        }
        let out = self.forward(&batch.inputs, Mode::Eval, ctx.rng)?;
        let loss = self.loss.compute(out.value, &batch.inputs)?;
        Ok(BTreeMap::from([(
            "loss/reconstruction".to_string(),
            loss.array() as f64,
        )]))
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
}
