//! Bounds on parameters and gradients: `weight_clipping` and `gradient_norm_clipping`.

use std::collections::BTreeMap;

use nash_core::error::{Error, Result};
use nash_core::model::{Model, StepReport};
use nash_core::stabilizer::{HookContext, Stabilizer, StabilizerConfig};
use nash_core::tensor::{grad_to_vec, set_grad, Grads, Param, ParamRole};
use serde::{Deserialize, Serialize};

use crate::scope::{check_group, conflict, require_group_name, require_positive, scoped_name};

/// WGAN weight clipping (Arjovsky et al. 2017): after every optimizer update of `group`, clamp each
/// trainable parameter of that group whose role is in `roles` to [-clip, clip]. The reference code
/// clamps every critic parameter (`p.data.clamp_(-clip, clip)` for `p in netD.parameters()`); the
/// default roles, weights and biases, cover every parameter of a critic without normalization layers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WeightClippingConfig {
    /// The parameter group to clip.
    pub group: String,
    /// The bound c of [-c, c].
    pub clip: f32,
    /// The parameter roles to clip (`weight`, `bias`, `scale`, `shift`, `embedding`).
    pub roles: Vec<ParamRole>,
}

impl Default for WeightClippingConfig {
    fn default() -> Self {
        WeightClippingConfig {
            group: "discriminator".into(),
            clip: 0.01,
            roles: vec![ParamRole::Weight, ParamRole::Bias],
        }
    }
}

#[typetag::serde(name = "weight_clipping")]
impl StabilizerConfig for WeightClippingConfig {
    fn build(&self) -> Result<Box<dyn Stabilizer>> {
        if self.group.is_empty() {
            return Err(Error::config(
                "stabilizers.weight_clipping.group",
                "must name a parameter group",
            ));
        }
        require_positive("stabilizers.weight_clipping.clip", self.clip)?;
        if self.roles.is_empty() {
            return Err(Error::config(
                "stabilizers.weight_clipping.roles",
                "must list at least one role (weight, bias, scale, shift, embedding)",
            ));
        }
        if self.roles.contains(&ParamRole::Buffer) {
            return Err(Error::config(
                "stabilizers.weight_clipping.roles",
                "`buffer` entries are not trained and cannot be clipped; use weight, bias, scale, shift or embedding",
            ));
        }
        Ok(Box::new(WeightClipping {
            name: scoped_name("weight_clipping", Some(&self.group)),
            config: self.clone(),
            last_clipped_share: None,
        }))
    }
}

/// See [`WeightClippingConfig`].
#[derive(Clone, Debug)]
pub struct WeightClipping {
    name: String,
    config: WeightClippingConfig,
    /// Share of the clipped entries that were outside the bound at the last update.
    last_clipped_share: Option<f64>,
}

impl WeightClipping {
    fn selects(&self, p: &Param) -> bool {
        p.trainable() && self.config.roles.contains(&p.role)
    }
}

impl Stabilizer for WeightClipping {
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self, model: &dyn Model) -> Result<()> {
        check_group(model, &self.config.group, "stabilizers.weight_clipping.group")?;
        let prefix = format!("{}.", self.config.group);
        let in_group: Vec<(String, &Param)> = model
            .named_params()
            .into_iter()
            .filter(|(n, _)| n.starts_with(&prefix))
            .collect();
        if !in_group.iter().any(|(_, p)| self.selects(p)) {
            let mut present: Vec<String> = in_group
                .iter()
                .map(|(_, p)| format!("{:?}", p.role).to_lowercase())
                .collect();
            present.sort();
            present.dedup();
            return Err(Error::config(
                "stabilizers.weight_clipping.roles",
                format!(
                    "no trainable parameter of group `{}` has a role in {:?}; the group has roles: {}",
                    self.config.group,
                    self.config.roles,
                    if present.is_empty() {
                        "(no parameters)".to_string()
                    } else {
                        present.join(", ")
                    }
                ),
            ));
        }
        Ok(())
    }

    fn conflicts_with(&self, other: &dyn Stabilizer) -> Option<String> {
        conflict("weight_clipping", Some(&self.config.group), other)
    }

    fn after_update(
        &mut self,
        group: &str,
        params: &mut [(String, &mut Param)],
        _ctx: &mut HookContext<'_>,
    ) -> Result<()> {
        if group != self.config.group {
            return Ok(());
        }
        let c = self.config.clip;
        let (mut total, mut clipped) = (0usize, 0usize);
        for (_, p) in params.iter_mut() {
            if !self.selects(p) {
                continue;
            }
            let mut values = p.to_vec();
            let mut changed = false;
            for v in values.iter_mut() {
                let bounded = v.clamp(-c, c);
                if bounded != *v {
                    *v = bounded;
                    changed = true;
                    clipped += 1;
                }
            }
            total += values.len();
            if changed {
                p.set(&values)?;
            }
        }
        self.last_clipped_share = Some(if total == 0 { 0.0 } else { clipped as f64 / total as f64 });
        Ok(())
    }

    fn end_step(&mut self, report: &mut StepReport, _ctx: &mut HookContext<'_>) -> Result<()> {
        if let Some(share) = self.last_clipped_share.take() {
            report.diagnostic(format!("weight_clipping/{}/clipped_share", self.config.group), share);
        }
        Ok(())
    }
}

