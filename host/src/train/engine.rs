//! The training step, written once over a [`Backend`]: teacher forward on
//! the global crops, student forward on all crops, DINO and SERE losses,
//! backward, per-tensor gradient clipping, AdamW, teacher EMA and centre
//! update. Each phase is a function of its own; [`Engine::step`] runs them
//! in order.
//!
//! All device buffers are owned here and shaped on the first step of a
//! batch shape; later steps allocate nothing on the device. The step's
//! scalars (losses, gradient norm) are read once, after the backward pass:
//! a diverged step is caught before AdamW, so parameters and optimizer state
//! stay untouched.

use std::ops::Range;

use super::network::{SereHeads, SereNet};
use super::state::{restore_state, snapshot_state, HostBnStates, RunState, RunView};
use crate::augment::BatchPairGrids;
use crate::backend::relation::{SereLossConfig, ViewShapes};
use crate::backend::{
    cuda_unavailable, not_standard, standard, Backend, Blocks, BnMode, CentredTeacher, Cpu, Cuda,
    DinoLossArgs, Grads, MimLossArgs, OpError, RelationArgs, StatSlot, StudentFeatureGrads,
    StudentFeatures,
};
use crate::checkpoint::Checkpoint;
use crate::config::{NonOverlapping, TrainConfig};
use crate::dist::{self, Collective, ProcessGroup, Shard};
use crate::error::SereError;
use crate::model::heads::{BnRunning, DinoHeadActs, SereActs, SereHeadState, SereSide};
use crate::model::vit::{BatchShard, VitActs};
use ndarray::{ArrayView4, ArrayView5};
use rand::SeedableRng;
use sere_core::optim::AdamW;

/// The crops of one step, already on the host in the loader's layout
/// (standard-layout views; the shapes say `B`, `L` and the crop sizes).
#[derive(Debug, Clone, Copy)]
pub struct StepInput<'a> {
    /// The two global crops, `(2, B, 3, G, G)`.
    pub globals: ArrayView5<'a, f32>,
    /// The local crops, `(L, B, 3, l, l)` (`L` may be 0).
    pub locals: ArrayView5<'a, f32>,
    /// Pair grids in `view_pairs` order.
    pub grids: &'a [BatchPairGrids],
    /// iBOT masks of the student's global crops, `(2, B, rows, cols)` of
    /// the patch grid (no elements without `mim`).
    pub masks: ArrayView4<'a, bool>,
}

impl StepInput<'_> {
    /// Images per view (B).
    pub fn batch(&self) -> usize {
        self.globals.dim().1
    }

    /// Local views per image (L).
    pub fn local_views(&self) -> usize {
        self.locals.dim().0
    }

    /// The masks as the `[2][B][N]` flags the ViT takes (a typed error for
    /// a non-standard view).
    fn mask_flags(&self) -> Result<&[bool], OpError> {
        Ok(standard(&self.masks, "step masks")?)
    }
}

/// The `(V, B, 3, S, S)` crops of a step as the `(V * B, 3, S, S)` image
/// batch the ViT takes (no copy: a standard-layout view merges its first
/// two axes in place; another layout is a typed error).
fn image_batch<'a>(crops: ArrayView5<'a, f32>) -> Result<ArrayView4<'a, f32>, OpError> {
    let (v, b, c, h, w) = crops.dim();
    crops
        .into_shape_with_order((v * b, c, h, w))
        .map_err(|_| OpError::Kernel(not_standard("step crops")))
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
    /// iBOT patch teacher temperature (unused without `mim`).
    pub patch_teacher_temp: f32,
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
    /// Image-level DINO loss (the CLS term): the cross-entropy `H(q, p)`
    /// of teacher and student outputs, averaged over the view pairs.
    pub dino: f32,
    /// Mean entropy `H(q)` of the teacher's centred, sharpened CLS output
    /// (nats): near `ln K` it is collapsing to uniform, near 0 onto one
    /// prototype (DINO's collapse study). `dino - teacher_entropy` is the
    /// mean `KL(q || p)`, see [`StepStats::teacher_student_kl`].
    pub teacher_entropy: f32,
    /// iBOT's masked-patch loss (0 without `mim`).
    pub mim: f32,
    /// Spatial relation loss (0 when no pair overlapped).
    pub spatial: f32,
    /// Channel relation loss.
    pub channel: f32,
    /// Global L2 norm of the student gradient before clipping.
    pub grad_norm: f32,
    /// Overlapping (image, pair) terms of the spatial loss.
    pub spatial_terms: usize,
}

impl StepStats {
    /// Mean `KL(q || p)` between the teacher's and the student's CLS
    /// outputs: the DINO loss less the teacher entropy (each teacher row
    /// enters both means equally often). It goes to 0 in either collapse.
    pub fn teacher_student_kl(&self) -> f32 {
        self.dino - self.teacher_entropy
    }
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
    /// A collective of a data-parallel step failed.
    #[error("step {step}: {source}")]
    Dist {
        /// Step index.
        step: u64,
        /// The collective's error.
        source: crate::dist::DistError,
    },
}

impl StepError {
    /// An operation's error at `step`: non-finite values mean the run
    /// diverged.
    fn at(step: u64) -> impl Fn(OpError) -> Self {
        move |e| match e {
            OpError::Kernel(sere_core::Error::NonFinite { what }) => StepError::NonFinite {
                step,
                what: what.to_string(),
            },
            OpError::Kernel(source) => StepError::Kernel { step, source },
            OpError::Device(message) => StepError::Device { step, message },
            OpError::Dist(source) => StepError::Dist { step, source },
        }
    }
}

/// Slots of the step's scalars in [`Workspace::stats`].
const SLOT_DINO: usize = 0;
/// Written by `dino_loss` beside its loss (`SLOT_DINO + 1`).
const SLOT_TEACHER_ENTROPY: usize = 1;
const SLOT_SPATIAL: usize = 2;
/// Written by `relation_losses` beside the spatial loss (`SLOT_SPATIAL + 1`).
const SLOT_CHANNEL: usize = 3;
const SLOT_GRAD_NORM: usize = 4;
const SLOT_MIM: usize = 5;
const STATS_LEN: usize = 6;

/// Activations of one network pass over one crop size.
struct Pass<B: Backend> {
    /// Images in the pass (views x B).
    images: usize,
    vit: VitActs<B>,
    /// Patch tokens `[views][B][N][D]` gathered from the last block's
    /// output before the final norm (what the SERE heads read).
    patches: B::Buf,
    spatial: SereActs<B>,
    channel: SereActs<B>,
}

impl<B: Backend> Pass<B> {
    fn new(
        be: &B,
        net: &SereNet,
        images: usize,
        img: usize,
        side: SereSide,
    ) -> Result<Self, OpError> {
        // The teacher gets no gradient: no backward scratch for it.
        let vit = match side {
            SereSide::Teacher => net.vit.forward_workspace(be, images, img)?,
            SereSide::Student => net.vit.workspace(be, images, img)?,
        };
        let rows = images * vit.n;
        let head = &net.sere.spatial_global;
        Ok(Pass {
            images,
            patches: be.zeros(rows * net.vit.config().dim)?,
            spatial: head.workspace(be, rows, side)?,
            channel: head.workspace(be, rows, side)?,
            vit,
        })
    }

