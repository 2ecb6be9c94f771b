"""Supervised objectives: weighted cross-entropy on a classification or language-model head (mean-squared
error on a regression head).

An objective is a pure function `loss_fn(model, batch, rng) -> (loss, aux)`. `loss` is the weighted mean over
the batch's real examples (`batch.weights`: 1 for real rows, 0 for fillers); `aux` holds scalar metrics,
each a weighted mean, plus `weight`, the weight total, so the train step can combine micro-batches exactly.

A causal LM's logits are (B, T, V) float32: 823 MB for a 16 x 256 GPT-2 batch, and as much again for their
gradient. With `lm_chunk` tokens (the default), the loss takes the model's final hidden states and computes the
output layer, the cross-entropy and its gradient `lm_chunk` tokens at a time (`chunked_token_sums`): the same
loss and gradients, the same work, one chunk's logits in memory.
"""

from __future__ import annotations

import dataclasses
import functools

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
    `h @ embedding.T` computed at most `chunk` tokens at a time: (loss sum, correct sum), float32 scalars.

    The gradient is computed with the loss, chunk by chunk (a fused linear cross-entropy): the loss is linear in
    its cotangent, so each chunk's d loss / d logits = w (softmax - target) gives its share of the gradients
    of `h` and of the embedding at once, and the backward pass only scales them. No chunk's (chunk, V) logits
    outlive it, and nothing is computed twice (rematerializing the chunks would redo the output layer, the
    largest matmul of a small GPT-2)."""
    B, T, D = h_btd.shape
    n = B * T
    k = -(-n // chunk)  # chunks, as even as they come: the last padded with fewer than k weight-0 tokens
    c = -(-n // k)
    pad = k * c - n
    h_kcd = jnp.pad(h_btd.reshape(n, D).astype(embedding_vd.dtype), ((0, pad), (0, 0))).reshape(k, c, D)
    y_kc = jnp.pad(labels_bt.reshape(n), (0, pad)).reshape(k, c)
    w_kc = jnp.pad(weights_bt.reshape(n).astype(jnp.float32), (0, pad)).reshape(k, c)
    loss_sum, correct_sum = _fused_sums(h_kcd, embedding_vd, y_kc, w_kc, label_smoothing)
    return loss_sum, correct_sum


def _chunk_terms(h_cd, embedding_vd, y_c, w_c, label_smoothing):
    """One chunk: its loss sum, correct sum, and d loss_sum / d logits (C, V) float32."""
    logits_cv = jnp.dot(h_cd, embedding_vd.T).astype(jnp.float32)  # (C, D) @ (D, V), as Embed.attend
    lse_c = jax.nn.logsumexp(logits_cv, axis=-1)
    target_c = jnp.take_along_axis(logits_cv, y_c[:, None], axis=-1)[:, 0]
    # Label smoothing: targets (1 - e) one-hot + e / V, so the loss is lse - (1 - e) target - e mean(logits).
    loss_c = lse_c - (1.0 - label_smoothing) * target_c - label_smoothing * logits_cv.mean(-1)
    correct_c = (logits_cv.argmax(-1) == y_c).astype(jnp.float32)
    V = logits_cv.shape[-1]
    targets_cv = (1.0 - label_smoothing) * jax.nn.one_hot(y_c, V) + label_smoothing / V
    dlogits_cv = (jnp.exp(logits_cv - lse_c[:, None]) - targets_cv) * w_c[:, None]
    return (loss_c * w_c).sum(), (correct_c * w_c).sum(), dlogits_cv


def _sums(h_kcd, embedding_vd, y_kc, w_kc, label_smoothing):
    """Scan the chunks for the two sums alone (no gradient asked: evaluation)."""

    def one_chunk(carry, xs):
        h_cd, y_c, w_c = xs
        loss_c, correct_c, _ = _chunk_terms(h_cd, embedding_vd, y_c, w_c, label_smoothing)  # XLA drops the rest
        return (carry[0] + loss_c, carry[1] + correct_c), None

    zero = jnp.zeros((), jnp.float32)
    return jax.lax.scan(one_chunk, (zero, zero), (h_kcd, y_kc, w_kc))[0]


def _forward(h_kcd, embedding_vd, y_kc, w_kc, label_smoothing):
    """Scan the chunks: the two sums, and the gradients of the loss sum for h (k, C, D) and the embedding."""

    def one_chunk(carry, xs):
        loss, correct, d_embedding_vd = carry
        h_cd, y_c, w_c = xs
        loss_c, correct_c, dlogits_cv = _chunk_terms(h_cd, embedding_vd, y_c, w_c, label_smoothing)
        dlogits_cv = dlogits_cv.astype(h_cd.dtype)  # as autodiff casts the cotangent of a low-precision matmul
        dh_cd = jnp.dot(dlogits_cv, embedding_vd)  # (C, V) @ (V, D)
        d_embedding_vd = d_embedding_vd + jnp.dot(dlogits_cv.T, h_cd).astype(jnp.float32)  # (V, C) @ (C, D)
        return (loss + loss_c, correct + correct_c, d_embedding_vd), dh_cd

    zero = jnp.zeros((), jnp.float32)
    init = (zero, zero, jnp.zeros(embedding_vd.shape, jnp.float32))
    (loss, correct, d_embedding_vd), dh_kcd = jax.lax.scan(one_chunk, init, (h_kcd, y_kc, w_kc))
    return (loss, correct), (dh_kcd, d_embedding_vd.astype(embedding_vd.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_sums(h_kcd, embedding_vd, y_kc, w_kc, label_smoothing):
    return _sums(h_kcd, embedding_vd, y_kc, w_kc, label_smoothing)


def _fused_sums_bwd(label_smoothing, grads, cotangents):
    del label_smoothing
    dh_kcd, d_embedding_vd = grads
    g = cotangents[0]  # the correct-prediction count has no gradient
    return (g * dh_kcd).astype(dh_kcd.dtype), (g * d_embedding_vd).astype(d_embedding_vd.dtype), None, None


_fused_sums.defvjp(_forward, _fused_sums_bwd)  # the forward keeps the gradients


def weights_for(logits: jax.Array, batch: Batch[str, jax.Array]) -> jax.Array:
    """Weights aligned with the logits' leading axes: (E,) per example, or (B, T) per token (`label_weights`)."""
    return batch.weights if logits.ndim == 2 else batch.label_weights


