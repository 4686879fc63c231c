//! Row-wise and element-wise CPU kernels of the model: im2col, token
//! assembly, drop-path residuals, L2-normalised rows, GELU's gradient in
//! place.

use rayon::prelude::*;

/// `out = x + keep[b] * out`, per image of `per` elements.
pub(super) fn residual_add(out: &mut [f32], x: &[f32], keep: &[f32], per: usize) {
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
pub(super) fn scale_rows(dx: &[f32], keep: &[f32], per: usize, out: &mut [f32]) {
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
pub(super) fn gelu_bwd_in_place(x: &[f32], d: &mut [f32]) {
    d.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(dc, xc)| {
            sere_core::activation::gelu_grad_in_place(xc, dc).expect("equal chunk lengths")
        });
}

/// Non-overlapping `p x p` patches of `B x C x S x S` images as rows of
/// `C*p*p` values in `(c, ky, kx)` order (the order of a conv weight).
pub(super) fn im2col(
    images: &[f32],
    batch: usize,
    ch: usize,
    img: usize,
    p: usize,
    out: &mut [f32],
) {
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

/// `dst` = rows of `src` (width `dim`) divided by their L2 norm, floored at
/// `eps`; the norms go to `norms` (one per row) for the backward pass.
pub(super) fn normalize_rows(
    src: &[f32],
    dim: usize,
    eps: f32,
    dst: &mut [f32],
    norms: &mut [f32],
) {
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

/// Backward of [`normalize_rows`] given its output `y` and norms:
/// `dx = (dy - y (y . dy)) / norm` per row, or `dy / norm` where the norm
/// was floored at `eps` (the divisor is then a constant). Overwrites `dx`,
/// or adds into it with `accumulate`.
pub(super) fn normalize_rows_backward(
    dy: &[f32],
    y: &[f32],
    norms: &[f32],
    dim: usize,
    eps: f32,
    dx: &mut [f32],
    accumulate: bool,
) {
    dx.par_chunks_mut(dim)
        .zip(dy.par_chunks(dim))
        .zip(y.par_chunks(dim).zip(norms.par_iter()))
        .for_each(|((dxr, dyr), (yr, &nr))| {
            let inv = 1.0 / nr;
            let dot: f32 = if nr > eps {
                dyr.iter().zip(yr).map(|(a, b)| a * b).sum()
            } else {
                0.0
            };
            for ((o, &d), &yv) in dxr.iter_mut().zip(dyr).zip(yr) {
                let v = (d - yv * dot) * inv;
                if accumulate {
                    *o += v;
                } else {
                    *o = v;
                }
            }
        });
}

/// Token assembly: per image, row 0 of `x0` is `cls + pos[..d]`, rows
/// `1..` are the patch embeddings plus `pos_patch`.
pub(super) fn embed_tokens(
    emb: &[f32],
    cls: &[f32],
    pos: &[f32],
    pos_patch: &[f32],
    (batch, n, d): (usize, usize, usize),
    x0: &mut [f32],
) {
    let t = n + 1;
    for b in 0..batch {
        let row = &mut x0[b * t * d..(b * t + 1) * d];
        for j in 0..d {
            row[j] = cls[j] + pos[j];
        }
        let rows = &mut x0[(b * t + 1) * d..(b + 1) * t * d];
        let e = &emb[b * n * d..(b + 1) * n * d];
        for ((o, &ev), &pv) in rows.iter_mut().zip(e).zip(pos_patch.iter()) {
            *o = ev + pv;
        }
    }
}

/// Backward of [`embed_tokens`]: CLS rows summed into `gcls` and `gpos0`,
/// patch rows summed over images into `dpos_patch` (overwritten) and copied
/// into `demb`.
pub(super) fn embed_tokens_backward(
    dx: &[f32],
    (batch, n, d): (usize, usize, usize),
    gcls: &mut [f32],
    gpos0: &mut [f32],
    dpos_patch: &mut [f32],
    demb: &mut [f32],
) {
    let t = n + 1;
    for b in 0..batch {
        for j in 0..d {
            gcls[j] += dx[b * t * d + j];
        }
    }
    dpos_patch[..n * d].fill(0.0);
    for b in 0..batch {
        let rows = &dx[(b * t + 1) * d..(b + 1) * t * d];
        for (p, &g) in dpos_patch.iter_mut().zip(rows) {
            *p += g;
        }
    }
    for b in 0..batch {
        for j in 0..d {
            gpos0[j] += dx[b * t * d + j];
        }
    }
    for b in 0..batch {
        demb[b * n * d..(b + 1) * n * d].copy_from_slice(&dx[(b * t + 1) * d..(b + 1) * t * d]);
    }
}
