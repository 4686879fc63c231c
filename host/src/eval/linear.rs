//! Linear probe on frozen features: multinomial logistic regression
//! (softmax cross-entropy, weights and bias, L2 weight decay on the
//! weights), fitted full-batch with L-BFGS or with mini-batch SGD
//! (momentum, cosine learning rate).
//!
//! The objective is `mean_i CE(W x_i + b, y_i) + wd / 2 * ||W||^2`; both
//! optimisers minimise it from zero. Rows are processed in blocks spread
//! over a fixed number of accumulation lanes that are summed in lane order,
//! so results are bit-identical for any thread count. Nothing is allocated
//! inside an optimisation loop.

use crate::backend::cpu::gemm;
use rayon::prelude::*;
use sere_core::linalg::MatRef;

use crate::data::rng::{stream, Purpose};
use crate::error::SereError;

mod lbfgs;
pub use lbfgs::{lbfgs, LbfgsRun};

/// Independent gradient accumulators (fixed, so the summation order does
/// not depend on the thread count).
const LANES: usize = 8;
/// Largest number of rows per block (bounds the logits scratch).
const MAX_BLOCK: usize = 256;

/// How the probe is fitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Optimizer {
    /// Full-batch L-BFGS with a backtracking (Armijo) line search.
    Lbfgs,
    /// Mini-batch SGD with momentum 0.9 and a cosine learning rate.
    Sgd,
}

impl Optimizer {
    /// The name as typed on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Optimizer::Lbfgs => "lbfgs",
            Optimizer::Sgd => "sgd",
        }
    }
}

/// Settings of a probe fit.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeConfig {
    /// Optimiser.
    pub optimizer: Optimizer,
    /// L2 penalty `wd / 2 * ||W||^2` on the weights (not the bias).
    pub weight_decay: f32,
    /// Budget in passes over the training set: loss evaluations for
    /// L-BFGS, epochs for SGD.
    pub epochs: usize,
    /// Peak learning rate (SGD only).
    pub lr: f32,
    /// Mini-batch size (SGD only).
    pub batch: usize,
    /// Seed of the SGD shuffle.
    pub seed: u64,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            optimizer: Optimizer::Lbfgs,
            weight_decay: 1e-4,
            epochs: 500,
            lr: 0.1,
            batch: 256,
            seed: 0,
        }
    }
}

/// A fitted probe: `classes x dim` weights then `classes` biases.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearProbe {
    /// Feature width.
    pub dim: usize,
    /// Number of classes.
    pub classes: usize,
    /// `[W (classes x dim, row-major) | b (classes)]`.
    pub params: Vec<f32>,
}

/// Outcome of [`fit`].
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeFit {
    /// The fitted probe.
    pub probe: LinearProbe,
    /// Final value of the full training objective.
    pub loss: f64,
    /// Optimiser iterations (L-BFGS steps or SGD steps).
    pub iterations: usize,
    /// Passes over the training set (loss evaluations or epochs).
    pub passes: usize,
}

/// Per-lane scratch: a block of logits and a gradient accumulator.
struct Lane {
    logits: Vec<f32>,
    grad: Vec<f32>,
    loss: f64,
}

/// Scratch for [`loss_grad`]; its block size is chosen for `rows` rows
/// (any number of rows works, but the summation order, hence the last bits
/// of the result, depends on the block size).
pub struct Workspace {
    lanes: Vec<Lane>,
    block: usize,
}

impl Workspace {
    /// Scratch for problems of about `rows` rows, `dim` features and
    /// `classes` classes.
    pub fn new(rows: usize, dim: usize, classes: usize) -> Self {
        let block = rows.div_ceil(LANES).clamp(1, MAX_BLOCK);
        let lanes = (0..LANES)
            .map(|_| Lane {
                logits: vec![0.0; block * classes],
                grad: vec![0.0; classes * (dim + 1)],
                loss: 0.0,
            })
            .collect();
        Workspace { lanes, block }
    }
}

