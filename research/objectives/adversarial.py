"""Adversarial objectives on the word embeddings: FGM, PGD, FreeLB, SMART (smoothness term) and VAT.

Each is a pure `loss_fn(model, batch, rng) -> (loss, aux)` like the supervised ones: the train step does not
know it runs an inner maximization. All of them follow one pattern. The word embeddings `e = model.embed(ids)`
(B, T, D) are computed once; perturbations delta (B, T, D) are found by gradient steps on the loss with
respect to delta, with the model's parameters held (`nnx.value_and_grad` over delta only); the returned loss
is a function of the parameters through `e` and the forward passes, with every delta a constant
(`stop_gradient`), so `jax.grad` of it is exactly the parameter gradient the published algorithm accumulates.

Shared rules, tested against PyTorch implementations of each paper's algorithm (tests/test_adversarial.py):
- perturbations live on real tokens only: padding positions get none (`segment_ids`/`attention_mask` == 0);
- norms are per example: L2 over all of an example's tokens and dimensions, L-inf elementwise; in packed
  rows an example is one segment, so its norm never mixes with its row's other examples;
- normalized gradient steps divide by max(norm, 1e-8), as FreeLB's reference code does;
- dropout draws differ between forward passes (each pass advances the model's dropout streams), as in the
  reference PyTorch loops.

The task loss is `supervised.task_loss`: sequence-classification logits (E, C) or token-level logits
(B, T, C) (token classification; causal LM with next-token labels). SMART and VAT compare predictions with
the symmetric / one-sided KL divergence, weighted over the same examples or positions (a regression: the
squared difference of the predictions, as SMART does for regression).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from research.batch import Batch
from research.objectives.state import StatefulObjective
from research.objectives.supervised import task_loss, weights_for

TINY = 1e-8  # the floor under a gradient norm before dividing by it (FreeLB's reference: clamp(min=1e-8))


# ------------------------------------------------------------------------------------- task loss, divergence


def kl_divergence(logits_p: jax.Array, logits_q: jax.Array, batch: Batch) -> jax.Array:
    """Weighted mean over positions of KL(p || q), p and q the softmax of the two logits. A regression's one
    output (E, 1) has no distribution: there the divergence is the squared difference of the two predictions,
    SMART's choice for regression tasks (Jiang et al. 2020, section 3.1)."""
    w = weights_for(logits_p, batch)
    if logits_p.ndim == 2 and logits_p.shape[-1] == 1:
        return (((logits_p - logits_q)[:, 0] ** 2) * w).sum() / jnp.maximum(w.sum(), 1.0)
    log_p, log_q = jax.nn.log_softmax(logits_p, -1), jax.nn.log_softmax(logits_q, -1)
    kl = (jnp.exp(log_p) * (log_p - log_q)).sum(-1)
    return (kl * w).sum() / jnp.maximum(w.sum(), 1.0)


def symmetric_kl(logits_p: jax.Array, logits_q: jax.Array, batch: Batch) -> jax.Array:
    """KL(p || q) + KL(q || p); for a regression, the squared difference (already symmetric), once."""
    if logits_p.ndim == 2 and logits_p.shape[-1] == 1:
        return kl_divergence(logits_p, logits_q, batch)
    return kl_divergence(logits_p, logits_q, batch) + kl_divergence(logits_q, logits_p, batch)


# ------------------------------------------------------------------------------------- per-example geometry


def token_mask(batch: Batch) -> jax.Array:
    """(B, T, 1): 1 on real tokens, 0 on padding."""
    return (batch.segments() > 0).astype(jnp.float32)[..., None]


def example_norm(x_btd: jax.Array, batch: Batch) -> jax.Array:
    """(B, T, 1): at every token, the L2 norm of x over all tokens and dimensions of that token's example."""
    seg_bt = batch.segments()
    onehot_bts = jax.nn.one_hot(seg_bt, seg_bt.shape[1] + 1)  # (B, T) -> (B, T, S): example number, 0..T
    sq_bt = (x_btd.astype(jnp.float32) ** 2).sum(-1)
    sq_bs = jnp.einsum("bt,bts->bs", sq_bt, onehot_bts)  # per (row, example)
    return jnp.sqrt(jnp.einsum("bs,bts->bt", sq_bs, onehot_bts))[..., None]  # back to its tokens


