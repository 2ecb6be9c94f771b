"""From an experiment config to its pieces: the tokenizer, the checked data of every split, and the model
(pretrained or from scratch), checked against what its family supports.

Training, evaluation and export all build their model here, so a run directory always rebuilds the model
it was trained with (research/run.py reads the run's config.json back).
"""

from __future__ import annotations

import dataclasses
import warnings

from flax import nnx

from research import peft
from research.config import ConfigError, ExperimentConfig
from research.data import classification, dialogue, lm, tagging
from research.data.split import DataError, Split, data_root
from research.models import from_config, from_pretrained, load_tokenizer
from research.models.families import FAMILIES, family_of
from research.models.hf import read_hf_config, resolve_checkpoint_dir


@dataclasses.dataclass
class Pieces:
    tokenizer: object
    labels: tuple[str, ...]
    train: Split | None
    dev: Split
    model: nnx.Module  # in eval mode; the runner switches it to train mode for the train step
    pad_id: int
    tests: dict[str, Split] = dataclasses.field(default_factory=dict)  # data.test: evaluated beside dev
    teacher: nnx.Module | None = None  # distill.in_step: the frozen teacher the train step runs


def prepare(cfg: ExperimentConfig, with_train: bool = True, init_adapter: bool = True) -> Pieces:
    """Load the tokenizer, read and check the data, and build the model (pretrained or from scratch).
    `init_adapter=False`: leave peft.init_from unread (a run's own checkpoint is restored over it)."""
    tokenizer = load_tokenizer(model_source(cfg.model.name_or_path))
    if cfg.model.task == "token_classification":  # CoNLL-style column files, labels per word
        load_split = tagging.load_split
    elif cfg.model.task == "causal_lm":  # text into next-token windows; no label set
        eos_id = tokenizer.token_to_id("<|endoftext|>")
        if eos_id is None:
            raise DataError(f"the tokenizer of {cfg.model.name_or_path} has no <|endoftext|> token to end documents "
                            "with: causal LM training needs GPT-2's tokenizer")

        def load_split(data, name, tok, labels, seed):
            if data.lm_format == "camrest676":
                return dialogue.load_split(data, name, tok, eos_id)
            return lm.load_split(data, name, tok, eos_id)
    elif cfg.model.problem_type == "regression":  # a float score per example
        def load_split(data, name, tok, labels, seed):
            return classification.load_split(data, name, tok, None, seed, regression=True)
    else:
        load_split = classification.load_split
    train = load_split(cfg.data, "train", tokenizer, cfg.data.labels, cfg.train.seed) if with_train else None
    if cfg.model.task == "causal_lm":
        labels = ()
    elif cfg.model.problem_type == "regression":
        labels = (cfg.data.label_column,)  # the one output, named after the score it predicts
    elif cfg.data.labels is not None:
        labels = cfg.data.labels
    elif train is not None:
        labels = tuple(train.report.label_counts)  # inferred from the training split, in id order
    else:
        raise ConfigError("data.labels must be set when the training split is not read (evaluation only)")
    dev = load_split(cfg.data, "dev", tokenizer, labels, cfg.train.seed)
    tests = {name: load_split(cfg.data, name, tokenizer, labels, cfg.train.seed) for name in cfg.data.test}
    sp = cfg.data.spurious
    for a in sp.test_agreements if sp is not None else ():  # the dev split again, with other marker agreements
        shifted = dataclasses.replace(cfg.data, spurious=dataclasses.replace(sp, dev_agreement=a))
        split = load_split(shifted, "dev", tokenizer, labels, cfg.train.seed)
        tests[f"agree{a:g}"] = dataclasses.replace(split, name=f"agree{a:g}",
                                                   report=dataclasses.replace(split.report, name=f"agree{a:g}"))
    model = build_model(cfg, labels, init_adapter)
    family = family_of(model)
    if (cfg.model.task == "sequence_classification" and family.classifier_needs_pad_token
            and model.config.pad_token_id is None):
        # Our GPT-2 classifier reads the last position the attention mask keeps, but transformers' reads the
        # last token that is not pad_token_id: an exported classifier without one fails on padded batches.
        raise ConfigError(f"model: {cfg.model.name_or_path} is a {family.model_type} without a pad token, which its "
                          "classifier needs (transformers finds each row's last token by it); set model.overrides="
                          '{..., "pad_token_id": 50256} (<|endoftext|>, the usual choice)')
    if cfg.data.pack_length is not None and cfg.model.task not in family.packing_tasks:
        raise ConfigError(f"data.pack_length: {type(model).__name__} does not take packed rows (segment_ids, "
                          "pool_index); set data.pack_length=null to pad instead")
    if not family.has_token_types:  # e.g. GPT-2: batches carry no token types (see research/batch.py)
        train, dev = (dataclasses.replace(s, token_type_ids=None) if s is not None else None for s in (train, dev))
        tests = {name: dataclasses.replace(s, token_type_ids=None) for name, s in tests.items()}
    pad_id = model.config.pad_token_id if getattr(model.config, "pad_token_id", None) is not None else 0
    vocab = model.config.vocab_size
    for split in (s for s in (train, dev, *tests.values()) if s is not None):
        top = max(int(ids.max()) for ids in split.input_ids)
        if top >= vocab:
            raise DataError(f"the tokenizer of {cfg.model.name_or_path} produced token id {top} in the {split.name} "
                            f"split, but the model's vocab_size is {vocab}: tokenizer and model do not match")
    return Pieces(tokenizer, labels, train, dev, model, pad_id, tests)


