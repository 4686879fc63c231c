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
use ndarray::{ArrayView, ArrayViewMut, Dimension};
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

/// A linear layer's tensors inside a network's flat parameter buffer: the
/// weight (`out x inp`, PyTorch's layout) and an optional bias (`out`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearParams {
    /// Range of `W`.
    pub weight: Range<usize>,
    /// Range of `b`, when the layer has one.
    pub bias: Option<Range<usize>>,
}

impl LinearParams {
    /// This layer read from the parameter buffer `params`.
    pub fn of<'a, T: ?Sized>(&'a self, params: &'a T) -> ParamView<'a, T, Self> {
        ParamView {
            params,
            layer: self,
        }
    }
}

/// A norm's scale and shift (one value per channel) inside a network's flat
/// parameter buffer: layer norm and batch norm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormParams {
    /// Range of the scale `gamma`.
    pub gamma: Range<usize>,
    /// Range of the shift `beta`.
    pub beta: Range<usize>,
}

impl NormParams {
    /// This norm read from the parameter buffer `params`.
    pub fn of<'a, T: ?Sized>(&'a self, params: &'a T) -> ParamView<'a, T, Self> {
        ParamView {
            params,
            layer: self,
        }
    }
}

/// One layer's named view of a network's parameters: the flat buffer and
/// where the layer's tensors lie in it ([`LinearParams`], [`NormParams`]).
/// Gradients go into a buffer of the same layout at the same ranges.
#[derive(Debug)]
pub struct ParamView<'a, T: ?Sized, L> {
    /// The network's flat parameter buffer.
    pub params: &'a T,
    /// Where this layer's tensors are.
    pub layer: &'a L,
}

impl<T: ?Sized, L> Clone for ParamView<'_, T, L> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T: ?Sized, L> Copy for ParamView<'_, T, L> {}

/// `rows` rows of `cols` values, row-major: the shape of a row-wise
/// operation's input and output (layer norm, batch norm, L2-normalised
/// rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rows {
    /// Rows (tokens, images).
    pub rows: usize,
    /// Values per row (channels).
    pub cols: usize,
}

impl Rows {
    /// `rows` rows of `cols` values.
    pub const fn new(rows: usize, cols: usize) -> Self {
        Rows { rows, cols }
    }
}

/// The values of a standard-layout (row-major, contiguous) host view as
/// one slice: the CPU kernels split its rows into contiguous chunks, and a
/// backend uploads it as one block. Another layout is
/// [`not_standard`]'s error naming `what`.
pub(crate) fn standard<'a, T, D: Dimension>(
    v: &ArrayView<'a, T, D>,
    what: &'static str,
) -> sere_core::Result<&'a [T]> {
    v.to_slice().ok_or(not_standard(what))
}

/// [`standard`], mutable.
pub(crate) fn standard_mut<'a, T, D: Dimension>(
    v: ArrayViewMut<'a, T, D>,
    what: &'static str,
) -> sere_core::Result<&'a mut [T]> {
    v.into_slice().ok_or(not_standard(what))
}

/// The error of a host view of `what` that is not in standard layout.
pub(crate) fn not_standard(what: &'static str) -> sere_core::Error {
    sere_core::Error::InvalidArgument {
        what,
        requirement: "a standard-layout (row-major, contiguous) view",
    }
}

/// A matrix inside a device buffer: the buffer and the strided view of it.
///
/// This, and not an `ndarray::ArrayView2`, is what the backend operations
/// take: a view borrows host memory, while a backend's buffer may live on a
/// GPU. The CPU backend's kernels are slices and [`MatRef`]s at the GEMM.
#[derive(Debug)]
pub struct Mat<'a, T: ?Sized> {
    /// The buffer.
    pub buf: &'a T,
    /// Offset, shape and strides of the matrix in it.
    pub view: MatRef,
}

/// A [`Mat`] of `buf`.
pub fn mat<T: ?Sized>(buf: &T, view: MatRef) -> Mat<'_, T> {
    Mat { buf, view }
}

/// A [`MatMut`] of `buf`.
pub fn mat_mut<T: ?Sized>(buf: &mut T, view: MatRef) -> MatMut<'_, T> {
    MatMut { buf, view }
}

