"""Models and their Hugging Face checkpoint import/export. See `hf.from_pretrained` for the contract."""

from research.models.hf import (
    CheckpointError,
    CheckpointWarning,
    from_config,
    from_pretrained,
    load_tokenizer,
    save_pretrained,
)

__all__ = [
    "CheckpointError",
    "CheckpointWarning",
    "from_config",
    "from_pretrained",
    "load_tokenizer",
    "save_pretrained",
]
