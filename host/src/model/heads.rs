//! The heads on top of the backbone, with analytic backward, written once
//! over a [`Backend`]:
//!
//! - [`DinoHead`]: the image-level head of DINO/iBOT on the CLS token:
//!   an MLP (Linear - GELU - ... - Linear to a bottleneck), row-wise L2
//!   normalisation (`F.normalize`, eps `1e-12`) and a weight-normalised last
//!   linear layer without bias, `W_k = g_k V_k / ||V_k||`: with
//!   `norm_last_layer` (DINO's default) the gain `g` is fixed to 1 and only
//!   `V` is a parameter; without it `g` (`last_layer.weight_g`, `K x 1`,
//!   initialised to 1) is learned too, as the authors' ViT-S/16 recipe does.
//! - [`SereHead`]: SERE's heads on the patch tokens, one per relation type
//!   (spatial, channel) and crop kind (global, local), two stacked stages:
//!   the projection `z = ReLU(BN1(r))` and the predictor
//!   `p = ReLU(BN2(W z))` on it, with `W` a `C x C` linear layer without
//!   bias. The teacher relates its `z`, the student its `p` (computed from
//!   the student's own `z`), so the student's gradient reaches BN1, `W` and
//!   BN2 (SERE.md, pipeline step 3).
//!
//! Parameters live in the network's flat buffer ([`ParamLayout`]); each head
//! only keeps the ranges of its tensors. Activations are kept for backward
//! in reusable workspaces ([`DinoHeadActs`], [`SereActs`]) shaped once per
//! row count. Forward functions overwrite their
//! outputs; backward functions *add* into the parameter gradient buffer
//! (`grads`, same layout as `params`) and into `dx`.

use std::ops::Range;

use super::params::{Init, ParamLayout};
pub use crate::backend::BnMode;
use crate::backend::{
    Backend, BnSaved, BnState, BnStats, Grads, InputGrad, L2Saved, LinearParams, LinearShape,
    NormParams, OpResult, Rows,
};

/// Standard deviation of the truncated-normal initialisation of the heads'
/// weights (timm's `trunc_normal_(std=0.02)`).
pub const HEAD_INIT_STD: f32 = 0.02;

/// Epsilon of `F.normalize` on the bottleneck features.
pub const L2_EPS: f32 = 1e-12;

pub use crate::backend::{BN_EPS, BN_MOMENTUM};

// ---------------------------------------------------------------------------
// DINO head
// ---------------------------------------------------------------------------

/// Shape of a [`DinoHead`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DinoHeadConfig {
    /// Input dimension (the backbone's embedding width).
    pub in_dim: usize,
    /// Output dimension `K` (number of prototypes).
    pub out_dim: usize,
    /// Hidden width of the MLP (2048 in DINO).
    pub hidden_dim: usize,
    /// Bottleneck width before the L2 normalisation (256 in DINO).
    pub bottleneck_dim: usize,
    /// Number of linear layers of the MLP (3 in DINO; 1 means a single
    /// `in -> bottleneck` layer).
    pub nlayers: usize,
    /// Fix the last layer's weight-norm gain to 1 (DINO's default); false
    /// learns it.
    pub norm_last_layer: bool,
}

impl DinoHeadConfig {
    /// DINO's defaults (hidden 2048, bottleneck 256, 3 layers) for the given
    /// input and output dimensions.
    pub fn new(in_dim: usize, out_dim: usize) -> Self {
        DinoHeadConfig {
            in_dim,
            out_dim,
            hidden_dim: 2048,
            bottleneck_dim: 256,
            nlayers: 3,
            norm_last_layer: true,
        }
    }

    /// `(in, out)` of MLP layer `i`.
    fn mlp_dims(&self, i: usize) -> (usize, usize) {
        let inp = if i == 0 { self.in_dim } else { self.hidden_dim };
        let out = if i + 1 == self.nlayers {
            self.bottleneck_dim
        } else {
            self.hidden_dim
        };
        (inp, out)
    }
}

