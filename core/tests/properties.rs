//! Property-based tests of `sere-core`: algebraic identities, invariances and
//! contracts that must hold for *every* input of a family, checked on random
//! small inputs with proptest. They complement the fixed-value reference
//! tests (`reference.rs`) and the finite-difference gradient checks.
//!
//! Each property is chosen so that a plausible bug makes it fail (a wrong
//! stride, a missing `1 / sqrt(d)`, a sign error in the centre, a gradient
//! that overwrites instead of accumulating, ...): where an identity alone
//! would also hold for a trivial result (e.g. a zero gradient is linear), a
//! second check pins the scale (Euler's identity, an f64 reference, ...).

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use sere_core::bilinear::{grid_sample_forward, MapLayout, SampleShape};
use sere_core::geometry::{overlap_grids, CropBox, GridPlacement, Rect};
use sere_core::linalg::{gemm, linear_forward, MatRef};
use sere_core::loss::{
    dino_centre_update, dino_loss, dino_loss_backward, relation_cross_entropy,
    relation_cross_entropy_backward, soft_target_cross_entropy, DinoShape,
};
use sere_core::norm::{batch_norm_forward, layer_norm_forward};
use sere_core::optim::{adamw_step, clip_grad_norm, ema_update, l2_norm, AdamW};
use sere_core::relation::{
    channel_relation_backward, channel_relation_forward, spatial_relation_backward,
    spatial_relation_forward,
};
use sere_core::softmax::{log_softmax_rows, softmax_rows, softmax_rows_in_place};
use sere_core::{activation, Error};

// ---------------------------------------------------------------- helpers

/// 1024 cases per property (the inputs are tiny: the whole file runs in
/// about a second), unless `PROPTEST_CASES` says otherwise.
fn config() -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = 1024;
    }
    c
}

/// `|got - want| <= atol + rtol * |want|`.
fn close(got: f64, want: f64, atol: f64, rtol: f64) -> bool {
    (got - want).abs() <= atol + rtol * want.abs()
}

/// A `rows x cols` matrix with entries uniform in `[lo, hi)`.
fn mat(
    max_rows: usize,
    max_cols: usize,
    lo: f32,
    hi: f32,
) -> impl Strategy<Value = (usize, usize, Vec<f32>)> {
    (1..=max_rows, 1..=max_cols).prop_flat_map(move |(r, c)| (Just(r), Just(c), vec(lo..hi, r * c)))
}

/// Row softmax in f64 (the reference for the f32 kernels).
fn softmax_f64(row: &[f32], scale: f64) -> Vec<f64> {
    let m = row
        .iter()
        .map(|&v| v as f64 * scale)
        .fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = row.iter().map(|&v| (v as f64 * scale - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|v| v / z).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

fn placement() -> impl Strategy<Value = GridPlacement> {
    prop_oneof![
        Just(GridPlacement::CellCentres),
        Just(GridPlacement::EdgeToEdge)
    ]
}

fn crop() -> impl Strategy<Value = CropBox> {
    (
        0f32..300.0,
        0f32..300.0,
        4f32..200.0,
        4f32..200.0,
        any::<bool>(),
    )
        .prop_map(|(x, y, w, h, f)| CropBox::new(x, y, w, h, f).unwrap())
}

/// Two crops that share a region of positive area: a random point inside
/// crop `a` at fractions `(fx, fy)` is put at fractions `(gx, gy)` of crop `b`.
fn overlapping_pair() -> impl Strategy<Value = (CropBox, CropBox)> {
    (
        crop(),
        (4f32..200.0, 4f32..200.0, any::<bool>()),
        (0.1f32..0.9, 0.1f32..0.9, 0.1f32..0.9, 0.1f32..0.9),
    )
        .prop_map(|(a, (bw, bh, bf), (fx, fy, gx, gy))| {
            let (px, py) = (a.x + fx * a.w, a.y + fy * a.h);
            let b = CropBox::new(px - gx * bw, py - gy * bh, bw, bh, bf).unwrap();
            (a, b)
        })
}

/// Samples an HWC map (`h x w x c`) at `grid` into a `P x c` matrix.
fn sample_hwc(map: &[f32], grid: &[f32], h: usize, w: usize, c: usize) -> Vec<f32> {
    let p = grid.len() / 2;
    let shape = SampleShape {
        channels: c,
        height: h,
        width: w,
        points: p,
    };
    let mut out = vec![f32::NAN; p * c];
    grid_sample_forward(map, grid, shape, MapLayout::Hwc, &mut out).unwrap();
    out
}

/// The `P x N` matrix of bilinear weights of `grid` on an `h x w` map, built
/// column by column by sampling one-hot maps.
fn bilinear_matrix(grid: &[f32], h: usize, w: usize) -> Vec<f64> {
    let (p, n) = (grid.len() / 2, h * w);
    let mut b = vec![0.0f64; p * n];
    let mut onehot = vec![0.0f32; n];
    for j in 0..n {
        onehot.fill(0.0);
        onehot[j] = 1.0;
        let col = sample_hwc(&onehot, grid, h, w, 1);
        for i in 0..p {
            b[i * n + j] = col[i] as f64;
        }
    }
    b
}

/// An HWC map mirrored left-right: `out[y][x] = map[y][w - 1 - x]`.
fn mirror_hwc(map: &[f32], h: usize, w: usize, c: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; map.len()];
    for y in 0..h {
        for x in 0..w {
            let (dst, src) = ((y * w + x) * c, (y * w + (w - 1 - x)) * c);
            out[dst..dst + c].copy_from_slice(&map[src..src + c]);
        }
    }
    out
}

// ---------------------------------------------------------------- softmax

proptest! {
    #![proptest_config(config())]

    /// Rows are probability distributions, agree with an f64 softmax, and the
    /// in-place variant gives the same bits as the out-of-place one.
    #[test]
    fn softmax_rows_are_distributions((r, c, x) in mat(6, 12, -30.0, 30.0)) {
        let mut p = vec![f32::NAN; r * c];
        softmax_rows(&x, r, c, &mut p).unwrap();
        let mut q = x.clone();
        softmax_rows_in_place(&mut q, r, c).unwrap();
        prop_assert_eq!(&p, &q);
        for (pr, xr) in p.chunks(c).zip(x.chunks(c)) {
            let s: f64 = pr.iter().map(|&v| v as f64).sum();
            prop_assert!((s - 1.0).abs() < 1e-5, "row sums to {}", s);
            prop_assert!(pr.iter().all(|&v| (0.0..=1.0).contains(&v)));
            for (&got, want) in pr.iter().zip(softmax_f64(xr, 1.0)) {
                prop_assert!(close(got as f64, want, 1e-6, 1e-4), "{} vs {}", got, want);
            }
        }
    }

    /// Adding a constant to a row changes neither softmax nor log-softmax.
    #[test]
    fn softmax_shift_invariant(
        (r, c, x, shifts) in mat(5, 10, -20.0, 20.0)
            .prop_flat_map(|(r, c, x)| (Just(r), Just(c), Just(x), vec(-50f32..50.0, r)))
    ) {
        let shifted: Vec<f32> = x
            .chunks(c)
            .zip(&shifts)
            .flat_map(|(row, &k)| row.iter().map(move |&v| v + k))
            .collect();
        let (mut p0, mut p1) = (vec![0.0f32; r * c], vec![0.0f32; r * c]);
        let (mut l0, mut l1) = (vec![0.0f32; r * c], vec![0.0f32; r * c]);
        softmax_rows(&x, r, c, &mut p0).unwrap();
        softmax_rows(&shifted, r, c, &mut p1).unwrap();
        log_softmax_rows(&x, r, c, &mut l0).unwrap();
        log_softmax_rows(&shifted, r, c, &mut l1).unwrap();
        for i in 0..r * c {
            prop_assert!(close(p1[i] as f64, p0[i] as f64, 1e-5, 1e-4), "p {} vs {}", p1[i], p0[i]);
            prop_assert!(close(l1[i] as f64, l0[i] as f64, 1e-4, 1e-5), "l {} vs {}", l1[i], l0[i]);
        }
    }

    /// exp(log_softmax(x)) == softmax(x), and log-softmax is never positive.
    #[test]
    fn exp_log_softmax_is_softmax((r, c, x) in mat(6, 12, -40.0, 40.0)) {
        let (mut p, mut l) = (vec![0.0f32; r * c], vec![0.0f32; r * c]);
        softmax_rows(&x, r, c, &mut p).unwrap();
        log_softmax_rows(&x, r, c, &mut l).unwrap();
        for i in 0..r * c {
            prop_assert!(l[i] <= 0.0);
            let e = (l[i] as f64).exp();
            prop_assert!(close(e, p[i] as f64, 1e-7, 1e-4), "exp(l) {} vs p {}", e, p[i]);
        }
    }

    /// Logits up to 1e4 in magnitude neither overflow nor turn into NaN.
    #[test]
    fn softmax_large_logits_finite((r, c, x) in mat(5, 10, -1e4, 1e4)) {
        let (mut p, mut l) = (vec![0.0f32; r * c], vec![0.0f32; r * c]);
        softmax_rows(&x, r, c, &mut p).unwrap();
        log_softmax_rows(&x, r, c, &mut l).unwrap();
        prop_assert!(p.iter().chain(&l).all(|v| v.is_finite()));
        for ((pr, lr), xr) in p.chunks(c).zip(l.chunks(c)).zip(x.chunks(c)) {
            let s: f64 = pr.iter().map(|&v| v as f64).sum();
            prop_assert!((s - 1.0).abs() < 1e-5);
            // The row maximum keeps at least 1/c of the mass.
            let am = (0..c).max_by(|&a, &b| xr[a].total_cmp(&xr[b])).unwrap();
            prop_assert!(pr[am] >= 1.0 / c as f32 - 1e-6);
            prop_assert!(lr[am] >= -(c as f32).ln() - 1e-4);
            prop_assert!(lr.iter().all(|&v| v <= 0.0));
        }
    }

    /// A NaN or infinite logit is reported, by every softmax flavour and by
    /// the relation cross-entropy (on either side).
    #[test]
    fn non_finite_input_is_an_error(
        (r, c, x) in mat(4, 8, -5.0, 5.0),
        at in any::<Index>(),
        kind in 0usize..3,
    ) {
        let bad = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][kind];
        let mut y = x.clone();
        let k = at.index(y.len());
        y[k] = bad;
        let mut out = vec![0.0f32; r * c];
        let is_nf = |e: Result<(), Error>| matches!(e, Err(Error::NonFinite { .. }));
        prop_assert!(is_nf(softmax_rows(&y, r, c, &mut out)));
        prop_assert!(is_nf(log_softmax_rows(&y, r, c, &mut out)));
        prop_assert!(is_nf(softmax_rows_in_place(&mut y.clone(), r, c)));
        let ce_s = relation_cross_entropy(&y, &x, r, c, 1.0, 0.5);
        let ce_t = relation_cross_entropy(&x, &y, r, c, 1.0, 0.5);
        let (bad_s, bad_t) = (
            matches!(ce_s, Err(Error::NonFinite { .. })),
            matches!(ce_t, Err(Error::NonFinite { .. })),
        );
        prop_assert!(bad_s && bad_t, "{:?} {:?}", ce_s, ce_t);
        // The clean input is accepted (the error is about the NaN, not the shape).
        prop_assert!(softmax_rows(&x, r, c, &mut out).is_ok());
    }
}

