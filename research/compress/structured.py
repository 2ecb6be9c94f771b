"""Structured pruning: attention heads (Michel et al. 2019, "Are sixteen heads really better than one?") and
MLP neurons, by the same importance.

Each head h has a gate xi_h on its output and each MLP neuron a gate on its activation
(`BertModel(..., head_gates=..., neuron_gates=...)`, GPT2Model's alike, all ones); a unit's importance is the
expected absolute gradient of the loss with respect to its gate,

    I_u = E_x | dL(x) / d xi_u |,

estimated on training examples, one example at a time (the absolute value is taken per example, as in the
paper, not per batch), then normalized by each layer's l2 norm (the paper's and transformers' bertology
script's practice: it evens out layers whose gradients are larger overall). The least important units are
removed over the whole model until `fraction` of them are gone, never a layer's last one.

The loss is the task's: cross-entropy of a BERT sequence classifier's label, or a GPT-2 causal LM's mean
next-token cross-entropy over the example's tokens.

The pruned model is physically smaller: the config's `pruned_heads` / `pruned_neurons` give its layers fewer heads
(narrower query, key, value and output projections; GPT-2's fused c_attn a third each) and fewer neurons
(narrower MLP projections; research/models/pruned_units.py), and its logits equal the full model's with those
gates at 0. Exported for transformers at the full shapes with zeros for what was pruned (transformers 5 cannot
prune heads, and no version has per-layer MLP widths), which computes the same; our `from_pretrained` reads the
export back as the compact model.
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
from research.models.families import family_of
from research.objectives.supervised import chunked_token_sums

LM_CHUNK = 1024  # tokens per chunk of GPT-2's output layer in the importance loss
Pruned = dict[int, list[int]]  # layer -> original indices of its heads (or neurons)


def _check(model: nnx.Module) -> None:
    bert_classifier = hasattr(model, "bert") and hasattr(model, "cls")
    gpt2_lm = hasattr(model, "transformer") and not hasattr(model, "score")
    if not (bert_classifier or gpt2_lm):
        raise ConfigError("structured pruning works on BERT sequence classifiers and GPT-2 causal LMs; this is a "
                          f"{type(model).__name__}")
    if any(getattr(m, "adapter", None) is not None for _, m in nnx.iter_graph(model)):
        raise ConfigError("pruning a PEFT model: export it merged (research export --merged) and prune that")


def importance(model: nnx.Module, split: Split, examples: int, pad_id: int, seed: int = 0, batch_size: int = 32
               ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Michel et al.'s importance of every head and every MLP neuron, per layer ((nh_l,) and (F_l,) each), from
    `examples` training examples drawn with `seed`, each layer normalized by its l2 norm."""
    _check(model)
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    gates = gates_for(model.config)  # all ones

    def example_loss(gates, batch: Batch):  # one example, a padded row (1, T)
        m = nnx.merge(graphdef, params, rest)
        if hasattr(m, "bert"):
            h_btd = m.bert(batch.input_ids, batch.attention_mask, batch.token_type_ids, head_gates=gates[0],
                           neuron_gates=gates[1])
            return optax.softmax_cross_entropy_with_integer_labels(m.head(m.cls(h_btd)), batch.labels).sum()
        h_btd = m.transformer(batch.input_ids, batch.attention_mask, head_gates=gates[0], neuron_gates=gates[1])
        # The mean over the example's next-token labels, the output layer a chunk at a time (no (T, V) logits)
        w = batch.label_weights
        loss_sum, _ = chunked_token_sums(h_btd, m.output_embedding(), batch.labels, w, LM_CHUNK)
        return loss_sum / jnp.maximum(w.sum(), 1.0)

    @jax.jit
    def batch_importance(gates, batch: Batch):
        one = jax.tree.map(lambda x: x[:, None], batch)  # (E, ...) -> (E, 1, ...): each example alone
        grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(gates, one)  # per layer (E, units)
        return jax.tree.map(lambda g: jnp.abs(g * batch.weights[:, None]).sum(0), grads)  # |dL/dxi| per example

    order = np.random.default_rng(seed).permutation(len(split))[:examples]
    lengths = np.array([len(x) for x in split.input_ids])
    total = jax.tree.map(lambda g: np.zeros(g.shape), gates)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        weights = np.ones(len(indices), np.float32)
        if len(indices) < batch_size:  # a fixed batch shape: fillers weigh 0
            indices = np.concatenate([indices, np.repeat(indices[:1], batch_size - len(indices))])
            weights = np.concatenate([weights, np.zeros(batch_size - len(weights), np.float32)])
        batch = collate(split, indices, weights, int(lengths[indices].max()), pad_id)
        total = jax.tree.map(lambda t, g: t + np.asarray(g), total, batch_importance(gates, jax.tree.map(jnp.asarray,
                                                                                                          batch)))
    normalized = jax.tree.map(lambda t: (t / len(order)) / max(np.linalg.norm(t / len(order)), 1e-20), total)
    return normalized[0], normalized[1]


