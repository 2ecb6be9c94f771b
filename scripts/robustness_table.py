"""The robustness table: every objective x seeds on experiments/sst2_robust.py, each final model attacked.

    RESEARCH_DATA_DIR=../shared/data python scripts/robustness_table.py --seeds 0 1 2 --out runs/robustness

For each (objective, seed): `research train experiments/sst2_robust.py --set objective.name=... --set
train.seed=...` into `<out>/<objective>_s<seed>`, then `research eval <run> --checkpoint latest --attack
pgd,char`. Finished runs are skipped (the table can be built over several sessions; a run cut short is
resumed). Writes `<out>/summary.json` and `<out>/summary.md`: clean dev accuracy, accuracy under PGD at
each epsilon and under the character attack (mean +- std over seeds), attack success rate, and the median
train-step time of each objective relative to supervised training (from the runs' own throughput logs).
"""

from __future__ import annotations

import statistics
import subprocess
from pathlib import Path

from research.sweep import last_record_with, mean_std, records, run_grid, write_table

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = ["cross_entropy", "fgm", "pgd", "freelb", "smart", "vat"]
EPSILONS = ["0.5", "1", "2", "4"]


def summarize(workdir: Path) -> dict:
    """Attack the final model, then keep its clean and attacked metrics and its training throughput."""
    with (workdir.parent / f"{workdir.name}.log").open("a") as log:
        subprocess.run(["research", "eval", str(workdir), "--checkpoint", "latest", "--attack", "pgd,char",
                        "--epsilons", *EPSILONS], check=True, stdout=log, stderr=subprocess.STDOUT)
    final = last_record_with(workdir, "eval_latest/accuracy")
    rates = [r["train/examples_per_s"] for r in records(workdir) if "train/examples_per_s" in r][1:]  # 1st: compile
    return {**{k.removeprefix("eval_latest/"): v for k, v in final.items() if k.startswith("eval_latest/")},
            "examples_per_s": statistics.median(rates) if rates else None}


def main() -> None:
    methods = {o: [f'objective.name="{o}"'] for o in OBJECTIVES}
    out, payload = run_grid(__doc__, ROOT / "experiments" / "sst2_robust.py", methods, "runs/robustness", summarize)
    results = payload["results"]
    base = [r["examples_per_s"] for r in results.get("cross_entropy", []) if r["examples_per_s"]]
    base_rate = statistics.mean(base) if base else None
    header = ["objective", "clean", *[f"PGD eps {e}" for e in EPSILONS], "char attack", "char success",
              "step time vs supervised"]
    rows = []
    for o, rs in results.items():
        rate = statistics.mean(r["examples_per_s"] for r in rs if r["examples_per_s"])
        rows.append([o, mean_std([r["accuracy"] for r in rs]),
                     *[mean_std([r[f"pgd_eps{e}/accuracy"] for r in rs]) for e in EPSILONS],
                     mean_std([r["char_attack/accuracy"] for r in rs]),
                     mean_std([r["char_attack/success_rate"] for r in rs]),
                     f"x{base_rate / rate:.2f}" if base_rate else "-"])
    print(write_table(out, header, rows, payload))


if __name__ == "__main__":
    main()
