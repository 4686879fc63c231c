//! `ndarray` views in and out (feature `ndarray`): a wrapper of every tensor
//! kernel of the core that takes [`ArrayView`]s and [`ArrayViewMut`]s and
//! reads the shapes from them, so the only numbers a caller passes are true
//! hyper-parameters (temperatures, `eps`, momenta, scales, the map layout).
//!
//! Each wrapper validates the views' shapes against each other, then runs the
//! slice kernel of the same name, so it has that kernel's semantics exactly:
//! forward functions overwrite their outputs, backward functions *add* into
//! their gradient views, and the results are the kernel's, bit for bit.
//!
//! ```
//! use ndarray::{Array2, Array3};
//! use sere_core::nd;
//! // 3 sampled points x 4 channels per view, 2 heads.
//! let xs = Array2::from_shape_fn((3, 4), |(p, c)| (p * 4 + c) as f32 / 10.0);
//! // The teacher's features stored channel-major, (channels, points), read
//! // as (points, channels) through `.t()` (copied, see Layouts).
//! let xt_cp = Array2::from_shape_fn((4, 3), |(c, p)| (p * 4 + c) as f32 / 10.0 + 0.05);
//! let (mut ls, mut lt) = (Array3::zeros((2, 3, 3)), Array3::zeros((2, 3, 3)));
//! nd::spatial_relation_forward(xs.view(), ls.view_mut()).unwrap();
//! nd::spatial_relation_forward(xt_cp.t(), lt.view_mut()).unwrap();
//! // The logits are (heads, n, n): every row of every head is one distribution.
//! let mut g = Array3::zeros((2, 3, 3));
//! let loss = nd::relation_cross_entropy_backward(ls.view(), lt.view(), 1.0, 0.5, 1.0, g.view_mut())
//!     .unwrap();
//! let mut gx = Array2::zeros((3, 4));
//! nd::spatial_relation_backward(xs.view(), g.view(), gx.view_mut()).unwrap();
//! assert!(loss > 0.0 && gx.iter().all(|v| v.is_finite()));
//! ```
//!
//! # Shapes
//!
//! Every view's axes follow its kernel's documented layout:
//!
//! - Row kernels (softmax, the row losses, layer and batch norm, linear
//!   layers, the centre update and the teacher entropy) take views of any
//!   number of axes whose *last* axis is the row (classes, channels or
//!   features) and whose leading axes all index rows: `(rows, cols)`, or for
//!   instance the relation logits `(heads, n, n)` or ViT tokens
//!   `(batch, tokens, dim)`. Per-row outputs (`mean`, `rstd`, the weights of
//!   [`weighted_cross_entropy`]) have the leading axes; per-column ones
//!   (`gamma`, `beta`, batch statistics, biases) are 1-D.
//! - Relations take features `(points, channels)`; spatial logits are
//!   `(heads, points, points)` (the number of heads is their first axis) and
//!   channel logits `(channels, channels)`.
//! - `grid_sample` takes the map as `(channels, height, width)`
//!   ([`MapLayout::Chw`]) or `(height, width, channels)` ([`MapLayout::Hwc`]),
//!   the grid as `(points, 2)` and the sampled output as `(channels, points)`
//!   or `(points, channels)` respectively. [`overlap_grids`] fills grids of
//!   shape `(hs, ws, 2)`; a standard-layout one becomes `(points, 2)` without
//!   a copy (`into_shape_with_order`).
//! - The DINO loss takes `(student_views, batch, dim)` and
//!   `(teacher_views, batch, dim)`; element-wise kernels (GELU, AdamW, EMA,
//!   clipping) take views of any shape, equal for all arguments.
//!
//! # Layouts: zero-copy for standard-layout views
//!
//! A view that is contiguous in standard (row-major) order, such as a whole
//! `Array` or a block of leading rows, is passed to the kernel as a slice:
//! nothing is copied and nothing allocates. Any other view (transposed,
//! sliced with steps, reversed, or a block of columns) is first copied into a
//! standard-layout temporary, which *allocates*. For an output the temporary
//! starts with the view's current contents and is copied back after the
//! kernel has run (whatever it returned), so the accumulation of backward
//! functions and "left untouched" contracts hold for every layout, and
//! elements of a parent array outside the view are never written.
//! [`gemm`] goes further: it hands any view that is contiguous in memory
//! with non-negative strides (a transpose included) to [`linalg::gemm`] as a
//! strided [`MatRef`], without a copy.
//!
//! # Errors
//!
//! Views whose shapes do not fit together are reported before anything is
//! copied or written, as [`Error::ShapeMismatch`](crate::Error::ShapeMismatch): `what` names the view, and
//! `expected` and `got` are the lengths of its first axis that does not fit
//! (its number of axes, when that differs). Everything else, zero sizes, bad
//! hyper-parameters, non-finite values, is the kernel's own error. No wrapper
//! panics.
//!
//! # Not wrapped
//!
//! | item | why |
//! |---|---|
//! | `geometry::{CropBox, Rect, overlap, GridPlacement}` | crop records and scalar geometry: no arrays |
//! | `bilinear::{MapLayout, SampleShape}` | `MapLayout` is passed as is; `SampleShape` is read from the views |
//! | `activation::{gelu, gelu_grad}` | scalar functions: `x.mapv(gelu)` |
//! | `linalg::MatRef` | describes a strided view; an `ArrayView2` replaces it |
//! | `loss::DinoShape` | read from the views |
//! | `optim::AdamW` | hyper-parameters, passed as is |
//! | `schedule::{cosine_schedule, linear_warmup}` | scalar schedules |
//! | `Error`, `Result` | shared: the wrappers return the core's errors |

use crate::bilinear::{self, MapLayout, SampleShape};
use crate::error::{check_len, Result};
use crate::geometry::{self, CropBox, GridPlacement, Rect};
use crate::linalg::{self, MatRef};
use crate::optim::{self, AdamW};
use crate::{activation, loss, norm, relation, softmax};
use alloc::borrow::Cow;
use alloc::vec::Vec;
use ndarray::{
    ArrayView, ArrayView1, ArrayView2, ArrayView3, ArrayViewMut, ArrayViewMut1, ArrayViewMut2,
    ArrayViewMut3, Dimension,
};

// ---------------------------------------------------------------------------
// The two "standard slice or temporary" helpers, and the shape checks.

/// The elements of `v` in standard order: its own memory when it is
/// standard-layout contiguous, else a copy.
fn input<'a, T: Clone, D: Dimension>(v: ArrayView<'a, T, D>) -> Cow<'a, [T]> {
    match v.to_slice() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(v.iter().cloned().collect()),
    }
}

/// An output view as one standard-order slice: the view's own memory when it
/// is standard-layout contiguous, else a copy of its current contents that is
/// written back into the view when this is dropped.
struct Output<'a, D: Dimension> {
    view: ArrayViewMut<'a, f32, D>,
    copy: Option<Vec<f32>>,
}

impl<'a, D: Dimension> Output<'a, D> {
    fn new(view: ArrayViewMut<'a, f32, D>) -> Self {
        let copy = if view.is_standard_layout() {
            None
        } else {
            Some(view.iter().copied().collect())
        };
        Output { view, copy }
    }

    fn slice(&mut self) -> &mut [f32] {
        match &mut self.copy {
            Some(c) => c.as_mut_slice(),
            // Standard layout, so `as_slice_mut` is `Some`.
            None => self.view.as_slice_mut().unwrap_or_default(),
        }
    }
}

impl<D: Dimension> Drop for Output<'_, D> {
    fn drop(&mut self) {
        if let Some(c) = &self.copy {
            self.view.iter_mut().zip(c).for_each(|(v, &c)| *v = c);
        }
    }
}

