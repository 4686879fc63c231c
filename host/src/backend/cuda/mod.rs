//! The training step on a CUDA GPU (sere-cuda kernels, cuBLAS SGEMM),
//! mirroring [`crate::train::engine::CpuEngine`] step by step: same
//! parameter layout (one flat device buffer per network, views per tensor
//! by [`crate::model::params::ParamLayout`] ranges), same forward and
//! backward order, schedules, per-tensor gradient clipping, AdamW (DINO
//! last layer frozen while scheduled), EMA, DINO centre and batch-norm
//! running statistics. Drop-path masks are drawn on the host with the CPU
//! engine's generator calls and uploaded, so both backends see the same
//! randomness.
//!
//! Data flow of a step: upload the crops (two copies) and the compacted
//! pair grids (three copies) and the drop-path factors (two copies);
//! everything else stays on the device; one download of the step's
//! statistics (losses and gradient norm) for logging and the NaN check,
//! after which AdamW and the EMA are enqueued (so a diverged step leaves the
//! parameters and the optimizer state untouched, as on the CPU).
//!
//! Allocation: every workspace is allocated on the first step of a batch
//! shape and reused after. Some sere-cuda methods still take small
//! stream-ordered scratch buffers per call (reduction partials, the
//! clipping factor); see cuda/README.md.

mod heads;
mod loss;
mod vit;

use std::ops::Range;

use crate::checkpoint::Checkpoint;
use crate::config::TrainConfig;
use crate::error::SereError;
use crate::model::heads::SereHeadState;
use crate::train::engine::{StepError, StepInput, StepSchedule, StepStats};
use crate::train::network::{
    SereNet, CHANNEL_GLOBAL, CHANNEL_LOCAL, SPATIAL_GLOBAL, SPATIAL_LOCAL,
};
use crate::train::state::{restore_state, snapshot_state, RunState, RunView};
use rand::SeedableRng;
use sere_core::loss::DinoShape;
use sere_core::optim::AdamW;
pub use sere_cuda::Gpu;
use sere_cuda::{CudaError, CudaSlice};

use heads::{BnDevice, DinoActs, SereActs};
use loss::{LossShape, LossWs, StudentHeads};
use vit::VitActs;

/// A device buffer of `f32`.
type Buf = CudaSlice<f32>;
/// sere-cuda's result.
type R<T> = Result<T, CudaError>;

/// Fixed slots of the statistics buffer (the relation losses follow).
const SLOT_DINO: usize = 0;
const SLOT_GRAD_NORM: usize = 1;
const SLOT_SCRATCH: usize = 2;
const SLOT_SPATIAL: usize = 3;

/// Workspaces of one batch shape `(batch, locals)`.
struct Workspace {
    batch: usize,
    locals: usize,
    globals: Buf,
    local_crops: Buf,
    teacher: Option<VitActs>,
    global: Option<VitActs>,
    local: Option<VitActs>,
    tpatches: Buf,
    gpatches: Buf,
    lpatches: Buf,
    t_spatial: Option<SereActs>,
    t_channel: Option<SereActs>,
    g_spatial: Option<SereActs>,
    g_channel: Option<SereActs>,
    l_spatial: Option<SereActs>,
    l_channel: Option<SereActs>,
    dsp_g: Buf,
    dch_g: Buf,
    dsp_l: Buf,
    dch_l: Buf,
    dpatches_g: Buf,
    dpatches_l: Buf,
    dout_g: Buf,
    dout_l: Buf,
    cls_t: Buf,
    cls_s: Buf,
    dcls: Buf,
    dino_t: Option<DinoActs>,
    dino_s: Option<DinoActs>,
    dlogits: Buf,
    loss: LossWs,
    stats: Buf,
    host_keeps: Vec<f32>,
}

/// Everything a GPU training run holds on the device.
pub struct GpuEngine {
    cfg: TrainConfig,
    /// Module layout (shared with the CPU engine).
    pub net: SereNet,
    gpu: Gpu,
    student: Buf,
    teacher: Buf,
    adam_m: Buf,
    adam_v: Buf,
    grads: Buf,
    centre: Buf,
    student_bn: [BnDevice; 4],
    teacher_bn: [BnDevice; 4],
    adam_steps: u32,
    last_layer_steps: u32,
    /// AdamW launches: runs of consecutive tensors with the same weight
    /// decay flag and last-layer membership (element-wise, so one launch
    /// per run computes what the CPU's per-tensor loop does).
    adam_groups: Vec<(Range<usize>, bool, bool)>,
    ws: Option<Workspace>,
}

