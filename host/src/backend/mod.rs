//! Where the work runs. The CPU kernels are in [`cpu`]; the device is chosen
//! once, at the trainer ([`Device`]).

pub mod cpu;

/// The device a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// Host CPU: sere-core kernels, matrixmultiply GEMM, rayon threads.
    #[default]
    Cpu,
    /// An NVIDIA GPU through sere-cuda.
    Cuda,
}
