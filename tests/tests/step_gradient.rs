//! The whole training step's gradient (ViT, DINO head, SERE heads, both
//! relation losses, DINO loss, loss weighting, local crops with their own
//! heads) against central finite differences of the step's total loss.

use sere_core::geometry::CropBox;
use sere_host::augment::GridSizes;
use sere_host::augment::{batch_pair_grids, BatchPairGrids};
use sere_host::config::TrainConfig;
use sere_host::ndarray::{ArrayView4, ArrayView5};
use sere_host::train::engine::{CpuEngine, StepInput, StepSchedule};
use sere_host::train::network::BACKBONE_PREFIX;
// The LCG stream these inputs always came from (bit-for-bit).
use sere_testkit::Lcg;

fn config() -> TrainConfig {
    let text = r#"
        preset = "custom"
        img = 8
        local_img = 4
        patch = 2
        dim = 8
        depth = 2
        heads = 2
        batch = 3
        locals = 2
        out_dim = 16
        head_hidden = 12
        bottleneck = 6
        overlap = 3
        local_overlap = 2
        drop_path = 0.3
        clip_grad = 0.0
        alpha = 0.7
        beta = 0.9
        steps = 10
    "#;
    TrainConfig::from_toml(text).expect("config parses")
}

/// A tiny batch and its overlap grids (owned; [`Batch::input`] borrows).
struct Batch {
    batch: usize,
    locals: usize,
    /// Global and local crop sides, patch-grid side.
    sides: (usize, usize, usize),
    globals: Vec<f32>,
    local_crops: Vec<f32>,
    grids: Vec<BatchPairGrids>,
    masks: Vec<bool>,
}

impl Batch {
    fn input(&self) -> StepInput<'_> {
        let (b, (g, l, n)) = (self.batch, self.sides);
        let mask_shape = match self.masks.is_empty() {
            true => (0, b, 0, 0),
            false => (2, b, n, n),
        };
        StepInput {
            globals: ArrayView5::from_shape((2, b, 3, g, g), &self.globals).unwrap(),
            locals: ArrayView5::from_shape((self.locals, b, 3, l, l), &self.local_crops).unwrap(),
            grids: &self.grids,
            masks: ArrayView4::from_shape(mask_shape, &self.masks).unwrap(),
        }
    }
}

/// An engine for `cfg` with perturbed weights, teacher and centre, and a
/// batch whose crops overlap in several ways (one pair not at all).
fn setup(cfg: &TrainConfig) -> (CpuEngine, Batch) {
    cfg.validate().unwrap();
    let mut engine = CpuEngine::cpu(cfg);
    // Larger weights than the 0.02 init so every path carries signal.
    let mut s = Lcg::new(11);
    for p in engine.student.iter_mut() {
        *p += 0.3 * s.signed_f32();
    }
    engine.teacher = engine
        .student
        .iter()
        .map(|&p| p + 0.05 * s.signed_f32())
        .collect();
    for c in engine
        .centre
        .iter_mut()
        .chain(engine.patch_centre.iter_mut())
    {
        *c = 0.1 * s.signed_f32();
    }
    let (b, l) = (cfg.batch, cfg.locals);
    let globals: Vec<f32> = (0..2 * b * 3 * 64).map(|_| s.signed_f32()).collect();
    let locals: Vec<f32> = (0..l * b * 3 * 16).map(|_| s.signed_f32()).collect();
    let views = 2 + l;
    let crop = |x: f32, y: f32, w: f32, f: bool| CropBox::new(x, y, w, w, f).unwrap();
    let mut crops = Vec::new();
    for i in 0..b {
        let o = i as f32;
        crops.extend([
            crop(0.0 + o, 2.0, 20.0, false),
            crop(6.0, 1.0 + o, 18.0, true),
            crop(10.0, 8.0, 7.0, i == 1),
            // The last image's second local view overlaps nothing.
            if i == b - 1 {
                crop(60.0, 60.0, 5.0, false)
            } else {
                crop(3.0, 12.0, 6.0, false)
            },
        ]);
    }
    let grids = batch_pair_grids(
        &crops,
        views,
        GridSizes {
            global: (3, 3),
            local: (2, 2),
            placement: Default::default(),
        },
    );
    // With MIM: about a third of the global crops' patches masked, and
    // one crop (image 1 of view 0) not at all.
    let n = cfg.grid() * cfg.grid();
    let masks = if cfg.mim {
        (0..2 * b * n)
            .map(|i| i / n != 1 && (i * 7) % 3 == 0)
            .collect()
    } else {
        Vec::new()
    };
    let batch = Batch {
        batch: b,
        locals: l,
        sides: (cfg.img, cfg.local_img, cfg.grid()),
        globals,
        local_crops: locals,
        grids,
        masks,
    };
    (engine, batch)
}

