//! Per-kernel forward + backward timings of the core operations at the
//! authors' per-image shapes (ViT-S/16 on 224 px crops: N = 196 patch tokens,
//! C = 384, 6 heads, 13 x 13 overlap grid), over a batch of images split
//! across rayon threads the way the trainer splits them. The PyTorch twin is
//! `bench/torch_kernels.py`; `bench/compare_kernels.sh` runs both and prints
//! the ratios.
//!
//! ```text
//! cargo run --release -p sere-host --example bench_kernels -- --threads 2 --batch 8
//! ```
//!
//! Prints one JSON line per kernel: `{"kernel", "threads", "batch",
//! "median_ms", "min_ms", "max_ms", "reps"}`, and a last line with the
//! process's peak RSS.

use std::hint::black_box;
use std::time::Instant;

use rayon::prelude::*;
use sere_core::activation::{gelu_backward, gelu_forward};
use sere_core::bilinear::{grid_sample_backward, grid_sample_forward, MapLayout, SampleShape};
use sere_core::geometry::{overlap_grids, CropBox, GridPlacement};
use sere_core::linalg::{linear_backward, linear_forward};
use sere_core::loss::{relation_cross_entropy_backward, DinoShape};
use sere_core::norm::{layer_norm_backward, layer_norm_forward};
use sere_core::optim::{adamw_step, AdamW};
use sere_core::relation::{
    channel_relation_backward, channel_relation_forward, spatial_relation_backward,
    spatial_relation_forward,
};
use sere_core::softmax::{softmax_backward_rows, softmax_rows};

const SIDE: usize = 14;
const N: usize = SIDE * SIDE;
const T: usize = N + 1;
const C: usize = 384;
const HEADS: usize = 6;
const GS: usize = 13;
const P: usize = GS * GS;

