//! Layer norm and batch norm (sere-core `norm`): biased variance,
//! `rstd = 1 / sqrt(var + eps)`.

use crate::error::Result;
use crate::gpu::{check_len, dim, launch, product, row_launch_config, unit, Gpu, K};
use crate::ops::reduce::{ColFinish, ColIn, ColOut, ColSum};
use cudarc::driver::{DevicePtr, DevicePtrMut};

fn check_eps(eps: f32) -> Result<()> {
    if eps.is_finite() && eps >= 0.0 {
        Ok(())
    } else {
        Err(sere_core::Error::InvalidArgument {
            what: "eps",
            requirement: "must be finite and >= 0",
        }
        .into())
    }
}

fn matrix(rows: usize, cols: usize) -> Result<(i32, i32, usize)> {
    let (r, c) = (dim("rows", rows)?, dim("cols", cols)?);
    Ok((r, c, product("rows x cols", &[rows, cols])?))
}

impl Gpu {
    /// Layer norm over each row of `x` (`rows x cols`), fused into one
    /// kernel (statistics and normalisation): `out = (x - mean) * rstd *
    /// gamma + beta`, saving `mean` and `rstd` (length `rows`) for the
    /// backward (sere-core `layer_norm_forward`).
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let x = gpu.upload(&[1.0, 3.0]).unwrap();
    /// let (g, b) = (gpu.upload(&[1.0, 1.0]).unwrap(), gpu.zeros(2).unwrap());
    /// let (mut y, mut m, mut r) = (gpu.zeros(2).unwrap(), gpu.zeros(1).unwrap(), gpu.zeros(1).unwrap());
    /// gpu.layer_norm_forward(&x, &g, &b, 1, 2, 0.0, &mut y, &mut m, &mut r).unwrap();
    /// assert_eq!(gpu.download(&y).unwrap(), vec![-1.0, 1.0]);
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm_forward(
        &self,
        x: &impl DevicePtr<f32>,
        gamma: &impl DevicePtr<f32>,
        beta: &impl DevicePtr<f32>,
        rows: usize,
        cols: usize,
        eps: f32,
        out: &mut impl DevicePtrMut<f32>,
        mean: &mut impl DevicePtrMut<f32>,
        rstd: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let (rows_i, cols_i, n) = matrix(rows, cols)?;
        check_eps(eps)?;
        let (xp, _g1) = self.rd("x", x, n)?;
        let (gp, _g2) = self.rd("gamma", gamma, cols)?;
        let (bp, _g3) = self.rd("beta", beta, cols)?;
        let (yp, _g4) = self.wr("out", out, n)?;
        let (mp, _g5) = self.wr("mean", mean, rows)?;
        let (rp, _g6) = self.wr("rstd", rstd, rows)?;
        launch!(
            self,
            K::LayerNormFwd,
            row_launch_config(rows, cols),
            xp,
            gp,
            bp,
            yp,
            mp,
            rp,
            rows_i,
            cols_i,
            eps
        )
    }

