//! The basic losses: mean squared error, mean absolute error, binary cross-entropy on logits and
//! cross-entropy over classes. Each is the mean over every element (or, for cross-entropy, over
//! the batch), as PyTorch's `reduction="mean"`.

use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

use super::{Loss, LossConfig};
use crate::error::{Error, Result};
use crate::tensor::{Matrix, Scalar, Tape};

/// Fails unless `prediction` and `target` have the same non-empty shape.
fn check_same_shape(loss: &str, prediction: &Matrix<Tape>, target: &Matrix) -> Result<()> {
    let (p, t) = (*prediction.shape(), *target.shape());
    if p != t {
        return Err(Error::shape(
            format!("{loss} loss target"),
            format!("the prediction's shape [{}, {}]", p.0, p.1),
            format!("[{}, {}]", t.0, t.1),
        ));
    }
    if p.0 * p.1 == 0 {
        return Err(Error::shape(
            format!("{loss} loss"),
            "at least one element",
            format!("[{}, {}]", p.0, p.1),
        ));
    }
    Ok(())
}

/// `type = "mse"`: mean of `(prediction - target)²` (PyTorch `MSELoss`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MseConfig {}

#[typetag::serde(name = "mse")]
impl LossConfig for MseConfig {
    fn build(&self) -> Result<Box<dyn Loss>> {
        Ok(Box::new(Mse))
    }
}

/// Mean squared error (see [`MseConfig`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Mse;

impl Loss for Mse {
    fn name(&self) -> &str {
        "mse"
    }
    fn compute(&self, prediction: Matrix<Tape>, target: &Matrix) -> Result<Scalar> {
        check_same_shape("mse", &prediction, target)?;
        #[cfg(not(feature = "cuda"))]
        return Ok(mean_squared_error(prediction, target));
        #[cfg(feature = "cuda")]
        Ok((prediction - target.clone()).square().mean())
    }
}

/// `mean((p - t)²)` as one tape op: one pass forward (the sum in f64), and a backward pass that
/// adds `2·(p - t)/n` times the output's gradient into the prediction's gradient. Replaces dfdx's
/// `sub`, `square` and `mean`, each of which allocates a full-size buffer forward and backward.
/// CPU only: gradient buffers are host slices.
#[cfg(not(feature = "cuda"))]
fn mean_squared_error(prediction: Matrix<Tape>, target: &Matrix) -> Scalar {
    let (prediction, mut tape) = prediction.split_tape();
    let mut difference = crate::kernels::host(&prediction);
    let n = difference.len();
    let target = crate::kernels::host(target);
    // Indexed loops over slices of one length, compiled for the CPU's widest vectors.
    crate::kernels::on_widest_vectors(
        #[inline(always)]
        || {
            let (difference, target) = (&mut difference[..n], &target[..n]);
            for i in 0..n {
                difference[i] -= target[i];
            }
        },
    );
    let sum = crate::kernels::sum_of_squares(&difference);
    let loss = prediction.device().tensor((sum / n as f64) as f32);
    let (pg, lg) = (prediction.ghost(), loss.ghost());
    dfdx::tensor::Tape::add_backward_op(&mut tape, move |grads| {
        let scale = 2.0 * grads.get_or_alloc_mut(&lg)?[0] / n as f32;
        let gradient = &mut grads.get_or_alloc_mut(&pg)?[..n];
        crate::kernels::on_widest_vectors(
            #[inline(always)]
            || {
                let difference = &difference[..n];
                for i in 0..n {
                    gradient[i] += scale * difference[i];
                }
            },
        );
        Ok(())
    });
    loss.put_tape(tape)
}

/// `type = "l1"`: mean of `|prediction - target|` (PyTorch `L1Loss`; the gradient at 0 is 0).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct L1Config {}

#[typetag::serde(name = "l1")]
impl LossConfig for L1Config {
    fn build(&self) -> Result<Box<dyn Loss>> {
        Ok(Box::new(L1))
    }
}

