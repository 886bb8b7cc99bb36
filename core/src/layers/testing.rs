//! Test support shared by every layer's tests: a device and seeded generators, and one gradient
//! checker that compares, against central finite differences, (1) ∂L/∂parameters and ∂L/∂input
//! of `L = Σ y ⊙ R`, (2) [`Layer::input_grad`] against the backward-computed input gradient, and
//! (3) the gradient of a penalty `P = Σ input_grad(x, R) ⊙ S` with respect to the parameters and
//! the input (the second-order path exact gradient penalties depend on).

use dfdx::prelude::*;
use rand::{Rng as _, SeedableRng};

pub(crate) use super::Mode;
use super::{BuildContext, ForwardContext, Layer, LayerConfig};
use crate::tensor::{Activation, Device, FeatureShape, Grads, Rng};

/// A device plus generators for building and running layers in tests.
pub(crate) struct Harness {
    pub dev: Device,
    pub rng: Rng,
    pub fwd_rng: Rng,
}

impl Harness {
    pub fn new(seed: u64) -> Self {
        Harness {
            dev: Device::default(),
            rng: Rng::seed_from_u64(seed),
            fwd_rng: Rng::seed_from_u64(seed ^ 0x5eed),
        }
    }
    pub fn build_ctx(&mut self) -> BuildContext<'_> {
        BuildContext {
            device: &self.dev,
            rng: &mut self.rng,
        }
    }
    pub fn fwd_ctx(&mut self, mode: Mode) -> ForwardContext<'_> {
        ForwardContext {
            mode,
            rng: &mut self.fwd_rng,
        }
    }
    /// A fresh leaf activation.
    pub fn input(&self, values: Vec<f32>, batch: usize, shape: FeatureShape) -> Activation {
        let m = self.dev.tensor_from_vec(values, (batch, shape.numel()));
        Activation::input(&m, shape).unwrap()
    }
    /// `n` values in ±[0.1, 1.5] (kept away from the kinks of (leaky) ReLU).
    pub fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let m: f32 = self.rng.gen_range(0.1..1.5);
                if self.rng.gen_bool(0.5) {
                    m
                } else {
                    -m
                }
            })
            .collect()
    }
}

/// Whether `a` (analytic) and `n` (numeric) agree to ~1e-2 relative.
pub(crate) fn close(a: f64, n: f64, rtol: f64, atol: f64) -> bool {
    (a - n).abs() <= atol + rtol * a.abs().max(n.abs())
}

pub(crate) fn assert_close(what: &str, analytic: &[f32], numeric: &[f64], rtol: f64, atol: f64) {
    assert_eq!(analytic.len(), numeric.len(), "{what}: lengths differ");
    for (i, (&a, &n)) in analytic.iter().zip(numeric).enumerate() {
        assert!(
            close(a as f64, n, rtol, atol),
            "{what}[{i}]: analytic {a} vs numeric {n}\n analytic {analytic:?}\n numeric {numeric:?}"
        );
    }
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Central differences of `f` with respect to every entry of `x`.
pub(crate) fn numeric_grad(x: &[f32], h: f32, mut f: impl FnMut(&[f32]) -> f64) -> Vec<f64> {
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = x[i];
            x[i] = orig + h;
            let plus = f(&x);
            x[i] = orig - h;
            let minus = f(&x);
            x[i] = orig;
            (plus - minus) / (2.0 * h as f64)
        })
        .collect()
}

/// Central differences of `f` with respect to the trainable parameter `index` of `layer`.
pub(crate) fn numeric_param_grad<L: Layer + ?Sized>(
    layer: &mut L,
    index: usize,
    h: f32,
    mut f: impl FnMut(&mut L) -> f64,
) -> Vec<f64> {
    let orig = layer.named_params()[index].1.to_vec();
    let mut x = orig.clone();
    let mut out = Vec::with_capacity(x.len());
    for i in 0..x.len() {
        let mut eval = |layer: &mut L, v: f32| {
            x[i] = v;
            layer.named_params_mut()[index].1.set(&x).unwrap();
            f(layer)
        };
        let plus = eval(layer, orig[i] + h);
        let minus = eval(layer, orig[i] - h);
        x[i] = orig[i];
        out.push((plus - minus) / (2.0 * h as f64));
    }
    layer.named_params_mut()[index].1.set(&orig).unwrap();
    out
}

/// What [`check_layer`] expects of `input_grad`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum InputGrad {
    /// It must match the backward gradient, and its penalty's gradient must match finite differences.
    Exact,
    /// It must return `Error::Unsupported`.
    Unsupported,
}

/// Options for [`check_layer_with`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Check {
    pub batch: usize,
    pub mode: Mode,
    pub seed: u64,
    pub input_grad: InputGrad,
    /// Whether the input is differentiable (false for class indices).
    pub input_differentiable: bool,
    pub h: f32,
}

/// [`check_layer_with`] with the defaults: exact input gradient, differentiable input.
pub(crate) fn check_layer(cfg: &dyn LayerConfig, shape: FeatureShape, batch: usize, mode: Mode, seed: u64) {
    check_layer_with(
        cfg,
        shape,
        Check {
            batch,
            mode,
            seed,
            input_grad: InputGrad::Exact,
            input_differentiable: true,
            h: 1e-2,
        },
    )
}

/// Runs a forward pass with a freshly seeded forward generator (so dropout masks repeat).
fn run(layer: &mut dyn Layer, h: &mut Harness, x: Activation, c: &Check) -> Activation {
    h.fwd_rng = Rng::seed_from_u64(c.seed ^ 0xf00d);
    layer.forward(x, &mut h.fwd_ctx(c.mode)).unwrap()
}

