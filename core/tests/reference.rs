//! Every core operation against independent PyTorch float64 references.
//!
//! The fixtures in `tests/fixtures/*.txt` are written by
//! `tests/fixtures/gen_fixtures.py` (PyTorch float64 + numpy, no Rust); this
//! test only reads them. Inputs were rounded to f32 by the generator, so the
//! kernels see exactly the inputs PyTorch saw.
//!
//! Default tolerance: `|got - want| <= atol + 1e-5 |want|` with
//! `atol = 1e-5 max|want|` over the compared array. Looser bounds are
//! justified where they are used. Backward kernels accumulate, so their
//! buffers start from a non-zero [`common::prefill`] and the prefill is
//! subtracted before comparing.

mod common;

use common::{
    check_close, check_close_abs, close, close_accumulated, close_scalar, load, max_abs, prefill,
    Report, RTOL,
};
use sere_core::{
    activation, bilinear, geometry, linalg, loss, norm, optim, relation, schedule, softmax,
};

#[test]
fn geometry_overlap_grids() {
    let mut rep = Report::new();
    for c in load("geometry") {
        let crop = |key: &str| {
            let v = c.f32s(key);
            geometry::CropBox::new(v[0], v[1], v[2], v[3], v[4] != 0.0).unwrap()
        };
        let (a, b) = (crop("crop_a"), crop("crop_b"));
        let (hs, ws) = (c.usize("hs"), c.usize("ws"));
        let placement = match c.usize("placement") {
            0 => geometry::GridPlacement::CellCentres,
            _ => geometry::GridPlacement::EdgeToEdge,
        };
        // Sentinel contents: a non-overlapping pair must leave them alone.
        let (mut ga, mut gb) = (vec![7.0f32; hs * ws * 2], vec![-7.0f32; hs * ws * 2]);
        let Some(r) = rep.ok(
            &c.name,
            geometry::overlap_grids(&a, &b, hs, ws, placement, &mut ga, &mut gb),
        ) else {
            continue;
        };
        rep.check(&c.name, {
            let overlap_fn = geometry::overlap(&a, &b);
            if overlap_fn == r {
                Ok(())
            } else {
                Err(format!("overlap() {overlap_fn:?} != overlap_grids {r:?}"))
            }
        });
        match (r, c.flag("overlap")) {
            (None, false) => rep.check(
                &c.name,
                if ga.iter().all(|&v| v == 7.0) && gb.iter().all(|&v| v == -7.0) {
                    Ok(())
                } else {
                    Err("grids written for a non-overlapping pair".into())
                },
            ),
            (Some(r), true) => {
                // Source-pixel coordinates: min/max of f32 inputs are exact.
                rep.check(
                    &c.name,
                    close("rect", &[r.x0, r.y0, r.x1, r.y1], c.f64s("rect")),
                );
                // Grid values lie in [-1, 1]; the f32 kernel maps source
                // coordinates up to ~500 px (ulp 3e-5) through crops of
                // >= 40 px, i.e. ~1e-6 in normalized units, and the
                // overlap-fraction products add a few ulps of 1. An absolute
                // 1e-5 (the default atol for max|ref| = 1) covers that.
                rep.check(
                    &c.name,
                    check_close_abs("grid_a", &ga, c.f64s("grid_a"), RTOL, 1e-5),
                );
                rep.check(
                    &c.name,
                    check_close_abs("grid_b", &gb, c.f64s("grid_b"), RTOL, 1e-5),
                );
            }
            (r, want) => rep.check(
                &c.name,
                Err(format!(
                    "overlap: kernel {r:?}, reference overlaps = {want}"
                )),
            ),
        }
    }
    rep.finish("geometry");
}

