//! Sparse autoencoders: an L1 activity penalty on the code.
//!
//! `sparsity = { l1 = 1e-3 }` in a dense or convolutional autoencoder's table adds
//! `l1 · mean(|code|)` (the mean over the batch and the code's features) to the training loss,
//! reported as `loss/sparsity`.

use nash_core::dfdx::prelude::*;
use nash_core::error::{Error, Result};
use nash_core::tensor::{Matrix, Scalar, Tape};
use serde::{Deserialize, Serialize};

/// The L1 activity penalty (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SparsityConfig {
    /// Weight of `mean(|code|)`, at least 0.
    pub l1: f32,
}

impl Default for SparsityConfig {
    fn default() -> Self {
        SparsityConfig { l1: 1e-3 }
    }
}

impl SparsityConfig {
    /// Checks the weight; `path` is the config path used in errors (`model.sparsity`).
    pub fn validate(&self, path: &str) -> Result<()> {
        if !(self.l1.is_finite() && self.l1 >= 0.0) {
            return Err(Error::config(
                format!("{path}.l1"),
                format!("the penalty weight must be finite and at least 0, got {}", self.l1),
            ));
        }
        Ok(())
    }

    /// `l1 · mean(|code|)` on the tape.
    pub fn penalty(&self, code: Matrix<Tape>) -> Scalar {
        code.abs().mean() * self.l1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nash_core::tensor::Device;

    #[test]
    fn penalty_is_the_weighted_mean_absolute_code() {
        let device = Device::default();
        let code: Matrix = device.tensor_from_vec(vec![1.0, -2.0, 0.5, 0.0, 3.0, -0.5], (2, 3));
        let leaf = code.clone();
        let p = SparsityConfig { l1: 0.1 }.penalty(code.leaky_trace());
        // 0.1 · (1 + 2 + 0.5 + 0 + 3 + 0.5) / 6 = 0.7 / 6 = 0.116667
        assert!((p.array() - 0.7 / 6.0).abs() < 1e-7, "{}", p.array());
        // d/dc = 0.1 · sign(c) / 6 (0 at 0).
        let g = p.backward().get(&leaf).as_vec();
        let want = [1.0, -1.0, 1.0, 0.0, 1.0, -1.0].map(|s: f32| s * 0.1 / 6.0);
        for (a, b) in g.iter().zip(want) {
            assert!((a - b).abs() < 1e-7, "{g:?}");
        }
        let err = SparsityConfig { l1: f32::NAN }
            .validate("model.sparsity")
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.sparsity.l1"), "{err}");
    }
}
