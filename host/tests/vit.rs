//! The ViT backbone against PyTorch float64 (every output, the tokens
//! before the final norm, and every parameter gradient from the output and
//! from the pre-norm patch tokens, at the trained size and at an
//! interpolated size) and against finite differences (drop-path on).

mod common;

use common::{down, up};
use ndarray::ArrayView4;
use rand::SeedableRng;
use serde_json::Value;
use sere_host::backend::Backend;
use sere_host::model::params::ParamLayout;
use sere_host::model::vit::{Vit, VitConfig, MASK_TOKEN};

on_every_backend! {
    matches_pytorch_float64_outputs_and_all_gradients => pytorch_reference;
    gradients_match_finite_differences_with_drop_path => finite_differences;
    masked_gradients_match_finite_differences => finite_differences_masked;
    forward_only_workspace_gives_the_same_outputs => forward_only;
}

/// `images` as the `(batch, 3, img, img)` batch the ViT takes.
fn batch_of(images: &[f32], batch: usize, img: usize) -> ArrayView4<'_, f32> {
    ArrayView4::from_shape((batch, 3, img, img), images).expect("test images fill the batch")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn tiny(drop_path: f32, mask_token: bool) -> (ParamLayout, Vit) {
    let mut layout = ParamLayout::new();
    let cfg = VitConfig {
        img: 8,
        patch: 2,
        dim: 12,
        depth: 2,
        heads: 3,
        mlp_ratio: 2.0,
        drop_path,
        in_chans: 3,
        mask_token,
    };
    let vit = Vit::new(&mut layout, "", cfg);
    (layout, vit)
}

/// `|a - b| <= atol + rtol * |b|` elementwise (in f32), `atol = atol_frac *
/// max|b|`; the message names the worst element.
#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f32], rtol: f32, atol_frac: f32) {
    let atol = atol_frac * sere_testkit::max_abs_f32(want);
    sere_testkit::assert_close_f32(what, got, want, rtol, atol);
}

