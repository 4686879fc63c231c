//! The host as a library: load a trained (or exported, or timm) backbone and
//! embed images or read its attention maps, as `ndarray` arrays, without the
//! command line.
//!
//! ```
//! use ndarray::Array4;
//! use sere_host::api::Model;
//! use sere_host::config::TrainConfig;
//!
//! // A run's checkpoint, run folder, `sere export` file or timm file loads
//! // with `Model::load(path)`; here, the default model at its initialisation.
//! let model = Model::random_init(&TrainConfig::default())?;
//! // Two 40 x 40 RGB images, 8 bits, height x width x channels each: the
//! // centre square is resized to the model's size and normalised, as
//! // `sere eval` views them.
//! let images = Array4::<u8>::from_elem((2, 40, 40, 3), 128);
//! let features = model.embed_u8(images.view())?;
//! assert_eq!(features.dim(), (2, model.feature_dim()));
//! // The CLS token's attention over the patches in the last block.
//! let side = model.image_size() / model.config().patch;
//! let maps = model.cls_attention_u8(images.view())?;
//! assert_eq!(maps.dim(), (2, model.config().heads, side, side));
//! # Ok::<(), sere_host::error::SereError>(())
//! ```

use std::path::Path;

use ndarray::{Array2, Array4, ArrayView4, Axis};

use crate::backend::{Backend, Cpu};
use crate::checkpoint::{self, Checkpoint};
use crate::config::TrainConfig;
use crate::data::{EvalTransform, Raster};
use crate::error::SereError;
use crate::eval::features::{Embedder, FeatureSpec};

/// Images per forward pass: bounds the activations' memory whatever the
/// number of images given.
const CHUNK: usize = 64;

/// A backbone on a backend, ready to embed images (see the module docs).
pub struct Model<B: Backend = Cpu> {
    emb: Embedder<B>,
}

impl Model<Cpu> {
    /// Loads the teacher backbone of a training checkpoint, the newest
    /// checkpoint of a run folder, a `sere export` file or a timm ViT's
    /// safetensors, on the CPU.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, SereError> {
        let path = path.as_ref();
        let file = if path.is_dir() {
            checkpoint::latest_in(path)
                .map_err(|e| SereError::io("cannot list checkpoints in", path, e))?
                .ok_or_else(|| SereError::Other(format!("no checkpoint in {}", path.display())))?
        } else {
            path.to_path_buf()
        };
        Self::on(Cpu, &Checkpoint::load(&file)?)
    }

    /// The network a run of `cfg` starts from, on the CPU.
    pub fn random_init(cfg: &TrainConfig) -> Result<Self, SereError> {
        cfg.validate()?;
        Ok(Model {
            emb: Embedder::random_init(Cpu, cfg)?,
        })
    }
}

impl<B: Backend> Model<B> {
    /// The teacher backbone of `ck` (or the backbone `ck` is) on `be`.
    pub fn on(be: B, ck: &Checkpoint) -> Result<Self, SereError> {
        Ok(Model {
            emb: Embedder::from_checkpoint(be, ck)?,
        })
    }

    /// The model's configuration (sizes of the ViT).
    pub fn config(&self) -> &TrainConfig {
        self.emb.config()
    }

    /// Side in pixels of the images [`Model::embed`] takes.
    pub fn image_size(&self) -> usize {
        self.emb.config().img
    }

    /// Width of a feature row (the CLS token's).
    pub fn feature_dim(&self) -> usize {
        self.emb.dim()
    }

    /// L2-normalised CLS features (`n x feature_dim`, what `sere eval knn`
    /// scores) of `images`, `n x 3 x S x S` normalised pixels with `S` the
    /// [`Model::image_size`]. Any memory layout is taken (a copy is made
    /// only when the view is not in standard order).
    pub fn embed(&self, images: ArrayView4<f32>) -> Result<Array2<f32>, SereError> {
        let s = self.image_size();
        check_shape(images.dim(), (3, s, s))?;
        let mut out = Array2::zeros((images.len_of(Axis(0)), self.feature_dim()));
        let mut acts = None;
        for (chunk, mut rows) in images
            .axis_chunks_iter(Axis(0), CHUNK)
            .zip(out.axis_chunks_iter_mut(Axis(0), CHUNK))
        {
            // The backend uploads one flat block: copy only a strided view.
            let chunk = chunk.as_standard_layout();
            let f = self
                .emb
                .features(chunk.view(), FeatureSpec::default(), &mut acts)?;
            rows.assign(&f);
        }
        Ok(out)
    }

    /// [`Model::embed`] of 8-bit images, `n x H x W x C` (C 1 or 3; any
    /// size), viewed as `sere eval` views them: the centre square resized
    /// to the model's size, ImageNet-normalised.
    pub fn embed_u8(&self, images: ArrayView4<u8>) -> Result<Array2<f32>, SereError> {
        self.embed(self.views(images)?.view())
    }

