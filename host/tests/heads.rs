//! Heads and relation-loss assembly: analytic gradients against central
//! finite differences, internal consistency with `sere-core`'s kernels, and
//! a float64 PyTorch reference (`fixtures/heads.txt`, written by
//! `fixtures/gen_heads.py`; the tests only read the fixture).

mod common;

use std::collections::HashMap;

use common::{down, up};
use sere_host::backend::cpu::relation_loss::{
    dino_loss_step, SereGrads, SereInputs, SereLoss, SereLossConfig, StudentGrads, StudentViews,
    ViewShapes,
};
use sere_host::backend::{Backend, Cpu, DinoLossArgs, Grads};
use sere_host::model::heads::{
    BnMode, BnRunning, DinoHead, DinoHeadActs, DinoHeadConfig, SereActs, SereHead, SereHeadState,
    SereSide, BN_EPS,
};
use sere_host::model::params::ParamLayout;

// ------------------------------------------------------------------ helpers

/// (teacher grid, student grid) of one pair.
type GridPair = (Vec<f32>, Vec<f32>);

/// The kit's SplitMix64 with this file's f32 draws (each value rounded to
/// f32 before it is scaled), so the inputs stay bit-for-bit.
struct Rng(sere_testkit::Rng);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(sere_testkit::Rng::new(seed))
    }
    fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.0.uniform() as f32
    }
    fn vec(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| self.0.normal() as f32 * std).collect()
    }
}

/// Compares an analytic gradient with a numerical one: every element within
/// `rtol * |n| + atol_frac * max|n|`, and the whole vector within `rtol` in
/// relative L2 norm. A sign error or a factor 2 on any element that is not
/// negligible fails.
fn assert_grad_close(what: &str, analytic: &[f32], numeric: &[f64], rtol: f64, atol_frac: f64) {
    assert_eq!(analytic.len(), numeric.len(), "{what}: lengths");
    let maxn = numeric.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(maxn > 0.0, "{what}: numerical gradient is identically zero");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (i, (&a, &n)) in analytic.iter().zip(numeric).enumerate() {
        let err = (a as f64 - n).abs();
        assert!(
            err <= rtol * n.abs() + atol_frac * maxn,
            "{what}[{i}]: analytic {a} vs numeric {n} (max |grad| {maxn})"
        );
        num += err * err;
        den += n * n;
    }
    let rel = (num / den).sqrt();
    assert!(rel <= rtol, "{what}: relative L2 error {rel}");
}

