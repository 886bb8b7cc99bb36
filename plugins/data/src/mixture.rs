//! Gaussian mixtures with known modes: the PacGAN `ring` and `grid` benchmarks and general
//! `gaussian_mixture` blobs. Each sample picks a mode uniformly at random and adds isotropic
//! N(0, σ²) noise; its label is the mode index. The source exposes its
//! [`Mixture`] so that mode-coverage metrics know the modes.

use nash_core::data::{DataSource, DataSourceConfig, Mixture};
use nash_core::error::{Error, Result};
use nash_core::rand::{Rng as _, SeedableRng};
use nash_core::rand_distr::{Distribution, StandardNormal};
use nash_core::tensor::{FeatureShape, Rng};
use serde::{Deserialize, Serialize};

use crate::table::{check_positive, check_sizes, InMemoryData, Table};

/// Draws `n` labelled samples from the mixture.
fn sample_mixture(mixture: &Mixture, n: usize, rng: &mut Rng) -> Table {
    let dim = mixture.centers[0].len();
    let mut values = Vec::with_capacity(n * dim);
    let mut labels = Vec::with_capacity(n);
    for _ in 0..n {
        let k = rng.gen_range(0..mixture.centers.len());
        labels.push(k);
        for &c in &mixture.centers[k] {
            let e: f32 = StandardNormal.sample(rng);
            values.push(c + mixture.sigma * e);
        }
    }
    Table {
        values,
        labels: Some(labels),
    }
}

/// Materializes a mixture as train and test splits, drawn in that order from `seed`.
fn build_mixture(
    description: String,
    mixture: Mixture,
    train_samples: usize,
    test_samples: usize,
    seed: u64,
) -> Result<Box<dyn DataSource>> {
    let dim = mixture.centers[0].len();
    check_sizes(train_samples, test_samples, dim)?;
    let mut rng = Rng::seed_from_u64(seed);
    let train = sample_mixture(&mixture, train_samples, &mut rng);
    let test = sample_mixture(&mixture, test_samples, &mut rng);
    Ok(Box::new(InMemoryData::new(
        description,
        FeatureShape::Flat(dim),
        None,
        train,
        test,
        Some(mixture),
    )?))
}

/// The PacGAN 2D ring: `modes` Gaussians evenly spaced on a circle of `radius`, mode `k` at angle
/// 2πk/modes. Defaults follow the PacGAN benchmark (8 modes, radius 1, σ = 0.01, 100,000 training
/// samples).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RingConfig {
    /// Number of modes.
    pub modes: usize,
    /// Radius of the circle.
    pub radius: f32,
    /// Standard deviation of each mode.
    pub sigma: f32,
    /// Training samples.
    pub train_samples: usize,
    /// Test samples.
    pub test_samples: usize,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            modes: 8,
            radius: 1.0,
            sigma: 0.01,
            train_samples: 100_000,
            test_samples: 10_000,
        }
    }
}

impl RingConfig {
    /// The ring's modes and σ, after checking the config.
    pub fn mixture(&self) -> Result<Mixture> {
        if self.modes == 0 {
            return Err(Error::config("data.modes", "must be at least 1"));
        }
        check_positive("data.radius", self.radius)?;
        check_positive("data.sigma", self.sigma)?;
        let centers = (0..self.modes)
            .map(|k| {
                let angle = 2.0 * std::f64::consts::PI * k as f64 / self.modes as f64;
                vec![
                    (self.radius as f64 * angle.cos()) as f32,
                    (self.radius as f64 * angle.sin()) as f32,
                ]
            })
            .collect();
        Ok(Mixture {
            centers,
            sigma: self.sigma,
        })
    }
}

#[typetag::serde(name = "ring")]
impl DataSourceConfig for RingConfig {
    fn build(&self, seed: u64) -> Result<Box<dyn DataSource>> {
        let mixture = self.mixture()?;
        let description = format!(
            "ring: {} Gaussian modes on a circle of radius {}, sigma {}, {} train / {} test samples",
            self.modes, self.radius, self.sigma, self.train_samples, self.test_samples
        );
        build_mixture(description, mixture, self.train_samples, self.test_samples, seed)
    }
}

/// The PacGAN 2D grid: `per_side`² Gaussians on a square grid with `spacing` between neighbours,
/// centered on the origin. Defaults follow the PacGAN benchmark (5 x 5 modes at {-4,-2,0,2,4}²,
/// σ = 0.05, 100,000 training samples). Mode `k` sits at row `k / per_side`, column `k % per_side`
/// (x from the column, y from the row).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GridConfig {
    /// Modes along each axis.
    pub per_side: usize,
    /// Distance between neighbouring modes.
    pub spacing: f32,
    /// Standard deviation of each mode.
    pub sigma: f32,
    /// Training samples.
    pub train_samples: usize,
    /// Test samples.
    pub test_samples: usize,
}

