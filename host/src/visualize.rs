//! `sere visualize`: what a checkpoint's teacher backbone looks at.
//!
//! For every image (the evaluation view at the checkpoint's size, as k-NN
//! sees it, or at `--image-size`: the position embedding is interpolated,
//! so the maps have more patches) two PNGs are written, each a sheet of
//! labelled panels with a viridis colour bar (low to high) at the right:
//! - `<name>_attn.png`: the CLS token's attention over the patches in the
//!   last block. Its first row is the input, then one heat map per head
//!   and their mean; the second row the same maps alpha-blended over the
//!   image; with `--threshold T` a third row, DINO's masks: per head the
//!   patches holding the fraction `T` of its attention mass, tinted over
//!   the image, the rest darkened.
//! - `<name>_relation.png`: spatial self-relations of the final patch
//!   tokens (SERE's `softmax_row(X_h X_h^T / sqrt(d))` per head, averaged
//!   over heads) for five query patches (the centre and the four quarter
//!   points), each query outlined in its own colour on the input and on its
//!   map.
//!
//! `<name>` is the input file's stem (`dog` for `photos/dog.jpg`; a stem
//! met again gets `-2`, `-3`, ...), or `test00003` / `train00003` for the
//! dataset's images by split and index. Maps are upsampled (nearest: one
//! cell per patch) to the panel size, each min-max normalised on its own.
//! Files are written atomically, and files already in `--out` are replaced
//! only with `--force`.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use image::{ImageFormat, Rgb, RgbImage};
use ndarray::{ArrayView3, Axis};
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

/// Height of the label strip above every row of panels.
pub const LABEL_H: usize = 18;
/// Width of the colour bar.
const BAR_W: usize = 12;
/// Width right of the panels taken by the colour bar and its labels.
pub const BAR_AREA: usize = GAP + BAR_W + 4 + 34;
/// Pixel size of the label text.
const LABEL_PX: f64 = 13.0;
/// Most patches a map may have: the attention and relation workspaces
/// grow with the square of this (4096: 64 x 64, DINO's 480 px at patch 8
/// is 60 x 60).
pub const MAX_PATCHES: usize = 4096;
/// Weight of the heat map over the image in the overlay panels.
const OVERLAY_ALPHA: f32 = 0.6;
/// Weight of the tint inside a threshold mask.
const MASK_ALPHA: f32 = 0.5;
/// Brightness left outside a threshold mask.
const MASK_DIM: f32 = 0.35;
/// Tint of each head's mask (the mean's is the last, cycled past it).
const MASK_COLOURS: [[u8; 3]; 6] = [
    [255, 60, 60],
    [60, 200, 255],
    [255, 210, 40],
    [120, 255, 90],
    [255, 90, 230],
    [255, 255, 255],
];

/// Size `(width, height)` of a sheet of `rows` rows of `cols` panels of
/// side `side`, each row under its label strip, the colour bar right.
pub fn sheet_size(cols: usize, rows: usize, side: usize) -> (u32, u32) {
    let h = rows * (LABEL_H + side) + rows.saturating_sub(1) * GAP;
    ((row_width(cols, side) + BAR_AREA) as u32, h as u32)
}

/// DINO's `--threshold` rule (visualize_attention.py): the patches that
/// hold the fraction `t` of the attention mass. The values are sorted
/// ascending and normalised by their sum; a patch is kept where the
/// cumulative mass up to and including it exceeds `1 - t`: the smallest
/// set of the largest values whose mass reaches `t`.
pub fn threshold_mask(attn: &[f32], t: f32) -> Vec<bool> {
    let total: f64 = attn.iter().map(|&v| f64::from(v)).sum();
    let mut order: Vec<usize> = (0..attn.len()).collect();
    order.sort_by(|&a, &b| attn[a].total_cmp(&attn[b]));
    let mut keep = vec![false; attn.len()];
    let mut cum = 0.0;
    for &i in &order {
        cum += f64::from(attn[i]) / total;
        keep[i] = cum > 1.0 - f64::from(t);
    }
    keep
}