    /// Backward of [`Gpu::layer_norm_forward`] (sere-core
    /// `layer_norm_backward`): adds to `dx` (one row kernel) and to `dgamma`,
    /// `dbeta` (a deterministic column reduction).
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let (x, g) = (gpu.upload(&[1.0, 3.0]).unwrap(), gpu.upload(&[1.0, 1.0]).unwrap());
    /// let (m, r, dy) = (gpu.upload(&[2.0]).unwrap(), gpu.upload(&[1.0]).unwrap(), gpu.upload(&[1.0, 1.0]).unwrap());
    /// let (mut dx, mut dg, mut db) = (gpu.zeros(2).unwrap(), gpu.zeros(2).unwrap(), gpu.zeros(2).unwrap());
    /// gpu.layer_norm_backward(&x, &g, &m, &r, &dy, 1, 2, &mut dx, &mut dg, &mut db).unwrap();
    /// assert_eq!(gpu.download(&dx).unwrap(), vec![0.0, 0.0]);
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm_backward(
        &self,
        x: &impl DevicePtr<f32>,
        gamma: &impl DevicePtr<f32>,
        mean: &impl DevicePtr<f32>,
        rstd: &impl DevicePtr<f32>,
        dy: &impl DevicePtr<f32>,
        rows: usize,
        cols: usize,
        dx: &mut impl DevicePtrMut<f32>,
        dgamma: &mut impl DevicePtrMut<f32>,
        dbeta: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let (rows_i, cols_i, n) = matrix(rows, cols)?;
        let (xp, _g1) = self.rd("x", x, n)?;
        let (gp, _g2) = self.rd("gamma", gamma, cols)?;
        let (mp, _g3) = self.rd("mean", mean, rows)?;
        let (rp, _g4) = self.rd("rstd", rstd, rows)?;
        let (dyp, _g5) = self.rd("dy", dy, n)?;
        let (dxp, _g6) = self.wr("dx", dx, n)?;
        let (dgp, _g7) = self.wr("dgamma", dgamma, cols)?;
        let (dbp, _g8) = self.wr("dbeta", dbeta, cols)?;
        launch!(
            self,
            K::LayerNormBwdDx,
            row_launch_config(rows, cols),
            xp,
            gp,
            mp,
            rp,
            dyp,
            dxp,
            rows_i,
            cols_i
        )?;
        self.col_reduce(
            rows,
            cols,
            ColSum::LayerNormGrad,
            ColFinish::NormGrads,
            ColIn {
                x: xp,
                y: dyp,
                mean: mp,
                rstd: rp,
            },
            ColOut {
                o0: dgp,
                o1: dbp,
                o2: 0,
                p0: 0.0,
                p1: 0.0,
            },
        )
    }

    /// Batch statistics per column of `x` (`rows x cols`): `mean` and the
    /// biased `var`, two passes (sere-core `batch_norm_stats`).
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let x = gpu.upload(&[1.0, 10.0, 3.0, 10.0]).unwrap();
    /// let (mut m, mut v) = (gpu.zeros(2).unwrap(), gpu.zeros(2).unwrap());
    /// gpu.batch_norm_stats(&x, 2, 2, &mut m, &mut v).unwrap();
    /// assert_eq!(gpu.download(&m).unwrap(), vec![2.0, 10.0]);
    /// ```
    pub fn batch_norm_stats(
        &self,
        x: &impl DevicePtr<f32>,
        rows: usize,
        cols: usize,
        mean: &mut impl DevicePtrMut<f32>,
        var: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let (_, _, n) = matrix(rows, cols)?;
        let (xp, _g1) = self.rd("x", x, n)?;
        let (mp, _g2) = self.wr("mean", mean, cols)?;
        let (vp, _g3) = self.wr("var", var, cols)?;
        self.bn_stats_raw(xp, rows, cols, mp, vp, 0, 0.0)
    }

    #[allow(clippy::too_many_arguments)]
    fn bn_stats_raw(
        &self,
        xp: u64,
        rows: usize,
        cols: usize,
        mp: u64,
        vp: u64,
        rp: u64,
        eps: f32,
    ) -> Result<()> {
        let inv = 1.0 / rows as f32;
        let x_in = ColIn {
            x: xp,
            y: 0,
            mean: 0,
            rstd: 0,
        };
        self.col_reduce(
            rows,
            cols,
            ColSum::Plain,
            ColFinish::Scale,
            x_in,
            ColOut {
                o0: mp,
                o1: 0,
                o2: 0,
                p0: inv,
                p1: 0.0,
            },
        )?;
        self.col_reduce(
            rows,
            cols,
            ColSum::SquaredDev,
            ColFinish::Variance,
            ColIn {
                x: xp,
                y: 0,
                mean: mp,
                rstd: 0,
            },
            ColOut {
                o0: vp,
                o1: rp,
                o2: 0,
                p0: inv,
                p1: eps,
            },
        )
    }

