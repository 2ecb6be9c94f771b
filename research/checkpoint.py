"""Orbax checkpoints of the whole training state, verified by checksums and restored against an abstract
state.

    <workdir>/checkpoints/<step>/   three Orbax items: `params`; `train`, the rest of the train state (optimizer
                                    state, step, RNG key, an objective's state); `meta`, JSON (data position,
                                    early-stopping state). The last `keep` of them, for --resume
    <workdir>/best/<step>/          params of the best evaluation by `best_metric` (one kept)

**When a checkpoint counts.** Orbax writes each checkpoint into a temporary directory and renames it when
complete; then we hash every file it wrote into `manifest.sha256.json` (written under a temporary name and
renamed: the commit point). Only a step directory with a manifest counts, so a run killed before, during or
after Orbax's write, or before the manifest, leaves nothing that `latest_step()` returns, and the next save
of that step replaces the leftover. Retention is ours, not Orbax's: older checkpoints are deleted only after
the new one is committed, so the last good checkpoint survives a failed save (a full disk, a kill).

**Restoring** checks first, then reads: every file against the manifest (a flipped bit, a truncated or a
missing file fails, naming the step and the file, and naming the older complete checkpoints one can resume
from on request: `research train --resume --resume-step N`), and every array's shape and dtype against the
state it is restored into (all mismatched paths listed together). Saving is synchronous: the train step
donates its state buffers, and a blocking save cannot race with that.

**The parameters are an item of their own**, so that evaluation and export read them alone (`restore_params`)
without knowing the optimizer or the objective that shaped the rest of the state. Checkpoints written before
that held one `state` item: --resume still reads them (and writes the new layout from then on); reading their
parameters alone is refused with a message that says what to do.

Where the starting weights come from, in order (see `research.train.train`): a checkpoint in the run
directory (--resume) > the pretrained checkpoint named by model.name_or_path (an exported run directory
included) > random initialization (model.init="scratch").
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from research.models.hf import CheckpointError

MANIFEST = "manifest.sha256.json"


def _primary() -> bool:
    """Files beside Orbax's (manifests, the FORMAT marker, deletions) are written by process 0 alone."""
    return jax.process_index() == 0


def _sync(name: str) -> None:
    """All processes wait here, so none reads a directory process 0 is still changing."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _manager(directory: Path, **options: Any) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory.absolute(),
        options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False, **options),
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_digests(directory: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"sha256", "bytes"}} of every file under `directory` but the manifest."""
    return {str(path.relative_to(directory)): {"sha256": _sha256(path), "bytes": path.stat().st_size}
            for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)}


def write_manifest(directory: Path) -> None:
    """Commit a finished Orbax checkpoint: its files' checksums, written atomically."""
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(_file_digests(directory), indent=1) + "\n")
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.rename(directory / MANIFEST)


def verify(directory: Path, step: int, others: list[int]) -> None:
    """Raise a CheckpointError naming every file of checkpoint `step` that differs from its manifest."""
    try:
        expected = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint step {step} ({directory}): unreadable {MANIFEST} ({e})") from None
    problems = []
    for name, want in expected.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        size = path.stat().st_size
        if size != want["bytes"]:
            problems.append(f"{name}: {size} bytes, {want['bytes']} written (truncated or overwritten)")
            continue
        if _sha256(path) != want["sha256"]:
            problems.append(f"{name}: checksum differs (corrupted)")
    if problems:
        older = [s for s in others if s < step]
        hint = (f"resume from an older complete checkpoint on purpose with --resume-step {older[-1]} (complete: "
                f"{older})" if older else "no older complete checkpoint exists: start the run afresh")
        raise CheckpointError(f"checkpoint step {step} ({directory}) failed verification:\n  "
                              + "\n  ".join(problems) + f"\n{hint}")