/// A mutable [`Mat`].
#[derive(Debug)]
pub struct MatMut<'a, T: ?Sized> {
    /// The buffer.
    pub buf: &'a mut T,
    /// Offset, shape and strides of the matrix in it.
    pub view: MatRef,
}

/// What a backward writes: the gradient of its input and the network's
/// parameter gradients (added at the layer's ranges). Whether the input
/// gradient is added into or overwritten is each operation's to say.
#[derive(Debug)]
pub struct Grads<'a, T: ?Sized> {
    /// Gradient of the operation's input.
    pub input: &'a mut T,
    /// The network's parameter gradients.
    pub params: &'a mut T,
}

/// What a layer-norm forward keeps for its backward: its input and each
/// row's mean and `1 / std`.
#[derive(Debug)]
pub struct LayerNormSaved<'a, T: ?Sized> {
    /// The input, `rows x cols`.
    pub x: &'a T,
    /// Row means (`rows`).
    pub mean: &'a T,
    /// Row `1 / std` (`rows`).
    pub rstd: &'a T,
}

/// What an L2 normalisation of rows keeps for its backward: its output and
/// each row's (floored) norm.
#[derive(Debug)]
pub struct L2Saved<'a, T: ?Sized> {
    /// The normalised rows.
    pub y: &'a T,
    /// Row norms, floored at the forward's `eps`.
    pub norms: &'a T,
}

/// Teacher logits and the centre subtracted from them, which the loss then
/// moves towards the logits' mean (DINO's and iBOT's centring).
#[derive(Debug)]
pub struct CentredTeacher<'a, T: ?Sized> {
    /// Teacher logits.
    pub logits: &'a T,
    /// The centre (`K`), updated in place after the loss.
    pub centre: &'a mut T,
}

/// Where an operation reports a scalar: `stats[slot]` (and the slots after
/// it that the operation names), read once per step.
#[derive(Debug)]
pub struct StatSlot<'a, T: ?Sized> {
    /// The step's statistics buffer.
    pub stats: &'a mut T,
    /// First slot written.
    pub slot: usize,
}

/// A batch norm's state beyond its parameters: the running statistics
/// (read in eval mode, updated in train mode) and, in train mode, this
/// batch's statistics, kept for the backward.
pub struct BnState<'a, B: Backend> {
    /// Batch or running statistics ([`BnMode`]).
    pub mode: BnMode,
    /// Running mean (`C`).
    pub running_mean: &'a mut B::Buf,
    /// Running variance (`C`, unbiased).
    pub running_var: &'a mut B::Buf,
    /// This batch's statistics (written in train mode).
    pub batch: &'a mut BnStats<B>,
}

