//! `conv_autoencoder`: a convolutional encoder and a transposed-convolution decoder, trained to
//! reconstruct image-shaped data; optionally denoising and sparse like the dense autoencoder.

use nash_core::data::DataInfo;
use nash_core::error::Result;
use nash_core::layers::activation::ReluConfig;
use nash_core::layers::conv::{Conv2dConfig, ConvTranspose2dConfig};
use nash_core::layers::linear::LinearConfig;
use nash_core::layers::reshape::{FlattenConfig, ReshapeConfig};
use nash_core::layers::{BuildContext, SequentialConfig};
use nash_core::loss::basic::MseConfig;
use nash_core::loss::LossConfig;
use nash_core::model::{Model, ModelConfig};
use serde::{Deserialize, Serialize};

use crate::dense::{Autoencoder, AutoencoderSpec, OutputActivation};
use crate::noise::NoiseConfig;
use crate::sparse::SparsityConfig;

/// The default convolutional encoder for 28x28 single-channel images, ending in `code` features:
/// conv 1→32 k4 s2 p1 (14x14), ReLU, conv 32→64 k4 s2 p1 (7x7), ReLU, flatten, linear `code`.
pub fn conv_encoder_28(code: usize) -> SequentialConfig {
    SequentialConfig::default()
        .push(Conv2dConfig::new(32, 4).with_stride(2).with_padding(1))
        .push(ReluConfig::default())
        .push(Conv2dConfig::new(64, 4).with_stride(2).with_padding(1))
        .push(ReluConfig::default())
        .push(FlattenConfig::default())
        .push(LinearConfig::new(code))
}

/// The mirror of [`conv_encoder_28`], ending in `channels` output channels at 28x28 without an
/// output activation: linear 64·7·7, ReLU, reshape [64, 7, 7], conv-transpose 64→32 k4 s2 p1
/// (14x14), ReLU, conv-transpose 32→`channels` k4 s2 p1 (28x28).
pub fn conv_decoder_28(channels: usize) -> SequentialConfig {
    SequentialConfig::default()
        .push(LinearConfig::new(64 * 7 * 7))
        .push(ReluConfig::default())
        .push(ReshapeConfig::image(64, 7, 7))
        .push(ConvTranspose2dConfig::new(32, 4).with_stride(2).with_padding(1))
        .push(ReluConfig::default())
        .push(ConvTranspose2dConfig::new(channels, 4).with_stride(2).with_padding(1))
}

/// Config of a convolutional [`Autoencoder`], `type = "conv_autoencoder"` in pipeline files.
///
/// The defaults fit 28x28 single-channel images: [`conv_encoder_28`] with a 16-unit code and
/// [`conv_decoder_28`], an output activation chosen from the data's value range (sigmoid for
/// [0, 1], tanh for [-1, 1]) and mean squared error. The data must be image-shaped (or the encoder
/// must start with a `reshape` layer); the decoder must reproduce one sample's exact image shape.
#[derive(Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConvAutoencoderConfig {
    /// The encoder, from one image to the code.
    pub encoder: SequentialConfig,
    /// The decoder, from the code back to one image (without the output activation).
    pub decoder: SequentialConfig,
    /// The activation after the decoder: `auto` (from the data's range), `sigmoid`, `tanh`, `none`.
    pub output: OutputActivation,
    /// The reconstruction loss between the output and the (clean) input.
    pub loss: Box<dyn LossConfig>,
    /// Corruption of the encoder's input during training (a denoising autoencoder); none by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub noise: Option<NoiseConfig>,
    /// L1 activity penalty on the code (a sparse autoencoder); none by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sparsity: Option<SparsityConfig>,
}

impl Default for ConvAutoencoderConfig {
    fn default() -> Self {
        ConvAutoencoderConfig {
            encoder: conv_encoder_28(16),
            decoder: conv_decoder_28(1),
            output: OutputActivation::Auto,
            loss: Box::new(MseConfig::default()),
            noise: None,
            sparsity: None,
        }
    }
}

