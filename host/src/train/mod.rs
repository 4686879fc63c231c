//! The training run: data -> multi-crop loader -> step (on the device chosen
//! once, here) -> metrics, progress and atomic checkpoints.

pub mod bench;
pub mod engine;
pub mod network;
pub mod state;

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::augment::{GridSizes, MultiCrop};
use crate::checkpoint::{self, Checkpoint};
use crate::config::TrainConfig;
use crate::data::{Batch, DataSpec, Loader, LoaderConfig, Position};
use crate::dist::{self, ProcessGroup, Shard};
use crate::error::SereError;
use crate::eval::monitor::KnnMonitor;
use crate::metrics::{MetricsWriter, Progress, ProgressMode, StepMetrics, METRICS_FILE};
use crate::train::engine::AnyEngine;
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
    /// The configuration the run trained with.
    pub config: TrainConfig,
    /// The checkpoint resumed from had already reached the end of the
    /// schedule: nothing was trained (`last` is empty).
    pub already_finished: bool,
}

/// How [`train`] begins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// A new run. A folder holding a run is refused ([`SereError::RunExists`]);
    /// one left by a run that stopped before its first checkpoint is not.
    Fresh,
    /// A new run that first moves a run already in the folder into
    /// `previous-run/` (`--no-resume`): nothing is lost.
    FreshMovingAside,
    /// Continue from this checkpoint file.
    Resume(PathBuf),
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
        // iBOT warms the patch temperature up over the same epochs.
        let patch_teacher_temp = linear_warmup(
            epoch,
            c.warmup_teacher_temp_epochs,
            c.warmup_patch_teacher_temp as f32,
            c.patch_teacher_temp as f32,
        );
        StepSchedule {
            lr,
            weight_decay,
            momentum,
            teacher_temp,
            patch_teacher_temp,
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
        placement: cfg.overlap_grid.placement(),
    }
}

/// Makes rayon use `threads` workers (all cores when `None`). Only the first
/// call in a process takes effect, which is what a command wants.
pub fn set_threads(threads: Option<usize>) {
    if let Some(n) = threads {
        let n = cap_threads(n);
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global();
    }
}

/// The memory the kernel says can still be given to a process
/// (`MemAvailable` of /proc/meminfo), in bytes; `None` where unknown.
pub fn available_memory() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024.0)
}

/// Bytes the data source holds in memory, where that is known before it is
/// opened (the synthetic set is generated in memory).
fn data_bytes(spec: &str) -> f64 {
    match DataSpec::parse(spec) {
        Ok(DataSpec::Synthetic(c)) => (c.size * c.size * 3) as f64 * (c.train + c.test) as f64,
        _ => 0.0,
    }
}

/// Estimates the run's peak memory before anything is allocated, prints it
/// and refuses a run that cannot fit in the memory available (it would end
/// in an allocation abort or the OOM killer, not an error).
pub fn check_memory(cfg: &TrainConfig) -> Result<(), SereError> {
    check_memory_saying(cfg, Ranks::ONE, true)
}

/// The processes of a data-parallel run, as the memory check sees them.
#[derive(Debug, Clone, Copy)]
struct Ranks {
    /// Every process of the run (the global batch is split over them).
    world: usize,
    /// Those on this machine (they share its memory).
    here: usize,
}

impl Ranks {
    const ONE: Ranks = Ranks { world: 1, here: 1 };
}

/// [`check_memory`] for one of `ranks.world` processes, `ranks.here` of
/// them on this machine: each holds the whole model, its share of the
/// batch's activations and the data; printing the estimate only with `say`
/// (rank 0 of a data-parallel run speaks for all).
fn check_memory_saying(cfg: &TrainConfig, ranks: Ranks, say: bool) -> Result<(), SereError> {
    use crate::config::format_bytes;
    let share = TrainConfig {
        batch: (cfg.batch / ranks.world).max(1),
        ..cfg.clone()
    };
    let est = share.memory_estimate();
    let data = data_bytes(&cfg.data);
    let here = ranks.here as f64;
    let total = here * (est.total() + data);
    let each = match ranks.here {
        1 => String::new(),
        n => format!("{n} processes on this machine, each "),
    };
    let parts = format!(
        "{each}parameters and optimizer state {}, activations {}, data {}",
        format_bytes(est.weights),
        format_bytes(est.activations),
        format_bytes(data)
    );
    let available = available_memory();
    match available {
        Some(avail) if total > avail => Err(SereError::OutOfMemory {
            needed: format_bytes(total),
            available: format_bytes(avail),
            parts,
        }),
        _ => {
            let of = available.map_or(String::new(), |a| {
                format!(" of {} available", format_bytes(a))
            });
            if say {
                eprintln!(
                    "memory: about {} estimated{of} ({parts})",
                    format_bytes(total)
                );
            }
            Ok(())
        }
    }
}

