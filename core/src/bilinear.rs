//! Bilinear sampling of a feature map at normalized points, exactly as
//! PyTorch's `grid_sample(mode="bilinear", padding_mode="zeros",
//! align_corners=False)`, with its backward to the map and to the grid.
//!
//! A point `(gx, gy)` in `[-1, 1]` is unnormalized to pixel coordinates
//! `ix = ((gx + 1) * W - 1) / 2` (so -1 and 1 are the outer pixel edges);
//! the four neighbouring pixels are blended, and neighbours outside the map
//! contribute zero.

use crate::error::{check_finite, check_len, check_nonzero, shape_product, Result};
use libm::floorf;

/// Memory layout of the feature map and of the sampled output.
///
/// ```
/// use sere_core::bilinear::MapLayout;
/// assert_ne!(MapLayout::Chw, MapLayout::Hwc);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapLayout {
    /// Map `C x H x W`, output `C x P` (PyTorch's layout).
    Chw,
    /// Map `H x W x C` (ViT patch tokens, one row per patch), output `P x C`
    /// (one row of features per sampled point, ready for the relations).
    Hwc,
}

/// Shape of a sampling problem: a `channels x height x width` map sampled at
/// `points` grid points.
///
/// ```
/// use sere_core::bilinear::SampleShape;
/// let s = SampleShape { channels: 384, height: 14, width: 14, points: 169 };
/// assert_eq!(s.map_len(), 384 * 196);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleShape {
    /// Feature channels `C`.
    pub channels: usize,
    /// Map height `H`.
    pub height: usize,
    /// Map width `W`.
    pub width: usize,
    /// Number of sampled points `P` (the grid holds `2 * P` values).
    pub points: usize,
}

impl SampleShape {
    /// Elements in the map: `C * H * W`.
    ///
    /// ```
    /// use sere_core::bilinear::SampleShape;
    /// assert_eq!(SampleShape { channels: 2, height: 3, width: 4, points: 1 }.map_len(), 24);
    /// ```
    pub fn map_len(&self) -> usize {
        self.channels
            .saturating_mul(self.height)
            .saturating_mul(self.width)
    }

    /// Elements in the output: `C * P`.
    ///
    /// ```
    /// use sere_core::bilinear::SampleShape;
    /// assert_eq!(SampleShape { channels: 2, height: 3, width: 4, points: 5 }.out_len(), 10);
    /// ```
    pub fn out_len(&self) -> usize {
        self.channels.saturating_mul(self.points)
    }

    fn validate(&self, map: usize, grid: usize, out: usize, out_what: &'static str) -> Result<()> {
        check_nonzero("channels", self.channels)?;
        check_nonzero("height", self.height)?;
        check_nonzero("width", self.width)?;
        check_nonzero("points", self.points)?;
        check_len(
            "map",
            map,
            shape_product("C x H x W", &[self.channels, self.height, self.width])?,
        )?;
        check_len("grid", grid, shape_product("P x 2", &[self.points, 2])?)?;
        check_len(
            out_what,
            out,
            shape_product("C x P", &[self.channels, self.points])?,
        )
    }

    /// (channel stride, pixel stride) in the map; (channel stride, point
    /// stride) in the output.
    fn strides(&self, layout: MapLayout) -> ((usize, usize), (usize, usize)) {
        match layout {
            MapLayout::Chw => ((self.height * self.width, 1), (self.points, 1)),
            MapLayout::Hwc => ((1, self.channels), (1, self.channels)),
        }
    }
}

/// The up-to-four in-bounds neighbours of a point: pixel index and weight,
/// plus the partial derivatives of each weight w.r.t. `ix` and `iy`.
struct Corners {
    n: usize,
    pix: [usize; 4],
    w: [f32; 4],
    dwx: [f32; 4],
    dwy: [f32; 4],
}

#[inline]
fn corners(gx: f32, gy: f32, h: usize, w: usize) -> Corners {
    let mut c = Corners {
        n: 0,
        pix: [0; 4],
        w: [0.0; 4],
        dwx: [0.0; 4],
        dwy: [0.0; 4],
    };
    let ix = ((gx + 1.0) * w as f32 - 1.0) * 0.5;
    let iy = ((gy + 1.0) * h as f32 - 1.0) * 0.5;
    // Every neighbour is outside the map (this also skips far-away points,
    // whose weights would otherwise lose all precision).
    if !(ix >= -1.0 && ix < w as f32 && iy >= -1.0 && iy < h as f32) {
        return c;
    }
    let (x0f, y0f) = (floorf(ix), floorf(iy));
    let (tx, ty) = (ix - x0f, iy - y0f);
    let (x0, y0) = (x0f as isize, y0f as isize);
    let cand = [
        (x0, y0, (1.0 - tx) * (1.0 - ty), -(1.0 - ty), -(1.0 - tx)),
        (x0 + 1, y0, tx * (1.0 - ty), 1.0 - ty, -tx),
        (x0, y0 + 1, (1.0 - tx) * ty, -ty, 1.0 - tx),
        (x0 + 1, y0 + 1, tx * ty, ty, tx),
    ];
    for (x, y, wt, dx, dy) in cand {
        if x >= 0 && (x as usize) < w && y >= 0 && (y as usize) < h {
            c.pix[c.n] = y as usize * w + x as usize;
            c.w[c.n] = wt;
            c.dwx[c.n] = dx;
            c.dwy[c.n] = dy;
            c.n += 1;
        }
    }
    c
}