    /// Rows of the patch-token matrix.
    fn rows(&self) -> usize {
        self.images * self.vit.n
    }

    /// The patch rows (all but each image's CLS row) of the last block's
    /// output before the final norm.
    fn gather_patches(&mut self, be: &B, d: usize) -> Result<(), OpError> {
        let (n, t) = (self.vit.n, self.vit.t);
        let rows = Blocks {
            count: self.images,
            len: n * d,
            src_start: d,
            src_stride: t * d,
            dst_start: 0,
            dst_stride: n * d,
        };
        be.copy_blocks(self.vit.pre_norm(), &mut self.patches, rows, false)
    }

    /// Copies each image's CLS row of the ViT output into `cls` from row
    /// `first` on.
    fn gather_cls(&self, be: &B, d: usize, cls: &mut B::Buf, first: usize) -> Result<(), OpError> {
        be.copy_blocks(
            self.vit.out(),
            cls,
            cls_rows(self.images, self.vit.t, d, first, true),
            false,
        )
    }
}

/// The CLS rows of a token buffer (`images x t x d`) and rows `first..` of a
/// CLS matrix, as blocks from the tokens (`to_cls`) or back.
fn cls_rows(images: usize, t: usize, d: usize, first: usize, to_cls: bool) -> Blocks {
    let (tokens, cls) = ((0, t * d), (first * d, d));
    let ((src_start, src_stride), (dst_start, dst_stride)) =
        if to_cls { (tokens, cls) } else { (cls, tokens) };
    Blocks {
        count: images,
        len: d,
        src_start,
        src_stride,
        dst_start,
        dst_stride,
    }
}

/// Gradients of one student pass.
struct PassGrads<B: Backend> {
    /// Gradient of the ViT output (`images*T x D`).
    dout: B::Buf,
    /// Gradient of the patch tokens from the two SERE heads.
    dpatches: B::Buf,
    /// Gradients w.r.t. the spatial / channel head outputs.
    dspatial: B::Buf,
    dchannel: B::Buf,
}

impl<B: Backend> PassGrads<B> {
    fn new(be: &B, pass: &Pass<B>, d: usize) -> Result<Self, OpError> {
        let n = pass.rows() * d;
        Ok(PassGrads {
            dout: be.zeros(pass.images * pass.vit.t * d)?,
            dpatches: be.zeros(n)?,
            dspatial: be.zeros(n)?,
            dchannel: be.zeros(n)?,
        })
    }
}

/// iBOT's patch path of one batch shape: the final-normed patch tokens of
/// the global crops through the patch head, in both networks.
struct MimWorkspace<B: Backend> {
    /// Patch rows `2 B N`.
    rows: usize,
    /// Patch tokens (final norm) `[2][B][N][D]` of the teacher and student.
    teacher_tokens: B::Buf,
    student_tokens: B::Buf,
    teacher_head: DinoHeadActs<B>,
    student_head: DinoHeadActs<B>,
    /// Gradient of the student's patch logits and patch tokens.
    dlogits: B::Buf,
    dtokens: B::Buf,
    /// Per patch row: its weight in the masked-patch loss.
    weights: B::Buf,
    weights_host: Vec<f32>,
}

impl<B: Backend> MimWorkspace<B> {
    fn new(be: &B, net: &SereNet, pass: &Pass<B>, cfg: &TrainConfig) -> Result<Self, OpError> {
        let rows = pass.rows();
        let (head, d) = (net.patch_head(), cfg.dim);
        Ok(MimWorkspace {
            rows,
            teacher_tokens: be.zeros(rows * d)?,
            student_tokens: be.zeros(rows * d)?,
            teacher_head: head.workspace(be, rows)?,
            student_head: head.workspace(be, rows)?,
            dlogits: be.zeros(rows * cfg.patch_head_dim())?,
            dtokens: be.zeros(rows * d)?,
            weights: be.zeros(rows)?,
            weights_host: vec![0.0; rows],
        })
    }
}

/// The patch rows of a pass's final-norm output as blocks, to the packed
/// `[images][N][D]` layout (`to_packed`) or back.
fn patch_rows<B: Backend>(pass: &Pass<B>, d: usize, to_packed: bool) -> Blocks {
    let (n, t) = (pass.vit.n, pass.vit.t);
    let (tokens, packed) = ((d, t * d), (0, n * d));
    let ((src_start, src_stride), (dst_start, dst_stride)) = if to_packed {
        (tokens, packed)
    } else {
        (packed, tokens)
    };
    Blocks {
        count: pass.images,
        len: n * d,
        src_start,
        src_stride,
        dst_start,
        dst_stride,
    }
}

/// How the backend's mean over overlapping spatial terms becomes the
/// step's spatial loss: unchanged (pairs without overlap dropped), or with
/// those pairs counted as uniform relation rows (the authors' code), which
/// add `ln P` each to the mean and nothing to the gradient.
#[derive(Debug, Clone, Copy, PartialEq)]
struct SpatialMean {
    /// Overlapping terms over all terms (scales the gradient too).
    scale: f32,
    /// The uniform rows' `sum ln P` over all terms.
    offset: f32,
    /// This rank's share of the overlapping terms times the world size
    /// (`N T_r / T`): turns the rank's mean over its own terms into its
    /// part of the group's mean. Exactly 1 in a single process.
    share: f32,
}

/// The spatial terms of a batch's grids: all of them, the overlapping
/// ones, and the uniform rows' `sum ln P` of the others (summed over the
/// group in a data-parallel step, hence `f64`).
#[derive(Debug, Clone, Copy, PartialEq)]
struct SpatialCounts {
    all: f64,
    valid: f64,
    ln_p: f64,
}

impl SpatialCounts {
    fn of(grids: &[BatchPairGrids]) -> Self {
        let mut c = SpatialCounts {
            all: 0.0,
            valid: 0.0,
            ln_p: 0.0,
        };
        for g in grids {
            for &v in &g.valid {
                c.all += 1.0;
                if v {
                    c.valid += 1.0;
                } else {
                    c.ln_p += ((g.hs * g.ws) as f64).ln();
                }
            }
        }
        c
    }

    /// The sums over every rank of `group`.
    fn over(self, group: &dyn Collective) -> Result<Self, OpError> {
        let mut v = [self.all, self.valid, self.ln_p];
        group.all_reduce_sum_f64(&mut v)?;
        Ok(SpatialCounts {
            all: v[0],
            valid: v[1],
            ln_p: v[2],
        })
    }
}

