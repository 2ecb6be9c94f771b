"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form, whose rank budget moves to the matrices that matter.

    y = x W + b + (alpha / (r + 1e-5)) * dropout(x) (A * e) B,      A (D, r), e (r,), B (r, F),

A and B start from N(0, 0.02), e ("the singular values") from zeros, r is the initial rank; a regularizer pulls
A and B towards orthogonality (`penalty`: ||A^T A - I||_F and ||B B^T - I||_F averaged over the matrices,
times `orth_reg_weight`, added to the loss by the train step). Every `delta_t` steps between `tinit` and
`total - tfinal`, the budget (initial rank x matrices, falling on a cubic schedule to target rank x matrices)
decides which (A column, e entry, B row) triplets live: each is scored by the smoothed sensitivity |p * g| of
its entries times its uncertainty (exponential moving averages, `beta1`, `beta2`), and the e entries of the
lowest-scored triplets are set to zero. At `total - tfinal` the last allocation is fixed and re-applied after
every later step.

This is peft's `RankAllocator` (tests/test_peft.py checks the ranks kept per matrix at every step against it),
written as an optax transformation (`allocator`) around the rest of the optimizer: it sees the clipped
gradients and the updated parameters, which is where peft's `update_and_allocate` runs (after the optimizer
step, before the gradients are zeroed).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from research.models.linear import Linear
from research.peft.lora import LowRankUpdate


