#!/usr/bin/env python3
"""PyTorch twin of `host/examples/bench_kernels.rs`: forward + backward of each core
operation at the authors' per-image shapes (N = 196 tokens, C = 384, 6 heads, 13 x 13
overlap grid), for a batch of B images in one batched call, float32 on the CPU, eager.

Prints one JSON line per kernel with the same keys as the Rust example, then the peak RSS.
Backward goes through autograd (what a PyTorch SERE implementation runs); the
`*_manual` entries are not needed: autograd's own kernels are the reference.
"""

import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F

SIDE, C, HEADS, GS = 14, 384, 6, 13
N, T, P = SIDE * SIDE, SIDE * SIDE + 1, GS * GS


def timed(fn, reps, warmup):
    for _ in range(warmup):
        fn()
    ms = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ms), min(ms), max(ms)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--only", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    B = a.batch

    def report(name, t, batch=B, reps=a.reps):
        print(json.dumps({"impl": "torch", "kernel": name, "threads": a.threads, "batch": batch,
                          "median_ms": round(t[0], 4), "min_ms": round(t[1], 4),
                          "max_ms": round(t[2], 4), "reps": reps}), flush=True)

    def bench(name, make):
        if a.only and a.only not in name:
            return
        step = make()
        report(name, timed(step, a.reps, 3))

    def rand(*shape, scale=1.0, grad=False):
        x = (torch.rand(*shape) * 2 - 1) * scale
        return x.requires_grad_(grad)

    def grid_sample():
        m = rand(B, C, SIDE, SIDE, grad=True)
        g = rand(B, GS, GS, 2, scale=0.9, grad=True)
        go = rand(B, C, GS, GS)

        def step():
            m.grad = g.grad = None
            F.grid_sample(m, g, mode="bilinear", padding_mode="zeros",
                          align_corners=False).backward(go)
        return step

    def spatial():
        x = rand(B, P, C, grad=True)
        gl = rand(B, HEADS, P, P, scale=1e-3)

        def step():
            x.grad = None
            xh = x.view(B, P, HEADS, C // HEADS).transpose(1, 2)
            (xh @ xh.transpose(-1, -2) / (C // HEADS) ** 0.5).backward(gl)
        return step

    def channel():
        x = rand(B, P, C, grad=True)
        gl = rand(B, C, C, scale=1e-3)

        def step():
            x.grad = None
            (x.transpose(1, 2) @ x / P).backward(gl)
        return step

    def softmax():
        x = rand(B, HEADS * P, P, scale=4.0, grad=True)
        dy = rand(B, HEADS * P, P)

        def step():
            x.grad = None
            torch.softmax(x, -1).backward(dy)
        return step

    def relation_ce(rows, cols, tau_t):
        def make():
            s = rand(B, rows, cols, scale=3.0, grad=True)
            t = rand(B, rows, cols, scale=3.0)

            def step():
                s.grad = None
                q = torch.softmax(t / tau_t, -1)
                (-(q * torch.log_softmax(s, -1)).sum(-1).mean(-1).sum()).backward()
            return step
        return make

    def layer_norm():
        x = rand(B, T, C, scale=2.0, grad=True)
        w = rand(C, grad=True)
        b = rand(C, scale=0.1, grad=True)
        dy = rand(B, T, C)

        def step():
            x.grad = w.grad = b.grad = None
            F.layer_norm(x, (C,), w, b, 1e-6).backward(dy)
        return step

    def gelu():
        x = rand(B, T, 4 * C, scale=3.0, grad=True)
        dy = rand(B, T, 4 * C)

        def step():
            x.grad = None
            F.gelu(x).backward(dy)
        return step

    def linear():
        x = rand(B, T, C, grad=True)
        w = rand(3 * C, C, scale=0.05, grad=True)
        b = rand(3 * C, scale=0.01, grad=True)
        dy = rand(B, T, 3 * C)

        def step():
            x.grad = w.grad = b.grad = None
            F.linear(x, w, b).backward(dy)
        return step

    def dino():
        s = rand(12, B, 8192, scale=3.0, grad=True)
        t = rand(2, B, 8192, scale=0.2)
        centre = rand(8192, scale=0.05)

        def step():
            s.grad = None
            q = torch.softmax((t - centre) / 0.04, -1)
            ls = torch.log_softmax(s / 0.1, -1)
            loss = 0
            for iq in range(2):
                for v in range(12):
                    if v == iq:
                        continue
                    loss = loss + (-(q[iq] * ls[v]).sum(-1)).mean()
            (loss / 22).backward()
        return step

    bench("grid_sample", grid_sample)
    bench("spatial_relation", spatial)
    bench("channel_relation", channel)
    bench("softmax_1014x169", softmax)
    bench("relation_ce_spatial_1014x169", relation_ce(HEADS * P, P, 0.5))
    bench("relation_ce_channel_384x384", relation_ce(C, C, 0.1))
    bench("layer_norm_197x384", layer_norm)
    bench("gelu_197x1536", gelu)
    bench("linear_197x384_to_1152", linear)
    bench("dino_loss_k8192_2t_12s", dino)

    if not a.only or a.only in "adamw_21.7M":
        n = 21_700_000
        p = [torch.nn.Parameter(rand(n, scale=0.1))]
        p[0].grad = rand(n, scale=0.01)
        # foreach=True is PyTorch's default multi-tensor path on CPU tensors
        # when available; fused=True is the single-kernel AdamW.
        opt = torch.optim.AdamW(p, lr=1e-4, weight_decay=0.04, fused=True)
        report("adamw_21.7M", timed(opt.step, min(a.reps, 10), 2), batch=1, reps=min(a.reps, 10))

    print(json.dumps({"impl": "torch",
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


if __name__ == "__main__":
    main()