/// Deterministic values in `[-scale, scale)` (xorshift).
fn data(len: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Per-image buffers: inputs shared read-only, outputs one per image.
struct Bufs {
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    d: Vec<f32>,
}

impl Bufs {
    fn new([a, b, c, d]: [usize; 4]) -> Self {
        Bufs {
            a: vec![0.0; a],
            b: vec![0.0; b],
            c: vec![0.0; c],
            d: vec![0.0; d],
        }
    }
}

/// Median / min / max milliseconds of `reps` calls of `f` after `warmup`.
fn time(reps: usize, warmup: usize, mut f: impl FnMut()) -> (f64, f64, f64) {
    for _ in 0..warmup {
        f();
    }
    let mut ms: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    (ms[ms.len() / 2], ms[0], ms[ms.len() - 1])
}

fn main() {
    let mut threads = 1usize;
    let mut batch = 8usize;
    let mut reps = 20usize;
    let mut only: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .unwrap_or_else(|| panic!("{a} needs a value"))
                .to_string()
        };
        match a.as_str() {
            "--threads" => threads = val().parse().expect("--threads N"),
            "--batch" => batch = val().parse().expect("--batch N"),
            "--reps" => reps = val().parse().expect("--reps N"),
            "--only" => only = Some(val()),
            "-h" | "--help" => {
                println!("bench_kernels [--threads N] [--batch B] [--reps R] [--only NAME]");
                return;
            }
            other => panic!("unknown flag {other}"),
        }
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .expect("rayon pool");
    let warmup = 3;
    let report = |name: &str, (med, min, max): (f64, f64, f64)| {
        println!(
            "{{\"impl\":\"sere\",\"kernel\":\"{name}\",\"threads\":{threads},\"batch\":{batch},\
             \"median_ms\":{med:.4},\"min_ms\":{min:.4},\"max_ms\":{max:.4},\"reps\":{reps}}}"
        );
    };
    let want = |name: &str| only.as_deref().is_none_or(|o| name.contains(o));
    let per_image = |name: &str, sizes: [usize; 4], f: &(dyn Fn(&mut Bufs) + Sync)| {
        if !want(name) {
            return;
        }
        let mut bufs: Vec<Bufs> = (0..batch).map(|_| Bufs::new(sizes)).collect();
        let t = time(reps, warmup, || bufs.par_iter_mut().for_each(f));
        report(name, t);
    };

    // grid_sample: 14x14x384 token map (HWC), 169 points, grads to map and grid.
    let map = data(N * C, 1, 1.0);
    let grid = {
        let a = CropBox::new(10.0, 20.0, 300.0, 280.0, false).unwrap();
        let b = CropBox::new(90.0, 60.0, 260.0, 300.0, true).unwrap();
        let (mut ga, mut gb) = (vec![0.0f32; 2 * P], vec![0.0f32; 2 * P]);
        overlap_grids(&a, &b, GS, GS, GridPlacement::CellCentres, &mut ga, &mut gb)
            .unwrap()
            .expect("crops overlap");
        ga
    };
    let shape = SampleShape {
        channels: C,
        height: SIDE,
        width: SIDE,
        points: P,
    };
    let go = data(P * C, 2, 1.0);
    per_image("grid_sample", [P * C, N * C, 2 * P, 0], &|b| {
        grid_sample_forward(black_box(&map), &grid, shape, MapLayout::Hwc, &mut b.a).unwrap();
        b.b.fill(0.0);
        b.c.fill(0.0);
        grid_sample_backward(
            &map,
            &grid,
            &go,
            shape,
            MapLayout::Hwc,
            &mut b.b,
            Some(&mut b.c),
        )
        .unwrap();
    });

    // Relations on the 169 sampled tokens.
    let x = data(P * C, 3, 1.0);
    let gsp = data(HEADS * P * P, 4, 1e-3);
    per_image("spatial_relation", [HEADS * P * P, P * C, 0, 0], &|b| {
        spatial_relation_forward(black_box(&x), P, C, HEADS, &mut b.a).unwrap();
        b.b.fill(0.0);
        spatial_relation_backward(&x, &gsp, P, C, HEADS, &mut b.b).unwrap();
    });
    let gch = data(C * C, 5, 1e-3);
    per_image("channel_relation", [C * C, P * C, 0, 0], &|b| {
        channel_relation_forward(black_box(&x), P, C, &mut b.a).unwrap();
        b.b.fill(0.0);
        channel_relation_backward(&x, &gch, P, C, &mut b.b).unwrap();
    });

    // Row softmax over the spatial relation logits.
    let (rows, cols) = (HEADS * P, P);
    let xs = data(rows * cols, 6, 4.0);
    let dy = data(rows * cols, 7, 1.0);
    per_image("softmax_1014x169", [rows * cols, rows * cols, 0, 0], &|b| {
        softmax_rows(black_box(&xs), rows, cols, &mut b.a).unwrap();
        b.b.fill(0.0);
        softmax_backward_rows(&b.a, &dy, rows, cols, &mut b.b).unwrap();
    });

    // Relation cross-entropy (loss and gradient in one pass).
    for (name, rows, cols, tau_t) in [
        ("relation_ce_spatial_1014x169", HEADS * P, P, 0.5f32),
        ("relation_ce_channel_384x384", C, C, 0.1),
    ] {
        let s = data(rows * cols, 8, 3.0);
        let t = data(rows * cols, 9, 3.0);
        per_image(name, [rows * cols, 0, 0, 0], &|b| {
            b.a.fill(0.0);
            relation_cross_entropy_backward(
                black_box(&s),
                &t,
                rows,
                cols,
                1.0,
                tau_t,
                1.0,
                &mut b.a,
            )
            .unwrap();
        });
    }

    // Layer norm over the 197 tokens of one view.
    let xl = data(T * C, 13, 2.0);
    let gamma = data(C, 14, 1.0);
    let beta = data(C, 15, 0.1);
    let dyl = data(T * C, 16, 1.0);
    per_image("layer_norm_197x384", [T * C, T * C, 2 * T, 2 * C], &|b| {
        let (mean, rstd) = b.c.split_at_mut(T);
        layer_norm_forward(
            black_box(&xl),
            &gamma,
            &beta,
            T,
            C,
            1e-6,
            &mut b.a,
            mean,
            rstd,
        )
        .unwrap();
        b.b.fill(0.0);
        b.d.fill(0.0);
        let (dg, db) = b.d.split_at_mut(C);
        layer_norm_backward(&xl, &gamma, mean, rstd, &dyl, T, C, &mut b.b, dg, db).unwrap();
    });

    // GELU on the MLP hidden activations of one view.
    let len = T * 4 * C;
    let xg = data(len, 17, 3.0);
    let dyg = data(len, 18, 1.0);
    per_image("gelu_197x1536", [len, len, 0, 0], &|b| {
        gelu_forward(black_box(&xg), &mut b.a).unwrap();
        b.b.fill(0.0);
        gelu_backward(&xg, &dyg, &mut b.b).unwrap();
    });

    // The qkv projection of one view, 197 x 384 -> 1152.
    let (inp, out) = (C, 3 * C);
    let xq = data(T * inp, 19, 1.0);
    let w = data(out * inp, 20, 0.05);
    let bias = data(out, 21, 0.01);
    let dyq = data(T * out, 22, 1.0);
    per_image(
        "linear_197x384_to_1152",
        [T * out, T * inp, out * inp, out],
        &|b| {
            linear_forward(black_box(&xq), &w, Some(&bias), T, inp, out, &mut b.a).unwrap();
            b.b.fill(0.0);
            b.c.fill(0.0);
            b.d.fill(0.0);
            linear_backward(
                &xq,
                &w,
                &dyq,
                T,
                inp,
                out,
                Some(&mut b.b),
                Some(&mut b.c),
                Some(&mut b.d),
            )
            .unwrap();
        },
    );

    // DINO loss over the whole batch (K 8192, 2 teacher and 12 student
    // views): rows of (view, image) split over threads by teacher view pair
    // is not how the core API is shaped, so it runs as one call per image.
    let dshape = DinoShape {
        student_views: 12,
        teacher_views: 2,
        batch: 1,
        dim: 8192,
    };
    let ds = data(12 * 8192, 10, 3.0);
    let dt = data(2 * 8192, 11, 0.2);
    let centre = data(8192, 12, 0.05);
    per_image("dino_loss_k8192_2t_12s", [12 * 8192, 0, 0, 0], &|b| {
        b.a.fill(0.0);
        sere_core::loss::dino_loss_backward(
            black_box(&ds),
            &dt,
            &centre,
            dshape,
            0.1,
            0.04,
            1.0,
            &mut b.a,
        )
        .unwrap();
    });

    // AdamW over ViT-S's 21.7 M parameters, split in per-thread chunks.
    if want("adamw_21.7M") {
        let n = 21_700_000;
        let mut p = data(n, 23, 0.1);
        let g = data(n, 24, 0.01);
        let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
        let opt = AdamW {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.04,
        };
        let chunk = n.div_ceil(threads * 8);
        let mut step = 0u32;
        let t = time(reps.min(10), 2, || {
            step += 1;
            p.par_chunks_mut(chunk)
                .zip(g.par_chunks(chunk))
                .zip(m.par_chunks_mut(chunk).zip(v.par_chunks_mut(chunk)))
                .for_each(|((p, g), (m, v))| adamw_step(p, g, m, v, &opt, step).unwrap());
        });
        println!(
            "{{\"impl\":\"sere\",\"kernel\":\"adamw_21.7M\",\"threads\":{threads},\"batch\":1,\
             \"median_ms\":{:.4},\"min_ms\":{:.4},\"max_ms\":{:.4},\"reps\":{}}}",
            t.0,
            t.1,
            t.2,
            reps.min(10)
        );
    }
    println!(
        "{{\"impl\":\"sere\",\"peak_rss_mb\":{:.1}}}",
        peak_rss_mb().unwrap_or(f64::NAN)
    );
}

/// Peak resident set size of this process (Linux `VmHWM`), in MiB.
fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
