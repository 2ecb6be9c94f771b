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


# --------------------------------------------------------------------------- intermediate layers (TinyBERT)


@dataclasses.dataclass(frozen=True)
class IntermediateOptions:
    """TinyBERT's distillation (Jiao et al. 2020): hidden states and attention scores of mapped layers, plus the
    logits (as `kd`)."""

    hidden_weight: float = 1.0  # MSE between the student's hidden states and the mapped teacher layer's
    attention_weight: float = 1.0  # MSE between attention scores (before the softmax), averaged over heads
    alpha: float = 1.0  # logit distillation weight (TinyBERT's prediction layer: soft cross-entropy alone)
    temperature: float = 1.0
    # The teacher layer each student layer 1..M learns from (1-based; the embeddings map to the embeddings).
    # None: TinyBERT's uniform map, student layer m <- teacher layer m * N / M.
    layer_map: tuple[int, ...] | None = None
    # "learned": the student's hidden states pass through TinyBERT's W_h (a linear map from the student's width
    # to the teacher's, trained with the student, dropped at the end) before the MSE; "none": compared as they
    # are (equal widths only).
    projection: str = "learned"

    def __post_init__(self):
        KDOptions(self.alpha, self.temperature)  # the same checks
        if self.hidden_weight < 0 or self.attention_weight < 0:
            raise ConfigError("objective.params.hidden_weight and attention_weight must be >= 0")
        if self.projection not in ("learned", "none"):
            raise ConfigError(f"objective.params.projection={self.projection!r}: 'learned' (TinyBERT's W_h) or 'none'")


PROJECTION = "distill_projection"  # the train model's attribute holding W_h (research/train.py attaches it)


def projection_for(options: IntermediateOptions, student: nnx.Module, teacher: nnx.Module, seed: int
                   ) -> dict[str, nnx.Module]:
    """TinyBERT's W_h for `student` and `teacher` when the options ask for it: {PROJECTION: Linear(d_s -> d_t)}.
    One map shared by the embeddings and every layer, as in TinyBERT's code (`fit_dense`), initialized as BERT
    initializes a linear layer (normal, std 0.02; zero bias). It is trained beside the student but is not part
    of it: the train step keeps it in the train state, never in the model's checkpoint or export."""
    d_s, d_t = student.config.hidden_size, teacher.config.hidden_size
    h_s, h_t = student.config.num_attention_heads, teacher.config.num_attention_heads
    if options.attention_weight > 0 and h_s != h_t:
        raise ConfigError(f"objective 'tinybert': the student has {h_s} attention heads, the teacher {h_t}; "
                          "attention scores are compared head by head, so the counts must match (or set "
                          "objective.params.attention_weight=0)")
    if options.projection == "none":
        if d_s != d_t:
            raise ConfigError(f"objective 'tinybert': the student is {d_s} wide, the teacher {d_t}; with "
                              "objective.params.projection='none' hidden states are compared as they are: set "
                              "projection='learned' (TinyBERT's W_h)")
        return {}
    rngs = nnx.Rngs(jax.random.fold_in(jax.random.key(seed), 0x7B))  # a stream of its own: the model's are untouched
    return {PROJECTION: nnx.Linear(d_s, d_t, kernel_init=nnx.initializers.normal(0.02), rngs=rngs)}


def token_weights(batch: Batch[str, jax.Array]) -> jax.Array:
    """(R, T) the weight of each token's example (0 on padding and on filler examples)."""
    if batch.pool_index is None:  # padded: one example a row
        return batch.attention_mask * batch.weights[:, None]
    seg_rt = batch.segment_ids
    example_seg_e = seg_rt[batch.pool_index[:, 0], batch.pool_index[:, 1]]  # (E,) each example's segment number
    rows_r1 = jnp.arange(seg_rt.shape[0])[:, None]
    # (R, T, E): token (r, t) belongs to example e
    member_rte = (rows_r1[..., None] == batch.pool_index[:, 0]) & (seg_rt[..., None] == example_seg_e)
    return (member_rte * batch.weights).sum(-1) * (seg_rt > 0)


