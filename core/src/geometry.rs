//! Crop records, the overlap of two crops, and the sampling grids that map
//! the overlap into each view's normalized coordinates.
//!
//! Conventions (those of PyTorch's `grid_sample` with `align_corners=False`):
//! a view's normalized coordinate `-1` is the *outer edge* of its first pixel
//! and `+1` the outer edge of its last, so a crop covering source pixels
//! `[x, x + w)` maps source coordinate `x` to `-1` and `x + w` to `+1`.
//! Grid points are stored as `(x, y)` pairs, x first. A horizontally flipped
//! view mirrors x: `u -> -u`.

use crate::error::{check_len, check_nonzero, shape_product, Error, Result};

/// Where a crop came from: its rectangle in source-image pixels and whether
/// the crop was flipped horizontally after cropping.
///
/// ```
/// use sere_core::geometry::CropBox;
/// let crop = CropBox::new(10.0, 20.0, 100.0, 50.0, false).unwrap();
/// assert_eq!(crop.to_normalized(60.0, 45.0), (0.0, 0.0)); // centre
/// assert_eq!(crop.to_normalized(10.0, 20.0), (-1.0, -1.0)); // top-left edge
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CropBox {
    /// Left edge in source pixels.
    pub x: f32,
    /// Top edge in source pixels.
    pub y: f32,
    /// Width in source pixels (> 0).
    pub w: f32,
    /// Height in source pixels (> 0).
    pub h: f32,
    /// Whether the view was mirrored left-right after cropping.
    pub flipped: bool,
}

impl CropBox {
    /// A crop record; width and height must be finite and positive, the
    /// corner finite, and the far edges `x + w`, `y + h` finite.
    ///
    /// ```
    /// use sere_core::geometry::CropBox;
    /// assert!(CropBox::new(0.0, 0.0, 0.0, 4.0, false).is_err());
    /// ```
    pub fn new(x: f32, y: f32, w: f32, h: f32, flipped: bool) -> Result<Self> {
        let c = CropBox {
            x,
            y,
            w,
            h,
            flipped,
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks the invariants of [`CropBox::new`] on a record built by hand.
    ///
    /// ```
    /// use sere_core::geometry::CropBox;
    /// let c = CropBox { x: 0.0, y: 0.0, w: f32::NAN, h: 1.0, flipped: false };
    /// assert!(c.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        if !(self.x.is_finite() && self.y.is_finite()) {
            return Err(Error::InvalidArgument {
                what: "crop corner",
                requirement: "must be finite",
            });
        }
        if !(self.w.is_finite() && self.w > 0.0 && self.h.is_finite() && self.h > 0.0) {
            return Err(Error::InvalidArgument {
                what: "crop size",
                requirement: "width and height must be finite and > 0",
            });
        }
        // Finite corner and size can still overflow to an infinite far edge,
        // which would make the overlap and its grid infinite or NaN.
        if !((self.x + self.w).is_finite() && (self.y + self.h).is_finite()) {
            return Err(Error::InvalidArgument {
                what: "crop edge",
                requirement: "x + w and y + h must be finite",
            });
        }
        Ok(())
    }

    /// The crop's rectangle in source pixels.
    ///
    /// ```
    /// use sere_core::geometry::{CropBox, Rect};
    /// let c = CropBox::new(1.0, 2.0, 3.0, 4.0, true).unwrap();
    /// assert_eq!(c.rect(), Rect { x0: 1.0, y0: 2.0, x1: 4.0, y1: 6.0 });
    /// ```
    pub fn rect(&self) -> Rect {
        Rect {
            x0: self.x,
            y0: self.y,
            x1: self.x + self.w,
            y1: self.y + self.h,
        }
    }

