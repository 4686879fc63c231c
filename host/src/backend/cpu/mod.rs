//! The CPU backend ([`Cpu`]): `sere-core`'s row-level kernels split over
//! rayon's threads. Matmuls go through [`gemm`] (a blocked AVX2 + FMA SGEMM,
//! matrixmultiply elsewhere; single-threaded per call): splitting rows (or
//! output features) across rayon's pool keeps one thread pool, instead of
//! nesting a GEMM's own pool inside rayon's.

mod attention;
mod batch_norm;
mod gemm;
mod ops;
pub mod relation_loss;
mod rows;

use crate::backend::{standard, standard_mut, InputGrad, LinearShape, LN_EPS};
pub use gemm::{gemm, gemm_bias, gemm_bias_on, GemmPath};
use ndarray::{ArrayView2, ArrayViewMut2};
pub use ops::{Cpu, CpuScratch};
use rayon::prelude::*;
use sere_core::linalg::MatRef;
use sere_core::{Error, Result};

/// Rows per parallel task so that each task still amortises GEMM packing.
fn chunk_rows(rows: usize, min: usize) -> usize {
    let t = rayon::current_num_threads().max(1);
    rows.div_ceil(t).max(min).max(1)
}

/// The leading `rows x cols` values of a buffer as a row-major matrix: where
/// a CPU op checks, once, that its buffer holds the shape it names (a
/// buffer may be longer: workspaces are shaped for their largest use).
pub fn matrix<'a>(
    buf: &'a [f32],
    (rows, cols): (usize, usize),
    what: &'static str,
) -> Result<ArrayView2<'a, f32>> {
    let n = leading(buf.len(), rows, cols, what)?;
    Ok(ArrayView2::from_shape((rows, cols), &buf[..n]).expect("length checked"))
}

/// [`matrix`], mutable.
pub fn matrix_mut<'a>(
    buf: &'a mut [f32],
    (rows, cols): (usize, usize),
    what: &'static str,
) -> Result<ArrayViewMut2<'a, f32>> {
    let n = leading(buf.len(), rows, cols, what)?;
    Ok(ArrayViewMut2::from_shape((rows, cols), &mut buf[..n]).expect("length checked"))
}

/// The leading `n` values of a buffer, or the error naming it when it is
/// shorter.
pub fn leading_mut<'a>(buf: &'a mut [f32], n: usize, what: &'static str) -> Result<&'a mut [f32]> {
    let n = leading(buf.len(), n, 1, what)?;
    Ok(&mut buf[..n])
}

/// `rows * cols`, when a buffer of `len` values holds that many.
fn leading(len: usize, rows: usize, cols: usize, what: &'static str) -> Result<usize> {
    match rows.checked_mul(cols) {
        Some(n) if n <= len => Ok(n),
        n => Err(Error::ShapeMismatch {
            what,
            expected: n.unwrap_or(usize::MAX),
            got: len,
        }),
    }
}

/// `Ok` when `got == expected` (a dimension of `what`).
fn same(what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            what,
            expected,
            got,
        })
    }
}

/// The shape of a linear layer with input `x` (`rows x inp`) and weight `w`
/// (`out x inp`), checked against its bias (`out`).
fn linear_shape(
    x: &ArrayView2<'_, f32>,
    w: &ArrayView2<'_, f32>,
    b: Option<&[f32]>,
) -> Result<LinearShape> {
    let ((rows, inp), out) = (x.dim(), w.nrows());
    same("weight columns", w.ncols(), inp)?;
    if let Some(b) = b {
        same("bias", b.len(), out)?;
    }
    Ok(LinearShape { rows, inp, out })
}

