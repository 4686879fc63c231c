//! Operations of the host's training step that have no single sere-core
//! function (the host's ViT and heads do them inline on the CPU):
//! kernels/train.cu (patch extraction, strided row copies, drop-path
//! residuals, ReLU, row-wise L2 normalisation) and the indexed, batched
//! grid sampling of kernels/bilinear.cu.

use crate::error::Result;
use crate::gpu::{dim, launch, product, row_launch_config, Gpu, K};
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};
use sere_core::bilinear::SampleShape;

/// Smallest buffer length holding `rows` rows of `cols` values `stride`
/// apart.
fn strided_len(rows: usize, cols: usize, stride: usize) -> Result<usize> {
    if rows == 0 || cols == 0 {
        return Ok(0);
    }
    let last = (rows - 1)
        .checked_mul(stride)
        .and_then(|v| v.checked_add(cols))
        .ok_or(crate::CudaError::TooLarge { what: "rows" })?;
    Ok(last)
}

fn at_least(what: &'static str, got: usize, need: usize) -> Result<()> {
    if got >= need {
        Ok(())
    } else {
        Err(sere_core::Error::ShapeMismatch {
            what,
            expected: need,
            got,
        }
        .into())
    }
}

impl Gpu {
    /// Non-overlapping `patch x patch` patches of `batch` images
    /// (`batch x chans x img x img`) as rows of `chans * patch^2` values in
    /// `(c, ky, kx)` order, one row per patch, patches row-major per image
    /// (the patch embedding's im2col; `img` a multiple of `patch`).
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let x = gpu.upload(&(0..16).map(|v| v as f32).collect::<Vec<_>>()).unwrap();
    /// let mut p = gpu.zeros(16).unwrap();
    /// gpu.im2col(&x, 1, 1, 4, 2, &mut p).unwrap();
    /// assert_eq!(gpu.download(&p).unwrap()[..4], [0.0, 1.0, 4.0, 5.0]);
    /// ```
    pub fn im2col(
        &self,
        images: &impl DevicePtr<f32>,
        batch: usize,
        chans: usize,
        img: usize,
        patch: usize,
        out: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let (b_i, c_i, s_i, p_i) = (
            dim("batch", batch)?,
            dim("chans", chans)?,
            dim("img", img)?,
            dim("patch", patch)?,
        );
        if img % patch != 0 {
            return Err(sere_core::Error::InvalidArgument {
                what: "img",
                requirement: "must be a multiple of the patch size",
            }
            .into());
        }
        let n = product("images", &[batch, chans, img, img])?;
        let (ip, _g1) = self.rd("images", images, n)?;
        let (op, _g2) = self.wr("out", out, n)?;
        launch!(
            self,
            K::Im2col,
            self.elems_cfg(n),
            ip,
            op,
            b_i,
            c_i,
            s_i,
            p_i
        )
    }

    /// Copies `rows` rows of `cols` values from `src` (rows `src_stride`
    /// apart) to `dst` (rows `dst_stride` apart), or adds them when
    /// `accumulate`: gathering the patch or CLS rows of a token buffer and
    /// scattering their gradients back. Pass views (`slice(off..)`) to start
    /// at an offset.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let src = gpu.upload(&[1.0, 2.0, 3.0, 4.0]).unwrap();
    /// let mut dst = gpu.zeros(2).unwrap();
    /// gpu.copy_rows(&src, 2, &mut dst, 1, 2, 1, false).unwrap(); // column 0
    /// assert_eq!(gpu.download(&dst).unwrap(), vec![1.0, 3.0]);
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn copy_rows(
        &self,
        src: &impl DevicePtr<f32>,
        src_stride: usize,
        dst: &mut impl DevicePtrMut<f32>,
        dst_stride: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) -> Result<()> {
        at_least("src", src.len(), strided_len(rows, cols, src_stride)?)?;
        at_least("dst", dst.len(), strided_len(rows, cols, dst_stride)?)?;
        let n = product("rows x cols", &[rows, cols])?;
        let (sl, dl) = (src.len(), dst.len());
        let (sp, _g1) = self.rd("src", src, sl)?;
        let (dp, _g2) = self.wr("dst", dst, dl)?;
        if n == 0 {
            return Ok(());
        }
        let (ss, ds, r, c, acc) = (
            src_stride as i64,
            dst_stride as i64,
            rows as i64,
            cols as i64,
            accumulate as i32,
        );
        launch!(
            self,
            K::CopyRows,
            self.elems_cfg(n),
            sp,
            ss,
            dp,
            ds,
            r,
            c,
            acc
        )
    }

