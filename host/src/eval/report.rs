//! The evaluation a training run ends with: on the held-out split of the
//! data it trained on, weighted k-NN top-1 of the trained teacher, of the
//! network it started from (random initialisation) and of raw pixels, and
//! the linear probe of the teacher and of the random initialisation; printed
//! and written to the run folder as `eval.json`. The numbers are the ones
//! `sere eval knn --pixels` and `sere eval linear` report for the same
//! checkpoint (same features, same k-NN, same probe).

use std::path::Path;
use std::time::Instant;

use ndarray::ArrayView2;
use serde::{Deserialize, Serialize};

use super::features::{pixel_baseline, Embedder, FeatureSpec};
use super::knn::weighted_knn_accuracy;
use super::linear::{self, ProbeConfig};
use crate::backend::Backend;
use crate::checkpoint::{meta, Checkpoint};
use crate::data::{DataSpec, Dataset};
use crate::error::SereError;

/// File name of the end-of-training evaluation in a run folder.
pub const EVAL_FILE: &str = "eval.json";

/// Neighbours of the k-NN vote (DINO's 20).
pub const KNN_K: usize = 20;
/// Temperature of the k-NN vote weights (DINO's 0.07).
pub const KNN_T: f64 = 0.07;

/// The end-of-training evaluation (accuracies are fractions in `[0, 1]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinalEval {
    /// The data (the run's `data` spec); scored on its test split.
    pub data: String,
    /// Training step of the evaluated checkpoint.
    pub step: u64,
    /// The evaluated checkpoint's file name.
    pub checkpoint: String,
    /// Images of the training split (the k-NN memory, the probe's fit).
    pub train: usize,
    /// Images of the test split (scored).
    pub test: usize,
    /// Classes.
    pub classes: usize,
    /// Features of the networks (`teacher_cls`: the final CLS token).
    pub features: String,
    /// k-NN neighbours.
    pub k: usize,
    /// k-NN vote temperature.
    pub temperature: f64,
    /// Weighted k-NN top-1 of the trained teacher.
    pub knn_teacher: f64,
    /// Weighted k-NN top-1 of the random initialisation (the network the run
    /// started from).
    pub knn_random_init: f64,
    /// Weighted k-NN top-1 of raw pixels (mean-centred, L2-normalised, at
    /// the training image size).
    pub knn_pixels: f64,
    /// Linear-probe top-1 of the trained teacher (L-BFGS, `eval linear`'s
    /// defaults).
    pub linear_teacher: f64,
    /// Linear-probe top-1 of the random initialisation.
    pub linear_random_init: f64,
    /// Seconds the evaluation took.
    pub seconds: f64,
}

impl FinalEval {
    /// The report as printed at the end of `sere train`.
    pub fn lines(&self) -> Vec<String> {
        let pct = |v: f64| format!("{:.1}%", 100.0 * v);
        vec![
            format!(
                "evaluation on the test split of {} ({} train / {} test images, {} classes; \
                 teacher CLS features, step {}):",
                self.data, self.train, self.test, self.classes, self.step
            ),
            format!(
                "  weighted {}-NN top-1:  random init {:>6}   trained teacher {:>6}   raw pixels {:>6}",
                self.k,
                pct(self.knn_random_init),
                pct(self.knn_teacher),
                pct(self.knn_pixels)
            ),
            format!(
                "  linear probe top-1:   random init {:>6}   trained teacher {:>6}",
                pct(self.linear_random_init),
                pct(self.linear_teacher)
            ),
            format!(
                "  k-NN: the trained teacher is {:+.1} points from raw pixels and {:+.1} from its \
                 random initialisation ({:.1} s)",
                100.0 * (self.knn_teacher - self.knn_pixels),
                100.0 * (self.knn_teacher - self.knn_random_init),
                self.seconds
            ),
        ]
    }

