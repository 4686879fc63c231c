//! Weighted k-nearest-neighbour classification on frozen features, as DINO
//! evaluates: cosine similarity of L2-normalised features, the `k` most
//! similar training samples vote with weight `exp(sim / T)`, top-1 accuracy.

use crate::backend::cpu::gemm;
use rayon::prelude::*;
use sere_core::linalg::MatRef;

/// L2-normalises each row of `feats` (`rows x dim`) in place.
pub fn l2_normalize_rows(feats: &mut [f32], dim: usize) {
    feats.par_chunks_mut(dim).for_each(|r| {
        let n = r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        r.iter_mut().for_each(|v| *v /= n);
    });
}

/// Checks the k-NN settings: `k >= 1` neighbours, a positive finite
/// temperature (0, a negative or a NaN one would make every vote weight
/// infinite, inverted or NaN).
pub fn check_params(k: usize, temperature: f64) -> Result<(), crate::error::SereError> {
    if k == 0 {
        return Err(crate::error::SereError::Other(
            "--k 0: at least 1 neighbour must vote (20 is DINO's choice)".into(),
        ));
    }
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(crate::error::SereError::Other(format!(
            "--temperature {temperature}: the vote temperature must be a positive number \
             (0.07 is DINO's choice)"
        )));
    }
    Ok(())
}

/// Top-1 accuracy of weighted k-NN: every test feature (rows of `test`,
/// L2-normalised) is classified by the `k` nearest (cosine) rows of `train`.
/// Test rows are processed in chunks so memory stays `chunk x n_train`.
#[allow(clippy::too_many_arguments)]
pub fn weighted_knn_accuracy(
    train: &[f32],
    train_labels: &[u32],
    test: &[f32],
    test_labels: &[u32],
    dim: usize,
    k: usize,
    temperature: f32,
    num_classes: usize,
) -> f32 {
    let (n_train, n_test) = (train_labels.len(), test_labels.len());
    assert_eq!(train.len(), n_train * dim);
    assert_eq!(test.len(), n_test * dim);
    if n_test == 0 || n_train == 0 {
        return 0.0;
    }
    let k = k.clamp(1, n_train);
    const CHUNK: usize = 256;
    let correct: usize = test
        .par_chunks(CHUNK * dim)
        .zip(test_labels.par_chunks(CHUNK))
        .map(|(tf, tl)| {
            let rows = tl.len();
            let mut sim = vec![0.0f32; rows * n_train];
            gemm(
                1.0,
                tf,
                MatRef::row_major(rows, dim),
                train,
                MatRef::row_major(n_train, dim).transposed(),
                0.0,
                &mut sim,
                MatRef::row_major(rows, n_train),
            )
            .expect("knn similarity shapes");
            let mut idx: Vec<usize> = Vec::with_capacity(n_train);
            let mut votes = vec![0.0f32; num_classes];
            let mut correct = 0;
            for (r, &label) in tl.iter().enumerate() {
                let s = &sim[r * n_train..(r + 1) * n_train];
                idx.clear();
                idx.extend(0..n_train);
                idx.select_nth_unstable_by(k - 1, |&a, &b| s[b].total_cmp(&s[a]));
                votes.fill(0.0);
                for &i in &idx[..k] {
                    let c = train_labels[i] as usize;
                    if c < num_classes {
                        votes[c] += (s[i] / temperature).exp();
                    }
                }
                let pred = votes
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(c, _)| c)
                    .unwrap_or(0);
                correct += usize::from(pred == label as usize);
            }
            correct
        })
        .sum();
    correct as f32 / n_test as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separable_clusters_are_classified_and_k_matters() {
        // Two classes along two axes; a test point near axis 0 is class 0.
        let train = [1.0, 0.0, 0.9, 0.1, 0.0, 1.0, 0.1, 0.9];
        let labels = [0, 0, 1, 1];
        let mut test = [0.8f32, 0.2, 0.2, 0.8];
        l2_normalize_rows(&mut test, 2);
        let mut tr = train;
        l2_normalize_rows(&mut tr, 2);
        assert_eq!(
            weighted_knn_accuracy(&tr, &labels, &test, &[0, 1], 2, 2, 0.07, 2),
            1.0
        );
        // Wrong labels give 0: the test can fail.
        assert_eq!(
            weighted_knn_accuracy(&tr, &labels, &test, &[1, 0], 2, 2, 0.07, 2),
            0.0
        );
        // k = 0 votes with one neighbour instead of panicking.
        assert_eq!(
            weighted_knn_accuracy(&tr, &labels, &test, &[0, 1], 2, 0, 0.07, 2),
            1.0
        );
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(check_params(20, 0.07).is_ok());
        assert!(check_params(0, 0.07)
            .unwrap_err()
            .to_string()
            .contains("--k 0"));
        for t in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let e = check_params(20, t).unwrap_err().to_string();
            assert!(e.contains("--temperature") && e.contains("positive"), "{e}");
        }
    }
}
