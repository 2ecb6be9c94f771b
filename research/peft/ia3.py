"""IA3 (Liu et al. 2022): learned rescaling of a frozen layer's output (keys, values) or of its input (the MLP's
intermediate activations, which enter the MLP's output projection), one vector per layer, ones at the start.

    output-scaled:  y = (x W + b) * l,   l (F,)          input-scaled ("feedforward"):  y = (x * l) W + b,   l (D,)

As in peft, the output scale multiplies the bias too, and both fold into the weights exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.models.linear import Linear


class IA3(nnx.Module):
    def __init__(self, layer: Linear, feedforward: bool):
        self.feedforward = feedforward
        self.scale = nnx.Param(jnp.ones((layer.in_features if feedforward else layer.out_features,), jnp.float32))
        self.merged = False

    def __call__(self, layer: Linear, x_nd: jax.Array) -> jax.Array:
        if self.merged:
            return layer.base(x_nd)
        if self.feedforward:  # (N, D) * (D,)
            return layer.base(x_nd * self.scale[...].astype(x_nd.dtype))
        y_nf = layer.base(x_nd)
        return y_nf * self.scale[...].astype(y_nf.dtype)  # (N, F) * (F,)

    def folded(self, layer: Linear) -> dict[str, jax.Array]:
        kernel = layer.weight()
        bias = layer.bias[...] if layer.bias is not None else None
        if not self.merged:
            if self.feedforward:
                kernel = kernel * self.scale[...][:, None]  # rows of the (D, F) kernel
            else:
                kernel = kernel * self.scale[...][None, :]  # columns
                bias = bias * self.scale[...] if bias is not None else None
        return {"kernel": kernel} | ({"bias": bias} if bias is not None else {})

    def merge(self, layer: Linear) -> None:
        if not self.merged:
            for name, value in self.folded(layer).items():
                getattr(layer, name)[...] = value
            self.merged = True

    def unmerge(self, layer: Linear) -> None:
        if self.merged:
            s = self.scale[...]
            layer.kernel[...] = layer.kernel[...] / (s[:, None] if self.feedforward else s[None, :])
            if layer.bias is not None and not self.feedforward:
                layer.bias[...] = layer.bias[...] / s
            self.merged = False

    # ---------------------------------------------------- peft's layout: (1, D) input-scaled, (F, 1) output-scaled

    def to_peft(self, module_name: str) -> dict[str, np.ndarray]:
        s = np.asarray(self.scale[...])
        return {f"{module_name}.ia3_l": s[None, :] if self.feedforward else s[:, None]}

    def from_peft(self, tensors: dict[str, np.ndarray], module_name: str) -> None:
        self.scale[...] = jnp.asarray(tensors[f"{module_name}.ia3_l"].reshape(-1), jnp.float32)

    def peft_shapes(self, module_name: str) -> dict[str, tuple[int, ...]]:
        n = self.scale.shape[0]
        return {f"{module_name}.ia3_l": (1, n) if self.feedforward else (n, 1)}
