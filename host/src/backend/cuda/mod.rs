//! The CUDA backend: `sere-cuda`'s NVRTC kernels and cuBLAS behind the
//! [`crate::backend::Backend`] operations (see [`device`]).

pub mod device;

pub use device::{Cuda, CudaScratch, RelationWorkspace};