def example_max_abs(x_btd: jax.Array, batch: Batch) -> jax.Array:
    """(B, T, 1): at every token, max |x| over all tokens and dimensions of that token's example."""
    seg_bt = batch.segments()
    onehot_bts = jax.nn.one_hot(seg_bt, seg_bt.shape[1] + 1, dtype=bool)  # (B, T) -> (B, T, S)
    m_bt = jnp.abs(x_btd.astype(jnp.float32)).max(-1)
    m_bs = jnp.where(onehot_bts, m_bt[..., None], 0.0).max(1)  # per (row, example)
    return jnp.where(onehot_bts, m_bs[:, None, :], 0.0).max(-1)[..., None]  # back to its tokens


def example_lengths(batch: Batch) -> jax.Array:
    """(B, T, 1): at every token, the number of real tokens of its example."""
    return example_norm(token_mask(batch), batch) ** 2


def normalize(g_btd: jax.Array, batch: Batch, norm: Literal["l2", "linf"]) -> jax.Array:
    """The steepest-ascent direction of unit size: g / ||g|| per example (L2), or sign(g) (L-inf)."""
    if norm == "l2":
        return g_btd / jnp.maximum(example_norm(g_btd, batch), TINY) * token_mask(batch)
    return jnp.sign(g_btd) * token_mask(batch)


def project(delta_btd: jax.Array, batch: Batch, epsilon: float | None, norm: Literal["l2", "linf"]) -> jax.Array:
    """delta moved into the epsilon ball of its example (unchanged inside it); epsilon None: no bound."""
    if epsilon is None:
        return delta_btd
    if norm == "l2":
        n = example_norm(delta_btd, batch)
        return delta_btd * jnp.where(n > epsilon, epsilon / jnp.maximum(n, TINY), 1.0)
    return jnp.clip(delta_btd, -epsilon, epsilon)


# ------------------------------------------------------------------------------------------- forward passes


def embedded(model: nnx.Module, batch: Batch) -> tuple[jax.Array, dict]:
    """The word embeddings (B, T, D) and the model's other inputs."""
    inputs = batch.model_inputs()
    return model.embed(inputs.pop("input_ids")), inputs


def logits_at(model: nnx.Module, embeds: jax.Array, inputs: dict) -> jax.Array:
    return model(inputs_embeds=embeds, **inputs)


def attack_loss(model: nnx.Module, inputs: dict, batch: Batch, label_smoothing: float):
    """The task loss (and aux) as a function of the model and the input embeddings."""
    return lambda m, x: task_loss(logits_at(m, x, inputs), batch, label_smoothing)


def delta_grad(model: nnx.Module, objective, embeds: jax.Array, delta: jax.Array):
    """((loss, aux), d loss / d delta) for `objective(model, embeds + delta)`, from one forward and one backward.

    `nnx.value_and_grad` over delta only: the model's dropout streams advance (a fresh mask per pass) without
    their state crossing a JAX transform by hand. The loss stays a differentiable function of the parameters
    (and of `embeds`) for the train step's outer gradient, so a step that needs both the loss and the delta
    gradient (FreeLB, FGM's clean pass) pays for one forward, as the reference PyTorch loops do; where only the
    delta gradient is used, the outer derivative of the unused loss is dead code that XLA removes."""
    return nnx.value_and_grad(lambda m, d: objective(m, embeds + d), argnums=1, has_aux=True)(model, delta)


# ----------------------------------------------------------------------------------------------- objectives


@dataclasses.dataclass(frozen=True)
class FGMOptions:
    """Miyato et al. 2017: one normalized gradient step of size epsilon; loss = clean + adversarial.
    (The paper uses epsilon 5.0 on unit-normalized word vectors; BERT's embeddings are not normalized, and
    1.0 per example is the common choice for BERT fine-tuning.)"""

    epsilon: float = 1.0
    norm: Literal["l2", "linf"] = "l2"
    adversarial_weight: float = 1.0  # the adversarial term's weight (the paper: 1)
    label_smoothing: float = 0.0


def fgm(options: FGMOptions):
    o = options

    def loss_fn(model: nnx.Module, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict]:
        del rng
        embeds, inputs = embedded(model, batch)
        (clean, aux), g = delta_grad(model, attack_loss(model, inputs, batch, o.label_smoothing), embeds,
                                      jnp.zeros_like(embeds))
        delta = jax.lax.stop_gradient(o.epsilon * normalize(g, batch, o.norm))
        adversarial, adv_aux = task_loss(logits_at(model, embeds + delta, inputs), batch, o.label_smoothing)
        aux.update(clean_loss=clean, adversarial_loss=adversarial, **_prefixed(adv_aux, "adversarial_"),
                   **_norm_stats(delta, batch, o.norm))
        return clean + o.adversarial_weight * adversarial, aux

    return loss_fn