    /// Drop-path residual, per sample of `per` elements:
    /// `out = x + keep[i / per] * out` (the host ViT's `residual_add`).
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let x = gpu.upload(&[1.0, 1.0]).unwrap();
    /// let keep = gpu.upload(&[2.0, 0.0]).unwrap();
    /// let mut out = gpu.upload(&[3.0, 3.0]).unwrap();
    /// gpu.residual_keep_add(&mut out, &x, &keep, 1).unwrap();
    /// assert_eq!(gpu.download(&out).unwrap(), vec![7.0, 1.0]);
    /// ```
    pub fn residual_keep_add(
        &self,
        out: &mut impl DevicePtrMut<f32>,
        x: &impl DevicePtr<f32>,
        keep: &impl DevicePtr<f32>,
        per: usize,
    ) -> Result<()> {
        let n = out.len();
        let per_i = dim("per", per)? as i64;
        if n % per != 0 {
            return Err(sere_core::Error::InvalidArgument {
                what: "per",
                requirement: "must divide the buffer length",
            }
            .into());
        }
        let (xp, _g1) = self.rd("x", x, n)?;
        let (kp, _g2) = self.rd("keep", keep, n / per)?;
        let (op, _g3) = self.wr("out", out, n)?;
        if n == 0 {
            return Ok(());
        }
        let (yp, n_i) = (0u64, n as i64);
        launch!(
            self,
            K::KeepScaleAdd,
            self.elems_cfg(n),
            xp,
            yp,
            kp,
            op,
            n_i,
            per_i
        )
    }

    /// `out = keep[i / per] * dy` (overwrites): the gradient of a
    /// drop-path branch (the host ViT's `scale_rows`).
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let dy = gpu.upload(&[1.0, 1.0]).unwrap();
    /// let keep = gpu.upload(&[2.0, 0.0]).unwrap();
    /// let mut out = gpu.zeros(2).unwrap();
    /// gpu.keep_scale(&dy, &keep, 1, &mut out).unwrap();
    /// assert_eq!(gpu.download(&out).unwrap(), vec![2.0, 0.0]);
    /// ```
    pub fn keep_scale(
        &self,
        dy: &impl DevicePtr<f32>,
        keep: &impl DevicePtr<f32>,
        per: usize,
        out: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let n = out.len();
        let per_i = dim("per", per)? as i64;
        if n % per != 0 {
            return Err(sere_core::Error::InvalidArgument {
                what: "per",
                requirement: "must divide the buffer length",
            }
            .into());
        }
        let (yp, _g1) = self.rd("dy", dy, n)?;
        let (kp, _g2) = self.rd("keep", keep, n / per)?;
        let (op, _g3) = self.wr("out", out, n)?;
        if n == 0 {
            return Ok(());
        }
        let (xp, n_i) = (0u64, n as i64);
        launch!(
            self,
            K::KeepScaleAdd,
            self.elems_cfg(n),
            xp,
            yp,
            kp,
            op,
            n_i,
            per_i
        )
    }