/// One linear layer of the head's MLP: its widths and parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LinearRanges {
    pub(crate) inp: usize,
    pub(crate) out: usize,
    pub(crate) params: LinearParams,
}

impl LinearRanges {
    /// The layer on `rows` rows.
    fn shape(&self, rows: usize) -> LinearShape {
        LinearShape {
            rows,
            inp: self.inp,
            out: self.out,
        }
    }
}

/// The DINO head's last layer as a bias-free linear layer over the
/// normalised weight `W` (`k x bd`, its own buffer).
fn last_layer(k: usize, bd: usize) -> LinearParams {
    LinearParams {
        weight: 0..k * bd,
        bias: None,
    }
}

/// A batch norm `{prefix}.weight` (ones) and `{prefix}.bias` (zeros) of `c`
/// channels, neither decayed.
fn batch_norm_params(layout: &mut ParamLayout, prefix: &str, c: usize) -> NormParams {
    NormParams {
        gamma: layout.add(format!("{prefix}.weight"), &[c], Init::Ones, false),
        beta: layout.add(format!("{prefix}.bias"), &[c], Init::Zeros, false),
    }
}

/// The DINO projection head (see the module documentation).
///
/// Parameter names (PyTorch's, under `prefix`): `mlp.{0,2,4,..}.weight`
/// (`out x in`, decayed), `mlp.{..}.bias` (not decayed) and
/// `last_layer.weight_v` (`K x bottleneck`, decayed) and, without
/// `norm_last_layer`, `last_layer.weight_g` (`K x 1`, PyTorch's shape for
/// `weight_norm(dim=0)`; decayed, as DINO's rule decays every tensor that
/// is not 1-D or a bias). With `norm_last_layer` the gain is 1 and not
/// stored.
#[derive(Debug, Clone, PartialEq)]
pub struct DinoHead {
    pub(crate) cfg: DinoHeadConfig,
    pub(crate) mlp: Vec<LinearRanges>,
    pub(crate) last_v: Range<usize>,
    /// The learned gain `g` (`K`), right after `V`; None with
    /// `norm_last_layer`.
    pub(crate) last_g: Option<Range<usize>>,
}

/// Activations of one [`DinoHead::forward`], kept for the backward pass, and
/// the backward's scratch, shaped for a fixed row count by
/// [`DinoHead::workspace`].
pub struct DinoHeadActs<B: Backend> {
    rows: usize,
    /// Copy of the input (`rows x in_dim`).
    x: B::Buf,
    /// Pre-activation of each MLP layer (`rows x out_i`); the last one is the
    /// bottleneck before normalisation.
    pre: Vec<B::Buf>,
    /// GELU of each hidden layer's pre-activation.
    post: Vec<B::Buf>,
    /// Per row: `max(||b||, eps)`.
    bnorm: B::Buf,
    /// Normalised bottleneck (`rows x bottleneck`).
    u: B::Buf,
    /// Last-layer weight `W = g V / ||V||_row` (`K x bottleneck`).
    w: B::Buf,
    /// With a learned gain: `V / ||V||_row` and a copy of `g` (the gain's
    /// row factors); empty (one element) otherwise.
    vhat: B::Buf,
    gain: B::Buf,
    /// With a learned gain: the gradient of `V / ||V||_row`.
    dvhat: B::Buf,
    /// `||V_k||` per output.
    vnorm: B::Buf,
    /// Output logits (`rows x K`).
    logits: B::Buf,
    // Backward scratch: gradients of `W`, of `u`, of each layer's output
    // (`da[i]`, `rows x out_i`) and of each hidden activation.
    dw: B::Buf,
    du: B::Buf,
    da: Vec<B::Buf>,
    dpost: Vec<B::Buf>,
}

impl<B: Backend> DinoHeadActs<B> {
    /// Rows this workspace is shaped for.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Logits of the last forward pass (`rows x K`).
    pub fn logits(&self) -> &B::Buf {
        &self.logits
    }
}

