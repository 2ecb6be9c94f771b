"""`Linear`: `nnx.Linear` applied to the tokens as one 2-D matrix, with a place for an adapter.

Same parameters, same result; only the shape XLA sees differs. `nnx.Linear` contracts a (B, T, D) input
directly, and the backward pass then computes the kernel gradient as a dot over two contracting dimensions
(B and T), which XLA's CPU backend runs several times slower than the equivalent (B*T, D) matrix product
(measured on jax 0.10.2: 108 ms -> 44 ms for the fwd+bwd of a 384 -> 1536 GELU layer at 32 x 48 tokens;
BERT/GPT-2 training steps about 2x faster). Reshaping (B, T, D) -> (B*T, D) is free (a bitcast).

The kernel may be a qwix `QArray` (QLoRA's frozen NF4 base: research/peft/qlora.py); `base` dequantizes it.

`adapter`: None, or a module that research/peft/ attaches (LoRA, IA3, a bottleneck adapter). It then computes
the layer's output, `adapter(layer, x_nd)`, calling `layer.base(x_nd)` for the frozen `x W + b`. The layer's
own parameters keep their paths (`.../query/kernel`), so the Hugging Face key tables still name them.
"""

from __future__ import annotations

import jax
import qwix
from flax import nnx


class Linear(nnx.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.adapter = nnx.data(None)  # a module once research/peft/ attaches one (data, not static)

    def _kernel(self):
        # A Variable's value; qwix's post-training quantization replaces the variable by its own holder.
        return self.kernel.get_value() if isinstance(self.kernel, nnx.Variable) else self.kernel

    @property
    def quantized(self) -> bool:
        """Whether the kernel is QLoRA's NF4 codes (research/peft/qlora.py) rather than an array."""
        return isinstance(self._kernel(), qwix.QArray)

    def weight(self) -> jax.Array:
        """The kernel (D, F) as an array: QLoRA's NF4 kernel (research/peft/qlora.py) dequantized."""
        return qwix.dequantize(self._kernel()) if self.quantized else self._kernel()

    def base(self, x_nd: jax.Array) -> jax.Array:
        """x W + b for a 2-D input (N, D) -> (N, F), whatever adapter is attached. A QLoRA base's NF4 kernel is
        dequantized to the compute dtype first, as bitsandbytes does."""
        if not self.quantized:
            return super().__call__(x_nd)
        y_nf = x_nd @ self.weight().astype(x_nd.dtype)
        return y_nf if self.bias is None else y_nf + self.bias[...].astype(y_nf.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        lead = x.shape[:-1]
        x_nd = x.reshape(-1, x.shape[-1])  # (..., D) -> (N, D)
        y_nf = self.base(x_nd) if self.adapter is None else self.adapter(self, x_nd)  # (N, F)
        return y_nf.reshape(*lead, y_nf.shape[-1])  # (N, F) -> (..., F)