    /// `x = max(x, 0)` in place.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let mut x = gpu.upload(&[-1.0, 2.0]).unwrap();
    /// gpu.relu_in_place(&mut x).unwrap();
    /// assert_eq!(gpu.download(&x).unwrap(), vec![0.0, 2.0]);
    /// ```
    pub fn relu_in_place(&self, x: &mut impl DevicePtrMut<f32>) -> Result<()> {
        let n = x.len();
        let (xp, _g) = self.wr("x", x, n)?;
        if n == 0 {
            return Ok(());
        }
        let n_i = n as i64;
        launch!(self, K::ReluInplace, self.elems_cfg(n), xp, n_i)
    }

    /// ReLU backward from its output: `dx = out > 0 ? dy : 0` (overwrites).
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let out = gpu.upload(&[0.0, 2.0]).unwrap();
    /// let dy = gpu.upload(&[5.0, 5.0]).unwrap();
    /// let mut dx = gpu.zeros(2).unwrap();
    /// gpu.relu_backward(&out, &dy, &mut dx).unwrap();
    /// assert_eq!(gpu.download(&dx).unwrap(), vec![0.0, 5.0]);
    /// ```
    pub fn relu_backward(
        &self,
        out: &impl DevicePtr<f32>,
        dy: &impl DevicePtr<f32>,
        dx: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let n = out.len();
        let (op, _g1) = self.rd("out", out, n)?;
        let (yp, _g2) = self.rd("dy", dy, n)?;
        let (xp, _g3) = self.wr("dx", dx, n)?;
        if n == 0 {
            return Ok(());
        }
        let n_i = n as i64;
        launch!(self, K::ReluBwdMask, self.elems_cfg(n), op, yp, xp, n_i)
    }

    /// Row-wise L2 normalisation (`F.normalize`): `dst = src / norm` with
    /// `norm = max(||row||, eps)` saved in `norms` (one per row) for the
    /// backward. `eps = 0` is PyTorch's weight norm (no floor).
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let x = gpu.upload(&[3.0, 4.0]).unwrap();
    /// let (mut u, mut n) = (gpu.zeros(2).unwrap(), gpu.zeros(1).unwrap());
    /// gpu.l2_normalize_rows(&x, 1, 2, 1e-12, &mut u, &mut n).unwrap();
    /// assert_eq!(gpu.download(&n).unwrap(), vec![5.0]);
    /// ```
    pub fn l2_normalize_rows(
        &self,
        src: &impl DevicePtr<f32>,
        rows: usize,
        cols: usize,
        eps: f32,
        dst: &mut impl DevicePtrMut<f32>,
        norms: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let (rows_i, cols_i) = (dim("rows", rows)?, dim("cols", cols)?);
        let n = product("rows x cols", &[rows, cols])?;
        check_eps(eps)?;
        let (sp, _g1) = self.rd("src", src, n)?;
        let (dp, _g2) = self.wr("dst", dst, n)?;
        let (np, _g3) = self.wr("norms", norms, rows)?;
        launch!(
            self,
            K::L2NormalizeRows,
            row_launch_config(rows, cols),
            sp,
            dp,
            np,
            rows_i,
            cols_i,
            eps
        )
    }

    /// Per-row dot products of `a` and `b` (`rows x cols`), added into
    /// `out` (`rows`): `out[r] += a_r . b_r`.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let a = gpu.upload(&[1.0, 2.0, 3.0, 4.0]).unwrap();
    /// let b = gpu.upload(&[1.0, 1.0, 0.5, 0.5]).unwrap();
    /// let mut out = gpu.upload(&[10.0, 0.0]).unwrap();
    /// gpu.row_dot_add(&a, &b, 2, 2, &mut out).unwrap();
    /// assert_eq!(gpu.download(&out).unwrap(), vec![13.0, 3.5]);
    /// ```
    pub fn row_dot_add(
        &self,
        a: &impl DevicePtr<f32>,
        b: &impl DevicePtr<f32>,
        rows: usize,
        cols: usize,
        out: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let (rows_i, cols_i) = (dim("rows", rows)?, dim("cols", cols)?);
        let n = product("rows x cols", &[rows, cols])?;
        let (ap, _g1) = self.rd("a", a, n)?;
        let (bp, _g2) = self.rd("b", b, n)?;
        let (op, _g3) = self.wr("out", out, rows)?;
        launch!(
            self,
            K::RowDotAdd,
            row_launch_config(rows, cols),
            ap,
            bp,
            op,
            rows_i,
            cols_i
        )
    }