/// For commands that load a data source without training on it (`eval`,
/// `visualize`): refuses one that cannot fit in the memory available.
pub fn check_data_memory(spec: &str) -> Result<(), SereError> {
    use crate::config::format_bytes;
    let data = data_bytes(spec);
    match available_memory() {
        Some(avail) if data > avail => Err(SereError::OutOfMemory {
            needed: format_bytes(data),
            available: format_bytes(avail),
            parts: format!("the data {spec}"),
        }),
        _ => Ok(()),
    }
}

/// `threads` capped at the machine's available parallelism, with a warning
/// when that lowers it: more workers than cores only slow every step down.
fn cap_threads(threads: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(threads, |n| n.get());
    if threads > cores {
        eprintln!(
            "warning: --threads {threads} is more than the {cores} core(s) available; \
             using {cores} (more workers than cores only slow each step down)"
        );
        cores
    } else {
        threads
    }
}

/// The lock file inside a run folder (kept, never removed: removing it
/// would let two runs lock two different files).
pub const LOCK_FILE: &str = ".sere.lock";

/// Takes the exclusive lock on run folder `dir` for as long as the returned
/// file is open, so two `sere train` never write into one folder.
pub fn lock_run_dir(dir: &Path) -> Result<std::fs::File, SereError> {
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| SereError::io("cannot create the lock file", &path, e))?;
    match try_lock_exclusive(&file) {
        Ok(true) => Ok(file),
        Ok(false) => Err(SereError::RunLocked {
            dir: dir.to_path_buf(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
            eprintln!(
                "warning: cannot lock {} on this file system; make sure no other run writes there",
                dir.display()
            );
            Ok(file)
        }
        Err(e) => Err(SereError::io("cannot lock the run folder", dir, e)),
    }
}

/// `flock(LOCK_EX | LOCK_NB)`: `Ok(false)` when another open file holds
/// the lock. (std's `File::try_lock` needs a newer rustc than ours.)
#[cfg(unix)]
fn try_lock_exclusive(file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock only reads the descriptor, which `file` keeps open.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(false),
        Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) => {
            Err(std::io::Error::new(std::io::ErrorKind::Unsupported, e))
        }
        _ => Err(e),
    }
}

/// No advisory locks here: every run proceeds.
#[cfg(not(unix))]
fn try_lock_exclusive(_file: &std::fs::File) -> std::io::Result<bool> {
    Ok(true)
}

/// A fresh name for a folder inside `dir` starting with `prefix`
/// (`prefix`, then `prefix-2`, ...).
fn aside_dir(dir: &Path, prefix: &str) -> PathBuf {
    let mut path = dir.join(prefix);
    let mut i = 2;
    while path.symlink_metadata().is_ok() {
        path = dir.join(format!("{prefix}-{i}"));
        i += 1;
    }
    path
}

/// Moves `files` (names in `dir`) into a new subfolder `prefix` of `dir`
/// and returns it.
fn move_aside(dir: &Path, prefix: &str, files: &[String]) -> Result<PathBuf, SereError> {
    let aside = aside_dir(dir, prefix);
    std::fs::create_dir(&aside).map_err(|e| SereError::io("cannot create", &aside, e))?;
    for f in files {
        std::fs::rename(dir.join(f), aside.join(f))
            .map_err(|e| SereError::io("cannot move aside", dir.join(f), e))?;
    }
    Ok(aside)
}

