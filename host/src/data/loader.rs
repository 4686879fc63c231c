//! The training loader: multi-crop batches prepared ahead of the step.
//!
//! A background thread walks the epochs in a deterministic order (one
//! shuffle per epoch from `(seed, epoch)`), and for each batch decodes and
//! augments its samples in parallel on its own rayon pool. Each sample draws
//! from the stream `(seed, epoch, sample index)` and writes into its own
//! slots of the batch buffers, so a batch is bit-identical whatever the
//! thread count, and [`batch_at`] or a loader started at any `(epoch, step)`
//! reproduces it. Finished batches wait in a bounded channel (`prefetch`
//! deep); dropping the [`Loader`] disconnects the channel and joins the
//! thread. Incomplete final batches are dropped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use ndarray::{Array, Array4, Array5, ArrayView3, ArrayView4, Axis, ShapeBuilder};
use rayon::prelude::*;
use sere_core::geometry::CropBox;

use super::augment::mask::{draw_mask, MaskConfig};
use super::augment::{batch_pair_grids, BatchPairGrids, GridSizes, MultiCrop, N_GLOBAL};
use super::dataset::Split;
use super::error::{DataError, Result};
use super::rng::{epoch_order, stream, Purpose};
use crate::dist::Shard;

/// How batches are drawn.
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    /// Images per batch (> 0, at most the split's size).
    pub batch_size: usize,
    /// Seed of the shuffle and augmentation streams.
    pub seed: u64,
    /// Shuffle each epoch (otherwise sample order).
    pub shuffle: bool,
    /// Worker threads for decoding and augmentation; 0 = one per core.
    pub threads: usize,
    /// Batches prepared ahead of the consumer (>= 1).
    pub prefetch: usize,
    /// Sampling grid sizes of the view pairs.
    pub grids: GridSizes,
    /// Stop after this many epochs; `None` runs until dropped.
    pub epochs: Option<usize>,
    /// iBOT masks of the global crops (`None`: no masking, no mask drawn).
    pub masks: Option<MaskConfig>,
    /// Which part of every batch this process builds (data-parallel
    /// training; the default is the whole batch). `batch_size` stays the
    /// global batch: the epoch's order and batches are those of one
    /// process, each rank yields its `batch_size / world` images of them.
    pub shard: Shard,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 64,
            seed: 0,
            shuffle: true,
            threads: 0,
            prefetch: 3,
            grids: GridSizes::default(),
            epochs: None,
            masks: None,
            shard: Shard::default(),
        }
    }
}

/// A point in the stream of batches: batch `step` of epoch `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    /// Epoch, from 0.
    pub epoch: usize,
    /// Batch within the epoch, from 0.
    pub step: usize,
}

/// One training batch. View-major buffers keep each view's batch contiguous.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Where this batch sits in the stream.
    pub position: Position,
    /// Images in the batch (B): the loader's batch size, or this rank's
    /// share of it in data-parallel training.
    pub batch_size: usize,
    /// Side of the global views (G).
    pub global_size: usize,
    /// Side of the local views (l).
    pub local_size: usize,
    /// Local views per image (L).
    pub n_local: usize,
    /// Normalised pixels of the global views, shaped `(2, B, 3, G, G)`
    /// (standard layout).
    pub globals: Array5<f32>,
    /// Normalised pixels of the local views, shaped `(L, B, 3, l, l)`
    /// (standard layout).
    pub locals: Array5<f32>,
    /// `[B][2 + L]` crop records, image-major.
    pub crops: Vec<CropBox>,
    /// `[B]` class labels.
    pub labels: Vec<u32>,
    /// `[B]` sample indices in the split.
    pub indices: Vec<usize>,
    /// Grids of every (teacher, student) view pair, in
    /// [`view_pairs`](crate::augment::view_pairs) order.
    pub grids: Vec<BatchPairGrids>,
    /// iBOT masks of the student's global crops over their patch grids,
    /// shaped `(2, B, rows, cols)` (`true` = masked; view-major like
    /// `globals`; standard layout); `(0, B, 0, 0)` without masking.
    pub masks: Array4<bool>,
}

impl Batch {
    /// Views per image (2 + L).
    pub fn n_views(&self) -> usize {
        N_GLOBAL + self.n_local
    }

