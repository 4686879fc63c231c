//! DINO's multi-crop augmentation, with each crop's rectangle and flip
//! recorded as a [`CropBox`] so that the spatial relation loss can find
//! where two views overlap.
//!
//! Per image: two global views and `n_local` local views, in that order
//! (view `0`, `1`, then `2 ..`). Each view is RandomResizedCrop (bilinear)
//! -> horizontal flip -> colour jitter (p = 0.8, random order) -> grayscale
//! (p = 0.2) -> Gaussian blur (global 1: always, global 2: p = 0.1, local:
//! p = 0.5) -> solarize (global 2 only, p = 0.2) -> ImageNet normalisation.
//! All randomness comes from the one generator passed in, consumed in a
//! fixed order, so a sample's views depend only on its stream.

pub mod blur;
pub mod colour;
pub mod crop;
pub mod grids;
pub mod mask;

use ndarray::Array3;
use rand::RngExt;
use sere_core::geometry::CropBox;

pub use colour::Jitter;
pub use crop::{random_resized_crop, resize_crop, PixelRect};
pub use grids::{
    batch_pair_grids, image_pair_grids, view_pairs, BatchPairGrids, GridSizes, PairGrid, N_GLOBAL,
};

use crate::data::error::{DataError, Result};
use crate::data::Raster;

/// ImageNet channel means (RGB), used by DINO and iBOT.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations (RGB).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// A uniform draw in `[lo, hi)`; always consumes exactly one `f32`, so the
/// stream's layout does not depend on the bounds.
pub(crate) fn uniform(rng: &mut impl RngExt, lo: f32, hi: f32) -> f32 {
    lo + (hi - lo) * rng.random::<f32>()
}

/// A coin with probability `p`; always consumes exactly one `f32`.
fn coin(rng: &mut impl RngExt, p: f32) -> bool {
    rng.random::<f32>() < p
}

/// The multi-crop recipe. `Default` is DINO's ViT-S/16 setting (224 px
/// globals, 10 locals of 96 px); [`MultiCrop::new`] sets the sizes for
/// smaller images and scales the blur with them.
#[derive(Debug, Clone, PartialEq)]
pub struct MultiCrop {
    /// Side of the global views in pixels.
    pub global_size: usize,
    /// Side of the local views in pixels.
    pub local_size: usize,
    /// Number of local views (may be 0).
    pub n_local: usize,
    /// Area fraction range of global crops (DINO: 0.4 ..= 1.0).
    pub global_scale: (f32, f32),
    /// Area fraction range of local crops (DINO: 0.05 ..= 0.4).
    pub local_scale: (f32, f32),
    /// Aspect ratio range, sampled log-uniformly (3/4 ..= 4/3).
    pub ratio: (f32, f32),
    /// Probability of a horizontal flip.
    pub flip_p: f32,
    /// Colour jitter strengths.
    pub jitter: Jitter,
    /// Probability of applying the colour jitter at all.
    pub jitter_p: f32,
    /// Probability of grayscale.
    pub grayscale_p: f32,
    /// Blur probability for global view 1, global view 2, local views.
    pub blur_p: [f32; 3],
    /// Blur sigma range in pixels of a view whose global size is
    /// `blur_reference` (DINO: 0.1 ..= 2.0 at 224 px).
    pub blur_sigma: (f32, f32),
    /// The global size at which `blur_sigma` holds; sigmas scale by
    /// `global_size / blur_reference`, so a 32-px view is blurred as much
    /// relative to its size as a 224-px one (locals keep DINO's relation of
    /// the same pixel sigma as the globals).
    pub blur_reference: f32,
    /// Probability of solarizing global view 2.
    pub solarize_p: f32,
    /// Solarize threshold in `[0, 1]` (128 / 255).
    pub solarize_threshold: f32,
    /// Per-channel mean subtracted last.
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided last.
    pub std: [f32; 3],
}

impl Default for MultiCrop {
    fn default() -> Self {
        MultiCrop {
            global_size: 224,
            local_size: 96,
            n_local: 10,
            global_scale: (0.4, 1.0),
            local_scale: (0.05, 0.4),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            flip_p: 0.5,
            jitter: Jitter::default(),
            jitter_p: 0.8,
            grayscale_p: 0.2,
            blur_p: [1.0, 0.1, 0.5],
            blur_sigma: (0.1, 2.0),
            blur_reference: 224.0,
            solarize_p: 0.2,
            solarize_threshold: 128.0 / 255.0,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }
}

/// One augmented view: its pixels and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    /// Normalised pixels shaped `(3, size, size)` (CHW, standard layout).
    pub pixels: Array3<f32>,
    /// The crop in source-image pixels, with its flip.
    pub crop: CropBox,
}

impl MultiCrop {
    /// DINO's recipe with the given view sizes and number of local views.
    pub fn new(global_size: usize, local_size: usize, n_local: usize) -> Self {
        MultiCrop {
            global_size,
            local_size,
            n_local,
            ..MultiCrop::default()
        }
    }

    /// Views per image: 2 global + `n_local`.
    pub fn n_views(&self) -> usize {
        N_GLOBAL + self.n_local
    }

    /// Side of view `v`.
    pub fn view_size(&self, v: usize) -> usize {
        if v < N_GLOBAL {
            self.global_size
        } else {
            self.local_size
        }
    }

    /// Floats of view `v` (`3 * size * size`).
    pub fn view_len(&self, v: usize) -> usize {
        3 * self.view_size(v) * self.view_size(v)
    }

