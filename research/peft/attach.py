"""Attaching a PEFT method to a model, freezing the rest, and taking it apart again.

`attach` puts the method's module on each target `Linear` (`layer.adapter`, research/models/linear.py), then
turns every other weight into a `Frozen` variable except the modules trained in full (`modules_to_save`).
`Frozen` is not an `nnx.Param`, and everything in this codebase that trains, checkpoints or restores splits
the model by `nnx.Param`: frozen weights thus ride with the model's non-parameter state (like the dropout
RNG streams), so the train step computes no gradient for them, the optimizer keeps no state for them, and
checkpoints leave them out. `fingerprint` identifies them instead.
"""

from __future__ import annotations

import hashlib

import jax
import numpy as np
from flax import nnx

from research.config import PeftConfig
from research.models.hf import from_config
from research.models.hf_config import ACTIVATIONS
from research.peft.bottleneck import Bottleneck
from research.peft.ia3 import IA3
from research.peft.lora import LoRA
from research.peft.targets import PeftError, linear_layers, module_at, parameter_names, select, task_of


class Frozen(nnx.Variable):
    """A pretrained weight that PEFT does not train (see the module docstring)."""


METHODS = {"lora": LoRA, "ia3": IA3, "bottleneck": Bottleneck}


def attach(model: nnx.Module, cfg: PeftConfig, seed: int) -> None:
    """Attach `cfg.method` to `model` (in place) and freeze everything else but `cfg.modules_to_save`."""
    family, task = task_of(model)
    layers = linear_layers(model)
    key = cfg.adapter_placement if cfg.method == "bottleneck" else cfg.method
    chosen = select(cfg.targets or family.peft_targets[key], layers, "peft.targets")
    feedforward = set()
    if cfg.method == "ia3":
        feedforward = set(select(cfg.feedforward or family.peft_targets["ia3_feedforward"], chosen,
                                 "peft.feedforward (among the IA3 targets)"))
    activation = cfg.adapter_activation or {"houlsby": "swish", "pfeiffer": "relu"}[cfg.adapter_placement]
    if activation not in ACTIVATIONS:
        raise PeftError(f"peft.adapter_activation={activation!r} is not supported; choose from {sorted(ACTIVATIONS)}")
    rngs = nnx.Rngs(seed)  # one stream, as the models' own: `nnx.reseed(default=...)` reseeds the dropout
    for name in chosen:
        layer = module_at(model, layers[name])
        if cfg.method == "lora":
            if cfg.rank > min(layer.in_features, layer.out_features):
                raise PeftError(f"peft.rank={cfg.rank} exceeds {name} ({layer.in_features} -> {layer.out_features}): "
                                "a rank above the smaller side adds parameters and no expressiveness; lower it")
            layer.adapter = LoRA(layer, cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora, rngs=rngs)
        elif cfg.method == "ia3":
            layer.adapter = IA3(layer, feedforward=name in feedforward)
        else:
            layer.adapter = Bottleneck(layer, cfg.adapter_size, activation, rngs=rngs)

    names = parameter_names(model)
    modules = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names.values()))
    head = list(dict.fromkeys(k.rsplit(".", 1)[0] for k, _, _ in family.head_keys[task]))
    save = select(cfg.modules_to_save if cfg.modules_to_save is not None else head, modules, "peft.modules_to_save")
    trained = {path for path, n in names.items() if n.rsplit(".", 1)[0] in save}
    for path, node in list(nnx.iter_graph(model)):
        if not isinstance(node, nnx.Module) or "adapter" in path:
            continue
        for attr, value in list(vars(node).items()):
            if type(value) is nnx.Param and (*path, attr) not in trained:
                setattr(node, attr, Frozen(value.get_value()))
    model.eval()  # the new dropout layers too (the runner switches to train mode itself)


def adapters(model: nnx.Module) -> dict[str, tuple[nnx.Module, nnx.Module]]:
    """HF module name -> (layer, its adapter) for every layer that has one, in model order."""
    out = {}
    for name, path in linear_layers(model).items():
        layer = module_at(model, path)
        if layer.adapter is not None:
            out[name] = (layer, layer.adapter)
    return out


def method_of(model: nnx.Module) -> str:
    kinds = {type(a) for _, a in adapters(model).values()}
    return next((m for m, cls in METHODS.items() if kinds == {cls}), "none")


def trained_modules(model: nnx.Module) -> list[str]:
    """HF module names of the parameters trained in full (outside the adapters)."""
    names = parameter_names(model)
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return list(dict.fromkeys(names[p].rsplit(".", 1)[0] for p, _ in params if "adapter" not in p and p in names))


def fingerprint(model: nnx.Module) -> str:
    """sha256 of the frozen weights (paths, dtypes, shapes and bytes): what a checkpoint of trained
    parameters alone was trained against."""
    digest = hashlib.sha256()
    for path, var in sorted(nnx.to_flat_state(nnx.state(model, Frozen)), key=lambda item: str(item[0])):
        array = np.asarray(jax.device_get(var.get_value()))
        digest.update(f"{'/'.join(map(str, path))}:{array.dtype}:{array.shape};".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def describe(model: nnx.Module) -> dict:
    """What PEFT did to `model`: the method, the layers it attached to, what trains in full, parameter counts
    and the base's fingerprint (written to the run directory as peft.json)."""
    count = lambda f: sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model, f)))  # noqa: E731
    trained, frozen = count(nnx.Param), count(Frozen)
    return {"method": method_of(model), "layers": list(adapters(model)), "modules_to_save": trained_modules(model),
            "trained_parameters": trained, "frozen_parameters": frozen,
            "trained_percent": round(100.0 * trained / max(trained + frozen, 1), 4),
            "base_fingerprint": fingerprint(model)}


def merge(model: nnx.Module) -> None:
    """Fold every adapter into its layer's weights (in place; the model computes the same function)."""
    for layer, adapter in adapters(model).values():
        if isinstance(adapter, Bottleneck):
            raise PeftError("bottleneck adapters put a non-linearity between their projections and cannot be folded "
                            "into the weights; use the model as it is, or export without --merged")
        adapter.merge(layer)


def unmerge(model: nnx.Module) -> None:
    for layer, adapter in adapters(model).values():
        adapter.unmerge(layer)


def merged_model(model: nnx.Module) -> nnx.Module:
    """A plain model of the same family and task (every weight an `nnx.Param`, no adapters) with the updates
    folded in: what `research export --merged` writes, and what transformers loads without peft."""
    family, task = task_of(model)
    weights = nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, Frozen)))
    values = {p: v.get_value() for p, v in weights if "adapter" not in p}
    for name, (layer, adapter) in adapters(model).items():
        folded = adapter.folded(layer)
        if folded is None:
            raise PeftError(f"{name}: bottleneck adapters put a non-linearity between their projections and cannot "
                            "be folded into the weights; export without --merged")
        path = linear_layers(model)[name]
        values.update({(*path, k): v for k, v in folded.items()})
    plain = from_config(model.config, task)
    state = nnx.state(plain, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        var.set_value(values[path].astype(var.get_value().dtype))
    nnx.update(plain, state)
    if getattr(model, "hf_source", None):
        plain.hf_source = model.hf_source
    return plain
