"""Figure: the compression study's frontier, SST-2 dev accuracy against CPU latency (batch 32) and against the
weights' size, one point per model, the Pareto front drawn through the points no other model beats on both.
Reads `scripts/bench_compress.py`'s frontier.json.

    python paper_figs/compress_frontier.py experiments/results/compress/frontier/frontier.json \
        --out paper_figs/compress_frontier.pdf

Models without a size (PyTorch's, measured for latency only) appear in the latency panel alone. Needs
matplotlib (`pip install -e '.[figs]'`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points (cost, accuracy, name) that no other point beats on both: cheaper or as cheap, and at least as
    accurate; sorted by cost."""
    front, best = [], float("-inf")
    for cost, accuracy, name in sorted(points, key=lambda p: (p[0], -p[1])):
        if accuracy > best:
            front.append((cost, accuracy, name))
            best = accuracy
    return front


def plot(results: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    panels = [("latency_b32_ms", "CPU latency at batch 32 (ms)", 1.0), ("bytes", "weights on disk (MB)", 1e-6)]
    for ax, (key, label, scale) in zip(axes, panels, strict=True):
        points = [(r[key] * scale, 100 * r["accuracy"], name) for name, r in results.items() if key in r]
        for cost, accuracy, name in points:
            ax.plot(cost, accuracy, "o", color="black" if name == "teacher" else None)
            ax.annotate(name, (cost, accuracy), textcoords="offset points", xytext=(4, 3), fontsize=7)
        front = pareto(points)
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="gray", alpha=0.6)
        ax.set_xlabel(label)
        ax.set_ylabel("SST-2 dev accuracy (%)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("frontier", type=Path, help="scripts/bench_compress.py's frontier.json")
    parser.add_argument("--out", type=Path, default=Path("paper_figs/compress_frontier.pdf"))
    args = parser.parse_args()
    plot(json.loads(args.frontier.read_text())["results"], args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
