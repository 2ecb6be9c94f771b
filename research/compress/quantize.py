"""Post-training quantization of a trained model through `qwix` (Google's JAX quantization library), and its
export: a plain transformers checkpoint of the dequantized weights beside the quantized tensors and their scales.

Methods (weights of the target linear layers; by default every linear layer inside the transformer layers, as
for pruning: not the embeddings, the pooler or the head):

    int8           int8 weights, one scale per output channel (absmax / 127.5: each weight within half a
                   step), and int8 activations quantized per token on the fly (dynamic range): both operands
                   of each matmul in int8
    int8_weights   int8 weights per output channel, activations in float32 (weight-only)
    int4_weights   int4 weights, one scale per output channel and group of 128 inputs (the usual GPTQ / AWQ
                   grouping), activations in float32
    nf4            NormalFloat4 (Dettmers et al. 2023, QLoRA): 16 levels at the quantiles of a normal
                   distribution, one absmax scale per block of 64 consecutive inputs of an output channel
                   (bitsandbytes' blocks of 64 of the row-major (out, in) weight)

All of it is qwix's: `PtqProvider` rewrites the matmuls of the modules whose path matches a rule, and the
kernels become `QArray`s (qvalue, scale). Nothing here re-implements a quantizer.

The export directory (`export_quantized`) holds:
- `config.json` + `model.safetensors`: the model with each quantized weight replaced by its dequantized value,
  which transformers loads (and computes with in float: the same numbers up to float rounding);
- `quantized.safetensors`: for each quantized layer, `<HF weight name>.qvalue` (transformers' (out, in) layout,
  int4 and uint4 codes widened to int8 / uint8 since safetensors has no 4-bit type) and `<HF weight name>.scale`
  ((out, in / group) float32);
- `quantization.json`: the method, the layers, qwix's version and the size of the quantized model in bytes.
`load_quantized` rebuilds the quantized model from it, with the logits of the one that was exported.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx
from safetensors.numpy import load_file, save_file

from research.config import ConfigError
from research.models import from_pretrained, save_pretrained
from research.models.families import family_of
from research.peft.targets import PeftError, block_linears, module_at, parameter_names, task_of

METHODS: dict[str, dict] = {
    "int8": {"weight_qtype": jnp.int8, "act_qtype": jnp.int8},
    "int8_weights": {"weight_qtype": jnp.int8},
    "int4_weights": {"weight_qtype": jnp.int4, "tile_size": 128},
    "nf4": {"weight_qtype": "nf4", "tile_size": 64},
}


def rules(model: nnx.Module, method: str, targets: tuple[str, ...] = ()) -> list[qwix.QuantizationRule]:
    """One qwix rule matching exactly the target layers' module paths, with the method's settings."""
    if method not in METHODS:
        raise ConfigError(f"quantization method {method!r} is not known; choose from {sorted(METHODS)}")
    try:
        layers = block_linears(model, targets, "quantize targets")
    except PeftError as e:
        raise ConfigError(str(e)) from None
    settings = METHODS[method]
    width = min(min(_node(model, p).kernel.get_value().shape) for p in layers.values())
    if settings.get("tile_size") and width % settings["tile_size"]:
        raise ConfigError(f"{method} quantizes in groups of {settings['tile_size']} inputs, and a target layer has "
                          f"{width}: choose int8 or int8_weights for this model")
    paths = "|".join("/".join(map(str, p)) for p in layers.values())
    return [qwix.QuantizationRule(module_path=f"(?:{paths})", **settings)]


def example_inputs(model: nnx.Module) -> jax.Array:
    """What qwix runs the model on once to find its matmuls (the values do not matter)."""
    return jnp.ones((1, 8), jnp.int32)


def quantize(model: nnx.Module, method: str, targets: tuple[str, ...] = ()) -> nnx.Module:
    """A quantized copy of `model` (in eval mode); `model` itself is unchanged."""
    family_of(model)  # a model of ours, before qwix subclasses it
    model.eval()
    return qwix.quantize_model(model, qwix.PtqProvider(rules(model, method, targets)), example_inputs(model))


def qat(model: nnx.Module, method: str, targets: tuple[str, ...] = ()) -> nnx.Module:
    """`model` for quantization-aware training: its forward pass computes with the target weights quantized as
    `method` would (the same numbers as `quantize`'s), its backward pass is straight-through: the gradient of
    the float weight is that of the quantized one, and the gradient of the input is taken through the quantized
    weight (`use_original_residuals=False`; qwix's default for a forward-only rule takes it through the float
    weight instead). Grouped methods (int4_weights, nf4) fall back to the float weight there, as qwix cannot
    reuse a grouped operand in the backward. The parameters keep their structure: float, trained, checkpointed.
    """
    family_of(model)
    exact = {"use_original_residuals": False}
    qt_rules = [qwix.QtRule(**{**vars(rule), "additional_qt_config": exact}) for rule in rules(model, method, targets)]
    return qwix.quantize_model(model, qwix.QtProvider(qt_rules), example_inputs(model))


def quantized_kernels(qmodel: nnx.Module) -> dict[tuple, qwix.QArray]:
    """Our kernel path -> its QArray, for every quantized weight."""
    out = {}
    for path, _ in nnx.to_flat_state(nnx.state(qmodel)):
        if path[-3:] == ("kernel", "array", "qvalue"):
            out[path[:-2]] = _node(qmodel, path[:-2]).array  # the kernel holds a WithAux, which holds the QArray
    return out


def _node(model: nnx.Module, path: tuple):
    """The module (or a variable's value) at `path`: `module_at`, with a variable unwrapped."""
    node = module_at(model, path)
    return node.get_value() if isinstance(node, nnx.Variable) else node


def dequantized(qmodel: nnx.Module, like: nnx.Module) -> nnx.Module:
    """A copy of `like` (the unquantized model) whose quantized weights hold their dequantized values."""
    out = nnx.clone(like)
    for path, qarray in quantized_kernels(qmodel).items():
        kernel = _node(out, path[:-1]).kernel
        kernel.set_value(qwix.dequantize(qarray).astype(kernel.get_value().dtype))
    return out


def size_in_bytes(qmodel: nnx.Module) -> int:
    """Bytes the quantized model's weights take: 4-bit codes at half a byte, scales and unquantized weights as
    stored (float32)."""
    total = 0
    for _, value in nnx.to_flat_state(nnx.state(qmodel, nnx.Param)):
        array = value.get_value()
        bits = 4 if str(array.dtype) in ("int4", "uint4") else 8 * array.dtype.itemsize
        total += array.size * bits // 8
    return total


def export_quantized(qmodel: nnx.Module, like: nnx.Module, out_dir: str | Path, method: str,
                     targets: tuple[str, ...] = ()) -> dict:
    """Write the export directory (module docstring); returns what quantization.json says."""
    out_dir = Path(out_dir)
    save_pretrained(dequantized(qmodel, like), out_dir)
    names = parameter_names(like)
    tensors = {}
    for path, qarray in quantized_kernels(qmodel).items():
        name = names[path]
        qvalue = np.asarray(qarray.qvalue.get_value())
        wide = np.int8 if str(qvalue.dtype) == "int4" else np.uint8 if str(qvalue.dtype) == "uint4" else qvalue.dtype
        tensors[f"{name}.qvalue"] = np.ascontiguousarray(qvalue.astype(wide).T)  # (in, out) -> HF's (out, in)
        scale = np.asarray(qarray.scale.get_value(), np.float32)  # (in / group, out)
        tensors[f"{name}.scale"] = np.ascontiguousarray(scale.T)  # (out, in / group)
    save_file(tensors, out_dir / "quantized.safetensors")
    layers = sorted(names[p].removesuffix(".weight") for p in quantized_kernels(qmodel))
    about = {"method": method, "targets": list(targets), "layers": layers,
             "bytes": size_in_bytes(qmodel), "float32_bytes": size_in_bytes(like),
             "qwix": importlib.metadata.version("qwix")}
    (out_dir / "quantization.json").write_text(json.dumps(about, indent=2) + "\n")
    return about


def load_quantized(directory: str | Path, task: str) -> nnx.Module:
    """The quantized model an export directory holds (quantization.json's method over the dequantized
    checkpoint, then the exported codes and scales in place)."""
    directory = Path(directory)
    if not (directory / "quantization.json").is_file():
        raise ConfigError(f"{directory} has no quantization.json: not a directory that export_quantized wrote")
    about = json.loads((directory / "quantization.json").read_text())
    model = from_pretrained(directory, task)
    qmodel = quantize(model, about["method"], tuple(about["targets"]))
    stored = load_file(directory / "quantized.safetensors")
    names = parameter_names(model)
    for path, qarray in quantized_kernels(qmodel).items():
        name = names[path]
        if f"{name}.qvalue" not in stored:
            raise ConfigError(f"{directory}/quantized.safetensors has no {name}.qvalue, which {about['method']} "
                              "quantizes: the file is incomplete or from another model")
        # The QArray's qvalue and scale are nnx.Params of the quantized model: set in place.
        current_q, current_s = qarray.qvalue.get_value(), qarray.scale.get_value()
        qvalue = jnp.asarray(stored[f"{name}.qvalue"].T).astype(current_q.dtype)
        scale = jnp.asarray(stored[f"{name}.scale"].T)
        if qvalue.shape != current_q.shape or scale.shape != current_s.shape:
            raise ConfigError(f"{directory}/quantized.safetensors: {name} has shapes {qvalue.shape} / {scale.shape}, "
                              f"the model expects {current_q.shape} / {current_s.shape}")
        qarray.qvalue.set_value(qvalue)
        qarray.scale.set_value(scale)
    task_of(model)  # the family and task check, for a clear error on a foreign directory
    return qmodel
