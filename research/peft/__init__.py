"""Parameter-efficient fine-tuning: LoRA, AdaLoRA, IA3, bottleneck adapters (Houlsby, Pfeiffer), prefix and
prompt tuning on every family and task, trained with only their own parameters and the task head, exchangeable
with PyTorch `peft`.

    attach.py       attach a method to a model, freeze the rest (`Frozen`), fingerprint, merge, describe
    targets.py      Hugging Face module names of our layers, and peft's pattern matching (with errors)
    lora.py, adalora.py, ia3.py, bottleneck.py, prefix.py, prompt.py
                    one method each: its forward, folding, peft's tensor names (AdaLoRA: its rank allocator)
    interop.py      peft's directory format, both ways

`prepare(model, cfg, seed)` is what the runner calls (research/experiment.py) after loading the base model.
"""

from __future__ import annotations

from flax import nnx

from research.config import PeftConfig
from research.peft.adalora import allocator, ranks
from research.peft.attach import (
    Frozen,
    adalora_schedule,
    attach,
    describe,
    fingerprint,
    merge,
    merged_model,
    penalty,
    unmerge,
)
from research.peft.interop import load_adapter, save_adapter, trained_tensors
from research.peft.qlora import quantize_base
from research.peft.targets import PeftError

__all__ = ["Frozen", "PeftError", "adalora_schedule", "allocator", "attach", "describe", "fingerprint", "load_adapter",
           "merge", "merged_model", "penalty", "prepare", "ranks", "save_adapter", "trained_tensors", "unmerge"]


def prepare(model: nnx.Module, cfg: PeftConfig, seed: int) -> nnx.Module:
    """Attach `cfg.method` (nothing for "none") and, with `cfg.init_from`, load the adapter trained elsewhere."""
    if cfg.method == "none":
        return model
    attach(model, cfg, seed)
    if cfg.base_quantization == "nf4":  # QLoRA: the frozen base in NF4
        quantize_base(model)
    if cfg.init_from is not None:
        load_adapter(model, cfg.init_from)
    return model
