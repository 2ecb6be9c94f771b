"""The teacher of a distillation run: loaded, checked against the student, and its logits over the training
split computed once and cached on disk.

The teacher is a run directory (the parameters of its best or latest checkpoint) or a Hugging Face model
directory or hub id with the student's head. Two things must hold, or nothing it says means what the student
thinks: the same label set in the same order (logit k is label k for both), and the same tokenizer (the
student's token ids are fed to the teacher). Both are checked, and a mismatch names what differs.

The logits are the teacher's in eval mode (no dropout) on exactly the examples the student trains on, so
caching them is exact: `research/objectives/distillation.py` reads them from the batch and the teacher stays out
of the train step. The cache file's name is a sha256 of the teacher's weights and of the tokenized split, so a
retrained teacher or a changed data setting computes afresh; a file under the right name that does not load or
has the wrong shape is an error (delete it), never silently replaced.

With `distill.in_step` (a causal LM, whose logits do not fit a cache), the teacher instead rides in the train
step's model, its weights `Frozen`, and computes its logits for every batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from research import peft
from research.config import ConfigError, ExperimentConfig
from research.data.split import Split
from research.evaluate import make_eval_step, predict, predict_tokens
from research.experiment import Pieces, model_source
from research.models import from_pretrained, load_tokenizer
from research.sharding import make_mesh


@dataclasses.dataclass
class Teacher:
    model: nnx.Module  # in eval mode
    labels: tuple[str, ...]
    tokenizer_source: str  # where its tokenizer files are
    description: str  # for messages: "run runs/teacher (best checkpoint, step 2105)" or the HF directory


def load_teacher(cfg: ExperimentConfig) -> Teacher:
    """The teacher `distill.teacher` names, for the student's task, in eval mode."""
    from research.run import is_run_dir, load_trained_model, read_run_config, with_run_source  # run.py: above us

    d = cfg.distill
    if is_run_dir(d.teacher):
        run_cfg = read_run_config(Path(d.teacher))
        if run_cfg.model.task != cfg.model.task:
            raise ConfigError(f"distill.teacher: run {d.teacher} trained a {run_cfg.model.task!r} model; the student "
                              f"is {cfg.model.task!r}: distill from a teacher with the student's head")
        model, step, which = load_trained_model(Path(d.teacher), d.teacher_checkpoint)
        tokenizer = model_source(with_run_source(run_cfg).model.name_or_path)  # it may have started from a run
        return Teacher(model, tuple(run_cfg.data.labels or ()), tokenizer, f"run {d.teacher} ({which} checkpoint, "
                       f"step {step})")
    source = model_source(d.teacher)
    model = from_pretrained(source, cfg.model.task)
    labels = () if cfg.model.task == "causal_lm" else tuple(model.config.labels().values())  # next tokens: none
    return Teacher(model, labels, source, source)


def check_teacher(teacher: Teacher, pieces: Pieces) -> None:
    """The teacher must predict the student's labels in the student's order and read the student's tokens."""
    if teacher.labels != tuple(pieces.labels):
        raise ConfigError(f"distill.teacher: {teacher.description} predicts labels {list(teacher.labels)}, the "
                          f"student {list(pieces.labels)}: distill from a teacher trained on this label set, in "
                          "this order (set data.labels to the teacher's order if the sets are equal)")
    theirs = load_tokenizer(teacher.tokenizer_source)
    ours, tv = pieces.tokenizer.get_vocab(), theirs.get_vocab()
    if ours != tv:
        differing = sorted(set(ours.items()) ^ set(tv.items()))[:3]
        raise ConfigError(f"distill.teacher: {teacher.description} has another tokenizer ({len(tv):,} tokens against "
                          f"the student's {len(ours):,}; e.g. {differing}): the student's token ids would mean "
                          "other words to it. Distill from a teacher with the student's tokenizer")
    split = pieces.train
    for i, text in enumerate(split.texts[:200]):  # same vocabulary, but normalization could still differ
        if text and theirs.encode(text).ids != pieces.tokenizer.encode(text).ids:
            raise ConfigError(f"distill.teacher: {teacher.description}'s tokenizer splits training example {i} "
                              f"({text[:60]!r}) differently from the student's (same vocabulary, other "
                              "normalization, e.g. lowercasing): use a teacher with the student's tokenizer")


def weights_fingerprint(model: nnx.Module) -> str:
    """sha256 of every weight of `model`, trained and frozen."""
    return peft.fingerprint(model, nnx.Any(nnx.Param, peft.Frozen))


def split_fingerprint(split: Split) -> str:
    """sha256 of a tokenized split: every example's token ids and token types, in order."""
    digest = hashlib.sha256()
    for i, ids in enumerate(split.input_ids):
        digest.update(np.asarray(ids, np.int32).tobytes() + b";")
        if split.token_type_ids is not None:
            digest.update(np.asarray(split.token_type_ids[i], np.int32).tobytes() + b";")
    return digest.hexdigest()


