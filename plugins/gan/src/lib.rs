//! nash plugin: the GAN family and adversarial objectives.
//!
//! Brings the model `mlp_gan` ([`MlpGanConfig`]), trained with alternating discriminator and
//! generator updates, and the objectives `non_saturating`, `minimax` and `wasserstein`.
//!
//! Also `dcgan` ([`dcgan::DcganConfig`], 28/32/64 images), `conditional_gan` and `ac_gan`
//! ([`conditional`]), the objectives `least_squares`, `hinge` and `relativistic_average`, and in
//! [`step`] the pieces of the alternating discriminator/generator update the models share.
//!
//! Autoencoders inside GANs: `began` ([`began::BeganConfig`]), `ebgan` ([`ebgan::EbganConfig`]),
//! `vae_gan` ([`vaegan::VaeGanConfig`]) and `bigan` ([`bigan::BiganConfig`]).

use nash_core::registry::Registry;

pub mod began;
pub mod bigan;
pub mod conditional;
pub mod dcgan;
pub mod ebgan;
pub mod mlp_gan;
pub mod objective;
pub mod step;
pub mod vaegan;

pub use mlp_gan::{Latent, MlpGan, MlpGanConfig};
pub use objective::{Minimax, MinimaxConfig, NonSaturating, NonSaturatingConfig, Wasserstein, WassersteinConfig};

nash_core::declare_plugin!(register);

/// Registers every type this plugin brings.
pub fn register(registry: &mut Registry) -> nash_core::Result<()> {
    registry.model::<MlpGanConfig>(
        "GAN of two layer stacks with alternating discriminator/generator updates (default: the reference \
         MLP GAN, G 100-128-256-512-784 LeakyReLU/tanh, D 784-256-512-1 LeakyReLU)",
    )?;
    registry.objective::<NonSaturatingConfig>(
        "non-saturating GAN loss: D = BCE(real, 1) + BCE(fake, 0), G = -log D(G(z))",
    )?;
    registry.objective::<MinimaxConfig>("original minimax GAN loss: D as non_saturating, G = log(1 - D(G(z)))")?;
    registry.objective::<WassersteinConfig>(
        "Wasserstein loss: critic = mean(fake) - mean(real), G = -mean(fake); needs a Lipschitz stabilizer",
    )?;
    registry.objective::<objective::LeastSquaresConfig>(
        "least-squares GAN (LSGAN): D = 0.5[(D(x)-b)^2 + (D(G(z))-a)^2], G = 0.5(D(G(z))-c)^2, a=0 b=1 c=1",
    )?;
    registry.objective::<objective::HingeConfig>(
        "hinge loss: D = mean(relu(1 - D(x))) + mean(relu(1 + D(G(z)))), G = -mean(D(G(z)))",
    )?;
    registry.objective::<objective::RelativisticAverageConfig>(
        "relativistic average GAN (RaSGAN): BCE of each side's logits minus the other side's mean logit",
    )?;
    registry.model::<dcgan::DcganConfig>(
        "DCGAN for 28x28, 32x32 or 64x64 images: conv-transpose generator with batch norm + ReLU and tanh, \
         conv discriminator with LeakyReLU(0.2), N(0, 0.02) init",
    )?;
    registry.model::<conditional::ConditionalGanConfig>(
        "conditional GAN (Mirza & Osindero): G(z, y) and D(x, y), labels one-hot or embedded and concatenated",
    )?;
    registry.model::<conditional::AcGanConfig>(
        "AC-GAN (Odena et al.): G(z, y); D with an adversarial logit and an auxiliary classifier head",
    )?;
    registry.model::<began::BeganConfig>(
        "BEGAN: autoencoder discriminator, L1 reconstruction losses, equilibrium term k_t with diversity \
         ratio gamma, convergence measure",
    )?;
    registry.model::<ebgan::EbganConfig>(
        "EBGAN: autoencoder discriminator with MSE energy, margin hinge, pulling-away term",
    )?;
    registry.model::<vaegan::VaeGanConfig>(
        "VAE-GAN: VAE whose reconstruction is measured in a discriminator layer's feature space; groups \
         encoder, decoder, discriminator",
    )?;
    registry.model::<bigan::BiganConfig>(
        "BiGAN/ALI: encoder E(x), generator G(z), joint discriminator D(x, z); groups discriminator and \
         generator (G and E)",
    )?;
    Ok(())
}
