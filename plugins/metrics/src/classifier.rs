//! `classifier`: a network of runtime-shaped layers trained with softmax cross-entropy on labelled
//! data. It is the feature network of the sample-quality metrics (FID, KID, precision and recall,
//! classifier score): [`Model::classify`] returns its logits and its **features, the activations
//! entering the last layer** (the penultimate layer's output, after its activation).
//!
//! ```toml
//! [model]
//! type = "classifier"
//! label_smoothing = 0.0          # optional, in [0, 1)
//! [model.network]
//! layers = [
//!     { type = "linear", out_features = 128 }, { type = "relu" },   # the 128 features
//!     { type = "linear", out_features = 10 },                       # one logit per class
//! ]
//! ```

use std::collections::BTreeMap;

use nash_core::data::{Batch, DataInfo};
use nash_core::dfdx::prelude::*;
use nash_core::error::{Error, Result};
use nash_core::layers::activation::ReluConfig;
use nash_core::layers::linear::LinearConfig;
use nash_core::layers::{BuildContext, ForwardContext, LayerConfig, Mode, Sequential, SequentialConfig};
use nash_core::model::{Classification, EvalContext, Model, ModelConfig, StepReport, TrainContext};
use nash_core::stabilizer::LossSite;
use nash_core::tensor::{check_finite, join_name, Activation, FeatureShape, Matrix, Param, Parameterized, Rng, Scalar};
use nash_core::tensor::{matrix_from_vec, Tape};
use serde::{Deserialize, Serialize};

/// Config of [`Classifier`], `type = "classifier"` in pipeline files.
///
/// The default network is an MLP for 10 classes: linear 128, ReLU, linear 10. The network's last
/// layer must produce one logit per class of the data (`DataInfo::num_classes`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClassifierConfig {
    /// The network, from one data sample to the class logits; the activations entering its last
    /// layer are the features.
    pub network: SequentialConfig,
    /// Label smoothing ε in [0, 1): the target puts 1 − ε on the label and ε spread evenly over
    /// every class (PyTorch's `label_smoothing`).
    pub label_smoothing: f64,
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        let layers: Vec<Box<dyn LayerConfig>> = vec![
            Box::new(LinearConfig::new(128)),
            Box::new(ReluConfig::default()),
            Box::new(LinearConfig::new(10)),
        ];
        ClassifierConfig {
            network: SequentialConfig { layers },
            label_smoothing: 0.0,
        }
    }
}

