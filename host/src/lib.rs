//! Host side of SERE: the trainer and the `sere` command (work in progress;
//! see the project's issues).

pub mod backend;
pub mod model;

pub mod augment;
pub mod data;

pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod error;
pub mod metrics;

pub mod eval;
pub mod export;
pub mod train;
pub mod visualize;
