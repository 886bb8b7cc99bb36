//! A stack of layers applied in order, and the input-gradient pass that exact gradient penalties
//! (WGAN-GP, R1, R2, DRAGAN) differentiate through.

use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

use super::{BuildContext, ForwardContext, Layer, LayerConfig};
use crate::error::{Error, Result};
use crate::tensor::{join_name, Activation, FeatureShape, Param, Parameterized, Tape};

/// A stack of layers; parameter names are `<index>.<param>` (`0.weight`, `2.bias`).
///
/// Each forward pass keeps a tape-less copy ([`Activation::reuse`]) of every layer's input (the
/// data is shared, not copied) until the next forward pass, for [`Layer::input_grad`]; a plain
/// forward pass fuses an activation into the linear layer before it, so only a pass for input
/// gradients ([`Sequential::forward_with_input_grad`], [`Layer::forward_for_input_grad`]) keeps
/// the activations' inputs.
pub struct Sequential {
    layers: Vec<Box<dyn Layer>>,
    input: FeatureShape,
    output: FeatureShape,
    last_inputs: Vec<Activation>,
}

/// Config of a [`Sequential`]: `layers = [{ type = "linear", out_features = 128 }, { type = "relu" }]`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SequentialConfig {
    /// The layers, in order.
    pub layers: Vec<Box<dyn LayerConfig>>,
}

/// Joins config paths: `model.encoder` + `layers[2]` → `model.encoder.layers[2]`.
fn join_path(outer: &str, inner: &str) -> String {
    match (outer.is_empty(), inner.is_empty()) {
        (true, _) => inner.to_string(),
        (false, true) => outer.to_string(),
        (false, false) => format!("{outer}.{inner}"),
    }
}

/// Re-roots an error at `path` (a nested config error keeps its inner path below it).
fn at_path(path: &str, e: Error) -> Error {
    match e {
        Error::Config { path: inner, message } => Error::config(join_path(path, &inner), message),
        other => Error::config(path, other.to_string()),
    }
}

impl SequentialConfig {
    /// A stack of the given layer configs.
    pub fn new(layers: Vec<Box<dyn LayerConfig>>) -> Self {
        SequentialConfig { layers }
    }
    /// Appends a layer (builder style).
    pub fn push(mut self, layer: impl LayerConfig + 'static) -> Self {
        self.layers.push(Box::new(layer));
        self
    }
    /// Builds every layer for inputs of shape `input`. `path` is the config path used in errors
    /// (`model.encoder` gives `model.encoder.layers[2]: ...`).
    pub fn build(&self, input: FeatureShape, ctx: &mut BuildContext<'_>, path: &str) -> Result<Sequential> {
        let mut layers = Vec::with_capacity(self.layers.len());
        let mut shape = input;
        for (i, cfg) in self.layers.iter().enumerate() {
            let here = join_path(path, &format!("layers[{i}]"));
            let layer = cfg.build(shape, ctx).map_err(|e| at_path(&here, e))?;
            shape = layer.output_shape(shape).map_err(|e| at_path(&here, e))?;
            layers.push(layer);
        }
        Ok(Sequential {
            layers,
            input,
            output: shape,
            last_inputs: Vec::new(),
        })
    }
}

#[typetag::serde(name = "sequential")]
impl LayerConfig for SequentialConfig {
    fn build(&self, input: FeatureShape, ctx: &mut BuildContext<'_>) -> Result<Box<dyn Layer>> {
        Ok(Box::new(SequentialConfig::build(self, input, ctx, "")?))
    }
}

