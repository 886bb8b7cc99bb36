//! Tensors with runtime shapes, the activations that flow between layers, and parameters.
//!
//! Every activation is a `[batch, features]` matrix that carries a gradient tape, together with
//! the logical per-sample [`FeatureShape`] (`features`, or `channels x height x width` stored
//! row-major). Reshapes between the two are free. Every parameter is stored flat as a
//! [`Vector`] plus its logical shape: a contiguous `reshape_like` keeps the tensor's id, so the
//! gradient of the reshaped view lands on the flat parameter, and optimizers see one uniform type.

use std::sync::{Arc, Mutex, OnceLock};

use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The compute device: dfdx's `Cpu` by default, `Cuda` with the `cuda` feature.
#[cfg(not(feature = "cuda"))]
pub type Device = dfdx::tensor::Cpu;
/// The compute device: dfdx's `Cpu` by default, `Cuda` with the `cuda` feature.
#[cfg(feature = "cuda")]
pub type Device = dfdx::tensor::Cuda;

/// The gradient tape every training forward pass carries.
pub type Tape = OwnedTape<f32, Device>;
/// Gradients keyed by tensor id, as returned by `backward()`.
pub type Grads = Gradients<f32, Device>;
/// A 1-D tensor of runtime length.
pub type Vector<T = NoneTape> = Tensor<(usize,), f32, Device, T>;
/// A 2-D tensor of runtime shape, `[rows, cols]`.
pub type Matrix<T = NoneTape> = Tensor<(usize, usize), f32, Device, T>;
/// A scalar, usually a loss carrying the tape.
pub type Scalar<T = Tape> = Tensor<(), f32, Device, T>;
/// The seeded random generator used everywhere nash draws numbers (reproducible across platforms).
pub type Rng = rand_chacha::ChaCha8Rng;

/// The logical shape of one sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FeatureShape {
    /// A flat feature vector.
    Flat(usize),
    /// An image, stored channel-major: `[channels, height, width]`.
    Image {
        channels: usize,
        height: usize,
        width: usize,
    },
}

impl FeatureShape {
    /// Number of scalars in one sample.
    pub fn numel(&self) -> usize {
        match *self {
            FeatureShape::Flat(n) => n,
            FeatureShape::Image {
                channels,
                height,
                width,
            } => channels * height * width,
        }
    }
    /// An image shape.
    pub fn image(channels: usize, height: usize, width: usize) -> Self {
        FeatureShape::Image {
            channels,
            height,
            width,
        }
    }
    /// `(channels, height, width)` if this is an image.
    pub fn as_image(&self) -> Option<(usize, usize, usize)> {
        match *self {
            FeatureShape::Image {
                channels,
                height,
                width,
            } => Some((channels, height, width)),
            FeatureShape::Flat(_) => None,
        }
    }
}

impl std::fmt::Display for FeatureShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FeatureShape::Flat(n) => write!(f, "[{n}]"),
            FeatureShape::Image {
                channels,
                height,
                width,
            } => write!(f, "[{channels}, {height}, {width}]"),
        }
    }
}

/// A batch of activations: a `[batch, numel]` matrix on the tape, and its per-sample shape.
#[derive(Debug)]
pub struct Activation {
    /// The values, one sample per row.
    pub value: Matrix<Tape>,
    /// The logical shape of each row.
    pub shape: FeatureShape,
    /// Whether the backward pass needs this activation's own gradient. False for data and latent
    /// codes entering a network ([`Activation::data`]): the first layer may then skip computing
    /// its input gradient. Every layer's output needs one.
    pub requires_grad: bool,
}

impl Activation {
    /// Wraps a taped matrix, checking that its width matches `shape`.
    pub fn new(value: Matrix<Tape>, shape: FeatureShape) -> Result<Self> {
        let cols = value.shape().1;
        if cols != shape.numel() {
            return Err(Error::shape(
                "activation",
                format!("{} features for {shape}", shape.numel()),
                cols,
            ));
        }
        Ok(Activation {
            value,
            shape,
            requires_grad: true,
        })
    }
    /// Starts a fresh tape on a constant matrix whose gradient the caller reads afterwards (an
    /// input-gradient check).
    pub fn input(value: &Matrix, shape: FeatureShape) -> Result<Self> {
        Self::new(value.leaky_trace(), shape)
    }
    /// Starts a fresh tape on a constant matrix whose gradient nobody reads (a data batch, a
    /// latent code): layers may skip computing it.
    pub fn data(value: &Matrix, shape: FeatureShape) -> Result<Self> {
        Ok(Activation {
            requires_grad: false,
            ..Self::input(value, shape)?
        })
    }
    /// Number of samples.
    pub fn batch_size(&self) -> usize {
        self.value.shape().0
    }
    /// A copy sharing this tensor's id but with an empty tape: use it for a second use of a value
    /// whose history stays on the original's tape (dfdx's idiom for reuse).
    pub fn reuse(&self) -> Self {
        Activation {
            value: self.value.with_empty_tape(),
            shape: self.shape,
            requires_grad: self.requires_grad,
        }
    }
    /// The values without the tape.
    pub fn detach(&self) -> Matrix {
        self.value.retaped::<NoneTape>()
    }
}

