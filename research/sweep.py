"""`research sweep`: every (variant, seed) run of an experiment, resumable, and the table of their results.

    research sweep experiments/cad_minilm.py --seeds 0 1 2 [--variants erm_orig irm] [--out DIR] [--workdirs DIR]

An experiment file that is a study defines, next to its `get_config()`:

    VARIANTS = {"irm": {"objective.name": "irm", "optim.reset_at_step": 100}, ...}   # name -> config changes
    RESULTS = "cad"                       # the record's folder under experiments/results/ (default: the file's stem)
    def summarize(workdir) -> dict        # what the record keeps of a finished run (default: its last evaluation)
    def table(results) -> (header, rows)  # the summary table (default: mean +- std of every kept metric)

A variant is a typed change: dotted config keys and Python values (not strings to parse), applied to
`get_config()` in this process before anything trains, so a misspelt key or a wrong type fails at once, naming
the variant (and tests/test_config_and_data.py applies every variant of every experiment).

Each run is a `research train` subprocess (a fresh process per run, as a user would launch it, so one run's
memory or Python state cannot leak into the next) that works in `<workdirs>/<variant>_s<seed>` (checkpoints,
TensorBoard, its log `<workdirs>/<run>.log`: large, not kept in git). What a table and its figure are made of is
copied to the record, `<out>/<run>/` (`result.json`, the numbers the table keeps; `metrics.jsonl`,
`config.json`, `data_report.json`: kilobytes), which is committed (experiments/results/): a table then spans
sessions and machines, and anyone can rebuild it, or draw its figure, from the repository without rerunning
it. A run that has a record is skipped; one cut short (killed, even with SIGKILL) is resumed from its
checkpoints: stop the sweep at any time and start it again. Runs go seed by seed (every variant of the first
seed, then of the next), so a sweep cut short still compares every variant at the same seeds. The summary is
`<out>/summary.md` and `<out>/summary.json` (mean +- std per metric and variant). Each result.json also keeps the
run's `wall_s` (the `research train` command end to end) and whether it `resumed` an earlier, cut invocation.

The runs share the persistent XLA compilation cache of every `research` command
(research/compilation_cache.py): the seeds of a variant, and the evaluations of every variant, compile the
same programs for the same bucket shapes, and a cache hit loads the executable XLA built the first time
(keyed by the program, its shapes and the compiler version and flags: the numbers cannot change).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from research.config import ConfigError, apply_overrides, load_experiment_module, variant_overrides
from research.metrics import read_records, renamed, split_names


class SweepError(RuntimeError):
    """A run of the sweep failed; the message names its log."""


# A run directory -> the numbers a table keeps of it (read from metrics.jsonl; may run `research eval` first).
Summarize = Callable[[Path], dict]


def require_data_dir() -> None:
    if "RESEARCH_DATA_DIR" not in os.environ:
        sys.exit("set RESEARCH_DATA_DIR (e.g. RESEARCH_DATA_DIR=../shared/data)")


def train_run(experiment: Path, sets: list[str], workdir: Path, log: Path) -> dict:
    """`research train experiment --set s ... --workdir workdir`, resumed if it has checkpoints; returns its
    `wall_s` (the whole command, start-up and compilation included) and whether it `resumed` a run cut short
    (whose earlier time is then not in `wall_s`)."""
    resume = ["--resume"] if (workdir / "checkpoints").is_dir() else []
    overrides = [x for s in sets for x in ("--set", s)]
    start = time.perf_counter()
    with log.open("a") as out:
        done = subprocess.run(["research", "train", str(experiment), *overrides, "--workdir", str(workdir), *resume],
                              stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SweepError(f"research train into {workdir} failed (exit status {done.returncode}); its output is in "
                           f"{log}. Fix the cause and run the sweep again: finished runs are kept, this one resumes")
    return {"wall_s": round(time.perf_counter() - start, 1), "resumed": bool(resume)}


def last_record_with(workdir: Path, key: str) -> dict:
    """The last metrics.jsonl record holding `key` (e.g. the final evaluation)."""
    found = [r for r in read_records(workdir) if key in r]  # metric names as today's
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
    if done.exists():  # recorded; metric names as today's (research/metrics.py)
        return renamed(json.loads(done.read_text()), split_names(record / "config.json"))
    workdir = workdirs / name
    timing = train_run(experiment, [*sets, f"train.seed={seed}"], workdir, workdirs / f"{name}.log")
    result = {"method": method, "seed": seed, **summarize(workdir), **timing}
    record.mkdir(parents=True, exist_ok=True)
    for file in RECORD_FILES:
        if (workdir / file).exists():
            shutil.copy2(workdir / file, record / file)
    done.write_text(json.dumps(result, indent=2) + "\n")
    return result


@dataclasses.dataclass
class Study:
    """An experiment file's sweep: its variants, what a run's record keeps, and the table."""

    experiment: Path
    variants: dict[str, dict[str, Any]]
    results: str  # the record's folder name under experiments/results/
    summarize: Summarize
    table: Callable[[dict[str, list[dict]]], tuple[list[str], list[list[str]]]]


def load_study(experiment: Path) -> Study:
    """The study `experiment` defines, every variant checked against its `get_config()` here and now."""
    module: ModuleType = load_experiment_module(experiment)
    variants = getattr(module, "VARIANTS", None)
    if not variants:
        raise ConfigError(f"{experiment} defines no VARIANTS (name -> config changes): nothing to sweep")
    base = module.get_config()
    for name, changes in variants.items():
        try:
            apply_overrides(base, variant_overrides(changes))
        except ConfigError as e:
            raise ConfigError(f"{experiment}: variant {name!r}: {e}") from None
    return Study(Path(experiment), dict(variants), getattr(module, "RESULTS", Path(experiment).stem),
                 getattr(module, "summarize", last_evaluation), getattr(module, "table", mean_std_table))


def last_evaluation(workdir: Path) -> dict:
    """The default of what a record keeps: the step and every evaluated split's metrics of the last evaluation."""
    last = [r for r in read_records(workdir) if any(k.startswith("dev/") for k in r)]
    if not last:
        raise RuntimeError(f"{workdir}/metrics.jsonl has no evaluation: did the run finish?")
    return {k: v for k, v in last[-1].items() if not k.startswith(("train/", "eval_"))}


