//! Class-conditional GANs on labelled data: `conditional_gan` (Mirza & Osindero 2014) and
//! `ac_gan` (Odena, Olah & Shlens 2017, the auxiliary classifier GAN).
//!
//! Both generators are `G(z, y)`: the class label `y`, one-hot or through a learned embedding
//! ([`LabelEncoding`]), is concatenated to the latent code. The conditional GAN's discriminator is
//! `D(x, y)` on the sample concatenated with the label's encoding (a flat MLP). The AC-GAN's
//! discriminator sees the sample only; its trunk feeds two heads, an adversarial logit and class
//! logits, and both networks also minimize the cross-entropy of the class head (on real samples
//! with their labels and fakes with the labels they were generated for, for D; on fakes, for G).
//!
//! Fakes in a discriminator or generator update are generated for labels drawn uniformly from the
//! classes. [`Model::sample`] cycles through the classes (sample `i` has class `i mod classes`),
//! and [`ConditionalGan::sample_class`] generates samples of one class.
//!
//! Stabilizers: input transforms apply to the samples before the labels are attached and must
//! keep their shape and batch size (packing, which merges samples, is refused with the reason).
//! At [`LossSite::Discriminator`](nash_core::stabilizer::LossSite) the critic is the network that
//! maps an input to the adversarial score: for `conditional_gan` the discriminator on
//! `[sample, label encoding]` (so a gradient penalty measures the gradient with respect to both;
//! the one-hot part is a constant input and an embedding is not penalized), for `ac_gan` the trunk
//! plus the adversarial head on the sample.

use std::collections::BTreeMap;

use nash_core::data::{Batch, DataInfo};
use nash_core::dfdx::prelude::*;
use nash_core::error::{Error, Result};
use nash_core::layers::activation::LeakyReluConfig;
use nash_core::layers::embedding::EmbeddingConfig;
use nash_core::layers::linear::LinearConfig;
use nash_core::layers::{
    reestimate_statistics, BuildContext, ForwardContext, Layer, LayerConfig, Mode, Sequential, SequentialConfig,
};
use nash_core::loss::{AdversarialObjective, AdversarialObjectiveConfig, CrossEntropy, Loss};
use nash_core::model::{EvalContext, Model, ModelConfig, StepReport, TrainContext};
use nash_core::rand::Rng as _;
use nash_core::tensor::{
    check_finite, Activation, Device, FeatureShape, Matrix, Param, Parameterized, Rng, Scalar, Tape,
};
use serde::{Deserialize, Serialize};

use crate::mlp_gan::{Latent, MlpGanConfig};
use crate::objective::NonSaturatingConfig;
use crate::step::{
    describe_stack, discriminator_loss, generator_loss_terms, keep_best_fakes, mean_sigmoid, prefixed,
    refuse_unrolling, schedule_discriminator_steps, transform_fake, transform_inputs, CriticSite, DiscriminatorStep,
};

/// How a class label is fed to a network.
///
/// In pipeline files: `label_encoding = "one_hot"` or `label_encoding = { embedding = 16 }`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelEncoding {
    /// A one-hot vector of the class count.
    #[default]
    OneHot,
    /// A learned embedding table of this width (one per network, N(0, 1) initialized).
    Embedding(usize),
}

/// A built [`LabelEncoding`].
enum LabelEncoder {
    OneHot { classes: usize },
    Table { layer: Box<dyn Layer>, width: usize },
}

impl LabelEncoder {
    fn build(encoding: LabelEncoding, classes: usize, ctx: &mut BuildContext<'_>, path: &str) -> Result<Self> {
        Ok(match encoding {
            LabelEncoding::OneHot => LabelEncoder::OneHot { classes },
            LabelEncoding::Embedding(width) => {
                if width == 0 {
                    return Err(Error::config(
                        format!("{path}.embedding"),
                        "the embedding width must be at least 1",
                    ));
                }
                let layer = EmbeddingConfig::new(classes, width)
                    .build(FeatureShape::Flat(1), ctx)
                    .map_err(|e| Error::config(path, e.to_string()))?;
                LabelEncoder::Table { layer, width }
            }
        })
    }
    fn width(&self) -> usize {
        match self {
            LabelEncoder::OneHot { classes } => *classes,
            LabelEncoder::Table { width, .. } => *width,
        }
    }
    fn describe(&self) -> String {
        match self {
            LabelEncoder::OneHot { classes } => format!("one-hot ({classes})"),
            LabelEncoder::Table { layer, .. } => layer.describe(),
        }
    }
    /// The `[labels.len(), width]` encodings, on a tape (an embedding's gradient reaches its table).
    fn encode(&mut self, labels: &[usize], device: &Device, ctx: &mut ForwardContext<'_>) -> Result<Matrix<Tape>> {
        match self {
            LabelEncoder::OneHot { classes } => {
                let k = *classes;
                let mut values = vec![0.0f32; labels.len() * k];
                for (row, &y) in labels.iter().enumerate() {
                    values[row * k + y] = 1.0;
                }
                Ok(device.tensor_from_vec(values, (labels.len(), k)).leaky_trace())
            }
            LabelEncoder::Table { layer, .. } => {
                let idx = label_matrix(labels, device);
                Ok(layer
                    .forward(Activation::input(&idx, FeatureShape::Flat(1))?, ctx)?
                    .value)
            }
        }
    }
    fn params(&self) -> Vec<(String, &Param)> {
        match self {
            LabelEncoder::OneHot { .. } => Vec::new(),
            LabelEncoder::Table { layer, .. } => layer.named_params(),
        }
    }
    fn params_mut(&mut self) -> Vec<(String, &mut Param)> {
        match self {
            LabelEncoder::OneHot { .. } => Vec::new(),
            LabelEncoder::Table { layer, .. } => layer.named_params_mut(),
        }
    }
}

/// Labels as a `[n, 1]` matrix of class indices (what cross-entropy and embeddings take).
fn label_matrix(labels: &[usize], device: &Device) -> Matrix {
    device.tensor_from_vec(labels.iter().map(|&y| y as f32).collect(), (labels.len(), 1))
}

/// `[a, b]` along the features.
fn concat(a: Matrix<Tape>, b: Matrix<Tape>) -> Result<Matrix<Tape>> {
    Ok((a, b).try_concat_along(Axis::<1>)?)
}

