"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021): a small residual MLP on a sublayer's output,

    h = x W + b;   y = h + up(act(down(h))),     down (F -> m), up (m -> F),

inserted after the attention's output projection and after the MLP's (Houlsby) or after the MLP's only
(Pfeiffer), before the sublayer's dropout and residual connection. Both projections start from N(0, 0.01)
weights and zero biases, so the adapter starts near the identity (Houlsby et al. sec. 2.1).

peft has no bottleneck adapters (AdapterHub's `adapters` pins transformers 4), so the export is our own
safetensors layout (research/peft/interop.py), and the reference in the tests is written out there.
A non-linearity sits between the projections, so an adapter cannot be folded into the weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.models.hf_config import ACTIVATIONS
from research.models.linear import Linear

INIT = nnx.initializers.normal(1e-2)


class Bottleneck(nnx.Module):
    def __init__(self, layer: Linear, size: int, activation: str, *, rngs: nnx.Rngs):
        f = layer.out_features
        self.down = nnx.Linear(f, size, kernel_init=INIT, dtype=layer.dtype, param_dtype=jnp.float32, rngs=rngs)
        self.up = nnx.Linear(size, f, kernel_init=INIT, dtype=layer.dtype, param_dtype=jnp.float32, rngs=rngs)
        self.activation = activation
        self.merged = False  # never: there is nothing to fold into

    def __call__(self, layer: Linear, x_nd: jax.Array) -> jax.Array:
        h_nf = layer.base(x_nd)
        return h_nf + self.up(ACTIVATIONS[self.activation](self.down(h_nf))).astype(h_nf.dtype)  # (N, F)

    def folded(self, layer: Linear) -> None:
        return None

    def to_peft(self, module_name: str) -> dict[str, np.ndarray]:
        """Our own layout (peft has no such method), torch nn.Linear style: weight (out, in), bias (out,)."""
        out = {}
        for part in ("down", "up"):
            linear = getattr(self, part)
            out[f"{module_name}.adapter.{part}.weight"] = np.asarray(linear.kernel[...]).T  # (in, out) -> (out, in)
            out[f"{module_name}.adapter.{part}.bias"] = np.asarray(linear.bias[...])
        return out

    def from_peft(self, tensors: dict[str, np.ndarray], module_name: str) -> None:
        for part in ("down", "up"):
            linear, key = getattr(self, part), f"{module_name}.adapter.{part}"
            linear.kernel[...] = jnp.asarray(tensors[f"{key}.weight"].T, jnp.float32)
            linear.bias[...] = jnp.asarray(tensors[f"{key}.bias"], jnp.float32)

    def peft_shapes(self, module_name: str) -> dict[str, tuple[int, ...]]:
        m, f = self.down.out_features, self.down.in_features
        return {f"{module_name}.adapter.down.weight": (m, f), f"{module_name}.adapter.down.bias": (m,),
                f"{module_name}.adapter.up.weight": (f, m), f"{module_name}.adapter.up.bias": (f,)}