impl SpatialMean {
    /// The rule applied to this rank's terms (`local`) among the group's
    /// (`global`, the same in a single process).
    fn new(
        rule: NonOverlapping,
        local: SpatialCounts,
        global: SpatialCounts,
        world: usize,
    ) -> Self {
        let share = if world > 1 && global.valid > 0.0 {
            (world as f64 * local.valid / global.valid) as f32
        } else {
            1.0
        };
        match rule {
            NonOverlapping::Uniform if global.all > 0.0 => SpatialMean {
                scale: (global.valid / global.all) as f32,
                offset: (global.ln_p / global.all) as f32,
                share,
            },
            _ => SpatialMean {
                scale: 1.0,
                offset: 0.0,
                share,
            },
        }
    }

    /// The weight of this rank's spatial gradient.
    fn weight(self, alpha: f32) -> f32 {
        // A single process's share is exactly 1, and `x * 1.0 == x`: the
        // weight it always had.
        alpha * self.scale * self.share
    }

    /// The step's spatial loss from the mean over overlapping terms.
    fn apply(self, mean_over_overlapping: f32) -> f32 {
        self.scale * mean_over_overlapping + self.offset
    }
}

/// iBOT's masked-patch loss of the step (same-view pairs, each image's
/// masked positions averaged) with its gradient into `m.dlogits`, weighted
/// like the CLS term, and the patch-centre update.
fn mim_loss<B: Backend>(
    be: &B,
    cfg: &TrainConfig,
    sched: &StepSchedule,
    input: &StepInput,
    m: &mut MimWorkspace<B>,
    centre: &mut B::Buf,
    stats: &mut B::Buf,
) -> Result<(), OpError> {
    let patches = m.rows / (2 * input.batch());
    sere_core::loss::masked_patch_weights(input.mask_flags()?, patches, &mut m.weights_host)?;
    be.upload_into(&m.weights_host, &mut m.weights)?;
    be.zero(&mut m.dlogits)?;
    let args = MimLossArgs {
        rows: m.rows,
        dim: cfg.patch_head_dim(),
        tau_student: cfg.student_temp as f32,
        tau_teacher: sched.patch_teacher_temp,
        weight: cfg.image_loss_weight() as f32,
        centre_momentum: cfg.center_momentum as f32,
    };
    let (st, te) = (m.student_head.logits(), m.teacher_head.logits());
    let teacher = CentredTeacher { logits: te, centre };
    let report = StatSlot {
        stats,
        slot: SLOT_MIM,
    };
    be.mim_loss(st, teacher, &m.weights, args, &mut m.dlogits, report)
}

/// Every workspace of one batch shape `(batch, locals)`.
struct Workspace<B: Backend> {
    batch: usize,
    locals: usize,
    teacher: Pass<B>,
    global: Pass<B>,
    global_grads: PassGrads<B>,
    /// The local crops' pass (None without local crops).
    local: Option<(Pass<B>, PassGrads<B>)>,
    /// Empty stand-ins for the local gradients when there are no local
    /// crops (allocated once, not per step).
    no_local_grads: (B::Buf, B::Buf),
    dino_teacher: DinoHeadActs<B>,
    dino_student: DinoHeadActs<B>,
    /// CLS tokens of the teacher's views `[2][B][D]`, the student's
    /// `[views][B][D]`, and the student's gradient.
    cls_teacher: B::Buf,
    cls_student: B::Buf,
    dcls: B::Buf,
    dlogits: B::Buf,
    relation: B::RelationWorkspace,
    /// iBOT's patch path (None without `mim`).
    mim: Option<MimWorkspace<B>>,
    /// The step's scalars, read once per step.
    stats: B::Buf,
}

impl<B: Backend> Workspace<B> {
    fn new(
        be: &B,
        net: &SereNet,
        cfg: &TrainConfig,
        batch: usize,
        locals: usize,
    ) -> Result<Self, OpError> {
        let (d, views) = (cfg.dim, 2 + locals);
        let teacher = Pass::new(be, net, 2 * batch, cfg.img, SereSide::Teacher)?;
        let mut global = Pass::new(be, net, 2 * batch, cfg.img, SereSide::Student)?;
        let global_grads = PassGrads::new(be, &global, d)?;
        let mim = if cfg.mim {
            // Allocated once here, so the step's set_masks uploads only.
            global
                .vit
                .set_masks(be, Some(&vec![false; global.rows()]))?;
            Some(MimWorkspace::new(be, net, &global, cfg)?)
        } else {
            None
        };
        let local = if locals > 0 {
            let pass = Pass::new(be, net, locals * batch, cfg.local_img, SereSide::Student)?;
            let grads = PassGrads::new(be, &pass, d)?;
            Some((pass, grads))
        } else {
            None
        };
        Ok(Workspace {
            batch,
            locals,
            teacher,
            global,
            global_grads,
            local,
            no_local_grads: (be.zeros(0)?, be.zeros(0)?),
            dino_teacher: net.dino.workspace(be, 2 * batch)?,
            dino_student: net.dino.workspace(be, views * batch)?,
            cls_teacher: be.zeros(2 * batch * d)?,
            cls_student: be.zeros(views * batch * d)?,
            dcls: be.zeros(views * batch * d)?,
            dlogits: be.zeros(views * batch * cfg.out_dim)?,
            relation: B::RelationWorkspace::default(),
            mim,
            stats: be.zeros(STATS_LEN)?,
        })
    }
}

impl<B: Backend> Workspace<B> {
    /// Shapes the workspace for rank `shard.rank` of a data-parallel step:
    /// every SERE head's batch norm over the whole group (SyncBN), and the
    /// student's drop path drawn as for the global batch.
    fn join(&mut self, group: &ProcessGroup) {
        let shard = Shard::of(group.as_ref());
        let sync = (shard.world > 1).then(|| group.clone());
        let first = shard.rank * self.batch;
        let global = self.batch * shard.world;
        let passes = [Some((&mut self.teacher, 2)), Some((&mut self.global, 2))]
            .into_iter()
            .chain([self.local.as_mut().map(|(p, _)| (p, self.locals))]);
        for (pass, views) in passes.flatten() {
            pass.spatial.sync_batch_norm(sync.clone());
            pass.channel.sync_batch_norm(sync.clone());
            let bs = BatchShard {
                views,
                global,
                first,
            };
            pass.vit.set_shard((shard.world > 1).then_some(bs));
        }
    }
}

/// One AdamW launch: consecutive tensors with the same weight decay and
/// step count (AdamW is element-wise, so one launch per run computes what a
/// loop over the tensors does).
#[derive(Debug, Clone, PartialEq)]
struct AdamGroup {
    range: Range<usize>,
    decay: bool,
    /// Part of the DINO head's last layer (frozen at first, own step count).
    last_layer: bool,
}