/// Training objective at `params` over the rows of `x` (`y.len() x dim`)
/// and its gradient (written to `grad`, same layout as the parameters).
/// Panics when the sizes disagree or a label is not below `classes`
/// ([`fit`] and [`evaluate`] check their inputs first).
#[allow(clippy::too_many_arguments)]
pub fn loss_grad(
    x: &[f32],
    y: &[u32],
    dim: usize,
    classes: usize,
    weight_decay: f32,
    params: &[f32],
    grad: &mut [f32],
    ws: &mut Workspace,
) -> f64 {
    let (n, c, d) = (y.len(), classes, dim);
    assert_eq!(x.len(), n * d, "probe features have the wrong size");
    assert_eq!(
        params.len(),
        c * (d + 1),
        "probe parameters have the wrong size"
    );
    let block = ws.block;
    let n_blocks = n.div_ceil(block);
    let inv_n = 1.0 / n.max(1) as f32;
    let (w, b) = params.split_at(c * d);
    ws.lanes.par_iter_mut().enumerate().for_each(|(k, lane)| {
        lane.grad.fill(0.0);
        lane.loss = 0.0;
        for blk in (k..n_blocks).step_by(LANES) {
            let r0 = blk * block;
            let rows = block.min(n - r0);
            let z = &mut lane.logits[..rows * c];
            let xm = MatRef::row_major(n, d);
            let xb = MatRef { rows, ..xm }.at(r0 * d);
            gemm(
                1.0,
                x,
                xb,
                w,
                MatRef::row_major(c, d).transposed(),
                0.0,
                z,
                MatRef::row_major(rows, c),
            )
            .expect("probe logits shapes");
            for (zr, &label) in z.chunks_exact_mut(c).zip(&y[r0..r0 + rows]) {
                let mut m = f32::NEG_INFINITY;
                for (v, &bj) in zr.iter_mut().zip(b) {
                    *v += bj;
                    m = m.max(*v);
                }
                let zy = zr[label as usize];
                let mut s = 0.0f32;
                for v in zr.iter_mut() {
                    *v = (*v - m).exp();
                    s += *v;
                }
                lane.loss += (s.ln() + m - zy) as f64;
                let scale = inv_n / s;
                for v in zr.iter_mut() {
                    *v *= scale;
                }
                zr[label as usize] -= inv_n;
            }
            let (gw, gb) = lane.grad.split_at_mut(c * d);
            gemm(
                1.0,
                z,
                MatRef::row_major(rows, c).transposed(),
                x,
                xb,
                1.0,
                gw,
                MatRef::row_major(c, d),
            )
            .expect("probe gradient shapes");
            for zr in z.chunks_exact(c) {
                for (g, &v) in gb.iter_mut().zip(zr) {
                    *g += v;
                }
            }
        }
    });
    grad.fill(0.0);
    let mut loss = 0.0f64;
    for lane in &ws.lanes {
        loss += lane.loss;
        for (g, &v) in grad.iter_mut().zip(&lane.grad) {
            *g += v;
        }
    }
    let mut sq = 0.0f64;
    for (g, &wv) in grad[..c * d].iter_mut().zip(w) {
        *g += weight_decay * wv;
        sq += (wv as f64) * (wv as f64);
    }
    loss / n.max(1) as f64 + 0.5 * weight_decay as f64 * sq
}

impl LinearProbe {
    /// A zero probe.
    pub fn zeros(dim: usize, classes: usize) -> Self {
        LinearProbe {
            dim,
            classes,
            params: vec![0.0; classes * (dim + 1)],
        }
    }

    /// Predicted class (arg-max logit, lowest index on ties) of every row.
    pub fn predict(&self, x: &[f32]) -> Vec<u32> {
        let (c, d) = (self.classes, self.dim);
        let (w, b) = self.params.split_at(c * d);
        x.par_chunks(MAX_BLOCK * d)
            .flat_map_iter(|xb| {
                let rows = xb.len() / d;
                let mut z = vec![0.0f32; rows * c];
                gemm(
                    1.0,
                    xb,
                    MatRef::row_major(rows, d),
                    w,
                    MatRef::row_major(c, d).transposed(),
                    0.0,
                    &mut z,
                    MatRef::row_major(rows, c),
                )
                .expect("probe logits shapes");
                let preds: Vec<u32> = z
                    .chunks_exact(c)
                    .map(|zr| {
                        let mut best = 0;
                        for j in 1..c {
                            if zr[j] + b[j] > zr[best] + b[best] {
                                best = j;
                            }
                        }
                        best as u32
                    })
                    .collect();
                preds
            })
            .collect()
    }

