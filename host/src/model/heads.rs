//! The heads on top of the backbone, CPU, with analytic backward:
//!
//! - [`DinoHead`]: the image-level head of DINO/iBOT on the CLS token:
//!   an MLP (Linear - GELU - ... - Linear to a bottleneck), row-wise L2
//!   normalisation (`F.normalize`, eps `1e-12`) and a weight-normalised last
//!   linear layer without bias whose gain is fixed to 1 (`norm_last_layer`):
//!   `W_k = V_k / ||V_k||`, only `V` is a parameter.
//! - [`SereHead`]: SERE's heads on the patch tokens, one per relation type
//!   (spatial, channel) and crop kind (global, local): the projection
//!   `z = ReLU(BN(r))` (teacher side) and the predictor `p = ReLU(BN(W r))`
//!   with `W` a `C x C` linear layer without bias (student side).
//!
//! Parameters live in the network's flat buffer ([`ParamLayout`]); each head
//! only keeps the ranges of its tensors. Activations are kept for backward
//! in reusable workspaces ([`DinoHeadActs`], [`SereActs`]) whose buffers
//! only allocate when a shape grows. Forward functions overwrite their
//! outputs; backward functions *add* into the parameter gradient buffer
//! (`grads`, same layout as `params`) and into `dx`.

use std::ops::Range;

use rayon::prelude::*;

use super::params::{Init, ParamLayout};
use crate::backend::cpu;

/// Standard deviation of the truncated-normal initialisation of the heads'
/// weights (timm's `trunc_normal_(std=0.02)`).
pub const HEAD_INIT_STD: f32 = 0.02;

/// Epsilon of `F.normalize` on the bottleneck features.
pub const L2_EPS: f32 = 1e-12;

/// Batch-norm epsilon (PyTorch's default).
pub const BN_EPS: f32 = 1e-5;

/// Batch-norm running-statistics momentum (PyTorch's default).
pub const BN_MOMENTUM: f32 = 0.1;

/// Resizes a scratch vector to exactly `n` elements; allocates only when the
/// capacity is exceeded.
fn fit(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    v.resize(n, 0.0);
    &mut v[..]
}

/// Two disjoint mutable ranges of one buffer (`a` must end before `b` starts
/// or start after it ends).
fn two_mut(buf: &mut [f32], a: Range<usize>, b: Range<usize>) -> (&mut [f32], &mut [f32]) {
    if a.end <= b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&mut lo[a], &mut hi[..b.end - b.start])
    } else {
        assert!(b.end <= a.start, "overlapping parameter ranges");
        let (lo, hi) = buf.split_at_mut(a.start);
        (&mut hi[..a.end - a.start], &mut lo[b])
    }
}

/// `dst` = rows of `src` (width `dim`) divided by their L2 norm, floored at
/// `eps`; the norms go to `norms` (one per row) for the backward pass.
fn normalize_rows(src: &[f32], dim: usize, eps: f32, dst: &mut [f32], norms: &mut [f32]) {
    dst.par_chunks_mut(dim)
        .zip(src.par_chunks(dim))
        .zip(norms.par_iter_mut())
        .for_each(|((dr, sr), nr)| {
            let ss: f32 = sr.iter().map(|v| v * v).sum();
            *nr = ss.sqrt().max(eps);
            let inv = 1.0 / *nr;
            for (o, &v) in dr.iter_mut().zip(sr) {
                *o = v * inv;
            }
        });
}

/// Rows per parallel task: about one task per thread, at least `min` rows.
fn chunk_rows(rows: usize, min: usize) -> usize {
    let t = rayon::current_num_threads().max(1);
    rows.div_ceil(t).max(min).max(1)
}

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

/// One linear layer's parameter ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LinearRanges {
    pub(crate) inp: usize,
    pub(crate) out: usize,
    pub(crate) weight: Range<usize>,
    pub(crate) bias: Range<usize>,
}