def mean_std_table(results: dict[str, list[dict]]) -> tuple[list[str], list[list[str]]]:
    """The default table: one row per variant, one column per metric the records keep, mean +- std in %."""
    bookkeeping = {"method", "seed", "step", "wall_s", "resumed"}
    keys = sorted({k for rs in results.values() for r in rs for k in r} - bookkeeping)
    return ["variant", *keys], [[v, *[mean_std([r[k] for r in rs if k in r]) for k in keys]]
                                for v, rs in results.items()]


def run_study(study: Study, variants: list[str], seeds: list[int], out: Path, workdirs: Path) -> tuple[dict, str]:
    """Every (variant, seed) run, seed by seed, then the summary files; returns the payload and the table."""
    unknown = [v for v in variants if v not in study.variants]
    if unknown:
        raise ConfigError(f"{study.experiment} has no variant {unknown[0]!r}; choose from {list(study.variants)}")
    require_data_dir()
    out.mkdir(parents=True, exist_ok=True)
    workdirs.mkdir(parents=True, exist_ok=True)
    cells = {(v, s): run_cell(study.experiment, v, variant_overrides(study.variants[v]), s, out, workdirs,
                              study.summarize)
             for s in seeds for v in variants}
    payload = {"seeds": seeds, "results": {v: [cells[v, s] for s in seeds] for v in variants}}
    header, rows = study.table(payload["results"])
    return payload, write_table(out, header, rows, payload)


def main(argv: list[str] | None = None) -> None:
    """`research sweep EXPERIMENT [--variants ...] [--seeds ...] [--out DIR] [--workdirs DIR]`."""
    parser = argparse.ArgumentParser(prog="research sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", type=Path, help="an experiment file that defines VARIANTS")
    parser.add_argument("--variants", nargs="+", help="which variants (default: all, in the file's order)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, help="the record (committed): per run result.json and metrics.jsonl, "
                        "and the summary (default: experiments/results/<RESULTS>)")
    parser.add_argument("--workdirs", type=Path, help="the run directories (checkpoints, TensorBoard, logs) and the "
                        "compilation cache (default: runs/<RESULTS>)")
    args = parser.parse_args(argv)
    study = load_study(args.experiment)
    out = args.out or Path("experiments/results") / study.results
    workdirs = args.workdirs or Path("runs") / study.results
    _, table = run_study(study, args.variants or list(study.variants), args.seeds, out, workdirs)
    print(table)
