"""SST-2 with all-MiniLM-L6-v2: our JAX runner next to the PyTorch baseline, several seeds, one table.

    RESEARCH_DATA_DIR=../shared/data python scripts/sst2_side_by_side.py --seeds 0 1 2 --out runs/sst2_side_by_side

For each seed it runs `research train experiments/sst2_minilm.py --set train.seed=S` and
`scripts/baseline_sst2_torch.py --seed S`, one after the other (never two at once: they would share the
cores), timing each whole command from launch to exit. Finished runs are kept and skipped when the script
is started again, so the comparison can be built up over several sessions; a JAX run cut short is resumed
with --resume and its time is then left out of the speed comparison (its accuracy still counts).

Writes `<out>/summary.json` and `<out>/summary.md`: dev accuracy per seed and mean +- std, wall time per run,
and the torch/JAX ratio of the mean wall times (above 1: JAX faster).
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


def run_jax(seed: int, out: Path) -> dict:
    workdir = out / f"jax_s{seed}"
    result_path = out / f"jax_s{seed}.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    resumed = (workdir / "checkpoints").is_dir()
    cmd = ["research", "train", str(ROOT / "experiments" / "sst2_minilm.py"), "--set", f"train.seed={seed}",
           "--workdir", str(workdir), *(["--resume"] if resumed else [])]
    t = time.perf_counter()
    with (out / f"jax_s{seed}.log").open("a") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    dev = [r for r in records if "dev/accuracy" in r]
    result = {"framework": "jax", "seed": seed, "dev_accuracy": dev[-1]["dev/accuracy"], "steps": dev[-1]["step"],
              "wall_s": None if resumed else round(wall, 1), "resumed": resumed}  # a resumed run's time is partial
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_torch(seed: int, out: Path) -> dict:
    result_path = out / f"torch_s{seed}.json"
    if not result_path.exists():
        cmd = [sys.executable, str(ROOT / "scripts" / "baseline_sst2_torch.py"), "--seed", str(seed), "--out",
               str(result_path)]
        with (out / f"torch_s{seed}.log").open("w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return json.loads(result_path.read_text())


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} +- {100 * std:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--frameworks", nargs="+", default=["jax", "torch"], choices=["jax", "torch"])
    parser.add_argument("--out", default="runs/sst2_side_by_side")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if "RESEARCH_DATA_DIR" not in os.environ:
        sys.exit("set RESEARCH_DATA_DIR (e.g. RESEARCH_DATA_DIR=../shared/data)")

    results = {"jax": [], "torch": []}
    for seed in args.seeds:
        for framework in args.frameworks:
            result = run_jax(seed, out) if framework == "jax" else run_torch(seed, out)
            results[framework].append(result)
            print(json.dumps(result), flush=True)

    acc = {fw: [r["dev_accuracy"] for r in rs] for fw, rs in results.items()}
    wall = {fw: [r["wall_s"] for r in rs if r.get("wall_s")] for fw, rs in results.items()}
    ratio = statistics.mean(wall["torch"]) / statistics.mean(wall["jax"]) if wall["jax"] and wall["torch"] else None
    summary = {"seeds": args.seeds, "results": results,
               "dev_accuracy_mean_std": {fw: mean_std(a) for fw, a in acc.items()},
               "wall_ratio_torch_over_jax": ratio, "machine": f"{platform.machine()} {os.cpu_count()} cores",
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
    if ratio:
        lines.append(f"\ntorch / JAX mean wall time: {ratio:.2f}")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