    /// Pixels of global view `v` (0 or 1), shaped `(B, 3, G, G)`: a view
    /// into the batch, no copy. Panics if `v` is not 0 or 1.
    ///
    /// ```rust
    /// # use sere_host::augment::MultiCrop;
    /// # use sere_host::data::{batch_at, LoaderConfig, Position, Split};
    /// let split = Split::packed(20, 20, 3, vec![128; 4 * 20 * 20 * 3], vec![0; 4])?;
    /// let cfg = LoaderConfig { batch_size: 2, ..LoaderConfig::default() };
    /// // 2 global 16 px views and 3 local 8 px ones per image.
    /// let batch = batch_at(&split, &MultiCrop::new(16, 8, 3), &cfg, Position::default())?;
    /// assert_eq!(batch.global_view(1).dim(), (2, 3, 16, 16));
    /// # Ok::<(), sere_host::data::DataError>(())
    /// ```
    pub fn global_view(&self, v: usize) -> ArrayView4<'_, f32> {
        self.globals.index_axis(Axis(0), v)
    }

    /// Pixels of local view `v` (0 .. L), shaped `(B, 3, l, l)`: a view
    /// into the batch, no copy. Panics if `v >= L`.
    ///
    /// ```rust
    /// # use sere_host::augment::MultiCrop;
    /// # use sere_host::data::{batch_at, LoaderConfig, Position, Split};
    /// let split = Split::packed(20, 20, 3, vec![128; 4 * 20 * 20 * 3], vec![0; 4])?;
    /// let cfg = LoaderConfig { batch_size: 2, ..LoaderConfig::default() };
    /// // 2 global 16 px views and 3 local 8 px ones per image.
    /// let batch = batch_at(&split, &MultiCrop::new(16, 8, 3), &cfg, Position::default())?;
    /// assert_eq!(batch.local_view(2).dim(), (2, 3, 8, 8));
    /// # Ok::<(), sere_host::data::DataError>(())
    /// ```
    pub fn local_view(&self, v: usize) -> ArrayView4<'_, f32> {
        self.locals.index_axis(Axis(0), v)
    }

    /// Pixels of view `v` in overall numbering (globals first), shaped
    /// `(B, 3, s, s)`. Panics if `v >= 2 + L`.
    ///
    /// ```rust
    /// # use sere_host::augment::MultiCrop;
    /// # use sere_host::data::{batch_at, LoaderConfig, Position, Split};
    /// let split = Split::packed(20, 20, 3, vec![128; 4 * 20 * 20 * 3], vec![0; 4])?;
    /// let cfg = LoaderConfig { batch_size: 2, ..LoaderConfig::default() };
    /// // 2 global 16 px views and 3 local 8 px ones per image.
    /// let batch = batch_at(&split, &MultiCrop::new(16, 8, 3), &cfg, Position::default())?;
    /// assert_eq!(batch.view(4), batch.local_view(2));
    /// assert_eq!(batch.view(0).dim(), (2, 3, 16, 16));
    /// # Ok::<(), sere_host::data::DataError>(())
    /// ```
    pub fn view(&self, v: usize) -> ArrayView4<'_, f32> {
        if v < N_GLOBAL {
            self.global_view(v)
        } else {
            self.local_view(v - N_GLOBAL)
        }
    }

    /// The iBOT masks of global view `v` (0 or 1), shaped `(B, rows,
    /// cols)`; `None` without masking. Panics if `v` is not 0 or 1.
    ///
    /// ```rust
    /// # use sere_host::augment::MultiCrop;
    /// # use sere_host::data::{batch_at, LoaderConfig, Position, Split};
    /// let split = Split::packed(20, 20, 3, vec![128; 4 * 20 * 20 * 3], vec![0; 4])?;
    /// let cfg = LoaderConfig { batch_size: 2, ..LoaderConfig::default() };
    /// // 2 global 16 px views and 3 local 8 px ones per image.
    /// let batch = batch_at(&split, &MultiCrop::new(16, 8, 3), &cfg, Position::default())?;
    /// assert!(batch.mask_view(0).is_none()); // the example draws no masks
    /// # Ok::<(), sere_host::data::DataError>(())
    /// ```
    pub fn mask_view(&self, v: usize) -> Option<ArrayView3<'_, bool>> {
        (!self.masks.is_empty()).then(|| self.masks.index_axis(Axis(0), v))
    }

    /// The crops of image `b`, one per view.
    pub fn image_crops(&self, b: usize) -> &[CropBox] {
        let nv = self.n_views();
        &self.crops[b * nv..(b + 1) * nv]
    }

    /// Recomputes the pair grids with other sizes.
    pub fn pair_grids(&self, sizes: GridSizes) -> Vec<BatchPairGrids> {
        batch_pair_grids(&self.crops, self.n_views(), sizes)
    }
}