/// Central differences of `f` w.r.t. every element of `v`.
fn numeric_grad(v: &mut [f32], h: f32, mut f: impl FnMut(&[f32]) -> f64) -> Vec<f64> {
    (0..v.len())
        .map(|i| {
            let x0 = v[i];
            v[i] = x0 + h;
            let fp = f(v);
            v[i] = x0 - h;
            let fm = f(v);
            v[i] = x0;
            // Use the actually representable step.
            (fp - fm) / ((x0 + h) as f64 - (x0 - h) as f64)
        })
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

// ------------------------------------------------- heads on any backend

on_every_backend! {
    dino_head_backward_matches_finite_differences => dino_fd;
    dino_head_init_and_output_norms => dino_init;
    sere_student_backward_matches_finite_differences => sere_fd;
    sere_batch_norm_matches_core_and_running_stats => sere_bn;
    dino_head_matches_pytorch_reference => dino_reference;
    sere_heads_match_pytorch_reference => sere_reference;
}

/// A SERE head's batch-norm statistics on the host (the checkpoint's form).
type HostState = SereHeadState<Cpu>;

fn host_state(head: &SereHead) -> HostState {
    head.new_state(&Cpu).unwrap()
}

/// The DINO head's logits for host inputs, on `be`.
fn dino_fwd<B: Backend>(
    be: &B,
    head: &DinoHead,
    params: &[f32],
    x: &[f32],
    rows: usize,
    acts: &mut Option<DinoHeadActs<B>>,
) -> Vec<f32> {
    head.prepare(be, acts, rows).unwrap();
    let a = acts.as_mut().unwrap();
    head.forward(be, &up(be, params), &up(be, x), a).unwrap();
    down(be, a.logits())
}

/// The DINO head's backward on `be`, adding into host `grads` and `dx`.
fn dino_bwd<B: Backend>(
    be: &B,
    head: &DinoHead,
    params: &[f32],
    acts: &mut Option<DinoHeadActs<B>>,
    dlogits: &[f32],
    grads: &mut Vec<f32>,
    dx: &mut Vec<f32>,
) {
    let (mut g, mut d) = (up(be, grads), up(be, dx));
    let a = acts.as_mut().unwrap();
    head.backward(be, &up(be, params), a, &up(be, dlogits), &mut g, &mut d)
        .unwrap();
    *grads = down(be, &g);
    *dx = down(be, &d);
}

fn to_device<B: Backend>(be: &B, s: &HostState) -> SereHeadState<B> {
    let bn = |r: &BnRunning<Cpu>| BnRunning {
        mean: up(be, &r.mean),
        var: up(be, &r.var),
    };
    SereHeadState {
        projection: bn(&s.projection),
        predictor: bn(&s.predictor),
    }
}

fn to_host<B: Backend>(be: &B, s: &SereHeadState<B>) -> HostState {
    let bn = |r: &BnRunning<B>| BnRunning {
        mean: down(be, &r.mean),
        var: down(be, &r.var),
    };
    SereHeadState {
        projection: bn(&s.projection),
        predictor: bn(&s.predictor),
    }
}

/// A SERE head's forward on `side` (teacher: the projection; student: the
/// predictor stacked on it) on `be` for host inputs; the host `state` is
/// updated as the device's was.
#[allow(clippy::too_many_arguments)]
fn sere_fwd<B: Backend>(
    be: &B,
    head: &SereHead,
    side: SereSide,
    params: &[f32],
    state: &mut HostState,
    mode: BnMode,
    x: &[f32],
    rows: usize,
    acts: &mut Option<SereActs<B>>,
) -> Vec<f32> {
    head.prepare(be, acts, rows, side).unwrap();
    let a = acts.as_mut().unwrap();
    let mut st = to_device(be, state);
    let (p, x) = (up(be, params), up(be, x));
    head.forward(be, &p, &mut st, mode, &x, a).unwrap();
    *state = to_host(be, &st);
    down(be, a.output())
}

/// The student-side backward on `be`, adding into host `grads` and `dx`.
#[allow(clippy::too_many_arguments)]
fn sere_bwd<B: Backend>(
    be: &B,
    head: &SereHead,
    params: &[f32],
    x: &[f32],
    acts: &mut Option<SereActs<B>>,
    dout: &[f32],
    grads: &mut Vec<f32>,
    dx: &mut Vec<f32>,
) {
    let (mut g, mut d) = (up(be, grads), up(be, dx));
    let a = acts.as_mut().unwrap();
    let (p, x, dout) = (up(be, params), up(be, x), up(be, dout));
    let into = Grads {
        input: &mut d,
        params: &mut g,
    };
    head.backward(be, &p, &x, a, &dout, into).unwrap();
    *grads = down(be, &g);
    *dx = down(be, &d);
}

// ------------------------------------------------------------- DINO head FD

fn small_dino(nlayers: usize, norm_last_layer: bool) -> (ParamLayout, DinoHead) {
    let mut layout = ParamLayout::new();
    let cfg = DinoHeadConfig {
        in_dim: 6,
        out_dim: 7,
        hidden_dim: 8,
        bottleneck_dim: 5,
        nlayers,
        norm_last_layer,
    };
    let head = DinoHead::new(&mut layout, "head", cfg);
    (layout, head)
}

#[test]
fn dino_head_layout_names_and_last_layer() {
    let (layout, head) = small_dino(3, true);
    let names: Vec<&str> = layout.entries().iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "head.mlp.0.weight",
            "head.mlp.0.bias",
            "head.mlp.2.weight",
            "head.mlp.2.bias",
            "head.mlp.4.weight",
            "head.mlp.4.bias",
            "head.last_layer.weight_v"
        ]
    );
    let last = layout.get("head.last_layer.weight_v").unwrap();
    assert_eq!(head.last_layer_range(), last.range);
    assert_eq!(last.shape, [7, 5]);
    assert_eq!(head.param_range(), 0..layout.len());
    assert!(
        !layout.get("head.mlp.0.bias").unwrap().decay
            && layout.get("head.mlp.0.weight").unwrap().decay
    );
}

#[test]
fn a_learned_gain_is_a_last_layer_tensor_initialised_to_one() {
    use rand::SeedableRng;
    let (layout, head) = small_dino(3, false);
    let v = layout.get("head.last_layer.weight_v").unwrap();
    let g = layout.get("head.last_layer.weight_g").unwrap();
    // PyTorch's weight_norm(dim=0) shape; decayed like DINO's rule decays
    // every tensor that is not 1-D or a bias.
    assert_eq!((g.shape.as_slice(), g.decay), (&[7, 1][..], true));
    assert_eq!(g.range.start, v.range.end);
    assert_eq!(head.last_layer_range(), v.range.start..g.range.end);
    assert_eq!(head.param_range(), 0..layout.len());
    let mut params = vec![0.0f32; layout.len()];
    layout.init(&mut params, &mut rand_chacha::ChaCha8Rng::seed_from_u64(1));
    assert!(params[g.range.clone()].iter().all(|&v| v == 1.0));
}

