#![cfg(feature = "ndarray")]
//! The `nd` wrappers (feature `ndarray`) against the slice kernels they
//! wrap: on every layout (standard, transposed storage, rows with a step,
//! a reversed last axis) of every input and output, each wrapper returns
//! what the kernel returns and leaves in its outputs what the kernel leaves
//! in standard-layout buffers, bit for bit (the same kernel runs on the same
//! numbers). Outputs start from random contents, so the accumulation of the
//! backward functions is checked too, and the parent elements outside a
//! stepped output view must keep their junk. Mismatched shapes are errors,
//! never panics.
//!
//! `cargo test -p sere-core --features ndarray`.

use ndarray::{
    Array, Array1, Array2, Array3, ArrayView, ArrayViewMut, Axis, Dimension, IntoDimension, IxDyn,
    Slice,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use sere_core::bilinear::{MapLayout, SampleShape};
use sere_core::geometry::{CropBox, GridPlacement};
use sere_core::linalg::MatRef;
use sere_core::loss::DinoShape;
use sere_core::optim::AdamW;
use sere_core::{activation, bilinear, geometry, linalg, loss, nd, norm, optim, relation, softmax};
use sere_core::{Error, Result};

/// 1024 cases per property (as in `properties.rs`; the arrays are tiny),
/// unless `PROPTEST_CASES` says otherwise.
fn config() -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = 1024;
    }
    c
}

/// What the parent array holds outside a stepped view.
const JUNK: f32 = -777.25;

/// How a test stores an array that a view then shows in logical order.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    /// The array itself: standard layout, the zero-copy path.
    Standard,
    /// Stored with its axes reversed, read through `.reversed_axes()` (`.t()`
    /// in 2-D): contiguous in memory, not in standard order.
    Transposed,
    /// Every other row (`s![..;2, ..]`) of a parent twice as tall whose
    /// other rows hold junk.
    Stepped,
    /// Stored with its last axis reversed, read through `s![.., ..;-1]`:
    /// negative strides.
    Flipped,
}

fn layouts() -> impl Strategy<Value = [Layout; 8]> {
    prop::array::uniform8(prop_oneof![
        Just(Layout::Standard),
        Just(Layout::Transposed),
        Just(Layout::Stepped),
        Just(Layout::Flipped),
    ])
}

fn every_other_row() -> Slice {
    Slice::new(0, None, 2)
}

fn reversed() -> Slice {
    Slice::new(0, None, -1)
}

/// An array stored so that [`Held::view`] shows `logical` through a layout.
struct Held<T, D: Dimension> {
    parent: Array<T, D>,
    layout: Layout,
    junk: T,
}

impl<T: Clone + PartialEq, D: Dimension> Held<T, D> {
    fn new(logical: &Array<T, D>, layout: Layout, junk: T) -> Self {
        let layout = if logical.ndim() == 0 {
            Layout::Standard
        } else {
            layout
        };
        let parent = match layout {
            Layout::Standard => logical.as_standard_layout().into_owned(),
            Layout::Transposed => logical
                .view()
                .reversed_axes()
                .as_standard_layout()
                .into_owned(),
            Layout::Stepped => {
                let mut dim = logical.raw_dim();
                dim[0] *= 2;
                let mut p = Array::from_elem(dim, junk.clone());
                p.slice_axis_mut(Axis(0), every_other_row()).assign(logical);
                p
            }
            Layout::Flipped => logical
                .slice_axis(Axis(logical.ndim() - 1), reversed())
                .as_standard_layout()
                .into_owned(),
        };
        Held {
            parent,
            layout,
            junk,
        }
    }

    fn last(&self) -> Axis {
        Axis(self.parent.ndim().saturating_sub(1))
    }

    fn view(&self) -> ArrayView<'_, T, D> {
        match self.layout {
            Layout::Standard => self.parent.view(),
            Layout::Transposed => self.parent.view().reversed_axes(),
            Layout::Stepped => self.parent.slice_axis(Axis(0), every_other_row()),
            Layout::Flipped => self.parent.slice_axis(self.last(), reversed()),
        }
    }

    fn view_mut(&mut self) -> ArrayViewMut<'_, T, D> {
        let last = self.last();
        match self.layout {
            Layout::Standard => self.parent.view_mut(),
            Layout::Transposed => self.parent.view_mut().reversed_axes(),
            Layout::Stepped => self.parent.slice_axis_mut(Axis(0), every_other_row()),
            Layout::Flipped => self.parent.slice_axis_mut(last, reversed()),
        }
    }

    /// The parent's elements outside the view still hold the junk.
    fn outside_untouched(&self) -> bool {
        self.layout != Layout::Stepped
            || self
                .parent
                .slice_axis(Axis(0), Slice::new(1, None, 2))
                .iter()
                .all(|v| *v == self.junk)
    }
}

impl<D: Dimension> Held<f32, D> {
    /// An input (or an output's starting contents) under a layout.
    fn of(logical: &Array<f32, D>, layout: Layout) -> Self {
        Held::new(logical, layout, JUNK)
    }

    /// The view holds `want` bit for bit and nothing outside it changed.
    fn holds(&self, want: &Array<f32, D>) -> std::result::Result<(), TestCaseError> {
        prop_assert_eq!(bits(self.view()), bits(want.view()));
        prop_assert!(self.outside_untouched(), "wrote outside the view");
        Ok(())
    }
}

fn bits<D: Dimension>(a: ArrayView<'_, f32, D>) -> (Vec<usize>, Vec<u32>) {
    (a.shape().to_vec(), a.iter().map(|v| v.to_bits()).collect())
}

fn fbits(r: Result<f32>) -> Result<u32> {
    r.map(f32::to_bits)
}

/// Random values the arrays of a case are cut from.
fn pool() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(-3.0f32..3.0, 61)
}

/// A standard-layout array of `shape` cut from `pool` (`salt` varies the cut).
fn arr<Sh: IntoDimension>(pool: &[f32], salt: usize, shape: Sh) -> Array<f32, Sh::Dim> {
    let dim = shape.into_dimension();
    let v = pool
        .iter()
        .cycle()
        .skip(salt * 13 % pool.len())
        .take(dim.size())
        .copied()
        .collect();
    Array::from_shape_vec(dim, v).unwrap()
}