/// Full batches per epoch (drop-last).
pub fn steps_per_epoch(split_len: usize, batch_size: usize) -> usize {
    split_len.checked_div(batch_size).unwrap_or(0)
}

fn check(split: &Split, mc: &MultiCrop, cfg: &LoaderConfig) -> Result<()> {
    mc.validate()?;
    if cfg.batch_size == 0 {
        return Err(DataError::config("batch size", "0; use at least 1"));
    }
    if split.len() < cfg.batch_size {
        return Err(DataError::config(
            "batch size",
            format!(
                "{} is larger than the {} training samples, so no full batch exists; \
                 use a smaller batch or more data",
                cfg.batch_size,
                split.len()
            ),
        ));
    }
    if cfg.prefetch == 0 {
        return Err(DataError::config("prefetch", "0; use at least 1"));
    }
    if cfg.shard.range(cfg.batch_size).is_none() {
        return Err(DataError::config(
            "batch size",
            format!(
                "{} images cannot be split evenly over {} processes; use a batch size \
                 that is a multiple of the process count",
                cfg.batch_size, cfg.shard.world
            ),
        ));
    }
    if let Some(m) = &cfg.masks {
        m.validate()?;
    }
    Ok(())
}

/// Builds batch `step` of an epoch whose sample order is `order`; must run
/// inside the pool that should do the per-sample work.
fn build(
    split: &Split,
    mc: &MultiCrop,
    cfg: &LoaderConfig,
    pos: Position,
    order: &[usize],
) -> Result<Batch> {
    // This rank's images of the global batch (all of them in one process).
    let mine = cfg.shard.range(cfg.batch_size).expect("checked");
    let first = pos.step * cfg.batch_size;
    let indices = order[first + mine.start..first + mine.end].to_vec();
    let bsz = indices.len();
    let (glen, llen) = (mc.view_len(0), 3 * mc.local_size * mc.local_size);
    let mut globals = vec![0.0f32; N_GLOBAL * bsz * glen];
    let mut locals = vec![0.0f32; mc.n_local * bsz * llen];
    // Per image, mutable slots into every view's contiguous batch buffer.
    let mut slots: Vec<Vec<&mut [f32]>> =
        (0..bsz).map(|_| Vec::with_capacity(mc.n_views())).collect();
    for (buf, len) in [(&mut globals, glen), (&mut locals, llen)] {
        if len == 0 || buf.is_empty() {
            continue;
        }
        for view in buf.chunks_mut(bsz * len) {
            for (b, slot) in view.chunks_mut(len).enumerate() {
                slots[b].push(slot);
            }
        }
    }
    let per_image: Vec<Result<Vec<CropBox>>> = slots
        .into_par_iter()
        .zip(indices.par_iter())
        .map(|(mut outs, &i)| {
            let img = split.image(i)?;
            let mut rng = stream(cfg.seed, Purpose::Augment, pos.epoch as u64, i as u64);
            Ok(mc.augment_into(&img, &mut rng, &mut outs))
        })
        .collect();
    let mut crops = Vec::with_capacity(bsz * mc.n_views());
    for r in per_image {
        crops.extend(r?);
    }
    let masks = batch_masks(cfg, pos.epoch, &indices)?;
    let (g, l) = (mc.global_size, mc.local_size);
    Ok(Batch {
        position: pos,
        batch_size: bsz,
        global_size: mc.global_size,
        local_size: mc.local_size,
        n_local: mc.n_local,
        globals: shaped((N_GLOBAL, bsz, 3, g, g), globals)?,
        locals: shaped((mc.n_local, bsz, 3, l, l), locals)?,
        labels: indices.iter().map(|&i| split.label(i)).collect(),
        grids: batch_pair_grids(&crops, mc.n_views(), cfg.grids),
        crops,
        indices,
        masks,
    })
}

/// `buf` as an array of `shape` without copying it; the lengths are the
/// loader's own, so a mismatch is a bug, reported rather than panicking.
fn shaped<T, Sh: ShapeBuilder>(shape: Sh, buf: Vec<T>) -> Result<Array<T, Sh::Dim>> {
    Array::from_shape_vec(shape, buf).map_err(|e| {
        DataError::Loader(format!(
            "batch buffer of the wrong size ({e}); this is a bug"
        ))
    })
}

/// The `(2, B, rows, cols)` masks of a batch of the samples `indices`, or
/// `(0, B, 0, 0)` without masking.
fn batch_masks(cfg: &LoaderConfig, epoch: usize, indices: &[usize]) -> Result<Array4<bool>> {
    let b = indices.len();
    match cfg.masks {
        Some(m) => shaped(
            (N_GLOBAL, b, m.grid.0, m.grid.1),
            draw_masks(&m, cfg.seed, epoch, indices),
        ),
        None => Ok(Array4::default((0, b, 0, 0))),
    }
}

