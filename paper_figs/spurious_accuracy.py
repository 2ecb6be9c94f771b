"""Figure: test accuracy against the spurious marker's agreement with the label at test time, one line per
method (mean over seeds, shaded +- std), from `research sweep experiments/spurious_sst2.py`'s committed record
(experiments/results/spurious) or its run directories.

    python paper_figs/spurious_accuracy.py --out paper_figs/spurious_accuracy.pdf

Reads each `<method>_s<seed>/metrics.jsonl`: the last evaluation's `dev/accuracy` (the test environment,
agreement 0.1) and `agree<a>/accuracy` (the same sentences with markers at agreement a). The training
environments' agreements (0.9, 0.8) are marked. A method that ignores the marker draws a flat line at the
oracle's level; one that leans on it rises with the agreement. Needs matplotlib (`pip install -e '.[figs]'`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import curves as shared

DEV_AGREEMENT = 0.1  # experiments/spurious_sst2.py's test environment
TRAIN_AGREEMENTS = (0.9, 0.8)


def collect(root: Path) -> shared.Curves:
    """{method: {agreement: [accuracy per seed]}} from the last evaluation of every run."""
    return shared.collect(root, "dev/accuracy", lambda last: {
        DEV_AGREEMENT: last["dev/accuracy"], **shared.metric_points(last, r"agree([0-9.]+)/accuracy")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="?", default=Path("experiments/results/spurious"),
                        help="the table's record (default) or its run directories (runs/spurious)")
    parser.add_argument("--out", type=Path, default=Path("paper_figs/spurious_accuracy.pdf"))
    args = parser.parse_args()
    found = collect(args.runs)
    if not found:
        raise SystemExit(f"no evaluated runs under {args.runs}: run `research sweep experiments/spurious_sst2.py` "
                         "first")
    shared.plot(found, args.out, "marker-label agreement at test (training: 0.9 and 0.8)",
                "accuracy on SST-2 dev, noisy labels (%)", marks=TRAIN_AGREEMENTS)


if __name__ == "__main__":
    main()