/// `got` must equal `want` axis by axis.
fn same_shape(what: &'static str, got: &[usize], want: &[usize]) -> Result<()> {
    check_len(what, got.len(), want.len())?;
    got.iter()
        .zip(want)
        .try_for_each(|(&g, &w)| check_len(what, g, w))
}

/// `got` must be the axes `lead` followed by one axis of length `last`.
fn rows_shape(what: &'static str, got: &[usize], lead: &[usize], last: usize) -> Result<()> {
    check_len(what, got.len(), lead.len() + 1)?;
    same_shape(what, &got[..lead.len()], lead)?;
    check_len(what, got[lead.len()], last)
}

/// The leading (row-indexing) axes of a row kernel's view.
fn lead(shape: &[usize]) -> &[usize] {
    shape.split_last().map_or(&[], |(_, l)| l)
}

/// `(rows, cols)` of a row kernel's view: the last axis is the row, the
/// others index rows (a 0-dimensional view is one row of one element).
fn rows_cols(shape: &[usize]) -> (usize, usize) {
    match shape.split_last() {
        Some((&cols, l)) => (l.iter().fold(1, |a, &b| a.saturating_mul(b)), cols),
        None => (1, 1),
    }
}

// ---------------------------------------------------------------------------
// geometry

/// [`geometry::overlap_grids`] into views of shape `(hs, ws, 2)` (row-major
/// points, `y` outer, `(x, y)` pairs), `hs` and `ws` read from `grid_a`.
/// Returns the overlap, or `Ok(None)` without touching the grids.
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::Array3;
/// use sere_core::geometry::{CropBox, GridPlacement};
/// let a = CropBox::new(0.0, 0.0, 4.0, 4.0, false).unwrap();
/// let b = CropBox::new(2.0, 0.0, 4.0, 4.0, false).unwrap();
/// let (mut ga, mut gb) = (Array3::zeros((1, 1, 2)), Array3::zeros((1, 1, 2)));
/// let r = sere_core::nd::overlap_grids(&a, &b, GridPlacement::CellCentres, ga.view_mut(), gb.view_mut());
/// assert!(r.unwrap().is_some());
/// assert_eq!(ga.as_slice().unwrap(), [0.5, 0.0]);
/// // A (hs, ws, 2) grid is a (points, 2) grid for grid_sample, without a copy.
/// assert_eq!(gb.into_shape_with_order((1, 2)).unwrap().row(0).to_vec(), [-0.5, 0.0]);
/// ```
pub fn overlap_grids(
    a: &CropBox,
    b: &CropBox,
    placement: GridPlacement,
    grid_a: ArrayViewMut3<'_, f32>,
    grid_b: ArrayViewMut3<'_, f32>,
) -> Result<Option<Rect>> {
    let (hs, ws, two) = grid_a.dim();
    check_len("grid_a", two, 2)?;
    same_shape("grid_b", grid_b.shape(), grid_a.shape())?;
    let (mut ga, mut gb) = (Output::new(grid_a), Output::new(grid_b));
    geometry::overlap_grids(a, b, hs, ws, placement, ga.slice(), gb.slice())
}

// ---------------------------------------------------------------------------
// bilinear

/// The sampling problem of a map and a grid view, and the shape of the
/// sampled output.
fn sample_shape(
    (a, b, c): (usize, usize, usize),
    grid: (usize, usize),
    layout: MapLayout,
) -> Result<(SampleShape, [usize; 2])> {
    check_len("grid", grid.1, 2)?;
    let (channels, height, width) = match layout {
        MapLayout::Chw => (a, b, c),
        MapLayout::Hwc => (c, a, b),
    };
    let points = grid.0;
    let out = match layout {
        MapLayout::Chw => [channels, points],
        MapLayout::Hwc => [points, channels],
    };
    let shape = SampleShape {
        channels,
        height,
        width,
        points,
    };
    Ok((shape, out))
}

/// [`bilinear::grid_sample_forward`]: samples `map` (`(channels, height,
/// width)` for [`MapLayout::Chw`], `(height, width, channels)` for
/// [`MapLayout::Hwc`]) at the `(points, 2)` `grid` into `out`
/// (`(channels, points)` or `(points, channels)`; overwritten).
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::{array, Array2};
/// use sere_core::bilinear::MapLayout;
/// let map = array![[[1.0f32, 2.0], [3.0, 4.0]]]; // 1 x 2 x 2
/// let grid = array![[0.0f32, 0.0], [-0.5, -0.5]];
/// let mut out = Array2::zeros((1, 2));
/// sere_core::nd::grid_sample_forward(map.view(), grid.view(), MapLayout::Chw, out.view_mut()).unwrap();
/// assert_eq!(out, array![[2.5, 1.0]]);
/// ```
pub fn grid_sample_forward(
    map: ArrayView3<'_, f32>,
    grid: ArrayView2<'_, f32>,
    layout: MapLayout,
    out: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    let (shape, out_shape) = sample_shape(map.dim(), grid.dim(), layout)?;
    same_shape("out", out.shape(), &out_shape)?;
    let (map, grid) = (input(map), input(grid));
    bilinear::grid_sample_forward(&map, &grid, shape, layout, Output::new(out).slice())
}

/// [`bilinear::grid_sample_backward`]: given `grad_out` (the shape of
/// [`grid_sample_forward`]'s `out`), adds the gradient w.r.t. the map to
/// `grad_map` (the shape of `map`) and, if given, w.r.t. the grid to
/// `grad_grid` (`(points, 2)`).
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::{array, Array2, Array3};
/// use sere_core::bilinear::MapLayout;
/// let map = array![[[1.0f32], [2.0]], [[3.0], [4.0]]]; // 2 x 2 x 1 (Hwc)
/// let (mut gm, mut gg) = (Array3::zeros((2, 2, 1)), Array2::zeros((1, 2)));
/// sere_core::nd::grid_sample_backward(map.view(), array![[0.0f32, 0.0]].view(),
///     array![[1.0f32]].view(), MapLayout::Hwc, gm.view_mut(), Some(gg.view_mut())).unwrap();
/// assert!(gm.iter().all(|&g| g == 0.25));
/// assert_eq!(gg, array![[1.0, 2.0]]);
/// ```
pub fn grid_sample_backward(
    map: ArrayView3<'_, f32>,
    grid: ArrayView2<'_, f32>,
    grad_out: ArrayView2<'_, f32>,
    layout: MapLayout,
    grad_map: ArrayViewMut3<'_, f32>,
    grad_grid: Option<ArrayViewMut2<'_, f32>>,
) -> Result<()> {
    let (shape, out_shape) = sample_shape(map.dim(), grid.dim(), layout)?;
    same_shape("grad_out", grad_out.shape(), &out_shape)?;
    same_shape("grad_map", grad_map.shape(), map.shape())?;
    if let Some(g) = &grad_grid {
        same_shape("grad_grid", g.shape(), grid.shape())?;
    }
    let (map, grid, grad_out) = (input(map), input(grid), input(grad_out));
    let mut gg = grad_grid.map(Output::new);
    bilinear::grid_sample_backward(
        &map,
        &grid,
        &grad_out,
        shape,
        layout,
        Output::new(grad_map).slice(),
        gg.as_mut().map(Output::slice),
    )
}

// ---------------------------------------------------------------------------
// relation

/// The number of heads of spatial logits `(heads, n, n)` of features
/// `(n, c)`.
fn spatial_dims(x: (usize, usize), what: &'static str, logits: &[usize]) -> Result<usize> {
    check_len(what, logits.len(), 3)?;
    same_shape(what, &logits[1..], &[x.0, x.0])?;
    Ok(logits[0])
}