    /// Backward of [`Gpu::l2_normalize_rows`] given its output `u`, the
    /// saved `norms` and the output gradient `du`:
    /// `dst (+)= (du - u (u . du)) / norm` (the dot product dropped where
    /// the norm was clamped to `eps`); adds when `accumulate`, else
    /// overwrites.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let u = gpu.upload(&[1.0, 0.0]).unwrap();
    /// let n = gpu.upload(&[2.0]).unwrap();
    /// let du = gpu.upload(&[1.0, 1.0]).unwrap();
    /// let mut dx = gpu.zeros(2).unwrap();
    /// gpu.l2_normalize_rows_backward(&du, &u, &n, 1, 2, 1e-12, false, &mut dx).unwrap();
    /// assert_eq!(gpu.download(&dx).unwrap(), vec![0.0, 0.5]);
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn l2_normalize_rows_backward(
        &self,
        du: &impl DevicePtr<f32>,
        u: &impl DevicePtr<f32>,
        norms: &impl DevicePtr<f32>,
        rows: usize,
        cols: usize,
        eps: f32,
        accumulate: bool,
        dst: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let (rows_i, cols_i) = (dim("rows", rows)?, dim("cols", cols)?);
        let n = product("rows x cols", &[rows, cols])?;
        check_eps(eps)?;
        let (dup, _g1) = self.rd("du", du, n)?;
        let (up, _g2) = self.rd("u", u, n)?;
        let (np, _g3) = self.rd("norms", norms, rows)?;
        let (dp, _g4) = self.wr("dst", dst, n)?;
        let acc = accumulate as i32;
        launch!(
            self,
            K::L2NormalizeRowsBwd,
            row_launch_config(rows, cols),
            dup,
            up,
            np,
            dp,
            rows_i,
            cols_i,
            eps,
            acc
        )
    }

