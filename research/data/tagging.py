"""Token-classification data (named entities, chunks, parts of speech): CoNLL-style column files, sub-word
label alignment, windows for long sentences, and entity-level scores computed like `conlleval`.

**Reading** (`read_conll`). One token per line, columns separated by whitespace, a blank line between
sentences; the word and the tag come from configurable columns (CoNLL-2003: `word POS chunk NER`, so word 0,
tag 3 or -1). `-DOCSTART-` lines mark documents: they are dropped and counted. A line with too few columns is
an error naming the file and the line, unless the caller allows skipping, which drops the whole sentence
and counts it (a sentence with a hole in it would misalign every later tag). Tags in the IOB1 scheme (`I-`
starts an entity unless it continues one of the same type; `B-` only between two adjacent entities of one
type) are rewritten to IOB2 (every entity starts with `B-`) on reading, so the model learns one unambiguous
scheme whatever the file uses.

**Alignment** (`tokenize`). Each word's tag goes on its first word piece; the other pieces, and the special
tokens, get label -1 (no loss, no prediction), as in BERT's NER recipe (Devlin et al. 2019, section 5.3). A
sentence whose word pieces do not fit `max_length` is cut at word boundaries into consecutive windows, each
with its own special tokens, rather than truncated: every word keeps its prediction, and the number of split
sentences is reported. A single word longer than a whole window keeps its first pieces (it still carries its
tag); the dropped pieces are counted. A word that tokenizes to nothing (a character the tokenizer's
normalizer deletes) has no piece to carry its tag: it is counted, and predicted `O` at evaluation.

**Scoring** (`entity_scores`). Entities are extracted from tag sequences with conlleval's chunk rules (the
ones seqeval's default mode implements), so IOB1 and IOB2 sequences score alike; precision, recall and F1
are micro-averaged over entities, plus per type. `tests/test_tagging.py` checks them against seqeval on the
real CoNLL-2003 dev tags; we do not depend on seqeval (and through it scikit-learn) at run time for forty
lines of counting.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from research.config import DataConfig
from research.data.split import DataError, Split, SplitReport, split_path

DOCSTART = "-DOCSTART-"


@dataclasses.dataclass
class Sentences:
    """The sentences of one file: words and their tags (IOB2), and where each came from (first line)."""

    words: list[list[str]]
    tags: list[list[str]]
    lines: list[int]


def read_conll(path: Path, token_column: int = 0, tag_column: int = -1, scheme: str = "iob2",
               skip_malformed: bool = False, report: SplitReport | None = None) -> Sentences:
    """The sentences of a CoNLL-style column file; see the module docstring. `report` counts what was
    dropped (`-DOCSTART-` lines, malformed sentences) and the rows (tokens) read."""
    if scheme not in ("iob2", "iob1"):
        raise DataError(f"unknown tag scheme {scheme!r}: use 'iob2' (BIO) or 'iob1'")
    report = report if report is not None else SplitReport("conll", str(path))
    needed = max(token_column if token_column >= 0 else -token_column - 1,
                 tag_column if tag_column >= 0 else -tag_column - 1) + 1
    out = Sentences([], [], [])
    words: list[str] = []
    tags: list[str] = []
    start, broken = 0, None

    def close() -> None:
        nonlocal words, tags, broken
        if words and broken is None:
            out.words.append(words)
            out.tags.append(iob1_to_iob2(tags) if scheme == "iob1" else tags)
            out.lines.append(start)
        elif broken is not None:
            report.skip(f"malformed line in the sentence ({broken})", start)
        words, tags, broken = [], [], None

    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                close()
                continue
            if fields[0] == DOCSTART:
                close()
                report.skip("-DOCSTART- line", number)
                continue
            report.rows += 1
            if not words and broken is None:
                start = number
            if len(fields) < needed:
                problem = f"{len(fields)} columns, need {needed} for word column {token_column} and tag column " \
                          f"{tag_column}"
                if not skip_malformed:
                    raise DataError(f"{path} line {number}: {problem}: {line.rstrip()!r}; fix the file, set the "
                                    "columns (data.token_column / data.tag_column), or allow skipping "
                                    "(data.skip_malformed=true drops the sentence and counts it)")
                broken = problem
                continue
            words.append(fields[token_column])
            tags.append(fields[tag_column])
    close()
    for sentence_tags, line in zip(out.tags, out.lines, strict=True):
        for tag in sentence_tags:
            if tag != "O" and (len(tag) < 3 or tag[:2] not in ("B-", "I-")):
                raise DataError(f"{path} sentence at line {line}: tag {tag!r} is not O, B-<type> or I-<type> "
                                "(IOB1/IOB2; other schemes, e.g. BIOES, are not supported)")
    return out


def iob1_to_iob2(tags: list[str]) -> list[str]:
    """IOB1 -> IOB2: an `I-X` that does not continue an entity of type X starts one, so it becomes `B-X`."""
    out = []
    for i, tag in enumerate(tags):
        previous = out[i - 1] if i else "O"
        if tag.startswith("I-") and (previous == "O" or previous[2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
    return out


# ------------------------------------------------------------------------------------------ alignment


@dataclasses.dataclass
class Windows:
    """Token-level examples made from sentences: one per window (most sentences are one window)."""

    input_ids: list[np.ndarray]  # each (T_i,) int32, special tokens included
    token_labels: list[np.ndarray]  # each (T_i,) int32: the tag id on each word's first piece, -1 elsewhere
    sentence: np.ndarray  # (N,) int32: the sentence each window comes from
    first_word: np.ndarray  # (N,) int32: the sentence position of the window's first word
    word_positions: list[np.ndarray]  # each (W_i,) int32: token position of each word's first piece, -1: none


def tokenize(tokenizer, sentences: Sentences, label_index: dict[str, int], max_length: int,
             report: SplitReport) -> Windows:
    """Word pieces with first-piece labels, sentences too long for `max_length` cut into windows at word
    boundaries (module docstring). An unknown tag is an error naming the sentence and the label set."""
    for tags, line in zip(sentences.tags, sentences.lines, strict=True):
        for tag in tags:
            if tag not in label_index:
                raise DataError(f"{report.source} sentence at line {line}: tag {tag!r} is not in the label set "
                                f"{list(label_index)}; set data.labels to the full tag set")
    special = tokenizer.num_special_tokens_to_add(False)  # [CLS] and [SEP] for BERT
    budget = max_length - special
    if budget < 1:
        raise DataError(f"data.max_length={max_length} leaves no room for words beside {special} special tokens")
    tokenizer.no_truncation()
    # Pieces per word, without special tokens, to plan the windows.
    pieces = [np.bincount([w for w in e.word_ids if w is not None], minlength=len(words)).astype(np.int64)
              for e, words in zip(tokenizer.encode_batch(sentences.words, is_pretokenized=True,
                                                         add_special_tokens=False), sentences.words, strict=True)]
    spans = []  # (sentence, first word, end word)
    split_sentences = 0
    for s, counts in enumerate(pieces):
        start, used = 0, 0
        for w, n in enumerate(counts):
            if used + min(n, budget) > budget and w > start:
                spans.append((s, start, w))
                start, used = w, 0
            used += min(n, budget)
        spans.append((s, start, len(counts)))
        split_sentences += int(spans[-1][1] > 0)
    encodings = tokenizer.encode_batch([sentences.words[s][a:b] for s, a, b in spans], is_pretokenized=True)
    out = Windows([], [], np.array([s for s, _, _ in spans], np.int32), np.array([a for _, a, _ in spans], np.int32),
                  [])
    dropped_pieces, cut_words, lengths = 0, 0, []
    for (s, a, b), enc in zip(spans, encodings, strict=True):
        ids = np.array(enc.ids, np.int32)
        word_ids = [-1 if w is None else w for w in enc.word_ids]
        positions = np.full(b - a, -1, np.int32)
        for t, w in enumerate(word_ids):
            if w >= 0 and positions[w] < 0:
                positions[w] = t
        for _ in range(int((positions < 0).sum())):
            report.skip("words without word pieces, predicted O", sentences.lines[s])
        lengths.append(len(ids))
        if len(ids) > max_length:  # only a single word longer than the budget gets here: keep its first pieces
            dropped_pieces += len(ids) - max_length
            cut_words += 1
            keep = np.r_[np.arange(max_length - 1), len(ids) - 1]  # ... and the closing special token
            ids = ids[keep]
            positions = np.where(positions < max_length - 1, positions, -1)
        labels = np.full(len(ids), -1, np.int32)
        tags = sentences.tags[s][a:b]
        for w, t in enumerate(positions):
            if t >= 0:
                labels[t] = label_index[tags[w]]
        out.input_ids.append(ids)
        out.token_labels.append(labels)
        out.word_positions.append(positions)
    report.used = len(sentences.words)
    report.split_into_windows = split_sentences
    report.truncated_examples = cut_words  # words longer than a window: their first pieces kept
    report.truncated_tokens = dropped_pieces
    report.set_lengths(lengths)
    report.label_counts = {tag: sum(t.count(tag) for t in sentences.tags) for tag in label_index}
    return out


@dataclasses.dataclass(kw_only=True)
class TaggedSplit(Split):
    """A token-classification split: windows of word pieces (`token_targets`: the tag id on each word's first
    piece), and the gold sentences they came from, for entity scores over whole sentences."""

    sentences: Sentences  # the gold words and tags
    windows: Windows  # where each window's words sit in its sentence

    def predicted_tags(self, predicted: list[np.ndarray], names: tuple[str, ...]) -> list[list[str]]:
        """Tag sequences per gold sentence from per-window token predictions (`predicted[i]`: (T_i,) tag ids)."""
        return sentence_tags(self.windows, len(self.sentences.words), [len(w) for w in self.sentences.words],
                             predicted, names)


def load_split(cfg: DataConfig, split: str, tokenizer, labels: tuple[str, ...] | None, seed: int) -> TaggedSplit:
    """Read, check and tokenize one split of CoNLL-style data ("train", "dev" or a name of `cfg.test`).
    `labels` None infers the tag set from the training split: "O" first, then the others sorted."""
    path = split_path(cfg, split)
    report = SplitReport(split, str(path))
    sentences = read_conll(path, cfg.token_column, cfg.tag_column, cfg.tag_scheme, cfg.skip_malformed, report)
    if not sentences.words:
        raise DataError(f"{path}: no sentences ({report.summary()}); is it a CoNLL-style column file?")
    limit = cfg.max_train_examples if split == "train" else cfg.max_dev_examples
    if limit is not None and limit < len(sentences.words):
        report.subset_of = len(sentences.words)
        # Training: a seeded random subset of sentences; dev and test: the first N.
        keep = np.sort(np.random.default_rng(seed).permutation(len(sentences.words))[:limit]) \
            if split == "train" else np.arange(limit)
        sentences = Sentences(*([field[i] for i in keep] for field in (sentences.words, sentences.tags,
                                                                         sentences.lines)))
    if labels is None:
        found = {t for tags in sentences.tags for t in tags}
        labels = (*(["O"] if "O" in found else []), *sorted(found - {"O"}))
    windows = tokenize(tokenizer, sentences, {t: i for i, t in enumerate(labels)}, cfg.max_length, report)
    n = len(windows.input_ids)
    texts = [" ".join(sentences.words[s][a : a + len(p)]) for s, a, p in
             zip(windows.sentence, windows.first_word, windows.word_positions, strict=True)]
    return TaggedSplit(name=split, input_ids=windows.input_ids,
                       token_type_ids=[np.zeros_like(x) for x in windows.input_ids], labels=np.full(n, -1, np.int32),
                       texts=texts, report=report, token_targets=windows.token_labels, sentences=sentences,
                       windows=windows)


def sentence_tags(windows: Windows, n_sentences: int, lengths: list[int], predicted: list[np.ndarray],
                  names: tuple[str, ...]) -> list[list[str]]:
    """Tag sequences per sentence from per-window token predictions (`predicted[i]`: (T_i,) tag ids): each
    word takes the prediction at its first piece; a word without one is `O`."""
    out = [["O"] * n for n in lengths[:n_sentences]]
    for i, positions in enumerate(windows.word_positions):
        s, a = int(windows.sentence[i]), int(windows.first_word[i])
        for w, t in enumerate(positions):
            if t >= 0:
                out[s][a + w] = names[int(predicted[i][t])]
    return out
