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
//! a [`VitActs`] workspace that is allocated once per batch shape.

use super::params::{Init, ParamLayout};
use crate::backend::cpu;
use crate::backend::cpu::gemm;
use rand::RngExt;
use rayon::prelude::*;
use sere_core::linalg::MatRef;
use std::ops::Range;

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
    pub(crate) norm1_w: Range<usize>,
    pub(crate) norm1_b: Range<usize>,
    pub(crate) qkv_w: Range<usize>,
    pub(crate) qkv_b: Range<usize>,
    pub(crate) proj_w: Range<usize>,
    pub(crate) proj_b: Range<usize>,
    pub(crate) norm2_w: Range<usize>,
    pub(crate) norm2_b: Range<usize>,
    pub(crate) fc1_w: Range<usize>,
    pub(crate) fc1_b: Range<usize>,
    pub(crate) fc2_w: Range<usize>,
    pub(crate) fc2_b: Range<usize>,
}

/// The ViT: parameter ranges inside a flat buffer plus its configuration.
#[derive(Debug, Clone)]
pub struct Vit {
    pub(crate) cfg: VitConfig,
    pub(crate) cls: Range<usize>,
    pub(crate) pos: Range<usize>,
    pub(crate) pe_w: Range<usize>,
    pub(crate) pe_b: Range<usize>,
    pub(crate) blocks: Vec<BlockParams>,
    pub(crate) norm_w: Range<usize>,
    pub(crate) norm_b: Range<usize>,
    pub(crate) drop_rates: Vec<f32>,
}

/// Activations of one block, kept for backward.
#[derive(Debug, Default)]
struct BlockActs {
    ln1: Vec<f32>,
    mean1: Vec<f32>,
    rstd1: Vec<f32>,
    qkv: Vec<f32>,
    probs: Vec<f32>,
    attn: Vec<f32>,
    x_mid: Vec<f32>,
    ln2: Vec<f32>,
    mean2: Vec<f32>,
    rstd2: Vec<f32>,
    h1: Vec<f32>,
    g: Vec<f32>,
    keep1: Vec<f32>,
    keep2: Vec<f32>,
}

/// Forward activations and backward scratch of one ViT pass for a fixed
/// `(batch, image size)`; reused across steps so a step allocates nothing.
#[derive(Debug, Default)]
pub struct VitActs {
    batch: usize,
    img: usize,
    /// Patches per image.
    pub n: usize,
    /// Tokens per image (`1 + n`).
    pub t: usize,
    patches: Vec<f32>,
    /// `n x n0` bicubic interpolation of the position grid (empty: identity).
    interp: Vec<f32>,
    pos_patch: Vec<f32>,
    /// Residual stream entering each block, and leaving the last one.
    xs: Vec<Vec<f32>>,
    blocks: Vec<BlockActs>,
    out: Vec<f32>,
    out_mean: Vec<f32>,
    out_rstd: Vec<f32>,
    dx: Vec<f32>,
    dtmp: Vec<f32>,
    dattn: Vec<f32>,
    dqkv: Vec<f32>,
    dhid: Vec<f32>,
    dscores: Vec<f32>,
    dpos_patch: Vec<f32>,
    ln_scratch: Vec<f32>,
}

impl VitActs {
    /// Output of the final norm, `B*T x D` (row `b*T` is image `b`'s CLS).
    pub fn out(&self) -> &[f32] {
        &self.out
    }
    /// Images in the batch this workspace is shaped for.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Attention probabilities of block `block` (0-based; panics if out of
    /// range) from the last forward pass, `B x heads x T x T`: row `i` of
    /// head `h` of image `b` is how token `i` attends to every token (token
    /// 0 is the CLS token).
    pub fn attention(&self, block: usize) -> &[f32] {
        &self.blocks[block].probs
    }
    /// Drop-path keep factors (attention branch, MLP branch) of block
    /// `block` from the last forward pass, one per image (for the GPU
    /// engine's test that it draws the same masks).
    #[cfg(test)]
    pub(crate) fn drop_path_keeps(&self, block: usize) -> (&[f32], &[f32]) {
        (&self.blocks[block].keep1, &self.blocks[block].keep2)
    }
}

