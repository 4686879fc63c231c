//! The embedded default dataset: procedurally rendered, labelled images.
//!
//! It exists so that `sere train` works with no download and so that tests
//! have real-looking data. Ten classes of shapes and textures are drawn with
//! random colours, positions, scales and rotations over noisy gradient
//! backgrounds, sometimes partly covered by an occluder: the class is only
//! recoverable from shape or texture, not from colour or position, which is
//! what self-supervised features have to learn. Every image comes from its
//! own random stream keyed by `(seed, split, index)`, so generation is
//! deterministic and runs in parallel.

use std::f32::consts::PI;

use rand::RngExt;
use rayon::prelude::*;

use super::dataset::{Dataset, Split};
use super::error::{DataError, Result};
use super::rng::{stream, Purpose};

/// The class names, in label order.
pub const CLASSES: [&str; 10] = [
    "disk",
    "square",
    "triangle",
    "ring",
    "cross",
    "h-stripes",
    "v-stripes",
    "d-stripes",
    "checker",
    "dots",
];

/// Size and seed of the synthetic dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyntheticConfig {
    /// Side of the square RGB images in pixels (>= 8).
    pub size: usize,
    /// Training images (labels are balanced: image `i` has class `i % 10`).
    pub train: usize,
    /// Test images.
    pub test: usize,
    /// Seed of the renderer.
    pub seed: u64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            size: 32,
            train: 5000,
            test: 1000,
            seed: 0,
        }
    }
}

impl SyntheticConfig {
    /// Renders both splits.
    pub fn generate(&self) -> Result<Dataset> {
        if self.size < 8 || self.size > 4096 {
            return Err(DataError::config(
                "synthetic size",
                format!("{} px; use 8..=4096", self.size),
            ));
        }
        if self.train == 0 {
            return Err(DataError::config(
                "synthetic train",
                "0 images; use train >= 1",
            ));
        }
        Ok(Dataset {
            name: format!(
                "synthetic {}px (train {}, test {}, seed {})",
                self.size, self.train, self.test, self.seed
            ),
            classes: CLASSES.iter().map(|s| s.to_string()).collect(),
            train: self.split(0, self.train)?,
            test: if self.test > 0 {
                Some(self.split(1, self.test)?)
            } else {
                None
            },
        })
    }

    fn split(&self, which: u64, n: usize) -> Result<Split> {
        let each = self.size * self.size * 3;
        let mut data = vec![0u8; n * each];
        data.par_chunks_mut(each)
            .enumerate()
            .for_each(|(i, out)| render(self.seed, which, i, self.size, out));
        let labels = (0..n).map(|i| (i % CLASSES.len()) as u32).collect();
        Split::packed(self.size, self.size, 3, data, labels)
    }
}

