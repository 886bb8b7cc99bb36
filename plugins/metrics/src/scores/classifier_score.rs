//! Classifier score: the Inception-score analogue (Salimans et al. 2016) for any classifier.
//!
//! Rows of `probabilities` are class distributions `p(y|x)`. They are cut into `splits`
//! consecutive parts, part `s` holding rows `s·n/splits .. (s+1)·n/splits` (integer division, as
//! torch-fidelity; the same as the original `openai/improved-gan` code when `splits` divides `n`,
//! which there drops the remainder). In each part, with `p(y)` the part's mean row,
//! `score = exp(mean_x Σ_y p(y|x) (ln p(y|x) - ln p(y)))`, taking `0 ln 0 = 0`. Reported: the mean
//! of the part scores and their population standard deviation (`np.std`, ddof 0, as the original
//! code). No shuffling: callers who want torch-fidelity's shuffled splits permute the rows first.

use nash_core::error::{Error, Result};

use super::Features;

/// How far a row's sum may be from 1 to still count as a distribution (f32 softmax outputs are
/// off by ~1e-7).
const SUM_TOLERANCE: f64 = 1e-4;

/// Classifier score over `splits` consecutive parts of the rows: (mean, population std over
/// parts). Errors on `splits == 0`, more splits than rows, or a row that is not a distribution
/// (a negative entry, or a sum farther than 1e-4 from 1).
pub fn classifier_score(probabilities: &Features, splits: usize) -> Result<(f64, f64)> {
    let n = probabilities.rows();
    if splits == 0 || splits > n {
        return Err(Error::config(
            "splits",
            format!("must be between 1 and the number of samples ({n}), got {splits}"),
        ));
    }
    for i in 0..n {
        let row = probabilities.row(i);
        let sum: f64 = row.iter().sum();
        if row.iter().any(|&p| p < 0.0) || (sum - 1.0).abs() > SUM_TOLERANCE {
            return Err(Error::shape(
                "classifier score",
                "rows that are class distributions (non-negative, summing to 1)",
                format!("row {i} = {row:?} (sum {sum})"),
            ));
        }
    }
    let classes = probabilities.dim();
    let xlogx = |p: f64| if p > 0.0 { p * p.ln() } else { 0.0 };
    let scores: Vec<f64> = (0..splits)
        .map(|s| {
            let (start, end) = (s * n / splits, (s + 1) * n / splits);
            let count = (end - start) as f64;
            let mut marginal = vec![0.0; classes];
            for i in start..end {
                for (m, p) in marginal.iter_mut().zip(probabilities.row(i)) {
                    *m += p;
                }
            }
            for m in &mut marginal {
                *m /= count;
            }
            let mean_kl = (start..end)
                .map(|i| {
                    probabilities
                        .row(i)
                        .iter()
                        .zip(&marginal)
                        .map(|(&p, &m)| if p > 0.0 { xlogx(p) - p * m.ln() } else { 0.0 })
                        .sum::<f64>()
                })
                .sum::<f64>()
                / count;
            mean_kl.exp()
        })
        .collect();
    let mean = scores.iter().sum::<f64>() / splits as f64;
    let var = scores.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / splits as f64;
    Ok((mean, var.sqrt()))
}

/// Row-wise softmax of logits, computed as `exp(z - max z) / Σ exp(z - max z)` (no overflow).
pub fn softmax_rows(logits: &Features) -> Features {
    let dim = logits.dim();
    let mut values = Vec::with_capacity(logits.values().len());
    for i in 0..logits.rows() {
        let row = logits.row(i);
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let start = values.len();
        values.extend(row.iter().map(|&z| (z - max).exp()));
        let sum: f64 = values[start..].iter().sum();
        for v in &mut values[start..] {
            *v /= sum;
        }
    }
    Features::new(logits.rows(), dim, values).expect("softmax of finite logits is a finite distribution")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_predictions_score_one() {
        let p = Features::new(8, 4, vec![0.25; 32]).unwrap();
        let (mean, std) = classifier_score(&p, 2).unwrap();
        assert!((mean - 1.0).abs() < 1e-12 && std < 1e-12, "{mean} ± {std}");
    }

    #[test]
    fn one_hot_predictions_covering_all_classes_score_the_class_count() {
        let classes = 5;
        let n = 20;
        let mut values = vec![0.0; n * classes];
        for i in 0..n {
            values[i * classes + i % classes] = 1.0;
        }
        let p = Features::new(n, classes, values).unwrap();
        for splits in [1, 2, 4] {
            let (mean, std) = classifier_score(&p, splits).unwrap();
            assert!(
                (mean - classes as f64).abs() < 1e-12 && std < 1e-12,
                "{splits}: {mean} ± {std}"
            );
        }
    }

    #[test]
    fn matches_numpy_reference() {
        // import numpy as np
        // p = np.array(P)   # the rows below
        // def score(part):
        //     py = part.mean(0)
        //     return np.exp(np.mean(np.sum(part * (np.log(part) - np.log(py)), axis=1)))
        // s = [score(p[k * 6 // 2:(k + 1) * 6 // 2]) for k in range(2)]
        // print(repr(np.mean(s)), repr(np.std(s)))
        // -> 1.2931224307097062 0.060814180332182444
        let rows = [
            [0.7, 0.2, 0.1],
            [0.1, 0.8, 0.1],
            [0.3, 0.3, 0.4],
            [0.05, 0.05, 0.9],
            [0.6, 0.3, 0.1],
            [0.2, 0.5, 0.3],
        ];
        let p = Features::new(6, 3, rows.concat()).unwrap();
        let (mean, std) = classifier_score(&p, 2).unwrap();
        assert!((mean - 1.2931224307097062).abs() < 1e-12, "{mean}");
        assert!((std - 0.060814180332182444).abs() < 1e-12, "{std}");
    }

    #[test]
    fn errors_on_bad_input() {
        let p = Features::new(2, 2, vec![0.5, 0.5, 0.9, 0.1]).unwrap();
        assert!(classifier_score(&p, 0).is_err());
        assert!(classifier_score(&p, 3).is_err());
        let not_summing = Features::new(2, 2, vec![0.5, 0.4, 0.9, 0.1]).unwrap();
        assert!(classifier_score(&not_summing, 1).is_err());
        let negative = Features::new(1, 2, vec![1.5, -0.5]).unwrap();
        assert!(classifier_score(&negative, 1).is_err());
    }

    #[test]
    fn softmax_is_stable_and_normalized() {
        let logits = Features::new(2, 3, vec![1000.0, 0.0, -1000.0, 1.0, 2.0, 3.0]).unwrap();
        let p = softmax_rows(&logits);
        assert_eq!(p.row(0), &[1.0, 0.0, 0.0]);
        // softmax(1, 2, 3) = e^{-2, -1, 0} / (e^-2 + e^-1 + 1).
        let z = (-2.0f64).exp() + (-1.0f64).exp() + 1.0;
        for (got, want) in p.row(1).iter().zip([(-2.0f64).exp() / z, (-1.0f64).exp() / z, 1.0 / z]) {
            assert!((got - want).abs() < 1e-15);
        }
        let shifted = softmax_rows(&Features::new(1, 3, vec![11.0, 12.0, 13.0]).unwrap());
        for (a, b) in shifted.row(0).iter().zip(p.row(1)) {
            assert!((a - b).abs() < 1e-15);
        }
        assert!(classifier_score(&p, 1).is_ok());
    }
}