fn resize(v: &mut Vec<f32>, n: usize) {
    if v.len() != n {
        *v = vec![0.0; n];
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
        let pe_w = layout.add(
            name("patch_embed.proj.weight"),
            &[d, cfg.in_chans, p, p],
            tn,
            true,
        );
        let pe_b = layout.add(name("patch_embed.proj.bias"), &[d], Init::Zeros, false);
        let blocks = (0..cfg.depth)
            .map(|i| {
                let b = |s: &str| name(&format!("blocks.{i}.{s}"));
                BlockParams {
                    norm1_w: layout.add(b("norm1.weight"), &[d], Init::Ones, false),
                    norm1_b: layout.add(b("norm1.bias"), &[d], Init::Zeros, false),
                    qkv_w: layout.add(b("attn.qkv.weight"), &[3 * d, d], tn, true),
                    qkv_b: layout.add(b("attn.qkv.bias"), &[3 * d], Init::Zeros, false),
                    proj_w: layout.add(b("attn.proj.weight"), &[d, d], tn, true),
                    proj_b: layout.add(b("attn.proj.bias"), &[d], Init::Zeros, false),
                    norm2_w: layout.add(b("norm2.weight"), &[d], Init::Ones, false),
                    norm2_b: layout.add(b("norm2.bias"), &[d], Init::Zeros, false),
                    fc1_w: layout.add(b("mlp.fc1.weight"), &[hid, d], tn, true),
                    fc1_b: layout.add(b("mlp.fc1.bias"), &[hid], Init::Zeros, false),
                    fc2_w: layout.add(b("mlp.fc2.weight"), &[d, hid], tn, true),
                    fc2_b: layout.add(b("mlp.fc2.bias"), &[d], Init::Zeros, false),
                }
            })
            .collect();
        let norm_w = layout.add(name("norm.weight"), &[d], Init::Ones, false);
        let norm_b = layout.add(name("norm.bias"), &[d], Init::Zeros, false);
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
            pe_w,
            pe_b,
            blocks,
            norm_w,
            norm_b,
            drop_rates,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &VitConfig {
        &self.cfg
    }

    /// Shapes `acts` for `batch` images of side `img` (no-op if already so).
    pub fn prepare(&self, acts: &mut VitActs, batch: usize, img: usize) {
        let c = &self.cfg;
        assert!(
            img % c.patch == 0 && img >= c.patch,
            "image size must be a multiple of the patch"
        );
        if acts.batch == batch && acts.img == img && acts.blocks.len() == c.depth {
            return;
        }
        let (d, hid, hh) = (c.dim, c.hidden(), c.heads);
        let g = img / c.patch;
        let (n, t) = (g * g, g * g + 1);
        let bt = batch * t;
        acts.batch = batch;
        acts.img = img;
        acts.n = n;
        acts.t = t;
        resize(
            &mut acts.patches,
            batch * n * c.in_chans * c.patch * c.patch,
        );
        let g0 = c.grid();
        acts.interp = if g == g0 {
            Vec::new()
        } else {
            bicubic_matrix_2d(g0, g)
        };
        resize(&mut acts.pos_patch, n * d);
        resize(&mut acts.dpos_patch, n * d);
        acts.xs = (0..=c.depth).map(|_| vec![0.0; bt * d]).collect();
        acts.blocks = (0..c.depth)
            .map(|_| BlockActs {
                ln1: vec![0.0; bt * d],
                mean1: vec![0.0; bt],
                rstd1: vec![0.0; bt],
                qkv: vec![0.0; bt * 3 * d],
                probs: vec![0.0; batch * hh * t * t],
                attn: vec![0.0; bt * d],
                x_mid: vec![0.0; bt * d],
                ln2: vec![0.0; bt * d],
                mean2: vec![0.0; bt],
                rstd2: vec![0.0; bt],
                h1: vec![0.0; bt * hid],
                g: vec![0.0; bt * hid],
                keep1: vec![1.0; batch],
                keep2: vec![1.0; batch],
            })
            .collect();
        resize(&mut acts.out, bt * d);
        resize(&mut acts.out_mean, bt);
        resize(&mut acts.out_rstd, bt);
        for v in [&mut acts.dx, &mut acts.dtmp, &mut acts.dattn] {
            resize(v, bt * d);
        }
        resize(&mut acts.dqkv, bt * 3 * d);
        resize(&mut acts.dhid, bt * hid);
        resize(&mut acts.dscores, batch * t * t);
    }

    /// Forward pass of `batch` images (`B x C x S x S`, normalised) into
    /// `acts` (shaped by [`Vit::prepare`] if needed). With `rng`, drop-path
    /// masks are drawn (training); with `None` every branch is kept.
    pub fn forward(
        &self,
        params: &[f32],
        images: &[f32],
        batch: usize,
        img: usize,
        acts: &mut VitActs,
        rng: Option<&mut dyn rand::Rng>,
    ) {
        self.prepare(acts, batch, img);
        let c = &self.cfg;
        let (d, hid) = (c.dim, c.hidden());
        let (n, t) = (acts.n, acts.t);
        let bt = batch * t;
        let pp = c.in_chans * c.patch * c.patch;
        assert_eq!(
            images.len(),
            batch * c.in_chans * img * img,
            "image batch has the wrong size"
        );

        // Patch embedding: im2col, then one GEMM over all patches.
        im2col(images, batch, c.in_chans, img, c.patch, &mut acts.patches);
        let emb = &mut acts.dtmp[..batch * n * d]; // borrowed as scratch
        linear_fwd_into(
            params,
            (&self.pe_w, &self.pe_b),
            &acts.patches,
            (batch * n, pp, d),
            emb,
        );
        // Position embedding of the patches, interpolated if needed.
        let pos = &params[self.pos.clone()];
        if acts.interp.is_empty() {
            acts.pos_patch.copy_from_slice(&pos[d..]);
        } else {
            let n0 = c.grid() * c.grid();
            gemm(
                1.0,
                &acts.interp,
                MatRef::row_major(n, n0),
                pos,
                MatRef::row_major(n0, d).at(d),
                0.0,
                &mut acts.pos_patch,
                MatRef::row_major(n, d),
            )
            .expect("pos interpolation shapes");
        }
        let cls = &params[self.cls.clone()];
        let x0 = &mut acts.xs[0];
        for b in 0..batch {
            let row = &mut x0[b * t * d..(b * t + 1) * d];
            for j in 0..d {
                row[j] = cls[j] + pos[j];
            }
            let rows = &mut x0[(b * t + 1) * d..(b + 1) * t * d];
            let e = &emb[b * n * d..(b + 1) * n * d];
            for ((o, &ev), &pv) in rows.iter_mut().zip(e).zip(acts.pos_patch.iter()) {
                *o = ev + pv;
            }
        }

        let mut rng = rng;
        for (l, (bp, ba)) in self.blocks.iter().zip(acts.blocks.iter_mut()).enumerate() {
            let rate = self.drop_rates[l];
            for keep in [&mut ba.keep1, &mut ba.keep2] {
                match rng.as_deref_mut() {
                    Some(r) if rate > 0.0 => {
                        for k in keep.iter_mut() {
                            *k = if r.random::<f32>() < rate {
                                0.0
                            } else {
                                1.0 / (1.0 - rate)
                            };
                        }
                    }
                    _ => keep.fill(1.0),
                }
            }
            let (head, tail) = acts.xs.split_at_mut(l + 1);
            let (x_in, x_out) = (&head[l], &mut tail[0]);
            layer_norm_fwd_into(
                params,
                (&bp.norm1_w, &bp.norm1_b),
                x_in,
                (bt, d),
                &mut ba.ln1,
                (&mut ba.mean1, &mut ba.rstd1),
            );
            linear_fwd_into(
                params,
                (&bp.qkv_w, &bp.qkv_b),
                &ba.ln1,
                (bt, d, 3 * d),
                &mut ba.qkv,
            );
            attention_fwd(&ba.qkv, batch, t, d, c.heads, &mut ba.probs, &mut ba.attn);
            linear_fwd_into(
                params,
                (&bp.proj_w, &bp.proj_b),
                &ba.attn,
                (bt, d, d),
                &mut ba.x_mid,
            );
            residual_add(&mut ba.x_mid, x_in, &ba.keep1, t * d);
            layer_norm_fwd_into(
                params,
                (&bp.norm2_w, &bp.norm2_b),
                &ba.x_mid,
                (bt, d),
                &mut ba.ln2,
                (&mut ba.mean2, &mut ba.rstd2),
            );
            linear_fwd_into(
                params,
                (&bp.fc1_w, &bp.fc1_b),
                &ba.ln2,
                (bt, d, hid),
                &mut ba.h1,
            );
            cpu::gelu_fwd(&ba.h1, &mut ba.g);
            linear_fwd_into(params, (&bp.fc2_w, &bp.fc2_b), &ba.g, (bt, hid, d), x_out);
            residual_add(x_out, &ba.x_mid, &ba.keep2, t * d);
        }
        layer_norm_fwd_into(
            params,
            (&self.norm_w, &self.norm_b),
            &acts.xs[c.depth],
            (bt, d),
            &mut acts.out,
            (&mut acts.out_mean, &mut acts.out_rstd),
        );
    }

    /// Frozen features of image `b` from the last [`Vit::forward`], as DINO's
    /// linear evaluation takes them (`get_intermediate_layers`): the CLS
    /// token leaving each of the last `last_blocks` blocks, each through the
    /// final norm, oldest first; then, with `avgpool`, the mean of the last
    /// block's normed patch tokens. Appends `(last_blocks + avgpool) * dim`
    /// values to `out`. `last_blocks` must be in `1..=depth`.
    pub fn eval_features(
        &self,
        params: &[f32],
        acts: &VitActs,
        b: usize,
        last_blocks: usize,
        avgpool: bool,
        out: &mut Vec<f32>,
    ) {
        let (d, t, depth) = (self.cfg.dim, acts.t, self.cfg.depth);
        assert!(
            (1..=depth).contains(&last_blocks) && b < acts.batch,
            "eval_features: block count or image index out of range"
        );
        let cls = b * t * d..(b * t + 1) * d;
        for x in &acts.xs[depth + 1 - last_blocks..depth] {
            // Earlier blocks' CLS rows: normed here, as the last one already is.
            let start = out.len();
            out.resize(start + d, 0.0);
            let (mut mean, mut rstd) = ([0.0f32], [0.0f32]);
            layer_norm_fwd_into(
                params,
                (&self.norm_w, &self.norm_b),
                &x[cls.clone()],
                (1, d),
                &mut out[start..],
                (&mut mean, &mut rstd),
            );
        }
        out.extend_from_slice(&acts.out[cls]);
        if avgpool {
            let start = out.len();
            out.resize(start + d, 0.0);
            let patches = &acts.out[(b * t + 1) * d..(b + 1) * t * d];
            let acc = &mut out[start..];
            for row in patches.chunks_exact(d) {
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += v;
                }
            }
            let inv = 1.0 / (t - 1).max(1) as f32;
            acc.iter_mut().for_each(|a| *a *= inv);
        }
    }

    /// Backward pass: given `dout` (`B*T x D`, gradient of the final norm's
    /// output), adds every parameter's gradient into `grads`.
    pub fn backward(&self, params: &[f32], acts: &mut VitActs, dout: &[f32], grads: &mut [f32]) {
        let c = &self.cfg;
        let (d, hid) = (c.dim, c.hidden());
        let (batch, n, t) = (acts.batch, acts.n, acts.t);
        let bt = batch * t;
        assert_eq!(dout.len(), bt * d, "dout has the wrong size");

        acts.dx.fill(0.0);
        layer_norm_bwd_into(
            params,
            grads,
            (&self.norm_w, &self.norm_b),
            &acts.xs[c.depth],
            (&acts.out_mean, &acts.out_rstd),
            dout,
            (bt, d),
            &mut acts.dx,
            &mut acts.ln_scratch,
        );
        for (l, (bp, ba)) in self.blocks.iter().zip(acts.blocks.iter()).enumerate().rev() {
            let x_in = &acts.xs[l];
            // MLP branch: x_out = x_mid + keep2 * fc2(gelu(fc1(ln2(x_mid)))).
            scale_rows(&acts.dx, &ba.keep2, t * d, &mut acts.dtmp);
            acts.dhid.fill(0.0);
            linear_bwd_into(
                params,
                grads,
                (&bp.fc2_w, &bp.fc2_b),
                &ba.g,
                &acts.dtmp,
                (bt, hid, d),
                Some(&mut acts.dhid),
            );
            gelu_bwd_in_place(&ba.h1, &mut acts.dhid);
            acts.dattn.fill(0.0); // holds d ln2 here
            linear_bwd_into(
                params,
                grads,
                (&bp.fc1_w, &bp.fc1_b),
                &ba.ln2,
                &acts.dhid,
                (bt, d, hid),
                Some(&mut acts.dattn),
            );
            layer_norm_bwd_into(
                params,
                grads,
                (&bp.norm2_w, &bp.norm2_b),
                &ba.x_mid,
                (&ba.mean2, &ba.rstd2),
                &acts.dattn,
                (bt, d),
                &mut acts.dx,
                &mut acts.ln_scratch,
            );
            // Attention branch: x_mid = x_in + keep1 * proj(attn(qkv(ln1(x_in)))).
            scale_rows(&acts.dx, &ba.keep1, t * d, &mut acts.dtmp);
            acts.dattn.fill(0.0);
            linear_bwd_into(
                params,
                grads,
                (&bp.proj_w, &bp.proj_b),
                &ba.attn,
                &acts.dtmp,
                (bt, d, d),
                Some(&mut acts.dattn),
            );
            acts.dqkv.fill(0.0);
            attention_bwd(
                &ba.qkv,
                &ba.probs,
                &acts.dattn,
                batch,
                t,
                d,
                c.heads,
                &mut acts.dscores,
                &mut acts.dqkv,
            );
            acts.dtmp.fill(0.0); // d ln1
            linear_bwd_into(
                params,
                grads,
                (&bp.qkv_w, &bp.qkv_b),
                &ba.ln1,
                &acts.dqkv,
                (bt, d, 3 * d),
                Some(&mut acts.dtmp),
            );
            layer_norm_bwd_into(
                params,
                grads,
                (&bp.norm1_w, &bp.norm1_b),
                x_in,
                (&ba.mean1, &ba.rstd1),
                &acts.dtmp,
                (bt, d),
                &mut acts.dx,
                &mut acts.ln_scratch,
            );
        }

        // Token assembly: x0 = [cls + pos0; embed + pos_patch].
        let dx = &acts.dx;
        {
            let gcls = &mut grads[self.cls.clone()];
            for b in 0..batch {
                for j in 0..d {
                    gcls[j] += dx[b * t * d + j];
                }
            }
        }
        acts.dpos_patch.fill(0.0);
        for b in 0..batch {
            let rows = &dx[(b * t + 1) * d..(b + 1) * t * d];
            for (p, &g) in acts.dpos_patch.iter_mut().zip(rows) {
                *p += g;
            }
        }
        {
            let gpos = &mut grads[self.pos.clone()];
            for b in 0..batch {
                for j in 0..d {
                    gpos[j] += dx[b * t * d + j];
                }
            }
            if acts.interp.is_empty() {
                for (p, &g) in gpos[d..].iter_mut().zip(&acts.dpos_patch) {
                    *p += g;
                }
            } else {
                let n0 = c.grid() * c.grid();
                gemm(
                    1.0,
                    &acts.interp,
                    MatRef::row_major(n, n0).transposed(),
                    &acts.dpos_patch,
                    MatRef::row_major(n, d),
                    1.0,
                    gpos,
                    MatRef::row_major(n0, d).at(d),
                )
                .expect("pos interpolation backward shapes");
            }
        }
        let demb = &mut acts.dtmp[..batch * n * d];
        for b in 0..batch {
            demb[b * n * d..(b + 1) * n * d].copy_from_slice(&dx[(b * t + 1) * d..(b + 1) * t * d]);
        }
        let pp = c.in_chans * c.patch * c.patch;
        linear_bwd_into(
            params,
            grads,
            (&self.pe_w, &self.pe_b),
            &acts.patches,
            demb,
            (batch * n, pp, d),
            None,
        );
    }
}

