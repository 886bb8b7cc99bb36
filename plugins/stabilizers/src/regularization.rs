//! Penalties on the size of the weights: `l2_regularization` (through the gradients) and
//! `weight_decay` (decoupled, after each update).

use std::collections::BTreeMap;

use nash_core::error::{Error, Result};
use nash_core::model::{Model, StepReport};
use nash_core::registry::Registry;
use nash_core::stabilizer::{HookContext, Stabilizer, StabilizerConfig};
use nash_core::tensor::{grad_to_vec, set_grad, Grads, Param, ParamRole};
use serde::{Deserialize, Serialize};

use crate::scope::{check_group, require_group_name, require_positive, scoped_name};

/// Registers this module's types.
pub fn register(registry: &mut Registry) -> nash_core::Result<()> {
    registry.stabilizer::<L2RegularizationConfig>(
        "L2 regularization: add lambda * w to the gradients of a group's weights (the gradient of lambda/2 |w|^2)",
    )?;
    registry.stabilizer::<WeightDecayConfig>(
        "decoupled weight decay (AdamW-style): multiply a group's weights by (1 - rate) after each update",
    )?;
    Ok(())
}

/// Checks a `group` / `roles` selection: the group (if set) exists, the roles are trainable ones,
/// and at least one trainable parameter of the group has one of them.
fn check_selection(model: &dyn Model, kind: &str, group: Option<&str>, roles: &[ParamRole]) -> Result<()> {
    if let Some(g) = group {
        check_group(model, g, &format!("stabilizers.{kind}.group"))?;
    }
    let prefix = group.map(|g| format!("{g}."));
    let in_scope: Vec<(String, &Param)> = model
        .named_params()
        .into_iter()
        .filter(|(n, _)| prefix.as_ref().is_none_or(|p| n.starts_with(p)))
        .collect();
    if in_scope.iter().any(|(_, p)| p.trainable() && roles.contains(&p.role)) {
        return Ok(());
    }
    let mut present: Vec<String> = in_scope
        .iter()
        .filter(|(_, p)| p.trainable())
        .map(|(_, p)| format!("{:?}", p.role).to_lowercase())
        .collect();
    present.sort();
    present.dedup();
    Err(Error::config(
        format!("stabilizers.{kind}.roles"),
        format!(
            "no trainable parameter of {} has a role in {roles:?}; the roles there are: {}",
            group.map_or("the model".to_string(), |g| format!("group `{g}`")),
            if present.is_empty() {
                "(no trainable parameters)".to_string()
            } else {
                present.join(", ")
            }
        ),
    ))
}

/// Checks the config fields every regularizer here shares.
fn check_config(kind: &str, group: Option<&str>, roles: &[ParamRole]) -> Result<()> {
    require_group_name(&format!("stabilizers.{kind}.group"), group)?;
    if roles.is_empty() {
        return Err(Error::config(
            format!("stabilizers.{kind}.roles"),
            "must list at least one role (weight, bias, scale, shift, embedding)",
        ));
    }
    if roles.contains(&ParamRole::Buffer) {
        return Err(Error::config(
            format!("stabilizers.{kind}.roles"),
            "`buffer` entries are not trained; use weight, bias, scale, shift or embedding",
        ));
    }
    Ok(())
}

fn default_roles() -> Vec<ParamRole> {
    vec![ParamRole::Weight]
}

/// L2 regularization: before each optimizer update of `group` (every group when unset), adds
/// `lambda * w` to the gradient of every trainable parameter `w` whose role is in `roles` (weights
/// by default), the exact gradient of the penalty `(lambda / 2) * |w|^2`. With Adam the term is
/// rescaled like the rest of the gradient (unlike [`WeightDecayConfig`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct L2RegularizationConfig {
    /// The parameter group; every group when unset.
    pub group: Option<String>,
    /// The coefficient λ.
    pub lambda: f32,
    /// The parameter roles penalized (`weight`, `bias`, `scale`, `shift`, `embedding`).
    pub roles: Vec<ParamRole>,
}