/// Gradient norm clipping, as `torch.nn.utils.clip_grad_norm_(params, max_norm)`: before each
/// optimizer update of `group` (every group when unset), compute the global L2 norm of the group's
/// gradients and, if it exceeds `max_norm`, scale them all by `max_norm / (norm + 1e-6)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GradientNormClippingConfig {
    /// The parameter group to clip; every group (each clipped separately) when unset.
    pub group: Option<String>,
    /// The largest allowed global L2 norm.
    pub max_norm: f64,
}

impl Default for GradientNormClippingConfig {
    fn default() -> Self {
        GradientNormClippingConfig {
            group: None,
            max_norm: 1.0,
        }
    }
}

#[typetag::serde(name = "gradient_norm_clipping")]
impl StabilizerConfig for GradientNormClippingConfig {
    fn build(&self) -> Result<Box<dyn Stabilizer>> {
        require_positive("stabilizers.gradient_norm_clipping.max_norm", self.max_norm)?;
        require_group_name("stabilizers.gradient_norm_clipping.group", self.group.as_deref())?;
        Ok(Box::new(GradientNormClipping {
            name: scoped_name("gradient_norm_clipping", self.group.as_deref()),
            config: self.clone(),
            norms: BTreeMap::new(),
        }))
    }
}

/// See [`GradientNormClippingConfig`].
#[derive(Clone, Debug)]
pub struct GradientNormClipping {
    name: String,
    config: GradientNormClippingConfig,
    /// The norm before clipping of each group updated in the current step.
    norms: BTreeMap<String, f64>,
}

