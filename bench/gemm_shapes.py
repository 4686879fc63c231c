#!/usr/bin/env python3
"""torch.mm (MKL) and numpy (OpenBLAS) at the SGEMM shapes of the issue-14 step.

The counterpart of `cargo run --release -p sere-host --example bench_gemm`: the same
products (m x n x k, row-major, fp32), one thread by default, best of --rounds rounds
of at least --min-seconds each. Run both in one session, alternating, on a quiet
machine: shared hosts move these figures by 20% or more between minutes.
Prints one line per product: GFLOP/s of torch.mm and of numpy's matmul.
"""

import argparse
import os
import time

SHAPES = [
    ("qkv fwd", 4160, 576, 192),
    ("fc1 fwd", 4160, 768, 192),
    ("fc2 fwd", 4160, 192, 768),
    ("proj fwd", 4160, 192, 192),
    ("fc1 dW", 768, 192, 4160),
    ("head", 192, 2048, 2048),
    ("attn QK^T 65", 65, 65, 64),
    ("attn QK^T 17", 17, 17, 64),
]


def rate(f, flops, min_seconds):
    f()
    reps, start = 0, time.perf_counter()
    while True:
        f()
        reps += 1
        took = time.perf_counter() - start
        if took >= min_seconds:
            return flops * reps / took / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-seconds", type=float, default=0.5)
    args = p.parse_args()
    # numpy's OpenBLAS reads its thread count when it loads.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    for name, m, n, k in SHAPES:
        a = rng.random((m, k), dtype=np.float32)
        b = rng.random((k, n), dtype=np.float32)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        flops = 2 * m * n * k
        best_t = best_n = 0.0
        for _ in range(args.rounds):
            best_t = max(best_t, rate(lambda: torch.mm(ta, tb), flops, args.min_seconds))
            best_n = max(best_n, rate(lambda: a @ b, flops, args.min_seconds))
        print(f"{name:14s} {m}x{n}x{k}: torch.mm {best_t:6.1f}  numpy {best_n:6.1f}  GFLOP/s")


if __name__ == "__main__":
    main()
