//! Photometric operations on a view held as three CHW planes in `[0, 1]`,
//! following torchvision's tensor implementations (ColorJitter's four
//! adjustments, Grayscale, solarize) so that the strengths mean what they
//! mean in DINO's recipe.

use rand::RngExt;

use super::uniform;

/// ITU-R 601 luma weights, as torchvision's `rgb_to_grayscale`.
const LUMA: [f32; 3] = [0.2989, 0.587, 0.114];

/// ColorJitter strengths: each factor is drawn uniformly from
/// `[max(0, 1 - s), 1 + s]` (hue: a shift in `[-hue, hue]` turns).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Jitter {
    /// Brightness strength (DINO: 0.4).
    pub brightness: f32,
    /// Contrast strength (DINO: 0.4).
    pub contrast: f32,
    /// Saturation strength (DINO: 0.2).
    pub saturation: f32,
    /// Hue strength, at most 0.5 (DINO: 0.1).
    pub hue: f32,
}

impl Default for Jitter {
    fn default() -> Self {
        Jitter {
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.2,
            hue: 0.1,
        }
    }
}

impl Jitter {
    /// Draws the order (a random permutation, as torchvision's `randperm(4)`)
    /// and the four factors, then applies the adjustments in that order.
    pub fn apply(&self, px: &mut [f32], rng: &mut impl RngExt) {
        let mut order = [0usize, 1, 2, 3];
        for i in (1..4).rev() {
            let j = rng.random_range(0..=i as u64) as usize;
            order.swap(i, j);
        }
        let factor = |rng: &mut _, s: f32| uniform(rng, (1.0 - s).max(0.0), 1.0 + s);
        let b = factor(rng, self.brightness);
        let c = factor(rng, self.contrast);
        let s = factor(rng, self.saturation);
        let h = uniform(rng, -self.hue, self.hue);
        for op in order {
            match op {
                0 => brightness(px, b),
                1 => contrast(px, c),
                2 => saturation(px, s),
                _ => hue(px, h),
            }
        }
    }
}

fn planes(px: &mut [f32]) -> (&mut [f32], &mut [f32], &mut [f32]) {
    let n = px.len() / 3;
    let (r, gb) = px.split_at_mut(n);
    let (g, b) = gb.split_at_mut(n);
    (r, g, b)
}

/// Scales all values by `f`.
pub fn brightness(px: &mut [f32], f: f32) {
    for v in px.iter_mut() {
        *v = (*v * f).clamp(0.0, 1.0);
    }
}

/// Blends with the mean luma of the whole view.
pub fn contrast(px: &mut [f32], f: f32) {
    let n = px.len() / 3;
    let mut mean = 0.0f64;
    for i in 0..n {
        mean += (LUMA[0] * px[i] + LUMA[1] * px[n + i] + LUMA[2] * px[2 * n + i]) as f64;
    }
    let m = (mean / n as f64) as f32 * (1.0 - f);
    for v in px.iter_mut() {
        *v = (f * *v + m).clamp(0.0, 1.0);
    }
}

/// Blends each pixel with its own luma.
pub fn saturation(px: &mut [f32], f: f32) {
    let (r, g, b) = planes(px);
    for i in 0..r.len() {
        let y = (LUMA[0] * r[i] + LUMA[1] * g[i] + LUMA[2] * b[i]) * (1.0 - f);
        r[i] = (f * r[i] + y).clamp(0.0, 1.0);
        g[i] = (f * g[i] + y).clamp(0.0, 1.0);
        b[i] = (f * b[i] + y).clamp(0.0, 1.0);
    }
}

/// Rotates the hue by `shift` turns (through HSV, as torchvision).
pub fn hue(px: &mut [f32], shift: f32) {
    let (r, g, b) = planes(px);
    for i in 0..r.len() {
        let (h, s, v) = rgb_to_hsv(r[i], g[i], b[i]);
        let (nr, ng, nb) = hsv_to_rgb((h + shift).rem_euclid(1.0), s, v);
        r[i] = nr;
        g[i] = ng;
        b[i] = nb;
    }
}

fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    let cr = maxc - minc;
    if cr == 0.0 {
        return (0.0, 0.0, maxc);
    }
    let s = cr / maxc;
    let (rc, gc, bc) = ((maxc - r) / cr, (maxc - g) / cr, (maxc - b) / cr);
    let h = if maxc == r {
        bc - gc
    } else if maxc == g {
        2.0 + rc - bc
    } else {
        4.0 + gc - rc
    };
    ((h / 6.0 + 1.0).rem_euclid(1.0), s, maxc)
}

fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let i = (h * 6.0).floor();
    let f = h * 6.0 - i;
    let p = (v * (1.0 - s)).clamp(0.0, 1.0);
    let q = (v * (1.0 - s * f)).clamp(0.0, 1.0);
    let t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0);
    match (i as i32).rem_euclid(6) {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

/// Replaces every channel by the luma (3-channel grayscale).
pub fn grayscale(px: &mut [f32]) {
    let (r, g, b) = planes(px);
    for i in 0..r.len() {
        let y = LUMA[0] * r[i] + LUMA[1] * g[i] + LUMA[2] * b[i];
        r[i] = y;
        g[i] = y;
        b[i] = y;
    }
}

/// Inverts every value at or above `threshold` (PIL's `ImageOps.solarize`).
pub fn solarize(px: &mut [f32], threshold: f32) {
    for v in px.iter_mut() {
        if *v >= threshold {
            *v = 1.0 - *v;
        }
    }
}

/// `(x - mean[c]) / std[c]` per channel plane.
pub fn normalize(px: &mut [f32], mean: [f32; 3], std: [f32; 3]) {
    let n = px.len() / 3;
    for (c, plane) in px.chunks_mut(n).enumerate() {
        let inv = 1.0 / std[c];
        for v in plane.iter_mut() {
            *v = (*v - mean[c]) * inv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hsv_round_trip_and_hue_shift() {
        for &(r, g, b) in &[
            (0.9, 0.2, 0.1),
            (0.1, 0.8, 0.3),
            (0.2, 0.3, 0.7),
            (0.5, 0.5, 0.5),
        ] {
            let (h, s, v) = rgb_to_hsv(r, g, b);
            let (r2, g2, b2) = hsv_to_rgb(h, s, v);
            assert!((r - r2).abs() < 1e-5 && (g - g2).abs() < 1e-5 && (b - b2).abs() < 1e-5);
        }
        // Pure red shifted by a third of a turn becomes pure green.
        let mut px = vec![1.0, 0.0, 0.0];
        hue(&mut px, 1.0 / 3.0);
        assert!(
            (px[0]).abs() < 1e-5 && (px[1] - 1.0).abs() < 1e-5 && px[2].abs() < 1e-5,
            "{px:?}"
        );
    }

    #[test]
    fn simple_ops() {
        let mut px = vec![0.2, 0.8, 0.6, 0.4, 0.5, 0.5];
        grayscale(&mut px);
        assert_eq!(px[0], px[2]);
        assert_eq!(px[2], px[4]);
        let mut s = vec![0.2, 0.6];
        solarize(&mut s, 0.5);
        assert!((s[1] - 0.4).abs() < 1e-6 && s[0] == 0.2);
        let mut n = vec![0.5; 3];
        normalize(&mut n, [0.5, 0.25, 0.0], [1.0, 0.5, 2.0]);
        assert_eq!(n, vec![0.0, 0.5, 0.25]);
        let mut c = vec![0.0, 1.0, 0.0, 1.0, 0.0, 1.0];
        contrast(&mut c, 0.0); // all to the mean luma
        assert!(c.iter().all(|v| (v - c[0]).abs() < 1e-6));
    }
}
