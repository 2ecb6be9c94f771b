"""SST-2 with all-MiniLM-L6-v2: our JAX runner next to the PyTorch baseline, several seeds, one table.

    RESEARCH_DATA_DIR=../shared/data python scripts/sst2_side_by_side.py --seeds 0 1 2 --out runs/sst2_side_by_side

For each seed it runs `research train experiments/sst2_minilm.py --set train.seed=S` and
`scripts/baseline_sst2_torch.py --seed S`, one after the other (never two at once: they would share the
cores), timing each whole command from launch to exit. Finished runs are kept and skipped when the script
is started again, so the comparison can be built up over several sessions; a JAX run cut short is resumed
with --resume and its time is then left out of the speed comparison (its accuracy still counts).

`--frameworks jax_padded` adds our runner with padded batches (`data.pack_length=null`) instead of the
experiment's packed ones. `--shared` says the machine is busy with other work: accuracies count, times not.

Writes `<out>/summary.json` and `<out>/summary.md`: dev accuracy per seed and mean +- std, wall time per run,
and the torch/JAX ratio of the mean wall times over the timed runs (above 1: JAX faster).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


JAX_VARIANTS = {"jax": [], "jax_padded": ["--set", "data.pack_length=null"]}  # packed (the experiment) / padded


def run_jax(seed: int, out: Path, variant: str = "jax", shared: bool = False) -> dict:
    workdir = out / f"{variant}_s{seed}"
    result_path = out / f"{variant}_s{seed}.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    resumed = (workdir / "checkpoints").is_dir()
    cmd = ["research", "train", str(ROOT / "experiments" / "sst2_minilm.py"), "--set", f"train.seed={seed}",
           *JAX_VARIANTS[variant], "--workdir", str(workdir), *(["--resume"] if resumed else [])]
    t = time.perf_counter()
    with (out / f"{variant}_s{seed}.log").open("a") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    dev = [r for r in records if "dev/accuracy" in r]
    result = {"framework": variant, "seed": seed, "dev_accuracy": dev[-1]["dev/accuracy"], "steps": dev[-1]["step"],
              "wall_s": None if resumed or shared else round(wall, 1), "resumed": resumed}
    if resumed or shared:  # a resumed run's time is partial; a run beside other work is slowed down
        result["note"] = f"not timed: {'resumed' if resumed else 'ran beside other work'} ({wall:.0f} s)"
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_torch(seed: int, out: Path, shared: bool = False) -> dict:
    result_path = out / f"torch_s{seed}.json"
    if not result_path.exists():
        cmd = [sys.executable, str(ROOT / "scripts" / "baseline_sst2_torch.py"), "--seed", str(seed), "--out",
               str(result_path)]
        with (out / f"torch_s{seed}.log").open("w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
        if shared:
            result = json.loads(result_path.read_text())
            result.update(wall_s=None, note=f"not timed: ran beside other work ({result['wall_s']} s)")
            result_path.write_text(json.dumps(result, indent=2) + "\n")
    return json.loads(result_path.read_text())


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} +- {100 * std:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--frameworks", nargs="+", default=["jax", "torch"], choices=[*JAX_VARIANTS, "torch"],
                        help="jax: the experiment (packed batches); jax_padded: padded to length buckets")
    parser.add_argument("--out", default="runs/sst2_side_by_side")
    parser.add_argument("--shared", action="store_true",
                        help="the machine is busy with other work: keep the accuracies, leave the times out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if "RESEARCH_DATA_DIR" not in os.environ:
        sys.exit("set RESEARCH_DATA_DIR (e.g. RESEARCH_DATA_DIR=../shared/data)")

    results = {fw: [] for fw in args.frameworks}
    for seed in args.seeds:
        for framework in args.frameworks:
            if framework == "torch":
                result = run_torch(seed, out, args.shared)
            else:
                result = run_jax(seed, out, framework, args.shared)
            results[framework].append(result)
            print(json.dumps(result), flush=True)

    acc = {fw: [r["dev_accuracy"] for r in rs] for fw, rs in results.items()}
    wall = {fw: [r["wall_s"] for r in rs if r.get("wall_s")] for fw, rs in results.items()}
    ratios = {f"torch_over_{fw}": statistics.mean(wall["torch"]) / statistics.mean(wall[fw])
              for fw in results if fw != "torch" and wall[fw] and wall.get("torch")}
    summary = {"seeds": args.seeds, "results": results,
               "dev_accuracy_mean_std": {fw: mean_std(a) for fw, a in acc.items()},
               "wall_ratios": ratios, "machine": f"{platform.machine()} {os.cpu_count()} cores",
               "date": datetime.date.today().isoformat()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    seeds = " | ".join(f"seed {s}" for s in args.seeds)
    lines = [f"| framework | {seeds} | mean +- std | wall time per run (s) |",
             "|---|" + "---:|" * (len(args.seeds) + 2)]
    for fw, rs in results.items():
        if rs:
            cells = " | ".join(f"{100 * r['dev_accuracy']:.2f}" for r in rs)
            times = ", ".join(str(r["wall_s"]) if r.get("wall_s") else "not timed" for r in rs)
            lines.append(f"| {fw} | {cells} | {mean_std(acc[fw])} | {times} |")
    for name, ratio in ratios.items():
        lines.append(f"\n{name.replace('_over_', ' / ')} mean wall time (timed runs only): {ratio:.2f}")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
