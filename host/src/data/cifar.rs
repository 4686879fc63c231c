//! CIFAR-10 in its binary form: `data_batch_1.bin` .. `data_batch_5.bin`
//! and `test_batch.bin`, each a run of 3073-byte records (one label byte,
//! then 1024 red, 1024 green and 1024 blue bytes of a 32 x 32 image, rows
//! top to bottom). The directory may also be the parent of the archive's
//! `cifar-10-batches-bin/` folder. Planes are interleaved to HWC on load.

use std::path::{Path, PathBuf};

use super::dataset::{Dataset, Split};
use super::error::{DataError, Result};

const SIDE: usize = 32;
const PLANE: usize = SIDE * SIDE;
const RECORD: usize = 1 + 3 * PLANE;
const NAMES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// The directory holding the batches: `dir` itself or its
/// `cifar-10-batches-bin` child, whichever has `data_batch_1.bin`.
pub fn batches_dir(dir: &Path) -> Option<PathBuf> {
    [dir.to_path_buf(), dir.join("cifar-10-batches-bin")]
        .into_iter()
        .find(|d| d.join("data_batch_1.bin").is_file())
}

/// Parses one batch file's records, appending HWC pixels and labels.
pub fn parse_batch(
    bytes: &[u8],
    path: &Path,
    pixels: &mut Vec<u8>,
    labels: &mut Vec<u32>,
) -> Result<()> {
    if bytes.is_empty() || bytes.len() % RECORD != 0 {
        return Err(DataError::Format {
            path: path.to_path_buf(),
            format: "CIFAR-10 batch",
            detail: format!(
                "{} bytes is not a whole number of {RECORD}-byte records; the file is truncated or not the binary version",
                bytes.len()
            ),
        });
    }
    for rec in bytes.chunks_exact(RECORD) {
        if rec[0] >= 10 {
            return Err(DataError::Format {
                path: path.to_path_buf(),
                format: "CIFAR-10 batch",
                detail: format!(
                    "label {} at record {} (labels are 0..9)",
                    rec[0],
                    labels.len()
                ),
            });
        }
        labels.push(rec[0] as u32);
        let planes = &rec[1..];
        for k in 0..PLANE {
            pixels.extend_from_slice(&[planes[k], planes[PLANE + k], planes[2 * PLANE + k]]);
        }
    }
    Ok(())
}

fn read_batches(files: &[PathBuf]) -> Result<Split> {
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for f in files {
        let bytes = std::fs::read(f).map_err(|e| DataError::io(f, e))?;
        parse_batch(&bytes, f, &mut pixels, &mut labels)?;
    }
    Split::packed(SIDE, SIDE, 3, pixels, labels)
}

/// Loads CIFAR-10: the training batches present among 1..=5 (the first one
/// is required) and `test_batch.bin` when present.
pub fn load(dir: &Path) -> Result<Dataset> {
    let root = batches_dir(dir).ok_or(DataError::Missing {
        what: "CIFAR-10 data_batch_1.bin",
        path: dir.to_path_buf(),
        hint: "pass the folder of the binary version (cifar-10-batches-bin) holding data_batch_1.bin .. data_batch_5.bin and test_batch.bin",
    })?;
    let train_files: Vec<PathBuf> = (1..=5)
        .map(|i| root.join(format!("data_batch_{i}.bin")))
        .filter(|p| p.is_file())
        .collect();
    let train = read_batches(&train_files)?;
    let test_file = root.join("test_batch.bin");
    let test = if test_file.is_file() {
        Some(read_batches(&[test_file])?)
    } else {
        None
    };
    // batches.meta.txt, when present, lists the class names one a line.
    let classes = std::fs::read_to_string(root.join("batches.meta.txt"))
        .ok()
        .map(|s| {
            s.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .filter(|v| v.len() == 10)
        .unwrap_or_else(|| NAMES.iter().map(|s| s.to_string()).collect());
    Ok(Dataset {
        name: format!("cifar10 {}", root.display()),
        classes,
        train,
        test,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(label: u8, seed: u8) -> Vec<u8> {
        let mut r = vec![label];
        for c in 0..3u8 {
            r.extend((0..PLANE).map(|k| (k as u8).wrapping_mul(3).wrapping_add(seed + 50 * c)));
        }
        r
    }

    #[test]
    fn parses_batches_in_a_nested_folder() {
        let d = std::env::temp_dir().join(format!("sere-cifar-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let b = d.join("cifar-10-batches-bin");
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(
            b.join("data_batch_1.bin"),
            [record(3, 0), record(9, 1)].concat(),
        )
        .unwrap();
        std::fs::write(b.join("data_batch_2.bin"), record(0, 2)).unwrap();
        std::fs::write(b.join("test_batch.bin"), record(5, 7)).unwrap();
        let ds = load(&d).unwrap();
        assert_eq!(ds.train.labels(), &[3, 9, 0]);
        assert_eq!(ds.test.as_ref().unwrap().labels(), &[5]);
        assert_eq!(ds.classes[3], "cat");
        let img = ds.train.image(1).unwrap();
        // Pixel (x=5, y=2) is plane index 69 of each colour plane.
        let k = 2 * 32 + 5;
        let want = |c: u8| (k as u8).wrapping_mul(3).wrapping_add(1 + 50 * c);
        assert_eq!(
            [img.get(5, 2, 0), img.get(5, 2, 1), img.get(5, 2, 2)],
            [want(0), want(1), want(2)]
        );

        std::fs::write(b.join("data_batch_2.bin"), &record(0, 2)[..100]).unwrap();
        let e = load(&d).unwrap_err().to_string();
        assert!(
            e.contains("data_batch_2.bin") && e.contains("truncated"),
            "{e}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
