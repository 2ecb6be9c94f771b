"""Supervised objectives: weighted cross-entropy on a sequence-classification head.

An objective is a pure function `loss_fn(model, batch, rng) -> (loss, aux)`. `loss` is the weighted mean over
the batch's real examples (`batch.weights`: 1 for real rows, 0 for fillers); `aux` holds scalar metrics,
each a weighted mean, plus `weight`, the weight total, so the train step can combine micro-batches exactly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from research.batch import Batch


@dataclasses.dataclass(frozen=True)
class CrossEntropyOptions:
    label_smoothing: float = 0.0  # mass spread uniformly over all classes (Szegedy et al. 2016)


def weights_for(logits: jax.Array, batch: Batch[str, jax.Array]) -> jax.Array:
    """Weights aligned with the logits' leading axes: (E,) per example, or (B, T) per token (`label_weights`)."""
    return batch.weights if logits.ndim == 2 else batch.label_weights


def task_loss(logits: jax.Array, batch: Batch[str, jax.Array], label_smoothing: float = 0.0
              ) -> tuple[jax.Array, dict]:
    """Weighted mean cross-entropy and accuracy of `logits` against `batch.labels`.

    Sequence classification: logits (E, C), labels and `weights` (E,). Token level (token classification,
    causal LM with next-token labels): logits (B, T, C), labels and `label_weights` (B, T). `aux["weight"]` is
    the weight total, so the train step can combine micro-batches exactly."""
    w = weights_for(logits, batch)
    if label_smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(batch.labels, logits.shape[-1]), label_smoothing)
        losses = optax.softmax_cross_entropy(logits, targets)
    else:  # no (B, T, C) one-hot: for GPT-2's 50,257 classes that is an 823 MB array per 16 x 256 batch
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch.labels)
    correct = (logits.argmax(-1) == batch.labels).astype(jnp.float32)
    total = jnp.maximum(w.sum(), 1.0)  # an all-filler micro-batch gives 0, not NaN
    return (losses * w).sum() / total, {"accuracy": (correct * w).sum() / total, "weight": w.sum()}


def cross_entropy(options: CrossEntropyOptions):
    """Cross-entropy on `model(...)`'s logits; a packed batch (several examples per row) gives one logit
    row per example."""

    def loss_fn(model: nnx.Module, batch: Batch[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        del rng  # dropout draws come from the model's own streams, reseeded by the train step
        return task_loss(model(**batch.model_inputs()), batch, options.label_smoothing)

    return loss_fn
