//! MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST, ...).
//!
//! A directory holds `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
//! `t10k-images-idx3-ubyte` and `t10k-labels-idx1-ubyte`, each possibly
//! gzip-compressed (`.gz`); the `name.idx3-ubyte` spelling is accepted too.
//! Debian's `dataset-fashion-mnist` package installs such a directory in
//! `/usr/share/datasets/fashion-mnist`. Images stay single-channel in memory
//! and read as RGB through [`Raster::get`](super::Raster::get).

use std::io::Read;
use std::path::{Path, PathBuf};

use super::dataset::{Dataset, Split};
use super::error::{DataError, Result};

/// Fashion-MNIST's class names, used when the directory's path says
/// "fashion"; other IDX sets get their digit labels as names.
const FASHION: [&str; 10] = [
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
];

/// Whether `dir` looks like an IDX dataset (any `*idx3-ubyte*` file).
pub fn looks_like_idx(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().contains("idx3-ubyte"))
        })
        .unwrap_or(false)
}

/// Finds `{prefix}-{kind}-ubyte[.gz]` (or `{prefix}.{kind}-ubyte[.gz]`) in `dir`.
fn find(dir: &Path, prefix: &str, kind: &str) -> Option<PathBuf> {
    for sep in ["-", "."] {
        for ext in ["", ".gz"] {
            let p = dir.join(format!("{prefix}{sep}{kind}-ubyte{ext}"));
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Reads a whole file, inflating it when its name ends in `.gz`.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::Format {
                path: path.to_path_buf(),
                format: "gzip",
                detail: format!("{e}; re-download or gunzip the file"),
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an IDX file of unsigned bytes with `ndims` dimensions; returns the
/// dimensions and the payload.
pub fn parse_idx(bytes: &[u8], ndims: usize, path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let bad = |detail: String| DataError::Format {
        path: path.to_path_buf(),
        format: if ndims == 1 {
            "IDX labels"
        } else {
            "IDX images"
        },
        detail,
    };
    if bytes.len() < 4 {
        return Err(bad(format!("only {} bytes", bytes.len())));
    }
    if bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 || bytes[3] as usize != ndims {
        return Err(bad(format!(
            "magic number {:02x}{:02x}{:02x}{:02x}, expected 000008{ndims:02x} (unsigned bytes, {ndims} dimensions)",
            bytes[0], bytes[1], bytes[2], bytes[3]
        )));
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(bad("truncated header".into()));
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let n = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
    if bytes.len() - header != n {
        return Err(bad(format!(
            "dimensions {dims:?} need {n} bytes of data, the file has {}",
            bytes.len() - header
        )));
    }
    Ok((dims, bytes[header..].to_vec()))
}

/// Loads one split (`train` or `t10k`) from `dir`.
fn load_split(dir: &Path, prefix: &str) -> Result<Option<Split>> {
    let (Some(ip), lp) = (
        find(dir, prefix, "images-idx3"),
        find(dir, prefix, "labels-idx1"),
    ) else {
        return Ok(None);
    };
    let lp = lp.ok_or(DataError::Missing {
        what: "IDX label file",
        path: dir.join(format!("{prefix}-labels-idx1-ubyte[.gz]")),
        hint: "every images file needs its labels file beside it",
    })?;
    let (idims, pixels) = parse_idx(&read_maybe_gz(&ip)?, 3, &ip)?;
    let (ldims, labels) = parse_idx(&read_maybe_gz(&lp)?, 1, &lp)?;
    if idims[0] != ldims[0] {
        return Err(DataError::Inconsistent {
            path: dir.to_path_buf(),
            detail: format!(
                "{} has {} images but {} has {} labels",
                ip.display(),
                idims[0],
                lp.display(),
                ldims[0]
            ),
        });
    }
    if idims[1] == 0 || idims[2] == 0 {
        return Err(DataError::Format {
            path: ip,
            format: "IDX images",
            detail: format!("image size {}x{}", idims[2], idims[1]),
        });
    }
    let labels = labels.into_iter().map(u32::from).collect();
    // IDX is rows x columns: dims are [n, height, width].
    Split::packed(idims[2], idims[1], 1, pixels, labels).map(Some)
}

/// Loads an IDX dataset directory (train split required, t10k optional).
pub fn load(dir: &Path) -> Result<Dataset> {
    if !dir.is_dir() {
        return Err(DataError::Missing {
            what: "IDX dataset directory",
            path: dir.to_path_buf(),
            hint: "pass the directory holding train-images-idx3-ubyte[.gz]",
        });
    }
    let train = load_split(dir, "train")?.ok_or(DataError::Missing {
        what: "IDX training images",
        path: dir.join("train-images-idx3-ubyte[.gz]"),
        hint: "the directory must hold train-images-idx3-ubyte and train-labels-idx1-ubyte (optionally .gz)",
    })?;
    let test = load_split(dir, "t10k")?;
    let max_label = train
        .labels()
        .iter()
        .chain(test.iter().flat_map(|t| t.labels()))
        .copied()
        .max()
        .unwrap_or(0) as usize;
    let fashion = dir.to_string_lossy().to_lowercase().contains("fashion") && max_label < 10;
    let classes = (0..=max_label)
        .map(|i| {
            if fashion {
                FASHION[i].to_string()
            } else {
                i.to_string()
            }
        })
        .collect();
    Ok(Dataset {
        name: format!("idx {}", dir.display()),
        classes,
        train,
        test,
    })
}

/// Writes an IDX file of unsigned bytes (for tests and tools).
pub fn write_idx(dims: &[usize], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for &d in dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sere-idx-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn reads_plain_and_gz_files() {
        let d = tmpdir("ok");
        // 3 images of 4 rows x 2 columns; pixel value = 10 * image + index.
        let px: Vec<u8> = (0..3)
            .flat_map(|i| (0..8).map(move |k| 10 * i + k))
            .collect();
        std::fs::write(
            d.join("train-images-idx3-ubyte"),
            write_idx(&[3, 4, 2], &px),
        )
        .unwrap();
        std::fs::write(
            d.join("train-labels-idx1-ubyte.gz"),
            gz(&write_idx(&[3], &[2, 0, 1])),
        )
        .unwrap();
        std::fs::write(
            d.join("t10k-images-idx3-ubyte.gz"),
            gz(&write_idx(&[1, 4, 2], &px[..8])),
        )
        .unwrap();
        std::fs::write(d.join("t10k-labels-idx1-ubyte"), write_idx(&[1], &[1])).unwrap();
        assert!(looks_like_idx(&d));
        let ds = load(&d).unwrap();
        assert_eq!(ds.train.labels(), &[2, 0, 1]);
        assert_eq!(ds.classes, vec!["0", "1", "2"]);
        let img = ds.train.image(1).unwrap();
        assert_eq!((img.width(), img.height(), img.channels()), (2, 4, 1));
        // Row 3, column 1 of image 1 is byte 3 * 2 + 1 = 7; gray reads as RGB.
        assert_eq!(img.get(1, 3, 0), 17);
        assert_eq!(img.get(1, 3, 2), 17);
        assert_eq!(ds.test.unwrap().len(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn rejects_bad_files() {
        let d = tmpdir("bad");
        std::fs::write(
            d.join("train-images-idx3-ubyte"),
            write_idx(&[2, 2, 2], &[0; 7]),
        )
        .unwrap();
        std::fs::write(d.join("train-labels-idx1-ubyte"), write_idx(&[2], &[0, 1])).unwrap();
        let e = load(&d).unwrap_err().to_string();
        assert!(
            e.contains("train-images-idx3-ubyte") && e.contains("need 8 bytes"),
            "{e}"
        );

        std::fs::write(
            d.join("train-images-idx3-ubyte"),
            write_idx(&[3, 2, 2], &[0; 12]),
        )
        .unwrap();
        let e = load(&d).unwrap_err().to_string();
        assert!(e.contains("3 images but") && e.contains("2 labels"), "{e}");

        std::fs::write(
            d.join("train-labels-idx1-ubyte"),
            [0u8, 0, 0x0d, 1, 0, 0, 0, 3],
        )
        .unwrap();
        let e = load(&d).unwrap_err();
        assert!(matches!(e, DataError::Format { .. }), "{e}");
        assert!(e.to_string().contains("magic number"), "{e}");

        std::fs::remove_file(d.join("train-labels-idx1-ubyte")).unwrap();
        let e = load(&d).unwrap_err();
        assert!(matches!(e, DataError::Missing { .. }), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
