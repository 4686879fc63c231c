//! Self-relations, softmax / log-softmax and the losses built on them:
//! spatial and channel relation forward/backward, relation cross-entropy
//! (and backward) with arbitrary temperatures and scales, row softmax and
//! log-softmax (and backward), the DINO loss (and backward), and the SERE
//! pipeline tokens -> relation logits -> cross-entropy -> token gradient.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sere_core::loss::{
    dino_loss, dino_loss_backward, relation_cross_entropy, relation_cross_entropy_backward, soft_target_cross_entropy,
    DinoShape,
};
use sere_core::relation::{
    channel_relation_backward, channel_relation_forward, spatial_relation_backward, spatial_relation_forward,
};
use sere_core::softmax::{
    log_softmax_backward_rows, log_softmax_rows, softmax_backward_rows, softmax_rows, softmax_rows_in_place,
};
use sere_fuzz::{bounded, dim, fill, finite, Len, Num};

#[derive(Arbitrary, Debug)]
struct Relations {
    n: u8,
    c: u8,
    heads: u8,
    len_x: Len,
    len_logits: Len,
    len_grad_logits: Len,
    len_grad_x: Len,
    x: Vec<Num>,
    grad_logits: Vec<Num>,
    grad_init: Vec<Num>,
}

#[derive(Arbitrary, Debug)]
struct CrossEntropy {
    rows: u8,
    cols: u8,
    len_s: Len,
    len_t: Len,
    len_g: Len,
    s: Vec<Num>,
    t: Vec<Num>,
    tau_s: Num,
    tau_t: Num,
    scale: Num,
}

#[derive(Arbitrary, Debug)]
struct Softmax {
    rows: u8,
    cols: u8,
    len_x: Len,
    len_out: Len,
    len_dy: Len,
    len_dx: Len,
    x: Vec<Num>,
    dy: Vec<Num>,
}

#[derive(Arbitrary, Debug)]
struct Dino {
    student_views: u8,
    teacher_views: u8,
    batch: u8,
    dim: u8,
    len_s: Len,
    len_t: Len,
    len_c: Len,
    len_g: Len,
    s: Vec<Num>,
    t: Vec<Num>,
    centre: Vec<Num>,
    tau_s: Num,
    tau_t: Num,
    scale: Num,
}

#[derive(Arbitrary, Debug)]
struct Pipeline {
    n: u8,
    c: u8,
    heads: u8,
    xs: Vec<Num>,
    xt: Vec<Num>,
    tau_s: Num,
    tau_t: Num,
    scale: Num,
}

#[derive(Arbitrary, Debug)]
enum Input {
    Relations(Relations),
    CrossEntropy(CrossEntropy),
    Softmax(Softmax),
    Dino(Dino),
    Pipeline(Pipeline),
}

/// Bound under which the plain-arithmetic kernels (relations, softmax
/// backward) must give finite results.
const B: f32 = 1e6;

fn positive(v: f32) -> bool {
    v.is_finite() && v > 0.0
}

