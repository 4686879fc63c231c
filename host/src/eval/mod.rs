//! Evaluation of learned representations.

pub mod dump;
pub mod features;
pub mod knn;
pub mod linear;
pub mod linear_aug;
pub mod monitor;
pub mod report;
