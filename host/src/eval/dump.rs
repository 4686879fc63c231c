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

use ndarray::Array2;

use crate::checkpoint::{self, Checkpoint};
use crate::error::SereError;

/// The `format` metadata of a features file.
pub const FORMAT: &str = "sere-features";

/// Features and labels of a training and a test split.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureDump {
    /// Training features, `train_labels.len() x dim`.
    pub train_features: Array2<f32>,
    /// Training labels.
    pub train_labels: Vec<u32>,
    /// Test features, `test_labels.len() x dim`.
    pub test_features: Array2<f32>,
    /// Test labels.
    pub test_labels: Vec<u32>,
    /// Classes of the data.
    pub num_classes: usize,
    /// The feature spec's name (e.g. `teacher_cls`).
    pub features: String,
    /// The checkpoint, step and data the features came from, as
    /// `(key, value)` metadata.
    pub provenance: Vec<(String, String)>,
}

impl FeatureDump {
    /// Feature width (the training features' columns).
    ///
    /// ```rust
    /// use ndarray::Array2;
    /// use sere_host::eval::dump::FeatureDump;
    /// let dump = FeatureDump {
    ///     train_features: Array2::zeros((3, 8)),
    ///     train_labels: vec![0, 1, 0],
    ///     test_features: Array2::zeros((1, 8)),
    ///     test_labels: vec![1],
    ///     num_classes: 2,
    ///     features: "teacher_cls".into(),
    ///     provenance: vec![],
    /// };
    /// assert_eq!(dump.dim(), 8);
    /// ```
    pub fn dim(&self) -> usize {
        self.train_features.ncols()
    }

    /// Writes the dump to `path`, a new file (an existing one is refused:
    /// nothing already written is replaced), atomically; features whose
    /// rows do not match their labels, or whose widths differ, are refused.
    pub fn save(&self, path: &Path) -> Result<(), SereError> {
        crate::error::refuse_existing("--dump-features", path)?;
        self.check_shapes()?;
        let labels = |l: &[u32]| l.iter().map(|&v| v as f32).collect::<Vec<_>>();
        // Row-major values, whatever the arrays' memory order.
        let values = |x: &Array2<f32>| x.iter().copied().collect::<Vec<_>>();
        let mut ck = Checkpoint::new();
        let (n, m, d) = (self.train_labels.len(), self.test_labels.len(), self.dim());
        ck.insert("train_features", &[n, d], values(&self.train_features));
        ck.insert("train_labels", &[n], labels(&self.train_labels));
        ck.insert("test_features", &[m, d], values(&self.test_features));
        ck.insert("test_labels", &[m], labels(&self.test_labels));
        ck.set_meta(checkpoint::meta::FORMAT, FORMAT);
        ck.set_meta("features", &self.features);
        ck.set_meta("num_classes", self.num_classes);
        for (k, v) in &self.provenance {
            ck.set_meta(k.clone(), v);
        }
        Ok(ck.save_atomic(path)?)
    }

    /// Checks that every feature row has a label and both sets one width.
    fn check_shapes(&self) -> Result<(), SereError> {
        let (tr, te) = (self.train_features.dim(), self.test_features.dim());
        if tr.0 != self.train_labels.len() || te.0 != self.test_labels.len() || tr.1 != te.1 {
            return Err(SereError::Other(format!(
                "features to dump: {tr:?} training and {te:?} test features for {} and {} labels",
                self.train_labels.len(),
                self.test_labels.len()
            )));
        }
        Ok(())
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
        let rows = |name: &str| -> Result<Array2<f32>, SereError> {
            let (shape, data) = ck.tensor(name)?;
            match *shape {
                [n, d] => Array2::from_shape_vec((n, d), data.to_vec())
                    .map_err(|e| bad(format!("{name}: {e}"))),
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
        let train_features = rows("train_features")?;
        let test_features = rows("test_features")?;
        let ((n, dim), (m, test_dim)) = (train_features.dim(), test_features.dim());
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
            train_features: ndarray::array![[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]],
            train_labels: vec![0, 1, 2],
            test_features: ndarray::array![[0.0, 1.0]],
            test_labels: vec![1],
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
        // A transposed view's copy reads back as the row-major features.
        let mut t = ndarray::Array2::zeros((2, 3));
        t.assign(&d.train_features.t());
        let other = FeatureDump {
            train_features: t.reversed_axes(),
            ..sample()
        };
        let again = dir.path().join("t.safetensors");
        other.save(&again).unwrap();
        assert_eq!(FeatureDump::load(&again).unwrap(), d);
        // Labels that do not match the rows are refused before writing.
        let short = FeatureDump {
            train_labels: vec![0, 1],
            ..sample()
        };
        let e = short.save(&dir.path().join("s.safetensors")).unwrap_err();
        assert!(e.to_string().contains("for 2 and 1 labels"), "{e}");
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
