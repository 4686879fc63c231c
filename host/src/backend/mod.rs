//! Where the work runs: the one dispatch point between the trainer and a
//! device. The trainer and `bench-step` hold a [`Backend`]; each variant owns
//! its parameters, optimizer state and workspaces on its device and runs the
//! whole step there. The CPU kernels are in [`cpu`], the GPU engine in
//! [`cuda`].

pub mod cpu;
pub mod cuda;

use crate::checkpoint::Checkpoint;
use crate::config::{Device, TrainConfig};
use crate::error::SereError;
use crate::train::engine::{CpuEngine, StepError, StepInput, StepSchedule, StepStats};
use crate::train::state;
use cuda::GpuEngine;

/// A training step on one device.
pub enum Backend {
    /// Host CPU: sere-core kernels, matrixmultiply SGEMM, rayon threads.
    Cpu(Box<CpuEngine>),
    /// CUDA device 0: sere-cuda kernels and cuBLAS; everything but the
    /// crops, grids and drop-path factors stays on the device.
    Cuda(Box<GpuEngine>),
}

/// The error of `--device cuda` when no usable GPU is there: what is
/// missing (sere-cuda's one-line reason) and what to do instead.
pub fn cuda_unavailable(reason: &impl std::fmt::Display) -> SereError {
    SereError::Device(format!(
        "--device cuda needs an NVIDIA GPU with its driver, NVRTC and cuBLAS: {reason}; \
         run with --device cpu"
    ))
}

impl Backend {
    /// The backend for `cfg.device`, or a clear error when this machine
    /// cannot provide it.
    pub fn new(cfg: &TrainConfig) -> Result<Self, SereError> {
        match cfg.device {
            Device::Cpu => Ok(Backend::Cpu(Box::new(CpuEngine::new(cfg)))),
            Device::Cuda => {
                sere_cuda::probe().map_err(|e| cuda_unavailable(&e))?;
                let e = GpuEngine::new(cfg).map_err(|e| cuda_unavailable(&e))?;
                Ok(Backend::Cuda(Box::new(e)))
            }
        }
    }

    /// One training step: forward, losses, backward, clipping, AdamW, EMA.
    pub fn step(
        &mut self,
        input: &StepInput,
        sched: &StepSchedule,
    ) -> Result<StepStats, StepError> {
        match self {
            Backend::Cpu(e) => e.step(input, sched),
            Backend::Cuda(e) => e.step(input, sched),
        }
    }

    /// Waits until the device has finished every enqueued operation (a
    /// no-op on the CPU, whose steps are synchronous); for timings.
    pub fn synchronize(&self) -> Result<(), SereError> {
        match self {
            Backend::Cpu(_) => Ok(()),
            Backend::Cuda(e) => e
                .synchronize()
                .map_err(|e| SereError::Other(format!("CUDA: {e}"))),
        }
    }

    /// The run's state after `step` steps, on the host, as a checkpoint
    /// (the same format on every backend).
    pub fn snapshot(&self, step: u64) -> Result<Checkpoint, SereError> {
        match self {
            Backend::Cpu(e) => Ok(state::snapshot(e, step)),
            Backend::Cuda(e) => e
                .snapshot(step)
                .map_err(|e| SereError::Other(format!("CUDA: {e}"))),
        }
    }

    /// Restores the run's state; returns the step to continue from.
    pub fn restore(&mut self, ck: &Checkpoint) -> Result<u64, SereError> {
        match self {
            Backend::Cpu(e) => state::restore(e, ck),
            Backend::Cuda(e) => e.restore(ck),
        }
    }
}