@dataclasses.dataclass(frozen=True)
class PGDOptions:
    """Madry et al. 2018 on word embeddings: K projected ascent steps of size alpha in the epsilon ball,
    optionally from a uniform random start in the ball; trains on the final perturbation (Madry's min-max)
    or, with clean_weight > 0, on clean_weight * clean + adversarial (the common NLP variant)."""

    epsilon: float = 1.0
    alpha: float = 0.3
    steps: int = 3
    norm: Literal["l2", "linf"] = "l2"
    random_start: bool = False
    clean_weight: float = 0.0
    label_smoothing: float = 0.0


def random_start(rng: jax.Array, embeds: jax.Array, batch: Batch, epsilon: float,
                 norm: Literal["l2", "linf"]) -> jax.Array:
    """Uniform in [-1, 1]^(T x D) scaled into the ball: L-inf, times epsilon; L2, rescaled so the example's
    norm is epsilon * u with u ~ U(0, 1) (a point strictly inside the ball, direction from the cube)."""
    noise = jax.random.uniform(rng, embeds.shape, jnp.float32, -1.0, 1.0) * token_mask(batch)
    if norm == "linf":
        return epsilon * noise
    u = jax.random.uniform(jax.random.fold_in(rng, 1), embeds.shape[:1] + (1, 1))
    return noise / jnp.maximum(example_norm(noise, batch), TINY) * epsilon * u


def pgd(options: PGDOptions):
    o = options

    def loss_fn(model: nnx.Module, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict]:
        embeds, inputs = embedded(model, batch)
        attack = attack_loss(model, inputs, batch, o.label_smoothing)
        delta = random_start(rng, embeds, batch, o.epsilon, o.norm) if o.random_start else jnp.zeros_like(embeds)
        losses = []
        for _ in range(o.steps):
            (value, _), g = delta_grad(model, attack, jax.lax.stop_gradient(embeds), delta)
            losses.append(value)
            delta = project(delta + o.alpha * normalize(g, batch, o.norm), batch, o.epsilon, o.norm)
        delta = jax.lax.stop_gradient(delta)
        adversarial, aux = task_loss(logits_at(model, embeds + delta, inputs), batch, o.label_smoothing)
        task_metrics = _prefixed(aux, "adversarial_")  # the adversarial batch's accuracy (or mse), before the rest
        loss = adversarial
        aux.update(adversarial_loss=adversarial, first_step_loss=losses[0] if losses else adversarial,
                   **_norm_stats(delta, batch, o.norm))
        if o.clean_weight > 0:
            clean, clean_aux = task_loss(logits_at(model, embeds, inputs), batch, o.label_smoothing)
            loss = o.clean_weight * clean + adversarial
            aux.update(clean_loss=clean, **task_metrics, **_prefixed(clean_aux, ""))
        return loss, aux

    return loss_fn


@dataclasses.dataclass(frozen=True)
class FreeLBOptions:
    """Zhu et al. 2020 (FreeLB): K ascent steps; the parameter gradient is the mean of the K steps' gradients
    (the loss here is the mean of the K losses, each at its own constant delta). delta starts uniform in
    [-1, 1] on real tokens, scaled by init_magnitude / sqrt(tokens x D) per example (the reference code's
    "l2" init); each step adds alpha * g / ||g|| and projects onto the epsilon ball (epsilon None: unbounded,
    the reference's GLUE setting, its max_norm 0). Defaults: the paper's BERT-base GLUE values (K 3, alpha
    0.1, init 0.1)."""

    steps: int = 3
    alpha: float = 0.1
    init_magnitude: float = 0.1
    epsilon: float | None = None
    norm: Literal["l2", "linf"] = "l2"
    label_smoothing: float = 0.0


def freelb_init(rng: jax.Array, embeds: jax.Array, batch: Batch, init_magnitude: float) -> jax.Array:
    noise = jax.random.uniform(rng, embeds.shape, jnp.float32, -1.0, 1.0) * token_mask(batch)
    dims = jnp.maximum(example_lengths(batch), 1.0) * embeds.shape[-1]
    return noise * init_magnitude / jnp.sqrt(dims)


