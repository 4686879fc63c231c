//! Deterministic reductions (kernels/reduce.cu): scalar sums into device
//! scalars (losses, norms, the clipping factor) and column sums (bias
//! gradients, batch statistics, norm parameter gradients, the DINO centre).

use crate::error::Result;
use crate::gpu::{dim, launch, Gpu, K};
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};

/// What `col_partial` sums per column (see kernels/reduce.cu).
#[derive(Debug, Clone, Copy)]
pub(crate) enum ColSum {
    /// `sum x`
    Plain = 0,
    /// `sum (x - mean[c])^2`
    SquaredDev = 1,
    /// `sum y`, `sum y (x - mean[c]) rstd[c]`
    BatchNormGrad = 2,
    /// `sum y`, `sum y (x - mean[r]) rstd[r]`
    LayerNormGrad = 3,
}

/// What `col_finish` does with the column sums (see kernels/reduce.cu).
#[derive(Debug, Clone, Copy)]
pub(crate) enum ColFinish {
    /// `o0 += A`
    AddTo = 0,
    /// `o0 = A * p0`
    Scale = 1,
    /// `o0 = A * p0`, `o1 = 1 / sqrt(o0 + p1)`
    Variance = 2,
    /// `o0 = p0 o0 + p1 A`
    Ema = 3,
    /// `o0 += B`, `o1 += A`, `o2 = [A | B]`
    NormGrads = 4,
}

/// Inputs of a column reduction; unused pointers are 0.
pub(crate) struct ColIn {
    pub x: u64,
    pub y: u64,
    pub mean: u64,
    pub rstd: u64,
}

/// Outputs of a column reduction; unused pointers are 0.
pub(crate) struct ColOut {
    pub o0: u64,
    pub o1: u64,
    pub o2: u64,
    pub p0: f32,
    pub p1: f32,
}

