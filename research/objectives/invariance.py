"""Invariance objectives over training environments: IRMv1, V-REx and Group DRO.

Each reads `batch.environment` (E,) (research/data/batches.py puts every environment in every device
shard of every micro-batch, in fixed counts) and computes the risk of each environment e as the weighted
mean cross-entropy over its examples, R_e. Then:

- **IRMv1** (Arjovsky et al. 2019, eq. IRMv1): R = mean_e R_e + lambda * mean_e ||d R_e(w * logits) / dw at
  w = 1||^2, the squared gradient of each environment's risk with respect to a dummy scale on the logits.
  `unbiased` uses the product of the two half-batch gradients instead of the square (the paper's section
  3.2 estimator, as DomainBed implements it: the environment's examples split alternately into two halves).
- **V-REx** (Krueger et al. 2021, eq. 8): R = mean_e R_e + lambda * Var_e(R_e) (population variance, as in
  the paper's code and DomainBed).
- **Group DRO** (Sagawa et al. 2020, Algorithm 1): online group weights q <- q * exp(eta * R_e), normalized;
  R = sum_e q_e R_e, with q held constant in the gradient. q is the objective's state (`StatefulObjective`),
  checkpointed with the run. With gradient accumulation each micro-batch updates q from the step's starting
  q and the step keeps their weighted mean (exact without accumulation; the paper updates q per minibatch).

IRMv1 and V-REx anneal as the papers' Colored MNIST code does: lambda is 1 before `anneal_steps` updates and
`penalty_weight` from then on, and when it exceeds 1 the whole loss is divided by it (`rescale`), which keeps
the gradient scale steady. The update count is the objective's state, so annealing switches at exactly the
configured step, also after a resume. DomainBed also resets Adam's moments at that step: set
`optim.reset_at_step` to the same value for that (research/optim.py).

Per-environment risk, accuracy and penalty land in the train metrics as `env/<name>/risk`, ...
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from research.batch import Batch
from research.objectives.state import StatefulObjective


@dataclasses.dataclass(frozen=True)
class IRMOptions:
    penalty_weight: float = 1e4  # lambda after annealing (the paper's Colored MNIST: 91257; DomainBed: 100)
    anneal_steps: int = 100  # updates with lambda = 1 first (Colored MNIST: 190; DomainBed: 500)
    rescale: bool = True  # divide the loss by lambda when lambda > 1, as the paper's code does
    unbiased: bool = False  # the two-half product estimator of the penalty (section 3.2)


@dataclasses.dataclass(frozen=True)
class VRExOptions:
    penalty_weight: float = 1e4  # beta after annealing (Krueger et al.'s Colored MNIST: 10,000)
    anneal_steps: int = 100
    rescale: bool = True


@dataclasses.dataclass(frozen=True)
class GroupDROOptions:
    eta: float = 0.01  # step size of the group weights (the paper: 0.01)


def _per_example(model: nnx.Module, batch: Batch, n_envs: int) -> tuple[jax.Array, jax.Array]:
    """Logits (E, C) and one-hot environment membership weighted by the example weights (E, n_env); the number
    of environments is static in jit."""
    logits = model(**batch.model_inputs())
    return logits, batch.weights[:, None] * jax.nn.one_hot(batch.environment, n_envs, dtype=jnp.float32)


def _risks(logits: jax.Array, labels: jax.Array, member: jax.Array) -> jax.Array:
    """Per-environment weighted mean cross-entropy (n_env,) of logits (E, C); member (E, n_env)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)  # (E,)
    return (member * losses[:, None]).sum(0) / jnp.maximum(member.sum(0), 1e-12)


def _env_metrics(names: tuple[str, ...], logits: jax.Array, labels: jax.Array, member: jax.Array,
                 risks: jax.Array, **per_env: jax.Array) -> dict[str, jax.Array]:
    correct = (logits.argmax(-1) == labels).astype(jnp.float32)
    accuracy = (member * correct[:, None]).sum(0) / jnp.maximum(member.sum(0), 1e-12)
    out = {}
    for i, name in enumerate(names):
        out[f"env/{name}/risk"] = risks[i]
        out[f"env/{name}/accuracy"] = accuracy[i]
        for key, values in per_env.items():
            out[f"env/{name}/{key}"] = values[i]
    return out


