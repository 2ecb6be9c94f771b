"""What the figure scripts in this folder share: per-method curves gathered from a grid of run directories
(`<method>_s<seed>/metrics.jsonl`, as `research sweep` lays them out) and drawn as mean +- std over seeds.

The scripts import it as a sibling module (`python paper_figs/<figure>.py` puts this folder on sys.path).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from research.metrics import read_records

Curves = dict[str, dict[float, list[float]]]  # {method: {x: [y per seed]}}


def collect(root: Path, final_key: str, points: Callable[[dict], dict[float, float]]) -> Curves:
    """For every run under `root`, the last metrics record holding `final_key` (the run's final evaluation),
    turned into (x, y) points by `points`; runs of one method (`<method>_s<seed>`) are pooled."""
    curves: Curves = defaultdict(lambda: defaultdict(list))
    for metrics in sorted(root.glob("*_s*/metrics.jsonl")):
        method = re.sub(r"_s\d+$", "", metrics.parent.name)
        finals = [r for r in read_records(metrics.parent) if final_key in r]  # metric names as today's
        if finals:
            for x, y in points(finals[-1]).items():
                curves[method][x].append(y)
    return curves


def metric_points(record: dict, pattern: str) -> dict[float, float]:
    """{x: value} for every key of `record` matching `pattern`, whose one group is x (e.g. an epsilon)."""
    found = {}
    for key, value in record.items():
        m = re.fullmatch(pattern, key)
        if m:
            found[float(m.group(1))] = value
    return found


def plot(curves: Curves, out: Path, xlabel: str, ylabel: str, marks: tuple[float, ...] = ()) -> None:
    """One line per method (mean over seeds, in percent, shaded +- std; n = seeds), dotted verticals at
    `marks`, saved to `out` (format from its suffix). Needs matplotlib (`pip install -e '.[figs]'`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for method, by_x in sorted(curves.items()):
        xs = sorted(by_x)
        mean = np.array([np.mean(by_x[x]) for x in xs])
        std = np.array([np.std(by_x[x]) for x in xs])
        ax.plot(xs, 100 * mean, marker="o", label=f"{method} (n={len(by_x[xs[0]])})")
        ax.fill_between(xs, 100 * (mean - std), 100 * (mean + std), alpha=0.2)
    for x in marks:
        ax.axvline(x, color="gray", lw=0.8, ls=":")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}")
