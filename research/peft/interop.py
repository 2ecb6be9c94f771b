"""Adapters in peft's format, both ways: what `peft.PeftModel.from_pretrained(base, DIR)` loads in PyTorch, and
what `peft.init_from=DIR` starts a run from.

    DIR/adapter_config.json          peft's long-standing keys only (peft_type, task_type, target_modules, ...)
    DIR/adapter_model.safetensors    base_model.model.<HF module>.lora_A.weight (r, D) / .lora_B.weight (F, r)
                                     base_model.model.<HF module>.ia3_l ((F, 1), or (1, D) for feedforward)
                                     base_model.model.<HF key of a module trained in full> (modules_to_save)

`target_modules` lists the full module names the run attached to, so peft rebuilds exactly those layers
whatever patterns chose them. Our exports also put the base's fingerprint in the safetensors metadata
(`research.base_fingerprint`); an adapter with one is refused on any other base.

Prefix and prompt tuning save `prompt_embeddings` (prefix: (P, L * 2 * D), the reparameterization's output;
prompt: (P, D)) and the head under `base_model.<HF key>`, as peft does.

Bottleneck adapters, which peft lacks, use the same layout under our own `peft_type`, "BOTTLENECK"
(`<HF module>.adapter.down.weight` (m, F), `.down.bias`, `.up.weight` (F, m), `.up.bias`: torch nn.Linear
layout) and load back only here.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from research.config import PeftConfig
from research.peft.attach import adapters, fingerprint, is_method_parameter, method_of, trained_modules, virtual
from research.peft.targets import PeftError, linear_layers, parameter_names, task_of, transposed

PREFIX = "base_model.model."  # peft's name of the wrapped transformers model ...
PROMPT_LEARNING_PREFIX = "base_model."  # ... and, for prefix and prompt tuning, of the task head's module
PEFT_TYPES = {"lora": "LORA", "adalora": "ADALORA", "ia3": "IA3", "bottleneck": "BOTTLENECK", "prefix": "PREFIX_TUNING",
              "prompt": "PROMPT_TUNING"}
TASK_TYPES = {"sequence_classification": "SEQ_CLS", "token_classification": "TOKEN_CLS", "causal_lm": "CAUSAL_LM",
              "masked_lm": None, "base": "FEATURE_EXTRACTION"}
FINGERPRINT_KEY = "research.base_fingerprint"


def _head_prefix(model: nnx.Module) -> str:
    return PROMPT_LEARNING_PREFIX if virtual(model) is not None else PREFIX


def trained_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """Every trained tensor under peft's names: the method's, then the modules trained in full."""
    out = {}
    for name, (_, adapter) in adapters(model).items():
        out.update({PREFIX + k: np.ascontiguousarray(v) for k, v in adapter.to_peft(name).items()})
    if virtual(model) is not None:
        out.update({k: np.ascontiguousarray(v) for k, v in virtual(model).to_peft().items()})
    names, flip, head = parameter_names(model), transposed(model), _head_prefix(model)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if not is_method_parameter(path):
            array = np.asarray(jax.device_get(var.get_value()))
            out[head + names[path]] = np.ascontiguousarray(array.T if flip[path] else array)
    return out


def _expected_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    out = {}
    for name, (_, adapter) in adapters(model).items():
        out.update({PREFIX + k: s for k, s in adapter.peft_shapes(name).items()})
    if virtual(model) is not None:
        out.update(virtual(model).peft_shapes())
    names, flip, head = parameter_names(model), transposed(model), _head_prefix(model)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if not is_method_parameter(path):
            shape = tuple(var.get_value().shape)
            out[head + names[path]] = shape[::-1] if flip[path] else shape
    return out


def adapter_config(model: nnx.Module, cfg: PeftConfig, base_name_or_path: str, total_steps: int | None = None
                   ) -> dict:
    """peft's adapter_config.json for `model`. `total_steps` (AdaLoRA: the run's length, which peft wants even
    for inference) defaults to the shortest schedule peft accepts."""
    method = method_of(model)
    family, task = task_of(model)
    common = {"peft_type": PEFT_TYPES[method], "task_type": TASK_TYPES[task], "base_model_name_or_path":
              base_name_or_path, "modules_to_save": trained_modules(model) or None, "inference_mode": True,
              "revision": None}
    if method in ("prefix", "prompt"):
        c = model.config
        common |= {"num_virtual_tokens": virtual(model).tokens, "token_dim": family.width(c),
                   "num_transformer_submodules": 1, "num_attention_heads": family.num_heads(c),
                   "num_layers": family.num_layers(c)}
        if method == "prompt":  # the init is done: peft must not redo it (RANDOM leaves the loaded table alone)
            return common | {"prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
                             "tokenizer_name_or_path": None}
        # inference_mode: peft builds a plain table for the saved output, whatever prefix_projection says
        return common | {"prefix_projection": virtual(model).mlp_in is not None,
                         "encoder_hidden_size": cfg.prefix_hidden_size or family.width(c)}
    layers = list(adapters(model))
    # GPT-2's Conv1D stores (in, out): peft must know, to merge the update the right way round.
    flip = transposed(model)
    fan_in_fan_out = any(not flip[(*layer_path, "kernel")] for layer_path in _layer_paths(model))
    common |= {"target_modules": layers, "fan_in_fan_out": fan_in_fan_out}
    if method == "lora":
        return common | {"r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
                         "use_rslora": cfg.rslora, "bias": "none", "init_lora_weights": True}
    if method == "adalora":
        # No rank_pattern: the pruned triplets are exported as they are (their e entries exactly zero), so peft
        # keeps every matrix at init_r and computes the same function (its loader would otherwise resize).
        return common | {"r": cfg.rank, "init_r": cfg.init_rank, "target_r": cfg.rank, "lora_alpha": cfg.alpha,
                         "lora_dropout": cfg.dropout, "tinit": cfg.tinit, "tfinal": cfg.tfinal, "deltaT": cfg.delta_t,
                         "beta1": cfg.beta1, "beta2": cfg.beta2, "orth_reg_weight": cfg.orth_reg_weight,
                         "bias": "none", "init_lora_weights": True, "rank_pattern": None,
                         "total_step": total_steps or cfg.tinit + cfg.tfinal + 1}
    if method == "ia3":
        ff = [n for n, (_, a) in adapters(model).items() if a.feedforward]
        return common | {"feedforward_modules": ff, "init_ia3_weights": True}
    return common | {"adapter_size": cfg.adapter_size, "adapter_placement": cfg.adapter_placement,
                     "adapter_activation": next(iter(adapters(model).values()))[1].activation}


def save_adapter(model: nnx.Module, cfg: PeftConfig, out_dir: str | Path, base_name_or_path: str,
                 total_steps: int | None = None) -> Path:
    """Write `model`'s trained tensors and config in peft's layout (see the module docstring)."""
    if any(a.merged for _, a in adapters(model).values()):
        raise PeftError("the adapters are merged into the weights: unmerge them before saving the adapter alone")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(trained_tensors(model), out / "adapter_model.safetensors",
              metadata={"format": "pt", FINGERPRINT_KEY: fingerprint(model)})
    config = adapter_config(model, cfg, base_name_or_path, total_steps)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def load_adapter(model: nnx.Module, directory: str | Path) -> None:
    """Set `model`'s trained tensors (adapters and modules trained in full) from a peft-format directory. The
    method, the scaling, the base (when the directory carries its fingerprint), and every tensor's name and
    shape must match this model's; each mismatch is an error naming it."""
    directory = Path(directory)
    config, tensors, their_fingerprint = _read(directory)
    method = method_of(model)
    if config.get("peft_type") != PEFT_TYPES[method]:
        raise PeftError(f"peft.init_from: {directory} holds a {config.get('peft_type')} adapter, but this run trains "
                        f"{PEFT_TYPES[method]}: set peft.method to match it")
    if method in ("lora", "adalora"):
        _check_scaling(model, method, config, directory)
    if their_fingerprint is not None and their_fingerprint != fingerprint(model):
        raise PeftError(f"peft.init_from: {directory} was trained on another base model (frozen-weight fingerprint "
                        f"{their_fingerprint[:12]}..., this model's {fingerprint(model)[:12]}...): load the base it "
                        "was trained on (model.name_or_path)")
    if config.get("rank_pattern"):
        tensors = _unprune(tensors, config["rank_pattern"])
    _check_fits(model, tensors, directory)
    if virtual(model) is not None:
        if getattr(virtual(model), "mlp_in", None) is not None:
            raise PeftError(f"peft.init_from: {directory} holds prefix tuning's keys and values (the "
                            "reparameterization's output): train them directly with peft.prefix_projection=false")
        virtual(model).from_peft(tensors)
    for name, (_, adapter) in adapters(model).items():
        adapter.from_peft({k.removeprefix(PREFIX): v for k, v in tensors.items()}, name)
    names, flip, head = parameter_names(model), transposed(model), _head_prefix(model)
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        if not is_method_parameter(path):
            array = tensors[head + names[path]]
            var.set_value(jax.numpy.asarray(array.T if flip[path] else array, var.get_value().dtype))
    nnx.update(model, state)


