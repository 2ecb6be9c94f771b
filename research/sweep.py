"""Resumable grids of training runs, for the result tables in scripts/ (robustness, spurious shift, CAD).

A table is (method x seed) runs of one experiment file. Each run is a `research train` subprocess (a fresh
process per run, as a user would launch it, so one run's compilation cache or memory cannot leak into the
next), logged to `<out>/<run>.log`. A run that has a result file is skipped and one cut short is resumed from
its checkpoints, so a table can be built over several sessions: kill the script at any time and start it
again.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


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