// ------------------------------------------- sampling commutes with relating

/// `(h, w, heads, d, map h*w*heads*d HWC, grid 2P)` with points slightly
/// beyond `[-1, 1]` too, so zero padding is part of the linear map.
#[allow(clippy::type_complexity)]
fn sampling_case() -> impl Strategy<Value = (usize, usize, usize, usize, Vec<f32>, Vec<f32>)> {
    (1usize..=5, 1usize..=5, 1usize..=3, 1usize..=3, 1usize..=7).prop_flat_map(
        |(h, w, heads, d, p)| {
            (
                Just(h),
                Just(w),
                Just(heads),
                Just(d),
                vec(-2f32..2.0, h * w * heads * d),
                vec(-1.2f32..1.2, 2 * p),
            )
        },
    )
}

proptest! {
    #![proptest_config(config())]

    /// Relating bilinearly sampled features equals sampling the relation of
    /// all patches on both axes: `rel(B X) = B rel(X) B^T` per head, with `B`
    /// the `P x N` bilinear weight matrix. (Also `S = B X`, and for channels
    /// `S^T S / P = X^T (B^T B) X / P`.)
    #[test]
    fn relating_samples_equals_sampling_relation((h, w, heads, d, x, grid) in sampling_case()) {
        let (n, c, p) = (h * w, heads * d, grid.len() / 2);
        let b = bilinear_matrix(&grid, h, w);
        // Bilinear weights are in [0, 1] and at most sum to one per point.
        for i in 0..p {
            let row = &b[i * n..(i + 1) * n];
            prop_assert!(row.iter().all(|&v| (-1e-7..=1.0 + 1e-6).contains(&v)));
            prop_assert!(row.iter().sum::<f64>() <= 1.0 + 1e-5);
        }
        let s = sample_hwc(&x, &grid, h, w, c);
        // Linearity of grid_sample: S = B X.
        for i in 0..p {
            for ch in 0..c {
                let want: f64 = (0..n).map(|j| b[i * n + j] * x[j * c + ch] as f64).sum();
                prop_assert!(close(s[i * c + ch] as f64, want, 1e-5, 1e-5));
            }
        }
        // Spatial, per head.
        let mut lx = vec![0.0f32; heads * n * n];
        let mut ls = vec![0.0f32; heads * p * p];
        spatial_relation_forward(&x, n, c, heads, &mut lx).unwrap();
        spatial_relation_forward(&s, p, c, heads, &mut ls).unwrap();
        for hd in 0..heads {
            let l = &lx[hd * n * n..(hd + 1) * n * n];
            for i in 0..p {
                for k in 0..p {
                    let (mut want, mut mag) = (0.0f64, 0.0f64);
                    for a in 0..n {
                        for bb in 0..n {
                            let t = b[i * n + a] * l[a * n + bb] as f64 * b[k * n + bb];
                            want += t;
                            mag += t.abs();
                        }
                    }
                    let got = ls[hd * p * p + i * p + k] as f64;
                    prop_assert!(
                        (got - want).abs() <= 1e-5 + 1e-5 * mag,
                        "head {} ({}, {}): {} vs {}", hd, i, k, got, want
                    );
                }
            }
        }
        // Channel: S^T S / P with S = B X.
        let mut cs = vec![0.0f32; c * c];
        channel_relation_forward(&s, p, c, &mut cs).unwrap();
        let mut btb = vec![0.0f64; n * n];
        for a in 0..n {
            for bb in 0..n {
                btb[a * n + bb] = (0..p).map(|i| b[i * n + a] * b[i * n + bb]).sum();
            }
        }
        for c1 in 0..c {
            for c2 in 0..c {
                let (mut want, mut mag) = (0.0f64, 0.0f64);
                for a in 0..n {
                    for bb in 0..n {
                        let t = x[a * c + c1] as f64 * btb[a * n + bb] * x[bb * c + c2] as f64;
                        want += t;
                        mag += t.abs();
                    }
                }
                let got = cs[c1 * c + c2] as f64;
                prop_assert!((got - want / p as f64).abs() <= 1e-5 + 1e-5 * mag / p as f64);
            }
        }
    }

    /// Bilinear weights of a point whose four neighbours are all inside the
    /// map sum to one, and sampling at a pixel centre returns that pixel.
    #[test]
    fn interior_weights_sum_to_one(
        h in 1usize..=6, w in 1usize..=6, fx in 0f32..1.0, fy in 0f32..1.0,
        px in any::<Index>(), py in any::<Index>(),
    ) {
        // Pixel coordinates in [0, w - 1] x [0, h - 1] -> normalized.
        let ix = fx * (w - 1) as f32;
        let iy = fy * (h - 1) as f32;
        let gx = (2.0 * ix + 1.0) / w as f32 - 1.0;
        let gy = (2.0 * iy + 1.0) / h as f32 - 1.0;
        let b = bilinear_matrix(&[gx, gy], h, w);
        prop_assert!((b.iter().sum::<f64>() - 1.0).abs() < 1e-5);
        let (cx, cy) = (px.index(w), py.index(h));
        let centre = [
            (2.0 * cx as f32 + 1.0) / w as f32 - 1.0,
            (2.0 * cy as f32 + 1.0) / h as f32 - 1.0,
        ];
        let b = bilinear_matrix(&centre, h, w);
        let hit = cy * w + cx;
        for (j, &v) in b.iter().enumerate() {
            let want = if j == hit { 1.0 } else { 0.0 };
            prop_assert!((v - want).abs() < 1e-5, "pixel {}: {}", j, v);
        }
    }

    /// CHW and HWC layouts sample the same values (transposed).
    #[test]
    fn layouts_agree((h, w, heads, d, x, grid) in sampling_case()) {
        let (n, c, p) = (h * w, heads * d, grid.len() / 2);
        let mut chw = vec![0.0f32; n * c];
        for j in 0..n {
            for ch in 0..c {
                chw[ch * n + j] = x[j * c + ch];
            }
        }
        let shape = SampleShape { channels: c, height: h, width: w, points: p };
        let mut out = vec![0.0f32; c * p];
        grid_sample_forward(&chw, &grid, shape, MapLayout::Chw, &mut out).unwrap();
        let s = sample_hwc(&x, &grid, h, w, c);
        for i in 0..p {
            for ch in 0..c {
                prop_assert_eq!(out[ch * p + i], s[i * c + ch]);
            }
        }
    }
}

