//! The feature network of the sample-quality metrics: a classifier nash trained itself (`nash features
//! build`), kept in nash's cache folder with a checksum, never downloaded.
//!
//! A cached network is a folder `<cache>/features/<name>/` holding `network.json` (a
//! [`FeatureNetworkEntry`]) and `weights.safetensors`, whose SHA-256 must equal the entry's
//! `weights_sha256`; the layout is defined once, in [`nash_core::weights::feature_networks`].
//!
//! [`FeatureNetwork::load`] reads the record, verifies the checksum, rebuilds the model from its config
//! and loads the weights; [`FeatureNetwork::features`] runs [`Model::classify`] in batches and returns
//! the feature vectors and the softmax class probabilities of a set of samples.

use std::path::{Path, PathBuf};

use nash_core::data::DataInfo;
use nash_core::error::{Error, Result};
use nash_core::layers::BuildContext;
use nash_core::model::{EvalContext, Model, ModelConfig};
use nash_core::prelude::HasShape;
use nash_core::rand::SeedableRng;
use nash_core::serde_json;
use nash_core::tensor::{matrix_from_vec, Device, Matrix, Rng};
use nash_core::weights::feature_networks::{features_root, FeatureNetworkEntry, ENTRY_FILE, FORMAT, WEIGHTS_FILE};
use nash_core::weights::{cache_dir, load_params, sha256_file};

use crate::scores::{softmax_rows, Features};

/// The feature network the sample-quality metrics use unless told otherwise.
pub const DEFAULT_FEATURE_NETWORK: &str = "fashion_classifier";
/// How long `nash features build` takes to train the default network, for the message that asks for it.
pub const BUILD_TIME_HINT: &str = "about 8-12 minutes on 2 CPU cores";

/// A loaded, checksum-verified feature network (see the module docs).
pub struct FeatureNetwork {
    id: String,
    dir: PathBuf,
    data: DataInfo,
    test_accuracy: f64,
    model: Box<dyn Model>,
}

impl std::fmt::Debug for FeatureNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeatureNetwork")
            .field("id", &self.id)
            .field("dir", &self.dir)
            .field("data", &self.data)
            .finish_non_exhaustive()
    }
}

/// Whether `spec` names a folder (it contains a `/` or starts with `.`) rather than a cache entry.
fn is_path(spec: &str) -> bool {
    spec.contains('/') || spec.contains(std::path::MAIN_SEPARATOR) || spec.starts_with('.')
}

impl FeatureNetwork {
    /// Loads the feature network `spec`: a name looked up in `<cache>/features/<name>/` (the cache is
    /// [`cache_dir`]), or the path of such a folder (`spec` contains a `/` or starts with `.`).
    pub fn load(spec: &str, device: &Device) -> Result<FeatureNetwork> {
        Self::load_in(spec, &cache_dir(), device)
    }