/// Everything a training run holds on its device: both networks'
/// parameters, the optimizer state, the DINO centre, batch-norm statistics
/// and the workspaces.
pub struct Engine<B: Backend> {
    be: B,
    cfg: TrainConfig,
    /// Module layout.
    pub net: SereNet,
    /// Student parameters.
    pub student: B::Buf,
    /// Teacher parameters (EMA of the student).
    pub teacher: B::Buf,
    /// AdamW first moments.
    pub adam_m: B::Buf,
    /// AdamW second moments.
    pub adam_v: B::Buf,
    /// AdamW steps taken by every parameter but the DINO last layer.
    pub adam_steps: u32,
    /// AdamW steps taken by the DINO last layer (frozen at first).
    pub last_layer_steps: u32,
    /// DINO centre (K).
    pub centre: B::Buf,
    /// iBOT's patch centre (the patch head's K; empty without `mim`).
    pub patch_centre: B::Buf,
    /// Student SERE heads' batch-norm running statistics.
    pub student_bn: SereHeads<SereHeadState<B>>,
    /// Teacher SERE heads' batch-norm running statistics.
    pub teacher_bn: SereHeads<SereHeadState<B>>,
    grads: B::Buf,
    adam_groups: Vec<AdamGroup>,
    /// Every parameter tensor's range (per-tensor clipping).
    tensors: Vec<Range<usize>>,
    ws: Option<Workspace<B>>,
    /// The processes training together (one by default).
    group: ProcessGroup,
}

/// The CPU engine.
pub type CpuEngine = Engine<Cpu>;

impl Engine<Cpu> {
    /// A fresh run on the CPU (see [`Engine::new`]).
    pub fn cpu(cfg: &TrainConfig) -> Self {
        Engine::new(Cpu, cfg).expect("CPU buffers are plain vectors")
    }
}