/// `y = x W^T (+ b)` for `x` (`rows x inp`), `w` (`out x inp`, PyTorch's
/// layout) and `b` (`out`); `y` (`rows x out`) overwritten. Row chunks run
/// on rayon's threads, each one GEMM; the views become slices and
/// [`MatRef`]s only there.
///
/// ```
/// use ndarray::{array, Array2};
/// use sere_host::backend::cpu::linear_fwd;
/// let (x, w) = (array![[1.0f32, 2.0]], array![[1.0f32, 1.0], [0.0, 3.0]]);
/// let mut y = Array2::zeros((1, 2));
/// linear_fwd(x.view(), w.view(), Some(&[0.5, 0.0]), y.view_mut()).unwrap();
/// assert_eq!(y, array![[3.5, 6.0]]);
/// ```
///
/// # Errors
/// [`Error::ShapeMismatch`] when the shapes do not fit together,
/// [`Error::InvalidArgument`] for a view not in standard layout.
pub fn linear_fwd(
    x: ArrayView2<'_, f32>,
    w: ArrayView2<'_, f32>,
    b: Option<&[f32]>,
    y: ArrayViewMut2<'_, f32>,
) -> Result<()> {
    let s = linear_shape(&x, &w, b)?;
    same("y rows", y.nrows(), s.rows)?;
    same("y columns", y.ncols(), s.out)?;
    let (x, w, y) = (
        standard(&x, "x")?,
        standard(&w, "weight")?,
        standard_mut(y, "y")?,
    );
    let rc = chunk_rows(s.rows, 32);
    y.par_chunks_mut(rc * s.out)
        .zip(x.par_chunks(rc * s.inp))
        .try_for_each(|(yc, xc)| {
            let r = xc.len() / s.inp;
            gemm_bias(
                1.0,
                xc,
                MatRef::row_major(r, s.inp),
                w,
                MatRef::row_major(s.out, s.inp).transposed(),
                0.0,
                b,
                yc,
                MatRef::row_major(r, s.out),
            )
        })
}

/// Backward of [`linear_fwd`] given its input `x` and `dy` (`rows x out`):
/// `dx += dy W` or `dx = dy W` (by [`InputGrad`]; `dx` holds `rows x inp`
/// values, row-major), `dw += dy^T x`, `db += sum(dy)`.
///
/// # Errors
/// As [`linear_fwd`].
pub fn linear_bwd(
    x: ArrayView2<'_, f32>,
    w: ArrayView2<'_, f32>,
    dy: ArrayView2<'_, f32>,
    dx: InputGrad<'_, [f32]>,
    dw: ArrayViewMut2<'_, f32>,
    db: Option<&mut [f32]>,
) -> Result<()> {
    let s = linear_shape(&x, &w, db.as_deref())?;
    same("dy rows", dy.nrows(), s.rows)?;
    same("dy columns", dy.ncols(), s.out)?;
    same("dw rows", dw.nrows(), s.out)?;
    same("dw columns", dw.ncols(), s.inp)?;
    let (x, w, dy) = (
        standard(&x, "x")?,
        standard(&w, "weight")?,
        standard(&dy, "dy")?,
    );
    if let Some((dx, beta)) = dx.with_beta() {
        same("dx", dx.len(), s.rows * s.inp)?;
        linear_bwd_dx(dy, w, s, beta, dx)?;
    }
    linear_bwd_dw(dy, x, s, standard_mut(dw, "dw")?)?;
    if let Some(db) = db {
        column_sums_add(dy, s.out, db);
    }
    Ok(())
}

/// `dx = dy W + beta dx`, row chunks across threads.
fn linear_bwd_dx(dy: &[f32], w: &[f32], s: LinearShape, beta: f32, dx: &mut [f32]) -> Result<()> {
    let rc = chunk_rows(s.rows, 32);
    dx.par_chunks_mut(rc * s.inp)
        .zip(dy.par_chunks(rc * s.out))
        .try_for_each(|(dxc, dyc)| {
            let r = dyc.len() / s.out;
            gemm(
                1.0,
                dyc,
                MatRef::row_major(r, s.out),
                w,
                MatRef::row_major(s.out, s.inp),
                beta,
                dxc,
                MatRef::row_major(r, s.inp),
            )
        })
}

/// `dw += dy^T x`. Rows of `dw` (output features) are independent: chunks
/// of them across threads, each reading a column block of `dy` in place.
fn linear_bwd_dw(dy: &[f32], x: &[f32], s: LinearShape, dw: &mut [f32]) -> Result<()> {
    let oc = chunk_rows(s.out, 16);
    dw.par_chunks_mut(oc * s.inp)
        .enumerate()
        .try_for_each(|(i, dwc)| {
            let o = dwc.len() / s.inp;
            let dy_block = MatRef {
                offset: i * oc,
                rows: o,
                cols: s.rows,
                row_stride: 1,
                col_stride: s.out,
            };
            gemm(
                1.0,
                dy,
                dy_block,
                x,
                MatRef::row_major(s.rows, s.inp),
                1.0,
                dwc,
                MatRef::row_major(o, s.inp),
            )
        })
}