    /// Checks sizes, ranges and probabilities.
    pub fn validate(&self) -> Result<()> {
        let err = |what, detail: String| Err(DataError::config(what, detail));
        if self.global_size == 0 || (self.n_local > 0 && self.local_size == 0) {
            return err("crop size", "view sizes must be > 0".into());
        }
        for (what, (lo, hi)) in [
            ("global scale", self.global_scale),
            ("local scale", self.local_scale),
        ] {
            if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
                return err(what, format!("({lo}, {hi}); need 0 < lo <= hi <= 1"));
            }
        }
        let (r0, r1) = self.ratio;
        if !(r0 > 0.0 && r0 <= r1 && r1.is_finite()) {
            return err(
                "aspect ratio range",
                format!("({r0}, {r1}); need 0 < lo <= hi"),
            );
        }
        let ps = [
            self.flip_p,
            self.jitter_p,
            self.grayscale_p,
            self.blur_p[0],
            self.blur_p[1],
            self.blur_p[2],
            self.solarize_p,
        ];
        if ps.iter().any(|p| !(0.0..=1.0).contains(p)) {
            return err(
                "augmentation probability",
                format!("{ps:?}; each must be in [0, 1]"),
            );
        }
        let j = self.jitter;
        if [j.brightness, j.contrast, j.saturation]
            .iter()
            .any(|s| s.is_nan() || *s < 0.0)
            || !(0.0..=0.5).contains(&j.hue)
        {
            return err(
                "colour jitter",
                format!("{j:?}; strengths >= 0, hue in [0, 0.5]"),
            );
        }
        let (s0, s1) = self.blur_sigma;
        if !(s0 > 0.0 && s0 <= s1 && self.blur_reference > 0.0) {
            return err(
                "blur sigma",
                format!("({s0}, {s1}) at {}; need 0 < lo <= hi", self.blur_reference),
            );
        }
        if self.std.iter().any(|s| s.is_nan() || *s <= 0.0) {
            return err("normalisation std", format!("{:?}; must be > 0", self.std));
        }
        Ok(())
    }

    /// Makes view `v` of `img` into `out` (`3 * size * size` floats, CHW)
    /// and returns its crop record.
    pub fn view_into(
        &self,
        img: &Raster,
        v: usize,
        rng: &mut impl RngExt,
        out: &mut [f32],
    ) -> CropBox {
        let (size, scale, blur_p) = match v {
            0 => (self.global_size, self.global_scale, self.blur_p[0]),
            1 => (self.global_size, self.global_scale, self.blur_p[1]),
            _ => (self.local_size, self.local_scale, self.blur_p[2]),
        };
        let rect = random_resized_crop(img.width(), img.height(), scale, self.ratio, rng);
        let flipped = coin(rng, self.flip_p);
        resize_crop(img, rect, size, flipped, out);
        if coin(rng, self.jitter_p) {
            self.jitter.apply(out, rng);
        }
        if coin(rng, self.grayscale_p) {
            colour::grayscale(out);
        }
        if coin(rng, blur_p) {
            let k = self.global_size as f32 / self.blur_reference;
            let sigma = uniform(rng, self.blur_sigma.0, self.blur_sigma.1) * k;
            blur::gaussian_blur(out, size, sigma);
        }
        if v == 1 && coin(rng, self.solarize_p) {
            colour::solarize(out, self.solarize_threshold);
        }
        colour::normalize(out, self.mean, self.std);
        CropBox {
            x: rect.x as f32,
            y: rect.y as f32,
            w: rect.w as f32,
            h: rect.h as f32,
            flipped,
        }
    }

    /// Makes all views of `img` into `outs[v]`, in view order, and returns
    /// their crop records.
    pub fn augment_into(
        &self,
        img: &Raster,
        rng: &mut impl RngExt,
        outs: &mut [&mut [f32]],
    ) -> Vec<CropBox> {
        debug_assert_eq!(outs.len(), self.n_views());
        outs.iter_mut()
            .enumerate()
            .map(|(v, out)| self.view_into(img, v, rng, out))
            .collect()
    }

    /// All views of `img`, each in its own buffer (convenient, one
    /// allocation per view; the loader writes into batch buffers instead).
    ///
    /// ```rust
    /// use sere_host::augment::MultiCrop;
    /// use sere_host::data::{rng, Raster};
    /// let img = Raster::new(20, 10, 3, vec![90; 20 * 10 * 3])?;
    /// let mut rng = rng::stream(0, rng::Purpose::Augment, 0, 0);
    /// let views = MultiCrop::new(16, 8, 2).augment(&img, &mut rng)?;
    /// assert_eq!(views.len(), 4);
    /// assert_eq!((views[0].size(), views[3].pixels.dim()), (16, (3, 8, 8)));
    /// # Ok::<(), sere_host::data::DataError>(())
    /// ```
    pub fn augment(&self, img: &Raster, rng: &mut impl RngExt) -> Result<Vec<View>> {
        (0..self.n_views())
            .map(|v| {
                let size = self.view_size(v);
                let mut pixels = vec![0.0; 3 * size * size];
                let crop = self.view_into(img, v, rng, &mut pixels);
                let pixels = Array3::from_shape_vec((3, size, size), pixels)
                    .map_err(|e| DataError::config("view", e.to_string()))?;
                Ok(View { pixels, crop })
            })
            .collect()
    }
}

impl View {
    /// Side in pixels.
    pub fn size(&self) -> usize {
        self.pixels.dim().1
    }
}

#[cfg(test)]
mod tests;
