"""Prompt tuning (Lester et al. 2021): P trainable virtual-token embeddings before every input, the model frozen.

    inputs_embeds (B, T, D)  ->  [prompt (P, D); inputs_embeds]  (B, P + T, D)

The attention mask gets P ones in front, token types P zeros, positions 0..P-1 for the virtual tokens and the
input's shifted by P: what peft feeds transformers. The base model (research/models/{bert,gpt2}.py, its `prompt`
slot) prepends them; token-level heads drop the P virtual positions again, so their logits line up with the
input. BERT's sequence classifier reads position 0, which is now the first virtual token, exactly as under peft
(the [CLS] vector it pools is the first virtual token's final state); GPT-2's reads the last real token, as
without a prompt (peft's reads the last position, padding included, when it is given embeddings).

Initialization (`peft.prompt_init`): "vocab" (Lester et al.'s sampled vocabulary: the embeddings of P token
ids drawn at random from the vocabulary), "text" (the embeddings of `peft.prompt_init_text`'s tokens, repeated
or cut to P, as peft's TEXT init), or "random" (uniform in [-0.5, 0.5], Lester et al.'s random init).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class Prompt(nnx.Module):
    def __init__(self, embeddings_pd: jax.Array):
        self.embedding = nnx.Param(jnp.asarray(embeddings_pd, jnp.float32))  # (P, D)

    @property
    def tokens(self) -> int:
        return self.embedding.shape[0]

    def prepend(self, x_btd, attention_mask_bt, token_type_ids_bt, position_ids_bt):
        """(inputs, mask, token types, positions) with the P virtual tokens in front; token types and positions
        may be None (the model's defaults then apply to the longer sequence)."""
        B, P = x_btd.shape[0], self.tokens
        prompt_bpd = jnp.broadcast_to(self.embedding[...].astype(x_btd.dtype), (B, P, x_btd.shape[-1]))
        x_btd = jnp.concatenate([prompt_bpd, x_btd], axis=1)  # (B, P + T, D)
        attention_mask_bt = jnp.concatenate([jnp.ones((B, P), attention_mask_bt.dtype), attention_mask_bt], axis=1)
        if token_type_ids_bt is not None:
            token_type_ids_bt = jnp.concatenate([jnp.zeros((B, P), token_type_ids_bt.dtype), token_type_ids_bt], 1)
        if position_ids_bt is not None:
            virtual_bp = jnp.broadcast_to(jnp.arange(P, dtype=position_ids_bt.dtype), (B, P))
            position_ids_bt = jnp.concatenate([virtual_bp, position_ids_bt + P], axis=1)
        return x_btd, attention_mask_bt, token_type_ids_bt, position_ids_bt

    def to_peft(self) -> dict[str, np.ndarray]:
        return {"prompt_embeddings": np.asarray(self.embedding[...])}

    def from_peft(self, tensors: dict[str, np.ndarray]) -> None:
        self.embedding[...] = jnp.asarray(tensors["prompt_embeddings"], jnp.float32)

    def peft_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"prompt_embeddings": tuple(self.embedding.shape)}