#[test]
fn bilinear_grid_sample() {
    let mut rep = Report::new();
    for c in load("bilinear") {
        let layout = match c.usize("layout") {
            0 => bilinear::MapLayout::Chw,
            _ => bilinear::MapLayout::Hwc,
        };
        let shape = bilinear::SampleShape {
            channels: c.usize("channels"),
            height: c.usize("height"),
            width: c.usize("width"),
            points: c.usize("points"),
        };
        let (map, grid, gout) = (c.f32s("map"), c.f32s("grid"), c.f32s("grad_out"));
        let mut out = vec![f32::NAN; shape.out_len()];
        if rep
            .ok(
                &c.name,
                bilinear::grid_sample_forward(&map, &grid, shape, layout, &mut out),
            )
            .is_none()
        {
            continue;
        }
        rep.check(&c.name, close("out", &out, c.f64s("out")));
        let mut gmap = prefill(map.len());
        let mut ggrid = prefill(grid.len());
        rep.ok(
            &c.name,
            bilinear::grid_sample_backward(
                &map,
                &grid,
                &gout,
                shape,
                layout,
                &mut gmap,
                Some(&mut ggrid),
            ),
        );
        rep.check(
            &c.name,
            close_accumulated("grad_map", &gmap, c.f64s("grad_map")),
        );
        rep.check(
            &c.name,
            close_accumulated("grad_grid", &ggrid, c.f64s("grad_grid")),
        );
        // Without the grid gradient the map gradient is the same.
        let mut gmap_only = vec![0.0f32; map.len()];
        rep.ok(
            &c.name,
            bilinear::grid_sample_backward(&map, &grid, &gout, shape, layout, &mut gmap_only, None),
        );
        rep.check(
            &c.name,
            close("grad_map (no grid grad)", &gmap_only, c.f64s("grad_map")),
        );
    }
    rep.finish("bilinear");
}

#[test]
fn spatial_and_channel_relations() {
    let mut rep = Report::new();
    for c in load("relation") {
        let (n, ch, heads) = (c.usize("n"), c.usize("c"), c.usize("heads"));
        let (x, g) = (c.f32s("x"), c.f32s("grad_logits"));
        let spatial = c.usize("kind") == 0;
        let mut logits = vec![f32::NAN; c.f64s("logits").len()];
        let mut gx = prefill(x.len());
        if spatial {
            rep.ok(
                &c.name,
                relation::spatial_relation_forward(&x, n, ch, heads, &mut logits),
            );
            rep.ok(
                &c.name,
                relation::spatial_relation_backward(&x, &g, n, ch, heads, &mut gx),
            );
        } else {
            rep.ok(
                &c.name,
                relation::channel_relation_forward(&x, n, ch, &mut logits),
            );
            rep.ok(
                &c.name,
                relation::channel_relation_backward(&x, &g, n, ch, &mut gx),
            );
        }
        rep.check(&c.name, close("logits", &logits, c.f64s("logits")));
        rep.check(&c.name, close_accumulated("grad_x", &gx, c.f64s("grad_x")));
    }
    rep.finish("relation");
}

#[test]
fn softmax_and_log_softmax() {
    let mut rep = Report::new();
    for c in load("softmax") {
        let (rows, cols) = (c.usize("rows"), c.usize("cols"));
        let (x, dy) = (c.f32s("x"), c.f32s("dy"));
        let mut y = vec![f32::NAN; x.len()];
        let mut l = vec![f32::NAN; x.len()];
        rep.ok(&c.name, softmax::softmax_rows(&x, rows, cols, &mut y));
        rep.ok(&c.name, softmax::log_softmax_rows(&x, rows, cols, &mut l));
        rep.check(&c.name, close("softmax", &y, c.f64s("softmax")));
        // Log-probabilities: the f32 kernel forms `(x - max) - lse` with one
        // rounding of `x - max`, which for logits of magnitude 1e4 is exact
        // (Sterbenz) or bounded by ulp(|x - max|) ~ 1e-3 for differences of
        // ~2e4 -- far below 1e-5 of max|ref| (~2e4) in those cases.
        rep.check(&c.name, close("log_softmax", &l, c.f64s("log_softmax")));
        let mut yi = x.clone();
        rep.ok(&c.name, softmax::softmax_rows_in_place(&mut yi, rows, cols));
        rep.check(&c.name, close("softmax in place", &yi, c.f64s("softmax")));
        let mut dx = prefill(x.len());
        rep.ok(
            &c.name,
            softmax::softmax_backward_rows(&y, &dy, rows, cols, &mut dx),
        );
        rep.check(
            &c.name,
            close_accumulated("dx softmax", &dx, c.f64s("dx_softmax")),
        );
        let mut dxl = prefill(x.len());
        rep.ok(
            &c.name,
            softmax::log_softmax_backward_rows(&l, &dy, rows, cols, &mut dxl),
        );
        rep.check(
            &c.name,
            close_accumulated("dx log_softmax", &dxl, c.f64s("dx_log_softmax")),
        );
    }
    rep.finish("softmax");
}