/// A folder left by a run that stopped before its first checkpoint
/// (`metrics.jsonl`, `config.toml`, no checkpoint) is no dead end: there is
/// no checkpoint to lose, so a fresh run moves the leftovers into
/// `DIR/incomplete/` (saying so) and starts there.
fn clear_incomplete_run(dir: &Path) -> Result<(), SereError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let mut names = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if checkpoint::is_checkpoint_name(&name) {
            return Ok(()); // a real run: refuse_existing_run says so
        }
        if name == METRICS_FILE || name == CONFIG_FILE {
            names.push(name);
        }
    }
    if !names.iter().any(|n| n == METRICS_FILE) {
        return Ok(());
    }
    names.sort();
    let aside = move_aside(dir, "incomplete", &names)?;
    eprintln!(
        "note: {} held a run that stopped before its first checkpoint; moved its {} to {}",
        dir.display(),
        names.join(" and "),
        aside.display()
    );
    Ok(())
}

/// When a run resumes in its own folder from an older checkpoint than the
/// newest, the newer checkpoints belong to an abandoned branch: they are
/// moved (with a copy of the metrics) into `DIR/abandoned-after-<step>/`,
/// so a later `--resume DIR` or `eval` does not take them for the latest.
fn set_aside_newer_branch(dir: &Path, step: u64) -> Result<(), SereError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| SereError::io("cannot read output directory", dir, e))?;
    let mut newer: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            let stored = if n == checkpoint::ROLLING {
                checkpoint::step_of(dir.join(n))
            } else {
                checkpoint::step_in_name(n).and_then(|s| s.parse::<u64>().ok())
            };
            stored.is_some_and(|s| s > step)
        })
        .collect();
    if newer.is_empty() {
        return Ok(());
    }
    newer.sort();
    let aside = move_aside(dir, &format!("abandoned-after-{step}"), &newer)?;
    let metrics = dir.join(METRICS_FILE);
    if metrics.is_file() {
        std::fs::copy(&metrics, aside.join(METRICS_FILE))
            .map_err(|e| SereError::io("cannot copy", &metrics, e))?;
    }
    eprintln!(
        "note: resuming from step {step}: moved the {} newer checkpoint(s) of the abandoned branch ({}) \
         and a copy of its metrics to {}",
        newer.len(),
        newer.join(", "),
        aside.display()
    );
    Ok(())
}

/// `--no-resume` in a folder holding a run: the run's own files (its
/// checkpoints, metrics, config and evaluation) move into
/// `DIR/previous-run/` (or `previous-run-2`, ...), so the new run starts in
/// an empty folder and nothing already written is lost.
fn set_aside_previous_run(dir: &Path) -> Result<(), SereError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let own = |n: &str| {
        checkpoint::is_checkpoint_name(n)
            || [METRICS_FILE, CONFIG_FILE, crate::eval::report::EVAL_FILE].contains(&n)
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| own(n))
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    names.sort();
    let aside = move_aside(dir, "previous-run", &names)?;
    eprintln!(
        "note: --no-resume: moved the run already in {} ({}) to {}",
        dir.display(),
        names.join(", "),
        aside.display()
    );
    Ok(())
}

/// The file name of the run's config in its folder.
pub const CONFIG_FILE: &str = "config.toml";

