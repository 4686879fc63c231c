//! `sere visualize`: what a checkpoint's teacher backbone looks at.
//!
//! For every image (the evaluation view at the checkpoint's size, as k-NN
//! sees it) two PNGs are written, each a row of panels starting with the
//! input:
//! - `imgNNN_attn.png`: the CLS token's attention over the patches in the
//!   last block, one panel per head, then their mean;
//! - `imgNNN_relation.png`: spatial self-relations of the final patch
//!   tokens (SERE's `softmax_row(X_h X_h^T / sqrt(d))` per head, averaged
//!   over heads) for five query patches (the centre and the four quarter
//!   points), each query outlined in its own colour on the input and on its
//!   map.
//!
//! Maps are upsampled (nearest: one cell per patch) to the image size,
//! min-max normalised and drawn with viridis. Files are written atomically.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use image::{ImageFormat, Rgb, RgbImage};
use sere_core::{relation, softmax};

use crate::backend::Backend;
use crate::cli::VisualizeArgs;
use crate::data::{decode_file, DataSpec, EvalTransform, Raster};
use crate::error::SereError;
use crate::eval::features::Embedder;
use crate::model::vit::VitActs;

/// Pixels between panels.
pub const GAP: usize = 4;
/// Smallest panel side the default zoom aims for.
const MIN_PANEL: usize = 128;
/// Largest panel side.
const MAX_PANEL: usize = 4096;
/// Outline colours of the query patches.
const QUERY_COLOURS: [[u8; 3]; 5] = [
    [230, 25, 75],
    [70, 240, 240],
    [240, 50, 230],
    [245, 130, 48],
    [255, 255, 255],
];

/// Viridis sampled at 9 evenly spaced points (matplotlib's values).
const VIRIDIS: [[u8; 3]; 9] = [
    [68, 1, 84],
    [71, 45, 123],
    [59, 82, 139],
    [44, 114, 142],
    [33, 144, 140],
    [39, 173, 129],
    [93, 200, 99],
    [170, 220, 50],
    [253, 231, 37],
];

/// The viridis colour of `t` in `[0, 1]` (clamped; NaN reads as 0),
/// linearly interpolated between 9 samples.
pub fn viridis(t: f32) -> [u8; 3] {
    let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
    let x = t * (VIRIDIS.len() - 1) as f32;
    let i = (x.floor() as usize).min(VIRIDIS.len() - 2);
    let f = x - i as f32;
    let (a, b) = (VIRIDIS[i], VIRIDIS[i + 1]);
    [0, 1, 2].map(|c| (a[c] as f32 + f * (b[c] as f32 - a[c] as f32)).round() as u8)
}

/// Nearest-neighbour upsampling of a `side x side` map to `out x out`.
pub fn upsample_nearest(map: &[f32], side: usize, out: usize) -> Vec<f32> {
    assert_eq!(map.len(), side * side, "map is not side x side");
    let src = |i: usize| i * side / out;
    (0..out * out)
        .map(|k| map[src(k / out) * side + src(k % out)])
        .collect()
}

/// Rescales `v` to `[0, 1]` (all zeros when it is constant or not finite).
pub fn min_max_normalize(v: &mut [f32]) {
    let lo = v.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let span = hi - lo;
    if !(span.is_finite() && span > 0.0) {
        v.fill(0.0);
        return;
    }
    v.iter_mut().for_each(|x| *x = (*x - lo) / span);
}

/// Width of a row of `panels` panels of side `side`.
pub fn row_width(panels: usize, side: usize) -> usize {
    panels * side + panels.saturating_sub(1) * GAP
}

/// The query patches `(row, col)` on a `g x g` grid: centre, then the four
/// quarter points.
pub fn query_patches(g: usize) -> [(usize, usize); 5] {
    let (a, b, c) = (g / 4, g / 2, (3 * g) / 4);
    [(b, b), (a, a), (a, c), (c, a), (c, c)]
}

/// One image's panels, each `g x g` values over the patch grid.
struct Maps {
    /// CLS attention per head, then the mean.
    attention: Vec<Vec<f32>>,
    /// Relation row of each query patch.
    relation: Vec<Vec<f32>>,
}