def freelb(options: FreeLBOptions):
    o = options

    def loss_fn(model: nnx.Module, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict]:
        embeds, inputs = embedded(model, batch)
        delta = freelb_init(rng, embeds, batch, o.init_magnitude) if o.init_magnitude > 0 else jnp.zeros_like(embeds)
        delta = project(delta, batch, o.epsilon, o.norm)
        attack = attack_loss(model, inputs, batch, o.label_smoothing)
        total, losses, auxes = 0.0, [], []
        for k in range(o.steps):
            # One pass per step gives the step's loss (its parameter gradient joins the mean) and the
            # delta gradient for the next ascent step; delta itself is a constant for the parameters.
            (loss_k, aux_k), g = delta_grad(model, attack, embeds, jax.lax.stop_gradient(delta))
            losses.append(loss_k)
            auxes.append(aux_k)
            total = total + loss_k / o.steps
            if k + 1 < o.steps:  # the last step's ascent would move a delta that is never used
                delta = project(delta + o.alpha * normalize(g, batch, o.norm), batch, o.epsilon, o.norm)
        aux = auxes[0]  # accuracy at the first (smallest) perturbation
        aux.update(first_step_loss=losses[0], last_step_loss=losses[-1],
                   **_norm_stats(delta, batch, o.norm))
        return total, aux

    return loss_fn


@dataclasses.dataclass(frozen=True)
class SMARTOptions:
    """Jiang et al. 2020 (SMART), the smoothness-inducing adversarial regularizer: loss = task(x) +
    lambda_s * symKL(f(x), f(x~)), with x~ = x + noise ~ N(0, noise_std^2) moved by `steps` ascent steps
    x~ += step_size * g / ||g||_inf (per example) on symKL(f(x) held, f(x~)), projected onto the L-inf ball of
    radius epsilon. Defaults: the paper's and mt-dnn's (lambda_s 1, epsilon 1e-5, noise 1e-5, step 1e-3, 1
    step).

    With mu > 0 (the paper's mu 1, beta 0.99) it adds the Bregman proximal-point term of the paper's
    Algorithm 1, mu * symKL(f(x; theta), f(x; theta~)), where theta~ is a momentum (mean-teacher) copy of
    the parameters, theta~ <- (1 - beta) theta + beta theta~ before every step (theta~ starts at the
    pretrained weights, and holds no gradient). The teacher predicts without dropout. mt-dnn's public SMART
    code implements the smoothness term only; the proximal-point update is ours, written from the paper."""

    lambda_s: float = 1.0
    epsilon: float = 1e-5
    noise_std: float = 1e-5
    step_size: float = 1e-3
    steps: int = 1
    mu: float = 1.0
    beta: float = 0.99
    label_smoothing: float = 0.0


def smart(options: SMARTOptions):
    o = options
    smoothness_fn = _smart_smoothness(o)
    if o.mu == 0:
        return smoothness_fn

    def init_state(params: dict) -> dict:
        return jax.tree.map(jnp.copy, params)  # theta~_1 = theta_0

    def loss_with_teacher(model: nnx.Module, batch: Batch, rng: jax.Array, teacher: dict):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        current = nnx.to_pure_dict(params)
        teacher = jax.tree.map(lambda c, t: (1 - o.beta) * jax.lax.stop_gradient(c).astype(t.dtype) + o.beta * t,
                               current, teacher)
        teacher_params = jax.tree.map(lambda x: x, params)  # same structure, values replaced below
        nnx.replace_by_pure_dict(teacher_params, jax.tree.map(lambda t, c: t.astype(c.dtype), teacher, current))
        teacher_model = nnx.merge(graphdef, teacher_params, jax.tree.map(lambda x: x, rest))
        teacher_model.eval()
        loss, aux, logits = smoothness_fn(model, batch, rng, return_logits=True)
        embeds, inputs = embedded(teacher_model, batch)
        teacher_logits = jax.lax.stop_gradient(logits_at(teacher_model, embeds, inputs))
        bregman = symmetric_kl(logits, teacher_logits, batch)
        aux["bregman"] = bregman
        return loss + o.mu * bregman, aux, teacher

    return StatefulObjective(loss=loss_with_teacher, init_state=init_state)