/// Refuses to start a fresh run in `dir` when it already holds one (a
/// `metrics.jsonl` or `checkpoint-*.safetensors`): nothing already written
/// is lost. A missing or unrelated directory is fine, and so, with
/// `leftovers_ok`, is one whose run stopped before its first checkpoint
/// ([`clear_incomplete_run`] moves its leftovers aside).
fn refuse_existing_run(dir: &Path, leftovers_ok: bool) -> Result<(), SereError> {
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
        } else if checkpoint::is_checkpoint_name(&name) {
            checkpoints += 1;
        }
    }
    if checkpoints == 0 && leftovers_ok {
        return Ok(());
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

/// What DINO prints when a run starts: the data found, the network's
/// parameter counts, the schedule's length and where the resolved
/// configuration is written (on stderr, beside the memory estimate).
fn print_run_summary(
    cfg: &TrainConfig,
    net: &crate::train::network::SereNet,
    data: &crate::data::Dataset,
    steps_per_epoch: u64,
    total: u64,
    out_dir: &Path,
) {
    let test = data
        .test
        .as_ref()
        .map_or("no test split".to_string(), |t| format!("{} test", t.len()));
    let used = match cfg.train_images {
        n if n > 0 && n < data.train.len() => format!(" (training on {n} of them, spread evenly)"),
        _ => String::new(),
    };
    eprintln!(
        "data: {}: {} training images{used}, {} classes ({test})",
        cfg.data,
        data.train.len(),
        data.num_classes()
    );
    let (backbone, image, sere) = net.parameter_counts();
    let m = |n: usize| n as f64 / 1e6;
    eprintln!(
        "model: ViT dim {} depth {} heads {} patch {} ({}): {:.2} M parameters in the backbone, \
         {:.2} M in the image-level head(s), {:.2} M in the SERE heads (student; the teacher is its EMA copy)",
        cfg.dim,
        cfg.depth,
        cfg.heads,
        cfg.patch,
        cfg.preset.name(),
        m(backbone),
        m(image),
        m(sere)
    );
    eprintln!(
        "schedule: {steps_per_epoch} steps per epoch of {} images, {total} in all, peak lr {:.3e}; \
         configuration: {}",
        cfg.batch,
        cfg.peak_lr(),
        out_dir.join(CONFIG_FILE).display()
    );
    let first = data.train.image(0).ok().map(|r| r.width().min(r.height()));
    for w in crop_warnings(cfg, first) {
        eprintln!("warning: {w}");
    }
}

/// Crops that cannot show much: a local crop of one patch (no spatial
/// relation inside it), or crops upscaled far beyond the images' own
/// resolution (`side`: the first training image's shorter side).
fn crop_warnings(cfg: &TrainConfig, side: Option<usize>) -> Vec<String> {
    let mut out = Vec::new();
    if cfg.locals > 0 && cfg.local_grid() == 1 {
        out.push(format!(
            "a local crop is a single patch ({} px with patch {}): its spatial relation has one \
             position; raise --local-img or lower --patch",
            cfg.local_img, cfg.patch
        ));
    }
    if let Some(side) = side.filter(|&s| s > 0 && cfg.img > 2 * s) {
        out.push(format!(
            "global crops of {} px are cut from images of {side} px: upscaled more than {}x, \
             they add pixels but no detail; --img {side} (or a multiple of --patch near it) \
             trains faster on the same information",
            cfg.img,
            cfg.img / side
        ));
    }
    out
}

/// Makes `cfg`'s run folder ready for a run started as `start` and locks
/// it (the lock is held as long as the returned file): under the lock,
/// refuses a folder holding another run, or moves it aside, and removes
/// what an interrupted run left unfinished.
fn prepare_run_dir(
    cfg: &TrainConfig,
    start: &Start,
    in_own_dir: bool,
) -> Result<std::fs::File, SereError> {
    let out_dir = cfg.out_dir();
    let moving_aside = *start == Start::FreshMovingAside;
    std::fs::create_dir_all(&out_dir)
        .map_err(|e| SereError::io("cannot create output directory", &out_dir, e))?;
    // Held until the run ends: a second run into this folder is refused.
    let lock = lock_run_dir(&out_dir)?;
    if moving_aside {
        set_aside_previous_run(&out_dir)?;
    } else if !in_own_dir {
        // Again under the lock: another run may have started meanwhile.
        refuse_existing_run(&out_dir, true)?;
        clear_incomplete_run(&out_dir)?;
    }
    let stale = checkpoint::remove_stale_temps(&out_dir)
        .map_err(|e| SereError::io("cannot clean temporary files in", &out_dir, e))?;
    if !stale.is_empty() {
        eprintln!(
            "note: removed {} temporary checkpoint file(s) an interrupted run left in {}",
            stale.len(),
            out_dir.display()
        );
    }
    Ok(lock)
}

/// What the lead process writes before the first step: the run summary
/// and warnings, the metrics file (continued when resuming, a newer branch
/// set aside) and the resolved configuration. `(done, spe, total)`: steps
/// done, per epoch and in all.
fn start_records(
    cfg: &TrainConfig,
    dataset: &crate::data::Dataset,
    engine: &AnyEngine,
    (done, spe, total): (u64, u64, u64),
    in_own_dir: bool,
) -> Result<MetricsWriter, SereError> {
    let out_dir = cfg.out_dir();
    print_run_summary(cfg, engine.net(), dataset, spe, total, &out_dir);
    for w in schedule_warnings(cfg, total, spe) {
        eprintln!("warning: {w}");
    }
    if in_own_dir {
        set_aside_newer_branch(&out_dir, done)?;
    }
    let metrics_path = out_dir.join(METRICS_FILE);
    let metrics = if done > 0 {
        MetricsWriter::resume(&metrics_path, done)
    } else {
        MetricsWriter::create(&metrics_path)
    }
    .map_err(|e| SereError::io("cannot write metrics to", &metrics_path, e))?;
    std::fs::write(out_dir.join(CONFIG_FILE), cfg.to_toml())
        .map_err(|e| SereError::io("cannot write config to", out_dir.join(CONFIG_FILE), e))?;
    Ok(metrics)
}

/// Trains with `cfg`, from scratch or resuming from a checkpoint file
/// ([`Start`]). Only a run resumed in its own directory may write where a
/// run already is: a fresh run, or one resumed into another `--out`,
/// refuses a directory that holds a run ([`SereError::RunExists`]), unless
/// [`Start::FreshMovingAside`] moves that run aside first. A checkpoint
/// already at the end of the schedule trains nothing and says so
/// ([`TrainSummary::already_finished`]).
pub fn train(cfg: TrainConfig, start: Start) -> Result<TrainSummary, SereError> {
    train_in(cfg, start, dist::single())
}

/// [`train`] as one rank of `group` (data-parallel training, see
/// [`crate::dist`]): every rank trains on its shard of each global batch
/// of `cfg.batch` images and the step is reduced over the group; rank 0
/// alone owns the run folder (lock, metrics, config, checkpoints, the
/// k-NN monitor, progress). Every rank reads the checkpoint it resumes
/// from, and all must start from the same state (checked).
pub fn train_in(
    cfg: TrainConfig,
    start: Start,
    group: ProcessGroup,
) -> Result<TrainSummary, SereError> {
    cfg.validate()?;
    let lead = group.rank() == 0;
    let out_dir = cfg.out_dir();
    let resume = match &start {
        Start::Resume(path) => Some(path.clone()),
        _ => None,
    };
    let in_own_dir = resume
        .as_deref()
        .is_some_and(|ck| is_parent_of(&out_dir, ck));
    if lead && !in_own_dir && start != Start::FreshMovingAside {
        // Before any work: a run is already there (checked again under
        // the lock).
        refuse_existing_run(&out_dir, true)?;
    }
    // Before anything is allocated; each rank checks its own machine.
    let ranks = Ranks {
        world: group.world(),
        here: dist::local_size().min(group.world()),
    };
    check_memory_saying(&cfg, ranks, lead)?;
    // Processes sharing a machine share its cores.
    set_threads(cfg.threads.or_else(dist::threads_per_local_rank));
    let mut engine = AnyEngine::new(&cfg)?;
    engine.join(group.clone())?;
    let _lock = if lead {
        Some(prepare_run_dir(&cfg, &start, in_own_dir)?)
    } else {
        None
    };

    let dataset = DataSpec::parse(&cfg.data)
        .and_then(|s| s.open())
        .map_err(SereError::data)?;
    let mut monitor = match lead {
        true => KnnMonitor::new(&cfg, &dataset)?,
        false => None,
    };
    let split = match cfg.train_images {
        0 => dataset.train.clone(),
        n => dataset.train.spread(n),
    };
    let spe = crate::data::steps_per_epoch(split.len(), cfg.batch) as u64;
    if spe == 0 {
        return Err(SereError::Other(format!(
            "the training split has {} images, fewer than one batch of {}; lower --batch",
            split.len(),
            cfg.batch
        )));
    }
    let total = cfg.total_steps(spe);
    let mut done = 0u64;
    if let Some(path) = &resume {
        let ck = Checkpoint::load(path)?;
        ck.check_values()?;
        done = engine.restore(&ck)?;
    }
    if let (0, Some(file)) = (done, &cfg.init_from) {
        engine.init_backbone(&crate::import::load_backbone(file)?)?;
        if lead {
            eprintln!("backbone of student and teacher from {}", file.display());
        }
    }
    if group.world() > 1 {
        let state = [done, engine.fingerprint()?];
        dist::agree(group.as_ref(), "checkpoint (step and state)", &state)
            .map_err(|e| SereError::Other(e.to_string()))?;
    }
    if let Some(path) = &resume {
        if done >= total {
            return Ok(TrainSummary {
                out_dir,
                checkpoint: path.clone(),
                steps: done,
                last: StepMetrics::default(),
                config: cfg,
                already_finished: true,
            });
        }
        if lead {
            eprintln!("resumed from {} at step {done} of {total}", path.display());
        }
    }
    let sched = Schedules::new(&cfg, total, spe);
    let mut metrics = match lead {
        true => Some(start_records(
            &cfg,
            &dataset,
            &engine,
            (done, spe, total),
            in_own_dir,
        )?),
        false => None,
    };
    let metrics_path = out_dir.join(METRICS_FILE);

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
        masks: cfg.mask_config(),
        shard: Shard::of(group.as_ref()),
    };
    let mut loader =
        Loader::new(split, multi_crop(&cfg), loader_cfg, start).map_err(SereError::data)?;
    let mut progress = lead.then(|| {
        Progress::new(total, done, cfg.log_every.max(1), ProgressMode::Auto)
            .watch_collapse(cfg.out_dim)
    });
    if let (Some(m), Some(p)) = (&monitor, progress.as_mut()) {
        let (mem, q) = m.sizes();
        p.println(format!(
            "k-NN of the teacher every {} steps on {mem} training / {q} test images ({}-NN, T = {}); raw pixels score {:.1}% on them",
            cfg.eval_every,
            crate::eval::report::KNN_K,
            crate::eval::report::KNN_T,
            100.0 * m.pixels_top1
        ));
    }
    let started = Instant::now();
    let mut interval = (Instant::now(), done);
    // Sum of the total loss over the steps since the last logged line (the
    // logged mean, as DINO's MetricLogger smooths its printed values).
    let mut interval_loss = 0.0f64;
    let mut last = StepMetrics::default();
    let mut last_ck = None;
    while done < total {
        let batch = loader
            .next()
            .ok_or_else(|| SereError::Other("the data loader stopped early".into()))?
            .map_err(SereError::data)?;
        let s = sched.at(done);
        let input = step_input(&batch);
        let stats = engine.step(&input, &s).map_err(|e| match e {
            StepError::NonFinite { step, .. } => SereError::Diverged {
                step,
                what: "the loss or gradient",
            },
            StepError::Kernel { source, .. } => SereError::Core(source),
            e @ (StepError::Device { .. } | StepError::Dist { .. }) => {
                SereError::Other(e.to_string())
            }
        })?;
        done += 1;
        interval_loss += stats.loss as f64;
        let epoch = batch.position.epoch;
        let secs = interval.0.elapsed().as_secs_f64().max(1e-9);
        let knn_top1 = match monitor.as_mut() {
            Some(m) if m.due(done, total) => Some(engine.score_teacher(m, &cfg)?),
            _ => None,
        };
        if let (Some(top1), Some(p)) = (knn_top1, progress.as_mut()) {
            p.println(format!(
                "step {done}: teacher k-NN top-1 {:.1}% (raw pixels {:.1}%)",
                100.0 * top1,
                100.0 * monitor.as_ref().map_or(0.0, |m| m.pixels_top1)
            ));
        }
        if done % cfg.log_every.max(1) == 0 || done == total || knn_top1.is_some() {
            let mean_loss = interval_loss / (done - interval.1) as f64;
            last = StepMetrics {
                loss_mean: mean_loss,
                step: done,
                epoch,
                loss: stats.loss as f64,
                loss_dino: stats.dino as f64,
                teacher_entropy: stats.teacher_entropy as f64,
                teacher_student_kl: stats.teacher_student_kl() as f64,
                loss_mim: stats.mim as f64,
                loss_spatial: stats.spatial as f64,
                loss_channel: stats.channel as f64,
                lr: s.lr as f64,
                wd: s.weight_decay as f64,
                momentum: s.momentum as f64,
                teacher_temp: s.teacher_temp as f64,
                images_per_s: (done - interval.1) as f64 * cfg.batch as f64 / secs,
                elapsed_s: started.elapsed().as_secs_f64(),
                grad_norm: stats.grad_norm as f64,
                knn_top1,
                eval_s: monitor.as_ref().map_or(0.0, KnnMonitor::spent_s),
            };
            interval = (Instant::now(), done);
            interval_loss = 0.0;
            if let (Some(m), Some(p)) = (metrics.as_mut(), progress.as_mut()) {
                m.append(&last)
                    .map_err(|e| SereError::io("cannot append metrics to", &metrics_path, e))?;
                p.update(&last);
            }
        }
        if let Some(keep) = save_point(&cfg, done, spe, total) {
            last_ck = Some(match lead {
                true => save(&engine, &out_dir, done, keep, cfg.keep_last)?,
                // Where rank 0 writes it.
                false => saved_path(&out_dir, done, keep),
            });
        }
    }
    if let Some(p) = progress {
        p.finish();
    }
    Ok(TrainSummary {
        out_dir,
        checkpoint: last_ck.expect("the last step saves"),
        steps: done,
        last,
        config: cfg,
        already_finished: false,
    })
}