/// Fraction of rows whose largest logit is at the row's label.
pub fn accuracy(logits: &Matrix, labels: &[usize]) -> f64 {
    let (rows, cols) = *logits.shape();
    if rows == 0 || cols == 0 {
        return 0.0;
    }
    let v = logits.as_vec();
    let hits = v
        .chunks(cols)
        .zip(labels)
        .filter(|(row, &y)| {
            let best = row.iter().enumerate().fold(
                (0, f32::NEG_INFINITY),
                |acc, (i, &x)| if x > acc.1 { (i, x) } else { acc },
            );
            best.0 == y
        })
        .count();
    hits as f64 / rows as f64
}

fn default_latent_dim() -> usize {
    100
}
fn default_steps() -> usize {
    1
}
fn default_objective() -> Box<dyn AdversarialObjectiveConfig> {
    Box::new(NonSaturatingConfig::default())
}
fn default_classifier_weight() -> f32 {
    1.0
}

/// Config of a conditional GAN, `type = "conditional_gan"` in pipeline files. The defaults are the
/// reference MLP GAN with the label's encoding concatenated to the latent code and to the sample:
/// generator `[latent_dim + label] -> 128-256-512 -> sample` (LeakyReLU(0.2), tanh output),
/// discriminator `[sample + label] -> 256-512 -> 1` (LeakyReLU(0.2), raw logit). Needs labelled data.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConditionalGanConfig {
    /// Size of the latent code.
    #[serde(default = "default_latent_dim")]
    pub latent_dim: usize,
    /// Distribution of the latent code.
    #[serde(default)]
    pub latent: Latent,
    /// How labels are encoded for both networks.
    #[serde(default)]
    pub label_encoding: LabelEncoding,
    /// The generator, from `[latent_dim + label width]` to one data sample.
    #[serde(default = "MlpGanConfig::reference_generator")]
    pub generator: SequentialConfig,
    /// The discriminator, from `[sample features + label width]` to one raw score.
    #[serde(default = "MlpGanConfig::reference_discriminator")]
    pub discriminator: SequentialConfig,
    /// The adversarial objective.
    #[serde(default = "default_objective")]
    pub objective: Box<dyn AdversarialObjectiveConfig>,
    /// Discriminator updates per generator update.
    #[serde(default = "default_steps")]
    pub discriminator_steps: usize,
}

impl Default for ConditionalGanConfig {
    fn default() -> Self {
        ConditionalGanConfig {
            latent_dim: default_latent_dim(),
            latent: Latent::Normal,
            label_encoding: LabelEncoding::OneHot,
            generator: MlpGanConfig::reference_generator(),
            discriminator: MlpGanConfig::reference_discriminator(),
            objective: default_objective(),
            discriminator_steps: 1,
        }
    }
}

/// The reference AC-GAN trunk for flat data: `linear 256 -> LeakyReLU(0.2) -> linear 512 -> LeakyReLU(0.2)`.
pub fn reference_trunk() -> SequentialConfig {
    let mut layers: Vec<Box<dyn LayerConfig>> = Vec::new();
    for h in [256, 512] {
        layers.push(Box::new(LinearConfig::new(h)));
        layers.push(Box::new(LeakyReluConfig::new(0.2)));
    }
    SequentialConfig::new(layers)
}

/// Config of an AC-GAN, `type = "ac_gan"` in pipeline files: generator as [`ConditionalGanConfig`];
/// the `discriminator` is the shared trunk (from one sample to features), to which the model adds a
/// linear adversarial head (1 logit) and a linear class head (one logit per class). Needs labelled
/// data.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcGanConfig {
    /// Size of the latent code.
    #[serde(default = "default_latent_dim")]
    pub latent_dim: usize,
    /// Distribution of the latent code.
    #[serde(default)]
    pub latent: Latent,
    /// How labels are encoded for the generator.
    #[serde(default)]
    pub label_encoding: LabelEncoding,
    /// The generator, from `[latent_dim + label width]` to one data sample.
    #[serde(default = "MlpGanConfig::reference_generator")]
    pub generator: SequentialConfig,
    /// The discriminator's shared trunk, from one sample to features (no output layer).
    #[serde(default = "reference_trunk")]
    pub discriminator: SequentialConfig,
    /// The adversarial objective.
    #[serde(default = "default_objective")]
    pub objective: Box<dyn AdversarialObjectiveConfig>,
    /// Discriminator updates per generator update.
    #[serde(default = "default_steps")]
    pub discriminator_steps: usize,
    /// Weight of the auxiliary classification losses in both networks' losses.
    #[serde(default = "default_classifier_weight")]
    pub classifier_weight: f32,
}

impl Default for AcGanConfig {
    fn default() -> Self {
        AcGanConfig {
            latent_dim: default_latent_dim(),
            latent: Latent::Normal,
            label_encoding: LabelEncoding::OneHot,
            generator: MlpGanConfig::reference_generator(),
            discriminator: reference_trunk(),
            objective: default_objective(),
            discriminator_steps: 1,
            classifier_weight: 1.0,
        }
    }
}

/// The number of classes of `data`, or the error every conditional model gives without labels.
fn classes_of(kind: &str, data: &DataInfo) -> Result<usize> {
    match data.num_classes {
        Some(k) if k >= 1 => Ok(k),
        _ => Err(Error::config(
            "data",
            format!(
                "conditional model without labels: `{kind}` needs a data source with class labels (ring, grid, \
                 gaussian_mixture, idx, an image folder), but this data has none; use an unconditional model \
                 (mlp_gan, dcgan) or a labelled data source"
            ),
        )),
    }
}

/// Fields shared by both configs.
struct Common<'a> {
    kind: &'static str,
    latent_dim: usize,
    latent: Latent,
    label_encoding: LabelEncoding,
    generator: &'a SequentialConfig,
    discriminator: &'a SequentialConfig,
    objective: &'a dyn AdversarialObjectiveConfig,
    discriminator_steps: usize,
}

