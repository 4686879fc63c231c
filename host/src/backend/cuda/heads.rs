//! The heads on the GPU, the same arithmetic as
//! [`crate::model::heads`]: the DINO head (MLP, GELU, L2-normalised
//! bottleneck, weight-normalised last layer) and the SERE heads
//! (projection `ReLU(BN(x))`, predictor `ReLU(BN(x W^T))`), forward and
//! backward side by side.

use super::vit::{linear_bwd, linear_fwd};
use super::{Buf, Gpu, R};
use crate::model::heads::{DinoHead, SereHead, BN_EPS, BN_MOMENTUM, L2_EPS};

/// Device workspace of one DINO head pass over `rows` inputs.
pub(super) struct DinoActs {
    pub rows: usize,
    /// Pre-activation of each MLP layer.
    pre: Vec<Buf>,
    /// GELU of each hidden layer.
    post: Vec<Buf>,
    bnorm: Buf,
    u: Buf,
    w: Buf,
    vnorm: Buf,
    /// Logits, `rows x K`.
    pub logits: Buf,
    du: Buf,
    dw: Buf,
    /// Two scratch buffers of `rows x max(width)` (gradient of a layer's
    /// output and of its input), swapped as the backward walks down.
    da: Buf,
    dh: Buf,
}

/// Shapes a DINO workspace for `rows` inputs (no-op if already so).
pub(super) fn dino_prepare(
    gpu: &Gpu,
    head: &DinoHead,
    acts: &mut Option<DinoActs>,
    rows: usize,
) -> R<()> {
    if acts.as_ref().is_some_and(|a| a.rows == rows) {
        return Ok(());
    }
    let cfg = head.cfg;
    let (bd, k) = (cfg.bottleneck_dim, cfg.out_dim);
    let wmax = head
        .mlp
        .iter()
        .map(|l| l.inp.max(l.out))
        .max()
        .unwrap_or(bd)
        .max(bd);
    let n = head.mlp.len();
    *acts = Some(DinoActs {
        rows,
        pre: head
            .mlp
            .iter()
            .map(|l| gpu.zeros(rows * l.out))
            .collect::<R<_>>()?,
        post: head.mlp[..n - 1]
            .iter()
            .map(|l| gpu.zeros(rows * l.out))
            .collect::<R<_>>()?,
        bnorm: gpu.zeros(rows)?,
        u: gpu.zeros(rows * bd)?,
        w: gpu.zeros(k * bd)?,
        vnorm: gpu.zeros(k)?,
        logits: gpu.zeros(rows * k)?,
        du: gpu.zeros(rows * bd)?,
        dw: gpu.zeros(k * bd)?,
        da: gpu.zeros(rows * wmax)?,
        dh: gpu.zeros(rows * wmax)?,
    });
    Ok(())
}

/// DINO head forward on `x` (`rows x in_dim`, kept by the caller for the
/// backward): logits into `a.logits`.
pub(super) fn dino_forward(
    gpu: &Gpu,
    head: &DinoHead,
    params: &Buf,
    x: &Buf,
    a: &mut DinoActs,
) -> R<()> {
    let cfg = head.cfg;
    let rows = a.rows;
    let n = head.mlp.len();
    for (i, l) in head.mlp.iter().enumerate() {
        let pre = &mut a.pre[i];
        let input: &Buf = if i == 0 { x } else { &a.post[i - 1] };
        linear_fwd(
            gpu,
            params,
            &l.weight,
            Some(&l.bias),
            input,
            (rows, l.inp, l.out),
            pre,
        )?;
        if i + 1 < n {
            gpu.gelu_forward(&a.pre[i], &mut a.post[i])?;
        }
    }
    let (bd, k) = (cfg.bottleneck_dim, cfg.out_dim);
    gpu.l2_normalize_rows(&a.pre[n - 1], rows, bd, L2_EPS, &mut a.u, &mut a.bnorm)?;
    // Weight norm of the last layer: no floor (PyTorch divides by ||v||).
    gpu.l2_normalize_rows(
        &params.slice(head.last_v.clone()),
        k,
        bd,
        0.0,
        &mut a.w,
        &mut a.vnorm,
    )?;
    gpu.linear_forward(&a.u, &a.w, rows, bd, k, &mut a.logits)?;
    Ok(())
}