impl<B: Backend> Engine<B> {
    /// A fresh run on `be`: the student initialised from `cfg.seed` on the
    /// host (the same values on every backend), the teacher a copy of it.
    pub fn new(be: B, cfg: &TrainConfig) -> Result<Self, OpError> {
        let net = SereNet::new(cfg);
        let n = net.layout.len();
        let mut init = vec![0.0f32; n];
        net.layout.init(
            &mut init,
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed),
        );
        // The last layers frozen at first: the CLS head's and a separate
        // patch head's (iBOT freezes both).
        let lasts: Vec<Range<usize>> = std::iter::once(&net.dino)
            .chain(&net.separate_patch_head)
            .map(|h| h.last_layer_range())
            .collect();
        let mut adam_groups: Vec<AdamGroup> = Vec::new();
        let rule = cfg.weight_decay_rule;
        for e in net.layout.entries() {
            let decay = rule.decays(&e.name, &e.shape, e.decay);
            let last_layer = lasts
                .iter()
                .any(|l| e.range.start >= l.start && e.range.end <= l.end);
            match adam_groups.last_mut() {
                Some(g)
                    if g.decay == decay
                        && g.last_layer == last_layer
                        && g.range.end == e.range.start =>
                {
                    g.range.end = e.range.end;
                }
                _ => adam_groups.push(AdamGroup {
                    range: e.range.clone(),
                    decay,
                    last_layer,
                }),
            }
        }
        let tensors = net
            .layout
            .entries()
            .iter()
            .map(|e| e.range.clone())
            .collect();
        Ok(Engine {
            student: be.upload(&init)?,
            teacher: be.upload(&init)?,
            adam_m: be.zeros(n)?,
            adam_v: be.zeros(n)?,
            adam_steps: 0,
            last_layer_steps: 0,
            centre: be.zeros(cfg.out_dim)?,
            patch_centre: be.zeros(if cfg.mim { cfg.patch_head_dim() } else { 0 })?,
            student_bn: net.new_bn_states(&be)?,
            teacher_bn: net.new_bn_states(&be)?,
            grads: be.zeros(n)?,
            adam_groups,
            tensors,
            ws: None,
            group: dist::single(),
            cfg: cfg.clone(),
            net,
            be,
        })
    }

    /// The backend the run is on.
    pub fn backend(&self) -> &B {
        &self.be
    }

    /// The configuration the engine was built for.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// Trains as one rank of `group` from now on: each step's batch is this
    /// rank's shard of the global batch ([`Shard`]), and what spans the
    /// batch is reduced over the group, so N ranks compute the step of one
    /// process with the whole batch (up to the order of the sums). The
    /// parameters must already be equal on every rank (the same seed, or
    /// the same checkpoint).
    pub fn join(&mut self, group: ProcessGroup) {
        self.group = group;
        self.ws = None; // reshaped, and joined, at the next step
    }

    /// The processes this engine trains with.
    pub fn group(&self) -> &ProcessGroup {
        &self.group
    }

    /// The student gradient of the last step (after clipping).
    pub fn grads(&self) -> &B::Buf {
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
        self.update(sched).map_err(StepError::at(sched.step))?;
        Ok(stats)
    }

    /// Forward and backward of one step: fills the (clipped) student
    /// gradient and updates the centre and batch-norm statistics; parameters
    /// unchanged.
    pub fn forward_backward(
        &mut self,
        input: &StepInput,
        sched: &StepSchedule,
    ) -> Result<StepStats, StepError> {
        let step = sched.step;
        let err = StepError::at(step);
        self.shape_workspace(input.batch(), input.local_views())
            .map_err(&err)?;
        self.teacher_pass(input).map_err(&err)?;
        self.student_pass(input, step).map_err(&err)?;
        let (spatial_terms, spatial_mean) = self.losses(input, sched).map_err(&err)?;
        self.backward().map_err(&err)?;
        self.reduce_gradient().map_err(&err)?;
        let stats = self.read_stats(spatial_terms, spatial_mean, step)?;
        if self.cfg.clip_grad > 0.0 {
            let max = self.cfg.clip_grad as f32;
            self.be
                .clip_per_tensor(&mut self.grads, &self.tensors, max)
                .map_err(&err)?;
        }
        Ok(stats)
    }

    fn shape_workspace(&mut self, batch: usize, locals: usize) -> Result<(), OpError> {
        if !self
            .ws
            .as_ref()
            .is_some_and(|w| w.batch == batch && w.locals == locals)
        {
            self.ws = None; // free the old shape's buffers first
            let mut ws = Workspace::new(&self.be, &self.net, &self.cfg, batch, locals)?;
            if self.group.world() > 1 {
                ws.join(&self.group);
            }
            self.ws = Some(ws);
        }
        Ok(())
    }

    /// Teacher on the global crops, no drop path: patch tokens (before the
    /// final norm) through the SERE projections, CLS tokens through the
    /// DINO head.
    fn teacher_pass(&mut self, input: &StepInput) -> Result<(), OpError> {
        let (be, net, params) = (&self.be, &self.net, &self.teacher);
        let ws = self.ws.as_mut().expect("shaped");
        let (d, tp) = (self.cfg.dim, &mut ws.teacher);
        net.vit
            .forward(be, params, image_batch(input.globals)?, &mut tp.vit, None)?;
        if self.cfg.relations() {
            tp.gather_patches(be, d)?;
            let bn = &mut self.teacher_bn;
            let (sp, ch) = (&net.sere.spatial_global, &net.sere.channel_global);
            sp.forward(
                be,
                params,
                &mut bn.spatial_global,
                BnMode::Train,
                &tp.patches,
                &mut tp.spatial,
            )?;
            ch.forward(
                be,
                params,
                &mut bn.channel_global,
                BnMode::Train,
                &tp.patches,
                &mut tp.channel,
            )?;
        }
        tp.gather_cls(be, d, &mut ws.cls_teacher, 0)?;
        if let Some(m) = ws.mim.as_mut() {
            be.copy_blocks(
                tp.vit.out(),
                &mut m.teacher_tokens,
                patch_rows(tp, d, true),
                false,
            )?;
            let head = net.patch_head();
            head.forward(be, params, &m.teacher_tokens, &mut m.teacher_head)?;
        }
        net.dino
            .forward(be, params, &ws.cls_teacher, &mut ws.dino_teacher)
    }

    /// Student on the global and the local crops, drop path on: patch
    /// tokens (before the final norm) through the SERE projections and the
    /// predictors stacked on them, every view's CLS token (view-major,
    /// `[views][B][D]`) through the DINO head.
    fn student_pass(&mut self, input: &StepInput, step: u64) -> Result<(), OpError> {
        let (be, net, params, cfg) = (&self.be, &self.net, &self.student, &self.cfg);
        let ws = self.ws.as_mut().expect("shaped");
        let d = cfg.dim;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            cfg.seed ^ 0x5eed_0000_0000 ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        let SereHeads {
            spatial_global: bn_sg,
            channel_global: bn_cg,
            spatial_local: bn_sl,
            channel_local: bn_cl,
        } = &mut self.student_bn;
        let (h, l) = (&net.sere, input.locals);
        let global = (
            input.globals,
            &mut ws.global,
            (&h.spatial_global, bn_sg),
            (&h.channel_global, bn_cg),
        );
        let local = ws
            .local
            .as_mut()
            .map(|(p, _)| (l, p, (&h.spatial_local, bn_sl), (&h.channel_local, bn_cl)));
        let mut first_cls = 0;
        for (images, pass, (sp, bs), (ch, bc)) in [global].into_iter().chain(local) {
            // iBOT masks the student's global crops (this first pass) only;
            // everything the student computes from them sees the masks.
            let mim = ws.mim.as_mut().filter(|_| first_cls == 0);
            if mim.is_some() {
                let masks = input.mask_flags()?;
                if masks.len() != pass.rows() {
                    return Err(OpError::Kernel(sere_core::Error::InvalidArgument {
                        what: "step masks",
                        requirement: "need one entry per patch of the global crops ([2][B][N])",
                    }));
                }
                pass.vit.set_masks(be, Some(masks))?;
            }
            let images = image_batch(images)?;
            net.vit
                .forward(be, params, images, &mut pass.vit, Some(&mut rng))?;
            if let Some(m) = mim {
                let rows = patch_rows(pass, d, true);
                be.copy_blocks(pass.vit.out(), &mut m.student_tokens, rows, false)?;
                let head = net.patch_head();
                head.forward(be, params, &m.student_tokens, &mut m.student_head)?;
            }
            if cfg.relations() {
                pass.gather_patches(be, d)?;
                sp.forward(
                    be,
                    params,
                    bs,
                    BnMode::Train,
                    &pass.patches,
                    &mut pass.spatial,
                )?;
                ch.forward(
                    be,
                    params,
                    bc,
                    BnMode::Train,
                    &pass.patches,
                    &mut pass.channel,
                )?;
            }
            pass.gather_cls(be, d, &mut ws.cls_student, first_cls)?;
            first_cls += pass.images;
        }
        net.dino
            .forward(be, params, &ws.cls_student, &mut ws.dino_student)
    }

    /// The DINO loss (and centre update) and both relation losses, with
    /// their gradients w.r.t. the heads' outputs; returns the number of
    /// spatial terms.
    fn losses(
        &mut self,
        input: &StepInput,
        sched: &StepSchedule,
    ) -> Result<(usize, SpatialMean), OpError> {
        let (be, cfg) = (&self.be, &self.cfg);
        let ws = self.ws.as_mut().expect("shaped");
        let (b, l) = (input.batch(), input.local_views());
        let group = self.group.as_ref();
        let counts = SpatialCounts::of(input.grids);
        let global = counts.over(group)?; // the identity in one process
        let spatial_mean = SpatialMean::new(cfg.non_overlapping, counts, global, group.world());
        be.zero(&mut ws.dlogits)?;
        let dino = DinoLossArgs {
            views: 2 + l,
            batch: b,
            dim: cfg.out_dim,
            tau_student: cfg.student_temp as f32,
            tau_teacher: sched.teacher_temp,
            weight: cfg.image_loss_weight() as f32,
            centre_momentum: cfg.center_momentum as f32,
        };
        let (st, te) = (ws.dino_student.logits(), ws.dino_teacher.logits());
        let teacher = CentredTeacher {
            logits: te,
            centre: &mut self.centre,
        };
        let report = StatSlot {
            stats: &mut ws.stats,
            slot: SLOT_DINO,
        };
        be.dino_loss(st, teacher, dino, &mut ws.dlogits, report)?;
        if let Some(m) = ws.mim.as_mut() {
            mim_loss(
                be,
                cfg,
                sched,
                input,
                m,
                &mut self.patch_centre,
                &mut ws.stats,
            )?;
        }
        if group.world() > 1 {
            // Each rank moved the centres towards its shard's mean; their
            // mean is the move towards the global batch's (DINO's
            // `all_reduce` of the batch centre).
            be.all_reduce_mean(group, &mut self.centre)?;
            if ws.mim.is_some() {
                be.all_reduce_mean(group, &mut self.patch_centre)?;
            }
        }

        if !cfg.relations() {
            // DINO (and iBOT) alone: nothing reads the relations.
            return Ok((0, spatial_mean));
        }
        let shapes = ViewShapes {
            batch: b,
            channels: cfg.dim,
            global_hw: (cfg.grid(), cfg.grid()),
            local_hw: (cfg.local_grid(), cfg.local_grid()),
            locals: l,
        };
        let loss_cfg = SereLossConfig {
            heads: cfg.heads,
            tau_teacher_spatial: cfg.spatial_tau_t as f32,
            tau_teacher_channel: cfg.channel_tau_t as f32,
            tau_student: 1.0,
        };
        let (gp, gg) = (&ws.global, &mut ws.global_grads);
        be.zero(&mut gg.dspatial)?;
        be.zero(&mut gg.dchannel)?;
        // Without local crops the losses read no local view: the global
        // outputs stand in for the features, the empty buffers for the
        // gradients.
        let (lsp, lch, ldsp, ldch) = match ws.local.as_mut() {
            Some((lp, lg)) => {
                be.zero(&mut lg.dspatial)?;
                be.zero(&mut lg.dchannel)?;
                let outputs = (lp.spatial.output(), lp.channel.output());
                (outputs.0, outputs.1, &mut lg.dspatial, &mut lg.dchannel)
            }
            None => {
                let (s, c) = &mut ws.no_local_grads;
                (gp.spatial.output(), gp.channel.output(), s, c)
            }
        };
        let tp = &ws.teacher;
        let args = RelationArgs {
            cfg: &loss_cfg,
            shapes: &shapes,
            grids: input.grids,
            teacher_spatial: tp.spatial.output(),
            teacher_channel: tp.channel.output(),
            student_spatial: StudentFeatures {
                globals: gp.spatial.output(),
                locals: lsp,
            },
            student_channel: StudentFeatures {
                globals: gp.channel.output(),
                locals: lch,
            },
            weights: (spatial_mean.weight(cfg.alpha as f32), cfg.beta as f32),
            dspatial: StudentFeatureGrads {
                globals: &mut gg.dspatial,
                locals: ldsp,
            },
            dchannel: StudentFeatureGrads {
                globals: &mut gg.dchannel,
                locals: ldch,
            },
        };
        let terms = be.relation_losses(&mut ws.relation, args, &mut ws.stats, SLOT_SPATIAL)?;
        Ok((terms, spatial_mean))
    }

    /// Backward from the heads' output gradients: DINO head to the CLS
    /// tokens (through the final norm), SERE heads (predictor, then
    /// projection) to the patch tokens before it, both through the
    /// backbone.
    fn backward(&mut self) -> Result<(), OpError> {
        let (be, net, params, d) = (&self.be, &self.net, &self.student, self.cfg.dim);
        let ws = self.ws.as_mut().expect("shaped");
        let grads = &mut self.grads;
        be.zero(grads)?;
        be.zero(&mut ws.dcls)?;
        net.dino.backward(
            be,
            params,
            &mut ws.dino_student,
            &ws.dlogits,
            grads,
            &mut ws.dcls,
        )?;
        if let Some(m) = ws.mim.as_mut() {
            be.zero(&mut m.dtokens)?;
            let head = net.patch_head();
            head.backward(
                be,
                params,
                &mut m.student_head,
                &m.dlogits,
                grads,
                &mut m.dtokens,
            )?;
        }
        let global = (
            &mut ws.global,
            &mut ws.global_grads,
            &net.sere.spatial_global,
            &net.sere.channel_global,
        );
        let local = ws
            .local
            .as_mut()
            .map(|(p, g)| (p, g, &net.sere.spatial_local, &net.sere.channel_local));
        let relations = self.cfg.relations();
        let mut first_cls = 0;
        for (pass, pg, sp, ch) in [global].into_iter().chain(local) {
            if relations {
                be.zero(&mut pg.dpatches)?;
                sp.backward(
                    be,
                    params,
                    &pass.patches,
                    &mut pass.spatial,
                    &pg.dspatial,
                    Grads {
                        input: &mut pg.dpatches,
                        params: &mut *grads,
                    },
                )?;
                ch.backward(
                    be,
                    params,
                    &pass.patches,
                    &mut pass.channel,
                    &pg.dchannel,
                    Grads {
                        input: &mut pg.dpatches,
                        params: &mut *grads,
                    },
                )?;
            }
            be.zero(&mut pg.dout)?;
            let t = pass.vit.t;
            be.copy_blocks(
                &ws.dcls,
                &mut pg.dout,
                cls_rows(pass.images, t, d, first_cls, false),
                false,
            )?;
            if let Some(m) = ws.mim.as_ref().filter(|_| first_cls == 0) {
                // The patch head's gradient of the global crops' patch rows.
                let rows = patch_rows(pass, d, false);
                be.copy_blocks(&m.dtokens, &mut pg.dout, rows, false)?;
            }
            // The CLS and patch rows' gradient enters through the final
            // norm, the SERE heads' before it.
            let dpatches = relations.then_some(&pg.dpatches);
            net.vit
                .backward(be, params, &mut pass.vit, &pg.dout, dpatches, grads)?;
            first_cls += pass.images;
        }
        Ok(())
    }

    /// The group's mean gradient (each rank's is the gradient of its
    /// shard's part of the global losses, scaled by the world size), then
    /// its norm into the step's scalars.
    fn reduce_gradient(&mut self) -> Result<(), OpError> {
        let (be, group) = (&self.be, self.group.as_ref());
        if group.world() > 1 {
            be.all_reduce_mean(group, &mut self.grads)?;
        }
        let ws = self.ws.as_mut().expect("shaped");
        be.l2_norm(&self.grads, &mut ws.stats, SLOT_GRAD_NORM)
    }

    /// Reads the step's scalars (the one synchronisation of a step) and
    /// refuses a non-finite loss or gradient.
    fn read_stats(
        &self,
        spatial_terms: usize,
        spatial_mean: SpatialMean,
        step: u64,
    ) -> Result<StepStats, StepError> {
        let ws = self.ws.as_ref().expect("shaped");
        let mut s = self.be.download(&ws.stats).map_err(StepError::at(step))?;
        self.reduce_stats(&mut s, spatial_mean)
            .map_err(StepError::at(step))?;
        let cfg = &self.cfg;
        let (w_img, alpha, beta) = (
            cfg.image_loss_weight() as f32,
            cfg.alpha as f32,
            cfg.beta as f32,
        );
        let image = s[SLOT_DINO] + s[SLOT_MIM];
        let spatial = spatial_mean.apply(s[SLOT_SPATIAL]);
        let loss = w_img * image + alpha * spatial + beta * s[SLOT_CHANNEL];
        let non_finite = |what: &str| StepError::NonFinite {
            step,
            what: what.into(),
        };
        if !loss.is_finite() {
            return Err(non_finite("the loss"));
        }
        if !s[SLOT_GRAD_NORM].is_finite() {
            return Err(non_finite("the gradient"));
        }
        Ok(StepStats {
            loss,
            dino: s[SLOT_DINO],
            teacher_entropy: s[SLOT_TEACHER_ENTROPY],
            mim: s[SLOT_MIM],
            spatial,
            channel: s[SLOT_CHANNEL],
            grad_norm: s[SLOT_GRAD_NORM],
            spatial_terms,
        })
    }

    /// The group's losses from each rank's (every one a mean over equal
    /// shards, the spatial one over the rank's own overlapping terms, made
    /// a share of the group's first); the gradient norm is already the
    /// reduced gradient's. A non-finite value on any rank makes every
    /// rank's non-finite, so all refuse the step together.
    fn reduce_stats(&self, s: &mut [f32], spatial_mean: SpatialMean) -> Result<(), OpError> {
        let group = self.group.as_ref();
        if group.world() == 1 {
            return Ok(());
        }
        const REDUCED: [usize; 5] = [
            SLOT_DINO,
            SLOT_TEACHER_ENTROPY,
            SLOT_SPATIAL,
            SLOT_CHANNEL,
            SLOT_MIM,
        ];
        s[SLOT_SPATIAL] *= spatial_mean.share;
        let mut v = REDUCED.map(|i| s[i]);
        group.all_reduce_mean_f32(&mut v)?;
        for (i, x) in REDUCED.into_iter().zip(v) {
            s[i] = x;
        }
        Ok(())
    }

    /// AdamW on the student (the DINO head's last layer skipped while
    /// frozen, like a parameter without gradient in PyTorch), then the
    /// teacher EMA.
    fn update(&mut self, sched: &StepSchedule) -> Result<(), OpError> {
        self.adam_steps += 1;
        if !sched.freeze_last_layer {
            self.last_layer_steps += 1;
        }
        for g in &self.adam_groups {
            if g.last_layer && sched.freeze_last_layer {
                continue;
            }
            let t = if g.last_layer {
                self.last_layer_steps
            } else {
                self.adam_steps
            };
            // PyTorch's AdamW defaults (betas 0.9/0.999, eps 1e-8), as DINO.
            let opt = AdamW {
                lr: sched.lr,
                weight_decay: if g.decay { sched.weight_decay } else { 0.0 },
                ..AdamW::default()
            };
            let moments = (&mut self.adam_m, &mut self.adam_v);
            self.be.adamw(
                &mut self.student,
                &self.grads,
                moments,
                g.range.clone(),
                &opt,
                t,
            )?;
        }
        self.be
            .ema(&mut self.teacher, &self.student, sched.momentum)
    }

    /// The run's state after `step` steps, on the host, as a checkpoint
    /// (the same format on every backend).
    pub fn snapshot(&self, step: u64) -> Result<Checkpoint, OpError> {
        let be = &self.be;
        let host_bn = |s: &SereHeads<SereHeadState<B>>| -> Result<HostBnStates, OpError> {
            s.try_map(|h| {
                let bn = |r: &BnRunning<B>| -> Result<BnRunning<Cpu>, OpError> {
                    Ok(BnRunning {
                        mean: be.download(&r.mean)?,
                        var: be.download(&r.var)?,
                    })
                };
                Ok(SereHeadState {
                    projection: bn(&h.projection)?,
                    predictor: bn(&h.predictor)?,
                })
            })
        };
        let (student, teacher) = (be.download(&self.student)?, be.download(&self.teacher)?);
        let (adam_m, adam_v) = (be.download(&self.adam_m)?, be.download(&self.adam_v)?);
        let centre = be.download(&self.centre)?;
        // A device may round an empty buffer up to one element: ask the
        // config, not the buffer, whether there is a patch centre.
        let patch_centre = if self.cfg.mim {
            be.download(&self.patch_centre)?
        } else {
            Vec::new()
        };
        let (student_bn, teacher_bn) = (host_bn(&self.student_bn)?, host_bn(&self.teacher_bn)?);
        let view = RunView {
            layout: &self.net.layout,
            student: &student,
            teacher: &teacher,
            adam_m: &adam_m,
            adam_v: &adam_v,
            centre: &centre,
            patch_centre: &patch_centre,
            student_bn: &student_bn,
            teacher_bn: &teacher_bn,
            adam_steps: self.adam_steps,
            last_layer_steps: self.last_layer_steps,
        };
        Ok(snapshot_state(&view, &self.cfg, step))
    }

    /// Starts the student and the teacher from the backbone in `file`
    /// (timm's names, matched strictly, see [`crate::import`]); the heads
    /// keep their initialisation. For step 0 only: the optimizer state is
    /// untouched.
    pub fn init_backbone(&mut self, file: &Checkpoint) -> Result<(), SereError> {
        let device = |e: OpError| SereError::Device(e.to_string());
        let mut host = self.be.download(&self.student).map_err(device)?;
        crate::import::read_backbone(file, &self.net, &mut host)?;
        self.be
            .upload_into(&host, &mut self.student)
            .map_err(device)?;
        self.be
            .upload_into(&host, &mut self.teacher)
            .map_err(device)
    }

    /// Restores the run's state from a checkpoint (written by any backend);
    /// returns the step to continue from. The model shape must match.
    pub fn restore(&mut self, ck: &Checkpoint) -> Result<u64, SereError> {
        let n = self.net.layout.len();
        let mut host = [(); 4].map(|_| vec![0.0f32; n]);
        let mut centre = vec![0.0f32; self.cfg.out_dim];
        let patch_len = if self.cfg.mim {
            self.cfg.patch_head_dim()
        } else {
            0
        };
        let mut patch_centre = vec![0.0f32; patch_len];
        let fresh = || self.net.new_bn_states(&Cpu).expect("host buffers");
        let (mut student_bn, mut teacher_bn) = (fresh(), fresh());
        let [student, teacher, adam_m, adam_v] = &mut host;
        let step = restore_state(
            RunState {
                layout: &self.net.layout,
                student,
                teacher,
                adam_m,
                adam_v,
                centre: &mut centre,
                patch_centre: &mut patch_centre,
                student_bn: &mut student_bn,
                teacher_bn: &mut teacher_bn,
                adam_steps: &mut self.adam_steps,
                last_layer_steps: &mut self.last_layer_steps,
            },
            ck,
        )?;
        self.upload_state(&host, (&centre, &patch_centre), (&student_bn, &teacher_bn))
            .map_err(|e| SereError::Device(e.to_string()))?;
        Ok(step)
    }

    fn upload_state(
        &mut self,
        [student, teacher, adam_m, adam_v]: &[Vec<f32>; 4],
        (centre, patch_centre): (&[f32], &[f32]),
        (student_bn, teacher_bn): (&HostBnStates, &HostBnStates),
    ) -> Result<(), OpError> {
        let be = &self.be;
        be.upload_into(student, &mut self.student)?;
        be.upload_into(teacher, &mut self.teacher)?;
        be.upload_into(adam_m, &mut self.adam_m)?;
        be.upload_into(adam_v, &mut self.adam_v)?;
        be.upload_into(centre, &mut self.centre)?;
        if !patch_centre.is_empty() {
            be.upload_into(patch_centre, &mut self.patch_centre)?;
        }
        for (dev, host) in [
            (&mut self.student_bn, student_bn),
            (&mut self.teacher_bn, teacher_bn),
        ] {
            for ((_, d), (_, h)) in dev.iter_mut().zip(host.iter()) {
                be.upload_into(&h.projection.mean, &mut d.projection.mean)?;
                be.upload_into(&h.projection.var, &mut d.projection.var)?;
                be.upload_into(&h.predictor.mean, &mut d.predictor.mean)?;
                be.upload_into(&h.predictor.var, &mut d.predictor.var)?;
            }
        }
        Ok(())
    }
}

