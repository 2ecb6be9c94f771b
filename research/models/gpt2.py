"""GPT-2 (Radford et al. 2019) in Flax NNX, numerically equal to `transformers`' PyTorch GPT-2.

Reads top to bottom: config -> KV cache -> attention -> MLP -> block -> decoder -> heads -> HF key table.
Pre-LN blocks, tanh GELU, a causal mask combined with the padding mask, an LM head tied to `wte`.

Two differences from transformers' *forward* defaults, both deliberate:
- With no `position_ids` and an `attention_mask`, positions count only real tokens (cumsum of the mask - 1,
  0 on padding), so a left-padded prompt gets the same positions as the unpadded one. transformers uses
  0..T-1 in `forward` and does the cumsum only inside `generate`; pass `position_ids` to get either.
- Sequence classification takes the last position whose `attention_mask` is 1 (falling back to the last
  token that is not `pad_token_id`, as transformers does, when no mask is given). The two agree whenever
  padding tokens are exactly the masked positions, and the mask also works for `inputs_embeds`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.models.family import Family
from research.models.hf_config import (
    ACTIVATIONS,
    build_config,
    check_activation,
    check_problem_type,
    normalize_labels,
)
from research.models.linear import Linear
from research.models.pruned_units import UnitSlices, compact, expand, head_columns, kept, normalize_pruned

# ----------------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None: 4 * n_embd
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False  # only changes fp16 numerics in torch; we always softmax in fp32
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    pad_token_id: int | None = None
    num_labels: int = 2
    id2label: tuple[str, ...] | None = None  # label names by id; None: LABEL_0 .. LABEL_{n-1}
    # transformers' problem_type for the sequence-classification head: "regression" (one output, mean-squared
    # error), or "single_label_classification" / None (softmax over num_labels). Kept so an export loads the same.
    problem_type: str | None = None
    dtype: str = "float32"
    # Attention heads and MLP neurons removed from each layer (research/compress/structured.py), as BertConfig's
    # (research/models/pruned_units.py): such a layer is built narrower, and exported at full shape with zeros.
    pruned_heads: Any = ()
    pruned_neurons: Any = ()

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        object.__setattr__(self, "pruned_heads", normalize_pruned(self.pruned_heads, self.n_layer, self.n_head,
                                                                  "pruned_heads"))
        object.__setattr__(self, "pruned_neurons", normalize_pruned(self.pruned_neurons, self.n_layer,
                                                                    self.inner_dim, "pruned_neurons"))
        check_activation(self.activation_function, "activation_function")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} is not supported; use 'float32' or 'bfloat16'")
        # HF-style {id: name} dicts become a tuple: the config must stay hashable (static under jit).
        object.__setattr__(self, "id2label", normalize_labels(self.id2label, self.num_labels))
        check_problem_type(self.problem_type, self.num_labels)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd

    def kept_heads(self, layer: int) -> tuple[int, ...]:
        """The original indices of the heads layer `layer` keeps."""
        return kept(self.pruned_heads, layer, self.n_head)

    def kept_neurons(self, layer: int) -> tuple[int, ...]:
        """The original indices of the MLP neurons layer `layer` keeps."""
        return kept(self.pruned_neurons, layer, self.inner_dim)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides: Any) -> GPT2Config:
        hf = dict(hf)
        if hf.get("n_ctx", hf.get("n_positions")) != hf.get("n_positions", hf.get("n_ctx")):
            raise ValueError(f"config.json has n_ctx={hf['n_ctx']} != n_positions={hf['n_positions']}")
        hf.pop("n_ctx", None)
        # The summary_* keys configure GPT2DoubleHeadsModel's multiple-choice head, which we do not port.
        for key in [k for k in hf if k.startswith("summary_")]:
            hf.pop(key)
        return build_config(cls, hf, overrides, {"add_cross_attention": False}, model_type="gpt2")

    def to_hf_config(self, architecture: str) -> dict[str, Any]:
        hf = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del hf["dtype"], hf["num_labels"]
        hf["pruned_heads"] = {str(layer): list(heads) for layer, heads in self.pruned_heads}
        hf["pruned_neurons"] = {str(layer): list(units) for layer, units in self.pruned_neurons}
        hf["id2label"] = {str(i): name for i, name in self.labels().items()}
        hf["label2id"] = {name: i for i, name in self.labels().items()}
        hf.update(
            architectures=[architecture],
            model_type="gpt2",
            n_ctx=self.n_positions,
            torch_dtype=self.dtype,
            tie_word_embeddings=True,
        )
        return hf

    def labels(self) -> dict[int, str]:
        if self.id2label is not None:
            return dict(enumerate(self.id2label))
        return {i: f"LABEL_{i}" for i in range(self.num_labels)}


PRESETS = {
    "gpt2": GPT2Config(),
    "gpt2-medium": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPT2Config(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPT2Config(n_embd=1600, n_layer=48, n_head=25),
}


def _dense(cfg: GPT2Config, d_in: int, d_out: int, rngs: nnx.Rngs, use_bias: bool = True) -> Linear:
    return Linear(
        d_in,
        d_out,
        use_bias=use_bias,
        kernel_init=nnx.initializers.normal(cfg.initializer_range),
        dtype=cfg.dtype,
        param_dtype=cfg.dtype,
        rngs=rngs,
    )


def _layer_norm(cfg: GPT2Config, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # use_fast_variance=False: E[(x-mean)^2] as torch computes it.
    return nnx.LayerNorm(
        cfg.n_embd,
        epsilon=cfg.layer_norm_epsilon,
        use_fast_variance=False,
        dtype=cfg.dtype,
        param_dtype=cfg.dtype,
        rngs=rngs,
    )


# --------------------------------------------------------------------------------------------- KV cache


class KVCache(NamedTuple):
    """Static-shape cache for incremental decoding, a plain pytree so it passes through `jax.jit`.

    Slots [0, index) hold the keys and values of the tokens seen so far; `valid` marks which of them are
    real tokens (False for left padding). The batch shares one write index: prompts are left-padded to a
    common length, so every row writes its next token into the same slot.
    """

    keys: tuple[jax.Array, ...]  # per layer (B, nh, S, hs); nh the heads that layer keeps
    values: tuple[jax.Array, ...]  # per layer (B, nh, S, hs)
    valid: jax.Array  # (B, S) bool
    index: jax.Array  # () int32, the next slot to write

    @classmethod
    def create(cls, cfg: GPT2Config, batch: int, max_length: int) -> KVCache:
        if max_length > cfg.n_positions:
            raise ValueError(f"cache length {max_length} exceeds n_positions={cfg.n_positions}")
        zeros = tuple(jnp.zeros((batch, len(cfg.kept_heads(i)), max_length, cfg.head_dim), cfg.dtype)
                      for i in range(cfg.n_layer))
        return cls(zeros, zeros, jnp.zeros((batch, max_length), bool), jnp.zeros((), jnp.int32))


# -------------------------------------------------------------------------------------------- attention


class GPT2Attention(nnx.Module):
    """Causal self-attention. A layer with pruned heads (`cfg.pruned_heads`) has fewer of them: its fused
    projection is 3 * nh * hs wide and its output projection reads nh * hs features."""

    def __init__(self, cfg: GPT2Config, layer_idx: int, *, rngs: nnx.Rngs):
        self.num_heads, self.head_dim = len(cfg.kept_heads(layer_idx)), cfg.head_dim
        inner = self.num_heads * self.head_dim
        self.c_attn = _dense(cfg, cfg.n_embd, 3 * inner, rngs)  # fused q, k, v (HF's Conv1D layout)
        self.c_proj = _dense(cfg, inner, cfg.n_embd, rngs)
        self.attn_dropout = nnx.Dropout(cfg.attn_pdrop, rngs=rngs)
        self.resid_dropout = nnx.Dropout(cfg.resid_pdrop, rngs=rngs)
        scale = 1.0 / math.sqrt(self.head_dim) if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.scale = scale

    def project(self, x_btd):
        """Queries, keys and values, each (B, nh, T, hs), from the fused projection."""
        B, T, _ = x_btd.shape

        def split_heads(y_btd):  # (B, T, D) -> (B, T, nh, hs) -> (B, nh, T, hs)
            # Heads-major layout: XLA's CPU batched matmul is ~3.5x faster than contracting (B, T, nh, hs).
            return y_btd.reshape(B, T, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

        q_btd, k_btd, v_btd = jnp.split(self.c_attn(x_btd), 3, axis=-1)  # (B, T, 3 nh hs) -> 3 x (B, T, nh hs)
        return split_heads(q_btd), split_heads(k_btd), split_heads(v_btd)

    def __call__(self, x_btd, mask_b1ts, kv=None, index=None, prefix_kv=None, head_gates_n=None):
        """`mask_b1ts[b, 0, t, s]` says whether query t may attend to key s. With `kv=(k, v)` of shape
        (B, nh, S, hs), the new keys and values are written at slot `index` and attention runs over all S
        slots; the updated (k, v) is returned alongside the output. `prefix_kv`: prefix tuning's (keys, values)
        for this layer, each (B, nh, P, hs), placed before the tokens' own (without a cache). `head_gates_n`:
        (nh,) factors on each head's output (Michel et al.'s gates; 0 masks a head)."""
        B, T, _ = x_btd.shape
        q_bnth, k_bnsh, v_bnsh = self.project(x_btd)
        if prefix_kv is not None:  # (B, nh, P, hs) ++ (B, nh, T, hs) -> (B, nh, P + T, hs)
            k_bnsh = jnp.concatenate([prefix_kv[0], k_bnsh], axis=2)
            v_bnsh = jnp.concatenate([prefix_kv[1], v_bnsh], axis=2)
        if kv is not None:
            k_bnsh = jax.lax.dynamic_update_slice(kv[0], k_bnsh.astype(kv[0].dtype), (0, 0, index, 0))
            v_bnsh = jax.lax.dynamic_update_slice(kv[1], v_bnsh.astype(kv[1].dtype), (0, 0, index, 0))
            kv = (k_bnsh, v_bnsh)

        scores_bnts = jnp.einsum("bnth,bnsh->bnts", q_bnth, k_bnsh) * self.scale
        # Disallowed keys get the dtype's minimum, as transformers does; a query with no allowed key (a
        # left-padding position) then attends uniformly instead of producing NaN.
        scores_bnts = jnp.where(mask_b1ts, scores_bnts, jnp.finfo(scores_bnts.dtype).min)
        probs_bnts = jax.nn.softmax(scores_bnts.astype(jnp.float32), axis=-1).astype(x_btd.dtype)
        probs_bnts = self.attn_dropout(probs_bnts)
        ctx_bnth = jnp.einsum("bnts,bnsh->bnth", probs_bnts, v_bnsh)
        if head_gates_n is not None:
            ctx_bnth = ctx_bnth * head_gates_n[None, :, None, None].astype(ctx_bnth.dtype)
        # (B, nh, T, hs) -> (B, T, nh*hs)
        ctx_btd = ctx_bnth.transpose(0, 2, 1, 3).reshape(B, T, self.num_heads * self.head_dim)
        return self.resid_dropout(self.c_proj(ctx_btd)), kv


# ------------------------------------------------------------------------------------------------- MLP


class GPT2MLP(nnx.Module):
    """c_fc -> activation -> c_proj; F = the neurons the layer keeps (`cfg.pruned_neurons`)."""

    def __init__(self, cfg: GPT2Config, layer_idx: int, *, rngs: nnx.Rngs):
        width = len(cfg.kept_neurons(layer_idx))
        self.c_fc = _dense(cfg, cfg.n_embd, width, rngs)
        self.c_proj = _dense(cfg, width, cfg.n_embd, rngs)
        self.dropout = nnx.Dropout(cfg.resid_pdrop, rngs=rngs)
        self.act = ACTIVATIONS[cfg.activation_function]

    def __call__(self, x_btd, neuron_gates_f=None):
        """`neuron_gates_f`: (F,) factors on the activations (neuron importance is the gradient there)."""
        h_btf = self.act(self.c_fc(x_btd))
        if neuron_gates_f is not None:
            h_btf = h_btf * neuron_gates_f.astype(h_btf.dtype)
        return self.dropout(self.c_proj(h_btf))


class GPT2Block(nnx.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int, *, rngs: nnx.Rngs):
        self.ln_1 = _layer_norm(cfg, rngs)
        self.attn = GPT2Attention(cfg, layer_idx, rngs=rngs)
        self.ln_2 = _layer_norm(cfg, rngs)
        self.mlp = GPT2MLP(cfg, layer_idx, rngs=rngs)

    def __call__(self, x_btd, mask_b1ts, kv=None, index=None, prefix_kv=None, head_gates_n=None,
                 neuron_gates_f=None):
        a_btd, kv = self.attn(self.ln_1(x_btd), mask_b1ts, kv, index, prefix_kv, head_gates_n)
        x_btd = x_btd + a_btd
        return x_btd + self.mlp(self.ln_2(x_btd), neuron_gates_f), kv

    def keys_values(self, x_btd):
        """The keys and values this block computes from its input (B, T, D), each (B, nh, T, hs): what prefix
        tuning's initialization from real words reads (research/peft/prefix.py)."""
        return self.attn.project(self.ln_1(x_btd))[1:]


