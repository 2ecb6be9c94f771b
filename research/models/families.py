"""The model families we have, by Hugging Face `model_type`. A new family is a new model file that ends with its
`FAMILY` record (research/models/family.py says what a record holds), and one line here."""

from __future__ import annotations

from flax import nnx

from research.models import bert, gpt2
from research.models.family import Family

FAMILIES: dict[str, Family] = {f.model_type: f for f in (bert.FAMILY, gpt2.FAMILY)}


def family_of(config_or_model) -> Family:
    """The family of a model config (BertConfig, GPT2Config, ...) or of a model built from one."""
    config = config_or_model.config if isinstance(config_or_model, nnx.Module) else config_or_model
    for family in FAMILIES.values():
        if isinstance(config, family.config):
            return family
    raise TypeError(f"{type(config).__name__} is not the config of a model family; known: {sorted(FAMILIES)}")