/// The one runtime dispatch point between the commands and a device: an
/// [`Engine`] on the CPU or on a CUDA GPU, chosen by `cfg.device`.
pub enum AnyEngine {
    /// Host CPU: sere-core kernels, the blocked SGEMM, rayon threads.
    Cpu(Box<Engine<Cpu>>),
    /// CUDA device 0: sere-cuda kernels and cuBLAS; everything but the
    /// crops, grids and drop-path factors stays on the device.
    Cuda(Box<Engine<Cuda>>),
}

/// Runs `$body` with `$e` bound to the engine inside `$any`, whatever its
/// backend.
macro_rules! on_engine {
    ($any:expr, $e:ident => $body:expr) => {
        match $any {
            AnyEngine::Cpu($e) => $body,
            AnyEngine::Cuda($e) => $body,
        }
    };
}

impl AnyEngine {
    /// The engine for `cfg.device`, or a clear error when this machine
    /// cannot provide it.
    pub fn new(cfg: &TrainConfig) -> Result<Self, SereError> {
        match cfg.device {
            crate::config::Device::Cpu => Ok(AnyEngine::Cpu(Box::new(Engine::cpu(cfg)))),
            crate::config::Device::Cuda => {
                let cuda = open_cuda()?;
                let e = Engine::new(cuda, cfg).map_err(|e| cuda_unavailable(&e))?;
                Ok(AnyEngine::Cuda(Box::new(e)))
            }
        }
    }

