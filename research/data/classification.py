"""Sequence-classification data: read a split (TSV/CSV/JSONL under the data root, or a hub dataset), check
its labels, tokenize it, and cut it into padded batches.

Nothing is lost silently. Rows that cannot be used are skipped with a reason and counted; inputs longer
than `max_length` are truncated and counted (examples and tokens); a label outside the label set is an error,
because JAX clamps out-of-range indices instead of failing. All of it lands in a `SplitReport`, which the
runner prints and writes to the run directory.

Batches have static shapes so the train step compiles a bounded number of times: `batch_size` rows (the
last batch of an epoch is filled with weight-0 repeats, so every example counts exactly once) and a length
padded up to the smallest of a few buckets. The order within an epoch is a permutation drawn from
(seed, epoch), so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from research.config import DataConfig
from research.data import spurious

if TYPE_CHECKING:
    from research.data.tagging import Tagged


class DataError(ValueError):
    """Data that cannot be used as configured; the message names the file, the row and the fix."""


def data_root() -> Path:
    root = os.environ.get("RESEARCH_DATA_DIR")
    if not root:
        raise DataError("RESEARCH_DATA_DIR is not set: point it at the data folder that holds sst2/, conll2003/, "
                        "... (in this repository's CI: RESEARCH_DATA_DIR=../shared/data)")
    return Path(root).expanduser()


# ------------------------------------------------------------------------------------------------ reading


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
    labels: np.ndarray  # (N,) int32
    texts: list[str]
    report: SplitReport
    environments: np.ndarray | None = None  # (N,) int32 environment ids, when the data has environments
    environment_names: tuple[str, ...] = ()
    pair_ids: np.ndarray | None = None  # (N,) int32: the counterfactual pair of each example (two per pair)
    # Token-level tasks: a target per token, -1 where there is none (`labels` is then -1 per example).
    # Token classification: the tag id on each word's first piece (research/data/tagging.py); causal LM: the
    # next token (research/data/lm.py).
    token_targets: list[np.ndarray] | None = None
    # Token classification: the gold sentences and where each window's words sit, for entity scores.
    tagged: Tagged | None = None
    # Dialogue (research/data/dialogue.py): `texts` are the contexts, and these the reference responses.
    responses: list[str] | None = None

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
    return str(path), (_jsonl_rows(path) if suffix == ".jsonl" else _delimited_rows(path, suffix))


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


def _delimited_rows(path: Path, suffix: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    with path.open(newline="", encoding="utf-8") as f:
        # GLUE TSVs are not quoted: a literal " belongs to the sentence (QUOTE_NONE keeps it).
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if suffix == ".tsv" else csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path} is empty (a header row naming the columns is expected)")
        for row_number, row in enumerate(reader, start=2):  # 1-based file lines; line 1 is the header
            if len(row) != len(header):
                yield row_number, f"malformed row ({len(row)} fields, header has {len(header)})"
            else:
                yield row_number, dict(zip(header, row, strict=True))


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


# ---------------------------------------------------------------------------------------------- loading


def load_split(cfg: DataConfig, split: str, tokenizer, labels: tuple[str, ...] | None, seed: int) -> Split:
    """Read, check and tokenize one split: "train", "dev" or a name of `cfg.test`. `labels` None infers them
    (training split only)."""
    source, rows = read_rows(cfg, split)
    report = SplitReport(split, source)
    # Environments and pairs shape training batches: they are read for the training split only.
    env_column = cfg.environment_column if split == "train" else None
    pair_column = cfg.pair_column if split == "train" else None
    env_files = cfg.environment_files if split == "train" else None
    columns = [c for c in (cfg.text_column, cfg.text_pair_column, cfg.label_column, env_column, pair_column) if c]
    texts, pairs, raw_labels, raw_envs, pair_keys = [], [], [], [], []
    for row_number, row in rows:
        report.rows += 1
        if isinstance(row, str):
            report.skip(row, row_number)
            continue
        absent = [c for c in columns if c not in row]
        if absent:
            raise DataError(f"{source} row {row_number} has no column {absent[0]!r} (columns: {sorted(row)}); "
                            f"set data.text_column / data.label_column / data.environment_column / "
                            "data.pair_column")
        text = str(row[cfg.text_column]).strip()
        if not text:
            if pair_column:  # skipping one member would orphan the other
                raise DataError(f"{source} row {row_number} has an empty text, and it belongs to pair "
                                f"{row[pair_column]!r}: fix the file")
            report.skip("empty text", row_number)
            continue
        label = str(row[cfg.label_column]).strip()
        if not label:
            raise DataError(f"{source} row {row_number} has an empty label")
        texts.append(text)
        pairs.append(str(row[cfg.text_pair_column]).strip() if cfg.text_pair_column else None)
        raw_labels.append((label, row_number))
        if env_column:
            raw_envs.append((str(row[env_column]).strip(), row_number))
        if pair_column:
            pair_keys.append((str(row[pair_column]).strip(), row_number))

    if labels is None:
        labels = tuple(sorted({label for label, _ in raw_labels}))
    index = {name: i for i, name in enumerate(labels)}
    for label, row_number in raw_labels:
        if label not in index:
            raise DataError(f"{source} row {row_number}: label {label!r} is not in the label set {list(labels)}; "
                            "fix the file or set data.labels to the full label set")
    label_ids = np.array([index[label] for label, _ in raw_labels], np.int32)
    pair_ids = _pair_ids(pair_keys, source) if pair_column else None
    if env_column:
        env_names = cfg.environments or tuple(sorted({e for e, _ in raw_envs}))
        env_ids = _environment_ids(raw_envs, env_names, source, "data.environment_column")
    elif env_files:
        env_names = cfg.environments or tuple(env_files)
        env_ids = _environment_ids(_environments_from_files(cfg, texts, raw_labels, source), env_names, source,
                                   "data.environment_files")
    elif pair_column and cfg.pair_environments:
        env_names = cfg.pair_environments
        first = np.zeros(len(pair_ids), bool)
        first[np.unique(pair_ids, return_index=True)[1]] = True  # the first row of each pair, in file order
        env_ids = np.where(first, 0, 1).astype(np.int32)
    else:
        env_names, env_ids = (), None

    limit = cfg.max_train_examples if split == "train" else cfg.max_dev_examples
    keep = np.arange(len(texts))
    if limit is not None and limit < len(texts):
        report.subset_of = len(texts)
        if pair_ids is not None:  # whole pairs: limit // 2 of them, drawn at random
            chosen = np.random.default_rng(seed).permutation(pair_ids.max() + 1)[: limit // 2]
            keep = np.flatnonzero(np.isin(pair_ids, chosen))
        elif split == "train":  # a random subset (a prefix of a sorted file would be one-sided)
            keep = np.sort(np.random.default_rng(seed).permutation(len(texts))[:limit])
        else:  # dev: the first N rows
            keep = keep[:limit]
    texts = [texts[i] for i in keep]
    pairs = [pairs[i] for i in keep]
    label_ids = label_ids[keep]
    if pair_ids is not None:
        pair_ids = np.unique(pair_ids[keep], return_inverse=True)[1].astype(np.int32)  # renumbered 0..P-1
    if env_ids is not None:
        env_ids = env_ids[keep]
    if cfg.spurious is not None:
        # The split's own environments: training's, or the one test environment of dev and test sets.
        texts, label_ids, env_ids, env_names = spurious.apply(cfg.spurious, texts, label_ids, split, len(labels))

    input_ids, token_types = _tokenize(tokenizer, texts, pairs, cfg.max_length, report)
    report.used = len(texts)
    report.label_counts = {name: int((label_ids == i).sum()) for i, name in enumerate(labels)}
    if env_ids is not None:
        report.environment_counts = {name: int((env_ids == i).sum()) for i, name in enumerate(env_names)}
    if pair_ids is not None:
        report.pairs = int(len(texts) // 2)
        members = np.argsort(pair_ids, kind="stable").reshape(-1, 2)  # (P, 2): _pair_ids checked exactly two
        report.pairs_identical_after_truncation = sum(np.array_equal(input_ids[a], input_ids[b]) for a, b in members)
    if not texts:
        raise DataError(f"{source}: no usable examples ({report.summary()})")
    return Split(split, input_ids, token_types, label_ids, texts, report, env_ids, tuple(env_names), pair_ids)


def _pair_ids(pair_keys: list[tuple[str, int]], source: str) -> np.ndarray:
    """Pair index per example (pairs numbered in order of first appearance); every key exactly twice."""
    rows: dict[str, list[int]] = {}
    for key, row_number in pair_keys:
        rows.setdefault(key, []).append(row_number)
    odd = {k: r for k, r in rows.items() if len(r) != 2}
    if odd:
        key, where = next(iter(odd.items()))
        raise DataError(f"{source}: {len(odd)} pair ids do not occur exactly twice, e.g. {key!r} on rows {where}; "
                        "every counterfactual pair needs both members (check data.pair_column)")
    number = {key: i for i, key in enumerate(rows)}
    return np.array([number[key] for key, _ in pair_keys], np.int32)


def _environment_ids(raw: list[tuple[str, int]], names: tuple[str, ...], source: str, setting: str) -> np.ndarray:
    index = {name: i for i, name in enumerate(names)}
    for env, row_number in raw:
        if env not in index:
            raise DataError(f"{source} row {row_number}: environment {env!r} is not one of {list(names)} (from "
                            f"{setting}); fix the file or set data.environments")
    return np.array([index[env] for env, _ in raw], np.int32)


def _environments_from_files(cfg: DataConfig, texts: list[str], raw_labels: list[tuple[str, int]],
                             source: str) -> list[tuple[str, int]]:
    """(environment, row) per example: the one file of `cfg.environment_files` that holds the example's text
    with its label. The label is part of the key because a counterfactual may keep the text and flip only
    the label (CAD has one such review in both orig/ and new/)."""
    where: dict[tuple[str, str], str] = {}
    for name, file in cfg.environment_files.items():
        _, rows = read_rows(dataclasses.replace(cfg, train=file), "train")
        for _, row in rows:
            if isinstance(row, dict) and cfg.text_column in row and cfg.label_column in row:
                key = (str(row[cfg.text_column]).strip(), str(row[cfg.label_column]).strip())
                if where.get(key, name) != name:
                    raise DataError(f"data.environment_files: the text {key[0][:60]!r}... with label {key[1]!r} is "
                                    f"in both {where[key]!r} and {name!r}; the environment must be unambiguous")
                where[key] = name
    out = []
    for text, (label, row_number) in zip(texts, raw_labels, strict=True):
        if (text, label) not in where:
            raise DataError(f"{source} row {row_number}: its text and label are in none of data.environment_files "
                            f"{dict(cfg.environment_files)}; every training example needs an environment")
        out.append((where[(text, label)], row_number))
    return out


def _tokenize(tokenizer, texts: list[str], pairs: list[str | None], max_length: int,
              report: SplitReport) -> tuple[list[np.ndarray], list[np.ndarray]]:
    inputs = texts if pairs[0] is None else list(zip(texts, pairs, strict=True))
    tokenizer.no_truncation()
    encodings = tokenizer.encode_batch(inputs)
    lengths = np.array([len(e.ids) for e in encodings])
    long = np.flatnonzero(lengths > max_length)
    if len(long):
        # Re-encode only the long ones with the tokenizer's own truncation, which keeps [SEP] (and splits
        # the budget between the two texts of a pair) the way the model saw it in pre-training.
        tokenizer.enable_truncation(max_length, strategy="longest_first")
        for i, enc in zip(long, tokenizer.encode_batch([inputs[i] for i in long]), strict=True):
            encodings[i] = enc
        tokenizer.no_truncation()
    report.truncated_examples = int(len(long))
    report.truncated_tokens = int((lengths[long] - max_length).sum())
    report.set_lengths(lengths)
    return ([np.array(e.ids, np.int32) for e in encodings], [np.array(e.type_ids, np.int32) for e in encodings])


# --------------------------------------------------------------------------------------------- batching


def bucket_length(lengths: np.ndarray, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds the longest example."""
    longest = int(lengths.max())
    return next(b for b in buckets if b >= longest)


