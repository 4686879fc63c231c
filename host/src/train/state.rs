//! What a checkpoint holds of a run, and how a run comes back from one:
//! student and teacher parameters (one tensor per named parameter), AdamW
//! moments and step counts, the DINO centre, the SERE heads' batch-norm
//! statistics, the step and the configuration. The data order and every
//! random stream are functions of (seed, step), so no generator state is
//! needed to continue exactly where the run stopped.
//!
//! Every backend goes through [`RunState`] (the run's state on the host),
//! so a checkpoint written by one backend resumes on another.

use super::network::SereHeads;
use crate::backend::Cpu;
use crate::checkpoint::{formats, keys, meta, Checkpoint, CheckpointError};
use crate::config::TrainConfig;
use crate::error::SereError;
use crate::model::heads::SereHeadState;

/// The SERE heads' batch-norm statistics of one network, on the host.
pub type HostBnStates = SereHeads<SereHeadState<Cpu>>;
use crate::model::params::ParamLayout;

/// Format version written into every checkpoint.
pub const FORMAT: &str = formats::TRAINING;

/// A run's state on the host, borrowed from (or written into) a backend.
pub struct RunState<'a> {
    /// Parameter layout shared by student and teacher.
    pub layout: &'a ParamLayout,
    /// Student parameters.
    pub student: &'a mut [f32],
    /// Teacher parameters.
    pub teacher: &'a mut [f32],
    /// AdamW first moments.
    pub adam_m: &'a mut [f32],
    /// AdamW second moments.
    pub adam_v: &'a mut [f32],
    /// DINO centre.
    pub centre: &'a mut [f32],
    /// iBOT's patch centre (empty without masked image modelling).
    pub patch_centre: &'a mut [f32],
    /// Student SERE heads' batch-norm statistics.
    pub student_bn: &'a mut HostBnStates,
    /// Teacher SERE heads' batch-norm statistics.
    pub teacher_bn: &'a mut HostBnStates,
    /// AdamW steps of every parameter but the DINO last layer.
    pub adam_steps: &'a mut u32,
    /// AdamW steps of the DINO last layer.
    pub last_layer_steps: &'a mut u32,
}

/// A run's state on the host, read-only (what a snapshot reads).
pub struct RunView<'a> {
    /// Parameter layout shared by student and teacher.
    pub layout: &'a ParamLayout,
    /// Student parameters.
    pub student: &'a [f32],
    /// Teacher parameters.
    pub teacher: &'a [f32],
    /// AdamW first moments.
    pub adam_m: &'a [f32],
    /// AdamW second moments.
    pub adam_v: &'a [f32],
    /// DINO centre.
    pub centre: &'a [f32],
    /// iBOT's patch centre (empty without masked image modelling).
    pub patch_centre: &'a [f32],
    /// Student SERE heads' batch-norm statistics.
    pub student_bn: &'a HostBnStates,
    /// Teacher SERE heads' batch-norm statistics.
    pub teacher_bn: &'a HostBnStates,
    /// AdamW steps of every parameter but the DINO last layer.
    pub adam_steps: u32,
    /// AdamW steps of the DINO last layer.
    pub last_layer_steps: u32,
}

/// A checkpoint of a run's state after `step` steps.
pub fn snapshot_state(s: &RunView, cfg: &TrainConfig, step: u64) -> Checkpoint {
    let mut ck = Checkpoint::new();
    let layout = s.layout;
    ck.insert_params(keys::STUDENT, layout, s.student);
    ck.insert_params(keys::TEACHER, layout, s.teacher);
    ck.insert_params(keys::OPTIM_M, layout, s.adam_m);
    ck.insert_params(keys::OPTIM_V, layout, s.adam_v);
    ck.insert(keys::CENTRE, &[s.centre.len()], s.centre.to_vec());
    if !s.patch_centre.is_empty() {
        let c = s.patch_centre;
        ck.insert(keys::PATCH_CENTRE, &[c.len()], c.to_vec());
    }
    for (net, states) in [("student", s.student_bn), ("teacher", s.teacher_bn)] {
        for (name, st) in states.iter() {
            for (bn, r) in [("projection", &st.projection), ("predictor", &st.predictor)] {
                let key = |stat| keys::batch_norm(net, name, bn, stat);
                ck.insert(key("running_mean"), &[r.mean.len()], r.mean.clone());
                ck.insert(key("running_var"), &[r.var.len()], r.var.clone());
            }
        }
    }
    ck.set_meta(meta::FORMAT, FORMAT);
    ck.set_meta("step", step);
    ck.set_meta("adam_steps", s.adam_steps);
    ck.set_meta("last_layer_steps", s.last_layer_steps);
    ck.set_config(cfg);
    ck
}

/// Restores a run's state from a checkpoint and returns the step to
/// continue from. The checkpoint's model shape must match.
pub fn restore_state(s: RunState, ck: &Checkpoint) -> Result<u64, SereError> {
    match ck.meta(meta::FORMAT) {
        Some(FORMAT) => {}
        Some(formats::TRAINING_V1) => {
            return Err(CheckpointError::BadMeta {
                key: meta::FORMAT.into(),
                detail: format!(
                    "{:?} was written before the SERE heads were stacked on the projection \
                     and moved before the final norm ({FORMAT}); it cannot be resumed: start \
                     a new run (`sere eval` and `sere export` still read its backbone)",
                    formats::TRAINING_V1
                ),
            }
            .into())
        }
        other => {
            return Err(CheckpointError::BadMeta {
                key: meta::FORMAT.into(),
                detail: format!("{other:?}; this build reads {FORMAT}"),
            }
            .into())
        }
    }
    let layout = s.layout;
    ck.read_params(keys::STUDENT, layout, s.student)?;
    ck.read_params(keys::TEACHER, layout, s.teacher)?;
    ck.read_params(keys::OPTIM_M, layout, s.adam_m)?;
    ck.read_params(keys::OPTIM_V, layout, s.adam_v)?;
    let k = s.centre.len();
    ck.read_tensor(keys::CENTRE, &[k], s.centre)?;
    if !s.patch_centre.is_empty() {
        let k = s.patch_centre.len();
        ck.read_tensor(keys::PATCH_CENTRE, &[k], s.patch_centre)?;
    }
    for (net, states) in [("student", s.student_bn), ("teacher", s.teacher_bn)] {
        for (name, st) in states.iter_mut() {
            for (bn, r) in [
                ("projection", &mut st.projection),
                ("predictor", &mut st.predictor),
            ] {
                let key = |stat| keys::batch_norm(net, name, bn, stat);
                let c = r.mean.len();
                ck.read_tensor(&key("running_mean"), &[c], &mut r.mean)?;
                ck.read_tensor(&key("running_var"), &[c], &mut r.var)?;
            }
        }
    }
    *s.adam_steps = ck.meta_parse("adam_steps")?;
    *s.last_layer_steps = ck.meta_parse("last_layer_steps")?;
    Ok(ck.meta_parse("step")?)
}