fn check_dino_fd<B: Backend>(be: &B, nlayers: usize, norm_last_layer: bool, seed: u64) {
    let (layout, head) = small_dino(nlayers, norm_last_layer);
    let mut rng = Rng::new(seed);
    let rows = 4;
    let mut params = rng.vec(layout.len(), 0.5);
    let mut x = rng.vec(rows * 6, 1.0);
    let r = rng.vec(rows * 7, 1.0);
    let mut acts = None;
    dino_fwd(be, &head, &params, &x, rows, &mut acts);
    let mut grads = vec![0.0f32; layout.len()];
    let mut dx = vec![0.0f32; x.len()];
    dino_bwd(be, &head, &params, &mut acts, &r, &mut grads, &mut dx);

    let h = 2e-3;
    let mut ws = None;
    let xc = x.clone();
    let ng = numeric_grad(&mut params, h, |p| {
        dot(&dino_fwd(be, &head, p, &xc, rows, &mut ws), &r)
    });
    assert_grad_close(&format!("dino({nlayers}) params"), &grads, &ng, 1e-2, 1e-3);
    let pc = params.clone();
    let nx = numeric_grad(&mut x, h, |xv| {
        dot(&dino_fwd(be, &head, &pc, xv, rows, &mut ws), &r)
    });
    assert_grad_close(&format!("dino({nlayers}) dx"), &dx, &nx, 1e-2, 1e-3);

    // ADD semantics: a second backward doubles the buffers.
    let g1 = grads.clone();
    dino_fwd(be, &head, &params, &x, rows, &mut acts);
    dino_bwd(be, &head, &params, &mut acts, &r, &mut grads, &mut dx);
    for (a, b) in grads.iter().zip(&g1) {
        assert!((a - 2.0 * b).abs() <= 1e-5 * (1.0 + b.abs()));
    }
}

fn dino_fd<B: Backend>(be: &B) {
    check_dino_fd(be, 3, true, 1);
    check_dino_fd(be, 1, true, 2);
    check_dino_fd(be, 3, false, 3);
}

fn dino_init<B: Backend>(be: &B) {
    use rand::SeedableRng;
    let mut layout = ParamLayout::new();
    let head = DinoHead::new(&mut layout, "h", DinoHeadConfig::new(16, 32));
    assert_eq!(head.config().hidden_dim, 2048);
    let mut params = vec![0.0f32; layout.len()];
    layout.init(&mut params, &mut rand_chacha::ChaCha8Rng::seed_from_u64(3));
    let x = Rng::new(4).vec(3 * 16, 1.0);
    let logits = dino_fwd(be, &head, &params, &x, 3, &mut None);
    // Unit-norm features against unit-norm prototypes: cosines.
    assert!(logits.iter().all(|v| v.abs() <= 1.0 + 1e-5));
    assert!(logits.iter().any(|v| v.abs() > 1e-3));
}

// ------------------------------------------------------------ SERE heads FD

fn small_sere(c: usize) -> (ParamLayout, SereHead) {
    let mut layout = ParamLayout::new();
    let head = SereHead::new(&mut layout, "sere.spatial.global", c);
    (layout, head)
}

fn sere_fd<B: Backend>(be: &B) {
    let (c, rows) = (5, 12);
    let (layout, head) = small_sere(c);
    let mut rng = Rng::new(7);
    let mut params = rng.vec(layout.len(), 0.6);
    // BN scales near 1 and shifts slightly positive: most units active.
    for name in ["predictor.bn.weight", "projector.bn.weight"] {
        let r = layout
            .get(&format!("sere.spatial.global.{name}"))
            .unwrap()
            .range
            .clone();
        params[r].iter_mut().for_each(|v| *v = 1.0 + 0.3 * *v);
    }
    let mut x = rng.vec(rows * c, 1.0);
    let r = rng.vec(rows * c, 1.0);
    let mut state = host_state(&head);
    let mut acts = None;
    let out = sere_fwd(
        be,
        &head,
        SereSide::Student,
        &params,
        &mut state,
        BnMode::Train,
        &x,
        rows,
        &mut acts,
    );
    assert!(out.contains(&0.0), "the test should cover the ReLU mask");
    let mut grads = vec![0.0f32; layout.len()];
    let mut dx = vec![0.0f32; x.len()];
    sere_bwd(be, &head, &params, &x, &mut acts, &r, &mut grads, &mut dx);
    // The predictor is stacked on the projection: its gradient reaches the
    // projection's batch norm (a predictor on the raw tokens would leave it
    // at exactly zero).
    let proj = layout
        .get("sere.spatial.global.projector.bn.weight")
        .unwrap()
        .range
        .start;
    assert!(
        grads[proj..proj + 2 * c].iter().all(|&g| g != 0.0),
        "every projection BN parameter gets a gradient: {:?}",
        &grads[proj..proj + 2 * c]
    );

    let h = 1e-3;
    let mut ws = None;
    let xc = x.clone();
    let ng = numeric_grad(&mut params, h, |p| {
        let mut st = host_state(&head);
        dot(
            &sere_fwd(
                be,
                &head,
                SereSide::Student,
                p,
                &mut st,
                BnMode::Train,
                &xc,
                rows,
                &mut ws,
            ),
            &r,
        )
    });
    assert_grad_close("sere student params", &grads, &ng, 1e-2, 1e-3);
    let pc = params.clone();
    let nx = numeric_grad(&mut x, h, |xv| {
        let mut st = host_state(&head);
        dot(
            &sere_fwd(
                be,
                &head,
                SereSide::Student,
                &pc,
                &mut st,
                BnMode::Train,
                xv,
                rows,
                &mut ws,
            ),
            &r,
        )
    });
    assert_grad_close("sere student dx", &dx, &nx, 1e-2, 1e-3);
}