    /// Train-mode batch norm (sere-core `batch_norm_forward`): batch `mean`,
    /// biased `var` and `rstd` per column (saved for the backward and the
    /// running statistics), then `out = (x - mean) * rstd * gamma + beta`.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let x = gpu.upload(&[1.0, 3.0]).unwrap();
    /// let (g, b) = (gpu.upload(&[1.0]).unwrap(), gpu.zeros(1).unwrap());
    /// let mut y = gpu.zeros(2).unwrap();
    /// let (mut m, mut v, mut r) = (gpu.zeros(1).unwrap(), gpu.zeros(1).unwrap(), gpu.zeros(1).unwrap());
    /// gpu.batch_norm_forward(&x, &g, &b, 2, 1, 0.0, &mut y, &mut m, &mut v, &mut r).unwrap();
    /// assert_eq!(gpu.download(&y).unwrap(), vec![-1.0, 1.0]);
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm_forward(
        &self,
        x: &impl DevicePtr<f32>,
        gamma: &impl DevicePtr<f32>,
        beta: &impl DevicePtr<f32>,
        rows: usize,
        cols: usize,
        eps: f32,
        out: &mut impl DevicePtrMut<f32>,
        mean: &mut impl DevicePtrMut<f32>,
        var: &mut impl DevicePtrMut<f32>,
        rstd: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let (_, cols_i, n) = matrix(rows, cols)?;
        check_eps(eps)?;
        let (xp, _g1) = self.rd("x", x, n)?;
        let (gp, _g2) = self.rd("gamma", gamma, cols)?;
        let (bp, _g3) = self.rd("beta", beta, cols)?;
        let (yp, _g4) = self.wr("out", out, n)?;
        let (mp, _g5) = self.wr("mean", mean, cols)?;
        let (vp, _g6) = self.wr("var", var, cols)?;
        let (rp, _g7) = self.wr("rstd", rstd, cols)?;
        self.bn_stats_raw(xp, rows, cols, mp, vp, rp, eps)?;
        let (n_i, running) = (n as i64, 0i32);
        launch!(
            self,
            K::BatchNormApply,
            self.elems_cfg(n),
            xp,
            mp,
            rp,
            gp,
            bp,
            yp,
            n_i,
            cols_i,
            running,
            eps
        )
    }

    /// Eval-mode batch norm with running statistics (sere-core
    /// `batch_norm_eval`).
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let x = gpu.upload(&[1.0, 3.0]).unwrap();
    /// let (g, b) = (gpu.upload(&[2.0]).unwrap(), gpu.upload(&[0.5]).unwrap());
    /// let (rm, rv) = (gpu.upload(&[1.0]).unwrap(), gpu.upload(&[4.0]).unwrap());
    /// let mut y = gpu.zeros(2).unwrap();
    /// gpu.batch_norm_eval(&x, &g, &b, &rm, &rv, 2, 1, 0.0, &mut y).unwrap();
    /// assert_eq!(gpu.download(&y).unwrap(), vec![0.5, 2.5]);
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm_eval(
        &self,
        x: &impl DevicePtr<f32>,
        gamma: &impl DevicePtr<f32>,
        beta: &impl DevicePtr<f32>,
        running_mean: &impl DevicePtr<f32>,
        running_var: &impl DevicePtr<f32>,
        rows: usize,
        cols: usize,
        eps: f32,
        out: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let (_, cols_i, n) = matrix(rows, cols)?;
        check_eps(eps)?;
        let (xp, _g1) = self.rd("x", x, n)?;
        let (gp, _g2) = self.rd("gamma", gamma, cols)?;
        let (bp, _g3) = self.rd("beta", beta, cols)?;
        let (mp, _g4) = self.rd("running_mean", running_mean, cols)?;
        let (vp, _g5) = self.rd("running_var", running_var, cols)?;
        let (yp, _g6) = self.wr("out", out, n)?;
        let (n_i, running) = (n as i64, 1i32);
        launch!(
            self,
            K::BatchNormApply,
            self.elems_cfg(n),
            xp,
            mp,
            vp,
            gp,
            bp,
            yp,
            n_i,
            cols_i,
            running,
            eps
        )
    }