impl std::fmt::Debug for GpuEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuEngine")
            .field("device", self.gpu.info())
            .finish()
    }
}

fn bn_upload(gpu: &Gpu, s: &SereHeadState) -> R<BnDevice> {
    Ok(BnDevice {
        stats: [
            gpu.upload(&s.projection.mean)?,
            gpu.upload(&s.projection.var)?,
            gpu.upload(&s.predictor.mean)?,
            gpu.upload(&s.predictor.var)?,
        ],
    })
}

impl GpuEngine {
    /// A fresh run on device 0: the student initialised from `cfg.seed` on
    /// the host exactly as the CPU engine does, then uploaded. TF32 stays
    /// off (full FP32 GEMMs) unless `SERE_CUDA_TF32=1`.
    pub fn new(cfg: &TrainConfig) -> Result<Self, CudaError> {
        let net = SereNet::new(cfg);
        let n = net.layout.len();
        let mut student = vec![0.0f32; n];
        net.layout.init(
            &mut student,
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed),
        );
        let gpu = Gpu::new(0)?;
        if std::env::var("SERE_CUDA_TF32").is_ok_and(|v| v == "1") {
            gpu.set_tf32(true)?;
        }
        let bn = net.new_bn_states();
        let student_bn = [0, 1, 2, 3].map(|i| bn_upload(&gpu, &bn[i]));
        let teacher_bn = [0, 1, 2, 3].map(|i| bn_upload(&gpu, &bn[i]));
        let [s0, s1, s2, s3] = student_bn;
        let [t0, t1, t2, t3] = teacher_bn;
        let last = net.dino.last_layer_range();
        let mut adam_groups: Vec<(Range<usize>, bool, bool)> = Vec::new();
        for e in net.layout.entries() {
            let is_last = e.range.start >= last.start && e.range.end <= last.end;
            match adam_groups.last_mut() {
                Some((r, d, l)) if *d == e.decay && *l == is_last && r.end == e.range.start => {
                    r.end = e.range.end;
                }
                _ => adam_groups.push((e.range.clone(), e.decay, is_last)),
            }
        }
        Ok(GpuEngine {
            cfg: cfg.clone(),
            student: gpu.upload(&student)?,
            teacher: gpu.upload(&student)?,
            adam_m: gpu.zeros(n)?,
            adam_v: gpu.zeros(n)?,
            grads: gpu.zeros(n)?,
            centre: gpu.zeros(cfg.out_dim)?,
            student_bn: [s0?, s1?, s2?, s3?],
            teacher_bn: [t0?, t1?, t2?, t3?],
            adam_steps: 0,
            last_layer_steps: 0,
            adam_groups,
            ws: None,
            net,
            gpu,
        })
    }

    /// The device in use.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The configuration the engine was built for.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// Waits until every enqueued operation has finished (for timings).
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.gpu.synchronize()
    }

    /// Downloads the student parameters.
    pub fn student(&self) -> Result<Vec<f32>, CudaError> {
        self.gpu.download(&self.student)
    }

    /// Downloads the teacher parameters.
    pub fn teacher(&self) -> Result<Vec<f32>, CudaError> {
        self.gpu.download(&self.teacher)
    }

    /// Downloads the student gradient of the last step (after clipping).
    pub fn grads(&self) -> Result<Vec<f32>, CudaError> {
        self.gpu.download(&self.grads)
    }

    /// One training step (see the module documentation).
    pub fn step(
        &mut self,
        input: &StepInput,
        sched: &StepSchedule,
    ) -> Result<StepStats, StepError> {
        let step = sched.step;
        let derr = |e: CudaError| StepError::Device {
            step,
            message: e.to_string(),
        };
        let stats = self.forward_backward(input, sched).map_err(derr)?;
        let stats = stats?;
        self.update(sched).map_err(derr)?;
        Ok(stats)
    }

    fn prepare(&mut self, b: usize, l: usize) -> R<()> {
        if self
            .ws
            .as_ref()
            .is_some_and(|w| w.batch == b && w.locals == l)
        {
            return Ok(());
        }
        self.ws = None; // free the old shape's buffers first
        let cfg = &self.cfg;
        let gpu = &self.gpu;
        let d = cfg.dim;
        let (ng, nl) = (cfg.grid() * cfg.grid(), cfg.local_grid() * cfg.local_grid());
        let (tg, tl) = (ng + 1, nl + 1);
        let views = 2 + l;
        let z = |n: usize| gpu.zeros(n.max(1));
        let shape = LossShape {
            batch: b,
            locals: l,
            c: d,
            heads: cfg.heads,
            gg: cfg.grid(),
            gl: cfg.local_grid(),
            pmax: (cfg.overlap * cfg.overlap).max(cfg.local_overlap * cfg.local_overlap),
        };
        let n_slots = SLOT_SPATIAL + shape.pairs().len() + shape.channel_calls();
        let mut ws = Workspace {
            batch: b,
            locals: l,
            globals: z(2 * b * 3 * cfg.img * cfg.img)?,
            local_crops: z(l * b * 3 * cfg.local_img * cfg.local_img)?,
            teacher: None,
            global: None,
            local: None,
            tpatches: z(2 * b * ng * d)?,
            gpatches: z(2 * b * ng * d)?,
            lpatches: z(l * b * nl * d)?,
            t_spatial: None,
            t_channel: None,
            g_spatial: None,
            g_channel: None,
            l_spatial: None,
            l_channel: None,
            dsp_g: z(2 * b * ng * d)?,
            dch_g: z(2 * b * ng * d)?,
            dsp_l: z(l * b * nl * d)?,
            dch_l: z(l * b * nl * d)?,
            dpatches_g: z(2 * b * ng * d)?,
            dpatches_l: z(l * b * nl * d)?,
            dout_g: z(2 * b * tg * d)?,
            dout_l: z(l * b * tl * d)?,
            cls_t: z(2 * b * d)?,
            cls_s: z(views * b * d)?,
            dcls: z(views * b * d)?,
            dino_t: None,
            dino_s: None,
            dlogits: z(views * b * cfg.out_dim)?,
            loss: LossWs::new(gpu, shape)?,
            stats: z(n_slots)?,
            host_keeps: Vec::new(),
        };
        let net = &self.net;
        vit::prepare(gpu, &net.vit, &mut ws.teacher, 2 * b, cfg.img)?;
        vit::prepare(gpu, &net.vit, &mut ws.global, 2 * b, cfg.img)?;
        if l > 0 {
            vit::prepare(gpu, &net.vit, &mut ws.local, l * b, cfg.local_img)?;
        }
        for a in [
            &mut ws.t_spatial,
            &mut ws.t_channel,
            &mut ws.g_spatial,
            &mut ws.g_channel,
        ] {
            heads::sere_prepare(gpu, d, a, 2 * b * ng)?;
        }
        if l > 0 {
            for a in [&mut ws.l_spatial, &mut ws.l_channel] {
                heads::sere_prepare(gpu, d, a, l * b * nl)?;
            }
        }
        heads::dino_prepare(gpu, &net.dino, &mut ws.dino_t, 2 * b)?;
        heads::dino_prepare(gpu, &net.dino, &mut ws.dino_s, views * b)?;
        self.ws = Some(ws);
        Ok(())
    }

    /// Forward and backward: fills the student gradient (clipped), moves
    /// the centre and batch-norm statistics, downloads the statistics. The
    /// outer error is a device failure, the inner one a diverged step.
    fn forward_backward(
        &mut self,
        input: &StepInput,
        sched: &StepSchedule,
    ) -> R<Result<StepStats, StepError>> {
        let (b, l) = (input.batch, input.locals);
        self.prepare(b, l)?;
        let cfg = &self.cfg;
        let step = sched.step;
        let d = cfg.dim;
        let k = cfg.out_dim;
        let views = 2 + l;
        let w_img = cfg.image_loss_weight() as f32;
        let (alpha, beta) = (cfg.alpha as f32, cfg.beta as f32);
        let net = &self.net;
        let gpu = &self.gpu;
        let ws = self.ws.as_mut().expect("prepared");
        let (ng, nl) = (cfg.grid() * cfg.grid(), cfg.local_grid() * cfg.local_grid());
        let (tg, tl) = (ng + 1, nl + 1);

        // ---- uploads: crops, grids, drop-path factors.
        gpu.upload_into(input.globals, &mut ws.globals)?;
        if l > 0 {
            gpu.upload_into(input.local_crops, &mut ws.local_crops)?;
        }
        let plan = ws.loss.stage(gpu, input.grids)?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            cfg.seed ^ 0x5eed_0000_0000 ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        {
            let ga = ws.global.as_mut().expect("prepared");
            vit::draw_keeps(&net.vit, &mut rng, 2 * b, &mut ws.host_keeps);
            gpu.upload_into(&ws.host_keeps, &mut ga.keeps)?;
            if l > 0 {
                let la = ws.local.as_mut().expect("prepared");
                vit::draw_keeps(&net.vit, &mut rng, l * b, &mut ws.host_keeps);
                gpu.upload_into(&ws.host_keeps, &mut la.keeps)?;
            }
        }

        // ---- teacher: globals, no drop path (keeps stay 1), projections.
        let ta = ws.teacher.as_mut().expect("prepared");
        vit::forward(gpu, &net.vit, &self.teacher, &ws.globals, ta)?;
        gather_patches(gpu, ta.out(), 2 * b, tg, d, &mut ws.tpatches)?;
        let tbn = &mut self.teacher_bn;
        heads::sere_projection(
            gpu,
            &net.sere[SPATIAL_GLOBAL],
            &self.teacher,
            &mut tbn[SPATIAL_GLOBAL],
            &ws.tpatches,
            ws.t_spatial.as_mut().expect("prepared"),
        )?;
        heads::sere_projection(
            gpu,
            &net.sere[CHANNEL_GLOBAL],
            &self.teacher,
            &mut tbn[CHANNEL_GLOBAL],
            &ws.tpatches,
            ws.t_channel.as_mut().expect("prepared"),
        )?;
        gpu.copy_rows(ta.out(), tg * d, &mut ws.cls_t, d, 2 * b, d, false)?;
        let dt = ws.dino_t.as_mut().expect("prepared");
        heads::dino_forward(gpu, &net.dino, &self.teacher, &ws.cls_t, dt)?;

        // ---- student: globals and locals, drop path on.
        let sbn = &mut self.student_bn;
        let ga = ws.global.as_mut().expect("prepared");
        vit::forward(gpu, &net.vit, &self.student, &ws.globals, ga)?;
        gather_patches(gpu, ga.out(), 2 * b, tg, d, &mut ws.gpatches)?;
        heads::sere_predictor(
            gpu,
            &net.sere[SPATIAL_GLOBAL],
            &self.student,
            &mut sbn[SPATIAL_GLOBAL],
            &ws.gpatches,
            ws.g_spatial.as_mut().expect("prepared"),
        )?;
        heads::sere_predictor(
            gpu,
            &net.sere[CHANNEL_GLOBAL],
            &self.student,
            &mut sbn[CHANNEL_GLOBAL],
            &ws.gpatches,
            ws.g_channel.as_mut().expect("prepared"),
        )?;
        if l > 0 {
            let la = ws.local.as_mut().expect("prepared");
            vit::forward(gpu, &net.vit, &self.student, &ws.local_crops, la)?;
            gather_patches(gpu, la.out(), l * b, tl, d, &mut ws.lpatches)?;
            heads::sere_predictor(
                gpu,
                &net.sere[SPATIAL_LOCAL],
                &self.student,
                &mut sbn[SPATIAL_LOCAL],
                &ws.lpatches,
                ws.l_spatial.as_mut().expect("prepared"),
            )?;
            heads::sere_predictor(
                gpu,
                &net.sere[CHANNEL_LOCAL],
                &self.student,
                &mut sbn[CHANNEL_LOCAL],
                &ws.lpatches,
                ws.l_channel.as_mut().expect("prepared"),
            )?;
        }
        // CLS tokens of every student view, view-major: [views][B][D].
        {
            let ga = ws.global.as_ref().expect("prepared");
            let mut head = ws.cls_s.slice_mut(..2 * b * d);
            gpu.copy_rows(ga.out(), tg * d, &mut head, d, 2 * b, d, false)?;
        }
        if l > 0 {
            let la = ws.local.as_ref().expect("prepared");
            let mut tail = ws.cls_s.slice_mut(2 * b * d..);
            gpu.copy_rows(la.out(), tl * d, &mut tail, d, l * b, d, false)?;
        }
        let ds = ws.dino_s.as_mut().expect("prepared");
        heads::dino_forward(gpu, &net.dino, &self.student, &ws.cls_s, ds)?;

        // ---- losses and their gradients w.r.t. the heads' outputs.
        gpu.fill_zero(&mut ws.stats)?;
        gpu.fill_zero(&mut ws.dlogits)?;
        let dt = ws.dino_t.as_ref().expect("prepared");
        let ds = ws.dino_s.as_ref().expect("prepared");
        gpu.dino_loss_backward(
            &ds.logits,
            &dt.logits,
            &self.centre,
            DinoShape {
                student_views: views,
                teacher_views: 2,
                batch: b,
                dim: k,
            },
            cfg.student_temp as f32,
            sched.teacher_temp,
            w_img,
            &mut ws.dlogits,
            &mut ws.stats.slice_mut(SLOT_DINO..SLOT_DINO + 1),
        )?;
        // The loss used the centre from before this update, as DINO does.
        gpu.dino_centre_update(
            &dt.logits,
            2 * b,
            k,
            cfg.center_momentum as f32,
            &mut self.centre,
        )?;
        for v in [&mut ws.dsp_g, &mut ws.dch_g, &mut ws.dsp_l, &mut ws.dch_l] {
            gpu.fill_zero(v)?;
        }
        let n_pairs = ws.loss.shape().pairs().len();
        let slot_channel = SLOT_SPATIAL + n_pairs;
        loss::spatial(
            gpu,
            &mut ws.loss,
            &plan,
            ws.t_spatial.as_ref().expect("prepared"),
            StudentHeads {
                global: ws.g_spatial.as_ref().expect("prepared"),
                local: ws.l_spatial.as_ref(),
                dglobal: &mut ws.dsp_g,
                dlocal: &mut ws.dsp_l,
            },
            alpha,
            cfg.spatial_tau_t as f32,
            &mut ws.stats,
            SLOT_SPATIAL,
        )?;
        loss::channel(
            gpu,
            &mut ws.loss,
            &plan,
            ws.t_channel.as_ref().expect("prepared"),
            StudentHeads {
                global: ws.g_channel.as_ref().expect("prepared"),
                local: ws.l_channel.as_ref(),
                dglobal: &mut ws.dch_g,
                dlocal: &mut ws.dch_l,
            },
            beta,
            cfg.channel_tau_t as f32,
            &mut ws.stats,
            slot_channel,
        )?;

        // ---- backward: heads -> tokens -> backbone.
        gpu.fill_zero(&mut self.grads)?;
        gpu.fill_zero(&mut ws.dcls)?;
        let ds = ws.dino_s.as_mut().expect("prepared");
        heads::dino_backward(
            gpu,
            &net.dino,
            &self.student,
            &ws.cls_s,
            ds,
            &ws.dlogits,
            &mut self.grads,
            &mut ws.dcls,
        )?;
        for global in [true, false] {
            if !global && l == 0 {
                continue;
            }
            let (imgs, t, hs, hc, cls_off) = if global {
                (2 * b, tg, SPATIAL_GLOBAL, CHANNEL_GLOBAL, 0)
            } else {
                (l * b, tl, SPATIAL_LOCAL, CHANNEL_LOCAL, 2 * b)
            };
            let (acts, patches, sp, ch, dsp, dch, dp, dout) = if global {
                (
                    ws.global.as_mut(),
                    &ws.gpatches,
                    ws.g_spatial.as_mut(),
                    ws.g_channel.as_mut(),
                    &ws.dsp_g,
                    &ws.dch_g,
                    &mut ws.dpatches_g,
                    &mut ws.dout_g,
                )
            } else {
                (
                    ws.local.as_mut(),
                    &ws.lpatches,
                    ws.l_spatial.as_mut(),
                    ws.l_channel.as_mut(),
                    &ws.dsp_l,
                    &ws.dch_l,
                    &mut ws.dpatches_l,
                    &mut ws.dout_l,
                )
            };
            let (acts, sp, ch) = (
                acts.expect("prepared"),
                sp.expect("prepared"),
                ch.expect("prepared"),
            );
            gpu.fill_zero(dp)?;
            heads::sere_predictor_backward(
                gpu,
                &net.sere[hs],
                &self.student,
                patches,
                sp,
                dsp,
                &mut self.grads,
                dp,
            )?;
            heads::sere_predictor_backward(
                gpu,
                &net.sere[hc],
                &self.student,
                patches,
                ch,
                dch,
                &mut self.grads,
                dp,
            )?;
            gpu.fill_zero(dout)?;
            let dcls = ws.dcls.slice(cls_off * d..(cls_off + imgs) * d);
            gpu.copy_rows(&dcls, d, dout, t * d, imgs, d, false)?;
            {
                let mut rows = dout.slice_mut(d..);
                gpu.copy_rows(dp, (t - 1) * d, &mut rows, t * d, imgs, (t - 1) * d, true)?;
            }
            vit::backward(gpu, &net.vit, &self.student, acts, dout, &mut self.grads)?;
        }

        // ---- the global norm, then each parameter tensor clipped, as DINO.
        gpu.l2_norm(
            &self.grads,
            &mut ws.stats.slice_mut(SLOT_GRAD_NORM..SLOT_GRAD_NORM + 1),
        )?;
        if cfg.clip_grad > 0.0 {
            for e in net.layout.entries() {
                gpu.clip_grad_norm(
                    &mut self.grads.slice_mut(e.range.clone()),
                    cfg.clip_grad as f32,
                    &mut ws.stats.slice_mut(SLOT_SCRATCH..SLOT_SCRATCH + 1),
                )?;
            }
        }

        // ---- the step's one download: losses and the gradient norm.
        let host = gpu.download(&ws.stats)?;
        let dino = host[SLOT_DINO];
        let (spatial, channel) =
            plan.combine(b, &host[SLOT_SPATIAL..slot_channel], &host[slot_channel..]);
        let loss = w_img * dino + alpha * spatial + beta * channel;
        if !loss.is_finite() {
            return Ok(Err(StepError::NonFinite {
                step,
                what: "the loss".into(),
            }));
        }
        let grad_norm = host[SLOT_GRAD_NORM];
        if !grad_norm.is_finite() {
            return Ok(Err(StepError::NonFinite {
                step,
                what: "the gradient".into(),
            }));
        }
        Ok(Ok(StepStats {
            loss,
            dino,
            spatial,
            channel,
            grad_norm,
            spatial_terms: plan.spatial_terms,
        }))
    }

    /// AdamW on the student (the DINO head's last layer skipped while
    /// frozen), then the teacher EMA.
    fn update(&mut self, sched: &StepSchedule) -> R<()> {
        self.adam_steps += 1;
        if !sched.freeze_last_layer {
            self.last_layer_steps += 1;
        }
        for (r, decay, is_last) in &self.adam_groups {
            if *is_last && sched.freeze_last_layer {
                continue;
            }
            let t = if *is_last {
                self.last_layer_steps
            } else {
                self.adam_steps
            };
            // PyTorch's AdamW defaults (betas 0.9/0.999, eps 1e-8), as DINO.
            let opt = AdamW {
                lr: sched.lr,
                weight_decay: if *decay { sched.weight_decay } else { 0.0 },
                ..AdamW::default()
            };
            self.gpu.adamw_step(
                &mut self.student.slice_mut(r.clone()),
                &self.grads.slice(r.clone()),
                &mut self.adam_m.slice_mut(r.clone()),
                &mut self.adam_v.slice_mut(r.clone()),
                &opt,
                t,
            )?;
        }
        self.gpu
            .ema_update(&mut self.teacher, &self.student, sched.momentum)
    }

    /// The run's state after `step` steps, downloaded, as a checkpoint (the
    /// CPU engine's format).
    pub fn snapshot(&self, step: u64) -> Result<Checkpoint, CudaError> {
        let g = &self.gpu;
        let bn = |s: &[BnDevice; 4]| -> R<[SereHeadState; 4]> {
            let mut out = self.net.new_bn_states();
            for (o, d) in out.iter_mut().zip(s) {
                o.projection.mean = g.download(&d.stats[0])?;
                o.projection.var = g.download(&d.stats[1])?;
                o.predictor.mean = g.download(&d.stats[2])?;
                o.predictor.var = g.download(&d.stats[3])?;
            }
            Ok(out)
        };
        let (student, teacher) = (g.download(&self.student)?, g.download(&self.teacher)?);
        let (m, v) = (g.download(&self.adam_m)?, g.download(&self.adam_v)?);
        let centre = g.download(&self.centre)?;
        let (sbn, tbn) = (bn(&self.student_bn)?, bn(&self.teacher_bn)?);
        Ok(snapshot_state(
            &RunView {
                layout: &self.net.layout,
                student: &student,
                teacher: &teacher,
                adam_m: &m,
                adam_v: &v,
                centre: &centre,
                student_bn: &sbn,
                teacher_bn: &tbn,
                adam_steps: self.adam_steps,
                last_layer_steps: self.last_layer_steps,
            },
            &self.cfg,
            step,
        ))
    }

    /// Restores the run's state from a checkpoint (any backend's) and
    /// returns the step to continue from.
    pub fn restore(&mut self, ck: &Checkpoint) -> Result<u64, SereError> {
        let n = self.net.layout.len();
        let (mut student, mut teacher) = (vec![0.0; n], vec![0.0; n]);
        let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
        let mut centre = vec![0.0; self.cfg.out_dim];
        let mut sbn = self.net.new_bn_states();
        let mut tbn = self.net.new_bn_states();
        let (mut a, mut l) = (0u32, 0u32);
        let step = restore_state(
            RunState {
                layout: &self.net.layout,
                student: &mut student,
                teacher: &mut teacher,
                adam_m: &mut m,
                adam_v: &mut v,
                centre: &mut centre,
                student_bn: &mut sbn,
                teacher_bn: &mut tbn,
                adam_steps: &mut a,
                last_layer_steps: &mut l,
            },
            ck,
        )?;
        let dev = |e: CudaError| SereError::Other(format!("CUDA: {e}"));
        let g = &self.gpu;
        g.upload_into(&student, &mut self.student).map_err(dev)?;
        g.upload_into(&teacher, &mut self.teacher).map_err(dev)?;
        g.upload_into(&m, &mut self.adam_m).map_err(dev)?;
        g.upload_into(&v, &mut self.adam_v).map_err(dev)?;
        g.upload_into(&centre, &mut self.centre).map_err(dev)?;
        for (states, dst) in [(&sbn, &mut self.student_bn), (&tbn, &mut self.teacher_bn)] {
            for (s, d) in states.iter().zip(dst.iter_mut()) {
                g.upload_into(&s.projection.mean, &mut d.stats[0])
                    .map_err(dev)?;
                g.upload_into(&s.projection.var, &mut d.stats[1])
                    .map_err(dev)?;
                g.upload_into(&s.predictor.mean, &mut d.stats[2])
                    .map_err(dev)?;
                g.upload_into(&s.predictor.var, &mut d.stats[3])
                    .map_err(dev)?;
            }
        }
        self.adam_steps = a;
        self.last_layer_steps = l;
        Ok(step)
    }
}

/// Copies the patch rows (all but each image's CLS row) of `out`
/// (`images x T x D`) into `patches` (`images x (T-1) x D`).
fn gather_patches(
    gpu: &Gpu,
    out: &Buf,
    images: usize,
    t: usize,
    d: usize,
    patches: &mut Buf,
) -> R<()> {
    gpu.copy_rows(
        &out.slice(d..),
        t * d,
        patches,
        (t - 1) * d,
        images,
        (t - 1) * d,
        false,
    )
}