/// Linear forward with the weight and bias read from the flat parameters.
fn linear_fwd_into(
    params: &[f32],
    (w, b): (&Range<usize>, &Range<usize>),
    x: &[f32],
    (rows, inp, out): (usize, usize, usize),
    y: &mut [f32],
) {
    cpu::linear_fwd(
        x,
        &params[w.clone()],
        Some(&params[b.clone()]),
        rows,
        inp,
        out,
        y,
    );
}

/// Layer-norm forward with the scale and shift read from the flat
/// parameters; saves the row statistics for backward.
fn layer_norm_fwd_into(
    params: &[f32],
    (w, b): (&Range<usize>, &Range<usize>),
    x: &[f32],
    (rows, cols): (usize, usize),
    y: &mut [f32],
    (mean, rstd): (&mut [f32], &mut [f32]),
) {
    cpu::layer_norm_fwd(
        x,
        &params[w.clone()],
        &params[b.clone()],
        rows,
        cols,
        y,
        mean,
        rstd,
    );
}

/// Linear backward with the weight and bias gradients taken from the flat
/// gradient buffer: `dx += dy W`, `dW += dy^T x`, `db += sum(dy)`.
#[allow(clippy::too_many_arguments)]
fn linear_bwd_into(
    params: &[f32],
    grads: &mut [f32],
    (w, b): (&Range<usize>, &Range<usize>),
    x: &[f32],
    dy: &[f32],
    (rows, inp, out): (usize, usize, usize),
    dx: Option<&mut [f32]>,
) {
    let (gw, gb) = two_mut(grads, w, b);
    cpu::linear_bwd(x, &params[w.clone()], dy, rows, inp, out, dx, gw, Some(gb));
}

