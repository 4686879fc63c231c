//! Row kernels: softmax and log-softmax (sere-core `softmax`), the
//! attention softmax, and the fused cross-entropy losses (sere-core
//! `loss`): relation cross-entropy and DINO, with the DINO centre update.

use crate::error::Result;
use crate::gpu::{check_len, dim, launch, positive, product, row_launch_config, unit, Gpu, K};
use crate::ops::reduce::{ColFinish, ColIn, ColOut, ColSum};
use cudarc::driver::{DevicePtr, DevicePtrMut};
use sere_core::loss::DinoShape;

fn rows_cols(rows: usize, cols: usize) -> Result<(i32, i32, usize)> {
    let n = product("rows x cols", &[rows, cols])?;
    Ok((dim("rows", rows)?, dim("cols", cols)?, n))
}

fn non_finite(what: &'static str) -> crate::CudaError {
    sere_core::Error::NonFinite { what }.into()
}

impl Gpu {
    fn softmax_impl(
        &self,
        x: u64,
        y: u64,
        rows: usize,
        cols: usize,
        scale: f32,
        log: bool,
    ) -> Result<()> {
        let (rows_i, cols_i, _) = rows_cols(rows, cols)?;
        let log_i = log as i32;
        launch!(
            self,
            K::SoftmaxFwd,
            row_launch_config(rows, cols),
            x,
            y,
            rows_i,
            cols_i,
            scale,
            log_i
        )
    }

    /// Row-wise softmax of a `rows x cols` matrix into `out` (sere-core
    /// `softmax_rows`).
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let x = gpu.upload(&[1e4, 1e4, -1e4]).unwrap();
    /// let mut p = gpu.zeros(3).unwrap();
    /// gpu.softmax_rows(&x, 1, 3, &mut p).unwrap();
    /// assert!((gpu.download(&p).unwrap()[0] - 0.5).abs() < 1e-6);
    /// ```
    pub fn softmax_rows(
        &self,
        x: &impl DevicePtr<f32>,
        rows: usize,
        cols: usize,
        out: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        self.attention_softmax_forward(x, rows, cols, 1.0, out)
    }

    /// Row-wise softmax in place (sere-core `softmax_rows_in_place`).
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let mut a = gpu.upload(&[0.0, 0.0, 5.0, 5.0]).unwrap();
    /// gpu.softmax_rows_in_place(&mut a, 2, 2).unwrap();
    /// assert_eq!(gpu.download(&a).unwrap(), vec![0.5; 4]);
    /// ```
    pub fn softmax_rows_in_place(
        &self,
        x: &mut impl DevicePtrMut<f32>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.attention_softmax_in_place(x, rows, cols, 1.0)
    }

    /// Row-wise log-softmax (sere-core `log_softmax_rows`).
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let x = gpu.upload(&[3.0, 3.0]).unwrap();
    /// let mut l = gpu.zeros(2).unwrap();
    /// gpu.log_softmax_rows(&x, 1, 2, &mut l).unwrap();
    /// assert!((gpu.download(&l).unwrap()[0] + std::f32::consts::LN_2).abs() < 1e-6);
    /// ```
    pub fn log_softmax_rows(
        &self,
        x: &impl DevicePtr<f32>,
        rows: usize,
        cols: usize,
        out: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let (_, _, n) = rows_cols(rows, cols)?;
        let (xp, _g1) = self.rd("input", x, n)?;
        let (yp, _g2) = self.wr("out", out, n)?;
        self.softmax_impl(xp, yp, rows, cols, 1.0, true)
    }

