//! GEMMs through cuBLAS (strided-batched SGEMM on row-major views): the
//! linear layers and the spatial and channel self-relations of sere-core
//! `linalg` and `relation`.

use crate::error::{CudaError, Result};
use crate::gpu::{check_len, dim, product, Gpu};
use cudarc::cublas::sys::cublasOperation_t as Op;
use cudarc::driver::{DevicePtr, DevicePtrMut};

/// A row-major matrix inside a device buffer: element `(i, j)` of batch
/// instance `b` is at `offset + b * batch_stride + i * ld + j`; `transposed`
/// makes [`Gpu::gemm`] use it as its transpose. `rows` and `cols` are the
/// *stored* shape.
///
/// ```
/// use sere_cuda::MatView;
/// let m = MatView::row_major(2, 3).t();
/// assert_eq!((m.op_rows(), m.op_cols()), (3, 2));
/// assert_eq!(MatView::row_major(2, 3).at(4).required_len(1), Some(10));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatView {
    /// Index of element `(0, 0)` of the first batch instance.
    pub offset: usize,
    /// Stored rows.
    pub rows: usize,
    /// Stored columns.
    pub cols: usize,
    /// Distance between consecutive rows (at least `cols`).
    pub ld: usize,
    /// Distance between consecutive batch instances.
    pub batch_stride: usize,
    /// Use the matrix as its transpose.
    pub transposed: bool,
}

impl MatView {
    /// A dense `rows x cols` matrix at offset 0; batch instances follow each
    /// other (`batch_stride = rows * cols`).
    ///
    /// ```
    /// let m = sere_cuda::MatView::row_major(4, 5);
    /// assert_eq!((m.ld, m.batch_stride), (5, 20));
    /// ```
    pub fn row_major(rows: usize, cols: usize) -> Self {
        MatView {
            offset: 0,
            rows,
            cols,
            ld: cols,
            batch_stride: rows.saturating_mul(cols),
            transposed: false,
        }
    }

    /// The same storage used as its transpose.
    ///
    /// ```
    /// assert!(sere_cuda::MatView::row_major(2, 2).t().transposed);
    /// ```
    pub fn t(self) -> Self {
        MatView {
            transposed: !self.transposed,
            ..self
        }
    }

    /// The same layout starting `offset` elements further on.
    ///
    /// ```
    /// assert_eq!(sere_cuda::MatView::row_major(2, 2).at(8).offset, 8);
    /// ```
    pub fn at(self, offset: usize) -> Self {
        MatView {
            offset: self.offset + offset,
            ..self
        }
    }

    /// The same layout with another distance between batch instances.
    ///
    /// ```
    /// assert_eq!(sere_cuda::MatView::row_major(2, 2).batched(7).batch_stride, 7);
    /// ```
    pub fn batched(self, batch_stride: usize) -> Self {
        MatView {
            batch_stride,
            ..self
        }
    }

    /// Rows of the matrix as used (after the optional transpose).
    ///
    /// ```
    /// assert_eq!(sere_cuda::MatView::row_major(2, 3).op_rows(), 2);
    /// ```
    pub fn op_rows(&self) -> usize {
        if self.transposed {
            self.cols
        } else {
            self.rows
        }
    }

    /// Columns of the matrix as used.
    ///
    /// ```
    /// assert_eq!(sere_cuda::MatView::row_major(2, 3).t().op_cols(), 2);
    /// ```
    pub fn op_cols(&self) -> usize {
        if self.transposed {
            self.rows
        } else {
            self.cols
        }
    }

    /// Smallest buffer length holding `batch` instances (`None` on overflow).
    ///
    /// ```
    /// assert_eq!(sere_cuda::MatView::row_major(2, 3).required_len(2), Some(12));
    /// ```
    pub fn required_len(&self, batch: usize) -> Option<usize> {
        if self.rows == 0 || self.cols == 0 || batch == 0 {
            return Some(self.offset);
        }
        let last_b = (batch - 1).checked_mul(self.batch_stride)?;
        let last_r = (self.rows - 1).checked_mul(self.ld)?;
        self.offset
            .checked_add(last_b)?
            .checked_add(last_r)?
            .checked_add(self.cols)
    }

