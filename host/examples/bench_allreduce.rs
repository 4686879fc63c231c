//! The gradient all-reduce of a data-parallel step, timed on its own:
//! `mpirun -n N target/release/examples/bench_allreduce [FLOATS]` prints,
//! on rank 0, one JSON line with the mean time of an all-reduce of FLOATS
//! `f32`s (default: the default model's 0.72 M student parameters) and the
//! bus bandwidth it reaches (NCCL's `busbw`: `2 (N - 1) / N` of the buffer
//! per rank, the volume a ring all-reduce moves).
//!
//! Build: `cargo build --release -p sere-host --features mpi --example bench_allreduce`.

use std::time::Instant;

use sere_host::dist;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let floats: usize = match std::env::args().nth(1) {
        Some(a) => a.parse().map_err(|e| format!("FLOATS {a:?}: {e}"))?,
        None => 720_000,
    };
    let group = dist::from_launcher()?;
    let mut buf = vec![1.0f32; floats];
    let (warmup, reps) = (5, 50);
    for _ in 0..warmup {
        group.all_reduce_mean_f32(&mut buf)?;
    }
    group.barrier()?;
    let started = Instant::now();
    for _ in 0..reps {
        group.all_reduce_mean_f32(&mut buf)?;
    }
    group.barrier()?;
    let secs = started.elapsed().as_secs_f64() / reps as f64;
    if group.rank() == 0 {
        let n = group.world() as f64;
        let bytes = floats as f64 * 4.0;
        let busbw = bytes * 2.0 * (n - 1.0) / n / secs;
        println!(
            "{{\"ranks\":{},\"floats\":{floats},\"ms\":{:.3},\"busbw_gb_s\":{:.2},\"transport\":\"{}\"}}",
            group.world(),
            secs * 1e3,
            busbw / 1e9,
            group.describe()
        );
    }
    Ok(())
}