/// The slice of a standard-layout array.
fn sl<D: Dimension>(a: &Array<f32, D>) -> &[f32] {
    a.as_slice().unwrap()
}

fn sm<D: Dimension>(a: &mut Array<f32, D>) -> &mut [f32] {
    a.as_slice_mut().unwrap()
}

/// Shapes of 1 to 3 axes for the row and element-wise kernels.
fn dyn_shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..4, 1..=3)
}

fn rows_cols(s: &[usize]) -> (usize, usize) {
    let (&cols, lead) = s.split_last().unwrap();
    (lead.iter().product(), cols)
}

fn lead(s: &[usize]) -> IxDyn {
    IxDyn(&s[..s.len() - 1])
}

fn with_last(s: &[usize], last: usize) -> IxDyn {
    let mut v = s.to_vec();
    *v.last_mut().unwrap() = last;
    IxDyn(&v)
}

fn positive<D: Dimension>(a: Array<f32, D>) -> Array<f32, D> {
    a.mapv(|v| v.abs() + 0.25)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn overlap_grids_matches(
        p in pool(), hs in 1usize..4, ws in 1usize..4, edge in any::<bool>(),
        flips in any::<(bool, bool)>(), l in layouts(),
    ) {
        let crop = |i: usize, f| CropBox::new(p[i] * 4.0, p[i + 1] * 4.0, p[i + 2].abs() * 6.0 + 1.0,
            p[i + 3].abs() * 6.0 + 1.0, f).unwrap();
        let (a, b) = (crop(0, flips.0), crop(4, flips.1));
        let placement = if edge { GridPlacement::EdgeToEdge } else { GridPlacement::CellCentres };
        let (mut wa, mut wb) = (arr(&p, 1, (hs, ws, 2)), arr(&p, 2, (hs, ws, 2)));
        let (mut ga, mut gb) = (Held::of(&wa, l[0]), Held::of(&wb, l[1]));
        let want = geometry::overlap_grids(&a, &b, hs, ws, placement, sm(&mut wa), sm(&mut wb));
        let got = nd::overlap_grids(&a, &b, placement, ga.view_mut(), gb.view_mut());
        prop_assert_eq!(got, want);
        ga.holds(&wa)?;
        gb.holds(&wb)?;
    }

    #[test]
    fn grid_sample_forward_matches(
        p in pool(), (c, h, w, pts) in (1usize..4, 1usize..4, 1usize..4, 1usize..5),
        hwc in any::<bool>(), l in layouts(),
    ) {
        let (layout, map_dim, out_dim) = sampling(c, h, w, pts, hwc);
        let (map, grid) = (arr(&p, 0, map_dim), arr(&p, 1, (pts, 2)).mapv(|v| v * 0.45));
        let mut want = arr(&p, 2, out_dim);
        let mut out = Held::of(&want, l[2]);
        let shape = SampleShape { channels: c, height: h, width: w, points: pts };
        let wr = bilinear::grid_sample_forward(sl(&map), sl(&grid), shape, layout, sm(&mut want));
        let (hm, hg) = (Held::of(&map, l[0]), Held::of(&grid, l[1]));
        prop_assert_eq!(nd::grid_sample_forward(hm.view(), hg.view(), layout, out.view_mut()), wr);
        out.holds(&want)?;
    }

    #[test]
    fn grid_sample_backward_matches(
        p in pool(), (c, h, w, pts) in (1usize..4, 1usize..4, 1usize..4, 1usize..5),
        (hwc, with_grid) in any::<(bool, bool)>(), l in layouts(),
    ) {
        let (layout, map_dim, out_dim) = sampling(c, h, w, pts, hwc);
        let (map, grid) = (arr(&p, 0, map_dim), arr(&p, 1, (pts, 2)).mapv(|v| v * 0.45));
        let go = arr(&p, 2, out_dim);
        let (mut wm, mut wg) = (arr(&p, 3, map_dim), arr(&p, 4, (pts, 2)));
        let (mut gm, mut gg) = (Held::of(&wm, l[3]), Held::of(&wg, l[4]));
        let shape = SampleShape { channels: c, height: h, width: w, points: pts };
        let wgg = if with_grid { Some(sm(&mut wg)) } else { None };
        let wr = bilinear::grid_sample_backward(sl(&map), sl(&grid), sl(&go), shape, layout,
            sm(&mut wm), wgg);
        let (hm, hg, ho) = (Held::of(&map, l[0]), Held::of(&grid, l[1]), Held::of(&go, l[2]));
        let ggv = if with_grid { Some(gg.view_mut()) } else { None };
        let r = nd::grid_sample_backward(hm.view(), hg.view(), ho.view(), layout, gm.view_mut(), ggv);
        prop_assert_eq!(r, wr);
        gm.holds(&wm)?;
        gg.holds(&wg)?;
    }

    #[test]
    fn spatial_relation_matches(
        p in pool(), (n, heads, d) in (1usize..5, 1usize..3, 1usize..3), l in layouts(),
    ) {
        let c = heads * d;
        let (x, gl) = (arr(&p, 0, (n, c)), arr(&p, 1, (heads, n, n)));
        let (mut wl, mut wgx) = (arr(&p, 2, (heads, n, n)), arr(&p, 3, (n, c)));
        let (mut hl, mut hgx) = (Held::of(&wl, l[2]), Held::of(&wgx, l[3]));
        let (hx, hgl) = (Held::of(&x, l[0]), Held::of(&gl, l[1]));
        let wr = relation::spatial_relation_forward(sl(&x), n, c, heads, sm(&mut wl));
        prop_assert_eq!(nd::spatial_relation_forward(hx.view(), hl.view_mut()), wr);
        hl.holds(&wl)?;
        let wr = relation::spatial_relation_backward(sl(&x), sl(&gl), n, c, heads, sm(&mut wgx));
        prop_assert_eq!(nd::spatial_relation_backward(hx.view(), hgl.view(), hgx.view_mut()), wr);
        hgx.holds(&wgx)?;
    }

    #[test]
    fn channel_relation_matches(p in pool(), (n, c) in (1usize..5, 1usize..5), l in layouts()) {
        let (x, gl) = (arr(&p, 0, (n, c)), arr(&p, 1, (c, c)));
        let (mut wl, mut wgx) = (arr(&p, 2, (c, c)), arr(&p, 3, (n, c)));
        let (mut hl, mut hgx) = (Held::of(&wl, l[2]), Held::of(&wgx, l[3]));
        let (hx, hgl) = (Held::of(&x, l[0]), Held::of(&gl, l[1]));
        let wr = relation::channel_relation_forward(sl(&x), n, c, sm(&mut wl));
        prop_assert_eq!(nd::channel_relation_forward(hx.view(), hl.view_mut()), wr);
        hl.holds(&wl)?;
        let wr = relation::channel_relation_backward(sl(&x), sl(&gl), n, c, sm(&mut wgx));
        prop_assert_eq!(nd::channel_relation_backward(hx.view(), hgl.view(), hgx.view_mut()), wr);
        hgx.holds(&wgx)?;
    }

    #[test]
    fn softmax_forwards_match(p in pool(), s in dyn_shape(), l in layouts()) {
        let (rows, cols) = rows_cols(&s);
        let x = arr(&p, 0, &s[..]).mapv(|v| v * 3.0);
        let hx = Held::of(&x, l[0]);
        let mut want = arr(&p, 1, &s[..]);
        let mut out = Held::of(&want, l[1]);
        let wr = softmax::softmax_rows(sl(&x), rows, cols, sm(&mut want));
        prop_assert_eq!(nd::softmax_rows(hx.view(), out.view_mut()), wr);
        out.holds(&want)?;
        let mut want = arr(&p, 2, &s[..]);
        let mut out = Held::of(&want, l[2]);
        let wr = softmax::log_softmax_rows(sl(&x), rows, cols, sm(&mut want));
        prop_assert_eq!(nd::log_softmax_rows(hx.view(), out.view_mut()), wr);
        out.holds(&want)?;
        let mut want = x.clone();
        let mut inplace = Held::of(&x, l[3]);
        let wr = softmax::softmax_rows_in_place(sm(&mut want), rows, cols);
        prop_assert_eq!(nd::softmax_rows_in_place(inplace.view_mut()), wr);
        inplace.holds(&want)?;
    }

    #[test]
    fn softmax_backwards_match(p in pool(), s in dyn_shape(), l in layouts()) {
        let (rows, cols) = rows_cols(&s);
        let (y, dy) = (arr(&p, 0, &s[..]), arr(&p, 1, &s[..]));
        let (hy, hdy) = (Held::of(&y, l[0]), Held::of(&dy, l[1]));
        let mut want = arr(&p, 2, &s[..]);
        let mut dx = Held::of(&want, l[2]);
        let wr = softmax::softmax_backward_rows(sl(&y), sl(&dy), rows, cols, sm(&mut want));
        prop_assert_eq!(nd::softmax_backward_rows(hy.view(), hdy.view(), dx.view_mut()), wr);
        dx.holds(&want)?;
        let mut want = arr(&p, 3, &s[..]);
        let mut dx = Held::of(&want, l[3]);
        let wr = softmax::log_softmax_backward_rows(sl(&y), sl(&dy), rows, cols, sm(&mut want));
        prop_assert_eq!(nd::log_softmax_backward_rows(hy.view(), hdy.view(), dx.view_mut()), wr);
        dx.holds(&want)?;
    }

    #[test]
    fn relation_cross_entropy_matches(
        p in pool(), s in dyn_shape(), taus in (0.05f32..1.0, 0.05f32..1.0), scale in -2.0f32..2.0,
        l in layouts(),
    ) {
        let (rows, cols) = rows_cols(&s);
        let (st, te) = (arr(&p, 0, &s[..]), arr(&p, 1, &s[..]));
        let (hs, ht) = (Held::of(&st, l[0]), Held::of(&te, l[1]));
        let want = loss::relation_cross_entropy(sl(&st), sl(&te), rows, cols, taus.0, taus.1);
        let got = nd::relation_cross_entropy(hs.view(), ht.view(), taus.0, taus.1);
        prop_assert_eq!(fbits(got), fbits(want));
        let mut wg = arr(&p, 2, &s[..]);
        let mut g = Held::of(&wg, l[2]);
        let want = loss::relation_cross_entropy_backward(sl(&st), sl(&te), rows, cols, taus.0,
            taus.1, scale, sm(&mut wg));
        let got = nd::relation_cross_entropy_backward(hs.view(), ht.view(), taus.0, taus.1, scale,
            g.view_mut());
        prop_assert_eq!(fbits(got), fbits(want));
        g.holds(&wg)?;
    }

    #[test]
    fn soft_target_cross_entropy_matches(
        p in pool(), s in dyn_shape(), tau in 0.05f32..1.0, scale in -2.0f32..2.0,
        with_grad in any::<bool>(), l in layouts(),
    ) {
        let (rows, cols) = rows_cols(&s);
        let (st, q) = (arr(&p, 0, &s[..]), positive(arr(&p, 1, &s[..])));
        let (hs, hq) = (Held::of(&st, l[0]), Held::of(&q, l[1]));
        let mut wg = arr(&p, 2, &s[..]);
        let mut g = Held::of(&wg, l[2]);
        let wgs = if with_grad { Some((sm(&mut wg), scale)) } else { None };
        let want = loss::soft_target_cross_entropy(sl(&st), sl(&q), rows, cols, tau, wgs);
        let gv = if with_grad { Some((g.view_mut(), scale)) } else { None };
        let got = nd::soft_target_cross_entropy(hs.view(), hq.view(), tau, gv);
        prop_assert_eq!(fbits(got), fbits(want));
        g.holds(&wg)?;
    }

    #[test]
    fn dino_loss_matches(
        p in pool(), (sv, tv, batch, dim) in (2usize..4, 1usize..3, 1usize..3, 1usize..4),
        taus in (0.05f32..1.0, 0.02f32..0.5), scale in -2.0f32..2.0, l in layouts(),
    ) {
        let shape = DinoShape { student_views: sv, teacher_views: tv, batch, dim };
        let (st, te, c) = (arr(&p, 0, (sv, batch, dim)), arr(&p, 1, (tv, batch, dim)), arr(&p, 2, dim));
        let (hs, ht, hc) = (Held::of(&st, l[0]), Held::of(&te, l[1]), Held::of(&c, l[2]));
        let want = loss::dino_loss(sl(&st), sl(&te), sl(&c), shape, taus.0, taus.1);
        let got = nd::dino_loss(hs.view(), ht.view(), hc.view(), taus.0, taus.1);
        prop_assert_eq!(fbits(got), fbits(want));
        let mut wg = arr(&p, 3, (sv, batch, dim));
        let mut g = Held::of(&wg, l[3]);
        let want = loss::dino_loss_backward(sl(&st), sl(&te), sl(&c), shape, taus.0, taus.1, scale,
            sm(&mut wg));
        let got = nd::dino_loss_backward(hs.view(), ht.view(), hc.view(), taus.0, taus.1, scale,
            g.view_mut());
        prop_assert_eq!(fbits(got), fbits(want));
        g.holds(&wg)?;
    }

    #[test]
    fn teacher_statistics_match(
        p in pool(), s in dyn_shape(), momentum in 0.0f32..=1.0, tau in 0.02f32..0.5,
        l in layouts(),
    ) {
        let (rows, dim) = rows_cols(&s);
        let (te, c) = (arr(&p, 0, &s[..]), arr(&p, 1, dim));
        let (ht, hc) = (Held::of(&te, l[0]), Held::of(&c, l[1]));
        let want = loss::teacher_entropy(sl(&te), sl(&c), rows, dim, tau);
        prop_assert_eq!(fbits(nd::teacher_entropy(ht.view(), hc.view(), tau)), fbits(want));
        let mut wc = c.clone();
        let mut centre = Held::of(&c, l[2]);
        let wr = loss::dino_centre_update(sl(&te), rows, dim, momentum, sm(&mut wc));
        prop_assert_eq!(nd::dino_centre_update(ht.view(), momentum, centre.view_mut()), wr);
        centre.holds(&wc)?;
    }

    #[test]
    fn masked_patch_weights_matches(p in pool(), s in dyn_shape(), l in layouts()) {
        let masks = arr(&p, 0, &s[..]).mapv(|v| v > 0.5);
        let (_, patches) = rows_cols(&s);
        let hm = Held::new(&masks, l[0], true);
        let mut want = arr(&p, 1, &s[..]);
        let mut out = Held::of(&want, l[1]);
        let wr = loss::masked_patch_weights(masks.as_slice().unwrap(), patches, sm(&mut want));
        prop_assert_eq!(nd::masked_patch_weights(hm.view(), out.view_mut()), wr);
        out.holds(&want)?;
    }

    #[test]
    fn weighted_cross_entropy_matches(
        p in pool(), s in dyn_shape(), taus in (0.05f32..1.0, 0.02f32..0.5), scale in -2.0f32..2.0,
        with_grad in any::<bool>(), l in layouts(),
    ) {
        let (rows, dim) = rows_cols(&s);
        let (st, te, c) = (arr(&p, 0, &s[..]), arr(&p, 1, &s[..]), arr(&p, 2, dim));
        let w = arr(&p, 3, lead(&s)).mapv(|v| if v < -1.0 { 0.0 } else { v.abs() });
        let (hs, ht, hc, hw) = (Held::of(&st, l[0]), Held::of(&te, l[1]), Held::of(&c, l[2]),
            Held::of(&w, l[3]));
        let mut wg = arr(&p, 4, &s[..]);
        let mut g = Held::of(&wg, l[4]);
        let wgs = if with_grad { Some((sm(&mut wg), scale)) } else { None };
        let want = loss::weighted_cross_entropy(sl(&st), sl(&te), sl(&c), sl(&w), rows, dim, taus.0,
            taus.1, wgs);
        let gv = if with_grad { Some((g.view_mut(), scale)) } else { None };
        let got = nd::weighted_cross_entropy(hs.view(), ht.view(), hc.view(), hw.view(), taus.0,
            taus.1, gv);
        prop_assert_eq!(fbits(got), fbits(want));
        g.holds(&wg)?;
    }

    #[test]
    fn layer_norm_matches(p in pool(), s in dyn_shape(), l in layouts()) {
        let (rows, cols) = rows_cols(&s);
        let (x, gamma, beta) = (arr(&p, 0, &s[..]), arr(&p, 1, cols), arr(&p, 2, cols));
        let (hx, hg, hb) = (Held::of(&x, l[0]), Held::of(&gamma, l[1]), Held::of(&beta, l[2]));
        let (mut wo, mut wm, mut wr) = (arr(&p, 3, &s[..]), arr(&p, 4, lead(&s)), arr(&p, 5, lead(&s)));
        let (mut o, mut m, mut r) = (Held::of(&wo, l[3]), Held::of(&wm, l[4]), Held::of(&wr, l[5]));
        let want = norm::layer_norm_forward(sl(&x), sl(&gamma), sl(&beta), rows, cols, 1e-5,
            sm(&mut wo), sm(&mut wm), sm(&mut wr));
        let got = nd::layer_norm_forward(hx.view(), hg.view(), hb.view(), 1e-5, o.view_mut(),
            m.view_mut(), r.view_mut());
        prop_assert_eq!(got, want);
        o.holds(&wo)?;
        m.holds(&wm)?;
        r.holds(&wr)?;
        // Backward from the saved statistics, into non-zero gradients.
        let dy = arr(&p, 6, &s[..]);
        let (hm, hr, hdy) = (Held::of(&wm, l[6]), Held::of(&wr, l[7]), Held::of(&dy, l[5]));
        let (mut wdx, mut wdg, mut wdb) = (arr(&p, 7, &s[..]), arr(&p, 8, cols), arr(&p, 9, cols));
        let (mut dx, mut dg, mut db) = (Held::of(&wdx, l[1]), Held::of(&wdg, l[0]), Held::of(&wdb, l[3]));
        let want = norm::layer_norm_backward(sl(&x), sl(&gamma), sl(&wm), sl(&wr), sl(&dy), rows,
            cols, sm(&mut wdx), sm(&mut wdg), sm(&mut wdb));
        let got = nd::layer_norm_backward(hx.view(), hg.view(), hm.view(), hr.view(), hdy.view(),
            dx.view_mut(), dg.view_mut(), db.view_mut());
        prop_assert_eq!(got, want);
        dx.holds(&wdx)?;
        dg.holds(&wdg)?;
        db.holds(&wdb)?;
    }

    #[test]
    fn batch_norm_train_matches(p in pool(), s in dyn_shape(), l in layouts()) {
        let (rows, cols) = rows_cols(&s);
        let (x, gamma, beta) = (arr(&p, 0, &s[..]), arr(&p, 1, cols), arr(&p, 2, cols));
        let (hx, hg, hb) = (Held::of(&x, l[0]), Held::of(&gamma, l[1]), Held::of(&beta, l[2]));
        let (mut wm, mut wv) = (arr(&p, 3, cols), arr(&p, 4, cols));
        let (mut m, mut v) = (Held::of(&wm, l[3]), Held::of(&wv, l[4]));
        let want = norm::batch_norm_stats(sl(&x), rows, cols, sm(&mut wm), sm(&mut wv));
        prop_assert_eq!(nd::batch_norm_stats(hx.view(), m.view_mut(), v.view_mut()), want);
        m.holds(&wm)?;
        v.holds(&wv)?;
        let (mut wo, mut wr) = (arr(&p, 5, &s[..]), arr(&p, 6, cols));
        let (mut o, mut r) = (Held::of(&wo, l[5]), Held::of(&wr, l[6]));
        let want = norm::batch_norm_forward(sl(&x), sl(&gamma), sl(&beta), rows, cols, 1e-5,
            sm(&mut wo), sm(&mut wm), sm(&mut wv), sm(&mut wr));
        let got = nd::batch_norm_forward(hx.view(), hg.view(), hb.view(), 1e-5, o.view_mut(),
            m.view_mut(), v.view_mut(), r.view_mut());
        prop_assert_eq!(got, want);
        o.holds(&wo)?;
        m.holds(&wm)?;
        v.holds(&wv)?;
        r.holds(&wr)?;
        let dy = arr(&p, 7, &s[..]);
        let (hm, hr, hdy) = (Held::of(&wm, l[7]), Held::of(&wr, l[0]), Held::of(&dy, l[1]));
        let (mut wdx, mut wdg, mut wdb) = (arr(&p, 8, &s[..]), arr(&p, 9, cols), arr(&p, 10, cols));
        let mut ws = arr(&p, 11, 2 * cols);
        let (mut dx, mut dg) = (Held::of(&wdx, l[2]), Held::of(&wdg, l[3]));
        let (mut db, mut sc) = (Held::of(&wdb, l[4]), Held::of(&ws, l[5]));
        let want = norm::batch_norm_backward(sl(&x), sl(&gamma), sl(&wm), sl(&wr), sl(&dy), rows,
            cols, sm(&mut wdx), sm(&mut wdg), sm(&mut wdb), sm(&mut ws));
        let got = nd::batch_norm_backward(hx.view(), hg.view(), hm.view(), hr.view(), hdy.view(),
            dx.view_mut(), dg.view_mut(), db.view_mut(), sc.view_mut());
        prop_assert_eq!(got, want);
        dx.holds(&wdx)?;
        dg.holds(&wdg)?;
        db.holds(&wdb)?;
        sc.holds(&ws)?;
    }

    #[test]
    fn batch_norm_running_matches(
        p in pool(), s in dyn_shape(), momentum in 0.0f32..=1.0, count in 1usize..6,
        l in layouts(),
    ) {
        let (rows, cols) = rows_cols(&s);
        let (x, gamma, beta) = (arr(&p, 0, &s[..]), arr(&p, 1, cols), arr(&p, 2, cols));
        let (rm, rv) = (arr(&p, 3, cols), positive(arr(&p, 4, cols)));
        let (hx, hg, hb) = (Held::of(&x, l[0]), Held::of(&gamma, l[1]), Held::of(&beta, l[2]));
        let (hrm, hrv) = (Held::of(&rm, l[3]), Held::of(&rv, l[4]));
        let mut wo = arr(&p, 5, &s[..]);
        let mut o = Held::of(&wo, l[5]);
        let want = norm::batch_norm_eval(sl(&x), sl(&gamma), sl(&beta), sl(&rm), sl(&rv), rows,
            cols, 1e-5, sm(&mut wo));
        let got = nd::batch_norm_eval(hx.view(), hg.view(), hb.view(), hrm.view(), hrv.view(),
            1e-5, o.view_mut());
        prop_assert_eq!(got, want);
        o.holds(&wo)?;
        let (bm, bv) = (arr(&p, 6, cols), positive(arr(&p, 7, cols)));
        let (hbm, hbv) = (Held::of(&bm, l[6]), Held::of(&bv, l[7]));
        let (mut wrm, mut wrv) = (rm.clone(), rv.clone());
        let (mut orm, mut orv) = (Held::of(&rm, l[1]), Held::of(&rv, l[0]));
        let want = norm::batch_norm_update_running(sl(&bm), sl(&bv), count, momentum,
            sm(&mut wrm), sm(&mut wrv));
        let got = nd::batch_norm_update_running(hbm.view(), hbv.view(), count, momentum,
            orm.view_mut(), orv.view_mut());
        prop_assert_eq!(got, want);
        orm.holds(&wrm)?;
        orv.holds(&wrv)?;
    }

    #[test]
    fn gelu_matches(p in pool(), s in dyn_shape(), l in layouts()) {
        let (x, dy) = (arr(&p, 0, &s[..]).mapv(|v| v * 2.0), arr(&p, 1, &s[..]));
        let (hx, hdy) = (Held::of(&x, l[0]), Held::of(&dy, l[1]));
        let mut want = arr(&p, 2, &s[..]);
        let mut out = Held::of(&want, l[2]);
        let wr = activation::gelu_forward(sl(&x), sm(&mut want));
        prop_assert_eq!(nd::gelu_forward(hx.view(), out.view_mut()), wr);
        out.holds(&want)?;
        let mut want = arr(&p, 3, &s[..]);
        let mut dx = Held::of(&want, l[3]);
        let wr = activation::gelu_backward(sl(&x), sl(&dy), sm(&mut want));
        prop_assert_eq!(nd::gelu_backward(hx.view(), hdy.view(), dx.view_mut()), wr);
        dx.holds(&want)?;
        let mut want = dy.clone();
        let mut d = Held::of(&dy, l[4]);
        let wr = activation::gelu_grad_in_place(sl(&x), sm(&mut want));
        prop_assert_eq!(nd::gelu_grad_in_place(hx.view(), d.view_mut()), wr);
        d.holds(&want)?;
    }

    #[test]
    fn gemm_matches(
        p in pool(), (m, k, n) in (1usize..5, 1usize..5, 1usize..5), alpha in -2.0f32..2.0,
        beta in prop_oneof![Just(0.0f32), -2.0f32..2.0], l in layouts(),
    ) {
        let (a, b) = (arr(&p, 0, (m, k)), arr(&p, 1, (k, n)));
        let (ha, hb) = (Held::of(&a, l[0]), Held::of(&b, l[1]));
        let mut want = arr(&p, 2, (m, n));
        let mut c = Held::of(&want, l[2]);
        let rm = MatRef::row_major;
        let wr = linalg::gemm(alpha, sl(&a), rm(m, k), sl(&b), rm(k, n), beta, sm(&mut want), rm(m, n));
        prop_assert_eq!(nd::gemm(alpha, ha.view(), hb.view(), beta, c.view_mut()), wr);
        c.holds(&want)?;
    }

    #[test]
    fn linear_matches(
        p in pool(), s in dyn_shape(), out_dim in 1usize..4, opts in any::<(bool, bool, bool, bool)>(),
        l in layouts(),
    ) {
        let (rows, inp) = rows_cols(&s);
        let ys = with_last(&s, out_dim);
        let (x, w, bias) = (arr(&p, 0, &s[..]), arr(&p, 1, (out_dim, inp)), arr(&p, 2, out_dim));
        let (hx, hw, hbias) = (Held::of(&x, l[0]), Held::of(&w, l[1]), Held::of(&bias, l[2]));
        let mut wy = arr(&p, 3, ys.clone());
        let mut y = Held::of(&wy, l[3]);
        let wb = if opts.0 { Some(sl(&bias)) } else { None };
        let want = linalg::linear_forward(sl(&x), sl(&w), wb, rows, inp, out_dim, sm(&mut wy));
        let b = if opts.0 { Some(hbias.view()) } else { None };
        prop_assert_eq!(nd::linear_forward(hx.view(), hw.view(), b, y.view_mut()), want);
        y.holds(&wy)?;
        let dy = arr(&p, 4, ys);
        let hdy = Held::of(&dy, l[4]);
        let (mut wdx, mut wdw, mut wdb) = (arr(&p, 5, &s[..]), arr(&p, 6, (out_dim, inp)), arr(&p, 7, out_dim));
        let (mut dx, mut dw, mut db) = (Held::of(&wdx, l[5]), Held::of(&wdw, l[6]), Held::of(&wdb, l[7]));
        let want = linalg::linear_backward(sl(&x), sl(&w), sl(&dy), rows, inp, out_dim,
            opts.1.then(|| sm(&mut wdx)), opts.2.then(|| sm(&mut wdw)), opts.3.then(|| sm(&mut wdb)));
        let got = nd::linear_backward(hx.view(), hw.view(), hdy.view(), opts.1.then(|| dx.view_mut()),
            opts.2.then(|| dw.view_mut()), opts.3.then(|| db.view_mut()));
        prop_assert_eq!(got, want);
        dx.holds(&wdx)?;
        dw.holds(&wdw)?;
        db.holds(&wdb)?;
    }

    #[test]
    fn optimisers_match(
        p in pool(), s in dyn_shape(), step in 1u32..20, momentum in 0.0f32..=1.0,
        max_norm in 0.1f32..5.0, l in layouts(),
    ) {
        let opt = AdamW { lr: 0.01, weight_decay: 0.04, ..AdamW::default() };
        let grads = arr(&p, 0, &s[..]);
        let hgr = Held::of(&grads, l[0]);
        let (mut wp, mut wm, mut wv) = (arr(&p, 1, &s[..]), arr(&p, 2, &s[..]), positive(arr(&p, 3, &s[..])));
        let (mut hp, mut hm, mut hv) = (Held::of(&wp, l[1]), Held::of(&wm, l[2]), Held::of(&wv, l[3]));
        let want = optim::adamw_step(sm(&mut wp), sl(&grads), sm(&mut wm), sm(&mut wv), &opt, step);
        let got = nd::adamw_step(hp.view_mut(), hgr.view(), hm.view_mut(), hv.view_mut(), &opt, step);
        prop_assert_eq!(got, want);
        hp.holds(&wp)?;
        hm.holds(&wm)?;
        hv.holds(&wv)?;
        let mut wt = arr(&p, 4, &s[..]);
        let mut ht = Held::of(&wt, l[4]);
        let want = optim::ema_update(sm(&mut wt), sl(&grads), momentum);
        prop_assert_eq!(nd::ema_update(ht.view_mut(), hgr.view(), momentum), want);
        ht.holds(&wt)?;
        prop_assert_eq!(nd::l2_norm(hgr.view()).to_bits(), optim::l2_norm(sl(&grads)).to_bits());
        let mut wg = grads.clone();
        let mut hg = Held::of(&grads, l[5]);
        let want = optim::clip_grad_norm(sm(&mut wg), max_norm);
        prop_assert_eq!(fbits(nd::clip_grad_norm(hg.view_mut(), max_norm)), fbits(want));
        hg.holds(&wg)?;
    }

    /// Independent random shapes: `Ok` exactly when they fit together (and
    /// no size is zero), a typed error otherwise, never a panic.
    #[test]
    fn random_shapes_are_errors_not_panics(
        d in prop::collection::vec(0usize..4, 9), v in -1.0f32..1.0,
    ) {
        // Spatial relation backward: x (n, c), grad_logits (heads, n, n), grad_x (n, c).
        let x = Array2::from_elem((d[0], d[1]), v);
        let gl = Array3::from_elem((d[2], d[3], d[4]), v);
        let mut gx = Array2::from_elem((d[5], d[6]), v);
        let fits = d[3] == d[0] && d[4] == d[0] && (d[5], d[6]) == (d[0], d[1]);
        let nonzero = d[0] > 0 && d[1] > 0 && d[2] > 0 && d[1] % d[2] == 0;
        let r = nd::spatial_relation_backward(x.view(), gl.view(), gx.view_mut());
        prop_assert_eq!(r.is_ok(), fits && nonzero, "{:?}", r);
        // Layer norm: x (r, c), gamma/beta (c), out (r, c), mean/rstd (r).
        let x = Array2::from_elem((d[0], d[1]), v);
        let (g, b) = (Array1::from_elem(d[2], v), Array1::from_elem(d[3], v));
        let mut out = Array2::from_elem((d[4], d[5]), v);
        let (mut m, mut rs) = (Array1::from_elem(d[6], v), Array1::from_elem(d[7], v));
        let fits = d[2] == d[1] && d[3] == d[1] && (d[4], d[5]) == (d[0], d[1])
            && d[6] == d[0] && d[7] == d[0];
        let r = nd::layer_norm_forward(x.view(), g.view(), b.view(), 1e-5, out.view_mut(),
            m.view_mut(), rs.view_mut());
        prop_assert_eq!(r.is_ok(), fits && d[0] > 0 && d[1] > 0, "{:?}", r);
        // Grid sample backward (Hwc): map (h, w, c), grid (p, q), grad_out (p, c).
        let map = Array3::from_elem((d[0], d[1], d[2]), v);
        let grid = Array2::from_elem((d[3], d[4]), v);
        let go = Array2::from_elem((d[5], d[6]), v);
        let mut gm = Array3::from_elem((d[0], d[1], d[7]), v);
        let fits = d[4] == 2 && (d[5], d[6]) == (d[3], d[2]) && d[7] == d[2];
        let nonzero = d[0] > 0 && d[1] > 0 && d[2] > 0 && d[3] > 0;
        let r = nd::grid_sample_backward(map.view(), grid.view(), go.view(), MapLayout::Hwc,
            gm.view_mut(), None);
        prop_assert_eq!(r.is_ok(), fits && nonzero, "{:?}", r);
        // Linear forward: x (r, i), weight (o, i), bias (o), y (r, o).
        let x = Array2::from_elem((d[0], d[1]), v);
        let w = Array2::from_elem((d[2], d[3]), v);
        let bias = Array1::from_elem(d[4], v);
        let mut y = Array2::from_elem((d[5], d[6]), v);
        let fits = d[3] == d[1] && d[4] == d[2] && (d[5], d[6]) == (d[0], d[2]);
        let r = nd::linear_forward(x.view(), w.view(), Some(bias.view()), y.view_mut());
        prop_assert_eq!(r.is_ok(), fits, "{:?}", r);
        // DINO: student (sv, b, k), teacher (tv, b', k'), centre (k'').
        let s = Array3::from_elem((d[0], d[1], d[2]), v);
        let t = Array3::from_elem((d[3], d[4], d[5]), v);
        let c = Array1::from_elem(d[6], v);
        let fits = d[4] == d[1] && d[5] == d[2] && d[6] == d[2];
        let nonzero = d[0] > 0 && d[1] > 0 && d[2] > 0 && d[3] > 0 && d[0] * d[3] > d[0].min(d[3]);
        let r = nd::dino_loss(s.view(), t.view(), c.view(), 0.1, 0.04);
        prop_assert_eq!(r.is_ok(), fits && nonzero, "{:?}", r);
    }
}