    fn check(&self, what: &'static str, len: usize, batch: usize) -> Result<()> {
        dim(what, self.rows)?;
        dim(what, self.cols)?;
        if self.ld < self.cols {
            return Err(sere_core::Error::InvalidArgument {
                what,
                requirement: "leading dimension must be at least the stored column count",
            }
            .into());
        }
        i32::try_from(self.ld).map_err(|_| CudaError::TooLarge { what })?;
        let need = self
            .required_len(batch)
            .ok_or(CudaError::TooLarge { what })?;
        if len < need {
            return Err(sere_core::Error::ShapeMismatch {
                what,
                expected: need,
                got: len,
            }
            .into());
        }
        Ok(())
    }

    fn op(&self) -> Op {
        if self.transposed {
            Op::CUBLAS_OP_T
        } else {
            Op::CUBLAS_OP_N
        }
    }
}

impl Gpu {
    /// Strided-batched SGEMM on row-major views, for `batch` instances:
    /// `C = alpha op(A) op(B) + beta C` with `op(A)` `m x k`, `op(B)`
    /// `k x n`, `C` `m x n` (not transposed). With `beta == 0` the previous
    /// contents of `C` are ignored. Batch instances of `C` must not overlap
    /// (they may interleave, e.g. heads of one token row).
    ///
    /// Full FP32 unless [`Gpu::set_tf32`] turned TF32 on.
    ///
    /// ```no_run
    /// use sere_cuda::{Gpu, MatView};
    /// let gpu = Gpu::new(0).unwrap();
    /// let a = gpu.upload(&[1.0, 2.0, 3.0, 4.0]).unwrap();
    /// let mut c = gpu.zeros(4).unwrap();
    /// let m = MatView::row_major(2, 2);
    /// gpu.gemm(1, 1.0, &a, m, &a, m.t(), 0.0, &mut c, m).unwrap(); // A A^T
    /// assert_eq!(gpu.download(&c).unwrap(), vec![5.0, 11.0, 11.0, 25.0]);
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        batch: usize,
        alpha: f32,
        a: &impl DevicePtr<f32>,
        am: MatView,
        b: &impl DevicePtr<f32>,
        bm: MatView,
        beta: f32,
        c: &mut impl DevicePtrMut<f32>,
        cm: MatView,
    ) -> Result<()> {
        let batch_i = dim("batch", batch)?;
        if cm.transposed {
            return Err(sere_core::Error::InvalidArgument {
                what: "C",
                requirement: "the output view cannot be transposed",
            }
            .into());
        }
        if am.op_cols() != bm.op_rows() || am.op_rows() != cm.rows || bm.op_cols() != cm.cols {
            return Err(sere_core::Error::InvalidArgument {
                what: "gemm shapes",
                requirement: "op(A) is m x k, op(B) is k x n and C is m x n",
            }
            .into());
        }
        am.check("A", a.len(), batch)?;
        bm.check("B", b.len(), batch)?;
        cm.check("C", c.len(), batch)?;
        let (m, n, k) = (
            dim("m", cm.rows)?,
            dim("n", cm.cols)?,
            dim("k", am.op_cols())?,
        );
        let (ap, _ga) = self.rd("A", a, a.len())?;
        let (bp, _gb) = self.rd("B", b, b.len())?;
        let (cp, _gc) = self.wr("C", c, c.len())?;
        let at = |p: u64, off: usize| p + (off * std::mem::size_of::<f32>()) as u64;
        self.ctx.bind_to_thread()?;
        let blas = self.blas.lock().unwrap_or_else(|e| e.into_inner());
        // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T:
        // the column-major GEMM with the operands swapped and the same
        // transpose flags reads each row-major matrix as its transpose.
        // SAFETY: every view was checked to lie inside its buffer for
        // `batch` instances, the leading dimensions are at least the stored
        // column counts, and the guards keep the buffers' events alive
        // until after the call is enqueued.
        unsafe {
            cudarc::cublas::result::sgemm_strided_batched(
                *blas.handle(),
                bm.op(),
                am.op(),
                n,
                m,
                k,
                &alpha,
                at(bp, bm.offset) as *const f32,
                bm.ld as i32,
                bm.batch_stride as i64,
                at(ap, am.offset) as *const f32,
                am.ld as i32,
                am.batch_stride as i64,
                &beta,
                at(cp, cm.offset) as *mut f32,
                cm.ld as i32,
                cm.batch_stride as i64,
                batch_i,
            )
        }?;
        Ok(())
    }

    /// Linear layer without bias, PyTorch layout (sere-core
    /// `linear_forward`): `y = x W^T` with `x` `rows x inp`, `weight`
    /// `out x inp`, `y` `rows x out` (overwritten). Add a bias with
    /// [`Gpu::bias_add`].
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let x = gpu.upload(&[3.0, 4.0]).unwrap();
    /// let w = gpu.upload(&[1.0, 1.0, 0.0, 2.0]).unwrap();
    /// let mut y = gpu.zeros(2).unwrap();
    /// gpu.linear_forward(&x, &w, 1, 2, 2, &mut y).unwrap();
    /// assert_eq!(gpu.download(&y).unwrap(), vec![7.0, 8.0]);
    /// ```
    pub fn linear_forward(
        &self,
        x: &impl DevicePtr<f32>,
        weight: &impl DevicePtr<f32>,
        rows: usize,
        inp: usize,
        out: usize,
        y: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        check_len("x", x.len(), product("rows x inp", &[rows, inp])?)?;
        check_len("weight", weight.len(), product("out x inp", &[out, inp])?)?;
        check_len("y", y.len(), product("rows x out", &[rows, out])?)?;
        self.gemm(
            1,
            1.0,
            x,
            MatView::row_major(rows, inp),
            weight,
            MatView::row_major(out, inp).t(),
            0.0,
            y,
            MatView::row_major(rows, out),
        )
    }

    /// Linear backward to the input: adds `dy W` to `dx` (`rows x inp`).
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let w = gpu.upload(&[1.0, 1.0, 0.0, 2.0]).unwrap();
    /// let dy = gpu.upload(&[1.0, 0.0]).unwrap();
    /// let mut dx = gpu.zeros(2).unwrap();
    /// gpu.linear_backward_input(&dy, &w, 1, 2, 2, &mut dx).unwrap();
    /// assert_eq!(gpu.download(&dx).unwrap(), vec![1.0, 1.0]);
    /// ```
    pub fn linear_backward_input(
        &self,
        dy: &impl DevicePtr<f32>,
        weight: &impl DevicePtr<f32>,
        rows: usize,
        inp: usize,
        out: usize,
        dx: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        check_len("dy", dy.len(), product("rows x out", &[rows, out])?)?;
        check_len("weight", weight.len(), product("out x inp", &[out, inp])?)?;
        check_len("dx", dx.len(), product("rows x inp", &[rows, inp])?)?;
        self.gemm(
            1,
            1.0,
            dy,
            MatView::row_major(rows, out),
            weight,
            MatView::row_major(out, inp),
            1.0,
            dx,
            MatView::row_major(rows, inp),
        )
    }

    /// Linear backward to the weight: adds `dy^T x` to `dweight`
    /// (`out x inp`). The bias gradient is [`Gpu::bias_grad`].
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let x = gpu.upload(&[3.0, 4.0]).unwrap();
    /// let dy = gpu.upload(&[1.0, 0.0]).unwrap();
    /// let mut dw = gpu.zeros(4).unwrap();
    /// gpu.linear_backward_weight(&x, &dy, 1, 2, 2, &mut dw).unwrap();
    /// assert_eq!(gpu.download(&dw).unwrap(), vec![3.0, 4.0, 0.0, 0.0]);
    /// ```
    pub fn linear_backward_weight(
        &self,
        x: &impl DevicePtr<f32>,
        dy: &impl DevicePtr<f32>,
        rows: usize,
        inp: usize,
        out: usize,
        dweight: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        check_len("x", x.len(), product("rows x inp", &[rows, inp])?)?;
        check_len("dy", dy.len(), product("rows x out", &[rows, out])?)?;
        check_len("dweight", dweight.len(), product("out x inp", &[out, inp])?)?;
        self.gemm(
            1,
            1.0,
            dy,
            MatView::row_major(rows, out).t(),
            x,
            MatView::row_major(rows, inp),
            1.0,
            dweight,
            MatView::row_major(out, inp),
        )
    }

    /// Spatial self-relation logits for `batch` images (sere-core
    /// `spatial_relation_forward` per image): `x` is `batch x n x c`,
    /// `logits` `batch x heads x n x n` with
    /// `logits[b, h] = X_bh X_bh^T / sqrt(c / heads)`. One strided-batched
    /// GEMM per head, batched over the images.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let x = gpu.upload(&[1.0, 0.0, 0.0, 1.0]).unwrap(); // 2 tokens x 2 channels
    /// let mut l = gpu.zeros(4).unwrap();
    /// gpu.spatial_relation_forward(&x, 1, 2, 2, 1, &mut l).unwrap();
    /// let r = 1.0 / 2f32.sqrt();
    /// assert_eq!(gpu.download(&l).unwrap(), vec![r, 0.0, 0.0, r]);
    /// ```
    pub fn spatial_relation_forward(
        &self,
        x: &impl DevicePtr<f32>,
        batch: usize,
        n: usize,
        c: usize,
        heads: usize,
        logits: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let d = check_heads(n, c, heads)?;
        check_len("x", x.len(), product("batch x n x c", &[batch, n, c])?)?;
        check_len(
            "logits",
            logits.len(),
            product("batch x heads x n x n", &[batch, heads, n, n])?,
        )?;
        let alpha = 1.0 / (d as f32).sqrt();
        let xv = MatView {
            offset: 0,
            rows: n,
            cols: d,
            ld: c,
            batch_stride: n * c,
            transposed: false,
        };
        let lv = MatView::row_major(n, n).batched(heads * n * n);
        for h in 0..heads {
            let xh = xv.at(h * d);
            self.gemm(
                batch,
                alpha,
                x,
                xh,
                x,
                xh.t(),
                0.0,
                logits,
                lv.at(h * n * n),
            )?;
        }
        Ok(())
    }

    /// Backward of [`Gpu::spatial_relation_forward`]: adds
    /// `(G_bh + G_bh^T) X_bh / sqrt(d)` to each head's columns of `grad_x`.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let x = gpu.upload(&[1.0, 2.0]).unwrap(); // 1 token, 2 channels, 2 heads
    /// let g = gpu.upload(&[1.0, 1.0]).unwrap();
    /// let mut gx = gpu.zeros(2).unwrap();
    /// gpu.spatial_relation_backward(&x, &g, 1, 1, 2, 2, &mut gx).unwrap();
    /// assert_eq!(gpu.download(&gx).unwrap(), vec![2.0, 4.0]);
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn spatial_relation_backward(
        &self,
        x: &impl DevicePtr<f32>,
        grad_logits: &impl DevicePtr<f32>,
        batch: usize,
        n: usize,
        c: usize,
        heads: usize,
        grad_x: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let d = check_heads(n, c, heads)?;
        let nc = product("batch x n x c", &[batch, n, c])?;
        check_len("x", x.len(), nc)?;
        check_len("grad_x", grad_x.len(), nc)?;
        check_len(
            "grad_logits",
            grad_logits.len(),
            product("batch x heads x n x n", &[batch, heads, n, n])?,
        )?;
        let alpha = 1.0 / (d as f32).sqrt();
        let xv = MatView {
            offset: 0,
            rows: n,
            cols: d,
            ld: c,
            batch_stride: n * c,
            transposed: false,
        };
        let gv = MatView::row_major(n, n).batched(heads * n * n);
        for h in 0..heads {
            let xh = xv.at(h * d);
            let g = gv.at(h * n * n);
            self.gemm(batch, alpha, grad_logits, g, x, xh, 1.0, grad_x, xh)?;
            self.gemm(batch, alpha, grad_logits, g.t(), x, xh, 1.0, grad_x, xh)?;
        }
        Ok(())
    }

    /// Channel self-relation logits for `batch` images (sere-core
    /// `channel_relation_forward` per image): `logits[b] = X_b^T X_b / n`
    /// (`batch x c x c`), one strided-batched GEMM.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let x = gpu.upload(&[1.0, 2.0, 3.0, 4.0]).unwrap();
    /// let mut l = gpu.zeros(4).unwrap();
    /// gpu.channel_relation_forward(&x, 1, 2, 2, &mut l).unwrap();
    /// assert_eq!(gpu.download(&l).unwrap(), vec![5.0, 7.0, 7.0, 10.0]);
    /// ```
    pub fn channel_relation_forward(
        &self,
        x: &impl DevicePtr<f32>,
        batch: usize,
        n: usize,
        c: usize,
        logits: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        dim("n", n)?;
        dim("c", c)?;
        check_len("x", x.len(), product("batch x n x c", &[batch, n, c])?)?;
        check_len(
            "logits",
            logits.len(),
            product("batch x c x c", &[batch, c, c])?,
        )?;
        let xm = MatView::row_major(n, c);
        self.gemm(
            batch,
            1.0 / n as f32,
            x,
            xm.t(),
            x,
            xm,
            0.0,
            logits,
            MatView::row_major(c, c),
        )
    }

    /// Backward of [`Gpu::channel_relation_forward`]: adds
    /// `X_b (G_b + G_b^T) / n` to `grad_x`.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let x = gpu.upload(&[1.0, 2.0]).unwrap();
    /// let g = gpu.upload(&[1.0, 0.0, 0.0, 0.0]).unwrap();
    /// let mut gx = gpu.zeros(2).unwrap();
    /// gpu.channel_relation_backward(&x, &g, 1, 1, 2, &mut gx).unwrap();
    /// assert_eq!(gpu.download(&gx).unwrap(), vec![2.0, 0.0]);
    /// ```
    pub fn channel_relation_backward(
        &self,
        x: &impl DevicePtr<f32>,
        grad_logits: &impl DevicePtr<f32>,
        batch: usize,
        n: usize,
        c: usize,
        grad_x: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        dim("n", n)?;
        dim("c", c)?;
        let nc = product("batch x n x c", &[batch, n, c])?;
        check_len("x", x.len(), nc)?;
        check_len("grad_x", grad_x.len(), nc)?;
        check_len(
            "grad_logits",
            grad_logits.len(),
            product("batch x c x c", &[batch, c, c])?,
        )?;
        let alpha = 1.0 / n as f32;
        let xm = MatView::row_major(n, c);
        let g = MatView::row_major(c, c);
        self.gemm(batch, alpha, x, xm, grad_logits, g, 1.0, grad_x, xm)?;
        self.gemm(batch, alpha, x, xm, grad_logits, g.t(), 1.0, grad_x, xm)
    }
}

fn check_heads(n: usize, c: usize, heads: usize) -> Result<usize> {
    dim("n", n)?;
    dim("c", c)?;
    dim("heads", heads)?;
    if c % heads != 0 {
        return Err(sere_core::Error::InvalidArgument {
            what: "heads",
            requirement: "must divide the channel count c",
        }
        .into());
    }
    Ok(c / heads)
}