/// What a parameter is, so that stabilizers and optimizers can treat kinds differently
/// (weight decay and spectral norm apply to weights, not to biases).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamRole {
    /// A weight matrix or convolution kernel.
    Weight,
    /// An additive bias.
    Bias,
    /// A normalization scale (gamma).
    Scale,
    /// A normalization shift (beta).
    Shift,
    /// An embedding table or codebook.
    Embedding,
    /// Not trained by optimizers but part of the state (running statistics, power-iteration vectors).
    Buffer,
}

/// One parameter or buffer: a flat tensor and its logical shape.
///
/// The parameter keeps its values twice, each copy made only when something reads it: the dfdx
/// tensor ([`Param::value`]: tape ops, stabilizers, checkpoints) and a host copy
/// ([`Param::host_values`]: the layers' host kernels). An optimizer updates the host copy in place
/// ([`Param::update_values`]) and the tensor catches up on its next read, so a training step of
/// the host kernels copies no parameter at all: a linear layer reads its weight's host copy and
/// needs only the tensor's id for the gradient ([`Param::with_id`]). Every write goes through a
/// method (the tensor is private), which keeps the two copies consistent.
#[derive(Debug)]
pub struct Param {
    /// The tensor, when its values are current.
    current: OnceLock<Vector>,
    /// The tensor while its values lag behind `host` (after [`Param::update_values`]); the first
    /// read copies `host` into it and moves it to `current`.
    lagging: Mutex<Option<Vector>>,
    /// The logical shape (`[in, out]` for a linear weight, `[out_c, in_c, kh, kw]` for a kernel).
    pub shape: Vec<usize>,
    /// What the parameter is.
    pub role: ParamRole,
    /// The values on the host, made on first use after a write to the tensor; empty while stale.
    host: OnceLock<Arc<Vec<f32>>>,
    /// Whether backward passes compute this parameter's gradient ([`Param::requires_grad`]).
    requires_grad: bool,
}

impl Clone for Param {
    fn clone(&self) -> Self {
        Param {
            current: self.current.clone(),
            lagging: Mutex::new(self.lagging_tensor().clone()),
            shape: self.shape.clone(),
            role: self.role,
            host: self.host.clone(),
            requires_grad: self.requires_grad,
        }
    }
}

