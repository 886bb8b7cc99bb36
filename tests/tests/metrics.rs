//! The autoencoder metrics end to end: `nash train` runs a tiny convolutional VAE on 12x12 images
//! with `reconstruction_error` (MSE, MAE, PSNR, SSIM) and `elbo`, and a tiny VQ-VAE with
//! `codebook_usage`, and the summaries' final metrics hold every key with a sane value.

use std::path::PathBuf;
use std::process::Command;

use nash_core::serde_json::{self, Value};
use nash_tests::support;

/// Writes `pipeline` into a fresh folder `name`, runs `nash train` on it and returns the summary.
fn train(name: &str, pipeline: &str) -> Value {
    let dir = support::scratch_dir(name);
    let file: PathBuf = dir.join("pipeline.toml");
    std::fs::write(&file, pipeline).unwrap();
    let out = dir.join("run");
    let output = support::run_ok(
        Command::new(support::nash_binary())
            .arg("train")
            .arg(&file)
            .args(["--quiet", "--out"])
            .arg(&out)
            .env_remove("NASH_PLUGIN_PATH"),
    );
    let summary = std::fs::read_to_string(out.join("summary.json")).unwrap_or_else(|e| {
        panic!(
            "no summary.json ({e}); nash printed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let summary: Value = serde_json::from_str(&summary).expect("summary.json is JSON");
    assert_eq!(summary["status"], "completed", "{summary:#}");
    summary
}

fn final_metric(summary: &Value, key: &str) -> f64 {
    let v = summary["final_metrics"][key]
        .as_f64()
        .unwrap_or_else(|| panic!("no numeric final_metrics.{key}: {summary:#}"));
    assert!(v.is_finite(), "{key} = {v}");
    v
}

/// A convolutional VAE on [1, 12, 12] images: 12 -> 6 -> 3 -> 8-unit code and back.
const CONV_VAE: &str = r#"
name = "metrics_conv_vae"
seed = 0
plugins = []

[data]
type = "latent_manifold"
dim = 144
latent_dim = 4
image_shape = [1, 12, 12]
train_samples = 256
test_samples = 100

[model]
type = "conv_vae"
latent_dim = 4
likelihood = { type = "bernoulli" }

[model.encoder]
layers = [
    { type = "conv2d", out_channels = 4, kernel_size = 4, stride = 2, padding = 1 },
    { type = "relu" },
    { type = "conv2d", out_channels = 8, kernel_size = 4, stride = 2, padding = 1 },
    { type = "relu" },
    { type = "flatten" },
    { type = "linear", out_features = 8 },
]

[model.decoder]
layers = [
    { type = "linear", out_features = 72 },
    { type = "relu" },
    { type = "reshape", shape = [8, 3, 3] },
    { type = "conv_transpose2d", out_channels = 4, kernel_size = 4, stride = 2, padding = 1 },
    { type = "relu" },
    { type = "conv_transpose2d", out_channels = 1, kernel_size = 4, stride = 2, padding = 1 },
]

[optimizers.model]
type = "adam"
lr = 3e-3

[[metrics]]
type = "reconstruction_error"

[[metrics]]
type = "elbo"
batch_size = 32

[training]
steps = 40
batch_size = 32
log_every = 20
eval_every = 40
"#;

/// A dense VQ-VAE on 16-dimensional data: 4 code vectors of 2 values, a codebook of 16 codes.
const VQ_VAE: &str = r#"
name = "metrics_vq_vae"
seed = 0
plugins = []

[data]
type = "latent_manifold"
dim = 16
latent_dim = 3
train_samples = 256
test_samples = 100

[model]
type = "vq_vae"
code_dim = 2
codebook_size = 16
ema = { decay = 0.9, epsilon = 1e-5 }
dead_code_reset = { after_steps = 10 }
loss = { type = "mse" }

[model.encoder]
layers = [
    { type = "linear", out_features = 32 },
    { type = "relu" },
    { type = "linear", out_features = 8 },
]

[model.decoder]
layers = [
    { type = "linear", out_features = 32 },
    { type = "relu" },
    { type = "linear", out_features = 16 },
    { type = "sigmoid" },
]

[optimizers.model]
type = "adam"
lr = 3e-3

[[metrics]]
type = "codebook_usage"
batch_size = 32

[[metrics]]
type = "reconstruction_error"

[training]
steps = 60
batch_size = 32
log_every = 20
eval_every = 60
"#;

#[test]
fn vae_reports_psnr_ssim_and_the_elbo() {
    let summary = train("metrics_conv_vae", CONV_VAE);
    let mse = final_metric(&summary, "reconstruction_mse");
    let psnr = final_metric(&summary, "reconstruction_psnr");
    let ssim = final_metric(&summary, "reconstruction_ssim");
    assert!(mse > 0.0 && mse < 1.0, "{mse}");
    // The data lie in [0, 1] (L = 1): every sample's PSNR is 10 log10(1 / mse_i) > 0 and, by
    // Jensen, the mean PSNR is at least the PSNR of the mean MSE.
    assert!(
        psnr >= 10.0 * (1.0 / mse).log10() - 1e-9 && psnr < 100.0,
        "psnr {psnr}, mse {mse}"
    );
    assert!(ssim > 0.0 && ssim <= 1.0, "ssim {ssim}");
    let nelbo = final_metric(&summary, "negative_elbo");
    let recon = final_metric(&summary, "reconstruction_nats");
    let kl = final_metric(&summary, "kl_nats");
    let bpd = final_metric(&summary, "bits_per_dim");
    assert!(kl >= 0.0 && recon > 0.0, "recon {recon}, kl {kl}");
    assert!(
        (nelbo - (recon + kl)).abs() < 1e-6 * nelbo.abs().max(1.0),
        "{nelbo} vs {recon} + {kl}"
    );
    assert!(bpd > 0.0, "{bpd}");
    eprintln!("conv VAE: mse {mse:.5}, psnr {psnr:.2} dB, ssim {ssim:.4}, -elbo {nelbo:.2} nats ({recon:.2} + {kl:.2}), {bpd:.4} bits/dim");
    assert!(
        (bpd - nelbo / (144.0 * std::f64::consts::LN_2)).abs() < 1e-9,
        "{bpd} vs {nelbo}"
    );
}

#[test]
fn vq_vae_reports_split_wide_codebook_usage() {
    let summary = train("metrics_vq_vae", VQ_VAE);
    let perplexity = final_metric(&summary, "codebook_perplexity");
    let used = final_metric(&summary, "codes_used");
    let assignments = final_metric(&summary, "code_assignments");
    // 100 test samples of 4 code vectors each; at most 16 codes.
    assert_eq!(assignments, 400.0);
    assert!((1.0..=16.0).contains(&used) && used.fract() == 0.0, "{used}");
    assert!(
        perplexity >= 1.0 && perplexity <= used + 1e-9,
        "perplexity {perplexity}, used {used}"
    );
    let psnr = final_metric(&summary, "reconstruction_psnr");
    assert!(psnr > 0.0 && psnr < 100.0, "{psnr}");
    eprintln!("VQ-VAE: perplexity {perplexity:.2}, {used} codes used, {assignments} assignments, psnr {psnr:.2} dB");
    assert!(
        summary["final_metrics"].get("reconstruction_ssim").is_none(),
        "flat data report no SSIM: {summary:#}"
    );
}
