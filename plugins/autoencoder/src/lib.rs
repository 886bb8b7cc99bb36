//! nash plugin: the autoencoder family.
//!
//! Models, one file each: `dense_autoencoder` ([`dense`]) and `conv_autoencoder` ([`conv`]), both
//! with optional input corruption for denoising ([`noise`]) and an L1 activity penalty ([`sparse`]);
//! `vae` and `conv_vae` ([`vae`], β-VAE via `beta`); `vq_vae` ([`vq`]); `adversarial_autoencoder`
//! ([`adversarial`], groups `autoencoder` and `discriminator`). The others train one parameter group,
//! `model`. Each can encode, decode and reconstruct; the generative ones also sample.

use nash_core::registry::Registry;

pub mod adversarial;
pub mod conv;
pub mod dense;
pub mod noise;
pub mod sparse;
#[cfg(test)]
mod testutil;
pub mod vae;
pub mod vq;

pub use adversarial::{AdversarialAutoencoder, AdversarialAutoencoderConfig, Prior};
pub use conv::ConvAutoencoderConfig;
pub use dense::{Autoencoder, OutputActivation};
pub use dense::{DenseAutoencoder, DenseAutoencoderConfig};
pub use noise::NoiseConfig;
pub use sparse::SparsityConfig;
pub use vae::{ConvVaeConfig, Likelihood, Vae, VaeConfig};
pub use vq::{VqVae, VqVaeConfig};

nash_core::declare_plugin!(register);

/// Registers every type this plugin brings.
pub fn register(registry: &mut Registry) -> nash_core::Result<()> {
    registry.model::<DenseAutoencoderConfig>(
        "dense autoencoder: encoder and decoder layer stacks trained to reconstruct their input \
         (default: the reference 784-128-64-16 / 16-64-784 ReLU network with a sigmoid output, MSE)",
    )?;
    registry.model::<VqVaeConfig>(
        "VQ-VAE: encoder codes quantized to the nearest codebook entries (straight-through estimator), \
         codebook and commitment losses or EMA codebook updates, optional dead-code reset",
    )?;
    registry.model::<AdversarialAutoencoderConfig>(
        "adversarial autoencoder (Makhzani et al.): reconstruction plus a discriminator on the code that \
         matches it to a prior (normal, uniform or a 2-D Gaussian mixture); groups autoencoder, discriminator",
    )?;
    registry.model::<ConvAutoencoderConfig>(
        "convolutional autoencoder: conv2d encoder, conv_transpose2d decoder (default: 28x28x1 images, \
         32/64 channels, 16-unit code, output activation from the data range); `noise` and `sparsity` options",
    )?;
    registry.model::<VaeConfig>(
        "variational autoencoder (dense): Gaussian code, reparameterization, KL, bernoulli or gaussian \
         likelihood, beta (default: 784-256-32 encoder, 16-unit code, 16-256-784 decoder)",
    )?;
    registry.model::<ConvVaeConfig>(
        "variational autoencoder (convolutional, default 28x28x1): like `vae` with conv2d / conv_transpose2d stacks",
    )?;
    Ok(())
}