/// The DINO projection head (see the module documentation).
///
/// Parameter names (PyTorch's, under `prefix`): `mlp.{0,2,4,..}.weight`
/// (`out x in`, decayed), `mlp.{..}.bias` (not decayed) and
/// `last_layer.weight_v` (`K x bottleneck`, decayed; the gain `weight_g` is
/// fixed to 1 and not stored).
#[derive(Debug, Clone, PartialEq)]
pub struct DinoHead {
    pub(crate) cfg: DinoHeadConfig,
    pub(crate) mlp: Vec<LinearRanges>,
    pub(crate) last_v: Range<usize>,
}

/// Activations of one [`DinoHead::forward`], kept for the backward pass, and
/// the backward's scratch. Reusable: buffers grow only with the shapes.
#[derive(Debug, Clone, Default)]
pub struct DinoHeadActs {
    rows: usize,
    /// Copy of the input (`rows x in_dim`).
    x: Vec<f32>,
    /// Pre-activation of each MLP layer (`rows x out_i`); the last one is the
    /// bottleneck before normalisation.
    pre: Vec<Vec<f32>>,
    /// GELU of each hidden layer's pre-activation.
    post: Vec<Vec<f32>>,
    /// Per row: `max(||b||, eps)`.
    bnorm: Vec<f32>,
    /// Normalised bottleneck (`rows x bottleneck`).
    u: Vec<f32>,
    /// Normalised last-layer weight `W = V / ||V||_row` (`K x bottleneck`).
    w: Vec<f32>,
    /// `||V_k||` per output.
    vnorm: Vec<f32>,
    /// Output logits (`rows x K`).
    logits: Vec<f32>,
    // Backward scratch.
    dw: Vec<f32>,
    da: Vec<f32>,
    dh: Vec<f32>,
}

