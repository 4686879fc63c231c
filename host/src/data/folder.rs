//! Image folders in ImageNet layout.
//!
//! Understood layouts, checked in this order:
//! - `root/train/<class>/...` with an optional `root/val/<class>/...` (or
//!   `root/test/<class>/...`) as the test split;
//! - `root/<class>/...`: a training split only;
//! - image files directly in `root`: a training split of one class,
//!   `unlabeled`, for pre-training on unlabeled images.
//!
//! Class directories are searched recursively for `.jpg`, `.jpeg` and
//! `.png` files (any case); classes and files are sorted by name so that
//! sample indices, and hence every random stream, are stable. Only paths are
//! listed here: decoding happens per sample in the loader.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::dataset::{Dataset, Split};
use super::error::{DataError, Result};

const LAYOUTS: &str =
    "expected root/train/<class>/*.jpg|png (with optional root/val/<class>/...), \
                       root/<class>/*.jpg|png, or image files directly in root";

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
        .unwrap_or(false)
}

fn is_hidden(p: &Path) -> bool {
    p.file_name()
        .map(|n| n.to_string_lossy().starts_with('.'))
        .unwrap_or(false)
}

/// Sorted entries of `dir`, hidden ones skipped.
fn entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut v = Vec::new();
    for e in rd {
        let p = e.map_err(|e| DataError::io(dir, e))?.path();
        if !is_hidden(&p) {
            v.push(p);
        }
    }
    v.sort();
    Ok(v)
}

/// Directories already listed, by (device, inode): a symbolic link back up
/// the tree (`train/a/up -> ..`) or to another class is not followed again.
type Visited = HashSet<(u64, u64)>;

/// The (device, inode) of a directory.
fn dir_key(m: &std::fs::Metadata) -> (u64, u64) {
    (m.dev(), m.ino())
}

/// Metadata of `p`, following symbolic links.
fn metadata(p: &Path) -> Result<std::fs::Metadata> {
    std::fs::metadata(p).map_err(|e| DataError::io(p, e))
}

/// All image files under `dir`, recursively, in sorted order; each
/// directory is visited once, and an image name that is not a regular file
/// (a FIFO would block the loader forever) is an error.
fn images_under(dir: &Path, out: &mut Vec<PathBuf>, visited: &mut Visited) -> Result<()> {
    for p in entries(dir)? {
        let m = metadata(&p)?;
        if m.is_dir() {
            if visited.insert(dir_key(&m)) {
                images_under(&p, out, visited)?;
            }
        } else if is_image(&p) {
            if !m.is_file() {
                return Err(DataError::BadEntry {
                    path: p,
                    detail: "is not a regular file (a FIFO, socket or device); remove it from \
                             the image folder",
                });
            }
            out.push(p);
        }
    }
    Ok(())
}

/// Class directories of `dir` (sorted) with their images. Every class
/// directory (and `dir`) counts as visited before any is walked, so a link
/// from one class into another does not relabel the other's images.
fn class_dirs(dir: &Path) -> Result<Vec<(String, Vec<PathBuf>)>> {
    let mut visited = Visited::new();
    visited.insert(dir_key(&metadata(dir)?));
    let mut dirs = Vec::new();
    for p in entries(dir)? {
        let m = metadata(&p)?;
        if m.is_dir() && visited.insert(dir_key(&m)) {
            dirs.push(p);
        }
    }
    let mut classes = Vec::new();
    for p in dirs {
        let mut files = Vec::new();
        images_under(&p, &mut files, &mut visited)?;
        let Some(name) = p.file_name().unwrap_or_default().to_str() else {
            return Err(DataError::BadEntry {
                path: p,
                detail: "is a class folder whose name is not valid UTF-8 (two such names could \
                         merge into one class); rename it",
            });
        };
        classes.push((name.to_string(), files));
    }
    Ok(classes)
}

