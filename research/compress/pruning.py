"""Unstructured pruning during fine-tuning: magnitude pruning on Zhu & Gupta's gradual schedule (2017, "To prune,
or not to prune"), and movement pruning (Sanh et al. 2020; `movement_pruner`, below).

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
    return top_masks({k: jnp.abs(w) for k, w in weights.items()}, sparsity, scope)


def top_masks(scores: dict[str, jax.Array], sparsity: jax.Array, scope: str) -> dict[str, jax.Array]:
    """True for all but the floor(sparsity * n) lowest scores (ties broken by position), per matrix or over all."""

    def keep_top(values: jax.Array) -> jax.Array:  # (n,) -> (n,) bool
        n = values.shape[0]
        rank = jnp.empty(n, jnp.int32).at[jnp.argsort(values, stable=True)].set(jnp.arange(n, dtype=jnp.int32))
        return rank >= jnp.floor(sparsity * n).astype(jnp.int32)

    if scope == "layer":
        return {k: keep_top(v.ravel()).reshape(v.shape) for k, v in scores.items()}
    flat = keep_top(jnp.concatenate([v.ravel() for v in scores.values()]))  # (sum n,)
    out, start = {}, 0
    for k, v in scores.items():
        out[k] = flat[start : start + v.size].reshape(v.shape)
        start += v.size
    return out


def _flat(tree) -> dict:
    return {"/".join(str(getattr(k, "key", k)) for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_names(names: list[str], params) -> None:
    missing = [n for n in names if n not in _flat(params)]
    if missing:
        raise ConfigError(f"prune: no trained parameter {missing[0]!r} (frozen, or not in the model)")


def pruner(inner: optax.GradientTransformation, names: list[str], schedule: Schedule, scope: str
           ) -> optax.GradientTransformation:
    """`inner`, then magnitude pruning of the parameters `names` (module docstring)."""

    def init(params):
        _check_names(names, params)
        return PruneState(jnp.zeros((), jnp.int32), {n: jnp.ones(_flat(params)[n].shape, bool) for n in names},
                          inner.init(params))

    def update(grads, state, params=None):
        updates, inner_state = inner.update(grads, state.inner, params)
        step = state.count
        updated = _flat(optax.apply_updates(params, updates))
        masks = jax.lax.cond(schedule.due(step),
                             lambda: magnitude_masks({n: updated[n] for n in names}, schedule.sparsity(step), scope),
                             lambda: state.masks)

        def land_on_zero(path, u, p):
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            return jnp.where(masks[name], u, -p) if name in masks else u

        updates = jax.tree_util.tree_map_with_path(land_on_zero, updates, params)
        return updates, PruneState(step + 1, masks, inner_state)

    return optax.GradientTransformation(init, update)


class MovementState(NamedTuple):
    count: jax.Array
    weights: dict[str, jax.Array]  # the target weights under the masks (what the masks let through is the param)
    scores: dict[str, jax.Array]  # movement scores S, one per weight
    masks: dict[str, jax.Array]  # True where the weight is kept
    score_state: optax.OptState  # Adam on the scores
    inner: optax.OptState


def movement_pruner(inner: optax.GradientTransformation, names: list[str], schedule: Schedule, scope: str,
                    score_lr: float, soft: bool = False, threshold: float = 0.0, regularization: float = 0.0
                    ) -> optax.GradientTransformation:
    """Movement pruning (Sanh et al. 2020, "Movement pruning: adaptive sparsity by fine-tuning").

    The model computes with W' = W * M(S), M keeping the top of the scores S: the fraction 1 - s_t of each
    matrix (or of all targets) on the cubic schedule (`soft=False`), or the scores above `threshold`, with
    `regularization` * mean(sigmoid(S)) pushing them down (soft movement pruning, `soft=True`). Gradients are
    straight-through: dL/dS = dL/dW' * W and dL/dW = dL/dW' * M, so scores grow for weights moving away from 0.

    The parameter the model holds is W' itself (so the forward pass, the checkpoints' params and the exports need
    nothing else), and the train step's gradient is dL/dW'. The rest lives here, in the optimizer state: W, S,
    the masks and Adam's state for S (at `score_lr`, as the paper's separate rate for the scores). Each step: the
    scores take their Adam step, the weights theirs through `inner` (AdamW and the rest) at W with the masked
    gradient, the masks are recomputed from the new scores, and the parameter lands on W_new * M_new.
    """
    score_tx = optax.adam(score_lr)

    def init(params):
        _check_names(names, params)
        flat = _flat(params)
        weights = {n: jnp.array(flat[n]) for n in names}  # copies: the step donates the state's buffers
        scores = {n: jnp.zeros_like(flat[n]) for n in names}
        masks = {n: jnp.ones(flat[n].shape, bool) for n in names}
        count = jnp.zeros((), jnp.int32)
        return MovementState(count, weights, scores, masks, score_tx.init(scores), inner.init(params))

    def update(grads, state, params=None):
        g = _flat(grads)
        score_grads = {n: g[n] * state.weights[n] for n in names}  # straight through the mask
        if soft and regularization:
            total = sum(state.scores[n].size for n in names)
            score_grads = {n: v + regularization * jax.nn.sigmoid(state.scores[n])
                           * (1 - jax.nn.sigmoid(state.scores[n])) / total for n, v in score_grads.items()}
        score_updates, score_state = score_tx.update(score_grads, state.score_state, state.scores)
        scores = optax.apply_updates(state.scores, score_updates)

        def under(path, p):  # the weights the inner optimizer steps: the targets' unmasked values
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            return state.weights[name] if name in state.weights else p

        def masked(path, gr):
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            return gr * state.masks[name] if name in state.masks else gr

        full = jax.tree_util.tree_map_with_path(under, params)
        updates, inner_state = inner.update(jax.tree_util.tree_map_with_path(masked, grads), state.inner, full)
        u = _flat(updates)
        weights = {n: state.weights[n] + u[n] for n in names}
        if soft:
            masks = {n: scores[n] > threshold for n in names}
        else:
            masks = top_masks(scores, schedule.sparsity(state.count), scope)

        def land(path, up, p):  # the parameter becomes W_new * M_new
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            return jnp.where(masks[name], weights[name], 0.0) - p if name in masks else up

        updates = jax.tree_util.tree_map_with_path(land, updates, params)
        return updates, MovementState(state.count + 1, weights, scores, masks, score_state, inner_state)

    return optax.GradientTransformation(init, update)


def masks_of(opt_state) -> dict[str, np.ndarray] | None:
    """The latest masks in an optimizer state, if it prunes."""
    kinds = (PruneState, MovementState)
    for node in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, kinds)):
        if isinstance(node, kinds):
            return {k: np.asarray(v) for k, v in node.masks.items()}
    return None


def sparsity_record(masks: dict[str, np.ndarray], names: dict[str, str]) -> dict[str, float]:
    """`prune/sparsity/<HF module name>` per matrix and `prune/sparsity` over all of them: the fraction pruned."""
    by_kernel = {kernel: module for module, kernel in names.items()}
    record = {f"prune/sparsity/{by_kernel[k]}": float(1.0 - m.mean()) for k, m in masks.items()}
    total = sum(m.size for m in masks.values())
    record["prune/sparsity"] = float(sum(m.size - m.sum() for m in masks.values()) / total)
    return record