/// CLS attention (last block) and query relations of image 0 of the last
/// forward pass in `acts`; the relations are of the last block's tokens
/// before the final norm, the tokens the SERE heads read.
fn maps<B: Backend>(
    be: &B,
    acts: &VitActs<B>,
    depth: usize,
    dim: usize,
    heads: usize,
) -> Result<Maps, SereError> {
    let (n, t) = (acts.n, acts.t);
    let download = |b| be.download(b).map_err(|e| SereError::Device(e.to_string()));
    let probs = download(acts.attention(depth - 1))?;
    let mut attention: Vec<Vec<f32>> = (0..heads)
        .map(|h| probs[h * t * t + 1..h * t * t + t].to_vec())
        .collect();
    let mean = (0..n)
        .map(|j| attention.iter().map(|a| a[j]).sum::<f32>() / heads as f32)
        .collect();
    attention.push(mean);

    let out = download(acts.pre_norm())?;
    let tokens = &out[dim..t * dim];
    let mut rel = vec![0.0f32; heads * n * n];
    relation::spatial_relation_forward(tokens, n, dim, heads, &mut rel)?;
    softmax::softmax_rows_in_place(&mut rel, heads * n, n)?;
    let g = (n as f64).sqrt().round() as usize;
    let relation = query_patches(g)
        .iter()
        .map(|&(r, c)| {
            let q = r * g + c;
            (0..n)
                .map(|j| (0..heads).map(|h| rel[(h * n + q) * n + j]).sum::<f32>() / heads as f32)
                .collect()
        })
        .collect();
    Ok(Maps {
        attention,
        relation,
    })
}

/// A canvas for a row of `panels` panels of side `side`.
fn canvas(panels: usize, side: usize) -> RgbImage {
    RgbImage::from_pixel(
        row_width(panels, side) as u32,
        side as u32,
        Rgb([255, 255, 255]),
    )
}

/// Draws the de-normalised view (`3 x img x img`) into the first panel.
fn draw_input(out: &mut RgbImage, view: &[f32], tf: &EvalTransform, side: usize) {
    let img = tf.size;
    for y in 0..side {
        for x in 0..side {
            let (sy, sx) = (y * img / side, x * img / side);
            let px = [0, 1, 2].map(|c| {
                let v = view[c * img * img + sy * img + sx] * tf.std[c] + tf.mean[c];
                (v * 255.0).round().clamp(0.0, 255.0) as u8
            });
            out.put_pixel(x as u32, y as u32, Rgb(px));
        }
    }
}

/// Draws a `g x g` map as a min-max normalised viridis heat-map in panel
/// `slot`.
fn draw_map(out: &mut RgbImage, map: &[f32], g: usize, slot: usize, side: usize) {
    let mut up = upsample_nearest(map, g, side);
    min_max_normalize(&mut up);
    let x0 = slot * (side + GAP);
    for (k, &v) in up.iter().enumerate() {
        out.put_pixel((x0 + k % side) as u32, (k / side) as u32, Rgb(viridis(v)));
    }
}

/// Outlines patch `(r, c)` of a `g x g` grid in panel `slot`.
fn outline(
    out: &mut RgbImage,
    (r, c): (usize, usize),
    g: usize,
    slot: usize,
    side: usize,
    rgb: [u8; 3],
) {
    let (y0, y1) = (r * side / g, ((r + 1) * side / g).max(r * side / g + 1) - 1);
    let (x0, x1) = (c * side / g, ((c + 1) * side / g).max(c * side / g + 1) - 1);
    let off = slot * (side + GAP);
    for y in y0..=y1 {
        for x in x0..=x1 {
            if y == y0 || y == y1 || x == x0 || x == x1 {
                out.put_pixel((off + x) as u32, y as u32, Rgb(rgb));
            }
        }
    }
}

/// Writes `img` as a PNG at `path` atomically (temporary file in the same
/// directory, fsync, rename).
pub fn write_png_atomic(path: &Path, img: &RgbImage) -> Result<(), SereError> {
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), ImageFormat::Png)
        .map_err(|e| SereError::Other(format!("cannot encode {}: {e}", path.display())))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        SereError::io("cannot write", path, e)
    })
}

/// The images to draw: the `--image` files, else the first `--count` test
/// images (training images if there is no test split) of `--data`. Every
/// input is read before anything is written.
fn inputs(args: &VisualizeArgs) -> Result<Vec<Raster>, SereError> {
    if !args.image.is_empty() {
        return args
            .image
            .iter()
            .map(|p| decode_file(p).map_err(SereError::data))
            .collect();
    }
    if args.count == 0 {
        return Err(SereError::Other("--count must be at least 1".into()));
    }
    let data = DataSpec::parse(&args.data)
        .and_then(|s| s.open())
        .map_err(SereError::data)?;
    let split = data.test.as_ref().unwrap_or(&data.train);
    (0..args.count.min(split.len()))
        .map(|i| split.image(i).map_err(SereError::data))
        .collect()
}