def layer_pairs(student_layers: int, teacher_layers: int, layer_map: tuple[int, ...] | None) -> list[tuple[int, int]]:
    """(student hidden-state index, teacher hidden-state index) for the embeddings and every student layer."""
    if layer_map is None:
        if teacher_layers % student_layers:
            raise ConfigError(f"objective.params.layer_map: the teacher's {teacher_layers} layers do not divide into "
                              f"the student's {student_layers}; name the teacher layer of each student layer")
        layer_map = tuple(m * teacher_layers // student_layers for m in range(1, student_layers + 1))
    if len(layer_map) != student_layers or not all(1 <= t <= teacher_layers for t in layer_map):
        raise ConfigError(f"objective.params.layer_map={list(layer_map)}: one teacher layer (1 to {teacher_layers}) "
                          f"for each of the student's {student_layers} layers")
    return [(0, 0), *((m, t) for m, t in enumerate(layer_map, start=1))]


def intermediate(options: IntermediateOptions):
    """TinyBERT's loss on a BERT sequence classifier, with the frozen teacher in the step (distill.in_step):

        hidden_weight * sum_m MSE(H_s^m, H_t^g(m)) + attention_weight * sum_m MSE(A_s^m, A_t^g(m)) + kd

    over real tokens (and, for the scores, pairs of tokens of the same example), hidden states m = 0 (the
    embeddings) to M, attention scores m = 1 to M."""

    def loss_fn(model: nnx.Module, batch: Batch[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        del rng
        teacher = getattr(model, "teacher", None)
        if teacher is None or not hasattr(model, "cls") or not hasattr(model, "bert"):
            raise ConfigError("objective 'tinybert' distils a BERT sequence classifier from a BERT teacher run in "
                              "the step: set model.task='sequence_classification' and distill.in_step=true")
        project = getattr(model, PROJECTION, None)
        if (project is None) != (options.projection == "none"):
            raise ConfigError("objective 'tinybert': objective.params.projection="
                              f"{options.projection!r} but the train model {'lacks' if project is None else 'has'} "
                              f"`{PROJECTION}` (attach projection_for(...) to it)")
        inputs = {k: v for k, v in batch.model_inputs().items() if k != "pool_index"}

        def run(m):
            last_btd, hidden, scores = m.bert(**inputs, output_attention_scores=True)
            return m.head(m.cls(last_btd, batch.pool_index)), hidden, scores

        logits, hidden_s, scores_s = run(model)
        t_logits, hidden_t, scores_t = jax.lax.stop_gradient(run(teacher))
        if project is not None:
            hidden_s = [project(h) for h in hidden_s]  # (B, T, d_s) -> (B, T, d_t)
        pairs = layer_pairs(len(hidden_s) - 1, len(hidden_t) - 1, options.layer_map)

        w_bt = token_weights(batch)  # (B, T)
        seg_bt = batch.segments()
        # (B, T, S): both tokens real and of the same example, weighted by the example's weight
        w_bts = (seg_bt[:, :, None] == seg_bt[:, None, :]) * (seg_bt[:, None, :] > 0) * w_bt[:, :, None]
        d = hidden_t[0].shape[-1]
        hidden_mse = sum((((hidden_s[m] - hidden_t[t]) ** 2).sum(-1) * w_bt).sum() for m, t in pairs)
        hidden_mse = hidden_mse / jnp.maximum(w_bt.sum() * d, 1.0)
        attention_mse = jnp.zeros((), jnp.float32)
        if options.attention_weight > 0:  # (with a weight of 0 the head counts may differ)
            valid = w_bts[:, None] > 0  # masked keys hold the dtype's minimum in both: compare only real pairs
            attention_mse = sum((jnp.where(valid, scores_s[m - 1] - scores_t[t - 1], 0.0) ** 2 * w_bts[:, None]).sum()
                                for m, t in pairs[1:])
            attention_mse = attention_mse / jnp.maximum(w_bts.sum() * scores_s[0].shape[1], 1.0)
        kd_loss, aux = distillation_loss(logits, batch.replace(teacher_logits=t_logits),
                                         KDOptions(options.alpha, options.temperature))
        loss = kd_loss + options.hidden_weight * hidden_mse + options.attention_weight * attention_mse
        return loss, {**aux, "hidden_mse": hidden_mse, "attention_mse": attention_mse}

    return loss_fn