impl DinoHead {
    /// Registers the head's parameters in `layout` under `prefix`
    /// (`"head"` gives `head.mlp.0.weight`, ...).
    pub fn new(layout: &mut ParamLayout, prefix: &str, cfg: DinoHeadConfig) -> Self {
        assert!(cfg.nlayers >= 1, "DINO head needs at least one MLP layer");
        assert!(
            cfg.in_dim > 0 && cfg.out_dim > 0 && cfg.bottleneck_dim > 0,
            "DINO head dimensions must be positive"
        );
        assert!(
            cfg.nlayers == 1 || cfg.hidden_dim > 0,
            "hidden_dim must be positive"
        );
        let std = Init::TruncNormal(HEAD_INIT_STD);
        let mlp = (0..cfg.nlayers)
            .map(|i| {
                let (inp, out) = cfg.mlp_dims(i);
                // PyTorch's nn.Sequential index: Linear, GELU, Linear, ...
                let weight = layout.add(
                    format!("{prefix}.mlp.{}.weight", 2 * i),
                    &[out, inp],
                    std,
                    true,
                );
                let bias = layout.add(
                    format!("{prefix}.mlp.{}.bias", 2 * i),
                    &[out],
                    Init::Zeros,
                    false,
                );
                LinearRanges {
                    inp,
                    out,
                    params: LinearParams {
                        weight,
                        bias: Some(bias),
                    },
                }
            })
            .collect();
        let last_v = layout.add(
            format!("{prefix}.last_layer.weight_v"),
            &[cfg.out_dim, cfg.bottleneck_dim],
            std,
            true,
        );
        // PyTorch's weight_norm(dim=0) keeps g as K x 1; DINO fills it with
        // 1 and, with norm_last_layer, stops its gradient.
        let last_g = (!cfg.norm_last_layer).then(|| {
            layout.add(
                format!("{prefix}.last_layer.weight_g"),
                &[cfg.out_dim, 1],
                Init::Ones,
                true,
            )
        });
        DinoHead {
            cfg,
            mlp,
            last_v,
            last_g,
        }
    }

    /// The head's shape.
    pub fn config(&self) -> DinoHeadConfig {
        self.cfg
    }

    /// Range of the last layer's `V` and, when learned, `g` in the flat
    /// buffer (frozen during the first epoch: zero or skip its gradient
    /// there, as DINO's `cancel_gradients_last_layer` does for every
    /// `last_layer` tensor).
    pub fn last_layer_range(&self) -> Range<usize> {
        let end = self.last_g.as_ref().map_or(self.last_v.end, |g| g.end);
        self.last_v.start..end
    }

    /// Range of all of the head's parameters in the flat buffer.
    pub fn param_range(&self) -> Range<usize> {
        self.mlp[0].params.weight.start..self.last_layer_range().end
    }

    /// A workspace for `rows` input rows.
    pub fn workspace<B: Backend>(&self, be: &B, rows: usize) -> OpResult<DinoHeadActs<B>> {
        let cfg = self.cfg;
        assert!(rows > 0, "DinoHead: no rows");
        let (bd, k, n) = (cfg.bottleneck_dim, cfg.out_dim, cfg.nlayers);
        let gain = self.last_g.is_some();
        let per_layer = |f: &dyn Fn(usize) -> usize, count: usize| {
            (0..count)
                .map(|i| be.zeros(rows * f(i)))
                .collect::<OpResult<Vec<_>>>()
        };
        let outs = |i: usize| cfg.mlp_dims(i).1;
        Ok(DinoHeadActs {
            rows,
            x: be.zeros(rows * cfg.in_dim)?,
            pre: per_layer(&outs, n)?,
            post: per_layer(&outs, n - 1)?,
            bnorm: be.zeros(rows)?,
            u: be.zeros(rows * bd)?,
            w: be.zeros(k * bd)?,
            vhat: be.zeros(if gain { k * bd } else { 1 })?,
            gain: be.zeros(if gain { k } else { 1 })?,
            dvhat: be.zeros(if gain { k * bd } else { 1 })?,
            vnorm: be.zeros(k)?,
            logits: be.zeros(rows * k)?,
            dw: be.zeros(k * bd)?,
            du: be.zeros(rows * bd)?,
            da: per_layer(&outs, n)?,
            dpost: per_layer(&outs, n - 1)?,
        })
    }

