"""What a model family provides: one `Family` record at the bottom of each model file (`bert.FAMILY`,
`gpt2.FAMILY`), registered in `research/models/families.py`.

Everything outside the model file learns about a family from this record and nothing else: checkpoint import
and export (`hf.py`) read the key tables, the optimizer (`optim.py`) the layer container, PEFT
(`research/peft/`) its default targets, the experiment
(`experiment.py`) and the attacks the capabilities. Adding a family (say RoBERTa) means one model file that
ends with its record, and one line in `families.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from flax import nnx

# A key table row: HF key (its base-model prefix stripped; "{i}" stands for a layer index), our parameter path
# ("/"-separated, "{i}" likewise), and whether the tensor is transposed (torch nn.Linear stores (out, in); our
# kernels are (in, out)).
KeyRow = tuple[str, str, bool]


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str  # config.json's "model_type" of the Hugging Face checkpoints this family reads
    config: type  # the frozen config dataclass, with from_hf_config / to_hf_config
    # task -> module class; `base` (the bare encoder/decoder) is always one of them
    tasks: dict[str, type[nnx.Module]]
    hf_architectures: dict[str, str]  # task -> transformers class name, written to an exported config.json
    num_layers: Callable[[Any], int]  # config -> number of transformer layers
    layers_field: str  # the config field (and config.json key) that sets the number of layers
    num_heads: Callable[[Any], int]  # config -> attention heads per layer
    width: Callable[[Any], int]  # config -> hidden size (the residual stream's width)

    # ---- the HF key tables (research/models/hf.py)
    base_attr: str  # attribute of the task classes that holds the base model; also HF's key prefix
    base_keys: list[KeyRow]  # the base model's parameters
    head_keys: dict[str, list[KeyRow]]  # task -> its head's parameters (paths inside the task model)
    # Tensors HF stores that duplicate another one (weight tying): HF key -> the key it must equal; dropped.
    tied_keys: dict[str, str] = dataclasses.field(default_factory=dict)
    # Non-learned buffers some checkpoints carry: HF key pattern -> check(tensor, config) of what it must hold.
    buffer_keys: dict[str, Callable] = dataclasses.field(default_factory=dict)
    # Heads of other tasks (pre-training heads, another task's classifier): dropped with a warning listing them.
    other_head_patterns: list[str] = dataclasses.field(default_factory=list)
    # task -> base-model paths that count as part of its head (initialized, with a warning, when missing).
    init_if_missing: dict[str, list[tuple]] = dataclasses.field(default_factory=dict)
    # (config, HF key, tensor) -> tensor, applied to every checkpoint tensor on the way in and out: where a
    # config stores less than transformers' shapes hold (BERT's pruned heads), and what export writes back.
    tensor_from_checkpoint: Callable[[Any, str, Any], Any] = lambda cfg, key, array: array
    tensor_to_checkpoint: Callable[[Any, str, Any], Any] = lambda cfg, key, array: array

    # ---- structure (layer-wise learning-rate decay in research/optim.py; adapters next)
    layer_container: str = "layers"  # the attribute holding the list of transformer layers
    embedding_modules: tuple[str, ...] = ()  # modules that count as embeddings (the lowest lr-decay group)

    # ---- parameter-efficient fine-tuning (research/peft/): the Hugging Face module names (peft's matching: a
    # plain name matches itself or any name ending in "." + it; anything else is a regex on the whole name) of
    # the linear layers each method attaches to by default. Keys: "lora", "ia3", "ia3_feedforward" (the IA3
    # targets that scale their input: the MLP's intermediate activations), "houlsby" (after the attention and
    # after the MLP), "pfeiffer" (after the MLP).
    peft_targets: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    # ---- capabilities
    # Tasks whose model takes packed rows (segment_ids, position_ids, pool_index: research/data/batches.py).
    packing_tasks: frozenset[str] = frozenset()
    # Has token-type (segment A/B) embeddings. Without them, batches carry no token_type_ids: GPT-2 given
    # zeros would add the embedding of token 0 to every position.
    has_token_types: bool = False
    # A sequence classifier reads the last token that is not pad_token_id (transformers' GPT-2): an exported
    # classifier fails on padded batches without a pad token, so training one without it is refused.
    classifier_needs_pad_token: bool = False

    def task_of(self, model: nnx.Module) -> str | None:
        """The task whose class `model` is, or None when it is not one of this family's. A subclass counts:
        qwix's quantization-aware models are subclasses of ours with an intercepted `__call__`."""
        return next((task for task, cls in self.tasks.items() if isinstance(model, cls)), None)