    /// Writes the report as JSON to `dir/eval.json`.
    pub fn write(&self, dir: &Path) -> Result<(), SereError> {
        let path = dir.join(EVAL_FILE);
        let text = serde_json::to_string_pretty(self).expect("the report serialises") + "\n";
        std::fs::write(&path, text).map_err(|e| SereError::io("cannot write", &path, e))
    }

    /// Reads a report written by [`FinalEval::write`].
    pub fn read(dir: &Path) -> Result<Self, SereError> {
        let path = dir.join(EVAL_FILE);
        let text =
            std::fs::read_to_string(&path).map_err(|e| SereError::io("cannot read", &path, e))?;
        serde_json::from_str(&text).map_err(|e| {
            SereError::Other(format!(
                "{} is not an evaluation report: {e}",
                path.display()
            ))
        })
    }
}

/// k-NN top-1 with the report's settings (k = 20, T = 0.07; also the
/// `--eval-every` monitor's) of `(features, labels)` pairs.
pub(crate) fn knn(
    (train, train_labels): (ArrayView2<f32>, &[u32]),
    (test, test_labels): (ArrayView2<f32>, &[u32]),
    classes: usize,
) -> Result<f64, SereError> {
    let top1 = weighted_knn_accuracy(
        train,
        train_labels,
        test,
        test_labels,
        KNN_K,
        KNN_T as f32,
        classes,
    )?;
    Ok(top1 as f64)
}

/// k-NN and linear-probe top-1 of one network's CLS features.
fn knn_and_linear<B: Backend>(
    emb: &Embedder<B>,
    data: &Dataset,
    batch: usize,
) -> Result<(f64, f64), SereError> {
    let test = data.test_split().map_err(SereError::data)?;
    let spec = FeatureSpec::default();
    let classes = data.num_classes();
    let (mut tr, trl) = emb.embed(&data.train, batch, spec)?;
    let (mut te, tel) = emb.embed(test, batch, spec)?;
    let knn_top1 = knn((tr.view(), &trl), (te.view(), &tel), classes)?;
    // After the k-NN: the probe standardises the features in place.
    let probe = linear::evaluate(
        tr.view_mut(),
        &trl,
        te.view_mut(),
        &tel,
        classes,
        &ProbeConfig::default(),
    )?;
    Ok((knn_top1, probe.top1 as f64))
}

/// Evaluates checkpoint `ck` (its file name `name`) on the test split of
/// the data it was trained on, on backend `be`. `Ok(None)` when that data
/// has no test split (nothing to score on).
pub fn final_eval<B: Backend>(
    be: B,
    ck: &Checkpoint,
    name: &str,
) -> Result<Option<FinalEval>, SereError> {
    let started = Instant::now();
    let teacher = Embedder::from_checkpoint(be, ck)?;
    let cfg = teacher.config().clone();
    let data = DataSpec::parse(&cfg.data)
        .and_then(|s| s.open())
        .map_err(SereError::data)?;
    let Some(test) = data.test.as_ref() else {
        return Ok(None);
    };
    let batch = cfg.batch.max(1);
    let (knn_teacher, linear_teacher) = knn_and_linear(&teacher, &data, batch)?;
    let init = Embedder::random_init(teacher.into_backend(), &cfg)?;
    let (knn_random_init, linear_random_init) = knn_and_linear(&init, &data, batch)?;
    let ((tr, trl), (te, tel)) = pixel_baseline(&data.train, test, cfg.img, batch)?;
    let knn_pixels = knn((tr.view(), &trl), (te.view(), &tel), data.num_classes())?;
    let step = ck
        .meta(meta::STEP)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok(Some(FinalEval {
        data: cfg.data.clone(),
        step,
        checkpoint: name.to_string(),
        train: data.train.len(),
        test: test.len(),
        classes: data.num_classes(),
        features: FeatureSpec::default().name(),
        k: KNN_K,
        temperature: KNN_T,
        knn_teacher,
        knn_random_init,
        knn_pixels,
        linear_teacher,
        linear_random_init,
        seconds: started.elapsed().as_secs_f64(),
    }))
}