/// Builds a split from class directories, labelling by `names`.
fn split_from(dir: &Path, found: Vec<(String, Vec<PathBuf>)>, names: &[String]) -> Result<Split> {
    let (mut paths, mut labels) = (Vec::new(), Vec::new());
    for (class, files) in found {
        let Some(label) = names.iter().position(|n| *n == class) else {
            return Err(DataError::Inconsistent {
                path: dir.join(&class),
                detail: format!(
                    "class '{class}' is not among the training classes; \
                     the test split's class folders must match the training ones"
                ),
            });
        };
        labels.extend(std::iter::repeat_n(label as u32, files.len()));
        paths.extend(files);
    }
    if paths.is_empty() {
        return Err(DataError::Empty {
            path: dir.to_path_buf(),
            hint: LAYOUTS,
        });
    }
    Split::files(paths, labels)
}

/// Lists an image folder (see the module doc for the layouts).
pub fn load(root: &Path) -> Result<Dataset> {
    if !root.is_dir() {
        return Err(DataError::Missing {
            what: "image folder",
            path: root.to_path_buf(),
            hint: LAYOUTS,
        });
    }
    let train_dir = root.join("train");
    let (train_dir, test_dir) = if train_dir.is_dir() {
        let test = ["val", "test"]
            .into_iter()
            .map(|n| root.join(n))
            .find(|p| p.is_dir());
        (train_dir, test)
    } else {
        (root.to_path_buf(), None)
    };
    let found = class_dirs(&train_dir)?;
    let (classes, train) = if found.iter().all(|(_, f)| f.is_empty()) {
        // No class folders with images: take the images lying in the root.
        let files: Vec<PathBuf> = entries(&train_dir)?
            .into_iter()
            .filter(|p| p.is_file() && is_image(p))
            .collect();
        if files.is_empty() {
            return Err(DataError::Empty {
                path: train_dir,
                hint: LAYOUTS,
            });
        }
        let labels = vec![0; files.len()];
        (vec!["unlabeled".to_string()], Split::files(files, labels)?)
    } else {
        let names: Vec<String> = found
            .iter()
            .filter(|(_, f)| !f.is_empty())
            .map(|(n, _)| n.clone())
            .collect();
        let found = found.into_iter().filter(|(_, f)| !f.is_empty()).collect();
        let train = split_from(&train_dir, found, &names)?;
        (names, train)
    };
    let test = match test_dir {
        Some(d) => {
            let found = class_dirs(&d)?
                .into_iter()
                .filter(|(_, f)| !f.is_empty())
                .collect();
            Some(split_from(&d, found, &classes)?)
        }
        None => None,
    };
    Ok(Dataset {
        name: format!("folder {}", root.display()),
        classes,
        train,
        test,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sere-folder-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn write_png(path: &Path, w: u32, h: u32, v: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([v, x as u8, y as u8]));
        img.save(path).unwrap();
    }

    #[test]
    fn imagenet_layout_with_val() {
        let d = tmpdir("inet");
        write_png(&d.join("train/cat/a.png"), 5, 4, 1);
        write_png(&d.join("train/cat/sub/b.PNG"), 5, 4, 2);
        write_png(&d.join("train/dog/c.png"), 3, 6, 3);
        std::fs::write(d.join("train/dog/notes.txt"), "not an image").unwrap();
        write_png(&d.join("val/dog/v.png"), 4, 4, 4);
        let ds = load(&d).unwrap();
        assert_eq!(ds.classes, vec!["cat", "dog"]);
        assert_eq!(ds.train.labels(), &[0, 0, 1]);
        let img = ds.train.image(2).unwrap();
        assert_eq!((img.width(), img.height()), (3, 6));
        assert_eq!(
            [img.get(2, 5, 0), img.get(2, 5, 1), img.get(2, 5, 2)],
            [3, 2, 5]
        );
        let test = ds.test.unwrap();
        assert_eq!(test.labels(), &[1]);

        write_png(&d.join("val/bird/x.png"), 4, 4, 4);
        let e = load(&d).unwrap_err().to_string();
        assert!(e.contains("bird") && e.contains("training classes"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn flat_and_unlabeled_layouts() {
        let d = tmpdir("flat");
        write_png(&d.join("a/1.png"), 2, 2, 0);
        write_png(&d.join("b/1.png"), 2, 2, 0);
        let ds = load(&d).unwrap();
        assert_eq!(ds.classes, vec!["a", "b"]);
        assert!(ds.test.is_none());

        let u = tmpdir("unlab");
        write_png(&u.join("x.png"), 2, 2, 0);
        let ds = load(&u).unwrap();
        assert_eq!(ds.classes, vec!["unlabeled"]);
        assert_eq!(ds.train.len(), 1);

        let e = tmpdir("empty");
        assert!(matches!(load(&e), Err(DataError::Empty { .. })));
        for p in [d, u, e] {
            std::fs::remove_dir_all(p).unwrap();
        }
    }

    #[test]
    fn corrupt_image_error_names_the_file() {
        let d = tmpdir("corrupt");
        write_png(&d.join("c/good.png"), 2, 2, 0);
        let bad = d.join("c/bad.jpg");
        std::fs::write(&bad, b"\xff\xd8\xff\xe0 this is not really a jpeg").unwrap();
        let ds = load(&d).unwrap();
        let i = (0..ds.train.len())
            .find(|&i| ds.train.path(i) == Some(bad.as_path()))
            .unwrap();
        let e = ds.train.image(i).unwrap_err();
        assert!(matches!(e, DataError::Decode { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("bad.jpg") && msg.contains("corrupt"), "{msg}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn links_and_special_files_are_not_followed_into_wrong_labels() {
        let d = tmpdir("links");
        for i in 0..3 {
            write_png(&d.join(format!("train/a/{i}.png")), 2, 2, 0);
            write_png(&d.join(format!("train/b/{i}.png")), 2, 2, 1);
        }
        // A loop back up the tree, and a link into another class.
        std::os::unix::fs::symlink("..", d.join("train/a/up")).unwrap();
        std::os::unix::fs::symlink("../b", d.join("train/a/to_b")).unwrap();
        std::os::unix::fs::symlink(".", d.join("train/b/self")).unwrap();
        let ds = load(&d).unwrap();
        assert_eq!(ds.classes, vec!["a", "b"]);
        assert_eq!(ds.train.labels(), &[0, 0, 0, 1, 1, 1]);

        // A FIFO named like an image is an error naming it (reading it
        // would block forever).
        let fifo = d.join("train/b/x.png");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let e = load(&d).unwrap_err().to_string();
        assert!(e.contains("x.png is not a regular file"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn non_utf8_class_names_are_refused() {
        use std::os::unix::ffi::OsStrExt;
        let d = tmpdir("utf8");
        for name in [&b"c\xff"[..], b"c\xfe"] {
            let dir = d.join(std::ffi::OsStr::from_bytes(name));
            write_png(&dir.join("1.png"), 2, 2, 0);
        }
        let e = load(&d).unwrap_err().to_string();
        assert!(e.contains("not valid UTF-8"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_truncated_jpeg_is_an_error_naming_it() {
        let d = tmpdir("cut-jpeg");
        let p = d.join("c/cut.jpg");
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let img = image::RgbImage::from_fn(48, 48, |x, y| {
            image::Rgb([((x * 7) ^ (y * 13)) as u8, (x * y) as u8, 9])
        });
        img.save(&p).unwrap();
        let ds = load(&d).unwrap();
        assert!(ds.train.image(0).is_ok(), "the whole file decodes");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() * 9 / 10]).unwrap();
        let e = ds.train.image(0).unwrap_err().to_string();
        assert!(e.contains("cut.jpg") && e.contains("truncated"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