/// `sums[j] += sum_r m[r][j]` over the rows of `m` (`cols` wide), column
/// chunks across threads.
fn column_sums_add(m: &[f32], cols: usize, sums: &mut [f32]) {
    let oc = chunk_rows(cols, 64);
    sums.par_chunks_mut(oc).enumerate().for_each(|(i, sc)| {
        let o0 = i * oc;
        let len = sc.len();
        for row in m.chunks_exact(cols) {
            for (d, &g) in sc.iter_mut().zip(&row[o0..o0 + len]) {
                *d += g;
            }
        }
    });
}

/// Layer norm (eps `1e-6`, timm's) of the rows of `x` (`rows x cols`) with
/// scale and shift `(gamma, beta)` into `y`; each row's mean and `1 / std`
/// into `(mean, rstd)`. Row chunks across threads.
///
/// # Errors
/// [`Error::ShapeMismatch`] for sizes that do not fit `x`,
/// [`Error::InvalidArgument`] for a view not in standard layout.
pub fn layer_norm_fwd(
    x: ArrayView2<'_, f32>,
    (gamma, beta): (&[f32], &[f32]),
    y: ArrayViewMut2<'_, f32>,
    (mean, rstd): (&mut [f32], &mut [f32]),
) -> Result<()> {
    let (rows, cols) = x.dim();
    same("y rows", y.nrows(), rows)?;
    same("y columns", y.ncols(), cols)?;
    same("mean", mean.len(), rows)?;
    same("rstd", rstd.len(), rows)?;
    let (x, y) = (standard(&x, "x")?, standard_mut(y, "y")?);
    let rc = chunk_rows(rows, 64);
    y.par_chunks_mut(rc * cols)
        .zip(x.par_chunks(rc * cols))
        .zip(mean.par_chunks_mut(rc).zip(rstd.par_chunks_mut(rc)))
        .try_for_each(|((yc, xc), (mc, rc_))| {
            sere_core::norm::layer_norm_forward(
                xc,
                gamma,
                beta,
                mc.len(),
                cols,
                LN_EPS,
                yc,
                mc,
                rc_,
            )
        })
}