impl Sequential {
    /// A stack of already built layers, checking that their shapes chain from `input`.
    pub fn new(layers: Vec<Box<dyn Layer>>, input: FeatureShape) -> Result<Self> {
        let mut shape = input;
        for (i, l) in layers.iter().enumerate() {
            shape = l.output_shape(shape).map_err(|e| at_path(&format!("layers[{i}]"), e))?;
        }
        Ok(Sequential {
            layers,
            input,
            output: shape,
            last_inputs: Vec::new(),
        })
    }
    /// The per-sample input shape.
    pub fn input_shape(&self) -> FeatureShape {
        self.input
    }
    /// The per-sample output shape.
    pub fn output_shape(&self) -> FeatureShape {
        self.output
    }
    /// The layers.
    pub fn layers(&self) -> &[Box<dyn Layer>] {
        &self.layers
    }
    /// The layers, mutably (to edit parameters in place).
    pub fn layers_mut(&mut self) -> &mut [Box<dyn Layer>] {
        &mut self.layers
    }
    /// Number of layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }
    /// Whether there are no layers (the identity).
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
    /// One line per layer: `0: linear 784 -> 128`.
    pub fn summary(&self) -> Vec<String> {
        self.layers
            .iter()
            .enumerate()
            .map(|(i, l)| format!("{i}: {}", l.describe()))
            .collect()
    }
    /// Runs every layer. An activation right after a layer that fuses it (a linear layer,
    /// [`Layer::fuses_activation`]) runs inside that layer's op: no separate pass, buffer or tape
    /// op. [`Sequential::forward_with_input_grad`] runs the layers one by one instead.
    pub fn forward(&mut self, input: Activation, ctx: &mut ForwardContext<'_>) -> Result<Activation> {
        self.run(input, ctx, true)
    }
    /// [`Sequential::forward`] with every parameter of the stack frozen for this pass
    /// ([`Param::requires_grad`] off, as PyTorch's `requires_grad_(False)`): its backward pass
    /// computes the gradient of the input, and through it of whatever produced the input, but no
    /// weight gradient in the layers with host kernels. For a network that takes part in a pass
    /// without being updated by it: the discriminator during the generator's update. The
    /// parameters' own settings are restored afterwards, also when the pass fails.
    pub fn forward_frozen(&mut self, input: Activation, ctx: &mut ForwardContext<'_>) -> Result<Activation> {
        let settings: Vec<bool> = self
            .named_params_mut()
            .into_iter()
            .map(|(_, p)| {
                let required = p.requires_grad();
                p.set_requires_grad(false);
                required
            })
            .collect();
        let out = self.forward(input, ctx);
        for ((_, p), required) in self.named_params_mut().into_iter().zip(settings) {
            p.set_requires_grad(required);
        }
        out
    }
    /// Runs the layers, fusing activations into the layer before them when `fuse`; keeps each
    /// unfused layer's input for [`Layer::input_grad`].
    fn run(&mut self, input: Activation, ctx: &mut ForwardContext<'_>, fuse: bool) -> Result<Activation> {
        if input.shape != self.input {
            return Err(Error::shape("sequential input", self.input, input.shape));
        }
        self.last_inputs.clear();
        let mut x = input;
        let mut i = 0;
        while i < self.layers.len() {
            self.last_inputs.push(x.reuse());
            let fused = match self.layers.get(i + 1) {
                Some(next) if fuse && self.layers[i].fuses_activation() => next.elementwise_activation(),
                _ => None,
            };
            x = match fused {
                Some(f) => {
                    i += 1;
                    self.layers[i - 1].forward_activated(x, f, ctx)?
                }
                None if fuse => self.layers[i].forward(x, ctx)?,
                None => self.layers[i].forward_for_input_grad(x, ctx)?,
            };
            i += 1;
        }
        Ok(x)
    }
    /// Propagates `grad_output` back through every layer's [`Layer::input_grad`], using the
    /// inputs of the last forward pass.
    fn input_grad_from_last(&self, grad_output: Activation) -> Result<Activation> {
        if self.last_inputs.len() != self.layers.len() {
            return Err(Error::Other(
                "sequential input gradient requested without an unfused forward pass before it \
                 (run forward_with_input_grad, or forward_for_input_grad)"
                    .to_string(),
            ));
        }
        let mut g = grad_output;
        for (i, (layer, input)) in self.layers.iter().zip(&self.last_inputs).enumerate().rev() {
            g = layer.input_grad(input, g).map_err(|e| match e {
                Error::Unsupported { what, why } => Error::Unsupported {
                    what: format!("layer {i} ({}): {what}", layer.describe()),
                    why,
                },
                other => other,
            })?;
        }
        Ok(g)
    }
    /// Runs the stack and also returns ∂(Σ outputs)/∂input per sample, built from differentiable
    /// ops sharing one tape with the forward pass: a penalty on it (WGAN-GP, R1) backpropagates
    /// exactly into the parameters. Requires a single output feature or sums over them.
    ///
    /// The whole tape (forward pass and gradient graph) travels with the returned input
    /// gradient; the returned output carries an empty tape with the same id. Combine any loss on
    /// the output with the penalty (`loss.add(penalty)`) before calling `backward`, or its
    /// gradients are lost.
    pub fn forward_with_input_grad(
        &mut self,
        input: Activation,
        ctx: &mut ForwardContext<'_>,
    ) -> Result<(Activation, Activation)> {
        let out = self.run(input, ctx, false)?;
        let dims = *out.value.shape();
        let ones = out.value.device().try_ones_like(&dims)?.put_tape(Tape::default());
        let g = self.input_grad_from_last(Activation::new(ones, out.shape)?)?;
        let (ov, otape) = out.value.split_tape();
        let (gv, gtape) = g.value.split_tape();
        Ok((
            Activation::new(ov.put_tape(Tape::default()), out.shape)?,
            Activation::new(gv.put_tape(gtape.merge(otape)), g.shape)?,
        ))
    }
}

