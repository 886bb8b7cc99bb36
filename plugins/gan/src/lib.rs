//! nash plugin: the GAN family and adversarial objectives.
//!
//! Brings the model `mlp_gan` ([`MlpGanConfig`]), trained with alternating discriminator and
//! generator updates, and the objectives `non_saturating`, `minimax` and `wasserstein`.

use nash_core::registry::Registry;

pub mod mlp_gan;
pub mod objective;

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
    Ok(())
}
