//! Layer norm (per row) and batch norm (per column, train mode), forward and
//! backward. Both normalize with the biased variance, as PyTorch does.

use crate::error::{check_len, check_nonzero, shape_product, Error, Result};
use crate::simd::{dot, sum, sum_map, sum_zip3};
use libm::sqrtf;

fn check_eps(eps: f32) -> Result<()> {
    if eps.is_finite() && eps >= 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            what: "eps",
            requirement: "must be finite and >= 0",
        })
    }
}

fn check_matrix(x: usize, rows: usize, cols: usize) -> Result<usize> {
    check_nonzero("rows", rows)?;
    check_nonzero("cols", cols)?;
    let n = shape_product("rows x cols", &[rows, cols])?;
    check_len("x", x, n)?;
    Ok(n)
}

/// Layer norm over each row of `x` (`rows x cols`):
/// `out = (x - mean) * rstd * gamma + beta`. Saves `mean` and `rstd`
/// (`1 / sqrt(var + eps)`, length `rows`) for the backward pass.
///
/// ```
/// use sere_core::norm::layer_norm_forward;
/// let (mut y, mut mean, mut rstd) = ([0.0f32; 2], [0.0f32], [0.0f32]);
/// layer_norm_forward(&[1.0, 3.0], &[1.0, 1.0], &[0.0, 0.0], 1, 2, 0.0, &mut y, &mut mean, &mut rstd).unwrap();
/// assert_eq!((y, mean[0], rstd[0]), ([-1.0, 1.0], 2.0, 1.0));
/// ```
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_forward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    rows: usize,
    cols: usize,
    eps: f32,
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
) -> Result<()> {
    let n = check_matrix(x.len(), rows, cols)?;
    check_eps(eps)?;
    check_len("gamma", gamma.len(), cols)?;
    check_len("beta", beta.len(), cols)?;
    check_len("out", out.len(), n)?;
    check_len("mean", mean.len(), rows)?;
    check_len("rstd", rstd.len(), rows)?;
    let inv = 1.0 / cols as f32;
    layer_norm_rows(x, gamma, beta, cols, eps, inv, out, mean, rstd);
    Ok(())
}

/// Backward of [`layer_norm_forward`]: adds to `dx`, `dgamma` and `dbeta`.
///
/// `dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))` with
/// `dxhat = dy * gamma`.
///
/// ```
/// use sere_core::norm::layer_norm_backward;
/// let (mut dx, mut dg, mut db) = ([0.0f32; 2], [0.0f32; 2], [0.0f32; 2]);
/// // A gradient along the constant direction is removed by the normalization.
/// layer_norm_backward(&[1.0, 3.0], &[1.0, 1.0], &[2.0], &[1.0], &[1.0, 1.0], 1, 2,
///     &mut dx, &mut dg, &mut db).unwrap();
/// assert_eq!(dx, [0.0, 0.0]);
/// assert_eq!(db, [1.0, 1.0]);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward(
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dy: &[f32],
    rows: usize,
    cols: usize,
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Result<()> {
    let n = check_matrix(x.len(), rows, cols)?;
    check_len("gamma", gamma.len(), cols)?;
    check_len("mean", mean.len(), rows)?;
    check_len("rstd", rstd.len(), rows)?;
    check_len("dy", dy.len(), n)?;
    check_len("dx", dx.len(), n)?;
    check_len("dgamma", dgamma.len(), cols)?;
    check_len("dbeta", dbeta.len(), cols)?;
    let inv = 1.0 / cols as f32;
    layer_norm_grad_rows(x, gamma, mean, rstd, dy, cols, inv, dx, dgamma, dbeta);
    Ok(())
}

/// Batch statistics per column of `x` (`rows x cols`, one row per sample or
/// token): `mean` and biased `var` (length `cols`), two-pass for accuracy.
///
/// ```
/// use sere_core::norm::batch_norm_stats;
/// let (mut m, mut v) = ([0.0f32; 2], [0.0f32; 2]);
/// batch_norm_stats(&[1.0, 10.0, 3.0, 10.0], 2, 2, &mut m, &mut v).unwrap();
/// assert_eq!((m, v), ([2.0, 10.0], [1.0, 0.0]));
/// ```
pub fn batch_norm_stats(
    x: &[f32],
    rows: usize,
    cols: usize,
    mean: &mut [f32],
    var: &mut [f32],
) -> Result<()> {
    check_matrix(x.len(), rows, cols)?;
    check_len("mean", mean.len(), cols)?;
    check_len("var", var.len(), cols)?;
    let inv = 1.0 / rows as f32;
    mean.fill(0.0);
    var.fill(0.0);
    for row in x.chunks_exact(cols) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += v;
        }
    }
    mean.iter_mut().for_each(|m| *m *= inv);
    for row in x.chunks_exact(cols) {
        for ((s, &m), &v) in var.iter_mut().zip(mean.iter()).zip(row) {
            *s += (v - m) * (v - m);
        }
    }
    var.iter_mut().for_each(|s| *s *= inv);
    Ok(())
}

