"""Figure: dev accuracy under the embedding-space PGD attack against the attack radius, one line per
objective (mean over seeds, shaded +- std), from the run directories of scripts/robustness_table.py.

    python paper_figs/robust_accuracy.py runs/robustness --out paper_figs/robust_accuracy.pdf

Reads each `<objective>_s<seed>/metrics.jsonl` (the `eval_latest/pgd_eps*/accuracy` records that
`research eval --attack pgd` appends; epsilon 0 is the clean accuracy). Needs matplotlib
(`pip install -e '.[figs]'`).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np


def collect(root: Path) -> dict[str, dict[float, list[float]]]:
    """{objective: {epsilon: [accuracy per seed]}} from the last attack evaluation of every run."""
    curves: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for metrics in sorted(root.glob("*_s*/metrics.jsonl")):
        objective = re.sub(r"_s\d+$", "", metrics.parent.name)
        evals = [r for r in map(json.loads, metrics.read_text().splitlines()) if "eval_latest/accuracy" in r]
        if not evals:
            continue
        last = evals[-1]
        curves[objective][0.0].append(last["eval_latest/accuracy"])
        for key, value in last.items():
            m = re.fullmatch(r"eval_latest/pgd_eps([0-9.e+-]+)/accuracy", key)
            if m:
                curves[objective][float(m.group(1))].append(value)
    return curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path)
    parser.add_argument("--out", type=Path, default=Path("paper_figs/robust_accuracy.pdf"))
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = collect(args.runs)
    if not curves:
        raise SystemExit(f"no attacked runs under {args.runs}: run scripts/robustness_table.py first")
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for objective, by_eps in sorted(curves.items()):
        eps = sorted(by_eps)
        mean = np.array([np.mean(by_eps[e]) for e in eps])
        std = np.array([np.std(by_eps[e]) for e in eps])
        ax.plot(eps, 100 * mean, marker="o", label=f"{objective} (n={len(by_eps[eps[0]])})")
        ax.fill_between(eps, 100 * (mean - std), 100 * (mean + std), alpha=0.2)
    ax.set_xlabel("PGD radius epsilon (L2 per example, word embeddings)")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