/// [`relation::spatial_relation_forward`]: the per-head logits
/// `X_h X_h^T / sqrt(c / heads)` of features `x` (`(points, channels)`) into
/// `logits` (`(heads, points, points)`; overwritten). The number of heads is
/// `logits`' first axis.
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::{array, Array3};
/// let x = array![[1.0f32, 0.0], [0.0, 1.0]];
/// let mut logits = Array3::zeros((1, 2, 2));
/// sere_core::nd::spatial_relation_forward(x.view(), logits.view_mut()).unwrap();
/// let r = 1.0 / 2f32.sqrt();
/// assert_eq!(logits, array![[[r, 0.0], [0.0, r]]]);
/// ```
pub fn spatial_relation_forward(
    x: ArrayView2<'_, f32>,
    logits: ArrayViewMut3<'_, f32>,
) -> Result<()> {
    let (n, c) = x.dim();
    let heads = spatial_dims((n, c), "logits", logits.shape())?;
    relation::spatial_relation_forward(&input(x), n, c, heads, Output::new(logits).slice())
}

/// [`relation::spatial_relation_backward`]: given `grad_logits`
/// (`(heads, points, points)`), adds the gradient w.r.t. the features to
/// `grad_x` (`(points, channels)`, the shape of `x`).
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::{array, Array2};
/// let x = array![[1.0f32, 2.0]]; // 1 point, 2 channels, 2 heads
/// let mut gx = Array2::zeros((1, 2));
/// sere_core::nd::spatial_relation_backward(x.view(), array![[[1.0f32]], [[1.0]]].view(),
///     gx.view_mut()).unwrap();
/// assert_eq!(gx, array![[2.0, 4.0]]);
/// ```
pub fn spatial_relation_backward(
    x: ArrayView2<'_, f32>,
    grad_logits: ArrayView3<'_, f32>,
    grad_x: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    let (n, c) = x.dim();
    let heads = spatial_dims((n, c), "grad_logits", grad_logits.shape())?;
    same_shape("grad_x", grad_x.shape(), x.shape())?;
    let (x, g) = (input(x), input(grad_logits));
    relation::spatial_relation_backward(&x, &g, n, c, heads, Output::new(grad_x).slice())
}

/// [`relation::channel_relation_forward`]: `X^T X / points` of features `x`
/// (`(points, channels)`) into `logits` (`(channels, channels)`;
/// overwritten).
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::{array, Array2};
/// let x = array![[1.0f32, 2.0], [3.0, 4.0]];
/// let mut logits = Array2::zeros((2, 2));
/// sere_core::nd::channel_relation_forward(x.view(), logits.view_mut()).unwrap();
/// assert_eq!(logits, array![[5.0, 7.0], [7.0, 10.0]]);
/// ```
pub fn channel_relation_forward(
    x: ArrayView2<'_, f32>,
    logits: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    let (n, c) = x.dim();
    same_shape("logits", logits.shape(), &[c, c])?;
    relation::channel_relation_forward(&input(x), n, c, Output::new(logits).slice())
}

/// [`relation::channel_relation_backward`]: given `grad_logits`
/// (`(channels, channels)`), adds the gradient w.r.t. the features to
/// `grad_x` (`(points, channels)`).
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::{array, Array2};
/// let x = array![[1.0f32, 2.0]];
/// let mut gx = Array2::zeros((1, 2));
/// sere_core::nd::channel_relation_backward(x.view(), array![[1.0f32, 0.0], [0.0, 0.0]].view(),
///     gx.view_mut()).unwrap();
/// assert_eq!(gx, array![[2.0, 0.0]]);
/// ```
pub fn channel_relation_backward(
    x: ArrayView2<'_, f32>,
    grad_logits: ArrayView2<'_, f32>,
    grad_x: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    let (n, c) = x.dim();
    same_shape("grad_logits", grad_logits.shape(), &[c, c])?;
    same_shape("grad_x", grad_x.shape(), x.shape())?;
    let (x, g) = (input(x), input(grad_logits));
    relation::channel_relation_backward(&x, &g, n, c, Output::new(grad_x).slice())
}

// ---------------------------------------------------------------------------
// softmax

/// [`softmax::softmax_rows`] over the last axis of `x` into `out` (the shape
/// of `x`; overwritten).
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::{array, Array2};
/// let mut p = Array2::zeros((2, 2));
/// sere_core::nd::softmax_rows(array![[0.0f32, 0.0], [5.0, 5.0]].view(), p.view_mut()).unwrap();
/// assert_eq!(p, array![[0.5, 0.5], [0.5, 0.5]]);
/// ```
pub fn softmax_rows<D: Dimension>(
    x: ArrayView<'_, f32, D>,
    out: ArrayViewMut<'_, f32, D>,
) -> Result<()> {
    same_shape("out", out.shape(), x.shape())?;
    let (rows, cols) = rows_cols(x.shape());
    softmax::softmax_rows(&input(x), rows, cols, Output::new(out).slice())
}

/// [`softmax::softmax_rows_in_place`] over the last axis of `x`.
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::array;
/// let mut a = array![[0.0f32, 0.0], [5.0, 5.0]];
/// sere_core::nd::softmax_rows_in_place(a.view_mut()).unwrap();
/// assert!(a.iter().all(|&p| p == 0.5));
/// ```
pub fn softmax_rows_in_place<D: Dimension>(x: ArrayViewMut<'_, f32, D>) -> Result<()> {
    let (rows, cols) = rows_cols(x.shape());
    softmax::softmax_rows_in_place(Output::new(x).slice(), rows, cols)
}

/// [`softmax::log_softmax_rows`] over the last axis of `x` into `out` (the
/// shape of `x`; overwritten).
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::{array, Array1};
/// let mut l = Array1::zeros(2);
/// sere_core::nd::log_softmax_rows(array![3.0f32, 3.0].view(), l.view_mut()).unwrap();
/// assert!((l[0] + core::f32::consts::LN_2).abs() < 1e-6);
/// ```
pub fn log_softmax_rows<D: Dimension>(
    x: ArrayView<'_, f32, D>,
    out: ArrayViewMut<'_, f32, D>,
) -> Result<()> {
    same_shape("out", out.shape(), x.shape())?;
    let (rows, cols) = rows_cols(x.shape());
    softmax::log_softmax_rows(&input(x), rows, cols, Output::new(out).slice())
}