impl ConvAutoencoderConfig {
    /// Builds the model for `data` (the typed form of [`ModelConfig::build`]).
    pub fn build_autoencoder(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<Autoencoder> {
        AutoencoderSpec {
            kind: "conv_autoencoder",
            encoder: &self.encoder,
            decoder: &self.decoder,
            output: self.output,
            loss: &*self.loss,
            noise: self.noise.as_ref(),
            sparsity: self.sparsity.as_ref(),
        }
        .build(data, ctx)
    }
}

#[typetag::serde(name = "conv_autoencoder")]
impl ModelConfig for ConvAutoencoderConfig {
    fn build(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<Box<dyn Model>> {
        Ok(Box::new(self.build_autoencoder(data, ctx)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use nash_core::data::Batch;
    use nash_core::dfdx::shapes::HasShape;
    use nash_core::layers::Mode;
    use nash_core::rand::SeedableRng;
    use nash_core::tensor::{Device, FeatureShape, Parameterized, Rng};

    /// A conv autoencoder for 1x8x8 images: conv 1→4 k4 s2 p1 (4x4), ReLU, flatten, linear 6;
    /// linear 64, ReLU, reshape [4, 4, 4], conv-transpose 4→`channels` k4 s2 p1 (8x8).
    fn tiny(channels: usize) -> ConvAutoencoderConfig {
        ConvAutoencoderConfig {
            encoder: SequentialConfig::default()
                .push(Conv2dConfig::new(4, 4).with_stride(2).with_padding(1))
                .push(ReluConfig::default())
                .push(FlattenConfig::default())
                .push(LinearConfig::new(6)),
            decoder: SequentialConfig::default()
                .push(LinearConfig::new(64))
                .push(ReluConfig::default())
                .push(ReshapeConfig::image(4, 4, 4))
                .push(ConvTranspose2dConfig::new(channels, 4).with_stride(2).with_padding(1)),
            ..Default::default()
        }
    }

    fn image() -> FeatureShape {
        FeatureShape::image(1, 8, 8)
    }

    fn build(cfg: &ConvAutoencoderConfig, shape: FeatureShape, range: (f32, f32)) -> nash_core::Result<Autoencoder> {
        with_build(0, |ctx| cfg.build_autoencoder(&info(shape, range), ctx))
    }

    #[test]
    fn the_default_wires_28x28_images() {
        let model = build(
            &ConvAutoencoderConfig::default(),
            FeatureShape::image(1, 28, 28),
            (0.0, 1.0),
        )
        .unwrap();
        let weights: Vec<(String, Vec<usize>)> = model
            .named_params()
            .into_iter()
            .filter(|(n, _)| n.ends_with("weight"))
            .map(|(n, p)| (n, p.shape.clone()))
            .collect();
        let want = [
            ("model.encoder.0.weight", vec![32, 1, 4, 4]),
            ("model.encoder.2.weight", vec![64, 32, 4, 4]),
            ("model.encoder.5.weight", vec![64 * 7 * 7, 16]),
            ("model.decoder.0.weight", vec![16, 64 * 7 * 7]),
            ("model.decoder.3.weight", vec![64, 32, 4, 4]),
            ("model.decoder.5.weight", vec![32, 1, 4, 4]),
        ];
        let want: Vec<(String, Vec<usize>)> = want.into_iter().map(|(n, s)| (n.to_string(), s)).collect();
        assert_eq!(weights, want);
        assert_eq!(model.code_shape(), FeatureShape::Flat(16));
        assert_eq!(model.decoder().output_shape(), FeatureShape::image(1, 28, 28));
        let text = model.describe();
        assert!(
            text.starts_with("conv_autoencoder") && text.contains("output: sigmoid"),
            "{text}"
        );
    }

    #[test]
    fn the_output_activation_follows_the_data_range() {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(1);
        for (range, name) in [((0.0, 1.0), "sigmoid"), ((-1.0, 1.0), "tanh"), ((-3.0, 5.0), "none")] {
            let mut model = build(&tiny(1), image(), range).unwrap();
            assert!(
                model.describe().contains(&format!("output: {name}")),
                "{}",
                model.describe()
            );
            let data = low_rank_batch(&device, 3, image(), range, &mut rng);
            let recon = model
                .reconstruct(&data, &mut eval_ctx(&device, &mut rng))
                .unwrap()
                .unwrap();
            assert_eq!(*recon.shape(), (3, 64));
            if name != "none" {
                assert!(recon.as_vec().iter().all(|v| *v > range.0 && *v < range.1));
            }
        }
        let mut cfg = tiny(1);
        cfg.output = OutputActivation::None;
        assert!(build(&cfg, image(), (0.0, 1.0))
            .unwrap()
            .describe()
            .contains("output: none"));
    }

    #[test]
    fn training_lowers_the_reconstruction_loss() {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(2);
        let data: Batch = low_rank_batch(&device, 16, image(), (0.0, 1.0), &mut rng);
        let mut model = build(&tiny(1), image(), (0.0, 1.0)).unwrap();
        let reports = train(&mut model, &data, 50, 1e-2, &mut rng);
        let (first, last) = first_last(&reports, "loss/reconstruction", 3);
        assert!(last < 0.3 * first, "{first} -> {last}");
        let mut ectx = eval_ctx(&device, &mut rng);
        let code = model.encode(&data.inputs, &mut ectx).unwrap();
        assert_eq!(*code.shape(), (16, 6));
        let decoded = model.decode(&code, &mut ectx).unwrap().as_vec();
        let out = model
            .forward(&data.inputs, Mode::Eval, ectx.rng)
            .unwrap()
            .detach()
            .as_vec();
        assert_eq!(decoded, out);
    }

    #[test]
    fn wrong_wiring_names_the_config_path() {
        // Flat data: the first convolution says it needs an image and how to give one.
        let err = build(&tiny(1), FeatureShape::Flat(64), (0.0, 1.0))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("model.encoder.layers[0]") && err.contains("image_shape"),
            "{err}"
        );
        // Three output channels for single-channel data.
        let err = build(&tiny(3), image(), (0.0, 1.0)).err().unwrap().to_string();
        assert!(
            err.contains("`model.decoder`") && err.contains("1 output channels"),
            "{err}"
        );
        // The right number of values in the wrong image shape.
        let err = build(&tiny(1), FeatureShape::image(4, 4, 4), (0.0, 1.0))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("model.encoder.layers[3]") || err.contains("`model.decoder`"),
            "{err}"
        );
        let err = build(&tiny(1), FeatureShape::image(1, 4, 16), (0.0, 1.0))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("`model.decoder`") && err.contains("[1, 4, 16]"), "{err}");
        let mut cfg = tiny(1);
        cfg.noise = Some(NoiseConfig::Masking { p: 2.0 });
        let err = build(&cfg, image(), (0.0, 1.0)).err().unwrap().to_string();
        assert!(err.contains("model.noise.p"), "{err}");
        let typo = r#"{"type": "conv_autoencoder", "outptu": "tanh"}"#;
        let err = nash_core::serde_json::from_str::<Box<dyn ModelConfig>>(typo)
            .unwrap_err()
            .to_string();
        assert!(err.contains("outptu"), "{err}");
        let ok = r#"{"type": "conv_autoencoder", "output": "tanh", "noise": {"type": "gaussian", "std": 0.2},
            "sparsity": {"l1": 0.01}}"#;
        assert!(nash_core::serde_json::from_str::<Box<dyn ModelConfig>>(ok).is_ok());
    }
}
