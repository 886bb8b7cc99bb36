//! `sample_quality`: FID, KID, precision and recall, and a classifier score of a model's samples, on
//! the features of a [`FeatureNetwork`] nash trained itself.
//!
//! The *reference* set is the first `samples` rows of `reference_split` (capped at its size); the
//! *candidates* are `samples` rows drawn with [`Model::sample`] (`candidates = "model"`), or the first
//! `samples` rows of another split (`candidates = "train"` or `"test"`: real data scored against real
//! data, the floor a generator can reach). Both go through the feature network (values mapped from the
//! data's value range onto the network's) and are scored by [`crate::scores`]:
//!
//! - `fid`: the Fréchet distance between Gaussians fitted to the two feature sets;
//! - `kid`, `kid_std`: kernel inception distance (unbiased MMD² with the cubic polynomial kernel), mean
//!   and standard deviation over `kid_subsets` random subsets of `kid_subset_size` (capped at the
//!   smaller set's size), drawn with the evaluation's generator;
//! - `precision`, `recall`: the k-nearest-neighbour manifold estimate (Kynkäänniemi et al. 2019,
//!   k = `nearest_k`);
//! - `classifier_score`, `classifier_score_std`: exp(E KL(p(y|x) ‖ p(y))) of the candidates' class
//!   probabilities over `score_splits` splits (the Inception score, on this network's classes).
//!
//! Also reported: `quality_samples` and `reference_samples` (the set sizes). [`Metric::provenance`]
//! gives the network's id, the reference split, the candidates and the sample count. The network is
//! loaded on the first evaluation; the reference features (and, for a split, the candidates'
//! features) are computed once and reused, since they do not change during a run.

use std::collections::BTreeMap;

use nash_core::data::{DataInfo, DataSource, Split};
use nash_core::error::{Error, Result};
use nash_core::metric::{Metric, MetricConfig};
use nash_core::model::{EvalContext, Model};
use nash_core::prelude::HasShape;
use serde::{Deserialize, Serialize};

use crate::feature_network::{FeatureNetwork, DEFAULT_FEATURE_NETWORK};
use crate::scores::{
    classifier_score, frechet_distance, kernel_inception_distance, precision_recall, Features, Gaussian,
};

/// The scores `sample_quality` can compute, by name.
pub const SCORES: [&str; 4] = ["fid", "kid", "precision_recall", "classifier_score"];

const PATH: &str = "metrics.sample_quality";

/// What is scored against the reference set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Candidates {
    /// Samples drawn from the model.
    Model,
    /// Real samples of the train split.
    Train,
    /// Real samples of the test split.
    Test,
}

impl Candidates {
    fn split(self) -> Option<Split> {
        match self {
            Candidates::Model => None,
            Candidates::Train => Some(Split::Train),
            Candidates::Test => Some(Split::Test),
        }
    }
    fn name(self) -> &'static str {
        match self {
            Candidates::Model => "model",
            Candidates::Train => "train",
            Candidates::Test => "test",
        }
    }
}

fn split_name(split: Split) -> &'static str {
    match split {
        Split::Train => "train",
        Split::Test => "test",
    }
}

/// Configuration of [`SampleQuality`] (every field optional).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SampleQualityConfig {
    /// A cached feature network's name, or the path of its folder.
    pub feature_network: String,
    /// Number of candidate samples, and of reference samples (capped at the reference split's size).
    pub samples: usize,
    /// The split of real data the candidates are compared with.
    pub reference_split: Split,
    /// What is scored: the model's samples, or a split of real data (must differ from `reference_split`).
    pub candidates: Candidates,
    /// Samples per sampling and feature-network batch.
    pub batch_size: usize,
    /// Random subsets KID averages over.
    pub kid_subsets: usize,
    /// Samples per KID subset (capped at the smaller set's size).
    pub kid_subset_size: usize,
    /// k of the k-nearest-neighbour manifolds of precision and recall.
    pub nearest_k: usize,
    /// Splits the classifier score is averaged over.
    pub score_splits: usize,
    /// Which scores to compute, from [`SCORES`].
    pub scores: Vec<String>,
}

