//! [`Backend`] for the host CPU: every operation slices its buffers to the
//! lengths its shape names and calls the kernels of this module's siblings
//! (or `sere-core`'s), split over rayon's threads.

use std::ops::Range;

use super::{attention, batch_norm, gemm, leading_mut, matrix, matrix_mut, rows};
use crate::backend::cpu::relation_loss::{
    dino_loss_step, SereGrads, SereInputs, SereLoss, StudentGrads, StudentViews,
};
use crate::backend::{
    AttentionShape, Backend, Blocks, BnSaved, BnState, CentredTeacher, DinoLossArgs, Grads,
    InputGrad, L2Saved, LayerNormSaved, LinearParams, LinearShape, Mat, MatMut, MimLossArgs,
    NormParams, OpResult, ParamView, RelationArgs, Rows, StatSlot, StudentFeatureGrads,
    StudentFeatures,
};
use crate::dist::Collective;
use ndarray::ArrayView2;
use rayon::prelude::*;
use sere_core::loss;
use sere_core::optim::{adamw_step, clip_grad_norm, ema_update, AdamW};

/// The host CPU: buffers are `Vec<f32>`, work runs on rayon's global pool
/// (or the pool the caller installs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cpu;

/// Reduction partials of the CPU kernels, grown once and reused.
#[derive(Debug, Default)]
pub struct CpuScratch {
    /// Per-task partial sums of the layer-norm parameter gradients.
    pub f32s: Vec<f32>,
    /// Per-task f64 partial sums of the batch-norm statistics.
    pub f64s: Vec<f64>,
}

/// Two disjoint mutable ranges of one buffer (weight and bias gradients).
pub(crate) fn two_mut(
    buf: &mut [f32],
    a: Range<usize>,
    b: Range<usize>,
) -> (&mut [f32], &mut [f32]) {
    if a.end <= b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&mut lo[a], &mut hi[..b.end - b.start])
    } else {
        assert!(b.end <= a.start, "overlapping parameter ranges");
        let (lo, hi) = buf.split_at_mut(a.start);
        (&mut hi[..a.end - a.start], &mut lo[b])
    }
}

/// A linear layer's weight (`out x inp`) as a matrix: its range must hold
/// exactly that many values.
fn weight<'a>(
    p: &'a [f32],
    l: &LinearParams,
    s: LinearShape,
) -> sere_core::Result<ArrayView2<'a, f32>> {
    let w = &p[l.weight.clone()];
    ArrayView2::from_shape((s.out, s.inp), w).map_err(|_| sere_core::Error::ShapeMismatch {
        what: "weight",
        expected: s.out * s.inp,
        got: w.len(),
    })
}

/// The leading `ng` / `nl` values of the student's feature buffers.
fn host_views<'a>(f: &StudentFeatures<'a, Cpu>, ng: usize, nl: usize) -> StudentViews<'a> {
    let (globals, locals): (&'a Vec<f32>, &'a Vec<f32>) = (f.globals, f.locals);
    StudentViews {
        globals: &globals[..ng],
        locals: &locals[..nl.min(locals.len())],
    }
}