impl DinoHeadActs {
    /// An empty workspace.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rows of the last forward pass.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Logits of the last forward pass (`rows x K`).
    pub fn logits(&self) -> &[f32] {
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
                    weight,
                    bias,
                }
            })
            .collect();
        let last_v = layout.add(
            format!("{prefix}.last_layer.weight_v"),
            &[cfg.out_dim, cfg.bottleneck_dim],
            std,
            true,
        );
        DinoHead { cfg, mlp, last_v }
    }

    /// The head's shape.
    pub fn config(&self) -> DinoHeadConfig {
        self.cfg
    }

    /// Range of the last layer's `V` in the flat buffer (frozen during the
    /// first epoch: zero or skip its gradient there).
    pub fn last_layer_range(&self) -> Range<usize> {
        self.last_v.clone()
    }

    /// Range of all of the head's parameters in the flat buffer.
    pub fn param_range(&self) -> Range<usize> {
        self.mlp[0].weight.start..self.last_v.end
    }

    /// Forward pass on `rows` inputs `x` (`rows x in_dim`); returns the
    /// logits (`rows x K`), which stay in `acts` with what backward needs.
    pub fn forward<'a>(
        &self,
        params: &[f32],
        x: &[f32],
        rows: usize,
        acts: &'a mut DinoHeadActs,
    ) -> &'a [f32] {
        let cfg = self.cfg;
        assert!(rows > 0, "DinoHead::forward: no rows");
        assert_eq!(
            x.len(),
            rows * cfg.in_dim,
            "DinoHead::forward: x has the wrong length"
        );
        acts.rows = rows;
        fit(&mut acts.x, x.len()).copy_from_slice(x);
        let n = cfg.nlayers;
        acts.pre.resize_with(n, Vec::new);
        acts.post.resize_with(n - 1, Vec::new);
        for (i, l) in self.mlp.iter().enumerate() {
            let input: &[f32] = if i == 0 { &acts.x } else { &acts.post[i - 1] };
            let mut pre = std::mem::take(&mut acts.pre[i]);
            cpu::linear_fwd(
                input,
                &params[l.weight.clone()],
                Some(&params[l.bias.clone()]),
                rows,
                l.inp,
                l.out,
                fit(&mut pre, rows * l.out),
            );
            if i + 1 < n {
                cpu::gelu_fwd(&pre, fit(&mut acts.post[i], rows * l.out));
            }
            acts.pre[i] = pre;
        }
        // Row-wise L2 normalisation of the bottleneck.
        let bd = cfg.bottleneck_dim;
        let b = &acts.pre[n - 1];
        let u = fit(&mut acts.u, rows * bd);
        let bnorm = fit(&mut acts.bnorm, rows);
        normalize_rows(b, bd, L2_EPS, u, bnorm);
        // Weight normalisation of the last layer (gain 1).
        let k = cfg.out_dim;
        let v = &params[self.last_v.clone()];
        let w = fit(&mut acts.w, k * bd);
        let vnorm = fit(&mut acts.vnorm, k);
        // No floor on the norm: PyTorch's weight_norm divides by ||v|| as is.
        normalize_rows(v, bd, 0.0, w, vnorm);
        cpu::linear_fwd(
            &acts.u,
            &acts.w,
            None,
            rows,
            bd,
            k,
            fit(&mut acts.logits, rows * k),
        );
        &acts.logits
    }

    /// Backward of the last [`DinoHead::forward`] run with `acts`: given
    /// `dlogits` (`rows x K`), adds the parameter gradients into `grads`
    /// (the full flat gradient buffer) and the input gradient into `dx`
    /// (`rows x in_dim`).
    pub fn backward(
        &self,
        params: &[f32],
        acts: &mut DinoHeadActs,
        dlogits: &[f32],
        grads: &mut [f32],
        dx: &mut [f32],
    ) {
        let cfg = self.cfg;
        let rows = acts.rows;
        let (bd, k, n) = (cfg.bottleneck_dim, cfg.out_dim, cfg.nlayers);
        assert!(rows > 0, "DinoHead::backward before forward");
        assert_eq!(
            dlogits.len(),
            rows * k,
            "DinoHead::backward: dlogits has the wrong length"
        );
        assert_eq!(
            dx.len(),
            rows * cfg.in_dim,
            "DinoHead::backward: dx has the wrong length"
        );
        assert_eq!(
            grads.len(),
            params.len(),
            "grads and params differ in length"
        );

        // Last layer: logits = u W^T. du = dlogits W, dW = dlogits^T u.
        let mut du = std::mem::take(&mut acts.dh);
        fit(&mut du, rows * bd).fill(0.0);
        let dw = fit(&mut acts.dw, k * bd);
        dw.fill(0.0);
        cpu::linear_bwd(
            &acts.u,
            &acts.w,
            dlogits,
            rows,
            bd,
            k,
            Some(&mut du),
            dw,
            None,
        );
        // Weight norm: dV_k = (dW_k - W_k (W_k . dW_k)) / ||V_k||.
        grads[self.last_v.clone()]
            .par_chunks_mut(bd)
            .zip(acts.dw.par_chunks(bd))
            .zip(acts.w.par_chunks(bd).zip(acts.vnorm.par_iter()))
            .for_each(|((gv, dwr), (wr, &nr))| {
                let dot: f32 = dwr.iter().zip(wr).map(|(a, b)| a * b).sum();
                let inv = 1.0 / nr;
                for ((g, &d), &wv) in gv.iter_mut().zip(dwr).zip(wr) {
                    *g += (d - wv * dot) * inv;
                }
            });
        // L2 normalisation: db = (du - u (u . du)) / ||b|| (or du / eps when
        // the norm was clamped).
        let mut da = std::mem::take(&mut acts.da);
        let db = fit(&mut da, rows * bd);
        db.par_chunks_mut(bd)
            .zip(du.par_chunks(bd))
            .zip(acts.u.par_chunks(bd))
            .zip(acts.bnorm.par_iter())
            .for_each(|(((dbr, dur), ur), &nr)| {
                let inv = 1.0 / nr;
                // Clamped norm (||b|| <= eps): the divisor is a constant.
                let dot: f32 = if nr > L2_EPS {
                    dur.iter().zip(ur).map(|(a, b)| a * b).sum()
                } else {
                    0.0
                };
                for ((o, &d), &uv) in dbr.iter_mut().zip(dur).zip(ur) {
                    *o = (d - uv * dot) * inv;
                }
            });
        // MLP, last layer first. `da` holds the gradient of layer i's output.
        let mut dh = du;
        for i in (0..n).rev() {
            let l = &self.mlp[i];
            let (gw, gb) = two_mut(grads, l.weight.clone(), l.bias.clone());
            let w = &params[l.weight.clone()];
            if i == 0 {
                cpu::linear_bwd(
                    &acts.x,
                    w,
                    &da,
                    rows,
                    l.inp,
                    l.out,
                    Some(&mut *dx),
                    gw,
                    Some(gb),
                );
            } else {
                let dprev = fit(&mut dh, rows * l.inp);
                dprev.fill(0.0);
                cpu::linear_bwd(
                    &acts.post[i - 1],
                    w,
                    &da,
                    rows,
                    l.inp,
                    l.out,
                    Some(dprev),
                    gw,
                    Some(gb),
                );
                // Through the GELU: da_{i-1} = dh * gelu'(pre_{i-1}).
                let dnext = fit(&mut da, rows * l.inp);
                dnext.fill(0.0);
                cpu::gelu_bwd(&acts.pre[i - 1], &dh, dnext);
            }
        }
        acts.da = da;
        acts.dh = dh;
    }
}

