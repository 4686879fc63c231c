#!/usr/bin/env python3
"""fp32 GEMM peak of this machine at a given thread count, measured with torch.mm.

For each square size n (default 1024 and 2048) it multiplies two random n x n float32
matrices repeatedly (one warm-up product, then at least --min-reps products and at
least --min-seconds of work), keeps the best single-product time, and reports
2*n^3 / best time. The peak is the best over the sizes. Prints ONE JSON line:
{"threads": T, "gflop_per_s": peak, "sizes": {"1024": ..., "2048": ...}, "device": ..., "torch": ...}
"""

import argparse
import json
import os
import resource
import sys
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--min-seconds", type=float, default=1.0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    dev = torch.device(args.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("gemm_peak.py: --device cuda but CUDA is not available")
        torch.backends.cuda.matmul.allow_tf32 = False

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    torch.manual_seed(0)
    sizes = {}
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    wall = 0.0
    for n in args.sizes:
        a = torch.randn(n, n, device=dev)
        b = torch.randn(n, n, device=dev)
        c = torch.empty(n, n, device=dev)
        torch.mm(a, b, out=c)  # warm-up
        sync()
        best, reps, spent = float("inf"), 0, 0.0
        while reps < args.min_reps or spent < args.min_seconds:
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            sync()
            dt = time.perf_counter() - t0
            best, reps, spent = min(best, dt), reps + 1, spent + dt
        wall += spent
        sizes[str(n)] = round(2.0 * n ** 3 / best / 1e9, 3)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    res = {
        "threads": args.threads,
        "gflop_per_s": max(sizes.values()),
        "sizes": sizes,
        "device": args.device,
        "torch": torch.__version__,
        "cpu_util": round(cpu_s / (wall * args.threads), 3) if wall > 0 else None,
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