/// Layer-norm backward with the scale and shift gradients taken from the
/// flat gradient buffer.
#[allow(clippy::too_many_arguments)]
fn layer_norm_bwd_into(
    params: &[f32],
    grads: &mut [f32],
    (w, b): (&Range<usize>, &Range<usize>),
    x: &[f32],
    (mean, rstd): (&[f32], &[f32]),
    dy: &[f32],
    (rows, cols): (usize, usize),
    dx: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let (gw, gb) = two_mut(grads, w, b);
    cpu::layer_norm_bwd(
        x,
        &params[w.clone()],
        mean,
        rstd,
        dy,
        rows,
        cols,
        dx,
        gw,
        gb,
        scratch,
    );
}

/// Two disjoint mutable views of one gradient buffer (weight, bias).
fn two_mut<'a>(
    buf: &'a mut [f32],
    a: &Range<usize>,
    b: &Range<usize>,
) -> (&'a mut [f32], &'a mut [f32]) {
    assert!(
        a.end <= b.start,
        "parameter ranges must be ordered and disjoint"
    );
    let (lo, hi) = buf.split_at_mut(b.start);
    (&mut lo[a.clone()], &mut hi[..b.len()])
}

/// `out = x + keep[b] * out`, per image of `per` elements.
fn residual_add(out: &mut [f32], x: &[f32], keep: &[f32], per: usize) {
    out.par_chunks_mut(per)
        .zip(x.par_chunks(per))
        .zip(keep.par_iter())
        .for_each(|((o, xi), &k)| {
            for (ov, &xv) in o.iter_mut().zip(xi) {
                *ov = xv + k * *ov;
            }
        });
}