/// [`run`] for an input gradient to follow ([`Layer::forward_for_input_grad`]).
fn run_for_input_grad(layer: &mut dyn Layer, h: &mut Harness, x: Activation, c: &Check) -> Activation {
    h.fwd_rng = Rng::seed_from_u64(c.seed ^ 0xf00d);
    layer.forward_for_input_grad(x, &mut h.fwd_ctx(c.mode)).unwrap()
}

/// Builds `cfg`, then checks all gradients described in the module docs.
pub(crate) fn check_layer_with(cfg: &dyn LayerConfig, shape: FeatureShape, c: Check) {
    let mut h = Harness::new(c.seed);
    let mut layer = cfg.build(shape, &mut h.build_ctx()).unwrap();
    let out_shape = layer.output_shape(shape).unwrap();
    let x0 = if c.input_differentiable {
        h.values(c.batch * shape.numel())
    } else {
        (0..c.batch * shape.numel()).map(|i| ((i * 7 + 3) % 5) as f32).collect()
    };
    let r = h.values(c.batch * out_shape.numel());
    let s = h.values(c.batch * shape.numel());
    let rt = h.dev.tensor_from_vec(r.clone(), (c.batch, out_shape.numel()));

    // (1) first-order gradients by backward.
    let x = h.input(x0.clone(), c.batch, shape);
    let x_leaf = x.detach();
    let y = run(layer.as_mut(), &mut h, x, &c);
    assert_eq!(y.shape, out_shape);
    let loss = (y.value * rt.clone()).sum::<(), _>();
    let grads: Grads = loss.backward();
    let trainable: Vec<usize> = layer
        .named_params()
        .iter()
        .enumerate()
        .filter(|(_, (_, p))| p.trainable())
        .map(|(i, _)| i)
        .collect();
    let loss_fn = |layer: &mut dyn Layer, h: &mut Harness, xv: &[f32]| -> f64 {
        let x = h.input(xv.to_vec(), c.batch, shape);
        let y = run(layer, h, x, &c);
        dot(&y.detach().as_vec(), &r)
    };
    for &i in &trainable {
        let (name, p) = &layer.named_params()[i];
        let name = name.clone();
        let analytic = grads.get(p.value()).as_vec();
        let numeric = numeric_param_grad(layer.as_mut(), i, c.h, |l| loss_fn(l, &mut h, &x0));
        assert_close(&format!("dL/d{name}"), &analytic, &numeric, 1e-2, 2e-3);
    }
    let backward_input_grad = c.input_differentiable.then(|| {
        let analytic = grads.get(&x_leaf).as_vec();
        let numeric = numeric_grad(&x0, c.h, |xv| loss_fn(layer.as_mut(), &mut h, xv));
        assert_close("dL/dinput", &analytic, &numeric, 1e-2, 2e-3);
        analytic
    });

    // (2) input_grad against backward, (3) the penalty's gradient against finite differences.
    let penalty = |layer: &mut dyn Layer, h: &mut Harness, xv: &[f32]| -> Option<(f64, Activation, Activation)> {
        let x = h.input(xv.to_vec(), c.batch, shape);
        let keep = x.reuse();
        let _ = run_for_input_grad(layer, h, x, &c);
        let g = Activation::input(&rt, out_shape).unwrap();
        match layer.input_grad(&keep, g) {
            Ok(gi) => Some((dot(&gi.detach().as_vec(), &s), gi, keep)),
            Err(crate::Error::Unsupported { .. }) => None,
            Err(e) => panic!("input_grad failed: {e}"),
        }
    };
    let got = penalty(layer.as_mut(), &mut h, &x0);
    match (c.input_grad, got) {
        (InputGrad::Unsupported, None) => {}
        (InputGrad::Unsupported, Some(_)) => panic!("input_grad should be unsupported"),
        (InputGrad::Exact, None) => panic!("input_grad is unsupported"),
        (InputGrad::Exact, Some((_, gi, keep))) => {
            assert_eq!(gi.shape, shape);
            if let Some(b) = &backward_input_grad {
                assert_close(
                    "input_grad vs backward",
                    &gi.detach().as_vec(),
                    &b.iter().map(|&v| v as f64).collect::<Vec<_>>(),
                    1e-4,
                    1e-5,
                );
            }
            let st = h.dev.tensor_from_vec(s.clone(), (c.batch, shape.numel()));
            let p = (gi.value * st).sum::<(), _>();
            let pgrads: Grads = p.backward();
            for &i in &trainable {
                let (name, prm) = &layer.named_params()[i];
                let name = name.clone();
                let analytic = grad_or_zeros(&pgrads, prm.value());
                let numeric = numeric_param_grad(layer.as_mut(), i, c.h, |l| penalty(l, &mut h, &x0).unwrap().0);
                assert_close(&format!("dP/d{name}"), &analytic, &numeric, 1e-2, 2e-3);
            }
            if c.input_differentiable {
                let analytic = grad_or_zeros(&pgrads, &keep.value);
                let numeric = numeric_grad(&x0, c.h, |xv| penalty(layer.as_mut(), &mut h, xv).unwrap().0);
                assert_close("dP/dinput", &analytic, &numeric, 1e-2, 2e-3);
            }
        }
    }
}

/// The gradient of `t`, zeros if the backward pass did not reach it.
pub(crate) fn grad_or_zeros<S: Shape, T>(grads: &Grads, t: &Tensor<S, f32, Device, T>) -> Vec<f32> {
    // `Gradients::get` panics on a missing id; allocating on a clone yields zeros for an unreached one.
    let mut g = grads.clone();
    g.get_or_alloc_mut(t).expect("allocating a gradient");
    g.get(t).as_vec()
}
