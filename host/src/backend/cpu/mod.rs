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

use crate::backend::{InputGrad, LN_EPS};
pub use gemm::{gemm, gemm_bias, gemm_bias_on, GemmPath};
pub use ops::{Cpu, CpuScratch};
use rayon::prelude::*;
use sere_core::linalg::MatRef;

/// Rows per parallel task so that each task still amortises GEMM packing.
fn chunk_rows(rows: usize, min: usize) -> usize {
    let t = rayon::current_num_threads().max(1);
    rows.div_ceil(t).max(min).max(1)
}

/// `y = x W^T (+ b)` for `x: rows x inp`, `w: out x inp`; `y` overwritten.
pub fn linear_fwd(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    rows: usize,
    inp: usize,
    out: usize,
    y: &mut [f32],
) {
    debug_assert_eq!(x.len(), rows * inp);
    debug_assert_eq!(y.len(), rows * out);
    let rc = chunk_rows(rows, 32);
    y.par_chunks_mut(rc * out)
        .zip(x.par_chunks(rc * inp))
        .for_each(|(yc, xc)| {
            let r = xc.len() / inp;
            gemm_bias(
                1.0,
                xc,
                MatRef::row_major(r, inp),
                w,
                MatRef::row_major(out, inp).transposed(),
                0.0,
                b,
                yc,
                MatRef::row_major(r, out),
            )
            .expect("linear_fwd shapes");
        });
}

/// Backward of [`linear_fwd`]: `dx += dy W` or `dx = dy W` (by
/// [`InputGrad`]), `dw += dy^T x`, `db += sum(dy)`.
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    rows: usize,
    inp: usize,
    out: usize,
    dx: InputGrad<'_, [f32]>,
    dw: &mut [f32],
    db: Option<&mut [f32]>,
) {
    debug_assert_eq!(dw.len(), out * inp);
    if let Some((dx, beta)) = dx.with_beta() {
        let rc = chunk_rows(rows, 32);
        dx.par_chunks_mut(rc * inp)
            .zip(dy.par_chunks(rc * out))
            .for_each(|(dxc, dyc)| {
                let r = dyc.len() / out;
                gemm(
                    1.0,
                    dyc,
                    MatRef::row_major(r, out),
                    w,
                    MatRef::row_major(out, inp),
                    beta,
                    dxc,
                    MatRef::row_major(r, inp),
                )
                .expect("linear_bwd dx shapes");
            });
    }
    // dW rows (output features) are independent: split them across threads.
    let oc = chunk_rows(out, 16);
    dw.par_chunks_mut(oc * inp)
        .enumerate()
        .for_each(|(i, dwc)| {
            let o0 = i * oc;
            let o = dwc.len() / inp;
            gemm(
                1.0,
                dy,
                MatRef {
                    offset: o0,
                    rows: o,
                    cols: rows,
                    row_stride: 1,
                    col_stride: out,
                },
                x,
                MatRef::row_major(rows, inp),
                1.0,
                dwc,
                MatRef::row_major(o, inp),
            )
            .expect("linear_bwd dw shapes");
        });
    if let Some(db) = db {
        let oc = chunk_rows(out, 64);
        db.par_chunks_mut(oc).enumerate().for_each(|(i, dbc)| {
            let o0 = i * oc;
            let len = dbc.len();
            for row in dy.chunks_exact(out) {
                for (d, &g) in dbc.iter_mut().zip(&row[o0..o0 + len]) {
                    *d += g;
                }
            }
        });
    }
}

/// Layer norm over rows, parallel over row chunks.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_fwd(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    rows: usize,
    cols: usize,
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
) {
    let rc = chunk_rows(rows, 64);
    y.par_chunks_mut(rc * cols)
        .zip(x.par_chunks(rc * cols))
        .zip(mean.par_chunks_mut(rc).zip(rstd.par_chunks_mut(rc)))
        .for_each(|((yc, xc), (mc, rc_))| {
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
            .expect("layer_norm shapes");
        });
}

/// Backward of [`layer_norm_fwd`]: `dx += ...`, `dgamma += ...`, `dbeta += ...`.
/// `scratch` holds per-thread partial sums of `dgamma`/`dbeta` (grown once).
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_bwd(
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dy: &[f32],
    rows: usize,
    cols: usize,
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let rc = chunk_rows(rows, 64);
    let tasks = rows.div_ceil(rc);
    scratch.clear();
    scratch.resize(tasks * 2 * cols, 0.0);
    dx.par_chunks_mut(rc * cols)
        .zip(x.par_chunks(rc * cols).zip(dy.par_chunks(rc * cols)))
        .zip(mean.par_chunks(rc).zip(rstd.par_chunks(rc)))
        .zip(scratch.par_chunks_mut(2 * cols))
        .for_each(|(((dxc, (xc, dyc)), (mc, sc)), part)| {
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
            .expect("layer_norm_bwd shapes");
        });
    for part in scratch.chunks_exact(2 * cols) {
        for j in 0..cols {
            dgamma[j] += part[j];
            dbeta[j] += part[cols + j];
        }
    }
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