/// The map and output shapes of a sampling problem in one of the layouts.
fn sampling(
    c: usize,
    h: usize,
    w: usize,
    pts: usize,
    hwc: bool,
) -> (MapLayout, (usize, usize, usize), (usize, usize)) {
    if hwc {
        (MapLayout::Hwc, (h, w, c), (pts, c))
    } else {
        (MapLayout::Chw, (c, h, w), (c, pts))
    }
}

#[test]
fn the_layouts_are_what_they_claim() {
    let a = Array2::from_shape_fn((3, 4), |(i, j)| (i * 4 + j) as f32);
    for layout in [Layout::Transposed, Layout::Stepped, Layout::Flipped] {
        let h = Held::of(&a, layout);
        assert_eq!(h.view(), a.view(), "{layout:?}");
        assert!(!h.view().is_standard_layout(), "{layout:?}");
    }
    // A transposed store is contiguous in memory: gemm's in-place path.
    assert!(Held::of(&a, Layout::Transposed)
        .view()
        .as_slice_memory_order()
        .is_some());
    assert_eq!(Held::of(&a, Layout::Stepped).parent.dim(), (6, 4));
}

#[test]
fn mismatched_shapes_are_shape_errors_and_write_nothing() {
    let x = Array2::from_elem((2, 3), 1.0f32);
    let mut out = Array2::from_elem((3, 2), 7.0f32);
    let r = nd::softmax_rows(x.view(), out.view_mut());
    let want = Error::ShapeMismatch {
        what: "out",
        expected: 2,
        got: 3,
    };
    assert_eq!(r, Err(want));
    assert!(out.iter().all(|&v| v == 7.0));
    // The same counts in a different rank (dynamic dimensions).
    let xd = Array::from_elem(IxDyn(&[2, 3]), 1.0f32);
    let mut od = Array::from_elem(IxDyn(&[1, 2, 3]), 7.0f32);
    let r = nd::softmax_rows(xd.view(), od.view_mut());
    assert!(matches!(
        r,
        Err(Error::ShapeMismatch {
            what: "out",
            expected: 2,
            got: 3
        })
    ));
    // A transposed output of a non-square shape is caught, not silently
    // written in the wrong order.
    let mut wide = Array2::from_elem((3, 2), 7.0f32);
    assert!(nd::gelu_forward(x.view(), wide.view_mut()).is_err());
    assert!(nd::gelu_forward(x.view(), wide.view_mut().reversed_axes()).is_ok());
}