// ---------------------------------------------------------------------------
// SERE heads
// ---------------------------------------------------------------------------

/// Whether a batch norm uses the batch's statistics (and updates its running
/// statistics) or the running statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BnMode {
    /// Batch statistics over all rows passed in; running statistics updated
    /// with momentum [`BN_MOMENTUM`] (unbiased variance), as PyTorch does.
    #[default]
    Train,
    /// Running statistics; no update.
    Eval,
}

/// Running statistics of one batch norm (buffers, not parameters: they are
/// neither optimised nor averaged by the EMA; checkpoint them separately).
#[derive(Debug, Clone, PartialEq)]
pub struct BnRunning {
    /// Running mean (initially 0).
    pub mean: Vec<f32>,
    /// Running (unbiased) variance (initially 1).
    pub var: Vec<f32>,
}

impl BnRunning {
    /// PyTorch's initial statistics for `c` channels.
    pub fn new(c: usize) -> Self {
        BnRunning {
            mean: vec![0.0; c],
            var: vec![1.0; c],
        }
    }
}

/// The running statistics of one [`SereHead`] in one network (the student
/// and the teacher each keep their own).
#[derive(Debug, Clone, PartialEq)]
pub struct SereHeadState {
    /// Of the projection's batch norm.
    pub projection: BnRunning,
    /// Of the predictor's batch norm.
    pub predictor: BnRunning,
}

/// Activations of one SERE head forward, kept for the predictor's backward,
/// and the backward's scratch. Reusable: buffers grow only with the shapes.
#[derive(Debug, Clone, Default)]
pub struct SereActs {
    rows: usize,
    mode: BnMode,
    predictor: bool,
    /// Batch-norm input: `W x` for the predictor, unused for the projection.
    y: Vec<f32>,
    /// Output `ReLU(BN(.))` (`rows x C`).
    out: Vec<f32>,
    mean: Vec<f32>,
    var: Vec<f32>,
    rstd: Vec<f32>,
    /// Per-task partial sums (f64) for the column statistics.
    partial: Vec<f64>,
    /// Gradient w.r.t. the batch-norm input.
    dy: Vec<f32>,
}

impl SereActs {
    /// An empty workspace.
    pub fn new() -> Self {
        Self::default()
    }

    /// Output of the last forward pass (`rows x C`).
    pub fn output(&self) -> &[f32] {
        &self.out
    }