/// Train-mode batch norm: computes the batch `mean` and `rstd` per column
/// (saved for backward) and writes `out = (x - mean) * rstd * gamma + beta`.
/// `var` receives the biased batch variance (for the running statistics).
///
/// ```
/// use sere_core::norm::batch_norm_forward;
/// let (mut y, mut m, mut v, mut r) = ([0.0f32; 2], [0.0f32], [0.0f32], [0.0f32]);
/// batch_norm_forward(&[1.0, 3.0], &[1.0], &[0.0], 2, 1, 0.0, &mut y, &mut m, &mut v, &mut r).unwrap();
/// assert_eq!(y, [-1.0, 1.0]);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_forward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    rows: usize,
    cols: usize,
    eps: f32,
    out: &mut [f32],
    mean: &mut [f32],
    var: &mut [f32],
    rstd: &mut [f32],
) -> Result<()> {
    check_eps(eps)?;
    check_len("gamma", gamma.len(), cols)?;
    check_len("beta", beta.len(), cols)?;
    check_len("rstd", rstd.len(), cols)?;
    check_len("out", out.len(), x.len())?;
    batch_norm_stats(x, rows, cols, mean, var)?;
    for (r, &v) in rstd.iter_mut().zip(var.iter()) {
        *r = 1.0 / sqrtf(v + eps);
    }
    for (xr, yr) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
        for j in 0..cols {
            yr[j] = (xr[j] - mean[j]) * rstd[j] * gamma[j] + beta[j];
        }
    }
    Ok(())
}

/// Batch norm in eval mode with running statistics:
/// `out = (x - running_mean) / sqrt(running_var + eps) * gamma + beta`.
///
/// ```
/// use sere_core::norm::batch_norm_eval;
/// let mut y = [0.0f32; 2];
/// batch_norm_eval(&[1.0, 3.0], &[2.0], &[0.5], &[1.0], &[4.0], 2, 1, 0.0, &mut y).unwrap();
/// assert_eq!(y, [0.5, 2.5]);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_eval(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    running_mean: &[f32],
    running_var: &[f32],
    rows: usize,
    cols: usize,
    eps: f32,
    out: &mut [f32],
) -> Result<()> {
    let n = check_matrix(x.len(), rows, cols)?;
    check_eps(eps)?;
    for (what, s) in [
        ("gamma", gamma),
        ("beta", beta),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ] {
        check_len(what, s.len(), cols)?;
    }
    check_len("out", out.len(), n)?;
    for (xr, yr) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
        for j in 0..cols {
            let rs = 1.0 / sqrtf(running_var[j] + eps);
            yr[j] = (xr[j] - running_mean[j]) * rs * gamma[j] + beta[j];
        }
    }
    Ok(())
}

/// PyTorch's running-statistics update after a train-mode batch of `rows`
/// samples: `running = (1 - momentum) * running + momentum * batch`, with the
/// *unbiased* variance `var * rows / (rows - 1)` for `running_var`.
///
/// ```
/// use sere_core::norm::batch_norm_update_running;
/// let (mut rm, mut rv) = ([0.0f32], [1.0f32]);
/// batch_norm_update_running(&[2.0], &[1.0], 2, 0.5, &mut rm, &mut rv).unwrap();
/// assert_eq!((rm[0], rv[0]), (1.0, 1.5));
/// ```
pub fn batch_norm_update_running(
    mean: &[f32],
    var: &[f32],
    rows: usize,
    momentum: f32,
    running_mean: &mut [f32],
    running_var: &mut [f32],
) -> Result<()> {
    check_nonzero("rows", rows)?;
    let cols = mean.len();
    check_len("var", var.len(), cols)?;
    check_len("running_mean", running_mean.len(), cols)?;
    check_len("running_var", running_var.len(), cols)?;
    if !(0.0..=1.0).contains(&momentum) {
        return Err(Error::InvalidArgument {
            what: "momentum",
            requirement: "must be in [0, 1]",
        });
    }
    let unbias = if rows > 1 {
        rows as f32 / (rows - 1) as f32
    } else {
        1.0
    };
    for j in 0..cols {
        running_mean[j] = (1.0 - momentum) * running_mean[j] + momentum * mean[j];
        running_var[j] = (1.0 - momentum) * running_var[j] + momentum * var[j] * unbias;
    }
    Ok(())
}