/// The engine's view of `batch` (no copy).
fn step_input(batch: &Batch) -> StepInput<'_> {
    StepInput {
        globals: batch.globals.view(),
        locals: batch.locals.view(),
        grids: &batch.grids,
        masks: batch.masks.view(),
    }
}

/// The file [`save`] names for `step`.
fn saved_path(dir: &Path, step: u64, keep: bool) -> PathBuf {
    match keep {
        true => dir.join(checkpoint::file_name(step)),
        false => dir.join(checkpoint::ROLLING),
    }
}

/// Whether the run saves after `done` steps, and if so whether it keeps a
/// numbered checkpoint besides rewriting the rolling one: `None` (no
/// save), `Some(false)` (rolling only) or `Some(true)`. The rolling one is
/// rewritten every `checkpoint_every` steps and at the end of every epoch;
/// a numbered one is kept every `keep_every` steps, at the end of every
/// `keep_every_epochs` epochs and at the end of the run.
fn save_point(cfg: &TrainConfig, done: u64, steps_per_epoch: u64, total: u64) -> Option<bool> {
    let every = |n: u64, of: u64| n > 0 && of % n == 0;
    let epoch_end = done % steps_per_epoch == 0;
    let keep = done == total
        || every(cfg.keep_every, done)
        || (epoch_end && every(cfg.keep_every_epochs as u64, done / steps_per_epoch));
    let rolling = epoch_end || every(cfg.checkpoint_every, done);
    (keep || rolling).then_some(keep)
}