fn sere_bn<B: Backend>(be: &B) {
    let (c, rows) = (7, 300); // several parallel tasks
    let (layout, head) = small_sere(c);
    let mut rng = Rng::new(11);
    let params = rng.vec(layout.len(), 0.7);
    let x: Vec<f32> = rng.vec(rows * c, 2.0).iter().map(|v| v + 0.5).collect();
    let g = layout
        .get("sere.spatial.global.projector.bn.weight")
        .unwrap()
        .range
        .clone();
    let b = layout
        .get("sere.spatial.global.projector.bn.bias")
        .unwrap()
        .range
        .clone();
    let mut state = host_state(&head);
    let mut acts = None;
    let z = sere_fwd(
        be,
        &head,
        SereSide::Teacher,
        &params,
        &mut state,
        BnMode::Train,
        &x,
        rows,
        &mut acts,
    );
    let (mut y, mut m, mut v, mut rs) = (
        vec![0.0; rows * c],
        vec![0.0; c],
        vec![0.0; c],
        vec![0.0; c],
    );
    sere_core::norm::batch_norm_forward(
        &x,
        &params[g.clone()],
        &params[b.clone()],
        rows,
        c,
        BN_EPS,
        &mut y,
        &mut m,
        &mut v,
        &mut rs,
    )
    .unwrap();
    for (a, e) in z.iter().zip(&y) {
        assert!(
            (a - e.max(0.0)).abs() <= 1e-5 * (1.0 + e.abs()),
            "{a} vs {e}"
        );
    }
    let (mut rm, mut rv) = (vec![0.0; c], vec![1.0; c]);
    sere_core::norm::batch_norm_update_running(&m, &v, rows, 0.1, &mut rm, &mut rv).unwrap();
    for j in 0..c {
        assert!(
            (state.projection.mean[j] - rm[j]).abs() <= 1e-5
                && (state.projection.var[j] - rv[j]).abs() <= 1e-5
        );
    }
    assert_eq!(
        state.predictor,
        host_state(&head).predictor,
        "the predictor's statistics are untouched"
    );
    // Eval mode uses (and keeps) the running statistics.
    let before = state.clone();
    let ze = sere_fwd(
        be,
        &head,
        SereSide::Teacher,
        &params,
        &mut state,
        BnMode::Eval,
        &x,
        rows,
        &mut acts,
    );
    assert_eq!(state, before);
    sere_core::norm::batch_norm_eval(
        &x, &params[g], &params[b], &rm, &rv, rows, c, BN_EPS, &mut y,
    )
    .unwrap();
    for (a, e) in ze.iter().zip(&y) {
        assert!((a - e.max(0.0)).abs() <= 1e-5 * (1.0 + e.abs()));
    }
}

// ------------------------------------------------------- relation losses FD

struct RelCase {
    shapes: ViewShapes,
    cfg: SereLossConfig,
    teacher_sp: Vec<f32>,
    teacher_ch: Vec<f32>,
    sp_g: Vec<f32>,
    sp_l: Vec<f32>,
    ch_g: Vec<f32>,
    ch_l: Vec<f32>,
    /// `[b][t][s]` (s over all views; `s == t` unused).
    grids: Vec<Option<GridPair>>,
}

impl RelCase {
    fn new(seed: u64) -> Self {
        let shapes = ViewShapes {
            batch: 2,
            channels: 4,
            global_hw: (3, 3),
            local_hw: (2, 2),
            locals: 2,
        };
        let mut rng = Rng::new(seed);
        let v = shapes.views();
        let mut grids = Vec::new();
        for b in 0..shapes.batch {
            for t in 0..2 {
                for s in 0..v {
                    // A few pairs without overlap.
                    let none = s == t || (b, t, s) == (0, 0, 2) || (b, t, s) == (1, 1, 0);
                    grids.push((!none).then(|| {
                        let p = if s < 2 { 4 } else { 3 };
                        let mut g = || {
                            (0..2 * p)
                                .map(|_| rng.range(-1.1, 1.1))
                                .collect::<Vec<f32>>()
                        };
                        (g(), g())
                    }));
                }
            }
        }
        RelCase {
            cfg: SereLossConfig::new(2),
            teacher_sp: rng.vec(shapes.globals_len(), 1.0),
            teacher_ch: rng.vec(shapes.globals_len(), 1.0),
            sp_g: rng.vec(shapes.globals_len(), 1.0),
            sp_l: rng.vec(shapes.locals_len(), 1.0),
            ch_g: rng.vec(shapes.globals_len(), 1.0),
            ch_l: rng.vec(shapes.locals_len(), 1.0),
            grids,
            shapes,
        }
    }