    /// Top-1 accuracy on `x` (`y.len() x dim`).
    pub fn accuracy(&self, x: &[f32], y: &[u32]) -> f32 {
        if y.is_empty() {
            return 0.0;
        }
        let hits = self
            .predict(x)
            .iter()
            .zip(y)
            .filter(|(p, l)| p == l)
            .count();
        hits as f32 / y.len() as f32
    }
}

/// Checks a labelled feature matrix before fitting or scoring.
fn check(x: &[f32], y: &[u32], dim: usize, classes: usize, what: &str) -> Result<(), SereError> {
    let fail = |m: String| Err(SereError::Other(format!("linear probe: {what} {m}")));
    if dim == 0 || classes == 0 {
        return fail(format!("has {dim} features and {classes} classes"));
    }
    if y.is_empty() {
        return fail("has no samples".into());
    }
    if x.len() != y.len() * dim {
        return fail(format!(
            "holds {} values for {} rows of {dim}",
            x.len(),
            y.len()
        ));
    }
    if let Some(l) = y.iter().find(|&&l| l as usize >= classes) {
        return fail(format!("has label {l}, but there are {classes} classes"));
    }
    if x.iter().any(|v| !v.is_finite()) {
        return fail("has non-finite features".into());
    }
    Ok(())
}

/// Fits a probe to `x` (`y.len() x dim`) with labels `y < classes`.
pub fn fit(
    x: &[f32],
    y: &[u32],
    dim: usize,
    classes: usize,
    cfg: &ProbeConfig,
) -> Result<ProbeFit, SereError> {
    check(x, y, dim, classes, "training set")?;
    if cfg.epochs == 0 || cfg.weight_decay.is_nan() || cfg.weight_decay < 0.0 {
        return Err(SereError::Other(format!(
            "linear probe: need --epochs >= 1 and --weight-decay >= 0 (got {} and {})",
            cfg.epochs, cfg.weight_decay
        )));
    }
    let mut probe = LinearProbe::zeros(dim, classes);
    let wd = cfg.weight_decay;
    let (iterations, passes) = match cfg.optimizer {
        Optimizer::Lbfgs => {
            let mut ws = Workspace::new(y.len(), dim, classes);
            let r = lbfgs(
                |p, g| loss_grad(x, y, dim, classes, wd, p, g, &mut ws),
                &mut probe.params,
                cfg.epochs,
            );
            (r.iterations, r.evaluations)
        }
        Optimizer::Sgd => {
            if cfg.batch == 0 || cfg.lr.is_nan() || cfg.lr <= 0.0 {
                return Err(SereError::Other(format!(
                    "linear probe: SGD needs --probe-batch >= 1 and --lr > 0 (got {} and {})",
                    cfg.batch, cfg.lr
                )));
            }
            (sgd(x, y, dim, classes, cfg, &mut probe.params), cfg.epochs)
        }
    };
    let mut ws = Workspace::new(y.len(), dim, classes);
    let mut grad = vec![0.0; probe.params.len()];
    let loss = loss_grad(x, y, dim, classes, wd, &probe.params, &mut grad, &mut ws);
    if !loss.is_finite() {
        return Err(SereError::Other(format!(
            "linear probe diverged (loss {loss}); lower --lr or use --optimizer lbfgs"
        )));
    }
    Ok(ProbeFit {
        probe,
        loss,
        iterations,
        passes,
    })
}

