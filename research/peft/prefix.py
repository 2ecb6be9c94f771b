"""Prefix tuning (Li & Liang 2021): P trainable keys and values in front of every attention layer's own, the
model frozen. Each query attends to the prefix and to the tokens it attended to before.

During training the prefix is reparameterized, as in the paper: a table E (P, D) through an MLP,

    prefix = W2 tanh(W1 E + b1) + b2        (P, D) -> (P, hidden) -> (P, L * 2 * D),

because optimizing the keys and values directly is unstable (Li & Liang sec. 4.3); `peft.prefix_projection=false`
trains the (P, L * 2 * D) table directly (P-tuning v2). Only the MLP's output is needed at the end: the export
(peft's `prompt_embeddings`) is that output, and an adapter loaded from peft is a plain table.

Initialization (`peft.prefix_init`): peft's, an N(0, 1) table (through the MLP when there is one), or Li &
Liang's real words: the keys and values the frozen model computes for P random vocabulary tokens read as one
sequence (`set_table`; with the MLP, its output layer is solved so that it starts at exactly those). For GPT-2
the prefix then is the KV cache of those tokens (tested).

The table's layout is peft's: (P, L, 2, heads, head size), layer l's keys at [:, l, 0] and values at [:, l, 1].
The base model (its `prefix` slot) hands layer l its pair and lets every query see the P prefix slots; token
positions start at P, as transformers numbers them after a cache of P entries. For GPT-2 decoding the prefix
fills the first P slots of the KV cache (`fill`, research/generate.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.peft.lora import TORCH_LINEAR_INIT


def _torch_bias_init(fan_in: int):
    """torch nn.Linear's bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class Prefix(nnx.Module):
    def __init__(self, tokens: int, layers: int, heads: int, head_dim: int, projection: bool, hidden: int, *,
                 rngs: nnx.Rngs):
        d = heads * head_dim
        self.layers, self.heads, self.head_dim = layers, heads, head_dim
        width = d if projection else layers * 2 * d
        # peft's embedding init: torch nn.Embedding's N(0, 1).
        self.embedding = nnx.Param(jax.random.normal(rngs.params(), (tokens, width), jnp.float32))
        if projection:
            self.mlp_in = nnx.Linear(d, hidden, kernel_init=TORCH_LINEAR_INIT, bias_init=_torch_bias_init(d),
                                     rngs=rngs)
            self.mlp_out = nnx.Linear(hidden, layers * 2 * d, kernel_init=TORCH_LINEAR_INIT,
                                      bias_init=_torch_bias_init(hidden), rngs=rngs)
        else:
            self.mlp_in = self.mlp_out = None

    @property
    def tokens(self) -> int:
        return self.embedding.shape[0]

    def table(self) -> jax.Array:
        """The keys and values of every layer, (P, L * 2 * D)."""
        e_pd = self.embedding[...]
        if self.mlp_in is None:
            return e_pd
        return self.mlp_out(jnp.tanh(self.mlp_in(e_pd)))

    def set_table(self, table_pw: jax.Array) -> None:
        """Start from these keys and values (P, L * 2 * D): the table itself, or, through the MLP, an output
        layer solved so that the MLP yields exactly them (P <= the MLP's width, so the least-squares fit of its
        (P, hidden) activations is exact)."""
        if self.mlp_in is None:
            self.embedding[...] = jnp.asarray(table_pw, jnp.float32)
            return
        h_ph = jnp.tanh(self.mlp_in(self.embedding[...]))  # (P, hidden)
        kernel, *_ = jnp.linalg.lstsq(h_ph, table_pw - self.mlp_out.bias[...])  # (hidden, L*2*D)
        self.mlp_out.kernel[...] = kernel

    def keys_values(self, batch: int, dtype) -> list[tuple[jax.Array, jax.Array]]:
        """Per layer (keys, values), each (B, heads, P, head size)."""
        P = self.tokens
        # (P, L*2*D) -> (P, 2L, nh, hs) -> (2L, nh, P, hs)
        t = self.table().astype(dtype).reshape(P, 2 * self.layers, self.heads, self.head_dim).transpose(1, 2, 0, 3)
        shape = (batch, self.heads, P, self.head_dim)
        return [(jnp.broadcast_to(t[2 * i], shape), jnp.broadcast_to(t[2 * i + 1], shape)) for i in range(self.layers)]

    def to_peft(self) -> dict[str, np.ndarray]:
        return {"prompt_embeddings": np.asarray(self.table())}  # the MLP's output only, as peft saves it

    def from_peft(self, tensors: dict[str, np.ndarray]) -> None:
        if self.mlp_in is not None:
            raise ValueError("a prefix loaded from peft is a plain table: set peft.prefix_projection=false")
        self.embedding[...] = jnp.asarray(tensors["prompt_embeddings"], jnp.float32)

    def peft_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"prompt_embeddings": (self.tokens, self.layers * 2 * self.heads * self.head_dim)}
