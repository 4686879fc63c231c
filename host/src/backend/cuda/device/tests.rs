//! Each operation against the CPU reference (`backend::cpu`,
//! `backend::cpu::relation_loss`, or a direct loop where the CPU's is private).
//! They need a GPU: without one each prints `skipped: <reason>`.

use super::{Buf, Cuda, RelationWorkspace};
use crate::augment::BatchPairGrids;
use crate::backend::cpu;
use crate::backend::cpu::relation_loss::{
    SereGrads, SereInputs, SereLoss, SereLossConfig, StudentGrads, StudentViews,
};
use crate::backend::relation::ViewShapes;
use crate::backend::{
    mat, mat_mut, AttentionShape, Backend, CentredTeacher, Cpu, DinoLossArgs, Grads, InputGrad,
    L2Saved, LayerNormSaved, LinearParams, LinearShape, MimLossArgs, NormParams, RelationArgs,
    Rows, StatSlot, StudentFeatureGrads, StudentFeatures,
};
use sere_core::linalg::MatRef;

/// The device, or `None` (with the reason printed) without one.
fn device() -> Option<Cuda> {
    sere_testkit::device_or_skip("CUDA", sere_cuda::probe)
        .map(|_| Cuda::new(0).expect("probe found a device, so it must open"))
}

/// `n` values in [-1, 1) from the kit's xorshift stream.
fn data(n: usize, seed: u64) -> Vec<f32> {
    sere_testkit::XorShift::new(seed).signeds(n)
}

/// Every element within `tol (1 + |want|)`, in f32.
#[track_caller]
fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let bound = |w: f32| tol * (1.0 + w.abs());
    if let Err(e) = sere_testkit::check_bound_f32(what, got, want, bound) {
        panic!("{e}");
    }
}

/// What an L2 normalisation saved: its output and norms.
fn saved<'a>(y: &'a Buf, norms: &'a Buf) -> L2Saved<'a, Buf> {
    L2Saved { y, norms }
}

/// `buf` received as an input gradient: added into, or written over.
fn input_grad<T: ?Sized>(add: bool, buf: &mut T) -> InputGrad<'_, T> {
    match add {
        true => InputGrad::Add(buf),
        false => InputGrad::Write(buf),
    }
}

fn up<B: Backend>(be: &B, v: &[f32]) -> B::Buf {
    be.upload(v).expect("upload")
}

fn down<B: Backend>(be: &B, b: &B::Buf) -> Vec<f32> {
    be.download(b).expect("download")
}

#[test]
fn linear_forward_and_backward_match_the_cpu() {
    let Some(dev) = device() else { return };
    let (rows, inp, out) = (7, 5, 3);
    let s = LinearShape { rows, inp, out };
    let w = 3..3 + out * inp;
    let b = w.end..w.end + out;
    let layer = LinearParams {
        weight: w.clone(),
        bias: Some(b.clone()),
    };
    let p = data(b.end + 2, 1);
    // Buffers longer than the shape: only the leading values are used.
    let x = data(rows * inp + 4, 2);
    let dy = data(rows * out + 1, 3);
    let dx0 = data(rows * inp + 2, 4);
    let g0 = data(p.len(), 5);

    let mut y_cpu = vec![0.0; rows * out];
    Cpu.linear_forward(&x, layer.of(&p), s, &mut y_cpu).unwrap();
    let (xd, pd, dyd) = (up(&dev, &x), up(&dev, &p), up(&dev, &dy));
    let mut yd = dev.zeros(rows * out + 5).unwrap();
    dev.linear_forward(&xd, layer.of(&pd), s, &mut yd).unwrap();
    let y = down(&dev, &yd);
    close("y", &y[..rows * out], &y_cpu, 1e-5);
    assert!(y[rows * out..].iter().all(|&v| v == 0.0), "tail untouched");
    // Both ways of receiving dx: added into `dx0`, and written over it.
    for add in [true, false] {
        let (mut dx_cpu, mut g_cpu) = (dx0.clone(), g0.clone());
        let dx = input_grad(add, &mut dx_cpu);
        Cpu.linear_backward(&x, &dy, layer.of(&p), s, dx, &mut g_cpu)
            .unwrap();
        let (mut dxd, mut gd) = (up(&dev, &dx0), up(&dev, &g0));
        let dx = input_grad(add, &mut dxd);
        dev.linear_backward(&xd, &dyd, layer.of(&pd), s, dx, &mut gd)
            .unwrap();
        close("dx", &down(&dev, &dxd), &dx_cpu, 1e-5);
        close("g", &down(&dev, &gd), &g_cpu, 1e-5);
    }
}