fn build_model(
    c: Common<'_>,
    classifier_weight: Option<f32>,
    data: &DataInfo,
    ctx: &mut BuildContext<'_>,
) -> Result<ConditionalGan> {
    let classes = classes_of(c.kind, data)?;
    if c.latent_dim == 0 {
        return Err(Error::config("model.latent_dim", "must be at least 1"));
    }
    c.latent.check("model.latent")?;
    if c.discriminator_steps == 0 {
        return Err(Error::config(
            "model.discriminator_steps",
            "must be at least 1 (discriminator updates per generator update)",
        ));
    }
    let data_shape = data.sample_shape;
    let g_labels = LabelEncoder::build(c.label_encoding, classes, ctx, "model.label_encoding")?;
    let generator = c.generator.build(
        FeatureShape::Flat(c.latent_dim + g_labels.width()),
        ctx,
        "model.generator",
    )?;
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
    let (discriminator, d_labels, classifier) = match classifier_weight {
        None => {
            let d_labels = LabelEncoder::build(c.label_encoding, classes, ctx, "model.label_encoding")?;
            let d_in = FeatureShape::Flat(data_shape.numel() + d_labels.width());
            let d = c.discriminator.build(d_in, ctx, "model.discriminator")?;
            if d.output_shape().numel() != 1 {
                return Err(Error::config(
                    "model.discriminator",
                    format!(
                        "the discriminator must output one score per sample, but produces {}; make its last \
                         linear layer's out_features 1 (and leave its output as a raw logit)",
                        d.output_shape()
                    ),
                ));
            }
            (d, Some(d_labels), None)
        }
        Some(weight) => {
            if !(weight.is_finite() && weight >= 0.0) {
                return Err(Error::config(
                    "model.classifier_weight",
                    format!("must be a finite number >= 0, got {weight}"),
                ));
            }
            let trunk = c.discriminator.build(data_shape, ctx, "model.discriminator")?;
            let features = trunk.output_shape();
            let adv = LinearConfig::new(1).build(features, ctx)?;
            let mut layers: Vec<Box<dyn Layer>> = vec![Box::new(trunk)];
            layers.push(adv);
            let d = Sequential::new(layers, data_shape)?;
            let head = SequentialConfig::new(vec![Box::new(LinearConfig::new(classes))]).build(
                features,
                ctx,
                "model.classifier",
            )?;
            (d, None, Some(head))
        }
    };
    Ok(ConditionalGan {
        kind: c.kind,
        generator,
        g_labels,
        discriminator,
        d_labels,
        classifier,
        classifier_weight: classifier_weight.unwrap_or(0.0),
        objective: c.objective.build()?,
        latent_dim: c.latent_dim,
        latent: c.latent,
        discriminator_steps: c.discriminator_steps,
        data_shape,
        classes,
    })
}

impl ConditionalGanConfig {
    /// Builds the model for `data` (the typed form of [`ModelConfig::build`]).
    pub fn build_gan(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<ConditionalGan> {
        let common = Common {
            kind: "conditional_gan",
            latent_dim: self.latent_dim,
            latent: self.latent,
            label_encoding: self.label_encoding,
            generator: &self.generator,
            discriminator: &self.discriminator,
            objective: self.objective.as_ref(),
            discriminator_steps: self.discriminator_steps,
        };
        build_model(common, None, data, ctx)
    }
}

impl AcGanConfig {
    /// Builds the model for `data` (the typed form of [`ModelConfig::build`]).
    pub fn build_gan(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<ConditionalGan> {
        let common = Common {
            kind: "ac_gan",
            latent_dim: self.latent_dim,
            latent: self.latent,
            label_encoding: self.label_encoding,
            generator: &self.generator,
            discriminator: &self.discriminator,
            objective: self.objective.as_ref(),
            discriminator_steps: self.discriminator_steps,
        };
        build_model(common, Some(self.classifier_weight), data, ctx)
    }
}

#[typetag::serde(name = "conditional_gan")]
impl ModelConfig for ConditionalGanConfig {
    fn build(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<Box<dyn Model>> {
        Ok(Box::new(self.build_gan(data, ctx)?))
    }
}

#[typetag::serde(name = "ac_gan")]
impl ModelConfig for AcGanConfig {
    fn build(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<Box<dyn Model>> {
        Ok(Box::new(self.build_gan(data, ctx)?))
    }
}

/// A class-conditional GAN: `conditional_gan` or `ac_gan` (see the module docs). Parameter groups
/// `discriminator` and `generator`; names `generator.<i>.<param>`, `generator.labels.weight` (an
/// embedding), `discriminator.<i>.<param>`, `discriminator.labels.weight`,
/// `discriminator.classifier.<i>.<param>` (AC-GAN's class head).
pub struct ConditionalGan {
    kind: &'static str,
    generator: Sequential,
    g_labels: LabelEncoder,
    /// `conditional_gan`: on `[sample, label]`; `ac_gan`: `[trunk, adversarial head]` on the sample.
    discriminator: Sequential,
    d_labels: Option<LabelEncoder>,
    classifier: Option<Sequential>,
    classifier_weight: f32,
    objective: Box<dyn AdversarialObjective>,
    latent_dim: usize,
    latent: Latent,
    discriminator_steps: usize,
    data_shape: FeatureShape,
    classes: usize,
}

/// The discriminator's outputs on one batch.
struct Heads {
    adversarial: Matrix<Tape>,
    classes: Option<Matrix<Tape>>,
}

/// What an AC-GAN discriminator update measured besides the adversarial terms.
struct Auxiliary {
    accuracy_real: f64,
    accuracy_fake: f64,
}

impl ConditionalGan {
    /// The number of classes.
    pub fn num_classes(&self) -> usize {
        self.classes
    }
    /// The model's type tag (`conditional_gan` or `ac_gan`).
    pub fn kind(&self) -> &str {
        self.kind
    }
    /// Draws `n` latent codes.
    pub fn sample_latent(&self, n: usize, device: &Device, rng: &mut Rng) -> Matrix {
        self.latent.sample(n, self.latent_dim, device, rng)
    }
    /// `n` labels drawn uniformly from the classes.
    fn draw_labels(&self, n: usize, rng: &mut Rng) -> Vec<usize> {
        (0..n).map(|_| rng.gen_range(0..self.classes)).collect()
    }
    /// The labels of a training or evaluation batch, checked against the class count.
    fn batch_labels<'b>(&self, batch: &'b Batch) -> Result<&'b [usize]> {
        let labels = batch.labels.as_deref().ok_or_else(|| {
            Error::unsupported(
                format!("{} on a batch without labels", self.kind),
                "conditional model without labels: every batch must carry class labels",
            )
        })?;
        if labels.len() != batch.len() {
            return Err(Error::shape(
                format!("{} batch labels", self.kind),
                batch.len(),
                labels.len(),
            ));
        }
        self.check_labels(labels)?;
        Ok(labels)
    }
    fn check_labels(&self, labels: &[usize]) -> Result<()> {
        if let Some(&y) = labels.iter().find(|&&y| y >= self.classes) {
            return Err(Error::shape(
                format!("{} labels", self.kind),
                format!("class indices in 0..{}", self.classes),
                y,
            ));
        }
        Ok(())
    }
    /// Runs the generator on latent codes `z` (`[n, latent_dim]`) for `labels` in `mode`.
    pub fn generate(&mut self, z: &Matrix, labels: &[usize], mode: Mode, rng: &mut Rng) -> Result<Activation> {
        let (n, dim) = *z.shape();
        if dim != self.latent_dim || n != labels.len() {
            return Err(Error::shape(
                format!("{} generator input", self.kind),
                format!(
                    "[{}, {}] latent codes for {} labels",
                    labels.len(),
                    self.latent_dim,
                    labels.len()
                ),
                format!("[{n}, {dim}]"),
            ));
        }
        self.check_labels(labels)?;
        let device = z.device().clone();
        let mut fwd = ForwardContext { mode, rng };
        let y = self.g_labels.encode(labels, &device, &mut fwd)?;
        let input = concat(z.leaky_trace(), y)?;
        let width = self.latent_dim + self.g_labels.width();
        let out = self
            .generator
            .forward(Activation::new(input, FeatureShape::Flat(width))?, &mut fwd)?;
        Activation::new(out.value, self.data_shape)
    }
    /// `n` samples of class `class`, in eval mode.
    pub fn sample_class(&mut self, class: usize, n: usize, ctx: &mut EvalContext<'_>) -> Result<Matrix> {
        if class >= self.classes {
            return Err(Error::config(
                "class",
                format!("must be a class index in 0..{}, got {class}", self.classes),
            ));
        }
        let z = self.sample_latent(n, ctx.device, ctx.rng);
        Ok(self.generate(&z, &vec![class; n], Mode::Eval, ctx.rng)?.detach())
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

    /// Refuses stabilizer input transforms that change the shape or merge samples: the labels
    /// are attached per sample afterwards.
    fn check_transformed(&self, x: &Activation, n: usize) -> Result<()> {
        if x.shape != self.data_shape || x.batch_size() != n {
            return Err(Error::unsupported(
                format!(
                    "{}: a stabilizer turned the discriminator input [{n} x {}] into [{} x {}]",
                    self.kind,
                    self.data_shape,
                    x.batch_size(),
                    x.shape
                ),
                "conditional models attach one label to each sample, so input transforms must keep the batch \
                 size and the sample shape (packing does not apply)",
            ));
        }
        Ok(())
    }

    /// The discriminator's outputs on samples `x` with `labels`.
    fn discriminate(
        &mut self,
        x: Activation,
        labels: &[usize],
        device: &Device,
        fwd: &mut ForwardContext<'_>,
    ) -> Result<Heads> {
        if let Some(enc) = &mut self.d_labels {
            let y = enc.encode(labels, device, fwd)?;
            let width = self.data_shape.numel() + enc.width();
            let input = Activation::new(concat(x.value, y)?, FeatureShape::Flat(width))?;
            let adversarial = self.discriminator.forward(input, fwd)?.value;
            return Ok(Heads {
                adversarial,
                classes: None,
            });
        }
        match &mut self.classifier {
            Some(head) => {
                // [trunk, adversarial head]: run the trunk, then both heads on its features.
                let layers = self.discriminator.layers_mut();
                let (trunk, adv) = layers.split_at_mut(1);
                let h = trunk[0].forward(x, fwd)?;
                let classes = head.forward(h.reuse(), fwd)?.value;
                let adversarial = adv[0].forward(h, fwd)?.value;
                Ok(Heads {
                    adversarial,
                    classes: Some(classes),
                })
            }
            None => Ok(Heads {
                adversarial: self.discriminator.forward(x, fwd)?.value,
                classes: None,
            }),
        }
    }

    /// What stabilizers see as the critic's input: the sample, with the label encoding attached
    /// for `conditional_gan`.
    fn critic_input(&mut self, x: &Matrix, labels: &[usize], device: &Device, rng: &mut Rng) -> Result<Matrix> {
        match &mut self.d_labels {
            Some(enc) => {
                let mut fwd = ForwardContext { mode: Mode::Train, rng };
                let y = enc.encode(labels, device, &mut fwd)?;
                Ok(concat(x.leaky_trace(), y)?.retaped::<NoneTape>())
            }
            None => Ok(x.clone()),
        }
    }

    fn critic_shape(&self) -> FeatureShape {
        match &self.d_labels {
            Some(enc) => FeatureShape::Flat(self.data_shape.numel() + enc.width()),
            None => self.data_shape,
        }
    }

    fn discriminator_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        discriminator_params(&mut self.discriminator, &mut self.d_labels, &mut self.classifier)
    }

