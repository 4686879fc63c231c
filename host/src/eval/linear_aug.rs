//! The linear probe of DINO's `eval_linear.py`: SGD on the frozen
//! backbone's features of *augmented* training views (RandomResizedCrop at
//! the training size with scale (0.08, 1) and torchvision's ratios, then a
//! horizontal flip with probability 1/2, ImageNet normalisation), features
//! extracted anew for every mini-batch; scored on the plain centre view of
//! the test split. Slower than [`super::linear::fit`] on fixed features (a
//! forward pass per image per epoch), and what DINO's published linear
//! numbers use.
//!
//! As `eval_linear.py`, the features are not standardised (the saved
//! probe's statistics are the identity); unlike it, they are L2-normalised
//! as every `sere eval` feature is. Views are drawn from per-(seed, epoch,
//! image) streams, so a probe is reproducible.

use ndarray::ArrayView4;
use rand::RngExt;
use rayon::prelude::*;

use super::features::{Embedder, FeatureSpec};
use super::linear::{
    loss_grad, LinearProbe, Optimizer, ProbeBatch, ProbeConfig, ProbeFit, Workspace,
};
use crate::augment::{colour, random_resized_crop, resize_crop, IMAGENET_MEAN, IMAGENET_STD};
use crate::backend::Backend;
use crate::data::rng::{stream, Purpose};
use crate::data::Split;
use crate::error::SereError;

/// torchvision's `RandomResizedCrop` defaults, as `eval_linear.py` uses.
const SCALE: (f32, f32) = (0.08, 1.0);
/// Aspect-ratio range of that crop.
const RATIO: (f32, f32) = (3.0 / 4.0, 4.0 / 3.0);
/// Tag of the probe's shuffle stream (apart from the trainer's).
const SHUFFLE_TAG: u64 = 0x6c69_6e61;

/// Writes the augmented training view of image `i` in `epoch` into `out`.
fn view(split: &Split, i: usize, epoch: usize, seed: u64, size: usize, out: &mut [f32]) {
    let mut rng = stream(seed, Purpose::Augment, epoch as u64, i as u64 ^ SHUFFLE_TAG);
    match split.image(i) {
        Ok(img) => {
            let rect = random_resized_crop(img.width(), img.height(), SCALE, RATIO, &mut rng);
            let flipped = rng.random::<f32>() < 0.5;
            resize_crop(&img, rect, size, flipped, out);
            colour::normalize(out, IMAGENET_MEAN, IMAGENET_STD);
        }
        // Reported by the caller, which decodes the image again.
        Err(_) => out.fill(f32::NAN),
    }
}

/// Fits a probe on augmented views of `split` (see the module docs) with
/// SGD, momentum 0.9 and a cosine learning rate from `cfg.lr` to 0 over
/// `cfg.epochs` epochs of `cfg.batch` images.
pub fn fit_augmented<B: Backend>(
    emb: &Embedder<B>,
    split: &Split,
    spec: FeatureSpec,
    classes: usize,
    cfg: &ProbeConfig,
) -> Result<ProbeFit, SereError> {
    let bad = |m: String| {
        Err(SereError::Other(format!(
            "linear probe with --augment: {m}"
        )))
    };
    if cfg.optimizer != Optimizer::Sgd {
        return bad("it trains by SGD on views drawn anew each batch; add --optimizer sgd".into());
    }
    let positive = |v: f32| v.is_finite() && v > 0.0;
    let bad_decay = cfg.weight_decay.is_nan() || cfg.weight_decay < 0.0;
    if cfg.epochs == 0 || cfg.batch == 0 || !positive(cfg.lr) || bad_decay {
        return bad(format!(
            "need --epochs >= 1, --probe-batch >= 1, --lr > 0 and --weight-decay >= 0 (got {}, {}, {}, {})",
            cfg.epochs, cfg.batch, cfg.lr, cfg.weight_decay
        ));
    }
    let (n, d, size) = (split.len(), spec.dim(emb.dim()), emb.config().img);
    if n == 0 {
        return bad("the training split is empty".into());
    }
    let bs = cfg.batch.min(n);
    let total = (cfg.epochs * n.div_ceil(bs)).max(1);
    let mut probe = LinearProbe::zeros(d, classes);
    let (mut grad, mut vel) = (
        vec![0.0f32; probe.params.len()],
        vec![0.0f32; probe.params.len()],
    );
    let mut images = vec![0.0f32; bs * 3 * size * size];
    let mut labels = vec![0u32; bs];
    let (mut ws, mut acts) = (Workspace::new(bs, d, classes), None);
    let (mut step, mut epoch_loss) = (0usize, 0.0f64);
    let started = std::time::Instant::now();
    for epoch in 0..cfg.epochs {
        let order = crate::data::rng::epoch_order(cfg.seed ^ SHUFFLE_TAG, epoch as u64, n, true);
        epoch_loss = 0.0;
        for chunk in order.chunks(bs) {
            let rows = chunk.len();
            let px = &mut images[..rows * 3 * size * size];
            px.par_chunks_mut(3 * size * size)
                .zip(chunk.par_iter())
                .for_each(|(out, &i)| view(split, i, epoch, cfg.seed, size, out));
            if let Some(r) = px.chunks(3 * size * size).position(|v| v[0].is_nan()) {
                split.image(chunk[r]).map_err(SereError::data)?;
            }
            for (l, &i) in labels.iter_mut().zip(chunk) {
                *l = split.label(i);
            }
            let px = ArrayView4::from_shape((rows, 3, size, size), &*px)
                .map_err(|e| SereError::Other(format!("probe batch: {e}")))?;
            let x = emb.features(px, spec, &mut acts)?;
            let batch = ProbeBatch::new(x.view(), &labels[..rows], classes)?;
            let loss = loss_grad(&batch, cfg.weight_decay, &probe.params, &mut grad, &mut ws)?;
            epoch_loss += loss * rows as f64 / n as f64;
            let progress = step as f64 / total as f64;
            let lr = cfg.lr * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())) as f32;
            for ((p, v), &g) in probe.params.iter_mut().zip(vel.iter_mut()).zip(&grad) {
                *v = 0.9 * *v + g;
                *p -= lr * *v;
            }
            step += 1;
        }
        if !epoch_loss.is_finite() {
            return bad(format!(
                "diverged in epoch {} (loss {epoch_loss}); lower --lr",
                epoch + 1
            ));
        }
        eprintln!(
            "  probe epoch {}/{}: loss {epoch_loss:.4} ({:.1} s)",
            epoch + 1,
            cfg.epochs,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(ProbeFit {
        probe,
        loss: epoch_loss,
        iterations: step,
        passes: cfg.epochs,
    })
}
