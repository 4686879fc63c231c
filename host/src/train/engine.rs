//! The training step on the CPU: teacher forward on the global crops,
//! student forward on all crops, DINO and SERE losses, backward,
//! per-tensor gradient clipping, AdamW, teacher EMA and centre update.
//!
//! All buffers are owned here and shaped on the first step; later steps of
//! the same shape allocate nothing but the small per-step bookkeeping of the
//! loss assembly.

use super::network::{SereNet, CHANNEL_GLOBAL, CHANNEL_LOCAL, SPATIAL_GLOBAL, SPATIAL_LOCAL};
use crate::augment::BatchPairGrids;
use crate::config::TrainConfig;
use crate::model::heads::{BnMode, DinoHeadActs, SereActs, SereHeadState};
use crate::model::sere_loss::{
    dino_loss_step, SereGrads, SereInputs, SereLoss, SereLossConfig, StudentGrads, StudentViews,
    ViewShapes,
};
use crate::model::vit::VitActs;
use rand::SeedableRng;
use rayon::prelude::*;
use sere_core::optim::{adamw_step, clip_grad_norm, ema_update, AdamW};

/// The crops of one step, already on the host in the loader's layout.
#[derive(Debug, Clone, Copy)]
pub struct StepInput<'a> {
    /// Images per view (B).
    pub batch: usize,
    /// Local views per image (L).
    pub locals: usize,
    /// `[2][B][3][G][G]`.
    pub globals: &'a [f32],
    /// `[L][B][3][l][l]`.
    pub local_crops: &'a [f32],
    /// Pair grids in `view_pairs` order.
    pub grids: &'a [BatchPairGrids],
}

/// Scheduled values for one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepSchedule {
    /// Learning rate.
    pub lr: f32,
    /// Weight decay of the decayed parameters.
    pub weight_decay: f32,
    /// Teacher EMA momentum.
    pub momentum: f32,
    /// DINO teacher temperature.
    pub teacher_temp: f32,
    /// Whether the DINO head's last layer stays frozen this step.
    pub freeze_last_layer: bool,
    /// Global step index (seeds drop-path).
    pub step: u64,
}

/// Losses and diagnostics of one step.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepStats {
    /// Weighted total.
    pub loss: f32,
    /// Image-level DINO loss.
    pub dino: f32,
    /// Spatial relation loss (0 when no pair overlapped).
    pub spatial: f32,
    /// Channel relation loss.
    pub channel: f32,
    /// Global L2 norm of the student gradient before clipping.
    pub grad_norm: f32,
    /// Overlapping (image, pair) terms of the spatial loss.
    pub spatial_terms: usize,
}

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// A loss or gradient became NaN or infinite.
    #[error("training diverged at step {step}: {what} is not finite; lower the learning rate (--lr) or the gradient clip (clip_grad), or check the data")]
    NonFinite {
        /// Step index.
        step: u64,
        /// What was not finite.
        what: String,
    },
    /// The GPU failed (a driver, cuBLAS or launch error, or a shape the
    /// device kernels rejected).
    #[error("step {step}: CUDA: {message}")]
    Device {
        /// Step index.
        step: u64,
        /// The device error, one line.
        message: String,
    },
    /// A kernel rejected its inputs (a bug or an inconsistent batch).
    #[error("step {step}: {source}")]
    Kernel {
        /// Step index.
        step: u64,
        /// The kernel's error.
        source: sere_core::Error,
    },
}

impl StepError {
    /// A kernel's error at `step`: non-finite values mean the run diverged.
    fn from_core(step: u64, e: sere_core::Error) -> Self {
        match e {
            sere_core::Error::NonFinite { what } => StepError::NonFinite {
                step,
                what: what.to_string(),
            },
            source => StepError::Kernel { step, source },
        }
    }
}

/// Activations of one network pass over one crop size.
#[derive(Debug, Default)]
struct PassBuffers {
    vit: VitActs,
    /// Patch tokens `[views][B][N][D]` gathered from the ViT output.
    patches: Vec<f32>,
    /// Gradient of the ViT output (`views*B*T x D`).
    dout: Vec<f32>,
    /// Gradient of the patch tokens from the two SERE heads.
    dpatches: Vec<f32>,
    spatial: SereActs,
    channel: SereActs,
    /// Gradients w.r.t. the spatial / channel head outputs.
    dspatial: Vec<f32>,
    dchannel: Vec<f32>,
}

