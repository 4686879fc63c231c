//! Numerically stable row softmax and log-softmax, and their backward passes.
//!
//! Every row is shifted by its maximum before exponentiation, so logits of
//! magnitude 1e4 (or 1e30) neither overflow nor underflow to NaN. A NaN or
//! infinite input is reported as [`Error::NonFinite`] rather than propagated.

use crate::error::{check_len, check_nonzero, shape_product, Error, Result};
use crate::fastmath::exp as expf;
use crate::simd::{dot, sum, sum_map};
use libm::logf;

/// Maximum of a row, or an error if any element is not finite.
#[inline]
pub(crate) fn row_max(row: &[f32], what: &'static str) -> Result<f32> {
    let mut m = f32::NEG_INFINITY;
    let mut finite = true;
    for &v in row {
        finite &= v.is_finite();
        m = m.max(v);
    }
    if finite {
        Ok(m)
    } else {
        Err(Error::NonFinite { what })
    }
}

fn check_rows(what: &'static str, len: usize, rows: usize, cols: usize) -> Result<()> {
    check_nonzero("rows", rows)?;
    check_nonzero("cols", cols)?;
    check_len(what, len, shape_product("rows x cols", &[rows, cols])?)
}

/// Row-wise softmax of a `rows x cols` row-major matrix into `out`.
///
/// ```
/// use sere_core::softmax::softmax_rows;
/// let mut p = [0.0f32; 3];
/// softmax_rows(&[1e4, 1e4, -1e4], 1, 3, &mut p).unwrap();
/// assert!((p[0] - 0.5).abs() < 1e-6 && p[2] == 0.0);
/// ```
pub fn softmax_rows(x: &[f32], rows: usize, cols: usize, out: &mut [f32]) -> Result<()> {
    check_rows("input", x.len(), rows, cols)?;
    check_len("out", out.len(), x.len())?;
    out.copy_from_slice(x);
    softmax_in_place(out, cols)
}

/// Row-wise softmax in place (the attention-probability step).
///
/// ```
/// use sere_core::softmax::softmax_rows_in_place;
/// let mut a = [0.0f32, 0.0, 5.0, 5.0];
/// softmax_rows_in_place(&mut a, 2, 2).unwrap();
/// assert_eq!(a, [0.5, 0.5, 0.5, 0.5]);
/// ```
pub fn softmax_rows_in_place(x: &mut [f32], rows: usize, cols: usize) -> Result<()> {
    check_rows("input", x.len(), rows, cols)?;
    softmax_in_place(x, cols)
}

/// Row-wise log-softmax: `x - max - ln(sum(exp(x - max)))`.
///
/// ```
/// use sere_core::softmax::log_softmax_rows;
/// let mut l = [0.0f32; 2];
/// log_softmax_rows(&[3.0, 3.0], 1, 2, &mut l).unwrap();
/// assert!((l[0] + core::f32::consts::LN_2).abs() < 1e-6);
/// ```
pub fn log_softmax_rows(x: &[f32], rows: usize, cols: usize, out: &mut [f32]) -> Result<()> {
    check_rows("input", x.len(), rows, cols)?;
    check_len("out", out.len(), x.len())?;
    log_softmax(x, cols, out)
}

/// Backward of softmax given its output `y` and upstream gradient `dy`:
/// adds `y * (dy - <dy, y>)` to `dx` (row-wise).
///
/// ```
/// use sere_core::softmax::softmax_backward_rows;
/// let y = [0.5f32, 0.5];
/// let mut dx = [0.0f32; 2];
/// softmax_backward_rows(&y, &[1.0, 1.0], 1, 2, &mut dx).unwrap();
/// assert_eq!(dx, [0.0, 0.0]); // a constant shift has no effect on softmax
/// ```
pub fn softmax_backward_rows(
    y: &[f32],
    dy: &[f32],
    rows: usize,
    cols: usize,
    dx: &mut [f32],
) -> Result<()> {
    check_rows("y", y.len(), rows, cols)?;
    check_len("dy", dy.len(), y.len())?;
    check_len("dx", dx.len(), y.len())?;
    for ((yr, dyr), dxr) in y
        .chunks_exact(cols)
        .zip(dy.chunks_exact(cols))
        .zip(dx.chunks_exact_mut(cols))
    {
        let dot = dot(yr, dyr);
        for ((d, &yv), &g) in dxr.iter_mut().zip(yr).zip(dyr) {
            *d += yv * (g - dot);
        }
    }
    Ok(())
}

/// Backward of log-softmax given its output `l` and upstream gradient `dl`:
/// adds `dl - softmax * sum(dl)` to `dx` (row-wise).
///
/// ```
/// use sere_core::softmax::log_softmax_backward_rows;
/// let l = [-core::f32::consts::LN_2; 2];
/// let mut dx = [0.0f32; 2];
/// log_softmax_backward_rows(&l, &[1.0, 0.0], 1, 2, &mut dx).unwrap();
/// assert!((dx[0] - 0.5).abs() < 1e-6 && (dx[1] + 0.5).abs() < 1e-6);
/// ```
pub fn log_softmax_backward_rows(
    l: &[f32],
    dl: &[f32],
    rows: usize,
    cols: usize,
    dx: &mut [f32],
) -> Result<()> {
    check_rows("l", l.len(), rows, cols)?;
    check_len("dl", dl.len(), l.len())?;
    check_len("dx", dx.len(), l.len())?;
    for ((lr, dlr), dxr) in l
        .chunks_exact(cols)
        .zip(dl.chunks_exact(cols))
        .zip(dx.chunks_exact_mut(cols))
    {
        let s: f32 = dlr.iter().sum();
        for ((d, &lv), &g) in dxr.iter_mut().zip(lr).zip(dlr) {
            *d += g - expf(lv) * s;
        }
    }
    Ok(())
}

crate::simd::multiversion! {
    /// Softmax of each `cols`-long row of `x`, in place.
    fn softmax_in_place(x: &mut [f32], cols: usize) -> Result<()> {
        for r in x.chunks_exact_mut(cols) {
            let m = row_max(r, "softmax input")?;
            for v in r.iter_mut() {
                *v = expf(*v - m);
            }
            let inv = 1.0 / sum(r);
            r.iter_mut().for_each(|v| *v *= inv);
        }
        Ok(())
    }
}

crate::simd::multiversion! {
    /// Log-softmax of each `cols`-long row of `x` into `out`.
    fn log_softmax(x: &[f32], cols: usize, out: &mut [f32]) -> Result<()> {
        for (xr, yr) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
            let m = row_max(xr, "log-softmax input")?;
            let lse = logf(sum_map(xr, |v| expf(v - m)));
            for (y, &v) in yr.iter_mut().zip(xr) {
                *y = (v - m) - lse;
            }
        }
        Ok(())
    }
}