/// Checks `--threshold`: a fraction of the mass in `(0, 1]`.
pub fn check_threshold(t: f64) -> Result<f32, SereError> {
    if t > 0.0 && t <= 1.0 {
        return Ok(t as f32);
    }
    Err(SereError::Other(format!(
        "--threshold {t}: it is the fraction of each head's attention mass the mask keeps, so \
         it must be in (0, 1]; DINO uses 0.6"
    )))
}

/// Checks `--image-size`: a multiple of the patch, at most
/// [`MAX_PATCHES`] patches.
pub fn check_image_size(px: usize, patch: usize) -> Result<usize, SereError> {
    if px < patch || px % patch != 0 {
        let lo = px / patch * patch;
        let nearest = if lo == 0 {
            format!("{patch}")
        } else {
            format!("{lo} and {}", lo + patch)
        };
        return Err(SereError::Other(format!(
            "--image-size {px} is not a multiple of the checkpoint's patch size {patch}; the \
             nearest valid sizes are {nearest}"
        )));
    }
    let g = px / patch;
    if g * g > MAX_PATCHES {
        let side = (MAX_PATCHES as f64).sqrt() as usize;
        return Err(SereError::Other(format!(
            "--image-size {px} makes a {g} x {g} grid of {} patches; at most {MAX_PATCHES} \
             ({side} x {side}: --image-size {}) are drawn",
            g * g,
            side * patch
        )));
    }
    Ok(px)
}

/// A sheet of labelled panels being drawn.
struct Sheet {
    img: RgbImage,
    side: usize,
    /// `(x, y, width, candidates)`: a label's place, the width it may
    /// take and its texts, longest first (the first that fits is drawn;
    /// none when none fits, rather than text over the next panel).
    labels: Vec<(usize, usize, usize, Vec<String>)>,
}

impl Sheet {
    fn new(cols: usize, rows: usize, side: usize) -> Self {
        let (w, h) = sheet_size(cols, rows, side);
        Sheet {
            img: RgbImage::from_pixel(w, h, Rgb([255, 255, 255])),
            side,
            labels: Vec::new(),
        }
    }

    /// Top-left pixel of panel `(row, col)`.
    fn origin(&self, row: usize, col: usize) -> (usize, usize) {
        let y = row * (LABEL_H + self.side + GAP) + LABEL_H;
        (col * (self.side + GAP), y)
    }

    /// Fills panel `(row, col)` with `pixels` (`side x side`, row-major)
    /// and labels it.
    fn panel(&mut self, (row, col): (usize, usize), pixels: &[[u8; 3]], label: &[String]) {
        let (x0, y0) = self.origin(row, col);
        for (k, &p) in pixels.iter().enumerate() {
            let (x, y) = (x0 + k % self.side, y0 + k / self.side);
            self.img.put_pixel(x as u32, y as u32, Rgb(p));
        }
        self.labels
            .push((x0, y0 - LABEL_H, self.side, label.to_vec()));
    }

    /// Outlines patch `(r, c)` of a `g x g` grid in panel `at`.
    fn outline(&mut self, at: (usize, usize), (r, c): (usize, usize), g: usize, rgb: [u8; 3]) {
        let side = self.side;
        let span = |i: usize| (i * side / g, ((i + 1) * side / g).max(i * side / g + 1) - 1);
        let ((y0, y1), (x0, x1)) = (span(r), span(c));
        let (ox, oy) = self.origin(at.0, at.1);
        for y in y0..=y1 {
            for x in x0..=x1 {
                if y == y0 || y == y1 || x == x0 || x == x1 {
                    self.img
                        .put_pixel((ox + x) as u32, (oy + y) as u32, Rgb(rgb));
                }
            }
        }
    }