impl Default for SampleQualityConfig {
    fn default() -> Self {
        SampleQualityConfig {
            feature_network: DEFAULT_FEATURE_NETWORK.into(),
            samples: 10_000,
            reference_split: Split::Test,
            candidates: Candidates::Model,
            batch_size: 500,
            kid_subsets: 100,
            kid_subset_size: 1_000,
            nearest_k: 3,
            score_splits: 10,
            scores: SCORES.iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl SampleQualityConfig {
    fn wants(&self, score: &str) -> bool {
        self.scores.iter().any(|s| s == score)
    }
}

#[typetag::serde(name = "sample_quality")]
impl MetricConfig for SampleQualityConfig {
    fn build(&self) -> Result<Box<dyn Metric>> {
        if self.feature_network.trim().is_empty() {
            return Err(Error::config(
                format!("{PATH}.feature_network"),
                format!("must name a cached feature network (`{DEFAULT_FEATURE_NETWORK}`) or a folder path"),
            ));
        }
        let at_least = |name: &str, value: usize, min: usize| {
            if value < min {
                Err(Error::config(
                    format!("{PATH}.{name}"),
                    format!("must be at least {min}, got {value}"),
                ))
            } else {
                Ok(())
            }
        };
        at_least("samples", self.samples, 2)?;
        at_least("batch_size", self.batch_size, 1)?;
        at_least("kid_subsets", self.kid_subsets, 1)?;
        at_least("kid_subset_size", self.kid_subset_size, 2)?;
        at_least("nearest_k", self.nearest_k, 1)?;
        at_least("score_splits", self.score_splits, 1)?;
        if self.candidates.split() == Some(self.reference_split) {
            return Err(Error::config(
                format!("{PATH}.candidates"),
                format!(
                    "`{}` is also the reference split: real candidates must come from the other split (or use \
                     `model`)",
                    self.candidates.name()
                ),
            ));
        }
        if self.scores.is_empty() {
            return Err(Error::config(
                format!("{PATH}.scores"),
                format!("must name at least one score of: {}", SCORES.join(", ")),
            ));
        }
        for (i, score) in self.scores.iter().enumerate() {
            if !SCORES.contains(&score.as_str()) {
                return Err(Error::config(
                    format!("{PATH}.scores[{i}]"),
                    format!("unknown score `{score}`; valid: {}", SCORES.join(", ")),
                ));
            }
            if self.scores[..i].contains(score) {
                return Err(Error::config(
                    format!("{PATH}.scores[{i}]"),
                    format!("`{score}` is listed twice"),
                ));
            }
        }
        Ok(Box::new(SampleQuality {
            config: self.clone(),
            network: None,
            reference: None,
            real_candidates: None,
        }))
    }
}

/// Features of a set of samples, with where they came from (to reuse them only for the same data).
struct Scored {
    source: String,
    features: Features,
    probabilities: Features,
    gaussian: Option<Gaussian>,
}

/// The sample-quality metric (see the module docs).
pub struct SampleQuality {
    config: SampleQualityConfig,
    network: Option<FeatureNetwork>,
    reference: Option<Scored>,
    real_candidates: Option<Scored>,
}

impl std::fmt::Debug for SampleQuality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SampleQuality")
            .field("config", &self.config)
            .field("network", &self.network)
            .finish_non_exhaustive()
    }
}

/// Features of the first `n` rows of `split`, read `batch_size` rows at a time.
fn split_features(
    network: &mut FeatureNetwork,
    data: &dyn DataSource,
    info: &DataInfo,
    split: Split,
    n: usize,
    batch_size: usize,
    ctx: &mut EvalContext<'_>,
) -> Result<(Features, Features)> {
    let mut parts: Vec<(Features, Features)> = Vec::new();
    for start in (0..n).step_by(batch_size) {
        let idx: Vec<usize> = (start..(start + batch_size).min(n)).collect();
        let batch = data.batch(split, &idx, ctx.device)?;
        parts.push(network.features(&batch.inputs, info, batch_size, ctx)?);
    }
    join(parts)
}

/// Stacks the rows of feature/probability pairs.
fn join(parts: Vec<(Features, Features)>) -> Result<(Features, Features)> {
    let mut parts = parts.into_iter();
    let (mut features, mut probabilities) = parts
        .next()
        .ok_or_else(|| Error::Other("sample_quality: no samples to score".into()))?;
    for (f, p) in parts {
        features = features.concat(&f)?;
        probabilities = probabilities.concat(&p)?;
    }
    Ok((features, probabilities))
}

impl SampleQuality {
    /// The number of samples a set drawn from `split` of `data` will have.
    fn count(&self, data: &dyn DataSource, split: Split) -> Result<usize> {
        let available = data.len(split);
        if available < 2 {
            return Err(Error::unsupported(
                "the `sample_quality` metric",
                format!(
                    "the {} split of `{}` has {available} samples; at least 2 are needed",
                    split_name(split),
                    data.describe()
                ),
            ));
        }
        Ok(self.config.samples.min(available))
    }

