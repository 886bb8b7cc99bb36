//! What a pipeline builds ([`Run`]: data, model, optimizers, stabilizers, metrics, pictures), and
//! what is done with it besides training steps: held-out evaluation, samples and reconstructions
//! (with the stabilizers' evaluation parameters, an EMA say), and capturing or restoring the
//! complete training state for checkpoints and the health monitor's rollback.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use nash_core::data::{DataLoader, DataSource, Split};
use nash_core::dfdx::shapes::HasShape;
use nash_core::layers::BuildContext;
use nash_core::metric::Metric;
use nash_core::model::{EvalContext, Model};
use nash_core::optim::Optimizer;
use nash_core::rand::SeedableRng;
use nash_core::serde_json::json;
use nash_core::stabilizer::{HookContext, StabilizerStack};
use nash_core::tensor::{Device, ParamRole, Rng};
use nash_core::tracing;

use crate::checkpoint::{self, NamedTensor, RngState, RunRecord, TrainingState};
use crate::health;
use crate::outputs::Pictures;
use crate::pipeline::Pipeline;
use crate::train::write_json;

/// Everything built from the pipeline.
pub(crate) struct Run {
    /// Where tensors live.
    pub(crate) device: Device,
    /// The data source.
    pub(crate) data: Box<dyn DataSource>,
    /// The model.
    pub(crate) model: Box<dyn Model>,
    /// One optimizer per parameter group.
    pub(crate) optimizers: BTreeMap<String, Box<dyn Optimizer>>,
    /// The pipeline's stabilizers, in order.
    pub(crate) stabilizers: StabilizerStack,
    /// The pipeline's metrics.
    pub(crate) metrics: Vec<Box<dyn Metric>>,
    /// Draws samples, scatter plots and reconstructions.
    pub(crate) pictures: Pictures,
    /// What each metric reported with its last values ([`Metric::provenance`]), by metric name;
    /// metrics that report none are left out.
    pub(crate) provenance: crate::train::MetricProvenance,
    /// Batch size of the batches that re-estimate running statistics for evaluation parameters
    /// ([`nash_core::stabilizer::Stabilizer::evaluation_statistics`]): the training batch size.
    pub(crate) statistics_batch_size: usize,
}