    fn grid(&self, b: usize, t: usize, s: usize) -> Option<(&[f32], &[f32])> {
        let v = self.shapes.views();
        self.grids[(b * 2 + t) * v + s]
            .as_ref()
            .map(|(a, c)| (a.as_slice(), c.as_slice()))
    }
}

#[test]
fn relation_loss_gradient_matches_finite_differences() {
    let case = RelCase::new(5);
    let (sh, cfg) = (case.shapes, case.cfg);
    let (alpha, beta) = (0.7f32, 1.3f32);
    let mut loss = SereLoss::new();
    let mut g = [
        vec![0.0; sh.globals_len()],
        vec![0.0; sh.locals_len()],
        vec![0.0; sh.globals_len()],
        vec![0.0; sh.locals_len()],
    ];
    let [gsg, gsl, gcg, gcl] = &mut g;
    let inputs = SereInputs {
        teacher_spatial: &case.teacher_sp,
        teacher_channel: &case.teacher_ch,
        student_spatial: StudentViews {
            globals: &case.sp_g,
            locals: &case.sp_l,
        },
        student_channel: StudentViews {
            globals: &case.ch_g,
            locals: &case.ch_l,
        },
    };
    let out = loss
        .forward_backward(
            &cfg,
            &sh,
            &inputs,
            |b, t, s| case.grid(b, t, s),
            (alpha, beta),
            Some(SereGrads {
                spatial: StudentGrads {
                    globals: gsg,
                    locals: gsl,
                },
                channel: StudentGrads {
                    globals: gcg,
                    locals: gcl,
                },
            }),
        )
        .unwrap();
    assert_eq!(out.spatial_terms, 12 - 2);
    assert_eq!(out.channel_terms, 2 * 2 * 3);
    assert!(out.spatial > 0.0 && out.channel > 0.0);

    let h = 1e-2;
    let objective = |sp_g: &[f32], sp_l: &[f32], ch_g: &[f32], ch_l: &[f32]| -> f64 {
        let mut l = SereLoss::new();
        let inp = SereInputs {
            teacher_spatial: &case.teacher_sp,
            teacher_channel: &case.teacher_ch,
            student_spatial: StudentViews {
                globals: sp_g,
                locals: sp_l,
            },
            student_channel: StudentViews {
                globals: ch_g,
                locals: ch_l,
            },
        };
        let o = l
            .forward_backward(
                &cfg,
                &sh,
                &inp,
                |b, t, s| case.grid(b, t, s),
                (alpha, beta),
                None,
            )
            .unwrap();
        alpha as f64 * o.spatial as f64 + beta as f64 * o.channel as f64
    };
    let (mut a, mut b, mut c, mut d) = (
        case.sp_g.clone(),
        case.sp_l.clone(),
        case.ch_g.clone(),
        case.ch_l.clone(),
    );
    let n = numeric_grad(&mut a, h, |v| {
        objective(v, &case.sp_l, &case.ch_g, &case.ch_l)
    });
    assert_grad_close("spatial globals", &g[0], &n, 1e-2, 2e-3);
    let n = numeric_grad(&mut b, h, |v| {
        objective(&case.sp_g, v, &case.ch_g, &case.ch_l)
    });
    assert_grad_close("spatial locals", &g[1], &n, 1e-2, 2e-3);
    let n = numeric_grad(&mut c, h, |v| {
        objective(&case.sp_g, &case.sp_l, v, &case.ch_l)
    });
    assert_grad_close("channel globals", &g[2], &n, 1e-2, 2e-3);
    let n = numeric_grad(&mut d, h, |v| {
        objective(&case.sp_g, &case.sp_l, &case.ch_g, v)
    });
    assert_grad_close("channel locals", &g[3], &n, 1e-2, 2e-3);
}

