//! `impl Backend for Cuda`, kept in one block: every operation takes
//! exactly-sized views of its buffers (`views`) and enqueues `sere-cuda`
//! calls on the device's stream. The relation losses run through
//! `relation`'s workspace; the attention backward's per-head loop is the
//! inherent `Cuda::attention_backward_in`.

use std::ops::Range;

use super::relation::{channel_loss, rel_shape, spatial_loss, RelParams};
use super::views::{
    grow, head_dim, invalid, lead, lead_mut, mat_view, out_view, part, part_mut, qkv_view,
    refuse_sync_bn, short, two_mut,
};
use super::{Buf, Cuda, CudaScratch, RelationWorkspace};
use crate::backend::relation::GLOBAL_VIEWS;
use crate::backend::{
    AttentionShape, Backend, Blocks, BnMode, BnSaved, BnState, CentredTeacher, DinoLossArgs, Grads,
    InputGrad, L2Saved, LayerNormSaved, LinearParams, LinearShape, Mat, MatMut, MimLossArgs,
    NormParams, OpResult, ParamView, RelationArgs, Rows, StatSlot,
};
use crate::backend::{BN_EPS, BN_MOMENTUM, LN_EPS};
use sere_core::loss::DinoShape;
use sere_core::optim::AdamW;
use sere_cuda::{CudaError, MatView};

impl Backend for Cuda {
    type Buf = Buf;
    type Scratch = CudaScratch;
    type RelationWorkspace = RelationWorkspace;