/// Backward of [`batch_norm_forward`]: adds to `dx`, `dgamma`, `dbeta`.
/// `scratch` (length `2 * cols`) holds the per-column sums of `dy` and
/// `dy * xhat`; its contents on entry are ignored.
///
/// `dx = gamma * rstd / M * (M dy - sum(dy) - xhat sum(dy xhat))`, `M = rows`.
///
/// ```
/// use sere_core::norm::batch_norm_backward;
/// let (mut dx, mut dg, mut db, mut s) = ([0.0f32; 2], [0.0f32], [0.0f32], [0.0f32; 2]);
/// // A constant gradient over the batch is removed by the centring.
/// batch_norm_backward(&[1.0, 3.0], &[1.0], &[2.0], &[1.0], &[1.0, 1.0], 2, 1,
///     &mut dx, &mut dg, &mut db, &mut s).unwrap();
/// assert_eq!((dx, db[0]), ([0.0, 0.0], 2.0));
/// ```
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_backward(
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dy: &[f32],
    rows: usize,
    cols: usize,
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    scratch: &mut [f32],
) -> Result<()> {
    let n = check_matrix(x.len(), rows, cols)?;
    for (what, s) in [("gamma", gamma), ("mean", mean), ("rstd", rstd)] {
        check_len(what, s.len(), cols)?;
    }
    check_len("dy", dy.len(), n)?;
    check_len("dx", dx.len(), n)?;
    check_len("dgamma", dgamma.len(), cols)?;
    check_len("dbeta", dbeta.len(), cols)?;
    check_len("scratch", scratch.len(), 2 * cols)?;
    let (sum_dy, sum_dyx) = scratch.split_at_mut(cols);
    sum_dy.fill(0.0);
    sum_dyx.fill(0.0);
    for (xr, dyr) in x.chunks_exact(cols).zip(dy.chunks_exact(cols)) {
        for j in 0..cols {
            let xhat = (xr[j] - mean[j]) * rstd[j];
            sum_dy[j] += dyr[j];
            sum_dyx[j] += dyr[j] * xhat;
        }
    }
    let inv = 1.0 / rows as f32;
    for ((xr, dyr), dxr) in x
        .chunks_exact(cols)
        .zip(dy.chunks_exact(cols))
        .zip(dx.chunks_exact_mut(cols))
    {
        for j in 0..cols {
            let xhat = (xr[j] - mean[j]) * rstd[j];
            dxr[j] += gamma[j] * rstd[j] * (dyr[j] - (sum_dy[j] + xhat * sum_dyx[j]) * inv);
        }
    }
    for j in 0..cols {
        dgamma[j] += sum_dyx[j];
        dbeta[j] += sum_dy[j];
    }
    Ok(())
}

crate::simd::multiversion! {
    fn layer_norm_rows(
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        cols: usize,
        eps: f32,
        inv: f32,
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
    ) {
        for (r, (xr, yr)) in x
            .chunks_exact(cols)
            .zip(out.chunks_exact_mut(cols))
            .enumerate()
        {
            let mu = sum(xr) * inv;
            let var = sum_map(xr, |v| (v - mu) * (v - mu)) * inv;
            let rs = 1.0 / sqrtf(var + eps);
            for ((y, &v), (&g, &b)) in yr.iter_mut().zip(xr).zip(gamma.iter().zip(beta)) {
                *y = (v - mu) * rs * g + b;
            }
            mean[r] = mu;
            rstd[r] = rs;
        }
    }
}

crate::simd::multiversion! {
    fn layer_norm_grad_rows(
        x: &[f32],
        gamma: &[f32],
        mean: &[f32],
        rstd: &[f32],
        dy: &[f32],
        cols: usize,
        inv: f32,
        dx: &mut [f32],
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) {
        for (r, ((xr, dyr), dxr)) in x
            .chunks_exact(cols)
            .zip(dy.chunks_exact(cols))
            .zip(dx.chunks_exact_mut(cols))
            .enumerate()
        {
            let (mu, rs) = (mean[r], rstd[r]);
            // sum(dy * gamma) and sum(dy * gamma * xhat), xhat = (x - mu) rs.
            let sum_d = dot(dyr, gamma);
            let sum_dx = sum_zip3(xr, dyr, gamma, |v, g, gm| (v - mu) * g * gm) * rs;
            let (mean_d, mean_dx) = (sum_d * inv, sum_dx * inv);
            for ((((&v, &g), out), (dg, db)), &gm) in xr
                .iter()
                .zip(dyr)
                .zip(dxr.iter_mut())
                .zip(dgamma.iter_mut().zip(dbeta.iter_mut()))
                .zip(gamma)
            {
                let xhat = (v - mu) * rs;
                *dg += g * xhat;
                *db += g;
                *out += rs * (g * gm - mean_d - xhat * mean_dx);
            }
        }
    }
}