def _read(directory: Path) -> tuple[dict, dict[str, np.ndarray], str | None]:
    """(adapter_config.json, the tensors, our base fingerprint from the safetensors metadata if there is one)."""
    config_path, weights_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise PeftError(f"peft.init_from: {path} does not exist; a peft adapter directory holds "
                            "adapter_config.json and adapter_model.safetensors (PeftModel.save_pretrained writes them)")
    with open(weights_path, "rb") as f:  # safetensors' header: 8 bytes of length, then JSON
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return (json.loads(config_path.read_text()), load_file(weights_path),
            header.get("__metadata__", {}).get(FINGERPRINT_KEY))


def _check_scaling(model: nnx.Module, method: str, config: dict, directory: Path) -> None:
    """LoRA's alpha / r (rsLoRA: / sqrt(r)), AdaLoRA's alpha / (init_r + 1e-5): the adapter's must be ours."""
    ours = next(iter(adapters(model).values()))[1].scaling
    r, alpha, rs = config.get("init_r" if method == "adalora" else "r"), config.get("lora_alpha", 8), \
        config.get("use_rslora", False)
    theirs = alpha / (r ** 0.5 if rs else r + (1e-5 if method == "adalora" else 0))
    if abs(theirs - ours) > 1e-9 * max(abs(ours), 1.0):
        raise PeftError(f"peft.init_from: {directory} was trained with r={r}, lora_alpha={alpha}, use_rslora={rs} "
                        f"(scaling {theirs:g}), this run scales by {ours:g}: set peft.rank (AdaLoRA: peft.init_rank), "
                        "peft.alpha and peft.rslora to the adapter's")


