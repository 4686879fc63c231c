//! Vision Transformer (timm/DINO layout) with a hand-written backward pass.
//!
//! Shapes (B images, T = 1 + N tokens, D channels, H heads of d = D / H):
//! images `B x 3 x S x S` -> patches `B*N x 3p^2` -> embed `B*N x D` ->
//! tokens `B*T x D` (CLS first, position embedding added, bicubically
//! interpolated when S differs from the configured size) -> `depth` pre-norm
//! blocks -> final layer norm. Each block is
//! `x += dp1 * proj(attn(ln1(x)))`, `x += dp2 * fc2(gelu(fc1(ln2(x))))`
//! where `dp` is the per-sample drop-path mask (scaled by `1 / keep`).
//! Forward and backward of each piece sit side by side; activations live in
//! a [`VitActs`] workspace that is allocated once per batch shape. Written
//! once over a [`Backend`]: the device owns the buffers and the operations,
//! this module only their sequence.

use super::params::{Init, ParamLayout};
use crate::backend::{
    mat, mat_mut, standard, AttentionShape, Backend, Blocks, Grads, InputGrad, LayerNormSaved,
    LinearParams, LinearShape, NormParams, OpResult, Rows,
};
use ndarray::ArrayView4;
use rand::RngExt;
use sere_core::linalg::MatRef;
use std::ops::Range;

/// Name of the mask token in the layout (under the ViT's prefix; iBOT's).
pub const MASK_TOKEN: &str = "masked_embed";

/// Size of a ViT.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VitConfig {
    /// Training image size the position embedding is learned for.
    pub img: usize,
    /// Patch side in pixels.
    pub patch: usize,
    /// Embedding dimension `D`.
    pub dim: usize,
    /// Number of blocks.
    pub depth: usize,
    /// Attention heads (must divide `dim`).
    pub heads: usize,
    /// MLP hidden size as a multiple of `dim`.
    pub mlp_ratio: f32,
    /// Stochastic-depth rate of the last block (linearly 0 -> rate).
    pub drop_path: f32,
    /// Input channels.
    pub in_chans: usize,
    /// A learned mask token (iBOT's `masked_embed`, `1 x D`, zeros at
    /// initialisation) that replaces masked patch embeddings before the
    /// position embedding is added ([`VitActs::set_masks`]).
    pub mask_token: bool,
}

impl VitConfig {
    /// MLP hidden width.
    pub fn hidden(&self) -> usize {
        (self.dim as f32 * self.mlp_ratio).round() as usize
    }
    /// Patches per side at the configured image size.
    pub fn grid(&self) -> usize {
        self.img / self.patch
    }
}

#[derive(Debug, Clone)]
pub(crate) struct BlockParams {
    pub(crate) norm1: NormParams,
    pub(crate) qkv: LinearParams,
    pub(crate) proj: LinearParams,
    pub(crate) norm2: NormParams,
    pub(crate) fc1: LinearParams,
    pub(crate) fc2: LinearParams,
}

/// The ViT: parameter ranges inside a flat buffer plus its configuration.
#[derive(Debug, Clone)]
pub struct Vit {
    pub(crate) cfg: VitConfig,
    pub(crate) cls: Range<usize>,
    pub(crate) pos: Range<usize>,
    /// The patch embedding: a `patch x patch` convolution of stride
    /// `patch`, run as one GEMM over im2col rows.
    pub(crate) pe: LinearParams,
    pub(crate) blocks: Vec<BlockParams>,
    pub(crate) norm: NormParams,
    pub(crate) mask_token: Option<Range<usize>>,
    pub(crate) drop_rates: Vec<f32>,
}

/// A linear layer `{prefix}.weight` (`weight_shape`, truncated normal with
/// std 0.02, decayed) and `{prefix}.bias` (`weight_shape[0]`, zeros, not
/// decayed), timm's initialisation.
fn linear_params(layout: &mut ParamLayout, prefix: &str, weight_shape: &[usize]) -> LinearParams {
    let weight = layout.add(
        format!("{prefix}.weight"),
        weight_shape,
        Init::TruncNormal(0.02),
        true,
    );
    let bias = layout.add(
        format!("{prefix}.bias"),
        &weight_shape[..1],
        Init::Zeros,
        false,
    );
    LinearParams {
        weight,
        bias: Some(bias),
    }
}

/// A layer norm `{prefix}.weight` (ones) and `{prefix}.bias` (zeros) of
/// `dim` channels, neither decayed.
fn norm_params(layout: &mut ParamLayout, prefix: &str, dim: usize) -> NormParams {
    NormParams {
        gamma: layout.add(format!("{prefix}.weight"), &[dim], Init::Ones, false),
        beta: layout.add(format!("{prefix}.bias"), &[dim], Init::Zeros, false),
    }
}

/// Buffers of a masked forward ([`VitActs::set_masks`]).
struct MaskActs<B: Backend> {
    /// Per patch row (`B*N`): 1 where masked, else 0; and `1 - mask`.
    mask: B::Buf,
    keep: B::Buf,
    /// The patch embeddings before masking (`B*N x D`); backward scratch.
    embed: B::Buf,
}