/// The schedule of the checks: no update, a warm teacher temperature.
fn schedule() -> StepSchedule {
    StepSchedule {
        lr: 0.0,
        weight_decay: 0.0,
        momentum: 1.0,
        teacher_temp: 0.5,
        patch_teacher_temp: 0.4,
        freeze_last_layer: false,
        step: 3,
    }
}

#[test]
fn step_gradient_matches_finite_differences_of_the_total_loss() {
    check_step_gradient(&config());
}

/// iBOT on top: the masked student, the mask token, a patch head of its
/// own (so its gradient is told apart from the CLS head's) and the
/// masked-patch loss with its centre.
#[test]
fn step_gradient_with_masked_image_modelling_matches_finite_differences() {
    let mut cfg = config();
    cfg.mim = true;
    cfg.shared_head = false;
    cfg.patch_out_dim = 10;
    check_step_gradient(&cfg);
}

/// The same with the patch head shared with the CLS head (the authors').
#[test]
fn step_gradient_with_a_shared_patch_head_matches_finite_differences() {
    let mut cfg = config();
    cfg.mim = true;
    check_step_gradient(&cfg);
}

/// DINO alone (alpha = beta = 0): the SERE heads and relation losses are
/// skipped, the gradient is still the total loss's, and the SERE heads'
/// parameters get exactly none.
#[test]
fn step_gradient_without_relations_matches_finite_differences() {
    let mut cfg = config();
    cfg.alpha = 0.0;
    cfg.beta = 0.0;
    check_step_gradient(&cfg);
    let (mut engine, batch) = setup(&cfg);
    engine
        .forward_backward(&batch.input(), &schedule())
        .expect("step runs");
    let grads = engine.grads();
    for e in engine.net.layout.entries() {
        let sere_head = ["spatial_", "channel_"]
            .iter()
            .any(|p| e.name.starts_with(p));
        let zero = grads[e.range.clone()].iter().all(|&g| g == 0.0);
        assert_eq!(zero, sere_head, "{}", e.name);
    }
}

/// The authors' ViT-S/16 head: the last layer's weight-norm gain learned
/// (`norm_last_layer = false`), with iBOT's shared head on top, so the
/// gain's gradient carries both the CLS and the masked-patch terms.
#[test]
fn step_gradient_with_a_learned_last_layer_gain_matches_finite_differences() {
    let mut cfg = config();
    cfg.mim = true;
    cfg.norm_last_layer = false;
    check_step_gradient(&cfg);
}

/// Pairs without overlap counted as uniform rows (the authors' code): the
/// spatial mean and its gradient over all pairs, checked against finite
/// differences of the reported loss, and the loss's value against the
/// default's mean over overlapping pairs.
#[test]
fn uniform_rows_for_pairs_without_overlap() {
    let mut cfg = config();
    cfg.non_overlapping = sere_host::config::NonOverlapping::Uniform;
    check_step_gradient(&cfg);
    let spatial = |cfg: &TrainConfig| {
        let (mut engine, batch) = setup(cfg);
        let s = engine
            .forward_backward(&batch.input(), &schedule())
            .unwrap();
        (s.spatial as f64, s.spatial_terms, batch)
    };
    let (uniform, _, _) = spatial(&cfg);
    let (dropped, valid, batch) = spatial(&config());
    let all: usize = batch.grids.iter().map(|g| g.valid.len()).sum();
    let ln_p: f64 = batch
        .grids
        .iter()
        .flat_map(|g| {
            g.valid
                .iter()
                .map(move |&v| (v, ((g.hs * g.ws) as f64).ln()))
        })
        .filter(|(v, _)| !v)
        .map(|(_, l)| l)
        .sum();
    assert!(valid < all, "the batch has a pair without overlap");
    let want = (dropped * valid as f64 + ln_p) / all as f64;
    assert!((uniform - want).abs() < 1e-5 * want, "{uniform} vs {want}");
}

