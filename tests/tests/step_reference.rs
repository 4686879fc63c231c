//! One whole SERE + iBOT training step against an independent float64
//! PyTorch implementation written from the method sheet
//! (`fixtures/gen_step.py`): masked student and unmasked teacher forwards,
//! SERE's stacked heads on the tokens before the final norm, the shared
//! CLS / patch head, all four losses, both centre updates, the batch-norm
//! running statistics and every student parameter's gradient (the mask
//! token, both batch norms of every head and the weight-normalised last
//! layer with its learned gain, `norm_last_layer = false`, among them).

use std::collections::HashMap;

use sere_host::augment::BatchPairGrids;
use sere_host::config::TrainConfig;
use sere_host::ndarray::{ArrayView4, ArrayView5};
use sere_host::train::engine::{CpuEngine, StepInput, StepSchedule};

type Fixture = HashMap<String, Vec<f64>>;

fn fixture() -> Fixture {
    include_str!("fixtures/step_mim.txt")
        .lines()
        .map(|line| {
            let mut it = line.split_whitespace();
            let name = it.next().expect("name").to_string();
            let n: usize = it.next().expect("count").parse().expect("count");
            let v: Vec<f64> = it.map(|x| x.parse().expect("value")).collect();
            assert_eq!(v.len(), n, "{name}: count");
            (name, v)
        })
        .collect()
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// The generator's configuration (its `cfg` and `temps` lines are checked
/// against it).
fn config(fx: &Fixture) -> TrainConfig {
    let text = r#"
        preset = "custom"
        img = 8
        local_img = 4
        patch = 2
        dim = 8
        depth = 2
        heads = 2
        mlp_ratio = 2.0
        batch = 2
        locals = 1
        out_dim = 10
        head_hidden = 12
        bottleneck = 6
        norm_last_layer = false
        overlap = 3
        local_overlap = 2
        alpha = 0.7
        beta = 0.9
        student_temp = 0.1
        drop_path = 0.0
        clip_grad = 0.0
        mim = true
        shared_head = true
        steps = 10
    "#;
    let cfg = TrainConfig::from_toml(text).expect("config parses");
    cfg.validate().unwrap();
    let c = &fx["cfg"];
    let ours = [
        cfg.img,
        cfg.local_img,
        cfg.patch,
        cfg.dim,
        cfg.depth,
        cfg.heads,
        cfg.batch,
        cfg.locals,
        cfg.out_dim,
        cfg.head_hidden,
        cfg.bottleneck,
        cfg.overlap,
        cfg.local_overlap,
    ];
    assert_eq!(c.iter().map(|&v| v as usize).collect::<Vec<_>>(), ours);
    assert_eq!(&fx["temps"][..2], &[cfg.alpha, cfg.beta]);
    cfg
}

/// `|got - want| <= rtol |want| + atol_frac max|want|` element-wise.
#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f64], rtol: f64, atol_frac: f64) {
    sere_testkit::assert_close(
        what,
        got,
        want,
        rtol,
        atol_frac * sere_testkit::max_abs(want),
    );
}

#[test]
fn one_sere_ibot_step_matches_pytorch_float64() {
    let fx = fixture();
    let cfg = config(&fx);
    let mut engine = CpuEngine::cpu(&cfg);
    let layout = engine.net.layout.clone();
    for e in layout.entries() {
        for (net, buf) in [
            ("student", &mut engine.student),
            ("teacher", &mut engine.teacher),
        ] {
            let key = format!("{net}.{}", e.name);
            let v = fx
                .get(&key)
                .unwrap_or_else(|| panic!("{key} not in the fixture"));
            buf[e.range.clone()].copy_from_slice(&f32s(v));
        }
    }
    let generated = fx.keys().filter(|k| k.starts_with("student.")).count();
    assert_eq!(generated, layout.entries().len(), "every tensor, no more");
    engine.centre = f32s(&fx["centre"]);
    engine.patch_centre = f32s(&fx["patch_centre"]);

    let grids: Vec<BatchPairGrids> = (0..)
        .map_while(|i| fx.get(&format!("grid.{i}")).map(|g| (i, g)))
        .map(|(i, g)| BatchPairGrids {
            teacher: g[0] as usize,
            student: g[1] as usize,
            hs: g[2] as usize,
            ws: g[2] as usize,
            teacher_grid: f32s(&fx[&format!("grid.{i}.teacher")]),
            student_grid: f32s(&fx[&format!("grid.{i}.student")]),
            valid: g[3..].iter().map(|&v| v == 1.0).collect(),
        })
        .collect();
    let (globals, locals) = (f32s(&fx["globals"]), f32s(&fx["locals"]));
    let masks: Vec<bool> = fx["masks"].iter().map(|&m| m == 1.0).collect();
    let (b, n) = (cfg.batch, cfg.grid());
    let input = StepInput {
        globals: ArrayView5::from_shape((2, b, 3, cfg.img, cfg.img), &globals).unwrap(),
        locals: ArrayView5::from_shape((cfg.locals, b, 3, cfg.local_img, cfg.local_img), &locals)
            .unwrap(),
        grids: &grids,
        masks: ArrayView4::from_shape((2, b, n, n), &masks).unwrap(),
    };
    let temps = &fx["temps"];
    assert_eq!(temps[2], cfg.student_temp);
    let sched = StepSchedule {
        lr: 0.0,
        weight_decay: 0.0,
        momentum: 1.0,
        teacher_temp: temps[3] as f32,
        patch_teacher_temp: temps[4] as f32,
        freeze_last_layer: false,
        step: 0,
    };
    let stats = engine.forward_backward(&input, &sched).expect("step runs");

    let want = &fx["losses"];
    let got = [
        stats.loss,
        stats.dino,
        stats.mim,
        stats.spatial,
        stats.channel,
    ];
    for (name, (&g, &w)) in ["loss", "dino", "mim", "spatial", "channel"]
        .iter()
        .zip(got.iter().zip(want))
    {
        assert_close(name, &[g], &[w], 1e-5, 0.0);
    }
    assert_eq!(stats.spatial_terms, want[5] as usize);
    assert_close(
        "teacher entropy",
        &[stats.teacher_entropy],
        &fx["teacher_entropy"],
        1e-5,
        0.0,
    );

    let grads = engine.grads().to_vec();
    for e in layout.entries() {
        let want = &fx[&format!("grad.{}", e.name)];
        assert_close(
            &format!("grad {}", e.name),
            &grads[e.range.clone()],
            want,
            1e-3,
            1e-4,
        );
    }
    assert_close("centre", &engine.centre, &fx["centre_new"], 1e-5, 1e-6);
    assert_close(
        "patch centre",
        &engine.patch_centre,
        &fx["patch_centre_new"],
        1e-5,
        1e-6,
    );
    for (net, states) in [
        ("student", &engine.student_bn),
        ("teacher", &engine.teacher_bn),
    ] {
        for (head, st) in states.iter() {
            for (bn, r) in [("projection", &st.projection), ("predictor", &st.predictor)] {
                let key = format!("bn.{net}.{head}.{bn}");
                let got = [r.mean.clone(), r.var.clone()].concat();
                assert_close(&key, &got, &fx[&key], 1e-4, 1e-5);
            }
        }
    }
}