    fn name(&self) -> &'static str {
        "cuda"
    }

    // ----- memory -------------------------------------------------------

    /// CUDA allocations are never empty: a request for 0 values gets one.
    fn zeros(&self, len: usize) -> OpResult<Buf> {
        Ok(self.gpu.zeros(len.max(1))?)
    }

    fn upload(&self, host: &[f32]) -> OpResult<Buf> {
        if host.is_empty() {
            return self.zeros(0);
        }
        Ok(self.gpu.upload(host)?)
    }

    fn upload_into(&self, host: &[f32], dst: &mut Buf) -> OpResult {
        if host.is_empty() {
            return Ok(());
        }
        let mut d = lead_mut(dst, host.len(), "upload destination")?;
        Ok(self.gpu.upload_into(host, &mut d)?)
    }

    fn download(&self, src: &Buf) -> OpResult<Vec<f32>> {
        Ok(self.gpu.download(src)?)
    }

    fn len(&self, buf: &Buf) -> usize {
        buf.len()
    }

    fn zero(&self, dst: &mut Buf) -> OpResult {
        Ok(self.gpu.fill_zero(dst)?)
    }

    fn duplicate(&self, src: &Buf) -> OpResult<Buf> {
        Ok(self.gpu.stream().clone_dtod(src).map_err(CudaError::from)?)
    }

    fn synchronize(&self) -> OpResult {
        Ok(self.gpu.synchronize()?)
    }

    // ----- dense algebra --------------------------------------------------

    fn linear_forward(
        &self,
        x: &Buf,
        layer: ParamView<'_, Buf, LinearParams>,
        s: LinearShape,
        y: &mut Buf,
    ) -> OpResult {
        let (p, w, b) = (
            layer.params,
            layer.layer.weight.clone(),
            layer.layer.bias.clone(),
        );
        let g = &self.gpu;
        let x = lead(x, s.rows * s.inp, "x")?;
        let mut y = lead_mut(y, s.rows * s.out, "y")?;
        g.linear_forward(&x, &part(p, w, "weight")?, s.rows, s.inp, s.out, &mut y)?;
        if let Some(b) = b {
            g.bias_add(&mut y, &part(p, b, "bias")?, s.rows, s.out)?;
        }
        Ok(())
    }

    fn linear_backward(
        &self,
        x: &Buf,
        dy: &Buf,
        layer: ParamView<'_, Buf, LinearParams>,
        s: LinearShape,
        dx: InputGrad<'_, Buf>,
        grads: &mut Buf,
    ) -> OpResult {
        let (p, w, b) = (
            layer.params,
            layer.layer.weight.clone(),
            layer.layer.bias.clone(),
        );
        let g = &self.gpu;
        let (rows, inp, out) = (s.rows, s.inp, s.out);
        let x = lead(x, rows * inp, "x")?;
        let dy = lead(dy, rows * out, "dy")?;
        if let Some((dx, beta)) = dx.with_beta() {
            let mut dx = lead_mut(dx, rows * inp, "dx")?;
            let wv = part(p, w.clone(), "weight")?;
            // Gpu::linear_backward_input with the accumulation chosen.
            let (dym, wm) = (MatView::row_major(rows, out), MatView::row_major(out, inp));
            let dxm = MatView::row_major(rows, inp);
            g.gemm(1, 1.0, &dy, dym, &wv, wm, beta, &mut dx, dxm)?;
        }
        let mut gw = part_mut(grads, w, "weight gradient")?;
        g.linear_backward_weight(&x, &dy, rows, inp, out, &mut gw)?;
        if let Some(b) = b {
            g.bias_grad(&dy, rows, out, &mut part_mut(grads, b, "bias gradient")?)?;
        }
        Ok(())
    }

    /// Views with a unit stride in one dimension (cuBLAS's); a column-major
    /// `c` is computed as `c^T = op(b)^T op(a)^T`.
    fn gemm(
        &self,
        alpha: f32,
        a: Mat<'_, Buf>,
        b: Mat<'_, Buf>,
        beta: f32,
        c: MatMut<'_, Buf>,
    ) -> OpResult {
        let (a, la, b, lb, c, lc) = (a.buf, a.view, b.buf, b.view, c.buf, c.view);
        if lc.rows == 0 || lc.cols == 0 {
            return Ok(());
        }
        let (a, la, b, lb, lc) = if mat_view(lc)?.transposed {
            (b, lb.transposed(), a, la.transposed(), lc.transposed())
        } else {
            (a, la, b, lb, lc)
        };
        let (va, vb, vc) = (mat_view(la)?, mat_view(lb)?, mat_view(lc)?);
        Ok(self.gpu.gemm(1, alpha, a, va, b, vb, beta, c, vc)?)
    }

    // ----- rows and element-wise -------------------------------------------

    fn layer_norm_forward(
        &self,
        x: &Buf,
        norm: ParamView<'_, Buf, NormParams>,
        Rows { rows, cols }: Rows,
        y: &mut Buf,
        (mean, rstd): (&mut Buf, &mut Buf),
    ) -> OpResult {
        let (p, gamma, beta) = (
            norm.params,
            norm.layer.gamma.clone(),
            norm.layer.beta.clone(),
        );
        let n = rows * cols;
        Ok(self.gpu.layer_norm_forward(
            &lead(x, n, "x")?,
            &part(p, gamma, "gamma")?,
            &part(p, beta, "beta")?,
            rows,
            cols,
            LN_EPS,
            &mut lead_mut(y, n, "y")?,
            &mut lead_mut(mean, rows, "mean")?,
            &mut lead_mut(rstd, rows, "rstd")?,
        )?)
    }

    fn layer_norm_backward(
        &self,
        LayerNormSaved { x, mean, rstd }: LayerNormSaved<'_, Buf>,
        dy: &Buf,
        norm: ParamView<'_, Buf, NormParams>,
        Rows { rows, cols }: Rows,
        Grads {
            input: dx,
            params: g,
        }: Grads<'_, Buf>,
        _scratch: &mut CudaScratch,
    ) -> OpResult {
        let (p, gamma, beta) = (
            norm.params,
            norm.layer.gamma.clone(),
            norm.layer.beta.clone(),
        );
        let n = rows * cols;
        let (x, dy) = (lead(x, n, "x")?, lead(dy, n, "dy")?);
        let (mean, rstd) = (lead(mean, rows, "mean")?, lead(rstd, rows, "rstd")?);
        let gv = part(p, gamma.clone(), "gamma")?;
        let mut dx = lead_mut(dx, n, "dx")?;
        two_mut(g, gamma, beta, |gg, gb| {
            Ok(self
                .gpu
                .layer_norm_backward(&x, &gv, &mean, &rstd, &dy, rows, cols, &mut dx, gg, gb)?)
        })
    }

    fn gelu_forward(&self, x: &Buf, n: usize, y: &mut Buf) -> OpResult {
        Ok(self
            .gpu
            .gelu_forward(&lead(x, n, "x")?, &mut lead_mut(y, n, "y")?)?)
    }

    fn gelu_backward(&self, x: &Buf, dy: &Buf, n: usize, dx: &mut Buf) -> OpResult {
        Ok(self.gpu.gelu_backward(
            &lead(x, n, "x")?,
            &lead(dy, n, "dy")?,
            &mut lead_mut(dx, n, "dx")?,
        )?)
    }

    /// Through the device temporary: `tmp = d`, `d = 0`, `d += tmp gelu'(x)`.
    fn gelu_grad_in_place(&self, x: &Buf, n: usize, d: &mut Buf) -> OpResult {
        if n == 0 {
            return Ok(());
        }
        let x = lead(x, n, "x")?;
        let mut d = lead_mut(d, n, "d")?;
        self.with_temp(n, |tmp| {
            let mut tmp = tmp.slice_mut(..n);
            self.gpu
                .stream()
                .memcpy_dtod(&d, &mut tmp)
                .map_err(CudaError::from)?;
            self.gpu.fill_zero(&mut d)?;
            Ok(self.gpu.gelu_backward(&x, &tmp, &mut d)?)
        })
    }

    fn im2col(
        &self,
        images: &Buf,
        (batch, chans, img, patch): (usize, usize, usize, usize),
        out: &mut Buf,
    ) -> OpResult {
        let n = batch * chans * img * img;
        Ok(self.gpu.im2col(
            &lead(images, n, "images")?,
            batch,
            chans,
            img,
            patch,
            &mut lead_mut(out, n, "patches")?,
        )?)
    }

    fn copy_blocks(&self, src: &Buf, dst: &mut Buf, k: Blocks, accumulate: bool) -> OpResult {
        if k.count == 0 || k.len == 0 {
            return Ok(());
        }
        let (sl, dl) = (src.len(), dst.len());
        let s = part(src, k.src_start..sl, "source blocks")?;
        let mut d = part_mut(dst, k.dst_start..dl, "destination blocks")?;
        Ok(self.gpu.copy_rows(
            &s,
            k.src_stride,
            &mut d,
            k.dst_stride,
            k.count,
            k.len,
            accumulate,
        )?)
    }

    /// Four row copies (the sums in the CPU's order): patch rows `= emb`,
    /// `+= pos_patch`; CLS rows `= cls`, `+= pos_0` (sources broadcast with
    /// stride 0).
    fn embed_tokens(
        &self,
        emb: &Buf,
        p: &Buf,
        (cls, pos): (Range<usize>, Range<usize>),
        pos_patch: &Buf,
        (batch, n, d): (usize, usize, usize),
        x0: &mut Buf,
    ) -> OpResult {
        if batch == 0 || d == 0 {
            return Ok(());
        }
        let g = &self.gpu;
        let t = n + 1;
        if cls.len() != d || pos.len() < d {
            return Err(short("cls / pos", d, cls.len().min(pos.len())));
        }
        let cls = part(p, cls, "cls")?;
        let pos0 = part(p, pos.start..pos.start + d, "pos")?;
        let mut x0 = lead_mut(x0, batch * t * d, "tokens")?;
        if n > 0 {
            let mut rows = x0.slice_mut(d..);
            g.copy_rows(
                &lead(emb, batch * n * d, "emb")?,
                n * d,
                &mut rows,
                t * d,
                batch,
                n * d,
                false,
            )?;
            let pp = lead(pos_patch, n * d, "pos_patch")?;
            g.copy_rows(&pp, 0, &mut rows, t * d, batch, n * d, true)?;
        }
        g.copy_rows(&cls, 0, &mut x0, t * d, batch, d, false)?;
        Ok(g.copy_rows(&pos0, 0, &mut x0, t * d, batch, d, true)?)
    }

    /// The CLS rows are gathered into the head of `demb` (scratch until the
    /// patch rows overwrite it) and column-summed into `g[cls]` and
    /// `g[pos][0..d]`; the patch rows into `demb`, then summed over images.
    fn embed_tokens_backward(
        &self,
        dx: &Buf,
        (batch, n, d): (usize, usize, usize),
        (cls, pos): (Range<usize>, Range<usize>),
        grads: &mut Buf,
        dpos_patch: &mut Buf,
        demb: &mut Buf,
    ) -> OpResult {
        if batch == 0 || d == 0 {
            return Ok(());
        }
        let g = &self.gpu;
        let t = n + 1;
        let dx = lead(dx, batch * t * d, "token gradient")?;
        {
            let mut rows = lead_mut(demb, batch * d, "demb")?;
            g.copy_rows(&dx, t * d, &mut rows, d, batch, d, false)?;
            g.bias_grad(&rows, batch, d, &mut part_mut(grads, cls, "cls gradient")?)?;
            let gpos0 = pos.start..pos.start + d;
            g.bias_grad(
                &rows,
                batch,
                d,
                &mut part_mut(grads, gpos0, "pos gradient")?,
            )?;
        }
        if n == 0 {
            return Ok(());
        }
        let mut demb = lead_mut(demb, batch * n * d, "demb")?;
        g.copy_rows(&dx.slice(d..), t * d, &mut demb, n * d, batch, n * d, false)?;
        let mut dpp = lead_mut(dpos_patch, n * d, "dpos_patch")?;
        g.fill_zero(&mut dpp)?;
        Ok(g.bias_grad(&demb, batch, n * d, &mut dpp)?)
    }

    fn add_into(&self, src: &Buf, len: usize, dst: &mut Buf, dst_start: usize) -> OpResult {
        let s = lead(src, len, "src")?;
        let mut d = part_mut(dst, dst_start..dst_start + len, "dst")?;
        Ok(self.gpu.axpy(&mut d, &s, 1.0)?)
    }

    fn residual_keep_add(
        &self,
        out: &mut Buf,
        x: &Buf,
        keep: &Buf,
        (images, per): (usize, usize),
    ) -> OpResult {
        let n = images * per;
        Ok(self.gpu.residual_keep_add(
            &mut lead_mut(out, n, "out")?,
            &lead(x, n, "x")?,
            &lead(keep, images, "keep")?,
            per,
        )?)
    }

    fn keep_scale(
        &self,
        dx: &Buf,
        keep: &Buf,
        (images, per): (usize, usize),
        out: &mut Buf,
    ) -> OpResult {
        let n = images * per;
        Ok(self.gpu.keep_scale(
            &lead(dx, n, "dx")?,
            &lead(keep, images, "keep")?,
            per,
            &mut lead_mut(out, n, "out")?,
        )?)
    }

    fn l2_normalize_rows(
        &self,
        src: &Buf,
        src_start: usize,
        (rows, dim): (usize, usize),
        eps: f32,
        dst: &mut Buf,
        norms: &mut Buf,
    ) -> OpResult {
        let n = rows * dim;
        Ok(self.gpu.l2_normalize_rows(
            &part(src, src_start..src_start + n, "src")?,
            rows,
            dim,
            eps,
            &mut lead_mut(dst, n, "dst")?,
            &mut lead_mut(norms, rows, "norms")?,
        )?)
    }

    fn row_dots_add(
        &self,
        a: &Buf,
        b: &Buf,
        (rows, dim): (usize, usize),
        out: &mut Buf,
        out_start: usize,
    ) -> OpResult {
        let n = rows * dim;
        Ok(self.gpu.row_dot_add(
            &lead(a, n, "a")?,
            &lead(b, n, "b")?,
            rows,
            dim,
            &mut part_mut(out, out_start..out_start + rows, "out")?,
        )?)
    }

    fn l2_normalize_rows_backward(
        &self,
        dy: &Buf,
        L2Saved { y, norms }: L2Saved<'_, Buf>,
        (rows, dim): (usize, usize),
        eps: f32,
        dx: &mut Buf,
        (dx_start, accumulate): (usize, bool),
    ) -> OpResult {
        let n = rows * dim;
        Ok(self.gpu.l2_normalize_rows_backward(
            &lead(dy, n, "dy")?,
            &lead(y, n, "y")?,
            &lead(norms, rows, "norms")?,
            rows,
            dim,
            eps,
            accumulate,
            &mut part_mut(dx, dx_start..dx_start + n, "dx")?,
        )?)
    }

    // ----- fused ---------------------------------------------------------

    /// Scores by one strided-batched GEMM per head (scaled in the GEMM, as
    /// the CPU), one softmax over every head's rows, one GEMM per head for
    /// the output. Non-finite scores are not reported here (that needs a
    /// device round trip): they reach the step's losses, which the engine
    /// checks once per step.
    fn attention_forward(
        &self,
        qkv: &Buf,
        s: AttentionShape,
        probs: &mut Buf,
        attn: &mut Buf,
    ) -> OpResult {
        let g = &self.gpu;
        let (hd, scale) = head_dim(&s)?;
        let (b, t, d, heads) = (s.batch, s.tokens, s.dim, s.heads);
        let qkv = lead(qkv, b * t * 3 * d, "qkv")?;
        let mut probs = lead_mut(probs, b * heads * t * t, "probs")?;
        let mut attn = lead_mut(attn, b * t * d, "attn")?;
        let (tok, outv) = (qkv_view(t, hd, d), out_view(t, hd, d));
        let pm = MatView::row_major(t, t).batched(heads * t * t);
        for h in 0..heads {
            let (q, k) = (tok.at(h * hd), tok.at(d + h * hd));
            g.gemm(
                b,
                scale,
                &qkv,
                q,
                &qkv,
                k.t(),
                0.0,
                &mut probs,
                pm.at(h * t * t),
            )?;
        }
        g.softmax_rows_in_place(&mut probs, b * heads * t, t)?;
        for h in 0..heads {
            let v = tok.at(2 * d + h * hd);
            g.gemm(
                b,
                1.0,
                &probs,
                pm.at(h * t * t),
                &qkv,
                v,
                0.0,
                &mut attn,
                outv.at(h * hd),
            )?;
        }
        Ok(())
    }

    /// `dP` and `dS` of every head.
    fn attention_scratch_len(&self, s: AttentionShape) -> usize {
        2 * s.batch * s.heads * s.tokens * s.tokens
    }

    /// Needs `dP` and `dS` for every head, `2 x batch x heads x T x T`:
    /// taken from `dscores` when it is that long, else from the device
    /// temporary (the CPU's `batch x T x T` is not enough).
    fn attention_backward(
        &self,
        qkv: &Buf,
        probs: &Buf,
        dattn: &Buf,
        s: AttentionShape,
        dscores: &mut Buf,
        dqkv: &mut Buf,
    ) -> OpResult {
        let (b, t, d) = (s.batch, s.tokens, s.dim);
        let need = b * s.heads * t * t;
        let qkv = lead(qkv, b * t * 3 * d, "qkv")?;
        let probs = lead(probs, need, "probs")?;
        let dattn = lead(dattn, b * t * d, "dattn")?;
        let mut dqkv = lead_mut(dqkv, b * t * 3 * d, "dqkv")?;
        let mut run = |buf: &mut Buf| {
            let mut both = buf.slice_mut(..2 * need);
            let (mut dp, mut ds) = both.split_at_mut(need);
            self.attention_backward_in((&qkv, &probs), &dattn, s, (&mut dp, &mut ds), &mut dqkv)
        };
        if dscores.len() >= 2 * need {
            run(dscores)
        } else {
            self.with_temp(2 * need, run)
        }
    }

    fn batch_norm_relu(
        &self,
        y: &Buf,
        norm: ParamView<'_, Buf, NormParams>,
        Rows { rows, cols: c }: Rows,
        BnState {
            mode,
            running_mean,
            running_var,
            batch: stats,
        }: BnState<'_, Self>,
        _scratch: &mut CudaScratch,
        out: &mut Buf,
    ) -> OpResult {
        let (p, gamma, beta) = (
            norm.params,
            norm.layer.gamma.clone(),
            norm.layer.beta.clone(),
        );
        refuse_sync_bn(&stats.group)?;
        let g = &self.gpu;
        let n = rows * c;
        let y = lead(y, n, "y")?;
        let (gv, bv) = (part(p, gamma, "gamma")?, part(p, beta, "beta")?);
        let mut out = lead_mut(out, n, "out")?;
        let mut rm = lead_mut(running_mean, c, "running mean")?;
        let mut rv = lead_mut(running_var, c, "running var")?;
        match mode {
            BnMode::Train => {
                let mut mean = lead_mut(&mut stats.mean, c, "mean")?;
                let mut var = lead_mut(&mut stats.var, c, "var")?;
                let mut rstd = lead_mut(&mut stats.rstd, c, "rstd")?;
                g.batch_norm_forward(
                    &y, &gv, &bv, rows, c, BN_EPS, &mut out, &mut mean, &mut var, &mut rstd,
                )?;
                g.batch_norm_update_running(&mean, &var, rows, BN_MOMENTUM, &mut rm, &mut rv)?;
            }
            // `stats` is left as it is: only a train-mode pass has a backward.
            BnMode::Eval => g.batch_norm_eval(&y, &gv, &bv, &rm, &rv, rows, c, BN_EPS, &mut out)?,
        }
        Ok(g.relu_in_place(&mut out)?)
    }

    /// `scratch = dout [out > 0]`, `dy = 0`, then the batch-norm backward.
    fn batch_norm_relu_backward(
        &self,
        BnSaved { y, out, stats }: BnSaved<'_, Self>,
        dout: &Buf,
        norm: ParamView<'_, Buf, NormParams>,
        Rows { rows, cols: c }: Rows,
        Grads {
            input: dy,
            params: grads,
        }: Grads<'_, Buf>,
        scratch: &mut CudaScratch,
    ) -> OpResult {
        let (p, gamma, beta) = (
            norm.params,
            norm.layer.gamma.clone(),
            norm.layer.beta.clone(),
        );
        refuse_sync_bn(&stats.group)?;
        let g = &self.gpu;
        let n = rows * c;
        let (y, out, dout) = (
            lead(y, n, "y")?,
            lead(out, n, "out")?,
            lead(dout, n, "dout")?,
        );
        let gv = part(p, gamma.clone(), "gamma")?;
        let mean = lead(&stats.mean, c, "mean")?;
        let rstd = lead(&stats.rstd, c, "rstd")?;
        let mut masked = grow(g, &mut scratch.buf, n)?.slice_mut(..n);
        g.relu_backward(&out, &dout, &mut masked)?;
        let mut dy = lead_mut(dy, n, "dy")?;
        g.fill_zero(&mut dy)?;
        two_mut(grads, gamma, beta, |gg, gb| {
            Ok(g.batch_norm_backward(&y, &gv, &mean, &rstd, &masked, rows, c, &mut dy, gg, gb)?)
        })
    }

    fn dino_loss(
        &self,
        student: &Buf,
        CentredTeacher {
            logits: teacher,
            centre,
        }: CentredTeacher<'_, Buf>,
        a: DinoLossArgs,
        dstudent: &mut Buf,
        StatSlot { stats, slot }: StatSlot<'_, Buf>,
    ) -> OpResult {
        let g = &self.gpu;
        let (sn, tn) = (a.views * a.batch * a.dim, GLOBAL_VIEWS * a.batch * a.dim);
        let shape = DinoShape {
            student_views: a.views,
            teacher_views: GLOBAL_VIEWS,
            batch: a.batch,
            dim: a.dim,
        };
        let (s, t) = (lead(student, sn, "student")?, lead(teacher, tn, "teacher")?);
        g.teacher_entropy(
            &t,
            &lead(centre, a.dim, "centre")?,
            GLOBAL_VIEWS * a.batch,
            a.dim,
            a.tau_teacher,
            &mut part_mut(stats, slot + 1..slot + 2, "stats")?,
        )?;
        g.dino_loss_backward(
            &s,
            &t,
            &lead(centre, a.dim, "centre")?,
            shape,
            a.tau_student,
            a.tau_teacher,
            a.weight,
            &mut lead_mut(dstudent, sn, "dstudent")?,
            &mut part_mut(stats, slot..slot + 1, "stats")?,
        )?;
        // The loss used the centre from before this update, as DINO does.
        Ok(g.dino_centre_update(
            &t,
            GLOBAL_VIEWS * a.batch,
            a.dim,
            a.centre_momentum,
            &mut lead_mut(centre, a.dim, "centre")?,
        )?)
    }

    fn mim_loss(
        &self,
        student: &Buf,
        CentredTeacher {
            logits: teacher,
            centre,
        }: CentredTeacher<'_, Buf>,
        weights: &Buf,
        a: MimLossArgs,
        dstudent: &mut Buf,
        StatSlot { stats, slot }: StatSlot<'_, Buf>,
    ) -> OpResult {
        let g = &self.gpu;
        let n = a.rows * a.dim;
        let t = lead(teacher, n, "teacher")?;
        g.weighted_cross_entropy_backward(
            &lead(student, n, "student")?,
            &t,
            &lead(centre, a.dim, "centre")?,
            &lead(weights, a.rows, "weights")?,
            a.rows,
            a.dim,
            a.tau_student,
            a.tau_teacher,
            a.weight,
            &mut lead_mut(dstudent, n, "dstudent")?,
            &mut part_mut(stats, slot..slot + 1, "stats")?,
        )?;
        // The loss used the centre from before this update, as iBOT does.
        Ok(g.dino_centre_update(
            &t,
            a.rows,
            a.dim,
            a.centre_momentum,
            &mut lead_mut(centre, a.dim, "centre")?,
        )?)
    }

    /// The mirror's batched kernels over compacted pair grids (two uploads
    /// per call); each cross-entropy's mean is added into its slot with the
    /// weight that makes the slot the mean over terms.
    fn relation_losses(
        &self,
        ws: &mut RelationWorkspace,
        args: RelationArgs<'_, Self>,
        stats: &mut Buf,
        slot: usize,
    ) -> OpResult<usize> {
        let RelationArgs {
            cfg,
            shapes,
            grids,
            teacher_spatial,
            teacher_channel,
            student_spatial,
            student_channel,
            weights: (alpha, beta),
            mut dspatial,
            mut dchannel,
        } = args;
        if shapes.batch == 0 || shapes.channels == 0 {
            return Err(invalid("relation losses", "need images and channels"));
        }
        let g = &self.gpu;
        let w = ws.shaped(g, rel_shape(shapes, cfg.heads, grids))?;
        let terms = w.stage(g, grids)?;
        g.fill_zero(&mut part_mut(stats, slot..slot + 2, "stats")?)?;
        let sp = RelParams {
            tau_s: cfg.tau_student,
            tau_t: cfg.tau_teacher_spatial,
            weight: alpha,
        };
        spatial_loss(
            g,
            w,
            terms,
            (teacher_spatial, &student_spatial),
            &mut dspatial,
            sp,
            StatSlot {
                stats: &mut *stats,
                slot,
            },
        )?;
        let cp = RelParams {
            tau_s: cfg.tau_student,
            tau_t: cfg.tau_teacher_channel,
            weight: beta,
        };
        channel_loss(
            g,
            w,
            (teacher_channel, &student_channel),
            &mut dchannel,
            cp,
            StatSlot {
                stats,
                slot: slot + 1,
            },
        )?;
        Ok(terms)
    }

    fn l2_norm(&self, g: &Buf, stats: &mut Buf, slot: usize) -> OpResult {
        Ok(self
            .gpu
            .l2_norm(g, &mut part_mut(stats, slot..slot + 1, "stats")?)?)
    }

    /// One norm-and-scale per range (the norm goes to the device temporary).
    fn clip_per_tensor(&self, g: &mut Buf, ranges: &[Range<usize>], max_norm: f32) -> OpResult {
        self.with_temp(1, |norm| {
            let mut norm = norm.slice_mut(..1);
            for r in ranges.iter().filter(|r| !r.is_empty()) {
                let mut v = part_mut(g, r.clone(), "gradient range")?;
                self.gpu.clip_grad_norm(&mut v, max_norm, &mut norm)?;
            }
            Ok(())
        })
    }

    fn adamw(
        &self,
        p: &mut Buf,
        g: &Buf,
        (m, v): (&mut Buf, &mut Buf),
        range: Range<usize>,
        opt: &AdamW,
        t: u32,
    ) -> OpResult {
        Ok(self.gpu.adamw_step(
            &mut part_mut(p, range.clone(), "params")?,
            &part(g, range.clone(), "grads")?,
            &mut part_mut(m, range.clone(), "adam m")?,
            &mut part_mut(v, range, "adam v")?,
            opt,
            t,
        )?)
    }

    fn ema(&self, teacher: &mut Buf, student: &Buf, momentum: f32) -> OpResult {
        Ok(self.gpu.ema_update(teacher, student, momentum)?)
    }
}
