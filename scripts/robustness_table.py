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

import argparse
import json
import statistics
import subprocess
from pathlib import Path

from research.sweep import last_record_with, mean_std, records, require_data_dir, train_run, write_table

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = ["cross_entropy", "fgm", "pgd", "freelb", "smart", "vat"]
EPSILONS = ["0.5", "1", "2", "4"]


def run(objective: str, seed: int, out: Path) -> dict:
    workdir = out / f"{objective}_s{seed}"
    done = workdir / "robustness.json"
    if done.exists():
        return json.loads(done.read_text())
    log = out / f"{objective}_s{seed}.log"
    train_run(ROOT / "experiments" / "sst2_robust.py", [f'objective.name="{objective}"', f"train.seed={seed}"],
              workdir, log)
    with log.open("a") as out_log:
        subprocess.run(["research", "eval", str(workdir), "--checkpoint", "latest", "--attack", "pgd,char",
                        "--epsilons", *EPSILONS], check=True, stdout=out_log, stderr=subprocess.STDOUT)
    final = last_record_with(workdir, "eval_latest/accuracy")
    rates = [r["train/examples_per_s"] for r in records(workdir) if "train/examples_per_s" in r][1:]  # 1st: compile
    result = {"objective": objective, "seed": seed,
              **{k.removeprefix("eval_latest/"): v for k, v in final.items() if k.startswith("eval_latest/")},
              "examples_per_s": statistics.median(rates) if rates else None}
    done.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--objectives", nargs="+", default=OBJECTIVES, choices=OBJECTIVES)
    parser.add_argument("--out", default="runs/robustness")
    args = parser.parse_args()
    require_data_dir()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {o: [run(o, s, out) for s in args.seeds] for o in args.objectives}
    base_rate = statistics.mean(r["examples_per_s"] for r in results.get("cross_entropy", []) if r["examples_per_s"]) \
        if "cross_entropy" in results else None
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
    print(write_table(out, header, rows, {"seeds": args.seeds, "results": results}))


if __name__ == "__main__":
    main()