    fn generator_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        generator_params(&mut self.generator, &mut self.g_labels)
    }

    /// One discriminator update on the batch (with its labels) and fresh fakes for uniformly
    /// drawn labels; the stabilizer hooks are called as in `mlp_gan`. Only the discriminator's
    /// parameters (with its label embedding and class head) are updated.
    fn discriminator_step(
        &mut self,
        batch: &Batch,
        ctx: &mut TrainContext<'_>,
    ) -> Result<(DiscriminatorStep, Option<Auxiliary>)> {
        let n = batch.len();
        let y_real = self.batch_labels(batch)?.to_vec();
        let y_fake = self.draw_labels(n, ctx.rng);
        let z = self.sample_latent(n, ctx.device, ctx.rng);
        let fake = self.generate(&z, &y_fake, Mode::Train, ctx.rng)?.detach();
        let real_in = self.data_input(&batch.inputs)?;
        let fake_in = Activation::data(&fake, self.data_shape)?;
        let (real_in, fake_in) = transform_inputs(ctx, real_in, fake_in)?;
        self.check_transformed(&real_in, n)?;
        self.check_transformed(&fake_in, n)?;
        let real_seen = self.critic_input(&real_in.detach(), &y_real, ctx.device, ctx.rng)?;
        let fake_seen = self.critic_input(&fake_in.detach(), &y_fake, ctx.device, ctx.rng)?;
        let device = ctx.device.clone();
        let mut fwd = ForwardContext {
            mode: Mode::Train,
            rng: ctx.rng,
        };
        let real = self.discriminate(real_in, &y_real, &device, &mut fwd)?;
        let fake = self.discriminate(fake_in, &y_fake, &device, &mut fwd)?;
        let real_scores = real.adversarial.retaped::<NoneTape>();
        let real_mean = mean_sigmoid(&real_scores.as_vec());
        let fake_mean = mean_sigmoid(&fake.adversarial.retaped::<NoneTape>().as_vec());
        let mut aux_loss = None;
        if let (Some(cr), Some(cf)) = (real.classes, fake.classes) {
            let accuracy_real = accuracy(&cr.retaped::<NoneTape>(), &y_real);
            let accuracy_fake = accuracy(&cf.retaped::<NoneTape>(), &y_fake);
            let ce = CrossEntropy.compute(cr, &label_matrix(&y_real, &device))?
                + CrossEntropy.compute(cf, &label_matrix(&y_fake, &device))?;
            aux_loss = Some((
                ce,
                Auxiliary {
                    accuracy_real,
                    accuracy_fake,
                },
            ));
        }
        let shape = self.critic_shape();
        let d = discriminator_loss(
            self.objective.as_ref(),
            real.adversarial,
            fake.adversarial,
            CriticSite {
                critic: &mut self.discriminator,
                real: &real_seen,
                fake: &fake_seen,
                shape,
            },
            ctx,
        )?;
        let mut loss = d.loss;
        let mut extras = d.extras;
        let mut aux = None;
        if let Some((ce, measured)) = aux_loss {
            let key = "loss/discriminator/classifier";
            extras.push((key.to_string(), check_finite(key, ce.array())? as f64));
            loss = loss + ce * self.classifier_weight;
            aux = Some(measured);
        }
        let grads = loss.backward();
        let mut params = self.discriminator_params_mut();
        let grad_norm = ctx.apply_gradients("discriminator", &mut params, grads)?;
        Ok((
            DiscriminatorStep {
                loss: d.objective,
                real_mean,
                fake_mean,
                grad_norm,
                extras,
                real_scores,
                real_sign: d.real_sign,
                halves: d.halves,
            },
            aux,
        ))
    }

