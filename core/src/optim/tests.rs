//! Optimizer tests: values pinned against PyTorch, state round trips, config errors.
// Reference numbers are pasted verbatim from PyTorch's `%.9g` output (which round-trips f32).
#![allow(clippy::excessive_precision)]
use super::{Optimizer, OptimizerConfig};
use crate::state::StateDict;
use crate::tensor::{Device, Grads, Param, ParamRole};

const P0: [f32; 4] = [0.5, -1.0, 1.5, -2.0];
const G: [[f32; 4]; 3] = [[0.1, -0.2, 0.3, -0.4], [-0.3, 0.5, 0.2, 0.1], [0.25, 0.05, -0.6, 0.3]];

fn build(json: &str) -> Box<dyn Optimizer> {
    let config: Box<dyn OptimizerConfig> = serde_json::from_str(json).unwrap();
    config.build().unwrap()
}

fn param(dev: &Device, values: &[f32], role: ParamRole) -> Param {
    Param::from_vec(dev, values.to_vec(), vec![values.len()], role).unwrap()
}

fn grads_for(p: &Param, g: &[f32]) -> Grads {
    let mut grads = Grads::leaky();
    grads.get_or_alloc_mut(p.value()).unwrap().copy_from_slice(g);
    grads
}

/// One step of `opt` on `p` with gradient `g`.
fn step(opt: &mut dyn Optimizer, p: &mut Param, g: &[f32]) {
    let mut grads = grads_for(p, g);
    let mut params = vec![("w".to_string(), p)];
    opt.step(&mut params, &mut grads).unwrap();
}

/// The parameter after the three steps of the reference script.
fn run3(json: &str) -> Vec<f32> {
    let dev = Device::default();
    let mut p = param(&dev, &P0, ParamRole::Weight);
    let mut opt = build(json);
    for g in &G {
        step(opt.as_mut(), &mut p, g);
    }
    p.to_vec()
}

fn assert_close(case: &str, got: &[f32], expected: &[f32]) {
    for (i, (&a, &e)) in got.iter().zip(expected).enumerate() {
        assert!(
            (a - e).abs() <= 2e-6 * e.abs() + 1e-7,
            "{case}[{i}]: got {a}, PyTorch {e} (all: {got:?})"
        );
    }
}

// Reference values: PyTorch 2.15, float32, single-tensor implementations (foreach=False).
//   import torch
//   P0 = [0.5, -1.0, 1.5, -2.0]
//   G = [[0.1, -0.2, 0.3, -0.4], [-0.3, 0.5, 0.2, 0.1], [0.25, 0.05, -0.6, 0.3]]
//   def run(make_opt, make_sched=None):
//       p = torch.tensor(P0, requires_grad=True)
//       opt = make_opt([p]); s = make_sched(opt) if make_sched else None
//       for g in G:
//           p.grad = torch.tensor(g); opt.step()
//           if s: s.step()
//       return [float(x) for x in p.detach()]
//   O = torch.optim; L = torch.optim.lr_scheduler
// Each case below gives the `run(...)` call that produced its numbers.