    /// Features of the first rows of `split`, computed once per data source.
    fn real(
        &mut self,
        data: &dyn DataSource,
        split: Split,
        candidates: bool,
        ctx: &mut EvalContext<'_>,
    ) -> Result<Scored> {
        let n = self.count(data, split)?;
        let source = format!("{} / {} / {n}", data.describe(), split_name(split));
        let cached = if candidates {
            self.real_candidates.take()
        } else {
            self.reference.take()
        };
        if let Some(scored) = cached.filter(|s| s.source == source) {
            return Ok(scored);
        }
        let info = data.info();
        let network = self.network.as_mut().expect("loaded before use");
        let (features, probabilities) = split_features(network, data, &info, split, n, self.config.batch_size, ctx)?;
        let gaussian = if self.config.wants("fid") {
            Some(Gaussian::fit(&features)?)
        } else {
            None
        };
        Ok(Scored {
            source,
            features,
            probabilities,
            gaussian,
        })
    }

    /// Features of `samples` samples drawn from `model`, `batch_size` at a time.
    fn generated(
        &mut self,
        model: &mut dyn Model,
        info: &DataInfo,
        ctx: &mut EvalContext<'_>,
    ) -> Result<(Features, Features)> {
        let network = self.network.as_mut().expect("loaded before use");
        let (total, batch_size) = (self.config.samples, self.config.batch_size);
        let numel = info.sample_shape.numel();
        let mut parts = Vec::new();
        let mut drawn = 0;
        while drawn < total {
            let n = batch_size.min(total - drawn);
            let samples = model.sample(n, ctx)?.ok_or_else(|| {
                Error::unsupported(
                    "the `sample_quality` metric with `candidates = \"model\"`",
                    format!(
                        "the `{}` model cannot sample; score real data with `candidates = \"train\"` or use a \
                         generative model",
                        model.family()
                    ),
                )
            })?;
            if *samples.shape() != (n, numel) {
                return Err(Error::shape(
                    "sample_quality: the model's samples",
                    format!("({n}, {numel}): {n} samples of shape {}", info.sample_shape),
                    format!("{:?}", samples.shape()),
                ));
            }
            parts.push(network.features(&samples, info, batch_size, ctx)?);
            drawn += n;
        }
        join(parts)
    }
}

impl Metric for SampleQuality {
    fn name(&self) -> &str {
        "sample_quality"
    }