    /// Shapes `acts` for `rows` rows (no-op if already so).
    pub fn prepare<B: Backend>(
        &self,
        be: &B,
        acts: &mut Option<DinoHeadActs<B>>,
        rows: usize,
    ) -> OpResult {
        if acts.as_ref().is_none_or(|a| a.rows != rows) {
            *acts = Some(self.workspace(be, rows)?);
        }
        Ok(())
    }

    /// Forward pass on `acts.rows()` inputs `x` (`rows x in_dim`); the
    /// logits (`rows x K`) stay in `acts` with what backward needs.
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        x: &B::Buf,
        acts: &mut DinoHeadActs<B>,
    ) -> OpResult {
        let cfg = self.cfg;
        let (rows, n) = (acts.rows, cfg.nlayers);
        let copy = crate::backend::Blocks {
            count: 1,
            len: rows * cfg.in_dim,
            src_start: 0,
            src_stride: 0,
            dst_start: 0,
            dst_stride: 0,
        };
        be.copy_blocks(x, &mut acts.x, copy, false)?;
        for (i, l) in self.mlp.iter().enumerate() {
            let input = if i == 0 { &acts.x } else { &acts.post[i - 1] };
            be.linear_forward(input, l.params.of(params), l.shape(rows), &mut acts.pre[i])?;
            if i + 1 < n {
                be.gelu_forward(&acts.pre[i], rows * l.out, &mut acts.post[i])?;
            }
        }
        // Row-wise L2 normalisation of the bottleneck.
        let (bd, k) = (cfg.bottleneck_dim, cfg.out_dim);
        let (u, bnorm) = (&mut acts.u, &mut acts.bnorm);
        be.l2_normalize_rows(&acts.pre[n - 1], 0, (rows, bd), L2_EPS, u, bnorm)?;
        // Weight normalisation of the last layer. No floor on the norm:
        // PyTorch's weight_norm divides by ||v|| as is.
        let start = self.last_v.start;
        match &self.last_g {
            None => {
                be.l2_normalize_rows(params, start, (k, bd), 0.0, &mut acts.w, &mut acts.vnorm)?
            }
            Some(g) => {
                let (vhat, vnorm) = (&mut acts.vhat, &mut acts.vnorm);
                be.l2_normalize_rows(params, start, (k, bd), 0.0, vhat, vnorm)?;
                let copy = crate::backend::Blocks {
                    count: 1,
                    len: k,
                    src_start: g.start,
                    src_stride: 0,
                    dst_start: 0,
                    dst_stride: 0,
                };
                be.copy_blocks(params, &mut acts.gain, copy, false)?;
                // W_k = g_k Vhat_k: a per-row factor, as drop path's.
                be.keep_scale(&acts.vhat, &acts.gain, (k, bd), &mut acts.w)?;
            }
        }
        let shape = LinearShape {
            rows,
            inp: bd,
            out: k,
        };
        let last = last_layer(k, bd);
        be.linear_forward(&acts.u, last.of(&acts.w), shape, &mut acts.logits)
    }

    /// Backward of the last [`DinoHead::forward`] run with `acts`: given
    /// `dlogits` (`rows x K`), adds the parameter gradients into `grads`
    /// (the full flat gradient buffer) and the input gradient into `dx`
    /// (`rows x in_dim`).
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        acts: &mut DinoHeadActs<B>,
        dlogits: &B::Buf,
        grads: &mut B::Buf,
        dx: &mut B::Buf,
    ) -> OpResult {
        let cfg = self.cfg;
        let (rows, bd, k, n) = (acts.rows, cfg.bottleneck_dim, cfg.out_dim, cfg.nlayers);
        // Last layer: logits = u W^T. du = dlogits W, dW = dlogits^T u.
        be.zero(&mut acts.dw)?;
        let shape = LinearShape {
            rows,
            inp: bd,
            out: k,
        };
        let (du, dw, last) = (&mut acts.du, &mut acts.dw, last_layer(k, bd));
        let last = last.of(&acts.w);
        be.linear_backward(&acts.u, dlogits, last, shape, InputGrad::Write(du), dw)?;
        // Weight norm: dV_k = (dVhat_k - Vhat_k (Vhat_k . dVhat_k)) / ||V_k||,
        // added; with a learned gain dg_k = Vhat_k . dW_k and dVhat = g dW.
        let into_v = (self.last_v.start, true);
        match &self.last_g {
            None => {
                let saved = L2Saved {
                    y: &acts.w,
                    norms: &acts.vnorm,
                };
                be.l2_normalize_rows_backward(&acts.dw, saved, (k, bd), 0.0, grads, into_v)?
            }
            Some(g) => {
                be.row_dots_add(&acts.dw, &acts.vhat, (k, bd), grads, g.start)?;
                be.keep_scale(&acts.dw, &acts.gain, (k, bd), &mut acts.dvhat)?;
                let saved = L2Saved {
                    y: &acts.vhat,
                    norms: &acts.vnorm,
                };
                be.l2_normalize_rows_backward(&acts.dvhat, saved, (k, bd), 0.0, grads, into_v)?
            }
        }
        // L2 normalisation: db = (du - u (u . du)) / ||b|| (or du / eps when
        // the norm was clamped), written into the last layer's output grad.
        let saved = L2Saved {
            y: &acts.u,
            norms: &acts.bnorm,
        };
        be.l2_normalize_rows_backward(
            &acts.du,
            saved,
            (rows, bd),
            L2_EPS,
            &mut acts.da[n - 1],
            (0, false),
        )?;
        // MLP, last layer first.
        for i in (0..n).rev() {
            let l = &self.mlp[i];
            let (layer, shape) = (l.params.of(params), l.shape(rows));
            if i == 0 {
                let dx = InputGrad::Add(&mut *dx);
                be.linear_backward(&acts.x, &acts.da[0], layer, shape, dx, grads)?;
            } else {
                let (da_prev, da_i) = acts.da.split_at_mut(i);
                let dpost = &mut acts.dpost[i - 1];
                let into = InputGrad::Write(&mut *dpost);
                be.linear_backward(&acts.post[i - 1], &da_i[0], layer, shape, into, grads)?;
                // Through the GELU: da_{i-1} = dpost * gelu'(pre_{i-1}).
                be.zero(&mut da_prev[i - 1])?;
                be.gelu_backward(&acts.pre[i - 1], dpost, rows * l.inp, &mut da_prev[i - 1])?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// SERE heads
// ---------------------------------------------------------------------------

/// Running statistics of one batch norm (buffers, not parameters: they are
/// neither optimised nor averaged by the EMA; checkpointed separately).
pub struct BnRunning<B: Backend> {
    /// Running mean (initially 0).
    pub mean: B::Buf,
    /// Running (unbiased) variance (initially 1).
    pub var: B::Buf,
}

impl<B: Backend> BnRunning<B> {
    /// PyTorch's initial statistics for `c` channels.
    pub fn new(be: &B, c: usize) -> OpResult<Self> {
        Ok(BnRunning {
            mean: be.zeros(c)?,
            var: be.upload(&vec![1.0; c])?,
        })
    }

    /// The batch norm's state for one pass in `mode`, the batch's
    /// statistics into `batch`.
    pub fn with<'a>(&'a mut self, mode: BnMode, batch: &'a mut BnStats<B>) -> BnState<'a, B> {
        BnState {
            mode,
            running_mean: &mut self.mean,
            running_var: &mut self.var,
            batch,
        }
    }
}

/// The running statistics of one [`SereHead`] in one network (the student
/// and the teacher each keep their own).
pub struct SereHeadState<B: Backend> {
    /// Of the projection's batch norm.
    pub projection: BnRunning<B>,
    /// Of the predictor's batch norm.
    pub predictor: BnRunning<B>,
}

// By hand: a derive would ask `B` itself (not its buffers) to be Clone etc.
impl<B: Backend> Clone for BnRunning<B>
where
    B::Buf: Clone,
{
    fn clone(&self) -> Self {
        BnRunning {
            mean: self.mean.clone(),
            var: self.var.clone(),
        }
    }
}

impl<B: Backend> PartialEq for BnRunning<B>
where
    B::Buf: PartialEq,
{
    fn eq(&self, o: &Self) -> bool {
        self.mean == o.mean && self.var == o.var
    }
}

impl<B: Backend> std::fmt::Debug for BnRunning<B>
where
    B::Buf: std::fmt::Debug,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BnRunning")
            .field("mean", &self.mean)
            .field("var", &self.var)
            .finish()
    }
}

impl<B: Backend> Clone for SereHeadState<B>
where
    B::Buf: Clone,
{
    fn clone(&self) -> Self {
        SereHeadState {
            projection: self.projection.clone(),
            predictor: self.predictor.clone(),
        }
    }
}

impl<B: Backend> PartialEq for SereHeadState<B>
where
    B::Buf: PartialEq,
{
    fn eq(&self, o: &Self) -> bool {
        self.projection == o.projection && self.predictor == o.predictor
    }
}

impl<B: Backend> std::fmt::Debug for SereHeadState<B>
where
    B::Buf: std::fmt::Debug,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SereHeadState")
            .field("projection", &self.projection)
            .field("predictor", &self.predictor)
            .finish()
    }
}