#[test]
fn relation_cross_entropy() {
    let mut rep = Report::new();
    for c in load("relation_ce") {
        let (rows, cols) = (c.usize("rows"), c.usize("cols"));
        let (s, t) = (c.f32s("student"), c.f32s("teacher"));
        let (tau_s, tau_t, scale) = (c.f32("tau_s"), c.f32("tau_t"), c.f32("scale"));
        let (want_loss, want_grad) = (c.scalar("loss"), c.f64s("grad"));
        // Tolerances. Small logits: the default 1e-5. Large logits (|x| ~
        // 1e4) with a temperature that is not a power of two: the kernel
        // scales by 1/tau in f32 before subtracting the row maximum (as
        // PyTorch in f32 does with `x / tau`), so each scaled logit carries
        // an absolute error up to delta = eps_f32 * max|x| / tau (the
        // reference scales exactly in f64); with tau = 0.1 and |x| ~ 1e4
        // that is ~1e-2. The loss is a sum of such terms (error <= ~2 delta
        // on top of 1e-5 relative); the probabilities, and so the gradient
        // (p - q) scale / (tau_s rows), move by at most ~2 delta relative,
        // i.e. an absolute 2 delta scale / (tau_s rows). Powers of two
        // scale exactly, and then the default applies.
        let inexact = |tau: f32, key: &str| {
            if c.flag("large") && tau.to_bits() & 0x007f_ffff != 0 {
                max_abs(c.f64s(key)) / tau as f64 * f32::EPSILON as f64
            } else {
                0.0
            }
        };
        let delta = inexact(tau_s, "student").max(inexact(tau_t, "teacher"));
        let loss_tol = |got: f32| {
            check_close_abs(
                "loss",
                &[got],
                &[want_loss],
                RTOL,
                RTOL * want_loss.abs() + 2.0 * delta,
            )
        };
        let grad_atol =
            RTOL * max_abs(want_grad) + 2.0 * delta * scale as f64 / (tau_s as f64 * rows as f64);
        let Some(l) = rep.ok(
            &c.name,
            loss::relation_cross_entropy(&s, &t, rows, cols, tau_s, tau_t),
        ) else {
            continue;
        };
        rep.check(&c.name, loss_tol(l));
        let mut g = prefill(s.len());
        let Some(l2) = rep.ok(
            &c.name,
            loss::relation_cross_entropy_backward(&s, &t, rows, cols, tau_s, tau_t, scale, &mut g),
        ) else {
            continue;
        };
        rep.check(&c.name, loss_tol(l2));
        let pre = prefill(g.len());
        let recovered: Vec<f32> = g.iter().zip(&pre).map(|(a, b)| a - b).collect();
        // Subtracting the prefill costs at most ulp(0.5) / 2 ~ 3e-8 more.
        rep.check(
            &c.name,
            check_close_abs("grad", &recovered, want_grad, RTOL, grad_atol + 3e-8),
        );
    }
    rep.finish("relation cross-entropy");
}

