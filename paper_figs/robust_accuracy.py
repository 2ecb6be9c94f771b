"""Figure: dev accuracy under the embedding-space PGD attack against the attack radius, one line per
objective (mean over seeds, shaded +- std), from `research sweep experiments/sst2_robust.py`'s committed record
(experiments/results/robustness) or its run directories.

    python paper_figs/robust_accuracy.py --out paper_figs/robust_accuracy.pdf

Reads each `<objective>_s<seed>/metrics.jsonl` (the `eval_latest/pgd_eps*/accuracy` records that
`research eval --attack pgd` appends; epsilon 0 is the clean accuracy). Needs matplotlib
(`pip install -e '.[figs]'`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import curves as shared


def collect(root: Path) -> shared.Curves:
    """{objective: {epsilon: [accuracy per seed]}} from the last attack evaluation of every run."""
    return shared.collect(root, "eval_latest/accuracy", lambda last: {
        0.0: last["eval_latest/accuracy"],
        **shared.metric_points(last, r"eval_latest/pgd_eps([0-9.e+-]+)/accuracy")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="?", default=Path("experiments/results/robustness"),
                        help="the table's record (default) or its run directories (runs/robustness)")
    parser.add_argument("--out", type=Path, default=Path("paper_figs/robust_accuracy.pdf"))
    args = parser.parse_args()
    found = collect(args.runs)
    if not found:
        raise SystemExit(f"no attacked runs under {args.runs}: run `research sweep experiments/sst2_robust.py` first")
    shared.plot(found, args.out, "PGD radius epsilon (L2 per example, word embeddings)", "SST-2 dev accuracy (%)")


if __name__ == "__main__":
    main()
