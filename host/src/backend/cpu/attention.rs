//! Multi-head self-attention on the CPU: per image (rayon) and head, two
//! GEMMs around a row softmax, and the matching backward.

use super::gemm;
use crate::backend::AttentionShape;
use rayon::prelude::*;
use sere_core::linalg::MatRef;

/// Multi-head self-attention core, parallel over images: for each head,
/// `probs = softmax(q k^T / sqrt(d))` and `attn = probs v`. `qkv` rows are
/// `[3][H][d]` per token (timm's layout); `attn` rows `[H][d]`.
pub(super) fn attention_fwd(
    qkv: &[f32],
    shape: AttentionShape,
    probs: &mut [f32],
    attn: &mut [f32],
) -> sere_core::Result<()> {
    let (batch, t, d, heads) = (shape.batch, shape.tokens, shape.dim, shape.heads);
    let hd = d / heads;
    let scale = 1.0 / (hd as f32).sqrt();
    probs
        .par_chunks_mut(heads * t * t)
        .zip(attn.par_chunks_mut(t * d))
        .enumerate()
        .take(batch)
        .try_for_each(|(b, (pb, ab))| {
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
                gemm(scale, qkv, q, qkv, k.transposed(), 0.0, pb, pm)?;
                sere_core::softmax::softmax_rows_in_place(
                    &mut pb[h * t * t..(h + 1) * t * t],
                    t,
                    t,
                )?;
                let out = MatRef {
                    offset: h * hd,
                    rows: t,
                    cols: hd,
                    row_stride: d,
                    col_stride: 1,
                };
                gemm(1.0, pb, pm, qkv, v, 0.0, ab, out)?;
            }
            Ok(())
        })
}

/// Backward of [`attention_fwd`] from what it kept (`qkv`, `probs`): adds
/// into `dqkv`. `dscores` is scratch of `B x T x T`.
pub(super) fn attention_bwd(
    (qkv, probs): (&[f32], &[f32]),
    dattn: &[f32],
    shape: AttentionShape,
    dscores: &mut [f32],
    dqkv: &mut [f32],
) -> sere_core::Result<()> {
    let (batch, t, d, heads) = (shape.batch, shape.tokens, shape.dim, shape.heads);
    let hd = d / heads;
    let scale = 1.0 / (hd as f32).sqrt();
    dqkv.par_chunks_mut(t * 3 * d)
        .zip(dscores.par_chunks_mut(t * t))
        .enumerate()
        .take(batch)
        .try_for_each(|(b, (dq, ds))| {
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
                gemm(1.0, da, dout, qkv_b, v.transposed(), 0.0, ds, tt)?;
                gemm(1.0, pb, pm.transposed(), da, dout, 1.0, dq, v)?;
                // dS = P * (dP - rowsum(P * dP))
                let p = &pb[h * t * t..(h + 1) * t * t];
                for (pr, dr) in p.chunks_exact(t).zip(ds.chunks_exact_mut(t)) {
                    let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                    for (dv, &pv) in dr.iter_mut().zip(pr) {
                        *dv = pv * (*dv - dot);
                    }
                }
                // dQ += scale dS K ; dK += scale dS^T Q
                gemm(scale, ds, tt, qkv_b, k, 1.0, dq, q)?;
                gemm(scale, ds, tt.transposed(), qkv_b, q, 1.0, dq, k)?;
            }
            Ok(())
        })
}