// --------------------------------------------------------------- geometry

/// Where point `i` of `s` sits across the overlap, restated from the
/// documentation (not by calling `GridPlacement::fraction`).
fn expected_fraction(pl: GridPlacement, i: usize, s: usize) -> f32 {
    match pl {
        GridPlacement::CellCentres => (2 * i + 1) as f32 / (2 * s) as f32,
        GridPlacement::EdgeToEdge if s == 1 => 0.5,
        GridPlacement::EdgeToEdge => i as f32 / (s - 1) as f32,
    }
}

proptest! {
    #![proptest_config(config())]

    /// Both views' grid points map back to the same source point, which is
    /// the expected point of the overlap; cell centres lie strictly inside
    /// both views, edge-to-edge points within `[-1, 1]`.
    #[test]
    fn overlap_grids_agree_in_source(
        (a, b) in overlapping_pair(), hs in 1usize..=8, ws in 1usize..=8, pl in placement(),
    ) {
        let (mut ga, mut gb) = (vec![f32::NAN; hs * ws * 2], vec![f32::NAN; hs * ws * 2]);
        let r = overlap_grids(&a, &b, hs, ws, pl, &mut ga, &mut gb).unwrap();
        let r: Rect = r.expect("the crops overlap by construction");
        prop_assert!(r.x0 < r.x1 && r.y0 < r.y1);
        let tol = 1e-3f32;
        for i in 0..hs {
            for j in 0..ws {
                let k = 2 * (i * ws + j);
                let (xa, ya) = a.from_normalized(ga[k], ga[k + 1]);
                let (xb, yb) = b.from_normalized(gb[k], gb[k + 1]);
                prop_assert!((xa - xb).abs() < tol && (ya - yb).abs() < tol,
                    "({}, {}) vs ({}, {})", xa, ya, xb, yb);
                // Row-major, y outer, at the placement's fractions of the overlap.
                let ex = r.x0 + expected_fraction(pl, j, ws) * (r.x1 - r.x0);
                let ey = r.y0 + expected_fraction(pl, i, hs) * (r.y1 - r.y0);
                prop_assert!((xa - ex).abs() < tol && (ya - ey).abs() < tol);
                for &u in &[ga[k], ga[k + 1], gb[k], gb[k + 1]] {
                    match pl {
                        GridPlacement::CellCentres => {
                            prop_assert!(u > -1.0 && u < 1.0, "{} not strictly inside", u)
                        }
                        GridPlacement::EdgeToEdge => {
                            prop_assert!((-1.0 - 1e-5..=1.0 + 1e-5).contains(&u))
                        }
                    }
                }
            }
        }
    }

    /// Crops that share no area (touching or apart) give `Ok(None)` and leave
    /// the grids alone.
    #[test]
    fn disjoint_crops_have_no_grid(
        a in crop(), bw in 4f32..200.0, bh in 4f32..200.0, flip in any::<bool>(),
        gap in prop_oneof![Just(0f32), 0f32..50.0], along in -300f32..300.0, dir in 0usize..4, pl in placement(),
    ) {
        let (bx, by) = match dir {
            0 => (a.x + a.w + gap, a.y + along),       // right (touching when gap = 0)
            1 => (a.x - bw - 1.0 - gap, a.y + along),  // left
            2 => (a.x + along, a.y + a.h + gap),       // below (touching when gap = 0)
            _ => (a.x + along, a.y - bh - 1.0 - gap),  // above
        };
        let b = CropBox::new(bx, by, bw, bh, flip).unwrap();
        let (mut ga, mut gb) = ([7.0f32; 18], [7.0f32; 18]);
        prop_assert_eq!(overlap_grids(&a, &b, 3, 3, pl, &mut ga, &mut gb), Ok(None));
        prop_assert_eq!(overlap_grids(&b, &a, 3, 3, pl, &mut ga, &mut gb), Ok(None));
        prop_assert!(ga.iter().chain(&gb).all(|&v| v == 7.0));
    }

    /// Flipping a crop negates the x coordinate of its grid points (and
    /// changes nothing else); sampling a map at the flipped crop's grid equals
    /// sampling the left-right mirrored map at the unflipped grid.
    #[test]
    fn flip_mirrors_grid_and_sampling(
        (a, b) in overlapping_pair(), hs in 1usize..=6, ws in 1usize..=6, pl in placement(),
        (h, w, c, map) in (1usize..=5, 1usize..=5, 1usize..=3)
            .prop_flat_map(|(h, w, c)| (Just(h), Just(w), Just(c), vec(-3f32..3.0, h * w * c))),
    ) {
        let a0 = CropBox { flipped: false, ..a };
        let a1 = CropBox { flipped: true, ..a };
        let len = hs * ws * 2;
        let (mut g0, mut g1) = (vec![0.0f32; len], vec![0.0f32; len]);
        let (mut gb0, mut gb1) = (vec![0.0f32; len], vec![0.0f32; len]);
        let r0 = overlap_grids(&a0, &b, hs, ws, pl, &mut g0, &mut gb0).unwrap();
        let r1 = overlap_grids(&a1, &b, hs, ws, pl, &mut g1, &mut gb1).unwrap();
        prop_assert!(r0.is_some());
        prop_assert_eq!(r0, r1);
        prop_assert_eq!(&gb0, &gb1);
        for k in 0..hs * ws {
            prop_assert_eq!(g1[2 * k], -g0[2 * k]);
            prop_assert_eq!(g1[2 * k + 1], g0[2 * k + 1]);
        }
        let from_flipped = sample_hwc(&map, &g1, h, w, c);
        let from_mirror = sample_hwc(&mirror_hwc(&map, h, w, c), &g0, h, w, c);
        for (u, v) in from_flipped.iter().zip(&from_mirror) {
            prop_assert!(close(*u as f64, *v as f64, 1e-5, 1e-5), "{} vs {}", u, v);
        }
    }

    /// The same mirror symmetry of `grid_sample` for arbitrary points,
    /// including points in the zero padding.
    #[test]
    fn grid_sample_mirror_symmetry((h, w, heads, d, x, grid) in sampling_case()) {
        let c = heads * d;
        let neg: Vec<f32> = grid
            .chunks(2)
            .flat_map(|g| [-g[0], g[1]])
            .collect();
        let a = sample_hwc(&x, &neg, h, w, c);
        let b = sample_hwc(&mirror_hwc(&x, h, w, c), &grid, h, w, c);
        for (u, v) in a.iter().zip(&b) {
            prop_assert!(close(*u as f64, *v as f64, 1e-5, 1e-5), "{} vs {}", u, v);
        }
    }
}