    /// The CLS token's attention over the patches in the last block,
    /// `n x heads x G x G` (`G` patches a side), of normalised images as
    /// [`Model::embed`] takes them: the maps `sere visualize` draws.
    pub fn cls_attention(&self, images: ArrayView4<f32>) -> Result<Array4<f32>, SereError> {
        let (cfg, s) = (self.config(), self.image_size());
        check_shape(images.dim(), (3, s, s))?;
        let (heads, g) = (cfg.heads, s / cfg.patch);
        let t = g * g + 1;
        let n = images.len_of(Axis(0));
        let mut out = Array4::zeros((n, heads, g, g));
        let mut acts = None;
        for (chunk, mut maps) in images
            .axis_chunks_iter(Axis(0), CHUNK)
            .zip(out.axis_chunks_iter_mut(Axis(0), CHUNK))
        {
            let chunk = chunk.as_standard_layout();
            self.emb.forward(chunk.view(), &mut acts)?;
            let acts = acts.as_ref().expect("forward shaped it");
            let probs = self
                .emb
                .backend()
                .download(acts.attention(cfg.depth - 1))
                .map_err(|e| SereError::Device(e.to_string()))?;
            // Row 0 (the CLS token) of each head, without its own column.
            for ((b, h, i, j), v) in maps.indexed_iter_mut() {
                *v = probs[((b * heads + h) * t) * t + 1 + i * g + j];
            }
        }
        Ok(out)
    }

    /// [`Model::cls_attention`] of 8-bit images, viewed as
    /// [`Model::embed_u8`] views them.
    pub fn cls_attention_u8(&self, images: ArrayView4<u8>) -> Result<Array4<f32>, SereError> {
        self.cls_attention(self.views(images)?.view())
    }

    /// The evaluation views (`n x 3 x S x S`) of `n x H x W x C` bytes.
    fn views(&self, images: ArrayView4<u8>) -> Result<Array4<f32>, SereError> {
        let (n, h, w, c) = images.dim();
        if n == 0 || h == 0 || w == 0 || !(c == 1 || c == 3) {
            return Err(SereError::Other(format!(
                "images of shape {:?}: need n x height x width x channels with n, height, \
                 width > 0 and 1 or 3 channels",
                images.dim()
            )));
        }
        let s = self.image_size();
        let transform = EvalTransform::new(s);
        let mut out = Array4::zeros((n, 3, s, s));
        for (img, mut view) in images.outer_iter().zip(out.outer_iter_mut()) {
            let raster = Raster::from_array(img.to_owned()).map_err(SereError::data)?;
            view.assign(&transform.apply(&raster).map_err(SereError::data)?);
        }
        Ok(out)
    }
}

/// Checks `n x C x H x W` against `(C, H, W)`.
fn check_shape(
    (n, c, h, w): (usize, usize, usize, usize),
    want: (usize, usize, usize),
) -> Result<(), SereError> {
    if n == 0 || (c, h, w) != want {
        return Err(SereError::Other(format!(
            "images of shape [{n}, {c}, {h}, {w}]: the model takes [n > 0, {}, {}, {}] \
             (normalised, channels first; embed_u8 takes bytes of any size)",
            want.0, want.1, want.2
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::s;

    fn model() -> Model {
        Model::random_init(&TrainConfig::default()).unwrap()
    }

    #[test]
    fn arrays_give_what_the_eval_path_gives() {
        let m = model();
        let size = m.image_size();
        let x = Array4::from_shape_fn((3, 3, size, size), |(b, c, i, j)| {
            ((b * 7 + c * 3 + i * 5 + j) % 11) as f32 / 11.0 - 0.5
        });
        let f = m.embed(x.view()).unwrap();
        let mut acts = None;
        let want = m
            .emb
            .features(x.view(), FeatureSpec::default(), &mut acts)
            .unwrap();
        assert_eq!(f, want);
        // A non-standard view (every other image, reversed) gives those rows.
        let picked = x.slice(s![..;-2, .., .., ..]);
        let g = m.embed(picked).unwrap();
        assert_eq!(g.row(0), f.row(2));
        assert_eq!(g.row(1), f.row(0));
        // Attention rows are distributions over the CLS token and patches.
        let maps = m.cls_attention(x.view()).unwrap();
        let total: f32 = maps.slice(s![0, 0, .., ..]).sum();
        assert!(total > 0.0 && total < 1.0 + 1e-5, "{total}");
    }

    #[test]
    fn bytes_are_viewed_as_the_eval_transform_views_them() {
        let m = model();
        let (h, w) = (20, 30);
        let bytes =
            Array4::from_shape_fn((1, h, w, 3), |(_, i, j, c)| (i * 7 + j * 3 + c * 50) as u8);
        let raster = Raster::from_array(bytes.index_axis(Axis(0), 0).to_owned()).unwrap();
        let px = EvalTransform::new(m.image_size()).apply(&raster).unwrap();
        let want = m.embed(px.view().insert_axis(Axis(0))).unwrap();
        assert_eq!(m.embed_u8(bytes.view()).unwrap(), want);
    }

    #[test]
    fn wrong_shapes_are_errors() {
        let m = model();
        let e = m.embed(Array4::zeros((1, 3, 8, 8)).view()).unwrap_err();
        assert!(
            e.to_string().contains("the model takes [n > 0, 3, 32, 32]"),
            "{e}"
        );
        let e = m.embed_u8(Array4::zeros((1, 8, 8, 2)).view()).unwrap_err();
        assert!(e.to_string().contains("1 or 3 channels"), "{e}");
    }
}