#[test]
fn relation_loss_matches_core_kernels_term_by_term() {
    use sere_core::bilinear::{grid_sample_forward, MapLayout, SampleShape};
    use sere_core::loss::relation_cross_entropy;
    use sere_core::relation::{channel_relation_forward, spatial_relation_forward};
    let case = RelCase::new(9);
    let (sh, cfg) = (case.shapes, case.cfg);
    let c = sh.channels;
    let (ng, nl) = (sh.global_tokens() * c, sh.local_tokens() * c);
    let map = |buf_g: &[f32], buf_l: &[f32], s: usize, b: usize| -> (Vec<f32>, (usize, usize)) {
        if s < 2 {
            (
                buf_g[(s * sh.batch + b) * ng..][..ng].to_vec(),
                sh.global_hw,
            )
        } else {
            (
                buf_l[((s - 2) * sh.batch + b) * nl..][..nl].to_vec(),
                sh.local_hw,
            )
        }
    };
    let (mut sp, mut ch, mut nsp, mut nch) = (0.0f64, 0.0f64, 0, 0);
    for b in 0..sh.batch {
        for t in 0..2 {
            let tm = |buf: &[f32]| buf[(t * sh.batch + b) * ng..][..ng].to_vec();
            for s in (0..sh.views()).filter(|&s| s != t) {
                let (xs, (h, w)) = map(&case.ch_g, &case.ch_l, s, b);
                let (mut lt, mut ls) = (vec![0.0; c * c], vec![0.0; c * c]);
                channel_relation_forward(&tm(&case.teacher_ch), 9, c, &mut lt).unwrap();
                channel_relation_forward(&xs, h * w, c, &mut ls).unwrap();
                ch += relation_cross_entropy(&ls, &lt, c, c, 1.0, 0.1).unwrap() as f64;
                nch += 1;
                let Some((gt, gs)) = case.grid(b, t, s) else {
                    continue;
                };
                let p = gt.len() / 2;
                let (xsm, (h, w)) = map(&case.sp_g, &case.sp_l, s, b);
                let (mut st, mut ss) = (vec![0.0; p * c], vec![0.0; p * c]);
                let shp = |h, w| SampleShape {
                    channels: c,
                    height: h,
                    width: w,
                    points: p,
                };
                grid_sample_forward(
                    &tm(&case.teacher_sp),
                    gt,
                    shp(3, 3),
                    MapLayout::Hwc,
                    &mut st,
                )
                .unwrap();
                grid_sample_forward(&xsm, gs, shp(h, w), MapLayout::Hwc, &mut ss).unwrap();
                let (mut lt, mut ls) = (vec![0.0; 2 * p * p], vec![0.0; 2 * p * p]);
                spatial_relation_forward(&st, p, c, 2, &mut lt).unwrap();
                spatial_relation_forward(&ss, p, c, 2, &mut ls).unwrap();
                sp += relation_cross_entropy(&ls, &lt, 2 * p, p, 1.0, 0.5).unwrap() as f64;
                nsp += 1;
            }
        }
    }
    let mut loss = SereLoss::new();
    let st = StudentViews {
        globals: &case.sp_g,
        locals: &case.sp_l,
    };
    let (l_sp, t_sp) = loss
        .spatial(
            &cfg,
            &sh,
            (&case.teacher_sp, st),
            |b, t, s| case.grid(b, t, s),
            1.0,
            None,
        )
        .unwrap();
    let stc = StudentViews {
        globals: &case.ch_g,
        locals: &case.ch_l,
    };
    let (l_ch, t_ch) = loss
        .channel(&cfg, &sh, (&case.teacher_ch, stc), 1.0, None)
        .unwrap();
    assert_eq!((t_sp, t_ch), (nsp, nch));
    assert!(
        (l_sp as f64 - sp / nsp as f64).abs() < 1e-5,
        "{l_sp} vs {}",
        sp / nsp as f64
    );
    assert!(
        (l_ch as f64 - ch / nch as f64).abs() < 1e-5,
        "{l_ch} vs {}",
        ch / nch as f64
    );
}

#[test]
fn spatial_loss_without_overlap_is_zero_and_adds_nothing() {
    let case = RelCase::new(3);
    let sh = case.shapes;
    let mut gg = vec![0.0; sh.globals_len()];
    let mut gl = vec![0.0; sh.locals_len()];
    let st = StudentViews {
        globals: &case.sp_g,
        locals: &case.sp_l,
    };
    let out = SereLoss::new()
        .spatial(
            &case.cfg,
            &sh,
            (&case.teacher_sp, st),
            |_, _, _| None,
            1.0,
            Some(StudentGrads {
                globals: &mut gg,
                locals: &mut gl,
            }),
        )
        .unwrap();
    assert_eq!(out, (0.0, 0));
    assert!(gg.iter().chain(&gl).all(|&v| v == 0.0));
}

#[test]
fn gradient_checker_rejects_wrong_gradients() {
    // The tolerance used above must catch a sign error or a factor 2.
    let n = [0.3f64, -0.2, 0.05, 1e-5];
    let ok = [0.3f32, -0.2, 0.05, 0.0];
    assert_grad_close("ok", &ok, &n, 1e-2, 1e-3);
    for bad in [
        [0.6f32, -0.2, 0.05, 0.0],
        [0.3, 0.2, 0.05, 0.0],
        [0.3, -0.2, 0.1, 0.0],
    ] {
        let r = std::panic::catch_unwind(|| assert_grad_close("bad", &bad, &n, 1e-2, 1e-3));
        assert!(r.is_err(), "{bad:?} passed");
    }
}

// --------------------------------------------------- PyTorch float64 fixture