fn pytorch_reference<B: Backend>(be: &B) {
    let fx: Value =
        serde_json::from_str(include_str!("fixtures/vit_tiny.json")).expect("fixture parses");
    let (layout, vit) = tiny(0.0, true);
    let mut params = vec![0.0f32; layout.len()];
    for e in layout.entries() {
        let p = &fx["params"][&e.name];
        let shape: Vec<usize> = p["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(shape, e.shape, "{}: shape", e.name);
        params[e.range.clone()].copy_from_slice(&floats(&p["data"]));
    }
    for case in fx["cases"].as_array().unwrap() {
        let batch = case["batch"].as_u64().unwrap() as usize;
        let img = case["img"].as_u64().unwrap() as usize;
        let p = up(be, &params);
        let mut acts = vit.workspace(be, batch, img).unwrap();
        let mask: Vec<bool> = case["mask"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() == 1)
            .collect();
        // The unmasked cases run with the token present but unused.
        let masks = (!mask.is_empty()).then_some(&mask[..]);
        acts.set_masks(be, masks).unwrap();
        let images = floats(&case["images"]);
        let images = batch_of(&images, batch, img);
        vit.forward(be, &p, images, &mut acts, None).unwrap();
        // f32 through two blocks: errors of a few 1e-6 relative to the scale.
        assert_close(
            &format!("out@{img}"),
            &down(be, acts.out()),
            &floats(&case["out"]),
            1e-4,
            1e-5,
        );
        // DINO's evaluation features: every block's normed CLS, then the
        // mean normed patch token; the final CLS alone is the default.
        let all = vit.eval_features(be, &p, &acts, 2, true, 0).unwrap();
        let last = vit.eval_features(be, &p, &acts, 1, false, 0).unwrap();
        // The final CLS and the patch tokens pooled onto 3 x 3 cells
        // (overlapping windows at 4 x 4 patches, disjoint at 6 x 6).
        let grid = vit.eval_features(be, &p, &acts, 1, false, 3).unwrap();
        assert_close(
            &format!("features_grid3@{img}"),
            &grid,
            &floats(&case["features_cls_grid3"]),
            1e-4,
            1e-5,
        );
        assert_close(
            &format!("features@{img}"),
            &all,
            &floats(&case["features_all_blocks_avgpool"]),
            1e-4,
            1e-5,
        );
        for b in 0..batch {
            assert_eq!(&last[b * 12..(b + 1) * 12], &all[b * 36 + 12..b * 36 + 24]);
        }
        assert_close(
            &format!("pre_norm@{img}"),
            &down(be, acts.pre_norm()),
            &floats(&case["pre_norm"]),
            1e-4,
            1e-5,
        );
        // From the final norm's output alone, then with the pre-norm patch
        // tokens' gradient added (the SERE heads' path).
        let dout = up(be, &floats(&case["dout"]));
        let dpatches = up(be, &floats(&case["dpatches_pre_norm"]));
        for (dpre, key) in [(None, "grads"), (Some(&dpatches), "grads_with_pre_norm")] {
            let mut g = be.zeros(layout.len()).unwrap();
            vit.backward(be, &p, &mut acts, &dout, dpre, &mut g)
                .unwrap();
            let grads = down(be, &g);
            for e in layout.entries() {
                let want = floats(&case[key][&e.name]);
                assert_close(
                    &format!("{key} {}@{img}", e.name),
                    &grads[e.range.clone()],
                    &want,
                    1e-3,
                    1e-4,
                );
            }
        }
    }
}

fn finite_differences<B: Backend>(be: &B) {
    check_finite_differences(be, false, 5.0);
}

/// With masks the loss is far more curved at 5x the init's weights (the
/// masked rows share one token): a central difference there is off by a
/// few percent at any step f32 can resolve, so this case runs at 3x.
fn finite_differences_masked<B: Backend>(be: &B) {
    check_finite_differences(be, true, 3.0);
}

/// Every parameter's gradient (from the output and the pre-norm patch
/// tokens, drop path on, interpolated position embedding) against central
/// differences, with every third patch masked when `masked`.
fn check_finite_differences<B: Backend>(be: &B, masked: bool, weight_scale: f32) {
    let (layout, vit) = tiny(0.5, true);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut params = vec![0.0f32; layout.len()];
    layout.init(&mut params, &mut rng);
    // Larger weights than the 0.02 init so that every path carries signal.
    params.iter_mut().for_each(|p| *p *= weight_scale);
    let token = layout.get(MASK_TOKEN).unwrap().range.clone();
    for (k, p) in params[token.clone()].iter_mut().enumerate() {
        *p = 0.5 * (k as f32 * 0.37).sin();
    }
    let (batch, img) = (4, 12); // interpolated position embedding too
    let images: Vec<f32> = (0..batch * 3 * img * img)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let n_out = be.len(vit.workspace(be, batch, img).unwrap().out());
    let dout: Vec<f32> = (0..n_out)
        .map(|i| ((i * 53 % 97) as f32 / 48.0) - 1.0)
        .collect();
    // The pre-norm patch tokens carry a gradient too (the SERE heads').
    let (t, d) = (1 + (img / 2) * (img / 2), 12);
    let dpatches: Vec<f32> = (0..batch * (t - 1) * d)
        .map(|i| ((i * 29 % 89) as f32 / 44.0) - 1.0)
        .collect();
    let dot =
        |a: &[f32], b: &[f32]| -> f64 { a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum() };
    // Every third patch masked: the mask token's gradient is checked too.
    let masks: Vec<bool> = (0..batch * (t - 1)).map(|i| i % 3 == 1).collect();
    let masks = masked.then_some(&masks[..]);
    let mut acts = vit.workspace(be, batch, img).unwrap();
    acts.set_masks(be, masks).unwrap();
    let mut objective = |p: &[f32]| -> f64 {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(7); // same masks every call
        let p = up(be, p);
        vit.forward(
            be,
            &p,
            batch_of(&images, batch, img),
            &mut acts,
            Some(&mut r),
        )
        .unwrap();
        let pre = down(be, acts.pre_norm());
        let patches: Vec<f32> = (0..batch)
            .flat_map(|b| pre[(b * t + 1) * d..(b + 1) * t * d].to_vec())
            .collect();
        dot(&down(be, acts.out()), &dout) + dot(&patches, &dpatches)
    };
    let mut acts = vit.workspace(be, batch, img).unwrap();
    acts.set_masks(be, masks).unwrap();
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let pb = up(be, &params);
    vit.forward(
        be,
        &pb,
        batch_of(&images, batch, img),
        &mut acts,
        Some(&mut r),
    )
    .unwrap();
    let mut g = be.zeros(layout.len()).unwrap();
    let dpre = up(be, &dpatches);
    vit.backward(be, &pb, &mut acts, &up(be, &dout), Some(&dpre), &mut g)
        .unwrap();
    let grads = down(be, &g);
    // The token learns from masked passes only.
    assert_eq!(grads[token].iter().all(|&g| g != 0.0), masked);

    // A few coordinates of every parameter tensor.
    let mut worst = 0.0f64;
    for e in layout.entries() {
        for k in [0, e.range.len() / 2, e.range.len() - 1] {
            let i = e.range.start + k;
            let h = 3e-3f32;
            let mut p = params.clone();
            p[i] += h;
            let up = objective(&p);
            p[i] -= 2.0 * h;
            let down = objective(&p);
            let fd = (up - down) / (2.0 * h as f64);
            let an = grads[i] as f64;
            let err = (fd - an).abs() / (fd.abs().max(an.abs()).max(1.0));
            worst = worst.max(err);
            assert!(
                err < 2e-2,
                "{}[{k}]: analytic {an}, finite difference {fd}",
                e.name
            );
        }
    }
    eprintln!("worst relative FD error {worst:.2e}");
}

/// A forward-only workspace (the teacher's, evaluation's) computes exactly
/// what a full one does.
fn forward_only<B: Backend>(be: &B) {
    let (layout, vit) = tiny(0.0, true);
    let mut params = vec![0.0f32; layout.len()];
    layout.init(&mut params, &mut rand_chacha::ChaCha8Rng::seed_from_u64(5));
    let (batch, img) = (3, 12);
    let images: Vec<f32> = (0..batch * 3 * img * img)
        .map(|i| ((i * 31 % 83) as f32 / 41.0) - 1.0)
        .collect();
    let p = up(be, &params);
    let mut full = vit.workspace(be, batch, img).unwrap();
    let mut fwd = vit.forward_workspace(be, batch, img).unwrap();
    for acts in [&mut full, &mut fwd] {
        vit.forward(be, &p, batch_of(&images, batch, img), acts, None)
            .unwrap();
    }
    assert_eq!(down(be, full.out()), down(be, fwd.out()));
    assert_eq!(down(be, full.pre_norm()), down(be, fwd.pre_norm()));
    // Images the workspace was not shaped for, or not in standard layout,
    // are refused with an error, not a panic.
    let fewer = batch_of(&images[..(batch - 1) * 3 * img * img], batch - 1, img);
    let transposed = batch_of(&images, batch, img).permuted_axes([0, 1, 3, 2]);
    for bad in [fewer, transposed] {
        assert!(vit.forward(be, &p, bad, &mut full, None).is_err());
    }
}
