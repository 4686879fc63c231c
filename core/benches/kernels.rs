//! Criterion benches of the core kernels at the authors' per-image shapes
//! (ViT-S/16 on 224 px crops): N = 196 patch tokens (14 x 14 map), C = 384
//! channels, 6 heads, a 13 x 13 overlap grid (P = 169) between two global
//! views.
//!
//! Every operation is measured forward (`fwd`) and forward + backward
//! (`fwd_bwd`). Throughput: for the matmul-shaped kernels (relations,
//! linear) `Elements` is the *FLOP count* of the measured work, so criterion's
//! `elem/s` reads as FLOP/s; for the rest it is the number of tensor
//! elements processed (map elements, logits, activations, parameters).
//!
//! Kept short (`sample_size` 20, 2 s measurement, 0.5 s warm-up) so that
//! `cargo bench -p sere-core` finishes in a few minutes on two cores.
//! Smaller-than-training shapes, where used: DINO at batch 8 (not 64) with
//! K = 8192, 2 teacher and 12 student views; AdamW / EMA over 1 M parameters
//! (not ViT-S's 21 M) to keep the working set small.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sere_core::activation::{gelu_backward, gelu_forward};
use sere_core::bilinear::{grid_sample_backward, grid_sample_forward, MapLayout, SampleShape};
use sere_core::geometry::{overlap_grids, CropBox, GridPlacement};
use sere_core::linalg::{linear_backward, linear_forward};
use sere_core::loss::{
    dino_loss, dino_loss_backward, relation_cross_entropy, relation_cross_entropy_backward,
    DinoShape,
};
use sere_core::norm::{
    batch_norm_backward, batch_norm_forward, layer_norm_backward, layer_norm_forward,
};
use sere_core::optim::{adamw_step, clip_grad_norm, ema_update, AdamW};
use sere_core::relation::{
    channel_relation_backward, channel_relation_forward, spatial_relation_backward,
    spatial_relation_forward,
};
use sere_core::softmax::{log_softmax_rows, softmax_backward_rows, softmax_rows};

/// Patch grid side (224 / 16).
const SIDE: usize = 14;
/// Patch tokens per view.
const N: usize = SIDE * SIDE;
/// Tokens including CLS (LayerNorm / MLP / linear shapes).
const T: usize = N + 1;
/// ViT-S embedding width.
const C: usize = 384;
/// ViT-S heads.
const HEADS: usize = 6;
/// Overlap grid side for two global views.
const GS: usize = 13;
/// Sampled points.
const P: usize = GS * GS;
/// Teacher temperatures of the relation losses.
const TAU_SPATIAL: f32 = 0.5;
const TAU_CHANNEL: f32 = 0.1;

/// Deterministic pseudo-random values in `[-scale, scale)` (xorshift).
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

/// The 13 x 13 cell-centre grid of two overlapping global crops, in view a.
fn overlap_grid() -> Vec<f32> {
    let a = CropBox::new(10.0, 20.0, 300.0, 280.0, false).unwrap();
    let b = CropBox::new(90.0, 60.0, 260.0, 300.0, true).unwrap();
    let (mut ga, mut gb) = (vec![0.0f32; 2 * P], vec![0.0f32; 2 * P]);
    overlap_grids(&a, &b, GS, GS, GridPlacement::CellCentres, &mut ga, &mut gb)
        .unwrap()
        .expect("crops overlap");
    ga
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
}

fn bench_grid_sample(c: &mut Criterion) {
    let map = data(N * C, 1, 1.0);
    let grid = overlap_grid();
    let shape = SampleShape {
        channels: C,
        height: SIDE,
        width: SIDE,
        points: P,
    };
    let mut out = vec![0.0f32; P * C];
    let go = data(P * C, 2, 1.0);
    let mut gmap = vec![0.0f32; N * C];
    let mut ggrid = vec![0.0f32; 2 * P];
    let mut g = c.benchmark_group("grid_sample_hwc_14x14x384_p169");
    g.throughput(Throughput::Elements((P * C) as u64));
    g.bench_function("fwd", |b| {
        b.iter(|| {
            grid_sample_forward(black_box(&map), &grid, shape, MapLayout::Hwc, &mut out).unwrap()
        })
    });
    g.bench_function("fwd_bwd", |b| {
        b.iter(|| {
            grid_sample_forward(black_box(&map), &grid, shape, MapLayout::Hwc, &mut out).unwrap();
            grid_sample_backward(
                &map,
                &grid,
                black_box(&go),
                shape,
                MapLayout::Hwc,
                &mut gmap,
                Some(&mut ggrid),
            )
            .unwrap();
        })
    });
    g.finish();
}