fn check_step_gradient(cfg: &TrainConfig) {
    let (mut engine, batch) = setup(cfg);
    let (input, sched) = (batch.input(), schedule());
    let (centre, patch_centre) = (engine.centre.clone(), engine.patch_centre.clone());
    let stats = engine.forward_backward(&input, &sched).expect("step runs");
    if cfg.relations() {
        assert!(stats.spatial_terms > 0 && stats.spatial > 0.0 && stats.channel > 0.0);
    } else {
        assert_eq!(
            (stats.spatial_terms, stats.spatial, stats.channel),
            (0, 0.0, 0.0)
        );
    }
    assert_eq!(stats.mim > 0.0, cfg.mim, "{stats:?}");
    let grads = engine.grads().to_vec();
    if cfg.mim {
        let token = &engine
            .net
            .layout
            .get("backbone.masked_embed")
            .unwrap()
            .range;
        assert!(
            grads[token.clone()].iter().all(|&g| g != 0.0),
            "the mask token learns"
        );
    }

    let loss_at = |engine: &mut CpuEngine, i: usize, v: f32| -> f64 {
        let old = engine.student[i];
        engine.student[i] = v;
        // The step updates both centres.
        engine.centre.copy_from_slice(&centre);
        engine.patch_centre.copy_from_slice(&patch_centre);
        let l = engine.forward_backward(&input, &sched).unwrap().loss as f64;
        engine.student[i] = old;
        l
    };
    let loss_ulp = (stats.loss.abs() * f32::EPSILON) as f64;
    let layout = engine.net.layout.clone();
    let (mut checked, mut worst) = (0, 0.0f64);
    for e in layout.entries() {
        for k in [0, e.range.len() / 2, e.range.len() - 1] {
            let i = e.range.start + k;
            let p = engine.student[i];
            let an = grads[i] as f64;
            // Three step sizes: the ReLUs of the stacked SERE heads put
            // kinks in the loss, and a step that crosses one is off (one
            // sits 1e-3 from a patch-embedding weight with MIM); a wrong
            // gradient is off at every size.
            // Below the float32 resolution of the central difference
            // (two losses each off by up to an ulp: ulp / h) a gradient
            // cannot be told apart; 4 of it counts as agreement.
            let err = [1e-2f32, 3e-3, 1e-3]
                .map(|h| {
                    let fd = (loss_at(&mut engine, i, p + h) - loss_at(&mut engine, i, p - h))
                        / (2.0 * h as f64);
                    let diff = (fd - an).abs();
                    let resolved = diff > 4.0 * loss_ulp / h as f64;
                    let rel = diff / fd.abs().max(an.abs()).max(1e-2);
                    (if resolved { rel } else { 0.0 }, fd)
                })
                .into_iter()
                .min_by(|a, b| a.0.total_cmp(&b.0))
                .expect("two step sizes");
            worst = worst.max(err.0);
            assert!(
                err.0 < 3e-2,
                "{}[{k}]: analytic {an:.6e}, finite difference {:.6e}",
                e.name,
                err.1
            );
            checked += 1;
        }
    }
    eprintln!("{checked} coordinates, worst relative error {worst:.2e}");
    assert!(checked > 60);
}

/// The SERE heads' wiring (SERE.md step 3): they read the last block's
/// tokens before the final norm, and the student's predictor is stacked on
/// its projection. With `alpha + beta = 4` the image-level loss has weight
/// 0, so the final norm and the DINO head get exactly no gradient, while
/// the projections' batch norms get one.
#[test]
fn relation_losses_train_the_projections_and_not_the_final_norm() {
    let mut cfg = config();
    (cfg.alpha, cfg.beta) = (1.5, 2.5);
    assert_eq!(cfg.image_loss_weight(), 0.0);
    let (mut engine, batch) = setup(&cfg);
    let stats = engine
        .forward_backward(&batch.input(), &schedule())
        .expect("step runs");
    assert!(stats.spatial > 0.0 && stats.channel > 0.0);
    let grads = engine.grads();
    let layout = &engine.net.layout;
    let mut projections = 0;
    for e in layout.entries() {
        let g = &grads[e.range.clone()];
        let zero = g.iter().all(|&v| v == 0.0);
        let backbone = e.name.strip_prefix(BACKBONE_PREFIX);
        if backbone.is_some_and(|n| n.starts_with("norm.")) || e.name.starts_with("dino_head.") {
            assert!(zero, "{} gets a gradient without the image loss", e.name);
        } else if e.name.contains("projector.bn") {
            assert!(g.iter().all(|&v| v != 0.0), "{}: {g:?}", e.name);
            projections += 1;
        } else if backbone.is_some_and(|n| n.starts_with("blocks.")) {
            assert!(!zero, "{} gets no gradient", e.name);
        }
    }
    assert_eq!(projections, 8, "4 heads x (weight, bias)");
}