    /// Attention softmax: `probs = softmax(scale * logits)` row-wise (the
    /// `1 / sqrt(head_dim)` of attention folded into the kernel).
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let s = gpu.upload(&[0.0, 2.0]).unwrap();
    /// let mut p = gpu.zeros(2).unwrap();
    /// gpu.attention_softmax_forward(&s, 1, 2, 0.0, &mut p).unwrap();
    /// assert_eq!(gpu.download(&p).unwrap(), vec![0.5, 0.5]);
    /// ```
    pub fn attention_softmax_forward(
        &self,
        logits: &impl DevicePtr<f32>,
        rows: usize,
        cols: usize,
        scale: f32,
        probs: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let (_, _, n) = rows_cols(rows, cols)?;
        if !scale.is_finite() {
            return Err(non_finite("softmax scale"));
        }
        let (xp, _g1) = self.rd("input", logits, n)?;
        let (yp, _g2) = self.wr("out", probs, n)?;
        self.softmax_impl(xp, yp, rows, cols, scale, false)
    }

    /// [`Gpu::attention_softmax_forward`] in place.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let mut s = gpu.upload(&[1.0, 1.0]).unwrap();
    /// gpu.attention_softmax_in_place(&mut s, 1, 2, 0.125).unwrap();
    /// assert_eq!(gpu.download(&s).unwrap(), vec![0.5, 0.5]);
    /// ```
    pub fn attention_softmax_in_place(
        &self,
        logits: &mut impl DevicePtrMut<f32>,
        rows: usize,
        cols: usize,
        scale: f32,
    ) -> Result<()> {
        let (_, _, n) = rows_cols(rows, cols)?;
        if !scale.is_finite() {
            return Err(non_finite("softmax scale"));
        }
        let (xp, _g) = self.wr("input", logits, n)?;
        self.softmax_impl(xp, xp, rows, cols, scale, false)
    }

    /// Backward of the (attention) softmax from its output `probs`: adds
    /// `scale * probs * (dprobs - <dprobs, probs>)` to `dlogits` row-wise.
    /// With `scale = 1` this is sere-core `softmax_backward_rows`.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let y = gpu.upload(&[0.5, 0.5]).unwrap();
    /// let dy = gpu.upload(&[1.0, 1.0]).unwrap();
    /// let mut dx = gpu.zeros(2).unwrap();
    /// gpu.attention_softmax_backward(&y, &dy, 1, 2, 1.0, &mut dx).unwrap();
    /// assert_eq!(gpu.download(&dx).unwrap(), vec![0.0, 0.0]);
    /// ```
    pub fn attention_softmax_backward(
        &self,
        probs: &impl DevicePtr<f32>,
        dprobs: &impl DevicePtr<f32>,
        rows: usize,
        cols: usize,
        scale: f32,
        dlogits: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let (rows_i, cols_i, n) = rows_cols(rows, cols)?;
        let (yp, _g1) = self.rd("y", probs, n)?;
        let (dyp, _g2) = self.rd("dy", dprobs, n)?;
        let (dxp, _g3) = self.wr("dx", dlogits, n)?;
        launch!(
            self,
            K::SoftmaxBwd,
            row_launch_config(rows, cols),
            yp,
            dyp,
            dxp,
            rows_i,
            cols_i,
            scale
        )
    }

    /// sere-core `softmax_backward_rows`: adds `y * (dy - <dy, y>)` to `dx`.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let y = gpu.upload(&[0.5, 0.5]).unwrap();
    /// let dy = gpu.upload(&[1.0, 0.0]).unwrap();
    /// let mut dx = gpu.zeros(2).unwrap();
    /// gpu.softmax_backward_rows(&y, &dy, 1, 2, &mut dx).unwrap();
    /// assert_eq!(gpu.download(&dx).unwrap(), vec![0.25, -0.25]);
    /// ```
    pub fn softmax_backward_rows(
        &self,
        y: &impl DevicePtr<f32>,
        dy: &impl DevicePtr<f32>,
        rows: usize,
        cols: usize,
        dx: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        self.attention_softmax_backward(y, dy, rows, cols, 1.0, dx)
    }