    /// [`FeatureNetwork::load`] with the cache folder `cache` instead of [`cache_dir`].
    pub fn load_in(spec: &str, cache: &Path, device: &Device) -> Result<FeatureNetwork> {
        if spec.trim().is_empty() {
            return Err(Error::Other(format!(
                "a feature network must be named (`{DEFAULT_FEATURE_NETWORK}`) or given as a folder path"
            )));
        }
        let by_name = !is_path(spec);
        let dir = if by_name {
            features_root(cache).join(spec)
        } else {
            PathBuf::from(spec)
        };
        let record_path = dir.join(ENTRY_FILE);
        if !record_path.is_file() {
            return Err(Error::Other(missing_message(spec, by_name, &dir)));
        }
        let data_error = |path: &Path, message: String| Error::Data {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(&record_path).map_err(|e| Error::io(&record_path, e))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| data_error(&record_path, format!("is not valid JSON ({e})")))?;
        match value.get("format").map(|f| f.as_u64()) {
            Some(Some(format)) if format == u64::from(FORMAT) => {}
            Some(_) => {
                return Err(data_error(
                    &record_path,
                    format!(
                    "has `format` {}, this nash reads format {FORMAT}: rebuild it with `nash features build --force`",
                    value["format"]
                ),
                ))
            }
            None => {
                return Err(data_error(
                    &record_path,
                    "has no `format` field; it is not a feature network record".into(),
                ))
            }
        }
        let not_a_record = |e: serde_json::Error| {
            data_error(
                &record_path,
                format!(
                    "is not a feature network record ({e}); a `model` type that is not registered needs the \
                     plugin that provides it"
                ),
            )
        };
        let record: FeatureNetworkEntry = serde_json::from_value(value).map_err(not_a_record)?;
        let config: Box<dyn ModelConfig> = serde_json::from_value(record.model.clone()).map_err(not_a_record)?;
        if by_name && record.name != spec {
            return Err(data_error(
                &record_path,
                format!(
                    "names the network `{}`, but it is in the cache folder of `{spec}`: rebuild it with \
                     `nash features build --force`",
                    record.name
                ),
            ));
        }
        let expected = record.weights_sha256.to_ascii_lowercase();
        if expected.len() != 64 || !expected.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(data_error(
                &record_path,
                format!(
                    "`weights_sha256` must be 64 hex digits, got `{}`",
                    record.weights_sha256
                ),
            ));
        }
        let weights_path = dir.join(WEIGHTS_FILE);
        if !weights_path.is_file() {
            return Err(data_error(
                &weights_path,
                format!(
                    "is missing for feature network `{}`: rebuild it with `nash features build --force`",
                    record.name
                ),
            ));
        }
        let actual = sha256_file(&weights_path)?;
        if actual != expected {
            return Err(data_error(
                &weights_path,
                format!(
                    "corrupt feature network `{}`: the file's SHA-256 is {actual}, {ENTRY_FILE} records {expected}; \
                     rebuild it with `nash features build --force`",
                    record.name
                ),
            ));
        }
        let mut rng = Rng::seed_from_u64(0);
        let mut model = config
            .build(&record.data, &mut BuildContext { device, rng: &mut rng })
            .map_err(|e| data_error(&record_path, format!("its `model` cannot be built for its `data`: {e}")))?;
        load_params(&weights_path, model.named_params_mut())?;
        Ok(FeatureNetwork {
            id: record.id,
            dir,
            data: record.data,
            test_accuracy: record.test_accuracy,
            model,
        })
    }

    /// The network's id, `<name>@sha256:<12 hex>`: report it beside every score computed with it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The data the network was trained on (sample shape, value range).
    pub fn data_info(&self) -> &DataInfo {
        &self.data
    }

    /// The folder the network was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its accuracy on the whole test split when it was built.
    pub fn test_accuracy(&self) -> f64 {
        self.test_accuracy
    }

    /// Checks that samples of data described by `source` can be scored: their number of values
    /// must equal that of the network's samples.
    pub fn check_input(&self, source: &DataInfo) -> Result<()> {
        let (ours, theirs) = (self.data.sample_shape, source.sample_shape);
        if ours.numel() != theirs.numel() {
            return Err(Error::unsupported(
                format!("scoring samples of shape {theirs} with feature network `{}`", self.id),
                format!(
                    "the network was trained on samples of shape {ours} ({} values), these have {} values",
                    ours.numel(),
                    theirs.numel()
                ),
            ));
        }
        let (lo, hi) = source.value_range;
        if !(lo.is_finite() && hi.is_finite() && hi > lo) {
            return Err(Error::unsupported(
                format!("scoring samples with feature network `{}`", self.id),
                format!("the data's value range ({lo}, {hi}) is not an interval low < high"),
            ));
        }
        Ok(())
    }

    /// Features and softmax class probabilities of `inputs` (one sample per row, values in the
    /// range of `source`), computed with [`Model::classify`] `batch_size` rows at a time. Inputs
    /// are first mapped linearly from `source.value_range` onto the network's recorded value range.
    pub fn features(
        &mut self,
        inputs: &Matrix,
        source: &DataInfo,
        batch_size: usize,
        ctx: &mut EvalContext<'_>,
    ) -> Result<(Features, Features)> {
        self.check_input(source)?;
        let (rows, cols) = *inputs.shape();
        if cols != self.data.sample_shape.numel() {
            return Err(Error::shape(
                format!("inputs of feature network `{}`", self.id),
                format!(
                    "{} values per sample ({})",
                    self.data.sample_shape.numel(),
                    self.data.sample_shape
                ),
                format!("{cols} values"),
            ));
        }
        let (src_lo, src_hi) = source.value_range;
        let (dst_lo, dst_hi) = self.data.value_range;
        let scale = (dst_hi as f64 - dst_lo as f64) / (src_hi as f64 - src_lo as f64);
        let identity = (src_lo, src_hi) == (dst_lo, dst_hi);
        let values = inputs.as_vec();
        let batch_size = batch_size.max(1);
        let (mut features, mut logits) = (Vec::new(), Vec::new());
        let (mut feature_dim, mut classes) = (0usize, 0usize);
        for start in (0..rows).step_by(batch_size) {
            let end = (start + batch_size).min(rows);
            let chunk = &values[start * cols..end * cols];
            let chunk: Vec<f32> = if identity {
                chunk.to_vec()
            } else {
                chunk
                    .iter()
                    .map(|&x| (dst_lo as f64 + (x as f64 - src_lo as f64) * scale) as f32)
                    .collect()
            };
            let batch = matrix_from_vec(ctx.device, chunk, end - start, cols)?;
            let out = self.model.classify(&batch, ctx)?.ok_or_else(|| {
                Error::unsupported(
                    format!("feature network `{}`", self.id),
                    format!(
                        "its `{}` model cannot classify samples (a feature network is a classifier, \
                         `type = \"classifier\"`)",
                        self.model.family()
                    ),
                )
            })?;
            let (f_rows, f_dim) = *out.features.shape();
            let (l_rows, l_dim) = *out.logits.shape();
            if f_rows != end - start || l_rows != end - start {
                return Err(Error::shape(
                    format!("classification by feature network `{}`", self.id),
                    format!("{} rows of features and logits", end - start),
                    format!("{f_rows} and {l_rows}"),
                ));
            }
            if start > 0 && (f_dim != feature_dim || l_dim != classes) {
                return Err(Error::shape(
                    format!("classification by feature network `{}`", self.id),
                    format!("{feature_dim} features and {classes} classes, like the first batch"),
                    format!("{f_dim} and {l_dim}"),
                ));
            }
            (feature_dim, classes) = (f_dim, l_dim);
            features.extend(out.features.as_vec().into_iter().map(f64::from));
            logits.extend(out.logits.as_vec().into_iter().map(f64::from));
        }
        let features = Features::new(rows, feature_dim, features)?;
        let logits = Features::new(rows, classes, logits)?;
        Ok((features, softmax_rows(&logits)))
    }
}

