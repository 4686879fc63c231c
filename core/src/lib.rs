//! # sere-core
//!
//! The numerical core of SERE (self-supervised ViT training with feature
//! self-relations): pure maths on caller-provided `f32` slices, `no_std`,
//! and by default no heap allocation (see [Features](#features)). Every
//! operation comes as a forward function and its analytic backward; both CPU
//! and CUDA backends are tested against it.
//!
//! Conventions:
//! - Matrices are row-major; shapes are passed explicitly and every slice
//!   length is checked, so a mismatch is an [`Error`], never a panic.
//! - Forward functions *overwrite* their outputs. Backward functions *add*
//!   into their gradient buffers (like autograd's accumulation), so several
//!   consumers of one tensor can share one gradient buffer.
//! - NaN or infinite inputs where they would silently poison a result are
//!   reported as [`Error::NonFinite`].
//!
//! | module | what |
//! |---|---|
//! | [`geometry`] | crop records, overlaps, sampling grids |
//! | [`bilinear`] | `grid_sample` (bilinear, zeros, `align_corners=False`) |
//! | [`relation`] | spatial (per head) and channel self-relation logits |
//! | [`softmax`] | stable row softmax / log-softmax |
//! | [`loss`] | relation cross-entropy, DINO loss, centre update, iBOT's weighted (masked-patch) cross-entropy |
//! | [`norm`], [`activation`], [`linalg`] | layer/batch norm, GELU, SGEMM and linear layers |
//! | [`optim`], [`schedule`] | AdamW, EMA, clipping; cosine and warm-up schedules |
//! | `nd` (feature `ndarray`) | every tensor kernel above on `ndarray` views, shapes read from the views |
//!
//! ```
//! use sere_core::{relation, softmax, loss};
//! // Two views' sampled features (3 points x 4 channels), 2 heads.
//! let xs = [0.1f32, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2];
//! let xt = [0.2f32, 0.1, 0.4, 0.3, 0.6, 0.5, 0.8, 0.7, 1.0, 0.9, 1.2, 1.1];
//! let (mut ls, mut lt) = ([0.0f32; 18], [0.0f32; 18]);
//! relation::spatial_relation_forward(&xs, 3, 4, 2, &mut ls).unwrap();
//! relation::spatial_relation_forward(&xt, 3, 4, 2, &mut lt).unwrap();
//! let mut g = [0.0f32; 18];
//! let l = loss::relation_cross_entropy_backward(&ls, &lt, 6, 3, 1.0, 0.5, 1.0, &mut g).unwrap();
//! let mut gx = [0.0f32; 12];
//! relation::spatial_relation_backward(&xs, &g, 3, 4, 2, &mut gx).unwrap();
//! assert!(l > 0.0 && gx.iter().all(|v| v.is_finite()));
//! # let _ = softmax::softmax_rows;
//! ```
//!
//! The README (`README.md` in the package) has a complete example from crop
//! boxes to the gradient w.r.t. a feature map, the list of operations with
//! what each was checked against, and `examples/` has two complete
//! programs: a host one (`cargo run -p sere-core --example two_views`) and,
//! in the repository, a `no_std`, no-alloc one for `thumbv7em-none-eabihf`
//! (`examples/embedded/`).
//!
//! # Features
//!
//! - none (the default): `no_std`, and nothing allocates: builds and links
//!   for bare-metal targets without an allocator, such as
//!   `thumbv7em-none-eabihf`. [`linalg::gemm`], which the relation and
//!   linear kernels use, is then a plain loop.
//! - `alloc`: [`linalg::gemm`] calls matrixmultiply's tuned SGEMM instead,
//!   which allocates its packing buffers from the global allocator on every
//!   call (still `no_std`; every other kernel still allocates nothing).
//! - `std`: `alloc`, plus run-time CPU feature detection: matrixmultiply's
//!   AVX/AVX2/FMA/AVX-512 kernels (about 3x faster SGEMM on x86-64) and the
//!   AVX2 + FMA copies of the row kernels.
//! - `ndarray`: the module `nd`, wrappers of every tensor kernel that take
//!   `ndarray` views (`ArrayView`, `ArrayViewMut`) and read the shapes from
//!   them. Zero-copy for standard-layout views; other views are copied into
//!   temporaries, which allocates. It brings in the `ndarray` crate (without
//!   its `std` feature, so still `no_std`) and the `alloc` crate, so a final
//!   binary needs a global allocator; it does not turn on `alloc`'s SGEMM.
//!
//! The features change speed and the SGEMM's summation order, not the
//! results beyond `f32` rounding.
//!
//! # Stability
//!
//! Everything this documentation shows is the public API, and follows
//! semantic versioning (a `0.x` release bumps the minor version for a
//! breaking change, which `CHANGELOG.md` lists): the modules in the table
//! above, the functions, types, fields and variants in them, and the
//! contracts stated here and on each item (shapes, layouts, overwrite versus
//! accumulate, which errors are returned). The numbers themselves are
//! specified to the tolerances of the tests (PyTorch float64 references), not
//! bit for bit: a faster summation order may change the last bits.
//! [`Error`] is `#[non_exhaustive]`: a new kind of error is not a breaking
//! change, so match it with a wildcard arm. Items hidden from this
//! documentation (`#[doc(hidden)]`) are plumbing for the other crates of
//! the sere-rs workspace and may change in any release.
#![no_std]
#![forbid(unsafe_op_in_unsafe_fn)]
#![deny(missing_docs)]

// Only for run-time CPU feature detection (`simd`); no allocation.
#[cfg(feature = "std")]
extern crate std;
// Only for `nd`'s copies of non-standard-layout views (ndarray links `alloc`
// anyway).
#[cfg(feature = "ndarray")]
extern crate alloc;

pub mod activation;
pub mod bilinear;
pub mod error;
mod fastmath;
pub mod geometry;
pub mod linalg;
pub mod loss;
#[cfg(feature = "ndarray")]
pub mod nd;
pub mod norm;
pub mod optim;
pub mod relation;
pub mod schedule;
mod simd;
pub mod softmax;

pub use error::{Error, Result};

// The README's code blocks are doc tests too, so its examples cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
