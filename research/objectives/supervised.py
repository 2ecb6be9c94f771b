"""Supervised objectives: weighted cross-entropy on a classification or language-model head.

An objective is a pure function `loss_fn(model, batch, rng) -> (loss, aux)`. `loss` is the weighted mean over
the batch's real examples (`batch.weights`: 1 for real rows, 0 for fillers); `aux` holds scalar metrics,
each a weighted mean, plus `weight`, the weight total, so the train step can combine micro-batches exactly.

A causal LM's logits are (B, T, V) float32: 823 MB for a 16 x 256 GPT-2 batch, and as much again for their
gradient. With `lm_chunk` tokens (the default), the loss takes the model's final hidden states and computes the
output layer and the cross-entropy `lm_chunk` tokens at a time (`chunked_token_sums`), recomputing each chunk's
logits in the backward pass instead of keeping them: the same loss and gradients, a chunk's logits in memory.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from research.batch import Batch
from research.config import ConfigError


@dataclasses.dataclass(frozen=True)
class CrossEntropyOptions:
    label_smoothing: float = 0.0  # mass spread uniformly over all classes (Szegedy et al. 2016)
    # A causal LM's output layer and loss, this many tokens at a time (module docstring); 0: the full logits.
    lm_chunk: int = 1024

    def __post_init__(self):
        if self.lm_chunk < 0:
            raise ConfigError(f"objective.params.lm_chunk={self.lm_chunk}: tokens per chunk (>= 1), or 0 for the "
                              "full logits")


def chunked_token_sums(h_btd: jax.Array, embedding_vd: jax.Array, labels_bt: jax.Array, weights_bt: jax.Array,
                       chunk: int, label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """The weighted sums of the next-token cross-entropy and of correct argmax predictions, for logits
    `h @ embedding.T` computed `chunk` tokens at a time: (loss sum, correct sum), float32 scalars.

    Each chunk's body is rematerialized (`jax.checkpoint`): the backward pass recomputes its (chunk, V) logits
    rather than storing every chunk's, so memory holds one chunk's logits however long the batch."""
    B, T, D = h_btd.shape
    n = B * T
    k = -(-n // chunk)  # chunks; the last one padded with weight-0 tokens
    pad = k * chunk - n
    h_kcd = jnp.pad(h_btd.reshape(n, D).astype(embedding_vd.dtype), ((0, pad), (0, 0))).reshape(k, chunk, D)
    y_kc = jnp.pad(labels_bt.reshape(n), (0, pad)).reshape(k, chunk)
    w_kc = jnp.pad(weights_bt.reshape(n).astype(jnp.float32), (0, pad)).reshape(k, chunk)

    @jax.checkpoint
    def one_chunk(sums, xs):
        h_cd, y_c, w_c = xs
        logits_cv = jnp.dot(h_cd, embedding_vd.T).astype(jnp.float32)  # (C, D) @ (D, V), as Embed.attend
        lse_c = jax.nn.logsumexp(logits_cv, axis=-1)
        target_c = jnp.take_along_axis(logits_cv, y_c[:, None], axis=-1)[:, 0]
        # Label smoothing: targets (1 - e) one-hot + e / V, so the loss is lse - (1 - e) target - e mean(logits).
        loss_c = lse_c - (1.0 - label_smoothing) * target_c - label_smoothing * logits_cv.mean(-1)
        correct_c = (logits_cv.argmax(-1) == y_c).astype(jnp.float32)
        return (sums[0] + (loss_c * w_c).sum(), sums[1] + (correct_c * w_c).sum()), None

    zero = jnp.zeros((), jnp.float32)
    (loss_sum, correct_sum), _ = jax.lax.scan(one_chunk, (zero, zero), (h_kcd, y_kc, w_kc))
    return loss_sum, correct_sum


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
    row per example. A causal LM's, `lm_chunk` tokens at a time (module docstring)."""

    def loss_fn(model: nnx.Module, batch: Batch[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        del rng  # dropout draws come from the model's own streams, reseeded by the train step
        if options.lm_chunk and hasattr(model, "output_embedding"):  # a causal LM: no (B, T, V) logits
            h_btd = model.features(**batch.model_inputs())
            w = batch.label_weights
            loss_sum, correct_sum = chunked_token_sums(h_btd, model.output_embedding(), batch.labels, w,
                                                       options.lm_chunk, options.label_smoothing)
            total = jnp.maximum(w.sum(), 1.0)  # an all-filler micro-batch gives 0, not NaN
            return loss_sum / total, {"accuracy": correct_sum / total, "weight": w.sum()}
        return task_loss(model(**batch.model_inputs()), batch, options.label_smoothing)

    return loss_fn