fn bench_relations(c: &mut Criterion) {
    let x = data(P * C, 3, 1.0);
    let mut gx = vec![0.0f32; P * C];

    // Spatial: per head X_h X_h^T, 2 P^2 d FLOP per head = 2 P^2 C in all;
    // backward is two such products.
    let fwd_flop = 2 * P * P * C;
    let mut sp = vec![0.0f32; HEADS * P * P];
    let gsp = data(HEADS * P * P, 4, 1e-3);
    let mut g = c.benchmark_group("spatial_relation_p169_c384_h6");
    g.throughput(Throughput::Elements(fwd_flop as u64));
    g.bench_function("fwd", |b| {
        b.iter(|| spatial_relation_forward(black_box(&x), P, C, HEADS, &mut sp).unwrap())
    });
    g.throughput(Throughput::Elements(3 * fwd_flop as u64));
    g.bench_function("fwd_bwd", |b| {
        b.iter(|| {
            spatial_relation_forward(black_box(&x), P, C, HEADS, &mut sp).unwrap();
            spatial_relation_backward(&x, black_box(&gsp), P, C, HEADS, &mut gx).unwrap();
        })
    });
    g.finish();

    // Channel: X^T X, 2 C^2 P FLOP; backward two such products.
    let fwd_flop = 2 * C * C * P;
    let mut ch = vec![0.0f32; C * C];
    let gch = data(C * C, 5, 1e-3);
    let mut g = c.benchmark_group("channel_relation_p169_c384");
    g.throughput(Throughput::Elements(fwd_flop as u64));
    g.bench_function("fwd", |b| {
        b.iter(|| channel_relation_forward(black_box(&x), P, C, &mut ch).unwrap())
    });
    g.throughput(Throughput::Elements(3 * fwd_flop as u64));
    g.bench_function("fwd_bwd", |b| {
        b.iter(|| {
            channel_relation_forward(black_box(&x), P, C, &mut ch).unwrap();
            channel_relation_backward(&x, black_box(&gch), P, C, &mut gx).unwrap();
        })
    });
    g.finish();
}

fn bench_softmax(c: &mut Criterion) {
    // The relation rows: spatial heads*P rows of P, channel C rows of C.
    let mut g = c.benchmark_group("softmax_rows");
    for (name, rows, cols) in [
        ("spatial_1014x169", HEADS * P, P),
        ("channel_384x384", C, C),
    ] {
        let x = data(rows * cols, 6, 4.0);
        let dy = data(rows * cols, 7, 1.0);
        let mut y = vec![0.0f32; rows * cols];
        let mut dx = vec![0.0f32; rows * cols];
        g.throughput(Throughput::Elements((rows * cols) as u64));
        g.bench_function(BenchmarkId::new("fwd", name), |b| {
            b.iter(|| softmax_rows(black_box(&x), rows, cols, &mut y).unwrap())
        });
        g.bench_function(BenchmarkId::new("log_fwd", name), |b| {
            b.iter(|| log_softmax_rows(black_box(&x), rows, cols, &mut y).unwrap())
        });
        g.bench_function(BenchmarkId::new("fwd_bwd", name), |b| {
            b.iter(|| {
                softmax_rows(black_box(&x), rows, cols, &mut y).unwrap();
                softmax_backward_rows(&y, black_box(&dy), rows, cols, &mut dx).unwrap();
            })
        });
    }
    g.finish();
}