# --------------------------------------------------------------------------------------------- decoder


def positions_from_mask(attention_mask_bt: jax.Array) -> jax.Array:
    """Position of each token among the real tokens of its row: left padding does not shift positions.
    Padding positions get 0, as transformers' `generate` does."""
    mask = attention_mask_bt.astype(jnp.int32)
    return jnp.where(mask == 1, jnp.cumsum(mask, axis=-1) - 1, 0)


class GPT2Model(nnx.Module):
    """The `base` task: token + position embeddings, the blocks and the final LayerNorm. Calling it returns
    the last hidden states (B, T, D), or `(hidden, cache)` when a `KVCache` is passed."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.config = cfg
        self.wte = nnx.Embed(
            cfg.vocab_size, cfg.n_embd, embedding_init=nnx.initializers.normal(cfg.initializer_range),
            dtype=cfg.dtype, param_dtype=cfg.dtype, rngs=rngs,
        )
        self.wpe = nnx.Embed(
            cfg.n_positions, cfg.n_embd, embedding_init=nnx.initializers.normal(0.01),
            dtype=cfg.dtype, param_dtype=cfg.dtype, rngs=rngs,
        )
        self.drop = nnx.Dropout(cfg.embd_pdrop, rngs=rngs)
        self.h = nnx.List([GPT2Block(cfg, i, rngs=rngs) for i in range(cfg.n_layer)])
        self.ln_f = _layer_norm(cfg, rngs)
        # Slots research/peft/ fills: prompt tuning's virtual tokens, prefix tuning's keys and values. Without a
        # cache the model puts them in; with one, the caller does (research/generate.py: `virtual_tokens`).
        self.prompt = nnx.data(None)
        self.prefix = nnx.data(None)

    @property
    def prompt_length(self) -> int:
        """Virtual tokens prompt tuning puts before the input (0 without): heads drop them again."""
        return 0 if self.prompt is None else self.prompt.tokens

    @property
    def virtual_tokens(self) -> int:
        """Positions before the input's first token: prompt tuning's virtual tokens or prefix tuning's slots."""
        return self.prompt_length + (0 if self.prefix is None else self.prefix.tokens)

    def embed(self, input_ids_bt: jax.Array) -> jax.Array:
        """Token embeddings only (B, T, D): what `inputs_embeds` replaces, and what objectives perturb."""
        return self.wte(input_ids_bt)

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        *,
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
        head_gates: list | None = None,
        neuron_gates: list | None = None,
    ):
        """`head_gates`, `neuron_gates`: one (nh,) / (F,) array of gates per layer (research/compress/structured.py
        takes the gradient there), or None."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x_btd = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.config.dtype)
        B, T = x_btd.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), jnp.int32)
        if attention_mask.shape != (B, T):
            raise ValueError(f"attention_mask must have shape (batch, length)={(B, T)}, got {attention_mask.shape}")
        if cache is None and self.prompt is not None:  # prompt tuning (research/peft/prompt.py)
            x_btd, attention_mask, token_type_ids, position_ids = self.prompt.prepend(
                x_btd, attention_mask, token_type_ids, position_ids)
            B, T = x_btd.shape[:2]
        if position_ids is None:
            if cache is not None:
                raise ValueError("pass position_ids when decoding with a cache (see research.generate)")
            position_ids = positions_from_mask(attention_mask)
        prefix = 0 if cache is not None or self.prefix is None else self.prefix.tokens
        position_ids = position_ids + prefix  # transformers numbers the tokens after a cache of P entries
        if cache is None and prefix + T > self.config.n_positions:
            raise ValueError(f"sequence length {T} (virtual tokens included) + prefix {prefix} exceeds n_positions="
                             f"{self.config.n_positions}")

        x_btd = x_btd + self.wpe(position_ids)
        if token_type_ids is not None:  # transformers embeds token types with wte too
            x_btd = x_btd + self.wte(token_type_ids)
        x_btd = self.drop(x_btd)

        # Which keys each query may see: causal order and real (non-padding) tokens.
        if cache is None:
            valid_bs = attention_mask.astype(bool)
            causal_ts = jnp.tril(jnp.ones((T, T), bool))
        else:
            index = cache.index
            valid_bs = jax.lax.dynamic_update_slice(cache.valid, attention_mask.astype(bool), (0, index))
            S = valid_bs.shape[1]
            causal_ts = jnp.arange(S)[None, :] <= (index + jnp.arange(T))[:, None]  # (T, S)
        mask_b1ts = causal_ts[None, None] & valid_bs[:, None, None, :]  # (B, 1, T, S)
        prefix_kv = [None] * len(self.h)
        if prefix:  # prefix tuning (research/peft/prefix.py): P more keys at every layer, seen by every query
            prefix_kv = self.prefix.keys_values(B, x_btd.dtype)
            mask_b1ts = jnp.concatenate([jnp.ones((B, 1, T, prefix), bool), mask_b1ts], axis=-1)  # (B, 1, T, P + S)

        hidden, new_keys, new_values = [x_btd], [], []
        no_gates = [None] * len(self.h)
        for i, block in enumerate(self.h):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x_btd, kv = block(x_btd, mask_b1ts, kv, None if cache is None else cache.index, prefix_kv[i],
                              (head_gates or no_gates)[i], (neuron_gates or no_gates)[i])
            hidden.append(x_btd)
            if kv is not None:
                new_keys.append(kv[0])
                new_values.append(kv[1])
        x_btd = self.ln_f(x_btd)
        hidden[-1] = x_btd  # transformers reports the last block's output after ln_f

        out = (x_btd, hidden) if output_hidden_states else x_btd
        if cache is None:
            return out
        return out, KVCache(tuple(new_keys), tuple(new_values), valid_bs, cache.index + T)


# ----------------------------------------------------------------------------------------------- heads


class GPT2LMHeadModel(nnx.Module):
    """Causal LM: logits (B, T, V) from the output embeddings tied to `wte`."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.config = cfg
        self.transformer = GPT2Model(cfg, rngs=rngs)

    def embed(self, input_ids_bt):
        return self.transformer.embed(input_ids_bt)

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 inputs_embeds=None, *, cache: KVCache | None = None):
        out = self.transformer(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                               cache=cache)
        h_btd, cache = out if cache is not None else (out, None)
        if cache is None:
            h_btd = h_btd[:, self.transformer.prompt_length:]  # the input's own positions
        logits_btv = self.transformer.wte.attend(h_btd).astype(jnp.float32)  # (B, T, D) @ (V, D)^T
        return logits_btv if cache is None else (logits_btv, cache)

    def features(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 inputs_embeds=None) -> jax.Array:
        """What the LM head reads: the final hidden states (B, T, D) of the input's own positions. With
        `output_embedding` they give the logits a block of tokens at a time (research/objectives/supervised.py's
        chunked loss), never all (B, T, V) of them at once."""
        h_btd = self.transformer(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
        return h_btd[:, self.transformer.prompt_length:]

    def output_embedding(self) -> jax.Array:
        """(V, D) the LM head's weights (tied to `wte`), in the dtype `attend` computes in."""
        wte = self.transformer.wte
        return wte.embedding.get_value().astype(wte.dtype)


class GPT2ForSequenceClassification(nnx.Module):
    """`score` (no bias) on the last real token of each row, as transformers'
    `GPT2ForSequenceClassification`. Logits (B, num_labels)."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.config = cfg
        self.transformer = GPT2Model(cfg, rngs=rngs)
        self.score = _dense(cfg, cfg.n_embd, cfg.num_labels, rngs, use_bias=False)

    def embed(self, input_ids_bt):
        return self.transformer.embed(input_ids_bt)

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 inputs_embeds=None):
        return self.head(self.features(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds))

    def head(self, pooled_bd: jax.Array) -> jax.Array:
        """`score`: logits (B, num_labels) float32."""
        return self.score(pooled_bd).astype(jnp.float32)

    def features(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 inputs_embeds=None) -> jax.Array:
        """What the head reads: the final hidden state at each row's last real token (B, D)."""
        h_btd = self.transformer(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
        h_btd = h_btd[:, self.transformer.prompt_length:]  # the input's own positions
        B, T = h_btd.shape[:2]
        if attention_mask is not None:
            real_bt = attention_mask.astype(bool)
        elif input_ids is not None and self.config.pad_token_id is not None:
            real_bt = input_ids != self.config.pad_token_id
        else:
            real_bt = jnp.ones((B, T), bool)
        # Rightmost real position (transformers: argmax of position * non_pad); 0 for an all-padding row.
        last_b = jnp.max(jnp.where(real_bt, jnp.arange(T), 0), axis=-1)
        return h_btd[jnp.arange(B), last_b]  # (B, D)


TASKS = {
    "base": GPT2Model,
    "causal_lm": GPT2LMHeadModel,
    "sequence_classification": GPT2ForSequenceClassification,
}

HF_ARCHITECTURES = {
    "base": "GPT2Model",
    "causal_lm": "GPT2LMHeadModel",
    "sequence_classification": "GPT2ForSequenceClassification",
}

# ------------------------------------------------------------------------------------- HF key table
#
# GPT-2's HF linear layers are `Conv1D`, stored (in, out) like our kernels: no transpose. Only the
# classification `score` is a torch nn.Linear (out, in).

BASE_KEYS = [
    ("wte.weight", "wte/embedding", False),
    ("wpe.weight", "wpe/embedding", False),
    ("h.{i}.ln_1.weight", "h/{i}/ln_1/scale", False),
    ("h.{i}.ln_1.bias", "h/{i}/ln_1/bias", False),
    ("h.{i}.attn.c_attn.weight", "h/{i}/attn/c_attn/kernel", False),
    ("h.{i}.attn.c_attn.bias", "h/{i}/attn/c_attn/bias", False),
    ("h.{i}.attn.c_proj.weight", "h/{i}/attn/c_proj/kernel", False),
    ("h.{i}.attn.c_proj.bias", "h/{i}/attn/c_proj/bias", False),
    ("h.{i}.ln_2.weight", "h/{i}/ln_2/scale", False),
    ("h.{i}.ln_2.bias", "h/{i}/ln_2/bias", False),
    ("h.{i}.mlp.c_fc.weight", "h/{i}/mlp/c_fc/kernel", False),
    ("h.{i}.mlp.c_fc.bias", "h/{i}/mlp/c_fc/bias", False),
    ("h.{i}.mlp.c_proj.weight", "h/{i}/mlp/c_proj/kernel", False),
    ("h.{i}.mlp.c_proj.bias", "h/{i}/mlp/c_proj/bias", False),
    ("ln_f.weight", "ln_f/scale", False),
    ("ln_f.bias", "ln_f/bias", False),
]

HEAD_KEYS = {
    "base": [],
    "causal_lm": [],
    "sequence_classification": [("score.weight", "score/kernel", True)],
}

TIED_KEYS = {"lm_head.weight": "wte.weight"}


def _is_causal_mask(x, cfg):
    n = x.shape[-1]
    return (x.reshape(n, n) == jnp.tril(jnp.ones((n, n), x.dtype))).all()


# Old checkpoints (including OpenAI's `gpt2` on the hub) store the causal mask and a masking constant.
BUFFER_KEYS = {
    "h.{i}.attn.bias": _is_causal_mask,
    "h.{i}.attn.masked_bias": lambda x, cfg: x.size == 1,
}

OTHER_HEAD_PATTERNS = [r"score\..*", r"multiple_choice_head\..*", r"qa_outputs\..*", r"classifier\..*"]

# Checkpoint tensors with one slice per attention head (the fused query/key/value projection, columns: its
# output, a third each; the attention's output projection, rows: its input) or per MLP neuron (c_fc, columns;
# the MLP's c_proj, rows), in HF's Conv1D (in, out) layout; biases along their only axis.
_UNIT_TENSOR = re.compile(r"(?:^|\.)h\.(\d+)\.(?:attn\.(?:(?P<qkv>c_attn\.(?P<qkv_part>weight|bias))|"
                          r"(?P<attn_out>c_proj\.weight))|mlp\.(?:(?P<fc>c_fc\.(?P<fc_part>weight|bias))|"
                          r"(?P<mlp_out>c_proj\.weight)))$")


def _unit_slices(cfg: GPT2Config, key: str) -> UnitSlices | None:
    """Where a per-head or per-neuron tensor of a pruned layer keeps its units; None for any other tensor."""
    m = _UNIT_TENSOR.search(key)
    if m is None:
        return None
    layer = int(m[1])
    if m["qkv"] or m["attn_out"]:
        if layer not in dict(cfg.pruned_heads):
            return None
        heads, hs, d = cfg.kept_heads(layer), cfg.head_dim, cfg.n_embd
        if m["attn_out"]:
            return UnitSlices(head_columns(heads, hs), 0, d)
        index = np.concatenate([head_columns(heads, hs, offset=part * d) for part in range(3)])  # q, k, v thirds
        return UnitSlices(index, 1 if m["qkv_part"] == "weight" else 0, 3 * d)
    if layer not in dict(cfg.pruned_neurons):
        return None
    axis = 1 if m["fc_part"] == "weight" else 0  # c_fc's weight (D, F) and bias (F,); c_proj's weight (F, D)
    return UnitSlices(np.asarray(cfg.kept_neurons(layer)), axis, cfg.inner_dim)


def compact_units(cfg: GPT2Config, key: str, array: np.ndarray) -> np.ndarray:
    """A checkpoint tensor at the full width -> its kept heads' or neurons' rows or columns."""
    return compact(_unit_slices(cfg, key), array)


def expand_units(cfg: GPT2Config, key: str, array: np.ndarray) -> np.ndarray:
    """The inverse for export: the full width, zeros where the pruned heads or neurons were."""
    return expand(_unit_slices(cfg, key), array)


# ------------------------------------------------------------------------------------- the family record

FAMILY = Family(
    model_type="gpt2",
    config=GPT2Config,
    tasks=TASKS,
    hf_architectures=HF_ARCHITECTURES,
    num_layers=lambda cfg: cfg.n_layer,
    layers_field="n_layer",
    num_heads=lambda cfg: cfg.n_head,
    width=lambda cfg: cfg.n_embd,
    base_attr="transformer",
    base_keys=BASE_KEYS,
    head_keys=HEAD_KEYS,
    tied_keys=TIED_KEYS,
    buffer_keys=BUFFER_KEYS,
    other_head_patterns=OTHER_HEAD_PATTERNS,
    tensor_from_checkpoint=compact_units,
    tensor_to_checkpoint=expand_units,
    layer_container="h",
    embedding_modules=("wte", "wpe"),
    peft_targets={
        "lora": ("c_attn",),  # peft's default for GPT-2: the fused query/key/value projection
        # The fused projection is scaled whole (queries too), as peft does: keys and values alone would need a
        # scale with fixed ones over the query third.
        "ia3": ("c_attn", "mlp.c_proj"),
        "ia3_feedforward": ("mlp.c_proj",),
        "houlsby": ("attn.c_proj", "mlp.c_proj"),
        "pfeiffer": ("mlp.c_proj",),
    },
    # The classifier reads the last real token of each row: one example a row, no packing.
    packing_tasks=frozenset(),
    has_token_types=False,  # HF's GPT-2 tokenizer returns none; given zeros, GPT-2 would add wte[0] everywhere
    classifier_needs_pad_token=True,  # transformers finds each row's last token by pad_token_id
)
