//! `latent_manifold`: pixel-like data with low-dimensional structure, for autoencoders.
//!
//! Each sample is `x = s(W₂ᵀ tanh(W₁ᵀ z) + b₂)` with a latent code `z ~ N(0, I_k)`, where
//! `W₁ ∈ R^{k×h}`, `W₂ ∈ R^{h×d}` and `b₂ ∈ R^d` form a fixed random two-layer network drawn from the
//! seed, and `s` is the logistic sigmoid (`scale = "unit"`, values in (0, 1)) or `2σ(v) - 1 = tanh(v/2)`
//! (`scale = "symmetric"`, values in (-1, 1)). The data lies on a smooth k-dimensional manifold in
//! R^d: an autoencoder with a code of about k units can reconstruct it almost exactly, one with a
//! much smaller code cannot.
//!
//! Entries are `W₁ ~ N(0, gain²/k)` (so each hidden pre-activation has standard deviation `gain`),
//! `W₂ ~ N(0, 4 gain²/h)` and `b₂ ~ N(0, 1)` (pixel means spread over the sigmoid's range). `gain`
//! sets how curved the manifold is: near 0 the map is almost linear (exactly rank k); at the default
//! of 0.5 the top k principal components hold about 97-98% of the variance (checked in the tests:
//! > 95%) while the nonlinearity remains visible.

use nash_core::data::{DataSource, DataSourceConfig};
use nash_core::error::{Error, Result};
use nash_core::rand::SeedableRng;
use nash_core::rand_distr::{Distribution, StandardNormal};
use nash_core::tensor::{FeatureShape, Rng};
use serde::{Deserialize, Serialize};

use crate::table::{check_positive, check_sizes, InMemoryData, Table};
use crate::Scale;

/// Data on a k-dimensional nonlinear manifold in `dim` features (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LatentManifoldConfig {
    /// Features per sample.
    pub dim: usize,
    /// Dimension k of the latent code (the manifold's dimension).
    pub latent_dim: usize,
    /// Hidden units of the generating network.
    pub hidden: usize,
    /// Pre-activation scale of the generating network: how curved the manifold is.
    pub gain: f32,
    /// `unit` for values in [0, 1], `symmetric` for [-1, 1].
    pub scale: Scale,
    /// Optional `[channels, height, width]` to present samples as images (product must equal `dim`).
    pub image_shape: Option<[usize; 3]>,
    /// Training samples.
    pub train_samples: usize,
    /// Test samples.
    pub test_samples: usize,
}

impl Default for LatentManifoldConfig {
    fn default() -> Self {
        LatentManifoldConfig {
            dim: 784,
            latent_dim: 8,
            hidden: 64,
            gain: 0.5,
            scale: Scale::Unit,
            image_shape: None,
            train_samples: 10_000,
            test_samples: 1_000,
        }
    }
}

/// The fixed generating network.
struct Generator {
    latent: usize,
    hidden: usize,
    dim: usize,
    /// `[latent, hidden]`, row-major.
    w1: Vec<f32>,
    /// `[hidden, dim]`, row-major.
    w2: Vec<f32>,
    /// `[dim]`.
    b2: Vec<f32>,
    scale: Scale,
}

fn normal_vec(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let e: f32 = StandardNormal.sample(rng);
            std * e
        })
        .collect()
}

impl Generator {
    fn new(cfg: &LatentManifoldConfig, rng: &mut Rng) -> Self {
        let (k, h, d) = (cfg.latent_dim, cfg.hidden, cfg.dim);
        Generator {
            latent: k,
            hidden: h,
            dim: d,
            w1: normal_vec(rng, k * h, cfg.gain / (k as f32).sqrt()),
            w2: normal_vec(rng, h * d, 2.0 * cfg.gain / (h as f32).sqrt()),
            b2: normal_vec(rng, d, 1.0),
            scale: cfg.scale,
        }
    }

    /// `n` samples from fresh latent codes drawn from `rng`.
    fn sample(&self, n: usize, rng: &mut Rng) -> Table {
        let mut values = Vec::with_capacity(n * self.dim);
        let mut h = vec![0.0f32; self.hidden];
        let mut x = vec![0.0f32; self.dim];
        for _ in 0..n {
            let z = normal_vec(rng, self.latent, 1.0);
            h.iter_mut().for_each(|v| *v = 0.0);
            for (zi, row) in z.iter().zip(self.w1.chunks(self.hidden)) {
                h.iter_mut().zip(row).for_each(|(hv, w)| *hv += zi * w);
            }
            h.iter_mut().for_each(|v| *v = v.tanh());
            x.copy_from_slice(&self.b2);
            for (hi, row) in h.iter().zip(self.w2.chunks(self.dim)) {
                x.iter_mut().zip(row).for_each(|(xv, w)| *xv += hi * w);
            }
            values.extend(x.iter().map(|&v| match self.scale {
                Scale::Unit => 1.0 / (1.0 + (-v).exp()),
                Scale::Symmetric => (0.5 * v).tanh(),
            }));
        }
        Table { values, labels: None }
    }
}