def _path(keys: tuple) -> str:
    """"opt_state/1/0/mu/bert/...": one spelling for dict keys, sequence indices and named-tuple fields (Orbax's
    metadata stores optax's named tuples as dicts)."""
    parts = []
    for k in keys:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def check_structure(directory: Path, abstract: Any, step: int, prefix: str = "") -> None:
    """Raise a CheckpointError listing every path whose shape or dtype differs between the checkpoint's
    arrays (`directory`, an Orbax StandardSave item) and `abstract`, or that only one of them has. Paths are
    named `prefix` + their path in the item."""
    stored = ocp.StandardCheckpointHandler().metadata(directory.absolute())
    have = {prefix + _path(k): v for k, v in jax.tree_util.tree_leaves_with_path(stored.tree)}
    want = {prefix + _path(k): v for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
    problems = [f"{p}: only in the checkpoint, {have[p].shape} {have[p].dtype}" for p in have if p not in want]
    problems += [f"{p}: not in the checkpoint (expected {want[p].shape} {want[p].dtype})" for p in want
                 if p not in have]
    for p in sorted(set(have) & set(want)):
        if tuple(have[p].shape) != tuple(want[p].shape) or str(have[p].dtype) != str(want[p].dtype):
            problems.append(f"{p}: checkpoint {tuple(have[p].shape)} {have[p].dtype}, expected "
                            f"{tuple(want[p].shape)} {want[p].dtype}")
    if problems:
        raise CheckpointError(f"checkpoint step {step} ({directory.parent}) does not fit the state it is restored "
                              f"into ({len(problems)} mismatched):\n  " + "\n  ".join(problems)
                              + "\nrestore with the model config the run was trained with")


class Checkpoints:
    def __init__(self, workdir: Path, keep: int, best_metric: str | None = None, best_mode: str = "max"):
        self.directory = Path(workdir) / "checkpoints"
        self.keep = keep
        self.latest = _manager(self.directory)  # keeps everything: retention is ours (module docstring)
        # Runs checkpointed before manifests existed have no FORMAT file: their Orbax-complete steps count,
        # unverified. A run that starts now writes it first, so a step without a manifest never counts.
        marker = self.directory / "FORMAT"
        if _primary() and not marker.exists() and not self.latest.all_steps():
            marker.write_text("orbax + manifest.sha256.json per step\n")
        _sync("checkpoints-format")
        self.legacy = not marker.exists()
        self.best = None
        if best_metric is not None:
            self.best = _manager(Path(workdir) / "best", max_to_keep=1, best_fn=lambda m: m[best_metric],
                                 best_mode=best_mode)

    def complete_steps(self) -> list[int]:
        """Steps with a committed (manifested) checkpoint, ascending."""
        return sorted(s for s in self.latest.all_steps()
                      if self.legacy or (self.directory / str(s) / MANIFEST).is_file())

    def latest_step(self) -> int | None:
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def drop_after(self, step: int) -> list[int]:
        """Delete the checkpoints after `step` (resuming from an older one on purpose makes them stale)."""
        later = [s for s in self.latest.all_steps() if s > step]
        if _primary():
            for s in later:
                shutil.rmtree(self.directory / str(s))
        _sync(f"drop-after-{step}")
        self.latest.reload()
        return later

    def drop_best_after(self, step: int) -> None:
        """Delete best/ checkpoints later than `step`: a resumed run evaluates (and may save) them again, and a
        kill may have left one from after the checkpoint it resumes from."""
        if self.best is None:
            return
        if _primary():
            for s in self.best.all_steps():
                if s > step:
                    shutil.rmtree(Path(str(self.best.directory)) / str(s))
        _sync(f"drop-best-after-{step}")
        self.best.reload()

    def save(self, step: int, state: dict, meta: dict) -> None:
        target = self.directory / str(step)
        if target.exists():  # a save of this step that never committed (killed before its manifest)
            if _primary():
                shutil.rmtree(target)
            _sync(f"replace-{step}")
            self.latest.reload()
        previous = self.latest_step()
        try:
            params, rest = _split_state(state)
            self.latest.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                           train=ocp.args.StandardSave(rest),
                                                           meta=ocp.args.JsonSave(meta)), force=True)
            if _primary():
                write_manifest(target)
            _sync(f"commit-{step}")
        except Exception as e:  # noqa: BLE001 (Orbax and tensorstore raise several types for an I/O failure)
            raise CheckpointError(f"saving checkpoint step {step} to {target} failed: {type(e).__name__}: {e}\n"
                                  f"the previous checkpoint (step {previous}) is intact and is what --resume "
                                  "continues from; free disk space (or fix the file system) and resume") from e
        if _primary():
            for old in self.complete_steps()[: -self.keep]:  # only now that the new one is committed
                shutil.rmtree(self.directory / str(old))
        _sync(f"retention-{step}")
        self.latest.reload()

    def _verified(self, step: int | None) -> tuple[Path, int]:
        """The directory of committed checkpoint `step` (default: the latest), its files checked."""
        steps = self.complete_steps()
        step = steps[-1] if step is None and steps else step
        if step is None or step not in steps:
            raise CheckpointError(f"no complete checkpoint of step {step} in {self.directory} (complete: {steps})")
        directory = self.directory / str(step)
        if (directory / MANIFEST).is_file() or not self.legacy:
            verify(directory, step, steps)
        return directory, step

    def restore(self, abstract_state: dict, step: int | None = None) -> tuple[dict, dict]:
        """(state, meta) of `step` (default: the latest complete checkpoint), verified against its manifest
        and against the abstract state's structure, shapes and dtypes; with its shardings."""
        directory, step = self._verified(step)
        if (directory / "state").is_dir():  # written before the parameters were an item of their own
            check_structure(directory / "state", abstract_state, step)
            restored = self.latest.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            return restored.state, restored.meta
        params, rest = _split_state(abstract_state)
        check_structure(directory / "params", params, step, "params/")
        check_structure(directory / "train", rest, step)
        restored = self.latest.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(params), train=ocp.args.StandardRestore(rest),
            meta=ocp.args.JsonRestore()))
        return {"params": restored.params, **restored.train}, restored.meta

    def restore_params(self, abstract_params: dict, step: int | None = None) -> tuple[dict, int]:
        """(params, step) of `step` (default: the latest complete checkpoint), read alone and verified like
        `restore`."""
        directory, step = self._verified(step)
        if (directory / "state").is_dir():
            raise CheckpointError(
                f"checkpoint step {step} ({directory}) was written before the parameters were stored apart from the "
                "optimizer state (one `state` item), and its parameters cannot be read alone. Resume the run once "
                "(`research train ... --resume`: it reads this layout, and its next checkpoint is written in the "
                "new one), or use --checkpoint best if the run keeps one")
        check_structure(directory / "params", abstract_params, step, "params/")
        restored = self.latest.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
        return restored.params, step

    def save_best(self, step: int, params: dict, metrics: dict[str, float]) -> None:
        """Offer `params` as the best; orbax keeps whichever checkpoint scores best on `best_metric`."""
        if self.best is not None:
            self.best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
                           metrics={k: float(v) for k, v in metrics.items()}, force=True)
            kept = Path(str(self.best.directory)) / str(step)
            if _primary() and kept.is_dir():  # kept (it scored best so far)
                write_manifest(kept)
            _sync(f"best-{step}")

    def restore_best(self, abstract_params: dict) -> tuple[dict, int]:
        """(params, step) of the best checkpoint, verified like `restore`."""
        step = self.best.best_step() if self.best is not None else None
        if step is None:
            raise FileNotFoundError(f"no best checkpoint in {self.best.directory if self.best else 'best/'}")
        directory = Path(str(self.best.directory)) / str(step)
        if (directory / MANIFEST).is_file():  # best checkpoints of runs from before manifests have none
            verify(directory, step, [])
        check_structure(directory / "params", abstract_params, step, "params/")
        restored = self.best.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
        return restored.params, step

    def close(self) -> None:
        self.latest.close()
        if self.best is not None:
            self.best.close()


def _split_state(state: dict) -> tuple[dict, dict]:
    """(params, the rest of the train state): the two array items of a checkpoint."""
    return state["params"], {k: v for k, v in state.items() if k != "params"}
