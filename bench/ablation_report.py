#!/usr/bin/env python3
"""Table and loss-curve plot of a `bench/ablation.sh` run.

Reads OUT/results.jsonl (one evaluation per line) and OUT/<config>-s<seed>/metrics.jsonl,
prints a markdown table (k-NN and linear top-1 of each evaluated feature set, mean +-
half-range over seeds, per config and checkpoint step) and writes OUT/loss_curves.png (total and per-term losses against the
step, one line per run). Needs matplotlib only for the plot.

    python3 bench/ablation_report.py runs/ablation
"""

import collections
import json
import pathlib
import sys

ORDER = ["random", "dino", "spatial", "channel", "full"]
LABEL = {
    "random": "random initialisation",
    "dino": "DINO only (alpha = beta = 0)",
    "spatial": "+ spatial (alpha 0.2, beta 0)",
    "channel": "+ channel (alpha 0, beta 0.5)",
    "full": "full SERE (alpha 0.2, beta 0.5)",
}


def mean_spread(xs):
    m = sum(xs) / len(xs)
    return m, (max(xs) - min(xs)) / 2


FEATURES = {"teacher_cls": "", "teacher_cls_last4+avgpool": ", DINO features"}
METRICS = {"knn_top1": "k-NN", "linear_top1": "linear"}


def table(out):
    res = collections.defaultdict(lambda: collections.defaultdict(dict))
    for line in (out / "results.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        col = (r["eval"].get("features", "teacher_cls"), r["eval"]["metric"])
        res[(r["config"], r["step"])][col][r["seed"]] = 100 * r["eval"]["top1"]
    # Columns: the final CLS token first (k-NN, linear), then other features.
    cols = sorted({c for cells in res.values() for c in cells},
                  key=lambda c: (list(FEATURES).index(c[0]) if c[0] in FEATURES else 99,
                                 c[0], list(METRICS).index(c[1])))
    heads = [f"{METRICS.get(m, m)}{FEATURES.get(f, ', ' + f)} top-1 (%)" for f, m in cols]
    print("| run | step | seeds | " + " | ".join(heads) + " |")
    print("|---|---:|---:|" + "---:|" * len(cols))
    keys = sorted(res, key=lambda k: (ORDER.index(k[0]) if k[0] in ORDER else 99, k[1]))
    for cfg, step in keys:
        cells = []
        seeds = set()
        for col in cols:
            vals = res[(cfg, step)].get(col, {})
            seeds |= set(vals)
            if vals:
                m, s = mean_spread(list(vals.values()))
                per = ", ".join(f"{v:.2f}" for _, v in sorted(vals.items()))
                cells.append(f"{m:.2f} ± {s:.2f} ({per})")
            else:
                cells.append("-")
        print(f"| {LABEL.get(cfg, cfg)} | {step} | {len(seeds)} | " + " | ".join(cells) + " |")


def plot(out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = [("loss_dino", "DINO loss L_I"), ("loss_spatial", "spatial relation loss"),
             ("loss_channel", "channel relation loss")]
    fig, axes = plt.subplots(1, len(terms), figsize=(15, 4.2))
    colours = {"dino": "tab:blue", "spatial": "tab:orange", "channel": "tab:green",
               "full": "tab:red"}
    for run in sorted(out.glob("*-s*/metrics.jsonl")):
        name = run.parent.name
        cfg, seed = name.rsplit("-s", 1)
        if cfg == "random":
            continue
        rows = [json.loads(l) for l in run.read_text().splitlines() if l.strip()]
        steps = [r["step"] for r in rows]
        for ax, (key, title) in zip(axes, terms):
            # Smooth over 5 logged points (50 steps) to see the trend.
            ys = [r[key] for r in rows]
            sm = [sum(ys[max(0, i - 4):i + 1]) / len(ys[max(0, i - 4):i + 1])
                  for i in range(len(ys))]
            ax.plot(steps, sm, color=colours.get(cfg, "black"),
                    linestyle="-" if seed == "1" else "--", linewidth=1.2,
                    label=f"{cfg} seed {seed}")
            ax.set_title(title)
            ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.suptitle("Fashion-MNIST ablation: losses (moving average of 5 logged steps); "
                 "relation losses are computed, not trained, where their weight is 0")
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    print(f"\nwrote {out / 'loss_curves.png'}")


def main():
    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "runs/ablation")
    table(out)
    plot(out)


if __name__ == "__main__":
    main()
