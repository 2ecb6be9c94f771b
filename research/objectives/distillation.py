"""Knowledge distillation (Hinton et al. 2015): the student learns from the teacher's softened distribution
as well as from the labels.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)

per example (sequence classification) or per token (token classification), as a weighted mean like every
other loss here. T^2 keeps the soft term's gradient on the scale of the hard one's as T grows (the soft
targets' gradients shrink as 1 / T^2). With alpha = 0 it is supervised cross-entropy; with T = 1 and alpha = 1
it is cross-entropy against the teacher's probabilities, up to the teacher's (constant) entropy.

The teacher's logits come with the batch (`batch.teacher_logits`): computed once over the training split in
eval mode and cached on disk (research/compress/teacher.py). Exact, since the teacher is deterministic, and
the teacher costs nothing inside the step. With `distill.in_step` (a causal LM: a vocabulary's worth of logits
per token does not fit a cache) the frozen teacher rides in the train step's model as `model.teacher` and
computes them for each batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from research.batch import Batch
from research.config import ConfigError
from research.objectives.supervised import task_loss, weights_for


@dataclasses.dataclass(frozen=True)
class KDOptions:
    alpha: float = 0.5  # weight of the distillation term; 1 - alpha goes to cross-entropy with the labels
    temperature: float = 2.0  # softens both distributions; DistilBERT uses 2, Hinton et al. 1-20

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"objective.params.alpha={self.alpha}: a weight in [0, 1]")
        if self.temperature <= 0:
            raise ConfigError(f"objective.params.temperature={self.temperature}: must be positive")


def soft_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
    """KL(softmax(teacher / T) || softmax(student / T)) over the last axis: (..., C) -> (...)."""
    log_q = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    log_p = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    return (jnp.exp(log_p) * (log_p - log_q)).sum(-1)


def distillation_loss(logits: jax.Array, batch: Batch[str, jax.Array], options: KDOptions
                      ) -> tuple[jax.Array, dict]:
    """The weighted mean of alpha * T^2 * KL + (1 - alpha) * CE, and its two terms as metrics."""
    if batch.teacher_logits is None:
        raise ValueError("objective 'kd' needs the teacher's logits in the batch: set distill.teacher")
    if batch.teacher_logits.shape != logits.shape:
        raise ValueError(f"teacher logits {batch.teacher_logits.shape} do not match the student's {logits.shape}")
    w = weights_for(logits, batch)
    total = jnp.maximum(w.sum(), 1.0)  # an all-filler micro-batch gives 0, not NaN
    t = options.temperature
    kl = soft_kl(logits, batch.teacher_logits.astype(jnp.float32), t)  # (E,) or (B, T)
    soft = (kl * w).sum() / total
    hard, aux = task_loss(logits, batch)
    loss = options.alpha * t * t * soft + (1.0 - options.alpha) * hard
    return loss, {**aux, "kd": soft, "ce": hard}


def kd(options: KDOptions):
    """Logit distillation from the cached teacher logits of each batch."""

    def loss_fn(model: nnx.Module, batch: Batch[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        del rng  # dropout draws come from the model's own streams
        logits = model(**batch.model_inputs())
        if batch.teacher_logits is None:  # distill.in_step: the frozen teacher rides in the train model
            teacher = getattr(model, "teacher", None)
            if teacher is None:
                raise ValueError("objective 'kd' has neither cached teacher logits nor a teacher: set distill.teacher")
            batch = batch.replace(teacher_logits=jax.lax.stop_gradient(teacher(**batch.model_inputs())))
        return distillation_loss(logits, batch, options)

    return loss_fn