// ------------------------------------------------------ relation cross-entropy

fn ce_case() -> impl Strategy<Value = (usize, usize, Vec<f32>, Vec<f32>)> {
    (1usize..=5, 1usize..=10).prop_flat_map(|(r, c)| {
        (
            Just(r),
            Just(c),
            vec(-5f32..5.0, r * c),
            vec(-5f32..5.0, r * c),
        )
    })
}

proptest! {
    #![proptest_config(config())]

    /// Student equal to teacher at equal temperatures: zero gradient, and the
    /// loss equals the teacher's entropy.
    #[test]
    fn ce_self_has_zero_gradient((r, c, s, _t) in ce_case(), tau in 0.05f32..2.0, scale in 0.1f32..10.0) {
        let mut g = vec![0.0f32; r * c];
        let loss = relation_cross_entropy_backward(&s, &s, r, c, tau, tau, scale, &mut g).unwrap();
        prop_assert!(g.iter().all(|v| v.abs() < 1e-6), "{:?}", g);
        let ent: f64 = s
            .chunks(c)
            .map(|row| -softmax_f64(row, 1.0 / tau as f64).iter().map(|&q| if q > 0.0 { q * q.ln() } else { 0.0 }).sum::<f64>())
            .sum::<f64>() / r as f64;
        prop_assert!(close(loss as f64, ent, 1e-5, 1e-4), "loss {} entropy {}", loss, ent);
    }

    /// A target given as probabilities (`softmax(T / tau_t)`, computed once)
    /// gives the loss and gradient of the teacher-logit form.
    #[test]
    fn soft_target_matches_teacher_logit_form(
        (r, c, s, t) in ce_case(), tau_s in 0.1f32..2.0, tau_t in 0.05f32..2.0, scale in 0.1f32..10.0,
    ) {
        let mut q = t.clone();
        for row in q.chunks_mut(c) {
            row.iter_mut().for_each(|v| *v /= tau_t);
        }
        softmax_rows_in_place(&mut q, r, c).unwrap();
        let (mut g1, mut g2) = (vec![0.0f32; r * c], vec![0.0f32; r * c]);
        let l1 = relation_cross_entropy_backward(&s, &t, r, c, tau_s, tau_t, scale, &mut g1).unwrap();
        let l2 = soft_target_cross_entropy(&s, &q, r, c, tau_s, Some((&mut g2, scale))).unwrap();
        let l3 = soft_target_cross_entropy(&s, &q, r, c, tau_s, None).unwrap();
        prop_assert!(close(l1 as f64, l2 as f64, 1e-5, 1e-5), "loss {} vs {}", l1, l2);
        prop_assert_eq!(l2.to_bits(), l3.to_bits());
        let gmax = g1.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (a, b) in g1.iter().zip(&g2) {
            prop_assert!((a - b).abs() <= 1e-5 * (1.0 + gmax), "grad {} vs {}", a, b);
        }
    }

    /// Gibbs: cross-entropy >= entropy of the teacher distribution, and the
    /// loss agrees with an f64 evaluation of its definition.
    #[test]
    fn ce_at_least_teacher_entropy(
        (r, c, s, t) in ce_case(), tau_s in 0.1f32..2.0, tau_t in 0.05f32..2.0,
    ) {
        let loss = relation_cross_entropy(&s, &t, r, c, tau_s, tau_t).unwrap();
        let (mut ent, mut ce) = (0.0f64, 0.0f64);
        for (sr, tr) in s.chunks(c).zip(t.chunks(c)) {
            let q = softmax_f64(tr, 1.0 / tau_t as f64);
            let p = softmax_f64(sr, 1.0 / tau_s as f64);
            for k in 0..c {
                if q[k] > 0.0 {
                    ent -= q[k] * q[k].ln();
                    ce -= q[k] * p[k].ln();
                }
            }
        }
        let (ent, ce) = (ent / r as f64, ce / r as f64);
        prop_assert!(loss as f64 >= ent - 1e-4 * (1.0 + ent), "loss {} < entropy {}", loss, ent);
        prop_assert!(close(loss as f64, ce, 1e-5, 1e-4), "loss {} vs f64 {}", loss, ce);
    }

    /// Each gradient row sums to zero (softmax is shift invariant); the
    /// gradient is added to what the buffer held and matches `scale/rows *
    /// (p - q) / tau_s`; forward and backward report the same loss.
    #[test]
    fn ce_gradient_rows_sum_to_zero(
        (r, c, s, t) in ce_case(), tau_s in 0.1f32..2.0, tau_t in 0.05f32..2.0,
        scale in 0.1f32..10.0, init in -1f32..1.0,
    ) {
        let mut g = vec![init; r * c];
        let l1 = relation_cross_entropy_backward(&s, &t, r, c, tau_s, tau_t, scale, &mut g).unwrap();
        let l0 = relation_cross_entropy(&s, &t, r, c, tau_s, tau_t).unwrap();
        prop_assert_eq!(l0, l1);
        let f = scale as f64 / (r as f64 * tau_s as f64);
        for (row, (sr, tr)) in g.chunks(c).zip(s.chunks(c).zip(t.chunks(c))) {
            let sum: f64 = row.iter().map(|&v| v as f64 - init as f64).sum();
            prop_assert!(sum.abs() < 1e-5 * (1.0 + f) * c as f64, "row sum {}", sum);
            let p = softmax_f64(sr, 1.0 / tau_s as f64);
            let q = softmax_f64(tr, 1.0 / tau_t as f64);
            for k in 0..c {
                let want = init as f64 + f * (p[k] - q[k]);
                prop_assert!(close(row[k] as f64, want, 1e-5 * (1.0 + f), 1e-4));
            }
        }
    }
}

// ------------------------------------------------------------- relations

fn relation_case() -> impl Strategy<Value = (usize, usize, usize, Vec<f32>)> {
    (1usize..=6, 1usize..=3, 1usize..=4).prop_flat_map(|(n, heads, d)| {
        (
            Just(n),
            Just(heads),
            Just(heads * d),
            vec(-2f32..2.0, n * heads * d),
        )
    })
}