impl Stabilizer for GradientNormClipping {
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self, model: &dyn Model) -> Result<()> {
        match &self.config.group {
            Some(g) => check_group(model, g, "stabilizers.gradient_norm_clipping.group"),
            None => Ok(()),
        }
    }

    fn conflicts_with(&self, other: &dyn Stabilizer) -> Option<String> {
        conflict("gradient_norm_clipping", self.config.group.as_deref(), other)
    }

    fn edit_gradients(
        &mut self,
        group: &str,
        params: &[(String, &mut Param)],
        grads: &mut Grads,
        _ctx: &mut HookContext<'_>,
    ) -> Result<()> {
        if self.config.group.as_deref().is_some_and(|g| g != group) {
            return Ok(());
        }
        let trainable = || params.iter().filter(|(_, p)| p.trainable());
        let mut sum = 0.0f64;
        for (_, p) in trainable() {
            let g = grad_to_vec(grads, p)?;
            sum += g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
        }
        let total_norm = sum.sqrt();
        self.norms.insert(group.to_string(), total_norm);
        // torch.nn.utils.clip_grad_norm_: clip_coef = max_norm / (total_norm + 1e-6), applied only
        // if clip_coef < 1.
        let clip_coef = self.config.max_norm / (total_norm + 1e-6);
        if clip_coef < 1.0 {
            let coef = clip_coef as f32;
            for (_, p) in trainable() {
                let scaled: Vec<f32> = grad_to_vec(grads, p)?.iter().map(|x| x * coef).collect();
                set_grad(grads, p, &scaled)?;
            }
        }
        Ok(())
    }

    fn end_step(&mut self, report: &mut StepReport, _ctx: &mut HookContext<'_>) -> Result<()> {
        for (group, norm) in std::mem::take(&mut self.norms) {
            report.diagnostic(format!("grad_norm_unclipped/{group}"), norm);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nash_core::model::group_params;
    use nash_core::rand::SeedableRng;
    use nash_core::stabilizer::StabilizerStack;
    use nash_core::tensor::{Device, Parameterized, Rng};

    use crate::testutil::TwoGroups;

    fn after_update(s: &mut dyn Stabilizer, model: &mut TwoGroups, group: &str, device: &Device) {
        let mut rng = Rng::seed_from_u64(0);
        let mut ctx = HookContext {
            step: 0,
            device,
            rng: &mut rng,
        };
        let mut params = group_params(model.named_params_mut(), group);
        s.after_update(group, &mut params, &mut ctx).unwrap();
    }

    #[test]
    fn weight_clipping_clamps_the_groups_weights_and_biases() {
        let device = Device::default();
        let mut model = TwoGroups::new(&device);
        let mut clip = WeightClippingConfig::default().build().unwrap();
        assert_eq!(clip.name(), "weight_clipping@discriminator");
        clip.validate(&model).unwrap();
        // Another group's update leaves everything alone.
        after_update(clip.as_mut(), &mut model, "generator", &device);
        assert_eq!(model.values("generator.0.weight"), vec![0.9, -0.9]);
        after_update(clip.as_mut(), &mut model, "discriminator", &device);
        assert_eq!(
            model.values("discriminator.0.weight"),
            vec![-0.01, 0.005, 0.01, -0.01, 0.01]
        );
        assert_eq!(model.values("discriminator.0.bias"), vec![0.01, -0.002]);
        // Not in the default roles, and buffers are never clipped.
        assert_eq!(model.values("discriminator.1.scale"), vec![1.0, -0.7]);
        assert_eq!(model.values("discriminator.1.running_var"), vec![2.0, 3.0]);
        let mut report = StepReport::default();
        let mut rng = Rng::seed_from_u64(0);
        let mut ctx = HookContext {
            step: 0,
            device: &device,
            rng: &mut rng,
        };
        clip.end_step(&mut report, &mut ctx).unwrap();
        // Three of the seven selected entries (-0.5, 0.02, 0.3) were outside [-0.01, 0.01].
        let share = report.diagnostics["weight_clipping/discriminator/clipped_share"];
        assert_eq!(share, 3.0 / 7.0);

        // Only the listed roles, with another bound.
        let mut model = TwoGroups::new(&device);
        let mut scale_only = WeightClippingConfig {
            clip: 0.5,
            roles: vec![ParamRole::Scale],
            ..Default::default()
        }
        .build()
        .unwrap();
        after_update(scale_only.as_mut(), &mut model, "discriminator", &device);
        assert_eq!(model.values("discriminator.1.scale"), vec![0.5, -0.5]);
        assert_eq!(
            model.values("discriminator.0.weight"),
            vec![-0.5, 0.005, 0.02, -0.01, 0.01]
        );
    }

    #[test]
    fn weight_clipping_validates_the_group_and_the_config() {
        let device = Device::default();
        let model = TwoGroups::new(&device);
        let critic = WeightClippingConfig {
            group: "critic".into(),
            ..Default::default()
        };
        let err = critic.build().unwrap().validate(&model).unwrap_err().to_string();
        assert!(
            err.contains("no parameter group `critic`") && err.contains("discriminator, generator"),
            "{err}"
        );
        let embeddings = WeightClippingConfig {
            roles: vec![ParamRole::Embedding],
            ..Default::default()
        };
        let err = embeddings.build().unwrap().validate(&model).unwrap_err().to_string();
        assert!(err.contains("bias, buffer, scale, weight"), "{err}");
        for bad in [
            WeightClippingConfig {
                clip: 0.0,
                ..Default::default()
            },
            WeightClippingConfig {
                roles: vec![ParamRole::Buffer],
                ..Default::default()
            },
            WeightClippingConfig {
                roles: vec![],
                ..Default::default()
            },
        ] {
            assert!(matches!(bad.build(), Err(Error::Config { .. })), "{bad:?}");
        }
    }

    /// Stands for a spectral-norm stabilizer from any plugin.
    struct Named(&'static str);
    impl Stabilizer for Named {
        fn name(&self) -> &str {
            self.0
        }
    }

    #[test]
    fn weight_clipping_conflicts_with_spectral_norm_on_the_same_group() {
        let clip = || WeightClippingConfig::default().build().unwrap();
        let err = StabilizerStack::new(vec![clip(), Box::new(Named("spectral_norm"))])
            .err()
            .unwrap();
        let msg = err.to_string();
        assert!(
            msg.contains("weight_clipping@discriminator") && msg.contains("weight scale"),
            "{msg}"
        );
        // Either order.
        assert!(StabilizerStack::new(vec![Box::new(Named("spectral_norm@discriminator")), clip()]).is_err());
        assert!(StabilizerStack::new(vec![clip(), Box::new(Named("spectral_norm@generator"))]).is_ok());
        let gn = GradientNormClippingConfig::default().build().unwrap();
        assert!(StabilizerStack::new(vec![clip(), gn]).is_ok());
    }

    /// Gradients for the model's `group` parameters, set to `values` in order.
    fn grads_for(model: &TwoGroups, group: &str, values: &[Vec<f32>]) -> Grads {
        let mut grads = Grads::leaky();
        let prefix = format!("{group}.");
        let ps = model
            .params
            .iter()
            .filter(|(n, p)| n.starts_with(&prefix) && p.trainable());
        for ((_, p), v) in ps.zip(values) {
            grads.get_or_alloc_mut(p.value()).unwrap().copy_from_slice(v);
        }
        grads
    }

    fn clip_grads(s: &mut dyn Stabilizer, model: &mut TwoGroups, group: &str, grads: &mut Grads, device: &Device) {
        let mut rng = Rng::seed_from_u64(0);
        let mut ctx = HookContext {
            step: 3,
            device,
            rng: &mut rng,
        };
        let params = group_params(model.named_params_mut(), group);
        s.edit_gradients(group, &params, grads, &mut ctx).unwrap();
    }

    fn grad(model: &TwoGroups, name: &str, grads: &mut Grads) -> Vec<f32> {
        let p = &model.params.iter().find(|(n, _)| n == name).unwrap().1;
        grads.get_or_alloc_mut(p.value()).unwrap().to_vec()
    }

    #[test]
    fn gradient_norm_clipping_matches_torch() {
        let device = Device::default();
        let mut model = TwoGroups::new(&device);
        let g = vec![vec![3.0, 0.0, 4.0, 0.0, 0.0], vec![0.0, 12.0], vec![0.0, 0.0]];
        let mut grads = grads_for(&model, "discriminator", &g);
        let mut s = GradientNormClippingConfig::default().build().unwrap();
        clip_grads(s.as_mut(), &mut model, "discriminator", &mut grads, &device);
        // import torch
        // w = torch.zeros(5, requires_grad=True); b = torch.zeros(2, requires_grad=True)
        // s = torch.zeros(2, requires_grad=True)
        // w.grad = torch.tensor([3., 0., 4., 0., 0.]); b.grad = torch.tensor([0., 12.]); s.grad = torch.zeros(2)
        // torch.nn.utils.clip_grad_norm_([w, b, s], max_norm=1.0)  # -> tensor(13.)
        // w.grad  # tensor([0.2308, 0.0000, 0.3077, 0.0000, 0.0000])
        // b.grad  # tensor([0.0000, 0.9231])
        // i.e. clip_coef = max_norm / (total_norm + 1e-6) = 1 / 13.000001, applied since < 1.
        let coef = 1.0f64 / (13.0 + 1e-6);
        let w = grad(&model, "discriminator.0.weight", &mut grads);
        let b = grad(&model, "discriminator.0.bias", &mut grads);
        for (got, want) in w.iter().chain(&b).zip([3.0, 0.0, 4.0, 0.0, 0.0, 0.0, 12.0]) {
            assert!((*got as f64 - want * coef).abs() < 1e-7, "{got} vs {}", want * coef);
        }
        assert!((w[0] - 0.230_769_23).abs() < 1e-6 && (b[1] - 0.923_076_9).abs() < 1e-6);
        let new_norm: f64 = w.iter().chain(&b).map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((new_norm - 1.0).abs() < 1e-6 && new_norm < 1.0);
        let mut report = StepReport::default();
        let mut rng = Rng::seed_from_u64(0);
        let mut ctx = HookContext {
            step: 3,
            device: &device,
            rng: &mut rng,
        };
        s.end_step(&mut report, &mut ctx).unwrap();
        assert_eq!(report.diagnostics["grad_norm_unclipped/discriminator"], 13.0);

        // Below the bound nothing changes: clip_coef = 20 / 13.000001 >= 1.
        let mut grads = grads_for(&model, "discriminator", &g);
        let mut loose = GradientNormClippingConfig {
            max_norm: 20.0,
            ..Default::default()
        }
        .build()
        .unwrap();
        clip_grads(loose.as_mut(), &mut model, "discriminator", &mut grads, &device);
        assert_eq!(grad(&model, "discriminator.0.bias", &mut grads), vec![0.0, 12.0]);

        // Bound to one group, another group's gradients pass through.
        let mut gen_only = GradientNormClippingConfig {
            group: Some("generator".into()),
            max_norm: 0.1,
        }
        .build()
        .unwrap();
        assert_eq!(gen_only.name(), "gradient_norm_clipping@generator");
        gen_only.validate(&model).unwrap();
        let mut grads = grads_for(&model, "discriminator", &g);
        clip_grads(gen_only.as_mut(), &mut model, "discriminator", &mut grads, &device);
        assert_eq!(grad(&model, "discriminator.0.bias", &mut grads), vec![0.0, 12.0]);
        let mut grads = grads_for(&model, "generator", &[vec![0.3, -0.4]]);
        clip_grads(gen_only.as_mut(), &mut model, "generator", &mut grads, &device);
        let gw = grad(&model, "generator.0.weight", &mut grads);
        let c = 0.1 / (0.5 + 1e-6);
        assert!(
            (gw[0] as f64 - 0.3 * c).abs() < 1e-7 && (gw[1] as f64 + 0.4 * c).abs() < 1e-7,
            "{gw:?}"
        );
    }

    #[test]
    fn gradient_norm_clipping_refuses_bad_configs() {
        let device = Device::default();
        let model = TwoGroups::new(&device);
        let bad = GradientNormClippingConfig {
            max_norm: -1.0,
            ..Default::default()
        };
        assert!(matches!(bad.build(), Err(Error::Config { path, .. }) if path.ends_with("max_norm")));
        let missing = GradientNormClippingConfig {
            group: Some("critic".into()),
            ..Default::default()
        };
        let err = missing.build().unwrap().validate(&model).unwrap_err().to_string();
        assert!(err.contains("discriminator, generator"), "{err}");
    }

    #[test]
    fn configs_deserialize_through_typetag_and_register() {
        let cfg: Box<dyn StabilizerConfig> =
            nash_core::serde_json::from_str(r#"{"type": "weight_clipping", "clip": 0.05, "roles": ["weight"]}"#)
                .unwrap();
        assert_eq!(cfg.build().unwrap().name(), "weight_clipping@discriminator");
        let err =
            nash_core::serde_json::from_str::<Box<dyn StabilizerConfig>>(r#"{"type": "weight_clipping", "clipp": 1}"#)
                .unwrap_err();
        assert!(err.to_string().contains("clipp"), "{err}");
        let mut registry = nash_core::registry::Registry::new();
        crate::register(&mut registry).unwrap();
        let info = registry
            .find(nash_core::registry::Kind::Stabilizer, "weight_clipping")
            .unwrap();
        assert!(info.fields.iter().any(|f| f.name == "clip"));
    }
}