    fn evaluate(
        &mut self,
        model: &mut dyn Model,
        data: &dyn DataSource,
        ctx: &mut EvalContext<'_>,
    ) -> Result<BTreeMap<String, f64>> {
        if self.network.is_none() {
            self.network = Some(FeatureNetwork::load(&self.config.feature_network, ctx.device)?);
        }
        let info = data.info();
        self.network.as_ref().expect("just loaded").check_input(&info)?;

        let reference = self.real(data, self.config.reference_split, false, ctx)?;
        let reference = self.reference.insert(reference);
        let reference_samples = reference.features.rows();
        let mut fresh = None;
        let candidates = match self.config.candidates.split() {
            Some(split) => {
                let scored = self.real(data, split, true, ctx)?;
                &*self.real_candidates.insert(scored)
            }
            None => {
                let (features, probabilities) = self.generated(model, &info, ctx)?;
                &*fresh.insert(Scored {
                    source: String::new(),
                    features,
                    probabilities,
                    gaussian: None,
                })
            }
        };
        let reference = self.reference.as_ref().expect("cached above");
        let quality_samples = candidates.features.rows();

        let cfg = &self.config;
        let mut out = BTreeMap::new();
        if cfg.wants("fid") {
            let real = reference.gaussian.as_ref().expect("fitted when fid is wanted");
            let fake = match &candidates.gaussian {
                Some(g) => frechet_distance(real, g)?,
                None => frechet_distance(real, &Gaussian::fit(&candidates.features)?)?,
            };
            out.insert("fid".into(), fake);
        }
        if cfg.wants("kid") {
            let size = cfg.kid_subset_size.min(reference_samples).min(quality_samples);
            let (kid, kid_std) = kernel_inception_distance(
                &reference.features,
                &candidates.features,
                cfg.kid_subsets,
                size,
                ctx.rng,
            )?;
            out.insert("kid".into(), kid);
            out.insert("kid_std".into(), kid_std);
        }
        if cfg.wants("precision_recall") {
            let smaller = reference_samples.min(quality_samples);
            if smaller <= cfg.nearest_k {
                return Err(Error::config(
                    format!("{PATH}.nearest_k"),
                    format!(
                        "{} needs more than {} samples in each set; the smaller set has {smaller}",
                        cfg.nearest_k, cfg.nearest_k
                    ),
                ));
            }
            let (precision, recall) = precision_recall(&reference.features, &candidates.features, cfg.nearest_k)?;
            out.insert("precision".into(), precision);
            out.insert("recall".into(), recall);
        }
        if cfg.wants("classifier_score") {
            if quality_samples < cfg.score_splits {
                return Err(Error::config(
                    format!("{PATH}.score_splits"),
                    format!(
                        "{} splits need at least as many samples; there are {quality_samples}",
                        cfg.score_splits
                    ),
                ));
            }
            let (score, std) = classifier_score(&candidates.probabilities, cfg.score_splits)?;
            out.insert("classifier_score".into(), score);
            out.insert("classifier_score_std".into(), std);
        }
        out.insert("quality_samples".into(), quality_samples as f64);
        out.insert("reference_samples".into(), reference_samples as f64);
        Ok(out)
    }