/// Mini-batch SGD (momentum 0.9, cosine learning rate to zero, weight
/// decay in the gradient) for `cfg.epochs` epochs; returns the step count.
fn sgd(
    x: &[f32],
    y: &[u32],
    dim: usize,
    classes: usize,
    cfg: &ProbeConfig,
    params: &mut [f32],
) -> usize {
    use rand::RngExt;
    let (n, d) = (y.len(), dim);
    let bs = cfg.batch.min(n);
    let steps_per_epoch = n.div_ceil(bs);
    let total = (cfg.epochs * steps_per_epoch).max(1);
    let mut order: Vec<usize> = (0..n).collect();
    let (mut xb, mut yb) = (vec![0.0f32; bs * d], vec![0u32; bs]);
    let (mut grad, mut vel) = (vec![0.0f32; params.len()], vec![0.0f32; params.len()]);
    let mut ws = Workspace::new(bs, dim, classes);
    let mut step = 0;
    for epoch in 0..cfg.epochs {
        let mut rng = stream(cfg.seed, Purpose::Shuffle, epoch as u64, 0x6c_696e);
        for i in (1..n).rev() {
            order.swap(i, rng.random_range(0..=i as u64) as usize);
        }
        for chunk in order.chunks(bs) {
            let rows = chunk.len();
            for (r, &i) in chunk.iter().enumerate() {
                xb[r * d..(r + 1) * d].copy_from_slice(&x[i * d..(i + 1) * d]);
                yb[r] = y[i];
            }
            let (xr, yr) = (&xb[..rows * d], &yb[..rows]);
            loss_grad(
                xr,
                yr,
                dim,
                classes,
                cfg.weight_decay,
                params,
                &mut grad,
                &mut ws,
            );
            let progress = step as f64 / total as f64;
            let lr = cfg.lr * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())) as f32;
            for ((p, v), &g) in params.iter_mut().zip(vel.iter_mut()).zip(&grad) {
                *v = 0.9 * *v + g;
                *p -= lr * *v;
            }
            step += 1;
        }
    }
    step
}

/// Column means and inverse standard deviations of `rows x dim` features
/// (a constant column gets scale 1).
pub fn column_stats(x: &[f32], dim: usize) -> (Vec<f32>, Vec<f32>) {
    let rows = (x.len() / dim.max(1)).max(1) as f64;
    let (mut s1, mut s2) = (vec![0.0f64; dim], vec![0.0f64; dim]);
    for row in x.chunks_exact(dim) {
        for ((a, b), &v) in s1.iter_mut().zip(s2.iter_mut()).zip(row) {
            *a += v as f64;
            *b += v as f64 * v as f64;
        }
    }
    let mean: Vec<f32> = s1.iter().map(|&a| (a / rows) as f32).collect();
    let inv_std = s1
        .iter()
        .zip(&s2)
        .map(|(&a, &b)| {
            let var = (b / rows - (a / rows).powi(2)).max(0.0);
            if var > 1e-12 {
                (1.0 / var.sqrt()) as f32
            } else {
                1.0
            }
        })
        .collect();
    (mean, inv_std)
}

/// `x = (x - mean) * inv_std` per column.
pub fn standardize(x: &mut [f32], mean: &[f32], inv_std: &[f32]) {
    x.par_chunks_mut(mean.len()).for_each(|row| {
        for ((v, &m), &s) in row.iter_mut().zip(mean).zip(inv_std) {
            *v = (*v - m) * s;
        }
    });
}

/// Result of [`evaluate`].
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeReport {
    /// Test top-1 accuracy.
    pub top1: f32,
    /// Training top-1 accuracy.
    pub train_top1: f32,
    /// The fit.
    pub fit: ProbeFit,
    /// The training columns' mean the features were standardised with.
    pub mean: Vec<f32>,
    /// Their inverse standard deviations.
    pub inv_std: Vec<f32>,
}

/// The linear evaluation: standardises both feature sets with the training
/// columns' mean and standard deviation (an affine change of variables:
/// the classifier stays linear in the given features; it conditions the
/// optimisation and sets the scale the weight decay acts on), fits on
/// `train`, and scores train and test.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    train: &mut [f32],
    train_labels: &[u32],
    test: &mut [f32],
    test_labels: &[u32],
    dim: usize,
    classes: usize,
    cfg: &ProbeConfig,
) -> Result<ProbeReport, SereError> {
    check(train, train_labels, dim, classes, "training set")?;
    check(test, test_labels, dim, classes, "test set")?;
    let (mean, inv_std) = column_stats(train, dim);
    standardize(train, &mean, &inv_std);
    standardize(test, &mean, &inv_std);
    let fit = fit(train, train_labels, dim, classes, cfg)?;
    Ok(ProbeReport {
        top1: fit.probe.accuracy(test, test_labels),
        train_top1: fit.probe.accuracy(train, train_labels),
        fit,
        mean,
        inv_std,
    })
}