    /// The discriminator's adversarial outputs on the batch's real samples (with their labels) in
    /// eval mode, without tape: the real scores for the generator's loss when the schedule skipped
    /// every discriminator update of the step.
    fn real_scores(&mut self, batch: &Batch, ctx: &mut TrainContext<'_>) -> Result<Matrix> {
        let y_real = self.batch_labels(batch)?.to_vec();
        let real_in = self.data_input(&batch.inputs)?;
        let device = ctx.device.clone();
        let heads = self.discriminate(
            real_in,
            &y_real,
            &device,
            &mut ForwardContext {
                mode: Mode::Eval,
                rng: ctx.rng,
            },
        )?;
        Ok(heads.adversarial.retaped::<NoneTape>())
    }

    /// One generator update for `n` uniformly drawn labels; only the generator's parameters
    /// (with its label embedding) are updated.
    fn generator_step(
        &mut self,
        n: usize,
        real_scores: &Matrix,
        ctx: &mut TrainContext<'_>,
        report: &mut StepReport,
    ) -> Result<()> {
        let labels = self.draw_labels(n, ctx.rng);
        let z = self.sample_latent(n, ctx.device, ctx.rng);
        let fake = self.generate(&z, &labels, Mode::Train, ctx.rng)?;
        let fake_in = transform_fake(ctx, fake)?;
        self.check_transformed(&fake_in, n)?;
        let device = ctx.device.clone();
        let heads = self.discriminate(
            fake_in,
            &labels,
            &device,
            &mut ForwardContext {
                mode: Mode::Train,
                rng: ctx.rng,
            },
        )?;
        let kept = keep_best_fakes(heads.adversarial, ctx, report)?;
        let mut loss: Scalar = self.objective.generator_loss(kept, Some(real_scores))?;
        report.loss("loss/generator", check_finite("loss/generator", loss.array())? as f64);
        if let Some(classes) = heads.classes {
            let ce = CrossEntropy.compute(classes, &label_matrix(&labels, &device))?;
            let key = "loss/generator/classifier";
            report.loss(key, check_finite(key, ce.array())? as f64);
            loss = loss + ce * self.classifier_weight;
        }
        let loss = generator_loss_terms(loss, ctx, report)?;
        let grads = loss.backward();
        let mut params = self.generator_params_mut();
        let norm = ctx.apply_gradients("generator", &mut params, grads)?;
        report.diagnostic("grad_norm/generator", norm);
        Ok(())
    }
}

/// The `discriminator` group: the network, its label embedding and the class head.
fn discriminator_params<'a>(
    discriminator: &'a mut Sequential,
    labels: &'a mut Option<LabelEncoder>,
    classifier: &'a mut Option<Sequential>,
) -> Vec<(String, &'a mut Param)> {
    let mut all = prefixed(discriminator.named_params_mut(), "discriminator");
    if let Some(enc) = labels {
        all.extend(prefixed(enc.params_mut(), "discriminator.labels"));
    }
    if let Some(head) = classifier {
        all.extend(prefixed(head.named_params_mut(), "discriminator.classifier"));
    }
    all
}

/// The `generator` group: the network and its label embedding.
fn generator_params<'a>(generator: &'a mut Sequential, labels: &'a mut LabelEncoder) -> Vec<(String, &'a mut Param)> {
    let mut all = prefixed(generator.named_params_mut(), "generator");
    all.extend(prefixed(labels.params_mut(), "generator.labels"));
    all
}

impl Parameterized for ConditionalGan {
    fn named_params(&self) -> Vec<(String, &Param)> {
        let mut all = prefixed(self.discriminator.named_params(), "discriminator");
        if let Some(enc) = &self.d_labels {
            all.extend(prefixed(enc.params(), "discriminator.labels"));
        }
        if let Some(head) = &self.classifier {
            all.extend(prefixed(head.named_params(), "discriminator.classifier"));
        }
        all.extend(prefixed(self.generator.named_params(), "generator"));
        all.extend(prefixed(self.g_labels.params(), "generator.labels"));
        all
    }
    fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        let mut all = discriminator_params(&mut self.discriminator, &mut self.d_labels, &mut self.classifier);
        all.extend(generator_params(&mut self.generator, &mut self.g_labels));
        all
    }
}

