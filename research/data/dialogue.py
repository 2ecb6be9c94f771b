"""Dialogue response data for a causal LM: each system turn of a dialogue becomes one example, the dialogue
so far as context and the system's response as the only tokens with a loss.

**Corpus.** CamRest676 (`dialog/camrest676/CamRest676.json`: 676 restaurant-booking dialogues, 2,744 turns of
a user transcript and a system response). There is no official split; the usual one is 3:1:1 in file order
(Sequicity): dialogues [0, 406) train, [406, 541) dev, [541, 676) test (`split_of`). `data.max_train_examples`
and `data.max_dev_examples` keep the first N dialogues of a split.

**Format.** One example per turn:

    User: <utterance 1>
    System: <response 1>
    ...
    User: <utterance k>
    System: <response k><|endoftext|>

Everything up to and including `System:` is the context (no loss); the response tokens and the closing
`<|endoftext|>` are the targets, so the model learns to answer and to stop. The context keeps as many of
the most recent earlier turns as fit `data.max_length` with the response; older turns are dropped whole
and counted (`context_turns_left_out` in the data report). If the current user utterance and the response
alone do not fit, the utterance is cut from its start (its end, next to the response, is kept) and the
example is counted as truncated; the response is never cut.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from research.config import DataConfig
from research.data.split import DataError, Split, SplitReport, split_path

SPLITS = {"train": (0.0, 0.6), "dev": (0.6, 0.8), "test": (0.8, 1.0)}  # 3:1:1 in file order


def split_of(dialogues: list, split: str) -> list:
    """The dialogues of "train", "dev" or "test" (3:1:1 in file order)."""
    if split not in SPLITS:
        raise DataError(f"CamRest676 has the splits {sorted(SPLITS)}, not {split!r}")
    a, b = SPLITS[split]
    return dialogues[round(a * len(dialogues)) : round(b * len(dialogues))]


def turns(dialogue: dict) -> list[tuple[str, str]]:
    """(user utterance, system response) per turn, whitespace-normalized."""
    return [(" ".join(t["usr"]["transcript"].split()), " ".join(t["sys"]["sent"].split())) for t in dialogue["dial"]]


@dataclasses.dataclass(kw_only=True)
class DialogueSplit(Split):
    """Dialogue responses: `texts` are the contexts (prompts), `token_targets` the response tokens, and these
    the reference responses, shown beside the model's own in samples."""

    responses: list[str]


def load_split(cfg: DataConfig, split: str, tokenizer, eos_id: int) -> DialogueSplit:
    """One example per system turn of the split's dialogues (module docstring); `data.train`/`dev`/a test
    name all point at CamRest676.json, and the split name picks the dialogues."""
    path = split_path(cfg, split)
    report = SplitReport(split, str(path))
    try:
        dialogues = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); expected CamRest676.json") from None
    if not isinstance(dialogues, list) or not all(isinstance(d, dict) and "dial" in d for d in dialogues):
        raise DataError(f"{path}: expected a list of dialogues with a 'dial' list each (CamRest676.json)")
    chosen = split_of(dialogues, split)  # data.test names must be "test" (the last fifth)
    limit = cfg.max_train_examples if split == "train" else cfg.max_dev_examples
    if limit is not None and limit < len(chosen):  # whole dialogues: the first N of the split
        report.subset_of = len(chosen)
        chosen = chosen[:limit]

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    inputs, targets, prompts, responses = [], [], [], []
    dropped_turns = 0
    for dialogue in chosen:
        history: list[list[int]] = []  # earlier turns, each "User: ...\nSystem: ...\n" as tokens
        for user, system in turns(dialogue):
            report.rows += 1
            current = encode(f"User: {user}\nSystem:")
            response = encode(f" {system}") + [eos_id]
            room = cfg.max_length - len(response)
            if room < 2:
                raise DataError(f"{path}: a response of {len(response)} tokens does not fit data.max_length="
                                f"{cfg.max_length} with any context; raise data.max_length")
            if len(current) > room:  # keep the end of the utterance, next to the response
                report.truncated_examples += 1
                report.truncated_tokens += len(current) - room
                current = current[len(current) - room :]
            kept = []
            for turn in reversed(history):  # most recent first, whole turns only
                if len(turn) + sum(map(len, kept)) + len(current) > room:
                    break
                kept.insert(0, turn)
            dropped_turns += len(history) - len(kept)
            context = [t for turn in kept for t in turn] + current
            ids = np.array(context + response, np.int32)
            target = np.full(len(ids), -1, np.int32)
            target[len(context) - 1 : -1] = ids[len(context) :]  # each response token, from the one before
            inputs.append(ids)
            targets.append(target)
            prompts.append(tokenizer.decode(context))
            responses.append(system)
            history.append(encode(f"User: {user}\nSystem: {system}\n"))
    if not inputs:
        raise DataError(f"{path}: no turns in the {split} split")
    report.used = len(inputs)
    report.context_turns_left_out = dropped_turns
    lengths = np.array([len(x) for x in inputs])
    report.set_lengths(lengths)
    # Response tokens (the targets), words and bytes: the denominators of the perplexities.
    report.label_counts = {"tokens": int(sum((t >= 0).sum() for t in targets)),
                           "targets": int(sum((t >= 0).sum() for t in targets)),
                           "words": sum(len(r.split()) for r in responses),
                           "bytes": sum(len(r.encode()) for r in responses)}
    return DialogueSplit(name=split, input_ids=inputs, token_type_ids=None, labels=np.full(len(inputs), -1, np.int32),
                         texts=prompts, report=report, token_targets=targets, responses=responses)