    /// One training step: forward, losses, backward, clipping, AdamW, EMA.
    pub fn step(
        &mut self,
        input: &StepInput,
        sched: &StepSchedule,
    ) -> Result<StepStats, StepError> {
        on_engine!(self, e => e.step(input, sched))
    }

    /// The monitor's k-NN of the teacher as it is now, on the engine's
    /// device (`cfg`: the run's configuration).
    pub fn score_teacher(
        &self,
        monitor: &mut crate::eval::monitor::KnnMonitor,
        cfg: &TrainConfig,
    ) -> Result<f64, SereError> {
        on_engine!(self, e => monitor.score(&crate::eval::features::Backbone {
            be: e.backend(),
            net: &e.net,
            params: &e.teacher,
            cfg,
        }))
    }

    /// Waits until the device has finished every enqueued operation (for
    /// timings).
    pub fn synchronize(&self) -> Result<(), SereError> {
        on_engine!(self, e => e.backend().synchronize())
            .map_err(|e| SereError::Device(e.to_string()))
    }

    /// The network's layout and modules (the same on every backend).
    pub fn net(&self) -> &SereNet {
        on_engine!(self, e => &e.net)
    }

    /// The run's state after `step` steps, on the host, as a checkpoint.
    pub fn snapshot(&self, step: u64) -> Result<Checkpoint, SereError> {
        on_engine!(self, e => e.snapshot(step)).map_err(|e| SereError::Device(e.to_string()))
    }

