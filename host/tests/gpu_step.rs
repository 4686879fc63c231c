//! The CUDA training step against the CPU one: a tiny model, the same seed
//! and synthetic batch, three steps on each backend (the first with the
//! DINO last layer frozen, drop path on, a local crop size that
//! interpolates the position embedding). Losses must agree within 1e-4
//! relative; parameters (student and teacher) within 1e-4 absolute after
//! the three steps (AdamW moves a parameter by about lr per step whatever
//! the gradient's size, so a gradient that is ~0 on both sides may take a
//! different sign: 1e-4 is about 13 steps of this run's peak lr, 7.8e-6).
//! A CPU checkpoint then resumes on the GPU and back.
//!
//! Without a GPU this prints one `skipped: <reason>` line and passes; with
//! `SERE_REQUIRE_GPU=1` (cuda/gpu-check.sh) a missing GPU is a failure.
//! TF32 stays off (sere-cuda's default).

use sere_host::backend::{Backend, Cpu, Cuda};
use sere_host::config::TrainConfig;
use sere_host::train::bench::BenchInputs;
use sere_host::train::engine::Engine;
use sere_host::train::Schedules;

fn gpu_or_skip() -> bool {
    sere_testkit::device_or_skip("CUDA", sere_cuda::probe)
        .map(|info| println!("device: {info}"))
        .is_some()
}

fn tiny() -> TrainConfig {
    TrainConfig {
        img: 16,
        local_img: 8,
        patch: 4,
        dim: 32,
        depth: 2,
        heads: 2,
        batch: 4,
        locals: 2,
        out_dim: 64,
        head_hidden: 64,
        bottleneck: 32,
        overlap: 3,
        local_overlap: 2,
        warmup_epochs: 0,
        freeze_last_layer: 1,
        drop_path: 0.1,
        seed: 7,
        ..TrainConfig::default()
    }
}

/// Student and teacher parameters of an engine, on the host.
fn params<B: Backend>(e: &Engine<B>) -> (Vec<f32>, Vec<f32>) {
    let be = e.backend();
    (
        be.download(&e.student).unwrap(),
        be.download(&e.teacher).unwrap(),
    )
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()))
}

fn rel(a: f32, b: f32) -> f64 {
    ((a as f64 - b as f64).abs()) / (b as f64).abs().max(1e-12)
}

#[test]
fn three_steps_match_the_cpu() {
    three_steps_on_both(tiny());
}

/// iBOT on top: masks, the mask token, a separate patch head and the
/// masked-patch loss with its centre.
#[test]
fn three_masked_steps_match_the_cpu() {
    three_steps_on_both(TrainConfig {
        mim: true,
        shared_head: false,
        patch_out_dim: 48,
        mask_probability: 0.9,
        ..tiny()
    });
}

fn three_steps_on_both(cpu_cfg: TrainConfig) {
    // The CPU half runs everywhere (it checks the test's own setup).
    cpu_cfg.validate().unwrap();
    let inputs = BenchInputs::new(&cpu_cfg);
    let input = inputs.input();
    let sched = Schedules::new(&cpu_cfg, 3, 1);
    let mut cpu = Engine::new(Cpu, &cpu_cfg).unwrap();
    let (s0c, _) = params(&cpu);
    let cpu_stats: Vec<_> = (0..3u64)
        .map(|s| cpu.step(&input, &sched.at(s)).unwrap())
        .collect();
    assert!(cpu_stats.iter().all(|c| c.loss.is_finite()));
    assert!(
        cpu_stats.iter().any(|c| c.spatial_terms > 0),
        "the batch should have overlapping pairs"
    );
    if !gpu_or_skip() {
        return;
    }
    let mut gpu = Engine::new(Cuda::new(0).unwrap(), &cpu_cfg).unwrap();
    let (s0g, _) = params(&gpu);
    assert_eq!(max_abs_diff(&s0c, &s0g), 0.0, "same initial parameters");
    for (s, c) in cpu_stats.iter().enumerate() {
        let s = s as u64;
        let sc = sched.at(s);
        let g = gpu.step(&input, &sc).unwrap();
        println!("step {s}: cpu {c:?}");
        println!("step {s}: gpu {g:?}");
        assert_eq!(c.spatial_terms, g.spatial_terms, "spatial terms");
        for (what, a, b) in [
            ("loss", g.loss, c.loss),
            ("dino", g.dino, c.dino),
            ("teacher entropy", g.teacher_entropy, c.teacher_entropy),
            ("mim", g.mim, c.mim),
            ("spatial", g.spatial, c.spatial),
            ("channel", g.channel, c.channel),
        ] {
            let e = rel(a, b);
            println!("step {s}: {what} relative error {e:.2e}");
            assert!(e < 1e-4, "step {s}: {what} gpu {a} cpu {b} (rel {e:e})");
        }
        let e = rel(g.grad_norm, c.grad_norm);
        println!("step {s}: grad_norm relative error {e:.2e}");
        assert!(
            e < 1e-3,
            "step {s}: grad norm gpu {} cpu {}",
            g.grad_norm,
            c.grad_norm
        );
    }
    let (sc, tc) = params(&cpu);
    let (sg, tg) = params(&gpu);
    let (es, et) = (max_abs_diff(&sg, &sc), max_abs_diff(&tg, &tc));
    println!("after 3 steps: student max |gpu - cpu| {es:.2e}, teacher {et:.2e}");
    assert!(es < 1e-4 && et < 1e-4, "parameters differ: {es:e} {et:e}");

    // Checkpoints cross backends: the CPU state resumes on the GPU and back.
    let ck = cpu.snapshot(3).unwrap();
    assert_eq!(gpu.restore(&ck).unwrap(), 3);
    let (sg, tg) = params(&gpu);
    assert_eq!(max_abs_diff(&sg, &sc), 0.0);
    assert_eq!(max_abs_diff(&tg, &tc), 0.0);
    let ck = gpu.snapshot(3).unwrap();
    let mut cpu2 = Engine::new(Cpu, &cpu_cfg).unwrap();
    assert_eq!(cpu2.restore(&ck).unwrap(), 3);
    let sched = Schedules::new(&cpu_cfg, 4, 1);
    let c = cpu.step(&input, &sched.at(3)).unwrap();
    let c2 = cpu2.step(&input, &sched.at(3)).unwrap();
    assert_eq!(c, c2, "a GPU checkpoint resumes the CPU run exactly");
    let g = gpu.step(&input, &sched.at(3)).unwrap();
    let e = rel(g.loss, c.loss);
    println!("step 3 after the round trip: loss relative error {e:.2e}");
    assert!(e < 1e-4);
}

#[test]
fn cuda_without_a_gpu_is_a_clear_error() {
    if sere_cuda::probe().is_ok() {
        println!("skipped: a GPU is present");
        return;
    }
    let cfg = TrainConfig {
        device: sere_host::config::Device::Cuda,
        ..tiny()
    };
    let e = sere_host::train::engine::AnyEngine::new(&cfg)
        .err()
        .expect("no GPU: an error");
    let msg = e.to_string();
    println!("{msg}");
    assert!(
        msg.contains("--device cpu") && msg.contains("cuda"),
        "{msg}"
    );
}