/// Draws every input and returns the files written, in order.
pub fn run<B: Backend>(emb: &Embedder<B>, args: &VisualizeArgs) -> Result<Vec<PathBuf>, SereError> {
    let cfg = emb.config();
    let (img, heads) = (cfg.img, cfg.heads);
    let g = img / cfg.patch;
    let zoom = match args.zoom {
        Some(0) => return Err(SereError::Other("--zoom must be at least 1".into())),
        Some(z) => z,
        None => MIN_PANEL.div_ceil(img).max(1),
    };
    let side = img.saturating_mul(zoom);
    if side > MAX_PANEL {
        return Err(SereError::Other(format!(
            "--zoom {zoom} makes {side}-px panels; the largest is {MAX_PANEL}"
        )));
    }
    let rasters = inputs(args)?;
    if rasters.is_empty() {
        return Err(SereError::Other(format!(
            "{} has no images to draw",
            args.data
        )));
    }
    fs::create_dir_all(&args.out)
        .map_err(|e| SereError::io("cannot create output directory", &args.out, e))?;
    let tf = EvalTransform::new(img);
    let mut acts = None;
    let mut written = Vec::new();
    for (i, raster) in rasters.iter().enumerate() {
        let view = tf.apply(raster);
        emb.forward(&view, 1, &mut acts)?;
        let acts = acts.as_ref().expect("forward shaped it");
        let m = maps(emb.backend(), acts, cfg.depth, cfg.dim, heads)?;

        let mut attn = canvas(1 + m.attention.len(), side);
        draw_input(&mut attn, &view, &tf, side);
        for (k, map) in m.attention.iter().enumerate() {
            draw_map(&mut attn, map, g, k + 1, side);
        }
        let mut rel = canvas(1 + m.relation.len(), side);
        draw_input(&mut rel, &view, &tf, side);
        for (k, (map, &q)) in m.relation.iter().zip(&query_patches(g)).enumerate() {
            draw_map(&mut rel, map, g, k + 1, side);
            outline(&mut rel, q, g, 0, side, QUERY_COLOURS[k]);
            outline(&mut rel, q, g, k + 1, side, QUERY_COLOURS[k]);
        }
        for (suffix, png) in [("attn", &attn), ("relation", &rel)] {
            let path = args.out.join(format!("img{i:03}_{suffix}.png"));
            write_png_atomic(&path, png)?;
            written.push(path);
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viridis_ends_and_midpoint_and_rising_lightness() {
        assert_eq!(viridis(0.0), [68, 1, 84]);
        assert_eq!(viridis(1.0), [253, 231, 37]);
        assert_eq!(viridis(0.5), [33, 144, 140]);
        assert_eq!(viridis(-3.0), viridis(0.0));
        assert_eq!(viridis(7.0), viridis(1.0));
        assert_eq!(viridis(f32::NAN), viridis(0.0));
        // Between two samples: the average of both.
        assert_eq!(viridis(1.0 / 16.0), [70, 23, 104]);
        let luma = |c: [u8; 3]| 0.299 * c[0] as f32 + 0.587 * c[1] as f32 + 0.114 * c[2] as f32;
        for k in 0..100 {
            let (a, b) = (k as f32 / 100.0, (k + 1) as f32 / 100.0);
            assert!(luma(viridis(b)) >= luma(viridis(a)) - 0.5, "{a}");
        }
    }

    #[test]
    fn nearest_upsampling_and_normalisation() {
        let up = upsample_nearest(&[1.0, 2.0, 3.0, 4.0], 2, 4);
        assert_eq!(
            up,
            [1., 1., 2., 2., 1., 1., 2., 2., 3., 3., 4., 4., 3., 3., 4., 4.]
        );
        // A size that is not a multiple: corners keep the corner cells.
        let m: Vec<f32> = (0..9).map(|v| v as f32).collect();
        let up = upsample_nearest(&m, 3, 7);
        assert_eq!((up[0], up[6], up[42], up[48]), (0.0, 2.0, 6.0, 8.0));
        assert_eq!(upsample_nearest(&m, 3, 3), m);
        let mut v = [1.0, 3.0, 2.0];
        min_max_normalize(&mut v);
        assert_eq!(v, [0.0, 1.0, 0.5]);
        let mut c = [5.0; 4];
        min_max_normalize(&mut c);
        assert_eq!(c, [0.0; 4]);
    }

    #[test]
    fn layout_and_queries() {
        assert_eq!(row_width(1, 32), 32);
        assert_eq!(row_width(3, 32), 3 * 32 + 2 * GAP);
        assert_eq!(query_patches(8), [(4, 4), (2, 2), (2, 6), (6, 2), (6, 6)]);
        assert!(query_patches(1).iter().all(|&q| q == (0, 0)));
    }
}