    fn provenance(&self) -> BTreeMap<String, String> {
        let network = match &self.network {
            Some(n) => n.id().to_string(),
            None => self.config.feature_network.clone(),
        };
        BTreeMap::from([
            ("feature_network".to_string(), network),
            (
                "reference_split".to_string(),
                split_name(self.config.reference_split).to_string(),
            ),
            ("candidates".to_string(), self.config.candidates.name().to_string()),
            ("samples".to_string(), self.config.samples.to_string()),
        ])
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::path::PathBuf;

    use super::*;
    use crate::feature_network::testing::{temp_dir, write_probe};
    use crate::tests_support::{FakeData, FakeModel};
    use nash_core::data::Batch;
    use nash_core::rand::SeedableRng;
    use nash_core::serde_json;
    use nash_core::tensor::{Device, FeatureShape, Rng};

    /// 40 two-feature rows spread over [-3, 3] x [-2, 4] (a non-degenerate covariance).
    fn rows() -> Vec<f32> {
        (0..40)
            .flat_map(|i| {
                let t = i as f32;
                [(t * 1.3).sin() * 3.0, (t * 0.7).cos() * 2.0 + t * 0.05]
            })
            .collect()
    }

    /// A [`FakeData`] that counts the rows it hands out.
    struct Counting {
        inner: FakeData,
        rows_read: Cell<usize>,
    }

    impl DataSource for Counting {
        fn describe(&self) -> String {
            self.inner.describe()
        }
        fn info(&self) -> DataInfo {
            self.inner.info()
        }
        fn len(&self, split: Split) -> usize {
            self.inner.len(split)
        }
        fn batch(&self, split: Split, indices: &[usize], device: &Device) -> Result<Batch> {
            self.rows_read.set(self.rows_read.get() + indices.len());
            self.inner.batch(split, indices, device)
        }
    }

    fn data() -> Counting {
        Counting {
            inner: FakeData::plain(rows(), 2),
            rows_read: Cell::new(0),
        }
    }

    /// An identity probe network for FakeData's two features and value range (-10, 10), in a
    /// fresh folder; returns the folder and the network's id.
    fn network(tag: &str) -> (PathBuf, String) {
        let dir = temp_dir(&format!("sq-{tag}"));
        let info = DataInfo {
            sample_shape: FeatureShape::Flat(2),
            num_classes: None,
            value_range: (-10.0, 10.0),
        };
        let id = write_probe(&dir, "probe", &info, 2, vec![1.0, 0.0, 0.0, 1.0]);
        (dir, id)
    }

    fn config(dir: &std::path::Path) -> SampleQualityConfig {
        SampleQualityConfig {
            feature_network: dir.to_str().unwrap().into(),
            samples: 40,
            batch_size: 16,
            kid_subsets: 10,
            kid_subset_size: 20,
            score_splits: 4,
            ..Default::default()
        }
    }

    fn evaluate(
        metric: &mut dyn Metric,
        model: &mut FakeModel,
        data: &dyn DataSource,
    ) -> Result<BTreeMap<String, f64>> {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        let mut ctx = EvalContext {
            device: &device,
            rng: &mut rng,
        };
        metric.evaluate(model, data, &mut ctx)
    }

    #[test]
    fn samples_equal_to_the_reference_score_perfectly_and_a_shift_does_not() {
        let (dir, id) = network("perfect");
        let data = data();
        let mut metric = config(&dir).build().unwrap();
        assert_eq!(
            metric.provenance()["feature_network"],
            dir.to_str().unwrap(),
            "before loading: the spec"
        );
        let mut same = FakeModel::sampler(rows(), 2);
        let m = evaluate(metric.as_mut(), &mut same, &data).unwrap();
        assert_eq!(
            same.sample_calls,
            vec![16, 16, 8],
            "samples drawn in chunks of batch_size"
        );
        assert_eq!(data.rows_read.get(), 40, "the reference set is read once");
        assert!(m["fid"].abs() < 1e-6, "{m:?}");
        assert_eq!((m["precision"], m["recall"]), (1.0, 1.0), "{m:?}");
        assert_eq!((m["quality_samples"], m["reference_samples"]), (40.0, 40.0));
        // Two classes (logits = features): the score lies in [1, 2].
        assert!((1.0..=2.0).contains(&m["classifier_score"]), "{m:?}");
        assert!(m["classifier_score_std"] >= 0.0 && m["kid_std"] >= 0.0, "{m:?}");
        let keys: Vec<&str> = m.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "classifier_score",
                "classifier_score_std",
                "fid",
                "kid",
                "kid_std",
                "precision",
                "quality_samples",
                "recall",
                "reference_samples"
            ]
        );
        let provenance = metric.provenance();
        let expected: BTreeMap<String, String> = [
            ("candidates", "model"),
            ("feature_network", id.as_str()),
            ("reference_split", "test"),
            ("samples", "40"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(provenance, expected);

        // Shifted by +1 in both features: equal covariances, so FID = |Δμ|² = 2 exactly (up to f32
        // rounding of the shifted rows). The network and the reference stay cached: the folder can
        // go and no reference row is read again.
        std::fs::remove_dir_all(&dir).ok();
        let shifted: Vec<f32> = rows().iter().map(|v| v + 1.0).collect();
        let mut moved = FakeModel::sampler(shifted, 2);
        let s = evaluate(metric.as_mut(), &mut moved, &data).unwrap();
        assert_eq!(data.rows_read.get(), 40);
        assert!((s["fid"] - 2.0).abs() < 1e-4, "{s:?}");
        assert!(s["kid"] > m["kid"] && s["kid"] > 0.0, "{s:?} vs {m:?}");
        assert!(s["precision"] < 1.0 || s["recall"] < 1.0, "{s:?}");
    }

    #[test]
    fn real_candidates_need_no_sampling_model_and_scores_are_selectable() {
        let (dir, _) = network("train");
        let data = data();
        let cfg = SampleQualityConfig {
            candidates: Candidates::Train,
            scores: vec!["precision_recall".into(), "fid".into()],
            ..config(&dir)
        };
        let mut metric = cfg.build().unwrap();
        let mut model = FakeModel::reconstructor(|x| x.to_vec());
        let m = evaluate(metric.as_mut(), &mut model, &data).unwrap();
        // The train split is the first 20 of the 40 test rows: every candidate is a reference point.
        assert_eq!((m["quality_samples"], m["reference_samples"]), (20.0, 40.0));
        assert_eq!(m["precision"], 1.0, "{m:?}");
        assert!(m["fid"].is_finite() && m["fid"] >= 0.0, "{m:?}");
        let keys: Vec<&str> = m.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["fid", "precision", "quality_samples", "recall", "reference_samples"]
        );
        assert_eq!(metric.provenance()["candidates"], "train");
        // Both sets are cached: a second evaluation reads no data.
        let read = data.rows_read.get();
        assert_eq!(read, 60);
        let again = evaluate(metric.as_mut(), &mut model, &data).unwrap();
        assert_eq!(data.rows_read.get(), read);
        assert_eq!(again, m);

        // A fewer-sample cap: the reference set is the first `samples` rows.
        let small = SampleQualityConfig {
            samples: 10,
            candidates: Candidates::Train,
            scores: vec!["fid".into()],
            ..config(&dir)
        };
        let m = evaluate(small.build().unwrap().as_mut(), &mut model, &data).unwrap();
        assert_eq!((m["quality_samples"], m["reference_samples"]), (10.0, 10.0));

        // The model cannot sample: candidates = "model" says so.
        let err = evaluate(config(&dir).build().unwrap().as_mut(), &mut model, &data).unwrap_err();
        assert!(
            matches!(err, Error::Unsupported { .. }) && err.to_string().contains("cannot sample"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn mismatched_data_and_missing_networks_are_refused() {
        let (dir, _) = network("mismatch");
        let wide = FakeData::plain(vec![0.5; 30], 3);
        let mut model = FakeModel::sampler(vec![0.0; 3], 3);
        let err = evaluate(config(&dir).build().unwrap().as_mut(), &mut model, &wide).unwrap_err();
        assert!(
            matches!(err, Error::Unsupported { .. }) && err.to_string().contains("[3]"),
            "{err}"
        );
        // Samples of the wrong width from the model.
        let mut narrow = FakeModel::sampler(vec![0.0; 3], 1);
        let err = evaluate(config(&dir).build().unwrap().as_mut(), &mut narrow, &data()).unwrap_err();
        assert!(matches!(err, Error::Shape { .. }), "{err}");
        // Too few samples for k-NN balls.
        let few = SampleQualityConfig {
            samples: 3,
            scores: vec!["precision_recall".into()],
            ..config(&dir)
        };
        let mut model = FakeModel::sampler(rows(), 2);
        let err = evaluate(few.build().unwrap().as_mut(), &mut model, &data()).unwrap_err();
        assert!(err.to_string().contains("metrics.sample_quality.nearest_k"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
        let err = evaluate(config(&dir).build().unwrap().as_mut(), &mut model, &data()).unwrap_err();
        assert!(err.to_string().contains("has no network.json"), "{err}");
    }

    #[test]
    fn config_defaults_and_errors() {
        let parsed: Box<dyn MetricConfig> = serde_json::from_str(r#"{"type": "sample_quality"}"#).unwrap();
        assert_eq!(format!("{parsed:?}"), format!("{:?}", SampleQualityConfig::default()));
        let d = SampleQualityConfig::default();
        assert_eq!(
            (d.feature_network.as_str(), d.samples, d.reference_split, d.candidates),
            ("fashion_classifier", 10_000, Split::Test, Candidates::Model)
        );
        assert_eq!(
            (
                d.batch_size,
                d.kid_subsets,
                d.kid_subset_size,
                d.nearest_k,
                d.score_splits
            ),
            (500, 100, 1000, 3, 10)
        );
        assert_eq!(d.scores, SCORES);
        let parsed: SampleQualityConfig =
            serde_json::from_str(r#"{"candidates": "train", "scores": ["kid"], "samples": 50}"#).unwrap();
        assert_eq!((parsed.candidates, parsed.samples), (Candidates::Train, 50));
        let err = serde_json::from_str::<SampleQualityConfig>(r#"{"sampels": 5}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `sampels`"), "{err}");
        let err = serde_json::from_str::<SampleQualityConfig>(r#"{"candidates": "fake"}"#).unwrap_err();
        assert!(err.to_string().contains("`model`, `train`, `test`"), "{err}");

        let refused = |cfg: SampleQualityConfig, path: &str, words: &str| {
            let Err(err) = cfg.build() else {
                panic!("{path} accepted");
            };
            match &err {
                Error::Config { path: p, message } => {
                    assert_eq!(p, path, "{err}");
                    assert!(message.contains(words), "{err}");
                }
                other => panic!("expected a config error, got {other}"),
            }
        };
        let d = SampleQualityConfig::default;
        refused(
            SampleQualityConfig {
                candidates: Candidates::Test,
                ..d()
            },
            "metrics.sample_quality.candidates",
            "reference split",
        );
        refused(
            SampleQualityConfig {
                reference_split: Split::Train,
                candidates: Candidates::Train,
                ..d()
            },
            "metrics.sample_quality.candidates",
            "`train`",
        );
        refused(
            SampleQualityConfig {
                scores: vec!["fid".into(), "inception".into()],
                ..d()
            },
            "metrics.sample_quality.scores[1]",
            "unknown score `inception`; valid: fid, kid, precision_recall, classifier_score",
        );
        refused(
            SampleQualityConfig {
                scores: vec!["kid".into(), "kid".into()],
                ..d()
            },
            "metrics.sample_quality.scores[1]",
            "twice",
        );
        refused(
            SampleQualityConfig { scores: vec![], ..d() },
            "metrics.sample_quality.scores",
            "at least one",
        );
        refused(
            SampleQualityConfig { samples: 1, ..d() },
            "metrics.sample_quality.samples",
            "at least 2",
        );
        refused(
            SampleQualityConfig { batch_size: 0, ..d() },
            "metrics.sample_quality.batch_size",
            "at least 1",
        );
        refused(
            SampleQualityConfig { kid_subsets: 0, ..d() },
            "metrics.sample_quality.kid_subsets",
            "at least 1",
        );
        refused(
            SampleQualityConfig {
                kid_subset_size: 1,
                ..d()
            },
            "metrics.sample_quality.kid_subset_size",
            "at least 2",
        );
        refused(
            SampleQualityConfig { nearest_k: 0, ..d() },
            "metrics.sample_quality.nearest_k",
            "at least 1",
        );
        refused(
            SampleQualityConfig { score_splits: 0, ..d() },
            "metrics.sample_quality.score_splits",
            "at least 1",
        );
        refused(
            SampleQualityConfig {
                feature_network: "".into(),
                ..d()
            },
            "metrics.sample_quality.feature_network",
            "fashion_classifier",
        );
        // Real-vs-real with the other split is fine.
        let floor = SampleQualityConfig {
            candidates: Candidates::Train,
            ..d()
        };
        assert_eq!(floor.build().unwrap().provenance()["candidates"], "train");
    }
}