impl Gpu {
    /// Column sums over a `rows x cols` matrix, then the finishing step.
    /// The row range is split into a fixed number of chunks (about four
    /// blocks per SM in all), so results are deterministic on one device.
    pub(crate) fn col_reduce(
        &self,
        rows: usize,
        cols: usize,
        sum: ColSum,
        fin: ColFinish,
        inp: ColIn,
        out: ColOut,
    ) -> Result<()> {
        let (rows_i, cols_i) = (dim("rows", rows)?, dim("cols", cols)?);
        let col_blocks = cols.div_ceil(32);
        let chunks = (4 * self.sm_count())
            .div_ceil(col_blocks)
            .clamp(1, rows.div_ceil(8).max(1))
            .min(65_535);
        let rows_per_chunk = rows.div_ceil(chunks);
        let chunks = rows.div_ceil(rows_per_chunk);
        let two = matches!(sum, ColSum::BatchNormGrad | ColSum::LayerNormGrad);
        let mut pa = self.stream.alloc_zeros::<f32>(chunks * cols)?;
        let mut pb = self
            .stream
            .alloc_zeros::<f32>(if two { chunks * cols } else { 1 })?;
        {
            let (pa_p, _g1) = self.wr("partials", &mut pa, chunks * cols)?;
            let pb_len = pb.len();
            let (pb_p, _g2) = self.wr("partials", &mut pb, pb_len)?;
            let (x, y, mean, rstd) = (inp.x, inp.y, inp.mean, inp.rstd);
            let rpc = rows_per_chunk as i32;
            let mode = sum as i32;
            let cfg = LaunchConfig {
                grid_dim: (col_blocks as u32, chunks as u32, 1),
                block_dim: (32, 8, 1),
                shared_mem_bytes: 0,
            };
            launch!(
                self,
                K::ColPartial,
                cfg,
                x,
                y,
                mean,
                rstd,
                rows_i,
                cols_i,
                rpc,
                mode,
                pa_p,
                pb_p
            )?;
        }
        let (pa_p, _g1) = self.rd("partials", &pa, pa.len())?;
        let (pb_p, _g2) = self.rd("partials", &pb, pb.len())?;
        let chunks_i = chunks as i32;
        let mode = fin as i32;
        let (p0, p1, o0, o1, o2) = (out.p0, out.p1, out.o0, out.o1, out.o2);
        let cfg = LaunchConfig {
            grid_dim: (cols.div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            K::ColFinish,
            cfg,
            pa_p,
            pb_p,
            chunks_i,
            cols_i,
            mode,
            p0,
            p1,
            o0,
            o1,
            o2
        )
    }

    /// Sum of `n` floats at `x` (of their squares if `square`), in f64,
    /// finished by `sum_finish` in `mode` (0: `out0 = sum * mul`;
    /// 1: norm and clipping factor).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn scalar_reduce(
        &self,
        x: u64,
        n: usize,
        square: bool,
        mode: i32,
        mul: f64,
        max_norm: f32,
        out0: u64,
        out1: u64,
    ) -> Result<()> {
        let parts = n.div_ceil(256).clamp(1, 1024);
        let mut partial = self.stream.alloc_zeros::<f64>(parts)?;
        {
            let (pp, _g) = self.wr("partials", &mut partial, parts)?;
            let n_i = n as i64;
            let sq = square as i32;
            let cfg = LaunchConfig {
                grid_dim: (parts as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            launch!(self, K::SumPartial, cfg, x, n_i, sq, pp)?;
        }
        let (pp, _g) = self.rd("partials", &partial, parts)?;
        let parts_i = parts as i32;
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            K::SumFinish,
            cfg,
            pp,
            parts_i,
            mode,
            mul,
            max_norm,
            out0,
            out1
        )
    }

    /// Euclidean norm of a buffer, accumulated in f64 (sere-core
    /// `l2_norm`), written to `norm[0]` on the device.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let x = gpu.upload(&[3.0, 4.0]).unwrap();
    /// let mut n = gpu.zeros(1).unwrap();
    /// gpu.l2_norm(&x, &mut n).unwrap();
    /// assert_eq!(gpu.download(&n).unwrap(), vec![5.0]);
    /// ```
    pub fn l2_norm(
        &self,
        x: &impl DevicePtr<f32>,
        norm: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let n = x.len();
        let (xp, _g1) = self.rd("x", x, n)?;
        let (np, _g2) = self.wr("norm", norm, 1)?;
        self.scalar_reduce(xp, n, true, 1, 1.0, 1.0, np, 0)
    }

    /// The gradient-clipping factor of sere-core `clip_grad_norm`, on the
    /// device: writes the norm to `norm[0]` and to `factor[0]`
    /// `max_norm / (norm + 1e-6)` if that is below 1 and the norm finite,
    /// else 1. Pass `factor` to [`Gpu::adamw_step_scaled`] or
    /// [`Gpu::scale_by`] to clip without a host round trip.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let g = gpu.upload(&[3.0, 4.0]).unwrap();
    /// let (mut n, mut f) = (gpu.zeros(1).unwrap(), gpu.zeros(1).unwrap());
    /// gpu.grad_clip_factor(&g, 1.0, &mut n, &mut f).unwrap();
    /// assert!((gpu.download(&f).unwrap()[0] - 0.2).abs() < 1e-6);
    /// ```
    pub fn grad_clip_factor(
        &self,
        grads: &impl DevicePtr<f32>,
        max_norm: f32,
        norm: &mut impl DevicePtrMut<f32>,
        factor: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        crate::gpu::positive("max_norm", max_norm)?;
        let n = grads.len();
        let (gp, _g1) = self.rd("grads", grads, n)?;
        let (np, _g2) = self.wr("norm", norm, 1)?;
        let (fp, _g3) = self.wr("factor", factor, 1)?;
        self.scalar_reduce(gp, n, true, 1, 1.0, max_norm, np, fp)
    }

    /// sere-core `clip_grad_norm` on the device: writes the norm before
    /// clipping to `norm[0]` and scales `grads` by `max_norm / (norm + 1e-6)`
    /// when that is below 1 (a non-finite norm leaves `grads` as they are;
    /// check `norm`).
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let mut g = gpu.upload(&[3.0, 4.0]).unwrap();
    /// let mut n = gpu.zeros(1).unwrap();
    /// gpu.clip_grad_norm(&mut g, 1.0, &mut n).unwrap();
    /// assert_eq!(gpu.download(&n).unwrap(), vec![5.0]);
    /// ```
    pub fn clip_grad_norm(
        &self,
        grads: &mut impl DevicePtrMut<f32>,
        max_norm: f32,
        norm: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let mut factor = self.stream.alloc_zeros::<f32>(1)?;
        {
            let n = grads.len();
            let (gp, _g1) = self.wr("grads", grads, n)?;
            crate::gpu::positive("max_norm", max_norm)?;
            let (np, _g2) = self.wr("norm", norm, 1)?;
            let (fp, _g3) = self.wr("factor", &mut factor, 1)?;
            self.scalar_reduce(gp, n, true, 1, 1.0, max_norm, np, fp)?;
        }
        self.scale_by(grads, &factor)
    }

    /// Adds the column sums of `dy` (`rows x cols`) to `dbias` (the bias
    /// gradient of a linear layer; sere-core `linear_backward`'s `dbias`).
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let dy = gpu.upload(&[1.0, 2.0, 3.0, 4.0]).unwrap();
    /// let mut db = gpu.zeros(2).unwrap();
    /// gpu.bias_grad(&dy, 2, 2, &mut db).unwrap();
    /// assert_eq!(gpu.download(&db).unwrap(), vec![4.0, 6.0]);
    /// ```
    pub fn bias_grad(
        &self,
        dy: &impl DevicePtr<f32>,
        rows: usize,
        cols: usize,
        dbias: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let n = crate::gpu::product("rows x cols", &[rows, cols])?;
        let (yp, _g1) = self.rd("dy", dy, n)?;
        let (bp, _g2) = self.wr("dbias", dbias, cols)?;
        self.col_reduce(
            rows,
            cols,
            ColSum::Plain,
            ColFinish::AddTo,
            ColIn {
                x: yp,
                y: 0,
                mean: 0,
                rstd: 0,
            },
            ColOut {
                o0: bp,
                o1: 0,
                o2: 0,
                p0: 0.0,
                p1: 0.0,
            },
        )
    }
}