/// Backward of [`layer_norm_fwd`] given its input and saved statistics
/// `(x, mean, rstd)`: `dx += ...`, `dgamma += ...`, `dbeta += ...`.
/// `scratch` holds per-task partial sums of `dgamma`/`dbeta` (grown once).
///
/// # Errors
/// As [`layer_norm_fwd`].
pub fn layer_norm_bwd(
    (x, mean, rstd): (ArrayView2<'_, f32>, &[f32], &[f32]),
    gamma: &[f32],
    dy: ArrayView2<'_, f32>,
    (dx, (dgamma, dbeta)): (ArrayViewMut2<'_, f32>, (&mut [f32], &mut [f32])),
    scratch: &mut Vec<f32>,
) -> Result<()> {
    let (rows, cols) = x.dim();
    same("dy rows", dy.nrows(), rows)?;
    same("dy columns", dy.ncols(), cols)?;
    same("dx rows", dx.nrows(), rows)?;
    same("dx columns", dx.ncols(), cols)?;
    same("mean", mean.len(), rows)?;
    same("rstd", rstd.len(), rows)?;
    let (x, dy, dx) = (
        standard(&x, "x")?,
        standard(&dy, "dy")?,
        standard_mut(dx, "dx")?,
    );
    let rc = chunk_rows(rows, 64);
    let tasks = rows.div_ceil(rc);
    scratch.clear();
    scratch.resize(tasks * 2 * cols, 0.0);
    dx.par_chunks_mut(rc * cols)
        .zip(x.par_chunks(rc * cols).zip(dy.par_chunks(rc * cols)))
        .zip(mean.par_chunks(rc).zip(rstd.par_chunks(rc)))
        .zip(scratch.par_chunks_mut(2 * cols))
        .try_for_each(|(((dxc, (xc, dyc)), (mc, sc)), part)| {
            let (pg, pb) = part.split_at_mut(cols);
            sere_core::norm::layer_norm_backward(
                xc,
                gamma,
                mc,
                sc,
                dyc,
                mc.len(),
                cols,
                dxc,
                pg,
                pb,
            )
        })?;
    for part in scratch.chunks_exact(2 * cols) {
        for j in 0..cols {
            dgamma[j] += part[j];
            dbeta[j] += part[cols + j];
        }
    }
    Ok(())
}

/// Element-wise GELU, parallel.
pub fn gelu_fwd(x: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(yc, xc)| {
            sere_core::activation::gelu_forward(xc, yc).expect("gelu shapes");
        });
}

/// `dx += dy * gelu'(x)`, parallel.
pub fn gelu_bwd(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    dx.par_chunks_mut(4096)
        .zip(x.par_chunks(4096).zip(dy.par_chunks(4096)))
        .for_each(|(dxc, (xc, dyc))| {
            sere_core::activation::gelu_backward(xc, dyc, dxc).expect("gelu_bwd shapes");
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, Cpu, LinearParams, NormParams, OpError, Rows};
    use ndarray::Array2;

    fn shape_error(r: crate::backend::OpResult) -> &'static str {
        match r {
            Err(OpError::Kernel(Error::ShapeMismatch { what, .. })) => what,
            other => panic!("expected a shape mismatch, got {other:?}"),
        }
    }

    #[test]
    fn linear_ops_name_a_buffer_too_short_for_their_shape() {
        let s = LinearShape {
            rows: 3,
            inp: 2,
            out: 4,
        };
        let layer = LinearParams {
            weight: 0..8,
            bias: Some(8..12),
        };
        let p = vec![0.5; 12];
        let (x, mut y) = (vec![1.0; 6], vec![0.0; 12]);
        assert_eq!(
            shape_error(Cpu.linear_forward(&x[..5].to_vec(), layer.of(&p), s, &mut y)),
            "x"
        );
        assert_eq!(
            shape_error(Cpu.linear_forward(&x, layer.of(&p), s, &mut vec![0.0; 11])),
            "y"
        );
        let short_weight = LinearParams {
            weight: 0..7,
            bias: None,
        };
        assert_eq!(
            shape_error(Cpu.linear_forward(&x, short_weight.of(&p), s, &mut y)),
            "weight"
        );
        let (dy, mut g) = (vec![1.0; 12], vec![0.0; 12]);
        let mut dx = vec![0.0; 5];
        let r = Cpu.linear_backward(&x, &dy, layer.of(&p), s, InputGrad::Write(&mut dx), &mut g);
        assert_eq!(shape_error(r), "dx");
        // Longer buffers are fine: the leading values are used.
        let mut y = vec![7.0; 13];
        Cpu.linear_forward(&x, layer.of(&p), s, &mut y).unwrap();
        assert_eq!((y[0], y[12]), (1.5, 7.0));
    }

    #[test]
    fn layer_norm_names_a_buffer_too_short_for_its_shape() {
        let norm = NormParams {
            gamma: 0..4,
            beta: 4..8,
        };
        let p = vec![1.0; 8];
        let (x, mut y) = (vec![1.0; 8], vec![0.0; 7]);
        let (mut mean, mut rstd) = (vec![0.0; 2], vec![0.0; 2]);
        let r = Cpu.layer_norm_forward(
            &x,
            norm.of(&p),
            Rows::new(2, 4),
            &mut y,
            (&mut mean, &mut rstd),
        );
        assert_eq!(shape_error(r), "y");
    }

    #[test]
    fn the_kernels_refuse_views_not_in_standard_layout() {
        let x = Array2::<f32>::ones((2, 3));
        let mut y = Array2::<f32>::zeros((3, 3));
        // x.t() is 3 x 2 column-major: the shapes fit only the transposed x.
        let xt = x.t();
        let w2 = Array2::<f32>::ones((3, 2));
        let err = linear_fwd(xt, w2.view(), None, y.view_mut()).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { what: "x", .. }),
            "{err:?}"
        );
        // Mismatched widths are a shape error, before any layout question.
        let err = linear_fwd(x.view(), w2.view(), None, y.view_mut()).unwrap_err();
        assert!(
            matches!(
                err,
                Error::ShapeMismatch {
                    what: "weight columns",
                    ..
                }
            ),
            "{err:?}"
        );
    }
}