/// `[2][B][N]` masks of the global crops of the samples `indices`, each
/// image's two from its own stream (global crop 0, then 1).
fn draw_masks(cfg: &MaskConfig, seed: u64, epoch: usize, indices: &[usize]) -> Vec<bool> {
    let (n, b) = (cfg.patches(), indices.len());
    let mut masks = vec![false; N_GLOBAL * b * n];
    for (image, &i) in indices.iter().enumerate() {
        let mut rng = stream(seed, Purpose::Mask, epoch as u64, i as u64);
        for view in 0..N_GLOBAL {
            let at = (view * b + image) * n;
            draw_mask(cfg, &mut rng, &mut masks[at..at + n]);
        }
    }
    masks
}

/// Builds the batch at `pos` synchronously on the calling thread's rayon
/// pool: the same bytes a [`Loader`] yields there (tests, debugging, tools).
pub fn batch_at(split: &Split, mc: &MultiCrop, cfg: &LoaderConfig, pos: Position) -> Result<Batch> {
    check(split, mc, cfg)?;
    if pos.step >= steps_per_epoch(split.len(), cfg.batch_size) {
        return Err(DataError::config(
            "loader position",
            format!("step {} is past the epoch", pos.step),
        ));
    }
    let order = epoch_order(cfg.seed, pos.epoch as u64, split.len(), cfg.shuffle);
    build(split, mc, cfg, pos, &order)
}

/// Batches produced ahead on a background thread; an iterator of
/// `Result<Batch>` that ends after `epochs` (if set) or after an error.
pub struct Loader {
    rx: Option<Receiver<Result<Batch>>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    steps_per_epoch: usize,
}

impl Loader {
    /// Starts producing batches from `start` (a fresh run: the default
    /// position; a resumed one: the position of the next batch to train on).
    pub fn new(split: Split, mc: MultiCrop, cfg: LoaderConfig, start: Position) -> Result<Loader> {
        check(&split, &mc, &cfg)?;
        let steps = steps_per_epoch(split.len(), cfg.batch_size);
        if start.step >= steps {
            return Err(DataError::config(
                "loader position",
                format!(
                    "step {} is past the {steps} batches of an epoch",
                    start.step
                ),
            ));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads)
            .thread_name(|i| format!("sere-data-{i}"))
            .build()
            .map_err(|e| DataError::Loader(format!("cannot start worker threads: {e}")))?;
        let (tx, rx) = sync_channel(cfg.prefetch);
        let stop = Arc::new(AtomicBool::new(false));
        let stop_w = stop.clone();
        let handle = std::thread::Builder::new()
            .name("sere-loader".into())
            .spawn(move || {
                let mut pos = start;
                loop {
                    if cfg.epochs.is_some_and(|e| pos.epoch >= e) {
                        return;
                    }
                    let order = epoch_order(cfg.seed, pos.epoch as u64, split.len(), cfg.shuffle);
                    while pos.step < steps {
                        if stop_w.load(Ordering::Relaxed) {
                            return;
                        }
                        let r = pool.install(|| build(&split, &mc, &cfg, pos, &order));
                        let failed = r.is_err();
                        if tx.send(r).is_err() || failed {
                            return;
                        }
                        pos.step += 1;
                    }
                    pos = Position {
                        epoch: pos.epoch + 1,
                        step: 0,
                    };
                }
            })
            .map_err(|e| DataError::Loader(format!("cannot start the loader thread: {e}")))?;
        Ok(Loader {
            rx: Some(rx),
            stop,
            handle: Some(handle),
            steps_per_epoch: steps,
        })
    }

    /// Full batches per epoch.
    pub fn steps_per_epoch(&self) -> usize {
        self.steps_per_epoch
    }
}

impl Iterator for Loader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        let rx = self.rx.as_ref()?;
        match rx.recv() {
            Ok(b) => Some(b),
            Err(_) => {
                // The worker ended: normally (epochs done, error sent) or by
                // panicking, which is reported once.
                self.rx = None;
                match self.handle.take().map(JoinHandle::join) {
                    Some(Err(_)) => Some(Err(DataError::Loader(
                        "the worker thread panicked; this is a bug, please report it".into(),
                    ))),
                    _ => None,
                }
            }
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Disconnecting unblocks a worker waiting to send.
        self.rx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
