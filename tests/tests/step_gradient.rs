//! The whole training step's gradient (ViT, DINO head, SERE heads, both
//! relation losses, DINO loss, loss weighting, local crops with their own
//! heads) against central finite differences of the step's total loss.

use sere_core::geometry::CropBox;
use sere_host::augment::batch_pair_grids;
use sere_host::augment::GridSizes;
use sere_host::config::TrainConfig;
use sere_host::train::engine::{CpuEngine, StepInput, StepSchedule};

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

fn lcg(state: &mut u64) -> f32 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

#[test]
fn step_gradient_matches_finite_differences_of_the_total_loss() {
    let cfg = config();
    cfg.validate().unwrap();
    let mut engine = CpuEngine::cpu(&cfg);
    // Larger weights than the 0.02 init so every path carries signal.
    let mut s = 11u64;
    for p in engine.student.iter_mut() {
        *p += 0.3 * lcg(&mut s);
    }
    engine.teacher = engine
        .student
        .iter()
        .map(|&p| p + 0.05 * lcg(&mut s))
        .collect();
    for c in engine.centre.iter_mut() {
        *c = 0.1 * lcg(&mut s);
    }
    let (b, l) = (cfg.batch, cfg.locals);
    let globals: Vec<f32> = (0..2 * b * 3 * 64).map(|_| lcg(&mut s)).collect();
    let locals: Vec<f32> = (0..l * b * 3 * 16).map(|_| lcg(&mut s)).collect();
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
        },
    );
    let input = StepInput {
        batch: b,
        locals: l,
        globals: &globals,
        local_crops: &locals,
        grids: &grids,
    };
    let sched = StepSchedule {
        lr: 0.0,
        weight_decay: 0.0,
        momentum: 1.0,
        teacher_temp: 0.5,
        freeze_last_layer: false,
        step: 3,
    };
    let centre = engine.centre.clone();
    let stats = engine.forward_backward(&input, &sched).expect("step runs");
    assert!(stats.spatial_terms > 0 && stats.spatial > 0.0 && stats.channel > 0.0);
    let grads = engine.grads().to_vec();

    let loss_at = |engine: &mut CpuEngine, i: usize, v: f32| -> f64 {
        let old = engine.student[i];
        engine.student[i] = v;
        engine.centre.copy_from_slice(&centre); // the step updates the centre
        let l = engine.forward_backward(&input, &sched).unwrap().loss as f64;
        engine.student[i] = old;
        l
    };
    let layout = engine.net.layout.clone();
    let mut checked = 0;
    for e in layout.entries() {
        // The projections feed only the teacher: no gradient by design.
        if e.name.contains("projector") {
            assert!(
                grads[e.range.clone()].iter().all(|&g| g == 0.0),
                "{}",
                e.name
            );
            continue;
        }
        for k in [0, e.range.len() / 2, e.range.len() - 1] {
            let i = e.range.start + k;
            let h = 1e-2f32;
            let p = engine.student[i];
            let fd = (loss_at(&mut engine, i, p + h) - loss_at(&mut engine, i, p - h))
                / (2.0 * h as f64);
            let an = grads[i] as f64;
            let err = (fd - an).abs() / fd.abs().max(an.abs()).max(1e-2);
            assert!(
                err < 3e-2,
                "{}[{k}]: analytic {an:.6e}, finite difference {fd:.6e}",
                e.name
            );
            checked += 1;
        }
    }
    assert!(checked > 60);
}