def units_to_prune(importance: list[np.ndarray], fraction: float, already: dict[int, tuple[int, ...]] | None = None
                   ) -> Pruned:
    """The least important `fraction` of all units (heads or neurons; original indices per layer), never a
    layer's last. `importance[l]` covers the units layer l still has, in order; `already` are those it had
    pruned before."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"fraction={fraction}: the share of heads or neurons to prune, in (0, 1)")
    already = already or {}
    original = [[u for u in range(len(imp) + len(already.get(layer, ()))) if u not in already.get(layer, ())]
                for layer, imp in enumerate(importance)]
    candidates = sorted((float(imp[i]), layer, original[layer][i])
                        for layer, imp in enumerate(importance) for i in range(len(imp)))
    budget = int(fraction * sum(len(imp) for imp in importance))
    left = [len(imp) for imp in importance]
    chosen: Pruned = {}
    for _, layer, unit in candidates:
        if budget == 0:
            break
        if left[layer] > 1:
            chosen.setdefault(layer, []).append(unit)
            left[layer] -= 1
            budget -= 1
    return {layer: sorted(us) for layer, us in sorted(chosen.items())}


def prune(model: nnx.Module, heads: Pruned | None = None, neurons: Pruned | None = None,
          task: str = "sequence_classification") -> nnx.Module:
    """A physically smaller copy of `model` without `heads` and `neurons` ({layer: original indices}, added to
    any it had pruned already), in eval mode."""
    _check(model)
    layers = range(family_of(model).num_layers(model.config))
    merge = lambda before, more: {layer: sorted({*dict(before).get(layer, ()), *(more or {}).get(layer, ())})  # noqa: E731
                                  for layer in layers}
    with tempfile.TemporaryDirectory() as tmp:  # through the export: the same slicing a saved model gets
        save_pretrained(model, tmp)
        small = from_pretrained(tmp, task, pruned_heads=merge(model.config.pruned_heads, heads),
                                pruned_neurons=merge(model.config.pruned_neurons, neurons))
    small.hf_source = getattr(model, "hf_source", None)
    return small


def gates_for(config, heads: Pruned | None = None, neurons: Pruned | None = None) -> tuple[list, list]:
    """Gates (1 kept, 0 pruned) over `config`'s remaining heads and neurons that mask `heads` and `neurons`:
    what the pruned model computes."""
    heads, neurons = heads or {}, neurons or {}
    layers = range(family_of(config).num_layers(config))
    return ([jnp.asarray([0.0 if h in heads.get(i, ()) else 1.0 for h in config.kept_heads(i)]) for i in layers],
            [jnp.asarray([0.0 if n in neurons.get(i, ()) else 1.0 for n in config.kept_neurons(i)]) for i in layers])


def unit_counts(config) -> tuple[int, int]:
    """(attention heads, MLP neurons) the model of `config` has, over all layers."""
    layers = range(family_of(config).num_layers(config))
    return sum(len(config.kept_heads(i)) for i in layers), sum(len(config.kept_neurons(i)) for i in layers)
