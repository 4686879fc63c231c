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
