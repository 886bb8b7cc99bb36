//! An example third-party nash plugin: the Huber loss, written the way the plugin guide in
//! `README.md` says.
//!
//! `huber(r) = r² / 2` for `|r| ≤ δ` and `δ (|r| − δ / 2)` beyond, with `r = prediction − target`,
//! averaged over every element like PyTorch's `torch.nn.HuberLoss(delta=δ)`. Use it in a pipeline:
//!
//! ```toml
//! plugins = ["path/to/libnash_huber_loss.so"]
//! [model.loss]
//! type = "huber"
//! delta = 0.5
//! ```

use nash_core::error::{Error, Result};
use nash_core::loss::{Loss, LossConfig};
use nash_core::prelude::*;
use nash_core::registry::Registry;
use serde::{Deserialize, Serialize};

nash_core::declare_plugin!(register);

/// Registers every type this plugin brings; the trainer calls it once after loading the library.
pub fn register(registry: &mut Registry) -> Result<()> {
    registry.loss::<HuberLossConfig>(
        "Huber loss: quadratic within `delta` of the target, linear beyond (PyTorch's HuberLoss, mean over elements)",
    )
}

/// Configuration of [`HuberLoss`]: `type = "huber"` in pipeline files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HuberLossConfig {
    /// Where the loss turns from quadratic to linear; a positive finite number.
    pub delta: f32,
}

impl Default for HuberLossConfig {
    fn default() -> Self {
        HuberLossConfig { delta: 1.0 }
    }
}

#[typetag::serde(name = "huber")]
impl LossConfig for HuberLossConfig {
    fn build(&self) -> Result<Box<dyn Loss>> {
        if !(self.delta.is_finite() && self.delta > 0.0) {
            return Err(Error::config(
                "loss.delta",
                format!("the Huber loss needs a positive finite `delta`, got {}", self.delta),
            ));
        }
        Ok(Box::new(HuberLoss { delta: self.delta }))
    }
}

/// The Huber loss with threshold `delta`.
#[derive(Clone, Debug)]
pub struct HuberLoss {
    delta: f32,
}

impl Loss for HuberLoss {
    fn name(&self) -> &str {
        "huber"
    }

    fn compute(&self, prediction: Matrix<Tape>, target: &Matrix) -> Result<Scalar> {
        if prediction.shape() != target.shape() {
            return Err(Error::shape(
                "huber loss",
                format!("a target shaped like the prediction {:?}", prediction.shape()),
                format!("{:?}", target.shape()),
            ));
        }
        // With a = |r| and q = min(a, δ): huber = q²/2 + δ (a − q), exact on both branches and
        // differentiable everywhere except at r = 0 and |r| = δ (where both sides agree).
        let a = (prediction - target.clone()).abs();
        let q = a.with_empty_tape().clamp(0.0, self.delta);
        let linear = (a - q.with_empty_tape()) * self.delta;
        let quadratic = q.square() * 0.5;
        Ok((quadratic + linear).mean())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nash_core::tensor::{matrix_from_vec, Device};

    /// Reference, in f64: PyTorch's `torch.nn.HuberLoss(delta=d)(p, t)` =
    /// `mean(where(|p-t| < d, 0.5*(p-t)**2, d*(|p-t| - 0.5*d)))`.
    fn reference(p: &[f64], t: &[f64], d: f64) -> f64 {
        let sum: f64 = p
            .iter()
            .zip(t)
            .map(|(p, t)| {
                let r = (p - t).abs();
                if r < d {
                    0.5 * r * r
                } else {
                    d * (r - 0.5 * d)
                }
            })
            .sum();
        sum / p.len() as f64
    }

    // Residuals on both branches and both signs, away from the kinks at 0 and ±δ.
    const P: [f32; 6] = [0.3, -1.7, 2.5, 0.05, -0.4, 1.2];
    const T: [f32; 6] = [0.1, 0.2, -0.5, 0.0, 0.3, 1.0];
    const DELTA: f32 = 0.5;

    fn loss_and_grad(p: &[f32]) -> (f32, Vec<f32>) {
        let dev = Device::default();
        let prediction = matrix_from_vec(&dev, p.to_vec(), 2, 3).unwrap();
        let target = matrix_from_vec(&dev, T.to_vec(), 2, 3).unwrap();
        let loss = HuberLossConfig { delta: DELTA }.build().unwrap();
        let value = loss.compute(prediction.leaky_trace(), &target).unwrap();
        let v = value.array();
        let grads = value.backward();
        (v, grads.get(&prediction).as_vec())
    }

    #[test]
    fn value_matches_reference_formula() {
        let (value, _) = loss_and_grad(&P);
        let p: Vec<f64> = P.iter().map(|&x| x as f64).collect();
        let t: Vec<f64> = T.iter().map(|&x| x as f64).collect();
        let expected = reference(&p, &t, DELTA as f64);
        // By hand: r = [0.2, -1.9, 3.0, 0.05, -0.7, 0.2] →
        // [0.02, 0.825, 1.375, 0.00125, 0.225, 0.02] / 6 = 0.41104166…
        assert!((expected - 0.411_041_666).abs() < 1e-8, "{expected}");
        assert!((value as f64 - expected).abs() < 1e-6, "{value} vs {expected}");
    }

    #[test]
    fn gradient_matches_central_differences() {
        let (_, grad) = loss_and_grad(&P);
        let t: Vec<f64> = T.iter().map(|&x| x as f64).collect();
        let h = 1e-6;
        for i in 0..P.len() {
            let mut plus: Vec<f64> = P.iter().map(|&x| x as f64).collect();
            let mut minus = plus.clone();
            plus[i] += h;
            minus[i] -= h;
            let numeric = (reference(&plus, &t, DELTA as f64) - reference(&minus, &t, DELTA as f64)) / (2.0 * h);
            let analytic = grad[i] as f64;
            assert!(
                (analytic - numeric).abs() <= 1e-2 * numeric.abs().max(1e-3),
                "d loss / d p[{i}]: backward {analytic}, central difference {numeric}"
            );
        }
    }

    #[test]
    fn config_round_trips_and_refuses_bad_values() {
        let config: Box<dyn LossConfig> =
            nash_core::serde_json::from_str(r#"{"type": "huber", "delta": 0.25}"#).unwrap();
        assert_eq!(config.build().unwrap().name(), "huber");
        let default: Box<dyn LossConfig> = nash_core::serde_json::from_str(r#"{"type": "huber"}"#).unwrap();
        assert!(format!("{default:?}").contains("delta: 1.0"));
        let unknown = nash_core::serde_json::from_str::<Box<dyn LossConfig>>(r#"{"type": "huber", "dleta": 1}"#);
        assert!(unknown.is_err());
        let err = HuberLossConfig { delta: -1.0 }.build().err().unwrap().to_string();
        assert!(err.contains("loss.delta") && err.contains("positive"), "{err}");
        let dev = Device::default();
        let p = matrix_from_vec(&dev, vec![0.0; 4], 2, 2).unwrap();
        let t = matrix_from_vec(&dev, vec![0.0; 6], 2, 3).unwrap();
        let loss = HuberLossConfig::default().build().unwrap();
        assert!(loss.compute(p.leaky_trace(), &t).is_err());
    }
}
