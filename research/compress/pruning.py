"""Unstructured magnitude pruning on Zhu & Gupta's gradual schedule (2017, "To prune, or not to prune").

The target weights (by default every linear layer inside the transformer layers: attention and MLP, as Sanh et
al. 2020 prune BERT; not the embeddings, the pooler or the head) lose the fraction s_t of their smallest
magnitudes, with the sparsity rising on a cubic schedule from `initial` at step t0 to `final` at step t1,
masks recomputed every `frequency` steps in between and fixed after:

    s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3

Ranking is per matrix (`scope="layer"`) or over all target weights at once (`"global"`, which lets layers end
at different sparsities). Exactly floor(s_t * n) weights are pruned (ties broken by position).

The masks are optimizer state, as AdaLoRA's rank allocation is (research/peft/adalora.py): `pruner` wraps the
optimizer, and after each update it lands every masked weight on exactly 0 (the update becomes -w there). So
the masks are checkpointed and resumed with the optimizer, the forward pass needs no mask of its own (a pruned
weight is a zero weight), a pruned weight stays exactly zero for the rest of training, and the exported model is
a plain transformers checkpoint with zeros in it. Pruned weights still get gradients and Adam moments (the
wrapped optimizer is unchanged); they are simply not allowed to move.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from research.config import ConfigError, PruneConfig
from research.peft.targets import PeftError, block_linears


@dataclasses.dataclass(frozen=True)
class Schedule:
    initial: float  # s_i: the sparsity at `begin`
    final: float  # s_f: from `end` on
    begin: int  # t0: the first step whose update is masked
    end: int  # t1: the step at which the final sparsity is reached
    frequency: int  # masks recomputed at t0, t0 + frequency, ... and at t1

    def sparsity(self, step: jax.Array) -> jax.Array:
        progress = jnp.clip((step - self.begin) / max(self.end - self.begin, 1), 0.0, 1.0)
        return self.final + (self.initial - self.final) * (1.0 - progress) ** 3

    def due(self, step: jax.Array) -> jax.Array:
        """Whether step `step` (0-based count of updates before it) recomputes the masks."""
        inside = (step >= self.begin) & (step <= self.end)
        return inside & (((step - self.begin) % self.frequency == 0) | (step == self.end))


def schedule_for(cfg: PruneConfig, total_steps: int) -> Schedule:
    begin = math.floor(cfg.begin * total_steps)
    end = max(begin, math.ceil(cfg.end * total_steps) - 1)  # end=1.0: the last step prunes to the final sparsity
    return Schedule(cfg.initial_sparsity, cfg.sparsity, begin, end, cfg.frequency)


def targets(model: nnx.Module, cfg: PruneConfig) -> dict[str, str]:
    """Hugging Face module name -> our kernel's parameter name ("bert/layers/0/attention/query/kernel") of each
    pruned weight matrix. Default: every linear layer inside the transformer layers."""
    try:
        layers = block_linears(model, cfg.targets, "prune.targets")
    except PeftError as e:
        raise ConfigError(str(e)) from None
    return {name: "/".join(map(str, path)) + "/kernel" for name, path in layers.items()}


class PruneState(NamedTuple):
    count: jax.Array  # updates applied so far
    masks: dict[str, jax.Array]  # kernel name -> bool, True where the weight is kept
    inner: optax.OptState


def magnitude_masks(weights: dict[str, jax.Array], sparsity: jax.Array, scope: str) -> dict[str, jax.Array]:
    """True for the weights kept: all but the floor(sparsity * n) smallest |w|, per matrix or over all."""

    def keep_largest(magnitudes: jax.Array) -> jax.Array:  # (n,) -> (n,) bool
        n = magnitudes.shape[0]
        rank = jnp.empty(n, jnp.int32).at[jnp.argsort(magnitudes, stable=True)].set(jnp.arange(n, dtype=jnp.int32))
        return rank >= jnp.floor(sparsity * n).astype(jnp.int32)

    if scope == "layer":
        return {k: keep_largest(jnp.abs(w).ravel()).reshape(w.shape) for k, w in weights.items()}
    flat = keep_largest(jnp.concatenate([jnp.abs(w).ravel() for w in weights.values()]))  # (sum n,)
    out, start = {}, 0
    for k, w in weights.items():
        out[k] = flat[start : start + w.size].reshape(w.shape)
        start += w.size
    return out


def pruner(inner: optax.GradientTransformation, names: list[str], schedule: Schedule, scope: str
           ) -> optax.GradientTransformation:
    """`inner`, then magnitude pruning of the parameters `names` (module docstring)."""

    def flat(tree) -> dict:
        return {"/".join(str(getattr(k, "key", k)) for k in p): v
                for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}

    def init(params):
        missing = [n for n in names if n not in flat(params)]
        if missing:
            raise ConfigError(f"prune: no trained parameter {missing[0]!r} (frozen, or not in the model)")
        return PruneState(jnp.zeros((), jnp.int32), {n: jnp.ones(flat(params)[n].shape, bool) for n in names},
                          inner.init(params))

    def update(grads, state, params=None):
        updates, inner_state = inner.update(grads, state.inner, params)
        step = state.count
        updated = flat(optax.apply_updates(params, updates))
        masks = jax.lax.cond(schedule.due(step),
                             lambda: magnitude_masks({n: updated[n] for n in names}, schedule.sparsity(step), scope),
                             lambda: state.masks)

        def land_on_zero(path, u, p):
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            return jnp.where(masks[name], u, -p) if name in masks else u

        updates = jax.tree_util.tree_map_with_path(land_on_zero, updates, params)
        return updates, PruneState(step + 1, masks, inner_state)

    return optax.GradientTransformation(init, update)


def masks_of(opt_state) -> dict[str, np.ndarray] | None:
    """The latest masks in an optimizer state, if it prunes."""
    for node in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, PruneState)):
        if isinstance(node, PruneState):
            return {k: np.asarray(v) for k, v in node.masks.items()}
    return None


def sparsity_record(masks: dict[str, np.ndarray], names: dict[str, str]) -> dict[str, float]:
    """`prune/sparsity/<HF module name>` per matrix and `prune/sparsity` over all of them: the fraction pruned."""
    by_kernel = {kernel: module for module, kernel in names.items()}
    record = {f"prune/sparsity/{by_kernel[k]}": float(1.0 - m.mean()) for k, m in masks.items()}
    total = sum(m.size for m in masks.values())
    record["prune/sparsity"] = float(sum(m.size - m.sum() for m in masks.values()) / total)
    return record
