"""Bookkeeping for structurally pruned models (research/compress/structured.py), shared by the families.

A config lists the attention heads and MLP neurons removed from each layer (`pruned_heads`, `pruned_neurons`:
HF's {"layer": [units]}, held as ((layer, (unit, ...)), ...) to stay hashable). A pruned layer is built narrower.
Checkpoints for transformers keep the full shapes with zeros where the pruned units were, which computes the
same (a unit whose outgoing weights are zero adds nothing; transformers 5 cannot prune heads, and no version has
per-layer MLP widths); loading takes those rows or columns out again. Each family says which of its checkpoint
tensors have one slice per head or per neuron (`UnitSlices`); the slicing itself is here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


class UnitSlices(NamedTuple):
    index: np.ndarray  # the kept units' rows or columns, in the full tensor
    axis: int  # the axis that runs over units
    full: int  # that axis's size before pruning


def normalize_pruned(pruned: Any, layers: int, units: int, key: str) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """{layer: units} (keys may be strings, as in config.json) or pairs -> sorted ((layer, (unit, ...)), ...)."""
    items = pruned.items() if isinstance(pruned, dict) else pruned
    out = {}
    for layer, us in items:
        layer, us = int(layer), tuple(sorted({int(u) for u in us}))
        if not 0 <= layer < layers or not all(0 <= u < units for u in us):
            raise ValueError(f"{key}: layer {layer}, units {list(us)[:8]} outside the model's {layers} layers of "
                             f"{units}")
        if len(us) == units:
            raise ValueError(f"{key}: layer {layer} would keep no head or neuron; keep at least one per layer")
        if us:
            out[layer] = us
    return tuple(sorted(out.items()))


def kept(pruned: tuple[tuple[int, tuple[int, ...]], ...], layer: int, units: int) -> tuple[int, ...]:
    """The original indices of the units layer `layer` keeps."""
    gone = set(dict(pruned).get(layer, ()))
    return tuple(u for u in range(units) if u not in gone)


def head_columns(heads: tuple[int, ...], head_dim: int, offset: int = 0) -> np.ndarray:
    """The features of `heads` in a (heads x head_dim)-wide projection starting at `offset`."""
    return np.concatenate([np.arange(offset + h * head_dim, offset + (h + 1) * head_dim) for h in heads])


def compact(found: UnitSlices | None, array: np.ndarray) -> np.ndarray:
    """A checkpoint tensor at the full width -> its kept units' rows or columns (already compact: unchanged)."""
    if found is None or array.shape[found.axis] != found.full:
        return array
    return np.take(array, found.index, axis=found.axis)


def expand(found: UnitSlices | None, array: np.ndarray) -> np.ndarray:
    """The inverse, for export: the full width, zeros where the pruned units were."""
    if found is None:
        return array
    shape = list(array.shape)
    shape[found.axis] = found.full
    out = np.zeros(shape, array.dtype)
    if found.axis == 0:
        out[found.index] = array
    else:
        out[:, found.index] = array
    return out