def model_source(name_or_path: str) -> str:
    """`data:<folder>` resolved under the data root; anything else as it is (see ModelConfig.name_or_path)."""
    if name_or_path.startswith("data:"):
        return str(data_root() / name_or_path.removeprefix("data:"))
    return name_or_path


def build_model(cfg: ExperimentConfig, labels: tuple[str, ...], init_adapter: bool = True,
                quantization_aware: bool = True) -> nnx.Module:
    """The model as the config builds it: pretrained or from scratch, then with its PEFT method attached (the
    rest frozen; research/peft/), starting from peft.init_from's adapter unless `init_adapter` is False; under
    qat.method, computing with quantized weights (research/compress/quantize.py) unless `quantization_aware` is
    False (the float model, e.g. to export)."""
    p = cfg.peft if init_adapter else dataclasses.replace(cfg.peft, init_from=None)
    model = peft.prepare(_base_model(cfg, labels), p, cfg.train.seed)
    if cfg.qat.method != "none" and quantization_aware:
        from research.compress import quantize  # qwix loads only when asked for

        model = quantize.qat(model, cfg.qat.method, cfg.qat.targets)
    return model


def _base_model(cfg: ExperimentConfig, labels: tuple[str, ...]) -> nnx.Module:
    m = cfg.model
    label_args = {"num_labels": len(labels), "id2label": labels} if labels else {}  # none for causal LM
    if m.problem_type == "regression":  # one output, named after the score it predicts (as prepare's labels);
        # problem_type is kept in the model config, so an export loads in transformers as a regressor
        label_args = {"num_labels": 1, "id2label": (cfg.data.label_column,), "problem_type": "regression"}
    source = model_source(m.name_or_path)
    if m.init == "pretrained":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = from_pretrained(source, m.task, seed=cfg.train.seed, layers=m.layers, **label_args,
                                    **m.overrides)
        for w in caught:  # the new classification head is expected; print it rather than bury it in warnings
            print(f"model: {w.message}")
        return model
    directory = resolve_checkpoint_dir(source)
    # A tokenizer-only folder (model.model_type) gets the architecture's defaults; a model folder its config.
    hf = {"model_type": m.model_type} if m.model_type is not None else read_hf_config(directory)
    if hf.get("model_type") not in FAMILIES:
        raise ConfigError(f"model.name_or_path: {directory} has model_type={hf.get('model_type')!r}; "
                          f"supported: {sorted(FAMILIES)}")
    model_cfg = FAMILIES[hf["model_type"]].config.from_hf_config(hf, **label_args, **m.overrides)
    model = from_config(model_cfg, m.task, seed=cfg.train.seed)
    model.hf_source = str(directory)  # tokenizer files for export
    return model