def collate(split: Split, indices: np.ndarray, weights: np.ndarray, length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Rows `indices` padded on the right to `length`: the batch dict every objective receives."""
    n = len(indices)
    batch = {
        "input_ids": np.full((n, length), pad_id, np.int32),
        "attention_mask": np.zeros((n, length), np.int32),
        "labels": split.labels[indices],
        "weights": weights.astype(np.float32),  # 0 for filler rows: they count in no loss and no metric
        **_example_keys(split, indices),
    }
    if split.token_type_ids is not None:
        batch["token_type_ids"] = np.zeros((n, length), np.int32)
    if split.token_targets is not None:  # token targets (B, T): -1 (no target, padding) weighs 0
        targets = np.full((n, length), -1, np.int32)
    for row, i in enumerate(indices):
        ids = split.input_ids[i]
        batch["input_ids"][row, : len(ids)] = ids
        batch["attention_mask"][row, : len(ids)] = 1
        if split.token_type_ids is not None:
            batch["token_type_ids"][row, : len(ids)] = split.token_type_ids[i]
        if split.token_targets is not None:
            targets[row, : len(ids)] = split.token_targets[i]
    if split.token_targets is not None:
        batch["label_weights"] = (targets >= 0) * batch["weights"][:, None]
        batch["labels"] = np.maximum(targets, 0)  # a valid index everywhere; the weight says what counts
    return batch


def pack(split: Split, indices: np.ndarray, weights: np.ndarray, row_length: int, pad_id: int,
         micro_batches: int = 1, shards: int = 1) -> dict[str, np.ndarray]:
    """Examples `indices` packed side by side into rows of `row_length` tokens, instead of one padded row each.

    Short sentences leave most of a padded batch empty (SST-2: 13 real tokens on average against 40 padded
    ones), and the dense layers pay for every slot. Packed, each row holds several examples; `segment_ids`
    (1, 2, ... per example, 0 for padding) keep attention inside each example and `position_ids` restart at
    0, so every example's logits are those of the padded layout (tested). The examples stay the batch's
    examples: labels, weights and `pool_index` (E, 2), the (row, position) of each example's first token.

    The batch is cut into `micro_batches * shards` consecutive groups of examples (the layout `put_batch`
    makes: micro-batch a, device shard d is group a * shards + d), and each group is packed into its own
    rows (first-fit decreasing), so no example crosses a device or a micro-batch. All groups get the same
    number of rows R, the largest any group needs; rows are laid out group after group, (groups * R, L),
    and `pool_index` rows count from the start of the example's micro-batch (what the objective sees).
    The step compiles once per distinct R, at most batch_size / groups values.
    """
    n, groups = len(indices), micro_batches * shards
    if n % groups:
        raise DataError(f"a batch of {n} examples cannot be split into {micro_batches} micro-batches x {shards} "
                        "shards")
    per_group = n // groups
    lengths = [len(split.input_ids[i]) for i in indices]
    if max(lengths) > row_length:
        raise DataError(f"an example of {max(lengths)} tokens does not fit a packed row of {row_length}: set "
                        "data.pack_length to at least data.max_length")
    layout = []  # per group: rows, each a list of the batch positions it holds, in packing order
    for g in range(groups):
        rows, free = [], []
        # Longest first (ties in batch order, so the layout is a function of the batch alone).
        for j in sorted(range(g * per_group, (g + 1) * per_group), key=lambda j: -lengths[j]):
            r = next((r for r, room in enumerate(free) if room >= lengths[j]), None)
            if r is None:
                rows.append([])
                free.append(row_length)
                r = len(rows) - 1
            rows[r].append(j)
            free[r] -= lengths[j]
        layout.append(rows)
    n_rows = max(len(rows) for rows in layout)
    shape = (groups * n_rows, row_length)
    batch = {
        "input_ids": np.full(shape, pad_id, np.int32),
        "attention_mask": np.zeros(shape, np.int32),
        "position_ids": np.zeros(shape, np.int32),
        "segment_ids": np.zeros(shape, np.int32),
        "pool_index": np.zeros((n, 2), np.int32),
        "labels": split.labels[indices],
        "weights": weights.astype(np.float32),
        **_example_keys(split, indices),
    }
    if split.token_type_ids is not None:
        batch["token_type_ids"] = np.zeros(shape, np.int32)
    for g, rows in enumerate(layout):
        for r, members in enumerate(rows):
            row, start = g * n_rows + r, 0
            for segment, j in enumerate(members, start=1):
                i, end = indices[j], start + lengths[j]
                batch["input_ids"][row, start:end] = split.input_ids[i]
                batch["attention_mask"][row, start:end] = 1
                if split.token_type_ids is not None:
                    batch["token_type_ids"][row, start:end] = split.token_type_ids[i]
                batch["position_ids"][row, start:end] = np.arange(lengths[j])
                batch["segment_ids"][row, start:end] = segment
                batch["pool_index"][j] = ((g % shards) * n_rows + r, start)  # row within its micro-batch
                start = end
    return batch


def _example_keys(split: Split, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Per-example batch entries beside labels and weights: `environment` ids and `pair_ids`, when present."""
    out = {}
    if split.environments is not None:
        out["environment"] = split.environments[indices]
    if split.pair_ids is not None:
        out["pair_ids"] = split.pair_ids[indices]
    return out


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "segment_ids", "pool_index")


def model_inputs(batch: dict) -> dict:
    """The model's keyword arguments from a batch, padded (`collate`) or packed (`pack`)."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}
