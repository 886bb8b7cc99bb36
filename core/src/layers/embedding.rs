//! Embedding table for conditional models: a `[batch, 1]` matrix of class indices (stored as
//! `f32`) becomes `[batch, embedding_dim]` rows of the table.

use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

use super::init::Init;
use super::{BuildContext, ForwardContext, Layer, LayerConfig};
use crate::error::{Error, Result};
use crate::tensor::{Activation, FeatureShape, Param, ParamRole, Parameterized, Tape};

/// `{ type = "embedding", num_embeddings = 10, embedding_dim = 16 }`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddingConfig {
    /// Number of classes (valid indices are `0..num_embeddings`).
    pub num_embeddings: usize,
    /// Width of each row.
    pub embedding_dim: usize,
    /// Table initializer; N(0, 1) (PyTorch's default) when absent.
    pub init: Option<Init>,
}

impl Default for EmbeddingConfig {
    fn default() -> Self {
        EmbeddingConfig {
            num_embeddings: 10,
            embedding_dim: 16,
            init: None,
        }
    }
}

impl EmbeddingConfig {
    /// A table of `num_embeddings` rows of width `embedding_dim`.
    pub fn new(num_embeddings: usize, embedding_dim: usize) -> Self {
        EmbeddingConfig {
            num_embeddings,
            embedding_dim,
            init: None,
        }
    }
}

#[typetag::serde(name = "embedding")]
impl LayerConfig for EmbeddingConfig {
    fn build(&self, input: FeatureShape, ctx: &mut BuildContext<'_>) -> Result<Box<dyn Layer>> {
        if self.num_embeddings == 0 || self.embedding_dim == 0 {
            return Err(Error::config(
                "embedding",
                "num_embeddings and embedding_dim must be at least 1",
            ));
        }
        let init = self.init.clone().unwrap_or(Init::Normal { mean: 0.0, std: 1.0 });
        init.validate("init")?;
        let (n, d) = (self.num_embeddings, self.embedding_dim);
        let values = init.sample(n * d, d, n, ctx.rng)?;
        let layer = Embedding {
            num: n,
            dim: d,
            weight: Param::from_vec(ctx.device, values, vec![n, d], ParamRole::Embedding)?,
        };
        layer.output_shape(input)?;
        Ok(Box::new(layer))
    }
}

/// A lookup table; its gradient lands on the looked-up rows.
#[derive(Debug)]
pub struct Embedding {
    num: usize,
    dim: usize,
    weight: Param,
}

impl Embedding {
    /// The table, `[num_embeddings, embedding_dim]`.
    pub fn weight(&self) -> &Param {
        &self.weight
    }
}

impl Parameterized for Embedding {
    fn named_params(&self) -> Vec<(String, &Param)> {
        vec![("weight".into(), &self.weight)]
    }
    fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        vec![("weight".into(), &mut self.weight)]
    }
}

impl Layer for Embedding {
    fn describe(&self) -> String {
        format!("embedding {} x {}", self.num, self.dim)
    }
    fn output_shape(&self, input: FeatureShape) -> Result<FeatureShape> {
        if input.numel() != 1 {
            return Err(Error::shape("embedding", "one class index per sample ([1])", input));
        }
        Ok(FeatureShape::Flat(self.dim))
    }
    fn forward(&mut self, input: Activation, _ctx: &mut ForwardContext<'_>) -> Result<Activation> {
        self.output_shape(input.shape)?;
        let (values, in_tape) = input.value.split_tape();
        let mut idx = Vec::with_capacity(values.shape().0);
        for (row, v) in values.as_vec().into_iter().enumerate() {
            if !(v >= 0.0 && v.fract() == 0.0 && (v as usize) < self.num) {
                return Err(Error::Other(format!(
                    "embedding: sample {row} has class index {v}; expected an integer in 0..{}",
                    self.num
                )));
            }
            idx.push(v as usize);
        }
        let n = idx.len();
        let idx = values.device().tensor_from_vec(idx, (n,));
        // A fresh tape on the table (same id as the flat parameter) records the lookup.
        let table = self.weight.as_matrix(self.num, self.dim).put_tape(Tape::default());
        let out: crate::tensor::Matrix<Tape> = table.try_gather(idx)?;
        let (out, tape) = out.split_tape();
        Activation::new(out.put_tape(tape.merge(in_tape)), FeatureShape::Flat(self.dim))
    }
    fn input_grad(&self, _input: &Activation, _grad_output: Activation) -> Result<Activation> {
        Err(Error::unsupported(
            "the input gradient of an embedding",
            "class indices are not differentiable",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::testing::*;

    #[test]
    fn table_gradient_matches_and_input_grad_is_unsupported() {
        check_layer_with(
            &EmbeddingConfig::new(5, 3),
            FeatureShape::Flat(1),
            Check {
                batch: 4,
                mode: Mode::Train,
                seed: 1,
                input_grad: InputGrad::Unsupported,
                input_differentiable: false,
                h: 1e-2,
            },
        );
    }

    #[test]
    fn looks_up_rows_and_rejects_bad_indices() {
        let mut h = Harness::new(0);
        let mut e = EmbeddingConfig::new(3, 2)
            .build(FeatureShape::Flat(1), &mut h.build_ctx())
            .unwrap();
        e.named_params_mut()[0].1.set(&[0., 1., 10., 11., 20., 21.]).unwrap();
        let x = h.input(vec![2., 0., 2.], 3, FeatureShape::Flat(1));
        let y = e.forward(x, &mut h.fwd_ctx(Mode::Eval)).unwrap();
        assert_eq!(y.detach().as_vec(), vec![20., 21., 0., 1., 20., 21.]);
        for bad in [3.0, -1.0, 0.5, f32::NAN] {
            let x = h.input(vec![bad], 1, FeatureShape::Flat(1));
            assert!(e.forward(x, &mut h.fwd_ctx(Mode::Eval)).is_err());
        }
        assert!(EmbeddingConfig::new(3, 2)
            .build(FeatureShape::Flat(2), &mut h.build_ctx())
            .is_err());
    }
}