    /// The colour bar beside the first row: viridis from high (top) to
    /// low (bottom).
    fn colour_bar(&mut self) {
        let (x0, y0) = (self.img.width() as usize - BAR_AREA + GAP, LABEL_H);
        for y in 0..self.side {
            let v = 1.0 - y as f32 / (self.side - 1).max(1) as f32;
            for x in 0..BAR_W {
                self.img
                    .put_pixel((x0 + x) as u32, (y0 + y) as u32, Rgb(viridis(v)));
            }
        }
        let (tx, tw) = (x0 + BAR_W + 4, BAR_AREA - GAP - BAR_W - 4);
        let low_y = (y0 + self.side).saturating_sub(LABEL_PX as usize + 1);
        // A bar too short for both words side by side puts "high" above it.
        let high_y = if low_y >= y0 + LABEL_PX as usize + 2 {
            y0
        } else {
            0
        };
        self.labels.push((tx, high_y, tw, vec!["high".into()]));
        self.labels
            .push((tx, low_y.max(y0), tw, vec!["low".into()]));
    }

    /// Draws the labels with the embedded font and returns the picture.
    fn finish(mut self) -> Result<RgbImage, SereError> {
        self.colour_bar();
        let style = crate::font::text_style(LABEL_PX)?;
        let (w, h) = self.img.dimensions();
        let fail = |e: String| SereError::Other(format!("cannot draw the labels: {e}"));
        {
            use plotters::prelude::*;
            let root = BitMapBackend::with_buffer(&mut self.img, (w, h)).into_drawing_area();
            for (x, y, width, texts) in &self.labels {
                let fits = |t: &&String| {
                    root.estimate_text_size(t, &style)
                        .is_ok_and(|(tw, _)| tw as usize <= *width)
                };
                let Some(text) = texts.iter().find(fits) else {
                    continue;
                };
                root.draw(&Text::new(
                    text.as_str(),
                    (*x as i32 + 1, *y as i32 + 2),
                    style.clone(),
                ))
                .map_err(|e| fail(e.to_string()))?;
            }
            root.present().map_err(|e| fail(e.to_string()))?;
        }
        Ok(self.img)
    }
}

/// Label candidates, longest first.
fn label(texts: &[&str]) -> Vec<String> {
    texts.iter().map(|t| t.to_string()).collect()
}

/// The labels of the attention panels: `head 1`, ..., then `mean`.
fn head_label(k: usize, heads: usize) -> Vec<String> {
    if k == heads {
        return label(&["mean", "m"]);
    }
    vec![
        format!("head {}", k + 1),
        format!("h{}", k + 1),
        format!("{}", k + 1),
    ]
}

/// The de-normalised view (`3 x img x img`) at `side x side`.
fn input_pixels(view: ArrayView3<f32>, tf: &EvalTransform, side: usize) -> Vec<[u8; 3]> {
    let img = tf.size;
    (0..side * side)
        .map(|k| {
            let (sy, sx) = ((k / side) * img / side, (k % side) * img / side);
            [0, 1, 2].map(|c| {
                let v = view[[c, sy, sx]] * tf.std[c] + tf.mean[c];
                (v * 255.0).round().clamp(0.0, 255.0) as u8
            })
        })
        .collect()
}

/// A `g x g` map upsampled to `side x side` and min-max normalised.
fn heat(map: &[f32], g: usize, side: usize) -> Vec<f32> {
    let mut up = upsample_nearest(map, g, side);
    min_max_normalize(&mut up);
    up
}

/// `a` blended towards `b` by `alpha`.
fn blend(a: [u8; 3], b: [u8; 3], alpha: f32) -> [u8; 3] {
    [0, 1, 2].map(|c| (a[c] as f32 * (1.0 - alpha) + b[c] as f32 * alpha).round() as u8)
}

