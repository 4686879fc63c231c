//! A validated SGEMM on strided views, and the linear layer built on it.
//!
//! Without the `alloc` feature, [`gemm`] is a plain loop that allocates
//! nothing (one `f32` dot product per element of `C`, summed in order). With
//! `alloc` (implied by `std`) it calls `matrixmultiply`'s tuned SGEMM, which
//! packs its operands into buffers it allocates from the global allocator on
//! every call; with `std`, matrixmultiply also picks AVX/AVX2/FMA/AVX-512
//! kernels at run time. Both compute `C = alpha A B + beta C` to `f32`
//! rounding; their summation orders differ.
//!
//! Matrices are described by [`MatRef`] views (offset, rows, cols, row
//! stride, column stride) so that heads, transposes and sub-blocks are used
//! in place, without copies.

use crate::error::{check_len, Error, Result};

/// A strided view of a matrix inside a slice: element `(i, j)` is at
/// `offset + i * row_stride + j * col_stride`.
///
/// ```
/// use sere_core::linalg::MatRef;
/// let m = MatRef::row_major(2, 3);
/// assert_eq!(m.transposed().rows, 3);
/// assert_eq!(m.required_len(), 6);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatRef {
    /// Index of element `(0, 0)`.
    pub offset: usize,
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// Distance between consecutive rows.
    pub row_stride: usize,
    /// Distance between consecutive columns.
    pub col_stride: usize,
}