/// Writes the rolling `checkpoint.safetensors` atomically and, with
/// `keep`, keeps it as `checkpoint-<step>.safetensors` too (a hard link:
/// no second copy on disk), then prunes the numbered ones to `keep_last`.
/// Returns the path a later `eval` should name: the numbered file when
/// kept, else the rolling one.
fn save(
    engine: &AnyEngine,
    dir: &Path,
    step: u64,
    keep: bool,
    keep_last: usize,
) -> Result<PathBuf, SereError> {
    let ck = engine.snapshot(step)?;
    let rolling = dir.join(checkpoint::ROLLING);
    ck.save_atomic(&rolling)?;
    if !keep {
        return Ok(rolling);
    }
    let path = saved_path(dir, step, keep);
    checkpoint::keep_as(&rolling, &path)
        .map_err(|e| SereError::io("cannot keep a numbered checkpoint at", &path, e))?;
    // Only after the new one is safely on disk.
    checkpoint::prune(dir, keep_last)
        .map_err(|e| SereError::io("cannot remove old checkpoints in", dir, e))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rolling_checkpoint_is_saved_more_often_than_one_is_kept() {
        let cfg = TrainConfig {
            checkpoint_every: 4,
            keep_every: 0,
            keep_every_epochs: 2,
            ..TrainConfig::default()
        };
        // 10 steps per epoch, 45 in all.
        let at = |done| save_point(&cfg, done, 10, 45);
        assert_eq!(at(3), None);
        assert_eq!(at(4), Some(false), "every checkpoint_every steps");
        assert_eq!(at(10), Some(false), "each epoch's end");
        assert_eq!(at(20), Some(true), "every keep_every_epochs epochs");
        assert_eq!(at(45), Some(true), "the end of the run");
        let by_steps = TrainConfig {
            keep_every: 3,
            ..cfg.clone()
        };
        assert_eq!(save_point(&by_steps, 3, 10, 45), Some(true));
        let never = TrainConfig {
            checkpoint_every: 0,
            keep_every_epochs: 0,
            ..cfg
        };
        assert_eq!(save_point(&never, 8, 10, 45), None);
        assert_eq!(save_point(&never, 20, 10, 45), Some(false));
    }

    #[test]
    fn crops_that_show_little_are_warned_about() {
        let cfg = TrainConfig::default();
        assert!(super::crop_warnings(&cfg, Some(32)).is_empty());
        let single = TrainConfig {
            local_img: 4,
            ..TrainConfig::default()
        };
        let w = super::crop_warnings(&single, Some(32));
        assert!(w.len() == 1 && w[0].contains("single patch"), "{w:?}");
        let w = super::crop_warnings(&cfg, Some(12));
        assert!(
            w.len() == 1 && w[0].contains("upscaled more than 2x"),
            "{w:?}"
        );
        assert!(super::crop_warnings(&cfg, None).is_empty());
    }

    #[test]
    fn a_fresh_run_refuses_a_directory_holding_a_run_only() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(refuse_existing_run(&d.join("missing"), false).is_ok());
        std::fs::write(d.join("notes.txt"), "unrelated").unwrap();
        std::fs::write(d.join("checkpoint-old.bin"), "unrelated").unwrap();
        assert!(
            refuse_existing_run(d, false).is_ok(),
            "unrelated files are fine"
        );

        std::fs::write(d.join("metrics.jsonl"), "").unwrap();
        assert!(
            refuse_existing_run(d, true).is_ok(),
            "no checkpoint to lose"
        );
        let e = refuse_existing_run(d, false).unwrap_err().to_string();
        assert!(
            e.contains("already holds a training run (metrics.jsonl)"),
            "{e}"
        );
        std::fs::write(d.join("checkpoint-00000002.safetensors"), "").unwrap();
        std::fs::write(d.join("checkpoint-00000004.safetensors"), "").unwrap();
        let e = refuse_existing_run(d, true).unwrap_err().to_string();
        assert!(e.contains("(metrics.jsonl, 2 checkpoints)"), "{e}");
        assert!(e.contains(&format!("--resume {}", d.display())), "{e}");
    }

    #[test]
    fn a_run_folder_is_locked_while_a_run_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_run_dir(dir.path()).unwrap();
        match lock_run_dir(dir.path()) {
            Err(e @ SereError::RunLocked { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
                assert!(msg.contains("in use by another `sere train`"), "{msg}");
            }
            r => panic!("{r:?}"),
        }
        drop(held);
        assert!(
            lock_run_dir(dir.path()).is_ok(),
            "free again once the run ends"
        );
    }

    #[test]
    fn the_memory_check_refuses_what_cannot_fit() {
        if available_memory().is_none() {
            return; // no /proc/meminfo here
        }
        assert!(check_memory(&TrainConfig::default()).is_ok());
        for cfg in [
            TrainConfig {
                out_dim: 2_000_000_000,
                ..Default::default()
            },
            TrainConfig {
                overlap: 1000,
                ..Default::default()
            },
            TrainConfig {
                depth: 100_000,
                ..Default::default()
            },
            TrainConfig {
                img: 256,
                patch: 1,
                ..Default::default()
            },
            TrainConfig {
                data: "synthetic:size=4096".into(),
                ..Default::default()
            },
        ] {
            let e = check_memory(&cfg).unwrap_err().to_string();
            assert!(e.contains("the run needs about"), "{e}");
            assert!(e.contains(" is available"), "{e}");
        }
    }

    #[test]
    fn the_memory_check_counts_each_process_on_the_machine_with_its_share() {
        if available_memory().is_none() {
            return; // no /proc/meminfo here
        }
        let est = |batch| cfg_with(batch).memory_estimate().total();
        // A batch whose activations alone do not fit one process ...
        let avail = available_memory().unwrap();
        let per_image = est(2) - est(1);
        let cfg = cfg_with(16 * ((1.5 * avail / per_image) as usize / 16 + 1));
        assert!(check_memory_saying(&cfg, Ranks::ONE, false).is_err());
        // ... fits 16 processes on 16 machines, each with a sixteenth;
        let spread = Ranks { world: 16, here: 1 };
        check_memory_saying(&cfg, spread, false).unwrap();
        // but not 16 on this one, which hold the model 16 times too.
        let crowded = Ranks {
            world: 16,
            here: 16,
        };
        let e = check_memory_saying(&cfg, crowded, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("16 processes on this machine, each"), "{e}");
    }

    fn cfg_with(batch: usize) -> TrainConfig {
        TrainConfig {
            batch,
            ..Default::default()
        }
    }
}