    /// PyTorch's running-statistics update after a train-mode batch of
    /// `rows` samples (sere-core `batch_norm_update_running`).
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let (m, v) = (gpu.upload(&[2.0]).unwrap(), gpu.upload(&[1.0]).unwrap());
    /// let (mut rm, mut rv) = (gpu.zeros(1).unwrap(), gpu.upload(&[1.0]).unwrap());
    /// gpu.batch_norm_update_running(&m, &v, 2, 0.5, &mut rm, &mut rv).unwrap();
    /// assert_eq!(gpu.download(&rv).unwrap(), vec![1.5]);
    /// ```
    pub fn batch_norm_update_running(
        &self,
        mean: &impl DevicePtr<f32>,
        var: &impl DevicePtr<f32>,
        rows: usize,
        momentum: f32,
        running_mean: &mut impl DevicePtrMut<f32>,
        running_var: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        dim("rows", rows)?;
        let cols = mean.len();
        unit("momentum", momentum)?;
        let (mp, _g1) = self.rd("mean", mean, cols)?;
        let (vp, _g2) = self.rd("var", var, cols)?;
        let (rmp, _g3) = self.wr("running_mean", running_mean, cols)?;
        let (rvp, _g4) = self.wr("running_var", running_var, cols)?;
        if cols == 0 {
            return Ok(());
        }
        let cols_i = dim("cols", cols)?;
        let unbias = if rows > 1 {
            rows as f32 / (rows - 1) as f32
        } else {
            1.0
        };
        let one_minus = 1.0 - momentum;
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (cols.div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            K::BatchNormRunning,
            cfg,
            mp,
            vp,
            rmp,
            rvp,
            cols_i,
            momentum,
            one_minus,
            unbias
        )
    }

    /// Backward of [`Gpu::batch_norm_forward`] (sere-core
    /// `batch_norm_backward`): adds to `dx`, `dgamma`, `dbeta`; the
    /// per-column sums go through a deterministic column reduction.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let (x, g) = (gpu.upload(&[1.0, 3.0]).unwrap(), gpu.upload(&[1.0]).unwrap());
    /// let (m, r, dy) = (gpu.upload(&[2.0]).unwrap(), gpu.upload(&[1.0]).unwrap(), gpu.upload(&[1.0, 1.0]).unwrap());
    /// let (mut dx, mut dg, mut db) = (gpu.zeros(2).unwrap(), gpu.zeros(1).unwrap(), gpu.zeros(1).unwrap());
    /// gpu.batch_norm_backward(&x, &g, &m, &r, &dy, 2, 1, &mut dx, &mut dg, &mut db).unwrap();
    /// assert_eq!(gpu.download(&db).unwrap(), vec![2.0]);
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm_backward(
        &self,
        x: &impl DevicePtr<f32>,
        gamma: &impl DevicePtr<f32>,
        mean: &impl DevicePtr<f32>,
        rstd: &impl DevicePtr<f32>,
        dy: &impl DevicePtr<f32>,
        rows: usize,
        cols: usize,
        dx: &mut impl DevicePtrMut<f32>,
        dgamma: &mut impl DevicePtrMut<f32>,
        dbeta: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let (_, cols_i, n) = matrix(rows, cols)?;
        check_len("dgamma", dgamma.len(), cols)?;
        let (xp, _g1) = self.rd("x", x, n)?;
        let (gp, _g2) = self.rd("gamma", gamma, cols)?;
        let (mp, _g3) = self.rd("mean", mean, cols)?;
        let (rp, _g4) = self.rd("rstd", rstd, cols)?;
        let (dyp, _g5) = self.rd("dy", dy, n)?;
        let (dxp, _g6) = self.wr("dx", dx, n)?;
        let (dgp, _g7) = self.wr("dgamma", dgamma, cols)?;
        let (dbp, _g8) = self.wr("dbeta", dbeta, cols)?;
        let mut sums = self.stream.alloc_zeros::<f32>(2 * cols)?;
        let sums_len = sums.len();
        let (sp, _g9) = self.wr("sums", &mut sums, sums_len)?;
        self.col_reduce(
            rows,
            cols,
            ColSum::BatchNormGrad,
            ColFinish::NormGrads,
            ColIn {
                x: xp,
                y: dyp,
                mean: mp,
                rstd: rp,
            },
            ColOut {
                o0: dgp,
                o1: dbp,
                o2: sp,
                p0: 0.0,
                p1: 0.0,
            },
        )?;
        let n_i = n as i64;
        let inv = 1.0 / rows as f32;
        launch!(
            self,
            K::BatchNormBwdDx,
            self.elems_cfg(n),
            xp,
            dyp,
            gp,
            mp,
            rp,
            sp,
            dxp,
            n_i,
            cols_i,
            inv
        )
    }
}
