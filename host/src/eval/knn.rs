//! Weighted k-nearest-neighbour classification on frozen features, as DINO
//! evaluates: cosine similarity of L2-normalised features, the `k` most
//! similar training samples vote with weight `exp(sim / T)`, top-1 and
//! top-5 accuracy, for several `k` at once.

use crate::backend::cpu::gemm;
use crate::error::SereError;
use ndarray::{ArrayView2, ArrayViewMut1, ArrayViewMut2};
use rayon::prelude::*;
use sere_core::linalg::MatRef;

/// L2-normalises each row of `feats` (`rows x dim`) in place; rows are
/// spread over threads when the view is contiguous, and normalised one by
/// one (to the same values) when it is not.
///
/// ```rust
/// use ndarray::array;
/// use sere_host::eval::knn::l2_normalize_rows;
/// let mut f = array![[3.0f32, 4.0], [0.0, 2.0]];
/// l2_normalize_rows(f.view_mut());
/// assert_eq!(f, array![[0.6, 0.8], [0.0, 1.0]]);
/// // A transposed view: its rows are the columns here.
/// let mut t = array![[3.0f32, 0.0], [4.0, 2.0]];
/// l2_normalize_rows(t.view_mut().reversed_axes());
/// assert_eq!(t, array![[0.6, 0.0], [0.8, 1.0]]);
/// ```
pub fn l2_normalize_rows(mut feats: ArrayViewMut2<f32>) {
    let dim = feats.ncols();
    if dim == 0 {
        return;
    }
    match feats.as_slice_mut() {
        Some(flat) => flat
            .par_chunks_mut(dim)
            .for_each(|r| normalize_row(ArrayViewMut1::from(r))),
        None => feats.rows_mut().into_iter().for_each(normalize_row),
    }
}

/// One row divided by its L2 norm (squares summed in column order).
fn normalize_row(mut r: ArrayViewMut1<f32>) {
    let n = r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    r.iter_mut().for_each(|v| *v /= n);
}