fn relations(r: Relations) {
    let (n, c, heads) = (dim(r.n, 8), dim(r.c, 16), dim(r.heads, 4));
    let nc = n * c;
    let x = fill(&r.x, r.len_x.get(nc));
    let heads_ok = n > 0 && c > 0 && heads > 0 && c % heads == 0;
    let x_ok = x.len() == nc;
    let x_bounded = bounded(&x, B);

    // Spatial.
    let sn = heads * n * n;
    let mut logits = vec![f32::NAN; r.len_logits.get(sn)];
    let res = spatial_relation_forward(&x, n, c, heads, &mut logits);
    assert_eq!(res.is_ok(), heads_ok && x_ok && logits.len() == sn, "spatial forward: {res:?}");
    if res.is_ok() && x_bounded {
        assert!(finite(&logits), "spatial logits {logits:?}");
        // Symmetric per head.
        for h in 0..heads {
            for i in 0..n {
                for j in 0..n {
                    let (a, b) = (logits[h * n * n + i * n + j], logits[h * n * n + j * n + i]);
                    assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "spatial logits not symmetric");
                }
            }
        }
    }
    let gl = fill(&r.grad_logits, r.len_grad_logits.get(sn));
    let mut gx = fill(&r.grad_init, r.len_grad_x.get(nc));
    let gx0_bounded = bounded(&gx, B);
    let res = spatial_relation_backward(&x, &gl, n, c, heads, &mut gx);
    assert_eq!(
        res.is_ok(),
        heads_ok && x_ok && gl.len() == sn && gx.len() == nc,
        "spatial backward: {res:?}"
    );
    if res.is_ok() && x_bounded && bounded(&gl, B) && gx0_bounded {
        assert!(finite(&gx), "spatial grad_x {gx:?}");
    }

    // Channel.
    let cn = c * c;
    let dims_ok = n > 0 && c > 0;
    let mut logits = vec![f32::NAN; r.len_logits.get(cn)];
    let res = channel_relation_forward(&x, n, c, &mut logits);
    assert_eq!(res.is_ok(), dims_ok && x_ok && logits.len() == cn, "channel forward: {res:?}");
    if res.is_ok() && x_bounded {
        assert!(finite(&logits), "channel logits {logits:?}");
    }
    let gl = fill(&r.grad_logits, r.len_grad_logits.get(cn));
    let mut gx = fill(&r.grad_init, r.len_grad_x.get(nc));
    let gx0_bounded = bounded(&gx, B);
    let res = channel_relation_backward(&x, &gl, n, c, &mut gx);
    assert_eq!(
        res.is_ok(),
        dims_ok && x_ok && gl.len() == cn && gx.len() == nc,
        "channel backward: {res:?}"
    );
    if res.is_ok() && x_bounded && bounded(&gl, B) && gx0_bounded {
        assert!(finite(&gx), "channel grad_x {gx:?}");
    }
}

fn cross_entropy(ce: CrossEntropy) {
    let (rows, cols) = (dim(ce.rows, 8), dim(ce.cols, 16));
    let len = rows * cols;
    let s = fill(&ce.s, ce.len_s.get(len));
    let t = fill(&ce.t, ce.len_t.get(len));
    let (tau_s, tau_t, scale) = (ce.tau_s.get(), ce.tau_t.get(), ce.scale.get());
    let args_ok = rows > 0 && cols > 0 && s.len() == len && t.len() == len && positive(tau_s) && positive(tau_t);

    let res = relation_cross_entropy(&s, &t, rows, cols, tau_s, tau_t);
    if !args_ok {
        assert!(res.is_err(), "bad arguments accepted: {res:?}");
    }
    if !(finite(&s) && finite(&t)) {
        assert!(res.is_err(), "non-finite logits accepted: {res:?}");
    }
    if let Ok(l) = res {
        assert!(l.is_finite() && l >= -1e-3 * (1.0 + l.abs()), "loss {l}");
    }

    let mut g = vec![0.0f32; ce.len_g.get(s.len())];
    let res_b = relation_cross_entropy_backward(&s, &t, rows, cols, tau_s, tau_t, scale, &mut g);
    if !args_ok || g.len() != s.len() {
        assert!(res_b.is_err(), "bad arguments accepted: {res_b:?}");
    }
    if let Ok(l) = res_b {
        // Same loss as the forward-only call.
        assert_eq!(res.ok().map(f32::to_bits), Some(l.to_bits()), "backward loss differs");
        assert!(finite(&g), "non-finite gradient {g:?} (scale {scale}, tau_s {tau_s})");
    }

    // The soft-target form with the raw `t` as an arbitrary target: only
    // shapes, temperature and finiteness are its contract.
    let mut g2 = vec![0.0f32; ce.len_g.get(s.len())];
    let res_st = soft_target_cross_entropy(&s, &t, rows, cols, tau_s, Some((&mut g2, scale)));
    let st_ok = rows > 0 && cols > 0 && s.len() == len && t.len() == len && positive(tau_s) && g2.len() == s.len();
    if !st_ok || !(finite(&s) && finite(&t)) {
        assert!(res_st.is_err(), "bad soft-target arguments accepted: {res_st:?}");
    }
    // With a softmax target it is a cross-entropy: finite, non-negative, and
    // the gradient is finite whenever the call succeeds.
    if args_ok && finite(&t) {
        let mut q: Vec<f32> = t.iter().map(|v| v / tau_t).collect();
        if softmax_rows_in_place(&mut q, rows, cols).is_ok() {
            let mut g3 = vec![0.0f32; s.len()];
            let res_q = soft_target_cross_entropy(&s, &q, rows, cols, tau_s, Some((&mut g3, scale)));
            if let Ok(l) = res_q {
                assert!(l.is_finite() && l >= -1e-3 * (1.0 + l.abs()), "soft-target loss {l}");
                assert!(finite(&g3), "non-finite soft-target gradient (scale {scale}, tau_s {tau_s})");
                let fwd = soft_target_cross_entropy(&s, &q, rows, cols, tau_s, None);
                assert_eq!(fwd.ok().map(f32::to_bits), Some(l.to_bits()), "soft-target backward loss differs");
            }
        }
    }
}

