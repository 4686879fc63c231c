//! `sere bench-step`: times full training steps (student forward and
//! backward on all crops, teacher forward, heads, losses, optimizer, EMA) on
//! synthetic tensors, and counts the step's matmul FLOPs.

use std::time::Instant;

use ndarray::{Array4, Array5};
use rand::{RngExt, SeedableRng};
use sere_core::geometry::CropBox;

use super::engine::StepInput;
use super::{grid_sizes, set_threads, Schedules};
use crate::augment::batch_pair_grids;
use crate::config::TrainConfig;
use crate::error::SereError;
use crate::train::engine::AnyEngine;

/// Timing of a benchmark run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BenchResult {
    /// Device name.
    pub device: String,
    /// Worker threads.
    pub threads: usize,
    /// Global crop size.
    pub img: usize,
    /// Local crop size.
    pub local_img: usize,
    /// Patch size.
    pub patch: usize,
    /// Width.
    pub dim: usize,
    /// Blocks.
    pub depth: usize,
    /// Heads.
    pub heads: usize,
    /// Images per step.
    pub batch: usize,
    /// Local crops per image.
    pub locals: usize,
    /// DINO prototypes.
    pub out_dim: usize,
    /// Global-global grid side.
    pub overlap: usize,
    /// Global-local grid side.
    pub local_overlap: usize,
    /// Timed steps.
    pub steps: usize,
    /// Untimed steps before.
    pub warmup: usize,
    /// Median step time.
    pub median_ms: f64,
    /// Fastest step.
    pub min_ms: f64,
    /// Slowest step.
    pub max_ms: f64,
    /// Source images per second at the median.
    pub images_per_s: f64,
    /// Peak resident memory of the process.
    pub peak_rss_mb: f64,
    /// Matmul FLOPs of one step ([`step_flops`]), in GFLOP.
    pub gflop_per_step: f64,
    /// Achieved matmul GFLOP/s at the median.
    pub gflop_per_s: f64,
    /// The CPU SGEMM path the host's matmuls took (`avx512`, `avx2` or
    /// `portable`; see `SERE_GEMM`), so that every figure names its kernel.
    pub cpu_gemm: &'static str,
}

/// Matmul FLOPs (2 m n k per GEMM) of one training step.
///
/// Counted: the student ViT on every crop (forward once, backward twice the
/// forward except the patch embedding's input gradient), the teacher ViT on
/// the global crops (forward only), the DINO head (student: forward and
/// backward on every view's CLS, teacher: forward on the globals), the SERE
/// predictors (student, 3x) and projections (teacher: no matmul), and the
/// relation products (logits forward for teacher and student, backward 2x
/// for the student): spatial `2 P^2 D` per overlapping pair, channel
/// `2 N D^2` per view; with `mim`, the patch head on every global patch
/// (student 3x, teacher 1x). Element-wise work (norms, softmax, GELU,
/// optimizer) is not counted.
pub fn step_flops(cfg: &TrainConfig) -> f64 {
    let (d, hid, p) = (cfg.dim as f64, cfg.mlp_hidden() as f64, cfg.patch as f64);
    let vit_fwd = |img: usize| {
        let n = ((img / cfg.patch) * (img / cfg.patch)) as f64;
        let t = n + 1.0;
        let embed = 2.0 * n * 3.0 * p * p * d;
        let block = 2.0 * t * d * 3.0 * d + 4.0 * t * t * d + 2.0 * t * d * d + 4.0 * t * d * hid;
        (embed, cfg.depth as f64 * block)
    };
    let b = cfg.batch as f64;
    let (g, l) = (2.0 * b, cfg.locals as f64 * b);
    let (ge, gb) = vit_fwd(cfg.img);
    let (le, lb) = vit_fwd(cfg.local_img);
    let student = g * (2.0 * ge + 3.0 * gb) + l * (2.0 * le + 3.0 * lb);
    let teacher = g * (ge + gb);
    let (hh, bot, k) = (
        cfg.head_hidden as f64,
        cfg.bottleneck as f64,
        cfg.out_dim as f64,
    );
    let dino_row = 2.0 * (d * hh + hh * hh + hh * bot + bot * k);
    let dino = (g + l) * 3.0 * dino_row + g * dino_row;
    let ng = (cfg.grid() * cfg.grid()) as f64;
    let nl = (cfg.local_grid() * cfg.local_grid()) as f64;
    let predictors = 3.0 * 2.0 * d * d * (g * ng + l * nl) * 2.0;
    let (pg, pl) = (
        (cfg.overlap * cfg.overlap) as f64,
        (cfg.local_overlap * cfg.local_overlap) as f64,
    );
    // Pairs per image: 2 global-global, 2 L global-local.
    let spatial =
        b * (2.0 * 2.0 * pg * pg * d * 4.0 + 2.0 * cfg.locals as f64 * 2.0 * pl * pl * d * 4.0);
    let channel = 2.0 * d * d * (g * ng * 3.0 + l * nl * 3.0 + g * ng);
    // iBOT: the patch head on every patch of the global crops (student
    // forward and backward, teacher forward), and the mask token's rank-1
    // products (forward and backward).
    let mim = if cfg.mim {
        let kp = cfg.patch_head_dim() as f64;
        let row = 2.0 * (d * hh + hh * hh + hh * bot + bot * kp);
        g * ng * (4.0 * row + 2.0 * 2.0 * d)
    } else {
        0.0
    };
    student + teacher + dino + predictors + spatial + channel + mim
}