proptest! {
    #![proptest_config(config())]

    /// Channel logits and every head's spatial logits are symmetric, and the
    /// spatial diagonal is the scaled squared norm of each token's head slice.
    #[test]
    fn relation_logits_symmetric((n, heads, c, x) in relation_case()) {
        let d = c / heads;
        let mut sp = vec![0.0f32; heads * n * n];
        spatial_relation_forward(&x, n, c, heads, &mut sp).unwrap();
        for h in 0..heads {
            for i in 0..n {
                for j in 0..n {
                    let (a, b) = (sp[h * n * n + i * n + j], sp[h * n * n + j * n + i]);
                    prop_assert!(close(a as f64, b as f64, 1e-6, 1e-5));
                }
                let xi = &x[i * c + h * d..i * c + (h + 1) * d];
                let want = dot(xi, xi) / (d as f64).sqrt();
                prop_assert!(close(sp[h * n * n + i * n + i] as f64, want, 1e-5, 1e-5));
            }
        }
        let mut ch = vec![0.0f32; c * c];
        channel_relation_forward(&x, n, c, &mut ch).unwrap();
        for i in 0..c {
            for j in 0..c {
                prop_assert!(close(ch[i * c + j] as f64, ch[j * c + i] as f64, 1e-6, 1e-5));
            }
        }
    }

    /// Relation backward is linear in `grad_logits`, accumulates into
    /// `grad_x`, and satisfies Euler's identity for the degree-2 homogeneous
    /// logits: `<dL/dX, X> = 2 <G, logits(X)>` (this pins the scale, which
    /// linearity alone does not).
    #[test]
    fn relation_backward_linear_and_homogeneous(
        (n, heads, c, x) in relation_case(),
        seed in vec(-1f32..1.0, 2 * 3 * 6 * 6 + 2 * 12 * 12),
        (a, b) in (-2f32..2.0, -2f32..2.0),
    ) {
        // Spatial.
        let ls = heads * n * n;
        let (g1, g2) = (&seed[..ls], &seed[ls..2 * ls]);
        let mix: Vec<f32> = g1.iter().zip(g2).map(|(&u, &v)| a * u + b * v).collect();
        let bwd = |g: &[f32]| {
            let mut gx = vec![0.0f32; n * c];
            spatial_relation_backward(&x, g, n, c, heads, &mut gx).unwrap();
            gx
        };
        let (r1, r2, rm) = (bwd(g1), bwd(g2), bwd(&mix));
        for i in 0..n * c {
            let want = a as f64 * r1[i] as f64 + b as f64 * r2[i] as f64;
            let mag = (a * r1[i]).abs() as f64 + (b * r2[i]).abs() as f64;
            prop_assert!((rm[i] as f64 - want).abs() <= 1e-5 + 1e-4 * mag);
        }
        let mut lg = vec![0.0f32; ls];
        spatial_relation_forward(&x, n, c, heads, &mut lg).unwrap();
        let lhs = dot(&r1, &x);
        let rhs = 2.0 * dot(g1, &lg);
        prop_assert!(close(lhs, rhs, 1e-4, 1e-4), "spatial Euler {} vs {}", lhs, rhs);
        // Accumulation: a second call adds the same amount again.
        let mut acc = r1.clone();
        spatial_relation_backward(&x, g1, n, c, heads, &mut acc).unwrap();
        for i in 0..n * c {
            prop_assert!(close(acc[i] as f64, 2.0 * r1[i] as f64, 1e-6, 1e-5));
        }

        // Channel.
        let lc = c * c;
        let off = 2 * 3 * 6 * 6;
        let (h1, h2) = (&seed[off..off + lc], &seed[off + lc..off + 2 * lc]);
        let mix: Vec<f32> = h1.iter().zip(h2).map(|(&u, &v)| a * u + b * v).collect();
        let bwd = |g: &[f32]| {
            let mut gx = vec![0.0f32; n * c];
            channel_relation_backward(&x, g, n, c, &mut gx).unwrap();
            gx
        };
        let (r1, r2, rm) = (bwd(h1), bwd(h2), bwd(&mix));
        for i in 0..n * c {
            let want = a as f64 * r1[i] as f64 + b as f64 * r2[i] as f64;
            let mag = (a * r1[i]).abs() as f64 + (b * r2[i]).abs() as f64;
            prop_assert!((rm[i] as f64 - want).abs() <= 1e-5 + 1e-4 * mag);
        }
        let mut lg = vec![0.0f32; lc];
        channel_relation_forward(&x, n, c, &mut lg).unwrap();
        let lhs = dot(&r1, &x);
        let rhs = 2.0 * dot(h1, &lg);
        prop_assert!(close(lhs, rhs, 1e-4, 1e-4), "channel Euler {} vs {}", lhs, rhs);
    }

    /// The logits are quadratic in `X`, so a central difference is exact:
    /// `<G, L(X + E)> - <G, L(X - E)> = 2 <dL/dX, E>` for any direction `E`
    /// (this catches a transposed `G`, which the checks above cannot see).
    #[test]
    fn relation_backward_is_exact_directional_derivative(
        (n, heads, c, x) in relation_case(),
        seed in vec(-1f32..1.0, 3 * 6 * 6 + 12 * 12 + 6 * 12),
    ) {
        let (gs, rest) = seed.split_at(heads * n * n);
        let (gc, rest) = rest.split_at(c * c);
        let e = &rest[..n * c];
        let xp: Vec<f32> = x.iter().zip(e).map(|(&a, &b)| a + b).collect();
        let xm: Vec<f32> = x.iter().zip(e).map(|(&a, &b)| a - b).collect();
        // Spatial.
        let mut lp = vec![0.0f32; heads * n * n];
        let mut lm = vec![0.0f32; heads * n * n];
        spatial_relation_forward(&xp, n, c, heads, &mut lp).unwrap();
        spatial_relation_forward(&xm, n, c, heads, &mut lm).unwrap();
        let mut gx = vec![0.0f32; n * c];
        spatial_relation_backward(&x, gs, n, c, heads, &mut gx).unwrap();
        let (lhs, rhs) = (dot(gs, &lp) - dot(gs, &lm), 2.0 * dot(&gx, e));
        let mag: f64 = gs.iter().zip(&lp).map(|(&a, &b)| (a * b).abs() as f64).sum();
        prop_assert!((lhs - rhs).abs() <= 1e-4 + 1e-5 * mag, "spatial {} vs {}", lhs, rhs);
        // Channel.
        let mut lp = vec![0.0f32; c * c];
        let mut lm = vec![0.0f32; c * c];
        channel_relation_forward(&xp, n, c, &mut lp).unwrap();
        channel_relation_forward(&xm, n, c, &mut lm).unwrap();
        let mut gx = vec![0.0f32; n * c];
        channel_relation_backward(&x, gc, n, c, &mut gx).unwrap();
        let (lhs, rhs) = (dot(gc, &lp) - dot(gc, &lm), 2.0 * dot(&gx, e));
        let mag: f64 = gc.iter().zip(&lp).map(|(&a, &b)| (a * b).abs() as f64).sum();
        prop_assert!((lhs - rhs).abs() <= 1e-4 + 1e-5 * mag, "channel {} vs {}", lhs, rhs);
    }
}

// -------------------------------------------------------------------- DINO

fn dino_case() -> impl Strategy<Value = (DinoShape, Vec<f32>, Vec<f32>, Vec<f32>)> {
    (2usize..=4, 1usize..=2, 1usize..=3, 2usize..=10).prop_flat_map(|(sv, tv, batch, dim)| {
        let shape = DinoShape {
            student_views: sv,
            teacher_views: tv.min(sv),
            batch,
            dim,
        };
        (
            Just(shape),
            vec(-5f32..5.0, sv * batch * dim),
            vec(-5f32..5.0, shape.teacher_views * batch * dim),
            vec(-1f32..1.0, dim),
        )
    })
}

