//! The ViT on the GPU: the same arithmetic as [`crate::model::vit::Vit`]
//! (same parameter ranges, same forward and backward order), with every
//! activation in a device workspace shaped on the first pass.
//!
//! Drop-path keep factors are drawn on the host by [`draw_keeps`] with the
//! same generator calls as the CPU forward and uploaded, so both backends
//! drop the same branches.

use super::{Buf, Gpu, R};
use crate::model::vit::{bicubic_matrix_2d, Vit};
use rand::RngExt;
use sere_cuda::{DevicePtr, DevicePtrMut, MatView};

/// PyTorch's / timm's ViT layer-norm epsilon (as the CPU's `LN_EPS`).
const LN_EPS: f32 = crate::backend::cpu::LN_EPS;

/// Per-block activations kept for the backward pass.
pub(super) struct BlockActs {
    ln1: Buf,
    mean1: Buf,
    rstd1: Buf,
    qkv: Buf,
    probs: Buf,
    attn: Buf,
    x_mid: Buf,
    ln2: Buf,
    mean2: Buf,
    rstd2: Buf,
    h1: Buf,
    g: Buf,
}

/// Device workspace of one ViT pass for a fixed `(batch, image size)`:
/// allocated once, reused by every later step of that shape.
pub(super) struct VitActs {
    pub batch: usize,
    pub img: usize,
    /// Patches per image.
    pub n: usize,
    /// Tokens per image.
    pub t: usize,
    patches: Buf,
    /// `n x n0` bicubic position-grid interpolation (None: identity).
    interp: Option<Buf>,
    /// `[cls + pos_0 ; pos_patch]`, added to every image's token rows.
    pos_full: Buf,
    xs: Vec<Buf>,
    blocks: Vec<BlockActs>,
    out: Buf,
    out_mean: Buf,
    out_rstd: Buf,
    /// Drop-path keep factors, `[depth][2][batch]` (uploaded per step).
    pub keeps: Buf,
    dx: Buf,
    dtmp: Buf,
    dattn: Buf,
    dqkv: Buf,
    dhid: Buf,
    dhid2: Buf,
    dprobs: Buf,
    dscores: Buf,
    dpos_patch: Buf,
    demb: Buf,
    dcls_rows: Buf,
}

impl VitActs {
    /// Output of the final norm, `B*T x D`.
    pub fn out(&self) -> &Buf {
        &self.out
    }
}

/// Drop-path keep factors of one training forward pass, `[depth][2][batch]`,
/// drawn exactly as [`Vit::forward`] draws them (for each block: the
/// attention branch's then the MLP branch's, one `random::<f32>()` per
/// image, only where the block's rate is positive).
pub(super) fn draw_keeps(vit: &Vit, rng: &mut dyn rand::Rng, batch: usize, out: &mut Vec<f32>) {
    out.clear();
    for &rate in &vit.drop_rates {
        for _ in 0..2 {
            for _ in 0..batch {
                out.push(if rate > 0.0 {
                    if rng.random::<f32>() < rate {
                        0.0
                    } else {
                        1.0 / (1.0 - rate)
                    }
                } else {
                    1.0
                });
            }
        }
    }
}