class AdaLoRA(LowRankUpdate):
    def __init__(self, layer: Linear, rank: int, alpha: float, dropout: float, orth_reg_weight: float, *,
                 rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.lora_a = nnx.Param(init(rngs.params(), (layer.in_features, rank), jnp.float32))
        self.lora_e = nnx.Param(jnp.zeros((rank,), jnp.float32))
        self.lora_b = nnx.Param(init(rngs.params(), (rank, layer.out_features), jnp.float32))
        self.scaling = alpha / (rank + 1e-5)  # peft: lora_alpha / (ranknum + 1e-5), ranknum the initial rank
        self.orth_reg_weight = orth_reg_weight
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.merged = False

    def __call__(self, layer: Linear, x_nd: jax.Array) -> jax.Array:
        y_nf = layer.base(x_nd)
        if self.merged:
            return y_nf
        dtype = y_nf.dtype
        ae_dr = (self.lora_a[...] * self.lora_e[...][None, :]).astype(dtype)  # (D, r) * (1, r)
        update_nf = self.dropout(x_nd).astype(dtype) @ ae_dr @ self.lora_b[...].astype(dtype)  # (N, D) (D, r) (r, F)
        return y_nf + update_nf * self.scaling

    def delta(self) -> jax.Array:
        """The kernel update (D, F) = scaling * (A * e) B."""
        return self.scaling * ((self.lora_a[...] * self.lora_e[...][None, :]) @ self.lora_b[...])

    def penalty(self) -> jax.Array:
        """||A^T A - I||_F + ||B B^T - I||_F: the two (r, r) Gram matrices against the identity (not squared)."""
        a, b = self.lora_a[...], self.lora_b[...]
        eye = jnp.eye(a.shape[1], dtype=a.dtype)
        return jnp.linalg.norm(a.T @ a - eye) + jnp.linalg.norm(b @ b.T - eye)

    # ----------------------------------------------------- peft's layout: lora_A (r, D), lora_E (r, 1), lora_B (F, r)

    def to_peft(self, module_name: str) -> dict[str, np.ndarray]:
        return {f"{module_name}.lora_A": np.asarray(self.lora_a[...]).T, f"{module_name}.lora_E":
                np.asarray(self.lora_e[...])[:, None], f"{module_name}.lora_B": np.asarray(self.lora_b[...]).T}

    def from_peft(self, tensors: dict[str, np.ndarray], module_name: str) -> None:
        a, e, b = (tensors[f"{module_name}.lora_{k}"] for k in "AEB")
        self.lora_a[...] = jnp.asarray(a.T, jnp.float32)
        self.lora_e[...] = jnp.asarray(e.reshape(-1), jnp.float32)
        self.lora_b[...] = jnp.asarray(b.T, jnp.float32)

    def peft_shapes(self, module_name: str) -> dict[str, tuple[int, ...]]:
        (d, r), f = self.lora_a.shape, self.lora_b.shape[1]
        return {f"{module_name}.lora_A": (r, d), f"{module_name}.lora_E": (r, 1), f"{module_name}.lora_B": (f, r)}


# --------------------------------------------------------------------------------------------- the budget


class Schedule(NamedTuple):
    """peft's `AdaLoraConfig` numbers that drive the budget."""

    init_rank: int
    target_rank: int
    matrices: int
    total: int  # training steps
    tinit: int
    tfinal: int
    delta_t: int
    beta1: float
    beta2: float

    @property
    def initial_budget(self) -> int:
        return self.init_rank * self.matrices

    def budget(self, step):
        """The rank budget at update `step` (0-based), as `RankAllocator.budget_schedule`: the initial one up to
        `tinit`, then falling on a cubic to the target one at `total - tfinal`."""
        initial, target = self.initial_budget, self.target_rank * self.matrices
        span = max(self.total - self.tfinal - self.tinit, 1)
        coeff = 1.0 - (step - self.tinit) / span
        cubic = jnp.floor((initial - target) * coeff ** 3 + target).astype(jnp.int32)  # int() of a positive number
        return jnp.where(step <= self.tinit, initial, jnp.where(step > self.total - self.tfinal, target, cubic))

    def phase(self, step):
        """(allocating: a new allocation at this step; fixed: the final allocation re-applied), as peft's
        `update_and_allocate`: every `delta_t` steps strictly between `tinit` and `total - tfinal`, once more
        at `total - tfinal` (whatever `delta_t`), and re-applied after it."""
        end = self.total - self.tfinal
        allocating = ((step > self.tinit) & (step < end) & (step % self.delta_t == 0)) | (step == end)
        return allocating, step > end


class AllocatorState(NamedTuple):
    count: jax.Array  # updates so far
    ipt: dict  # per AdaLoRA parameter: smoothed sensitivity
    unc: dict  # ... and its uncertainty
    kept: dict  # per matrix (its e's path): (r,) bool, the triplets the last allocation kept
    inner: optax.OptState


def _is_adalora(path: str) -> bool:
    return path.rsplit("/", 1)[-1] in ("lora_a", "lora_e", "lora_b") and "/adapter/" in f"/{path}"


def importance(params: dict, grads: dict, ipt: dict, unc: dict, beta1: float, beta2: float
               ) -> tuple[dict, dict]:
    """`RankAllocator.update_ipt`: EMA of |p * g| and of its distance to that EMA, per entry."""
    new_ipt, new_unc = {}, {}
    for name in ipt:
        now = jnp.abs(params[name] * grads[name])
        new_ipt[name] = beta1 * ipt[name] + (1 - beta1) * now
        new_unc[name] = beta2 * unc[name] + (1 - beta2) * jnp.abs(now - new_ipt[name])
    return new_ipt, new_unc


def allocate(ipt: dict, unc: dict, budget, initial_budget: int) -> dict:
    """`RankAllocator.mask_to_budget`: each triplet's score (its e entry's, plus the mean over its A column's and
    its B row's entries), and the `initial - budget` lowest-scored triplets over all matrices masked. Returns
    {e's path: (r,) bool kept}."""
    scores = {}
    for e in (n for n in ipt if n.endswith("/lora_e")):
        stem = e.removesuffix("/lora_e")
        score = lambda n: ipt[n] * unc[n]  # noqa: E731
        scores[e] = score(e) + score(stem + "/lora_a").mean(axis=0) + score(stem + "/lora_b").mean(axis=1)  # (r,)
    everything = jnp.sort(jnp.concatenate([scores[e] for e in sorted(scores)]))
    k = initial_budget - budget  # torch.kthvalue's k: the k-th smallest is the threshold (k = 0: mask nothing)
    threshold = jnp.where(k > 0, everything[jnp.maximum(k - 1, 0)], -jnp.inf)
    return {e: s > threshold for e, s in scores.items()}


def allocator(inner: optax.GradientTransformation, schedule: Schedule) -> optax.GradientTransformation:
    """`inner` (AdamW and the rest), then AdaLoRA's rank allocation on the updated parameters (module docstring).
    Parameters that are not AdaLoRA's pass through unchanged."""

    def flat(tree) -> dict:
        return {"/".join(str(getattr(k, "key", k)) for k in p): v
                for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}

    def init(params):
        named = {n: v for n, v in flat(params).items() if _is_adalora(n)}
        def zeros():  # a buffer of its own each (the train step donates the state: no two leaves may share one)
            return {n: jnp.zeros_like(v) for n, v in named.items()}

        kept = {n: jnp.ones(v.shape, bool) for n, v in named.items() if n.endswith("/lora_e")}
        return AllocatorState(jnp.zeros((), jnp.int32), zeros(), zeros(), kept, inner.init(params))

    def update(grads, state, params=None):
        updates, inner_state = inner.update(grads, state.inner, params)
        step = state.count
        p_new, g = flat(optax.apply_updates(params, updates)), flat(grads)
        collecting = step < schedule.total - schedule.tfinal
        ipt, unc = importance(p_new, g, state.ipt, state.unc, schedule.beta1, schedule.beta2)
        ipt = jax.tree.map(lambda new, old: jnp.where(collecting, new, old), ipt, state.ipt)
        unc = jax.tree.map(lambda new, old: jnp.where(collecting, new, old), unc, state.unc)
        allocating, fixed = schedule.phase(step)
        fresh = allocate(ipt, unc, schedule.budget(step), schedule.initial_budget)
        kept = {e: jnp.where(allocating, fresh[e], state.kept[e]) for e in fresh}
        reset = step == schedule.total - schedule.tfinal  # peft resets the scores once the allocation is fixed
        ipt = jax.tree.map(lambda x: jnp.where(reset, 0.0, x), ipt)
        unc = jax.tree.map(lambda x: jnp.where(reset, 0.0, x), unc)
        masked = {e: jnp.where(allocating | fixed, kept[e], True) for e in kept}  # False: e entry forced to zero

        def zero_masked(path, u, p):
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            if name not in masked:
                return u
            return jnp.where(masked[name], u, -p)  # the update that lands the masked entries on exactly 0

        updates = jax.tree_util.tree_map_with_path(zero_masked, updates, params)
        return updates, AllocatorState(step + 1, ipt, unc, kept, inner_state)

    return optax.GradientTransformation(init, update)


def ranks(opt_state) -> dict[str, int] | None:
    """Ranks kept per matrix (e's path -> count) by the latest allocation in an optimizer state, if AdaLoRA's."""
    for node in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, AllocatorState)):
        if isinstance(node, AllocatorState):
            return {e: int(np.asarray(k).sum()) for e, k in node.kept.items()}
    return None