def _unprune(tensors: dict[str, np.ndarray], rank_pattern: dict[str, list[bool]]) -> dict[str, np.ndarray]:
    """An AdaLoRA adapter that peft saved with a rank pattern holds only the kept triplets: put them back in
    their slots of the init_r-wide matrices, the pruned ones at zero (the same function)."""
    out = dict(tensors)
    for key, kept in rank_pattern.items():  # "<HF module>.lora_E": [bool] * init_r
        rows = np.flatnonzero(kept)
        for part in "AEB":
            name = f"{PREFIX}{key.removesuffix('.lora_E')}.lora_{part}"
            if name not in tensors or len(rows) == len(kept):
                continue
            x = tensors[name]
            if part == "B":  # (F, kept) -> (F, init_r)
                full = np.zeros((x.shape[0], len(kept)), x.dtype)
                full[:, rows] = x
            else:  # (kept, D or 1) -> (init_r, D or 1)
                full = np.zeros((len(kept), x.shape[1]), x.dtype)
                full[rows] = x
            out[name] = full
    return out


def _check_fits(model: nnx.Module, tensors: dict[str, np.ndarray], directory: Path) -> None:
    expected = _expected_shapes(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [f"{k}: {tensors[k].shape} != {expected[k]}" for k in expected
              if k in tensors and tuple(tensors[k].shape) != expected[k]]
    if missing or unexpected or shapes:
        raise PeftError(f"peft.init_from: {directory} does not fit this model (another base, other targets or other "
                        f"modules_to_save?). Missing: {missing[:8]}{' ...' if len(missing) > 8 else ''}; unexpected: "
                        f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}; mis-shaped: {shapes[:8]}")


def _layer_paths(model: nnx.Module) -> list[tuple]:
    paths = linear_layers(model)
    return [paths[name] for name in adapters(model)]