/// Mean absolute error (see [`L1Config`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct L1;

impl Loss for L1 {
    fn name(&self) -> &str {
        "l1"
    }
    fn compute(&self, prediction: Matrix<Tape>, target: &Matrix) -> Result<Scalar> {
        check_same_shape("l1", &prediction, target)?;
        Ok((prediction - target.clone()).abs().mean())
    }
}

/// `type = "bce_with_logits"`: binary cross-entropy on logits `x` with targets `y` in [0, 1],
/// `mean(max(x, 0) - x * y + ln(1 + exp(-|x|)))` (PyTorch `BCEWithLogitsLoss`). Finite for any
/// finite logit (±1e4 included); the gradient is `(sigmoid(x) - y) / n`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BceWithLogitsConfig {}

#[typetag::serde(name = "bce_with_logits")]
impl LossConfig for BceWithLogitsConfig {
    fn build(&self) -> Result<Box<dyn Loss>> {
        Ok(Box::new(BceWithLogits))
    }
}

/// Binary cross-entropy on logits (see [`BceWithLogitsConfig`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct BceWithLogits;

impl Loss for BceWithLogits {
    fn name(&self) -> &str {
        "bce_with_logits"
    }
    fn compute(&self, prediction: Matrix<Tape>, target: &Matrix) -> Result<Scalar> {
        check_same_shape("bce_with_logits", &prediction, target)?;
        // dfdx's fused kernel computes exactly the stable formula above.
        Ok(prediction.bce_with_logits(target.clone()).mean())
    }
}

/// `type = "cross_entropy"`: cross-entropy of `[batch, classes]` logits against one class index
/// per row, given as a `[batch, 1]` matrix of whole numbers in `0..classes`:
/// `-mean_i log_softmax(x_i)[y_i]` (PyTorch `CrossEntropyLoss` with class-index targets).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CrossEntropyConfig {}

#[typetag::serde(name = "cross_entropy")]
impl LossConfig for CrossEntropyConfig {
    fn build(&self) -> Result<Box<dyn Loss>> {
        Ok(Box::new(CrossEntropy))
    }
}

/// Cross-entropy over classes (see [`CrossEntropyConfig`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct CrossEntropy;

impl Loss for CrossEntropy {
    fn name(&self) -> &str {
        "cross_entropy"
    }
    fn compute(&self, prediction: Matrix<Tape>, target: &Matrix) -> Result<Scalar> {
        let (batch, classes) = *prediction.shape();
        let t = *target.shape();
        if t != (batch, 1) {
            return Err(Error::shape(
                "cross_entropy loss target",
                format!("[{batch}, 1]: one class index per row"),
                format!("[{}, {}]", t.0, t.1),
            ));
        }
        if batch == 0 || classes == 0 {
            return Err(Error::shape(
                "cross_entropy loss",
                "logits with at least one row and one class",
                format!("[{batch}, {classes}]"),
            ));
        }
        let mut one_hot = vec![0.0f32; batch * classes];
        for (row, &y) in target.as_vec().iter().enumerate() {
            if !(y.is_finite() && y >= 0.0 && y.fract() == 0.0 && (y as usize) < classes) {
                return Err(Error::shape(
                    format!("cross_entropy loss target row {row}"),
                    format!("a class index in 0..{classes}"),
                    y,
                ));
            }
            one_hot[row * classes + y as usize] = 1.0;
        }
        let one_hot: Matrix = prediction.device().tensor_from_vec(one_hot, (batch, classes));
        let picked = (prediction.log_softmax::<Axis<1>>() * one_hot).sum::<Rank0, _>();
        Ok(picked * (-1.0 / batch as f32))
    }
}

/// Registers the basic losses.
pub fn register(registry: &mut crate::registry::Registry) -> Result<()> {
    registry.loss::<MseConfig>("mean squared error")?;
    registry.loss::<L1Config>("mean absolute error")?;
    registry.loss::<BceWithLogitsConfig>("binary cross-entropy on logits, numerically stable")?;
    registry.loss::<CrossEntropyConfig>("cross-entropy of class logits against [batch, 1] class indices")?;
    Ok(())
}