/// Checks the k-NN settings: `k >= 1` neighbours, a positive finite
/// temperature (0, a negative or a NaN one would make every vote weight
/// infinite, inverted or NaN).
pub fn check_params(k: usize, temperature: f64) -> Result<(), SereError> {
    if k == 0 {
        return Err(SereError::Other(
            "--k 0: at least 1 neighbour must vote (20 is DINO's choice)".into(),
        ));
    }
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(SereError::Other(format!(
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
///
/// ```rust
/// use ndarray::array;
/// use sere_host::eval::knn::weighted_knn_accuracy;
/// let train = array![[1.0f32, 0.0], [0.0, 1.0]];
/// let test = array![[0.8f32, 0.6]];
/// let top1 = weighted_knn_accuracy(train.view(), &[0, 1], test.view(), &[0], 1, 0.07, 2)?;
/// assert_eq!(top1, 1.0);
/// // Labels that do not match the rows are an error, not a panic.
/// assert!(weighted_knn_accuracy(train.view(), &[0], test.view(), &[0], 1, 0.07, 2).is_err());
/// # Ok::<(), sere_host::error::SereError>(())
/// ```
pub fn weighted_knn_accuracy(
    train: ArrayView2<f32>,
    train_labels: &[u32],
    test: ArrayView2<f32>,
    test_labels: &[u32],
    k: usize,
    temperature: f32,
    num_classes: usize,
) -> Result<f32, SereError> {
    let scores = weighted_knn(
        train,
        train_labels,
        test,
        test_labels,
        &[k],
        temperature,
        num_classes,
    )?;
    Ok(scores[0].top1)
}

/// Checks that `train` and `test` have one label per row and the same width.
fn check_features(
    train: &ArrayView2<f32>,
    train_labels: &[u32],
    test: &ArrayView2<f32>,
    test_labels: &[u32],
) -> Result<(), SereError> {
    let fail = |m: String| Err(SereError::Other(format!("k-NN: {m}")));
    if train.ncols() != test.ncols() {
        return fail(format!(
            "training features have {} columns, test features {}",
            train.ncols(),
            test.ncols()
        ));
    }
    for (what, x, labels) in [
        ("training", train, train_labels),
        ("test", test, test_labels),
    ] {
        if x.nrows() != labels.len() {
            return fail(format!(
                "{} {what} feature rows but {} labels",
                x.nrows(),
                labels.len()
            ));
        }
    }
    Ok(())
}

/// Weighted k-NN for several `ks` at once, as DINO's `eval_knn.py` reports
/// 10, 20, 100 and 200: the similarities are computed once, each test row's
/// `max(ks)` nearest training rows sorted by similarity, and every `k`
/// votes with its prefix (`exp(sim / T)` per neighbour). A `k` of 0 votes
/// with one neighbour, one above the training rows with all of them.
/// Scores come in the order of `ks`. Features of any memory layout are
/// taken (a copy is made of a view that is not in standard order); widths
/// or label counts that do not match are an error.
///
/// ```rust
/// use ndarray::array;
/// use sere_host::eval::knn::weighted_knn;
/// let train = array![[1.0f32, 0.0], [0.0, 1.0], [0.6, 0.8]];
/// let test = array![[0.8f32, 0.6], [0.0, 1.0]];
/// let s = weighted_knn(train.view(), &[0, 1, 1], test.view(), &[0, 1], &[1, 3], 0.07, 2)?;
/// assert_eq!((s[0].k, s[0].top1, s[1].k), (1, 0.5, 3));
/// // Test features of another width are refused.
/// let narrow = array![[1.0f32]];
/// assert!(weighted_knn(train.view(), &[0, 1, 1], narrow.view(), &[0], &[1], 0.07, 2).is_err());
/// # Ok::<(), sere_host::error::SereError>(())
/// ```
pub fn weighted_knn(
    train: ArrayView2<f32>,
    train_labels: &[u32],
    test: ArrayView2<f32>,
    test_labels: &[u32],
    ks: &[usize],
    temperature: f32,
    num_classes: usize,
) -> Result<Vec<KnnScore>, SereError> {
    check_features(&train, train_labels, &test, test_labels)?;
    let (n_train, n_test, dim) = (train.nrows(), test.nrows(), train.ncols());
    if dim == 0 {
        return Err(SereError::Other(
            "k-NN: the features have no columns".into(),
        ));
    }
    if n_test == 0 || n_train == 0 {
        let zero = |&k: &usize| KnnScore {
            k,
            top1: 0.0,
            top5: 0.0,
        };
        return Ok(ks.iter().map(zero).collect());
    }
    let vote = Vote {
        train_labels,
        ks: ks.iter().map(|&k| k.clamp(1, n_train)).collect(),
        temperature,
        num_classes,
    };
    // The GEMM reads rows in place: standard layout (a copy otherwise).
    let (train, test) = (train.as_standard_layout(), test.as_standard_layout());
    let (Some(train), Some(test)) = (train.as_slice(), test.as_slice()) else {
        return Err(SereError::Other("k-NN: features are not contiguous".into()));
    };
    const CHUNK: usize = 256;
    // Per k: (top-1 hits, top-5 hits).
    let hits = test
        .par_chunks(CHUNK * dim)
        .zip(test_labels.par_chunks(CHUNK))
        .map(|(tf, tl)| vote.chunk(train, tf, tl, dim))
        .try_reduce(
            || vec![(0, 0); ks.len()],
            |a, b| {
                Ok(a.iter()
                    .zip(&b)
                    .map(|(x, y)| (x.0 + y.0, x.1 + y.1))
                    .collect())
            },
        )?;
    Ok(ks
        .iter()
        .zip(hits)
        .map(|(&k, (t1, t5))| KnnScore {
            k,
            top1: t1 as f32 / n_test as f32,
            top5: t5 as f32 / n_test as f32,
        })
        .collect())
}

/// The vote of a k-NN evaluation: the training labels and, per `k`
/// (clamped to `1..=n_train`), how many neighbours vote.
struct Vote<'a> {
    train_labels: &'a [u32],
    ks: Vec<usize>,
    temperature: f32,
    num_classes: usize,
}

impl Vote<'_> {
    /// `(top-1 hits, top-5 hits)` per `k` of the test rows `tf` (labels
    /// `tl`) against the `train` rows, all `dim` wide, row-major.
    fn chunk(
        &self,
        train: &[f32],
        tf: &[f32],
        tl: &[u32],
        dim: usize,
    ) -> Result<Vec<(usize, usize)>, SereError> {
        let (rows, n_train) = (tl.len(), self.train_labels.len());
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
        )?;
        let k_max = self.ks.iter().copied().max().unwrap_or(1);
        let mut idx: Vec<usize> = Vec::with_capacity(n_train);
        let mut votes = vec![0.0f32; self.num_classes];
        let mut order: Vec<usize> = (0..self.num_classes).collect();
        let mut hits = vec![(0usize, 0usize); self.ks.len()];
        for (s, &label) in sim.chunks_exact(n_train).zip(tl) {
            idx.clear();
            idx.extend(0..n_train);
            let by_sim = |a: &usize, b: &usize| s[*b].total_cmp(&s[*a]);
            idx.select_nth_unstable_by(k_max - 1, by_sim);
            idx[..k_max].sort_unstable_by(by_sim);
            for (h, &k) in hits.iter_mut().zip(&self.ks) {
                self.tally(s, &idx[..k], &mut votes);
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
        Ok(hits)
    }

    /// Per class, the summed weights `exp(sim / T)` of the `neighbours`
    /// (indices into the similarities `s`), in neighbour order.
    fn tally(&self, s: &[f32], neighbours: &[usize], votes: &mut [f32]) {
        votes.fill(0.0);
        for &i in neighbours {
            let c = self.train_labels[i] as usize;
            if c < self.num_classes {
                votes[c] += (s[i] / self.temperature).exp();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    /// Weighted k-NN of one k on `dim`-wide rows, as the tests call it.
    fn top1(tr: &[f32], l: &[u32], te: &[f32], el: &[u32], dim: usize, k: usize, c: usize) -> f32 {
        let tr = ArrayView2::from_shape((l.len(), dim), tr).unwrap();
        let te = ArrayView2::from_shape((el.len(), dim), te).unwrap();
        weighted_knn_accuracy(tr, l, te, el, k, 0.07, c).unwrap()
    }

    #[test]
    fn separable_clusters_are_classified_and_k_matters() {
        // Two classes along two axes; a test point near axis 0 is class 0.
        let mut tr =
            Array2::from_shape_vec((4, 2), vec![1.0, 0.0, 0.9, 0.1, 0.0, 1.0, 0.1, 0.9]).unwrap();
        let labels = [0, 0, 1, 1];
        let mut test = Array2::from_shape_vec((2, 2), vec![0.8f32, 0.2, 0.2, 0.8]).unwrap();
        l2_normalize_rows(test.view_mut());
        l2_normalize_rows(tr.view_mut());
        let (tr, test) = (tr.as_slice().unwrap(), test.as_slice().unwrap());
        assert_eq!(top1(tr, &labels, test, &[0, 1], 2, 2, 2), 1.0);
        // Wrong labels give 0: the test can fail.
        assert_eq!(top1(tr, &labels, test, &[1, 0], 2, 2, 2), 0.0);
        // k = 0 votes with one neighbour instead of panicking.
        assert_eq!(top1(tr, &labels, test, &[0, 1], 2, 0, 2), 1.0);
    }

    /// Several k at once score as each k alone, and top-5 counts a label
    /// among the five heaviest classes.
    #[test]
    fn several_k_at_once_and_top5() {
        let mut rng = sere_testkit::Lcg::new(7);
        let mut next = || ((rng.next_u64() >> 33) as f32 / (1u64 << 31) as f32) - 0.5;
        let (n_train, n_test, dim, classes) = (300, 57, 8, 10);
        let mut train = Array2::from_shape_simple_fn((n_train, dim), &mut next);
        let mut test = Array2::from_shape_simple_fn((n_test, dim), &mut next);
        l2_normalize_rows(train.view_mut());
        l2_normalize_rows(test.view_mut());
        let (train, test) = (train.view(), test.view());
        let tl: Vec<u32> = (0..n_train).map(|i| (i % classes) as u32).collect();
        let el: Vec<u32> = (0..n_test).map(|i| (i * 7 % classes) as u32).collect();
        let ks = [10, 20, 100, 200, 1000];
        let all = weighted_knn(train, &tl, test, &el, &ks, 0.07, classes).unwrap();
        for (s, &k) in all.iter().zip(&ks) {
            let alone = weighted_knn_accuracy(train, &tl, test, &el, k, 0.07, classes).unwrap();
            assert_eq!((s.k, s.top1), (k, alone));
            assert!(s.top5 >= s.top1 && s.top5 <= 1.0);
        }
        // Random features: top-5 of 10 classes is near one half, top-1 near
        // a tenth.
        assert!(all[2].top5 > 0.3 && all[2].top1 < 0.3, "{all:?}");
        // Two classes: top-5 holds every class, so it is always right.
        let two: Vec<u32> = tl.iter().map(|c| c % 2).collect();
        let e2: Vec<u32> = el.iter().map(|c| c % 2).collect();
        let s = weighted_knn(train, &two, test, &e2, &[20], 0.07, 2).unwrap();
        assert_eq!(s[0].top5, 1.0);
        // A column-major copy of the test rows scores the same.
        let mut t = Array2::zeros((dim, n_test));
        t.assign(&test.t());
        let again = weighted_knn(train, &two, t.t(), &e2, &[20], 0.07, 2).unwrap();
        assert_eq!(again, s);
    }

    /// Mismatched widths, label counts and empty rows are typed errors.
    #[test]
    fn mismatched_shapes_are_errors() {
        let (tr, te) = (Array2::<f32>::eye(3), Array2::<f32>::eye(2));
        let msg = |r: Result<Vec<KnnScore>, SereError>| r.unwrap_err().to_string();
        let e = msg(weighted_knn(
            tr.view(),
            &[0, 1, 2],
            te.view(),
            &[0, 1],
            &[1],
            0.07,
            3,
        ));
        assert!(e.contains("3 columns, test features 2"), "{e}");
        let e = msg(weighted_knn(
            tr.view(),
            &[0, 1],
            tr.view(),
            &[0, 1, 2],
            &[1],
            0.07,
            3,
        ));
        assert!(e.contains("3 training feature rows but 2 labels"), "{e}");
        let empty = Array2::<f32>::zeros((2, 0));
        let e = msg(weighted_knn(
            empty.view(),
            &[0, 1],
            empty.view(),
            &[0, 1],
            &[1],
            0.07,
            2,
        ));
        assert!(e.contains("no columns"), "{e}");
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