impl Parameterized for Sequential {
    fn named_params(&self) -> Vec<(String, &Param)> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(i, l)| {
                l.named_params()
                    .into_iter()
                    .map(move |(n, p)| (join_name(&i.to_string(), &n), p))
            })
            .collect()
    }
    fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        self.layers
            .iter_mut()
            .enumerate()
            .flat_map(|(i, l)| {
                l.named_params_mut()
                    .into_iter()
                    .map(move |(n, p)| (join_name(&i.to_string(), &n), p))
            })
            .collect()
    }
}

impl Layer for Sequential {
    fn describe(&self) -> String {
        format!(
            "sequential {} -> {} ({} layers)",
            self.input,
            self.output,
            self.layers.len()
        )
    }
    fn output_shape(&self, input: FeatureShape) -> Result<FeatureShape> {
        if input != self.input {
            return Err(Error::shape("sequential", self.input, input));
        }
        Ok(self.output)
    }
    fn forward(&mut self, input: Activation, ctx: &mut ForwardContext<'_>) -> Result<Activation> {
        Sequential::forward(self, input, ctx)
    }
    fn forward_for_input_grad(&mut self, input: Activation, ctx: &mut ForwardContext<'_>) -> Result<Activation> {
        self.run(input, ctx, false)
    }
    fn input_grad(&self, input: &Activation, grad_output: Activation) -> Result<Activation> {
        if input.shape != self.input {
            return Err(Error::shape("sequential input gradient", self.input, input.shape));
        }
        self.input_grad_from_last(grad_output)
    }
    fn set_statistics_reestimation(&mut self, on: bool) -> bool {
        self.layers
            .iter_mut()
            .fold(false, |any, l| l.set_statistics_reestimation(on) | any)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::activation::{LeakyReluConfig, ReluConfig, TanhConfig};
    use crate::layers::conv::{Conv2dConfig, ConvTranspose2dConfig};
    use crate::layers::linear::LinearConfig;
    use crate::layers::norm::BatchNormConfig;
    use crate::layers::reshape::{FlattenConfig, ReshapeConfig};
    use crate::layers::testing::*;
    use crate::tensor::Grads;

    fn critic(act: &str, h: &mut Harness) -> Sequential {
        let mut cfg = SequentialConfig::default().push(LinearConfig::new(5));
        cfg = match act {
            "tanh" => cfg.push(TanhConfig::default()),
            _ => cfg.push(LeakyReluConfig::new(0.2)),
        };
        cfg = cfg.push(LinearConfig::new(4));
        cfg = match act {
            "tanh" => cfg.push(TanhConfig::default()),
            _ => cfg.push(LeakyReluConfig::new(0.2)),
        };
        cfg.push(LinearConfig::new(1))
            .build(FeatureShape::Flat(3), &mut h.build_ctx(), "critic")
            .unwrap()
    }

    /// mean over samples of (‖g‖ − 1)², computed on the host in f64.
    fn penalty_host(g: &[f32], batch: usize) -> f64 {
        let d = g.len() / batch;
        g.chunks(d)
            .map(|row| {
                let n = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
                (n - 1.0).powi(2)
            })
            .sum::<f64>()
            / batch as f64
    }

    fn penalty_taped(g: Activation) -> crate::tensor::Scalar {
        let norm = g.value.square().sum::<(usize,), Axis<1>>().sqrt();
        (norm - 1.0).square().mean::<(), _>()
    }

    #[test]
    fn mlp_critic_input_grad_and_penalty_are_exact() {
        for act in ["tanh", "leaky_relu"] {
            let mut h = Harness::new(21);
            let mut net = critic(act, &mut h);
            let batch = 3;
            let x0 = h.values(batch * 3);

            // (a) the input gradient equals the backward gradient of Σ output.
            let x = h.input(x0.clone(), batch, FeatureShape::Flat(3));
            let leaf = x.detach();
            let y = net.forward(x, &mut h.fwd_ctx(Mode::Train)).unwrap();
            let grads: Grads = y.value.sum::<(), _>().backward();
            let truth = grads.get(&leaf).as_vec();
            let x = h.input(x0.clone(), batch, FeatureShape::Flat(3));
            let (out, g) = net.forward_with_input_grad(x, &mut h.fwd_ctx(Mode::Train)).unwrap();
            assert_eq!(out.shape, FeatureShape::Flat(1));
            assert_eq!(g.shape, FeatureShape::Flat(3));
            let gv = g.detach().as_vec();
            assert_close(
                &format!("{act}: input grad"),
                &gv,
                &truth.iter().map(|&v| v as f64).collect::<Vec<_>>(),
                1e-5,
                1e-6,
            );

            // (b) the penalty's gradient w.r.t. every parameter matches finite differences.
            let pgrads: Grads = penalty_taped(g).backward();
            let n = net.named_params().len();
            assert_eq!(n, 6);
            for i in 0..n {
                let (name, p) = &net.named_params()[i];
                let name = name.clone();
                let analytic = grad_or_zeros(&pgrads, p.value());
                let numeric = numeric_param_grad(&mut net, i, 1e-3, |net| {
                    let x = h.input(x0.clone(), batch, FeatureShape::Flat(3));
                    let (_, g) = net.forward_with_input_grad(x, &mut h.fwd_ctx(Mode::Train)).unwrap();
                    penalty_host(&g.detach().as_vec(), batch)
                });
                assert_close(&format!("{act}: dP/d{name}"), &analytic, &numeric, 2e-2, 2e-3);
                if act == "tanh" && name == "0.weight" {
                    // The second-order path through tanh reaches the first layer.
                    assert!(analytic.iter().any(|v| v.abs() > 1e-3));
                }
            }
        }
    }

    #[test]
    fn a_fused_forward_pass_equals_the_layer_by_layer_one() {
        for act in ["tanh", "leaky_relu"] {
            let mut h = Harness::new(5);
            let mut net = critic(act, &mut h);
            let x0 = h.values(4 * 3);
            let pass = |net: &mut Sequential, h: &mut Harness, fused: bool| {
                let x = h.input(x0.clone(), 4, FeatureShape::Flat(3));
                let leaf = x.detach();
                let mut ctx = h.fwd_ctx(Mode::Train);
                let y = if fused {
                    net.forward(x, &mut ctx).unwrap()
                } else {
                    net.forward_for_input_grad(x, &mut ctx).unwrap()
                };
                let values = y.detach().as_vec();
                let grads: Grads = y.value.square().sum::<(), _>().backward();
                let mut all = vec![values, grads.get(&leaf).as_vec()];
                all.extend(net.named_params().iter().map(|(_, p)| grad_or_zeros(&grads, p.value())));
                all
            };
            let fused = pass(&mut net, &mut h, true);
            // Only the layer-by-layer pass keeps what input_grad needs.
            let g = Activation::input(&h.dev.tensor_from_vec(vec![1.0; 4], (4, 1)), FeatureShape::Flat(1)).unwrap();
            let keep = h.input(x0.clone(), 4, FeatureShape::Flat(3));
            let err = Layer::input_grad(&net, &keep, g).unwrap_err().to_string();
            assert!(err.contains("forward_with_input_grad"), "{err}");
            let separate = pass(&mut net, &mut h, false);
            for (i, (a, b)) in fused.iter().zip(&separate).enumerate() {
                let b64: Vec<f64> = b.iter().map(|&v| v as f64).collect();
                assert_close(&format!("{act}: output {i}"), a, &b64, 1e-6, 1e-7);
            }
        }
    }

    #[test]
    fn convolutions_and_batch_norm_fuse_the_activation_after_them_without_changing_the_result() {
        // Each host-kernel layer followed by an activation: conv + leaky ReLU, batch norm (training
        // mode) + ReLU, transposed conv with a bias + tanh.
        let mut h = Harness::new(9);
        let cfg = SequentialConfig::default()
            .push(Conv2dConfig::new(3, 3).with_padding(1))
            .push(LeakyReluConfig::default())
            .push(BatchNormConfig::new())
            .push(ReluConfig::default())
            .push(
                ConvTranspose2dConfig::new(2, 4)
                    .with_stride(2)
                    .with_padding(1)
                    .with_bias(true),
            )
            .push(TanhConfig::default());
        let mut net = cfg
            .build(FeatureShape::image(2, 4, 4), &mut h.build_ctx(), "net")
            .unwrap();
        let x0 = h.values(3 * 2 * 4 * 4);
        let r = h.values(3 * 2 * 8 * 8);
        let pass = |net: &mut Sequential, h: &mut Harness, fused: bool| {
            let x = h.input(x0.clone(), 3, FeatureShape::image(2, 4, 4));
            let leaf = x.detach();
            let mut ctx = h.fwd_ctx(Mode::Train);
            let y = if fused {
                net.forward(x, &mut ctx).unwrap()
            } else {
                net.forward_for_input_grad(x, &mut ctx).unwrap()
            };
            let values = y.detach().as_vec();
            let weights = h.dev.tensor_from_vec(r.clone(), (3, 2 * 8 * 8));
            let grads: Grads = (y.value * weights).sum::<(), _>().backward();
            let mut all = vec![values, grads.get(&leaf).as_vec()];
            all.extend(net.named_params().iter().map(|(_, p)| grad_or_zeros(&grads, p.value())));
            all
        };
        let fused = pass(&mut net, &mut h, true);
        let separate = pass(&mut net, &mut h, false);
        assert_eq!(fused.len(), separate.len());
        for (i, (a, b)) in fused.iter().zip(&separate).enumerate() {
            let b64: Vec<f64> = b.iter().map(|&v| v as f64).collect();
            assert_close(&format!("output {i}"), a, &b64, 1e-6, 1e-7);
        }
    }

    #[test]
    fn a_frozen_pass_gives_the_same_input_gradient_and_no_parameter_gradient() {
        // Every layer with a host kernel: conv, batch norm, transposed conv, linear (fused).
        let mut h = Harness::new(8);
        let cfg = SequentialConfig::default()
            .push(Conv2dConfig::new(3, 3).with_padding(1))
            .push(BatchNormConfig::new())
            .push(LeakyReluConfig::default())
            .push(
                ConvTranspose2dConfig::new(2, 4)
                    .with_stride(2)
                    .with_padding(1)
                    .with_bias(true),
            )
            .push(FlattenConfig::default())
            .push(LinearConfig::new(3))
            .push(TanhConfig::default());
        let mut net = cfg
            .build(FeatureShape::image(2, 4, 4), &mut h.build_ctx(), "net")
            .unwrap();
        let x0 = h.values(3 * 2 * 4 * 4);
        let pass = |net: &mut Sequential, h: &mut Harness, frozen: bool| {
            let x = h.input(x0.clone(), 3, FeatureShape::image(2, 4, 4));
            let leaf = x.detach();
            let mut ctx = h.fwd_ctx(Mode::Train);
            let y = if frozen {
                net.forward_frozen(x, &mut ctx).unwrap()
            } else {
                net.forward(x, &mut ctx).unwrap()
            };
            let out = y.detach().as_vec();
            let grads: Grads = y.value.square().sum::<(), _>().backward();
            let params: Vec<Vec<f32>> = net
                .named_params()
                .iter()
                .filter(|(_, p)| p.trainable())
                .map(|(_, p)| grad_or_zeros(&grads, p.value()))
                .collect();
            (out, grads.get(&leaf).as_vec(), params)
        };
        // A parameter frozen by its owner stays frozen after the pass; the others thaw again.
        net.named_params_mut()[1].1.set_requires_grad(false);
        let (out, dx, params) = pass(&mut net, &mut h, true);
        let required: Vec<bool> = net.named_params().iter().map(|(_, p)| p.requires_grad()).collect();
        assert!(
            !required[1] && required.iter().filter(|r| !**r).count() == 1,
            "{required:?}"
        );
        net.named_params_mut()[1].1.set_requires_grad(true);
        let (out_all, dx_all, params_all) = pass(&mut net, &mut h, false);
        assert_eq!(out, out_all);
        assert_eq!(dx, dx_all, "the input gradient");
        assert_eq!(
            params.len(),
            8,
            "two weights and biases of the convolutions and the linear layer, γ and β"
        );
        for (frozen, all) in params.iter().zip(&params_all) {
            assert!(frozen.iter().all(|v| *v == 0.0));
            assert!(all.iter().any(|v| *v != 0.0));
        }
    }

    #[test]
    fn output_and_penalty_losses_combine_on_one_tape() {
        let mut h = Harness::new(2);
        let mut net = critic("tanh", &mut h);
        let x0 = h.values(6);
        let run = |net: &mut Sequential, h: &mut Harness| {
            let x = h.input(x0.clone(), 2, FeatureShape::Flat(3));
            net.forward_with_input_grad(x, &mut h.fwd_ctx(Mode::Train)).unwrap()
        };
        let (out, g) = run(&mut net, &mut h);
        let total = out.value.sum::<(), _>() + penalty_taped(g);
        let grads: Grads = total.backward();
        let analytic = grad_or_zeros(&grads, net.named_params()[0].1.value());
        let numeric = numeric_param_grad(&mut net, 0, 1e-3, |net| {
            let (out, g) = run(net, &mut h);
            out.detach().as_vec().iter().map(|&v| v as f64).sum::<f64>() + penalty_host(&g.detach().as_vec(), 2)
        });
        assert_close("d(out + P)/d0.weight", &analytic, &numeric, 2e-2, 2e-3);
    }

    #[test]
    fn names_shapes_nesting_and_errors() {
        let mut h = Harness::new(0);
        let inner = SequentialConfig::default()
            .push(LinearConfig::new(4))
            .push(TanhConfig::default());
        let cfg = SequentialConfig::default()
            .push(ReshapeConfig::image(1, 2, 2))
            .push(Conv2dConfig::new(2, 1))
            .push(FlattenConfig::default())
            .push(inner)
            .push(LinearConfig::new(1));
        let mut net = cfg
            .build(FeatureShape::Flat(4), &mut h.build_ctx(), "model.critic")
            .unwrap();
        let names: Vec<String> = net.named_params().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            ["1.weight", "1.bias", "3.0.weight", "3.0.bias", "4.weight", "4.bias"]
        );
        assert_eq!(net.output_shape(), FeatureShape::Flat(1));
        assert_eq!(net.summary().len(), 5);
        // The nested stack's input gradient works through Layer::input_grad.
        let x0 = h.values(8);
        let x = h.input(x0.clone(), 2, FeatureShape::Flat(4));
        let leaf = x.detach();
        let y = net.forward(x, &mut h.fwd_ctx(Mode::Eval)).unwrap();
        let truth = y.value.sum::<(), _>().backward().get(&leaf).as_vec();
        let x = h.input(x0, 2, FeatureShape::Flat(4));
        let (_, g) = net.forward_with_input_grad(x, &mut h.fwd_ctx(Mode::Eval)).unwrap();
        assert_close(
            "nested input grad",
            &g.detach().as_vec(),
            &truth.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            1e-5,
            1e-6,
        );

        // A wrong shape names the layer and what it expected.
        let bad = SequentialConfig::default()
            .push(LinearConfig::new(4))
            .push(TanhConfig::default())
            .push(Conv2dConfig::new(2, 3));
        let err = bad
            .build(FeatureShape::Flat(4), &mut h.build_ctx(), "model.encoder")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("model.encoder.layers[2]") && err.contains("image"),
            "{err}"
        );
        let nested = SequentialConfig::default().push(SequentialConfig::default().push(LinearConfig::new(0)));
        let err = nested
            .build(FeatureShape::Flat(4), &mut h.build_ctx(), "g")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("g.layers[0].layers[0].out_features"), "{err}");
    }

    #[test]
    fn parses_from_json_with_tags() {
        let json = r#"{"layers": [{"type": "linear", "out_features": 8}, {"type": "leaky_relu"},
            {"type": "dropout", "p": 0.1}, {"type": "linear", "out_features": 1, "bias": false}]}"#;
        let cfg: SequentialConfig = serde_json::from_str(json).unwrap();
        let mut h = Harness::new(0);
        let net = cfg.build(FeatureShape::Flat(2), &mut h.build_ctx(), "d").unwrap();
        assert_eq!(net.named_params().len(), 3);
        assert!(serde_json::from_str::<SequentialConfig>(r#"{"layer": []}"#).is_err());
        let boxed: Box<dyn LayerConfig> =
            serde_json::from_str(&format!(r#"{{"type": "sequential", {}"#, &json[1..])).unwrap();
        assert!(boxed.build(FeatureShape::Flat(2), &mut h.build_ctx()).is_ok());
    }
}