/// `out = keep[b] * dx`, per image of `per` elements.
fn scale_rows(dx: &[f32], keep: &[f32], per: usize, out: &mut [f32]) {
    out.par_chunks_mut(per)
        .zip(dx.par_chunks(per))
        .zip(keep.par_iter())
        .for_each(|((o, g), &k)| {
            for (ov, &gv) in o.iter_mut().zip(g) {
                *ov = k * gv;
            }
        });
}

/// `d *= gelu'(x)` element-wise.
fn gelu_bwd_in_place(x: &[f32], d: &mut [f32]) {
    d.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(dc, xc)| {
            sere_core::activation::gelu_grad_in_place(xc, dc).expect("equal chunk lengths")
        });
}

/// Non-overlapping `p x p` patches of `B x C x S x S` images as rows of
/// `C*p*p` values in `(c, ky, kx)` order (the order of a conv weight).
fn im2col(images: &[f32], batch: usize, ch: usize, img: usize, p: usize, out: &mut [f32]) {
    let g = img / p;
    let row = ch * p * p;
    out.par_chunks_mut(g * g * row)
        .enumerate()
        .take(batch)
        .for_each(|(b, ob)| {
            let im = &images[b * ch * img * img..(b + 1) * ch * img * img];
            for py in 0..g {
                for px in 0..g {
                    let o = &mut ob[(py * g + px) * row..(py * g + px + 1) * row];
                    for c in 0..ch {
                        for ky in 0..p {
                            let src = c * img * img + (py * p + ky) * img + px * p;
                            o[(c * p + ky) * p..(c * p + ky + 1) * p]
                                .copy_from_slice(&im[src..src + p]);
                        }
                    }
                }
            }
        });
}

