//! Criterion bench of one full CPU training step (student forward and
//! backward on all crops, teacher forward, heads, losses, clipping, AdamW,
//! EMA) at two configurations:
//!
//! * `small_cpu`: the CPU configuration (img 32, local 16, patch 4,
//!   dim 192, depth 6, heads 3, batch 32, 4 locals, K 4096, grids 7x7/4x4),
//!   the one `bench/compare_cpu.sh` compares with PyTorch;
//! * `vits16_per_image`: the authors' ViT-S/16 shapes (img 224, local 96,
//!   patch 16, dim 384, depth 12, heads 6, 10 locals, K 8192, grids 13x13/6x6)
//!   at batch 2, i.e. the per-image cost of their recipe on this machine.
//!
//! Throughput is reported in images per second (`elem/s`). Thread count:
//! `RAYON_NUM_THREADS` (default all cores). `cargo bench -p sere-host`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sere_host::config::TrainConfig;
use sere_host::train::bench::BenchInputs;
use sere_host::train::engine::AnyEngine;
use sere_host::train::Schedules;

fn config(settings: &[&str]) -> TrainConfig {
    let mut cfg = TrainConfig::default();
    for s in settings {
        cfg.set(s).expect("valid bench setting");
    }
    cfg.validate().expect("valid bench config");
    cfg
}

fn bench_config(c: &mut Criterion, name: &str, cfg: &TrainConfig) {
    let mut backend = AnyEngine::new(cfg).expect("cpu backend");
    let inputs = BenchInputs::new(cfg);
    let input = inputs.input();
    let sched = Schedules::new(cfg, 1_000, 1_000);
    let mut step = 0u64;
    let mut g = c.benchmark_group("train_step");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(15))
        .warm_up_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(cfg.batch as u64));
    g.bench_function(name, |b| {
        b.iter(|| {
            step += 1;
            backend
                .step(&input, &sched.at(step % 1_000))
                .expect("finite step")
        })
    });
    g.finish();
}

fn step_benches(c: &mut Criterion) {
    let small = config(&[
        "img=32",
        "local_img=16",
        "patch=4",
        "dim=192",
        "depth=6",
        "heads=3",
        "batch=32",
        "locals=4",
        "out_dim=4096",
        "head_hidden=2048",
        "bottleneck=256",
        "overlap=7",
        "local_overlap=4",
    ]);
    bench_config(c, "small_cpu", &small);
    let vits = config(&[
        "img=224",
        "local_img=96",
        "patch=16",
        "dim=384",
        "depth=12",
        "heads=6",
        "batch=2",
        "locals=10",
        "out_dim=8192",
        "head_hidden=2048",
        "bottleneck=256",
        "overlap=13",
        "local_overlap=6",
    ]);
    bench_config(c, "vits16_per_image", &vits);
}

criterion_group!(benches, step_benches);
criterion_main!(benches);
