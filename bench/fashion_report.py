#!/usr/bin/env python3
"""Report of bench/fashion_mnist.sh runs (issue 15): a Markdown table of the
end-of-training evaluation (eval.json) per run and the mean over seeds per
configuration, the time to accuracy (teacher k-NN on the --eval-every subset
against training minutes at the run's idle pace: steps x batch over the
90th percentile of its logged images/s, since the machine was shared) as a
PNG, and the first such minute at which the subset k-NN beats raw pixels on
the same subset (printed by the run at its start).

Usage: python3 bench/fashion_report.py runs/fashion [figure.png] [--pace CONFIG=IMG_PER_S ...]
       [--xlabel TEXT]

--pace sets a configuration's pace instead of its logged one: for runs
trained with --threads 1 beside each other, whose own pace is not that of
the 2 cores (give the 2-thread pace measured by another seed, or one
scaled from a side-by-side run; say so beside the figure). --xlabel
names the minutes otherwise (bench/fashion_objectives.sh's are one core's).
"""
import json
import pathlib
import re
import sys

COLOURS = {"sere": "tab:red", "dino": "tab:blue", "ibot": "tab:green", "ibot-sere": "tab:purple"}
LABEL = {"sere": "DINO + SERE (alpha 0.5, beta 3)", "dino": "DINO only (alpha = beta = 0)",
         "ibot": "iBOT (DINO + MIM)", "ibot-sere": "iBOT + SERE"}


def method(cfg):
    """The method a configuration name starts with ("sere-p7-27k" -> "sere";
    the longest match, so "ibot-sere-..." is iBOT + SERE)."""
    names = [m for m in COLOURS if cfg == m or cfg.startswith(m + "-")]
    return max(names, key=len) if names else None


def label(cfg):
    m = method(cfg)
    if m is None:
        return cfg
    rest = cfg[len(m) + 1:]
    return LABEL[m] + (f" [{rest}]" if rest else "")


def runs(out):
    for d in sorted(out.iterdir()):
        m = re.fullmatch(r"(.+)-seed(\d+)", d.name)
        if m and (d / "metrics.jsonl").exists():
            yield m.group(1), int(m.group(2)), d


def idle_rate(rows):
    """Images per second of the run's quiet stretches: the 90th percentile
    of its logged intervals (the machine was shared, so the wall time of a
    run says more about its neighbours than about it)."""
    rates = sorted(r["images_per_s"] for r in rows if r["images_per_s"] > 0)
    return rates[int(0.9 * (len(rates) - 1))]


def curve(d, batch, pace=None):
    """(rows, [(idle minutes, step, k-NN)], idle images/s); `pace` replaces
    the logged idle images/s."""
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()]
    rate = pace or idle_rate(rows)
    pts = [(r["step"] * batch / rate / 60.0, r["step"], r["knn_top1"])
           for r in rows if r.get("knn_top1") is not None]
    return rows, pts, rate


def batch_of(d):
    m = re.search(r"(?m)^batch = (\d+)", (d / "config.toml").read_text())
    return int(m.group(1))


def subset_pixels(d):
    log = d.parent / (d.name + ".log")
    if log.exists():
        m = re.search(r"raw pixels score ([\d.]+)% on them", log.read_text())
        if m:
            return float(m.group(1)) / 100.0
    return None


def main():
    args, paces = [], {}
    xlabel = "training minutes on 2 cores at the run's idle pace (evaluation excluded)"
    it = iter(sys.argv[1:])
    for a in it:
        if a == "--pace":
            cfg, rate = next(it).split("=")
            paces[cfg] = float(rate)
        elif a == "--xlabel":
            xlabel = next(it)
        else:
            args.append(a)
    out = pathlib.Path(args[0])
    fig_path = pathlib.Path(args[1]) if len(args) > 1 else out / "knn_vs_minutes.png"
    table, by_cfg, curves = [], {}, []
    for cfg, seed, d in runs(out):
        batch = batch_of(d)
        rows, pts, rate = curve(d, batch, paces.get(cfg))
        wall_min = (rows[-1]["elapsed_s"] - rows[-1].get("eval_s", 0.0)) / 60.0
        idle_min = rows[-1]["step"] * batch / rate / 60.0
        pix = subset_pixels(d)
        beat = next((m for m, _, k in pts if pix is not None and k > pix), None)
        curves.append((cfg, seed, pts, pix))
        ev = d / "eval.json"
        if ev.exists():
            r = json.loads(ev.read_text())
            table.append((cfg, seed, r, (wall_min, idle_min, rate), beat))
            by_cfg.setdefault(cfg, []).append(r)
    pct = lambda v: f"{100 * v:.2f}%"
    print("| run | seed | steps | training min: wall (idle pace, img/s) | k-NN teacher | linear teacher | k-NN random init | linear random init | k-NN raw pixels | subset k-NN beats pixels at |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for cfg, seed, r, (wall, idle, rate), beat in table:
        beat_s = f"{beat:.1f} min" if beat is not None else "not within the run"
        m = f"{wall:.1f} ({idle:.1f} at {rate:.0f})"
        print(f"| {label(cfg)} | {seed} | {r['step']} | {m} | {pct(r['knn_teacher'])} "
              f"| {pct(r['linear_teacher'])} | {pct(r['knn_random_init'])} | {pct(r['linear_random_init'])} "
              f"| {pct(r['knn_pixels'])} | {beat_s} |")
    for cfg, rs in by_cfg.items():
        mean = lambda k: sum(r[k] for r in rs) / len(rs)
        print(f"| **{label(cfg)}, mean of {len(rs)}** | | | | {pct(mean('knn_teacher'))} "
              f"| {pct(mean('linear_teacher'))} | {pct(mean('knn_random_init'))} "
              f"| {pct(mean('linear_random_init'))} | {pct(mean('knn_pixels'))} | |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    pix_drawn = False
    for cfg, seed, pts, pix in curves:
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [100 * p[2] for p in pts], marker="o", markersize=3,
                color=COLOURS.get(method(cfg), "black"), linestyle="-" if seed == 1 else "--",
                label=f"{label(cfg)}, seed {seed}")
        if pix is not None and not pix_drawn:
            ax.axhline(100 * pix, color="grey", linestyle=":", label="raw pixels (same subset)")
            pix_drawn = True
    ax.set_xlabel(xlabel)
    ax.set_ylabel("teacher weighted 20-NN top-1 (%)")
    ax.set_title("Fashion-MNIST: k-NN on 5000 / 1000 images during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(fig_path, dpi=110)
    print(f"\nwrote {fig_path}")


if __name__ == "__main__":
    main()