#[typetag::serde(name = "latent_manifold")]
impl DataSourceConfig for LatentManifoldConfig {
    fn build(&self, seed: u64) -> Result<Box<dyn DataSource>> {
        for (path, v) in [
            ("data.dim", self.dim),
            ("data.latent_dim", self.latent_dim),
            ("data.hidden", self.hidden),
        ] {
            if v == 0 {
                return Err(Error::config(path, "must be at least 1"));
            }
        }
        if self.latent_dim > self.dim {
            return Err(Error::config(
                "data.latent_dim",
                format!(
                    "a {}-dimensional code cannot be compressed into {} features; use at most `dim`",
                    self.latent_dim, self.dim
                ),
            ));
        }
        check_positive("data.gain", self.gain)?;
        let shape = match self.image_shape {
            None => FeatureShape::Flat(self.dim),
            Some([c, h, w]) if c * h * w == self.dim && c * h * w > 0 => FeatureShape::image(c, h, w),
            Some(s) => {
                return Err(Error::config(
                    "data.image_shape",
                    format!(
                        "{s:?} holds {} values but dim is {}",
                        s.iter().product::<usize>(),
                        self.dim
                    ),
                ))
            }
        };
        check_sizes(self.train_samples, self.test_samples, self.dim)?;
        // The network comes from its own stream, so that it does not depend on the sample counts.
        let mut net_rng = Rng::seed_from_u64(seed);
        net_rng.set_stream(1);
        let generator = Generator::new(self, &mut net_rng);
        let mut rng = Rng::seed_from_u64(seed);
        let train = generator.sample(self.train_samples, &mut rng);
        let test = generator.sample(self.test_samples, &mut rng);
        let description = format!(
            "latent_manifold: {}-dimensional codes through a random {}-{}-{} tanh/sigmoid network into {shape} {:?}-scaled features, {} train / {} test samples",
            self.latent_dim, self.latent_dim, self.hidden, self.dim, self.scale, self.train_samples, self.test_samples
        );
        Ok(Box::new(InMemoryData::new(
            description,
            shape,
            Some(self.scale.range()),
            train,
            test,
            None,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vectors::RandomVectorsConfig;
    use nash_core::data::Split;
    use nash_core::tensor::Device;

    /// Rows of the train split as f64.
    fn rows(data: &dyn DataSource, n: usize) -> (Vec<f64>, usize) {
        let idx: Vec<usize> = (0..n).collect();
        let b = data.batch(Split::Train, &idx, &Device::default()).unwrap();
        (b.inputs.as_vec().into_iter().map(f64::from).collect(), b.shape.numel())
    }

    /// Fractions of the total variance held by the top `ks` principal components of `n` rows of
    /// `d` features. Eigenvalues of the centered Gram matrix `G = X Xᵀ` (equal to the nonzero ones
    /// of the scatter matrix) by orthogonal (subspace) iteration; by Ky Fan's theorem trace(QᵀGQ)
    /// of any orthonormal Q is at most the top-q sum, and it converges to it.
    fn pca_energy(x: &[f64], n: usize, d: usize, ks: &[usize]) -> Vec<f64> {
        let mut x = x.to_vec();
        for j in 0..d {
            let mean = (0..n).map(|i| x[i * d + j]).sum::<f64>() / n as f64;
            (0..n).for_each(|i| x[i * d + j] -= mean);
        }
        let mut g = vec![0.0; n * n];
        for i in 0..n {
            for j in i..n {
                let v: f64 = x[i * d..(i + 1) * d]
                    .iter()
                    .zip(&x[j * d..(j + 1) * d])
                    .map(|(a, b)| a * b)
                    .sum();
                g[i * n + j] = v;
                g[j * n + i] = v;
            }
        }
        let total: f64 = (0..n).map(|i| g[i * n + i]).sum();
        let q = ks.iter().copied().max().unwrap() + 4;
        // Columns of Q stored as rows of `cols`, started from a fixed pseudo-random matrix.
        let mut cols: Vec<Vec<f64>> = (0..q)
            .map(|c| {
                (0..n)
                    .map(|i| (((i * 7919 + c * 104_729) % 1000) as f64 / 500.0) - 1.0)
                    .collect()
            })
            .collect();
        let orthonormalize = |cols: &mut Vec<Vec<f64>>| {
            for c in 0..cols.len() {
                for p in 0..c {
                    let dot: f64 = cols[c].iter().zip(&cols[p]).map(|(a, b)| a * b).sum();
                    let prev = cols[p].clone();
                    cols[c].iter_mut().zip(&prev).for_each(|(a, b)| *a -= dot * b);
                }
                let norm = cols[c].iter().map(|a| a * a).sum::<f64>().sqrt();
                cols[c].iter_mut().for_each(|a| *a /= norm);
            }
        };
        let mul = |v: &[f64]| -> Vec<f64> {
            (0..n)
                .map(|i| g[i * n..(i + 1) * n].iter().zip(v).map(|(a, b)| a * b).sum())
                .collect()
        };
        orthonormalize(&mut cols);
        for _ in 0..150 {
            cols = cols.iter().map(|c| mul(c)).collect();
            orthonormalize(&mut cols);
        }
        // Rayleigh quotients of the converged (ordered) basis approximate the top eigenvalues.
        let eig: Vec<f64> = cols
            .iter()
            .map(|c| c.iter().zip(mul(c)).map(|(a, b)| a * b).sum())
            .collect();
        ks.iter().map(|&k| eig[..k].iter().sum::<f64>() / total).collect()
    }

    #[test]
    fn latent_manifold_has_effective_rank_k() {
        let cfg = LatentManifoldConfig {
            train_samples: 300,
            test_samples: 10,
            ..Default::default()
        };
        let data = cfg.build(1).unwrap();
        assert_eq!(data.info().value_range, (0.0, 1.0));
        let (x, d) = rows(data.as_ref(), 300);
        assert_eq!(d, 784);
        assert!(x.iter().all(|&v| (0.0..=1.0).contains(&v)));
        let spread = x.iter().map(|v| (v - 0.5).abs()).sum::<f64>() / x.len() as f64;
        assert!(
            spread > 0.1,
            "pixel values should spread over [0, 1], mean |x - 0.5| = {spread}"
        );
        let e = pca_energy(&x, 300, d, &[4, 8]);
        assert!(e[1] > 0.95, "top-8 components hold {:.4} of the variance", e[1]);
        assert!(
            e[0] < 0.90,
            "top-4 components hold {:.4}: the manifold should need all 8",
            e[0]
        );
        // Unstructured data of the same size fails the same check.
        let noise = RandomVectorsConfig {
            dim: 784,
            train_samples: 300,
            test_samples: 10,
            ..Default::default()
        };
        let (y, _) = rows(noise.build(1).unwrap().as_ref(), 300);
        let e = pca_energy(&y, 300, 784, &[8]);
        assert!(e[0] < 0.2, "random vectors: top-8 hold {:.4}", e[0]);
    }

    #[test]
    fn symmetric_scale_image_shape_and_seeds() {
        let cfg = LatentManifoldConfig {
            dim: 16,
            latent_dim: 2,
            hidden: 8,
            scale: Scale::Symmetric,
            image_shape: Some([1, 4, 4]),
            train_samples: 50,
            test_samples: 5,
            ..Default::default()
        };
        let data = cfg.build(3).unwrap();
        let info = data.info();
        assert_eq!(info.value_range, (-1.0, 1.0));
        assert_eq!(info.sample_shape, FeatureShape::image(1, 4, 4));
        let (x, _) = rows(data.as_ref(), 50);
        assert!(x.iter().all(|&v| (-1.0..=1.0).contains(&v)));
        assert!(x.iter().any(|&v| v < 0.0) && x.iter().any(|&v| v > 0.0));
        assert_eq!(x, rows(cfg.build(3).unwrap().as_ref(), 50).0);
        assert_ne!(x, rows(cfg.build(4).unwrap().as_ref(), 50).0);
        let bad = LatentManifoldConfig {
            image_shape: Some([1, 4, 5]),
            ..cfg.clone()
        };
        assert!(matches!(bad.build(0), Err(Error::Config { path, .. }) if path == "data.image_shape"));
        let bad = LatentManifoldConfig { latent_dim: 17, ..cfg };
        assert!(matches!(bad.build(0), Err(Error::Config { path, .. }) if path == "data.latent_dim"));
    }
}