#[test]
fn gemm_with_strided_and_column_major_views_matches_the_cpu() {
    let Some(dev) = device() else { return };
    let (m, k, n) = (4, 3, 5);
    // op(a) = stored k x m transposed, at an offset; c column-major.
    let la = MatRef::row_major(k, m).at(2).transposed();
    let lb = MatRef {
        offset: 1,
        rows: k,
        cols: n,
        row_stride: n + 2,
        col_stride: 1,
    };
    let lc = MatRef::row_major(n, m).transposed();
    let (a, b, c0) = (data(2 + k * m, 6), data(1 + k * (n + 2), 7), data(n * m, 8));
    let mut c_cpu = c0.clone();
    cpu::gemm(0.5, &a, la, &b, lb, 2.0, &mut c_cpu, lc).unwrap();
    let (ad, bd, mut cd) = (up(&dev, &a), up(&dev, &b), up(&dev, &c0));
    dev.gemm(0.5, mat(&ad, la), mat(&bd, lb), 2.0, mat_mut(&mut cd, lc))
        .unwrap();
    close("c", &down(&dev, &cd), &c_cpu, 1e-5);
}

/// Inputs of one layer norm forward and backward: `rows x cols` input and
/// output gradient, the flat parameters, the gradients added into.
struct LayerNormCase {
    norm: NormParams,
    shape: Rows,
    x: Vec<f32>,
    dy: Vec<f32>,
    params: Vec<f32>,
    dx0: Vec<f32>,
    g0: Vec<f32>,
}

impl LayerNormCase {
    /// The forward (`y`, then the row means, with one spare slot that must
    /// stay 0, and `1 / std`) and the backward (`dx`, the gradients) on `be`.
    fn run_on<B: Backend>(&self, be: &B) -> [Vec<f32>; 5] {
        let Rows { rows, cols } = self.shape;
        let (x, dy, p) = (up(be, &self.x), up(be, &self.dy), up(be, &self.params));
        let norm = self.norm.of(&p);
        let mut y = be.zeros(rows * cols).unwrap();
        let (mut mean, mut rstd) = (be.zeros(rows + 1).unwrap(), be.zeros(rows).unwrap());
        be.layer_norm_forward(&x, norm, self.shape, &mut y, (&mut mean, &mut rstd))
            .unwrap();
        let (mut dx, mut g) = (up(be, &self.dx0), up(be, &self.g0));
        let saved = LayerNormSaved {
            x: &x,
            mean: &mean,
            rstd: &rstd,
        };
        let into = Grads {
            input: &mut dx,
            params: &mut g,
        };
        let mut scratch = Default::default();
        be.layer_norm_backward(saved, &dy, norm, self.shape, into, &mut scratch)
            .unwrap();
        [y, mean, rstd, dx, g].map(|b| down(be, &b))
    }
}

#[test]
fn layer_norm_forward_and_backward_match_the_cpu() {
    let Some(dev) = device() else { return };
    let (rows, cols) = (6, 8);
    let case = LayerNormCase {
        norm: NormParams {
            gamma: 2..2 + cols,
            beta: 2 + cols..2 + 2 * cols,
        },
        shape: Rows::new(rows, cols),
        x: data(rows * cols, 10),
        dy: data(rows * cols, 11),
        params: data(3 + 2 * cols, 9),
        dx0: data(rows * cols, 12),
        g0: data(3 + 2 * cols, 13),
    };
    let (want, got) = (case.run_on(&Cpu), case.run_on(&dev));
    assert_eq!(got[1][rows], 0.0, "mean's spare slot untouched");
    let names = [
        ("y", 1e-5),
        ("mean", 1e-5),
        ("rstd", 1e-5),
        ("dx", 1e-4),
        ("g", 1e-4),
    ];
    for ((what, tol), (g, w)) in names.into_iter().zip(got.iter().zip(&want)) {
        close(what, g, w, tol);
    }
}