/// Multi-head self-attention core, parallel over images: for each head,
/// `probs = softmax(q k^T / sqrt(d))` and `attn = probs v`. `qkv` rows are
/// `[3][H][d]` per token (timm's layout); `attn` rows `[H][d]`.
fn attention_fwd(
    qkv: &[f32],
    batch: usize,
    t: usize,
    d: usize,
    heads: usize,
    probs: &mut [f32],
    attn: &mut [f32],
) {
    let hd = d / heads;
    let scale = 1.0 / (hd as f32).sqrt();
    probs
        .par_chunks_mut(heads * t * t)
        .zip(attn.par_chunks_mut(t * d))
        .enumerate()
        .take(batch)
        .for_each(|(b, (pb, ab))| {
            let base = b * t * 3 * d;
            let tok = MatRef {
                offset: 0,
                rows: t,
                cols: hd,
                row_stride: 3 * d,
                col_stride: 1,
            };
            for h in 0..heads {
                let q = tok.at(base + h * hd);
                let k = tok.at(base + d + h * hd);
                let v = tok.at(base + 2 * d + h * hd);
                let pm = MatRef::row_major(t, t).at(h * t * t);
                gemm(scale, qkv, q, qkv, k.transposed(), 0.0, pb, pm).expect("attention scores");
                sere_core::softmax::softmax_rows_in_place(
                    &mut pb[h * t * t..(h + 1) * t * t],
                    t,
                    t,
                )
                .expect("attention softmax: non-finite scores (diverged training?)");
                let out = MatRef {
                    offset: h * hd,
                    rows: t,
                    cols: hd,
                    row_stride: d,
                    col_stride: 1,
                };
                gemm(1.0, pb, pm, qkv, v, 0.0, ab, out).expect("attention output");
            }
        });
}

