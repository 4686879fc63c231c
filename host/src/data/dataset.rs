//! In-memory images, labelled splits and datasets.
//!
//! A split either holds its pixels in memory (synthetic, IDX, CIFAR: small,
//! fixed-size images packed into one shared buffer) or a list of files that
//! are decoded on demand, so that decoding happens in parallel inside the
//! loader, ahead of the training step, instead of all at start-up.
//! Splits are cheap to clone (`Arc` inside) so the loader thread can own one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ndarray::{Array3, ArrayView3};

use super::error::{DataError, Result};

/// An 8-bit image of shape `(height, width, channels)` (rows top to bottom,
/// channels interleaved: HWC), with 1 (grayscale) or 3 (RGB) channels, in
/// standard (row-major, contiguous) layout. Grayscale reads as three equal
/// channels through [`Raster::get`], so MNIST-like sources need no
/// conversion copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Raster {
    /// Invariant: non-empty, 1 or 3 channels, standard layout (every
    /// constructor makes it so; [`Raster::as_slice`] relies on it).
    pixels: Array3<u8>,
}

impl Raster {
    /// A `width x height` image of `channels` from `height * width *
    /// channels` HWC bytes; a size or length that does not fit is an error.
    ///
    /// ```rust
    /// use sere_host::data::Raster;
    /// let img = Raster::new(2, 1, 3, vec![1, 2, 3, 4, 5, 6]).unwrap();
    /// assert_eq!((img.width(), img.height(), img.get(1, 0, 2)), (2, 1, 6));
    /// assert!(Raster::new(2, 2, 3, vec![0; 5]).is_err());
    /// ```
    pub fn new(width: usize, height: usize, channels: usize, data: Vec<u8>) -> Result<Self> {
        check_shape(width, height, channels)?;
        if data.len() != width * height * channels {
            return Err(DataError::config(
                "raster",
                format!(
                    "{} bytes for {width}x{height}x{channels} (expected {})",
                    data.len(),
                    width * height * channels
                ),
            ));
        }
        let pixels = Array3::from_shape_vec((height, width, channels), data)
            .map_err(|e| DataError::config("raster", e.to_string()))?;
        Ok(Raster { pixels })
    }

    /// An image from `(height, width, channels)` pixels of any layout (a
    /// non-standard one is copied into standard order once); an empty image
    /// or a channel count other than 1 or 3 is an error.
    ///
    /// ```rust
    /// use ndarray::Array3;
    /// use sere_host::data::Raster;
    /// let img = Raster::from_array(Array3::from_elem((4, 5, 1), 7u8)).unwrap();
    /// assert_eq!((img.width(), img.height(), img.channels()), (5, 4, 1));
    /// assert_eq!(img.get(4, 3, 2), 7); // grayscale repeats its channel
    /// assert!(Raster::from_array(Array3::zeros((4, 5, 2))).is_err());
    /// ```
    pub fn from_array(pixels: Array3<u8>) -> Result<Self> {
        let (h, w, c) = pixels.dim();
        check_shape(w, h, c)?;
        let pixels = if pixels.is_standard_layout() {
            pixels
        } else {
            pixels.as_standard_layout().into_owned()
        };
        Ok(Raster { pixels })
    }

    /// The pixels, shaped `(height, width, channels)`.
    ///
    /// ```rust
    /// use sere_host::data::Raster;
    /// let img = Raster::new(3, 2, 1, (0..6).collect()).unwrap();
    /// assert_eq!(img.pixels().dim(), (2, 3, 1));
    /// assert_eq!(img.pixels()[[1, 0, 0]], 3);
    /// ```
    pub fn pixels(&self) -> ArrayView3<'_, u8> {
        self.pixels.view()
    }

    /// All bytes in HWC order, for per-pixel loops that index them directly.
    pub fn as_slice(&self) -> &[u8] {
        // Every constructor keeps the array in standard layout: a failure
        // here is a bug in this module, never the input's.
        self.pixels
            .as_slice()
            .expect("Raster's constructors keep standard layout")
    }

    /// Width in pixels (> 0).
    pub fn width(&self) -> usize {
        self.pixels.dim().1
    }

    /// Height in pixels (> 0).
    pub fn height(&self) -> usize {
        self.pixels.dim().0
    }

    /// Channels: 1 or 3.
    pub fn channels(&self) -> usize {
        self.pixels.dim().2
    }

    /// Channel `c` (0..3) of pixel `(x, y)`; grayscale repeats its channel.
    #[inline]
    pub fn get(&self, x: usize, y: usize, c: usize) -> u8 {
        let c = if self.channels() == 1 { 0 } else { c };
        self.pixels[[y, x, c]]
    }
}

