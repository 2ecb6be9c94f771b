"""Sequence-classification data: read a split (TSV/CSV/JSONL under the data root, or a hub dataset), check
its labels (and environments and counterfactual pairs, when configured), and tokenize it.

Nothing is lost silently. Rows that cannot be used are skipped with a reason and counted; inputs longer
than `max_length` are truncated and counted (examples and tokens); a label outside the label set is an error,
because JAX clamps out-of-range indices instead of failing. All of it lands in a `SplitReport`, which the
runner prints and writes to the run directory. Batching is research/data/batches.py's.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from research.config import DataConfig
from research.data import spurious
from research.data.split import DataError, Split, SplitReport, read_rows


def load_split(cfg: DataConfig, split: str, tokenizer, labels: tuple[str, ...] | None, seed: int,
               regression: bool = False) -> Split:
    """Read, check and tokenize one split: "train", "dev" or a name of `cfg.test`. `labels` None infers them
    (training split only). `regression`: the label column holds a float score per example (STS-B), and
    `labels` is ignored; the split's labels are then (N,) float32."""
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
                            "data.pair_column, or data.columns if the file has no header row")
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

    if regression:
        labels = ()
        label_ids = _scores(raw_labels, source, cfg.label_column)
    else:
        if labels is None:
            labels = tuple(sorted({label for label, _ in raw_labels}))
        index = {name: i for i, name in enumerate(labels)}
        for label, row_number in raw_labels:
            if label not in index:
                raise DataError(f"{source} row {row_number}: label {label!r} is not in the label set "
                                f"{list(labels)}; fix the file or set data.labels to the full label set")
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
    if regression:
        report.score_stats = {"min": float(label_ids.min()), "mean": float(label_ids.mean()),
                              "max": float(label_ids.max())} if len(label_ids) else {}
    else:
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


def _scores(raw_labels: list[tuple[str, int]], source: str, column: str) -> np.ndarray:
    """A regression split's labels, (N,) float32; a value that is not a finite number is an error."""
    out = np.zeros(len(raw_labels), np.float32)
    for i, (label, row_number) in enumerate(raw_labels):
        try:
            out[i] = float(label)
        except ValueError:
            out[i] = np.nan
        if not np.isfinite(out[i]):
            raise DataError(f"{source} row {row_number}: {column} {label!r} is not a finite number, and "
                            "model.problem_type='regression' trains on a score per example; fix the file or check "
                            "data.label_column")
    return out


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
