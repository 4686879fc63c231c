//! The training run: data -> multi-crop loader -> step (on the device chosen
//! once, here) -> metrics, progress and atomic checkpoints.

pub mod bench;
pub mod engine;
pub mod network;
pub mod state;

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::augment::{GridSizes, MultiCrop};
use crate::backend::Backend;
use crate::checkpoint::{self, Checkpoint};
use crate::config::TrainConfig;
use crate::data::{DataSpec, Loader, LoaderConfig, Position};
use crate::error::SereError;
use crate::metrics::{MetricsWriter, Progress, ProgressMode, StepMetrics, METRICS_FILE};
use engine::{StepError, StepInput, StepSchedule};
use sere_core::schedule::{cosine_schedule, linear_warmup};

/// What a finished run produced.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Output directory.
    pub out_dir: PathBuf,
    /// Last checkpoint written.
    pub checkpoint: PathBuf,
    /// Steps completed in total.
    pub steps: u64,
    /// Last logged metrics.
    pub last: StepMetrics,
}

/// The per-step schedules of a run (DINO's: cosine learning rate with
/// linear warm-up, cosine weight decay, cosine teacher momentum to 1, linear
/// teacher-temperature warm-up, last layer frozen for the first epochs).
#[derive(Debug, Clone)]
pub struct Schedules {
    total: u64,
    steps_per_epoch: u64,
    cfg: TrainConfig,
}

impl Schedules {
    /// Schedules for `total` steps of `steps_per_epoch`.
    pub fn new(cfg: &TrainConfig, total: u64, steps_per_epoch: u64) -> Self {
        Schedules {
            total,
            steps_per_epoch: steps_per_epoch.max(1),
            cfg: cfg.clone(),
        }
    }

    /// The scheduled values of step `step` (0-based).
    pub fn at(&self, step: u64) -> StepSchedule {
        let c = &self.cfg;
        let (s, total) = (step as usize, self.total as usize);
        let spe = self.steps_per_epoch as usize;
        let epoch = s / spe;
        let lr = cosine_schedule(
            s,
            total,
            c.warmup_epochs * spe,
            c.peak_lr() as f32,
            c.min_lr as f32,
            0.0,
        );
        let weight_decay = cosine_schedule(
            s,
            total,
            0,
            c.weight_decay as f32,
            c.weight_decay_end as f32,
            0.0,
        );
        let momentum = cosine_schedule(s, total, 0, c.momentum_teacher as f32, 1.0, 0.0);
        // DINO indexes the teacher temperature by epoch.
        let teacher_temp = linear_warmup(
            epoch,
            c.warmup_teacher_temp_epochs,
            c.warmup_teacher_temp as f32,
            c.teacher_temp as f32,
        );
        StepSchedule {
            lr,
            weight_decay,
            momentum,
            teacher_temp,
            freeze_last_layer: epoch < c.freeze_last_layer,
            step,
        }
    }
}

/// Epoch-based settings that a run too short to reach them would silently
/// get wrong (DINO counts them in epochs; `--steps` can end a run earlier).
pub fn schedule_warnings(cfg: &TrainConfig, total: u64, steps_per_epoch: u64) -> Vec<String> {
    let mut w = Vec::new();
    let frozen = cfg.freeze_last_layer as u64 * steps_per_epoch;
    if frozen >= total {
        w.push(format!(
            "the DINO head's last layer stays frozen for the whole run (freeze_last_layer = {} \
             epoch(s) = {frozen} steps >= {total} steps); use --set freeze_last_layer=0",
            cfg.freeze_last_layer
        ));
    }
    let warm = cfg.warmup_epochs as u64 * steps_per_epoch;
    if warm >= total {
        w.push(format!(
            "the learning rate never leaves its warm-up (warmup_epochs = {} = {warm} steps >= \
             {total} steps); use --set warmup_epochs=0 or a longer run",
            cfg.warmup_epochs
        ));
    }
    w
}

/// The multi-crop recipe of a configuration.
pub fn multi_crop(cfg: &TrainConfig) -> MultiCrop {
    let mut mc = MultiCrop::new(cfg.img, cfg.local_img, cfg.locals);
    mc.global_scale = (cfg.global_scale.0 as f32, cfg.global_scale.1 as f32);
    mc.local_scale = (cfg.local_scale.0 as f32, cfg.local_scale.1 as f32);
    mc
}

