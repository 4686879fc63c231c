//! Where the work runs. A [`Backend`] owns memory and operations on one
//! device; the model ([`crate::model`]) and the training step
//! ([`crate::train::engine::Engine`]) are written once, generic over it, and
//! never know which device they run on.
//!
//! The operations are the forward/backward pairs the model calls, at the
//! granularity of `sere-cuda`'s API (linear, layer norm, GELU, im2col, row
//! copies, residuals with drop-path keep factors, L2-normalised rows), plus a
//! few coarse fused ones so that each backend keeps its own batching
//! (attention, batch norm + ReLU, the relation losses over a batch's pairs,
//! the DINO loss and centre, gradient norms and clipping, AdamW, EMA).
//!
//! Conventions shared by every operation:
//! - buffers are flat `f32`; an operation reads and writes the leading
//!   elements its shape names, so a buffer may be longer than one use needs
//!   (workspaces are shaped for the largest use);
//! - parameters are read from a network's flat buffer `p` at the range of
//!   the tensor, and their gradients are *added* into a buffer `g` of the same
//!   layout at the same range;
//! - forward operations overwrite their outputs; backward operations add
//!   into input gradients, unless their documentation says otherwise;
//! - scalars a step reports (losses, gradient norm) are written into a small
//!   `stats` buffer at given slots, read once per step ([`Backend::download`]),
//!   so a GPU synchronises once.
//!
//! [`cpu::Cpu`] runs `sere-core`'s kernels on rayon's threads with a blocked
//! SGEMM; [`cuda::Cuda`] runs `sere-cuda`'s NVRTC kernels and cuBLAS. Each is
//! tested against `sere-core`, the reference.

pub mod cpu;
pub mod cuda;
pub mod relation;

use std::ops::Range;

use crate::augment::BatchPairGrids;
use crate::backend::relation::{SereLossConfig, ViewShapes};
use crate::dist::Collective;
use crate::error::SereError;
use sere_core::linalg::MatRef;
use sere_core::optim::AdamW;

pub use cpu::Cpu;
pub use cuda::Cuda;

/// PyTorch's / timm's ViT layer-norm epsilon.
pub const LN_EPS: f32 = 1e-6;

/// Batch-norm epsilon (PyTorch's default).
pub const BN_EPS: f32 = 1e-5;

/// Batch-norm running-statistics momentum (PyTorch's default).
pub const BN_MOMENTUM: f32 = 0.1;

/// Why a backend operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// A kernel rejected its inputs or met a non-finite value.
    #[error(transparent)]
    Kernel(#[from] sere_core::Error),
    /// The device failed (a driver, cuBLAS or launch error), one line.
    #[error("CUDA: {0}")]
    Device(String),
    /// A collective of a data-parallel step failed.
    #[error(transparent)]
    Dist(#[from] crate::dist::DistError),
}

/// Result of a backend operation.
pub type OpResult<T = ()> = Result<T, OpError>;

/// Rows and widths of a linear layer `y = x W^T + b`: `x` is `rows x inp`,
/// `W` is `out x inp` (PyTorch's layout), `y` is `rows x out`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearShape {
    /// Rows of `x` and `y`.
    pub rows: usize,
    /// Input features.
    pub inp: usize,
    /// Output features.
    pub out: usize,
}

/// Where [`Backend::linear_backward`] puts the gradient of its input.
///
/// `Write` exists because the commonest case, an input with no other
/// consumer (the MLP's hidden layer, the attention output), would
/// otherwise pay a zeroing pass over the buffer and a read of it inside
/// the GEMM: two memory passes over the step's largest activations.
#[derive(Debug)]
pub enum InputGrad<'a, T: ?Sized> {
    /// Not wanted: the input is data (the patch embedding's pixels).
    Skip,
    /// Added into the buffer: the input also feeds other operations.
    Add(&'a mut T),
    /// Written over the buffer, whose old values are never read.
    Write(&'a mut T),
}

impl<'a, T: ?Sized> InputGrad<'a, T> {
    /// The same mode on the part of the buffer `f` picks (the leading
    /// values a shape covers).
    pub fn map<U: ?Sized>(self, f: impl FnOnce(&'a mut T) -> &'a mut U) -> InputGrad<'a, U> {
        match self {
            InputGrad::Skip => InputGrad::Skip,
            InputGrad::Add(d) => InputGrad::Add(f(d)),
            InputGrad::Write(d) => InputGrad::Write(f(d)),
        }
    }

    /// The buffer with the `beta` of a GEMM that computes into it: 1 to
    /// add, 0 to write (`C` is then not read, on every CPU path and in
    /// cuBLAS); `None` for [`InputGrad::Skip`].
    pub fn with_beta(self) -> Option<(&'a mut T, f32)> {
        match self {
            InputGrad::Skip => None,
            InputGrad::Add(d) => Some((d, 1.0)),
            InputGrad::Write(d) => Some((d, 0.0)),
        }
    }
}

/// Shape of multi-head self-attention over `batch` sequences of `tokens`
/// tokens of width `dim`, split into `heads` heads. `qkv` rows are
/// `[3][heads][dim / heads]` per token (timm's layout), outputs `[heads][d]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub tokens: usize,
    /// Embedding width.
    pub dim: usize,
    /// Heads (divides `dim`).
    pub heads: usize,
}

