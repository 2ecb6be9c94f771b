"""GPT-2 decoding with a static-shape KV cache, compiled once per (batch, prompt length, settings).

Prompts are left-padded to a common length P so every row writes its next token into the same cache slot;
positions count only real tokens, so padding does not shift them. The whole loop (prefill, then one token
per `lax.while_loop` step) runs inside one `jax.jit`; it stops early once every row has produced EOS.
Sampling follows transformers' processor order: temperature, then top-k, then top-p.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.models.gpt2 import GPT2LMHeadModel, GPT2Model, KVCache, positions_from_mask


def _filter_top_k(logits_bv: jax.Array, k: int) -> jax.Array:
    kth_b1 = jax.lax.top_k(logits_bv, k)[0][:, -1:]  # (B, 1): the k-th largest logit
    return jnp.where(logits_bv < kth_b1, -jnp.inf, logits_bv)


def _filter_top_p(logits_bv: jax.Array, p: jax.Array) -> jax.Array:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one token)."""
    order_bv = jnp.argsort(logits_bv, axis=-1)  # ascending, as transformers' TopPLogitsWarper
    sorted_bv = jnp.take_along_axis(logits_bv, order_bv, axis=-1)
    cumulative_bv = jnp.cumsum(jax.nn.softmax(sorted_bv, axis=-1), axis=-1)
    remove_sorted_bv = (cumulative_bv <= 1 - p).at[:, -1].set(False)
    remove_bv = jnp.zeros_like(remove_sorted_bv).at[jnp.arange(logits_bv.shape[0])[:, None], order_bv].set(
        remove_sorted_bv
    )
    return jnp.where(remove_bv, -jnp.inf, logits_bv)


def start_cache(base: GPT2Model, batch: int, length: int) -> KVCache:
    """An empty cache for `length` tokens, after the model's virtual tokens when PEFT gave it some: prefix
    tuning's keys and values fill the first P slots as they are; prompt tuning's virtual tokens run through the
    model first. Either way the input's positions then start at P, as in training."""
    V = base.virtual_tokens
    cache = KVCache.create(base.config, batch, V + length)
    if base.prefix is not None:
        kv = base.prefix.keys_values(batch, cache.keys[0].dtype)  # per layer (B, nh, V, hs)
        keys = tuple(jax.lax.dynamic_update_slice(c, k, (0, 0, 0, 0)) for c, (k, _) in zip(cache.keys, kv, strict=True))
        values = tuple(jax.lax.dynamic_update_slice(c, v, (0, 0, 0, 0)) for c, (_, v) in zip(cache.values, kv,
                                                                                                 strict=True))
        return KVCache(keys, values, cache.valid.at[:, :V].set(True), jnp.asarray(V, jnp.int32))
    if base.prompt is not None:
        prompt_bvd = jnp.broadcast_to(base.prompt.embedding[...], (batch, V, base.config.n_embd))
        positions_bv = jnp.broadcast_to(jnp.arange(V), (batch, V))
        _, cache = base(inputs_embeds=prompt_bvd, attention_mask=jnp.ones((batch, V), jnp.int32),
                        position_ids=positions_bv, cache=cache)
    return cache


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "do_sample", "top_k", "eos_token_id", "pad_token_id"),
)
def _generate(graphdef, state, input_ids_bp, attention_mask_bp, rng, temperature, top_p, *,
              max_new_tokens, do_sample, top_k, eos_token_id, pad_token_id):
    model = nnx.merge(graphdef, state)
    B, P = input_ids_bp.shape
    V = model.transformer.virtual_tokens  # PEFT's prefix or prompt: positions start after it
    cache = start_cache(model.transformer, B, P + max_new_tokens)
    logits_bpv, cache = model(input_ids_bp, attention_mask_bp,
                              position_ids=positions_from_mask(attention_mask_bp) + V, cache=cache)
    n_real_b = attention_mask_bp.astype(jnp.int32).sum(-1)  # next position of each row
    tokens_bs = jnp.concatenate([input_ids_bp, jnp.full((B, max_new_tokens), pad_token_id, input_ids_bp.dtype)], 1)

    def choose(logits_bv, t):
        if not do_sample:
            return jnp.argmax(logits_bv, axis=-1)
        logits_bv = logits_bv / temperature
        if top_k > 0:
            logits_bv = _filter_top_k(logits_bv, top_k)
        logits_bv = _filter_top_p(logits_bv, top_p)
        return jax.random.categorical(jax.random.fold_in(rng, t), logits_bv, axis=-1)

    def cond(carry):
        t, _, _, _, done_b = carry
        return (t < max_new_tokens) & ~jnp.all(done_b)

    def body(carry):
        t, tokens_bs, cache, logits_bv, done_b = carry
        next_b = jnp.where(done_b, pad_token_id, choose(logits_bv, t)).astype(tokens_bs.dtype)
        tokens_bs = jax.lax.dynamic_update_slice(tokens_bs, next_b[:, None], (0, P + t))
        if eos_token_id is not None:
            done_b = done_b | (next_b == eos_token_id)
        # Feed the chosen token; on the last step this forward is wasted, which keeps the loop branch-free.
        logits_b1v, cache = model(next_b[:, None], jnp.ones((B, 1), jnp.int32),
                                  position_ids=(n_real_b + t + V)[:, None], cache=cache)
        return t + 1, tokens_bs, cache, logits_b1v[:, -1], done_b

    carry = (jnp.int32(0), tokens_bs, cache, logits_bpv[:, -1], jnp.zeros((B,), bool))
    return jax.lax.while_loop(cond, body, carry)[1]