/// What a train-mode batch norm + ReLU keeps for its backward.
pub struct BnSaved<'a, B: Backend> {
    /// The input `y`.
    pub y: &'a B::Buf,
    /// The output `ReLU(BN(y))`.
    pub out: &'a B::Buf,
    /// The batch's statistics.
    pub stats: &'a BnStats<B>,
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

    /// [`InputGrad::map`] with a fallible `f` (a checked slice of the
    /// buffer).
    pub fn try_map<U: ?Sized, E>(
        self,
        f: impl FnOnce(&'a mut T) -> Result<&'a mut U, E>,
    ) -> Result<InputGrad<'a, U>, E> {
        Ok(match self {
            InputGrad::Skip => InputGrad::Skip,
            InputGrad::Add(d) => InputGrad::Add(f(d)?),
            InputGrad::Write(d) => InputGrad::Write(f(d)?),
        })
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

    /// `y = x W^T (+ b)` with the layer's `W` and `b`; `y` overwritten.
    fn linear_forward(
        &self,
        x: &Self::Buf,
        layer: ParamView<'_, Self::Buf, LinearParams>,
        shape: LinearShape,
        y: &mut Self::Buf,
    ) -> OpResult;

    /// Backward of [`Backend::linear_forward`]: `dx += dy W` or `dx = dy W`
    /// (by [`InputGrad`]), `g[weight] += dy^T x`, `g[bias] += column sums of
    /// dy` (when the layer has a bias).
    fn linear_backward(
        &self,
        x: &Self::Buf,
        dy: &Self::Buf,
        layer: ParamView<'_, Self::Buf, LinearParams>,
        shape: LinearShape,
        dx: InputGrad<'_, Self::Buf>,
        g: &mut Self::Buf,
    ) -> OpResult;

    /// `c = alpha a b + beta c` on strided views of buffers (a transpose is
    /// a view with swapped strides).
    fn gemm(
        &self,
        alpha: f32,
        a: Mat<'_, Self::Buf>,
        b: Mat<'_, Self::Buf>,
        beta: f32,
        c: MatMut<'_, Self::Buf>,
    ) -> OpResult;

    // ----- rows and element-wise -------------------------------------------

    /// Layer norm of `shape`'s rows (eps `1e-6`, timm's) with the norm's
    /// scale and shift into `y`; each row's mean and `1 / std` into
    /// `mean_rstd`.
    fn layer_norm_forward(
        &self,
        x: &Self::Buf,
        norm: ParamView<'_, Self::Buf, NormParams>,
        shape: Rows,
        y: &mut Self::Buf,
        mean_rstd: (&mut Self::Buf, &mut Self::Buf),
    ) -> OpResult;

    /// Backward of [`Backend::layer_norm_forward`]: adds into
    /// `grads.input` and into `grads.params` at the norm's ranges.
    fn layer_norm_backward(
        &self,
        saved: LayerNormSaved<'_, Self::Buf>,
        dy: &Self::Buf,
        norm: ParamView<'_, Self::Buf, NormParams>,
        shape: Rows,
        grads: Grads<'_, Self::Buf>,
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
    fn l2_normalize_rows_backward(
        &self,
        dy: &Self::Buf,
        saved: L2Saved<'_, Self::Buf>,
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

    /// `out = ReLU(BN(y))` over `shape` (`rows x C`) with the norm's scale
    /// and shift, eps `1e-5`. Train mode: batch statistics (biased variance
    /// to normalise) into `state.batch`, running statistics updated in
    /// place (momentum 0.1, unbiased variance); with `state.batch.group`,
    /// the statistics of every process's rows together (SyncBN). Eval mode:
    /// the running statistics.
    fn batch_norm_relu(
        &self,
        y: &Self::Buf,
        norm: ParamView<'_, Self::Buf, NormParams>,
        shape: Rows,
        state: BnState<'_, Self>,
        scratch: &mut Self::Scratch,
        out: &mut Self::Buf,
    ) -> OpResult;

    /// Backward of a train-mode [`Backend::batch_norm_relu`] given what it
    /// saved: adds into `grads.params` at the norm's ranges; overwrites
    /// `grads.input` (the gradient of `y`).
    fn batch_norm_relu_backward(
        &self,
        saved: BnSaved<'_, Self>,
        dout: &Self::Buf,
        norm: ParamView<'_, Self::Buf, NormParams>,
        shape: Rows,
        grads: Grads<'_, Self::Buf>,
        scratch: &mut Self::Scratch,
    ) -> OpResult;

    /// iBOT's masked-patch loss: `sum_r weights[r] CE_r` of the student's
    /// patch logits against the centred, sharpened teacher patch logits of
    /// the same view (`rows x K` each; sere-core `weighted_cross_entropy`,
    /// the weights from `masked_patch_weights`), written into
    /// `report`'s slot; `weight * dL/dstudent` added into `dstudent`; then
    /// the patch centre `c = m c + (1 - m) mean_rows(teacher)` (the loss
    /// used the centre from before).
    fn mim_loss(
        &self,
        student: &Self::Buf,
        teacher: CentredTeacher<'_, Self::Buf>,
        weights: &Self::Buf,
        args: MimLossArgs,
        dstudent: &mut Self::Buf,
        report: StatSlot<'_, Self::Buf>,
    ) -> OpResult;

    /// The DINO loss of student logits `[V][B][K]` against the centred,
    /// sharpened teacher logits `[2][B][K]` (cross-view pairs only), written
    /// into `report`'s slot, and the mean entropy of those teacher
    /// distributions (sere-core `teacher_entropy`, the collapse monitor)
    /// into the slot after it; `weight * dL/dstudent` added into
    /// `dstudent`; then `centre = m centre + (1 - m) mean(teacher)` (the
    /// loss and the entropy used the centre from before).
    fn dino_loss(
        &self,
        student: &Self::Buf,
        teacher: CentredTeacher<'_, Self::Buf>,
        args: DinoLossArgs,
        dstudent: &mut Self::Buf,
        report: StatSlot<'_, Self::Buf>,
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