impl Param {
    /// A parameter from host values.
    pub fn from_vec(device: &Device, values: Vec<f32>, shape: Vec<usize>, role: ParamRole) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != values.len() {
            return Err(Error::shape(
                "parameter",
                format!("{n} values for shape {shape:?}"),
                values.len(),
            ));
        }
        Ok(Param {
            current: OnceLock::from(device.tensor_from_vec(values, (n,))),
            lagging: Mutex::new(None),
            shape,
            role,
            host: OnceLock::new(),
            requires_grad: true,
        })
    }
    fn lagging_tensor(&self) -> std::sync::MutexGuard<'_, Option<Vector>> {
        // Nothing can panic while the lock is held; a poisoned lock still holds a valid tensor.
        self.lagging.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
    /// The values as a flat tensor (its id is the parameter's: gradients are keyed by it).
    pub fn value(&self) -> &Vector {
        self.current.get_or_init(|| {
            let mut tensor = self
                .lagging_tensor()
                .take()
                .expect("a parameter holds its tensor either current or lagging");
            let host = self.host.get().expect("a lagging tensor's values are on the host");
            tensor.copy_from(host);
            tensor
        })
    }
    /// The tensor, for a write that bypasses [`Param::set`]; forgets the host copy.
    pub fn value_mut(&mut self) -> &mut Vector {
        self.value();
        self.host = OnceLock::new();
        self.current.get_mut().expect("value() made the tensor current")
    }
    /// `f(tensor)` for a use of the tensor's id and shape only (`ghost()`,
    /// `Gradients::get_or_alloc_mut`), without bringing its values up to date: `f` must not read
    /// them.
    pub fn with_id<R>(&self, f: impl FnOnce(&Vector) -> R) -> R {
        if let Some(tensor) = self.current.get() {
            return f(tensor);
        }
        {
            let lagging = self.lagging_tensor();
            if let Some(tensor) = lagging.as_ref() {
                return f(tensor);
            }
        }
        // Neither: another thread is bringing the tensor up to date; `value` waits for it.
        f(self.value())
    }
    /// Whether the forward passes run from now on record this parameter's gradient (true unless
    /// [`Param::set_requires_grad`] turned it off, as PyTorch's `requires_grad_(False)`). The
    /// layers with host kernels (linear, maxout, batch norm, convolutions) then skip it and leave
    /// it out of the gradients; composite dfdx ops may still compute it, so a gradient of a
    /// parameter that requires none must not be read.
    pub fn requires_grad(&self) -> bool {
        self.requires_grad
    }
    /// Turns the gradient of this parameter on or off for the forward passes run from now on
    /// (see [`Param::requires_grad`]); `Sequential::forward_frozen` does it for a whole network
    /// for one pass.
    pub fn set_requires_grad(&mut self, required: bool) {
        self.requires_grad = required;
    }
    /// Whether optimizers update it.
    pub fn trainable(&self) -> bool {
        self.role != ParamRole::Buffer
    }
    /// Number of scalars.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// The values as a `[rows, cols]` matrix view sharing this parameter's id (so gradients land
    /// on it). `rows * cols` must equal [`Param::numel`].
    pub fn as_matrix(&self, rows: usize, cols: usize) -> Matrix {
        self.value().clone().reshape_like(&(rows, cols))
    }
    /// The values on the host, shared: copied out of the tensor on the first call after a write
    /// to it, then handed out without a copy.
    pub fn host_values(&self) -> Arc<Vec<f32>> {
        self.host
            .get_or_init(|| {
                let mut values = vec![0.0; self.numel()];
                self.value().copy_into(&mut values);
                Arc::new(values)
            })
            .clone()
    }
    /// Host copy of the values.
    pub fn to_vec(&self) -> Vec<f32> {
        self.host_values().as_ref().clone()
    }
    /// Overwrites the values in place, keeping the tensor id.
    pub fn set(&mut self, values: &[f32]) -> Result<()> {
        if values.len() != self.numel() {
            return Err(Error::shape("parameter update", self.numel(), values.len()));
        }
        let mut tensor = self.take_tensor();
        tensor.copy_from(values);
        self.current = OnceLock::from(tensor);
        self.host = OnceLock::new();
        Ok(())
    }
    /// Updates the values in place on the host (`update(values)`), keeping the tensor id: the
    /// host copy is updated without a copy when nothing else holds it (the backward pass that
    /// read it has finished), and the tensor catches up on its next read.
    pub fn update_values(&mut self, update: impl FnOnce(&mut [f32])) {
        let shared = self.host_values();
        self.host = OnceLock::new();
        let mut values = Arc::try_unwrap(shared).unwrap_or_else(|shared| shared.as_ref().clone());
        update(&mut values);
        let tensor = self.take_tensor();
        *self.lagging.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(tensor);
        self.host = OnceLock::from(Arc::new(values));
    }
    /// Moves the tensor out (current or lagging), leaving neither.
    fn take_tensor(&mut self) -> Vector {
        self.current.take().unwrap_or_else(|| {
            self.lagging
                .get_mut()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take()
                .expect("a parameter holds its tensor either current or lagging")
        })
    }
}

/// Anything that owns parameters: layers, networks, models.
///
/// Names are dotted paths (`discriminator.2.weight`), stable across runs: checkpoints, optimizer
/// state and stabilizer selections are keyed by them.
pub trait Parameterized {
    /// Every parameter and buffer, with its name.
    fn named_params(&self) -> Vec<(String, &Param)>;
    /// Every parameter and buffer, mutably, in the same order as [`Parameterized::named_params`].
    fn named_params_mut(&mut self) -> Vec<(String, &mut Param)>;
}

/// Prefixes names: `prefix.name` (or `name` when `prefix` is empty).
pub fn join_name(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// A matrix from host values.
pub fn matrix_from_vec(device: &Device, values: Vec<f32>, rows: usize, cols: usize) -> Result<Matrix> {
    if values.len() != rows * cols {
        return Err(Error::shape(
            "matrix",
            format!("{rows}x{cols} = {} values", rows * cols),
            values.len(),
        ));
    }
    Ok(device.tensor_from_vec(values, (rows, cols)))
}

/// Fails with [`Error::NonFinite`] if `value` is NaN or infinite.
pub fn check_finite(what: &str, value: f32) -> Result<f32> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(Error::NonFinite {
            what: format!("{what} = {value}"),
        })
    }
}

/// Host copy of the gradient of `param` in `grads` (zeros if backward did not reach it).
///
/// dfdx keeps gradients in device buffers keyed by tensor id; this works on every device.
pub fn grad_to_vec(grads: &mut Grads, param: &Param) -> Result<Vec<f32>> {
    param.with_id(|tensor| device_buffer_to_vec(grads.get_or_alloc_mut(tensor)?))
}

