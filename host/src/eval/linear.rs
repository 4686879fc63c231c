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
use ndarray::{Array1, ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2};
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
    /// The parameter count it was made for (`classes x (dim + 1)`).
    params: usize,
    classes: usize,
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
        Workspace {
            lanes,
            block,
            params: classes * (dim + 1),
            classes,
        }
    }

    /// Scratch for `batch` (its rows, width and classes).
    pub fn for_batch(batch: &ProbeBatch<'_>) -> Self {
        Self::new(batch.y.len(), batch.dim, batch.classes)
    }
}

/// Labelled rows the probe's objective is evaluated on, checked once: `x`
/// (`y.len() x dim`, standard layout, read in place) and labels below
/// `classes`.
#[derive(Debug, Clone, Copy)]
pub struct ProbeBatch<'a> {
    x: &'a [f32],
    y: &'a [u32],
    dim: usize,
    classes: usize,
}

impl<'a> ProbeBatch<'a> {
    /// The rows of `x` labelled `y`; an error when the counts differ, a
    /// label is not below `classes` (at least 1), or `x` is not in standard
    /// layout (make it so with `as_standard_layout`).
    ///
    /// ```rust
    /// use ndarray::array;
    /// use sere_host::eval::linear::ProbeBatch;
    /// let x = array![[1.0f32, 0.0], [0.0, 1.0]];
    /// let batch = ProbeBatch::new(x.view(), &[0, 1], 2)?;
    /// assert_eq!((batch.rows(), batch.dim()), (2, 2));
    /// assert!(ProbeBatch::new(x.view(), &[0, 2], 2).is_err());
    /// assert!(ProbeBatch::new(x.t(), &[0, 1], 2).is_err());
    /// # Ok::<(), sere_host::error::SereError>(())
    /// ```
    pub fn new(x: ArrayView2<'a, f32>, y: &'a [u32], classes: usize) -> Result<Self, SereError> {
        let fail = |m: String| Err(SereError::Other(format!("linear probe: {m}")));
        if x.nrows() != y.len() {
            return fail(format!("{} feature rows but {} labels", x.nrows(), y.len()));
        }
        if classes == 0 {
            return fail("needs at least one class".into());
        }
        if let Some(l) = y.iter().find(|&&l| l as usize >= classes) {
            return fail(format!("label {l}, but there are {classes} classes"));
        }
        let dim = x.ncols();
        let Some(x) = x.to_slice() else {
            return fail("features not in standard (row-major) layout".into());
        };
        Ok(ProbeBatch { x, y, dim, classes })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.y.len()
    }

    /// Feature width.
    pub fn dim(&self) -> usize {
        self.dim
    }
}

/// Training objective at `params` over `batch` and its gradient (written to
/// `grad`, same layout as the parameters: `classes x (dim + 1)`); an error
/// when `params`, `grad` or `ws` were made for another size.
///
/// ```rust
/// use ndarray::array;
/// use sere_host::eval::linear::{loss_grad, ProbeBatch, Workspace};
/// let x = array![[1.0f32], [-1.0]];
/// let batch = ProbeBatch::new(x.view(), &[1, 0], 2)?;
/// let (params, mut grad) = (vec![0.0; 4], vec![0.0; 4]);
/// let mut ws = Workspace::for_batch(&batch);
/// let loss = loss_grad(&batch, 0.0, &params, &mut grad, &mut ws)?;
/// assert!((loss - 2f64.ln()).abs() < 1e-6);
/// assert!(loss_grad(&batch, 0.0, &params[..3], &mut grad, &mut ws).is_err());
/// # Ok::<(), sere_host::error::SereError>(())
/// ```
pub fn loss_grad(
    batch: &ProbeBatch<'_>,
    weight_decay: f32,
    params: &[f32],
    grad: &mut [f32],
    ws: &mut Workspace,
) -> Result<f64, SereError> {
    let p = batch.classes * (batch.dim + 1);
    if params.len() != p || grad.len() != p || ws.params != p || ws.classes != batch.classes {
        return Err(SereError::Other(format!(
            "linear probe: {} parameters, {} gradients and scratch for {} against {p} for \
             {} classes of {} features",
            params.len(),
            grad.len(),
            ws.params,
            batch.classes,
            batch.dim
        )));
    }
    accumulate(batch, params, ws)?;
    let (c, d, n) = (batch.classes, batch.dim, batch.rows());
    grad.fill(0.0);
    let mut loss = 0.0f64;
    for lane in &ws.lanes {
        loss += lane.loss;
        for (g, &v) in grad.iter_mut().zip(&lane.grad) {
            *g += v;
        }
    }
    let mut sq = 0.0f64;
    for (g, &wv) in grad[..c * d].iter_mut().zip(&params[..c * d]) {
        *g += weight_decay * wv;
        sq += (wv as f64) * (wv as f64);
    }
    Ok(loss / n.max(1) as f64 + 0.5 * weight_decay as f64 * sq)
}