/// DINO head backward: adds the parameter gradients into `grads` and the
/// input gradient into `dx` (`rows x in_dim`).
#[allow(clippy::too_many_arguments)]
pub(super) fn dino_backward(
    gpu: &Gpu,
    head: &DinoHead,
    params: &Buf,
    x: &Buf,
    a: &mut DinoActs,
    dlogits: &Buf,
    grads: &mut Buf,
    dx: &mut Buf,
) -> R<()> {
    let cfg = head.cfg;
    let rows = a.rows;
    let (bd, k, n) = (cfg.bottleneck_dim, cfg.out_dim, head.mlp.len());
    // logits = u W^T: du = dlogits W, dW = dlogits^T u.
    gpu.fill_zero(&mut a.du)?;
    gpu.linear_backward_input(dlogits, &a.w, rows, bd, k, &mut a.du)?;
    gpu.fill_zero(&mut a.dw)?;
    gpu.linear_backward_weight(&a.u, dlogits, rows, bd, k, &mut a.dw)?;
    // Weight norm: dV += (dW - W (W . dW)) / ||V|| (no clamp).
    gpu.l2_normalize_rows_backward(
        &a.dw,
        &a.w,
        &a.vnorm,
        k,
        bd,
        0.0,
        true,
        &mut grads.slice_mut(head.last_v.clone()),
    )?;
    // L2 normalisation of the bottleneck: da = (du - u (u . du)) / ||b||.
    gpu.l2_normalize_rows_backward(
        &a.du,
        &a.u,
        &a.bnorm,
        rows,
        bd,
        L2_EPS,
        false,
        &mut a.da.slice_mut(..rows * bd),
    )?;
    for i in (0..n).rev() {
        let l = &head.mlp[i];
        if i == 0 {
            let da = a.da.slice(..rows * l.out);
            linear_bwd(
                gpu,
                params,
                grads,
                &l.weight,
                Some(&l.bias),
                x,
                &da,
                (rows, l.inp, l.out),
                Some(dx),
            )?;
        } else {
            // The views of `da` and `dh` are last used before `a.da` is rewritten.
            let da = a.da.slice(..rows * l.out);
            let mut dh = a.dh.slice_mut(..rows * l.inp);
            gpu.fill_zero(&mut dh)?;
            gpu.linear_backward_input(
                &da,
                &params.slice(l.weight.clone()),
                rows,
                l.inp,
                l.out,
                &mut dh,
            )?;
            gpu.linear_backward_weight(
                &a.post[i - 1],
                &da,
                rows,
                l.inp,
                l.out,
                &mut grads.slice_mut(l.weight.clone()),
            )?;
            gpu.bias_grad(&da, rows, l.out, &mut grads.slice_mut(l.bias.clone()))?;
            // da_{i-1} = dh * gelu'(pre_{i-1}), into the other buffer.
            let mut next = a.da.slice_mut(..rows * l.inp);
            gpu.fill_zero(&mut next)?;
            gpu.gelu_backward(&a.pre[i - 1], &a.dh.slice(..rows * l.inp), &mut next)?;
        }
    }
    Ok(())
}

/// Running statistics of one SERE head on the device:
/// `[projection mean, projection var, predictor mean, predictor var]`.
pub(super) struct BnDevice {
    pub stats: [Buf; 4],
}

/// Device workspace of one SERE head pass over `rows` token rows.
pub(super) struct SereActs {
    pub rows: usize,
    /// Predictor's batch-norm input `x W^T`.
    y: Buf,
    /// `ReLU(BN(.))`, `rows x C`.
    pub out: Buf,
    mean: Buf,
    var: Buf,
    rstd: Buf,
    g: Buf,
    dy: Buf,
}

/// Shapes a SERE workspace (no-op if already so).
pub(super) fn sere_prepare(gpu: &Gpu, c: usize, acts: &mut Option<SereActs>, rows: usize) -> R<()> {
    if acts.as_ref().is_some_and(|a| a.rows == rows) {
        return Ok(());
    }
    let n = (rows * c).max(1);
    *acts = Some(SereActs {
        rows,
        y: gpu.zeros(n)?,
        out: gpu.zeros(n)?,
        mean: gpu.zeros(c)?,
        var: gpu.zeros(c)?,
        rstd: gpu.zeros(c)?,
        g: gpu.zeros(n)?,
        dy: gpu.zeros(n)?,
    });
    Ok(())
}