/// Everything a CPU training run holds: both networks' parameters, the
/// optimizer state, the DINO centre, batch-norm statistics and workspaces.
pub struct CpuEngine {
    cfg: TrainConfig,
    /// Module layout.
    pub net: SereNet,
    /// Student parameters.
    pub student: Vec<f32>,
    /// Teacher parameters (EMA of the student).
    pub teacher: Vec<f32>,
    /// AdamW first moments.
    pub adam_m: Vec<f32>,
    /// AdamW second moments.
    pub adam_v: Vec<f32>,
    /// AdamW steps taken by every parameter but the DINO last layer.
    pub adam_steps: u32,
    /// AdamW steps taken by the DINO last layer (frozen at first).
    pub last_layer_steps: u32,
    /// DINO centre (K).
    pub centre: Vec<f32>,
    /// Student SERE heads' batch-norm running statistics.
    pub student_bn: [SereHeadState; 4],
    /// Teacher SERE heads' batch-norm running statistics.
    pub teacher_bn: [SereHeadState; 4],
    grads: Vec<f32>,
    teacher_pass: PassBuffers,
    global_pass: PassBuffers,
    local_pass: PassBuffers,
    dino_student: DinoHeadActs,
    dino_teacher: DinoHeadActs,
    cls: Vec<f32>,
    dlogits: Vec<f32>,
    dcls: Vec<f32>,
    sere_loss: SereLoss,
}

fn fit(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() != n {
        v.resize(n, 0.0);
    }
    &mut v[..]
}

/// Copies the patch rows (all but each image's CLS row) of `out`
/// (`images x T x D`) into `patches` (`images x (T-1) x D`).
fn gather_patches(out: &[f32], images: usize, t: usize, d: usize, patches: &mut [f32]) {
    patches
        .par_chunks_mut((t - 1) * d)
        .zip(out.par_chunks(t * d))
        .take(images)
        .for_each(|(p, o)| p.copy_from_slice(&o[d..]));
}

/// Adds `dpatches` (`images x (T-1) x D`) into the patch rows of `dout`.
fn scatter_patches(dpatches: &[f32], images: usize, t: usize, d: usize, dout: &mut [f32]) {
    dout.par_chunks_mut(t * d)
        .zip(dpatches.par_chunks((t - 1) * d))
        .take(images)
        .for_each(|(o, p)| {
            for (a, &b) in o[d..].iter_mut().zip(p) {
                *a += b;
            }
        });
}