impl Model for ConditionalGan {
    fn family(&self) -> &str {
        "gan"
    }
    fn describe(&self) -> String {
        let mut text = format!(
            "{}: latent {} ({:?}), {} classes, labels {}, objective {}, {} discriminator step(s) per generator \
             step, data {}\n  generator {} -> {}:\n{}\n  discriminator {} -> {}:\n{}",
            self.kind,
            self.latent_dim,
            self.latent,
            self.classes,
            self.g_labels.describe(),
            self.objective.name(),
            self.discriminator_steps,
            self.data_shape,
            self.generator.input_shape(),
            self.generator.output_shape(),
            describe_stack(&self.generator),
            self.discriminator.input_shape(),
            self.discriminator.output_shape(),
            describe_stack(&self.discriminator),
        );
        if let Some(head) = &self.classifier {
            text.push_str(&format!(
                "\n  auxiliary classifier (weight {}) {} -> {}:\n{}",
                self.classifier_weight,
                head.input_shape(),
                head.output_shape(),
                describe_stack(head)
            ));
        }
        text
    }
    fn param_groups(&self) -> Vec<String> {
        vec!["discriminator".into(), "generator".into()]
    }
    /// `discriminator_steps` discriminator updates, then one generator update. AC-GAN also
    /// reports `classifier_accuracy_real` / `classifier_accuracy_fake`: the class head's accuracy
    /// on the batch's real samples and on the fakes (before the update), averaged over the
    /// discriminator updates.
    fn train_step(&mut self, batch: &Batch, ctx: &mut TrainContext<'_>) -> Result<StepReport> {
        if batch.is_empty() {
            return Err(Error::shape(format!("{} batch", self.kind), "at least one sample", 0));
        }
        refuse_unrolling(self.kind, ctx)?;
        let mut report = StepReport::default();
        let count = schedule_discriminator_steps(self.discriminator_steps, usize::MAX, ctx, &mut report);
        let mut steps = Vec::with_capacity(count);
        let (mut acc_real, mut acc_fake, mut counted) = (0.0, 0.0, 0usize);
        for _ in 0..count {
            let (d, aux) = self.discriminator_step(batch, ctx)?;
            if let Some(a) = aux {
                acc_real += a.accuracy_real;
                acc_fake += a.accuracy_fake;
                counted += 1;
            }
            steps.push(d);
        }
        DiscriminatorStep::report(&steps, &mut report);
        if counted > 0 {
            report.diagnostic("classifier_accuracy_real", acc_real / counted as f64);
            report.diagnostic("classifier_accuracy_fake", acc_fake / counted as f64);
        }
        let real_scores = match steps.last() {
            Some(d) => d.real_scores.clone(),
            None => self.real_scores(batch, ctx)?,
        };
        self.generator_step(batch.len(), &real_scores, ctx, &mut report)?;
        Ok(report)
    }
    /// Discriminator and generator losses on a held-out labelled batch with fresh fakes, in eval
    /// mode, without stabilizers or updates; AC-GAN adds `classifier_accuracy_real`.
    fn evaluate(&mut self, batch: &Batch, ctx: &mut EvalContext<'_>) -> Result<BTreeMap<String, f64>> {
        if batch.is_empty() {
            return Err(Error::shape(
                format!("{} evaluation batch", self.kind),
                "at least one sample",
                0,
            ));
        }
        let n = batch.len();
        let y_real = self.batch_labels(batch)?.to_vec();
        let y_fake = self.draw_labels(n, ctx.rng);
        let z = self.sample_latent(n, ctx.device, ctx.rng);
        let fake = self.generate(&z, &y_fake, Mode::Eval, ctx.rng)?.detach();
        let real_in = self.data_input(&batch.inputs)?;
        let fake_in = Activation::data(&fake, self.data_shape)?;
        let device = ctx.device.clone();
        let mut fwd = ForwardContext {
            mode: Mode::Eval,
            rng: ctx.rng,
        };
        let real = self.discriminate(real_in, &y_real, &device, &mut fwd)?;
        let fake = self.discriminate(fake_in, &y_fake, &device, &mut fwd)?;
        let real_scores = real.adversarial.retaped::<NoneTape>();
        let fake_scores = fake.adversarial.retaped::<NoneTape>();
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
        if let Some(classes) = real.classes {
            out.insert(
                "classifier_accuracy_real".into(),
                accuracy(&classes.retaped::<NoneTape>(), &y_real),
            );
        }
        Ok(out)
    }
    /// `n` samples in eval mode; sample `i` is of class `i mod num_classes`.
    fn sample(&mut self, n: usize, ctx: &mut EvalContext<'_>) -> Result<Option<Matrix>> {
        let labels: Vec<usize> = (0..n).map(|i| i % self.classes).collect();
        let z = self.sample_latent(n, ctx.device, ctx.rng);
        Ok(Some(self.generate(&z, &labels, Mode::Eval, ctx.rng)?.detach()))
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
                let labels: Vec<usize> = (0..batch_size).map(|i| i % gan.classes).collect();
                let z = gan.sample_latent(batch_size, ctx.device, ctx.rng);
                gan.generate(&z, &labels, Mode::Train, ctx.rng).map(drop)
            },
        )?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nash_core::layers::activation::LeakyReluConfig as Leaky;
    use nash_core::rand::SeedableRng;
    use nash_core::rand_distr::{Distribution, StandardNormal};
    use nash_core::stabilizer::StabilizerStack;

    use crate::mlp_gan::mlp;
    use crate::step::test_support::{adam, changed, snapshot, trainable_with_prefix};

    /// Four well-separated classes in 2D: class k at CENTERS[k], σ = 0.1.
    const CENTERS: [[f32; 2]; 4] = [[2.0, 2.0], [-2.0, 2.0], [-2.0, -2.0], [2.0, -2.0]];

    fn info(classes: Option<usize>) -> DataInfo {
        DataInfo {
            sample_shape: FeatureShape::Flat(2),
            num_classes: classes,
            value_range: (-3.0, 3.0),
        }
    }

    /// A labelled batch from the four-blob mixture, like `gaussian_mixture` produces.
    fn blobs(device: &Device, rng: &mut Rng, n: usize) -> Batch {
        let mut values = Vec::with_capacity(2 * n);
        let mut labels = Vec::with_capacity(n);
        for _ in 0..n {
            let k = rng.gen_range(0..4);
            for c in CENTERS[k] {
                let e: f32 = StandardNormal.sample(rng);
                values.push(c + 0.1 * e);
            }
            labels.push(k);
        }
        Batch {
            inputs: device.tensor_from_vec(values, (n, 2)),
            shape: FeatureShape::Flat(2),
            labels: Some(labels),
        }
    }

    fn cgan(encoding: LabelEncoding) -> ConditionalGanConfig {
        ConditionalGanConfig {
            latent_dim: 4,
            label_encoding: encoding,
            generator: mlp(&[32], 2, None),
            discriminator: mlp(&[32], 1, None),
            ..Default::default()
        }
    }

    fn acgan() -> AcGanConfig {
        AcGanConfig {
            latent_dim: 4,
            generator: mlp(&[32], 2, None),
            discriminator: SequentialConfig::new(vec![Box::new(LinearConfig::new(32)), Box::new(Leaky::new(0.2))]),
            ..Default::default()
        }
    }

    fn ctx_build<T>(seed: u64, f: impl FnOnce(&mut BuildContext<'_>) -> Result<T>) -> Result<T> {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(seed);
        f(&mut BuildContext {
            device: &device,
            rng: &mut rng,
        })
    }

    #[test]
    fn refuses_data_without_labels_before_any_step() {
        let err = ctx_build(0, |c| cgan(LabelEncoding::OneHot).build_gan(&info(None), c))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("conditional model without labels") && err.contains("conditional_gan"),
            "{err}"
        );
        let err = ctx_build(0, |c| acgan().build_gan(&info(None), c))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("conditional model without labels") && err.contains("ac_gan"),
            "{err}"
        );
        // A batch without labels is refused too (with the same words), and so are labels out of range.
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(1);
        let mut model = ctx_build(0, |c| cgan(LabelEncoding::OneHot).build_gan(&info(Some(4)), c)).unwrap();
        let mut batch = blobs(&device, &mut rng, 4);
        batch.labels = None;
        let mut opts = adam(1e-3);
        let mut stabilizers = StabilizerStack::default();
        let mut ctx = TrainContext {
            step: 0,
            device: &device,
            rng: &mut rng,
            optimizers: &mut opts,
            stabilizers: &mut stabilizers,
        };
        let err = model.train_step(&batch, &mut ctx).unwrap_err().to_string();
        assert!(err.contains("without labels"), "{err}");
        batch.labels = Some(vec![0, 1, 2, 7]);
        let err = model.train_step(&batch, &mut ctx).unwrap_err().to_string();
        assert!(err.contains("0..4") && err.contains('7'), "{err}");
        let mut ectx = EvalContext {
            device: &device,
            rng: &mut rng,
        };
        let err = model.sample_class(4, 2, &mut ectx).unwrap_err().to_string();
        assert!(err.contains("0..4"), "{err}");
    }

    #[test]
    fn wiring_and_parameter_groups() {
        let m = ctx_build(0, |c| cgan(LabelEncoding::Embedding(3)).build_gan(&info(Some(4)), c)).unwrap();
        let shapes: Vec<(String, Vec<usize>)> = m
            .named_params()
            .into_iter()
            .map(|(n, p)| (n, p.shape.clone()))
            .collect();
        let want: Vec<(String, Vec<usize>)> = [
            ("discriminator.0.weight", vec![2 + 3, 32]),
            ("discriminator.0.bias", vec![32]),
            ("discriminator.2.weight", vec![32, 1]),
            ("discriminator.2.bias", vec![1]),
            ("discriminator.labels.weight", vec![4, 3]),
            ("generator.0.weight", vec![4 + 3, 32]),
            ("generator.0.bias", vec![32]),
            ("generator.2.weight", vec![32, 2]),
            ("generator.2.bias", vec![2]),
            ("generator.labels.weight", vec![4, 3]),
        ]
        .into_iter()
        .map(|(n, s)| (n.to_string(), s))
        .collect();
        assert_eq!(shapes, want);
        // One-hot: G input latent + classes, D input sample + classes.
        let m = ctx_build(0, |c| cgan(LabelEncoding::OneHot).build_gan(&info(Some(4)), c)).unwrap();
        assert_eq!(m.generator.input_shape(), FeatureShape::Flat(8));
        assert_eq!(m.discriminator.input_shape(), FeatureShape::Flat(6));
        // AC-GAN: trunk + adversarial head, and a class head of 4 logits.
        let m = ctx_build(0, |c| acgan().build_gan(&info(Some(4)), c)).unwrap();
        let names: Vec<String> = m.named_params().into_iter().map(|(n, _)| n).collect();
        for n in [
            "discriminator.0.0.weight",
            "discriminator.1.weight",
            "discriminator.classifier.0.weight",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} in {names:?}");
        }
        assert_eq!(m.classifier.as_ref().unwrap().output_shape(), FeatureShape::Flat(4));
        assert_eq!(m.discriminator.output_shape(), FeatureShape::Flat(1));
        assert!(m.describe().contains("auxiliary classifier"), "{}", m.describe());
        // A generator that does not produce a sample is refused by path.
        let mut cfg = cgan(LabelEncoding::OneHot);
        cfg.generator = mlp(&[8], 3, None);
        let err = ctx_build(0, |c| cfg.build_gan(&info(Some(4)), c))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("model.generator"), "{err}");
        let mut cfg = acgan();
        cfg.classifier_weight = -1.0;
        let err = ctx_build(0, |c| cfg.build_gan(&info(Some(4)), c))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("model.classifier_weight"), "{err}");
    }

    fn check_update_groups(model: &mut ConditionalGan, seed: u64) {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(seed);
        let data = blobs(&device, &mut rng, 16);
        let mut opts = adam(1e-3);
        let mut stabilizers = StabilizerStack::default();
        let mut ctx = TrainContext {
            step: 0,
            device: &device,
            rng: &mut rng,
            optimizers: &mut opts,
            stabilizers: &mut stabilizers,
        };
        let d_names = trainable_with_prefix(model, "discriminator.");
        let g_names = trainable_with_prefix(model, "generator.");
        let before = snapshot(model);
        let (d, _) = model.discriminator_step(&data, &mut ctx).unwrap();
        assert_eq!(changed(&before, &snapshot(model)), d_names, "{}", model.kind);
        let before = snapshot(model);
        let mut report = StepReport::default();
        model.generator_step(16, &d.real_scores, &mut ctx, &mut report).unwrap();
        assert_eq!(changed(&before, &snapshot(model)), g_names, "{}", model.kind);
        assert!(report.first_non_finite().is_none(), "{report:?}");
    }

    #[test]
    fn updates_touch_only_their_network_including_label_embeddings() {
        let mut m = ctx_build(0, |c| cgan(LabelEncoding::Embedding(3)).build_gan(&info(Some(4)), c)).unwrap();
        check_update_groups(&mut m, 1);
        let mut m = ctx_build(0, |c| acgan().build_gan(&info(Some(4)), c)).unwrap();
        check_update_groups(&mut m, 2);
    }

    /// Mean distance of class-k samples to center k, averaged over the classes.
    fn class_error(model: &mut ConditionalGan, rng: &mut Rng) -> f64 {
        let device = Device::default();
        let mut ectx = EvalContext { device: &device, rng };
        let mut total = 0.0;
        for (k, c) in CENTERS.iter().enumerate() {
            let s = model.sample_class(k, 64, &mut ectx).unwrap().as_vec();
            let (mx, my) = s
                .chunks(2)
                .fold((0.0, 0.0), |(x, y), p| (x + p[0] as f64, y + p[1] as f64));
            let (mx, my) = (mx / 64.0, my / 64.0);
            total += ((mx - c[0] as f64).powi(2) + (my - c[1] as f64).powi(2)).sqrt();
        }
        total / 4.0
    }

    fn train(model: &mut ConditionalGan, steps: u64, seed: u64) -> Vec<StepReport> {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(seed);
        let mut opts = adam(3e-3);
        let mut stabilizers = StabilizerStack::default();
        (0..steps)
            .map(|step| {
                let data = blobs(&device, &mut rng, 64);
                let mut ctx = TrainContext {
                    step,
                    device: &device,
                    rng: &mut rng,
                    optimizers: &mut opts,
                    stabilizers: &mut stabilizers,
                };
                model.train_step(&data, &mut ctx).unwrap()
            })
            .collect()
    }

    #[test]
    fn conditional_gan_learns_to_place_each_class() {
        let mut model = ctx_build(3, |c| cgan(LabelEncoding::OneHot).build_gan(&info(Some(4)), c)).unwrap();
        let mut rng = Rng::seed_from_u64(9);
        let before = class_error(&mut model, &mut rng);
        let reports = train(&mut model, 300, 4);
        assert!(reports.iter().all(|r| r.first_non_finite().is_none()));
        let after = class_error(&mut model, &mut rng);
        eprintln!("mean distance of class samples to their centers: {before:.3} -> {after:.3}");
        // Initially every class lands near the origin (≈ 2.8 from its center).
        assert!(before > 2.0 && after < 0.5 * before, "class error {before} -> {after}");
    }

    #[test]
    fn ac_gan_classifier_accuracy_rises_on_separable_data() {
        let mut model = ctx_build(5, |c| acgan().build_gan(&info(Some(4)), c)).unwrap();
        let reports = train(&mut model, 150, 6);
        let acc = |r: &[StepReport]| {
            r.iter().map(|r| r.diagnostics["classifier_accuracy_real"]).sum::<f64>() / r.len() as f64
        };
        let (early, late) = (acc(&reports[..3]), acc(&reports[reports.len() - 10..]));
        eprintln!("auxiliary classifier accuracy on real samples: {early:.3} -> {late:.3}");
        assert!(early < 0.6 && late > 0.95, "accuracy {early} -> {late}");
        for key in ["loss/discriminator/classifier", "loss/generator/classifier"] {
            let first = reports[0].losses[key];
            let last = reports[reports.len() - 1].losses[key];
            assert!(last < first, "{key}: {first} -> {last}");
        }
        // Evaluation reports the same diagnostic on held-out labelled data.
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(10);
        let data = blobs(&device, &mut rng, 64);
        let eval = model
            .evaluate(
                &data,
                &mut EvalContext {
                    device: &device,
                    rng: &mut rng,
                },
            )
            .unwrap();
        assert!(eval["classifier_accuracy_real"] > 0.95, "{eval:?}");
    }

    #[test]
    fn every_objective_trains_both_conditional_models() {
        // The relativistic objective needs the real scores the step hands to the generator loss.
        for objective in ["relativistic_average", "hinge", "least_squares", "wasserstein"] {
            let obj = || -> Box<dyn AdversarialObjectiveConfig> {
                nash_core::serde_json::from_str(&format!(r#"{{"type": "{objective}"}}"#)).unwrap()
            };
            let mut c = cgan(LabelEncoding::OneHot);
            c.objective = obj();
            let mut a = acgan();
            a.objective = obj();
            for mut model in [
                ctx_build(0, |b| c.build_gan(&info(Some(4)), b)).unwrap(),
                ctx_build(0, |b| a.build_gan(&info(Some(4)), b)).unwrap(),
            ] {
                let reports = train(&mut model, 3, 1);
                for r in &reports {
                    assert!(r.first_non_finite().is_none(), "{objective} {}: {r:?}", model.kind);
                    assert!(r.losses.contains_key("loss/generator"), "{r:?}");
                }
            }
        }
    }

    #[test]
    fn sample_cycles_through_the_classes() {
        let device = Device::default();
        let mut model = ctx_build(0, |c| cgan(LabelEncoding::Embedding(2)).build_gan(&info(Some(4)), c)).unwrap();
        let mut rng = Rng::seed_from_u64(11);
        let all = model
            .sample(
                6,
                &mut EvalContext {
                    device: &device,
                    rng: &mut rng,
                },
            )
            .unwrap()
            .unwrap()
            .as_vec();
        // Same seed, same latent codes: row i of `sample(6)` is row i of `sample_class(i mod 4, 6)`.
        for i in 0..6 {
            let mut rng = Rng::seed_from_u64(11);
            let one = model
                .sample_class(
                    i % 4,
                    6,
                    &mut EvalContext {
                        device: &device,
                        rng: &mut rng,
                    },
                )
                .unwrap()
                .as_vec();
            assert_eq!(&all[2 * i..2 * i + 2], &one[2 * i..2 * i + 2], "row {i}");
        }
    }

    #[test]
    fn configs_parse_from_pipeline_tables() {
        let json = r#"{"type": "ac_gan", "latent_dim": 4, "label_encoding": {"embedding": 5},
            "classifier_weight": 0.5, "objective": {"type": "least_squares"},
            "generator": {"layers": [{"type": "linear", "out_features": 2}]},
            "discriminator": {"layers": [{"type": "linear", "out_features": 8}]}}"#;
        let cfg: Box<dyn ModelConfig> = nash_core::serde_json::from_str(json).unwrap();
        let model = ctx_build(0, |c| cfg.build(&info(Some(3)), c)).unwrap();
        assert!(model.describe().contains("least_squares"), "{}", model.describe());
        let json = r#"{"type": "conditional_gan", "label_encoding": "one_hot", "latent_dim": 2,
            "generator": {"layers": [{"type": "linear", "out_features": 2}]},
            "discriminator": {"layers": [{"type": "linear", "out_features": 1}]}}"#;
        let cfg: Box<dyn ModelConfig> = nash_core::serde_json::from_str(json).unwrap();
        assert!(ctx_build(0, |c| cfg.build(&info(Some(8)), c)).is_ok());
        let typo = r#"{"type": "conditional_gan", "label_encodng": "one_hot"}"#;
        let err = nash_core::serde_json::from_str::<Box<dyn ModelConfig>>(typo)
            .unwrap_err()
            .to_string();
        assert!(err.contains("label_encodng"), "{err}");
    }
}
