//! [`Cuda`]: the [`Backend`] on one CUDA GPU, every operation a short
//! sequence of `sere-cuda` calls (NVRTC kernels, cuBLAS SGEMM) enqueued on
//! the device's one stream.
//!
//! - Buffers are [`CudaSlice<f32>`]; an operation reads and writes the
//!   leading elements its shape names through exactly-sized views
//!   (`lead`, `part`), since `sere-cuda` takes lengths from its views.
//!   A range outside its buffer is an [`OpError::Kernel`] shape error, not
//!   a panic.
//! - Nothing waits for the device except [`Backend::download`] and
//!   [`Backend::synchronize`]. Non-finite values are not detected per call
//!   (that would cost a round trip per kernel): they propagate into the
//!   losses and the gradient norm in the step's `stats`, which the engine
//!   downloads and checks once per step.
//! - Scratch: `sere-cuda` allocates its small reduction partials itself
//!   (stream-ordered). The batch-norm backward uses the caller's
//!   [`CudaScratch`]; the two operations whose signature has no scratch
//!   (attention backward with a short `dscores`, GELU gradient in place) and
//!   the per-tensor clipping use one device buffer owned by [`Cuda`], grown
//!   to the largest request and reused (safe: all work is on one stream).
//!
//! Here: the types ([`Cuda`], [`CudaScratch`]) and their inherent helpers;
//! `ops` holds the [`Backend`] impl, `relation` the relation losses'
//! workspace and kernel sequences, `views` the checked views, errors and
//! cuBLAS layouts every operation uses, `tests` the comparisons against the
//! CPU reference.

mod ops;
mod relation;
#[cfg(test)]
mod tests;
mod views;

use std::sync::Mutex;

use crate::backend::{AttentionShape, OpResult};
#[cfg(doc)]
use crate::backend::{Backend, OpError};
use sere_cuda::{CudaError, CudaSlice, CudaView, CudaViewMut, Gpu, MatView};
use views::{grow, head_dim, out_view, qkv_view};

pub use relation::RelationWorkspace;

/// A device buffer of `f32`.
type Buf = CudaSlice<f32>;

/// Scratch of the operations that take one ([`Backend::Scratch`]): a device
/// buffer grown to the largest request.
#[derive(Debug, Default)]
pub struct CudaScratch {
    buf: Option<Buf>,
}

/// One CUDA device as a [`Backend`].
pub struct Cuda {
    gpu: Gpu,
    /// Device temporary of the operations without a scratch argument.
    temp: Mutex<Option<Buf>>,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cuda")
            .field("device", self.gpu.info())
            .finish()
    }
}

impl Cuda {
    /// Opens device `ordinal` (context, stream, cuBLAS, kernels compiled
    /// once per process); the error is one line saying what is missing.
    /// GEMMs are full FP32 until [`Gpu::set_tf32`] on [`Cuda::gpu`].
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        Ok(Cuda {
            gpu: Gpu::new(ordinal)?,
            temp: Mutex::new(None),
        })
    }

    /// The device and its sere-cuda operations.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Runs `f` with the device temporary grown to at least `n` values.
    /// Not reentrant: `f` must not call `with_temp`.
    fn with_temp<R>(&self, n: usize, f: impl FnOnce(&mut Buf) -> OpResult<R>) -> OpResult<R> {
        let mut guard = self.temp.lock().unwrap_or_else(|e| e.into_inner());
        f(grow(&self.gpu, &mut guard, n)?)
    }

    /// The attention backward from what the forward kept (`qkv`, `probs`),
    /// with `dp` (`dO V^T`) and `ds` (softmax backward) scratch of `batch x
    /// heads x T x T` each.
    fn attention_backward_in(
        &self,
        (qkv, probs): (&CudaView<'_, f32>, &CudaView<'_, f32>),
        dattn: &CudaView<'_, f32>,
        s: AttentionShape,
        (dp, ds): (&mut CudaViewMut<'_, f32>, &mut CudaViewMut<'_, f32>),
        dqkv: &mut CudaViewMut<'_, f32>,
    ) -> OpResult {
        let g = &self.gpu;
        let (hd, scale) = head_dim(&s)?;
        let (b, t, d, heads) = (s.batch, s.tokens, s.dim, s.heads);
        let (tok, outv) = (qkv_view(t, hd, d), out_view(t, hd, d));
        let pm = MatView::row_major(t, t).batched(heads * t * t);
        for h in 0..heads {
            let (v, p) = (tok.at(2 * d + h * hd), pm.at(h * t * t));
            // dP = dO V^T ; dV += P^T dO
            g.gemm(b, 1.0, dattn, outv.at(h * hd), qkv, v.t(), 0.0, dp, p)?;
            g.gemm(b, 1.0, probs, p.t(), dattn, outv.at(h * hd), 1.0, dqkv, v)?;
        }
        // dS = P (dP - rowsum(P dP)), every head at once.
        g.fill_zero(ds)?;
        g.softmax_backward_rows(probs, &*dp, b * heads * t, t, ds)?;
        for h in 0..heads {
            let (q, k, p) = (tok.at(h * hd), tok.at(d + h * hd), pm.at(h * t * t));
            // dQ += scale dS K ; dK += scale dS^T Q
            g.gemm(b, scale, &*ds, p, qkv, k, 1.0, dqkv, q)?;
            g.gemm(b, scale, &*ds, p.t(), qkv, q, 1.0, dqkv, k)?;
        }
        Ok(())
    }
}