    /// Batched, indexed grid sampling of HWC maps (`maps`: `nmaps` maps of
    /// `H x W x C`, back to back): slot `s < slots` samples map `index[s]`
    /// at its `P` points (`grids`: `slots x P x 2`) into `out`
    /// (`slots x P x C`, overwritten). An index outside `0..nmaps` gives
    /// zeros. One launch for every image of a view pair; sere-core
    /// `grid_sample_forward` (`MapLayout::Hwc`) per slot.
    ///
    /// ```no_run
    /// use sere_core::bilinear::SampleShape;
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let maps = gpu.upload(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]).unwrap(); // 2 maps 2x2x1
    /// let idx = gpu.stream().clone_htod(&[1i32]).unwrap();
    /// let grid = gpu.upload(&[0.0, 0.0]).unwrap();
    /// let shape = SampleShape { channels: 1, height: 2, width: 2, points: 1 };
    /// let mut out = gpu.zeros(1).unwrap();
    /// gpu.grid_sample_forward_indexed(&maps, 2, &idx, &grid, 1, shape, &mut out).unwrap();
    /// assert_eq!(gpu.download(&out).unwrap(), vec![6.5]);
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn grid_sample_forward_indexed(
        &self,
        maps: &impl DevicePtr<f32>,
        nmaps: usize,
        index: &impl DevicePtr<i32>,
        grids: &impl DevicePtr<f32>,
        slots: usize,
        shape: SampleShape,
        out: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let d = IdxDims::new(shape, nmaps, slots)?;
        let (mp, _g1) = self.rd("maps", maps, d.maps)?;
        let (ip, _g2) = self.rd("index", index, slots)?;
        let (gp, _g3) = self.rd("grids", grids, d.grids)?;
        let (op, _g4) = self.wr("out", out, d.out)?;
        let (ms, nm, c, h, w, p) = (d.map_stride, d.nmaps, d.c, d.h, d.w, d.p);
        let per = shape.channels * shape.points;
        let mut cfg = self.elems_cfg(per);
        cfg.grid_dim.0 = cfg.grid_dim.0.min(per.div_ceil(256).max(1) as u32);
        cfg.grid_dim.1 = d.slots;
        launch!(
            self,
            K::GridSampleFwdIdx,
            cfg,
            mp,
            ms,
            nm,
            ip,
            gp,
            op,
            c,
            h,
            w,
            p
        )
    }

    /// Map gradient of [`Gpu::grid_sample_forward_indexed`]: adds each
    /// slot's sampled gradient (`grad_out`, `slots x P x C`) into map
    /// `index[s]` of `grad_maps` (atomic adds, as PyTorch, so the order of
    /// the additions is not fixed).
    ///
    /// ```no_run
    /// use sere_core::bilinear::SampleShape;
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let idx = gpu.stream().clone_htod(&[1i32]).unwrap();
    /// let grid = gpu.upload(&[0.0, 0.0]).unwrap();
    /// let go = gpu.upload(&[4.0]).unwrap();
    /// let shape = SampleShape { channels: 1, height: 2, width: 2, points: 1 };
    /// let mut gm = gpu.zeros(8).unwrap();
    /// gpu.grid_sample_backward_indexed(&idx, &grid, &go, 1, shape, 2, &mut gm).unwrap();
    /// assert_eq!(gpu.download(&gm).unwrap(), vec![0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn grid_sample_backward_indexed(
        &self,
        index: &impl DevicePtr<i32>,
        grids: &impl DevicePtr<f32>,
        grad_out: &impl DevicePtr<f32>,
        slots: usize,
        shape: SampleShape,
        nmaps: usize,
        grad_maps: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let d = IdxDims::new(shape, nmaps, slots)?;
        let (ip, _g1) = self.rd("index", index, slots)?;
        let (gp, _g2) = self.rd("grids", grids, d.grids)?;
        let (op, _g3) = self.rd("grad_out", grad_out, d.out)?;
        let (mp, _g4) = self.wr("grad_maps", grad_maps, d.maps)?;
        let (ms, nm, c, h, w, p) = (d.map_stride, d.nmaps, d.c, d.h, d.w, d.p);
        let slots_i = d.slots as i32;
        let warps = product("slots x points", &[slots, shape.points])?;
        // One warp per (slot, point), 8 per block.
        let cfg = LaunchConfig {
            grid_dim: (warps.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            K::GridSampleBwdIdx,
            cfg,
            ip,
            gp,
            op,
            mp,
            ms,
            nm,
            slots_i,
            c,
            h,
            w,
            p
        )
    }
}

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

/// Checked sizes of an indexed grid sampling.
struct IdxDims {
    c: i32,
    h: i32,
    w: i32,
    p: i32,
    nmaps: i32,
    slots: u32,
    map_stride: i64,
    maps: usize,
    grids: usize,
    out: usize,
}

impl IdxDims {
    fn new(shape: SampleShape, nmaps: usize, slots: usize) -> Result<Self> {
        let map = product("H x W x C", &[shape.height, shape.width, shape.channels])?;
        let s = dim("slots", slots)?;
        if s > 65_535 {
            return Err(crate::CudaError::TooLarge { what: "slots" });
        }
        let d = IdxDims {
            c: dim("channels", shape.channels)?,
            h: dim("height", shape.height)?,
            w: dim("width", shape.width)?,
            p: dim("points", shape.points)?,
            nmaps: dim("nmaps", nmaps)?,
            slots: s as u32,
            map_stride: map as i64,
            maps: product("maps", &[nmaps, map])?,
            grids: product("grids", &[slots, shape.points, 2])?,
            out: product("out", &[slots, shape.points, shape.channels])?,
        };
        Ok(d)
    }
}