/// Shapes a workspace for `batch` images of side `img` (no-op when it
/// already has that shape).
pub(super) fn prepare(
    gpu: &Gpu,
    vit: &Vit,
    acts: &mut Option<VitActs>,
    batch: usize,
    img: usize,
) -> R<()> {
    if let Some(a) = acts {
        if a.batch == batch && a.img == img {
            return Ok(());
        }
    }
    let c = &vit.cfg;
    let (d, hid, hh) = (c.dim, c.hidden(), c.heads);
    let g = img / c.patch;
    let (n, t) = (g * g, g * g + 1);
    let bt = batch * t;
    let g0 = c.grid();
    let z = |len: usize| gpu.zeros(len.max(1));
    let interp = if g == g0 {
        None
    } else {
        Some(gpu.upload(&bicubic_matrix_2d(g0, g))?)
    };
    let mut blocks = Vec::with_capacity(c.depth);
    for _ in 0..c.depth {
        blocks.push(BlockActs {
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
        });
    }
    *acts = Some(VitActs {
        batch,
        img,
        n,
        t,
        patches: z(batch * n * c.in_chans * c.patch * c.patch)?,
        interp,
        pos_full: z(t * d)?,
        xs: (0..=c.depth).map(|_| z(bt * d)).collect::<R<_>>()?,
        blocks,
        out: z(bt * d)?,
        out_mean: z(bt)?,
        out_rstd: z(bt)?,
        keeps: gpu.upload(&vec![1.0; c.depth * 2 * batch])?,
        dx: z(bt * d)?,
        dtmp: z(bt * d)?,
        dattn: z(bt * d)?,
        dqkv: z(bt * 3 * d)?,
        dhid: z(bt * hid)?,
        dhid2: z(bt * hid)?,
        dprobs: z(batch * hh * t * t)?,
        dscores: z(batch * hh * t * t)?,
        dpos_patch: z(n * d)?,
        demb: z(batch * n * d)?,
        dcls_rows: z(batch * d)?,
    });
    Ok(())
}

/// `y = x W^T + b` with the weight and bias read from the flat parameters.
#[allow(clippy::too_many_arguments)]
pub(super) fn linear_fwd(
    gpu: &Gpu,
    params: &Buf,
    w: &std::ops::Range<usize>,
    b: Option<&std::ops::Range<usize>>,
    x: &impl DevicePtr<f32>,
    (rows, inp, out): (usize, usize, usize),
    y: &mut impl DevicePtrMut<f32>,
) -> R<()> {
    gpu.linear_forward(x, &params.slice(w.clone()), rows, inp, out, y)?;
    if let Some(b) = b {
        gpu.bias_add(y, &params.slice(b.clone()), rows, out)?;
    }
    Ok(())
}

/// Linear backward: `dx += dy W` (if `dx`), `dW += dy^T x`, `db += sum dy`.
#[allow(clippy::too_many_arguments)]
pub(super) fn linear_bwd(
    gpu: &Gpu,
    params: &Buf,
    grads: &mut Buf,
    w: &std::ops::Range<usize>,
    b: Option<&std::ops::Range<usize>>,
    x: &impl DevicePtr<f32>,
    dy: &impl DevicePtr<f32>,
    (rows, inp, out): (usize, usize, usize),
    dx: Option<&mut Buf>,
) -> R<()> {
    // The CPU computes dx, then dW, then db; the order does not matter
    // (separate buffers), but keep it.
    if let Some(dx) = dx {
        gpu.linear_backward_input(dy, &params.slice(w.clone()), rows, inp, out, dx)?;
    }
    gpu.linear_backward_weight(x, dy, rows, inp, out, &mut grads.slice_mut(w.clone()))?;
    if let Some(b) = b {
        gpu.bias_grad(dy, rows, out, &mut grads.slice_mut(b.clone()))?;
    }
    Ok(())
}

/// Layer-norm backward with the scale and shift gradients from the flat
/// gradient buffer (`w` and `b` adjacent, `w` first, as every layout has).
#[allow(clippy::too_many_arguments)]
pub(super) fn layer_norm_bwd(
    gpu: &Gpu,
    params: &Buf,
    grads: &mut Buf,
    (w, b): (&std::ops::Range<usize>, &std::ops::Range<usize>),
    x: &Buf,
    (mean, rstd): (&Buf, &Buf),
    dy: &Buf,
    (rows, cols): (usize, usize),
    dx: &mut Buf,
) -> R<()> {
    assert_eq!(w.end, b.start, "norm weight and bias are adjacent");
    let mut wb = grads.slice_mut(w.start..b.end);
    let (mut gw, mut gb) = wb.split_at_mut(w.len());
    gpu.layer_norm_backward(
        x,
        &params.slice(w.clone()),
        mean,
        rstd,
        dy,
        rows,
        cols,
        dx,
        &mut gw,
        &mut gb,
    )
}

