"""Which layers a PEFT method attaches to, named the way Hugging Face and peft name them.

Every parameter of our models has a Hugging Face name through its family's key table
(research/models/family.py): `bert/layers/3/attention/query/kernel` is `bert.encoder.layer.3.attention.self.query
.weight`. A module's name is its parameters' name without the last part, so `peft.targets=["query"]` means
what it means in peft, and an exported adapter carries the names peft expects.

Matching is peft's: a plain name (letters, digits, `_` and `.`) matches a module whose name is it or ends with
"." + it; any other pattern is a regex matched against the whole name. Unlike peft, a pattern that matches
nothing is an error that lists the names it could have matched.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from flax import nnx

from research.models.families import family_of
from research.models.family import Family
from research.models.hf import key_table
from research.models.linear import Linear


class PeftError(ValueError):
    """A PEFT setting or adapter that cannot be used; the message names the culprit and the fix."""


def task_of(model: nnx.Module) -> tuple[Family, str]:
    family = family_of(model)
    task = family.task_of(model)
    if task is None:
        raise PeftError(f"{type(model).__name__} is not one of {family.model_type}'s task models")
    return family, task


def parameter_names(model: nnx.Module) -> dict[tuple, str]:
    """Our parameter path (in the task model) -> its full Hugging Face key (`bert.` / `transformer.` prefixed
    for base weights), for every parameter the family's key table names."""
    family, task = task_of(model)
    out = {}
    for key, (path, _) in key_table(family, model.config, task).items():
        full = family.base_attr + "." + key if task != "base" and path[0] == family.base_attr else key
        out[path] = full
    return out


def transposed(model: nnx.Module) -> dict[tuple, bool]:
    """Our parameter path -> whether HF stores it transposed (torch nn.Linear: (out, in); GPT-2's Conv1D and
    our kernels: (in, out))."""
    family, task = task_of(model)
    return {path: t for path, t in key_table(family, model.config, task).values()}


def module_at(model: nnx.Module, path: tuple) -> nnx.Module:
    node = model
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def linear_layers(model: nnx.Module) -> dict[str, tuple]:
    """Hugging Face module name -> our module path, for every `Linear` of the model, in path order (layer 0's
    first)."""
    out = {}
    for path, name in sorted(parameter_names(model).items()):
        if path[-1] == "kernel" and isinstance(module_at(model, path[:-1]), Linear):
            out[name.rsplit(".", 1)[0]] = path[:-1]
    return out


def matches(pattern: str, name: str) -> bool:
    if re.fullmatch(r"[\w.]+", pattern):
        return name == pattern or name.endswith("." + pattern)
    return re.fullmatch(pattern, name) is not None


def select(patterns: Iterable[str], names: Iterable[str], what: str) -> list[str]:
    """The names any pattern matches (in `names`' order); a pattern that matches none is an error."""
    names, patterns = list(names), list(patterns)
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise PeftError(f"{what}: {pattern!r} is not a valid regex ({e})") from None
        if not any(matches(pattern, n) for n in names):
            # Layer indices folded ({i}): the list stays short however deep the model is.
            shown = ", ".join(dict.fromkeys(re.sub(r"\.\d+\.", ".{i}.", n) for n in names))
            raise PeftError(f"{what}: {pattern!r} matches no layer of the model. A plain name matches a module named "
                            f"it or ending in '.' + it; anything else is a regex on the whole name. Names: {shown}")
    return [n for n in names if any(matches(p, n) for p in patterns)]


def block_linears(model: nnx.Module, patterns: Iterable[str], what: str) -> dict[str, tuple]:
    """Hugging Face module name -> our module path of the linear layers `patterns` select (matched as above);
    no patterns: every linear layer inside the transformer layers (attention and MLP; not the embeddings, the
    pooler or the head). What pruning and quantization work on."""
    layers, patterns = linear_layers(model), tuple(patterns)
    if patterns:
        return {name: layers[name] for name in select(patterns, layers, what)}
    container = family_of(model).layer_container
    return {name: path for name, path in layers.items() if container in path}