/// `count` blocks of `len` contiguous values: block `i` is read at
/// `src_start + i * src_stride` and written (or added) at
/// `dst_start + i * dst_stride`. Gathers the CLS or patch rows of a token
/// buffer and scatters their gradients back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocks {
    /// Number of blocks.
    pub count: usize,
    /// Values per block.
    pub len: usize,
    /// Offset of the first block in the source.
    pub src_start: usize,
    /// Distance between blocks in the source.
    pub src_stride: usize,
    /// Offset of the first block in the destination.
    pub dst_start: usize,
    /// Distance between blocks in the destination.
    pub dst_stride: usize,
}

/// Whether a batch norm normalises with the batch's statistics (and updates
/// its running statistics, PyTorch's momentum 0.1, unbiased variance) or
/// with the running statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BnMode {
    /// Batch statistics; running statistics updated.
    #[default]
    Train,
    /// Running statistics; nothing updated.
    Eval,
}

/// The DINO loss of one step (see [`Backend::dino_loss`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DinoLossArgs {
    /// Student views `V` (the first two are the global ones).
    pub views: usize,
    /// Images per view.
    pub batch: usize,
    /// Output dimension `K`.
    pub dim: usize,
    /// Student temperature.
    pub tau_student: f32,
    /// Teacher temperature (scheduled).
    pub tau_teacher: f32,
    /// Weight of the loss in the total (scales the gradient).
    pub weight: f32,
    /// Centre momentum (0.9 in DINO).
    pub centre_momentum: f32,
}

/// iBOT's masked-patch loss of one step (see [`Backend::mim_loss`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MimLossArgs {
    /// Patch rows `2 B N` (the global views' patches, view-major).
    pub rows: usize,
    /// Output dimension `K` of the patch head.
    pub dim: usize,
    /// Student temperature.
    pub tau_student: f32,
    /// Patch teacher temperature (scheduled).
    pub tau_teacher: f32,
    /// Weight of the loss in the total (scales the gradient).
    pub weight: f32,
    /// Patch-centre momentum (0.9 in iBOT).
    pub centre_momentum: f32,
}

/// One network's features of a relation (spatial or channel): the student's
/// global views `[2][B][Ng][C]` and local views `[L][B][Nl][C]`.
pub struct StudentFeatures<'a, B: Backend> {
    /// Global views.
    pub globals: &'a B::Buf,
    /// Local views (unused when there are none).
    pub locals: &'a B::Buf,
}

/// Gradients of [`StudentFeatures`], added into.
pub struct StudentFeatureGrads<'a, B: Backend> {
    /// Global views.
    pub globals: &'a mut B::Buf,
    /// Local views.
    pub locals: &'a mut B::Buf,
}

/// Everything the relation losses of one batch read and write.
pub struct RelationArgs<'a, B: Backend> {
    /// Heads and temperatures.
    pub cfg: &'a SereLossConfig,
    /// Views, batch, channels and token grids.
    pub shapes: &'a ViewShapes,
    /// Overlap grids of every (teacher, student) view pair.
    pub grids: &'a [BatchPairGrids],
    /// Teacher projections for the spatial relation, `[2][B][Ng][C]`.
    pub teacher_spatial: &'a B::Buf,
    /// Teacher projections for the channel relation.
    pub teacher_channel: &'a B::Buf,
    /// Student predictions for the spatial relation.
    pub student_spatial: StudentFeatures<'a, B>,
    /// Student predictions for the channel relation.
    pub student_channel: StudentFeatures<'a, B>,
    /// `(alpha, beta)`: weights of the spatial and channel losses.
    pub weights: (f32, f32),
    /// Gradients of the spatial predictions (`alpha * dL_spatial` added).
    pub dspatial: StudentFeatureGrads<'a, B>,
    /// Gradients of the channel predictions (`beta * dL_channel` added).
    pub dchannel: StudentFeatureGrads<'a, B>,
}