proptest! {
    #![proptest_config(config())]

    /// Every (view, image) row of the DINO gradient sums to zero; the
    /// gradient is added to the buffer's previous contents and equals the
    /// f64 sum of `(p - q) / tau_s` over the paired teacher views.
    #[test]
    fn dino_gradient_rows_sum_to_zero(
        (shape, s, t, c) in dino_case(), tau_s in 0.05f32..1.0, tau_t in 0.02f32..0.2,
        scale in 0.1f32..4.0, init in -1f32..1.0,
    ) {
        let mut g = vec![init; s.len()];
        let l1 = dino_loss_backward(&s, &t, &c, shape, tau_s, tau_t, scale, &mut g).unwrap();
        let l0 = dino_loss(&s, &t, &c, shape, tau_s, tau_t).unwrap();
        prop_assert_eq!(l0, l1);
        prop_assert!(l0.is_finite() && l0 >= 0.0);
        for row in g.chunks(shape.dim) {
            let sum: f64 = row.iter().map(|&v| v as f64 - init as f64).sum();
            prop_assert!(sum.abs() < 1e-5 * (1.0 + scale as f64 / tau_s as f64) * shape.dim as f64,
                "row sum {}", sum);
        }
        // The gradient itself: scale / (pairs * batch) / tau_s times the sum
        // of (p - q) over the teacher views paired with this student view.
        let DinoShape { student_views, teacher_views, batch, dim } = shape;
        let f = scale as f64 / (shape.pairs() * batch) as f64 / tau_s as f64;
        for v in 0..student_views {
            for b in 0..batch {
                let at = (v * batch + b) * dim;
                let p = softmax_f64(&s[at..at + dim], 1.0 / tau_s as f64);
                let mut want = vec![0.0f64; dim];
                for iq in (0..teacher_views).filter(|&iq| iq != v) {
                    let tr: Vec<f32> = t[(iq * batch + b) * dim..(iq * batch + b + 1) * dim]
                        .iter()
                        .zip(&c)
                        .map(|(&x, &y)| x - y)
                        .collect();
                    let q = softmax_f64(&tr, 1.0 / tau_t as f64);
                    for k in 0..dim {
                        want[k] += f * (p[k] - q[k]);
                    }
                }
                for k in 0..dim {
                    let got = g[at + k] as f64 - init as f64;
                    prop_assert!(close(got, want[k], 1e-5 * (1.0 + f), 1e-3),
                        "view {} image {} k {}: {} vs {}", v, b, k, got, want[k]);
                }
            }
        }
    }

    /// The loss is unchanged by adding a constant to the centre, and centring
    /// is exactly subtracting the centre from the teacher logits.
    #[test]
    fn dino_centre_shift_invariant(
        (shape, s, t, c) in dino_case(), k in -10f32..10.0, tau_t in 0.02f32..0.2,
    ) {
        let tau_s = 0.1;
        let l0 = dino_loss(&s, &t, &c, shape, tau_s, tau_t).unwrap();
        let ck: Vec<f32> = c.iter().map(|&v| v + k).collect();
        let l1 = dino_loss(&s, &t, &ck, shape, tau_s, tau_t).unwrap();
        prop_assert!(close(l1 as f64, l0 as f64, 1e-3, 1e-3), "{} vs {}", l1, l0);
        let tc: Vec<f32> = t
            .chunks(shape.dim)
            .flat_map(|row| row.iter().zip(&c).map(|(&a, &b)| a - b))
            .collect();
        let l2 = dino_loss(&s, &tc, &vec![0.0; shape.dim], shape, tau_s, tau_t).unwrap();
        prop_assert!(close(l2 as f64, l0 as f64, 1e-4, 1e-4), "{} vs {}", l2, l0);
    }

    /// Centre momentum 1 keeps the centre; momentum 0 sets it to the batch
    /// mean of the teacher outputs; in between it is the convex combination.
    #[test]
    fn dino_centre_update_extremes(
        (rows, dim, t) in mat(6, 8, -5.0, 5.0), c0 in vec(-3f32..3.0, 8), mom in 0f32..1.0,
    ) {
        let c0 = &c0[..dim];
        let mean: Vec<f64> = (0..dim)
            .map(|j| (0..rows).map(|r| t[r * dim + j] as f64).sum::<f64>() / rows as f64)
            .collect();
        let mut c = c0.to_vec();
        dino_centre_update(&t, rows, dim, 1.0, &mut c).unwrap();
        prop_assert_eq!(&c[..], c0);
        dino_centre_update(&t, rows, dim, mom, &mut c).unwrap();
        for j in 0..dim {
            let want = mom as f64 * c0[j] as f64 + (1.0 - mom as f64) * mean[j];
            prop_assert!(close(c[j] as f64, want, 1e-5, 1e-5), "{} vs {}", c[j], want);
        }
        dino_centre_update(&t, rows, dim, 0.0, &mut c).unwrap();
        for j in 0..dim {
            prop_assert!(close(c[j] as f64, mean[j], 1e-5, 1e-5));
        }
    }
}

// ------------------------------------------------------------------- norms

proptest! {
    #![proptest_config(config())]

    /// With a constant gamma, every layer-norm row has mean `mean(beta)`;
    /// with gamma = 1, beta = 0 it has mean 0 and (biased) variance 1.
    #[test]
    fn layer_norm_row_statistics(
        (r, c, x) in mat(5, 12, -3.0, 3.0).prop_filter("non-trivial rows", |(_, c, x)| {
            *c >= 2 && x.chunks(*c).all(|row| {
                let m = row.iter().sum::<f32>() / row.len() as f32;
                row.iter().map(|v| (v - m) * (v - m)).sum::<f32>() / row.len() as f32 > 0.05
            })
        }),
        g in 0.2f32..3.0, beta in vec(-2f32..2.0, 12),
    ) {
        let beta = &beta[..c];
        let (mut y, mut mean, mut rstd) = (vec![0.0f32; r * c], vec![0.0f32; r], vec![0.0f32; r]);
        layer_norm_forward(&x, &vec![g; c], beta, r, c, 0.0, &mut y, &mut mean, &mut rstd).unwrap();
        let beta_mean = beta.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
        for row in y.chunks(c) {
            let m = row.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
            prop_assert!(close(m, beta_mean, 1e-5, 1e-5), "{} vs {}", m, beta_mean);
        }
        layer_norm_forward(&x, &vec![1.0; c], &vec![0.0; c], r, c, 0.0, &mut y, &mut mean, &mut rstd).unwrap();
        for row in y.chunks(c) {
            let m = row.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
            let v = row.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / c as f64;
            prop_assert!(m.abs() < 1e-5 && (v - 1.0).abs() < 1e-4, "mean {} var {}", m, v);
        }
    }

    /// Layer norm (gamma = 1, beta = 0) is invariant to a per-row shift and
    /// positive scale of its input (a negative scale flips the sign).
    #[test]
    fn layer_norm_shift_scale_invariant(
        (r, c, x, aff) in mat(4, 10, -3.0, 3.0)
            .prop_filter("non-trivial rows", |(_, c, x)| {
                *c >= 2 && x.chunks(*c).all(|row| {
                    let m = row.iter().sum::<f32>() / row.len() as f32;
                    row.iter().map(|v| (v - m) * (v - m)).sum::<f32>() / row.len() as f32 > 0.05
                })
            })
            .prop_flat_map(|(r, c, x)| {
                let a = prop_oneof![0.1f32..10.0, -10f32..-0.1];
                (Just(r), Just(c), Just(x), vec((a, -10f32..10.0), r))
            }),
    ) {
        let xs: Vec<f32> = x
            .chunks(c)
            .zip(&aff)
            .flat_map(|(row, &(a, b))| row.iter().map(move |&v| a * v + b))
            .collect();
        let (ones, zeros) = (vec![1.0f32; c], vec![0.0f32; c]);
        let (mut y0, mut y1) = (vec![0.0f32; r * c], vec![0.0f32; r * c]);
        let (mut m, mut s) = (vec![0.0f32; r], vec![0.0f32; r]);
        layer_norm_forward(&x, &ones, &zeros, r, c, 0.0, &mut y0, &mut m, &mut s).unwrap();
        layer_norm_forward(&xs, &ones, &zeros, r, c, 0.0, &mut y1, &mut m, &mut s).unwrap();
        for (i, (&u, &v)) in y1.iter().zip(&y0).enumerate() {
            let sign = aff[i / c].0.signum();
            prop_assert!((u - sign * v).abs() < 2e-3, "{} vs {}", u, sign * v);
        }
    }

    /// Train-mode batch norm (gamma = 1, beta = 0, eps = 0): every output
    /// column has zero mean and unit biased variance; the saved statistics
    /// are the column mean and variance of the input.
    #[test]
    fn batch_norm_columns_standardized(
        (r, c, x) in mat(8, 5, -4.0, 4.0).prop_filter("non-trivial columns", |(r, c, x)| {
            *r >= 2 && (0..*c).all(|j| {
                let col: Vec<f32> = (0..*r).map(|i| x[i * c + j]).collect();
                let m = col.iter().sum::<f32>() / *r as f32;
                col.iter().map(|v| (v - m) * (v - m)).sum::<f32>() / *r as f32 > 0.05
            })
        }),
    ) {
        let (mut y, mut mean, mut var, mut rstd) =
            (vec![0.0f32; r * c], vec![0.0f32; c], vec![0.0f32; c], vec![0.0f32; c]);
        batch_norm_forward(&x, &vec![1.0; c], &vec![0.0; c], r, c, 0.0, &mut y, &mut mean, &mut var, &mut rstd).unwrap();
        for j in 0..c {
            let col: Vec<f64> = (0..r).map(|i| y[i * c + j] as f64).collect();
            let m = col.iter().sum::<f64>() / r as f64;
            let v = col.iter().map(|u| (u - m).powi(2)).sum::<f64>() / r as f64;
            prop_assert!(m.abs() < 1e-5 && (v - 1.0).abs() < 1e-4, "col {}: mean {} var {}", j, m, v);
            let xc: Vec<f64> = (0..r).map(|i| x[i * c + j] as f64).collect();
            let xm = xc.iter().sum::<f64>() / r as f64;
            let xv = xc.iter().map(|u| (u - xm).powi(2)).sum::<f64>() / r as f64;
            prop_assert!(close(mean[j] as f64, xm, 1e-5, 1e-5) && close(var[j] as f64, xv, 1e-5, 1e-4));
        }
    }
}

