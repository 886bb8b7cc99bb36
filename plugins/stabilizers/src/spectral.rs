//! Spectral normalization (Miyato et al. 2018): `spectral_norm`.
//!
//! The layers are not touched. For every selected weight the stabilizer keeps the raw weight `W`
//! and its power-iteration vectors `u`, `v`; the parameter the layer uses holds `W_sn = W / σ`
//! with `σ = uᵀ W v`, so forward passes, evaluation, sampling and the generator's step all see
//! normalized weights. Before the optimizer step the gradient with respect to `W_sn` is turned
//! into the gradient with respect to `W` (treating `u` and `v` as constants, as
//! `torch.nn.utils.spectral_norm` does):
//!
//! `∂L/∂W = (G − ⟨G, W_sn⟩ u vᵀ) / σ`, where `G = ∂L/∂W_sn`.
//!
//! After the step, the optimizer's update `Δ` (what it added to the parameter) is applied to the
//! raw weight, `W ← W + Δ`, `u` and `v` advance by `power_iterations` steps, and the parameter is
//! set to the new `W / σ`. This is exact for every optimizer whose update depends only on the
//! gradient and its own state (SGD, Adam, RMSprop); a decay term computed from the parameter's
//! value (coupled L2 or decoupled weight decay) sees `W_sn` rather than `W`.

use std::collections::BTreeMap;

use nash_core::error::{Error, Result};
use nash_core::model::{Model, StepReport};
use nash_core::rand_distr::{Distribution, StandardNormal};
use nash_core::registry::Registry;
use nash_core::stabilizer::{HookContext, Stabilizer, StabilizerConfig};
use nash_core::state::StateDict;
use nash_core::tensor::{grad_to_vec, set_grad, Grads, Param, ParamRole, Rng};
use serde::{Deserialize, Serialize};

use crate::scope::{check_group, conflict, scoped_name};

/// `normalize`'s epsilon in PyTorch's power iteration (`F.normalize(.., eps=1e-12)`).
const EPS: f64 = 1e-12;
/// Power iterations at the first normalization, as `torch.nn.utils.parametrizations.spectral_norm`
/// does when it registers (so the first σ is already accurate).
const SETUP_ITERATIONS: usize = 15;

/// Registers this module's types.
pub fn register(registry: &mut Registry) -> nash_core::Result<()> {
    registry.stabilizer::<SpectralNormConfig>(
        "spectral normalization: divide chosen weights by their largest singular value (power iteration)",
    )
}

/// Spectral normalization of the weights (role `weight`) whose parameter names match `layers`.
/// A linear weight (stored `[in, out]`) is normalized as PyTorch's `[out, in]` matrix; a kernel
/// `[d0, d1, k, k]` as the matrix `[d0, d1·k·k]` (for conv2d `[out, in·k·k]`, as PyTorch; for a
/// transposed convolution, stored `[in, out, k, k]`, this is dimension 0 where PyTorch's default
/// uses dimension 1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpectralNormConfig {
    /// A glob over parameter names (`*` any run of characters, `?` one character), e.g.
    /// `discriminator.*` or `discriminator.2.weight`; only parameters with role `weight` are used.
    pub layers: String,
    /// Power iterations per update (PyTorch's `n_power_iterations`).
    pub power_iterations: usize,
}

impl Default for SpectralNormConfig {
    fn default() -> Self {
        SpectralNormConfig {
            layers: "discriminator.*".into(),
            power_iterations: 1,
        }
    }
}

impl SpectralNormConfig {
    /// The parameter group the pattern is confined to: its text before the first `.`, when that
    /// text has no wildcard; `None` when the pattern can span groups.
    pub fn group(&self) -> Option<&str> {
        let (head, _) = self.layers.split_once('.')?;
        (!head.is_empty() && !head.contains(['*', '?'])).then_some(head)
    }
}