impl Default for GridConfig {
    fn default() -> Self {
        GridConfig {
            per_side: 5,
            spacing: 2.0,
            sigma: 0.05,
            train_samples: 100_000,
            test_samples: 10_000,
        }
    }
}

impl GridConfig {
    /// The grid's modes and σ, after checking the config.
    pub fn mixture(&self) -> Result<Mixture> {
        if self.per_side == 0 {
            return Err(Error::config("data.per_side", "must be at least 1"));
        }
        check_positive("data.spacing", self.spacing)?;
        check_positive("data.sigma", self.sigma)?;
        let offset = (self.per_side - 1) as f32 / 2.0;
        let coord = |i: usize| (i as f32 - offset) * self.spacing;
        let centers = (0..self.per_side * self.per_side)
            .map(|k| vec![coord(k % self.per_side), coord(k / self.per_side)])
            .collect();
        Ok(Mixture {
            centers,
            sigma: self.sigma,
        })
    }
}

#[typetag::serde(name = "grid")]
impl DataSourceConfig for GridConfig {
    fn build(&self, seed: u64) -> Result<Box<dyn DataSource>> {
        let mixture = self.mixture()?;
        let description = format!(
            "grid: {n}x{n} Gaussian modes spaced {}, sigma {}, {} train / {} test samples",
            self.spacing,
            self.sigma,
            self.train_samples,
            self.test_samples,
            n = self.per_side
        );
        build_mixture(description, mixture, self.train_samples, self.test_samples, seed)
    }
}

/// Gaussian blobs with a common σ. Either give `centers` explicitly (they then fix the number of
/// modes and the dimension, and `modes`, `dim` and `spread` are ignored), or let `modes` centers of
/// `dim` features be drawn uniformly from [-spread, spread]^dim from the seed (like scikit-learn's
/// `make_blobs` with `center_box = (-spread, spread)`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GaussianMixtureConfig {
    /// Explicit mode centers, all of the same length.
    pub centers: Option<Vec<Vec<f32>>>,
    /// Number of random centers (without `centers`).
    pub modes: usize,
    /// Dimension of random centers (without `centers`).
    pub dim: usize,
    /// Half-width of the box random centers are drawn from (without `centers`).
    pub spread: f32,
    /// Standard deviation of each mode.
    pub sigma: f32,
    /// Training samples.
    pub train_samples: usize,
    /// Test samples.
    pub test_samples: usize,
}

impl Default for GaussianMixtureConfig {
    fn default() -> Self {
        GaussianMixtureConfig {
            centers: None,
            modes: 8,
            dim: 2,
            spread: 10.0,
            sigma: 1.0,
            train_samples: 10_000,
            test_samples: 1_000,
        }
    }
}

impl GaussianMixtureConfig {
    /// The mixture's modes (drawing random centers from `rng` if none are given) and σ.
    pub fn mixture(&self, rng: &mut Rng) -> Result<Mixture> {
        check_positive("data.sigma", self.sigma)?;
        let centers = match &self.centers {
            Some(centers) => {
                let Some(first) = centers.first() else {
                    return Err(Error::config("data.centers", "must list at least one center"));
                };
                let dim = first.len();
                if dim == 0 {
                    return Err(Error::config(
                        "data.centers[0]",
                        "a center needs at least one coordinate",
                    ));
                }
                for (i, c) in centers.iter().enumerate() {
                    if c.len() != dim {
                        return Err(Error::config(
                            format!("data.centers[{i}]"),
                            format!(
                                "has {} coordinates but centers[0] has {dim}; all must be equal",
                                c.len()
                            ),
                        ));
                    }
                    if let Some(v) = c.iter().find(|v| !v.is_finite()) {
                        return Err(Error::config(
                            format!("data.centers[{i}]"),
                            format!("coordinates must be finite, got {v}"),
                        ));
                    }
                }
                centers.clone()
            }
            None => {
                if self.modes == 0 {
                    return Err(Error::config("data.modes", "must be at least 1"));
                }
                if self.dim == 0 {
                    return Err(Error::config("data.dim", "must be at least 1"));
                }
                check_positive("data.spread", self.spread)?;
                (0..self.modes)
                    .map(|_| {
                        (0..self.dim)
                            .map(|_| rng.gen_range(-self.spread..=self.spread))
                            .collect()
                    })
                    .collect()
            }
        };
        Ok(Mixture {
            centers,
            sigma: self.sigma,
        })
    }
}