/// Which network a [`SereActs`] workspace serves, and so which stages its
/// forward runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SereSide {
    /// The projection alone: `z = ReLU(BN1(r))`, the teacher's relation
    /// features. No backward (the teacher gets no gradient).
    Teacher,
    /// The projection and the predictor stacked on it:
    /// `p = ReLU(BN2(W z))`, the student's relation features, with backward
    /// through both stages.
    Student,
}

/// Activations of one SERE head forward, kept for the student's backward,
/// and the backward's scratch, shaped for a fixed row count and side by
/// [`SereHead::workspace`].
pub struct SereActs<B: Backend> {
    rows: usize,
    side: SereSide,
    mode: BnMode,
    /// Projection output `z = ReLU(BN1(r))` (`rows x C`).
    z: B::Buf,
    z_stats: BnStats<B>,
    /// Predictor: BN2's input `W z` and output `p` (`rows x C`; empty on
    /// the teacher side).
    y: B::Buf,
    p: B::Buf,
    p_stats: BnStats<B>,
    scratch: B::Scratch,
    /// Backward scratch (student side): the gradient of a batch norm's
    /// input (first BN2's, then BN1's), and of `z`.
    dy: B::Buf,
    dz: B::Buf,
}

impl<B: Backend> SereActs<B> {
    /// The head's output of the last forward pass (`rows x C`): `z` on the
    /// teacher side, `p` on the student side.
    pub fn output(&self) -> &B::Buf {
        match self.side {
            SereSide::Teacher => &self.z,
            SereSide::Student => &self.p,
        }
    }

