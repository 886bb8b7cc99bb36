//! What the stabilizers' unit tests share: a small two-group model.

use std::collections::BTreeMap;

use nash_core::data::Batch;
use nash_core::error::{Error, Result};
use nash_core::model::{EvalContext, Model, StepReport, TrainContext};
use nash_core::tensor::{Device, Param, ParamRole, Parameterized};

/// A model with a `discriminator` group (a weight, a bias, a normalization scale and a buffer)
/// and a `generator` group (one weight).
pub struct TwoGroups {
    /// Name and parameter, in order.
    pub params: Vec<(String, Param)>,
    /// Whether it says it can re-estimate the generator's running statistics
    /// ([`Model::reestimates_statistics`]); false unless a test sets it.
    pub reestimates_generator_statistics: bool,
}

impl TwoGroups {
    /// The parameters listed above.
    pub fn new(device: &Device) -> Self {
        let p = |v: Vec<f32>, role| Param::from_vec(device, v.clone(), vec![v.len()], role).unwrap();
        TwoGroups {
            params: vec![
                (
                    "discriminator.0.weight".into(),
                    p(vec![-0.5, 0.005, 0.02, -0.01, 0.01], ParamRole::Weight),
                ),
                ("discriminator.0.bias".into(), p(vec![0.3, -0.002], ParamRole::Bias)),
                ("discriminator.1.scale".into(), p(vec![1.0, -0.7], ParamRole::Scale)),
                (
                    "discriminator.1.running_var".into(),
                    p(vec![2.0, 3.0], ParamRole::Buffer),
                ),
                ("generator.0.weight".into(), p(vec![0.9, -0.9], ParamRole::Weight)),
            ],
            reestimates_generator_statistics: false,
        }
    }
    /// The values of parameter `name`.
    pub fn values(&self, name: &str) -> Vec<f32> {
        self.params.iter().find(|(n, _)| n == name).unwrap().1.to_vec()
    }
}

impl Parameterized for TwoGroups {
    fn named_params(&self) -> Vec<(String, &Param)> {
        self.params.iter().map(|(n, p)| (n.clone(), p)).collect()
    }
    fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        self.params.iter_mut().map(|(n, p)| (n.clone(), p)).collect()
    }
}

impl Model for TwoGroups {
    fn family(&self) -> &str {
        "two_groups"
    }
    fn describe(&self) -> String {
        "test model".into()
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
    fn reestimates_statistics(&self, group: &str) -> bool {
        self.reestimates_generator_statistics && group == "generator"
    }
}
