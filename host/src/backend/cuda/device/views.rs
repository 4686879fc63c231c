//! Small helpers of every [`Cuda`](super::Cuda) operation: exactly-sized
//! views of device buffers (`sere-cuda` takes lengths from its views), the
//! shape and argument errors they report instead of panicking, the cuBLAS
//! layouts of sere-core's strided matrices and of attention's heads, and
//! the grow-and-reuse rule of the scratch buffers.

use std::ops::Range;

use super::Buf;
use crate::backend::{AttentionShape, OpError, OpResult};
use sere_core::linalg::MatRef;
use sere_cuda::{CudaError, CudaView, CudaViewMut, Gpu, MatView};

impl From<CudaError> for OpError {
    /// sere-cuda's argument checks are sere-core's errors
    /// ([`OpError::Kernel`]); everything else is the device's
    /// ([`OpError::Device`], one line).
    fn from(e: CudaError) -> Self {
        match e {
            CudaError::Shape(e) => OpError::Kernel(e),
            e => OpError::Device(e.to_string()),
        }
    }
}

/// A shape error: `what` needs `expected` values and has `got`.
pub(super) fn short(what: &'static str, expected: usize, got: usize) -> OpError {
    OpError::Kernel(sere_core::Error::ShapeMismatch {
        what,
        expected,
        got,
    })
}

/// An argument error.
pub(super) fn invalid(what: &'static str, requirement: &'static str) -> OpError {
    OpError::Kernel(sere_core::Error::InvalidArgument { what, requirement })
}

/// `b[r]` as a view, or a shape error.
pub(super) fn part<'a>(
    b: &'a Buf,
    r: Range<usize>,
    what: &'static str,
) -> OpResult<CudaView<'a, f32>> {
    let end = r.end;
    b.try_slice(r).ok_or_else(|| short(what, end, b.len()))
}

/// `b[r]` as a mutable view, or a shape error.
pub(super) fn part_mut<'a>(
    b: &'a mut Buf,
    r: Range<usize>,
    what: &'static str,
) -> OpResult<CudaViewMut<'a, f32>> {
    let (end, len) = (r.end, b.len());
    b.try_slice_mut(r).ok_or_else(|| short(what, end, len))
}

/// SyncBN across processes needs a device collective (NCCL), which this
/// backend does not have yet; one process's statistics pass.
pub(super) fn refuse_sync_bn(group: &Option<crate::dist::ProcessGroup>) -> OpResult {
    match group {
        Some(g) if g.world() > 1 => Err(OpError::Device(
            "batch norm synchronised across processes needs NCCL, which the CUDA backend \
             does not have yet; train on CUDA with one process"
                .into(),
        )),
        _ => Ok(()),
    }
}

/// The first `n` values of `b`.
pub(super) fn lead<'a>(b: &'a Buf, n: usize, what: &'static str) -> OpResult<CudaView<'a, f32>> {
    part(b, 0..n, what)
}

/// The first `n` values of `b`, mutable.
pub(super) fn lead_mut<'a>(
    b: &'a mut Buf,
    n: usize,
    what: &'static str,
) -> OpResult<CudaViewMut<'a, f32>> {
    part_mut(b, 0..n, what)
}

/// Runs `f` on two disjoint mutable ranges of one buffer (a weight's and a
/// bias's gradient), in the order given.
pub(super) fn two_mut<R>(
    g: &mut Buf,
    a: Range<usize>,
    b: Range<usize>,
    f: impl FnOnce(&mut CudaViewMut<'_, f32>, &mut CudaViewMut<'_, f32>) -> OpResult<R>,
) -> OpResult<R> {
    let swapped = a.start > b.start;
    let (lo, hi) = if swapped { (b, a) } else { (a, b) };
    if lo.start > lo.end || hi.start > hi.end || lo.end > hi.start || hi.end > g.len() {
        return Err(invalid(
            "parameter ranges",
            "must be disjoint and inside the gradient buffer",
        ));
    }
    let mut whole = g.slice_mut(lo.start..hi.end);
    let (mut first, mut second) = whole.split_at_mut(hi.start - lo.start);
    let mut x = first.slice_mut(..lo.len());
    let mut y = second.slice_mut(..hi.len());
    if swapped {
        f(&mut y, &mut x)
    } else {
        f(&mut x, &mut y)
    }
}

/// A sere-core strided view as a cuBLAS row-major view: unit column stride
/// is row-major with `ld = row_stride`; unit row stride is the transpose of
/// a row-major matrix with `ld = col_stride` (a single row or column takes
/// either). Anything else cuBLAS cannot read.
pub(super) fn mat_view(m: MatRef) -> OpResult<MatView> {
    let (rows, cols) = (m.rows, m.cols);
    if m.col_stride == 1 || cols == 1 {
        let ld = if rows <= 1 {
            m.row_stride.max(cols)
        } else {
            m.row_stride
        };
        Ok(MatView {
            offset: m.offset,
            rows,
            cols,
            ld,
            batch_stride: 0,
            transposed: false,
        })
    } else if m.row_stride == 1 || rows == 1 {
        let ld = if cols <= 1 {
            m.col_stride.max(rows)
        } else {
            m.col_stride
        };
        Ok(MatView {
            offset: m.offset,
            rows: cols,
            cols: rows,
            ld,
            batch_stride: 0,
            transposed: true,
        })
    } else {
        Err(invalid(
            "gemm view",
            "needs a unit stride along its rows or its columns",
        ))
    }
}

/// Rows of one head of `q`, `k` or `v` in a `qkv` buffer (`[T][3][H][d]`
/// per image), batched over images; `.at(offset)` picks the head.
pub(super) fn qkv_view(t: usize, hd: usize, d: usize) -> MatView {
    MatView {
        offset: 0,
        rows: t,
        cols: hd,
        ld: 3 * d,
        batch_stride: t * 3 * d,
        transposed: false,
    }
}

/// Rows of one head of the attention output (`[T][H][d]` per image).
pub(super) fn out_view(t: usize, hd: usize, d: usize) -> MatView {
    MatView {
        offset: 0,
        rows: t,
        cols: hd,
        ld: d,
        batch_stride: t * d,
        transposed: false,
    }
}

/// Checked per-head width and score scale of an attention shape.
pub(super) fn head_dim(s: &AttentionShape) -> OpResult<(usize, f32)> {
    if s.heads == 0 || s.dim % s.heads != 0 {
        return Err(invalid("heads", "must divide the embedding width"));
    }
    let hd = s.dim / s.heads;
    Ok((hd, 1.0 / (hd as f32).sqrt()))
}

/// Makes `slot` hold at least `n` values (freeing a smaller buffer first).
pub(super) fn grow<'s>(gpu: &Gpu, slot: &'s mut Option<Buf>, n: usize) -> OpResult<&'s mut Buf> {
    if !matches!(slot, Some(b) if b.len() >= n) {
        *slot = None;
        *slot = Some(gpu.zeros(n.max(1))?);
    }
    slot.as_mut()
        .ok_or_else(|| OpError::Device("scratch buffer missing after allocation".into()))
}