pub(crate) fn build(pipeline: &Pipeline, seed: u64, rng: &mut Rng) -> anyhow::Result<Run> {
    let device = Device::seed_from_u64(seed);
    let data = pipeline
        .data
        .build(seed)
        .context("cannot build the data source (`data`)")?;
    tracing::info!("data: {}", data.describe());
    let info = data.info();
    let mut model = pipeline
        .model
        .build(&info, &mut BuildContext { device: &device, rng })
        .context("cannot build the model (`model`)")?;
    tracing::info!("model ({}):\n{}", model.family(), model.describe());

    let expected: BTreeSet<String> = model.param_groups().into_iter().collect();
    let given: BTreeSet<String> = pipeline.optimizers.keys().cloned().collect();
    if expected != given {
        let list = |s: &BTreeSet<String>| {
            if s.is_empty() {
                "none".to_string()
            } else {
                s.iter().map(|g| format!("`{g}`")).collect::<Vec<_>>().join(", ")
            }
        };
        let missing: BTreeSet<String> = expected.difference(&given).cloned().collect();
        let extra: BTreeSet<String> = given.difference(&expected).cloned().collect();
        let mut msg = format!(
            "the {} model has parameter groups {} but the pipeline configures optimizers for {}",
            model.family(),
            list(&expected),
            list(&given)
        );
        if !missing.is_empty() {
            msg += &format!("; add [optimizers.<group>] for {}", list(&missing));
        }
        if !extra.is_empty() {
            msg += &format!("; remove {}", list(&extra));
        }
        return Err(nash_core::Error::config("optimizers", msg).into());
    }
    let optimizers = pipeline
        .optimizers
        .iter()
        .map(|(group, cfg)| {
            let opt = cfg
                .build()
                .with_context(|| format!("cannot build the optimizer `optimizers.{group}`"))?;
            Ok((group.clone(), opt))
        })
        .collect::<anyhow::Result<BTreeMap<_, _>>>()?;

    let stabilizers = pipeline
        .stabilizers
        .iter()
        .enumerate()
        .map(|(i, cfg)| {
            cfg.build()
                .with_context(|| format!("cannot build the stabilizer `stabilizers[{i}]`"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut stabilizers = StabilizerStack::new(stabilizers)?;
    stabilizers
        .validate(model.as_ref())
        .context("a stabilizer does not fit the model")?;
    stabilizers
        .setup(
            model.as_mut(),
            &mut HookContext {
                step: 0,
                device: &device,
                rng,
            },
        )
        .context("a stabilizer could not be set up for the model")?;
    if !stabilizers.is_empty() {
        let names: Vec<&str> = stabilizers.iter().map(|s| s.name()).collect();
        tracing::info!("stabilizers: {}", names.join(", "));
    }
    let metrics = pipeline
        .metrics
        .iter()
        .enumerate()
        .map(|(i, cfg)| {
            cfg.build()
                .with_context(|| format!("cannot build the metric `metrics[{i}]`"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let pictures = Pictures::new(data.as_ref(), &device)?;
    Ok(Run {
        device,
        data,
        model,
        optimizers,
        stabilizers,
        metrics,
        pictures,
        provenance: BTreeMap::new(),
        statistics_batch_size: pipeline.training.batch_size,
    })
}

/// Seed of the inputs that re-estimate running statistics for evaluation parameters: the same
/// batches at every evaluation.
const STATISTICS_SEED: u64 = 0x57A7_15E5_0000_0002;

/// Seed of the generator each evaluation starts from: the same latent codes every time, and
/// evaluations never disturb the training stream.
pub(crate) fn eval_seed(seed: u64) -> u64 {
    seed ^ 0x5EED_E7A1_0000_0001
}

/// Overwrites the parameters of `model` named in `values` and returns their previous values.
fn swap_params(model: &mut dyn Model, values: Vec<(String, Vec<f32>)>) -> anyhow::Result<Vec<(String, Vec<f32>)>> {
    let mut by_name: BTreeMap<String, &mut nash_core::tensor::Param> = model.named_params_mut().into_iter().collect();
    let mut previous = Vec::with_capacity(values.len());
    for (name, v) in values {
        let param = by_name.get_mut(&name).ok_or_else(|| {
            anyhow!("a stabilizer's evaluation parameters name `{name}`, which the model does not have")
        })?;
        previous.push((name.clone(), param.to_vec()));
        param
            .set(&v)
            .with_context(|| format!("cannot use a stabilizer's evaluation values for `{name}`"))?;
    }
    Ok(previous)
}

impl Run {
    /// Everything needed to continue exactly after `step`: parameters, optimizer, stabilizer and
    /// model state, the training generator and the loader's position. The health monitor's
    /// rollback keeps one of these in memory; checkpoints write it with
    /// [`checkpoint::write_checkpoint`].
    pub(crate) fn capture(
        &self,
        step: u64,
        rng: &Rng,
        loader: &DataLoader,
        pipeline_hash: &str,
        record: RunRecord,
    ) -> TrainingState {
        let params = self
            .model
            .named_params()
            .into_iter()
            .map(|(name, p)| NamedTensor {
                name,
                shape: p.shape.clone(),
                values: p.to_vec(),
            })
            .collect();
        let mut state = nash_core::state::StateDict::default();
        for (group, opt) in &self.optimizers {
            state.extend_prefixed(&format!("optimizers.{group}"), opt.state());
        }
        state.extend_prefixed("stabilizers", self.stabilizers.state());
        state.extend_prefixed("model", self.model.extra_state());
        state.extend_prefixed("loader", loader.state());
        TrainingState {
            step,
            params,
            state,
            rng: RngState::capture(rng),
            pipeline_hash: pipeline_hash.to_string(),
            nash_version: env!("CARGO_PKG_VERSION").to_string(),
            record,
        }
    }

    /// Puts `saved` back (the reverse of [`Run::capture`]); `origin` names the checkpoint in errors.
    /// Parameter names and shapes must match the model exactly.
    pub(crate) fn restore(
        &mut self,
        saved: &TrainingState,
        rng: &mut Rng,
        loader: Option<&mut DataLoader>,
        origin: &Path,
    ) -> anyhow::Result<()> {
        let file = origin.join(checkpoint::PARAMS_FILE);
        let mut by_name: BTreeMap<String, &mut nash_core::tensor::Param> =
            self.model.named_params_mut().into_iter().collect();
        for t in &saved.params {
            let Some(p) = by_name.remove(&t.name) else {
                let known: Vec<&String> = by_name.keys().collect();
                return Err(anyhow!(
                    "{}: parameter `{}` is not a parameter of this model (expected names like {:?}); \
                     the checkpoint belongs to another pipeline",
                    file.display(),
                    t.name,
                    known.iter().take(4).collect::<Vec<_>>()
                ));
            };
            if p.shape != t.shape {
                return Err(anyhow!(
                    "{}: parameter `{}` has shape {:?}, the model expects {:?}",
                    file.display(),
                    t.name,
                    t.shape,
                    p.shape
                ));
            }
            p.set(&t.values)
                .with_context(|| format!("{}: parameter `{}`", file.display(), t.name))?;
        }
        if let Some(missing) = by_name.keys().next() {
            return Err(anyhow!(
                "{}: the model's parameter `{missing}` is missing ({} missing in all)",
                file.display(),
                by_name.len()
            ));
        }
        let state_file = origin.join(checkpoint::STATE_FILE);
        let ctx = |what: String| format!("{}: cannot restore {what}", state_file.display());
        self.model
            .load_extra_state(&saved.state.sub("model"))
            .with_context(|| ctx("the model's state".into()))?;
        for (group, opt) in self.optimizers.iter_mut() {
            opt.load_state(&saved.state.sub(&format!("optimizers.{group}")))
                .with_context(|| ctx(format!("the optimizer `{group}`")))?;
        }
        self.stabilizers
            .load_state(&saved.state.sub("stabilizers"))
            .with_context(|| ctx("the stabilizers".into()))?;
        if let Some(loader) = loader {
            loader
                .load_state(&saved.state.sub("loader"))
                .with_context(|| ctx("the data loader".into()))?;
        }
        *rng = saved.rng.restore().with_context(|| ctx("the generator".into()))?;
        Ok(())
    }

    /// Runs `f` with the stabilizers' evaluation parameters (an EMA of the generator's weights) in
    /// place of the trained ones, their running statistics re-estimated where a stabilizer asks
    /// ([`nash_core::stabilizer::Stabilizer::evaluation_statistics`]), and puts the trained values back afterwards, also
    /// when `f` fails.
    pub(crate) fn with_evaluation_params<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let stand_ins = self.stabilizers.evaluation_params();
        let reestimates = self.stabilizers.evaluation_statistics();
        if stand_ins.is_empty() && reestimates.is_empty() {
            return f(self);
        }
        let mut trained = swap_params(self.model.as_mut(), stand_ins)?;
        let result = self
            .reestimate_statistics(&reestimates, &mut trained)
            .and_then(|()| f(self));
        swap_params(self.model.as_mut(), trained)?;
        result
    }

    /// Re-estimates the running statistics of each `(group, batches)` ([`Model::reestimate_statistics`])
    /// from a fixed seed, first adding the live values of every buffer not yet in `trained` (the
    /// values to put back) to it.
    fn reestimate_statistics(
        &mut self,
        reestimates: &[(String, usize)],
        trained: &mut Vec<(String, Vec<f32>)>,
    ) -> anyhow::Result<()> {
        if reestimates.is_empty() {
            return Ok(());
        }
        let saved: BTreeSet<String> = trained.iter().map(|(n, _)| n.clone()).collect();
        trained.extend(
            self.model
                .named_params()
                .into_iter()
                .filter(|(n, p)| p.role == ParamRole::Buffer && !saved.contains(n))
                .map(|(n, p)| (n, p.to_vec())),
        );
        let mut rng = Rng::seed_from_u64(STATISTICS_SEED);
        for (group, batches) in reestimates {
            let drawn = self
                .model
                .reestimate_statistics(
                    group,
                    *batches,
                    self.statistics_batch_size,
                    &mut EvalContext {
                        device: &self.device,
                        rng: &mut rng,
                    },
                )
                .with_context(|| format!("cannot re-estimate the running statistics of group `{group}`"))?;
            if !drawn {
                bail!("the model cannot draw the inputs of group `{group}` to re-estimate its running statistics");
            }
        }
        Ok(())
    }

    /// [`Run::evaluate_with_trained_params`] with the stabilizers' evaluation parameters, plus the
    /// `sample_diversity` metric ([`Run::sample_diversity`] of `diversity` samples; 0: none) unless
    /// a metric already reports one.
    pub(crate) fn evaluate(
        &mut self,
        batches: usize,
        batch_size: usize,
        seed: u64,
        diversity: usize,
    ) -> anyhow::Result<(BTreeMap<String, f64>, BTreeMap<String, f64>)> {
        self.with_evaluation_params(|run| {
            let (eval, mut metrics) = run.evaluate_with_trained_params(batches, batch_size, seed)?;
            if diversity > 0 && !metrics.contains_key("sample_diversity") {
                if let Some(d) = run.sample_diversity(diversity, seed)? {
                    metrics.insert("sample_diversity".into(), d);
                }
            }
            Ok((eval, metrics))
        })
    }

    /// The mean pairwise distance of `n` samples drawn from a fixed seed, divided by the same
    /// statistic of the first `n` test points (1: as spread as the data, near 0: collapsed). `None`
    /// when the model does not sample, samples are not shaped like the data, or the test points
    /// all coincide.
    pub(crate) fn sample_diversity(&mut self, n: usize, seed: u64) -> anyhow::Result<Option<f64>> {
        let n = n.min(self.data.len(Split::Test));
        if n < 2 {
            return Ok(None);
        }
        let mut rng = Rng::seed_from_u64(eval_seed(seed) ^ 0xD1E5);
        let mut ctx = EvalContext {
            device: &self.device,
            rng: &mut rng,
        };
        let Some(samples) = self.model.sample(n, &mut ctx).context("sampling failed")? else {
            return Ok(None);
        };
        let (_, cols) = *samples.shape();
        let idx: Vec<usize> = (0..n).collect();
        let real = self.data.batch(Split::Test, &idx, &self.device)?;
        let (_, real_cols) = *real.inputs.shape();
        if cols != real_cols {
            return Ok(None);
        }
        let reference = health::mean_pairwise_distance(&real.inputs.as_vec(), cols);
        if reference <= 0.0 || !reference.is_finite() {
            return Ok(None);
        }
        Ok(Some(
            health::mean_pairwise_distance(&samples.as_vec(), cols) / reference,
        ))
    }

    /// [`Run::write_samples_with_trained_params`] with the stabilizers' evaluation parameters.
    pub(crate) fn write_samples(&mut self, dir: &Path, step: u64, count: usize, seed: u64) -> anyhow::Result<()> {
        self.with_evaluation_params(|run| run.write_samples_with_trained_params(dir, step, count, seed))
    }

    /// Held-out losses averaged (weighted by batch size) over the first `batches` test batches,
    /// then every metric (their provenance goes to [`Run::provenance`]).
    pub(crate) fn evaluate_with_trained_params(
        &mut self,
        batches: usize,
        batch_size: usize,
        seed: u64,
    ) -> anyhow::Result<(BTreeMap<String, f64>, BTreeMap<String, f64>)> {
        let mut rng = Rng::seed_from_u64(eval_seed(seed));
        let n = self.data.len(Split::Test);
        let mut sums: BTreeMap<String, f64> = BTreeMap::new();
        let mut seen = 0usize;
        for b in 0..batches {
            let start = b * batch_size;
            if start >= n {
                break;
            }
            let idx: Vec<usize> = (start..(start + batch_size).min(n)).collect();
            let batch = self.data.batch(Split::Test, &idx, &self.device)?;
            let mut ctx = EvalContext {
                device: &self.device,
                rng: &mut rng,
            };
            let losses = self.model.evaluate(&batch, &mut ctx).context("evaluation failed")?;
            for (k, v) in losses {
                *sums.entry(k).or_default() += v * idx.len() as f64;
            }
            seen += idx.len();
        }
        let eval = sums.into_iter().map(|(k, v)| (k, v / seen.max(1) as f64)).collect();
        let mut metrics = BTreeMap::new();
        for metric in &mut self.metrics {
            let mut ctx = EvalContext {
                device: &self.device,
                rng: &mut rng,
            };
            let values = metric
                .evaluate(self.model.as_mut(), self.data.as_ref(), &mut ctx)
                .with_context(|| format!("metric `{}` failed", metric.name()))?;
            let provenance = metric.provenance();
            if provenance.is_empty() {
                self.provenance.remove(metric.name());
            } else {
                self.provenance.insert(metric.name().to_string(), provenance);
            }
            for (k, v) in values {
                let key = if metrics.contains_key(&k) {
                    format!("{}/{k}", metric.name())
                } else {
                    k
                };
                metrics.insert(key, v);
            }
        }
        Ok((eval, metrics))
    }

    /// Writes the outputs of `step` into `dir` (see [`crate::outputs`]): for generative models
    /// `count` samples as JSON rows (`step-XXXXXXXX.json`) and as a picture (a grid or a scatter
    /// plot); for models that reconstruct, the first `count` test samples beside their
    /// reconstructions. Sampling and reconstruction draw from their own seeded generators: the same
    /// latent codes every time, and the training stream is never disturbed.
    pub(crate) fn write_samples_with_trained_params(
        &mut self,
        dir: &Path,
        step: u64,
        count: usize,
        seed: u64,
    ) -> anyhow::Result<()> {
        if count == 0 {
            return Ok(());
        }
        let mut rng = Rng::seed_from_u64(eval_seed(seed) ^ 0x5A3B);
        let mut ctx = EvalContext {
            device: &self.device,
            rng: &mut rng,
        };
        if let Some(samples) = self.model.sample(count, &mut ctx).context("sampling failed")? {
            let (rows, cols) = *samples.shape();
            let values = samples.as_vec();
            let rows: Vec<&[f32]> = (0..rows).map(|r| &values[r * cols..(r + 1) * cols]).collect();
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            write_json(
                &dir.join(format!("step-{step:08}.json")),
                &json!({"step": step, "shape": self.data.info().sample_shape, "samples": rows}),
            )?;
            self.pictures
                .write_samples(dir, step, &values, cols)
                .context("cannot draw the samples")?;
        }
        let n = count.min(self.data.len(Split::Test));
        if n == 0 || !matches!(self.pictures.view(), crate::outputs::SampleView::Images(_)) {
            return Ok(());
        }
        let idx: Vec<usize> = (0..n).collect();
        let batch = self.data.batch(Split::Test, &idx, &self.device)?;
        let mut rng = Rng::seed_from_u64(eval_seed(seed) ^ 0x4EC0);
        let mut ctx = EvalContext {
            device: &self.device,
            rng: &mut rng,
        };
        if let Some(recon) = self
            .model
            .reconstruct(&batch, &mut ctx)
            .context("reconstruction failed")?
        {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            self.pictures
                .write_reconstructions(dir, step, &batch.inputs.as_vec(), &recon.as_vec())
                .context("cannot draw the reconstructions")?;
        }
        Ok(())
    }
}