fn softmax(sm: Softmax) {
    let (rows, cols) = (dim(sm.rows, 8), dim(sm.cols, 16));
    let len = rows * cols;
    let x = fill(&sm.x, sm.len_x.get(len));
    let shape_ok = rows > 0 && cols > 0 && x.len() == len;
    let out_len = sm.len_out.get(x.len());

    let mut p = vec![f32::NAN; out_len];
    let res = softmax_rows(&x, rows, cols, &mut p);
    assert_eq!(res.is_ok(), shape_ok && out_len == x.len() && finite(&x), "softmax: {res:?}");
    let mut q = x.clone();
    let res_ip = softmax_rows_in_place(&mut q, rows, cols);
    assert_eq!(res_ip.is_ok(), shape_ok && finite(&x), "softmax in place: {res_ip:?}");
    if res.is_ok() {
        assert!(p.iter().all(|v| v.is_finite() && (0.0..=1.0).contains(v)), "softmax {p:?}");
        for row in p.chunks_exact(cols) {
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() <= 1e-5 * cols as f32, "softmax row sums to {sum}");
        }
        assert_eq!(
            p.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            q.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "in-place softmax differs"
        );
    }

    let mut l = vec![f32::NAN; out_len];
    let res_l = log_softmax_rows(&x, rows, cols, &mut l);
    assert_eq!(res_l.is_ok(), res.is_ok(), "log-softmax: {res_l:?}");
    if res_l.is_ok() {
        // Finite inputs never give NaN or a positive log-probability; within
        // +-1e30 (the module's claim) every value is finite.
        assert!(l.iter().all(|v| !v.is_nan() && *v <= 0.0), "log-softmax {l:?}");
        if bounded(&x, 1e30) {
            assert!(finite(&l), "log-softmax {l:?}");
        }
        if bounded(&x, 1e3) {
            for (lv, pv) in l.iter().zip(&p) {
                assert!((lv.exp() - pv).abs() <= 1e-5, "exp(log-softmax) {lv} vs softmax {pv}");
            }
        }
    }

    // Backward passes on the forward outputs.
    if res.is_ok() {
        let dy = fill(&sm.dy, sm.len_dy.get(len));
        let mut dx = vec![0.0f32; sm.len_dx.get(len)];
        let grads_ok = dy.len() == len && dx.len() == len;
        let r = softmax_backward_rows(&p, &dy, rows, cols, &mut dx);
        assert_eq!(r.is_ok(), grads_ok, "softmax backward: {r:?}");
        if r.is_ok() && bounded(&dy, B) {
            assert!(finite(&dx), "softmax backward {dx:?}");
        }
        let mut dx = vec![0.0f32; sm.len_dx.get(len)];
        let r = log_softmax_backward_rows(&l, &dy, rows, cols, &mut dx);
        assert_eq!(r.is_ok(), grads_ok, "log-softmax backward: {r:?}");
        if r.is_ok() && bounded(&dy, B) {
            assert!(finite(&dx), "log-softmax backward {dx:?}");
        }
    }
}

