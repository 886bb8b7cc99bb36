//! Test support for the autoencoder models: data descriptions, small synthetic batches, a training
//! loop and a central-difference gradient checker.

use std::collections::BTreeMap;

use nash_core::data::{Batch, DataInfo};
use nash_core::layers::BuildContext;
use nash_core::model::{EvalContext, Model, StepReport, TrainContext};
use nash_core::optim::adam::AdamConfig;
use nash_core::optim::{Optimizer, OptimizerConfig};
use nash_core::rand::{Rng as _, SeedableRng};
use nash_core::stabilizer::StabilizerStack;
use nash_core::tensor::{Device, FeatureShape, Param, Parameterized, Rng};

use nash_core::dfdx::prelude::*;

/// Data of per-sample `shape` with values in `range`.
pub fn info(shape: FeatureShape, range: (f32, f32)) -> DataInfo {
    DataInfo {
        sample_shape: shape,
        num_classes: None,
        value_range: range,
    }
}

/// Runs `f` with a build context seeded by `seed`.
pub fn with_build<T>(seed: u64, f: impl FnOnce(&mut BuildContext<'_>) -> T) -> T {
    let device = Device::default();
    let mut rng = Rng::seed_from_u64(seed);
    f(&mut BuildContext {
        device: &device,
        rng: &mut rng,
    })
}

/// `rows` samples of rank-2 data in `range`: `x = lo + (hi - lo) σ(a u + b v)` for fixed directions u, v.
pub fn low_rank_batch(device: &Device, rows: usize, shape: FeatureShape, range: (f32, f32), rng: &mut Rng) -> Batch {
    let dim = shape.numel();
    let u: Vec<f32> = (0..dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let v: Vec<f32> = (0..dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let mut values = Vec::with_capacity(rows * dim);
    for _ in 0..rows {
        let (a, b) = (rng.gen_range(-2.0f32..2.0), rng.gen_range(-2.0f32..2.0));
        values.extend((0..dim).map(|j| {
            let s = 1.0 / (1.0 + (-(a * u[j] + b * v[j])).exp());
            range.0 + (range.1 - range.0) * s
        }));
    }
    Batch {
        inputs: device.tensor_from_vec(values, (rows, dim)),
        shape,
        labels: None,
    }
}

/// Adam for the `model` group.
pub fn adam(lr: f64) -> BTreeMap<String, Box<dyn Optimizer>> {
    let cfg = AdamConfig {
        lr,
        ..Default::default()
    };
    BTreeMap::from([("model".to_string(), cfg.build().unwrap())])
}

/// `steps` training steps on `batch` with Adam(`lr`), returning every report.
pub fn train(model: &mut dyn Model, batch: &Batch, steps: u64, lr: f64, rng: &mut Rng) -> Vec<StepReport> {
    let device = Device::default();
    let mut opts = adam(lr);
    let mut stabilizers = StabilizerStack::default();
    (0..steps)
        .map(|step| {
            let mut ctx = TrainContext {
                step,
                device: &device,
                rng,
                optimizers: &mut opts,
                stabilizers: &mut stabilizers,
            };
            let report = model.train_step(batch, &mut ctx).unwrap();
            assert!(report.first_non_finite().is_none(), "{report:?}");
            report
        })
        .collect()
}

/// Mean of `key` over the first and the last `window` reports.
pub fn first_last(reports: &[StepReport], key: &str, window: usize) -> (f64, f64) {
    let mean = |r: &[StepReport]| r.iter().map(|r| r.losses[key]).sum::<f64>() / r.len() as f64;
    (mean(&reports[..window]), mean(&reports[reports.len() - window..]))
}

/// An evaluation context.
pub fn eval_ctx<'a>(device: &'a Device, rng: &'a mut Rng) -> EvalContext<'a> {
    EvalContext { device, rng }
}

/// Central differences (step `h`) of `f` with respect to every entry of parameter `index`.
pub fn numeric_param_grad<M: Parameterized>(
    model: &mut M,
    index: usize,
    h: f32,
    mut f: impl FnMut(&mut M) -> f64,
) -> Vec<f64> {
    let base = model.named_params()[index].1.to_vec();
    let set = |model: &mut M, values: &[f32]| {
        let mut params = model.named_params_mut();
        let p: &mut Param = params[index].1;
        p.set(values).unwrap();
    };
    let mut out = Vec::with_capacity(base.len());
    for i in 0..base.len() {
        let mut v = base.clone();
        v[i] = base[i] + h;
        set(model, &v);
        let plus = f(model);
        v[i] = base[i] - h;
        set(model, &v);
        let minus = f(model);
        out.push((plus - minus) / (2.0 * h as f64));
    }
    set(model, &base);
    out
}

/// Asserts that `analytic` and `numeric` agree within `atol + rtol · max(|a|, |n|)` entrywise.
pub fn assert_close(what: &str, analytic: &[f32], numeric: &[f64], rtol: f64, atol: f64) {
    assert_eq!(analytic.len(), numeric.len(), "{what}: lengths differ");
    for (i, (&a, &n)) in analytic.iter().zip(numeric).enumerate() {
        let a = a as f64;
        assert!(
            (a - n).abs() <= atol + rtol * a.abs().max(n.abs()),
            "{what}[{i}]: analytic {a} vs numeric {n}\n analytic {analytic:?}\n numeric {numeric:?}"
        );
    }
}