/// Sampling-grid sizes of a configuration.
pub fn grid_sizes(cfg: &TrainConfig) -> GridSizes {
    GridSizes {
        global: (cfg.overlap, cfg.overlap),
        local: (cfg.local_overlap, cfg.local_overlap),
    }
}

/// Makes rayon use `threads` workers (all cores when `None`). Only the first
/// call in a process takes effect, which is what a command wants.
pub fn set_threads(threads: Option<usize>) {
    if let Some(n) = threads {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global();
    }
}

/// Refuses to start a fresh run in `dir` when it already holds one (a
/// `metrics.jsonl` or `checkpoint-*.safetensors`): nothing already written
/// is lost. A missing or unrelated directory is fine.
fn refuse_existing_run(dir: &Path) -> Result<(), SereError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(SereError::io("cannot read output directory", dir, e)),
    };
    let (mut metrics, mut checkpoints) = (false, 0usize);
    for entry in entries {
        let entry = entry.map_err(|e| SereError::io("cannot read output directory", dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == METRICS_FILE {
            metrics = true;
        } else if checkpoint::step_in_name(&name).is_some() {
            checkpoints += 1;
        }
    }
    let mut found = Vec::new();
    if metrics {
        found.push(METRICS_FILE.to_string());
    }
    if checkpoints > 0 {
        let plural = if checkpoints == 1 { "" } else { "s" };
        found.push(format!("{checkpoints} checkpoint{plural}"));
    }
    if found.is_empty() {
        return Ok(());
    }
    Err(SereError::RunExists {
        dir: dir.to_path_buf(),
        found: found.join(", "),
    })
}

/// Whether `dir` is the directory holding `file` (both resolved, so
/// `runs/a` and `./runs/a/` agree). False when either cannot be resolved.
fn is_parent_of(dir: &Path, file: &Path) -> bool {
    let parent = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match (std::fs::canonicalize(dir), std::fs::canonicalize(parent)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Trains with `cfg`, optionally resuming from a checkpoint file. Only a run
/// resumed in its own directory may write where a run already is: a fresh
/// run, or one resumed into another `--out`, refuses a directory that holds
/// a run ([`SereError::RunExists`]).
pub fn train(cfg: TrainConfig, resume: Option<PathBuf>) -> Result<TrainSummary, SereError> {
    cfg.validate()?;
    let out_dir = cfg.out_dir();
    if !resume
        .as_deref()
        .is_some_and(|ck| is_parent_of(&out_dir, ck))
    {
        refuse_existing_run(&out_dir)?;
    }
    set_threads(cfg.threads);
    let mut engine = Backend::new(&cfg)?;
    std::fs::create_dir_all(&out_dir)
        .map_err(|e| SereError::io("cannot create output directory", &out_dir, e))?;

    let dataset = DataSpec::parse(&cfg.data)
        .and_then(|s| s.open())
        .map_err(SereError::data)?;
    let split = dataset.train.clone();
    let spe = crate::data::steps_per_epoch(split.len(), cfg.batch) as u64;
    if spe == 0 {
        return Err(SereError::Other(format!(
            "the training split has {} images, fewer than one batch of {}; lower --batch",
            split.len(),
            cfg.batch
        )));
    }
    let total = cfg.total_steps(spe);
    let sched = Schedules::new(&cfg, total, spe);
    for w in schedule_warnings(&cfg, total, spe) {
        eprintln!("warning: {w}");
    }

    let mut done = 0u64;
    if let Some(path) = resume {
        let ck = Checkpoint::load(&path)?;
        ck.check_values()?;
        done = engine.restore(&ck)?;
        eprintln!("resumed from {} at step {done}", path.display());
    }
    if done >= total {
        return Err(SereError::Other(format!(
            "the checkpoint is already at step {done} of {total}; raise --epochs or --steps to train further"
        )));
    }
    let metrics_path = out_dir.join(METRICS_FILE);
    let mut metrics = if done > 0 {
        MetricsWriter::resume(&metrics_path, done)
    } else {
        MetricsWriter::create(&metrics_path)
    }
    .map_err(|e| SereError::io("cannot write metrics to", &metrics_path, e))?;
    std::fs::write(out_dir.join("config.toml"), cfg.to_toml())
        .map_err(|e| SereError::io("cannot write config to", out_dir.join("config.toml"), e))?;

    let start = Position {
        epoch: (done / spe) as usize,
        step: (done % spe) as usize,
    };
    let loader_cfg = LoaderConfig {
        batch_size: cfg.batch,
        seed: cfg.seed,
        shuffle: true,
        threads: 0,
        prefetch: 3,
        grids: grid_sizes(&cfg),
        epochs: None,
    };
    let mut loader =
        Loader::new(split, multi_crop(&cfg), loader_cfg, start).map_err(SereError::data)?;
    let mut progress = Progress::new(total, done, cfg.log_every.max(1), ProgressMode::Auto);
    let started = Instant::now();
    let mut interval = (Instant::now(), done);
    let mut last = StepMetrics::default();
    let mut last_ck = None;
    while done < total {
        let batch = loader
            .next()
            .ok_or_else(|| SereError::Other("the data loader stopped early".into()))?
            .map_err(SereError::data)?;
        let s = sched.at(done);
        let input = StepInput {
            batch: batch.batch_size,
            locals: batch.n_local,
            globals: &batch.globals,
            local_crops: &batch.locals,
            grids: &batch.grids,
        };
        let stats = engine.step(&input, &s).map_err(|e| match e {
            StepError::NonFinite { step, .. } => SereError::Diverged {
                step,
                what: "the loss or gradient",
            },
            StepError::Kernel { source, .. } => SereError::Core(source),
            e @ StepError::Device { .. } => SereError::Other(e.to_string()),
        })?;
        done += 1;
        let epoch = batch.position.epoch;
        if done % cfg.log_every.max(1) == 0 || done == total {
            let secs = interval.0.elapsed().as_secs_f64().max(1e-9);
            last = StepMetrics {
                step: done,
                epoch,
                loss: stats.loss as f64,
                loss_dino: stats.dino as f64,
                loss_spatial: stats.spatial as f64,
                loss_channel: stats.channel as f64,
                lr: s.lr as f64,
                wd: s.weight_decay as f64,
                momentum: s.momentum as f64,
                teacher_temp: s.teacher_temp as f64,
                images_per_s: (done - interval.1) as f64 * cfg.batch as f64 / secs,
                elapsed_s: started.elapsed().as_secs_f64(),
                grad_norm: stats.grad_norm as f64,
            };
            interval = (Instant::now(), done);
            metrics
                .append(&last)
                .map_err(|e| SereError::io("cannot append metrics to", &metrics_path, e))?;
            progress.update(&last);
        }
        if (cfg.checkpoint_every > 0 && done % cfg.checkpoint_every == 0) || done == total {
            last_ck = Some(save(&engine, &out_dir, done)?);
        }
    }
    progress.finish();
    Ok(TrainSummary {
        out_dir,
        checkpoint: last_ck.expect("the last step saves"),
        steps: done,
        last,
    })
}

/// Writes `checkpoint-<step>.safetensors` atomically (`--resume DIR` takes
/// the newest one).
fn save(engine: &Backend, dir: &Path, step: u64) -> Result<PathBuf, SereError> {
    let ck = engine.snapshot(step)?;
    let path = dir.join(checkpoint::file_name(step));
    ck.save_atomic(&path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_run_refuses_a_directory_holding_a_run_only() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(refuse_existing_run(&d.join("missing")).is_ok());
        std::fs::write(d.join("notes.txt"), "unrelated").unwrap();
        std::fs::write(d.join("checkpoint-old.bin"), "unrelated").unwrap();
        assert!(refuse_existing_run(d).is_ok(), "unrelated files are fine");

        std::fs::write(d.join("metrics.jsonl"), "").unwrap();
        let e = refuse_existing_run(d).unwrap_err().to_string();
        assert!(
            e.contains("already holds a training run (metrics.jsonl)"),
            "{e}"
        );
        std::fs::write(d.join("checkpoint-00000002.safetensors"), "").unwrap();
        std::fs::write(d.join("checkpoint-00000004.safetensors"), "").unwrap();
        let e = refuse_existing_run(d).unwrap_err().to_string();
        assert!(e.contains("(metrics.jsonl, 2 checkpoints)"), "{e}");
        assert!(e.contains(&format!("--resume {}", d.display())), "{e}");
    }
}
