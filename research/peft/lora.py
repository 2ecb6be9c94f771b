"""LoRA (Hu et al. 2021): a frozen layer plus a trainable low-rank update,

    y = x W + b + (alpha / r) * dropout(x) A B,      A (D, r) random, B (r, F) zero at the start,

so training starts from the pretrained function exactly. rsLoRA (Kalajdzievski 2023) scales by alpha / sqrt(r),
which keeps the update's size independent of the rank. A and B are Flax NNX's own `nnx.LoRA` (its
`LoRAParam`s); this module adds peft's scaling, dropout, initialization, merging and key names.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.models.linear import Linear
from research.peft.targets import PeftError

# torch's nn.Linear default (kaiming_uniform with a = sqrt(5)), which peft keeps for A: U(-1/sqrt(D), 1/sqrt(D)).
# In variance-scaling terms: scale 1/3, uniform, over the fan-in D of the (D, r) matrix.
TORCH_LINEAR_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class LowRankUpdate(nnx.Module):
    """What LoRA and AdaLoRA share: an additive kernel update `delta()` (D, F) that folds into the layer's kernel
    and back out. Subclasses set `self.merged = False` in their constructor."""

    def delta(self) -> jax.Array:
        raise NotImplementedError

    def merge(self, layer: Linear) -> None:
        """Fold the update into the layer's kernel; the layer then computes the same function with no extra work."""
        if layer.quantized:
            raise PeftError("the layer's base is NF4 (QLoRA): the update cannot be folded into 4-bit codes in place; "
                            "`merged_model` (research export --merged) folds it into the dequantized weights")
        if not self.merged:
            layer.kernel[...] = (layer.kernel[...] + self.delta()).astype(layer.kernel[...].dtype)
            self.merged = True

    def unmerge(self, layer: Linear) -> None:
        if self.merged:
            layer.kernel[...] = (layer.kernel[...] - self.delta()).astype(layer.kernel[...].dtype)
            self.merged = False

    def folded(self, layer: Linear) -> dict[str, jax.Array]:
        """The layer's parameters with the update folded in (the layer itself unchanged)."""
        kernel = layer.weight() if self.merged else layer.weight() + self.delta()
        return {"kernel": kernel} | ({"bias": layer.bias[...]} if layer.bias is not None else {})


class LoRA(LowRankUpdate):
    def __init__(self, layer: Linear, rank: int, alpha: float, dropout: float, rslora: bool, *, rngs: nnx.Rngs):
        self.lora = nnx.LoRA(layer.in_features, rank, layer.out_features, a_initializer=TORCH_LINEAR_INIT,
                             dtype=layer.dtype, param_dtype=jnp.float32, rngs=rngs)
        self.scaling = alpha / (math.sqrt(rank) if rslora else rank)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.merged = False  # True: the update is folded into the layer's kernel (merge / unmerge)

    def __call__(self, layer: Linear, x_nd: jax.Array) -> jax.Array:
        y_nf = layer.base(x_nd)
        if self.merged:
            return y_nf
        # (N, D) @ (D, r) @ (r, F) -> (N, F)
        return y_nf + (self.lora(self.dropout(x_nd)) * self.scaling).astype(y_nf.dtype)

    def delta(self) -> jax.Array:
        """The kernel update (D, F) = scaling * A B."""
        return self.scaling * (self.lora.lora_a[...] @ self.lora.lora_b[...])

    # ------------------------------------------------------------------ peft's layout: torch nn.Linear (out, in)

    def to_peft(self, module_name: str) -> dict[str, np.ndarray]:
        a, b = np.asarray(self.lora.lora_a[...]), np.asarray(self.lora.lora_b[...])
        return {f"{module_name}.lora_A.weight": a.T, f"{module_name}.lora_B.weight": b.T}  # (r, D), (F, r)

    def from_peft(self, tensors: dict[str, np.ndarray], module_name: str) -> None:
        self.lora.lora_a[...] = jnp.asarray(tensors[f"{module_name}.lora_A.weight"].T, jnp.float32)
        self.lora.lora_b[...] = jnp.asarray(tensors[f"{module_name}.lora_B.weight"].T, jnp.float32)

    def peft_shapes(self, module_name: str) -> dict[str, tuple[int, ...]]:
        (d, r), f = self.lora.lora_a.shape, self.lora.lora_b.shape[1]
        return {f"{module_name}.lora_A.weight": (r, d), f"{module_name}.lora_B.weight": (f, r)}