/// Per-column statistics of one batch-norm forward, kept for its backward.
pub struct BnStats<B: Backend> {
    /// Mean used to normalise (`C`).
    pub mean: B::Buf,
    /// Variance used to normalise (`C`, biased in train mode).
    pub var: B::Buf,
    /// `1 / sqrt(var + eps)` (`C`).
    pub rstd: B::Buf,
    /// The processes whose rows the train-mode statistics span (PyTorch's
    /// `SyncBatchNorm`): their column sums are all-reduced in the forward
    /// and the backward. `None`: this process's rows alone.
    pub group: Option<crate::dist::ProcessGroup>,
}

/// A device: memory and the operations of the model and the step.
///
/// Generic code takes `B: Backend` (no `dyn`): the CPU build inlines its
/// kernels, and a new op is one method here with one implementation per
/// backend, each checked against `sere-core` by one test body.
pub trait Backend: Sized + Send + Sync {
    /// An owned buffer of `f32` on the device.
    type Buf: Send + Sync;
    /// Scratch an operation may grow and reuse across calls (reduction
    /// partials); owned by the caller's workspace.
    type Scratch: Default + Send;
    /// Workspace of [`Backend::relation_losses`], shaped on first use.
    type RelationWorkspace: Default + Send;

    /// A short name for messages (`cpu`, `cuda`).
    fn name(&self) -> &'static str;

    // ----- memory -------------------------------------------------------

    /// A zero-filled buffer of `len` values.
    fn zeros(&self, len: usize) -> OpResult<Self::Buf>;
    /// A buffer holding `host`.
    fn upload(&self, host: &[f32]) -> OpResult<Self::Buf>;
    /// Overwrites the first `host.len()` values of `dst` with `host`.
    fn upload_into(&self, host: &[f32], dst: &mut Self::Buf) -> OpResult;
    /// The whole buffer, on the host (waits for pending work).
    fn download(&self, src: &Self::Buf) -> OpResult<Vec<f32>>;
    /// Values in the buffer.
    fn len(&self, buf: &Self::Buf) -> usize;
    /// Sets every value of `dst` to 0.
    fn zero(&self, dst: &mut Self::Buf) -> OpResult;
    /// A copy of `src`.
    fn duplicate(&self, src: &Self::Buf) -> OpResult<Self::Buf>;
    /// Waits until every enqueued operation has finished (for timings).
    fn synchronize(&self) -> OpResult;
    /// Replaces `buf` by its element-wise mean over every rank of `group`
    /// (the gradient and centre reduction of a data-parallel step). The
    /// default stages through the host; a backend whose buffers are host
    /// memory reduces in place.
    fn all_reduce_mean(&self, group: &dyn Collective, buf: &mut Self::Buf) -> OpResult {
        let mut host = self.download(buf)?;
        group.all_reduce_mean_f32(&mut host)?;
        self.upload_into(&host, buf)
    }

    // ----- dense algebra --------------------------------------------------

    /// `y = x W^T (+ b)` with `W = p[w]`, `b = p[b]`; `y` overwritten.
    fn linear_forward(
        &self,
        x: &Self::Buf,
        p: &Self::Buf,
        w: Range<usize>,
        b: Option<Range<usize>>,
        shape: LinearShape,
        y: &mut Self::Buf,
    ) -> OpResult;

