use super::*;
use ndarray::Array2;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

// rand_chacha's ChaCha8 (the host's data generator), not the kit's SplitMix64:
// the fit and chance thresholds below were set on these draws.
fn uniform(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| r.random_range(-scale..scale)).collect()
}

/// `per_class` points per class around `classes` axis-aligned centres at
/// distance `sep`, plus uniform noise of half-width `noise`.
fn clusters(
    classes: usize,
    dim: usize,
    per_class: usize,
    sep: f32,
    noise: f32,
    seed: u64,
) -> (Array2<f32>, Vec<u32>) {
    let n = classes * per_class;
    let mut x = rows(uniform(n * dim, seed, noise), dim);
    let y: Vec<u32> = (0..n).map(|i| (i % classes) as u32).collect();
    for (mut row, &l) in x.rows_mut().into_iter().zip(&y) {
        row[l as usize % dim] += sep;
    }
    (x, y)
}

/// `values` as rows of `dim`.
fn rows(values: Vec<f32>, dim: usize) -> Array2<f32> {
    Array2::from_shape_vec((values.len() / dim, dim), values).unwrap()
}

fn objective(x: &Array2<f32>, y: &[u32], c: usize, wd: f32, p: &[f32]) -> (f64, Vec<f32>) {
    let mut g = vec![0.0; p.len()];
    let batch = ProbeBatch::new(x.view(), y, c).unwrap();
    let mut ws = Workspace::for_batch(&batch);
    (loss_grad(&batch, wd, p, &mut g, &mut ws).unwrap(), g)
}

#[test]
fn gradient_matches_finite_differences() {
    let (n, d, c, wd) = (13, 3, 4, 0.3);
    let x = rows(uniform(n * d, 1, 1.5), d);
    let y: Vec<u32> = (0..n).map(|i| (i * 7 % c) as u32).collect();
    let p = uniform(c * (d + 1), 2, 0.8);
    let (f0, g) = objective(&x, &y, c, wd, &p);
    assert!(f0 > 0.0);
    let eps = 1e-2f32;
    for k in 0..p.len() {
        let (mut pp, mut pm) = (p.clone(), p.clone());
        pp[k] += eps;
        pm[k] -= eps;
        let fd = (objective(&x, &y, c, wd, &pp).0 - objective(&x, &y, c, wd, &pm).0)
            / (2.0 * eps as f64);
        assert!(
            (fd - g[k] as f64).abs() < 1e-3,
            "param {k}: analytic {} vs finite difference {fd}",
            g[k]
        );
    }
    // At zero the loss is ln(classes).
    let (f, _) = objective(&x, &y, c, wd, &vec![0.0; p.len()]);
    assert!((f - (c as f64).ln()).abs() < 1e-6, "{f}");
}

#[test]
fn result_does_not_depend_on_thread_count() {
    let (x, y) = clusters(5, 16, 300, 1.0, 1.0, 3);
    let p = uniform(5 * 17, 4, 0.5);
    let run = |threads| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| objective(&x, &y, 5, 1e-3, &p))
    };
    let (a, b) = (run(1), run(3));
    assert_eq!(a.0.to_bits(), b.0.to_bits());
    assert_eq!(a.1, b.1);
}

#[test]
fn separable_clusters_are_classified_and_shuffled_labels_are_not() {
    let (d, c) = (8, 4);
    let (mut tr, trl) = clusters(c, d, 50, 3.0, 1.0, 5);
    let (mut te, tel) = clusters(c, d, 25, 3.0, 1.0, 6);
    for optimizer in [Optimizer::Lbfgs, Optimizer::Sgd] {
        let cfg = ProbeConfig {
            optimizer,
            ..ProbeConfig::default()
        };
        let (mut a, mut b) = (tr.clone(), te.clone());
        let r = evaluate(a.view_mut(), &trl, b.view_mut(), &tel, c, &cfg).unwrap();
        assert_eq!((r.train_top1, r.top1), (1.0, 1.0), "{optimizer:?}: {r:?}");
        assert!(r.fit.loss < 0.1, "{optimizer:?}: {r:?}");
    }
    // Labels that carry no information: not even the training set is fitted
    // and the test set is near chance (0.25).
    let mut r = ChaCha8Rng::seed_from_u64(7);
    let shuffled: Vec<u32> = trl.iter().map(|_| r.random_range(0..c as u32)).collect();
    let test_shuffled: Vec<u32> = tel.iter().map(|_| r.random_range(0..c as u32)).collect();
    let rep = evaluate(
        tr.view_mut(),
        &shuffled,
        te.view_mut(),
        &test_shuffled,
        c,
        &ProbeConfig::default(),
    )
    .unwrap();
    assert!(rep.train_top1 < 0.8, "{rep:?}");
    assert!(rep.top1 < 0.45, "{rep:?}");
}

