//! `dcgan`: the deep convolutional GAN (Radford, Metz & Chintala 2016) for 28x28, 32x32 and 64x64
//! images, trained with the same alternating updates as [`MlpGan`].
//!
//! Generated architecture, with `w = base_width` and `c` the data's channels (all kernels 4x4,
//! stride 2, padding 1, no biases, as in the PyTorch DCGAN example):
//!
//! | size | generator: linear → `[c0, s, s]`, then conv-transpose widths | discriminator conv widths → linear |
//! |---|---|---|
//! | 64 | `[8w, 4, 4]` → 4w (8) → 2w (16) → w (32) → c (64) | w (32) → 2w (16) → 4w (8) → 8w (4) → 1 |
//! | 32 | `[4w, 4, 4]` → 2w (8) → w (16) → c (32) | w (16) → 2w (8) → 4w (4) → 1 |
//! | 28 | `[2w, 7, 7]` → w (14) → c (28) | w (14) → 2w (7) → 1 |
//!
//! The generator's first layer is a linear map from the latent code, exactly the PyTorch example's
//! `ConvTranspose2d(nz, 8w, 4, 1, 0)` on a 1x1 input; every hidden generator layer is followed by
//! batch norm and ReLU, the output by tanh (data scaled to [-1, 1]). The discriminator uses
//! LeakyReLU(0.2) after each convolution and batch norm after every convolution but the first; its
//! last linear layer (the example's `Conv2d(8w, 1, 4, 1, 0)` on the 4x4 map) gives one raw logit.
//! Initialization as the example's `weights_init`: conv, conv-transpose and linear weights
//! N(0, 0.02), batch-norm scales N(1, 0.02), shifts 0.

use nash_core::data::DataInfo;
use nash_core::error::{Error, Result};
use nash_core::layers::activation::{LeakyReluConfig, ReluConfig, TanhConfig};
use nash_core::layers::conv::{Conv2dConfig, ConvTranspose2dConfig};
use nash_core::layers::linear::LinearConfig;
use nash_core::layers::norm::BatchNormConfig;
use nash_core::layers::reshape::ReshapeConfig;
use nash_core::layers::{BuildContext, Init, LayerConfig, SequentialConfig};
use nash_core::loss::AdversarialObjectiveConfig;
use nash_core::model::{Model, ModelConfig};
use nash_core::rand_distr::{Distribution, Normal};
use nash_core::tensor::{ParamRole, Parameterized};
use serde::{Deserialize, Serialize};

use crate::mlp_gan::{GanParts, Latent, MlpGan};
use crate::objective::NonSaturatingConfig;

/// The image sizes the generated architecture supports.
pub const IMAGE_SIZES: [usize; 3] = [28, 32, 64];

/// Config of a DCGAN, `type = "dcgan"` in pipeline files. The networks are generated from
/// `image_size`, the data's channels and `base_width` (see the module docs) unless explicit
/// `generator` / `discriminator` stacks are given.
#[derive(Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DcganConfig {
    /// Side of the square images: 28, 32 or 64; must match the data.
    pub image_size: usize,
    /// Feature maps of the widest generator / narrowest discriminator layer (PyTorch's ngf/ndf).
    pub base_width: usize,
    /// Size of the latent code.
    pub latent_dim: usize,
    /// Distribution of the latent code.
    pub latent: Latent,
    /// An explicit generator from `[latent_dim]` to one image, replacing the generated one.
    pub generator: Option<SequentialConfig>,
    /// An explicit discriminator from one image to one raw score, replacing the generated one.
    pub discriminator: Option<SequentialConfig>,
    /// The adversarial objective.
    pub objective: Box<dyn AdversarialObjectiveConfig>,
    /// Discriminator updates per generator update.
    pub discriminator_steps: usize,
}

impl Default for DcganConfig {
    fn default() -> Self {
        DcganConfig {
            image_size: 28,
            base_width: 64,
            latent_dim: 100,
            latent: Latent::Normal,
            generator: None,
            discriminator: None,
            objective: Box::new(NonSaturatingConfig::default()),
            discriminator_steps: 1,
        }
    }
}

/// The starting map side, the generator's first width (in units of `base_width`) and the
/// discriminator's conv widths (in units of `base_width`) for a supported image size.
fn plan(image_size: usize) -> Option<(usize, usize, &'static [usize])> {
    match image_size {
        64 => Some((4, 8, &[1, 2, 4, 8])),
        32 => Some((4, 4, &[1, 2, 4])),
        28 => Some((7, 2, &[1, 2])),
        _ => None,
    }
}