/// Refuses an empty image or one with other than 1 or 3 channels.
fn check_shape(width: usize, height: usize, channels: usize) -> Result<()> {
    if width == 0 || height == 0 || !(channels == 1 || channels == 3) {
        return Err(DataError::config(
            "raster",
            format!("{width}x{height}x{channels}: need non-zero size and 1 or 3 channels"),
        ));
    }
    Ok(())
}

/// Where a split's pixels live.
#[derive(Debug, Clone)]
enum Pixels {
    /// `n` images of one size packed HWC one after another.
    Packed {
        width: usize,
        height: usize,
        channels: usize,
        data: Arc<[u8]>,
    },
    /// One image file per sample, decoded when asked for.
    Files(Arc<[PathBuf]>),
}

/// One split (train or test) of a dataset: images with class labels.
#[derive(Debug, Clone)]
pub struct Split {
    pixels: Pixels,
    labels: Arc<[u32]>,
}

impl Split {
    /// A split of `labels.len()` fixed-size images packed HWC in `data`.
    pub fn packed(
        width: usize,
        height: usize,
        channels: usize,
        data: Vec<u8>,
        labels: Vec<u32>,
    ) -> Result<Self> {
        if width == 0 || height == 0 || !(channels == 1 || channels == 3) {
            return Err(DataError::config(
                "split",
                format!("{width}x{height}x{channels}: need non-zero size and 1 or 3 channels"),
            ));
        }
        let each = width * height * channels;
        if data.len() != each * labels.len() {
            return Err(DataError::config(
                "split",
                format!(
                    "{} bytes for {} images of {each} bytes",
                    data.len(),
                    labels.len()
                ),
            ));
        }
        Ok(Split {
            pixels: Pixels::Packed {
                width,
                height,
                channels,
                data: data.into(),
            },
            labels: labels.into(),
        })
    }

