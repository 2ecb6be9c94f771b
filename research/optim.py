"""The optimizer: an optax chain built from `OptimConfig`.

    clip by global norm -> AdamW (no decay on biases and LayerNorm) -> layer-wise lr scale,
    with frozen parameters routed to `set_to_zero` by `multi_transform`.

Schedules follow `transformers.get_{linear,cosine,constant}_schedule_with_warmup`: the first update uses
step 0 of the schedule (lr 0 under warmup), warmup is `ceil(warmup_ratio * total_steps)` steps.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from research import peft
from research.compress import pruning
from research.config import ConfigError, OptimConfig, PeftConfig, PruneConfig
from research.models.families import family_of


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total_steps)


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    warm = warmup_steps(cfg, total_steps)
    after = max(total_steps - warm, 1)
    decay = {
        "linear": optax.linear_schedule(cfg.lr, 0.0, after),
        "cosine": optax.cosine_decay_schedule(cfg.lr, after),
        "constant": optax.constant_schedule(cfg.lr),
    }[cfg.schedule]
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), decay], [warm])


def path_name(path: tuple) -> str:
    """'bert/layers/0/attention/query/kernel' for a pytree path of dict keys."""
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _layer_norm_paths(model: nnx.Module) -> set[str]:
    return {path_name(p) for p, node in nnx.iter_graph(model) if isinstance(node, nnx.LayerNorm)}


def _depth(name: str, layer_container: str, embedding_modules: tuple[str, ...], n_layers: int) -> int:
    """0 for embeddings, i + 1 for transformer layer i, n_layers + 1 for everything above (pooler, heads)."""
    parts = name.split("/")
    for i, part in enumerate(parts[:-1]):
        if part == layer_container and parts[i + 1].isdigit():
            return int(parts[i + 1]) + 1
    if any(part in embedding_modules for part in parts):
        return 0
    return n_layers + 1


def _scale_by_path(factor: Callable[[str], float]) -> optax.GradientTransformation:
    """Multiply each update by factor(parameter name). optax has per-group learning rates only through
    multi_transform with one AdamW per group; a per-leaf scale after AdamW is the same update (decoupled
    decay included, as torch param groups scale it by their lr) with a single optimizer state."""

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(lambda p, u: u * factor(path_name(p)), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class ResetState(NamedTuple):
    count: jax.Array  # updates so far
    inner: optax.OptState


def reset_at(inner: optax.GradientTransformation, step: int) -> optax.GradientTransformation:
    """`inner` with its state replaced by a fresh one just before update number `step` (0-based), as if a
    new optimizer took over there. Inside jit, so the step is a traced comparison, not a Python branch."""

    def init(params):
        return ResetState(jnp.zeros((), jnp.int32), inner.init(params))

    def update(updates, state, params=None):
        fresh = inner.init(updates)  # the state's initial values depend on shapes only (Adam: zeros)
        current = jax.tree.map(lambda f, s: jnp.where(state.count == step, f, s), fresh, state.inner)
        updates, new_inner = inner.update(updates, current, params)
        return updates, ResetState(state.count + 1, new_inner)

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimConfig, model: nnx.Module, params: dict, total_steps: int,
                   peft_cfg: PeftConfig | None = None, prune_cfg: PruneConfig | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain for `params` (the pure-dict `nnx.Param` state of `model`) and its lr schedule. With AdaLoRA
    attached, its rank allocator wraps everything after the clipping (research/peft/adalora.py); with pruning,
    the pruner does (research/compress/pruning.py)."""
    schedule = make_schedule(cfg, total_steps)
    norms = _layer_norm_paths(model)

    def decays(path: tuple) -> bool:
        name = path_name(path)
        return not (name.endswith("/bias") or name.rsplit("/", 1)[0] in norms)

    clip = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm is not None else []
    chain = []
    mask = lambda tree: jax.tree_util.tree_map_with_path(lambda p, _: decays(p), tree)  # noqa: E731
    if cfg.reset_at_step is None:
        chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 mask=mask))
    else:  # optax.adamw's own three parts, with the moments in a resettable wrapper
        chain += [reset_at(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps), cfg.reset_at_step),
                  optax.add_decayed_weights(cfg.weight_decay, mask), optax.scale_by_learning_rate(schedule)]
    if cfg.layerwise_lr_decay != 1.0:
        family = family_of(model)  # which attribute holds the layers, which modules are embeddings
        n = family.num_layers(model.config)
        chain.append(_scale_by_path(lambda name: cfg.layerwise_lr_decay ** (
            n + 1 - _depth(name, family.layer_container, family.embedding_modules, n))))
    budget = peft.adalora_schedule(model, peft_cfg, total_steps) if peft_cfg is not None else None
    if budget is not None:
        chain = [peft.allocator(optax.chain(*chain), budget)]
    if prune_cfg is not None and prune_cfg.method != "none":
        names, p = list(pruning.targets(model, prune_cfg).values()), prune_cfg
        if p.method == "magnitude":
            chain = [pruning.pruner(optax.chain(*chain), names, pruning.schedule_for(p, total_steps), p.scope)]
        else:
            chain = [pruning.movement_pruner(optax.chain(*chain), names, pruning.schedule_for(p, total_steps),
                                             p.scope, p.score_lr, p.method == "soft_movement", p.threshold,
                                             p.regularization)]
    tx = optax.chain(*clip, *chain)

    if not cfg.freeze:
        return tx, schedule
    names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for pattern in cfg.freeze:
        if not any(re.fullmatch(pattern, name) for name in names):
            raise ConfigError(f"optim.freeze pattern {pattern!r} matches no parameter; names look like {names[0]!r}")

    def label(path: tuple, _) -> str:
        return "frozen" if any(re.fullmatch(p, path_name(path)) for p in cfg.freeze) else "train"

    labels = jax.tree_util.tree_map_with_path(label, params)
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels), schedule