#[cfg(test)]
// Reference numbers are pasted verbatim from PyTorch's `%.9g` output (which round-trips f32).
#[allow(clippy::excessive_precision)]
mod tests {
    use super::*;
    use crate::tensor::{matrix_from_vec, Device};

    // Reference values: PyTorch 2.15, float32.
    //   import torch; F = torch.nn.functional
    //   X = [[0.5, -1.2, 2.0, 0.1], [-0.3, 0.8, -2.5, 1.5], [1.1, 0.0, -0.7, 3.0]]
    //   Y = [[0.2, -1.0, 1.0, 0.6], [0.1, 0.9, -2.0, -1.0], [1.5, 0.3, -0.7, 2.0]]
    //   P = [[1.0, 0.0, 0.5, 0.2], [0.0, 1.0, 0.3, 0.9], [0.7, 0.0, 1.0, 0.0]]
    //   C = [2, 0, 3]
    //   def show(f, y):
    //       x = torch.tensor(X, requires_grad=True); l = f(x, y); l.backward()
    //       return l.item(), x.grad.flatten().tolist()
    // Each test gives the `show(...)` call that produced its numbers.
    const X: [f32; 12] = [0.5, -1.2, 2.0, 0.1, -0.3, 0.8, -2.5, 1.5, 1.1, 0.0, -0.7, 3.0];
    const Y: [f32; 12] = [0.2, -1.0, 1.0, 0.6, 0.1, 0.9, -2.0, -1.0, 1.5, 0.3, -0.7, 2.0];
    const P: [f32; 12] = [1.0, 0.0, 0.5, 0.2, 0.0, 1.0, 0.3, 0.9, 0.7, 0.0, 1.0, 0.0];
    const C: [f32; 3] = [2.0, 0.0, 3.0];

    fn build(json: &str) -> Box<dyn Loss> {
        let config: Box<dyn LossConfig> = serde_json::from_str(json).unwrap();
        config.build().unwrap()
    }

    /// The loss and its gradient with respect to the `rows x cols` prediction `x`.
    fn loss_and_grad(loss: &dyn Loss, x: &[f32], rows: usize, target: &Matrix) -> (f32, Vec<f32>) {
        let dev = Device::default();
        let x = matrix_from_vec(&dev, x.to_vec(), rows, x.len() / rows).unwrap();
        let l = loss.compute(x.leaky_trace(), target).unwrap();
        let value = l.array();
        let grads = l.backward();
        (value, grads.get(&x).as_vec())
    }

    fn assert_close(what: &str, got: &[f32], expected: &[f32], tol: f32) {
        assert_eq!(got.len(), expected.len(), "{what}");
        for (i, (&a, &e)) in got.iter().zip(expected).enumerate() {
            assert!(
                (a - e).abs() <= tol * (1.0 + e.abs()),
                "{what}[{i}]: got {a}, expected {e}"
            );
        }
    }

    /// Checks `loss` and its gradient at `x` against PyTorch's values and against f64 central
    /// differences of `reference`, an f64 implementation of the same formula.
    fn check(json: &str, target: &[f32], target_cols: usize, torch: (f32, &[f32]), reference: impl Fn(&[f64]) -> f64) {
        let dev = Device::default();
        let target = matrix_from_vec(&dev, target.to_vec(), 3, target_cols).unwrap();
        let (value, grad) = loss_and_grad(build(json).as_ref(), &X, 3, &target);
        assert_close(&format!("{json} value"), &[value], &[torch.0], 1e-6);
        assert_close(&format!("{json} gradient"), &grad, torch.1, 1e-6);
        let x: Vec<f64> = X.iter().map(|&v| v as f64).collect();
        assert!(
            (reference(&x) - value as f64).abs() < 1e-6,
            "{json}: f64 reference disagrees"
        );
        let h = 1e-6;
        let fd: Vec<f32> = (0..x.len())
            .map(|i| {
                let (mut up, mut down) = (x.clone(), x.clone());
                up[i] += h;
                down[i] -= h;
                ((reference(&up) - reference(&down)) / (2.0 * h)) as f32
            })
            .collect();
        assert_close(&format!("{json} finite differences"), &grad, &fd, 1e-4);
    }