/// Backward of [`attention_fwd`]: adds into `dqkv`. `dscores` is scratch of
/// `B x T x T`.
#[allow(clippy::too_many_arguments)]
fn attention_bwd(
    qkv: &[f32],
    probs: &[f32],
    dattn: &[f32],
    batch: usize,
    t: usize,
    d: usize,
    heads: usize,
    dscores: &mut [f32],
    dqkv: &mut [f32],
) {
    let hd = d / heads;
    let scale = 1.0 / (hd as f32).sqrt();
    dqkv.par_chunks_mut(t * 3 * d)
        .zip(dscores.par_chunks_mut(t * t))
        .enumerate()
        .take(batch)
        .for_each(|(b, (dq, ds))| {
            let qkv_b = &qkv[b * t * 3 * d..(b + 1) * t * 3 * d];
            let pb = &probs[b * heads * t * t..(b + 1) * heads * t * t];
            let da = &dattn[b * t * d..(b + 1) * t * d];
            let tok = MatRef {
                offset: 0,
                rows: t,
                cols: hd,
                row_stride: 3 * d,
                col_stride: 1,
            };
            let tt = MatRef::row_major(t, t);
            for h in 0..heads {
                let (q, k, v) = (tok.at(h * hd), tok.at(d + h * hd), tok.at(2 * d + h * hd));
                let dout = MatRef {
                    offset: h * hd,
                    rows: t,
                    cols: hd,
                    row_stride: d,
                    col_stride: 1,
                };
                let pm = tt.at(h * t * t);
                // dP = dO V^T ; dV += P^T dO
                gemm(1.0, da, dout, qkv_b, v.transposed(), 0.0, ds, tt).expect("attention dP");
                gemm(1.0, pb, pm.transposed(), da, dout, 1.0, dq, v).expect("attention dV");
                // dS = P * (dP - rowsum(P * dP))
                let p = &pb[h * t * t..(h + 1) * t * t];
                for (pr, dr) in p.chunks_exact(t).zip(ds.chunks_exact_mut(t)) {
                    let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                    for (dv, &pv) in dr.iter_mut().zip(pr) {
                        *dv = pv * (*dv - dot);
                    }
                }
                // dQ += scale dS K ; dK += scale dS^T Q
                gemm(scale, ds, tt, qkv_b, k, 1.0, dq, q).expect("attention dQ");
                gemm(scale, ds, tt.transposed(), qkv_b, q, 1.0, dq, k).expect("attention dK");
            }
        });
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
