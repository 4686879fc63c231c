//! Where the work runs: the one dispatch point between the trainer and a
//! device. The trainer and `bench-step` hold a [`Backend`]; each variant owns
//! its parameters, optimizer state and workspaces on its device and runs the
//! whole step there. The CPU kernels are in [`cpu`].

pub mod cpu;

use crate::checkpoint::Checkpoint;
use crate::config::{Device, TrainConfig};
use crate::error::SereError;
use crate::train::engine::{CpuEngine, StepError, StepInput, StepSchedule, StepStats};
use crate::train::state;

/// A training step on one device.
pub enum Backend {
    /// Host CPU: sere-core kernels, matrixmultiply SGEMM, rayon threads.
    Cpu(Box<CpuEngine>),
}

impl Backend {
    /// The backend for `cfg.device`, or a clear error when this build or
    /// machine cannot provide it.
    pub fn new(cfg: &TrainConfig) -> Result<Self, SereError> {
        match cfg.device {
            Device::Cpu => Ok(Backend::Cpu(Box::new(CpuEngine::new(cfg)))),
            Device::Cuda => Err(SereError::Device(
                "the CUDA training step is not part of this build yet (sere-cuda carries no \
                 kernels); run with --device cpu"
                    .into(),
            )),
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
        }
    }

    /// The run's state after `step` steps, on the host, as a checkpoint.
    pub fn snapshot(&self, step: u64) -> Checkpoint {
        match self {
            Backend::Cpu(e) => state::snapshot(e, step),
        }
    }

    /// Restores the run's state; returns the step to continue from.
    pub fn restore(&mut self, ck: &Checkpoint) -> Result<u64, SereError> {
        match self {
            Backend::Cpu(e) => state::restore(e, ck),
        }
    }
}