/// Activations of one block, kept for backward.
struct BlockActs<B: Backend> {
    ln1: B::Buf,
    mean1: B::Buf,
    rstd1: B::Buf,
    qkv: B::Buf,
    probs: B::Buf,
    attn: B::Buf,
    x_mid: B::Buf,
    ln2: B::Buf,
    mean2: B::Buf,
    rstd2: B::Buf,
    h1: B::Buf,
    g: B::Buf,
    /// Drop-path keep factors of the attention and MLP branches, per image.
    keep1: B::Buf,
    keep2: B::Buf,
}

/// Forward activations and backward scratch of one ViT pass for a fixed
/// `(batch, image size)` on backend `B`; reused across steps so a step
/// allocates nothing.
pub struct VitActs<B: Backend> {
    batch: usize,
    img: usize,
    /// Patches per image.
    pub n: usize,
    /// Tokens per image (`1 + n`).
    pub t: usize,
    /// Channels `D`.
    dim: usize,
    images: B::Buf,
    patches: B::Buf,
    /// `n x n0` bicubic interpolation of the position grid (None: identity).
    interp: Option<B::Buf>,
    pos_patch: B::Buf,
    /// Residual stream entering each block, and leaving the last one.
    xs: Vec<B::Buf>,
    blocks: Vec<BlockActs<B>>,
    out: B::Buf,
    out_mean: B::Buf,
    out_rstd: B::Buf,
    dx: B::Buf,
    /// Two `B*T x D` buffers that each phase names by the role it gives
    /// them: the patch embeddings (forward, in `rows_a`); a branch's
    /// gradient and a layer norm's input gradient (block backward); the
    /// patch embeddings' gradient (embedding backward).
    rows_a: B::Buf,
    rows_b: B::Buf,
    dqkv: B::Buf,
    dhid: B::Buf,
    dscores: B::Buf,
    dpos_patch: B::Buf,
    scratch: B::Scratch,
    /// Whether the backward's scratch is allocated.
    backward: bool,
    /// Host staging of the drop-path factors of one block branch (and of
    /// the masks).
    keeps: Vec<f32>,
    /// Masks of the passes until changed (None: unmasked), and their
    /// buffers once allocated.
    masking: Option<MaskActs<B>>,
    masked: bool,
    /// Where the pass's images sit in the step's global batch (drop path).
    shard: Option<BatchShard>,
}

/// Which images of a data-parallel step's global batch a pass holds, so
/// that drop path gives an image the same factors whichever process trains
/// it: the pass is `views` view-major blocks of images `first .. first +
/// B/views` out of `global` per view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchShard {
    /// View-major blocks in the pass (2 global crops, or the locals).
    pub views: usize,
    /// Images per view in the global batch.
    pub global: usize,
    /// Position of this pass's first image of each view in the global batch.
    pub first: usize,
}

impl<B: Backend> VitActs<B> {
    /// Output of the final norm, `B*T x D` (row `b*T` is image `b`'s CLS).
    pub fn out(&self) -> &B::Buf {
        &self.out
    }
    /// The last block's output before the final norm, `B*T x D` (the
    /// tokens the SERE heads read; the final norm serves the CLS path).
    pub fn pre_norm(&self) -> &B::Buf {
        self.xs
            .last()
            .expect("the residual stream has depth + 1 entries")
    }
    /// Images in the batch this workspace is shaped for.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Attention probabilities of block `block` (0-based; panics if out of
    /// range) from the last forward pass, `B x heads x T x T`: row `i` of
    /// head `h` of image `b` is how token `i` attends to every token (token
    /// 0 is the CLS token).
    pub fn attention(&self, block: usize) -> &B::Buf {
        &self.blocks[block].probs
    }
    /// Drop-path keep factors (attention branch, MLP branch) of block
    /// `block` from the last forward pass, one per image.
    pub fn drop_path_keeps(&self, block: usize) -> (&B::Buf, &B::Buf) {
        (&self.blocks[block].keep1, &self.blocks[block].keep2)
    }

    /// Draws drop path for the following forward passes as the pass of the
    /// whole global batch would, keeping this shard's factors (a
    /// data-parallel step); `None`: the pass is the whole batch.
    pub fn set_shard(&mut self, shard: Option<BatchShard>) {
        if let Some(s) = shard {
            assert!(
                s.views > 0
                    && self.batch % s.views == 0
                    && s.first + self.batch / s.views <= s.global,
                "the shard lies inside the global batch"
            );
        }
        self.shard = shard;
    }

