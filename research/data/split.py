"""What every task reader shares: the split types, the data root, and reading rows from files.

A reader (classification.py, tagging.py, lm.py, dialogue.py) turns a configured split into a `Split`: token ids
per example plus what the task trains on, and a `SplitReport` of what became of every row. This module imports
no reader; each reader imports only it (and its own helpers), so `research/data` has no import cycle. A task
that carries more than token ids and targets subclasses `Split` in its own reader (`tagging.TaggedSplit`,
`dialogue.DialogueSplit`).

Batching lives in `research/data/batches.py`; the batch type in `research/batch.py`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from research.config import DataConfig


class DataError(ValueError):
    """Data that cannot be used as configured; the message names the file, the row and the fix."""


def data_root() -> Path:
    root = os.environ.get("RESEARCH_DATA_DIR")
    if not root:
        raise DataError("RESEARCH_DATA_DIR is not set: point it at the data folder that holds sst2/, conll2003/, "
                        "... (in this repository's CI: RESEARCH_DATA_DIR=../shared/data)")
    return Path(root).expanduser()



@dataclasses.dataclass
class SplitReport:
    """What became of every row of one split."""

    name: str
    source: str
    rows: int = 0  # data rows read (header excluded)
    used: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> count
    skipped_rows: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # reason -> first row numbers
    subset_of: int | None = None  # set when max_*_examples took a subset
    truncated_examples: int = 0
    truncated_tokens: int = 0
    label_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    score_stats: dict[str, float] = dataclasses.field(default_factory=dict)  # regression: min, mean, max label
    length_percentiles: dict[str, int] = dataclasses.field(default_factory=dict)  # tokens, before truncation
    environment_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    # Training with environments: draws per example per epoch (above 1: oversampled to keep the proportions).
    draws_per_epoch: dict[str, float] = dataclasses.field(default_factory=dict)
    pairs: int | None = None
    # Counterfactual pairs whose two members are the same after truncation (the edit lay past max_length): the
    # model sees one input with both labels. Counted, not dropped: whether to keep them is the study's call.
    pairs_identical_after_truncation: int = 0
    split_into_windows: int = 0  # token classification: sentences longer than max_length, cut at word boundaries
    # Dialogue: earlier turns left out of a context to fit the token budget (whole turns, the most recent kept).
    # Every response is still an example; this counts context, not examples, so it is not under `skipped`.
    context_turns_left_out: int = 0

    def set_lengths(self, lengths) -> None:
        """Record the p50/p95/max example length in tokens."""
        self.length_percentiles = {q: int(np.percentile(lengths, int(q[1:]))) for q in ("p50", "p95", "p100")} \
            if len(lengths) else {}

    def skip(self, reason: str, row: int) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        first = self.skipped_rows.setdefault(reason, [])
        if len(first) < 5:
            first.append(row)

    def summary(self) -> str:
        parts = [f"{self.name}: {self.used:,} examples from {self.rows:,} rows of {self.source}"]
        if self.subset_of is not None:
            parts.append(f"a subset of the {self.subset_of:,} usable")
        for reason, n in self.skipped.items():
            parts.append(f"skipped {n:,} ({reason}; rows {self.skipped_rows[reason]}...)")
        if self.split_into_windows:
            parts.append(f"split {self.split_into_windows:,} long sentences into windows")
        if self.context_turns_left_out:
            parts.append(f"left {self.context_turns_left_out:,} earlier turns out of contexts (token budget: whole "
                         "turns, the most recent kept)")
        parts.append(f"truncated {self.truncated_examples:,} examples ({self.truncated_tokens:,} tokens)")
        if self.score_stats:
            parts.append("scores min/mean/max " + "/".join(f"{v:.3g}" for v in self.score_stats.values()))
        else:
            parts.append("labels " + ", ".join(f"{k}: {v:,}" for k, v in self.label_counts.items()))
        parts.append("length p50/p95/max " + "/".join(str(v) for v in self.length_percentiles.values()))
        if self.environment_counts:
            parts.append("environments " + ", ".join(f"{k}: {v:,}" for k, v in self.environment_counts.items()))
        if self.draws_per_epoch:
            parts.append("drawn per epoch " + ", ".join(f"{k}: {v:g}x" for k, v in self.draws_per_epoch.items()))
        if self.pairs is not None:
            parts.append(f"{self.pairs:,} counterfactual pairs")
            if self.pairs_identical_after_truncation:
                parts.append(f"{self.pairs_identical_after_truncation:,} pairs identical after truncation "
                             "(the edit lies past data.max_length; raise it to keep them apart)")
        return "; ".join(parts)


@dataclasses.dataclass
class Split:
    """A tokenized split: ragged token ids per example, and label ids."""

    name: str
    input_ids: list[np.ndarray]  # each (T_i,) int32, special tokens included, T_i <= max_length
    # None for models without token types (GPT-2): HF's GPT-2 tokenizer returns none, and GPT-2 given zeros
    # would add the embedding of token 0 to every position.
    token_type_ids: list[np.ndarray] | None
    labels: np.ndarray  # (N,) int32 label ids, or (N,) float32 scores for regression
    texts: list[str]
    report: SplitReport
    environments: np.ndarray | None = None  # (N,) int32 environment ids, when the data has environments
    environment_names: tuple[str, ...] = ()
    pair_ids: np.ndarray | None = None  # (N,) int32: the counterfactual pair of each example (two per pair)
    # Token-level tasks: a target per token, -1 where there is none (`labels` is then -1 per example).
    # Token classification: the tag id on each word's first piece (research/data/tagging.py); causal LM: the
    # next token (research/data/lm.py).
    token_targets: list[np.ndarray] | None = None
    # Distillation (research/compress/teacher.py): the teacher's logits, (N, C) float32 for a sequence task, or
    # one (T_i, C) array per example for a token task.
    teacher_logits: np.ndarray | list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.labels)


def read_rows(cfg: DataConfig, split: str) -> tuple[str, Iterator[tuple[int, dict[str, Any] | str]]]:
    """(source description, rows as (row number, {column: value}) or (row number, problem))."""
    if split not in ("train", "dev") and split not in cfg.test:
        raise DataError(f"no split {split!r}: use 'train', 'dev' or a name of data.test {sorted(cfg.test)}")
    if cfg.source.startswith("hf:"):
        return _read_hub(cfg, {"train": cfg.train, "dev": cfg.dev}.get(split) or cfg.test[split])
    if cfg.source != "files":
        raise DataError(f"data.source={cfg.source!r}: use 'files' or 'hf:<dataset>[/<config>]'")
    path = split_path(cfg, split)
    setting = f"data.{split}" if split in ("train", "dev") else f"data.test.{split}"
    suffix = path.suffix.lower()
    if suffix not in (".tsv", ".csv", ".jsonl"):
        raise DataError(f"{setting}: {path} is not .tsv, .csv or .jsonl")
    rows = _jsonl_rows(path) if suffix == ".jsonl" else _delimited_rows(path, suffix, cfg.columns, cfg.skip_malformed)
    return str(path), rows


def split_path(cfg: DataConfig, split: str) -> Path:
    """The file of split "train", "dev" or a name of `cfg.test`, under the data root unless absolute."""
    if split not in ("train", "dev") and split not in cfg.test:
        raise DataError(f"no split {split!r}: use 'train', 'dev' or a name of data.test {sorted(cfg.test)}")
    where = {"train": cfg.train, "dev": cfg.dev}.get(split) or cfg.test[split]
    setting = f"data.{split}" if split in ("train", "dev") else f"data.test.{split}"
    path = Path(where).expanduser()
    path = path if path.is_absolute() else data_root() / path
    if not path.is_file():
        raise DataError(f"{setting}: {path} does not exist (check {setting} and RESEARCH_DATA_DIR)")
    return path


def _delimited_rows(path: Path, suffix: str, columns: tuple[str, ...] | None = None, skip_malformed: bool = False
                    ) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """Rows of a .tsv or .csv file as (line number, {column: value}), the columns named by its header row or,
    for a file without one, by `columns`. A row with the wrong number of fields is an error naming its line,
    or with `skip_malformed` a problem string the reader counts."""
    # utf-8-sig: a byte-order mark before the header (GLUE's MRPC files have one) is not part of the first
    # column's name; without a mark it reads as plain UTF-8.
    with path.open(newline="", encoding="utf-8-sig") as f:
        # GLUE TSVs are not quoted: a literal " belongs to the sentence (QUOTE_NONE keeps it).
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if suffix == ".tsv" else csv.reader(f)
        header = list(columns) if columns is not None else next(reader, None)
        if header is None:
            raise DataError(f"{path} is empty (a header row naming the columns is expected, or set data.columns "
                            "for a file without one)")
        named = "data.columns" if columns is not None else "the header"
        for row in reader:
            line = reader.line_num  # the file line the row ends on (1-based; a quoted CSV field may span lines)
            if len(row) == len(header):
                yield line, dict(zip(header, row, strict=True))
                continue
            problem = f"malformed row ({len(row)} fields, {named} has {len(header)})"
            if not skip_malformed:
                raise DataError(f"{path} line {line}: {len(row)} fields where {named} has {len(header)} "
                                f"({header}); fix the file, set data.columns if it has no header row, or set "
                                "data.skip_malformed=true to skip such rows (they are counted)")
            yield line, problem


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    with path.open(encoding="utf-8") as f:
        for row_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                yield row_number, "invalid JSON"
                continue
            yield row_number, obj if isinstance(obj, dict) else "not a JSON object"


def _read_hub(cfg: DataConfig, split_name: str) -> tuple[str, Iterator[tuple[int, dict[str, Any] | str]]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"data.source={cfg.source!r} needs the `datasets` package: pip install datasets "
                        "(or download the files and use data.source='files')") from None
    name, _, config = cfg.source.removeprefix("hf:").partition("/")
    ds = datasets.load_dataset(name, config or None, split=split_name)
    return f"{cfg.source}:{split_name}", ((i + 1, row) for i, row in enumerate(ds))