    /// Rows of the last forward pass.
    pub fn rows(&self) -> usize {
        self.rows
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
    pub(crate) proj_gamma: Range<usize>,
    pub(crate) proj_beta: Range<usize>,
    pub(crate) pred_weight: Range<usize>,
    pub(crate) pred_gamma: Range<usize>,
    pub(crate) pred_beta: Range<usize>,
}

/// Column statistics of `x` (`rows x c`) in parallel: `mean`, biased `var`,
/// accumulated in f64 per task (two passes).
fn column_stats(
    x: &[f32],
    rows: usize,
    c: usize,
    partial: &mut Vec<f64>,
    mean: &mut [f32],
    var: &mut [f32],
) {
    let rc = chunk_rows(rows, 64);
    let tasks = rows.div_ceil(rc);
    partial.clear();
    partial.resize(tasks * c, 0.0);
    partial
        .par_chunks_mut(c)
        .zip(x.par_chunks(rc * c))
        .for_each(|(p, xc)| {
            for row in xc.chunks_exact(c) {
                for (s, &v) in p.iter_mut().zip(row) {
                    *s += v as f64;
                }
            }
        });
    for j in 0..c {
        let s: f64 = partial.chunks_exact(c).map(|p| p[j]).sum();
        mean[j] = (s / rows as f64) as f32;
    }
    partial.fill(0.0);
    partial
        .par_chunks_mut(c)
        .zip(x.par_chunks(rc * c))
        .for_each(|(p, xc)| {
            for row in xc.chunks_exact(c) {
                for ((s, &v), &m) in p.iter_mut().zip(row).zip(mean.iter()) {
                    let d = (v - m) as f64;
                    *s += d * d;
                }
            }
        });
    for j in 0..c {
        let s: f64 = partial.chunks_exact(c).map(|p| p[j]).sum();
        var[j] = (s / rows as f64) as f32;
    }
}

impl SereHead {
    /// Registers the head's parameters for `c` channels in `layout` under
    /// `prefix` (e.g. `"sere.spatial.global"`).
    pub fn new(layout: &mut ParamLayout, prefix: &str, c: usize) -> Self {
        assert!(c > 0, "SereHead needs at least one channel");
        let proj_gamma = layout.add(
            format!("{prefix}.projector.bn.weight"),
            &[c],
            Init::Ones,
            false,
        );
        let proj_beta = layout.add(
            format!("{prefix}.projector.bn.bias"),
            &[c],
            Init::Zeros,
            false,
        );
        let pred_weight = layout.add(
            format!("{prefix}.predictor.linear.weight"),
            &[c, c],
            Init::TruncNormal(HEAD_INIT_STD),
            true,
        );
        let pred_gamma = layout.add(
            format!("{prefix}.predictor.bn.weight"),
            &[c],
            Init::Ones,
            false,
        );
        let pred_beta = layout.add(
            format!("{prefix}.predictor.bn.bias"),
            &[c],
            Init::Zeros,
            false,
        );
        SereHead {
            c,
            proj_gamma,
            proj_beta,
            pred_weight,
            pred_gamma,
            pred_beta,
        }
    }

    /// Channels `C`.
    pub fn channels(&self) -> usize {
        self.c
    }

    /// Fresh running statistics for one network's copy of this head.
    pub fn new_state(&self) -> SereHeadState {
        SereHeadState {
            projection: BnRunning::new(self.c),
            predictor: BnRunning::new(self.c),
        }
    }

    /// Range of the predictor's `C x C` weight in the flat buffer.
    pub fn predictor_weight_range(&self) -> Range<usize> {
        self.pred_weight.clone()
    }

    /// Range of all of the head's parameters in the flat buffer.
    pub fn param_range(&self) -> Range<usize> {
        self.proj_gamma.start..self.pred_beta.end
    }