    /// Masks the patches of the following forward passes (and their
    /// backward) until changed: `masks` is `B x N` (`true` = replaced by
    /// the mask token), `None` unmasks. Needs a ViT with
    /// [`VitConfig::mask_token`]; the buffers are allocated on first use.
    pub fn set_masks(&mut self, be: &B, masks: Option<&[bool]>) -> OpResult {
        let Some(masks) = masks else {
            self.masked = false;
            return Ok(());
        };
        let rows = self.batch * self.n;
        assert_eq!(masks.len(), rows, "one mask entry per patch of the batch");
        if self.masking.is_none() {
            self.masking = Some(MaskActs {
                mask: be.zeros(rows)?,
                keep: be.zeros(rows)?,
                embed: be.zeros(rows * self.dim)?,
            });
        }
        let m = self.masking.as_mut().expect("allocated above");
        self.keeps.clear();
        self.keeps
            .extend(masks.iter().map(|&v| f32::from(u8::from(v))));
        be.upload_into(&self.keeps, &mut m.mask)?;
        self.keeps.iter_mut().for_each(|v| *v = 1.0 - *v);
        be.upload_into(&self.keeps, &mut m.keep)?;
        self.masked = true;
        Ok(())
    }
}

/// Draws one branch's drop-path factors for `batch` images into `out`:
/// 0 with probability `rate`, else `1 / (1 - rate)`; all 1 without `rng` or
/// at rate 0 (evaluation). With a `shard`, the draws of the whole global
/// batch are made in its order and the shard's kept.
fn draw_keeps(
    rng: &mut Option<&mut dyn rand::Rng>,
    rate: f32,
    batch: usize,
    shard: Option<BatchShard>,
    out: &mut Vec<f32>,
) {
    out.clear();
    let Some(r) = rng.as_mut().filter(|_| rate > 0.0) else {
        out.resize(batch, 1.0);
        return;
    };
    let mut keep = || {
        if r.random::<f32>() < rate {
            0.0
        } else {
            1.0 / (1.0 - rate)
        }
    };
    match shard {
        None => out.extend((0..batch).map(|_| keep())),
        Some(s) => {
            let mine = s.first..s.first + batch / s.views;
            for _ in 0..s.views {
                for b in 0..s.global {
                    let k = keep();
                    if mine.contains(&b) {
                        out.push(k);
                    }
                }
            }
        }
    }
}

