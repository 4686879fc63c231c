//! The operations of [`crate::Gpu`], one file per kernel family.

pub(crate) mod elementwise;
pub mod linalg;
pub(crate) mod norm;
pub(crate) mod reduce;
pub(crate) mod rows;
pub(crate) mod sample;
pub(crate) mod train;