def _smart_smoothness(o: SMARTOptions):
    def loss_fn(model: nnx.Module, batch: Batch, rng: jax.Array, return_logits: bool = False):
        embeds, inputs = embedded(model, batch)
        clean_logits = logits_at(model, embeds, inputs)
        task, aux = task_loss(clean_logits, batch, o.label_smoothing)
        held = jax.lax.stop_gradient(clean_logits)
        divergence = lambda m, x: (symmetric_kl(held, logits_at(m, x, inputs), batch), {})  # noqa: E731
        delta = o.noise_std * jax.random.normal(rng, embeds.shape) * token_mask(batch)
        first = None
        for _ in range(o.steps):
            (value, _), g = delta_grad(model, divergence, jax.lax.stop_gradient(embeds), delta)
            first = value if first is None else first
            step = g / jnp.maximum(example_max_abs(g, batch), TINY) * token_mask(batch)
            delta = project(delta + o.step_size * step, batch, o.epsilon, "linf")
        delta = jax.lax.stop_gradient(delta)
        # Both predictions depend on the parameters here (the regularizer smooths f around x).
        smoothness = symmetric_kl(clean_logits, logits_at(model, embeds + delta, inputs), batch)
        aux.update(task_loss=task, smoothness=smoothness, **_norm_stats(delta, batch, "linf"))
        if first is not None:
            aux["first_step_smoothness"] = first
        loss = task + o.lambda_s * smoothness
        return (loss, aux, clean_logits) if return_logits else (loss, aux)

    return loss_fn


@dataclasses.dataclass(frozen=True)
class VATOptions:
    """Miyato et al. 2018 (virtual adversarial training): loss = supervised_weight * task + alpha *
    KL(p(x) held || p(x + r)), r = epsilon * g / ||g|| found by power iteration from a random unit direction
    scaled by xi. Labels enter only the task term: supervised_weight 0 trains on unlabeled text. (The paper:
    xi 1e-6, one power iteration, alpha 1; its epsilon 5.0 is for unit-normalized word vectors, 1.0 here.)"""

    epsilon: float = 1.0
    xi: float = 1e-6
    power_iterations: int = 1
    alpha: float = 1.0
    supervised_weight: float = 1.0
    label_smoothing: float = 0.0


def vat(options: VATOptions):
    o = options

    def loss_fn(model: nnx.Module, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict]:
        embeds, inputs = embedded(model, batch)
        clean_logits = logits_at(model, embeds, inputs)
        task, aux = task_loss(clean_logits, batch, o.label_smoothing)
        held = jax.lax.stop_gradient(clean_logits)
        divergence = lambda m, x: (kl_divergence(held, logits_at(m, x, inputs), batch), {})  # noqa: E731
        d = normalize(jax.random.normal(rng, embeds.shape), batch, "l2")
        for _ in range(o.power_iterations):
            _, g = delta_grad(model, divergence, jax.lax.stop_gradient(embeds), o.xi * d)
            d = normalize(g, batch, "l2")
        r = jax.lax.stop_gradient(o.epsilon * d)
        smoothness = kl_divergence(held, logits_at(model, embeds + r, inputs), batch)
        aux.update(task_loss=task, vat_loss=smoothness, **_norm_stats(r, batch, "l2"))
        return o.supervised_weight * task + o.alpha * smoothness, aux

    return loss_fn


def _prefixed(aux: dict, prefix: str) -> dict:
    """A task loss's metrics (accuracy, or a regression's mse) under `prefix`, without its weight total."""
    return {prefix + k: v for k, v in aux.items() if k != "weight"}


def _norm_stats(delta: jax.Array, batch: Batch, norm: Literal["l2", "linf"]) -> dict[str, jax.Array]:
    """Logged diagnostics: the weighted mean over examples of ||delta|| (L2) or max |delta| (L-inf), and the
    largest over the batch (which never exceeds epsilon where there is one; with gradient accumulation the
    train step logs the mean of the micro-batches' largest)."""
    per_token = example_norm(delta, batch)[..., 0] if norm == "l2" else example_max_abs(delta, batch)[..., 0]
    mask = token_mask(batch)[..., 0]
    share = mask / jnp.maximum(example_lengths(batch)[..., 0], 1.0)  # each example's tokens sum to 1
    mean = (per_token * share).sum() / jnp.maximum(share.sum(), 1.0)
    return {"delta_norm": mean, "delta_max_norm": (per_token * mask).max()}