    /// Restores the run's state; returns the step to continue from.
    pub fn restore(&mut self, ck: &Checkpoint) -> Result<u64, SereError> {
        on_engine!(self, e => e.restore(ck))
    }

    /// Starts student and teacher from a backbone file (see
    /// [`Engine::init_backbone`]).
    pub fn init_backbone(&mut self, file: &Checkpoint) -> Result<(), SereError> {
        on_engine!(self, e => e.init_backbone(file))
    }

    /// Trains as one rank of `group` ([`Engine::join`]). Data-parallel
    /// training runs on the CPU backend: several GPUs need NCCL, which is
    /// not built yet.
    pub fn join(&mut self, group: ProcessGroup) -> Result<(), SereError> {
        match self {
            AnyEngine::Cpu(e) => e.join(group),
            AnyEngine::Cuda(_) if group.world() > 1 => {
                return Err(SereError::Other(format!(
                    "data-parallel training over {} processes runs on the CPU only: several GPUs \
                     need NCCL, which this sere does not have yet; train with --device cpu, or \
                     on one GPU in one process",
                    group.world()
                )))
            }
            AnyEngine::Cuda(e) => e.join(group),
        }
        Ok(())
    }

    /// A hash of the whole training state (parameters, optimizer moments,
    /// centres), to check that every rank starts from the same one.
    pub fn fingerprint(&self) -> Result<u64, SereError> {
        let ck = self.snapshot(0)?;
        Ok(ck.fingerprint())
    }
}

/// CUDA device 0, or the no-GPU error saying what is missing and what to do.
/// GEMMs stay full FP32 unless `SERE_CUDA_TF32=1` (TF32 tensor cores).
pub fn open_cuda() -> Result<Cuda, SereError> {
    sere_cuda::probe().map_err(|e| cuda_unavailable(&e))?;
    let cuda = Cuda::new(0).map_err(|e| cuda_unavailable(&e))?;
    if std::env::var("SERE_CUDA_TF32").is_ok_and(|v| v == "1") {
        cuda.gpu()
            .set_tf32(true)
            .map_err(|e| SereError::Device(format!("CUDA: {e}")))?;
    }
    Ok(cuda)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DecayRule;
    use ndarray::Array5;

    #[test]
    fn step_crops_become_one_image_batch_without_a_copy() {
        let crops = Array5::from_shape_fn((2, 3, 3, 4, 4), |(v, b, c, i, j)| {
            (v * 1000 + b * 100 + c * 16 + i * 4 + j) as f32
        });
        let images = image_batch(crops.view()).unwrap();
        assert_eq!(images.dim(), (6, 3, 4, 4));
        assert_eq!(images.as_ptr(), crops.as_ptr());
        // Image 4 is view 1's second image.
        assert_eq!(images[[4, 2, 3, 1]], crops[[1, 1, 2, 3, 1]]);
        // A permuted view cannot merge its axes in place: an error, not a copy.
        let permuted = crops.view().permuted_axes([1, 0, 2, 3, 4]);
        assert!(image_batch(permuted).is_err());
    }

    /// The decayed parameters under each rule, by name.
    fn decayed(rule: DecayRule) -> Vec<String> {
        let cfg = TrainConfig {
            weight_decay_rule: rule,
            ..TrainConfig::default()
        };
        let e = Engine::cpu(&cfg);
        e.net
            .layout
            .entries()
            .iter()
            .filter(|p| {
                e.adam_groups.iter().any(|g| {
                    g.decay && g.range.start <= p.range.start && p.range.end <= g.range.end
                })
            })
            .map(|p| p.name.clone())
            .collect()
    }

    #[test]
    fn adam_groups_follow_the_weight_decay_rule() {
        let (dino, authors) = (decayed(DecayRule::Dino), decayed(DecayRule::Authors));
        let has = |v: &[String], n: &str| v.iter().any(|x| x == n);
        for v in [&dino, &authors] {
            assert!(has(v, "backbone.blocks.0.attn.qkv.weight"));
            assert!(has(v, "dino_head.last_layer.weight_v"));
            assert!(!has(v, "backbone.blocks.0.norm1.weight"));
            assert!(!has(v, "spatial_global.predictor.bn.weight"));
        }
        for bias in [
            "backbone.blocks.0.attn.qkv.bias",
            "dino_head.mlp.0.bias",
            "backbone.norm.bias",
        ] {
            assert!(!has(&dino, bias) && has(&authors, bias), "{bias}");
        }
    }
}