/// Forward pass of `batch` images already on the device (`B x 3 x S x S`)
/// into `acts` (shaped by [`prepare`]); `acts.keeps` holds the drop-path
/// factors (all ones for the teacher).
pub(super) fn forward(gpu: &Gpu, vit: &Vit, params: &Buf, images: &Buf, a: &mut VitActs) -> R<()> {
    let c = &vit.cfg;
    let (d, hid, heads) = (c.dim, c.hidden(), c.heads);
    let (batch, n, t) = (a.batch, a.n, a.t);
    let bt = batch * t;
    let pp = c.in_chans * c.patch * c.patch;
    let hd = d / heads;
    let scale = 1.0 / (hd as f32).sqrt();

    // Patch embedding: im2col, one GEMM (into dtmp's first B*n*d as scratch).
    gpu.im2col(images, batch, c.in_chans, a.img, c.patch, &mut a.patches)?;
    {
        let mut emb = a.dtmp.slice_mut(..batch * n * d);
        linear_fwd(
            gpu,
            params,
            &vit.pe_w,
            Some(&vit.pe_b),
            &a.patches,
            (batch * n, pp, d),
            &mut emb,
        )?;
    }
    // pos_full = [cls + pos_0 ; pos_patch].
    let pos = params.slice(vit.pos.clone());
    {
        let (mut p0, mut pp_) = a.pos_full.split_at_mut(d);
        // cls[j] + pos[j], as the CPU (y += 1 * x is exact in the product).
        gpu.copy_rows(&params.slice(vit.cls.clone()), d, &mut p0, d, 1, d, false)?;
        gpu.axpy(&mut p0, &pos.slice(..d), 1.0)?;
        match &a.interp {
            None => gpu.copy_rows(&pos.slice(d..), n * d, &mut pp_, n * d, 1, n * d, false)?,
            Some(m) => {
                let n0 = c.grid() * c.grid();
                gpu.gemm(
                    1,
                    1.0,
                    m,
                    MatView::row_major(n, n0),
                    &pos,
                    MatView::row_major(n0, d).at(d),
                    0.0,
                    &mut pp_,
                    MatView::row_major(n, d),
                )?;
            }
        }
    }
    // x0 = zeros; patch rows = emb; then every row += pos_full.
    {
        let x0 = &mut a.xs[0];
        gpu.fill_zero(x0)?;
        let mut rows = x0.slice_mut(d..);
        gpu.copy_rows(
            &a.dtmp.slice(..batch * n * d),
            n * d,
            &mut rows,
            t * d,
            batch,
            n * d,
            false,
        )?;
        gpu.bias_add(x0, &a.pos_full, batch, t * d)?;
    }

    for (l, (bp, ba)) in vit.blocks.iter().zip(a.blocks.iter_mut()).enumerate() {
        let keep1 = a.keeps.slice((2 * l) * batch..(2 * l + 1) * batch);
        let keep2 = a.keeps.slice((2 * l + 1) * batch..(2 * l + 2) * batch);
        let (head, tail) = a.xs.split_at_mut(l + 1);
        let (x_in, x_out) = (&head[l], &mut tail[0]);
        gpu.layer_norm_forward(
            x_in,
            &params.slice(bp.norm1_w.clone()),
            &params.slice(bp.norm1_b.clone()),
            bt,
            d,
            LN_EPS,
            &mut ba.ln1,
            &mut ba.mean1,
            &mut ba.rstd1,
        )?;
        linear_fwd(
            gpu,
            params,
            &bp.qkv_w,
            Some(&bp.qkv_b),
            &ba.ln1,
            (bt, d, 3 * d),
            &mut ba.qkv,
        )?;
        // Attention: per head, batched over images. Scores scaled in the
        // GEMM (as the CPU), softmax over all heads' rows at once.
        let tok = MatView {
            offset: 0,
            rows: t,
            cols: hd,
            ld: 3 * d,
            batch_stride: t * 3 * d,
            transposed: false,
        };
        let pm = MatView::row_major(t, t).batched(heads * t * t);
        for h in 0..heads {
            gpu.gemm(
                batch,
                scale,
                &ba.qkv,
                tok.at(h * hd),
                &ba.qkv,
                tok.at(d + h * hd).t(),
                0.0,
                &mut ba.probs,
                pm.at(h * t * t),
            )?;
        }
        gpu.softmax_rows_in_place(&mut ba.probs, batch * heads * t, t)?;
        let outv = MatView {
            offset: 0,
            rows: t,
            cols: hd,
            ld: d,
            batch_stride: t * d,
            transposed: false,
        };
        for h in 0..heads {
            gpu.gemm(
                batch,
                1.0,
                &ba.probs,
                pm.at(h * t * t),
                &ba.qkv,
                tok.at(2 * d + h * hd),
                0.0,
                &mut ba.attn,
                outv.at(h * hd),
            )?;
        }
        linear_fwd(
            gpu,
            params,
            &bp.proj_w,
            Some(&bp.proj_b),
            &ba.attn,
            (bt, d, d),
            &mut ba.x_mid,
        )?;
        gpu.residual_keep_add(&mut ba.x_mid, x_in, &keep1, t * d)?;
        gpu.layer_norm_forward(
            &ba.x_mid,
            &params.slice(bp.norm2_w.clone()),
            &params.slice(bp.norm2_b.clone()),
            bt,
            d,
            LN_EPS,
            &mut ba.ln2,
            &mut ba.mean2,
            &mut ba.rstd2,
        )?;
        linear_fwd(
            gpu,
            params,
            &bp.fc1_w,
            Some(&bp.fc1_b),
            &ba.ln2,
            (bt, d, hid),
            &mut ba.h1,
        )?;
        gpu.gelu_forward(&ba.h1, &mut ba.g)?;
        linear_fwd(
            gpu,
            params,
            &bp.fc2_w,
            Some(&bp.fc2_b),
            &ba.g,
            (bt, hid, d),
            x_out,
        )?;
        gpu.residual_keep_add(x_out, &ba.x_mid, &keep2, t * d)?;
    }
    gpu.layer_norm_forward(
        &a.xs[c.depth],
        &params.slice(vit.norm_w.clone()),
        &params.slice(vit.norm_b.clone()),
        bt,
        d,
        LN_EPS,
        &mut a.out,
        &mut a.out_mean,
        &mut a.out_rstd,
    )
}