fn dino(d: Dino) {
    let shape = DinoShape {
        student_views: dim(d.student_views, 4),
        teacher_views: dim(d.teacher_views, 3),
        batch: dim(d.batch, 3),
        dim: dim(d.dim, 8),
    };
    let view = shape.batch * shape.dim;
    let s = fill(&d.s, d.len_s.get(shape.student_views * view));
    let t = fill(&d.t, d.len_t.get(shape.teacher_views * view));
    let c = fill(&d.centre, d.len_c.get(shape.dim));
    let (tau_s, tau_t, scale) = (d.tau_s.get(), d.tau_t.get(), d.scale.get());
    let args_ok = shape.student_views > 0
        && shape.teacher_views > 0
        && view > 0
        && shape.pairs() > 0
        && s.len() == shape.student_views * view
        && t.len() == shape.teacher_views * view
        && c.len() == shape.dim
        && positive(tau_s)
        && positive(tau_t);

    let res = dino_loss(&s, &t, &c, shape, tau_s, tau_t);
    if !args_ok {
        assert!(res.is_err(), "bad arguments accepted: {res:?}");
    }
    if let Ok(l) = res {
        assert!(l.is_finite() && l >= -1e-3 * (1.0 + l.abs()), "dino loss {l}");
    }
    let mut g = vec![0.0f32; d.len_g.get(s.len())];
    let res_b = dino_loss_backward(&s, &t, &c, shape, tau_s, tau_t, scale, &mut g);
    if !args_ok || g.len() != s.len() {
        assert!(res_b.is_err(), "bad arguments accepted: {res_b:?}");
    }
    if let Ok(l) = res_b {
        assert_eq!(res.ok().map(f32::to_bits), Some(l.to_bits()), "backward loss differs");
        assert!(finite(&g), "non-finite dino gradient {g:?} (scale {scale}, tau_s {tau_s}, centre {c:?})");
    }
}

fn pipeline(pl: Pipeline) {
    let (n, c, heads) = (1 + dim(pl.n, 7), 1 + dim(pl.c, 15), 1 + dim(pl.heads, 3));
    if c % heads != 0 {
        return;
    }
    let xs = fill(&pl.xs, n * c);
    let xt = fill(&pl.xt, n * c);
    let m = heads * n * n;
    let (mut ls, mut lt) = (vec![0.0f32; m], vec![0.0f32; m]);
    spatial_relation_forward(&xs, n, c, heads, &mut ls).unwrap();
    spatial_relation_forward(&xt, n, c, heads, &mut lt).unwrap();
    let mut g = vec![0.0f32; m];
    let (tau_s, tau_t, scale) = (pl.tau_s.get(), pl.tau_t.get(), pl.scale.get());
    let res = relation_cross_entropy_backward(&ls, &lt, heads * n, n, tau_s, tau_t, scale, &mut g);
    if !(positive(tau_s) && positive(tau_t)) {
        assert!(res.is_err(), "bad temperature accepted");
    }
    if let Ok(l) = res {
        assert!(l.is_finite(), "pipeline loss {l}");
        assert!(finite(&g), "pipeline logits gradient {g:?}");
        let mut gx = vec![0.0f32; n * c];
        spatial_relation_backward(&xs, &g, n, c, heads, &mut gx).unwrap();
        if bounded(&xs, B) && bounded(&g, B) {
            assert!(finite(&gx), "pipeline token gradient {gx:?}");
        }
    }
}

fuzz_target!(|inp: Input| {
    match inp {
        Input::Relations(r) => relations(r),
        Input::CrossEntropy(ce) => cross_entropy(ce),
        Input::Softmax(sm) => softmax(sm),
        Input::Dino(d) => dino(d),
        Input::Pipeline(pl) => pipeline(pl),
    }
});
