//! Time to accuracy: `--eval-every N` scores the teacher every `N` steps
//! during training with a weighted k-NN on a fixed, evenly spread subset of
//! the data (a memory from the training split, queries from the held-out
//! test split), the same vote as `sere eval knn` (k = 20, T = 0.07, final
//! CLS token). The points go to `metrics.jsonl` (`knn_top1`, with the
//! step, the elapsed seconds and the seconds spent evaluating, so that the
//! training time is `elapsed_s - eval_s`); raw pixels on the same subset
//! are scored once, when the run starts, as the line to beat.

use std::time::{Duration, Instant};

use super::features::{pixel_baseline, Backbone, FeatureSpec};
use super::report::knn as knn_top1;
use crate::backend::Backend;
use crate::config::TrainConfig;
use crate::data::{Dataset, Split};
use crate::error::SereError;

/// The k-NN run every `every` steps, with its subset fixed for the run.
pub struct KnnMonitor {
    every: u64,
    memory: Split,
    queries: Split,
    classes: usize,
    /// Raw pixels' top-1 on the same subset.
    pub pixels_top1: f64,
    spent: Duration,
}

impl KnnMonitor {
    /// The monitor `cfg` asks for: `None` when `cfg.eval_every` is 0, an
    /// error naming the fix when the data has no test split to score on.
    pub fn new(cfg: &TrainConfig, data: &Dataset) -> Result<Option<Self>, SereError> {
        if cfg.eval_every == 0 {
            return Ok(None);
        }
        let Some(test) = data.test.as_ref() else {
            return Err(SereError::Other(format!(
                "--eval-every needs held-out images, and {} has no test split; drop --eval-every (eval_every = 0) or train on data with a test split",
                cfg.data
            )));
        };
        let started = Instant::now();
        let memory = data.train.spread(cfg.eval_train_images);
        let queries = test.spread(cfg.eval_test_images);
        let classes = data.num_classes();
        let ((tr, trl), (te, tel)) = pixel_baseline(&memory, &queries, cfg.img, cfg.batch.max(1))?;
        let pixels_top1 = knn_top1((tr.view(), &trl), (te.view(), &tel), classes)?;
        Ok(Some(KnnMonitor {
            every: cfg.eval_every,
            memory,
            queries,
            classes,
            pixels_top1,
            spent: started.elapsed(),
        }))
    }

    /// Whether step `done` (of `total`) is scored: every `every` steps and
    /// the last one.
    pub fn due(&self, done: u64, total: u64) -> bool {
        done % self.every == 0 || done == total
    }

    /// `(memory, queries)` images of the subset.
    pub fn sizes(&self) -> (usize, usize) {
        (self.memory.len(), self.queries.len())
    }

    /// Seconds spent evaluating so far (the pixel baseline included).
    pub fn spent_s(&self) -> f64 {
        self.spent.as_secs_f64()
    }

    /// Scores `teacher`: weighted k-NN top-1 on the subset.
    pub fn score<B: Backend>(&mut self, teacher: &Backbone<'_, B>) -> Result<f64, SereError> {
        let started = Instant::now();
        let (spec, batch) = (FeatureSpec::default(), teacher.cfg.batch.max(1));
        let (tr, trl) = teacher.embed(&self.memory, batch, spec)?;
        let (te, tel) = teacher.embed(&self.queries, batch, spec)?;
        let top1 = knn_top1((tr.view(), &trl), (te.view(), &tel), self.classes)?;
        self.spent += started.elapsed();
        Ok(top1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::DataSpec;
    use crate::eval::features::Embedder;

    fn data(spec: &str) -> Dataset {
        DataSpec::parse(spec).unwrap().open().unwrap()
    }

    #[test]
    fn off_by_default_and_refused_without_a_test_split() {
        let cfg = TrainConfig::default();
        assert!(
            KnnMonitor::new(&cfg, &data("synthetic:size=16,train=40,test=20"))
                .unwrap()
                .is_none()
        );
        let cfg = TrainConfig {
            eval_every: 5,
            ..TrainConfig::default()
        };
        let err = KnnMonitor::new(&cfg, &data("synthetic:size=16,train=40,test=0"))
            .err()
            .expect("refused");
        assert!(err.to_string().contains("no test split"), "{err}");
    }

    #[test]
    fn scores_the_subset_like_a_full_knn_of_the_same_images() {
        let d = data("synthetic:size=16,train=60,test=30");
        let cfg = TrainConfig {
            img: 16,
            local_img: 8,
            eval_every: 4,
            eval_train_images: 40,
            eval_test_images: 10,
            batch: 8,
            ..TrainConfig::default()
        };
        let mut m = KnnMonitor::new(&cfg, &d).unwrap().expect("on");
        assert_eq!(m.sizes(), (40, 10));
        assert!((0.0..=1.0).contains(&m.pixels_top1));
        assert!(m.due(8, 10) && m.due(10, 10) && !m.due(9, 10));
        // The engine's own teacher buffer, as the training loop scores it.
        let engine = crate::train::engine::CpuEngine::cpu(&cfg);
        let backbone = Backbone {
            be: &crate::backend::Cpu,
            net: &engine.net,
            params: &engine.teacher,
            cfg: &cfg,
        };
        let top1 = m.score(&backbone).unwrap();
        // The same vote over the same spread subsets, through the Embedder
        // of the same (step-0) network.
        let emb = Embedder::random_init(crate::backend::Cpu, &cfg).unwrap();
        let spec = FeatureSpec::default();
        let (tr, trl) = emb.embed(&d.train.spread(40), 8, spec).unwrap();
        let (te, tel) = emb
            .embed(&d.test.as_ref().unwrap().spread(10), 8, spec)
            .unwrap();
        let want = knn_top1((tr.view(), &trl), (te.view(), &tel), 10).unwrap();
        assert_eq!(top1, want);
        assert!(m.spent_s() > 0.0);
    }
}
