//! The plain evaluation view for k-NN and linear probing: a centred square
//! crop resized to `S x S` and normalised, with no randomness, and batched
//! iteration over a split with its labels (the last batch may be short).

use ndarray::{Array3, Array4};
use rayon::prelude::*;

use super::augment::{colour, resize_crop, PixelRect, IMAGENET_MEAN, IMAGENET_STD};
use super::dataset::{Raster, Split};
use super::error::{DataError, Result};

/// Centre crop + resize + normalise.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalTransform {
    /// Output side in pixels.
    pub size: usize,
    /// Side of the centre square as a fraction of the image's shorter side:
    /// 1.0 keeps the whole square centre (small images); 0.875 is the usual
    /// ImageNet `Resize(256) + CenterCrop(224)`.
    pub crop_fraction: f32,
    /// Per-channel mean.
    pub mean: [f32; 3],
    /// Per-channel standard deviation.
    pub std: [f32; 3],
}

impl EvalTransform {
    /// `size` px, whole centre square, ImageNet normalisation.
    pub fn new(size: usize) -> Self {
        EvalTransform {
            size,
            crop_fraction: 1.0,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }

    /// Floats per image (`3 * size * size`).
    pub fn image_len(&self) -> usize {
        3 * self.size * self.size
    }

    fn validate(&self) -> Result<()> {
        if self.size == 0 || !(self.crop_fraction > 0.0 && self.crop_fraction <= 1.0) {
            return Err(DataError::config(
                "evaluation view",
                format!(
                    "size {} and crop fraction {}; need size > 0 and 0 < fraction <= 1",
                    self.size, self.crop_fraction
                ),
            ));
        }
        Ok(())
    }

    /// The centre square this transform takes from a `width x height` image.
    pub fn crop_rect(&self, width: usize, height: usize) -> PixelRect {
        let short = width.min(height);
        let side = ((short as f32 * self.crop_fraction).round() as usize).clamp(1, short);
        PixelRect {
            x: (width - side) / 2,
            y: (height - side) / 2,
            w: side,
            h: side,
        }
    }

    /// Writes the view of `img` into `out` (`3 * size * size`, CHW).
    pub fn apply_into(&self, img: &Raster, out: &mut [f32]) {
        resize_crop(
            img,
            self.crop_rect(img.width(), img.height()),
            self.size,
            false,
            out,
        );
        colour::normalize(out, self.mean, self.std);
    }

    /// The view of `img` in a new array shaped `(3, size, size)`.
    ///
    /// ```rust
    /// use sere_host::data::{EvalTransform, Raster};
    /// let img = Raster::new(12, 8, 1, vec![255; 12 * 8])?;
    /// let view = EvalTransform::new(4).apply(&img)?;
    /// assert_eq!(view.dim(), (3, 4, 4));
    /// # Ok::<(), sere_host::data::DataError>(())
    /// ```
    pub fn apply(&self, img: &Raster) -> Result<Array3<f32>> {
        let mut out = vec![0.0; self.image_len()];
        self.apply_into(img, &mut out);
        Array3::from_shape_vec((3, self.size, self.size), out)
            .map_err(|e| DataError::config("evaluation view", e.to_string()))
    }
}

/// A batch of evaluation views.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalBatch {
    /// Normalised pixels shaped `(n, 3, S, S)` (standard layout).
    pub images: Array4<f32>,
    /// `[n]` labels.
    pub labels: Vec<u32>,
    /// `[n]` sample indices, ascending.
    pub indices: Vec<usize>,
}

impl EvalBatch {
    /// Images in the batch.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Iterates a split in sample order, `batch_size` images at a time, each
/// batch decoded and transformed in parallel on the current rayon pool.
pub struct EvalBatches<'a> {
    split: &'a Split,
    transform: EvalTransform,
    batch_size: usize,
    next: usize,
}

impl<'a> EvalBatches<'a> {
    /// All of `split` in batches of `batch_size`.
    pub fn new(split: &'a Split, transform: EvalTransform, batch_size: usize) -> Result<Self> {
        transform.validate()?;
        if batch_size == 0 {
            return Err(DataError::config(
                "evaluation batch size",
                "0; use at least 1",
            ));
        }
        Ok(EvalBatches {
            split,
            transform,
            batch_size,
            next: 0,
        })
    }

    /// Number of batches in total.
    pub fn n_batches(&self) -> usize {
        self.split.len().div_ceil(self.batch_size)
    }
}

impl EvalBatches<'_> {
    /// Samples `start..end`, decoded and transformed in parallel into one
    /// `(n, 3, S, S)` array (its buffer is allocated once and kept).
    fn batch(&self, start: usize, end: usize) -> Result<EvalBatch> {
        let (len, size) = (self.transform.image_len(), self.transform.size);
        let mut images = vec![0.0f32; (end - start) * len];
        images
            .par_chunks_mut(len)
            .enumerate()
            .try_for_each(|(k, out)| {
                let img = self.split.image(start + k)?;
                self.transform.apply_into(&img, out);
                Ok::<_, DataError>(())
            })?;
        let images = Array4::from_shape_vec((end - start, 3, size, size), images)
            .map_err(|e| DataError::Loader(format!("evaluation batch: {e}; this is a bug")))?;
        Ok(EvalBatch {
            images,
            labels: self.split.labels()[start..end].to_vec(),
            indices: (start..end).collect(),
        })
    }
}

impl Iterator for EvalBatches<'_> {
    type Item = Result<EvalBatch>;

    fn next(&mut self) -> Option<Result<EvalBatch>> {
        let start = self.next;
        let end = (start + self.batch_size).min(self.split.len());
        if start >= end {
            return None;
        }
        let batch = self.batch(start, end);
        // Stop after an error.
        self.next = if batch.is_ok() { end } else { self.split.len() };
        Some(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centre_crop_and_batches() {
        let t = EvalTransform {
            crop_fraction: 0.5,
            ..EvalTransform::new(4)
        };
        assert_eq!(
            t.crop_rect(20, 10),
            PixelRect {
                x: 7,
                y: 2,
                w: 5,
                h: 5
            }
        );
        let data: Vec<u8> = (0..5).flat_map(|i| vec![i as u8 * 50; 6 * 6 * 3]).collect();
        let split = Split::packed(6, 6, 3, data, vec![0, 1, 2, 3, 4]).unwrap();
        let t = EvalTransform {
            mean: [0.0; 3],
            std: [1.0; 3],
            ..EvalTransform::new(3)
        };
        let batches: Vec<EvalBatch> = EvalBatches::new(&split, t, 2)
            .unwrap()
            .map(|b| b.unwrap())
            .collect();
        assert_eq!(batches.len(), 3);
        assert_eq!(batches[2].labels, vec![4]);
        assert_eq!(batches[1].indices, vec![2, 3]);
        // Image 3 is constant 150: its view is 150 / 255 everywhere.
        assert_eq!(batches[1].images.dim(), (2, 3, 3, 3));
        let v = batches[1].images.index_axis(ndarray::Axis(0), 1);
        assert!(v.iter().all(|x| (x - 150.0 / 255.0).abs() < 1e-6));
    }
}