fn bench_relation_ce(c: &mut Criterion) {
    let mut g = c.benchmark_group("relation_ce");
    for (name, rows, cols, tau_t) in [
        ("spatial_1014x169_tau0.5", HEADS * P, P, TAU_SPATIAL),
        ("channel_384x384_tau0.1", C, C, TAU_CHANNEL),
    ] {
        let s = data(rows * cols, 8, 3.0);
        let t = data(rows * cols, 9, 3.0);
        let mut gs = vec![0.0f32; rows * cols];
        g.throughput(Throughput::Elements((rows * cols) as u64));
        g.bench_function(BenchmarkId::new("fwd", name), |b| {
            b.iter(|| relation_cross_entropy(black_box(&s), &t, rows, cols, 1.0, tau_t).unwrap())
        });
        g.bench_function(BenchmarkId::new("fwd_bwd", name), |b| {
            b.iter(|| {
                relation_cross_entropy_backward(
                    black_box(&s),
                    &t,
                    rows,
                    cols,
                    1.0,
                    tau_t,
                    1.0,
                    &mut gs,
                )
                .unwrap()
            })
        });
    }
    g.finish();
}

fn bench_dino(c: &mut Criterion) {
    let shape = DinoShape {
        student_views: 12,
        teacher_views: 2,
        batch: 8,
        dim: 8192,
    };
    let s = data(shape.student_views * shape.batch * shape.dim, 10, 3.0);
    let t = data(shape.teacher_views * shape.batch * shape.dim, 11, 0.2);
    let centre = data(shape.dim, 12, 0.05);
    let mut gs = vec![0.0f32; s.len()];
    let mut g = c.benchmark_group("dino_loss_b8_k8192_2t_12s");
    // Elements: logits of all (teacher, student) pairs compared.
    g.throughput(Throughput::Elements(
        (shape.pairs() * shape.batch * shape.dim) as u64,
    ));
    g.bench_function("fwd", |b| {
        b.iter(|| dino_loss(black_box(&s), &t, &centre, shape, 0.1, 0.04).unwrap())
    });
    g.bench_function("fwd_bwd", |b| {
        b.iter(|| {
            dino_loss_backward(black_box(&s), &t, &centre, shape, 0.1, 0.04, 1.0, &mut gs).unwrap()
        })
    });
    g.finish();
}

fn bench_norms(c: &mut Criterion) {
    let x = data(T * C, 13, 2.0);
    let gamma = data(C, 14, 1.0);
    let beta = data(C, 15, 0.1);
    let dy = data(T * C, 16, 1.0);
    let (mut y, mut mean, mut rstd) = (vec![0.0f32; T * C], vec![0.0f32; T], vec![0.0f32; T]);
    let (mut dx, mut dg, mut db) = (vec![0.0f32; T * C], vec![0.0f32; C], vec![0.0f32; C]);
    let mut g = c.benchmark_group("layer_norm_197x384");
    g.throughput(Throughput::Elements((T * C) as u64));
    g.bench_function("fwd", |b| {
        b.iter(|| {
            layer_norm_forward(
                black_box(&x),
                &gamma,
                &beta,
                T,
                C,
                1e-6,
                &mut y,
                &mut mean,
                &mut rstd,
            )
            .unwrap()
        })
    });
    g.bench_function("fwd_bwd", |b| {
        b.iter(|| {
            layer_norm_forward(
                black_box(&x),
                &gamma,
                &beta,
                T,
                C,
                1e-6,
                &mut y,
                &mut mean,
                &mut rstd,
            )
            .unwrap();
            layer_norm_backward(
                &x,
                &gamma,
                &mean,
                &rstd,
                black_box(&dy),
                T,
                C,
                &mut dx,
                &mut dg,
                &mut db,
            )
            .unwrap();
        })
    });
    g.finish();

    // Batch norm of the SERE projection heads over one view's patch tokens.
    let x = &x[..N * C];
    let dy = &dy[..N * C];
    let (mut y, mut mean, mut var, mut rstd) = (
        vec![0.0f32; N * C],
        vec![0.0f32; C],
        vec![0.0f32; C],
        vec![0.0f32; C],
    );
    let mut dx = vec![0.0f32; N * C];
    let mut scratch = vec![0.0f32; 2 * C];
    let mut g = c.benchmark_group("batch_norm_196x384");
    g.throughput(Throughput::Elements((N * C) as u64));
    g.bench_function("fwd", |b| {
        b.iter(|| {
            batch_norm_forward(
                black_box(x),
                &gamma,
                &beta,
                N,
                C,
                1e-5,
                &mut y,
                &mut mean,
                &mut var,
                &mut rstd,
            )
            .unwrap()
        })
    });
    g.bench_function("fwd_bwd", |b| {
        b.iter(|| {
            batch_norm_forward(
                black_box(x),
                &gamma,
                &beta,
                N,
                C,
                1e-5,
                &mut y,
                &mut mean,
                &mut var,
                &mut rstd,
            )
            .unwrap();
            batch_norm_backward(
                x,
                &gamma,
                &mean,
                &rstd,
                black_box(dy),
                N,
                C,
                &mut dx,
                &mut dg,
                &mut db,
                &mut scratch,
            )
            .unwrap();
        })
    });
    g.finish();
}

