//! Evaluation of learned representations.

pub mod dump;
pub mod features;
pub mod knn;
pub mod linear;
pub mod monitor;
pub mod report;
