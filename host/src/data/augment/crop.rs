//! RandomResizedCrop: where to crop (torchvision's sampling rule) and the
//! resampling of that rectangle to the view size.
//!
//! The rectangle is in whole source pixels, as torchvision's, and is the one
//! recorded in the view's `CropBox`. Resampling is PIL-style bilinear: a
//! triangle filter over pixel centres that widens when shrinking (so large
//! photos downscale without aliasing) and is plain bilinear interpolation
//! with half-pixel centres when enlarging. Only pixels inside the rectangle
//! contribute, exactly as if the crop were cut out first.

use rand::RngExt;

use super::uniform;
use crate::data::Raster;

/// A crop rectangle in whole source pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelRect {
    /// Left column.
    pub x: usize,
    /// Top row.
    pub y: usize,
    /// Width (> 0).
    pub w: usize,
    /// Height (> 0).
    pub h: usize,
}

/// torchvision's `RandomResizedCrop.get_params`: up to 10 tries of an area
/// fraction uniform in `scale` and an aspect ratio log-uniform in `ratio`,
/// placed uniformly; if none fits, a centre crop with the aspect ratio
/// clamped into `ratio`.
pub fn random_resized_crop(
    width: usize,
    height: usize,
    scale: (f32, f32),
    ratio: (f32, f32),
    rng: &mut impl RngExt,
) -> PixelRect {
    let area = (width * height) as f32;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * uniform(rng, scale.0, scale.1);
        let aspect = uniform(rng, lr0, lr1).exp();
        let w = (target * aspect).sqrt().round() as usize;
        let h = (target / aspect).sqrt().round() as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            let y = rng.random_range(0..=(height - h) as u64) as usize;
            let x = rng.random_range(0..=(width - w) as u64) as usize;
            return PixelRect { x, y, w, h };
        }
    }
    let in_ratio = width as f32 / height as f32;
    let (w, h) = if in_ratio < ratio.0 {
        (
            width,
            ((width as f32 / ratio.0).round() as usize).clamp(1, height),
        )
    } else if in_ratio > ratio.1 {
        (
            ((height as f32 * ratio.1).round() as usize).clamp(1, width),
            height,
        )
    } else {
        (width, height)
    };
    PixelRect {
        x: (width - w) / 2,
        y: (height - h) / 2,
        w,
        h,
    }
}

/// Filter taps of one axis: output `o` reads source `first[o] ..
/// first[o] + count[o]` (relative to the crop start) with weights
/// `weights[o * stride ..]`, which sum to 1.
struct Taps {
    first: Vec<usize>,
    count: Vec<usize>,
    weights: Vec<f32>,
    stride: usize,
}

fn taps(src: usize, out: usize) -> Taps {
    let scale = src as f32 / out as f32;
    let support = scale.max(1.0);
    let stride = 2 * support.ceil() as usize + 2;
    let mut t = Taps {
        first: Vec::with_capacity(out),
        count: Vec::with_capacity(out),
        weights: vec![0.0; out * stride],
        stride,
    };
    for o in 0..out {
        let centre = (o as f32 + 0.5) * scale;
        let lo = ((centre - support).floor().max(0.0) as usize).min(src - 1);
        let hi = ((centre + support).ceil() as usize).clamp(lo + 1, src);
        let hi = hi.min(lo + stride);
        let w = &mut t.weights[o * stride..o * stride + (hi - lo)];
        let mut sum = 0.0;
        for (k, wk) in w.iter_mut().enumerate() {
            let d = ((lo + k) as f32 + 0.5 - centre) / support;
            *wk = (1.0 - d.abs()).max(0.0);
            sum += *wk;
        }
        for wk in w.iter_mut() {
            *wk /= sum;
        }
        t.first.push(lo);
        t.count.push(hi - lo);
    }
    t
}

