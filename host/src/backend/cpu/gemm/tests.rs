//! The blocked SGEMM against a float64 triple loop, over shapes that cross
//! every block edge (MR, NR, KC, MC of every tile), transposed and strided
//! views, alpha, beta and the bias epilogue, on every path this CPU has
//! (each test names the paths it could not run).

use super::{gemm, gemm_bias, gemm_bias_on, Avx2, Avx512, GemmPath, Tiling, KC};
use proptest::prelude::*;
use sere_core::linalg::MatRef;

/// A view of `rows x cols` at `offset`, row-major or transposed storage,
/// with `pad` unused elements after each stored line.
fn view(rows: usize, cols: usize, transposed: bool, pad: usize, offset: usize) -> MatRef {
    if transposed {
        MatRef {
            offset,
            rows,
            cols,
            row_stride: 1,
            col_stride: rows + pad,
        }
    } else {
        MatRef {
            offset,
            rows,
            cols,
            row_stride: cols + pad,
            col_stride: 1,
        }
    }
}

/// `len` values in [-1, 1): the kit's LCG stream started one step past `seed`.
fn fill(len: usize, seed: u64) -> Vec<f32> {
    let mut lcg = sere_testkit::Lcg::new(seed);
    lcg.next_u64();
    lcg.signeds(len)
}

/// The paths this CPU runs; prints the ones it skips.
fn paths() -> Vec<GemmPath> {
    GemmPath::ALL
        .into_iter()
        .filter(|p| {
            let ok = p.supported();
            if !ok {
                eprintln!(
                    "skipped: GEMM path {}: not supported by this CPU or build",
                    p.name()
                );
            }
            ok
        })
        .collect()
}