impl Default for L2RegularizationConfig {
    fn default() -> Self {
        L2RegularizationConfig {
            group: None,
            lambda: 1e-4,
            roles: default_roles(),
        }
    }
}

#[typetag::serde(name = "l2_regularization")]
impl StabilizerConfig for L2RegularizationConfig {
    fn build(&self) -> Result<Box<dyn Stabilizer>> {
        require_positive("stabilizers.l2_regularization.lambda", self.lambda)?;
        check_config("l2_regularization", self.group.as_deref(), &self.roles)?;
        Ok(Box::new(L2Regularization {
            name: scoped_name("l2_regularization", self.group.as_deref()),
            config: self.clone(),
            penalties: BTreeMap::new(),
        }))
    }
}

/// See [`L2RegularizationConfig`].
#[derive(Clone, Debug)]
pub struct L2Regularization {
    name: String,
    config: L2RegularizationConfig,
    /// `(lambda / 2) * |w|^2` of each group at its last update in this step.
    penalties: BTreeMap<String, f64>,
}

impl Stabilizer for L2Regularization {
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self, model: &dyn Model) -> Result<()> {
        check_selection(
            model,
            "l2_regularization",
            self.config.group.as_deref(),
            &self.config.roles,
        )
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
        let lambda = self.config.lambda;
        let mut penalty = 0.0f64;
        for (_, p) in params {
            if !(p.trainable() && self.config.roles.contains(&p.role)) {
                continue;
            }
            let w = p.to_vec();
            penalty += w.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
            let g: Vec<f32> = grad_to_vec(grads, p)?
                .iter()
                .zip(&w)
                .map(|(g, w)| g + lambda * w)
                .collect();
            set_grad(grads, p, &g)?;
        }
        self.penalties.insert(group.to_string(), 0.5 * lambda as f64 * penalty);
        Ok(())
    }

    fn end_step(&mut self, report: &mut StepReport, _ctx: &mut HookContext<'_>) -> Result<()> {
        for (group, penalty) in std::mem::take(&mut self.penalties) {
            report.diagnostic(format!("l2_regularization/{group}/penalty"), penalty);
        }
        Ok(())
    }
}

/// Decoupled weight decay (Loshchilov & Hutter 2019, "Decoupled weight decay regularization",
/// the AdamW form): after each optimizer update of `group` (every group when unset), multiplies
/// every trainable parameter whose role is in `roles` (weights by default) by `1 - rate`. `rate`
/// is the per-step decay, i.e. AdamW's `lr * weight_decay`; it does not follow the learning rate's
/// schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WeightDecayConfig {
    /// The parameter group; every group when unset.
    pub group: Option<String>,
    /// The per-update decay, in (0, 1).
    pub rate: f32,
    /// The parameter roles decayed (`weight`, `bias`, `scale`, `shift`, `embedding`).
    pub roles: Vec<ParamRole>,
}

impl Default for WeightDecayConfig {
    fn default() -> Self {
        WeightDecayConfig {
            group: None,
            rate: 1e-5,
            roles: default_roles(),
        }
    }
}

#[typetag::serde(name = "weight_decay")]
impl StabilizerConfig for WeightDecayConfig {
    fn build(&self) -> Result<Box<dyn Stabilizer>> {
        if !(self.rate.is_finite() && self.rate > 0.0 && self.rate < 1.0) {
            return Err(Error::config(
                "stabilizers.weight_decay.rate",
                format!(
                    "must be a number in (0, 1) (the per-update decay, e.g. 1e-5), got {}",
                    self.rate
                ),
            ));
        }
        check_config("weight_decay", self.group.as_deref(), &self.roles)?;
        Ok(Box::new(WeightDecay {
            name: scoped_name("weight_decay", self.group.as_deref()),
            config: self.clone(),
        }))
    }
}

/// See [`WeightDecayConfig`].
#[derive(Clone, Debug)]
pub struct WeightDecay {
    name: String,
    config: WeightDecayConfig,
}