def task_loss(logits: jax.Array, batch: Batch[str, jax.Array], label_smoothing: float = 0.0
              ) -> tuple[jax.Array, dict]:
    """Weighted mean cross-entropy and accuracy of `logits` against `batch.labels`, or for regression (float
    labels) the weighted mean squared error of the one output, as transformers' `problem_type="regression"`.

    Sequence classification: logits (E, C), labels and `weights` (E,). Regression: logits (E, 1), labels (E,)
    float. Token level (token classification, causal LM with next-token labels): logits (B, T, C), labels and
    `label_weights` (B, T). `aux["weight"]` is the weight total, so the train step can combine micro-batches
    exactly."""
    w = weights_for(logits, batch)
    total = jnp.maximum(w.sum(), 1.0)  # an all-filler micro-batch gives 0, not NaN
    if jnp.issubdtype(batch.labels.dtype, jnp.floating):
        if logits.shape[-1] != 1 or logits.ndim != 2:
            raise ValueError(f"float labels are regression targets, which take logits (E, 1); got {logits.shape}")
        if label_smoothing:
            raise ValueError("label smoothing spreads probability over classes: a regression has none (set "
                             "objective.params.label_smoothing=0)")
        squared = (logits[:, 0].astype(jnp.float32) - batch.labels) ** 2  # (E,)
        mse = (squared * w).sum() / total
        return mse, {"mse": mse, "weight": w.sum()}
    if label_smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(batch.labels, logits.shape[-1]), label_smoothing)
        losses = optax.softmax_cross_entropy(logits, targets)
    else:  # no (B, T, C) one-hot: for GPT-2's 50,257 classes that is an 823 MB array per 16 x 256 batch
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch.labels)
    correct = (logits.argmax(-1) == batch.labels).astype(jnp.float32)
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
