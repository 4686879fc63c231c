//! Datasets and the training loader.
//!
//! Sources ([`DataSpec`]): the embedded synthetic set, image folders, IDX
//! (MNIST-format) and CIFAR-10 binary files, each opened into a
//! [`Dataset`] of [`Split`]s. The [`Loader`] turns a split into multi-crop
//! [`Batch`]es on a background thread, through the multi-crop
//! augmentation of [`augment`]; [`EvalBatches`] gives the plain,
//! non-augmented views for k-NN and linear evaluation.

pub mod augment;
pub mod cifar;
pub mod dataset;
pub mod error;
pub mod eval;
pub mod folder;
pub mod idx;
pub mod layout;
pub mod loader;
pub mod rng;
pub mod spec;
pub mod synthetic;

pub use dataset::{decode_file, Dataset, Raster, Split};
pub use error::{DataError, Result};
pub use eval::{EvalBatch, EvalBatches, EvalTransform};
pub use loader::{batch_at, steps_per_epoch, Batch, Loader, LoaderConfig, Position};
pub use spec::DataSpec;
pub use synthetic::SyntheticConfig;

#[cfg(test)]
mod tests;
