//! Extracted features saved and read back (`sere eval knn --dump-features`
//! / `--load-features`, DINO's `--dump_features` / `--load_features`): the
//! L2-normalised features and labels of the training and test splits in one
//! safetensors file, so that k-NN with other `k` or temperatures, or another
//! tool, reuses them without the model or the images.
//!
//! Tensors: `train_features` `[N, D]`, `train_labels` `[N]`, `test_features`
//! `[M, D]`, `test_labels` `[M]` (labels as f32: exact below 2^24 classes);
//! metadata: `format` = [`FORMAT`], `features` (the feature spec's name),
//! `num_classes`, and where they came from (`source`, `step`, `data`).

use std::path::Path;

use crate::checkpoint::{self, Checkpoint};
use crate::error::SereError;

/// The `format` metadata of a features file.
pub const FORMAT: &str = "sere-features";

/// Features and labels of a training and a test split.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureDump {
    /// Training features, row-major `train_labels.len() x dim`.
    pub train_features: Vec<f32>,
    /// Training labels.
    pub train_labels: Vec<u32>,
    /// Test features, row-major `test_labels.len() x dim`.
    pub test_features: Vec<f32>,
    /// Test labels.
    pub test_labels: Vec<u32>,
    /// Feature width.
    pub dim: usize,
    /// Classes of the data.
    pub num_classes: usize,
    /// The feature spec's name (e.g. `teacher_cls`).
    pub features: String,
    /// The checkpoint, step and data the features came from, as
    /// `(key, value)` metadata.
    pub provenance: Vec<(String, String)>,
}

impl FeatureDump {
    /// Writes the dump to `path`, a new file (an existing one is refused:
    /// nothing already written is replaced), atomically.
    pub fn save(&self, path: &Path) -> Result<(), SereError> {
        crate::error::refuse_existing("--dump-features", path)?;
        let labels = |l: &[u32]| l.iter().map(|&v| v as f32).collect::<Vec<_>>();
        let mut ck = Checkpoint::new();
        let (n, m) = (self.train_labels.len(), self.test_labels.len());
        ck.insert(
            "train_features",
            &[n, self.dim],
            self.train_features.clone(),
        );
        ck.insert("train_labels", &[n], labels(&self.train_labels));
        ck.insert("test_features", &[m, self.dim], self.test_features.clone());
        ck.insert("test_labels", &[m], labels(&self.test_labels));
        ck.set_meta(checkpoint::meta::FORMAT, FORMAT);
        ck.set_meta("features", &self.features);
        ck.set_meta("num_classes", self.num_classes);
        for (k, v) in &self.provenance {
            ck.set_meta(k.clone(), v);
        }
        Ok(ck.save_atomic(path)?)
    }

    /// Reads a dump written by [`FeatureDump::save`], checking its shapes.
    pub fn load(path: &Path) -> Result<Self, SereError> {
        let ck = Checkpoint::load(path)?;
        if ck.meta(checkpoint::meta::FORMAT) != Some(FORMAT) {
            return Err(SereError::Other(format!(
                "{} is not a features file of `sere eval knn --dump-features` (its format is {})",
                path.display(),
                ck.meta(checkpoint::meta::FORMAT).unwrap_or("not recorded")
            )));
        }
        let bad = |what: String| SereError::Other(format!("{}: {what}", path.display()));
        let rows = |name: &str| -> Result<(Vec<f32>, usize, usize), SereError> {
            let (shape, data) = ck.tensor(name)?;
            match *shape {
                [n, d] => Ok((data.to_vec(), n, d)),
                _ => Err(bad(format!("{name} has shape {shape:?}, not [N, D]"))),
            }
        };
        let num_classes: usize = ck.meta_parse("num_classes")?;
        let labels = |name: &str, n: usize| -> Result<Vec<u32>, SereError> {
            let (shape, data) = ck.tensor(name)?;
            let ok = |&v: &f32| v >= 0.0 && v.fract() == 0.0 && (v as usize) < num_classes;
            if *shape != [n] || !data.iter().all(ok) {
                return Err(bad(format!(
                    "{name} is not {n} class indices below {num_classes}"
                )));
            }
            Ok(data.iter().map(|&v| v as u32).collect())
        };
        let (train_features, n, dim) = rows("train_features")?;
        let (test_features, m, test_dim) = rows("test_features")?;
        if test_dim != dim || n == 0 || m == 0 {
            return Err(bad(format!(
                "{n} training features of width {dim} and {m} test features of width {test_dim}"
            )));
        }
        let provenance = ["source", "step", "data"]
            .iter()
            .filter_map(|k| ck.meta(k).map(|v| (k.to_string(), v.to_string())))
            .collect();
        Ok(FeatureDump {
            train_labels: labels("train_labels", n)?,
            test_labels: labels("test_labels", m)?,
            train_features,
            test_features,
            dim,
            num_classes,
            features: ck.meta("features").unwrap_or("features").to_string(),
            provenance,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> FeatureDump {
        FeatureDump {
            train_features: vec![1.0, 0.0, 0.0, 1.0, 0.6, 0.8],
            train_labels: vec![0, 1, 2],
            test_features: vec![0.0, 1.0],
            test_labels: vec![1],
            dim: 2,
            num_classes: 3,
            features: "teacher_cls".into(),
            provenance: vec![("step".into(), "7".into())],
        }
    }

    #[test]
    fn a_dump_reads_back_and_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.safetensors");
        let d = sample();
        d.save(&path).unwrap();
        assert_eq!(FeatureDump::load(&path).unwrap(), d);
        let e = d.save(&path).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
    }

    #[test]
    fn labels_outside_the_classes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.safetensors");
        let d = FeatureDump {
            num_classes: 2,
            ..sample()
        };
        d.save(&path).unwrap();
        let e = FeatureDump::load(&path).unwrap_err().to_string();
        assert!(e.contains("class indices below 2"), "{e}");
    }
}