/// Attention of `qkv` (`[B][T][3][H][d]`) in f64: `(probs, attn)`.
fn attention_reference(qkv: &[f32], s: AttentionShape) -> (Vec<f32>, Vec<f32>) {
    let (b, t, d, h) = (s.batch, s.tokens, s.dim, s.heads);
    let hd = d / h;
    let at = |img: usize, i: usize, part: usize, head: usize, k: usize| {
        qkv[(img * t + i) * 3 * d + part * d + head * hd + k] as f64
    };
    let (mut probs, mut attn) = (vec![0.0; b * h * t * t], vec![0.0; b * t * d]);
    for img in 0..b {
        for head in 0..h {
            for i in 0..t {
                let sc: Vec<f64> = (0..t)
                    .map(|j| {
                        (0..hd)
                            .map(|k| at(img, i, 0, head, k) * at(img, j, 1, head, k))
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let mx = sc.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = sc.iter().map(|v| (v - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for j in 0..t {
                    probs[((img * h + head) * t + i) * t + j] = (e[j] / z) as f32;
                }
                for k in 0..hd {
                    let o: f64 = (0..t).map(|j| e[j] / z * at(img, j, 2, head, k)).sum();
                    attn[(img * t + i) * d + head * hd + k] = o as f32;
                }
            }
        }
    }
    (probs, attn)
}

/// `dqkv` of [`attention_reference`] for `dattn`, in f64.
fn attention_backward_reference(
    qkv: &[f32],
    probs: &[f32],
    dattn: &[f32],
    s: AttentionShape,
) -> Vec<f32> {
    let (b, t, d, h) = (s.batch, s.tokens, s.dim, s.heads);
    let hd = d / h;
    let scale = 1.0 / (hd as f64).sqrt();
    let ix = |img: usize, i: usize, part: usize, head: usize, k: usize| {
        (img * t + i) * 3 * d + part * d + head * hd + k
    };
    let mut dqkv = vec![0.0f64; qkv.len()];
    for img in 0..b {
        for head in 0..h {
            let p = |i: usize, j: usize| probs[((img * h + head) * t + i) * t + j] as f64;
            let dout = |i: usize, k: usize| dattn[(img * t + i) * d + head * hd + k] as f64;
            for i in 0..t {
                let dp: Vec<f64> = (0..t)
                    .map(|j| {
                        (0..hd)
                            .map(|k| dout(i, k) * qkv[ix(img, j, 2, head, k)] as f64)
                            .sum()
                    })
                    .collect();
                let dot: f64 = (0..t).map(|j| p(i, j) * dp[j]).sum();
                for j in 0..t {
                    let ds = p(i, j) * (dp[j] - dot) * scale;
                    for k in 0..hd {
                        dqkv[ix(img, j, 2, head, k)] += p(i, j) * dout(i, k);
                        dqkv[ix(img, i, 0, head, k)] += ds * qkv[ix(img, j, 1, head, k)] as f64;
                        dqkv[ix(img, j, 1, head, k)] += ds * qkv[ix(img, i, 0, head, k)] as f64;
                    }
                }
            }
        }
    }
    dqkv.into_iter().map(|v| v as f32).collect()
}

#[test]
fn attention_forward_and_backward_match_the_reference() {
    let Some(dev) = device() else { return };
    let s = AttentionShape {
        batch: 2,
        tokens: 5,
        dim: 8,
        heads: 2,
    };
    let (b, t, d, h) = (s.batch, s.tokens, s.dim, s.heads);
    let (qkv, dattn) = (data(b * t * 3 * d, 14), data(b * t * d, 15));
    let (probs_ref, attn_ref) = attention_reference(&qkv, s);
    let qd = up(&dev, &qkv);
    let mut pd = dev.zeros(b * h * t * t).unwrap();
    let mut ad = dev.zeros(b * t * d).unwrap();
    dev.attention_forward(&qd, s, &mut pd, &mut ad).unwrap();
    let probs = down(&dev, &pd);
    close("probs", &probs, &probs_ref, 1e-5);
    close("attn", &down(&dev, &ad), &attn_ref, 1e-5);

    let dq_ref = attention_backward_reference(&qkv, &probs_ref, &dattn, s);
    let dq0 = data(qkv.len(), 16);
    let want: Vec<f32> = dq0.iter().zip(&dq_ref).map(|(a, b)| a + b).collect();
    let dad = up(&dev, &dattn);
    // The CPU's dscores size (device temporary) and one big enough.
    for scratch in [b * t * t, 2 * b * h * t * t] {
        let mut ds = dev.zeros(scratch).unwrap();
        let mut dqd = up(&dev, &dq0);
        dev.attention_backward(&qd, &pd, &dad, s, &mut ds, &mut dqd)
            .unwrap();
        close("dqkv", &down(&dev, &dqd), &want, 1e-4);
    }
}

#[test]
fn l2_normalize_rows_and_backward_match_the_reference() {
    let Some(dev) = device() else { return };
    let (rows, dim, eps) = (4, 5, 0.5);
    let mut x = data(rows * dim, 17);
    x[dim..2 * dim].iter_mut().for_each(|v| *v *= 0.05); // row 1 floored
    let dy = data(rows * dim, 18);
    let (mut y_ref, mut n_ref, mut dx_ref) = (
        vec![0.0; rows * dim],
        vec![0.0; rows],
        vec![0.0; rows * dim],
    );
    for r in 0..rows {
        let row = &x[r * dim..(r + 1) * dim];
        let raw = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        let nr = raw.max(eps);
        n_ref[r] = nr;
        for j in 0..dim {
            y_ref[r * dim + j] = row[j] / nr;
        }
        let y = &y_ref[r * dim..(r + 1) * dim];
        let g = &dy[r * dim..(r + 1) * dim];
        let dot: f32 = if raw > eps {
            y.iter().zip(g).map(|(a, b)| a * b).sum()
        } else {
            0.0
        };
        for j in 0..dim {
            dx_ref[r * dim + j] = (g[j] - y[j] * dot) / nr;
        }
    }
    let (xd, dyd) = (up(&dev, &x), up(&dev, &dy));
    let (mut yd, mut nd) = (dev.zeros(rows * dim).unwrap(), dev.zeros(rows).unwrap());
    dev.l2_normalize_rows(&xd, 0, (rows, dim), eps, &mut yd, &mut nd)
        .unwrap();
    close("y", &down(&dev, &yd), &y_ref, 1e-5);
    close("norms", &down(&dev, &nd), &n_ref, 1e-5);
    // Written at an offset, then added.
    let start = 3;
    let base = data(start + rows * dim + 2, 19);
    let mut dxd = up(&dev, &base);
    dev.l2_normalize_rows_backward(
        &dyd,
        saved(&yd, &nd),
        (rows, dim),
        eps,
        &mut dxd,
        (start, false),
    )
    .unwrap();
    let mut want = base.clone();
    want[start..start + rows * dim].copy_from_slice(&dx_ref);
    close("dx (written)", &down(&dev, &dxd), &want, 1e-5);
    dev.l2_normalize_rows_backward(
        &dyd,
        saved(&yd, &nd),
        (rows, dim),
        eps,
        &mut dxd,
        (start, true),
    )
    .unwrap();
    for (w, &r) in want[start..start + rows * dim].iter_mut().zip(&dx_ref) {
        *w += r;
    }
    close("dx (added)", &down(&dev, &dxd), &want, 1e-5);
}

#[test]
fn row_dots_add_at_an_offset_matches_the_cpu() {
    let Some(dev) = device() else { return };
    let (rows, dim, start) = (5, 7, 2);
    let (a, b) = (data(rows * dim, 41), data(rows * dim, 42));
    let base = data(start + rows + 3, 43);
    let mut want = base.clone();
    crate::backend::Cpu
        .row_dots_add(&a, &b, (rows, dim), &mut want, start)
        .unwrap();
    let mut out = up(&dev, &base);
    dev.row_dots_add(&up(&dev, &a), &up(&dev, &b), (rows, dim), &mut out, start)
        .unwrap();
    close("out", &down(&dev, &out), &want, 1e-5);
}

#[test]
fn embed_tokens_and_backward_match_the_reference() {
    let Some(dev) = device() else { return };
    let (batch, n, d) = (3, 4, 2);
    let t = n + 1;
    let (cls, pos) = (1..1 + d, 1 + d..1 + d + t * d);
    let p = data(pos.end, 20);
    let (emb, pos_patch, dx) = (
        data(batch * n * d, 21),
        data(n * d, 22),
        data(batch * t * d, 23),
    );
    let mut x0_ref = vec![0.0; batch * t * d];
    for b in 0..batch {
        for j in 0..d {
            x0_ref[b * t * d + j] = p[cls.start + j] + p[pos.start + j];
        }
        for i in 0..n * d {
            x0_ref[b * t * d + d + i] = emb[b * n * d + i] + pos_patch[i];
        }
    }
    let pd = up(&dev, &p);
    let mut x0 = dev.zeros(batch * t * d).unwrap();
    dev.embed_tokens(
        &up(&dev, &emb),
        &pd,
        (cls.clone(), pos.clone()),
        &up(&dev, &pos_patch),
        (batch, n, d),
        &mut x0,
    )
    .unwrap();
    close("x0", &down(&dev, &x0), &x0_ref, 1e-6);

    let g0 = data(p.len(), 24);
    let (mut g_ref, mut dpp_ref, mut demb_ref) =
        (g0.clone(), vec![0.0; n * d], vec![0.0; batch * n * d]);
    for b in 0..batch {
        for j in 0..d {
            g_ref[cls.start + j] += dx[b * t * d + j];
            g_ref[pos.start + j] += dx[b * t * d + j];
        }
        for i in 0..n * d {
            dpp_ref[i] += dx[b * t * d + d + i];
            demb_ref[b * n * d + i] = dx[b * t * d + d + i];
        }
    }
    let mut gd = up(&dev, &g0);
    let (mut dpp, mut demb) = (
        up(&dev, &data(n * d, 25)),
        up(&dev, &data(batch * n * d, 26)),
    );
    dev.embed_tokens_backward(
        &up(&dev, &dx),
        (batch, n, d),
        (cls, pos),
        &mut gd,
        &mut dpp,
        &mut demb,
    )
    .unwrap();
    close("g", &down(&dev, &gd), &g_ref, 1e-5);
    close("dpos_patch", &down(&dev, &dpp), &dpp_ref, 1e-5);
    close("demb", &down(&dev, &demb), &demb_ref, 1e-6);
}

/// The logits, starting centre and gradient of a centred-teacher loss.
struct TeacherLossCase {
    student: Vec<f32>,
    teacher: Vec<f32>,
    centre: Vec<f32>,
    dstudent: Vec<f32>,
}

impl TeacherLossCase {
    fn new((student, teacher, dim): (usize, usize, usize), seed: u64) -> Self {
        TeacherLossCase {
            student: data(student, seed),
            teacher: data(teacher, seed + 1),
            centre: data(dim, seed + 2),
            dstudent: data(student, seed + 3),
        }
    }

    /// Runs `loss` on `be` from this start, writing the statistics from
    /// slot 1 of a 4-slot buffer of 5s; returns the statistics, the
    /// student's gradient and the updated centre.
    fn run_on<B: Backend>(
        &self,
        be: &B,
        loss: impl FnOnce(&B, &B::Buf, CentredTeacher<'_, B::Buf>, &mut B::Buf, StatSlot<'_, B::Buf>),
    ) -> [Vec<f32>; 3] {
        let (mut centre, mut dstudent) = (up(be, &self.centre), up(be, &self.dstudent));
        let (mut stats, teacher) = (up(be, &[5.0; 4]), up(be, &self.teacher));
        let centred = CentredTeacher {
            logits: &teacher,
            centre: &mut centre,
        };
        let report = StatSlot {
            stats: &mut stats,
            slot: 1,
        };
        loss(be, &up(be, &self.student), centred, &mut dstudent, report);
        [down(be, &stats), down(be, &dstudent), down(be, &centre)]
    }

    /// `run_on` the CPU and the device, compared.
    fn check<F, G>(&self, dev: &Cuda, on_cpu: F, on_device: G)
    where
        F: FnOnce(
            &Cpu,
            &Vec<f32>,
            CentredTeacher<'_, Vec<f32>>,
            &mut Vec<f32>,
            StatSlot<'_, Vec<f32>>,
        ),
        G: FnOnce(&Cuda, &Buf, CentredTeacher<'_, Buf>, &mut Buf, StatSlot<'_, Buf>),
    {
        let want = self.run_on(&Cpu, on_cpu);
        let got = self.run_on(dev, on_device);
        for ((what, tol), (g, w)) in [("stats", 1e-5), ("dstudent", 1e-5), ("centre", 1e-6)]
            .into_iter()
            .zip(got.iter().zip(&want))
        {
            close(what, g, w, tol);
        }
    }
}

#[test]
fn dino_loss_matches_the_cpu() {
    let Some(dev) = device() else { return };
    let (views, batch, dim) = (3, 2, 6);
    let a = DinoLossArgs {
        views,
        batch,
        dim,
        tau_student: 0.1,
        tau_teacher: 0.04,
        weight: 0.7,
        centre_momentum: 0.9,
    };
    let case = TeacherLossCase::new((views * batch * dim, 2 * batch * dim, dim), 27);
    case.check(
        &dev,
        |be, s, t, g, r| be.dino_loss(s, t, a, g, r).unwrap(),
        |be, s, t, g, r| be.dino_loss(s, t, a, g, r).unwrap(),
    );
}

#[test]
fn mim_loss_matches_the_cpu() {
    let Some(dev) = device() else { return };
    let (images, patches, dim) = (4, 9, 6);
    let rows = images * patches;
    let a = MimLossArgs {
        rows,
        dim,
        tau_student: 0.1,
        tau_teacher: 0.04,
        weight: 0.7,
        centre_momentum: 0.9,
    };
    let masks: Vec<bool> = (0..rows).map(|r| r % 4 == 1 && r >= patches).collect();
    let mut w = vec![0.0; rows];
    sere_core::loss::masked_patch_weights(&masks, patches, &mut w).unwrap();
    let case = TeacherLossCase::new((rows * dim, rows * dim, dim), 31);
    let wd = up(&dev, &w);
    case.check(
        &dev,
        |be, s, t, g, r| be.mim_loss(s, t, &w, a, g, r).unwrap(),
        |be, s, t, g, r| be.mim_loss(s, t, &wd, a, g, r).unwrap(),
    );
}

/// Grids of one pair: `p = hs * ws` points per image in `[-0.9, 0.9]`.
fn pair(
    teacher: usize,
    student: usize,
    (hs, ws): (usize, usize),
    valid: &[bool],
    seed: u64,
) -> BatchPairGrids {
    let n = valid.len() * hs * ws * 2;
    BatchPairGrids {
        teacher,
        student,
        hs,
        ws,
        teacher_grid: data(n, seed).iter().map(|v| v * 0.9).collect(),
        student_grid: data(n, seed + 1).iter().map(|v| v * 0.9).collect(),
        valid: valid.to_vec(),
    }
}

#[test]
fn relation_losses_match_the_cpu() {
    let Some(dev) = device() else { return };
    let shapes = ViewShapes {
        batch: 3,
        channels: 4,
        global_hw: (3, 3),
        local_hw: (2, 2),
        locals: 1,
    };
    let cfg = SereLossConfig::new(2);
    let (alpha, beta) = (0.6, 1.3);
    // Pair sizes differ (global / local students); one pair has no
    // overlapping image.
    let grids = vec![
        pair(0, 1, (2, 2), &[true, false, true], 31),
        pair(0, 2, (1, 2), &[true, true, true], 33),
        pair(1, 0, (2, 2), &[false, false, false], 35),
        pair(1, 2, (1, 2), &[false, true, false], 37),
    ];
    let (ng, nl) = (shapes.globals_len(), shapes.locals_len());
    let (ts, tc) = (data(ng, 40), data(ng, 41));
    let (ssg, ssl, scg, scl) = (data(ng, 42), data(nl, 43), data(ng, 44), data(nl, 45));
    let (dsg0, dsl0, dcg0, dcl0) = (data(ng, 46), data(nl, 47), data(ng, 48), data(nl, 49));

    let (mut dsg, mut dsl, mut dcg, mut dcl) =
        (dsg0.clone(), dsl0.clone(), dcg0.clone(), dcl0.clone());
    let grid_of = |img: usize, t: usize, s: usize| -> Option<(&[f32], &[f32])> {
        let g = grids.iter().find(|g| g.teacher == t && g.student == s)?;
        if !g.valid[img] {
            return None;
        }
        let p = g.hs * g.ws * 2;
        Some((
            &g.teacher_grid[img * p..(img + 1) * p],
            &g.student_grid[img * p..(img + 1) * p],
        ))
    };
    let out = SereLoss::new()
        .forward_backward(
            &cfg,
            &shapes,
            &SereInputs {
                teacher_spatial: &ts,
                teacher_channel: &tc,
                student_spatial: StudentViews {
                    globals: &ssg,
                    locals: &ssl,
                },
                student_channel: StudentViews {
                    globals: &scg,
                    locals: &scl,
                },
            },
            grid_of,
            (alpha, beta),
            Some(SereGrads {
                spatial: StudentGrads {
                    globals: &mut dsg,
                    locals: &mut dsl,
                },
                channel: StudentGrads {
                    globals: &mut dcg,
                    locals: &mut dcl,
                },
            }),
        )
        .unwrap();
    assert_eq!(out.spatial_terms, 4);

    let (tsd, tcd) = (up(&dev, &ts), up(&dev, &tc));
    let (ssgd, ssld, scgd, scld) = (
        up(&dev, &ssg),
        up(&dev, &ssl),
        up(&dev, &scg),
        up(&dev, &scl),
    );
    let (mut dsgd, mut dsld) = (up(&dev, &dsg0), up(&dev, &dsl0));
    let (mut dcgd, mut dcld) = (up(&dev, &dcg0), up(&dev, &dcl0));
    let mut stats = up(&dev, &[9.0; 5]);
    let mut ws = RelationWorkspace::default();
    // Twice: the second call reuses the workspace and overwrites the
    // slots (the gradients are compared after the first).
    for call in 0..2 {
        let terms = dev
            .relation_losses(
                &mut ws,
                RelationArgs {
                    cfg: &cfg,
                    shapes: &shapes,
                    grids: &grids,
                    teacher_spatial: &tsd,
                    teacher_channel: &tcd,
                    student_spatial: StudentFeatures {
                        globals: &ssgd,
                        locals: &ssld,
                    },
                    student_channel: StudentFeatures {
                        globals: &scgd,
                        locals: &scld,
                    },
                    weights: (alpha, beta),
                    dspatial: StudentFeatureGrads {
                        globals: &mut dsgd,
                        locals: &mut dsld,
                    },
                    dchannel: StudentFeatureGrads {
                        globals: &mut dcgd,
                        locals: &mut dcld,
                    },
                },
                &mut stats,
                2,
            )
            .unwrap();
        assert_eq!(terms, out.spatial_terms);
        let want = [9.0, 9.0, out.spatial, out.channel, 9.0];
        close("stats", &down(&dev, &stats), &want, 1e-4);
        if call == 0 {
            close("dspatial globals", &down(&dev, &dsgd), &dsg, 1e-4);
            close("dspatial locals", &down(&dev, &dsld), &dsl, 1e-4);
            close("dchannel globals", &down(&dev, &dcgd), &dcg, 1e-4);
            close("dchannel locals", &down(&dev, &dcld), &dcl, 1e-4);
        }
    }
}
