"""Figure: SST-2 dev accuracy against trained parameters (log scale), one point per fine-tuning method (mean over
seeds, bars +- std, each seed a faint dot), from `research sweep experiments/peft_sst2.py`'s committed record
(experiments/results/peft) or its run directories.

    python paper_figs/peft_tradeoff.py --out paper_figs/peft_tradeoff.pdf

Reads each `<method>_s<seed>/result.json` (what the study's `summarize` kept: `accuracy`, the final dev
accuracy, and `trained_parameters`). Needs matplotlib (`pip install -e '.[figs]'`).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path


def collect(root: Path) -> dict[str, dict]:
    """{method: {"trained": count, "accuracy": [per seed]}} from every `<method>_s<seed>/result.json`."""
    found: dict[str, dict] = {}
    for path in sorted(root.glob("*_s*/result.json")):
        method = re.fullmatch(r"(.+)_s\d+", path.parent.name).group(1)
        result = json.loads(path.read_text())
        entry = found.setdefault(method, {"trained": result["trained_parameters"], "accuracy": []})
        entry["accuracy"].append(result["accuracy"])
    return found


def plot(found: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method, entry in sorted(found.items(), key=lambda item: item[1]["trained"]):
        acc = [100 * a for a in entry["accuracy"]]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        bar = ax.errorbar(entry["trained"], statistics.mean(acc), yerr=std, fmt="o", capsize=3,
                          color="black" if method == "full" else None)
        # Each seed too, small and faint: a mean +- std hides a seed that collapsed (Houlsby's seed 1 did).
        ax.scatter([entry["trained"]] * len(acc), acc, s=9, alpha=0.45, color=bar.lines[0].get_color(), zorder=3)
        ax.annotate(method, (entry["trained"], statistics.mean(acc)), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trained parameters (log scale)")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="?", default=Path("experiments/results/peft"),
                        help="the study's record (default) or its run directories (runs/peft)")
    parser.add_argument("--out", type=Path, default=Path("paper_figs/peft_tradeoff.pdf"))
    args = parser.parse_args()
    found = collect(args.runs)
    if not found:
        raise SystemExit(f"no results under {args.runs}: run `research sweep experiments/peft_sst2.py` first")
    plot(found, args.out)


if __name__ == "__main__":
    main()