impl CpuEngine {
    /// A fresh run: student initialised from `seed`, teacher a copy of it.
    pub fn new(cfg: &TrainConfig) -> Self {
        let net = SereNet::new(cfg);
        let n = net.layout.len();
        let mut student = vec![0.0f32; n];
        net.layout.init(
            &mut student,
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed),
        );
        let teacher = student.clone();
        let student_bn = net.new_bn_states();
        let teacher_bn = net.new_bn_states();
        CpuEngine {
            cfg: cfg.clone(),
            student,
            teacher,
            adam_m: vec![0.0; n],
            adam_v: vec![0.0; n],
            adam_steps: 0,
            last_layer_steps: 0,
            centre: vec![0.0; cfg.out_dim],
            student_bn,
            teacher_bn,
            grads: vec![0.0; n],
            teacher_pass: PassBuffers::default(),
            global_pass: PassBuffers::default(),
            local_pass: PassBuffers::default(),
            dino_student: DinoHeadActs::default(),
            dino_teacher: DinoHeadActs::default(),
            cls: Vec::new(),
            dlogits: Vec::new(),
            dcls: Vec::new(),
            sere_loss: SereLoss::new(),
            net,
        }
    }

    /// The configuration the engine was built for.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// The student gradient of the last step (after clipping).
    pub fn grads(&self) -> &[f32] {
        &self.grads
    }

    /// One training step. On error the parameters and optimizer state are
    /// unchanged (every check happens before AdamW); the DINO centre and the
    /// batch-norm statistics may already have moved, so a failed run should
    /// resume from its last checkpoint.
    pub fn step(
        &mut self,
        input: &StepInput,
        sched: &StepSchedule,
    ) -> Result<StepStats, StepError> {
        let stats = self.forward_backward(input, sched)?;
        self.update(sched)?;
        Ok(stats)
    }

    /// Forward and backward of one step: fills the student gradient and
    /// updates the centre and batch-norm statistics; parameters unchanged.
    pub fn forward_backward(
        &mut self,
        input: &StepInput,
        sched: &StepSchedule,
    ) -> Result<StepStats, StepError> {
        let cfg = &self.cfg;
        let step = sched.step;
        let kerr = |source| StepError::Kernel { step, source };
        let (b, l) = (input.batch, input.locals);
        let d = cfg.dim;
        let k = cfg.out_dim;
        let ng_img = 2 * b;
        let nl_img = l * b;
        let views = 2 + l;
        let w_img = cfg.image_loss_weight() as f32;
        let (alpha, beta) = (cfg.alpha as f32, cfg.beta as f32);
        let net = &self.net;

        // ---- teacher: globals, no drop path, projections.
        let tp = &mut self.teacher_pass;
        net.vit.forward(
            &self.teacher,
            input.globals,
            ng_img,
            cfg.img,
            &mut tp.vit,
            None,
        );
        let tg = tp.vit.t;
        gather_patches(
            tp.vit.out(),
            ng_img,
            tg,
            d,
            fit(&mut tp.patches, ng_img * (tg - 1) * d),
        );
        let rows_g = ng_img * (tg - 1);
        net.sere[SPATIAL_GLOBAL].forward_projection(
            &self.teacher,
            &mut self.teacher_bn[SPATIAL_GLOBAL],
            BnMode::Train,
            &tp.patches,
            rows_g,
            &mut tp.spatial,
        );
        net.sere[CHANNEL_GLOBAL].forward_projection(
            &self.teacher,
            &mut self.teacher_bn[CHANNEL_GLOBAL],
            BnMode::Train,
            &tp.patches,
            rows_g,
            &mut tp.channel,
        );
        {
            let cls = fit(&mut self.cls, ng_img * d);
            for i in 0..ng_img {
                cls[i * d..(i + 1) * d].copy_from_slice(&tp.vit.out()[i * tg * d..i * tg * d + d]);
            }
        }
        net.dino
            .forward(&self.teacher, &self.cls, ng_img, &mut self.dino_teacher);

        // ---- student: globals and locals, drop path on.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            cfg.seed ^ 0x5eed_0000_0000 ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        let gp = &mut self.global_pass;
        net.vit.forward(
            &self.student,
            input.globals,
            ng_img,
            cfg.img,
            &mut gp.vit,
            Some(&mut rng),
        );
        gather_patches(
            gp.vit.out(),
            ng_img,
            tg,
            d,
            fit(&mut gp.patches, rows_g * d),
        );
        let sbn = &mut self.student_bn;
        net.sere[SPATIAL_GLOBAL].forward_predictor(
            &self.student,
            &mut sbn[SPATIAL_GLOBAL],
            BnMode::Train,
            &gp.patches,
            rows_g,
            &mut gp.spatial,
        );
        net.sere[CHANNEL_GLOBAL].forward_predictor(
            &self.student,
            &mut sbn[CHANNEL_GLOBAL],
            BnMode::Train,
            &gp.patches,
            rows_g,
            &mut gp.channel,
        );
        let lp = &mut self.local_pass;
        let (mut tl, mut rows_l) = (1, 0);
        if l > 0 {
            net.vit.forward(
                &self.student,
                input.local_crops,
                nl_img,
                cfg.local_img,
                &mut lp.vit,
                Some(&mut rng),
            );
            tl = lp.vit.t;
            rows_l = nl_img * (tl - 1);
            gather_patches(
                lp.vit.out(),
                nl_img,
                tl,
                d,
                fit(&mut lp.patches, rows_l * d),
            );
            net.sere[SPATIAL_LOCAL].forward_predictor(
                &self.student,
                &mut sbn[SPATIAL_LOCAL],
                BnMode::Train,
                &lp.patches,
                rows_l,
                &mut lp.spatial,
            );
            net.sere[CHANNEL_LOCAL].forward_predictor(
                &self.student,
                &mut sbn[CHANNEL_LOCAL],
                BnMode::Train,
                &lp.patches,
                rows_l,
                &mut lp.channel,
            );
        }
        // CLS tokens of every student view, view-major: [views][B][D].
        {
            let cls = fit(&mut self.cls, views * b * d);
            for i in 0..ng_img {
                cls[i * d..(i + 1) * d].copy_from_slice(&gp.vit.out()[i * tg * d..i * tg * d + d]);
            }
            for i in 0..nl_img {
                let o = (ng_img + i) * d;
                cls[o..o + d].copy_from_slice(&lp.vit.out()[i * tl * d..i * tl * d + d]);
            }
        }
        net.dino
            .forward(&self.student, &self.cls, views * b, &mut self.dino_student);

        // ---- losses and their gradients w.r.t. the heads' outputs.
        let dlogits = fit(&mut self.dlogits, views * b * k);
        dlogits.fill(0.0);
        let dino = dino_loss_step(
            self.dino_student.logits(),
            self.dino_teacher.logits(),
            &mut self.centre,
            views,
            b,
            cfg.student_temp as f32,
            sched.teacher_temp,
            w_img,
            cfg.center_momentum as f32,
            dlogits,
        )
        .map_err(|e| StepError::from_core(step, e))?;

        let shapes = ViewShapes {
            batch: b,
            channels: d,
            global_hw: (cfg.grid(), cfg.grid()),
            local_hw: (cfg.local_grid(), cfg.local_grid()),
            locals: l,
        };
        for (v, n) in [
            (&mut gp.dspatial, rows_g * d),
            (&mut gp.dchannel, rows_g * d),
            (&mut lp.dspatial, rows_l * d),
            (&mut lp.dchannel, rows_l * d),
        ] {
            fit(v, n).fill(0.0);
        }
        let loss_cfg = SereLossConfig {
            heads: cfg.heads,
            tau_teacher_spatial: cfg.spatial_tau_t as f32,
            tau_teacher_channel: cfg.channel_tau_t as f32,
            tau_student: 1.0,
        };
        let grids = input.grids;
        let grid_of = |img: usize, t: usize, s: usize| -> Option<(&[f32], &[f32])> {
            let g = grids.iter().find(|g| g.teacher == t && g.student == s)?;
            if !g.valid[img] {
                return None;
            }
            let p = g.hs * g.ws * 2;
            Some((
                &g.teacher_grid[img * p..(img + 1) * p],
                &g.student_grid[img * p..(img + 1) * p],
            ))
        };
        let out = self
            .sere_loss
            .forward_backward(
                &loss_cfg,
                &shapes,
                &SereInputs {
                    teacher_spatial: tp.spatial.output(),
                    teacher_channel: tp.channel.output(),
                    student_spatial: StudentViews {
                        globals: gp.spatial.output(),
                        locals: if l > 0 { lp.spatial.output() } else { &[] },
                    },
                    student_channel: StudentViews {
                        globals: gp.channel.output(),
                        locals: if l > 0 { lp.channel.output() } else { &[] },
                    },
                },
                grid_of,
                (alpha, beta),
                Some(SereGrads {
                    spatial: StudentGrads {
                        globals: &mut gp.dspatial,
                        locals: &mut lp.dspatial,
                    },
                    channel: StudentGrads {
                        globals: &mut gp.dchannel,
                        locals: &mut lp.dchannel,
                    },
                }),
            )
            .map_err(|e| StepError::from_core(step, e))?;
        let loss = w_img * dino + alpha * out.spatial + beta * out.channel;
        if !loss.is_finite() {
            return Err(StepError::NonFinite {
                step,
                what: "the loss".into(),
            });
        }

        // ---- backward: heads -> tokens -> backbone.
        self.grads.fill(0.0);
        let grads = &mut self.grads;
        let dcls = fit(&mut self.dcls, views * b * d);
        dcls.fill(0.0);
        net.dino.backward(
            &self.student,
            &mut self.dino_student,
            &self.dlogits,
            grads,
            dcls,
        );
        for (pass, imgs, t, rows, hs, hc, cls_off) in [
            (
                &mut *gp,
                ng_img,
                tg,
                rows_g,
                SPATIAL_GLOBAL,
                CHANNEL_GLOBAL,
                0,
            ),
            (
                &mut *lp,
                nl_img,
                tl,
                rows_l,
                SPATIAL_LOCAL,
                CHANNEL_LOCAL,
                ng_img,
            ),
        ] {
            if imgs == 0 {
                continue;
            }
            let dp = fit(&mut pass.dpatches, rows * d);
            dp.fill(0.0);
            net.sere[hs].backward_predictor(
                &self.student,
                &pass.patches,
                &mut pass.spatial,
                &pass.dspatial,
                grads,
                dp,
            );
            net.sere[hc].backward_predictor(
                &self.student,
                &pass.patches,
                &mut pass.channel,
                &pass.dchannel,
                grads,
                dp,
            );
            let dout = fit(&mut pass.dout, imgs * t * d);
            dout.fill(0.0);
            for i in 0..imgs {
                dout[i * t * d..i * t * d + d]
                    .copy_from_slice(&dcls[(cls_off + i) * d..(cls_off + i + 1) * d]);
            }
            scatter_patches(&pass.dpatches, imgs, t, d, dout);
            net.vit
                .backward(&self.student, &mut pass.vit, &pass.dout, grads);
        }

        // ---- clip each parameter tensor, as DINO does.
        let grad_norm = sere_core::optim::l2_norm(grads);
        if !grad_norm.is_finite() {
            return Err(StepError::NonFinite {
                step,
                what: "the gradient".into(),
            });
        }
        if cfg.clip_grad > 0.0 {
            for e in net.layout.entries() {
                clip_grad_norm(&mut grads[e.range.clone()], cfg.clip_grad as f32).map_err(kerr)?;
            }
        }
        Ok(StepStats {
            loss,
            dino,
            spatial: out.spatial,
            channel: out.channel,
            grad_norm,
            spatial_terms: out.spatial_terms,
        })
    }

    /// AdamW on the student (the DINO head's last layer skipped while
    /// frozen, like a parameter without gradient in PyTorch), then the
    /// teacher EMA.
    fn update(&mut self, sched: &StepSchedule) -> Result<(), StepError> {
        let step = sched.step;
        let kerr = |source| StepError::Kernel { step, source };
        let last = self.net.dino.last_layer_range();
        self.adam_steps += 1;
        if !sched.freeze_last_layer {
            self.last_layer_steps += 1;
        }
        let (student, grads, m, v) = (
            &mut self.student,
            &self.grads,
            &mut self.adam_m,
            &mut self.adam_v,
        );
        for e in self.net.layout.entries() {
            let is_last = e.range.start >= last.start && e.range.end <= last.end;
            if is_last && sched.freeze_last_layer {
                continue;
            }
            let (r, decay) = (e.range.clone(), e.decay);
            let t = if is_last {
                self.last_layer_steps
            } else {
                self.adam_steps
            };
            // PyTorch's AdamW defaults (betas 0.9/0.999, eps 1e-8), as DINO.
            let opt = AdamW {
                lr: sched.lr,
                weight_decay: if decay { sched.weight_decay } else { 0.0 },
                ..AdamW::default()
            };
            par_adamw(
                &mut student[r.clone()],
                &grads[r.clone()],
                &mut m[r.clone()],
                &mut v[r],
                &opt,
                t,
            )
            .map_err(kerr)?;
        }
        par_ema(&mut self.teacher, &self.student, sched.momentum).map_err(kerr)?;
        Ok(())
    }
}

/// AdamW split over threads for large tensors.
fn par_adamw(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    opt: &AdamW,
    t: u32,
) -> sere_core::Result<()> {
    const CHUNK: usize = 1 << 15;
    if p.len() <= CHUNK {
        return adamw_step(p, g, m, v, opt, t);
    }
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .try_for_each(|((pc, gc), (mc, vc))| adamw_step(pc, gc, mc, vc, opt, t))
}

/// Teacher EMA split over threads.
fn par_ema(teacher: &mut [f32], student: &[f32], momentum: f32) -> sere_core::Result<()> {
    teacher
        .par_chunks_mut(1 << 15)
        .zip(student.par_chunks(1 << 15))
        .try_for_each(|(t, s)| ema_update(t, s, momentum))
}
