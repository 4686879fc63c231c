//! Gaussian blur of a square view, separable, with reflected borders (as
//! torchvision's `GaussianBlur`). The kernel reaches three sigmas, capped so
//! that a single reflection stays inside the view.

/// Blurs each of the three `size x size` CHW planes of `px` with a Gaussian
/// of standard deviation `sigma` pixels.
pub fn gaussian_blur(px: &mut [f32], size: usize, sigma: f32) {
    if size < 2 || sigma <= 0.0 {
        return;
    }
    let radius = ((3.0 * sigma).ceil() as usize).clamp(1, size - 1);
    let mut k: Vec<f32> = (0..=2 * radius)
        .map(|i| {
            let d = i as f32 - radius as f32;
            (-0.5 * d * d / (sigma * sigma)).exp()
        })
        .collect();
    let sum: f32 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= sum);
    let reflect = |i: isize| -> usize {
        let n = size as isize;
        let j = if i < 0 {
            -i
        } else if i >= n {
            2 * n - 2 - i
        } else {
            i
        };
        j as usize
    };
    let mut tmp = vec![0.0f32; size * size];
    for plane in px.chunks_mut(size * size) {
        // Rows.
        for y in 0..size {
            for x in 0..size {
                let mut a = 0.0;
                for (t, &w) in k.iter().enumerate() {
                    let sx = reflect(x as isize + t as isize - radius as isize);
                    a += w * plane[y * size + sx];
                }
                tmp[y * size + x] = a;
            }
        }
        // Columns.
        for y in 0..size {
            for x in 0..size {
                let mut a = 0.0;
                for (t, &w) in k.iter().enumerate() {
                    let sy = reflect(y as isize + t as isize - radius as isize);
                    a += w * tmp[sy * size + x];
                }
                plane[y * size + x] = a;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_constants_and_spreads_impulses() {
        let mut c = vec![0.3f32; 3 * 25];
        gaussian_blur(&mut c, 5, 1.5);
        assert!(c.iter().all(|v| (v - 0.3).abs() < 1e-6));
        let mut p = vec![0.0f32; 3 * 81];
        p[40] = 1.0; // centre of the first plane
        gaussian_blur(&mut p, 9, 1.0);
        let total: f32 = p[..81].iter().sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
        assert!(
            p[40] < 0.5
                && p[41] > 0.0
                && (p[41] - p[39]).abs() < 1e-7
                && (p[31] - p[49]).abs() < 1e-7
        );
        assert!(p[81..].iter().all(|&v| v == 0.0));
    }
}