/// Two classes, one feature: at x = +1 three samples of class 1 and one of
/// class 0, mirrored at x = -1. With `delta = w1 - w0` (and, by symmetry,
/// `w0 = -w1`, `b1 = b0`) the objective is
/// `(3 softplus(-delta) + softplus(delta)) / 4 + wd delta^2 / 4`, whose
/// minimiser solves `(sigma(delta) - 3 sigma(-delta)) / 4 + wd delta / 2 = 0`
/// (`delta = ln 3` without decay).
#[test]
fn two_class_optimum_matches_closed_form() {
    let x = rows(vec![1.0f32, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0], 1);
    let y = [1u32, 1, 1, 0, 0, 0, 0, 1];
    let sigma = |t: f64| 1.0 / (1.0 + (-t).exp());
    for wd in [0.0f32, 0.1, 1.0] {
        let deriv = |t: f64| (sigma(t) - 3.0 * sigma(-t)) / 4.0 + wd as f64 * t / 2.0;
        let (mut lo, mut hi) = (0.0f64, 3f64.ln());
        for _ in 0..100 {
            let mid = 0.5 * (lo + hi);
            if deriv(mid) < 0.0 {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let delta = 0.5 * (lo + hi);
        let cfg = ProbeConfig {
            weight_decay: wd,
            ..ProbeConfig::default()
        };
        let f = fit(x.view(), &y, 2, &cfg).unwrap();
        let p = &f.probe.params; // [w0, w1, b0, b1]
        let got = (p[1] - p[0]) as f64;
        assert!((got - delta).abs() < 1e-4, "wd {wd}: {got} vs {delta}");
        assert!(
            (p[0] + p[1]).abs() < 1e-4 && (p[3] - p[2]).abs() < 1e-4,
            "{p:?}"
        );
        let expected = (3.0 * (1.0 + (-delta).exp()).ln() + (1.0 + delta.exp()).ln()) / 4.0
            + wd as f64 * delta * delta / 4.0;
        assert!((f.loss - expected).abs() < 1e-6, "{} vs {expected}", f.loss);
    }
}

#[test]
fn sgd_approaches_the_lbfgs_optimum_and_fits_are_deterministic() {
    let (d, c) = (6, 3);
    let (x, y) = clusters(c, d, 100, 1.0, 1.5, 8);
    let lb = ProbeConfig {
        weight_decay: 1e-2,
        epochs: 200,
        ..ProbeConfig::default()
    };
    let sg = ProbeConfig {
        optimizer: Optimizer::Sgd,
        epochs: 60,
        batch: 32,
        ..lb.clone()
    };
    let a = fit(x.view(), &y, c, &lb).unwrap();
    let b = fit(x.view(), &y, c, &sg).unwrap();
    assert!(a.loss < (c as f64).ln() - 0.3, "{a:?}");
    assert!(
        b.loss >= a.loss - 1e-6,
        "SGD below the optimum? {b:?} {a:?}"
    );
    assert!(
        b.loss - a.loss < 2e-3,
        "SGD {} vs L-BFGS {}",
        b.loss,
        a.loss
    );
    assert_eq!(fit(x.view(), &y, c, &lb).unwrap(), a);
    assert_eq!(fit(x.view(), &y, c, &sg).unwrap(), b);
    // Another seed shuffles differently.
    let other = fit(x.view(), &y, c, &ProbeConfig { seed: 1, ..sg }).unwrap();
    assert_ne!(other.probe.params, b.probe.params);
}

#[test]
fn bad_inputs_are_errors() {
    let x = Array2::<f32>::zeros((2, 2));
    let msg = |r: Result<ProbeFit, SereError>| r.unwrap_err().to_string();
    let default = ProbeConfig::default();
    assert!(msg(fit(x.view(), &[0, 5], 3, &default)).contains("label 5"));
    let empty = Array2::<f32>::zeros((0, 2));
    assert!(msg(fit(empty.view(), &[], 3, &default)).contains("no samples"));
    assert!(msg(fit(x.view(), &[0, 1, 2], 3, &default)).contains("2 rows of 2 for 3 labels"));
    let cfg = ProbeConfig {
        weight_decay: -1.0,
        ..ProbeConfig::default()
    };
    assert!(msg(fit(x.view(), &[0, 1], 3, &cfg)).contains("weight-decay"));
    let mut nan = x.clone();
    nan[[0, 0]] = f32::NAN;
    assert!(msg(fit(nan.view(), &[0, 1], 3, &default)).contains("non-finite"));
    // Test features of another width than the training ones.
    let (mut a, mut b) = (x.clone(), Array2::<f32>::ones((1, 3)));
    let e = evaluate(a.view_mut(), &[0, 1], b.view_mut(), &[0], 3, &default).unwrap_err();
    assert!(e.to_string().contains("2 columns, test features 3"), "{e}");
}

/// A fit and its scores on a column-major copy of the features are those
/// of the row-major features, bit for bit.
#[test]
fn any_memory_layout_fits_and_scores_the_same() {
    let (x, y) = clusters(3, 5, 20, 1.0, 1.5, 9);
    let mut t = Array2::zeros((5, 60));
    t.assign(&x.t());
    let cfg = ProbeConfig::default();
    let (a, b) = (
        fit(x.view(), &y, 3, &cfg).unwrap(),
        fit(t.t(), &y, 3, &cfg).unwrap(),
    );
    assert_eq!(a, b);
    let acc = a.probe.accuracy(x.view(), &y).unwrap();
    assert_eq!(b.probe.accuracy(t.t(), &y).unwrap(), acc);
    let (mean, inv_std) = column_stats(x.view());
    let (mut s1, mut s2) = (x.clone(), t.clone());
    standardize(s1.view_mut(), mean.view(), inv_std.view()).unwrap();
    standardize(s2.view_mut().reversed_axes(), mean.view(), inv_std.view()).unwrap();
    assert_eq!(s1, s2.t());
}