/// Samples `map` at the `P` points of `grid` (`(x, y)` pairs) into `out`
/// (overwritten). Points outside `[-1, 1]` see zero padding.
///
/// ```
/// use sere_core::bilinear::{grid_sample_forward, MapLayout, SampleShape};
/// let map = [1.0f32, 2.0, 3.0, 4.0]; // 1 x 2 x 2
/// let shape = SampleShape { channels: 1, height: 2, width: 2, points: 2 };
/// let mut out = [0.0f32; 2];
/// grid_sample_forward(&map, &[0.0, 0.0, -0.5, -0.5], shape, MapLayout::Chw, &mut out).unwrap();
/// assert_eq!(out, [2.5, 1.0]); // the centre blends all four; (-0.5,-0.5) is pixel (0,0)
/// ```
pub fn grid_sample_forward(
    map: &[f32],
    grid: &[f32],
    shape: SampleShape,
    layout: MapLayout,
    out: &mut [f32],
) -> Result<()> {
    shape.validate(map.len(), grid.len(), out.len(), "out")?;
    check_finite("grid", grid)?;
    let ((mcs, mps), (ocs, ops)) = shape.strides(layout);
    for (p, g) in grid.chunks_exact(2).enumerate() {
        let k = corners(g[0], g[1], shape.height, shape.width);
        for ch in 0..shape.channels {
            let mut acc = 0.0f32;
            for i in 0..k.n {
                acc += k.w[i] * map[ch * mcs + k.pix[i] * mps];
            }
            out[ch * ocs + p * ops] = acc;
        }
    }
    Ok(())
}

/// Backward of [`grid_sample_forward`]: given `grad_out` (layout of `out`),
/// adds the gradient w.r.t. the map to `grad_map` and, if given, the
/// gradient w.r.t. the grid points to `grad_grid` (`P x 2`). Accumulation
/// into `grad_map` matches PyTorch's scatter-add when points share pixels.
///
/// ```
/// use sere_core::bilinear::{grid_sample_backward, MapLayout, SampleShape};
/// let map = [1.0f32, 2.0, 3.0, 4.0];
/// let shape = SampleShape { channels: 1, height: 2, width: 2, points: 1 };
/// let (mut gm, mut gg) = ([0.0f32; 4], [0.0f32; 2]);
/// grid_sample_backward(&map, &[0.0, 0.0], &[1.0], shape, MapLayout::Chw, &mut gm, Some(&mut gg)).unwrap();
/// assert_eq!(gm, [0.25; 4]);
/// assert_eq!(gg, [1.0, 2.0]); // d/dgx: (W/2) * 1, d/dgy: (H/2) * 2
/// ```
pub fn grid_sample_backward(
    map: &[f32],
    grid: &[f32],
    grad_out: &[f32],
    shape: SampleShape,
    layout: MapLayout,
    grad_map: &mut [f32],
    mut grad_grid: Option<&mut [f32]>,
) -> Result<()> {
    shape.validate(map.len(), grid.len(), grad_out.len(), "grad_out")?;
    check_len("grad_map", grad_map.len(), map.len())?;
    if let Some(gg) = grad_grid.as_deref() {
        check_len("grad_grid", gg.len(), grid.len())?;
    }
    check_finite("grid", grid)?;
    let ((mcs, mps), (ocs, ops)) = shape.strides(layout);
    let (sx, sy) = (shape.width as f32 * 0.5, shape.height as f32 * 0.5);
    for (p, g) in grid.chunks_exact(2).enumerate() {
        let k = corners(g[0], g[1], shape.height, shape.width);
        let (mut dix, mut diy) = (0.0f32, 0.0f32);
        for ch in 0..shape.channels {
            let go = grad_out[ch * ocs + p * ops];
            for i in 0..k.n {
                let m = ch * mcs + k.pix[i] * mps;
                grad_map[m] += k.w[i] * go;
                dix += k.dwx[i] * map[m] * go;
                diy += k.dwy[i] * map[m] * go;
            }
        }
        if let Some(gg) = grad_grid.as_deref_mut() {
            gg[2 * p] += dix * sx;
            gg[2 * p + 1] += diy * sy;
        }
    }
    Ok(())
}
