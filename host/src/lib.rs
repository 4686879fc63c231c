//! Host side of SERE: data and multi-crop augmentation, the ViT and its
//! heads written once over a [`backend::Backend`] (CPU or CUDA), the
//! trainer, evaluation, maps, learning-curve plots, export and the `sere`
//! command. See the project's ARCHITECTURE.md for how the pieces fit.

pub mod api;
pub mod backend;
pub mod model;

pub mod data;
// The augmentation stage lives in the data pipeline (`data::augment`): it
// works on `data::Raster` images and `data`'s errors, and the loader drives
// it. Re-exported here under its old path.
pub use data::augment;

// The array crate of the public API's images, features and maps
// (`ArrayView4` in, `Array2` out), re-exported so that a caller names the
// same version the signatures use.
pub use ndarray;

pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod dist;
pub mod error;
pub mod metrics;

pub mod eval;
pub mod export;
pub mod font;
pub mod import;
pub mod plot;
pub mod recipe;
pub mod train;
pub mod visualize;