/// Resamples `rect` of `img` to `size x size` into `out` (CHW, 3 planes,
/// values in `[0, 1]`), mirrored left-right when `flipped`.
pub fn resize_crop(img: &Raster, rect: PixelRect, size: usize, flipped: bool, out: &mut [f32]) {
    debug_assert!(rect.x + rect.w <= img.width() && rect.y + rect.h <= img.height());
    debug_assert_eq!(out.len(), 3 * size * size);
    let tx = taps(rect.w, size);
    let ty = taps(rect.h, size);
    // Horizontal pass over the crop's rows: tmp[row][ox][c].
    let mut tmp = vec![0.0f32; rect.h * size * 3];
    // The flat HWC bytes, indexed directly in this hot loop; a grayscale
    // image steps 0 between channels, reading its one channel three times.
    let (px, ch, width) = (img.as_slice(), img.channels(), img.width());
    let c_step = usize::from(ch == 3);
    for r in 0..rect.h {
        let sy = rect.y + r;
        for ox in 0..size {
            let src_o = if flipped { size - 1 - ox } else { ox };
            let (f, n) = (tx.first[src_o], tx.count[src_o]);
            let w = &tx.weights[src_o * tx.stride..src_o * tx.stride + n];
            let mut acc = [0.0f32; 3];
            for (k, &wk) in w.iter().enumerate() {
                let at = (sy * width + rect.x + f + k) * ch;
                for (c, a) in acc.iter_mut().enumerate() {
                    *a += wk * px[at + c * c_step] as f32;
                }
            }
            let o = (r * size + ox) * 3;
            tmp[o..o + 3].copy_from_slice(&acc);
        }
    }
    // Vertical pass into CHW planes.
    let plane = size * size;
    for oy in 0..size {
        let (f, n) = (ty.first[oy], ty.count[oy]);
        let w = &ty.weights[oy * ty.stride..oy * ty.stride + n];
        for ox in 0..size {
            let mut acc = [0.0f32; 3];
            for (k, &wk) in w.iter().enumerate() {
                let o = ((f + k) * size + ox) * 3;
                for (c, a) in acc.iter_mut().enumerate() {
                    *a += wk * tmp[o + c];
                }
            }
            for (c, a) in acc.iter().enumerate() {
                out[c * plane + oy * size + ox] = (a / 255.0).clamp(0.0, 1.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::rng::{stream, Purpose};

    #[test]
    fn crops_lie_inside_and_cover_the_scale_range() {
        let mut rng = stream(0, Purpose::Augment, 0, 0);
        let (mut lo, mut hi) = (f32::MAX, 0.0f32);
        for i in 0..2000 {
            let (w, h) = (40 + i % 60, 30 + i % 45);
            let r = random_resized_crop(w, h, (0.05, 0.4), (0.75, 4.0 / 3.0), &mut rng);
            assert!(
                r.w > 0 && r.h > 0 && r.x + r.w <= w && r.y + r.h <= h,
                "{r:?} in {w}x{h}"
            );
            let frac = (r.w * r.h) as f32 / (w * h) as f32;
            lo = lo.min(frac);
            hi = hi.max(frac);
        }
        assert!(lo < 0.07 && hi > 0.35 && hi < 0.5, "{lo} {hi}");
    }

    #[test]
    fn centre_crop_fallback_for_extreme_aspect() {
        // A 1-pixel-high strip: no sampled crop fits the ratio range.
        let mut rng = stream(0, Purpose::Augment, 0, 1);
        let r = random_resized_crop(100, 1, (0.9, 1.0), (0.75, 4.0 / 3.0), &mut rng);
        assert_eq!(
            r,
            PixelRect {
                x: 49,
                y: 0,
                w: 1,
                h: 1
            }
        );
    }

    #[test]
    fn identity_resize_copies_pixels() {
        let data: Vec<u8> = (0..4 * 4 * 3).map(|i| (i * 5) as u8).collect();
        let img = Raster::new(4, 4, 3, data).unwrap();
        let mut out = vec![0.0; 3 * 16];
        resize_crop(
            &img,
            PixelRect {
                x: 0,
                y: 0,
                w: 4,
                h: 4,
            },
            4,
            false,
            &mut out,
        );
        for y in 0..4 {
            for x in 0..4 {
                for c in 0..3 {
                    let want = img.get(x, y, c) as f32 / 255.0;
                    assert!((out[c * 16 + y * 4 + x] - want).abs() < 1e-6);
                }
            }
        }
    }

    #[test]
    fn shrinking_averages_the_footprint() {
        // Alternating 0/255 columns shrunk 3x: the middle output pixel sits
        // on a 0 column; point sampling would give 0, the widened triangle
        // filter averages columns 2..=6 with weights 1/3, 2/3, 1, 2/3, 1/3.
        let data: Vec<u8> = (0..81)
            .flat_map(|i| {
                let v = if (i % 9) % 2 == 0 { 0 } else { 255 };
                [v, v, v]
            })
            .collect();
        let img = Raster::new(9, 9, 3, data).unwrap();
        let mut out = vec![0.0; 3 * 9];
        resize_crop(
            &img,
            PixelRect {
                x: 0,
                y: 0,
                w: 9,
                h: 9,
            },
            3,
            false,
            &mut out,
        );
        assert!((out[4] - 4.0 / 9.0).abs() < 1e-5, "{}", out[4]);
    }
}
