//! What a checkpoint holds of a run, and how a run comes back from one:
//! student and teacher parameters (one tensor per named parameter), AdamW
//! moments and step counts, the DINO centre, the SERE heads' batch-norm
//! statistics, the step and the configuration. The data order and every
//! random stream are functions of (seed, step), so no generator state is
//! needed to continue exactly where the run stopped.

use super::engine::CpuEngine;
use super::network::SERE_HEAD_NAMES;
use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::error::SereError;

/// Format version written into every checkpoint.
pub const FORMAT: &str = "sere-train-1";

/// A checkpoint of the engine after `step` steps.
pub fn snapshot(e: &CpuEngine, step: u64) -> Checkpoint {
    let mut ck = Checkpoint::new();
    let layout = &e.net.layout;
    ck.insert_params("student.", layout, &e.student);
    ck.insert_params("teacher.", layout, &e.teacher);
    ck.insert_params("optim.m.", layout, &e.adam_m);
    ck.insert_params("optim.v.", layout, &e.adam_v);
    ck.insert("dino.centre", &[e.centre.len()], e.centre.clone());
    for (net, states) in [("student", &e.student_bn), ("teacher", &e.teacher_bn)] {
        for (name, st) in SERE_HEAD_NAMES.iter().zip(states.iter()) {
            for (bn, r) in [("projection", &st.projection), ("predictor", &st.predictor)] {
                let p = format!("bn.{net}.{name}.{bn}");
                ck.insert(format!("{p}.running_mean"), &[r.mean.len()], r.mean.clone());
                ck.insert(format!("{p}.running_var"), &[r.var.len()], r.var.clone());
            }
        }
    }
    ck.set_meta("format", FORMAT);
    ck.set_meta("step", step);
    ck.set_meta("adam_steps", e.adam_steps);
    ck.set_meta("last_layer_steps", e.last_layer_steps);
    ck.set_config(e.config());
    ck
}

/// Restores the engine from a checkpoint and returns the step to continue
/// from. The checkpoint's model shape must match the engine's.
pub fn restore(e: &mut CpuEngine, ck: &Checkpoint) -> Result<u64, SereError> {
    match ck.meta("format") {
        Some(FORMAT) => {}
        other => {
            return Err(CheckpointError::BadMeta {
                key: "format".into(),
                detail: format!("{other:?}; this build reads {FORMAT}"),
            }
            .into())
        }
    }
    let layout = e.net.layout.clone();
    ck.read_params("student.", &layout, &mut e.student)?;
    ck.read_params("teacher.", &layout, &mut e.teacher)?;
    ck.read_params("optim.m.", &layout, &mut e.adam_m)?;
    ck.read_params("optim.v.", &layout, &mut e.adam_v)?;
    let k = e.centre.len();
    ck.read_tensor("dino.centre", &[k], &mut e.centre)?;
    for (net, states) in [
        ("student", &mut e.student_bn),
        ("teacher", &mut e.teacher_bn),
    ] {
        for (name, st) in SERE_HEAD_NAMES.iter().zip(states.iter_mut()) {
            for (bn, r) in [
                ("projection", &mut st.projection),
                ("predictor", &mut st.predictor),
            ] {
                let p = format!("bn.{net}.{name}.{bn}");
                let c = r.mean.len();
                ck.read_tensor(&format!("{p}.running_mean"), &[c], &mut r.mean)?;
                ck.read_tensor(&format!("{p}.running_var"), &[c], &mut r.var)?;
            }
        }
    }
    e.adam_steps = ck.meta_parse("adam_steps")?;
    e.last_layer_steps = ck.meta_parse("last_layer_steps")?;
    Ok(ck.meta_parse("step")?)
}