fn conv_transpose(out_channels: usize) -> Box<dyn LayerConfig> {
    Box::new(ConvTranspose2dConfig {
        out_channels,
        kernel_size: 4,
        stride: 2,
        padding: 1,
        output_padding: 0,
        bias: false,
        init: Some(Init::Dcgan),
        bias_init: None,
    })
}

fn conv(out_channels: usize) -> Box<dyn LayerConfig> {
    Box::new(Conv2dConfig {
        out_channels,
        kernel_size: 4,
        stride: 2,
        padding: 1,
        bias: false,
        init: Some(Init::Dcgan),
        bias_init: None,
    })
}

impl DcganConfig {
    /// The generated generator for `image_size` (28, 32 or 64), `channels` and `base_width`.
    pub fn reference_generator(image_size: usize, channels: usize, base_width: usize) -> Option<SequentialConfig> {
        let (start, first, _) = plan(image_size)?;
        let w = base_width;
        let c0 = first * w;
        let mut layers: Vec<Box<dyn LayerConfig>> = vec![
            Box::new(
                LinearConfig::new(c0 * start * start)
                    .with_bias(false)
                    .with_init(Init::Dcgan),
            ),
            Box::new(ReshapeConfig::image(c0, start, start)),
            Box::new(BatchNormConfig::new()),
            Box::new(ReluConfig::default()),
        ];
        let mut width = c0;
        while width > w {
            width /= 2;
            layers.push(conv_transpose(width));
            layers.push(Box::new(BatchNormConfig::new()));
            layers.push(Box::new(ReluConfig::default()));
        }
        layers.push(conv_transpose(channels));
        layers.push(Box::new(TanhConfig::default()));
        Some(SequentialConfig::new(layers))
    }

    /// The generated discriminator for `image_size` (28, 32 or 64) and `base_width`.
    pub fn reference_discriminator(image_size: usize, base_width: usize) -> Option<SequentialConfig> {
        let (_, _, widths) = plan(image_size)?;
        let mut layers: Vec<Box<dyn LayerConfig>> = Vec::new();
        for (i, &k) in widths.iter().enumerate() {
            layers.push(conv(k * base_width));
            if i > 0 {
                layers.push(Box::new(BatchNormConfig::new()));
            }
            layers.push(Box::new(LeakyReluConfig::new(0.2)));
        }
        layers.push(Box::new(LinearConfig::new(1).with_bias(false).with_init(Init::Dcgan)));
        Some(SequentialConfig::new(layers))
    }