    /// sere-core `log_softmax_backward_rows`: adds `dl - exp(l) * sum(dl)`
    /// to `dx`.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let l = gpu.upload(&[-std::f32::consts::LN_2; 2]).unwrap();
    /// let dl = gpu.upload(&[1.0, 0.0]).unwrap();
    /// let mut dx = gpu.zeros(2).unwrap();
    /// gpu.log_softmax_backward_rows(&l, &dl, 1, 2, &mut dx).unwrap();
    /// ```
    pub fn log_softmax_backward_rows(
        &self,
        l: &impl DevicePtr<f32>,
        dl: &impl DevicePtr<f32>,
        rows: usize,
        cols: usize,
        dx: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let (rows_i, cols_i, n) = rows_cols(rows, cols)?;
        let (lp, _g1) = self.rd("l", l, n)?;
        let (dlp, _g2) = self.rd("dl", dl, n)?;
        let (dxp, _g3) = self.wr("dx", dx, n)?;
        launch!(
            self,
            K::LogSoftmaxBwd,
            row_launch_config(rows, cols),
            lp,
            dlp,
            dxp,
            rows_i,
            cols_i
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn relation_ce_impl(
        &self,
        student: &impl DevicePtr<f32>,
        teacher: &impl DevicePtr<f32>,
        rows: usize,
        cols: usize,
        tau_s: f32,
        tau_t: f32,
        grad: Option<(u64, f32)>,
        loss: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let (rows_i, cols_i, n) = rows_cols(rows, cols)?;
        positive("tau_s", tau_s)?;
        positive("tau_t", tau_t)?;
        let (inv_ts, inv_tt) = (1.0 / tau_s, 1.0 / tau_t);
        let (gp, f) = match grad {
            Some((p, scale)) => {
                // sere-core: f = (scale / rows) * (1 / tau_s).
                let f = (scale / rows as f32) * inv_ts;
                if !f.is_finite() {
                    return Err(non_finite("gradient scale / tau_s"));
                }
                (p, f)
            }
            None => (0u64, 0.0f32),
        };
        let (sp, _g1) = self.rd("student", student, n)?;
        let (tp, _g2) = self.rd("teacher", teacher, n)?;
        let (lp, _g3) = self.wr("loss", loss, 1)?;
        let mut row_loss = self.stream.alloc_zeros::<f32>(rows)?;
        {
            let (rl, _g4) = self.wr("row_loss", &mut row_loss, rows)?;
            launch!(
                self,
                K::RelationCe,
                row_launch_config(rows, cols),
                sp,
                tp,
                gp,
                rl,
                rows_i,
                cols_i,
                inv_ts,
                inv_tt,
                f
            )?;
        }
        let (rl, _g4) = self.rd("row_loss", &row_loss, rows)?;
        self.scalar_reduce(rl, rows, false, 0, 1.0 / rows as f64, 0.0, lp, 0)
    }

    /// Relation cross-entropy (sere-core `relation_cross_entropy`): the
    /// mean over rows of `-sum_k softmax(T_k / tau_t) log softmax(S_k / tau_s)`,
    /// written to `loss[0]` (a one-element device buffer or view).
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let s = gpu.upload(&[0.0, 0.0]).unwrap();
    /// let t = gpu.upload(&[5.0, -5.0]).unwrap();
    /// let mut loss = gpu.zeros(1).unwrap();
    /// gpu.relation_cross_entropy(&s, &t, 1, 2, 1.0, 0.1, &mut loss).unwrap();
    /// assert!((gpu.download(&loss).unwrap()[0] - std::f32::consts::LN_2).abs() < 1e-6);
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn relation_cross_entropy(
        &self,
        student: &impl DevicePtr<f32>,
        teacher: &impl DevicePtr<f32>,
        rows: usize,
        cols: usize,
        tau_s: f32,
        tau_t: f32,
        loss: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        self.relation_ce_impl(student, teacher, rows, cols, tau_s, tau_t, None, loss)
    }

    /// [`Gpu::relation_cross_entropy`] and its gradient, fused (softmaxes,
    /// loss and gradient in one kernel): adds `scale * dL/dS` to
    /// `grad_student` and writes the loss to `loss[0]` (sere-core
    /// `relation_cross_entropy_backward`). The teacher gets no gradient.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let x = gpu.upload(&[1.0, -2.0, 0.5]).unwrap();
    /// let (mut g, mut loss) = (gpu.zeros(3).unwrap(), gpu.zeros(1).unwrap());
    /// gpu.relation_cross_entropy_backward(&x, &x, 1, 3, 0.5, 0.5, 1.0, &mut g, &mut loss).unwrap();
    /// assert!(gpu.download(&g).unwrap().iter().all(|v| v.abs() < 1e-6));
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn relation_cross_entropy_backward(
        &self,
        student: &impl DevicePtr<f32>,
        teacher: &impl DevicePtr<f32>,
        rows: usize,
        cols: usize,
        tau_s: f32,
        tau_t: f32,
        scale: f32,
        grad_student: &mut impl DevicePtrMut<f32>,
        loss: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let n = product("rows x cols", &[rows, cols])?;
        let (gp, _g) = self.wr("grad_student", grad_student, n)?;
        self.relation_ce_impl(
            student,
            teacher,
            rows,
            cols,
            tau_s,
            tau_t,
            Some((gp, scale)),
            loss,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn dino_impl(
        &self,
        student: &impl DevicePtr<f32>,
        teacher: &impl DevicePtr<f32>,
        centre: &impl DevicePtr<f32>,
        shape: DinoShape,
        tau_s: f32,
        tau_t: f32,
        grad: Option<(u64, f32)>,
        loss: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        positive("tau_s", tau_s)?;
        positive("tau_t", tau_t)?;
        let DinoShape {
            student_views,
            teacher_views,
            batch,
            dim: d,
        } = shape;
        let sv_i = dim("student_views", student_views)?;
        let tv_i = dim("teacher_views", teacher_views)?;
        let b_i = dim("batch", batch)?;
        let d_i = dim("dim", d)?;
        if shape.pairs() == 0 {
            return Err(sere_core::Error::InvalidArgument {
                what: "views",
                requirement: "need at least one teacher/student pair of different views",
            }
            .into());
        }
        let s_rows = product("student rows", &[student_views, batch])?;
        let t_rows = product("teacher rows", &[teacher_views, batch])?;
        dim("student rows", s_rows)?;
        let s_len = product("student shape", &[s_rows, d])?;
        let t_len = product("teacher shape", &[t_rows, d])?;
        let (inv_ts, inv_tt) = (1.0 / tau_s, 1.0 / tau_t);
        let pair_scale = 1.0 / (shape.pairs() * batch) as f64;
        let (gp, f) = match grad {
            Some((p, scale)) => {
                // sere-core: per pair f = (scale * pair_scale) * (1 / tau_s).
                let f = (scale * pair_scale as f32) * inv_ts;
                if !f.is_finite() {
                    return Err(non_finite("gradient scale / tau_s"));
                }
                (p, f)
            }
            None => (0u64, 0.0f32),
        };
        let (sp, _g1) = self.rd("student", student, s_len)?;
        let (tp, _g2) = self.rd("teacher", teacher, t_len)?;
        let (cp, _g3) = self.rd("centre", centre, d)?;
        let (lp, _g4) = self.wr("loss", loss, 1)?;
        let mut stats = self.stream.alloc_zeros::<f32>(2 * t_rows)?;
        let mut row_loss = self.stream.alloc_zeros::<f32>(s_rows)?;
        {
            let (stp, _g5) = self.wr("stats", &mut stats, 2 * t_rows)?;
            let t_rows_i = t_rows as i32;
            launch!(
                self,
                K::DinoTeacherStats,
                row_launch_config(t_rows, d),
                tp,
                cp,
                stp,
                t_rows_i,
                d_i,
                inv_tt
            )?;
        }
        {
            let (stp, _g5) = self.rd("stats", &stats, 2 * t_rows)?;
            let (rl, _g6) = self.wr("row_loss", &mut row_loss, s_rows)?;
            launch!(
                self,
                K::DinoStudentRows,
                row_launch_config(s_rows, d),
                sp,
                tp,
                cp,
                stp,
                gp,
                rl,
                sv_i,
                tv_i,
                b_i,
                d_i,
                inv_ts,
                inv_tt,
                f
            )?;
        }
        let (rl, _g6) = self.rd("row_loss", &row_loss, s_rows)?;
        self.scalar_reduce(rl, s_rows, false, 0, pair_scale, 0.0, lp, 0)
    }

    /// The DINO loss (sere-core `dino_loss`), written to `loss[0]`:
    /// `student` is `[student_views][batch][dim]`, `teacher`
    /// `[teacher_views][batch][dim]`, `centre` `[dim]`; the mean over
    /// (teacher view, other student view, image) of the cross-entropy
    /// between `softmax((t - c) / tau_t)` and `softmax(s / tau_s)`.
    ///
    /// ```no_run
    /// use sere_core::loss::DinoShape;
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let shape = DinoShape { student_views: 2, teacher_views: 2, batch: 1, dim: 2 };
    /// let s = gpu.upload(&[0.0; 4]).unwrap();
    /// let t = gpu.upload(&[1.0, 0.0, 0.0, 1.0]).unwrap();
    /// let c = gpu.zeros(2).unwrap();
    /// let mut loss = gpu.zeros(1).unwrap();
    /// gpu.dino_loss(&s, &t, &c, shape, 0.1, 0.04, &mut loss).unwrap();
    /// assert!((gpu.download(&loss).unwrap()[0] - std::f32::consts::LN_2).abs() < 1e-6);
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn dino_loss(
        &self,
        student: &impl DevicePtr<f32>,
        teacher: &impl DevicePtr<f32>,
        centre: &impl DevicePtr<f32>,
        shape: DinoShape,
        tau_s: f32,
        tau_t: f32,
        loss: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        self.dino_impl(student, teacher, centre, shape, tau_s, tau_t, None, loss)
    }

    /// [`Gpu::dino_loss`] and its gradient (sere-core `dino_loss_backward`):
    /// adds `scale * dL/dstudent` to `grad_student` and writes the loss to
    /// `loss[0]`. Each student row's gradient is written once (summed over
    /// its teacher views in the kernel), so there are no atomics.
    ///
    /// ```no_run
    /// use sere_core::loss::DinoShape;
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let shape = DinoShape { student_views: 3, teacher_views: 2, batch: 2, dim: 4 };
    /// let s = gpu.upload(&[0.1; 24]).unwrap();
    /// let t = gpu.upload(&[0.2; 16]).unwrap();
    /// let c = gpu.zeros(4).unwrap();
    /// let (mut g, mut loss) = (gpu.zeros(24).unwrap(), gpu.zeros(1).unwrap());
    /// gpu.dino_loss_backward(&s, &t, &c, shape, 0.1, 0.04, 1.0, &mut g, &mut loss).unwrap();
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn dino_loss_backward(
        &self,
        student: &impl DevicePtr<f32>,
        teacher: &impl DevicePtr<f32>,
        centre: &impl DevicePtr<f32>,
        shape: DinoShape,
        tau_s: f32,
        tau_t: f32,
        scale: f32,
        grad_student: &mut impl DevicePtrMut<f32>,
        loss: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        check_len("grad_student", grad_student.len(), student.len())?;
        let n = student.len();
        let (gp, _g) = self.wr("grad_student", grad_student, n)?;
        self.dino_impl(
            student,
            teacher,
            centre,
            shape,
            tau_s,
            tau_t,
            Some((gp, scale)),
            loss,
        )
    }

    /// DINO's collapse monitor (sere-core `teacher_entropy`): the mean over
    /// the `rows` rows of `teacher` (`rows x dim`) of the entropy of
    /// `softmax((t - c) / tau_t)`, in nats, written to `out[0]`.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let t = gpu.upload(&[1.0; 4]).unwrap();
    /// let c = gpu.zeros(4).unwrap();
    /// let mut h = gpu.zeros(1).unwrap();
    /// gpu.teacher_entropy(&t, &c, 1, 4, 0.04, &mut h).unwrap();
    /// assert!((gpu.download(&h).unwrap()[0] - 4.0f32.ln()).abs() < 1e-6);
    /// ```
    pub fn teacher_entropy(
        &self,
        teacher: &impl DevicePtr<f32>,
        centre: &impl DevicePtr<f32>,
        rows: usize,
        dim: usize,
        tau_t: f32,
        out: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        positive("tau_t", tau_t)?;
        let (rows_i, dim_i, n) = rows_cols(rows, dim)?;
        let (tp, _g1) = self.rd("teacher", teacher, n)?;
        let (cp, _g2) = self.rd("centre", centre, dim)?;
        let (op, _g3) = self.wr("out", out, 1)?;
        let inv_tt = 1.0 / tau_t;
        let mut row_out = self.stream.alloc_zeros::<f32>(rows)?;
        {
            let (rp, _g4) = self.wr("row entropies", &mut row_out, rows)?;
            launch!(
                self,
                K::TeacherEntropyRows,
                row_launch_config(rows, dim),
                tp,
                cp,
                rp,
                rows_i,
                dim_i,
                inv_tt
            )?;
        }
        let (rp, _g4) = self.rd("row entropies", &row_out, rows)?;
        self.scalar_reduce(rp, rows, false, 0, 1.0 / rows as f64, 0.0, op, 0)
    }

    /// iBOT's masked-patch loss (sere-core `weighted_cross_entropy`):
    /// `sum_r weights[r] CE_r` over `rows x dim` student and teacher logits
    /// with DINO's centred row cross-entropy, written to `loss[0]`. Rows of
    /// weight 0 are skipped. The weights must be finite and non-negative
    /// (the host's `masked_patch_weights` are).
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let s = gpu.upload(&[0.0; 4]).unwrap();
    /// let t = gpu.upload(&[9.0, 0.0, 0.0, 9.0]).unwrap();
    /// let c = gpu.zeros(2).unwrap();
    /// let w = gpu.upload(&[0.5, 0.0]).unwrap();
    /// let mut loss = gpu.zeros(1).unwrap();
    /// gpu.weighted_cross_entropy(&s, &t, &c, &w, 2, 2, 0.1, 0.04, &mut loss).unwrap();
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn weighted_cross_entropy(
        &self,
        student: &impl DevicePtr<f32>,
        teacher: &impl DevicePtr<f32>,
        centre: &impl DevicePtr<f32>,
        weights: &impl DevicePtr<f32>,
        rows: usize,
        cols: usize,
        tau_s: f32,
        tau_t: f32,
        loss: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let args = (rows, cols, tau_s, tau_t);
        self.weighted_ce_impl(student, teacher, centre, weights, args, None, loss)
    }

    /// [`Gpu::weighted_cross_entropy`] and its gradient: adds
    /// `scale * dL/dstudent` to `grad_student` (rows of weight 0 get
    /// nothing) and writes the loss to `loss[0]`.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let s = gpu.upload(&[0.0; 4]).unwrap();
    /// let t = gpu.upload(&[9.0, 0.0, 0.0, 9.0]).unwrap();
    /// let (c, w) = (gpu.zeros(2).unwrap(), gpu.upload(&[0.5, 0.0]).unwrap());
    /// let (mut g, mut loss) = (gpu.zeros(4).unwrap(), gpu.zeros(1).unwrap());
    /// gpu.weighted_cross_entropy_backward(&s, &t, &c, &w, 2, 2, 0.1, 0.04, 1.0, &mut g, &mut loss)
    ///     .unwrap();
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn weighted_cross_entropy_backward(
        &self,
        student: &impl DevicePtr<f32>,
        teacher: &impl DevicePtr<f32>,
        centre: &impl DevicePtr<f32>,
        weights: &impl DevicePtr<f32>,
        rows: usize,
        cols: usize,
        tau_s: f32,
        tau_t: f32,
        scale: f32,
        grad_student: &mut impl DevicePtrMut<f32>,
        loss: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let n = product("rows x cols", &[rows, cols])?;
        let (gp, _g) = self.wr("grad_student", grad_student, n)?;
        let args = (rows, cols, tau_s, tau_t);
        self.weighted_ce_impl(
            student,
            teacher,
            centre,
            weights,
            args,
            Some((gp, scale)),
            loss,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn weighted_ce_impl(
        &self,
        student: &impl DevicePtr<f32>,
        teacher: &impl DevicePtr<f32>,
        centre: &impl DevicePtr<f32>,
        weights: &impl DevicePtr<f32>,
        (rows, cols, tau_s, tau_t): (usize, usize, f32, f32),
        grad: Option<(u64, f32)>,
        loss: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let (rows_i, cols_i, n) = rows_cols(rows, cols)?;
        positive("tau_s", tau_s)?;
        positive("tau_t", tau_t)?;
        let (inv_ts, inv_tt) = (1.0 / tau_s, 1.0 / tau_t);
        let (gp, f) = match grad {
            Some((p, scale)) => {
                // sere-core: per row f = (scale * w) / tau_s; the kernel
                // applies w.
                let f = scale * inv_ts;
                if !f.is_finite() {
                    return Err(non_finite("gradient scale / tau_s"));
                }
                (p, f)
            }
            None => (0u64, 0.0f32),
        };
        let (sp, _g1) = self.rd("student", student, n)?;
        let (tp, _g2) = self.rd("teacher", teacher, n)?;
        let (cp, _g3) = self.rd("centre", centre, cols)?;
        let (wp, _g4) = self.rd("weights", weights, rows)?;
        let (lp, _g5) = self.wr("loss", loss, 1)?;
        let mut row_loss = self.stream.alloc_zeros::<f32>(rows)?;
        {
            let (rl, _g6) = self.wr("row_loss", &mut row_loss, rows)?;
            launch!(
                self,
                K::WeightedCeRows,
                row_launch_config(rows, cols),
                sp,
                tp,
                cp,
                wp,
                gp,
                rl,
                rows_i,
                cols_i,
                inv_ts,
                inv_tt,
                f
            )?;
        }
        let (rl, _g6) = self.rd("row_loss", &row_loss, rows)?;
        self.scalar_reduce(rl, rows, false, 0, 1.0, 0.0, lp, 0)
    }

    /// EMA update of the DINO centre (sere-core `dino_centre_update`):
    /// `centre = momentum * centre + (1 - momentum) * mean_rows(teacher)`
    /// over the `rows x dim` teacher outputs.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let t = gpu.upload(&[0.0, 2.0, 2.0, 4.0]).unwrap();
    /// let mut c = gpu.upload(&[1.0, 1.0]).unwrap();
    /// gpu.dino_centre_update(&t, 2, 2, 0.9, &mut c).unwrap();
    /// ```
    pub fn dino_centre_update(
        &self,
        teacher: &impl DevicePtr<f32>,
        rows: usize,
        dim_: usize,
        momentum: f32,
        centre: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let (_, _, n) = rows_cols(rows, dim_)?;
        unit("momentum", momentum)?;
        let (tp, _g1) = self.rd("teacher", teacher, n)?;
        let (cp, _g2) = self.wr("centre", centre, dim_)?;
        let w = (1.0 - momentum) / rows as f32;
        self.col_reduce(
            rows,
            dim_,
            ColSum::Plain,
            ColFinish::Ema,
            ColIn {
                x: tp,
                y: 0,
                mean: 0,
                rstd: 0,
            },
            ColOut {
                o0: cp,
                o1: 0,
                o2: 0,
                p0: momentum,
                p1: w,
            },
        )
    }
}