/// Each lane's share of the loss and gradient (without the weight decay):
/// blocks `k, k + LANES, ...` of rows go to lane `k`.
fn accumulate(batch: &ProbeBatch<'_>, params: &[f32], ws: &mut Workspace) -> Result<(), SereError> {
    let (x, y) = (batch.x, batch.y);
    let (n, c, d) = (y.len(), batch.classes, batch.dim);
    let block = ws.block;
    let n_blocks = n.div_ceil(block);
    let inv_n = 1.0 / n.max(1) as f32;
    let (w, b) = params.split_at(c * d);
    ws.lanes
        .par_iter_mut()
        .enumerate()
        .try_for_each(|(k, lane)| {
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
                )?;
                softmax_residuals(z, &y[r0..r0 + rows], b, inv_n, &mut lane.loss);
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
                )?;
                for zr in z.chunks_exact(c) {
                    for (g, &v) in gb.iter_mut().zip(zr) {
                        *g += v;
                    }
                }
            }
            Ok::<(), SereError>(())
        })
}

/// Turns a block's logits `z` (a row per label of `y`, biases `b` not yet
/// added) into the cross-entropy's gradient `(softmax - onehot) / n`
/// (`inv_n` = 1/n), adding each row's cross-entropy to `loss` in turn.
fn softmax_residuals(z: &mut [f32], y: &[u32], b: &[f32], inv_n: f32, loss: &mut f64) {
    for (zr, &label) in z.chunks_exact_mut(b.len()).zip(y) {
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
        *loss += (s.ln() + m - zy) as f64;
        let scale = inv_n / s;
        for v in zr.iter_mut() {
            *v *= scale;
        }
        zr[label as usize] -= inv_n;
    }
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

    /// Predicted class (arg-max logit, lowest index on ties) of every row
    /// of `x` (`rows x dim`, any layout: a copy is made of one not in
    /// standard order); an error when the widths differ.
    ///
    /// ```rust
    /// use ndarray::array;
    /// use sere_host::eval::linear::LinearProbe;
    /// // W = [[1, 0], [0, 1]], b = [0, 0]: the larger coordinate wins.
    /// let probe = LinearProbe { dim: 2, classes: 2, params: vec![1.0, 0.0, 0.0, 1.0, 0.0, 0.0] };
    /// assert_eq!(probe.predict(array![[2.0f32, 1.0], [0.0, 3.0]].view())?, [0, 1]);
    /// assert!(probe.predict(array![[1.0f32]].view()).is_err());
    /// # Ok::<(), sere_host::error::SereError>(())
    /// ```
    pub fn predict(&self, x: ArrayView2<f32>) -> Result<Vec<u32>, SereError> {
        let (c, d) = (self.classes, self.dim);
        if x.ncols() != d || c == 0 || self.params.len() != c * (d + 1) {
            return Err(SereError::Other(format!(
                "linear probe of {c} classes x {d} features ({} parameters) cannot score \
                 features of width {}",
                self.params.len(),
                x.ncols()
            )));
        }
        let x = x.as_standard_layout();
        let xs = x
            .as_slice()
            .ok_or_else(|| SereError::Other("linear probe: features not contiguous".into()))?;
        let blocks: Result<Vec<Vec<u32>>, SereError> = (0..x.nrows().div_ceil(MAX_BLOCK))
            .into_par_iter()
            .map(|blk| {
                let rows = MAX_BLOCK.min(x.nrows() - blk * MAX_BLOCK);
                let r0 = blk * MAX_BLOCK * d;
                self.predict_block(&xs[r0..r0 + rows * d], rows)
            })
            .collect();
        Ok(blocks?.concat())
    }

    /// [`LinearProbe::predict`] of `rows` contiguous rows `xb`.
    fn predict_block(&self, xb: &[f32], rows: usize) -> Result<Vec<u32>, SereError> {
        let (c, d) = (self.classes, self.dim);
        let (w, b) = self.params.split_at(c * d);
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
        )?;
        let best = |zr: &[f32]| {
            let mut best = 0;
            for j in 1..c {
                if zr[j] + b[j] > zr[best] + b[best] {
                    best = j;
                }
            }
            best as u32
        };
        Ok(z.chunks_exact(c).map(best).collect())
    }

    /// Top-1 accuracy on `x` (`y.len() x dim`); an error when the rows and
    /// labels, or the widths, differ.
    ///
    /// ```rust
    /// use ndarray::array;
    /// use sere_host::eval::linear::LinearProbe;
    /// let probe = LinearProbe { dim: 1, classes: 2, params: vec![-1.0, 1.0, 0.0, 0.0] };
    /// let x = array![[1.0f32], [-1.0], [2.0]];
    /// assert_eq!(probe.accuracy(x.view(), &[1, 0, 0])?, 2.0 / 3.0);
    /// assert!(probe.accuracy(x.view(), &[1]).is_err());
    /// # Ok::<(), sere_host::error::SereError>(())
    /// ```
    pub fn accuracy(&self, x: ArrayView2<f32>, y: &[u32]) -> Result<f32, SereError> {
        if x.nrows() != y.len() {
            return Err(SereError::Other(format!(
                "linear probe: {} feature rows but {} labels",
                x.nrows(),
                y.len()
            )));
        }
        if y.is_empty() {
            return Ok(0.0);
        }
        let hits = self
            .predict(x)?
            .iter()
            .zip(y)
            .filter(|(p, l)| p == l)
            .count();
        Ok(hits as f32 / y.len() as f32)
    }
}