impl Vit {
    /// Registers the ViT's parameters under `prefix` (e.g. `"backbone."`).
    pub fn new(layout: &mut ParamLayout, prefix: &str, cfg: VitConfig) -> Self {
        assert!(
            cfg.dim % cfg.heads == 0,
            "heads must divide dim (validated by the config)"
        );
        let (d, hid, p) = (cfg.dim, cfg.hidden(), cfg.patch);
        let n0 = cfg.grid() * cfg.grid();
        let tn = Init::TruncNormal(0.02);
        let name = |s: &str| format!("{prefix}{s}");
        let cls = layout.add(name("cls_token"), &[1, 1, d], tn, true);
        let pos = layout.add(name("pos_embed"), &[1, 1 + n0, d], tn, true);
        let pe = linear_params(layout, &name("patch_embed.proj"), &[d, cfg.in_chans, p, p]);
        let blocks = (0..cfg.depth)
            .map(|i| {
                let b = |s: &str| name(&format!("blocks.{i}.{s}"));
                // Field order is the layout's order (timm's state_dict).
                BlockParams {
                    norm1: norm_params(layout, &b("norm1"), d),
                    qkv: linear_params(layout, &b("attn.qkv"), &[3 * d, d]),
                    proj: linear_params(layout, &b("attn.proj"), &[d, d]),
                    norm2: norm_params(layout, &b("norm2"), d),
                    fc1: linear_params(layout, &b("mlp.fc1"), &[hid, d]),
                    fc2: linear_params(layout, &b("mlp.fc2"), &[d, hid]),
                }
            })
            .collect();
        let norm = norm_params(layout, &name("norm"), d);
        // 2-D as in iBOT, so decayed like its other matrices.
        let mask_token = cfg
            .mask_token
            .then(|| layout.add(name(MASK_TOKEN), &[1, d], Init::Zeros, true));
        let drop_rates = (0..cfg.depth)
            .map(|i| {
                if cfg.depth > 1 {
                    cfg.drop_path * i as f32 / (cfg.depth - 1) as f32
                } else {
                    cfg.drop_path
                }
            })
            .collect();
        Vit {
            cfg,
            cls,
            pos,
            pe,
            blocks,
            norm,
            mask_token,
            drop_rates,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &VitConfig {
        &self.cfg
    }

    fn attention_shape(&self, batch: usize, t: usize) -> AttentionShape {
        AttentionShape {
            batch,
            tokens: t,
            dim: self.cfg.dim,
            heads: self.cfg.heads,
        }
    }

    /// A workspace for `batch` images of side `img` (a multiple of the
    /// patch, checked by the configuration), for forward and backward.
    pub fn workspace<B: Backend>(&self, be: &B, batch: usize, img: usize) -> OpResult<VitActs<B>> {
        self.workspace_for(be, batch, img, true)
    }

    /// A workspace that runs forward passes only (the teacher, evaluation):
    /// without the backward's scratch, so [`Vit::backward`] refuses it.
    pub fn forward_workspace<B: Backend>(
        &self,
        be: &B,
        batch: usize,
        img: usize,
    ) -> OpResult<VitActs<B>> {
        self.workspace_for(be, batch, img, false)
    }

    fn workspace_for<B: Backend>(
        &self,
        be: &B,
        batch: usize,
        img: usize,
        backward: bool,
    ) -> OpResult<VitActs<B>> {
        let c = &self.cfg;
        assert!(
            img % c.patch == 0 && img >= c.patch,
            "image size must be a multiple of the patch"
        );
        let (d, hid, hh) = (c.dim, c.hidden(), c.heads);
        let g = img / c.patch;
        let (n, t) = (g * g, g * g + 1);
        let bt = batch * t;
        let z = |len: usize| be.zeros(len);
        // The backward's scratch (`rows_a` is the embedding's forward buffer too).
        let zb = |len: usize| be.zeros(if backward { len } else { 0 });
        let g0 = c.grid();
        let interp = if g == g0 {
            None
        } else {
            Some(be.upload(&bicubic_matrix_2d(g0, g))?)
        };
        let blocks = (0..c.depth)
            .map(|_| {
                Ok(BlockActs {
                    ln1: z(bt * d)?,
                    mean1: z(bt)?,
                    rstd1: z(bt)?,
                    qkv: z(bt * 3 * d)?,
                    probs: z(batch * hh * t * t)?,
                    attn: z(bt * d)?,
                    x_mid: z(bt * d)?,
                    ln2: z(bt * d)?,
                    mean2: z(bt)?,
                    rstd2: z(bt)?,
                    h1: z(bt * hid)?,
                    g: z(bt * hid)?,
                    keep1: be.upload(&vec![1.0; batch])?,
                    keep2: be.upload(&vec![1.0; batch])?,
                })
            })
            .collect::<OpResult<Vec<_>>>()?;
        Ok(VitActs {
            batch,
            img,
            n,
            t,
            dim: d,
            images: z(batch * c.in_chans * img * img)?,
            patches: z(batch * n * c.in_chans * c.patch * c.patch)?,
            interp,
            pos_patch: z(n * d)?,
            xs: (0..=c.depth).map(|_| z(bt * d)).collect::<OpResult<_>>()?,
            blocks,
            out: z(bt * d)?,
            out_mean: z(bt)?,
            out_rstd: z(bt)?,
            dx: zb(bt * d)?,
            rows_a: z(bt * d)?,
            rows_b: zb(bt * d)?,
            dqkv: zb(bt * 3 * d)?,
            dhid: zb(bt * hid)?,
            dscores: zb(be.attention_scratch_len(self.attention_shape(batch, t)))?,
            dpos_patch: zb(n * d)?,
            backward,
            scratch: B::Scratch::default(),
            keeps: Vec::with_capacity(batch),
            masking: None,
            masked: false,
            shard: None,
        })
    }

    /// Shapes `acts` as a [`Vit::forward_workspace`] for `batch` images of
    /// side `img` (no-op if already so).
    pub fn prepare_forward<B: Backend>(
        &self,
        be: &B,
        acts: &mut Option<VitActs<B>>,
        batch: usize,
        img: usize,
    ) -> OpResult {
        if !acts
            .as_ref()
            .is_some_and(|a| a.batch == batch && a.img == img)
        {
            *acts = Some(self.forward_workspace(be, batch, img)?);
        }
        Ok(())
    }

    /// Forward pass of a batch of images shaped `(B, C, S, S)` (normalised,
    /// on the host, standard layout) into `acts` (shaped by
    /// [`Vit::workspace`] for that batch and size; images of another shape
    /// are a typed error). With `rng`, drop-path masks are drawn
    /// (training); with `None` every branch is kept.
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        images: ArrayView4<'_, f32>,
        acts: &mut VitActs<B>,
        rng: Option<&mut dyn rand::Rng>,
    ) -> OpResult {
        let c = &self.cfg;
        let images = self.images_for(images, acts)?;
        let batch = acts.batch;
        be.upload_into(images, &mut acts.images)?;
        self.embed(be, params, acts)?;
        let mut rng = rng;
        for l in 0..c.depth {
            self.block_forward(be, params, acts, l, &mut rng)?;
        }
        let bt = batch * acts.t;
        be.layer_norm_forward(
            &acts.xs[c.depth],
            self.norm.of(params),
            Rows::new(bt, c.dim),
            &mut acts.out,
            (&mut acts.out_mean, &mut acts.out_rstd),
        )
    }

    /// The values of `images` when they are the `(B, C, S, S)` batch `acts`
    /// was shaped for, in standard layout (the backend uploads one block).
    fn images_for<'a, B: Backend>(
        &self,
        images: ArrayView4<'a, f32>,
        acts: &VitActs<B>,
    ) -> OpResult<&'a [f32]> {
        let want = (acts.batch, self.cfg.in_chans, acts.img, acts.img);
        if images.dim() != want {
            let count = |(b, c, h, w): (usize, usize, usize, usize)| b * c * h * w;
            return Err(sere_core::Error::ShapeMismatch {
                what: "ViT images (the workspace is shaped for another batch or size)",
                expected: count(want),
                got: count(images.dim()),
            }
            .into());
        }
        Ok(standard(&images, "ViT images")?)
    }

    /// Patch embedding (im2col, one GEMM), the interpolated position
    /// embedding and the CLS token into `xs[0]`.
    fn embed<B: Backend>(&self, be: &B, params: &B::Buf, acts: &mut VitActs<B>) -> OpResult {
        let c = &self.cfg;
        let (d, n, batch) = (c.dim, acts.n, acts.batch);
        let pp = c.in_chans * c.patch * c.patch;
        let geom = (batch, c.in_chans, acts.img, c.patch);
        be.im2col(&acts.images, geom, &mut acts.patches)?;
        // The patch embeddings go to `rows_a`; embed_tokens places them.
        let shape = LinearShape {
            rows: batch * n,
            inp: pp,
            out: d,
        };
        let pe = self.pe.of(params);
        match self.active_masks(acts.masked, &mut acts.masking) {
            None => be.linear_forward(&acts.patches, pe, shape, &mut acts.rows_a)?,
            Some((m, token)) => {
                // emb = keep * (patches W + b) + mask token^T: the masked
                // rows become the token, before the position embedding.
                be.linear_forward(&acts.patches, pe, shape, &mut m.embed)?;
                be.keep_scale(&m.embed, &m.keep, (batch * n, d), &mut acts.rows_a)?;
                be.gemm(
                    1.0,
                    mat(&m.mask, MatRef::row_major(batch * n, 1)),
                    mat(params, MatRef::row_major(1, d).at(token.start)),
                    1.0,
                    mat_mut(&mut acts.rows_a, MatRef::row_major(batch * n, d)),
                )?;
            }
        }
        match &acts.interp {
            None => {
                let rows = Blocks {
                    count: 1,
                    len: n * d,
                    src_start: self.pos.start + d,
                    src_stride: 0,
                    dst_start: 0,
                    dst_stride: 0,
                };
                be.copy_blocks(params, &mut acts.pos_patch, rows, false)?;
            }
            Some(interp) => {
                let n0 = c.grid() * c.grid();
                be.gemm(
                    1.0,
                    mat(interp, MatRef::row_major(n, n0)),
                    mat(params, MatRef::row_major(n0, d).at(self.pos.start + d)),
                    0.0,
                    mat_mut(&mut acts.pos_patch, MatRef::row_major(n, d)),
                )?;
            }
        }
        be.embed_tokens(
            &acts.rows_a,
            params,
            (self.cls.clone(), self.pos.clone()),
            &acts.pos_patch,
            (batch, n, d),
            &mut acts.xs[0],
        )
    }

    /// Block `l`: `x_mid = x + keep1 * proj(attn(ln1(x)))`,
    /// `x_out = x_mid + keep2 * fc2(gelu(fc1(ln2(x_mid))))`.
    fn block_forward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        acts: &mut VitActs<B>,
        l: usize,
        rng: &mut Option<&mut dyn rand::Rng>,
    ) -> OpResult {
        let c = &self.cfg;
        let (d, hid, batch, t) = (c.dim, c.hidden(), acts.batch, acts.t);
        let bt = batch * t;
        let (bp, ba) = (&self.blocks[l], &mut acts.blocks[l]);
        let rate = self.drop_rates[l];
        for keep in [&mut ba.keep1, &mut ba.keep2] {
            draw_keeps(rng, rate, batch, acts.shard, &mut acts.keeps);
            be.upload_into(&acts.keeps, keep)?;
        }
        let lin = |inp, out| LinearShape { rows: bt, inp, out };
        let (head, tail) = acts.xs.split_at_mut(l + 1);
        let (x_in, x_out) = (&head[l], &mut tail[0]);
        let (ln, mean, rstd) = (&mut ba.ln1, &mut ba.mean1, &mut ba.rstd1);
        be.layer_norm_forward(
            x_in,
            bp.norm1.of(params),
            Rows::new(bt, d),
            ln,
            (mean, rstd),
        )?;
        be.linear_forward(&ba.ln1, bp.qkv.of(params), lin(d, 3 * d), &mut ba.qkv)?;
        be.attention_forward(
            &ba.qkv,
            self.attention_shape(batch, t),
            &mut ba.probs,
            &mut ba.attn,
        )?;
        be.linear_forward(&ba.attn, bp.proj.of(params), lin(d, d), &mut ba.x_mid)?;
        be.residual_keep_add(&mut ba.x_mid, x_in, &ba.keep1, (batch, t * d))?;
        let (ln, mean, rstd) = (&mut ba.ln2, &mut ba.mean2, &mut ba.rstd2);
        be.layer_norm_forward(
            &ba.x_mid,
            bp.norm2.of(params),
            Rows::new(bt, d),
            ln,
            (mean, rstd),
        )?;
        be.linear_forward(&ba.ln2, bp.fc1.of(params), lin(d, hid), &mut ba.h1)?;
        be.gelu_forward(&ba.h1, bt * hid, &mut ba.g)?;
        be.linear_forward(&ba.g, bp.fc2.of(params), lin(hid, d), x_out)?;
        be.residual_keep_add(x_out, &ba.x_mid, &ba.keep2, (batch, t * d))
    }

    /// Frozen features of every image from the last [`Vit::forward`], as
    /// DINO's linear evaluation takes them (`get_intermediate_layers`): per
    /// image, the CLS token leaving each of the last `last_blocks` blocks,
    /// each through the final norm, oldest first; then, with `avgpool`, the
    /// mean of the last block's normed patch tokens; then, with
    /// `patch_grid` G > 0, those patch tokens average-pooled onto a G x G
    /// grid (PyTorch's `adaptive_avg_pool2d`), cells in row-major order:
    /// features that keep where things are, as a dense method's do.
    /// Returns `batch x (last_blocks + avgpool + G^2) * dim` values on the
    /// host. `last_blocks` must be in `1..=depth`, G at most the patch
    /// grid's side.
    pub fn eval_features<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        acts: &VitActs<B>,
        last_blocks: usize,
        avgpool: bool,
        patch_grid: usize,
    ) -> OpResult<Vec<f32>> {
        let (d, t, depth, batch) = (self.cfg.dim, acts.t, self.cfg.depth, acts.batch);
        let side = acts.img / self.cfg.patch;
        assert!(
            (1..=depth).contains(&last_blocks) && patch_grid <= side,
            "eval_features: block count or grid out of range"
        );
        let cls_rows = Blocks {
            count: batch,
            len: d,
            src_start: 0,
            src_stride: t * d,
            dst_start: 0,
            dst_stride: d,
        };
        // Earlier blocks' CLS rows are normed here, as the last one already is.
        let mut per_block = Vec::with_capacity(last_blocks);
        let (mut cls, mut normed) = (be.zeros(batch * d)?, be.zeros(batch * d)?);
        let (mut mean, mut rstd) = (be.zeros(batch)?, be.zeros(batch)?);
        for x in &acts.xs[depth + 1 - last_blocks..depth] {
            be.copy_blocks(x, &mut cls, cls_rows, false)?;
            let norm = self.norm.of(params);
            be.layer_norm_forward(
                &cls,
                norm,
                Rows::new(batch, d),
                &mut normed,
                (&mut mean, &mut rstd),
            )?;
            per_block.push(be.download(&normed)?);
        }
        let out = be.download(&acts.out)?;
        let width = (last_blocks + usize::from(avgpool) + patch_grid * patch_grid) * d;
        let mut feats = Vec::with_capacity(batch * width);
        for b in 0..batch {
            for blk in &per_block {
                feats.extend_from_slice(&blk[b * d..(b + 1) * d]);
            }
            feats.extend_from_slice(&out[b * t * d..(b * t + 1) * d]);
            let patches = &out[(b * t + 1) * d..(b + 1) * t * d];
            if avgpool {
                push_pooled_cell(&mut feats, patches, side, d, (0, side), (0, side));
            }
            for i in 0..patch_grid {
                let rows = pool_window(i, side, patch_grid);
                for j in 0..patch_grid {
                    let cols = pool_window(j, side, patch_grid);
                    push_pooled_cell(&mut feats, patches, side, d, rows, cols);
                }
            }
        }
        Ok(feats)
    }

    /// Backward pass: given `dout` (`B*T x D`, gradient of the final norm's
    /// output) and optionally `dpatches_pre_norm` (`B x N x D`, gradient of
    /// the last block's patch tokens before the final norm, the patch rows
    /// of [`VitActs::pre_norm`]: what the SERE heads read), adds every
    /// parameter's gradient into `grads`.
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        acts: &mut VitActs<B>,
        dout: &B::Buf,
        dpatches_pre_norm: Option<&B::Buf>,
        grads: &mut B::Buf,
    ) -> OpResult {
        let c = &self.cfg;
        assert!(
            acts.backward,
            "a forward-only ViT workspace cannot run backward (use Vit::workspace)"
        );
        let bt = acts.batch * acts.t;
        be.zero(&mut acts.dx)?;
        let saved = LayerNormSaved {
            x: &acts.xs[c.depth],
            mean: &acts.out_mean,
            rstd: &acts.out_rstd,
        };
        be.layer_norm_backward(
            saved,
            dout,
            self.norm.of(params),
            Rows::new(bt, c.dim),
            Grads {
                input: &mut acts.dx,
                params: grads,
            },
            &mut acts.scratch,
        )?;
        if let Some(dpatches) = dpatches_pre_norm {
            let (n, d) = (acts.n, c.dim);
            let rows = Blocks {
                count: acts.batch,
                len: n * d,
                src_start: 0,
                src_stride: n * d,
                dst_start: d,
                dst_stride: acts.t * d,
            };
            be.copy_blocks(dpatches, &mut acts.dx, rows, true)?;
        }
        for l in (0..c.depth).rev() {
            self.block_backward(be, params, acts, l, grads)?;
        }
        self.embed_backward(be, params, acts, grads)
    }

    /// Backward of [`Vit::block_forward`]: `acts.dx` holds the gradient of
    /// the block's output on entry and of its input on return.
    fn block_backward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        acts: &mut VitActs<B>,
        l: usize,
        grads: &mut B::Buf,
    ) -> OpResult {
        self.mlp_branch_backward(be, params, acts, l, grads)?;
        self.attention_branch_backward(be, params, acts, l, grads)
    }

    /// The MLP branch, `x_out = x_mid + keep2 * fc2(gelu(fc1(ln2(x_mid))))`:
    /// `acts.dx` goes from `d x_out` to `d x_mid`.
    fn mlp_branch_backward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        acts: &mut VitActs<B>,
        l: usize,
        grads: &mut B::Buf,
    ) -> OpResult {
        let (d, hid, bt) = (self.cfg.dim, self.cfg.hidden(), acts.batch * acts.t);
        let lin = |inp, out| LinearShape { rows: bt, inp, out };
        let (bp, ba) = (&self.blocks[l], &acts.blocks[l]);
        let (dx, dhid, scratch) = (&mut acts.dx, &mut acts.dhid, &mut acts.scratch);
        let (dbranch, dln2) = (&mut acts.rows_a, &mut acts.rows_b);
        be.keep_scale(dx, &ba.keep2, (acts.batch, acts.t * d), dbranch)?;
        let fc2 = bp.fc2.of(params);
        let dh = InputGrad::Write(&mut *dhid);
        be.linear_backward(&ba.g, dbranch, fc2, lin(hid, d), dh, grads)?;
        be.gelu_grad_in_place(&ba.h1, bt * hid, dhid)?;
        let fc1 = bp.fc1.of(params);
        let into = InputGrad::Write(&mut *dln2);
        be.linear_backward(&ba.ln2, dhid, fc1, lin(d, hid), into, grads)?;
        let saved = LayerNormSaved {
            x: &ba.x_mid,
            mean: &ba.mean2,
            rstd: &ba.rstd2,
        };
        let into = Grads {
            input: dx,
            params: grads,
        };
        let norm2 = bp.norm2.of(params);
        be.layer_norm_backward(saved, dln2, norm2, Rows::new(bt, d), into, scratch)
    }

    /// The attention branch, `x_mid = x_in + keep1 *
    /// proj(attn(qkv(ln1(x_in))))`: `acts.dx` goes from `d x_mid` to
    /// `d x_in`.
    fn attention_branch_backward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        acts: &mut VitActs<B>,
        l: usize,
        grads: &mut B::Buf,
    ) -> OpResult {
        let (d, batch, t) = (self.cfg.dim, acts.batch, acts.t);
        let bt = batch * t;
        let lin = |inp, out| LinearShape { rows: bt, inp, out };
        let (bp, ba, x_in) = (&self.blocks[l], &acts.blocks[l], &acts.xs[l]);
        let (dx, dqkv, scratch) = (&mut acts.dx, &mut acts.dqkv, &mut acts.scratch);
        let (dbranch, dattn) = (&mut acts.rows_a, &mut acts.rows_b);
        be.keep_scale(dx, &ba.keep1, (batch, t * d), dbranch)?;
        let (proj, into) = (bp.proj.of(params), InputGrad::Write(&mut *dattn));
        be.linear_backward(&ba.attn, dbranch, proj, lin(d, d), into, grads)?;
        be.zero(dqkv)?;
        let shape = self.attention_shape(batch, t);
        be.attention_backward(&ba.qkv, &ba.probs, dattn, shape, &mut acts.dscores, dqkv)?;
        // The projection's backward has consumed the branch gradient: its
        // buffer takes ln1's output gradient.
        let dln1 = dbranch;
        let (qkv, into) = (bp.qkv.of(params), InputGrad::Write(&mut *dln1));
        be.linear_backward(&ba.ln1, dqkv, qkv, lin(d, 3 * d), into, grads)?;
        let saved = LayerNormSaved {
            x: x_in,
            mean: &ba.mean1,
            rstd: &ba.rstd1,
        };
        let into = Grads {
            input: dx,
            params: grads,
        };
        let norm1 = bp.norm1.of(params);
        be.layer_norm_backward(saved, dln1, norm1, Rows::new(bt, d), into, scratch)
    }

    /// Backward of [`Vit::embed`]: token assembly, position interpolation
    /// and the patch embedding's GEMM.
    fn embed_backward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        acts: &mut VitActs<B>,
        grads: &mut B::Buf,
    ) -> OpResult {
        let c = &self.cfg;
        let (d, n, batch) = (c.dim, acts.n, acts.batch);
        be.embed_tokens_backward(
            &acts.dx,
            (batch, n, d),
            (self.cls.clone(), self.pos.clone()),
            grads,
            &mut acts.dpos_patch,
            &mut acts.rows_a,
        )?;
        match &acts.interp {
            None => be.add_into(&acts.dpos_patch, n * d, grads, self.pos.start + d)?,
            Some(interp) => {
                let n0 = c.grid() * c.grid();
                be.gemm(
                    1.0,
                    mat(interp, MatRef::row_major(n, n0).transposed()),
                    mat(&acts.dpos_patch, MatRef::row_major(n, d)),
                    1.0,
                    mat_mut(grads, MatRef::row_major(n0, d).at(self.pos.start + d)),
                )?;
            }
        }
        let shape = LinearShape {
            rows: batch * n,
            inp: c.in_chans * c.patch * c.patch,
            out: d,
        };
        let (pe, x) = (self.pe.of(params), &acts.patches);
        match self.active_masks(acts.masked, &mut acts.masking) {
            None => be.linear_backward(x, &acts.rows_a, pe, shape, InputGrad::Skip, grads),
            Some((m, token)) => {
                // d token = sum of the masked rows' gradients; the masked
                // rows send none to the patch embedding.
                be.gemm(
                    1.0,
                    mat(&m.mask, MatRef::row_major(1, batch * n)),
                    mat(&acts.rows_a, MatRef::row_major(batch * n, d)),
                    1.0,
                    mat_mut(grads, MatRef::row_major(1, d).at(token.start)),
                )?;
                be.keep_scale(&acts.rows_a, &m.keep, (batch * n, d), &mut m.embed)?;
                be.linear_backward(x, &m.embed, pe, shape, InputGrad::Skip, grads)
            }
        }
    }

    /// The mask buffers and the token's range when the pass is masked.
    fn active_masks<'a, B: Backend>(
        &self,
        masked: bool,
        masking: &'a mut Option<MaskActs<B>>,
    ) -> Option<(&'a mut MaskActs<B>, Range<usize>)> {
        if !masked {
            return None;
        }
        let token = self
            .mask_token
            .clone()
            .expect("masks need a ViT with a mask token (VitConfig::mask_token)");
        Some((masking.as_mut().expect("set_masks allocated them"), token))
    }
}