#[typetag::serde(name = "spectral_norm")]
impl StabilizerConfig for SpectralNormConfig {
    fn build(&self) -> Result<Box<dyn Stabilizer>> {
        if self.layers.trim().is_empty() {
            return Err(Error::config(
                "stabilizers.spectral_norm.layers",
                "must be a glob over parameter names, e.g. \"discriminator.*\"",
            ));
        }
        if self.power_iterations == 0 {
            return Err(Error::config(
                "stabilizers.spectral_norm.power_iterations",
                "must be at least 1",
            ));
        }
        Ok(Box::new(SpectralNorm {
            name: scoped_name("spectral_norm", self.group()),
            config: self.clone(),
            entries: BTreeMap::new(),
            updated: false,
        }))
    }
}

/// Whether `name` matches the glob `pattern` (`*`: any run of characters, `?`: one character).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// How a flat weight is read as the matrix whose largest singular value is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct View {
    rows: usize,
    cols: usize,
    /// The flat values are the transpose (`[cols, rows]`), as a linear weight `[in, out]`.
    transposed: bool,
}

impl View {
    fn of(shape: &[usize]) -> Self {
        match shape {
            [i, o] => View {
                rows: *o,
                cols: *i,
                transposed: true,
            },
            [first, rest @ ..] => View {
                rows: *first,
                cols: rest.iter().product(),
                transposed: false,
            },
            [] => View {
                rows: 1,
                cols: 1,
                transposed: false,
            },
        }
    }
    fn idx(&self, i: usize, j: usize) -> usize {
        if self.transposed {
            j * self.rows + i
        } else {
            i * self.cols + j
        }
    }
    /// `W v` (length `rows`).
    fn mv(&self, w: &[f32], v: &[f32]) -> Vec<f64> {
        (0..self.rows)
            .map(|i| (0..self.cols).map(|j| w[self.idx(i, j)] as f64 * v[j] as f64).sum())
            .collect()
    }
    /// `Wᵀ u` (length `cols`).
    fn mtv(&self, w: &[f32], u: &[f32]) -> Vec<f64> {
        let mut out = vec![0.0f64; self.cols];
        for (i, &ui) in u.iter().enumerate() {
            for (j, o) in out.iter_mut().enumerate() {
                *o += w[self.idx(i, j)] as f64 * ui as f64;
            }
        }
        out
    }
}

fn normalized(x: Vec<f64>) -> Vec<f32> {
    let norm = x.iter().map(|a| a * a).sum::<f64>().sqrt().max(EPS);
    x.iter().map(|a| (a / norm) as f32).collect()
}

/// One normalized weight: the raw values, the power-iteration vectors, and what the layer holds.
#[derive(Clone, Debug)]
struct Entry {
    view: View,
    shape: Vec<usize>,
    /// The raw weight `W`, in the parameter's flat layout.
    w: Vec<f32>,
    /// Left singular vector estimate (length `rows`).
    u: Vec<f32>,
    /// Right singular vector estimate (length `cols`).
    v: Vec<f32>,
    /// `uᵀ W v`.
    sigma: f64,
    /// `W / σ`, the values the parameter holds.
    w_sn: Vec<f32>,
}

impl Entry {
    fn new(shape: &[usize], w: Vec<f32>, rng: &mut Rng, iterations: usize) -> Result<Self> {
        let view = View::of(shape);
        let mut draw = |n: usize| normalized((0..n).map(|_| StandardNormal.sample(rng)).collect());
        let (u, v) = (draw(view.rows), draw(view.cols));
        let mut e = Entry {
            view,
            shape: shape.to_vec(),
            w,
            u,
            v,
            sigma: 1.0,
            w_sn: Vec::new(),
        };
        e.iterate(iterations)?;
        Ok(e)
    }
    /// `iterations` power-iteration steps, then σ and `W_sn` from the new vectors.
    fn iterate(&mut self, iterations: usize) -> Result<()> {
        for _ in 0..iterations {
            self.v = normalized(self.view.mtv(&self.w, &self.u));
            self.u = normalized(self.view.mv(&self.w, &self.v));
        }
        self.normalize()
    }
    /// σ = uᵀ W v and `W_sn = W / σ` with the current vectors.
    fn normalize(&mut self) -> Result<()> {
        let wv = self.view.mv(&self.w, &self.v);
        let sigma = self.u.iter().zip(&wv).map(|(&a, b)| a as f64 * b).sum::<f64>();
        if !sigma.is_finite() || sigma.abs() < EPS {
            return Err(Error::NonFinite {
                what: format!("spectral norm σ = {sigma} (the weight is zero or not finite)"),
            });
        }
        self.sigma = sigma;
        self.w_sn = self.w.iter().map(|&x| (x as f64 / sigma) as f32).collect();
        Ok(())
    }
    /// `∂L/∂W = (G − ⟨G, W_sn⟩ u vᵀ) / σ` from `G = ∂L/∂W_sn`.
    fn raw_grad(&self, g: &[f32]) -> Vec<f32> {
        let inner: f64 = g.iter().zip(&self.w_sn).map(|(&a, &b)| a as f64 * b as f64).sum();
        let mut out: Vec<f64> = g.iter().map(|&a| a as f64).collect();
        for (i, &ui) in self.u.iter().enumerate() {
            for (j, &vj) in self.v.iter().enumerate() {
                out[self.view.idx(i, j)] -= inner * ui as f64 * vj as f64;
            }
        }
        out.iter().map(|&a| (a / self.sigma) as f32).collect()
    }
}