impl ClassifierConfig {
    /// Builds the model for `data` (the typed form of [`ModelConfig::build`]).
    pub fn build_classifier(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<Classifier> {
        if !(self.label_smoothing.is_finite() && (0.0..1.0).contains(&self.label_smoothing)) {
            return Err(Error::config(
                "model.label_smoothing",
                format!("must be in [0, 1), got {}", self.label_smoothing),
            ));
        }
        let Some(classes) = data.num_classes else {
            return Err(Error::config(
                "model",
                "a classifier needs labelled data, but the data source has no class labels \
                 (use a labelled source: `idx`, `ring`, `grid`, `gaussian_mixture`, ...)",
            ));
        };
        if classes < 2 {
            return Err(Error::config(
                "model",
                format!("a classifier needs at least 2 classes, the data has {classes}"),
            ));
        }
        if self.network.layers.is_empty() {
            return Err(Error::config(
                "model.network.layers",
                format!("the network needs at least one layer, the last with out_features = {classes}"),
            ));
        }
        let network = self.network.build(data.sample_shape, ctx, "model.network")?;
        let width = network.output_shape().numel();
        if width != classes {
            let last = self.network.layers.len() - 1;
            return Err(Error::config(
                format!("model.network.layers[{last}].out_features"),
                format!(
                    "the network produces {width} outputs per sample ({}) but the data has {classes} classes; \
                     make the last layer a linear layer with out_features = {classes}",
                    network.output_shape()
                ),
            ));
        }
        Ok(Classifier {
            network,
            shape: data.sample_shape,
            classes,
            label_smoothing: self.label_smoothing as f32,
        })
    }
}

#[typetag::serde(name = "classifier")]
impl ModelConfig for ClassifierConfig {
    fn build(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<Box<dyn Model>> {
        Ok(Box::new(self.build_classifier(data, ctx)?))
    }
}

/// A classifier: one network trained with softmax cross-entropy. Family `classifier`, one
/// parameter group `model`, parameter names `model.network.<index>.<param>`.
///
/// Training reports `loss/cross_entropy` (plus any stabilizer terms, added at the single-network
/// site [`LossSite::Autoencoder`] whose group is `model`), `accuracy` of the batch and
/// `grad_norm/model`; evaluation reports `loss/cross_entropy` and `accuracy` in eval mode.
pub struct Classifier {
    network: Sequential,
    shape: FeatureShape,
    classes: usize,
    label_smoothing: f32,
}

/// Mean softmax cross-entropy of `logits` (`[batch, classes]`) against class indices `labels`,
/// with label smoothing `epsilon`: `-(1/B) Σ_i Σ_c q_ic log_softmax(x_i)_c` where
/// `q_ic = (1 − ε)·[c = y_i] + ε / C` (PyTorch's `F.cross_entropy(x, y, label_smoothing=ε)`).
pub fn cross_entropy(logits: Matrix<Tape>, labels: &[usize], epsilon: f32) -> Result<Scalar> {
    let (batch, classes) = *logits.shape();
    if batch == 0 || classes == 0 {
        return Err(Error::shape(
            "cross-entropy logits",
            "at least one row and one class",
            format!("[{batch}, {classes}]"),
        ));
    }
    if labels.len() != batch {
        return Err(Error::shape("cross-entropy labels", batch, labels.len()));
    }
    let off = epsilon / classes as f32;
    let mut target = vec![off; batch * classes];
    for (row, &y) in labels.iter().enumerate() {
        if y >= classes {
            return Err(Error::shape(
                format!("cross-entropy label of row {row}"),
                format!("a class index in 0..{classes}"),
                y,
            ));
        }
        target[row * classes + y] += 1.0 - epsilon;
    }
    let target: Matrix = matrix_from_vec(logits.device(), target, batch, classes)?;
    let picked = (logits.log_softmax::<Axis<1>>() * target).sum::<Rank0, _>();
    Ok(picked * (-1.0 / batch as f32))
}

/// The share of samples whose predicted class ([`Classification::predicted_classes`]) is their
/// label; NaN when there are no samples or no classes.
pub fn accuracy(classification: &Classification, labels: &[usize]) -> f64 {
    let (rows, cols) = *classification.logits.shape();
    if rows == 0 || cols == 0 {
        return f64::NAN;
    }
    let correct = classification
        .predicted_classes()
        .iter()
        .zip(labels)
        .filter(|(predicted, label)| predicted == label)
        .count();
    correct as f64 / rows as f64
}

impl Classifier {
    /// The network.
    pub fn network(&self) -> &Sequential {
        &self.network
    }
    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.classes
    }
    /// The width of the feature vectors (the activations entering the last layer).
    pub fn feature_width(&self) -> usize {
        let n = self.network.len();
        let mut shape = self.shape;
        for layer in &self.network.layers()[..n - 1] {
            // The shapes were checked when the network was built.
            shape = layer.output_shape(shape).unwrap_or(shape);
        }
        shape.numel()
    }