    /// `out = ReLU(BN(y))` with the statistics of `mode`; in train mode the
    /// batch statistics are kept in `acts` and folded into `running`.
    #[allow(clippy::too_many_arguments)]
    fn bn_relu(
        &self,
        y: &[f32],
        gamma: &[f32],
        beta: &[f32],
        running: &mut BnRunning,
        mode: BnMode,
        rows: usize,
        acts_stats: (&mut Vec<f64>, &mut Vec<f32>, &mut Vec<f32>, &mut Vec<f32>),
        out: &mut [f32],
    ) {
        let c = self.c;
        let (partial, mean, var, rstd) = acts_stats;
        let (mean, var, rstd) = (fit(mean, c), fit(var, c), fit(rstd, c));
        match mode {
            BnMode::Train => {
                column_stats(y, rows, c, partial, mean, var);
                sere_core::norm::batch_norm_update_running(
                    mean,
                    var,
                    rows,
                    BN_MOMENTUM,
                    &mut running.mean,
                    &mut running.var,
                )
                .expect("batch-norm running statistics shapes");
            }
            BnMode::Eval => {
                mean.copy_from_slice(&running.mean);
                var.copy_from_slice(&running.var);
            }
        }
        for (r, &v) in rstd.iter_mut().zip(var.iter()) {
            *r = 1.0 / (v + BN_EPS).sqrt();
        }
        let (mean, rstd) = (&*mean, &*rstd);
        let rc = chunk_rows(rows, 64);
        out.par_chunks_mut(rc * c)
            .zip(y.par_chunks(rc * c))
            .for_each(|(oc, yc)| {
                for (or, yr) in oc.chunks_exact_mut(c).zip(yc.chunks_exact(c)) {
                    for j in 0..c {
                        let v = (yr[j] - mean[j]) * rstd[j] * gamma[j] + beta[j];
                        or[j] = v.max(0.0);
                    }
                }
            });
    }

    fn check_input(&self, params: &[f32], state: &SereHeadState, x: &[f32], rows: usize) {
        assert!(rows > 0, "SereHead: no rows");
        assert_eq!(x.len(), rows * self.c, "SereHead: x has the wrong length");
        assert!(
            params.len() >= self.pred_beta.end,
            "SereHead: parameter buffer too short"
        );
        assert_eq!(
            state.projection.mean.len(),
            self.c,
            "SereHead: state has the wrong width"
        );
    }