#[test]
fn dino_loss_and_centre() {
    let mut rep = Report::new();
    for c in load("dino") {
        let shape = loss::DinoShape {
            student_views: c.usize("student_views"),
            teacher_views: c.usize("teacher_views"),
            batch: c.usize("batch"),
            dim: c.usize("dim"),
        };
        let (s, t, centre) = (c.f32s("student"), c.f32s("teacher"), c.f32s("centre"));
        let (tau_s, tau_t, scale) = (c.f32("tau_s"), c.f32("tau_t"), c.f32("scale"));
        if let Some(l) = rep.ok(
            &c.name,
            loss::dino_loss(&s, &t, &centre, shape, tau_s, tau_t),
        ) {
            rep.check(&c.name, close_scalar("loss", l, c.scalar("loss"), RTOL));
        }
        let mut g = prefill(s.len());
        if let Some(l) = rep.ok(
            &c.name,
            loss::dino_loss_backward(&s, &t, &centre, shape, tau_s, tau_t, scale, &mut g),
        ) {
            rep.check(
                &c.name,
                close_scalar("loss (backward)", l, c.scalar("loss"), RTOL),
            );
        }
        rep.check(&c.name, close_accumulated("grad", &g, c.f64s("grad")));
        let mut centre_new = centre.clone();
        let rows = shape.teacher_views * shape.batch;
        rep.ok(
            &c.name,
            loss::dino_centre_update(&t, rows, shape.dim, c.f32("momentum"), &mut centre_new),
        );
        rep.check(&c.name, close("centre", &centre_new, c.f64s("centre_new")));
    }
    rep.finish("dino");
}

#[test]
fn masked_patch_loss_and_centre() {
    let mut rep = Report::new();
    for c in load("mim") {
        let (views, batch, patches, dim) = (
            c.usize("views"),
            c.usize("batch"),
            c.usize("patches"),
            c.usize("dim"),
        );
        let rows = views * batch * patches;
        let (s, t, centre) = (c.f32s("student"), c.f32s("teacher"), c.f32s("centre"));
        let (tau_s, tau_t, scale) = (c.f32("tau_s"), c.f32("tau_t"), c.f32("scale"));
        let masks: Vec<bool> = c.f32s("masks").iter().map(|&m| m == 1.0).collect();
        // The mean over views of the image means is the mean over all
        // `views x batch` images: one weight vector covers both.
        let mut w = vec![f32::NAN; rows];
        rep.ok(&c.name, loss::masked_patch_weights(&masks, patches, &mut w));
        if let Some(l) = rep.ok(
            &c.name,
            loss::weighted_cross_entropy(&s, &t, &centre, &w, rows, dim, tau_s, tau_t, None),
        ) {
            rep.check(&c.name, close_scalar("loss", l, c.scalar("loss"), RTOL));
        }
        let mut g = prefill(s.len());
        if let Some(l) = rep.ok(
            &c.name,
            loss::weighted_cross_entropy(
                &s,
                &t,
                &centre,
                &w,
                rows,
                dim,
                tau_s,
                tau_t,
                Some((&mut g, scale)),
            ),
        ) {
            rep.check(
                &c.name,
                close_scalar("loss (backward)", l, c.scalar("loss"), RTOL),
            );
        }
        rep.check(&c.name, close_accumulated("grad", &g, c.f64s("grad")));
        // Every image has the same number of patches: the mean of the image
        // means is the mean over all rows, DINO's centre update.
        let mut centre_new = centre.clone();
        rep.ok(
            &c.name,
            loss::dino_centre_update(&t, rows, dim, c.f32("momentum"), &mut centre_new),
        );
        rep.check(&c.name, close("centre", &centre_new, c.f64s("centre_new")));
    }
    rep.finish("mim");
}