def cache_dir(cfg: ExperimentConfig) -> Path:
    if cfg.distill.cache_dir is not None:
        return Path(cfg.distill.cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "research" / "teacher_logits"


def compute_logits(teacher: nnx.Module, split: Split, cfg: ExperimentConfig, pad_id: int
                   ) -> np.ndarray | list[np.ndarray]:
    """The teacher's eval-mode logits: (N, C) for a sequence task, one (T_i, C) per example for a token task."""
    mesh = make_mesh()
    graphdef, params, rest = nnx.split(teacher, nnx.Param, ...)
    eval_step = make_eval_step(graphdef, rest, mesh)
    run = predict_tokens if split.token_targets is not None else predict
    return run(eval_step, params, split, cfg.train.eval_batch_size, cfg.data.buckets, pad_id, mesh)


def _save(path: Path, logits: np.ndarray | list[np.ndarray], about: dict) -> None:
    ragged = isinstance(logits, list)
    arrays = {"logits": np.concatenate(logits) if ragged else logits,
              "lengths": np.array([len(x) for x in logits] if ragged else [], np.int64)}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial.npz")
    np.savez(partial, **arrays)
    partial.replace(path)  # atomic: a reader sees the whole file or none
    path.with_suffix(".json").write_text(json.dumps(about, indent=2) + "\n")


def _load(path: Path, split: Split, num_labels: int) -> np.ndarray | list[np.ndarray]:
    fix = f"delete {path} and it is computed again"
    try:
        with np.load(path) as f:
            logits, lengths = f["logits"], f["lengths"]
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same problem
        raise ConfigError(f"cached teacher logits {path} do not load ({type(e).__name__}: {e}): {fix}") from e
    token_task = split.token_targets is not None
    expected = [len(x) for x in split.input_ids] if token_task else []
    rows = sum(expected) if token_task else len(split)
    if logits.shape != (rows, num_labels) or list(lengths) != expected:
        raise ConfigError(f"cached teacher logits {path} hold {logits.shape}, the {split.name} split needs "
                          f"({rows}, {num_labels}) in its examples' lengths: {fix}")
    if not token_task:
        return logits
    return np.split(logits, np.cumsum(lengths)[:-1])


def prepare_teacher(cfg: ExperimentConfig, pieces: Pieces, workdir: Path, resuming: bool) -> nnx.Module | None:
    """Load the teacher and check it against the student; record it in <workdir>/teacher.json (a resumed run
    must have the same teacher). Then either attach its cached logits to `pieces.train` and return None, or
    (`distill.in_step`) return the teacher, its weights `Frozen`, for the train step to run."""
    teacher = load_teacher(cfg)
    check_teacher(teacher, pieces)
    fingerprint = weights_fingerprint(teacher.model)
    about = {"teacher": cfg.distill.teacher, "description": teacher.description, "labels": list(teacher.labels),
             "fingerprint": fingerprint, "in_step": cfg.distill.in_step}
    record = workdir / "teacher.json"
    if resuming and record.exists():
        before = json.loads(record.read_text())
        if before["fingerprint"] != fingerprint:
            raise ConfigError(f"--resume: this run was distilled from {before['description']} (weights "
                              f"{before['fingerprint'][:12]}...), distill.teacher now gives {teacher.description} "
                              f"({fingerprint[:12]}...): resume with the same teacher")
    if cfg.distill.in_step:
        print(f"teacher: {teacher.description}, run inside the train step (frozen)")
        model = frozen(teacher.model)
    else:
        pieces.train, about["cache"] = cached_logits(cfg, pieces, teacher, fingerprint)
        model = None
    if jax.process_index() == 0:
        record.write_text(json.dumps(about, indent=2) + "\n")
    return model


def frozen(model: nnx.Module) -> nnx.Module:
    """`model` with every `nnx.Param` turned `Frozen` (in place), in eval mode: inside the train step it gets no
    gradient and no optimizer state, and the checkpoints (which hold parameters) leave it out."""
    for _, node in list(nnx.iter_graph(model)):
        if isinstance(node, nnx.Module):
            for attr, value in list(vars(node).items()):
                if type(value) is nnx.Param:
                    setattr(node, attr, peft.Frozen(value.get_value()))
    model.eval()
    return model


def cached_logits(cfg: ExperimentConfig, pieces: Pieces, teacher: Teacher, fingerprint: str) -> tuple[Split, str]:
    """The training split with the teacher's logits attached, from the cache or computed and cached; and the
    cache file's path."""
    split = pieces.train
    key = hashlib.sha256(f"{fingerprint}:{split_fingerprint(split)}:{cfg.model.task}".encode()).hexdigest()
    path = cache_dir(cfg) / f"{key}.npz"
    if path.exists():
        logits = _load(path, split, len(teacher.labels))
        print(f"teacher: {teacher.description}; logits over {len(split):,} {split.name} examples from {path}")
    else:
        began = time.perf_counter()
        logits = compute_logits(teacher.model, split, cfg, pieces.pad_id)
        if jax.process_index() == 0:
            _save(path, logits, {"teacher": cfg.distill.teacher, "description": teacher.description,
                                 "fingerprint": fingerprint, "split": split.name, "examples": len(split)})
        print(f"teacher: {teacher.description}; logits over {len(split):,} {split.name} examples computed in "
              f"{time.perf_counter() - began:.0f} s, cached at {path}")
    return dataclasses.replace(split, teacher_logits=logits), str(path)