/// Backward pass: given `dout` (`B*T x D`), adds every parameter's gradient
/// into `grads`.
pub(super) fn backward(
    gpu: &Gpu,
    vit: &Vit,
    params: &Buf,
    a: &mut VitActs,
    dout: &Buf,
    grads: &mut Buf,
) -> R<()> {
    let c = &vit.cfg;
    let (d, hid, heads) = (c.dim, c.hidden(), c.heads);
    let (batch, n, t) = (a.batch, a.n, a.t);
    let bt = batch * t;
    let hd = d / heads;
    let scale = 1.0 / (hd as f32).sqrt();

    gpu.fill_zero(&mut a.dx)?;
    layer_norm_bwd(
        gpu,
        params,
        grads,
        (&vit.norm_w, &vit.norm_b),
        &a.xs[c.depth],
        (&a.out_mean, &a.out_rstd),
        dout,
        (bt, d),
        &mut a.dx,
    )?;
    let tok = MatView {
        offset: 0,
        rows: t,
        cols: hd,
        ld: 3 * d,
        batch_stride: t * 3 * d,
        transposed: false,
    };
    let outv = MatView {
        offset: 0,
        rows: t,
        cols: hd,
        ld: d,
        batch_stride: t * d,
        transposed: false,
    };
    let pm = MatView::row_major(t, t).batched(heads * t * t);
    for (l, (bp, ba)) in vit.blocks.iter().zip(a.blocks.iter()).enumerate().rev() {
        let keep1 = a.keeps.slice((2 * l) * batch..(2 * l + 1) * batch);
        let keep2 = a.keeps.slice((2 * l + 1) * batch..(2 * l + 2) * batch);
        let x_in = &a.xs[l];
        // MLP branch.
        gpu.keep_scale(&a.dx, &keep2, t * d, &mut a.dtmp)?;
        gpu.fill_zero(&mut a.dhid)?;
        linear_bwd(
            gpu,
            params,
            grads,
            &bp.fc2_w,
            Some(&bp.fc2_b),
            &ba.g,
            &a.dtmp,
            (bt, hid, d),
            Some(&mut a.dhid),
        )?;
        // The CPU multiplies in place (d *= gelu'(x)); here into a zeroed
        // second buffer (gelu_backward adds), the same product.
        gpu.fill_zero(&mut a.dhid2)?;
        gpu.gelu_backward(&ba.h1, &a.dhid, &mut a.dhid2)?;
        gpu.fill_zero(&mut a.dattn)?;
        linear_bwd(
            gpu,
            params,
            grads,
            &bp.fc1_w,
            Some(&bp.fc1_b),
            &ba.ln2,
            &a.dhid2,
            (bt, d, hid),
            Some(&mut a.dattn),
        )?;
        layer_norm_bwd(
            gpu,
            params,
            grads,
            (&bp.norm2_w, &bp.norm2_b),
            &ba.x_mid,
            (&ba.mean2, &ba.rstd2),
            &a.dattn,
            (bt, d),
            &mut a.dx,
        )?;
        // Attention branch.
        gpu.keep_scale(&a.dx, &keep1, t * d, &mut a.dtmp)?;
        gpu.fill_zero(&mut a.dattn)?;
        linear_bwd(
            gpu,
            params,
            grads,
            &bp.proj_w,
            Some(&bp.proj_b),
            &ba.attn,
            &a.dtmp,
            (bt, d, d),
            Some(&mut a.dattn),
        )?;
        gpu.fill_zero(&mut a.dqkv)?;
        for h in 0..heads {
            // dP = dO V^T ; dV += P^T dO
            gpu.gemm(
                batch,
                1.0,
                &a.dattn,
                outv.at(h * hd),
                &ba.qkv,
                tok.at(2 * d + h * hd).t(),
                0.0,
                &mut a.dprobs,
                pm.at(h * t * t),
            )?;
            gpu.gemm(
                batch,
                1.0,
                &ba.probs,
                pm.at(h * t * t).t(),
                &a.dattn,
                outv.at(h * hd),
                1.0,
                &mut a.dqkv,
                tok.at(2 * d + h * hd),
            )?;
        }
        // dS = P (dP - rowsum(P dP)), all heads at once.
        gpu.fill_zero(&mut a.dscores)?;
        gpu.softmax_backward_rows(&ba.probs, &a.dprobs, batch * heads * t, t, &mut a.dscores)?;
        for h in 0..heads {
            // dQ += scale dS K ; dK += scale dS^T Q
            gpu.gemm(
                batch,
                scale,
                &a.dscores,
                pm.at(h * t * t),
                &ba.qkv,
                tok.at(d + h * hd),
                1.0,
                &mut a.dqkv,
                tok.at(h * hd),
            )?;
            gpu.gemm(
                batch,
                scale,
                &a.dscores,
                pm.at(h * t * t).t(),
                &ba.qkv,
                tok.at(h * hd),
                1.0,
                &mut a.dqkv,
                tok.at(d + h * hd),
            )?;
        }
        gpu.fill_zero(&mut a.dtmp)?;
        linear_bwd(
            gpu,
            params,
            grads,
            &bp.qkv_w,
            Some(&bp.qkv_b),
            &ba.ln1,
            &a.dqkv,
            (bt, d, 3 * d),
            Some(&mut a.dtmp),
        )?;
        layer_norm_bwd(
            gpu,
            params,
            grads,
            (&bp.norm1_w, &bp.norm1_b),
            x_in,
            (&ba.mean1, &ba.rstd1),
            &a.dtmp,
            (bt, d),
            &mut a.dx,
        )?;
    }

    // Token assembly: x0 = [cls + pos_0 ; embed + pos_patch].
    gpu.copy_rows(&a.dx, t * d, &mut a.dcls_rows, d, batch, d, false)?;
    gpu.bias_grad(
        &a.dcls_rows,
        batch,
        d,
        &mut grads.slice_mut(vit.cls.clone()),
    )?;
    let pos = vit.pos.clone();
    gpu.bias_grad(
        &a.dcls_rows,
        batch,
        d,
        &mut grads.slice_mut(pos.start..pos.start + d),
    )?;
    gpu.copy_rows(
        &a.dx.slice(d..),
        t * d,
        &mut a.demb,
        n * d,
        batch,
        n * d,
        false,
    )?;
    match &a.interp {
        None => gpu.bias_grad(
            &a.demb,
            batch,
            n * d,
            &mut grads.slice_mut(pos.start + d..pos.end),
        )?,
        Some(m) => {
            gpu.fill_zero(&mut a.dpos_patch)?;
            gpu.bias_grad(&a.demb, batch, n * d, &mut a.dpos_patch)?;
            let n0 = c.grid() * c.grid();
            gpu.gemm(
                1,
                1.0,
                m,
                MatView::row_major(n, n0).t(),
                &a.dpos_patch,
                MatView::row_major(n, d),
                1.0,
                &mut grads.slice_mut(pos.start + d..pos.end),
                MatView::row_major(n0, d),
            )?;
        }
    }
    let pp = c.in_chans * c.patch * c.patch;
    linear_bwd(
        gpu,
        params,
        grads,
        &vit.pe_w,
        Some(&vit.pe_b),
        &a.patches,
        &a.demb,
        (batch * n, pp, d),
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::params::ParamLayout;
    use crate::model::vit::{VitActs as CpuActs, VitConfig};
    use rand::SeedableRng;

    /// The GPU engine's host-drawn masks are the CPU forward's, call for
    /// call: two passes (globals then locals) from one generator.
    #[test]
    fn draw_keeps_matches_the_cpu_forward() {
        let cfg = VitConfig {
            img: 8,
            patch: 4,
            dim: 8,
            depth: 3,
            heads: 2,
            mlp_ratio: 2.0,
            drop_path: 0.5,
            in_chans: 3,
        };
        let mut layout = ParamLayout::new();
        let vit = Vit::new(&mut layout, "b.", cfg);
        let mut params = vec![0.0; layout.len()];
        layout.init(&mut params, &mut rand_chacha::ChaCha8Rng::seed_from_u64(1));
        let (b1, b2) = (5, 3);
        let imgs1 = vec![0.1; b1 * 3 * 8 * 8];
        let imgs2 = vec![0.2; b2 * 3 * 4 * 4];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let (mut a1, mut a2) = (CpuActs::default(), CpuActs::default());
        vit.forward(&params, &imgs1, b1, 8, &mut a1, Some(&mut rng));
        vit.forward(&params, &imgs2, b2, 4, &mut a2, Some(&mut rng));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let (mut k1, mut k2) = (Vec::new(), Vec::new());
        draw_keeps(&vit, &mut rng, b1, &mut k1);
        draw_keeps(&vit, &mut rng, b2, &mut k2);
        let mut dropped = 0;
        for (acts, keeps, b) in [(&a1, &k1, b1), (&a2, &k2, b2)] {
            for l in 0..cfg.depth {
                let (c1, c2) = acts.drop_path_keeps(l);
                assert_eq!(
                    c1,
                    &keeps[2 * l * b..(2 * l + 1) * b],
                    "block {l} attention"
                );
                assert_eq!(
                    c2,
                    &keeps[(2 * l + 1) * b..(2 * l + 2) * b],
                    "block {l} mlp"
                );
                dropped += c1.iter().chain(c2).filter(|&&k| k == 0.0).count();
            }
        }
        assert!(dropped > 0, "the test should drop some branches");
    }
}
