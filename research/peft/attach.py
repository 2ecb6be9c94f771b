"""Attaching a PEFT method to a model, freezing the rest, and taking it apart again.

`attach` puts the method's module on each target `Linear` (`layer.adapter`, research/models/linear.py: LoRA,
AdaLoRA, IA3, bottleneck adapters) or in the base model's `prompt` / `prefix` slot (prompt and prefix tuning),
then turns every other weight into a `Frozen` variable except the modules trained in full (`modules_to_save`).
`Frozen` is not an `nnx.Param`, and everything in this codebase that trains, checkpoints or restores splits
the model by `nnx.Param`: frozen weights thus ride with the model's non-parameter state (like the dropout
RNG streams), so the train step computes no gradient for them, the optimizer keeps no state for them, and
checkpoints leave them out. `fingerprint` identifies them instead.
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from research.config import PeftConfig
from research.models.hf import from_config, load_tokenizer
from research.models.hf_config import ACTIVATIONS
from research.peft.adalora import AdaLoRA, Schedule
from research.peft.bottleneck import Bottleneck
from research.peft.ia3 import IA3
from research.peft.lora import LoRA
from research.peft.prefix import Prefix
from research.peft.prompt import Prompt
from research.peft.targets import PeftError, linear_layers, module_at, parameter_names, select, task_of


class Frozen(nnx.Variable):
    """A pretrained weight that PEFT does not train (see the module docstring)."""


METHODS = {"lora": LoRA, "adalora": AdaLoRA, "ia3": IA3, "bottleneck": Bottleneck, "prefix": Prefix, "prompt": Prompt}
SLOTS = ("adapter", "prompt", "prefix")  # where the methods' modules hang: a parameter under one is the method's


def base_of(model: nnx.Module) -> nnx.Module:
    """The base model (BertModel, GPT2Model) inside a task model: where prompts and prefixes go."""
    family, task = task_of(model)
    return model if task == "base" else getattr(model, family.base_attr)


def virtual(model: nnx.Module) -> Prompt | Prefix | None:
    """The model's prompt (prompt tuning) or prefix (prefix tuning), if it has one."""
    base = base_of(model)
    return base.prompt if base.prompt is not None else base.prefix


def is_method_parameter(path: tuple) -> bool:
    return any(slot in path for slot in SLOTS)


def attach(model: nnx.Module, cfg: PeftConfig, seed: int) -> None:
    """Attach `cfg.method` to `model` (in place) and freeze everything else but `cfg.modules_to_save`."""
    rngs = nnx.Rngs(seed)  # one stream, as the models' own: `nnx.reseed(default=...)` reseeds the dropout
    if cfg.method in ("prefix", "prompt"):
        _attach_virtual(model, cfg, rngs)
    else:
        _attach_to_layers(model, cfg, rngs)
    _freeze(model, cfg)
    model.eval()  # the new dropout layers too (the runner switches to train mode itself)


