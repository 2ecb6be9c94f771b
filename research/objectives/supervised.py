"""Supervised objectives: weighted cross-entropy on a sequence-classification head.

An objective is a pure function `loss_fn(model, batch, rng) -> (loss, aux)`. `loss` is the weighted mean over
the batch's real examples (`batch["weights"]`: 1 for real rows, 0 for fillers); `aux` holds scalar metrics,
each a weighted mean, plus `weight`, the weight total, so the train step can combine micro-batches exactly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from research.data.classification import model_inputs


@dataclasses.dataclass(frozen=True)
class CrossEntropyOptions:
    label_smoothing: float = 0.0  # mass spread uniformly over all classes (Szegedy et al. 2016)


def weighted_mean(values_b: jax.Array, weights_b: jax.Array) -> jax.Array:
    # Clamped so an all-filler micro-batch (possible with accumulation) gives 0, not NaN.
    return (values_b * weights_b).sum() / jnp.maximum(weights_b.sum(), 1.0)


def cross_entropy(options: CrossEntropyOptions):
    """Cross-entropy on `model(...)`'s logits (B, C) against `batch["labels"]` (B,); B counts examples, so
    a packed batch (several examples per row) gives one logit row per example."""

    def loss_fn(model: nnx.Module, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        del rng  # dropout draws come from the model's own streams, reseeded by the train step
        logits_bc = model(**model_inputs(batch))
        n_classes = logits_bc.shape[-1]
        targets_bc = optax.smooth_labels(jax.nn.one_hot(batch["labels"], n_classes), options.label_smoothing)
        losses_b = optax.softmax_cross_entropy(logits_bc, targets_bc)
        correct_b = (logits_bc.argmax(-1) == batch["labels"]).astype(jnp.float32)
        w_b = batch["weights"]
        return weighted_mean(losses_b, w_b), {"accuracy": weighted_mean(correct_b, w_b), "weight": w_b.sum()}

    return loss_fn
