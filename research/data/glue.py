"""The GLUE tasks as the GLUE distribution ships them (`glue/<Task>/{train,dev}.tsv` under the data root): where
each file keeps its text and its label, and how GLUE scores the task.

The files are read as they are, by the sentence-classification reader (research/data/classification.py,
through research/data/split.py), with no converted copies:

- CoLA's train and dev files have no header row (`source, label, marker, sentence`): `data.columns` names them.
  Its dev file has no final newline, and a few training sentences hold a backspace character; both are read as
  they are.
- MRPC's header starts with a UTF-8 byte-order mark (read as `utf-8-sig`, so the first column is "Quality").
- RTE's and STS-B's sentences may begin with a literal `"`: the files are not quoted (csv.QUOTE_NONE).
- STS-B's label is a float similarity score in [0, 5]: `model.problem_type="regression"`.

The unlabeled test files are not read: GLUE scores them on its server. `glue_data(task)` is the task's
`DataConfig`; `TASKS[task].metrics` its GLUE metrics, as research/evaluate.py names them; `run_summary` what
a study's record keeps of a run (the experiments/glue_*.py files).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from research.config import DataConfig


@dataclasses.dataclass(frozen=True)
class GlueTask:
    folder: str  # under glue/ in the data root
    text_column: str
    label_column: str
    metrics: tuple[str, ...]  # GLUE's, in research/evaluate.py's names; the first is the one the table leads with
    text_pair_column: str | None = None
    labels: tuple[str, ...] | None = None  # None: a regression (float scores)
    columns: tuple[str, ...] | None = None  # for files without a header row

    @property
    def regression(self) -> bool:
        return self.labels is None


TASKS = {
    # Matthews correlation: CoLA is 70% acceptable, so accuracy rewards the majority class.
    "cola": GlueTask("CoLA", "sentence", "label", ("mcc",), labels=("0", "1"),
                     columns=("source", "label", "marker", "sentence")),
    # F1 of the paraphrase class ("1") and accuracy, as GLUE reports them.
    "mrpc": GlueTask("MRPC", "#1 String", "Quality", ("f1", "accuracy"), text_pair_column="#2 String",
                     labels=("0", "1")),
    "rte": GlueTask("RTE", "sentence1", "label", ("accuracy",), text_pair_column="sentence2",
                    labels=("entailment", "not_entailment")),
    "stsb": GlueTask("STS-B", "sentence1", "score", ("pearson", "spearman"), text_pair_column="sentence2"),
}


def glue_data(task: str, **changes: Any) -> DataConfig:
    """The `DataConfig` that reads GLUE task `task`'s train and dev files, plus `changes` (max_length, ...)."""
    if task not in TASKS:
        raise KeyError(f"GLUE task {task!r} is not known; choose from {sorted(TASKS)}")
    t = TASKS[task]
    return DataConfig(train=f"glue/{t.folder}/train.tsv", dev=f"glue/{t.folder}/dev.tsv", text_column=t.text_column,
                      text_pair_column=t.text_pair_column, label_column=t.label_column, labels=t.labels,
                      columns=t.columns, **changes)


def run_summary(workdir: Path, task: str) -> dict[str, float]:
    """What a GLUE study keeps of a finished run (research/sweep.py's `summarize`): each GLUE metric of the task
    at the last evaluation and at the best (`best_<metric>`: the highest over evaluations, each metric on its
    own), the dev accuracy (classification), and the training throughput (median examples/s, the first
    logging window left out: it includes compiling)."""
    import numpy as np

    from research.metrics import read_records

    records = read_records(workdir)
    evaluations = [r for r in records if any(k.startswith("dev/") for k in r)]
    if not evaluations:
        raise RuntimeError(f"{workdir}/metrics.jsonl has no dev evaluation: did the run finish?")
    t = TASKS[task]
    names = (*t.metrics, *(() if t.regression or "accuracy" in t.metrics else ("accuracy",)))
    out = {name: evaluations[-1][f"dev/{name}"] for name in names}
    out.update({f"best_{name}": max(r[f"dev/{name}"] for r in evaluations) for name in t.metrics})
    throughput = [r["train/examples_per_s"] for r in records if "train/examples_per_s" in r][1:]
    out["examples_per_s"] = float(np.median(throughput)) if throughput else float("nan")
    out["steps"] = evaluations[-1]["step"]
    return out