#[test]
fn sgd_matches_pytorch() {
    // run(lambda ps: O.SGD(ps, lr=0.1))
    assert_close(
        "sgd_plain",
        &run3(r#"{"type":"sgd","lr":0.1}"#),
        &[0.495000035, -1.03499997, 1.51000011, -2.0],
    );
    // run(lambda ps: O.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01))
    assert_close(
        "sgd_momentum_dampening_wd",
        &run3(r#"{"type":"sgd","lr":0.1,"momentum":0.9,"dampening":0.1,"weight_decay":0.01}"#),
        &[0.499051988, -1.03051198, 1.43064511, -1.92519712],
    );
    // run(lambda ps: O.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05))
    assert_close(
        "sgd_nesterov_wd",
        &run3(r#"{"type":"sgd","lr":0.1,"momentum":0.9,"nesterov":true,"weight_decay":0.05}"#),
        &[0.479432613, -1.03644574, 1.39868331, -1.86861587],
    );
    // run(lambda ps: O.SGD(ps, lr=0.1, momentum=0.9), lambda o: L.StepLR(o, step_size=2, gamma=0.5))
    assert_close(
        "sgd_momentum_steplr",
        &run3(r#"{"type":"sgd","lr":0.1,"momentum":0.9,"schedule":{"kind":"step","step_size":2,"gamma":0.5}}"#),
        &[0.507950008, -1.02889991, 1.43184996, -1.93729997],
    );
}

#[test]
fn adam_matches_pytorch() {
    // run(lambda ps: O.Adam(ps, lr=0.01, foreach=False))
    assert_close(
        "adam_default",
        &run3(r#"{"type":"adam","lr":0.01}"#),
        &[0.493974924, -0.998416722, 1.48191214, -1.98613274],
    );
    // run(lambda ps: O.Adam(ps, lr=0.01, weight_decay=0.1, amsgrad=True, foreach=False))
    assert_close(
        "adam_wd_amsgrad",
        &run3(r#"{"type":"adam","lr":0.01,"weight_decay":0.1,"amsgrad":true}"#),
        &[0.489976048, -0.992819667, 1.47815228, -1.97726822],
    );
    // run(lambda ps: O.Adam(ps, lr=0.05, betas=(0.5, 0.9), eps=1e-3, foreach=False),
    //     lambda o: L.CosineAnnealingLR(o, T_max=3, eta_min=0.001))
    assert_close(
        "adam_betas_eps_cosine",
        &run3(
            r#"{"type":"adam","lr":0.05,"betas":[0.5,0.9],"eps":1e-3,
                "schedule":{"kind":"cosine","total_steps":3,"min_lr":0.001}}"#,
        ),
        &[0.473953068, -0.982221186, 1.42311704, -1.94781077],
    );
}

#[test]
fn adamw_matches_pytorch() {
    // run(lambda ps: O.AdamW(ps, lr=0.01, foreach=False))   (weight_decay defaults to 0.01)
    assert_close(
        "adamw_default",
        &run3(r#"{"type":"adamw","lr":0.01}"#),
        &[0.493826419, -0.998118281, 1.4814651, -1.98553526],
    );
    // run(lambda ps: O.AdamW(ps, lr=0.01, weight_decay=0.1, amsgrad=True, foreach=False))
    assert_close(
        "adamw_wd_amsgrad",
        &run3(r#"{"type":"adamw","lr":0.01,"weight_decay":0.1,"amsgrad":true}"#),
        &[0.492491484, -0.995435357, 1.47744644, -1.98016357],
    );
}

#[test]
fn rmsprop_matches_pytorch() {
    // run(lambda ps: O.RMSprop(ps, lr=0.01, foreach=False))
    assert_close(
        "rmsprop_default",
        &run3(r#"{"type":"rmsprop"}"#),
        &[0.432687759, -1.00220931, 1.43024361, -1.98357844],
    );
    // run(lambda ps: O.RMSprop(ps, lr=0.01, centered=True, foreach=False))
    assert_close(
        "rmsprop_centered",
        &run3(r#"{"type":"rmsprop","centered":true}"#),
        &[0.432371438, -1.00187182, 1.42920983, -1.98313832],
    );
    // run(lambda ps: O.RMSprop(ps, lr=0.01, alpha=0.9, momentum=0.9, centered=True, weight_decay=0.1,
    //     foreach=False))
    assert_close(
        "rmsprop_momentum_centered_wd",
        &run3(r#"{"type":"rmsprop","alpha":0.9,"momentum":0.9,"centered":true,"weight_decay":0.1}"#),
        &[0.439073801, -0.955826223, 1.38864541, -1.90521371],
    );
    // run(lambda ps: O.RMSprop(ps, lr=0.01, momentum=0.5, foreach=False), lambda o: L.ExponentialLR(o, gamma=0.8))
    assert_close(
        "rmsprop_momentum_exponential",
        &run3(r#"{"type":"rmsprop","momentum":0.5,"schedule":{"kind":"exponential","gamma":0.8}}"#),
        &[0.410479814, -0.954011619, 1.33663762, -1.90918708],
    );
}

/// Five steps on two parameters, with gradients that change every step.
fn grads_at(k: usize) -> ([f32; 4], [f32; 3]) {
    let a = G[k % 3].map(|g| g * (1.0 + k as f32 * 0.25));
    let b = [0.3 - 0.1 * k as f32, -0.2, 0.05 * k as f32 + 0.01];
    (a, b)
}

fn step_two(opt: &mut dyn Optimizer, a: &mut Param, b: &mut Param, k: usize) {
    let (ga, gb) = grads_at(k);
    let mut grads = grads_for(a, &ga);
    grads.get_or_alloc_mut(b.value()).unwrap().copy_from_slice(&gb);
    let mut params = vec![("net.a".to_string(), a), ("net.b".to_string(), b)];
    opt.step(&mut params, &mut grads).unwrap();
}

#[test]
fn state_round_trip_is_bit_identical() {
    let dev = Device::default();
    let configs = [
        r#"{"type":"sgd","lr":0.1,"momentum":0.9,"nesterov":true,"schedule":{"kind":"step","step_size":2,"gamma":0.5}}"#,
        r#"{"type":"adam","lr":0.01,"amsgrad":true,"weight_decay":0.1,"schedule":{"kind":"cosine","total_steps":4,"warmup_steps":2}}"#,
        r#"{"type":"adamw","lr":0.01}"#,
        r#"{"type":"rmsprop","momentum":0.9,"centered":true,"schedule":{"kind":"exponential","gamma":0.9}}"#,
    ];
    for json in configs {
        let b0 = [0.1f32, 0.2, -0.3];
        // Five steps straight.
        let (mut a, mut b) = (param(&dev, &P0, ParamRole::Weight), param(&dev, &b0, ParamRole::Bias));
        let mut straight = build(json);
        straight.scale_learning_rate(0.7);
        for k in 0..5 {
            step_two(straight.as_mut(), &mut a, &mut b, k);
        }
        // Three steps, save (through JSON, as a checkpoint would), fresh optimizer, load, two more.
        let (mut a2, mut b2) = (param(&dev, &P0, ParamRole::Weight), param(&dev, &b0, ParamRole::Bias));
        let mut first = build(json);
        first.scale_learning_rate(0.7);
        for k in 0..3 {
            step_two(first.as_mut(), &mut a2, &mut b2, k);
        }
        let saved = serde_json::to_string(&first.state()).unwrap();
        let saved: StateDict = serde_json::from_str(&saved).unwrap();
        assert_eq!(saved, first.state(), "{json}: state changed through JSON");
        let mut resumed = build(json);
        resumed.load_state(&saved).unwrap();
        assert_eq!(
            resumed.learning_rate().to_bits(),
            first.learning_rate().to_bits(),
            "{json}"
        );
        for k in 3..5 {
            step_two(resumed.as_mut(), &mut a2, &mut b2, k);
        }
        let bits = |p: &Param| p.to_vec().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&a2), "{json}: parameter a differs after resume");
        assert_eq!(bits(&b), bits(&b2), "{json}: parameter b differs after resume");
        assert_eq!(straight.state(), resumed.state(), "{json}: state differs after resume");
        assert_ne!(a.to_vec(), P0.to_vec(), "{json}: nothing was updated");
    }
}

#[test]
fn buffers_and_parameters_without_gradient_are_untouched() {
    let dev = Device::default();
    let mut w = param(&dev, &P0, ParamRole::Weight);
    let mut running = param(&dev, &[1.0, 2.0], ParamRole::Buffer);
    let mut unused = param(&dev, &[3.0, 4.0], ParamRole::Bias);
    let mut grads = grads_for(&w, &G[0]);
    grads
        .get_or_alloc_mut(running.value())
        .unwrap()
        .copy_from_slice(&[1.0, 1.0]);
    let mut opt = build(r#"{"type":"adam","lr":0.1,"weight_decay":0.5}"#);
    let mut params = vec![
        ("w".to_string(), &mut w),
        ("running".to_string(), &mut running),
        ("unused".to_string(), &mut unused),
    ];
    opt.step(&mut params, &mut grads).unwrap();
    assert_ne!(w.to_vec(), P0.to_vec());
    // The update keeps the tensor id: the gradient is still found under it.
    assert_eq!(grads.get_or_alloc_mut(w.value()).unwrap().to_vec(), G[0].to_vec());
    assert_eq!(running.to_vec(), vec![1.0, 2.0]);
    assert_eq!(unused.to_vec(), vec![3.0, 4.0]);
    let state = opt.state();
    assert!(state.tensors.contains_key("w.exp_avg"));
    assert!(!state.meta.contains_key("running.step") && !state.meta.contains_key("unused.step"));
}

#[test]
fn learning_rate_follows_schedule_and_scale() {
    let dev = Device::default();
    let mut p = param(&dev, &P0, ParamRole::Weight);
    let mut opt =
        build(r#"{"type":"sgd","lr":0.1,"schedule":{"kind":"step","step_size":1,"gamma":0.5,"warmup_steps":2}}"#);
    assert_eq!(opt.learning_rate(), 0.0);
    step(opt.as_mut(), &mut p, &G[0]);
    assert_eq!(p.to_vec(), P0.to_vec(), "the first warm-up step has learning rate 0");
    assert!((opt.learning_rate() - 0.5 * 0.05).abs() < 1e-15);
    opt.scale_learning_rate(0.5);
    opt.scale_learning_rate(0.5);
    assert!((opt.learning_rate() - 0.25 * 0.5 * 0.05).abs() < 1e-15);
    step(opt.as_mut(), &mut p, &G[0]);
    assert!((opt.learning_rate() - 0.25 * 0.025).abs() < 1e-15);
}

fn build_err(json: &str) -> String {
    let config: Box<dyn OptimizerConfig> = serde_json::from_str(json).unwrap();
    match config.build() {
        Ok(_) => panic!("{json} should be refused"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_configs_are_refused_with_their_path() {
    assert!(build_err(r#"{"type":"adam","lr":0}"#).contains("adam.lr"));
    assert!(build_err(r#"{"type":"adamw","betas":[0.9,1.0]}"#).contains("adamw.betas[1]"));
    assert!(build_err(r#"{"type":"sgd","nesterov":true}"#).contains("sgd.nesterov"));
    assert!(build_err(r#"{"type":"sgd","dampening":1.5}"#).contains("sgd.dampening"));
    assert!(build_err(r#"{"type":"rmsprop","alpha":-0.1}"#).contains("rmsprop.alpha"));
    assert!(
        build_err(r#"{"type":"rmsprop","schedule":{"kind":"cosine","total_steps":0}}"#)
            .contains("rmsprop.schedule.total_steps")
    );
    assert!(serde_json::from_str::<Box<dyn OptimizerConfig>>(r#"{"type":"adam","learning_rate":0.1}"#).is_err());
}

#[test]
fn mismatched_state_is_refused() {
    let dev = Device::default();
    let mut p = param(&dev, &P0, ParamRole::Weight);
    let mut adam = build(r#"{"type":"adam"}"#);
    step(adam.as_mut(), &mut p, &G[0]);
    let state = adam.state();
    // Another optimizer.
    let err = build(r#"{"type":"rmsprop"}"#)
        .load_state(&state)
        .unwrap_err()
        .to_string();
    assert!(err.contains("adam") && err.contains("rmsprop"), "{err}");
    // A buffer the saved state lacks.
    let err = build(r#"{"type":"adam","amsgrad":true}"#)
        .load_state(&state)
        .unwrap_err()
        .to_string();
    assert!(err.contains("w.max_exp_avg_sq"), "{err}");
    // A parameter of another size.
    let mut other = build(r#"{"type":"adam"}"#);
    other.load_state(&state).unwrap();
    let mut small = param(&dev, &[1.0, 2.0], ParamRole::Weight);
    let mut grads = grads_for(&small, &[0.1, 0.2]);
    let err = other
        .step(&mut [("w".to_string(), &mut small)], &mut grads)
        .unwrap_err()
        .to_string();
    assert!(err.contains("w.exp_avg") && err.contains("4 values"), "{err}");
}

#[test]
fn registers_every_optimizer() {
    let mut registry = crate::registry::Registry::new();
    super::register(&mut registry).unwrap();
    assert_eq!(
        registry.tags(crate::registry::Kind::Optimizer),
        vec!["adam", "adamw", "rmsprop", "sgd"]
    );
    let adamw = registry.find(crate::registry::Kind::Optimizer, "adamw").unwrap();
    let wd = adamw.fields.iter().find(|f| f.name == "weight_decay").unwrap();
    assert_eq!(wd.default, serde_json::json!(0.01));
    assert!(adamw.fields.iter().any(|f| f.name == "schedule"));
}

#[test]
fn adam_splits_a_large_parameter_across_threads_without_changing_a_bit() {
    // Large enough for the parallel path (PARALLEL_MIN_ELEMENTS), with an uneven last chunk.
    let n = (1 << 16) + 13;
    let values: Vec<f32> = (0..n).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
    let gradients: Vec<Vec<f32>> = (0..3)
        .map(|s| (0..n).map(|i| ((i * 13 + s * 7) % 97) as f32 / 40.0 - 1.2).collect())
        .collect();
    let run = |threads: usize, json: &str| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let dev = Device::default();
            let mut p = param(&dev, &values, ParamRole::Weight);
            let mut opt = build(json);
            for g in &gradients {
                step(opt.as_mut(), &mut p, g);
            }
            p.to_vec().iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        })
    };
    for json in [
        r#"{"type":"adam","lr":0.01}"#,
        r#"{"type":"adamw","lr":0.01,"weight_decay":0.1}"#,
    ] {
        let serial = run(1, json);
        assert_ne!(serial, values.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        assert_eq!(run(3, json), serial, "{json}");
    }
}
