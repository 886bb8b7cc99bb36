//! nash-plugin-template: a nash plugin (scaffolded by `nash new-plugin template`) that registers the
//! Charbonnier loss, a smooth L1 loss: `mean(sqrt(r² + ε²) − ε)` with `r = prediction − target`.
//! Use it in a pipeline:
//!
//! ```toml
//! [model]
//! loss = { type = "template_charbonnier", epsilon = 0.01 }
//! ```

use nash_core::error::{Error, Result};
use nash_core::loss::{Loss, LossConfig};
use nash_core::prelude::*;
use nash_core::registry::Registry;
use serde::{Deserialize, Serialize};

nash_core::declare_plugin!(register);

/// Registers every type this plugin brings; the trainer calls it once after loading the library.
pub fn register(registry: &mut Registry) -> Result<()> {
    registry.loss::<CharbonnierLossConfig>("Charbonnier loss: mean of sqrt(r² + epsilon²) − epsilon, a smooth L1 loss")
}

/// Configuration of [`CharbonnierLoss`]: `type = "template_charbonnier"` in pipeline files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CharbonnierLossConfig {
    /// Smoothing: the loss is quadratic for residuals well below `epsilon`; a positive finite number.
    pub epsilon: f32,
}

impl Default for CharbonnierLossConfig {
    fn default() -> Self {
        CharbonnierLossConfig { epsilon: 1e-3 }
    }
}

#[typetag::serde(name = "template_charbonnier")]
impl LossConfig for CharbonnierLossConfig {
    fn build(&self) -> Result<Box<dyn Loss>> {
        if !(self.epsilon.is_finite() && self.epsilon > 0.0) {
            return Err(Error::config(
                "loss.epsilon",
                format!(
                    "the Charbonnier loss needs a positive finite `epsilon`, got {}",
                    self.epsilon
                ),
            ));
        }
        Ok(Box::new(CharbonnierLoss { epsilon: self.epsilon }))
    }
}

/// The Charbonnier loss with smoothing `epsilon`.
#[derive(Clone, Debug)]
pub struct CharbonnierLoss {
    epsilon: f32,
}

impl Loss for CharbonnierLoss {
    fn name(&self) -> &str {
        "template_charbonnier"
    }

    fn compute(&self, prediction: Matrix<Tape>, target: &Matrix) -> Result<Scalar> {
        if prediction.shape() != target.shape() {
            return Err(Error::shape(
                "template_charbonnier loss",
                format!("a target shaped like the prediction {:?}", prediction.shape()),
                format!("{:?}", target.shape()),
            ));
        }
        // The tape rides on the left operand (the prediction).
        let r = prediction - target.clone();
        let e = self.epsilon;
        Ok(((r.square() + e * e).sqrt() - e).mean())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nash_core::tensor::{matrix_from_vec, Device};

    /// Reference, in f64: `mean(sqrt((p - t)**2 + eps**2) - eps)`.
    fn reference(p: &[f64], t: &[f64], eps: f64) -> f64 {
        let sum: f64 = p
            .iter()
            .zip(t)
            .map(|(p, t)| ((p - t).powi(2) + eps * eps).sqrt() - eps)
            .sum();
        sum / p.len() as f64
    }

    const P: [f32; 6] = [0.3, -1.7, 2.5, 0.05, -0.4, 1.2];
    const T: [f32; 6] = [0.1, 0.2, -0.5, 0.0, 0.3, 1.0];
    const EPS: f32 = 0.1;

    fn loss_and_grad(p: &[f32]) -> (f32, Vec<f32>) {
        let dev = Device::default();
        let prediction = matrix_from_vec(&dev, p.to_vec(), 2, 3).unwrap();
        let target = matrix_from_vec(&dev, T.to_vec(), 2, 3).unwrap();
        let loss = CharbonnierLossConfig { epsilon: EPS }.build().unwrap();
        let value = loss.compute(prediction.leaky_trace(), &target).unwrap();
        let v = value.array();
        let grads = value.backward();
        (v, grads.get(&prediction).as_vec())
    }

    #[test]
    fn value_and_gradient_match_the_reference() {
        let (value, grad) = loss_and_grad(&P);
        let p: Vec<f64> = P.iter().map(|&x| x as f64).collect();
        let t: Vec<f64> = T.iter().map(|&x| x as f64).collect();
        let eps = EPS as f64;
        let expected = reference(&p, &t, eps);
        // By hand: r = [0.2, -1.9, 3.0, 0.05, -0.7, 0.2] → sqrt(r² + 0.01) − 0.1 =
        // [0.123607, 1.802630, 2.901666, 0.011803, 0.607107, 0.123607], mean 0.928403.
        assert!((expected - 0.928_403).abs() < 1e-5, "{expected}");
        assert!((value as f64 - expected).abs() < 1e-5, "{value} vs {expected}");
        let h = 1e-6;
        for i in 0..P.len() {
            let (mut plus, mut minus) = (p.clone(), p.clone());
            plus[i] += h;
            minus[i] -= h;
            let numeric = (reference(&plus, &t, eps) - reference(&minus, &t, eps)) / (2.0 * h);
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
            nash_core::serde_json::from_str(r#"{"type": "template_charbonnier", "epsilon": 0.5}"#).unwrap();
        assert_eq!(config.build().unwrap().name(), "template_charbonnier");
        let err = CharbonnierLossConfig { epsilon: 0.0 }
            .build()
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("loss.epsilon") && err.contains("positive"), "{err}");
        let dev = Device::default();
        let p = matrix_from_vec(&dev, vec![0.0; 4], 2, 2).unwrap();
        let t = matrix_from_vec(&dev, vec![0.0; 6], 2, 3).unwrap();
        assert!(CharbonnierLossConfig::default()
            .build()
            .unwrap()
            .compute(p.leaky_trace(), &t)
            .is_err());
    }
}