// ------------------------------------------------------------- gemm, shapes

/// A strided view of a logical `rows x cols` matrix inside a random buffer:
/// row-major with padded rows, or a transposed view of a row-major buffer,
/// at a random offset, with spare elements after it.
fn view(rows: usize, cols: usize) -> impl Strategy<Value = (MatRef, Vec<f32>)> {
    (any::<bool>(), 0usize..3, 0usize..4, 0usize..3).prop_flat_map(
        move |(trans, pad, offset, tail)| {
            let m = if trans {
                // Stored as the row-major transpose (cols x rows, padded), read transposed.
                MatRef {
                    offset,
                    rows: cols,
                    cols: rows,
                    row_stride: rows + pad,
                    col_stride: 1,
                }
                .transposed()
            } else {
                MatRef {
                    offset,
                    rows,
                    cols,
                    row_stride: cols + pad,
                    col_stride: 1,
                }
            };
            (Just(m), vec(-2f32..2.0, m.required_len() + tail))
        },
    )
}

#[allow(clippy::type_complexity)]
fn gemm_case() -> impl Strategy<Value = ((MatRef, Vec<f32>), (MatRef, Vec<f32>), (MatRef, Vec<f32>))>
{
    (1usize..=7, 1usize..=7, 1usize..=7)
        .prop_flat_map(|(m, k, n)| (view(m, k), view(k, n), view(m, n)))
}

proptest! {
    #![proptest_config(config())]

    /// `gemm` equals a naive triple loop on random strided (and transposed)
    /// views; elements of `C` outside its view are untouched, and with
    /// `beta = 0` garbage (NaN) in `C` is ignored.
    #[test]
    fn gemm_matches_naive(
        ((am, a), (bm, b), (cm, c0)) in gemm_case(),
        alpha in -2f32..2.0, beta in prop_oneof![Just(0.0f32), -2f32..2.0],
    ) {
        let mut c = c0.clone();
        let idx = |m: MatRef, i: usize, j: usize| m.offset + i * m.row_stride + j * m.col_stride;
        let mut in_view = vec![false; c.len()];
        for i in 0..cm.rows {
            for j in 0..cm.cols {
                in_view[idx(cm, i, j)] = true;
                if beta == 0.0 {
                    c[idx(cm, i, j)] = f32::NAN;
                }
            }
        }
        gemm(alpha, &a, am, &b, bm, beta, &mut c, cm).unwrap();
        for i in 0..cm.rows {
            for j in 0..cm.cols {
                let mut want = 0.0f64;
                let mut mag = 0.0f64;
                for p in 0..am.cols {
                    let t = a[idx(am, i, p)] as f64 * b[idx(bm, p, j)] as f64;
                    want += t;
                    mag += t.abs();
                }
                let c_old = if beta == 0.0 { 0.0 } else { c0[idx(cm, i, j)] as f64 };
                let want = alpha as f64 * want + beta as f64 * c_old;
                let mag = (alpha as f64).abs() * mag + (beta as f64 * c_old).abs();
                let got = c[idx(cm, i, j)] as f64;
                prop_assert!((got - want).abs() <= 1e-5 + 1e-5 * mag, "({}, {}): {} vs {}", i, j, got, want);
            }
        }
        for (k, (&u, &v)) in c.iter().zip(&c0).enumerate() {
            if !in_view[k] {
                prop_assert_eq!(u.to_bits(), v.to_bits());
            }
        }
        // A too-short buffer is refused, not read out of bounds.
        let short = &a[..am.required_len() - 1];
        let err = gemm(alpha, short, am, &b, bm, beta, &mut c, cm);
        let bad_a = matches!(err, Err(Error::ShapeMismatch { what: "A", .. }));
        prop_assert!(bad_a);
    }

    /// A slice of the wrong length is an `Err(ShapeMismatch)` naming that
    /// argument, its required and its actual length — never a panic.
    #[test]
    fn wrong_lengths_are_shape_errors(
        r in 1usize..5, c in 1usize..5, delta in 1usize..6, longer in any::<bool>(), which in 0usize..3,
    ) {
        let wrong = |n: usize| if longer { n + delta } else { n.saturating_sub(delta) };
        let expect = |res: Result<(), Error>, what: &'static str, n: usize| match res {
            Err(Error::ShapeMismatch { what: w, expected, got }) => w == what && expected == n && got == wrong(n),
            _ => false,
        };
        let n = r * c;
        let z = |k: usize| vec![0.5f32; k];
        // softmax: input, out
        let res = match which {
            0 => softmax_rows(&z(wrong(n)), r, c, &mut z(n)),
            _ => softmax_rows(&z(n), r, c, &mut z(wrong(n))),
        };
        let what = if which == 0 { "input" } else { "out" };
        prop_assert!(expect(res, what, n), "{:?}", res);
        // spatial relation: x, logits (heads = 1)
        let res = match which {
            0 => spatial_relation_forward(&z(wrong(n)), r, c, 1, &mut z(r * r)),
            _ => spatial_relation_forward(&z(n), r, c, 1, &mut z(wrong(r * r))),
        };
        let (what, len) = if which == 0 { ("x", n) } else { ("logits", r * r) };
        prop_assert!(expect(res, what, len), "{:?}", res);
        // channel relation backward: grad_x
        let res = channel_relation_backward(&z(n), &z(c * c), r, c, &mut z(wrong(n)));
        prop_assert!(expect(res, "grad_x", n));
        // grid_sample: map, grid, out
        let shape = SampleShape { channels: c, height: r, width: 2, points: 3 };
        let (ml, gl, ol) = (c * r * 2, 6, 3 * c);
        let res = match which {
            0 => grid_sample_forward(&z(wrong(ml)), &z(gl), shape, MapLayout::Hwc, &mut z(ol)),
            1 => grid_sample_forward(&z(ml), &z(wrong(gl)), shape, MapLayout::Hwc, &mut z(ol)),
            _ => grid_sample_forward(&z(ml), &z(gl), shape, MapLayout::Hwc, &mut z(wrong(ol))),
        };
        prop_assert!(expect(res, ["map", "grid", "out"][which], [ml, gl, ol][which]));
        // layer norm: gamma
        let res = layer_norm_forward(&z(n), &z(wrong(c)), &z(c), r, c, 1e-5, &mut z(n), &mut z(r), &mut z(r));
        prop_assert!(expect(res, "gamma", c));
        // relation CE: teacher
        let res = relation_cross_entropy(&z(n), &z(wrong(n)), r, c, 1.0, 0.5).map(|_| ());
        prop_assert!(expect(res, "teacher", n));
        // linear: weight (out = 3)
        let res = linear_forward(&z(n), &z(wrong(3 * c)), None, r, c, 3, &mut z(3 * r));
        prop_assert!(expect(res, "weight", 3 * c));
        // GELU, AdamW, EMA
        prop_assert!(expect(activation::gelu_forward(&z(n), &mut z(wrong(n))), "out", n));
        let opt = AdamW::default();
        prop_assert!(expect(adamw_step(&mut z(n), &z(wrong(n)), &mut z(n), &mut z(n), &opt, 1), "grads", n));
        prop_assert!(expect(ema_update(&mut z(n), &z(wrong(n)), 0.9), "student", n));
    }
}