/// Checks a labelled feature matrix (`y.len() x dim`) before fitting or
/// scoring.
fn check(x: &ArrayView2<f32>, y: &[u32], classes: usize, what: &str) -> Result<(), SereError> {
    let fail = |m: String| Err(SereError::Other(format!("linear probe: {what} {m}")));
    let dim = x.ncols();
    if dim == 0 || classes == 0 {
        return fail(format!("has {dim} features and {classes} classes"));
    }
    if y.is_empty() {
        return fail("has no samples".into());
    }
    if x.nrows() != y.len() {
        return fail(format!(
            "holds {} rows of {dim} for {} labels",
            x.nrows(),
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

/// Fits a probe to `x` (`y.len() x dim`, any layout) with labels
/// `y < classes`.
///
/// ```rust
/// use ndarray::array;
/// use sere_host::eval::linear::{fit, ProbeConfig};
/// let x = array![[1.0f32], [2.0], [-1.0], [-2.0]];
/// let f = fit(x.view(), &[1, 1, 0, 0], 2, &ProbeConfig::default())?;
/// assert_eq!(f.probe.predict(x.view())?, [1, 1, 0, 0]);
/// assert!(fit(x.view(), &[1, 1, 0], 2, &ProbeConfig::default()).is_err());
/// # Ok::<(), sere_host::error::SereError>(())
/// ```
pub fn fit(
    x: ArrayView2<f32>,
    y: &[u32],
    classes: usize,
    cfg: &ProbeConfig,
) -> Result<ProbeFit, SereError> {
    check(&x, y, classes, "training set")?;
    if cfg.epochs == 0 || cfg.weight_decay.is_nan() || cfg.weight_decay < 0.0 {
        return Err(SereError::Other(format!(
            "linear probe: need --epochs >= 1 and --weight-decay >= 0 (got {} and {})",
            cfg.epochs, cfg.weight_decay
        )));
    }
    let x = x.as_standard_layout();
    let batch = ProbeBatch::new(x.view(), y, classes)?;
    let mut probe = LinearProbe::zeros(batch.dim, classes);
    let wd = cfg.weight_decay;
    let (iterations, passes) = match cfg.optimizer {
        Optimizer::Lbfgs => {
            let mut ws = Workspace::for_batch(&batch);
            // The objective cannot fail after the checks; if it does, the
            // first error is returned once L-BFGS stops.
            let mut failed = None;
            let r = lbfgs(
                |p, g| {
                    loss_grad(&batch, wd, p, g, &mut ws).unwrap_or_else(|e| {
                        failed.get_or_insert(e);
                        f64::NAN
                    })
                },
                &mut probe.params,
                cfg.epochs,
            );
            if let Some(e) = failed {
                return Err(e);
            }
            (r.iterations, r.evaluations)
        }
        Optimizer::Sgd => {
            if cfg.batch == 0 || cfg.lr.is_nan() || cfg.lr <= 0.0 {
                return Err(SereError::Other(format!(
                    "linear probe: SGD needs --probe-batch >= 1 and --lr > 0 (got {} and {})",
                    cfg.batch, cfg.lr
                )));
            }
            (sgd(&batch, cfg, &mut probe.params)?, cfg.epochs)
        }
    };
    let mut ws = Workspace::for_batch(&batch);
    let mut grad = vec![0.0; probe.params.len()];
    let loss = loss_grad(&batch, wd, &probe.params, &mut grad, &mut ws)?;
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
/// decay in the gradient) on `data` for `cfg.epochs` epochs; returns the
/// step count.
fn sgd(data: &ProbeBatch<'_>, cfg: &ProbeConfig, params: &mut [f32]) -> Result<usize, SereError> {
    use rand::RngExt;
    let (n, d, x, y) = (data.rows(), data.dim, data.x, data.y);
    let bs = cfg.batch.min(n);
    let steps_per_epoch = n.div_ceil(bs);
    let total = (cfg.epochs * steps_per_epoch).max(1);
    let mut order: Vec<usize> = (0..n).collect();
    let (mut xb, mut yb) = (vec![0.0f32; bs * d], vec![0u32; bs]);
    let (mut grad, mut vel) = (vec![0.0f32; params.len()], vec![0.0f32; params.len()]);
    let mut ws = Workspace::new(bs, d, data.classes);
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
            let xr = ArrayView2::from_shape((rows, d), &xb[..rows * d])
                .map_err(|e| SereError::Other(format!("linear probe: SGD batch: {e}")))?;
            let mini = ProbeBatch::new(xr, &yb[..rows], data.classes)?;
            loss_grad(&mini, cfg.weight_decay, params, &mut grad, &mut ws)?;
            let progress = step as f64 / total as f64;
            let lr = cfg.lr * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())) as f32;
            for ((p, v), &g) in params.iter_mut().zip(vel.iter_mut()).zip(&grad) {
                *v = 0.9 * *v + g;
                *p -= lr * *v;
            }
            step += 1;
        }
    }
    Ok(step)
}

/// Column means and inverse standard deviations of `rows x dim` features
/// (a constant column gets scale 1), summed in f64 row by row.
///
/// ```rust
/// use ndarray::array;
/// use sere_host::eval::linear::column_stats;
/// let (mean, inv_std) = column_stats(array![[1.0f32, 5.0], [3.0, 5.0]].view());
/// assert_eq!((mean, inv_std), (array![2.0, 5.0], array![1.0, 1.0]));
/// ```
pub fn column_stats(x: ArrayView2<f32>) -> (Array1<f32>, Array1<f32>) {
    let dim = x.ncols();
    let rows = x.nrows().max(1) as f64;
    let (mut s1, mut s2) = (vec![0.0f64; dim], vec![0.0f64; dim]);
    for row in x.rows() {
        for ((a, b), &v) in s1.iter_mut().zip(s2.iter_mut()).zip(row) {
            *a += v as f64;
            *b += v as f64 * v as f64;
        }
    }
    let mean: Array1<f32> = s1.iter().map(|&a| (a / rows) as f32).collect();
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

/// `x = (x - mean) * inv_std` per column (rows in parallel when `x` is
/// contiguous); statistics of another width than `x` are an error.
///
/// ```rust
/// use ndarray::array;
/// use sere_host::eval::linear::standardize;
/// let mut x = array![[1.0f32, 4.0], [3.0, 8.0]];
/// standardize(x.view_mut(), array![2.0, 6.0].view(), array![1.0, 0.5].view())?;
/// assert_eq!(x, array![[-1.0, -1.0], [1.0, 1.0]]);
/// assert!(standardize(x.view_mut(), array![0.0].view(), array![1.0].view()).is_err());
/// # Ok::<(), sere_host::error::SereError>(())
/// ```
pub fn standardize(
    mut x: ArrayViewMut2<f32>,
    mean: ArrayView1<f32>,
    inv_std: ArrayView1<f32>,
) -> Result<(), SereError> {
    let d = x.ncols();
    if mean.len() != d || inv_std.len() != d {
        return Err(SereError::Other(format!(
            "linear probe: statistics of {} and {} columns for features of {d}",
            mean.len(),
            inv_std.len()
        )));
    }
    let apply = |mut row: ArrayViewMut1<f32>| {
        for ((v, &m), &s) in row.iter_mut().zip(mean).zip(inv_std) {
            *v = (*v - m) * s;
        }
    };
    match x.as_slice_mut() {
        Some(flat) if d > 0 => flat
            .par_chunks_mut(d)
            .for_each(|r| apply(ArrayViewMut1::from(r))),
        _ => x.rows_mut().into_iter().for_each(apply),
    }
    Ok(())
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
    pub mean: Array1<f32>,
    /// Their inverse standard deviations.
    pub inv_std: Array1<f32>,
}

/// The linear evaluation: standardises both feature sets (`rows x dim`
/// each, in place) with the training columns' mean and standard deviation
/// (an affine change of variables: the classifier stays linear in the
/// given features; it conditions the optimisation and sets the scale the
/// weight decay acts on), fits on `train`, and scores train and test.
///
/// ```rust
/// use ndarray::array;
/// use sere_host::eval::linear::{evaluate, ProbeConfig};
/// let mut train = array![[1.0f32], [2.0], [-1.0], [-2.0]];
/// let mut test = array![[3.0f32], [-3.0]];
/// let cfg = ProbeConfig::default();
/// let r = evaluate(train.view_mut(), &[1, 1, 0, 0], test.view_mut(), &[1, 0], 2, &cfg)?;
/// assert_eq!((r.top1, r.train_top1, r.mean[0]), (1.0, 1.0, 0.0));
/// # Ok::<(), sere_host::error::SereError>(())
/// ```
pub fn evaluate(
    mut train: ArrayViewMut2<f32>,
    train_labels: &[u32],
    mut test: ArrayViewMut2<f32>,
    test_labels: &[u32],
    classes: usize,
    cfg: &ProbeConfig,
) -> Result<ProbeReport, SereError> {
    check(&train.view(), train_labels, classes, "training set")?;
    check(&test.view(), test_labels, classes, "test set")?;
    if train.ncols() != test.ncols() {
        return Err(SereError::Other(format!(
            "linear probe: training features have {} columns, test features {}",
            train.ncols(),
            test.ncols()
        )));
    }
    let (mean, inv_std) = column_stats(train.view());
    standardize(train.view_mut(), mean.view(), inv_std.view())?;
    standardize(test.view_mut(), mean.view(), inv_std.view())?;
    let fit = fit(train.view(), train_labels, classes, cfg)?;
    Ok(ProbeReport {
        top1: fit.probe.accuracy(test.view(), test_labels)?,
        train_top1: fit.probe.accuracy(train.view(), train_labels)?,
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
    pub mean: Array1<f32>,
    /// Column inverse standard deviations applied after.
    pub inv_std: Array1<f32>,
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
        ck.insert("features.mean", &[d], self.mean.to_vec());
        ck.insert("features.inv_std", &[d], self.inv_std.to_vec());
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
        let vector = |name: &str, n: usize| -> Result<Array1<f32>, SereError> {
            let (s, v) = ck.tensor(name)?;
            if *s != [n] {
                return Err(SereError::Other(format!(
                    "{}: {name} has shape {s:?}, not [{n}]",
                    path.display()
                )));
            }
            Ok(Array1::from(v.to_vec()))
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
    /// place with the probe's own statistics); features of another width
    /// than the probe's are an error.
    ///
    /// ```rust
    /// use ndarray::array;
    /// use sere_host::eval::linear::{LinearProbe, SavedProbe};
    /// let saved = SavedProbe {
    ///     probe: LinearProbe { dim: 1, classes: 2, params: vec![-1.0, 1.0, 0.0, 0.0] },
    ///     mean: array![10.0],
    ///     inv_std: array![1.0],
    ///     features: "teacher_cls".into(),
    /// };
    /// let mut x = array![[11.0f32], [9.0]];
    /// assert_eq!(saved.accuracy(x.view_mut(), &[1, 0])?, 1.0);
    /// assert!(saved.accuracy(array![[1.0f32, 2.0]].view_mut(), &[0]).is_err());
    /// # Ok::<(), sere_host::error::SereError>(())
    /// ```
    pub fn accuracy(&self, mut x: ArrayViewMut2<f32>, labels: &[u32]) -> Result<f32, SereError> {
        check(&x.view(), labels, self.probe.classes, "test set")?;
        standardize(x.view_mut(), self.mean.view(), self.inv_std.view())?;
        self.probe.accuracy(x.view(), labels)
    }
}

#[cfg(test)]
mod tests;