    /// Maps a source-image point to this view's normalized `(u, v)`
    /// coordinates (`[-1, 1]` inside the crop; mirrored in `u` when flipped).
    ///
    /// ```
    /// use sere_core::geometry::CropBox;
    /// let c = CropBox::new(0.0, 0.0, 8.0, 8.0, true).unwrap();
    /// assert_eq!(c.to_normalized(0.0, 0.0), (1.0, -1.0));
    /// ```
    pub fn to_normalized(&self, px: f32, py: f32) -> (f32, f32) {
        let u = (px - self.x) / self.w * 2.0 - 1.0;
        let v = (py - self.y) / self.h * 2.0 - 1.0;
        (if self.flipped { -u } else { u }, v)
    }

    /// Inverse of [`CropBox::to_normalized`]: a view's normalized point back
    /// to source-image pixels.
    ///
    /// ```
    /// use sere_core::geometry::CropBox;
    /// let c = CropBox::new(3.0, 5.0, 10.0, 20.0, true).unwrap();
    /// let (u, v) = c.to_normalized(7.0, 9.0);
    /// let (x, y) = c.from_normalized(u, v);
    /// assert!((x - 7.0).abs() < 1e-5 && (y - 9.0).abs() < 1e-5);
    /// ```
    pub fn from_normalized(&self, u: f32, v: f32) -> (f32, f32) {
        let u = if self.flipped { -u } else { u };
        (
            self.x + (u + 1.0) * 0.5 * self.w,
            self.y + (v + 1.0) * 0.5 * self.h,
        )
    }
}

/// An axis-aligned rectangle `[x0, x1) x [y0, y1)` in source pixels.
///
/// ```
/// use sere_core::geometry::Rect;
/// let r = Rect { x0: 0.0, y0: 0.0, x1: 2.0, y1: 3.0 };
/// assert_eq!(r.area(), 6.0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rect {
    /// Left edge.
    pub x0: f32,
    /// Top edge.
    pub y0: f32,
    /// Right edge.
    pub x1: f32,
    /// Bottom edge.
    pub y1: f32,
}

impl Rect {
    /// Width times height.
    ///
    /// ```
    /// use sere_core::geometry::Rect;
    /// assert_eq!(Rect { x0: 1.0, y0: 1.0, x1: 2.0, y1: 5.0 }.area(), 4.0);
    /// ```
    pub fn area(&self) -> f32 {
        (self.x1 - self.x0) * (self.y1 - self.y0)
    }
}

/// The overlap of two crops in source pixels, or `None` when the crops share
/// no area (touching edges count as no overlap: there is nothing to sample).
///
/// ```
/// use sere_core::geometry::{overlap, CropBox, Rect};
/// let a = CropBox::new(0.0, 0.0, 10.0, 10.0, false).unwrap();
/// let b = CropBox::new(5.0, 2.0, 10.0, 4.0, true).unwrap();
/// assert_eq!(overlap(&a, &b), Some(Rect { x0: 5.0, y0: 2.0, x1: 10.0, y1: 6.0 }));
/// let far = CropBox::new(20.0, 0.0, 5.0, 5.0, false).unwrap();
/// assert_eq!(overlap(&a, &far), None);
/// ```
pub fn overlap(a: &CropBox, b: &CropBox) -> Option<Rect> {
    let (ra, rb) = (a.rect(), b.rect());
    // `f32::max`/`min` return the other operand when one is NaN, so NaN edges
    // (from unvalidated records) must be rejected before intersecting:
    // `!(x0 < x1)` holds for NaN. Non-NaN empty crops give `None` anyway.
    if !(ra.x0 < ra.x1 && ra.y0 < ra.y1 && rb.x0 < rb.x1 && rb.y0 < rb.y1) {
        return None;
    }
    let r = Rect {
        x0: ra.x0.max(rb.x0),
        y0: ra.y0.max(rb.y0),
        x1: ra.x1.min(rb.x1),
        y1: ra.y1.min(rb.y1),
    };
    if r.x0 < r.x1 && r.y0 < r.y1 {
        Some(r)
    } else {
        None
    }
}