fn fixture() -> HashMap<String, Vec<f64>> {
    let text = include_str!("fixtures/heads.txt");
    let mut m = HashMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut it = line.split_whitespace();
        let name = it.next().unwrap().to_string();
        let n: usize = it.next().unwrap().parse().unwrap();
        let v: Vec<f64> = it.map(|s| s.parse().unwrap()).collect();
        assert_eq!(v.len(), n, "fixture entry {name}");
        m.insert(name, v);
    }
    m
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// `|a - r| <= rtol * max|r|` element-wise (relative to the tensor's scale)
/// and `||a - r|| <= rtol * ||r||`.
fn assert_ref(what: &str, a: &[f32], r: &[f64], rtol: f64) {
    assert_eq!(a.len(), r.len(), "{what}: lengths");
    let maxr = r.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let (mut num, mut den) = (0.0, 0.0);
    for (i, (&x, &y)) in a.iter().zip(r).enumerate() {
        let e = (x as f64 - y).abs();
        assert!(
            e <= rtol * maxr,
            "{what}[{i}]: {x} vs reference {y} (scale {maxr})"
        );
        num += e * e;
        den += y * y;
    }
    let rel = if den == 0.0 { 0.0 } else { (num / den).sqrt() };
    eprintln!("{what}: relative L2 error {rel:.1e}");
    assert!(rel <= rtol, "{what}: relative error {rel}");
}

fn dino_reference<B: Backend>(be: &B) {
    dino_reference_case(be, "dino", true);
    dino_reference_case(be, "dinog", false);
}

/// The fixture's DINO head `tag` (`dinog`: a learned last-layer gain).
fn dino_reference_case<B: Backend>(be: &B, tag: &str, norm_last_layer: bool) {
    let fx = fixture();
    let key = |k: &str| format!("{tag}.{k}");
    let c: Vec<usize> = fx[&key("cfg")].iter().map(|&v| v as usize).collect();
    let cfg = DinoHeadConfig {
        in_dim: c[0],
        hidden_dim: c[1],
        bottleneck_dim: c[2],
        out_dim: c[3],
        nlayers: c[4],
        norm_last_layer,
    };
    let rows = c[5];
    let mut layout = ParamLayout::new();
    let head = DinoHead::new(&mut layout, "head", cfg);
    let params = f32s(&fx[&key("params")]);
    assert_eq!(params.len(), layout.len());
    let x = f32s(&fx[&key("x")]);
    let mut acts = None;
    let logits = dino_fwd(be, &head, &params, &x, rows, &mut acts);
    assert_ref(&key("logits"), &logits, &fx[&key("logits")], 1e-4);
    let mut grads = vec![0.0; layout.len()];
    let mut dx = vec![0.0; x.len()];
    let dlogits = f32s(&fx[&key("dlogits")]);
    dino_bwd(be, &head, &params, &mut acts, &dlogits, &mut grads, &mut dx);
    assert_ref(&key("grads"), &grads, &fx[&key("grads")], 1e-4);
    assert_ref(&key("dx"), &dx, &fx[&key("dx")], 1e-4);
}

fn sere_reference<B: Backend>(be: &B) {
    let fx = fixture();
    let (c, rows) = (fx["sere.cfg"][0] as usize, fx["sere.cfg"][1] as usize);
    let (layout, head) = small_sere(c);
    let params = f32s(&fx["sere.params"]);
    assert_eq!(params.len(), layout.len());
    let x = f32s(&fx["sere.x"]);
    let fwd = |side, state: &mut HostState, mode, acts: &mut Option<SereActs<B>>| {
        sere_fwd(be, &head, side, &params, state, mode, &x, rows, acts)
    };
    let running = |r: &BnRunning<Cpu>| [r.mean.clone(), r.var.clone()].concat();
    // Teacher side: the projection alone.
    let mut state = host_state(&head);
    let mut tacts = None;
    let z = fwd(SereSide::Teacher, &mut state, BnMode::Train, &mut tacts);
    assert_ref("teacher projection", &z, &fx["sere.proj"], 1e-4);
    let pr = running(&state.projection);
    assert_ref(
        "teacher projection running",
        &pr,
        &fx["sere.proj_running"],
        1e-4,
    );
    assert_eq!(state.predictor, host_state(&head).predictor);

    // Student side: the predictor on the student's own projection.
    let mut state = host_state(&head);
    let mut acts = None;
    let p = fwd(SereSide::Student, &mut state, BnMode::Train, &mut acts);
    let zs = down(be, acts.as_ref().unwrap().projection());
    assert_ref("student projection", &zs, &fx["sere.proj"], 1e-4);
    assert_ref("student predictor", &p, &fx["sere.pred"], 1e-4);
    let pr = running(&state.projection);
    assert_ref(
        "student projection running",
        &pr,
        &fx["sere.proj_running"],
        1e-4,
    );
    let qr = running(&state.predictor);
    assert_ref(
        "student predictor running",
        &qr,
        &fx["sere.pred_running"],
        1e-4,
    );
    let mut grads = vec![0.0; layout.len()];
    let mut dx = vec![0.0; x.len()];
    let dout = f32s(&fx["sere.dout"]);
    sere_bwd(
        be, &head, &params, &x, &mut acts, &dout, &mut grads, &mut dx,
    );
    assert_ref("student grads", &grads, &fx["sere.grads"], 1e-4);
    assert_ref("student dx", &dx, &fx["sere.dx"], 1e-4);

    // Eval mode, from the running statistics of both stages.
    let mut ws = None;
    let ze = fwd(SereSide::Teacher, &mut state, BnMode::Eval, &mut ws);
    assert_ref("projection eval", &ze, &fx["sere.proj_eval"], 1e-4);
    let mut ws = None;
    let pe = fwd(SereSide::Student, &mut state, BnMode::Eval, &mut ws);
    assert_ref("predictor eval", &pe, &fx["sere.pred_eval"], 1e-4);
}

