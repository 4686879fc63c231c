//! Weighted k-nearest-neighbour classification on frozen features, as DINO
//! evaluates: cosine similarity of L2-normalised features, the `k` most
//! similar training samples vote with weight `exp(sim / T)`, top-1 and
//! top-5 accuracy, for several `k` at once.

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

/// One `k` of a weighted k-NN evaluation: top-1 and top-5 accuracy (top-5:
/// the label among the five classes with the most vote weight, or among all
/// of them when there are fewer).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KnnScore {
    /// Neighbours that voted.
    pub k: usize,
    /// Top-1 accuracy.
    pub top1: f32,
    /// Top-5 accuracy.
    pub top5: f32,
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
    let scores = weighted_knn(
        train,
        train_labels,
        test,
        test_labels,
        dim,
        &[k],
        temperature,
        num_classes,
    );
    scores[0].top1
}

/// Weighted k-NN for several `ks` at once, as DINO's `eval_knn.py` reports
/// 10, 20, 100 and 200: the similarities are computed once, each test row's
/// `max(ks)` nearest training rows sorted by similarity, and every `k`
/// votes with its prefix (`exp(sim / T)` per neighbour). A `k` of 0 votes
/// with one neighbour, one above the training rows with all of them.
/// Scores come in the order of `ks`.
#[allow(clippy::too_many_arguments)]
pub fn weighted_knn(
    train: &[f32],
    train_labels: &[u32],
    test: &[f32],
    test_labels: &[u32],
    dim: usize,
    ks: &[usize],
    temperature: f32,
    num_classes: usize,
) -> Vec<KnnScore> {
    let (n_train, n_test) = (train_labels.len(), test_labels.len());
    assert_eq!(train.len(), n_train * dim);
    assert_eq!(test.len(), n_test * dim);
    let clamped: Vec<usize> = ks.iter().map(|&k| k.clamp(1, n_train.max(1))).collect();
    if n_test == 0 || n_train == 0 {
        return ks
            .iter()
            .map(|&k| KnnScore {
                k,
                top1: 0.0,
                top5: 0.0,
            })
            .collect();
    }
    let k_max = clamped.iter().copied().max().unwrap_or(1);
    const CHUNK: usize = 256;
    // Per k: (top-1 hits, top-5 hits).
    let hits: Vec<(usize, usize)> = test
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
            let mut order: Vec<usize> = (0..num_classes).collect();
            let mut hits = vec![(0usize, 0usize); clamped.len()];
            for (r, &label) in tl.iter().enumerate() {
                let s = &sim[r * n_train..(r + 1) * n_train];
                idx.clear();
                idx.extend(0..n_train);
                let by_sim = |a: &usize, b: &usize| s[*b].total_cmp(&s[*a]);
                idx.select_nth_unstable_by(k_max - 1, by_sim);
                idx[..k_max].sort_unstable_by(by_sim);
                for (h, &k) in hits.iter_mut().zip(&clamped) {
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
                    h.0 += usize::from(pred == label as usize);
                    order.sort_unstable_by(|&a, &b| votes[b].total_cmp(&votes[a]));
                    h.1 += usize::from(order.iter().take(5).any(|&c| c == label as usize));
                }
            }
            hits
        })
        .reduce(
            || vec![(0, 0); clamped.len()],
            |a, b| {
                a.iter()
                    .zip(&b)
                    .map(|(x, y)| (x.0 + y.0, x.1 + y.1))
                    .collect()
            },
        );
    ks.iter()
        .zip(hits)
        .map(|(&k, (t1, t5))| KnnScore {
            k,
            top1: t1 as f32 / n_test as f32,
            top5: t5 as f32 / n_test as f32,
        })
        .collect()
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

    /// Several k at once score as each k alone, and top-5 counts a label
    /// among the five heaviest classes.
    #[test]
    fn several_k_at_once_and_top5() {
        let mut rng = sere_testkit::Lcg::new(7);
        let mut next = || ((rng.next_u64() >> 33) as f32 / (1u64 << 31) as f32) - 0.5;
        let (n_train, n_test, dim, classes) = (300, 57, 8, 10);
        let mut train: Vec<f32> = (0..n_train * dim).map(|_| next()).collect();
        let mut test: Vec<f32> = (0..n_test * dim).map(|_| next()).collect();
        l2_normalize_rows(&mut train, dim);
        l2_normalize_rows(&mut test, dim);
        let tl: Vec<u32> = (0..n_train).map(|i| (i % classes) as u32).collect();
        let el: Vec<u32> = (0..n_test).map(|i| (i * 7 % classes) as u32).collect();
        let ks = [10, 20, 100, 200, 1000];
        let all = weighted_knn(&train, &tl, &test, &el, dim, &ks, 0.07, classes);
        for (s, &k) in all.iter().zip(&ks) {
            let alone = weighted_knn_accuracy(&train, &tl, &test, &el, dim, k, 0.07, classes);
            assert_eq!((s.k, s.top1), (k, alone));
            assert!(s.top5 >= s.top1 && s.top5 <= 1.0);
        }
        // Random features: top-5 of 10 classes is near one half, top-1 near
        // a tenth.
        assert!(all[2].top5 > 0.3 && all[2].top1 < 0.3, "{all:?}");
        // Two classes: top-5 holds every class, so it is always right.
        let two: Vec<u32> = tl.iter().map(|c| c % 2).collect();
        let e2: Vec<u32> = el.iter().map(|c| c % 2).collect();
        let s = weighted_knn(&train, &two, &test, &e2, dim, &[20], 0.07, 2);
        assert_eq!(s[0].top5, 1.0);
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