    fn mean(v: impl Iterator<Item = f64>) -> f64 {
        let v: Vec<f64> = v.collect();
        v.iter().sum::<f64>() / v.len() as f64
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn the_mse_kernel_matches_the_composite_dfdx_path() {
        let dev = Device::default();
        let values = |seed: u32, n: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0)
                .collect()
        };
        let (rows, cols) = (7, 33);
        let x = matrix_from_vec(&dev, values(1, rows * cols), rows, cols).unwrap();
        let t = matrix_from_vec(&dev, values(7, rows * cols), rows, cols).unwrap();
        // Scaled by 3 so that the output's gradient is not 1.
        let run = |fused: bool| {
            let xt = x.leaky_trace();
            let loss = if fused {
                mean_squared_error(xt, &t)
            } else {
                (xt - t.clone()).square().mean()
            } * 3.0;
            let value = loss.array();
            let grads = loss.backward();
            (value, grads.get(&x).as_vec())
        };
        let ((fused, fused_grad), (composite, composite_grad)) = (run(true), run(false));
        assert_close("mse value", &[fused], &[composite], 1e-6);
        assert_close("mse gradient", &fused_grad, &composite_grad, 1e-6);
    }

    #[test]
    fn mse_matches_pytorch_and_finite_differences() {
        // show(F.mse_loss, torch.tensor(Y))
        let grad = [
            0.0500000045,
            -0.0333333425,
            0.166666672,
            -0.0833333358,
            -0.0666666701,
            -0.0166666619,
            -0.0833333358,
            0.416666687,
            -0.0666666627,
            -0.0500000045,
            0.0,
            0.166666672,
        ];
        check(r#"{"type":"mse"}"#, &Y, 4, (0.775000036, &grad), |x| {
            mean(x.iter().zip(Y).map(|(&a, b)| (a - b as f64).powi(2)))
        });
    }

    #[test]
    fn l1_matches_pytorch_and_finite_differences() {
        // show(F.l1_loss, torch.tensor(Y))   (element 10 has x == y: PyTorch's gradient there is 0)
        let s = 0.0833333358;
        let grad = [s, -s, s, -s, -s, -s, -s, s, -s, -s, 0.0, s];
        let dev = Device::default();
        let target = matrix_from_vec(&dev, Y.to_vec(), 3, 4).unwrap();
        let (value, g) = loss_and_grad(build(r#"{"type":"l1"}"#).as_ref(), &X, 3, &target);
        assert_close("l1 value", &[value], &[0.599999964], 1e-6);
        assert_close("l1 gradient", &g, &grad, 1e-6);
        // Finite differences away from the kink (moving element 10 off it).
        let mut x = X;
        x[10] = -0.5;
        check_fd_only(r#"{"type":"l1"}"#, &x, &target, |x| {
            mean(x.iter().zip(Y).map(|(&a, b)| (a - b as f64).abs()))
        });
    }

    /// Finite-difference check of the gradient at `x` only.
    fn check_fd_only(json: &str, x: &[f32], target: &Matrix, reference: impl Fn(&[f64]) -> f64) {
        let (_, grad) = loss_and_grad(build(json).as_ref(), x, 3, target);
        let x: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let h = 1e-6;
        for i in 0..x.len() {
            let (mut up, mut down) = (x.clone(), x.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (reference(&up) - reference(&down)) / (2.0 * h);
            assert!(
                (grad[i] as f64 - fd).abs() < 1e-4 * (1.0 + fd.abs()),
                "{json}[{i}]: {} vs {fd}",
                grad[i]
            );
        }
    }

    fn bce_reference(x: &[f64]) -> f64 {
        mean(
            x.iter()
                .zip(P)
                .map(|(&x, y)| x.max(0.0) - x * y as f64 + (-x.abs()).exp().ln_1p()),
        )
    }

    #[test]
    fn bce_with_logits_matches_pytorch_and_finite_differences() {
        // show(F.binary_cross_entropy_with_logits, torch.tensor(P))
        let grad = [
            -0.0314617194,
            0.0192896016,
            0.0317330845,
            0.0270815995,
            0.0354631245,
            -0.0258354601,
            -0.0186784863,
            -0.00686879456,
            0.00418834388,
            0.0416666679,
            -0.0556823127,
            0.0793811753,
        ];
        check(
            r#"{"type":"bce_with_logits"}"#,
            &P,
            4,
            (0.846391618, &grad),
            bce_reference,
        );
    }

    #[test]
    fn bce_with_logits_is_finite_for_huge_logits() {
        // x = torch.tensor([[1e4], [1e4], [-1e4], [-1e4]], requires_grad=True)
        // l = F.binary_cross_entropy_with_logits(x, torch.tensor([[1.0], [0.0], [1.0], [0.0]])); l.backward()
        // l = 5000.0, x.grad = [0.0, 0.25, -0.25, 0.0]
        let dev = Device::default();
        let target = matrix_from_vec(&dev, vec![1.0, 0.0, 1.0, 0.0], 4, 1).unwrap();
        let (value, grad) = loss_and_grad(&BceWithLogits, &[1e4, 1e4, -1e4, -1e4], 4, &target);
        assert_eq!(value, 5000.0);
        assert_eq!(grad, vec![0.0, 0.25, -0.25, 0.0]);
    }

    fn ce_reference(x: &[f64]) -> f64 {
        mean(x.chunks(4).zip(C).map(|(row, c)| {
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
            lse - row[c as usize]
        }))
    }

    #[test]
    fn cross_entropy_matches_pytorch_and_finite_differences() {
        // show(F.cross_entropy, torch.tensor(C))
        let grad = [
            0.0526202843,
            0.00961286016,
            -0.0975055695,
            0.0352724344,
            -0.300539851,
            0.0985171124,
            0.00363362301,
            0.198389098,
            0.0407295637,
            0.013557693,
            0.00673255045,
            -0.0610198192,
        ];
        check(r#"{"type":"cross_entropy"}"#, &C, 1, (0.955714285, &grad), ce_reference);
    }

    #[test]
    fn bad_targets_are_refused() {
        let dev = Device::default();
        let x = matrix_from_vec(&dev, X.to_vec(), 3, 4).unwrap();
        let err = |loss: &dyn Loss, t: Vec<f32>, cols: usize| {
            let target = matrix_from_vec(&dev, t, 3, cols).unwrap();
            loss.compute(x.leaky_trace(), &target).unwrap_err().to_string()
        };
        assert!(err(&Mse, vec![0.0; 9], 3).contains("[3, 4]"));
        assert!(err(&BceWithLogits, vec![0.0; 6], 2).contains("[3, 2]"));
        assert!(err(&CrossEntropy, vec![0.0; 12], 4).contains("[3, 1]"));
        assert!(err(&CrossEntropy, vec![0.0, 4.0, 1.0], 1).contains("0..4"));
        assert!(err(&CrossEntropy, vec![0.0, 1.5, 1.0], 1).contains("row 1"));
        assert!(err(&CrossEntropy, vec![-1.0, 1.0, 1.0], 1).contains("row 0"));
        assert!(serde_json::from_str::<Box<dyn LossConfig>>(r#"{"type":"mse","reduction":"sum"}"#).is_err());
    }

    #[test]
    fn registers_every_basic_loss() {
        let mut registry = crate::registry::Registry::new();
        register(&mut registry).unwrap();
        assert_eq!(
            registry.tags(crate::registry::Kind::Loss),
            vec!["bce_with_logits", "cross_entropy", "l1", "mse"]
        );
    }
}
