"""The CAD table: ERM on the original reviews, ERM on the combined data, and each causal objective on the
combined data (experiments/cad_minilm.py), on CAD's original and revised test sets.

    RESEARCH_DATA_DIR=../shared/data python scripts/cad_table.py --seeds 0 1 2 --out runs/cad

For each (method, seed): `research train experiments/cad_minilm.py --set ...` into `<out>/<method>_s<seed>`.
IRM and V-REx switch their penalty on after the first epoch (213 steps) and reset Adam there (DomainBed's
protocol); the environments are the pair positions (`orig`, `new`). Finished runs are skipped and a run cut
short is resumed, so the table can be built over several sessions. Writes `<out>/summary.json` and
`<out>/summary.md`: accuracy on the original and revised test sets and on the combined dev set, mean +- std
over seeds, from the final evaluation of each run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from research.sweep import last_record_with, mean_std, require_data_dir, train_run, write_table

ROOT = Path(__file__).resolve().parents[1]
EPOCH = 213  # steps in one epoch of the combined data: 1,707 pairs, 8 per batch
METHODS = {
    "erm_orig": ['data.train="cad_imdb/orig/train.tsv"', "data.pair_column=null", "data.pair_environments=null"],
    "erm_combined": [],
    "irm": ['objective.name="irm"', f"objective.params.anneal_steps={EPOCH}", f"optim.reset_at_step={EPOCH}"],
    "vrex": ['objective.name="vrex"', f"objective.params.anneal_steps={EPOCH}", f"optim.reset_at_step={EPOCH}"],
    "group_dro": ['objective.name="group_dro"'],
    "gradient_supervision": ['objective.name="gradient_supervision"'],
    "pair_margin": ['objective.name="pair_margin"'],
}
COLUMNS = {"original test": "test/orig/accuracy", "revised test": "test/new/accuracy",
           "combined dev": "dev/accuracy"}


def run(method: str, seed: int, out: Path) -> dict:
    workdir = out / f"{method}_s{seed}"
    done = workdir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    train_run(ROOT / "experiments" / "cad_minilm.py", [*METHODS[method], f"train.seed={seed}"], workdir,
              out / f"{method}_s{seed}.log")
    last = last_record_with(workdir, "dev/accuracy")
    result = {"method": method, "seed": seed, "step": last["step"], **{k: last[k] for k in COLUMNS.values()}}
    done.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", default="runs/cad")
    args = parser.parse_args()
    require_data_dir()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {m: [run(m, s, out) for s in args.seeds] for m in args.methods}
    rows = [[m, *[mean_std([r[k] for r in rs]) for k in COLUMNS.values()]] for m, rs in results.items()]
    print(write_table(out, ["method", *COLUMNS], rows, {"seeds": args.seeds, "results": results}))


if __name__ == "__main__":
    main()