/// The `(rows, cols)` of three views of one shape.
fn rows3(
    a: &[usize],
    (wb, b): (&'static str, &[usize]),
    (wc, c): (&'static str, &[usize]),
) -> Result<(usize, usize)> {
    same_shape(wb, b, a)?;
    same_shape(wc, c, a)?;
    Ok(rows_cols(a))
}

/// [`softmax::softmax_backward_rows`]: given the softmax output `y` and its
/// gradient `dy`, adds the gradient w.r.t. the logits to `dx` (all of one
/// shape, rows along the last axis).
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::{array, Array1};
/// let mut dx = Array1::zeros(2);
/// sere_core::nd::softmax_backward_rows(array![0.5f32, 0.5].view(), array![1.0f32, 1.0].view(),
///     dx.view_mut()).unwrap();
/// assert_eq!(dx, array![0.0, 0.0]);
/// ```
pub fn softmax_backward_rows<D: Dimension>(
    y: ArrayView<'_, f32, D>,
    dy: ArrayView<'_, f32, D>,
    dx: ArrayViewMut<'_, f32, D>,
) -> Result<()> {
    let (rows, cols) = rows3(y.shape(), ("dy", dy.shape()), ("dx", dx.shape()))?;
    let (y, dy) = (input(y), input(dy));
    softmax::softmax_backward_rows(&y, &dy, rows, cols, Output::new(dx).slice())
}

/// [`softmax::log_softmax_backward_rows`]: given the log-softmax output `l`
/// and its gradient `dl`, adds the gradient w.r.t. the logits to `dx` (all
/// of one shape, rows along the last axis).
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::{array, Array1};
/// let l = Array1::from_elem(2, -core::f32::consts::LN_2);
/// let mut dx = Array1::zeros(2);
/// sere_core::nd::log_softmax_backward_rows(l.view(), array![1.0f32, 0.0].view(),
///     dx.view_mut()).unwrap();
/// assert!((dx[0] - 0.5).abs() < 1e-6 && (dx[1] + 0.5).abs() < 1e-6);
/// ```
pub fn log_softmax_backward_rows<D: Dimension>(
    l: ArrayView<'_, f32, D>,
    dl: ArrayView<'_, f32, D>,
    dx: ArrayViewMut<'_, f32, D>,
) -> Result<()> {
    let (rows, cols) = rows3(l.shape(), ("dl", dl.shape()), ("dx", dx.shape()))?;
    let (l, dl) = (input(l), input(dl));
    softmax::log_softmax_backward_rows(&l, &dl, rows, cols, Output::new(dx).slice())
}

// ---------------------------------------------------------------------------
// loss

/// [`loss::relation_cross_entropy`]: the mean over rows (every row along the
/// last axis, e.g. of `(heads, n, n)` relation logits) of the cross-entropy
/// of the student against the sharpened teacher (the shape of `student`).
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::array;
/// let l = sere_core::nd::relation_cross_entropy(array![[0.0f32, 0.0]].view(),
///     array![[5.0f32, -5.0]].view(), 1.0, 0.1).unwrap();
/// assert!((l - core::f32::consts::LN_2).abs() < 1e-6);
/// ```
pub fn relation_cross_entropy<D: Dimension>(
    student: ArrayView<'_, f32, D>,
    teacher: ArrayView<'_, f32, D>,
    tau_s: f32,
    tau_t: f32,
) -> Result<f32> {
    same_shape("teacher", teacher.shape(), student.shape())?;
    let (rows, cols) = rows_cols(student.shape());
    let (s, t) = (input(student), input(teacher));
    loss::relation_cross_entropy(&s, &t, rows, cols, tau_s, tau_t)
}

/// [`loss::relation_cross_entropy_backward`]: [`relation_cross_entropy`],
/// and adds `scale * dL/dstudent` to `grad_student` (the shape of
/// `student`).
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::{array, Array2};
/// let logits = array![[1.0f32, -2.0, 0.5]];
/// let mut g = Array2::zeros((1, 3));
/// sere_core::nd::relation_cross_entropy_backward(logits.view(), logits.view(), 0.5, 0.5, 1.0,
///     g.view_mut()).unwrap();
/// assert!(g.iter().all(|v| v.abs() < 1e-6));
/// ```
pub fn relation_cross_entropy_backward<D: Dimension>(
    student: ArrayView<'_, f32, D>,
    teacher: ArrayView<'_, f32, D>,
    tau_s: f32,
    tau_t: f32,
    scale: f32,
    grad_student: ArrayViewMut<'_, f32, D>,
) -> Result<f32> {
    let (rows, cols) = rows3(
        student.shape(),
        ("teacher", teacher.shape()),
        ("grad_student", grad_student.shape()),
    )?;
    let (s, t) = (input(student), input(teacher));
    let mut g = Output::new(grad_student);
    loss::relation_cross_entropy_backward(&s, &t, rows, cols, tau_s, tau_t, scale, g.slice())
}

/// [`loss::soft_target_cross_entropy`]: the mean over rows of the
/// cross-entropy of the student against given target probabilities (the
/// shape of `student`); with `grad = Some((g, scale))` it adds
/// `scale * dL/dstudent` to `g` (the shape of `student`).
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::{array, Array1};
/// let mut g = Array1::zeros(2);
/// let l = sere_core::nd::soft_target_cross_entropy(array![0.0f32, 0.0].view(),
///     array![1.0f32, 0.0].view(), 1.0, Some((g.view_mut(), 1.0))).unwrap();
/// assert!((l - core::f32::consts::LN_2).abs() < 1e-6);
/// assert!((g[0] + 0.5).abs() < 1e-6);
/// ```
pub fn soft_target_cross_entropy<D: Dimension>(
    student: ArrayView<'_, f32, D>,
    target: ArrayView<'_, f32, D>,
    tau_s: f32,
    grad: Option<(ArrayViewMut<'_, f32, D>, f32)>,
) -> Result<f32> {
    same_shape("target", target.shape(), student.shape())?;
    if let Some((g, _)) = &grad {
        same_shape("grad_student", g.shape(), student.shape())?;
    }
    let (rows, cols) = rows_cols(student.shape());
    let (s, q) = (input(student), input(target));
    let mut g = grad.map(|(g, scale)| (Output::new(g), scale));
    let g = g.as_mut().map(|(g, scale)| (g.slice(), *scale));
    loss::soft_target_cross_entropy(&s, &q, rows, cols, tau_s, g)
}

/// The [`loss::DinoShape`] of `(student_views, batch, dim)` and
/// `(teacher_views, batch, dim)` views and a `(dim)` centre.
fn dino_shape(
    student: (usize, usize, usize),
    teacher: (usize, usize, usize),
    centre: usize,
) -> Result<loss::DinoShape> {
    let (student_views, batch, dim) = student;
    check_len("teacher", teacher.1, batch)?;
    check_len("teacher", teacher.2, dim)?;
    check_len("centre", centre, dim)?;
    Ok(loss::DinoShape {
        student_views,
        teacher_views: teacher.0,
        batch,
        dim,
    })
}

/// [`loss::dino_loss`] of `student` (`(student_views, batch, dim)`) against
/// `teacher` (`(teacher_views, batch, dim)`, the first student views) with
/// the centre (`(dim)`).
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::{array, Array1, Array3};
/// let s = Array3::<f32>::zeros((2, 1, 2));
/// let t = array![[[1.0f32, 0.0]], [[0.0, 1.0]]];
/// let l = sere_core::nd::dino_loss(s.view(), t.view(), Array1::zeros(2).view(), 0.1, 0.04).unwrap();
/// assert!((l - core::f32::consts::LN_2).abs() < 1e-6);
/// ```
pub fn dino_loss(
    student: ArrayView3<'_, f32>,
    teacher: ArrayView3<'_, f32>,
    centre: ArrayView1<'_, f32>,
    tau_s: f32,
    tau_t: f32,
) -> Result<f32> {
    let shape = dino_shape(student.dim(), teacher.dim(), centre.len())?;
    let (s, t, c) = (input(student), input(teacher), input(centre));
    loss::dino_loss(&s, &t, &c, shape, tau_s, tau_t)
}

/// [`loss::dino_loss_backward`]: [`dino_loss`], and adds
/// `scale * dL/dstudent` to `grad_student` (the shape of `student`).
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::{Array1, Array3};
/// let (s, t) = (Array3::from_elem((3, 2, 4), 0.1f32), Array3::from_elem((2, 2, 4), 0.2f32));
/// let mut g = Array3::zeros((3, 2, 4));
/// sere_core::nd::dino_loss_backward(s.view(), t.view(), Array1::zeros(4).view(), 0.1, 0.04, 1.0,
///     g.view_mut()).unwrap();
/// assert!(g.iter().all(|v| v.abs() < 1e-6));
/// ```
pub fn dino_loss_backward(
    student: ArrayView3<'_, f32>,
    teacher: ArrayView3<'_, f32>,
    centre: ArrayView1<'_, f32>,
    tau_s: f32,
    tau_t: f32,
    scale: f32,
    grad_student: ArrayViewMut3<'_, f32>,
) -> Result<f32> {
    let shape = dino_shape(student.dim(), teacher.dim(), centre.len())?;
    same_shape("grad_student", grad_student.shape(), student.shape())?;
    let (s, t, c) = (input(student), input(teacher), input(centre));
    let mut g = Output::new(grad_student);
    loss::dino_loss_backward(&s, &t, &c, shape, tau_s, tau_t, scale, g.slice())
}

/// [`loss::dino_centre_update`]: the EMA of `centre` (`(dim)`) towards the
/// mean over rows of the teacher outputs (rows along the last axis, e.g.
/// `(teacher_views, batch, dim)`).
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::array;
/// let mut c = array![1.0f32, 1.0];
/// sere_core::nd::dino_centre_update(array![[0.0f32, 2.0], [2.0, 4.0]].view(), 0.9, c.view_mut())
///     .unwrap();
/// assert!((c[0] - 1.0).abs() < 1e-6 && (c[1] - 1.2).abs() < 1e-6);
/// ```
pub fn dino_centre_update<D: Dimension>(
    teacher: ArrayView<'_, f32, D>,
    momentum: f32,
    centre: ArrayViewMut1<'_, f32>,
) -> Result<()> {
    let (rows, dim) = rows_cols(teacher.shape());
    check_len("centre", centre.len(), dim)?;
    loss::dino_centre_update(
        &input(teacher),
        rows,
        dim,
        momentum,
        Output::new(centre).slice(),
    )
}

/// [`loss::teacher_entropy`]: the mean entropy of the centred, sharpened
/// teacher distribution over the rows of `teacher` (rows along the last
/// axis), with the centre (`(dim)`).
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::{Array1, Array2};
/// let t = Array2::<f32>::ones((3, 4));
/// let h = sere_core::nd::teacher_entropy(t.view(), Array1::zeros(4).view(), 0.04).unwrap();
/// assert!((h - 4.0f32.ln()).abs() < 1e-6);
/// ```
pub fn teacher_entropy<D: Dimension>(
    teacher: ArrayView<'_, f32, D>,
    centre: ArrayView1<'_, f32>,
    tau_t: f32,
) -> Result<f32> {
    let (rows, dim) = rows_cols(teacher.shape());
    check_len("centre", centre.len(), dim)?;
    let (t, c) = (input(teacher), input(centre));
    loss::teacher_entropy(&t, &c, rows, dim, tau_t)
}

/// [`loss::masked_patch_weights`]: iBOT's weights for `masks` of shape
/// `(images, patches)` (or any shape whose last axis is the patches of one
/// image) into `out` (the shape of `masks`; overwritten).
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::{array, Array2};
/// let masks = array![[true, false, true], [false, false, false]];
/// let mut w = Array2::zeros((2, 3));
/// sere_core::nd::masked_patch_weights(masks.view(), w.view_mut()).unwrap();
/// assert_eq!(w, array![[0.25, 0.0, 0.25], [0.0, 0.0, 0.0]]);
/// ```
pub fn masked_patch_weights<D: Dimension>(
    masks: ArrayView<'_, bool, D>,
    out: ArrayViewMut<'_, f32, D>,
) -> Result<()> {
    same_shape("weights", out.shape(), masks.shape())?;
    let (_, patches) = rows_cols(masks.shape());
    loss::masked_patch_weights(&input(masks), patches, Output::new(out).slice())
}

/// [`loss::weighted_cross_entropy`]: the weighted sum over rows (along the
/// last axis of `student` and `teacher`, e.g. `(images, patches, dim)`) of
/// the centred cross-entropy, with the centre (`(dim)`) and one weight per
/// row (`weights` has `student`'s leading axes, e.g. `(images, patches)` from
/// [`masked_patch_weights`]). With `grad = Some((g, scale))` it adds
/// `scale * dL/dstudent` to `g` (the shape of `student`).
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::{array, Array1, Array2};
/// let (s, t) = (Array2::<f32>::zeros((2, 2)), array![[9.0f32, 0.0], [0.0, 9.0]]);
/// let l = sere_core::nd::weighted_cross_entropy(s.view(), t.view(), Array1::zeros(2).view(),
///     array![0.5f32, 0.0].view(), 0.1, 0.04, None).unwrap();
/// assert!((l - 0.5 * core::f32::consts::LN_2).abs() < 1e-6);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn weighted_cross_entropy<D: Dimension>(
    student: ArrayView<'_, f32, D>,
    teacher: ArrayView<'_, f32, D>,
    centre: ArrayView1<'_, f32>,
    weights: ArrayView<'_, f32, D::Smaller>,
    tau_s: f32,
    tau_t: f32,
    grad: Option<(ArrayViewMut<'_, f32, D>, f32)>,
) -> Result<f32> {
    same_shape("teacher", teacher.shape(), student.shape())?;
    same_shape("weights", weights.shape(), lead(student.shape()))?;
    if let Some((g, _)) = &grad {
        same_shape("grad_student", g.shape(), student.shape())?;
    }
    let (rows, dim) = rows_cols(student.shape());
    check_len("centre", centre.len(), dim)?;
    let (s, t) = (input(student), input(teacher));
    let (c, w) = (input(centre), input(weights));
    let mut g = grad.map(|(g, scale)| (Output::new(g), scale));
    let g = g.as_mut().map(|(g, scale)| (g.slice(), *scale));
    loss::weighted_cross_entropy(&s, &t, &c, &w, rows, dim, tau_s, tau_t, g)
}

// ---------------------------------------------------------------------------
// norm

/// Checks per-column vectors (`(cols)`) against `cols`.
fn columns(cols: usize, vectors: &[(&'static str, usize)]) -> Result<()> {
    vectors
        .iter()
        .try_for_each(|&(what, len)| check_len(what, len, cols))
}

/// [`norm::layer_norm_forward`] over the last axis of `x` into `out` (the
/// shape of `x`; overwritten), with `gamma` and `beta` (`(cols)`); saves
/// `mean` and `rstd` (`x`'s leading axes) for the backward.
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::{array, Array1, Array2};
/// let (mut y, mut mean, mut rstd) = (Array2::zeros((1, 2)), Array1::zeros(1), Array1::zeros(1));
/// sere_core::nd::layer_norm_forward(array![[1.0f32, 3.0]].view(), array![1.0f32, 1.0].view(),
///     array![0.0f32, 0.0].view(), 0.0, y.view_mut(), mean.view_mut(), rstd.view_mut()).unwrap();
/// assert_eq!((y, mean[0], rstd[0]), (array![[-1.0, 1.0]], 2.0, 1.0));
/// ```
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_forward<D: Dimension>(
    x: ArrayView<'_, f32, D>,
    gamma: ArrayView1<'_, f32>,
    beta: ArrayView1<'_, f32>,
    eps: f32,
    out: ArrayViewMut<'_, f32, D>,
    mean: ArrayViewMut<'_, f32, D::Smaller>,
    rstd: ArrayViewMut<'_, f32, D::Smaller>,
) -> Result<()> {
    let (rows, cols) = rows_cols(x.shape());
    columns(cols, &[("gamma", gamma.len()), ("beta", beta.len())])?;
    same_shape("out", out.shape(), x.shape())?;
    same_shape("mean", mean.shape(), lead(x.shape()))?;
    same_shape("rstd", rstd.shape(), lead(x.shape()))?;
    let (x, g, b) = (input(x), input(gamma), input(beta));
    let (mut o, mut m, mut r) = (Output::new(out), Output::new(mean), Output::new(rstd));
    norm::layer_norm_forward(&x, &g, &b, rows, cols, eps, o.slice(), m.slice(), r.slice())
}

/// [`norm::layer_norm_backward`]: given `dy` (the shape of `x`), adds to `dx`
/// (the shape of `x`), `dgamma` and `dbeta` (`(cols)`); `mean` and `rstd` are
/// [`layer_norm_forward`]'s (`x`'s leading axes).
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::{array, Array1, Array2};
/// let (mut dx, mut dg, mut db) = (Array2::zeros((1, 2)), Array1::zeros(2), Array1::zeros(2));
/// sere_core::nd::layer_norm_backward(array![[1.0f32, 3.0]].view(), array![1.0f32, 1.0].view(),
///     array![2.0f32].view(), array![1.0f32].view(), array![[1.0f32, 1.0]].view(),
///     dx.view_mut(), dg.view_mut(), db.view_mut()).unwrap();
/// assert_eq!((dx, db), (array![[0.0, 0.0]], array![1.0, 1.0]));
/// ```
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward<D: Dimension>(
    x: ArrayView<'_, f32, D>,
    gamma: ArrayView1<'_, f32>,
    mean: ArrayView<'_, f32, D::Smaller>,
    rstd: ArrayView<'_, f32, D::Smaller>,
    dy: ArrayView<'_, f32, D>,
    dx: ArrayViewMut<'_, f32, D>,
    dgamma: ArrayViewMut1<'_, f32>,
    dbeta: ArrayViewMut1<'_, f32>,
) -> Result<()> {
    let (rows, cols) = rows3(x.shape(), ("dy", dy.shape()), ("dx", dx.shape()))?;
    let vectors = [
        ("gamma", gamma.len()),
        ("dgamma", dgamma.len()),
        ("dbeta", dbeta.len()),
    ];
    columns(cols, &vectors)?;
    same_shape("mean", mean.shape(), lead(x.shape()))?;
    same_shape("rstd", rstd.shape(), lead(x.shape()))?;
    let (x, g, m, r, dy) = (input(x), input(gamma), input(mean), input(rstd), input(dy));
    let (mut dx, mut dg, mut db) = (Output::new(dx), Output::new(dgamma), Output::new(dbeta));
    let (dx, dg, db) = (dx.slice(), dg.slice(), db.slice());
    norm::layer_norm_backward(&x, &g, &m, &r, &dy, rows, cols, dx, dg, db)
}

/// [`norm::batch_norm_stats`]: the mean and biased variance (`(cols)`) of
/// every column of `x` (the last axis; the leading axes index samples).
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::{array, Array1};
/// let (mut m, mut v) = (Array1::zeros(2), Array1::zeros(2));
/// sere_core::nd::batch_norm_stats(array![[1.0f32, 10.0], [3.0, 10.0]].view(), m.view_mut(),
///     v.view_mut()).unwrap();
/// assert_eq!((m, v), (array![2.0, 10.0], array![1.0, 0.0]));
/// ```
pub fn batch_norm_stats<D: Dimension>(
    x: ArrayView<'_, f32, D>,
    mean: ArrayViewMut1<'_, f32>,
    var: ArrayViewMut1<'_, f32>,
) -> Result<()> {
    let (rows, cols) = rows_cols(x.shape());
    columns(cols, &[("mean", mean.len()), ("var", var.len())])?;
    let (mut m, mut v) = (Output::new(mean), Output::new(var));
    norm::batch_norm_stats(&input(x), rows, cols, m.slice(), v.slice())
}

/// [`norm::batch_norm_forward`] (train mode): normalises every column of `x`
/// (the last axis) into `out` (the shape of `x`; overwritten) with `gamma`
/// and `beta`, and writes the batch `mean`, `var` and `rstd` (all `(cols)`).
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::{array, Array1, Array2};
/// let (mut y, mut m, mut v, mut r) =
///     (Array2::zeros((2, 1)), Array1::zeros(1), Array1::zeros(1), Array1::zeros(1));
/// sere_core::nd::batch_norm_forward(array![[1.0f32], [3.0]].view(), array![1.0f32].view(),
///     array![0.0f32].view(), 0.0, y.view_mut(), m.view_mut(), v.view_mut(), r.view_mut())
///     .unwrap();
/// assert_eq!(y, array![[-1.0], [1.0]]);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_forward<D: Dimension>(
    x: ArrayView<'_, f32, D>,
    gamma: ArrayView1<'_, f32>,
    beta: ArrayView1<'_, f32>,
    eps: f32,
    out: ArrayViewMut<'_, f32, D>,
    mean: ArrayViewMut1<'_, f32>,
    var: ArrayViewMut1<'_, f32>,
    rstd: ArrayViewMut1<'_, f32>,
) -> Result<()> {
    let (rows, cols) = rows_cols(x.shape());
    let vectors = [
        ("gamma", gamma.len()),
        ("beta", beta.len()),
        ("mean", mean.len()),
        ("var", var.len()),
        ("rstd", rstd.len()),
    ];
    columns(cols, &vectors)?;
    same_shape("out", out.shape(), x.shape())?;
    let (x, g, b) = (input(x), input(gamma), input(beta));
    let (mut o, mut m) = (Output::new(out), Output::new(mean));
    let (mut v, mut r) = (Output::new(var), Output::new(rstd));
    let (o, m, v, r) = (o.slice(), m.slice(), v.slice(), r.slice());
    norm::batch_norm_forward(&x, &g, &b, rows, cols, eps, o, m, v, r)
}

/// [`norm::batch_norm_eval`]: normalises every column of `x` (the last axis)
/// with the running statistics into `out` (the shape of `x`; overwritten);
/// `gamma`, `beta`, `running_mean` and `running_var` are `(cols)`.
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::{array, Array2};
/// let mut y = Array2::zeros((2, 1));
/// sere_core::nd::batch_norm_eval(array![[1.0f32], [3.0]].view(), array![2.0f32].view(),
///     array![0.5f32].view(), array![1.0f32].view(), array![4.0f32].view(), 0.0, y.view_mut())
///     .unwrap();
/// assert_eq!(y, array![[0.5], [2.5]]);
/// ```
pub fn batch_norm_eval<D: Dimension>(
    x: ArrayView<'_, f32, D>,
    gamma: ArrayView1<'_, f32>,
    beta: ArrayView1<'_, f32>,
    running_mean: ArrayView1<'_, f32>,
    running_var: ArrayView1<'_, f32>,
    eps: f32,
    out: ArrayViewMut<'_, f32, D>,
) -> Result<()> {
    let (rows, cols) = rows_cols(x.shape());
    let vectors = [
        ("gamma", gamma.len()),
        ("beta", beta.len()),
        ("running_mean", running_mean.len()),
        ("running_var", running_var.len()),
    ];
    columns(cols, &vectors)?;
    same_shape("out", out.shape(), x.shape())?;
    let (x, g, b) = (input(x), input(gamma), input(beta));
    let (rm, rv) = (input(running_mean), input(running_var));
    let mut o = Output::new(out);
    norm::batch_norm_eval(&x, &g, &b, &rm, &rv, rows, cols, eps, o.slice())
}

/// [`norm::batch_norm_update_running`]: PyTorch's running-statistics update
/// from a train-mode batch of `rows` samples (a count, not a view: the batch
/// is gone by now) with its `mean` and `var`; all four vectors are `(cols)`.
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::array;
/// let (mut rm, mut rv) = (array![0.0f32], array![1.0f32]);
/// sere_core::nd::batch_norm_update_running(array![2.0f32].view(), array![1.0f32].view(), 2, 0.5,
///     rm.view_mut(), rv.view_mut()).unwrap();
/// assert_eq!((rm[0], rv[0]), (1.0, 1.5));
/// ```
pub fn batch_norm_update_running(
    mean: ArrayView1<'_, f32>,
    var: ArrayView1<'_, f32>,
    rows: usize,
    momentum: f32,
    running_mean: ArrayViewMut1<'_, f32>,
    running_var: ArrayViewMut1<'_, f32>,
) -> Result<()> {
    let vectors = [
        ("var", var.len()),
        ("running_mean", running_mean.len()),
        ("running_var", running_var.len()),
    ];
    columns(mean.len(), &vectors)?;
    let (m, v) = (input(mean), input(var));
    let (mut rm, mut rv) = (Output::new(running_mean), Output::new(running_var));
    norm::batch_norm_update_running(&m, &v, rows, momentum, rm.slice(), rv.slice())
}

/// [`norm::batch_norm_backward`]: given `dy` (the shape of `x`), adds to `dx`
/// (the shape of `x`), `dgamma` and `dbeta` (`(cols)`); `mean` and `rstd`
/// are [`batch_norm_forward`]'s (`(cols)`) and `scratch` (`(2 * cols)`) is
/// workspace whose contents are ignored.
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::{array, Array1, Array2};
/// let (mut dx, mut dg, mut db, mut s) =
///     (Array2::zeros((2, 1)), Array1::zeros(1), Array1::zeros(1), Array1::zeros(2));
/// sere_core::nd::batch_norm_backward(array![[1.0f32], [3.0]].view(), array![1.0f32].view(),
///     array![2.0f32].view(), array![1.0f32].view(), array![[1.0f32], [1.0]].view(),
///     dx.view_mut(), dg.view_mut(), db.view_mut(), s.view_mut()).unwrap();
/// assert_eq!((dx, db[0]), (array![[0.0], [0.0]], 2.0));
/// ```
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_backward<D: Dimension>(
    x: ArrayView<'_, f32, D>,
    gamma: ArrayView1<'_, f32>,
    mean: ArrayView1<'_, f32>,
    rstd: ArrayView1<'_, f32>,
    dy: ArrayView<'_, f32, D>,
    dx: ArrayViewMut<'_, f32, D>,
    dgamma: ArrayViewMut1<'_, f32>,
    dbeta: ArrayViewMut1<'_, f32>,
    scratch: ArrayViewMut1<'_, f32>,
) -> Result<()> {
    let (rows, cols) = rows3(x.shape(), ("dy", dy.shape()), ("dx", dx.shape()))?;
    let vectors = [
        ("gamma", gamma.len()),
        ("mean", mean.len()),
        ("rstd", rstd.len()),
        ("dgamma", dgamma.len()),
        ("dbeta", dbeta.len()),
    ];
    columns(cols, &vectors)?;
    check_len("scratch", scratch.len(), cols.saturating_mul(2))?;
    let (x, g, m, r, dy) = (input(x), input(gamma), input(mean), input(rstd), input(dy));
    let (mut dx, mut dg) = (Output::new(dx), Output::new(dgamma));
    let (mut db, mut s) = (Output::new(dbeta), Output::new(scratch));
    let (dx, dg, db, s) = (dx.slice(), dg.slice(), db.slice(), s.slice());
    norm::batch_norm_backward(&x, &g, &m, &r, &dy, rows, cols, dx, dg, db, s)
}

// ---------------------------------------------------------------------------
// activation

/// [`activation::gelu_forward`]: `out = gelu(x)` element-wise (`out` has the
/// shape of `x`; overwritten).
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::{array, Array1};
/// let mut y = Array1::zeros(2);
/// sere_core::nd::gelu_forward(array![0.0f32, 10.0].view(), y.view_mut()).unwrap();
/// assert_eq!(y, array![0.0, 10.0]);
/// ```
pub fn gelu_forward<D: Dimension>(
    x: ArrayView<'_, f32, D>,
    out: ArrayViewMut<'_, f32, D>,
) -> Result<()> {
    same_shape("out", out.shape(), x.shape())?;
    activation::gelu_forward(&input(x), Output::new(out).slice())
}

/// [`activation::gelu_backward`]: adds `dy * gelu'(x)` to `dx` (all of one
/// shape).
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::array;
/// let mut dx = array![1.0f32];
/// sere_core::nd::gelu_backward(array![0.0f32].view(), array![2.0f32].view(), dx.view_mut())
///     .unwrap();
/// assert!((dx[0] - 2.0).abs() < 1e-6);
/// ```
pub fn gelu_backward<D: Dimension>(
    x: ArrayView<'_, f32, D>,
    dy: ArrayView<'_, f32, D>,
    dx: ArrayViewMut<'_, f32, D>,
) -> Result<()> {
    rows3(x.shape(), ("dy", dy.shape()), ("dx", dx.shape()))?;
    let (x, dy) = (input(x), input(dy));
    activation::gelu_backward(&x, &dy, Output::new(dx).slice())
}

/// [`activation::gelu_grad_in_place`]: `d *= gelu'(x)` element-wise (`d`
/// has the shape of `x`).
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::array;
/// let mut d = array![2.0f32];
/// sere_core::nd::gelu_grad_in_place(array![0.0f32].view(), d.view_mut()).unwrap();
/// assert!((d[0] - 1.0).abs() < 1e-6);
/// ```
pub fn gelu_grad_in_place<D: Dimension>(
    x: ArrayView<'_, f32, D>,
    d: ArrayViewMut<'_, f32, D>,
) -> Result<()> {
    same_shape("d", d.shape(), x.shape())?;
    activation::gelu_grad_in_place(&input(x), Output::new(d).slice())
}

// ---------------------------------------------------------------------------
// linalg

/// The [`MatRef`] of a view contiguous in memory with non-negative strides,
/// inside the slice of its memory (which then starts at element `(0, 0)`).
fn strided(dim: (usize, usize), strides: &[isize]) -> Option<MatRef> {
    match *strides {
        [rs, cs] if rs >= 0 && cs >= 0 => Some(MatRef {
            offset: 0,
            rows: dim.0,
            cols: dim.1,
            row_stride: rs as usize,
            col_stride: cs as usize,
        }),
        _ => None,
    }
}

/// A matrix view as a slice and its [`MatRef`]: in place when contiguous in
/// memory with non-negative strides, else a standard-layout copy.
fn matrix(v: ArrayView2<'_, f32>) -> (Cow<'_, [f32]>, MatRef) {
    match (v.to_slice_memory_order(), strided(v.dim(), v.strides())) {
        (Some(s), Some(m)) => (Cow::Borrowed(s), m),
        _ => {
            let m = MatRef::row_major(v.nrows(), v.ncols());
            (input(v), m)
        }
    }
}

/// [`linalg::gemm`]: `c = alpha * a b + beta * c` with `a` `(m, k)`, `b`
/// `(k, n)` and `c` `(m, n)`. Views contiguous in memory with non-negative
/// strides (standard layout, or a transpose of one) are used in place
/// through strided [`MatRef`]s; others are copied
/// ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
/// Mismatched inner dimensions are the kernel's
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument).
///
/// ```
/// use ndarray::{array, Array2};
/// let a = array![[1.0f32, 2.0], [3.0, 4.0]];
/// let mut c = Array2::zeros((2, 2));
/// // a^T a, the transpose read in place.
/// sere_core::nd::gemm(1.0, a.t(), a.view(), 0.0, c.view_mut()).unwrap();
/// assert_eq!(c, array![[10.0, 14.0], [14.0, 20.0]]);
/// ```
pub fn gemm(
    alpha: f32,
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    beta: f32,
    mut c: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    let ((a, am), (b, bm)) = (matrix(a), matrix(b));
    if let Some(cm) = strided(c.dim(), c.strides()) {
        if let Some(cs) = c.as_slice_memory_order_mut() {
            return linalg::gemm(alpha, &a, am, &b, bm, beta, cs, cm);
        }
    }
    let cm = MatRef::row_major(c.nrows(), c.ncols());
    linalg::gemm(alpha, &a, am, &b, bm, beta, Output::new(c).slice(), cm)
}

/// `(rows, inp, out)` of a linear layer's `x` (rows along the last axis) and
/// `weight` (`(out, inp)`).
fn linear_dims(x: &[usize], weight: (usize, usize)) -> Result<(usize, usize, usize)> {
    let (rows, inp) = rows_cols(x);
    check_len("weight", weight.1, inp)?;
    Ok((rows, inp, weight.0))
}

/// [`linalg::linear_forward`]: `y = x W^T + b` with `x` `(.., inp)` (leading
/// axes index rows, e.g. `(batch, tokens, inp)`), `weight` `(out, inp)`,
/// `bias` `(out)` and `y` `(.., out)` (`x`'s leading axes; overwritten).
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::{array, Array2};
/// let w = array![[1.0f32, 1.0], [0.0, 2.0]];
/// let mut y = Array2::zeros((1, 2));
/// sere_core::nd::linear_forward(array![[3.0f32, 4.0]].view(), w.view(),
///     Some(array![0.5f32, 0.0].view()), y.view_mut()).unwrap();
/// assert_eq!(y, array![[7.5, 8.0]]);
/// ```
pub fn linear_forward<D: Dimension>(
    x: ArrayView<'_, f32, D>,
    weight: ArrayView2<'_, f32>,
    bias: Option<ArrayView1<'_, f32>>,
    y: ArrayViewMut<'_, f32, D>,
) -> Result<()> {
    let (rows, inp, out) = linear_dims(x.shape(), weight.dim())?;
    if let Some(b) = &bias {
        check_len("bias", b.len(), out)?;
    }
    rows_shape("y", y.shape(), lead(x.shape()), out)?;
    let (x, w, b) = (input(x), input(weight), bias.map(input));
    let mut y = Output::new(y);
    linalg::linear_forward(&x, &w, b.as_deref(), rows, inp, out, y.slice())
}

/// [`linalg::linear_backward`]: given `dy` (`x`'s leading axes, then
/// `out`), adds `dy W` to `dx` (the shape of `x`), `dy^T x` to `dweight`
/// (`(out, inp)`) and the column sums of `dy` to `dbias` (`(out)`); `None`
/// skips a gradient.
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::{array, Array1, Array2};
/// let (x, w) = (array![[3.0f32, 4.0]], array![[1.0f32, 1.0], [0.0, 2.0]]);
/// let (mut dx, mut dw, mut db) = (Array2::zeros((1, 2)), Array2::zeros((2, 2)), Array1::zeros(2));
/// sere_core::nd::linear_backward(x.view(), w.view(), array![[1.0f32, 0.0]].view(),
///     Some(dx.view_mut()), Some(dw.view_mut()), Some(db.view_mut())).unwrap();
/// assert_eq!((dx, dw, db), (array![[1.0, 1.0]], array![[3.0, 4.0], [0.0, 0.0]], array![1.0, 0.0]));
/// ```
pub fn linear_backward<D: Dimension>(
    x: ArrayView<'_, f32, D>,
    weight: ArrayView2<'_, f32>,
    dy: ArrayView<'_, f32, D>,
    dx: Option<ArrayViewMut<'_, f32, D>>,
    dweight: Option<ArrayViewMut2<'_, f32>>,
    dbias: Option<ArrayViewMut1<'_, f32>>,
) -> Result<()> {
    let (rows, inp, out) = linear_dims(x.shape(), weight.dim())?;
    rows_shape("dy", dy.shape(), lead(x.shape()), out)?;
    if let Some(d) = &dx {
        same_shape("dx", d.shape(), x.shape())?;
    }
    if let Some(d) = &dweight {
        same_shape("dweight", d.shape(), weight.shape())?;
    }
    if let Some(d) = &dbias {
        check_len("dbias", d.len(), out)?;
    }
    let (x, w, dy) = (input(x), input(weight), input(dy));
    let mut dx = dx.map(Output::new);
    let (mut dw, mut db) = (dweight.map(Output::new), dbias.map(Output::new));
    let dx = dx.as_mut().map(Output::slice);
    let (dw, db) = (
        dw.as_mut().map(Output::slice),
        db.as_mut().map(Output::slice),
    );
    linalg::linear_backward(&x, &w, &dy, rows, inp, out, dx, dw, db)
}

// ---------------------------------------------------------------------------
// optim

/// [`optim::adamw_step`]: one AdamW step (the `step`-th, from 1) on
/// `params` with `grads` and the moments `m` and `v` (all of one shape).
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::array;
/// use sere_core::optim::AdamW;
/// let (mut p, mut m, mut v) = (array![1.0f32], array![0.0f32], array![0.0f32]);
/// let opt = AdamW { lr: 0.1, weight_decay: 0.0, ..AdamW::default() };
/// sere_core::nd::adamw_step(p.view_mut(), array![0.5f32].view(), m.view_mut(), v.view_mut(),
///     &opt, 1).unwrap();
/// assert!((p[0] - 0.9).abs() < 1e-6);
/// ```
pub fn adamw_step<D: Dimension>(
    params: ArrayViewMut<'_, f32, D>,
    grads: ArrayView<'_, f32, D>,
    m: ArrayViewMut<'_, f32, D>,
    v: ArrayViewMut<'_, f32, D>,
    opt: &AdamW,
    step: u32,
) -> Result<()> {
    rows3(params.shape(), ("grads", grads.shape()), ("m", m.shape()))?;
    same_shape("v", v.shape(), params.shape())?;
    let grads = input(grads);
    let (mut p, mut m, mut v) = (Output::new(params), Output::new(m), Output::new(v));
    optim::adamw_step(p.slice(), &grads, m.slice(), v.slice(), opt, step)
}

/// [`optim::ema_update`]: `teacher = momentum * teacher + (1 - momentum) *
/// student` (both of one shape).
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::array;
/// let mut t = array![[1.0f32, 0.0]];
/// sere_core::nd::ema_update(t.view_mut(), array![[0.0f32, 1.0]].view(), 0.75).unwrap();
/// assert_eq!(t, array![[0.75, 0.25]]);
/// ```
pub fn ema_update<D: Dimension>(
    teacher: ArrayViewMut<'_, f32, D>,
    student: ArrayView<'_, f32, D>,
    momentum: f32,
) -> Result<()> {
    same_shape("student", student.shape(), teacher.shape())?;
    let student = input(student);
    optim::ema_update(Output::new(teacher).slice(), &student, momentum)
}

/// [`optim::l2_norm`]: the Euclidean norm of all elements of `x`,
/// accumulated in `f64` in standard order.
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::array;
/// assert_eq!(sere_core::nd::l2_norm(array![[3.0f32], [4.0]].view()), 5.0);
/// ```
pub fn l2_norm<D: Dimension>(x: ArrayView<'_, f32, D>) -> f32 {
    optim::l2_norm(&input(x))
}

/// [`optim::clip_grad_norm`]: scales `grads` to norm `max_norm` if it is
/// larger (DINO's clipping) and returns the norm before clipping.
/// Zero-copy for standard-layout views ([layouts](crate::nd#layouts-zero-copy-for-standard-layout-views)).
///
/// ```
/// use ndarray::array;
/// let mut g = array![3.0f32, 4.0];
/// assert_eq!(sere_core::nd::clip_grad_norm(g.view_mut(), 1.0).unwrap(), 5.0);
/// assert!((g[0] - 0.6).abs() < 1e-6);
/// ```
pub fn clip_grad_norm<D: Dimension>(grads: ArrayViewMut<'_, f32, D>, max_norm: f32) -> Result<f32> {
    optim::clip_grad_norm(Output::new(grads).slice(), max_norm)
}