def generate(
    model: GPT2LMHeadModel,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = -1,
    pad_token_id: int | None = None,
    seed: int = 0,
) -> jax.Array:
    """Continue left-padded prompts (B, P) by `max_new_tokens`; returns (B, P + max_new_tokens) token ids.

    Greedy unless `do_sample`. `eos_token_id=-1` means the model config's EOS; `None` disables stopping.
    Rows that finished, and every row once all have finished, are filled with `pad_token_id` (default: EOS).
    """
    if not isinstance(model, GPT2LMHeadModel):
        raise TypeError(f"generate needs a GPT2LMHeadModel (task 'causal_lm'), got {type(model).__name__}")
    cfg = model.config
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    mask = np.asarray(attention_mask)
    if (np.diff(mask, axis=1) < 0).any():
        raise ValueError("prompts must be left-padded: some attention_mask row has a 0 after a 1")
    if not mask[:, -1].all():
        raise ValueError("every prompt needs at least one real token at the end (left padding only)")
    V = model.transformer.virtual_tokens
    if V + input_ids.shape[1] + max_new_tokens > cfg.n_positions:
        raise ValueError(f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens}"
                         + (f" + {V} virtual tokens (PEFT)" if V else "") + f" exceeds n_positions={cfg.n_positions}")
    if do_sample and temperature <= 0:
        raise ValueError("temperature must be > 0 when sampling; use do_sample=False for greedy decoding")
    if not 0 <= top_k <= cfg.vocab_size:
        raise ValueError(f"top_k={top_k} must be in [0, vocab_size={cfg.vocab_size}] (0 disables it)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    eos = cfg.eos_token_id if eos_token_id == -1 else eos_token_id
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else eos)
    if pad is None:
        raise ValueError("no pad_token_id and no eos_token_id: pass pad_token_id")
    graphdef, state = nnx.split(nnx.view(model, deterministic=True))
    return _generate(graphdef, state, input_ids, attention_mask, jax.random.key(seed), jnp.float32(temperature),
                     jnp.float32(top_p), max_new_tokens=max_new_tokens, do_sample=do_sample, top_k=top_k,
                     eos_token_id=eos, pad_token_id=pad)


def complete(model: GPT2LMHeadModel, tokenizer, prompts: list[str], *, max_new_tokens: int, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[str]:
    """Text continuations of `prompts` (GPT-2 BPE, no special tokens added), each cut at the first EOS."""
    if not prompts:
        return []
    encoded = [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
    if not all(encoded):
        empty = [p for p, e in zip(prompts, encoded, strict=True) if not e]
        raise ValueError(f"every prompt needs at least one token: {empty}")
    eos = model.config.eos_token_id
    width = max(map(len, encoded))
    ids = np.full((len(prompts), width), eos, np.int32)  # left padding: every row ends at column P - 1
    mask = np.zeros((len(prompts), width), np.int32)
    for row, e in enumerate(encoded):
        ids[row, width - len(e):] = e
        mask[row, width - len(e):] = 1
    out = np.asarray(generate(model, ids, mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                              temperature=temperature, top_k=top_k, top_p=top_p, seed=seed))
    texts = []
    for row in out[:, width:]:
        stop = np.flatnonzero(row == eos)
        texts.append(tokenizer.decode(row[: stop[0] if len(stop) else len(row)].tolist()))
    return texts