impl Stabilizer for WeightDecay {
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self, model: &dyn Model) -> Result<()> {
        check_selection(model, "weight_decay", self.config.group.as_deref(), &self.config.roles)
    }

    fn after_update(
        &mut self,
        group: &str,
        params: &mut [(String, &mut Param)],
        _ctx: &mut HookContext<'_>,
    ) -> Result<()> {
        if self.config.group.as_deref().is_some_and(|g| g != group) {
            return Ok(());
        }
        let keep = 1.0 - self.config.rate;
        for (_, p) in params.iter_mut() {
            if p.trainable() && self.config.roles.contains(&p.role) {
                let w: Vec<f32> = p.to_vec().iter().map(|w| w * keep).collect();
                p.set(&w)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nash_core::model::group_params;
    use nash_core::rand::SeedableRng;
    use nash_core::tensor::{Device, Parameterized, Rng};

    use crate::testutil::TwoGroups;

    fn ctx<'a>(device: &'a Device, rng: &'a mut Rng) -> HookContext<'a> {
        HookContext { step: 0, device, rng }
    }

    /// Gradients of `group`'s trainable parameters, all set to `value`, then edited by `s`; returns
    /// the edited gradient of each trainable parameter of the group by name.
    fn edited(s: &mut dyn Stabilizer, model: &mut TwoGroups, group: &str, value: f32) -> Vec<(String, Vec<f32>)> {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        let mut grads = Grads::leaky();
        let params = group_params(model.named_params_mut(), group);
        for (_, p) in params.iter().filter(|(_, p)| p.trainable()) {
            set_grad(&mut grads, p, &vec![value; p.numel()]).unwrap();
        }
        s.edit_gradients(group, &params, &mut grads, &mut ctx(&device, &mut rng))
            .unwrap();
        params
            .iter()
            .filter(|(_, p)| p.trainable())
            .map(|(n, p)| (n.clone(), grad_to_vec(&mut grads, p).unwrap()))
            .collect()
    }

    #[test]
    fn l2_adds_exactly_lambda_w_to_the_selected_gradients() {
        let device = Device::default();
        let mut model = TwoGroups::new(&device);
        let mut s = L2RegularizationConfig {
            group: Some("discriminator".into()),
            lambda: 0.5,
            roles: vec![ParamRole::Weight, ParamRole::Scale],
        }
        .build()
        .unwrap();
        assert_eq!(s.name(), "l2_regularization@discriminator");
        s.validate(&model).unwrap();
        let g = edited(s.as_mut(), &mut model, "discriminator", 1.0);
        // 1 + 0.5 * w for weights and scales; biases unchanged.
        let want = |w: &[f32]| w.iter().map(|w| 1.0 + 0.5 * w).collect::<Vec<f32>>();
        assert_eq!(
            g[0],
            ("discriminator.0.weight".into(), want(&[-0.5, 0.005, 0.02, -0.01, 0.01]))
        );
        assert_eq!(g[1], ("discriminator.0.bias".into(), vec![1.0, 1.0]));
        assert_eq!(g[2], ("discriminator.1.scale".into(), want(&[1.0, -0.7])));
        let mut rng = Rng::seed_from_u64(0);
        let mut report = StepReport::default();
        s.end_step(&mut report, &mut ctx(&device, &mut rng)).unwrap();
        // (0.5 / 2) * (0.25 + 0.000025 + 0.0004 + 0.0001 + 0.0001 + 1 + 0.49)
        let want = 0.25 * 1.740_625;
        let got = report.diagnostics["l2_regularization/discriminator/penalty"];
        assert!((got - want).abs() < 1e-7, "{got}");
        // Another group passes through.
        assert_eq!(edited(s.as_mut(), &mut model, "generator", 1.0)[0].1, vec![1.0, 1.0]);
        // Unbound: every group, weights only by default.
        let mut all = L2RegularizationConfig {
            lambda: 0.1,
            ..Default::default()
        }
        .build()
        .unwrap();
        assert_eq!(all.name(), "l2_regularization");
        let g = edited(all.as_mut(), &mut model, "generator", 0.0);
        assert_eq!(g[0].1, vec![0.1f32 * 0.9, 0.1f32 * -0.9]);
    }

    #[test]
    fn weight_decay_multiplies_exactly_by_one_minus_rate() {
        let device = Device::default();
        let mut model = TwoGroups::new(&device);
        let mut s = WeightDecayConfig {
            group: Some("discriminator".into()),
            rate: 0.1,
            roles: vec![ParamRole::Weight, ParamRole::Bias],
        }
        .build()
        .unwrap();
        assert_eq!(s.name(), "weight_decay@discriminator");
        s.validate(&model).unwrap();
        let mut rng = Rng::seed_from_u64(0);
        for group in ["discriminator", "generator"] {
            let mut params = group_params(model.named_params_mut(), group);
            s.after_update(group, &mut params, &mut ctx(&device, &mut rng)).unwrap();
        }
        let keep = 1.0f32 - 0.1;
        let times = |w: &[f32]| w.iter().map(|w| w * keep).collect::<Vec<f32>>();
        assert_eq!(
            model.values("discriminator.0.weight"),
            times(&[-0.5, 0.005, 0.02, -0.01, 0.01])
        );
        assert_eq!(model.values("discriminator.0.bias"), times(&[0.3, -0.002]));
        assert_eq!(model.values("discriminator.1.scale"), vec![1.0, -0.7]);
        assert_eq!(model.values("discriminator.1.running_var"), vec![2.0, 3.0]);
        assert_eq!(model.values("generator.0.weight"), vec![0.9, -0.9]);
    }

    #[test]
    fn configs_deserialize_and_refuse_bad_values_with_their_path() {
        let device = Device::default();
        let model = TwoGroups::new(&device);
        let cfg: Box<dyn StabilizerConfig> =
            nash_core::serde_json::from_str(r#"{"type": "l2_regularization", "group": "generator", "lambda": 0.01}"#)
                .unwrap();
        assert_eq!(cfg.build().unwrap().name(), "l2_regularization@generator");
        let cfg: Box<dyn StabilizerConfig> =
            nash_core::serde_json::from_str(r#"{"type": "weight_decay", "rate": 0.001, "roles": ["weight", "bias"]}"#)
                .unwrap();
        assert_eq!(cfg.build().unwrap().name(), "weight_decay");
        assert!(
            nash_core::serde_json::from_str::<Box<dyn StabilizerConfig>>(r#"{"type": "weight_decay", "lr": 1}"#)
                .is_err()
        );
        let path_of = |cfg: &dyn StabilizerConfig| match cfg.build() {
            Err(Error::Config { path, .. }) => path,
            _ => panic!("{cfg:?} accepted"),
        };
        assert_eq!(
            path_of(&L2RegularizationConfig {
                lambda: -1.0,
                ..Default::default()
            }),
            "stabilizers.l2_regularization.lambda"
        );
        assert_eq!(
            path_of(&L2RegularizationConfig {
                roles: vec![ParamRole::Buffer],
                ..Default::default()
            }),
            "stabilizers.l2_regularization.roles"
        );
        assert_eq!(
            path_of(&WeightDecayConfig {
                rate: 1.0,
                ..Default::default()
            }),
            "stabilizers.weight_decay.rate"
        );
        assert_eq!(
            path_of(&WeightDecayConfig {
                group: Some(String::new()),
                ..Default::default()
            }),
            "stabilizers.weight_decay.group"
        );
        let err = WeightDecayConfig {
            group: Some("critic".into()),
            ..Default::default()
        }
        .build()
        .unwrap()
        .validate(&model)
        .unwrap_err()
        .to_string();
        assert!(err.contains("discriminator, generator"), "{err}");
        let err = L2RegularizationConfig {
            group: Some("generator".into()),
            roles: vec![ParamRole::Bias],
            ..Default::default()
        }
        .build()
        .unwrap()
        .validate(&model)
        .unwrap_err()
        .to_string();
        assert!(err.contains("roles there are: weight"), "{err}");
    }
}
