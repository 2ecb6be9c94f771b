"""Orbax checkpoints of the whole training state, restored against an abstract state.

    <workdir>/checkpoints/<step>/   params, optimizer state, step, RNG key + JSON meta (data position,
                                    early-stopping state): the last `keep` of them, for --resume
    <workdir>/best/<step>/          params of the best evaluation by `best_metric` (one kept)

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a run killed while
saving leaves a directory that `latest_step()` never returns: a half-written checkpoint is never resumed.
Saving is synchronous: the train step donates its state buffers, and a blocking save cannot race with that.

Where the starting weights come from, in order (see `research.train.train`): a checkpoint in the run
directory (--resume) > the pretrained checkpoint named by model.name_or_path (an exported run directory
included) > random initialization (model.init="scratch").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp


def _manager(directory: Path, **options: Any) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory.absolute(),
        options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False, **options),
    )


class Checkpoints:
    def __init__(self, workdir: Path, keep: int, best_metric: str | None = None, best_mode: str = "max"):
        self.latest = _manager(Path(workdir) / "checkpoints", max_to_keep=keep)
        self.best = None
        if best_metric is not None:
            self.best = _manager(Path(workdir) / "best", max_to_keep=1, best_fn=lambda m: m[best_metric],
                                 best_mode=best_mode)

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def save(self, step: int, state: dict, meta: dict) -> None:
        self.latest.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, abstract_state: dict, step: int | None = None) -> tuple[dict, dict]:
        """(state, meta) of `step` (default: the latest complete checkpoint), with the abstract state's
        structure, shapes, dtypes and shardings."""
        step = self.latest_step() if step is None else step
        restored = self.latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def save_best(self, step: int, params: dict, metrics: dict[str, float]) -> None:
        """Offer `params` as the best; orbax keeps whichever checkpoint scores best on `best_metric`."""
        if self.best is not None:
            self.best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
                           metrics={k: float(v) for k, v in metrics.items()}, force=True)

    def restore_best(self, abstract_params: dict) -> tuple[dict, int]:
        """(params, step) of the best checkpoint."""
        step = self.best.best_step() if self.best is not None else None
        if step is None:
            raise FileNotFoundError(f"no best checkpoint in {self.best.directory if self.best else 'best/'}")
        restored = self.best.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
        return restored.params, step

    def close(self) -> None:
        self.latest.close()
        if self.best is not None:
            self.best.close()