#[typetag::serde(name = "gaussian_mixture")]
impl DataSourceConfig for GaussianMixtureConfig {
    fn build(&self, seed: u64) -> Result<Box<dyn DataSource>> {
        // Centers come from their own stream so that the samples do not shift when only the
        // number of samples changes.
        let mut center_rng = Rng::seed_from_u64(seed);
        center_rng.set_stream(1);
        let mixture = self.mixture(&mut center_rng)?;
        let description = format!(
            "gaussian_mixture: {} modes in {} dimensions, sigma {}, {} train / {} test samples",
            mixture.centers.len(),
            mixture.centers[0].len(),
            self.sigma,
            self.train_samples,
            self.test_samples
        );
        build_mixture(description, mixture, self.train_samples, self.test_samples, seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nash_core::data::Split;
    use nash_core::tensor::Device;

    fn all_rows(data: &dyn DataSource, split: Split) -> (Vec<f32>, Vec<usize>) {
        let idx: Vec<usize> = (0..data.len(split)).collect();
        let b = data.batch(split, &idx, &Device::default()).unwrap();
        (b.inputs.as_vec(), b.labels.unwrap())
    }

    fn small_ring() -> RingConfig {
        RingConfig {
            train_samples: 2_000,
            test_samples: 300,
            ..RingConfig::default()
        }
    }

    #[test]
    fn ring_samples_lie_near_their_modes_and_cover_all_eight() {
        let cfg = small_ring();
        let data = cfg.build(7).unwrap();
        let m = data.mixture().unwrap().clone();
        assert_eq!(m.centers.len(), 8);
        assert_eq!(m.sigma, 0.01);
        // Mode 2 sits at angle pi/2: (0, 1).
        assert!(m.centers[2][0].abs() < 1e-6 && (m.centers[2][1] - 1.0).abs() < 1e-6);
        assert_eq!(data.len(Split::Train), 2_000);
        assert_eq!(data.len(Split::Test), 300);
        let (x, labels) = all_rows(data.as_ref(), Split::Train);
        let mut seen = [0usize; 8];
        for (row, &k) in x.chunks(2).zip(&labels) {
            seen[k] += 1;
            let d = ((row[0] - m.centers[k][0]).powi(2) + (row[1] - m.centers[k][1]).powi(2)).sqrt();
            // Radius of a 2D Gaussian: P(r > 5 sigma) = exp(-12.5) ~ 4e-6 per sample.
            assert!(d < 5.0 * m.sigma, "sample {row:?} is {d} from mode {k}");
        }
        assert!(seen.iter().all(|&c| c > 150), "every mode present: {seen:?}");
        let info = data.info();
        assert_eq!(info.sample_shape, FeatureShape::Flat(2));
        assert_eq!(info.num_classes, Some(8));
        let (lo, hi) = info.value_range;
        assert!(lo < -0.99 && lo > -1.06 && hi > 0.99 && hi < 1.06, "{lo} {hi}");
    }

    #[test]
    fn grid_has_25_modes_at_the_pacgan_positions() {
        let cfg = GridConfig {
            train_samples: 2_000,
            test_samples: 100,
            ..GridConfig::default()
        };
        let data = cfg.build(1).unwrap();
        let m = data.mixture().unwrap();
        assert_eq!(m.sigma, 0.05);
        assert_eq!(m.centers.len(), 25);
        assert_eq!(m.centers[0], vec![-4.0, -4.0]);
        assert_eq!(m.centers[7], vec![0.0, -2.0]);
        assert_eq!(m.centers[24], vec![4.0, 4.0]);
        let (x, labels) = all_rows(data.as_ref(), Split::Train);
        let mut seen = [false; 25];
        for (row, &k) in x.chunks(2).zip(&labels) {
            seen[k] = true;
            let d = ((row[0] - m.centers[k][0]).powi(2) + (row[1] - m.centers[k][1]).powi(2)).sqrt();
            assert!(d < 5.0 * m.sigma);
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn same_seed_same_data_other_seed_other_data() {
        let cfg = small_ring();
        let a = all_rows(cfg.build(3).unwrap().as_ref(), Split::Test);
        let b = all_rows(cfg.build(3).unwrap().as_ref(), Split::Test);
        let c = all_rows(cfg.build(4).unwrap().as_ref(), Split::Test);
        assert_eq!(a, b);
        assert_ne!(a.0, c.0);
        // Train and test are different draws.
        let train = all_rows(cfg.build(3).unwrap().as_ref(), Split::Train);
        assert_ne!(train.0[..600], a.0[..]);
    }

    #[test]
    fn batch_returns_the_requested_rows_and_labels() {
        let data = small_ring().build(5).unwrap();
        let (x, labels) = all_rows(data.as_ref(), Split::Train);
        let b = data.batch(Split::Train, &[10, 3, 10], &Device::default()).unwrap();
        assert_eq!(b.len(), 3);
        assert_eq!(b.inputs.as_vec(), [&x[20..22], &x[6..8], &x[20..22]].concat());
        assert_eq!(b.labels.unwrap(), vec![labels[10], labels[3], labels[10]]);
        let err = data.batch(Split::Test, &[300], &Device::default()).unwrap_err();
        assert!(err.to_string().contains("below 300"), "{err}");
    }

    #[test]
    fn blobs_from_explicit_or_random_centers() {
        let cfg = GaussianMixtureConfig {
            centers: Some(vec![vec![0.0, 0.0, 0.0], vec![5.0, 5.0, 5.0]]),
            sigma: 0.1,
            train_samples: 500,
            test_samples: 50,
            ..Default::default()
        };
        let data = cfg.build(0).unwrap();
        assert_eq!(data.info().sample_shape, FeatureShape::Flat(3));
        assert_eq!(data.mixture().unwrap().centers.len(), 2);
        let (x, labels) = all_rows(data.as_ref(), Split::Train);
        for (row, &k) in x.chunks(3).zip(&labels) {
            assert!(row.iter().all(|v| (v - 5.0 * k as f32).abs() < 0.6));
        }
        let random = GaussianMixtureConfig {
            modes: 4,
            dim: 5,
            spread: 3.0,
            train_samples: 100,
            test_samples: 10,
            ..Default::default()
        };
        let a = random.build(9).unwrap();
        let m = a.mixture().unwrap();
        assert_eq!((m.centers.len(), m.centers[0].len()), (4, 5));
        assert!(m.centers.iter().flatten().all(|v| v.abs() <= 3.0));
        assert_eq!(m, random.build(9).unwrap().mixture().unwrap());
        assert_ne!(m, random.build(10).unwrap().mixture().unwrap());
    }

    #[test]
    fn bad_configs_are_refused_with_their_path() {
        let path = |r: Result<Box<dyn DataSource>>| match r {
            Err(Error::Config { path, .. }) => path,
            other => panic!("expected a config error, got {:?}", other.map(|d| d.describe())),
        };
        let ring = |f: fn(&mut RingConfig)| {
            let mut c = small_ring();
            f(&mut c);
            c.build(0)
        };
        assert_eq!(path(ring(|c| c.train_samples = 0)), "data.train_samples");
        assert_eq!(path(ring(|c| c.test_samples = 0)), "data.test_samples");
        assert_eq!(path(ring(|c| c.sigma = 0.0)), "data.sigma");
        assert_eq!(path(ring(|c| c.sigma = f32::NAN)), "data.sigma");
        assert_eq!(path(ring(|c| c.radius = -1.0)), "data.radius");
        assert_eq!(path(ring(|c| c.modes = 0)), "data.modes");
        assert_eq!(path(ring(|c| c.test_samples = usize::MAX / 4)), "data.test_samples");
        let grid = GridConfig {
            per_side: 0,
            ..Default::default()
        };
        assert_eq!(path(grid.build(0)), "data.per_side");
        let ragged = GaussianMixtureConfig {
            centers: Some(vec![vec![0.0, 0.0], vec![1.0]]),
            ..Default::default()
        };
        assert_eq!(path(ragged.build(0)), "data.centers[1]");
        let empty = GaussianMixtureConfig {
            centers: Some(vec![]),
            ..Default::default()
        };
        assert_eq!(path(empty.build(0)), "data.centers");
    }

    #[test]
    fn pipeline_tables_deserialize_through_typetag() {
        let cfg: Box<dyn DataSourceConfig> =
            nash_core::serde_json::from_str(r#"{"type": "ring", "sigma": 0.02, "train_samples": 10}"#).unwrap();
        let data = cfg.build(0).unwrap();
        assert_eq!(data.mixture().unwrap().sigma, 0.02);
        assert_eq!(data.len(Split::Train), 10);
        let unknown = nash_core::serde_json::from_str::<Box<dyn DataSourceConfig>>(r#"{"type": "grid", "sigmaa": 1}"#);
        assert!(unknown.unwrap_err().to_string().contains("sigmaa"));
    }
}