#[test]
fn teacher_entropy_matches() {
    let mut rep = Report::new();
    for c in load("entropy") {
        let (rows, dim, tau_t) = (c.usize("rows"), c.usize("dim"), c.f32("tau_t"));
        let (t, centre) = (c.f32s("teacher"), c.f32s("centre"));
        if let Some(h) = rep.ok(
            &c.name,
            loss::teacher_entropy(&t, &centre, rows, dim, tau_t),
        ) {
            rep.check(
                &c.name,
                close_scalar("entropy", h, c.scalar("entropy"), RTOL),
            );
            let ln_k = (dim as f32).ln();
            assert!((0.0..=ln_k * (1.0 + 1e-6)).contains(&h), "{}: {h}", c.name);
        }
    }
    rep.finish("entropy");
}

#[test]
fn layer_norm() {
    let mut rep = Report::new();
    for c in load("norm")
        .into_iter()
        .filter(|c| c.name.starts_with("ln_"))
    {
        let (rows, cols, eps) = (c.usize("rows"), c.usize("cols"), c.f32("eps"));
        let (x, gamma, beta, dy) = (c.f32s("x"), c.f32s("gamma"), c.f32s("beta"), c.f32s("dy"));
        let mut out = vec![f32::NAN; x.len()];
        let (mut mean, mut rstd) = (vec![f32::NAN; rows], vec![f32::NAN; rows]);
        rep.ok(
            &c.name,
            norm::layer_norm_forward(
                &x, &gamma, &beta, rows, cols, eps, &mut out, &mut mean, &mut rstd,
            ),
        );
        rep.check(&c.name, close("out", &out, c.f64s("out")));
        rep.check(&c.name, close("mean", &mean, c.f64s("mean")));
        // rstd of the constant row is 1/sqrt(eps) ~ 316; the others are
        // O(1). Judge each element on its own scale (no shared atol).
        rep.check(
            &c.name,
            check_close("rstd", &rstd, c.f64s("rstd"), RTOL, 0.0),
        );
        let (mut dx, mut dg, mut db) = (prefill(x.len()), prefill(cols), prefill(cols));
        rep.ok(
            &c.name,
            norm::layer_norm_backward(
                &x, &gamma, &mean, &rstd, &dy, rows, cols, &mut dx, &mut dg, &mut db,
            ),
        );
        rep.check(&c.name, close_accumulated("dx", &dx, c.f64s("dx")));
        rep.check(&c.name, close_accumulated("dgamma", &dg, c.f64s("dgamma")));
        rep.check(&c.name, close_accumulated("dbeta", &db, c.f64s("dbeta")));
    }
    rep.finish("layer norm");
}