/// The mask of `map` (DINO's rule at `t`) over the input: tinted inside,
/// darkened outside.
fn mask_pixels(input: &[[u8; 3]], map: &[f32], g: usize, t: f32, tint: [u8; 3]) -> Vec<[u8; 3]> {
    let keep: Vec<f32> = threshold_mask(map, t)
        .iter()
        .map(|&k| if k { 1.0 } else { 0.0 })
        .collect();
    let side = (input.len() as f64).sqrt().round() as usize;
    let up = upsample_nearest(&keep, g, side);
    input
        .iter()
        .zip(&up)
        .map(|(&p, &k)| {
            if k > 0.5 {
                blend(p, tint, MASK_ALPHA)
            } else {
                p.map(|v| (v as f32 * MASK_DIM).round() as u8)
            }
        })
        .collect()
}

/// The attention sheet of one image: heat maps, overlays and, with a
/// threshold, the masks.
fn attention_sheet(
    m: &Maps,
    input: &[[u8; 3]],
    g: usize,
    side: usize,
    threshold: Option<f32>,
) -> Result<RgbImage, SereError> {
    let heads = m.attention.len() - 1;
    let rows = if threshold.is_some() { 3 } else { 2 };
    let mut sheet = Sheet::new(1 + m.attention.len(), rows, side);
    sheet.panel((0, 0), input, &label(&["input", "in"]));
    sheet.panel((1, 0), input, &label(&["overlay", "ovl", "o"]));
    for (k, map) in m.attention.iter().enumerate() {
        let h = heat(map, g, side);
        let colours: Vec<[u8; 3]> = h.iter().map(|&v| viridis(v)).collect();
        sheet.panel((0, k + 1), &colours, &head_label(k, heads));
        let over: Vec<[u8; 3]> = input
            .iter()
            .zip(&colours)
            .map(|(&p, &c)| blend(p, c, OVERLAY_ALPHA))
            .collect();
        sheet.panel((1, k + 1), &over, &head_label(k, heads));
        if let Some(t) = threshold {
            // The mean's tint is the palette's last, the heads cycle the rest.
            let n = MASK_COLOURS.len() - 1;
            let tint = MASK_COLOURS[if k == heads { n } else { k % n }];
            sheet.panel(
                (2, k + 1),
                &mask_pixels(input, map, g, t, tint),
                &head_label(k, heads),
            );
        }
    }
    if let Some(t) = threshold {
        let pct = format!("{:.0}% mass", 100.0 * t);
        sheet.panel((2, 0), input, &[pct, format!("{:.0}%", 100.0 * t)]);
    }
    sheet.finish()
}

/// The relation sheet of one image: the input with the query patches
/// outlined, then each query's relation map.
fn relation_sheet(
    m: &Maps,
    input: &[[u8; 3]],
    g: usize,
    side: usize,
) -> Result<RgbImage, SereError> {
    let mut sheet = Sheet::new(1 + m.relation.len(), 1, side);
    sheet.panel((0, 0), input, &label(&["input", "in"]));
    for (k, (map, &q)) in m.relation.iter().zip(&query_patches(g)).enumerate() {
        let colours: Vec<[u8; 3]> = heat(map, g, side).iter().map(|&v| viridis(v)).collect();
        let name = [format!("query {}", k + 1), format!("q{}", k + 1)];
        sheet.panel((0, k + 1), &colours, &name);
        sheet.outline((0, 0), q, g, QUERY_COLOURS[k]);
        sheet.outline((0, k + 1), q, g, QUERY_COLOURS[k]);
    }
    sheet.finish()
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

/// Output names made unique: a name met again gets `-2`, `-3`, ... (never
/// one already taken), so two inputs never write the same files.
pub fn unique_stems(stems: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut taken = std::collections::HashSet::new();
    let mut out = Vec::new();
    for stem in stems {
        let mut name = stem.clone();
        let mut k = 2;
        while !taken.insert(name.clone()) {
            name = format!("{stem}-{k}");
            k += 1;
        }
        out.push(name);
    }
    out
}

/// The images to draw, each with the stem of its output files: the
/// `--image` files (named after them), else the first `--count` test
/// images (training images if there is no test split) of `--data` (named
/// by split and index). Every input is read before anything is written.
fn inputs(args: &VisualizeArgs) -> Result<Vec<(String, Raster)>, SereError> {
    if !args.image.is_empty() {
        let stems = args.image.iter().map(|p| {
            p.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "image".into())
        });
        let rasters = args
            .image
            .iter()
            .map(|p| decode_file(p).map_err(SereError::data))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(unique_stems(stems).into_iter().zip(rasters).collect());
    }
    if args.count == 0 {
        return Err(SereError::Other("--count must be at least 1".into()));
    }
    let data = DataSpec::parse(&args.data)
        .and_then(|s| s.open())
        .map_err(SereError::data)?;
    let (split, name) = match data.test.as_ref() {
        Some(test) => (test, "test"),
        None => (&data.train, "train"),
    };
    (0..args.count.min(split.len()))
        .map(|i| {
            let raster = split.image(i).map_err(SereError::data)?;
            Ok((format!("{name}{i:05}"), raster))
        })
        .collect()
}