def _attach_virtual(model: nnx.Module, cfg: PeftConfig, rngs: nnx.Rngs) -> None:
    family, _ = task_of(model)
    base, c = base_of(model), model.config
    heads, width = family.num_heads(c), family.width(c)
    if cfg.method == "prefix":
        if getattr(c, "pruned_heads", ()):  # peft's prefix table has every head of every layer
            raise PeftError(f"prefix tuning on a model with pruned attention heads ({dict(c.pruned_heads)}): peft's "
                            "prefix layout needs every layer's full head count; use another method, or prune after")
        prefix = Prefix(cfg.num_virtual_tokens, family.num_layers(c), heads, width // heads, cfg.prefix_projection,
                        cfg.prefix_hidden_size or width, rngs=rngs)
        if cfg.prefix_init == "vocab":
            ids_1p = jax.random.randint(rngs.params(), (1, cfg.num_virtual_tokens), 0, c.vocab_size)
            prefix.set_table(real_words(base, family.layer_container, ids_1p))
        base.prefix = prefix
        return
    P = cfg.num_virtual_tokens
    if cfg.prompt_init == "random":  # Lester et al.'s random init
        init_pd = jax.random.uniform(rngs.params(), (P, width), minval=-0.5, maxval=0.5)
    else:
        if cfg.prompt_init == "vocab":  # the embeddings of P random vocabulary entries
            ids = jax.random.randint(rngs.params(), (P,), 0, c.vocab_size)
        else:  # the init text's tokens, repeated or cut to P (peft's TEXT init, without special tokens)
            if not getattr(model, "hf_source", None):
                raise PeftError("peft.prompt_init='text' needs the model's tokenizer: load the model from a directory")
            tokens = load_tokenizer(model.hf_source).encode(cfg.prompt_init_text, add_special_tokens=False).ids
            if not tokens:
                raise PeftError(f"peft.prompt_init_text={cfg.prompt_init_text!r} has no tokens")
            ids = jnp.asarray((tokens * (P // len(tokens) + 1))[:P])
        init_pd = base.embed(ids[None])[0].astype(jnp.float32)  # (1, P) -> (1, P, D) -> (P, D)
    base.prompt = Prompt(init_pd)


def real_words(base: nnx.Module, layer_container: str, ids_1p: jax.Array) -> jax.Array:
    """Li & Liang's prefix init: the keys and values each layer computes for the token ids (1, P) read as one
    sequence, in the prefix table's layout (P, L * 2 * D): layer l's keys, then its values."""
    tokens = ids_1p.shape[1]
    _, hidden = base(ids_1p, output_hidden_states=True)  # hidden[l]: layer l's input (1, P, D)
    pairs = []
    for layer, x_1pd in zip(getattr(base, layer_container), hidden, strict=False):
        k_1nph, v_1nph = layer.keys_values(x_1pd)
        pairs += [k_1nph[0].transpose(1, 0, 2), v_1nph[0].transpose(1, 0, 2)]  # (nh, P, hs) -> (P, nh, hs)
    return jnp.stack(pairs, axis=1).reshape(tokens, -1).astype(jnp.float32)  # (P, 2L, nh, hs) -> (P, L*2*D)


def _attach_to_layers(model: nnx.Module, cfg: PeftConfig, rngs: nnx.Rngs) -> None:
    family, _ = task_of(model)
    layers = linear_layers(model)
    key = {"bottleneck": cfg.adapter_placement, "adalora": "lora"}.get(cfg.method, cfg.method)
    chosen = select(cfg.targets or family.peft_targets[key], layers, "peft.targets")
    feedforward = set()
    if cfg.method == "ia3":
        feedforward = set(select(cfg.feedforward or family.peft_targets["ia3_feedforward"], chosen,
                                 "peft.feedforward (among the IA3 targets)"))
    activation = cfg.adapter_activation or {"houlsby": "swish", "pfeiffer": "relu"}[cfg.adapter_placement]
    if activation not in ACTIVATIONS:
        raise PeftError(f"peft.adapter_activation={activation!r} is not supported; choose from {sorted(ACTIVATIONS)}")
    for name in chosen:
        layer = module_at(model, layers[name])
        rank = cfg.init_rank if cfg.method == "adalora" else cfg.rank
        if cfg.method in ("lora", "adalora") and rank > min(layer.in_features, layer.out_features):
            which = "init_rank" if cfg.method == "adalora" else "rank"
            raise PeftError(f"peft.{which}={rank} exceeds {name} ({layer.in_features} -> {layer.out_features}): "
                            "a rank above the smaller side adds parameters and no expressiveness; lower it")
        if cfg.method == "lora":
            layer.adapter = LoRA(layer, cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora, rngs=rngs)
        elif cfg.method == "adalora":
            layer.adapter = AdaLoRA(layer, cfg.init_rank, cfg.alpha, cfg.dropout, cfg.orth_reg_weight, rngs=rngs)
        elif cfg.method == "ia3":
            layer.adapter = IA3(layer, feedforward=name in feedforward)
        else:
            layer.adapter = Bottleneck(layer, cfg.adapter_size, activation, rngs=rngs)


def _freeze(model: nnx.Module, cfg: PeftConfig) -> None:
    """Every weight but the method's and `modules_to_save`'s becomes `Frozen`."""
    family, task = task_of(model)
    names = parameter_names(model)
    modules = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names.values()))
    head = list(dict.fromkeys(k.rsplit(".", 1)[0] for k, _, _ in family.head_keys[task]))
    save = select(cfg.modules_to_save if cfg.modules_to_save is not None else head, modules, "peft.modules_to_save")
    trained = {path for path, n in names.items() if n.rsplit(".", 1)[0] in save}
    for path, node in list(nnx.iter_graph(model)):
        if not isinstance(node, nnx.Module) or is_method_parameter(path):
            continue
        for attr, value in list(vars(node).items()):
            if type(value) is nnx.Param and (*path, attr) not in trained:
                setattr(node, attr, Frozen(value.get_value()))


def adapters(model: nnx.Module) -> dict[str, tuple[nnx.Module, nnx.Module]]:
    """HF module name -> (layer, its adapter) for every layer that has one, in model order."""
    out = {}
    for name, path in linear_layers(model).items():
        layer = module_at(model, path)
        if layer.adapter is not None:
            out[name] = (layer, layer.adapter)
    return out


def method_of(model: nnx.Module) -> str:
    kinds = {type(a) for _, a in adapters(model).values()} or ({type(virtual(model))} if virtual(model) else set())
    return next((m for m, cls in METHODS.items() if kinds == {cls}), "none")


def trained_modules(model: nnx.Module) -> list[str]:
    """HF module names of the parameters trained in full (outside the adapters)."""
    names = parameter_names(model)
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return list(dict.fromkeys(names[p].rsplit(".", 1)[0] for p, _ in params if not is_method_parameter(p)))


def fingerprint(model: nnx.Module, variables: nnx.filterlib.Filter = Frozen) -> str:
    """sha256 of the frozen weights (paths, dtypes, shapes and bytes): what a checkpoint of trained
    parameters alone was trained against. `variables`: another filter, e.g. every weight of a teacher."""
    digest = hashlib.sha256()
    for path, var in sorted(nnx.to_flat_state(nnx.state(model, variables)), key=lambda item: str(item[0])):
        for array in jax.tree.leaves(var.get_value()):  # an array, or QLoRA's NF4 codes and scales
            array = np.asarray(jax.device_get(array))
            digest.update(f"{'/'.join(map(str, path))}:{array.dtype}:{array.shape};".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def describe(model: nnx.Module) -> dict:
    """What PEFT did to `model`: the method, the layers it attached to, what trains in full, parameter counts
    and the base's fingerprint (written to the run directory as peft.json)."""
    count = lambda f: sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model, f)))  # noqa: E731
    trained, frozen = count(nnx.Param), count(Frozen)
    v = virtual(model)
    return {"method": method_of(model), "layers": list(adapters(model)), "virtual_tokens": v.tokens if v else 0,
            "modules_to_save": trained_modules(model),
            "trained_parameters": trained, "frozen_parameters": frozen,
            "trained_percent": round(100.0 * trained / max(trained + frozen, 1), 4),
            "base_fingerprint": fingerprint(model)}