/// Where the `S` grid points along one side of the overlap sit.
///
/// The default is [`GridPlacement::CellCentres`]: the overlap is split into
/// `S` equal cells and each point is a cell's centre, as the paper describes.
/// Every point then lies strictly inside both views, so bilinear sampling with
/// zero padding never blends in padding at the overlap's border, the grid is
/// symmetric, and a `1 x 1` grid is the overlap's centre.
/// [`GridPlacement::EdgeToEdge`] reproduces the authors' code (`i / (S - 1)`
/// across the overlap, first and last points on its edges); for `S = 1` it
/// falls back to the centre.
///
/// ```
/// use sere_core::geometry::GridPlacement;
/// assert_eq!(GridPlacement::default(), GridPlacement::CellCentres);
/// assert_eq!(GridPlacement::CellCentres.fraction(0, 2), 0.25);
/// assert_eq!(GridPlacement::EdgeToEdge.fraction(1, 2), 1.0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GridPlacement {
    /// Point `i` of `S` at fraction `(i + 0.5) / S` of the overlap.
    #[default]
    CellCentres,
    /// Point `i` of `S` at fraction `i / (S - 1)` (0.5 when `S = 1`).
    EdgeToEdge,
}

impl GridPlacement {
    /// Fraction of the way across the overlap at which point `i` of `s` sits.
    ///
    /// ```
    /// use sere_core::geometry::GridPlacement;
    /// assert_eq!(GridPlacement::EdgeToEdge.fraction(0, 1), 0.5);
    /// ```
    pub fn fraction(self, i: usize, s: usize) -> f32 {
        match self {
            GridPlacement::CellCentres => (i as f32 + 0.5) / s as f32,
            GridPlacement::EdgeToEdge if s <= 1 => 0.5,
            GridPlacement::EdgeToEdge => i as f32 / (s - 1) as f32,
        }
    }
}

/// Fills the sampling grids of two overlapping crops: the overlap split into
/// `hs x ws` points (row-major, `y` outer), each mapped into view `a`
/// (`grid_a`) and view `b` (`grid_b`) as `(x, y)` normalized pairs.
/// Both grids have length `hs * ws * 2`.
///
/// Returns the overlap rectangle, or `Ok(None)` without touching the grids
/// when the crops do not overlap (such a pair has no spatial term).
///
/// ```
/// use sere_core::geometry::{overlap_grids, CropBox, GridPlacement};
/// let a = CropBox::new(0.0, 0.0, 4.0, 4.0, false).unwrap();
/// let b = CropBox::new(2.0, 0.0, 4.0, 4.0, false).unwrap();
/// let (mut ga, mut gb) = ([0.0f32; 2], [0.0f32; 2]);
/// let r = overlap_grids(&a, &b, 1, 1, GridPlacement::CellCentres, &mut ga, &mut gb).unwrap();
/// assert!(r.is_some());
/// assert_eq!(ga, [0.5, 0.0]); // overlap centre x = 3 is at u = 0.5 in view a
/// assert_eq!(gb, [-0.5, 0.0]); // ... and at u = -0.5 in view b
/// ```
pub fn overlap_grids(
    a: &CropBox,
    b: &CropBox,
    hs: usize,
    ws: usize,
    placement: GridPlacement,
    grid_a: &mut [f32],
    grid_b: &mut [f32],
) -> Result<Option<Rect>> {
    a.validate()?;
    b.validate()?;
    check_nonzero("hs", hs)?;
    check_nonzero("ws", ws)?;
    let p = shape_product("grid size", &[hs, ws, 2])?;
    check_len("grid_a", grid_a.len(), p)?;
    check_len("grid_b", grid_b.len(), p)?;
    let Some(r) = overlap(a, b) else {
        return Ok(None);
    };
    for i in 0..hs {
        let py = r.y0 + placement.fraction(i, hs) * (r.y1 - r.y0);
        for j in 0..ws {
            let px = r.x0 + placement.fraction(j, ws) * (r.x1 - r.x0);
            let k = 2 * (i * ws + j);
            let (ua, va) = a.to_normalized(px, py);
            let (ub, vb) = b.to_normalized(px, py);
            grid_a[k] = ua;
            grid_a[k + 1] = va;
            grid_b[k] = ub;
            grid_b[k + 1] = vb;
        }
    }
    Ok(Some(r))
}
