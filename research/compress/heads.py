"""Attention-head pruning by importance (Michel et al. 2019, "Are sixteen heads really better than one?").

Each head h gets a gate xi_h on its output (`BertModel(..., head_gates=...)`, all ones); its importance is the
expected absolute gradient of the loss with respect to its gate,

    I_h = E_x | dL(x) / d xi_h |,

estimated on training examples, one example at a time (the absolute value is taken per example, as in the
paper, not per batch), then normalized by each layer's l2 norm (the paper's and transformers' bertology
script's practice: it evens out layers whose gradients are larger overall). The least important heads are pruned
over the whole model until `fraction` of them are gone, never a layer's last one.

The pruned model is physically smaller: `BertConfig.pruned_heads` gives its layers fewer heads, with narrower
query, key, value and output projections (research/models/bert.py), and its logits equal the full model's with
those heads' gates at 0. Exported for transformers at the full shapes with zeros for the pruned heads (transformers
5 cannot prune heads), which computes the same; our `from_pretrained` reads the export back as the compact model.
"""

from __future__ import annotations

import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from research.batch import Batch
from research.config import ConfigError
from research.data.batches import collate
from research.data.split import Split
from research.models import from_pretrained, save_pretrained


def _check(model: nnx.Module) -> None:
    if not (hasattr(model, "bert") and hasattr(model, "cls")):
        raise ConfigError(f"head pruning works on BERT sequence classifiers; this is a {type(model).__name__}")
    if any(m.adapter is not None for _, m in nnx.iter_graph(model) if hasattr(m, "adapter")):
        raise ConfigError("head pruning of a PEFT model: export it merged (research export --merged) and prune that")


def head_importance(model: nnx.Module, split: Split, examples: int, pad_id: int, seed: int = 0,
                    batch_size: int = 32) -> list[np.ndarray]:
    """Michel et al.'s importance of every head, per layer ((nh_l,) each), from `examples` training examples
    drawn with `seed`, normalized by each layer's l2 norm."""
    _check(model)
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    gates = [jnp.ones(layer.attention.num_heads) for layer in model.bert.layers]

    def example_loss(gates, batch: Batch):  # one example, a padded row (1, T)
        m = nnx.merge(graphdef, params, rest)
        h_btd = m.bert(batch.input_ids, batch.attention_mask, batch.token_type_ids, head_gates=gates)
        logits = m.head(m.cls(h_btd))
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch.labels).sum()

    @jax.jit
    def batch_importance(gates, batch: Batch):
        one = jax.tree.map(lambda x: x[:, None], batch)  # (E, ...) -> (E, 1, ...): each example alone
        grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(gates, one)  # per layer (E, nh)
        return [jnp.abs(g * batch.weights[:, None]).sum(0) for g in grads]  # |dL/dxi| per example, summed

    order = np.random.default_rng(seed).permutation(len(split))[:examples]
    lengths = np.array([len(x) for x in split.input_ids])
    total = [np.zeros(g.shape) for g in gates]
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        weights = np.ones(len(indices), np.float32)
        if len(indices) < batch_size:  # a fixed batch shape: fillers weigh 0
            indices = np.concatenate([indices, np.repeat(indices[:1], batch_size - len(indices))])
            weights = np.concatenate([weights, np.zeros(batch_size - len(weights), np.float32)])
        batch = collate(split, indices, weights, int(lengths[indices].max()), pad_id)
        for t, g in zip(total, batch_importance(gates, jax.tree.map(jnp.asarray, batch)), strict=True):
            t += np.asarray(g)
    mean = [t / len(order) for t in total]
    return [m / max(np.linalg.norm(m), 1e-20) for m in mean]


def heads_to_prune(importance: list[np.ndarray], fraction: float, already: dict[int, tuple[int, ...]] | None = None
                   ) -> dict[int, list[int]]:
    """The least important `fraction` of all heads (original indices per layer), never a layer's last head.
    `importance[l]` covers the heads layer l still has, in order; `already` are those it had pruned before."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"fraction={fraction}: the share of heads to prune, in (0, 1)")
    already = already or {}
    original = [[h for h in range(len(imp) + len(already.get(layer, ()))) if h not in already.get(layer, ())]
                for layer, imp in enumerate(importance)]
    candidates = sorted((float(imp[i]), layer, original[layer][i])
                        for layer, imp in enumerate(importance) for i in range(len(imp)))
    budget = int(fraction * sum(len(imp) for imp in importance))
    left = [len(imp) for imp in importance]
    chosen: dict[int, list[int]] = {}
    for _, layer, head in candidates:
        if budget == 0:
            break
        if left[layer] > 1:
            chosen.setdefault(layer, []).append(head)
            left[layer] -= 1
            budget -= 1
    return {layer: sorted(hs) for layer, hs in sorted(chosen.items())}


def prune_heads(model: nnx.Module, pruned: dict[int, list[int]], task: str = "sequence_classification"
                ) -> nnx.Module:
    """A physically smaller copy of `model` without the heads `pruned` ({layer: original head indices}, added to
    any it had already), in eval mode."""
    _check(model)
    merged = {layer: sorted({*dict(model.config.pruned_heads).get(layer, ()), *pruned.get(layer, ())})
              for layer in range(model.config.num_hidden_layers)}
    with tempfile.TemporaryDirectory() as tmp:  # through the export: the same slicing a saved model gets
        save_pretrained(model, tmp)
        small = from_pretrained(tmp, task, pruned_heads=merged)
    small.hf_source = getattr(model, "hf_source", None)
    return small


def gates_for(config, pruned: dict[int, list[int]]) -> list[jax.Array]:
    """Gates (1 kept, 0 pruned) for the full model that mask `pruned`: what the pruned model computes."""
    return [jnp.asarray([0.0 if h in pruned.get(layer, ()) else 1.0 for h in config.kept_heads(layer)])
            for layer in range(config.num_hidden_layers)]