/// Overwrites the gradient of `param` in `grads` with host values (gradient clipping, masking).
pub fn set_grad(grads: &mut Grads, param: &Param, values: &[f32]) -> Result<()> {
    if values.len() != param.numel() {
        return Err(Error::shape("gradient update", param.numel(), values.len()));
    }
    param.with_id(|tensor| device_buffer_copy_from(grads.get_or_alloc_mut(tensor)?, values))
}

#[cfg(not(feature = "cuda"))]
fn device_buffer_to_vec(buf: &mut <Device as dfdx::tensor::Storage<f32>>::Vec) -> Result<Vec<f32>> {
    Ok(buf.to_vec())
}

#[cfg(not(feature = "cuda"))]
fn device_buffer_copy_from(buf: &mut <Device as dfdx::tensor::Storage<f32>>::Vec, values: &[f32]) -> Result<()> {
    buf.copy_from_slice(values);
    Ok(())
}

#[cfg(feature = "cuda")]
fn device_buffer_to_vec(buf: &mut <Device as dfdx::tensor::Storage<f32>>::Vec) -> Result<Vec<f32>> {
    let slice: &cudarc::driver::CudaSlice<f32> = buf;
    slice
        .device()
        .dtoh_sync_copy(slice)
        .map_err(|e| Error::Other(format!("CUDA copy: {e:?}")))
}

#[cfg(feature = "cuda")]
fn device_buffer_copy_from(buf: &mut <Device as dfdx::tensor::Storage<f32>>::Vec, values: &[f32]) -> Result<()> {
    let slice: &mut cudarc::driver::CudaSlice<f32> = buf;
    let dev = slice.device();
    dev.htod_sync_copy_into(values, slice)
        .map_err(|e| Error::Other(format!("CUDA copy: {e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_copy_follows_every_write() {
        let dev = Device::default();
        let mut p = Param::from_vec(&dev, vec![1.0, 2.0, 3.0], vec![3], ParamRole::Weight).unwrap();
        let before = p.host_values();
        assert_eq!(*before, vec![1.0, 2.0, 3.0]);
        assert!(Arc::ptr_eq(&before, &p.host_values()), "a second read shares the copy");

        p.set(&[4.0, 5.0, 6.0]).unwrap();
        assert_eq!(*p.host_values(), vec![4.0, 5.0, 6.0]);
        assert_eq!(
            *before,
            vec![1.0, 2.0, 3.0],
            "a holder of the old copy keeps the old values"
        );

        // Updated while a reader still holds the copy: the reader's values stay as they were.
        let reader = p.host_values();
        p.update_values(|v| v[0] = 7.0);
        assert_eq!(*reader, vec![4.0, 5.0, 6.0]);
        assert_eq!(*p.host_values(), vec![7.0, 5.0, 6.0]);
        let mut grads = Grads::leaky();
        p.with_id(|t| grads.get_or_alloc_mut(t).unwrap()[0] = 5.0);
        assert_eq!(
            p.value().as_vec(),
            vec![7.0, 5.0, 6.0],
            "the tensor catches up when read"
        );
        assert_eq!(grads.get_or_alloc_mut(p.value()).unwrap()[0], 5.0, "and keeps its id");

        // Updated with no other holder: the same buffer is updated, no copy.
        drop(reader);
        let ptr = p.host_values().as_ptr();
        p.update_values(|v| v[1] = 8.0);
        assert_eq!(p.host_values().as_ptr(), ptr);
        // A clone taken while the tensor lags has the same values, and reads them independently.
        let copy = p.clone();
        p.update_values(|v| v[2] = 9.0);
        assert_eq!(copy.value().as_vec(), vec![7.0, 8.0, 6.0]);
        assert_eq!(p.value().as_vec(), vec![7.0, 8.0, 9.0]);
        // set() overwrites a lagging tensor.
        p.update_values(|v| v[0] = 1.0);
        p.set(&[2.0, 2.0, 2.0]).unwrap();
        assert_eq!(p.value().as_vec(), vec![2.0; 3]);
        assert_eq!(*p.host_values(), vec![2.0; 3]);

        p.value_mut().copy_from(&[0.0, 0.0, 1.0]);
        assert_eq!(
            *p.host_values(),
            vec![0.0, 0.0, 1.0],
            "a write through value_mut is seen"
        );
        assert_eq!(p.to_vec(), vec![0.0, 0.0, 1.0]);

        let err = p.set(&[1.0]).unwrap_err().to_string();
        assert!(err.contains("parameter update"), "{err}");
    }
}