/// The panel side: the view's side times `--zoom` (default: at least
/// [`MIN_PANEL`] px), at most [`MAX_PANEL`].
fn panel_side(img: usize, zoom: Option<usize>) -> Result<usize, SereError> {
    let zoom = match zoom {
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
    Ok(side)
}

/// The files each input gets, in order; refused when one exists and
/// `--force` is not given (before anything is drawn).
fn targets(args: &VisualizeArgs, stems: &[&str]) -> Result<Vec<PathBuf>, SereError> {
    let paths: Vec<PathBuf> = stems
        .iter()
        .flat_map(|s| ["attn", "relation"].map(|k| args.out.join(format!("{s}_{k}.png"))))
        .collect();
    if let Some(p) = paths.iter().find(|p| p.exists()).filter(|_| !args.force) {
        return Err(SereError::Other(format!(
            "{} already exists; pass --force to replace the maps in {}, or choose another --out",
            p.display(),
            args.out.display()
        )));
    }
    Ok(paths)
}

/// Draws every input and returns the files written, in order.
pub fn run<B: Backend>(emb: &Embedder<B>, args: &VisualizeArgs) -> Result<Vec<PathBuf>, SereError> {
    let cfg = emb.config();
    let img = match args.image_size {
        Some(px) => check_image_size(px, cfg.patch)?,
        None => cfg.img,
    };
    let threshold = args.threshold.map(check_threshold).transpose()?;
    let g = img / cfg.patch;
    let side = panel_side(img, args.zoom)?;
    let inputs = inputs(args)?;
    if inputs.is_empty() {
        return Err(SereError::Other(format!(
            "{} has no images to draw",
            args.data
        )));
    }
    let stems: Vec<&str> = inputs.iter().map(|(s, _)| s.as_str()).collect();
    let paths = targets(args, &stems)?;
    fs::create_dir_all(&args.out)
        .map_err(|e| SereError::io("cannot create output directory", &args.out, e))?;
    let tf = EvalTransform::new(img);
    let mut acts = None;
    for ((_, raster), files) in inputs.iter().zip(paths.chunks(2)) {
        let view = tf.apply(raster).map_err(SereError::data)?;
        emb.forward_at(view.view().insert_axis(Axis(0)), img, &mut acts)?;
        let acts = acts.as_ref().expect("forward shaped it");
        let m = maps(emb.backend(), acts, cfg.depth, cfg.dim, cfg.heads)?;
        let input = input_pixels(view.view(), &tf, side);
        write_png_atomic(&files[0], &attention_sheet(&m, &input, g, side, threshold)?)?;
        write_png_atomic(&files[1], &relation_sheet(&m, &input, g, side)?)?;
    }
    Ok(paths)
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
        let (w, h) = sheet_size(4, 2, 32);
        assert_eq!(w as usize, 4 * 32 + 3 * GAP + BAR_AREA);
        assert_eq!(h as usize, 2 * (LABEL_H + 32) + GAP);
    }

    /// DINO's rule by hand: attention 0.1, 0.4, 0.2, 0.3 sorted ascending
    /// has cumulative mass 0.1, 0.3, 0.6, 1.0 (values 0.1, 0.2, 0.3, 0.4).
    #[test]
    fn threshold_keeps_the_top_mass_as_dino() {
        let a = [0.1, 0.4, 0.2, 0.3];
        // T = 0.5: cumulative > 0.5 keeps 0.3 and 0.4 (mass 0.7).
        assert_eq!(threshold_mask(&a, 0.5), [false, true, false, true]);
        // T = 0.35: > 0.65 keeps 0.4 alone (its mass 0.4 reaches 0.35).
        assert_eq!(threshold_mask(&a, 0.35), [false, true, false, false]);
        // T = 0.75: > 0.25 keeps 0.2, 0.3, 0.4 (0.3 + 0.4 = 0.7 falls short).
        assert_eq!(threshold_mask(&a, 0.75), [false, true, true, true]);
        assert_eq!(threshold_mask(&a, 1.0), [true; 4]);
        // Mass exactly T (binary fractions: 1/8, 1/8, 1/4, 1/2): the 1/2
        // alone reaches T = 1/2, so the 1/4 is not kept (strictly > 1 - T).
        assert_eq!(
            threshold_mask(&[1.0, 1.0, 2.0, 4.0], 0.5),
            [false, false, false, true]
        );
        // Unnormalised values: the same masks.
        assert_eq!(
            threshold_mask(&[1.0, 4.0, 2.0, 3.0], 0.5),
            [false, true, false, true]
        );
    }

    #[test]
    fn threshold_and_image_size_are_checked() {
        for t in [0.0, -0.1, 1.01, f64::NAN] {
            let e = check_threshold(t).unwrap_err().to_string();
            assert!(e.contains("(0, 1]"), "{e}");
        }
        assert_eq!(check_threshold(0.6).unwrap(), 0.6);
        assert_eq!(check_threshold(1.0).unwrap(), 1.0);
        assert_eq!(check_image_size(32, 4).unwrap(), 32);
        let e = check_image_size(30, 4).unwrap_err().to_string();
        assert!(e.contains("patch size 4") && e.contains("28 and 32"), "{e}");
        let e = check_image_size(3, 4).unwrap_err().to_string();
        assert!(e.contains("nearest valid sizes are 4"), "{e}");
        let e = check_image_size(520, 8).unwrap_err().to_string();
        assert!(
            e.contains("65 x 65") && e.contains("--image-size 512"),
            "{e}"
        );
    }

    #[test]
    fn output_stems_never_collide() {
        let s = |v: &[&str]| unique_stems(v.iter().map(|s| s.to_string()));
        assert_eq!(s(&["dog", "cat"]), ["dog", "cat"]);
        assert_eq!(
            s(&["dog", "dog", "dog-2", "dog"]),
            ["dog", "dog-2", "dog-2-2", "dog-3"]
        );
    }

    /// A mask panel: kept patches tinted, the others darkened.
    #[test]
    fn mask_panel_tints_the_kept_patches() {
        let input = vec![[100u8, 100, 100]; 16];
        let px = mask_pixels(&input, &[0.1, 0.9, 0.0, 0.0], 2, 0.5, [255, 0, 0]);
        // 2 x 2 grid at 4 x 4: patch (0, 1) covers columns 2..4 of rows 0..2.
        assert_eq!(px[2], blend([100; 3], [255, 0, 0], MASK_ALPHA));
        assert_eq!(px[0], [35; 3]);
        assert_eq!(px[15], [35; 3]);
    }
}
