//! Bilinear grid sampling (kernels/bilinear.cu), as sere-core `bilinear`
//! and PyTorch's `grid_sample(bilinear, zeros, align_corners=False)`.

use crate::error::Result;
use crate::gpu::{dim, launch, product, Gpu, K};
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};
use sere_core::bilinear::{MapLayout, SampleShape};

struct Dims {
    c: i32,
    h: i32,
    w: i32,
    p: i32,
    map: usize,
    grid: usize,
    out: usize,
}

fn dims(shape: SampleShape) -> Result<Dims> {
    Ok(Dims {
        c: dim("channels", shape.channels)?,
        h: dim("height", shape.height)?,
        w: dim("width", shape.width)?,
        p: dim("points", shape.points)?,
        map: product("C x H x W", &[shape.channels, shape.height, shape.width])?,
        grid: product("P x 2", &[shape.points, 2])?,
        out: product("C x P", &[shape.channels, shape.points])?,
    })
}

impl Gpu {
    /// Samples `map` at the `P` points of `grid` (`(x, y)` pairs in
    /// `[-1, 1]`) into `out` (overwritten), sere-core `grid_sample_forward`:
    /// `MapLayout::Chw` maps `C x H x W` to `C x P`, `MapLayout::Hwc` maps
    /// `H x W x C` (patch tokens) to `P x C`.
    ///
    /// ```no_run
    /// use sere_core::bilinear::{MapLayout, SampleShape};
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let map = gpu.upload(&[1.0, 2.0, 3.0, 4.0]).unwrap();
    /// let grid = gpu.upload(&[0.0, 0.0, -0.5, -0.5]).unwrap();
    /// let shape = SampleShape { channels: 1, height: 2, width: 2, points: 2 };
    /// let mut out = gpu.zeros(2).unwrap();
    /// gpu.grid_sample_forward(&map, &grid, shape, MapLayout::Chw, &mut out).unwrap();
    /// assert_eq!(gpu.download(&out).unwrap(), vec![2.5, 1.0]);
    /// ```
    pub fn grid_sample_forward(
        &self,
        map: &impl DevicePtr<f32>,
        grid: &impl DevicePtr<f32>,
        shape: SampleShape,
        layout: MapLayout,
        out: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let d = dims(shape)?;
        let (mp, _g1) = self.rd("map", map, d.map)?;
        let (gp, _g2) = self.rd("grid", grid, d.grid)?;
        let (op, _g3) = self.wr("out", out, d.out)?;
        let (c, h, w, p) = (d.c, d.h, d.w, d.p);
        let hwc = (layout == MapLayout::Hwc) as i32;
        launch!(
            self,
            K::GridSampleFwd,
            self.elems_cfg(d.out),
            mp,
            gp,
            op,
            c,
            h,
            w,
            p,
            hwc
        )
    }

    fn grid_sample_bwd_raw(
        &self,
        ptrs: [u64; 5],
        shape: SampleShape,
        layout: MapLayout,
    ) -> Result<()> {
        let d = dims(shape)?;
        let [mp, gp, gop, gmp, ggp] = ptrs;
        let (c, h, w, p) = (d.c, d.h, d.w, d.p);
        let hwc = (layout == MapLayout::Hwc) as i32;
        // One warp per point, 8 points per block.
        let cfg = LaunchConfig {
            grid_dim: (shape.points.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            K::GridSampleBwd,
            cfg,
            mp,
            gp,
            gop,
            gmp,
            ggp,
            c,
            h,
            w,
            p,
            hwc
        )
    }

    /// Backward of [`Gpu::grid_sample_forward`] (sere-core
    /// `grid_sample_backward` with a grid gradient): adds the gradient
    /// w.r.t. the map to `grad_map` (atomic adds where points share pixels,
    /// like PyTorch, so the order of the additions is not fixed) and the
    /// gradient w.r.t. the points to `grad_grid` (`P x 2`).
    ///
    /// ```no_run
    /// use sere_core::bilinear::{MapLayout, SampleShape};
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let map = gpu.upload(&[1.0, 2.0, 3.0, 4.0]).unwrap();
    /// let grid = gpu.upload(&[0.0, 0.0]).unwrap();
    /// let go = gpu.upload(&[1.0]).unwrap();
    /// let shape = SampleShape { channels: 1, height: 2, width: 2, points: 1 };
    /// let (mut gm, mut gg) = (gpu.zeros(4).unwrap(), gpu.zeros(2).unwrap());
    /// gpu.grid_sample_backward(&map, &grid, &go, shape, MapLayout::Chw, &mut gm, &mut gg).unwrap();
    /// assert_eq!(gpu.download(&gg).unwrap(), vec![1.0, 2.0]);
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn grid_sample_backward(
        &self,
        map: &impl DevicePtr<f32>,
        grid: &impl DevicePtr<f32>,
        grad_out: &impl DevicePtr<f32>,
        shape: SampleShape,
        layout: MapLayout,
        grad_map: &mut impl DevicePtrMut<f32>,
        grad_grid: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let d = dims(shape)?;
        let (mp, _g1) = self.rd("map", map, d.map)?;
        let (gp, _g2) = self.rd("grid", grid, d.grid)?;
        let (gop, _g3) = self.rd("grad_out", grad_out, d.out)?;
        let (gmp, _g4) = self.wr("grad_map", grad_map, d.map)?;
        let (ggp, _g5) = self.wr("grad_grid", grad_grid, d.grid)?;
        self.grid_sample_bwd_raw([mp, gp, gop, gmp, ggp], shape, layout)
    }

    /// [`Gpu::grid_sample_backward`] without the grid gradient (sere-core
    /// `grid_sample_backward` with `grad_grid = None`; the map itself is not
    /// needed then).
    ///
    /// ```no_run
    /// use sere_core::bilinear::{MapLayout, SampleShape};
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let grid = gpu.upload(&[0.0, 0.0]).unwrap();
    /// let go = gpu.upload(&[1.0]).unwrap();
    /// let shape = SampleShape { channels: 1, height: 2, width: 2, points: 1 };
    /// let mut gm = gpu.zeros(4).unwrap();
    /// gpu.grid_sample_backward_map(&grid, &go, shape, MapLayout::Chw, &mut gm).unwrap();
    /// assert_eq!(gpu.download(&gm).unwrap(), vec![0.25; 4]);
    /// ```
    pub fn grid_sample_backward_map(
        &self,
        grid: &impl DevicePtr<f32>,
        grad_out: &impl DevicePtr<f32>,
        shape: SampleShape,
        layout: MapLayout,
        grad_map: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let d = dims(shape)?;
        let (gp, _g2) = self.rd("grid", grid, d.grid)?;
        let (gop, _g3) = self.rd("grad_out", grad_out, d.out)?;
        let (gmp, _g4) = self.wr("grad_map", grad_map, d.map)?;
        self.grid_sample_bwd_raw([0, gp, gop, gmp, 0], shape, layout)
    }
}