    /// The projection's output `z` of the last forward pass (`rows x C`),
    /// on either side.
    pub fn projection(&self) -> &B::Buf {
        &self.z
    }

    /// Rows this workspace is shaped for.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The side this workspace serves.
    pub fn side(&self) -> SereSide {
        self.side
    }

    /// Normalises with the statistics of every process of `group` (SyncBN,
    /// as the authors train): a data-parallel run's batch norms then see
    /// the global batch. `None` returns to this process's rows.
    pub fn sync_batch_norm(&mut self, group: Option<crate::dist::ProcessGroup>) {
        self.z_stats.group = group.clone();
        self.p_stats.group = group;
    }
}

/// One SERE head pair (projection and predictor) for one relation type and
/// one crop kind; see the module documentation.
///
/// Parameter names under `prefix`: `projector.bn.{weight,bias}`,
/// `predictor.linear.weight` (`C x C`, decayed), `predictor.bn.{weight,bias}`.
/// Batch-norm affine parameters start at (1, 0) and are not decayed.
#[derive(Debug, Clone, PartialEq)]
pub struct SereHead {
    pub(crate) c: usize,
    /// The projector's batch norm.
    pub(crate) projection: NormParams,
    /// The predictor's linear map (no bias).
    pub(crate) predictor: LinearParams,
    /// The predictor's batch norm.
    pub(crate) predictor_norm: NormParams,
}

