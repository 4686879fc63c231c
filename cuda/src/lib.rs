//! CUDA backend for SERE. The kernels and their parity tests against
//! `sere-core` arrive with the CUDA issue; until then this crate only names
//! the device it will serve and reports that no kernels are built.

/// Whether this build carries CUDA kernels. Until the CUDA path lands the
/// host reports `--device cuda` as unavailable using this.
pub const KERNELS_AVAILABLE: bool = false;
