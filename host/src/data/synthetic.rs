//! The embedded default dataset: procedurally rendered, labelled images.
//!
//! It exists so that `sere train` works with no download and so that tests
//! have real-looking data. Ten classes, each a pattern that fills the image
//! (so that every crop of an image still shows its class): five fields of
//! small shapes (disks, squares, triangles, rings, crosses; each shape with
//! its own size, offset and rotation) and five textures (stripes, a
//! checkerboard, zigzag stripes, a grid of lines, a brick wall; random
//! period, phase and orientation). Every element of a pattern (a shape, a
//! stripe, a square, a line) has its own random colour, over a grey
//! background of random brightness, with pixel noise. The class is only
//! recoverable from shape or texture, not from colour or position (a test
//! checks that the mean colour, and the colour layout, say nothing about
//! it), which is what self-supervised features have to learn. Every image comes from its own
//! random stream keyed by `(seed, split, index)`, so generation is
//! deterministic and runs in parallel.

use std::f32::consts::PI;

use rand::RngExt;
use rayon::prelude::*;

#[cfg(test)]
use super::dataset::Raster;
use super::dataset::{Dataset, Split};
use super::error::{DataError, Result};
use super::rng::{stream, Purpose};

/// The class names, in label order.
pub const CLASSES: [&str; 10] = [
    "disks",
    "squares",
    "triangles",
    "rings",
    "crosses",
    "stripes",
    "checker",
    "zigzag",
    "grid",
    "bricks",
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
///
/// Every class is a pattern that fills the whole image, so that any crop of
/// it still shows its class: classes 0-4 are fields of small shapes (one per
/// cell of a jittered grid, each with its own size, offset and rotation),
/// classes 5-9 are textures (stripes, a checkerboard, zigzag stripes, a grid
/// of lines, a brick wall), each with a random period, phase and
/// orientation.
/// The colours (one per element, kept apart from the grey background in
/// brightness), the background's brightness, the grid's and the texture's
/// phase and the pixel noise are random, so neither colour nor position
/// tells the class.
pub fn render(seed: u64, which: u64, index: usize, size: usize, out: &mut [u8]) {
    let class = index % CLASSES.len();
    let mut rng = stream(seed, Purpose::Synthetic, which, index as u64);
    let s = size as f32;

    // Background: one grey level. (A coloured background shared by the
    // whole image is the easiest thing for two views of one image to agree
    // on, and says nothing about the class: self-supervised features then
    // learn colour instead of shape.)
    let bg = rng.random_range(0.35..0.65f32);

    // Every element (a shape, a stripe, a square, a line) has its own
    // colour, drawn from its own stream keyed by the element: a random
    // colour moved to a brightness 0.3 - 0.6 above or below the background
    // (either way, at random), so the pattern is visible and, on average,
    // as bright as the background: how much of an image is foreground does
    // not move its mean colour.
    let colour_key = rng.random::<u64>();
    let colour_of = |(a, b): (i64, i64)| -> [f32; 3] {
        let mut r = stream(colour_key, Purpose::Synthetic, a as u64, b as u64);
        let c = random_colour(&mut r);
        let step = r.random_range(0.3..0.6f32);
        let target = if r.random_bool(0.5) {
            bg + step
        } else {
            bg - step
        };
        let shift = target.clamp(0.0, 1.0) - luma(c);
        c.map(|v| (v + shift).clamp(0.0, 1.0))
    };
    let bg = [bg; 3];

    let pattern = Pattern::sample(class, s, &mut rng);
    let noise = rng.random_range(0.0..0.08f32);

    // The colours of the elements met so far (a few dozen per image).
    let mut colours: Vec<((i64, i64), [f32; 3])> = Vec::new();
    for py in 0..size {
        for px in 0..size {
            // Colour from 2 x 2 subsamples: smooth edges at small sizes.
            let mut c = [0.0f32; 3];
            for (ox, oy) in [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)] {
                let sub = match pattern.element(px as f32 + ox, py as f32 + oy) {
                    Some(key) => match colours.iter().find(|(k, _)| *k == key) {
                        Some((_, col)) => *col,
                        None => {
                            let col = colour_of(key);
                            colours.push((key, col));
                            col
                        }
                    },
                    None => bg,
                };
                for k in 0..3 {
                    c[k] += 0.25 * sub[k];
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

/// One shape of a shape field: its centre and radius in pixels and its
/// rotation.
#[derive(Debug, Clone, Copy)]
struct Instance {
    cx: f32,
    cy: f32,
    radius: f32,
    cos: f32,
    sin: f32,
}

/// The pattern of one image.
enum Pattern {
    /// Classes 0-4: one shape per cell of a `cols x rows` grid of `cell`-px
    /// cells starting at `origin` (the grid's random phase).
    Field {
        class: usize,
        cell: f32,
        origin: (f32, f32),
        cols: usize,
        instances: Vec<Instance>,
    },
    /// Classes 5-9: a periodic texture in a frame rotated by `angle` and
    /// shifted by `phase`, with period `period` px; `width` sets how much of
    /// each period is foreground.
    Texture {
        class: usize,
        period: f32,
        width: f32,
        phase: (f32, f32),
        cos: f32,
        sin: f32,
    },
}

impl Pattern {
    fn sample(class: usize, s: f32, rng: &mut impl RngExt) -> Pattern {
        if class < 5 {
            let cell = rng.random_range(0.30..0.42) * s;
            let origin = (
                -rng.random_range(0.0..1.0f32) * cell,
                -rng.random_range(0.0..1.0f32) * cell,
            );
            let cols = ((s - origin.0) / cell).ceil() as usize;
            let rows = ((s - origin.1) / cell).ceil() as usize;
            let instances = (0..cols * rows)
                .map(|k| {
                    let (i, j) = ((k % cols) as f32, (k / cols) as f32);
                    let radius = rng.random_range(0.62..0.95) * cell * 0.5;
                    let slack = cell * 0.5 - radius;
                    let angle = rng.random_range(0.0..2.0 * PI);
                    Instance {
                        cx: origin.0 + (i + 0.5) * cell + rng.random_range(-1.0..1.0f32) * slack,
                        cy: origin.1 + (j + 0.5) * cell + rng.random_range(-1.0..1.0f32) * slack,
                        radius,
                        cos: angle.cos(),
                        sin: angle.sin(),
                    }
                })
                .collect();
            Pattern::Field {
                class,
                cell,
                origin,
                cols,
                instances,
            }
        } else {
            let angle = rng.random_range(0.0..PI);
            let period = rng.random_range(0.15..0.32) * s;
            // How much of each period is foreground (stripes, lines,
            // squares: a half, a half, a quarter).
            let width = match class {
                5 | 7 => 0.5, // stripe width
                6 => 1.0,     // square side
                _ => 0.25,    // line or mortar width
            };
            Pattern::Texture {
                class,
                period,
                width,
                phase: (
                    rng.random_range(0.0..1.0f32) * 4.0 * period,
                    rng.random_range(0.0..1.0f32) * 4.0 * period,
                ),
                cos: angle.cos(),
                sin: angle.sin(),
            }
        }
    }

    /// The foreground element (a shape, a stripe, a square, a line, ...)
    /// at image point `(x, y)` (pixels), named by two integers, or `None`
    /// on the background.
    fn element(&self, x: f32, y: f32) -> Option<(i64, i64)> {
        match self {
            Pattern::Field {
                class,
                cell,
                origin,
                cols,
                instances,
            } => {
                let i = ((x - origin.0) / cell).floor();
                let j = ((y - origin.1) / cell).floor();
                if i < 0.0 || j < 0.0 || i as usize >= *cols {
                    return None;
                }
                let inst = instances.get(j as usize * cols + i as usize)?;
                let dx = (x - inst.cx) / inst.radius;
                let dy = (y - inst.cy) / inst.radius;
                // Into the shape's frame: rotate by -angle.
                let qx = inst.cos * dx + inst.sin * dy;
                let qy = -inst.sin * dx + inst.cos * dy;
                shape_inside(*class, qx, qy).then_some((i as i64, j as i64))
            }
            Pattern::Texture {
                class,
                period,
                width,
                phase,
                cos,
                sin,
            } => {
                // Into the texture's frame (stripes run along its x axis).
                let u = (cos * x + sin * y + phase.0) / period;
                let v = (-sin * x + cos * y + phase.1) / period;
                let frac = |t: f32| t.rem_euclid(1.0);
                let (fu, fv) = (u.floor() as i64, v.floor() as i64);
                let w = *width;
                match class {
                    5 => (frac(v) < w).then_some((0, fv)),
                    6 => {
                        // Squares of side `w` periods, in a checkerboard.
                        let inset = (1.0 - w) * 0.5;
                        let on = (fu + fv) % 2 == 0;
                        let inner = |t: f32| (inset..1.0 - inset).contains(&frac(t));
                        (on && inner(u) && inner(v)).then_some((fu, fv))
                    }
                    7 => {
                        // Zigzag: stripes displaced by a triangle wave of
                        // wavelength 2 periods and amplitude half a period.
                        let tri = (frac(u * 0.5) - 0.5).abs() * 2.0;
                        let z = v + tri * 0.5;
                        (frac(z) < w).then_some((0, z.floor() as i64))
                    }
                    8 => {
                        if frac(v) < w {
                            Some((0, fv))
                        } else if frac(u) < w {
                            Some((fu, i64::MIN))
                        } else {
                            None
                        }
                    }
                    _ => {
                        // Bricks: mortar lines between rows of bricks two
                        // periods long, every other row shifted by one.
                        let shift = if fv % 2 == 0 { 0.0 } else { 0.5 };
                        let b = u * 0.5 + shift;
                        if frac(v) < w {
                            Some((0, fv))
                        } else if frac(b) < w * 0.5 {
                            Some((b.floor() as i64, fv.wrapping_add(1 << 40)))
                        } else {
                            None
                        }
                    }
                }
            }
        }
    }
}

/// Whether `(x, y)` of the unit frame belongs to shape class `class` (0-4).
/// Every shape fits in the unit circle and covers about the same area
/// (1.3 - 1.5, the largest triangle that fits), so how much of an image is
/// foreground says little about its class.
fn shape_inside(class: usize, x: f32, y: f32) -> bool {
    let r2 = x * x + y * y;
    match class {
        0 => r2 <= 0.45,
        1 => x.abs() <= 0.6 && y.abs() <= 0.6,
        2 => {
            // Equilateral triangle with circumradius 1, apex at y = -1.
            let s3 = 3f32.sqrt();
            y <= 0.5 && y >= s3 * x - 1.0 && y >= -s3 * x - 1.0
        }
        3 => (0.5..=1.0).contains(&r2),
        _ => (x.abs() <= 0.2 && y.abs() <= 1.0) || (y.abs() <= 0.2 && x.abs() <= 1.0),
    }
}

fn random_colour(rng: &mut impl RngExt) -> [f32; 3] {
    [rng.random(), rng.random(), rng.random()]
}

fn luma(c: [f32; 3]) -> f32 {
    0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
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
        assert_eq!((img.width(), img.height(), img.channels()), (32, 32, 3));
    }

    #[test]
    fn classes_are_distinct() {
        let d = small().generate().unwrap();
        // Stripes are anisotropic (their gradients point one way), a
        // checkerboard is not: the coherence of the structure tensor says
        // so for nine images in ten.
        let coherent = |class: usize| {
            (class..400)
                .step_by(10)
                .filter(|&i| coherence(&d.train.image(i).unwrap()) > 0.3)
                .count()
        };
        assert!(coherent(5) >= 36, "stripes: {} of 40", coherent(5));
        assert!(coherent(6) <= 4, "checker: {} of 40", coherent(6));
        // No two images coincide.
        let mut seen = std::collections::HashSet::new();
        for i in 0..d.train.len() {
            assert!(
                seen.insert(d.train.image(i).unwrap().as_slice().to_vec()),
                "duplicate {i}"
            );
        }
    }

    /// The five shapes differ pairwise by a clear margin (in the unit
    /// frame, unrotated).
    #[test]
    fn class_shapes_differ_pairwise() {
        let n = 64;
        let masks: Vec<Vec<bool>> = (0..5)
            .map(|class| {
                (0..n * n)
                    .map(|k| {
                        let x = ((k % n) as f32 + 0.5) / n as f32 * 2.4 - 1.2;
                        let y = ((k / n) as f32 + 0.5) / n as f32 * 2.4 - 1.2;
                        shape_inside(class, x, y)
                    })
                    .collect()
            })
            .collect();
        // Each covers about the same area (1.3 - 1.6 of the 2.4 x 2.4
        // square, i.e. 22-28%), and any two differ on more than a sixth of it.
        let areas: Vec<usize> = masks
            .iter()
            .map(|m| m.iter().filter(|&&v| v).count())
            .collect();
        for (a, &area) in areas.iter().enumerate() {
            assert!(
                area > n * n * 22 / 100 && area < n * n * 28 / 100,
                "{a}: {area}"
            );
        }
        for (a, mask) in masks.iter().enumerate() {
            for b in a + 1..5 {
                let diff = mask.iter().zip(&masks[b]).filter(|(p, q)| p != q).count();
                assert!(
                    diff > areas[a].min(areas[b]) / 6,
                    "{} vs {}: {diff}",
                    CLASSES[a],
                    CLASSES[b]
                );
            }
        }
    }

    /// Features of every image of a split: `(features, labels)`.
    fn features(split: &Split, f: impl Fn(&Raster) -> Vec<f32>) -> (Vec<Vec<f32>>, Vec<u32>) {
        let x = (0..split.len())
            .map(|i| f(&split.image(i).unwrap()))
            .collect();
        (x, split.labels().to_vec())
    }

    /// Top-1 accuracy of a nearest-class-centroid classifier (Euclidean)
    /// fitted on `train` and scored on `test`.
    fn nearest_centroid(
        train: &(Vec<Vec<f32>>, Vec<u32>),
        test: &(Vec<Vec<f32>>, Vec<u32>),
    ) -> f32 {
        let d = train.0[0].len();
        let mut centroids = vec![vec![0.0f64; d]; 10];
        let mut counts = [0usize; 10];
        for (x, &y) in train.0.iter().zip(&train.1) {
            counts[y as usize] += 1;
            for (c, v) in centroids[y as usize].iter_mut().zip(x) {
                *c += *v as f64;
            }
        }
        for (c, n) in centroids.iter_mut().zip(counts) {
            c.iter_mut().for_each(|v| *v /= n.max(1) as f64);
        }
        let correct = test
            .0
            .iter()
            .zip(&test.1)
            .filter(|(x, &y)| {
                let dist = |c: &Vec<f64>| -> f64 {
                    c.iter()
                        .zip(x.iter())
                        .map(|(a, &b)| (a - b as f64).powi(2))
                        .sum()
                };
                let best = (0..10)
                    .min_by(|&a, &b| dist(&centroids[a]).total_cmp(&dist(&centroids[b])))
                    .unwrap();
                best == y as usize
            })
            .count();
        correct as f32 / test.1.len() as f32
    }

    /// Mean of each channel over `k x k` blocks of the image (`3 k^2`
    /// values; `k = 1` is the image's mean colour).
    fn block_means(img: &Raster, k: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; 3 * k * k];
        let (w, h) = (img.width(), img.height());
        for y in 0..h {
            for x in 0..w {
                let b = (y * k / h) * k + x * k / w;
                for c in 0..3 {
                    out[3 * b + c] += img.get(x, y, c) as f32 / (w * h / (k * k)) as f32;
                }
            }
        }
        out
    }

    /// Coherence of the structure tensor of an image's grey levels (Sobel
    /// gradients summed over the image): 1 when every gradient points the
    /// same way (stripes), 0 when they point every way equally.
    fn coherence(img: &Raster) -> f32 {
        let g = |x: usize, y: usize| (0..3).map(|c| img.get(x, y, c) as f32).sum::<f32>();
        let (mut xx, mut yy, mut xy) = (0.0f32, 0.0f32, 0.0f32);
        for y in 1..img.height() - 1 {
            for x in 1..img.width() - 1 {
                let gx = g(x + 1, y - 1) + 2.0 * g(x + 1, y) + g(x + 1, y + 1)
                    - g(x - 1, y - 1)
                    - 2.0 * g(x - 1, y)
                    - g(x - 1, y + 1);
                let gy = g(x - 1, y + 1) + 2.0 * g(x, y + 1) + g(x + 1, y + 1)
                    - g(x - 1, y - 1)
                    - 2.0 * g(x, y - 1)
                    - g(x + 1, y - 1);
                xx += gx * gx;
                yy += gy * gy;
                xy += gx * gy;
            }
        }
        ((xx - yy).powi(2) + 4.0 * xy * xy).sqrt() / (xx + yy).max(1e-6)
    }

    /// Mean absolute gray-level gradient along x, y and the two diagonals,
    /// divided by their sum and sorted in decreasing order: an orientation
    /// signature that is blind to colour contrast and, being sorted, to
    /// which way the texture is turned.
    fn orientation(img: &Raster) -> Vec<f32> {
        let g = |x: usize, y: usize| (0..3).map(|c| img.get(x, y, c) as f32).sum::<f32>();
        let mut e = [0.0f32; 4];
        for y in 1..img.height() - 1 {
            for x in 1..img.width() - 1 {
                e[0] += (g(x + 1, y) - g(x - 1, y)).abs();
                e[1] += (g(x, y + 1) - g(x, y - 1)).abs();
                e[2] += (g(x + 1, y + 1) - g(x - 1, y - 1)).abs() / 2f32.sqrt();
                e[3] += (g(x + 1, y - 1) - g(x - 1, y + 1)).abs() / 2f32.sqrt();
            }
        }
        let sum = e.iter().sum::<f32>().max(1e-6);
        let mut e: Vec<f32> = e.iter().map(|v| v / sum).collect();
        e.sort_by(|a, b| b.total_cmp(a));
        e
    }

    /// Colour and position carry no class information: a nearest-centroid
    /// classifier on the mean colour, or on the mean colour of each cell of
    /// a 4 x 4 grid (where the foreground is), stays near chance (10%),
    /// while the same classifier on an orientation signature (texture) does
    /// far better, so the check can tell information from none.
    #[test]
    fn class_is_not_in_colour_or_position() {
        let d = SyntheticConfig {
            size: 16,
            train: 2000,
            test: 1000,
            seed: 5,
        }
        .generate()
        .unwrap();
        let test = d.test.as_ref().unwrap();
        let score = |f: &dyn Fn(&Raster) -> Vec<f32>| {
            nearest_centroid(&features(&d.train, f), &features(test, f))
        };
        let colour = score(&|img| block_means(img, 1));
        let layout = score(&|img| block_means(img, 4));
        let texture = score(&orientation);
        eprintln!(
            "nearest centroid: colour {colour}, 4x4 colour layout {layout}, orientation {texture}"
        );
        assert!(colour < 0.16, "mean colour predicts the class: {colour}");
        assert!(layout < 0.16, "colour layout predicts the class: {layout}");
        assert!(
            texture > 0.3,
            "orientation should predict textures: {texture}"
        );
    }
}