impl SereHead {
    /// Registers the head's parameters for `c` channels in `layout` under
    /// `prefix` (e.g. `"sere.spatial.global"`).
    pub fn new(layout: &mut ParamLayout, prefix: &str, c: usize) -> Self {
        assert!(c > 0, "SereHead needs at least one channel");
        let projection = batch_norm_params(layout, &format!("{prefix}.projector.bn"), c);
        let weight = layout.add(
            format!("{prefix}.predictor.linear.weight"),
            &[c, c],
            Init::TruncNormal(HEAD_INIT_STD),
            true,
        );
        let predictor_norm = batch_norm_params(layout, &format!("{prefix}.predictor.bn"), c);
        SereHead {
            c,
            projection,
            predictor: LinearParams { weight, bias: None },
            predictor_norm,
        }
    }

    /// Channels `C`.
    pub fn channels(&self) -> usize {
        self.c
    }

    /// Range of the predictor's `C x C` weight in the flat buffer.
    pub fn predictor_weight_range(&self) -> Range<usize> {
        self.predictor.weight.clone()
    }

    /// Range of all of the head's parameters in the flat buffer.
    pub fn param_range(&self) -> Range<usize> {
        self.projection.gamma.start..self.predictor_norm.beta.end
    }

    /// Fresh running statistics for one network's copy of this head.
    pub fn new_state<B: Backend>(&self, be: &B) -> OpResult<SereHeadState<B>> {
        Ok(SereHeadState {
            projection: BnRunning::new(be, self.c)?,
            predictor: BnRunning::new(be, self.c)?,
        })
    }

    /// A workspace for `rows` rows (`rows x C`, all tokens of one view
    /// group) on `side`; the teacher side allocates no predictor buffers.
    pub fn workspace<B: Backend>(
        &self,
        be: &B,
        rows: usize,
        side: SereSide,
    ) -> OpResult<SereActs<B>> {
        assert!(rows > 0, "SereHead: no rows");
        let (c, n) = (self.c, rows * self.c);
        let student = if side == SereSide::Student { n } else { 0 };
        let stats = |be: &B| -> OpResult<BnStats<B>> {
            Ok(BnStats {
                mean: be.zeros(c)?,
                var: be.zeros(c)?,
                rstd: be.zeros(c)?,
                group: None,
            })
        };
        Ok(SereActs {
            rows,
            side,
            mode: BnMode::Train,
            z: be.zeros(n)?,
            z_stats: stats(be)?,
            y: be.zeros(student)?,
            p: be.zeros(student)?,
            p_stats: stats(be)?,
            scratch: B::Scratch::default(),
            dy: be.zeros(student)?,
            dz: be.zeros(student)?,
        })
    }