/// 1-D bicubic interpolation weights (`out x inp`), PyTorch's
/// `interpolate(mode="bicubic", align_corners=False)` with an explicit size:
/// source `(i + 0.5) * inp / out - 0.5`, cubic convolution with `A = -0.75`,
/// neighbour indices clamped to the border.
pub fn bicubic_matrix(inp: usize, out: usize) -> Vec<f32> {
    const A: f64 = -0.75;
    let c1 = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let c2 = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = inp as f64 / out as f64;
    let mut m = vec![0.0f32; out * inp];
    for i in 0..out {
        let src = (i as f64 + 0.5) * scale - 0.5;
        let x0 = src.floor();
        let tt = src - x0;
        let w = [c2(tt + 1.0), c1(tt), c1(1.0 - tt), c2(2.0 - tt)];
        for (k, &wk) in w.iter().enumerate() {
            let idx = (x0 as isize - 1 + k as isize).clamp(0, inp as isize - 1) as usize;
            m[i * inp + idx] += wk as f32;
        }
    }
    m
}

/// Separable 2-D bicubic resize of a `g0 x g0` grid to `g x g`, as an
/// `(g*g) x (g0*g0)` matrix acting on row-major grids.
pub fn bicubic_matrix_2d(g0: usize, g: usize) -> Vec<f32> {
    let w = bicubic_matrix(g0, g);
    let (n, n0) = (g * g, g0 * g0);
    let mut m = vec![0.0f32; n * n0];
    for oy in 0..g {
        for ox in 0..g {
            for iy in 0..g0 {
                for ix in 0..g0 {
                    m[(oy * g + ox) * n0 + iy * g0 + ix] = w[oy * g0 + iy] * w[ox * g0 + ix];
                }
            }
        }
    }
    m
}