#[test]
fn relation_losses_match_pytorch_reference() {
    let fx = fixture();
    let c: Vec<usize> = fx["rel.cfg"].iter().map(|&v| v as usize).collect();
    let shapes = ViewShapes {
        batch: c[0],
        channels: c[1],
        global_hw: (c[3], c[4]),
        local_hw: (c[5], c[6]),
        locals: c[7],
    };
    let cfg = SereLossConfig::new(c[2]);
    let w = &fx["rel.weights"];
    let get = |n: &str| f32s(&fx[&format!("rel.{n}")]);
    let (tsp, tch, spg, spl, chg, chl) = (
        get("t_sp"),
        get("t_ch"),
        get("s_sp_g"),
        get("s_sp_l"),
        get("s_ch_g"),
        get("s_ch_l"),
    );
    let mut grids: HashMap<(usize, usize, usize), GridPair> = HashMap::new();
    for (k, v) in &fx {
        if let Some(rest) = k.strip_prefix("rel.grid.") {
            let i: Vec<usize> = rest.split('.').map(|s| s.parse().unwrap()).collect();
            let v = f32s(v);
            let half = v.len() / 2;
            grids.insert((i[0], i[1], i[2]), (v[..half].to_vec(), v[half..].to_vec()));
        }
    }
    let mut g = [
        vec![0.0; shapes.globals_len()],
        vec![0.0; shapes.locals_len()],
        vec![0.0; shapes.globals_len()],
        vec![0.0; shapes.locals_len()],
    ];
    let [a, b, cc, d] = &mut g;
    let inputs = SereInputs {
        teacher_spatial: &tsp,
        teacher_channel: &tch,
        student_spatial: StudentViews {
            globals: &spg,
            locals: &spl,
        },
        student_channel: StudentViews {
            globals: &chg,
            locals: &chl,
        },
    };
    let out = SereLoss::new()
        .forward_backward(
            &cfg,
            &shapes,
            &inputs,
            |b, t, s| {
                grids
                    .get(&(b, t, s))
                    .map(|(x, y)| (x.as_slice(), y.as_slice()))
            },
            (w[0] as f32, w[1] as f32),
            Some(SereGrads {
                spatial: StudentGrads {
                    globals: a,
                    locals: b,
                },
                channel: StudentGrads {
                    globals: cc,
                    locals: d,
                },
            }),
        )
        .unwrap();
    let l = &fx["rel.losses"];
    assert_ref("L_spatial", &[out.spatial], &l[0..1], 1e-5);
    assert_ref("L_channel", &[out.channel], &l[1..2], 1e-5);
    assert_eq!(
        (out.spatial_terms, out.channel_terms),
        (l[2] as usize, l[3] as usize)
    );
    for (i, n) in ["s_sp_g", "s_sp_l", "s_ch_g", "s_ch_l"].iter().enumerate() {
        assert_ref(n, &g[i], &fx[&format!("rel.grad.{n}")], 1e-4);
    }
}

#[test]
fn dino_loss_step_matches_pytorch_reference() {
    let fx = fixture();
    let c = &fx["dloss.cfg"];
    let (v, b, k) = (c[0] as usize, c[1] as usize, c[2] as usize);
    let (ts, tt, scale, mom) = (c[3] as f32, c[4] as f32, c[5] as f32, c[6] as f32);
    let mut centre = f32s(&fx["dloss.centre"]);
    assert_eq!(centre.len(), k);
    let student = f32s(&fx["dloss.student"]);
    let mut grad = vec![0.0; student.len()];
    let args = DinoLossArgs {
        views: v,
        batch: b,
        dim: k,
        tau_student: ts,
        tau_teacher: tt,
        weight: scale,
        centre_momentum: mom,
    };
    let teacher = f32s(&fx["dloss.teacher"]);
    let loss = dino_loss_step((&student, &teacher), &mut centre, args, &mut grad).unwrap();
    assert_ref("dino loss", &[loss], &fx["dloss.loss"], 1e-5);
    assert_ref("dino loss grad", &grad, &fx["dloss.grad"], 1e-4);
    assert_ref("dino centre", &centre, &fx["dloss.centre_new"], 1e-5);
}