#[test]
fn batch_norm() {
    let mut rep = Report::new();
    for c in load("norm")
        .into_iter()
        .filter(|c| c.name.starts_with("bn_"))
    {
        let (rows, cols, eps) = (c.usize("rows"), c.usize("cols"), c.f32("eps"));
        let (x, gamma, beta, dy) = (c.f32s("x"), c.f32s("gamma"), c.f32s("beta"), c.f32s("dy"));
        let mut out = vec![f32::NAN; x.len()];
        let mut mean = vec![f32::NAN; cols];
        let mut var = vec![f32::NAN; cols];
        let mut rstd = vec![f32::NAN; cols];
        rep.ok(
            &c.name,
            norm::batch_norm_forward(
                &x, &gamma, &beta, rows, cols, eps, &mut out, &mut mean, &mut var, &mut rstd,
            ),
        );
        rep.check(&c.name, close("out", &out, c.f64s("out")));
        rep.check(&c.name, close("mean", &mean, c.f64s("mean")));
        rep.check(&c.name, close("var", &var, c.f64s("var")));
        rep.check(&c.name, close("rstd", &rstd, c.f64s("rstd")));
        let (mut ms, mut vs) = (vec![0.0f32; cols], vec![0.0f32; cols]);
        rep.ok(
            &c.name,
            norm::batch_norm_stats(&x, rows, cols, &mut ms, &mut vs),
        );
        rep.check(&c.name, close("stats mean", &ms, c.f64s("mean")));
        rep.check(&c.name, close("stats var", &vs, c.f64s("var")));

        let (mut dx, mut dg, mut db) = (prefill(x.len()), prefill(cols), prefill(cols));
        let mut scratch = vec![f32::NAN; 2 * cols]; // contents must be ignored
        rep.ok(
            &c.name,
            norm::batch_norm_backward(
                &x,
                &gamma,
                &mean,
                &rstd,
                &dy,
                rows,
                cols,
                &mut dx,
                &mut dg,
                &mut db,
                &mut scratch,
            ),
        );
        // dx = gamma rstd (dy - (sum dy + xhat sum(dy xhat)) / M) cancels
        // terms of size |gamma rstd dy| down to a much smaller result (for
        // M = 2 it is zero up to eps effects), so f32 rounding is bounded on
        // the scale of those terms, not of the result: atol = 1e-5 of the
        // largest term, in addition to the default bound.
        let term_scale = (0..cols)
            .map(|j| (c.f64s("gamma")[j] * c.f64s("rstd")[j]).abs())
            .fold(0.0, f64::max)
            * max_abs(c.f64s("dy"));
        let pre = prefill(dx.len());
        let dx_only: Vec<f32> = dx.iter().zip(&pre).map(|(a, b)| a - b).collect();
        rep.check(
            &c.name,
            check_close_abs(
                "dx",
                &dx_only,
                c.f64s("dx"),
                RTOL,
                RTOL * (max_abs(c.f64s("dx")) + term_scale) + 3e-8,
            ),
        );
        rep.check(&c.name, close_accumulated("dgamma", &dg, c.f64s("dgamma")));
        rep.check(&c.name, close_accumulated("dbeta", &db, c.f64s("dbeta")));

        let (mut rm, mut rv) = (c.f32s("running_mean0"), c.f32s("running_var0"));
        rep.ok(
            &c.name,
            norm::batch_norm_update_running(&mean, &var, rows, c.f32("momentum"), &mut rm, &mut rv),
        );
        rep.check(&c.name, close("running_mean", &rm, c.f64s("running_mean1")));
        rep.check(&c.name, close("running_var", &rv, c.f64s("running_var1")));

        let xe = c.f32s("eval_x");
        let mut ye = vec![f32::NAN; xe.len()];
        rep.ok(
            &c.name,
            norm::batch_norm_eval(
                &xe,
                &gamma,
                &beta,
                &c.f32s("running_mean1"),
                &c.f32s("running_var1"),
                xe.len() / cols,
                cols,
                eps,
                &mut ye,
            ),
        );
        rep.check(&c.name, close("eval out", &ye, c.f64s("eval_out")));
    }
    rep.finish("batch norm");
}

#[test]
fn gelu() {
    let mut rep = Report::new();
    for c in load("activation") {
        let (x, dy) = (c.f32s("x"), c.f32s("dy"));
        let mut y = vec![f32::NAN; x.len()];
        rep.ok(&c.name, activation::gelu_forward(&x, &mut y));
        rep.check(&c.name, close("out", &y, c.f64s("out")));
        // Per element too: GELU(-5) ~ -1.4e-6 must not be judged on the
        // array's scale (10) only. The absolute 1e-6 floor covers the f32
        // cancellation in 1 + erf(x / sqrt 2) for x << 0, about
        // ulp(1) |x| / 2 ~ 3e-7 at |x| = 10.
        rep.check(
            &c.name,
            check_close_abs("out (per element)", &y, c.f64s("out"), 1e-5, 1e-6),
        );
        let scalar: Vec<f32> = x.iter().map(|&v| activation::gelu(v)).collect();
        rep.check(&c.name, close("gelu()", &scalar, c.f64s("out")));
        let mut dx = prefill(x.len());
        rep.ok(&c.name, activation::gelu_backward(&x, &dy, &mut dx));
        rep.check(&c.name, close_accumulated("dx", &dx, c.f64s("dx")));
    }
    rep.finish("gelu");
}