// --------------------------------------------------------------- optimizer

proptest! {
    #![proptest_config(config())]

    /// AdamW with lr = 0 and wd = 0 leaves the parameters bit-identical
    /// (while the moments still move); with lr > 0 the first step moves each
    /// parameter by about `lr` against its gradient's sign.
    #[test]
    fn adamw_zero_lr_is_identity(
        p in vec(-3f32..3.0, 1..40), gseed in vec(-1f32..1.0, 40), lr in 1e-4f32..1e-2, step in 1u32..100,
    ) {
        let n = p.len();
        let g: Vec<f32> = gseed[..n].iter().map(|&v| if v.abs() < 1e-3 { 0.5 } else { v }).collect();
        let (mut q, mut m, mut v) = (p.clone(), vec![0.1f32; n], vec![0.2f32; n]);
        let opt = AdamW { lr: 0.0, weight_decay: 0.0, ..AdamW::default() };
        adamw_step(&mut q, &g, &mut m, &mut v, &opt, step).unwrap();
        prop_assert_eq!(&q, &p);
        prop_assert!(m.iter().any(|&x| x != 0.1));
        let (mut q, mut m, mut v) = (p.clone(), vec![0.0f32; n], vec![0.0f32; n]);
        let opt = AdamW { lr, weight_decay: 0.0, ..AdamW::default() };
        adamw_step(&mut q, &g, &mut m, &mut v, &opt, 1).unwrap();
        for i in 0..n {
            let want = p[i] - lr * g[i].signum();
            prop_assert!((q[i] - want).abs() < 1e-3 * lr + 1e-6, "{} vs {}", q[i], want);
        }
    }

    /// EMA momentum 1 keeps the teacher, momentum 0 copies the student, and
    /// anything in between stays between the two.
    #[test]
    fn ema_extremes(
        t0 in vec(-5f32..5.0, 1..30), sseed in vec(-5f32..5.0, 30), mom in 0f32..1.0,
    ) {
        let s = &sseed[..t0.len()];
        let mut t = t0.clone();
        ema_update(&mut t, s, 1.0).unwrap();
        prop_assert_eq!(&t, &t0);
        ema_update(&mut t, s, 0.0).unwrap();
        prop_assert_eq!(&t[..], s);
        let mut t = t0.clone();
        ema_update(&mut t, s, mom).unwrap();
        for i in 0..t.len() {
            let (lo, hi) = (t0[i].min(s[i]), t0[i].max(s[i]));
            prop_assert!(t[i] >= lo - 1e-6 && t[i] <= hi + 1e-6);
            let want = mom as f64 * t0[i] as f64 + (1.0 - mom as f64) * s[i] as f64;
            prop_assert!(close(t[i] as f64, want, 1e-6, 1e-5));
        }
    }

    /// After clipping the norm is at most `max_norm` (+ rounding); the
    /// returned value is the norm before clipping; small gradients are left
    /// alone and large ones keep their direction.
    #[test]
    fn clip_grad_norm_bounds(
        g0 in vec(-1f32..1.0, 1..50), log_scale in -3f32..3.0, max_norm in 0.01f32..10.0,
    ) {
        let k = 10f32.powf(log_scale);
        let g0: Vec<f32> = g0.iter().map(|&v| v * k).collect();
        let mut g = g0.clone();
        let before = clip_grad_norm(&mut g, max_norm).unwrap();
        prop_assert!(close(before as f64, l2_norm(&g0) as f64, 0.0, 1e-6));
        let after = l2_norm(&g);
        prop_assert!(after <= max_norm * (1.0 + 1e-5) + 1e-6, "{} > {}", after, max_norm);
        if before <= max_norm {
            prop_assert_eq!(&g, &g0);
        } else {
            let c = max_norm as f64 / (before as f64 + 1e-6);
            for (&u, &v) in g.iter().zip(&g0) {
                prop_assert!(close(u as f64, c * v as f64, 1e-9, 1e-5));
            }
            prop_assert!(close(after as f64, max_norm as f64, 1e-6, 1e-4));
        }
    }
}

/// Regression (found by fuzz/relation_loss): with `tau_s` at the smallest
/// normal float, the DINO gradient summed over teacher views overflowed to
/// infinity while the call returned `Ok`. Every cross-entropy backward now
/// reports a non-finite accumulated gradient as an error.
#[test]
fn ce_backwards_reject_non_finite_gradients() {
    // Student rows one-hot at tau_s = MIN_POSITIVE, teacher one-hot elsewhere:
    // each (teacher, student) term adds about f = scale / (pairs batch tau_s)
    // = 2.5e38 to the local view's gradient, and its two teachers sum to 5e38.
    let shape = DinoShape {
        student_views: 3,
        teacher_views: 2,
        batch: 1,
        dim: 3,
    };
    let s = [1.0f32, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0];
    let t = [0.0f32, 1.0, 0.0, 0.0, 1.0, 0.0];
    let mut g = [0.0f32; 9];
    let res = dino_loss_backward(
        &s,
        &t,
        &[0.0; 3],
        shape,
        f32::MIN_POSITIVE,
        0.04,
        12.0,
        &mut g,
    );
    assert!(matches!(res, Err(Error::NonFinite { .. })), "{res:?} {g:?}");

    let mut g = [0.0f32, f32::NAN, 0.0];
    let res = relation_cross_entropy_backward(&s[..3], &t[..3], 1, 3, 1.0, 1.0, 1.0, &mut g);
    assert!(matches!(res, Err(Error::NonFinite { .. })), "{res:?}");
    let mut g = [f32::INFINITY, 0.0, 0.0];
    let q = [0.2f32, 0.3, 0.5];
    let res = soft_target_cross_entropy(&s[..3], &q, 1, 3, 1.0, Some((&mut g, 1.0)));
    assert!(matches!(res, Err(Error::NonFinite { .. })), "{res:?}");
}
