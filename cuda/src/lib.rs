//! # sere-cuda
//!
//! CUDA kernels for SERE, mirroring [`sere_core`] operation by operation
//! (forward and backward), with a safe Rust API on [`Gpu`].
//!
//! - The CUDA driver, NVRTC and cuBLAS are loaded at run time (cudarc's
//!   `dynamic-loading`): this crate builds and its tests pass on machines
//!   without a GPU or a CUDA toolkit. A missing library is a [`CudaError`]
//!   with a one-line reason, never a panic or a link error.
//! - The kernels are CUDA C files in `cuda/kernels/`, embedded with
//!   `include_str!` and compiled by NVRTC for the device's virtual
//!   architecture (`compute_XX`) once per process ([`compile`]).
//! - Matrix products (linear layers, spatial and channel relations) go
//!   through cuBLAS strided-batched SGEMM in full FP32 (no TF32 unless
//!   [`Gpu::set_tf32`]).
//!
//! | sere-core | [`Gpu`] |
//! |---|---|
//! | `bilinear::grid_sample_forward` / `_backward` | [`Gpu::grid_sample_forward`], [`Gpu::grid_sample_backward`], [`Gpu::grid_sample_backward_map`] |
//! | `relation::*` | [`Gpu::spatial_relation_forward`] / `_backward`, [`Gpu::channel_relation_forward`] / `_backward` (with a batch dimension) |
//! | `softmax::*` | [`Gpu::softmax_rows`], [`Gpu::softmax_rows_in_place`], [`Gpu::log_softmax_rows`], [`Gpu::softmax_backward_rows`], [`Gpu::log_softmax_backward_rows`], [`Gpu::attention_softmax_forward`] / `_in_place` / `_backward` |
//! | `loss::*` | [`Gpu::relation_cross_entropy`] / `_backward`, [`Gpu::dino_loss`] / `_backward`, [`Gpu::dino_centre_update`] |
//! | `norm::*` | [`Gpu::layer_norm_forward`] / `_backward`, [`Gpu::batch_norm_stats`], [`Gpu::batch_norm_forward`] / `_backward`, [`Gpu::batch_norm_eval`], [`Gpu::batch_norm_update_running`] |
//! | `activation::*` | [`Gpu::gelu_forward`], [`Gpu::gelu_backward`] |
//! | `linalg::*` | [`Gpu::gemm`], [`Gpu::linear_forward`], [`Gpu::linear_backward_input`], [`Gpu::linear_backward_weight`], [`Gpu::bias_add`], [`Gpu::bias_grad`] |
//! | `optim::*` | [`Gpu::adamw_step`] / `_scaled`, [`Gpu::ema_update`], [`Gpu::l2_norm`], [`Gpu::clip_grad_norm`], [`Gpu::grad_clip_factor`], [`Gpu::scale`], [`Gpu::scale_by`], [`Gpu::axpy`] |
//!
//! Losses and norms are written to one-element device buffers, so a
//! training step needs no host round trip until it reads them.
//!
//! ```
//! // What the host does before offering `--device cuda`:
//! match sere_cuda::probe() {
//!     Ok(info) => println!("CUDA: {info}"),
//!     Err(e) => println!("CUDA unavailable: {e}"),
//! }
//! ```
#![forbid(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod compile;
pub mod error;
mod gpu;
mod ops;

pub use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
pub use error::{CudaError, Result};
pub use gpu::{probe, probe_device, row_launch_config, DeviceInfo, Gpu};
pub use ops::linalg::MatView;
