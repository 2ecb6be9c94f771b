"""Reading a Hugging Face `config.json` into one of our frozen config dataclasses, strictly.

- Keys that are fields of the dataclass are read.
- Keys every HF config carries (bookkeeping, generation defaults) are ignored.
- Keys that change the architecture in ways we do not implement must hold their default value, or we fail.
- Any other key is reported in a warning: a newer transformers may have added it, and we would rather say so
  than fail to load a real checkpoint or silently ignore it.
- Overrides passed by the user are strict: an unknown name is an error that suggests the closest field.
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from collections.abc import Callable
from typing import Any

import jax

# HF `hidden_act` / `activation_function` names -> JAX functions. "gelu" is the exact erf GELU (BERT);
# "gelu_new" and "gelu_pytorch_tanh" are the tanh approximation (GPT-2).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jax.numpy.tanh,
}


def check_activation(name: str, key: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"{key}={name!r} is not supported; supported: {sorted(ACTIVATIONS)}")


# Keys of transformers' PretrainedConfig (and common legacy keys) that carry no architecture information.
HF_BOOKKEEPING_KEYS = frozenset(
    {
        "_name_or_path", "name_or_path", "architectures", "model_type", "transformers_version",
        "torch_dtype", "dtype", "use_cache", "gradient_checkpointing", "return_dict", "output_hidden_states",
        "output_attentions", "torchscript", "use_bfloat16", "pruned_heads", "tie_word_embeddings",
        "is_encoder_decoder", "cross_attention_hidden_size", "tie_encoder_decoder", "finetuning_task",
        "label2id", "tokenizer_class", "prefix", "bos_token_id", "eos_token_id",
        "sep_token_id", "decoder_start_token_id", "task_specific_params", "max_length", "min_length",
        "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature",
        "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
        "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
        "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "chunk_size_feed_forward",
        "add_cross_attention", "is_decoder", "tf_legacy_loss", "_attn_implementation_autoset",
        "attn_implementation", "_commit_hash", "classifier_dropout",
    }
)


def build_config(
    cls: type,
    hf: dict[str, Any],
    overrides: dict[str, Any],
    required_values: dict[str, Any],
    *,
    model_type: str,
) -> Any:
    """Build `cls` from an HF config dict plus user overrides; see the module docstring for the rules."""
    if hf.get("model_type", model_type) != model_type:
        raise ValueError(
            f"config.json has model_type={hf['model_type']!r} but a {model_type!r} model was requested; "
            "load it with the matching model"
        )
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"unknown {cls.__name__} override(s): {', '.join(hints)}; valid keys: {sorted(fields)}"
        )

    merged = {**hf, **overrides}
    for key, required in required_values.items():
        if key in merged and merged[key] not in (required, None):
            raise ValueError(
                f"config key {key}={merged[key]!r} is not implemented by our {model_type} port "
                f"(only {required!r}); use a checkpoint without it"
            )
    ignored = sorted(set(hf) - fields - HF_BOOKKEEPING_KEYS - set(required_values))
    if ignored:
        warnings.warn(
            f"{model_type} config.json keys not used by our port (no effect on the model): {ignored}",
            stacklevel=3,
        )

    kwargs = {k: v for k, v in merged.items() if k in fields}
    # HF derives num_labels from id2label; an explicit num_labels override without labels resets the names.
    if "num_labels" in overrides and "id2label" not in overrides:
        kwargs["id2label"] = None
    elif "num_labels" not in kwargs and kwargs.get("id2label"):
        kwargs["num_labels"] = len(kwargs["id2label"])
    return cls(**kwargs)


def check_problem_type(problem_type: str | None, num_labels: int) -> None:
    """The problem types our heads train: single-label classification, and regression with one output."""
    if problem_type not in (None, "single_label_classification", "regression"):
        raise ValueError(f"problem_type={problem_type!r} is not supported (multi-label classification is not "
                         "implemented); use 'single_label_classification' or 'regression'")
    if problem_type == "regression" and num_labels != 1:
        raise ValueError(f"problem_type='regression' predicts one score, but num_labels={num_labels}; set "
                         "num_labels=1")


def normalize_labels(id2label: Any, num_labels: int) -> tuple[str, ...] | None:
    """HF's `id2label` ({"0": "negative", ...}) or a list of names -> a tuple indexed by label id, so the
    frozen config stays hashable (it is static under jit). Ids must be exactly 0..num_labels-1."""
    if id2label is None:
        return None
    if isinstance(id2label, dict):
        by_id = {int(i): str(name) for i, name in id2label.items()}
        if sorted(by_id) != list(range(len(by_id))):
            raise ValueError(f"id2label ids must be 0..{len(by_id) - 1}, got {sorted(by_id)}")
        names = tuple(by_id[i] for i in range(len(by_id)))
    else:
        names = tuple(str(name) for name in id2label)
    if len(names) != num_labels:
        raise ValueError(
            f"id2label has {len(names)} entries but num_labels={num_labels}; pass matching num_labels and id2label"
        )
    return names