/// Peak resident set size in MiB (Linux `VmHWM`; 0 elsewhere).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// A random crop of a `src x src` source with an area fraction in
/// `scale`, aspect 1 and a random flip.
fn random_crop(rng: &mut impl RngExt, src: f32, scale: (f64, f64)) -> CropBox {
    let a = rng.random_range(scale.0..=scale.1) as f32;
    let side = src * a.sqrt();
    let x = rng.random_range(0.0..=(src - side));
    let y = rng.random_range(0.0..=(src - side));
    CropBox::new(x, y, side, side, rng.random::<bool>()).expect("valid synthetic crop")
}

/// Synthetic inputs of one training step of `cfg`: random pixels for every
/// crop and the overlap grids of random crop rectangles (deterministic by
/// `cfg.seed`). Shared by `sere bench-step` and the criterion step bench.
pub struct BenchInputs {
    globals: Array5<f32>,
    locals: Array5<f32>,
    grids: Vec<crate::augment::BatchPairGrids>,
    masks: Array4<bool>,
}

impl BenchInputs {
    /// Generates the inputs for `cfg`'s batch, crop sizes and grids.
    pub fn new(cfg: &TrainConfig) -> Self {
        let (b, l) = (cfg.batch, cfg.locals);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut pixels =
            |v, s| Array5::from_shape_simple_fn((v, b, 3, s, s), || rng.random_range(-2.0..2.0));
        let globals = pixels(2, cfg.img);
        let locals = pixels(l, cfg.local_img);
        let views = 2 + l;
        let crops: Vec<CropBox> = (0..b * views)
            .map(|i| {
                let scale = if i % views < 2 {
                    cfg.global_scale
                } else {
                    cfg.local_scale
                };
                random_crop(&mut rng, 256.0, scale)
            })
            .collect();
        let grids = batch_pair_grids(&crops, views, grid_sizes(cfg));
        // iBOT's masks of the global crops, drawn as the loader does.
        let masks = cfg.mask_config().map_or_else(
            || Array4::from_elem((0, b, 0, 0), false),
            |m| {
                let (rows, cols) = m.grid;
                let mut masks = Array4::from_elem((2, b, rows, cols), false);
                let flat = masks.as_slice_mut().expect("a new array is standard");
                for crop in flat.chunks_mut(rows * cols) {
                    crate::augment::mask::draw_mask(&m, &mut rng, crop);
                }
                masks
            },
        );
        BenchInputs {
            globals,
            locals,
            grids,
            masks,
        }
    }

    /// The step's input, borrowing the generated tensors.
    pub fn input(&self) -> StepInput<'_> {
        StepInput {
            globals: self.globals.view(),
            locals: self.locals.view(),
            grids: &self.grids,
            masks: self.masks.view(),
        }
    }
}

/// Runs `warmup + steps` training steps on synthetic tensors.
pub fn bench_step(
    cfg: &TrainConfig,
    steps: usize,
    warmup: usize,
) -> Result<BenchResult, SereError> {
    cfg.validate()?;
    super::check_memory(cfg)?;
    set_threads(cfg.threads);
    let mut engine = AnyEngine::new(cfg)?;
    let (b, l) = (cfg.batch, cfg.locals);
    let inputs = BenchInputs::new(cfg);
    let input = inputs.input();
    let total = (warmup + steps) as u64;
    let sched = Schedules::new(cfg, total.max(1), total.max(1));
    let mut times = Vec::with_capacity(steps);
    for s in 0..warmup + steps {
        let t0 = Instant::now();
        engine
            .step(&input, &sched.at(s as u64))
            .map_err(|e| SereError::Other(e.to_string()))?;
        // GPU work is asynchronous: wait for the device before the clock.
        engine.synchronize()?;
        if s >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    let median = if times.is_empty() {
        0.0
    } else {
        times[times.len() / 2]
    };
    let gflop = step_flops(cfg) / 1e9;
    Ok(BenchResult {
        device: cfg.device.to_string(),
        threads: rayon::current_num_threads(),
        img: cfg.img,
        local_img: cfg.local_img,
        patch: cfg.patch,
        dim: cfg.dim,
        depth: cfg.depth,
        heads: cfg.heads,
        batch: b,
        locals: l,
        out_dim: cfg.out_dim,
        overlap: cfg.overlap,
        local_overlap: cfg.local_overlap,
        steps,
        warmup,
        median_ms: median,
        min_ms: times.first().copied().unwrap_or(0.0),
        max_ms: times.last().copied().unwrap_or(0.0),
        images_per_s: if median > 0.0 {
            b as f64 / (median / 1e3)
        } else {
            0.0
        },
        peak_rss_mb: peak_rss_mb(),
        gflop_per_step: gflop,
        gflop_per_s: if median > 0.0 {
            gflop / (median / 1e3)
        } else {
            0.0
        },
        cpu_gemm: crate::backend::cpu::GemmPath::active().name(),
    })
}