    /// A split of image files (JPEG or PNG), decoded lazily by [`Split::image`].
    pub fn files(paths: Vec<PathBuf>, labels: Vec<u32>) -> Result<Self> {
        if paths.len() != labels.len() {
            return Err(DataError::config(
                "split",
                format!("{} files but {} labels", paths.len(), labels.len()),
            ));
        }
        Ok(Split {
            pixels: Pixels::Files(paths.into()),
            labels: labels.into(),
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the split has no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// All labels, in sample order.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// Label of sample `i`.
    pub fn label(&self, i: usize) -> u32 {
        self.labels[i]
    }

    /// The file behind sample `i`, for file-backed splits.
    pub fn path(&self, i: usize) -> Option<&Path> {
        match &self.pixels {
            Pixels::Files(p) => Some(&p[i]),
            Pixels::Packed { .. } => None,
        }
    }

    /// Sample `i` as a raster (copied from memory, or decoded from its file).
    pub fn image(&self, i: usize) -> Result<Raster> {
        match &self.pixels {
            Pixels::Packed {
                width,
                height,
                channels,
                data,
            } => {
                let each = width * height * channels;
                Raster::new(
                    *width,
                    *height,
                    *channels,
                    data[i * each..(i + 1) * each].to_vec(),
                )
            }
            Pixels::Files(paths) => decode_file(&paths[i]),
        }
    }

    /// `n` samples spread evenly over the split (all of them if it has no
    /// more): sample `floor(i * len / n)` for `i < n`, so a split stored
    /// class by class (an image folder) still gives every class its share.
    pub fn spread(&self, n: usize) -> Split {
        let len = self.len();
        if n >= len {
            return self.clone();
        }
        self.select((0..n).map(|i| i * len / n))
    }

    /// The first `n` samples (or all, if fewer): quick runs and tests.
    pub fn truncated(&self, n: usize) -> Split {
        self.select(0..n.min(self.len()))
    }

    /// The samples at `picks` (in range), in that order.
    fn select(&self, picks: impl Iterator<Item = usize> + Clone) -> Split {
        let pixels = match &self.pixels {
            Pixels::Packed {
                width,
                height,
                channels,
                data,
            } => {
                let each = width * height * channels;
                let mut out = Vec::new();
                for i in picks.clone() {
                    out.extend_from_slice(&data[i * each..(i + 1) * each]);
                }
                Pixels::Packed {
                    width: *width,
                    height: *height,
                    channels: *channels,
                    data: out.into(),
                }
            }
            Pixels::Files(p) => Pixels::Files(picks.clone().map(|i| p[i].clone()).collect()),
        };
        Split {
            pixels,
            labels: picks.map(|i| self.labels[i]).collect(),
        }
    }
}

/// Decodes one JPEG or PNG file to an RGB raster; the error names the file.
pub fn decode_file(path: &Path) -> Result<Raster> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let complete = !bytes.starts_with(&[0xFF, 0xD8, 0xFF]) || jpeg_is_complete(&bytes);
    let img = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DataError::io(path, e))?
        .decode()
        .map_err(|source| DataError::Decode {
            path: path.to_path_buf(),
            source,
        })?;
    if !complete {
        // The JPEG decoder fills a cut-off image in without a word.
        return Err(DataError::Format {
            path: path.to_path_buf(),
            format: "JPEG",
            detail: "it ends before its end-of-image marker: the file is truncated (an \
                     interrupted download or copy); replace or remove it"
                .into(),
        });
    }
    let rgb = img.into_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    if w == 0 || h == 0 {
        return Err(DataError::Format {
            path: path.to_path_buf(),
            format: "image",
            detail: "the image has zero width or height".into(),
        });
    }
    Raster::new(w, h, 3, rgb.into_raw())
}

/// Whether a JPEG file has an end-of-image marker (`FF D9`) after the start
/// of its last scan (`FF DA`). Neither can occur inside entropy-coded data
/// (a data `FF` is always followed by `00`), so a file cut short lacks it;
/// bytes after the marker (padding) are allowed.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let Some(sos) = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]) else {
        return false;
    };
    bytes[sos..].windows(2).any(|w| w == [0xFF, 0xD9])
}

/// A dataset: its class names, a training split and an optional test split.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Short description for logs, e.g. `synthetic 32px` or the root path.
    pub name: String,
    /// Class names; labels index into this.
    pub classes: Vec<String>,
    /// Training split (used for pre-training and as the k-NN memory bank).
    pub train: Split,
    /// Test split, when the source has one.
    pub test: Option<Split>,
}

impl Dataset {
    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// The test split, or an error saying the source has none.
    pub fn test_split(&self) -> Result<&Split> {
        self.test.as_ref().ok_or_else(|| {
            DataError::config(
                "dataset",
                format!(
                    "{} has no test split; evaluation needs one (for folders: root/val/<class>/...)",
                    self.name
                ),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_evenly_spaced_samples_of_every_class() {
        // 12 one-pixel grey images stored class by class: 0 0 0 0 1 1 1 1 2 2 2 2.
        let labels: Vec<u32> = (0..12).map(|i| i / 4).collect();
        let data: Vec<u8> = (0..12).collect();
        let split = Split::packed(1, 1, 1, data, labels).unwrap();
        let s = split.spread(6);
        assert_eq!(s.labels(), &[0, 0, 1, 1, 2, 2]);
        let firsts: Vec<u8> = (0..6).map(|i| s.image(i).unwrap().as_slice()[0]).collect();
        assert_eq!(firsts, [0, 2, 4, 6, 8, 10]);
        assert_eq!(split.spread(3).labels(), &[0, 1, 2]);
        assert_eq!(split.spread(50).len(), 12);
        let files = Split::files(
            (0..4).map(|i| PathBuf::from(format!("{i}.png"))).collect(),
            vec![0, 0, 1, 1],
        )
        .unwrap();
        let f = files.spread(2);
        assert_eq!(
            (f.path(1), f.labels()),
            (Some(Path::new("2.png")), &[0u32, 1][..])
        );
    }
}