    /// Backward of [`Backend::linear_forward`]: `dx += dy W` or `dx = dy W`
    /// (by [`InputGrad`]), `g[w] += dy^T x`, `g[b] += column sums of dy`
    /// (when given).
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        x: &Self::Buf,
        p: &Self::Buf,
        w: Range<usize>,
        b: Option<Range<usize>>,
        dy: &Self::Buf,
        shape: LinearShape,
        dx: InputGrad<'_, Self::Buf>,
        g: &mut Self::Buf,
    ) -> OpResult;

    /// `c = alpha op(a) op(b) + beta c` on strided views (`MatRef` offsets
    /// and strides index the buffers).
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        alpha: f32,
        a: &Self::Buf,
        la: MatRef,
        b: &Self::Buf,
        lb: MatRef,
        beta: f32,
        c: &mut Self::Buf,
        lc: MatRef,
    ) -> OpResult;

    // ----- rows and element-wise -------------------------------------------

    /// Layer norm of `rows` rows of `cols` (eps `1e-6`, timm's), scale
    /// `p[gamma]`, shift `p[beta]`; saves each row's mean and `1 / std`.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_forward(
        &self,
        x: &Self::Buf,
        p: &Self::Buf,
        gamma: Range<usize>,
        beta: Range<usize>,
        rows: usize,
        cols: usize,
        y: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
    ) -> OpResult;

    /// Backward of [`Backend::layer_norm_forward`]: adds into `dx`,
    /// `g[gamma]` and `g[beta]`.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_backward(
        &self,
        x: &Self::Buf,
        p: &Self::Buf,
        gamma_beta: (Range<usize>, Range<usize>),
        mean_rstd: (&Self::Buf, &Self::Buf),
        dy: &Self::Buf,
        rows_cols: (usize, usize),
        dx: &mut Self::Buf,
        g: &mut Self::Buf,
        scratch: &mut Self::Scratch,
    ) -> OpResult;

    /// `y = gelu(x)` (exact, erf) on the first `n` values.
    fn gelu_forward(&self, x: &Self::Buf, n: usize, y: &mut Self::Buf) -> OpResult;
    /// `dx += dy * gelu'(x)` on the first `n` values.
    fn gelu_backward(
        &self,
        x: &Self::Buf,
        dy: &Self::Buf,
        n: usize,
        dx: &mut Self::Buf,
    ) -> OpResult;
    /// `d *= gelu'(x)` on the first `n` values (the MLP's backward in place).
    fn gelu_grad_in_place(&self, x: &Self::Buf, n: usize, d: &mut Self::Buf) -> OpResult;

    /// Non-overlapping `patch x patch` patches of `batch x chans x img x img`
    /// images as rows of `chans * patch^2` values in `(c, ky, kx)` order.
    fn im2col(
        &self,
        images: &Self::Buf,
        batch_chans_img_patch: (usize, usize, usize, usize),
        out: &mut Self::Buf,
    ) -> OpResult;

    /// Copies (or, with `accumulate`, adds) [`Blocks`] of `src` into `dst`.
    fn copy_blocks(
        &self,
        src: &Self::Buf,
        dst: &mut Self::Buf,
        blocks: Blocks,
        accumulate: bool,
    ) -> OpResult;

    /// Token assembly of a ViT: for each of `batch` images, row 0 of `x0`
    /// (`batch x (1 + n) x d`) is `p[cls] + p[pos][0..d]`, rows `1..` are
    /// `emb` (`batch x n x d`) plus `pos_patch` (`n x d`).
    #[allow(clippy::too_many_arguments)]
    fn embed_tokens(
        &self,
        emb: &Self::Buf,
        p: &Self::Buf,
        cls_pos: (Range<usize>, Range<usize>),
        pos_patch: &Self::Buf,
        batch_n_d: (usize, usize, usize),
        x0: &mut Self::Buf,
    ) -> OpResult;

    /// Backward of [`Backend::embed_tokens`] for `dx` (`batch x (1 + n) x d`):
    /// adds the CLS rows' sum into `g[cls]` and `g[pos][0..d]`, overwrites
    /// `dpos_patch` (`n x d`) with the patch rows' sum over images and `demb`
    /// (`batch x n x d`) with the patch rows.
    #[allow(clippy::too_many_arguments)]
    fn embed_tokens_backward(
        &self,
        dx: &Self::Buf,
        batch_n_d: (usize, usize, usize),
        cls_pos: (Range<usize>, Range<usize>),
        g: &mut Self::Buf,
        dpos_patch: &mut Self::Buf,
        demb: &mut Self::Buf,
    ) -> OpResult;

    /// Adds `src[..len]` into `dst[dst_start..dst_start + len]`.
    fn add_into(
        &self,
        src: &Self::Buf,
        len: usize,
        dst: &mut Self::Buf,
        dst_start: usize,
    ) -> OpResult;

    /// Drop-path residual per image of `per` values:
    /// `out = x + keep[i] * out` over the first `keep.len() * per` values
    /// (`images` images).
    fn residual_keep_add(
        &self,
        out: &mut Self::Buf,
        x: &Self::Buf,
        keep: &Self::Buf,
        images_per: (usize, usize),
    ) -> OpResult;

    /// `out = keep[i] * dx` per image of `per` values.
    fn keep_scale(
        &self,
        dx: &Self::Buf,
        keep: &Self::Buf,
        images_per: (usize, usize),
        out: &mut Self::Buf,
    ) -> OpResult;

    /// Per-row dot products added into `out[out_start..out_start + rows]`:
    /// `out[out_start + r] += a_r . b_r` over `rows x dim` buffers (the
    /// gradient of a per-row gain: the DINO head's learned weight-norm
    /// gain).
    fn row_dots_add(
        &self,
        a: &Self::Buf,
        b: &Self::Buf,
        rows_dim: (usize, usize),
        out: &mut Self::Buf,
        out_start: usize,
    ) -> OpResult;

    /// Rows of `src[src_start..]` (`rows x dim`) divided by their L2 norm
    /// floored at `eps` into `dst`; the (floored) norms into `norms`.
    #[allow(clippy::too_many_arguments)]
    fn l2_normalize_rows(
        &self,
        src: &Self::Buf,
        src_start: usize,
        rows_dim: (usize, usize),
        eps: f32,
        dst: &mut Self::Buf,
        norms: &mut Self::Buf,
    ) -> OpResult;

    /// Backward of [`Backend::l2_normalize_rows`] given its output `y` and
    /// norms: `dx = (dy - y (y . dy)) / norm` per row (`dy / norm` where the
    /// norm was floored), written at `dx[dx_start..]`, or added with
    /// `accumulate` (the weight-normalised layer's `V` gradient).
    #[allow(clippy::too_many_arguments)]
    fn l2_normalize_rows_backward(
        &self,
        dy: &Self::Buf,
        y: &Self::Buf,
        norms: &Self::Buf,
        rows_dim: (usize, usize),
        eps: f32,
        dx: &mut Self::Buf,
        dx_start_accumulate: (usize, bool),
    ) -> OpResult;

    // ----- fused ---------------------------------------------------------

    /// Self-attention core per image and head: `probs = softmax(q k^T /
    /// sqrt(d))` (`batch x heads x T x T`), `attn = probs v`. Non-finite
    /// scores are an error (a diverged run), not a panic.
    fn attention_forward(
        &self,
        qkv: &Self::Buf,
        shape: AttentionShape,
        probs: &mut Self::Buf,
        attn: &mut Self::Buf,
    ) -> OpResult;

    /// Length of the `dscores` scratch [`Backend::attention_backward`]
    /// needs for `shape` (one `T x T` block per image on the CPU).
    fn attention_scratch_len(&self, shape: AttentionShape) -> usize {
        shape.batch * shape.tokens * shape.tokens
    }

    /// Backward of [`Backend::attention_forward`]: adds into `dqkv`;
    /// `dscores` is scratch of [`Backend::attention_scratch_len`] values.
    fn attention_backward(
        &self,
        qkv: &Self::Buf,
        probs: &Self::Buf,
        dattn: &Self::Buf,
        shape: AttentionShape,
        dscores: &mut Self::Buf,
        dqkv: &mut Self::Buf,
    ) -> OpResult;

    /// `out = ReLU(BN(y))` over `rows x c`, scale `p[gamma]`, shift
    /// `p[beta]`, eps `1e-5`. Train mode: batch statistics (biased variance
    /// to normalise) into `stats`, running statistics updated in place
    /// (momentum 0.1, unbiased variance); with `stats.group`, the
    /// statistics of every process's rows together (SyncBN). Eval mode: the
    /// running statistics.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_relu(
        &self,
        y: &Self::Buf,
        p: &Self::Buf,
        gamma_beta: (Range<usize>, Range<usize>),
        running_mean_running_var: (&mut Self::Buf, &mut Self::Buf),
        mode: BnMode,
        rows_c: (usize, usize),
        stats: &mut BnStats<Self>,
        scratch: &mut Self::Scratch,
        out: &mut Self::Buf,
    ) -> OpResult;

    /// Backward of a train-mode [`Backend::batch_norm_relu`] given its input
    /// `y`, output `out` and `stats`: adds into `g[gamma]`, `g[beta]`;
    /// overwrites `dy`.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_relu_backward(
        &self,
        y: &Self::Buf,
        out: &Self::Buf,
        dout: &Self::Buf,
        p: &Self::Buf,
        gamma_beta: (Range<usize>, Range<usize>),
        stats: &BnStats<Self>,
        rows_c: (usize, usize),
        g: &mut Self::Buf,
        scratch: &mut Self::Scratch,
        dy: &mut Self::Buf,
    ) -> OpResult;

    /// iBOT's masked-patch loss: `sum_r weights[r] CE_r` of the student's
    /// patch logits against the centred, sharpened teacher patch logits of
    /// the same view (`rows x K` each; sere-core `weighted_cross_entropy`,
    /// the weights from `masked_patch_weights`), written into
    /// `stats[slot]`; `weight * dL/dstudent` added into `dstudent`; then the
    /// patch centre `c = m c + (1 - m) mean_rows(teacher)` (the loss used
    /// the centre from before).
    #[allow(clippy::too_many_arguments)]
    fn mim_loss(
        &self,
        student: &Self::Buf,
        teacher: &Self::Buf,
        weights: &Self::Buf,
        centre: &mut Self::Buf,
        args: MimLossArgs,
        dstudent: &mut Self::Buf,
        stats: &mut Self::Buf,
        slot: usize,
    ) -> OpResult;

    /// The DINO loss of student logits `[V][B][K]` against the centred,
    /// sharpened teacher logits `[2][B][K]` (cross-view pairs only), written
    /// into `stats[slot]`, and the mean entropy of those teacher
    /// distributions (sere-core `teacher_entropy`, the collapse monitor)
    /// into `stats[slot + 1]`; `weight * dL/dstudent` added into
    /// `dstudent`; then `centre = m centre + (1 - m) mean(teacher)` (the
    /// loss and the entropy used the centre from before).
    #[allow(clippy::too_many_arguments)]
    fn dino_loss(
        &self,
        student: &Self::Buf,
        teacher: &Self::Buf,
        centre: &mut Self::Buf,
        args: DinoLossArgs,
        dstudent: &mut Self::Buf,
        stats: &mut Self::Buf,
        slot: usize,
    ) -> OpResult;

    /// SERE's spatial and channel relation losses over a batch (see
    /// [`cpu::relation_loss`]): `L_spatial` into `stats[slot]`,
    /// `L_channel` into `stats[slot + 1]`, weighted gradients added into the
    /// student feature gradients. Returns the number of spatial terms
    /// (overlapping image pairs, known on the host from the grids).
    fn relation_losses(
        &self,
        ws: &mut Self::RelationWorkspace,
        args: RelationArgs<'_, Self>,
        stats: &mut Self::Buf,
        slot: usize,
    ) -> OpResult<usize>;

    /// The global L2 norm of `g` into `stats[slot]`.
    fn l2_norm(&self, g: &Self::Buf, stats: &mut Self::Buf, slot: usize) -> OpResult;

    /// Clips each range of `g` to L2 norm at most `max_norm`
    /// (`torch.nn.utils.clip_grad_norm_` per tensor, as DINO).
    fn clip_per_tensor(
        &self,
        g: &mut Self::Buf,
        ranges: &[Range<usize>],
        max_norm: f32,
    ) -> OpResult;

    /// One AdamW step on `p[range]` with gradient `g[range]` and moments
    /// `m[range]`, `v[range]`, at optimizer step `t` (1-based).
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &self,
        p: &mut Self::Buf,
        g: &Self::Buf,
        m_v: (&mut Self::Buf, &mut Self::Buf),
        range: Range<usize>,
        opt: &AdamW,
        t: u32,
    ) -> OpResult;

    /// `teacher = momentum * teacher + (1 - momentum) * student`.
    fn ema(&self, teacher: &mut Self::Buf, student: &Self::Buf, momentum: f32) -> OpResult;
}

/// The error of `--device cuda` when no usable GPU is there: what is
/// missing (sere-cuda's one-line reason) and what to do instead.
pub fn cuda_unavailable(reason: &impl std::fmt::Display) -> SereError {
    SereError::Device(format!(
        "--device cuda needs an NVIDIA GPU with its driver, NVRTC and cuBLAS: {reason}; \
         run with --device cpu"
    ))
}
