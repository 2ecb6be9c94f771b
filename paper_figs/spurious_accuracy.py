"""Figure: test accuracy against the spurious marker's agreement with the label at test time, one line per
method (mean over seeds, shaded +- std), from the run directories of scripts/spurious_table.py.

    python paper_figs/spurious_accuracy.py runs/spurious --out paper_figs/spurious_accuracy.pdf

Reads each `<method>_s<seed>/metrics.jsonl`: the last evaluation's `dev/accuracy` (the test environment,
agreement 0.1) and `test/agree<a>/accuracy` (the same sentences with markers at agreement a). The training
environments' agreements (0.9, 0.8) are marked. A method that ignores the marker draws a flat line at the
oracle's level; one that leans on it rises with the agreement. Needs matplotlib (`pip install -e '.[figs]'`).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

DEV_AGREEMENT = 0.1  # experiments/spurious_sst2.py's test environment


def collect(root: Path) -> dict[str, dict[float, list[float]]]:
    """{method: {agreement: [accuracy per seed]}} from the last evaluation of every run."""
    curves: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for metrics in sorted(root.glob("*_s*/metrics.jsonl")):
        method = re.sub(r"_s\d+$", "", metrics.parent.name)
        evals = [r for r in map(json.loads, metrics.read_text().splitlines()) if "dev/accuracy" in r]
        if not evals:
            continue
        last = evals[-1]
        curves[method][DEV_AGREEMENT].append(last["dev/accuracy"])
        for key, value in last.items():
            m = re.fullmatch(r"test/agree([0-9.]+)/accuracy", key)
            if m:
                curves[method][float(m.group(1))].append(value)
    return curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path)
    parser.add_argument("--out", type=Path, default=Path("paper_figs/spurious_accuracy.pdf"))
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = collect(args.runs)
    if not curves:
        raise SystemExit(f"no evaluated runs under {args.runs}: run scripts/spurious_table.py first")
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for method, by_agreement in sorted(curves.items()):
        xs = sorted(by_agreement)
        mean = np.array([np.mean(by_agreement[x]) for x in xs])
        std = np.array([np.std(by_agreement[x]) for x in xs])
        ax.plot(xs, 100 * mean, marker="o", label=f"{method} (n={len(by_agreement[xs[0]])})")
        ax.fill_between(xs, 100 * (mean - std), 100 * (mean + std), alpha=0.2)
    for a in (0.8, 0.9):
        ax.axvline(a, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("marker-label agreement at test (training: 0.9 and 0.8)")
    ax.set_ylabel("accuracy on SST-2 dev, noisy labels (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