    /// Teacher side: `z = ReLU(BN(x))` for `x` (`rows x C`, all tokens of
    /// one view group). Returns `z`, kept in `acts`. No backward.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_projection<'a>(
        &self,
        params: &[f32],
        state: &mut SereHeadState,
        mode: BnMode,
        x: &[f32],
        rows: usize,
        acts: &'a mut SereActs,
    ) -> &'a [f32] {
        self.check_input(params, state, x, rows);
        acts.rows = rows;
        acts.mode = mode;
        acts.predictor = false;
        let mut out = std::mem::take(&mut acts.out);
        self.bn_relu(
            x,
            &params[self.proj_gamma.clone()],
            &params[self.proj_beta.clone()],
            &mut state.projection,
            mode,
            rows,
            (
                &mut acts.partial,
                &mut acts.mean,
                &mut acts.var,
                &mut acts.rstd,
            ),
            fit(&mut out, rows * self.c),
        );
        acts.out = out;
        &acts.out
    }

    /// Student side: `p = ReLU(BN(x W^T))` for `x` (`rows x C`). Returns
    /// `p`, kept in `acts` with what [`SereHead::backward_predictor`] needs.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_predictor<'a>(
        &self,
        params: &[f32],
        state: &mut SereHeadState,
        mode: BnMode,
        x: &[f32],
        rows: usize,
        acts: &'a mut SereActs,
    ) -> &'a [f32] {
        self.check_input(params, state, x, rows);
        let c = self.c;
        acts.rows = rows;
        acts.mode = mode;
        acts.predictor = true;
        let mut y = std::mem::take(&mut acts.y);
        cpu::linear_fwd(
            x,
            &params[self.pred_weight.clone()],
            None,
            rows,
            c,
            c,
            fit(&mut y, rows * c),
        );
        let mut out = std::mem::take(&mut acts.out);
        self.bn_relu(
            &y,
            &params[self.pred_gamma.clone()],
            &params[self.pred_beta.clone()],
            &mut state.predictor,
            mode,
            rows,
            (
                &mut acts.partial,
                &mut acts.mean,
                &mut acts.var,
                &mut acts.rstd,
            ),
            fit(&mut out, rows * c),
        );
        acts.y = y;
        acts.out = out;
        &acts.out
    }

    /// Backward of the last train-mode [`SereHead::forward_predictor`] run
    /// with `acts` on input `x` (the same `rows x C` slice; not copied by the
    /// forward): given `dout`, adds the parameter gradients into `grads`
    /// (the full flat buffer) and the input gradient into `dx`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_predictor(
        &self,
        params: &[f32],
        x: &[f32],
        acts: &mut SereActs,
        dout: &[f32],
        grads: &mut [f32],
        dx: &mut [f32],
    ) {
        let (c, rows) = (self.c, acts.rows);
        assert!(
            acts.predictor,
            "backward_predictor after a projection forward"
        );
        assert_eq!(
            acts.mode,
            BnMode::Train,
            "backward_predictor needs a train-mode forward"
        );
        assert_eq!(
            x.len(),
            rows * c,
            "backward_predictor: x has the wrong length"
        );
        assert_eq!(
            dout.len(),
            rows * c,
            "backward_predictor: dout has the wrong length"
        );
        assert_eq!(
            dx.len(),
            rows * c,
            "backward_predictor: dx has the wrong length"
        );
        assert_eq!(
            grads.len(),
            params.len(),
            "grads and params differ in length"
        );
        let gamma = &params[self.pred_gamma.clone()];
        let (mean, rstd) = (&acts.mean[..], &acts.rstd[..]);
        // Column sums of g = dout * [out > 0] and of g * xhat, per task.
        let rc = chunk_rows(rows, 64);
        let tasks = rows.div_ceil(rc);
        acts.partial.clear();
        acts.partial.resize(tasks * 2 * c, 0.0);
        acts.partial
            .par_chunks_mut(2 * c)
            .zip(acts.y.par_chunks(rc * c))
            .zip(acts.out.par_chunks(rc * c).zip(dout.par_chunks(rc * c)))
            .for_each(|((p, yc), (oc, dc))| {
                let (sg, sgx) = p.split_at_mut(c);
                for ((yr, or), dr) in yc
                    .chunks_exact(c)
                    .zip(oc.chunks_exact(c))
                    .zip(dc.chunks_exact(c))
                {
                    for j in 0..c {
                        if or[j] > 0.0 {
                            let xhat = (yr[j] - mean[j]) * rstd[j];
                            sg[j] += dr[j] as f64;
                            sgx[j] += (dr[j] * xhat) as f64;
                        }
                    }
                }
            });
        // Reduce into the first task's slot: [sum g | sum g xhat].
        let (first, rest) = acts.partial.split_at_mut(2 * c);
        for p in rest.chunks_exact(2 * c) {
            for (a, &b) in first.iter_mut().zip(p) {
                *a += b;
            }
        }
        let sums: &[f64] = first;
        {
            let (gg, gb) = two_mut(grads, self.pred_gamma.clone(), self.pred_beta.clone());
            for j in 0..c {
                gg[j] += sums[c + j] as f32;
                gb[j] += sums[j] as f32;
            }
        }
        // dy = gamma rstd (g - (sum g + xhat sum g xhat) / M).
        let inv_m = 1.0 / rows as f64;
        let mut dy = std::mem::take(&mut acts.dy);
        let dyv = fit(&mut dy, rows * c);
        dyv.par_chunks_mut(rc * c)
            .zip(acts.y.par_chunks(rc * c))
            .zip(acts.out.par_chunks(rc * c).zip(dout.par_chunks(rc * c)))
            .for_each(|((dyc, yc), (oc, dc))| {
                for (((dyr, yr), or), dr) in dyc
                    .chunks_exact_mut(c)
                    .zip(yc.chunks_exact(c))
                    .zip(oc.chunks_exact(c))
                    .zip(dc.chunks_exact(c))
                {
                    for j in 0..c {
                        let xhat = (yr[j] - mean[j]) * rstd[j];
                        let g = if or[j] > 0.0 { dr[j] } else { 0.0 };
                        let corr = ((sums[j] + xhat as f64 * sums[c + j]) * inv_m) as f32;
                        dyr[j] = gamma[j] * rstd[j] * (g - corr);
                    }
                }
            });
        cpu::linear_bwd(
            x,
            &params[self.pred_weight.clone()],
            &dy,
            rows,
            c,
            c,
            Some(dx),
            &mut grads[self.pred_weight.clone()],
            None,
        );
        acts.dy = dy;
    }
}
