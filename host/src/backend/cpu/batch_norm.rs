//! Batch norm + ReLU of the SERE heads on the CPU: column statistics with
//! f64 partial sums per rayon task, running-statistics update, and the
//! backward through ReLU and the batch statistics.

use super::{chunk_rows, same};
use crate::backend::{standard, standard_mut, BnMode, OpResult, BN_EPS, BN_MOMENTUM};
use crate::dist::Collective;
use ndarray::{ArrayView2, ArrayViewMut2};
use rayon::prelude::*;

/// `Ok` when a view of `what` is `expected` (`rows x c`).
fn same_dims(what: &'static str, got: (usize, usize), expected: (usize, usize)) -> OpResult {
    same(what, got.0, expected.0)?;
    Ok(same(what, got.1, expected.1)?)
}

/// Sums the per-task partial column sums (`tasks x width`) into the first
/// task's slot and, with a `group`, over every process (SyncBN); returns
/// that slot.
fn reduce_columns<'a>(
    partial: &'a mut [f64],
    width: usize,
    group: Option<&dyn Collective>,
) -> OpResult<&'a mut [f64]> {
    let (first, rest) = partial.split_at_mut(width);
    for p in rest.chunks_exact(width) {
        for (a, &b) in first.iter_mut().zip(p) {
            *a += b;
        }
    }
    if let Some(g) = group {
        g.all_reduce_sum_f64(first)?;
    }
    Ok(first)
}

/// The rows a (synchronised) batch norm normalises over: this process's,
/// or every process's with a group (the world has equal shards).
fn total_rows(rows: usize, group: Option<&dyn Collective>) -> usize {
    rows * group.map_or(1, |g| g.world())
}

/// Column statistics of `x` (`rows x c`) in parallel: `mean`, biased `var`,
/// accumulated in f64 per task (two passes); with a `group`, over every
/// process's rows (each pass's sums all-reduced, so the variance is still
/// taken about the global mean).
fn column_stats(
    x: &[f32],
    (rows, c): (usize, usize),
    group: Option<&dyn Collective>,
    partial: &mut Vec<f64>,
    mean: &mut [f32],
    var: &mut [f32],
) -> OpResult {
    let m = total_rows(rows, group) as f64;
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
    for (mean, s) in mean
        .iter_mut()
        .zip(reduce_columns(partial, c, group)?.iter())
    {
        *mean = (s / m) as f32;
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
    for (var, s) in var
        .iter_mut()
        .zip(reduce_columns(partial, c, group)?.iter())
    {
        *var = (s / m) as f32;
    }
    Ok(())
}

/// The statistics one forward normalises with and keeps for backward.
pub(super) struct Stats<'a> {
    pub mean: &'a mut [f32],
    pub var: &'a mut [f32],
    pub rstd: &'a mut [f32],
    /// The processes the statistics span (SyncBN), or this one alone.
    pub group: Option<&'a dyn Collective>,
}

/// A batch norm's running statistics and the mode that decides whether
/// they are read (eval) or updated (train).
pub(super) struct Running<'a> {
    pub mode: BnMode,
    pub mean: &'a mut [f32],
    pub var: &'a mut [f32],
}

/// `out = ReLU(BN(y))` over `y`'s `rows x c` with the statistics of
/// `running.mode`; in train mode the batch statistics go to `stats` and
/// are folded into the running ones. Both views are standard layout: rows
/// are split into contiguous chunks across threads.
pub(super) fn bn_relu(
    y: ArrayView2<'_, f32>,
    (gamma, beta): (&[f32], &[f32]),
    running: Running<'_>,
    stats: Stats<'_>,
    partial: &mut Vec<f64>,
    out: ArrayViewMut2<'_, f32>,
) -> OpResult {
    let (rows, c) = y.dim();
    same_dims("batch-norm output", out.dim(), y.dim())?;
    let (y, out) = (
        standard(&y, "batch-norm input")?,
        standard_mut(out, "batch-norm output")?,
    );
    let Running {
        mode,
        mean: running_mean,
        var: running_var,
    } = running;
    let Stats {
        mean,
        var,
        rstd,
        group,
    } = stats;
    match mode {
        BnMode::Train => {
            column_stats(y, (rows, c), group, partial, mean, var)?;
            sere_core::norm::batch_norm_update_running(
                mean,
                var,
                total_rows(rows, group),
                BN_MOMENTUM,
                running_mean,
                running_var,
            )?;
        }
        BnMode::Eval => {
            mean.copy_from_slice(running_mean);
            var.copy_from_slice(running_var);
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
                // Zipped, not indexed: no bounds checks, so it vectorises.
                let affine = mean.iter().zip(rstd).zip(gamma.iter().zip(beta));
                for ((o, &yv), ((&m, &r), (&g, &b))) in or.iter_mut().zip(yr).zip(affine) {
                    *o = ((yv - m) * r * g + b).max(0.0);
                }
            }
        });
    Ok(())
}