/// The leading `ng` / `nl` values of the student's gradient buffers.
fn host_grads(f: StudentFeatureGrads<'_, Cpu>, ng: usize, nl: usize) -> StudentGrads<'_> {
    let StudentFeatureGrads { globals, locals } = f;
    let nl = nl.min(locals.len());
    StudentGrads {
        globals: &mut globals[..ng],
        locals: &mut locals[..nl],
    }
}

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type Scratch = CpuScratch;
    type RelationWorkspace = SereLoss;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn zeros(&self, len: usize) -> OpResult<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn upload(&self, host: &[f32]) -> OpResult<Vec<f32>> {
        Ok(host.to_vec())
    }

    fn upload_into(&self, host: &[f32], dst: &mut Vec<f32>) -> OpResult {
        dst[..host.len()].copy_from_slice(host);
        Ok(())
    }

    fn download(&self, src: &Vec<f32>) -> OpResult<Vec<f32>> {
        Ok(src.clone())
    }

    fn all_reduce_mean(&self, group: &dyn Collective, buf: &mut Vec<f32>) -> OpResult {
        Ok(group.all_reduce_mean_f32(buf)?)
    }

    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }

    fn zero(&self, dst: &mut Vec<f32>) -> OpResult {
        dst.fill(0.0);
        Ok(())
    }

    fn duplicate(&self, src: &Vec<f32>) -> OpResult<Vec<f32>> {
        Ok(src.clone())
    }

    fn synchronize(&self) -> OpResult {
        Ok(())
    }

    fn linear_forward(
        &self,
        x: &Vec<f32>,
        layer: ParamView<'_, Vec<f32>, LinearParams>,
        s: LinearShape,
        y: &mut Vec<f32>,
    ) -> OpResult {
        let (p, l) = (layer.params, layer.layer);
        Ok(super::linear_fwd(
            matrix(x, (s.rows, s.inp), "x")?,
            weight(p, l, s)?,
            l.bias.clone().map(|b| &p[b]),
            matrix_mut(y, (s.rows, s.out), "y")?,
        )?)
    }

    fn linear_backward(
        &self,
        x: &Vec<f32>,
        dy: &Vec<f32>,
        layer: ParamView<'_, Vec<f32>, LinearParams>,
        s: LinearShape,
        dx: InputGrad<'_, Vec<f32>>,
        g: &mut Vec<f32>,
    ) -> OpResult {
        let (w, b) = (layer.layer.weight.clone(), layer.layer.bias.clone());
        let x = matrix(x, (s.rows, s.inp), "x")?;
        let dy = matrix(dy, (s.rows, s.out), "dy")?;
        let wv = weight(layer.params, layer.layer, s)?;
        let (gw, gb) = match b {
            Some(b) => {
                let (gw, gb) = two_mut(g, w, b);
                (gw, Some(gb))
            }
            None => (&mut g[w], None),
        };
        let dw = matrix_mut(gw, (s.out, s.inp), "weight gradient")?;
        let dx = dx.try_map(|d| leading_mut(d, s.rows * s.inp, "dx"))?;
        Ok(super::linear_bwd(x, wv, dy, dx, dw, gb)?)
    }

    fn gemm(
        &self,
        alpha: f32,
        a: Mat<'_, Vec<f32>>,
        b: Mat<'_, Vec<f32>>,
        beta: f32,
        c: MatMut<'_, Vec<f32>>,
    ) -> OpResult {
        Ok(gemm(
            alpha, a.buf, a.view, b.buf, b.view, beta, c.buf, c.view,
        )?)
    }

    fn layer_norm_forward(
        &self,
        x: &Vec<f32>,
        norm: ParamView<'_, Vec<f32>, NormParams>,
        Rows { rows, cols }: Rows,
        y: &mut Vec<f32>,
        (mean, rstd): (&mut Vec<f32>, &mut Vec<f32>),
    ) -> OpResult {
        let (p, l) = (norm.params, norm.layer);
        Ok(super::layer_norm_fwd(
            matrix(x, (rows, cols), "x")?,
            (&p[l.gamma.clone()], &p[l.beta.clone()]),
            matrix_mut(y, (rows, cols), "y")?,
            (&mut mean[..rows], &mut rstd[..rows]),
        )?)
    }

    fn layer_norm_backward(
        &self,
        saved: LayerNormSaved<'_, Vec<f32>>,
        dy: &Vec<f32>,
        norm: ParamView<'_, Vec<f32>, NormParams>,
        Rows { rows, cols }: Rows,
        grads: Grads<'_, Vec<f32>>,
        scratch: &mut CpuScratch,
    ) -> OpResult {
        let (gamma, beta) = (norm.layer.gamma.clone(), norm.layer.beta.clone());
        let x = matrix(saved.x, (rows, cols), "x")?;
        Ok(super::layer_norm_bwd(
            (x, &saved.mean[..rows], &saved.rstd[..rows]),
            &norm.params[gamma.clone()],
            matrix(dy, (rows, cols), "dy")?,
            (
                matrix_mut(grads.input, (rows, cols), "dx")?,
                two_mut(grads.params, gamma, beta),
            ),
            &mut scratch.f32s,
        )?)
    }

    fn gelu_forward(&self, x: &Vec<f32>, n: usize, y: &mut Vec<f32>) -> OpResult {
        super::gelu_fwd(&x[..n], &mut y[..n]);
        Ok(())
    }

    fn gelu_backward(&self, x: &Vec<f32>, dy: &Vec<f32>, n: usize, dx: &mut Vec<f32>) -> OpResult {
        super::gelu_bwd(&x[..n], &dy[..n], &mut dx[..n]);
        Ok(())
    }

    fn gelu_grad_in_place(&self, x: &Vec<f32>, n: usize, d: &mut Vec<f32>) -> OpResult {
        rows::gelu_bwd_in_place(&x[..n], &mut d[..n]);
        Ok(())
    }

    fn im2col(
        &self,
        images: &Vec<f32>,
        (batch, chans, img, patch): (usize, usize, usize, usize),
        out: &mut Vec<f32>,
    ) -> OpResult {
        let n = batch * chans * img * img;
        rows::im2col(&images[..n], batch, chans, img, patch, &mut out[..n]);
        Ok(())
    }

    fn copy_blocks(
        &self,
        src: &Vec<f32>,
        dst: &mut Vec<f32>,
        k: Blocks,
        accumulate: bool,
    ) -> OpResult {
        for i in 0..k.count {
            let s = &src[k.src_start + i * k.src_stride..][..k.len];
            let d = &mut dst[k.dst_start + i * k.dst_stride..][..k.len];
            if accumulate {
                d.iter_mut().zip(s).for_each(|(a, &b)| *a += b);
            } else {
                d.copy_from_slice(s);
            }
        }
        Ok(())
    }

    fn embed_tokens(
        &self,
        emb: &Vec<f32>,
        p: &Vec<f32>,
        (cls, pos): (Range<usize>, Range<usize>),
        pos_patch: &Vec<f32>,
        shape: (usize, usize, usize),
        x0: &mut Vec<f32>,
    ) -> OpResult {
        rows::embed_tokens(emb, &p[cls], &p[pos], pos_patch, shape, x0);
        Ok(())
    }

    fn embed_tokens_backward(
        &self,
        dx: &Vec<f32>,
        shape: (usize, usize, usize),
        (cls, pos): (Range<usize>, Range<usize>),
        g: &mut Vec<f32>,
        dpos_patch: &mut Vec<f32>,
        demb: &mut Vec<f32>,
    ) -> OpResult {
        let d = shape.2;
        let (gcls, gpos) = two_mut(g, cls, pos);
        rows::embed_tokens_backward(dx, shape, gcls, &mut gpos[..d], dpos_patch, demb);
        Ok(())
    }

    fn add_into(&self, src: &Vec<f32>, len: usize, dst: &mut Vec<f32>, start: usize) -> OpResult {
        for (p, &g) in dst[start..start + len].iter_mut().zip(&src[..len]) {
            *p += g;
        }
        Ok(())
    }

    fn residual_keep_add(
        &self,
        out: &mut Vec<f32>,
        x: &Vec<f32>,
        keep: &Vec<f32>,
        (images, per): (usize, usize),
    ) -> OpResult {
        let n = images * per;
        rows::residual_add(&mut out[..n], &x[..n], &keep[..images], per);
        Ok(())
    }

    fn keep_scale(
        &self,
        dx: &Vec<f32>,
        keep: &Vec<f32>,
        (images, per): (usize, usize),
        out: &mut Vec<f32>,
    ) -> OpResult {
        let n = images * per;
        rows::scale_rows(&dx[..n], &keep[..images], per, &mut out[..n]);
        Ok(())
    }

    fn row_dots_add(
        &self,
        a: &Vec<f32>,
        b: &Vec<f32>,
        (rows, dim): (usize, usize),
        out: &mut Vec<f32>,
        out_start: usize,
    ) -> OpResult {
        let n = rows * dim;
        let rows_a = a[..n].chunks_exact(dim.max(1));
        let rows_b = b[..n].chunks_exact(dim.max(1));
        for ((o, ra), rb) in out[out_start..out_start + rows]
            .iter_mut()
            .zip(rows_a)
            .zip(rows_b)
        {
            *o += ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>();
        }
        Ok(())
    }

    fn l2_normalize_rows(
        &self,
        src: &Vec<f32>,
        src_start: usize,
        (n, dim): (usize, usize),
        eps: f32,
        dst: &mut Vec<f32>,
        norms: &mut Vec<f32>,
    ) -> OpResult {
        let src = &src[src_start..src_start + n * dim];
        rows::normalize_rows(src, dim, eps, &mut dst[..n * dim], &mut norms[..n]);
        Ok(())
    }

    fn l2_normalize_rows_backward(
        &self,
        dy: &Vec<f32>,
        L2Saved { y, norms }: L2Saved<'_, Vec<f32>>,
        (n, dim): (usize, usize),
        eps: f32,
        dx: &mut Vec<f32>,
        (start, accumulate): (usize, bool),
    ) -> OpResult {
        let len = n * dim;
        rows::normalize_rows_backward(
            &dy[..len],
            &y[..len],
            &norms[..n],
            dim,
            eps,
            &mut dx[start..start + len],
            accumulate,
        );
        Ok(())
    }

    fn attention_forward(
        &self,
        qkv: &Vec<f32>,
        s: AttentionShape,
        probs: &mut Vec<f32>,
        attn: &mut Vec<f32>,
    ) -> OpResult {
        let bt = s.batch * s.tokens;
        Ok(attention::attention_fwd(
            &qkv[..bt * 3 * s.dim],
            s,
            &mut probs[..s.batch * s.heads * s.tokens * s.tokens],
            &mut attn[..bt * s.dim],
        )?)
    }

    fn attention_backward(
        &self,
        qkv: &Vec<f32>,
        probs: &Vec<f32>,
        dattn: &Vec<f32>,
        s: AttentionShape,
        dscores: &mut Vec<f32>,
        dqkv: &mut Vec<f32>,
    ) -> OpResult {
        let bt = s.batch * s.tokens;
        Ok(attention::attention_bwd(
            (
                &qkv[..bt * 3 * s.dim],
                &probs[..s.batch * s.heads * s.tokens * s.tokens],
            ),
            &dattn[..bt * s.dim],
            s,
            &mut dscores[..s.batch * s.tokens * s.tokens],
            &mut dqkv[..bt * 3 * s.dim],
        )?)
    }

    fn batch_norm_relu(
        &self,
        y: &Vec<f32>,
        norm: ParamView<'_, Vec<f32>, NormParams>,
        Rows { rows, cols: c }: Rows,
        state: BnState<'_, Self>,
        scratch: &mut CpuScratch,
        out: &mut Vec<f32>,
    ) -> OpResult {
        let (p, l) = (norm.params, norm.layer);
        let stats = state.batch;
        batch_norm::bn_relu(
            matrix(y, (rows, c), "batch-norm input")?,
            (&p[l.gamma.clone()], &p[l.beta.clone()]),
            batch_norm::Running {
                mode: state.mode,
                mean: &mut state.running_mean[..c],
                var: &mut state.running_var[..c],
            },
            batch_norm::Stats {
                mean: &mut stats.mean[..c],
                var: &mut stats.var[..c],
                rstd: &mut stats.rstd[..c],
                group: stats.group.as_deref(),
            },
            &mut scratch.f64s,
            matrix_mut(out, (rows, c), "batch-norm output")?,
        )
    }

    fn batch_norm_relu_backward(
        &self,
        BnSaved { y, out, stats }: BnSaved<'_, Self>,
        dout: &Vec<f32>,
        norm: ParamView<'_, Vec<f32>, NormParams>,
        Rows { rows, cols: c }: Rows,
        grads: Grads<'_, Vec<f32>>,
        scratch: &mut CpuScratch,
    ) -> OpResult {
        let (gamma, beta) = (norm.layer.gamma.clone(), norm.layer.beta.clone());
        let gv = &norm.params[gamma.clone()];
        batch_norm::bn_relu_backward(
            batch_norm::Saved {
                y: matrix(y, (rows, c), "batch-norm input")?,
                out: matrix(out, (rows, c), "batch-norm output")?,
                mean: &stats.mean[..c],
                rstd: &stats.rstd[..c],
                group: stats.group.as_deref(),
            },
            matrix(dout, (rows, c), "batch-norm output gradient")?,
            gv,
            two_mut(grads.params, gamma, beta),
            &mut scratch.f64s,
            matrix_mut(grads.input, (rows, c), "batch-norm input gradient")?,
        )
    }

    fn dino_loss(
        &self,
        student: &Vec<f32>,
        CentredTeacher {
            logits: teacher,
            centre,
        }: CentredTeacher<'_, Vec<f32>>,
        a: DinoLossArgs,
        dstudent: &mut Vec<f32>,
        StatSlot { stats, slot }: StatSlot<'_, Vec<f32>>,
    ) -> OpResult {
        let (ns, nt) = (a.views * a.batch * a.dim, 2 * a.batch * a.dim);
        // Before the step: the entropy is of the distributions the loss used.
        stats[slot + 1] = loss::teacher_entropy(
            &teacher[..nt],
            &centre[..a.dim],
            2 * a.batch,
            a.dim,
            a.tau_teacher,
        )?;
        stats[slot] = dino_loss_step(
            (&student[..ns], &teacher[..nt]),
            &mut centre[..a.dim],
            a,
            &mut dstudent[..ns],
        )?;
        Ok(())
    }

    fn mim_loss(
        &self,
        student: &Vec<f32>,
        CentredTeacher {
            logits: teacher,
            centre,
        }: CentredTeacher<'_, Vec<f32>>,
        weights: &Vec<f32>,
        a: MimLossArgs,
        dstudent: &mut Vec<f32>,
        StatSlot { stats, slot }: StatSlot<'_, Vec<f32>>,
    ) -> OpResult {
        let n = a.rows * a.dim;
        let (s, t) = (&student[..n], &teacher[..n]);
        stats[slot] = loss::weighted_cross_entropy(
            s,
            t,
            &centre[..a.dim],
            &weights[..a.rows],
            a.rows,
            a.dim,
            a.tau_student,
            a.tau_teacher,
            Some((&mut dstudent[..n], a.weight)),
        )?;
        loss::dino_centre_update(t, a.rows, a.dim, a.centre_momentum, &mut centre[..a.dim])?;
        Ok(())
    }

    fn relation_losses<'a>(
        &self,
        ws: &mut SereLoss,
        a: RelationArgs<'a, Self>,
        stats: &mut Vec<f32>,
        slot: usize,
    ) -> OpResult<usize> {
        let grids = a.grids;
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
        let sh = a.shapes;
        let (ng, nl) = (sh.globals_len(), sh.locals_len());
        let views = |f: &StudentFeatures<'a, Self>| host_views(f, ng, nl);
        let out = ws.forward_backward(
            a.cfg,
            sh,
            &SereInputs {
                teacher_spatial: &a.teacher_spatial[..ng],
                teacher_channel: &a.teacher_channel[..ng],
                student_spatial: views(&a.student_spatial),
                student_channel: views(&a.student_channel),
            },
            grid_of,
            a.weights,
            Some(SereGrads {
                spatial: host_grads(a.dspatial, ng, nl),
                channel: host_grads(a.dchannel, ng, nl),
            }),
        )?;
        stats[slot] = out.spatial;
        stats[slot + 1] = out.channel;
        Ok(out.spatial_terms)
    }

    fn l2_norm(&self, g: &Vec<f32>, stats: &mut Vec<f32>, slot: usize) -> OpResult {
        stats[slot] = sere_core::optim::l2_norm(g);
        Ok(())
    }

    fn clip_per_tensor(&self, g: &mut Vec<f32>, ranges: &[Range<usize>], max: f32) -> OpResult {
        for r in ranges {
            clip_grad_norm(&mut g[r.clone()], max)?;
        }
        Ok(())
    }

    fn adamw(
        &self,
        p: &mut Vec<f32>,
        g: &Vec<f32>,
        (m, v): (&mut Vec<f32>, &mut Vec<f32>),
        r: Range<usize>,
        opt: &AdamW,
        t: u32,
    ) -> OpResult {
        let (p, g) = (&mut p[r.clone()], &g[r.clone()]);
        let (m, v) = (&mut m[r.clone()], &mut v[r]);
        const CHUNK: usize = 1 << 15;
        if p.len() <= CHUNK {
            return Ok(adamw_step(p, g, m, v, opt, t)?);
        }
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .try_for_each(|((pc, gc), (mc, vc))| adamw_step(pc, gc, mc, vc, opt, t))?;
        Ok(())
    }

    fn ema(&self, teacher: &mut Vec<f32>, student: &Vec<f32>, momentum: f32) -> OpResult {
        teacher
            .par_chunks_mut(1 << 15)
            .zip(student.par_chunks(1 << 15))
            .try_for_each(|(t, s)| ema_update(t, s, momentum))?;
        Ok(())
    }
}