/// Cell `i` of `cells` over `side` positions as `adaptive_avg_pool2d`
/// windows it: `[floor(i side / cells), ceil((i + 1) side / cells))`, so
/// the windows cover every position and overlap where `cells` does not
/// divide `side`.
fn pool_window(i: usize, side: usize, cells: usize) -> (usize, usize) {
    (i * side / cells, ((i + 1) * side).div_ceil(cells))
}

/// Appends the mean of the `d`-wide tokens of `patches` (a `side x side`
/// row-major grid) in rows `rows.0..rows.1` and columns `cols.0..cols.1`.
fn push_pooled_cell(
    feats: &mut Vec<f32>,
    patches: &[f32],
    side: usize,
    d: usize,
    rows: (usize, usize),
    cols: (usize, usize),
) {
    let start = feats.len();
    feats.resize(start + d, 0.0);
    let acc = &mut feats[start..];
    for r in rows.0..rows.1 {
        for token in patches[(r * side + cols.0) * d..(r * side + cols.1) * d].chunks_exact(d) {
            for (a, &v) in acc.iter_mut().zip(token) {
                *a += v;
            }
        }
    }
    let inv = 1.0 / ((rows.1 - rows.0) * (cols.1 - cols.0)).max(1) as f32;
    acc.iter_mut().for_each(|a| *a *= inv);
}
