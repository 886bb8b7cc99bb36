//! What every stabilizer of this catalog shares: how its name says which parameter group it acts
//! on, and which techniques cannot act on the same group.
//!
//! The [`Stabilizer`] trait lets one stabilizer see another only through its name, so names carry
//! the scope: `kind@group` for a stabilizer bound to one parameter group
//! (`weight_clipping@discriminator`), plain `kind` for one that acts on every group. A name without
//! `@` from another plugin (say `spectral_norm`) is taken to act on every group, so conflicts with
//! it are reported rather than missed.

use nash_core::error::{Error, Result};
use nash_core::model::Model;
use nash_core::stabilizer::Stabilizer;

/// Pairs of stabilizer kinds that cannot act on the same parameter group, with the reason.
/// Symmetric: the order within a pair does not matter.
pub const CONFLICTS: &[(&str, &str, &str)] = &[
    (
        "weight_clipping",
        "spectral_norm",
        "both constrain the critic's Lipschitz constant through the scale of its weights: spectral \
         normalization divides each weight by its largest singular value while weight clipping bounds \
         every entry to [-clip, clip], so each undoes the other and they fight over the weight scale; use one",
    ),
    (
        "spectral_norm",
        "spectral_norm",
        "two spectral normalizations of the same group would divide a weight twice and each would undo the \
         other's raw-weight bookkeeping; use one pattern that selects every layer to normalize",
    ),
    (
        "weight_clipping",
        "wgan_gp",
        "weight clipping bounds the critic's gradient norm by the clip value, so the gradient penalty's \
         target norm may be unreachable and the two fight; WGAN-GP replaces clipping, use one",
    ),
    (
        "diff_augment",
        "ada",
        "both augment every discriminator input: stacked, each image is augmented twice and ADA's \
         probability no longer controls the augmentation strength; use one",
    ),
    (
        "ema",
        "ema",
        "two EMAs of the same group would both supply evaluation weights and only the last one's would be \
         used; keep one",
    ),
];

/// The name of a stabilizer of `kind` acting on `group` (`None`: every group).
pub fn scoped_name(kind: &str, group: Option<&str>) -> String {
    match group {
        Some(g) => format!("{kind}@{g}"),
        None => kind.to_string(),
    }
}

/// Splits a stabilizer name into its kind and group (`None`: every group).
pub fn parse_name(name: &str) -> (&str, Option<&str>) {
    match name.split_once('@') {
        Some((kind, group)) => (kind, Some(group)),
        None => (name, None),
    }
}

/// Why a stabilizer of `kind` acting on `group` (`None`: every group) cannot be combined with
/// `other`, if the pair is listed in [`CONFLICTS`] and their groups overlap.
pub fn conflict(kind: &str, group: Option<&str>, other: &dyn Stabilizer) -> Option<String> {
    let (other_kind, other_group) = parse_name(other.name());
    let overlap = match (group, other_group) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    };
    if !overlap {
        return None;
    }
    CONFLICTS
        .iter()
        .find(|(a, b, _)| (*a == kind && *b == other_kind) || (*b == kind && *a == other_kind))
        .map(|(_, _, why)| {
            let on = match (group, other_group) {
                (Some(g), _) | (None, Some(g)) => format!("the `{g}` group"),
                (None, None) => "every group".to_string(),
            };
            format!("both act on {on}; {why}")
        })
}

/// Errors unless `model` has the parameter group `group`, listing the groups it has.
pub fn check_group(model: &dyn Model, group: &str, path: &str) -> Result<()> {
    let groups = model.param_groups();
    if groups.iter().any(|g| g == group) {
        Ok(())
    } else {
        Err(Error::config(
            path,
            format!(
                "the `{}` model has no parameter group `{group}`; its groups are: {}",
                model.family(),
                if groups.is_empty() {
                    "(none)".to_string()
                } else {
                    groups.join(", ")
                }
            ),
        ))
    }
}

/// Errors at `path` unless `value` is a finite number > 0.
pub fn require_positive<T: Into<f64> + std::fmt::Display + Copy>(path: &str, value: T) -> Result<()> {
    let v: f64 = value.into();
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(Error::config(path, format!("must be a finite number > 0, got {value}")))
    }
}

/// Errors at `path` if an optional group name is given but empty.
pub fn require_group_name(path: &str, group: Option<&str>) -> Result<()> {
    if group == Some("") {
        Err(Error::config(
            path,
            "must name a parameter group, or be left out for every group",
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Named(&'static str);
    impl Stabilizer for Named {
        fn name(&self) -> &str {
            self.0
        }
    }

    #[test]
    fn names_carry_the_group_and_conflicts_need_overlap() {
        assert_eq!(
            scoped_name("weight_clipping", Some("discriminator")),
            "weight_clipping@discriminator"
        );
        assert_eq!(
            parse_name("spectral_norm@generator"),
            ("spectral_norm", Some("generator"))
        );
        assert_eq!(parse_name("spectral_norm"), ("spectral_norm", None));
        let d = Some("discriminator");
        let why = conflict("weight_clipping", d, &Named("spectral_norm")).unwrap();
        assert!(why.contains("`discriminator` group") && why.contains("fight"), "{why}");
        assert!(conflict("weight_clipping", d, &Named("spectral_norm@discriminator")).is_some());
        assert!(conflict("weight_clipping", d, &Named("spectral_norm@generator")).is_none());
        assert!(conflict("weight_clipping", d, &Named("gradient_norm_clipping")).is_none());
        // Symmetric.
        assert!(conflict("spectral_norm", None, &Named("weight_clipping@discriminator")).is_some());
    }

    #[test]
    fn every_conflict_names_a_registered_stabilizer() {
        let mut registry = nash_core::registry::Registry::new();
        crate::register(&mut registry).unwrap();
        let tags = registry.tags(nash_core::registry::Kind::Stabilizer);
        for (a, b, why) in CONFLICTS {
            assert!(
                tags.contains(a) && tags.contains(b),
                "{a} / {b} not both registered: {tags:?}"
            );
            assert!(why.contains("use one") || why.contains("keep one") || why.contains("use one pattern"));
        }
    }
}
