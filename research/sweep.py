"""Resumable grids of training runs, for the result tables in scripts/ (robustness, spurious shift, CAD).

A table is (method x seed) runs of one experiment file. Each run is a `research train` subprocess (a fresh
process per run, as a user would launch it, so one run's memory or Python state cannot leak into the next)
that works in `<workdirs>/<run>` (checkpoints, TensorBoard, its log `<workdirs>/<run>.log`: large, not kept
in git). What a table and its figure are made of is copied to the record, `<out>/<run>/` (`result.json`, the
numbers the table keeps; `metrics.jsonl`, `config.json`, `data_report.json`: kilobytes), which is committed
(experiments/results/): a table then spans sessions and machines, and anyone can rebuild it, or draw its
figure, from the repository without rerunning it. A run that has a record is skipped; one cut short is
resumed from its checkpoints: kill the script at any time and start it again.

The runs share one persistent XLA compilation cache, `<workdirs>/.xla_cache` (unless
JAX_COMPILATION_CACHE_DIR is set): the seeds of a method, and the evaluations of every method, compile the
same programs for the same bucket shapes, and a cache hit loads the executable XLA built the first time
(keyed by the program, its shapes and the compiler version and flags: the numbers cannot change).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

# A run directory -> the numbers a table keeps of it (read from metrics.jsonl; may run `research eval` first).
Summarize = Callable[[Path], dict]


def require_data_dir() -> None:
    if "RESEARCH_DATA_DIR" not in os.environ:
        sys.exit("set RESEARCH_DATA_DIR (e.g. RESEARCH_DATA_DIR=../shared/data)")


def train_run(experiment: Path, sets: list[str], workdir: Path, log: Path) -> None:
    """`research train experiment --set s ... --workdir workdir`, resumed if it has checkpoints."""
    resume = ["--resume"] if (workdir / "checkpoints").is_dir() else []
    overrides = [x for s in sets for x in ("--set", s)]
    with log.open("a") as out:
        subprocess.run(["research", "train", str(experiment), *overrides, "--workdir", str(workdir), *resume],
                       check=True, stdout=out, stderr=subprocess.STDOUT)


def share_compilation_cache(workdirs: Path) -> None:
    """Point this process's children (the runs and their evaluations) at one XLA cache under `workdirs`."""
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str((workdirs / ".xla_cache").resolve()))


def records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def last_record_with(workdir: Path, key: str) -> dict:
    """The last metrics.jsonl record holding `key` (e.g. the final evaluation)."""
    found = [r for r in records(workdir) if key in r]
    if not found:
        raise RuntimeError(f"{workdir}/metrics.jsonl has no record with {key!r}: did the run finish?")
    return found[-1]


def mean_std(values: list[float]) -> str:
    """'mean +- std' in percent (sample std over seeds; 0 for one seed)."""
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} +- {100 * std:.1f}"


def write_table(out: Path, header: list[str], rows: list[list[str]], payload: dict) -> str:
    """`<out>/summary.md` (a Markdown table, first column left-aligned) and `<out>/summary.json`."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    (out / "summary.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


# What the record keeps of a run directory besides result.json (the rest is checkpoints and TensorBoard files).
RECORD_FILES = ("metrics.jsonl", "config.json", "data_report.json")


def run_cell(experiment: Path, method: str, sets: list[str], seed: int, out: Path, workdirs: Path,
             summarize: Summarize) -> dict:
    """One run of a grid: trained in `<workdirs>/<method>_s<seed>` with `sets` and `train.seed=seed`,
    summarized, and recorded in `<out>/<method>_s<seed>/` (result.json last: a run whose record has one is
    finished and is not touched again)."""
    name = f"{method}_s{seed}"
    record = out / name
    done = record / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    workdir = workdirs / name
    train_run(experiment, [*sets, f"train.seed={seed}"], workdir, workdirs / f"{name}.log")
    result = {"method": method, "seed": seed, **summarize(workdir)}
    record.mkdir(parents=True, exist_ok=True)
    for file in RECORD_FILES:
        if (workdir / file).exists():
            shutil.copy2(workdir / file, record / file)
    done.write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_grid(doc: str, experiment: Path, methods: dict[str, list[str]], table: str,
             summarize: Summarize, argv: list[str] | None = None) -> tuple[Path, dict]:
    """The command line every table script shares (`--seeds`, `--methods`, `--out`, `--workdirs`; by default
    the record goes to experiments/results/<table> and the run directories to runs/<table>), then every
    (method, seed) run of `experiment`, methods being `--set` overrides, seed by seed. Returns the record
    folder and `{"seeds": [...], "results": {method: [summary per seed]}}` (what `write_table` saves as
    summary.json)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(methods), choices=list(methods))
    parser.add_argument("--out", type=Path, default=Path("experiments/results") / table,
                        help="the record (committed): per run result.json and metrics.jsonl, and the summary")
    parser.add_argument("--workdirs", type=Path, default=Path("runs") / table,
                        help="the run directories (checkpoints, TensorBoard, logs) and the compilation cache")
    args = parser.parse_args(argv)
    require_data_dir()
    args.out.mkdir(parents=True, exist_ok=True)
    args.workdirs.mkdir(parents=True, exist_ok=True)
    share_compilation_cache(args.workdirs)
    # Seed by seed (every method of the first seed, then of the next): a grid cut short still compares every
    # method at the same seeds.
    cells = {(m, s): run_cell(experiment, m, methods[m], s, args.out, args.workdirs, summarize)
             for s in args.seeds for m in args.methods}
    results = {m: [cells[m, s] for s in args.seeds] for m in args.methods}
    return args.out, {"seeds": args.seeds, "results": results}
