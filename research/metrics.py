"""Metrics out: append-only `metrics.jsonl` and TensorBoard event files, written by process 0 only.

Each JSONL line is `{"step": N, "<group>/<name>": value, ...}`; the TensorBoard scalars carry the same names
and values. The groups: `train/` (the step's metrics), one per evaluated split under the split's own name
(`dev/accuracy`, a test set `orig` as `orig/accuracy`, CoNLL's `test` as `test/entity_f1`), and
`eval_<which>/` for `research eval`. Records written before splits logged under their own name said
`test/<name>/...`; `read_records` renames those on read, from the run's own config.json, so old and new
records read alike.

On resume, records after the restored step are dropped from both files (TensorBoard through `purge_step`),
because the resumed run writes them again: the files end up as an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax


def _summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without PyTorch. When torch is installed (the test extra, the
    baselines), tensorboardX imports it on import only to accept torch tensors as values, which costs 3-5 s per
    `research` process and which we never use: we log Python floats. Hiding torch for that one import makes
    tensorboardX fall back to numpy (its own `except ImportError`); torch stays importable afterwards, and a
    process that already imported it keeps it."""
    import sys

    hide = "torch" not in sys.modules  # a process that already imported it keeps it: nothing to save
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError while this entry is None
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    def __init__(self, workdir: Path, resume_step: int | None = None):
        self.active = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self.tb = None
        if not self.active:
            return
        if resume_step is not None:
            trim_jsonl(self.path, resume_step)
        SummaryWriter = _summary_writer_class()
        purge = resume_step + 1 if resume_step is not None else None
        self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=purge, flush_secs=10)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in record.items():
            if name != "step" and isinstance(value, int | float):
                self.tb.add_scalar(name, value, step)

    def write_text(self, step: int, name: str, text: str) -> None:
        if self.active:
            self.tb.add_text(name, f"```\n{text}\n```", step)

    def flush(self) -> None:
        """Make everything written so far durable (called before each checkpoint: a resumed run rewrites only
        what comes after its checkpoint, so what comes before must survive a SIGKILL)."""
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def trim_jsonl(path: Path, step: int) -> None:
    """Drop the records of a `{"step": N, ...}` per line file (metrics.jsonl, samples.jsonl) after `step`, and
    any line a kill cut short: a run resumed from `step` writes them again."""
    if not path.exists():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            dropped += 1
            continue
        if record["step"] <= step:
            kept.append(line)
        else:
            dropped += 1
    path.write_text("".join(line + "\n" for line in kept))
    if dropped:
        print(f"{path.name}: dropped {dropped} records after step {step}; the resumed run writes them again")


def _plain(value):
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the fact as a string
    return value


def read_records(workdir: Path) -> list[dict]:
    """The records of `<workdir>/metrics.jsonl`, metric names in today's scheme (module docstring)."""
    workdir = Path(workdir)
    names = split_names(workdir / "config.json")
    return [renamed(json.loads(line), names) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def split_names(config_json: Path) -> set[str]:
    """The test-set names of a run, from its config.json (data.test and the spurious benchmark's agreements)."""
    if not config_json.is_file():
        return set()
    data = json.loads(config_json.read_text()).get("data", {})
    spurious = data.get("spurious") or {}
    return set(data.get("test") or {}) | {f"agree{a:g}" for a in spurious.get("test_agreements", ())}


def renamed(record: dict, names: set[str]) -> dict:
    """`record` with old-scheme keys `[eval_<which>/]test/<name>/<metric>` (name one of `names`) as
    `[eval_<which>/]<name>/<metric>`; every other key as it is."""
    def rename(key: str) -> str:
        parts = key.split("/")
        for i in range(len(parts) - 2):
            if parts[i] == "test" and parts[i + 1] in names and (i == 0 or parts[i - 1].startswith("eval_")):
                return "/".join(parts[:i] + parts[i + 1 :])
        return key

    return {rename(k): v for k, v in record.items()}
