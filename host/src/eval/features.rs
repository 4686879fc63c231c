//! Frozen CLS features of a checkpoint's teacher backbone (DINO evaluates
//! the teacher), L2-normalised, for k-NN and linear evaluation.

use crate::checkpoint::Checkpoint;
use crate::config::TrainConfig;
use crate::data::{EvalBatches, EvalTransform, Split};
use crate::error::SereError;
use crate::model::vit::VitActs;
use crate::train::network::SereNet;

/// A backbone restored from a checkpoint, ready to embed images.
pub struct Embedder {
    net: SereNet,
    params: Vec<f32>,
    cfg: TrainConfig,
}

impl Embedder {
    /// Loads the teacher of `ck` (the network the run would be evaluated by).
    pub fn from_checkpoint(ck: &Checkpoint) -> Result<Self, SereError> {
        let cfg = ck.config()?;
        let net = SereNet::new(&cfg);
        let mut params = vec![0.0; net.layout.len()];
        ck.read_params("teacher.", &net.layout, &mut params)?;
        Ok(Embedder { net, params, cfg })
    }

    /// The run's configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// Feature width.
    pub fn dim(&self) -> usize {
        self.cfg.dim
    }

    /// Runs the teacher backbone (no drop-path) on `n` normalised images of
    /// the checkpoint's size (`n x 3 x img x img`, as [`EvalTransform`]
    /// makes them); tokens and attention probabilities land in `acts`.
    pub fn forward(&self, images: &[f32], n: usize, acts: &mut VitActs) {
        self.net
            .vit
            .forward(&self.params, images, n, self.cfg.img, acts, None);
    }

    /// L2-normalised CLS features (`len x dim`) and labels of a split,
    /// images resized to the training crop size.
    pub fn embed(&self, split: &Split, batch: usize) -> Result<(Vec<f32>, Vec<u32>), SereError> {
        let d = self.cfg.dim;
        let img = self.cfg.img;
        let mut feats = Vec::with_capacity(split.len() * d);
        let mut labels = Vec::with_capacity(split.len());
        let mut acts = VitActs::default();
        for b in EvalBatches::new(split, EvalTransform::new(img), batch).map_err(SereError::data)? {
            let b = b.map_err(SereError::data)?;
            let n = b.len();
            self.net
                .vit
                .forward(&self.params, &b.images, n, img, &mut acts, None);
            let t = acts.t;
            for i in 0..n {
                feats.extend_from_slice(&acts.out()[i * t * d..i * t * d + d]);
            }
            labels.extend_from_slice(&b.labels);
        }
        super::knn::l2_normalize_rows(&mut feats, d);
        Ok((feats, labels))
    }
}

/// Raw-pixel features of a split (`len x 3 S^2`, normalised images) and
/// labels: the baseline a learned representation has to beat. Centre them
/// with [`centre_and_normalize`] using the training mean.
pub fn pixel_features(
    split: &Split,
    img: usize,
    batch: usize,
) -> Result<(Vec<f32>, Vec<u32>), SereError> {
    let mut feats = Vec::with_capacity(split.len() * 3 * img * img);
    let mut labels = Vec::with_capacity(split.len());
    for b in EvalBatches::new(split, EvalTransform::new(img), batch).map_err(SereError::data)? {
        let b = b.map_err(SereError::data)?;
        feats.extend_from_slice(&b.images);
        labels.extend_from_slice(&b.labels);
    }
    Ok((feats, labels))
}

/// Subtracts `mean` (one row) from every row of `feats`, then L2-normalises
/// the rows.
pub fn centre_and_normalize(feats: &mut [f32], mean: &[f32]) {
    let d = mean.len();
    for row in feats.chunks_exact_mut(d) {
        for (v, &m) in row.iter_mut().zip(mean) {
            *v -= m;
        }
    }
    super::knn::l2_normalize_rows(feats, d);
}

/// Column means of `rows x d` features.
pub fn column_mean(feats: &[f32], d: usize) -> Vec<f32> {
    let mut mean = vec![0.0f64; d];
    let rows = feats.len() / d.max(1);
    for row in feats.chunks_exact(d) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += v as f64;
        }
    }
    mean.into_iter()
        .map(|m| (m / rows.max(1) as f64) as f32)
        .collect()
}