def _summary(logits: jax.Array, batch: Batch, loss: jax.Array) -> dict[str, jax.Array]:
    w = batch.weights
    correct = (logits.argmax(-1) == batch.labels).astype(jnp.float32)
    return {"accuracy": (correct * w).sum() / jnp.maximum(w.sum(), 1.0), "weight": w.sum()}


def _annealed(options, updates: jax.Array) -> jax.Array:
    """lambda: 1 for the first `anneal_steps` updates, `penalty_weight` from then on."""
    return jnp.where(updates >= options.anneal_steps, options.penalty_weight, 1.0)


def _combine(options, mean_risk: jax.Array, penalty: jax.Array, weight: jax.Array) -> jax.Array:
    loss = mean_risk + weight * penalty
    return loss / jnp.maximum(weight, 1.0) if options.rescale else loss


def _penalized(options, environments: tuple[str, ...], penalty_of) -> StatefulObjective:
    """mean_e R_e + lambda * penalty, lambda annealed after `options.anneal_steps` updates (the objective's
    state counts them). `penalty_of(logits, labels, member, risks)` -> (penalty, {name: (n_env,) values to log
    per environment})."""
    n = len(environments)

    def loss(model, batch, rng, state):
        del rng
        logits, member = _per_example(model, batch, n)
        risks = _risks(logits, batch.labels, member)
        penalty, per_env = penalty_of(logits, batch.labels, member, risks)
        weight = _annealed(options, state["updates"])
        total = _combine(options, risks.mean(), penalty, weight)
        aux = {**_summary(logits, batch, total), "penalty": penalty, "penalty_weight": weight,
               **_env_metrics(environments, logits, batch.labels, member, risks, **per_env)}
        return total, aux, {"updates": state["updates"] + 1.0}

    return StatefulObjective(loss, lambda params: {"updates": jnp.zeros((), jnp.float32)})


def irm(options: IRMOptions, environments: tuple[str, ...]) -> StatefulObjective:
    def penalty_of(logits, labels, member, risks):
        def risks_at(scale):  # (n_env,) risks of the scaled logits
            return _risks(logits * scale, labels, member)

        if options.unbiased:
            # Alternate examples of each environment go to halves a and b: rank within the environment, mod 2.
            rank = jnp.cumsum(member > 0, axis=0) - 1  # (E, n_env)
            half_a = member * (rank % 2 == 0)
            half_b = member * (rank % 2 == 1)
            grad_a = jax.jacfwd(lambda s: _risks(logits * s, labels, half_a))(1.0)
            grad_b = jax.jacfwd(lambda s: _risks(logits * s, labels, half_b))(1.0)
            penalties = grad_a * grad_b
        else:
            penalties = jax.jacfwd(risks_at)(1.0) ** 2  # (n_env,): d R_e / d scale, squared
        return penalties.mean(), {"penalty": penalties}

    return _penalized(options, environments, penalty_of)


def vrex(options: VRExOptions, environments: tuple[str, ...]) -> StatefulObjective:
    def penalty_of(logits, labels, member, risks):
        return ((risks - risks.mean()) ** 2).mean(), {}  # population variance of the risks

    return _penalized(options, environments, penalty_of)


def group_dro(options: GroupDROOptions, environments: tuple[str, ...]) -> StatefulObjective:
    n = len(environments)

    def loss(model, batch, rng, state):
        del rng
        logits, member = _per_example(model, batch, n)
        risks = _risks(logits, batch.labels, member)
        q = state["q"] * jnp.exp(options.eta * jax.lax.stop_gradient(risks))
        q = q / q.sum()
        total = (jax.lax.stop_gradient(q) * risks).sum()
        aux = {**_summary(logits, batch, total),
               **_env_metrics(environments, logits, batch.labels, member, risks, weight_q=q)}
        return total, aux, {"q": q}

    return StatefulObjective(loss, lambda params: {"q": jnp.full((n,), 1.0 / n, jnp.float32)})