/// What a train-mode [`bn_relu`] kept for its backward: its input and
/// output (`rows x c`), the batch statistics, and the processes they span.
pub(super) struct Saved<'a> {
    pub y: ArrayView2<'a, f32>,
    pub out: ArrayView2<'a, f32>,
    pub mean: &'a [f32],
    pub rstd: &'a [f32],
    pub group: Option<&'a dyn Collective>,
}

/// Backward of a train-mode [`bn_relu`]: adds into `ggamma` and `gbeta`,
/// overwrites `dy` (the gradient of the batch norm's input). With a
/// `group` (SyncBN) the affine gradients are this process's (the
/// data-parallel gradient mean combines them) while `dy` takes the column
/// sums of every process, as the statistics did (PyTorch's
/// `SyncBatchNorm` backward).
pub(super) fn bn_relu_backward(
    saved: Saved<'_>,
    dout: ArrayView2<'_, f32>,
    gamma: &[f32],
    (ggamma, gbeta): (&mut [f32], &mut [f32]),
    partial: &mut Vec<f64>,
    dy: ArrayViewMut2<'_, f32>,
) -> OpResult {
    let (rows, c) = saved.y.dim();
    for (what, dim) in [
        ("batch-norm output", saved.out.dim()),
        ("batch-norm output gradient", dout.dim()),
        ("batch-norm input gradient", dy.dim()),
    ] {
        same_dims(what, dim, (rows, c))?;
    }
    let (mean, rstd, group) = (saved.mean, saved.rstd, saved.group);
    let y = standard(&saved.y, "batch-norm input")?;
    let out = standard(&saved.out, "batch-norm output")?;
    let dout = standard(&dout, "batch-norm output gradient")?;
    let dy = standard_mut(dy, "batch-norm input gradient")?;
    // Column sums of g = dout * [out > 0] and of g * xhat, per task.
    let rc = chunk_rows(rows, 64);
    let tasks = rows.div_ceil(rc);
    partial.clear();
    partial.resize(tasks * 2 * c, 0.0);
    partial
        .par_chunks_mut(2 * c)
        .zip(y.par_chunks(rc * c))
        .zip(out.par_chunks(rc * c).zip(dout.par_chunks(rc * c)))
        .for_each(|((p, yc), (oc, dc))| {
            let (sg, sgx) = p.split_at_mut(c);
            for ((yr, or), dr) in yc
                .chunks_exact(c)
                .zip(oc.chunks_exact(c))
                .zip(dc.chunks_exact(c))
            {
                // Branch-free over zipped columns, so that it vectorises:
                // ReLU's mask is a coin flip per element, which a branch
                // mispredicts half the time. A masked element adds +0.0 to
                // both sums, which leaves them bit for bit as the branch did.
                let sums = sg.iter_mut().zip(sgx.iter_mut());
                let stats = mean.iter().zip(rstd);
                let row = yr.iter().zip(or).zip(dr);
                for ((s, sx), ((&m, &r), ((&yv, &ov), &dv))) in sums.zip(stats.zip(row)) {
                    let xhat = (yv - m) * r;
                    let on = ov > 0.0;
                    *s += if on { dv as f64 } else { 0.0 };
                    *sx += if on { (dv * xhat) as f64 } else { 0.0 };
                }
            }
        });
    // Reduce into the first task's slot: [sum g | sum g xhat].
    let sums = reduce_columns(partial, 2 * c, None)?;
    for j in 0..c {
        ggamma[j] += sums[c + j] as f32;
        gbeta[j] += sums[j] as f32;
    }
    if let Some(g) = group {
        g.all_reduce_sum_f64(sums)?;
    }
    let sums: &[f64] = sums;
    // dy = gamma rstd (g - (sum g + xhat sum g xhat) / M).
    let inv_m = 1.0 / total_rows(rows, group) as f64;
    dy.par_chunks_mut(rc * c)
        .zip(y.par_chunks(rc * c))
        .zip(out.par_chunks(rc * c).zip(dout.par_chunks(rc * c)))
        .for_each(|((dyc, yc), (oc, dc))| {
            for (((dyr, yr), or), dr) in dyc
                .chunks_exact_mut(c)
                .zip(yc.chunks_exact(c))
                .zip(oc.chunks_exact(c))
                .zip(dc.chunks_exact(c))
            {
                let (sum_g, sum_gx) = sums.split_at(c);
                let stats = mean
                    .iter()
                    .zip(rstd)
                    .zip(gamma.iter().zip(sum_g.iter().zip(sum_gx)));
                let row = dyr.iter_mut().zip(yr.iter().zip(or).zip(dr));
                for ((d, ((&yv, &ov), &dv)), ((&m, &r), (&ga, (&s, &sx)))) in row.zip(stats) {
                    let xhat = (yv - m) * r;
                    let g = if ov > 0.0 { dv } else { 0.0 };
                    let corr = ((s + xhat as f64 * sx) * inv_m) as f32;
                    *d = ga * r * (g - corr);
                }
            }
        });
    Ok(())
}