    /// Builds the model for `data` (the typed form of [`ModelConfig::build`]).
    pub fn build_gan(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<MlpGan> {
        if !IMAGE_SIZES.contains(&self.image_size) {
            return Err(Error::config(
                "model.image_size",
                format!("must be one of 28, 32 or 64, got {}", self.image_size),
            ));
        }
        let s = self.image_size;
        let channels = match data.sample_shape.as_image() {
            Some((c, h, w)) if h == s && w == s => c,
            _ => {
                return Err(Error::config(
                    "model.image_size",
                    format!(
                        "dcgan with image_size {s} needs image data of shape [channels, {s}, {s}], but the data's \
                         samples are {}; use image data of that size (for example `image_shape = [1, {s}, {s}]` \
                         on a synthetic source) or set image_size to match",
                        data.sample_shape
                    ),
                ))
            }
        };
        if self.base_width == 0 {
            return Err(Error::config("model.base_width", "must be at least 1"));
        }
        let generated_g = self.generator.is_none();
        let generated_d = self.discriminator.is_none();
        let fallback = || Error::config("model.image_size", "must be one of 28, 32 or 64");
        let generated_g_cfg;
        let g = match &self.generator {
            Some(g) => g,
            None => {
                generated_g_cfg = Self::reference_generator(s, channels, self.base_width).ok_or_else(fallback)?;
                &generated_g_cfg
            }
        };
        let generated_d_cfg;
        let d = match &self.discriminator {
            Some(d) => d,
            None => {
                generated_d_cfg = Self::reference_discriminator(s, self.base_width).ok_or_else(fallback)?;
                &generated_d_cfg
            }
        };
        let mut gan = MlpGan::from_stacks(
            GanParts {
                kind: "dcgan",
                latent_dim: self.latent_dim,
                latent: self.latent,
                generator: g,
                discriminator: d,
                objective: self.objective.as_ref(),
                discriminator_steps: self.discriminator_steps,
            },
            data,
            ctx,
        )?;
        // weights_init of the PyTorch example: batch-norm scales N(1, 0.02).
        let normal = Normal::new(1.0f32, 0.02).map_err(|e| Error::Other(format!("dcgan init: {e}")))?;
        for (name, p) in gan.named_params_mut() {
            let generated = if name.starts_with("generator.") {
                generated_g
            } else {
                generated_d
            };
            if generated && p.role == ParamRole::Scale {
                let values: Vec<f32> = (0..p.numel()).map(|_| normal.sample(ctx.rng)).collect();
                p.set(&values)?;
            }
        }
        Ok(gan)
    }
}

#[typetag::serde(name = "dcgan")]
impl ModelConfig for DcganConfig {
    fn build(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<Box<dyn Model>> {
        Ok(Box::new(self.build_gan(data, ctx)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nash_core::data::Batch;
    use nash_core::dfdx::prelude::*;
    use nash_core::layers::Mode;
    use nash_core::model::{EvalContext, StepReport, TrainContext};
    use nash_core::rand::{Rng as _, SeedableRng};
    use nash_core::stabilizer::StabilizerStack;
    use nash_core::tensor::{Device, FeatureShape, Rng};

    use crate::step::test_support::{adam, changed, snapshot, trainable_with_prefix};

    fn image_info(c: usize, s: usize) -> DataInfo {
        DataInfo {
            sample_shape: FeatureShape::image(c, s, s),
            num_classes: None,
            value_range: (-1.0, 1.0),
        }
    }

    fn tiny(image_size: usize) -> DcganConfig {
        DcganConfig {
            image_size,
            base_width: 4,
            latent_dim: 8,
            ..Default::default()
        }
    }

    fn build(cfg: &DcganConfig, info: &DataInfo, seed: u64) -> Result<MlpGan> {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(seed);
        cfg.build_gan(
            info,
            &mut BuildContext {
                device: &device,
                rng: &mut rng,
            },
        )
    }

    fn weight_shapes(model: &MlpGan) -> Vec<(String, Vec<usize>)> {
        model
            .named_params()
            .into_iter()
            .filter(|(n, _)| n.ends_with("weight") && !n.contains("running"))
            .filter(|(_, p)| p.role == ParamRole::Weight)
            .map(|(n, p)| (n, p.shape.clone()))
            .collect()
    }

    fn shapes(list: &[(&str, &[usize])]) -> Vec<(String, Vec<usize>)> {
        list.iter().map(|(n, s)| (n.to_string(), s.to_vec())).collect()
    }

    #[test]
    fn generated_architectures_follow_the_reference_for_every_size() {
        // w = 4, latent 8. Kernels in PyTorch layout: conv [out, in, 4, 4], conv-transpose [in, out, 4, 4].
        let m = build(&tiny(28), &image_info(1, 28), 0).unwrap();
        assert_eq!(
            weight_shapes(&m),
            shapes(&[
                ("discriminator.0.weight", &[4, 1, 4, 4]),
                ("discriminator.2.weight", &[8, 4, 4, 4]),
                ("discriminator.5.weight", &[8 * 7 * 7, 1]),
                ("generator.0.weight", &[8, 8 * 7 * 7]),
                ("generator.4.weight", &[8, 4, 4, 4]),
                ("generator.7.weight", &[4, 1, 4, 4]),
            ])
        );
        let m = build(&tiny(32), &image_info(3, 32), 0).unwrap();
        assert_eq!(
            weight_shapes(&m),
            shapes(&[
                ("discriminator.0.weight", &[4, 3, 4, 4]),
                ("discriminator.2.weight", &[8, 4, 4, 4]),
                ("discriminator.5.weight", &[16, 8, 4, 4]),
                ("discriminator.8.weight", &[16 * 4 * 4, 1]),
                ("generator.0.weight", &[8, 16 * 4 * 4]),
                ("generator.4.weight", &[16, 8, 4, 4]),
                ("generator.7.weight", &[8, 4, 4, 4]),
                ("generator.10.weight", &[4, 3, 4, 4]),
            ])
        );
        // 64x64: the PyTorch example's netG / netD with ngf = ndf = 4.
        let m = build(&tiny(64), &image_info(3, 64), 0).unwrap();
        assert_eq!(
            weight_shapes(&m),
            shapes(&[
                ("discriminator.0.weight", &[4, 3, 4, 4]),
                ("discriminator.2.weight", &[8, 4, 4, 4]),
                ("discriminator.5.weight", &[16, 8, 4, 4]),
                ("discriminator.8.weight", &[32, 16, 4, 4]),
                ("discriminator.11.weight", &[32 * 4 * 4, 1]),
                ("generator.0.weight", &[8, 32 * 4 * 4]),
                ("generator.4.weight", &[32, 16, 4, 4]),
                ("generator.7.weight", &[16, 8, 4, 4]),
                ("generator.10.weight", &[8, 4, 4, 4]),
                ("generator.13.weight", &[4, 3, 4, 4]),
            ])
        );
        // No biases anywhere but batch-norm shifts; batch norm everywhere in G, not after D's first conv.
        assert!(m.named_params().iter().all(|(_, p)| p.role != ParamRole::Bias));
        let text = m.describe();
        assert!(text.starts_with("dcgan:") && text.contains("tanh"), "{text}");
        assert_eq!(m.generator().output_shape(), FeatureShape::image(3, 64, 64));
        assert_eq!(m.discriminator().output_shape().numel(), 1);
        // A forward pass: images in [-1, 1] and one score each.
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(1);
        let mut m = build(&tiny(32), &image_info(3, 32), 0).unwrap();
        let z = m.sample_latent(2, &device, &mut rng);
        let x = m.generate(&z, Mode::Eval, &mut rng).unwrap();
        assert_eq!(x.shape, FeatureShape::image(3, 32, 32));
        assert!(x.detach().as_vec().iter().all(|v| (-1.0..=1.0).contains(v)));
        let scores = m.score(&x.detach(), &mut rng).unwrap();
        assert_eq!(*scores.shape(), (2, 1));
    }

    #[test]
    fn initialization_is_the_dcgan_one() {
        let m = build(
            &DcganConfig {
                base_width: 16,
                ..tiny(32)
            },
            &image_info(3, 32),
            3,
        )
        .unwrap();
        let params = m.named_params();
        let mut weights = Vec::new();
        let mut scales = Vec::new();
        for (_, p) in &params {
            match p.role {
                ParamRole::Weight => weights.extend(p.to_vec()),
                ParamRole::Scale => scales.extend(p.to_vec()),
                _ => {}
            }
        }
        let stats = |v: &[f32]| {
            let n = v.len() as f64;
            let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
            let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
            (mean, var.sqrt())
        };
        let (wm, ws) = stats(&weights);
        assert!(wm.abs() < 2e-3 && (ws - 0.02).abs() < 1e-3, "weights N({wm}, {ws})");
        let (sm, ss) = stats(&scales);
        assert!(
            (sm - 1.0).abs() < 1e-2 && (ss - 0.02).abs() < 6e-3,
            "scales N({sm}, {ss})"
        );
    }

    #[test]
    fn refuses_data_that_does_not_fit() {
        let flat = DataInfo {
            sample_shape: FeatureShape::Flat(784),
            num_classes: None,
            value_range: (-1.0, 1.0),
        };
        let err = build(&tiny(28), &flat, 0).err().unwrap().to_string();
        assert!(
            err.contains("model.image_size") && err.contains("[channels, 28, 28]") && err.contains("[784]"),
            "{err}"
        );
        let err = build(&tiny(28), &image_info(1, 32), 0).err().unwrap().to_string();
        assert!(err.contains("model.image_size") && err.contains("[1, 32, 32]"), "{err}");
        let err = build(&tiny(30), &image_info(1, 30), 0).err().unwrap().to_string();
        assert!(err.contains("28, 32 or 64"), "{err}");
        let cfg = DcganConfig {
            base_width: 0,
            ..tiny(28)
        };
        let err = build(&cfg, &image_info(1, 28), 0).err().unwrap().to_string();
        assert!(err.contains("model.base_width"), "{err}");
        // An explicit generator that does not produce the image is refused by name.
        let cfg: DcganConfig = nash_core::serde_json::from_str(
            r#"{"image_size": 28, "latent_dim": 4,
                "generator": {"layers": [{"type": "linear", "out_features": 10}]}}"#,
        )
        .unwrap();
        let err = build(&cfg, &image_info(1, 28), 0).err().unwrap().to_string();
        assert!(err.contains("model.generator") && err.contains("784"), "{err}");
    }

    fn image_batch(device: &Device, rng: &mut Rng, n: usize) -> Batch {
        // Bright left half, dark right half, plus noise: an easy "real" distribution.
        let mut values = Vec::with_capacity(n * 784);
        for _ in 0..n {
            for _row in 0..28 {
                for col in 0..28 {
                    let base = if col < 14 { 0.8 } else { -0.8 };
                    values.push(base + rng.gen_range(-0.1f32..0.1));
                }
            }
        }
        Batch {
            inputs: device.tensor_from_vec(values, (n, 784)),
            shape: FeatureShape::image(1, 28, 28),
            labels: None,
        }
    }

    #[test]
    fn updates_touch_only_their_network_and_losses_move_the_right_way() {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(7);
        let mut model = build(&tiny(28), &image_info(1, 28), 0).unwrap();
        let data = image_batch(&device, &mut rng, 8);
        let mut opts = adam(2e-3);
        let mut stabilizers = StabilizerStack::default();
        let mut ctx = TrainContext {
            step: 0,
            device: &device,
            rng: &mut rng,
            optimizers: &mut opts,
            stabilizers: &mut stabilizers,
        };
        let d_names = trainable_with_prefix(&model, "discriminator.");
        let g_names = trainable_with_prefix(&model, "generator.");
        // Trainable parameters only: batch-norm running statistics of the network that only runs
        // forward change too, as in PyTorch's DCGAN loop.
        let only_trainable = |names: Vec<String>| -> Vec<String> {
            names
                .into_iter()
                .filter(|n| d_names.contains(n) || g_names.contains(n))
                .collect()
        };
        let before = snapshot(&model);
        let first = model.discriminator_step(&data, &mut ctx).unwrap();
        assert_eq!(only_trainable(changed(&before, &snapshot(&model))), d_names);
        let mut last = first.loss;
        for _ in 0..9 {
            last = model.discriminator_step(&data, &mut ctx).unwrap().loss;
        }
        assert!(
            first.loss.is_finite() && last < first.loss,
            "D loss {} -> {last}",
            first.loss
        );

        let before = snapshot(&model);
        let mut report = StepReport::default();
        model
            .generator_step(8, &first.real_scores, &mut ctx, &mut report)
            .unwrap();
        assert_eq!(only_trainable(changed(&before, &snapshot(&model))), g_names);
        let g_first = report.losses["loss/generator"];
        for _ in 0..9 {
            model
                .generator_step(8, &first.real_scores, &mut ctx, &mut report)
                .unwrap();
        }
        let g_last = report.losses["loss/generator"];
        assert!(g_first.is_finite() && g_last < g_first, "G loss {g_first} -> {g_last}");

        // A whole step reports finite losses; evaluation and sampling work on images.
        let report = model.train_step(&data, &mut ctx).unwrap();
        assert!(report.first_non_finite().is_none(), "{report:?}");
        let mut ectx = EvalContext {
            device: &device,
            rng: &mut rng,
        };
        let eval = model.evaluate(&data, &mut ectx).unwrap();
        assert!(eval["loss/discriminator"].is_finite(), "{eval:?}");
        let samples = model.sample(3, &mut ectx).unwrap().unwrap();
        assert_eq!(*samples.shape(), (3, 784));
    }

    #[test]
    fn config_parses_from_a_pipeline_table() {
        let json = r#"{"type": "dcgan", "image_size": 32, "base_width": 4, "latent_dim": 16,
            "objective": {"type": "hinge"}}"#;
        let cfg: Box<dyn ModelConfig> = nash_core::serde_json::from_str(json).unwrap();
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        let model = cfg
            .build(
                &image_info(1, 32),
                &mut BuildContext {
                    device: &device,
                    rng: &mut rng,
                },
            )
            .unwrap();
        assert!(model.describe().contains("hinge"), "{}", model.describe());
        let typo = r#"{"type": "dcgan", "base_widht": 4}"#;
        let err = nash_core::serde_json::from_str::<Box<dyn ModelConfig>>(typo)
            .unwrap_err()
            .to_string();
        assert!(err.contains("base_widht"), "{err}");
    }
}