/// A fitted probe with the standardisation of its features: what
/// `eval linear --save-probe` writes and `--load-probe` scores again.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedProbe {
    /// The probe.
    pub probe: LinearProbe,
    /// Column means subtracted before the probe.
    pub mean: Vec<f32>,
    /// Column inverse standard deviations applied after.
    pub inv_std: Vec<f32>,
    /// The features' name (e.g. `teacher_cls_last4_avgpool`).
    pub features: String,
}

/// The `format` metadata of a saved probe.
pub const PROBE_FORMAT: &str = "sere-linear-probe";

impl SavedProbe {
    /// Writes the probe to `path`, a new file, atomically; `meta` adds
    /// provenance (checkpoint, step, accuracy).
    pub fn save(&self, path: &std::path::Path, meta: &[(&str, String)]) -> Result<(), SereError> {
        use crate::checkpoint::{self, Checkpoint};
        crate::error::refuse_existing("--save-probe", path)?;
        let (c, d) = (self.probe.classes, self.probe.dim);
        let (w, b) = self.probe.params.split_at(c * d);
        let mut ck = Checkpoint::new();
        ck.insert("linear.weight", &[c, d], w.to_vec());
        ck.insert("linear.bias", &[c], b.to_vec());
        ck.insert("features.mean", &[d], self.mean.clone());
        ck.insert("features.inv_std", &[d], self.inv_std.clone());
        ck.set_meta(checkpoint::meta::FORMAT, PROBE_FORMAT);
        ck.set_meta("features", &self.features);
        for (k, v) in meta {
            ck.set_meta(*k, v);
        }
        Ok(ck.save_atomic(path)?)
    }

    /// Reads a probe written by [`SavedProbe::save`], checking its shapes.
    pub fn load(path: &std::path::Path) -> Result<Self, SereError> {
        use crate::checkpoint::{self, Checkpoint};
        let ck = Checkpoint::load(path)?;
        if ck.meta(checkpoint::meta::FORMAT) != Some(PROBE_FORMAT) {
            return Err(SereError::Other(format!(
                "{} is not a probe saved by `sere eval linear --save-probe`",
                path.display()
            )));
        }
        let (shape, w) = ck.tensor("linear.weight")?;
        let [c, d] = *shape else {
            return Err(SereError::Other(format!(
                "{}: linear.weight has shape {shape:?}, not [classes, dim]",
                path.display()
            )));
        };
        let vector = |name: &str, n: usize| -> Result<Vec<f32>, SereError> {
            let (s, v) = ck.tensor(name)?;
            if *s != [n] {
                return Err(SereError::Other(format!(
                    "{}: {name} has shape {s:?}, not [{n}]",
                    path.display()
                )));
            }
            Ok(v.to_vec())
        };
        let mut params = w.to_vec();
        params.extend(vector("linear.bias", c)?);
        Ok(SavedProbe {
            probe: LinearProbe {
                dim: d,
                classes: c,
                params,
            },
            mean: vector("features.mean", d)?,
            inv_std: vector("features.inv_std", d)?,
            features: ck.meta("features").unwrap_or("features").to_string(),
        })
    }

    /// Top-1 accuracy on `x` (`labels.len() x dim`, standardised here in
    /// place with the probe's own statistics).
    pub fn accuracy(&self, x: &mut [f32], labels: &[u32]) -> Result<f32, SereError> {
        let (d, c) = (self.probe.dim, self.probe.classes);
        check(x, labels, d, c, "test set")?;
        standardize(x, &self.mean, &self.inv_std);
        Ok(self.probe.accuracy(x, labels))
    }
}

#[cfg(test)]
mod tests;
