//! The data spec: one string on the command line that says which dataset to
//! use, e.g. `synthetic`, `synthetic:size=32,train=5000,test=1000,seed=0`,
//! `folder:/data/imagenet`, `idx:/usr/share/datasets/fashion-mnist`,
//! `cifar10:/data/cifar-10-batches-bin`, or a plain path whose contents
//! decide the kind. [`DataSpec`]'s `Display` writes the canonical form, so a
//! checkpoint can record the spec and reopen the same data.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::dataset::Dataset;
use super::error::{DataError, Result};
use super::synthetic::SyntheticConfig;
use super::{cifar, folder, idx};

/// Which dataset to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSpec {
    /// The embedded procedural dataset.
    Synthetic(SyntheticConfig),
    /// An image folder (ImageNet layout or flat).
    Folder(PathBuf),
    /// A directory of MNIST-format IDX files.
    Idx(PathBuf),
    /// A directory of CIFAR-10 binary batches.
    Cifar10(PathBuf),
}

impl Default for DataSpec {
    fn default() -> Self {
        DataSpec::Synthetic(SyntheticConfig::default())
    }
}

impl DataSpec {
    /// Parses a spec; a plain path is classified by [`DataSpec::detect`].
    pub fn parse(s: &str) -> Result<DataSpec> {
        let spec_err = |detail: String| DataError::Spec {
            spec: s.to_string(),
            detail,
        };
        let t = s.trim();
        if t.is_empty() {
            return Err(spec_err("it is empty".into()));
        }
        if t == "synthetic" {
            return Ok(DataSpec::default());
        }
        if let Some(rest) = t.strip_prefix("synthetic:") {
            return parse_synthetic(rest).map_err(spec_err);
        }
        let path_of = |rest: &str| {
            if rest.is_empty() {
                Err(spec_err("the path after the colon is missing".into()))
            } else {
                Ok(PathBuf::from(rest))
            }
        };
        if let Some(rest) = t.strip_prefix("folder:") {
            return Ok(DataSpec::Folder(path_of(rest)?));
        }
        if let Some(rest) = t.strip_prefix("idx:") {
            return Ok(DataSpec::Idx(path_of(rest)?));
        }
        if let Some(rest) = t.strip_prefix("cifar10:") {
            return Ok(DataSpec::Cifar10(path_of(rest)?));
        }
        let p = Path::new(t);
        if !p.exists() {
            return Err(spec_err(format!(
                "it is not a known kind and no file or directory {} exists",
                p.display()
            )));
        }
        Self::detect(p)
    }

    /// Classifies a directory by its contents: any `*idx3-ubyte*` file means
    /// IDX, `data_batch_1.bin` (here or in `cifar-10-batches-bin/`) means
    /// CIFAR-10, anything else an image folder.
    pub fn detect(dir: &Path) -> Result<DataSpec> {
        if !dir.is_dir() {
            return Err(DataError::Spec {
                spec: dir.display().to_string(),
                detail: "a plain path must be a directory".into(),
            });
        }
        Ok(if idx::looks_like_idx(dir) {
            DataSpec::Idx(dir.to_path_buf())
        } else if cifar::batches_dir(dir).is_some() {
            DataSpec::Cifar10(dir.to_path_buf())
        } else {
            DataSpec::Folder(dir.to_path_buf())
        })
    }

    /// Loads (or renders) the dataset. File-backed images are decoded later,
    /// per sample, by the loader.
    pub fn open(&self) -> Result<Dataset> {
        match self {
            DataSpec::Synthetic(c) => c.generate(),
            DataSpec::Folder(p) => folder::load(p),
            DataSpec::Idx(p) => idx::load(p),
            DataSpec::Cifar10(p) => cifar::load(p),
        }
    }
}

fn parse_synthetic(rest: &str) -> std::result::Result<DataSpec, String> {
    let mut c = SyntheticConfig::default();
    for kv in rest.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("'{kv}' is not key=value"))?;
        let num = |v: &str| {
            v.trim()
                .parse::<u64>()
                .map_err(|_| format!("'{v}' for {k} is not a non-negative integer"))
        };
        match k.trim() {
            "size" => c.size = num(v)? as usize,
            "train" => c.train = num(v)? as usize,
            "test" => c.test = num(v)? as usize,
            "seed" => c.seed = num(v)?,
            other => {
                return Err(format!(
                    "unknown synthetic key '{other}' (known: size, train, test, seed)"
                ))
            }
        }
    }
    Ok(DataSpec::Synthetic(c))
}

impl FromStr for DataSpec {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self> {
        DataSpec::parse(s)
    }
}

impl fmt::Display for DataSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataSpec::Synthetic(c) => write!(
                f,
                "synthetic:size={},train={},test={},seed={}",
                c.size, c.train, c.test, c.seed
            ),
            DataSpec::Folder(p) => write!(f, "folder:{}", p.display()),
            DataSpec::Idx(p) => write!(f, "idx:{}", p.display()),
            DataSpec::Cifar10(p) => write!(f, "cifar10:{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_explicit_kinds_and_round_trips() {
        assert_eq!(DataSpec::parse("synthetic").unwrap(), DataSpec::default());
        let s = DataSpec::parse("synthetic:size=16, train=100,seed=9").unwrap();
        assert_eq!(
            s,
            DataSpec::Synthetic(SyntheticConfig {
                size: 16,
                train: 100,
                test: 1000,
                seed: 9
            })
        );
        assert_eq!(DataSpec::parse(&s.to_string()).unwrap(), s);
        for (text, want) in [
            ("folder:/x/y", DataSpec::Folder("/x/y".into())),
            ("idx:/m", DataSpec::Idx("/m".into())),
            ("cifar10:/c", DataSpec::Cifar10("/c".into())),
        ] {
            let got = DataSpec::parse(text).unwrap();
            assert_eq!(got, want);
            assert_eq!(got.to_string(), text);
        }
    }

    #[test]
    fn rejects_bad_specs_with_a_hint() {
        for bad in [
            "",
            "synthetic:size",
            "synthetic:size=-1",
            "synthetic:colour=3",
            "folder:",
            "/definitely/not/here",
        ] {
            let e = DataSpec::parse(bad).unwrap_err();
            assert!(matches!(e, DataError::Spec { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("Expected one of"), "{e}");
        }
    }

    #[test]
    fn detects_plain_paths() {
        let d = std::env::temp_dir().join(format!("sere-spec-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        for sub in ["m", "c", "f"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        std::fs::write(d.join("m/train-images-idx3-ubyte.gz"), b"").unwrap();
        std::fs::write(d.join("c/data_batch_1.bin"), b"").unwrap();
        let p = |s: &str| d.join(s).to_string_lossy().into_owned();
        assert_eq!(
            DataSpec::parse(&p("m")).unwrap(),
            DataSpec::Idx(d.join("m"))
        );
        assert_eq!(
            DataSpec::parse(&p("c")).unwrap(),
            DataSpec::Cifar10(d.join("c"))
        );
        assert_eq!(
            DataSpec::parse(&p("f")).unwrap(),
            DataSpec::Folder(d.join("f"))
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