    /// Shapes `acts` for `rows` rows on `side` (no-op if already so).
    pub fn prepare<B: Backend>(
        &self,
        be: &B,
        acts: &mut Option<SereActs<B>>,
        rows: usize,
        side: SereSide,
    ) -> OpResult {
        if acts
            .as_ref()
            .is_none_or(|a| a.rows != rows || a.side != side)
        {
            *acts = Some(self.workspace(be, rows, side)?);
        }
        Ok(())
    }

    /// The head on `x` (`rows x C`, the patch tokens): the projection
    /// `z = ReLU(BN1(x))`, then on the student side the predictor
    /// `p = ReLU(BN2(W z))`. Train mode updates the running statistics of
    /// the stages it runs in `state`. The output stays in `acts`, with what
    /// [`SereHead::backward`] needs.
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        state: &mut SereHeadState<B>,
        mode: BnMode,
        x: &B::Buf,
        acts: &mut SereActs<B>,
    ) -> OpResult {
        let (c, rows) = (self.c, acts.rows);
        acts.mode = mode;
        let shape = Rows::new(rows, c);
        let projection = state.projection.with(mode, &mut acts.z_stats);
        let norm = self.projection.of(params);
        be.batch_norm_relu(x, norm, shape, projection, &mut acts.scratch, &mut acts.z)?;
        if acts.side == SereSide::Teacher {
            return Ok(());
        }
        let predictor = self.predictor.of(params);
        be.linear_forward(&acts.z, predictor, self.predictor_shape(rows), &mut acts.y)?;
        let state = state.predictor.with(mode, &mut acts.p_stats);
        let norm = self.predictor_norm.of(params);
        be.batch_norm_relu(&acts.y, norm, shape, state, &mut acts.scratch, &mut acts.p)
    }

    /// Backward of the last train-mode student-side [`SereHead::forward`]
    /// run with `acts` on input `x` (the same `rows x C` buffer; not copied
    /// by the forward): given `dout` (gradient of `p`), adds the gradients of
    /// BN2, `W` and BN1 into `into.params` (the full flat buffer) and the
    /// input gradient into `into.input`.
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        x: &B::Buf,
        acts: &mut SereActs<B>,
        dout: &B::Buf,
        into: Grads<'_, B::Buf>,
    ) -> OpResult {
        let Grads {
            input: dx,
            params: grads,
        } = into;
        let (c, rows) = (self.c, acts.rows);
        assert!(
            acts.side == SereSide::Student && acts.mode == BnMode::Train,
            "SereHead::backward needs a train-mode student-side forward"
        );
        // Predictor: p = ReLU(BN2(y)), y = W z.
        let shape = Rows::new(rows, c);
        let saved = BnSaved {
            y: &acts.y,
            out: &acts.p,
            stats: &acts.p_stats,
        };
        let into = Grads {
            input: &mut acts.dy,
            params: &mut *grads,
        };
        let norm = self.predictor_norm.of(params);
        be.batch_norm_relu_backward(saved, dout, norm, shape, into, &mut acts.scratch)?;
        let (predictor, lin) = (self.predictor.of(params), self.predictor_shape(rows));
        let dz = InputGrad::Write(&mut acts.dz);
        be.linear_backward(&acts.z, &acts.dy, predictor, lin, dz, grads)?;
        // Projection: z = ReLU(BN1(x)); `dy` now holds BN1's input gradient.
        let saved = BnSaved {
            y: x,
            out: &acts.z,
            stats: &acts.z_stats,
        };
        let into = Grads {
            input: &mut acts.dy,
            params: &mut *grads,
        };
        let norm = self.projection.of(params);
        be.batch_norm_relu_backward(saved, &acts.dz, norm, shape, into, &mut acts.scratch)?;
        be.add_into(&acts.dy, rows * c, dx, 0)
    }

    /// The predictor's `rows x C -> rows x C` linear map.
    fn predictor_shape(&self, rows: usize) -> LinearShape {
        LinearShape {
            rows,
            inp: self.c,
            out: self.c,
        }
    }
}
