//! The CPU backend's SGEMM against sere-core's (matrixmultiply) at the
//! training step's shapes, one thread: `cargo run --release -p sere-host
//! --example bench_gemm`. Prints one line per shape with GFLOP/s of both.

use sere_core::linalg::MatRef;
use std::time::Instant;

fn main() {
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
        let reps = (2e9 / (2.0 * (m * n * k) as f64)).ceil() as usize;
        let mut best = [f64::MAX; 2];
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..reps {
                sere_core::linalg::gemm(1.0, &a, am, &b, bm, 0.0, &mut c, cm).unwrap();
            }
            best[0] = best[0].min(t.elapsed().as_secs_f64() / reps as f64);
            let t = Instant::now();
            for _ in 0..reps {
                sere_host::backend::cpu::gemm(1.0, &a, am, &b, bm, 0.0, &mut c, cm).unwrap();
            }
            best[1] = best[1].min(t.elapsed().as_secs_f64() / reps as f64);
        }
        let fl = 2.0 * (m * n * k) as f64;
        println!(
            "{name:24} matrixmultiply {:6.1} GFLOP/s   sere blocked {:6.1} GFLOP/s",
            fl / best[0] / 1e9,
            fl / best[1] / 1e9
        );
    }
}
