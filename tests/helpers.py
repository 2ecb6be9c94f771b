"""Helpers the test modules share (fixtures live in conftest.py). No test module imports another: what two
of them need sits here.

- PyTorch references: `randomize_` gives every parameter of a transformers model random values
  (`saved_random_bert`: a saved one and ours loaded from it); `tiny_batch`, the objective tests' batch; `to_numpy`;
  `our_grads_by_hf_name` / `assert_grads_match` compare gradients by transformers parameter name (1e-4 of each
  tensor's scale), and `check_objective` an objective's loss (1e-5 relative) and gradients on the tiny BERT pair.
- `shakespeare_lm`: a tiny causal-LM experiment for the runner tests of GPT-2.
- The runner on experiments/smoke.py: `smoke(*overrides)`, the run directory's `records`, `deterministic`
  records (timings left out), checkpoint `step_dirs`, `params_of` a run, `run_and_signal` (a real signal at
  a known step, in a subprocess) and `run_on_one_and_eight_devices` (8 simulated CPU devices, in a subprocess).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from research.config import apply_overrides, load_experiment
from research.models.families import family_of
from research.models.hf import _hf_key, key_table

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "smoke.py"
CONLL = ROOT / "experiments" / "conll2003_minilm.py"
# experiments/conll2003_minilm.py shrunk: a 1-layer 32-wide BERT from scratch (MiniLM's vocabulary), 96 training
# sentences, windows of 32 tokens (so some sentences are cut), 3 steps.
CONLL_TINY = ('model.init="scratch"', 'model.overrides={"hidden_size": 32, "num_hidden_layers": 1, '
              '"num_attention_heads": 2, "intermediate_size": 64}', "data.max_train_examples=96",
              "data.max_dev_examples=64", 'data.test={"test": "conll2003/test.txt"}', "data.max_length=32",
              "data.buckets=[16, 32]", "train.max_steps=3", "train.log_every=1", "checkpoint.every_steps=3")
# Per-step values; throughput and compile counts depend on the machine and the process, not the math.
TIMING_KEYS = ("train/examples_per_s", "train/tokens_per_s", "train/compilations")
GRAD_RTOL = 1e-4  # per tensor: |ours - torch| <= GRAD_RTOL * max|torch|
KEY = jax.random.key(3)  # the random draws of the objective parity tests, handed to both frameworks


# ------------------------------------------------------------------------------------ PyTorch references


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


def tiny_batch(weights=(1, 1, 1, 1), **fields):
    """The objective parity tests' padded batch for the tiny BERT pair: 4 rows of 10 tokens (two padded), labels
    of 3 classes, `weights` per example; `fields` adds to it (e.g. teacher_logits)."""
    from research.batch import Batch

    rng = np.random.default_rng(0)
    ids = rng.integers(1, 83, (4, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 3:] = 0
    return Batch(input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids),
                 labels=np.array([0, 2, 1, 2], np.int32), weights=np.asarray(weights, np.float32), **fields)


def saved_random_bert(path, seed: int, **config):
    """A transformers BERT classifier with every parameter random (`randomize_`, eval mode) saved to `path`,
    and ours loaded from it: (theirs, ours)."""
    import transformers

    from research.models import from_pretrained

    cfg = transformers.BertConfig(vocab_size=83, num_hidden_layers=2, num_attention_heads=4, num_labels=3,
                                  attn_implementation="eager", **config)
    theirs = randomize_(transformers.BertForSequenceClassification(cfg), seed=seed)
    theirs.save_pretrained(path)
    return theirs, from_pretrained(path, "sequence_classification")


def shakespeare_lm(model_dir, tmp_path, data_dir, **sections):
    """A tiny causal-LM experiment: `model_dir`'s GPT-2 on Tiny Shakespeare's first 20,000 characters, windows of
    32 tokens, batch 8, 4 steps; `sections` replace whole config sections (objective=..., prune=...)."""
    from research.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig

    text = Path(tmp_path) / "text.txt"
    text.write_text((Path(data_dir) / "tinyshakespeare" / "input.txt").read_text()[:20_000])
    return ExperimentConfig(
        name="lm_test", model=ModelConfig(name_or_path=str(model_dir), task="causal_lm"),
        data=DataConfig(train=str(text), dev=str(text), max_length=32, buckets=(16, 32), max_dev_examples=16),
        **{"train": TrainConfig(batch_size=8, max_steps=4, log_every=1, eval_batch_size=16), **sections})


def to_numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def our_grads_by_hf_name(model, loss_fn, task, beside=()):
    """The loss and its gradient for every parameter of `model`, by its transformers name; `beside`: attributes
    holding an `nnx.Linear` attached for the loss (an objective's own module), named as torch's `nn.Linear`
    attached under the same name would be ("<name>.weight", "<name>.bias")."""
    family = family_of(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # A copy of `rest` per trace: NNX refuses to update (e.g. an inner nnx transform's dropout count)
    # variables that belong to another trace level.
    loss, grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p, jax.tree.map(lambda x: x, rest))))(
        params)
    by_path = {path: (key, t) for key, (path, t) in key_table(family, model.config, task).items()}
    out = {}
    for path, g in nnx.to_flat_state(grads):
        if path[0] in beside:  # (name, "kernel" | "bias"): torch's weight is the kernel transposed
            out[f"{path[0]}.{'weight' if path[1] == 'kernel' else 'bias'}"] = np.asarray(g[...]).T
            continue
        key, transpose = by_path[path]
        g = np.asarray(g[...])
        out[_hf_key(family, key, path, task)] = g.T if transpose else g
    return float(loss), out


def assert_grads_match(ours, torch_model):
    theirs = {n: to_numpy(p.grad) for n, p in torch_model.named_parameters()}
    theirs.pop("lm_head.weight", None)  # tied to wte: torch accumulates both uses into wte's grad
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    overall = max(np.abs(g).max() for g in theirs.values())
    for name, g in theirs.items():
        scale = np.abs(g).max()
        if scale < 1e-6 * overall:
            # Exactly zero in exact arithmetic (the attention key bias: softmax ignores a per-query shift);
            # both frameworks hold only rounding noise there.
            assert "key.bias" in name, f"{name}: unexpectedly zero gradient in torch"
            assert np.abs(ours[name]).max() < 1e-6 * overall, name
            continue
        np.testing.assert_allclose(ours[name], g, rtol=0, atol=GRAD_RTOL * scale, err_msg=name)


def check_objective(model_pair, objective, torch_loss, batch, key=KEY, beside=()) -> None:
    """`objective`'s loss (1e-5 relative) and gradients (GRAD_RTOL) on our half of `model_pair` (torch, ours)
    equal `torch_loss` and the gradients torch accumulated for it (`beside`: as in our_grads_by_hf_name)."""
    theirs, mine = model_pair
    b = jax.tree.map(jnp.asarray, batch)
    loss, grads = our_grads_by_hf_name(mine, lambda m: objective(m, b, key)[0], "sequence_classification", beside)
    np.testing.assert_allclose(loss, float(torch_loss.detach()), rtol=1e-5)
    assert_grads_match(grads, theirs)


# ------------------------------------------------------------------------------------------- the runner


def smoke(*overrides):
    return apply_overrides(load_experiment(SMOKE), list(overrides))


def conll(*overrides):
    """The tiny CoNLL-2003 tagging experiment (CONLL_TINY), with `overrides`."""
    return apply_overrides(load_experiment(CONLL), [*CONLL_TINY, *overrides])


def step_dirs(workdir):
    """The checkpoint step directories (checkpoints/ also holds its FORMAT file)."""
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def records(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def deterministic(rs):
    """The training records without timings (`research eval` records, added later, left out too)."""
    kept = [r for r in rs if not any(k.startswith("eval_") for k in r)]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in kept]


def params_of(workdir, which="latest"):
    from research.run import load_trained_model

    model, step, _ = load_trained_model(Path(workdir), which)
    return step, {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


SIGNAL_AT_STEP = """
import os, signal, sys
from research import metrics
from research.cli import main

step_at, signum = int(sys.argv[1]), getattr(signal, sys.argv[2])
write = metrics.MetricWriter.write

def write_then_signal(self, step, values):
    write(self, step, values)
    if step == step_at and "train/loss" in values:
        os.kill(os.getpid(), signum)  # a real signal, delivered mid-run at a known step

metrics.MetricWriter.write = write_then_signal
main(sys.argv[3:])
"""


def run_and_signal(workdir, step, signum, *args):
    """`research train smoke [args]` in a subprocess that receives `signum` right after logging `step`."""
    return subprocess.run([sys.executable, "-c", SIGNAL_AT_STEP, str(step), signum, "train", str(SMOKE),
                           "--workdir", str(workdir), *args], capture_output=True, text=True, timeout=600)


EIGHT_DEVICES = """
import json, sys
import jax
import numpy as np
from flax import nnx
from research.config import apply_overrides, load_experiment
from research.run import load_trained_model
from research import sharding, train as train_module
from pathlib import Path

assert jax.device_count() == 8, jax.devices()
out = {}
placed = {}
state_shardings = sharding.state_shardings
def recording(state, mesh, fsdp):  # what the run placed its state with
    out = state_shardings(state, mesh, fsdp)
    embeddings = out["params"].get("bert", {}).get("embeddings")  # absent under PEFT: frozen, not a parameter
    placed["embedding"] = str(embeddings["word_embeddings"]["embedding"].spec) if embeddings else None
    return out
train_module.state_shardings = recording
runs = ((1, False), (8, False), (8, True)) if sys.argv[3] == "fsdp" else ((1, False), (8, False))
for n, fsdp in runs:
    devices = jax.devices()[:n]
    train_module.make_mesh = lambda devices=devices: sharding.make_mesh(devices)
    # One bucket: each of the three runs compiles one train step for 8 devices, not one per bucket.
    cfg = apply_overrides(load_experiment(sys.argv[1]), ["train.max_steps=4", "train.eval_every=null",
                                                         "data.buckets=[32]", *sys.argv[4:],
                                                         f"train.fsdp={str(fsdp).lower()}"])
    workdir = Path(sys.argv[2]) / f"d{n}{'fsdp' if fsdp else ''}"
    train_module.train(cfg, workdir)
    losses = [json.loads(l)["train/loss"] for l in (workdir / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in l]
    model, _, _ = load_trained_model(workdir, "latest")
    state = nnx.to_flat_state(nnx.state(model, nnx.Param))
    label = f"{n}{'fsdp' if fsdp else ''}"
    # The parameters go back as an .npz beside the runs (JSON lists of a 30522 x 32 embedding cost seconds).
    np.savez(Path(sys.argv[2]) / f"params_{label}.npz", **{"/".join(map(str, k)): np.asarray(v[...]) for k, v in state})
    out[label] = {"losses": losses, "embedding": placed["embedding"]}
print("RESULT" + json.dumps(out))
"""


def run_on_one_and_eight_devices(tmp_path, *overrides, fsdp=False, experiment=SMOKE):
    """Runs of `experiment` (smoke.py) on 1 and 8 simulated devices (and on 8 with FSDP when asked)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"}
    done = subprocess.run([sys.executable, "-c", EIGHT_DEVICES, str(experiment), str(tmp_path),
                           "fsdp" if fsdp else "replicated", *overrides], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(done.stdout.split("RESULT")[1])
    for label, run in out.items():
        with np.load(Path(tmp_path) / f"params_{label}.npz") as saved:
            run["params"] = dict(saved)
    return (out["1"], out["8"], out["8fsdp"]) if fsdp else (out["1"], out["8"])