    /// Runs the network on `x` in `mode`, returning the features (the activations entering the
    /// last layer, tape-less but sharing their id) and the logits on the tape.
    fn forward(&mut self, x: &Matrix, mode: Mode, rng: &mut Rng) -> Result<(Activation, Activation)> {
        let cols = x.shape().1;
        if cols != self.shape.numel() {
            return Err(Error::shape(
                "classifier input batch",
                format!("{} features per sample ({})", self.shape.numel(), self.shape),
                cols,
            ));
        }
        let mut fwd = ForwardContext { mode, rng };
        let mut h = Activation::input(x, self.shape)?;
        let layers = self.network.layers_mut();
        let (last, body) = layers
            .split_last_mut()
            .ok_or_else(|| Error::Other("the classifier's network has no layers".into()))?;
        for layer in body {
            h = layer.forward(h, &mut fwd)?;
        }
        let features = h.reuse();
        let logits = last.forward(h, &mut fwd)?;
        Ok((features, logits))
    }

    /// The batch's labels, or an error naming the data source.
    fn labels<'b>(&self, batch: &'b Batch, what: &str) -> Result<&'b [usize]> {
        let labels = batch.labels.as_deref().ok_or_else(|| {
            Error::config(
                "data",
                format!("the classifier's {what} batch has no labels: the data source must provide class labels"),
            )
        })?;
        if labels.len() != batch.len() {
            return Err(Error::shape(format!("{what} batch labels"), batch.len(), labels.len()));
        }
        Ok(labels)
    }
}

impl Parameterized for Classifier {
    fn named_params(&self) -> Vec<(String, &Param)> {
        self.network
            .named_params()
            .into_iter()
            .map(|(n, p)| (join_name("model.network", &n), p))
            .collect()
    }
    fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        self.network
            .named_params_mut()
            .into_iter()
            .map(|(n, p)| (join_name("model.network", &n), p))
            .collect()
    }
}