/// The message for a feature network that is not where `spec` says.
fn missing_message(spec: &str, by_name: bool, dir: &Path) -> String {
    if !by_name {
        return format!(
            "feature network folder {} has no {ENTRY_FILE}: give the folder `nash features build` wrote, or the \
             name of a cached network (`{DEFAULT_FEATURE_NETWORK}`)",
            dir.display()
        );
    }
    if spec == DEFAULT_FEATURE_NETWORK {
        format!(
            "feature network `{spec}` is not in the cache ({}): build it with `nash features build`, which trains \
             examples/{DEFAULT_FEATURE_NETWORK}.toml ({BUILD_TIME_HINT})",
            dir.display()
        )
    } else {
        format!(
            "feature network `{spec}` is not in the cache ({}): build it with `nash features build` from its \
             training pipeline, or give the path of its folder",
            dir.display()
        )
    }
}

/// A tiny feature network for the tests: a `probe` model whose features are `x·W` (one weight
/// matrix, `[numel, features]`) and whose logits equal its features; and a writer of cache folders.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    use nash_core::data::{Batch, DataInfo};
    use nash_core::dfdx::prelude::*;
    use nash_core::error::{Error, Result};
    use nash_core::layers::BuildContext;
    use nash_core::model::{Classification, EvalContext, Model, ModelConfig, StepReport, TrainContext};
    use nash_core::serde_json;
    use nash_core::tensor::{Matrix, Param, ParamRole, Parameterized};
    use nash_core::weights::save_params;
    use serde::{Deserialize, Serialize};

    use nash_core::weights::feature_networks::{
        make_id, FeatureNetworkEntry, ENTRY_FILE, FORMAT, WEIGHTS_FILE, WEIGHTS_METADATA_KEY,
    };

    /// Config of [`Probe`].
    #[derive(Debug, Serialize, Deserialize)]
    pub struct ProbeConfig {
        /// Width of the features (and number of classes).
        pub features: usize,
        /// If set, the model declines to classify.
        #[serde(default)]
        pub mute: bool,
    }

    #[typetag::serde(name = "feature_network_test_probe")]
    impl ModelConfig for ProbeConfig {
        fn build(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<Box<dyn Model>> {
            let inputs = data.sample_shape.numel();
            let weight = Param::from_vec(
                ctx.device,
                vec![0.0; inputs * self.features],
                vec![inputs, self.features],
                ParamRole::Weight,
            )?;
            Ok(Box::new(Probe {
                weight,
                inputs,
                features: self.features,
                mute: self.mute,
            }))
        }
    }

    /// Features `x·W`, logits = features.
    pub struct Probe {
        weight: Param,
        inputs: usize,
        features: usize,
        mute: bool,
    }

    impl Parameterized for Probe {
        fn named_params(&self) -> Vec<(String, &Param)> {
            vec![("probe.weight".into(), &self.weight)]
        }
        fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
            vec![("probe.weight".into(), &mut self.weight)]
        }
    }

    impl Model for Probe {
        fn family(&self) -> &str {
            "probe"
        }
        fn describe(&self) -> String {
            "probe".into()
        }
        fn param_groups(&self) -> Vec<String> {
            vec!["probe".into()]
        }
        fn train_step(&mut self, _batch: &Batch, _ctx: &mut TrainContext<'_>) -> Result<StepReport> {
            Err(Error::unsupported("training", "probe"))
        }
        fn evaluate(&mut self, _batch: &Batch, _ctx: &mut EvalContext<'_>) -> Result<BTreeMap<String, f64>> {
            Ok(BTreeMap::new())
        }
        fn classify(&mut self, inputs: &Matrix, _ctx: &mut EvalContext<'_>) -> Result<Option<Classification>> {
            if self.mute {
                return Ok(None);
            }
            let features = inputs.clone().matmul(self.weight.as_matrix(self.inputs, self.features));
            Ok(Some(Classification {
                logits: features.clone(),
                features,
            }))
        }
    }

    /// A temporary folder unique to this process and `tag`, emptied.
    pub fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nash-feature-network-{}-{tag}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Writes a probe network with weights `weight` (`[numel, features]`, row-major) for data `data`
    /// into `dir` (created), as `nash features build` would, and returns its id.
    pub fn write_probe(dir: &Path, name: &str, data: &DataInfo, features: usize, weight: Vec<f32>) -> String {
        write_network(
            dir,
            name,
            data,
            Box::new(ProbeConfig { features, mute: false }),
            |model| {
                model.named_params_mut()[0].1.set(&weight).unwrap();
            },
        )
    }

    /// Builds `config` for `data`, lets `init` set its parameters, saves its weights and record in
    /// `dir`, and returns its id.
    pub fn write_network(
        dir: &Path,
        name: &str,
        data: &DataInfo,
        config: Box<dyn ModelConfig>,
        init: impl FnOnce(&mut dyn Model),
    ) -> String {
        use nash_core::rand::SeedableRng;
        let device = nash_core::tensor::Device::default();
        let mut rng = nash_core::tensor::Rng::seed_from_u64(1);
        let mut model = config
            .build(
                data,
                &mut BuildContext {
                    device: &device,
                    rng: &mut rng,
                },
            )
            .unwrap();
        init(model.as_mut());
        std::fs::create_dir_all(dir).unwrap();
        let metadata = BTreeMap::from([(WEIGHTS_METADATA_KEY.to_string(), name.to_string())]);
        let sha = save_params(&dir.join(WEIGHTS_FILE), &model.named_params(), &metadata).unwrap();
        let id = make_id(name, &sha);
        let record = FeatureNetworkEntry {
            format: FORMAT,
            name: name.into(),
            id: id.clone(),
            weights_sha256: sha,
            model: serde_json::to_value(&config).unwrap(),
            data: data.clone(),
            test_accuracy: 0.875,
            test_samples: 10000,
            steps: 100,
            pipeline_hash: "0123456789ab".into(),
            created: "2024-01-01T00:00:00Z".into(),
            nash_version: "0.1.0".into(),
        };
        std::fs::write(dir.join(ENTRY_FILE), serde_json::to_string_pretty(&record).unwrap()).unwrap();
        id
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{temp_dir, write_network, write_probe, ProbeConfig};
    use super::*;
    use nash_core::tensor::FeatureShape;
    use nash_core::weights::save_params;

    fn info(dim: usize, range: (f32, f32)) -> DataInfo {
        DataInfo {
            sample_shape: FeatureShape::Flat(dim),
            num_classes: None,
            value_range: range,
        }
    }

    fn run(net: &mut FeatureNetwork, rows: Vec<f32>, source: &DataInfo, batch: usize) -> Result<(Features, Features)> {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        let mut ctx = EvalContext {
            device: &device,
            rng: &mut rng,
        };
        let n = rows.len() / source.sample_shape.numel();
        let inputs = matrix_from_vec(&device, rows, n, source.sample_shape.numel())?;
        net.features(&inputs, source, batch, &mut ctx)
    }

    #[test]
    fn loads_by_name_from_the_cache_and_by_path() {
        let cache = temp_dir("by-name");
        let dir = cache.join("features").join("probe_net");
        // W = [[1, 2, 0], [0, 1, -1]]: features (x0, 2·x0 + x1, -x1).
        let id = write_probe(
            &dir,
            "probe_net",
            &info(2, (0.0, 1.0)),
            3,
            vec![1.0, 2.0, 0.0, 0.0, 1.0, -1.0],
        );
        assert!(id.starts_with("probe_net@sha256:") && id.len() == "probe_net@sha256:".len() + 12);
        let device = Device::default();
        let mut net = FeatureNetwork::load_in("probe_net", &cache, &device).unwrap();
        assert_eq!(net.id(), id);
        assert_eq!(net.data_info(), &info(2, (0.0, 1.0)));
        assert_eq!(net.test_accuracy(), 0.875);
        assert_eq!(net.dir(), dir.as_path());
        // Same range: no rescaling. Rows (1, 0) and (0.5, 0.25); batches of 1 and of 2 agree.
        let (f, p) = run(&mut net, vec![1.0, 0.0, 0.5, 0.25], &info(2, (0.0, 1.0)), 1).unwrap();
        assert_eq!(f.values(), &[1.0, 2.0, 0.0, 0.5, 1.25, -0.25]);
        let (f2, p2) = run(&mut net, vec![1.0, 0.0, 0.5, 0.25], &info(2, (0.0, 1.0)), 2).unwrap();
        assert_eq!((f.values(), p.values()), (f2.values(), p2.values()));
        // Probabilities are the softmax of the logits (= features here): row 0 = softmax(1, 2, 0).
        let z: f64 = [1.0f64, 2.0, 0.0].iter().map(|v| v.exp()).sum();
        for (j, v) in [1.0f64, 2.0, 0.0].iter().enumerate() {
            assert!((p.row(0)[j] - v.exp() / z).abs() < 1e-6, "{:?}", p.row(0));
        }
        // The folder itself loads too, by path.
        let by_path = FeatureNetwork::load_in(dir.to_str().unwrap(), Path::new("/nonexistent"), &device).unwrap();
        assert_eq!(by_path.id(), id);
        std::fs::remove_dir_all(&cache).ok();
    }

    #[test]
    fn inputs_are_rescaled_onto_the_network_value_range() {
        let dir = temp_dir("rescale");
        // Identity features; the network was trained on [0, 1], the data lies in [-1, 1]:
        // x' = (x + 1) / 2, so -1 -> 0, 1 -> 1, 0 -> 0.5, 0.5 -> 0.75.
        write_probe(&dir, "unit", &info(2, (0.0, 1.0)), 2, vec![1.0, 0.0, 0.0, 1.0]);
        let device = Device::default();
        let mut net = FeatureNetwork::load_in(dir.to_str().unwrap(), Path::new("."), &device).unwrap();
        let (f, _) = run(&mut net, vec![-1.0, 1.0, 0.0, 0.5], &info(2, (-1.0, 1.0)), 8).unwrap();
        assert_eq!(f.values(), &[0.0, 1.0, 0.5, 0.75]);
        // Another sample shape with the same number of values is accepted (flattened alike) ...
        let image = DataInfo {
            sample_shape: FeatureShape::image(1, 1, 2),
            ..info(2, (0.0, 1.0))
        };
        assert!(net.check_input(&image).is_ok());
        // ... a different number of values is refused naming both shapes.
        let err = run(&mut net, vec![0.0; 3], &info(3, (0.0, 1.0)), 8).unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("[3]") && msg.contains("[2]") && msg.contains("unit@sha256:"),
            "{msg}"
        );
        let err = net.check_input(&info(2, (1.0, 1.0))).unwrap_err();
        assert!(err.to_string().contains("value range"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn missing_entries_say_how_to_build_them() {
        let cache = temp_dir("missing");
        let device = Device::default();
        let err = FeatureNetwork::load_in("fashion_classifier", &cache, &device)
            .unwrap_err()
            .to_string();
        let expected = format!(
            "feature network `fashion_classifier` is not in the cache ({}): build it with `nash features build`, \
             which trains examples/fashion_classifier.toml",
            cache.join("features").join("fashion_classifier").display()
        );
        assert!(err.starts_with(&expected), "{err}");
        let err = FeatureNetwork::load_in("other_net", &cache, &device)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`other_net` is not in the cache") && err.contains("nash features build"),
            "{err}"
        );
        let err = FeatureNetwork::load_in("./nowhere", &cache, &device)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("./nowhere") && err.contains("has no network.json"),
            "{err}"
        );
        assert!(FeatureNetwork::load_in(" ", &cache, &device).is_err());
        std::fs::remove_dir_all(&cache).ok();
    }

    #[test]
    fn corrupt_or_malformed_entries_are_refused() {
        let dir = temp_dir("corrupt");
        let data = info(2, (0.0, 1.0));
        write_probe(&dir, "net", &data, 2, vec![1.0, 0.0, 0.0, 1.0]);
        let device = Device::default();
        let load = || FeatureNetwork::load_in(dir.to_str().unwrap(), Path::new("."), &device);
        assert!(load().is_ok());

        // Weights replaced behind the record's back: the checksum refuses them.
        let record = std::fs::read_to_string(dir.join(ENTRY_FILE)).unwrap();
        let other =
            nash_core::tensor::Param::from_vec(&device, vec![9.0; 4], vec![2, 2], nash_core::tensor::ParamRole::Weight)
                .unwrap();
        save_params(
            &dir.join(WEIGHTS_FILE),
            &[("probe.weight".into(), &other)],
            &Default::default(),
        )
        .unwrap();
        let err = load().unwrap_err().to_string();
        assert!(
            err.contains("corrupt feature network `net`") && err.contains("nash features build --force"),
            "{err}"
        );
        assert!(err.contains(WEIGHTS_FILE), "{err}");

        // Malformed records name the file and what is wrong.
        let write = |text: &str| std::fs::write(dir.join(ENTRY_FILE), text).unwrap();
        write("{not json");
        let err = load().unwrap_err().to_string();
        assert!(err.contains(ENTRY_FILE) && err.contains("not valid JSON"), "{err}");
        write(&record.replace("\"format\": 1", "\"format\": 2"));
        let err = load().unwrap_err().to_string();
        assert!(err.contains("`format` 2") && err.contains("reads format 1"), "{err}");
        write(&record.replace("feature_network_test_probe", "no_such_model"));
        let err = load().unwrap_err().to_string();
        assert!(
            err.contains("no_such_model") && err.contains("not a feature network record"),
            "{err}"
        );
        let mut value: nash_core::serde_json::Value = nash_core::serde_json::from_str(&record).unwrap();
        value["weights_sha256"] = "abc".into();
        write(&value.to_string());
        let err = load().unwrap_err().to_string();
        assert!(err.contains("64 hex digits"), "{err}");
        std::fs::remove_file(dir.join(WEIGHTS_FILE)).unwrap();
        write(&record);
        let err = load().unwrap_err().to_string();
        assert!(err.contains("is missing") && err.contains("--force"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_cache_entry_under_another_name_and_a_model_that_cannot_classify_are_refused() {
        let cache = temp_dir("renamed");
        let data = info(2, (0.0, 1.0));
        write_probe(
            &cache.join("features").join("alias"),
            "original",
            &data,
            2,
            vec![0.0; 4],
        );
        let device = Device::default();
        let err = FeatureNetwork::load_in("alias", &cache, &device)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`original`") && err.contains("`alias`"), "{err}");

        let dir = cache.join("mute");
        write_network(
            &dir,
            "mute",
            &data,
            Box::new(ProbeConfig {
                features: 2,
                mute: true,
            }),
            |_| {},
        );
        let mut net = FeatureNetwork::load_in(dir.to_str().unwrap(), &cache, &device).unwrap();
        let err = run(&mut net, vec![0.0, 0.0], &data, 4).unwrap_err().to_string();
        assert!(err.contains("`probe` model cannot classify"), "{err}");
        std::fs::remove_dir_all(&cache).ok();
    }

    #[test]
    fn the_classifier_model_round_trips_through_the_cache() {
        use crate::classifier::ClassifierConfig;
        let dir = temp_dir("classifier");
        let data = DataInfo {
            sample_shape: FeatureShape::Flat(4),
            num_classes: Some(10),
            value_range: (0.0, 1.0),
        };
        let device = Device::default();
        let rows: Vec<f32> = (0..12).map(|i| (i as f32 * 0.37).sin().abs()).collect();
        let mut expected = None;
        write_network(&dir, "mlp", &data, Box::new(ClassifierConfig::default()), |model| {
            let mut rng = Rng::seed_from_u64(0);
            let mut ctx = EvalContext {
                device: &device,
                rng: &mut rng,
            };
            let inputs = matrix_from_vec(&device, rows.clone(), 3, 4).unwrap();
            let out = model.classify(&inputs, &mut ctx).unwrap().unwrap();
            expected = Some((out.features.as_vec(), out.logits.as_vec()));
        });
        let (features, logits) = expected.unwrap();
        let mut net = FeatureNetwork::load_in(dir.to_str().unwrap(), Path::new("."), &device).unwrap();
        let (f, p) = run(&mut net, rows, &data, 2).unwrap();
        assert_eq!((f.rows(), f.dim(), p.dim()), (3, 128, 10));
        // The loading side builds from another seed, so equal outputs mean the weights were loaded;
        // batches of 2 against one of 3 differ only by float rounding in the matrix products.
        let close = |a: &[f64], b: &[f64]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5);
        let widened: Vec<f64> = features.iter().map(|&v| v as f64).collect();
        assert!(
            close(f.values(), &widened),
            "the loaded weights give the saved model's features"
        );
        let logits = Features::from_f32(3, 10, &logits).unwrap();
        assert!(close(p.values(), softmax_rows(&logits).values()));
        std::fs::remove_dir_all(&dir).ok();
    }
}
