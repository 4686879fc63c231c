//! Central finite differences of every backward kernel.
//!
//! For a forward `y = f(x)` and a random upstream gradient `w`, the backward
//! kernel's result must equal the gradient of the scalar objective
//! `sum(w * f(x))` (for the losses: the loss itself), estimated as
//! `(F(x + h e_i) - F(x - h e_i)) / 2h` with `F` accumulated in f64 from the
//! kernel's f32 outputs. Tolerances are in [`common::FdTol`]; every check
//! also asserts that the same comparison *rejects* the analytic gradient
//! with its sign flipped, doubled and halved, so none of these tests can pass
//! vacuously.

mod common;

use common::{compare_grad, dot, finite_diff, FdTol, Rng};
use sere_core::{
    activation, bilinear,
    bilinear::{MapLayout, SampleShape},
    linalg, loss, norm, relation, softmax,
};

/// Checks `analytic` against finite differences of `f` at `x`, and checks
/// that the comparison fails for `-analytic`, `2 analytic` and
/// `analytic / 2`.
fn assert_grad(what: &str, x: &[f32], analytic: &[f32], tol: FdTol, f: impl FnMut(&[f32]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let fd = finite_diff(x, tol.step, f);
    if let Err(e) = compare_grad(what, analytic, &fd, tol) {
        panic!("{e}");
    }
    for (label, k) in [("negated", -1.0f32), ("doubled", 2.0), ("halved", 0.5)] {
        let wrong: Vec<f32> = analytic.iter().map(|&g| g * k).collect();
        assert!(
            compare_grad(what, &wrong, &fd, tol).is_err(),
            "{what}: the finite-difference check accepts a {label} gradient"
        );
    }
}

/// A grid of `p` points whose unnormalized coordinates `ix`, `iy` sit at
/// least 0.2 pixel away from every integer (the kinks of bilinear
/// interpolation, including the map's edges at -1 and W - 1), ranging from
/// partly outside the map (-1 < ix < 0) to fully outside (beyond W).
fn smooth_grid(rng: &mut Rng, p: usize, h: usize, w: usize) -> Vec<f32> {
    let coord = |rng: &mut Rng, size: usize| {
        // Integer part in [-2, size]: -2 and size are fully outside.
        let k = (rng.uniform() * (size + 3) as f64).floor() - 2.0;
        let i = k + rng.range(0.2, 0.8);
        ((2.0 * i + 1.0) / size as f64 - 1.0) as f32
    };
    (0..p)
        .flat_map(|_| {
            let gx = coord(rng, w);
            let gy = coord(rng, h);
            [gx, gy]
        })
        .collect()
}

fn bilinear_case(layout: MapLayout, seed: u64) {
    let mut rng = Rng::new(seed);
    let shape = SampleShape {
        channels: 3,
        height: 4,
        width: 5,
        points: 12,
    };
    let map = rng.normals(shape.map_len(), 1.0);
    let grid = smooth_grid(&mut rng, shape.points, shape.height, shape.width);
    let w = rng.normals(shape.out_len(), 1.0);
    let objective = |m: &[f32], g: &[f32]| {
        let mut out = vec![0.0f32; shape.out_len()];
        bilinear::grid_sample_forward(m, g, shape, layout, &mut out).unwrap();
        dot(&w, &out)
    };
    let (mut gmap, mut ggrid) = (vec![0.0f32; map.len()], vec![0.0f32; grid.len()]);
    bilinear::grid_sample_backward(&map, &grid, &w, shape, layout, &mut gmap, Some(&mut ggrid))
        .unwrap();
    // The objective is linear in the map: central differences are exact up
    // to rounding.
    assert_grad(
        &format!("{layout:?} grad_map"),
        &map,
        &gmap,
        FdTol::default(),
        |m| objective(m, &grid),
    );
    // Along one grid coordinate it is linear within a cell; a step of 1e-3
    // moves ix by 1e-3 * W / 2 = 2.5e-3 pixel, well inside the 0.2-pixel
    // margin around every kink.
    let tol = FdTol {
        step: 1e-3,
        ..FdTol::default()
    };
    assert_grad(&format!("{layout:?} grad_grid"), &grid, &ggrid, tol, |g| {
        objective(&map, g)
    });
}

#[test]
fn bilinear_chw() {
    bilinear_case(MapLayout::Chw, 1);
}

#[test]
fn bilinear_hwc() {
    bilinear_case(MapLayout::Hwc, 2);
}

#[test]
fn spatial_relation() {
    let mut rng = Rng::new(3);
    let (n, c, heads) = (6, 8, 2);
    let x = rng.normals(n * c, 1.0);
    let w = rng.normals(heads * n * n, 1.0);
    let mut gx = vec![0.0f32; x.len()];
    relation::spatial_relation_backward(&x, &w, n, c, heads, &mut gx).unwrap();
    assert_grad("spatial relation", &x, &gx, FdTol::default(), |x| {
        let mut l = vec![0.0f32; heads * n * n];
        relation::spatial_relation_forward(x, n, c, heads, &mut l).unwrap();
        dot(&w, &l)
    });
}

#[test]
fn channel_relation() {
    let mut rng = Rng::new(4);
    let (n, c) = (7, 5);
    let x = rng.normals(n * c, 1.0);
    let w = rng.normals(c * c, 1.0);
    let mut gx = vec![0.0f32; x.len()];
    relation::channel_relation_backward(&x, &w, n, c, &mut gx).unwrap();
    assert_grad("channel relation", &x, &gx, FdTol::default(), |x| {
        let mut l = vec![0.0f32; c * c];
        relation::channel_relation_forward(x, n, c, &mut l).unwrap();
        dot(&w, &l)
    });
}

#[test]
fn softmax_backward() {
    let mut rng = Rng::new(5);
    let (rows, cols) = (3, 5);
    let x = rng.normals(rows * cols, 1.5);
    let w = rng.normals(rows * cols, 1.0);
    let mut y = vec![0.0f32; x.len()];
    softmax::softmax_rows(&x, rows, cols, &mut y).unwrap();
    let mut dx = vec![0.0f32; x.len()];
    softmax::softmax_backward_rows(&y, &w, rows, cols, &mut dx).unwrap();
    assert_grad("softmax", &x, &dx, FdTol::default(), |x| {
        let mut y = vec![0.0f32; x.len()];
        softmax::softmax_rows(x, rows, cols, &mut y).unwrap();
        dot(&w, &y)
    });
}

#[test]
fn log_softmax_backward() {
    let mut rng = Rng::new(6);
    let (rows, cols) = (3, 5);
    let x = rng.normals(rows * cols, 1.5);
    let w = rng.normals(rows * cols, 1.0);
    let mut l = vec![0.0f32; x.len()];
    softmax::log_softmax_rows(&x, rows, cols, &mut l).unwrap();
    let mut dx = vec![0.0f32; x.len()];
    softmax::log_softmax_backward_rows(&l, &w, rows, cols, &mut dx).unwrap();
    assert_grad("log-softmax", &x, &dx, FdTol::default(), |x| {
        let mut l = vec![0.0f32; x.len()];
        softmax::log_softmax_rows(x, rows, cols, &mut l).unwrap();
        dot(&w, &l)
    });
}

/// The loss is returned as f32 (~1e-7 relative), so the step must not be
/// tiny; but the curvature grows like 1/tau_s^2, so the step shrinks with
/// tau_s: h = 3e-2 tau_s keeps the truncation error O((h / tau_s)^2) ~ 1e-3
/// while the rounding noise stays ~1e-7 |loss| / h ~ 1e-4 of the gradient.
fn ce_tol(tau_s: f32) -> FdTol {
    FdTol {
        step: 3e-2 * tau_s as f64,
        ..FdTol::default()
    }
}

#[test]
fn relation_cross_entropy() {
    let mut rng = Rng::new(7);
    let (rows, cols) = (4, 6);
    for (tau_s, tau_t) in [(1.0f32, 0.5f32), (0.1, 0.04), (1.0, 0.1)] {
        let s = rng.normals(rows * cols, 1.0);
        let t = rng.normals(rows * cols, 1.0);
        let mut g = vec![0.0f32; s.len()];
        loss::relation_cross_entropy_backward(&s, &t, rows, cols, tau_s, tau_t, 1.0, &mut g)
            .unwrap();
        assert_grad(
            &format!("relation CE tau_s {tau_s} tau_t {tau_t}"),
            &s,
            &g,
            ce_tol(tau_s),
            |s| loss::relation_cross_entropy(s, &t, rows, cols, tau_s, tau_t).unwrap() as f64,
        );
        // `scale` multiplies the gradient (and only the gradient).
        let mut g3 = vec![0.0f32; s.len()];
        loss::relation_cross_entropy_backward(&s, &t, rows, cols, tau_s, tau_t, 3.0, &mut g3)
            .unwrap();
        for (a, b) in g3.iter().zip(&g) {
            assert!((a - 3.0 * b).abs() <= 1e-6 * (1.0 + b.abs() * 3.0));
        }
    }
}

#[test]
fn soft_target_cross_entropy() {
    let mut rng = Rng::new(17);
    let (rows, cols) = (3, 7);
    // A normalised target and one with total mass 1.7 (the gradient's
    // `mass * p - q` form holds for any non-negative target).
    for (tau_s, mass) in [(1.0f32, 1.0f32), (0.1, 1.0), (0.5, 1.7)] {
        let s = rng.normals(rows * cols, 1.0);
        let mut q: Vec<f32> = rng
            .normals(rows * cols, 1.0)
            .iter()
            .map(|v| v.exp())
            .collect();
        for row in q.chunks_mut(cols) {
            let z: f32 = row.iter().sum();
            row.iter_mut().for_each(|v| *v *= mass / z);
        }
        let mut g = vec![0.0f32; s.len()];
        loss::soft_target_cross_entropy(&s, &q, rows, cols, tau_s, Some((&mut g, 1.0))).unwrap();
        assert_grad(
            &format!("soft-target CE tau_s {tau_s} mass {mass}"),
            &s,
            &g,
            ce_tol(tau_s),
            |s| loss::soft_target_cross_entropy(s, &q, rows, cols, tau_s, None).unwrap() as f64,
        );
    }
}

#[test]
fn dino_loss() {
    let mut rng = Rng::new(8);
    let shape = loss::DinoShape {
        student_views: 3,
        teacher_views: 2,
        batch: 2,
        dim: 6,
    };
    let (tau_s, tau_t) = (0.1f32, 0.04f32);
    let s = rng.normals(3 * 2 * 6, 0.3);
    let t = rng.normals(2 * 2 * 6, 0.1);
    let centre = rng.normals(6, 0.05);
    let mut g = vec![0.0f32; s.len()];
    loss::dino_loss_backward(&s, &t, &centre, shape, tau_s, tau_t, 1.0, &mut g).unwrap();
    assert_grad("DINO loss", &s, &g, ce_tol(tau_s), |s| {
        loss::dino_loss(s, &t, &centre, shape, tau_s, tau_t).unwrap() as f64
    });
}

#[test]
fn weighted_cross_entropy() {
    let mut rng = Rng::new(21);
    let (rows, dim, tau_s, tau_t) = (6, 5, 0.1f32, 0.04f32);
    let s = rng.normals(rows * dim, 0.3);
    let t = rng.normals(rows * dim, 0.1);
    let centre = rng.normals(dim, 0.05);
    let masks = [true, false, true, true, false, false];
    let mut w = vec![0.0f32; rows];
    loss::masked_patch_weights(&masks, 3, &mut w).unwrap();
    let mut g = vec![0.0f32; s.len()];
    loss::weighted_cross_entropy(
        &s,
        &t,
        &centre,
        &w,
        rows,
        dim,
        tau_s,
        tau_t,
        Some((&mut g, 1.0)),
    )
    .unwrap();
    // Unmasked rows get exactly nothing.
    for (r, &m) in masks.iter().enumerate() {
        assert_eq!(g[r * dim..(r + 1) * dim].iter().any(|&v| v != 0.0), m);
    }
    assert_grad("weighted cross-entropy", &s, &g, ce_tol(tau_s), |s| {
        loss::weighted_cross_entropy(s, &t, &centre, &w, rows, dim, tau_s, tau_t, None).unwrap()
            as f64
    });
}

#[test]
fn layer_norm() {
    let mut rng = Rng::new(9);
    let (rows, cols, eps) = (3, 6, 1e-5f32);
    let x = rng.normals(rows * cols, 1.0);
    let gamma: Vec<f32> = rng.normals(cols, 0.3).iter().map(|g| g + 1.0).collect();
    let beta = rng.normals(cols, 0.3);
    let w = rng.normals(rows * cols, 1.0);
    let forward = |x: &[f32], g: &[f32], b: &[f32]| {
        let (mut y, mut m, mut r) = (vec![0.0f32; rows * cols], vec![0.0; rows], vec![0.0; rows]);
        norm::layer_norm_forward(x, g, b, rows, cols, eps, &mut y, &mut m, &mut r).unwrap();
        (y, m, r)
    };
    let (_, mean, rstd) = forward(&x, &gamma, &beta);
    let (mut dx, mut dg, mut db) = (
        vec![0.0f32; x.len()],
        vec![0.0f32; cols],
        vec![0.0f32; cols],
    );
    norm::layer_norm_backward(
        &x, &gamma, &mean, &rstd, &w, rows, cols, &mut dx, &mut dg, &mut db,
    )
    .unwrap();
    let tol = FdTol {
        step: 3e-3,
        ..FdTol::default()
    };
    assert_grad("layer norm dx", &x, &dx, tol, |x| {
        dot(&w, &forward(x, &gamma, &beta).0)
    });
    assert_grad("layer norm dgamma", &gamma, &dg, tol, |g| {
        dot(&w, &forward(&x, g, &beta).0)
    });
    assert_grad("layer norm dbeta", &beta, &db, tol, |b| {
        dot(&w, &forward(&x, &gamma, b).0)
    });
}

#[test]
fn gelu() {
    let mut rng = Rng::new(10);
    let mut x = rng.normals(16, 2.0);
    x.extend([-4.0f32, -1.0, -0.3, 0.0, 0.7, 3.5]);
    let w = rng.normals(x.len(), 1.0);
    let mut dx = vec![0.0f32; x.len()];
    activation::gelu_backward(&x, &w, &mut dx).unwrap();
    let tol = FdTol {
        step: 3e-3,
        ..FdTol::default()
    };
    assert_grad("gelu", &x, &dx, tol, |x| {
        let mut y = vec![0.0f32; x.len()];
        activation::gelu_forward(x, &mut y).unwrap();
        dot(&w, &y)
    });
}

#[test]
fn batch_norm() {
    let mut rng = Rng::new(11);
    let (rows, cols, eps) = (8, 3, 1e-5f32);
    let x = rng.normals(rows * cols, 1.0);
    let gamma: Vec<f32> = rng.normals(cols, 0.3).iter().map(|g| g + 1.0).collect();
    let beta = rng.normals(cols, 0.3);
    let w = rng.normals(rows * cols, 1.0);
    let forward = |x: &[f32], g: &[f32], b: &[f32]| {
        let mut y = vec![0.0f32; rows * cols];
        let (mut m, mut v, mut r) = (vec![0.0; cols], vec![0.0; cols], vec![0.0; cols]);
        norm::batch_norm_forward(x, g, b, rows, cols, eps, &mut y, &mut m, &mut v, &mut r).unwrap();
        (y, m, r)
    };
    let (_, mean, rstd) = forward(&x, &gamma, &beta);
    let (mut dx, mut dg, mut db) = (
        vec![0.0f32; x.len()],
        vec![0.0f32; cols],
        vec![0.0f32; cols],
    );
    let mut scratch = vec![0.0f32; 2 * cols];
    norm::batch_norm_backward(
        &x,
        &gamma,
        &mean,
        &rstd,
        &w,
        rows,
        cols,
        &mut dx,
        &mut dg,
        &mut db,
        &mut scratch,
    )
    .unwrap();
    let tol = FdTol {
        step: 3e-3,
        ..FdTol::default()
    };
    assert_grad("batch norm dx", &x, &dx, tol, |x| {
        dot(&w, &forward(x, &gamma, &beta).0)
    });
    assert_grad("batch norm dgamma", &gamma, &dg, tol, |g| {
        dot(&w, &forward(&x, g, &beta).0)
    });
    assert_grad("batch norm dbeta", &beta, &db, tol, |b| {
        dot(&w, &forward(&x, &gamma, b).0)
    });
}

#[test]
fn linear() {
    let mut rng = Rng::new(12);
    let (rows, inp, out) = (4, 5, 3);
    let x = rng.normals(rows * inp, 1.0);
    let wt = rng.normals(out * inp, 0.5);
    let b = rng.normals(out, 0.5);
    let w = rng.normals(rows * out, 1.0);
    let forward = |x: &[f32], wt: &[f32], b: &[f32]| {
        let mut y = vec![0.0f32; rows * out];
        linalg::linear_forward(x, wt, Some(b), rows, inp, out, &mut y).unwrap();
        dot(&w, &y)
    };
    let (mut dx, mut dw, mut db) = (
        vec![0.0f32; x.len()],
        vec![0.0f32; wt.len()],
        vec![0.0f32; out],
    );
    linalg::linear_backward(
        &x,
        &wt,
        &w,
        rows,
        inp,
        out,
        Some(&mut dx),
        Some(&mut dw),
        Some(&mut db),
    )
    .unwrap();
    let tol = FdTol::default();
    assert_grad("linear dx", &x, &dx, tol, |x| forward(x, &wt, &b));
    assert_grad("linear dweight", &wt, &dw, tol, |wt| forward(&x, wt, &b));
    assert_grad("linear dbias", &b, &db, tol, |b| forward(&x, &wt, b));
}

/// The checker itself: a gradient with one wrong element (a transposed
/// index, say) must be caught by the per-element test even when the vector
/// norm barely moves.
#[test]
fn checker_catches_a_single_wrong_element() {
    let mut rng = Rng::new(13);
    let (n, c) = (7, 5);
    let x = rng.normals(n * c, 1.0);
    let w = rng.normals(c * c, 1.0);
    let mut gx = vec![0.0f32; x.len()];
    relation::channel_relation_backward(&x, &w, n, c, &mut gx).unwrap();
    let fd = finite_diff(&x, 1e-2, |x| {
        let mut l = vec![0.0f32; c * c];
        relation::channel_relation_forward(x, n, c, &mut l).unwrap();
        dot(&w, &l)
    });
    assert!(compare_grad("exact", &gx, &fd, FdTol::default()).is_ok());
    let (i, _) = gx
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
        .unwrap();
    let mut wrong = gx.clone();
    wrong[i] *= -1.0;
    assert!(compare_grad("one flipped", &wrong, &fd, FdTol::default()).is_err());
}