/// See [`SpectralNormConfig`].
#[derive(Clone, Debug)]
pub struct SpectralNorm {
    name: String,
    config: SpectralNormConfig,
    /// By full parameter name.
    entries: BTreeMap<String, Entry>,
    /// Whether an update happened since the last report.
    updated: bool,
}

impl SpectralNorm {
    fn selects(&self, name: &str, p: &Param) -> bool {
        p.role == ParamRole::Weight && p.trainable() && glob_match(&self.config.layers, name)
    }
}

impl Stabilizer for SpectralNorm {
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self, model: &dyn Model) -> Result<()> {
        if let Some(g) = self.config.group() {
            check_group(model, g, "stabilizers.spectral_norm.layers")?;
        }
        let params = model.named_params();
        if params.iter().any(|(n, p)| self.selects(n, p)) {
            return Ok(());
        }
        let listing: Vec<String> = params
            .iter()
            .map(|(n, p)| format!("{n} ({})", format!("{:?}", p.role).to_lowercase()))
            .collect();
        Err(Error::config(
            "stabilizers.spectral_norm.layers",
            format!(
                "the pattern `{}` matches no parameter with role `weight`; the model's parameters are: {}",
                self.config.layers,
                if listing.is_empty() {
                    "(none)".to_string()
                } else {
                    listing.join(", ")
                }
            ),
        ))
    }

    fn setup(&mut self, model: &mut dyn Model, ctx: &mut HookContext<'_>) -> Result<()> {
        let mut selected = 0;
        for (name, p) in model.named_params_mut() {
            if !self.selects(&name, p) {
                continue;
            }
            selected += 1;
            let entry = match self.entries.get_mut(&name) {
                // Restored or set up before: keep W, u, v (so running setup again changes nothing).
                Some(e) if e.shape == p.shape => e,
                Some(e) => {
                    return Err(Error::state(
                        format!("spectral_norm.{name}"),
                        format!("saved for shape {:?}, the model's parameter is {:?}", e.shape, p.shape),
                    ))
                }
                None => {
                    let e = Entry::new(&p.shape, p.to_vec(), ctx.rng, SETUP_ITERATIONS)?;
                    self.entries.entry(name.clone()).or_insert(e)
                }
            };
            p.set(&entry.w_sn)?;
        }
        if selected == 0 {
            return Err(Error::config(
                "stabilizers.spectral_norm.layers",
                format!("the pattern `{}` matches no weight of the model", self.config.layers),
            ));
        }
        Ok(())
    }

    fn conflicts_with(&self, other: &dyn Stabilizer) -> Option<String> {
        conflict("spectral_norm", self.config.group(), other)
    }

    fn edit_gradients(
        &mut self,
        _group: &str,
        params: &[(String, &mut Param)],
        grads: &mut Grads,
        _ctx: &mut HookContext<'_>,
    ) -> Result<()> {
        for (name, p) in params {
            if let Some(e) = self.entries.get(name) {
                let g = grad_to_vec(grads, p)?;
                set_grad(grads, p, &e.raw_grad(&g))?;
            }
        }
        Ok(())
    }

    fn after_update(
        &mut self,
        _group: &str,
        params: &mut [(String, &mut Param)],
        _ctx: &mut HookContext<'_>,
    ) -> Result<()> {
        for (name, p) in params.iter_mut() {
            let Some(e) = self.entries.get_mut(name.as_str()) else {
                continue;
            };
            // The optimizer moved W_sn by Δ; the same step on the raw weight is W + Δ.
            let now = p.to_vec();
            for ((w, &after), &before) in e.w.iter_mut().zip(&now).zip(&e.w_sn) {
                *w += after - before;
            }
            e.iterate(self.config.power_iterations)?;
            p.set(&e.w_sn)?;
            self.updated = true;
        }
        Ok(())
    }

    fn end_step(&mut self, report: &mut StepReport, _ctx: &mut HookContext<'_>) -> Result<()> {
        if std::mem::take(&mut self.updated) {
            let max = self.entries.values().map(|e| e.sigma).fold(f64::MIN, f64::max);
            report.diagnostic(format!("{}/sigma_max", self.name), max);
        }
        Ok(())
    }

    fn state(&self) -> StateDict {
        let mut s = StateDict::default();
        for (name, e) in &self.entries {
            s.put_tensor(format!("w.{name}"), e.shape.clone(), e.w.clone());
            s.put_tensor(format!("u.{name}"), vec![e.view.rows], e.u.clone());
            s.put_tensor(format!("v.{name}"), vec![e.view.cols], e.v.clone());
        }
        s
    }

    fn load_state(&mut self, state: &StateDict) -> Result<()> {
        let mut entries = BTreeMap::new();
        for (key, (shape, w)) in &state.tensors {
            let Some(name) = key.strip_prefix("w.") else {
                continue;
            };
            let view = View::of(shape);
            let vector = |prefix: &str, len: usize| -> Result<Vec<f32>> {
                let k = format!("{prefix}.{name}");
                let (_, values) = state.tensor(&k)?;
                if values.len() != len {
                    return Err(Error::state(
                        k,
                        format!("expected {len} values, found {}", values.len()),
                    ));
                }
                Ok(values.clone())
            };
            if w.len() != shape.iter().product::<usize>() {
                return Err(Error::state(
                    key.clone(),
                    format!("{} values for shape {shape:?}", w.len()),
                ));
            }
            let mut e = Entry {
                view,
                shape: shape.clone(),
                w: w.clone(),
                u: vector("u", view.rows)?,
                v: vector("v", view.cols)?,
                sigma: 1.0,
                w_sn: Vec::new(),
            };
            e.normalize()?;
            entries.insert(name.to_string(), e);
        }
        self.entries = entries;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use nash_core::data::Batch;
    use nash_core::model::{group_params, EvalContext, TrainContext};
    use nash_core::rand::SeedableRng;
    use nash_core::stabilizer::StabilizerStack;
    use nash_core::tensor::{Device, Parameterized};

    /// A discriminator with a linear weight `[3, 4]` (so the matrix is `[4, 3]`), its bias, and a
    /// kernel `[2, 1, 2, 2]`; a generator with a linear weight `[2, 2]`.
    struct Net {
        params: Vec<(String, Param)>,
    }

    impl Net {
        fn new(device: &Device) -> Self {
            let p = |v: Vec<f32>, shape: Vec<usize>, role| Param::from_vec(device, v, shape, role).unwrap();
            let lin: Vec<f32> = (0..12).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect();
            let conv: Vec<f32> = (0..8).map(|i| ((i * 5 % 7) as f32 - 3.0) / 3.0).collect();
            Net {
                params: vec![
                    ("discriminator.0.weight".into(), p(lin, vec![3, 4], ParamRole::Weight)),
                    ("discriminator.0.bias".into(), p(vec![0.5; 4], vec![4], ParamRole::Bias)),
                    (
                        "discriminator.2.weight".into(),
                        p(conv, vec![2, 1, 2, 2], ParamRole::Weight),
                    ),
                    (
                        "generator.0.weight".into(),
                        p(vec![2.0, 0.0, 0.0, 3.0], vec![2, 2], ParamRole::Weight),
                    ),
                ],
            }
        }
        fn values(&self, name: &str) -> Vec<f32> {
            self.params.iter().find(|(n, _)| n == name).unwrap().1.to_vec()
        }
        fn param(&self, name: &str) -> &Param {
            &self.params.iter().find(|(n, _)| n == name).unwrap().1
        }
    }

    impl Parameterized for Net {
        fn named_params(&self) -> Vec<(String, &Param)> {
            self.params.iter().map(|(n, p)| (n.clone(), p)).collect()
        }
        fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
            self.params.iter_mut().map(|(n, p)| (n.clone(), p)).collect()
        }
    }

    impl Model for Net {
        fn family(&self) -> &str {
            "net"
        }
        fn describe(&self) -> String {
            "test".into()
        }
        fn param_groups(&self) -> Vec<String> {
            vec!["discriminator".into(), "generator".into()]
        }
        fn train_step(&mut self, _: &Batch, _: &mut TrainContext<'_>) -> Result<StepReport> {
            Err(Error::unsupported("training", "test model"))
        }
        fn evaluate(&mut self, _: &Batch, _: &mut EvalContext<'_>) -> Result<BTreeMap<String, f64>> {
            Ok(BTreeMap::new())
        }
    }

    /// The largest singular value of the row-major matrix `a` (`rows x cols`), from the largest
    /// eigenvalue of `aᵀa` by cyclic Jacobi rotations (f64, independent of the power iteration).
    fn top_singular_value(a: &[f64], rows: usize, cols: usize) -> f64 {
        let mut m = vec![0.0f64; cols * cols];
        for i in 0..cols {
            for j in 0..cols {
                m[i * cols + j] = (0..rows).map(|r| a[r * cols + i] * a[r * cols + j]).sum();
            }
        }
        for _ in 0..100 {
            for p in 0..cols {
                for q in p + 1..cols {
                    let apq = m[p * cols + q];
                    if apq.abs() < 1e-300 {
                        continue;
                    }
                    let theta = (m[q * cols + q] - m[p * cols + p]) / (2.0 * apq);
                    let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                    let t = if theta == 0.0 { 1.0 } else { t };
                    let (c, s) = (1.0 / (t * t + 1.0).sqrt(), t / (t * t + 1.0).sqrt());
                    for k in 0..cols {
                        let (mkp, mkq) = (m[k * cols + p], m[k * cols + q]);
                        m[k * cols + p] = c * mkp - s * mkq;
                        m[k * cols + q] = s * mkp + c * mkq;
                    }
                    for k in 0..cols {
                        let (mpk, mqk) = (m[p * cols + k], m[q * cols + k]);
                        m[p * cols + k] = c * mpk - s * mqk;
                        m[q * cols + k] = s * mpk + c * mqk;
                    }
                }
            }
        }
        (0..cols).map(|i| m[i * cols + i]).fold(0.0, f64::max).sqrt()
    }

    fn ctx<'a>(device: &'a Device, rng: &'a mut Rng) -> HookContext<'a> {
        HookContext { step: 0, device, rng }
    }

    #[test]
    fn jacobi_reference_is_right_on_a_known_matrix() {
        // diag(3, 2) padded to 3x4: singular values 3, 2, 0.
        let a = [3.0, 0., 0., 0., 0., 2., 0., 0., 0., 0., 0., 0.];
        assert!((top_singular_value(&a, 3, 4) - 3.0).abs() < 1e-12);
        // [[1, 1], [0, 1]]: σ_max = golden ratio.
        let phi = (1.0 + 5f64.sqrt()) / 2.0;
        assert!((top_singular_value(&[1., 1., 0., 1.], 2, 2) - phi).abs() < 1e-12);
    }

    #[test]
    fn normalized_weights_have_unit_spectral_norm_and_other_params_stay() {
        let device = Device::default();
        let mut net = Net::new(&device);
        let lin0: Vec<f64> = net.values("discriminator.0.weight").iter().map(|&x| x as f64).collect();
        let conv0: Vec<f64> = net.values("discriminator.2.weight").iter().map(|&x| x as f64).collect();
        let sigma_lin = top_singular_value(&lin0, 3, 4);
        let sigma_conv = top_singular_value(&conv0, 2, 4);
        assert!(sigma_lin > 1.5 && sigma_conv > 1.0, "{sigma_lin} {sigma_conv}");
        let mut sn = SpectralNormConfig::default().build().unwrap();
        assert_eq!(sn.name(), "spectral_norm@discriminator");
        sn.validate(&net).unwrap();
        let mut rng = Rng::seed_from_u64(1);
        sn.setup(&mut net, &mut ctx(&device, &mut rng)).unwrap();
        for (name, rows, cols, sigma) in [
            ("discriminator.0.weight", 3, 4, sigma_lin),
            ("discriminator.2.weight", 2, 4, sigma_conv),
        ] {
            let w: Vec<f64> = net.values(name).iter().map(|&x| x as f64).collect();
            let s = top_singular_value(&w, rows, cols);
            assert!((s - 1.0).abs() < 1e-4, "{name}: σ(W_sn) = {s}");
            let original = if name.contains(".0.") { &lin0 } else { &conv0 };
            for (a, b) in w.iter().zip(original) {
                assert!((a * sigma - b).abs() < 1e-4, "{name}: W_sn·σ != W");
            }
        }
        assert_eq!(net.values("discriminator.0.bias"), vec![0.5; 4]);
        assert_eq!(net.values("generator.0.weight"), vec![2.0, 0.0, 0.0, 3.0]);
        // Setup again (as after a restore) changes nothing.
        let before = net.values("discriminator.0.weight");
        sn.setup(&mut net, &mut ctx(&device, &mut rng)).unwrap();
        assert_eq!(net.values("discriminator.0.weight"), before);
    }

    #[test]
    fn edited_gradient_is_the_gradient_with_respect_to_the_raw_weight() {
        let device = Device::default();
        let mut net = Net::new(&device);
        let mut sn = SpectralNormConfig {
            layers: "discriminator.0.weight".into(),
            power_iterations: 1,
        }
        .build()
        .unwrap();
        let mut rng = Rng::seed_from_u64(2);
        sn.setup(&mut net, &mut ctx(&device, &mut rng)).unwrap();
        // Snapshot W, u, v from the state (what the gradient must use).
        let state = sn.state();
        let w: Vec<f64> = state
            .tensor("w.discriminator.0.weight")
            .unwrap()
            .1
            .iter()
            .map(|&x| x as f64)
            .collect();
        let u: Vec<f64> = state
            .tensor("u.discriminator.0.weight")
            .unwrap()
            .1
            .iter()
            .map(|&x| x as f64)
            .collect();
        let v: Vec<f64> = state
            .tensor("v.discriminator.0.weight")
            .unwrap()
            .1
            .iter()
            .map(|&x| x as f64)
            .collect();
        assert_eq!((u.len(), v.len()), (4, 3));
        // L(W) = Σ c ⊙ W/σ(W), σ(W) = uᵀ M v with M[o][i] = W[i*4 + o] (the linear weight is
        // stored [in, out]), u and v fixed. So G = ∂L/∂W_sn = c.
        let c: Vec<f64> = (0..12).map(|i| ((i * 3 % 5) as f64 - 2.0) / 2.0).collect();
        let sigma = |w: &[f64]| -> f64 {
            (0..4)
                .map(|o| (0..3).map(|i| u[o] * w[i * 4 + o] * v[i]).sum::<f64>())
                .sum()
        };
        let loss = |w: &[f64]| -> f64 {
            let s = sigma(w);
            w.iter().zip(&c).map(|(a, b)| a / s * b).sum()
        };
        // Central differences in f64.
        let h = 1e-6;
        let numeric: Vec<f64> = (0..12)
            .map(|k| {
                let (mut p, mut m) = (w.clone(), w.clone());
                p[k] += h;
                m[k] -= h;
                (loss(&p) - loss(&m)) / (2.0 * h)
            })
            .collect();
        // Analytic: c/σ − (Σ c ⊙ W)/σ² · (u vᵀ) laid out like W.
        let s = sigma(&w);
        let cw: f64 = c.iter().zip(&w).map(|(a, b)| a * b).sum();
        let analytic: Vec<f64> = (0..12)
            .map(|k| {
                let (i, o) = (k / 4, k % 4);
                c[k] / s - cw / (s * s) * u[o] * v[i]
            })
            .collect();
        for (a, n) in analytic.iter().zip(&numeric) {
            assert!((a - n).abs() < 1e-6 * (1.0 + a.abs()), "{analytic:?} vs {numeric:?}");
        }
        // The stabilizer's edit of G = c.
        let p = net.param("discriminator.0.weight").clone();
        let mut grads = Grads::leaky();
        let cf: Vec<f32> = c.iter().map(|&x| x as f32).collect();
        set_grad(&mut grads, &p, &cf).unwrap();
        let mut rng = Rng::seed_from_u64(0);
        {
            let params = group_params(net.named_params_mut(), "discriminator");
            sn.edit_gradients("discriminator", &params, &mut grads, &mut ctx(&device, &mut rng))
                .unwrap();
        }
        let edited = grad_to_vec(&mut grads, &p).unwrap();
        for (k, (e, a)) in edited.iter().zip(&analytic).enumerate() {
            assert!((*e as f64 - a).abs() < 1e-4 * (1.0 + a.abs()), "[{k}] {e} vs {a}");
        }
    }

    #[test]
    fn an_update_moves_the_raw_weight_and_renormalizes_and_state_round_trips() {
        let device = Device::default();
        let mut net = Net::new(&device);
        let mut sn = SpectralNormConfig::default().build().unwrap();
        let mut rng = Rng::seed_from_u64(3);
        sn.setup(&mut net, &mut ctx(&device, &mut rng)).unwrap();
        let raw_before = sn.state().tensor("w.discriminator.0.weight").unwrap().1.clone();
        // An "optimizer" adds Δ to the normalized parameter.
        let delta: Vec<f32> = (0..12).map(|i| (i as f32 - 6.0) / 100.0).collect();
        {
            let mut params = group_params(net.named_params_mut(), "discriminator");
            for (n, p) in params.iter_mut() {
                if n == "discriminator.0.weight" {
                    let moved: Vec<f32> = p.to_vec().iter().zip(&delta).map(|(a, b)| a + b).collect();
                    p.set(&moved).unwrap();
                }
            }
            sn.after_update("discriminator", &mut params, &mut ctx(&device, &mut rng))
                .unwrap();
        }
        let state = sn.state();
        let raw_after = &state.tensor("w.discriminator.0.weight").unwrap().1;
        for ((a, b), d) in raw_after.iter().zip(&raw_before).zip(&delta) {
            assert!((a - b - d).abs() < 1e-6);
        }
        let w: Vec<f64> = net.values("discriminator.0.weight").iter().map(|&x| x as f64).collect();
        // One power iteration from a converged vector: σ still within 1e-3 of the truth.
        assert!((top_singular_value(&w, 3, 4) - 1.0).abs() < 1e-3);
        let mut report = StepReport::default();
        sn.end_step(&mut report, &mut ctx(&device, &mut rng)).unwrap();
        assert!(report.diagnostics["spectral_norm@discriminator/sigma_max"] > 1.0);

        // Round trip: a fresh stabilizer restored from the state and set up on the restored model
        // holds the same values, and edits gradients the same way.
        let mut restored = SpectralNormConfig::default().build().unwrap();
        restored.load_state(&state).unwrap();
        assert_eq!(restored.state(), state);
        let mut net2 = Net::new(&device);
        restored.setup(&mut net2, &mut ctx(&device, &mut rng)).unwrap();
        assert_eq!(
            net2.values("discriminator.0.weight"),
            net.values("discriminator.0.weight")
        );
        assert_eq!(
            net2.values("discriminator.2.weight"),
            net.values("discriminator.2.weight")
        );
        // A saved state for another shape is refused.
        let mut bad = state.clone();
        bad.tensors.get_mut("w.discriminator.2.weight").unwrap().0 = vec![2, 2, 2];
        let mut other = SpectralNormConfig::default().build().unwrap();
        other.load_state(&bad).unwrap();
        assert!(other
            .setup(&mut Net::new(&device), &mut ctx(&device, &mut rng))
            .is_err());
        let mut missing = state.clone();
        missing.tensors.remove("u.discriminator.0.weight");
        assert!(matches!(
            SpectralNormConfig::default().build().unwrap().load_state(&missing),
            Err(Error::State { .. })
        ));
    }

    #[test]
    fn patterns_groups_and_errors() {
        assert!(glob_match("discriminator.*", "discriminator.0.weight"));
        assert!(!glob_match("discriminator.*", "generator.0.weight"));
        assert!(glob_match("*.weight", "generator.0.weight"));
        assert!(glob_match("d*.?.weight", "discriminator.2.weight"));
        assert!(!glob_match("d*.?.weight", "discriminator.12.weight"));
        let cfg = |layers: &str| SpectralNormConfig {
            layers: layers.into(),
            ..Default::default()
        };
        assert_eq!(cfg("*.weight").build().unwrap().name(), "spectral_norm");
        assert_eq!(
            cfg("generator.0.weight").build().unwrap().name(),
            "spectral_norm@generator"
        );
        let device = Device::default();
        let net = Net::new(&device);
        let err = cfg("discriminator.9.*").build().unwrap().validate(&net).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("discriminator.9.*")
                && msg.contains("discriminator.0.bias (bias)")
                && msg.contains("generator.0.weight"),
            "{msg}"
        );
        // Biases alone do not count.
        assert!(cfg("discriminator.0.bias").build().unwrap().validate(&net).is_err());
        let err = cfg("critic.*").build().unwrap().validate(&net).unwrap_err().to_string();
        assert!(err.contains("no parameter group `critic`"), "{err}");
        assert!(matches!(cfg("").build(), Err(Error::Config { .. })));
        let zero = SpectralNormConfig {
            power_iterations: 0,
            ..Default::default()
        };
        assert!(matches!(zero.build(), Err(Error::Config { path, .. }) if path.ends_with("power_iterations")));
    }

    #[test]
    fn conflicts_with_weight_clipping_on_the_same_group() {
        let sn = || SpectralNormConfig::default().build().unwrap();
        let clip = crate::WeightClippingConfig::default().build().unwrap();
        let err = StabilizerStack::new(vec![sn(), clip]).err().unwrap().to_string();
        assert!(
            err.contains("spectral_norm@discriminator") && err.contains("weight scale"),
            "{err}"
        );
        let gen_clip = crate::WeightClippingConfig {
            group: "generator".into(),
            ..Default::default()
        }
        .build()
        .unwrap();
        assert!(StabilizerStack::new(vec![sn(), gen_clip]).is_ok());
        // A pattern over every group conflicts with clipping anywhere.
        let all = SpectralNormConfig {
            layers: "*".into(),
            ..Default::default()
        }
        .build()
        .unwrap();
        let gen_clip = crate::WeightClippingConfig {
            group: "generator".into(),
            ..Default::default()
        }
        .build()
        .unwrap();
        assert!(StabilizerStack::new(vec![all, gen_clip]).is_err());
    }

    #[test]
    fn config_deserializes_through_typetag_and_registers() {
        let cfg: Box<dyn StabilizerConfig> = nash_core::serde_json::from_str(
            r#"{"type": "spectral_norm", "layers": "discriminator.*", "power_iterations": 2}"#,
        )
        .unwrap();
        assert_eq!(cfg.build().unwrap().name(), "spectral_norm@discriminator");
        let err = nash_core::serde_json::from_str::<Box<dyn StabilizerConfig>>(
            r#"{"type": "spectral_norm", "iterations": 2}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("iterations"), "{err}");
        let mut registry = Registry::new();
        register(&mut registry).unwrap();
        let info = registry
            .find(nash_core::registry::Kind::Stabilizer, "spectral_norm")
            .unwrap();
        assert!(info.fields.iter().any(|f| f.name == "power_iterations"));
    }
}