#[test]
fn linear_layer() {
    let mut rep = Report::new();
    for c in load("linear") {
        let (rows, inp, outd) = (c.usize("rows"), c.usize("inp"), c.usize("out"));
        let (x, w, b, dy) = (c.f32s("x"), c.f32s("weight"), c.f32s("bias"), c.f32s("dy"));
        let bias = c.flag("has_bias").then_some(b.as_slice());
        let mut y = vec![f32::NAN; rows * outd];
        rep.ok(
            &c.name,
            linalg::linear_forward(&x, &w, bias, rows, inp, outd, &mut y),
        );
        rep.check(&c.name, close("y", &y, c.f64s("y")));
        let (mut dx, mut dw, mut db) = (prefill(x.len()), prefill(w.len()), prefill(outd));
        let has_bias = bias.is_some();
        rep.ok(
            &c.name,
            linalg::linear_backward(
                &x,
                &w,
                &dy,
                rows,
                inp,
                outd,
                Some(&mut dx),
                Some(&mut dw),
                has_bias.then_some(db.as_mut_slice()),
            ),
        );
        rep.check(&c.name, close_accumulated("dx", &dx, c.f64s("dx")));
        rep.check(
            &c.name,
            close_accumulated("dweight", &dw, c.f64s("dweight")),
        );
        // Without a bias the reference gradient is zero and `None` must
        // leave the buffer untouched.
        rep.check(&c.name, close_accumulated("dbias", &db, c.f64s("dbias")));
    }
    rep.finish("linear");
}

#[test]
fn adamw_ema_clip() {
    let mut rep = Report::new();
    for c in load("optim") {
        if c.name.starts_with("adamw") {
            let (n, steps) = (c.usize("n"), c.usize("steps"));
            let opt = optim::AdamW {
                lr: c.f32("lr"),
                beta1: c.f32("beta1"),
                beta2: c.f32("beta2"),
                eps: c.f32("eps"),
                weight_decay: c.f32("weight_decay"),
            };
            let grads = c.f32s("grads");
            let mut p = c.f32s("params0");
            let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
            for k in 0..steps {
                rep.ok(
                    &c.name,
                    optim::adamw_step(
                        &mut p,
                        &grads[k * n..(k + 1) * n],
                        &mut m,
                        &mut v,
                        &opt,
                        k as u32 + 1,
                    ),
                );
                let at = |key: &str| c.f64s(key)[k * n..(k + 1) * n].to_vec();
                rep.check(
                    &c.name,
                    close(&format!("params step {}", k + 1), &p, &at("params")),
                );
                rep.check(
                    &c.name,
                    close(&format!("m step {}", k + 1), &m, &at("exp_avg")),
                );
                rep.check(
                    &c.name,
                    close(&format!("v step {}", k + 1), &v, &at("exp_avg_sq")),
                );
            }
        } else if c.name.starts_with("ema") {
            let mut t = c.f32s("teacher");
            rep.ok(
                &c.name,
                optim::ema_update(&mut t, &c.f32s("student"), c.f32("momentum")),
            );
            rep.check(&c.name, close("teacher", &t, c.f64s("result")));
        } else {
            let mut g = c.f32s("grad");
            if let Some(norm) = rep.ok(&c.name, optim::clip_grad_norm(&mut g, c.f32("max_norm"))) {
                rep.check(&c.name, close_scalar("norm", norm, c.scalar("norm"), RTOL));
            }
            rep.check(&c.name, close("clipped", &g, c.f64s("clipped")));
        }
    }
    rep.finish("optim");
}

#[test]
fn schedules() {
    let mut rep = Report::new();
    for c in load("schedule") {
        let (total, warmup) = (c.usize("total"), c.usize("warmup"));
        let (base, fin, start) = (c.f32("base"), c.f32("final"), c.f32("start"));
        let got: Vec<f32> = (0..total)
            .map(|step| match c.usize("kind") {
                0 => schedule::cosine_schedule(step, total, warmup, base, fin, start),
                _ => schedule::linear_warmup(step, warmup, start, base),
            })
            .collect();
        rep.check(&c.name, close("values", &got, c.f64s("values")));
    }
    rep.finish("schedule");
}