/// `out = ReLU(BN_train(src))` (`src` = the predictor's `a.y` when
/// `None`), folding the batch statistics into the running ones of the
/// projection (`which == 0`) or the predictor (`which == 1`).
#[allow(clippy::too_many_arguments)]
fn bn_relu(
    gpu: &Gpu,
    params: &Buf,
    gamma: &std::ops::Range<usize>,
    beta: &std::ops::Range<usize>,
    src: Option<&Buf>,
    c: usize,
    running: &mut BnDevice,
    which: usize,
    a: &mut SereActs,
) -> R<()> {
    let SereActs {
        rows,
        y,
        out,
        mean,
        var,
        rstd,
        ..
    } = a;
    let rows = *rows;
    let src: &Buf = src.unwrap_or(y);
    gpu.batch_norm_forward(
        src,
        &params.slice(gamma.clone()),
        &params.slice(beta.clone()),
        rows,
        c,
        BN_EPS,
        out,
        mean,
        var,
        rstd,
    )?;
    gpu.relu_in_place(out)?;
    let [m0, v0, m1, v1] = &mut running.stats;
    let (rm, rv) = if which == 0 { (m0, v0) } else { (m1, v1) };
    gpu.batch_norm_update_running(mean, var, rows, BN_MOMENTUM, rm, rv)
}

/// Teacher side: `z = ReLU(BN(x))` on `x` (`rows x C`).
pub(super) fn sere_projection(
    gpu: &Gpu,
    head: &SereHead,
    params: &Buf,
    running: &mut BnDevice,
    x: &Buf,
    a: &mut SereActs,
) -> R<()> {
    bn_relu(
        gpu,
        params,
        &head.proj_gamma,
        &head.proj_beta,
        Some(x),
        head.c,
        running,
        0,
        a,
    )
}

/// Student side: `p = ReLU(BN(x W^T))` on `x` (`rows x C`, kept by the
/// caller for the backward).
pub(super) fn sere_predictor(
    gpu: &Gpu,
    head: &SereHead,
    params: &Buf,
    running: &mut BnDevice,
    x: &Buf,
    a: &mut SereActs,
) -> R<()> {
    let (rows, c) = (a.rows, head.c);
    gpu.linear_forward(
        x,
        &params.slice(head.pred_weight.clone()),
        rows,
        c,
        c,
        &mut a.y,
    )?;
    bn_relu(
        gpu,
        params,
        &head.pred_gamma,
        &head.pred_beta,
        None,
        c,
        running,
        1,
        a,
    )
}

/// Backward of the last [`sere_predictor`] on `x`: adds the parameter
/// gradients into `grads` and the input gradient into `dx`.
#[allow(clippy::too_many_arguments)]
pub(super) fn sere_predictor_backward(
    gpu: &Gpu,
    head: &SereHead,
    params: &Buf,
    x: &Buf,
    a: &mut SereActs,
    dout: &Buf,
    grads: &mut Buf,
    dx: &mut Buf,
) -> R<()> {
    let (rows, c) = (a.rows, head.c);
    // g = dout [out > 0]; then the batch-norm backward on g.
    gpu.relu_backward(&a.out, dout, &mut a.g)?;
    gpu.fill_zero(&mut a.dy)?;
    assert_eq!(
        head.pred_gamma.end, head.pred_beta.start,
        "BN weight and bias are adjacent"
    );
    {
        let mut wb = grads.slice_mut(head.pred_gamma.start..head.pred_beta.end);
        let (mut gg, mut gb) = wb.split_at_mut(c);
        gpu.batch_norm_backward(
            &a.y,
            &params.slice(head.pred_gamma.clone()),
            &a.mean,
            &a.rstd,
            &a.g,
            rows,
            c,
            &mut a.dy,
            &mut gg,
            &mut gb,
        )?;
    }
    gpu.linear_backward_input(
        &a.dy,
        &params.slice(head.pred_weight.clone()),
        rows,
        c,
        c,
        dx,
    )?;
    gpu.linear_backward_weight(
        x,
        &a.dy,
        rows,
        c,
        c,
        &mut grads.slice_mut(head.pred_weight.clone()),
    )
}