/// Renders image `index` of split `which` (class `index % 10`) into `out`
/// (`size * size * 3` bytes, HWC).
pub fn render(seed: u64, which: u64, index: usize, size: usize, out: &mut [u8]) {
    let class = index % CLASSES.len();
    let mut rng = stream(seed, Purpose::Synthetic, which, index as u64);
    let s = size as f32;

    // Background: a linear gradient between two colours, any direction.
    let bg0 = random_colour(&mut rng);
    let bg1 = random_colour(&mut rng);
    let phi = rng.random_range(0.0..2.0 * PI);
    let (gc, gs) = (phi.cos(), phi.sin());
    let bg_mid = lerp3(bg0, bg1, 0.5);

    // Foreground colour, kept away from the background's brightness so the
    // object is visible.
    let mut fg = random_colour(&mut rng);
    for _ in 0..16 {
        if (luma(fg) - luma(bg_mid)).abs() > 0.3 {
            break;
        }
        fg = random_colour(&mut rng);
    }

    let shape = Shape::sample(class, &mut rng);
    let radius = rng.random_range(0.22..0.40) * s;
    let cx = rng.random_range(0.32..0.68) * s;
    let cy = rng.random_range(0.32..0.68) * s;
    let (rc, rs) = (shape.angle.cos(), shape.angle.sin());

    // Occluder: an axis-aligned box in a random colour, half the time.
    let occluder = if rng.random_bool(0.5) {
        let w = rng.random_range(0.12..0.3) * s;
        let h = rng.random_range(0.12..0.3) * s;
        let x = rng.random_range(0.0..s - w);
        let y = rng.random_range(0.0..s - h);
        Some((x, y, x + w, y + h, random_colour(&mut rng)))
    } else {
        None
    };
    let noise = rng.random_range(0.0..0.08f32);

    for py in 0..size {
        for px in 0..size {
            // Coverage from 2 x 2 subsamples: smooth edges at small sizes.
            let mut cover = 0.0f32;
            for (ox, oy) in [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)] {
                let dx = (px as f32 + ox - cx) / radius;
                let dy = (py as f32 + oy - cy) / radius;
                // Into the shape's frame: rotate by -angle.
                let qx = rc * dx + rs * dy;
                let qy = -rs * dx + rc * dy;
                if shape.inside(qx, qy) {
                    cover += 0.25;
                }
            }
            let t = ((px as f32 / s - 0.5) * gc + (py as f32 / s - 0.5) * gs + 0.5).clamp(0.0, 1.0);
            let mut c = lerp3(lerp3(bg0, bg1, t), fg, cover);
            if let Some((x0, y0, x1, y1, oc)) = occluder {
                let (fx, fy) = (px as f32 + 0.5, py as f32 + 0.5);
                if fx >= x0 && fx < x1 && fy >= y0 && fy < y1 {
                    c = oc;
                }
            }
            let o = (py * size + px) * 3;
            for k in 0..3 {
                let n = rng.random_range(-1.0..1.0f32) * noise;
                out[o + k] = ((c[k] + n).clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
    }
}

/// One object: its class, rotation and texture parameters.
struct Shape {
    class: usize,
    angle: f32,
    /// Texture period in units of the object radius.
    period: f32,
    /// Texture region: disk (true) or square.
    disk_region: bool,
}

impl Shape {
    fn sample(class: usize, rng: &mut impl RngExt) -> Shape {
        let jitter = rng.random_range(-0.26..0.26f32); // about +-15 degrees
        let angle = match class {
            5 => jitter,            // horizontal stripes
            6 => PI / 2.0 + jitter, // vertical stripes
            7 => {
                // either diagonal: a flip maps one to the other
                if rng.random_bool(0.5) {
                    PI / 4.0 + jitter * 0.6
                } else {
                    -PI / 4.0 + jitter * 0.6
                }
            }
            8 | 9 => jitter,
            _ => rng.random_range(0.0..2.0 * PI),
        };
        Shape {
            class,
            angle,
            period: rng.random_range(0.4..0.6),
            disk_region: rng.random_bool(0.5),
        }
    }

    /// Whether the point `(x, y)` of the unit frame belongs to the object.
    fn inside(&self, x: f32, y: f32) -> bool {
        let r2 = x * x + y * y;
        let region = || {
            if self.disk_region {
                r2 <= 1.0
            } else {
                x.abs() <= 0.85 && y.abs() <= 0.85
            }
        };
        let phase = |v: f32| (v / self.period).rem_euclid(1.0);
        match self.class {
            0 => r2 <= 1.0,
            1 => x.abs() <= 0.8 && y.abs() <= 0.8,
            2 => {
                // Equilateral triangle with circumradius 1, apex up.
                let s3 = 3f32.sqrt();
                y <= 0.5 && s3 * x - y >= -1.0 && -s3 * x - y >= -1.0
            }
            3 => (0.3..=1.0).contains(&r2),
            4 => (x.abs() <= 0.3 && y.abs() <= 1.0) || (y.abs() <= 0.3 && x.abs() <= 1.0),
            // Stripes run along the frame's x axis (rotated per class).
            5..=7 => region() && phase(y) < 0.5,
            8 => {
                region() && ((x / self.period).floor() + (y / self.period).floor()) as i64 % 2 == 0
            }
            _ => {
                let (u, v) = (phase(x) - 0.5, phase(y) - 0.5);
                region() && u * u + v * v <= 0.09
            }
        }
    }
}

fn random_colour(rng: &mut impl RngExt) -> [f32; 3] {
    [rng.random(), rng.random(), rng.random()]
}

fn luma(c: [f32; 3]) -> f32 {
    0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
}

fn lerp3(a: [f32; 3], b: [f32; 3], t: f32) -> [f32; 3] {
    [
        a[0] + (b[0] - a[0]) * t,
        a[1] + (b[1] - a[1]) * t,
        a[2] + (b[2] - a[2]) * t,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> SyntheticConfig {
        SyntheticConfig {
            size: 32,
            train: 400,
            test: 50,
            seed: 3,
        }
    }

    #[test]
    fn deterministic_by_seed() {
        let a = small().generate().unwrap();
        let b = small().generate().unwrap();
        for i in [0, 17, 399] {
            assert_eq!(a.train.image(i).unwrap(), b.train.image(i).unwrap());
        }
        let c = SyntheticConfig { seed: 4, ..small() }.generate().unwrap();
        assert_ne!(a.train.image(0).unwrap(), c.train.image(0).unwrap());
        // Test images are not copies of training images.
        assert_ne!(
            a.train.image(0).unwrap(),
            a.test.as_ref().unwrap().image(0).unwrap()
        );
    }

    #[test]
    fn balanced_labels_and_sizes() {
        let d = small().generate().unwrap();
        assert_eq!(d.num_classes(), 10);
        assert_eq!(d.train.len(), 400);
        assert_eq!(d.test.as_ref().unwrap().len(), 50);
        let mut counts = [0usize; 10];
        for &l in d.train.labels() {
            counts[l as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c == 40), "{counts:?}");
        let img = d.train.image(5).unwrap();
        assert_eq!((img.width, img.height, img.channels), (32, 32, 3));
    }

    /// Orientation energy of a gray image's gradients: (horizontal edges,
    /// vertical edges), i.e. mean |d/dy| and mean |d/dx|.
    fn grad_energy(d: &Dataset, i: usize) -> (f32, f32) {
        let img = d.train.image(i).unwrap();
        let g = |x: usize, y: usize| {
            (img.get(x, y, 0) as f32 + img.get(x, y, 1) as f32 + img.get(x, y, 2) as f32) / 3.0
        };
        let (mut ex, mut ey) = (0.0, 0.0);
        for y in 1..img.height - 1 {
            for x in 1..img.width - 1 {
                ex += (g(x + 1, y) - g(x - 1, y)).abs();
                ey += (g(x, y + 1) - g(x, y - 1)).abs();
            }
        }
        (ey, ex)
    }

    #[test]
    fn classes_are_distinct() {
        let d = small().generate().unwrap();
        // Horizontal stripes vary along y, vertical ones along x.
        let ratio = |class: usize| {
            let (mut h, mut v) = (0.0, 0.0);
            for i in (class..400).step_by(10) {
                let (a, b) = grad_energy(&d, i);
                h += a;
                v += b;
            }
            h / v
        };
        assert!(ratio(5) > 1.3, "h-stripes {}", ratio(5));
        assert!(ratio(6) < 1.0 / 1.3, "v-stripes {}", ratio(6));
        // No two images coincide.
        let mut seen = std::collections::HashSet::new();
        for i in 0..d.train.len() {
            assert!(seen.insert(d.train.image(i).unwrap().data), "duplicate {i}");
        }
    }

    /// Masks of every class's object (in the image frame, with the
    /// rotation each class draws) differ pairwise by a clear margin.
    #[test]
    fn class_shapes_differ_pairwise() {
        let n = 64;
        let masks: Vec<Vec<bool>> = (0..10)
            .map(|class| {
                let mut rng = stream(0, Purpose::Synthetic, 9, 9);
                let mut shape = Shape::sample(class, &mut rng);
                shape.period = 0.5;
                shape.disk_region = true;
                let (c, s) = (shape.angle.cos(), shape.angle.sin());
                (0..n * n)
                    .map(|k| {
                        let x = ((k % n) as f32 + 0.5) / n as f32 * 2.4 - 1.2;
                        let y = ((k / n) as f32 + 0.5) / n as f32 * 2.4 - 1.2;
                        shape.inside(c * x + s * y, -s * x + c * y)
                    })
                    .collect()
            })
            .collect();
        for a in 0..10 {
            for b in a + 1..10 {
                let diff = masks[a]
                    .iter()
                    .zip(&masks[b])
                    .filter(|(p, q)| p != q)
                    .count();
                assert!(
                    diff > n * n / 20,
                    "{} vs {}: {diff}",
                    CLASSES[a],
                    CLASSES[b]
                );
            }
        }
    }
}
