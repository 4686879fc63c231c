//! The CPU backend's SGEMM paths (the `gemm` crate, our AVX-512 and AVX2
//! tiles, matrixmultiply) at the training step's shapes, one thread:
//! `cargo run --release -p sere-host --example bench_gemm`. Prints one line
//! per shape with the GFLOP/s of every path this CPU supports, and the path
//! `gemm` takes: the measurement the choice of kernel rests on.

use sere_core::linalg::MatRef;
use sere_host::backend::cpu::{gemm_bias_on, GemmPath};
use std::time::Instant;

/// Rounds per shape and path.
const ROUNDS: usize = 8;

/// Seconds per call of `f`, best of 2 runs of `reps` calls.
fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..2 {
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    best
}

fn main() {
    let paths: Vec<GemmPath> = GemmPath::ALL
        .into_iter()
        .filter(|p| p.supported())
        .collect();
    println!("gemm takes: {}", GemmPath::active().name());
    // (name, m, n, k, A stored transposed, B stored transposed)
    let cases = [
        ("qkv fwd  x W^T", 4160, 576, 192, false, true),
        ("fc1 fwd  x W^T", 4160, 768, 192, false, true),
        ("fc2 fwd  x W^T", 4160, 192, 768, false, true),
        ("proj fwd x W^T", 4160, 192, 192, false, true),
        ("fc1 dx   dy W", 4160, 192, 768, false, false),
        ("fc2 dx   dy W", 4160, 768, 192, false, false),
        ("fc1 dW   dy^T x", 768, 192, 4160, true, false),
        ("fc2 dW   dy^T x", 192, 768, 4160, true, false),
        ("head     192x2048x2048", 192, 2048, 2048, false, true),
        ("attn     Q K^T 65", 65, 65, 64, false, true),
        ("attn     P V 65", 65, 64, 65, false, false),
        ("attn     Q K^T 17", 17, 17, 64, false, true),
    ];
    for (name, m, n, k, at, bt) in cases {
        let am = if at {
            MatRef::row_major(k, m).transposed()
        } else {
            MatRef::row_major(m, k)
        };
        let bm = if bt {
            MatRef::row_major(n, k).transposed()
        } else {
            MatRef::row_major(k, n)
        };
        let cm = MatRef::row_major(m, n);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let mut c = vec![0f32; m * n];
        let reps = (1e9 / (2.0 * (m * n * k) as f64)).ceil() as usize;
        let fl = 2.0 * (m * n * k) as f64;
        // Rounds alternate between the paths, so that a noisy neighbour
        // slows every column alike; each keeps its best round.
        let mut best = vec![f64::MAX; paths.len()];
        for _ in 0..ROUNDS {
            for (slot, &path) in paths.iter().enumerate() {
                let t = best_of(reps, || {
                    gemm_bias_on(path, 1.0, &a, am, &b, bm, 0.0, None, &mut c, cm).unwrap()
                });
                best[slot] = best[slot].min(t);
            }
        }
        let mut line = format!("{name:24}");
        for (slot, path) in paths.iter().enumerate() {
            line += &format!("  {} {:6.1}", path.name(), fl / best[slot] / 1e9);
        }
        println!("{line}  GFLOP/s");
    }
}