impl MatRef {
    /// A dense row-major `rows x cols` matrix at offset 0.
    ///
    /// ```
    /// use sere_core::linalg::MatRef;
    /// assert_eq!(MatRef::row_major(4, 5).row_stride, 5);
    /// ```
    pub fn row_major(rows: usize, cols: usize) -> Self {
        MatRef {
            offset: 0,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The same storage read as the transpose.
    ///
    /// ```
    /// use sere_core::linalg::MatRef;
    /// let t = MatRef::row_major(2, 3).transposed();
    /// assert_eq!((t.rows, t.cols, t.row_stride, t.col_stride), (3, 2, 1, 3));
    /// ```
    pub fn transposed(self) -> Self {
        MatRef {
            offset: self.offset,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// The same layout starting `offset` elements further on.
    ///
    /// ```
    /// use sere_core::linalg::MatRef;
    /// assert_eq!(MatRef::row_major(2, 2).at(8).offset, 8);
    /// ```
    pub fn at(self, offset: usize) -> Self {
        MatRef { offset, ..self }
    }

    /// Smallest slice length that holds every element (0 for an empty view);
    /// `usize::MAX` if that length would overflow.
    ///
    /// ```
    /// use sere_core::linalg::MatRef;
    /// assert_eq!(MatRef::row_major(3, 4).at(2).required_len(), 14);
    /// ```
    pub fn required_len(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return 0;
        }
        let last = (self.rows - 1)
            .checked_mul(self.row_stride)
            .and_then(|a| {
                (self.cols - 1)
                    .checked_mul(self.col_stride)
                    .and_then(|b| a.checked_add(b))
            })
            .and_then(|a| a.checked_add(self.offset))
            .and_then(|a| a.checked_add(1));
        last.unwrap_or(usize::MAX)
    }

    fn fits(&self, what: &'static str, len: usize) -> Result<()> {
        let need = self.required_len();
        if need <= len
            && self.row_stride <= isize::MAX as usize
            && self.col_stride <= isize::MAX as usize
        {
            Ok(())
        } else {
            Err(Error::ShapeMismatch {
                what,
                expected: need,
                got: len,
            })
        }
    }
}

/// The checks [`gemm`] makes before touching memory, for other GEMM
/// implementations over the same views: `A` is `m x k`, `B` `k x n`, `C`
/// `m x n`; each view (with its slice length) lies inside its slice with
/// strides that fit `isize`; `C`'s strides address distinct elements.
///
/// Not part of the stable API (hidden from the docs): it serves the blocked
/// SGEMM of `sere-host`, and its argument shape follows [`MatRef`]'s.
///
/// ```
/// use sere_core::linalg::{check_gemm_views, MatRef};
/// let m = MatRef::row_major(2, 3);
/// assert!(check_gemm_views((m, 6), (m.transposed(), 6), (MatRef::row_major(2, 2), 4)).is_ok());
/// assert!(check_gemm_views((m, 5), (m.transposed(), 6), (MatRef::row_major(2, 2), 4)).is_err());
/// ```
#[doc(hidden)]
pub fn check_gemm_views(
    (am, a_len): (MatRef, usize),
    (bm, b_len): (MatRef, usize),
    (cm, c_len): (MatRef, usize),
) -> Result<()> {
    if am.cols != bm.rows || am.rows != cm.rows || bm.cols != cm.cols {
        return Err(Error::InvalidArgument {
            what: "gemm shapes",
            requirement: "A is m x k, B is k x n and C is m x n",
        });
    }
    am.fits("A", a_len)?;
    bm.fits("B", b_len)?;
    cm.fits("C", c_len)?;
    if cm.rows > 1 && cm.cols > 1 && (cm.row_stride == 0 || cm.col_stride == 0) {
        return Err(Error::InvalidArgument {
            what: "C strides",
            requirement: "must address distinct elements",
        });
    }
    Ok(())
}

/// `C = alpha * A B + beta * C` on strided views (SGEMM). With `beta == 0`
/// the previous contents of `C` are ignored (NaN included). `C` must not
/// overlap itself (row and column strides such that elements are distinct),
/// which holds for any row-major or column-major view. Allocates nothing
/// unless the `alloc` feature is on (see the module docs).
///
/// ```
/// use sere_core::linalg::{gemm, MatRef};
/// let a = [1.0f32, 2.0, 3.0, 4.0]; // 2x2
/// let b = [1.0f32, 0.0, 0.0, 1.0]; // identity
/// let mut c = [0.0f32; 4];
/// let m = MatRef::row_major(2, 2);
/// gemm(1.0, &a, m, &b, m, 0.0, &mut c, m).unwrap();
/// assert_eq!(c, a);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    alpha: f32,
    a: &[f32],
    am: MatRef,
    b: &[f32],
    bm: MatRef,
    beta: f32,
    c: &mut [f32],
    cm: MatRef,
) -> Result<()> {
    check_gemm_views((am, a.len()), (bm, b.len()), (cm, c.len()))?;
    if cm.rows == 0 || cm.cols == 0 {
        return Ok(());
    }
    sgemm(alpha, a, am, b, bm, beta, c, cm);
    Ok(())
}

/// The tuned SGEMM (packing buffers from the global allocator).
#[cfg(feature = "alloc")]
#[allow(clippy::too_many_arguments)]
fn sgemm(
    alpha: f32,
    a: &[f32],
    am: MatRef,
    b: &[f32],
    bm: MatRef,
    beta: f32,
    c: &mut [f32],
    cm: MatRef,
) {
    // SAFETY: every view was checked to lie inside its slice (`fits`), the
    // strides fit in isize, and `c` is uniquely borrowed, so matrixmultiply
    // reads and writes only in-bounds elements of the three slices.
    unsafe {
        matrixmultiply::sgemm(
            am.rows,
            am.cols,
            bm.cols,
            alpha,
            a.as_ptr().add(am.offset),
            am.row_stride as isize,
            am.col_stride as isize,
            b.as_ptr().add(bm.offset),
            bm.row_stride as isize,
            bm.col_stride as isize,
            beta,
            c.as_mut_ptr().add(cm.offset),
            cm.row_stride as isize,
            cm.col_stride as isize,
        );
    }
}

/// The allocation-free SGEMM: one dot product per element of `C`. The views
/// were checked to lie inside their slices, so no index is out of bounds.
#[cfg(not(feature = "alloc"))]
#[allow(clippy::too_many_arguments)]
fn sgemm(
    alpha: f32,
    a: &[f32],
    am: MatRef,
    b: &[f32],
    bm: MatRef,
    beta: f32,
    c: &mut [f32],
    cm: MatRef,
) {
    for i in 0..cm.rows {
        let a_row = am.offset + i * am.row_stride;
        for j in 0..cm.cols {
            let b_col = bm.offset + j * bm.col_stride;
            let mut acc = 0.0f32;
            for p in 0..am.cols {
                acc += a[a_row + p * am.col_stride] * b[b_col + p * bm.row_stride];
            }
            let k = cm.offset + i * cm.row_stride + j * cm.col_stride;
            // beta == 0 ignores C's previous contents (NaN included).
            c[k] = if beta == 0.0 {
                alpha * acc
            } else {
                alpha * acc + beta * c[k]
            };
        }
    }
}

/// Linear layer forward, PyTorch layout: `y = x W^T + b` with `x` as
/// `rows x inp`, `weight` as `out x inp`, `bias` of length `out`, `y` as
/// `rows x out` (overwritten).
///
/// ```
/// use sere_core::linalg::linear_forward;
/// let w = [1.0f32, 1.0, 0.0, 2.0]; // out 2 x in 2
/// let mut y = [0.0f32; 2];
/// linear_forward(&[3.0, 4.0], &w, Some(&[0.5, 0.0]), 1, 2, 2, &mut y).unwrap();
/// assert_eq!(y, [7.5, 8.0]);
/// ```
pub fn linear_forward(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    rows: usize,
    inp: usize,
    out: usize,
    y: &mut [f32],
) -> Result<()> {
    check_len("x", x.len(), rows.saturating_mul(inp))?;
    check_len("weight", weight.len(), out.saturating_mul(inp))?;
    check_len("y", y.len(), rows.saturating_mul(out))?;
    if let Some(b) = bias {
        check_len("bias", b.len(), out)?;
        for row in y.chunks_exact_mut(out.max(1)) {
            row.copy_from_slice(b);
        }
    }
    let beta = if bias.is_some() { 1.0 } else { 0.0 };
    gemm(
        1.0,
        x,
        MatRef::row_major(rows, inp),
        weight,
        MatRef::row_major(out, inp).transposed(),
        beta,
        y,
        MatRef::row_major(rows, out),
    )
}

/// Linear layer backward: given `dy` (`rows x out`), adds `dy W` to `dx`,
/// `dy^T x` to `dweight` and the column sums of `dy` to `dbias`. Pass `None`
/// for gradients that are not needed (e.g. `dx` of the first layer).
///
/// ```
/// use sere_core::linalg::linear_backward;
/// let (x, w) = ([3.0f32, 4.0], [1.0f32, 1.0, 0.0, 2.0]);
/// let (mut dx, mut dw, mut db) = ([0.0f32; 2], [0.0f32; 4], [0.0f32; 2]);
/// linear_backward(&x, &w, &[1.0, 0.0], 1, 2, 2, Some(&mut dx), Some(&mut dw), Some(&mut db)).unwrap();
/// assert_eq!(dx, [1.0, 1.0]);
/// assert_eq!(dw, [3.0, 4.0, 0.0, 0.0]);
/// assert_eq!(db, [1.0, 0.0]);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    x: &[f32],
    weight: &[f32],
    dy: &[f32],
    rows: usize,
    inp: usize,
    out: usize,
    dx: Option<&mut [f32]>,
    dweight: Option<&mut [f32]>,
    dbias: Option<&mut [f32]>,
) -> Result<()> {
    check_len("x", x.len(), rows.saturating_mul(inp))?;
    check_len("weight", weight.len(), out.saturating_mul(inp))?;
    check_len("dy", dy.len(), rows.saturating_mul(out))?;
    if let Some(dx) = dx {
        gemm(
            1.0,
            dy,
            MatRef::row_major(rows, out),
            weight,
            MatRef::row_major(out, inp),
            1.0,
            dx,
            MatRef::row_major(rows, inp),
        )?;
    }
    if let Some(dw) = dweight {
        gemm(
            1.0,
            dy,
            MatRef::row_major(rows, out).transposed(),
            x,
            MatRef::row_major(rows, inp),
            1.0,
            dw,
            MatRef::row_major(out, inp),
        )?;
    }
    if let Some(db) = dbias {
        check_len("dbias", db.len(), out)?;
        for row in dy.chunks_exact(out.max(1)) {
            for (d, &g) in db.iter_mut().zip(row) {
                *d += g;
            }
        }
    }
    Ok(())
}