fn bench_gelu(c: &mut Criterion) {
    let len = T * 4 * C;
    let x = data(len, 17, 3.0);
    let dy = data(len, 18, 1.0);
    let (mut y, mut dx) = (vec![0.0f32; len], vec![0.0f32; len]);
    let mut g = c.benchmark_group("gelu_197x1536");
    g.throughput(Throughput::Elements(len as u64));
    g.bench_function("fwd", |b| {
        b.iter(|| gelu_forward(black_box(&x), &mut y).unwrap())
    });
    g.bench_function("fwd_bwd", |b| {
        b.iter(|| {
            gelu_forward(black_box(&x), &mut y).unwrap();
            gelu_backward(&x, black_box(&dy), &mut dx).unwrap();
        })
    });
    g.finish();
}

fn bench_linear(c: &mut Criterion) {
    // The qkv projection: 197 x 384 -> 1152.
    let (rows, inp, out) = (T, C, 3 * C);
    let x = data(rows * inp, 19, 1.0);
    let w = data(out * inp, 20, 0.05);
    let bias = data(out, 21, 0.01);
    let dy = data(rows * out, 22, 1.0);
    let mut y = vec![0.0f32; rows * out];
    let (mut dx, mut dw, mut db) = (
        vec![0.0f32; rows * inp],
        vec![0.0f32; out * inp],
        vec![0.0f32; out],
    );
    let fwd_flop = 2 * rows * inp * out;
    let mut g = c.benchmark_group("linear_197x384_to_1152");
    g.throughput(Throughput::Elements(fwd_flop as u64));
    g.bench_function("fwd", |b| {
        b.iter(|| linear_forward(black_box(&x), &w, Some(&bias), rows, inp, out, &mut y).unwrap())
    });
    g.throughput(Throughput::Elements(3 * fwd_flop as u64));
    g.bench_function("fwd_bwd", |b| {
        b.iter(|| {
            linear_forward(black_box(&x), &w, Some(&bias), rows, inp, out, &mut y).unwrap();
            linear_backward(
                &x,
                &w,
                black_box(&dy),
                rows,
                inp,
                out,
                Some(&mut dx),
                Some(&mut dw),
                Some(&mut db),
            )
            .unwrap();
        })
    });
    g.finish();
}

fn bench_optim(c: &mut Criterion) {
    // 1 M parameters (ViT-S has ~21 M; kept small so the four buffers stay
    // at 16 MB).
    let n = 1 << 20;
    let mut p = data(n, 23, 0.1);
    let grads = data(n, 24, 1e-3);
    let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
    let opt = AdamW {
        lr: 5e-4,
        weight_decay: 0.04,
        ..AdamW::default()
    };
    let mut teacher = data(n, 25, 0.1);
    let mut gc = grads.clone();
    let mut g = c.benchmark_group("optim_1M_params");
    g.throughput(Throughput::Elements(n as u64));
    let mut step = 0u32;
    g.bench_function("adamw_step", |b| {
        b.iter(|| {
            step = step % 1000 + 1;
            adamw_step(&mut p, black_box(&grads), &mut m, &mut v, &opt, step).unwrap()
        })
    });
    g.bench_function("ema_update", |b| {
        b.iter(|| ema_update(&mut teacher, black_box(&p), 0.996).unwrap())
    });
    g.bench_function("clip_grad_norm", |b| {
        b.iter(|| clip_grad_norm(black_box(&mut gc), 3.0).unwrap())
    });
    g.finish();
}

criterion_group! {
    name = kernels;
    config = config();
    targets = bench_grid_sample, bench_relations, bench_softmax, bench_relation_ce,
        bench_dino, bench_norms, bench_gelu, bench_linear, bench_optim
}
criterion_main!(kernels);