def merge(model: nnx.Module) -> None:
    """Fold every adapter into its layer's weights (in place; the model computes the same function)."""
    _check_foldable(model)
    for layer, adapter in adapters(model).values():
        adapter.merge(layer)


def penalty(model: nnx.Module) -> jax.Array | None:
    """AdaLoRA's orthogonality regularizer, `orth_reg_weight` x the mean of ||A^T A - I||_F and ||B B^T - I||_F
    over its matrices, as peft adds it to the loss; None for every other model."""
    ada = [a for _, a in adapters(model).values() if isinstance(a, AdaLoRA)]
    if not ada or ada[0].orth_reg_weight == 0:
        return None
    return ada[0].orth_reg_weight * sum(a.penalty() for a in ada) / (2 * len(ada))


def adalora_schedule(model: nnx.Module, cfg: PeftConfig, total_steps: int) -> Schedule | None:
    """The rank-budget schedule of a model with AdaLoRA attached (None otherwise), for a run of `total_steps`."""
    matrices = sum(isinstance(a, AdaLoRA) for _, a in adapters(model).values())
    if not matrices:
        return None
    if cfg.tinit + cfg.tfinal >= total_steps:
        raise PeftError(f"peft.tinit={cfg.tinit} + peft.tfinal={cfg.tfinal} leave none of the {total_steps} training "
                        "steps to reallocate the rank budget in; lower them")
    return Schedule(cfg.init_rank, cfg.rank, matrices, total_steps, cfg.tinit, cfg.tfinal, cfg.delta_t, cfg.beta1,
                    cfg.beta2)


def _check_foldable(model: nnx.Module) -> None:
    method = method_of(model)
    if method in ("bottleneck", "prefix", "prompt"):
        why = ("puts a non-linearity between its projections" if method == "bottleneck" else
               "adds virtual tokens, which no weight of the model can hold")
        raise PeftError(f"{method}: the method {why} and cannot be folded into the weights; use the model as it is, "
                        "or export without --merged")


def unmerge(model: nnx.Module) -> None:
    for layer, adapter in adapters(model).values():
        adapter.unmerge(layer)


def merged_model(model: nnx.Module) -> nnx.Module:
    """A plain model of the same family and task (every weight an `nnx.Param`, no adapters) with the updates
    folded in: what `research export --merged` writes, and what transformers loads without peft."""
    family, task = task_of(model)
    _check_foldable(model)
    weights = nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, Frozen)))
    # QLoRA's NF4 kernels dequantized: the weights the adapter was trained against
    values = {p: (qwix.dequantize(v.get_value()) if isinstance(v.get_value(), qwix.QArray) else v.get_value())
              for p, v in weights if not is_method_parameter(p)}
    for name, (layer, adapter) in adapters(model).items():
        path = linear_layers(model)[name]
        values.update({(*path, k): v for k, v in adapter.folded(layer).items()})
    plain = from_config(model.config, task)
    state = nnx.state(plain, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        var.set_value(values[path].astype(var.get_value().dtype))
    nnx.update(plain, state)
    if getattr(model, "hf_source", None):
        plain.hf_source = model.hf_source
    return plain