// Index loops mirror the maths of the reference on purpose.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
fn check(
    path: GemmPath,
    (m, k, n): (usize, usize, usize),
    (at, bt, ct): (bool, bool, bool),
    pad: usize,
    alpha: f32,
    beta: f32,
    with_bias: bool,
    seed: u64,
) -> std::result::Result<(), TestCaseError> {
    let am = view(m, k, at, pad, 3);
    let bm = view(k, n, bt, pad, 1);
    let cm = view(m, n, ct, pad, 2);
    let a = fill(am.required_len() + 2, seed);
    let b = fill(bm.required_len() + 1, seed + 1);
    let c0 = fill(cm.required_len() + 3, seed + 2);
    let bias = fill(n, seed + 3);
    let mut c = c0.clone();
    let bias_arg = with_bias.then_some(bias.as_slice());
    gemm_bias_on(path, alpha, &a, am, &b, bm, beta, bias_arg, &mut c, cm).unwrap();
    let at_ = |x: &[f32], v: MatRef, i: usize, j: usize| {
        x[v.offset + i * v.row_stride + j * v.col_stride] as f64
    };
    for i in 0..m {
        for j in 0..n {
            let mut dot = 0.0f64;
            let mut mag = 0.0f64;
            for p in 0..k {
                let t = at_(&a, am, i, p) * at_(&b, bm, p, j);
                dot += t;
                mag += t.abs();
            }
            let old = if beta == 0.0 {
                0.0
            } else {
                beta as f64 * at_(&c0, cm, i, j)
            };
            let want = alpha as f64 * dot + old + if with_bias { bias[j] as f64 } else { 0.0 };
            let got = at_(&c, cm, i, j);
            let tol = 1e-5 * (1.0 + alpha.abs() as f64 * mag + old.abs());
            prop_assert!(
                (got - want).abs() <= tol,
                "{}: C[{i}][{j}] = {got}, want {want} (m {m} k {k} n {n})",
                path.name()
            );
        }
    }
    // Elements of C's buffer outside the view are untouched.
    let mut inside = vec![false; c.len()];
    for i in 0..m {
        for j in 0..n {
            inside[cm.offset + i * cm.row_stride + j * cm.col_stride] = true;
        }
    }
    for (idx, (&x, &y)) in c.iter().zip(&c0).enumerate() {
        if !inside[idx] {
            prop_assert_eq!(
                x.to_bits(),
                y.to_bits(),
                "C[{}] outside the view changed",
                idx
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn matches_f64_reference(
        m in 1usize..60, k in 1usize..40, n in 1usize..70,
        at in any::<bool>(), bt in any::<bool>(), ct in any::<bool>(),
        pad in 0usize..3, beta_i in 0usize..3, with_bias in any::<bool>(), seed in any::<u64>(),
    ) {
        let beta = [0.0, 1.0, -0.5][beta_i];
        for path in paths() {
            check(path, (m, k, n), (at, bt, ct), pad, 0.75, beta, with_bias, seed)?;
        }
    }
}

#[test]
fn crosses_every_block_edge() {
    // Depth over two KC blocks (the second accumulates onto the first's beta
    // and bias), rows over two MC blocks, ragged MR / NR edges, for both
    // tiles' block sizes on every path.
    fn shapes<T: Tiling>() -> [(usize, usize, usize); 4] {
        [
            (T::MC + T::MR + 1, 2 * KC + 3, 3 * T::NR + 5),
            (2 * T::MC, KC, 2 * T::NR),
            (T::MR, KC + 1, T::NR),
            (1, 2 * KC + 1, 1),
        ]
    }
    let all: Vec<_> = shapes::<Avx2>()
        .into_iter()
        .chain(shapes::<Avx512>())
        .collect();
    for path in paths() {
        for (s, &(m, k, n)) in all.iter().enumerate() {
            for (at, bt) in [(false, false), (false, true), (true, false), (true, true)] {
                for (beta, bias) in [(0.0, true), (1.0, false), (0.5, true)] {
                    check(
                        path,
                        (m, k, n),
                        (at, bt, false),
                        1,
                        1.0,
                        beta,
                        bias,
                        s as u64,
                    )
                    .unwrap();
                }
            }
        }
    }
}

#[test]
fn beta_zero_overwrites_nan() {
    let (m, k, n) = (13, 5, 37);
    let a = fill(m * k, 1);
    let b = fill(k * n, 2);
    for path in paths() {
        let mut c = vec![f32::NAN; m * n];
        gemm_bias_on(
            path,
            1.0,
            &a,
            MatRef::row_major(m, k),
            &b,
            MatRef::row_major(k, n),
            0.0,
            None,
            &mut c,
            MatRef::row_major(m, n),
        )
        .unwrap();
        assert!(c.iter().all(|v| v.is_finite()), "{}", path.name());
    }
}

#[test]
fn active_path_is_supported() {
    let p = GemmPath::active();
    assert!(p.supported(), "{}", p.name());
    // Forcing a path the CPU lacks is an error, not a crash.
    for path in GemmPath::ALL.into_iter().filter(|p| !p.supported()) {
        let a = [1.0f32];
        let mut c = [0.0f32];
        let v = MatRef::row_major(1, 1);
        assert!(gemm_bias_on(path, 1.0, &a, v, &a, v, 0.0, None, &mut c, v).is_err());
    }
}

#[test]
fn rejects_bad_shapes() {
    let a = vec![0.0; 6];
    let mut c = vec![0.0; 4];
    let err = gemm(
        1.0,
        &a,
        MatRef::row_major(2, 3),
        &a,
        MatRef::row_major(2, 3),
        0.0,
        &mut c,
        MatRef::row_major(2, 2),
    );
    assert!(err.is_err());
    let err = gemm_bias(
        1.0,
        &a,
        MatRef::row_major(2, 3),
        &a,
        MatRef::row_major(3, 2),
        0.0,
        Some(&[1.0]),
        &mut c,
        MatRef::row_major(2, 2),
    );
    assert!(err.is_err());
    let err = gemm(
        1.0,
        &a[..5],
        MatRef::row_major(2, 3),
        &a,
        MatRef::row_major(3, 2),
        0.0,
        &mut c,
        MatRef::row_major(2, 2),
    );
    assert!(err.is_err());
}

#[test]
fn fallback_matches_blocked() {
    // CPUs without AVX2 + FMA (and k = 0) take matrixmultiply with the bias
    // folded into C; both paths must agree.
    for &(m, k, n) in &[(7, 5, 17), (13, 300, 3), (4, 0, 9), (1, 1, 1)] {
        for (beta, with_bias) in [(0.0, true), (1.0, true), (-0.5, false)] {
            let (am, bm, cm) = (
                view(m, k, false, 1, 2),
                view(k, n, true, 0, 1),
                view(m, n, false, 2, 0),
            );
            let a = fill(am.required_len() + 1, 5);
            let b = fill(bm.required_len() + 1, 6);
            let c0 = fill(cm.required_len(), 7);
            let bias = fill(n, 8);
            let bias = with_bias.then_some(bias.as_slice());
            let (mut c1, mut c2) = (c0.clone(), c0.clone());
            gemm_bias(0.5, &a, am, &b, bm, beta, bias, &mut c1, cm).unwrap();
            super::fallback(0.5, &a, am, &b, bm, beta, bias, &mut c2, cm).unwrap();
            for (x, y) in c1.iter().zip(&c2) {
                assert!(
                    (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                    "{x} vs {y} (m {m} k {k} n {n} beta {beta})"
                );
            }
        }
    }
}