#[test]
fn each_family_reports_mismatches() {
    let x = Array2::from_elem((2, 4), 0.5f32);
    let is_shape = |r: Result<()>| matches!(r, Err(Error::ShapeMismatch { .. }));
    // Relations: logits whose points do not match the features.
    let mut l = Array3::zeros((2, 2, 3));
    assert!(is_shape(nd::spatial_relation_forward(
        x.view(),
        l.view_mut()
    )));
    let mut lc = Array2::zeros((2, 2));
    assert!(is_shape(nd::channel_relation_forward(
        x.view(),
        lc.view_mut()
    )));
    // Heads that do not divide the channels: the kernel's InvalidArgument.
    let mut l3 = Array3::zeros((3, 2, 2));
    assert!(matches!(
        nd::spatial_relation_forward(x.view(), l3.view_mut()),
        Err(Error::InvalidArgument { what: "heads", .. })
    ));
    // Sampling: a grid that is not (points, 2), an output in the wrong layout.
    let map = Array3::zeros((2, 3, 3));
    let mut out = Array2::zeros((2, 5));
    let grid3 = Array2::zeros((5, 3));
    let r = nd::grid_sample_forward(map.view(), grid3.view(), MapLayout::Chw, out.view_mut());
    assert!(matches!(
        r,
        Err(Error::ShapeMismatch {
            what: "grid",
            expected: 2,
            got: 3
        })
    ));
    let grid = Array2::zeros((5, 2));
    let r = nd::grid_sample_forward(map.view(), grid.view(), MapLayout::Hwc, out.view_mut());
    assert!(matches!(r, Err(Error::ShapeMismatch { what: "out", .. })));
    // Overlap grids of different shapes.
    let c = CropBox::new(0.0, 0.0, 4.0, 4.0, false).unwrap();
    let (mut ga, mut gb) = (Array3::zeros((2, 2, 2)), Array3::zeros((2, 3, 2)));
    let r = nd::overlap_grids(
        &c,
        &c,
        GridPlacement::CellCentres,
        ga.view_mut(),
        gb.view_mut(),
    );
    assert!(matches!(
        r,
        Err(Error::ShapeMismatch { what: "grid_b", .. })
    ));
    // Losses: teacher of another shape; DINO batch mismatch; weights per row.
    let t = Array2::zeros((4, 2));
    let r = nd::relation_cross_entropy(x.view(), t.view(), 0.1, 0.04);
    assert!(matches!(
        r,
        Err(Error::ShapeMismatch {
            what: "teacher",
            ..
        })
    ));
    let (s3, t3) = (Array3::zeros((2, 2, 4)), Array3::zeros((2, 3, 4)));
    let r = nd::dino_loss(s3.view(), t3.view(), Array1::zeros(4).view(), 0.1, 0.04);
    assert!(matches!(
        r,
        Err(Error::ShapeMismatch {
            what: "teacher",
            expected: 2,
            got: 3
        })
    ));
    let w = Array1::zeros(3);
    let r = nd::weighted_cross_entropy(
        x.view(),
        x.view(),
        Array1::zeros(4).view(),
        w.view(),
        0.1,
        0.04,
        None,
    );
    assert!(matches!(
        r,
        Err(Error::ShapeMismatch {
            what: "weights",
            ..
        })
    ));
    // Norms: statistics of the wrong length.
    let (g, b) = (Array1::ones(4), Array1::zeros(4));
    let (mut o, mut m, mut r) = (Array2::zeros((2, 4)), Array1::zeros(4), Array1::zeros(2));
    let res = nd::layer_norm_forward(
        x.view(),
        g.view(),
        b.view(),
        1e-5,
        o.view_mut(),
        m.view_mut(),
        r.view_mut(),
    );
    assert!(matches!(
        res,
        Err(Error::ShapeMismatch { what: "mean", .. })
    ));
    let mut s = Array1::zeros(4);
    let (mut dx, mut dg, mut db) = (Array2::zeros((2, 4)), Array1::zeros(4), Array1::zeros(4));
    let res = nd::batch_norm_backward(
        x.view(),
        g.view(),
        b.view(),
        g.view(),
        x.view(),
        dx.view_mut(),
        dg.view_mut(),
        db.view_mut(),
        s.view_mut(),
    );
    assert!(matches!(
        res,
        Err(Error::ShapeMismatch {
            what: "scratch",
            expected: 8,
            got: 4
        })
    ));
    // Linear layers and GEMM.
    let wt = Array2::zeros((3, 5));
    let mut y = Array2::zeros((2, 3));
    assert!(is_shape(nd::linear_forward(
        x.view(),
        wt.view(),
        None,
        y.view_mut()
    )));
    let mut c = Array2::zeros((2, 2));
    assert!(matches!(
        nd::gemm(1.0, x.view(), x.view(), 0.0, c.view_mut()),
        Err(Error::InvalidArgument {
            what: "gemm shapes",
            ..
        })
    ));
    // Optimisers: moments of another shape.
    let (mut p, mut mm, mut v) = (x.clone(), Array2::zeros((4, 2)), Array2::zeros((2, 4)));
    let res = nd::adamw_step(
        p.view_mut(),
        x.view(),
        mm.view_mut(),
        v.view_mut(),
        &AdamW::default(),
        1,
    );
    assert!(matches!(res, Err(Error::ShapeMismatch { what: "m", .. })));
    assert_eq!(p, x);
}

#[test]
fn zero_sized_views_are_kernel_errors() {
    let x = Array2::<f32>::zeros((0, 3));
    let mut out = Array2::zeros((0, 3));
    assert!(matches!(
        nd::softmax_rows(x.view(), out.view_mut()),
        Err(Error::InvalidArgument { what: "rows", .. })
    ));
    let mut l = Array3::zeros((1, 0, 0));
    assert!(matches!(
        nd::spatial_relation_forward(x.view(), l.view_mut()),
        Err(Error::InvalidArgument { .. })
    ));
    let e = Array::<f32, _>::zeros(IxDyn(&[2, 0]));
    assert_eq!(nd::l2_norm(e.view()), 0.0);
}