impl Model for Classifier {
    fn family(&self) -> &str {
        "classifier"
    }
    fn describe(&self) -> String {
        let layers: Vec<String> = self.network.summary().iter().map(|l| format!("    {l}")).collect();
        format!(
            "classifier: data {}, {} classes, {} features, label smoothing {}\n  network:\n{}",
            self.shape,
            self.classes,
            self.feature_width(),
            self.label_smoothing,
            layers.join("\n")
        )
    }
    fn param_groups(&self) -> Vec<String> {
        vec!["model".into()]
    }
    /// Softmax cross-entropy on the batch (train mode), plus the stabilizers' terms for the
    /// `model` group, then one update of every parameter.
    fn train_step(&mut self, batch: &Batch, ctx: &mut TrainContext<'_>) -> Result<StepReport> {
        if batch.is_empty() {
            return Err(Error::shape("classifier batch", "at least one sample", 0));
        }
        let labels = self.labels(batch, "training")?;
        let (features, logits) = self.forward(&batch.inputs, Mode::Train, ctx.rng)?;
        let classification = Classification {
            features: features.detach(),
            logits: logits.detach(),
        };
        let mut loss = cross_entropy(logits.value, labels, self.label_smoothing)?;
        let mut report = StepReport::default();
        report.loss(
            "loss/cross_entropy",
            check_finite("loss/cross_entropy", loss.array())? as f64,
        );
        report.diagnostic("accuracy", accuracy(&classification, labels));
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
    /// Cross-entropy (with the configured smoothing) and accuracy on a held-out batch, in eval
    /// mode (batch norm's running statistics, no dropout).
    fn evaluate(&mut self, batch: &Batch, ctx: &mut EvalContext<'_>) -> Result<BTreeMap<String, f64>> {
        if batch.is_empty() {
            return Err(Error::shape("classifier evaluation batch", "at least one sample", 0));
        }
        let labels = self.labels(batch, "evaluation")?;
        let (features, logits) = self.forward(&batch.inputs, Mode::Eval, ctx.rng)?;
        let classification = Classification {
            features: features.detach(),
            logits: logits.detach(),
        };
        let acc = accuracy(&classification, labels);
        let loss = cross_entropy(logits.value, labels, self.label_smoothing)?;
        Ok(BTreeMap::from([
            ("loss/cross_entropy".to_string(), loss.array() as f64),
            ("accuracy".to_string(), acc),
        ]))
    }
    /// The features (activations entering the last layer) and logits of `inputs`, in eval mode.
    fn classify(&mut self, inputs: &Matrix, ctx: &mut EvalContext<'_>) -> Result<Option<Classification>> {
        let (features, logits) = self.forward(inputs, Mode::Eval, ctx.rng)?;
        Ok(Some(Classification {
            features: features.detach(),
            logits: logits.detach(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nash_core::layers::activation::TanhConfig;
    use nash_core::layers::dropout::DropoutConfig;
    use nash_core::layers::norm::BatchNormConfig;
    use nash_core::optim::adam::AdamConfig;
    use nash_core::optim::{Optimizer, OptimizerConfig};
    use nash_core::rand::{Rng as _, SeedableRng};
    use nash_core::rand_distr::{Distribution, StandardNormal};
    use nash_core::stabilizer::StabilizerStack;
    use nash_core::tensor::{grad_to_vec, Device};

    fn info(dim: usize, classes: Option<usize>) -> DataInfo {
        DataInfo {
            sample_shape: FeatureShape::Flat(dim),
            num_classes: classes,
            value_range: (-10.0, 10.0),
        }
    }

    fn config(layers: Vec<Box<dyn LayerConfig>>, label_smoothing: f64) -> ClassifierConfig {
        ClassifierConfig {
            network: SequentialConfig { layers },
            label_smoothing,
        }
    }

    fn lin(n: usize) -> Box<dyn LayerConfig> {
        Box::new(LinearConfig::new(n))
    }

    fn build(cfg: &ClassifierConfig, data: &DataInfo, seed: u64) -> Result<Classifier> {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(seed);
        cfg.build_classifier(
            data,
            &mut BuildContext {
                device: &device,
                rng: &mut rng,
            },
        )
    }

    fn batch(device: &Device, x: Vec<f32>, dim: usize, labels: Option<Vec<usize>>) -> Batch {
        let rows = x.len() / dim;
        Batch {
            inputs: matrix_from_vec(device, x, rows, dim).unwrap(),
            shape: FeatureShape::Flat(dim),
            labels,
        }
    }

    /// Host f64 forward of `linear(H) → tanh → linear(C)` with the model's parameters `p`
    /// (`[w1 (in x H), b1, w2 (H x C), b2]`), returning (hidden, logits) per row.
    fn mlp_f64(
        p: &[Vec<f64>],
        x: &[f32],
        dim: usize,
        hidden: usize,
        classes: usize,
        tanh: bool,
    ) -> Vec<(Vec<f64>, Vec<f64>)> {
        x.chunks(dim)
            .map(|row| {
                let h: Vec<f64> = (0..hidden)
                    .map(|j| {
                        let z = p[1][j] + (0..dim).map(|i| row[i] as f64 * p[0][i * hidden + j]).sum::<f64>();
                        if tanh {
                            z.tanh()
                        } else {
                            z.max(0.0)
                        }
                    })
                    .collect();
                let o: Vec<f64> = (0..classes)
                    .map(|c| p[3][c] + (0..hidden).map(|j| h[j] * p[2][j * classes + c]).sum::<f64>())
                    .collect();
                (h, o)
            })
            .collect()
    }

    /// Reference smoothed cross-entropy in f64 (PyTorch's formula).
    fn ce_f64(logits: &[Vec<f64>], labels: &[usize], eps: f64) -> f64 {
        let mut total = 0.0;
        for (row, &y) in logits.iter().zip(labels) {
            let m = row.iter().cloned().fold(f64::MIN, f64::max);
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            let c = row.len() as f64;
            for (k, v) in row.iter().enumerate() {
                let q = eps / c + if k == y { 1.0 - eps } else { 0.0 };
                total -= q * (v - lse);
            }
        }
        total / labels.len() as f64
    }

    #[test]
    fn label_smoothing_matches_pytorch() {
        // PyTorch's formula for F.cross_entropy(x, y, label_smoothing=ε):
        //   loss = (1 − ε)·(−log p_y) + ε·mean_c(−log p_c)
        // x = [[1, 2, 3]], y = [0]: logsumexp = 3.4076059644; −log p = [2.4076059644, 1.4076059644, 0.4076059644]
        //   ε = 0   → 2.4076059644
        //   ε = 0.1 → 0.9·2.4076059644 + 0.1·1.4076059644 = 2.3076059644
        // x = [[1, 2, 3], [0.5, −1, 0.25]], y = [0, 2], ε = 0.2: the mean of the rows' losses,
        //   (2.2076059644 + 1.0107788530) / 2 = 1.6091924088
        // (in PyTorch: F.cross_entropy(torch.tensor([[1., 2, 3], [.5, -1, .25]]), torch.tensor([0, 2]),
        //  label_smoothing=0.2))
        let device = Device::default();
        let x = || {
            matrix_from_vec(&device, vec![1.0, 2.0, 3.0], 1, 3)
                .unwrap()
                .leaky_trace()
        };
        let plain = cross_entropy(x(), &[0], 0.0).unwrap().array();
        assert!((plain - 2.407_606).abs() < 1e-5, "{plain}");
        let smoothed = cross_entropy(x(), &[0], 0.1).unwrap().array();
        assert!((smoothed - 2.307_606).abs() < 1e-5, "{smoothed}");
        // A batch is the mean of its rows.
        let two = matrix_from_vec(&device, vec![1.0, 2.0, 3.0, 0.5, -1.0, 0.25], 2, 3).unwrap();
        let got = cross_entropy(two.leaky_trace(), &[0, 2], 0.2).unwrap().array() as f64;
        let want = ce_f64(&[vec![1.0, 2.0, 3.0], vec![0.5, -1.0, 0.25]], &[0, 2], 0.2);
        assert!((want - 1.609_192_408_8).abs() < 1e-9, "the f64 reference: {want}");
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        // Out-of-range labels are refused.
        let err = cross_entropy(x(), &[3], 0.0).unwrap_err().to_string();
        assert!(err.contains("0..3"), "{err}");
    }

    #[test]
    fn cross_entropy_value_and_gradient_match_f64_central_differences() {
        let (dim, hidden, classes) = (4, 3, 3);
        for eps in [0.0f32, 0.1] {
            let cfg = config(
                vec![lin(hidden), Box::new(TanhConfig::default()), lin(classes)],
                eps as f64,
            );
            let mut model = build(&cfg, &info(dim, Some(classes)), 3).unwrap();
            let mut rng = Rng::seed_from_u64(1);
            let x: Vec<f32> = (0..5 * dim).map(|_| rng.gen_range(-1.5f32..1.5)).collect();
            let labels = vec![0, 2, 1, 2, 0];
            let device = Device::default();
            let xm = matrix_from_vec(&device, x.clone(), 5, dim).unwrap();
            let (_, logits) = model.forward(&xm, Mode::Train, &mut rng).unwrap();
            let loss = cross_entropy(logits.value, &labels, eps).unwrap();
            let value = loss.array() as f64;
            let mut grads = loss.backward();
            let params: Vec<Vec<f64>> = model
                .named_params()
                .iter()
                .map(|(_, p)| p.to_vec().iter().map(|&v| v as f64).collect())
                .collect();
            let loss_at = |p: &[Vec<f64>]| {
                let out: Vec<Vec<f64>> = mlp_f64(p, &x, dim, hidden, classes, true)
                    .into_iter()
                    .map(|r| r.1)
                    .collect();
                ce_f64(&out, &labels, eps as f64)
            };
            let reference = loss_at(&params);
            assert!((value - reference).abs() < 1e-5, "loss {value} vs {reference}");
            let h = 1e-6;
            for (k, (name, p)) in model.named_params().iter().enumerate() {
                let g = grad_to_vec(&mut grads, p).unwrap();
                for (i, &gi) in g.iter().enumerate() {
                    let mut plus = params.clone();
                    plus[k][i] += h;
                    let mut minus = params.clone();
                    minus[k][i] -= h;
                    let fd = (loss_at(&plus) - loss_at(&minus)) / (2.0 * h);
                    let err = (gi as f64 - fd).abs();
                    assert!(err <= 1e-2 * fd.abs().max(1e-2), "{name}[{i}] (ε {eps}): {gi} vs {fd}");
                }
            }
        }
    }

    /// Three labelled Gaussian blobs at (0, 0), (3, 0), (0, 3), σ = 0.5.
    fn blobs(device: &Device, n: usize, rng: &mut Rng) -> Batch {
        let centers = [(0.0f32, 0.0f32), (3.0, 0.0), (0.0, 3.0)];
        let mut x = Vec::with_capacity(2 * n);
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            let k = i % 3;
            let (a, b): (f32, f32) = (StandardNormal.sample(rng), StandardNormal.sample(rng));
            x.extend([centers[k].0 + 0.5 * a, centers[k].1 + 0.5 * b]);
            labels.push(k);
        }
        batch(device, x, 2, Some(labels))
    }

    #[test]
    fn learns_three_gaussian_modes_to_over_95_percent() {
        let device = Device::default();
        let cfg = config(vec![lin(16), Box::new(ReluConfig::default()), lin(3)], 0.0);
        let mut model = build(&cfg, &info(2, Some(3)), 0).unwrap();
        let mut rng = Rng::seed_from_u64(7);
        let mut optimizers: BTreeMap<String, Box<dyn Optimizer>> = BTreeMap::from([(
            "model".to_string(),
            AdamConfig {
                lr: 1e-2,
                ..Default::default()
            }
            .build()
            .unwrap(),
        )]);
        let mut stabilizers = StabilizerStack::default();
        let mut last = StepReport::default();
        for step in 0..300 {
            let b = blobs(&device, 96, &mut rng);
            let mut ctx = TrainContext {
                step,
                device: &device,
                rng: &mut rng,
                optimizers: &mut optimizers,
                stabilizers: &mut stabilizers,
            };
            last = model.train_step(&b, &mut ctx).unwrap();
        }
        assert!(last.diagnostics["grad_norm/model"].is_finite());
        assert!(last.diagnostics["accuracy"] > 0.9, "{last:?}");
        let test = blobs(&device, 600, &mut rng);
        let eval = model
            .evaluate(
                &test,
                &mut EvalContext {
                    device: &device,
                    rng: &mut rng,
                },
            )
            .unwrap();
        assert!(eval["accuracy"] > 0.95, "{eval:?}");
        assert!(eval["loss/cross_entropy"] < 0.2, "{eval:?}");
    }

    #[test]
    fn classify_returns_the_activations_entering_the_last_layer() {
        let (dim, hidden, classes) = (3, 5, 4);
        let cfg = config(vec![lin(hidden), Box::new(ReluConfig::default()), lin(classes)], 0.0);
        let mut model = build(&cfg, &info(dim, Some(classes)), 11).unwrap();
        assert_eq!(model.feature_width(), hidden);
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(2);
        let x: Vec<f32> = (0..6 * dim).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
        let xm = matrix_from_vec(&device, x.clone(), 6, dim).unwrap();
        let out = model
            .classify(
                &xm,
                &mut EvalContext {
                    device: &device,
                    rng: &mut rng,
                },
            )
            .unwrap()
            .expect("a classifier classifies");
        assert_eq!(*out.features.shape(), (6, hidden));
        assert_eq!(*out.logits.shape(), (6, classes));
        let params: Vec<Vec<f64>> = model
            .named_params()
            .iter()
            .map(|(_, p)| p.to_vec().iter().map(|&v| v as f64).collect())
            .collect();
        let reference = mlp_f64(&params, &x, dim, hidden, classes, false);
        let (f, l) = (out.features.as_vec(), out.logits.as_vec());
        for (r, (h, o)) in reference.iter().enumerate() {
            for j in 0..hidden {
                assert!((f[r * hidden + j] as f64 - h[j]).abs() < 1e-5, "feature {r},{j}");
            }
            for c in 0..classes {
                assert!((l[r * classes + c] as f64 - o[c]).abs() < 1e-5, "logit {r},{c}");
            }
        }
        assert!(model
            .sample(
                4,
                &mut EvalContext {
                    device: &device,
                    rng: &mut rng
                }
            )
            .unwrap()
            .is_none());
    }

    #[test]
    fn eval_mode_uses_running_statistics_and_no_dropout() {
        let cfg = config(
            vec![
                lin(8),
                Box::new(BatchNormConfig::default()),
                Box::new(ReluConfig::default()),
                Box::new(DropoutConfig { p: 0.5 }),
                lin(2),
            ],
            0.0,
        );
        let mut model = build(&cfg, &info(3, Some(2)), 5).unwrap();
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(9);
        let x: Vec<f32> = (0..8 * 3).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let xm = matrix_from_vec(&device, x, 8, 3).unwrap();
        let classify = |model: &mut Classifier, rng: &mut Rng| {
            let c = model
                .classify(&xm, &mut EvalContext { device: &device, rng })
                .unwrap()
                .unwrap();
            (c.features.as_vec(), c.logits.as_vec())
        };
        // Eval mode is deterministic (no dropout mask drawn) and does not touch the running stats.
        let first = classify(&mut model, &mut rng);
        let second = classify(&mut model, &mut rng);
        assert_eq!(first, second);
        // The running statistics are part of the parameters (and so of the saved weights).
        let names: Vec<String> = model.named_params().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"model.network.1.running_mean".to_string()), "{names:?}");
        // Train mode differs (batch statistics and dropout).
        let (_, train_logits) = model.forward(&xm, Mode::Train, &mut rng).unwrap();
        assert_ne!(train_logits.detach().as_vec(), first.1);
    }

    #[test]
    fn config_errors_name_the_path_and_the_fix() {
        let cfg = config(vec![lin(4), Box::new(ReluConfig::default()), lin(5)], 0.0);
        let err = build(&cfg, &info(2, Some(3)), 0).err().unwrap().to_string();
        assert!(
            err.contains("model.network.layers[2].out_features") && err.contains("out_features = 3"),
            "{err}"
        );
        let err = build(&cfg, &info(2, None), 0).err().unwrap().to_string();
        assert!(err.contains("labelled data"), "{err}");
        let err = build(&config(vec![], 0.0), &info(2, Some(3)), 0)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("model.network.layers") && err.contains("at least one layer"),
            "{err}"
        );
        let err = build(&config(vec![lin(3)], 1.0), &info(2, Some(3)), 0)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("model.label_smoothing"), "{err}");
        // A batch without labels names the data source.
        let mut model = build(&config(vec![lin(3)], 0.0), &info(2, Some(3)), 0).unwrap();
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        let unlabelled = batch(&device, vec![0.0; 4], 2, None);
        let err = model
            .evaluate(
                &unlabelled,
                &mut EvalContext {
                    device: &device,
                    rng: &mut rng,
                },
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("data") && err.contains("no labels"), "{err}");
        // The default config is the documented MLP and deserializes from its tag.
        let value: Box<dyn ModelConfig> = nash_core::serde_json::from_str(
            r#"{"type": "classifier", "network": {"layers": [{"type": "linear", "out_features": 3}]}}"#,
        )
        .unwrap();
        assert!(format!("{value:?}").contains("label_smoothing: 0.0"));
    }
}
