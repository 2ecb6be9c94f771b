"""Causal language-modelling data: documents into one token stream, cut into windows with next-token targets.

**Documents.** A `.txt` file is one document, or several cut at `data.document_separator`; a `.jsonl`, `.tsv`
or `.csv` file holds one document per row (`data.text_column`). Text is kept byte for byte (no stripping, no
detokenization): perplexity is a property of the exact text. `data.holdout_fraction` splits one file by
characters when train and dev name the same file (Tiny Shakespeare: the first 90% trains, the last 10%
validates, as nanoGPT does).

**The stream.** Documents are tokenized without special tokens and joined with the end-of-text token after
each one (GPT-2's `<|endoftext|>`), so the model sees where a document ends and never crosses into the next
without that marker.

**Windows.** Windows of at most `max_length` tokens start every `stride` tokens; each window's targets are the
tokens no earlier window predicted (a target at position t is the token at t + 1, predicted from positions
<= t). With the training stride, `max_length - 1`, consecutive windows share one token, so every token but
the stream's first is predicted exactly once; the last window is shorter and is padded and masked in its
batch, never dropped. A smaller stride (`data.eval_stride`, evaluation only) gives every held-out token at
least `max_length - stride` tokens of context: the sliding-window protocol of transformers' perplexity guide,
at about `max_length / stride` times the cost.
"""

from __future__ import annotations

import numpy as np

from research.config import DataConfig
from research.data.split import DataError, Split, SplitReport, read_rows, split_path


def documents(cfg: DataConfig, split: str) -> tuple[list[str], str]:
    """The documents of one split, and where they came from."""
    path = split_path(cfg, split)
    if path.suffix.lower() in (".jsonl", ".tsv", ".csv"):
        source, rows = read_rows(cfg, split)
        docs = []
        for number, row in rows:
            if isinstance(row, str):
                raise DataError(f"{source} row {number}: {row}")
            if cfg.text_column not in row:
                raise DataError(f"{source} row {number} has no column {cfg.text_column!r} (columns: {sorted(row)}); "
                                "set data.text_column")
            docs.append(str(row[cfg.text_column]))
        return docs, source
    text = path.read_text(encoding="utf-8")
    if cfg.holdout_fraction is not None:
        if cfg.train != cfg.dev:
            raise DataError(f"data.holdout_fraction splits one file, but data.train={cfg.train!r} and data.dev="
                            f"{cfg.dev!r} differ: name the same file or unset data.holdout_fraction")
        cut = int(len(text) * (1.0 - cfg.holdout_fraction))  # nanoGPT's split, by characters
        text = text[:cut] if split == "train" else text[cut:] if split == "dev" else text
    docs = text.split(cfg.document_separator) if cfg.document_separator else [text]
    return [d for d in docs if d], str(path)


def token_stream(tokenizer, docs: list[str], eos_id: int) -> np.ndarray:
    """(N,) int32: every document's tokens followed by the end-of-text token."""
    parts = []
    for enc in tokenizer.encode_batch(docs, add_special_tokens=False):
        parts.append(np.asarray(enc.ids, np.int32))
        parts.append(np.array([eos_id], np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def windows(stream: np.ndarray, max_length: int, stride: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Windows (input ids) and their targets (the next token where it is a target, -1 elsewhere)."""
    if not 1 <= stride <= max_length - 1:
        raise DataError(f"a window stride of {stride} must lie in [1, max_length - 1 = {max_length - 1}]")
    inputs, targets = [], []
    predicted_to = 1  # stream index of the first token no window has predicted yet (token 0 never is)
    begin = 0
    while predicted_to < len(stream):
        end = min(begin + max_length, len(stream))
        ids = stream[begin:end]
        target = np.full(len(ids), -1, np.int32)
        first = predicted_to - begin - 1  # position whose next token is the first new target
        target[first : end - begin - 1] = ids[first + 1 :]
        inputs.append(ids)
        targets.append(target)
        predicted_to = end
        begin += stride
    return inputs, targets


def load_split(cfg: DataConfig, split: str, tokenizer, eos_id: int, stride: int | None = None) -> Split:
    """Read and tokenize one split into windows ("train", "dev" or a name of `cfg.test`); the training split
    uses the stride `max_length - 1`, the others `cfg.eval_stride` (default: the same)."""
    docs, source = documents(cfg, split)
    report = SplitReport(split, source)
    report.rows = len(docs)
    if not docs:
        raise DataError(f"{source}: no text for the {split} split")
    stream = token_stream(tokenizer, docs, eos_id)
    if stride is None:
        stride = cfg.eval_stride if split != "train" and cfg.eval_stride is not None else cfg.max_length - 1
    inputs, targets = windows(stream, cfg.max_length, stride)
    report.used = len(inputs)
    # Words (whitespace-separated) and UTF-8 bytes: the denominators of word perplexity and bits per byte.
    report.label_counts = {"tokens": int(len(stream)), "targets": int(sum((t >= 0).sum() for t in targets)),
                           "words": sum(len(d.split()) for d in docs), "bytes": sum(len(d.encode()) for d in docs)}
    lengths = np.array([len(x) for x in inputs])
    report.set_lengths(lengths)
    n = len(inputs)
    return Split(split, inputs, None, np.full(n, -1, np.int32), [""] * n, report, token_targets=targets)
