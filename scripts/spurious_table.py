"""The controlled-shift table: ERM, IRMv1, V-REx, Group DRO and the oracle on experiments/spurious_sst2.py.

    RESEARCH_DATA_DIR=../shared/data python scripts/spurious_table.py --seeds 0 1 2 --out runs/spurious

For each (method, seed): `research train experiments/spurious_sst2.py --set ...` into `<out>/<method>_s<seed>`
(IRM and V-REx also reset Adam where their penalty switches on, DomainBed's protocol; the oracle is ERM
without markers). Finished runs are skipped and a run cut short is resumed, so the table can be built over
several sessions. Writes `<out>/summary.json` and `<out>/summary.md`: accuracy on the test environment
(agreement 0.1) and at every other test agreement, and the training environments' accuracy, mean +- std
over seeds, from the last evaluation of each run. paper_figs/spurious_accuracy.py draws the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "erm": [],
    "irm": ['objective.name="irm"', "optim.reset_at_step=100"],
    "vrex": ['objective.name="vrex"', "optim.reset_at_step=100"],
    "group_dro": ['objective.name="group_dro"'],
    "oracle": ["data.spurious.oracle=true"],
}


def final_eval(workdir: Path) -> dict:
    rs = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rs if "dev/accuracy" in r][-1]


def run(method: str, seed: int, out: Path) -> dict:
    workdir = out / f"{method}_s{seed}"
    done = workdir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    resume = ["--resume"] if (workdir / "checkpoints").is_dir() else []
    sets = [x for s in [*METHODS[method], f"train.seed={seed}"] for x in ("--set", s)]
    with (out / f"{method}_s{seed}.log").open("a") as log:
        subprocess.run(["research", "train", str(ROOT / "experiments" / "spurious_sst2.py"), *sets, "--workdir",
                        str(workdir), *resume], check=True, stdout=log, stderr=subprocess.STDOUT)
    last = final_eval(workdir)
    result = {"method": method, "seed": seed, "step": last["step"],
              "agree0.1": last["dev/accuracy"],
              **{k.removeprefix("test/").removesuffix("/accuracy"): v for k, v in last.items()
                 if k.startswith("test/") and k.endswith("/accuracy")}}
    done.write_text(json.dumps(result, indent=2) + "\n")
    return result


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} +- {100 * std:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", default="runs/spurious")
    args = parser.parse_args()
    if "RESEARCH_DATA_DIR" not in os.environ:
        sys.exit("set RESEARCH_DATA_DIR (e.g. RESEARCH_DATA_DIR=../shared/data)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {m: [run(m, s, out) for s in args.seeds] for m in args.methods}
    agreements = sorted({k for rs in results.values() for r in rs for k in r if k.startswith("agree")},
                        key=lambda k: float(k.removeprefix("agree")))
    header = ["method", "test env (agreement 0.1)", *[f"agreement {k.removeprefix('agree')}" for k in agreements
                                                     if k != "agree0.1"]]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for m, rs in results.items():
        cells = [mean_std([r["agree0.1"] for r in rs]),
                 *[mean_std([r[k] for r in rs]) for k in agreements if k != "agree0.1"]]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    (out / "summary.json").write_text(json.dumps({"seeds": args.seeds, "results": results}, indent=2) + "\n")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
